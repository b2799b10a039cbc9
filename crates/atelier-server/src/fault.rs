//! Crash-test hooks: named points where an operation can be made to stall so a
//! test can kill the manager at a known step.

use std::time::Duration;

/// When `ATELIER_FAULT_PAUSE` (comma-separated) names `point`, logs and stalls there.
pub(crate) async fn point(point: &str) {
    let hit = std::env::var("ATELIER_FAULT_PAUSE").is_ok_and(|v| v.split(',').any(|p| p == point));
    if hit {
        tracing::warn!(point, "fault point reached; pausing (ATELIER_FAULT_PAUSE)");
        tokio::time::sleep(Duration::from_secs(3600)).await;
    }
}
