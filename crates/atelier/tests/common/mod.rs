//! Test harness: runs the real `atelier serve` binary on a fresh data dir with the
//! prebuilt `minimal` test image, and talks to it through the real CLI and API.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

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
    pub data_dir: tempfile::TempDir,
    pub url: String,
    pub token: String,
    child: Option<Child>,
    log: Arc<Mutex<String>>,
    extra_env: Vec<(String, String)>,
    /// This manager's own bridge and subnet (tests run in parallel on one host).
    pub net: NetSlot,
}

/// A bridge name and /24 subnet no other test holds (a lock file per slot).
pub struct NetSlot {
    pub slot: u32,
    pub bridge: String,
    /// `10.201.{slot}.0/24`; the gateway is `.1`.
    pub subnet: String,
    _lock: std::fs::File,
}

impl NetSlot {
    fn claim() -> NetSlot {
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

    pub fn gateway(&self) -> String {
        format!("10.201.{}.1", self.slot)
    }

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
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_atelier"));
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
        let start = Instant::now();
        loop {
            if http_ok(&format!("{}/healthz", self.url)).unwrap_or(false) {
                break;
            }
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("atelier serve exited: {status}\n{}", self.log());
            }
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "manager did not come up\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Everything the manager printed so far.
    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// Waits until the manager's output contains `needle`.
    pub fn wait_log(&self, needle: &str, timeout: Duration) {
        let start = Instant::now();
        while !self.log().contains(needle) {
            assert!(
                start.elapsed() < timeout,
                "manager log never said {needle:?}\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
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
        let mut c = Command::new(env!("CARGO_BIN_EXE_atelier"));
        c.env("ATELIER_URL", &self.url)
            .env("ATELIER_TOKEN", &self.token)
            .env("ATELIER_DATA_DIR", self.data_dir.path())
            .env("ATELIER_IMAGES_DIR", images_dir())
            .stdin(Stdio::null());
        c
    }

    /// Runs the CLI with `args` and returns its output.
    pub fn run(&self, args: &[&str]) -> Output {
        self.cli().args(args).output().unwrap()
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

    /// Rows in the resource journal, as `kind locator` lines.
    pub fn journal(&self) -> Vec<String> {
        let out = Command::new("sqlite3")
            .arg(self.data_dir.path().join("atelier.db"))
            .arg("SELECT kind || ' ' || locator FROM resources ORDER BY id")
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_owned)
            .collect()
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

/// Pids of live (non-zombie) processes whose command line contains `marker`.
pub fn pids_matching(marker: &str) -> Vec<i32> {
    let me = std::process::id() as i32;
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        if pid == me {
            continue;
        }
        let Ok(cmd) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        if !String::from_utf8_lossy(&cmd).contains(marker)
            || !String::from_utf8_lossy(&cmd).contains("qemu")
        {
            continue;
        }
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        if stat
            .rsplit_once(')')
            .is_some_and(|(_, r)| !r.trim_start().starts_with('Z'))
        {
            out.push(pid);
        }
    }
    out
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill9();
        // Every VMM under the data dir: sandboxes and template builds.
        for pid in pids_matching(&format!("{}/", self.data_dir.path().display())) {
            let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
        }
        std::thread::sleep(Duration::from_millis(200));
        let pool = self.data_dir.path().join("pool");
        let _ = Command::new("umount").arg(&pool).status();
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

/// A "public" network the tests own: a network namespace joined to the host by a
/// veth pair, with an HTTP server answering on two addresses (198.18.{slot}.2 and
/// .3, benchmark space that the default blocked ranges do not cover). Nothing
/// leaves the machine.
pub struct PublicNet {
    pub ns: String,
    pub host_ip: String,
    pub ip_a: String,
    pub ip_b: String,
    server: Child,
    _dir: tempfile::TempDir,
    _slot: NetSlot,
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl PublicNet {
    /// Creates the namespace (on a slot of its own) and starts the server on port
    /// 8080, serving `hello.txt` = "public-ok".
    pub fn start() -> PublicNet {
        let slot_lock = NetSlot::claim();
        let slot = slot_lock.slot;
        let ns = format!("atlpub{slot}");
        let host_if = format!("atlpv{slot}");
        let _ = Command::new("ip")
            .args(["netns", "del", &ns])
            .stderr(Stdio::null())
            .status();
        let _ = Command::new("ip")
            .args(["link", "del", &host_if])
            .stderr(Stdio::null())
            .status();
        let (host_ip, ip_a, ip_b) = (
            format!("198.18.{slot}.1"),
            format!("198.18.{slot}.2"),
            format!("198.18.{slot}.3"),
        );
        ip(&["netns", "add", &ns]);
        ip(&[
            "link", "add", &host_if, "type", "veth", "peer", "name", "pub0", "netns", &ns,
        ]);
        ip(&["addr", "add", &format!("{host_ip}/29"), "dev", &host_if]);
        ip(&["link", "set", &host_if, "up"]);
        for (a, d) in [(&ip_a, "pub0"), (&ip_b, "pub0")] {
            ip(&["-n", &ns, "addr", "add", &format!("{a}/29"), "dev", d]);
        }
        ip(&["-n", &ns, "link", "set", "pub0", "up"]);
        ip(&["-n", &ns, "link", "set", "lo", "up"]);
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("hello.txt"), "public-ok\n").unwrap();
        let server = Command::new("ip")
            .args([
                "netns",
                "exec",
                &ns,
                "python3",
                "-m",
                "http.server",
                "8080",
                "--bind",
                "0.0.0.0",
                "--directory",
            ])
            .arg(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let start = Instant::now();
        while !http_ok(&format!("http://{ip_a}:8080/hello.txt")).unwrap_or(false) {
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "public server did not start"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        PublicNet {
            ns,
            host_ip,
            ip_a,
            ip_b,
            server,
            _dir: dir,
            _slot: slot_lock,
        }
    }
}

impl Drop for PublicNet {
    fn drop(&mut self) {
        let _ = self.server.kill();
        let _ = self.server.wait();
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).status();
    }
}
