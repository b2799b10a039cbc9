//! Interactive sandboxes with real VMs: `atelier shell` driven under tmux (a real
//! pseudo-terminal), host folders over virtio-9p (ownership, read-only, symlinks),
//! secrets from .env files, and the WebSocket terminal.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::Server;
use futures::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

const NOBODY: &str = "65534";

fn tmux(args: &[&str]) -> String {
    let out = Command::new("tmux")
        .args(args)
        .output()
        .expect("tmux (apt-get install tmux)");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn screen(session: &str) -> String {
    tmux(&["capture-pane", "-p", "-t", session])
}

fn wait_screen(session: &str, needle: &str) -> String {
    let start = Instant::now();
    loop {
        let s = screen(session);
        if s.contains(needle) {
            return s;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "screen never showed {needle:?}:\n{s}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The CLI as an unprivileged host user (uid 65534), pointed at `srv`.
fn as_nobody(srv: &Server, dir: &Path, args: &[&str]) -> std::process::Output {
    Command::new("setpriv")
        .args(["--reuid", NOBODY, "--regid", NOBODY, "--clear-groups", "--"])
        .arg(env!("CARGO_BIN_EXE_atelier"))
        .args(args)
        .current_dir(dir)
        .env("HOME", dir)
        .env("ATELIER_URL", &srv.url)
        .env("ATELIER_TOKEN", &srv.token)
        .env("ATELIER_DATA_DIR", "/nonexistent")
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap()
}

fn chown_nobody(p: &Path) {
    assert!(
        Command::new("chown")
            .args([&format!("{NOBODY}:{NOBODY}"), p.to_str().unwrap()])
            .status()
            .unwrap()
            .success()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn shell_terminal_shared_folders_and_secrets() {
    let srv = Server::start();
    // The user's project folder, owned by an unprivileged user, and a read-only one.
    let base = tempfile::Builder::new()
        .prefix("atl-share-")
        .tempdir_in("/var/tmp")
        .unwrap();
    let proj = base.path().join("myapp");
    let ro = base.path().join("ro");
    std::fs::create_dir_all(&proj).unwrap();
    std::fs::create_dir_all(&ro).unwrap();
    for p in [base.path(), &proj, &ro] {
        chown_nobody(p);
    }
    std::fs::write(proj.join("from-host.txt"), "host wrote this\n").unwrap();
    let outside = base.path().join("outside-secret");
    std::fs::write(&outside, "HOST-ONLY-CONTENT\n").unwrap();

    // `atelier shell` for the folder, as that user, with secrets from a .env file.
    std::fs::write(
        proj.join(".env"),
        "API_KEY=\"sk-test-7f3a9c\"\nexport REGION=eu\n",
    )
    .unwrap();
    let ro_mount = format!("{}:/data:ro", ro.display());
    let out = as_nobody(
        &srv,
        &proj,
        &["shell", "--memory", "512", "--env-file", ".env", "--mount", &ro_mount, "--", "sh", "-c",
          "echo \"key=$API_KEY region=$REGION\"; pwd; cat from-host.txt; echo guest > from-guest.txt; \
           touch /data/nope 2>/dev/null || echo ro-refused; \
           ln -s OUTSIDE link; cat link 2>/dev/null || echo link-stays-inside; exit 5"
            .replace("OUTSIDE", outside.to_str().unwrap())
            .as_str()],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(5),
        "exit code propagates: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("key=sk-test-7f3a9c region=eu"), "{stdout}");
    assert!(stdout.contains("/workspace"), "{stdout}");
    assert!(stdout.contains("host wrote this"), "{stdout}");
    assert!(stdout.contains("ro-refused"), "{stdout}");
    assert!(
        stdout.contains("link-stays-inside") && !stdout.contains("HOST-ONLY"),
        "{stdout}"
    );
    let meta = std::fs::metadata(proj.join("from-guest.txt")).unwrap();
    assert_eq!(
        (meta.uid(), meta.gid()),
        (65534, 65534),
        "guest writes belong to the invoking user"
    );
    assert_eq!(
        std::fs::read_to_string(proj.join("from-guest.txt")).unwrap(),
        "guest\n"
    );
    assert!(!ro.join("nope").exists());

    // The secret reached the guest, and is in no log or database row.
    let name = String::from_utf8_lossy(&out.stderr)
        .split_whitespace()
        .find(|w| w.starts_with("shell-myapp-"))
        .map(str::to_owned)
        .expect("shell names its sandbox");
    let db = std::fs::read(srv.data_dir.path().join("atelier.db")).unwrap();
    let wal = std::fs::read(srv.data_dir.path().join("atelier.db-wal")).unwrap_or_default();
    for (what, bytes) in [("log", srv.log().into_bytes()), ("db", db), ("wal", wal)] {
        assert!(
            !String::from_utf8_lossy(&bytes).contains("sk-test-7f3a9c"),
            "secret in the {what}"
        );
    }
    for d in srv.sandbox_dirs() {
        for f in ["console.log", "vmm.log"] {
            let text = std::fs::read_to_string(d.join(f)).unwrap_or_default();
            assert!(!text.contains("sk-test-7f3a9c"), "secret in {f}");
        }
    }

    // A real terminal under tmux: size, resize, Ctrl-C, exit code; detaching keeps the sandbox.
    let session = format!("atl{}", std::process::id());
    let cmd = format!(
        "ATELIER_URL={} ATELIER_TOKEN={} {} shell {name}; echo EXIT=$?; sleep 60",
        srv.url,
        srv.token,
        env!("CARGO_BIN_EXE_atelier")
    );
    tmux(&[
        "new-session",
        "-d",
        "-s",
        &session,
        "-x",
        "100",
        "-y",
        "30",
        &cmd,
    ]);
    wait_screen(&session, "/workspace#");
    tmux(&["send-keys", "-t", &session, "stty size; tty", "Enter"]);
    let s = wait_screen(&session, "/dev/pts/");
    assert!(s.contains("30 100"), "{s}");
    tmux(&["resize-window", "-t", &session, "-x", "120", "-y", "40"]);
    std::thread::sleep(Duration::from_millis(500));
    tmux(&["send-keys", "-t", &session, "clear; stty size", "Enter"]);
    wait_screen(&session, "40 120");
    tmux(&[
        "send-keys",
        "-t",
        &session,
        "sleep 100; echo not-interrupted",
        "Enter",
    ]);
    std::thread::sleep(Duration::from_millis(1500));
    tmux(&["send-keys", "-t", &session, "C-c"]);
    tmux(&[
        "send-keys",
        "-t",
        &session,
        "echo after-$((20+22))",
        "Enter",
    ]);
    let s = wait_screen(&session, "after-42");
    assert!(
        !s.lines().any(|l| l.trim() == "not-interrupted"),
        "Ctrl-C did not interrupt:\n{s}"
    );
    // A second terminal on the same sandbox sees the same files.
    let second = srv.run(&["shell", &name, "--", "cat", "/workspace/from-guest.txt"]);
    assert_eq!(String::from_utf8_lossy(&second.stdout).trim(), "guest");
    tmux(&["send-keys", "-t", &session, "exit 3", "Enter"]);
    wait_screen(&session, "EXIT=3");
    tmux(&["kill-session", "-t", &session]);
    let shown: serde_json::Value =
        serde_json::from_str(&srv.ok(&["--json", "sandbox", "show", &name])).unwrap();
    assert_eq!(
        shown["state"], "running",
        "detaching keeps the sandbox running"
    );

    // The WebSocket terminal: with the token it runs a command; without, 401.
    let url = format!(
        "{}/api/v1/sandboxes/{name}/pty",
        srv.url.replacen("http", "ws", 1)
    );
    let anon = tokio_tungstenite::connect_async(url.as_str()).await;
    match anon {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => assert_eq!(resp.status(), 401),
        other => panic!("unauthenticated websocket was not refused: {other:?}"),
    }
    let mut req = url.as_str().into_client_request().unwrap();
    req.headers_mut().insert(
        "authorization",
        format!("Bearer {}", srv.token).parse().unwrap(),
    );
    let (mut ws, _) = tokio_tungstenite::connect_async(req).await.unwrap();
    let start = serde_json::json!({"type": "start", "command": ["sh", "-c", "echo ws-$((6*7))"], "rows": 24, "cols": 80});
    ws.send(Message::Text(start.to_string().into()))
        .await
        .unwrap();
    let mut output = Vec::new();
    let mut exit = None;
    while let Some(Ok(msg)) = tokio::time::timeout(Duration::from_secs(60), ws.next())
        .await
        .unwrap()
    {
        match msg {
            Message::Binary(b) => output.extend_from_slice(&b),
            Message::Text(t) => {
                let v: serde_json::Value = serde_json::from_str(&t).unwrap();
                if v["type"] == "exit" {
                    exit = Some(v["code"].clone());
                }
            }
            Message::Close(_) => break,
            _ => {}
        }
    }
    assert!(
        String::from_utf8_lossy(&output).contains("ws-42"),
        "{}",
        String::from_utf8_lossy(&output)
    );
    assert_eq!(exit, Some(serde_json::json!(0)));

    // --rm removes everything the shell made.
    srv.ok(&["sandbox", "rm", &name]);
    let out = as_nobody(
        &srv,
        &proj,
        &["shell", "--rm", "--memory", "512", "--", "true"],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    srv.assert_clean();
}
