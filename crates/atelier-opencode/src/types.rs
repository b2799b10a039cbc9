//! What the client sends and receives, in OpenCode 1.18's JSON shapes (camelCase on the
//! wire, snake_case here).

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// `GET /global/health`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Health {
    /// Always true when OpenCode answers.
    pub healthy: bool,
    /// OpenCode's version (`1.18.33`).
    pub version: String,
}

/// What a permission rule decides.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    /// Run without asking.
    Allow,
    /// Stop and ask (a [`PermissionRequest`] appears).
    Ask,
    /// Refuse; the tool call fails.
    Deny,
}

/// One rule of a session's permission ruleset: `permission` is the tool's permission
/// name (`bash`, `edit`, `read`, `webfetch`, `*`...), `pattern` a glob over what it
/// touches (`*`, `git *`, a path).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PermissionRule {
    /// The permission name.
    pub permission: String,
    /// The glob the rule applies to.
    pub pattern: String,
    /// What it decides.
    pub action: Action,
}

impl PermissionRule {
    /// A rule for `permission` over `pattern`.
    pub fn new(permission: &str, pattern: &str, action: Action) -> PermissionRule {
        PermissionRule {
            permission: permission.to_owned(),
            pattern: pattern.to_owned(),
            action,
        }
    }
}

/// The session as created (`POST /session`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct SessionInfo {
    /// `ses_...`.
    pub id: String,
    /// Its title.
    pub title: String,
    /// The project directory it works in.
    pub directory: String,
}

/// A provider/model pair (`local`, `scripted`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ModelRef {
    /// The provider id of OpenCode's config (`anthropic`, `local`).
    #[serde(rename = "providerID")]
    pub provider_id: String,
    /// The model id within it.
    #[serde(rename = "modelID")]
    pub model_id: String,
}

/// A user prompt for [`crate::Client::prompt_async`].
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Prompt {
    /// The prompt text.
    pub text: String,
    /// The model (OpenCode's configured `model` when `None`).
    pub model: Option<ModelRef>,
    /// The agent (`build`, `plan`, or a custom one; `build` when `None`).
    pub agent: Option<String>,
    /// The model variant (reasoning effort, provider-specific).
    pub variant: Option<String>,
}

impl Prompt {
    /// A prompt of `text` with OpenCode's defaults.
    pub fn text(text: impl Into<String>) -> Prompt {
        Prompt {
            text: text.into(),
            ..Prompt::default()
        }
    }
}

/// A session's run state (`GET /session/status`, `session.status` events).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum SessionStatus {
    /// Not running.
    Idle,
    /// Running a turn.
    Busy,
    /// Waiting before retrying a failed model call.
    Retry {
        /// Attempt number.
        attempt: u64,
        /// Why the last attempt failed.
        message: String,
    },
}

/// The tool call that raised a permission request or a question.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct ToolRef {
    /// The assistant message holding the call.
    #[serde(rename = "messageID")]
    pub message_id: String,
    /// The call id.
    #[serde(rename = "callID")]
    pub call_id: String,
}

/// A pending permission request (`GET /permission`, `permission.asked` events).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct PermissionRequest {
    /// `per_...`: what [`crate::Client::reply_permission`] takes.
    pub id: String,
    /// The session asking.
    #[serde(rename = "sessionID")]
    pub session_id: String,
    /// The permission name (`bash`, `edit`, ...).
    pub permission: String,
    /// What it wants to touch (the command, the path).
    pub patterns: Vec<String>,
    /// Tool-specific details (the command and its description for bash, a diff for edit).
    #[serde(default)]
    pub metadata: Value,
    /// The patterns an `always` reply would allow for the rest of the session.
    #[serde(default)]
    pub always: Vec<String>,
    /// The tool call, when a tool asked.
    #[serde(default)]
    pub tool: Option<ToolRef>,
}

/// How to answer a permission request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Reply {
    /// Allow this call.
    Once,
    /// Allow this and matching calls for the rest of the session (not persisted).
    Always,
    /// Refuse; OpenCode also rejects the session's other pending requests. With a
    /// message the agent continues with it as guidance.
    Reject,
}

/// One choice of a question.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct QuestionOption {
    /// What an answer names (1–5 words).
    pub label: String,
    /// What the choice means.
    #[serde(default)]
    pub description: String,
}

/// One question the agent asks.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Question {
    /// The full question.
    pub question: String,
    /// A short label (≤ 30 chars).
    #[serde(default)]
    pub header: String,
    /// The choices.
    #[serde(default)]
    pub options: Vec<QuestionOption>,
    /// Several choices may be picked.
    #[serde(default)]
    pub multiple: bool,
    /// A free-text answer is allowed.
    #[serde(default)]
    pub custom: bool,
}

/// A pending question (`GET /question`, `question.asked` events).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct QuestionRequest {
    /// `que_...`: what [`crate::Client::reply_question`] takes.
    pub id: String,
    /// The session asking.
    #[serde(rename = "sessionID")]
    pub session_id: String,
    /// The questions, answered in order.
    pub questions: Vec<Question>,
    /// The `question` tool call.
    #[serde(default)]
    pub tool: Option<ToolRef>,
}

/// One item of a session's todo list.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Todo {
    /// Not sent by OpenCode 1.18 (kept for older and newer versions).
    #[serde(default)]
    pub id: Option<String>,
    /// What to do.
    pub content: String,
    /// `pending`, `in_progress`, `completed` or `cancelled`.
    pub status: String,
    /// `high`, `medium` or `low`.
    pub priority: String,
}

/// Token counts of a model call or a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Tokens {
    /// Prompt tokens.
    pub input: u64,
    /// Completion tokens.
    pub output: u64,
    /// Reasoning tokens.
    pub reasoning: u64,
    /// Tokens read from the provider's cache.
    pub cache_read: u64,
    /// Tokens written to the provider's cache.
    pub cache_write: u64,
}

impl Tokens {
    /// All counts added up.
    pub fn total(&self) -> u64 {
        self.input + self.output + self.reasoning + self.cache_read + self.cache_write
    }
}

impl std::ops::AddAssign for Tokens {
    fn add_assign(&mut self, o: Tokens) {
        self.input += o.input;
        self.output += o.output;
        self.reasoning += o.reasoning;
        self.cache_read += o.cache_read;
        self.cache_write += o.cache_write;
    }
}

/// One part of a message.
#[derive(Debug, Clone, PartialEq)]
pub enum Part {
    /// Text (the model's answer, or the user's prompt).
    Text {
        /// The text.
        text: String,
    },
    /// A tool call and its state.
    Tool {
        /// The call id.
        call_id: String,
        /// The tool (`bash`, `question`, `todowrite`...).
        tool: String,
        /// `pending`, `running`, `completed` or `error`.
        status: String,
        /// The tool's one-line title (the command, the file), when it has one.
        title: Option<String>,
        /// The arguments.
        input: Value,
        /// The result text (completed) or the error (error).
        output: Option<String>,
    },
    /// Another kind (reasoning, step-start, step-finish, patch, file...).
    Other {
        /// OpenCode's part type.
        kind: String,
    },
}

/// A message of a session with its parts (`GET /session/{id}/message`).
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    /// `msg_...`.
    pub id: String,
    /// `user` or `assistant`.
    pub role: String,
    /// Created, ms since epoch (`info.time.created`).
    pub created: Option<i64>,
    /// Finished, ms since epoch (assistant messages, once done).
    pub completed: Option<i64>,
    /// `provider/model` that answered (assistant messages).
    pub model: Option<String>,
    /// Cost in USD (0 for user messages and unpriced models).
    pub cost: f64,
    /// Tokens used (zero for user messages).
    pub tokens: Tokens,
    /// The error that ended the message (`name: message`), if any.
    pub error: Option<String>,
    /// Its parts, in order.
    pub parts: Vec<Part>,
}

/// Reads a message's or step's `tokens` object (`{input, output, reasoning, cache:{read,
/// write}}`); absent fields count 0.
pub(crate) fn tokens_of(v: &Value) -> Tokens {
    let n = |v: &Value| v.as_f64().map_or(0, |f| f.max(0.0) as u64);
    Tokens {
        input: n(&v["input"]),
        output: n(&v["output"]),
        reasoning: n(&v["reasoning"]),
        cache_read: n(&v["cache"]["read"]),
        cache_write: n(&v["cache"]["write"]),
    }
}

/// Reads an OpenCode error object (`{name, data: {message}}`) as `name: message`.
pub(crate) fn error_text(v: &Value) -> Option<String> {
    if v.is_null() {
        return None;
    }
    let name = v["name"].as_str().unwrap_or("Error");
    Some(match v["data"]["message"].as_str() {
        Some(m) => format!("{name}: {m}"),
        None => name.to_owned(),
    })
}

/// Reads one `{info, parts}` item of `GET /session/{id}/message`.
pub(crate) fn message_of(v: &Value) -> Result<Message, String> {
    let info = &v["info"];
    let id = info["id"]
        .as_str()
        .ok_or("message without `info.id`")?
        .to_owned();
    let role = info["role"]
        .as_str()
        .ok_or_else(|| format!("message {id} without `info.role`"))?
        .to_owned();
    let parts = v["parts"]
        .as_array()
        .ok_or_else(|| format!("message {id} without `parts`"))?
        .iter()
        .map(part_of)
        .collect();
    let model = match (info["providerID"].as_str(), info["modelID"].as_str()) {
        (Some(p), Some(m)) => Some(format!("{p}/{m}")),
        _ => None,
    };
    Ok(Message {
        created: info["time"]["created"].as_f64().map(|t| t as i64),
        completed: info["time"]["completed"].as_f64().map(|t| t as i64),
        model,
        cost: info["cost"].as_f64().unwrap_or(0.0),
        tokens: tokens_of(&info["tokens"]),
        error: error_text(&info["error"]),
        id,
        role,
        parts,
    })
}

fn part_of(p: &Value) -> Part {
    let kind = p["type"].as_str().unwrap_or_default();
    match kind {
        "text" => Part::Text {
            text: p["text"].as_str().unwrap_or_default().to_owned(),
        },
        "tool" => {
            let state = &p["state"];
            let status = state["status"].as_str().unwrap_or_default().to_owned();
            let output = state["output"]
                .as_str()
                .or_else(|| state["error"].as_str())
                .map(str::to_owned);
            Part::Tool {
                call_id: p["callID"].as_str().unwrap_or_default().to_owned(),
                tool: p["tool"].as_str().unwrap_or_default().to_owned(),
                status,
                title: state["title"].as_str().map(str::to_owned),
                input: state["input"].clone(),
                output,
            }
        }
        other => Part::Other {
            kind: other.to_owned(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_message_with_tool_and_text_parts() {
        let m = message_of(&json!({
            "info": {"id": "msg_1", "role": "assistant", "cost": 0.5,
                     "time": {"created": 1700000000000i64, "completed": 1700000001000i64},
                     "providerID": "local", "modelID": "scripted",
                     "tokens": {"input": 10, "output": 2, "reasoning": 0, "cache": {"read": 1, "write": 0}},
                     "error": {"name": "APIError", "data": {"message": "boom", "isRetryable": false}}},
            "parts": [
                {"type": "step-start"},
                {"type": "text", "text": "hi"},
                {"type": "tool", "callID": "c1", "tool": "bash",
                 "state": {"status": "completed", "input": {"command": "ls"}, "output": "a\n", "title": "ls"}},
            ]
        }))
        .expect("decodes");
        assert_eq!(m.tokens.total(), 13);
        assert_eq!(
            (m.created, m.completed, m.model.as_deref()),
            (
                Some(1700000000000),
                Some(1700000001000),
                Some("local/scripted")
            )
        );
        assert_eq!(m.error.as_deref(), Some("APIError: boom"));
        assert_eq!(m.parts.len(), 3);
        assert!(
            matches!(&m.parts[2], Part::Tool { tool, output: Some(o), .. } if tool == "bash" && o == "a\n")
        );
    }

    #[test]
    fn statuses_decode() {
        let s: SessionStatus = serde_json::from_value(
            json!({"type": "retry", "attempt": 2, "message": "429", "next": 5}),
        )
        .expect("decodes");
        assert_eq!(
            s,
            SessionStatus::Retry {
                attempt: 2,
                message: "429".into()
            }
        );
    }
}
