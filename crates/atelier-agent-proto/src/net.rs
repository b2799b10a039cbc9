//! Guest network configuration, sent by the host after every boot and every restore
//! of a memory snapshot ([`crate::HostMessage::NetConfig`]).

use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

/// The IPv4 setup of the guest's network interface. Applying it replaces whatever an
/// earlier `NetConfig` (or the snapshot the guest was restored from) set.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetConfig {
    /// MAC address to give the interface (unicast, not all zeros).
    pub mac: [u8; 6],
    /// The guest's IPv4 address.
    pub address: [u8; 4],
    /// Prefix length of `address` (1..=32).
    pub prefix_len: u8,
    /// Default gateway; `0.0.0.0` for no default route.
    pub gateway: [u8; 4],
    /// Name servers, written to `/etc/resolv.conf` in this order.
    pub dns: Vec<[u8; 4]>,
    /// Hostname to set (kernel and `/etc/hostname`); kept when `None`.
    pub hostname: Option<String>,
}

impl NetConfig {
    /// Checks the values that need no guest to check.
    pub fn validate(&self) -> Result<(), String> {
        if self.mac[0] & 1 != 0 || self.mac == [0; 6] {
            return Err(format!(
                "net config: MAC {} is not a unicast address",
                format_mac(&self.mac)
            ));
        }
        let address = Ipv4Addr::from(self.address);
        if address.is_unspecified() || address.is_broadcast() || address.is_multicast() {
            return Err(format!("net config: {address} is not a host address"));
        }
        if !(1..=32).contains(&self.prefix_len) {
            return Err(format!(
                "net config: prefix length {} is not in 1..=32",
                self.prefix_len
            ));
        }
        if let Some(name) = &self.hostname
            && !valid_hostname(name)
        {
            return Err(format!("net config: invalid hostname {name:?}"));
        }
        Ok(())
    }
}

/// `aa:bb:cc:dd:ee:ff` rendering of a MAC address.
pub fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// An RFC 1123 host name: dot-separated labels of `[A-Za-z0-9-]`, 1-63 characters
/// each, not starting or ending with `-`, at most 64 characters in all.
pub fn valid_hostname(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> NetConfig {
        NetConfig {
            mac: [0x02, 0, 0, 0, 0, 1],
            address: [10, 0, 0, 2],
            prefix_len: 24,
            gateway: [10, 0, 0, 1],
            dns: vec![[10, 0, 0, 1]],
            hostname: None,
        }
    }

    #[test]
    fn validation() {
        assert!(cfg().validate().is_ok());
        assert!(
            NetConfig {
                mac: [1, 0, 0, 0, 0, 1],
                ..cfg()
            }
            .validate()
            .is_err()
        );
        assert!(
            NetConfig {
                mac: [0; 6],
                ..cfg()
            }
            .validate()
            .is_err()
        );
        assert!(
            NetConfig {
                address: [0; 4],
                ..cfg()
            }
            .validate()
            .is_err()
        );
        assert!(
            NetConfig {
                prefix_len: 33,
                ..cfg()
            }
            .validate()
            .is_err()
        );
        assert!(
            NetConfig {
                hostname: Some("bad name".into()),
                ..cfg()
            }
            .validate()
            .is_err()
        );
        assert!(
            NetConfig {
                hostname: Some("sbx-1".into()),
                ..cfg()
            }
            .validate()
            .is_ok()
        );
        assert_eq!(format_mac(&cfg().mac), "02:00:00:00:00:01");
    }
}
