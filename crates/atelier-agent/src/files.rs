//! File transfer: uploads go to a temp file beside the target and are renamed into
//! place at the end; downloads stream in chunks under the host's credit window.

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use atelier_agent_proto::{ErrorKind, FILE_CHUNK_LEN, GuestMessage, STREAM_WINDOW};
use tokio::sync::{Semaphore, mpsc};

use crate::serve::{Agent, Stream, WriteMsg};

type Failure = (ErrorKind, String);

fn io_failure(what: String, e: &std::io::Error) -> Failure {
    (ErrorKind::from_io(e.kind()), format!("{what}: {e}"))
}

/// Runs a blocking closure on the blocking pool.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T, Failure> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| (ErrorKind::Internal, format!("file task failed: {e}")))
}

/// Checks an upload target and returns the temp file path to write first.
pub fn upload_paths(path: &str, id: u64) -> Result<(PathBuf, PathBuf), Failure> {
    let target = PathBuf::from(path);
    if !target.is_absolute() {
        return Err((
            ErrorKind::Invalid,
            format!("write_file needs an absolute path, got {path:?}"),
        ));
    }
    let (Some(parent), Some(name)) = (target.parent(), target.file_name()) else {
        return Err((
            ErrorKind::Invalid,
            format!("write_file: {path:?} names no file"),
        ));
    };
    if !parent.is_dir() {
        return Err((
            ErrorKind::NotFound,
            format!(
                "write_file {path}: parent directory {} does not exist (it is not created)",
                parent.display()
            ),
        ));
    }
    if target.is_dir() {
        return Err((
            ErrorKind::Invalid,
            format!("write_file {path}: is a directory"),
        ));
    }
    let tmp = parent.join(format!(".{}.atelier-{id}.tmp", name.to_string_lossy()));
    Ok((target, tmp))
}

/// Registers upload `id` and runs it in a task.
pub fn start_write(agent: Arc<Agent>, id: u64, path: String, mode: u32) {
    let (tx, rx) = mpsc::unbounded_channel();
    agent.streams().insert(id, Stream::Write(tx));
    tokio::spawn(async move {
        let result = write(&agent, id, &path, mode, rx).await;
        agent.remove(id);
        match result {
            Ok(Some(size)) => agent.send(GuestMessage::WriteDone { id, size }).await,
            Ok(None) => {}
            Err((kind, message)) => agent.send_error(id, kind, message).await,
        }
    });
}

/// Removes the temp file unless disarmed.
struct TempGuard(Option<PathBuf>);

impl Drop for TempGuard {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = std::fs::remove_file(p);
        }
    }
}

async fn write(
    agent: &Agent,
    id: u64,
    path: &str,
    mode: u32,
    mut rx: mpsc::UnboundedReceiver<WriteMsg>,
) -> Result<Option<u64>, Failure> {
    let (target, tmp) = upload_paths(path, id)?;
    let tmp_for_open = tmp.clone();
    let mut file = blocking(move || {
        let f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp_for_open)?;
        f.set_permissions(std::fs::Permissions::from_mode(mode & 0o7777))?;
        Ok::<_, std::io::Error>(f)
    })
    .await?
    .map_err(|e| io_failure(format!("write_file {path}: creating {}", tmp.display()), &e))?;
    let mut guard = TempGuard(Some(tmp.clone()));
    let mut size = 0u64;
    while let Some(msg) = rx.recv().await {
        match msg {
            WriteMsg::Chunk(data) => {
                let n = data.len();
                let (f, res) = blocking(move || {
                    let res = file.write_all(&data);
                    (file, res)
                })
                .await?;
                file = f;
                res.map_err(|e| io_failure(format!("write_file {path}: writing"), &e))?;
                size += n as u64;
                // n <= frame limit, fits u32.
                agent
                    .send(GuestMessage::Credit {
                        id,
                        bytes: n as u32,
                    })
                    .await;
            }
            WriteMsg::End => {
                let tmp = tmp.clone();
                let target = target.clone();
                blocking(move || {
                    file.sync_all()?;
                    std::fs::rename(&tmp, &target)
                })
                .await?
                .map_err(|e| io_failure(format!("write_file {path}: storing"), &e))?;
                guard.0 = None;
                return Ok(Some(size));
            }
            WriteMsg::Cancel => return Ok(None),
        }
    }
    Ok(None)
}

/// Registers download `id` and runs it in a task.
pub fn start_read(agent: Arc<Agent>, id: u64, path: String) {
    let credit = Arc::new(Semaphore::new(STREAM_WINDOW as usize));
    agent.streams().insert(id, Stream::Read(credit.clone()));
    tokio::spawn(async move {
        let result = read(&agent, id, &path, credit).await;
        agent.remove(id);
        match result {
            Ok(Some(size)) => agent.send(GuestMessage::FileEnd { id, size }).await,
            Ok(None) => {}
            Err((kind, message)) => agent.send_error(id, kind, message).await,
        }
    });
}

fn open_for_read(path: &str) -> Result<std::fs::File, Failure> {
    if !Path::new(path).is_absolute() {
        return Err((
            ErrorKind::Invalid,
            format!("read_file needs an absolute path, got {path:?}"),
        ));
    }
    let file = std::fs::File::open(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => (
            ErrorKind::NotFound,
            format!("read_file: no such file {path}"),
        ),
        _ => io_failure(format!("read_file {path}: opening"), &e),
    })?;
    let meta = file
        .metadata()
        .map_err(|e| io_failure(format!("read_file {path}: stat"), &e))?;
    if meta.is_dir() {
        return Err((
            ErrorKind::Invalid,
            format!("read_file {path}: is a directory"),
        ));
    }
    Ok(file)
}

async fn read(
    agent: &Agent,
    id: u64,
    path: &str,
    credit: Arc<Semaphore>,
) -> Result<Option<u64>, Failure> {
    let owned = path.to_owned();
    let mut file = blocking(move || open_for_read(&owned)).await??;
    let mut size = 0u64;
    loop {
        let (f, res) = blocking(move || {
            let mut buf = vec![0u8; FILE_CHUNK_LEN];
            let res = read_full(&mut file, &mut buf).map(|n| {
                buf.truncate(n);
                buf
            });
            (file, res)
        })
        .await?;
        file = f;
        let data = res.map_err(|e| io_failure(format!("read_file {path}: reading"), &e))?;
        if data.is_empty() {
            return Ok(Some(size));
        }
        // data.len() <= FILE_CHUNK_LEN, fits u32.
        match credit.acquire_many(data.len() as u32).await {
            Ok(permit) => permit.forget(),
            Err(_) => return Ok(None), // cancelled by the host
        }
        size += data.len() as u64;
        agent.send(GuestMessage::FileChunk { id, data }).await;
    }
}

fn read_full(file: &mut std::fs::File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match file.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upload_path_checks() {
        let dir = tempfile::tempdir().expect("tempdir");
        let base = dir.path().to_str().expect("utf8");
        let (target, tmp) = upload_paths(&format!("{base}/f.txt"), 7).expect("ok");
        assert_eq!(target, dir.path().join("f.txt"));
        assert_eq!(tmp, dir.path().join(".f.txt.atelier-7.tmp"));
        assert_eq!(
            upload_paths("rel/f", 1).expect_err("relative").0,
            ErrorKind::Invalid
        );
        let missing = upload_paths(&format!("{base}/nope/f"), 1).expect_err("missing parent");
        assert_eq!(missing.0, ErrorKind::NotFound);
        assert!(missing.1.contains("parent directory"), "{}", missing.1);
        assert_eq!(
            upload_paths(base, 1).expect_err("dir").0,
            ErrorKind::Invalid
        );
        assert_eq!(
            upload_paths("/", 1).expect_err("root").0,
            ErrorKind::Invalid
        );
    }

    #[test]
    fn open_for_read_errors() {
        assert_eq!(
            open_for_read("/definitely/missing").expect_err("missing").0,
            ErrorKind::NotFound
        );
        assert_eq!(open_for_read("/").expect_err("dir").0, ErrorKind::Invalid);
        assert_eq!(
            open_for_read("relative").expect_err("rel").0,
            ErrorKind::Invalid
        );
    }
}
