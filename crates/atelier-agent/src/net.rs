//! Guest network setup (`NetConfig`) over rtnetlink: no `ip` binary needed.
//!
//! The host sends it after every boot and after every restore of a memory snapshot,
//! where the guest still carries the snapshot's MAC and address. So every step fully
//! replaces the previous state: the interface goes down (which also drops its routes),
//! gets the MAC, loses every IPv4 address, gets the new one, comes up, and the default
//! route is replaced; `/etc/resolv.conf` is rewritten (temp file + rename, which also
//! replaces a symlink). Nothing is sent on the network afterwards.
//!
//! The interface is the first non-loopback Ethernet one, preferring real devices
//! (no link kind, such as virtio-net) over virtual ones (tap, veth), lowest index first.

use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;
use std::time::{Duration, Instant};

use atelier_agent_proto::net::{format_mac, valid_hostname};
use atelier_agent_proto::{ErrorKind, NetConfig};
use futures::TryStreamExt;
use rtnetlink::packet_route::AddressFamily;
use rtnetlink::packet_route::link::{
    LinkAttribute, LinkFlags, LinkInfo, LinkLayerType, LinkMessage,
};
use rtnetlink::{Handle, LinkUnspec, RouteMessageBuilder};

use crate::paths::Paths;
use crate::sys;

/// How long to wait for the network interface to appear.
const IFACE_WAIT: Duration = Duration::from_secs(2);

type Failure = (ErrorKind, String);

fn netlink_failure(what: String, e: rtnetlink::Error) -> Failure {
    (ErrorKind::Io, format!("net config: {what}: {e}"))
}

/// One configuration at a time: two interleaved ones would mix their steps.
static APPLYING: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Applies `cfg` (see the module docs). Outside a VM (`in_vm` false: host-side tests)
/// it refuses to run in its parent's network namespace (the host's), and neither loads
/// modules nor sets the hostname.
pub async fn configure(cfg: &NetConfig, paths: &Paths, in_vm: bool) -> Result<(), Failure> {
    cfg.validate().map_err(|m| (ErrorKind::Invalid, m))?;
    if !in_vm && !own_network_namespace() {
        return Err((
            ErrorKind::Unsupported,
            "net config is disabled outside a VM unless the agent runs in a network \
             namespace other than its parent's (e.g. under `unshare --net`)"
                .into(),
        ));
    }
    let _applying = APPLYING.lock().await;
    let (connection, handle, _) = rtnetlink::new_connection().map_err(|e| {
        (
            ErrorKind::from_io(e.kind()),
            format!("net config: opening a netlink socket: {e}"),
        )
    })?;
    let connection = tokio::spawn(connection);
    let result = apply(&handle, cfg, in_vm).await;
    connection.abort();
    let name = result?;
    let resolv = paths.resolv_conf.clone();
    let dns = cfg.dns.clone();
    tokio::task::spawn_blocking(move || write_resolv_conf(&resolv, &dns))
        .await
        .map_err(|e| (ErrorKind::Internal, format!("net config task failed: {e}")))?
        .map_err(|m| (ErrorKind::Io, m))?;
    match &cfg.hostname {
        Some(host) if in_vm => set_hostname(host)?,
        Some(host) => log!("net config: not in a VM, hostname {host} not set"),
        None => {}
    }
    log!(
        "net config: {name} {} {}/{} via {}",
        format_mac(&cfg.mac),
        Ipv4Addr::from(cfg.address),
        cfg.prefix_len,
        Ipv4Addr::from(cfg.gateway)
    );
    Ok(())
}

/// Whether this process is in another network namespace than the process that started
/// it (and than PID 1, where that can be read): false when it cannot be told.
fn own_network_namespace() -> bool {
    let ns = |pid: &str| std::fs::read_link(format!("/proc/{pid}/ns/net"));
    let Ok(ours) = ns("self") else {
        return false;
    };
    let parent = std::os::unix::process::parent_id().to_string();
    match (ns(&parent), ns("1")) {
        (Ok(p), Ok(init)) => p != ours && init != ours,
        (Ok(p), Err(_)) => p != ours,
        (Err(_), _) => false,
    }
}

/// Configures the interface; returns its name.
async fn apply(handle: &Handle, cfg: &NetConfig, in_vm: bool) -> Result<String, Failure> {
    let (index, name) = find_interface(handle, in_vm).await?;
    let link = handle.link();
    link.set(LinkUnspec::new_with_index(index).down().build())
        .execute()
        .await
        .map_err(|e| netlink_failure(format!("setting {name} down"), e))?;
    link.set(
        LinkUnspec::new_with_index(index)
            .address(cfg.mac.to_vec())
            .build(),
    )
    .execute()
    .await
    .map_err(|e| netlink_failure(format!("setting the MAC of {name}"), e))?;
    let old: Vec<_> = handle
        .address()
        .get()
        .set_link_index_filter(index)
        .execute()
        .try_filter(|a| futures::future::ready(a.header.family == AddressFamily::Inet))
        .try_collect()
        .await
        .map_err(|e| netlink_failure(format!("listing the addresses of {name}"), e))?;
    for addr in old {
        handle
            .address()
            .del(addr)
            .execute()
            .await
            .map_err(|e| netlink_failure(format!("removing an old address of {name}"), e))?;
    }
    let address = Ipv4Addr::from(cfg.address);
    handle
        .address()
        .add(index, IpAddr::V4(address), cfg.prefix_len)
        .replace()
        .execute()
        .await
        .map_err(|e| {
            netlink_failure(format!("adding {address}/{} to {name}", cfg.prefix_len), e)
        })?;
    link.set(LinkUnspec::new_with_index(index).up().build())
        .execute()
        .await
        .map_err(|e| netlink_failure(format!("setting {name} up"), e))?;
    let gateway = Ipv4Addr::from(cfg.gateway);
    if !gateway.is_unspecified() {
        let route = RouteMessageBuilder::<Ipv4Addr>::new()
            .gateway(gateway)
            .output_interface(index)
            .build();
        handle
            .route()
            .add(route)
            .replace()
            .execute()
            .await
            .map_err(|e| netlink_failure(format!("setting the default route via {gateway}"), e))?;
    }
    Ok(name)
}

/// The interface to configure; waits up to [`IFACE_WAIT`] for it, loading virtio_net
/// (in a VM) when none is there at first.
async fn find_interface(handle: &Handle, in_vm: bool) -> Result<(u32, String), Failure> {
    let deadline = Instant::now() + IFACE_WAIT;
    let mut loaded = !in_vm;
    loop {
        let links: Vec<LinkMessage> = handle
            .link()
            .get()
            .execute()
            .try_collect()
            .await
            .map_err(|e| netlink_failure("listing network interfaces".into(), e))?;
        if let Some(found) = choose_interface(links.iter().map(describe)) {
            return Ok(found);
        }
        if !loaded {
            loaded = true;
            load_virtio_net().await;
            continue;
        }
        if Instant::now() >= deadline {
            return Err((
                ErrorKind::NotFound,
                format!(
                    "net config: no network interface besides loopback appeared within \
                     {IFACE_WAIT:?}; is the VM started with a virtio-net device?"
                ),
            ));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn load_virtio_net() {
    match tokio::process::Command::new("/sbin/modprobe")
        .args(["-q", "virtio_net"])
        .status()
        .await
    {
        Ok(s) if s.success() => {}
        Ok(s) => log!("modprobe virtio_net: {s}"),
        Err(e) => log!("modprobe virtio_net: {e}"),
    }
}

/// What [`choose_interface`] needs to know of a link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkSummary {
    /// Interface index.
    pub index: u32,
    /// Interface name.
    pub name: String,
    /// Loopback flag set.
    pub loopback: bool,
    /// Link-layer type is Ethernet.
    pub ether: bool,
    /// Has a link kind (a virtual device: tun, veth, bridge...).
    pub virtual_kind: bool,
}

fn describe(msg: &LinkMessage) -> LinkSummary {
    let mut name = String::new();
    let mut virtual_kind = false;
    for attr in &msg.attributes {
        match attr {
            LinkAttribute::IfName(n) => name = n.clone(),
            LinkAttribute::LinkInfo(infos) => {
                virtual_kind |= infos.iter().any(|i| matches!(i, LinkInfo::Kind(_)));
            }
            _ => {}
        }
    }
    LinkSummary {
        index: msg.header.index,
        name,
        loopback: msg.header.flags.contains(LinkFlags::Loopback),
        ether: msg.header.link_layer_type == LinkLayerType::Ether,
        virtual_kind,
    }
}

/// The first non-loopback Ethernet interface, real devices before virtual ones.
pub fn choose_interface(links: impl Iterator<Item = LinkSummary>) -> Option<(u32, String)> {
    links
        .filter(|l| l.ether && !l.loopback)
        .min_by_key(|l| (l.virtual_kind, l.index))
        .map(|l| (l.index, l.name))
}

/// The `resolv.conf` text for `dns`.
pub fn resolv_conf(dns: &[[u8; 4]]) -> String {
    let mut text = String::from("# Written by atelier-agent (NetConfig).\n");
    for server in dns {
        text.push_str(&format!("nameserver {}\n", Ipv4Addr::from(*server)));
    }
    text
}

/// Replaces `path` (a file or a symlink) with the name servers, atomically.
fn write_resolv_conf(path: &Path, dns: &[[u8; 4]]) -> Result<(), String> {
    let tmp = path.with_file_name(".resolv.conf.atelier.tmp");
    std::fs::write(&tmp, resolv_conf(dns))
        .and_then(|()| std::fs::rename(&tmp, path))
        .map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            format!("net config: writing {}: {e}", path.display())
        })
}

pub(crate) fn set_hostname(name: &str) -> Result<(), Failure> {
    if !valid_hostname(name) {
        return Err((ErrorKind::Invalid, format!("invalid hostname {name:?}")));
    }
    sys::set_hostname(name).map_err(|m| (ErrorKind::Io, m))?;
    std::fs::write("/etc/hostname", format!("{name}\n"))
        .map_err(|e| (ErrorKind::Io, format!("writing /etc/hostname: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn link(index: u32, name: &str, loopback: bool, ether: bool, virt: bool) -> LinkSummary {
        LinkSummary {
            index,
            name: name.into(),
            loopback,
            ether,
            virtual_kind: virt,
        }
    }

    #[test]
    fn interface_choice() {
        let vm = [
            link(1, "lo", true, false, false),
            link(2, "eth0", false, true, false),
        ];
        assert_eq!(choose_interface(vm.into_iter()), Some((2, "eth0".into())));
        let mixed = [
            link(1, "lo", true, false, false),
            link(2, "sit0", false, false, true),
            link(3, "tap0", false, true, true),
            link(4, "eth0", false, true, false),
        ];
        assert_eq!(
            choose_interface(mixed.into_iter()),
            Some((4, "eth0".into()))
        );
        let test_ns = [
            link(1, "lo", true, false, false),
            link(5, "eth1", false, true, true),
            link(2, "eth0", false, true, true),
        ];
        assert_eq!(
            choose_interface(test_ns.into_iter()),
            Some((2, "eth0".into()))
        );
        assert_eq!(
            choose_interface([link(1, "lo", true, false, false)].into_iter()),
            None
        );
    }

    #[test]
    fn resolv_conf_text() {
        assert_eq!(
            resolv_conf(&[[10, 0, 0, 1], [1, 1, 1, 1]]),
            "# Written by atelier-agent (NetConfig).\nnameserver 10.0.0.1\nnameserver 1.1.1.1\n"
        );
    }

    #[test]
    fn resolv_conf_replaces_a_symlink() {
        let dir = tempfile::tempdir().expect("tempdir");
        let target = dir.path().join("target");
        std::fs::write(&target, "old\n").expect("write");
        let link = dir.path().join("resolv.conf");
        std::os::unix::fs::symlink(&target, &link).expect("symlink");
        write_resolv_conf(&link, &[[9, 9, 9, 9]]).expect("write");
        assert!(!std::fs::symlink_metadata(&link).expect("meta").is_symlink());
        assert!(
            std::fs::read_to_string(&link)
                .expect("read")
                .contains("9.9.9.9")
        );
        assert_eq!(std::fs::read_to_string(&target).expect("read"), "old\n");
    }
}
