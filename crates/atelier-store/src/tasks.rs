//! Task rows and their attention items. A task's state moves only through
//! [`Store::task_transition`], which checks the move inside the UPDATE; an attention
//! item is resolved once, checked the same way.

use atelier_core::task::{AttentionKind, AttentionStatus, Effort, TaskState};
use sqlx::Row;

use crate::{Change, Store, StoreError, now_ms, q};

/// A task as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskRecord {
    /// `tk-` id.
    pub id: String,
    /// Workspace name.
    pub workspace: String,
    /// Template name.
    pub template: String,
    /// Effort level.
    pub effort: Effort,
    /// One line.
    pub title: String,
    /// What the user asked for.
    pub description: String,
    /// Where it is.
    pub state: TaskState,
    /// The task it was chained from.
    pub parent: Option<String>,
    /// Its git branch.
    pub branch: String,
    /// The branch it started from.
    pub base_branch: String,
    /// The base's commit when it started.
    pub base_commit: Option<String>,
    /// Guest path of the repository it works in.
    pub repo_path: Option<String>,
    /// Sandbox id while it has one.
    pub sandbox: Option<String>,
    /// OpenCode session id.
    pub session: Option<String>,
    /// Its sandbox is paused while it waits on a person.
    pub parked: bool,
    /// Why it failed.
    pub error: Option<String>,
    /// Todos done.
    pub todos_done: i64,
    /// Todos in all.
    pub todos_total: i64,
    /// JSON list of todos (`content`, `status`).
    pub todos: String,
    /// JSON list of files the agent edited.
    pub files: String,
    /// Assistant messages so far.
    pub messages: i64,
    /// Input tokens so far.
    pub tokens_in: i64,
    /// Output tokens (and reasoning) so far.
    pub tokens_out: i64,
    /// Cost so far, in the provider's currency (USD for most).
    pub cost: f64,
    /// The agent's last text.
    pub summary: Option<String>,
    /// JSON list of "always" answers (`permission`, `patterns`).
    pub always: String,
    /// JSON list of follow-ups queued while the agent was busy.
    pub pending_say: String,
    /// The branch's diff vs its base, once done (or while reviewing).
    pub diff: Option<String>,
    /// The diff was cut at the size limit.
    pub diff_truncated: bool,
    /// JSON list of commits (`id`, `subject`).
    pub commits: String,
    /// The task's own cost limit (USD).
    pub budget_usd: Option<f64>,
    /// The task's own token limit (input + output).
    pub budget_tokens: Option<i64>,
    /// A person let it go on past its workspace's budget.
    pub workspace_budget_waived: bool,
    /// The session's messages as last read (JSON), for when the sandbox is gone.
    pub conversation: Option<String>,
    /// When they were read, ms since epoch.
    pub conversation_at: Option<i64>,
    /// Created, ms since epoch.
    pub created_at: i64,
    /// Last started.
    pub started_at: Option<i64>,
    /// Ended (done, failed, cancelled).
    pub finished_at: Option<i64>,
    /// Last change.
    pub updated_at: i64,
}

/// Usage of one workspace's tasks, summed.
#[derive(Debug, Clone, PartialEq)]
pub struct WorkspaceUsage {
    /// Workspace name.
    pub workspace: String,
    /// Tasks.
    pub tasks: i64,
    /// Assistant messages.
    pub messages: i64,
    /// Input tokens.
    pub tokens_in: i64,
    /// Output tokens.
    pub tokens_out: i64,
    /// Cost.
    pub cost: f64,
}

/// A new task row.
#[derive(Debug, Clone)]
pub struct NewTask {
    /// `tk-` id.
    pub id: String,
    /// Workspace.
    pub workspace: String,
    /// Template.
    pub template: String,
    /// Effort.
    pub effort: Effort,
    /// One line.
    pub title: String,
    /// The prompt.
    pub description: String,
    /// `backlog` or `queued`.
    pub state: TaskState,
    /// Chained from.
    pub parent: Option<String>,
    /// Branch.
    pub branch: String,
    /// Base branch.
    pub base_branch: String,
    /// Cost limit (USD).
    pub budget_usd: Option<f64>,
    /// Token limit.
    pub budget_tokens: Option<i64>,
}

/// Fields a running task updates; `None` leaves a column as it is.
#[derive(Debug, Clone, Default)]
pub struct TaskPatch {
    /// Sandbox id (`Some(None)` clears it).
    pub sandbox: Option<Option<String>>,
    /// OpenCode session.
    pub session: Option<Option<String>>,
    /// Base commit.
    pub base_commit: Option<String>,
    /// Repository path.
    pub repo_path: Option<String>,
    /// Parked.
    pub parked: Option<bool>,
    /// Todos: (done, total, JSON list).
    pub todos: Option<(i64, i64, String)>,
    /// Files edited (JSON list).
    pub files: Option<String>,
    /// Usage: (messages, tokens in, tokens out, cost).
    pub usage: Option<(i64, i64, i64, f64)>,
    /// The agent's last text.
    pub summary: Option<String>,
    /// "Always" answers (JSON list).
    pub always: Option<String>,
    /// Follow-ups queued (JSON list).
    pub pending_say: Option<String>,
    /// Diff and whether it was truncated.
    pub diff: Option<(String, bool)>,
    /// Commits (JSON list).
    pub commits: Option<String>,
    /// Error text (`Some(None)` clears it).
    pub error: Option<Option<String>>,
    /// The task's budget: (USD, tokens), `None` in either clears that limit.
    pub budget: Option<(Option<f64>, Option<i64>)>,
    /// The workspace's budget is waived for this task.
    pub workspace_budget_waived: Option<bool>,
    /// The conversation as last read (JSON), stamped now.
    pub conversation: Option<String>,
}

fn task_from_row(r: &sqlx::sqlite::SqliteRow) -> Result<TaskRecord, StoreError> {
    let state: String = r.get("state");
    let effort: String = r.get("effort");
    let corrupt = |detail: String| StoreError::Corrupt {
        table: "tasks",
        detail,
    };
    Ok(TaskRecord {
        state: TaskState::parse(&state).ok_or_else(|| corrupt(format!("state {state:?}")))?,
        effort: Effort::parse(&effort).ok_or_else(|| corrupt(format!("effort {effort:?}")))?,
        id: r.get("id"),
        workspace: r.get("workspace"),
        template: r.get("template"),
        title: r.get("title"),
        description: r.get("description"),
        parent: r.get("parent"),
        branch: r.get("branch"),
        base_branch: r.get("base_branch"),
        base_commit: r.get("base_commit"),
        repo_path: r.get("repo_path"),
        sandbox: r.get("sandbox"),
        session: r.get("session"),
        parked: r.get::<i64, _>("parked") != 0,
        error: r.get("error"),
        todos_done: r.get("todos_done"),
        todos_total: r.get("todos_total"),
        todos: r.get("todos"),
        files: r.get("files"),
        messages: r.get("messages"),
        tokens_in: r.get("tokens_in"),
        tokens_out: r.get("tokens_out"),
        cost: r.get("cost"),
        summary: r.get("summary"),
        always: r.get("always"),
        pending_say: r.get("pending_say"),
        diff: r.get("diff"),
        diff_truncated: r.get::<i64, _>("diff_truncated") != 0,
        commits: r.get("commits"),
        budget_usd: r.get("budget_usd"),
        budget_tokens: r.get("budget_tokens"),
        workspace_budget_waived: r.get::<i64, _>("workspace_budget_waived") != 0,
        conversation: r.get("conversation"),
        conversation_at: r.get("conversation_at"),
        created_at: r.get("created_at"),
        started_at: r.get("started_at"),
        finished_at: r.get("finished_at"),
        updated_at: r.get("updated_at"),
    })
}

/// An attention item as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct AttentionRecord {
    /// `at-` id.
    pub id: String,
    /// Its task.
    pub task: String,
    /// Permission, question, stalled or budget.
    pub kind: AttentionKind,
    /// OpenCode's request id (empty for stalled and budget items).
    pub remote_id: String,
    /// One line.
    pub title: String,
    /// JSON: what OpenCode sent.
    pub detail: String,
    /// Pending, answered or gone.
    pub status: AttentionStatus,
    /// JSON answer, once answered.
    pub answer: Option<String>,
    /// Raised, ms since epoch.
    pub created_at: i64,
    /// Answered or gone.
    pub resolved_at: Option<i64>,
}

fn attention_from_row(r: &sqlx::sqlite::SqliteRow) -> Result<AttentionRecord, StoreError> {
    let kind: String = r.get("kind");
    let status: String = r.get("status");
    let corrupt = |detail: String| StoreError::Corrupt {
        table: "attention",
        detail,
    };
    Ok(AttentionRecord {
        kind: AttentionKind::parse(&kind).ok_or_else(|| corrupt(format!("kind {kind:?}")))?,
        status: AttentionStatus::parse(&status)
            .ok_or_else(|| corrupt(format!("status {status:?}")))?,
        id: r.get("id"),
        task: r.get("task"),
        remote_id: r.get("remote_id"),
        title: r.get("title"),
        detail: r.get("detail"),
        answer: r.get("answer"),
        created_at: r.get("created_at"),
        resolved_at: r.get("resolved_at"),
    })
}

impl Store {
    /// Records a new task.
    pub async fn insert_task(&self, t: &NewTask) -> Result<TaskRecord, StoreError> {
        let now = now_ms();
        sqlx::query(
            "INSERT INTO tasks (id, workspace, template, effort, title, description, state, parent, branch, base_branch, budget_usd, budget_tokens, created_at, updated_at)
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(&t.id)
        .bind(&t.workspace)
        .bind(&t.template)
        .bind(t.effort.as_str())
        .bind(&t.title)
        .bind(&t.description)
        .bind(t.state.as_str())
        .bind(&t.parent)
        .bind(&t.branch)
        .bind(&t.base_branch)
        .bind(t.budget_usd)
        .bind(t.budget_tokens)
        .bind(now)
        .bind(now)
        .execute(&self.pool)
        .await
        .map_err(q("insert task"))?;
        let rec = self
            .task(&t.id)
            .await?
            .ok_or_else(|| StoreError::TaskNotFound(t.id.clone()))?;
        self.notify(Change::Task {
            record: Box::new(rec.clone()),
            from: None,
        });
        Ok(rec)
    }

    /// One task.
    pub async fn task(&self, id: &str) -> Result<Option<TaskRecord>, StoreError> {
        let row = sqlx::query("SELECT * FROM tasks WHERE id = ?")
            .bind(id)
            .fetch_optional(&self.pool)
            .await
            .map_err(q("get task"))?;
        row.as_ref().map(task_from_row).transpose()
    }

    /// Tasks, newest first, optionally of one workspace and/or in some states.
    pub async fn tasks(
        &self,
        workspace: Option<&str>,
        states: &[TaskState],
    ) -> Result<Vec<TaskRecord>, StoreError> {
        let states: Vec<&str> = states.iter().map(|s| s.as_str()).collect();
        let rows = sqlx::query(
            "SELECT * FROM tasks WHERE (? IS NULL OR workspace = ?)
               AND (? = '[]' OR state IN (SELECT value FROM json_each(?)))
             ORDER BY created_at DESC, id",
        )
        .bind(workspace)
        .bind(workspace)
        .bind(serde_json::to_string(&states).unwrap_or_else(|_| "[]".into()))
        .bind(serde_json::to_string(&states).unwrap_or_else(|_| "[]".into()))
        .fetch_all(&self.pool)
        .await
        .map_err(q("list tasks"))?;
        rows.iter().map(task_from_row).collect()
    }

    /// Usage summed per workspace over all its tasks: (workspace, tasks, messages,
    /// tokens in, tokens out, cost), by workspace name.
    pub async fn task_usage(&self) -> Result<Vec<WorkspaceUsage>, StoreError> {
        let rows = sqlx::query(
            "SELECT workspace, COUNT(*) AS n, SUM(messages) AS m, SUM(tokens_in) AS i,
                    SUM(tokens_out) AS o, SUM(cost) AS c
             FROM tasks GROUP BY workspace ORDER BY workspace",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(q("task usage"))?;
        Ok(rows
            .iter()
            .map(|r| WorkspaceUsage {
                workspace: r.get("workspace"),
                tasks: r.get("n"),
                messages: r.get("m"),
                tokens_in: r.get("i"),
                tokens_out: r.get("o"),
                cost: r.get("c"),
            })
            .collect())
    }

    /// Cost and tokens (input + output) of every task of one workspace, summed.
    pub async fn workspace_spend(&self, workspace: &str) -> Result<(f64, i64), StoreError> {
        let row = sqlx::query(
            "SELECT COALESCE(SUM(cost), 0.0) AS c, COALESCE(SUM(tokens_in + tokens_out), 0) AS t
             FROM tasks WHERE workspace = ?",
        )
        .bind(workspace)
        .fetch_one(&self.pool)
        .await
        .map_err(q("workspace spend"))?;
        Ok((row.get("c"), row.get("t")))
    }

    /// Moves a task to `to` if [`TaskState::can_transition_to`] allows it from its
    /// state now (checked in the UPDATE), with `error` kept when given. Entering
    /// `starting` stamps `started_at`; a terminal state stamps `finished_at`;
    /// `queued` clears the error.
    pub async fn task_transition(
        &self,
        id: &str,
        to: TaskState,
        error: Option<&str>,
    ) -> Result<TaskRecord, StoreError> {
        // Read, check, then update only if the state is still the one read: a
        // concurrent move makes the update miss and is reported as a conflict.
        let Some(before) = self.task(id).await? else {
            return Err(StoreError::TaskNotFound(id.to_owned()));
        };
        if !before.state.can_transition_to(to) {
            return Err(StoreError::TaskTransition {
                id: id.to_owned(),
                from: before.state,
                to,
            });
        }
        let now = now_ms();
        let done = sqlx::query(
            "UPDATE tasks SET state = ?1,
                 error = CASE WHEN ?2 IS NOT NULL THEN ?2 WHEN ?1 = 'queued' THEN NULL ELSE error END,
                 started_at = CASE WHEN ?1 = 'starting' THEN ?3 ELSE started_at END,
                 finished_at = CASE WHEN ?1 IN ('done', 'failed', 'cancelled') THEN ?3
                                    WHEN ?1 = 'queued' THEN NULL ELSE finished_at END,
                 updated_at = ?3
             WHERE id = ?4 AND state = ?5",
        )
        .bind(to.as_str())
        .bind(error)
        .bind(now)
        .bind(id)
        .bind(before.state.as_str())
        .execute(&self.pool)
        .await
        .map_err(q("task transition"))?;
        let rec = self
            .task(id)
            .await?
            .ok_or_else(|| StoreError::TaskNotFound(id.to_owned()))?;
        if done.rows_affected() == 0 {
            return Err(StoreError::TaskTransition {
                id: id.to_owned(),
                from: rec.state,
                to,
            });
        }
        self.notify(Change::Task {
            record: Box::new(rec.clone()),
            from: Some(before.state),
        });
        Ok(rec)
    }

    /// Updates the columns `patch` sets and tells the observer.
    pub async fn update_task(&self, id: &str, patch: TaskPatch) -> Result<TaskRecord, StoreError> {
        let mut b: sqlx::QueryBuilder<sqlx::Sqlite> =
            sqlx::QueryBuilder::new("UPDATE tasks SET updated_at = ");
        b.push_bind(now_ms());
        if let Some(v) = patch.sandbox {
            b.push(", sandbox = ").push_bind(v);
        }
        if let Some(v) = patch.session {
            b.push(", session = ").push_bind(v);
        }
        if let Some(v) = patch.base_commit {
            b.push(", base_commit = ").push_bind(v);
        }
        if let Some(v) = patch.repo_path {
            b.push(", repo_path = ").push_bind(v);
        }
        if let Some(v) = patch.parked {
            b.push(", parked = ").push_bind(v as i64);
        }
        if let Some((done, total, list)) = patch.todos {
            b.push(", todos_done = ").push_bind(done);
            b.push(", todos_total = ").push_bind(total);
            b.push(", todos = ").push_bind(list);
        }
        if let Some(v) = patch.files {
            b.push(", files = ").push_bind(v);
        }
        if let Some((m, i, o, c)) = patch.usage {
            b.push(", messages = ").push_bind(m);
            b.push(", tokens_in = ").push_bind(i);
            b.push(", tokens_out = ").push_bind(o);
            b.push(", cost = ").push_bind(c);
        }
        if let Some(v) = patch.summary {
            b.push(", summary = ").push_bind(v);
        }
        if let Some(v) = patch.always {
            b.push(", always = ").push_bind(v);
        }
        if let Some(v) = patch.pending_say {
            b.push(", pending_say = ").push_bind(v);
        }
        if let Some((d, cut)) = patch.diff {
            b.push(", diff = ").push_bind(d);
            b.push(", diff_truncated = ").push_bind(cut as i64);
        }
        if let Some(v) = patch.commits {
            b.push(", commits = ").push_bind(v);
        }
        if let Some(v) = patch.error {
            b.push(", error = ").push_bind(v);
        }
        if let Some((usd, tokens)) = patch.budget {
            b.push(", budget_usd = ").push_bind(usd);
            b.push(", budget_tokens = ").push_bind(tokens);
        }
        if let Some(v) = patch.workspace_budget_waived {
            b.push(", workspace_budget_waived = ").push_bind(v as i64);
        }
        if let Some(v) = patch.conversation {
            b.push(", conversation = ").push_bind(v);
            b.push(", conversation_at = ").push_bind(now_ms());
        }
        b.push(" WHERE id = ").push_bind(id);
        let done = b
            .build()
            .execute(&self.pool)
            .await
            .map_err(q("update task"))?;
        if done.rows_affected() == 0 {
            return Err(StoreError::TaskNotFound(id.to_owned()));
        }
        let rec = self
            .task(id)
            .await?
            .ok_or_else(|| StoreError::TaskNotFound(id.to_owned()))?;
        self.notify(Change::Task {
            record: Box::new(rec.clone()),
            from: Some(rec.state),
        });
        Ok(rec)
    }

    /// Records an attention item; an item with the same task, kind and remote id is
    /// not recorded twice (the existing one is returned, `false`).
    pub async fn insert_attention(
        &self,
        a: &AttentionRecord,
    ) -> Result<(AttentionRecord, bool), StoreError> {
        if !a.remote_id.is_empty()
            && let Some(row) =
                sqlx::query("SELECT * FROM attention WHERE task = ? AND kind = ? AND remote_id = ?")
                    .bind(&a.task)
                    .bind(a.kind.as_str())
                    .bind(&a.remote_id)
                    .fetch_optional(&self.pool)
                    .await
                    .map_err(q("find attention"))?
        {
            return Ok((attention_from_row(&row)?, false));
        }
        sqlx::query(
            "INSERT INTO attention (id, task, kind, remote_id, title, detail, status, created_at)
             VALUES (?, ?, ?, ?, ?, ?, 'pending', ?)",
        )
        .bind(&a.id)
        .bind(&a.task)
        .bind(a.kind.as_str())
        .bind(&a.remote_id)
        .bind(&a.title)
        .bind(&a.detail)
        .bind(a.created_at)
        .execute(&self.pool)
        .await
        .map_err(q("insert attention"))?;
        let rec = self
            .attention(&a.id)
            .await?
            .ok_or_else(|| StoreError::AttentionNotFound(a.id.clone()))?;
        self.notify(Change::Attention(rec.clone()));
        Ok((rec, true))
    }

    /// One attention item.
    pub async fn attention(&self, id: &str) -> Result<Option<AttentionRecord>, StoreError> {
        let row = sqlx::query("SELECT * FROM attention WHERE id = ?")
            .bind(id)
            .fetch_optional(&self.pool)
            .await
            .map_err(q("get attention"))?;
        row.as_ref().map(attention_from_row).transpose()
    }

    /// Attention items, newest first: of one task when given, only pending ones
    /// when `pending`.
    pub async fn attention_list(
        &self,
        task: Option<&str>,
        pending: bool,
    ) -> Result<Vec<AttentionRecord>, StoreError> {
        let rows = sqlx::query(
            "SELECT * FROM attention WHERE (? IS NULL OR task = ?) AND (? = 0 OR status = 'pending')
             ORDER BY created_at DESC, id",
        )
        .bind(task)
        .bind(task)
        .bind(pending as i64)
        .fetch_all(&self.pool)
        .await
        .map_err(q("list attention"))?;
        rows.iter().map(attention_from_row).collect()
    }

    /// Resolves a pending item (answered, with the answer; or gone). An item that
    /// is no longer pending gives [`StoreError::AttentionResolved`].
    pub async fn resolve_attention(
        &self,
        id: &str,
        status: AttentionStatus,
        answer: Option<&str>,
    ) -> Result<AttentionRecord, StoreError> {
        let done = sqlx::query(
            "UPDATE attention SET status = ?, answer = ?, resolved_at = ? WHERE id = ? AND status = 'pending'",
        )
        .bind(status.as_str())
        .bind(answer)
        .bind(now_ms())
        .bind(id)
        .execute(&self.pool)
        .await
        .map_err(q("resolve attention"))?;
        let rec = self
            .attention(id)
            .await?
            .ok_or_else(|| StoreError::AttentionNotFound(id.to_owned()))?;
        if done.rows_affected() == 0 {
            return Err(StoreError::AttentionResolved {
                id: id.to_owned(),
                status: rec.status,
            });
        }
        self.notify(Change::Attention(rec.clone()));
        Ok(rec)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn new(id: &str) -> NewTask {
        NewTask {
            id: id.into(),
            workspace: "shop".into(),
            template: "implementation".into(),
            effort: Effort::Medium,
            title: "Add health".into(),
            description: "Add a /health route".into(),
            state: TaskState::Backlog,
            parent: None,
            branch: format!("atelier/{id}-add"),
            base_branch: "main".into(),
            budget_usd: None,
            budget_tokens: None,
        }
    }

    #[tokio::test]
    async fn tasks_move_only_along_their_state_machine() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(&dir.path().join("db.sqlite")).await.unwrap();
        s.insert_task(&new("tk-a")).await.unwrap();
        assert!(matches!(
            s.task_transition("tk-a", TaskState::Working, None).await,
            Err(StoreError::TaskTransition {
                from: TaskState::Backlog,
                to: TaskState::Working,
                ..
            })
        ));
        s.task_transition("tk-a", TaskState::Queued, None)
            .await
            .unwrap();
        let t = s
            .task_transition("tk-a", TaskState::Starting, None)
            .await
            .unwrap();
        assert!(t.started_at.is_some());
        let t = s
            .task_transition("tk-a", TaskState::Failed, Some("boom"))
            .await
            .unwrap();
        assert_eq!(
            (t.error.as_deref(), t.finished_at.is_some()),
            (Some("boom"), true)
        );
        let t = s
            .task_transition("tk-a", TaskState::Queued, None)
            .await
            .unwrap();
        assert_eq!((t.error, t.finished_at), (None, None));
        assert!(matches!(
            s.task_transition("tk-nope", TaskState::Queued, None).await,
            Err(StoreError::TaskNotFound(_))
        ));
        let t = s
            .update_task(
                "tk-a",
                TaskPatch {
                    todos: Some((1, 3, "[]".into())),
                    usage: Some((2, 100, 20, 0.5)),
                    sandbox: Some(Some("sb-x".into())),
                    ..Default::default()
                },
            )
            .await
            .unwrap();
        assert_eq!(
            (
                t.todos_done,
                t.todos_total,
                t.tokens_in,
                t.sandbox.as_deref()
            ),
            (1, 3, 100, Some("sb-x"))
        );
        assert_eq!(s.tasks(None, &[TaskState::Queued]).await.unwrap().len(), 1);
        let u = s.task_usage().await.unwrap();
        assert_eq!(
            (u.len(), u[0].tasks, u[0].tokens_in, u[0].cost),
            (1, 1, 100, 0.5)
        );
        assert_eq!(s.tasks(Some("other"), &[]).await.unwrap().len(), 0);
    }

    #[tokio::test]
    async fn budgets_spend_and_the_kept_conversation() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(&dir.path().join("db.sqlite")).await.unwrap();
        assert_eq!(s.workspace_spend("shop").await.unwrap(), (0.0, 0));
        let t = s
            .insert_task(&NewTask {
                budget_usd: Some(2.5),
                budget_tokens: Some(1000),
                ..new("tk-a")
            })
            .await
            .unwrap();
        assert_eq!((t.budget_usd, t.budget_tokens), (Some(2.5), Some(1000)));
        assert!(!t.workspace_budget_waived && t.conversation.is_none());
        s.insert_task(&new("tk-b")).await.unwrap();
        for (id, usage) in [("tk-a", (1, 100, 20, 0.5)), ("tk-b", (1, 300, 80, 1.25))] {
            s.update_task(
                id,
                TaskPatch {
                    usage: Some(usage),
                    ..Default::default()
                },
            )
            .await
            .unwrap();
        }
        assert_eq!(s.workspace_spend("shop").await.unwrap(), (1.75, 500));
        let t = s
            .update_task(
                "tk-a",
                TaskPatch {
                    budget: Some((None, Some(5000))),
                    workspace_budget_waived: Some(true),
                    conversation: Some("[]".into()),
                    ..Default::default()
                },
            )
            .await
            .unwrap();
        assert_eq!((t.budget_usd, t.budget_tokens), (None, Some(5000)));
        assert!(t.workspace_budget_waived);
        assert_eq!(t.conversation.as_deref(), Some("[]"));
        assert!(t.conversation_at.is_some());
        let item = AttentionRecord {
            id: "at-b".into(),
            task: "tk-a".into(),
            kind: AttentionKind::Budget,
            remote_id: String::new(),
            title: "budget reached".into(),
            detail: "{}".into(),
            status: AttentionStatus::Pending,
            answer: None,
            created_at: now_ms(),
            resolved_at: None,
        };
        s.insert_attention(&item).await.unwrap();
        assert_eq!(
            s.attention("at-b").await.unwrap().unwrap().kind,
            AttentionKind::Budget
        );
    }

    #[tokio::test]
    async fn attention_items_are_recorded_once_and_answered_once() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(&dir.path().join("db.sqlite")).await.unwrap();
        s.insert_task(&new("tk-a")).await.unwrap();
        let item = AttentionRecord {
            id: "at-1".into(),
            task: "tk-a".into(),
            kind: AttentionKind::Permission,
            remote_id: "per_1".into(),
            title: "bash: ls".into(),
            detail: "{}".into(),
            status: AttentionStatus::Pending,
            answer: None,
            created_at: now_ms(),
            resolved_at: None,
        };
        assert!(s.insert_attention(&item).await.unwrap().1);
        let again = AttentionRecord {
            id: "at-2".into(),
            ..item.clone()
        };
        let (existing, fresh) = s.insert_attention(&again).await.unwrap();
        assert_eq!((existing.id.as_str(), fresh), ("at-1", false));
        assert_eq!(s.attention_list(None, true).await.unwrap().len(), 1);
        s.resolve_attention(
            "at-1",
            AttentionStatus::Answered,
            Some(r#"{"answer":"once"}"#),
        )
        .await
        .unwrap();
        assert!(matches!(
            s.resolve_attention("at-1", AttentionStatus::Answered, None)
                .await,
            Err(StoreError::AttentionResolved {
                status: AttentionStatus::Answered,
                ..
            })
        ));
        assert!(
            s.attention_list(Some("tk-a"), true)
                .await
                .unwrap()
                .is_empty()
        );
    }
}
