//! `atelier shell`: a real terminal in a sandbox. Without a sandbox name it boots
//! (or reuses) one for the current folder with the folder shared at /workspace.

use std::collections::BTreeMap;
use std::io::Write;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};

use anyhow::Context;
use atelier_core::{ErrorKind, MountSpec};
use atelier_server::api::SandboxView;
use atelier_server::api::pty::{PtyClientMessage, PtyServerMessage};
use clap::Args;
use futures::{SinkExt, StreamExt};
use reqwest::Method;
use serde_json::json;
use sha2::{Digest, Sha256};
use tokio::io::AsyncReadExt;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use crate::Global;
use crate::client::{CliError, Client, decode, find_token};

/// Options of `atelier shell`.
#[derive(Args, Debug)]
pub struct ShellArgs {
    /// Sandbox to attach to (default: the current folder's, created if needed).
    pub sandbox: Option<String>,
    /// Image for a new sandbox.
    #[arg(long, default_value = "minimal")]
    pub image: String,
    /// vCPUs for a new sandbox.
    #[arg(long, default_value_t = 2)]
    pub vcpus: u32,
    /// Memory in MiB for a new sandbox.
    #[arg(long, default_value_t = 2048)]
    pub memory: u32,
    /// Extra host folders for a new sandbox: HOST:GUEST[:ro] (repeatable; under the
    /// manager's share roots, default /home and /root, like the current folder).
    #[arg(long = "mount")]
    pub mounts: Vec<String>,
    /// Do not share the current folder at /workspace.
    #[arg(long)]
    pub no_workspace: bool,
    /// Environment variable for the program, KEY=VALUE (repeatable; never stored).
    #[arg(short, long = "env")]
    pub env: Vec<String>,
    /// A .env file of KEY=VALUE lines for the program (never stored).
    #[arg(long)]
    pub env_file: Vec<PathBuf>,
    /// Working directory in the guest.
    #[arg(short = 'w', long)]
    pub cwd: Option<String>,
    /// Delete the sandbox when the program exits.
    #[arg(long)]
    pub rm: bool,
    /// Program to run instead of the login shell (after `--`).
    #[arg(last = true)]
    pub command: Vec<String>,
}

/// Parses a .env file: `KEY=VALUE` lines, `export ` prefixes, quotes and comments.
pub fn parse_env_file(text: &str) -> Result<Vec<(String, String)>, String> {
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let line = line.strip_prefix("export ").unwrap_or(line);
        let (k, v) = line
            .split_once('=')
            .ok_or_else(|| format!("line {}: expected KEY=VALUE", n + 1))?;
        let k = k.trim();
        if k.is_empty() || !k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err(format!("line {}: {k:?} is not a variable name", n + 1));
        }
        let v = v.trim();
        let v = if v.len() >= 2
            && ((v.starts_with('"') && v.ends_with('"'))
                || (v.starts_with('\'') && v.ends_with('\'')))
        {
            &v[1..v.len() - 1]
        } else {
            v
        };
        out.push((k.to_owned(), v.to_owned()));
    }
    Ok(out)
}

/// The sandbox name `atelier shell` uses for a folder.
pub fn name_for_folder(dir: &Path) -> String {
    let base: String = dir
        .file_name()
        .map(|b| b.to_string_lossy().to_lowercase())
        .unwrap_or_default()
        .chars()
        .map(|c| {
            if c.is_ascii_lowercase() || c.is_ascii_digit() {
                c
            } else {
                '-'
            }
        })
        .take(40)
        .collect();
    let base = base.trim_matches('-');
    let hash = hex::encode(&Sha256::digest(dir.as_os_str().as_encoded_bytes())[..3]);
    if base.is_empty() {
        format!("shell-{hash}")
    } else {
        format!("shell-{base}-{hash}")
    }
}

pub fn owner() -> atelier_core::Owner {
    atelier_core::Owner {
        uid: rustix::process::getuid().as_raw(),
        gid: rustix::process::getgid().as_raw(),
    }
}

pub fn parse_mount(s: &str) -> anyhow::Result<MountSpec> {
    let mut m =
        MountSpec::parse(s).map_err(|e| CliError::error(ErrorKind::Invalid, e.to_string()))?;
    let abs = std::fs::canonicalize(&m.source)
        .with_context(|| format!("mount source {} does not exist", m.source))?;
    m.source = abs.display().to_string();
    Ok(m)
}

async fn ensure_sandbox(c: &Client, args: &ShellArgs) -> anyhow::Result<(SandboxView, bool)> {
    let cwd = std::env::current_dir().context("current folder")?;
    let name = match &args.sandbox {
        Some(n) => n.clone(),
        None => name_for_folder(&cwd),
    };
    let resp = c
        .request(Method::GET, &format!("/api/v1/sandboxes/{name}"))
        .send()
        .await;
    if let Ok(r) = resp
        && r.status().is_success()
    {
        let s: SandboxView = decode(r).await?;
        let state = serde_json::to_value(s.state)?
            .as_str()
            .unwrap_or("")
            .to_owned();
        if state == "running" {
            return Ok((s, false));
        }
        eprintln!("atelier: starting sandbox {name}…");
        let r = c
            .send(c.request(Method::POST, &format!("/api/v1/sandboxes/{name}/start")))
            .await?;
        return Ok((decode(r).await?, false));
    }
    let mut mounts = Vec::new();
    if !args.no_workspace {
        mounts.push(MountSpec {
            source: cwd.display().to_string(),
            target: "/workspace".into(),
            read_only: false,
        });
    }
    for m in &args.mounts {
        mounts.push(parse_mount(m)?);
    }
    eprintln!(
        "atelier: creating sandbox {name} ({}, {} vCPU, {} MiB)…",
        args.image, args.vcpus, args.memory
    );
    let body = json!({
        "name": name, "image": args.image, "vcpus": args.vcpus, "memory_mib": args.memory,
        "mounts": mounts, "mount_owner": owner(),
    });
    let r = c
        .send(c.request(Method::POST, "/api/v1/sandboxes").json(&body))
        .await?;
    Ok((decode(r).await?, true))
}

/// Restores the terminal mode on drop.
struct RawMode {
    saved: Option<rustix::termios::Termios>,
}

impl RawMode {
    fn enter() -> RawMode {
        let stdin = std::io::stdin();
        let Ok(saved) = rustix::termios::tcgetattr(stdin.as_fd()) else {
            return RawMode { saved: None };
        };
        let mut raw = saved.clone();
        raw.make_raw();
        let _ =
            rustix::termios::tcsetattr(stdin.as_fd(), rustix::termios::OptionalActions::Now, &raw);
        RawMode { saved: Some(saved) }
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        if let Some(t) = &self.saved {
            let _ = rustix::termios::tcsetattr(
                std::io::stdin().as_fd(),
                rustix::termios::OptionalActions::Now,
                t,
            );
        }
    }
}

fn window_size() -> (u16, u16) {
    match rustix::termios::tcgetwinsize(std::io::stdout().as_fd()) {
        Ok(ws) if ws.ws_row > 0 && ws.ws_col > 0 => (ws.ws_row, ws.ws_col),
        _ => (24, 80),
    }
}

/// Runs `atelier shell`.
pub async fn run(g: &Global, args: ShellArgs) -> anyhow::Result<u8> {
    let mut env = BTreeMap::new();
    for f in &args.env_file {
        let text =
            std::fs::read_to_string(f).with_context(|| format!("cannot read {}", f.display()))?;
        let pairs = parse_env_file(&text)
            .map_err(|e| CliError::error(ErrorKind::Invalid, format!("{}: {e}", f.display())))?;
        env.extend(pairs);
    }
    for kv in &args.env {
        let (k, v) = kv.split_once('=').ok_or_else(|| {
            CliError::error(
                ErrorKind::Invalid,
                format!("--env {kv:?} must be KEY=VALUE"),
            )
        })?;
        env.insert(k.to_owned(), v.to_owned());
    }
    let c = Client::new(g)?;
    let (sb, created) = ensure_sandbox(&c, &args).await?;
    let cwd = args.cwd.clone().or_else(|| {
        sb.mounts
            .iter()
            .any(|m| m.target == "/workspace")
            .then(|| "/workspace".to_owned())
    });
    let code = attach(g, &sb.id, args.command.clone(), env, cwd).await;
    if args.rm {
        let _ = c
            .send(c.request(Method::DELETE, &format!("/api/v1/sandboxes/{}", sb.id)))
            .await;
    } else if created {
        eprintln!(
            "atelier: sandbox {} keeps running; `atelier sandbox rm {}` removes it",
            sb.name, sb.name
        );
    }
    code
}

async fn attach(
    g: &Global,
    id: &str,
    command: Vec<String>,
    env: BTreeMap<String, String>,
    cwd: Option<String>,
) -> anyhow::Result<u8> {
    let ws_url = format!(
        "{}/api/v1/sandboxes/{id}/pty",
        g.url.trim_end_matches('/').replacen("http", "ws", 1)
    );
    let mut req = ws_url
        .as_str()
        .into_client_request()
        .context("websocket url")?;
    if let Some(t) = find_token(g) {
        req.headers_mut().insert(
            "authorization",
            format!("Bearer {t}").parse().context("token")?,
        );
    }
    let (ws, _) = tokio_tungstenite::connect_async(req).await.map_err(|e| {
        CliError::error(
            ErrorKind::Unavailable,
            format!("cannot open the terminal: {e}"),
        )
    })?;
    let (mut tx, mut rx) = ws.split();
    let (rows, cols) = window_size();
    let term = std::env::var("TERM").ok();
    let start = PtyClientMessage::Start {
        command,
        env,
        cwd,
        rows,
        cols,
        term,
    };
    tx.send(Message::Text(serde_json::to_string(&start)?.into()))
        .await?;

    let _raw = if rustix::termios::isatty(std::io::stdin()) {
        Some(RawMode::enter())
    } else {
        None
    };
    let (in_tx, mut in_rx) = tokio::sync::mpsc::channel::<Message>(16);
    tokio::spawn(async move {
        let mut stdin = tokio::io::stdin();
        let mut buf = vec![0u8; 16 << 10];
        loop {
            match stdin.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    if in_tx
                        .send(Message::Binary(buf[..n].to_vec().into()))
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
            }
        }
    });
    let mut winch = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::window_change())?;
    let mut out = std::io::stdout();
    loop {
        tokio::select! {
            msg = rx.next() => match msg {
                Some(Ok(Message::Binary(b))) => { out.write_all(&b)?; out.flush()?; }
                Some(Ok(Message::Text(t))) => match serde_json::from_str::<PtyServerMessage>(&t) {
                    Ok(PtyServerMessage::Exit { code, signal }) => {
                        return Ok(crate::client::exit_status(code, signal));
                    }
                    Ok(PtyServerMessage::Error { message }) => {
                        return Err(CliError::error(ErrorKind::Unavailable, message));
                    }
                    _ => {}
                },
                Some(Ok(Message::Close(_))) | None => {
                    return Err(CliError::error(ErrorKind::Unavailable, "the terminal closed without an exit status"));
                }
                Some(Err(e)) => return Err(CliError::error(ErrorKind::Unavailable, format!("terminal: {e}"))),
                Some(Ok(_)) => {}
            },
            Some(m) = in_rx.recv() => { tx.send(m).await?; }
            _ = winch.recv() => {
                let (rows, cols) = window_size();
                tx.send(Message::Text(serde_json::to_string(&PtyClientMessage::Resize { rows, cols })?.into())).await?;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_files_parse() {
        let text = "# comment\nexport A=1\nB = \"two words\"\nC='x=y'\n\nD=\n";
        let got = parse_env_file(text).unwrap();
        assert_eq!(
            got,
            [("A", "1"), ("B", "two words"), ("C", "x=y"), ("D", "")]
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
        );
        assert!(parse_env_file("novalue").is_err());
        assert!(parse_env_file("BAD-NAME=1").is_err());
    }

    #[test]
    fn folder_names_are_valid_sandbox_names() {
        for p in ["/home/u/My App", "/", "/tmp/x", "/home/u/ünïcode"] {
            let n = name_for_folder(Path::new(p));
            assert!(atelier_core::validate_name(&n).is_ok(), "{p} -> {n}");
        }
        assert_ne!(
            name_for_folder(Path::new("/a/app")),
            name_for_folder(Path::new("/b/app"))
        );
    }
}
