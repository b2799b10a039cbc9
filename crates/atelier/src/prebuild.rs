//! `atelier prebuild`: build, list and follow workspace prebuilds.

use anyhow::Context;
use atelier_server::api::PrebuildView;
use clap::Subcommand;
use futures::StreamExt;
use reqwest::Method;
use std::io::Write;

use crate::Global;
use crate::client::{CliError, Client, decode};
use crate::commands::enc;

/// `atelier prebuild …`
#[derive(Subcommand, Debug)]
pub enum PrebuildCmd {
    /// Build a prebuild of a workspace: boot, clone its repos, run its init
    /// commands, snapshot disk and memory. Streams the build log.
    Create {
        /// Workspace name.
        workspace: String,
        /// Return at once instead of following the build.
        #[arg(long)]
        no_follow: bool,
    },
    /// List prebuilds: status (ready, stale, building, failed), commits, size, age.
    #[command(alias = "ls")]
    List {
        /// Only this workspace's.
        #[arg(long)]
        workspace: Option<String>,
    },
    /// Show one prebuild.
    Show {
        /// Prebuild id.
        id: String,
    },
    /// Print a prebuild's build log.
    Logs {
        /// Keep printing until the build ends.
        #[arg(short, long)]
        follow: bool,
        /// Prebuild id.
        id: String,
    },
}

pub(crate) fn age(ms: i64) -> String {
    let s = (std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
        - ms)
        .max(0)
        / 1000;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m", s / 60),
        3600..86400 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86400),
    }
}

pub async fn follow_log(c: &Client, id: &str) -> anyhow::Result<()> {
    let rb = c.request(
        Method::GET,
        &format!("/api/v1/prebuilds/{}/logs?follow=true", enc(id)),
    );
    let mut body = c.send(rb).await?.bytes_stream();
    let mut out = std::io::stderr();
    while let Some(chunk) = body.next().await {
        out.write_all(&chunk.context("reading the build log")?)?;
        out.flush()?;
    }
    Ok(())
}

/// Before spawning from `workspace`: when it has no ready (or stale) prebuild,
/// starts one (or joins the one building) and streams its log, so the wait that
/// follows shows progress instead of silence.
pub async fn ensure_ready(c: &Client, workspace: &str) -> anyhow::Result<()> {
    let items: Vec<PrebuildView> = c
        .get_json(&format!("/api/v1/prebuilds?workspace={}", enc(workspace)))
        .await?;
    if items
        .iter()
        .any(|p| p.status == "ready" || p.status == "stale")
    {
        return Ok(());
    }
    let id = match items.iter().find(|p| p.status == "building") {
        Some(p) => p.id.clone(),
        None => {
            let rb = c.request(
                Method::POST,
                &format!("/api/v1/workspaces/{}/prebuilds", enc(workspace)),
            );
            let p: PrebuildView = decode(c.send(rb).await?).await?;
            p.id
        }
    };
    eprintln!("workspace {workspace} has no ready prebuild: building {id} first");
    follow_log(c, &id).await
}

/// Runs `atelier prebuild …`.
pub async fn run(g: &Global, cmd: PrebuildCmd) -> anyhow::Result<u8> {
    let c = Client::new(g)?;
    match cmd {
        PrebuildCmd::Create {
            workspace,
            no_follow,
        } => {
            let rb = c.request(
                Method::POST,
                &format!("/api/v1/workspaces/{}/prebuilds", enc(&workspace)),
            );
            let p: PrebuildView = decode(c.send(rb).await?).await?;
            if no_follow {
                if g.json {
                    println!("{}", serde_json::to_string_pretty(&p)?);
                } else {
                    println!("{}  {}  {}", p.id, p.workspace, p.status);
                }
                return Ok(0);
            }
            follow_log(&c, &p.id).await?;
            let p: PrebuildView = c
                .get_json(&format!("/api/v1/prebuilds/{}", enc(&p.id)))
                .await?;
            if g.json {
                println!("{}", serde_json::to_string_pretty(&p)?);
            } else {
                println!("{}  {}  {}", p.id, p.workspace, p.status);
            }
            if p.status == "failed" {
                return Err(CliError::error(
                    atelier_core::ErrorKind::Invalid,
                    format!("prebuild {} failed: {}", p.id, p.error.unwrap_or_default()),
                ));
            }
        }
        PrebuildCmd::List { workspace } => {
            let path = match &workspace {
                Some(w) => format!("/api/v1/prebuilds?workspace={}", enc(w)),
                None => "/api/v1/prebuilds".into(),
            };
            let items: Vec<PrebuildView> = c.get_json(&path).await?;
            if g.json {
                println!("{}", serde_json::to_string_pretty(&items)?);
                return Ok(0);
            }
            if items.is_empty() {
                println!("no prebuilds; build one with `atelier prebuild create WORKSPACE`");
                return Ok(0);
            }
            println!(
                "{:<14} {:<16} {:<9} {:>4} {:>9} {:>5}  COMMITS",
                "ID", "WORKSPACE", "STATUS", "REV", "SIZE", "AGE"
            );
            for p in items {
                let commits: Vec<String> = p
                    .commits
                    .iter()
                    .map(|(path, c)| format!("{path}@{}", &c[..c.len().min(10)]))
                    .collect();
                println!(
                    "{:<14} {:<16} {:<9} {:>4} {:>9} {:>5}  {}",
                    p.id,
                    p.workspace,
                    p.status,
                    p.revision,
                    p.size_bytes
                        .map(|b| format!("{} MiB", b >> 20))
                        .unwrap_or_else(|| "-".into()),
                    age(p.created_at),
                    if commits.is_empty() {
                        p.error.unwrap_or_default()
                    } else {
                        commits.join(" ")
                    }
                );
            }
        }
        PrebuildCmd::Show { id } => {
            let p: PrebuildView = c
                .get_json(&format!("/api/v1/prebuilds/{}", enc(&id)))
                .await?;
            println!("{}", serde_json::to_string_pretty(&p)?);
        }
        PrebuildCmd::Logs { follow, id } => {
            if follow {
                follow_log(&c, &id).await?;
            } else {
                let text = c
                    .send(c.request(Method::GET, &format!("/api/v1/prebuilds/{}/logs", enc(&id))))
                    .await?
                    .text()
                    .await?;
                print!("{text}");
            }
        }
    }
    Ok(0)
}
