//! OpenCode warm in a prebuild, in real VMs with the real OpenCode against the test
//! kit's scripted model: the prebuild starts OpenCode and freezes it running; a
//! sandbox restored from it answers at once through the manager's byte stream to
//! the guest port (the way the task service reaches it, via [`Sandboxes`]), with the
//! provider key handed over after the restore and never in the prebuild's files.
//!
//! In-process (a `Manager` on its own data dir) because the guest byte stream is a
//! manager-side handle, not an API route. Needs the `minimal-opencode` test image
//! (`ATELIER_TEST_IMAGES_DIR`; `scripts/test.sh` builds it), QEMU and root (network
//! namespaces). One scenario, asserting in sequence: prebuilds are slow under TCG.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use atelier_core::PrebuildStatus;
use atelier_core::workspace::WorkspaceSpec;
use atelier_server::opencode::{OpenCodeServer, REQUEST_TIMEOUT, Reply, request_on};
use atelier_server::{Manager, ManagerConfig};
use atelier_testkit::model::RequestKind;
use atelier_testkit::opencode_ws::{
    MODEL, OPENCODE_IMAGE, PROVIDER, has_opencode_image, opencode_workspace_yaml, test_images_dir,
};
use atelier_testkit::{GitServer, ModelServer, NetSlot, PublicNet, Script, StaticDns, Turn};

/// A prebuild with a cold OpenCode start under TCG takes minutes.
const PREBUILD_DEADLINE: Duration = Duration::from_secs(1500);

const KEY: &str = "sk-local-7a1e93c0d2b4f5e6";
const MODEL_HOST: &str = "public.test";
const MODEL_PORT: u16 = 18090;

fn images_dir() -> PathBuf {
    let dir = test_images_dir();
    assert!(
        has_opencode_image(&dir),
        "no {OPENCODE_IMAGE} image in {}; run `bash scripts/test.sh` or build it with `atelier image build {OPENCODE_IMAGE}`",
        dir.display()
    );
    dir
}

/// A manager on its own data dir, bridge and subnet; on drop kills its VMMs,
/// unmounts its pool and removes its bridge and tables.
struct Env {
    mgr: Arc<Manager>,
    data: tempfile::TempDir,
    slot: NetSlot,
}

impl Env {
    async fn start(dns: std::net::SocketAddr) -> Env {
        let data = tempfile::Builder::new()
            .prefix("atl-ocpb-")
            .tempdir_in("/var/tmp")
            .expect("data dir");
        let mut cfg = ManagerConfig::new(data.path());
        cfg.images_dir = images_dir();
        let slot = NetSlot::claim();
        let mut n = atelier_net::NetConfig::new();
        n.bridge = slot.bridge.clone();
        n.subnet = slot.subnet.parse().expect("subnet");
        n.dns_upstreams = vec![dns];
        cfg.network = Some(n);
        let mgr = Manager::open(cfg).await.expect("open manager");
        Env { mgr, data, slot }
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        let marker = format!("{}/", self.data.path().display());
        for pid in atelier_testkit::pids_matching(&marker) {
            let _ = std::process::Command::new("kill")
                .args(["-9", &pid.to_string()])
                .status();
        }
        let end = Instant::now() + Duration::from_secs(10);
        while !atelier_testkit::pids_matching(&marker).is_empty() && Instant::now() < end {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(self.data.path().join("pool"))
            .status();
        let table = self.slot.table();
        let _ = std::process::Command::new("ip")
            .args(["link", "del", &self.slot.bridge])
            .status();
        for fam in ["inet", "bridge"] {
            let _ = std::process::Command::new("nft")
                .args(["delete", "table", fam, &table])
                .stderr(std::process::Stdio::null())
                .status();
        }
    }
}

/// Builds a prebuild of `workspace` and waits until it is ready; returns it and
/// how long it took.
async fn prebuild(
    mgr: &Arc<Manager>,
    workspace: &str,
) -> (atelier_store::PrebuildRecord, Duration) {
    let started = Instant::now();
    let pb = mgr
        .prebuild_create(workspace)
        .await
        .expect("prebuild create");
    loop {
        let list = mgr.prebuild_list(Some(workspace)).await.expect("list");
        let (p, _) = list
            .iter()
            .find(|(p, _)| p.id == pb.id)
            .expect("row")
            .clone();
        match p.status {
            PrebuildStatus::Ready => return (p, started.elapsed()),
            PrebuildStatus::Failed => panic!(
                "prebuild failed: {:?}\n{}",
                p.error,
                std::fs::read_to_string(mgr.prebuild_log_path(&p.id)).unwrap_or_default()
            ),
            _ => {}
        }
        assert!(
            started.elapsed() < PREBUILD_DEADLINE,
            "prebuild {} not ready after {:?}",
            p.id,
            started.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Every file under `dir` (recursively) that contains `needle` (GNU grep: the
/// memory file and disk are GiBs, too slow to scan in a debug build).
fn files_containing(dir: &Path, needle: &str) -> Vec<PathBuf> {
    let out = std::process::Command::new("grep")
        .args(["-rlF", "--", needle])
        .arg(dir)
        .output()
        .unwrap();
    assert!(
        out.status.code().is_some_and(|c| c <= 1),
        "grep failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(PathBuf::from)
        .collect()
}

fn json(r: &Reply) -> serde_json::Value {
    serde_json::from_slice(&r.body)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&r.body)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opencode_is_warm_in_the_prebuild_and_gets_its_key_after_restore() {
    // "The internet": a git repo and the scripted model in the public namespace,
    // found by name through the test's DNS server.
    let net = PublicNet::start();
    let repo = GitServer::start(&net);
    let ip_a: std::net::Ipv4Addr = net.ip_a.parse().unwrap();
    let model = ModelServer::start_in_netns(
        &net.ns,
        std::net::SocketAddr::from((ip_a, MODEL_PORT)),
        "/v1",
        Script::new(vec![Turn::text("hello from the scripted model")]),
    )
    .await
    .expect("model server in the public namespace");
    let dns = StaticDns::spawn(
        "127.0.0.1:0".parse().unwrap(),
        vec![(MODEL_HOST.into(), ip_a)],
        vec![],
    )
    .await
    .unwrap();
    let env = Env::start(dns.local_addr()).await;
    let mgr = &env.mgr;
    mgr.set_secret("model-key", KEY.as_bytes().to_vec())
        .await
        .unwrap();
    let url = repo.url.replace(&net.ip_a, MODEL_HOST);
    let yaml = opencode_workspace_yaml("oc", MODEL_HOST, MODEL_PORT, "model-key", Some(&url));

    // Baseline: the same workspace with the server turned off.
    let off = yaml
        .replace("opencode_keys: { local: model-key }\n", "")
        .replace("egress:", "opencode_server: false\negress:");
    mgr.apply_workspace(WorkspaceSpec::from_yaml(&off).unwrap())
        .await
        .unwrap();
    let (p_off, t_off) = prebuild(mgr, "oc").await;
    assert_eq!(p_off.opencode, None);
    let log = std::fs::read_to_string(mgr.prebuild_log_path(&p_off.id)).unwrap();
    assert!(log.contains("OpenCode server: off"), "{log}");

    // With OpenCode: started, healthy, warmed and recorded on the prebuild.
    mgr.apply_workspace(WorkspaceSpec::from_yaml(&yaml).unwrap())
        .await
        .unwrap();
    let (pb, t_on) = prebuild(mgr, "oc").await;
    let log = std::fs::read_to_string(mgr.prebuild_log_path(&pb.id)).unwrap();
    eprintln!("prebuild log:\n{log}");
    let oc = pb
        .opencode
        .clone()
        .expect("OpenCode recorded on the prebuild");
    let image_version = mgr
        .image(OPENCODE_IMAGE)
        .unwrap()
        .manifest
        .opencode_version
        .expect("the image records its OpenCode version");
    assert_eq!(oc.version, image_version);
    assert_eq!((oc.port, oc.directory.as_str()), (4096, "/workspace/oc"));
    assert_eq!(oc.password.len(), 32);
    assert!(log.contains("instance warm after"), "{log}");
    assert!(
        !log.contains(&oc.password),
        "the password is in the build log"
    );
    let listed = mgr.prebuild_list(Some("oc")).await.unwrap();
    assert!(
        listed.iter().any(|(p, stale)| p.id == pb.id && !stale),
        "a prebuild with the image's OpenCode is not stale: {listed:?}"
    );
    eprintln!(
        "prebuild: {:.1} s without OpenCode, {:.1} s with it",
        t_off.as_secs_f64(),
        t_on.as_secs_f64()
    );

    // Spawn: when create returns, the key is in and OpenCode answers.
    let sandboxes = mgr.sandboxes();
    let spec = atelier_core::SandboxSpec {
        name: "t1".into(),
        image: OPENCODE_IMAGE.into(),
        vcpus: 1,
        memory_mib: 512,
        mounts: Vec::new(),
        mount_owner: None,
        cold_boot: false,
        egress: Default::default(),
        workspace: Some("oc".into()),
    };
    let t = Instant::now();
    let rec = sandboxes
        .create(spec)
        .await
        .expect("create from the prebuild");
    let t_create = t.elapsed();
    let ep = sandboxes
        .opencode("t1")
        .await
        .unwrap()
        .expect("an OpenCode endpoint");
    assert_eq!(
        (ep.port, &ep.password, &ep.version, &ep.directory),
        (oc.port, &oc.password, &oc.version, &oc.directory)
    );
    assert!(!format!("{ep:?}").contains(&ep.password));
    let with_pw = OpenCodeServer {
        version: ep.version.clone(),
        port: ep.port,
        password: ep.password.clone(),
        directory: ep.directory.clone(),
    };
    let call = |oc: OpenCodeServer,
                method: &'static str,
                path: String,
                body: Option<serde_json::Value>| {
        let sandboxes = sandboxes.clone();
        async move {
            let s = sandboxes
                .stream("t1", oc.port)
                .await
                .expect("stream to 4096");
            request_on(s, &oc, method, &path, body.as_ref(), REQUEST_TIMEOUT)
                .await
                .expect("request")
        }
    };
    let t = Instant::now();
    let health = call(with_pw.clone(), "GET", "/global/health".into(), None).await;
    let t_health = t.elapsed();
    assert_eq!(health.status, 200);
    assert_eq!(json(&health)["healthy"], true);
    assert_eq!(json(&health)["version"], oc.version.as_str());
    eprintln!(
        "spawn: create returned (restored, key injected) after {:.2} s; first health answer after {:.3} s more",
        t_create.as_secs_f64(),
        t_health.as_secs_f64()
    );
    // Without the password, or with a wrong one: 401.
    let mut none = with_pw.clone();
    none.password.clear();
    assert_eq!(
        call(none, "GET", "/global/health".into(), None)
            .await
            .status,
        401
    );
    let mut wrong = with_pw.clone();
    wrong.password = "not-the-password".into();
    assert_eq!(call(wrong, "GET", "/config".into(), None).await.status, 401);

    // Where the first session's cost goes: OpenCode builds its provider state
    // (with the key now) at the first request needing it.
    let t = Instant::now();
    let providers = call(with_pw.clone(), "GET", "/config/providers".into(), None).await;
    assert_eq!(providers.status, 200);
    eprintln!(
        "provider state built after restore in {:.2} s",
        t.elapsed().as_secs_f64()
    );

    // The first session after the restore: the scripted model gets the key.
    let t = Instant::now();
    let session = call(
        with_pw.clone(),
        "POST",
        "/session".into(),
        Some(serde_json::json!({"title": "warm"})),
    )
    .await;
    assert_eq!(
        session.status,
        200,
        "{}",
        String::from_utf8_lossy(&session.body)
    );
    let sid = json(&session)["id"].as_str().unwrap().to_owned();
    let t_session = t.elapsed();
    let t = Instant::now();
    let sent = call(
        with_pw.clone(),
        "POST",
        format!("/session/{sid}/prompt_async"),
        Some(serde_json::json!({
            "parts": [{"type": "text", "text": "say hello"}],
            "model": {"providerID": PROVIDER, "modelID": MODEL},
        })),
    )
    .await;
    assert_eq!(sent.status, 204, "{}", String::from_utf8_lossy(&sent.body));
    let Some(asked) = model.wait_requests(1, Duration::from_secs(600)).await else {
        let out = sandboxes
            .exec(
                "t1",
                atelier_agent_proto::ExecRequest::new([
                    "sh",
                    "-c",
                    "tail -c 4000 /var/log/atelier/dev/opencode.log; getent hosts public.test",
                ]),
            )
            .await
            .unwrap();
        panic!(
            "the scripted model was never asked; OpenCode's log: {}",
            String::from_utf8_lossy(&out.stdout)
        );
    };
    let t_first_request = t.elapsed();
    let step = asked
        .iter()
        .find(|r| matches!(r.kind, RequestKind::Step(_)))
        .or(asked.first())
        .unwrap();
    assert_eq!(
        step.authorization.as_deref(),
        Some(&*format!("Bearer {KEY}"))
    );
    // The turn completes with the model's text.
    loop {
        let msgs = call(
            with_pw.clone(),
            "GET",
            format!("/session/{sid}/message"),
            None,
        )
        .await;
        assert_eq!(msgs.status, 200);
        if String::from_utf8_lossy(&msgs.body).contains("hello from the scripted model") {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(600),
            "no answer in the session: {}",
            String::from_utf8_lossy(&msgs.body)
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let t_turn = t.elapsed();
    let asked = model.requests();
    assert!(
        asked
            .iter()
            .all(|r| r.authorization.as_deref() == Some(&*format!("Bearer {KEY}"))),
        "a model request without the key"
    );
    assert!(
        asked
            .iter()
            .any(|r| r.last_user_text().as_deref() == Some("say hello"))
    );
    eprintln!(
        "first session after restore: session created in {:.2} s; prompt -> first model request {:.2} s; whole turn {:.2} s",
        t_session.as_secs_f64(),
        t_first_request.as_secs_f64(),
        t_turn.as_secs_f64()
    );

    // The key is in no file of the prebuild (memory, disk, device state, log),
    // nor in what the manager reports.
    let dir = env.data.path().join("pool/prebuilds").join(&pb.id);
    for f in ["mem", "disk.img", "state", "build.log"] {
        assert!(dir.join(f).exists(), "{f}");
    }
    let hits = files_containing(&dir, KEY);
    assert!(hits.is_empty(), "the key is in {hits:?}");
    let reported = format!(
        "{:?} {:?} {:?} {}",
        mgr.prebuild_list(None).await.unwrap(),
        sandboxes.get("t1").await.unwrap(),
        rec,
        serde_json::to_string(&mgr.workspace("oc").await.unwrap().spec).unwrap()
    );
    assert!(!reported.contains(KEY));

    sandboxes.delete("t1").await.expect("delete");
}
