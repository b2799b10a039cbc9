//! `atelier task`, `atelier attention` and `atelier template`: dispatch coding
//! tasks, answer what their agents ask, and finish them.

use atelier_core::task::{Answer, Effort, TaskTemplate};
use atelier_server::api::{AnswerView, AttentionView, TaskDetail, TaskView, UsageView};
use atelier_server::tasks::conversation::Conversation;
use clap::{Args, Subcommand, ValueEnum};
use reqwest::Method;
use serde_json::json;

use crate::Global;
use crate::client::{CliError, Client, decode};
use crate::commands::enc;

/// Effort levels on the command line.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum EffortArg {
    /// Quick and cheap.
    Low,
    /// The default.
    Medium,
    /// Think harder.
    High,
    /// Everything it has.
    Max,
}

impl From<EffortArg> for Effort {
    fn from(e: EffortArg) -> Effort {
        match e {
            EffortArg::Low => Effort::Low,
            EffortArg::Medium => Effort::Medium,
            EffortArg::High => Effort::High,
            EffortArg::Max => Effort::Max,
        }
    }
}

/// `atelier task …`
#[derive(Subcommand, Debug)]
pub enum TaskCmd {
    /// Create a task: OpenCode works on DESCRIPTION in a sandbox of the workspace,
    /// on a branch of its own. It lands in the backlog unless --start.
    Create {
        /// Workspace (its prebuild is built first if it has none).
        #[arg(long, short)]
        workspace: String,
        /// Template: implementation, best-practices-review, security-review, simplification.
        #[arg(long, short, default_value = "implementation")]
        template: String,
        /// Effort (default: the template's).
        #[arg(long, short, value_enum)]
        effort: Option<EffortArg>,
        /// Start at once (queue for a slot).
        #[arg(long)]
        start: bool,
        /// Cost limit in USD: reaching it stops the agent and asks you (continue or stop).
        #[arg(long)]
        budget_usd: Option<f64>,
        /// Token limit (input + output), likewise.
        #[arg(long)]
        budget_tokens: Option<i64>,
        /// What to do; its first line is the title.
        description: String,
    },
    /// Start a backlog task.
    Start {
        /// Task id.
        id: String,
    },
    /// List tasks: state, todos, cost, pending items.
    #[command(alias = "ls")]
    List {
        /// Only this workspace's.
        #[arg(long, short)]
        workspace: Option<String>,
        /// Only tasks in this state (backlog, queued, starting, working, waiting,
        /// review, finishing, done, failed, cancelled).
        #[arg(long)]
        state: Option<String>,
    },
    /// Show a task: branch, sandbox, state, todos, files, tokens and cost, pending items.
    Show {
        /// Task id.
        id: String,
    },
    /// Send the agent a follow-up message (queued while it is busy).
    Say {
        /// Task id.
        id: String,
        /// The message.
        text: String,
    },
    /// Print the branch's diff against its base.
    Diff {
        /// Task id.
        id: String,
    },
    /// Print the conversation with the agent: prompts, its answers, tool calls,
    /// tokens and cost (live while the sandbox runs, else the copy kept).
    #[command(alias = "messages")]
    Log {
        /// Task id.
        id: String,
        /// The newest this many messages (1 to 1000).
        #[arg(long, short = 'n', default_value_t = 200)]
        limit: usize,
    },
    /// Finish: commit what is left, push the branch, stop the sandbox.
    Done {
        /// Task id.
        id: String,
    },
    /// Create the next task on a done task's branch (e.g. --template security-review).
    Chain {
        /// The done task.
        id: String,
        /// Template.
        #[arg(long, short, default_value = "best-practices-review")]
        template: String,
        /// Effort (default: the template's).
        #[arg(long, short, value_enum)]
        effort: Option<EffortArg>,
        /// What to do (default: a follow-up of the parent's description).
        #[arg(long, short)]
        description: Option<String>,
        /// Leave it in the backlog instead of starting it.
        #[arg(long)]
        no_start: bool,
        /// The new task's cost limit in USD.
        #[arg(long)]
        budget_usd: Option<f64>,
        /// The new task's token limit (input + output).
        #[arg(long)]
        budget_tokens: Option<i64>,
    },
    /// Cancel a task: abort the agent and delete its sandbox (nothing is pushed).
    Cancel {
        /// Task id.
        id: String,
    },
    /// Queue a failed or cancelled task again.
    Retry {
        /// Task id.
        id: String,
    },
    /// Messages, tokens and cost summed per workspace.
    Usage,
}

/// `atelier attention …`
#[derive(Args, Debug)]
pub struct AttentionArgs {
    #[command(subcommand)]
    cmd: Option<AttentionCmd>,
}

/// What `atelier attention` does (lists pending items without a subcommand).
#[derive(Subcommand, Debug)]
pub enum AttentionCmd {
    /// List pending items across tasks (newest first).
    #[command(alias = "ls")]
    List {
        /// Include answered and gone items.
        #[arg(long)]
        all: bool,
        /// Only this task's items.
        #[arg(long)]
        task: Option<String>,
    },
    /// Answer an item: a permission with --once, --always or --reject [--message];
    /// a question with --option N (1-based, repeatable) or --text; a stalled task
    /// with --retry or --abort.
    Answer(AnswerArgs),
}

/// How to answer.
#[derive(Args, Debug)]
#[group(id = "how", required = true, multiple = true)]
pub struct AnswerArgs {
    /// Item id.
    item: String,
    /// Allow this once.
    #[arg(long, group = "how")]
    once: bool,
    /// Allow it and the like for the rest of the task.
    #[arg(long, group = "how")]
    always: bool,
    /// Refuse (a question: dismiss it).
    #[arg(long, group = "how")]
    reject: bool,
    /// With --reject: what the agent should do instead.
    #[arg(long, requires = "reject")]
    message: Option<String>,
    /// Pick an option of the question by number (1-based; repeat for several).
    #[arg(long = "option", group = "how")]
    options: Vec<usize>,
    /// Answer the question with text.
    #[arg(long, group = "how")]
    text: Option<String>,
    /// Stalled: abort the turn and send the prompt again.
    #[arg(long, group = "how")]
    retry: bool,
    /// Stalled: abort the turn and leave the task for review.
    #[arg(long, group = "how")]
    abort: bool,
    /// Budget reached: carry on (with --budget-usd/--budget-tokens as the task's
    /// new limits; without, the limit reached is lifted for this task).
    #[arg(long = "continue", group = "how")]
    go_on: bool,
    /// Budget reached: stop; the task goes to review.
    #[arg(long, group = "how")]
    stop: bool,
    /// With --continue: the task's new cost limit in USD.
    #[arg(long, requires = "go_on")]
    budget_usd: Option<f64>,
    /// With --continue: the task's new token limit.
    #[arg(long, requires = "go_on")]
    budget_tokens: Option<i64>,
}

/// `atelier template …`
#[derive(Subcommand, Debug)]
pub enum TemplateCmd {
    /// List task templates.
    #[command(alias = "ls")]
    List {
        /// As this workspace's tasks see them (its own templates first).
        #[arg(long, short)]
        workspace: Option<String>,
    },
    /// Show a template: prompt, agent, permission rules, efforts.
    Show {
        /// Template name.
        name: String,
        /// As this workspace's tasks see it (its own template of that name first,
        /// then the global one, then the built-in one).
        #[arg(long, short)]
        workspace: Option<String>,
    },
    /// Store a template from a YAML or JSON file (`atelier template show NAME
    /// --json` is a starting point): replaces the built-in one of that name, or adds one.
    Set {
        /// The file (`-` for standard input).
        #[arg(long, short)]
        file: std::path::PathBuf,
    },
    /// Remove a stored template (a built-in one comes back as it ships).
    Reset {
        /// Template name.
        name: String,
    },
}

fn money(c: f64) -> String {
    if c == 0.0 {
        "-".into()
    } else {
        format!("${c:.4}")
    }
}

fn print_task(t: &TaskView) {
    println!("{}  {}  [{}]", t.id, t.title, t.state.as_str());
    println!(
        "  workspace  {}  template {}  effort {}",
        t.workspace,
        t.template,
        t.effort.as_str()
    );
    println!("  branch     {} (from {})", t.branch, t.base_branch);
    if let Some(p) = t.queue_position {
        println!("  queue      position {p}");
    }
    if let Some(sb) = &t.sandbox {
        println!(
            "  sandbox    {sb}{}",
            if t.parked {
                " (parked: paused to disk)"
            } else {
                ""
            }
        );
    }
    if let Some(p) = &t.parent {
        println!("  chained    from {p}");
    }
    println!(
        "  progress   todos {}/{} ({}%)  messages {}  tokens {} in / {} out  cost {}",
        t.todos_done,
        t.todos_total,
        t.percent,
        t.messages,
        t.tokens_in,
        t.tokens_out,
        money(t.cost)
    );
    if t.budget_usd.is_some() || t.budget_tokens.is_some() {
        let mut parts = Vec::new();
        if let Some(u) = t.budget_usd {
            parts.push(format!("${u:.2}"));
        }
        if let Some(n) = t.budget_tokens {
            parts.push(format!("{n} tokens"));
        }
        println!("  budget     {}", parts.join(" / "));
    }
    if t.workspace_budget_waived {
        println!("  budget     the workspace's budget is waived for this task");
    }
    for todo in &t.todos {
        let mark = match todo.status.as_str() {
            "completed" => "x",
            "in_progress" => ">",
            "cancelled" => "-",
            _ => " ",
        };
        println!("    [{mark}] {}", todo.content);
    }
    if !t.files.is_empty() {
        println!("  files      {}", t.files.join(", "));
    }
    for c in &t.commits {
        println!("  commit     {} {}", &c.id[..c.id.len().min(10)], c.subject);
    }
    if t.queued_messages > 0 {
        println!("  messages   {} queued for the agent", t.queued_messages);
    }
    if let Some(e) = &t.error {
        println!("  error      {e}");
    }
    if let Some(s) = &t.summary {
        let short: String = s.chars().take(400).collect();
        println!("  agent      {}", short.replace('\n', "\n             "));
    }
}

fn print_item(a: &AttentionView) {
    println!(
        "{}  {:<10} {:<8} task {}  {}",
        a.id,
        a.kind.as_str(),
        a.status.as_str(),
        a.task,
        a.title
    );
    if let Some(qs) = a.detail.get("questions").and_then(|q| q.as_array()) {
        for q in qs {
            println!("    ? {}", q["question"].as_str().unwrap_or(""));
            for (i, o) in q["options"].as_array().into_iter().flatten().enumerate() {
                println!(
                    "      {}. {}  {}",
                    i + 1,
                    o["label"].as_str().unwrap_or(""),
                    o["description"].as_str().unwrap_or("")
                );
            }
        }
    }
}

fn indent(text: &str, pad: &str) -> String {
    text.lines()
        .map(|l| format!("{pad}{l}"))
        .collect::<Vec<_>>()
        .join("\n")
}

fn print_conversation(conv: &Conversation) {
    if !conv.live {
        match conv.captured_at {
            Some(at) => println!(
                "(the sandbox is not running: the copy kept {} ago)",
                crate::prebuild::age(at)
            ),
            None => println!("(no conversation yet: the task has not started its session)"),
        }
    }
    if conv.truncated {
        println!("(older messages left out; --limit shows more)");
    }
    for m in &conv.messages {
        let mut head = format!("── {}", m.role);
        if let Some(model) = &m.model {
            head.push_str(&format!(" ({model})"));
        }
        if let (Some(i), Some(o)) = (m.tokens_in, m.tokens_out) {
            head.push_str(&format!(
                "  tokens {i} in / {o} out  cost {}",
                money(m.cost.unwrap_or(0.0))
            ));
        }
        println!("{head}");
        if !m.text.is_empty() {
            println!("{}", indent(&m.text, "  "));
        }
        for t in &m.tools {
            let what = t.title.as_deref().unwrap_or(&t.input);
            println!("  [{}] {} {what}", t.status, t.tool);
            if let Some(o) = &t.output {
                let short: String = o.lines().take(8).collect::<Vec<_>>().join("\n");
                if !short.is_empty() {
                    println!("{}", indent(&short, "    | "));
                }
            }
        }
        if let Some(e) = &m.error {
            println!("  error: {e}");
        }
    }
}

/// Runs `atelier task …`.
pub async fn task(g: &Global, cmd: TaskCmd) -> anyhow::Result<u8> {
    let c = Client::new(g)?;
    let post = |path: String, body: serde_json::Value| {
        let rb = c.request(Method::POST, &path).json(&body);
        async { decode::<TaskView>(c.send(rb).await?).await }
    };
    let show = |t: TaskView| -> anyhow::Result<u8> {
        if g.json {
            println!("{}", serde_json::to_string_pretty(&t)?);
        } else {
            print_task(&t);
        }
        Ok(0)
    };
    match cmd {
        TaskCmd::Create {
            workspace,
            template,
            effort,
            start,
            budget_usd,
            budget_tokens,
            description,
        } => {
            let t = post(
                "/api/v1/tasks".into(),
                json!({
                    "workspace": workspace,
                    "template": template,
                    "effort": effort.map(Effort::from),
                    "start": start,
                    "description": description,
                    "budget_usd": budget_usd,
                    "budget_tokens": budget_tokens,
                }),
            )
            .await?;
            show(t)
        }
        TaskCmd::Start { id } => {
            show(post(format!("/api/v1/tasks/{}/start", enc(&id)), json!({})).await?)
        }
        TaskCmd::Done { id } => {
            show(post(format!("/api/v1/tasks/{}/done", enc(&id)), json!({})).await?)
        }
        TaskCmd::Cancel { id } => {
            show(post(format!("/api/v1/tasks/{}/cancel", enc(&id)), json!({})).await?)
        }
        TaskCmd::Retry { id } => {
            show(post(format!("/api/v1/tasks/{}/retry", enc(&id)), json!({})).await?)
        }
        TaskCmd::Say { id, text } => show(
            post(
                format!("/api/v1/tasks/{}/say", enc(&id)),
                json!({ "text": text }),
            )
            .await?,
        ),
        TaskCmd::Chain {
            id,
            template,
            effort,
            description,
            no_start,
            budget_usd,
            budget_tokens,
        } => show(
            post(
                format!("/api/v1/tasks/{}/chain", enc(&id)),
                json!({
                    "template": template,
                    "effort": effort.map(Effort::from),
                    "description": description,
                    "start": !no_start,
                    "budget_usd": budget_usd,
                    "budget_tokens": budget_tokens,
                }),
            )
            .await?,
        ),
        TaskCmd::Show { id } => {
            let d: TaskDetail = c.get_json(&format!("/api/v1/tasks/{}", enc(&id))).await?;
            if g.json {
                println!("{}", serde_json::to_string_pretty(&d)?);
            } else {
                print_task(&d.task);
                for a in &d.attention {
                    print!("  needs you  ");
                    print_item(a);
                }
            }
            Ok(0)
        }
        TaskCmd::List { workspace, state } => {
            let mut q = Vec::new();
            if let Some(w) = &workspace {
                q.push(format!("workspace={}", enc(w)));
            }
            if let Some(s) = &state {
                q.push(format!("state={}", enc(s)));
            }
            let path = if q.is_empty() {
                "/api/v1/tasks".to_owned()
            } else {
                format!("/api/v1/tasks?{}", q.join("&"))
            };
            let items: Vec<TaskView> = c.get_json(&path).await?;
            if g.json {
                println!("{}", serde_json::to_string_pretty(&items)?);
                return Ok(0);
            }
            if items.is_empty() {
                println!(
                    "no tasks; create one with `atelier task create --workspace W \"what to do\"`"
                );
                return Ok(0);
            }
            println!(
                "{:<14} {:<10} {:<12} {:<14} {:>7} {:>9} {:>4}  TITLE",
                "ID", "STATE", "COLUMN", "WORKSPACE", "TODOS", "COST", "NEED"
            );
            for t in items {
                println!(
                    "{:<14} {:<10} {:<12} {:<14} {:>7} {:>9} {:>4}  {}",
                    t.id,
                    t.state.as_str(),
                    t.column,
                    t.workspace,
                    format!("{}/{}", t.todos_done, t.todos_total),
                    money(t.cost),
                    t.pending,
                    t.title
                );
            }
            Ok(0)
        }
        TaskCmd::Usage => {
            let items: Vec<UsageView> = c.get_json("/api/v1/tasks/usage").await?;
            if g.json {
                println!("{}", serde_json::to_string_pretty(&items)?);
                return Ok(0);
            }
            println!(
                "{:<16} {:>6} {:>9} {:>12} {:>12} {:>10}",
                "WORKSPACE", "TASKS", "MESSAGES", "TOKENS IN", "TOKENS OUT", "COST"
            );
            for u in items {
                println!(
                    "{:<16} {:>6} {:>9} {:>12} {:>12} {:>10}",
                    u.workspace,
                    u.tasks,
                    u.messages,
                    u.tokens_in,
                    u.tokens_out,
                    money(u.cost)
                );
            }
            Ok(0)
        }
        TaskCmd::Log { id, limit } => {
            let conv: Conversation = c
                .get_json(&format!(
                    "/api/v1/tasks/{}/messages?limit={limit}",
                    enc(&id)
                ))
                .await?;
            if g.json {
                println!("{}", serde_json::to_string_pretty(&conv)?);
                return Ok(0);
            }
            print_conversation(&conv);
            Ok(0)
        }
        TaskCmd::Diff { id } => {
            let resp = c
                .send(c.request(Method::GET, &format!("/api/v1/tasks/{}/diff", enc(&id))))
                .await?;
            let cut = resp
                .headers()
                .get("x-atelier-diff-truncated")
                .is_some_and(|v| v == "true");
            print!("{}", resp.text().await?);
            if cut {
                eprintln!("(the diff was cut at 4 MiB)");
            }
            Ok(0)
        }
    }
}

/// Runs `atelier attention …`.
pub async fn attention(g: &Global, args: AttentionArgs) -> anyhow::Result<u8> {
    let c = Client::new(g)?;
    match args.cmd.unwrap_or(AttentionCmd::List {
        all: false,
        task: None,
    }) {
        AttentionCmd::List { all, task } => {
            let mut path = format!("/api/v1/attention?all={all}");
            if let Some(t) = task {
                path.push_str(&format!("&task={}", enc(&t)));
            }
            let items: Vec<AttentionView> = c.get_json(&path).await?;
            if g.json {
                println!("{}", serde_json::to_string_pretty(&items)?);
            } else if items.is_empty() {
                println!("nothing needs you");
            } else {
                for a in &items {
                    print_item(a);
                }
            }
            Ok(0)
        }
        AttentionCmd::Answer(a) => {
            let answer = if a.once {
                Answer::Once
            } else if a.always {
                Answer::Always
            } else if a.reject {
                Answer::Reject { message: a.message }
            } else if a.retry {
                Answer::Retry
            } else if a.abort {
                Answer::Abort
            } else if a.go_on {
                Answer::Continue {
                    budget_usd: a.budget_usd,
                    budget_tokens: a.budget_tokens,
                }
            } else if a.stop {
                Answer::Stop
            } else if let Some(text) = a.text {
                Answer::Reply {
                    answers: vec![vec![text]],
                }
            } else {
                // Options are numbered as `atelier attention` prints them.
                let item: AttentionView = c
                    .get_json(&format!("/api/v1/attention/{}", enc(&a.item)))
                    .await?;
                let opts = item.detail["questions"][0]["options"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default();
                let mut labels = Vec::new();
                for n in &a.options {
                    let label = n
                        .checked_sub(1)
                        .and_then(|i| opts.get(i))
                        .and_then(|o| o["label"].as_str())
                        .ok_or_else(|| {
                            CliError::error(
                                atelier_core::ErrorKind::Invalid,
                                format!(
                                    "option {n} does not exist; the question has {} (numbered from 1)",
                                    opts.len()
                                ),
                            )
                        })?;
                    labels.push(label.to_owned());
                }
                Answer::Reply {
                    answers: vec![labels],
                }
            };
            let rb = c
                .request(
                    Method::POST,
                    &format!("/api/v1/attention/{}/answer", enc(&a.item)),
                )
                .json(&answer);
            let r: AnswerView = decode(c.send(rb).await?).await?;
            if g.json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                println!("{} answered", r.item.id);
                for o in &r.also_rejected {
                    println!(
                        "{} was rejected with it (OpenCode rejects a session's other pending requests)",
                        o.id
                    );
                }
            }
            Ok(0)
        }
    }
}

/// Runs `atelier template …`.
pub async fn template(g: &Global, cmd: TemplateCmd) -> anyhow::Result<u8> {
    let c = Client::new(g)?;
    match cmd {
        TemplateCmd::List { workspace } => {
            let path = match &workspace {
                Some(w) => format!("/api/v1/templates?workspace={}", enc(w)),
                None => "/api/v1/templates".to_owned(),
            };
            let items: Vec<TaskTemplate> = c.get_json(&path).await?;
            if g.json {
                println!("{}", serde_json::to_string_pretty(&items)?);
            } else {
                for t in items {
                    println!("{:<24} {}", t.name, t.title);
                }
            }
        }
        TemplateCmd::Show { name, workspace } => {
            let mut path = format!("/api/v1/templates/{}", enc(&name));
            if let Some(w) = &workspace {
                path.push_str(&format!("?workspace={}", enc(w)));
            }
            let t: TaskTemplate = c.get_json(&path).await?;
            if g.json {
                println!("{}", serde_json::to_string_pretty(&t)?);
            } else {
                println!("{}: {}", t.name, t.title);
                println!(
                    "agent: {}   default effort: {}",
                    t.agent,
                    t.default_effort.as_str()
                );
                for r in &t.permission {
                    println!(
                        "permission: {} {} -> {:?}",
                        r.permission, r.pattern, r.action
                    );
                }
                if let Some(secs) = t.attention_timeout_secs {
                    println!("unanswered items are rejected after {secs} s");
                }
                for (e, s) in &t.efforts {
                    println!(
                        "effort {}: model {} variant {} plan first {}",
                        e.as_str(),
                        s.model.as_deref().unwrap_or("(workspace default)"),
                        s.variant.as_deref().unwrap_or("-"),
                        s.plan_first
                    );
                }
                println!("prompt:\n{}", t.prompt);
            }
        }
        TemplateCmd::Set { file } => {
            let text = if file.as_os_str() == "-" {
                std::io::read_to_string(std::io::stdin())?
            } else {
                std::fs::read_to_string(&file)
                    .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", file.display()))?
            };
            let t = TaskTemplate::from_yaml(&text).map_err(|e| {
                CliError::error(
                    atelier_core::ErrorKind::Invalid,
                    format!("{}: {e}", file.display()),
                )
            })?;
            let rb = c
                .request(Method::PUT, &format!("/api/v1/templates/{}", enc(&t.name)))
                .json(&t);
            let t: TaskTemplate = decode(c.send(rb).await?).await?;
            println!("template {} stored", t.name);
        }
        TemplateCmd::Reset { name } => {
            let rb = c.request(Method::DELETE, &format!("/api/v1/templates/{}", enc(&name)));
            let t: TaskTemplate = decode(c.send(rb).await?).await?;
            println!("template {} is now as it ships", t.name);
        }
    }
    Ok(0)
}
