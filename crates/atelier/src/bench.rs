//! `atelier bench`: measured against a running manager.

use crate::Global;
use crate::commands::BenchArgs;

/// Runs the benchmark.
pub async fn run(_g: &Global, _args: BenchArgs) -> anyhow::Result<u8> {
    anyhow::bail!("bench is being written")
}
