//! The QEMU backend: `qemu-system-x86_64 -M microvm` with virtio-mmio devices, no
//! default devices, seccomp sandboxing, the guest console in a file, QMP and the
//! agent's virtio-serial port on unix sockets inside the run directory.

use std::fs;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::process::Command;
use tokio::sync::watch;

use crate::process::{VmProcess, pid_matches, read_pidfile, watch_foreign};
use crate::qmp::{DEFAULT_QMP_TIMEOUT, Qmp};
use crate::{Accel, Hypervisor, MemoryBacking, RunPaths, VmConfig, VmmError};

/// The name of the virtio-serial port the guest agent opens.
pub const AGENT_PORT_NAME: &str = "org.atelier.agent.0";

/// How long QEMU may take to open its QMP socket.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(15);

/// The QEMU backend.
#[derive(Debug, Clone)]
pub struct Qemu {
    binary: PathBuf,
    qmp_timeout: Duration,
}

impl Default for Qemu {
    fn default() -> Self {
        Qemu::new("qemu-system-x86_64")
    }
}

impl Qemu {
    /// A backend using `binary`.
    pub fn new(binary: impl Into<PathBuf>) -> Self {
        Qemu {
            binary: binary.into(),
            qmp_timeout: DEFAULT_QMP_TIMEOUT,
        }
    }

    /// Sets the default deadline of every QMP command of the VMs this backend
    /// launches or adopts (default [`DEFAULT_QMP_TIMEOUT`]).
    pub fn with_qmp_timeout(mut self, timeout: Duration) -> Self {
        self.qmp_timeout = timeout;
        self
    }

    /// The binary's version line, e.g. `QEMU emulator version 10.0.2 (...)`.
    pub async fn version(&self) -> Result<String, VmmError> {
        let out = Command::new(&self.binary)
            .arg("--version")
            .output()
            .await
            .map_err(|e| self.missing(e))?;
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .next()
            .unwrap_or("")
            .to_owned())
    }

    fn missing(&self, e: std::io::Error) -> VmmError {
        VmmError::BinaryMissing {
            binary: self.binary.display().to_string(),
            detail: e.to_string(),
        }
    }

    /// The memory QEMU is given for a guest of `requested` MiB. QEMU 10's microvm
    /// with ACPI and exactly 2048 MiB stops before the kernel's first console line
    /// ("Guest says index … is available" from virtio-blk); 2047, 1536, 3072 and
    /// 4096 boot. So a 2048 MiB guest gets 2047 MiB.
    pub fn effective_memory_mib(requested: u32) -> u32 {
        if requested == 2048 { 2047 } else { requested }
    }

    /// The full argument list for `cfg` (without the binary).
    pub fn args(cfg: &VmConfig) -> Vec<String> {
        let memory_mib = Qemu::effective_memory_mib(cfg.memory_mib);
        let p = RunPaths::new(&cfg.run_dir);
        let s = |p: &Path| p.display().to_string();
        let accel = match cfg.accel {
            Accel::Kvm => "kvm".to_owned(),
            // Multi-threaded TCG; a smaller translation cache saves ~36 MiB per VM.
            Accel::Tcg => "tcg,thread=multi,tb-size=64".to_owned(),
        };
        let cpu = match cfg.accel {
            Accel::Kvm => "host",
            Accel::Tcg => "max",
        };
        let mut a: Vec<String> = vec![
            "-name".into(),
            format!("atelier-{},debug-threads=on", cfg.name),
            "-M".into(),
            match cfg.memory {
                MemoryBacking::Anonymous => "microvm,rtc=on".into(),
                _ => "microvm,rtc=on,memory-backend=mem".into(),
            },
            "-accel".into(),
            accel,
            "-cpu".into(),
            cpu.into(),
            "-smp".into(),
            cfg.vcpus.to_string(),
            "-m".into(),
            format!("{memory_mib}M"),
            "-nodefaults".into(),
            "-no-user-config".into(),
            "-display".into(),
            "none".into(),
            "-no-reboot".into(),
            "-sandbox".into(),
            "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny".into(),
            "-chardev".into(),
            format!("file,id=console,path={},append=on", s(&p.console)),
            "-serial".into(),
            "chardev:console".into(),
            "-kernel".into(),
            s(&cfg.kernel),
            "-initrd".into(),
            s(&cfg.initrd),
            "-append".into(),
            cfg.cmdline.clone(),
            "-drive".into(),
            format!(
                "id=root,file={},format={},if=none,discard=unmap",
                s(&cfg.disk),
                cfg.disk_format
            ),
            "-device".into(),
            "virtio-blk-device,drive=root".into(),
            "-object".into(),
            "rng-random,id=rng,filename=/dev/urandom".into(),
            "-device".into(),
            "virtio-rng-device,rng=rng".into(),
            "-chardev".into(),
            format!("socket,id=agent,path={},server=on,wait=off", s(&p.agent)),
            "-device".into(),
            "virtio-serial-device,max_ports=2".into(),
            "-device".into(),
            format!("virtserialport,chardev=agent,name={AGENT_PORT_NAME}"),
            "-qmp".into(),
            format!("unix:{},server=on,wait=off", s(&p.qmp)),
            "-pidfile".into(),
            s(&p.pidfile),
        ];
        let mem = |path: &Path, share: &str| {
            format!(
                "memory-backend-file,id=mem,size={}M,mem-path={},share={share}",
                memory_mib,
                s(path)
            )
        };
        match &cfg.memory {
            MemoryBacking::Anonymous => {}
            MemoryBacking::SharedFile(p) => a.extend(["-object".into(), mem(p, "on")]),
            MemoryBacking::PrivateFile(p) => a.extend(["-object".into(), mem(p, "off")]),
        }
        if cfg.incoming.is_some() {
            a.extend(["-incoming".into(), "defer".into()]);
        }
        if let Some(nic) = &cfg.nic {
            // No vhost (this kind of host may lack /dev/vhost-net) and no scripts:
            // the manager attaches the TAP to its bridge itself.
            let m = nic.mac;
            a.extend([
                "-netdev".into(),
                format!("tap,id=net0,ifname={},script=no,downscript=no", nic.tap),
                "-device".into(),
                format!(
                    "virtio-net-device,netdev=net0,mac={:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
                    m[0], m[1], m[2], m[3], m[4], m[5]
                ),
            ]);
        }
        for (i, sh) in cfg.shares.iter().enumerate() {
            // security_model=mapped-xattr: the guest's owners, modes, device nodes and
            // symlinks are stored in `user.virtfs.*` extended attributes and never
            // applied on the host (a setuid bit or `mknod` in the guest leaves a plain
            // 0600 file owned by the VMM's user). Symlinks the guest makes are files
            // holding the target, resolved inside the guest only.
            let mut fsdev = format!(
                "local,id=fs{i},path={},security_model=mapped-xattr",
                s(&sh.path)
            );
            if sh.read_only {
                fsdev.push_str(",readonly=on");
            }
            a.extend(["-fsdev".into(), fsdev, "-device".into()]);
            a.push(format!("virtio-9p-device,fsdev=fs{i},mount_tag={}", sh.tag));
        }
        if let Some((uid, gid)) = cfg.run_as {
            // Dropping privileges needs setuid/setgid, which elevateprivileges=deny forbids.
            let pos = a
                .iter()
                .position(|x| x.starts_with("on,obsolete=deny"))
                .unwrap_or(0);
            a[pos] = "on,obsolete=deny,spawn=deny,resourcecontrol=deny".into();
            a.extend(["-run-with".into(), format!("user={uid}:{gid}")]);
        }
        a
    }
}

/// Refuses what QEMU would misread: a `,` in a path ends the option value (QEMU
/// needs it doubled), so a share path with one could add options of its own.
fn check_options(cfg: &VmConfig) -> Result<(), VmmError> {
    for sh in &cfg.shares {
        if sh.path.to_string_lossy().contains(',') {
            return Err(VmmError::Invalid(format!(
                "shared folder {} has a ',' in its path, which qemu's option parser treats as a separator; rename it",
                sh.path.display()
            )));
        }
    }
    // A guest reaches the host through a share: its VMM must not be root.
    let root = match cfg.run_as {
        Some((uid, _)) => uid == 0,
        None => rustix::process::geteuid().is_root(),
    };
    if root && !cfg.shares.is_empty() {
        return Err(VmmError::Invalid(
            "the vmm of a vm with shared folders must not run as root (uid 0); run it as the folders' owner".into(),
        ));
    }
    Ok(())
}

fn tail(path: &Path, max: usize) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let start = text.len().saturating_sub(max);
    let start = (start..text.len())
        .find(|&i| text.is_char_boundary(i))
        .unwrap_or(text.len());
    text[start..].trim().to_owned()
}

#[async_trait::async_trait]
impl Hypervisor for Qemu {
    fn name(&self) -> &'static str {
        "qemu"
    }

    async fn launch(&self, cfg: &VmConfig) -> Result<VmProcess, VmmError> {
        let paths = RunPaths::new(&cfg.run_dir);
        check_options(cfg)?;
        for stale in [&paths.qmp, &paths.agent, &paths.pidfile] {
            let _ = fs::remove_file(stale);
        }
        let log = fs::File::create(&paths.vmm_log).map_err(|source| VmmError::Fs {
            op: "create",
            path: paths.vmm_log.clone(),
            source,
        })?;
        let mut child = Command::new(&self.binary)
            .args(Qemu::args(cfg))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            // Its own process group: a Ctrl-C on the manager's terminal must not kill VMs.
            .process_group(0)
            .kill_on_drop(false)
            .spawn()
            .map_err(|e| self.missing(e))?;
        let pid = child.id().map(|p| p as i32).unwrap_or(0);
        tracing::debug!(pid, run_dir = %cfg.run_dir.display(), "qemu started");

        let start = Instant::now();
        let qmp = loop {
            if let Some(status) = child.try_wait().ok().flatten() {
                return Err(VmmError::EarlyExit {
                    binary: self.binary.display().to_string(),
                    status: status.to_string(),
                    stderr: tail(&paths.vmm_log, 2000),
                });
            }
            if paths.qmp.exists() {
                match Qmp::connect_with_timeout(&paths.qmp, self.qmp_timeout).await {
                    Ok(q) => break q,
                    Err(e) if start.elapsed() > STARTUP_TIMEOUT => {
                        let _ = child.start_kill();
                        let _ = child.wait().await;
                        return Err(e);
                    }
                    Err(_) => {}
                }
            }
            if start.elapsed() > STARTUP_TIMEOUT {
                let _ = child.start_kill();
                let _ = child.wait().await;
                return Err(VmmError::Timeout(
                    STARTUP_TIMEOUT,
                    "qemu to open its qmp socket".into(),
                ));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };

        if let Some(inc) = &cfg.incoming
            && let Err(e) = restore_incoming(&qmp, inc).await
        {
            let _ = child.start_kill();
            let _ = child.wait().await;
            return Err(e);
        }

        let (tx, rx) = watch::channel(false);
        tokio::spawn(async move {
            let status = child.wait().await;
            tracing::debug!(pid, ?status, "qemu exited");
            let _ = tx.send(true);
        });
        Ok(VmProcess::new(pid, paths, qmp, rx))
    }

    async fn adopt(&self, run_dir: &Path) -> Result<Option<VmProcess>, VmmError> {
        let paths = RunPaths::new(run_dir);
        let Some(pid) = read_pidfile(&paths.pidfile) else {
            return Ok(None);
        };
        let marker = run_dir.display().to_string();
        if !pid_matches(pid, &marker) {
            return Ok(None);
        }
        let qmp = Qmp::connect_with_timeout(&paths.qmp, self.qmp_timeout).await?;
        Ok(Some(VmProcess::new(
            pid,
            paths.clone(),
            qmp,
            watch_foreign(pid, marker),
        )))
    }
}

/// The name under which a state file's descriptor is passed to QEMU (`getfd`).
const STATE_FD: &str = "atelier-state";

/// How long a migration to or from a file may take.
const MIGRATION_TIMEOUT: Duration = Duration::from_secs(60);

fn ignore_shared(on: bool) -> serde_json::Value {
    serde_json::json!({"capabilities": [{"capability": "x-ignore-shared", "state": on}]})
}

/// Loads device state saved by [`save_state`] into a VMM started with `-incoming
/// defer`, then runs the guest. Public so benchmarks can time exactly this step
/// against the manager's whole spawn.
pub async fn restore_incoming(qmp: &Qmp, inc: &crate::Incoming) -> Result<(), VmmError> {
    let state = inc.path.as_path();
    qmp.execute(
        "migrate-set-capabilities",
        Some(ignore_shared(inc.ignore_shared)),
    )
    .await?;
    // The manager opens the file and hands QEMU the descriptor: a VMM that dropped
    // its privileges (sandboxes with shared folders) cannot open paths in the
    // manager's private data dir, and needs not.
    let file = fs::File::open(state).map_err(|source| VmmError::Fs {
        op: "open",
        path: state.to_owned(),
        source,
    })?;
    qmp.pass_fd(STATE_FD, file.into()).await?;
    let uri = format!("fd:{STATE_FD}");
    // QEMU loads incoming state in its main loop: the monitor may not answer until
    // the whole file is read, so these get the migration's deadline.
    let mig = |cmd: &'static str, args| qmp.execute_timeout(cmd, args, MIGRATION_TIMEOUT);
    mig("migrate-incoming", Some(serde_json::json!({ "uri": uri }))).await?;
    let start = Instant::now();
    loop {
        let st = mig("query-status", None).await?;
        match st.get("status").and_then(|s| s.as_str()).unwrap_or("") {
            "running" => return Ok(()),
            "paused" | "postmigrate" | "prelaunch" => {
                // Migration finished without autostart: run it.
                let m = mig("query-migrate", None).await.unwrap_or_default();
                let done = m
                    .get("status")
                    .and_then(|s| s.as_str())
                    .is_none_or(|s| s == "completed");
                if done {
                    mig("cont", None).await?;
                }
            }
            "inmigrate" => {}
            other => {
                return Err(VmmError::Qmp {
                    op: "migrate-incoming".into(),
                    socket: state.to_owned(),
                    detail: format!("guest is {other} after restore"),
                });
            }
        }
        if start.elapsed() > MIGRATION_TIMEOUT {
            return Err(VmmError::Timeout(
                MIGRATION_TIMEOUT,
                "restoring device state".into(),
            ));
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Stops the guest and writes its device state to `state` with `x-ignore-shared`:
/// RAM in a shared memory-backend file is not copied (the file is the RAM image).
/// The guest stays stopped; the caller copies the disk and quits the VMM.
pub async fn save_state(vm: &VmProcess, state: &Path) -> Result<(), VmmError> {
    save(vm, state, true).await
}

/// Stops the guest and writes its whole state, RAM included, to `state` (pause).
/// The guest stays stopped; the caller quits the VMM.
pub async fn save_full_state(vm: &VmProcess, state: &Path) -> Result<(), VmmError> {
    save(vm, state, false).await
}

async fn save(vm: &VmProcess, state: &Path, ignore: bool) -> Result<(), VmmError> {
    let qmp = vm.qmp();
    qmp.execute("migrate-set-capabilities", Some(ignore_shared(ignore)))
        .await?;
    qmp.execute("stop", None).await?;
    // Opened here (private to the manager: mode 0600) and passed as a descriptor,
    // so a VMM running as an unprivileged user needs no access to the data dir.
    let file = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(state)
        .map_err(|source| VmmError::Fs {
            op: "create",
            path: state.to_owned(),
            source,
        })?;
    qmp.pass_fd(STATE_FD, file.into()).await?;
    let uri = format!("fd:{STATE_FD}");
    qmp.execute("migrate", Some(serde_json::json!({ "uri": uri })))
        .await?;
    let start = Instant::now();
    loop {
        // The migration thread does the writing; the monitor stays responsive.
        let m = qmp.execute("query-migrate", None).await?;
        match m.get("status").and_then(|s| s.as_str()).unwrap_or("") {
            "completed" => return Ok(()),
            "failed" | "cancelled" => {
                return Err(VmmError::Qmp {
                    op: "migrate".into(),
                    socket: state.to_owned(),
                    detail: m
                        .get("error-desc")
                        .and_then(|d| d.as_str())
                        .unwrap_or("failed")
                        .to_owned(),
                });
            }
            _ => {}
        }
        if start.elapsed() > MIGRATION_TIMEOUT {
            return Err(VmmError::Timeout(
                MIGRATION_TIMEOUT,
                "saving device state".into(),
            ));
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::Share;

    fn cfg_with_share(path: &str, run_as: Option<(u32, u32)>) -> VmConfig {
        VmConfig {
            name: "sb-1".into(),
            run_dir: PathBuf::from("/run/atl/sb-1"),
            kernel: PathBuf::from("/k"),
            initrd: PathBuf::from("/i"),
            cmdline: String::new(),
            disk: PathBuf::from("/d.img"),
            disk_format: "raw".into(),
            vcpus: 1,
            memory_mib: 512,
            accel: Accel::Tcg,
            memory: MemoryBacking::Anonymous,
            incoming: None,
            shares: vec![Share {
                tag: "atl0".into(),
                path: PathBuf::from(path),
                read_only: false,
            }],
            run_as,
            nic: None,
        }
    }

    #[test]
    fn shares_use_the_mapped_model_and_an_unprivileged_vmm() {
        let cfg = cfg_with_share("/home/u/p", Some((1000, 1000)));
        let a = Qemu::args(&cfg);
        assert!(
            a.iter()
                .any(|x| x == "local,id=fs0,path=/home/u/p,security_model=mapped-xattr"),
            "{a:?}"
        );
        assert!(
            a.windows(2)
                .any(|w| w[0] == "-run-with" && w[1] == "user=1000:1000")
        );
        check_options(&cfg).unwrap();

        let e = check_options(&cfg_with_share("/home/u/a,b", Some((1000, 1000)))).unwrap_err();
        assert!(e.to_string().contains("','"), "{e}");
        let e = check_options(&cfg_with_share("/home/u/p", Some((0, 0)))).unwrap_err();
        assert!(e.to_string().contains("must not run as root"), "{e}");
        if rustix::process::geteuid().is_root() {
            assert!(check_options(&cfg_with_share("/home/u/p", None)).is_err());
        }
    }
}
