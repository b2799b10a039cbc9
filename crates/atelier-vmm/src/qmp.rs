//! A minimal QMP client: the greeting, `qmp_capabilities`, then one command at a
//! time. Hand-written because we send five commands; the `qapi` crate generates the
//! whole QEMU schema for that.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::Mutex;

use crate::VmmError;

/// Longest QMP line we accept; QEMU's answers to our commands are far smaller.
const MAX_LINE: usize = 1 << 20;

/// A connected QMP session.
#[derive(Debug)]
pub struct Qmp {
    socket: PathBuf,
    io: Mutex<(BufReader<OwnedReadHalf>, OwnedWriteHalf)>,
}

impl Qmp {
    /// Connects, reads the greeting and negotiates capabilities.
    pub async fn connect(socket: &Path) -> Result<Qmp, VmmError> {
        let err = |op: &str, detail: String| VmmError::Qmp {
            op: op.to_owned(),
            socket: socket.to_owned(),
            detail,
        };
        let stream = UnixStream::connect(socket)
            .await
            .map_err(|e| err("connect", e.to_string()))?;
        let (r, w) = stream.into_split();
        let qmp = Qmp {
            socket: socket.to_owned(),
            io: Mutex::new((BufReader::new(r), w)),
        };
        {
            let mut io = qmp.io.lock().await;
            let greeting = read_message(&mut io.0)
                .await
                .map_err(|d| err("greeting", d))?;
            if greeting.get("QMP").is_none() {
                return Err(err("greeting", format!("unexpected {greeting}")));
            }
        }
        qmp.execute("qmp_capabilities", None).await?;
        Ok(qmp)
    }

    /// Runs one command and returns its `return` value.
    pub async fn execute(
        &self,
        command: &str,
        arguments: Option<Value>,
    ) -> Result<Value, VmmError> {
        let err = |detail: String| VmmError::Qmp {
            op: command.to_owned(),
            socket: self.socket.clone(),
            detail,
        };
        let mut msg = json!({ "execute": command });
        if let Some(a) = arguments {
            msg["arguments"] = a;
        }
        let mut line = msg.to_string();
        line.push('\n');
        let mut io = self.io.lock().await;
        io.1.write_all(line.as_bytes())
            .await
            .map_err(|e| err(e.to_string()))?;
        loop {
            let v = read_message(&mut io.0).await.map_err(err)?;
            if let Some(ret) = v.get("return") {
                return Ok(ret.clone());
            }
            if let Some(e) = v.get("error") {
                return Err(err(e
                    .get("desc")
                    .and_then(Value::as_str)
                    .unwrap_or("error")
                    .to_owned()));
            }
            // Anything else is an asynchronous event; skip it.
        }
    }

    /// Runs a command with a deadline.
    pub async fn execute_timeout(
        &self,
        command: &str,
        arguments: Option<Value>,
        timeout: Duration,
    ) -> Result<Value, VmmError> {
        tokio::time::timeout(timeout, self.execute(command, arguments))
            .await
            .map_err(|_| VmmError::Timeout(timeout, format!("qmp {command}")))?
    }
}

async fn read_message(r: &mut BufReader<OwnedReadHalf>) -> Result<Value, String> {
    let mut buf = Vec::new();
    loop {
        let chunk = r.fill_buf().await.map_err(|e| e.to_string())?;
        if chunk.is_empty() {
            return Err("connection closed".into());
        }
        if let Some(pos) = chunk.iter().position(|&b| b == b'\n') {
            buf.extend_from_slice(&chunk[..pos]);
            r.consume(pos + 1);
            break;
        }
        let n = chunk.len();
        buf.extend_from_slice(chunk);
        r.consume(n);
        if buf.len() > MAX_LINE {
            return Err("message too long".into());
        }
    }
    serde_json::from_slice(&buf).map_err(|e| format!("bad json: {e}"))
}
