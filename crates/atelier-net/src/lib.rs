//! Host networking for sandboxes: the bridge and per-sandbox TAPs, nftables rules
//! for NAT, isolation and egress, and the DNS forwarder that enforces domain
//! allow-lists. The IP pool itself is persisted by the store.

mod config;
pub mod dns;
pub mod egress;
mod host;
mod nft;

pub use config::{DEFAULT_BLOCKED, NetConfig, mac_for, tap_name};
pub use egress::AllowBatcher;
pub use host::Links;
pub use ipnet::Ipv4Net;
pub use nft::Firewall;

/// What went wrong setting up the network.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// A setting is unusable.
    #[error("network configuration: {0}")]
    Config(String),
    /// A netlink request failed.
    #[error("netlink: cannot {op}: {detail}")]
    Netlink {
        /// What was being done.
        op: &'static str,
        /// The kernel's or the library's answer.
        detail: String,
    },
    /// nft refused or could not run.
    #[error("nftables: cannot {op}: {detail}")]
    Nft {
        /// What was being done.
        op: &'static str,
        /// nft's message.
        detail: String,
    },
}
