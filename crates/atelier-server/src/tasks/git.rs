//! Git for tasks, in the task's sandbox: put the repository on the task's branch,
//! and at the end commit what is left and read back the diff, the commits and a
//! bundle of the branch (pushed from the host by the workspace handle).

use std::time::Duration;

use atelier_agent_proto::ExecRequest;

use crate::Error;
use crate::sandboxes::Sandboxes;

/// Largest diff kept for a task (bigger ones are cut, and marked so).
pub const MAX_DIFF_BYTES: usize = 4 << 20;
/// Largest bundle copied out of a sandbox.
pub const MAX_BUNDLE_BYTES: u64 = 2 << 30;
/// Where the bundle is made in the guest.
pub const GUEST_BUNDLE: &str = "/tmp/atelier-task.bundle";

/// Runs `git -C repo args…` in the sandbox; its stdout, or an error with stderr.
pub async fn git(
    sb: &Sandboxes,
    sandbox: &str,
    repo: &str,
    args: &[&str],
) -> Result<String, Error> {
    let mut argv = vec!["git", "-C", repo];
    argv.extend_from_slice(args);
    let out = sb
        .exec(
            sandbox,
            ExecRequest::new(argv)
                .env("GIT_TERMINAL_PROMPT", "0")
                .timeout(Duration::from_secs(600)),
        )
        .await?;
    if !out.success() {
        return Err(Error::unavailable(format!(
            "git {} in the sandbox failed: {}",
            args.first().copied().unwrap_or(""),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Puts the repository on `branch`: a new branch from what is checked out now, or
/// (chained tasks) the parent's branch fetched from `origin`. Returns the base
/// commit (what the branch started from).
pub async fn start_branch(
    sb: &Sandboxes,
    sandbox: &str,
    repo: &str,
    branch: &str,
    from_remote: bool,
) -> Result<String, Error> {
    for (k, v) in [
        ("user.name", "Atelier"),
        ("user.email", "atelier@localhost"),
    ] {
        if git(sb, sandbox, repo, &["config", "--get", k])
            .await
            .is_err()
        {
            git(sb, sandbox, repo, &["config", k, v]).await?;
        }
    }
    let base = git(sb, sandbox, repo, &["rev-parse", "HEAD"]).await?;
    if from_remote {
        git(
            sb,
            sandbox,
            repo,
            &[
                "fetch",
                "--quiet",
                "origin",
                &format!("refs/heads/{branch}"),
            ],
        )
        .await?;
        git(
            sb,
            sandbox,
            repo,
            &["checkout", "--quiet", "-B", branch, "FETCH_HEAD"],
        )
        .await?;
    } else {
        git(sb, sandbox, repo, &["checkout", "--quiet", "-B", branch]).await?;
    }
    Ok(base.trim().to_owned())
}

/// What the branch holds at the end.
#[derive(Debug, Clone, Default)]
pub struct Outcome {
    /// `git diff base..HEAD` (cut at [`MAX_DIFF_BYTES`]).
    pub diff: String,
    /// Whether it was cut.
    pub truncated: bool,
    /// Commits since base, oldest first: (id, subject).
    pub commits: Vec<(String, String)>,
    /// Files changed since base.
    pub files: Vec<String>,
}

/// Commits everything uncommitted (with `message`) and reads the diff, commits and
/// files since `base`.
pub async fn finish(
    sb: &Sandboxes,
    sandbox: &str,
    repo: &str,
    base: &str,
    message: &str,
) -> Result<Outcome, Error> {
    git(sb, sandbox, repo, &["add", "-A"]).await?;
    let staged = sb
        .exec(
            sandbox,
            ExecRequest::new(["git", "-C", repo, "diff", "--cached", "--quiet"])
                .timeout(Duration::from_secs(120)),
        )
        .await?;
    if !staged.success() {
        git(sb, sandbox, repo, &["commit", "--quiet", "-m", message]).await?;
    }
    outcome(sb, sandbox, repo, base).await
}

/// The diff, commits and files of the branch since `base`, without committing.
pub async fn outcome(
    sb: &Sandboxes,
    sandbox: &str,
    repo: &str,
    base: &str,
) -> Result<Outcome, Error> {
    let range = format!("{base}..HEAD");
    let log = git(
        sb,
        sandbox,
        repo,
        &["log", "--reverse", "--format=%H%x09%s", &range],
    )
    .await?;
    let commits = log
        .lines()
        .filter_map(|l| l.split_once('\t'))
        .map(|(h, s)| (h.to_owned(), s.to_owned()))
        .collect();
    // Against the work tree, new files included, so what the agent has not
    // committed shows while the task runs.
    let mut diff = work_tree_diff(sb, sandbox, repo, base, false).await?;
    let mut truncated = false;
    if diff.len() > MAX_DIFF_BYTES {
        let mut cut = MAX_DIFF_BYTES;
        while !diff.is_char_boundary(cut) {
            cut -= 1;
        }
        diff.truncate(cut);
        truncated = true;
    }
    let files = work_tree_diff(sb, sandbox, repo, base, true).await?;
    Ok(Outcome {
        diff,
        truncated,
        commits,
        files: files.lines().map(str::to_owned).collect(),
    })
}

/// Staged in a scratch index (a copy of the real one plus `add -A`), so untracked
/// files count and the repository's own index is left as the agent had it.
const WORK_TREE_DIFF: &str = r#"set -e
idx=$(mktemp)
trap 'rm -f "$idx"' EXIT
cp "$(git rev-parse --git-path index)" "$idx" 2>/dev/null || true
GIT_INDEX_FILE=$idx git add -A
GIT_INDEX_FILE=$idx git diff --cached "$@" | head -c "$MAX"
"#;

async fn work_tree_diff(
    sb: &Sandboxes,
    sandbox: &str,
    repo: &str,
    base: &str,
    names_only: bool,
) -> Result<String, Error> {
    let mut argv = vec!["sh", "-c", WORK_TREE_DIFF, "diff", base];
    if names_only {
        argv.push("--name-only");
    }
    let out = sb
        .exec(
            sandbox,
            ExecRequest::new(argv)
                .cwd(repo)
                .env("MAX", (MAX_DIFF_BYTES + 1).to_string())
                .timeout(Duration::from_secs(600)),
        )
        .await?;
    if !out.success() {
        return Err(Error::unavailable(format!(
            "git diff in the sandbox failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Makes a bundle of `branch` in the guest (at [`GUEST_BUNDLE`]).
pub async fn bundle(sb: &Sandboxes, sandbox: &str, repo: &str, branch: &str) -> Result<(), Error> {
    git(
        sb,
        sandbox,
        repo,
        &[
            "bundle",
            "create",
            "--quiet",
            GUEST_BUNDLE,
            &format!("refs/heads/{branch}"),
        ],
    )
    .await
    .map(|_| ())
}
