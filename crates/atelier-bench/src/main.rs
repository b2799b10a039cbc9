//! `atelier-bench`: Atelier's benchmarks, measured against a running manager through
//! its REST API. `bench` times boot, clone, exec, transfer, the proxy and idle memory;
//! `bench-prebuild` times spawning from a prebuild against bare QEMU and a cold boot.
//! Both report figures and ratios and never assert on times.
//!
//! The bench never changes the manager's data dir: its local steps work in a scratch
//! directory of its own ([`scratch::Scratch`]), and everything it starts (sandboxes,
//! bare QEMU processes, scratch files) is removed at the end, when a step fails, and
//! on Ctrl-C.

mod bench;
mod bench_prebuild;
mod bench_task;
mod scratch;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Atelier benchmarks against a running manager.
#[derive(Parser, Debug)]
#[command(name = "atelier-bench", version, about, propagate_version = true)]
struct Cli {
    #[command(flatten)]
    global: Global,
    #[command(subcommand)]
    command: Command,
}

/// Options every subcommand understands (the same as the `atelier` CLI's).
#[derive(clap::Args, Debug, Clone)]
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
    /// The manager's data directory (read only: for its token, VMM processes, prebuilds).
    #[arg(
        long,
        global = true,
        env = "ATELIER_DATA_DIR",
        default_value = "/var/lib/atelier"
    )]
    pub data_dir: PathBuf,
    /// Machine-readable JSON output.
    #[arg(long, global = true)]
    pub json: bool,
}

impl atelier_client::Endpoint for Global {
    fn url(&self) -> &str {
        &self.url
    }

    fn token(&self) -> Option<&str> {
        self.token.as_deref()
    }

    fn token_file(&self) -> Option<&Path> {
        self.token_file.as_deref()
    }

    fn data_dir(&self) -> &Path {
        &self.data_dir
    }
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Measure boot, clone, exec and transfer speed against a running manager; prints ratios.
    Bench(bench::Args),
    /// Measure spawning from a prebuild against bare QEMU and a cold boot; prints ratios.
    BenchPrebuild(bench_prebuild::Args),
    /// Measure task start → first model request against spawn → agent ready, on a
    /// manager, model and git server of its own; prints the ratio.
    BenchTask(bench_task::Args),
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
            Command::Bench(args) => bench::run(&cli.global, args).await,
            Command::BenchPrebuild(args) => bench_prebuild::run(&cli.global, args).await,
            Command::BenchTask(args) => bench_task::run(args).await,
        }
    });
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            let kind = e
                .downcast_ref::<atelier_client::CliError>()
                .map(|c| c.kind)
                .unwrap_or(atelier_core::ErrorKind::Internal);
            eprintln!("error: {e:#}");
            ExitCode::from(kind.exit_code() as u8)
        }
    }
}
