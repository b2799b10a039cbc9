//! Creating and starting sandboxes: the record first, then the disk (a clone of
//! the image, a template or a prebuild), then the VM (restored from a memory
//! snapshot when one fits, else booted), then the network. Each step journals
//! what it makes before making it.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use atelier_agent_proto::{AgentClient, Hello};
use atelier_core::{SandboxId, SandboxSpec, SandboxState};
use atelier_store::{SandboxRecord, now_ms};
use atelier_vmm::{Accel, MemoryBacking, Nic, VmConfig};

use super::snapshot::write_memory_backing;
use crate::Error;
use crate::guest_stream::{AgentSource, protocol_mismatch};
use crate::journal::ResourceKind;
use crate::manager::Manager;
use crate::vms::kill_vmms;

/// What the guest must be told when its sandbox goes online.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum GuestSetup {
    /// Nothing: an adopted VM is configured already.
    Keep,
    /// A VM that booted: its network.
    Booted,
    /// A VM restored from someone else's memory (template, prebuild, fork): clock
    /// and CRNG, a new identity, its network.
    Cloned,
    /// A VM resumed from its own saved memory: clock and CRNG, its network.
    Resumed,
}

/// The guest's side of going online: one `Restored` request after a restore (or,
/// for an agent older than that capability, the same steps one request each).
async fn set_up_guest(
    rec: &SandboxRecord,
    agent: &AgentClient,
    setup: GuestSetup,
    net: Option<atelier_agent_proto::NetConfig>,
) -> Result<(), Error> {
    let clone = match setup {
        GuestSetup::Keep => return Ok(()),
        GuestSetup::Booted => {
            if let Some(cfg) = net {
                agent.net_config(cfg).await.map_err(Manager::agent_error)?;
            }
            return Ok(());
        }
        GuestSetup::Cloned => true,
        GuestSetup::Resumed => false,
    };
    if agent.supports(atelier_agent_proto::CAP_RESTORED) {
        let unix_nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
            .unwrap_or(0);
        return agent
            .restored(atelier_agent_proto::Restored {
                unix_nanos,
                machine_id: clone.then(crate::templates::new_machine_id),
                hostname: clone.then(|| rec.name.clone()),
                net,
            })
            .await
            .map_err(Manager::agent_error);
    }
    if clone {
        crate::templates::fix_identity(agent, &rec.name, net.is_some()).await?;
    } else {
        agent
            .set_time(std::time::SystemTime::now())
            .await
            .map_err(Manager::agent_error)?;
    }
    if let Some(cfg) = net {
        agent.net_config(cfg).await.map_err(Manager::agent_error)?;
    }
    Ok(())
}

/// What a sandbox spawned from a workspace starts from.
#[derive(Debug, Clone)]
pub(crate) struct WorkspaceSpawn {
    pub(crate) template: crate::templates::Template,
    pub(crate) spec: atelier_core::workspace::WorkspaceSpec,
    /// The OpenCode server running in the prebuild's snapshot, if any.
    pub(crate) opencode: Option<atelier_store::OpenCodeServer>,
}

impl Manager {
    /// Creates a sandbox: records it, clones its disk, boots it. With `wait` the call
    /// returns when the agent answers (or the create failed and was cleaned up);
    /// without, it returns the `creating` record at once.
    #[tracing::instrument(level = "info", name = "create", skip_all, fields(sandbox = %spec.name))]
    pub async fn create(
        self: &Arc<Self>,
        mut spec: SandboxSpec,
        wait: bool,
    ) -> Result<SandboxRecord, Error> {
        // A workspace decides the shape and starts from its newest ready prebuild.
        let spawn = match spec.workspace.clone() {
            Some(w) => {
                let (_rec, ws) = self.load_workspace(&w).await?;
                // No dead end: without a ready prebuild, one is built (or the one
                // building is awaited) first.
                let pb = match self.newest_ready_prebuild(&w).await? {
                    Some(p) => p,
                    None => {
                        let log = |line: &str| tracing::info!(workspace = %w, "{line}");
                        self.workspace_access().ensure_prebuild(&w, &log).await?
                    }
                };
                spec.image = ws.image.clone();
                spec.vcpus = ws.resources.vcpus;
                spec.memory_mib = ws.resources.memory_mib;
                spec.egress = ws.egress.clone();
                if !spec.mounts.is_empty() {
                    return Err(Error::invalid(
                        "mounts cannot be combined with --workspace (the prebuild's device model has none)",
                    ));
                }
                Some(Arc::new(WorkspaceSpawn {
                    template: crate::templates::Template::at(&self.prebuilds_dir().join(&pb.id)),
                    spec: ws,
                    opencode: pb.opencode.clone(),
                }))
            }
            None => None,
        };
        crate::shares::check_spec(&self.cfg, &mut spec)?;
        spec.validate()?;
        let image = self.image(&spec.image)?;
        let now = now_ms();
        let rec = SandboxRecord {
            id: SandboxId::generate(),
            name: spec.name.clone(),
            image: spec.image.clone(),
            vcpus: spec.vcpus,
            memory_mib: spec.memory_mib,
            state: SandboxState::Creating,
            error: None,
            boot_ms: None,
            created_at: now,
            updated_at: now,
            mounts: spec.mounts.clone(),
            mount_owner: if spec.mounts.is_empty() {
                None
            } else {
                spec.mount_owner
            },
            egress: spec.egress.to_string(),
            operation: Some(atelier_core::SandboxOp::Create),
        };
        for m in &rec.mounts {
            let meta = std::fs::metadata(&m.source).map_err(|e| {
                Error::invalid(format!("mount source {} cannot be shared: {e}", m.source))
            })?;
            if !meta.is_dir() {
                return Err(Error::invalid(format!(
                    "mount source {} is not a directory",
                    m.source
                )));
            }
        }
        let guard = self.lock(&rec.id).await;
        self.store.insert_sandbox(&rec).await?;
        if let Some(w) = &spec.workspace {
            self.store.set_sandbox_workspace(&rec.id, w).await?;
        }
        tracing::info!(sandbox = %rec.id, name = %rec.name, "creating sandbox");
        let me = Arc::clone(self);
        let id = rec.id.clone();
        // The work runs in its own task so a client that goes away mid-create does
        // not leave it half done.
        let use_snapshot = !spec.cold_boot;
        let task = tokio::spawn(tracing::Instrument::in_current_span(async move {
            let _guard = guard;
            me.provision(&id, &image, true, use_snapshot, spawn).await
        }));
        if !wait {
            return Ok(rec);
        }
        task.await
            .map_err(|e| Error::internal(format!("create task: {e}")))?
    }

    /// Boots a stopped or failed sandbox again (from its kept disk, or a fresh clone
    /// when the disk was reclaimed).
    #[tracing::instrument(level = "info", name = "start", skip_all, fields(sandbox = %id_or_name))]
    pub async fn start(
        self: &Arc<Self>,
        id_or_name: &str,
        wait: bool,
    ) -> Result<SandboxRecord, Error> {
        let (guard, rec) = self.locked(id_or_name).await?;
        if !matches!(rec.state, SandboxState::Stopped | SandboxState::Failed) {
            return Err(Error::conflict(format!(
                "sandbox {} is {}; only a stopped or failed sandbox can be started",
                rec.name, rec.state
            )));
        }
        let image = self.image(&rec.image)?;
        let rec = self
            .store
            .begin(&rec.id, atelier_core::SandboxOp::Start, "start")
            .await?;
        let me = Arc::clone(self);
        let id = rec.id.clone();
        let task = tokio::spawn(tracing::Instrument::in_current_span(async move {
            let _guard = guard;
            me.provision(&id, &image, false, false, None).await
        }));
        if !wait {
            return Ok(rec);
        }
        task.await
            .map_err(|e| Error::internal(format!("start task: {e}")))?
    }

    /// Does the work of create/start under the sandbox lock; on failure reclaims the
    /// VMM and disk and marks the sandbox failed.
    async fn provision(
        self: &Arc<Self>,
        id: &SandboxId,
        image: &atelier_image::Image,
        fresh: bool,
        use_snapshot: bool,
        spawn: Option<Arc<WorkspaceSpawn>>,
    ) -> Result<SandboxRecord, Error> {
        let started = Instant::now();
        match self
            .provision_inner(id, image, fresh, use_snapshot, spawn)
            .await
        {
            Ok(()) => {
                let ms = started.elapsed().as_millis() as i64;
                self.store.set_boot_ms(id, ms).await?;
                let rec = self
                    .store
                    .transition(id, SandboxState::Running, "agent ready", None)
                    .await?;
                tracing::info!(sandbox = %id, boot_ms = ms, "sandbox running");
                Ok(rec)
            }
            Err(e) => {
                tracing::warn!(sandbox = %id, error = %e, "create failed; reclaiming");
                self.drop_vm(id).await;
                // A failed first create reclaims its disk; a failed start keeps the
                // user's disk for the next try.
                let kinds: &[ResourceKind] = if fresh {
                    &[ResourceKind::Process, ResourceKind::Disk]
                } else {
                    &[ResourceKind::Process]
                };
                if let Err(re) = self.journal.reclaim(id, kinds).await {
                    tracing::error!(sandbox = %id, error = %re, "reclaim after failed create");
                }
                // A create that failed leaves only the row (with the reason) and the
                // console log for diagnosis; `rm` removes both.
                let _ = self
                    .store
                    .transition(id, SandboxState::Failed, "create failed", Some(&e.message))
                    .await;
                Err(e)
            }
        }
    }

    async fn provision_inner(
        self: &Arc<Self>,
        id: &SandboxId,
        image: &atelier_image::Image,
        fresh: bool,
        use_snapshot: bool,
        spawn: Option<Arc<WorkspaceSpawn>>,
    ) -> Result<(), Error> {
        let rec = self.store.get_sandbox(id).await?;
        let dir = self.make_sandbox_dir(id).await?;

        let accel = self.accel(image).await.accel;
        let template = if let Some(w) = &spawn {
            Some(w.template.clone())
        } else if fresh && use_snapshot && rec.mounts.is_empty() {
            self.template(&crate::templates::key(
                image,
                rec.memory_mib,
                rec.vcpus,
                accel,
            ))
        } else {
            None
        };
        let disk = self.pool.disk_path(id.as_str());
        if fresh || !disk.exists() {
            self.journal
                .record(id, ResourceKind::Disk, &disk.display().to_string())
                .await?;
            self.clone_root_disk(image, template.as_ref().map(|t| t.disk.clone()), &disk)
                .await?;
        }

        let cfg = self.sandbox_vm_config(&rec, image, accel).await?;
        self.journal
            .record(id, ResourceKind::Process, &dir.display().to_string())
            .await?;
        if let Some(t) = &template {
            match self.restore_from_template(id, &rec, t, cfg.clone()).await {
                Ok((process, agent)) => {
                    self.go_online(&rec, &agent, GuestSetup::Cloned).await?;
                    if let Some(w) = &spawn {
                        self.finish_workspace_spawn(
                            &rec,
                            &agent,
                            &w.spec,
                            w.opencode.as_ref(),
                            true,
                        )
                        .await?;
                    }
                    write_memory_backing(&dir, &MemoryBacking::PrivateFile(t.mem.clone()))?;
                    self.register_vm(id, process, agent, true);
                    return Ok(());
                }
                Err(e) => {
                    tracing::warn!(sandbox = %id, error = %e, "restore from memory snapshot failed; booting cold");
                    kill_vmms(&dir.display().to_string()).await;
                    // A prebuild's disk still holds the repos and init results.
                    let source = spawn.as_ref().map(|w| w.template.disk.clone());
                    self.clone_root_disk(image, source, &disk).await?;
                }
            }
        }
        let process = self.vms.launch(&cfg).await?;
        let paths = process.paths().clone();
        crate::fault::point("create-after-launch").await;
        let agent = AgentClient::connect_unix(&paths.agent).await.map_err(|e| {
            Error::unavailable(format!(
                "cannot connect to the agent of sandbox {}",
                rec.name
            ))
            .with_detail(format!("socket {}", paths.agent.display()))
            .with_source(e)
        })?;
        agent.set_timeout(self.cfg.agent_timeout);
        let timeout = match accel {
            Accel::Kvm => Duration::from_secs(60),
            Accel::Tcg => Duration::from_secs(240),
        };
        let mut exited = process.exit_watch();
        let source = match &spawn {
            Some(w) => AgentSource::Prebuild(&w.spec.name),
            None => AgentSource::Image(&image.manifest.name),
        };
        let ready = tokio::select! {
            r = agent.wait_ready(timeout) => r.map_err(|e| {
                // An agent this manager cannot serve: say what to rebuild.
                protocol_mismatch(&e, &rec.name, source).ok_or_else(|| e.to_string())
            }),
            _ = exited.wait_for(|e| *e) => Err(Err("the VM exited".to_owned())),
        };
        let hello: Hello = match ready {
            Ok(h) => h,
            Err(Ok(mismatch)) => return Err(mismatch),
            Err(Err(why)) => {
                // A guest that powers off during boot closes the agent socket first;
                // give the VMM a moment so the error says what really happened.
                if process.wait_exit(Duration::from_secs(2)).await {
                    let console = std::fs::read_to_string(&paths.console).unwrap_or_default();
                    let tail: Vec<&str> = console.lines().rev().take(4).collect();
                    let tail: Vec<&str> = tail.into_iter().rev().collect();
                    return Err(Error::unavailable(format!(
                        "the VM of sandbox {} exited while booting; console: {}",
                        rec.name,
                        tail.join(" | ")
                    )));
                }
                return Err(Error::unavailable(format!(
                    "the agent in sandbox {} did not answer within {} s; see `atelier sandbox logs {}`",
                    rec.name,
                    timeout.as_secs(),
                    rec.name
                ))
                .with_detail(why));
            }
        };
        tracing::debug!(sandbox = %id, agent = ?hello, "agent ready");
        for (i, m) in rec.mounts.iter().enumerate() {
            mount_share(&agent, &format!("atl{i}"), m).await?;
        }
        self.go_online(&rec, &agent, GuestSetup::Booted).await?;
        if let Some(w) = &spawn {
            self.finish_workspace_spawn(&rec, &agent, &w.spec, w.opencode.as_ref(), false)
                .await?;
        }
        write_memory_backing(&dir, &cfg.memory)?;
        self.register_vm(id, process, agent, false);
        if fresh && rec.mounts.is_empty() && spawn.is_none() {
            self.ensure_template(image, &rec, accel);
        }
        Ok(())
    }

    /// Journals and makes a sandbox's directory (run files, console log, saved
    /// state); returns it.
    pub(crate) async fn make_sandbox_dir(&self, id: &SandboxId) -> Result<PathBuf, Error> {
        let dir = self.sandbox_dir(id);
        self.journal
            .record(id, ResourceKind::Dir, dir.display().to_string())
            .await?;
        std::fs::create_dir_all(&dir)
            .map_err(|e| Error::internal(format!("cannot create {}: {e}", dir.display())))?;
        Ok(dir)
    }

    /// Clones a sandbox's root disk from `source` (a template's disk) or the image.
    async fn clone_root_disk(
        &self,
        image: &atelier_image::Image,
        source: Option<PathBuf>,
        disk: &Path,
    ) -> Result<(), Error> {
        let pool = self.pool.clone();
        let (rootfs, hash, d) = (image.rootfs(), image.manifest.hash.clone(), disk.to_owned());
        tokio::task::spawn_blocking(move || -> Result<_, atelier_storage::StorageError> {
            let base = match source {
                Some(s) => s,
                None => pool.import_base(&rootfs, &hash)?,
            };
            let _ = pool.remove_disk(&d);
            pool.clone_disk(&base, &d)
        })
        .await
        .map_err(|e| Error::internal(e.to_string()))??;
        Ok(())
    }

    /// The VMM configuration of sandbox `rec`: its directory, disk, shape, shared
    /// folders, the user the VMM runs as, and its network card (leasing its address
    /// and journaling its TAP first).
    pub(crate) async fn sandbox_vm_config(
        &self,
        rec: &SandboxRecord,
        image: &atelier_image::Image,
        accel: Accel,
    ) -> Result<VmConfig, Error> {
        let dir = self.sandbox_dir(&rec.id);
        let disk = self.pool.disk_path(rec.id.as_str());
        let mut cfg = self.vm_config(
            rec.id.as_str(),
            &dir,
            image,
            &rec.name,
            &disk,
            rec.memory_mib,
            rec.vcpus,
            accel,
        );
        let shares = crate::shares::vm_shares(&self.cfg, rec)?;
        if let Some((uid, _)) = shares.run_as {
            // Root's folders: the share user gets access to them (again at every
            // launch, for what root added meanwhile), journaled first.
            for (path, read_only) in &shares.grants {
                self.journal
                    .grant_share_access(&rec.id, uid, path, *read_only)
                    .await?;
            }
        }
        (cfg.shares, cfg.run_as) = (shares.shares, shares.run_as);
        if let Some(net) = &self.net {
            let (first, last) = net.cfg.guest_range();
            let ip = self
                .store
                .lease_ip(&rec.id, first, last, ResourceKind::Ip.as_str())
                .await?;
            let tap = atelier_net::tap_name(rec.id.as_str());
            self.journal
                .record(&rec.id, ResourceKind::Tap, &tap)
                .await?;
            cfg.nic = Some(Nic {
                tap,
                mac: atelier_net::mac_for(ip),
            });
        }
        Ok(cfg)
    }

    /// Brings a sandbox whose agent just answered online: the guest does what its
    /// [`GuestSetup`] asks (clock, identity, address) while the firewall learns its
    /// policy, and only then does its TAP join the bridge.
    pub(crate) async fn go_online(
        &self,
        rec: &SandboxRecord,
        agent: &AgentClient,
        setup: GuestSetup,
    ) -> Result<(), Error> {
        let lease = match &self.net {
            Some(_) => self.store.lease_of(&rec.id).await?,
            None => None,
        };
        let online = self.net.as_deref().zip(lease);
        let policy: Option<atelier_core::EgressPolicy> = match online {
            Some(_) => Some(rec.egress.parse()?),
            None => None,
        };
        let net_cfg = online.map(|(net, ip)| {
            let mut cfg = net.guest_config(ip);
            cfg.hostname = Some(rec.name.clone());
            cfg
        });
        let tap = atelier_net::tap_name(rec.id.as_str());
        let host = async {
            match (online, &policy) {
                (Some((net, ip)), Some(policy)) => net.admit(ip, &tap, policy).await,
                _ => Ok(()),
            }
        };
        tokio::try_join!(set_up_guest(rec, agent, setup, net_cfg), host)?;
        if let Some((net, ip)) = online {
            net.links.attach(&tap).await?;
            net.came_online(&rec.id, ip);
        }
        Ok(())
    }
}

/// Mounts a 9p share in the guest through the agent (loading the 9p modules first).
async fn mount_share(
    agent: &AgentClient,
    tag: &str,
    m: &atelier_core::MountSpec,
) -> Result<(), Error> {
    let opts = if m.read_only {
        "trans=virtio,version=9p2000.L,msize=262144,ro"
    } else {
        "trans=virtio,version=9p2000.L,msize=262144"
    };
    let script = "modprobe -q 9pnet_virtio 2>/dev/null; modprobe -q 9p 2>/dev/null; mkdir -p \"$2\" && mount -t 9p -o \"$3\" \"$1\" \"$2\"";
    crate::templates::exec_ok(agent, &["sh", "-c", script, "mount", tag, &m.target, opts])
        .await
        .map_err(|e| {
            Error::internal(format!(
                "mounting {} at {} in the guest failed: {e}",
                m.source, m.target
            ))
        })
}
