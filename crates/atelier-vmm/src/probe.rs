//! Accelerator detection. `/dev/kvm` existing is not enough: nested or
//! paravirtualised KVM (e.g. `kvm_pvm`) may accept the ioctl calls and then fail to
//! run a stock kernel. So the probe boots the real guest kernel under KVM and waits
//! for it to reach the hand-off to init on the console; only then is KVM chosen.

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::process::Command;

/// A CPU accelerator QEMU can use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Accel {
    /// Hardware virtualisation through /dev/kvm.
    Kvm,
    /// Software emulation (TCG); works everywhere, much slower.
    Tcg,
}

impl Accel {
    /// Name as shown and as accepted by `ATELIER_ACCEL`.
    pub fn as_str(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }

    /// Parses `kvm` or `tcg`.
    pub fn parse(s: &str) -> Option<Accel> {
        match s {
            "kvm" => Some(Accel::Kvm),
            "tcg" => Some(Accel::Tcg),
            _ => None,
        }
    }
}

/// What the operator asked for (`ATELIER_ACCEL`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AccelChoice {
    /// Probe KVM, fall back to TCG.
    #[default]
    Auto,
    /// Use this one without probing.
    Forced(Accel),
}

impl AccelChoice {
    /// Parses `auto`, `kvm` or `tcg`.
    pub fn parse(s: &str) -> Option<AccelChoice> {
        match s {
            "auto" | "" => Some(AccelChoice::Auto),
            other => Accel::parse(other).map(AccelChoice::Forced),
        }
    }
}

/// The probe's result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeOutcome {
    /// The accelerator to use.
    pub accel: Accel,
    /// Why (e.g. "kvm booted a guest in 310 ms" or why KVM was rejected).
    pub reason: String,
}

/// The console text that proves the guest kernel ran to the hand-off to init.
const PROBE_INIT: &str = "/atelier-accel-probe";

/// Boots `kernel` (with `initrd`) under KVM with an init that does not exist and
/// waits up to `timeout` for the kernel to say it tries to run it. Falls back to TCG
/// on any failure. `qemu` is the binary.
pub async fn probe_accel(
    qemu: &Path,
    kernel: &Path,
    initrd: &Path,
    scratch: &Path,
    timeout: Duration,
) -> ProbeOutcome {
    if !Path::new("/dev/kvm").exists() {
        return ProbeOutcome {
            accel: Accel::Tcg,
            reason: "/dev/kvm does not exist".into(),
        };
    }
    if let Err(e) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        return ProbeOutcome {
            accel: Accel::Tcg,
            reason: format!("/dev/kvm cannot be opened: {e}"),
        };
    }
    match boot_to_init(qemu, kernel, initrd, scratch, timeout).await {
        Ok(t) => ProbeOutcome {
            accel: Accel::Kvm,
            reason: format!(
                "kvm booted the guest kernel to init in {} ms",
                t.as_millis()
            ),
        },
        Err(why) => ProbeOutcome {
            accel: Accel::Tcg,
            reason: format!("kvm rejected: {why}"),
        },
    }
}

async fn boot_to_init(
    qemu: &Path,
    kernel: &Path,
    initrd: &Path,
    scratch: &Path,
    timeout: Duration,
) -> Result<Duration, String> {
    std::fs::create_dir_all(scratch)
        .map_err(|e| format!("cannot create {}: {e}", scratch.display()))?;
    let console = scratch.join("accel-probe-console.log");
    let _ = std::fs::remove_file(&console);
    let mut child = Command::new(qemu)
        .args([
            "-M",
            "microvm,rtc=on",
            "-accel",
            "kvm",
            "-cpu",
            "host",
            "-m",
            "256M",
        ])
        .args([
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-no-reboot",
        ])
        .arg("-serial")
        .arg(format!("file:{}", console.display()))
        .arg("-kernel")
        .arg(kernel)
        .arg("-initrd")
        .arg(initrd)
        .arg("-append")
        .arg(format!("console=ttyS0 panic=-1 rdinit={PROBE_INIT}"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("cannot run {}: {e}", qemu.display()))?;
    let start = Instant::now();
    let result = loop {
        let text = std::fs::read_to_string(&console).unwrap_or_default();
        if text.contains(PROBE_INIT) {
            break Ok(start.elapsed());
        }
        if let Ok(Some(status)) = child.try_wait() {
            break Err(format!(
                "qemu exited ({status}) before the kernel reached init"
            ));
        }
        if start.elapsed() > timeout {
            break Err(format!(
                "no init hand-off on the console within {} s ({} bytes of console output)",
                timeout.as_secs(),
                text.len()
            ));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let _ = child.start_kill();
    let _ = child.wait().await;
    let _ = std::fs::remove_file(&console);
    result
}
