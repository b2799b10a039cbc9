//! Reconciling the resource journal with the host. At start-up every sandbox caught
//! in the middle of an operation is driven to a resting state (an interrupted
//! create fails and is reclaimed, an interrupted delete completes, running VMs are
//! adopted); periodically, anything on the host that no live sandbox owns is
//! reclaimed: journal rows of deleted sandboxes, stray sandbox directories, disks
//! and VMM processes.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use atelier_agent_proto::AgentClient;
use atelier_core::{SandboxOp, SandboxState};

use crate::Error;
use crate::journal::{Owner, ResourceKind};
use crate::manager::Manager;
use crate::vms::kill_vmms;

/// What [`Manager::orphan_check`] found.
enum Orphan {
    /// Someone owns it (or may be about to): leave it.
    No,
    /// Nobody owns it; the sandbox's lock (when it is named after one) is held.
    Yes(Option<tokio::sync::OwnedMutexGuard<()>>),
}

impl Manager {
    /// Start-up reconcile; runs before the API serves.
    pub(crate) async fn reconcile_at_start(self: &Arc<Self>) -> Result<(), Error> {
        // Template and prebuild builds a crash interrupted: no build runs yet, so
        // everything their journal rows name goes (a prebuild keeps its log).
        for r in self.journal.list(None).await? {
            match &r.owner {
                Some(Owner::Template(key)) => {
                    tracing::warn!(template = %key, kind = %r.kind_name, "reclaiming what an interrupted template build held");
                    self.journal.reclaim_one(&r).await?;
                }
                Some(Owner::Prebuild(id)) => {
                    if r.kind == Some(ResourceKind::Dir) {
                        self.keep_prebuild_log(id, std::path::Path::new(&r.locator));
                    }
                    tracing::warn!(prebuild = %id, kind = %r.kind_name, "reclaiming what an interrupted prebuild held");
                    self.journal.reclaim_one(&r).await?;
                }
                _ => {}
            }
        }
        // A template build directory nobody journaled (left by an older manager).
        for e in std::fs::read_dir(self.templates_dir())
            .into_iter()
            .flatten()
            .flatten()
        {
            let path = e.path().display().to_string();
            if e.file_name().to_string_lossy().starts_with(".build-")
                && !self.journal.has_locator(&path).await?
            {
                tracing::warn!(path = %path, "removing an unjournaled template build");
                kill_vmms(&path).await;
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
        self.reconcile_prebuilds().await?;
        for rec in self.store.list_sandboxes(false).await? {
            let id = rec.id.clone();
            let _guard = self.lock(&id).await;
            match rec.state {
                SandboxState::Creating => {
                    // The recorded operation decides what may be reclaimed: a first
                    // create (or a fork's new sandbox) owns its disk; a start or a
                    // resume must keep the user's disk (and a resume its saved
                    // memory). An unknown operation keeps the disk: the user's data
                    // is never reclaimed on a guess.
                    tracing::warn!(sandbox = %id, operation = ?rec.operation, "operation was interrupted; reclaiming its VMM");
                    let (reclaim, to, why): (&[ResourceKind], _, _) = match rec.operation {
                        Some(SandboxOp::Create) => (
                            &[ResourceKind::Process, ResourceKind::Disk],
                            SandboxState::Failed,
                            "the manager stopped during create",
                        ),
                        Some(SandboxOp::Resume) => (
                            &[ResourceKind::Process],
                            SandboxState::Paused,
                            "the manager stopped during resume",
                        ),
                        Some(SandboxOp::Start) => (
                            &[ResourceKind::Process],
                            SandboxState::Failed,
                            "the manager stopped during start",
                        ),
                        other => {
                            tracing::error!(sandbox = %id, operation = ?other, "creating without a known operation; keeping its disk");
                            (
                                &[ResourceKind::Process],
                                SandboxState::Failed,
                                "the manager stopped during an operation; the disk was kept",
                            )
                        }
                    };
                    self.journal.reclaim(&id, reclaim).await?;
                    self.store
                        .transition(&id, to, "reconcile", Some(why))
                        .await?;
                }
                SandboxState::Deleting => {
                    tracing::warn!(sandbox = %id, "delete was interrupted; finishing it");
                    self.journal
                        .reclaim(
                            &id,
                            &[ResourceKind::Process, ResourceKind::Disk, ResourceKind::Dir],
                        )
                        .await?;
                    self.store.delete_dev_commands(&id).await?;
                    self.store
                        .transition(&id, SandboxState::Deleted, "reconcile", None)
                        .await?;
                }
                SandboxState::Stopping => {
                    self.journal.reclaim(&id, &[ResourceKind::Process]).await?;
                    self.store
                        .transition(&id, SandboxState::Stopped, "reconcile", None)
                        .await?;
                }
                SandboxState::Running => {
                    if !self.adopt(&id, rec.operation).await {
                        tracing::warn!(sandbox = %id, "running sandbox has no live VM; marking failed");
                        // E.g. after a host reboot: the disk is kept for `start`.
                        self.journal.reclaim(&id, &[ResourceKind::Process]).await?;
                        self.store
                            .transition(
                                &id,
                                SandboxState::Failed,
                                "reconcile",
                                Some("the VM was gone after a manager restart"),
                            )
                            .await?;
                    }
                }
                SandboxState::Stopped | SandboxState::Failed | SandboxState::Paused => {
                    self.journal.reclaim(&id, &[ResourceKind::Process]).await?;
                }
                SandboxState::Deleted => {}
            }
        }
        self.reconcile_orphans().await
    }

    /// Reconnects to the VM of a sandbox that was running before a restart.
    async fn adopt(
        self: &Arc<Self>,
        id: &atelier_core::SandboxId,
        operation: Option<SandboxOp>,
    ) -> bool {
        let dir = self.sandbox_dir(id);
        let process = match self.vms.adopt(&dir).await {
            Ok(Some(p)) => p,
            Ok(None) => return false,
            Err(e) => {
                tracing::warn!(sandbox = %id, error = %e, "cannot adopt vm");
                return false;
            }
        };
        if let Some(op @ (SandboxOp::Fork | SandboxOp::Pause)) = operation {
            // A fork's copy or a pause's save stops the VM until it ends; the crash
            // left it stopped. Let it run on and drop the half-written state.
            tracing::warn!(sandbox = %id, operation = %op, "a state save was interrupted; resuming the vm");
            if let Err(e) = process
                .qmp()
                .execute_timeout("cont", None, Duration::from_secs(10))
                .await
            {
                tracing::warn!(sandbox = %id, error = %e, "cannot resume the vm after an interrupted save");
            }
            let _ = std::fs::remove_file(dir.join("paused.state"));
            if let Err(e) = self.store.end_operation(id).await {
                tracing::warn!(sandbox = %id, error = %e, "cannot clear the interrupted operation");
            }
        }
        let agent = match AgentClient::connect_unix(&process.paths().agent).await {
            Ok(a) => a.with_timeout(self.cfg.agent_timeout),
            Err(e) => {
                tracing::warn!(sandbox = %id, error = %e, "cannot reconnect to agent");
                return false;
            }
        };
        // The agent greets on every (re)connection; accept a slow answer.
        if let Err(e) = agent.ping(Duration::from_secs(20)).await {
            tracing::warn!(sandbox = %id, error = %e, "adopted vm's agent does not answer");
            return false;
        }
        tracing::info!(sandbox = %id, pid = process.pid(), "adopted running vm");
        // Firewall sets and bridge ports may have been rebuilt since; restore them.
        if let Ok(rec) = self.store.get_sandbox(id).await
            && let Err(e) = self
                .go_online(&rec, &agent, crate::sandboxes::GuestSetup::Keep)
                .await
        {
            tracing::warn!(sandbox = %id, error = %e, "cannot reconnect adopted vm to the network");
        }
        self.register_vm(id, process, agent, false);
        true
    }

    /// Reclaims what no live sandbox owns. Skips sandboxes whose lock is held (an
    /// operation is in flight and owns its resources).
    pub(crate) async fn reconcile_orphans(self: &Arc<Self>) -> Result<(), Error> {
        let all = self.store.list_sandboxes(true).await?;
        let live: HashSet<String> = all
            .iter()
            .filter(|r| r.state != SandboxState::Deleted)
            .map(|r| r.id.to_string())
            .collect();
        let with_vm: HashSet<String> = all
            .iter()
            .filter(|r| r.state.has_vm())
            .map(|r| r.id.to_string())
            .collect();

        // Journal rows whose sandbox is deleted or unknown. (Rows of template and
        // prebuild builds belong to a build in flight; start-up reclaims the
        // interrupted ones.)
        let rows = self.journal.list(None).await?;
        for r in &rows {
            let Some(Owner::Sandbox(sid)) = &r.owner else {
                continue;
            };
            if !live.contains(sid.as_str())
                && let Some(_g) = self.try_lock(sid)
                // Read again under the lock: `live` is older than a create that
                // finished meanwhile.
                && matches!(
                    self.store.get_sandbox(sid).await,
                    Ok(atelier_store::SandboxRecord { state: SandboxState::Deleted, .. })
                        | Err(atelier_store::StoreError::SandboxNotFound(_))
                )
            {
                tracing::warn!(sandbox = %sid, kind = %r.kind_name, "reclaiming orphaned resource");
                self.journal.reclaim_one(r).await?;
            }
        }
        let rows = self.journal.list(None).await?;
        let journaled: HashSet<String> = rows.iter().map(|r| r.locator.clone()).collect();

        // VMM processes of sandboxes that should have none.
        let sandboxes_dir = self.cfg.sandboxes_dir();
        let marker = format!("{}/", sandboxes_dir.display());
        for pid in atelier_vmm::process::find_pids(&marker) {
            let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
                continue;
            };
            let text = String::from_utf8_lossy(&cmdline);
            let Some(id) = text.split(&marker).nth(1).and_then(|t| t.split('/').next()) else {
                continue;
            };
            if with_vm.contains(id) {
                continue;
            }
            // Read again under its lock: `with_vm` is older than this process may be.
            let _guard = match atelier_core::SandboxId::parse(id) {
                Some(sid) => match self.try_lock(&sid) {
                    None => continue,
                    Some(g) => match self.store.get_sandbox(&sid).await {
                        Ok(r) if r.state.has_vm() => continue,
                        _ => Some(g),
                    },
                },
                None => None,
            };
            tracing::warn!(pid, sandbox = id, "killing orphaned vmm process");
            kill_vmms(&format!("{}{id}", marker)).await;
        }

        // Sandbox directories and disks nobody journals.
        let dirs = std::fs::read_dir(&sandboxes_dir)
            .into_iter()
            .flatten()
            .flatten();
        for entry in dirs {
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().into_owned();
            let locator = path.display().to_string();
            if !live.contains(&name) && !journaled.contains(&locator) {
                // Checked again under the sandbox's lock: the lists above are older
                // than this directory may be (a create journals and makes it under
                // that lock meanwhile).
                let Orphan::Yes(_guard) = self.orphan_check(&name, &locator).await? else {
                    continue;
                };
                tracing::warn!(path = %path.display(), "removing orphaned sandbox directory");
                let _ = std::fs::remove_dir_all(&path);
            }
        }
        self.reconcile_network(&with_vm).await?;
        for disk in self.pool.list_disks()? {
            let stem = disk
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default();
            let locator = disk.display().to_string();
            if !live.contains(&stem) && !journaled.contains(&locator) {
                let Orphan::Yes(_guard) = self.orphan_check(&stem, &locator).await? else {
                    continue;
                };
                tracing::warn!(path = %disk.display(), "removing orphaned disk");
                self.pool.remove_disk(&disk)?;
            }
        }
        Ok(())
    }

    /// Whether what is at `locator` (named after sandbox `id`) is an orphan, read
    /// again now under the sandbox's lock: no operation holds the lock, and neither
    /// a live sandbox `id` nor a journal row at `locator` exists. It stays an orphan
    /// while the returned guard is held.
    async fn orphan_check(&self, id: &str, locator: &str) -> Result<Orphan, Error> {
        let guard = match atelier_core::SandboxId::parse(id) {
            Some(sid) => match self.try_lock(&sid) {
                Some(g) => Some(g),
                None => return Ok(Orphan::No),
            },
            // Not named like a sandbox: nothing of ours can be creating it.
            None => None,
        };
        if self.journal.has_locator(locator).await? || self.store.find_sandbox(id).await.is_ok() {
            return Ok(Orphan::No);
        }
        Ok(Orphan::Yes(guard))
    }

    /// TAPs on our bridge whose sandbox has no VM, and firewall elements of
    /// addresses nobody leases (e.g. after the database was restored from backup).
    async fn reconcile_network(&self, with_vm: &HashSet<String>) -> Result<(), Error> {
        let Some(net) = &self.net else {
            return Ok(());
        };
        // A TAP or an address journaled by a build (a prebuild's builder) belongs
        // to that build while it runs. Listed after what is on the host: a build
        // records its TAP before making it.
        let ports = net.links.ports().await?;
        let addresses = net.fw.known_addresses().await?;
        let rows = self.journal.list(None).await?;
        let by_builds: HashSet<&str> = rows
            .iter()
            .filter(|r| !matches!(r.owner, Some(Owner::Sandbox(_))))
            .map(|r| r.locator.as_str())
            .collect();
        for port in ports {
            if by_builds.contains(port.as_str()) {
                continue;
            }
            // TAP `atl<10 chars>` belongs to sandbox `sb-<10 chars>`.
            let id = format!("sb-{}", port.get(3..).unwrap_or(""));
            if with_vm.contains(&id) {
                continue;
            }
            if let Some(sid) = atelier_core::SandboxId::parse(&id)
                && self.try_lock(&sid).is_none()
            {
                continue; // an operation in flight owns it
            }
            tracing::warn!(tap = %port, "removing orphaned TAP");
            net.links.delete(&port).await?;
        }
        let leased: HashSet<std::net::Ipv4Addr> = self
            .store
            .leases()
            .await?
            .into_iter()
            .map(|(ip, _)| ip)
            .collect();
        for ip in addresses {
            if !leased.contains(&ip) && !by_builds.contains(ip.to_string().as_str()) {
                tracing::warn!(%ip, "forgetting firewall state of an unleased address");
                net.forget(ip).await?;
            }
        }
        Ok(())
    }
}
