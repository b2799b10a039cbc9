//! Tasks without a VM: the CLI and API for templates and tasks, and every bad input
//! getting a clear error with its typed exit code. (The whole loop with a real
//! OpenCode in a real VM is in `task_loop.rs`.)
#![allow(clippy::unwrap_used, clippy::expect_used)]

use atelier_testkit::manager::Server;

fn json(s: &str) -> serde_json::Value {
    serde_json::from_str(s).unwrap_or_else(|e| panic!("not json ({e}): {s}"))
}

/// Runs the CLI, expecting exit `code` and `needle` in stderr.
fn fails(srv: &Server, args: &[&str], code: i32, needle: &str) {
    let out = srv.run(args);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(code), "{args:?}: {err}");
    assert!(
        err.contains(needle),
        "{args:?}: expected {needle:?} in: {err}"
    );
}

#[test]
fn templates_and_task_inputs_get_clear_errors() {
    let srv = Server::start();

    // Templates: four built in; a stored one replaces its built-in; reset restores.
    let list = json(&srv.ok(&["--json", "template", "list"]));
    let names: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "implementation",
            "best-practices-review",
            "security-review",
            "simplification"
        ]
    );
    let show = srv.ok(&["template", "show", "security-review"]);
    assert!(show.contains("permission: edit * -> Deny"), "{show}");
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.yaml");
    std::fs::write(
        &bad,
        "name: implementation\ntitle: t\nprompt: \"do {{task.descriptoin}}\"\n",
    )
    .unwrap();
    fails(
        &srv,
        &["template", "set", "-f", bad.to_str().unwrap()],
        2,
        "unknown placeholder {{task.descriptoin}}",
    );
    let good = dir.path().join("good.yaml");
    std::fs::write(
        &good,
        "name: implementation\ntitle: Ours\nprompt: \"Ours: {{task.description}} on {{branch}}\"\npermission: [{permission: bash, action: deny}]\n",
    )
    .unwrap();
    srv.ok(&["template", "set", "-f", good.to_str().unwrap()]);
    let t = json(&srv.ok(&["--json", "template", "show", "implementation"]));
    assert_eq!(t["title"], "Ours");
    assert_eq!(t["permission"][0]["action"], "deny");
    srv.ok(&["template", "reset", "implementation"]);
    let t = json(&srv.ok(&["--json", "template", "show", "implementation"]));
    assert_eq!(t["title"], "Implement a change on a new branch");
    fails(
        &srv,
        &["template", "reset", "implementation"],
        4,
        "no stored version",
    );
    fails(
        &srv,
        &["template", "show", "nope"],
        4,
        "template \"nope\" not found",
    );

    // Tasks: unknown workspace, empty description, unknown template, no repository.
    fails(
        &srv,
        &["task", "create", "-w", "ghost", "do it"],
        4,
        "workspace ghost not found",
    );
    let ws = dir.path().join("ws.yaml");
    std::fs::write(&ws, "name: norepo\nimage: minimal\n").unwrap();
    srv.ok(&["workspace", "apply", "-f", ws.to_str().unwrap()]);
    fails(
        &srv,
        &["task", "create", "-w", "norepo", "  "],
        2,
        "description",
    );
    fails(
        &srv,
        &["task", "create", "-w", "norepo", "-t", "nope", "do it"],
        4,
        "template \"nope\" not found",
    );
    fails(
        &srv,
        &["task", "create", "-w", "norepo", "do it"],
        2,
        "has no repository",
    );
    std::fs::write(
        &ws,
        "name: shop\nimage: minimal\nrepos: [{url: \"git://198.18.250.2/none.git\", path: /workspace/shop}]\n",
    )
    .unwrap();
    srv.ok(&["workspace", "apply", "-f", ws.to_str().unwrap()]);

    // A backlog task: listed, shown, and refused what a backlog task cannot do.
    let t = json(&srv.ok(&[
        "--json",
        "task",
        "create",
        "-w",
        "shop",
        "-e",
        "high",
        "Add a /health route\n\nReturn 200 with the version.",
    ]));
    let id = t["id"].as_str().unwrap().to_owned();
    assert_eq!(t["state"], "backlog");
    assert_eq!(t["column"], "backlog");
    assert_eq!(t["title"], "Add a /health route");
    assert_eq!(t["effort"], "high");
    assert!(
        t["branch"]
            .as_str()
            .unwrap()
            .starts_with(&format!("atelier/{id}-add-a-health-route")),
        "{t}"
    );
    assert_eq!(t["base_branch"], "main");
    let listed = json(&srv.ok(&["--json", "task", "list", "--state", "backlog"]));
    assert_eq!(listed.as_array().unwrap().len(), 1);
    let table = srv.ok(&["task", "list"]);
    assert!(
        table.contains(&id) && table.contains("Add a /health route"),
        "{table}"
    );
    fails(&srv, &["task", "say", &id, "more"], 5, "is backlog");
    fails(&srv, &["task", "done", &id], 5, "is backlog");
    fails(&srv, &["task", "chain", &id], 5, "chain onto a done task");
    fails(
        &srv,
        &["task", "retry", &id],
        5,
        "only a failed or cancelled",
    );
    fails(
        &srv,
        &["task", "show", "tk-nothere00"],
        4,
        "task tk-nothere00 not found",
    );
    fails(
        &srv,
        &["attention", "answer", "at-nothere00", "--once"],
        4,
        "attention item at-nothere00 not found",
    );
    let diff = srv.ok(&["task", "diff", &id]);
    assert!(diff.is_empty(), "{diff}");
    assert!(srv.ok(&["attention"]).contains("nothing needs you"));

    // Cancelled: terminal until retried (retrying would start it; not here).
    let t = json(&srv.ok(&["--json", "task", "cancel", &id]));
    assert_eq!(t["state"], "cancelled");
    fails(&srv, &["task", "cancel", &id], 5, "cannot be cancelled");
    // Usage per workspace counts it (no tokens yet).
    let usage = json(&srv.ok(&["--json", "task", "usage"]));
    assert_eq!(usage[0]["workspace"], "shop");
    assert_eq!(usage[0]["tasks"], 1);
    assert_eq!(usage[0]["tokens_in"], 0);
    // A bad state filter is a 400.
    fails(&srv, &["task", "list", "--state", "sleeping"], 2, "state");
}
