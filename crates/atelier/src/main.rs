//! `atelier`: the single host binary. `atelier serve` runs the manager; every other
//! subcommand is a thin client of its REST API (plus a few local host tasks: image
//! builds, `doctor`). The logic lives in the library crates; the benchmarks live in
//! the `atelier-bench` binary (`atelier bench` forwards to it).

mod auth;
mod client;
mod commands;
mod dev;
mod doctor;
mod events;
mod forward;
mod prebuild;
mod serve;
mod shell;
mod task;
mod workspace;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

/// Self-hosted VM sandboxes for AI coding agents.
#[derive(Parser, Debug)]
#[command(name = "atelier", version, about, propagate_version = true)]
struct Cli {
    #[command(flatten)]
    global: Global,
    #[command(subcommand)]
    command: Command,
}

/// Options every subcommand understands.
#[derive(Args, Debug, Clone)]
pub struct Global {
    /// Manager URL.
    #[arg(
        long,
        global = true,
        env = "ATELIER_URL",
        default_value = "http://127.0.0.1:7070"
    )]
    pub url: String,
    /// API token, from the environment only (ATELIER_TOKEN): a command-line argument
    /// would show in /proc/*/cmdline.
    #[arg(skip = std::env::var("ATELIER_TOKEN").ok())]
    pub token: Option<String>,
    /// File holding the API token (else ~/.config/atelier/token, else
    /// DATA_DIR/admin-token).
    #[arg(long, global = true, env = "ATELIER_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
    /// Data directory (database, images, disks, sandboxes).
    #[arg(
        long,
        global = true,
        env = "ATELIER_DATA_DIR",
        default_value = "/var/lib/atelier"
    )]
    pub data_dir: PathBuf,
    /// Directory of built images (default DATA_DIR/images).
    #[arg(long, global = true, env = "ATELIER_IMAGES_DIR")]
    pub images_dir: Option<PathBuf>,
    /// Machine-readable JSON output.
    #[arg(long, global = true)]
    pub json: bool,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the manager (API, reconcile loop) in the foreground.
    Serve(Box<serve::ServeArgs>),
    /// Create and drive sandboxes.
    #[command(subcommand)]
    Sandbox(commands::SandboxCmd),
    /// An interactive terminal in a sandbox (the current folder's by default, shared at /workspace).
    Shell(shell::ShellArgs),
    /// Tasks: a coding agent (OpenCode) works on a prompt in a sandbox of its own, on a branch of its own.
    #[command(subcommand)]
    Task(task::TaskCmd),
    /// What tasks' agents ask of you (permissions, questions), and answering it.
    Attention(task::AttentionArgs),
    /// Task templates: implementation, reviews, simplification.
    #[command(subcommand)]
    Template(task::TemplateCmd),
    /// Dev commands in a sandbox: supervised servers with URLs through the proxy.
    #[command(subcommand)]
    Dev(dev::DevCmd),
    /// Workspace definitions: image, repos, init and dev commands, secrets (YAML or JSON).
    #[command(subcommand)]
    Workspace(workspace::WorkspaceCmd),
    /// Prebuilds: workspaces booted, cloned, initialised and snapshotted.
    #[command(subcommand)]
    Prebuild(prebuild::PrebuildCmd),
    /// Secrets that workspaces reference (stored encrypted; values are never shown).
    #[command(subcommand)]
    Secret(workspace::SecretCmd),
    /// Save an API token (read from standard input) to ~/.config/atelier/token.
    Login(auth::LoginArgs),
    /// Forget the saved token (~/.config/atelier/token).
    Logout(auth::LogoutArgs),
    /// Browser sessions: list and revoke.
    #[command(subcommand)]
    Session(auth::SessionCmd),
    /// API tokens: list, create, revoke.
    #[command(subcommand)]
    Token(auth::TokenCmd),
    /// TLS helpers: print the local CA to trust.
    #[command(subcommand)]
    Tls(commands::TlsCmd),
    /// Build and list guest images (runs locally, as root).
    #[command(subcommand)]
    Image(commands::ImageCmd),
    /// Follow live events (sandbox, prebuild, dev command, workspace changes); --json for NDJSON.
    Events(events::EventsArgs),
    /// Manager health, accelerator in use, sandbox counts.
    Status,
    /// Check this host: KVM, QEMU, storage pool, tools, free space; says how to fix what is missing.
    Doctor,
    /// Measure boot, clone, exec and transfer speed against a running manager; prints
    /// ratios (runs `atelier-bench bench`).
    #[command(disable_help_flag = true)]
    Bench(forward::Forward),
    /// Measure spawning from a prebuild against bare QEMU and a cold boot; prints ratios
    /// (runs `atelier-bench bench-prebuild`).
    #[command(disable_help_flag = true)]
    BenchPrebuild(forward::Forward),
}

impl Global {
    /// The images directory in effect.
    pub fn images_dir(&self) -> PathBuf {
        self.images_dir
            .clone()
            .unwrap_or_else(|| self.data_dir.join("images"))
    }
}

/// The static guest agent: beside this binary, else in /usr/local/lib/atelier.
pub fn default_agent_binary() -> Option<PathBuf> {
    let beside = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(|d| d.join("atelier-agent")));
    beside
        .into_iter()
        .chain(std::iter::once(PathBuf::from(
            "/usr/local/lib/atelier/atelier-agent",
        )))
        .find(|p| p.is_file())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let result = rt.block_on(async move {
        match cli.command {
            Command::Serve(args) => serve::run(&cli.global, *args).await,
            Command::Sandbox(cmd) => commands::sandbox(&cli.global, cmd).await,
            Command::Shell(args) => shell::run(&cli.global, args).await,
            Command::Task(cmd) => task::task(&cli.global, cmd).await,
            Command::Attention(args) => task::attention(&cli.global, args).await,
            Command::Template(cmd) => task::template(&cli.global, cmd).await,
            Command::Dev(cmd) => dev::run(&cli.global, cmd).await,
            Command::Workspace(cmd) => workspace::workspace(&cli.global, cmd).await,
            Command::Prebuild(cmd) => prebuild::run(&cli.global, cmd).await,
            Command::Secret(cmd) => workspace::secret(&cli.global, cmd).await,
            Command::Login(args) => auth::login(&cli.global, args).await,
            Command::Logout(args) => auth::logout(&cli.global, args).await,
            Command::Session(cmd) => auth::session(&cli.global, cmd).await,
            Command::Token(cmd) => auth::token(&cli.global, cmd).await,
            Command::Tls(cmd) => commands::tls(&cli.global, cmd).await,
            Command::Image(cmd) => commands::image(&cli.global, cmd).await,
            Command::Events(args) => events::run(&cli.global, args).await,
            Command::Status => commands::status(&cli.global).await,
            Command::Doctor => doctor::run(&cli.global).await,
            Command::Bench(args) => forward::exec(&cli.global, "bench", args),
            Command::BenchPrebuild(args) => forward::exec(&cli.global, "bench-prebuild", args),
        }
    });
    // A terminal session may leave a blocking stdin read behind; do not wait for it.
    rt.shutdown_background();
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            let kind = e
                .downcast_ref::<client::CliError>()
                .map(|c| c.kind)
                .unwrap_or(atelier_core::ErrorKind::Internal);
            eprintln!("error: {e:#}");
            ExitCode::from(kind.exit_code() as u8)
        }
    }
}
