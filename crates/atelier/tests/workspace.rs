//! Workspace definitions and secrets through the real CLI and manager (no VM):
//! apply/list/show, revisions, validation errors naming the field, secrets kept out
//! of responses, logs and the database file, and reference checks on delete.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::Write;
use std::process::{Output, Stdio};

use common::Server;
use reqwest::Method;
use serde_json::Value;

const API_KEY: &str = "sk-live-7f3a9c1e-WORKSPACE-SECRET-VALUE";
const NPMRC: &str = "//registry.npmjs.org/:_authToken=npm_5d0c8e2b-NPMRC-SECRET\n";

const EXAMPLE: &str = r#"name: demo
image: dev-base
resources: { vcpus: 2, memory_mib: 2048, disk_gib: 10 }
repos:
  - url: http://10.0.0.1:9418/demo.git
    branch: main
    path: /workspace/demo
init:
  - npm ci
dev:
  - { name: web, command: "npm run dev", port: 3000 }
secrets:
  env: { API_KEY: { secret: demo-api-key } }
  files: [ { path: /root/.npmrc, secret: demo-npmrc, mode: "0600" } ]
opencode: { model: "provider/model" }
"#;

fn run_stdin(srv: &Server, args: &[&str], input: &[u8]) -> Output {
    let mut child = srv
        .cli()
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(input).unwrap();
    child.wait_with_output().unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn apply(srv: &Server, dir: &std::path::Path, file: &str, doc: &str) -> Output {
    let path = dir.join(file);
    std::fs::write(&path, doc).unwrap();
    srv.run(&["workspace", "apply", "-f", path.to_str().unwrap()])
}

fn contains_bytes(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

#[tokio::test(flavor = "multi_thread")]
async fn workspaces_and_secrets_end_to_end() {
    let srv = Server::start();
    let docs = tempfile::tempdir().unwrap();

    // Secrets from stdin; never an argument.
    for (name, value) in [("demo-api-key", API_KEY), ("demo-npmrc", NPMRC)] {
        let out = run_stdin(&srv, &["secret", "set", name], value.as_bytes());
        assert!(out.status.success(), "{}", text(&out.stderr));
        assert!(text(&out.stdout).contains(name));
    }
    let out = run_stdin(&srv, &["secret", "set", "empty"], b"");
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    assert!(srv.ok(&["secret", "list"]).contains("demo-npmrc"));

    // Apply, list, show.
    let out = apply(&srv, docs.path(), "demo.yaml", EXAMPLE);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("revision 1 (changed)"),
        "{}",
        text(&out.stdout)
    );
    assert!(srv.ok(&["workspace", "list"]).contains("demo"));
    let yaml = srv.ok(&["workspace", "show", "demo"]);
    assert!(
        yaml.contains("name: demo") && yaml.contains("demo-api-key"),
        "{yaml}"
    );
    let view: Value =
        serde_json::from_str(&srv.ok(&["--json", "workspace", "show", "demo"])).unwrap();
    assert_eq!(view["revision"], 1);
    assert_eq!(
        view["spec"]["secrets"]["env"]["API_KEY"]["secret"],
        "demo-api-key"
    );
    assert_eq!(view["spec"]["dev"][0]["port"], 3000);
    // What `show` prints applies back unchanged.
    let out = apply(&srv, docs.path(), "shown.yaml", &yaml);
    assert!(
        text(&out.stdout).contains("revision 1 (unchanged)"),
        "{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );

    // Same document: same revision; an edit: the next one; JSON works too.
    let out = apply(&srv, docs.path(), "demo.yaml", EXAMPLE);
    assert!(text(&out.stdout).contains("revision 1 (unchanged)"));
    let edited = EXAMPLE.replace("  - npm ci\n", "  - npm ci\n  - npm run build\n");
    let out = apply(&srv, docs.path(), "demo.yaml", &edited);
    assert!(
        text(&out.stdout).contains("revision 2 (changed)"),
        "{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    let as_json = serde_json::to_string(&view["spec"]).unwrap();
    let out = apply(&srv, docs.path(), "demo.json", &as_json);
    assert!(
        text(&out.stdout).contains("revision 3 (changed)"),
        "{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    let out = apply(&srv, docs.path(), "demo.json", &as_json);
    assert!(text(&out.stdout).contains("revision 3 (unchanged)"));

    // Bad documents: exit code 2 and the field named.
    let base = "name: bad\n";
    let cases: &[(&str, String, &str)] = &[
        ("bad name", "name: Bad_Name\n".into(), "name"),
        (
            "vcpus 0",
            format!("{base}resources: {{ vcpus: 0 }}\n"),
            "resources.vcpus",
        ),
        (
            "memory 100",
            format!("{base}resources: {{ memory_mib: 100 }}\n"),
            "resources.memory_mib",
        ),
        (
            "relative repo path",
            format!("{base}repos: [{{ url: 'https://h/r.git', path: work/r }}]\n"),
            "repos[0].path",
        ),
        (
            "duplicate repo paths",
            format!(
                "{base}repos: [{{ url: 'https://h/a.git', path: /w }}, {{ url: 'https://h/b.git', path: /w }}]\n"
            ),
            "repos[1].path",
        ),
        (
            "bad dev name",
            format!("{base}dev: [{{ name: Web_1, command: x }}]\n"),
            "dev[0].name",
        ),
        ("unknown key", format!("{base}imagee: dev-base\n"), "imagee"),
        (
            "bad mode",
            format!(
                "{base}secrets: {{ files: [{{ path: /x, secret: demo-npmrc, mode: '999' }}] }}\n"
            ),
            "secrets.files[0].mode",
        ),
        (
            "missing secret",
            format!("{base}secrets: {{ env: {{ TOKEN: {{ secret: no-such-secret }} }} }}\n"),
            "secrets.env.TOKEN.secret",
        ),
    ];
    for (what, doc, field) in cases {
        let out = apply(&srv, docs.path(), "bad.yaml", doc);
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{what}: {err}");
        assert!(err.contains(field), "{what}: {err:?} does not name {field}");
    }
    let out = apply(
        &srv,
        docs.path(),
        "bad.yaml",
        &format!("{base}secrets: {{ env: {{ TOKEN: {{ secret: no-such-secret }} }} }}\n"),
    );
    assert!(text(&out.stderr).contains("no-such-secret"));
    // The name in the body must match the path.
    let resp = srv
        .api(Method::PUT, "/api/v1/workspaces/other")
        .header("content-type", "application/yaml")
        .body(EXAMPLE)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 400);
    // The error names the field as a path into the document (a form shows it
    // there).
    let resp = srv
        .api(Method::PUT, "/api/v1/workspaces/demo")
        .header("content-type", "application/yaml")
        .body(EXAMPLE.replace("path: /workspace/demo", "path: relative/demo"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 400);
    let err: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(err["field"], "repos[0].path", "{err}");
    assert!(
        srv.ok(&["workspace", "list"]).lines().count() == 2,
        "only demo"
    );

    // Secret values appear in no response, no log line, no database byte.
    let mut bodies = String::new();
    for path in [
        "/api/v1/secrets",
        "/api/v1/workspaces",
        "/api/v1/workspaces/demo",
    ] {
        let resp = srv.api(Method::GET, path).send().await.unwrap();
        assert!(resp.status().is_success(), "{path}");
        bodies.push_str(&resp.text().await.unwrap());
    }
    assert!(bodies.contains("demo-api-key"));
    let log = srv.log();
    let mut files: Vec<(String, Vec<u8>)> = vec![("responses".into(), bodies.into_bytes())];
    files.push(("manager log".into(), log.into_bytes()));
    for f in ["atelier.db", "atelier.db-wal", "atelier.db-shm"] {
        if let Ok(b) = std::fs::read(srv.data_dir.path().join(f)) {
            files.push((f.into(), b));
        }
    }
    assert!(files.iter().any(|(n, _)| n == "atelier.db-wal"));
    for (what, bytes) in &files {
        for secret in [
            API_KEY,
            NPMRC.trim_end(),
            "NPMRC-SECRET",
            "WORKSPACE-SECRET-VALUE",
        ] {
            assert!(
                !contains_bytes(bytes, secret.as_bytes()),
                "{secret:?} found in {what}"
            );
        }
    }
    // The key file is private.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(srv.data_dir.path().join("secret.key"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);

    // A referenced secret cannot be removed; after the workspace goes, it can.
    let out = srv.run(&["secret", "rm", "demo-api-key"]);
    assert_eq!(out.status.code(), Some(5), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("demo"), "{}", text(&out.stderr));
    srv.ok(&["workspace", "rm", "demo"]);
    let out = srv.run(&["workspace", "show", "demo"]);
    assert_eq!(out.status.code(), Some(4));
    srv.ok(&["secret", "rm", "demo-api-key"]);
    let out = srv.run(&["secret", "rm", "demo-api-key"]);
    assert_eq!(out.status.code(), Some(4));
    let list = srv.ok(&["secret", "list"]);
    assert!(
        !list.contains("demo-api-key") && list.contains("demo-npmrc"),
        "{list}"
    );
}
