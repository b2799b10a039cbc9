//! OpenCode warm in prebuilds. When a workspace's image has OpenCode, the prebuild
//! starts `opencode serve` on `127.0.0.1:4096` in the workspace's first repo as a
//! dev command the agent supervises (named [`OPENCODE_DEV_NAME`]; no port is given,
//! so it never becomes a proxy route), with a random per-prebuild password, waits
//! for `/global/health` and warms the instance for that directory (`GET /config`,
//! which loads its configuration, plugins and project, but not the providers) —
//! then the snapshot freezes it running.
//!
//! Provider keys are workspace secrets and never enter the snapshot: after each
//! restore they are handed over with `PUT /auth/{provider}`. That works without a
//! restart because OpenCode builds its provider state lazily, at the first request
//! that needs a model, which comes after the keys (measured with 1.18.33: a key put
//! after the provider state was built is ignored until `POST /instance/dispose`,
//! which costs a re-bootstrap; hence the warm-up stops short of the providers).
//!
//! The manager is OpenCode's only client, through the agent's byte stream to the
//! guest port, so none of this needs the guest network. The tiny HTTP/1.1 client
//! here is only what the prebuild and spawn need; the OpenCode client crate
//! replaces it.

use std::time::{Duration, Instant};

use atelier_agent_proto::{AgentClient, DevSpec, RestartPolicy};
pub use atelier_core::workspace::OPENCODE_DEV_NAME;
pub use atelier_store::OpenCodeServer;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::Error;
use crate::manager::Manager;

/// Where images put OpenCode; its presence turns the warm server on.
pub const OPENCODE_BIN: &str = "/usr/local/bin/opencode";

/// The guest port OpenCode's server listens on (on 127.0.0.1).
pub const OPENCODE_PORT: u16 = 4096;

/// How long a cold OpenCode start may take in a prebuild (over a minute of CPU
/// under TCG).
const START_DEADLINE: Duration = Duration::from_secs(600);

/// How long OpenCode may take to answer after a restore (it was running).
const RESTORED_DEADLINE: Duration = Duration::from_secs(60);

/// Deadline of one HTTP request to OpenCode.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(120);

/// Deadline of one health probe: a starting OpenCode may accept the connection
/// long before it answers, so probes give up early and poll again.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// Largest response body read from OpenCode here.
const MAX_BODY: usize = 4 << 20;

/// OpenCode's switches for running without reaching its hosted services.
const OFFLINE_ENV: &[(&str, &str)] = &[
    ("OPENCODE_DISABLE_MODELS_FETCH", "1"),
    ("OPENCODE_DISABLE_AUTOUPDATE", "1"),
    ("OPENCODE_DISABLE_LSP_DOWNLOAD", "1"),
    ("OPENCODE_DISABLE_SHARE", "1"),
];

/// The dev command that runs OpenCode's server: restarted by the agent when it
/// fails; the password and switches are in its environment.
pub(crate) fn dev_spec(password: &str, directory: &str) -> DevSpec {
    let mut env: Vec<(String, String)> = vec![
        ("HOME".into(), "/root".into()),
        (
            "PATH".into(),
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into(),
        ),
        ("OPENCODE_SERVER_PASSWORD".into(), password.into()),
        ("OPENCODE_ENABLE_QUESTION_TOOL".into(), "1".into()),
    ];
    env.extend(OFFLINE_ENV.iter().map(|(k, v)| ((*k).into(), (*v).into())));
    DevSpec {
        name: OPENCODE_DEV_NAME.into(),
        command: format!("exec {OPENCODE_BIN} serve --hostname 127.0.0.1 --port {OPENCODE_PORT}"),
        cwd: Some(directory.into()),
        env,
        port: None,
        restart: RestartPolicy::OnFailure,
    }
}

/// A random server password (32 alphanumerics, ~190 bits).
pub(crate) fn new_password() -> String {
    use rand::Rng;
    const A: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    let mut rng = rand::rng();
    (0..32)
        .map(|_| A[rng.random_range(0..A.len())] as char)
        .collect()
}

/// One HTTP response from OpenCode.
#[derive(Debug)]
pub struct Reply {
    /// Status code.
    pub status: u16,
    /// Body (at most [`MAX_BODY`] bytes).
    pub body: Vec<u8>,
}

/// One HTTP/1.1 request to OpenCode inside the guest, over the agent's byte stream,
/// with Basic auth (`opencode:password`) and the instance directory header.
pub(crate) async fn request(
    agent: &AgentClient,
    oc: &OpenCodeServer,
    method: &str,
    path: &str,
    body: Option<&serde_json::Value>,
    timeout: Duration,
) -> Result<Reply, Error> {
    let s = agent
        .open_stream(oc.port, crate::guest_stream::OPEN_TIMEOUT)
        .await
        .map_err(|e| {
            Error::unavailable(format!("OpenCode {method} {path}: cannot connect: {e}"))
        })?;
    request_on(s, oc, method, path, body, timeout).await
}

/// One HTTP/1.1 request to OpenCode over an open stream to its port (e.g.
/// [`crate::sandboxes::Sandboxes::stream`]), with Basic auth (`opencode:password`;
/// none when the password is empty) and the instance directory header
/// (`x-opencode-directory`); the connection closes after the response, which
/// must come within `timeout`. A small stand-in until the OpenCode client crate
/// replaces it.
pub async fn request_on<S: AsyncRead + AsyncWrite + Unpin>(
    mut s: S,
    oc: &OpenCodeServer,
    method: &str,
    path: &str,
    body: Option<&serde_json::Value>,
    timeout: Duration,
) -> Result<Reply, Error> {
    use base64::Engine;
    let what = format!("OpenCode {method} {path}");
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nx-opencode-directory: {}\r\nAccept: application/json\r\nConnection: close\r\nContent-Length: {}\r\n",
        oc.port,
        percent_encoding::utf8_percent_encode(&oc.directory, percent_encoding::CONTROLS),
        body.len()
    );
    if !oc.password.is_empty() {
        let auth =
            base64::engine::general_purpose::STANDARD.encode(format!("opencode:{}", oc.password));
        head.push_str(&format!("Authorization: Basic {auth}\r\n"));
    }
    if !body.is_empty() {
        head.push_str("Content-Type: application/json\r\n");
    }
    head.push_str("\r\n");
    let exchange = async {
        let io = |e: std::io::Error| Error::unavailable(format!("{what}: {e}"));
        s.write_all(head.as_bytes()).await.map_err(io)?;
        s.write_all(body.as_bytes()).await.map_err(io)?;
        s.flush().await.map_err(io)?;
        read_response(&mut s, &what).await
    };
    tokio::time::timeout(timeout, exchange).await.map_err(|_| {
        Error::unavailable(format!(
            "{what} got no answer within {} s",
            timeout.as_secs()
        ))
    })?
}

/// Reads a response: status line, headers, then a `Content-Length` or chunked
/// body, or everything up to the close.
async fn read_response<R: AsyncRead + Unpin>(r: &mut R, what: &str) -> Result<Reply, Error> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    let io = |e: std::io::Error| Error::unavailable(format!("{what}: {e}"));
    let head_end = loop {
        if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break p + 4;
        }
        if buf.len() > 64 * 1024 {
            return Err(Error::unavailable(format!(
                "{what}: response headers too long"
            )));
        }
        let n = r.read(&mut chunk).await.map_err(io)?;
        if n == 0 {
            return Err(Error::unavailable(format!(
                "{what}: the connection closed before a response"
            )));
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| Error::unavailable(format!("{what}: not an HTTP response")))?;
    let header = |name: &str| {
        head.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_ascii_lowercase())
        })
    };
    let mut rest = buf.split_off(head_end);
    let chunked = header("transfer-encoding").is_some_and(|v| v.contains("chunked"));
    let length = header("content-length").and_then(|v| v.parse::<usize>().ok());
    loop {
        let done = match (chunked, length) {
            (true, _) => dechunk(&rest).is_some(),
            (false, Some(n)) => rest.len() >= n,
            (false, None) => false,
        };
        if done {
            break;
        }
        if rest.len() > MAX_BODY {
            return Err(Error::unavailable(format!(
                "{what}: the response is larger than {MAX_BODY} bytes"
            )));
        }
        let n = r.read(&mut chunk).await.map_err(io)?;
        if n == 0 {
            if chunked || length.is_some() {
                return Err(Error::unavailable(format!(
                    "{what}: the connection closed mid-response"
                )));
            }
            break;
        }
        rest.extend_from_slice(&chunk[..n]);
    }
    let body = match (chunked, length) {
        (true, _) => dechunk(&rest).unwrap_or_default(),
        (false, Some(n)) => rest[..n].to_vec(),
        (false, None) => rest,
    };
    Ok(Reply { status, body })
}

/// The body of a complete chunked encoding, or `None` while it is incomplete.
fn dechunk(mut b: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let line = b.windows(2).position(|w| w == b"\r\n")?;
        let size = std::str::from_utf8(&b[..line]).ok()?;
        let size = usize::from_str_radix(size.split(';').next()?.trim(), 16).ok()?;
        b = &b[line + 2..];
        if size == 0 {
            return Some(out);
        }
        if b.len() < size + 2 {
            return None;
        }
        out.extend_from_slice(&b[..size]);
        b = &b[size + 2..];
    }
}

/// Polls `/global/health` until OpenCode answers healthy or `deadline` passes;
/// returns the version it reports. `progress` is called about every 10 s.
pub(crate) async fn wait_healthy(
    agent: &AgentClient,
    oc: &OpenCodeServer,
    deadline: Duration,
    mut progress: impl FnMut(Duration),
) -> Result<String, Error> {
    let started = Instant::now();
    let mut last_report = Instant::now();
    let mut last_error = String::from("no answer yet");
    while started.elapsed() < deadline {
        match request(agent, oc, "GET", "/global/health", None, PROBE_TIMEOUT).await {
            Ok(r) if r.status == 200 => {
                let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap_or_default();
                if v["healthy"] == true {
                    return Ok(v["version"].as_str().unwrap_or("unknown").to_owned());
                }
                last_error = format!("unhealthy: {}", String::from_utf8_lossy(&r.body));
            }
            Ok(r) => last_error = format!("HTTP {}", r.status),
            Err(e) => last_error = e.message,
        }
        if last_report.elapsed() >= Duration::from_secs(10) {
            progress(started.elapsed());
            last_report = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    Err(Error::unavailable(format!(
        "OpenCode did not answer /global/health within {} s ({last_error}); see its log in the guest: /var/log/atelier/dev/{OPENCODE_DEV_NAME}.log",
        deadline.as_secs()
    )))
}

impl Manager {
    /// In a prebuild: starts OpenCode's server when the image has it (and the
    /// workspace does not turn it off), waits until it answers and warms its
    /// instance for `directory`. `log` gets progress lines.
    pub(crate) async fn prebuild_opencode(
        &self,
        agent: &AgentClient,
        spec: &atelier_core::workspace::WorkspaceSpec,
        directory: &str,
        log: &mut (dyn FnMut(&str) + Send),
    ) -> Result<Option<OpenCodeServer>, Error> {
        if spec.opencode_server == Some(false) {
            log("==> OpenCode server: off (opencode_server: false)");
            return Ok(None);
        }
        let has = crate::templates::run_to_end(
            agent,
            atelier_agent_proto::ExecRequest::new(["test", "-x", OPENCODE_BIN])
                .timeout(Duration::from_secs(30)),
        )
        .await?
        .success();
        if !has {
            if spec.opencode_server == Some(true) {
                return Err(Error::invalid(format!(
                    "opencode_server: true, but image {} has no {OPENCODE_BIN}; use an image with OpenCode (dev-base) or drop the setting",
                    spec.image
                )));
            }
            log(&format!(
                "==> OpenCode server: none ({OPENCODE_BIN} is not in image {})",
                spec.image
            ));
            return Ok(None);
        }
        let mut oc = OpenCodeServer {
            version: String::new(),
            port: OPENCODE_PORT,
            password: new_password(),
            directory: directory.to_owned(),
        };
        log(&format!(
            "==> starting OpenCode server on 127.0.0.1:{OPENCODE_PORT} in {directory}"
        ));
        let started = Instant::now();
        agent
            .dev_start(dev_spec(&oc.password, directory))
            .await
            .map_err(Manager::agent_error)?;
        oc.version = wait_healthy(agent, &oc, START_DEADLINE, |t| {
            log(&format!(
                "    waiting for OpenCode to answer ({} s)",
                t.as_secs()
            ));
        })
        .await?;
        let up = started.elapsed();
        log(&format!(
            "    OpenCode {} answered after {:.1} s; warming its instance for {directory}",
            oc.version,
            up.as_secs_f64()
        ));
        let t = Instant::now();
        let r = request(agent, &oc, "GET", "/config", None, REQUEST_TIMEOUT).await?;
        if r.status != 200 {
            return Err(Error::invalid(format!(
                "OpenCode refused its configuration (GET /config: HTTP {}): {}",
                r.status,
                String::from_utf8_lossy(&r.body)
                    .chars()
                    .take(500)
                    .collect::<String>()
            )));
        }
        log(&format!(
            "    instance warm after {:.1} s",
            t.elapsed().as_secs_f64()
        ));
        tracing::info!(version = %oc.version, start_ms = up.as_millis() as u64, warm_ms = t.elapsed().as_millis() as u64, "OpenCode warm in prebuild");
        Ok(Some(oc))
    }

    /// After a restore from a prebuild with OpenCode (or a cold boot from its disk,
    /// `restored` false, when OpenCode has just been started): waits until it
    /// answers, then hands it the workspace's provider keys (`PUT /auth/{provider}`).
    pub(crate) async fn inject_opencode_keys(
        &self,
        sandbox: &str,
        agent: &AgentClient,
        oc: &OpenCodeServer,
        spec: &atelier_core::workspace::WorkspaceSpec,
        restored: bool,
    ) -> Result<(), Error> {
        let t = Instant::now();
        let deadline = if restored {
            RESTORED_DEADLINE
        } else {
            START_DEADLINE
        };
        wait_healthy(agent, oc, deadline, |_| {}).await?;
        let healthy = t.elapsed();
        for (provider, secret) in &spec.opencode_keys {
            let key = self.secret_value(secret).await?;
            let key = String::from_utf8(key.to_vec()).map_err(|_| {
                Error::invalid(format!(
                    "secret {secret} is not UTF-8 text, so it cannot be the key of OpenCode provider {provider}"
                ))
            })?;
            let body = serde_json::json!({ "type": "api", "key": key.trim() });
            let r = request(
                agent,
                oc,
                "PUT",
                &format!("/auth/{provider}"),
                Some(&body),
                REQUEST_TIMEOUT,
            )
            .await?;
            if r.status != 200 {
                return Err(Error::unavailable(format!(
                    "OpenCode in sandbox {sandbox} refused the key of provider {provider} (HTTP {})",
                    r.status
                )));
            }
        }
        tracing::info!(
            sandbox,
            healthy_ms = healthy.as_millis() as u64,
            keys = spec.opencode_keys.len(),
            total_ms = t.elapsed().as_millis() as u64,
            "OpenCode ready after restore"
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn responses_with_length_chunks_or_close() {
        let mut r: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhelloEXTRA";
        let x = read_response(&mut r, "t").await.unwrap();
        assert_eq!((x.status, &x.body[..]), (200, &b"hello"[..]));
        let mut r: &[u8] =
            b"HTTP/1.1 401 Unauthorized\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2;x\r\nde\r\n0\r\n\r\n";
        let x = read_response(&mut r, "t").await.unwrap();
        assert_eq!((x.status, &x.body[..]), (401, &b"abcde"[..]));
        let mut r: &[u8] = b"HTTP/1.1 204 No Content\r\n\r\n";
        assert_eq!(read_response(&mut r, "t").await.unwrap().status, 204);
        let mut r: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nshort";
        assert!(read_response(&mut r, "t").await.is_err());
        let mut r: &[u8] = b"garbage";
        assert!(read_response(&mut r, "t").await.is_err());
    }

    #[test]
    fn the_server_spec_is_supervised_and_never_a_route() {
        let s = dev_spec("pw", "/workspace/demo");
        assert_eq!(s.name, OPENCODE_DEV_NAME);
        assert_eq!(s.port, None, "no proxy route for OpenCode");
        assert_eq!(s.cwd.as_deref(), Some("/workspace/demo"));
        assert!(
            s.env
                .contains(&("OPENCODE_SERVER_PASSWORD".into(), "pw".into()))
        );
        assert!(
            s.env
                .contains(&("OPENCODE_ENABLE_QUESTION_TOOL".into(), "1".into()))
        );
        assert!(s.command.contains("--port 4096") && s.command.contains("127.0.0.1"));
        crate::dev::validate_spec(&s).unwrap();
        let p = new_password();
        assert_eq!(p.len(), 32);
        assert_ne!(p, new_password());
    }
}
