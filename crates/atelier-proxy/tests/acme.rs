//! ACME against a real local CA: Debian's `pebble` and `pebble-challtestsrv` (fake DNS that
//! answers every name with 127.0.0.1 and serves the TXT records the hook sets), one pair
//! per test on free 127.0.0.1 ports, killed when the test ends.
#![allow(clippy::unwrap_used)]

mod common;

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use atelier_proxy::{
    ACME_ACCOUNT_FILE, ACME_CERT_FILE, ACME_KEY_FILE, AcmeChallenge, AcmeChallenges, AcmeConfig,
    AcmeManager, CertResolver, ProxyError, redirect_to_https, serve_tls, server_config,
};
use axum::Router;
use axum::routing::get;
use common::tls_client;
use rustls::pki_types::pem::PemObject as _;
use rustls::sign::CertifiedKey;
use tempfile::TempDir;
use tokio::net::TcpListener;
use tokio::sync::oneshot;

const PEBBLE: &str = "/usr/bin/pebble";
const CHALLTESTSRV: &str = "/usr/bin/pebble-challtestsrv";
/// Bound for every wait on the servers coming up or on a renewal (never a timed assertion).
const WAIT: Duration = Duration::from_secs(60);

/// A running pebble + challtestsrv pair and the HTTP-01 listener pebble validates against.
struct Pebble {
    dir: TempDir,
    pebble: Option<Child>,
    challtestsrv: Child,
    directory_url: String,
    management: String,
    challtestsrv_management: String,
    /// CA of pebble's own HTTPS listener (PEM file), for the ACME client to trust.
    listener_ca: PathBuf,
    /// Taken by the test to serve `redirect_to_https` on pebble's `httpPort`.
    http_listener: Option<std::net::TcpListener>,
}

impl Drop for Pebble {
    fn drop(&mut self) {
        self.stop_pebble();
        let _ = self.challtestsrv.kill();
        let _ = self.challtestsrv.wait();
    }
}

fn free_port() -> u16 {
    // Free for TCP and UDP (the DNS server binds both).
    loop {
        let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = tcp.local_addr().unwrap().port();
        if std::net::UdpSocket::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

fn spawn(program: &str, args: &[&str], envs: &[(&str, &str)], log: &Path) -> Child {
    let log = std::fs::File::create(log).unwrap();
    Command::new(program)
        .args(args)
        .envs(envs.iter().copied())
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap_or_else(|e| panic!("starting {program}: {e}"))
}

/// A reqwest client trusting `ca_pem`, ignoring any proxy settings of the environment.
fn https_client(ca_pem: &[u8]) -> reqwest::Client {
    reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(ca_pem).unwrap())
        .no_proxy()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

impl Pebble {
    async fn start() -> Self {
        assert!(
            Path::new(PEBBLE).exists() && Path::new(CHALLTESTSRV).exists(),
            "{PEBBLE} and {CHALLTESTSRV} are needed for the ACME tests: install Debian's \
             pebble package (apt-get install -y pebble)"
        );
        let dir = tempfile::tempdir().unwrap();

        // Pebble ships no certificate for its own HTTPS listener: make a throwaway CA + leaf.
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "pebble listener test CA");
        ca_params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::DigitalSignature,
        ];
        let ca_cert = ca_params.self_signed(&ca_key).unwrap();
        let issuer = rcgen::Issuer::new(ca_params, ca_key);
        let leaf_key = rcgen::KeyPair::generate().unwrap();
        let leaf = rcgen::CertificateParams::new(vec!["localhost".into(), "127.0.0.1".into()])
            .unwrap()
            .signed_by(&leaf_key, &issuer)
            .unwrap();
        let listener_ca = dir.path().join("listener-ca.pem");
        std::fs::write(&listener_ca, ca_cert.pem()).unwrap();
        std::fs::write(dir.path().join("listener.pem"), leaf.pem()).unwrap();
        std::fs::write(
            dir.path().join("listener-key.pem"),
            leaf_key.serialize_pem(),
        )
        .unwrap();

        let http_listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let http_port = http_listener.local_addr().unwrap().port();
        let (acme_port, mgmt_port, tls_port) = (free_port(), free_port(), free_port());
        let (dns_port, chall_mgmt_port) = (free_port(), free_port());
        let config = serde_json::json!({
            "pebble": {
                "listenAddress": format!("127.0.0.1:{acme_port}"),
                "managementListenAddress": format!("127.0.0.1:{mgmt_port}"),
                "certificate": dir.path().join("listener.pem"),
                "privateKey": dir.path().join("listener-key.pem"),
                "httpPort": http_port,
                "tlsPort": tls_port,
                "ocspResponderURL": "",
                "externalAccountBindingRequired": false,
            }
        });
        let config_path = dir.path().join("pebble.json");
        std::fs::write(&config_path, config.to_string()).unwrap();

        let dns = format!("127.0.0.1:{dns_port}");
        let chall_mgmt = format!("127.0.0.1:{chall_mgmt_port}");
        let challtestsrv = spawn(
            CHALLTESTSRV,
            &[
                "-dns01",
                &dns,
                "-http01",
                "",
                "-https01",
                "",
                "-tlsalpn01",
                "",
                "-management",
                &chall_mgmt,
                "-defaultIPv4",
                "127.0.0.1",
                "-defaultIPv6",
                "",
            ],
            &[],
            &dir.path().join("challtestsrv.log"),
        );
        let pebble = spawn(
            PEBBLE,
            &["-config", config_path.to_str().unwrap(), "-dnsserver", &dns],
            &[("PEBBLE_VA_NOSLEEP", "1"), ("PEBBLE_WFE_NONCEREJECT", "0")],
            &dir.path().join("pebble.log"),
        );
        let mut this = Self {
            directory_url: format!("https://127.0.0.1:{acme_port}/dir"),
            management: format!("https://127.0.0.1:{mgmt_port}"),
            challtestsrv_management: format!("http://{chall_mgmt}"),
            listener_ca,
            http_listener: Some(http_listener),
            pebble: Some(pebble),
            challtestsrv,
            dir,
        };
        this.wait_ready().await;
        this
    }

    async fn wait_ready(&mut self) {
        let client = https_client(&std::fs::read(&self.listener_ca).unwrap());
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let pebble_up = client
                .get(&self.directory_url)
                .send()
                .await
                .is_ok_and(|r| r.status().is_success());
            let chall_addr = self.challtestsrv_management.trim_start_matches("http://");
            let chall_up = tokio::net::TcpStream::connect(chall_addr).await.is_ok();
            if pebble_up && chall_up {
                return;
            }
            let exited = [
                ("pebble", self.pebble.as_mut().unwrap()),
                ("pebble-challtestsrv", &mut self.challtestsrv),
            ]
            .into_iter()
            .find_map(|(name, child)| child.try_wait().unwrap().map(|s| (name, s)));
            if let Some((name, status)) = exited {
                panic!("{name} exited ({status}): {}", self.logs());
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "pebble did not come up within {WAIT:?}: {}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn logs(&self) -> String {
        ["pebble.log", "challtestsrv.log"]
            .iter()
            .map(|f| {
                let text = std::fs::read_to_string(self.dir.path().join(f)).unwrap_or_default();
                format!("\n--- {f} ---\n{text}")
            })
            .collect()
    }

    fn stop_pebble(&mut self) {
        if let Some(mut child) = self.pebble.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// The root that pebble's issued chains lead to, from its management API.
    async fn issuing_root(&self) -> String {
        let client = https_client(&std::fs::read(&self.listener_ca).unwrap());
        let rsp = client
            .get(format!("{}/roots/0", self.management))
            .send()
            .await
            .unwrap();
        assert!(rsp.status().is_success(), "{}", rsp.status());
        rsp.text().await.unwrap()
    }

    /// Serves the port-80 router on pebble's `httpPort` until the test ends.
    fn serve_http01(&mut self, challenges: AcmeChallenges) {
        let listener = self.http_listener.take().unwrap();
        listener.set_nonblocking(true).unwrap();
        let listener = TcpListener::from_std(listener).unwrap();
        let app = redirect_to_https(challenges, 443);
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    }

    fn config(&self, names: &[&str], challenge: AcmeChallenge, state_dir: &Path) -> AcmeConfig {
        let mut cfg = AcmeConfig::new(
            self.directory_url.clone(),
            names.iter().map(|n| n.to_string()).collect(),
            challenge,
            state_dir,
        );
        cfg.contact = Some("ops@example.test".into());
        cfg.extra_roots = vec![self.listener_ca.clone()];
        cfg
    }

    /// A DNS-01 hook that sets and clears TXT records through challtestsrv's API and
    /// appends each call to `hook.log`.
    fn write_dns_hook(&self) -> (PathBuf, PathBuf) {
        let hook = self.dir.path().join("dns-hook.sh");
        let log = self.dir.path().join("hook.log");
        let api = &self.challtestsrv_management;
        let script = format!(
            r#"#!/bin/sh
set -eu
echo "$1 $2" >> '{log}'
case "$1" in
  add) curl -sS -f -X POST -d "{{\"host\": \"$2.\", \"value\": \"$3\"}}" '{api}/set-txt' ;;
  remove) curl -sS -f -X POST -d "{{\"host\": \"$2.\"}}" '{api}/clear-txt' ;;
  *) echo "unknown action $1" >&2; exit 2 ;;
esac
"#,
            log = log.display()
        );
        std::fs::write(&hook, script).unwrap();
        std::fs::set_permissions(&hook, std::fs::Permissions::from_mode(0o755)).unwrap();
        (hook, log)
    }
}

/// Serves a tiny app over TLS with `resolver`; returns its address and a stop handle.
async fn serve_with(resolver: Arc<CertResolver>) -> (SocketAddr, oneshot::Sender<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = Router::new().route("/", get(|| async { "ok" }));
    let (stop, stopped) = oneshot::channel::<()>();
    let tls = server_config(resolver).unwrap();
    tokio::spawn(serve_tls(listener, tls, app, async {
        let _ = stopped.await;
    }));
    (addr, stop)
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

fn leaf(cert: &CertifiedKey) -> Vec<u8> {
    cert.end_entity_cert().unwrap().to_vec()
}

#[tokio::test]
async fn http01_certificate_is_issued_served_and_reloaded_offline() {
    let mut pebble = Pebble::start().await;
    let challenges = AcmeChallenges::default();
    pebble.serve_http01(challenges.clone());
    let state = tempfile::tempdir().unwrap();
    let names = ["sandbox-x.example.test", "dev-web-x.example.test"];
    let cfg = pebble.config(&names, AcmeChallenge::Http01, state.path());
    let manager = AcmeManager::new(cfg.clone(), challenges.clone()).unwrap();

    let cert = manager.ensure().await.unwrap();
    assert!(
        challenges.read().unwrap().is_empty(),
        "HTTP-01 answers are withdrawn"
    );
    assert_eq!(mode(&state.path().join(ACME_ACCOUNT_FILE)), 0o600);
    assert_eq!(mode(&state.path().join(ACME_KEY_FILE)), 0o600);
    assert!(state.path().join(ACME_CERT_FILE).exists());

    // Served through serve_tls, verified against pebble's issuing root only.
    let root = pebble.issuing_root().await;
    let (addr, _stop) = serve_with(Arc::new(CertResolver::from_certified_key(cert.clone()))).await;
    let client = tls_client::trusting(&root, &[b"http/1.1"]);
    let stream = tls_client::connect(client, addr, "sandbox-x.example.test").await;
    let mut sans = tls_client::peer_dns_names(&stream);
    sans.sort();
    assert_eq!(sans, ["dev-web-x.example.test", "sandbox-x.example.test"]);

    // A second manager on the same state directory loads it without the server.
    pebble.stop_pebble();
    let again = AcmeManager::new(cfg, challenges).unwrap();
    let reloaded = again.ensure().await.unwrap();
    assert_eq!(leaf(&reloaded), leaf(&cert));
}

#[tokio::test]
async fn dns01_wildcard_certificate_through_the_hook() {
    let pebble = Pebble::start().await;
    let (hook, hook_log) = pebble.write_dns_hook();
    let state = tempfile::tempdir().unwrap();
    let cfg = pebble.config(
        &["*.example.test", "example.test"],
        AcmeChallenge::Dns01 { hook },
        state.path(),
    );
    let manager = AcmeManager::new(cfg, AcmeChallenges::default()).unwrap();
    let cert = manager.ensure().await.unwrap();

    let root = pebble.issuing_root().await;
    let (addr, _stop) = serve_with(Arc::new(CertResolver::from_certified_key(cert))).await;
    let client = tls_client::trusting(&root, &[b"http/1.1"]);
    let stream = tls_client::connect(client, addr, "sandbox-abc.example.test").await;
    let mut sans = tls_client::peer_dns_names(&stream);
    sans.sort();
    assert_eq!(sans, ["*.example.test", "example.test"]);

    let calls = std::fs::read_to_string(hook_log).unwrap();
    let count = |line: &str| calls.lines().filter(|l| *l == line).count();
    assert_eq!(count("add _acme-challenge.example.test"), 2, "{calls}");
    assert_eq!(count("remove _acme-challenge.example.test"), 2, "{calls}");
}

#[tokio::test]
async fn renewal_swaps_the_certificate_for_new_handshakes() {
    let mut pebble = Pebble::start().await;
    let challenges = AcmeChallenges::default();
    pebble.serve_http01(challenges.clone());
    let state = tempfile::tempdir().unwrap();
    let mut cfg = pebble.config(
        &["sandbox-r.example.test"],
        AcmeChallenge::Http01,
        state.path(),
    );
    // Always due: the renewal loop renews at once.
    cfg.renew_before = Duration::from_secs(100 * 365 * 24 * 3600);
    let manager = Arc::new(AcmeManager::new(cfg, challenges).unwrap());
    let first = manager.ensure().await.unwrap();
    let resolver = Arc::new(CertResolver::from_certified_key(first.clone()));
    let (addr, _stop) = serve_with(resolver.clone()).await;
    let root = pebble.issuing_root().await;
    let served = |addr| {
        let client = tls_client::trusting(&root, &[b"http/1.1"]);
        async move {
            let stream = tls_client::connect(client, addr, "sandbox-r.example.test").await;
            stream.get_ref().1.peer_certificates().unwrap()[0].to_vec()
        }
    };
    assert_eq!(served(addr).await, leaf(&first));

    let renewals = tokio::spawn(manager.clone().run_renewals(resolver.clone()));
    let deadline = tokio::time::Instant::now() + WAIT;
    let renewed = loop {
        let current = resolver.certified_key().unwrap();
        if leaf(&current) != leaf(&first) {
            break current;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no renewal within {WAIT:?}: {}",
            pebble.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    renewals.abort();
    assert_eq!(
        served(addr).await,
        leaf(&renewed),
        "new handshakes see the swap"
    );
    let stored = std::fs::read(state.path().join(ACME_CERT_FILE)).unwrap();
    let stored = rustls::pki_types::CertificateDer::from_pem_slice(&stored).unwrap();
    assert_eq!(stored.to_vec(), leaf(&renewed), "the renewal was stored");

    // An explicit swap works the same way.
    resolver.set_certified_key(first.clone());
    assert_eq!(served(addr).await, leaf(&first));
}

#[tokio::test]
async fn failed_validation_reports_the_servers_problem() {
    // Nothing listens on pebble's httpPort: validation fails with a connection error.
    let mut pebble = Pebble::start().await;
    drop(pebble.http_listener.take());
    let state = tempfile::tempdir().unwrap();
    let cfg = pebble.config(
        &["sandbox-bad.example.test"],
        AcmeChallenge::Http01,
        state.path(),
    );
    let manager = AcmeManager::new(cfg, AcmeChallenges::default()).unwrap();
    let err = manager.ensure().await.unwrap_err();
    assert!(matches!(err, ProxyError::AcmeOrder { .. }), "{err}");
    let text = err.to_string();
    assert!(
        text.starts_with("ACME order for sandbox-bad.example.test failed: "),
        "{text}"
    );
    assert!(text.contains("urn:ietf:params:acme:error:"), "{text}");
    assert!(
        text.contains("port 80"),
        "the error says what to check: {text}"
    );
    assert!(!state.path().join(ACME_CERT_FILE).exists());
}

#[test]
fn wildcard_with_http01_is_a_config_error() {
    let state = tempfile::tempdir().unwrap();
    let cfg = AcmeConfig::new(
        "https://127.0.0.1:14000/dir",
        vec!["*.example.test".into(), "example.test".into()],
        AcmeChallenge::Http01,
        state.path(),
    );
    let err = AcmeManager::new(cfg, AcmeChallenges::default()).unwrap_err();
    assert!(matches!(err, ProxyError::AcmeConfig { .. }), "{err}");
    let text = err.to_string();
    assert!(
        text.contains("*.example.test") && text.contains("DNS-01"),
        "{text}"
    );
}
