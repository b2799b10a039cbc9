//! The sandbox service. Every operation on one sandbox runs under that sandbox's
//! lock; every host resource is journaled in the store before it is made and
//! forgotten only after it is gone, so `reconcile` can finish or undo any operation
//! a crash interrupted.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex as StdMutex};
use std::time::{Duration, Instant};

use atelier_agent_proto::{AgentClient, Hello};
use atelier_core::{ErrorKind, SandboxId, SandboxSpec, SandboxState};
use atelier_storage::{BackendChoice, Pool};
use atelier_store::{ResourceRecord, SandboxRecord, Store, now_ms};
use atelier_vmm::qemu::Qemu;
use atelier_vmm::{
    Accel, AccelChoice, Hypervisor, MemoryBacking, Nic, ProbeOutcome, RunPaths, VmConfig, VmProcess,
};
use tokio::sync::{Mutex, OnceCell, OwnedMutexGuard};

use crate::Error;
use crate::guest_stream::{AgentSource, protocol_mismatch};

/// Journal kind: a sandbox's directory (run files and console log).
pub const RES_DIR: &str = "dir";
/// Journal kind: a sandbox's disk clone in the pool.
pub const RES_DISK: &str = "disk";
/// Journal kind: a VMM process, located by its run directory.
pub const RES_PROCESS: &str = "process";
/// Journal kind: a sandbox's TAP (made by, and dying with, its VMM; reclaimed with
/// the process).
pub const RES_TAP: &str = "tap";
/// Journal kind: a sandbox's leased guest address and its firewall elements
/// (reclaimed with the disk: the address is part of the sandbox's identity).
pub const RES_IP: &str = "ip";

/// Manager settings.
#[derive(Debug, Clone)]
pub struct ManagerConfig {
    /// Where everything lives: database, images, pool, sandboxes.
    pub data_dir: PathBuf,
    /// Accelerator choice (`ATELIER_ACCEL`).
    pub accel: AccelChoice,
    /// The QEMU binary.
    pub qemu_binary: PathBuf,
    /// Storage backend choice.
    pub storage: BackendChoice,
    /// How often the reconcile loop runs.
    pub reconcile_interval: Duration,
    /// Where built images are (default `<data_dir>/images`).
    pub images_dir: PathBuf,
    /// Sandbox networking; None gives guests no network card.
    pub network: Option<atelier_net::NetConfig>,
    /// How sandboxes' URLs look (the proxy's public side).
    pub urls: UrlBase,
    /// How often prebuilds are checked for new commits.
    pub prebuild_check_interval: Duration,
    /// Deadline of a request to a guest agent (and of a stream's start).
    pub agent_timeout: Duration,
    /// Default deadline of a QMP command to a VMM.
    pub qmp_timeout: Duration,
    /// Host folders (and everything under them) sandboxes may share
    /// (`--share-root`); default [`crate::shares::DEFAULT_SHARE_ROOTS`].
    pub share_roots: Vec<PathBuf>,
}

/// The public side of the proxy: `{scheme}://sandbox-{id}.{domain}{:port}/`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UrlBase {
    /// Wildcard domain (`localhost` for local use).
    pub domain: String,
    /// `https` when TLS is on, else `http`.
    pub scheme: String,
    /// Port, when not the scheme's default.
    pub port: Option<u16>,
}

impl UrlBase {
    /// The URL of host `label.{domain}`.
    pub fn url(&self, label: &str) -> String {
        match self.port {
            Some(p) => format!("{}://{label}.{}:{p}/", self.scheme, self.domain),
            None => format!("{}://{label}.{}/", self.scheme, self.domain),
        }
    }
}

impl ManagerConfig {
    /// Defaults for `data_dir`.
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        let data_dir: PathBuf = data_dir.into();
        ManagerConfig {
            images_dir: data_dir.join("images"),
            data_dir,
            accel: AccelChoice::Auto,
            qemu_binary: PathBuf::from("qemu-system-x86_64"),
            storage: BackendChoice::Auto,
            reconcile_interval: Duration::from_secs(30),
            network: Some(atelier_net::NetConfig::new()),
            prebuild_check_interval: Duration::from_secs(1800),
            agent_timeout: atelier_agent_proto::DEFAULT_TIMEOUT,
            qmp_timeout: atelier_vmm::qmp::DEFAULT_QMP_TIMEOUT,
            urls: UrlBase {
                domain: "localhost".into(),
                scheme: "http".into(),
                port: Some(7777),
            },
            share_roots: crate::shares::DEFAULT_SHARE_ROOTS
                .iter()
                .map(PathBuf::from)
                .collect(),
        }
    }

    /// Directory of built images.
    pub fn images_dir(&self) -> PathBuf {
        self.images_dir.clone()
    }

    /// Directory holding one directory per sandbox.
    pub fn sandboxes_dir(&self) -> PathBuf {
        self.data_dir.join("sandboxes")
    }
}

/// A VM this manager is driving.
pub(crate) struct RunningVm {
    pub(crate) process: VmProcess,
    pub(crate) agent: AgentClient,
    pub(crate) responsive: AtomicBool,
    /// Whether this VM was restored from a memory snapshot (else it booted).
    pub(crate) restored: bool,
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

/// The sandbox service.
#[derive(Debug)]
pub struct Manager {
    pub(crate) cfg: ManagerConfig,
    pub(crate) store: Store,
    pub(crate) pool: Pool,
    pub(crate) hv: Arc<dyn Hypervisor>,
    accel: OnceCell<ProbeOutcome>,
    pub(crate) vms: StdMutex<HashMap<SandboxId, Arc<RunningVm>>>,
    locks: StdMutex<HashMap<SandboxId, Arc<Mutex<()>>>>,
    building: StdMutex<std::collections::HashSet<String>>,
    started: Instant,
    qemu_version: String,
    pub(crate) net: Option<crate::network::Network>,
    /// Addresses of sandboxes that are online (their TAP is on the bridge).
    online: StdMutex<HashMap<SandboxId, std::net::Ipv4Addr>>,
    /// Listening dev commands, for the proxy.
    dev_routes: StdMutex<crate::dev::DevRoutes>,
    /// Prebuilds build one at a time.
    pub(crate) prebuild_lock: Mutex<()>,
    /// Every state change, for `/api/v1/events` and whoever else listens.
    events: Arc<crate::events::EventBus>,
}

/// What a sandbox spawned from a workspace starts from.
#[derive(Debug, Clone)]
pub(crate) struct WorkspaceSpawn {
    pub(crate) template: crate::templates::Template,
    pub(crate) spec: atelier_core::workspace::WorkspaceSpec,
}

fn lock_map<T>(m: &StdMutex<T>) -> std::sync::MutexGuard<'_, T> {
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
        let qemu = Qemu::new(cfg.qemu_binary.clone()).with_qmp_timeout(cfg.qmp_timeout);
        let qemu_version = qemu
            .version()
            .await
            .unwrap_or_else(|e| format!("unavailable: {e}"));
        let net = match &cfg.network {
            Some(n) => Some(crate::network::Network::open(n).await?),
            None => None,
        };
        let mgr = Arc::new(Manager {
            net,
            online: StdMutex::new(HashMap::new()),
            dev_routes: StdMutex::new(HashMap::new()),
            prebuild_lock: Mutex::new(()),
            events,
            cfg,
            store,
            pool,
            hv: Arc::new(qemu),
            accel: OnceCell::new(),
            vms: StdMutex::new(HashMap::new()),
            locks: StdMutex::new(HashMap::new()),
            building: StdMutex::new(Default::default()),
            started: Instant::now(),
            qemu_version,
        });
        mgr.reconcile_at_start().await?;
        Ok(mgr)
    }

    /// Starts the periodic reconcile and agent health loops.
    pub fn spawn_background(self: &Arc<Self>) {
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
                me.check_agents().await;
            }
        });
        if self.net.is_some() {
            self.spawn_dev_watcher();
        }
        self.spawn_prebuild_checker();
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
        &self.qemu_version
    }

    /// Seconds since the manager started.
    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }

    /// The accelerator, if it has been decided yet.
    pub fn accel_if_known(&self) -> Option<&ProbeOutcome> {
        self.accel.get()
    }

    /// The accelerator to use: forced by configuration, or probed once (booting the
    /// given image's kernel under KVM) and cached in the store for this QEMU version.
    pub async fn accel(&self, image: &atelier_image::Image) -> &ProbeOutcome {
        self.accel
            .get_or_init(|| async {
                if let AccelChoice::Forced(a) = self.cfg.accel {
                    return ProbeOutcome { accel: a, reason: "set by ATELIER_ACCEL".into() };
                }
                let key = format!("accel-probe:{}:{}", self.qemu_version, image.manifest.kernel_release);
                if let Ok(Some(v)) = self.store.setting(&key).await
                    && let Some((a, reason)) = v.split_once('|')
                    && let Some(accel) = Accel::parse(a)
                {
                    return ProbeOutcome { accel, reason: format!("{reason} (cached)") };
                }
                let out = atelier_vmm::probe_accel(
                    &self.cfg.qemu_binary,
                    &image.kernel(),
                    &image.initrd(),
                    &self.cfg.data_dir.join("probe"),
                    Duration::from_secs(20),
                )
                .await;
                tracing::info!(accel = out.accel.as_str(), reason = %out.reason, "accelerator chosen");
                let _ = self.store.put_setting(&key, &format!("{}|{}", out.accel.as_str(), out.reason)).await;
                out
            })
            .await
    }

    pub(crate) async fn lock(&self, id: &SandboxId) -> OwnedMutexGuard<()> {
        let m = Arc::clone(lock_map(&self.locks).entry(id.clone()).or_default());
        m.lock_owned().await
    }

    /// Finds a live sandbox, takes its lock and reads it again under the lock (its
    /// state may have changed while we waited).
    async fn locked(
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

    pub(crate) fn vm(&self, id: &SandboxId) -> Option<Arc<RunningVm>> {
        lock_map(&self.vms).get(id).cloned()
    }

    /// Whether a running sandbox was restored from a memory snapshot.
    pub fn restored(&self, id: &SandboxId) -> Option<bool> {
        self.vm(id).map(|vm| vm.restored)
    }

    /// The agent's health for a running sandbox, with its restart count.
    pub fn agent_health(&self, id: &SandboxId) -> Option<(AgentHealth, u64)> {
        self.vm(id).map(|vm| {
            let h = if vm.responsive.load(Ordering::Relaxed) {
                AgentHealth::Ready
            } else {
                AgentHealth::Unresponsive
            };
            (h, vm.agent.restarts())
        })
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
                let pb = self.newest_ready_prebuild(&w).await?.ok_or_else(|| {
                    Error::conflict(format!(
                        "workspace {w} has no ready prebuild yet; run `atelier prebuild create {w}`"
                    ))
                })?;
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
                let kinds: &[&str] = if fresh {
                    &[RES_PROCESS, RES_DISK]
                } else {
                    &[RES_PROCESS]
                };
                if let Err(re) = self.reclaim(id, kinds).await {
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
        let dir = self.sandbox_dir(id);
        self.store
            .record_resource(id, RES_DIR, &dir.display().to_string())
            .await?;
        std::fs::create_dir_all(&dir)
            .map_err(|e| Error::internal(format!("cannot create {}: {e}", dir.display())))?;

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
            self.store
                .record_resource(id, RES_DISK, &disk.display().to_string())
                .await?;
            self.clone_root_disk(image, template.as_ref().map(|t| t.disk.clone()), &disk)
                .await?;
        }

        let cfg = self.sandbox_vm_config(&rec, image, accel).await?;
        self.store
            .record_resource(id, RES_PROCESS, &dir.display().to_string())
            .await?;
        if let Some(t) = &template {
            match self.restore_from_template(id, &rec, t, cfg.clone()).await {
                Ok((process, agent)) => {
                    self.go_online(&rec, &agent, true).await?;
                    if let Some(w) = &spawn {
                        self.finish_workspace_spawn(&rec, &agent, &w.spec).await?;
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
        let process = self.hv.launch(&cfg).await?;
        let paths = process.paths().clone();
        fault_point("create-after-launch").await;
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
        self.go_online(&rec, &agent, true).await?;
        if let Some(w) = &spawn {
            self.finish_workspace_spawn(&rec, &agent, &w.spec).await?;
        }
        write_memory_backing(&dir, &cfg.memory)?;
        self.register_vm(id, process, agent, false);
        if fresh && rec.mounts.is_empty() && spawn.is_none() {
            self.ensure_template(image, &rec, accel);
        }
        Ok(())
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
        (cfg.shares, cfg.run_as) = crate::shares::vm_shares(&self.cfg, rec)?;
        if let Some(net) = &self.net {
            let (first, last) = net.cfg.guest_range();
            let ip = self.store.lease_ip(&rec.id, first, last, RES_IP).await?;
            let tap = atelier_net::tap_name(rec.id.as_str());
            self.store.record_resource(&rec.id, RES_TAP, &tap).await?;
            cfg.nic = Some(Nic {
                tap,
                mac: atelier_net::mac_for(ip),
            });
        }
        Ok(cfg)
    }

    /// Connects a sandbox whose agent just answered to the network: the guest takes
    /// its address (when `configure_guest`; an adopted VM already has it), the
    /// firewall learns its policy, and only then does its TAP join the bridge.
    pub(crate) async fn go_online(
        &self,
        rec: &SandboxRecord,
        agent: &AgentClient,
        configure_guest: bool,
    ) -> Result<(), Error> {
        let Some(net) = &self.net else {
            return Ok(());
        };
        let Some(ip) = self.store.lease_of(&rec.id).await? else {
            return Ok(());
        };
        let policy: atelier_core::EgressPolicy = rec.egress.parse()?;
        let tap = atelier_net::tap_name(rec.id.as_str());
        // The guest configures itself while the host updates the firewall.
        let guest = async {
            if configure_guest {
                let mut cfg = net.guest_config(ip);
                cfg.hostname = Some(rec.name.clone());
                agent.net_config(cfg).await.map_err(Manager::agent_error)?;
            }
            Ok::<(), Error>(())
        };
        tokio::try_join!(guest, net.admit(ip, &tap, &policy))?;
        net.links.attach(&tap).await?;
        lock_map(&self.online).insert(rec.id.clone(), ip);
        Ok(())
    }

    /// Ids of online sandboxes.
    pub(crate) fn online_ids(&self) -> Vec<SandboxId> {
        lock_map(&self.online).keys().cloned().collect()
    }

    pub(crate) fn dev_routes(&self) -> std::sync::MutexGuard<'_, crate::dev::DevRoutes> {
        lock_map(&self.dev_routes)
    }

    /// The address of an online sandbox.
    pub fn ip_of(&self, id: &SandboxId) -> Option<String> {
        lock_map(&self.online).get(id).map(|ip| ip.to_string())
    }

    /// Where the proxy reaches an online sandbox's `port`.
    pub fn upstream(&self, id: &SandboxId, port: u16) -> Option<std::net::SocketAddr> {
        lock_map(&self.online)
            .get(id)
            .map(|ip| std::net::SocketAddr::from((*ip, port)))
    }

    /// The sandbox's own URL through the proxy.
    pub fn sandbox_url(&self, id: &SandboxId) -> Option<String> {
        self.net
            .as_ref()
            .map(|_| self.cfg.urls.url(&format!("sandbox-{id}")))
    }

    /// Journals and launches a VMM that restores saved state (`cfg.incoming`), and
    /// waits for its agent; kills it when the agent does not answer.
    pub(crate) async fn launch_restored(
        &self,
        id: &SandboxId,
        cfg: &VmConfig,
        timeout: Duration,
        what: &str,
    ) -> Result<(VmProcess, AgentClient), Error> {
        self.store
            .record_resource(id, RES_PROCESS, &cfg.run_dir.display().to_string())
            .await?;
        let process = self.hv.launch(cfg).await?;
        fault_point("restore-after-launch").await;
        let agent = match AgentClient::connect_unix(&process.paths().agent).await {
            Ok(a) => a.with_timeout(self.cfg.agent_timeout),
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

    pub(crate) fn building_templates(
        &self,
    ) -> std::sync::MutexGuard<'_, std::collections::HashSet<String>> {
        lock_map(&self.building)
    }

    /// Keeps a VM in the running map and watches for its VMM dying.
    pub(crate) fn register_vm(
        self: &Arc<Self>,
        id: &SandboxId,
        process: VmProcess,
        agent: AgentClient,
        restored: bool,
    ) {
        let mut exited = process.exit_watch();
        let vm = Arc::new(RunningVm {
            process,
            agent,
            responsive: AtomicBool::new(true),
            restored,
        });
        lock_map(&self.vms).insert(id.clone(), Arc::clone(&vm));
        let me = Arc::clone(self);
        let id = id.clone();
        tokio::spawn(async move {
            let _ = exited.wait_for(|e| *e).await;
            let _guard = me.lock(&id).await;
            // Only a VM that is still the registered one and whose sandbox is running
            // died unexpectedly; stop/delete handle their own exits.
            let current = me.vm(&id).is_some_and(|v| Arc::ptr_eq(&v, &vm));
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
            if let Err(e) = me.reclaim(&id, &[RES_PROCESS]).await {
                tracing::error!(sandbox = %id, error = %e, "reclaim after vm exit");
            }
            let _ = me
                .store
                .transition(&id, SandboxState::Failed, "vm exited", Some(why.trim()))
                .await;
        });
    }

    /// Removes a VM from the running map, killing its VMM if still alive.
    pub(crate) async fn drop_vm(&self, id: &SandboxId) {
        lock_map(&self.online).remove(id);
        let vm = lock_map(&self.vms).remove(id);
        if let Some(vm) = vm
            && let Err(e) = vm.process.kill().await
        {
            tracing::warn!(sandbox = %id, error = %e, "kill vmm");
        }
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
        let forced = match self.vm(&rec.id) {
            Some(vm) => self.halt_vm(&rec, &vm).await,
            None => None,
        };
        self.drop_vm(&rec.id).await;
        self.reclaim(&rec.id, &[RES_PROCESS]).await?;
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
        self.reclaim(&rec.id, &[RES_PROCESS]).await?;
        fault_point("delete-after-kill").await;
        self.reclaim(&rec.id, &[RES_DISK, RES_DIR]).await?;
        self.store.delete_dev_commands(&rec.id).await?;
        tracing::info!(sandbox = %rec.id, "sandbox deleted");
        Ok(self
            .store
            .transition(&rec.id, SandboxState::Deleted, "delete", None)
            .await?)
    }

    /// Reclaims the journaled resources of `id` whose kind is in `kinds`, newest
    /// first, forgetting each once it is gone.
    pub(crate) async fn reclaim(&self, id: &SandboxId, kinds: &[&str]) -> Result<(), Error> {
        // A TAP goes with its VMM; an address goes with the disk.
        let implied = |k: &str| match k {
            RES_TAP => kinds.contains(&RES_PROCESS),
            RES_IP => kinds.contains(&RES_DISK),
            _ => false,
        };
        for r in self.store.resources(Some(id)).await? {
            if kinds.contains(&r.kind.as_str()) || implied(&r.kind) {
                self.reclaim_one(&r).await?;
            }
        }
        Ok(())
    }

    /// Removes one resource from the host, then from the journal.
    pub(crate) async fn reclaim_one(&self, r: &ResourceRecord) -> Result<(), Error> {
        match r.kind.as_str() {
            RES_PROCESS => {
                kill_vmms(&r.locator).await;
                let paths = RunPaths::new(Path::new(&r.locator));
                for f in [&paths.qmp, &paths.agent, &paths.pidfile] {
                    let _ = std::fs::remove_file(f);
                }
            }
            RES_DISK => self.pool.remove_disk(Path::new(&r.locator))?,
            RES_TAP => {
                if let Some(net) = &self.net {
                    net.links.delete(&r.locator).await?;
                }
            }
            RES_IP => {
                if let Some(net) = &self.net
                    && let Ok(ip) = r.locator.parse()
                {
                    net.forget(ip).await?;
                }
                self.store.release_ip(&r.locator).await?;
            }
            RES_DIR => match std::fs::remove_dir_all(&r.locator) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    return Err(Error::internal(format!("cannot remove {}: {e}", r.locator)));
                }
                _ => {}
            },
            other => {
                tracing::warn!(kind = other, locator = %r.locator, "unknown resource kind; forgetting it")
            }
        }
        tracing::debug!(sandbox = %r.sandbox_id, kind = %r.kind, locator = %r.locator, "reclaimed");
        self.store.forget_resource(r.id).await?;
        Ok(())
    }

    /// The agent of a running sandbox, or a conflict error saying why there is none.
    pub async fn agent(&self, id_or_name: &str) -> Result<(SandboxRecord, AgentClient), Error> {
        let rec = self.get(id_or_name).await?;
        match (rec.state, self.vm(&rec.id)) {
            (SandboxState::Running, Some(vm)) => Ok((rec, vm.agent.clone())),
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

    /// Pings every running agent and records whether it answered.
    async fn check_agents(&self) {
        let vms: Vec<_> = lock_map(&self.vms)
            .iter()
            .map(|(k, v)| (k.clone(), Arc::clone(v)))
            .collect();
        // All at once, each with a deadline: a hung guest delays no one else's check.
        let timeout = self.cfg.agent_timeout.min(Duration::from_secs(5));
        let pings = futures::future::join_all(vms.iter().map(|(_, vm)| vm.agent.ping(timeout)));
        for ((id, vm), ping) in vms.iter().zip(pings.await) {
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

/// Records how a sandbox's RAM is backed (`vm-memory` in its directory): a paused
/// sandbox must be resumed with the same memory device it was saved with.
fn write_memory_backing(dir: &Path, m: &MemoryBacking) -> Result<(), Error> {
    let text = match m {
        MemoryBacking::PrivateFile(p) => p.display().to_string(),
        _ => String::new(),
    };
    std::fs::write(dir.join("vm-memory"), text)
        .map_err(|e| Error::internal(format!("cannot write {}: {e}", dir.display())))
}

fn read_memory_backing(dir: &Path) -> MemoryBacking {
    match std::fs::read_to_string(dir.join("vm-memory")) {
        Ok(t) if !t.trim().is_empty() => MemoryBacking::PrivateFile(PathBuf::from(t.trim())),
        _ => MemoryBacking::Anonymous,
    }
}

impl Manager {
    /// The VM of a sandbox that must be running for an operation (`done` names it:
    /// "paused", "forked"); a conflict or unavailable error otherwise.
    fn running_vm(&self, rec: &SandboxRecord, done: &str) -> Result<Arc<RunningVm>, Error> {
        if rec.state != SandboxState::Running {
            return Err(Error::conflict(format!(
                "sandbox {} is {}; only a running sandbox can be {done}",
                rec.name, rec.state
            )));
        }
        self.vm(&rec.id).ok_or_else(|| {
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
        self.reclaim(&rec.id, &[RES_PROCESS]).await?;
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
                let _ = self.reclaim(&rec.id, &[RES_PROCESS]).await;
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
                tracing::info!(sandbox = %rec.id, from = %src.id, "sandbox forked");
                Ok(self
                    .store
                    .transition(&rec.id, SandboxState::Running, "forked", None)
                    .await?)
            }
            Err(e) => {
                self.drop_vm(&rec.id).await;
                let _ = self.reclaim(&rec.id, &[RES_PROCESS, RES_DISK]).await;
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
        let dir = self.sandbox_dir(id);
        self.store
            .record_resource(id, RES_DIR, &dir.display().to_string())
            .await?;
        std::fs::create_dir_all(&dir)
            .map_err(|e| Error::internal(format!("cannot create {}: {e}", dir.display())))?;
        let disk = self.pool.disk_path(id.as_str());
        self.store
            .record_resource(id, RES_DISK, &disk.display().to_string())
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
        fault_point("fork-after-copy").await;
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
        crate::templates::fix_identity(&agent, &rec.name, self.net.is_some()).await?;
        self.go_online(rec, &agent, true).await?;
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
        fault_point("resume-after-launch").await;
        agent
            .set_time(std::time::SystemTime::now())
            .await
            .map_err(Manager::agent_error)?;
        self.go_online(rec, &agent, true).await?;
        let _ = std::fs::remove_file(&state);
        let restored = matches!(cfg.memory, MemoryBacking::PrivateFile(_));
        self.register_vm(id, process, agent, restored);
        Ok(())
    }
}

/// Crash-test hook: when `ATELIER_FAULT_PAUSE` (comma-separated) names `point`, the
/// operation logs and stalls there so a test can kill the manager at a known step.
pub(crate) async fn fault_point(point: &str) {
    let hit = std::env::var("ATELIER_FAULT_PAUSE").is_ok_and(|v| v.split(',').any(|p| p == point));
    if hit {
        tracing::warn!(point, "fault point reached; pausing (ATELIER_FAULT_PAUSE)");
        tokio::time::sleep(Duration::from_secs(3600)).await;
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
