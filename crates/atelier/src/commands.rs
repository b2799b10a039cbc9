//! Client subcommands: `sandbox …`, `image …`, `status`.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use atelier_core::ErrorKind;
use atelier_server::api::{ExecBody, ExecEventView, SandboxView, StatusView};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use clap::Subcommand;
use futures::StreamExt;
use reqwest::Method;
use serde_json::json;

use crate::Global;
use crate::client::{CliError, Client, decode};

/// `atelier sandbox …`
#[derive(Subcommand, Debug)]
pub enum SandboxCmd {
    /// Create a sandbox and wait until its agent is ready.
    Create {
        /// Unique name (a-z, 0-9, '-'; starts with a letter).
        #[arg(long)]
        name: String,
        /// Image to boot.
        #[arg(long, default_value = "minimal")]
        image: String,
        /// Virtual CPUs (1-8).
        #[arg(long, default_value_t = 1)]
        vcpus: u32,
        /// Memory in MiB (512-16384).
        #[arg(long, default_value_t = 1024)]
        memory: u32,
        /// Return at once instead of waiting for the agent.
        #[arg(long)]
        no_wait: bool,
        /// Share a host folder: HOST:GUEST[:ro] (repeatable). It must be under the manager's
        /// share roots (default /home) and owned by a regular user: the VM runs as that
        /// user, so files the guest writes belong to the folder's owner.
        #[arg(long = "mount")]
        mounts: Vec<String>,
        /// Boot the kernel even when a memory snapshot could be restored.
        #[arg(long)]
        cold: bool,
        /// What the guest may reach: allow-all, deny-all, or allowed domains
        /// (comma-separated; `*.example.org` allows every name under it).
        #[arg(long, default_value = "allow-all")]
        egress: atelier_core::EgressPolicy,
        /// Spawn from this workspace's newest ready prebuild (its image, shape and
        /// egress policy apply).
        #[arg(long)]
        workspace: Option<String>,
    },
    /// List sandboxes.
    #[command(alias = "ls")]
    List,
    /// Show one sandbox.
    Show {
        /// Id or name.
        sandbox: String,
    },
    /// Run a command; output streams live; exits with the command's exit code.
    Exec {
        /// Id or name.
        sandbox: String,
        /// Extra environment, KEY=VALUE (repeatable).
        #[arg(short, long = "env")]
        env: Vec<String>,
        /// Working directory in the guest.
        #[arg(short = 'w', long)]
        cwd: Option<String>,
        /// Kill the command after this many seconds.
        #[arg(long)]
        timeout: Option<u64>,
        /// Send this process's stdin to the command.
        #[arg(short, long)]
        interactive: bool,
        /// The command and its arguments (after `--`).
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// Copy a file in or out: `cp ./f demo:/root/f` or `cp demo:/root/f ./f`.
    Cp {
        /// Source: a local path or SANDBOX:/path.
        src: String,
        /// Destination: a local path or SANDBOX:/path.
        dest: String,
    },
    /// Print the guest console log (kernel and agent).
    Logs {
        /// Id or name.
        sandbox: String,
        /// Keep printing new output.
        #[arg(short, long)]
        follow: bool,
    },
    /// Stop a running sandbox (the disk is kept).
    Stop {
        /// Id or name.
        sandbox: String,
    },
    /// Pause a running sandbox: its memory goes to disk and host RAM is freed.
    Pause {
        /// Id or name.
        sandbox: String,
    },
    /// Resume a paused sandbox where it was.
    Resume {
        /// Id or name.
        sandbox: String,
    },
    /// Fork a running sandbox into a new one continuing from the same memory and disk.
    Fork {
        /// Id or name of the running sandbox.
        sandbox: String,
        /// Name of the new sandbox.
        #[arg(long)]
        name: String,
    },
    /// Start a stopped or failed sandbox.
    Start {
        /// Id or name.
        sandbox: String,
        /// Return at once instead of waiting for the agent.
        #[arg(long)]
        no_wait: bool,
    },
    /// Delete a sandbox and everything it holds.
    #[command(alias = "delete")]
    Rm {
        /// Ids or names.
        #[arg(required = true)]
        sandboxes: Vec<String>,
    },
}

/// `atelier image …`
#[derive(Subcommand, Debug)]
pub enum ImageCmd {
    /// Build an image (cached by content hash; rebuilt only when inputs change).
    Build {
        /// Recipe name: `minimal` (tests), `dev-base` (git, build tools, Node 22, Bun, Python 3, OpenCode) or `agents` (dev-base + Claude Code, Gemini CLI, gh).
        name: String,
        /// Rebuild even if cached.
        #[arg(long)]
        force: bool,
        /// The static guest agent binary (default: `atelier-agent` beside this binary).
        #[arg(long, env = "ATELIER_AGENT_BIN")]
        agent: Option<PathBuf>,
        /// Download cache (debootstrap, kernel packages).
        #[arg(long, env = "ATELIER_CACHE_DIR", default_value = "/var/cache/atelier")]
        cache_dir: PathBuf,
    },
    /// List built images.
    #[command(alias = "ls")]
    List,
}

fn print_json<T: serde::Serialize>(v: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

fn print_sandbox(g: &Global, s: &SandboxView) -> anyhow::Result<()> {
    if g.json {
        return print_json(s);
    }
    println!("id:       {}", s.id);
    println!("name:     {}", s.name);
    println!(
        "state:    {}",
        serde_json::to_value(s.state)?.as_str().unwrap_or("?")
    );
    println!("image:    {}", s.image);
    println!("vcpus:    {}", s.vcpus);
    println!("memory:   {} MiB", s.memory_mib);
    if let Some(ms) = s.boot_ms {
        println!("ready in: {:.2} s", ms as f64 / 1000.0);
    }
    if let Some(a) = &s.agent {
        println!("agent:    {a} ({} restarts)", s.agent_restarts.unwrap_or(0));
    }
    if let Some(e) = &s.error {
        println!("error:    {e}");
    }
    println!("egress:   {}", s.egress);
    if let Some(ip) = &s.ip {
        println!("ip:       {ip}");
    }
    if let Some(u) = &s.url {
        println!("url:      {u}");
    }
    println!("created:  {}", s.created_at);
    Ok(())
}

fn state_str(s: &SandboxView) -> String {
    serde_json::to_value(s.state)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default()
}

pub(crate) use atelier_client::enc;

/// Runs a `sandbox` subcommand.
pub async fn sandbox(g: &Global, cmd: SandboxCmd) -> anyhow::Result<u8> {
    let c = Client::new(g)?;
    match cmd {
        SandboxCmd::Create {
            name,
            image,
            vcpus,
            memory,
            no_wait,
            mounts,
            cold,
            egress,
            workspace,
        } => {
            let mounts = mounts
                .iter()
                .map(|m| crate::shell::parse_mount(m))
                .collect::<anyhow::Result<Vec<_>>>()?;
            let owner = crate::shell::owner();
            if let Some(w) = &workspace
                && !g.json
                && !no_wait
            {
                crate::prebuild::ensure_ready(&c, w).await?;
            }
            let t = Instant::now();
            if !g.json && !no_wait {
                eprintln!("creating sandbox {name} ({image}, {vcpus} vCPU, {memory} MiB)…");
            }
            let rb = c
                .request(
                    Method::POST,
                    &format!("/api/v1/sandboxes?wait={}", !no_wait),
                )
                .json(
                    &json!({ "name": name, "image": image, "vcpus": vcpus, "memory_mib": memory,
                    "mounts": mounts, "mount_owner": owner, "cold_boot": cold, "egress": egress, "workspace": workspace }),
                );
            let s: SandboxView = decode(c.send(rb).await?).await?;
            if g.json {
                print_json(&s)?;
            } else {
                println!(
                    "{}  {}  {}  ready in {:.2} s",
                    s.id,
                    s.name,
                    state_str(&s),
                    t.elapsed().as_secs_f64()
                );
            }
            Ok(0)
        }
        SandboxCmd::List => {
            let list: Vec<SandboxView> = c.get_json("/api/v1/sandboxes").await?;
            if g.json {
                return print_json(&list).map(|_| 0);
            }
            println!(
                "{:<14} {:<20} {:<9} {:<9} {:>5} {:>7}  CREATED",
                "ID", "NAME", "STATE", "IMAGE", "VCPU", "MEM"
            );
            for s in list {
                println!(
                    "{:<14} {:<20} {:<9} {:<9} {:>5} {:>7}  {}",
                    s.id,
                    s.name,
                    state_str(&s),
                    s.image,
                    s.vcpus,
                    format!("{}M", s.memory_mib),
                    s.created_at
                );
            }
            Ok(0)
        }
        SandboxCmd::Show { sandbox } => {
            let s: SandboxView = c
                .get_json(&format!("/api/v1/sandboxes/{}", enc(&sandbox)))
                .await?;
            print_sandbox(g, &s)?;
            Ok(0)
        }
        SandboxCmd::Exec {
            sandbox,
            env,
            cwd,
            timeout,
            interactive,
            command,
        } => exec(&c, &sandbox, env, cwd, timeout, interactive, command).await,
        SandboxCmd::Cp { src, dest } => cp(g, &c, &src, &dest).await,
        SandboxCmd::Logs { sandbox, follow } => {
            let mut seen = 0usize;
            loop {
                let resp = c
                    .send(c.request(
                        Method::GET,
                        &format!(
                            "/api/v1/sandboxes/{}/logs?tail_bytes={}",
                            enc(&sandbox),
                            64 << 20
                        ),
                    ))
                    .await?;
                let body = resp.bytes().await.context("reading logs")?;
                if body.len() > seen {
                    std::io::stdout().write_all(&body[seen..])?;
                    std::io::stdout().flush()?;
                }
                seen = body.len();
                if !follow {
                    return Ok(0);
                }
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
            }
        }
        SandboxCmd::Stop { sandbox } => {
            let s: SandboxView = decode(
                c.send(c.request(
                    Method::POST,
                    &format!("/api/v1/sandboxes/{}/stop", enc(&sandbox)),
                ))
                .await?,
            )
            .await?;
            if g.json {
                print_json(&s)?
            } else {
                println!("{}  {}  {}", s.id, s.name, state_str(&s))
            }
            // A hung guest or QEMU was stopped by force; say how.
            if let Some(why) = &s.error {
                eprintln!("warning: {why}");
            }
            Ok(0)
        }
        SandboxCmd::Pause { sandbox } => verb(g, &c, &sandbox, "pause").await,
        SandboxCmd::Resume { sandbox } => verb(g, &c, &sandbox, "resume").await,
        SandboxCmd::Fork { sandbox, name } => {
            let t = Instant::now();
            let path = format!("/api/v1/sandboxes/{}/fork", enc(&sandbox));
            let rb = c
                .request(Method::POST, &path)
                .json(&json!({ "name": name }));
            let s: SandboxView = decode(c.send(rb).await?).await?;
            if g.json {
                print_json(&s)?
            } else {
                println!(
                    "{}  {}  {}  forked in {:.2} s",
                    s.id,
                    s.name,
                    state_str(&s),
                    t.elapsed().as_secs_f64()
                )
            }
            Ok(0)
        }
        SandboxCmd::Start { sandbox, no_wait } => {
            let t = Instant::now();
            let path = format!(
                "/api/v1/sandboxes/{}/start?wait={}",
                enc(&sandbox),
                !no_wait
            );
            let s: SandboxView = decode(c.send(c.request(Method::POST, &path)).await?).await?;
            if g.json {
                print_json(&s)?
            } else {
                println!(
                    "{}  {}  {}  ready in {:.2} s",
                    s.id,
                    s.name,
                    state_str(&s),
                    t.elapsed().as_secs_f64()
                )
            }
            Ok(0)
        }
        SandboxCmd::Rm { sandboxes } => {
            let mut code = 0;
            for sb in sandboxes {
                match c
                    .send(c.request(Method::DELETE, &format!("/api/v1/sandboxes/{}", enc(&sb))))
                    .await
                {
                    Ok(resp) => {
                        let s: SandboxView = decode(resp).await?;
                        if g.json {
                            print_json(&s)?
                        } else {
                            println!("{}  {}  deleted", s.id, s.name)
                        }
                    }
                    Err(e) => {
                        eprintln!("error: {sb}: {e:#}");
                        code = e
                            .downcast_ref::<CliError>()
                            .map(|c| c.kind.exit_code())
                            .unwrap_or(1) as u8;
                    }
                }
            }
            Ok(code)
        }
    }
}

/// POSTs `/sandboxes/{id}/{verb}` and prints the result with the time it took.
async fn verb(g: &Global, c: &Client, sandbox: &str, verb: &str) -> anyhow::Result<u8> {
    let t = Instant::now();
    let path = format!("/api/v1/sandboxes/{}/{verb}", enc(sandbox));
    let s: SandboxView = decode(c.send(c.request(Method::POST, &path)).await?).await?;
    if g.json {
        print_json(&s)?
    } else {
        println!(
            "{}  {}  {}  in {:.2} s",
            s.id,
            s.name,
            state_str(&s),
            t.elapsed().as_secs_f64()
        )
    }
    Ok(0)
}

async fn exec(
    c: &Client,
    sandbox: &str,
    env: Vec<String>,
    cwd: Option<String>,
    timeout: Option<u64>,
    interactive: bool,
    command: Vec<String>,
) -> anyhow::Result<u8> {
    let mut envs = std::collections::BTreeMap::new();
    for kv in env {
        let (k, v) = kv.split_once('=').ok_or_else(|| {
            CliError::error(
                ErrorKind::Invalid,
                format!("--env {kv:?} must be KEY=VALUE"),
            )
        })?;
        envs.insert(k.to_owned(), v.to_owned());
    }
    let stdin = if interactive {
        use tokio::io::AsyncReadExt;
        let mut buf = Vec::new();
        tokio::io::stdin()
            .read_to_end(&mut buf)
            .await
            .context("reading stdin")?;
        Some(B64.encode(buf))
    } else {
        None
    };
    let body = ExecBody {
        command,
        env: envs,
        cwd,
        timeout_secs: timeout,
        stdin,
    };
    let resp = c
        .send(
            c.request(
                Method::POST,
                &format!("/api/v1/sandboxes/{}/exec", enc(sandbox)),
            )
            .json(&body),
        )
        .await?;
    let mut stream = resp.bytes_stream();
    let mut buf: Vec<u8> = Vec::new();
    let mut out = std::io::stdout();
    let mut err = std::io::stderr();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| {
            CliError::error(ErrorKind::Unavailable, format!("exec stream broke: {e}"))
        })?;
        buf.extend_from_slice(&chunk);
        while let Some(pos) = buf.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = buf.drain(..=pos).collect();
            let ev: ExecEventView = serde_json::from_slice(&line).map_err(|e| {
                CliError::error(ErrorKind::Internal, format!("bad exec event: {e}"))
            })?;
            match ev {
                ExecEventView::Started { .. } => {}
                ExecEventView::Stdout { data } => {
                    out.write_all(&B64.decode(data)?)?;
                    out.flush()?;
                }
                ExecEventView::Stderr { data } => {
                    err.write_all(&B64.decode(data)?)?;
                    err.flush()?;
                }
                ExecEventView::Exit {
                    code,
                    signal,
                    timed_out,
                } => {
                    if timed_out {
                        eprintln!("atelier: command timed out and was killed");
                    }
                    return Ok(crate::client::exit_status(code, signal));
                }
                ExecEventView::Error { message } => {
                    return Err(CliError::error(
                        ErrorKind::Unavailable,
                        format!("exec failed: {message}"),
                    ));
                }
            }
        }
    }
    Err(CliError::error(
        ErrorKind::Unavailable,
        "exec stream ended without an exit status",
    ))
}

/// Splits `SANDBOX:/path` into its parts; a local path has no such prefix.
fn remote(spec: &str) -> Option<(&str, &str)> {
    let (name, path) = spec.split_once(':')?;
    (!name.is_empty() && !name.contains('/') && path.starts_with('/')).then_some((name, path))
}

async fn cp(g: &Global, c: &Client, src: &str, dest: &str) -> anyhow::Result<u8> {
    let t = Instant::now();
    let bytes = match (remote(src), remote(dest)) {
        (None, Some((sb, path))) => {
            let meta = std::fs::metadata(src).with_context(|| format!("cannot read {src}"))?;
            use std::os::unix::fs::PermissionsExt;
            let mode = meta.permissions().mode() & 0o7777;
            let file = tokio::fs::File::open(src)
                .await
                .with_context(|| format!("cannot open {src}"))?;
            let body = reqwest::Body::wrap_stream(tokio_util::io::ReaderStream::new(file));
            let url = format!(
                "/api/v1/sandboxes/{}/files?path={}&mode={:o}",
                enc(sb),
                enc(path),
                mode
            );
            c.send(c.request(Method::PUT, &url).body(body)).await?;
            meta.len()
        }
        (Some((sb, path)), None) => {
            let url = format!("/api/v1/sandboxes/{}/files?path={}", enc(sb), enc(path));
            let resp = c.send(c.request(Method::GET, &url)).await?;
            let tmp = format!("{dest}.atelier-partial");
            let mut f = tokio::fs::File::create(&tmp)
                .await
                .with_context(|| format!("cannot create {tmp}"))?;
            let mut stream = resp.bytes_stream();
            let mut n = 0u64;
            let res: anyhow::Result<()> = async {
                use tokio::io::AsyncWriteExt;
                while let Some(chunk) = stream.next().await {
                    let chunk = chunk.map_err(|e| {
                        CliError::error(ErrorKind::Unavailable, format!("download broke: {e}"))
                    })?;
                    n += chunk.len() as u64;
                    f.write_all(&chunk).await?;
                }
                f.flush().await?;
                Ok(())
            }
            .await;
            if let Err(e) = res {
                let _ = tokio::fs::remove_file(&tmp).await;
                return Err(e);
            }
            tokio::fs::rename(&tmp, dest)
                .await
                .with_context(|| format!("cannot write {dest}"))?;
            n
        }
        _ => {
            return Err(CliError::error(
                ErrorKind::Invalid,
                "exactly one of SRC and DEST must be SANDBOX:/absolute/path",
            ));
        }
    };
    if !g.json {
        let s = t.elapsed().as_secs_f64();
        eprintln!(
            "copied {bytes} bytes in {s:.2} s ({:.1} MB/s)",
            bytes as f64 / 1e6 / s.max(1e-9)
        );
    }
    Ok(0)
}

/// Runs an `image` subcommand (locally).
pub async fn image(g: &Global, cmd: ImageCmd) -> anyhow::Result<u8> {
    let images_dir = g.images_dir();
    match cmd {
        ImageCmd::Build {
            name,
            force,
            agent,
            cache_dir,
        } => {
            let agent = match agent {
                Some(a) => a,
                None => crate::default_agent_binary()
                    .ok_or_else(|| {
                        CliError::error(
                            ErrorKind::Invalid,
                            "no atelier-agent binary beside atelier; pass --agent PATH (build it with scripts/build-agent.sh)",
                        )
                    })?,
            };
            let mut opts = atelier_image::BuildOptions::new(&name, &images_dir, &cache_dir, &agent);
            opts.force = force;
            opts.progress = if g.json {
                Arc::new(atelier_image::TracingProgress)
            } else {
                atelier_image::indicatif_progress()
            };
            let img = tokio::task::spawn_blocking(move || atelier_image::build(&opts))
                .await?
                .map_err(|e| CliError::error(ErrorKind::Internal, e.to_string()))?;
            if g.json {
                print_json(&img.manifest)?;
            } else {
                println!(
                    "{}  {}  kernel {}  {}",
                    img.manifest.name,
                    img.manifest.hash,
                    img.manifest.kernel_release,
                    img.dir.display()
                );
            }
            Ok(0)
        }
        ImageCmd::List => {
            let list = atelier_image::list(&images_dir)
                .map_err(|e| CliError::error(ErrorKind::Internal, e.to_string()))?;
            if g.json {
                let v: Vec<_> = list.iter().map(|i| &i.manifest).collect();
                return print_json(&v).map(|_| 0);
            }
            println!(
                "{:<10} {:<13} {:<22} {:>9}  CREATED",
                "NAME", "HASH", "KERNEL", "ROOTFS"
            );
            for i in list {
                let m = &i.manifest;
                println!(
                    "{:<10} {:<13} {:<22} {:>8}M  {}",
                    m.name,
                    m.hash,
                    m.kernel_release,
                    m.rootfs_size_bytes >> 20,
                    m.created
                );
            }
            Ok(0)
        }
    }
}

/// `atelier status`.
pub async fn status(g: &Global) -> anyhow::Result<u8> {
    let c = Client::new(g)?;
    let s: StatusView = c.get_json("/api/v1/status").await?;
    if g.json {
        return print_json(&s).map(|_| 0);
    }
    println!(
        "manager:   ok (version {}, up {} s)",
        s.version, s.uptime_secs
    );
    println!(
        "accel:     {}{}",
        s.accel,
        s.accel_reason
            .map(|r| format!(" ({r})"))
            .unwrap_or_default()
    );
    println!("qemu:      {}", s.qemu_version);
    println!(
        "storage:   {} ({} GiB free)",
        s.storage_backend,
        s.storage_free_bytes >> 30
    );
    println!(
        "images:    {}",
        if s.images.is_empty() {
            "none (run `atelier image build minimal`)".into()
        } else {
            s.images.join(", ")
        }
    );
    let counts: Vec<String> = s
        .sandboxes
        .iter()
        .map(|(k, v)| format!("{v} {k}"))
        .collect();
    println!(
        "sandboxes: {}",
        if counts.is_empty() {
            "none".into()
        } else {
            counts.join(", ")
        }
    );
    println!("data dir:  {}", s.data_dir);
    Ok(0)
}

/// `atelier tls …`
#[derive(clap::Subcommand, Debug)]
pub enum TlsCmd {
    /// Print the local CA certificate (PEM) that signs sandbox URLs when the manager
    /// runs with --https-listen and no certificate of its own. Trust it, e.g.:
    /// `atelier tls ca > atelier-ca.pem && sudo cp atelier-ca.pem /usr/local/share/ca-certificates/atelier.crt && sudo update-ca-certificates`
    Ca,
}

/// Runs `atelier tls …`.
pub async fn tls(g: &Global, cmd: TlsCmd) -> anyhow::Result<u8> {
    let c = Client::new(g)?;
    match cmd {
        TlsCmd::Ca => {
            let pem = c
                .send(c.request(Method::GET, "/api/v1/tls/ca"))
                .await?
                .text()
                .await
                .context("reading the CA certificate")?;
            print!("{pem}");
        }
    }
    Ok(0)
}
