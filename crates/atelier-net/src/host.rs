//! The bridge and the sandboxes' TAP devices, driven over rtnetlink.
//!
//! QEMU creates each TAP itself (`-netdev tap,ifname=…`), so a TAP lives exactly as
//! long as its VMM: a killed VMM cannot leak one. The manager attaches the TAP to
//! the bridge only after the guest has taken its address, so a restored or forked
//! guest still wearing its snapshot's address never appears on the bridge.

use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use futures::TryStreamExt;
use rtnetlink::packet_route::link::{LinkAttribute, LinkMessage};
use rtnetlink::{Handle, LinkBridge, LinkBridgePort, LinkUnspec};

use crate::{NetConfig, NetError};

/// A netlink handle bound to this manager's bridge.
#[derive(Clone)]
pub struct Links {
    handle: Handle,
    cfg: NetConfig,
}

impl std::fmt::Debug for Links {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Links")
            .field("bridge", &self.cfg.bridge)
            .finish_non_exhaustive()
    }
}

fn nl(op: &'static str) -> impl Fn(rtnetlink::Error) -> NetError {
    move |e| NetError::Netlink {
        op,
        detail: e.to_string(),
    }
}

/// True for the "no such device" answer.
fn is_enodev(e: &rtnetlink::Error) -> bool {
    matches!(e, rtnetlink::Error::NetlinkError(m) if m.raw_code() == -libc_enodev())
}

fn is_eexist(e: &rtnetlink::Error) -> bool {
    matches!(e, rtnetlink::Error::NetlinkError(m) if m.raw_code() == -17)
}

const fn libc_enodev() -> i32 {
    19
}

impl Links {
    /// Opens a netlink connection (its task runs on the current runtime).
    pub fn open(cfg: &NetConfig) -> Result<Links, NetError> {
        let (conn, handle, _) = rtnetlink::new_connection().map_err(|e| NetError::Netlink {
            op: "open netlink socket",
            detail: e.to_string(),
        })?;
        tokio::spawn(conn);
        Ok(Links {
            handle,
            cfg: cfg.clone(),
        })
    }

    /// A link by name, if present.
    pub async fn get(&self, name: &str) -> Result<Option<LinkMessage>, NetError> {
        let mut s = self
            .handle
            .link()
            .get()
            .match_name(name.to_owned())
            .execute();
        match s.try_next().await {
            Ok(m) => Ok(m),
            Err(e) if is_enodev(&e) => Ok(None),
            Err(e) => Err(nl("get link")(e)),
        }
    }

    /// Creates the bridge with the gateway address if missing and brings it up;
    /// turns on IPv4 forwarding. Idempotent.
    pub async fn ensure_bridge(&self) -> Result<u32, NetError> {
        let name = &self.cfg.bridge;
        if self.get(name).await?.is_none() {
            match self
                .handle
                .link()
                .add(LinkBridge::new(name).build())
                .execute()
                .await
            {
                Err(e) if !is_eexist(&e) => return Err(nl("create bridge")(e)),
                _ => {}
            }
        }
        let index = self
            .get(name)
            .await?
            .map(|m| m.header.index)
            .ok_or_else(|| NetError::Netlink {
                op: "create bridge",
                detail: format!("{name} vanished after creation"),
            })?;
        match self
            .handle
            .address()
            .add(
                index,
                IpAddr::V4(self.cfg.gateway()),
                self.cfg.subnet.prefix_len(),
            )
            .execute()
            .await
        {
            Err(e) if !is_eexist(&e) => return Err(nl("add bridge address")(e)),
            _ => {}
        }
        self.handle
            .link()
            .set(LinkUnspec::new_with_index(index).up().build())
            .execute()
            .await
            .map_err(nl("bring bridge up"))?;
        std::fs::write("/proc/sys/net/ipv4/ip_forward", "1").map_err(|e| NetError::Netlink {
            op: "enable IPv4 forwarding",
            detail: e.to_string(),
        })?;
        Ok(index)
    }

    /// Every IPv4 address configured on this host (all interfaces), for keeping DNS
    /// answers that point at the host itself out of guests' allow-lists.
    pub async fn host_addresses(&self) -> Result<Vec<Ipv4Addr>, NetError> {
        use rtnetlink::packet_route::address::AddressAttribute;
        let mut out = Vec::new();
        let mut stream = self.handle.address().get().execute();
        while let Some(msg) = stream.try_next().await.map_err(nl("list host addresses"))? {
            for attr in msg.attributes {
                if let AddressAttribute::Address(IpAddr::V4(a))
                | AddressAttribute::Local(IpAddr::V4(a)) = attr
                    && !out.contains(&a)
                {
                    out.push(a);
                }
            }
        }
        Ok(out)
    }

    /// Attaches a TAP (made by the VMM; waited for up to 5 s) to the bridge as an
    /// isolated port and brings it up.
    pub async fn attach(&self, tap: &str) -> Result<(), NetError> {
        let bridge = self
            .get(&self.cfg.bridge)
            .await?
            .map(|m| m.header.index)
            .ok_or_else(|| NetError::Netlink {
                op: "attach tap",
                detail: format!("bridge {} is missing", self.cfg.bridge),
            })?;
        let deadline = Instant::now() + Duration::from_secs(5);
        let index = loop {
            if let Some(m) = self.get(tap).await? {
                break m.header.index;
            }
            if Instant::now() > deadline {
                return Err(NetError::Netlink {
                    op: "attach tap",
                    detail: format!("{tap} does not exist (did the VMM start?)"),
                });
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        self.handle
            .link()
            .set(
                LinkUnspec::new_with_index(index)
                    .controller(bridge)
                    .up()
                    .build(),
            )
            .execute()
            .await
            .map_err(nl("attach tap"))?;
        // Isolated ports cannot exchange frames with each other, only with the
        // bridge itself: sandboxes never see one another at layer 2.
        self.handle
            .link()
            .set_port(LinkBridgePort::new(index).isolated(true).build())
            .execute()
            .await
            .map_err(nl("isolate bridge port"))?;
        Ok(())
    }

    /// Deletes a link if it exists.
    pub async fn delete(&self, name: &str) -> Result<(), NetError> {
        let Some(m) = self.get(name).await? else {
            return Ok(());
        };
        match self.handle.link().del(m.header.index).execute().await {
            Err(e) if !is_enodev(&e) => Err(nl("delete link")(e)),
            _ => Ok(()),
        }
    }

    /// Names of the links enslaved to the bridge.
    pub async fn ports(&self) -> Result<Vec<String>, NetError> {
        let Some(bridge) = self.get(&self.cfg.bridge).await? else {
            return Ok(Vec::new());
        };
        let bridge = bridge.header.index;
        let mut out = Vec::new();
        let mut s = self.handle.link().get().execute();
        while let Some(m) = s.try_next().await.map_err(nl("list links"))? {
            let mut name = None;
            let mut controller = None;
            for a in &m.attributes {
                match a {
                    LinkAttribute::IfName(n) => name = Some(n.clone()),
                    LinkAttribute::Controller(c) => controller = Some(*c),
                    _ => {}
                }
            }
            if controller == Some(bridge)
                && let Some(n) = name
            {
                out.push(n);
            }
        }
        Ok(out)
    }

    /// Whether the bridge holds the gateway address (used by `doctor`).
    pub fn gateway(&self) -> Ipv4Addr {
        self.cfg.gateway()
    }
}
