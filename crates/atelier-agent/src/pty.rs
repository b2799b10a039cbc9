//! Interactive PTY sessions: a program on a pseudo-terminal, for `atelier shell` and
//! the API's terminal.
//!
//! The agent keeps the master side; the program gets the slave as stdin, stdout,
//! stderr and controlling terminal (it leads a new session: `setsid` + `TIOCSCTTY`), so
//! the line discipline turns Ctrl-C (byte `0x03`) into SIGINT for the foreground job
//! and a window change (`TIOCSWINSZ`) into SIGWINCH. Output is streamed under the
//! host's credit window; input is written as it comes and credited back once written.
//!
//! On the program's exit the remaining output is drained (until every holder of the
//! slave closed it, or a short quiet gap when a background job keeps it open), then
//! `Exit` is sent. A session the host gives up on (`Cancel`) is hung up: SIGHUP (and
//! SIGCONT) to the program's group and the terminal's foreground group, then, after a
//! short grace, SIGKILL for every process left in the session. No failure here takes
//! the agent down: each is reported to the host as an error of that request.

use std::io;
use std::os::unix::process::ExitStatusExt;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::Duration;

use atelier_agent_proto::{
    DEFAULT_TERM, EXEC_CHUNK_LEN, ErrorKind, GuestMessage, PtyEvent, PtyRequest, STREAM_WINDOW,
};
use rustix::fd::OwnedFd;
use rustix::pty::OpenptFlags;
use tokio::io::unix::AsyncFd;
use tokio::sync::{Notify, Semaphore, mpsc, watch};

use crate::exec::{signal_group, spawn_error};
use crate::serve::{Agent, PtyCtl, Stream};
use crate::sys;

/// After the program exits, output still arriving within this gap is forwarded; a
/// slave kept open longer by a background job is abandoned.
const DRAIN_GAP: Duration = Duration::from_millis(200);

/// Time a hung-up session gets to exit on SIGHUP before everything in it is killed.
const HANGUP_GRACE: Duration = Duration::from_millis(300);

/// Home directory when the user has no `/etc/passwd` entry.
const DEFAULT_HOME: &str = "/root";

type Failure = (ErrorKind, String);

/// The master side of a pty, non-blocking and registered with the reactor.
pub type Master = AsyncFd<OwnedFd>;

/// Sets the window size of the terminal behind `master`.
pub fn resize(master: &Master, rows: u16, cols: u16) -> Result<(), String> {
    let size = rustix::termios::Winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    rustix::termios::tcsetwinsize(master.get_ref(), size)
        .map_err(|e| format!("setting the window size to {rows}x{cols}: {e}"))
}

/// Registers the master with the reactor.
#[allow(unsafe_code)]
fn register(master: OwnedFd) -> io::Result<Master> {
    // SAFETY: `OwnedFd` owns an open descriptor and always reports the same one; it is
    // closed only when the `AsyncFd` drops it, and it is never swapped (no `get_mut`).
    unsafe { AsyncFd::register(master) }.map_err(io::Error::from)
}

/// Allocates a pty: the master (non-blocking, close-on-exec) and a slave to hand to
/// the program.
fn open_pty() -> Result<(OwnedFd, OwnedFd), Failure> {
    let fail = |what: &str, e: rustix::io::Errno| {
        (
            ErrorKind::from_io(io::Error::from(e).kind()),
            format!("allocating a pseudo-terminal: {what}: {e}"),
        )
    };
    let flags = OpenptFlags::RDWR | OpenptFlags::NOCTTY | OpenptFlags::CLOEXEC;
    let master = rustix::pty::openpt(flags).map_err(|e| fail("opening /dev/ptmx", e))?;
    rustix::pty::grantpt(&master).map_err(|e| fail("grantpt", e))?;
    rustix::pty::unlockpt(&master).map_err(|e| fail("unlockpt", e))?;
    let slave = match rustix::pty::ioctl_tiocgptpeer(&master, flags) {
        Ok(slave) => slave,
        // Kernels before 4.13: open the slave by name.
        Err(_) => {
            let name = rustix::pty::ptsname(&master, Vec::new()).map_err(|e| fail("ptsname", e))?;
            rustix::fs::open(
                name.as_c_str(),
                rustix::fs::OFlags::RDWR | rustix::fs::OFlags::NOCTTY | rustix::fs::OFlags::CLOEXEC,
                rustix::fs::Mode::empty(),
            )
            .map_err(|e| fail("opening the slave", e))?
        }
    };
    rustix::io::ioctl_fionbio(&master, true).map_err(|e| fail("O_NONBLOCK", e))?;
    Ok((master, slave))
}

/// Registers PTY session `id` and runs it in a task.
pub fn start(agent: Arc<Agent>, id: u64, req: PtyRequest) {
    let master = open_pty().and_then(|(master, slave)| {
        let master = register(master).map_err(|e| {
            (
                ErrorKind::Internal,
                format!("registering the pseudo-terminal with the reactor: {e}"),
            )
        })?;
        Ok((Arc::new(master), slave))
    });
    let (master, slave) = match master {
        Ok(pair) => pair,
        Err((kind, message)) => {
            tokio::spawn(async move { agent.send_error(id, kind, message).await });
            return;
        }
    };
    let (input_tx, input_rx) = mpsc::unbounded_channel();
    let ctl = PtyCtl {
        input: input_tx,
        credit: Arc::new(Semaphore::new(STREAM_WINDOW as usize)),
        pgid: Arc::new(AtomicI32::new(0)),
        master: master.clone(),
        hangup: Arc::new(Notify::new()),
    };
    let session = Session {
        agent: agent.clone(),
        id,
        master,
        credit: ctl.credit.clone(),
        pgid: ctl.pgid.clone(),
        hangup: ctl.hangup.clone(),
    };
    agent.streams().insert(id, Stream::Pty(ctl));
    tokio::spawn(async move {
        // A panic in the session must neither leak the stream nor leave the host waiting.
        let failure = match tokio::spawn(session.run(req, slave, input_rx)).await {
            Ok(Ok(())) => None,
            Ok(Err(failure)) => Some(failure),
            Err(e) => Some((ErrorKind::Internal, format!("pty session failed: {e}"))),
        };
        if let Some((kind, message)) = failure {
            agent.send_error(id, kind, message).await;
        }
        agent.remove(id);
    });
}

/// A user's account data from `/etc/passwd`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Account {
    /// Login name.
    pub name: String,
    /// Home directory.
    pub home: String,
    /// Login shell (may be empty).
    pub shell: String,
}

/// The entry of `uid` in a `/etc/passwd` text.
pub fn passwd_entry(passwd: &str, uid: u32) -> Option<Account> {
    passwd.lines().find_map(|line| {
        let fields: Vec<&str> = line.split(':').collect();
        if fields.len() < 7 || fields[2].parse::<u32>().ok()? != uid {
            return None;
        }
        Some(Account {
            name: fields[0].to_owned(),
            home: fields[5].to_owned(),
            shell: fields[6].trim().to_owned(),
        })
    })
}

/// The login shell to run: the account's if it is a usable shell, else `/bin/bash`,
/// else `/bin/sh`. `exists` checks a path.
pub fn login_shell(account: Option<&Account>, exists: impl Fn(&str) -> bool) -> String {
    let from_passwd = account
        .map(|a| a.shell.as_str())
        .filter(|s| s.starts_with('/') && !s.ends_with("/nologin") && !s.ends_with("/false"));
    from_passwd
        .into_iter()
        .chain(["/bin/bash", "/bin/sh"])
        .find(|s| exists(s))
        .unwrap_or("/bin/sh")
        .to_owned()
}

struct Session {
    agent: Arc<Agent>,
    id: u64,
    master: Arc<Master>,
    credit: Arc<Semaphore>,
    pgid: Arc<AtomicI32>,
    hangup: Arc<Notify>,
}

impl Session {
    async fn run(
        self,
        req: PtyRequest,
        slave: OwnedFd,
        input: mpsc::UnboundedReceiver<Vec<u8>>,
    ) -> Result<(), Failure> {
        let id = self.id;
        let account = std::fs::read_to_string("/etc/passwd")
            .ok()
            .and_then(|p| passwd_entry(&p, rustix::process::getuid().as_raw()));
        let home = account
            .as_ref()
            .map(|a| a.home.clone())
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| DEFAULT_HOME.to_owned());
        let argv = if req.argv.is_empty() {
            let shell = login_shell(account.as_ref(), |p| std::path::Path::new(p).exists());
            vec![shell, "-l".to_owned()]
        } else {
            req.argv.clone()
        };
        let program = &argv[0];
        let cwd = match &req.cwd {
            Some(cwd) if !std::path::Path::new(cwd).is_dir() => {
                return Err((
                    ErrorKind::NotFound,
                    format!("working directory {cwd} does not exist"),
                ));
            }
            Some(cwd) => cwd.clone(),
            None if std::path::Path::new(&home).is_dir() => home.clone(),
            None => "/".to_owned(),
        };
        resize(&self.master, req.rows, req.cols).map_err(|m| (ErrorKind::Io, m))?;

        let stdio = |fd: &OwnedFd| {
            fd.try_clone()
                .map(Stdio::from)
                .map_err(|e| (ErrorKind::Io, format!("duplicating the pty slave: {e}")))
        };
        let term = if req.term.is_empty() {
            DEFAULT_TERM
        } else {
            req.term.as_str()
        };
        let mut cmd = tokio::process::Command::new(program);
        cmd.args(&argv[1..])
            .env("TERM", term)
            .env("HOME", &home)
            .current_dir(&cwd)
            .stdin(stdio(&slave)?)
            .stdout(stdio(&slave)?)
            .stderr(stdio(&slave)?);
        if let Some(a) = &account {
            cmd.env("USER", &a.name).env("LOGNAME", &a.name);
        }
        if req.argv.is_empty() {
            cmd.env("SHELL", program);
        }
        cmd.envs(req.env.iter().map(|(k, v)| (k, v)));
        sys::new_session_with_stdin_as_ctty(&mut cmd);
        let spawned = cmd.spawn();
        // Only the program holds the slave now: its exit is seen as EIO on the master.
        drop(cmd);
        drop(slave);
        let mut child = spawned.map_err(|e| spawn_error(program, &e))?;
        let pid = child.id().unwrap_or(0) as i32;
        self.pgid.store(pid, Ordering::Release);
        self.agent
            .send(GuestMessage::Pty {
                id,
                event: PtyEvent::Started { pid: pid as u32 },
            })
            .await;

        let (exited_tx, exited_rx) = watch::channel(false);
        let pump = tokio::spawn(pump_output(
            self.agent.clone(),
            id,
            self.master.clone(),
            self.credit.clone(),
            exited_rx,
        ));
        let feeder = tokio::spawn(feed_input(
            self.agent.clone(),
            id,
            self.master.clone(),
            input,
        ));

        // Cancelled before or while spawning: `hangup` holds a stored permit.
        let status = tokio::select! {
            status = child.wait() => Some(status),
            () = self.hangup.notified() => None,
        };
        let Some(status) = status else {
            self.hang_up(&mut child, pid).await;
            pump.abort();
            feeder.abort();
            self.pgid.store(0, Ordering::Release);
            return Ok(());
        };
        let _ = exited_tx.send(true);
        let _ = pump.await;
        feeder.abort();
        // The leader is reaped: its pid may be recycled, so later kills must not use it.
        self.pgid.store(0, Ordering::Release);
        let status = status.map_err(|e| (ErrorKind::Io, format!("waiting for {program}: {e}")))?;
        self.agent
            .send(GuestMessage::Pty {
                id,
                event: PtyEvent::Exit {
                    code: status.code(),
                    signal: status.signal(),
                },
            })
            .await;
        Ok(())
    }

    /// SIGHUP to the program's group and the terminal's foreground group, a grace
    /// period, then SIGKILL for everything left in the session.
    async fn hang_up(&self, child: &mut tokio::process::Child, pid: i32) {
        let foreground = sys::foreground_group(pid);
        let mut groups = vec![pid];
        groups.extend(foreground.filter(|fg| *fg != pid));
        for group in &groups {
            let _ = signal_group(*group, libc::SIGHUP);
            let _ = signal_group(*group, libc::SIGCONT);
        }
        let _ = tokio::time::timeout(HANGUP_GRACE, child.wait()).await;
        sys::kill_session(pid, libc::SIGKILL);
        for group in &groups {
            let _ = signal_group(*group, libc::SIGKILL);
        }
        let _ = child.wait().await;
    }
}

/// Reads from the master; end of file (0) once no process holds the slave (EIO).
async fn read_master(master: &Master, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        let mut guard = master.readable().await?;
        match guard.try_io(|fd| rustix::io::read(fd.get_ref(), &mut *buf).map_err(io::Error::from))
        {
            Ok(Err(e)) if e.raw_os_error() == Some(libc::EIO) => return Ok(0),
            Ok(result) => return result,
            Err(_would_block) => continue,
        }
    }
}

/// Writes all of `data` to the master, waiting while the terminal's input is full.
async fn write_master(master: &Master, mut data: &[u8]) -> io::Result<()> {
    while !data.is_empty() {
        let mut guard = master.writable().await?;
        match guard.try_io(|fd| rustix::io::write(fd.get_ref(), data).map_err(io::Error::from)) {
            Ok(Ok(0)) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(Ok(n)) => data = &data[n..],
            Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => {}
            Ok(Err(e)) => return Err(e),
            Err(_would_block) => {}
        }
    }
    Ok(())
}

/// Forwards terminal output under the host's credits; once cancelled (credits closed)
/// keeps reading and drops the data so the program never blocks on a full terminal.
async fn pump_output(
    agent: Arc<Agent>,
    id: u64,
    master: Arc<Master>,
    credit: Arc<Semaphore>,
    mut exited: watch::Receiver<bool>,
) {
    let mut buf = vec![0u8; EXEC_CHUNK_LEN];
    let mut discard = false;
    loop {
        let read = if *exited.borrow() {
            match tokio::time::timeout(DRAIN_GAP, read_master(&master, &mut buf)).await {
                Ok(r) => r,
                Err(_) => return,
            }
        } else {
            tokio::select! {
                r = read_master(&master, &mut buf) => r,
                _ = exited.changed() => continue,
            }
        };
        let n = match read {
            Ok(0) => return,
            Ok(n) => n,
            Err(e) => {
                log!("pty {id}: reading the terminal failed: {e}");
                return;
            }
        };
        if !discard {
            // n <= EXEC_CHUNK_LEN, fits u32.
            match credit.acquire_many(n as u32).await {
                Ok(permit) => permit.forget(),
                Err(_) => discard = true,
            }
        }
        if !discard {
            let event = PtyEvent::Output(buf[..n].to_vec());
            agent.send(GuestMessage::Pty { id, event }).await;
        }
    }
}

/// Writes host input to the terminal and grants the host credit for each frame.
async fn feed_input(
    agent: Arc<Agent>,
    id: u64,
    master: Arc<Master>,
    mut rx: mpsc::UnboundedReceiver<Vec<u8>>,
) {
    let mut broken = false;
    while let Some(data) = rx.recv().await {
        if data.is_empty() {
            continue;
        }
        if !broken && let Err(e) = write_master(&master, &data).await {
            // The terminal is gone (the program exited): drop further input but keep
            // granting credit so the host never stalls.
            log!("pty {id}: writing input failed: {e}");
            broken = true;
        }
        // data.len() <= frame limit, fits u32.
        agent
            .send(GuestMessage::Credit {
                id,
                bytes: data.len() as u32,
            })
            .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/bash\n\
                          daemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin\n\
                          dev:x:1000:1000:Dev,,,:/home/dev:/usr/bin/zsh\n\
                          broken:x:notanumber\n";

    #[test]
    fn passwd_lookup() {
        let root = passwd_entry(PASSWD, 0).expect("root");
        assert_eq!(root.name, "root");
        assert_eq!(root.home, "/root");
        assert_eq!(root.shell, "/bin/bash");
        assert_eq!(
            passwd_entry(PASSWD, 1000).expect("dev").home,
            "/home/dev".to_owned()
        );
        assert_eq!(passwd_entry(PASSWD, 4242), None);
        assert_eq!(passwd_entry("", 0), None);
    }

    #[test]
    fn login_shell_choice() {
        let all = |_: &str| true;
        let root = passwd_entry(PASSWD, 0);
        assert_eq!(login_shell(root.as_ref(), all), "/bin/bash");
        let dev = passwd_entry(PASSWD, 1000);
        assert_eq!(login_shell(dev.as_ref(), all), "/usr/bin/zsh");
        let daemon = passwd_entry(PASSWD, 1);
        assert_eq!(login_shell(daemon.as_ref(), all), "/bin/bash");
        let only_sh = |p: &str| p == "/bin/sh";
        assert_eq!(login_shell(root.as_ref(), only_sh), "/bin/sh");
        assert_eq!(login_shell(None, |_| false), "/bin/sh");
    }

    #[tokio::test]
    async fn pty_pair_roundtrip_and_resize() {
        let (master, slave) = open_pty().expect("pty");
        let master = register(master).expect("register");
        resize(&master, 33, 99).expect("resize");
        let size = rustix::termios::tcgetwinsize(&slave).expect("winsize");
        assert_eq!((size.ws_row, size.ws_col), (33, 99));
        write_master(&master, b"hi\n").await.expect("write");
        let mut buf = [0u8; 64];
        // Echo comes back on the master.
        let n = read_master(&master, &mut buf).await.expect("read");
        assert!(buf[..n].starts_with(b"hi"), "{:?}", &buf[..n]);
        drop(slave);
        // With no slave open, reading reports end of file instead of an error.
        let mut end = false;
        for _ in 0..10 {
            if read_master(&master, &mut buf).await.expect("read") == 0 {
                end = true;
                break;
            }
        }
        assert!(end);
    }
}
