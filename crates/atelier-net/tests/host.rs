//! The bridge and the firewall against the real kernel (tests run as root). Each
//! test uses its own bridge name and subnet and removes them at the end.

#![allow(clippy::unwrap_used)]

use std::net::Ipv4Addr;
use std::time::Duration;

use atelier_core::EgressPolicy;
use atelier_net::{Firewall, Links, NetConfig};

fn cfg(tag: &str, third: u8) -> NetConfig {
    let mut c = NetConfig::new();
    c.bridge = format!("atlT{tag}{}", std::process::id() % 10000);
    c.subnet = format!("10.250.{third}.0/24").parse().unwrap();
    c
}

struct Cleanup(NetConfig);
impl Drop for Cleanup {
    fn drop(&mut self) {
        let t = self.0.table();
        let _ = std::process::Command::new("ip")
            .args(["link", "del", &self.0.bridge])
            .status();
        for fam in ["inet", "bridge"] {
            let _ = std::process::Command::new("nft")
                .args(["delete", "table", fam, &t])
                .status();
        }
    }
}

fn sh(cmd: &str) -> String {
    let out = std::process::Command::new("sh")
        .args(["-c", cmd])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test]
async fn bridge_is_created_idempotently_and_ports_attach_isolated() {
    let c = cfg("b", 1);
    let _cleanup = Cleanup(c.clone());
    let links = Links::open(&c).unwrap();
    let i1 = links.ensure_bridge().await.unwrap();
    let i2 = links.ensure_bridge().await.unwrap();
    assert_eq!(i1, i2);
    let addr = sh(&format!("ip -4 -o addr show dev {}", c.bridge));
    assert!(addr.contains("10.250.1.1/24"), "{addr}");
    // A TAP made the way QEMU makes one.
    let tap = format!("atlt{}", std::process::id() % 100000);
    assert!(
        std::process::Command::new("ip")
            .args(["tuntap", "add", "dev", &tap, "mode", "tap"])
            .status()
            .unwrap()
            .success()
    );
    links.attach(&tap).await.unwrap();
    assert_eq!(links.ports().await.unwrap(), vec![tap.clone()]);
    let detail = sh(&format!("ip -d link show dev {tap}"));
    assert!(detail.contains("isolated on"), "{detail}");
    links.delete(&tap).await.unwrap();
    links.delete(&tap).await.unwrap();
    assert!(links.ports().await.unwrap().is_empty());
    assert!(links.attach("atlnosuchtap").await.is_err());
}

#[tokio::test]
async fn firewall_installs_admits_allows_and_forgets() {
    let c = cfg("f", 2);
    let _cleanup = Cleanup(c.clone());
    let fw = Firewall::new(&c);
    fw.install().await.unwrap();
    fw.install().await.unwrap(); // idempotent, no duplicated rules
    let t = c.table();
    let rules = sh(&format!("nft list chain inet {t} forward"));
    assert_eq!(rules.matches("masquerade").count(), 0);
    assert_eq!(rules.matches("@deny").count(), 1, "{rules}");

    let a = Ipv4Addr::new(10, 250, 2, 2);
    let b = Ipv4Addr::new(10, 250, 2, 3);
    fw.admit(a, "atlaaa", &EgressPolicy::DenyAll).await.unwrap();
    fw.admit(b, "atlbbb", &"github.com".parse().unwrap())
        .await
        .unwrap();
    fw.allow(
        b,
        &[(Ipv4Addr::new(198, 51, 100, 7), Duration::from_secs(60))],
    )
    .await
    .unwrap();
    fw.allow(
        b,
        &[(Ipv4Addr::new(198, 51, 100, 7), Duration::from_secs(60))],
    )
    .await
    .unwrap();
    let known = fw.known_addresses().await.unwrap();
    assert!(known.contains(&a) && known.contains(&b));
    // Changing the policy moves the address between sets.
    fw.admit(a, "atlaaa", &EgressPolicy::AllowAll)
        .await
        .unwrap();
    let deny = sh(&format!("nft list set inet {t} deny"));
    assert!(!deny.contains("10.250.2.2"), "{deny}");
    let bound = sh(&format!("nft list set bridge {t} bound"));
    assert!(bound.contains("\"atlaaa\" . 10.250.2.2"), "{bound}");

    fw.forget(b).await.unwrap();
    fw.forget(b).await.unwrap();
    let allowed = sh(&format!("nft list set inet {t} allowed"));
    assert!(!allowed.contains("198.51.100.7"), "{allowed}");
    let known = fw.known_addresses().await.unwrap();
    assert!(known.contains(&a) && !known.contains(&b));
    // A re-install keeps the elements.
    fw.install().await.unwrap();
    assert!(fw.known_addresses().await.unwrap().contains(&a));
    fw.teardown().await.unwrap();
    assert!(sh("nft list tables").lines().all(|l| !l.contains(&t)));
}
