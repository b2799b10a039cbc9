//! The manager harness: runs the real `atelier serve` binary on a fresh data dir with
//! the prebuilt `minimal` test image, on a bridge and subnet of its own, and talks to
//! it through the real CLI and API.
//!
//! The harness runs the `atelier` binary [`atelier_bin`] finds: `ATELIER_TEST_BIN`
//! when set, else `atelier` in the test executable's profile dir (integration tests
//! run from `target/<profile>/deps/`, the binary sits in `target/<profile>/`). Cargo
//! builds it before the `atelier` crate's own tests; tests of other crates must build
//! it first (`cargo build -p atelier`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::poll::{poll_until, wait_until};
pub use crate::process::pids_matching;

/// How long a manager may take to answer `/healthz` after it starts.
pub const START_TIMEOUT: Duration = Duration::from_secs(60);

/// The `atelier` binary the harness runs (see the module docs); panics with what to
/// do when it is missing.
pub fn atelier_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("ATELIER_TEST_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("the test executable's path");
    let mut dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir.pop();
    }
    let bin = dir.join("atelier");
    assert!(
        bin.is_file(),
        "no atelier binary at {}; run `cargo build -p atelier` first or set ATELIER_TEST_BIN",
        bin.display()
    );
    bin
}

/// Where the test image lives; `scripts/test.sh` builds it there.
pub fn images_dir() -> PathBuf {
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
        "no minimal image in {}; run `bash scripts/test.sh` (it builds the image) or set ATELIER_TEST_IMAGES_DIR",
        dir.display()
    );
    dir
}

/// A running manager on its own data dir, killed and cleaned up on drop.
pub struct Server {
    /// The manager's data dir (removed on drop).
    pub data_dir: tempfile::TempDir,
    /// Its API base URL (`http://127.0.0.1:PORT`).
    pub url: String,
    /// The admin token it wrote.
    pub token: String,
    child: Option<Child>,
    log: Arc<Mutex<String>>,
    extra_env: Vec<(String, String)>,
    /// This manager's own bridge and subnet (tests run in parallel on one host).
    pub net: NetSlot,
}

/// What [`Server::wait_log`] waits for; printed with the log so far when it times out.
struct LogWait<'a> {
    needle: &'a str,
    log: &'a Mutex<String>,
}

impl std::fmt::Display for LogWait<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let log = self.log.lock().map(|l| l.clone()).unwrap_or_default();
        write!(
            f,
            "the manager log to say {:?}; log so far:\n{log}",
            self.needle
        )
    }
}

/// A bridge name and /24 subnet no other test holds (a lock file per slot).
pub struct NetSlot {
    /// Slot number, 20..220.
    pub slot: u32,
    /// Bridge name, `atlt{slot}`.
    pub bridge: String,
    /// `10.201.{slot}.0/24`; the gateway is `.1`.
    pub subnet: String,
    _lock: std::fs::File,
}

impl NetSlot {
    /// Claims a free slot (20..220) by locking its file in `/var/tmp/atl-net-slots`;
    /// the lock is held until the slot is dropped.
    pub fn claim() -> NetSlot {
        let dir = Path::new("/var/tmp/atl-net-slots");
        std::fs::create_dir_all(dir).unwrap();
        let start = std::process::id() % 200;
        for i in 0..200 {
            let slot = (start + i) % 200 + 20;
            let f = std::fs::File::create(dir.join(format!("{slot}.lock"))).unwrap();
            if f.try_lock().is_ok() {
                return NetSlot {
                    slot,
                    bridge: format!("atlt{slot}"),
                    subnet: format!("10.201.{slot}.0/24"),
                    _lock: f,
                };
            }
        }
        panic!("no free network slot in /var/tmp/atl-net-slots");
    }

    /// The bridge's address (`.1` of the subnet).
    pub fn gateway(&self) -> String {
        format!("10.201.{}.1", self.slot)
    }

    /// The nftables table of this bridge.
    pub fn table(&self) -> String {
        format!("atelier_{}", self.bridge)
    }

    /// TAPs on this manager's bridge.
    pub fn ports(&self) -> Vec<String> {
        let out = Command::new("ip")
            .args(["-o", "link", "show", "master", &self.bridge])
            .stderr(Stdio::null())
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| {
                l.split(':')
                    .nth(1)
                    .map(|n| n.trim().split('@').next().unwrap_or("").to_owned())
            })
            .collect()
    }

    /// Elements of the per-sandbox nftables sets (deny, listed, allowed, bound).
    pub fn elements(&self) -> Vec<String> {
        let mut out = Vec::new();
        for (fam, set) in [
            ("inet", "deny"),
            ("inet", "listed"),
            ("inet", "allowed"),
            ("bridge", "bound"),
            ("bridge", "ports"),
        ] {
            let o = Command::new("nft")
                .args(["-j", "list", "set", fam, &self.table(), set])
                .output()
                .unwrap();
            let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap_or_default();
            for item in v["nftables"].as_array().into_iter().flatten() {
                for e in item["set"]["elem"].as_array().into_iter().flatten() {
                    out.push(format!("{set}:{e}"));
                }
            }
        }
        out
    }

    fn teardown(&self) {
        let _ = Command::new("ip")
            .args(["link", "del", &self.bridge])
            .status();
        for fam in ["inet", "bridge"] {
            let _ = Command::new("nft")
                .args(["delete", "table", fam, &self.table()])
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// A loopback TCP port free at the time of the call.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Server {
    /// Starts a manager.
    pub fn start() -> Server {
        Self::start_with(&[])
    }

    /// Starts a manager with extra environment variables.
    pub fn start_with(env: &[(&str, &str)]) -> Server {
        let data_dir = tempfile::Builder::new()
            .prefix("atl-")
            .tempdir_in("/var/tmp")
            .unwrap();
        let mut s = Server {
            data_dir,
            url: String::new(),
            token: String::new(),
            child: None,
            log: Arc::new(Mutex::new(String::new())),
            extra_env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            net: NetSlot::claim(),
        };
        // A previous run that died without cleaning up may have left this slot's
        // bridge behind.
        s.net.teardown();
        s.spawn();
        s.token = std::fs::read_to_string(s.data_dir.path().join("admin-token"))
            .unwrap()
            .trim()
            .to_owned();
        s
    }

    fn spawn(&mut self) {
        let port = free_port();
        self.url = format!("http://127.0.0.1:{port}");
        let mut cmd = Command::new(atelier_bin());
        cmd.arg("serve")
            .arg("--listen")
            .arg(format!("127.0.0.1:{port}"))
            .env("ATELIER_DATA_DIR", self.data_dir.path())
            .env("ATELIER_IMAGES_DIR", images_dir())
            .env("ATELIER_LOG", "info,atelier_server=debug")
            .env("ATELIER_RECONCILE_SECS", "2")
            .env("ATELIER_BRIDGE", &self.net.bridge)
            // Never a resolver off this machine; tests that resolve names run their own.
            .env("ATELIER_DNS_UPSTREAM", "127.0.0.1:9")
            .env("ATELIER_SUBNET", &self.net.subnet)
            // Tests share folders they make under /var/tmp (owned by an unprivileged
            // user: the VMM runs as the folder's owner, never as root).
            .env("ATELIER_SHARE_ROOTS", "/var/tmp")
            .env_remove("ATELIER_TOKEN")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, v) in &self.extra_env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().unwrap();
        for pipe in [
            child
                .stdout
                .take()
                .map(|p| Box::new(p) as Box<dyn std::io::Read + Send>),
            child
                .stderr
                .take()
                .map(|p| Box::new(p) as Box<dyn std::io::Read + Send>),
        ]
        .into_iter()
        .flatten()
        {
            let log = Arc::clone(&self.log);
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                    eprintln!("[serve] {line}");
                    log.lock().unwrap().push_str(&(line + "\n"));
                }
            });
        }
        self.child = Some(child);
        let healthz = format!("{}/healthz", self.url);
        poll_until(START_TIMEOUT, "the manager to answer /healthz", || {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("atelier serve exited: {status}\n{}", self.log());
            }
            http_ok(&healthz).unwrap_or(false).then_some(())
        });
    }

    /// Everything the manager printed so far.
    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// Waits until the manager's output contains `needle`.
    pub fn wait_log(&self, needle: &str, timeout: Duration) {
        let what = LogWait {
            needle,
            log: &self.log,
        };
        wait_until(timeout, &what, || self.log().contains(needle));
    }

    /// SIGKILLs the manager (its VMs keep running).
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts the manager again on the same data dir, with `env` replacing the extra env.
    pub fn restart(&mut self, env: &[(&str, &str)]) {
        self.kill9();
        self.log.lock().unwrap().clear();
        self.extra_env = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        self.spawn();
    }

    /// The `atelier` CLI pointed at this manager.
    pub fn cli(&self) -> Command {
        let mut c = Command::new(atelier_bin());
        c.env("ATELIER_URL", &self.url)
            .env("ATELIER_TOKEN", &self.token)
            .env("ATELIER_DATA_DIR", self.data_dir.path())
            .env("ATELIER_IMAGES_DIR", images_dir())
            .stdin(Stdio::null());
        c
    }

    /// Stores a secret through the CLI (`atelier secret set NAME`, value on stdin).
    pub fn set_secret(&self, name: &str, value: &str) {
        use std::io::Write;
        let mut child = self
            .cli()
            .args(["secret", "set", name])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(value.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "secret set {name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Runs the CLI with `args` and returns its output.
    pub fn run(&self, args: &[&str]) -> Output {
        self.cli().args(args).output().unwrap()
    }

    /// Runs the CLI, failing the test if it has not returned within `limit` (the
    /// CLI is killed first): for calls that must not hang on a hung guest.
    pub fn run_bounded(&self, args: &[&str], limit: Duration) -> Output {
        let child = self
            .cli()
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let pid = child.id();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(child.wait_with_output());
        });
        match rx.recv_timeout(limit) {
            Ok(out) => out.unwrap(),
            Err(_) => {
                let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
                panic!("atelier {args:?} did not return within {limit:?}");
            }
        }
    }

    /// Runs the CLI and asserts success, returning stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "atelier {args:?} failed ({}):\n{}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// An authenticated async API client request.
    pub fn api(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        reqwest::Client::new()
            .request(method, format!("{}{}", self.url, path))
            .bearer_auth(&self.token)
    }

    /// Pids of VMM processes under this data dir.
    pub fn vmm_pids(&self) -> Vec<i32> {
        pids_matching(&format!("{}/sandboxes/", self.data_dir.path().display()))
    }

    /// Files in the pool's disks dir.
    pub fn disks(&self) -> Vec<PathBuf> {
        list(&self.data_dir.path().join("pool/disks"))
    }

    /// Sandbox directories.
    pub fn sandbox_dirs(&self) -> Vec<PathBuf> {
        list(&self.data_dir.path().join("sandboxes"))
    }

    /// Rows in the resource journal, as `kind locator` lines, but those of builds
    /// in flight: a memory-snapshot template (built in the background after a cold
    /// boot; its rows exist only while it builds) or a prebuild still building.
    pub fn journal(&self) -> Vec<String> {
        let out = Command::new("sqlite3")
            .arg(self.data_dir.path().join("atelier.db"))
            .arg(
                "SELECT kind || ' ' || locator FROM resources WHERE sandbox_id NOT LIKE 'template:%' \
                 AND sandbox_id NOT IN \
                 (SELECT 'prebuild:' || id FROM prebuilds WHERE status = 'building') ORDER BY id",
            )
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_owned)
            .collect()
    }

    /// Asserts that no other uid can read anything the manager keeps: the data dir
    /// is 0700 and no file, directory or socket under it has group or other
    /// permission bits (symlinks, whose bits mean nothing, are skipped).
    pub fn assert_data_dir_private(&self) {
        use std::os::unix::fs::PermissionsExt;
        let root = self.data_dir.path();
        let mode = std::fs::metadata(root).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode, 0o700, "data dir {} is {mode:o}", root.display());
        let mut open = Vec::new();
        let mut stack = vec![root.to_owned()];
        let mut seen = 0;
        while let Some(p) = stack.pop() {
            let Ok(meta) = std::fs::symlink_metadata(&p) else {
                continue;
            };
            if meta.file_type().is_symlink() {
                continue;
            }
            seen += 1;
            let mode = meta.permissions().mode();
            if mode & 0o077 != 0 {
                open.push(format!("{} {:o}", p.display(), mode & 0o7777));
            }
            if meta.is_dir() {
                stack.extend(std::fs::read_dir(&p).unwrap().flatten().map(|e| e.path()));
            }
        }
        assert!(
            seen > 5,
            "walked only {seen} entries under {}",
            root.display()
        );
        assert!(
            open.is_empty(),
            "readable by other uids under the data dir:\n{}",
            open.join("\n")
        );
    }

    /// Asserts nothing is left on the host for sandboxes that no longer exist:
    /// no VMM process, no disk, no sandbox dir, no journal row.
    pub fn assert_clean(&self) {
        assert!(
            self.vmm_pids().is_empty(),
            "vmm processes left: {:?}",
            self.vmm_pids()
        );
        assert!(self.disks().is_empty(), "disks left: {:?}", self.disks());
        assert!(
            self.sandbox_dirs().is_empty(),
            "sandbox dirs left: {:?}",
            self.sandbox_dirs()
        );
        assert!(
            self.journal().is_empty(),
            "journal rows left: {:?}",
            self.journal()
        );
        assert!(
            self.net.ports().is_empty(),
            "TAPs left on the bridge: {:?}",
            self.net.ports()
        );
        assert!(
            self.net.elements().is_empty(),
            "firewall elements left: {:?}",
            self.net.elements()
        );
    }
}

fn list(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .map(|rd| rd.flatten().map(|e| e.path()).collect())
        .unwrap_or_default()
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill9();
        // Every VMM under the data dir: sandboxes and template builds.
        for pid in pids_matching(&format!("{}/", self.data_dir.path().display())) {
            let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
        }
        // No panic in drop (it may run while unwinding): a bounded wait, then go on.
        let marker = format!("{}/", self.data_dir.path().display());
        let start = std::time::Instant::now();
        while !pids_matching(&marker).is_empty() && start.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(crate::poll::POLL_INTERVAL);
        }
        // The pool's loop mount can stay busy for a moment after its VMMs die;
        // retry, then detach it lazily, so the data dir can go.
        let pool = self.data_dir.path().join("pool");
        let mounted = || {
            std::fs::read_to_string("/proc/self/mounts")
                .is_ok_and(|m| m.lines().any(|l| l.split(' ').nth(1) == pool.to_str()))
        };
        let start = std::time::Instant::now();
        while mounted() && start.elapsed() < Duration::from_secs(5) {
            let _ = Command::new("umount")
                .arg(&pool)
                .stderr(Stdio::null())
                .status();
            if mounted() {
                std::thread::sleep(crate::poll::POLL_INTERVAL);
            }
        }
        if mounted() {
            let _ = Command::new("umount").arg("-l").arg(&pool).status();
        }
        self.net.teardown();
    }
}

/// True when a plain GET of `url` answers 200 (no client needed before the runtime).
pub fn http_ok(url: &str) -> std::io::Result<bool> {
    use std::io::{Read, Write};
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| std::io::Error::other("http only"))?;
    let (host, path) = rest.split_once('/').unwrap_or((rest, ""));
    let mut s = std::net::TcpStream::connect(host)?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    write!(
        s,
        "GET /{path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    )?;
    let mut buf = String::new();
    s.read_to_string(&mut buf)?;
    // HTTP/1.0 servers (Python's http.server) answer with their own version.
    Ok(buf.starts_with("HTTP/1.") && buf.get(8..13) == Some(" 200 "))
}
