//! Streams to guest ports through the manager, in a real VM with the real agent:
//! the sandbox has no network card at all, so every byte goes over the agent's
//! control channel. Needs the `minimal` test image (`ATELIER_TEST_IMAGES_DIR`) and
//! QEMU.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use atelier_core::{ErrorKind, SandboxSpec};
use atelier_server::{Manager, ManagerConfig};

#[path = "../../atelier-agent/tests/common/streams.rs"]
mod streams;

/// Generous: everything runs under TCG here.
const DEADLINE: Duration = Duration::from_secs(300);

fn images_dir() -> PathBuf {
    let dir = std::env::var_os("ATELIER_TEST_IMAGES_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/atelier-test/images"));
    let has_minimal = std::fs::read_dir(&dir)
        .map(|rd| {
            rd.flatten()
                .any(|e| e.file_name().to_string_lossy().starts_with("minimal-"))
        })
        .unwrap_or(false);
    assert!(
        has_minimal,
        "no minimal image in {}; run `bash scripts/test.sh` or set ATELIER_TEST_IMAGES_DIR",
        dir.display()
    );
    dir
}

async fn manager(data: &tempfile::TempDir) -> Arc<Manager> {
    let mut cfg = ManagerConfig::new(data.path());
    cfg.images_dir = images_dir();
    // No network: the guest gets no network card.
    cfg.network = None;
    Manager::open(cfg).await.expect("open manager")
}

fn spec(name: &str) -> SandboxSpec {
    SandboxSpec {
        name: name.into(),
        image: "minimal".into(),
        vcpus: 1,
        memory_mib: 512,
        mounts: Vec::new(),
        mount_owner: None,
        cold_boot: true,
        egress: Default::default(),
        workspace: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_to_guest_ports_without_a_network_card() {
    let data = tempfile::Builder::new()
        .prefix("atl-stream-")
        .tempdir_in("/var/tmp")
        .expect("data dir");
    let mgr = manager(&data).await;
    let started = Instant::now();
    mgr.create(spec("streamy"), true).await.expect("create");
    eprintln!("sandbox running after {:?}", started.elapsed());
    let (_rec, agent) = mgr.agent("streamy").await.expect("agent");

    // The guest has loopback only.
    let out = agent
        .exec(atelier_agent_proto::ExecRequest::new([
            "sh",
            "-c",
            "ls /sys/class/net",
        ]))
        .await
        .expect("exec")
        .wait()
        .await
        .expect("ls");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "lo");

    // Refused port: a typed error naming the port and the sandbox.
    let err = mgr.guest_stream("streamy", 9).await.expect_err("refused");
    assert_eq!(err.kind, ErrorKind::Unavailable);
    assert!(
        err.message
            .contains("nothing listens on port 9 in sandbox streamy"),
        "{}",
        err.message
    );
    let err = mgr.guest_stream("nosuch", 9).await.expect_err("no sandbox");
    assert_eq!(err.kind, ErrorKind::NotFound, "{}", err.message);

    // 64 MiB both ways through Manager::guest_stream, checksummed.
    let m = mgr.clone();
    let open = move |port: u16| async move { m.guest_stream("streamy", port).await.expect("open") };
    let r = streams::echo_roundtrip(&agent, 64 << 20, DEADLINE, open).await;
    eprintln!(
        "VM: 64 MiB echoed in {:?} ({:.1} MiB/s each way), peak buffered {} bytes",
        r.elapsed,
        64.0 / r.elapsed.as_secs_f64(),
        r.peak_buffered
    );

    // A flooding service: the manager buffers at most the window.
    let m = mgr.clone();
    let open = move |port: u16| async move { m.guest_stream("streamy", port).await.expect("open") };
    let peak = streams::flood_stays_within_window(&agent, 8 << 20, DEADLINE, open).await;
    eprintln!("VM: peak buffered while flooded: {peak} bytes");

    agent.ping(DEADLINE).await.expect("agent still answers");
    mgr.delete("streamy").await.expect("delete");
}
