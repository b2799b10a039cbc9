//! `atelier serve`: opens the data dir, reconciles, makes the first admin token and
//! serves the API until SIGINT/SIGTERM. VMs keep running across manager restarts.

use std::io::Write;
use std::net::SocketAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use atelier_server::api::proxy::{ProxyState, Tls};
use atelier_server::api::{AppState, router};
use atelier_server::auth::{generate_token, hash_token};
use atelier_server::{Manager, ManagerConfig};
use atelier_storage::BackendChoice;
use atelier_vmm::AccelChoice;
use clap::Args;

use crate::Global;

/// Options of `atelier serve`.
#[derive(Args, Debug)]
pub struct ServeArgs {
    /// Address to listen on.
    #[arg(long, env = "ATELIER_LISTEN", default_value = "127.0.0.1:7070")]
    pub listen: SocketAddr,
    /// Accelerator: auto (probe KVM, fall back to TCG), kvm or tcg.
    #[arg(long, env = "ATELIER_ACCEL", default_value = "auto")]
    pub accel: String,
    /// Storage backend: auto (reflink, else qcow2), reflink or qcow2.
    #[arg(long, env = "ATELIER_STORAGE", default_value = "auto")]
    pub storage: String,
    /// QEMU binary.
    #[arg(long, env = "ATELIER_QEMU", default_value = "qemu-system-x86_64")]
    pub qemu: PathBuf,
    /// Seconds between checks of prebuilds for new commits (stale ones are rebuilt).
    #[arg(long, env = "ATELIER_PREBUILD_CHECK_SECS", default_value_t = 1800)]
    pub prebuild_check_secs: u64,
    /// Seconds between reconcile passes.
    #[arg(long, env = "ATELIER_RECONCILE_SECS", default_value_t = 30)]
    pub reconcile_secs: u64,
    /// Seconds a guest agent may take to answer a request (or to start a command)
    /// before the request fails with a timeout and the guest counts as hung.
    #[arg(long, env = "ATELIER_AGENT_TIMEOUT_SECS", default_value_t = 30,
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub agent_timeout_secs: u64,
    /// Seconds QEMU may take to answer a QMP command (saving and restoring memory
    /// state get their own, longer deadline).
    #[arg(long, env = "ATELIER_QMP_TIMEOUT_SECS", default_value_t = 10,
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub qmp_timeout_secs: u64,
    /// Directory with Swagger UI's files (npm swagger-ui-dist).
    #[arg(
        long,
        env = "ATELIER_SWAGGER_DIR",
        default_value = "/usr/local/share/atelier/swagger-ui"
    )]
    pub swagger_dir: PathBuf,
    /// Give sandboxes no network at all (no bridge, no TAPs, no firewall rules).
    #[arg(long, env = "ATELIER_NO_NETWORK")]
    pub no_network: bool,
    /// Bridge the sandboxes' TAPs join (created if missing; also names the
    /// nftables tables `atelier_<bridge>`).
    #[arg(long, env = "ATELIER_BRIDGE", default_value = "atl0")]
    pub bridge: String,
    /// Sandbox subnet; its first address is the bridge (gateway and DNS).
    #[arg(long, env = "ATELIER_SUBNET", default_value = "10.88.0.0/16")]
    pub subnet: ipnet::Ipv4Net,
    /// Upstream DNS servers for guests (comma-separated ip[:port]; default: the
    /// host's /etc/resolv.conf).
    #[arg(long, env = "ATELIER_DNS_UPSTREAM", value_delimiter = ',')]
    pub dns_upstream: Vec<String>,
    /// Destination ranges guests may not connect to, even through an allow-listed
    /// name (comma-separated CIDRs; default: private, loopback, link-local, CGNAT,
    /// multicast).
    #[arg(long, env = "ATELIER_BLOCKED", value_delimiter = ',')]
    pub blocked: Vec<ipnet::Ipv4Net>,
    /// Let allow-listed names resolve to blocked ranges and the host's own addresses
    /// (e.g. an internal registry); off by default, so an allow-listed name pointing
    /// at 169.254.169.254 or a private address stays blocked.
    #[arg(long, env = "ATELIER_EGRESS_ALLOW_PRIVATE_ANSWERS")]
    pub egress_allow_private_answers: bool,
    /// Wildcard domain of sandbox URLs: `sandbox-{id}.DOMAIN`, `dev-{name}-{id}.DOMAIN`.
    #[arg(long, env = "ATELIER_DOMAIN", default_value = "localhost")]
    pub domain: String,
    /// Guest port `sandbox-{id}.DOMAIN` reaches (OpenCode's server by default).
    #[arg(long, env = "ATELIER_SANDBOX_PORT", default_value_t = 4096)]
    pub sandbox_port: u16,
    /// Also serve API and proxy over TLS on this address (e.g. 0.0.0.0:443).
    #[arg(long, env = "ATELIER_HTTPS_LISTEN")]
    pub https_listen: Option<SocketAddr>,
    /// Plain-HTTP listener that redirects to HTTPS and answers ACME HTTP-01
    /// challenges (e.g. 0.0.0.0:80); needs --https-listen.
    #[arg(long, env = "ATELIER_HTTP_LISTEN", requires = "https_listen")]
    pub http_listen: Option<SocketAddr>,
    /// Certificate chain (PEM) for --https-listen, e.g. a wildcard certificate;
    /// without it a local CA in DATA/tls signs certificates (`atelier tls ca`).
    #[arg(long, env = "ATELIER_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// Private key (PEM) of --tls-cert.
    #[arg(long, env = "ATELIER_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Get certificates from this ACME directory (e.g. Let's Encrypt:
    /// https://acme-v02.api.letsencrypt.org/directory); state in DATA/acme.
    #[arg(
        long,
        env = "ATELIER_ACME_DIRECTORY",
        requires = "https_listen",
        conflicts_with = "tls_cert"
    )]
    pub acme_directory: Option<String>,
    /// Contact e-mail for the ACME account.
    #[arg(long, env = "ATELIER_ACME_EMAIL")]
    pub acme_email: Option<String>,
    /// DNS-01 hook: an executable called as `HOOK add|remove NAME VALUE` that sets
    /// the TXT record; with it the certificate is a wildcard (DOMAIN and *.DOMAIN)
    /// covering every sandbox URL. Without it, HTTP-01 through --http-listen (port
    /// 80) certifies DOMAIN only.
    #[arg(long, env = "ATELIER_ACME_DNS_HOOK")]
    pub acme_dns_hook: Option<PathBuf>,
    /// Extra root certificates (PEM) to trust for the ACME server (a private CA).
    #[arg(long, env = "ATELIER_ACME_ROOT")]
    pub acme_root: Vec<PathBuf>,
    /// Tasks with a running sandbox at once; more wait in the queue.
    #[arg(long, env = "ATELIER_MAX_RUNNING_TASKS", default_value_t = 4,
          value_parser = clap::value_parser!(u64).range(1..=1000))]
    pub max_running_tasks: u64,
    /// Seconds a task may wait on a person before its sandbox is paused to disk
    /// (answering resumes it); 0 never parks.
    #[arg(long, env = "ATELIER_PARK_AFTER_SECS", default_value_t = 900)]
    pub park_after_secs: u64,
    /// Seconds a working agent may go without any event before a "stalled"
    /// attention item is raised.
    #[arg(long, env = "ATELIER_STALL_AFTER_SECS", default_value_t = 600,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub stall_after_secs: u64,
    /// Connections each listener serves at once; more wait in the accept queue.
    #[arg(long, env = "ATELIER_MAX_CONNECTIONS", default_value_t = 4096,
          value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub max_connections: u64,
    /// Connections one client address (an IPv6 client: its /64) holds at once on
    /// each listener; beyond it its new connections are closed at once, so one
    /// client cannot take every connection.
    #[arg(long, env = "ATELIER_MAX_CONNECTIONS_PER_IP", default_value_t = 512,
          value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub max_connections_per_ip: u64,
    /// Seconds a client has to send a request's headers (also how long a kept-alive
    /// HTTP/1 connection may wait for its next request).
    #[arg(long, env = "ATELIER_HEADER_TIMEOUT_SECS", default_value_t = 30,
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub header_timeout_secs: u64,
    /// Seconds without a byte moving after which a connection is asked to close
    /// (and dropped after as long again).
    #[arg(long, env = "ATELIER_IDLE_TIMEOUT_SECS", default_value_t = 900,
          value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub idle_timeout_secs: u64,
    /// A host folder under which sandboxes may share folders (`--mount`);
    /// repeatable (the environment variable takes a comma-separated list). Default:
    /// /home and /root. Anything outside the roots (after resolving symlinks and
    /// `..`) and the data dir are refused. The VM of a sandbox with shares runs as
    /// the folders' owner, never as root: root's folders are shared by the system
    /// user atelier-vmm with an ACL grant.
    #[arg(
        long = "share-root",
        env = "ATELIER_SHARE_ROOTS",
        value_delimiter = ',',
        value_name = "DIR"
    )]
    pub share_roots: Vec<PathBuf>,
}

impl ServeArgs {
    /// The connection limits of every listener.
    fn limits(&self) -> atelier_proxy::ConnLimits {
        atelier_proxy::ConnLimits {
            header_read_timeout: Duration::from_secs(self.header_timeout_secs),
            idle_timeout: Duration::from_secs(self.idle_timeout_secs),
            max_connections: usize::try_from(self.max_connections).unwrap_or(usize::MAX),
            max_connections_per_ip: usize::try_from(self.max_connections_per_ip)
                .unwrap_or(usize::MAX),
            ..atelier_proxy::ConnLimits::default()
        }
    }
}

/// Runs the manager.
pub async fn run(g: &Global, args: ServeArgs) -> anyhow::Result<u8> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("ATELIER_LOG")
                .unwrap_or_else(|_| "info,sqlx=warn,hyper=warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let accel = AccelChoice::parse(&args.accel)
        .with_context(|| format!("ATELIER_ACCEL={:?}: use auto, kvm or tcg", args.accel))?;
    let storage = match args.storage.as_str() {
        "auto" => BackendChoice::Auto,
        "reflink" => BackendChoice::Reflink,
        "qcow2" => BackendChoice::Qcow2,
        other => anyhow::bail!("ATELIER_STORAGE={other:?}: use auto, reflink or qcow2"),
    };
    let mut cfg = ManagerConfig::new(&g.data_dir);
    cfg.accel = accel;
    cfg.images_dir = g.images_dir();
    cfg.storage = storage;
    cfg.qemu_binary = args.qemu.clone();
    cfg.reconcile_interval = Duration::from_secs(args.reconcile_secs.max(1));
    cfg.prebuild_check_interval = Duration::from_secs(args.prebuild_check_secs.max(1));
    cfg.agent_timeout = Duration::from_secs(args.agent_timeout_secs);
    cfg.qmp_timeout = Duration::from_secs(args.qmp_timeout_secs);
    if !args.share_roots.is_empty() {
        cfg.share_roots = args.share_roots.clone();
    }
    cfg.network = if args.no_network {
        None
    } else {
        let mut n = atelier_net::NetConfig::new();
        n.bridge = args.bridge.clone();
        n.subnet = args.subnet;
        if !args.dns_upstream.is_empty() {
            n.dns_upstreams = args
                .dns_upstream
                .iter()
                .map(|u| {
                    u.parse::<SocketAddr>()
                        .or_else(|_| u.parse::<std::net::IpAddr>().map(|ip| (ip, 53).into()))
                        .with_context(|| format!("--dns-upstream {u:?}: use ip or ip:port"))
                })
                .collect::<anyhow::Result<_>>()?;
        }
        if !args.blocked.is_empty() {
            n.blocked = args.blocked.clone();
        }
        n.allow_blocked_answers = args.egress_allow_private_answers;
        Some(n)
    };
    cfg.urls = match args.https_listen {
        Some(a) => atelier_server::manager::UrlBase {
            domain: args.domain.to_ascii_lowercase(),
            scheme: "https".into(),
            port: Some(a.port()).filter(|p| *p != 443),
        },
        None => atelier_server::manager::UrlBase {
            domain: args.domain.to_ascii_lowercase(),
            scheme: "http".into(),
            port: Some(args.listen.port()).filter(|p| *p != 80),
        },
    };
    let mgr = Manager::open(cfg)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    mgr.spawn_background();

    let store = mgr.store();
    if store.token_count().await? == 0 {
        let token = generate_token();
        let path = g.data_dir.join("admin-token");
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&path)
            .with_context(|| format!("cannot write {}", path.display()))?;
        writeln!(f, "{token}")?;
        store.insert_token("admin", &hash_token(&token)).await?;
        // Shown once, on stdout only (never through the logger).
        println!(
            "admin API token (shown once; saved to {}):\n{token}",
            path.display()
        );
    }
    // The plain listener comes first: ACME HTTP-01 validation reaches it.
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = move || {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.wait_for(|s| *s).await;
        }
    };
    let mut servers = tokio::task::JoinSet::new();
    let challenges = atelier_proxy::AcmeChallenges::default();
    if let (Some(plain), Some(https)) = (args.http_listen, args.https_listen) {
        let l = tokio::net::TcpListener::bind(plain)
            .await
            .with_context(|| format!("cannot listen on {plain}"))?;
        let app = atelier_proxy::redirect_to_https(challenges.clone(), https.port());
        let stop = stopped();
        tracing::info!(listen = %plain, "serving HTTP redirects and ACME challenges");
        servers.spawn(async move {
            let _ = axum::serve(l, app).with_graceful_shutdown(stop).await;
        });
    }
    let tls = match args.https_listen {
        Some(_) => Some(tls_setup(g, &args, challenges).await?),
        None => None,
    };
    let tasks = atelier_server::tasks::Tasks::new(
        &mgr,
        atelier_server::tasks::TaskConfig {
            max_running: args.max_running_tasks as usize,
            park_after: (args.park_after_secs > 0)
                .then(|| std::time::Duration::from_secs(args.park_after_secs)),
            stall_after: std::time::Duration::from_secs(args.stall_after_secs),
        },
    );
    tasks.spawn();
    let state = AppState {
        tasks,
        mgr: Arc::clone(&mgr),
        swagger_dir: Some(args.swagger_dir.clone()),
        proxy: Some(Arc::new(ProxyState::new(&args.domain, args.sandbox_port))),
        ca_pem: tls.as_ref().and_then(|t| t.1.clone()).map(Arc::new),
    };
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    if let (Some(addr), Some((config, _))) = (args.https_listen, tls) {
        let l = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen on {addr}"))?;
        let app = router(state.clone()).layer(axum::Extension(Tls));
        tracing::info!(listen = %addr, "serving HTTPS");
        servers.spawn(atelier_proxy::serve(
            l,
            Some(config),
            app,
            args.limits(),
            stopped(),
        ));
    }
    tracing::info!(listen = %args.listen, data_dir = %g.data_dir.display(), "atelier manager ready");
    let stop = stopped();
    // Header-read and idle timeouts and a connection cap on both listeners.
    servers.spawn(atelier_proxy::serve(
        listener,
        None,
        router(state),
        args.limits(),
        stop,
    ));
    // Under systemd (Type=notify) the unit becomes active only now, with the
    // listeners bound; elsewhere NOTIFY_SOCKET is unset and this does nothing.
    if let Err(e) = sd_notify::notify(&[sd_notify::NotifyState::Ready]) {
        tracing::warn!(error = %e, "cannot notify systemd of readiness");
    }
    shutdown_signal().await;
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
    // Event streams never end on their own; end them so shutdown does not wait.
    mgr.events().close();
    let _ = stop_tx.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(10), async {
        while servers.join_next().await.is_some() {}
    })
    .await;
    tracing::info!("manager stopped; sandboxes keep running and are adopted at the next start");
    Ok(0)
}

/// The TLS configuration: an ACME certificate (renewed in the background), the
/// user's certificate files, or leaves signed by the local CA in DATA/tls (whose
/// PEM is returned for `atelier tls ca`).
async fn tls_setup(
    g: &Global,
    args: &ServeArgs,
    challenges: atelier_proxy::AcmeChallenges,
) -> anyhow::Result<(Arc<rustls::ServerConfig>, Option<String>)> {
    let domain = args.domain.to_ascii_lowercase();
    if let Some(dir) = &args.acme_directory {
        let (names, challenge) = match &args.acme_dns_hook {
            Some(hook) => (
                vec![domain.clone(), format!("*.{domain}")],
                atelier_proxy::AcmeChallenge::Dns01 { hook: hook.clone() },
            ),
            None => {
                if args.http_listen.is_none() {
                    anyhow::bail!(
                        "ACME without --acme-dns-hook uses HTTP-01, which needs --http-listen (port 80 reachable from the internet)"
                    );
                }
                tracing::warn!(
                    "ACME HTTP-01 certifies {domain} only; sandbox URLs need a wildcard certificate (--acme-dns-hook)"
                );
                (vec![domain.clone()], atelier_proxy::AcmeChallenge::Http01)
            }
        };
        let mut cfg =
            atelier_proxy::AcmeConfig::new(dir.clone(), names, challenge, g.data_dir.join("acme"));
        cfg.contact = args.acme_email.clone();
        cfg.extra_roots = args.acme_root.clone();
        let acme = Arc::new(
            atelier_proxy::AcmeManager::new(cfg, challenges).map_err(|e| anyhow::anyhow!("{e}"))?,
        );
        tracing::info!(directory = %dir, "obtaining the ACME certificate");
        let key = acme.ensure().await.map_err(|e| anyhow::anyhow!("{e}"))?;
        let resolver = Arc::new(atelier_proxy::CertResolver::from_certified_key(key));
        tokio::spawn(Arc::clone(&acme).run_renewals(Arc::clone(&resolver)));
        let config = atelier_proxy::server_config(resolver).map_err(|e| anyhow::anyhow!("{e}"))?;
        return Ok((config, None));
    }
    let (resolver, ca) = match (&args.tls_cert, &args.tls_key) {
        (Some(c), Some(k)) => (
            atelier_proxy::CertResolver::from_pem_files(c, k)
                .map_err(|e| anyhow::anyhow!("{e}"))?,
            None,
        ),
        _ => {
            let ca = atelier_proxy::LocalCa::load_or_create(&g.data_dir.join("tls"))
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            let pem = ca.ca_pem();
            let r = atelier_proxy::CertResolver::local(Arc::new(ca), &[&domain])
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            (r, Some(pem))
        }
    };
    let config =
        atelier_proxy::server_config(Arc::new(resolver)).map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok((config, ca))
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = ctrl_c => {},
        _ = term.recv() => {},
    }
}
