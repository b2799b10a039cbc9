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

    // The conversation: empty before a session, and bounded.
    let conv = json(&srv.ok(&["--json", "task", "log", &id]));
    assert_eq!(conv["live"], false, "{conv}");
    assert_eq!(conv["messages"].as_array().unwrap().len(), 0, "{conv}");
    assert!(conv["captured_at"].is_null(), "{conv}");
    assert!(
        srv.ok(&["task", "log", &id])
            .contains("no conversation yet")
    );
    fails(
        &srv,
        &["task", "log", &id, "--limit", "0"],
        2,
        "limit 0 is out of range",
    );
    fails(
        &srv,
        &["task", "log", &id, "-n", "1001"],
        2,
        "give 1 to 1000",
    );
    fails(
        &srv,
        &["task", "log", "tk-nothere00"],
        4,
        "task tk-nothere00 not found",
    );

    // Budgets: per task (validated), shown on the task.
    fails(
        &srv,
        &["task", "create", "-w", "shop", "--budget-usd", "0", "do it"],
        2,
        "budget_usd",
    );
    fails(
        &srv,
        &[
            "task",
            "create",
            "-w",
            "shop",
            "--budget-tokens=-5",
            "do it",
        ],
        2,
        "budget_tokens",
    );
    let b = json(&srv.ok(&[
        "--json",
        "task",
        "create",
        "-w",
        "shop",
        "--budget-usd",
        "2.5",
        "--budget-tokens",
        "100000",
        "Stay cheap",
    ]));
    assert_eq!(
        (b["budget_usd"].as_f64(), b["budget_tokens"].as_i64()),
        (Some(2.5), Some(100000)),
        "{b}"
    );
    assert_eq!(b["workspace_budget_waived"], false);
    // Budget answers need --continue; answering an unknown item is a 404.
    let out = srv.run(&["attention", "answer", "at-nothere00", "--budget-usd", "3"]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    fails(
        &srv,
        &[
            "attention",
            "answer",
            "at-nothere00",
            "--continue",
            "--budget-usd",
            "3",
        ],
        4,
        "not found",
    );
    // Per workspace: in its definition, validated with the field named.
    let bad_ws = |extra: &str, needle: &str| {
        std::fs::write(
            &ws,
            format!("name: shop\nimage: minimal\nrepos: [{{url: \"git://198.18.250.2/none.git\", path: /workspace/shop}}]\n{extra}"),
        )
        .unwrap();
        fails(
            &srv,
            &["workspace", "apply", "-f", ws.to_str().unwrap()],
            2,
            needle,
        );
    };
    bad_ws("budget: { usd: -3 }\n", "budget.usd");
    bad_ws("budget: { tokens: 0 }\n", "budget.tokens");
    bad_ws(
        "templates: { implementation: { title: t, prompt: \"{{task.descriptoin}}\" } }\n",
        "templates.implementation.prompt: unknown placeholder {{task.descriptoin}}",
    );
    bad_ws(
        "templates: { implementation: { title: t, prompt: \" \" } }\n",
        "templates.implementation.prompt: must not be empty",
    );
    bad_ws(
        "templates: { implementation: { title: t, prompt: p, efforts: { extreme: {} } } }\n",
        "unknown variant `extreme`",
    );
    bad_ws(
        "templates: { quick: { name: slow, title: t, prompt: p } }\n",
        "templates.quick.name",
    );

    // Template precedence: the workspace's over the global over the built-in.
    std::fs::write(
        &good,
        "name: implementation\ntitle: Global\nprompt: \"Global: {{task.description}}\"\n",
    )
    .unwrap();
    srv.ok(&["template", "set", "-f", good.to_str().unwrap()]);
    std::fs::write(
        &ws,
        "name: shop\nimage: minimal\nrepos: [{url: \"git://198.18.250.2/none.git\", path: /workspace/shop}]\nbudget: { usd: 10 }\ntemplates:\n  implementation: { title: Shop, prompt: \"Shop: {{task.description}}\", attention_timeout_secs: 30 }\n  quick: { title: Quick one, prompt: \"Quickly: {{task.description}}\" }\n",
    )
    .unwrap();
    let before = json(&srv.ok(&["--json", "workspace", "show", "shop"]));
    srv.ok(&["workspace", "apply", "-f", ws.to_str().unwrap()]);
    // Budget and templates are read at task time: same revision, no prebuild rebuilt.
    let after = json(&srv.ok(&["--json", "workspace", "show", "shop"]));
    assert_eq!(after["revision"], before["revision"], "{after}");
    assert_eq!(after["spec"]["budget"]["usd"], 10.0, "{after}");
    let w = json(&srv.ok(&[
        "--json",
        "template",
        "show",
        "implementation",
        "--workspace",
        "shop",
    ]));
    assert_eq!(
        (w["name"].as_str(), w["title"].as_str()),
        (Some("implementation"), Some("Shop")),
        "{w}"
    );
    assert_eq!(w["attention_timeout_secs"], 30);
    let shown = srv.ok(&["template", "show", "implementation", "-w", "shop"]);
    assert!(shown.contains("rejected after 30 s"), "{shown}");
    let g = json(&srv.ok(&["--json", "template", "show", "implementation"]));
    assert_eq!(g["title"], "Global");
    srv.ok(&["template", "reset", "implementation"]);
    let names = json(&srv.ok(&["--json", "template", "list", "-w", "shop"]));
    assert!(
        names
            .as_array()
            .unwrap()
            .iter()
            .any(|t| t["name"] == "quick"),
        "{names}"
    );
    assert_eq!(
        json(&srv.ok(&[
            "--json",
            "template",
            "show",
            "security-review",
            "-w",
            "shop"
        ]))["name"],
        "security-review"
    );
    fails(
        &srv,
        &["template", "show", "quick"],
        4,
        "template \"quick\" not found",
    );
    fails(
        &srv,
        &["template", "show", "quick", "-w", "ghost"],
        4,
        "workspace ghost not found",
    );
    // A workspace's own template is usable by its tasks only.
    let q = json(&srv.ok(&[
        "--json", "task", "create", "-w", "shop", "-t", "quick", "Fast",
    ]));
    assert_eq!(q["template"], "quick");
    fails(
        &srv,
        &["task", "create", "-w", "norepo", "-t", "quick", "do it"],
        4,
        "template \"quick\" not found",
    );

    // Budget answers. Raising an item needs a live agent (task_loop.rs does it);
    // here the items are put in the database beside the running manager.
    let qid = q["id"].as_str().unwrap().to_owned();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let store = rt
        .block_on(atelier_store::Store::open(
            &srv.data_dir.path().join("atelier.db"),
        ))
        .unwrap();
    let raise = |id: &str, scope: &str| {
        rt.block_on(store.insert_attention(&atelier_store::AttentionRecord {
            id: id.into(),
            task: qid.clone(),
            kind: atelier_core::task::AttentionKind::Budget,
            remote_id: String::new(),
            title: "budget reached: 500 of the task's 400 tokens; continue?".into(),
            detail: serde_json::json!({"scope": scope, "aborted": false}).to_string(),
            status: atelier_core::task::AttentionStatus::Pending,
            answer: None,
            created_at: 1,
            resolved_at: None,
        }))
        .unwrap();
    };
    rt.block_on(store.update_task(
        &qid,
        atelier_store::TaskPatch {
            usage: Some((1, 400, 100, 0.0)),
            ..Default::default()
        },
    ))
    .unwrap();
    raise("at-budget0001", "task");
    let listed = srv.ok(&["attention"]);
    assert!(listed.contains("at-budget0001  budget"), "{listed}");
    fails(
        &srv,
        &["attention", "answer", "at-budget0001", "--once"],
        2,
        "budget takes continue or stop",
    );
    fails(
        &srv,
        &[
            "attention",
            "answer",
            "at-budget0001",
            "--continue",
            "--budget-tokens",
            "500",
        ],
        2,
        "is not above what task",
    );
    srv.ok(&[
        "attention",
        "answer",
        "at-budget0001",
        "--continue",
        "--budget-tokens",
        "2000",
    ]);
    let t = json(&srv.ok(&["--json", "task", "show", &qid]));
    assert_eq!(
        (t["budget_tokens"].as_i64(), t["budget_usd"].as_f64()),
        (Some(2000), None),
        "{t}"
    );
    fails(
        &srv,
        &["attention", "answer", "at-budget0001", "--stop"],
        5,
        "already answered",
    );
    // The workspace's budget reached, continue with no new limit: waived for this
    // task, its own budget kept.
    raise("at-budget0002", "workspace");
    srv.ok(&["attention", "answer", "at-budget0002", "--continue"]);
    let t = json(&srv.ok(&["--json", "task", "show", &qid]));
    assert_eq!(t["workspace_budget_waived"], true, "{t}");
    assert_eq!(t["budget_tokens"], 2000, "{t}");
    assert!(srv.ok(&["task", "show", &qid]).contains("waived"));
    // The task's own, continue with no new limit: lifted.
    raise("at-budget0003", "task");
    srv.ok(&["attention", "answer", "at-budget0003", "--continue"]);
    let t = json(&srv.ok(&["--json", "task", "show", &qid]));
    assert!(t["budget_tokens"].is_null(), "{t}");
    // Stop: answered; the task stays where it is (a waiting one goes to review).
    raise("at-budget0004", "task");
    let r = json(&srv.ok(&["--json", "attention", "answer", "at-budget0004", "--stop"]));
    assert_eq!(r["item"]["status"], "answered", "{r}");
    assert_eq!(r["item"]["answer"]["answer"], "stop", "{r}");
    assert_eq!(
        json(&srv.ok(&["--json", "task", "show", &qid]))["state"],
        "backlog"
    );
}
