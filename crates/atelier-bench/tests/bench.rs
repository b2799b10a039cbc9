//! `atelier-bench bench` against a real manager (the test kit's harness, so the
//! `atelier` binary must be built: `cargo build -p atelier`): a short run gets its
//! boot, clone, exec and transfer figures, deletes its sandboxes, and leaves the
//! manager's data dir alone (the clone step uses a pool of its own beside it, removed
//! afterwards).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::{Command, Stdio};

use atelier_testkit::{Server, json};

#[test]
fn short_run_measures_and_leaves_the_data_dir_alone() {
    let srv = Server::start();
    let data_dir = srv.data_dir.path().to_owned();
    let child = Command::new(env!("CARGO_BIN_EXE_atelier-bench"))
        .args(["--json", "bench", "--idle", "0", "--execs", "3"])
        .args(["--transfer-mib", "1"])
        .env("ATELIER_URL", &srv.url)
        .env("ATELIER_TOKEN", &srv.token)
        .env("ATELIER_DATA_DIR", &data_dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let out = child.wait_with_output().unwrap();
    let report = json(&String::from_utf8_lossy(&out.stdout));
    let problems = report["problems"].as_object().cloned().unwrap_or_default();
    for step in ["boot", "clone", "exec", "transfer"] {
        assert!(
            !problems.contains_key(step),
            "{step} failed: {}\n{report:#}",
            problems[step]
        );
    }
    assert!(report["clone"]["small"]["median_ms"].as_f64().unwrap() > 0.0);
    assert_eq!(
        report["exec"]["round_trip"]["n"].as_u64(),
        Some(3),
        "{report:#}"
    );
    assert!(report["transfer"]["upload_mb_s"].as_f64().unwrap() > 0.0);

    // Nothing of the bench in the data dir, and its scratch dir is gone.
    assert!(!data_dir.join("pool/bench-tmp").exists());
    let leftovers: Vec<_> = std::fs::read_dir(data_dir.parent().unwrap())
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(&format!(".atelier-bench-{pid}-")))
        .collect();
    assert!(leftovers.is_empty(), "scratch left: {leftovers:?}");
    let sandboxes = json(&srv.ok(&["--json", "sandbox", "list"]));
    assert!(
        sandboxes
            .as_array()
            .unwrap()
            .iter()
            .all(|s| !s["name"].as_str().unwrap_or("").starts_with("bench-")),
        "bench sandboxes left: {sandboxes:#}"
    );
}
