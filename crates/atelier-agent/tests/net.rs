//! `NetConfig`, applied for real by the agent binary running in a network namespace of
//! its own (`unshare --net`) on a tap interface created there; checked with `ip -j`.
//! Needs root (as the test suite runs).

use std::path::Path;
use std::process::Command;

use atelier_agent_proto::{ErrorKind, NetConfig};
use serde_json::Value;

mod common;
use common::{Harness, Options, agent_error};

/// `ip ARGS` (JSON output) inside the network namespace of process `pid`.
fn ip_json(pid: u32, args: &[&str]) -> Value {
    let out = Command::new("nsenter")
        .args(["-t", &pid.to_string(), "-n", "ip", "-j"])
        .args(args)
        .output()
        .expect("run nsenter ip");
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("ip json")
}

fn nsenter(pid: u32, args: &[&str]) {
    let status = Command::new("nsenter")
        .args(["-t", &pid.to_string(), "-n"])
        .args(args)
        .status()
        .expect("run nsenter");
    assert!(status.success(), "{args:?}");
}

fn cfg(n: u8) -> NetConfig {
    NetConfig {
        mac: [0x02, 0xa7, 0, 0, 0, n],
        address: [10, n, 0, 2],
        prefix_len: 24,
        gateway: [10, n, 0, 1],
        dns: vec![[10, n, 0, 1], [192, 0, 2, n]],
        hostname: None,
    }
}

/// (MAC, IPv4 addresses as `a.b.c.d/len`) of `dev`.
fn addresses(pid: u32, dev: &str) -> (String, Vec<String>) {
    let v = ip_json(pid, &["addr", "show", "dev", dev]);
    let link = &v[0];
    let mac = link["address"].as_str().expect("mac").to_owned();
    let inet = link["addr_info"]
        .as_array()
        .expect("addr_info")
        .iter()
        .filter(|a| a["family"] == "inet")
        .map(|a| format!("{}/{}", a["local"].as_str().expect("local"), a["prefixlen"]))
        .collect();
    (mac, inet)
}

#[tokio::test]
async fn net_config_replaces_mac_address_route_and_dns() {
    let h = Harness::start_with(Options {
        netns: true,
        ..Options::default()
    })
    .await;
    let pid = h.agent.id().expect("pid");
    // The guest's NIC: the only non-loopback interface of the namespace.
    nsenter(pid, &["ip", "tuntap", "add", "dev", "eth0", "mode", "tap"]);
    // resolv.conf starts as a symlink (as with systemd-resolved images).
    let etc = h.root().join("etc");
    std::fs::write(etc.join("resolv.target"), "nameserver 127.0.0.53\n").expect("write");
    std::os::unix::fs::symlink("resolv.target", etc.join("resolv.conf")).expect("symlink");

    h.client.net_config(cfg(1)).await.expect("first config");
    let (mac, inet) = addresses(pid, "eth0");
    assert_eq!(mac, "02:a7:00:00:00:01");
    assert_eq!(inet, ["10.1.0.2/24"]);

    // As after a snapshot restore: everything must move to the new values.
    h.client.net_config(cfg(2)).await.expect("second config");
    let (mac, inet) = addresses(pid, "eth0");
    assert_eq!(mac, "02:a7:00:00:00:02");
    assert_eq!(inet, ["10.2.0.2/24"], "the first address must be gone");
    let link = ip_json(pid, &["link", "show", "dev", "eth0"]);
    let flags = link[0]["flags"].as_array().expect("flags");
    assert!(flags.iter().any(|f| f == "UP"), "{flags:?}");
    let routes = ip_json(pid, &["-4", "route", "show", "default"]);
    let routes = routes.as_array().expect("routes");
    assert_eq!(routes.len(), 1, "{routes:?}");
    assert_eq!(routes[0]["gateway"], "10.2.0.1");
    assert_eq!(routes[0]["dev"], "eth0");

    let resolv = etc.join("resolv.conf");
    assert!(
        !std::fs::symlink_metadata(&resolv)
            .expect("meta")
            .is_symlink()
    );
    let text = std::fs::read_to_string(&resolv).expect("resolv.conf");
    let servers: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("nameserver "))
        .collect();
    assert_eq!(servers, ["10.2.0.1", "192.0.2.2"]);
    assert_eq!(
        std::fs::read_to_string(etc.join("resolv.target")).expect("target"),
        "nameserver 127.0.0.53\n"
    );
    // Same again: idempotent.
    h.client.net_config(cfg(2)).await.expect("repeat");
    assert_eq!(addresses(pid, "eth0").1, ["10.2.0.2/24"]);

    // No gateway: no default route.
    h.client
        .net_config(NetConfig {
            gateway: [0; 4],
            ..cfg(3)
        })
        .await
        .expect("no gateway");
    let routes = ip_json(pid, &["-4", "route", "show", "default"]);
    assert_eq!(routes.as_array().map(Vec::len), Some(0), "{routes:?}");

    let err = h
        .client
        .net_config(NetConfig {
            prefix_len: 40,
            ..cfg(4)
        })
        .await
        .expect_err("bad prefix");
    assert_eq!(agent_error(err).0, ErrorKind::Invalid);
    // The host's own resolv.conf was never the target.
    assert!(
        !Path::new(&h.root())
            .join("etc/.resolv.conf.atelier.tmp")
            .exists()
    );
}

#[tokio::test]
async fn net_config_refuses_the_hosts_own_namespace() {
    // A plain test agent shares the host's network: it must not touch it.
    let h = Harness::start().await;
    let err = h.client.net_config(cfg(6)).await.expect_err("refused");
    assert_eq!(agent_error(err).0, ErrorKind::Unsupported);
    assert!(!h.root().join("etc/resolv.conf").exists());
}

#[tokio::test]
async fn net_config_without_an_interface_fails_cleanly() {
    let h = Harness::start_with(Options {
        netns: true,
        ..Options::default()
    })
    .await;
    let err = h.client.net_config(cfg(5)).await.expect_err("no interface");
    let (kind, message) = agent_error(err);
    assert_eq!(kind, ErrorKind::NotFound);
    assert!(message.contains("no network interface"), "{message}");
    h.client
        .ping(std::time::Duration::from_secs(5))
        .await
        .expect("ping");
}
