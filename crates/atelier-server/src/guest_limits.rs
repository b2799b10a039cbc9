//! Limits on what guests leave on the host: the console log of every running
//! sandbox is capped and rotated (see [`atelier_vmm::console`]); a prebuild's build
//! log is capped ([`BUILD_LOG_MAX`]) and the output a build step keeps is a tail.

use std::sync::Arc;
use std::time::Duration;

use atelier_vmm::console::{CONSOLE_LOG_MAX, rotate_if_over};

use crate::manager::Manager;

/// Largest build log; a guest printing more gets a marker line and the rest of its
/// output is dropped from the file (the failure message keeps the output's tail).
pub const BUILD_LOG_MAX: u64 = 64 << 20;

/// Writes `b` to a log that already holds `written` bytes, within
/// [`BUILD_LOG_MAX`]; returns what to add to `written` (one more than the room once
/// the marker line is written, so it is written once).
pub(crate) fn capped_write(file: &mut impl std::io::Write, written: u64, b: &[u8]) -> u64 {
    if written > BUILD_LOG_MAX || b.is_empty() {
        return 0;
    }
    let room = BUILD_LOG_MAX - written;
    if (b.len() as u64) <= room {
        let _ = file.write_all(b);
        return b.len() as u64;
    }
    let _ = file.write_all(&b[..room as usize]);
    let _ = write!(
        file,
        "\n[atelier: build log capped at {} MiB; further output is not stored]\n",
        BUILD_LOG_MAX >> 20
    );
    room + 1
}

/// Appends `data` to `buf`, keeping only its last `max` bytes.
pub(crate) fn append_tail(buf: &mut Vec<u8>, data: &[u8], max: usize) {
    buf.extend_from_slice(data);
    if buf.len() > max {
        let cut = buf.len() - max;
        buf.drain(..cut);
    }
}

/// How often console logs are checked against their cap.
pub const CONSOLE_CHECK_INTERVAL: Duration = Duration::from_secs(2);

/// Starts the loop that rotates the console logs of running sandboxes.
pub(crate) fn spawn_console_rotation(mgr: &Arc<Manager>) {
    let mgr = Arc::clone(mgr);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(CONSOLE_CHECK_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let logs: Vec<_> = mgr
                .vms
                .ids()
                .into_iter()
                .map(|id| {
                    let log = mgr.sandbox_dir(&id).join("console.log");
                    (id, log)
                })
                .collect();
            let rotated = tokio::task::spawn_blocking(move || {
                logs.into_iter()
                    .filter_map(|(id, log)| match rotate_if_over(&log, CONSOLE_LOG_MAX) {
                        Ok(true) => Some(id),
                        Ok(false) => None,
                        Err(e) => {
                            tracing::warn!(sandbox = %id, error = %e, "cannot rotate the console log");
                            None
                        }
                    })
                    .collect::<Vec<_>>()
            })
            .await
            .unwrap_or_default();
            for id in rotated {
                tracing::debug!(sandbox = %id, "console log rotated");
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn build_log_is_capped_with_a_marker() {
        let mut file = Vec::new();
        let mut written = 0;
        let chunk = vec![b'x'; 1 << 20];
        for _ in 0..(BUILD_LOG_MAX >> 20) + 5 {
            written += capped_write(&mut file, written, &chunk);
        }
        assert_eq!(written, BUILD_LOG_MAX + 1);
        assert!(file.len() < BUILD_LOG_MAX as usize + 200);
        assert!(String::from_utf8_lossy(&file[file.len() - 100..]).contains("capped"));
        let mut tail = Vec::new();
        append_tail(&mut tail, b"abcdef", 4);
        append_tail(&mut tail, b"gh", 4);
        assert_eq!(tail, b"efgh");
    }
}
