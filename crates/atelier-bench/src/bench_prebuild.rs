//! `atelier-bench bench-prebuild`: spawning from a prebuild, measured against a running
//! manager.
//!
//! One run gives: manager spawn (create from the workspace → agent ready) against the
//! same restore done by hand with bare QEMU (the sandbox's own VMM command line,
//! pointed at a scratch dir of the bench's own and a copy of the disk), a cold prebuild (boot, clone, init,
//! snapshot) against the spawn, and the private and shared memory of idle sandboxes
//! restored from one prebuild. It reports figures and ratios; it never asserts on
//! times. Every sandbox it makes is named `bpb-<run>-…` and deleted at the end, also
//! when a step fails or on Ctrl-C.
//!
//! The bare-QEMU and memory steps are local: they need the manager's data dir on this
//! host (to read the prebuild's files and `/proc`). They never write there: the bare
//! runs work in a scratch dir beside it ([`Scratch`]).

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::Context;
use atelier_agent_proto::AgentClient;
use atelier_server::api::{PrebuildView, SandboxView, StatusView};
use atelier_vmm::qmp::Qmp;
use reqwest::Method;
use serde::Serialize;
use serde_json::json;

use atelier_client::{Client, decode, enc};

use crate::Global;
use crate::scratch::Scratch;

/// Spawns timed through the manager, and bare-QEMU restores timed.
const SPAWNS: usize = 3;
const BARE_RUNS: usize = 3;
/// Settling time before smaps are read.
const IDLE_SETTLE: Duration = Duration::from_secs(5);
/// How long a bare QEMU may take to open its QMP socket, restore, and answer.
const QMP_TIMEOUT: Duration = Duration::from_secs(30);
const AGENT_TIMEOUT: Duration = Duration::from_secs(240);
/// How long a cold prebuild may take.
const PREBUILD_TIMEOUT: Duration = Duration::from_secs(1800);
const MIB: f64 = 1024.0;

/// `atelier-bench bench-prebuild` options.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Workspace whose newest ready prebuild is spawned from.
    #[arg(long)]
    pub workspace: String,
    /// Idle sandboxes from the same prebuild for the memory figure.
    #[arg(long, default_value_t = 4)]
    pub sandboxes: usize,
    /// Where the bare-QEMU runs keep their disk copies (default: a fresh directory
    /// beside the data dir, removed afterwards; never inside the data dir).
    #[arg(long)]
    pub scratch_dir: Option<PathBuf>,
}

#[derive(Debug, Serialize, Default)]
struct Environment {
    accel: String,
    qemu_version: String,
    manager_version: String,
    storage_backend: String,
    workspace: String,
    prebuild: String,
    host_cpus: usize,
}

#[derive(Debug, Serialize)]
struct Spawn {
    /// Wall time of each `POST /sandboxes?wait=true` as the client sees it.
    client_ms: Vec<f64>,
    client_ms_median: f64,
    /// The server's `boot_ms` (request to agent ready).
    server_ms: Vec<i64>,
    server_ms_median: Option<f64>,
    /// `booted_from` of each (all should be `snapshot`).
    booted_from: Vec<String>,
}

#[derive(Debug, Serialize)]
struct BareRun {
    /// Spawn → QMP answering.
    qmp_ms: f64,
    /// Spawn → guest running after `migrate-incoming` (and `cont`).
    restored_ms: f64,
    /// Spawn → agent Hello and a Ping answered: the figure compared.
    ready_ms: f64,
    /// The copy of the disk into the scratch dir (not included in `ready_ms`).
    disk_copy_ms: f64,
    /// `reflink`, or `copy` when the scratch dir is on another filesystem than the
    /// prebuild (then `disk_copy_ms` is a full sparse copy).
    disk_copy: &'static str,
}

#[derive(Debug, Serialize)]
struct Bare {
    /// The sandbox whose VMM command line was reused.
    from_sandbox: String,
    runs: Vec<BareRun>,
    ready_ms_median: f64,
    disk_copy_ms_median: f64,
    /// Median manager spawn (client) / median bare ready; target ≤ 1.1.
    manager_over_bare: f64,
    /// The same including the disk copy in the bare figure.
    manager_over_bare_with_copy: f64,
    /// The command line the last run used.
    command: Vec<String>,
}

#[derive(Debug, Serialize)]
struct Cold {
    prebuild: String,
    status: String,
    /// POST → prebuild ready, polled.
    ms: f64,
    /// Cold prebuild / median manager spawn; target ≥ 20.
    over_spawn: f64,
}

#[derive(Debug, Serialize, Default, Clone, Copy, PartialEq)]
struct Smaps {
    rss_kib: u64,
    pss_kib: u64,
    shared_clean_kib: u64,
    shared_dirty_kib: u64,
    private_clean_kib: u64,
    private_dirty_kib: u64,
    anonymous_kib: u64,
}

impl Smaps {
    fn shared_kib(&self) -> u64 {
        self.shared_clean_kib + self.shared_dirty_kib
    }
    fn private_kib(&self) -> u64 {
        self.private_clean_kib + self.private_dirty_kib
    }
}

#[derive(Debug, Serialize)]
struct ProcMem {
    sandbox: String,
    pid: i32,
    #[serde(flatten)]
    smaps: Smaps,
    private_mib: f64,
    shared_mib: f64,
}

#[derive(Debug, Serialize)]
struct Memory {
    sandboxes: usize,
    settle_secs: u64,
    guest_memory_mib: u32,
    processes: Vec<ProcMem>,
    private_mib_median: f64,
    private_mib_max: f64,
    shared_mib_median: f64,
    pss_mib_median: f64,
    rss_mib_median: f64,
}

#[derive(Debug, Serialize, Default)]
struct Report {
    environment: Environment,
    spawn: Option<Spawn>,
    bare: Option<Bare>,
    cold: Option<Cold>,
    memory: Option<Memory>,
    /// Steps that failed or were skipped, with why.
    problems: BTreeMap<String, String>,
    total_secs: f64,
}

fn progress(msg: impl AsRef<str>) {
    eprintln!("bench-prebuild: {}", msg.as_ref());
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn median(v: &[f64]) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    }
}

struct Ctx {
    c: Client,
    args: Args,
    /// `bpb-<run>-`: every sandbox this run makes starts with it.
    prefix: String,
    data_dir: Option<PathBuf>,
    prebuild: Option<PrebuildView>,
    /// Sandboxes made in step 2, in order.
    spawned: Vec<SandboxView>,
    report: Report,
}

/// Runs the benchmark.
pub async fn run(g: &Global, args: Args) -> anyhow::Result<u8> {
    let started = Instant::now();
    let c = Client::new(g)?;
    let status: StatusView = c.get_json("/api/v1/status").await?;
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0)
        ^ std::process::id();
    let prefix = format!("bpb-{:06x}-", seed & 0xff_ffff);

    // Local steps need the manager's own data dir.
    let local = fs::canonicalize(&g.data_dir).ok();
    let server_dir = fs::canonicalize(&status.data_dir).ok();
    let data_dir = match (&local, &server_dir) {
        (Some(l), Some(s)) if l == s && l.join("pool").is_dir() => Some(l.clone()),
        _ => None,
    };
    let mut cx = Ctx {
        c,
        prefix,
        data_dir,
        prebuild: None,
        spawned: Vec::new(),
        report: Report::default(),
        args,
    };
    cx.report.environment = Environment {
        accel: status.accel.clone(),
        qemu_version: status.qemu_version.clone(),
        manager_version: status.version.clone(),
        storage_backend: status.storage_backend.clone(),
        workspace: cx.args.workspace.clone(),
        prebuild: String::new(),
        host_cpus: std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0),
    };
    progress(format!(
        "manager {} ({}), accel {}, storage {}; sandboxes named {}*",
        status.version, status.qemu_version, status.accel, status.storage_backend, cx.prefix
    ));

    let interrupted = tokio::select! {
        r = steps(&mut cx) => {
            if let Err(e) = r {
                problem(&mut cx, "run", e);
            }
            false
        }
        _ = tokio::signal::ctrl_c() => true,
    };
    if interrupted {
        progress("interrupted; cleaning up");
        cx.report
            .problems
            .insert("run".into(), "interrupted (Ctrl-C)".into());
    }
    crate::bench::delete_run_sandboxes(&cx.c, &cx.prefix, progress).await;
    cx.report.total_secs = started.elapsed().as_secs_f64();
    if g.json {
        println!("{}", serde_json::to_string_pretty(&cx.report)?);
    } else {
        print_table(&cx.report);
    }
    Ok(if cx.report.problems.is_empty() { 0 } else { 1 })
}

async fn steps(cx: &mut Ctx) -> anyhow::Result<()> {
    // 1. The prebuild.
    let pb = newest_ready(&cx.c, &cx.args.workspace).await?;
    progress(format!(
        "[1/5] prebuild {} of workspace {} ({}, {} MiB on disk)",
        pb.id,
        pb.workspace,
        pb.status,
        pb.size_bytes.unwrap_or(0) / (1 << 20)
    ));
    cx.report.environment.prebuild = pb.id.clone();
    cx.prebuild = Some(pb);

    // 2. Manager spawns; they stay up for steps 3 and 5.
    if let Err(e) = spawn_step(cx).await {
        problem(cx, "spawn", e);
    }

    // 3. Bare QEMU (local).
    match (
        cx.data_dir.clone(),
        cx.spawned.first().map(|s| s.id.clone()),
    ) {
        (None, _) => skip(cx, "bare"),
        (Some(_), None) => problem(cx, "bare", anyhow::anyhow!("no spawned sandbox to copy")),
        (Some(dir), Some(sb)) => match bare_step(cx, &dir, &sb).await {
            Ok(b) => cx.report.bare = Some(b),
            Err(e) => problem(cx, "bare", e),
        },
    }

    // 4. Cold prebuild.
    match cold_step(cx).await {
        Ok(c) => cx.report.cold = Some(c),
        Err(e) => problem(cx, "cold", e),
    }

    // 5. Memory of idle sandboxes (local).
    match cx.data_dir.clone() {
        None => skip(cx, "memory"),
        Some(dir) => match memory_step(cx, &dir).await {
            Ok(m) => cx.report.memory = Some(m),
            Err(e) => problem(cx, "memory", e),
        },
    }
    Ok(())
}

fn problem(cx: &mut Ctx, step: &str, e: anyhow::Error) {
    progress(format!("      {step} failed: {e:#}"));
    cx.report.problems.insert(step.into(), format!("{e:#}"));
}

fn skip(cx: &mut Ctx, step: &str) {
    let why = "skipped: the manager's data dir is not on this host (set --data-dir / ATELIER_DATA_DIR to the manager's)";
    progress(format!("      {step} {why}"));
    cx.report.problems.insert(step.into(), why.into());
}

async fn newest_ready(c: &Client, workspace: &str) -> anyhow::Result<PrebuildView> {
    let list: Vec<PrebuildView> = c
        .get_json(&format!("/api/v1/prebuilds?workspace={}", enc(workspace)))
        .await
        .with_context(|| format!("listing the prebuilds of workspace {workspace}"))?;
    list.into_iter()
        .filter(|p| p.status == "ready" || p.status == "stale")
        .max_by_key(|p| p.ready_at.unwrap_or(p.created_at))
        .with_context(|| {
            format!(
                "workspace {workspace} has no ready prebuild; run `atelier prebuild create {workspace}` first"
            )
        })
}

async fn spawn(c: &Client, name: &str, workspace: &str) -> anyhow::Result<(SandboxView, Duration)> {
    let t = Instant::now();
    let rb = c
        .request(Method::POST, "/api/v1/sandboxes?wait=true")
        .json(&json!({ "name": name, "workspace": workspace }));
    let s: SandboxView = decode(c.send(rb).await?)
        .await
        .with_context(|| format!("creating {name} from workspace {workspace}"))?;
    Ok((s, t.elapsed()))
}

async fn spawn_step(cx: &mut Ctx) -> anyhow::Result<()> {
    // Enough for the memory step too, all from the same prebuild; the first SPAWNS are timed
    // (they are all timed the same way, so all count).
    let count = SPAWNS.max(cx.args.sandboxes);
    let mut client = Vec::new();
    let mut server = Vec::new();
    let mut from = Vec::new();
    for i in 1..=count {
        let name = format!("{}s{i}", cx.prefix);
        let (s, took) = spawn(&cx.c, &name, &cx.args.workspace).await?;
        progress(format!(
            "[2/5] manager spawn {i}/{count}: {:.0} ms (server boot_ms {}, booted_from {})",
            ms(took),
            s.boot_ms
                .map(|m| m.to_string())
                .unwrap_or_else(|| "?".into()),
            s.booted_from.as_deref().unwrap_or("?")
        ));
        client.push(ms(took));
        if let Some(m) = s.boot_ms {
            server.push(m);
        }
        from.push(s.booted_from.clone().unwrap_or_default());
        cx.spawned.push(s);
    }
    let server_f: Vec<f64> = server.iter().map(|&m| m as f64).collect();
    cx.report.spawn = Some(Spawn {
        client_ms_median: median(&client),
        client_ms: client,
        server_ms_median: (!server_f.is_empty()).then(|| median(&server_f)),
        server_ms: server,
        booted_from: from.clone(),
    });
    if let Some(bad) = from.iter().find(|f| f.as_str() != "snapshot") {
        anyhow::bail!("a sandbox came up with booted_from {bad:?} instead of \"snapshot\"");
    }
    Ok(())
}

/// Command line of a process, split at NULs.
fn read_cmdline(pid: i32) -> Option<Vec<String>> {
    let raw = fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let mut args: Vec<String> = raw
        .split(|&b| b == 0)
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    if args.last().is_some_and(|a| a.is_empty()) {
        args.pop();
    }
    Some(args)
}

/// The QEMU process whose command line names `<data_dir>/sandboxes/<id>/`.
fn vmm_pid(data_dir: &Path, id: &str) -> Option<(i32, Vec<String>)> {
    let needle = format!("{}/sandboxes/{id}/", data_dir.display());
    for e in fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        let Some(args) = read_cmdline(pid) else {
            continue;
        };
        if args.first().is_some_and(|a| a.contains("qemu"))
            && args.iter().any(|a| a.contains(&needle))
        {
            return Some((pid, args));
        }
    }
    None
}

/// Replaces the `key=` field of a QEMU option string.
fn set_field(opt: &str, key: &str, value: &str) -> (String, bool) {
    let prefix = format!("{key}=");
    let mut found = false;
    let out: Vec<String> = opt
        .split(',')
        .map(|f| {
            if f.starts_with(&prefix) {
                found = true;
                format!("{prefix}{value}")
            } else {
                f.to_owned()
            }
        })
        .collect();
    (out.join(","), found)
}

/// The value of the `key=` field of a QEMU option string.
fn get_field<'a>(opt: &'a str, key: &str) -> Option<&'a str> {
    opt.split(',')
        .find_map(|f| f.strip_prefix(key)?.strip_prefix('='))
}

/// A sandbox's VMM command line turned into one for a bare run: the run dir becomes
/// `scratch` (so the QMP, agent and console paths move with it), the root drive
/// becomes `disk`, the TAP becomes `tap`, and `-daemonize`/`-pidfile` are dropped.
/// Devices stay exactly as they are: the restored state must match them.
fn rewrite_cmdline(
    args: &[String],
    run_dir: &Path,
    scratch: &Path,
    disk: &Path,
    tap: &str,
) -> anyhow::Result<Vec<String>> {
    let from = format!("{}/", run_dir.display().to_string().trim_end_matches('/'));
    let to = format!("{}/", scratch.display().to_string().trim_end_matches('/'));
    let disk = disk.display().to_string();
    let mut out = Vec::with_capacity(args.len());
    let mut drive = false;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "-daemonize" => continue,
            "-pidfile" => {
                it.next();
                continue;
            }
            "-drive" | "-netdev" => {
                let v = it
                    .next()
                    .with_context(|| format!("{a} without a value in the VMM command line"))?;
                out.push(a.clone());
                let v = if a == "-drive" && get_field(v, "id") == Some("root") {
                    let (v, found) = set_field(v, "file", &disk);
                    anyhow::ensure!(found, "the root -drive has no file=: {v}");
                    drive = true;
                    v
                } else if a == "-netdev" && v.starts_with("tap,") {
                    set_field(v, "ifname", tap).0
                } else {
                    v.replace(&from, &to)
                };
                out.push(v);
            }
            _ => out.push(a.replace(&from, &to)),
        }
    }
    anyhow::ensure!(drive, "no -drive id=root in the VMM command line: {args:?}");
    Ok(out)
}

/// `-object memory-backend-file,...,mem-path=P` → P.
fn mem_path(args: &[String]) -> Option<PathBuf> {
    args.iter()
        .filter(|a| a.starts_with("memory-backend-file,"))
        .find_map(|a| get_field(a, "mem-path").map(PathBuf::from))
}

/// `-run-with user=U:G` → (U, G).
fn run_as(args: &[String]) -> Option<(u32, u32)> {
    let i = args.iter().position(|a| a == "-run-with")?;
    let (u, g) = get_field(args.get(i + 1)?, "user")?.split_once(':')?;
    Some((u.parse().ok()?, g.parse().ok()?))
}

async fn bare_step(cx: &mut Ctx, data_dir: &Path, sb: &str) -> anyhow::Result<Bare> {
    let (pid, args) =
        vmm_pid(data_dir, sb).with_context(|| format!("no QEMU process found for sandbox {sb}"))?;
    let mem = mem_path(&args)
        .with_context(|| format!("the VMM of {} (pid {pid}) has no memory-backend-file", sb))?;
    let pb_dir = mem
        .parent()
        .context("the memory file has no parent dir")?
        .to_owned();
    if let Some(pb) = &cx.prebuild
        && pb_dir.file_name().and_then(|n| n.to_str()) != Some(pb.id.as_str())
    {
        progress(format!(
            "      note: {} restored {}, not {}",
            sb,
            pb_dir.display(),
            pb.id
        ));
    }
    let state = pb_dir.join("state");
    let src_disk = pb_dir.join("disk.img");
    anyhow::ensure!(
        state.is_file() && src_disk.is_file(),
        "{} lacks state or disk.img",
        pb_dir.display()
    );
    let run_dir = data_dir.join("sandboxes").join(sb);
    progress(format!(
        "[3/5] bare QEMU: {BARE_RUNS} restores of {} with {}'s command line (pid {pid})",
        pb_dir.display(),
        sb
    ));
    // Dropped at the end of the step, on error, and when Ctrl-C drops the step (after
    // the bare QEMU, which is killed on drop).
    let root = Scratch::create(data_dir, cx.args.scratch_dir.as_deref())?;
    let mut runs = Vec::new();
    let mut command = Vec::new();
    for k in 1..=BARE_RUNS {
        let scratch = root.path().join(format!("bare{k}"));
        fs::create_dir(&scratch).with_context(|| format!("creating {}", scratch.display()))?;
        let r = bare_run(&args, &run_dir, &scratch, &src_disk, &state, k).await;
        let _ = fs::remove_dir_all(&scratch);
        let (run, cmd) = r.with_context(|| format!("bare run {k}"))?;
        progress(format!(
            "[3/5] bare run {k}/{BARE_RUNS}: ready {:.0} ms (qmp {:.0} ms, running {:.0} ms; disk {} {:.1} ms before)",
            run.ready_ms, run.qmp_ms, run.restored_ms, run.disk_copy, run.disk_copy_ms
        ));
        runs.push(run);
        command = cmd;
    }
    let ready = median(&runs.iter().map(|r| r.ready_ms).collect::<Vec<_>>());
    let copy = median(&runs.iter().map(|r| r.disk_copy_ms).collect::<Vec<_>>());
    let spawn = cx
        .report
        .spawn
        .as_ref()
        .map(|s| s.client_ms_median)
        .unwrap_or(f64::NAN);
    Ok(Bare {
        from_sandbox: sb.to_owned(),
        runs,
        ready_ms_median: ready,
        disk_copy_ms_median: copy,
        manager_over_bare: spawn / ready.max(1e-9),
        manager_over_bare_with_copy: spawn / (ready + copy).max(1e-9),
        command,
    })
}

/// One bare restore in `scratch`: copy the disk, start QEMU, restore over QMP exactly
/// as the manager does, wait for the agent's Hello and a Pong; then kill it.
async fn bare_run(
    args: &[String],
    run_dir: &Path,
    scratch: &Path,
    src_disk: &Path,
    state: &Path,
    k: usize,
) -> anyhow::Result<(BareRun, Vec<String>)> {
    let disk = scratch.join("disk.img");
    let (disk_copy_kind, disk_copy) = copy_disk(src_disk, &disk)?;
    let cmd = rewrite_cmdline(args, run_dir, scratch, &disk, &format!("atlbench{k}"))?;
    if let Some((uid, gid)) = run_as(&cmd) {
        for p in [scratch, disk.as_path()] {
            std::os::unix::fs::chown(p, Some(uid), Some(gid))
                .with_context(|| format!("chown {} to {uid}:{gid}", p.display()))?;
        }
    }
    let log = fs::File::create(scratch.join("vmm.log")).context("creating vmm.log")?;
    let (qmp_sock, agent_sock) = (scratch.join("qmp.sock"), scratch.join("agent.sock"));

    let t = Instant::now();
    let mut child = tokio::process::Command::new(&cmd[0])
        .args(&cmd[1..])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .process_group(0)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {}", cmd[0]))?;
    let r = async {
        let qmp = loop {
            if let Some(st) = child.try_wait()? {
                let log = fs::read_to_string(scratch.join("vmm.log")).unwrap_or_default();
                anyhow::bail!("qemu exited ({st}): {}", log.trim());
            }
            if qmp_sock.exists()
                && let Ok(q) = Qmp::connect(&qmp_sock).await
            {
                break q;
            }
            anyhow::ensure!(t.elapsed() < QMP_TIMEOUT, "no QMP after {QMP_TIMEOUT:?}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        let qmp_at = t.elapsed();
        restore_incoming(&qmp, state).await?;
        let restored_at = t.elapsed();
        let agent = AgentClient::connect_unix(&agent_sock).await?;
        agent.wait_ready(AGENT_TIMEOUT).await?;
        agent.ping(Duration::from_secs(30)).await?;
        let ready_at = t.elapsed();
        let _ = qmp
            .execute_timeout("quit", None, Duration::from_secs(2))
            .await;
        Ok(BareRun {
            qmp_ms: ms(qmp_at),
            restored_ms: ms(restored_at),
            ready_ms: ms(ready_at),
            disk_copy_ms: ms(disk_copy),
            disk_copy: disk_copy_kind,
        })
    }
    .await;
    let _ = child.start_kill();
    let _ = child.wait().await;
    Ok((r?, cmd))
}

/// Copies the prebuild's disk to `dest`: a reflink when the scratch dir shares the
/// prebuild's filesystem, else a sparse full copy. Returns which, and how long the
/// copy that succeeded took.
fn copy_disk(src: &Path, dest: &Path) -> anyhow::Result<(&'static str, Duration)> {
    // GNU cp takes --reflink only with --sparse=auto.
    let cp = |mode: &[&str]| {
        let t = Instant::now();
        std::process::Command::new("cp")
            .args(mode)
            .arg(src)
            .arg(dest)
            .output()
            .map(|o| (o, t.elapsed()))
            .context("running cp")
    };
    let (out, took) = cp(&["--reflink=always"])?;
    if out.status.success() {
        return Ok(("reflink", took));
    }
    let _ = fs::remove_file(dest);
    let (out, took) = cp(&["--reflink=never", "--sparse=always"])?;
    anyhow::ensure!(
        out.status.success(),
        "cp {} {}: {}",
        src.display(),
        dest.display(),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(("copy", took))
}

/// The manager's own restore step (`x-ignore-shared` on, as for templates and
/// prebuilds).
async fn restore_incoming(qmp: &Qmp, state: &Path) -> anyhow::Result<()> {
    let inc = atelier_vmm::Incoming {
        path: state.to_owned(),
        ignore_shared: true,
    };
    atelier_vmm::qemu::restore_incoming(qmp, &inc)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))
}

async fn cold_step(cx: &mut Ctx) -> anyhow::Result<Cold> {
    let w = &cx.args.workspace;
    progress(format!(
        "[4/5] cold prebuild of {w} (boot, clone, init, snapshot)"
    ));
    let t = Instant::now();
    let rb = cx.c.request(
        Method::POST,
        &format!("/api/v1/workspaces/{}/prebuilds", enc(w)),
    );
    let mut p: PrebuildView = decode(cx.c.send(rb).await?)
        .await
        .with_context(|| format!("starting a prebuild of {w}"))?;
    while p.status == "building" {
        anyhow::ensure!(
            t.elapsed() < PREBUILD_TIMEOUT,
            "prebuild {} still building after {PREBUILD_TIMEOUT:?}",
            p.id
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
        p =
            cx.c.get_json(&format!("/api/v1/prebuilds/{}", enc(&p.id)))
                .await?;
    }
    let took = t.elapsed();
    anyhow::ensure!(
        p.status != "failed",
        "prebuild {} failed: {}",
        p.id,
        p.error.unwrap_or_default()
    );
    let spawn = cx
        .report
        .spawn
        .as_ref()
        .map(|s| s.client_ms_median)
        .unwrap_or(f64::NAN);
    progress(format!(
        "[4/5] cold prebuild {}: {:.1} s ({:.0}× the median spawn)",
        p.id,
        took.as_secs_f64(),
        ms(took) / spawn
    ));
    Ok(Cold {
        prebuild: p.id,
        status: p.status,
        ms: ms(took),
        over_spawn: ms(took) / spawn.max(1e-9),
    })
}

/// The fields of `/proc/<pid>/smaps_rollup` this report uses, in KiB.
fn parse_smaps_rollup(text: &str) -> Smaps {
    let mut s = Smaps::default();
    for line in text.lines() {
        let Some((k, v)) = line.split_once(':') else {
            continue;
        };
        let Some(v) = v
            .trim()
            .strip_suffix("kB")
            .and_then(|v| v.trim().parse::<u64>().ok())
        else {
            continue;
        };
        match k.trim() {
            "Rss" => s.rss_kib = v,
            "Pss" => s.pss_kib = v,
            "Shared_Clean" => s.shared_clean_kib = v,
            "Shared_Dirty" => s.shared_dirty_kib = v,
            "Private_Clean" => s.private_clean_kib = v,
            "Private_Dirty" => s.private_dirty_kib = v,
            "Anonymous" => s.anonymous_kib = v,
            _ => {}
        }
    }
    s
}

async fn memory_step(cx: &mut Ctx, data_dir: &Path) -> anyhow::Result<Memory> {
    let n = cx.args.sandboxes.min(cx.spawned.len());
    anyhow::ensure!(n > 0, "no spawned sandboxes to measure");
    progress(format!(
        "[5/5] memory: {n} idle sandboxes from one prebuild, settling {} s",
        IDLE_SETTLE.as_secs()
    ));
    tokio::time::sleep(IDLE_SETTLE).await;
    let mut processes = Vec::new();
    for sb in cx.spawned.iter().take(n) {
        let (pid, _) = vmm_pid(data_dir, &sb.id)
            .with_context(|| format!("no QEMU process found for sandbox {}", sb.id))?;
        let text = fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
            .with_context(|| format!("reading /proc/{pid}/smaps_rollup"))?;
        let smaps = parse_smaps_rollup(&text);
        processes.push(ProcMem {
            sandbox: sb.id.clone(),
            pid,
            private_mib: smaps.private_kib() as f64 / MIB,
            shared_mib: smaps.shared_kib() as f64 / MIB,
            smaps,
        });
    }
    let col = |f: fn(&ProcMem) -> f64| processes.iter().map(f).collect::<Vec<_>>();
    let private = col(|p| p.private_mib);
    let m = Memory {
        sandboxes: n,
        settle_secs: IDLE_SETTLE.as_secs(),
        guest_memory_mib: cx.spawned[0].memory_mib,
        private_mib_median: median(&private),
        private_mib_max: private.iter().copied().fold(0.0, f64::max),
        shared_mib_median: median(&col(|p| p.shared_mib)),
        pss_mib_median: median(&col(|p| p.smaps.pss_kib as f64 / MIB)),
        rss_mib_median: median(&col(|p| p.smaps.rss_kib as f64 / MIB)),
        processes,
    };
    progress(format!(
        "[5/5] private {:.1} MiB median ({:.1} max), shared {:.1} MiB, PSS {:.1} MiB, RSS {:.1} MiB per sandbox",
        m.private_mib_median,
        m.private_mib_max,
        m.shared_mib_median,
        m.pss_mib_median,
        m.rss_mib_median
    ));
    Ok(m)
}

fn print_table(r: &Report) {
    let e = &r.environment;
    println!(
        "atelier bench-prebuild — workspace {}, prebuild {}, accel {}, {}, storage {}, {} host CPUs",
        e.workspace, e.prebuild, e.accel, e.qemu_version, e.storage_backend, e.host_cpus
    );
    println!();
    println!("{:<50} {:>12} {:>12} {:>9}", "", "value", "vs", "ratio");
    let row = |what: &str, v: String, vs: String, ratio: String| {
        println!("{what:<50} {v:>12} {vs:>12} {ratio:>9}");
    };
    if let Some(s) = &r.spawn {
        row(
            &format!("manager spawn → ready, median of {}", s.client_ms.len()),
            format!("{:.0} ms", s.client_ms_median),
            String::new(),
            String::new(),
        );
        if let Some(m) = s.server_ms_median {
            row(
                "  server boot_ms, median",
                format!("{m:.0} ms"),
                String::new(),
                String::new(),
            );
        }
    }
    if let Some(b) = &r.bare {
        row(
            &format!("bare QEMU restore → ping, median of {}", b.runs.len()),
            format!("{:.0} ms", b.ready_ms_median),
            String::new(),
            String::new(),
        );
        row(
            "manager spawn / bare QEMU (target ≤ 1.1×)",
            format!(
                "{:.0} ms",
                r.spawn
                    .as_ref()
                    .map(|s| s.client_ms_median)
                    .unwrap_or(f64::NAN)
            ),
            format!("{:.0} ms", b.ready_ms_median),
            format!("{:.2}×", b.manager_over_bare),
        );
        row(
            "  … with the bare disk copy counted",
            String::new(),
            format!("{:.0} ms", b.ready_ms_median + b.disk_copy_ms_median),
            format!("{:.2}×", b.manager_over_bare_with_copy),
        );
    }
    if let Some(c) = &r.cold {
        row(
            "cold prebuild / manager spawn (target ≥ 20×)",
            format!("{:.1} s", c.ms / 1e3),
            format!(
                "{:.0} ms",
                r.spawn
                    .as_ref()
                    .map(|s| s.client_ms_median)
                    .unwrap_or(f64::NAN)
            ),
            format!("{:.0}×", c.over_spawn),
        );
    }
    if let Some(m) = &r.memory {
        row(
            &format!(
                "private per idle sandbox, median (n={}, ≤ 25 MB)",
                m.sandboxes
            ),
            format!("{:.1} MiB", m.private_mib_median),
            format!("{} MiB", m.guest_memory_mib),
            format!(
                "{:.1}%",
                100.0 * m.private_mib_median / f64::from(m.guest_memory_mib.max(1))
            ),
        );
        row(
            "  private, max",
            format!("{:.1} MiB", m.private_mib_max),
            String::new(),
            String::new(),
        );
        row(
            "  shared per sandbox, median",
            format!("{:.1} MiB", m.shared_mib_median),
            String::new(),
            String::new(),
        );
        row(
            "  PSS / RSS per sandbox, median",
            format!("{:.1} MiB", m.pss_mib_median),
            format!("{:.1} MiB", m.rss_mib_median),
            String::new(),
        );
    }
    for (step, why) in &r.problems {
        println!("problem: {step}: {why}");
    }
    println!("total {:.1} s", r.total_secs);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn rewrite_moves_run_dir_disk_and_tap() {
        let args = v(&[
            "qemu-system-x86_64",
            "-chardev",
            "file,id=console,path=/d/sandboxes/sb-1/console.log,append=on",
            "-drive",
            "id=root,file=/d/pool/disks/sb-1.img,format=raw,if=none,discard=unmap",
            "-chardev",
            "socket,id=agent,path=/d/sandboxes/sb-1/agent.sock,server=on,wait=off",
            "-qmp",
            "unix:/d/sandboxes/sb-1/qmp.sock,server=on,wait=off",
            "-pidfile",
            "/d/sandboxes/sb-1/vmm.pid",
            "-daemonize",
            "-object",
            "memory-backend-file,id=mem,size=1024M,mem-path=/d/pool/prebuilds/pb-1/mem,share=off",
            "-incoming",
            "defer",
            "-netdev",
            "tap,id=net0,ifname=atl1,script=no,downscript=no",
            "-device",
            "virtio-net-device,netdev=net0,mac=02:00:00:00:00:01",
        ]);
        let out = rewrite_cmdline(
            &args,
            Path::new("/d/sandboxes/sb-1"),
            Path::new("/s/bare1"),
            Path::new("/s/bare1/disk.img"),
            "atlbench1",
        )
        .unwrap();
        let want = v(&[
            "qemu-system-x86_64",
            "-chardev",
            "file,id=console,path=/s/bare1/console.log,append=on",
            "-drive",
            "id=root,file=/s/bare1/disk.img,format=raw,if=none,discard=unmap",
            "-chardev",
            "socket,id=agent,path=/s/bare1/agent.sock,server=on,wait=off",
            "-qmp",
            "unix:/s/bare1/qmp.sock,server=on,wait=off",
            "-object",
            "memory-backend-file,id=mem,size=1024M,mem-path=/d/pool/prebuilds/pb-1/mem,share=off",
            "-incoming",
            "defer",
            "-netdev",
            "tap,id=net0,ifname=atlbench1,script=no,downscript=no",
            "-device",
            "virtio-net-device,netdev=net0,mac=02:00:00:00:00:01",
        ]);
        assert_eq!(out, want);
        assert_eq!(
            mem_path(&out),
            Some(PathBuf::from("/d/pool/prebuilds/pb-1/mem"))
        );
        assert_eq!(run_as(&out), None);
        let mut with_user = out.clone();
        with_user.extend(v(&["-run-with", "user=1000:1001"]));
        assert_eq!(run_as(&with_user), Some((1000, 1001)));
    }

    #[test]
    fn rewrite_needs_a_root_drive() {
        let args = v(&["qemu", "-m", "512M"]);
        assert!(
            rewrite_cmdline(
                &args,
                Path::new("/a"),
                Path::new("/b"),
                Path::new("/c"),
                "t"
            )
            .is_err()
        );
    }

    #[test]
    fn smaps_rollup_parses() {
        let text =
            "55d0c0a00000-7ffd1a5f8000 ---p 00000000 00:00 0                          [rollup]
Rss:              180224 kB
Pss:               90112 kB
Pss_Dirty:         20000 kB
Shared_Clean:     160000 kB
Shared_Dirty:          4 kB
Private_Clean:       220 kB
Private_Dirty:     20000 kB
Referenced:       180224 kB
Anonymous:         19000 kB
";
        let s = parse_smaps_rollup(text);
        assert_eq!(s.rss_kib, 180224);
        assert_eq!(s.pss_kib, 90112);
        assert_eq!(s.shared_kib(), 160004);
        assert_eq!(s.private_kib(), 20220);
        assert_eq!(s.anonymous_kib, 19000);
    }

    #[test]
    fn median_of_even_and_odd() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert!(median(&[]).is_nan());
    }
}
