//! Stopping VMs whose guest or QEMU may be hung, and a delete that never waits
//! behind them. Every step has a deadline: the agent's power-off request (the
//! agent timeout), QMP `quit` (the QMP timeout), then SIGKILL, which also ends a
//! stopped (SIGSTOP) process.

use std::time::{Duration, Instant};

use atelier_store::SandboxRecord;
use tokio::sync::OwnedMutexGuard;

use crate::Error;
use crate::manager::Manager;
use crate::vms::{RunningVm, kill_vmms};

/// How long a guest that acknowledged the power-off may take to do it.
const POWER_OFF_WAIT: Duration = Duration::from_secs(15);

/// How long QEMU may take to exit after accepting `quit`.
const QUIT_WAIT: Duration = Duration::from_secs(5);

/// How long a VMM that closed its sockets may take to be reaped.
const EXIT_GRACE: Duration = Duration::from_secs(2);

/// How long delete waits for the lock between two rounds of killing the VM of the
/// operation that holds it.
const PREEMPT_ROUND: Duration = Duration::from_millis(250);

/// How long delete keeps killing before it gives up on an operation that holds the
/// lock without a VM (it then asks the caller to retry).
const PREEMPT_LIMIT: Duration = Duration::from_secs(120);

impl Manager {
    /// Brings a running VM down: a clean power-off through the agent, else QMP
    /// `quit`, else SIGKILL. Returns `None` after a clean power-off, or what had to
    /// be forced and why (for the sandbox record and the log).
    pub(crate) async fn halt_vm(&self, rec: &SandboxRecord, vm: &RunningVm) -> Option<String> {
        let mut why = Vec::new();
        match vm.agent().shutdown(false).await {
            Ok(()) => {
                if vm.process.wait_exit(POWER_OFF_WAIT).await {
                    return None;
                }
                why.push(format!(
                    "the guest acknowledged the power-off but still ran after {} s",
                    POWER_OFF_WAIT.as_secs()
                ));
            }
            Err(e) => {
                // The guest powering off closes the agent socket before the answer.
                let timed_out = matches!(e, atelier_agent_proto::ProtoError::Timeout { .. });
                if !timed_out && vm.process.wait_exit(EXIT_GRACE).await {
                    return None;
                }
                why.push(format!("agent shutdown: {e}"));
            }
        }
        match vm.process.qmp().execute("quit", None).await {
            Ok(_) if vm.process.wait_exit(QUIT_WAIT).await => {
                why.push("stopped with qmp quit".into());
            }
            Ok(_) => why.push(format!(
                "qemu accepted quit but still ran after {} s",
                QUIT_WAIT.as_secs()
            )),
            Err(e) => why.push(e.to_string()),
        }
        if !vm.process.has_exited() {
            match vm.process.kill().await {
                Ok(()) => why.push("killed the VM process (SIGKILL)".into()),
                Err(e) => why.push(e.to_string()),
            }
        }
        let why = format!("forced stop: {}", why.join("; "));
        tracing::warn!(sandbox = %rec.id, name = %rec.name, "{why}");
        Some(why)
    }

    /// Takes a sandbox's lock for delete. When another operation holds it (perhaps
    /// waiting on a hung guest or QEMU), delete wins: it kills the sandbox's VM so
    /// that operation fails fast, and keeps killing any VM it starts until it lets
    /// go of the lock.
    pub(crate) async fn locked_for_delete(
        &self,
        id_or_name: &str,
    ) -> Result<(OwnedMutexGuard<()>, SandboxRecord), Error> {
        let rec = self.get(id_or_name).await?;
        let guard = match self.try_lock(&rec.id) {
            Some(g) => g,
            None => {
                tracing::info!(sandbox = %rec.id, "delete: another operation holds the sandbox; killing its VM so it ends");
                let run_dir = self.sandbox_dir(&rec.id).display().to_string();
                let start = Instant::now();
                loop {
                    self.drop_vm(&rec.id).await;
                    kill_vmms(&run_dir).await;
                    if let Ok(g) = tokio::time::timeout(PREEMPT_ROUND, self.lock(&rec.id)).await {
                        break g;
                    }
                    if start.elapsed() > PREEMPT_LIMIT {
                        return Err(Error::unavailable(format!(
                            "sandbox {} is still busy with another operation {} s after its VM was killed; retry the delete",
                            rec.name,
                            PREEMPT_LIMIT.as_secs()
                        )));
                    }
                }
            }
        };
        let rec = self.store.get_sandbox(&rec.id).await?;
        Ok((guard, rec))
    }
}
