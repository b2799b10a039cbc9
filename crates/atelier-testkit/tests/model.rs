//! The scripted model server over real HTTP (reqwest, streaming): chunk format, a
//! tool-call turn then the final answer, title requests, error and hang turns.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use atelier_testkit::model::RequestKind;
use atelier_testkit::{ModelServer, Script, ToolCall, Turn};
use futures::StreamExt;
use serde_json::{Value, json};

const TIMEOUT: Duration = Duration::from_secs(10);

async fn server(script: Script) -> ModelServer {
    ModelServer::start("127.0.0.1:0".parse().unwrap(), "/v1", script)
        .await
        .unwrap()
}

fn tools() -> Value {
    json!([{"type": "function", "function": {"name": "bash", "description": "run",
        "parameters": {"type": "object", "properties": {"command": {"type": "string"}}}}}])
}

fn request(messages: Value, stream: bool) -> Value {
    json!({"model": "scripted", "stream": stream, "messages": messages, "tools": tools()})
}

/// Posts `body` with a streamed answer; returns the `data:` payloads, `[DONE]` included.
async fn stream(m: &ModelServer, body: &Value) -> Vec<String> {
    let resp = reqwest::Client::new()
        .post(format!("{}/chat/completions", m.base_url()))
        .json(body)
        .timeout(TIMEOUT)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.headers()["content-type"].to_str().unwrap(),
        "text/event-stream"
    );
    let mut bytes = resp.bytes_stream();
    let mut buf = String::new();
    while let Some(chunk) = bytes.next().await {
        buf.push_str(std::str::from_utf8(&chunk.unwrap()).unwrap());
    }
    buf.split("\n\n")
        .filter(|e| !e.trim().is_empty())
        .map(|e| {
            e.lines()
                .find_map(|l| l.strip_prefix("data: ").or_else(|| l.strip_prefix("data:")))
                .unwrap_or_else(|| panic!("event without data: {e:?}"))
                .to_owned()
        })
        .collect()
}

/// The chunks as JSON, checking the common fields, and `[DONE]` last.
fn chunks(events: &[String]) -> Vec<Value> {
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    let id = chunks[0]["id"].clone();
    for c in &chunks {
        assert_eq!(c["object"], "chat.completion.chunk");
        assert_eq!(c["id"], id, "one id per completion");
        assert_eq!(c["model"], "scripted");
        assert_eq!(c["choices"][0]["index"], 0);
    }
    chunks
}

fn text_of(chunks: &[Value]) -> String {
    chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect()
}

/// Tool calls reassembled from deltas: (id, name, arguments).
fn calls_of(chunks: &[Value]) -> Vec<(String, String, String)> {
    let mut calls: Vec<(String, String, String)> = Vec::new();
    for c in chunks {
        for tc in c["choices"][0]["delta"]["tool_calls"]
            .as_array()
            .into_iter()
            .flatten()
        {
            let i = tc["index"].as_u64().unwrap() as usize;
            if i == calls.len() {
                assert_eq!(tc["type"], "function");
                calls.push((
                    tc["id"].as_str().unwrap().to_owned(),
                    tc["function"]["name"].as_str().unwrap().to_owned(),
                    String::new(),
                ));
            }
            calls[i].2 += tc["function"]["arguments"].as_str().unwrap();
        }
    }
    calls
}

#[tokio::test]
async fn tool_call_turn_then_final_answer_streamed() {
    let m = server(Script::new(vec![
        Turn::tool(
            "bash",
            json!({"command": "echo hi", "description": "say hi"}),
        ),
        Turn::text("All done: the command printed hi."),
    ]))
    .await;
    let mut messages = json!([
        {"role": "system", "content": "you are a test"},
        {"role": "user", "content": [{"type": "text", "text": "run echo hi"}]},
    ]);

    let first = chunks(&stream(&m, &request(messages.clone(), true)).await);
    assert_eq!(first[0]["choices"][0]["delta"]["role"], "assistant");
    let calls = calls_of(&first);
    assert_eq!(calls.len(), 1);
    let (id, name, args) = &calls[0];
    assert_eq!(name, "bash");
    assert_eq!(
        serde_json::from_str::<Value>(args).unwrap(),
        json!({"command": "echo hi", "description": "say hi"})
    );
    // The arguments arrive in more than one delta.
    assert!(
        first
            .iter()
            .filter(|c| !c["choices"][0]["delta"]["tool_calls"].is_null())
            .count()
            >= 2
    );
    let last = first.last().unwrap();
    assert_eq!(last["choices"][0]["finish_reason"], "tool_calls");
    let usage = &last["usage"];
    assert!(usage["prompt_tokens"].as_u64().unwrap() > 0);
    assert!(usage["completion_tokens"].as_u64().unwrap() > 0);
    assert_eq!(
        usage["total_tokens"].as_u64().unwrap(),
        usage["prompt_tokens"].as_u64().unwrap() + usage["completion_tokens"].as_u64().unwrap()
    );
    for c in &first[..first.len() - 1] {
        assert!(c["choices"][0]["finish_reason"].is_null());
    }

    // The client runs the tool and sends the result back: step 1, the final answer.
    messages.as_array_mut().unwrap().extend([
        json!({"role": "assistant", "content": null, "tool_calls": [
            {"id": id, "type": "function", "function": {"name": name, "arguments": args}}]}),
        json!({"role": "tool", "tool_call_id": id, "content": "hi\n"}),
    ]);
    let second = chunks(&stream(&m, &request(messages.clone(), true)).await);
    assert_eq!(text_of(&second), "All done: the command printed hi.");
    assert!(
        second
            .iter()
            .filter(|c| c["choices"][0]["delta"]["content"]
                .as_str()
                .is_some_and(|t| !t.is_empty()))
            .count()
            > 1,
        "text arrives in several deltas"
    );
    assert_eq!(
        second.last().unwrap()["choices"][0]["finish_reason"],
        "stop"
    );
    assert!(calls_of(&second).is_empty());

    let seen = m.requests();
    assert_eq!(seen.len(), 2);
    assert_eq!(seen[0].kind, RequestKind::Step(0));
    assert_eq!(seen[1].kind, RequestKind::Step(1));
    assert!(seen[0].stream);
    assert_eq!(seen[0].path, "/v1/chat/completions");
    assert_eq!(seen[0].last_user_text().as_deref(), Some("run echo hi"));
    assert_eq!(seen[0].tool_names(), ["bash"]);
    assert_eq!(seen[1].tool_results(), ["hi\n"]);

    // A new user prompt starts the script again.
    messages.as_array_mut().unwrap().extend([
        json!({"role": "assistant", "content": "All done: the command printed hi."}),
        json!({"role": "user", "content": "again"}),
    ]);
    let third = chunks(&stream(&m, &request(messages, true)).await);
    assert_eq!(calls_of(&third)[0].1, "bash");
}

#[tokio::test]
async fn non_streaming_answers_and_several_calls() {
    let m = server(Script::new(vec![
        Turn::ToolCalls {
            text: "Reading two files.".into(),
            calls: vec![
                ToolCall::new("read", json!({"filePath": "/a"})),
                ToolCall::new("read", json!({"filePath": "/b"})),
            ],
        },
        Turn::text("done"),
    ]))
    .await;
    let body = request(json!([{"role": "user", "content": "read"}]), false);
    let resp: Value = reqwest::Client::new()
        .post(format!("{}/chat/completions", m.base_url()))
        .json(&body)
        .timeout(TIMEOUT)
        .send()
        .await
        .unwrap()
        .error_for_status()
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(resp["object"], "chat.completion");
    let choice = &resp["choices"][0];
    assert_eq!(choice["finish_reason"], "tool_calls");
    assert_eq!(choice["message"]["role"], "assistant");
    assert_eq!(choice["message"]["content"], "Reading two files.");
    let calls = choice["message"]["tool_calls"].as_array().unwrap();
    assert_eq!(calls.len(), 2);
    assert_ne!(calls[0]["id"], calls[1]["id"]);
    assert_eq!(calls[1]["function"]["name"], "read");
    let args: Value =
        serde_json::from_str(calls[1]["function"]["arguments"].as_str().unwrap()).unwrap();
    assert_eq!(args, json!({"filePath": "/b"}));
    assert!(resp["usage"]["total_tokens"].as_u64().unwrap() > 0);

    // Streamed, the two calls keep their indexes.
    let body = request(json!([{"role": "user", "content": "read"}]), true);
    let streamed = chunks(&stream(&m, &body).await);
    assert_eq!(text_of(&streamed), "Reading two files.");
    let calls = calls_of(&streamed);
    assert_eq!(calls.len(), 2);
    assert_eq!(
        serde_json::from_str::<Value>(&calls[0].2).unwrap(),
        json!({"filePath": "/a"})
    );
}

#[tokio::test]
async fn requests_without_tools_are_title_generation() {
    let m = server(
        Script::new(vec![Turn::tool("bash", json!({"command": "true"}))]).with_title("Echo test"),
    )
    .await;
    let title_req = json!({"model": "scripted", "stream": true, "messages": [
        {"role": "system", "content": "Generate a title"},
        {"role": "user", "content": "run echo hi"}]});
    let events = chunks(&stream(&m, &title_req).await);
    assert_eq!(text_of(&events), "Echo test");
    assert_eq!(
        events.last().unwrap()["choices"][0]["finish_reason"],
        "stop"
    );
    // The title request does not consume a step: the real request still gets step 0.
    let events = chunks(
        &stream(
            &m,
            &request(json!([{"role": "user", "content": "x"}]), true),
        )
        .await,
    );
    assert_eq!(calls_of(&events)[0].1, "bash");
    let kinds: Vec<RequestKind> = m.requests().iter().map(|r| r.kind).collect();
    assert_eq!(kinds, [RequestKind::Title, RequestKind::Step(0)]);
}

#[tokio::test]
async fn error_turns_fail_then_the_step_answers() {
    let m = server(Script::new(vec![
        Turn::error_times(429, "slow down", 1),
        Turn::error_times(500, "boom", 1),
        Turn::text("recovered"),
    ]))
    .await;
    let body = request(json!([{"role": "user", "content": "x"}]), true);
    let post = || {
        reqwest::Client::new()
            .post(format!("{}/chat/completions", m.base_url()))
            .json(&body)
            .timeout(TIMEOUT)
            .send()
    };
    let r = post().await.unwrap();
    assert_eq!(r.status(), 429);
    let e: Value = r.json().await.unwrap();
    assert_eq!(e["error"]["message"], "slow down");
    let r = post().await.unwrap();
    assert_eq!(r.status(), 500);
    assert_eq!(r.json::<Value>().await.unwrap()["error"]["message"], "boom");
    assert_eq!(text_of(&chunks(&stream(&m, &body).await)), "recovered");

    // An error without a count fails every time; an exhausted script is a clear 500.
    m.set_script(Script::new(vec![Turn::error(500, "always")]));
    for _ in 0..2 {
        assert_eq!(post().await.unwrap().status(), 500);
    }
    m.set_script(Script::new(vec![]));
    let r = post().await.unwrap();
    assert_eq!(r.status(), 500);
    let msg = r.json::<Value>().await.unwrap()["error"]["message"].clone();
    assert!(
        msg.as_str().unwrap().contains("no turn for step 0"),
        "{msg}"
    );
}

#[tokio::test]
async fn hang_turn_never_answers_but_is_recorded() {
    let m = server(Script::new(vec![Turn::Hang])).await;
    let mut arrivals = m.subscribe();
    let body = request(json!([{"role": "user", "content": "x"}]), true);
    let url = format!("{}/chat/completions", m.base_url());
    let pending = tokio::spawn(async move {
        reqwest::Client::new()
            .post(url)
            .json(&body)
            .timeout(Duration::from_millis(800))
            .send()
            .await
    });
    // The notification fires as the request arrives, before any answer.
    tokio::time::timeout(TIMEOUT, arrivals.changed())
        .await
        .expect("a request notification")
        .unwrap();
    assert_eq!(*arrivals.borrow(), 1);
    let seen = m.wait_requests(1, TIMEOUT).await.expect("one request");
    assert_eq!(seen[0].kind, RequestKind::Step(0));
    let err = pending
        .await
        .unwrap()
        .expect_err("a hanging turn must not answer");
    assert!(err.is_timeout(), "{err}");
    // Nothing else arrived in the meantime.
    assert!(
        m.wait_requests(2, Duration::from_millis(100))
            .await
            .is_none()
    );
}

#[tokio::test]
async fn invalid_bodies_get_a_400_and_models_are_listed() {
    let m = server(Script::default()).await;
    let r = reqwest::Client::new()
        .post(format!("{}/chat/completions", m.base_url()))
        .body("not json")
        .timeout(TIMEOUT)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(m.requests()[0].kind, RequestKind::Invalid);
    let models: Value = reqwest::get(format!("{}/models", m.base_url()))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(models["data"][0]["id"], "scripted");
}
