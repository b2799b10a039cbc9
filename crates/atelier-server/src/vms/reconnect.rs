//! Recovering a sandbox whose agent connection closed while its VM runs: the client
//! closes it for a protocol violation (a guest flooding or corrupting the port, see
//! `atelier-agent-proto`'s limits) or on an I/O error. The manager then connects to
//! the VM's agent socket again with backoff (QEMU's chardev takes a new client; the
//! agent resets its decoder when the host goes and answers a new host's Hello), and
//! handshakes; after [`MAX_RECONNECT_ATTEMPTS`] failed attempts in a row it gives up
//! and reports the sandbox's agent unhealthy with the reason, as a `sandbox.agent`
//! event and in the sandbox's `agent_detail`.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use atelier_agent_proto::AgentClient;
use atelier_core::event::EventKind;
use atelier_core::{SandboxId, SandboxState};

use super::RunningVm;
use crate::manager::Manager;

/// Reconnection attempts in a row before the sandbox is reported unhealthy.
pub(crate) const MAX_RECONNECT_ATTEMPTS: u32 = 8;

/// A connection that stayed up this long starts a fresh series of attempts when it
/// closes; a guest that breaks every new connection at once runs out of them.
const STABLE: Duration = Duration::from_secs(60);

/// The wait before attempt `n` (0-based): 1, 2, 4, 8, 16, then 30 s.
pub(crate) fn reconnect_backoff(n: u32) -> Duration {
    Duration::from_secs((1u64 << n.min(5)).min(30))
}

impl Manager {
    /// Watches the agent connection of sandbox `id`'s VM `vm` for as long as `vm` is
    /// its registered VM, reconnecting when it closes (see the module docs).
    pub(crate) fn supervise_agent(self: &Arc<Self>, id: &SandboxId, vm: Arc<RunningVm>) {
        let me = Arc::clone(self);
        let id = id.clone();
        tokio::spawn(async move { me.agent_supervisor(id, vm).await });
    }

    async fn agent_supervisor(self: Arc<Self>, id: SandboxId, vm: Arc<RunningVm>) {
        let mut exited = vm.process.exit_watch();
        let mut attempts = 0u32;
        loop {
            let client = vm.agent();
            let since = Instant::now();
            let reason = tokio::select! {
                r = client.closed() => r,
                _ = exited.wait_for(|e| *e) => return,
            };
            drop(client);
            if !self.runs(&id, &vm).await {
                return;
            }
            if since.elapsed() >= STABLE {
                attempts = 0;
            }
            vm.responsive.store(false, Ordering::Relaxed);
            vm.set_detail(Some(format!(
                "agent connection closed ({reason}); reconnecting"
            )));
            let mut last = reason.clone();
            let mut announced = false;
            let new = loop {
                if attempts >= MAX_RECONNECT_ATTEMPTS {
                    let why = format!(
                        "agent connection closed ({reason}) and {MAX_RECONNECT_ATTEMPTS} reconnection attempts failed (last: {last}); stop and start the sandbox"
                    );
                    tracing::error!(sandbox = %id, "{why}");
                    vm.set_detail(Some(why.clone()));
                    self.agent_event(&id, "unhealthy", Some(why)).await;
                    return;
                }
                let wait = reconnect_backoff(attempts);
                attempts += 1;
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = exited.wait_for(|e| *e) => return,
                }
                if !self.runs(&id, &vm).await {
                    return;
                }
                // Announced once the VM outlived the first wait: a guest powering
                // itself off closes the connection just before its VMM exits.
                if !announced {
                    announced = true;
                    self.agent_event(&id, "reconnecting", Some(reason.clone()))
                        .await;
                }
                match self.connect_agent(&vm).await {
                    Ok(c) => break c,
                    Err(e) => {
                        tracing::warn!(sandbox = %id, attempt = attempts, error = %e, "reconnecting to the agent failed");
                        vm.set_detail(Some(format!(
                            "agent connection closed ({reason}); reconnection attempt {attempts} of {MAX_RECONNECT_ATTEMPTS} failed: {e}"
                        )));
                        last = e;
                    }
                }
            };
            vm.replace_agent(new);
            vm.set_detail(None);
            vm.responsive.store(true, Ordering::Relaxed);
            tracing::info!(sandbox = %id, attempt = attempts, "agent reconnected");
            self.agent_event(&id, "ready", None).await;
        }
    }

    /// Whether `vm` is still sandbox `id`'s VM and the sandbox is running (a stop or
    /// delete closes the connection on purpose).
    async fn runs(&self, id: &SandboxId, vm: &Arc<RunningVm>) -> bool {
        self.vms.get(id).is_some_and(|v| Arc::ptr_eq(&v, vm))
            && matches!(
                self.store.get_sandbox(id).await,
                Ok(r) if r.state == SandboxState::Running
            )
    }

    /// One attempt: a new connection to the VM's agent socket and its handshake,
    /// within the agent timeout.
    async fn connect_agent(&self, vm: &RunningVm) -> Result<AgentClient, String> {
        let timeout = self.cfg.agent_timeout;
        let agent = AgentClient::connect_unix(&vm.process.paths().agent)
            .await
            .map_err(|e| e.to_string())?
            .with_timeout(timeout);
        agent.wait_ready(timeout).await.map_err(|e| e.to_string())?;
        Ok(agent)
    }

    async fn agent_event(&self, id: &SandboxId, agent: &str, reason: Option<String>) {
        let name = match self.store.get_sandbox(id).await {
            Ok(r) => r.name,
            Err(_) => id.to_string(),
        };
        self.events().publish(EventKind::SandboxAgent {
            sandbox: id.to_string(),
            name,
            agent: agent.to_owned(),
            reason,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_thirty_seconds_and_the_attempts_are_bounded() {
        let waits: Vec<u64> = (0..MAX_RECONNECT_ATTEMPTS)
            .map(|n| reconnect_backoff(n).as_secs())
            .collect();
        assert_eq!(waits, [1, 2, 4, 8, 16, 30, 30, 30]);
        assert!(waits.iter().sum::<u64>() < 180);
    }
}
