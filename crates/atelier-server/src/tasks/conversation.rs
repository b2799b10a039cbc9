//! A task's conversation as the API shows it: OpenCode's session messages, each
//! reduced to its text, its tool calls (summarised, outputs cut to a few KiB), and
//! its usage. Read live from OpenCode while the task's sandbox runs; a copy of the
//! newest messages is kept on the task for when it does not.

use atelier_opencode as oc;
use serde::{Deserialize, Serialize};

/// Messages a request gets when it names no limit.
pub const DEFAULT_LIMIT: usize = 200;
/// Most messages one request may ask for.
pub const MAX_LIMIT: usize = 1000;
/// Messages kept on the task for when its sandbox is gone.
pub const KEPT_MESSAGES: usize = 200;
/// Most bytes the kept copy takes (oldest messages dropped first).
const KEPT_MAX_BYTES: usize = 2 << 20;
/// A tool call's output is cut here (bytes).
pub const MAX_TOOL_OUTPUT: usize = 4096;
/// A tool call's input summary is cut here (bytes).
const MAX_INPUT_SUMMARY: usize = 200;
/// A message's text is cut here (bytes).
const MAX_TEXT: usize = 64 * 1024;

/// One tool call of an assistant message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ToolCallView {
    /// OpenCode's call id.
    pub call_id: String,
    /// The tool: `bash`, `write`, `edit`, `read`, `question`, `todowrite`...
    pub tool: String,
    /// `pending`, `running`, `completed` or `error`.
    pub status: String,
    /// The tool's one-line title, when it gave one.
    pub title: Option<String>,
    /// What it was called with, in short: the command, the file path, the URL, or
    /// the arguments as JSON (at most 200 bytes).
    pub input: String,
    /// Its output (completed) or error (error), at most 4 KiB.
    pub output: Option<String>,
    /// The output was cut.
    pub output_truncated: bool,
}

/// One message of a task's session.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct MessageView {
    /// OpenCode's message id (`msg_…`).
    pub id: String,
    /// `user` (the prompts, follow-ups) or `assistant` (the agent).
    pub role: String,
    /// Created, ms since epoch.
    pub created_at: Option<i64>,
    /// Finished (assistant messages), ms since epoch.
    pub completed_at: Option<i64>,
    /// `provider/model` that answered (assistant messages).
    pub model: Option<String>,
    /// The text parts, joined by blank lines (at most 64 KiB).
    pub text: String,
    /// The tool calls, in order.
    pub tools: Vec<ToolCallView>,
    /// Input tokens (assistant messages).
    pub tokens_in: Option<i64>,
    /// Output and reasoning tokens (assistant messages).
    pub tokens_out: Option<i64>,
    /// Cost as the provider reports it, USD (assistant messages).
    pub cost: Option<f64>,
    /// The error that ended the message, if any.
    pub error: Option<String>,
}

/// A task's conversation, oldest message first.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Conversation {
    /// The task.
    pub task: String,
    /// Its OpenCode session, once it has one.
    pub session: Option<String>,
    /// Read from OpenCode just now (the sandbox runs); `false`: the copy kept on
    /// the task (its newest 200 messages), from `captured_at`.
    pub live: bool,
    /// When the kept copy was read (ms since epoch); `None` when live, or when
    /// nothing was kept (the task never got a session).
    pub captured_at: Option<i64>,
    /// Older messages exist than those returned.
    pub truncated: bool,
    /// The newest `limit` messages, oldest first.
    pub messages: Vec<MessageView>,
}

fn cut(s: &str, max: usize) -> (String, bool) {
    if s.len() <= max {
        return (s.to_owned(), false);
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    (s[..end].to_owned(), true)
}

fn input_summary(input: &serde_json::Value) -> String {
    let named = ["command", "filePath", "path", "url", "pattern", "query"]
        .iter()
        .find_map(|k| input.get(*k).and_then(|v| v.as_str()));
    let text = match named {
        Some(s) => s.to_owned(),
        None if input.is_null() => String::new(),
        None => input.to_string(),
    };
    let (mut s, was_cut) = cut(&text, MAX_INPUT_SUMMARY);
    if was_cut {
        s.push('…');
    }
    s
}

/// The API's view of one OpenCode message.
pub fn render(m: &oc::Message) -> MessageView {
    let mut texts = Vec::new();
    let mut tools = Vec::new();
    for p in &m.parts {
        match p {
            oc::Part::Text { text } if !text.trim().is_empty() => texts.push(text.as_str()),
            oc::Part::Tool {
                call_id,
                tool,
                status,
                title,
                input,
                output,
            } => {
                let (output, output_truncated) = match output {
                    Some(o) => {
                        let (o, c) = cut(o, MAX_TOOL_OUTPUT);
                        (Some(o), c)
                    }
                    None => (None, false),
                };
                tools.push(ToolCallView {
                    call_id: call_id.clone(),
                    tool: tool.clone(),
                    status: status.clone(),
                    title: title.clone().filter(|t| !t.is_empty()),
                    input: input_summary(input),
                    output,
                    output_truncated,
                });
            }
            _ => {}
        }
    }
    let assistant = m.role == "assistant";
    let int = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
    MessageView {
        id: m.id.clone(),
        role: m.role.clone(),
        created_at: m.created,
        completed_at: m.completed,
        model: m.model.clone(),
        text: cut(&texts.join("\n\n"), MAX_TEXT).0,
        tools,
        tokens_in: assistant.then(|| int(m.tokens.input)),
        tokens_out: assistant.then(|| int(m.tokens.output.saturating_add(m.tokens.reasoning))),
        cost: assistant.then_some(m.cost),
        error: m.error.clone(),
    }
}

/// The newest `limit` of `all` (oldest first) and whether older ones were left out.
pub fn newest(mut all: Vec<MessageView>, limit: usize) -> (Vec<MessageView>, bool) {
    let cut = all.len().saturating_sub(limit);
    (all.split_off(cut), cut > 0)
}

/// The copy kept on the task: the newest [`KEPT_MESSAGES`] messages, fewer if they
/// would take more than 2 MiB; JSON `{"truncated": bool, "messages": [...]}`.
pub fn kept_copy(msgs: &[oc::Message]) -> String {
    let views: Vec<MessageView> = msgs.iter().map(render).collect();
    let (mut views, mut truncated) = newest(views, KEPT_MESSAGES);
    loop {
        let json = serde_json::json!({"truncated": truncated, "messages": views}).to_string();
        if json.len() <= KEPT_MAX_BYTES || views.is_empty() {
            return json;
        }
        let drop = views.len().div_ceil(4);
        views.drain(..drop);
        truncated = true;
    }
}

/// Reads a kept copy back: (messages, truncated).
pub fn read_kept(json: &str) -> (Vec<MessageView>, bool) {
    #[derive(Deserialize)]
    struct Kept {
        truncated: bool,
        messages: Vec<MessageView>,
    }
    serde_json::from_str::<Kept>(json)
        .map(|k| (k.messages, k.truncated))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn msg(id: &str, role: &str, parts: Vec<oc::Part>) -> oc::Message {
        oc::Message {
            id: id.into(),
            role: role.into(),
            created: Some(1),
            completed: None,
            model: None,
            cost: 0.25,
            tokens: oc::Tokens {
                input: 10,
                output: 3,
                reasoning: 2,
                ..Default::default()
            },
            error: None,
            parts,
        }
    }

    #[test]
    fn messages_are_reduced_to_text_tools_and_usage() {
        let m = msg(
            "msg_1",
            "assistant",
            vec![
                oc::Part::Other {
                    kind: "step-start".into(),
                },
                oc::Part::Text {
                    text: "Looking.".into(),
                },
                oc::Part::Tool {
                    call_id: "c1".into(),
                    tool: "bash".into(),
                    status: "completed".into(),
                    title: Some("List files".into()),
                    input: json!({"command": "ls -la", "description": "List files"}),
                    output: Some("x".repeat(MAX_TOOL_OUTPUT + 10)),
                },
                oc::Part::Tool {
                    call_id: "c2".into(),
                    tool: "todowrite".into(),
                    status: "running".into(),
                    title: None,
                    input: json!({"todos": ["y".repeat(500)]}),
                    output: None,
                },
                oc::Part::Text {
                    text: "Done.".into(),
                },
            ],
        );
        let v = render(&m);
        assert_eq!(v.text, "Looking.\n\nDone.");
        assert_eq!(
            (v.tokens_in, v.tokens_out, v.cost),
            (Some(10), Some(5), Some(0.25))
        );
        assert_eq!(v.tools[0].input, "ls -la");
        assert_eq!(
            v.tools[0].output.as_ref().map(String::len),
            Some(MAX_TOOL_OUTPUT)
        );
        assert!(v.tools[0].output_truncated);
        assert!(v.tools[1].input.starts_with("{\"todos\"") && v.tools[1].input.ends_with('…'));
        assert!(v.tools[1].input.len() <= MAX_INPUT_SUMMARY + 3);
        let u = render(&msg("msg_0", "user", vec![]));
        assert_eq!((u.tokens_in, u.cost), (None, None));
    }

    #[test]
    fn the_newest_are_kept_oldest_first() {
        let all: Vec<oc::Message> = (0..250)
            .map(|i| msg(&format!("msg_{i:03}"), "user", vec![]))
            .collect();
        let (views, cut) = newest(all.iter().map(render).collect(), 3);
        assert!(cut);
        assert_eq!(
            views.iter().map(|v| v.id.as_str()).collect::<Vec<_>>(),
            ["msg_247", "msg_248", "msg_249"]
        );
        let (kept, truncated) = read_kept(&kept_copy(&all));
        assert!(truncated);
        assert_eq!(kept.len(), KEPT_MESSAGES);
        assert_eq!(kept[0].id, "msg_050");
        let (none, t) = read_kept("not json");
        assert!(none.is_empty() && !t);
        // Oversized messages: fewer kept, never more than the byte cap.
        let big: Vec<oc::Message> = (0..100)
            .map(|i| {
                msg(
                    &format!("msg_{i}"),
                    "assistant",
                    vec![oc::Part::Text {
                        text: "z".repeat(60 * 1024),
                    }],
                )
            })
            .collect();
        let json = kept_copy(&big);
        assert!(json.len() <= KEPT_MAX_BYTES, "{}", json.len());
        assert!(read_kept(&json).1);
    }
}
