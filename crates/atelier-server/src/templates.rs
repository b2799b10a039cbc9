//! Memory-snapshot templates: one booted, idle VM per (image, memory, vCPUs,
//! accelerator) whose RAM lives in a file, saved with `x-ignore-shared` (device
//! state only, a few KB) next to a reflink copy of its disk. Sandboxes are then
//! spawned by restoring it: RAM mapped private copy-on-write from the file, the disk
//! a reflink clone, and the guest's identity fixed (hostname, machine-id, clock,
//! CRNG reseed). Restore costs tens of milliseconds instead of a boot, and clones
//! share their unchanged memory through the page cache.
//!
//! A template is built in `pool/templates/.build-<key>/` and renamed into place when
//! complete. The build journals its directory, VMM and TAP (owner
//! `template:<key>`) before making them, so the start-up reconcile reclaims what a
//! crash left. Only the reflink backend makes templates
//! (a clone of the template disk must be O(1)); with mounts the device model
//! differs from the template's, so such sandboxes boot cold.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use atelier_agent_proto::{AgentClient, ExecRequest};
use atelier_core::SandboxId;
use atelier_store::SandboxRecord;
use atelier_vmm::{Accel, Incoming, MemoryBacking, VmConfig, VmProcess};

use crate::Error;
use crate::journal::{Owner, ResourceKind};
use crate::manager::Manager;

/// A finished template.
#[derive(Debug, Clone)]
pub(crate) struct Template {
    /// RAM image (the template VM's memory-backend file).
    pub mem: PathBuf,
    /// Device state saved with `x-ignore-shared`.
    pub state: PathBuf,
    /// Disk at the moment of the snapshot.
    pub disk: PathBuf,
}

impl Template {
    pub(crate) fn at(dir: &Path) -> Template {
        Template {
            mem: dir.join("mem"),
            state: dir.join("state"),
            disk: dir.join("disk.img"),
        }
    }
}

/// The template key for an image and a sandbox's shape.
pub(crate) fn key(
    image: &atelier_image::Image,
    memory_mib: u32,
    vcpus: u32,
    accel: Accel,
) -> String {
    // `n1`: the device model includes a network card (templates made without
    // one cannot be restored with one).
    format!(
        "{}-{}m-{}c-{}-n1",
        image.manifest.hash,
        memory_mib,
        vcpus,
        accel.as_str()
    )
}

/// Keys of the templates being built, owned by the template builder.
#[derive(Debug, Default)]
pub(crate) struct Builds(std::sync::Mutex<std::collections::HashSet<String>>);

impl Manager {
    pub(crate) fn building_templates(
        &self,
    ) -> std::sync::MutexGuard<'_, std::collections::HashSet<String>> {
        crate::manager::lock_map(&self.templates.0)
    }

    pub(crate) fn templates_dir(&self) -> PathBuf {
        self.pool.root().join("templates")
    }

    /// The finished template for `key`, if any.
    /// Keys of the finished templates.
    pub fn template_keys(&self) -> Vec<String> {
        let mut keys: Vec<String> = std::fs::read_dir(self.templates_dir())
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
            .filter(|e| e.path().join("ready").exists())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        keys.sort();
        keys
    }

    pub(crate) fn template(&self, key: &str) -> Option<Template> {
        let dir = self.templates_dir().join(key);
        dir.join("ready").exists().then(|| Template::at(&dir))
    }

    /// Starts building the template for `key` in the background unless it exists or
    /// is being built.
    pub(crate) fn ensure_template(
        self: &Arc<Self>,
        image: &atelier_image::Image,
        rec: &SandboxRecord,
        accel: Accel,
    ) {
        let key = key(image, rec.memory_mib, rec.vcpus, accel);
        if self.pool.backend() != atelier_storage::Backend::Reflink || self.template(&key).is_some()
        {
            return;
        }
        if !self.building_templates().insert(key.clone()) {
            return;
        }
        let me = Arc::clone(self);
        let image = image.clone();
        let (mem, vcpus) = (rec.memory_mib, rec.vcpus);
        tokio::spawn(async move {
            let started = std::time::Instant::now();
            match me.build_template(&image, &key, mem, vcpus, accel).await {
                Ok(()) => {
                    tracing::info!(template = %key, ms = started.elapsed().as_millis() as u64, "memory snapshot template ready")
                }
                Err(e) => {
                    tracing::warn!(template = %key, error = %e, "building the memory snapshot template failed; sandboxes boot cold")
                }
            }
            me.building_templates().remove(&key);
        });
    }

    async fn build_template(
        self: &Arc<Self>,
        image: &atelier_image::Image,
        key: &str,
        memory_mib: u32,
        vcpus: u32,
        accel: Accel,
    ) -> Result<(), Error> {
        let build = self.templates_dir().join(format!(".build-{key}"));
        let owner = Owner::Template(key.to_owned());
        self.journal
            .record(
                owner.clone(),
                ResourceKind::Dir,
                build.display().to_string(),
            )
            .await?;
        let _ = std::fs::remove_dir_all(&build);
        let made = std::fs::create_dir_all(&build)
            .map_err(|e| Error::internal(format!("cannot create {}: {e}", build.display())));
        let result = match made {
            Ok(()) => {
                self.build_template_in(&owner, &build, image, memory_mib, vcpus, accel)
                    .await
            }
            Err(e) => Err(e),
        };
        if result.is_err() {
            if let Err(e) = self.journal.reclaim_all(owner).await {
                tracing::error!(template = %key, error = %e, "reclaiming a failed template build");
            }
            return result;
        }
        let dest = self.templates_dir().join(key);
        std::fs::rename(&build, &dest).map_err(|e| {
            Error::internal(format!("cannot move template into {}: {e}", dest.display()))
        })?;
        // The directory is a finished template now, no longer the build's.
        self.journal.release(owner).await
    }

    async fn build_template_in(
        self: &Arc<Self>,
        owner: &Owner,
        build: &Path,
        image: &atelier_image::Image,
        memory_mib: u32,
        vcpus: u32,
        accel: Accel,
    ) -> Result<(), Error> {
        let t = Template::at(build);
        let running_disk = build.join("running.img");
        let pool = self.pool.clone();
        let (rootfs, hash, d) = (
            image.rootfs(),
            image.manifest.hash.clone(),
            running_disk.clone(),
        );
        tokio::task::spawn_blocking(move || {
            let base = pool.import_base(&rootfs, &hash)?;
            pool.clone_disk(&base, &d)
        })
        .await
        .map_err(|e| Error::internal(e.to_string()))??;
        let mut cfg = self.vm_config(
            "template",
            build,
            image,
            "atelier",
            &running_disk,
            memory_mib,
            vcpus,
            accel,
        );
        cfg.memory = MemoryBacking::SharedFile(t.mem.clone());
        if self.net.is_some() {
            // Same device model as the sandboxes restored from it; the TAP stays off
            // the bridge (the template never talks), named per build directory so
            // two managers on one host never collide.
            let tag = {
                use sha2::Digest;
                hex::encode(sha2::Sha256::digest(build.display().to_string().as_bytes()))
            };
            let tap = format!("atlt{}", &tag[..11]);
            self.journal
                .record(owner.clone(), ResourceKind::Tap, &tap)
                .await?;
            cfg.nic = Some(atelier_vmm::Nic {
                tap,
                mac: [0x02, 0xa7, 0, 0, 0, 1],
            });
        }
        self.journal
            .record(
                owner.clone(),
                ResourceKind::Process,
                build.display().to_string(),
            )
            .await?;
        let vm = self.vms.launch(&cfg).await?;
        crate::fault::point("template-after-launch").await;
        let agent = crate::vms::boot_agent(&vm, accel, "template", self.cfg.agent_timeout).await?;
        self.freeze(&vm, agent, &t.state, &running_disk, &t.disk)
            .await?;
        std::fs::write(build.join("ready"), b"")
            .map_err(|e| Error::internal(format!("cannot mark template ready: {e}")))?;
        Ok(())
    }

    /// Restores sandbox `id` from `t` (its disk already cloned from `t.disk`) and
    /// gives it its own identity. Returns the VM and its agent.
    pub(crate) async fn restore_from_template(
        self: &Arc<Self>,
        id: &SandboxId,
        rec: &SandboxRecord,
        t: &Template,
        mut cfg: VmConfig,
    ) -> Result<(VmProcess, AgentClient), Error> {
        cfg.memory = MemoryBacking::PrivateFile(t.mem.clone());
        cfg.incoming = Some(Incoming {
            path: t.state.clone(),
            ignore_shared: true,
        });
        let (vm, agent) = self
            .launch_restored(id, &cfg, Duration::from_secs(15), "restored")
            .await?;
        tracing::debug!(sandbox = %id, name = %rec.name, "restored from memory snapshot");
        Ok((vm, agent))
    }
}

impl Manager {
    /// Freezes a booted VM whose RAM is a shared file (templates, prebuilds): the
    /// guest flushes its dirty pages, the device state goes to `state`
    /// (`x-ignore-shared`: the RAM file is the memory image), `running` is
    /// reflinked to `disk` at the same instant, then the VM stops and `running`
    /// is removed.
    pub(crate) async fn freeze(
        &self,
        vm: &VmProcess,
        agent: AgentClient,
        state: &Path,
        running: &Path,
        disk: &Path,
    ) -> Result<(), Error> {
        exec_ok(&agent, &["sh", "-c", "sync"]).await?;
        drop(agent);
        atelier_vmm::save_state(vm, state).await?;
        let pool = self.pool.clone();
        let (src, dst) = (running.to_owned(), disk.to_owned());
        tokio::task::spawn_blocking(move || pool.clone_disk(&src, &dst))
            .await
            .map_err(|e| Error::internal(e.to_string()))??;
        let _ = vm
            .qmp()
            .execute_timeout("quit", None, Duration::from_secs(5))
            .await;
        if !vm.wait_exit(Duration::from_secs(10)).await {
            vm.kill().await?;
        }
        let _ = std::fs::remove_file(running);
        Ok(())
    }
}

/// A fresh machine-id (32 hex digits).
pub(crate) fn new_machine_id() -> String {
    use rand::RngCore;
    let mut b = [0u8; 16];
    rand::rng().fill_bytes(&mut b);
    hex::encode(b)
}

/// Gives a guest restored from someone else's memory its own identity: the clock
/// (SetTime, which also reseeds the guest CRNG), a fresh machine-id, and the
/// hostname — unless `hostname_via_net`, when the network configuration that
/// follows sets it (saving a process spawn in the guest on every restore).
pub(crate) async fn fix_identity(
    agent: &AgentClient,
    hostname: &str,
    hostname_via_net: bool,
) -> Result<(), Error> {
    let machine_id = format!("{}\n", new_machine_id());
    let clock = async {
        agent
            .set_time(SystemTime::now())
            .await
            .map_err(Manager::agent_error)
    };
    let id = async {
        agent
            .write_file("/etc/machine-id", 0o444, machine_id.as_bytes())
            .await
            .map(|_| ())
            .map_err(Manager::agent_error)
    };
    tokio::try_join!(clock, id)?;
    if hostname_via_net {
        return Ok(());
    }
    exec_ok(
        agent,
        &[
            "sh",
            "-c",
            "hostname \"$1\" && echo \"$1\" > /etc/hostname",
            "identity",
            hostname,
        ],
    )
    .await
}

/// Most of each output stream [`run_to_end`] keeps (its tail).
pub(crate) const RUN_TO_END_OUTPUT_MAX: usize = 16 << 20;

/// Runs a command in the guest to its end. The guest kills it at the request's
/// timeout (an hour when it has none); the host gives up that long plus the agent
/// timeout after starting it. Each output stream keeps at most its last
/// [`RUN_TO_END_OUTPUT_MAX`] bytes.
pub(crate) async fn run_to_end(
    agent: &AgentClient,
    req: ExecRequest,
) -> Result<atelier_agent_proto::ExecOutput, Error> {
    let req = match req.timeout_ms {
        Some(_) => req,
        None => req.timeout(Duration::from_secs(3600)),
    };
    let host_limit = Duration::from_millis(req.timeout_ms.unwrap_or(0)) + agent.timeout();
    // A bounded tail of each stream: a guest cannot grow the manager's memory.
    let run = async {
        agent
            .exec(req)
            .await?
            .wait_tail(RUN_TO_END_OUTPUT_MAX)
            .await
    };
    tokio::time::timeout(host_limit, run)
        .await
        .unwrap_or(Err(atelier_agent_proto::ProtoError::Timeout {
            op: "exec",
            after: host_limit,
        }))
        .map_err(Manager::agent_error)
}

/// Runs a command in the guest and fails with its stderr unless it exits 0. The
/// agent kills it after 60 s; the host gives up on a guest that does not report
/// that in time either.
pub(crate) async fn exec_ok(agent: &AgentClient, argv: &[&str]) -> Result<(), Error> {
    const LIMIT: Duration = Duration::from_secs(60);
    let out = run_to_end(agent, ExecRequest::new(argv.iter().copied()).timeout(LIMIT)).await?;
    if !out.success() {
        return Err(Error::internal(format!(
            "{argv:?} failed in the guest: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}
