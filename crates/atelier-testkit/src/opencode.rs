//! The real OpenCode server (`opencode serve`) on the host, offline, talking to a
//! scripted model: for tests of the OpenCode client without a VM.
//!
//! `scripts/test.sh` installs `opencode-ai` and `@opencode-ai/plugin` (pinned) into the
//! test cache and exports `ATELIER_TEST_OPENCODE` (the binary) and
//! `ATELIER_TEST_OPENCODE_PLUGIN` (the plugin's npm prefix, pre-seeded into OpenCode's
//! config directory so a start does not run `npm install`).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::{Value, json};

use crate::manager::free_port;
use crate::poll::poll_until_async;

/// The OpenCode version the test kit pins.
pub const OPENCODE_VERSION: &str = "1.18.33";

/// How long a start may take before the test fails (a cold Bun start is ~3 s here).
const START_DEADLINE: Duration = Duration::from_secs(60);

/// The OpenCode binary from `ATELIER_TEST_OPENCODE`. Unset: panics under CI (`CI=true`)
/// saying how to get it; elsewhere prints why the test is skipped and returns `None`.
pub fn opencode_bin() -> Option<PathBuf> {
    match std::env::var_os("ATELIER_TEST_OPENCODE") {
        Some(p) => {
            let p = PathBuf::from(p);
            assert!(
                p.is_file(),
                "ATELIER_TEST_OPENCODE={} is not a file; run `bash scripts/test.sh` (it installs opencode-ai@{OPENCODE_VERSION})",
                p.display()
            );
            Some(p)
        }
        None if std::env::var("CI").as_deref() == Ok("true") => panic!(
            "ATELIER_TEST_OPENCODE is unset under CI; `scripts/test.sh` installs opencode-ai@{OPENCODE_VERSION} and exports it"
        ),
        None => {
            eprintln!(
                "skipped: ATELIER_TEST_OPENCODE is unset (the path of an opencode-ai@{OPENCODE_VERSION} binary; `bash scripts/test.sh` sets it)"
            );
            None
        }
    }
}

/// A running `opencode serve` on 127.0.0.1 with its own HOME, killed (its whole process
/// group) on drop.
pub struct OpenCodeHost {
    child: Child,
    port: u16,
    password: String,
    home: tempfile::TempDir,
    project: PathBuf,
}

impl Drop for OpenCodeHost {
    fn drop(&mut self) {
        // The server was started as the leader of its own process group.
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{}", self.child.id())])
            .stderr(Stdio::null())
            .status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl OpenCodeHost {
    /// Starts `bin` serving a fresh project directory, with a provider `local`
    /// (`@ai-sdk/openai-compatible` at `model_base_url`, model `scripted`) as `model` and
    /// `small_model`, `permission` as the config's permission rules (`{"bash": "ask"}`,
    /// or `Value::Null` for OpenCode's defaults), the question tool enabled and the
    /// offline switches set. Returns once `/global/health` answers.
    pub async fn start(bin: &Path, model_base_url: &str, permission: Value) -> OpenCodeHost {
        let home = tempfile::Builder::new()
            .prefix("atl-opencode-")
            .tempdir()
            .expect("temp dir for opencode's home");
        let h = home.path();
        let config_dir = h.join(".config/opencode");
        let project = h.join("project");
        for d in [&config_dir, &project] {
            std::fs::create_dir_all(d).expect("create opencode dirs");
        }
        let mut config = json!({
            "$schema": "https://opencode.ai/config.json",
            "provider": {"local": {
                "npm": "@ai-sdk/openai-compatible",
                "name": "Local",
                "options": {"baseURL": model_base_url},
                "models": {"scripted": {"name": "Scripted"}},
            }},
            "model": "local/scripted",
            "small_model": "local/scripted",
        });
        if !permission.is_null() {
            config["permission"] = permission;
        }
        std::fs::write(config_dir.join("opencode.json"), config.to_string())
            .expect("write opencode.json");
        preseed_plugin(&config_dir);

        let port = free_port();
        let password = format!("pw-{}-{}", std::process::id(), port);
        let log = std::fs::File::create(h.join("serve.log")).expect("create opencode log");
        let mut cmd = Command::new(bin);
        cmd.args([
            "serve",
            "--port",
            &port.to_string(),
            "--hostname",
            "127.0.0.1",
        ])
        .current_dir(&project)
        .env("HOME", h)
        .env("XDG_CONFIG_HOME", h.join(".config"))
        .env("XDG_DATA_HOME", h.join(".local/share"))
        .env("XDG_CACHE_HOME", h.join(".cache"))
        .env("XDG_STATE_HOME", h.join(".local/state"))
        .env("OPENCODE_SERVER_PASSWORD", &password)
        .env("OPENCODE_ENABLE_QUESTION_TOOL", "1")
        .env("OPENCODE_DISABLE_MODELS_FETCH", "1")
        .env("OPENCODE_DISABLE_AUTOUPDATE", "1")
        .env("OPENCODE_DISABLE_LSP_DOWNLOAD", "1")
        .env("OPENCODE_DISABLE_SHARE", "1")
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("clone log handle"))
        .stderr(log);
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("start {} serve: {e}", bin.display()));
        let mut host = OpenCodeHost {
            child,
            port,
            password,
            home,
            project,
        };
        host.wait_healthy().await;
        host
    }

    async fn wait_healthy(&mut self) {
        let url = format!("http://127.0.0.1:{}/global/health", self.port);
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .build()
            .expect("http client");
        let start = std::time::Instant::now();
        let home = self.home.path().to_owned();
        let child = &mut self.child;
        let password = &self.password;
        poll_until_async(
            START_DEADLINE,
            "opencode serve to answer /global/health",
            || {
                if let Ok(Some(status)) = child.try_wait() {
                    panic!(
                        "opencode serve exited ({status}) during start:\n{}",
                        read_log(&home)
                    );
                }
                let req = http.get(&url).basic_auth("opencode", Some(password));
                async move {
                    let r = req.send().await.ok()?;
                    r.status().is_success().then_some(())
                }
            },
        )
        .await;
        tracing::info!(port = self.port, elapsed = ?start.elapsed(), "opencode serve is up");
    }

    /// The address it listens on.
    pub fn addr(&self) -> std::net::SocketAddr {
        std::net::SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// The server password (user `opencode`).
    pub fn password(&self) -> &str {
        &self.password
    }

    /// The project directory it was started in (its default directory).
    pub fn project_dir(&self) -> &Path {
        &self.project
    }

    /// Its HOME (config, data and logs below).
    pub fn home(&self) -> &Path {
        self.home.path()
    }

    /// The process id (also its process group id).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// What it printed so far, and OpenCode's own log files.
    pub fn log(&self) -> String {
        read_log(self.home.path())
    }
}

/// `serve.log` in `h`, then OpenCode's own log files.
fn read_log(h: &Path) -> String {
    let mut out = std::fs::read_to_string(h.join("serve.log")).unwrap_or_default();
    if let Ok(rd) = std::fs::read_dir(h.join(".local/share/opencode/log")) {
        for e in rd.flatten() {
            out.push_str(&std::fs::read_to_string(e.path()).unwrap_or_default());
        }
    }
    out
}

/// Makes OpenCode's config directory look like `npm install @opencode-ai/plugin` ran in
/// it: its package.json and lock copied, node_modules linked to the cached install.
fn preseed_plugin(config_dir: &Path) {
    let Some(prefix) = std::env::var_os("ATELIER_TEST_OPENCODE_PLUGIN").map(PathBuf::from) else {
        tracing::warn!(
            "ATELIER_TEST_OPENCODE_PLUGIN is unset: opencode will npm-install its plugin package on start"
        );
        return;
    };
    for f in ["package.json", "package-lock.json"] {
        let from = prefix.join(f);
        if from.is_file() {
            std::fs::copy(&from, config_dir.join(f))
                .unwrap_or_else(|e| panic!("copy {}: {e}", from.display()));
        }
    }
    std::os::unix::fs::symlink(prefix.join("node_modules"), config_dir.join("node_modules"))
        .expect("link the cached plugin install into opencode's config dir");
}
