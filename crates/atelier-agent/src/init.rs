//! PID 1: system setup, worker supervision, zombie reaping, clean power off.
//!
//! PID 1 must never exit (the kernel panics): every step logs its failure and goes on,
//! and the supervision loop runs under `catch_unwind`.

use std::time::{Duration, Instant};

use rustix::mount::MountFlags;
use rustix::process::WaitOptions;
use tokio::signal::unix::{SignalKind, signal};

use crate::sys;

const BACKOFF_MIN: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// A worker that ran this long resets the backoff.
const HEALTHY_RUN: Duration = Duration::from_secs(30);

/// Runs PID 1 forever.
pub fn run() -> ! {
    log!("init starting (version {})", env!("CARGO_PKG_VERSION"));
    if std::panic::catch_unwind(setup_system).is_err() {
        log!("system setup panicked; continuing with what is set up");
    }
    loop {
        let result =
            std::panic::catch_unwind(|| {
                match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt.block_on(supervise()),
                    Err(e) => log!("creating the init runtime failed: {e}"),
                }
            });
        if result.is_err() {
            log!("init supervisor panicked; restarting it");
        }
        reap_all();
        std::thread::sleep(Duration::from_secs(1));
    }
}

fn setup_system() {
    let nosuid_nodev_noexec = MountFlags::NOSUID | MountFlags::NODEV | MountFlags::NOEXEC;
    let mounts: [(&str, &str, &str, MountFlags, &str); 7] = [
        ("proc", "/proc", "proc", nosuid_nodev_noexec, ""),
        ("sysfs", "/sys", "sysfs", nosuid_nodev_noexec, ""),
        (
            "devtmpfs",
            "/dev",
            "devtmpfs",
            MountFlags::NOSUID,
            "mode=0755",
        ),
        (
            "devpts",
            "/dev/pts",
            "devpts",
            MountFlags::NOSUID | MountFlags::NOEXEC,
            "gid=5,mode=620,ptmxmode=666",
        ),
        (
            "tmpfs",
            "/dev/shm",
            "tmpfs",
            MountFlags::NOSUID | MountFlags::NODEV,
            "mode=1777",
        ),
        (
            "tmpfs",
            "/run",
            "tmpfs",
            MountFlags::NOSUID | MountFlags::NODEV,
            "mode=0755",
        ),
        (
            "tmpfs",
            "/tmp",
            "tmpfs",
            MountFlags::NOSUID | MountFlags::NODEV,
            "mode=1777",
        ),
    ];
    for (source, target, fstype, flags, data) in mounts {
        if let Err(e) = sys::mount_if_missing(source, target, fstype, flags, data) {
            log!("{e}");
        }
    }
    ensure_console();
    if let Err(e) = sys::remount_root(false) {
        log!("{e}");
    }
    match std::fs::read_to_string("/proc/cmdline") {
        Ok(cmdline) => match sys::cmdline_param(&cmdline, "atelier.hostname") {
            Some(name) if sys::valid_hostname(name) => {
                if let Err(e) = sys::set_hostname(name) {
                    log!("{e}");
                }
                if let Err(e) = std::fs::write("/etc/hostname", format!("{name}\n")) {
                    log!("writing /etc/hostname: {e}");
                }
            }
            Some(name) => log!("ignoring invalid atelier.hostname={name:?}"),
            None => {}
        },
        Err(e) => log!("reading /proc/cmdline: {e}"),
    }
    if let Err(e) = sys::loopback_up() {
        log!("{e}");
    }
    // Without udev nothing loads drivers. Entropy from the host (virtio-rng): without
    // it the guest CRNG may not be initialised when a memory snapshot is taken, so
    // clones restored from it could not be reseeded apart. The NIC (virtio-net): loaded
    // at boot so memory snapshots already have it when the host sends NetConfig.
    for module in ["virtio_rng", "virtio_net"] {
        match std::process::Command::new("/sbin/modprobe")
            .args(["-q", module])
            .status()
        {
            Ok(s) if s.success() => {}
            Ok(s) => log!("modprobe {module}: {s}"),
            Err(e) => log!("modprobe {module}: {e}"),
        }
    }
}

/// Points stdio at /dev/console when what we were given is unusable.
fn ensure_console() {
    if rustix::fs::fstat(rustix::stdio::stderr()).is_ok() {
        return;
    }
    if let Ok(console) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/console")
    {
        let _ = rustix::stdio::dup2_stdin(&console);
        let _ = rustix::stdio::dup2_stdout(&console);
        let _ = rustix::stdio::dup2_stderr(&console);
    }
}

fn spawn_worker() -> std::io::Result<u32> {
    let exe = std::env::current_exe().unwrap_or_else(|_| "/sbin/atelier-agent".into());
    let mut cmd = std::process::Command::new(exe);
    cmd.arg("serve").current_dir("/").env("HOME", "/root");
    if std::env::var_os("PATH").is_none() {
        cmd.env("PATH", sys::DEFAULT_PATH);
    }
    if std::env::var_os("LANG").is_none() {
        cmd.env("LANG", "C.UTF-8");
    }
    // The Child is dropped without waiting: reap_all() collects it by pid.
    Ok(cmd.spawn()?.id())
}

/// Reaps every exited child; returns the (pid, description) of each.
fn reap_all() -> Vec<(u32, String)> {
    let mut reaped = Vec::new();
    while let Ok(Some((pid, status))) = rustix::process::wait(WaitOptions::NOHANG) {
        let how = match (status.exit_status(), status.terminating_signal()) {
            (Some(code), _) => format!("exit code {code}"),
            (None, Some(sig)) => format!("signal {sig}"),
            _ => "unknown status".into(),
        };
        reaped.push((pid.as_raw_nonzero().get() as u32, how));
    }
    reaped
}

async fn supervise() {
    let (Ok(mut sigchld), Ok(mut sigterm), Ok(mut sigint)) = (
        signal(SignalKind::child()),
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        log!("installing signal handlers failed");
        return;
    };
    let mut worker: Option<(u32, Instant)> = None;
    let mut backoff = BACKOFF_MIN;
    let mut next_start = Instant::now();
    loop {
        let now = Instant::now();
        if worker.is_none() && now >= next_start {
            match spawn_worker() {
                Ok(pid) => {
                    log!("worker started (pid {pid})");
                    worker = Some((pid, now));
                }
                Err(e) => {
                    log!("starting the worker failed: {e}; retrying in {backoff:?}");
                    next_start = now + backoff;
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                }
            }
        }
        let wake = if worker.is_none() {
            next_start
        } else {
            now + Duration::from_secs(10)
        };
        tokio::select! {
            _ = sigchld.recv() => {}
            _ = sigterm.recv() => power_off("SIGTERM").await,
            _ = sigint.recv() => power_off("SIGINT").await,
            _ = tokio::time::sleep_until(wake.into()) => {}
        }
        for (pid, how) in reap_all() {
            if let Some((wpid, started)) = worker
                && wpid == pid
            {
                let ran = started.elapsed();
                if ran >= HEALTHY_RUN {
                    backoff = BACKOFF_MIN;
                }
                log!(
                    "worker (pid {pid}) ended after {ran:?} with {how}; restarting in {backoff:?}"
                );
                next_start = Instant::now() + backoff;
                backoff = (backoff * 2).min(BACKOFF_MAX);
                worker = None;
            }
        }
    }
}

/// Terminates everything, syncs and powers off. Never returns.
async fn power_off(reason: &str) -> ! {
    log!("{reason}: powering off");
    sys::kill_all(libc::SIGTERM);
    let deadline = Instant::now() + Duration::from_secs(3);
    while Instant::now() < deadline {
        reap_all();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    sys::kill_all(libc::SIGKILL);
    reap_all();
    rustix::fs::sync();
    if let Err(e) = sys::remount_root(true) {
        log!("{e}");
    }
    let failure = sys::power_off(false);
    log!("{failure}; halting here");
    loop {
        reap_all();
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}
