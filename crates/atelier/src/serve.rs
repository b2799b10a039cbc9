//! `atelier serve`: opens the data dir, reconciles, makes the first admin token and
//! serves the API until SIGINT/SIGTERM. VMs keep running across manager restarts.

use std::io::Write;
use std::net::SocketAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
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
    /// Seconds between reconcile passes.
    #[arg(long, env = "ATELIER_RECONCILE_SECS", default_value_t = 30)]
    pub reconcile_secs: u64,
    /// Directory with Swagger UI's files (npm swagger-ui-dist).
    #[arg(
        long,
        env = "ATELIER_SWAGGER_DIR",
        default_value = "/usr/local/share/atelier/swagger-ui"
    )]
    pub swagger_dir: PathBuf,
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
    let hashes = store.token_hashes().await?;
    let state = AppState {
        mgr: Arc::clone(&mgr),
        token_hashes: Arc::new(hashes),
        swagger_dir: Some(args.swagger_dir.clone()),
    };
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    tracing::info!(listen = %args.listen, data_dir = %g.data_dir.display(), "atelier manager ready");
    axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown_signal())
        .await
        .context("http server")?;
    tracing::info!("manager stopped; sandboxes keep running and are adopted at the next start");
    Ok(0)
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
