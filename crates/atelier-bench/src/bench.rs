//! `atelier-bench bench`: measured against a running manager.
//!
//! One run gives, with the accelerator labelled: cold create → agent-ready time, disk
//! clone time for a 1 GiB and an 8 GiB image (and their ratio), exec round trips,
//! file transfer speed both ways, HTTP through the built-in proxy against the guest
//! directly (throughput, and a burst of concurrent requests), and host RSS per idle
//! sandbox. It reports figures
//! and ratios; it never asserts on times. Every sandbox it makes is named
//! `bench-<run>-…` and deleted at the end, also when a step fails or on Ctrl-C.
//!
//! The clone and RSS steps are local: they need the manager's data dir on this host.
//! The clone step times its own pool in a scratch dir beside the data dir, never the
//! manager's pool.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;
use atelier_server::api::{DevView, ExecBody, ExecEventView, SandboxView, StatusView};
use atelier_storage::{BackendChoice, Pool};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use futures::StreamExt;
use reqwest::Method;
use serde::Serialize;
use serde_json::json;
use sha2::{Digest, Sha256};

use atelier_client::{Client, decode, enc, find_token};

use crate::Global;
use crate::scratch::Scratch;

/// `atelier-bench bench` options.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Image to boot.
    #[arg(long, default_value = "minimal")]
    pub image: String,
    /// Sandboxes booted at once for the RSS figure.
    #[arg(long, default_value_t = 3)]
    pub idle: usize,
    /// Exec round trips to time.
    #[arg(long, default_value_t = 200)]
    pub execs: usize,
    /// Megabytes to transfer each way.
    #[arg(long, default_value_t = 64)]
    pub transfer_mib: usize,
    /// Where the clone step makes its own pool (default: a fresh directory beside the
    /// data dir, removed afterwards; never inside the data dir).
    #[arg(long)]
    pub scratch_dir: Option<PathBuf>,
}

/// Cold boots timed for the create → ready figure.
const COLD_BOOTS: usize = 3;
/// Clones timed per image size.
const CLONE_REPEATS: usize = 20;
/// Memory and vCPUs of every benchmark sandbox.
const MEMORY_MIB: u32 = 512;
const VCPUS: u32 = 1;
/// Settling time before RSS is read.
const IDLE_SETTLE: Duration = Duration::from_secs(5);
/// Path of the transfer file in the guest.
const GUEST_FILE: &str = "/root/atelier-bench.bin";
/// Proxy step: the dev command serving files, its port and directory in the guest.
const PROXY_DEV: &str = "bench";
const PROXY_PORT: u16 = 8000;
const PROXY_DIR: &str = "/tmp/benchsrv";
/// Proxy step: size of the large file, and downloads timed each way.
const PROXY_MIB: usize = 32;
const PROXY_REPEATS: usize = 5;
/// Proxy step: concurrent GETs of a small file, its size, and the bound of one request.
const PROXY_CONCURRENCY: usize = 200;
const PROXY_SMALL_BYTES: usize = 1024;
const PROXY_REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
/// Proxy step: how long the dev command may take to listen and its route to appear.
const PROXY_LISTEN_TIMEOUT: Duration = Duration::from_secs(120);

/// Summary statistics of a series, in milliseconds.
#[derive(Debug, Serialize, Clone, Copy)]
struct Stats {
    n: usize,
    median_ms: f64,
    p99_ms: f64,
    min_ms: f64,
    max_ms: f64,
    mean_ms: f64,
}

impl Stats {
    fn of(samples: &[Duration]) -> Option<Stats> {
        if samples.is_empty() {
            return None;
        }
        let mut ms: Vec<f64> = samples.iter().map(|d| d.as_secs_f64() * 1e3).collect();
        ms.sort_by(f64::total_cmp);
        let n = ms.len();
        let median = if n % 2 == 1 {
            ms[n / 2]
        } else {
            (ms[n / 2 - 1] + ms[n / 2]) / 2.0
        };
        // Nearest-rank percentile.
        let p99 = ms[((0.99 * n as f64).ceil() as usize).clamp(1, n) - 1];
        Some(Stats {
            n,
            median_ms: median,
            p99_ms: p99,
            min_ms: ms[0],
            max_ms: ms[n - 1],
            mean_ms: ms.iter().sum::<f64>() / n as f64,
        })
    }
}

#[derive(Debug, Serialize, Default)]
struct Environment {
    accel: String,
    accel_reason: Option<String>,
    qemu_version: String,
    storage_backend: String,
    manager_version: String,
    image: String,
    sandbox_vcpus: u32,
    sandbox_memory_mib: u32,
    host_cpus: usize,
}

#[derive(Debug, Serialize)]
struct Boot {
    /// Wall time of `POST /sandboxes?wait=true` as the client sees it.
    client: Stats,
    /// The same for creates restored from the memory-snapshot template.
    restored: Option<Stats>,
    /// Median cold / median restored.
    cold_over_restored: Option<f64>,
    /// The server's `boot_ms` (request to agent ready).
    server_ms_median: Option<f64>,
    server_ms: Vec<i64>,
}

#[derive(Debug, Serialize)]
struct Clone {
    backend: String,
    small_gib: u64,
    large_gib: u64,
    /// Data extents (1 MiB each) in the small and large images.
    small_extents: u64,
    large_extents: u64,
    small: Stats,
    large: Stats,
    /// Median large / median small: ~1 means clone time does not grow with size.
    large_over_small: f64,
    /// The large size again, with as many extents per GiB as the small one.
    dense_extents: u64,
    dense: Stats,
    /// Median dense / median large: what the extent count costs.
    dense_over_large: f64,
    /// Byte-for-byte read/write copy of the small image (page cache, no fsync).
    full_copy_ms: f64,
    /// The same plus fsync.
    full_copy_fsync_ms: f64,
    /// `std::fs::copy` (copy_file_range: the kernel may itself reflink on XFS).
    std_fs_copy_ms: f64,
    /// Full copy (no fsync) / median small clone.
    copy_over_clone: f64,
}

#[derive(Debug, Serialize)]
struct Exec {
    command: &'static str,
    round_trip: Stats,
}

#[derive(Debug, Serialize)]
struct Transfer {
    mib: usize,
    upload_mb_s: f64,
    download_mb_s: f64,
    upload_ms: f64,
    download_ms: f64,
    sha256: String,
    /// The guest's `sha256sum` of the uploaded file matched (None: not available).
    upload_verified_in_guest: Option<bool>,
    /// The downloaded bytes hashed to the same sum.
    download_verified: bool,
}

/// Concurrent GETs of one small file, all started at once.
#[derive(Debug, Serialize)]
struct Burst {
    requests: usize,
    /// Failed, timed out or short responses.
    errors: usize,
    first_error: Option<String>,
    /// From the first request sent to the last one finished.
    wall_ms: f64,
    /// Successful requests / wall time.
    requests_per_s: f64,
    /// Latency of the successful requests.
    latency: Option<Stats>,
}

#[derive(Debug, Serialize)]
struct Proxy {
    /// Size of the downloaded file.
    mib: usize,
    /// Each download from the guest's address, host → guest port (MB/s).
    direct_mb_s: Vec<f64>,
    /// Each download through the manager's proxy (`dev-bench-{id}.{domain}`).
    proxied_mb_s: Vec<f64>,
    direct_mb_s_median: f64,
    proxied_mb_s_median: f64,
    /// Median proxied / median direct.
    proxied_over_direct: f64,
    /// Size of the file the bursts fetch.
    small_bytes: usize,
    direct_burst: Burst,
    proxied_burst: Burst,
    /// Proxied requests/s / direct requests/s.
    burst_proxied_over_direct: f64,
}

#[derive(Debug, Serialize)]
struct ProcRss {
    sandbox: String,
    pid: i32,
    vm_rss_kib: u64,
    rss_anon_kib: u64,
    rss_file_kib: u64,
    rss_shmem_kib: u64,
}

#[derive(Debug, Serialize)]
struct Idle {
    sandboxes: usize,
    /// Wall time until all were ready, booted at once.
    parallel_boot_ms: f64,
    settle_secs: u64,
    processes: Vec<ProcRss>,
    mean_rss_mib: f64,
    mean_rss_anon_mib: f64,
    mean_rss_file_mib: f64,
    guest_memory_mib: u32,
    /// Mean VmRSS / guest memory.
    rss_over_guest_memory: f64,
}

#[derive(Debug, Serialize, Default)]
struct Report {
    environment: Environment,
    boot: Option<Boot>,
    clone: Option<Clone>,
    exec: Option<Exec>,
    transfer: Option<Transfer>,
    proxy: Option<Proxy>,
    idle: Option<Idle>,
    /// Steps that failed or were skipped, with why.
    problems: BTreeMap<String, String>,
    total_secs: f64,
}

/// Small, dependency-free PRNG (splitmix64): names and incompressible test data.
struct Rng(u64);

impl Rng {
    fn seeded() -> Rng {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        Rng(t ^ ((std::process::id() as u64) << 32))
    }
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn progress(msg: impl AsRef<str>) {
    eprintln!("bench: {}", msg.as_ref());
}

struct Ctx<'a> {
    c: Client,
    /// The manager's URL and token, for requests the API client does not make
    /// (through the proxy, with another Host).
    manager_url: String,
    token: Option<String>,
    args: &'a Args,
    /// `bench-<run>-`: every sandbox this run makes starts with it.
    prefix: String,
    data_dir: Option<PathBuf>,
    report: Report,
}

/// Runs the benchmark.
pub async fn run(g: &Global, args: Args) -> anyhow::Result<u8> {
    let started = Instant::now();
    let c = Client::new(g)?;
    let status: StatusView = c.get_json("/api/v1/status").await?;
    let mut rng = Rng::seeded();
    let prefix = format!("bench-{:06x}-", rng.next() & 0xff_ffff);

    // Local steps need the manager's own data dir, with its pool already there.
    let local = fs::canonicalize(&g.data_dir).ok();
    let server_dir = fs::canonicalize(&status.data_dir).ok();
    let data_dir = match (&local, &server_dir) {
        (Some(l), Some(s)) if l == s && l.join("pool").is_dir() => Some(l.clone()),
        _ => None,
    };

    let mut cx = Ctx {
        c,
        manager_url: g.url.trim_end_matches('/').to_owned(),
        token: find_token(g),
        args: &args,
        prefix,
        data_dir,
        report: Report::default(),
    };
    cx.report.environment = Environment {
        accel: status.accel.clone(),
        accel_reason: status.accel_reason.clone(),
        qemu_version: status.qemu_version.clone(),
        storage_backend: status.storage_backend.clone(),
        manager_version: status.version.clone(),
        image: args.image.clone(),
        sandbox_vcpus: VCPUS,
        sandbox_memory_mib: MEMORY_MIB,
        host_cpus: std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0),
    };
    if !status.images.iter().any(|i| i == &args.image) {
        anyhow::bail!(
            "image {:?} is not built on the manager (built: {:?}); run `atelier image build {}`",
            args.image,
            status.images,
            args.image
        );
    }
    progress(format!(
        "manager {} ({}), accel {}, storage {}; sandboxes named {}*",
        status.version, status.qemu_version, status.accel, status.storage_backend, cx.prefix
    ));

    let interrupted = tokio::select! {
        () = steps(&mut cx) => false,
        _ = tokio::signal::ctrl_c() => true,
    };
    if interrupted {
        progress("interrupted; cleaning up");
        cx.report
            .problems
            .insert("run".into(), "interrupted (Ctrl-C)".into());
    }
    delete_run_sandboxes(&cx.c, &cx.prefix, progress).await;
    cx.report.total_secs = started.elapsed().as_secs_f64();
    if g.json {
        println!("{}", serde_json::to_string_pretty(&cx.report)?);
    } else {
        print_table(&cx.report);
    }
    Ok(if cx.report.problems.is_empty() { 0 } else { 1 })
}

async fn steps(cx: &mut Ctx<'_>) {
    // 1. Cold boots; the last sandbox stays up for exec, transfer and proxy.
    let kept = match boot_step(cx).await {
        Ok(name) => Some(name),
        Err(e) => {
            problem(cx, "boot", e);
            None
        }
    };
    // The accelerator is decided at the first boot.
    if let Ok(s) = cx.c.get_json::<StatusView>("/api/v1/status").await {
        cx.report.environment.accel = s.accel;
        cx.report.environment.accel_reason = s.accel_reason;
    }

    // 2. Disk clones (local).
    match cx.data_dir.clone() {
        Some(dir) => {
            progress(format!(
                "[2/6] disk clones: sparse 1 GiB, 8 GiB and 8 GiB dense images, {CLONE_REPEATS} clones each"
            ));
            let base = cx.args.scratch_dir.clone();
            // On Ctrl-C the blocking step runs to its end and its scratch guard cleans
            // up; the runtime waits for it before the process exits.
            let r = tokio::task::spawn_blocking(move || clone_step(&dir, base.as_deref())).await;
            match r {
                Ok(Ok(cl)) => {
                    progress(format!(
                        "      {}: 1 GiB {:.3} ms, 8 GiB {:.3} ms (ratio {:.2}), 8 GiB with {} extents {:.3} ms; full copy {:.0} ms",
                        cl.backend,
                        cl.small.median_ms,
                        cl.large.median_ms,
                        cl.large_over_small,
                        cl.dense_extents,
                        cl.dense.median_ms,
                        cl.full_copy_ms
                    ));
                    cx.report.clone = Some(cl);
                }
                Ok(Err(e)) => problem(cx, "clone", e),
                Err(e) => problem(cx, "clone", e.into()),
            }
        }
        None => skip(cx, "clone"),
    }

    // 3, 4 and 5 need a running sandbox.
    match &kept {
        Some(name) => {
            let name = name.clone();
            match exec_step(cx, &name).await {
                Ok(e) => cx.report.exec = Some(e),
                Err(e) => problem(cx, "exec", e),
            }
            match transfer_step(cx, &name).await {
                Ok(t) => cx.report.transfer = Some(t),
                Err(e) => problem(cx, "transfer", e),
            }
            match proxy_step(cx, &name).await {
                Ok(Some(p)) => {
                    if p.proxied_burst.errors > 0 {
                        cx.report.problems.insert(
                            "proxy".into(),
                            format!(
                                "{} of {} concurrent requests through the proxy failed (first: {})",
                                p.proxied_burst.errors,
                                p.proxied_burst.requests,
                                p.proxied_burst.first_error.as_deref().unwrap_or("?")
                            ),
                        );
                    }
                    cx.report.proxy = Some(p);
                }
                Ok(None) => {}
                Err(e) => problem(cx, "proxy", e),
            }
            // Fresh sandboxes for the idle figure: this one has been busy.
            let _ = delete(&cx.c, &name).await;
        }
        None => {
            for step in ["exec", "transfer", "proxy"] {
                cx.report
                    .problems
                    .insert(step.into(), "skipped: no sandbox booted".into());
            }
        }
    }

    // 6. Idle RSS (local).
    if cx.args.idle == 0 {
        return;
    }
    match cx.data_dir.clone() {
        Some(dir) => match idle_step(cx, &dir).await {
            Ok(i) => cx.report.idle = Some(i),
            Err(e) => problem(cx, "idle", e),
        },
        None => skip(cx, "idle"),
    }
}

fn problem(cx: &mut Ctx<'_>, step: &str, e: anyhow::Error) {
    progress(format!("      {step} failed: {e:#}"));
    cx.report.problems.insert(step.into(), format!("{e:#}"));
}

fn skip(cx: &mut Ctx<'_>, step: &str) {
    let why = "skipped: the manager's data dir is not on this host (set --data-dir / ATELIER_DATA_DIR to the manager's)";
    progress(format!("      {step} {why}"));
    cx.report.problems.insert(step.into(), why.into());
}

async fn create(
    c: &Client,
    name: &str,
    image: &str,
    cold: bool,
) -> anyhow::Result<(SandboxView, Duration)> {
    let t = Instant::now();
    let rb = c.request(Method::POST, "/api/v1/sandboxes?wait=true").json(
        &json!({ "name": name, "image": image, "vcpus": VCPUS, "memory_mib": MEMORY_MIB,
                       "cold_boot": cold }),
    );
    let s: SandboxView = decode(c.send(rb).await?).await?;
    Ok((s, t.elapsed()))
}

async fn delete(c: &Client, name: &str) -> anyhow::Result<()> {
    c.send(c.request(Method::DELETE, &format!("/api/v1/sandboxes/{}", enc(name))))
        .await?;
    Ok(())
}

/// Deletes every sandbox whose name has this run's prefix (a create cut short may
/// have left one behind under a name the run never saw confirmed). `say` prints a
/// progress line under the calling benchmark's name.
pub(crate) async fn delete_run_sandboxes(c: &Client, prefix: &str, say: fn(String)) {
    let list: Vec<SandboxView> = match c.get_json("/api/v1/sandboxes").await {
        Ok(l) => l,
        Err(e) => {
            say(format!(
                "cleanup: cannot list sandboxes ({e:#}); delete {prefix}* by hand"
            ));
            return;
        }
    };
    let ours: Vec<_> = list
        .into_iter()
        .filter(|s| s.name.starts_with(prefix))
        .collect();
    if ours.is_empty() {
        return;
    }
    say(format!("cleanup: deleting {} sandbox(es)", ours.len()));
    // One at a time, with retries: concurrent deletes can meet a busy database.
    for s in &ours {
        for attempt in 1..=3 {
            match delete(c, &s.id).await {
                Ok(()) => break,
                Err(e) if attempt == 3 => {
                    say(format!(
                        "cleanup: {} ({}): {e:#}; delete it by hand",
                        s.name, s.id
                    ));
                }
                Err(e) => {
                    say(format!("cleanup: {} ({}): {e:#}; retrying", s.name, s.id));
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    }
}

async fn boot_step(cx: &mut Ctx<'_>) -> anyhow::Result<String> {
    let mut client = Vec::new();
    let mut server = Vec::new();
    let mut last = String::new();
    for i in 1..=COLD_BOOTS {
        if !last.is_empty() {
            delete(&cx.c, &last).await?;
        }
        let name = format!("{}boot{i}", cx.prefix);
        let (s, took) = create(&cx.c, &name, &cx.args.image, true)
            .await
            .with_context(|| format!("creating {name}"))?;
        progress(format!(
            "[1/6] cold create → agent ready {i}/{COLD_BOOTS}: {:.2} s (server boot_ms {})",
            took.as_secs_f64(),
            s.boot_ms
                .map(|m| m.to_string())
                .unwrap_or_else(|| "?".into())
        ));
        client.push(took);
        if let Some(ms) = s.boot_ms {
            server.push(ms);
        }
        last = name;
    }
    let server_ms_median = Stats::of(
        &server
            .iter()
            .map(|&m| Duration::from_millis(m.max(0) as u64))
            .collect::<Vec<_>>(),
    )
    .map(|s| s.median_ms);
    let cold = Stats::of(&client).context("no boots")?;
    let restored = match restore_step(cx).await {
        Ok(r) => Some(r),
        Err(e) => {
            problem(cx, "restore", e);
            None
        }
    };
    cx.report.boot = Some(Boot {
        cold_over_restored: restored
            .as_ref()
            .map(|r| cold.median_ms / r.median_ms.max(1e-9)),
        restored,
        client: cold,
        server_ms_median,
        server_ms: server,
    });
    Ok(last)
}

/// Waits for the memory-snapshot template the cold boots triggered, then times
/// creates that restore it.
async fn restore_step(cx: &mut Ctx<'_>) -> anyhow::Result<Stats> {
    let start = Instant::now();
    loop {
        let st: StatusView = cx.c.get_json("/api/v1/status").await?;
        if !st.templates.is_empty() {
            break;
        }
        anyhow::ensure!(
            start.elapsed() < Duration::from_secs(300),
            "no memory-snapshot template after 300 s"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let mut took = Vec::new();
    for i in 1..=COLD_BOOTS {
        let name = format!("{}restore{i}", cx.prefix);
        let (s, t) = create(&cx.c, &name, &cx.args.image, false)
            .await
            .with_context(|| format!("creating {name}"))?;
        anyhow::ensure!(
            s.booted_from.as_deref() == Some("snapshot"),
            "{name} booted instead of restoring"
        );
        progress(format!(
            "[1/6] create from memory snapshot → agent ready {i}/{COLD_BOOTS}: {:.2} s",
            t.as_secs_f64()
        ));
        took.push(t);
        delete(&cx.c, &name).await?;
    }
    Stats::of(&took).context("no restores")
}

/// A sparse image of `gib` GiB with 1 MiB of data written every `stride_mib` MiB;
/// returns how many 1 MiB extents it wrote.
fn make_sparse(path: &Path, gib: u64, stride_mib: u64, rng: &mut Rng) -> anyhow::Result<u64> {
    let f = File::create(path).with_context(|| format!("creating {}", path.display()))?;
    let size = gib << 30;
    f.set_len(size)?;
    let mut buf = vec![0u8; 1 << 20];
    let mut written = 0;
    let mut off = 0;
    while off < size {
        rng.fill(&mut buf);
        f.write_all_at(&buf, off)?;
        written += 1;
        off += stride_mib << 20;
    }
    f.sync_all()?;
    Ok(written)
}

fn time_clones(pool: &Pool, base: &Path, dir: &Path) -> anyhow::Result<Stats> {
    let mut samples = Vec::with_capacity(CLONE_REPEATS);
    for i in 0..CLONE_REPEATS {
        let dest = dir.join(format!("clone-{i}.img"));
        let (_, took) = pool
            .clone_disk(base, &dest)
            .with_context(|| format!("cloning {}", base.display()))?;
        samples.push(took);
        pool.remove_disk(&dest)?;
    }
    Stats::of(&samples).context("no clones")
}

/// Byte-for-byte copy (holes read and written as zeros); returns (copy, copy+fsync).
fn full_copy(src: &Path, dest: &Path) -> anyhow::Result<(Duration, Duration)> {
    let t = Instant::now();
    let mut from = File::open(src)?;
    from.seek(SeekFrom::Start(0))?;
    let mut to = File::create(dest)?;
    let mut buf = vec![0u8; 8 << 20];
    loop {
        let n = from.read(&mut buf)?;
        if n == 0 {
            break;
        }
        to.write_all(&buf[..n])?;
    }
    let copied = t.elapsed();
    to.sync_all()?;
    Ok((copied, t.elapsed()))
}

/// Clone timings on a pool of the bench's own, opened in a scratch dir beside the
/// manager's data dir (the same filesystem, so the same backend choice), never in the
/// manager's pool: opening that from a second process would run its start-up sweep
/// under the manager's feet.
fn clone_step(data_dir: &Path, base: Option<&Path>) -> anyhow::Result<Clone> {
    let scratch = Scratch::create(data_dir, base)?;
    let pool = Pool::open(scratch.path(), BackendChoice::Auto)
        .with_context(|| format!("opening a scratch pool in {}", scratch.path().display()))?;
    let dir = pool.root().join("bench-tmp");
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut rng = Rng::seeded();
    let (small_gib, large_gib) = (1, 8);
    let small = dir.join("base-1g.img");
    let large = dir.join("base-8g.img");
    let dense = dir.join("base-8g-dense.img");
    // Same data (16 × 1 MiB) in both, so size is the only difference; the dense 8 GiB
    // image has 1 MiB every 64 MiB like the small one (8× the extents).
    let small_extents = make_sparse(&small, small_gib, 64, &mut rng)?;
    let large_extents = make_sparse(&large, large_gib, 512, &mut rng)?;
    let dense_extents = make_sparse(&dense, large_gib, 64, &mut rng)?;
    // One untimed clone each warms metadata caches.
    for base in [&small, &large, &dense] {
        let d = dir.join("warm.img");
        pool.clone_disk(base, &d)?;
        pool.remove_disk(&d)?;
    }
    let s = time_clones(&pool, &small, &dir)?;
    let l = time_clones(&pool, &large, &dir)?;
    let d = time_clones(&pool, &dense, &dir)?;
    let copy = dir.join("copy.img");
    let (full, full_fsync) = full_copy(&small, &copy)?;
    fs::remove_file(&copy)?;
    let t = Instant::now();
    fs::copy(&small, &copy)?;
    let std_copy = t.elapsed();
    fs::remove_file(&copy)?;
    let full_ms = full.as_secs_f64() * 1e3;
    Ok(Clone {
        backend: pool.backend().as_str().to_owned(),
        small_gib,
        large_gib,
        small_extents,
        large_extents,
        small: s,
        large: l,
        large_over_small: l.median_ms / s.median_ms.max(1e-9),
        dense_extents,
        dense: d,
        dense_over_large: d.median_ms / l.median_ms.max(1e-9),
        full_copy_ms: full_ms,
        full_copy_fsync_ms: full_fsync.as_secs_f64() * 1e3,
        std_fs_copy_ms: std_copy.as_secs_f64() * 1e3,
        copy_over_clone: full_ms / s.median_ms.max(1e-9),
    })
}

/// Runs a command through the API; returns exit code and stdout.
async fn exec(c: &Client, sandbox: &str, command: &[&str]) -> anyhow::Result<(i32, Vec<u8>)> {
    let body = ExecBody {
        command: command.iter().map(|s| (*s).to_owned()).collect(),
        env: BTreeMap::new(),
        cwd: None,
        timeout_secs: Some(60),
        stdin: None,
    };
    let resp = c
        .send(
            c.request(
                Method::POST,
                &format!("/api/v1/sandboxes/{}/exec", enc(sandbox)),
            )
            .json(&body),
        )
        .await?;
    let mut stream = resp.bytes_stream();
    let mut buf: Vec<u8> = Vec::new();
    let mut out = Vec::new();
    while let Some(chunk) = stream.next().await {
        buf.extend_from_slice(&chunk.context("exec stream broke")?);
        while let Some(pos) = buf.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = buf.drain(..=pos).collect();
            match serde_json::from_slice::<ExecEventView>(&line).context("bad exec event")? {
                ExecEventView::Stdout { data } => out.extend(B64.decode(data)?),
                ExecEventView::Exit { code, signal, .. } => {
                    return Ok((code.unwrap_or(128 + signal.unwrap_or(0)), out));
                }
                ExecEventView::Error { message } => anyhow::bail!("exec failed: {message}"),
                ExecEventView::Started { .. } | ExecEventView::Stderr { .. } => {}
            }
        }
    }
    anyhow::bail!("exec stream ended without an exit status")
}

async fn exec_step(cx: &mut Ctx<'_>, sandbox: &str) -> anyhow::Result<Exec> {
    let n = cx.args.execs.max(1);
    progress(format!("[3/6] exec round trips: {n} × `true`"));
    // One untimed warm-up (connection, page cache in the guest).
    exec(&cx.c, sandbox, &["true"]).await?;
    let mut samples = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        let (code, _) = exec(&cx.c, sandbox, &["true"]).await?;
        samples.push(t.elapsed());
        anyhow::ensure!(code == 0, "`true` exited with {code}");
    }
    let st = Stats::of(&samples).context("no execs")?;
    progress(format!(
        "      median {:.2} ms, p99 {:.2} ms",
        st.median_ms, st.p99_ms
    ));
    Ok(Exec {
        command: "true",
        round_trip: st,
    })
}

async fn transfer_step(cx: &mut Ctx<'_>, sandbox: &str) -> anyhow::Result<Transfer> {
    let mib = cx.args.transfer_mib.max(1);
    progress(format!("[4/6] file transfer: {mib} MiB each way"));
    let mut data = vec![0u8; mib << 20];
    Rng::seeded().fill(&mut data);
    let sum = hex(&Sha256::digest(&data));
    let len = data.len() as f64;
    let url = format!(
        "/api/v1/sandboxes/{}/files?path={}",
        enc(sandbox),
        enc(GUEST_FILE)
    );

    let t = Instant::now();
    let resp =
        cx.c.send(cx.c.request(Method::PUT, &url).body(data))
            .await?;
    let _: serde_json::Value = decode(resp).await?;
    let up = t.elapsed();

    let upload_verified_in_guest = match exec(&cx.c, sandbox, &["sha256sum", GUEST_FILE]).await {
        Ok((0, out)) => Some(String::from_utf8_lossy(&out).split_whitespace().next() == Some(&sum)),
        _ => None,
    };

    let t = Instant::now();
    let resp = cx.c.send(cx.c.request(Method::GET, &url)).await?;
    let mut stream = resp.bytes_stream();
    let mut h = Sha256::new();
    let mut got = 0usize;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.context("download broke")?;
        got += chunk.len();
        h.update(&chunk);
    }
    let down = t.elapsed();
    let download_verified = got == mib << 20 && hex(&h.finalize()) == sum;
    let _ = exec(&cx.c, sandbox, &["rm", "-f", GUEST_FILE]).await;

    let tr = Transfer {
        mib,
        upload_mb_s: len / 1e6 / up.as_secs_f64().max(1e-9),
        download_mb_s: len / 1e6 / down.as_secs_f64().max(1e-9),
        upload_ms: up.as_secs_f64() * 1e3,
        download_ms: down.as_secs_f64() * 1e3,
        sha256: sum,
        upload_verified_in_guest,
        download_verified,
    };
    progress(format!(
        "      up {:.1} MB/s, down {:.1} MB/s, sha256 {}",
        tr.upload_mb_s,
        tr.download_mb_s,
        match (tr.upload_verified_in_guest, tr.download_verified) {
            (Some(false), _) | (_, false) => "MISMATCH",
            (None, true) => "ok (download; guest has no sha256sum)",
            (Some(true), true) => "ok both ways",
        }
    ));
    anyhow::ensure!(
        download_verified && upload_verified_in_guest != Some(false),
        "sha256 mismatch after transfer (upload in guest: {upload_verified_in_guest:?}, download: {download_verified}, {got} bytes back)"
    );
    Ok(tr)
}

/// Where the proxy step sends its GETs: the guest itself, or the manager with the
/// dev command's Host and the API token.
struct Target {
    label: &'static str,
    base: String,
    host: Option<String>,
    token: Option<String>,
}

impl Target {
    fn get(&self, http: &reqwest::Client, path: &str) -> reqwest::RequestBuilder {
        let mut rb = http.get(format!("{}{path}", self.base));
        if let Some(h) = &self.host {
            rb = rb.header(reqwest::header::HOST, h);
        }
        if let Some(t) = &self.token {
            rb = rb.bearer_auth(t);
        }
        rb
    }
}

/// The wildcard domain in a sandbox URL `{scheme}://sandbox-{id}.{domain}[:port]/`.
fn domain_from_url(url: &str, id: &str) -> Option<String> {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let host = rest.split(['/', '?']).next()?;
    let host = match host.rsplit_once(':') {
        Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => host,
    };
    let domain = host.strip_prefix(&format!("sandbox-{id}."))?;
    (!domain.is_empty()).then(|| domain.to_owned())
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// GETs `path` and reads the whole body; returns its length and the time taken.
async fn fetch(
    http: &reqwest::Client,
    t: &Target,
    path: &str,
) -> anyhow::Result<(usize, Duration)> {
    let start = Instant::now();
    let resp = t
        .get(http, path)
        .send()
        .await
        .with_context(|| format!("GET {path} {}", t.label))?;
    let status = resp.status();
    anyhow::ensure!(status.is_success(), "GET {path} {}: HTTP {status}", t.label);
    let mut body = resp.bytes_stream();
    let mut n = 0;
    while let Some(chunk) = body.next().await {
        n += chunk
            .with_context(|| format!("GET {path} {}: body broke", t.label))?
            .len();
    }
    Ok((n, start.elapsed()))
}

/// Starts `n` GETs of `path` at once, each bounded by PROXY_REQUEST_TIMEOUT.
async fn burst(http: &reqwest::Client, t: &Target, path: &str, len: usize, n: usize) -> Burst {
    let start = Instant::now();
    let requests = (0..n).map(|_| async move {
        match tokio::time::timeout(PROXY_REQUEST_TIMEOUT, fetch(http, t, path)).await {
            Ok(Ok((got, took))) if got == len => Ok(took),
            Ok(Ok((got, _))) => Err(format!("{got} bytes instead of {len}")),
            Ok(Err(e)) => Err(format!("{e:#}")),
            Err(_) => Err(format!(
                "no response within {} s",
                PROXY_REQUEST_TIMEOUT.as_secs()
            )),
        }
    });
    let results = futures::future::join_all(requests).await;
    let wall = start.elapsed();
    let mut ok = Vec::new();
    let mut first_error = None;
    for r in results {
        match r {
            Ok(d) => ok.push(d),
            Err(e) => {
                first_error.get_or_insert(e);
            }
        }
    }
    Burst {
        requests: n,
        errors: n - ok.len(),
        first_error,
        wall_ms: wall.as_secs_f64() * 1e3,
        requests_per_s: ok.len() as f64 / wall.as_secs_f64().max(1e-9),
        latency: Stats::of(&ok),
    }
}

/// Serves files from the sandbox with a dev command and downloads them directly and
/// through the proxy. None (with the reason recorded) when the sandbox has no network.
async fn proxy_step(cx: &mut Ctx<'_>, sandbox: &str) -> anyhow::Result<Option<Proxy>> {
    let s: SandboxView =
        cx.c.get_json(&format!("/api/v1/sandboxes/{}", enc(sandbox)))
            .await?;
    let (Some(ip), Some(url)) = (s.ip.clone(), s.url.clone()) else {
        let why = "skipped: the sandbox has no network address (manager runs with --no-network)";
        progress(format!("[5/6] proxy throughput {why}"));
        cx.report.problems.insert("proxy".into(), why.into());
        return Ok(None);
    };
    let domain = domain_from_url(&url, &s.id)
        .with_context(|| format!("cannot find the domain in the sandbox URL {url:?}"))?;
    progress(format!(
        "[5/6] proxy throughput: {PROXY_REPEATS} × {PROXY_MIB} MiB and {PROXY_CONCURRENCY} concurrent GETs, direct ({ip}:{PROXY_PORT}) and through dev-{PROXY_DEV}-{}.{domain}",
        s.id
    ));
    let setup = format!(
        "mkdir -p {PROXY_DIR} && head -c {} /dev/urandom > {PROXY_DIR}/blob && head -c {PROXY_SMALL_BYTES} /dev/urandom > {PROXY_DIR}/small",
        PROXY_MIB << 20
    );
    let (code, _) = exec(&cx.c, &s.id, &["sh", "-c", &setup]).await?;
    anyhow::ensure!(code == 0, "writing the files to serve exited with {code}");
    let dev_path = format!("/api/v1/sandboxes/{}/dev", enc(&s.id));
    // `python3 -m http.server`, with a listen backlog of 1024 instead of 5: with 5,
    // a burst of connections is dropped at SYN time and the figures measure TCP
    // retransmission back-off instead of the proxy.
    let rb = cx.c.request(Method::POST, &dev_path).json(&json!({
        "name": PROXY_DEV,
        "command": format!(
            r#"exec python3 -c 'import functools, http.server as s; s.ThreadingHTTPServer.request_queue_size = 1024; s.test(HandlerClass=functools.partial(s.SimpleHTTPRequestHandler, directory="{PROXY_DIR}"), ServerClass=s.ThreadingHTTPServer, port={PROXY_PORT}, bind="0.0.0.0")'"#
        ),
        "port": PROXY_PORT,
        "restart": "never",
    }));
    let _: DevView = decode(cx.c.send(rb).await?).await?;
    let direct = Target {
        label: "direct",
        base: format!("http://{ip}:{PROXY_PORT}"),
        host: None,
        token: None,
    };
    let proxied = Target {
        label: "through the proxy",
        base: cx.manager_url.clone(),
        host: Some(format!("dev-{PROXY_DEV}-{}.{domain}", s.id)),
        token: cx.token.clone(),
    };
    let r = measure_proxy(cx, &dev_path, &direct, &proxied).await;
    let stop =
        cx.c.request(Method::DELETE, &format!("{dev_path}/{}", enc(PROXY_DEV)));
    if let Err(e) = cx.c.send(stop).await {
        progress(format!("      stopping dev command {PROXY_DEV}: {e:#}"));
    }
    r.map(Some)
}

async fn measure_proxy(
    cx: &Ctx<'_>,
    dev_path: &str,
    direct: &Target,
    proxied: &Target,
) -> anyhow::Result<Proxy> {
    // Only to this host and the guest: never through an HTTP(S)_PROXY from the env.
    let http = reqwest::Client::builder()
        .no_proxy()
        .timeout(PROXY_REQUEST_TIMEOUT)
        .build()
        .context("building the HTTP client")?;
    let start = Instant::now();
    loop {
        let list: Vec<DevView> = cx.c.get_json(dev_path).await?;
        let d = list
            .iter()
            .find(|d| d.name == PROXY_DEV)
            .context("the dev command disappeared")?;
        if d.listening {
            break;
        }
        anyhow::ensure!(
            !matches!(d.state.as_str(), "exited" | "failed" | "stopped"),
            "the dev command {} (last exit {:?}); see `atelier dev logs SANDBOX {PROXY_DEV}`",
            d.state,
            d.last_exit
        );
        anyhow::ensure!(
            start.elapsed() < PROXY_LISTEN_TIMEOUT,
            "the dev command does not listen on {PROXY_PORT} after {} s",
            PROXY_LISTEN_TIMEOUT.as_secs()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    // The proxy's route table follows within about a second; one GET each way also
    // warms up connections.
    loop {
        match fetch(&http, proxied, "/small").await {
            Ok(_) => break,
            Err(e) if start.elapsed() >= PROXY_LISTEN_TIMEOUT => return Err(e),
            Err(_) => tokio::time::sleep(Duration::from_millis(250)).await,
        }
    }
    fetch(&http, direct, "/small").await?;
    progress(format!(
        "      serving after {:.1} s",
        start.elapsed().as_secs_f64()
    ));

    let len = PROXY_MIB << 20;
    let (mut d_mb_s, mut p_mb_s) = (Vec::new(), Vec::new());
    for _ in 0..PROXY_REPEATS {
        // Alternated, so drift in the guest affects both alike.
        for (t, out) in [(direct, &mut d_mb_s), (proxied, &mut p_mb_s)] {
            let (got, took) = fetch(&http, t, "/blob").await?;
            anyhow::ensure!(
                got == len,
                "GET /blob {}: {got} bytes instead of {len}",
                t.label
            );
            out.push(len as f64 / 1e6 / took.as_secs_f64().max(1e-9));
        }
    }
    let (dm, pm) = (median(&d_mb_s), median(&p_mb_s));
    progress(format!(
        "      {PROXY_MIB} MiB: direct {dm:.1} MB/s, proxied {pm:.1} MB/s (ratio {:.2})",
        pm / dm.max(1e-9)
    ));

    let direct_burst = burst(
        &http,
        direct,
        "/small",
        PROXY_SMALL_BYTES,
        PROXY_CONCURRENCY,
    )
    .await;
    let proxied_burst = burst(
        &http,
        proxied,
        "/small",
        PROXY_SMALL_BYTES,
        PROXY_CONCURRENCY,
    )
    .await;
    for (label, b) in [("direct", &direct_burst), ("proxied", &proxied_burst)] {
        progress(format!(
            "      {PROXY_CONCURRENCY} concurrent GETs {label}: {} errors, {:.0} req/s, p50 {:.1} ms, p99 {:.1} ms",
            b.errors,
            b.requests_per_s,
            b.latency.map_or(0.0, |l| l.median_ms),
            b.latency.map_or(0.0, |l| l.p99_ms),
        ));
    }
    Ok(Proxy {
        mib: PROXY_MIB,
        direct_mb_s_median: dm,
        proxied_mb_s_median: pm,
        proxied_over_direct: pm / dm.max(1e-9),
        direct_mb_s: d_mb_s,
        proxied_mb_s: p_mb_s,
        small_bytes: PROXY_SMALL_BYTES,
        burst_proxied_over_direct: proxied_burst.requests_per_s
            / direct_burst.requests_per_s.max(1e-9),
        direct_burst,
        proxied_burst,
    })
}

/// PIDs whose command line names `<data_dir>/sandboxes/<id>/`, QEMU first.
fn vmm_pids(data_dir: &Path, id: &str) -> Vec<i32> {
    let needle = format!("{}/sandboxes/{id}/", data_dir.display());
    let mut found: Vec<(bool, i32)> = Vec::new();
    let Ok(rd) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    for e in rd.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        let Ok(cmd) = fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<String> = cmd
            .split(|&b| b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        if args.iter().any(|a| a.contains(&needle)) {
            let is_qemu = args.first().is_some_and(|a| a.contains("qemu"));
            found.push((!is_qemu, pid));
        }
    }
    found.sort();
    found.into_iter().map(|(_, p)| p).collect()
}

fn proc_status(pid: i32) -> anyhow::Result<BTreeMap<String, u64>> {
    let text = fs::read_to_string(format!("/proc/{pid}/status"))?;
    Ok(text
        .lines()
        .filter_map(|l| {
            let (k, v) = l.split_once(':')?;
            let v = v.trim().strip_suffix(" kB")?.trim().parse().ok()?;
            Some((k.to_owned(), v))
        })
        .collect())
}

async fn idle_step(cx: &mut Ctx<'_>, data_dir: &Path) -> anyhow::Result<Idle> {
    let n = cx.args.idle;
    progress(format!(
        "[6/6] idle RSS: booting {n} sandboxes at once ({MEMORY_MIB} MiB, {VCPUS} vCPU)"
    ));
    let t = Instant::now();
    let boots = (1..=n).map(|i| {
        let name = format!("{}idle{i}", cx.prefix);
        let c = &cx.c;
        let image = &cx.args.image;
        async move {
            create(c, &name, image, false)
                .await
                .with_context(|| format!("creating {name}"))
        }
    });
    let results = futures::future::join_all(boots).await;
    let parallel_boot = t.elapsed();
    let mut sandboxes = Vec::new();
    for r in results {
        sandboxes.push(r?.0);
    }
    progress(format!(
        "      all ready in {:.2} s; settling {} s",
        parallel_boot.as_secs_f64(),
        IDLE_SETTLE.as_secs()
    ));
    tokio::time::sleep(IDLE_SETTLE).await;
    let mut processes = Vec::new();
    for s in &sandboxes {
        let pid = *vmm_pids(data_dir, &s.id)
            .first()
            .with_context(|| format!("no VMM process found for {} ({})", s.name, s.id))?;
        let st = proc_status(pid)?;
        let get = |k: &str| st.get(k).copied().unwrap_or(0);
        processes.push(ProcRss {
            sandbox: s.name.clone(),
            pid,
            vm_rss_kib: get("VmRSS"),
            rss_anon_kib: get("RssAnon"),
            rss_file_kib: get("RssFile"),
            rss_shmem_kib: get("RssShmem"),
        });
    }
    let mean = |f: fn(&ProcRss) -> u64| {
        processes.iter().map(f).sum::<u64>() as f64 / processes.len().max(1) as f64 / 1024.0
    };
    let mean_rss_mib = mean(|p| p.vm_rss_kib);
    let idle = Idle {
        sandboxes: n,
        parallel_boot_ms: parallel_boot.as_secs_f64() * 1e3,
        settle_secs: IDLE_SETTLE.as_secs(),
        mean_rss_anon_mib: mean(|p| p.rss_anon_kib),
        mean_rss_file_mib: mean(|p| p.rss_file_kib),
        mean_rss_mib,
        guest_memory_mib: MEMORY_MIB,
        rss_over_guest_memory: mean_rss_mib / MEMORY_MIB as f64,
        processes,
    };
    progress(format!(
        "      mean VmRSS {:.0} MiB ({:.0} anon, {:.0} file) = {:.2} × guest memory",
        idle.mean_rss_mib,
        idle.mean_rss_anon_mib,
        idle.mean_rss_file_mib,
        idle.rss_over_guest_memory
    ));
    Ok(idle)
}

fn print_table(r: &Report) {
    let e = &r.environment;
    println!(
        "atelier bench — accel {}{}, {}, storage {}, {} host CPUs",
        e.accel.to_uppercase(),
        e.accel_reason
            .as_ref()
            .map(|x| format!(" ({x})"))
            .unwrap_or_default(),
        e.qemu_version,
        e.storage_backend,
        e.host_cpus
    );
    println!(
        "image {}, sandboxes {} vCPU / {} MiB",
        e.image, e.sandbox_vcpus, e.sandbox_memory_mib
    );
    println!();
    println!("{:<44} {:>14}  NOTE", "MEASURE", "VALUE");
    let row = |m: &str, v: String, note: &str| println!("{m:<44} {v:>14}  {note}");
    if let Some(b) = &r.boot {
        row(
            &format!("cold create → agent ready (median of {})", b.client.n),
            format!("{:.2} s", b.client.median_ms / 1e3),
            &format!(
                "min {:.2} s, max {:.2} s",
                b.client.min_ms / 1e3,
                b.client.max_ms / 1e3
            ),
        );
        if let (Some(r), Some(ratio)) = (&b.restored, b.cold_over_restored) {
            row(
                &format!("snapshot create → agent ready (median of {})", r.n),
                format!("{:.2} s", r.median_ms / 1e3),
                &format!("cold boot / restore = {ratio:.1}x"),
            );
        }
        if let Some(s) = b.server_ms_median {
            row(
                "  server boot_ms (median)",
                format!("{:.2} s", s / 1e3),
                "request → agent ready, as the manager measures it",
            );
        }
    }
    if let Some(c) = &r.clone {
        row(
            &format!("disk clone {} GiB (median of {})", c.small_gib, c.small.n),
            format!("{:.3} ms", c.small.median_ms),
            &format!("{} backend, p99 {:.3} ms", c.backend, c.small.p99_ms),
        );
        row(
            &format!("disk clone {} GiB (median of {})", c.large_gib, c.large.n),
            format!("{:.3} ms", c.large.median_ms),
            &format!("p99 {:.3} ms", c.large.p99_ms),
        );
        row(
            "  clone 8 GiB / clone 1 GiB",
            format!("{:.2}×", c.large_over_small),
            &format!(
                "same data ({} × 1 MiB extents): ~1 = size-independent",
                c.small_extents
            ),
        );
        row(
            &format!(
                "disk clone {} GiB, {} extents (median)",
                c.large_gib, c.dense_extents
            ),
            format!("{:.3} ms", c.dense.median_ms),
            &format!(
                "{:.2}× the {}-extent clone: cost follows extents, not size",
                c.dense_over_large, c.large_extents
            ),
        );
        row(
            "full copy 1 GiB (read+write)",
            format!("{:.0} ms", c.full_copy_ms),
            &format!(
                "{:.0} ms with fsync; std::fs::copy {:.1} ms",
                c.full_copy_fsync_ms, c.std_fs_copy_ms
            ),
        );
        row(
            "  full copy / clone (1 GiB)",
            format!("{:.0}×", c.copy_over_clone),
            "",
        );
    }
    if let Some(x) = &r.exec {
        row(
            &format!(
                "exec `{}` round trip median ({} runs)",
                x.command, x.round_trip.n
            ),
            format!("{:.2} ms", x.round_trip.median_ms),
            "",
        );
        row(
            "  p99",
            format!("{:.2} ms", x.round_trip.p99_ms),
            &format!(
                "p99 / median {:.2}×",
                x.round_trip.p99_ms / x.round_trip.median_ms.max(1e-9)
            ),
        );
    }
    if let Some(t) = &r.transfer {
        let ok = match (t.upload_verified_in_guest, t.download_verified) {
            (Some(true), true) => "sha256 verified both ways",
            (None, true) => "sha256 verified on download",
            _ => "sha256 MISMATCH",
        };
        row(
            &format!("upload {} MiB", t.mib),
            format!("{:.1} MB/s", t.upload_mb_s),
            ok,
        );
        row(
            &format!("download {} MiB", t.mib),
            format!("{:.1} MB/s", t.download_mb_s),
            &format!(
                "download / upload {:.2}×",
                t.download_mb_s / t.upload_mb_s.max(1e-9)
            ),
        );
    }
    if let Some(p) = &r.proxy {
        row(
            &format!(
                "GET {} MiB direct (median of {})",
                p.mib,
                p.direct_mb_s.len()
            ),
            format!("{:.1} MB/s", p.direct_mb_s_median),
            "host → guest port",
        );
        row(
            &format!("GET {} MiB through the proxy (median)", p.mib),
            format!("{:.1} MB/s", p.proxied_mb_s_median),
            &format!("proxied / direct {:.2}×", p.proxied_over_direct),
        );
        for (label, b) in [("direct", &p.direct_burst), ("proxied", &p.proxied_burst)] {
            let lat = b
                .latency
                .map(|l| format!("p50 {:.1} ms, p99 {:.1} ms", l.median_ms, l.p99_ms))
                .unwrap_or_else(|| "no successful request".into());
            row(
                &format!("{} concurrent GETs {label}", b.requests),
                format!("{:.0} req/s", b.requests_per_s),
                &format!("{} errors, {lat}", b.errors),
            );
        }
        row(
            "  proxied / direct req/s",
            format!("{:.2}×", p.burst_proxied_over_direct),
            &format!("{} B file", p.small_bytes),
        );
    }
    if let Some(i) = &r.idle {
        row(
            &format!("idle VMM RSS, mean of {}", i.sandboxes),
            format!("{:.0} MiB", i.mean_rss_mib),
            &format!(
                "{:.0} MiB anon + {:.0} MiB file, after {} s idle",
                i.mean_rss_anon_mib, i.mean_rss_file_mib, i.settle_secs
            ),
        );
        row(
            "  RSS / guest memory",
            format!("{:.2}", i.rss_over_guest_memory),
            &format!("guest has {} MiB", i.guest_memory_mib),
        );
        row(
            &format!("{} sandboxes booted at once, all ready", i.sandboxes),
            format!("{:.2} s", i.parallel_boot_ms / 1e3),
            "",
        );
    }
    for (step, why) in &r.problems {
        println!("{step}: {why}");
    }
    println!("total {:.1} s", r.total_secs);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_median_and_p99() {
        let d: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        let s = Stats::of(&d).unwrap();
        assert_eq!(s.median_ms, 50.5);
        assert_eq!(s.p99_ms, 99.0);
        assert_eq!(s.min_ms, 1.0);
        assert_eq!(s.max_ms, 100.0);
        let one = Stats::of(&[Duration::from_millis(7)]).unwrap();
        assert_eq!((one.median_ms, one.p99_ms), (7.0, 7.0));
        assert!(Stats::of(&[]).is_none());
    }

    #[test]
    fn domain_comes_from_the_sandbox_url() {
        let id = "sb-abcdefghij";
        assert_eq!(
            domain_from_url("http://sandbox-sb-abcdefghij.localhost:7272/", id).as_deref(),
            Some("localhost")
        );
        assert_eq!(
            domain_from_url("https://sandbox-sb-abcdefghij.box.example.com/", id).as_deref(),
            Some("box.example.com")
        );
        assert!(domain_from_url("http://sandbox-sb-other00000.localhost/", id).is_none());
        assert!(domain_from_url("http://127.0.0.1:7070/", id).is_none());
    }

    #[test]
    fn median_of_odd_and_even() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert_eq!(median(&[]), 0.0);
    }

    #[test]
    fn proc_status_parses_kb_lines() {
        let st = proc_status(std::process::id() as i32).unwrap();
        assert!(st.get("VmRSS").copied().unwrap_or(0) > 0);
    }
}
