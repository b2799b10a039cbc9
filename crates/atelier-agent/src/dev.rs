//! Dev commands: long-running commands (dev servers, watchers) the worker supervises.
//!
//! Each run is `/bin/sh -c COMMAND` leading its own process group, stdin `/dev/null`,
//! stdout and stderr into one pipe the agent appends to `NAME.log` (see `devlog`).
//! When the shell exits, whatever is left of its group is killed (so a restart finds
//! the port free); then the restart policy decides, with exponential back-off (1 s
//! doubling up to 30 s, back to 1 s after a run of 60 s). Stopping sends SIGTERM to
//! the group, and SIGKILL to what is left after 3 s.
//!
//! `DevStart` of a known name replaces it: the old one is stopped (as by `DevStop`), its
//! log followers end, the log rotates so the new run starts a fresh file, and the new
//! one starts. A stopped command stays listed (state `Stopped`) until replaced.
//!
//! Worker restarts: a new worker cannot wait() on its predecessor's children, so dev
//! commands do not survive the worker. Each running group is recorded in
//! `RUN_DIR/NAME.pgid` (process group id and start time); a new worker kills the groups
//! recorded there before serving. The host sees the restart (a Hello with a new pid)
//! and starts its dev commands again; their logs stay on disk.
//!
//! Environment values may hold secrets: only names and command lines are logged.

use std::collections::{BTreeSet, HashMap};
use std::os::fd::OwnedFd;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use atelier_agent_proto::{DevSpec, DevState, DevStatus, EXEC_CHUNK_LEN, ErrorKind, RestartPolicy};
use tokio::io::AsyncReadExt;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;

use crate::devlog::LogFile;
use crate::exec::signal_group;
use crate::paths::Paths;

/// First restart delay.
const BACKOFF_MIN: Duration = Duration::from_secs(1);
/// Longest restart delay.
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// A run this long resets the back-off.
const HEALTHY_RUN: Duration = Duration::from_secs(60);
/// Time a stopped group gets between SIGTERM and SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(3);
/// Output still in the pipe after the group is gone is read for at most this long.
const PUMP_DRAIN: Duration = Duration::from_millis(500);

type Failure = (ErrorKind, String);

/// Mutable status of one dev command.
#[derive(Debug)]
struct Status {
    /// `Running` here means "process up"; `Starting` is derived from the port.
    state: DevState,
    pid: Option<u32>,
    restarts: u32,
    last_exit: Option<i32>,
    since: Option<Instant>,
}

/// One dev command (one `DevStart`).
struct Entry {
    spec: DevSpec,
    status: Mutex<Status>,
    /// Set to stop the runner.
    stop: watch::Sender<bool>,
    runner: Mutex<Option<JoinHandle<()>>>,
    log: Arc<LogFile>,
    /// Set when a `DevStart` replaced this entry; log followers end then.
    replaced: watch::Sender<bool>,
}

impl Entry {
    fn status(&self) -> MutexGuard<'_, Status> {
        self.status.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Stops the runner (and its process group) and waits until it is gone.
    async fn stop(&self) {
        self.stop.send_replace(true);
        let runner = self.runner.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(runner) = runner
            && let Err(e) = runner.await
        {
            log!("dev {}: supervisor task failed: {e}", self.spec.name);
        }
        let mut status = self.status();
        status.state = DevState::Stopped;
        status.pid = None;
        status.since = None;
    }
}

/// The dev commands of this worker.
pub struct Supervisor {
    paths: Paths,
    entries: Mutex<HashMap<String, Arc<Entry>>>,
    logs: Mutex<HashMap<String, Arc<LogFile>>>,
    /// Serialises starts and stops, so a name is never replaced twice at once.
    ops: tokio::sync::Mutex<()>,
}

impl Supervisor {
    /// A supervisor keeping its files under `paths`; kills the dev commands a previous
    /// worker left running.
    pub fn new(paths: Paths) -> Supervisor {
        for dir in [&paths.dev_log_dir, &paths.dev_run_dir] {
            if let Err(e) = std::fs::create_dir_all(dir) {
                log!("creating {}: {e}", dir.display());
            }
        }
        kill_recorded_groups(&paths.dev_run_dir);
        Supervisor {
            paths,
            entries: Mutex::default(),
            logs: Mutex::default(),
            ops: tokio::sync::Mutex::new(()),
        }
    }

    fn entries(&self) -> MutexGuard<'_, HashMap<String, Arc<Entry>>> {
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn entry(&self, name: &str) -> Result<Arc<Entry>, Failure> {
        if !atelier_agent_proto::valid_dev_name(name) {
            return Err((
                ErrorKind::Invalid,
                format!("invalid dev command name {name:?}"),
            ));
        }
        self.entries().get(name).cloned().ok_or_else(|| {
            (
                ErrorKind::NotFound,
                format!("no dev command named {name}; start it first"),
            )
        })
    }

    /// The log of `name` (one per name, shared by successive commands of that name).
    fn log(&self, name: &str) -> Result<Arc<LogFile>, Failure> {
        let mut logs = self.logs.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(log) = logs.get(name) {
            return Ok(log.clone());
        }
        let path = self.paths.dev_log_dir.join(format!("{name}.log"));
        let log = Arc::new(LogFile::open(path).map_err(|m| (ErrorKind::Io, m))?);
        logs.insert(name.to_owned(), log.clone());
        Ok(log)
    }

    /// The log of dev command `name` and the signal of its replacement.
    pub fn log_of(&self, name: &str) -> Result<(Arc<LogFile>, watch::Receiver<bool>), Failure> {
        let entry = self.entry(name)?;
        Ok((entry.log.clone(), entry.replaced.subscribe()))
    }

    /// Starts `spec`, replacing a dev command of the same name; returns once spawned.
    pub async fn start(&self, spec: DevSpec) -> Result<(), Failure> {
        spec.validate().map_err(|m| (ErrorKind::Invalid, m))?;
        if let Some(cwd) = &spec.cwd
            && !Path::new(cwd).is_dir()
        {
            return Err((
                ErrorKind::NotFound,
                format!(
                    "dev command {}: working directory {cwd} does not exist",
                    spec.name
                ),
            ));
        }
        let _ops = self.ops.lock().await;
        let name = spec.name.clone();
        let old = self.entries().get(&name).cloned();
        if let Some(old) = old {
            log!("dev {name}: replacing the running command");
            old.stop().await;
            old.replaced.send_replace(true);
        }
        let log = self.log(&name)?;
        log.rotate();
        log!("dev {name}: starting {:?}", spec.command);
        let (stop, _) = watch::channel(false);
        let entry = Arc::new(Entry {
            spec,
            status: Mutex::new(Status {
                state: DevState::Starting,
                pid: None,
                restarts: 0,
                last_exit: None,
                since: None,
            }),
            stop,
            runner: Mutex::new(None),
            log,
            replaced: watch::Sender::new(false),
        });
        let (ready_tx, ready_rx) = oneshot::channel();
        let runner = tokio::spawn(run(entry.clone(), self.paths.dev_run_dir.clone(), ready_tx));
        *entry.runner.lock().unwrap_or_else(|e| e.into_inner()) = Some(runner);
        self.entries().insert(name.clone(), entry);
        let spawned = match ready_rx.await {
            Ok(result) => result,
            Err(_) => Err((
                ErrorKind::Internal,
                format!("dev command {name}: the supervisor task ended before spawning"),
            )),
        };
        if spawned.is_err() {
            self.entries().remove(&name);
        }
        spawned
    }

    /// Stops dev command `name`; it stays listed as `Stopped`.
    pub async fn stop(&self, name: &str) -> Result<(), Failure> {
        let _ops = self.ops.lock().await;
        let entry = self.entry(name)?;
        log!("dev {name}: stopping");
        entry.stop().await;
        Ok(())
    }

    /// Status of every dev command, sorted by name.
    pub async fn list(&self) -> Vec<DevStatus> {
        let mut entries: Vec<Arc<Entry>> = self.entries().values().cloned().collect();
        entries.sort_by(|a, b| a.spec.name.cmp(&b.spec.name));
        let listening = if entries.iter().any(|e| e.spec.port.is_some()) {
            tokio::task::spawn_blocking(listening_ports)
                .await
                .unwrap_or_default()
        } else {
            BTreeSet::new()
        };
        entries
            .iter()
            .map(|e| {
                let s = e.status();
                let listening = e.spec.port.is_some_and(|p| listening.contains(&p));
                let state = match s.state {
                    DevState::Running | DevState::Starting
                        if e.spec.port.is_some() && !listening =>
                    {
                        DevState::Starting
                    }
                    DevState::Starting if s.pid.is_some() => DevState::Running,
                    other => other,
                };
                DevStatus {
                    name: e.spec.name.clone(),
                    command: e.spec.command.clone(),
                    port: e.spec.port,
                    state,
                    pid: s.pid,
                    restarts: s.restarts,
                    last_exit: s.last_exit,
                    listening,
                    uptime_secs: s.since.map(|t| t.elapsed().as_secs()).unwrap_or(0),
                }
            })
            .collect()
    }

    /// Kills every running dev command at once (the worker is about to exit).
    pub fn kill_all(&self) {
        for entry in self.entries().values() {
            entry.stop.send_replace(true);
            if let Some(pid) = entry.status().pid {
                let _ = signal_group(pid as i32, libc::SIGKILL);
            }
        }
        kill_recorded_groups(&self.paths.dev_run_dir);
    }
}

/// How one run ended.
enum RunEnd {
    /// Stopped on request.
    Stopped,
    /// Exited by itself after running this long (`last_exit` as in [`DevStatus`]).
    Exited(Option<i32>, Duration),
}

/// The supervision loop of one dev command: spawn, wait, restart per policy.
async fn run(entry: Arc<Entry>, run_dir: PathBuf, ready: oneshot::Sender<Result<(), Failure>>) {
    let name = entry.spec.name.clone();
    let mut ready = Some(ready);
    let mut stop = entry.stop.subscribe();
    let mut backoff = BACKOFF_MIN;
    loop {
        if *stop.borrow() {
            return;
        }
        let (last_exit, ran) = match spawn(&entry.spec, &entry.log) {
            Err(failure) => {
                log!("dev {name}: {}", failure.1);
                if let Some(tx) = ready.take() {
                    let _ = tx.send(Err(failure));
                    return;
                }
                (None, Duration::ZERO)
            }
            Ok(proc) => {
                if let Some(tx) = ready.take() {
                    let _ = tx.send(Ok(()));
                }
                match supervise(&entry, proc, &mut stop, &run_dir).await {
                    RunEnd::Stopped => return,
                    RunEnd::Exited(last_exit, ran) => (last_exit, ran),
                }
            }
        };
        let failed = last_exit != Some(0);
        let restart = match entry.spec.restart {
            RestartPolicy::Always => true,
            RestartPolicy::OnFailure => failed,
            RestartPolicy::Never => false,
        };
        let how = describe_exit(last_exit);
        if !restart {
            log!("dev {name}: {how}; not restarting");
            entry.status().state = if failed {
                DevState::Failed
            } else {
                DevState::Exited
            };
            return;
        }
        if ran >= HEALTHY_RUN {
            backoff = BACKOFF_MIN;
        }
        let delay = backoff;
        backoff = (backoff * 2).min(BACKOFF_MAX);
        log!("dev {name}: {how}; restarting in {delay:?}");
        entry.status().state = DevState::Restarting;
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        entry.status().restarts += 1;
    }
}

fn describe_exit(last_exit: Option<i32>) -> String {
    match last_exit {
        Some(code) if code >= 0 => format!("exited with code {code}"),
        Some(sig) => format!("killed by signal {}", -sig),
        None => "could not be started".into(),
    }
}

/// A spawned run.
struct Proc {
    child: tokio::process::Child,
    pid: u32,
    pump: JoinHandle<()>,
}

/// Spawns one run of `spec`, its output pumped into `log`.
fn spawn(spec: &DevSpec, log: &Arc<LogFile>) -> Result<Proc, Failure> {
    let io_fail = |what: &str, e: std::io::Error| {
        (
            ErrorKind::from_io(e.kind()),
            format!("dev command {}: {what}: {e}", spec.name),
        )
    };
    let (reader, writer) = std::io::pipe().map_err(|e| io_fail("creating a pipe", e))?;
    let writer2 = writer
        .try_clone()
        .map_err(|e| io_fail("duplicating the pipe", e))?;
    let mut cmd = tokio::process::Command::new("/bin/sh");
    cmd.arg("-c")
        .arg(&spec.command)
        .envs(spec.env.iter().map(|(k, v)| (k, v)))
        .current_dir(spec.cwd.as_deref().unwrap_or("/"))
        .process_group(0)
        .stdin(Stdio::null())
        .stdout(writer)
        .stderr(writer2);
    let child = cmd.spawn().map_err(|e| io_fail("spawning /bin/sh", e))?;
    // Our copies of the write end go with `cmd`: the pipe ends when the group is gone.
    drop(cmd);
    let pid = child.id().unwrap_or(0);
    let pipe = tokio::net::unix::pipe::Receiver::from_owned_fd(OwnedFd::from(reader))
        .map_err(|e| io_fail("registering the output pipe", e))?;
    let pump = tokio::spawn(pump(pipe, log.clone()));
    Ok(Proc { child, pid, pump })
}

/// Appends everything from the pipe to the log until every writer closed it.
async fn pump(mut pipe: tokio::net::unix::pipe::Receiver, log: Arc<LogFile>) {
    let mut buf = vec![0u8; EXEC_CHUNK_LEN];
    loop {
        match pipe.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => log.append(&buf[..n]),
        }
    }
}

/// Waits for one run to exit or to be stopped; cleans its process group up.
async fn supervise(
    entry: &Entry,
    mut proc: Proc,
    stop: &mut watch::Receiver<bool>,
    run_dir: &Path,
) -> RunEnd {
    let name = &entry.spec.name;
    let pgid = proc.pid as i32;
    let record = run_dir.join(format!("{name}.pgid"));
    if let Err(e) = record_group(&record, pgid) {
        log!("dev {name}: {e}");
    }
    let started = Instant::now();
    {
        let mut s = entry.status();
        s.state = DevState::Running;
        s.pid = Some(proc.pid);
        s.since = Some(started);
    }
    let exited = tokio::select! {
        status = proc.child.wait() => Some(status.ok()),
        _ = stop.wait_for(|s| *s) => None,
    };
    let (status, stopped) = match exited {
        Some(status) => {
            // The shell is gone: what is left of its group goes too.
            let _ = signal_group(pgid, libc::SIGKILL);
            (status, false)
        }
        None => (terminate(&mut proc.child, pgid).await, true),
    };
    if tokio::time::timeout(PUMP_DRAIN, &mut proc.pump)
        .await
        .is_err()
    {
        // A process that left the group still holds the pipe: stop reading it.
        proc.pump.abort();
    }
    if let Err(e) = std::fs::remove_file(&record) {
        log!("dev {name}: removing {}: {e}", record.display());
    }
    let last_exit = status.and_then(exit_value);
    let mut s = entry.status();
    s.pid = None;
    s.since = None;
    s.last_exit = last_exit;
    if stopped {
        s.state = DevState::Stopped;
        RunEnd::Stopped
    } else {
        RunEnd::Exited(last_exit, started.elapsed())
    }
}

/// SIGTERM to the group; SIGKILL to whatever is left after [`STOP_GRACE`].
async fn terminate(child: &mut tokio::process::Child, pgid: i32) -> Option<ExitStatus> {
    let _ = signal_group(pgid, libc::SIGTERM);
    let deadline = tokio::time::Instant::now() + STOP_GRACE;
    let status = match tokio::time::timeout_at(deadline, child.wait()).await {
        Ok(status) => status.ok(),
        Err(_) => {
            let _ = signal_group(pgid, libc::SIGKILL);
            child.wait().await.ok()
        }
    };
    // The rest of the group may still be shutting down cleanly: give it the grace too.
    while group_alive(pgid) && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = signal_group(pgid, libc::SIGKILL);
    status
}

fn group_alive(pgid: i32) -> bool {
    rustix::process::Pid::from_raw(pgid)
        .is_some_and(|pid| rustix::process::test_kill_process_group(pid).is_ok())
}

/// Exit code, or minus the signal number.
fn exit_value(status: ExitStatus) -> Option<i32> {
    status.code().or_else(|| status.signal().map(|s| -s))
}

/// Start time (clock ticks after boot) of process `pid`, from `/proc/PID/stat`.
fn start_time(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat_start_time(&stat)
}

/// Field 22 (`starttime`) of a `/proc/PID/stat` text.
fn stat_start_time(stat: &str) -> Option<u64> {
    let (_, rest) = stat.rsplit_once(')')?;
    rest.split_ascii_whitespace().nth(19)?.parse().ok()
}

/// Writes `pgid starttime` for a later worker (see the module docs).
fn record_group(path: &Path, pgid: i32) -> Result<(), String> {
    let start = start_time(pgid).unwrap_or(0);
    std::fs::write(path, format!("{pgid} {start}\n"))
        .map_err(|e| format!("recording process group in {}: {e}", path.display()))
}

/// Kills the process groups recorded in `run_dir` and forgets them. A group is killed
/// unless its leader's pid now belongs to another process (another start time): while
/// any member lives, its group id cannot be reused.
fn kill_recorded_groups(run_dir: &Path) {
    let Ok(entries) = std::fs::read_dir(run_dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.extension().is_none_or(|e| e != "pgid") {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        let mut fields = text.split_ascii_whitespace();
        let pgid = fields.next().and_then(|f| f.parse::<i32>().ok());
        let recorded_start = fields.next().and_then(|f| f.parse::<u64>().ok());
        if let Some(pgid) = pgid.filter(|p| *p > 1) {
            let same = match (start_time(pgid), recorded_start) {
                (Some(now), Some(then)) => now == then,
                // The leader is gone: the members (if any) are still ours.
                (None, _) => true,
                (Some(_), None) => false,
            };
            if same && signal_group(pgid, libc::SIGKILL).is_ok() {
                log!(
                    "killed process group {pgid} left by a previous worker ({})",
                    path.display()
                );
            }
        }
        let _ = std::fs::remove_file(&path);
    }
}

/// TCP ports (IPv4 and IPv6) with a socket in LISTEN state in this network namespace.
fn listening_ports() -> BTreeSet<u16> {
    let mut ports = BTreeSet::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        if let Ok(text) = std::fs::read_to_string(table) {
            ports.extend(parse_listening(&text));
        }
    }
    ports
}

/// Local ports of the LISTEN (`0A`) rows of a `/proc/net/tcp{,6}` text; rows that do
/// not parse are skipped.
pub fn parse_listening(text: &str) -> Vec<u16> {
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let mut fields = line.split_ascii_whitespace();
            let local = fields.nth(1)?;
            let state = fields.nth(1)?;
            if state != "0A" {
                return None;
            }
            let (_, port) = local.rsplit_once(':')?;
            u16::from_str_radix(port, 16).ok()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_listening_sockets() {
        let tcp = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n\
   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 12345 1 0000000000000000 100 0 0 10 0\n\
   1: 0100007F:0016 0100007F:D2F0 01 00000000:00000000 00:00000000 00000000     0        0 12346 1\n\
   2: garbage\n\
   3: 00000000:ZZZZ 00000000:0000 0A\n";
        assert_eq!(parse_listening(tcp), vec![8080]);
        let tcp6 = "  sl  local_address                         remote_address                        st\n\
   0: 00000000000000000000000000000000:0BB8 00000000000000000000000000000000:0000 0A 00000000:00000000\n";
        assert_eq!(parse_listening(tcp6), vec![3000]);
        assert!(parse_listening("").is_empty());
        // Our own table parses without panicking.
        let _ = listening_ports();
    }

    #[test]
    fn start_time_from_stat() {
        let stat = "4242 (my (odd) prog) S 1 4242 4242 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 987654 1000000";
        assert_eq!(stat_start_time(stat), Some(987654));
        assert_eq!(stat_start_time("garbage"), None);
        assert!(start_time(std::process::id() as i32).is_some());
    }

    #[test]
    fn exit_descriptions() {
        assert_eq!(describe_exit(Some(0)), "exited with code 0");
        assert_eq!(describe_exit(Some(-9)), "killed by signal 9");
        assert_eq!(describe_exit(None), "could not be started");
    }
}
