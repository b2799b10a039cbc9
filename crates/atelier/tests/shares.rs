//! Host folders shared into guests with real VMs: a guest (root in its VM) cannot
//! turn ownership, mode or device requests into host privileges, only folders under
//! the share roots can be shared, the VMM of such a sandbox never runs as root, and
//! nothing under the data dir is readable by another uid (after pause, resume and
//! fork). One sandbox serves every guest-side assertion.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use common::Server;
use reqwest::Method;
use serde_json::{Value, json};

const NOBODY: u32 = 65534;

fn chown(p: &Path, uid: u32) {
    let ok = Command::new("chown")
        .arg(format!("{uid}:{uid}"))
        .arg(p)
        .status()
        .unwrap()
        .success();
    assert!(ok, "chown {}", p.display());
}

/// Every entry under `dir` (not following symlinks), `dir` included.
fn walk(dir: &Path) -> Vec<(PathBuf, std::fs::Metadata)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(p) = stack.pop() {
        let meta = std::fs::symlink_metadata(&p).unwrap();
        if meta.is_dir() {
            stack.extend(std::fs::read_dir(&p).unwrap().flatten().map(|e| e.path()));
        }
        out.push((p, meta));
    }
    out
}

/// The host folder holds no setuid/setgid file, no device node and nothing owned
/// by root: everything belongs to the folder's owner.
fn assert_harmless(dir: &Path) {
    for (p, m) in walk(dir) {
        let ft = m.file_type();
        assert!(
            !ft.is_block_device() && !ft.is_char_device() && !ft.is_fifo() && !ft.is_socket(),
            "{} is a special file on the host ({:?})",
            p.display(),
            ft
        );
        assert_eq!(
            m.mode() & 0o6000,
            0,
            "{} is setuid/setgid on the host",
            p.display()
        );
        assert_eq!(
            (m.uid(), m.gid()),
            (NOBODY, NOBODY),
            "{} is not owned by the folder's owner",
            p.display()
        );
    }
}

fn exec(srv: &Server, name: &str, script: &str) -> String {
    srv.ok(&["sandbox", "exec", name, "--", "sh", "-c", script])
}

#[tokio::test(flavor = "multi_thread")]
async fn shares_stay_unprivileged_and_confined_and_host_files_stay_private() {
    let srv = Server::start();
    let base = tempfile::Builder::new()
        .prefix("atl-shares-")
        .tempdir_in("/var/tmp")
        .unwrap();
    let proj = base.path().join("proj");
    std::fs::create_dir_all(&proj).unwrap();
    std::fs::write(proj.join("host.txt"), "host wrote this\n").unwrap();
    for p in [base.path(), &proj, &proj.join("host.txt")] {
        chown(p, NOBODY);
    }

    // Refused before anything is made: a typed 400 naming the rule.
    let outside = tempfile::Builder::new()
        .prefix("atl-outside-")
        .tempdir_in("/tmp")
        .unwrap();
    chown(outside.path(), NOBODY);
    let comma = base.path().join("a,b");
    std::fs::create_dir(&comma).unwrap();
    chown(&comma, NOBODY);
    std::os::unix::fs::symlink("/etc", base.path().join("etc-link")).unwrap();
    let s = |p: &Path| p.display().to_string();
    for (source, needle) in [
        ("/".to_owned(), "outside the share roots"),
        (s(outside.path()), "outside the share roots"),
        (
            s(&base.path().join("etc-link")),
            "/etc is outside the share roots",
        ),
        (format!("{}/../../../../etc", s(&proj)), "/etc is outside"),
        (s(&comma), "','"),
        (s(srv.data_dir.path()), "data dir"),
    ] {
        let body = json!({"name": "refused", "memory_mib": 512,
            "mounts": [{"source": source, "target": "/mnt/x"}]});
        let resp = srv
            .api(Method::POST, "/api/v1/sandboxes?wait=true")
            .json(&body)
            .send()
            .await
            .unwrap();
        let status = resp.status().as_u16();
        let err: Value = resp.json().await.unwrap();
        assert_eq!(
            (status, err["code"].as_str()),
            (400, Some("invalid")),
            "{source}: {err}"
        );
        let msg = err["message"].as_str().unwrap();
        assert!(msg.contains(needle), "{source}: {msg}");
        if needle.contains("outside") {
            assert!(
                msg.contains("/var/tmp") && msg.contains("--share-root"),
                "{msg}"
            );
        }
    }
    let out = srv.run(&[
        "sandbox", "create", "--name", "refused", "--mount", "/:/host",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("--share-root"),
        "{stderr}"
    );
    assert!(srv.sandbox_dirs().is_empty() && srv.disks().is_empty());

    // The README's flow: root's CLI shares a user's folder. The VMM runs as the
    // folder's owner.
    let mount = format!("{}:/mnt/share", proj.display());
    srv.ok(&[
        "sandbox", "create", "--name", "sh", "--memory", "512", "--mount", &mount,
    ]);
    let pids = srv.vmm_pids();
    assert_eq!(pids.len(), 1, "{pids:?}");
    let status = std::fs::read_to_string(format!("/proc/{}/status", pids[0])).unwrap();
    let uid_line = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
    assert_eq!(
        uid_line.split_whitespace().skip(1).collect::<Vec<_>>(),
        vec!["65534"; 4],
        "the vmm runs as the folder's owner: {uid_line}"
    );

    // Root in the guest tries to make host privileges through the share.
    let guest = exec(
        &srv,
        "sh",
        "cd /mnt/share; cat host.txt; \
         cp /bin/ls suid; chmod 4755 suid; cp /bin/ls sgid; chmod 2755 sgid; \
         echo x > rootfile; chown 0:0 rootfile; \
         mknod disk b 254 0; mknod null c 1 3; mkfifo fifo; \
         mkdir sub; chown 0:0 sub; chmod 1777 sub; echo y > sub/inner; \
         ln -s /etc/shadow shadow-link; \
         stat -c '%n %a %u %g %F' suid sgid rootfile disk null fifo sub; \
         echo link=$(readlink shadow-link); true",
    );
    assert!(guest.contains("host wrote this"), "{guest}");
    assert_harmless(&proj);
    // The mapped model keeps what the guest asked for as metadata the guest reads
    // back (modes it did not set follow the guest's umask).
    let stat = |name: &str| {
        guest
            .lines()
            .find(|l| l.starts_with(&format!("{name} ")))
            .unwrap_or_else(|| panic!("no stat line for {name}:\n{guest}"))
            .to_owned()
    };
    assert!(stat("suid").starts_with("suid 4755 0 0 regular"), "{guest}");
    assert!(stat("sgid").starts_with("sgid 2755 0 0 regular"), "{guest}");
    assert!(stat("sub").starts_with("sub 1777 0 0 directory"), "{guest}");
    assert!(stat("rootfile").ends_with(" 0 0 regular file"), "{guest}");
    assert!(stat("disk").ends_with(" 0 0 block special file"), "{guest}");
    assert!(
        stat("null").ends_with(" 0 0 character special file"),
        "{guest}"
    );
    assert!(stat("fifo").ends_with(" 0 0 fifo"), "{guest}");
    assert!(guest.contains("link=/etc/shadow"), "{guest}");
    // On the host the guest's symlink is a plain file holding its target.
    let link = std::fs::symlink_metadata(proj.join("shadow-link")).unwrap();
    assert!(link.is_file(), "{link:?}");

    // A VM with a mounted 9p share cannot be migrated (QEMU blocks it): pause and
    // fork say so; stop and start work, and the VMM is still unprivileged.
    for (verb, extra) in [("pause", None), ("fork", Some("sh2"))] {
        let mut args = vec!["sandbox", verb, "sh"];
        if let Some(n) = extra {
            args.extend(["--name", n]);
        }
        let out = srv.run(&args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && stderr.contains("shares host folders"),
            "{verb}: {stderr}"
        );
    }
    srv.ok(&["sandbox", "stop", "sh"]);
    srv.ok(&["sandbox", "start", "sh"]);
    assert!(exec(&srv, "sh", "cat /mnt/share/host.txt").contains("host wrote this"));
    let written = exec(
        &srv,
        "sh",
        "echo again > /mnt/share/after-start; ls -l /mnt/share/after-start",
    );
    let meta = std::fs::metadata(proj.join("after-start")).unwrap();
    assert_eq!(
        (meta.uid(), meta.mode() & 0o7777),
        (NOBODY, 0o600),
        "{written}"
    );
    assert_harmless(&proj);

    // Files on the host: with a secret stored, a sandbox paused (its memory on
    // disk), resumed and forked, nothing under the data dir is readable by another
    // uid.
    let secret = base.path().join("secret.txt");
    std::fs::write(&secret, "s3cret\n").unwrap();
    srv.ok(&["secret", "set", "token", "--file", secret.to_str().unwrap()]);
    srv.ok(&["sandbox", "create", "--name", "plain", "--memory", "512"]);
    srv.ok(&["sandbox", "pause", "plain"]);
    srv.assert_data_dir_private();
    srv.ok(&["sandbox", "resume", "plain"]);
    srv.ok(&["sandbox", "fork", "plain", "--name", "plain2"]);
    assert_eq!(exec(&srv, "plain2", "echo forked").trim(), "forked");
    srv.assert_data_dir_private();
    for n in ["sh", "plain", "plain2"] {
        srv.ok(&["sandbox", "rm", n]);
    }

    // `atelier shell` from a folder under a share root, as root: works, and what
    // the guest writes belongs to the folder's owner.
    let out = srv
        .cli()
        .current_dir(&proj)
        .args([
            "shell",
            "--rm",
            "--memory",
            "512",
            "--",
            "sh",
            "-c",
            "pwd; echo hi > from-shell",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("/workspace"));
    assert_eq!(
        std::fs::metadata(proj.join("from-shell")).unwrap().uid(),
        NOBODY
    );
    assert_harmless(&proj);
    srv.assert_clean();
}

/// The ACL entries (`system.posix_acl_access` / `_default`) on `p`, if any.
fn acl_xattrs(p: &Path) -> Vec<&'static str> {
    ["system.posix_acl_access", "system.posix_acl_default"]
        .into_iter()
        .filter(|n| rustix::fs::lgetxattr(p, *n, &mut [0u8; 1024][..]).is_ok())
        .collect()
}

/// The uid and gid of the share user (`atelier-vmm`) from /etc/passwd.
fn share_user() -> (u32, u32) {
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap();
    let line = passwd
        .lines()
        .find(|l| l.starts_with("atelier-vmm:"))
        .expect("the manager created the atelier-vmm user");
    let f: Vec<&str> = line.split(':').collect();
    (f[2].parse().unwrap(), f[3].parse().unwrap())
}

/// The README's first steps: root runs `atelier shell` in a folder of its own under
/// /root (0700). The VMM runs as the unprivileged `atelier-vmm`, granted the folder
/// by ACL entries (journaled) for the sandbox's life; the guest reads and edits
/// root's files, what it creates belongs to atelier-vmm, no privilege reaches the
/// host, and deleting the sandbox revokes the grant and restores every mode.
#[tokio::test(flavor = "multi_thread")]
async fn shell_as_root_in_a_root_owned_folder_runs_an_unprivileged_vmm() {
    let srv = Server::start_with(&[("ATELIER_SHARE_ROOTS", "/var/tmp,/root")]);
    let proj = tempfile::Builder::new()
        .prefix("atl-rootshell-")
        .tempdir_in("/root")
        .unwrap();
    let dir = proj.path();
    std::fs::write(dir.join("host.txt"), "root wrote this\n").unwrap();
    std::fs::create_dir(dir.join("src")).unwrap();
    std::fs::write(dir.join("src/secret.txt"), "root only\n").unwrap();
    std::fs::set_permissions(
        dir.join("src/secret.txt"),
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    let before: Vec<(PathBuf, u32, u32)> = walk(dir)
        .into_iter()
        .map(|(p, m)| (p, m.uid(), m.mode()))
        .collect();

    let out = srv
        .cli()
        .current_dir(dir)
        .args([
            "shell",
            "--memory",
            "512",
            "--",
            "sh",
            "-c",
            "pwd; cat host.txt src/secret.txt; echo guest-edit >> host.txt; \
             echo hi > from-shell; mkdir made; echo x > made/inner; \
             cp /bin/ls suid; chmod 4755 suid; chown 0:0 from-shell; \
             mknod disk b 254 0; stat -c '%n %a %u' suid from-shell",
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("/workspace"), "{stdout}");
    assert!(
        stdout.contains("root wrote this") && stdout.contains("root only"),
        "{stdout}"
    );
    assert!(stdout.contains("suid 4755 0"), "{stdout}");

    // The VMM runs as atelier-vmm, never root, and the grant is journaled.
    let (vmm_uid, _) = share_user();
    assert_ne!(vmm_uid, 0);
    let pids = srv.vmm_pids();
    assert_eq!(pids.len(), 1, "{pids:?}");
    let status = std::fs::read_to_string(format!("/proc/{}/status", pids[0])).unwrap();
    let uid_line = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
    assert_eq!(
        uid_line.split_whitespace().skip(1).collect::<Vec<_>>(),
        vec![vmm_uid.to_string(); 4],
        "{uid_line}"
    );
    let rows = srv.journal();
    let folder = dir.canonicalize().unwrap();
    assert!(
        rows.iter()
            .any(|r| r.starts_with("share-access ")
                && r.ends_with(&format!(":{}", folder.display()))),
        "{rows:?}"
    );
    assert_eq!(
        std::fs::read_to_string(dir.join("host.txt")).unwrap(),
        "root wrote this\nguest-edit\n"
    );
    // What the guest made belongs to atelier-vmm (0600/0700): no setuid bit, no
    // device node, nothing root-owned.
    for name in ["from-shell", "made", "made/inner", "suid", "disk"] {
        let m = std::fs::symlink_metadata(dir.join(name)).unwrap();
        assert_eq!(m.uid(), vmm_uid, "{name}");
        assert!(m.is_file() || m.is_dir(), "{name}: {:?}", m.file_type());
        assert_eq!(m.mode() & 0o7077, 0, "{name}: {:o}", m.mode());
    }

    // Deleting the sandbox revokes the grant: no ACL entry is left, and every mode
    // root had is as it was.
    let list: Value = serde_json::from_str(&srv.ok(&["sandbox", "list", "--json"])).unwrap();
    let name = list.as_array().unwrap()[0]["name"]
        .as_str()
        .unwrap()
        .to_owned();
    srv.ok(&["sandbox", "rm", &name]);
    for (p, _) in walk(dir) {
        assert_eq!(acl_xattrs(&p), Vec::<&str>::new(), "{}", p.display());
    }
    for (p, uid, mode) in &before {
        let m = std::fs::symlink_metadata(p).unwrap();
        assert_eq!((m.uid(), m.mode()), (*uid, *mode), "{}", p.display());
    }
    srv.assert_clean();
}

/// The grant on a root-owned folder is journaled before it is made: a manager killed
/// mid-create (VMM launched, grant in place) leaves a row that reconcile, at the next
/// start, revokes with the rest of the failed create.
#[test]
fn a_crash_mid_create_revokes_the_grant_on_a_root_owned_folder() {
    let roots = ("ATELIER_SHARE_ROOTS", "/var/tmp,/root");
    let mut srv = Server::start_with(&[roots, ("ATELIER_FAULT_PAUSE", "create-after-launch")]);
    let proj = tempfile::Builder::new()
        .prefix("atl-rootcrash-")
        .tempdir_in("/root")
        .unwrap();
    let dir = proj.path();
    std::fs::create_dir(dir.join("src")).unwrap();
    std::fs::write(dir.join("src/main.rs"), "fn main() {}\n").unwrap();
    let before: Vec<(PathBuf, u32)> = walk(dir).into_iter().map(|(p, m)| (p, m.mode())).collect();
    let mount = format!("{}:/mnt/proj", dir.display());
    let out = srv.run(&[
        "--json",
        "sandbox",
        "create",
        "--name",
        "doomed",
        "--memory",
        "512",
        "--mount",
        &mount,
        "--no-wait",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    srv.wait_log("fault point reached", std::time::Duration::from_secs(120));
    assert_eq!(
        acl_xattrs(dir),
        vec!["system.posix_acl_access", "system.posix_acl_default"],
        "granted before the VMM started"
    );
    assert!(srv.journal().iter().any(|r| r.starts_with("share-access ")));
    srv.kill9();
    srv.restart(&[roots]);
    let s: Value = serde_json::from_str(&srv.ok(&["--json", "sandbox", "show", "doomed"])).unwrap();
    assert_eq!(s["state"], "failed", "{s}");
    for (p, mode) in &before {
        assert_eq!(acl_xattrs(p), Vec::<&str>::new(), "{}", p.display());
        assert_eq!(
            std::fs::metadata(p).unwrap().mode(),
            *mode,
            "{}",
            p.display()
        );
    }
    srv.ok(&["sandbox", "rm", "doomed"]);
    srv.assert_clean();
}
