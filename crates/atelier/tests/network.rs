//! Sandbox networking with real VMs: NAT out to a "public" network namespace the
//! test owns, egress policies (allow-all, deny-all, a domain allow-list resolved
//! through the test's own DNS server), isolation between sandboxes and from the
//! host. No traffic leaves the machine.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{PublicNet, Server};

fn json(s: &str) -> serde_json::Value {
    serde_json::from_str(s).unwrap_or_else(|e| panic!("not json ({e}): {s}"))
}

/// Fetches `http://{target}:{port}{path}` from inside the sandbox with bash's
/// /dev/tcp (names resolve through the guest's resolver); returns the response or
/// the error text.
fn fetch(srv: &Server, sb: &str, target: &str, port: u16, path: &str) -> String {
    let script = format!(
        "exec 3<>/dev/tcp/{target}/{port} && printf 'GET {path} HTTP/1.0\\r\\nHost: t\\r\\n\\r\\n' >&3 && cat <&3"
    );
    let out = srv.run(&[
        "sandbox", "exec", sb, "--", "timeout", "8", "bash", "-c", &script,
    ]);
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn resolves(srv: &Server, sb: &str, name: &str) -> Option<String> {
    let out = srv.run(&["sandbox", "exec", sb, "--", "getent", "ahostsv4", name]);
    out.status.success().then(|| {
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .next()
            .unwrap_or("")
            .to_owned()
    })
}

#[test]
fn egress_policies_nat_deny_and_allow_list() {
    // The test's own DNS server, on loopback, is the manager's only upstream.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let pubnet = PublicNet::start();
    let a: std::net::Ipv4Addr = pubnet.ip_a.parse().unwrap();
    let b: std::net::Ipv4Addr = pubnet.ip_b.parse().unwrap();
    let dns = rt
        .block_on(atelier_testkit::StaticDns::spawn(
            "127.0.0.1:0".parse().unwrap(),
            vec![
                ("allowed.test".into(), a),
                ("other.test".into(), b),
                ("api.pkg.test".into(), b),
                // A listed name pointing at the cloud metadata address.
                (
                    "meta.pkg.test".into(),
                    std::net::Ipv4Addr::new(169, 254, 169, 254),
                ),
            ],
            vec![("cdn.pkg.test".into(), "other.test".into())],
        ))
        .unwrap();
    let upstream = dns.local_addr().to_string();
    let srv = Server::start_with(&[("ATELIER_DNS_UPSTREAM", &upstream)]);

    let open = json(&srv.ok(&["--json", "sandbox", "create", "--name", "open"]));
    assert_eq!(open["egress"], "allow-all");
    let ip_open = open["ip"].as_str().expect("an address").to_owned();
    assert!(
        ip_open.starts_with(&format!("10.201.{}.", srv.net.slot)),
        "{ip_open}"
    );
    srv.ok(&[
        "sandbox", "create", "--name", "closed", "--egress", "deny-all",
    ]);
    srv.ok(&[
        "sandbox",
        "create",
        "--name",
        "listed",
        "--egress",
        "allowed.test,*.pkg.test",
    ]);
    let shown = json(&srv.ok(&["--json", "sandbox", "show", "listed"]));
    assert_eq!(shown["egress"], "allowed.test,*.pkg.test");

    // allow-all: NAT out by address and by name.
    assert!(fetch(&srv, "open", &pubnet.ip_a, 8080, "/hello.txt").contains("public-ok"));
    assert_eq!(
        resolves(&srv, "open", "other.test").as_deref(),
        Some(pubnet.ip_b.as_str())
    );
    assert!(fetch(&srv, "open", "other.test", 8080, "/hello.txt").contains("public-ok"));

    // deny-all: no address, no name.
    let denied = fetch(&srv, "closed", &pubnet.ip_a, 8080, "/hello.txt");
    assert!(!denied.contains("public-ok"), "{denied}");
    assert_eq!(resolves(&srv, "closed", "allowed.test"), None);

    // Allow-list: the listed name works, and so do names under a wildcard, also
    // when they are CNAMEs to an unlisted name; another name does not resolve, and
    // its address is closed even when dialled directly (until a listed name
    // resolves to it).
    assert_eq!(resolves(&srv, "listed", "other.test"), None);
    let direct_b = fetch(&srv, "listed", &pubnet.ip_b, 8080, "/hello.txt");
    assert!(!direct_b.contains("public-ok"), "{direct_b}");
    assert!(fetch(&srv, "listed", "allowed.test", 8080, "/hello.txt").contains("public-ok"));
    // An exact entry does not cover subdomains, and pkg.test itself is not under
    // *.pkg.test.
    assert_eq!(resolves(&srv, "listed", "www.allowed.test"), None);
    assert_eq!(resolves(&srv, "listed", "pkg.test"), None);
    assert_eq!(
        resolves(&srv, "listed", "cdn.pkg.test").as_deref(),
        Some(pubnet.ip_b.as_str())
    );
    assert!(fetch(&srv, "listed", "api.pkg.test", 8080, "/hello.txt").contains("public-ok"));
    // A listed name whose answer lies in a blocked range stays blocked: the address
    // is removed from the answer and never reaches the firewall's allowed set.
    assert_eq!(resolves(&srv, "listed", "meta.pkg.test"), None);
    let elements = srv.net.elements();
    assert!(
        !elements.iter().any(|e| e.contains("169.254.169.254")),
        "{elements:?}"
    );

    // Everything is reclaimed with the sandboxes.
    for n in ["open", "closed", "listed"] {
        srv.ok(&["sandbox", "rm", n]);
    }
    srv.assert_clean();
    drop(dns);
}

#[test]
fn sandboxes_cannot_reach_each_other_or_the_host() {
    let srv = Server::start();
    // A host service on every address, standing for the manager API or anything
    // else listening on the host.
    let host_service = std::net::TcpListener::bind("0.0.0.0:0").unwrap();
    let host_port = host_service.local_addr().unwrap().port();
    let a = json(&srv.ok(&["--json", "sandbox", "create", "--name", "a"]));
    let b = json(&srv.ok(&["--json", "sandbox", "create", "--name", "b"]));
    let ip_b = b["ip"].as_str().unwrap().to_owned();
    assert_ne!(a["ip"], b["ip"]);
    // The two TAPs are on the bridge.
    assert_eq!(srv.net.ports().len(), 2, "{:?}", srv.net.ports());

    srv.ok(&[
        "dev",
        "start",
        "b",
        "web",
        "--port",
        "8000",
        "--",
        "python3",
        "-m",
        "http.server",
        "8000",
    ]);
    let start = std::time::Instant::now();
    loop {
        if common::http_ok(&format!("http://{ip_b}:8000/")).unwrap_or(false) {
            break;
        }
        assert!(
            start.elapsed() < std::time::Duration::from_secs(120),
            "b's server never answered the host"
        );
        std::thread::sleep(std::time::Duration::from_millis(300));
    }
    // The host reaches b, a does not; and on the host only the manager's user does:
    // another local user is refused (it goes through the proxy instead).
    let as_nobody = std::process::Command::new("runuser")
        .args(["-u", "nobody", "--", "python3", "-c"])
        .arg(format!(
            "import socket; s=socket.socket(); s.settimeout(5); s.connect(('{ip_b}', 8000)); print('connected')"
        ))
        .output()
        .unwrap();
    assert!(
        !as_nobody.status.success(),
        "another host user reached the guest: {}",
        String::from_utf8_lossy(&as_nobody.stdout)
    );
    let from_a = fetch(&srv, "a", &ip_b, 8000, "/");
    assert!(!from_a.contains("200 OK"), "a reached b: {from_a}");
    // The host's services are closed to guests, whichever host address they use...
    let gw = srv.net.gateway();
    let to_host = fetch(&srv, "a", &gw, host_port, "/");
    assert!(
        to_host.contains("No route to host") || to_host.contains("refused"),
        "{to_host}"
    );
    let manager_port = srv.url.rsplit(':').next().unwrap().parse::<u16>().unwrap();
    let to_api = fetch(&srv, "a", &gw, manager_port, "/healthz");
    assert!(!to_api.contains("200 OK"), "{to_api}");
    // ...except DNS on the gateway.
    let out = srv.run(&[
        "sandbox",
        "exec",
        "a",
        "--",
        "timeout",
        "5",
        "bash",
        "-c",
        &format!("echo > /dev/tcp/{gw}/53"),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    drop(host_service);

    // A guest that takes its neighbour's address is cut off at the bridge: packets
    // from that source never arrive, while its own address still works.
    srv.ok(&[
        "sandbox",
        "exec",
        "a",
        "--",
        "ip",
        "addr",
        "add",
        &format!("{ip_b}/32"),
        "dev",
        "eth0",
    ]);
    let connect_from = |src: &str| {
        let py = format!(
            "import socket; s=socket.socket(); s.bind(('{src}', 0)); s.settimeout(3); s.connect(('{gw}', 53)); print('connected')"
        );
        srv.run(&["sandbox", "exec", "a", "--", "python3", "-c", &py])
    };
    let spoofed = connect_from(&ip_b);
    assert!(!spoofed.status.success(), "spoofed source got through");
    let own = connect_from(a["ip"].as_str().unwrap());
    assert!(
        own.status.success(),
        "{}",
        String::from_utf8_lossy(&own.stderr)
    );

    for n in ["a", "b"] {
        srv.ok(&["sandbox", "rm", n]);
    }
    srv.assert_clean();
}
