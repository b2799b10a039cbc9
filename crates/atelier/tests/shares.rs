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
    let root_owned = base.path().join("root-owned");
    std::fs::create_dir(&root_owned).unwrap();
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
        (s(&root_owned), "belongs to root"),
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
