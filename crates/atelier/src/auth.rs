//! `atelier login`/`logout` (the saved token file), `atelier session` (browser
//! sessions) and `atelier token` (API tokens). Tokens are read from standard input
//! or files, never from arguments: those show in `/proc/*/cmdline`.

use std::io::{IsTerminal, Read, Write};
use std::os::unix::fs::OpenOptionsExt;

use atelier_core::ErrorKind;
use atelier_server::api::{CreatedTokenView, SessionView, TokenView};
use clap::{Args, Subcommand};
use reqwest::Method;
use serde::Deserialize;

use crate::Global;
use crate::client::{CliError, Client, decode};

/// `atelier login`.
#[derive(Args, Debug)]
pub struct LoginArgs {}

/// `atelier logout`.
#[derive(Args, Debug)]
pub struct LogoutArgs {}

/// Browser sessions: sign-ins on the manager and the sandbox URLs they opened.
#[derive(Subcommand, Debug)]
pub enum SessionCmd {
    /// List unexpired browser sessions.
    #[command(alias = "ls")]
    List,
    /// Revoke a session (a manager session takes its sandbox sessions with it), or
    /// every session with --all; refused from the next request on.
    Revoke {
        /// Session id (`ses-…`, from `session list`).
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        id: Option<String>,
        /// Revoke every browser session.
        #[arg(long)]
        all: bool,
    },
}

/// API tokens.
#[derive(Subcommand, Debug)]
pub enum TokenCmd {
    /// List tokens (ids and names; values are never shown).
    #[command(alias = "ls")]
    List,
    /// Create a token and print it once.
    Create {
        /// A name to recognise it by.
        name: String,
    },
    /// Revoke a token and every browser session it signed in; refused from the next
    /// request on.
    Revoke {
        /// Token id (from `token list`).
        id: i64,
    },
}

fn token_path() -> anyhow::Result<std::path::PathBuf> {
    atelier_client::user_token_file().ok_or_else(|| {
        CliError::error(
            ErrorKind::Invalid,
            "HOME is not set: nowhere to keep the token",
        )
    })
}

/// Reads a token from standard input, checks it against the manager and saves it
/// to ~/.config/atelier/token (0600).
pub async fn login(g: &Global, _args: LoginArgs) -> anyhow::Result<u8> {
    if std::io::stdin().is_terminal() {
        eprintln!("paste the API token, then Enter and Ctrl-D:");
    }
    let mut buf = String::new();
    std::io::stdin()
        .lock()
        .take(4096)
        .read_to_string(&mut buf)?;
    let token = buf.trim().to_owned();
    if token.is_empty() {
        return Err(CliError::error(
            ErrorKind::Invalid,
            "no token on standard input",
        ));
    }
    let mut probe = g.clone();
    probe.token = Some(token.clone());
    let c = Client::new(&probe)?;
    c.send(c.request(Method::GET, "/api/v1/status")).await?;
    let path = token_path()?;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&path)?;
    writeln!(f, "{token}")?;
    println!("signed in; token saved to {}", path.display());
    Ok(0)
}

/// Forgets the saved token.
pub async fn logout(_g: &Global, _args: LogoutArgs) -> anyhow::Result<u8> {
    let path = token_path()?;
    match std::fs::remove_file(&path) {
        Ok(()) => println!(
            "removed {}; the token itself stays valid until `atelier token revoke ID`",
            path.display()
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            println!("no saved token at {}", path.display())
        }
        Err(e) => return Err(e.into()),
    }
    Ok(0)
}

#[derive(Deserialize, serde::Serialize)]
struct Revoked {
    revoked: u64,
}

/// `atelier session …`.
pub async fn session(g: &Global, cmd: SessionCmd) -> anyhow::Result<u8> {
    let c = Client::new(g)?;
    match cmd {
        SessionCmd::List => {
            let items: Vec<SessionView> = c.get_json("/api/v1/sessions").await?;
            if g.json {
                println!("{}", serde_json::to_string_pretty(&items)?);
            } else if items.is_empty() {
                println!("no browser sessions");
            } else {
                println!("{:<22} {:<8} {:<44} EXPIRES", "ID", "KIND", "HOST");
                for s in &items {
                    println!(
                        "{:<22} {:<8} {:<44} {}",
                        s.id,
                        s.kind,
                        s.host.as_deref().unwrap_or("-"),
                        s.expires_at
                    );
                }
            }
        }
        SessionCmd::Revoke { all: true, .. } => {
            let r: Revoked = decode(
                c.send(c.request(Method::DELETE, "/api/v1/sessions"))
                    .await?,
            )
            .await?;
            println!("revoked {} sessions", r.revoked);
        }
        SessionCmd::Revoke { id, .. } => {
            let id = id.unwrap_or_default();
            let rb = c.request(
                Method::DELETE,
                &format!("/api/v1/sessions/{}", atelier_client::enc(&id)),
            );
            c.send(rb).await?;
            println!("revoked session {id}");
        }
    }
    Ok(0)
}

/// `atelier token …`.
pub async fn token(g: &Global, cmd: TokenCmd) -> anyhow::Result<u8> {
    let c = Client::new(g)?;
    match cmd {
        TokenCmd::List => {
            let items: Vec<TokenView> = c.get_json("/api/v1/tokens").await?;
            if g.json {
                println!("{}", serde_json::to_string_pretty(&items)?);
            } else {
                println!("{:<6} {:<30} CREATED", "ID", "NAME");
                for t in &items {
                    println!("{:<6} {:<30} {}", t.id, t.name, t.created_at);
                }
            }
        }
        TokenCmd::Create { name } => {
            let rb = c
                .request(Method::POST, "/api/v1/tokens")
                .json(&serde_json::json!({ "name": name }));
            let t: CreatedTokenView = decode(c.send(rb).await?).await?;
            if g.json {
                println!("{}", serde_json::to_string_pretty(&t)?);
            } else {
                eprintln!("token {} ({}), shown once:", t.id, t.name);
                println!("{}", t.token);
            }
        }
        TokenCmd::Revoke { id } => {
            c.send(c.request(Method::DELETE, &format!("/api/v1/tokens/{id}")))
                .await?;
            println!("revoked token {id}");
        }
    }
    Ok(0)
}
