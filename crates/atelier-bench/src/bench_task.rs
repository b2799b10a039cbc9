//! `atelier-bench bench-task`: what starting a task adds beyond restoring its sandbox.
//!
//! Self-contained, because it needs a model the guests can reach and that tells the
//! bench when it is first asked: it starts its own manager (`atelier serve` on a
//! scratch data dir, bridge and subnet, through the test kit's harness), a network
//! namespace with the scripted OpenAI-compatible model and a git server, a DNS
//! server naming them, and a workspace on the `minimal-opencode` image whose
//! prebuild freezes OpenCode warm. Then, from that one prebuild, alternately:
//!
//! - spawn: `POST /sandboxes` from the workspace → the agent answers (the client's
//!   wall time);
//! - task: `POST /tasks` with `start` → the scripted model receives the task's first
//!   completion request (prebuild restore, branch, session, prompt, OpenCode's own
//!   work before it calls the model).
//!
//! It prints both, and their ratio (the goal is ≤ 1.5×). It never asserts on times.
//! The image comes from `ATELIER_TEST_IMAGES_DIR` (default
//! /var/cache/atelier-test/images, where `scripts/test.sh` builds it); the
//! `atelier` binary from beside this one (or `ATELIER_TEST_BIN`).
//! Everything it makes is removed when it ends (the harness's drop).

use std::time::{Duration, Instant};

use anyhow::Context;
use atelier_testkit::model::RequestKind;
use atelier_testkit::opencode_ws::opencode_workspace_yaml;
use atelier_testkit::{GitServer, ModelServer, PublicNet, Script, Server, StaticDns, Turn};

const MODEL_HOST: &str = "model.bench.test";
const MODEL_PORT: u16 = 18092;

/// `atelier-bench bench-task` options.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Spawns and task starts measured (alternating).
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    match s.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => s[n / 2],
        n => (s[n / 2 - 1] + s[n / 2]) / 2.0,
    }
}

/// The task's state, read through the API.
async fn task_state(srv: &Server, id: &str) -> anyhow::Result<String> {
    let v: serde_json::Value = srv
        .api(reqwest::Method::GET, &format!("/api/v1/tasks/{id}"))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    Ok(v["task"]["state"]
        .as_str()
        .or(v["state"].as_str())
        .context("task state")?
        .to_owned())
}

fn cli(srv: &Server, args: &[&str]) -> anyhow::Result<String> {
    let out = srv.run(args);
    anyhow::ensure!(
        out.status.success(),
        "atelier {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs the benchmark (blocking; it drives a manager process and waits on it).
pub async fn run(args: Args) -> anyhow::Result<u8> {
    let handle = tokio::runtime::Handle::current();
    tokio::task::spawn_blocking(move || run_blocking(&handle, args))
        .await
        .context("the benchmark thread")?
}

fn run_blocking(rt: &tokio::runtime::Handle, args: Args) -> anyhow::Result<u8> {
    eprintln!("==> a public network with the scripted model and a git server");
    let net = PublicNet::start();
    let repo = GitServer::start(&net);
    let ip: std::net::Ipv4Addr = net.ip_a.parse()?;
    let (model, dns) = rt.block_on(async {
        let model = ModelServer::start_in_netns(
            &net.ns,
            std::net::SocketAddr::from((ip, MODEL_PORT)),
            "/v1",
            Script::new(vec![Turn::text("ok")]),
        )
        .await?;
        let dns = StaticDns::spawn(
            "127.0.0.1:0".parse()?,
            vec![(MODEL_HOST.into(), ip)],
            vec![],
        )
        .await?;
        anyhow::Ok((model, dns))
    })?;
    let dns_addr = dns.local_addr().to_string();
    eprintln!("==> a manager of its own");
    let srv = Server::start_with(&[
        ("ATELIER_DNS_UPSTREAM", dns_addr.as_str()),
        ("ATELIER_LOG", "warn"),
    ]);
    srv.set_secret("bench-model-key", "sk-bench-key");
    let url = repo.url.replace(&net.ip_a, MODEL_HOST);
    let yaml = opencode_workspace_yaml(
        "bench",
        MODEL_HOST,
        MODEL_PORT,
        "bench-model-key",
        Some(&url),
    );
    let ws = std::env::temp_dir().join(format!("atelier-bench-task-{}.yaml", std::process::id()));
    std::fs::write(&ws, yaml)?;
    cli(
        &srv,
        &["workspace", "apply", "-f", &ws.display().to_string()],
    )?;
    let _ = std::fs::remove_file(&ws);
    eprintln!("==> the prebuild (OpenCode frozen warm; minutes under TCG)");
    let t = Instant::now();
    cli(&srv, &["prebuild", "create", "bench"])?;
    let prebuild_s = t.elapsed().as_secs_f64();

    let mut spawn_ms = Vec::new();
    let mut task_ms = Vec::new();
    let mut setup_ms = Vec::new();
    let mut opencode_ms = Vec::new();
    for i in 0..args.runs {
        let name = format!("bt-spawn-{i}");
        let t = Instant::now();
        cli(
            &srv,
            &["sandbox", "create", "--name", &name, "--workspace", "bench"],
        )?;
        spawn_ms.push(t.elapsed().as_secs_f64() * 1000.0);
        cli(&srv, &["sandbox", "rm", &name])?;

        let asked = model
            .requests()
            .iter()
            .filter(|r| r.kind != RequestKind::Title)
            .count();
        let t = Instant::now();
        let out = cli(
            &srv,
            &[
                "--json", "task", "create", "-w", "bench", "--start", "Say ok",
            ],
        )?;
        let id = serde_json::from_str::<serde_json::Value>(&out)?["id"]
            .as_str()
            .context("task id")?
            .to_owned();
        let deadline = Instant::now() + Duration::from_secs(600);
        // When the manager had sent the prompt (the task is `working`): splits the
        // time into the manager's part and OpenCode's. Read every 50 ms.
        let mut prompted: Option<Instant> = None;
        let mut next_read = Instant::now();
        let first = loop {
            let reqs = model.requests();
            let mut answering = reqs.iter().filter(|r| r.kind != RequestKind::Title);
            if let Some(r) = answering.nth(asked) {
                break r.at;
            }
            anyhow::ensure!(Instant::now() < deadline, "task {id} never asked the model");
            if prompted.is_none() && Instant::now() >= next_read {
                next_read = Instant::now() + Duration::from_millis(50);
                if rt.block_on(task_state(&srv, &id))? != "starting" {
                    prompted = Some(Instant::now());
                }
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        task_ms.push(first.duration_since(t).as_secs_f64() * 1000.0);
        let prompted = prompted.unwrap_or(first).min(first);
        setup_ms.push(prompted.duration_since(t).as_secs_f64() * 1000.0);
        opencode_ms.push(first.duration_since(prompted).as_secs_f64() * 1000.0);
        cli(&srv, &["task", "cancel", &id])?;
        eprintln!(
            "run {}: spawn {:.0} ms, task start to first model request {:.0} ms \
             (prompt sent after {:.0} ms, then {:.0} ms in OpenCode)",
            i + 1,
            spawn_ms[i],
            task_ms[i],
            setup_ms[i],
            opencode_ms[i]
        );
    }
    let (s, k) = (median(&spawn_ms), median(&task_ms));
    println!(
        "bench-task ({} runs, prebuild built in {prebuild_s:.1} s)",
        args.runs
    );
    println!("  spawn from the prebuild → agent ready     median {s:>8.0} ms  {spawn_ms:.0?}");
    println!("  task start → first model request          median {k:>8.0} ms  {task_ms:.0?}");
    println!(
        "    of which: start → prompt sent (manager) median {:>8.0} ms  {setup_ms:.0?}",
        median(&setup_ms)
    );
    println!(
        "              prompt → request (OpenCode)  median {:>8.0} ms  {opencode_ms:.0?}",
        median(&opencode_ms)
    );
    println!(
        "  ratio task / spawn                        {:>8.2}×  (goal ≤ 1.5×)",
        k / s
    );
    drop(dns);
    drop(model);
    Ok(0)
}

#[cfg(test)]
mod tests {
    #[test]
    fn median_of_even_and_odd() {
        assert_eq!(super::median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(super::median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
    }
}
