//! Tokens and sessions from the CLI against a real manager (no VM): tokens are
//! never taken on the command line, `token create|list|revoke` and
//! `session list|revoke` work, a revoked token fails on the next command, and
//! `login`/`logout` keep the token in a 0600 file.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::process::Stdio;

use common::Server;

#[tokio::test(flavor = "multi_thread")]
async fn tokens_stay_off_the_command_line_and_revocation_is_immediate() {
    let srv = Server::start();
    // `--token` no longer exists: a token on the command line shows in /proc.
    let out = srv.run(&["--token", &srv.token, "status"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--token"), "{err}");

    // A token file works (ATELIER_TOKEN unset).
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("tok");
    std::fs::write(&file, format!("{}\n", srv.token)).unwrap();
    let out = srv
        .cli()
        .env_remove("ATELIER_TOKEN")
        .env("HOME", dir.path())
        .args(["--token-file", file.to_str().unwrap(), "status"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");

    // Create, use, revoke: the very next command is refused.
    let created: serde_json::Value =
        serde_json::from_str(&srv.ok(&["--json", "token", "create", "ci"])).unwrap();
    let t2 = created["token"].as_str().unwrap().to_owned();
    let with_t2 = |args: &[&str]| {
        srv.cli()
            .env("ATELIER_TOKEN", &t2)
            .args(args)
            .output()
            .unwrap()
    };
    assert!(with_t2(&["status"]).status.success());
    let list = srv.ok(&["token", "list"]);
    assert!(list.contains("admin") && list.contains("ci"), "{list}");
    assert!(!list.contains(&t2));
    srv.ok(&["token", "revoke", &created["id"].to_string()]);
    let out = with_t2(&["status"]);
    assert_eq!(out.status.code(), Some(3), "{out:?}");

    // Sessions: none yet; a query-token sign-in on a sandbox host makes one;
    // revoke --all clears them.
    assert!(srv.ok(&["session", "list"]).contains("no browser sessions"));
    let host = "sandbox-sb-aaaaaaaaaa.localhost";
    let status = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
        .get(format!("{}/?atelier_token={}", srv.url, srv.token))
        .header("Host", host)
        .send()
        .await
        .unwrap()
        .status();
    assert_eq!(status, 307);
    let sessions: serde_json::Value =
        serde_json::from_str(&srv.ok(&["--json", "session", "list"])).unwrap();
    assert_eq!(sessions[0]["host"], host);
    let id = sessions[0]["id"].as_str().unwrap().to_owned();
    srv.ok(&["session", "revoke", &id]);
    let out = srv.run(&["session", "revoke", &id]);
    assert_eq!(out.status.code(), Some(4), "{out:?}");
    assert!(
        srv.ok(&["session", "revoke", "--all"])
            .contains("revoked 0")
    );

    // login reads the token from stdin into a private file; logout removes it.
    let mut child = srv
        .cli()
        .env_remove("ATELIER_TOKEN")
        .env("HOME", dir.path())
        .env("ATELIER_DATA_DIR", dir.path())
        .arg("login")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    writeln!(child.stdin.take().unwrap(), "{}", srv.token).unwrap();
    assert!(child.wait().unwrap().success());
    let saved = dir.path().join(".config/atelier/token");
    let mode = std::fs::metadata(&saved).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    let no_env = |args: &[&str]| {
        srv.cli()
            .env_remove("ATELIER_TOKEN")
            .env("HOME", dir.path())
            .env("ATELIER_DATA_DIR", dir.path())
            .args(args)
            .output()
            .unwrap()
    };
    assert!(no_env(&["status"]).status.success());
    assert!(no_env(&["logout"]).status.success());
    assert!(!saved.exists());
    assert_eq!(no_env(&["status"]).status.code(), Some(3));
}
