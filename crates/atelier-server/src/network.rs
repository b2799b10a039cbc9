//! The manager's side of sandbox networking: the bridge and firewall of this
//! manager, the DNS forwarder guests use, and the egress policy of every guest
//! address (which the forwarder consults on each query).

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex as StdMutex};
use std::time::Duration;

use atelier_core::{EgressPolicy, SandboxId};
use atelier_net::dns::{DnsForwarder, DnsForwarderHandle, EgressHooks};
use atelier_net::{AllowBatcher, Firewall, Links, NetConfig, NetError};
use futures::future::BoxFuture;

use crate::Error;

impl From<NetError> for Error {
    fn from(e: NetError) -> Self {
        match e {
            NetError::Config(_) => Error::invalid(e.to_string()),
            _ => Error::internal(e.to_string()),
        }
    }
}

/// Policies by guest address, shared with the DNS forwarder.
#[derive(Debug, Default)]
struct Policies(StdMutex<HashMap<Ipv4Addr, EgressPolicy>>);

struct Hooks {
    policies: Arc<Policies>,
    /// Cached, batched firewall updates (no `nft` run per DNS answer).
    allow: Arc<AllowBatcher>,
}

impl EgressHooks for Hooks {
    fn policy_for(&self, client: Ipv4Addr) -> Option<EgressPolicy> {
        let map = self.policies.0.lock().unwrap_or_else(|p| p.into_inner());
        map.get(&client).cloned()
    }

    fn allow(
        &self,
        client: Ipv4Addr,
        addrs: Vec<(Ipv4Addr, Duration)>,
    ) -> BoxFuture<'static, Result<(), String>> {
        let allow = Arc::clone(&self.allow);
        Box::pin(async move { allow.allow(client, &addrs).await })
    }
}

/// This manager's network.
pub(crate) struct Network {
    pub(crate) cfg: NetConfig,
    pub(crate) links: Links,
    pub(crate) fw: Firewall,
    policies: Arc<Policies>,
    /// Addresses of sandboxes that are online (their TAP is on the bridge).
    online: StdMutex<HashMap<SandboxId, Ipv4Addr>>,
    allow: Arc<AllowBatcher>,
    _dns: Option<DnsForwarderHandle>,
}

impl std::fmt::Debug for Network {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Network")
            .field("bridge", &self.cfg.bridge)
            .field("subnet", &self.cfg.subnet)
            .finish_non_exhaustive()
    }
}

impl Network {
    /// Creates or refreshes the bridge and rules and starts the DNS forwarder on
    /// the bridge address.
    pub(crate) async fn open(cfg: &NetConfig) -> Result<Network, Error> {
        cfg.validate()?;
        let links = Links::open(cfg)?;
        links.ensure_bridge().await?;
        let fw = Firewall::new(cfg);
        fw.install().await?;
        let policies = Arc::new(Policies::default());
        let allow = Arc::new(AllowBatcher::spawn(Arc::new(fw.clone())));
        let hooks = Arc::new(Hooks {
            policies: Arc::clone(&policies),
            allow: Arc::clone(&allow),
        });
        let blocked_answers = blocked_answers(cfg, &links).await;
        let listen = SocketAddr::from((cfg.gateway(), 53));
        let dns = if cfg.dns_upstreams.is_empty() {
            tracing::warn!(
                "no upstream DNS servers (none in /etc/resolv.conf; set --dns-upstream): guests cannot resolve names"
            );
            None
        } else {
            let fwd = DnsForwarder::bind(listen, cfg.dns_upstreams.clone(), hooks)
                .await
                .map_err(|e| {
                    Error::unavailable(format!(
                        "cannot serve DNS for guests on {listen}: {e} (is another DNS server bound to all addresses?)"
                    ))
                })?
                .with_blocked_answers(blocked_answers);
            Some(fwd.spawn())
        };
        tracing::info!(bridge = %cfg.bridge, subnet = %cfg.subnet, dns = %listen, "network ready");
        Ok(Network {
            cfg: cfg.clone(),
            links,
            fw,
            policies,
            online: StdMutex::new(HashMap::new()),
            allow,
            _dns: dns,
        })
    }

    /// Puts a guest address under `policy` (firewall sets and DNS answers) and
    /// binds it to its TAP.
    pub(crate) async fn admit(
        &self,
        ip: Ipv4Addr,
        tap: &str,
        policy: &EgressPolicy,
    ) -> Result<(), Error> {
        self.fw.admit(ip, tap, policy).await?;
        self.policies
            .0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(ip, policy.clone());
        Ok(())
    }

    /// Forgets everything about a guest address.
    pub(crate) async fn forget(&self, ip: Ipv4Addr) -> Result<(), Error> {
        self.policies
            .0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&ip);
        self.allow.forget(ip);
        self.fw.forget(ip).await?;
        Ok(())
    }

    /// Records that a sandbox's TAP joined the bridge with address `ip`.
    pub(crate) fn came_online(&self, id: &SandboxId, ip: Ipv4Addr) {
        self.online_map().insert(id.clone(), ip);
    }

    /// Records that a sandbox is off the network (its VM is gone).
    pub(crate) fn went_offline(&self, id: &SandboxId) {
        self.online_map().remove(id);
    }

    /// The address of an online sandbox.
    pub(crate) fn online_ip(&self, id: &SandboxId) -> Option<Ipv4Addr> {
        self.online_map().get(id).copied()
    }

    /// Ids of online sandboxes.
    pub(crate) fn online_ids(&self) -> Vec<SandboxId> {
        self.online_map().keys().cloned().collect()
    }

    fn online_map(&self) -> std::sync::MutexGuard<'_, HashMap<SandboxId, Ipv4Addr>> {
        self.online.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The guest's side of its configuration.
    pub(crate) fn guest_config(&self, ip: Ipv4Addr) -> atelier_agent_proto::NetConfig {
        atelier_agent_proto::NetConfig {
            mac: atelier_net::mac_for(ip),
            address: ip.octets(),
            prefix_len: self.cfg.subnet.prefix_len(),
            gateway: self.cfg.gateway().octets(),
            dns: vec![self.cfg.gateway().octets()],
            hostname: None,
        }
    }
}

/// Ranges DNS answers for allow-list guests must not open (see
/// [`NetConfig::blocked_answers`]), with this host's addresses.
async fn blocked_answers(cfg: &NetConfig, links: &Links) -> Vec<atelier_net::Ipv4Net> {
    if cfg.allow_blocked_answers {
        tracing::warn!(
            "allow-listed names may resolve to blocked ranges (--egress-allow-private-answers)"
        );
    }
    let own = links.host_addresses().await.unwrap_or_else(|e| {
        tracing::warn!(error = %e, "cannot list the host's addresses for DNS filtering");
        Vec::new()
    });
    cfg.blocked_answers(&own)
}
