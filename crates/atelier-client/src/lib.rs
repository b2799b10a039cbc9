//! The manager's REST API client shared by the `atelier` CLI and `atelier-bench`:
//! finds the token, maps error responses back to kinds.

use std::path::Path;

use atelier_core::ErrorKind;
use reqwest::{Method, RequestBuilder, Response};
use serde::Deserialize;

/// Where a client connects: what the CLI's global options (or the bench's) say.
pub trait Endpoint {
    /// The manager's base URL.
    fn url(&self) -> &str;
    /// A token given through the environment (`ATELIER_TOKEN`); never a command-line
    /// argument, which any local user could read in `/proc/*/cmdline`.
    fn token(&self) -> Option<&str>;
    /// A file holding the token (`--token-file`/`ATELIER_TOKEN_FILE`).
    fn token_file(&self) -> Option<&Path> {
        None
    }
    /// The manager's data dir, whose `admin-token` is the last place looked in.
    fn data_dir(&self) -> &Path;
}

/// An error with a kind, so `main` can choose the exit code.
#[derive(Debug)]
pub struct CliError {
    /// Kind (from the HTTP status).
    pub kind: ErrorKind,
    /// Message.
    pub message: String,
}

impl std::error::Error for CliError {}

impl std::fmt::Display for CliError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl CliError {
    /// A new error.
    pub fn error(kind: ErrorKind, message: impl Into<String>) -> anyhow::Error {
        anyhow::Error::new(CliError {
            kind,
            message: message.into(),
        })
    }
}

#[derive(Deserialize)]
struct ErrorBody {
    message: String,
    #[serde(default)]
    request_id: String,
}

/// Client for one manager.
pub struct Client {
    http: reqwest::Client,
    base: String,
    token: Option<String>,
}

/// The user's saved token (`atelier login` writes it).
pub fn user_token_file() -> Option<std::path::PathBuf> {
    std::env::var_os("HOME").map(|h| std::path::PathBuf::from(h).join(".config/atelier/token"))
}

/// Where the token comes from, in order: ATELIER_TOKEN, --token-file /
/// ATELIER_TOKEN_FILE, the user's saved token, the data dir's admin token (readable
/// by root on the manager's host).
pub fn find_token(g: &impl Endpoint) -> Option<String> {
    if let Some(t) = g.token().map(str::trim).filter(|t| !t.is_empty()) {
        return Some(t.to_owned());
    }
    let candidates = g
        .token_file()
        .map(Path::to_path_buf)
        .into_iter()
        .chain(user_token_file())
        .chain(std::iter::once(g.data_dir().join("admin-token")));
    for p in candidates {
        if let Ok(t) = std::fs::read_to_string(&p) {
            let t = t.trim();
            if !t.is_empty() {
                return Some(t.to_owned());
            }
        }
    }
    None
}

impl Client {
    /// A client for the manager `g` names.
    pub fn new(g: &impl Endpoint) -> anyhow::Result<Client> {
        let http = reqwest::Client::builder()
            .build()
            .map_err(|e| CliError::error(ErrorKind::Internal, format!("http client: {e}")))?;
        Ok(Client {
            http,
            base: g.url().trim_end_matches('/').to_owned(),
            token: find_token(g),
        })
    }

    /// A request to `path` (under the base URL) with the token.
    pub fn request(&self, method: Method, path: &str) -> RequestBuilder {
        let rb = self.http.request(method, format!("{}{}", self.base, path));
        match &self.token {
            Some(t) => rb.bearer_auth(t),
            None => rb,
        }
    }

    /// Sends and turns error statuses into kinded errors.
    pub async fn send(&self, rb: RequestBuilder) -> anyhow::Result<Response> {
        let resp = rb.send().await.map_err(|e| {
            let kind = if e.is_connect() { ErrorKind::Unavailable } else { ErrorKind::Internal };
            CliError::error(
                kind,
                format!("cannot reach the manager at {} ({e}); is `atelier serve` running? (set ATELIER_URL)", self.base),
            )
        })?;
        if resp.status().is_success() {
            return Ok(resp);
        }
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap_or_default();
        let message = serde_json::from_str::<ErrorBody>(&text)
            .map(|b| {
                // The manager log's lines about a failed request carry its id.
                if status >= 500 && !b.request_id.is_empty() && !b.message.contains(&b.request_id) {
                    format!("{} (request id {})", b.message, b.request_id)
                } else {
                    b.message
                }
            })
            .unwrap_or(text);
        let mut kind = ErrorKind::from_http_status(status);
        let message = if kind == ErrorKind::Unauthorized && self.token.is_none() {
            kind = ErrorKind::Unauthorized;
            format!(
                "{message}; no token found in ATELIER_TOKEN, ATELIER_TOKEN_FILE, ~/.config/atelier/token (`atelier login`) or the data dir's admin-token"
            )
        } else {
            message
        };
        Err(CliError::error(kind, message))
    }

    /// GET and decode JSON.
    pub async fn get_json<T: serde::de::DeserializeOwned>(&self, path: &str) -> anyhow::Result<T> {
        let resp = self.send(self.request(Method::GET, path)).await?;
        decode(resp).await
    }
}

/// The CLI's exit code for a guest program that exited with `code` or was killed
/// by `signal` (128 + signal, as shells do).
pub fn exit_status(code: Option<i32>, signal: Option<i32>) -> u8 {
    match (code, signal) {
        (Some(c), _) => c as u8,
        (None, Some(s)) => 128u8.wrapping_add(s as u8),
        _ => 1,
    }
}

/// Decodes a JSON response body.
pub async fn decode<T: serde::de::DeserializeOwned>(resp: Response) -> anyhow::Result<T> {
    let bytes = resp
        .bytes()
        .await
        .map_err(|e| CliError::error(ErrorKind::Unavailable, format!("reading response: {e}")))?;
    serde_json::from_slice(&bytes)
        .map_err(|e| CliError::error(ErrorKind::Internal, format!("unexpected response: {e}")))
}

/// Percent-encodes a path segment or query value (unreserved characters and `/` stay).
pub fn enc(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' | b'/' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}
