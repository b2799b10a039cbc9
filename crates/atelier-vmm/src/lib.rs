//! Hypervisor backends. The [`Hypervisor`] trait is the narrow seam the manager uses
//! (launch a VM, adopt one that survived a manager restart); [`qemu::Qemu`] is the
//! backend today, driven over QMP. [`probe`] decides once whether KVM really boots a
//! guest on this host or whether to fall back to TCG.
//!
//! This crate starts and stops VMM processes and nothing else: it does not know
//! about sandboxes, the store or the agent protocol.

pub mod console;
pub mod probe;
pub mod process;
pub mod qemu;
pub mod qmp;

use std::path::{Path, PathBuf};
use std::time::Duration;

pub use probe::{Accel, AccelChoice, ProbeOutcome, probe_accel};
pub use process::VmProcess;
pub use qemu::{save_full_state, save_state};

/// Errors from launching, controlling or probing a VMM.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    /// The VMM binary is missing.
    #[error(
        "cannot run {binary}: {detail}; install QEMU 10 (apt-get install -t bookworm-backports qemu-system-x86)"
    )]
    BinaryMissing {
        /// Binary name.
        binary: String,
        /// Why.
        detail: String,
    },
    /// The VMM exited during start-up.
    #[error("{binary} exited during start-up ({status}): {stderr}")]
    EarlyExit {
        /// Binary name.
        binary: String,
        /// Exit status.
        status: String,
        /// Tail of its log.
        stderr: String,
    },
    /// A file under the run directory could not be made or read.
    #[error("cannot {op} {path}: {source}")]
    Fs {
        /// What was being done.
        op: &'static str,
        /// The path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The QMP socket did not answer or answered garbage.
    #[error("qmp {op} on {socket}: {detail}")]
    Qmp {
        /// The command or step.
        op: String,
        /// The socket.
        socket: PathBuf,
        /// What went wrong.
        detail: String,
    },
    /// QEMU closed its QMP socket (it exited or was killed) before answering.
    #[error("qmp {op} in run dir {run_dir}: {reason}; the VM process is gone or going")]
    QmpClosed {
        /// The command.
        op: String,
        /// The VM's run directory.
        run_dir: PathBuf,
        /// What closed it.
        reason: String,
    },
    /// A wait ran out (the string names what was awaited: for QMP, the command
    /// and the VM's run directory).
    #[error("timed out after {0:?} waiting for {1}")]
    Timeout(Duration, String),
    /// The VM configuration asks for something unsafe or unrepresentable.
    #[error("invalid vm configuration: {0}")]
    Invalid(String),
}

/// Everything needed to boot one VM.
#[derive(Debug, Clone)]
pub struct VmConfig {
    /// Short name used in the process title (the sandbox id).
    pub name: String,
    /// Directory holding the VM's sockets, pidfile and logs; its path appears in the
    /// VMM command line, so orphans can be found by it.
    pub run_dir: PathBuf,
    /// Guest kernel.
    pub kernel: PathBuf,
    /// Guest initramfs.
    pub initrd: PathBuf,
    /// Kernel command line.
    pub cmdline: String,
    /// Root disk.
    pub disk: PathBuf,
    /// Root disk format (`raw`, `qcow2`).
    pub disk_format: String,
    /// vCPUs.
    pub vcpus: u32,
    /// Memory in MiB.
    pub memory_mib: u32,
    /// Accelerator.
    pub accel: Accel,
    /// Where guest RAM lives.
    pub memory: MemoryBacking,
    /// Restore saved state from this file instead of booting.
    pub incoming: Option<Incoming>,
    /// Host folders exported over virtio-9p.
    pub shares: Vec<Share>,
    /// Host uid/gid the VMM drops to after start-up (files written through shares
    /// then belong to that user); None keeps the manager's user.
    pub run_as: Option<(u32, u32)>,
    /// The network card, if any.
    pub nic: Option<Nic>,
}

/// A virtio-net card on a TAP the VMM creates (and the kernel removes with it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Nic {
    /// TAP interface name (≤ 15 bytes).
    pub tap: String,
    /// Guest MAC address.
    pub mac: [u8; 6],
}

/// Guest RAM: anonymous memory, or a file that memory snapshots are built on.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum MemoryBacking {
    /// Ordinary anonymous memory.
    #[default]
    Anonymous,
    /// RAM is this file, mapped shared: a template VM whose memory image is the file
    /// itself once it is stopped (saving state then writes only device state).
    SharedFile(PathBuf),
    /// RAM starts as this file's contents, mapped private copy-on-write: clones
    /// restored from one template share its unchanged pages through the page cache.
    PrivateFile(PathBuf),
}

/// A saved VM state to restore at launch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Incoming {
    /// The file written by [`save_state`] or [`save_full_state`].
    pub path: PathBuf,
    /// Whether it was saved with `x-ignore-shared` (device state only: RAM comes from
    /// the memory backing's file); must match how it was saved.
    pub ignore_shared: bool,
}

/// A host folder exported to the guest over virtio-9p.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Share {
    /// The 9p mount tag the guest mounts by.
    pub tag: String,
    /// Host directory.
    pub path: PathBuf,
    /// Whether QEMU refuses writes.
    pub read_only: bool,
}

/// Well-known files inside a VM's run directory.
#[derive(Debug, Clone)]
pub struct RunPaths {
    /// The directory.
    pub dir: PathBuf,
    /// QMP unix socket.
    pub qmp: PathBuf,
    /// Agent virtio-serial unix socket.
    pub agent: PathBuf,
    /// VMM pidfile.
    pub pidfile: PathBuf,
    /// Guest serial console log (appended across boots).
    pub console: PathBuf,
    /// VMM's own stderr.
    pub vmm_log: PathBuf,
}

impl RunPaths {
    /// Paths inside `dir`.
    pub fn new(dir: &Path) -> RunPaths {
        RunPaths {
            dir: dir.to_owned(),
            qmp: dir.join("qmp.sock"),
            agent: dir.join("agent.sock"),
            pidfile: dir.join("vmm.pid"),
            console: dir.join("console.log"),
            vmm_log: dir.join("vmm.log"),
        }
    }
}

/// A hypervisor backend.
#[async_trait::async_trait]
pub trait Hypervisor: Send + Sync + std::fmt::Debug {
    /// Backend name (`qemu`).
    fn name(&self) -> &'static str;
    /// Starts a VM and returns once its control socket answers.
    async fn launch(&self, cfg: &VmConfig) -> Result<VmProcess, VmmError>;
    /// Finds the still-running VM whose run directory is `run_dir` (after a manager
    /// restart) and reconnects to it; `None` when no such process is alive.
    async fn adopt(&self, run_dir: &Path) -> Result<Option<VmProcess>, VmmError>;
}
