//! Workspaces, prebuilds and spawning from them, with real VMs, a real git server
//! (git daemon in a network namespace the test owns; guests clone over their own
//! network) and real init commands.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{GitServer, PublicNet, Server, git};

fn json(s: &str) -> serde_json::Value {
    serde_json::from_str(s).unwrap_or_else(|e| panic!("not json ({e}): {s}"))
}

fn workspace_yaml(url: &str) -> String {
    format!(
        r#"name: demo
image: minimal
resources: {{ vcpus: 1, memory_mib: 1024, disk_gib: 2 }}
repos:
  - url: {url}
    branch: main
    path: /workspace/demo
init:
  - echo built > .init-done
  - install -m 0755 pkg/demo-tool /usr/local/bin/demo-tool
  - setsid sh -c 'while :; do sleep 1; done' </dev/null >/dev/null 2>&1 & echo $! > /var/tmp/bg.pid
dev:
  - {{ name: web, command: "python3 -m http.server 8000", port: 8000 }}
secrets:
  env: {{ API_KEY: {{ secret: demo-api-key }} }}
  files: [ {{ path: /root/.npmrc, secret: demo-npmrc, mode: "0600" }} ]
opencode: {{ model: "local/scripted" }}
"#
    )
}

fn sh(srv: &Server, sb: &str, script: &str) -> String {
    let out = srv.run(&["sandbox", "exec", sb, "--", "sh", "-c", script]);
    assert!(
        out.status.success(),
        "{script}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// Whether `needle` occurs in the file (read in chunks; files can be GiB-sized).
fn file_contains(path: &Path, needle: &[u8]) -> bool {
    use std::io::Read;
    let Ok(mut f) = std::fs::File::open(path) else {
        return false;
    };
    let mut buf = vec![0u8; 8 << 20];
    let mut carry: Vec<u8> = Vec::new();
    loop {
        let n = f.read(&mut buf).unwrap();
        if n == 0 {
            return false;
        }
        carry.extend_from_slice(&buf[..n]);
        if carry.windows(needle.len()).any(|w| w == needle) {
            return true;
        }
        let keep = carry.len().saturating_sub(needle.len());
        carry.drain(..keep);
    }
}

fn prebuilds(srv: &Server) -> Vec<serde_json::Value> {
    json(&srv.ok(&["--json", "prebuild", "list", "--workspace", "demo"]))
        .as_array()
        .unwrap()
        .clone()
}

#[test]
fn prebuild_spawn_identity_secrets_and_stale_rebuild() {
    let net = PublicNet::start();
    let repo = GitServer::start(&net);
    let srv = Server::start_with(&[("ATELIER_PREBUILD_CHECK_SECS", "3")]);
    const API_KEY: &str = "sk-test-9f8e7d6c5b4a";
    const NPMRC: &str = "//registry.example.test/:_authToken=npm-secret-1234";
    srv.set_secret("demo-api-key", API_KEY);
    srv.set_secret("demo-npmrc", NPMRC);
    let ws = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(ws.path(), workspace_yaml(&repo.url)).unwrap();
    srv.ok(&["workspace", "apply", "-f", ws.path().to_str().unwrap()]);

    // No prebuild yet: creating a sandbox builds one first (no dead end), with
    // its log streamed, then spawns from it.
    let v1 = git(&repo.work, &["rev-parse", "HEAD"]);
    let out = srv.run(&[
        "sandbox",
        "create",
        "--name",
        "early",
        "--workspace",
        "demo",
    ]);
    let log = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{log}");
    assert!(
        log.contains("no ready prebuild: building pb-")
            && log.contains("==> cloning")
            && log.contains("==> init 3/3"),
        "{log}"
    );
    srv.ok(&["sandbox", "rm", "early"]);
    let list = prebuilds(&srv);
    assert_eq!(list[0]["status"], "ready", "{list:?}");
    assert_eq!(list[0]["commits"]["/workspace/demo"], v1);
    let pb = list[0]["id"].as_str().unwrap().to_owned();
    // Secrets never enter a prebuild (memory, disk or device state).
    let dir = srv.data_dir.path().join("pool/prebuilds").join(&pb);
    for f in ["mem", "disk.img", "state", "build.log"] {
        assert!(dir.join(f).exists(), "{f}");
        for s in [API_KEY, NPMRC] {
            assert!(!file_contains(&dir.join(f), s.as_bytes()), "secret in {f}");
        }
    }

    // Spawn two sandboxes from it.
    let s1 = json(&srv.ok(&[
        "--json",
        "sandbox",
        "create",
        "--name",
        "s1",
        "--workspace",
        "demo",
    ]));
    assert_eq!(s1["booted_from"], "snapshot");
    let s2 = json(&srv.ok(&[
        "--json",
        "sandbox",
        "create",
        "--name",
        "s2",
        "--workspace",
        "demo",
    ]));
    assert_eq!(s2["booted_from"], "snapshot");
    for sb in ["s1", "s2"] {
        // The repo, init results and the process started before the snapshot.
        assert_eq!(sh(&srv, sb, "cat /workspace/demo/hello.txt"), "v1");
        assert_eq!(sh(&srv, sb, "cat /workspace/demo/.init-done"), "built");
        assert_eq!(sh(&srv, sb, "demo-tool"), "demo tool works");
        sh(&srv, sb, "kill -0 $(cat /var/tmp/bg.pid)");
        // Secrets injected at spawn.
        assert_eq!(
            sh(&srv, sb, ". /etc/atelier/secrets.env && echo $API_KEY"),
            API_KEY
        );
        assert_eq!(sh(&srv, sb, "cat /root/.npmrc"), NPMRC);
        assert_eq!(sh(&srv, sb, "stat -c %a /root/.npmrc"), "600");
        assert!(
            sh(&srv, sb, "cat /root/.config/opencode/opencode.json").contains("local/scripted")
        );
    }
    // Own identities: hostname, machine-id, RNG output, clock.
    assert_eq!(sh(&srv, "s1", "hostname"), "s1");
    assert_eq!(sh(&srv, "s2", "hostname"), "s2");
    assert_ne!(
        sh(&srv, "s1", "cat /etc/machine-id"),
        sh(&srv, "s2", "cat /etc/machine-id")
    );
    let rnd = "head -c 16 /dev/urandom | od -An -tx1";
    assert_ne!(sh(&srv, "s1", rnd), sh(&srv, "s2", rnd));
    let guest_now: i64 = sh(&srv, "s1", "date +%s").parse().unwrap();
    let host_now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    assert!(
        (guest_now - host_now).abs() < 10,
        "guest clock {guest_now} vs {host_now}"
    );
    assert_ne!(s1["ip"], s2["ip"]);
    // The workspace's dev command runs (and gets the secret env).
    let start = Instant::now();
    loop {
        let d = json(&srv.ok(&["--json", "dev", "list", "s1"]));
        if d[0]["name"] == "web" && d[0]["listening"] == true {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(120), "{d}");
        std::thread::sleep(Duration::from_millis(500));
    }
    // Secret values are not in the manager's log or the API.
    assert!(!srv.log().contains(API_KEY) && !srv.log().contains(NPMRC));
    assert!(
        !srv.ok(&["--json", "workspace", "show", "demo"])
            .contains(API_KEY)
    );

    // A new commit: the checker marks the prebuild stale and rebuilds it; a new
    // sandbox has the commit.
    let v2 = repo.push("v2\n");
    let start = Instant::now();
    loop {
        let list = prebuilds(&srv);
        if list
            .iter()
            .any(|p| p["status"] == "ready" && p["commits"]["/workspace/demo"] == v2)
        {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(600),
            "no rebuild: {list:?}"
        );
        std::thread::sleep(Duration::from_secs(1));
    }
    // Files on the host: after a prebuild with secrets, spawns and a pause, nothing
    // under the data dir is readable by another uid.
    srv.ok(&["sandbox", "pause", "s2"]);
    srv.assert_data_dir_private();
    // A commit newer than the prebuild is pulled at spawn.
    repo.push("v3\n");
    srv.ok(&["sandbox", "create", "--name", "s3", "--workspace", "demo"]);
    assert_eq!(sh(&srv, "s3", "cat /workspace/demo/hello.txt"), "v3");

    for sb in ["s1", "s2", "s3"] {
        srv.ok(&["sandbox", "rm", sb]);
    }
    srv.assert_clean();
    // Superseded prebuilds were collected; removing the workspace removes the
    // rest (a build the v3 push started may have to finish first).
    let start = Instant::now();
    loop {
        let out = srv.run(&["workspace", "rm", "demo"]);
        if out.status.success() {
            break;
        }
        assert_eq!(
            out.status.code(),
            Some(5),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            start.elapsed() < Duration::from_secs(600),
            "build never finished"
        );
        std::thread::sleep(Duration::from_secs(2));
    }
    let left: Vec<_> = std::fs::read_dir(srv.data_dir.path().join("pool/prebuilds"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(left.is_empty(), "{left:?}");
    assert!(prebuilds(&srv).is_empty());
}

#[test]
fn kill9_during_prebuild_and_during_spawn_leaves_nothing() {
    let net = PublicNet::start();
    let repo = GitServer::start(&net);
    let mut srv = Server::start_with(&[("ATELIER_FAULT_PAUSE", "prebuild-after-launch")]);
    srv.set_secret("demo-api-key", "x");
    srv.set_secret("demo-npmrc", "y");
    let ws = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(ws.path(), workspace_yaml(&repo.url)).unwrap();
    srv.ok(&["workspace", "apply", "-f", ws.path().to_str().unwrap()]);
    srv.ok(&["prebuild", "create", "demo", "--no-follow"]);
    srv.wait_log("prebuild-after-launch", Duration::from_secs(120));
    let marker = format!("{}/pool/prebuilds/.build-", srv.data_dir.path().display());
    assert!(!common::pids_matching(&marker).is_empty(), "no builder VM");
    srv.kill9();
    srv.restart(&[]);
    assert!(
        common::pids_matching(&marker).is_empty(),
        "builder VM survived"
    );
    let list = prebuilds(&srv);
    assert_eq!(list[0]["status"], "failed", "{list:?}");
    let leftovers: Vec<_> = std::fs::read_dir(srv.data_dir.path().join("pool/prebuilds"))
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(".build-"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    assert!(srv.net.ports().is_empty(), "{:?}", srv.net.ports());
    srv.assert_clean();

    // Now a good prebuild, and a spawn from it killed while its VM restores.
    srv.ok(&["prebuild", "create", "demo"]);
    srv.restart(&[("ATELIER_FAULT_PAUSE", "restore-after-launch")]);
    srv.ok(&[
        "sandbox",
        "create",
        "--name",
        "s1",
        "--workspace",
        "demo",
        "--no-wait",
    ]);
    srv.wait_log("restore-after-launch", Duration::from_secs(120));
    assert_eq!(srv.vmm_pids().len(), 1);
    srv.kill9();
    srv.restart(&[]);
    let s1 = json(&srv.ok(&["--json", "sandbox", "show", "s1"]));
    assert_eq!(s1["state"], "failed");
    assert!(srv.vmm_pids().is_empty());
    srv.ok(&["sandbox", "rm", "s1"]);
    srv.assert_clean();
    // The prebuild is intact and spawns.
    srv.ok(&["sandbox", "create", "--name", "s2", "--workspace", "demo"]);
    srv.ok(&["sandbox", "rm", "s2"]);
    srv.assert_clean();
}

#[test]
fn credentialed_repo_is_cloned_without_the_token_entering_the_snapshot() {
    let net = PublicNet::start();
    let repo = GitServer::start(&net);
    const TOKEN: &str = "ghp-test-token-5a4b3c2d1e";
    let root = repo.work.parent().unwrap().to_owned();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/assets/githttp.py");
    let mut http = Command::new("ip")
        .args(["netns", "exec", &net.ns, "python3", script])
        .arg(&root)
        .args(["8081", "bot", TOKEN])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let url = format!("http://{}:8081/demo.git", net.ip_a);
    let start = Instant::now();
    while common::http_ok(&format!("http://{}:8081/", net.ip_a)).is_err() {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "git http server did not start"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // Without the token the repo is closed.
    let anon = Command::new("git")
        .args(["ls-remote", &url])
        .env("GIT_TERMINAL_PROMPT", "0")
        .output()
        .unwrap();
    assert!(!anon.status.success());

    let srv = Server::start();
    srv.set_secret("repo-token", &format!("bot:{TOKEN}"));
    let yaml = format!(
        "name: priv\nimage: minimal\nresources: {{ vcpus: 1, memory_mib: 1024, disk_gib: 2 }}\nrepos:\n  - {{ url: \"{url}\", branch: main, path: /workspace/priv, credentials: repo-token }}\n"
    );
    let ws = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(ws.path(), yaml).unwrap();
    srv.ok(&["workspace", "apply", "-f", ws.path().to_str().unwrap()]);
    let out = srv.run(&["prebuild", "create", "priv"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let pb = json(&srv.ok(&["--json", "prebuild", "list", "--workspace", "priv"]))[0]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let dir = srv.data_dir.path().join("pool/prebuilds").join(&pb);
    for f in ["mem", "disk.img", "state", "build.log"] {
        assert!(
            !file_contains(&dir.join(f), TOKEN.as_bytes()),
            "token in {f}"
        );
    }
    srv.ok(&["sandbox", "create", "--name", "p1", "--workspace", "priv"]);
    assert_eq!(sh(&srv, "p1", "cat /workspace/priv/hello.txt"), "v1");
    assert_eq!(
        sh(&srv, "p1", "git -C /workspace/priv remote get-url origin"),
        url
    );
    // The sandbox can pull with the credentials it was given at spawn.
    repo.push("v2\n");
    sh(&srv, "p1", "git -C /workspace/priv pull --ff-only --quiet");
    assert_eq!(sh(&srv, "p1", "cat /workspace/priv/hello.txt"), "v2");
    assert!(!srv.log().contains(TOKEN));
    srv.ok(&["sandbox", "rm", "p1"]);
    srv.assert_clean();
    let _ = http.kill();
    let _ = http.wait();
}
