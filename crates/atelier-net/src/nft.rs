//! nftables rules for NAT, isolation and egress, one `inet` and one `bridge` table
//! per manager (named after its bridge).
//!
//! The rules are fixed; what changes per sandbox are set elements keyed by the
//! guest address (deny-all, allow-list, DNS-learned allowed destinations) and by
//! TAP + address (anti-spoofing). The static part is written in nft's own syntax
//! (readable in `nft list ruleset`, every value typed and formatted here); the
//! elements go through `nft -j` (JSON), whose structure leaves nothing to quote.

use std::collections::{HashMap, HashSet};
use std::net::Ipv4Addr;
use std::time::Duration;

use atelier_core::EgressPolicy;
use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;

use crate::{NetConfig, NetError};

/// The firewall of one manager.
#[derive(Debug, Clone)]
pub struct Firewall {
    cfg: NetConfig,
    table: String,
}

/// Sets holding per-sandbox elements keyed by the guest address alone.
const ADDR_SETS: [&str; 2] = ["deny", "listed"];

impl Firewall {
    /// The firewall for `cfg` (nothing is changed until [`Firewall::install`]).
    pub fn new(cfg: &NetConfig) -> Firewall {
        Firewall {
            table: cfg.table(),
            cfg: cfg.clone(),
        }
    }

    /// The static ruleset (sets keep their elements across a re-install).
    pub fn ruleset(&self) -> String {
        let t = &self.table;
        let br = &self.cfg.bridge;
        let gw = self.cfg.gateway();
        let net = self.cfg.subnet;
        let blocked: Vec<String> = self.cfg.blocked.iter().map(|b| b.to_string()).collect();
        let mut s = String::new();
        let line = |s: &mut String, l: String| {
            s.push_str(&l);
            s.push('\n');
        };
        line(&mut s, format!("add table inet {t}"));
        line(
            &mut s,
            format!("add set inet {t} deny {{ type ipv4_addr; }}"),
        );
        line(
            &mut s,
            format!("add set inet {t} listed {{ type ipv4_addr; }}"),
        );
        line(
            &mut s,
            format!("add set inet {t} allowed {{ type ipv4_addr . ipv4_addr; flags timeout; }}"),
        );
        line(
            &mut s,
            format!("add set inet {t} blocked {{ type ipv4_addr; flags interval; auto-merge; }}"),
        );
        line(&mut s, format!("flush set inet {t} blocked"));
        if !blocked.is_empty() {
            line(
                &mut s,
                format!("add element inet {t} blocked {{ {} }}", blocked.join(", ")),
            );
        }
        let chain = |name: &str, spec: &str, rules: &[String]| -> String {
            let mut c =
                format!("add chain inet {t} {name} {{ {spec} }}\nflush chain inet {t} {name}\n");
            for r in rules {
                c.push_str(&format!("add rule inet {t} {name} {r}\n"));
            }
            c
        };
        let admin = "reject with icmpx type admin-prohibited";
        // Guests talk to the host only for DNS (and ping): not the API, not the
        // proxy, not any other service, whatever address they aim at.
        s.push_str(&chain(
            "input",
            "type filter hook input priority filter; policy accept;",
            &[
                format!("iifname \"{br}\" ct state established,related accept"),
                format!("iifname \"{br}\" ip daddr {gw} udp dport 53 accept"),
                format!("iifname \"{br}\" ip daddr {gw} tcp dport 53 accept"),
                format!("iifname \"{br}\" icmp type echo-request accept"),
                format!("iifname \"{br}\" {admin}"),
            ],
        ));
        s.push_str(&chain(
            "forward",
            "type filter hook forward priority filter; policy accept;",
            &[
                // Guest to guest through the gateway: never.
                format!("iifname \"{br}\" oifname \"{br}\" drop"),
                format!("iifname \"{br}\" ct state established,related accept"),
                format!("oifname \"{br}\" ct state established,related accept"),
                format!("oifname \"{br}\" drop"),
                format!("iifname \"{br}\" meta nfproto ipv6 drop"),
                format!("iifname \"{br}\" ip saddr != {net} drop"),
                format!("iifname \"{br}\" ip saddr @deny {admin}"),
                format!("iifname \"{br}\" ip saddr . ip daddr @allowed accept"),
                format!("iifname \"{br}\" ip saddr @listed {admin}"),
                format!("iifname \"{br}\" ip daddr @blocked {admin}"),
                format!("iifname \"{br}\" accept"),
            ],
        ));
        s.push_str(&chain(
            "postrouting",
            "type nat hook postrouting priority srcnat; policy accept;",
            &[format!("ip saddr {net} oifname != \"{br}\" masquerade")],
        ));
        // Other local users of the host reach guests only through the proxy: a
        // connection the host opens onto the bridge must come from the manager's
        // user. (Packets without a socket, e.g. the kernel's own, do not match.)
        s.push_str(&chain(
            "output",
            "type filter hook output priority filter; policy accept;",
            &[format!(
                "oifname \"{br}\" meta skuid != {} {admin}",
                manager_uid()
            )],
        ));
        // Layer 2: a port may only send IPv4/ARP from the address leased to it.
        // (`meta ibrname` would name the bridge, but kernels without
        // nft_meta_bridge refuse it; a set of our TAPs works everywhere.)
        line(&mut s, format!("add table bridge {t}"));
        s.push_str(&format!(
            "add set bridge {t} ports {{ type ifname; }}\n\
             add set bridge {t} bound {{ type ifname . ipv4_addr; }}\n\
             add chain bridge {t} prerouting {{ type filter hook prerouting priority filter; policy accept; }}\n\
             flush chain bridge {t} prerouting\n\
             add rule bridge {t} prerouting iifname != @ports accept\n\
             add rule bridge {t} prerouting ether type ip iifname . ip saddr @bound accept\n\
             add rule bridge {t} prerouting ether type arp iifname . arp saddr ip @bound accept\n\
             add rule bridge {t} prerouting drop\n\
             add chain bridge {t} forward {{ type filter hook forward priority filter; policy accept; }}\n\
             flush chain bridge {t} forward\n\
             add rule bridge {t} forward iifname @ports drop\n"
        ));
        s
    }

    /// Installs or refreshes the rules (atomically; set elements are kept).
    pub async fn install(&self) -> Result<(), NetError> {
        nft(&["-f", "-"], Some(self.ruleset().as_bytes())).await?;
        Ok(())
    }

    /// Removes both tables (tests, `network teardown`).
    pub async fn teardown(&self) -> Result<(), NetError> {
        for fam in ["inet", "bridge"] {
            let _ = nft(&["delete", "table", fam, &self.table], None).await;
        }
        Ok(())
    }

    fn element(&self, family: &str, set: &str, elem: Value) -> Value {
        json!({"element": {"family": family, "table": self.table, "name": set, "elem": [elem]}})
    }

    /// Puts a sandbox's address under `policy` and binds it to its TAP.
    pub async fn admit(
        &self,
        ip: Ipv4Addr,
        tap: &str,
        policy: &EgressPolicy,
    ) -> Result<(), NetError> {
        let ip_s = ip.to_string();
        let mut cmds = vec![
            json!({"add": self.element("bridge", "ports", json!(tap))}),
            json!({"add": self.element("bridge", "bound", json!({"concat": [tap, ip_s]}))}),
        ];
        let want = match policy {
            EgressPolicy::AllowAll => None,
            EgressPolicy::DenyAll => Some("deny"),
            EgressPolicy::AllowList(_) => Some("listed"),
        };
        // One transaction, no read first: an element that must not be in a set is
        // added and deleted in the same batch, which succeeds whether or not it was
        // there before.
        for set in ADDR_SETS {
            cmds.push(json!({"add": self.element("inet", set, json!(ip_s))}));
            if Some(set) != want {
                cmds.push(json!({"delete": self.element("inet", set, json!(ip_s))}));
            }
        }
        self.batch(cmds).await
    }

    /// Lets `ip` open connections to each destination for its time to live.
    pub async fn allow(
        &self,
        ip: Ipv4Addr,
        dests: &[(Ipv4Addr, Duration)],
    ) -> Result<(), NetError> {
        let entries: Vec<_> = dests.iter().map(|(d, ttl)| (ip, *d, *ttl)).collect();
        self.allow_many(&entries).await
    }

    /// Lets each guest open connections to its destination for (at least) the given
    /// time, all in one `nft` run (see [`crate::egress::AllowBatcher`]).
    pub async fn allow_many(
        &self,
        entries: &[(Ipv4Addr, Ipv4Addr, Duration)],
    ) -> Result<(), NetError> {
        if entries.is_empty() {
            return Ok(());
        }
        let cmds = entries
            .iter()
            .map(|(ip, d, ttl)| {
                // Resolvers and clients cache answers; keep the door open long enough
                // that a cached address still connects.
                let secs = crate::egress::firewall_timeout(*ttl).as_secs();
                json!({"add": self.element("inet", "allowed", json!({"elem": {"val": {"concat": [ip.to_string(), d.to_string()]}, "timeout": secs}}))})
            })
            .collect();
        self.batch(cmds).await
    }

    /// Removes every element of a sandbox's address (and its TAP binding): its
    /// policy, its learned destinations. The next holder of the address starts clean.
    pub async fn forget(&self, ip: Ipv4Addr) -> Result<(), NetError> {
        let ip_s = ip.to_string();
        let inet = self.sets("inet").await?;
        let bridge = self.sets("bridge").await?;
        let mut cmds = Vec::new();
        for set in addr_sets_holding(&inet, &ip_s) {
            cmds.push(json!({"delete": self.element("inet", set, json!(ip_s))}));
        }
        for e in members(&inet, "allowed") {
            let parts = concat_parts(e);
            if parts.first() == Some(&ip_s) {
                cmds.push(
                    json!({"delete": self.element("inet", "allowed", json!({"concat": parts}))}),
                );
            }
        }
        for e in members(&bridge, "bound") {
            let parts = concat_parts(e);
            if parts.get(1) != Some(&ip_s) {
                continue;
            }
            if let Some(tap) = parts.first()
                && members(&bridge, "ports").any(|p| p.as_str() == Some(tap))
            {
                cmds.push(json!({"delete": self.element("bridge", "ports", json!(tap))}));
            }
            cmds.push(json!({"delete": self.element("bridge", "bound", json!({"concat": parts}))}));
        }
        self.batch(cmds).await
    }

    /// Guest addresses present in any per-sandbox set (for reconcile).
    pub async fn known_addresses(&self) -> Result<HashSet<Ipv4Addr>, NetError> {
        let inet = self.sets("inet").await?;
        let bridge = self.sets("bridge").await?;
        let mut out = HashSet::new();
        for set in ADDR_SETS {
            for e in members(&inet, set) {
                if let Some(a) = e.as_str().and_then(|s| s.parse().ok()) {
                    out.insert(a);
                }
            }
        }
        for (sets, set, idx) in [(&inet, "allowed", 0), (&bridge, "bound", 1)] {
            for e in members(sets, set) {
                if let Some(a) = concat_parts(e).get(idx).and_then(|s| s.parse().ok()) {
                    out.insert(a);
                }
            }
        }
        Ok(out)
    }

    /// Every set of this manager's table in `family`, with its elements as nft's
    /// JSON shows them (strings, or `{"concat": [...]}`; timeouts unwrapped), read
    /// with one `nft` run.
    async fn sets(&self, family: &str) -> Result<HashMap<String, Vec<Value>>, NetError> {
        let out = nft(&["-j", "list", "table", family, &self.table], None).await?;
        let v: Value = serde_json::from_slice(&out).map_err(|e| NetError::Nft {
            op: "list table",
            detail: format!("unreadable JSON from nft: {e}"),
        })?;
        let mut sets = HashMap::new();
        for item in v["nftables"].as_array().into_iter().flatten() {
            let Some(name) = item["set"]["name"].as_str() else {
                continue;
            };
            let els = item["set"]["elem"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|e| match e.get("elem") {
                    Some(inner) => inner["val"].clone(),
                    None => e.clone(),
                })
                .collect();
            sets.insert(name.to_owned(), els);
        }
        Ok(sets)
    }

    async fn batch(&self, cmds: Vec<Value>) -> Result<(), NetError> {
        if cmds.is_empty() {
            return Ok(());
        }
        let doc = json!({"nftables": cmds}).to_string();
        nft(&["-j", "-f", "-"], Some(doc.as_bytes())).await?;
        Ok(())
    }
}

/// The elements of one set (none when it is absent).
fn members<'a>(
    sets: &'a HashMap<String, Vec<Value>>,
    set: &str,
) -> impl Iterator<Item = &'a Value> + use<'a> {
    sets.get(set).into_iter().flatten()
}

/// The per-address sets (deny, listed) that hold `ip`.
/// The user this manager runs as (the owner of `/proc/self`, i.e. the effective
/// uid); root when it cannot be read.
fn manager_uid() -> u32 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self")
        .map(|m| m.uid())
        .unwrap_or(0)
}

fn addr_sets_holding(sets: &HashMap<String, Vec<Value>>, ip: &str) -> Vec<&'static str> {
    ADDR_SETS
        .into_iter()
        .filter(|set| members(sets, set).any(|e| e.as_str() == Some(ip)))
        .collect()
}

fn concat_parts(v: &Value) -> Vec<String> {
    v["concat"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|x| x.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// Runs `nft` with `args`, feeding `stdin`; its stderr becomes the error.
async fn nft(args: &[&str], stdin: Option<&[u8]>) -> Result<Vec<u8>, NetError> {
    let mut cmd = tokio::process::Command::new("nft");
    cmd.args(args)
        .stdin(if stdin.is_some() {
            std::process::Stdio::piped()
        } else {
            std::process::Stdio::null()
        })
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    let mut child = cmd.spawn().map_err(|e| NetError::Nft {
        op: "run nft",
        detail: format!("cannot run nft (install the nftables package): {e}"),
    })?;
    if let (Some(data), Some(mut w)) = (stdin, child.stdin.take()) {
        w.write_all(data).await.map_err(|e| NetError::Nft {
            op: "run nft",
            detail: e.to_string(),
        })?;
    }
    let out = child.wait_with_output().await.map_err(|e| NetError::Nft {
        op: "run nft",
        detail: e.to_string(),
    })?;
    if !out.status.success() {
        return Err(NetError::Nft {
            op: "apply rules",
            detail: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(out.stdout)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_managers_user_reaches_guests_from_the_host() {
        let mut cfg = NetConfig::new();
        cfg.bridge = "atlx".into();
        let r = Firewall::new(&cfg).ruleset();
        assert!(r.contains(&format!(
            "add rule inet atelier_atlx output oifname \"atlx\" meta skuid != {} reject",
            manager_uid()
        )));
    }

    #[test]
    fn ruleset_names_bridge_subnet_and_gateway() {
        let mut cfg = NetConfig::new();
        cfg.bridge = "atlx".into();
        cfg.subnet = "10.77.0.0/24".parse().unwrap();
        let r = Firewall::new(&cfg).ruleset();
        assert!(r.contains("add table inet atelier_atlx"));
        assert!(r.contains("iifname \"atlx\" ip daddr 10.77.0.1 udp dport 53 accept"));
        assert!(r.contains("ip saddr 10.77.0.0/24 oifname != \"atlx\" masquerade"));
        assert!(r.contains("add element inet atelier_atlx blocked { 0.0.0.0/8, 10.0.0.0/8"));
    }
}
