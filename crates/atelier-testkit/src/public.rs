//! A "public" network the tests own (a network namespace with an HTTP server on two
//! addresses), and a git server inside it. Nothing leaves the machine.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::manager::{NetSlot, http_ok};
use crate::poll::wait_until;

/// A "public" network the tests own: a network namespace joined to the host by a
/// veth pair, with an HTTP server answering on two addresses (198.18.{slot}.2 and
/// .3, benchmark space that the default blocked ranges do not cover). Nothing
/// leaves the machine.
pub struct PublicNet {
    /// The namespace's name, `atlpub{slot}`.
    pub ns: String,
    /// The host end of the veth pair, `198.18.{slot}.1`.
    pub host_ip: String,
    /// The first server address, `198.18.{slot}.2`.
    pub ip_a: String,
    /// The second server address, `198.18.{slot}.3`.
    pub ip_b: String,
    server: Child,
    _dir: tempfile::TempDir,
    _slot: NetSlot,
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl PublicNet {
    /// Creates the namespace (on a slot of its own) and starts the server on port
    /// 8080, serving `hello.txt` = "public-ok".
    pub fn start() -> PublicNet {
        let slot_lock = NetSlot::claim();
        let slot = slot_lock.slot;
        let ns = format!("atlpub{slot}");
        let host_if = format!("atlpv{slot}");
        let _ = Command::new("ip")
            .args(["netns", "del", &ns])
            .stderr(Stdio::null())
            .status();
        let _ = Command::new("ip")
            .args(["link", "del", &host_if])
            .stderr(Stdio::null())
            .status();
        let (host_ip, ip_a, ip_b) = (
            format!("198.18.{slot}.1"),
            format!("198.18.{slot}.2"),
            format!("198.18.{slot}.3"),
        );
        ip(&["netns", "add", &ns]);
        ip(&[
            "link", "add", &host_if, "type", "veth", "peer", "name", "pub0", "netns", &ns,
        ]);
        ip(&["addr", "add", &format!("{host_ip}/29"), "dev", &host_if]);
        ip(&["link", "set", &host_if, "up"]);
        for (a, d) in [(&ip_a, "pub0"), (&ip_b, "pub0")] {
            ip(&["-n", &ns, "addr", "add", &format!("{a}/29"), "dev", d]);
        }
        ip(&["-n", &ns, "link", "set", "pub0", "up"]);
        ip(&["-n", &ns, "link", "set", "lo", "up"]);
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("hello.txt"), "public-ok\n").unwrap();
        let server = Command::new("ip")
            .args([
                "netns",
                "exec",
                &ns,
                "python3",
                "-m",
                "http.server",
                "8080",
                "--bind",
                "0.0.0.0",
                "--directory",
            ])
            .arg(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let hello = format!("http://{ip_a}:8080/hello.txt");
        wait_until(
            Duration::from_secs(30),
            format!("the public HTTP server in {ns} to answer {hello}"),
            || http_ok(&hello).unwrap_or(false),
        );
        PublicNet {
            ns,
            host_ip,
            ip_a,
            ip_b,
            server,
            _dir: dir,
            _slot: slot_lock,
        }
    }
}

impl Drop for PublicNet {
    fn drop(&mut self) {
        let _ = self.server.kill();
        let _ = self.server.wait();
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).status();
    }
}

/// Runs `git` in `dir` with a fixed identity and `main` as the default branch; panics
/// with git's stderr when it fails; returns trimmed stdout.
pub fn git(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("git")
        .args([
            "-c",
            "user.name=t",
            "-c",
            "user.email=t@example.test",
            "-c",
            "init.defaultBranch=main",
        ])
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// A bare repo `demo.git` served by `git daemon` inside the public namespace (fetch
/// and push), and a work tree on the host that pushes to it.
pub struct GitServer {
    _dir: tempfile::TempDir,
    /// The host work tree that pushes to the bare repo.
    pub work: PathBuf,
    daemon: Child,
    /// `git://{ip_a}/demo.git`.
    pub url: String,
}

impl GitServer {
    /// Makes the repo (one commit "v1": `hello.txt` = "v1" and an executable
    /// `pkg/demo-tool`) and serves it from `net`'s first address.
    pub fn start(net: &PublicNet) -> GitServer {
        let dir = tempfile::tempdir().unwrap();
        let bare = dir.path().join("demo.git");
        let work = dir.path().join("work");
        std::fs::create_dir_all(&work).unwrap();
        git(
            dir.path(),
            &["init", "-q", "--bare", bare.to_str().unwrap()],
        );
        git(&work, &["init", "-q"]);
        std::fs::create_dir_all(work.join("pkg")).unwrap();
        std::fs::write(
            work.join("pkg/demo-tool"),
            "#!/bin/sh\necho demo tool works\n",
        )
        .unwrap();
        std::fs::write(work.join("hello.txt"), "v1\n").unwrap();
        git(&work, &["add", "."]);
        git(&work, &["commit", "-q", "-m", "v1"]);
        git(
            &work,
            &["push", "-q", bare.to_str().unwrap(), "HEAD:refs/heads/main"],
        );
        let daemon = Command::new("ip")
            .args([
                "netns",
                "exec",
                &net.ns,
                "git",
                "daemon",
                "--export-all",
                "--reuseaddr",
                // Tasks push their branches back (unauthenticated git://).
                "--enable=receive-pack",
            ])
            .arg(format!("--base-path={}", dir.path().display()))
            .arg(format!("--listen={}", net.ip_a))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            // `git daemon` runs `git-daemon` as a child: a group of its own lets
            // Drop kill both (killing the wrapper alone orphaned the server).
            .process_group(0)
            .spawn()
            .unwrap();
        let url = format!("git://{}/demo.git", net.ip_a);
        wait_until(
            Duration::from_secs(30),
            format!("git daemon to serve {url}"),
            || {
                Command::new("git")
                    .args(["ls-remote", &url])
                    .stderr(Stdio::null())
                    .output()
                    .is_ok_and(|o| o.status.success())
            },
        );
        GitServer {
            _dir: dir,
            work,
            daemon,
            url,
        }
    }

    /// The bare repository on the host (read it with `git -C`).
    pub fn bare(&self) -> PathBuf {
        self.work.parent().unwrap().join("demo.git")
    }

    /// Commits `content` as `hello.txt`, pushes it, and returns the new commit id.
    pub fn push(&self, content: &str) -> String {
        std::fs::write(self.work.join("hello.txt"), content).unwrap();
        git(&self.work, &["commit", "-q", "-am", content.trim()]);
        let bare = self.work.parent().unwrap().join("demo.git");
        git(
            &self.work,
            &["push", "-q", bare.to_str().unwrap(), "HEAD:refs/heads/main"],
        );
        git(&self.work, &["rev-parse", "HEAD"])
    }
}

impl Drop for GitServer {
    fn drop(&mut self) {
        let group = format!("-{}", self.daemon.id());
        let _ = Command::new("kill").args(["-KILL", "--", &group]).status();
        let _ = self.daemon.kill();
        let _ = self.daemon.wait();
    }
}
