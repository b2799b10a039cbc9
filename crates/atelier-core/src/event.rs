//! The events the manager publishes on `GET /api/v1/events`: one typed JSON object
//! per change, in the order the changes happened. The bus that numbers and
//! delivers them lives in the server; this module only says what they look like.

use serde::{Deserialize, Serialize};

use crate::SandboxState;

/// One event as delivered: a monotonically increasing id (also the SSE `id:` line,
/// so `Last-Event-ID` resumes after it), when it happened, and what happened.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Event {
    /// Monotonically increasing across manager restarts (it starts from the clock in
    /// microseconds), so a reconnecting client never mistakes a new event for one it
    /// has seen.
    pub id: u64,
    /// When it happened, ms since the Unix epoch.
    pub at_ms: i64,
    /// What happened.
    #[serde(flatten)]
    pub kind: EventKind,
}

/// What happened. Serialised with a `type` field (`sandbox.state`, ...); the SSE
/// `event:` line carries the same name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(tag = "type")]
pub enum EventKind {
    /// A sandbox row was made (state `creating`).
    #[serde(rename = "sandbox.created")]
    SandboxCreated {
        /// Sandbox id.
        sandbox: String,
        /// Its name.
        name: String,
        /// Its image.
        image: String,
    },
    /// A sandbox changed state.
    #[serde(rename = "sandbox.state")]
    SandboxState {
        /// Sandbox id.
        sandbox: String,
        /// Its name.
        name: String,
        /// The state it left.
        from: SandboxState,
        /// The state it is in now.
        to: SandboxState,
        /// Why (the operation that moved it).
        reason: String,
        /// The error, when it failed.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        error: Option<String>,
    },
    /// A sandbox is gone (its last state change, to `deleted`).
    #[serde(rename = "sandbox.deleted")]
    SandboxDeleted {
        /// Sandbox id.
        sandbox: String,
        /// Its name.
        name: String,
    },
    /// A prebuild started building, became ready, failed, went stale or was removed.
    #[serde(rename = "prebuild.status")]
    PrebuildStatus {
        /// Prebuild id.
        prebuild: String,
        /// Its workspace.
        workspace: String,
        /// `building`, `ready`, `failed`, `stale` or `removed`.
        status: String,
        /// Why it failed.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        error: Option<String>,
    },
    /// One line of a prebuild's build log.
    #[serde(rename = "prebuild.log")]
    PrebuildLog {
        /// Prebuild id.
        prebuild: String,
        /// The line, without its newline (cut at 4 KiB).
        line: String,
    },
    /// A dev command started or stopped listening (its URL routes or stops routing).
    #[serde(rename = "dev.state")]
    DevState {
        /// Sandbox id.
        sandbox: String,
        /// Dev command name.
        name: String,
        /// Whether its port listens (its URL answers).
        up: bool,
        /// Its URL.
        url: String,
    },
    /// A task was created, changed state, or made progress (todos, usage, files).
    #[serde(rename = "task.changed")]
    TaskChanged {
        /// Task id.
        task: String,
        /// Its workspace.
        workspace: String,
        /// Its title.
        title: String,
        /// Its state now.
        state: crate::task::TaskState,
        /// The state it left (absent when created; equal to `state` for progress).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        from: Option<crate::task::TaskState>,
        /// Todos done.
        todos_done: i64,
        /// Todos in all.
        todos_total: i64,
        /// Its sandbox is paused while it waits on a person.
        parked: bool,
        /// Why it failed.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        error: Option<String>,
    },
    /// An attention item (permission, question, stalled, budget) was raised or resolved.
    #[serde(rename = "attention.changed")]
    AttentionChanged {
        /// Item id.
        item: String,
        /// Its task.
        task: String,
        /// Permission, question, stalled or budget.
        kind: crate::task::AttentionKind,
        /// Pending, answered or gone.
        status: crate::task::AttentionStatus,
        /// One line: the command, the path, the question.
        title: String,
    },
    /// A running sandbox's agent connection changed: `reconnecting` (it closed, e.g.
    /// for a protocol violation by the guest, and the manager connects again),
    /// `ready` (a new connection answered), or `unhealthy` (reconnecting gave up;
    /// stop and start the sandbox).
    #[serde(rename = "sandbox.agent")]
    SandboxAgent {
        /// Sandbox id.
        sandbox: String,
        /// Its name.
        name: String,
        /// `reconnecting`, `ready` or `unhealthy`.
        agent: String,
        /// Why: the reason the connection closed, or why reconnecting failed.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
    },
    /// A workspace definition was created, changed or deleted.
    #[serde(rename = "workspace.changed")]
    WorkspaceChanged {
        /// Workspace name.
        workspace: String,
        /// Whether it was deleted.
        deleted: bool,
    },
}

impl EventKind {
    /// The event's type name (`sandbox.state`, ...): the SSE `event:` line.
    pub fn name(&self) -> &'static str {
        match self {
            EventKind::SandboxCreated { .. } => "sandbox.created",
            EventKind::SandboxState { .. } => "sandbox.state",
            EventKind::SandboxDeleted { .. } => "sandbox.deleted",
            EventKind::PrebuildStatus { .. } => "prebuild.status",
            EventKind::PrebuildLog { .. } => "prebuild.log",
            EventKind::DevState { .. } => "dev.state",
            EventKind::WorkspaceChanged { .. } => "workspace.changed",
            EventKind::SandboxAgent { .. } => "sandbox.agent",
            EventKind::TaskChanged { .. } => "task.changed",
            EventKind::AttentionChanged { .. } => "attention.changed",
        }
    }

    /// The task it concerns, if any (for `?task=` filters).
    pub fn task(&self) -> Option<&str> {
        match self {
            EventKind::TaskChanged { task, .. } | EventKind::AttentionChanged { task, .. } => {
                Some(task)
            }
            _ => None,
        }
    }

    /// The sandbox it concerns, if any (for `?sandbox=` filters).
    pub fn sandbox(&self) -> Option<&str> {
        match self {
            EventKind::SandboxCreated { sandbox, .. }
            | EventKind::SandboxState { sandbox, .. }
            | EventKind::SandboxDeleted { sandbox, .. }
            | EventKind::DevState { sandbox, .. }
            | EventKind::SandboxAgent { sandbox, .. } => Some(sandbox),
            EventKind::PrebuildStatus { .. }
            | EventKind::PrebuildLog { .. }
            | EventKind::WorkspaceChanged { .. }
            | EventKind::TaskChanged { .. }
            | EventKind::AttentionChanged { .. } => None,
        }
    }
}

/// Sent instead of events a client can no longer get: its `Last-Event-ID` is older
/// than the replay buffer (or unknown). Re-read the state you show, then carry on.
pub const RESYNC: &str = "resync";
/// Sent when a client read too slowly and `missed` events were dropped for it.
pub const LAGGED: &str = "lagged";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_form_has_type_and_flat_fields() {
        let e = Event {
            id: 7,
            at_ms: 1,
            kind: EventKind::SandboxState {
                sandbox: "abc".into(),
                name: "demo".into(),
                from: SandboxState::Creating,
                to: SandboxState::Running,
                reason: "agent ready".into(),
                error: None,
            },
        };
        let v = serde_json::to_value(&e).unwrap_or_default();
        assert_eq!(v["type"], "sandbox.state");
        assert_eq!(v["id"], 7);
        assert_eq!(v["to"], "running");
        assert!(v.get("error").is_none());
        let back: Event = serde_json::from_value(v).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(back, e);
        assert_eq!(back.kind.name(), "sandbox.state");
    }
}
