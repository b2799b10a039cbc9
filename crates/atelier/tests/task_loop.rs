//! The task loop end to end, the way a user drives it: a real `atelier serve`, real
//! VMs, a real OpenCode frozen warm in the workspace's prebuild, the scripted model
//! and a git server in a network namespace the test owns, and only the CLI.
//!
//! One scenario, asserted in sequence (prebuilds with OpenCode are slow under TCG):
//! a task on a workspace with no prebuild builds one first → a permission (CLI and
//! SSE) → the manager is killed -9 with it pending and the item is still there after
//! the restart → answered → a question → the task is parked (sandbox paused to disk)
//! → answering resumes it → todos reach 100 % → review → answering twice is a 409 →
//! done → the branch on the git server holds the agent's file in the expected
//! commit → a chained review task on the same branch sees that commit. The provider
//! key reaches the model and appears in no API answer. Along the way: an "always"
//! answer covers the same command asked again (no second item); the conversation
//! API shows the session live, then the copy kept once the sandbox is stopped; the
//! workspace's own review template rejects an unanswered permission after its
//! `attention_timeout_secs`; a task's token budget stops it with a `budget` item
//! and `continue` with a higher budget lets it finish.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use atelier_testkit::model::RequestKind;
use atelier_testkit::opencode_ws::opencode_workspace_yaml;
use atelier_testkit::{ModelServer, Script, StaticDns, Turn};
use common::{GitServer, PublicNet, Server, git, poll_until};
use serde_json::json;

const KEY: &str = "sk-task-3c9d1e7f5a2b4c6d";
const MODEL_HOST: &str = "public.test";
const MODEL_PORT: u16 = 18091;
/// Building a prebuild with a cold OpenCode start under TCG takes minutes.
const LONG: Duration = Duration::from_secs(1500);
const STEP: Duration = Duration::from_secs(300);

fn json_of(s: &str) -> serde_json::Value {
    serde_json::from_str(s).unwrap_or_else(|e| panic!("not json ({e}): {s}"))
}

fn task(srv: &Server, id: &str) -> serde_json::Value {
    json_of(&srv.ok(&["--json", "task", "show", id]))
}

/// Waits until the task is in `state` (failing fast, with its error, if it failed).
fn wait_state(srv: &Server, id: &str, state: &str, limit: Duration) -> serde_json::Value {
    poll_until(limit, format!("task {id} to be {state}"), || {
        let t = task(srv, id);
        if t["state"] == "failed" && state != "failed" {
            panic!("task {id} failed: {}\n{}", t["error"], srv.log());
        }
        (t["state"] == state).then_some(t)
    })
}

/// Waits for a pending attention item of `kind` on the task; returns it.
fn wait_item(srv: &Server, id: &str, kind: &str, limit: Duration) -> serde_json::Value {
    poll_until(limit, format!("a pending {kind} on task {id}"), || {
        let t = task(srv, id);
        if t["state"] == "failed" {
            panic!("task {id} failed: {}\n{}", t["error"], srv.log());
        }
        let items = json_of(&srv.ok(&["--json", "attention", "list", "--task", id]));
        items
            .as_array()
            .unwrap()
            .iter()
            .find(|a| a["kind"] == kind && a["status"] == "pending")
            .cloned()
    })
}

#[test]
fn a_task_goes_from_prompt_to_pushed_branch_and_chains() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    // "The internet": a git server and the scripted model in the public namespace,
    // found by name through the test's DNS server.
    let net = PublicNet::start();
    let repo = GitServer::start(&net);
    let ip_a: std::net::Ipv4Addr = net.ip_a.parse().unwrap();
    let script = Script::new(vec![
        Turn::tool(
            "todowrite",
            json!({"todos": [
                {"content": "Write feature.txt", "status": "in_progress", "priority": "high"},
                {"content": "Check it", "status": "pending", "priority": "low"},
            ]}),
        ),
        Turn::tool(
            "write",
            json!({"filePath": "/workspace/shop/feature.txt", "content": "made by the agent\n"}),
        ),
        Turn::tool(
            "bash",
            json!({"command": "cat feature.txt", "description": "Show the new file"}),
        ),
        Turn::tool(
            "question",
            json!({"questions": [{
                "question": "Which database should it use?",
                "header": "Database",
                "options": [
                    {"label": "postgres", "description": "The relational one"},
                    {"label": "mongodb", "description": "The document one"},
                ],
            }]}),
        ),
        // The same command again: the "always" answer covers it.
        Turn::tool(
            "bash",
            json!({"command": "cat feature.txt", "description": "Show the new file"}),
        ),
        Turn::tool(
            "todowrite",
            json!({"todos": [
                {"content": "Write feature.txt", "status": "completed", "priority": "high"},
                {"content": "Check it", "status": "completed", "priority": "low"},
            ]}),
        ),
        Turn::text("Done: feature.txt holds the feature, on postgres."),
    ]);
    let (model, dns) = rt.block_on(async {
        let model = ModelServer::start_in_netns(
            &net.ns,
            std::net::SocketAddr::from((ip_a, MODEL_PORT)),
            "/v1",
            script,
        )
        .await
        .expect("model server in the public namespace");
        let dns = StaticDns::spawn(
            "127.0.0.1:0".parse().unwrap(),
            vec![(MODEL_HOST.into(), ip_a)],
            vec![],
        )
        .await
        .unwrap();
        (model, dns)
    });
    let dns_addr = dns.local_addr().to_string();
    let env = [
        ("ATELIER_DNS_UPSTREAM", dns_addr.as_str()),
        // Long enough to answer the permission first, short enough to see parking.
        ("ATELIER_PARK_AFTER_SECS", "45"),
        // A working agent silent this long is reported stalled (the hung model below).
        ("ATELIER_STALL_AFTER_SECS", "60"),
    ];
    let mut srv = Server::start_with(&env);
    srv.set_secret("model-key", KEY);
    let url = repo.url.replace(&net.ip_a, MODEL_HOST);
    let ws = tempfile::NamedTempFile::new().unwrap();
    // Guests reach the git server by name; the host (which pushes task branches)
    // by address: the test's name is not in the host's resolver.
    let yaml = opencode_workspace_yaml("shop", MODEL_HOST, MODEL_PORT, "model-key", Some(&url))
        .replace(
            "path: /workspace/shop }",
            &format!("path: /workspace/shop, push_url: \"{}\" }}", repo.url),
        );
    assert!(yaml.contains("push_url"), "{yaml}");
    // The workspace's own review template: an unanswered permission is rejected
    // after 8 s (the global and built-in ones never time out).
    let yaml = format!(
        "{yaml}templates:\n  best-practices-review:\n    title: Review with a deadline\n    prompt: \"Review {{{{branch}}}}: {{{{task.description}}}}\"\n    permission: [{{permission: edit, action: deny}}, {{permission: bash, action: ask}}]\n    attention_timeout_secs: 8\n"
    );
    std::fs::write(ws.path(), yaml).unwrap();
    srv.ok(&["workspace", "apply", "-f", ws.path().to_str().unwrap()]);
    let base = git(&repo.work, &["rev-parse", "HEAD"]);

    // Created and started at once; no prebuild yet, so one is built first.
    let t = json_of(&srv.ok(&[
        "--json",
        "task",
        "create",
        "-w",
        "shop",
        "--start",
        "Add feature.txt\n\nIt describes the feature.",
    ]));
    let id = t["id"].as_str().unwrap().to_owned();
    let branch = t["branch"].as_str().unwrap().to_owned();
    assert!(
        branch.starts_with(&format!("atelier/{id}-add-feature-txt")),
        "{t}"
    );
    assert!(
        matches!(t["state"].as_str(), Some("queued" | "starting")),
        "{t}"
    );
    assert_eq!(t["column"], "in-progress");

    // The bash call asks: an item, listed across tasks.
    let perm = wait_item(&srv, &id, "permission", LONG);
    let item = perm["id"].as_str().unwrap().to_owned();
    assert!(
        perm["title"].as_str().unwrap().contains("cat feature.txt"),
        "{perm}"
    );
    let t = wait_state(&srv, &id, "waiting", STEP);
    assert_eq!(t["column"], "needs-you");
    assert_eq!(t["pending"], 1);
    assert!(t["sandbox"].is_string());
    let all = srv.ok(&["attention"]);
    assert!(all.contains(&item) && all.contains("permission"), "{all}");
    // The prebuild was built first, and the key reached the model.
    let pbs = json_of(&srv.ok(&["--json", "prebuild", "list", "--workspace", "shop"]));
    assert_eq!(pbs[0]["status"], "ready", "{pbs}");
    let reqs = model.requests();
    let answering: Vec<_> = reqs
        .iter()
        .filter(|r| r.kind != RequestKind::Title)
        .collect();
    assert!(!answering.is_empty());
    assert!(
        answering
            .iter()
            .all(|r| r.authorization.as_deref() == Some(&format!("Bearer {KEY}"))),
        "the provider key did not reach the model"
    );
    assert!(
        answering[0]
            .last_user_text()
            .is_some_and(|u| u.contains("Add feature.txt") && u.contains(&branch)),
        "the prompt was not the rendered template: {:?}",
        answering[0].last_user_text()
    );

    // Durable: the manager dies with the item pending; after the restart it is
    // still listed and answering it carries the task on.
    srv.kill9();
    srv.restart(&env);
    let after = json_of(&srv.ok(&["--json", "attention", "list"]));
    assert!(
        after
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a["id"] == item.as_str()),
        "{after}"
    );
    srv.ok(&["attention", "answer", &item, "--always"]);

    // The question; the task waits on it long enough to be parked.
    let q = wait_item(&srv, &id, "question", STEP);
    let qid = q["id"].as_str().unwrap().to_owned();
    assert_eq!(
        q["detail"]["questions"][0]["options"][0]["label"],
        "postgres"
    );
    let shown = srv.ok(&["task", "show", &id]);
    assert!(
        shown.contains("Which database should it use?") && shown.contains("1. postgres"),
        "{shown}"
    );
    let parked = poll_until(STEP, "the waiting task to be parked", || {
        let t = task(&srv, &id);
        (t["parked"] == true).then_some(t)
    });
    let sb = parked["sandbox"].as_str().unwrap().to_owned();
    let sb_view = json_of(&srv.ok(&["--json", "sandbox", "show", &sb]));
    assert_eq!(sb_view["state"], "paused", "{sb_view}");
    // Answering resumes it and delivers the answer (the request survived in memory).
    srv.ok(&["attention", "answer", &qid, "--option", "1"]);
    let done = wait_state(&srv, &id, "review", STEP);
    assert_eq!(done["parked"], false);
    assert_eq!(
        (done["todos_done"].as_i64(), done["todos_total"].as_i64()),
        (Some(2), Some(2))
    );
    assert_eq!(done["percent"], 100);
    assert!(done["tokens_in"].as_i64().unwrap() > 0, "{done}");
    assert!(
        done["summary"]
            .as_str()
            .unwrap_or("")
            .contains("on postgres"),
        "{done}"
    );
    assert!(
        model
            .requests()
            .iter()
            .flat_map(|r| r.tool_results())
            .any(|t| t.contains("postgres")),
        "the model never got the answer"
    );
    // The second identical command ran under the "always" answer: no new item,
    // and the model got its output twice.
    let items = json_of(&srv.ok(&["--json", "attention", "list", "--all", "--task", &id]));
    let perms: Vec<_> = items
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| a["kind"] == "permission")
        .collect();
    assert_eq!(perms.len(), 1, "{items}");
    assert!(
        model.requests().iter().any(|r| r
            .tool_results()
            .iter()
            .filter(|t| t.contains("made by the agent"))
            .count()
            >= 2),
        "the repeated command did not run"
    );
    // The conversation, live: the prompt, the tool calls, usage per agent message.
    let conv = json_of(&srv.ok(&["--json", "task", "log", &id]));
    assert_eq!(conv["live"], true, "{conv}");
    let msgs = conv["messages"].as_array().unwrap();
    assert_eq!(msgs[0]["role"], "user", "{conv}");
    assert!(
        msgs[0]["text"]
            .as_str()
            .unwrap()
            .contains("Add feature.txt"),
        "{conv}"
    );
    let tools: Vec<&serde_json::Value> = msgs
        .iter()
        .flat_map(|m| m["tools"].as_array().unwrap())
        .collect();
    let bash: Vec<_> = tools.iter().filter(|t| t["tool"] == "bash").collect();
    assert_eq!(bash.len(), 2, "{conv}");
    assert_eq!(bash[0]["input"], "cat feature.txt");
    assert_eq!(bash[0]["status"], "completed");
    assert!(
        bash[0]["output"]
            .as_str()
            .unwrap_or("")
            .contains("made by the agent"),
        "{conv}"
    );
    assert!(tools.iter().any(|t| t["tool"] == "question"), "{conv}");
    assert!(
        msgs.iter()
            .any(|m| m["role"] == "assistant" && m["tokens_in"].as_i64().unwrap_or(0) > 0),
        "{conv}"
    );
    let two = json_of(&srv.ok(&["--json", "task", "log", &id, "-n", "2"]));
    assert_eq!(two["messages"].as_array().unwrap().len(), 2);
    assert_eq!(two["truncated"], true);
    assert_eq!(two["messages"][1]["id"], msgs[msgs.len() - 1]["id"]);
    let printed = srv.ok(&["task", "log", &id]);
    assert!(printed.contains("[completed] bash"), "{printed}");
    // Answering again: a clear conflict.
    let out = srv.run(&["attention", "answer", &qid, "--option", "2"]);
    assert_eq!(
        out.status.code(),
        Some(5),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("already answered"));
    // The live diff has the agent's file.
    let diff = srv.ok(&["task", "diff", &id]);
    assert!(
        diff.contains("feature.txt") && diff.contains("+made by the agent"),
        "{diff}"
    );

    // Done: committed, pushed from the host, diff kept, sandbox stopped.
    let finished = json_of(&srv.ok(&["--json", "task", "done", &id]));
    assert_eq!(finished["state"], "done", "{finished}");
    let commits = finished["commits"].as_array().unwrap();
    assert_eq!(commits.len(), 1, "{finished}");
    let pushed = git(
        &repo.bare(),
        &["rev-parse", &format!("refs/heads/{branch}")],
    );
    assert_eq!(pushed, commits[0]["id"].as_str().unwrap());
    assert_eq!(
        git(&repo.bare(), &["show", &format!("{branch}:feature.txt")]),
        "made by the agent"
    );
    assert_eq!(
        git(&repo.bare(), &["rev-parse", &format!("{branch}~1")]),
        base
    );
    let kept = srv.ok(&["task", "diff", &id]);
    assert!(kept.contains("+made by the agent"), "{kept}");
    let stopped = json_of(&srv.ok(&["--json", "sandbox", "show", &sb]));
    assert_eq!(stopped["state"], "stopped", "{stopped}");
    // The conversation stays readable: the copy kept when it finished.
    let kept = json_of(&srv.ok(&["--json", "task", "log", &id]));
    assert_eq!(kept["live"], false, "{kept}");
    assert!(kept["captured_at"].is_i64(), "{kept}");
    assert!(
        kept["messages"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["text"].as_str().unwrap_or("").contains("on postgres")),
        "{kept}"
    );

    // Chained: a review on the same branch sees the commit. Its template (the
    // workspace's) rejects the permission nobody answers after 8 s, with a note the
    // agent carries on with.
    model.set_script(Script::new(vec![
        Turn::tool(
            "bash",
            json!({"command": "git log --oneline -1", "description": "See the last commit"}),
        ),
        Turn::text("Reviewed: looks right."),
    ]));
    let review = json_of(&srv.ok(&[
        "--json",
        "task",
        "chain",
        &id,
        "-t",
        "best-practices-review",
    ]));
    let rid = review["id"].as_str().unwrap().to_owned();
    assert_eq!(review["branch"], branch.as_str());
    assert_eq!(review["parent"], id.as_str());
    let r = wait_state(&srv, &rid, "review", STEP);
    let rsb = r["sandbox"].as_str().unwrap();
    let head = srv.ok(&[
        "sandbox",
        "exec",
        rsb,
        "--",
        "git",
        "-C",
        "/workspace/shop",
        "rev-parse",
        "HEAD",
    ]);
    assert_eq!(head.trim(), pushed);
    assert!(
        r["summary"].as_str().unwrap_or("").contains("Reviewed"),
        "{r}"
    );
    let items = json_of(&srv.ok(&["--json", "attention", "list", "--all", "--task", &rid]));
    let timed_out = &items[0];
    assert_eq!(items.as_array().unwrap().len(), 1, "{items}");
    assert_eq!(timed_out["kind"], "permission", "{items}");
    assert_eq!(timed_out["status"], "answered", "{items}");
    assert_eq!(timed_out["answer"]["answer"], "reject", "{items}");
    assert!(
        timed_out["answer"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("Nobody answered within 8 s"),
        "{items}"
    );
    let waited =
        timed_out["resolved_at"].as_i64().unwrap() - timed_out["created_at"].as_i64().unwrap();
    assert!(
        waited >= 8000,
        "answered after {waited} ms, before the timeout"
    );
    assert!(
        model
            .requests()
            .iter()
            .flat_map(|r| r.tool_results())
            .any(|t| t.contains("Nobody answered within 8 s")),
        "the model never got the note"
    );
    let c = json_of(&srv.ok(&["--json", "task", "cancel", &rid]));
    assert_eq!(c["state"], "cancelled");

    // Never stuck silently. A hung model: a "stalled" item; retry works.
    model.set_script(Script::new(vec![Turn::Hang]));
    // It has a token budget the first answer will reach.
    let h = json_of(&srv.ok(&[
        "--json",
        "task",
        "create",
        "-w",
        "shop",
        "--start",
        "--budget-tokens",
        "1",
        "Think hard",
    ]));
    let hid = h["id"].as_str().unwrap().to_owned();
    let stalled = wait_item(&srv, &hid, "stalled", STEP);
    assert!(
        stalled["title"]
            .as_str()
            .unwrap()
            .contains("no sign of life"),
        "{stalled}"
    );
    model.set_script(Script::new(vec![Turn::text("Recovered after the retry.")]));
    srv.ok(&[
        "attention",
        "answer",
        stalled["id"].as_str().unwrap(),
        "--retry",
    ]);
    // The answer after the retry reaches the budget: the turn is stopped (if it
    // still ran) and a budget item asks.
    let over = wait_item(&srv, &hid, "budget", STEP);
    assert!(
        over["title"]
            .as_str()
            .unwrap()
            .starts_with("budget reached:"),
        "{over}"
    );
    assert_eq!(over["detail"]["scope"], "task", "{over}");
    assert_eq!(over["detail"]["limit"], "tokens", "{over}");
    assert_eq!(task(&srv, &hid)["state"], "waiting");
    // Continue with a higher budget: the agent carries on (when it was stopped
    // mid-turn) and the task reaches review with no second budget item.
    model.set_script(Script::new(vec![Turn::text(
        "Carried on within the new budget.",
    )]));
    srv.ok(&[
        "attention",
        "answer",
        over["id"].as_str().unwrap(),
        "--continue",
        "--budget-tokens",
        "1000000000",
    ]);
    let r = wait_state(&srv, &hid, "review", STEP);
    assert_eq!(r["budget_tokens"], 1_000_000_000i64, "{r}");
    let expect = if over["detail"]["aborted"] == true {
        "Carried on"
    } else {
        "Recovered"
    };
    assert!(r["summary"].as_str().unwrap_or("").contains(expect), "{r}");
    let budget_items = json_of(&srv.ok(&["--json", "attention", "list", "--all", "--task", &hid]));
    assert_eq!(
        budget_items
            .as_array()
            .unwrap()
            .iter()
            .filter(|a| a["kind"] == "budget")
            .count(),
        1,
        "{budget_items}"
    );
    // A model error is shown, and retrying works.
    model.set_script(Script::new(vec![Turn::error(
        400,
        "the model refuses this prompt",
    )]));
    srv.ok(&["task", "say", &hid, "Once more"]);
    let err = wait_item(&srv, &hid, "stalled", STEP);
    assert!(
        err["title"]
            .as_str()
            .unwrap()
            .contains("the model refuses this prompt"),
        "{err}"
    );
    let t = task(&srv, &hid);
    assert!(
        t["error"]
            .as_str()
            .unwrap_or("")
            .contains("the model refuses"),
        "{t}"
    );
    model.set_script(Script::new(vec![Turn::text("Fine now.")]));
    srv.ok(&[
        "attention",
        "answer",
        err["id"].as_str().unwrap(),
        "--retry",
    ]);
    wait_state(&srv, &hid, "review", STEP);
    // Its sandbox killed: the task fails with the reason.
    let hsb = task(&srv, &hid)["sandbox"].as_str().unwrap().to_owned();
    for pid in atelier_testkit::pids_matching(&hsb) {
        let _ = std::process::Command::new("kill")
            .args(["-9", &pid.to_string()])
            .status();
    }
    let f = wait_state(&srv, &hid, "failed", STEP);
    assert!(f["error"].as_str().unwrap_or("").contains(&hsb), "{f}");
    // Its conversation is still there: the copy kept at its last turn.
    let kept = json_of(&srv.ok(&["--json", "task", "log", &hid]));
    assert_eq!(kept["live"], false, "{kept}");
    assert!(
        kept["messages"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["text"].as_str().unwrap_or("").contains("Fine now.")),
        "{kept}"
    );

    // The key appears in no API answer (the conversations included).
    let conversation = format!("/api/v1/tasks/{id}/messages?limit=1000");
    let hid_conversation = format!("/api/v1/tasks/{hid}/messages");
    for path in [
        "/api/v1/tasks",
        "/api/v1/attention?all=true",
        "/api/v1/workspaces/shop",
        "/api/v1/prebuilds",
        "/api/v1/sandboxes",
        conversation.as_str(),
        hid_conversation.as_str(),
    ] {
        let body = rt.block_on(async {
            let r = srv.api(reqwest::Method::GET, path).send().await.unwrap();
            assert!(r.status().is_success(), "{path}: {}", r.status());
            r.text().await.unwrap()
        });
        assert!(!body.contains(KEY), "the key is in {path}");
    }
    drop(rt);
}
