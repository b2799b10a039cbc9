//! Dev command logs: the writer with size-based rotation, and `DevLogs` streams.
//!
//! The agent is the only writer of `NAME.log` (the command's stdout and stderr come in
//! through a pipe), so it can rotate: a write that would take the file past
//! [`ROTATE_AT`] first renames `NAME.log.1` to `NAME.log.2` (dropping the old `.2`) and
//! `NAME.log` to `NAME.log.1`. A stream keeps the descriptors it opened, so it reads
//! through a rotation without losing or repeating bytes, then moves on to the new file.

use std::ffi::OsString;
use std::fs::File;
use std::io::{SeekFrom, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use atelier_agent_proto::{EXEC_CHUNK_LEN, ErrorKind, GuestMessage, STREAM_WINDOW};
use tokio::io::{AsyncReadExt, AsyncSeekExt};
use tokio::sync::{Notify, Semaphore, watch};

use crate::serve::{Agent, DevLogCtl, Stream};

/// A log file is rotated before it would grow past this size.
pub const ROTATE_AT: u64 = 1 << 20;

/// Rotated files kept besides the live one (`.1` and `.2`).
const KEEP: u32 = 2;

type Failure = (ErrorKind, String);

/// `PATH.N`, the `n`-th rotated file of log `path`.
pub fn rotated(path: &Path, n: u32) -> PathBuf {
    let mut name = OsString::from(path.as_os_str());
    name.push(format!(".{n}"));
    PathBuf::from(name)
}

struct Writer {
    file: Option<File>,
    size: u64,
    /// A failure was logged; further ones are not until a write succeeds.
    failing: bool,
}

/// The log of one dev command name, shared by its successive runs.
pub struct LogFile {
    path: PathBuf,
    writer: Mutex<Writer>,
    /// Bytes appended so far (all files); followers wake on every change.
    appended: watch::Sender<u64>,
}

impl LogFile {
    /// Opens (creating) `path` for appending.
    pub fn open(path: PathBuf) -> Result<LogFile, String> {
        let file = open_append(&path)?;
        let size = file
            .metadata()
            .map_err(|e| format!("reading the size of {}: {e}", path.display()))?
            .len();
        Ok(LogFile {
            path,
            writer: Mutex::new(Writer {
                file: Some(file),
                size,
                failing: false,
            }),
            appended: watch::Sender::new(0),
        })
    }

    /// The live file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn lock(&self) -> MutexGuard<'_, Writer> {
        self.writer.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Appends `data` (rotating first when it would not fit). Failures are logged once
    /// per streak and the data dropped: a full disk must not stop the command.
    pub fn append(&self, data: &[u8]) {
        let mut w = self.lock();
        if w.size > 0 && w.size + data.len() as u64 > ROTATE_AT {
            self.rotate_locked(&mut w);
        }
        if w.file.is_none() {
            match open_append(&self.path) {
                Ok(f) => w.file = Some(f),
                Err(e) => {
                    if !w.failing {
                        log!("{e}; dropping output");
                        w.failing = true;
                    }
                    return;
                }
            }
        }
        let result = match w.file.as_mut() {
            Some(f) => f.write_all(data),
            None => Ok(()),
        };
        match result {
            Ok(()) => {
                w.size += data.len() as u64;
                w.failing = false;
                drop(w);
                self.appended.send_modify(|n| *n += data.len() as u64);
            }
            Err(e) => {
                if !w.failing {
                    log!("writing to {}: {e}; dropping output", self.path.display());
                    w.failing = true;
                }
            }
        }
    }

    /// Starts a fresh live file unless it is empty (a new command of this name).
    pub fn rotate(&self) {
        let mut w = self.lock();
        if w.size > 0 {
            self.rotate_locked(&mut w);
        }
    }

    fn rotate_locked(&self, w: &mut Writer) {
        w.file = None;
        for n in (1..KEEP).rev() {
            let from = rotated(&self.path, n);
            if from.exists()
                && let Err(e) = std::fs::rename(&from, rotated(&self.path, n + 1))
            {
                log!("rotating {}: {e}", from.display());
            }
        }
        if let Err(e) = std::fs::rename(&self.path, rotated(&self.path, 1)) {
            log!("rotating {}: {e}", self.path.display());
        }
        // Even when a rename failed: start counting again so a failure is not retried
        // on every write.
        w.size = 0;
        match open_append(&self.path) {
            Ok(f) => {
                // A failed rename leaves the old content in place.
                w.size = f.metadata().map(|m| m.len()).unwrap_or(0);
                w.file = Some(f);
            }
            Err(e) => log!("{e}"),
        }
    }

    /// Opens the last `tail` bytes for reading: the segments of the rotated files and
    /// the live file, oldest first, plus a subscription to later appends. Done under
    /// the writer lock, so no byte is missed or repeated.
    fn open_tail(&self, tail: u64) -> std::io::Result<(Vec<Segment>, watch::Receiver<u64>)> {
        let w = self.lock();
        let appended = self.appended.subscribe();
        let live = File::open(&self.path)?;
        let mut files = vec![(live, w.size)];
        for n in 1..=KEEP {
            match File::open(rotated(&self.path, n)) {
                Ok(f) => {
                    let len = f.metadata()?.len();
                    files.push((f, len));
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => break,
                Err(e) => return Err(e),
            }
        }
        drop(w);
        let mut remaining = tail;
        let mut segments = Vec::new();
        for (file, len) in files {
            let take = remaining.min(len);
            remaining -= take;
            segments.push(Segment {
                file,
                start: len - take,
                end: len,
            });
            if remaining == 0 {
                break;
            }
        }
        segments.reverse();
        Ok((segments, appended))
    }
}

fn open_append(path: &Path) -> Result<File, String> {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| format!("opening log {}: {e}", path.display()))
}

/// Bytes `start..end` of an open log file (the live file's `end` only bounds the backlog).
struct Segment {
    file: File,
    start: u64,
    end: u64,
}

/// What the stream reports when it ends normally.
enum End {
    /// Reached the end (no follow) or the command was replaced: send `Done`.
    Done,
    /// The host cancelled: send nothing.
    Cancelled,
}

/// Why a following stream woke up.
enum Wake {
    /// The log grew (or rotated).
    Appended,
    /// The command was replaced.
    Replaced,
}

/// Registers log stream `id` of dev command `name` and runs it in a task.
pub fn start(agent: Arc<Agent>, id: u64, name: String, follow: bool, tail: u64) {
    let credit = Arc::new(Semaphore::new(STREAM_WINDOW as usize));
    let cancel = Arc::new(Notify::new());
    agent.streams().insert(
        id,
        Stream::DevLog(DevLogCtl {
            credit: credit.clone(),
            cancel: cancel.clone(),
        }),
    );
    tokio::spawn(async move {
        let result = stream(&agent, id, &name, follow, tail, &credit, &cancel).await;
        agent.remove(id);
        match result {
            Ok(End::Done) => agent.send(GuestMessage::Done { id }).await,
            Ok(End::Cancelled) => {}
            Err((kind, message)) => agent.send_error(id, kind, message).await,
        }
    });
}

async fn stream(
    agent: &Agent,
    id: u64,
    name: &str,
    follow: bool,
    tail: u64,
    credit: &Semaphore,
    cancel: &Notify,
) -> Result<End, Failure> {
    let (log, mut replaced) = agent.dev.log_of(name)?;
    let fail = |what: &str, e: std::io::Error| {
        (
            ErrorKind::from_io(e.kind()),
            format!("dev logs {name}: {what} {}: {e}", log.path().display()),
        )
    };
    let (segments, mut appended) = log.open_tail(tail).map_err(|e| fail("opening", e))?;
    let mut out = Sender { agent, id, credit };
    // open_tail puts the live file last: after the loop, `live` is it, read up to the
    // end the backlog stopped at.
    let mut live = None;
    for seg in segments {
        let mut file = tokio::fs::File::from_std(seg.file);
        file.seek(SeekFrom::Start(seg.start))
            .await
            .map_err(|e| fail("seeking in", e))?;
        if !out
            .copy(&mut file, Some(seg.end - seg.start))
            .await
            .map_err(|e| fail("reading", e))?
        {
            return Ok(End::Cancelled);
        }
        live = Some(file);
    }
    let Some(mut live) = live else {
        return Ok(End::Done);
    };
    if !follow {
        return Ok(End::Done);
    }
    loop {
        if !out
            .copy(&mut live, None)
            .await
            .map_err(|e| fail("reading", e))?
        {
            return Ok(End::Cancelled);
        }
        if rotated_away(&live, log.path()).await {
            // Everything written to the old file came before the rename: drain it, then
            // read the new one from the start.
            if !out
                .copy(&mut live, None)
                .await
                .map_err(|e| fail("reading", e))?
            {
                return Ok(End::Cancelled);
            }
            match tokio::fs::File::open(log.path()).await {
                Ok(f) => live = f,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(fail("opening", e)),
            }
            continue;
        }
        let wake = tokio::select! {
            changed = appended.changed() => changed.is_ok().then_some(Wake::Appended),
            r = replaced.wait_for(|r| *r) => r.is_ok().then_some(Wake::Replaced),
            _ = cancel.notified() => return Ok(End::Cancelled),
        };
        match wake {
            Some(Wake::Appended) => {}
            // Replaced (or the command is gone): send what the last run left, then end.
            Some(Wake::Replaced) | None => {
                return match out.copy(&mut live, None).await {
                    Ok(true) => Ok(End::Done),
                    Ok(false) => Ok(End::Cancelled),
                    Err(e) => Err(fail("reading", e)),
                };
            }
        }
    }
}

/// Whether `path` now names another file than `file` (the log was rotated).
async fn rotated_away(file: &tokio::fs::File, path: &Path) -> bool {
    let (Ok(open), Ok(named)) = (file.metadata().await, tokio::fs::metadata(path).await) else {
        return false;
    };
    (open.dev(), open.ino()) != (named.dev(), named.ino())
}

/// Sends log chunks under the host's credit window.
struct Sender<'a> {
    agent: &'a Agent,
    id: u64,
    credit: &'a Semaphore,
}

impl Sender<'_> {
    /// Sends `limit` bytes (or up to end of file) from `file`; false when cancelled.
    async fn copy(
        &mut self,
        file: &mut tokio::fs::File,
        mut limit: Option<u64>,
    ) -> std::io::Result<bool> {
        let mut buf = vec![0u8; EXEC_CHUNK_LEN];
        loop {
            let want = match limit {
                Some(0) => return Ok(true),
                Some(n) => n.min(buf.len() as u64) as usize,
                None => buf.len(),
            };
            let n = file.read(&mut buf[..want]).await?;
            if n == 0 {
                return Ok(true);
            }
            if let Some(l) = limit.as_mut() {
                *l -= n as u64;
            }
            // n <= EXEC_CHUNK_LEN, fits u32.
            match self.credit.acquire_many(n as u32).await {
                Ok(permit) => permit.forget(),
                Err(_) => return Ok(false),
            }
            self.agent
                .send(GuestMessage::DevLog {
                    id: self.id,
                    data: buf[..n].to_vec(),
                })
                .await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(path: &Path) -> Vec<u8> {
        std::fs::read(path).unwrap_or_default()
    }

    #[test]
    fn rotation_keeps_two_old_files_within_the_limit() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("web.log");
        let log = LogFile::open(path.clone()).expect("open");
        let chunk = vec![b'x'; 100_000];
        for i in 0..40u8 {
            let mut c = chunk.clone();
            c[0] = i;
            log.append(&c);
        }
        for p in [path.clone(), rotated(&path, 1), rotated(&path, 2)] {
            let len = read(&p).len() as u64;
            assert!(len > 0 && len <= ROTATE_AT, "{}: {len}", p.display());
        }
        assert!(!rotated(&path, 3).exists());
        // 10 chunks per file: the live file holds the last ones.
        assert_eq!(read(&path).len(), 1_000_000);
        assert_eq!(read(&path)[0], 30);
        assert_eq!(read(&rotated(&path, 1))[0], 20);
        assert_eq!(read(&rotated(&path, 2))[0], 10);
        assert_eq!(*log.appended.borrow(), 4_000_000);
    }

    #[test]
    fn tail_spans_rotated_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("a.log");
        let log = LogFile::open(path.clone()).expect("open");
        log.append(b"one\n");
        log.rotate();
        log.append(b"two\n");
        log.rotate();
        log.append(b"three\n");
        let collect = |tail| {
            let (segments, _) = log.open_tail(tail).expect("tail");
            let mut out = Vec::new();
            for mut s in segments {
                use std::io::{Read, Seek};
                s.file.seek(SeekFrom::Start(s.start)).expect("seek");
                let mut buf = vec![0; (s.end - s.start) as usize];
                s.file.read_exact(&mut buf).expect("read");
                out.extend(buf);
            }
            String::from_utf8(out).expect("utf8")
        };
        assert_eq!(collect(u64::MAX), "one\ntwo\nthree\n");
        assert_eq!(collect(8), "o\nthree\n");
        assert_eq!(collect(3), "ee\n");
        assert_eq!(collect(0), "");
        // An empty live file is not rotated.
        log.rotate();
        log.rotate();
        assert_eq!(collect(u64::MAX), "two\nthree\n");
    }
}
