//! The API against a schema-driven fuzzer. Schemathesis reads `/api/openapi.json`,
//! generates requests from it (examples, boundary values, then random valid and
//! invalid data), and sends them with the admin token to a real manager that has one
//! real sandbox, whose id it uses for every `{id}`. It checks that no answer is a
//! 5xx, that every status is one the document lists and that every content type is
//! the documented one. Operations that boot or remove VMs, or revoke the token the
//! run uses, are left out (other tests cover them); the event stream is left out
//! because it never ends.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::PathBuf;
use std::process::Command;

use common::Server;

/// Operations the fuzzer must not call (by operation id).
const LEFT_OUT: &[&str] = &[
    "events",
    "sandboxes_create",
    "sandboxes_delete",
    "sandboxes_fork",
    "sandboxes_start",
    "sandboxes_resume",
    "sandboxes_pause",
    "sandboxes_stop",
    "prebuilds_create",
    "auth_revoke_token",
    "auth_revoke_session",
    "auth_revoke_all_sessions",
];

/// The schemathesis CLI: `ATELIER_SCHEMATHESIS` (set by scripts/test.sh, which
/// installs a pinned version), else `st` on PATH.
fn schemathesis() -> PathBuf {
    if let Some(p) = std::env::var_os("ATELIER_SCHEMATHESIS") {
        return PathBuf::from(p);
    }
    let found = Command::new("st").arg("--version").output();
    assert!(
        found.is_ok_and(|o| o.status.success()),
        "schemathesis is not installed: run the tests through scripts/test.sh, or set \
         ATELIER_SCHEMATHESIS to its `st` binary"
    );
    PathBuf::from("st")
}

#[test]
fn schemathesis_finds_no_server_error_and_no_undocumented_status() {
    let st = schemathesis();
    let srv = Server::start();
    srv.ok(&["sandbox", "create", "--name", "fz"]);
    let shown: serde_json::Value =
        serde_json::from_str(&srv.ok(&["--json", "sandbox", "show", "fz"])).unwrap();
    let id = shown["id"].as_str().unwrap().to_owned();

    let work = tempfile::tempdir().unwrap();
    let config = work.path().join("schemathesis.toml");
    // Every `{id}` is the sandbox's; logs are read, not followed (a follow never
    // ends).
    std::fs::write(
        &config,
        format!("[parameters]\n\"path.id\" = \"{id}\"\n\"query.follow\" = false\n"),
    )
    .unwrap();
    let out = Command::new(&st)
        .current_dir(work.path())
        .arg("--config-file")
        .arg(&config)
        .arg("run")
        .arg(format!("{}/api/openapi.json", srv.url))
        .args(["-H", &format!("Authorization: Bearer {}", srv.token)])
        .args([
            "--checks",
            "not_a_server_error,status_code_conformance,content_type_conformance",
        ])
        .args(
            LEFT_OUT
                .iter()
                .flat_map(|op| ["--exclude-operation-id", op]),
        )
        // Bounded: a few examples per operation, one worker (requests to the one
        // sandbox do not race each other), a deadline per request.
        .args(["--max-examples", "10", "-w", "1", "--request-timeout", "30"])
        .args(["--phases", "examples,coverage,fuzzing"])
        .args(["--seed", "20261206"])
        .env("NO_COLOR", "1")
        .output()
        .expect("run schemathesis");
    let text = format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    println!("{text}");
    assert!(
        out.status.success(),
        "schemathesis found failures (exit {:?}); its report is above",
        out.status.code()
    );
    // It really reached the sandbox (not only 404s for a made-up id): some of its
    // generated dev commands started there.
    let log = strip_ansi(&srv.log());
    assert!(
        log.contains(&format!("dev command started sandbox={id}")),
        "the fuzzer never reached sandbox {id}"
    );
    // The sandbox survived everything it was sent.
    let shown: serde_json::Value =
        serde_json::from_str(&srv.ok(&["--json", "sandbox", "show", "fz"])).unwrap();
    assert_eq!(shown["state"], "running", "{shown}");
    srv.ok(&["sandbox", "rm", "fz"]);
    srv.assert_clean();
}

/// The text of a log without its colour codes.
fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // CSI: ESC [ ... final byte in @..~
            for c in chars.by_ref() {
                if ('@'..='~').contains(&c) && c != '[' {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}
