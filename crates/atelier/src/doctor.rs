//! `atelier doctor`: checks this host for what Atelier needs and says how to fix
//! what is missing. Runs locally; also asks the manager, when one answers.
//!
//! The networking checks read the same environment as `atelier serve`
//! (`ATELIER_DOMAIN`, `ATELIER_LISTEN`, `ATELIER_HTTPS_LISTEN`, `ATELIER_HTTP_LISTEN`,
//! `ATELIER_BRIDGE`). They send no traffic off this machine: ports are tried only on
//! this host's own addresses, and DNS is asked (through the system resolver) only
//! about a configured real domain.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

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

    network_checks(&mut checks).await;

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
            println!("[{mark}] {:<17} {}", c.name, c.detail);
            if let (false, Some(fix)) = (c.ok, &c.fix) {
                println!("       fix: {fix}");
            }
        }
    }
    Ok(u8::from(failed_critical))
}

/// Timeout of one local TCP connect or one DNS lookup.
const PROBE_TIMEOUT: Duration = Duration::from_secs(3);
/// Host name looked up to test the wildcard record (any label would do).
const DNS_PROBE_LABEL: &str = "sandbox-doctor-check";

/// Sandbox networking: tools, TAP, forwarding, other firewalls, wildcard DNS, ports.
async fn network_checks(checks: &mut Vec<Check>) {
    let no_net = " (needed for sandbox networking; or run the manager with --no-network)";
    for (name, bin, pkg) in [("nft", "nft", "nftables"), ("ip", "ip", "iproute2")] {
        let (ok, detail, fix) = tool(bin, pkg);
        checks.push(Check {
            name,
            ok,
            critical: false,
            detail: if ok {
                detail
            } else {
                format!("{detail}{no_net}")
            },
            fix,
        });
    }

    let tun = Path::new("/dev/net/tun").exists();
    checks.push(Check {
        name: "/dev/net/tun",
        ok: tun,
        critical: false,
        detail: if tun {
            "present: TAP devices can be made".into()
        } else {
            format!("missing: no TAP devices{no_net}")
        },
        fix: (!tun).then(|| {
            "modprobe tun (in a container: pass the device, e.g. --device /dev/net/tun)".into()
        }),
    });

    let fwd = std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward")
        .map(|v| v.trim().to_owned())
        .unwrap_or_else(|_| "unreadable".into());
    checks.push(Check {
        name: "ip forwarding",
        ok: true,
        critical: false,
        detail: match fwd.as_str() {
            "1" => "net.ipv4.ip_forward = 1".into(),
            v => format!("net.ipv4.ip_forward = {v}; the manager turns it on when it starts"),
        },
        fix: None,
    });

    let bridge = env_or("ATELIER_BRIDGE", "atl0");
    let drops = forward_drops();
    checks.push(Check {
        name: "other firewalls",
        ok: drops.as_ref().is_ok_and(Vec::is_empty),
        critical: false,
        detail: match &drops {
            Ok(d) if d.is_empty() => "no forward chain with policy drop outside atelier's tables".into(),
            Ok(d) => format!("forward traffic may be dropped by: {}", d.join(", ")),
            Err(e) => format!("cannot read the rule sets ({e}); not checked"),
        },
        fix: match &drops {
            Ok(d) if !d.is_empty() => Some(format!(
                "accept the sandbox bridge there, e.g. `iptables -I FORWARD -i {bridge} -j ACCEPT; iptables -I FORWARD -o {bridge} -j ACCEPT` (with Docker: in its DOCKER-USER chain)"
            )),
            Ok(_) => None,
            Err(_) => Some("run `atelier doctor` as root to read the firewall rules".into()),
        },
    });

    let domain = env_or("ATELIER_DOMAIN", "localhost")
        .trim_end_matches('.')
        .to_ascii_lowercase();
    let local_addrs = host_addresses();
    checks.push(dns_check(&domain, &local_addrs).await);

    let https = std::env::var("ATELIER_HTTPS_LISTEN").ok();
    let mut listens = vec![("--listen", env_or("ATELIER_LISTEN", "127.0.0.1:7070"))];
    if let Some(a) = &https {
        listens.push(("--https-listen", a.clone()));
    }
    if let Ok(a) = std::env::var("ATELIER_HTTP_LISTEN") {
        listens.push(("--http-listen", a));
    }
    for (flag, addr) in listens {
        checks.push(port_check(flag, &addr, &local_addrs).await);
    }
    if https.is_some() && !is_local_domain(&domain) {
        checks.push(Check {
            name: "public ports",
            ok: true,
            critical: false,
            detail: format!(
                "users (and ACME HTTP-01) need ports 443 and 80 of {domain} reachable from the internet; doctor cannot check that from here: try `curl -I http://{domain}/` from another network"
            ),
            fix: None,
        });
    }
}

fn env_or(key: &str, default: &str) -> String {
    std::env::var(key)
        .ok()
        .filter(|v| !v.trim().is_empty())
        .unwrap_or_else(|| default.to_owned())
}

/// `localhost` and its subdomains never need DNS (RFC 6761).
fn is_local_domain(domain: &str) -> bool {
    domain == "localhost" || domain.ends_with(".localhost")
}

async fn dns_check(domain: &str, local: &Option<BTreeSet<IpAddr>>) -> Check {
    if is_local_domain(domain) {
        return Check {
            name: "wildcard DNS",
            ok: true,
            critical: false,
            detail: format!(
                "domain {domain}: browsers resolve *.{domain} to loopback themselves (RFC 6761); curl and other CLIs need `--resolve sandbox-ID.{domain}:PORT:127.0.0.1` or an /etc/hosts line per name. Set ATELIER_DOMAIN to check a real domain"
            ),
            fix: None,
        };
    }
    let wildcard = format!("{DNS_PROBE_LABEL}.{domain}");
    let (apex, wild) = tokio::join!(resolve(domain), resolve(&wildcard));
    let describe = |name: &str, r: &Result<Vec<IpAddr>, String>| match r {
        Ok(addrs) => {
            let list = addrs
                .iter()
                .map(|a| match local {
                    Some(l) if l.contains(a) => format!("{a} (this host)"),
                    Some(_) => format!("{a} (not on this host)"),
                    None => a.to_string(),
                })
                .collect::<Vec<_>>()
                .join(", ");
            format!("{name} -> {list}")
        }
        Err(e) => format!("{name}: {e}"),
    };
    let on_host = match (&wild, local) {
        (Ok(addrs), Some(l)) => addrs.iter().any(|a| l.contains(a)),
        _ => false,
    };
    let resolves = wild.is_ok();
    let mut detail = format!(
        "{}; {}",
        describe(&wildcard, &wild),
        describe(domain, &apex)
    );
    if resolves && !on_host {
        detail.push_str(
            "; none is an address of this host (fine if a NAT or load balancer forwards it here)",
        );
    }
    Check {
        name: "wildcard DNS",
        ok: resolves && on_host,
        critical: false,
        detail,
        fix: (!resolves).then(|| {
            format!("add a wildcard A record *.{domain} -> this host's public address (and {domain} itself for the API)")
        }),
    }
}

/// The system resolver's answer, deduplicated.
async fn resolve(name: &str) -> Result<Vec<IpAddr>, String> {
    match tokio::time::timeout(PROBE_TIMEOUT, tokio::net::lookup_host((name, 0))).await {
        Ok(Ok(addrs)) => {
            let set: BTreeSet<IpAddr> = addrs.map(|a| a.ip()).collect();
            if set.is_empty() {
                Err("no addresses".into())
            } else {
                Ok(set.into_iter().collect())
            }
        }
        Ok(Err(e)) => Err(format!("does not resolve ({e})")),
        Err(_) => Err(format!("no answer within {} s", PROBE_TIMEOUT.as_secs())),
    }
}

/// This host's interface addresses (`ip -j addr`); None when `ip` cannot tell.
fn host_addresses() -> Option<BTreeSet<IpAddr>> {
    let out = Command::new("ip").args(["-j", "addr"]).output().ok()?;
    if !out.status.success() {
        return None;
    }
    parse_ip_addr_json(&out.stdout)
}

fn parse_ip_addr_json(json: &[u8]) -> Option<BTreeSet<IpAddr>> {
    let links: Vec<serde_json::Value> = serde_json::from_slice(json).ok()?;
    Some(
        links
            .iter()
            .filter_map(|l| l.get("addr_info")?.as_array())
            .flatten()
            .filter_map(|a| a.get("local")?.as_str()?.parse().ok())
            .collect(),
    )
}

async fn port_check(flag: &'static str, addr: &str, local: &Option<BTreeSet<IpAddr>>) -> Check {
    let name = match flag {
        "--https-listen" => "https port",
        "--http-listen" => "http port",
        _ => "api port",
    };
    let Ok(sa) = addr.parse::<SocketAddr>() else {
        return Check {
            name,
            ok: false,
            critical: false,
            detail: format!("{flag} {addr:?} is not an address:port"),
            fix: Some(format!("set it like 127.0.0.1:7070 (env for {flag})")),
        };
    };
    // A wildcard listener answers on loopback.
    let target = match sa.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => SocketAddr::from((Ipv4Addr::LOCALHOST, sa.port())),
        IpAddr::V6(ip) if ip.is_unspecified() => SocketAddr::from((Ipv6Addr::LOCALHOST, sa.port())),
        _ => sa,
    };
    let on_host =
        target.ip().is_loopback() || local.as_ref().is_some_and(|l| l.contains(&target.ip()));
    if !on_host {
        return Check {
            name,
            ok: false,
            critical: false,
            detail: format!("{flag} {sa}: not an address of this host; not tried"),
            fix: Some(format!(
                "listen on one of this host's addresses or 0.0.0.0:{}",
                sa.port()
            )),
        };
    }
    let r = tokio::time::timeout(PROBE_TIMEOUT, tokio::net::TcpStream::connect(target)).await;
    let (ok, why) = match r {
        Ok(Ok(_)) => (true, "accepts connections".to_owned()),
        Ok(Err(e)) => (false, format!("connect failed: {e}")),
        Err(_) => (
            false,
            format!("no answer within {} s", PROBE_TIMEOUT.as_secs()),
        ),
    };
    Check {
        name,
        ok,
        critical: false,
        detail: format!("{flag} {sa}: {target} {why}"),
        fix: (!ok).then(|| {
            format!("start `atelier serve` ({flag} {sa}); if it runs, check that nothing else holds the port (`ss -ltnp 'sport = :{}'`)", sa.port())
        }),
    }
}

/// Forward chains with policy drop outside atelier's tables, from `nft list ruleset`
/// and `iptables-save` (legacy iptables is invisible to nft); Err when neither could
/// be read.
fn forward_drops() -> Result<Vec<String>, String> {
    let mut found = BTreeSet::new();
    let mut read_any = false;
    let mut errors = Vec::new();
    for (bin, args, parse) in [
        (
            "nft",
            &["list", "ruleset"][..],
            nft_forward_drops as fn(&str) -> Vec<String>,
        ),
        ("iptables-save", &[][..], iptables_forward_drops),
    ] {
        if which(bin).is_none() {
            continue;
        }
        match Command::new(bin).args(args).output() {
            Ok(o) if o.status.success() => {
                read_any = true;
                found.extend(parse(&String::from_utf8_lossy(&o.stdout)));
            }
            Ok(o) => errors.push(format!(
                "{bin}: {}",
                String::from_utf8_lossy(&o.stderr).trim()
            )),
            Err(e) => errors.push(format!("{bin}: {e}")),
        }
    }
    if read_any {
        Ok(found.into_iter().collect())
    } else if errors.is_empty() {
        Err("neither nft nor iptables-save is installed".into())
    } else {
        Err(errors.join("; "))
    }
}

/// `table FAMILY NAME chain CHAIN` for base chains on the forward hook with policy drop.
fn nft_forward_drops(ruleset: &str) -> Vec<String> {
    let mut table = String::new();
    let mut chain = String::new();
    let mut found = Vec::new();
    for line in ruleset.lines().map(str::trim) {
        if let Some(rest) = line.strip_prefix("table ") {
            table = rest.trim_end_matches('{').trim().to_owned();
        } else if let Some(rest) = line.strip_prefix("chain ") {
            chain = rest.trim_end_matches('{').trim().to_owned();
        } else if line.contains("hook forward") && line.contains("policy drop") {
            let ours = table
                .split_whitespace()
                .nth(1)
                .is_some_and(|n| n.starts_with("atelier_"));
            if !ours {
                found.push(format!("nft table {table} chain {chain}"));
            }
        }
    }
    found
}

/// `iptables TABLE FORWARD` when the built-in FORWARD chain's policy is DROP.
fn iptables_forward_drops(save: &str) -> Vec<String> {
    let mut table = "";
    let mut found = Vec::new();
    for line in save.lines().map(str::trim) {
        if let Some(t) = line.strip_prefix('*') {
            table = t;
        } else if line.starts_with(":FORWARD DROP") {
            found.push(format!("iptables table {table} chain FORWARD"));
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nft_drop_outside_atelier_tables_is_found() {
        let rs = "table inet filter {\n\tchain forward {\n\t\ttype filter hook forward priority filter; policy drop;\n\t}\n}\n\
                  table inet atelier_atl0 {\n\tchain forward {\n\t\ttype filter hook forward priority filter; policy drop;\n\t}\n}\n\
                  table ip nat {\n\tchain forward {\n\t\ttype filter hook forward priority filter; policy accept;\n\t}\n}\n";
        assert_eq!(
            nft_forward_drops(rs),
            vec!["nft table inet filter chain forward".to_owned()]
        );
        assert!(nft_forward_drops("").is_empty());
    }

    #[test]
    fn iptables_forward_drop_is_found() {
        let save = "*nat\n:PREROUTING ACCEPT [0:0]\nCOMMIT\n*filter\n:INPUT ACCEPT [0:0]\n:FORWARD DROP [12:720]\n:OUTPUT ACCEPT [0:0]\nCOMMIT\n";
        assert_eq!(
            iptables_forward_drops(save),
            vec!["iptables table filter chain FORWARD".to_owned()]
        );
        assert!(iptables_forward_drops("*filter\n:FORWARD ACCEPT [0:0]\n").is_empty());
    }

    #[test]
    fn ip_addr_json_gives_local_addresses() {
        let json = br#"[{"ifname":"lo","addr_info":[{"family":"inet","local":"127.0.0.1"},{"family":"inet6","local":"::1"}]},
                        {"ifname":"eth0","addr_info":[{"family":"inet","local":"203.0.113.7"}]},{"ifname":"dummy0"}]"#;
        let a = parse_ip_addr_json(json).unwrap();
        assert!(a.contains(&"203.0.113.7".parse::<IpAddr>().unwrap()));
        assert!(a.contains(&"::1".parse::<IpAddr>().unwrap()));
        assert_eq!(a.len(), 3);
        assert!(parse_ip_addr_json(b"not json").is_none());
    }

    #[test]
    fn localhost_domains_need_no_dns() {
        assert!(is_local_domain("localhost"));
        assert!(is_local_domain("dev.localhost"));
        assert!(!is_local_domain("sandboxes.example.com"));
        assert!(!is_local_domain("notlocalhost"));
    }

    #[tokio::test]
    async fn localhost_dns_check_is_ok_without_lookups() {
        let c = dns_check("localhost", &None).await;
        assert!(c.ok && c.detail.contains("RFC 6761"));
    }
}
