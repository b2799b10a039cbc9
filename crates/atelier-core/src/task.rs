//! Tasks: a prompt dispatched to a coding agent (OpenCode) in a sandbox of its own,
//! on a branch of its own. This module holds what every layer agrees on: the task
//! state machine, effort levels, attention items, and the built-in templates with
//! their prompt placeholders.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::ValidationError;

/// Longest task description (the prompt the user wrote), in bytes (64 KiB).
pub const MAX_DESCRIPTION_BYTES: usize = 64 * 1024;
/// Longest follow-up message or answer text, in bytes (16 KiB).
pub const MAX_MESSAGE_BYTES: usize = 16 * 1024;

/// Where a task is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum TaskState {
    /// Written down, not started.
    Backlog,
    /// Started, waiting for a free slot (the concurrency cap).
    Queued,
    /// Its sandbox and agent session are being set up.
    Starting,
    /// The agent is working.
    Working,
    /// The agent waits on a person: a permission or a question is pending.
    Waiting,
    /// The agent finished its turn: review the diff, say more, or mark it done.
    Review,
    /// Committing and pushing the branch.
    Finishing,
    /// Pushed; the diff and commits are kept.
    Done,
    /// Something broke (the reason is kept); it can be retried.
    Failed,
    /// Stopped by a person; it can be retried.
    Cancelled,
}

impl TaskState {
    /// Every state.
    pub const ALL: [TaskState; 10] = [
        TaskState::Backlog,
        TaskState::Queued,
        TaskState::Starting,
        TaskState::Working,
        TaskState::Waiting,
        TaskState::Review,
        TaskState::Finishing,
        TaskState::Done,
        TaskState::Failed,
        TaskState::Cancelled,
    ];

    /// The name stored and shown.
    pub fn as_str(self) -> &'static str {
        match self {
            TaskState::Backlog => "backlog",
            TaskState::Queued => "queued",
            TaskState::Starting => "starting",
            TaskState::Working => "working",
            TaskState::Waiting => "waiting",
            TaskState::Review => "review",
            TaskState::Finishing => "finishing",
            TaskState::Done => "done",
            TaskState::Failed => "failed",
            TaskState::Cancelled => "cancelled",
        }
    }

    /// The state named `s`, if it is one.
    pub fn parse(s: &str) -> Option<TaskState> {
        Self::ALL.into_iter().find(|st| st.as_str() == s)
    }

    /// Whether the task is over (done, failed or cancelled).
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            TaskState::Done | TaskState::Failed | TaskState::Cancelled
        )
    }

    /// Whether the task holds a sandbox with a live agent session.
    pub fn has_session(self) -> bool {
        matches!(
            self,
            TaskState::Working | TaskState::Waiting | TaskState::Review
        )
    }

    /// The board column it shows in: backlog, in-progress, needs-you, done, failed,
    /// cancelled.
    pub fn column(self) -> &'static str {
        match self {
            TaskState::Backlog => "backlog",
            TaskState::Queued | TaskState::Starting | TaskState::Working | TaskState::Finishing => {
                "in-progress"
            }
            TaskState::Waiting | TaskState::Review => "needs-you",
            TaskState::Done => "done",
            TaskState::Failed => "failed",
            TaskState::Cancelled => "cancelled",
        }
    }

    /// The legal moves.
    pub fn can_transition_to(self, to: TaskState) -> bool {
        use TaskState::*;
        matches!(
            (self, to),
            (Backlog, Queued | Cancelled)
                | (Queued, Starting | Cancelled)
                // A manager restart during set-up queues the task again.
                | (Starting, Working | Queued | Failed | Cancelled)
                | (Working, Waiting | Review | Finishing | Failed | Cancelled)
                | (Waiting, Working | Review | Finishing | Failed | Cancelled)
                | (Review, Working | Waiting | Finishing | Failed | Cancelled)
                | (Finishing, Done | Failed)
                | (Failed | Cancelled, Queued)
        )
    }
}

impl std::fmt::Display for TaskState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How hard the agent should think: picks the model, reasoning variant and whether
/// it plans first (per template).
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    Serialize,
    Deserialize,
    utoipa::ToSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Effort {
    /// Quick and cheap.
    Low,
    /// The default.
    Medium,
    /// Think harder.
    High,
    /// Everything it has.
    Max,
}

impl Effort {
    /// Every level.
    pub const ALL: [Effort; 4] = [Effort::Low, Effort::Medium, Effort::High, Effort::Max];

    /// The name stored and shown.
    pub fn as_str(self) -> &'static str {
        match self {
            Effort::Low => "low",
            Effort::Medium => "medium",
            Effort::High => "high",
            Effort::Max => "max",
        }
    }

    /// The level named `s`, if it is one.
    pub fn parse(s: &str) -> Option<Effort> {
        Self::ALL.into_iter().find(|e| e.as_str() == s)
    }
}

/// What a template does at one effort level.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EffortSettings {
    /// `provider/model`; the workspace's OpenCode default when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// OpenCode's reasoning variant (provider specific, e.g. `high`), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
    /// Ask for a plan before any change (the prompt gets a planning preface).
    #[serde(default)]
    pub plan_first: bool,
}

/// What OpenCode does when the agent wants a permission.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum RuleAction {
    /// Go ahead.
    Allow,
    /// Ask a person (an attention item).
    Ask,
    /// Refuse.
    Deny,
}

/// One permission rule of a template (OpenCode's session ruleset).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PermissionRule {
    /// The permission: `edit`, `bash`, `webfetch`, ... or `*`.
    pub permission: String,
    /// Glob over what it applies to (a command, a path); `*` for everything.
    #[serde(default = "star")]
    pub pattern: String,
    /// What happens.
    pub action: RuleAction,
}

fn star() -> String {
    "*".to_owned()
}

/// A kind of task: its prompt, agent, permission policy and effort settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TaskTemplate {
    /// Name (`implementation`, `security-review`, ...). In a workspace's
    /// `templates` map it may be left out (the key names it).
    #[serde(default)]
    pub name: String,
    /// One line for lists.
    pub title: String,
    /// The prompt sent to the agent. Placeholders: `{{task.description}}`,
    /// `{{task.title}}`, `{{workspace.name}}`, `{{branch}}`.
    pub prompt: String,
    /// OpenCode agent (`build` changes code, `plan` only reads).
    #[serde(default = "build_agent")]
    pub agent: String,
    /// Session permission rules, in order (later rules win, as in OpenCode).
    #[serde(default)]
    pub permission: Vec<PermissionRule>,
    /// Settings per effort level (missing levels use the defaults).
    #[serde(default)]
    pub efforts: BTreeMap<Effort, EffortSettings>,
    /// Effort when the task names none.
    #[serde(default = "medium")]
    pub default_effort: Effort,
    /// Answer an attention item left unanswered this long (seconds) with a reject
    /// and a note; none by default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attention_timeout_secs: Option<u64>,
}

fn build_agent() -> String {
    "build".to_owned()
}

fn medium() -> Effort {
    Effort::Medium
}

/// Values the prompt placeholders take.
#[derive(Debug, Clone, Default)]
pub struct PromptVars<'a> {
    /// The task's description.
    pub description: &'a str,
    /// The task's title.
    pub title: &'a str,
    /// The workspace's name.
    pub workspace: &'a str,
    /// The task's branch.
    pub branch: &'a str,
}

const PLACEHOLDERS: [&str; 4] = ["task.description", "task.title", "workspace.name", "branch"];

impl TaskTemplate {
    /// Parses a template written in YAML (or JSON) and validates it.
    pub fn from_yaml(text: &str) -> Result<TaskTemplate, ValidationError> {
        let t: TaskTemplate = serde_norway::from_str(text)
            .map_err(|e| ValidationError::new("template document", e.to_string()))?;
        t.validate()?;
        Ok(t)
    }

    /// Checks the name, the prompt's placeholders and the agent.
    pub fn validate(&self) -> Result<(), ValidationError> {
        crate::validate_name(&self.name)
            .map_err(|e| ValidationError::new("name", e.to_string()))?;
        if self.prompt.trim().is_empty() {
            return Err(ValidationError::new("prompt", "must not be empty"));
        }
        if self.prompt.len() > MAX_DESCRIPTION_BYTES {
            return Err(ValidationError::new(
                "prompt",
                format!("is longer than {MAX_DESCRIPTION_BYTES} bytes"),
            ));
        }
        let mut rest = self.prompt.as_str();
        while let Some(i) = rest.find("{{") {
            let after = &rest[i + 2..];
            let Some(end) = after.find("}}") else {
                return Err(ValidationError::new(
                    "prompt",
                    "has a `{{` without its `}}`",
                ));
            };
            let name = after[..end].trim();
            if !PLACEHOLDERS.contains(&name) {
                return Err(ValidationError::new(
                    "prompt",
                    format!(
                        "unknown placeholder {{{{{name}}}}}; known: {}",
                        PLACEHOLDERS
                            .iter()
                            .map(|p| format!("{{{{{p}}}}}"))
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                ));
            }
            rest = &after[end + 2..];
        }
        if !matches!(self.agent.as_str(), "build" | "plan")
            && crate::validate_name(&self.agent).is_err()
        {
            return Err(ValidationError::new(
                "agent",
                format!("{:?} is not an agent name", self.agent),
            ));
        }
        for r in &self.permission {
            if r.permission.is_empty() || r.permission.len() > 64 {
                return Err(ValidationError::new(
                    "permission",
                    "each rule needs a permission name of 1 to 64 characters",
                ));
            }
        }
        Ok(())
    }

    /// The settings of `effort` (defaults when the template has none for it).
    pub fn effort(&self, effort: Effort) -> EffortSettings {
        self.efforts.get(&effort).cloned().unwrap_or_default()
    }

    /// The prompt with its placeholders filled in, with a planning preface when the
    /// effort asks for one.
    pub fn render(&self, vars: &PromptVars<'_>, effort: Effort) -> String {
        let mut out = String::with_capacity(self.prompt.len() + vars.description.len());
        if self.effort(effort).plan_first {
            out.push_str(
                "Before changing anything, write a short plan as a todo list; then carry it out.\n\n",
            );
        }
        let mut rest = self.prompt.as_str();
        while let Some(i) = rest.find("{{") {
            out.push_str(&rest[..i]);
            let after = &rest[i + 2..];
            let Some(end) = after.find("}}") else {
                out.push_str(&rest[i..]);
                return out;
            };
            out.push_str(match after[..end].trim() {
                "task.description" => vars.description,
                "task.title" => vars.title,
                "workspace.name" => vars.workspace,
                "branch" => vars.branch,
                _ => "",
            });
            rest = &after[end + 2..];
        }
        out.push_str(rest);
        out
    }
}

fn rule(permission: &str, action: RuleAction) -> PermissionRule {
    PermissionRule {
        permission: permission.to_owned(),
        pattern: star(),
        action,
    }
}

fn efforts(plan_from: Effort) -> BTreeMap<Effort, EffortSettings> {
    Effort::ALL
        .into_iter()
        .map(|e| {
            (
                e,
                EffortSettings {
                    model: None,
                    variant: match e {
                        Effort::High => Some("high".to_owned()),
                        Effort::Max => Some("max".to_owned()),
                        _ => None,
                    },
                    plan_first: e >= plan_from,
                },
            )
        })
        .collect()
}

const REVIEW_TAIL: &str = "\n\nDo not change any file. Report your findings as a list, most important first, each with the file and line, why it matters and what to do. Use the todo list to track what you checked.";

/// The built-in templates: implementation, best-practices-review, security-review,
/// simplification.
pub fn builtin_templates() -> Vec<TaskTemplate> {
    use RuleAction::*;
    vec![
        TaskTemplate {
            name: "implementation".into(),
            title: "Implement a change on a new branch".into(),
            prompt: "You work in the repository of workspace {{workspace.name}}, on branch {{branch}}.\n\nTask: {{task.description}}\n\nTrack your steps with the todo list. Make the change, run the relevant tests, and finish with a short summary of what you changed and why.".into(),
            agent: "build".into(),
            permission: vec![rule("edit", Allow), rule("bash", Ask), rule("webfetch", Ask)],
            efforts: efforts(Effort::High),
            default_effort: Effort::Medium,
            attention_timeout_secs: None,
        },
        TaskTemplate {
            name: "best-practices-review".into(),
            title: "Review the branch for best practices".into(),
            prompt: format!("Review the changes on branch {{{{branch}}}} of workspace {{{{workspace.name}}}} for correctness, readability, naming, error handling and tests.\n\nContext: {{{{task.description}}}}{REVIEW_TAIL}"),
            agent: "build".into(),
            permission: vec![rule("edit", Deny), rule("bash", Ask), rule("webfetch", Deny)],
            efforts: efforts(Effort::Max),
            default_effort: Effort::Medium,
            attention_timeout_secs: None,
        },
        TaskTemplate {
            name: "security-review".into(),
            title: "Audit the branch for security problems".into(),
            prompt: format!("Audit the changes on branch {{{{branch}}}} of workspace {{{{workspace.name}}}} for security problems: injection, authentication and authorisation, secrets, unsafe input handling, dependencies.\n\nContext: {{{{task.description}}}}{REVIEW_TAIL}"),
            agent: "build".into(),
            permission: vec![rule("edit", Deny), rule("bash", Ask), rule("webfetch", Deny)],
            efforts: efforts(Effort::Max),
            default_effort: Effort::High,
            attention_timeout_secs: None,
        },
        TaskTemplate {
            name: "simplification".into(),
            title: "Simplify the code on the branch without changing behaviour".into(),
            prompt: "Simplify the code changed on branch {{branch}} of workspace {{workspace.name}}: remove duplication and dead code, make names and structure clearer, keep behaviour and tests passing.\n\nContext: {{task.description}}\n\nTrack your steps with the todo list and finish with a summary.".into(),
            agent: "build".into(),
            permission: vec![rule("edit", Allow), rule("bash", Ask), rule("webfetch", Deny)],
            efforts: efforts(Effort::High),
            default_effort: Effort::Medium,
            attention_timeout_secs: None,
        },
    ]
}

/// What kind of person-facing item a task raised.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum AttentionKind {
    /// The agent asks to run a tool (a command, an edit, a fetch).
    Permission,
    /// The agent asks a question (options and/or free text).
    Question,
    /// The agent has been busy with no sign of life: retry or abort.
    Stalled,
    /// The task (or its workspace) reached its budget; the turn was stopped:
    /// continue or stop.
    Budget,
}

impl AttentionKind {
    /// The name stored and shown.
    pub fn as_str(self) -> &'static str {
        match self {
            AttentionKind::Permission => "permission",
            AttentionKind::Question => "question",
            AttentionKind::Stalled => "stalled",
            AttentionKind::Budget => "budget",
        }
    }

    /// The kind named `s`.
    pub fn parse(s: &str) -> Option<AttentionKind> {
        [
            AttentionKind::Permission,
            AttentionKind::Question,
            AttentionKind::Stalled,
            AttentionKind::Budget,
        ]
        .into_iter()
        .find(|k| k.as_str() == s)
    }
}

/// Where an attention item is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum AttentionStatus {
    /// Waiting for a person.
    Pending,
    /// Answered here.
    Answered,
    /// No longer asked: answered elsewhere, rejected along with another item, or
    /// its task ended.
    Gone,
}

impl AttentionStatus {
    /// The name stored and shown.
    pub fn as_str(self) -> &'static str {
        match self {
            AttentionStatus::Pending => "pending",
            AttentionStatus::Answered => "answered",
            AttentionStatus::Gone => "gone",
        }
    }

    /// The status named `s`.
    pub fn parse(s: &str) -> Option<AttentionStatus> {
        [
            AttentionStatus::Pending,
            AttentionStatus::Answered,
            AttentionStatus::Gone,
        ]
        .into_iter()
        .find(|k| k.as_str() == s)
    }
}

/// A person's answer to an attention item.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case", tag = "answer")]
pub enum Answer {
    /// Allow this once.
    Once,
    /// Allow it and everything like it for the rest of the task.
    Always,
    /// Refuse; the message (if any) tells the agent what to do instead. OpenCode
    /// also rejects the session's other pending requests.
    Reject {
        /// Guidance for the agent.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        message: Option<String>,
    },
    /// Answers to a question: for each of its questions, the chosen option labels
    /// or typed text.
    Reply {
        /// One list per question.
        answers: Vec<Vec<String>>,
    },
    /// Stalled: abort the turn and send the prompt again.
    Retry,
    /// Stalled: abort the turn and leave the task in review.
    Abort,
    /// Budget reached: carry on. Given limits replace the task's budget (each must
    /// be above what the task has used); with none, the limit that was reached is
    /// lifted for this task (its own budget removed, or the workspace's waived).
    Continue {
        /// The task's new cost limit (USD).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        budget_usd: Option<f64>,
        /// The task's new token limit (input + output).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        budget_tokens: Option<i64>,
    },
    /// Budget reached: stop here; the task goes to review (its work is kept: read
    /// the diff, then `done`, `say` or `cancel`).
    Stop,
}

impl Answer {
    /// Checks sizes and that the answer fits the item's kind.
    pub fn validate_for(&self, kind: AttentionKind) -> Result<(), ValidationError> {
        let ok = matches!(
            (self, kind),
            (
                Answer::Once | Answer::Always | Answer::Reject { .. },
                AttentionKind::Permission
            ) | (
                Answer::Reply { .. } | Answer::Reject { .. },
                AttentionKind::Question
            ) | (Answer::Retry | Answer::Abort, AttentionKind::Stalled)
                | (
                    Answer::Continue { .. } | Answer::Stop,
                    AttentionKind::Budget
                )
        );
        if !ok {
            return Err(ValidationError::new(
                "answer",
                format!(
                    "a {} cannot be answered this way: permissions take once, always or reject; questions take reply or reject; stalled takes retry or abort; budget takes continue or stop",
                    kind.as_str()
                ),
            ));
        }
        if let Answer::Continue {
            budget_usd,
            budget_tokens,
        } = self
        {
            Budget {
                usd: *budget_usd,
                tokens: *budget_tokens,
            }
            .validate()?;
        }
        let mut total = 0;
        if let Answer::Reject { message: Some(m) } = self {
            total += m.len();
        }
        if let Answer::Reply { answers } = self {
            if answers.is_empty() || answers.len() > 32 {
                return Err(ValidationError::new(
                    "answers",
                    "give one list of choices per question (1 to 32)",
                ));
            }
            total += answers.iter().flatten().map(String::len).sum::<usize>();
        }
        if total > MAX_MESSAGE_BYTES {
            return Err(ValidationError::new(
                "answer",
                format!("is longer than {MAX_MESSAGE_BYTES} bytes"),
            ));
        }
        Ok(())
    }
}

/// A spending limit: cost in USD and/or tokens (input + output, reasoning
/// included). Reaching either stops the agent's turn and asks a person.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Budget {
    /// Cost limit in USD (as the provider reports cost; unpriced models cost 0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usd: Option<f64>,
    /// Token limit: input plus output tokens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens: Option<i64>,
}

/// Largest cost limit accepted (USD).
pub const MAX_BUDGET_USD: f64 = 1_000_000.0;

impl Budget {
    /// Whether it limits nothing.
    pub fn is_empty(&self) -> bool {
        self.usd.is_none() && self.tokens.is_none()
    }

    /// Checks the limits: a positive finite cost up to [`MAX_BUDGET_USD`], a
    /// positive token count.
    pub fn validate(&self) -> Result<(), ValidationError> {
        if let Some(u) = self.usd
            && !(u.is_finite() && u > 0.0 && u <= MAX_BUDGET_USD)
        {
            return Err(ValidationError::new(
                "budget_usd",
                format!(
                    "{u} is not a cost limit: give a number of USD above 0 and at most {MAX_BUDGET_USD}"
                ),
            ));
        }
        if let Some(t) = self.tokens
            && t <= 0
        {
            return Err(ValidationError::new(
                "budget_tokens",
                format!("{t} is not a token limit: give a number above 0"),
            ));
        }
        Ok(())
    }

    /// Which limit `cost` and `tokens` reach, if any (`usd` or `tokens`).
    pub fn reached(&self, cost: f64, tokens: i64) -> Option<&'static str> {
        if self.usd.is_some_and(|u| cost >= u) {
            Some("usd")
        } else if self.tokens.is_some_and(|t| tokens >= t) {
            Some("tokens")
        } else {
            None
        }
    }
}

/// Lowercase ASCII words of `text` joined by '-', at most 40 characters: the
/// readable part of a branch name.
pub fn slug(text: &str) -> String {
    let mut out = String::new();
    for word in text
        .split(|c: char| !c.is_ascii_alphanumeric())
        .filter(|w| !w.is_empty())
    {
        let w = word.to_ascii_lowercase();
        if out.len() + w.len() + 1 > 40 {
            break;
        }
        if !out.is_empty() {
            out.push('-');
        }
        out.push_str(&w);
    }
    if out.is_empty() {
        out.push_str("task");
    }
    out
}

/// The first line of `text`, at most 80 characters: a task's title.
pub fn title_of(text: &str) -> String {
    let line = text
        .lines()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("")
        .trim();
    let mut t: String = line.chars().take(80).collect();
    if line.chars().count() > 80 {
        t.push('…');
    }
    t
}

/// Checks a task description.
pub fn validate_description(text: &str) -> Result<(), ValidationError> {
    if text.trim().is_empty() {
        return Err(ValidationError::new(
            "description",
            "must not be empty: say what the agent should do",
        ));
    }
    if text.len() > MAX_DESCRIPTION_BYTES {
        return Err(ValidationError::new(
            "description",
            format!("is longer than {MAX_DESCRIPTION_BYTES} bytes"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_round_trip_and_terminal_ones_only_retry() {
        for s in TaskState::ALL {
            assert_eq!(TaskState::parse(s.as_str()), Some(s));
        }
        assert!(!TaskState::Done.can_transition_to(TaskState::Queued));
        assert!(TaskState::Failed.can_transition_to(TaskState::Queued));
        assert!(!TaskState::Backlog.can_transition_to(TaskState::Working));
        assert!(TaskState::Review.can_transition_to(TaskState::Working));
        assert_eq!(TaskState::Waiting.column(), "needs-you");
    }

    #[test]
    fn builtins_validate_and_render() {
        let all = builtin_templates();
        assert_eq!(all.len(), 4);
        for t in &all {
            t.validate().unwrap_or_else(|e| panic!("{}: {e}", t.name));
        }
        let imp = &all[0];
        let text = imp.render(
            &PromptVars {
                description: "Add a /health route",
                title: "Add",
                workspace: "shop",
                branch: "atelier/tk-1-add",
            },
            Effort::Medium,
        );
        assert!(text.contains("Task: Add a /health route"), "{text}");
        assert!(text.contains("shop, on branch atelier/tk-1-add"), "{text}");
        assert!(!text.contains("{{"));
        assert!(
            imp.render(&PromptVars::default(), Effort::Max)
                .starts_with("Before changing")
        );
    }

    #[test]
    fn unknown_placeholders_and_bad_answers_are_refused() {
        let mut t = builtin_templates().remove(0);
        t.prompt = "do {{task.descripton}}".into();
        let e = t.validate().unwrap_err();
        assert!(e.to_string().contains("unknown placeholder"), "{e}");
        t.prompt = "do {{branch".into();
        assert!(t.validate().is_err());
        assert!(Answer::Once.validate_for(AttentionKind::Question).is_err());
        assert!(
            Answer::Reply { answers: vec![] }
                .validate_for(AttentionKind::Question)
                .is_err()
        );
        assert!(Answer::Retry.validate_for(AttentionKind::Stalled).is_ok());
        assert!(Answer::Stop.validate_for(AttentionKind::Budget).is_ok());
        assert!(Answer::Stop.validate_for(AttentionKind::Stalled).is_err());
        let bad = Answer::Continue {
            budget_usd: Some(-1.0),
            budget_tokens: None,
        };
        let e = bad.validate_for(AttentionKind::Budget).unwrap_err();
        assert!(e.to_string().contains("budget_usd"), "{e}");
        assert_eq!(AttentionKind::parse("budget"), Some(AttentionKind::Budget));
    }

    #[test]
    fn budgets_validate_and_say_which_limit_is_reached() {
        let b = Budget {
            usd: Some(2.0),
            tokens: Some(1000),
        };
        b.validate().unwrap();
        assert_eq!(b.reached(1.0, 10), None);
        assert_eq!(b.reached(2.0, 10), Some("usd"));
        assert_eq!(b.reached(0.5, 1000), Some("tokens"));
        assert_eq!(Budget::default().reached(1e9, i64::MAX), None);
        for bad in [
            Budget {
                usd: Some(f64::NAN),
                tokens: None,
            },
            Budget {
                usd: Some(0.0),
                tokens: None,
            },
            Budget {
                usd: None,
                tokens: Some(0),
            },
        ] {
            assert!(bad.validate().is_err(), "{bad:?}");
        }
        let a: Answer = serde_json::from_str(r#"{"answer":"continue","budget_usd":5}"#).unwrap();
        assert_eq!(
            a,
            Answer::Continue {
                budget_usd: Some(5.0),
                budget_tokens: None
            }
        );
    }

    #[test]
    fn slugs_and_titles() {
        assert_eq!(
            slug("Migrate wallet authenticators from MongoDB to Postgres!"),
            "migrate-wallet-authenticators-from"
        );
        assert_eq!(slug("¿¡"), "task");
        assert_eq!(title_of("\n  Fix it  \nmore"), "Fix it");
    }
}
