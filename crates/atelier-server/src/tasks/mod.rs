//! The task service: a prompt dispatched to OpenCode in a sandbox of its own, on a
//! branch of its own; its attention items (permissions, questions) kept in our
//! database; follow-ups, answers, done (commit + push from the host), cancel,
//! retry and chain.
//!
//! It holds two narrow handles — [`Sandboxes`] and [`Workspaces`] — and the store;
//! nothing else of the manager. Each task with a live session has one driver task
//! ([`driver`]) that follows OpenCode's event stream and writes what it sees; the
//! API calls below act on OpenCode directly and let the driver record the effect.
//! A scheduler starts queued tasks up to the concurrency cap.

pub mod conversation;
mod driver;
pub mod git;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use atelier_core::task::{
    Answer, AttentionKind, AttentionStatus, Budget, Effort, TaskState, TaskTemplate,
    builtin_templates, slug, title_of, validate_description,
};
use atelier_core::{ErrorKind, SandboxSpec};
use atelier_store::{AttentionRecord, NewTask, Store, TaskPatch, TaskRecord};
use serde::{Deserialize, Serialize};

use crate::Error;
use crate::events::EventBus;
use crate::manager::{Manager, lock_map};
use crate::sandboxes::Sandboxes;
use crate::workspaces::Workspaces;

/// How tasks run.
#[derive(Debug, Clone)]
pub struct TaskConfig {
    /// Tasks with a running sandbox at once; more wait in `queued`.
    pub max_running: usize,
    /// A task waiting on a person this long has its sandbox paused to disk
    /// (`None`: never).
    pub park_after: Option<Duration>,
    /// A busy session with no event this long raises a "stalled" item.
    pub stall_after: Duration,
}

impl Default for TaskConfig {
    fn default() -> Self {
        TaskConfig {
            max_running: 4,
            park_after: Some(Duration::from_secs(15 * 60)),
            stall_after: Duration::from_secs(10 * 60),
        }
    }
}

/// What a user asks to create.
#[derive(Debug, Clone, Deserialize, Serialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewTaskRequest {
    /// Workspace whose prebuild the task's sandbox spawns from.
    pub workspace: String,
    /// What to do (the prompt; its first line is the title).
    pub description: String,
    /// Template (default `implementation`).
    #[serde(default)]
    pub template: Option<String>,
    /// Effort (default: the template's).
    #[serde(default)]
    pub effort: Option<Effort>,
    /// Start at once instead of landing in the backlog.
    #[serde(default)]
    pub start: bool,
    /// The task's cost limit in USD: reaching it stops the agent's turn and raises
    /// a `budget` attention item (continue or stop).
    #[serde(default)]
    pub budget_usd: Option<f64>,
    /// The task's token limit (input + output), likewise.
    #[serde(default)]
    pub budget_tokens: Option<i64>,
}

/// The task service.
#[derive(Debug)]
pub struct Tasks {
    sandboxes: Sandboxes,
    workspaces: Workspaces,
    store: Store,
    events: Arc<EventBus>,
    cfg: TaskConfig,
    /// The driver of each task with a live session.
    drivers: Mutex<HashMap<String, tokio::task::AbortHandle>>,
    /// Wakes the scheduler.
    wake: tokio::sync::Notify,
    /// Serialises state-changing calls per task.
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Tasks prompted whose session has not reported busy since: an idle event
    /// read meanwhile is the previous turn's (stale) and moves nothing.
    awaiting_busy: Mutex<std::collections::HashSet<String>>,
}

/// Settings key prefix of stored templates.
const TEMPLATE_KEY: &str = "template:";

fn new_id(prefix: &str) -> String {
    use rand::Rng;
    const A: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let mut rng = rand::rng();
    let s: String = (0..10)
        .map(|_| A[rng.random_range(0..A.len())] as char)
        .collect();
    format!("{prefix}-{s}")
}

impl Tasks {
    /// The service over `mgr`'s sandboxes and workspaces. Call [`Tasks::spawn`]
    /// after, to start the scheduler and pick up tasks a restart interrupted.
    pub fn new(mgr: &Arc<Manager>, cfg: TaskConfig) -> Arc<Tasks> {
        Arc::new(Tasks {
            sandboxes: mgr.sandboxes(),
            workspaces: mgr.workspace_access(),
            store: mgr.store().clone(),
            events: Arc::clone(mgr.events()),
            cfg,
            drivers: Mutex::default(),
            wake: tokio::sync::Notify::new(),
            locks: Mutex::default(),
            awaiting_busy: Mutex::default(),
        })
    }

    /// The event bus (task and attention changes are published on it).
    pub fn events(&self) -> &Arc<EventBus> {
        &self.events
    }

    fn lock(&self, task: &str) -> Arc<tokio::sync::Mutex<()>> {
        Arc::clone(lock_map(&self.locks).entry(task.to_owned()).or_default())
    }

    /// Every template: the built-in ones, with the operator's overrides and
    /// additions (stored as settings `template:<name>`) in their place.
    pub async fn templates(&self) -> Result<Vec<TaskTemplate>, Error> {
        let mut all = builtin_templates();
        for (key, value) in self.store.settings_with_prefix(TEMPLATE_KEY).await? {
            let t: TaskTemplate = serde_json::from_str(&value)
                .map_err(|e| Error::internal(format!("stored template {key}: {e}")))?;
            match all.iter_mut().find(|b| b.name == t.name) {
                Some(slot) => *slot = t,
                None => all.push(t),
            }
        }
        Ok(all)
    }

    /// Every template as tasks of `workspace` see them: the workspace's own
    /// (`templates` in its definition) over the global ones over the built-in ones.
    pub async fn templates_for(&self, workspace: Option<&str>) -> Result<Vec<TaskTemplate>, Error> {
        let mut all = self.templates().await?;
        if let Some(w) = workspace {
            let spec = self.workspaces.spec(w).await?;
            for name in spec.templates.keys() {
                let Some(t) = spec.template(name) else {
                    continue;
                };
                match all.iter_mut().find(|b| b.name == t.name) {
                    Some(slot) => *slot = t,
                    None => all.push(t),
                }
            }
        }
        Ok(all)
    }

    /// A template by name (global or built-in).
    pub async fn template(&self, name: &str) -> Result<TaskTemplate, Error> {
        self.template_for(name, None).await
    }

    /// A template by name as tasks of `workspace` see it (see
    /// [`Tasks::templates_for`]).
    pub async fn template_for(
        &self,
        name: &str,
        workspace: Option<&str>,
    ) -> Result<TaskTemplate, Error> {
        let all = self.templates_for(workspace).await?;
        let names = all
            .iter()
            .map(|t| t.name.as_str())
            .collect::<Vec<_>>()
            .join(", ");
        all.iter().find(|t| t.name == name).cloned().ok_or_else(|| {
            Error::not_found(format!(
                "template {name:?} not found; `atelier template list` shows them ({names})"
            ))
        })
    }

    /// The template of task `t`: its workspace's version first (the global one if
    /// the workspace is gone).
    pub(crate) async fn task_template(&self, t: &TaskRecord) -> Result<TaskTemplate, Error> {
        match self.template_for(&t.template, Some(&t.workspace)).await {
            Err(e) if e.kind == ErrorKind::NotFound => self.template(&t.template).await,
            r => r,
        }
    }

    /// Stores a template: overrides the built-in one of that name, or adds one.
    pub async fn put_template(&self, t: TaskTemplate) -> Result<TaskTemplate, Error> {
        t.validate().map_err(Error::from)?;
        let json = serde_json::to_string(&t).map_err(|e| Error::internal(e.to_string()))?;
        self.store
            .put_setting(&format!("{TEMPLATE_KEY}{}", t.name), &json)
            .await?;
        Ok(t)
    }

    /// Removes the operator's version of a template. Returns the template now in
    /// effect: the built-in one of that name, or (for an added template) the one
    /// removed.
    pub async fn reset_template(&self, name: &str) -> Result<TaskTemplate, Error> {
        let key = format!("{TEMPLATE_KEY}{name}");
        let Some(stored) = self.store.setting(&key).await? else {
            return Err(Error::not_found(format!(
                "template {name:?} has no stored version to remove"
            )));
        };
        self.store.delete_setting(&key).await?;
        match builtin_templates().into_iter().find(|t| t.name == name) {
            Some(t) => Ok(t),
            None => serde_json::from_str(&stored)
                .map_err(|e| Error::internal(format!("stored template {name}: {e}"))),
        }
    }

    /// Creates a task (in the backlog, or queued with `start`).
    pub async fn create(self: &Arc<Self>, req: NewTaskRequest) -> Result<TaskRecord, Error> {
        self.create_inner(req, None).await
    }

    async fn create_inner(
        self: &Arc<Self>,
        req: NewTaskRequest,
        parent: Option<&TaskRecord>,
    ) -> Result<TaskRecord, Error> {
        validate_description(&req.description).map_err(Error::from)?;
        let budget = Budget {
            usd: req.budget_usd,
            tokens: req.budget_tokens,
        };
        budget.validate().map_err(Error::from)?;
        let spec = self.workspaces.spec(&req.workspace).await?;
        let template = self
            .template_for(
                req.template.as_deref().unwrap_or("implementation"),
                Some(&req.workspace),
            )
            .await?;
        let effort = req.effort.unwrap_or(template.default_effort);
        let repo = spec.repos.first().ok_or_else(|| {
            Error::invalid(format!(
                "workspace {} has no repository; a task works on a branch of its first repository",
                req.workspace
            ))
        })?;
        let id = new_id("tk");
        let (branch, base_branch) = match parent {
            Some(p) => (p.branch.clone(), p.base_branch.clone()),
            None => (
                format!("atelier/{id}-{}", slug(&req.description)),
                repo.branch.clone(),
            ),
        };
        let rec = self
            .store
            .insert_task(&NewTask {
                id,
                workspace: req.workspace,
                template: template.name,
                effort,
                title: title_of(&req.description),
                description: req.description,
                state: if req.start {
                    TaskState::Queued
                } else {
                    TaskState::Backlog
                },
                parent: parent.map(|p| p.id.clone()),
                branch,
                base_branch,
                budget_usd: budget.usd,
                budget_tokens: budget.tokens,
            })
            .await?;
        self.wake.notify_one();
        Ok(rec)
    }

    /// One task.
    pub async fn get(&self, id: &str) -> Result<TaskRecord, Error> {
        self.store
            .task(id)
            .await?
            .ok_or_else(|| Error::not_found(format!("task {id} not found")))
    }

    /// Tasks, newest first.
    pub async fn list(
        &self,
        workspace: Option<&str>,
        states: &[TaskState],
    ) -> Result<Vec<TaskRecord>, Error> {
        Ok(self.store.tasks(workspace, states).await?)
    }

    /// Usage (messages, tokens, cost) summed per workspace.
    pub async fn usage(&self) -> Result<Vec<atelier_store::WorkspaceUsage>, Error> {
        Ok(self.store.task_usage().await?)
    }

    /// Moves a backlog task to the queue.
    pub async fn start(self: &Arc<Self>, id: &str) -> Result<TaskRecord, Error> {
        let t = self.get(id).await?;
        if t.state != TaskState::Backlog {
            return Err(Error::conflict(format!(
                "task {id} is {}; only a backlog task can be started (use `retry` for a failed or cancelled one)",
                t.state
            )));
        }
        let rec = self
            .store
            .task_transition(id, TaskState::Queued, None)
            .await?;
        self.wake.notify_one();
        Ok(rec)
    }

    /// Queues a failed or cancelled task again (a fresh sandbox, the same branch).
    pub async fn retry(self: &Arc<Self>, id: &str) -> Result<TaskRecord, Error> {
        let lock = self.lock(id);
        let _g = lock.lock().await;
        let t = self.get(id).await?;
        if !matches!(t.state, TaskState::Failed | TaskState::Cancelled) {
            return Err(Error::conflict(format!(
                "task {id} is {}; only a failed or cancelled task can be retried",
                t.state
            )));
        }
        self.release_sandbox(&t, true).await;
        self.store
            .update_task(
                id,
                TaskPatch {
                    session: Some(None),
                    parked: Some(false),
                    ..Default::default()
                },
            )
            .await?;
        let rec = self
            .store
            .task_transition(id, TaskState::Queued, None)
            .await?;
        self.wake.notify_one();
        Ok(rec)
    }

    /// Cancels a task: its session is aborted, its sandbox deleted, its pending
    /// items dropped. The branch is not pushed.
    pub async fn cancel(self: &Arc<Self>, id: &str) -> Result<TaskRecord, Error> {
        let lock = self.lock(id);
        let _g = lock.lock().await;
        let t = self.get(id).await?;
        if t.state.is_terminal() || t.state == TaskState::Finishing {
            return Err(Error::conflict(format!(
                "task {id} is {}; it cannot be cancelled",
                t.state
            )));
        }
        self.stop_driver(id);
        let rec = self
            .store
            .task_transition(id, TaskState::Cancelled, None)
            .await?;
        self.drop_pending(id).await;
        self.release_sandbox(&rec, true).await;
        self.wake.notify_one();
        self.get(id).await
    }

    /// Chains a new task on `id`'s branch (`id` must be done: its branch pushed).
    pub async fn chain(
        self: &Arc<Self>,
        id: &str,
        template: Option<String>,
        description: Option<String>,
        effort: Option<Effort>,
        start: bool,
        budget: Budget,
    ) -> Result<TaskRecord, Error> {
        let parent = self.get(id).await?;
        if parent.state != TaskState::Done {
            return Err(Error::conflict(format!(
                "task {id} is {}; chain onto a done task (its branch is pushed then)",
                parent.state
            )));
        }
        let description = description.unwrap_or_else(|| {
            format!(
                "Follow-up to \"{}\" (task {}): {}",
                parent.title, parent.id, parent.description
            )
        });
        self.create_inner(
            NewTaskRequest {
                workspace: parent.workspace.clone(),
                description,
                template,
                effort,
                start,
                budget_usd: budget.usd,
                budget_tokens: budget.tokens,
            },
            Some(&parent),
        )
        .await
    }

    /// Sends a follow-up message: at once when the agent is idle, else queued
    /// until its turn ends.
    pub async fn say(self: &Arc<Self>, id: &str, text: &str) -> Result<TaskRecord, Error> {
        if text.trim().is_empty() || text.len() > atelier_core::task::MAX_MESSAGE_BYTES {
            return Err(Error::invalid(format!(
                "a message must be 1 to {} bytes",
                atelier_core::task::MAX_MESSAGE_BYTES
            )));
        }
        let lock = self.lock(id);
        let _g = lock.lock().await;
        let t = self.get(id).await?;
        match t.state {
            TaskState::Review => {
                self.unpark(&t).await?;
                let t = self.get(id).await?;
                driver::prompt(self, &t, text).await?;
                Ok(self
                    .store
                    .task_transition(id, TaskState::Working, None)
                    .await?)
            }
            TaskState::Queued | TaskState::Starting | TaskState::Working | TaskState::Waiting => {
                let mut q: Vec<String> = serde_json::from_str(&t.pending_say).unwrap_or_default();
                if q.len() >= 32 {
                    return Err(Error::new(
                        ErrorKind::ResourceExhausted,
                        format!("task {id} already has 32 queued messages"),
                    ));
                }
                q.push(text.to_owned());
                Ok(self
                    .store
                    .update_task(
                        id,
                        TaskPatch {
                            pending_say: Some(serde_json::to_string(&q).unwrap_or_default()),
                            ..Default::default()
                        },
                    )
                    .await?)
            }
            other => Err(Error::conflict(format!(
                "task {id} is {other}; messages go to a started task that is not over"
            ))),
        }
    }

    /// The task's conversation, the newest `limit` messages (1 to
    /// [`conversation::MAX_LIMIT`]) oldest first: read from OpenCode while the task's
    /// sandbox runs, else the copy kept on the task (empty before it has a session).
    pub async fn messages(
        &self,
        id: &str,
        limit: usize,
    ) -> Result<conversation::Conversation, Error> {
        if limit == 0 || limit > conversation::MAX_LIMIT {
            return Err(Error::invalid(format!(
                "limit {limit} is out of range: give 1 to {}",
                conversation::MAX_LIMIT
            )));
        }
        let t = self.get(id).await?;
        if t.state.has_session()
            && !t.parked
            && let Some(session) = &t.session
        {
            match driver::read_conversation(self, &t, session, limit).await {
                Ok((messages, truncated)) => {
                    return Ok(conversation::Conversation {
                        task: t.id,
                        session: Some(session.clone()),
                        live: true,
                        captured_at: None,
                        truncated,
                        messages,
                    });
                }
                Err(e) => {
                    tracing::info!(task = %t.id, error = %e.message, "conversation not readable live; showing the kept copy")
                }
            }
        }
        let (all, kept_truncated) = t
            .conversation
            .as_deref()
            .map(conversation::read_kept)
            .unwrap_or_default();
        let (messages, cut) = conversation::newest(all, limit);
        Ok(conversation::Conversation {
            task: t.id,
            session: t.session,
            live: false,
            captured_at: t.conversation_at,
            truncated: kept_truncated || cut,
            messages,
        })
    }

    /// The branch's diff vs its base: live from the sandbox while the task has
    /// one, else what was kept when it ended.
    pub async fn diff(&self, id: &str) -> Result<(String, bool), Error> {
        let t = self.get(id).await?;
        if t.state.has_session()
            && !t.parked
            && let (Some(sb), Some(repo), Some(base)) = (&t.sandbox, &t.repo_path, &t.base_commit)
            && let Ok(o) = git::outcome(&self.sandboxes, sb, repo, base).await
        {
            return Ok((o.diff, o.truncated));
        }
        Ok((t.diff.unwrap_or_default(), t.diff_truncated))
    }

    /// Finishes a task: aborts a busy turn, commits what is uncommitted, pushes the
    /// branch from the host, keeps diff and commits, stops the sandbox.
    pub async fn done(self: &Arc<Self>, id: &str) -> Result<TaskRecord, Error> {
        let lock = self.lock(id);
        let _g = lock.lock().await;
        let t = self.get(id).await?;
        if !t.state.has_session() {
            return Err(Error::conflict(format!(
                "task {id} is {}; only a started task with a session can be marked done",
                t.state
            )));
        }
        self.unpark(&t).await?;
        let t = self
            .store
            .task_transition(id, TaskState::Finishing, None)
            .await?;
        self.stop_driver(id);
        match self.finish(&t).await {
            Ok(()) => {
                self.drop_pending(id).await;
                let rec = self
                    .store
                    .task_transition(id, TaskState::Done, None)
                    .await?;
                self.release_sandbox(&rec, false).await;
                self.wake.notify_one();
                Ok(self.get(id).await?)
            }
            Err(e) => {
                let _ = self
                    .store
                    .task_transition(
                        id,
                        TaskState::Failed,
                        Some(&format!("finishing: {}", e.message)),
                    )
                    .await;
                self.drop_pending(id).await;
                self.wake.notify_one();
                Err(e)
            }
        }
    }

    async fn finish(self: &Arc<Self>, t: &TaskRecord) -> Result<(), Error> {
        let (Some(sb), Some(repo), Some(base)) = (&t.sandbox, &t.repo_path, &t.base_commit) else {
            return Err(Error::internal(format!(
                "task {} has no sandbox or repository",
                t.id
            )));
        };
        let _ = driver::abort(self, t).await;
        // The conversation as it ended, for when the sandbox is stopped.
        if let Err(e) = driver::keep_conversation(self, t).await {
            tracing::info!(task = %t.id, error = %e.message, "could not keep the conversation");
        }
        let message = format!(
            "{}\n\nAtelier task {} ({} template, {} effort).",
            t.title,
            t.id,
            t.template,
            t.effort.as_str()
        );
        let out = git::finish(&self.sandboxes, sb, repo, base, &message).await?;
        git::bundle(&self.sandboxes, sb, repo, &t.branch).await?;
        let dir = self.workspaces.scratch_dir(&t.id)?;
        let local = dir.join("branch.bundle");
        let pushed = async {
            self.sandboxes
                .copy_out(sb, git::GUEST_BUNDLE, &local, git::MAX_BUNDLE_BYTES)
                .await?;
            self.workspaces
                .push_branch(&t.workspace, 0, &t.branch, &local)
                .await
        }
        .await;
        let _ = std::fs::remove_dir_all(&dir);
        pushed?;
        let commits: Vec<serde_json::Value> = out
            .commits
            .iter()
            .map(|(id, subject)| serde_json::json!({"id": id, "subject": subject}))
            .collect();
        self.store
            .update_task(
                &t.id,
                TaskPatch {
                    diff: Some((out.diff, out.truncated)),
                    commits: Some(serde_json::to_string(&commits).unwrap_or_default()),
                    files: Some(serde_json::to_string(&out.files).unwrap_or_default()),
                    ..Default::default()
                },
            )
            .await?;
        Ok(())
    }

    /// Attention items, newest first (pending only unless `all`), of one task when
    /// given.
    pub async fn attention(
        &self,
        task: Option<&str>,
        all: bool,
    ) -> Result<Vec<AttentionRecord>, Error> {
        Ok(self.store.attention_list(task, !all).await?)
    }

    /// One attention item.
    pub async fn attention_item(&self, id: &str) -> Result<AttentionRecord, Error> {
        self.store
            .attention(id)
            .await?
            .ok_or_else(|| Error::not_found(format!("attention item {id} not found")))
    }

    /// Answers a pending item: hands the answer to OpenCode (resuming a parked
    /// sandbox first) and records it. Returns the item and the other items that
    /// went with it (a permission reject also rejects the session's other pending
    /// requests).
    pub async fn answer(
        self: &Arc<Self>,
        item: &str,
        answer: Answer,
    ) -> Result<(AttentionRecord, Vec<AttentionRecord>), Error> {
        let a = self.attention_item(item).await?;
        answer.validate_for(a.kind).map_err(Error::from)?;
        let lock = self.lock(&a.task);
        let _g = lock.lock().await;
        let a = self.attention_item(item).await?;
        if a.status != AttentionStatus::Pending {
            return Err(Error::conflict(format!(
                "attention item {item} is already {}",
                a.status.as_str()
            )));
        }
        let t = self.get(&a.task).await?;
        if a.kind == AttentionKind::Budget {
            return Ok((self.answer_budget(&t, &a, answer).await?, Vec::new()));
        }
        self.unpark(&t).await?;
        let t = self.get(&a.task).await?;
        let delivered = driver::deliver(self, &t, &a, &answer).await;
        if let Err(e) = delivered {
            if e.kind == ErrorKind::NotFound {
                // OpenCode no longer has it: answered elsewhere, or rejected along
                // with another item.
                let _ = self
                    .store
                    .resolve_attention(item, AttentionStatus::Gone, None)
                    .await;
                return Err(Error::conflict(format!(
                    "attention item {item} is no longer pending in the agent (answered elsewhere, or rejected with another request)"
                )));
            }
            return Err(e);
        }
        let json = serde_json::to_string(&answer).unwrap_or_default();
        let rec = self
            .store
            .resolve_attention(item, AttentionStatus::Answered, Some(&json))
            .await?;
        let mut also = Vec::new();
        if matches!(answer, Answer::Reject { .. }) && a.kind == AttentionKind::Permission {
            also = driver::resync_pending(self, &t).await.unwrap_or_default();
        }
        if matches!(answer, Answer::Always)
            && let Ok(detail) = serde_json::from_str::<serde_json::Value>(&a.detail)
        {
            let mut always: Vec<serde_json::Value> =
                serde_json::from_str(&t.always).unwrap_or_default();
            always.push(serde_json::json!({
                "permission": detail["permission"],
                "patterns": detail["always"],
            }));
            let _ = self
                .store
                .update_task(
                    &t.id,
                    TaskPatch {
                        always: Some(serde_json::to_string(&always).unwrap_or_default()),
                        ..Default::default()
                    },
                )
                .await;
        }
        self.after_answer(&t.id).await;
        Ok((rec, also))
    }

    /// Answers a `budget` item: `continue` sets the task's new limits (or lifts the
    /// one reached) and, when the turn was stopped by it, tells the agent to carry
    /// on; `stop` leaves the task in review.
    async fn answer_budget(
        self: &Arc<Self>,
        t: &TaskRecord,
        a: &AttentionRecord,
        answer: Answer,
    ) -> Result<AttentionRecord, Error> {
        let detail: serde_json::Value = serde_json::from_str(&a.detail).unwrap_or_default();
        let aborted = detail["aborted"].as_bool().unwrap_or(false);
        let json = serde_json::to_string(&answer).unwrap_or_default();
        match answer {
            Answer::Continue {
                budget_usd,
                budget_tokens,
            } => {
                let used_tokens = t.tokens_in.saturating_add(t.tokens_out);
                if let Some(u) = budget_usd
                    && u <= t.cost
                {
                    return Err(Error::invalid(format!(
                        "budget_usd {u} is not above what task {} has used (${:.4}); give more, or none to lift the limit",
                        t.id, t.cost
                    )));
                }
                if let Some(n) = budget_tokens
                    && n <= used_tokens
                {
                    return Err(Error::invalid(format!(
                        "budget_tokens {n} is not above what task {} has used ({used_tokens} tokens); give more, or none to lift the limit",
                        t.id
                    )));
                }
                let workspace_scope = detail["scope"] == "workspace";
                let given = budget_usd.is_some() || budget_tokens.is_some();
                let patch = TaskPatch {
                    budget: (given || !workspace_scope).then_some((budget_usd, budget_tokens)),
                    workspace_budget_waived: workspace_scope.then_some(true),
                    ..Default::default()
                };
                self.store.update_task(&t.id, patch).await?;
                let rec = self
                    .store
                    .resolve_attention(&a.id, AttentionStatus::Answered, Some(&json))
                    .await?;
                if aborted && t.state.has_session() {
                    self.unpark(t).await?;
                    let t = self.get(&t.id).await?;
                    driver::prompt(
                        self,
                        &t,
                        "The budget was raised. Carry on with the task from where you stopped.",
                    )
                    .await?;
                    self.after_answer(&t.id).await;
                } else {
                    self.settle_idle(&t.id).await;
                }
                Ok(rec)
            }
            Answer::Stop => {
                let rec = self
                    .store
                    .resolve_attention(&a.id, AttentionStatus::Answered, Some(&json))
                    .await?;
                self.settle_idle(&t.id).await;
                Ok(rec)
            }
            _ => Err(Error::invalid(
                "a budget item takes continue or stop".to_owned(),
            )),
        }
    }

    /// A waiting task whose turn is over and has nothing pending goes to review.
    async fn settle_idle(&self, task: &str) {
        self.leave_waiting(task, TaskState::Review).await;
    }

    /// After an answer: a task with nothing pending works again.
    async fn after_answer(&self, task: &str) {
        self.leave_waiting(task, TaskState::Working).await;
    }

    /// A waiting task with nothing pending any more moves on to `to`.
    async fn leave_waiting(&self, task: &str, to: TaskState) {
        if let Ok(t) = self.get(task).await
            && t.state == TaskState::Waiting
            && self
                .store
                .attention_list(Some(task), true)
                .await
                .is_ok_and(|l| l.is_empty())
        {
            let _ = self.store.task_transition(task, to, None).await;
        }
    }

    /// Marks every pending item of a task gone.
    async fn drop_pending(&self, task: &str) {
        if let Ok(items) = self.store.attention_list(Some(task), true).await {
            for i in items {
                let _ = self
                    .store
                    .resolve_attention(&i.id, AttentionStatus::Gone, None)
                    .await;
            }
        }
    }

    /// Resumes a parked task's sandbox (and reconnects its driver).
    async fn unpark(self: &Arc<Self>, t: &TaskRecord) -> Result<(), Error> {
        if !t.parked {
            return Ok(());
        }
        let sb = t
            .sandbox
            .as_deref()
            .ok_or_else(|| Error::internal(format!("parked task {} has no sandbox", t.id)))?;
        self.sandboxes.resume(sb).await?;
        self.store
            .update_task(
                &t.id,
                TaskPatch {
                    parked: Some(false),
                    ..Default::default()
                },
            )
            .await?;
        tracing::info!(task = %t.id, sandbox = %sb, "unparked: sandbox resumed");
        self.start_driver(&t.id);
        Ok(())
    }

    /// Deletes (or, when `delete` is false, stops) a task's sandbox, if any.
    async fn release_sandbox(&self, t: &TaskRecord, delete: bool) {
        let Some(sb) = &t.sandbox else { return };
        let r = if delete {
            self.sandboxes.delete(sb).await
        } else {
            self.sandboxes.stop(sb).await
        };
        if let Err(e) = r
            && e.kind != ErrorKind::NotFound
        {
            tracing::warn!(task = %t.id, sandbox = %sb, error = %e.message, "could not release the task's sandbox");
        }
        if delete {
            let _ = self
                .store
                .update_task(
                    &t.id,
                    TaskPatch {
                        sandbox: Some(None),
                        ..Default::default()
                    },
                )
                .await;
        }
    }

    fn stop_driver(&self, task: &str) {
        if let Some(h) = lock_map(&self.drivers).remove(task) {
            h.abort();
        }
    }

    fn start_driver(self: &Arc<Self>, task: &str) {
        let me = Arc::clone(self);
        let id = task.to_owned();
        let h = tokio::spawn(async move { driver::follow(me, id).await });
        if let Some(old) = lock_map(&self.drivers).insert(task.to_owned(), h.abort_handle()) {
            old.abort();
        }
    }

    /// Starts the scheduler and picks up what a restart interrupted: tasks that
    /// were starting are queued again (their half-made sandbox deleted), tasks with
    /// a session get their driver back, finishing ones finish.
    pub fn spawn(self: &Arc<Self>) {
        let me = Arc::clone(self);
        tokio::spawn(async move {
            if let Err(e) = me.recover().await {
                tracing::warn!(error = %e.message, "recovering tasks after start-up failed");
            }
            loop {
                if let Err(e) = me.schedule().await {
                    tracing::warn!(error = %e.message, "task scheduling failed");
                }
                let _ = tokio::time::timeout(Duration::from_secs(5), me.wake.notified()).await;
            }
        });
    }

    async fn recover(self: &Arc<Self>) -> Result<(), Error> {
        for t in self.store.tasks(None, &[TaskState::Starting]).await? {
            self.delete_task_sandbox(&t).await;
            self.store
                .task_transition(&t.id, TaskState::Queued, None)
                .await?;
        }
        for t in self
            .store
            .tasks(
                None,
                &[TaskState::Working, TaskState::Waiting, TaskState::Review],
            )
            .await?
        {
            if !t.parked {
                self.start_driver(&t.id);
            }
        }
        for t in self.store.tasks(None, &[TaskState::Finishing]).await? {
            let _ = self
                .store
                .task_transition(
                    &t.id,
                    TaskState::Failed,
                    Some("the manager restarted while the branch was being pushed; retry, or chain a task"),
                )
                .await;
        }
        Ok(())
    }

    /// A sandbox named after the task (made before its id was recorded) is deleted.
    async fn delete_task_sandbox(&self, t: &TaskRecord) {
        let target = t.sandbox.clone().unwrap_or_else(|| t.id.clone());
        match self.sandboxes.delete(&target).await {
            Ok(_) => {
                tracing::info!(task = %t.id, sandbox = %target, "deleted a half-made task sandbox")
            }
            Err(e) if e.kind == ErrorKind::NotFound => {}
            Err(e) => {
                tracing::warn!(task = %t.id, error = %e.message, "could not delete a half-made task sandbox")
            }
        }
    }

    /// Starts queued tasks, oldest first, while fewer than the cap hold a running
    /// sandbox.
    async fn schedule(self: &Arc<Self>) -> Result<(), Error> {
        let active = self
            .store
            .tasks(
                None,
                &[
                    TaskState::Starting,
                    TaskState::Working,
                    TaskState::Waiting,
                    TaskState::Review,
                    TaskState::Finishing,
                ],
            )
            .await?
            .into_iter()
            .filter(|t| !t.parked)
            .count();
        for t in self
            .queue()
            .await?
            .into_iter()
            .take(self.cfg.max_running.saturating_sub(active))
        {
            if self
                .store
                .task_transition(&t.id, TaskState::Starting, None)
                .await
                .is_ok()
            {
                let me = Arc::clone(self);
                let id = t.id.clone();
                tokio::spawn(async move { me.run_start(&id).await });
            }
        }
        Ok(())
    }

    /// The queued tasks of every workspace, in the order they will start.
    pub async fn queue(&self) -> Result<Vec<TaskRecord>, Error> {
        let mut queued = self.store.tasks(None, &[TaskState::Queued]).await?;
        queued.reverse();
        Ok(queued)
    }

    /// Where a queued task stands in the queue (1 = next), if it is queued.
    pub async fn queue_position(&self, id: &str) -> Result<Option<usize>, Error> {
        Ok(self
            .queue()
            .await?
            .iter()
            .position(|t| t.id == id)
            .map(|p| p + 1))
    }

    /// Sets up a starting task: prebuild, sandbox, branch, session, prompt. On
    /// failure the task fails with the reason and its sandbox is deleted.
    async fn run_start(self: &Arc<Self>, id: &str) {
        let result = self.set_up(id).await;
        match result {
            Ok(()) => self.start_driver(id),
            Err(e) => {
                tracing::warn!(task = %id, error = %e.message, "task failed to start");
                if let Ok(t) = self.get(id).await {
                    if t.state == TaskState::Starting {
                        let _ = self
                            .store
                            .task_transition(id, TaskState::Failed, Some(&e.message))
                            .await;
                    }
                    self.release_sandbox(&t, true).await;
                }
                self.wake.notify_one();
            }
        }
    }

    async fn set_up(self: &Arc<Self>, id: &str) -> Result<(), Error> {
        let t = self.get(id).await?;
        let spec = self.workspaces.spec(&t.workspace).await?;
        let repo = spec
            .repos
            .first()
            .ok_or_else(|| Error::invalid(format!("workspace {} has no repository", t.workspace)))?
            .path
            .clone();
        let task_id = t.id.clone();
        self.workspaces
            .ensure_prebuild(&t.workspace, &move |line| {
                tracing::info!(task = %task_id, "{line}");
            })
            .await?;
        let began = std::time::Instant::now();
        // Named after the task: a crash before the id is recorded still finds it.
        let sb = self
            .sandboxes
            .create(SandboxSpec {
                name: t.id.clone(),
                image: spec.image.clone(),
                vcpus: spec.resources.vcpus,
                memory_mib: spec.resources.memory_mib,
                mounts: Vec::new(),
                mount_owner: None,
                cold_boot: false,
                egress: spec.egress.clone(),
                workspace: Some(t.workspace.clone()),
            })
            .await?;
        let sandbox = sb.id.to_string();
        let restored = began.elapsed();
        self.store
            .update_task(
                id,
                TaskPatch {
                    sandbox: Some(Some(sandbox.clone())),
                    repo_path: Some(repo.clone()),
                    ..Default::default()
                },
            )
            .await?;
        let base = git::start_branch(
            &self.sandboxes,
            &sandbox,
            &repo,
            &t.branch,
            t.parent.is_some(),
        )
        .await?;
        self.store
            .update_task(
                id,
                TaskPatch {
                    base_commit: Some(base),
                    ..Default::default()
                },
            )
            .await?;
        let branched = began.elapsed();
        let t = self.get(id).await?;
        let template = self.task_template(&t).await?;
        driver::open_session(self, &t, &template).await?;
        tracing::info!(
            task = %id,
            sandbox = %sandbox,
            restore_ms = restored.as_millis() as u64,
            branch_ms = (branched - restored).as_millis() as u64,
            session_ms = (began.elapsed() - branched).as_millis() as u64,
            "task set up: sandbox restored, branch made, prompt sent"
        );
        self.store
            .task_transition(id, TaskState::Working, None)
            .await?;
        Ok(())
    }
}
