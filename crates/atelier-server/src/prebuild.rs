//! Prebuilds: a workspace booted from its image, its repos cloned over the guest's
//! network, its init commands run, then frozen — disk (reflink copy) and memory
//! (RAM in a file, device state saved with `x-ignore-shared`), like a template but
//! per workspace. Sandboxes of the workspace restore it, then get their identity,
//! network, secrets, the latest commits and their dev commands.
//!
//! Built in `pool/prebuilds/.build-<id>/` and renamed into place when complete.
//! The build journals its directory, VMM, TAP and builder address (owner
//! `prebuild:<id>`) before making them; after a crash the start-up reconcile
//! reclaims them (keeping the log) and marks the `building` row failed. Builds run one
//! at a time (the builder VM has the subnet's last address). Secrets never enter a
//! prebuild: they are injected at spawn.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use atelier_agent_proto::{AgentClient, ExecEvent, ExecRequest};
use atelier_core::workspace::WorkspaceSpec;
use atelier_store::PrebuildRecord;
use atelier_vmm::{MemoryBacking, VmProcess};

use crate::Error;
use crate::journal::{Owner, ResourceKind};
use crate::manager::Manager;

/// A prebuild's build log (kept in its directory).
pub const BUILD_LOG: &str = "build.log";

fn new_id() -> String {
    use rand::Rng;
    const A: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let mut rng = rand::rng();
    let s: String = (0..10)
        .map(|_| A[rng.random_range(0..A.len())] as char)
        .collect();
    format!("pb-{s}")
}

/// Most stdout of one build step kept for the caller (its tail).
const RUN_OUTPUT_MAX: usize = 1 << 20;

/// Longest build-log line published as one event; longer lines are cut.
const MAX_EVENT_LINE: usize = 4096;

/// Appends to a build log, flushing each write so `logs -f` sees it at once, and
/// publishes every complete line as a `prebuild.log` event.
struct Log {
    file: std::fs::File,
    bus: Arc<crate::events::EventBus>,
    prebuild: String,
    /// The unfinished last line (at most MAX_EVENT_LINE bytes kept).
    partial: Vec<u8>,
    /// Bytes written to the file; beyond [`crate::guest_limits::BUILD_LOG_MAX`] the
    /// file gets a marker and no more (the failure message carries the tail).
    written: u64,
}

impl Log {
    fn line(&mut self, text: &str) {
        self.write_capped(format!("{text}\n").as_bytes());
        self.bytes_to_events(text.as_bytes());
        self.bytes_to_events(b"\n");
    }
    fn bytes(&mut self, b: &[u8]) {
        self.write_capped(b);
        self.bytes_to_events(b);
    }
    fn write_capped(&mut self, b: &[u8]) {
        let w = crate::guest_limits::capped_write(&mut self.file, self.written, b);
        self.written += w;
    }
    fn bytes_to_events(&mut self, mut b: &[u8]) {
        while let Some(nl) = b.iter().position(|&c| c == b'\n') {
            self.take_partial(&b[..nl]);
            self.publish_partial();
            b = &b[nl + 1..];
        }
        self.take_partial(b);
    }
    fn take_partial(&mut self, b: &[u8]) {
        let room = MAX_EVENT_LINE.saturating_sub(self.partial.len());
        self.partial.extend_from_slice(&b[..b.len().min(room)]);
    }
    fn publish_partial(&mut self) {
        let line = String::from_utf8_lossy(&self.partial)
            .trim_end_matches('\r')
            .to_owned();
        self.partial.clear();
        self.bus
            .publish(atelier_core::event::EventKind::PrebuildLog {
                prebuild: self.prebuild.clone(),
                line,
            });
    }
}

impl Drop for Log {
    fn drop(&mut self) {
        if !self.partial.is_empty() {
            self.publish_partial();
        }
    }
}

/// Kills the builder VM however the build ends.
struct VmGuard(Option<VmProcess>);

impl Drop for VmGuard {
    fn drop(&mut self) {
        if let Some(vm) = self.0.take() {
            tokio::spawn(async move {
                let _ = vm.kill().await;
            });
        }
    }
}

/// Runs `argv` in the guest, streaming its output into the log; fails unless it
/// exits 0 (the message carries the output's tail).
async fn run_logged(
    agent: &AgentClient,
    log: &mut Log,
    what: &str,
    req: ExecRequest,
) -> Result<Vec<u8>, Error> {
    let mut h = agent.exec(req).await.map_err(Manager::agent_error)?;
    let mut out = Vec::new();
    let mut tail: Vec<u8> = Vec::new();
    let mut exit = (None, None, false);
    while let Some(ev) = h.next_event().await {
        match ev.map_err(Manager::agent_error)? {
            ExecEvent::Stdout(b) => {
                log.bytes(&b);
                crate::guest_limits::append_tail(&mut out, &b, RUN_OUTPUT_MAX);
                tail.extend_from_slice(&b);
            }
            ExecEvent::Stderr(b) => {
                log.bytes(&b);
                tail.extend_from_slice(&b);
            }
            ExecEvent::Exit {
                code,
                signal,
                timed_out,
            } => exit = (code, signal, timed_out),
            ExecEvent::Started { .. } => {}
        }
        if tail.len() > 8192 {
            tail.drain(..tail.len() - 4096);
        }
    }
    if exit.0 == Some(0) {
        return Ok(out);
    }
    let how = match exit {
        (_, _, true) => "timed out".to_owned(),
        (Some(c), _, _) => format!("exit {c}"),
        (_, Some(s), _) => format!("signal {s}"),
        _ => "no exit status".to_owned(),
    };
    let t = String::from_utf8_lossy(&tail);
    let t: Vec<&str> = t.lines().rev().take(5).collect();
    let t: Vec<&str> = t.into_iter().rev().collect();
    Err(Error::invalid(format!(
        "{what} failed ({how}): {}",
        t.join(" | ")
    )))
}

impl Manager {
    /// Where prebuilds live.
    pub(crate) fn prebuilds_dir(&self) -> PathBuf {
        self.pool.root().join("prebuilds")
    }

    /// A workspace's record and parsed spec.
    pub(crate) async fn load_workspace(
        &self,
        name: &str,
    ) -> Result<(atelier_store::WorkspaceRecord, WorkspaceSpec), Error> {
        let rec = self
            .store
            .get_workspace(name)
            .await?
            .ok_or_else(|| Error::not_found(format!("workspace {name} not found")))?;
        let spec: WorkspaceSpec = serde_json::from_str(&rec.spec)
            .map_err(|e| Error::internal(format!("stored workspace {name}: {e}")))?;
        Ok((rec, spec))
    }

    /// Starts building a prebuild of `workspace` in the background.
    pub async fn prebuild_create(
        self: &Arc<Self>,
        workspace: &str,
    ) -> Result<PrebuildRecord, Error> {
        let (rec, spec) = self.load_workspace(workspace).await?;
        if let Some((i, _)) = spec.repos.iter().enumerate().find(|(_, r)| {
            r.credentials.is_some()
                && !(r.url.starts_with("https://") || r.url.starts_with("http://"))
        }) {
            return Err(Error::invalid(format!(
                "repos[{i}].credentials: credentials work with http(s) URLs (an ssh key would have to live in the guest)"
            )));
        }
        if let Some(b) = self
            .store
            .prebuilds(Some(workspace))
            .await?
            .into_iter()
            .find(|p| p.status == atelier_core::PrebuildStatus::Building)
        {
            return Err(Error::conflict(format!(
                "prebuild {} of workspace {workspace} is already building; follow it with `atelier prebuild logs -f {}`",
                b.id, b.id
            )));
        }
        let id = new_id();
        self.store
            .insert_prebuild(&id, workspace, rec.revision)
            .await?;
        let row = self
            .store
            .prebuild(&id)
            .await?
            .ok_or_else(|| Error::internal("prebuild row vanished"))?;
        let me = Arc::clone(self);
        tokio::spawn(async move {
            let _one_at_a_time = me.prebuild_lock.lock().await;
            let build = me.prebuilds_dir().join(format!(".build-{id}"));
            let owner = Owner::Prebuild(id.clone());
            tracing::info!(prebuild = %id, workspace = %spec.name, "building prebuild");
            let started = std::time::Instant::now();
            let built = match me
                .journal
                .record(
                    owner.clone(),
                    ResourceKind::Dir,
                    build.display().to_string(),
                )
                .await
            {
                Ok(()) => me.build_prebuild(&owner, &id, &spec, &build).await,
                Err(e) => Err(e),
            };
            match built {
                Ok((commits, size)) => {
                    // The builder's VMM, TAP and firewall state go before anyone
                    // hears it is ready; its directory becomes the prebuild.
                    let reclaimed = me
                        .journal
                        .reclaim(owner.clone(), &[ResourceKind::Process, ResourceKind::Ip])
                        .await;
                    let done = me.prebuilds_dir().join(&id);
                    let json = serde_json::to_string(&commits).unwrap_or_else(|_| "{}".into());
                    let finished = reclaimed.and_then(|()| {
                        std::fs::rename(&build, &done)
                            .map_err(|e| Error::internal(format!("cannot finish: {e}")))
                    });
                    let r = match finished {
                        Ok(()) => {
                            let _ = me.journal.release(owner).await;
                            me.store.prebuild_ready(&id, &json, size as i64).await
                        }
                        Err(e) => {
                            me.keep_prebuild_log(&id, &build);
                            let _ = me.journal.reclaim_all(owner).await;
                            me.store.prebuild_failed(&id, &e.message).await
                        }
                    };
                    if let Err(e) = r {
                        tracing::error!(prebuild = %id, error = %e, "recording prebuild");
                    }
                    tracing::info!(prebuild = %id, ms = started.elapsed().as_millis() as u64, "prebuild ready");
                }
                Err(e) => {
                    tracing::warn!(prebuild = %id, error = %e.message, "prebuild failed");
                    // Keep the log for diagnosis; drop the rest.
                    me.keep_prebuild_log(&id, &build);
                    if let Err(re) = me.journal.reclaim_all(owner).await {
                        tracing::error!(prebuild = %id, error = %re, "reclaiming a failed prebuild");
                    }
                    let _ = me.store.prebuild_failed(&id, &e.message).await;
                }
            }
        });
        Ok(row)
    }

    async fn build_prebuild(
        self: &Arc<Self>,
        owner: &Owner,
        id: &str,
        spec: &WorkspaceSpec,
        build: &Path,
    ) -> Result<(BTreeMap<String, String>, u64), Error> {
        std::fs::create_dir_all(build)
            .map_err(|e| Error::internal(format!("cannot create {}: {e}", build.display())))?;
        let mut log = Log {
            file: std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(build.join(BUILD_LOG))
                .map_err(|e| Error::internal(format!("build log: {e}")))?,
            bus: Arc::clone(self.events()),
            prebuild: id.to_owned(),
            partial: Vec::new(),
            written: 0,
        };
        let image = self.image(&spec.image)?;
        let accel = self.accel(&image).await.accel;
        log.line(&format!(
            "==> prebuild {id} of workspace {} (image {} {}, {} vCPU, {} MiB, {} GiB disk, {})",
            spec.name,
            image.manifest.name,
            &image.manifest.hash,
            spec.resources.vcpus,
            spec.resources.memory_mib,
            spec.resources.disk_gib,
            accel.as_str()
        ));
        let running = build.join("running.img");
        let pool = self.pool.clone();
        let (rootfs, hash, d) = (image.rootfs(), image.manifest.hash.clone(), running.clone());
        let want = u64::from(spec.resources.disk_gib) << 30;
        let grown = tokio::task::spawn_blocking(move || -> Result<bool, Error> {
            let base = pool.import_base(&rootfs, &hash)?;
            pool.clone_disk(&base, &d)?;
            grow(&d, want)
        })
        .await
        .map_err(|e| Error::internal(e.to_string()))??;

        let mut cfg = self.vm_config(
            "prebuild",
            build,
            &image,
            &spec.name,
            &running,
            spec.resources.memory_mib,
            spec.resources.vcpus,
            accel,
        );
        cfg.memory = MemoryBacking::SharedFile(build.join("mem"));
        let builder = self.net.as_ref().map(|n| n.cfg.builder_address());
        let tap = format!("atlp{}", id.trim_start_matches("pb-"));
        if let Some(ip) = builder {
            self.journal
                .record(owner.clone(), ResourceKind::Ip, ip.to_string())
                .await?;
            self.journal
                .record(owner.clone(), ResourceKind::Tap, &tap)
                .await?;
            cfg.nic = Some(atelier_vmm::Nic {
                tap: tap.clone(),
                mac: atelier_net::mac_for(ip),
            });
        }
        log.line("==> booting");
        self.journal
            .record(
                owner.clone(),
                ResourceKind::Process,
                build.display().to_string(),
            )
            .await?;
        let vm = VmGuard(Some(self.vms.launch(&cfg).await?));
        crate::fault::point("prebuild-after-launch").await;
        let process = vm.0.as_ref().ok_or_else(|| Error::internal("no vm"))?;
        let agent =
            crate::vms::boot_agent(process, accel, "prebuild", self.cfg.agent_timeout).await?;
        if let (Some(net), Some(ip)) = (&self.net, builder) {
            agent
                .net_config(net.guest_config(ip))
                .await
                .map_err(Manager::agent_error)?;
            net.admit(ip, &tap, &spec.egress).await?;
            net.links.attach(&tap).await?;
        }
        if grown {
            run_logged(
                &agent,
                &mut log,
                "growing the root filesystem",
                ExecRequest::new(["resize2fs", "/dev/vda"]).timeout(Duration::from_secs(300)),
            )
            .await?;
        }
        let mut commits = BTreeMap::new();
        for r in &spec.repos {
            log.line(&format!(
                "==> cloning {} ({}) into {}",
                r.url, r.branch, r.path
            ));
            match &r.credentials {
                None => {
                    run_logged(
                        &agent,
                        &mut log,
                        &format!("cloning {}", r.url),
                        ExecRequest::new([
                            "sh",
                            "-c",
                            "mkdir -p \"$(dirname \"$3\")\" && git clone --branch \"$2\" --single-branch \"$1\" \"$3\" 2>&1",
                            "clone",
                            &r.url,
                            &r.branch,
                            &r.path,
                        ])
                        .timeout(Duration::from_secs(1800)),
                    )
                    .await?;
                }
                Some(secret) => {
                    // The token never enters the build VM (its memory is the
                    // snapshot): the host fetches, the guest clones a bundle.
                    log.line(
                        "    (with credentials: fetched by the host, handed over as a bundle)",
                    );
                    let token = self.secret_value(secret).await?;
                    let bundle = fetch_bundle(&r.url, &r.branch, &token, build).await?;
                    let file = tokio::fs::File::open(&bundle)
                        .await
                        .map_err(|e| Error::internal(format!("bundle: {e}")))?;
                    agent
                        .write_file("/var/tmp/atelier-repo.bundle", 0o600, file)
                        .await
                        .map_err(Manager::agent_error)?;
                    let _ = std::fs::remove_file(&bundle);
                    run_logged(
                        &agent,
                        &mut log,
                        &format!("cloning {}", r.url),
                        ExecRequest::new([
                            "sh",
                            "-c",
                            "mkdir -p \"$(dirname \"$3\")\" && git clone --branch \"$2\" /var/tmp/atelier-repo.bundle \"$3\" 2>&1 && git -C \"$3\" remote set-url origin \"$1\"; rc=$?; rm -f /var/tmp/atelier-repo.bundle; exit $rc",
                            "clone",
                            &r.url,
                            &r.branch,
                            &r.path,
                        ])
                        .timeout(Duration::from_secs(1800)),
                    )
                    .await?;
                }
            }
            let head = run_logged(
                &agent,
                &mut log,
                "reading the cloned commit",
                ExecRequest::new(["git", "-C", &r.path, "rev-parse", "HEAD"]),
            )
            .await?;
            let head = String::from_utf8_lossy(&head).trim().to_owned();
            log.line(&format!("    at {head}"));
            commits.insert(r.path.clone(), head);
        }
        let opencode = self.opencode_config(spec);
        if !opencode.is_empty() {
            log.line("==> writing OpenCode configuration");
            let text = serde_json::to_vec_pretty(&serde_json::Value::Object(opencode))
                .map_err(|e| Error::internal(e.to_string()))?;
            crate::templates::exec_ok(&agent, &["mkdir", "-p", "/root/.config/opencode"]).await?;
            agent
                .write_file("/root/.config/opencode/opencode.json", 0o644, &text[..])
                .await
                .map_err(Manager::agent_error)?;
        }
        let cwd = spec
            .repos
            .first()
            .map(|r| r.path.clone())
            .unwrap_or_else(|| "/root".into());
        for (i, cmd) in spec.init.iter().enumerate() {
            log.line(&format!("==> init {}/{}: {cmd}", i + 1, spec.init.len()));
            run_logged(
                &agent,
                &mut log,
                &format!("init command {} ({cmd})", i + 1),
                ExecRequest::new(["sh", "-c", cmd.as_str()])
                    .cwd(cwd.as_str())
                    .timeout(Duration::from_secs(3600)),
            )
            .await?;
        }
        let opencode = self
            .prebuild_opencode(&agent, spec, &cwd, &mut |l| log.line(l))
            .await?;
        if let Some(oc) = &opencode {
            self.store.set_prebuild_opencode(id, oc).await?;
        }
        log.line("==> snapshotting memory and disk");
        self.freeze(
            process,
            agent,
            &build.join("state"),
            &running,
            &build.join("disk.img"),
        )
        .await?;
        let size = [build.join("mem"), build.join("disk.img")]
            .iter()
            .filter_map(|p| std::fs::metadata(p).ok())
            .map(|m| {
                use std::os::unix::fs::MetadataExt;
                m.blocks() * 512
            })
            .sum();
        log.line(&format!("==> ready ({} MiB on disk)", size >> 20));
        Ok((commits, size))
    }

    /// OpenCode's configuration for a workspace: `DATA/opencode.json` (global
    /// defaults, optional) with the workspace's keys on top.
    fn opencode_config(&self, spec: &WorkspaceSpec) -> serde_json::Map<String, serde_json::Value> {
        let mut merged = std::fs::read(self.cfg.data_dir.join("opencode.json"))
            .ok()
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
            .and_then(|v| v.as_object().cloned())
            .unwrap_or_default();
        if let Some(o) = spec.opencode.as_object() {
            for (k, v) in o {
                merged.insert(k.clone(), v.clone());
            }
        }
        merged
    }

    /// The newest ready prebuild of a workspace.
    pub(crate) async fn newest_ready_prebuild(
        &self,
        workspace: &str,
    ) -> Result<Option<PrebuildRecord>, Error> {
        Ok(self
            .store
            .prebuilds(Some(workspace))
            .await?
            .into_iter()
            .find(|p| p.status == atelier_core::PrebuildStatus::Ready))
    }

    /// Prebuilds of one workspace (or all), newest first, with `stale` computed:
    /// built from an older workspace revision, a repo moved on, or the image now
    /// carries another OpenCode than the one frozen in it.
    pub async fn prebuild_list(
        &self,
        workspace: Option<&str>,
    ) -> Result<Vec<(PrebuildRecord, bool)>, Error> {
        let mut revisions = BTreeMap::new();
        for w in self.store.list_workspaces().await? {
            let spec: Option<WorkspaceSpec> = serde_json::from_str(&w.spec).ok();
            revisions.insert(
                w.name.clone(),
                (w.revision, spec.and_then(|s| self.expected_opencode(&s))),
            );
        }
        Ok(self
            .store
            .prebuilds(workspace)
            .await?
            .into_iter()
            .map(|p| {
                let stale = p.stale
                    || revisions.get(&p.workspace).is_some_and(|(r, oc)| {
                        *r > p.revision
                            || oc
                                .as_ref()
                                .is_some_and(|v| p.opencode.as_ref().map(|o| &o.version) != Some(v))
                    });
                (p, stale)
            })
            .collect())
    }

    /// The OpenCode version a new prebuild of `spec` would freeze: the one its
    /// image carries, unless the workspace turns the server off. `None` also when
    /// it cannot be told (an image built before image.json recorded it).
    fn expected_opencode(&self, spec: &WorkspaceSpec) -> Option<String> {
        if spec.opencode_server == Some(false) {
            return None;
        }
        self.image(&spec.image).ok()?.manifest.opencode_version
    }

    /// The build log of a prebuild.
    pub fn prebuild_log_path(&self, id: &str) -> PathBuf {
        let building = self
            .prebuilds_dir()
            .join(format!(".build-{id}"))
            .join(BUILD_LOG);
        if building.exists() {
            building
        } else {
            self.prebuilds_dir().join(id).join(BUILD_LOG)
        }
    }

    /// Start-up reconcile: builds a crash interrupted are failed (the journal
    /// reclaims what they held), directories of unknown prebuilds removed.
    pub(crate) async fn reconcile_prebuilds(&self) -> Result<(), Error> {
        for p in self.store.prebuilds(None).await? {
            if p.status == atelier_core::PrebuildStatus::Building {
                tracing::warn!(prebuild = %p.id, "prebuild was interrupted; marking it failed");
                self.store
                    .prebuild_failed(&p.id, "the manager stopped during the build")
                    .await?;
            }
        }
        for e in std::fs::read_dir(self.prebuilds_dir())
            .into_iter()
            .flatten()
            .flatten()
        {
            let name = e.file_name().to_string_lossy().into_owned();
            let path = e.path().display().to_string();
            if self.journal.has_locator(&path).await? {
                continue;
            }
            // Journaled builds were reclaimed before this runs: a build directory
            // here is one nobody journaled (left by an older manager).
            if let Some(id) = name.strip_prefix(".build-") {
                tracing::warn!(path = %path, "removing an unjournaled prebuild build");
                crate::vms::kill_vmms(&path).await;
                self.keep_prebuild_log(id, &e.path());
                let _ = std::fs::remove_dir_all(e.path());
            } else if self.store.prebuild(&name).await?.is_none() {
                tracing::warn!(path = %path, "removing unknown prebuild directory");
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
        Ok(())
    }

    /// Moves a build's log to where a failed prebuild keeps it.
    pub(crate) fn keep_prebuild_log(&self, id: &str, build: &Path) {
        let failed = self.prebuilds_dir().join(id);
        let _ = std::fs::create_dir_all(&failed);
        let _ = std::fs::rename(build.join(BUILD_LOG), failed.join(BUILD_LOG));
    }
}

/// Extends a raw disk file to `bytes` when it is smaller; true when it grew.
fn grow(path: &Path, bytes: u64) -> Result<bool, Error> {
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(|e| Error::internal(format!("{}: {e}", path.display())))?;
    let len = f
        .metadata()
        .map_err(|e| Error::internal(e.to_string()))?
        .len();
    if len >= bytes {
        return Ok(false);
    }
    f.set_len(bytes)
        .map_err(|e| Error::internal(format!("cannot grow {}: {e}", path.display())))?;
    Ok(true)
}

/// Quotes a value for a POSIX shell (`'...'`).
fn shell_quote(v: &str) -> String {
    format!("'{}'", v.replace('\'', "'\\''"))
}

impl Manager {
    /// The workspace's secret environment (`VAR` -> value), decrypted.
    pub(crate) async fn secret_env(
        &self,
        spec: &WorkspaceSpec,
    ) -> Result<Vec<(String, String)>, Error> {
        let mut env = Vec::new();
        for (var, r) in &spec.secrets.env {
            let v = self.secret_value(&r.secret).await?;
            let v = String::from_utf8(v.to_vec()).map_err(|_| {
                Error::invalid(format!(
                    "secret {} is not UTF-8 text, so it cannot be the value of {var}; use secrets.files",
                    r.secret
                ))
            })?;
            env.push((var.clone(), v));
        }
        Ok(env)
    }

    /// After a sandbox of a workspace is up: its secrets (never in the prebuild),
    /// the latest commits of each repo, and its dev commands.
    pub(crate) async fn finish_workspace_spawn(
        &self,
        rec: &atelier_store::SandboxRecord,
        agent: &AgentClient,
        spec: &WorkspaceSpec,
        opencode: Option<&atelier_store::OpenCodeServer>,
        restored: bool,
    ) -> Result<(), Error> {
        let env = self.secret_env(spec).await?;
        if !env.is_empty() {
            let mut text =
                String::from("# Written by Atelier at spawn: the workspace's secrets.\n");
            for (k, v) in &env {
                text.push_str(&format!("export {k}={}\n", shell_quote(v)));
            }
            crate::templates::exec_ok(agent, &["mkdir", "-p", "/etc/atelier", "/etc/profile.d"])
                .await?;
            agent
                .write_file("/etc/atelier/secrets.env", 0o600, text.as_bytes())
                .await
                .map_err(Manager::agent_error)?;
            agent
                .write_file(
                    "/etc/profile.d/atelier-secrets.sh",
                    0o644,
                    &b"[ -r /etc/atelier/secrets.env ] && . /etc/atelier/secrets.env\n"[..],
                )
                .await
                .map_err(Manager::agent_error)?;
        }
        for f in &spec.secrets.files {
            let value = self.secret_value(&f.secret).await?;
            let mode = u32::from_str_radix(f.mode.trim_start_matches('0'), 8).unwrap_or(0o600);
            crate::templates::exec_ok(
                agent,
                &[
                    "sh",
                    "-c",
                    "mkdir -p \"$(dirname \"$1\")\"",
                    "mkdir",
                    &f.path,
                ],
            )
            .await?;
            agent
                .write_file(&f.path, mode, &value[..])
                .await
                .map_err(Manager::agent_error)?;
        }
        let mut store_lines = String::new();
        for r in spec.repos.iter().filter(|r| r.credentials.is_some()) {
            if let (Some(secret), Some(rest)) = (
                &r.credentials,
                r.url
                    .strip_prefix("https://")
                    .map(|x| ("https", x))
                    .or_else(|| r.url.strip_prefix("http://").map(|x| ("http", x))),
            ) {
                let token = self.secret_value(secret).await?;
                let (user, pass) = basic_parts(&token);
                let authority = rest.1.split('/').next().unwrap_or("");
                store_lines.push_str(&format!(
                    "{}://{}:{}@{}\n",
                    rest.0,
                    pct(&user),
                    pct(&pass),
                    authority
                ));
            }
        }
        if !store_lines.is_empty() {
            crate::templates::exec_ok(agent, &["mkdir", "-p", "/etc/atelier"]).await?;
            agent
                .write_file(
                    "/etc/atelier/git-credentials",
                    0o600,
                    store_lines.as_bytes(),
                )
                .await
                .map_err(Manager::agent_error)?;
            for r in spec.repos.iter().filter(|r| r.credentials.is_some()) {
                crate::templates::exec_ok(
                    agent,
                    &[
                        "git",
                        "-C",
                        &r.path,
                        "config",
                        "credential.helper",
                        "store --file /etc/atelier/git-credentials",
                    ],
                )
                .await?;
            }
        }
        for r in &spec.repos {
            let out = agent
                .exec(
                    ExecRequest::new([
                        "git",
                        "-C",
                        r.path.as_str(),
                        "pull",
                        "--ff-only",
                        "--quiet",
                    ])
                    .timeout(Duration::from_secs(300)),
                )
                .await
                .map_err(Manager::agent_error)?
                .wait()
                .await
                .map_err(Manager::agent_error)?;
            if !out.success() {
                tracing::warn!(sandbox = %rec.id, repo = %r.path, stderr = %String::from_utf8_lossy(&out.stderr).trim(), "git pull after spawn failed; the sandbox has the prebuild's commit");
            }
        }
        for d in &spec.dev {
            let stored = atelier_agent_proto::DevSpec {
                name: d.name.clone(),
                command: d.command.clone(),
                cwd: d.cwd.clone(),
                env: d.env.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
                port: d.port,
                restart: atelier_agent_proto::RestartPolicy::OnFailure,
            };
            let json =
                serde_json::to_string(&stored).map_err(|e| Error::internal(e.to_string()))?;
            // Stored without the secrets; they are added each time it starts.
            self.store.put_dev_command(&rec.id, &d.name, &json).await?;
            let mut run = stored;
            run.env.extend(env.iter().cloned());
            agent.dev_start(run).await.map_err(Manager::agent_error)?;
        }
        if let Some(oc) = opencode {
            // Restored, it is running already; stored like a dev command so an
            // agent restart starts it again. Booted cold (the snapshot could not be
            // restored), it starts here, cold.
            let server = crate::opencode::dev_spec(&oc.password, &oc.directory);
            let json =
                serde_json::to_string(&server).map_err(|e| Error::internal(e.to_string()))?;
            self.store
                .put_dev_command(&rec.id, &server.name, &json)
                .await?;
            self.store.set_sandbox_opencode(&rec.id, oc).await?;
            if !restored {
                agent
                    .dev_start(server)
                    .await
                    .map_err(Manager::agent_error)?;
            }
            self.inject_opencode_keys(&rec.name, agent, oc, spec, restored)
                .await?;
        }
        Ok(())
    }

    /// A stored dev spec with the secret environment of the sandbox's workspace.
    pub(crate) async fn with_workspace_secrets(
        &self,
        id: &atelier_core::SandboxId,
        mut spec: atelier_agent_proto::DevSpec,
    ) -> atelier_agent_proto::DevSpec {
        if let Ok(Some(w)) = self.store.sandbox_workspace(id).await
            && let Ok((_, ws)) = self.load_workspace(&w).await
        {
            match self.secret_env(&ws).await {
                Ok(env) => spec.env.extend(env),
                Err(e) => {
                    tracing::warn!(sandbox = %id, error = %e.message, "dev command starts without its secrets")
                }
            }
        }
        spec
    }

    /// Once per interval: a workspace whose newest ready prebuild is stale (older
    /// revision, or a repo's branch moved on, seen with `git ls-remote` from the
    /// host) gets a new build; superseded prebuilds no sandbox uses are removed.
    pub(crate) fn spawn_prebuild_checker(self: &Arc<Self>) {
        let me = Arc::clone(self);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(me.cfg.prebuild_check_interval).await;
                if let Err(e) = me.check_prebuilds().await {
                    tracing::warn!(error = %e.message, "prebuild check failed");
                }
            }
        });
    }

    pub(crate) async fn check_prebuilds(self: &Arc<Self>) -> Result<(), Error> {
        for w in self.store.list_workspaces().await? {
            let all = self.prebuild_list(Some(&w.name)).await?;
            if all
                .iter()
                .any(|(p, _)| p.status == atelier_core::PrebuildStatus::Building)
            {
                continue;
            }
            let Some((newest, mut stale)) = all
                .iter()
                .find(|(p, _)| p.status == atelier_core::PrebuildStatus::Ready)
                .cloned()
            else {
                continue;
            };
            if !stale {
                let (_, spec) = self.load_workspace(&w.name).await?;
                let commits: BTreeMap<String, String> =
                    serde_json::from_str(&newest.commits).unwrap_or_default();
                for r in &spec.repos {
                    let secret = match &r.credentials {
                        Some(name) => match self.secret_value(name).await {
                            Ok(v) => Some(v),
                            Err(e) => {
                                tracing::warn!(workspace = %w.name, repo = %r.url, error = %e.message, "cannot read the repository's credentials; not checked");
                                continue;
                            }
                        },
                        None => None,
                    };
                    match ls_remote(&r.url, &r.branch, secret.as_ref().map(|s| s.as_slice())).await
                    {
                        Ok(head) if commits.get(&r.path) != Some(&head) => {
                            tracing::info!(workspace = %w.name, repo = %r.url, "branch moved on; prebuild is stale");
                            self.store.set_prebuild_stale(&newest.id).await?;
                            stale = true;
                            break;
                        }
                        Ok(_) => {}
                        Err(e) => {
                            tracing::warn!(workspace = %w.name, repo = %r.url, error = %e, "git ls-remote failed")
                        }
                    }
                }
            }
            if stale {
                tracing::info!(workspace = %w.name, "rebuilding stale prebuild");
                self.prebuild_create(&w.name).await?;
            }
            self.collect_prebuilds(&w.name).await?;
        }
        Ok(())
    }

    /// Removes ready prebuilds older than the newest ready one that no sandbox's
    /// memory is mapped from, and failed ones older than the newest ready one.
    async fn collect_prebuilds(&self, workspace: &str) -> Result<(), Error> {
        let list = self.store.prebuilds(Some(workspace)).await?;
        let Some(pos) = list
            .iter()
            .position(|p| p.status == atelier_core::PrebuildStatus::Ready)
        else {
            return Ok(());
        };
        self.remove_prebuilds(&list[pos + 1..]).await
    }

    /// After a workspace is deleted: its prebuilds that no sandbox maps.
    pub(crate) async fn remove_unused_prebuilds(&self, workspace: &str) -> Result<(), Error> {
        let list = self.store.prebuilds(Some(workspace)).await?;
        self.remove_prebuilds(&list).await
    }

    async fn remove_prebuilds(&self, list: &[PrebuildRecord]) -> Result<(), Error> {
        let mut in_use = std::collections::HashSet::new();
        for e in std::fs::read_dir(self.cfg.sandboxes_dir())
            .into_iter()
            .flatten()
            .flatten()
        {
            if let Ok(t) = std::fs::read_to_string(e.path().join("vm-memory")) {
                in_use.insert(t.trim().to_owned());
            }
        }
        for old in list {
            let dir = self.prebuilds_dir().join(&old.id);
            let mem = dir.join("mem").display().to_string();
            if old.status == atelier_core::PrebuildStatus::Building || in_use.contains(&mem) {
                continue;
            }
            tracing::info!(prebuild = %old.id, "removing superseded prebuild");
            let _ = std::fs::remove_dir_all(&dir);
            self.store.delete_prebuild(&old.id).await?;
        }
        Ok(())
    }
}

/// The commit a branch points at, asked from the host with the repository's
/// credential (if it has one) as an HTTP header, like fetches and pushes.
async fn ls_remote(url: &str, branch: &str, secret: Option<&[u8]>) -> Result<String, String> {
    let header = secret.map(basic_auth_header);
    let out = tokio::time::timeout(
        Duration::from_secs(60),
        host_git(header.as_deref())
            .args(["ls-remote", "--", url, &format!("refs/heads/{branch}")])
            .output(),
    )
    .await
    .map_err(|_| "timed out".to_owned())?
    .map_err(|e| format!("cannot run git: {e}"))?;
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).trim().to_owned());
    }
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .map(str::to_owned)
        .ok_or_else(|| format!("no branch {branch}"))
}

/// `user:password` from a credential secret; a bare token becomes the password of
/// user `x-access-token` (what GitHub and most forges accept).
fn basic_parts(secret: &[u8]) -> (String, String) {
    let text = String::from_utf8_lossy(secret).trim().to_owned();
    match text.split_once(':') {
        Some((u, p)) => (u.to_owned(), p.to_owned()),
        None => ("x-access-token".to_owned(), text),
    }
}

/// Percent-encodes a URL userinfo part (everything but RFC 3986 unreserved).
fn pct(s: &str) -> String {
    const USERINFO_KEEP: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
        .remove(b'-')
        .remove(b'_')
        .remove(b'.')
        .remove(b'~');
    percent_encoding::utf8_percent_encode(s, USERINFO_KEEP).to_string()
}

/// `Authorization: Basic …` for a credential secret (see [`basic_parts`]).
fn basic_auth_header(secret: &[u8]) -> String {
    use base64::Engine;
    let (user, pass) = basic_parts(secret);
    format!(
        "Authorization: Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"))
    )
}

/// `git` on the host: never prompts, stdin closed, killed when dropped. With
/// `header` (a credential), git sends it on every HTTP request it makes, so it must
/// not follow a redirect (to another host, or a downgrade) with it: a redirect
/// fails the command instead.
fn host_git(header: Option<&str>) -> tokio::process::Command {
    let mut c = tokio::process::Command::new("git");
    c.env("GIT_TERMINAL_PROMPT", "0")
        .kill_on_drop(true)
        .stdin(std::process::Stdio::null());
    if let Some(h) = header {
        c.env("GIT_CONFIG_COUNT", "2")
            .env("GIT_CONFIG_KEY_0", "http.extraHeader")
            .env("GIT_CONFIG_VALUE_0", h)
            .env("GIT_CONFIG_KEY_1", "http.followRedirects")
            .env("GIT_CONFIG_VALUE_1", "false");
    }
    c
}

/// Fetches `branch` of `url` on the host with the credential (sent as an HTTP
/// header through git's environment, never on a command line or in a file) and
/// returns a bundle of it in `dir`.
async fn fetch_bundle(
    url: &str,
    branch: &str,
    secret: &[u8],
    dir: &Path,
) -> Result<PathBuf, Error> {
    let header = basic_auth_header(secret);
    let mirror = dir.join("fetch.git");
    let _ = std::fs::remove_dir_all(&mirror);
    let git = |args: Vec<String>, with_auth: bool| {
        let mut c = host_git(with_auth.then_some(header.as_str()));
        c.args(&args);
        c
    };
    let out = tokio::time::timeout(
        Duration::from_secs(1800),
        git(
            vec![
                "clone".into(),
                "--quiet".into(),
                "--bare".into(),
                "--single-branch".into(),
                "--branch".into(),
                branch.into(),
                "--".into(),
                url.into(),
                mirror.display().to_string(),
            ],
            true,
        )
        .output(),
    )
    .await
    .map_err(|_| Error::unavailable(format!("fetching {url} timed out")))?
    .map_err(|e| Error::internal(format!("cannot run git: {e}")))?;
    if !out.status.success() {
        let _ = std::fs::remove_dir_all(&mirror);
        return Err(Error::invalid(format!(
            "fetching {url} ({branch}) with its credentials failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    let bundle = dir.join("repo.bundle");
    let out = git(
        vec![
            "-C".into(),
            mirror.display().to_string(),
            "bundle".into(),
            "create".into(),
            "--quiet".into(),
            bundle.display().to_string(),
            "--all".into(),
        ],
        false,
    )
    .output()
    .await
    .map_err(|e| Error::internal(format!("cannot run git: {e}")))?;
    let _ = std::fs::remove_dir_all(&mirror);
    if !out.status.success() {
        return Err(Error::internal(format!(
            "bundling {url}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(bundle)
}

/// Pushes `branch` from the git bundle `bundle` to `url` from the host, with the
/// credential (if any) sent as a header through git's environment (never on a
/// command line or in a file) and no redirect followed. `force` replaces the remote
/// branch (a retried task's branch). Works in a scratch repository under `dir`,
/// removed after.
pub(crate) async fn push_bundle(
    url: &str,
    branch: &str,
    secret: Option<&[u8]>,
    bundle: &Path,
    dir: &Path,
) -> Result<(), Error> {
    let scratch = dir.join("push.git");
    let _ = std::fs::remove_dir_all(&scratch);
    let header = secret.map(basic_auth_header);
    let run = |args: Vec<String>, with_auth: bool| {
        let mut c = host_git(header.as_deref().filter(|_| with_auth));
        c.args(&args);
        async move {
            let out = match tokio::time::timeout(Duration::from_secs(900), c.output()).await {
                Err(_) => return Err(Error::unavailable(format!("git {} timed out", args[0]))),
                Ok(Err(e)) => return Err(Error::internal(format!("cannot run git: {e}"))),
                Ok(Ok(out)) => out,
            };
            Ok(if out.status.success() {
                Ok(())
            } else {
                Err(String::from_utf8_lossy(&out.stderr).trim().to_owned())
            })
        }
    };
    let s = scratch.display().to_string();
    let result = async {
        run(
            vec!["init".into(), "--quiet".into(), "--bare".into(), s.clone()],
            false,
        )
        .await?
        .map_err(|e| Error::internal(format!("git init: {e}")))?;
        run(
            vec![
                "-C".into(),
                s.clone(),
                "fetch".into(),
                "--quiet".into(),
                bundle.display().to_string(),
                format!("refs/heads/{branch}:refs/heads/{branch}"),
            ],
            false,
        )
        .await?
        .map_err(|e| Error::internal(format!("reading the task's bundle: {e}")))?;
        run(
            vec![
                "-C".into(),
                s.clone(),
                "push".into(),
                "--quiet".into(),
                "--force".into(),
                "--".into(),
                url.into(),
                format!("refs/heads/{branch}:refs/heads/{branch}"),
            ],
            true,
        )
        .await?
        .map_err(|e| Error::unavailable(format!("pushing {branch} to {url} failed: {e}")))
    }
    .await;
    let _ = std::fs::remove_dir_all(&scratch);
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A redirecting server on one port and a server recording what it is sent on
    /// another, both on loopback.
    const REDIRECT_AND_RECORD: &str = r#"
import http.server, sys, threading
redir, coll, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
class R(http.server.BaseHTTPRequestHandler):
    def log_message(self, *a): pass
    def do_GET(self):
        self.send_response(301)
        self.send_header("Location", f"http://127.0.0.1:{coll}{self.path}")
        self.send_header("Content-Length", "0")
        self.end_headers()
class C(http.server.BaseHTTPRequestHandler):
    def log_message(self, *a): pass
    def do_GET(self):
        with open(out, "a") as f:
            f.write(f"{self.path} {self.headers.get('Authorization')}\n")
        self.send_response(404)
        self.send_header("Content-Length", "0")
        self.end_headers()
c = http.server.ThreadingHTTPServer(("127.0.0.1", coll), C)
threading.Thread(target=c.serve_forever, daemon=True).start()
http.server.ThreadingHTTPServer(("127.0.0.1", redir), R).serve_forever()
"#;

    fn free_port() -> u16 {
        std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("a free port")
    }

    /// The redirecting server (first port) and the recorder (second port, writes
    /// what it was sent to `record`), both answering.
    async fn start_recorder(record: &std::path::Path) -> (tokio::process::Child, u16, u16) {
        let (redir, coll) = (free_port(), free_port());
        let servers = tokio::process::Command::new("python3")
            .args(["-c", REDIRECT_AND_RECORD])
            .arg(redir.to_string())
            .arg(coll.to_string())
            .arg(record)
            .kill_on_drop(true)
            .spawn()
            .expect("python3");
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while tokio::net::TcpStream::connect(("127.0.0.1", redir))
            .await
            .is_err()
            || tokio::net::TcpStream::connect(("127.0.0.1", coll))
                .await
                .is_err()
        {
            assert!(
                std::time::Instant::now() < deadline,
                "test servers did not start"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        (servers, redir, coll)
    }

    #[tokio::test]
    async fn ls_remote_sends_the_credentials_as_a_header() {
        let dir = tempfile::tempdir().expect("tempdir");
        let record = dir.path().join("seen.txt");
        let (mut servers, _, coll) = start_recorder(&record).await;
        let url = format!("http://127.0.0.1:{coll}/demo.git");
        // The recorder answers 404: the call fails, after sending its header.
        let r = ls_remote(&url, "main", Some(b"bot:s3cret-token")).await;
        let _ = servers.kill().await;
        assert!(r.is_err(), "{r:?}");
        let seen = std::fs::read_to_string(&record).unwrap_or_default();
        assert!(
            seen.contains(&basic_auth_header(b"bot:s3cret-token")["Authorization: ".len()..]),
            "ls-remote did not send the credentials: {seen}"
        );
    }

    #[tokio::test]
    async fn credentials_are_not_sent_along_a_redirect() {
        let dir = tempfile::tempdir().expect("tempdir");
        let record = dir.path().join("seen.txt");
        let (mut servers, redir, _) = start_recorder(&record).await;
        let url = format!("http://127.0.0.1:{redir}/demo.git");
        let fetched = fetch_bundle(&url, "main", b"bot:s3cret-token", dir.path()).await;
        let _ = servers.kill().await;
        assert!(fetched.is_err(), "a redirected fetch must fail");
        let seen = std::fs::read_to_string(&record).unwrap_or_default();
        assert!(
            !seen.contains("Basic"),
            "the credentials followed the redirect: {seen}"
        );
    }
}
