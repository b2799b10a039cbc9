//! `atelier workspace …` (definitions) and `atelier secret …` (values they reference).

use std::io::{IsTerminal, Read};
use std::path::PathBuf;

use atelier_core::{ErrorKind, WorkspaceSpec};
use atelier_server::api::{SecretView, WorkspaceView};
use clap::Subcommand;
use reqwest::Method;

use crate::Global;
use crate::client::{CliError, Client, decode};
use crate::commands::enc;

/// Largest secret value the manager accepts.
const MAX_SECRET_BYTES: u64 = 64 * 1024;

/// `atelier workspace …`
#[derive(Subcommand, Debug)]
pub enum WorkspaceCmd {
    /// Create or update a workspace from a YAML or JSON file; prints its revision.
    Apply {
        /// The definition (YAML or JSON); `-` reads standard input.
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
    },
    /// List workspaces.
    #[command(alias = "ls")]
    List,
    /// Print a workspace's definition as YAML (with --json: the API view).
    Show {
        /// Workspace name.
        name: String,
    },
    /// Delete a workspace definition (its secrets stay).
    Rm {
        /// Workspace name.
        name: String,
    },
}

/// `atelier secret …`
#[derive(Subcommand, Debug)]
pub enum SecretCmd {
    /// Create or replace a secret. The value is read from standard input (or
    /// --file), never from an argument, so it stays out of shell history; it is
    /// stored as given, trailing newline included.
    Set {
        /// Secret name: 1-64 of a-z, 0-9, '.', '_' and '-'.
        name: String,
        /// Read the value from this file instead of standard input.
        #[arg(long)]
        file: Option<PathBuf>,
    },
    /// List secrets (names and times; values are never shown).
    #[command(alias = "ls")]
    List,
    /// Delete a secret (refused while a workspace references it).
    Rm {
        /// Secret name.
        name: String,
    },
}

fn invalid(message: impl Into<String>) -> anyhow::Error {
    CliError::error(ErrorKind::Invalid, message)
}

fn read_input(path: &PathBuf, limit: u64) -> anyhow::Result<Vec<u8>> {
    let mut buf = Vec::new();
    let what = if path.as_os_str() == "-" {
        std::io::stdin().lock().take(limit).read_to_end(&mut buf)
    } else {
        std::fs::File::open(path).and_then(|f| f.take(limit).read_to_end(&mut buf))
    };
    what.map_err(|e| invalid(format!("cannot read {}: {e}", path.display())))?;
    Ok(buf)
}

/// The document's `name`, needed for the URL. A document without one is checked
/// locally so the error is the same the manager would give.
fn document_name(text: &str) -> anyhow::Result<String> {
    let name = serde_norway::from_str::<serde_norway::Value>(text)
        .ok()
        .and_then(|v| v.get("name").and_then(|n| n.as_str().map(str::to_owned)));
    match name {
        Some(n) => Ok(n),
        None => match WorkspaceSpec::from_yaml(text) {
            Err(e) => Err(invalid(e.to_string())),
            Ok(_) => Err(invalid("invalid name: the document has no name")),
        },
    }
}

fn print_workspaces(items: &[WorkspaceView]) {
    if items.is_empty() {
        println!("no workspaces; define one with `atelier workspace apply -f FILE`");
        return;
    }
    println!(
        "{:<24} {:>8} {:<12} {:>5} {:>4}  UPDATED",
        "NAME", "REVISION", "IMAGE", "REPOS", "DEV"
    );
    for w in items {
        println!(
            "{:<24} {:>8} {:<12} {:>5} {:>4}  {}",
            w.name,
            w.revision,
            w.spec.image,
            w.spec.repos.len(),
            w.spec.dev.len(),
            w.updated_at
        );
    }
}

/// Runs `atelier workspace …`.
pub async fn workspace(g: &Global, cmd: WorkspaceCmd) -> anyhow::Result<u8> {
    let c = Client::new(g)?;
    match cmd {
        WorkspaceCmd::Apply { file } => {
            let bytes = read_input(&file, 16 * 1024 * 1024)?;
            let text = String::from_utf8(bytes)
                .map_err(|_| invalid(format!("{} is not UTF-8 text", file.display())))?;
            let name = document_name(&text)?;
            let json =
                file.extension().is_some_and(|e| e == "json") || text.trim_start().starts_with('{');
            let content_type = if json {
                "application/json"
            } else {
                "application/yaml"
            };
            let rb = c
                .request(Method::PUT, &format!("/api/v1/workspaces/{}", enc(&name)))
                .header(reqwest::header::CONTENT_TYPE, content_type)
                .body(text);
            let w: WorkspaceView = decode(c.send(rb).await?).await?;
            if g.json {
                println!("{}", serde_json::to_string_pretty(&w)?);
            } else {
                println!(
                    "workspace {}: revision {} ({})",
                    w.name,
                    w.revision,
                    if w.changed { "changed" } else { "unchanged" }
                );
            }
        }
        WorkspaceCmd::List => {
            let items: Vec<WorkspaceView> = c.get_json("/api/v1/workspaces").await?;
            if g.json {
                println!("{}", serde_json::to_string_pretty(&items)?);
            } else {
                print_workspaces(&items);
            }
        }
        WorkspaceCmd::Show { name } => {
            let w: WorkspaceView = c
                .get_json(&format!("/api/v1/workspaces/{}", enc(&name)))
                .await?;
            if g.json {
                println!("{}", serde_json::to_string_pretty(&w)?);
            } else {
                println!(
                    "# workspace {}, revision {}, updated {}",
                    w.name, w.revision, w.updated_at
                );
                print!("{}", serde_norway::to_string(&w.spec)?);
            }
        }
        WorkspaceCmd::Rm { name } => {
            let rb = c.request(
                Method::DELETE,
                &format!("/api/v1/workspaces/{}", enc(&name)),
            );
            c.send(rb).await?;
            println!("deleted workspace {name}");
        }
    }
    Ok(0)
}

/// Runs `atelier secret …`.
pub async fn secret(g: &Global, cmd: SecretCmd) -> anyhow::Result<u8> {
    let c = Client::new(g)?;
    match cmd {
        SecretCmd::Set { name, file } => {
            let from_stdin = file.is_none();
            let path = file.unwrap_or_else(|| PathBuf::from("-"));
            if from_stdin && std::io::stdin().is_terminal() {
                eprintln!("enter the value of {name}, then Ctrl-D on a line of its own:");
            }
            let value = read_input(&path, MAX_SECRET_BYTES + 1)?;
            if value.len() as u64 > MAX_SECRET_BYTES {
                return Err(invalid(format!(
                    "the value of {name} is larger than {MAX_SECRET_BYTES} bytes"
                )));
            }
            let rb = c
                .request(Method::PUT, &format!("/api/v1/secrets/{}", enc(&name)))
                .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
                .body(value);
            let s: SecretView = decode(c.send(rb).await?).await?;
            if g.json {
                println!("{}", serde_json::to_string_pretty(&s)?);
            } else {
                println!("secret {} set", s.name);
            }
        }
        SecretCmd::List => {
            let items: Vec<SecretView> = c.get_json("/api/v1/secrets").await?;
            if g.json {
                println!("{}", serde_json::to_string_pretty(&items)?);
            } else if items.is_empty() {
                println!("no secrets; set one with `atelier secret set NAME < FILE`");
            } else {
                println!("{:<40} UPDATED", "NAME");
                for s in &items {
                    println!("{:<40} {}", s.name, s.updated_at);
                }
            }
        }
        SecretCmd::Rm { name } => {
            let rb = c.request(Method::DELETE, &format!("/api/v1/secrets/{}", enc(&name)));
            c.send(rb).await?;
            println!("deleted secret {name}");
        }
    }
    Ok(0)
}
