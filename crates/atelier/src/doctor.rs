//! `atelier doctor`: checks this host for what Atelier needs and says how to fix
//! what is missing. Runs locally; also asks the manager, when one answers.

use std::path::Path;
use std::process::Command;

use serde::Serialize;

use crate::Global;
use crate::client::Client;

#[derive(Serialize)]
struct Check {
    name: &'static str,
    ok: bool,
    /// Whether a failure stops sandboxes from working (else it is a warning).
    critical: bool,
    detail: String,
    fix: Option<String>,
}

fn tool(name: &str, package: &str) -> (bool, String, Option<String>) {
    match which(name) {
        Some(p) => (true, p, None),
        None => (
            false,
            "not found".into(),
            Some(format!("apt-get install {package}")),
        ),
    }
}

fn which(name: &str) -> Option<String> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin"].iter().map(Into::into))
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .map(|p| p.display().to_string())
}

/// Runs the checks; exit code 1 when a critical one fails.
pub async fn run(g: &Global) -> anyhow::Result<u8> {
    let mut checks = Vec::new();
    let root = rustix::process::geteuid().is_root();
    checks.push(Check {
        name: "root",
        ok: root,
        critical: false,
        detail: if root {
            "running as root".into()
        } else {
            "not root".into()
        },
        fix: (!root).then(|| {
            "run `atelier serve` and `atelier image build` as root (loop mounts, debootstrap)"
                .into()
        }),
    });

    let kvm = Path::new("/dev/kvm");
    let kvm_open = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(kvm)
        .is_ok();
    let pvm = std::fs::read_to_string("/proc/modules")
        .map(|m| m.contains("kvm_pvm"))
        .unwrap_or(false)
        || Path::new("/sys/module/kvm_pvm").exists();
    checks.push(Check {
        name: "kvm",
        ok: kvm_open && !pvm,
        critical: false,
        detail: match (kvm.exists(), kvm_open, pvm) {
            (false, _, _) => "/dev/kvm does not exist; sandboxes run under TCG (software emulation, ~10x slower)".into(),
            (true, false, _) => "/dev/kvm exists but cannot be opened; TCG will be used".into(),
            (true, true, true) => "/dev/kvm is served by kvm_pvm (nested, paravirtual): stock kernels do not boot on it; the manager's probe will pick TCG".into(),
            (true, true, false) => "/dev/kvm can be opened; the manager probes once that a guest really boots".into(),
        },
        fix: (!kvm.exists()).then(|| "enable virtualisation in firmware / nested virtualisation on the host and load kvm_intel or kvm_amd".into()),
    });

    let qemu = Command::new("qemu-system-x86_64").arg("--version").output();
    let (qok, qdetail) = match qemu {
        Ok(o) if o.status.success() => {
            let line = String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .unwrap_or("")
                .to_owned();
            let major: u32 = line
                .split("version ")
                .nth(1)
                .and_then(|v| v.split('.').next())
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            (major >= 8, line)
        }
        _ => (false, "qemu-system-x86_64 not found".into()),
    };
    checks.push(Check {
        name: "qemu",
        ok: qok,
        critical: true,
        detail: qdetail,
        fix: (!qok).then(|| "apt-get install -t bookworm-backports qemu-system-x86 (QEMU 8 or newer; 10 is tested)".into()),
    });

    for (name, bin, pkg, critical) in [
        ("debootstrap", "debootstrap", "debootstrap", false),
        ("mkfs.ext4", "mkfs.ext4", "e2fsprogs", false),
        ("mkfs.xfs", "mkfs.xfs", "xfsprogs", false),
        ("qemu-img", "qemu-img", "qemu-utils", false),
        ("cpio", "cpio", "cpio", false),
        ("busybox", "busybox", "busybox-static", false),
    ] {
        let (ok, detail, fix) = tool(bin, pkg);
        checks.push(Check {
            name,
            ok,
            critical,
            detail,
            fix,
        });
    }

    let dd = &g.data_dir;
    let free = rustix::fs::statvfs(dd.parent().filter(|_| !dd.exists()).unwrap_or(dd))
        .map(|s| s.f_bavail * s.f_frsize)
        .unwrap_or(0);
    checks.push(Check {
        name: "free space",
        ok: free >= 10 << 30,
        critical: free < 2 << 30,
        detail: format!("{} GiB free for {}", free >> 30, dd.display()),
        fix: (free < 10 << 30).then(|| {
            "free disk space or point --data-dir at a larger filesystem (10 GiB+ recommended)"
                .into()
        }),
    });

    let pool = dd.join("pool");
    let reflink = pool.exists() && atelier_storage::supports_reflink(&pool).unwrap_or(false);
    checks.push(Check {
        name: "storage pool",
        ok: reflink,
        critical: false,
        detail: if reflink {
            format!("{} supports reflink: O(1) clones", pool.display())
        } else if pool.exists() {
            format!("{} cannot reflink; qcow2 overlays are used", pool.display())
        } else {
            "not created yet; `atelier serve` makes it (a loop-mounted XFS file when the data dir cannot reflink)".into()
        },
        fix: (!reflink && pool.exists()).then(|| "run the manager as root so it can loop-mount an XFS pool, or put the data dir on XFS (reflink=1) or btrfs".into()),
    });

    let images = atelier_image::list(&g.images_dir()).unwrap_or_default();
    checks.push(Check {
        name: "images",
        ok: !images.is_empty(),
        critical: false,
        detail: if images.is_empty() {
            "no image built".into()
        } else {
            images
                .iter()
                .map(|i| format!("{} ({})", i.manifest.name, i.manifest.hash))
                .collect::<Vec<_>>()
                .join(", ")
        },
        fix: images
            .is_empty()
            .then(|| "atelier image build minimal".into()),
    });

    let agent = crate::default_agent_binary();
    let agent_ok = agent.is_some();
    checks.push(Check {
        name: "guest agent",
        ok: agent_ok,
        critical: false,
        detail: agent
            .map(|a| a.display().to_string())
            .unwrap_or_else(|| "not found beside atelier or in /usr/local/lib/atelier".into()),
        fix: (!agent_ok).then(|| "scripts/build-agent.sh builds the static guest agent".into()),
    });

    let server = match Client::new(g) {
        Ok(c) => match c
            .get_json::<atelier_server::api::StatusView>("/api/v1/status")
            .await
        {
            Ok(s) => (
                true,
                format!("{} answers; accelerator {}", g.url, s.accel),
                None,
            ),
            Err(e) => (
                false,
                format!("{e:#}"),
                Some("start it with `atelier serve` (see README)".into()),
            ),
        },
        Err(e) => (false, e.to_string(), None),
    };
    checks.push(Check {
        name: "manager",
        ok: server.0,
        critical: false,
        detail: server.1,
        fix: server.2,
    });

    let failed_critical = checks.iter().any(|c| !c.ok && c.critical);
    if g.json {
        println!("{}", serde_json::to_string_pretty(&checks)?);
    } else {
        for c in &checks {
            let mark = if c.ok {
                "ok  "
            } else if c.critical {
                "FAIL"
            } else {
                "warn"
            };
            println!("[{mark}] {:<13} {}", c.name, c.detail);
            if let (false, Some(fix)) = (c.ok, &c.fix) {
                println!("       fix: {fix}");
            }
        }
    }
    Ok(u8::from(failed_critical))
}
