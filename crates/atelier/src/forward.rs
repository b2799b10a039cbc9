//! `atelier bench` and `atelier bench-prebuild`: forwarders to the `atelier-bench`
//! binary, which holds the benchmarks (they are not part of the CLI). Kept so scripts
//! and habits that say `atelier bench` keep working.

use std::os::unix::process::CommandExt;
use std::path::PathBuf;

use atelier_core::ErrorKind;

use crate::Global;
use crate::client::CliError;

/// The arguments of a forwarded subcommand, passed on untouched (`--help` included).
#[derive(clap::Args, Debug)]
pub struct Forward {
    /// Arguments for `atelier-bench` (see `atelier-bench <subcommand> --help`).
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub args: Vec<String>,
}

/// `atelier-bench` beside this binary, else on `PATH`.
fn bench_binary() -> Option<PathBuf> {
    let beside = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(|d| d.join("atelier-bench")));
    let on_path = std::env::var_os("PATH")
        .map(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join("atelier-bench"))
                .collect::<Vec<_>>()
        })
        .unwrap_or_default();
    beside.into_iter().chain(on_path).find(|p| p.is_file())
}

/// Replaces this process with `atelier-bench <subcommand> <args>`, the global options
/// passed through the environment (and `--json`); returns only on failure.
pub fn exec(g: &Global, subcommand: &str, fwd: Forward) -> anyhow::Result<u8> {
    let bin = bench_binary().ok_or_else(|| {
        CliError::error(
            ErrorKind::NotFound,
            "the benchmarks are in the atelier-bench binary, not found beside atelier or on PATH; \
             build it with `cargo build --release -p atelier-bench` (scripts/install.sh installs it)",
        )
    })?;
    let mut cmd = std::process::Command::new(&bin);
    cmd.arg(subcommand)
        .args(&fwd.args)
        .env("ATELIER_URL", &g.url)
        .env("ATELIER_DATA_DIR", &g.data_dir);
    if let Some(t) = &g.token {
        cmd.env("ATELIER_TOKEN", t);
    }
    if let Some(f) = &g.token_file {
        cmd.env("ATELIER_TOKEN_FILE", f);
    }
    if g.json {
        cmd.arg("--json");
    }
    let e = cmd.exec();
    Err(CliError::error(
        ErrorKind::Internal,
        format!("cannot run {}: {e}", bin.display()),
    ))
}
