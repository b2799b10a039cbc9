//! `atelier-agent`: the guest agent of an Atelier sandbox VM.
//!
//! As PID 1 (`init` mode, chosen when getpid() == 1) it sets the system up (mounts,
//! hostname, loopback), supervises the worker (`atelier-agent serve`), reaps zombies
//! and powers off cleanly on SIGTERM/SIGINT. The worker serves the control channel
//! (`atelier-agent-proto`) on the virtio-serial port named [`PORT_NAME`]: exec, files,
//! interactive PTY sessions (`pty`), supervised dev commands (`dev`, `devlog`), the
//! guest's network setup (`net`), TCP streams to guest ports (`tcp`), metrics, shutdown.
//!
//! Build (static, no NSS/dlopen; `ldd` reports "statically linked"):
//! `RUSTFLAGS="-C target-feature=+crt-static" cargo build --release --target x86_64-unknown-linux-gnu -p atelier-agent`
//!
//! It is linked statically and must stay small: it depends only on the protocol crate,
//! tokio, futures, rustix, libc and rtnetlink (netlink sockets, no iproute2), and
//! nothing that needs NSS or dlopen.
//!
//! [`PORT_NAME`]: atelier_agent_proto::PORT_NAME

#[macro_use]
mod log;
mod dev;
mod devlog;
mod exec;
mod files;
mod init;
mod metrics;
mod net;
mod paths;
mod pty;
mod serve;
mod sys;
mod tcp;
mod transport;

use std::path::PathBuf;
use std::process::ExitCode;

use transport::Endpoint;

const USAGE: &str =
    "usage: atelier-agent [init | serve [--port PATH | --connect-unix PATH] | --version]

  init                 act as PID 1 (automatic when the process is PID 1)
  serve                serve the control channel on the virtio-serial port
    --port PATH        use this character device instead of searching by name
    --connect-unix P   connect to a unix socket instead (host-side tests)";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if rustix::process::getpid().is_init() {
        init::run();
    }
    match parse(&args) {
        Ok(Command::Serve(endpoint)) => match serve::run(endpoint) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                log!("serve failed: {e}");
                ExitCode::FAILURE
            }
        },
        Ok(Command::Version) => {
            log!("version {}", env!("CARGO_PKG_VERSION"));
            ExitCode::SUCCESS
        }
        Ok(Command::Init) => {
            log!("init mode requires running as PID 1");
            ExitCode::FAILURE
        }
        Err(e) => {
            log!("{e}\n{USAGE}");
            ExitCode::from(2)
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Command {
    Init,
    Serve(Endpoint),
    Version,
}

fn parse(args: &[String]) -> Result<Command, String> {
    let mut it = args.iter().map(String::as_str);
    match it.next() {
        Some("init") => Ok(Command::Init),
        Some("--version") | Some("-V") => Ok(Command::Version),
        Some("serve") => {
            let mut endpoint = Endpoint::Discover;
            while let Some(arg) = it.next() {
                let mut value = || {
                    it.next()
                        .map(PathBuf::from)
                        .ok_or_else(|| format!("{arg} needs a path"))
                };
                endpoint = match arg {
                    "--port" => Endpoint::Port(value()?),
                    "--connect-unix" => Endpoint::Unix(value()?),
                    other => return Err(format!("unknown serve option {other:?}")),
                };
            }
            Ok(Command::Serve(endpoint))
        }
        Some(other) => Err(format!("unknown command {other:?}")),
        None => Err("missing command".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &[&str]) -> Vec<String> {
        s.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn parses_commands() {
        assert_eq!(
            parse(&args(&["serve"])),
            Ok(Command::Serve(Endpoint::Discover))
        );
        assert_eq!(
            parse(&args(&["serve", "--port", "/dev/vport0p1"])),
            Ok(Command::Serve(Endpoint::Port("/dev/vport0p1".into())))
        );
        assert_eq!(
            parse(&args(&["serve", "--connect-unix", "/tmp/s"])),
            Ok(Command::Serve(Endpoint::Unix("/tmp/s".into())))
        );
        assert!(parse(&args(&["serve", "--port"])).is_err());
        assert!(parse(&args(&["serve", "--bogus"])).is_err());
        assert!(parse(&args(&["nope"])).is_err());
        assert!(parse(&args(&[])).is_err());
        assert_eq!(parse(&args(&["init"])), Ok(Command::Init));
    }
}
