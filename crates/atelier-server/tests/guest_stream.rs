//! Streams to guest ports through the manager, in a real VM with the real agent:
//! the sandbox has no network card at all, so every byte goes over the agent's
//! control channel. Needs the `minimal` test image (`ATELIER_TEST_IMAGES_DIR`) and
//! QEMU.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use atelier_core::{EgressPolicy, ErrorKind, SandboxSpec};
use atelier_server::{Manager, ManagerConfig};
use atelier_testkit::NetSlot;

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

/// A manager on its own data dir (and, with a network, its own bridge and subnet);
/// on drop kills its VMMs, unmounts its pool and removes its bridge and tables.
struct Env {
    mgr: Arc<Manager>,
    data: tempfile::TempDir,
    net: Option<NetSlot>,
}

impl Env {
    async fn start(network: bool) -> Env {
        Self::start_with(network, images_dir()).await
    }

    async fn start_with(network: bool, images: PathBuf) -> Env {
        let data = tempfile::Builder::new()
            .prefix("atl-stream-")
            .tempdir_in("/var/tmp")
            .expect("data dir");
        let mut cfg = ManagerConfig::new(data.path());
        cfg.images_dir = images;
        let net = network.then(NetSlot::claim);
        cfg.network = net.as_ref().map(|slot| {
            let mut n = atelier_net::NetConfig::new();
            n.bridge = slot.bridge.clone();
            n.subnet = slot.subnet.parse().expect("subnet");
            // Nothing answers there: no traffic leaves this machine.
            n.dns_upstreams = vec!["127.0.0.1:9".parse().expect("addr")];
            n
        });
        let mgr = Manager::open(cfg).await.expect("open manager");
        Env { mgr, data, net }
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        let marker = format!("{}/", self.data.path().display());
        let vmms = || -> Vec<i32> {
            std::fs::read_dir("/proc")
                .into_iter()
                .flatten()
                .flatten()
                .filter_map(|e| {
                    let pid: i32 = e.file_name().to_str()?.parse().ok()?;
                    let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
                    let cmd = String::from_utf8_lossy(&cmd);
                    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
                    let zombie = stat
                        .rsplit_once(')')
                        .is_some_and(|(_, r)| r.trim_start().starts_with('Z'));
                    (cmd.contains("qemu") && cmd.contains(&marker) && !zombie).then_some(pid)
                })
                .collect()
        };
        for pid in vmms() {
            let _ = std::process::Command::new("kill")
                .args(["-9", &pid.to_string()])
                .status();
        }
        let end = Instant::now() + Duration::from_secs(10);
        while !vmms().is_empty() && Instant::now() < end {
            std::thread::sleep(Duration::from_millis(20));
        }
        // Lazy: background tasks of the manager may still hold files in the pool.
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(self.data.path().join("pool"))
            .status();
        if let Some(slot) = &self.net {
            let table = slot.table();
            let _ = std::process::Command::new("ip")
                .args(["link", "del", &slot.bridge])
                .status();
            for fam in ["inet", "bridge"] {
                let _ = std::process::Command::new("nft")
                    .args(["delete", "table", fam, &table])
                    .stderr(std::process::Stdio::null())
                    .status();
            }
        }
    }
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

/// Boots sandbox `name` in `env`, checks its network interfaces are `nics`, then
/// runs the stream checks through `Manager::guest_stream`.
async fn check_streams(env: &Env, name: &str, spec: SandboxSpec, nics: &str, fork: bool) {
    let mgr = &env.mgr;
    let started = Instant::now();
    mgr.create(spec, true).await.expect("create");
    eprintln!("{name}: running after {:?}", started.elapsed());
    let (_rec, agent) = mgr.agent(name).await.expect("agent");
    let out = agent
        .exec(atelier_agent_proto::ExecRequest::new([
            "sh",
            "-c",
            "ls /sys/class/net | tr '\\n' ' '",
        ]))
        .await
        .expect("exec")
        .wait()
        .await
        .expect("ls");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), nics);

    // Refused port: a typed error naming the port and the sandbox.
    let err = mgr.guest_stream(name, 9).await.expect_err("refused");
    assert_eq!(err.kind, ErrorKind::Unavailable);
    let expected = format!("nothing listens on port 9 in sandbox {name}");
    assert!(err.message.contains(&expected), "{}", err.message);
    let err = mgr.guest_stream("nosuch", 9).await.expect_err("no sandbox");
    assert_eq!(err.kind, ErrorKind::NotFound, "{}", err.message);

    // 64 MiB both ways through Manager::guest_stream, checksummed on both ends.
    let (m, n) = (mgr.clone(), name.to_owned());
    let open = move |port: u16| async move { m.guest_stream(&n, port).await.expect("open") };
    let r = streams::echo_roundtrip(&agent, 64 << 20, DEADLINE, open).await;
    eprintln!(
        "{name}: 64 MiB echoed in {:?} ({:.1} MiB/s each way), peak buffered {} bytes",
        r.elapsed,
        64.0 / r.elapsed.as_secs_f64(),
        r.peak_buffered
    );

    // A flooding service: the manager buffers at most the window.
    let (m, n) = (mgr.clone(), name.to_owned());
    let open = move |port: u16| async move { m.guest_stream(&n, port).await.expect("open") };
    let peak = streams::flood_stays_within_window(&agent, 8 << 20, DEADLINE, open).await;
    eprintln!("{name}: peak buffered while flooded: {peak} bytes");

    agent.ping(DEADLINE).await.expect("agent still answers");
    if fork {
        // A fork keeps the source's OpenCode endpoint (its server runs on in the
        // copied memory): a task's sandbox forked is still reachable.
        let src = mgr.get(name).await.expect("source");
        let oc = atelier_store::OpenCodeServer {
            version: "1.18.33".into(),
            port: 4096,
            password: "pw-of-the-source".into(),
            directory: "/workspace/demo".into(),
        };
        mgr.store()
            .set_sandbox_opencode(&src.id, &oc)
            .await
            .expect("record an endpoint");
        let copy = format!("{name}-fork");
        mgr.fork(name, &copy).await.expect("fork");
        let ep = mgr
            .sandboxes()
            .opencode(&copy)
            .await
            .expect("endpoint")
            .expect("the fork has the source's OpenCode endpoint");
        assert_eq!(
            (ep.port, ep.password.as_str(), ep.directory.as_str()),
            (4096, "pw-of-the-source", "/workspace/demo")
        );
        mgr.delete(&copy).await.expect("delete the fork");
    }
    mgr.delete(name).await.expect("delete");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_to_guest_ports_without_a_network_card() {
    let env = Env::start(false).await;
    check_streams(&env, "streamy", spec("streamy"), "lo", true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_to_guest_ports_with_egress_deny_all() {
    let env = Env::start(true).await;
    let mut s = spec("closed");
    s.egress = EgressPolicy::DenyAll;
    check_streams(&env, "closed", s, "eth0 lo", false).await;
}

/// A sandbox whose image carries a protocol-1 agent (built before streams existed,
/// as in an old prebuild): the manager serves it, and a stream fails with a clear
/// conflict naming what to rebuild instead of hanging on a request the agent cannot
/// decode. Needs such an image: `ATELIER_TEST_V1_IMAGES_DIR` (e.g. one built from
/// the agent of an earlier commit).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs ATELIER_TEST_V1_IMAGES_DIR, an image with a protocol-1 agent"]
async fn protocol_1_agent_is_served_without_streams() {
    let images = PathBuf::from(
        std::env::var_os("ATELIER_TEST_V1_IMAGES_DIR").expect("ATELIER_TEST_V1_IMAGES_DIR"),
    );
    let env = Env::start_with(false, images).await;
    env.mgr.create(spec("oldie"), true).await.expect("create");
    let (_rec, agent) = env.mgr.agent("oldie").await.expect("agent");
    assert_eq!(agent.hello().expect("hello").version, 1);
    assert_eq!(agent.capabilities(), Some(Vec::new()));
    let err = env
        .mgr
        .guest_stream("oldie", 22)
        .await
        .expect_err("unsupported");
    assert_eq!(err.kind, ErrorKind::Conflict, "{}", err.message);
    assert!(err.message.contains("rebuild"), "{}", err.message);
    eprintln!("protocol-1 agent: {}", err.message);
    // Everything of the version-1 message set still works.
    let out = agent
        .exec(atelier_agent_proto::ExecRequest::new(["true"]))
        .await
        .expect("exec")
        .wait()
        .await
        .expect("wait");
    assert!(out.success());
    env.mgr.delete("oldie").await.expect("delete");
}
