//! The manager: it opens the data directory, builds the services that each own a
//! part of the host (the VM registry, the resource journal, the network, the
//! template builder, dev routes) and wires them together. Sandboxes' life cycle is
//! in [`crate::sandboxes`], templates in `templates.rs`, prebuilds in `prebuild.rs`,
//! workspaces in `workspaces.rs`, crash recovery in `reconcile.rs`.
//!
//! Every operation on one sandbox runs under that sandbox's lock; every host
//! resource goes through the [`Journal`] before it is made, so `reconcile` can
//! finish or undo any operation a crash interrupted.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex as StdMutex};
use std::time::{Duration, Instant};

use atelier_core::{ErrorKind, SandboxId, SandboxState};
use atelier_storage::Pool;
use atelier_store::{SandboxRecord, Store};
use atelier_vmm::{Accel, MemoryBacking, ProbeOutcome, VmConfig};
use tokio::sync::{Mutex, OwnedMutexGuard};

use crate::Error;
use crate::journal::Journal;
use crate::vms::VmRegistry;

pub use crate::config::{ManagerConfig, UrlBase};
pub use crate::vms::AgentHealth;

/// The manager: the services below, and the sandbox life cycle over them.
#[derive(Debug)]
pub struct Manager {
    pub(crate) cfg: ManagerConfig,
    pub(crate) store: Store,
    pub(crate) pool: Pool,
    /// The VMMs this manager drives.
    pub(crate) vms: VmRegistry,
    /// The only writer and reclaimer of host resources.
    pub(crate) journal: Journal,
    /// Bridge, firewall, DNS and which sandboxes are online; None without network.
    pub(crate) net: Option<Arc<crate::network::Network>>,
    /// Memory-snapshot templates being built.
    pub(crate) templates: crate::templates::Builds,
    /// Listening dev commands, for the proxy.
    pub(crate) dev_routes: crate::dev::Routes,
    /// One lock per sandbox; every operation on a sandbox holds it.
    locks: StdMutex<HashMap<SandboxId, Arc<Mutex<()>>>>,
    /// Prebuilds build one at a time.
    pub(crate) prebuild_lock: Mutex<()>,
    /// Every state change, for `/api/v1/events` and whoever else listens.
    events: Arc<crate::events::EventBus>,
    started: Instant,
}

pub(crate) fn lock_map<T>(m: &StdMutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Manager {
    /// Opens the data directory (database, pool), reconciles the journal with the
    /// host, and returns the manager. Call [`Manager::spawn_background`] after.
    pub async fn open(cfg: ManagerConfig) -> Result<Arc<Manager>, Error> {
        crate::host_files::secure_data_dir(&cfg.data_dir)?;
        for d in [cfg.data_dir.clone(), cfg.images_dir(), cfg.sandboxes_dir()] {
            std::fs::create_dir_all(&d)
                .map_err(|e| Error::internal(format!("cannot create {}: {e}", d.display())))?;
        }
        let store = Store::open(&cfg.data_dir.join("atelier.db")).await?;
        // Observed from the start, so reconcile's transitions are events too.
        let events =
            crate::events::EventBus::new(crate::events::REPLAY_EVENTS, crate::events::LIVE_EVENTS);
        store.observe(events.store_observer());
        let storage = cfg.storage;
        let dd = cfg.data_dir.clone();
        let pool = tokio::task::spawn_blocking(move || Pool::open(&dd, storage))
            .await
            .map_err(|e| Error::internal(e.to_string()))??;
        crate::host_files::narrow(&cfg.data_dir.join("pool"));
        let vms = VmRegistry::new(&cfg).await;
        let net = match &cfg.network {
            Some(n) => Some(Arc::new(crate::network::Network::open(n).await?)),
            None => None,
        };
        let journal = Journal::new(store.clone(), pool.clone(), net.clone());
        let mgr = Arc::new(Manager {
            net,
            journal,
            vms,
            templates: Default::default(),
            dev_routes: Default::default(),
            prebuild_lock: Mutex::new(()),
            events,
            cfg,
            store,
            pool,
            locks: StdMutex::new(HashMap::new()),
            started: Instant::now(),
        });
        mgr.reconcile_at_start().await?;
        Ok(mgr)
    }

    /// Starts the periodic reconcile and agent health loops.
    pub fn spawn_background(self: &Arc<Self>) {
        crate::guest_limits::spawn_console_rotation(self);
        // Decide the accelerator now (cached after the first probe) so `status`
        // shows it before the first sandbox; without an image it waits for one.
        let me = Arc::clone(self);
        tokio::spawn(async move {
            if let Ok(Some(img)) =
                atelier_image::list(&me.cfg.images_dir()).map(|l| l.into_iter().next())
            {
                me.accel(&img).await;
            }
        });
        let me = Arc::clone(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(me.cfg.reconcile_interval);
            tick.tick().await;
            loop {
                tick.tick().await;
                if let Err(e) = me.reconcile_orphans().await {
                    tracing::warn!(error = %e, "periodic reconcile failed");
                }
            }
        });
        let me = Arc::clone(self);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(10)).await;
                me.vms.check_agents().await;
            }
        });
        if self.net.is_some() {
            self.spawn_dev_watcher();
        }
        self.spawn_prebuild_checker();
    }

    /// The narrow handle over sandboxes that other services (tasks) build on.
    pub fn sandboxes(self: &Arc<Self>) -> crate::sandboxes::Sandboxes {
        crate::sandboxes::Sandboxes::new(Arc::clone(self))
    }

    /// The narrow handle over workspaces that the task service builds on.
    pub fn workspace_access(self: &Arc<Self>) -> crate::workspaces::Workspaces {
        crate::workspaces::Workspaces::new(Arc::clone(self))
    }

    /// The event bus.
    pub fn events(&self) -> &Arc<crate::events::EventBus> {
        &self.events
    }

    /// The store.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The configuration.
    pub fn config(&self) -> &ManagerConfig {
        &self.cfg
    }

    /// The volume pool.
    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    /// QEMU's version line.
    pub fn qemu_version(&self) -> &str {
        self.vms.qemu_version()
    }

    /// Seconds since the manager started.
    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }

    /// The accelerator, if it has been decided yet.
    pub fn accel_if_known(&self) -> Option<&ProbeOutcome> {
        self.vms.accel_if_known()
    }

    /// The accelerator to use (probed once, then cached).
    pub async fn accel(&self, image: &atelier_image::Image) -> &ProbeOutcome {
        self.vms.accel(image, &self.store).await
    }

    pub(crate) async fn lock(&self, id: &SandboxId) -> OwnedMutexGuard<()> {
        let m = Arc::clone(lock_map(&self.locks).entry(id.clone()).or_default());
        m.lock_owned().await
    }

    /// Finds a live sandbox, takes its lock and reads it again under the lock (its
    /// state may have changed while we waited).
    pub(crate) async fn locked(
        &self,
        id_or_name: &str,
    ) -> Result<(OwnedMutexGuard<()>, SandboxRecord), Error> {
        let rec = self.get(id_or_name).await?;
        let guard = self.lock(&rec.id).await;
        let rec = self.store.get_sandbox(&rec.id).await?;
        Ok((guard, rec))
    }

    pub(crate) fn try_lock(&self, id: &SandboxId) -> Option<OwnedMutexGuard<()>> {
        let m = Arc::clone(lock_map(&self.locks).entry(id.clone()).or_default());
        m.try_lock_owned().ok()
    }

    /// Whether a running sandbox was restored from a memory snapshot.
    pub fn restored(&self, id: &SandboxId) -> Option<bool> {
        self.vms.restored(id)
    }

    /// The agent's health for a running sandbox, with its restart count.
    pub fn agent_health(&self, id: &SandboxId) -> Option<(AgentHealth, u64)> {
        self.vms.agent_health(id)
    }

    /// Why a running sandbox's agent is not ready, when known (its connection was
    /// closed, e.g. for a protocol violation; the manager is reconnecting; or it gave
    /// up).
    pub fn agent_detail(&self, id: &SandboxId) -> Option<String> {
        self.vms.agent_status(id).and_then(|(_, _, d)| d)
    }

    /// A sandbox's directory (its run files and console log).
    pub fn sandbox_dir(&self, id: &SandboxId) -> PathBuf {
        self.cfg.sandboxes_dir().join(id.as_str())
    }

    /// A live sandbox by id or name.
    pub async fn get(&self, id_or_name: &str) -> Result<SandboxRecord, Error> {
        Ok(self.store.find_sandbox(id_or_name).await?)
    }

    /// Finds the newest built image called `name`.
    pub fn image(&self, name: &str) -> Result<atelier_image::Image, Error> {
        match atelier_image::find(&self.cfg.images_dir(), name) {
            Ok(Some(img)) => Ok(img),
            Ok(None) => Err(Error::not_found(format!(
                "image {name:?} is not built; run `atelier image build {name}` first"
            ))),
            Err(e) => Err(Error::internal(format!("cannot read images: {e}"))),
        }
    }

    /// The address of an online sandbox.
    pub fn ip_of(&self, id: &SandboxId) -> Option<String> {
        self.net
            .as_ref()
            .and_then(|n| n.online_ip(id))
            .map(|ip| ip.to_string())
    }

    /// Where the proxy reaches an online sandbox's `port`.
    pub fn upstream(&self, id: &SandboxId, port: u16) -> Option<std::net::SocketAddr> {
        self.net
            .as_ref()
            .and_then(|n| n.online_ip(id))
            .map(|ip| std::net::SocketAddr::from((ip, port)))
    }

    /// The sandbox's own URL through the proxy.
    pub fn sandbox_url(&self, id: &SandboxId) -> Option<String> {
        self.net
            .as_ref()
            .map(|_| self.cfg.urls.url(&format!("sandbox-{id}")))
    }

    /// The VMM configuration for booting `image` with `disk` in `run_dir`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn vm_config(
        &self,
        name: &str,
        run_dir: &Path,
        image: &atelier_image::Image,
        hostname: &str,
        disk: &Path,
        memory_mib: u32,
        vcpus: u32,
        accel: Accel,
    ) -> VmConfig {
        VmConfig {
            name: name.to_owned(),
            run_dir: run_dir.to_owned(),
            kernel: image.kernel(),
            initrd: image.initrd(),
            cmdline: format!("{} atelier.hostname={hostname}", image.cmdline()),
            disk: disk.to_owned(),
            disk_format: match self.pool.backend() {
                atelier_storage::Backend::Reflink => "raw".into(),
                atelier_storage::Backend::Qcow2 => "qcow2".into(),
            },
            vcpus,
            memory_mib,
            accel,
            memory: MemoryBacking::Anonymous,
            incoming: None,
            shares: Vec::new(),
            run_as: None,
            nic: None,
        }
    }

    /// Counts of live sandboxes per state.
    pub async fn counts(&self) -> Result<HashMap<SandboxState, usize>, Error> {
        let mut counts = HashMap::new();
        for r in self.store.list_sandboxes(false).await? {
            *counts.entry(r.state).or_insert(0) += 1;
        }
        Ok(counts)
    }

    /// The kind to report for an error talking to an agent.
    pub fn agent_error(e: atelier_agent_proto::ProtoError) -> Error {
        use atelier_agent_proto::ProtoError as P;
        let text = e.to_string();
        match e {
            P::Agent { kind, .. } => {
                use atelier_agent_proto::ErrorKind as K;
                let k = match kind {
                    K::NotFound => ErrorKind::NotFound,
                    K::Invalid | K::PermissionDenied | K::AlreadyExists | K::Unsupported => {
                        ErrorKind::Invalid
                    }
                    K::Io | K::Internal => ErrorKind::Internal,
                    K::ConnectionRefused | K::TimedOut => ErrorKind::Unavailable,
                };
                Error::new(k, text)
            }
            _ => Error::unavailable(format!("agent: {text}")),
        }
    }
}
