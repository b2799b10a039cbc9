//! Network settings of one manager: its bridge, subnet, upstream resolvers and the
//! address ranges guests may not reach.

use std::net::{Ipv4Addr, SocketAddr};

use ipnet::Ipv4Net;

use crate::NetError;

/// How this manager wires sandboxes to the network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetConfig {
    /// Bridge interface name (≤ 15 bytes); also names the nftables tables.
    pub bridge: String,
    /// Guest subnet; the first host address is the bridge (gateway and DNS).
    pub subnet: Ipv4Net,
    /// Resolvers the DNS forwarder asks (default: the host's /etc/resolv.conf).
    pub dns_upstreams: Vec<SocketAddr>,
    /// Destinations guests may not open connections to, even through an allow-listed
    /// name (see `allow_blocked_answers`): private, loopback, link-local, CGNAT and
    /// multicast ranges by default.
    pub blocked: Vec<Ipv4Net>,
    /// Let an allow-listed name resolve to an address in `blocked` (or to the host's
    /// own addresses) and open the firewall for it. Off by default: a guest whose
    /// allow-list names e.g. an internal host would otherwise reach private ranges or
    /// the metadata address 169.254.169.254 through DNS (`--egress-allow-private-answers`).
    pub allow_blocked_answers: bool,
}

/// Ranges blocked by default: everything that is not the public internet.
pub const DEFAULT_BLOCKED: &[&str] = &[
    "0.0.0.0/8",
    "10.0.0.0/8",
    "100.64.0.0/10",
    "127.0.0.0/8",
    "169.254.0.0/16",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "224.0.0.0/3",
];

impl NetConfig {
    /// Defaults: bridge `atl0`, subnet 10.88.0.0/16, the host's resolvers.
    pub fn new() -> NetConfig {
        NetConfig {
            bridge: "atl0".into(),
            subnet: "10.88.0.0/16".parse().unwrap_or_default(),
            dns_upstreams: std::fs::read_to_string("/etc/resolv.conf")
                .map(|t| crate::dns::upstreams_from_resolv_conf(&t))
                .unwrap_or_default(),
            blocked: DEFAULT_BLOCKED
                .iter()
                .filter_map(|c| c.parse().ok())
                .collect(),
            allow_blocked_answers: false,
        }
    }

    /// Checks names and sizes; every error names the setting.
    pub fn validate(&self) -> Result<(), NetError> {
        let b = self.bridge.as_bytes();
        if b.is_empty()
            || b.len() > 15
            || !b
                .iter()
                .all(|c| c.is_ascii_alphanumeric() || *c == b'-' || *c == b'_')
        {
            return Err(NetError::Config(format!(
                "bridge name {:?} must be 1-15 characters of [A-Za-z0-9_-]",
                self.bridge
            )));
        }
        if self.subnet.prefix_len() > 28 || self.subnet.prefix_len() < 8 {
            return Err(NetError::Config(format!(
                "subnet {} must be between /8 and /28",
                self.subnet
            )));
        }
        if self.subnet.network() != self.subnet.addr() {
            return Err(NetError::Config(format!(
                "subnet {} is not a network address (did you mean {}?)",
                self.subnet,
                self.subnet.trunc()
            )));
        }
        Ok(())
    }

    /// Ranges the DNS forwarder keeps out of allow-list answers: the blocked ranges,
    /// the gateway and `host_addrs` (the host's own addresses), each unless already
    /// covered; nothing when [`allow_blocked_answers`](Self::allow_blocked_answers).
    pub fn blocked_answers(&self, host_addrs: &[Ipv4Addr]) -> Vec<Ipv4Net> {
        if self.allow_blocked_answers {
            return Vec::new();
        }
        let mut ranges = self.blocked.clone();
        for a in std::iter::once(self.gateway()).chain(host_addrs.iter().copied()) {
            if !ranges.iter().any(|r| r.contains(&a)) {
                ranges.push(Ipv4Net::from(a));
            }
        }
        ranges
    }

    /// The bridge's own address: gateway and DNS server of the guests.
    pub fn gateway(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.subnet.network()) + 1)
    }

    /// First and last guest addresses (as integers, for the lease pool). The last
    /// host address is kept for the prebuild builder.
    pub fn guest_range(&self) -> (u32, u32) {
        (
            u32::from(self.subnet.network()) + 2,
            u32::from(self.subnet.broadcast()) - 2,
        )
    }

    /// The address of the VM that builds prebuilds (one build at a time).
    pub fn builder_address(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.subnet.broadcast()) - 1)
    }

    /// Name of this manager's nftables tables (inet and bridge families).
    pub fn table(&self) -> String {
        format!("atelier_{}", self.bridge.replace('-', "_"))
    }
}

impl Default for NetConfig {
    fn default() -> Self {
        NetConfig::new()
    }
}

/// A TAP name for a sandbox id (`sb-abcdefghij` -> `atlabcdefghij`), within
/// IFNAMSIZ, recognisable as ours.
pub fn tap_name(sandbox_id: &str) -> String {
    format!("atl{}", sandbox_id.trim_start_matches("sb-"))
}

/// The MAC of a guest address: locally administered, unique per lease.
pub fn mac_for(ip: Ipv4Addr) -> [u8; 6] {
    let o = ip.octets();
    [0x02, 0xa7, o[0], o[1], o[2], o[3]]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_derived_values() {
        let c = NetConfig::new();
        c.validate().unwrap();
        assert_eq!(c.gateway(), Ipv4Addr::new(10, 88, 0, 1));
        let (a, b) = c.guest_range();
        assert_eq!(Ipv4Addr::from(a), Ipv4Addr::new(10, 88, 0, 2));
        assert_eq!(Ipv4Addr::from(b), Ipv4Addr::new(10, 88, 255, 253));
        assert_eq!(c.builder_address(), Ipv4Addr::new(10, 88, 255, 254));
        assert_eq!(c.table(), "atelier_atl0");
        assert_eq!(tap_name("sb-abcdefghij"), "atlabcdefghij");
        assert_eq!(
            mac_for(Ipv4Addr::new(10, 88, 0, 2)),
            [2, 0xa7, 10, 88, 0, 2]
        );
    }

    #[test]
    fn bad_settings_are_named() {
        let mut c = NetConfig::new();
        c.bridge = "this-name-is-far-too-long".into();
        assert!(c.validate().unwrap_err().to_string().contains("bridge"));
        let mut c = NetConfig::new();
        c.subnet = "10.88.0.5/24".parse().unwrap();
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .contains("10.88.0.0/24")
        );
        c.subnet = "10.88.0.0/30".parse().unwrap();
        assert!(c.validate().unwrap_err().to_string().contains("/28"));
    }
}
