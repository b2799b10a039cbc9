//! Saved VM state: pause (memory and devices to the sandbox's directory, the VMM
//! gone), resume (restore exactly where it was) and fork (a copy of a running
//! sandbox's memory, devices and disk at one instant, continuing as a new one).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use atelier_core::{SandboxId, SandboxState};
use atelier_store::{SandboxRecord, now_ms};
use atelier_vmm::MemoryBacking;

use super::create::GuestSetup;
use crate::Error;
use crate::journal::ResourceKind;
use crate::manager::Manager;
use crate::vms::RunningVm;

/// Records how a sandbox's RAM is backed (`vm-memory` in its directory): a paused
/// sandbox must be resumed with the same memory device it was saved with.
pub(crate) fn write_memory_backing(dir: &Path, m: &MemoryBacking) -> Result<(), Error> {
    let text = match m {
        MemoryBacking::PrivateFile(p) => p.display().to_string(),
        _ => String::new(),
    };
    std::fs::write(dir.join("vm-memory"), text)
        .map_err(|e| Error::internal(format!("cannot write {}: {e}", dir.display())))
}

pub(crate) fn read_memory_backing(dir: &Path) -> MemoryBacking {
    match std::fs::read_to_string(dir.join("vm-memory")) {
        Ok(t) if !t.trim().is_empty() => MemoryBacking::PrivateFile(PathBuf::from(t.trim())),
        _ => MemoryBacking::Anonymous,
    }
}

impl Manager {
    /// Journals a sandbox's VMM, then launches it restoring saved state
    /// (`cfg.incoming`) and waits for its agent.
    pub(crate) async fn launch_restored(
        &self,
        id: &SandboxId,
        cfg: &atelier_vmm::VmConfig,
        timeout: Duration,
        what: &str,
    ) -> Result<(atelier_vmm::VmProcess, atelier_agent_proto::AgentClient), Error> {
        self.journal
            .record(id, ResourceKind::Process, cfg.run_dir.display().to_string())
            .await?;
        self.vms.launch_restored(id, cfg, timeout, what).await
    }

    /// The VM of a sandbox that must be running for an operation (`done` names it:
    /// "paused", "forked"); a conflict or unavailable error otherwise.
    fn running_vm(&self, rec: &SandboxRecord, done: &str) -> Result<Arc<RunningVm>, Error> {
        if rec.state != SandboxState::Running {
            return Err(Error::conflict(format!(
                "sandbox {} is {}; only a running sandbox can be {done}",
                rec.name, rec.state
            )));
        }
        self.vms.get(&rec.id).ok_or_else(|| {
            Error::unavailable(format!(
                "sandbox {} has no connected VM yet; retry shortly",
                rec.name
            ))
        })
    }

    /// Pauses a running sandbox: saves its memory and device state to its directory
    /// and stops the VMM, freeing the host memory. The disk is kept.
    #[tracing::instrument(level = "info", name = "pause", skip_all, fields(sandbox = %id_or_name))]
    pub async fn pause(self: &Arc<Self>, id_or_name: &str) -> Result<SandboxRecord, Error> {
        let (_guard, rec) = self.locked(id_or_name).await?;
        if rec.state == SandboxState::Paused {
            return Ok(rec);
        }
        let vm = self.running_vm(&rec, "paused")?;
        crate::shares::refuse_migration(&rec, "paused")?;
        self.store
            .begin(&rec.id, atelier_core::SandboxOp::Pause, "pause")
            .await?;
        let dir = self.sandbox_dir(&rec.id);
        let state = dir.join("paused.state");
        let saved = atelier_vmm::save_full_state(&vm.process, &state).await;
        if let Err(e) = saved {
            let _ = std::fs::remove_file(&state);
            let _ = vm.process.qmp().execute("cont", None).await;
            let _ = self.store.end_operation(&rec.id).await;
            return Err(e.into());
        }
        let _ = vm
            .process
            .qmp()
            .execute_timeout("quit", None, Duration::from_secs(5))
            .await;
        vm.process.wait_exit(Duration::from_secs(10)).await;
        self.drop_vm(&rec.id).await;
        self.journal
            .reclaim(&rec.id, &[ResourceKind::Process])
            .await?;
        tracing::info!(sandbox = %rec.id, "sandbox paused");
        Ok(self
            .store
            .transition(&rec.id, SandboxState::Paused, "pause", None)
            .await?)
    }

    /// Resumes a paused sandbox exactly where it was (processes, memory, clock set
    /// to now).
    #[tracing::instrument(level = "info", name = "resume", skip_all, fields(sandbox = %id_or_name))]
    pub async fn resume(self: &Arc<Self>, id_or_name: &str) -> Result<SandboxRecord, Error> {
        let (_guard, rec) = self.locked(id_or_name).await?;
        if rec.state != SandboxState::Paused {
            return Err(Error::conflict(format!(
                "sandbox {} is {}; only a paused sandbox can be resumed",
                rec.name, rec.state
            )));
        }
        let image = self.image(&rec.image)?;
        self.store
            .begin(&rec.id, atelier_core::SandboxOp::Resume, "resume")
            .await?;
        let started = Instant::now();
        match self.resume_inner(&rec, &image).await {
            Ok(()) => {
                self.store
                    .set_boot_ms(&rec.id, started.elapsed().as_millis() as i64)
                    .await?;
                tracing::info!(sandbox = %rec.id, "sandbox resumed");
                Ok(self
                    .store
                    .transition(&rec.id, SandboxState::Running, "resumed", None)
                    .await?)
            }
            Err(e) => {
                self.drop_vm(&rec.id).await;
                let _ = self
                    .journal
                    .reclaim(&rec.id, &[ResourceKind::Process])
                    .await;
                let _ = self
                    .store
                    .transition(
                        &rec.id,
                        SandboxState::Paused,
                        "resume failed",
                        Some(&e.message),
                    )
                    .await;
                Err(e)
            }
        }
    }

    /// Forks a running sandbox: its memory, device state and disk are copied at one
    /// instant (the source pauses for the copy, then runs on) into a new sandbox
    /// `name` that continues from there with its own identity.
    #[tracing::instrument(level = "info", name = "fork", skip_all, fields(sandbox = %id_or_name))]
    pub async fn fork(
        self: &Arc<Self>,
        id_or_name: &str,
        name: &str,
    ) -> Result<SandboxRecord, Error> {
        atelier_core::validate_name(name)?;
        let (_src_guard, src) = self.locked(id_or_name).await?;
        let vm = self.running_vm(&src, "forked")?;
        crate::shares::refuse_migration(&src, "forked")?;
        let image = self.image(&src.image)?;
        let now = now_ms();
        let rec = SandboxRecord {
            id: SandboxId::generate(),
            name: name.to_owned(),
            state: SandboxState::Creating,
            error: None,
            boot_ms: None,
            created_at: now,
            updated_at: now,
            // The new sandbox owns the disk it gets, as a first create does.
            operation: Some(atelier_core::SandboxOp::Create),
            ..src.clone()
        };
        let _guard = self.lock(&rec.id).await;
        self.store.insert_sandbox(&rec).await?;
        self.store
            .begin(&src.id, atelier_core::SandboxOp::Fork, "fork")
            .await?;
        let started = Instant::now();
        let forked = self.fork_inner(&src, &vm, &rec, &image).await;
        self.store.end_operation(&src.id).await?;
        match forked {
            Ok(()) => {
                self.store
                    .set_boot_ms(&rec.id, started.elapsed().as_millis() as i64)
                    .await?;
                // The copy runs the same OpenCode server (memory and all): it is
                // reached the same way, with the same password.
                if let Some(oc) = self.store.sandbox_opencode(&src.id).await? {
                    self.store.set_sandbox_opencode(&rec.id, &oc).await?;
                }
                tracing::info!(sandbox = %rec.id, from = %src.id, "sandbox forked");
                Ok(self
                    .store
                    .transition(&rec.id, SandboxState::Running, "forked", None)
                    .await?)
            }
            Err(e) => {
                self.drop_vm(&rec.id).await;
                let _ = self
                    .journal
                    .reclaim(&rec.id, &[ResourceKind::Process, ResourceKind::Disk])
                    .await;
                let _ = self
                    .store
                    .transition(
                        &rec.id,
                        SandboxState::Failed,
                        "fork failed",
                        Some(&e.message),
                    )
                    .await;
                Err(e)
            }
        }
    }

    async fn fork_inner(
        self: &Arc<Self>,
        src: &SandboxRecord,
        src_vm: &RunningVm,
        rec: &SandboxRecord,
        image: &atelier_image::Image,
    ) -> Result<(), Error> {
        let id = &rec.id;
        let dir = self.make_sandbox_dir(id).await?;
        let disk = self.pool.disk_path(id.as_str());
        self.journal
            .record(id, ResourceKind::Disk, &disk.display().to_string())
            .await?;
        let state = dir.join("fork.state");
        // Memory, device state and disk at one instant: the source stays stopped
        // from the state save until its disk is cloned, then runs on.
        let copied = async {
            atelier_vmm::save_full_state(&src_vm.process, &state).await?;
            let pool = self.pool.clone();
            let (from, to) = (self.pool.disk_path(src.id.as_str()), disk.clone());
            tokio::task::spawn_blocking(move || pool.clone_disk(&from, &to))
                .await
                .map_err(|e| Error::internal(e.to_string()))??;
            Ok::<(), Error>(())
        }
        .await;
        crate::fault::point("fork-after-copy").await;
        let resumed = src_vm.process.qmp().execute("cont", None).await;
        copied?;
        resumed?;
        let memory = read_memory_backing(&self.sandbox_dir(&src.id));
        let accel = self.accel(image).await.accel;
        let mut cfg = self.sandbox_vm_config(rec, image, accel).await?;
        cfg.memory = memory.clone();
        cfg.incoming = Some(atelier_vmm::Incoming {
            path: state.clone(),
            ignore_shared: false,
        });
        let (process, agent) = self
            .launch_restored(id, &cfg, Duration::from_secs(30), "forked")
            .await?;
        self.go_online(rec, &agent, GuestSetup::Cloned).await?;
        let _ = std::fs::remove_file(&state);
        write_memory_backing(&dir, &memory)?;
        self.register_vm(id, process, agent, true);
        Ok(())
    }

    async fn resume_inner(
        self: &Arc<Self>,
        rec: &SandboxRecord,
        image: &atelier_image::Image,
    ) -> Result<(), Error> {
        let id = &rec.id;
        let dir = self.sandbox_dir(id);
        let state = dir.join("paused.state");
        if !state.exists() {
            return Err(Error::internal(format!(
                "the saved state {} is missing",
                state.display()
            )));
        }
        let accel = self.accel(image).await.accel;
        let mut cfg = self.sandbox_vm_config(rec, image, accel).await?;
        cfg.memory = read_memory_backing(&dir);
        cfg.incoming = Some(atelier_vmm::Incoming {
            path: state.clone(),
            ignore_shared: false,
        });
        let (process, agent) = self
            .launch_restored(id, &cfg, Duration::from_secs(30), "resumed")
            .await?;
        crate::fault::point("resume-after-launch").await;
        self.go_online(rec, &agent, GuestSetup::Resumed).await?;
        let _ = std::fs::remove_file(&state);
        let restored = matches!(cfg.memory, MemoryBacking::PrivateFile(_));
        self.register_vm(id, process, agent, restored);
        Ok(())
    }
}
