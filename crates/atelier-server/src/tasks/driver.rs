//! A task's link to OpenCode in its sandbox: the client (over the agent's byte
//! stream to OpenCode's port, so it works with deny-all egress), the session and
//! prompts, answers, and the follower that turns OpenCode's events into task rows
//! and attention items — re-synchronising from OpenCode's pending lists after
//! every (re)connect, raising "stalled" when a busy session goes quiet, and
//! parking the sandbox when the task has waited on a person too long.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use atelier_core::task::{Answer, AttentionKind, AttentionStatus, Budget, TaskState, TaskTemplate};
use atelier_opencode as oc;
use atelier_store::{AttentionRecord, TaskPatch, TaskRecord, now_ms};
use futures::StreamExt;
use futures::future::BoxFuture;

use super::{Tasks, conversation, new_id};
use crate::Error;
use crate::sandboxes::Sandboxes;

/// Failed model attempts (OpenCode retries on its own) before a "stalled" item asks
/// a person.
const MODEL_RETRIES_BEFORE_ASKING: u64 = 2;

/// Opens a byte stream to OpenCode's port in one sandbox, per connection.
struct GuestConnector {
    sandboxes: Sandboxes,
    sandbox: String,
    port: u16,
}

impl oc::Connector for GuestConnector {
    fn connect(&self) -> BoxFuture<'static, std::io::Result<Box<dyn oc::Io>>> {
        let (sb, id, port) = (self.sandboxes.clone(), self.sandbox.clone(), self.port);
        Box::pin(async move {
            let s = sb
                .stream(&id, port)
                .await
                .map_err(|e| std::io::Error::other(e.message))?;
            Ok(Box::new(s) as Box<dyn oc::Io>)
        })
    }
}

fn oc_error(what: &str, e: oc::Error) -> Error {
    match e {
        oc::Error::NotFound(m) => Error::not_found(format!("{what}: {m}")),
        oc::Error::Status { status: 404, body } => Error::not_found(format!("{what}: {body}")),
        oc::Error::Status { status, body } if status < 500 => {
            Error::invalid(format!("{what}: OpenCode answered {status}: {body}"))
        }
        other => Error::unavailable(format!("{what}: {other}")),
    }
}

/// The OpenCode client of a task's sandbox.
pub(super) async fn client(tasks: &Tasks, t: &TaskRecord) -> Result<oc::Client, Error> {
    let sb = t
        .sandbox
        .as_deref()
        .ok_or_else(|| Error::conflict(format!("task {} has no sandbox", t.id)))?;
    let ep = tasks.sandboxes.opencode(sb).await?.ok_or_else(|| {
        Error::unavailable(format!(
            "the sandbox of task {} has no OpenCode server (its workspace's prebuild was made without one: rebuild it with an image that has OpenCode)",
            t.id
        ))
    })?;
    let connector = Arc::new(GuestConnector {
        sandboxes: tasks.sandboxes.clone(),
        sandbox: sb.to_owned(),
        port: ep.port,
    });
    Ok(oc::Client::new(connector, &ep.password, &ep.directory))
}

fn prompt_of(template: &TaskTemplate, t: &TaskRecord, text: String) -> oc::Prompt {
    let effort = template.effort(t.effort);
    oc::Prompt {
        text,
        model: effort.model.as_deref().and_then(|m| {
            m.split_once('/').map(|(p, id)| oc::ModelRef {
                provider_id: p.to_owned(),
                model_id: id.to_owned(),
            })
        }),
        agent: Some(template.agent.clone()),
        variant: effort.variant,
    }
}

/// Creates the task's session with its template's permission rules and sends the
/// first prompt.
pub(super) async fn open_session(
    tasks: &Tasks,
    t: &TaskRecord,
    template: &TaskTemplate,
) -> Result<(), Error> {
    let c = client(tasks, t).await?;
    let rules: Vec<oc::PermissionRule> = template
        .permission
        .iter()
        .map(|r| oc::PermissionRule {
            permission: r.permission.clone(),
            pattern: r.pattern.clone(),
            action: match r.action {
                atelier_core::task::RuleAction::Allow => oc::Action::Allow,
                atelier_core::task::RuleAction::Ask => oc::Action::Ask,
                atelier_core::task::RuleAction::Deny => oc::Action::Deny,
            },
        })
        .collect();
    let session = c
        .create_session(&format!("{} ({})", t.title, t.id), &rules)
        .await
        .map_err(|e| oc_error("creating the OpenCode session", e))?;
    tasks
        .store
        .update_task(
            &t.id,
            TaskPatch {
                session: Some(Some(session.id.clone())),
                ..Default::default()
            },
        )
        .await?;
    let text = template.render(
        &atelier_core::task::PromptVars {
            description: &t.description,
            title: &t.title,
            workspace: &t.workspace,
            branch: &t.branch,
        },
        t.effort,
    );
    expect_busy(tasks, &t.id, true);
    c.prompt_async(&session.id, &prompt_of(template, t, text))
        .await
        .map_err(|e| {
            expect_busy(tasks, &t.id, false);
            oc_error("sending the prompt", e)
        })
}

/// Marks (or clears) a task as prompted and not yet seen busy.
fn expect_busy(tasks: &Tasks, task: &str, on: bool) {
    let mut set = crate::manager::lock_map(&tasks.awaiting_busy);
    if on {
        set.insert(task.to_owned());
    } else {
        set.remove(task);
    }
}

/// Whether the task was prompted and its session has not reported busy since.
fn awaiting_busy(tasks: &Tasks, task: &str) -> bool {
    crate::manager::lock_map(&tasks.awaiting_busy).contains(task)
}

/// Sends a follow-up prompt to the task's session.
pub(super) async fn prompt(tasks: &Tasks, t: &TaskRecord, text: &str) -> Result<(), Error> {
    let session = t
        .session
        .as_deref()
        .ok_or_else(|| Error::conflict(format!("task {} has no session", t.id)))?;
    let template = tasks.task_template(t).await?;
    let c = client(tasks, t).await?;
    expect_busy(tasks, &t.id, true);
    c.prompt_async(session, &prompt_of(&template, t, text.to_owned()))
        .await
        .map_err(|e| {
            expect_busy(tasks, &t.id, false);
            oc_error("sending the message", e)
        })
}

/// Aborts the session's turn, if it has one.
pub(super) async fn abort(tasks: &Tasks, t: &TaskRecord) -> Result<(), Error> {
    let Some(session) = t.session.as_deref() else {
        return Ok(());
    };
    client(tasks, t)
        .await?
        .abort(session)
        .await
        .map_err(|e| oc_error("aborting the turn", e))
}

/// Hands an answer to OpenCode.
pub(super) async fn deliver(
    tasks: &Tasks,
    t: &TaskRecord,
    item: &AttentionRecord,
    answer: &Answer,
) -> Result<(), Error> {
    let c = client(tasks, t).await?;
    let r = match (item.kind, answer) {
        (AttentionKind::Permission, Answer::Once) => {
            c.reply_permission(&item.remote_id, oc::Reply::Once, None)
                .await
        }
        (AttentionKind::Permission, Answer::Always) => {
            c.reply_permission(&item.remote_id, oc::Reply::Always, None)
                .await
        }
        (AttentionKind::Permission, Answer::Reject { message }) => {
            c.reply_permission(&item.remote_id, oc::Reply::Reject, message.as_deref())
                .await
        }
        (AttentionKind::Question, Answer::Reply { answers }) => {
            c.reply_question(&item.remote_id, answers.clone()).await
        }
        (AttentionKind::Question, Answer::Reject { .. }) => {
            c.reject_question(&item.remote_id).await
        }
        (AttentionKind::Stalled, Answer::Retry) => {
            let session = t.session.clone().unwrap_or_default();
            let _ = c.abort(&session).await;
            // The prompt goes once the aborted turn has ended (bounded wait).
            let end = std::time::Instant::now() + Duration::from_secs(20);
            while busy_now(&c, &session).await && std::time::Instant::now() < end {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            drop(c);
            return prompt(
                tasks,
                t,
                "Your last turn stopped without finishing. Carry on with the task from where you were.",
            )
            .await;
        }
        (AttentionKind::Stalled, Answer::Abort) => {
            let session = t.session.clone().unwrap_or_default();
            c.abort(&session).await
        }
        _ => {
            return Err(Error::invalid("this answer does not fit this item"));
        }
    };
    r.map_err(|e| oc_error("answering", e))
}

/// A pending item of task `t`.
fn new_item(
    t: &TaskRecord,
    kind: AttentionKind,
    remote_id: String,
    title: String,
    detail: String,
) -> AttentionRecord {
    AttentionRecord {
        id: new_id("at"),
        task: t.id.clone(),
        kind,
        remote_id,
        title,
        detail,
        status: AttentionStatus::Pending,
        answer: None,
        created_at: now_ms(),
        resolved_at: None,
    }
}

fn permission_title(p: &oc::PermissionRequest) -> String {
    let what = if p.patterns.is_empty() {
        String::new()
    } else {
        format!(": {}", p.patterns.join(" "))
    };
    let mut s = format!("{}{what}", p.permission);
    if s.len() > 200 {
        let mut cut = 200;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
        s.push('…');
    }
    s
}

fn question_title(q: &oc::QuestionRequest) -> String {
    q.questions
        .first()
        .map(|x| x.question.chars().take(200).collect())
        .unwrap_or_else(|| "a question".to_owned())
}

/// Whether an "always" answer of this task already covers the request.
fn covered(always: &str, p: &oc::PermissionRequest) -> bool {
    let list: Vec<serde_json::Value> = serde_json::from_str(always).unwrap_or_default();
    list.iter().any(|a| {
        a["permission"].as_str() == Some(p.permission.as_str())
            && a["patterns"].as_array().is_some_and(|pats| {
                let have: BTreeSet<&str> = pats.iter().filter_map(|v| v.as_str()).collect();
                !p.patterns.is_empty()
                    && p.patterns.iter().all(|x| {
                        have.contains(x.as_str())
                            || have
                                .iter()
                                .any(|h| h.ends_with('*') && x.starts_with(&h[..h.len() - 1]))
                    })
            })
    })
}

/// Records a permission request (or answers it at once when an "always" answer of
/// the task covers it). Returns whether it is pending for a person.
async fn on_permission(
    tasks: &Tasks,
    c: &oc::Client,
    t: &TaskRecord,
    p: &oc::PermissionRequest,
) -> Result<bool, Error> {
    if covered(&t.always, p) {
        tracing::info!(task = %t.id, permission = %p.permission, "answered by an earlier \"always\"");
        c.reply_permission(&p.id, oc::Reply::Always, None)
            .await
            .map_err(|e| oc_error("re-applying an always answer", e))?;
        return Ok(false);
    }
    let detail = serde_json::json!({
        "permission": p.permission,
        "patterns": p.patterns,
        "always": p.always,
        "metadata": p.metadata,
    });
    let (rec, _) = tasks
        .store
        .insert_attention(&new_item(
            t,
            AttentionKind::Permission,
            p.id.clone(),
            permission_title(p),
            detail.to_string(),
        ))
        .await?;
    Ok(rec.status == AttentionStatus::Pending)
}

async fn on_question(
    tasks: &Tasks,
    t: &TaskRecord,
    q: &oc::QuestionRequest,
) -> Result<bool, Error> {
    let detail = serde_json::json!({ "questions": q.questions.iter().map(|x| serde_json::json!({
        "question": x.question,
        "header": x.header,
        "options": x.options.iter().map(|o| serde_json::json!({"label": o.label, "description": o.description})).collect::<Vec<_>>(),
        "multiple": x.multiple,
        "custom": x.custom,
    })).collect::<Vec<_>>() });
    let (rec, _) = tasks
        .store
        .insert_attention(&new_item(
            t,
            AttentionKind::Question,
            q.id.clone(),
            question_title(q),
            detail.to_string(),
        ))
        .await?;
    Ok(rec.status == AttentionStatus::Pending)
}

/// Brings the attention queue in line with OpenCode's pending lists: new requests
/// are recorded, recorded ones OpenCode no longer has are gone. Returns the items
/// that went.
pub(super) async fn resync_pending(
    tasks: &Tasks,
    t: &TaskRecord,
) -> Result<Vec<AttentionRecord>, Error> {
    let Some(session) = t.session.as_deref() else {
        return Ok(Vec::new());
    };
    let c = client(tasks, t).await?;
    let perms = c
        .permissions()
        .await
        .map_err(|e| oc_error("listing pending permissions", e))?;
    let questions = c
        .questions()
        .await
        .map_err(|e| oc_error("listing pending questions", e))?;
    let mut live = BTreeSet::new();
    for p in perms.iter().filter(|p| p.session_id == session) {
        if on_permission(tasks, &c, t, p).await? {
            live.insert((AttentionKind::Permission.as_str(), p.id.clone()));
        }
    }
    for q in questions.iter().filter(|q| q.session_id == session) {
        if on_question(tasks, t, q).await? {
            live.insert((AttentionKind::Question.as_str(), q.id.clone()));
        }
    }
    let mut gone = Vec::new();
    for a in tasks.store.attention_list(Some(&t.id), true).await? {
        // Stalled and budget items are ours, not OpenCode's.
        if matches!(a.kind, AttentionKind::Permission | AttentionKind::Question)
            && !live.contains(&(a.kind.as_str(), a.remote_id.clone()))
            && let Ok(r) = tasks
                .store
                .resolve_attention(&a.id, AttentionStatus::Gone, None)
                .await
        {
            gone.push(r);
        }
    }
    Ok(gone)
}

/// The per-message usage seen so far, summed into the task row.
#[derive(Default)]
struct Usage {
    by_message: HashMap<String, (f64, u64, u64)>,
    last_text: Option<String>,
}

impl Usage {
    fn patch(&self) -> TaskPatch {
        let (mut cost, mut tin, mut tout) = (0.0, 0u64, 0u64);
        for (c, i, o) in self.by_message.values() {
            cost += c;
            tin = tin.saturating_add(*i);
            tout = tout.saturating_add(*o);
        }
        let int = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        TaskPatch {
            usage: Some((self.by_message.len() as i64, int(tin), int(tout), cost)),
            summary: self.last_text.clone(),
            ..Default::default()
        }
    }
}

/// Re-reads todos, usage and status after a (re)connect.
async fn resync_all(
    tasks: &Tasks,
    c: &oc::Client,
    t: &TaskRecord,
    usage: &mut Usage,
) -> Result<(), Error> {
    let Some(session) = t.session.as_deref() else {
        return Ok(());
    };
    let gone = resync_pending(tasks, t).await?;
    if !gone.is_empty() {
        tracing::info!(task = %t.id, n = gone.len(), "attention items answered elsewhere while disconnected");
    }
    if let Ok(todos) = c.todos(session).await {
        write_todos(tasks, &t.id, &todos).await?;
    }
    read_messages(tasks, c, t, session, usage).await?;
    let statuses = c
        .statuses()
        .await
        .map_err(|e| oc_error("reading session status", e))?;
    let busy = matches!(
        statuses.get(session),
        Some(oc::SessionStatus::Busy | oc::SessionStatus::Retry { .. })
    );
    // After a (re)connect the events in between are lost: the status decides,
    // except right after a prompt that OpenCode has not started yet (a prompt it
    // dropped is caught by the stall watchdog).
    if busy {
        expect_busy(tasks, &t.id, false);
    }
    if !busy && !awaiting_busy(tasks, &t.id) {
        on_idle(tasks, t).await?;
    } else {
        settle_state(tasks, &t.id).await?;
    }
    Ok(())
}

/// Re-reads the session's messages: usage summed per assistant message, and the
/// agent's last text as the task's summary; writes both.
async fn read_messages(
    tasks: &Tasks,
    c: &oc::Client,
    t: &TaskRecord,
    session: &str,
    usage: &mut Usage,
) -> Result<(), Error> {
    let msgs = c
        .messages(session)
        .await
        .map_err(|e| oc_error("reading the session's messages", e))?;
    let kept = conversation::kept_copy(&msgs);
    usage.by_message.clear();
    for m in msgs.iter().filter(|m| m.role == "assistant") {
        usage.by_message.insert(
            m.id.clone(),
            (m.cost, m.tokens.input, m.tokens.output + m.tokens.reasoning),
        );
        if let Some(text) = m.parts.iter().rev().find_map(|p| match p {
            oc::Part::Text { text } if !text.trim().is_empty() => Some(text.clone()),
            _ => None,
        }) {
            usage.last_text = Some(text);
        }
    }
    tasks
        .store
        .update_task(
            &t.id,
            TaskPatch {
                conversation: Some(kept),
                ..usage.patch()
            },
        )
        .await?;
    check_budget(tasks, c, &t.id, session).await
}

/// The newest `limit` messages of the session, read live, and whether older ones
/// exist.
pub(super) async fn read_conversation(
    tasks: &Tasks,
    t: &TaskRecord,
    session: &str,
    limit: usize,
) -> Result<(Vec<conversation::MessageView>, bool), Error> {
    let msgs = client(tasks, t)
        .await?
        .messages_limited(session, Some(limit + 1))
        .await
        .map_err(|e| oc_error("reading the session's messages", e))?;
    Ok(conversation::newest(
        msgs.iter().map(conversation::render).collect(),
        limit,
    ))
}

/// Reads the session's messages and keeps a copy on the task.
pub(super) async fn keep_conversation(tasks: &Tasks, t: &TaskRecord) -> Result<(), Error> {
    let Some(session) = t.session.as_deref() else {
        return Ok(());
    };
    let msgs = client(tasks, t)
        .await?
        .messages(session)
        .await
        .map_err(|e| oc_error("reading the session's messages", e))?;
    tasks
        .store
        .update_task(
            &t.id,
            TaskPatch {
                conversation: Some(conversation::kept_copy(&msgs)),
                ..Default::default()
            },
        )
        .await?;
    Ok(())
}

/// A budget a task reached: whose (`task` or `workspace`), which limit (`usd` or
/// `tokens`), the budget, and the usage measured against it.
#[derive(Debug, PartialEq)]
struct BudgetHit {
    scope: &'static str,
    limit: &'static str,
    budget: Budget,
    cost: f64,
    tokens: i64,
}

/// Whether task `t` is due a `budget` item: it reached its own budget, or (unless
/// waived for it) `workspace` — the workspace's budget and its tasks' summed
/// (cost, tokens) — and `last`, its newest budget item, is neither pending nor
/// raised at the usage the task has now (an answer is not asked again until the
/// task spends more).
fn budget_due(
    t: &TaskRecord,
    workspace: Option<(Budget, (f64, i64))>,
    last: Option<&AttentionRecord>,
) -> Option<BudgetHit> {
    let used_tokens = t.tokens_in.saturating_add(t.tokens_out);
    let own = Budget {
        usd: t.budget_usd,
        tokens: t.budget_tokens,
    };
    let hit = match own.reached(t.cost, used_tokens) {
        Some(limit) => BudgetHit {
            scope: "task",
            limit,
            budget: own,
            cost: t.cost,
            tokens: used_tokens,
        },
        None if t.workspace_budget_waived => return None,
        None => {
            let (budget, (cost, tokens)) = workspace?;
            BudgetHit {
                scope: "workspace",
                limit: budget.reached(cost, tokens)?,
                budget,
                cost,
                tokens,
            }
        }
    };
    if let Some(last) = last {
        let d: serde_json::Value = serde_json::from_str(&last.detail).unwrap_or_default();
        let grown = used_tokens > d["task_tokens"].as_i64().unwrap_or(0)
            || t.cost > d["task_usd"].as_f64().unwrap_or(0.0);
        if last.status == AttentionStatus::Pending || !grown {
            return None;
        }
    }
    Some(hit)
}

/// Raises a `budget` item when the task's usage reached its budget, or its
/// workspace's tasks together reached the workspace's (unless waived for this
/// task): the turn is aborted if it runs, and a person answers continue or stop.
/// Nothing is raised while one is pending, nor again before the task has used
/// more than when the last one was raised.
async fn check_budget(tasks: &Tasks, c: &oc::Client, id: &str, session: &str) -> Result<(), Error> {
    let t = tasks.get(id).await?;
    if !t.state.has_session() {
        return Ok(());
    }
    let used_tokens = t.tokens_in.saturating_add(t.tokens_out);
    let own = Budget {
        usd: t.budget_usd,
        tokens: t.budget_tokens,
    };
    // The workspace's spend is summed only when its budget can matter.
    let mut workspace = None;
    if own.reached(t.cost, used_tokens).is_none() && !t.workspace_budget_waived {
        let spec = match tasks.workspaces.spec(&t.workspace).await {
            Ok(s) => Some(s),
            Err(e) if e.kind == atelier_core::ErrorKind::NotFound => None,
            Err(e) => return Err(e),
        };
        if let Some(b) = spec.and_then(|s| s.budget) {
            workspace = Some((b, tasks.store.workspace_spend(&t.workspace).await?));
        }
    }
    let items = tasks.store.attention_list(Some(id), false).await?;
    let last = items.iter().find(|a| a.kind == AttentionKind::Budget);
    let Some(BudgetHit {
        scope,
        limit: which,
        budget,
        cost,
        tokens,
    }) = budget_due(&t, workspace, last)
    else {
        return Ok(());
    };
    let aborted = busy_now(c, session).await;
    if aborted {
        c.abort(session)
            .await
            .map_err(|e| oc_error("stopping the turn at the budget", e))?;
    }
    let whose = if scope == "task" {
        "the task's".to_owned()
    } else {
        format!("workspace {}'s", t.workspace)
    };
    let title = match which {
        "usd" => format!(
            "budget reached: ${cost:.4} of {whose} ${:.2}; continue?",
            budget.usd.unwrap_or_default()
        ),
        _ => format!(
            "budget reached: {tokens} of {whose} {} tokens; continue?",
            budget.tokens.unwrap_or_default()
        ),
    };
    tracing::info!(task = %id, scope, limit = which, aborted, "budget reached");
    tasks
        .store
        .insert_attention(&new_item(
            &t,
            AttentionKind::Budget,
            String::new(),
            title,
            serde_json::json!({
                "scope": scope,
                "limit": which,
                "budget_usd": budget.usd,
                "budget_tokens": budget.tokens,
                "used_usd": cost,
                "used_tokens": tokens,
                "task_usd": t.cost,
                "task_tokens": used_tokens,
                "aborted": aborted,
            })
            .to_string(),
        ))
        .await?;
    settle_state(tasks, id).await
}

async fn write_todos(tasks: &Tasks, id: &str, todos: &[oc::Todo]) -> Result<(), Error> {
    let done = todos.iter().filter(|t| t.status == "completed").count() as i64;
    let list: Vec<serde_json::Value> = todos
        .iter()
        .map(|t| serde_json::json!({"content": t.content, "status": t.status}))
        .collect();
    tasks
        .store
        .update_task(
            id,
            TaskPatch {
                todos: Some((
                    done,
                    todos.len() as i64,
                    serde_json::to_string(&list).unwrap_or_default(),
                )),
                ..Default::default()
            },
        )
        .await?;
    Ok(())
}

/// Working or waiting, by whether anything is pending.
async fn settle_state(tasks: &Tasks, id: &str) -> Result<(), Error> {
    let t = tasks.get(id).await?;
    let pending = !tasks.store.attention_list(Some(id), true).await?.is_empty();
    let to = if pending {
        TaskState::Waiting
    } else {
        TaskState::Working
    };
    if t.state != to && t.state.has_session() {
        tasks.store.task_transition(id, to, None).await?;
    }
    Ok(())
}

/// Whether OpenCode says the session is working right now. An idle event can be
/// stale by the time it is read: a retry aborts the turn (idle) and prompts again
/// at once, and that idle must not put the task in review.
async fn busy_now(c: &oc::Client, session: &str) -> bool {
    c.statuses().await.is_ok_and(|st| {
        matches!(
            st.get(session),
            Some(oc::SessionStatus::Busy | oc::SessionStatus::Retry { .. })
        )
    })
}

/// The session went idle: send the next queued follow-up, or wait for review.
async fn on_idle(tasks: &Tasks, t: &TaskRecord) -> Result<(), Error> {
    let t = tasks.get(&t.id).await?;
    let mut queue: Vec<String> = serde_json::from_str(&t.pending_say).unwrap_or_default();
    if !queue.is_empty() {
        let next = queue.remove(0);
        tasks
            .store
            .update_task(
                &t.id,
                TaskPatch {
                    pending_say: Some(serde_json::to_string(&queue).unwrap_or_default()),
                    ..Default::default()
                },
            )
            .await?;
        prompt(tasks, &t, &next).await?;
        if t.state != TaskState::Working {
            tasks
                .store
                .task_transition(&t.id, TaskState::Working, None)
                .await?;
        }
        return Ok(());
    }
    let pending = !tasks
        .store
        .attention_list(Some(&t.id), true)
        .await?
        .is_empty();
    let to = if pending {
        TaskState::Waiting
    } else {
        TaskState::Review
    };
    if t.state != to && t.state.has_session() {
        tasks.store.task_transition(&t.id, to, None).await?;
    }
    if to == TaskState::Review && t.error.is_some() {
        // The turn ended with nothing pending: an earlier model error is over.
        tasks
            .store
            .update_task(
                &t.id,
                TaskPatch {
                    error: Some(None),
                    ..Default::default()
                },
            )
            .await?;
    }
    Ok(())
}

/// Raises one "stalled" item for the task (none if one is pending already).
async fn raise_stalled(tasks: &Tasks, t: &TaskRecord, why: &str) -> Result<(), Error> {
    let pending = tasks.store.attention_list(Some(&t.id), true).await?;
    if pending.iter().any(|a| a.kind == AttentionKind::Stalled) {
        return Ok(());
    }
    tasks
        .store
        .insert_attention(&new_item(
            t,
            AttentionKind::Stalled,
            String::new(),
            why.chars().take(300).collect(),
            serde_json::json!({"reason": why}).to_string(),
        ))
        .await?;
    settle_state(tasks, &t.id).await
}

/// Follows the task's OpenCode events until the task ends, is parked, or its
/// sandbox is gone (then the task fails with the reason).
pub(super) async fn follow(tasks: Arc<Tasks>, id: String) {
    let mut failures = 0u32;
    let mut usage = Usage::default();
    loop {
        let t = match tasks.get(&id).await {
            Ok(t) => t,
            Err(_) => return,
        };
        if !t.state.has_session() || t.parked {
            return;
        }
        let (session, sandbox) = match (&t.session, &t.sandbox) {
            (Some(s), Some(b)) => (s.clone(), b.clone()),
            _ => return,
        };
        match tasks.sandboxes.get(&sandbox).await {
            Ok(sb) if sb.state == atelier_core::SandboxState::Running => {}
            Ok(sb) => {
                fail(
                    &tasks,
                    &id,
                    &format!("its sandbox {sandbox} is {}", sb.state),
                )
                .await;
                return;
            }
            Err(e) => {
                fail(
                    &tasks,
                    &id,
                    &format!("its sandbox {sandbox} is gone: {}", e.message),
                )
                .await;
                return;
            }
        }
        let result = follow_once(&tasks, &t, &session, &mut usage).await;
        match result {
            Ok(Ended::Parked) | Ok(Ended::TaskOver) => return,
            Ok(Ended::Disconnected) => failures = 0,
            Err(e) => {
                failures += 1;
                tracing::warn!(task = %id, error = %e.message, failures, "following OpenCode failed; reconnecting");
                if failures >= 30 {
                    fail(
                        &tasks,
                        &id,
                        &format!("OpenCode in its sandbox stopped answering: {}", e.message),
                    )
                    .await;
                    return;
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(
            250 * u64::from(failures.min(20)) + 100,
        ))
        .await;
    }
}

async fn fail(tasks: &Tasks, id: &str, why: &str) {
    tracing::warn!(task = %id, reason = %why, "task failed");
    if tasks
        .store
        .task_transition(id, TaskState::Failed, Some(why))
        .await
        .is_ok()
    {
        tasks.drop_pending(id).await;
        if let Ok(t) = tasks.get(id).await {
            tasks.release_sandbox(&t, false).await;
        }
        tasks.wake.notify_one();
    }
}

enum Ended {
    /// The stream ended; reconnect.
    Disconnected,
    /// The sandbox was paused to disk.
    Parked,
    /// The task is no longer live.
    TaskOver,
}

async fn follow_once(
    tasks: &Arc<Tasks>,
    t: &TaskRecord,
    session: &str,
    usage: &mut Usage,
) -> Result<Ended, Error> {
    let c = client(tasks, t).await?;
    // Subscribed before the resync, so nothing between the two is missed.
    let mut events = c
        .events()
        .await
        .map_err(|e| oc_error("opening OpenCode's event stream", e))?;
    resync_all(tasks, &c, t, usage).await?;
    let mut last_event = Instant::now();
    loop {
        let tick = Duration::from_secs(5);
        let next = tokio::time::timeout(tick, events.next()).await;
        let ev = match next {
            Ok(Some(Ok(ev))) => {
                last_event = Instant::now();
                Some(ev)
            }
            Ok(Some(Err(e))) => return Err(oc_error("OpenCode's event stream", e)),
            Ok(None) => return Ok(Ended::Disconnected),
            Err(_) => None,
        };
        let t = tasks.get(&t.id).await?;
        if !t.state.has_session() {
            return Ok(Ended::TaskOver);
        }
        if let Some(ev) = ev {
            handle(tasks, &c, &t, session, ev, usage).await?;
        } else {
            if t.state == TaskState::Working && last_event.elapsed() >= tasks.cfg.stall_after {
                raise_stalled(
                    tasks,
                    &t,
                    &format!(
                        "no sign of life from the agent for {} s while it was working",
                        last_event.elapsed().as_secs()
                    ),
                )
                .await?;
            }
            if t.state == TaskState::Waiting {
                answer_overdue(tasks, &t).await?;
            }
            if let Some(limit) = tasks.cfg.park_after
                && matches!(t.state, TaskState::Waiting | TaskState::Review)
                && last_event.elapsed() >= limit
                && Duration::from_millis((now_ms() - t.updated_at).max(0) as u64) >= limit
            {
                park(tasks, &t).await?;
                return Ok(Ended::Parked);
            }
        }
    }
}

/// Answers the task's permissions and questions left pending longer than its
/// template's `attention_timeout_secs`: a reject with a note, so the agent goes
/// on without them (a rejected question ends the agent's turn).
async fn answer_overdue(tasks: &Arc<Tasks>, t: &TaskRecord) -> Result<(), Error> {
    let Some(secs) = tasks.task_template(t).await?.attention_timeout_secs else {
        return Ok(());
    };
    let now = now_ms();
    for a in tasks.store.attention_list(Some(&t.id), true).await? {
        if !matches!(a.kind, AttentionKind::Permission | AttentionKind::Question)
            || now - a.created_at < i64::try_from(secs.saturating_mul(1000)).unwrap_or(i64::MAX)
        {
            continue;
        }
        let answer = Answer::Reject {
            message: Some(format!(
                "Nobody answered within {secs} s. Do not do this; carry on with the task without it."
            )),
        };
        tracing::info!(task = %t.id, item = %a.id, "no answer in time: rejected with a note");
        match deliver(tasks, t, &a, &answer).await {
            Ok(()) => {
                let json = serde_json::to_string(&answer).unwrap_or_default();
                let _ = tasks
                    .store
                    .resolve_attention(&a.id, AttentionStatus::Answered, Some(&json))
                    .await;
            }
            Err(e) if e.kind == atelier_core::ErrorKind::NotFound => {
                let _ = tasks
                    .store
                    .resolve_attention(&a.id, AttentionStatus::Gone, None)
                    .await;
            }
            Err(e) => return Err(e),
        }
    }
    settle_state(tasks, &t.id).await
}

/// Pauses a waiting task's sandbox to disk: the pending requests stay in
/// OpenCode's memory, frozen; answering resumes it.
async fn park(tasks: &Tasks, t: &TaskRecord) -> Result<(), Error> {
    let Some(sb) = &t.sandbox else {
        return Ok(());
    };
    tasks.sandboxes.pause(sb).await?;
    tasks
        .store
        .update_task(
            &t.id,
            TaskPatch {
                parked: Some(true),
                ..Default::default()
            },
        )
        .await?;
    tracing::info!(task = %t.id, sandbox = %sb, "parked: waited on a person; sandbox paused to disk");
    tasks.wake.notify_one();
    Ok(())
}

async fn handle(
    tasks: &Tasks,
    c: &oc::Client,
    t: &TaskRecord,
    session: &str,
    ev: oc::Event,
    usage: &mut Usage,
) -> Result<(), Error> {
    match ev {
        oc::Event::PermissionAsked(p) if p.session_id == session => {
            on_permission(tasks, c, t, &p).await?;
            settle_state(tasks, &t.id).await?;
        }
        oc::Event::QuestionAsked(q) if q.session_id == session => {
            on_question(tasks, t, &q).await?;
            settle_state(tasks, &t.id).await?;
        }
        oc::Event::PermissionReplied { session: s, id, .. }
        | oc::Event::QuestionReplied { session: s, id }
        | oc::Event::QuestionRejected { session: s, id }
            if s == session =>
        {
            // Answered here (already resolved) or elsewhere (now gone).
            for a in tasks.store.attention_list(Some(&t.id), true).await? {
                if a.remote_id == id {
                    let _ = tasks
                        .store
                        .resolve_attention(&a.id, AttentionStatus::Gone, None)
                        .await;
                }
            }
            let t = tasks.get(&t.id).await?;
            if t.state == TaskState::Waiting {
                settle_state(tasks, &t.id).await?;
            }
        }
        oc::Event::TodoUpdated { session: s, todos } if s == session => {
            write_todos(tasks, &t.id, &todos).await?;
        }
        oc::Event::SessionStatus { session: s, status } if s == session => {
            if matches!(
                status,
                oc::SessionStatus::Busy | oc::SessionStatus::Retry { .. }
            ) {
                expect_busy(tasks, &t.id, false);
            }
            if matches!(status, oc::SessionStatus::Busy) && t.state == TaskState::Review {
                settle_state(tasks, &t.id).await?;
            }
            if matches!(status, oc::SessionStatus::Idle) {
                read_messages(tasks, c, t, session, usage).await?;
                if !awaiting_busy(tasks, &t.id) && !busy_now(c, session).await {
                    on_idle(tasks, t).await?;
                }
            }
            // OpenCode retries every failed model call with back-off, forever (no
            // session.error comes): show the error, and after a few attempts ask a
            // person to retry (abort and prompt again) or abort.
            if let oc::SessionStatus::Retry { attempt, message } = status {
                tasks
                    .store
                    .update_task(
                        &t.id,
                        TaskPatch {
                            error: Some(Some(format!(
                                "model error (attempt {attempt}): {message}"
                            ))),
                            ..Default::default()
                        },
                    )
                    .await?;
                if attempt >= MODEL_RETRIES_BEFORE_ASKING {
                    raise_stalled(
                        tasks,
                        t,
                        &format!("the model keeps failing ({attempt} attempts): {message}"),
                    )
                    .await?;
                }
            }
        }
        oc::Event::SessionIdle { session: s } if s == session => {
            // Usage and the agent's last text first, so a reader who sees the
            // task in review sees its summary too.
            read_messages(tasks, c, t, session, usage).await?;
            if !awaiting_busy(tasks, &t.id) && !busy_now(c, session).await {
                on_idle(tasks, t).await?;
            }
        }
        // An abort (ours: retry, done, cancel) ends the turn with this error; it
        // is not the agent's trouble.
        oc::Event::SessionError { message, .. } if message.starts_with("MessageAbortedError") => {}
        oc::Event::SessionError {
            session: s,
            message,
        } if s.as_deref().is_none_or(|s| s == session) => {
            tasks
                .store
                .update_task(
                    &t.id,
                    TaskPatch {
                        error: Some(Some(format!("agent error: {message}"))),
                        ..Default::default()
                    },
                )
                .await?;
            raise_stalled(tasks, t, &format!("the agent hit an error: {message}")).await?;
        }
        oc::Event::MessageUpdated {
            session: s,
            message_id,
            role,
            cost,
            tokens,
            error,
        } if s == session && role == "assistant" => {
            let entry = (cost, tokens.input, tokens.output + tokens.reasoning);
            if usage.by_message.insert(message_id, entry) != Some(entry) {
                // Written at once, so a budget stops the turn as it is reached.
                tasks.store.update_task(&t.id, usage.patch()).await?;
                check_budget(tasks, c, &t.id, session).await?;
            }
            if let Some(err) = error
                && !err.starts_with("MessageAbortedError")
            {
                tasks
                    .store
                    .update_task(
                        &t.id,
                        TaskPatch {
                            error: Some(Some(format!("model error: {err}"))),
                            ..Default::default()
                        },
                    )
                    .await?;
            }
        }
        oc::Event::FileEdited { file } => {
            let mut files: Vec<String> = serde_json::from_str(&t.files).unwrap_or_default();
            let rel = t
                .repo_path
                .as_deref()
                .and_then(|r| file.strip_prefix(r))
                .map(|f| f.trim_start_matches('/').to_owned())
                .unwrap_or(file);
            if !files.contains(&rel) && files.len() < 10_000 {
                files.push(rel);
                tasks
                    .store
                    .update_task(
                        &t.id,
                        TaskPatch {
                            files: Some(serde_json::to_string(&files).unwrap_or_default()),
                            ..Default::default()
                        },
                    )
                    .await?;
            }
        }
        _ => {}
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn perm(permission: &str, patterns: &[&str]) -> oc::PermissionRequest {
        oc::PermissionRequest {
            id: "per_1".into(),
            session_id: "ses_1".into(),
            permission: permission.into(),
            patterns: patterns.iter().map(|p| (*p).to_owned()).collect(),
            metadata: serde_json::Value::Null,
            always: Vec::new(),
            tool: None,
        }
    }

    #[test]
    fn always_answers_cover_the_same_permission_and_patterns_only() {
        let always = r#"[{"permission":"bash","patterns":["npm test","git *"]}]"#;
        assert!(covered(always, &perm("bash", &["npm test"])));
        assert!(covered(always, &perm("bash", &["git status", "npm test"])));
        assert!(!covered(always, &perm("bash", &["rm -rf /"])));
        assert!(!covered(always, &perm("edit", &["npm test"])));
        assert!(!covered(always, &perm("bash", &[])));
        assert!(!covered("not json", &perm("bash", &["npm test"])));
    }

    fn task(cost: f64, tokens: i64, usd: Option<f64>, limit: Option<i64>) -> TaskRecord {
        TaskRecord {
            id: "tk-1".into(),
            workspace: "shop".into(),
            template: "implementation".into(),
            effort: atelier_core::task::Effort::Medium,
            title: "t".into(),
            description: "d".into(),
            state: TaskState::Working,
            parent: None,
            branch: "b".into(),
            base_branch: "main".into(),
            base_commit: None,
            repo_path: None,
            sandbox: None,
            session: None,
            parked: false,
            error: None,
            todos_done: 0,
            todos_total: 0,
            todos: "[]".into(),
            files: "[]".into(),
            messages: 1,
            tokens_in: tokens,
            tokens_out: 0,
            cost,
            summary: None,
            always: "[]".into(),
            pending_say: "[]".into(),
            diff: None,
            diff_truncated: false,
            commits: "[]".into(),
            budget_usd: usd,
            budget_tokens: limit,
            workspace_budget_waived: false,
            conversation: None,
            conversation_at: None,
            created_at: 0,
            started_at: None,
            finished_at: None,
            updated_at: 0,
        }
    }

    fn item(status: AttentionStatus, task_usd: f64, task_tokens: i64) -> AttentionRecord {
        AttentionRecord {
            id: "at-1".into(),
            task: "tk-1".into(),
            kind: AttentionKind::Budget,
            remote_id: String::new(),
            title: "budget reached".into(),
            detail: serde_json::json!({"task_usd": task_usd, "task_tokens": task_tokens})
                .to_string(),
            status,
            answer: None,
            created_at: 0,
            resolved_at: None,
        }
    }

    #[test]
    fn budgets_are_due_once_per_spend() {
        let ws = |usd: f64, spent: f64| {
            Some((
                Budget {
                    usd: Some(usd),
                    tokens: None,
                },
                (spent, 0),
            ))
        };
        // Under every limit: nothing.
        assert_eq!(
            budget_due(&task(0.5, 10, Some(1.0), Some(100)), ws(9.0, 2.0), None),
            None
        );
        // The task's own tokens.
        let hit = budget_due(&task(0.5, 100, Some(1.0), Some(100)), None, None).unwrap();
        assert_eq!((hit.scope, hit.limit, hit.tokens), ("task", "tokens", 100));
        // The workspace's cost, over all its tasks.
        let hit = budget_due(&task(0.5, 10, None, None), ws(2.0, 2.5), None).unwrap();
        assert_eq!((hit.scope, hit.limit, hit.cost), ("workspace", "usd", 2.5));
        // Waived for this task: the workspace's budget does not stop it; its own does.
        let mut waived = task(0.5, 10, None, None);
        waived.workspace_budget_waived = true;
        assert_eq!(budget_due(&waived, ws(2.0, 2.5), None), None);
        waived.budget_tokens = Some(5);
        assert_eq!(
            budget_due(&waived, ws(2.0, 2.5), None).unwrap().scope,
            "task"
        );
        // One pending at a time; after an answer, again only once it spent more.
        let t = task(0.5, 100, None, Some(50));
        let pending = item(AttentionStatus::Pending, 0.1, 60);
        assert_eq!(budget_due(&t, None, Some(&pending)), None);
        let answered_here = item(AttentionStatus::Answered, 0.5, 100);
        assert_eq!(budget_due(&t, None, Some(&answered_here)), None);
        let answered_before = item(AttentionStatus::Answered, 0.5, 60);
        assert!(budget_due(&t, None, Some(&answered_before)).is_some());
    }

    #[test]
    fn titles_are_one_bounded_line() {
        let t = permission_title(&perm("bash", &[&"x".repeat(500)]));
        assert!(
            t.starts_with("bash: x") && t.ends_with('…') && t.len() < 210,
            "{t}"
        );
        assert_eq!(permission_title(&perm("webfetch", &[])), "webfetch");
    }
}
