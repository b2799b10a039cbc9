//! Sandboxes' VMs over time: registering a VM and noticing it die, stopping and
//! deleting. (Pause, resume and fork are in `snapshot.rs`; a delete that must not
//! wait behind a hung operation in `halt.rs`.)

use std::sync::Arc;

use atelier_agent_proto::AgentClient;
use atelier_core::{SandboxId, SandboxState};
use atelier_store::SandboxRecord;
use atelier_vmm::VmProcess;

use crate::Error;
use crate::journal::ResourceKind;
use crate::manager::Manager;

impl Manager {
    /// Keeps a VM in the running map and watches for its VMM dying.
    pub(crate) fn register_vm(
        self: &Arc<Self>,
        id: &SandboxId,
        process: VmProcess,
        agent: AgentClient,
        restored: bool,
    ) {
        let mut exited = process.exit_watch();
        let vm = self.vms.insert(id, process, agent, restored);
        self.supervise_agent(id, Arc::clone(&vm));
        let me = Arc::clone(self);
        let id = id.clone();
        tokio::spawn(async move {
            let _ = exited.wait_for(|e| *e).await;
            let _guard = me.lock(&id).await;
            // Only a VM that is still the registered one and whose sandbox is running
            // died unexpectedly; stop/delete handle their own exits.
            let current = me.vms.get(&id).is_some_and(|v| Arc::ptr_eq(&v, &vm));
            let Ok(rec) = me.store.get_sandbox(&id).await else {
                return;
            };
            if !current || rec.state != SandboxState::Running {
                return;
            }
            let log = std::fs::read_to_string(&vm.process.paths().vmm_log).unwrap_or_default();
            let why = format!("the VM process exited unexpectedly {}", log.trim());
            tracing::warn!(sandbox = %id, "{why}");
            me.drop_vm(&id).await;
            // The VMM and its sockets go; the disk is the user's work and stays, so
            // `start` boots the sandbox again where it left off.
            if let Err(e) = me.journal.reclaim(&id, &[ResourceKind::Process]).await {
                tracing::error!(sandbox = %id, error = %e, "reclaim after vm exit");
            }
            let _ = me
                .store
                .transition(&id, SandboxState::Failed, "vm exited", Some(why.trim()))
                .await;
        });
    }

    /// Takes a sandbox offline and out of the registry, killing its VMM if still
    /// alive.
    pub(crate) async fn drop_vm(&self, id: &SandboxId) {
        if let Some(net) = &self.net {
            net.went_offline(id);
        }
        self.vms.remove(id).await;
    }

    /// Stops a running sandbox: asks the agent to power off, then QEMU to quit, then
    /// kills it. The disk is kept.
    #[tracing::instrument(level = "info", name = "stop", skip_all, fields(sandbox = %id_or_name))]
    pub async fn stop(self: &Arc<Self>, id_or_name: &str) -> Result<SandboxRecord, Error> {
        let (_guard, rec) = self.locked(id_or_name).await?;
        if rec.state == SandboxState::Stopped {
            return Ok(rec);
        }
        if rec.state != SandboxState::Running {
            return Err(Error::conflict(format!(
                "sandbox {} is {}; only a running sandbox can be stopped",
                rec.name, rec.state
            )));
        }
        self.store
            .begin(&rec.id, atelier_core::SandboxOp::Stop, "stop")
            .await?;
        // A hung guest or QEMU is stopped by force; the record says how.
        let forced = match self.vms.get(&rec.id) {
            Some(vm) => self.halt_vm(&rec, &vm).await,
            None => None,
        };
        self.drop_vm(&rec.id).await;
        self.journal
            .reclaim(&rec.id, &[ResourceKind::Process])
            .await?;
        Ok(self
            .store
            .transition(&rec.id, SandboxState::Stopped, "stop", forced.as_deref())
            .await?)
    }

    /// Deletes a sandbox in any state, reclaiming everything it holds on the host.
    /// Delete does not wait behind an operation stuck on a hung guest or QEMU: it
    /// kills the VM so that operation ends (see [`Manager::locked_for_delete`]).
    #[tracing::instrument(level = "info", name = "delete", skip_all, fields(sandbox = %id_or_name))]
    pub async fn delete(self: &Arc<Self>, id_or_name: &str) -> Result<SandboxRecord, Error> {
        let (_guard, rec) = self.locked_for_delete(id_or_name).await?;
        if rec.state == SandboxState::Deleted {
            return Err(Error::not_found(format!("sandbox {id_or_name} not found")));
        }
        if rec.state != SandboxState::Deleting {
            self.store
                .begin(&rec.id, atelier_core::SandboxOp::Delete, "delete")
                .await?;
        }
        self.drop_vm(&rec.id).await;
        self.journal
            .reclaim(&rec.id, &[ResourceKind::Process])
            .await?;
        crate::fault::point("delete-after-kill").await;
        self.journal
            .reclaim(&rec.id, &[ResourceKind::Disk, ResourceKind::Dir])
            .await?;
        self.store.delete_dev_commands(&rec.id).await?;
        tracing::info!(sandbox = %rec.id, "sandbox deleted");
        Ok(self
            .store
            .transition(&rec.id, SandboxState::Deleted, "delete", None)
            .await?)
    }

    /// The agent of a running sandbox, or a conflict error saying why there is none.
    pub async fn agent(&self, id_or_name: &str) -> Result<(SandboxRecord, AgentClient), Error> {
        let rec = self.get(id_or_name).await?;
        match (rec.state, self.vms.get(&rec.id)) {
            (SandboxState::Running, Some(vm)) => Ok((rec, vm.agent())),
            (SandboxState::Running, None) => Err(Error::unavailable(format!(
                "sandbox {} is running but its agent is not connected yet; retry shortly",
                rec.name
            ))),
            (state, _) => Err(Error::conflict(format!(
                "sandbox {} is {state}; start it first with `atelier sandbox start {}`",
                rec.name, rec.name
            ))),
        }
    }
}
