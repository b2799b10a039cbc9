//! The VM registry: the one owner of the VMMs this manager drives. It launches and
//! adopts them through the [`Hypervisor`], keeps the running ones with their agent
//! connections, watches their agents' health, and decides the accelerator once.
//! What a VM *is for* (a sandbox, a template, a prebuild) is its caller's business;
//! the host resources a VMM holds are journaled by the caller before launch (see
//! [`crate::journal`]).

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex as StdMutex};
use std::time::Duration;

use atelier_agent_proto::AgentClient;
use atelier_core::SandboxId;
use atelier_store::Store;
use atelier_vmm::qemu::Qemu;
use atelier_vmm::{Accel, AccelChoice, Hypervisor, ProbeOutcome, VmConfig, VmProcess};
use tokio::sync::OnceCell;

use crate::Error;
use crate::config::ManagerConfig;
use crate::guest_stream::{AgentSource, protocol_mismatch};

mod reconnect;

/// A VM this manager is driving.
pub(crate) struct RunningVm {
    pub(crate) process: VmProcess,
    /// The current agent connection; replaced when the manager reconnects after
    /// the previous one closed (see [`reconnect`]).
    agent: StdMutex<AgentClient>,
    pub(crate) responsive: AtomicBool,
    /// Whether this VM was restored from a memory snapshot (else it booted).
    pub(crate) restored: bool,
    /// Agent restarts seen on connections before the current one.
    earlier_restarts: AtomicU64,
    /// Why the agent is not ready when the health check cannot tell (its
    /// connection closed; reconnecting; gave up).
    detail: StdMutex<Option<String>>,
}

impl RunningVm {
    /// The current agent connection (a cheap clone).
    pub(crate) fn agent(&self) -> AgentClient {
        lock(&self.agent).clone()
    }

    /// Puts a new connection in place of the closed one, carrying its restart
    /// count over (one more when the new agent is another process).
    pub(crate) fn replace_agent(&self, new: AgentClient) {
        let mut cur = lock(&self.agent);
        let another = match (cur.hello(), new.hello()) {
            (Some(a), Some(b)) => a.pid != b.pid || a.boot_id != b.boot_id,
            _ => false,
        };
        self.earlier_restarts
            .fetch_add(cur.restarts() + u64::from(another), Ordering::Relaxed);
        *cur = new;
    }

    /// Sets or clears why the agent is not ready.
    pub(crate) fn set_detail(&self, detail: Option<String>) {
        *lock(&self.detail) = detail;
    }

    /// Why the agent is not ready, when known.
    pub(crate) fn detail(&self) -> Option<String> {
        lock(&self.detail).clone()
    }
}

impl std::fmt::Debug for RunningVm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunningVm")
            .field("pid", &self.process.pid())
            .finish_non_exhaustive()
    }
}

/// The agent's health as last seen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AgentHealth {
    /// Answered the last ping.
    Ready,
    /// Did not answer the last ping in time.
    Unresponsive,
}

/// The running VMs of sandboxes, and how VMs are launched here.
pub(crate) struct VmRegistry {
    hv: Arc<dyn Hypervisor>,
    accel_choice: AccelChoice,
    accel: OnceCell<ProbeOutcome>,
    qemu_binary: std::path::PathBuf,
    probe_dir: std::path::PathBuf,
    qemu_version: String,
    agent_timeout: Duration,
    running: StdMutex<HashMap<SandboxId, Arc<RunningVm>>>,
}

impl std::fmt::Debug for VmRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmRegistry")
            .field("qemu_version", &self.qemu_version)
            .field("running", &lock(&self.running).len())
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &StdMutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl VmRegistry {
    /// A registry launching VMs with the configured QEMU.
    pub(crate) async fn new(cfg: &ManagerConfig) -> VmRegistry {
        let qemu = Qemu::new(cfg.qemu_binary.clone()).with_qmp_timeout(cfg.qmp_timeout);
        let qemu_version = qemu
            .version()
            .await
            .unwrap_or_else(|e| format!("unavailable: {e}"));
        VmRegistry {
            hv: Arc::new(qemu),
            accel_choice: cfg.accel,
            accel: OnceCell::new(),
            qemu_binary: cfg.qemu_binary.clone(),
            probe_dir: cfg.data_dir.join("probe"),
            qemu_version,
            agent_timeout: cfg.agent_timeout,
            running: StdMutex::new(HashMap::new()),
        }
    }

    /// QEMU's version line.
    pub(crate) fn qemu_version(&self) -> &str {
        &self.qemu_version
    }

    /// The accelerator, if it has been decided yet.
    pub(crate) fn accel_if_known(&self) -> Option<&ProbeOutcome> {
        self.accel.get()
    }

    /// The accelerator to use: forced by configuration, or probed once (booting the
    /// given image's kernel under KVM) and cached in the store for this QEMU version.
    pub(crate) async fn accel(&self, image: &atelier_image::Image, store: &Store) -> &ProbeOutcome {
        self.accel
            .get_or_init(|| async {
                if let AccelChoice::Forced(a) = self.accel_choice {
                    return ProbeOutcome { accel: a, reason: "set by ATELIER_ACCEL".into() };
                }
                let key = format!("accel-probe:{}:{}", self.qemu_version, image.manifest.kernel_release);
                if let Ok(Some(v)) = store.setting(&key).await
                    && let Some((a, reason)) = v.split_once('|')
                    && let Some(accel) = Accel::parse(a)
                {
                    return ProbeOutcome { accel, reason: format!("{reason} (cached)") };
                }
                let out = atelier_vmm::probe_accel(
                    &self.qemu_binary,
                    &image.kernel(),
                    &image.initrd(),
                    &self.probe_dir,
                    Duration::from_secs(20),
                )
                .await;
                tracing::info!(accel = out.accel.as_str(), reason = %out.reason, "accelerator chosen");
                let _ = store.put_setting(&key, &format!("{}|{}", out.accel.as_str(), out.reason)).await;
                out
            })
            .await
    }

    /// Launches a VMM. Its caller has journaled what it will hold.
    pub(crate) async fn launch(&self, cfg: &VmConfig) -> Result<VmProcess, Error> {
        Ok(self.hv.launch(cfg).await?)
    }

    /// The VMM still running in `run_dir` from before a restart, if any.
    pub(crate) async fn adopt(&self, run_dir: &Path) -> Result<Option<VmProcess>, Error> {
        Ok(self.hv.adopt(run_dir).await?)
    }

    /// Launches a VMM that restores saved state (`cfg.incoming`) and waits for its
    /// agent; kills it when the agent does not answer. `what` names the VM in errors
    /// ("restored", "forked", "resumed").
    pub(crate) async fn launch_restored(
        &self,
        id: &SandboxId,
        cfg: &VmConfig,
        timeout: Duration,
        what: &str,
    ) -> Result<(VmProcess, AgentClient), Error> {
        let process = self.launch(cfg).await?;
        crate::fault::point("restore-after-launch").await;
        let agent = match AgentClient::connect_unix(&process.paths().agent).await {
            Ok(a) => a.with_timeout(self.agent_timeout),
            Err(e) => {
                let _ = process.kill().await;
                return Err(Error::unavailable(format!(
                    "cannot connect to the agent of the {what} VM"
                ))
                .with_source(e));
            }
        };
        if let Err(e) = agent.wait_ready(timeout).await {
            let _ = process.kill().await;
            // Restores from templates and prebuilds fall back to a cold boot, which
            // names what to rebuild; a fork or resume has only this saved state.
            if what != "restored"
                && let Some(mismatch) = protocol_mismatch(&e, id.as_str(), AgentSource::SavedState)
            {
                return Err(mismatch);
            }
            return Err(
                Error::unavailable(format!("the {what} agent did not answer")).with_source(e),
            );
        }
        Ok((process, agent))
    }

    /// Keeps a sandbox's VM in the registry; returns the entry.
    pub(crate) fn insert(
        &self,
        id: &SandboxId,
        process: VmProcess,
        agent: AgentClient,
        restored: bool,
    ) -> Arc<RunningVm> {
        let vm = Arc::new(RunningVm {
            process,
            agent: StdMutex::new(agent),
            responsive: AtomicBool::new(true),
            restored,
            earlier_restarts: AtomicU64::new(0),
            detail: StdMutex::new(None),
        });
        lock(&self.running).insert(id.clone(), Arc::clone(&vm));
        vm
    }

    /// The running VM of a sandbox.
    pub(crate) fn get(&self, id: &SandboxId) -> Option<Arc<RunningVm>> {
        lock(&self.running).get(id).cloned()
    }

    /// Forgets a sandbox's VM and kills its VMM if it still runs.
    pub(crate) async fn remove(&self, id: &SandboxId) {
        let vm = lock(&self.running).remove(id);
        if let Some(vm) = vm
            && let Err(e) = vm.process.kill().await
        {
            tracing::warn!(sandbox = %id, error = %e, "kill vmm");
        }
    }

    /// Ids of the sandboxes with a running VM.
    pub(crate) fn ids(&self) -> Vec<SandboxId> {
        lock(&self.running).keys().cloned().collect()
    }

    /// Whether a running sandbox was restored from a memory snapshot.
    pub(crate) fn restored(&self, id: &SandboxId) -> Option<bool> {
        self.get(id).map(|vm| vm.restored)
    }

    /// The agent's health for a running sandbox, with its restart count.
    pub(crate) fn agent_health(&self, id: &SandboxId) -> Option<(AgentHealth, u64)> {
        self.agent_status(id).map(|(h, n, _)| (h, n))
    }

    /// [`agent_health`](Self::agent_health) and, when the agent is not ready, why
    /// (when known: its connection closed, reconnecting, gave up).
    pub(crate) fn agent_status(
        &self,
        id: &SandboxId,
    ) -> Option<(AgentHealth, u64, Option<String>)> {
        self.get(id).map(|vm| {
            let agent = vm.agent();
            let h = if vm.responsive.load(Ordering::Relaxed) && agent.is_connected() {
                AgentHealth::Ready
            } else {
                AgentHealth::Unresponsive
            };
            let restarts = vm.earlier_restarts.load(Ordering::Relaxed) + agent.restarts();
            let detail = if h == AgentHealth::Ready {
                None
            } else {
                vm.detail()
            };
            (h, restarts, detail)
        })
    }

    /// Pings every running agent and records whether it answered.
    pub(crate) async fn check_agents(&self) {
        let vms: Vec<_> = lock(&self.running)
            .iter()
            .map(|(k, v)| (k.clone(), Arc::clone(v)))
            .collect();
        // All at once, each with a deadline: a hung guest delays no one else's check.
        let timeout = self.agent_timeout.min(Duration::from_secs(5));
        let agents: Vec<AgentClient> = vms.iter().map(|(_, vm)| vm.agent()).collect();
        let pings = futures::future::join_all(agents.iter().map(|a| a.ping(timeout)));
        for (((id, vm), agent), ping) in vms.iter().zip(&agents).zip(pings.await) {
            // A connection replaced meanwhile (reconnected) says nothing of the new one.
            if !vm.agent().same_connection(agent) {
                continue;
            }
            let ok = ping.is_ok();
            if vm.responsive.swap(ok, Ordering::Relaxed) != ok {
                if ok {
                    tracing::info!(sandbox = %id, "agent answers again");
                } else {
                    tracing::warn!(sandbox = %id, "agent is unresponsive");
                }
            }
        }
    }
}

/// Connects to the agent of a VM that is booting and waits until it answers
/// (booting takes longer under TCG).
pub(crate) async fn boot_agent(
    vm: &VmProcess,
    accel: Accel,
    what: &str,
    agent_timeout: Duration,
) -> Result<AgentClient, Error> {
    let agent = AgentClient::connect_unix(&vm.paths().agent)
        .await
        .map_err(|e| {
            Error::unavailable(format!("cannot connect to the agent of the {what} VM"))
                .with_source(e)
        })?
        .with_timeout(agent_timeout);
    agent.wait_ready(boot_timeout(accel)).await.map_err(|e| {
        Error::unavailable(format!("the {what} agent did not answer")).with_source(e)
    })?;
    Ok(agent)
}

/// How long a cold boot may take until the agent answers.
pub(crate) fn boot_timeout(accel: Accel) -> Duration {
    match accel {
        Accel::Kvm => Duration::from_secs(60),
        Accel::Tcg => Duration::from_secs(240),
    }
}

/// Kills every process whose command line holds `run_dir` and waits for them.
pub(crate) async fn kill_vmms(run_dir: &str) {
    let marker = format!("{run_dir}/");
    for _ in 0..100 {
        let pids = atelier_vmm::process::find_pids(&marker);
        if pids.is_empty() {
            return;
        }
        for pid in pids {
            atelier_vmm::process::kill_pid(pid);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tracing::error!(run_dir, "vmm processes survive SIGKILL");
}
