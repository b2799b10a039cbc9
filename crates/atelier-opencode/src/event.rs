//! OpenCode's bus events (`GET /event`) as typed values.
//!
//! Each SSE `data:` line is one JSON object `{"id": "evt_...", "type": "...",
//! "properties": {...}}`. The kinds the task loop acts on are decoded; the rest come as
//! [`Event::Other`] with their type, and `server.heartbeat` (sent every ~10 s) is
//! consumed by the stream itself as its keepalive.

use serde_json::Value;

use crate::types::{
    PermissionRequest, QuestionRequest, SessionStatus, Todo, Tokens, error_text, tokens_of,
};

/// The event type OpenCode sends as keepalive (about every 10 s in 1.18.33).
pub const HEARTBEAT: &str = "server.heartbeat";

/// One OpenCode event.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// `server.connected`: the first event of every stream.
    Connected,
    /// `session.status`: a session became busy, idle or is retrying.
    SessionStatus {
        /// The session.
        session: String,
        /// Its new status.
        status: SessionStatus,
    },
    /// `session.idle`: a session finished its turn (or was aborted).
    SessionIdle {
        /// The session.
        session: String,
    },
    /// `session.error`: a turn failed (provider error, abort, ...).
    SessionError {
        /// The session, when OpenCode names one.
        session: Option<String>,
        /// `name: message` of the error.
        message: String,
    },
    /// `todo.updated`: the session's whole todo list.
    TodoUpdated {
        /// The session.
        session: String,
        /// The list after the update.
        todos: Vec<Todo>,
    },
    /// `permission.asked`: a tool call waits for [`crate::Client::reply_permission`].
    PermissionAsked(PermissionRequest),
    /// `permission.replied`: a permission request was answered.
    PermissionReplied {
        /// The session.
        session: String,
        /// The request's id.
        id: String,
        /// `once`, `always` or `reject`.
        reply: String,
    },
    /// `question.asked`: the agent waits for [`crate::Client::reply_question`].
    QuestionAsked(QuestionRequest),
    /// `question.replied`: a question was answered.
    QuestionReplied {
        /// The session.
        session: String,
        /// The question's id.
        id: String,
    },
    /// `question.rejected`: a question was dismissed.
    QuestionRejected {
        /// The session.
        session: String,
        /// The question's id.
        id: String,
    },
    /// `message.updated`: a message was created or changed (assistant messages carry
    /// the cost and tokens so far).
    MessageUpdated {
        /// The session.
        session: String,
        /// The message.
        message_id: String,
        /// `user` or `assistant`.
        role: String,
        /// Cost so far in USD.
        cost: f64,
        /// Tokens so far.
        tokens: Tokens,
        /// The error that ended the message, if any.
        error: Option<String>,
    },
    /// `file.edited`: an agent tool wrote a file.
    FileEdited {
        /// The file's path.
        file: String,
    },
    /// Any other event type (`message.part.updated`, `session.diff`, ...).
    Other {
        /// OpenCode's event type.
        kind: String,
    },
}

/// What a `data:` payload is: an event, or the keepalive.
pub(crate) enum Decoded {
    Event(Event),
    Heartbeat,
}

/// Decodes one event's JSON; `Err` names the type and what did not fit.
pub(crate) fn decode(data: &str) -> Result<Decoded, String> {
    let v: Value = serde_json::from_str(data)
        .map_err(|e| format!("event is not json ({e}): {}", cut(data)))?;
    let kind = v["type"]
        .as_str()
        .ok_or_else(|| format!("event without `type`: {}", cut(data)))?;
    let p = &v["properties"];
    let s = |key: &str| -> Result<String, String> {
        p[key]
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| format!("`{kind}` event without `properties.{key}`"))
    };
    let typed = |what: &str| format!("`{kind}` event has an unexpected {what}");
    let ev = match kind {
        HEARTBEAT => return Ok(Decoded::Heartbeat),
        "server.connected" => Event::Connected,
        "session.status" => Event::SessionStatus {
            session: s("sessionID")?,
            status: serde_json::from_value(p["status"].clone())
                .map_err(|e| format!("{} ({e})", typed("status")))?,
        },
        "session.idle" => Event::SessionIdle {
            session: s("sessionID")?,
        },
        "session.error" => Event::SessionError {
            session: p["sessionID"].as_str().map(str::to_owned),
            message: error_text(&p["error"]).unwrap_or_else(|| "unknown error".to_owned()),
        },
        "todo.updated" => Event::TodoUpdated {
            session: s("sessionID")?,
            todos: serde_json::from_value(p["todos"].clone())
                .map_err(|e| format!("{} ({e})", typed("todo list")))?,
        },
        "permission.asked" => Event::PermissionAsked(
            serde_json::from_value(p.clone())
                .map_err(|e| format!("{} ({e})", typed("permission request")))?,
        ),
        "permission.replied" => Event::PermissionReplied {
            session: s("sessionID")?,
            id: s("requestID")?,
            reply: s("reply")?,
        },
        "question.asked" => Event::QuestionAsked(
            serde_json::from_value(p.clone())
                .map_err(|e| format!("{} ({e})", typed("question request")))?,
        ),
        "question.replied" => Event::QuestionReplied {
            session: s("sessionID")?,
            id: s("requestID")?,
        },
        "question.rejected" => Event::QuestionRejected {
            session: s("sessionID")?,
            id: s("requestID")?,
        },
        "message.updated" => {
            let info = &p["info"];
            let field = |key: &str| {
                info[key]
                    .as_str()
                    .map(str::to_owned)
                    .ok_or_else(|| format!("`{kind}` event without `properties.info.{key}`"))
            };
            Event::MessageUpdated {
                session: s("sessionID")?,
                message_id: field("id")?,
                role: field("role")?,
                cost: info["cost"].as_f64().unwrap_or(0.0),
                tokens: tokens_of(&info["tokens"]),
                error: error_text(&info["error"]),
            }
        }
        "file.edited" => Event::FileEdited { file: s("file")? },
        other => Event::Other {
            kind: other.to_owned(),
        },
    };
    Ok(Decoded::Event(ev))
}

/// The start of `s`, for error messages.
fn cut(s: &str) -> &str {
    let mut end = s.len().min(200);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(data: &str) -> Event {
        match decode(data).expect("decodes") {
            Decoded::Event(e) => e,
            Decoded::Heartbeat => panic!("heartbeat"),
        }
    }

    #[test]
    fn permission_asked_decodes_as_the_request() {
        let e = ev(
            r#"{"id":"evt_1","type":"permission.asked","properties":{"id":"per_1","sessionID":"ses_1","permission":"bash","patterns":["ls"],"metadata":{"command":"ls"},"always":["ls *"],"tool":{"messageID":"msg_1","callID":"c1"}}}"#,
        );
        let Event::PermissionAsked(r) = e else {
            panic!("not a permission: {e:?}")
        };
        assert_eq!((r.id.as_str(), r.patterns.len()), ("per_1", 1));
        assert_eq!(r.tool.expect("tool").call_id, "c1");
    }

    #[test]
    fn heartbeat_and_unknown_kinds() {
        assert!(matches!(
            decode(r#"{"type":"server.heartbeat","properties":{}}"#),
            Ok(Decoded::Heartbeat)
        ));
        assert_eq!(
            ev(r#"{"type":"session.diff","properties":{}}"#),
            Event::Other {
                kind: "session.diff".into()
            }
        );
    }

    #[test]
    fn known_kind_with_wrong_shape_is_an_error() {
        let e = decode(r#"{"type":"session.idle","properties":{}}"#)
            .err()
            .expect("error");
        assert!(e.contains("sessionID"), "{e}");
        assert!(decode("not json").is_err());
    }
}
