//! `/api/v1/tasks`, `/api/v1/attention` and `/api/v1/templates`: dispatch tasks,
//! follow them, answer what they ask, and finish them.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use atelier_core::task::{Answer, AttentionKind, AttentionStatus, Effort, TaskState, TaskTemplate};
use atelier_store::{AttentionRecord, TaskRecord};

use super::sandboxes::{ApiJson, ApiQuery};
use super::{ApiErrorBody, ApiResult, AppState};
use crate::tasks::NewTaskRequest;

/// One todo of the agent's list.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct TodoView {
    /// What to do.
    pub content: String,
    /// `pending`, `in_progress`, `completed` or `cancelled`.
    pub status: String,
}

/// One commit on the task's branch.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct CommitView {
    /// Commit id.
    pub id: String,
    /// First line of its message.
    pub subject: String,
}

/// A task as the API shows it.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct TaskView {
    /// Id (`tk-` and 10 characters).
    pub id: String,
    /// Workspace.
    pub workspace: String,
    /// Template.
    pub template: String,
    /// Effort.
    pub effort: Effort,
    /// First line of the description.
    pub title: String,
    /// What was asked.
    pub description: String,
    /// Where it is.
    pub state: TaskState,
    /// Board column: backlog, in-progress, needs-you, done, failed, cancelled.
    pub column: String,
    /// Position in the queue (1 = next) while queued.
    pub queue_position: Option<usize>,
    /// The task it was chained from.
    pub parent: Option<String>,
    /// Its git branch.
    pub branch: String,
    /// The branch it started from.
    pub base_branch: String,
    /// The commit it started from.
    pub base_commit: Option<String>,
    /// Its sandbox (while it has one).
    pub sandbox: Option<String>,
    /// Its sandbox is paused to disk while it waits on a person.
    pub parked: bool,
    /// Why it failed (or the last agent/model error).
    pub error: Option<String>,
    /// Todos done.
    pub todos_done: i64,
    /// Todos in all.
    pub todos_total: i64,
    /// Todos done, in percent (0 with no todos).
    pub percent: i64,
    /// The agent's todo list.
    pub todos: Vec<TodoView>,
    /// Files the agent edited (relative to the repository).
    pub files: Vec<String>,
    /// Assistant messages.
    pub messages: i64,
    /// Input tokens.
    pub tokens_in: i64,
    /// Output and reasoning tokens.
    pub tokens_out: i64,
    /// Cost so far, as the provider reports it (USD for most).
    pub cost: f64,
    /// The task's own cost limit (USD), if any.
    pub budget_usd: Option<f64>,
    /// The task's own token limit (input + output), if any.
    pub budget_tokens: Option<i64>,
    /// A person let it go on past its workspace's budget.
    pub workspace_budget_waived: bool,
    /// The agent's last text.
    pub summary: Option<String>,
    /// Pending attention items.
    pub pending: usize,
    /// Follow-up messages queued until the agent's turn ends.
    pub queued_messages: usize,
    /// Commits on the branch (kept once done).
    pub commits: Vec<CommitView>,
    /// Created (ms since epoch).
    pub created_at: i64,
    /// Last started.
    pub started_at: Option<i64>,
    /// Ended.
    pub finished_at: Option<i64>,
    /// Last change.
    pub updated_at: i64,
}

impl TaskView {
    fn new(t: TaskRecord, pending: usize, queue_position: Option<usize>) -> TaskView {
        let queued: Vec<String> = serde_json::from_str(&t.pending_say).unwrap_or_default();
        TaskView {
            column: t.state.column().to_owned(),
            percent: if t.todos_total > 0 {
                t.todos_done * 100 / t.todos_total
            } else {
                0
            },
            todos: serde_json::from_str(&t.todos).unwrap_or_default(),
            files: serde_json::from_str(&t.files).unwrap_or_default(),
            commits: serde_json::from_str(&t.commits).unwrap_or_default(),
            queued_messages: queued.len(),
            pending,
            queue_position,
            id: t.id,
            workspace: t.workspace,
            template: t.template,
            effort: t.effort,
            title: t.title,
            description: t.description,
            state: t.state,
            parent: t.parent,
            branch: t.branch,
            base_branch: t.base_branch,
            base_commit: t.base_commit,
            sandbox: t.sandbox,
            parked: t.parked,
            error: t.error,
            todos_done: t.todos_done,
            todos_total: t.todos_total,
            messages: t.messages,
            tokens_in: t.tokens_in,
            tokens_out: t.tokens_out,
            cost: t.cost,
            budget_usd: t.budget_usd,
            budget_tokens: t.budget_tokens,
            workspace_budget_waived: t.workspace_budget_waived,
            summary: t.summary,
            created_at: t.created_at,
            started_at: t.started_at,
            finished_at: t.finished_at,
            updated_at: t.updated_at,
        }
    }
}

async fn view(st: &AppState, t: TaskRecord) -> ApiResult<TaskView> {
    let pending = st.tasks.attention(Some(&t.id), false).await?.len();
    let pos = if t.state == TaskState::Queued {
        st.tasks.queue_position(&t.id).await?
    } else {
        None
    };
    Ok(TaskView::new(t, pending, pos))
}

/// An attention item as the API shows it.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct AttentionView {
    /// Id (`at-` and 10 characters).
    pub id: String,
    /// Its task.
    pub task: String,
    /// Permission, question, stalled or budget.
    pub kind: AttentionKind,
    /// Pending, answered or gone.
    pub status: AttentionStatus,
    /// One line: the permission and what it is for, or the question.
    pub title: String,
    /// What the agent sent: for a permission `permission`, `patterns`, `always`
    /// (what "always" would allow) and `metadata` (e.g. the command or the diff);
    /// for a question `questions` with their `options`.
    #[schema(value_type = Object)]
    pub detail: serde_json::Value,
    /// The answer given here, once answered.
    pub answer: Option<Answer>,
    /// Raised (ms since epoch).
    pub created_at: i64,
    /// Answered or gone.
    pub resolved_at: Option<i64>,
}

impl From<AttentionRecord> for AttentionView {
    fn from(a: AttentionRecord) -> Self {
        AttentionView {
            detail: serde_json::from_str(&a.detail).unwrap_or(serde_json::Value::Null),
            answer: a
                .answer
                .as_deref()
                .and_then(|s| serde_json::from_str(s).ok()),
            id: a.id,
            task: a.task,
            kind: a.kind,
            status: a.status,
            title: a.title,
            created_at: a.created_at,
            resolved_at: a.resolved_at,
        }
    }
}

/// A task with its pending attention items.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct TaskDetail {
    /// The task.
    #[serde(flatten)]
    pub task: TaskView,
    /// Its pending attention items, newest first.
    pub attention: Vec<AttentionView>,
}

/// Create a task (in the backlog, or queued with `start`).
#[utoipa::path(post, path = "/api/v1/tasks", tag = "tasks", request_body = NewTaskRequest,
    responses((status = 201, body = TaskView), (status = 400, body = ApiErrorBody), (status = 404, body = ApiErrorBody)))]
pub async fn create(
    State(st): State<AppState>,
    ApiJson(body): ApiJson<NewTaskRequest>,
) -> ApiResult<(StatusCode, Json<TaskView>)> {
    let t = st.tasks.create(body).await?;
    Ok((StatusCode::CREATED, Json(view(&st, t).await?)))
}

/// `?workspace=&state=` filters.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListQuery {
    /// Only this workspace's tasks.
    #[serde(default)]
    pub workspace: Option<String>,
    /// Only tasks in this state.
    #[serde(default)]
    pub state: Option<TaskState>,
}

/// List tasks, newest first.
#[utoipa::path(get, path = "/api/v1/tasks", tag = "tasks", params(ListQuery),
    responses((status = 200, body = [TaskView]), (status = 400, body = ApiErrorBody)))]
pub async fn list(
    State(st): State<AppState>,
    ApiQuery(q): ApiQuery<ListQuery>,
) -> ApiResult<Json<Vec<TaskView>>> {
    let states: Vec<TaskState> = q.state.into_iter().collect();
    let rows = st.tasks.list(q.workspace.as_deref(), &states).await?;
    let pending = st.tasks.attention(None, false).await?;
    // Positions in the one queue of every workspace (the order tasks start in).
    let queue = st.tasks.queue().await?;
    let mut out = Vec::with_capacity(rows.len());
    for t in rows {
        let n = pending.iter().filter(|a| a.task == t.id).count();
        let pos = queue.iter().position(|q| q.id == t.id).map(|p| p + 1);
        out.push(TaskView::new(t, n, pos));
    }
    Ok(Json(out))
}

/// Usage of one workspace's tasks, summed.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct UsageView {
    /// Workspace.
    pub workspace: String,
    /// Tasks (any state).
    pub tasks: i64,
    /// Assistant messages.
    pub messages: i64,
    /// Input tokens.
    pub tokens_in: i64,
    /// Output and reasoning tokens.
    pub tokens_out: i64,
    /// Cost, as the providers report it.
    pub cost: f64,
}

/// Usage summed per workspace over all its tasks.
#[utoipa::path(get, path = "/api/v1/tasks/usage", tag = "tasks",
    responses((status = 200, body = [UsageView])))]
pub async fn usage(State(st): State<AppState>) -> ApiResult<Json<Vec<UsageView>>> {
    Ok(Json(
        st.tasks
            .usage()
            .await?
            .into_iter()
            .map(|u| UsageView {
                workspace: u.workspace,
                tasks: u.tasks,
                messages: u.messages,
                tokens_in: u.tokens_in,
                tokens_out: u.tokens_out,
                cost: u.cost,
            })
            .collect(),
    ))
}

/// One task, with its pending attention items.
#[utoipa::path(get, path = "/api/v1/tasks/{id}", tag = "tasks",
    params(("id" = String, Path, description = "Task id")),
    responses((status = 200, body = TaskDetail), (status = 404, body = ApiErrorBody)))]
pub async fn show(
    State(st): State<AppState>,
    Path(id): Path<String>,
) -> ApiResult<Json<TaskDetail>> {
    let t = st.tasks.get(&id).await?;
    let attention = st
        .tasks
        .attention(Some(&id), false)
        .await?
        .into_iter()
        .map(AttentionView::from)
        .collect();
    Ok(Json(TaskDetail {
        task: view(&st, t).await?,
        attention,
    }))
}

macro_rules! action {
    ($name:ident, $path:literal, $method:ident, $doc:literal) => {
        #[doc = $doc]
        #[utoipa::path(post, path = $path, tag = "tasks",
            params(("id" = String, Path, description = "Task id")),
            responses((status = 200, body = TaskView), (status = 404, body = ApiErrorBody),
                      (status = 409, body = ApiErrorBody), (status = 503, body = ApiErrorBody)))]
        pub async fn $name(
            State(st): State<AppState>,
            Path(id): Path<String>,
        ) -> ApiResult<Json<TaskView>> {
            let t = st.tasks.$method(&id).await?;
            Ok(Json(view(&st, t).await?))
        }
    };
}

action!(
    start,
    "/api/v1/tasks/{id}/start",
    start,
    "Start a backlog task (it queues for a slot)."
);
action!(
    retry,
    "/api/v1/tasks/{id}/retry",
    retry,
    "Queue a failed or cancelled task again, with a fresh sandbox."
);
action!(
    cancel,
    "/api/v1/tasks/{id}/cancel",
    cancel,
    "Cancel a task: abort the agent, delete its sandbox (nothing is pushed)."
);
action!(
    done,
    "/api/v1/tasks/{id}/done",
    done,
    "Finish a task: commit what is left, push the branch from the host, keep the diff, stop the sandbox."
);

/// A follow-up message.
#[derive(Debug, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SayBody {
    /// What to tell the agent (sent when its turn ends if it is busy).
    pub text: String,
}

/// Send the agent a follow-up message (queued while it is busy).
#[utoipa::path(post, path = "/api/v1/tasks/{id}/say", tag = "tasks", request_body = SayBody,
    params(("id" = String, Path, description = "Task id")),
    responses((status = 200, body = TaskView), (status = 400, body = ApiErrorBody), (status = 404, body = ApiErrorBody),
              (status = 409, body = ApiErrorBody), (status = 503, body = ApiErrorBody), (status = 507, body = ApiErrorBody)))]
pub async fn say(
    State(st): State<AppState>,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<SayBody>,
) -> ApiResult<Json<TaskView>> {
    let t = st.tasks.say(&id, &body.text).await?;
    Ok(Json(view(&st, t).await?))
}

/// The next task on a done task's branch.
#[derive(Debug, Default, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ChainBody {
    /// Template (default `implementation`).
    #[serde(default)]
    pub template: Option<String>,
    /// What to do (default: a follow-up of the parent's description).
    #[serde(default)]
    pub description: Option<String>,
    /// Effort (default: the template's).
    #[serde(default)]
    pub effort: Option<Effort>,
    /// Start at once.
    #[serde(default)]
    pub start: bool,
    /// The new task's cost limit (USD).
    #[serde(default)]
    pub budget_usd: Option<f64>,
    /// The new task's token limit (input + output).
    #[serde(default)]
    pub budget_tokens: Option<i64>,
}

/// Chain a new task on a done task's branch (a review, an audit, a simplification).
#[utoipa::path(post, path = "/api/v1/tasks/{id}/chain", tag = "tasks", request_body = ChainBody,
    params(("id" = String, Path, description = "Task id")),
    responses((status = 201, body = TaskView), (status = 400, body = ApiErrorBody), (status = 404, body = ApiErrorBody),
              (status = 409, body = ApiErrorBody)))]
pub async fn chain(
    State(st): State<AppState>,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<ChainBody>,
) -> ApiResult<(StatusCode, Json<TaskView>)> {
    let t = st
        .tasks
        .chain(
            &id,
            body.template,
            body.description,
            body.effort,
            body.start,
            atelier_core::task::Budget {
                usd: body.budget_usd,
                tokens: body.budget_tokens,
            },
        )
        .await?;
    Ok((StatusCode::CREATED, Json(view(&st, t).await?)))
}

/// The branch's diff against its base (live while the task has a sandbox, kept
/// after). `x-atelier-diff-truncated: true` when it was cut at 4 MiB.
#[utoipa::path(get, path = "/api/v1/tasks/{id}/diff", tag = "tasks",
    params(("id" = String, Path, description = "Task id")),
    responses((status = 200, content_type = "text/plain", body = String), (status = 404, body = ApiErrorBody)))]
pub async fn diff(State(st): State<AppState>, Path(id): Path<String>) -> ApiResult<Response> {
    let (text, cut) = st.tasks.diff(&id).await?;
    Ok((
        [
            (header::CONTENT_TYPE, "text/plain; charset=utf-8"),
            (
                header::HeaderName::from_static("x-atelier-diff-truncated"),
                if cut { "true" } else { "false" },
            ),
        ],
        text,
    )
        .into_response())
}

/// `?limit=` for a task's messages.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct MessagesQuery {
    /// How many of the newest messages (1 to 1000, default 200).
    #[serde(default)]
    pub limit: Option<usize>,
}

/// The task's conversation with its agent: the newest `limit` messages of its
/// OpenCode session, oldest first. Each has its text parts joined, its tool calls
/// summarised (tool, title, a short input, status, output cut at 4 KiB), and for
/// the agent's messages tokens and cost. Read live from OpenCode while the task's
/// sandbox runs (`live: true`); otherwise (parked, done, failed, cancelled, or
/// the sandbox unreachable) the copy kept on the task at its last turn, with
/// `captured_at` (its newest 200 messages). Before the task has a session the
/// list is empty.
#[utoipa::path(get, path = "/api/v1/tasks/{id}/messages", tag = "tasks",
    params(("id" = String, Path, description = "Task id"), MessagesQuery),
    responses((status = 200, body = crate::tasks::conversation::Conversation), (status = 400, body = ApiErrorBody),
              (status = 404, body = ApiErrorBody)))]
pub async fn messages(
    State(st): State<AppState>,
    Path(id): Path<String>,
    ApiQuery(q): ApiQuery<MessagesQuery>,
) -> ApiResult<Json<crate::tasks::conversation::Conversation>> {
    let limit = q.limit.unwrap_or(crate::tasks::conversation::DEFAULT_LIMIT);
    Ok(Json(st.tasks.messages(&id, limit).await?))
}

/// `?all=&task=` for attention items.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct AttentionQuery {
    /// Include answered and gone items.
    #[serde(default)]
    pub all: bool,
    /// Only this task's items.
    #[serde(default)]
    pub task: Option<String>,
}

/// Attention items across tasks, newest first (pending ones unless `all`).
#[utoipa::path(get, path = "/api/v1/attention", tag = "attention", params(AttentionQuery),
    responses((status = 200, body = [AttentionView]), (status = 400, body = ApiErrorBody)))]
pub async fn attention(
    State(st): State<AppState>,
    ApiQuery(q): ApiQuery<AttentionQuery>,
) -> ApiResult<Json<Vec<AttentionView>>> {
    Ok(Json(
        st.tasks
            .attention(q.task.as_deref(), q.all)
            .await?
            .into_iter()
            .map(AttentionView::from)
            .collect(),
    ))
}

/// One attention item.
#[utoipa::path(get, path = "/api/v1/attention/{id}", tag = "attention",
    params(("id" = String, Path, description = "Item id")),
    responses((status = 200, body = AttentionView), (status = 404, body = ApiErrorBody)))]
pub async fn attention_item(
    State(st): State<AppState>,
    Path(id): Path<String>,
) -> ApiResult<Json<AttentionView>> {
    Ok(Json(st.tasks.attention_item(&id).await?.into()))
}

/// What answering did.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct AnswerView {
    /// The item, answered.
    pub item: AttentionView,
    /// Other items that went with it: a permission reject also rejects the
    /// session's other pending requests.
    pub also_rejected: Vec<AttentionView>,
}

/// Answer a pending item. Permissions: `once`, `always`, `reject` (with an
/// optional `message` the agent continues with). Questions: `reply` with
/// `answers` (one list of labels or text per question) or `reject`. Stalled:
/// `retry` or `abort`. Budget: `continue` (optional `budget_usd`/`budget_tokens`
/// as the task's new limits, each above what it used; none lifts the limit
/// reached) or `stop` (the task goes to review). An item answered already is a 409.
#[utoipa::path(post, path = "/api/v1/attention/{id}/answer", tag = "attention", request_body = Answer,
    params(("id" = String, Path, description = "Item id")),
    responses((status = 200, body = AnswerView), (status = 400, body = ApiErrorBody), (status = 404, body = ApiErrorBody),
              (status = 409, body = ApiErrorBody), (status = 503, body = ApiErrorBody)))]
pub async fn answer(
    State(st): State<AppState>,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<Answer>,
) -> ApiResult<Json<AnswerView>> {
    let (item, also) = st.tasks.answer(&id, body).await?;
    Ok(Json(AnswerView {
        item: item.into(),
        also_rejected: also.into_iter().map(AttentionView::from).collect(),
    }))
}

/// `?workspace=` for templates.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct TemplateQuery {
    /// As this workspace's tasks see them: its own templates (its definition's
    /// `templates`) over the global ones over the built-in ones.
    #[serde(default)]
    pub workspace: Option<String>,
}

/// The task templates (global and built-in, or as a workspace's tasks see them).
#[utoipa::path(get, path = "/api/v1/templates", tag = "tasks", params(TemplateQuery),
    responses((status = 200, body = [TaskTemplate]), (status = 404, body = ApiErrorBody)))]
pub async fn templates(
    State(st): State<AppState>,
    ApiQuery(q): ApiQuery<TemplateQuery>,
) -> ApiResult<Json<Vec<TaskTemplate>>> {
    Ok(Json(st.tasks.templates_for(q.workspace.as_deref()).await?))
}

/// One task template (global or built-in, or as a workspace's tasks see it).
#[utoipa::path(get, path = "/api/v1/templates/{name}", tag = "tasks",
    params(("name" = String, Path, description = "Template name"), TemplateQuery),
    responses((status = 200, body = TaskTemplate), (status = 404, body = ApiErrorBody)))]
pub async fn template(
    State(st): State<AppState>,
    Path(name): Path<String>,
    ApiQuery(q): ApiQuery<TemplateQuery>,
) -> ApiResult<Json<TaskTemplate>> {
    Ok(Json(
        st.tasks.template_for(&name, q.workspace.as_deref()).await?,
    ))
}

/// Store a template: replaces the built-in one of that name for every task
/// created after, or adds a new one. The body's `name` must match the path.
#[utoipa::path(put, path = "/api/v1/templates/{name}", tag = "tasks", request_body = TaskTemplate,
    params(("name" = String, Path, description = "Template name")),
    responses((status = 200, body = TaskTemplate), (status = 400, body = ApiErrorBody)))]
pub async fn put_template(
    State(st): State<AppState>,
    Path(name): Path<String>,
    ApiJson(body): ApiJson<TaskTemplate>,
) -> ApiResult<Json<TaskTemplate>> {
    if body.name != name {
        return Err(crate::Error::invalid(format!(
            "the body names template {:?} but the path {name:?}",
            body.name
        ))
        .into());
    }
    Ok(Json(st.tasks.put_template(body).await?))
}

/// Remove a stored template: a built-in one comes back as it ships.
#[utoipa::path(delete, path = "/api/v1/templates/{name}", tag = "tasks",
    params(("name" = String, Path, description = "Template name")),
    responses((status = 200, body = TaskTemplate), (status = 404, body = ApiErrorBody)))]
pub async fn reset_template(
    State(st): State<AppState>,
    Path(name): Path<String>,
) -> ApiResult<Json<TaskTemplate>> {
    Ok(Json(st.tasks.reset_template(&name).await?))
}
