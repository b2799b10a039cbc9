//! `atelier dev`: dev commands the guest agent supervises, and their URLs.

use anyhow::Context;
use atelier_server::api::DevView;
use clap::Subcommand;
use futures::StreamExt;
use reqwest::Method;
use serde_json::json;
use std::io::Write;

use crate::Global;
use crate::client::{Client, decode};
use crate::commands::enc;

/// `atelier dev …`
#[derive(Subcommand, Debug)]
pub enum DevCmd {
    /// List a sandbox's dev commands with state, port and URL.
    #[command(alias = "ls")]
    List {
        /// Sandbox id or name.
        sandbox: String,
    },
    /// Start (or replace) a dev command; it runs again after restarts until stopped.
    /// Example: `atelier dev start demo web --port 3000 -- npm run dev`
    Start {
        /// Sandbox id or name.
        sandbox: String,
        /// Name (a-z, 0-9, '-'); the URL is dev-NAME-ID.DOMAIN.
        name: String,
        /// TCP port it serves on; the proxy routes to it once it listens.
        #[arg(long)]
        port: Option<u16>,
        /// Working directory in the guest.
        #[arg(long)]
        cwd: Option<String>,
        /// Extra environment, KEY=VALUE (repeatable; values are never logged).
        #[arg(long = "env", short = 'e')]
        env: Vec<String>,
        /// Restart policy: always, on-failure or never.
        #[arg(long, default_value = "on-failure")]
        restart: String,
        /// The command line (run with /bin/sh -c).
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// Stop a dev command (its route disappears; logs stay readable).
    Stop {
        /// Sandbox id or name.
        sandbox: String,
        /// Dev command name.
        name: String,
    },
    /// Print a dev command's output (stdout and stderr).
    Logs {
        /// Keep printing new output until interrupted.
        #[arg(short, long)]
        follow: bool,
        /// Sandbox id or name.
        sandbox: String,
        /// Dev command name.
        name: String,
    },
}

fn print_table(items: &[DevView]) {
    if items.is_empty() {
        println!(
            "no dev commands; start one with `atelier dev start SANDBOX NAME --port PORT -- COMMAND`"
        );
        return;
    }
    println!(
        "{:<16} {:<11} {:>6} {:>9} {:>8}  URL",
        "NAME", "STATE", "PORT", "LISTENING", "RESTARTS"
    );
    for d in items {
        println!(
            "{:<16} {:<11} {:>6} {:>9} {:>8}  {}",
            d.name,
            d.state,
            d.port.map(|p| p.to_string()).unwrap_or_else(|| "-".into()),
            if d.listening { "yes" } else { "no" },
            d.restarts,
            d.url.as_deref().unwrap_or("-"),
        );
    }
}

/// Runs `atelier dev …`.
pub async fn run(g: &Global, cmd: DevCmd) -> anyhow::Result<u8> {
    let c = Client::new(g)?;
    match cmd {
        DevCmd::List { sandbox } => {
            let items: Vec<DevView> = c
                .get_json(&format!("/api/v1/sandboxes/{}/dev", enc(&sandbox)))
                .await?;
            if g.json {
                println!("{}", serde_json::to_string_pretty(&items)?);
            } else {
                print_table(&items);
            }
        }
        DevCmd::Start {
            sandbox,
            name,
            port,
            cwd,
            env,
            restart,
            command,
        } => {
            let mut envs = serde_json::Map::new();
            for e in &env {
                let (k, v) = e.split_once('=').with_context(|| {
                    format!(
                        "--env {k:?}: use KEY=VALUE",
                        k = e.split('=').next().unwrap_or("")
                    )
                })?;
                envs.insert(k.to_owned(), json!(v));
            }
            let rb = c
                .request(
                    Method::POST,
                    &format!("/api/v1/sandboxes/{}/dev", enc(&sandbox)),
                )
                .json(
                    &json!({"name": name, "command": command.join(" "), "port": port,
                              "cwd": cwd, "env": envs, "restart": restart}),
                );
            let d: DevView = decode(c.send(rb).await?).await?;
            if g.json {
                println!("{}", serde_json::to_string_pretty(&d)?);
            } else {
                println!("started {} ({})", d.name, d.state);
                if let Some(u) = &d.url {
                    println!(
                        "url: {u}  (routed once port {} listens)",
                        d.port.unwrap_or(0)
                    );
                }
            }
        }
        DevCmd::Stop { sandbox, name } => {
            let rb = c.request(
                Method::DELETE,
                &format!("/api/v1/sandboxes/{}/dev/{}", enc(&sandbox), enc(&name)),
            );
            let d: DevView = decode(c.send(rb).await?).await?;
            if g.json {
                println!("{}", serde_json::to_string_pretty(&d)?);
            } else {
                println!("stopped {}", d.name);
            }
        }
        DevCmd::Logs {
            follow,
            sandbox,
            name,
        } => {
            let rb = c.request(
                Method::GET,
                &format!(
                    "/api/v1/sandboxes/{}/dev/{}/logs?follow={follow}",
                    enc(&sandbox),
                    enc(&name)
                ),
            );
            let mut body = c.send(rb).await?.bytes_stream();
            let mut out = std::io::stdout();
            while let Some(chunk) = body.next().await {
                let chunk = chunk.context("reading dev command logs")?;
                out.write_all(&chunk)?;
                out.flush()?;
            }
        }
    }
    Ok(0)
}
