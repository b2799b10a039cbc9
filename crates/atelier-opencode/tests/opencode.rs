//! The client against the real OpenCode (`opencode serve` 1.18.33 on the host) and the
//! test kit's scripted model: no mocks.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use atelier_opencode::{
    Action, Client, Connector, Event, EventStream, Io, Part, PermissionRule, Prompt, Reply,
    SessionStatus,
};
use atelier_testkit::{ModelServer, OpenCodeHost, Script, Turn, opencode_bin, poll_until_async};
use futures::future::BoxFuture;
use futures::{FutureExt as _, StreamExt as _};
use serde_json::{Value, json};

/// Deadline for one agent step (a model call and a tool) on this 2-core machine.
const STEP: Duration = Duration::from_secs(60);

/// Waits for the first event `pick` accepts, failing on stream errors and the deadline.
async fn next_matching<T>(
    events: &mut EventStream,
    what: &str,
    mut pick: impl FnMut(&Event) -> Option<T>,
) -> T {
    let deadline = tokio::time::Instant::now() + STEP;
    loop {
        let item = tokio::time::timeout_at(deadline, events.next())
            .await
            .unwrap_or_else(|_| panic!("timed out after {STEP:?} waiting for {what}"))
            .unwrap_or_else(|| panic!("event stream ended waiting for {what}"));
        match item {
            Ok(e) => {
                // Shown when a test fails: what OpenCode did instead.
                eprintln!("event: {e:?}");
                if let Some(v) = pick(&e) {
                    return v;
                }
            }
            Err(atelier_opencode::Error::Decode(m)) => panic!("undecodable event: {m}"),
            Err(e) => panic!("event stream failed waiting for {what}: {e}"),
        }
    }
}

async fn start(script: Script, permission: Value) -> Option<(ModelServer, OpenCodeHost, Client)> {
    let bin = opencode_bin()?;
    let model = ModelServer::start("127.0.0.1:0".parse().expect("addr"), "/v1", script)
        .await
        .expect("model server");
    let oc = OpenCodeHost::start(&bin, &model.base_url(), permission).await;
    let dir = oc.project_dir().to_str().expect("utf-8 dir").to_owned();
    let client = Client::tcp(oc.addr(), oc.password(), &dir);
    Some((model, oc, client))
}

async fn connected(client: &Client) -> EventStream {
    let mut events = client.events().await.expect("open event stream");
    let first = tokio::time::timeout(STEP, events.next())
        .await
        .expect("first event in time")
        .expect("a first event")
        .expect("first event decodes");
    assert_eq!(first, Event::Connected);
    events
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_says_the_version() {
    let Some((_model, oc, client)) = start(Script::default(), Value::Null).await else {
        return;
    };
    let h = client.health().await.expect("health");
    assert!(h.healthy);
    assert_eq!(h.version, atelier_testkit::opencode::OPENCODE_VERSION);
    // A wrong password is OpenCode's 401, a typed status.
    // No directory: OpenCode's own working directory is used.
    let plain = Client::tcp(oc.addr(), oc.password(), "");
    let s = plain.create_session("cwd", &[]).await.expect("session");
    assert_eq!(std::path::Path::new(&s.directory), oc.project_dir());
    let bad = Client::tcp(oc.addr(), "wrong", "/");
    match bad.health().await {
        Err(atelier_opencode::Error::Status { status: 401, .. }) => {}
        other => panic!("expected 401, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_turn_through_permission_question_and_todos() {
    let script = Script::new(vec![
        Turn::tool(
            "bash",
            json!({"command": "echo hello-from-bash", "description": "Print a greeting"}),
        ),
        Turn::tool(
            "question",
            json!({"questions": [{
                "question": "Which colour should the button be?",
                "header": "Colour",
                "options": [
                    {"label": "Blue", "description": "Like the sea"},
                    {"label": "Red", "description": "Like fire"},
                ],
            }]}),
        ),
        Turn::tool(
            "todowrite",
            json!({"todos": [
                {"content": "Paint the button blue", "status": "in_progress", "priority": "high"},
                {"content": "Write the changelog", "status": "pending", "priority": "low"},
            ]}),
        ),
        Turn::text("All done: the button is blue."),
    ]);
    let Some((model, _oc, client)) = start(script, Value::Null).await else {
        return;
    };
    let mut events = connected(&client).await;
    let rules = [PermissionRule::new("bash", "*", Action::Ask)];
    let session = client
        .create_session("flow", &rules)
        .await
        .expect("create session");
    assert!(session.id.starts_with("ses"), "{session:?}");
    client
        .prompt_async(&session.id, &Prompt::text("Paint the button"))
        .await
        .expect("prompt");

    // bash asks: the event arrives and the request is listed.
    let sid = session.id.clone();
    let per = next_matching(&mut events, "permission.asked", |e| match e {
        Event::PermissionAsked(r) if r.session_id == sid => Some(r.clone()),
        _ => None,
    })
    .await;
    assert_eq!(per.permission, "bash");
    assert!(
        per.patterns.iter().any(|p| p.contains("hello-from-bash")),
        "{per:?}"
    );
    let listed = client.permissions().await.expect("list permissions");
    assert!(listed.iter().any(|p| p.id == per.id), "{listed:?}");
    let statuses = client.statuses().await.expect("statuses");
    assert_eq!(statuses.get(&session.id), Some(&SessionStatus::Busy));
    client
        .reply_permission(&per.id, Reply::Once, None)
        .await
        .expect("reply once");

    // The question: event, listed, answered with a label.
    let q = next_matching(&mut events, "question.asked", |e| match e {
        Event::QuestionAsked(q) if q.session_id == sid => Some(q.clone()),
        _ => None,
    })
    .await;
    assert_eq!(q.questions.len(), 1);
    assert_eq!(q.questions[0].options[0].label, "Blue");
    // By now the model has seen the bash result.
    let reqs = model.requests();
    let bash_result = reqs
        .iter()
        .flat_map(|r| r.tool_results())
        .find(|t| t.contains("hello-from-bash"));
    assert!(bash_result.is_some(), "the model never got bash's output");
    let listed = client.questions().await.expect("list questions");
    assert!(listed.iter().any(|x| x.id == q.id), "{listed:?}");
    client
        .reply_question(&q.id, vec![vec!["Blue".into()]])
        .await
        .expect("reply to question");

    let todos = next_matching(&mut events, "todo.updated", |e| match e {
        Event::TodoUpdated { session, todos } if *session == sid => Some(todos.clone()),
        _ => None,
    })
    .await;
    assert_eq!(todos.len(), 2, "{todos:?}");
    assert_eq!(todos[0].content, "Paint the button blue");
    assert_eq!(todos[0].status, "in_progress");
    next_matching(&mut events, "session.idle", |e| {
        matches!(e, Event::SessionIdle { session } if *session == sid).then_some(())
    })
    .await;

    // The model saw the chosen label as the question's result.
    let reqs = model.requests();
    assert!(
        reqs.iter()
            .flat_map(|r| r.tool_results())
            .any(|t| t.contains("Blue")),
        "the model never got the answer: {:?}",
        reqs.last().map(|r| r.tool_results())
    );
    assert_eq!(client.todos(&session.id).await.expect("todos"), todos);

    let messages = client.messages(&session.id).await.expect("messages");
    let total: u64 = messages.iter().map(|m| m.tokens.total()).sum();
    assert!(total > 0, "no tokens counted: {messages:?}");
    assert!(messages.iter().all(|m| m.created.is_some()), "{messages:?}");
    // A limit keeps the newest messages, oldest first.
    let newest = client
        .messages_limited(&session.id, Some(2))
        .await
        .expect("limited messages");
    let ids = |v: &[atelier_opencode::Message]| v.iter().map(|m| m.id.clone()).collect::<Vec<_>>();
    assert!(messages.len() > 2, "{messages:?}");
    assert_eq!(ids(&newest), ids(&messages[messages.len() - 2..]));
    let tools: Vec<&str> = messages
        .iter()
        .flat_map(|m| &m.parts)
        .filter_map(|p| match p {
            Part::Tool { tool, status, .. } if status == "completed" => Some(tool.as_str()),
            _ => None,
        })
        .collect();
    assert_eq!(tools, ["bash", "question", "todowrite"], "{messages:?}");
    let last = messages.last().expect("a message");
    assert_eq!(last.role, "assistant");
    assert!(
        last.parts
            .iter()
            .any(|p| matches!(p, Part::Text { text } if text.contains("the button is blue"))),
        "{last:?}"
    );
    assert!(messages.iter().all(|m| m.error.is_none()), "{messages:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reject_with_a_message_lets_the_agent_continue() {
    let script = Script::new(vec![
        Turn::tool(
            "bash",
            json!({"command": "rm -rf build", "description": "Remove the build dir"}),
        ),
        Turn::text("Understood, I will not remove it."),
    ]);
    let Some((model, _oc, client)) = start(script, json!({"bash": "ask"})).await else {
        return;
    };
    let mut events = connected(&client).await;
    // No session rules: OpenCode's config (`bash: ask`) decides.
    let session = client.create_session("reject", &[]).await.expect("session");
    client
        .prompt_async(&session.id, &Prompt::text("Clean up"))
        .await
        .expect("prompt");
    let sid = session.id.clone();
    let per = next_matching(&mut events, "permission.asked", |e| match e {
        Event::PermissionAsked(r) if r.session_id == sid => Some(r.clone()),
        _ => None,
    })
    .await;
    client
        .reply_permission(
            &per.id,
            Reply::Reject,
            Some("never delete build, use make clean"),
        )
        .await
        .expect("reject");
    let reply = next_matching(&mut events, "permission.replied", |e| match e {
        Event::PermissionReplied { id, reply, .. } if *id == per.id => Some(reply.clone()),
        _ => None,
    })
    .await;
    assert_eq!(reply, "reject");
    next_matching(&mut events, "session.idle", |e| {
        matches!(e, Event::SessionIdle { session } if *session == sid).then_some(())
    })
    .await;
    assert!(
        model
            .requests()
            .iter()
            .flat_map(|r| r.tool_results())
            .any(|t| t.contains("use make clean")),
        "the model never got the rejection message"
    );
    let messages = client.messages(&session.id).await.expect("messages");
    assert!(
        messages
            .iter()
            .flat_map(|m| &m.parts)
            .any(|p| matches!(p, Part::Text { text } if text.contains("I will not remove it"))),
        "{messages:?}"
    );
    // The request is gone; answering it again, or an unknown id, is "not found".
    assert!(client.permissions().await.expect("list").is_empty());
    for id in [per.id.as_str(), "per_doesnotexist0000000000"] {
        let e = client
            .reply_permission(id, Reply::Once, None)
            .await
            .expect_err("unknown permission");
        assert!(e.is_not_found(), "{id}: {e:?}");
    }
    let e = client
        .reply_question("que_doesnotexist0000000000", vec![vec!["x".into()]])
        .await
        .expect_err("unknown question");
    assert!(e.is_not_found(), "{e:?}");
    let e = client
        .reject_question("que_doesnotexist0000000000")
        .await
        .expect_err("unknown question");
    assert!(e.is_not_found(), "{e:?}");
    // An unknown session is OpenCode's NotFoundError with its message.
    match client.todos("ses_doesnotexist").await {
        Err(atelier_opencode::Error::NotFound(m)) => {
            assert!(m.contains("ses_doesnotexist"), "{m}")
        }
        other => panic!("expected NotFound, got {other:?}"),
    }
    // An id of the wrong kind is refused by OpenCode's validation (400), typed too.
    match client.reply_permission("nope", Reply::Once, None).await {
        Err(atelier_opencode::Error::Status { status: 400, body }) => {
            assert!(body.contains("per"), "{body}")
        }
        other => panic!("expected a 400, got {other:?}"),
    }
}

/// A connector handing out in-memory duplex streams, each piped to a TCP connection:
/// the client never sees a socket, like a guest stream through the agent.
struct DuplexToTcp(std::net::SocketAddr);

impl Connector for DuplexToTcp {
    fn connect(&self) -> BoxFuture<'static, io::Result<Box<dyn Io>>> {
        let addr = self.0;
        async move {
            let mut tcp = tokio::net::TcpStream::connect(addr).await?;
            let (near, mut far) = tokio::io::duplex(16 * 1024);
            tokio::spawn(async move {
                let _ = tokio::io::copy_bidirectional(&mut far, &mut tcp).await;
            });
            Ok(Box::new(near) as Box<dyn Io>)
        }
        .boxed()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_non_tcp_connector_carries_calls_and_events() {
    let script = Script::new(vec![Turn::text("Hello through a pipe.")]);
    let Some((_model, oc, _)) = start(script, Value::Null).await else {
        return;
    };
    let dir = oc.project_dir().to_str().expect("utf-8").to_owned();
    let client = Client::new(Arc::new(DuplexToTcp(oc.addr())), oc.password(), &dir);
    assert!(client.health().await.expect("health").healthy);
    let mut events = connected(&client).await;
    let session = client.create_session("pipe", &[]).await.expect("session");
    assert_eq!(session.directory, dir);
    client
        .prompt_async(&session.id, &Prompt::text("Say hello"))
        .await
        .expect("prompt");
    let sid = session.id.clone();
    next_matching(&mut events, "session.idle", |e| {
        matches!(e, Event::SessionIdle { session } if *session == sid).then_some(())
    })
    .await;
    let messages = client.messages(&session.id).await.expect("messages");
    assert!(
        messages
            .iter()
            .flat_map(|m| &m.parts)
            .any(|p| matches!(p, Part::Text { text } if text.contains("through a pipe"))),
        "{messages:?}"
    );
    // abort of an idle session is fine; statuses no longer list it as busy.
    client.abort(&session.id).await.expect("abort");
    poll_until_async(STEP, "the session to leave busy", || {
        let c = client.clone();
        let id = session.id.clone();
        async move {
            let s = c.statuses().await.ok()?;
            (s.get(&id) != Some(&SessionStatus::Busy)).then_some(())
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_model_shows_as_retry_and_abort_ends_the_turn() {
    // OpenCode 1.18 retries every provider error (even a 400) with back-off.
    let script = Script::new(vec![Turn::error(400, "the scripted model refuses")]);
    let Some((_model, _oc, client)) = start(script, Value::Null).await else {
        return;
    };
    let mut events = connected(&client).await;
    let session = client.create_session("fail", &[]).await.expect("session");
    client
        .prompt_async(&session.id, &Prompt::text("Try"))
        .await
        .expect("prompt");
    let sid = session.id.clone();
    let (attempt, message) = next_matching(&mut events, "a retry status", |e| match e {
        Event::SessionStatus {
            session,
            status: SessionStatus::Retry { attempt, message },
        } if *session == sid => Some((*attempt, message.clone())),
        _ => None,
    })
    .await;
    assert_eq!(attempt, 1);
    assert!(message.contains("the scripted model refuses"), "{message}");
    assert!(matches!(
        client.statuses().await.expect("statuses").get(&sid),
        Some(SessionStatus::Retry { .. } | SessionStatus::Busy)
    ));
    // Abort ends the turn: idle, with no session.error in 1.18.33.
    client.abort(&session.id).await.expect("abort");
    next_matching(&mut events, "session.idle after abort", |e| {
        matches!(e, Event::SessionIdle { session } if *session == sid).then_some(())
    })
    .await;
    let statuses = client.statuses().await.expect("statuses");
    assert!(
        !matches!(
            statuses.get(&sid),
            Some(SessionStatus::Retry { .. } | SessionStatus::Busy)
        ),
        "{statuses:?}"
    );
    let messages = client.messages(&session.id).await.expect("messages");
    let last = messages.last().expect("a message");
    assert_eq!(last.role, "assistant");
    // Measured with 1.18.33: the aborted retry leaves an empty assistant message with no
    // error, so an abort is seen by who called it, not in the messages.
    assert!(last.parts.is_empty() && last.error.is_none(), "{last:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejecting_a_question_fails_the_tool_and_ends_the_turn() {
    let script = Script::new(vec![
        Turn::tool(
            "question",
            json!({"questions": [{
                "question": "Deploy now?",
                "header": "Deploy",
                "options": [{"label": "Yes", "description": "Deploy"}, {"label": "No", "description": "Wait"}],
            }]}),
        ),
        Turn::text("never asked: a dismissed question ends the turn"),
    ]);
    let Some((model, _oc, client)) = start(script, Value::Null).await else {
        return;
    };
    let mut events = connected(&client).await;
    let session = client
        .create_session("dismiss", &[])
        .await
        .expect("session");
    client
        .prompt_async(&session.id, &Prompt::text("Deploy?"))
        .await
        .expect("prompt");
    let sid = session.id.clone();
    let q = next_matching(&mut events, "question.asked", |e| match e {
        Event::QuestionAsked(q) if q.session_id == sid => Some(q.clone()),
        _ => None,
    })
    .await;
    client
        .reject_question(&q.id)
        .await
        .expect("reject question");
    let rejected = next_matching(&mut events, "question.rejected", |e| match e {
        Event::QuestionRejected { session, id } if *session == sid => Some(id.clone()),
        _ => None,
    })
    .await;
    assert_eq!(rejected, q.id);
    next_matching(&mut events, "session.idle", |e| {
        matches!(e, Event::SessionIdle { session } if *session == sid).then_some(())
    })
    .await;
    assert!(client.questions().await.expect("questions").is_empty());
    let messages = client.messages(&session.id).await.expect("messages");
    let (status, output) = messages
        .iter()
        .flat_map(|m| &m.parts)
        .find_map(|p| match p {
            Part::Tool {
                tool,
                status,
                output,
                ..
            } if tool == "question" => Some((status.clone(), output.clone())),
            _ => None,
        })
        .expect("a question tool part");
    assert_eq!(status, "error");
    assert!(
        output.is_some_and(|o| o.contains("dismissed")),
        "{messages:?}"
    );
    // Measured with 1.18.33: unlike a permission reject with a message, a dismissed
    // question stops the turn; the model is not asked again.
    let steps = model
        .requests()
        .iter()
        .filter(|r| matches!(r.kind, atelier_testkit::model::RequestKind::Step(_)))
        .count();
    assert_eq!(steps, 1);
}
