//! A running VMM process, whether this manager started it or adopted it after a
//! restart, and helpers to find VMM processes by the run directory in their command
//! line.

use std::fs;
use std::path::Path;
use std::time::Duration;

use tokio::sync::watch;

use crate::qmp::Qmp;
use crate::{RunPaths, VmmError};

/// A VMM process and its QMP session.
#[derive(Debug)]
pub struct VmProcess {
    pid: i32,
    paths: RunPaths,
    qmp: Qmp,
    exited: watch::Receiver<bool>,
}

impl VmProcess {
    pub(crate) fn new(pid: i32, paths: RunPaths, qmp: Qmp, exited: watch::Receiver<bool>) -> Self {
        VmProcess {
            pid,
            paths,
            qmp,
            exited,
        }
    }

    /// The VMM's pid.
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// The run directory's files.
    pub fn paths(&self) -> &RunPaths {
        &self.paths
    }

    /// The QMP session.
    pub fn qmp(&self) -> &Qmp {
        &self.qmp
    }

    /// Whether the process has exited.
    pub fn has_exited(&self) -> bool {
        *self.exited.borrow()
    }

    /// A receiver that turns `true` when the process exits.
    pub fn exit_watch(&self) -> watch::Receiver<bool> {
        self.exited.clone()
    }

    /// Waits up to `timeout` for the process to exit; true if it did.
    pub async fn wait_exit(&self, timeout: Duration) -> bool {
        let mut rx = self.exited.clone();
        tokio::time::timeout(timeout, rx.wait_for(|e| *e))
            .await
            .is_ok()
    }

    /// Kills the process with SIGKILL and waits for it to be gone.
    pub async fn kill(&self) -> Result<(), VmmError> {
        if self.has_exited() {
            return Ok(());
        }
        kill_pid(self.pid);
        if self.wait_exit(Duration::from_secs(10)).await {
            Ok(())
        } else {
            Err(VmmError::Timeout(
                Duration::from_secs(10),
                format!("vmm pid {} to exit after SIGKILL", self.pid),
            ))
        }
    }
}

/// Sends SIGKILL to `pid`, ignoring a process that is already gone.
pub fn kill_pid(pid: i32) {
    if let Some(p) = rustix::process::Pid::from_raw(pid) {
        let _ = rustix::process::kill_process(p, rustix::process::Signal::KILL);
    }
}

/// Whether `pid` is alive (not a zombie) and its command line contains `marker`.
pub fn pid_matches(pid: i32, marker: &str) -> bool {
    let Ok(cmdline) = fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    if !contains(&cmdline, marker.as_bytes()) {
        return false;
    }
    // Field 3 of /proc/PID/stat is the state; a zombie is gone for our purposes.
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| !rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && hay.windows(needle.len()).any(|w| w == needle)
}

/// Pids of live processes whose command line contains `marker` (a run directory or
/// the data directory), excluding this process.
pub fn find_pids(marker: &str) -> Vec<i32> {
    let me = std::process::id() as i32;
    let Ok(rd) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    rd.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&pid| pid != me && pid_matches(pid, marker))
        .collect()
}

/// Reads a pidfile; None when missing or unreadable.
pub fn read_pidfile(path: &Path) -> Option<i32> {
    fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// Watches a process that is not our child by polling /proc.
pub(crate) fn watch_foreign(pid: i32, marker: String) -> watch::Receiver<bool> {
    let (tx, rx) = watch::channel(false);
    tokio::spawn(async move {
        while pid_matches(pid, &marker) {
            tokio::time::sleep(Duration::from_millis(250)).await;
            if tx.is_closed() {
                return;
            }
        }
        let _ = tx.send(true);
    });
    rx
}
