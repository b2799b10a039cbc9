//! Where the worker keeps its files. Inside a VM these are the fixed system paths;
//! host-side tests set `ATELIER_AGENT_ROOT` to move them all under a directory of
//! their own (so parallel agents do not share state and the host's `/etc/resolv.conf`
//! is never touched). Nothing else reads that variable.

use std::path::{Path, PathBuf};

/// Environment variable that prefixes every path below (tests only).
pub const ROOT_ENV: &str = "ATELIER_AGENT_ROOT";

/// The worker's file locations.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Paths {
    /// Dev command logs: `NAME.log`, `NAME.log.1`, `NAME.log.2`.
    pub dev_log_dir: PathBuf,
    /// Process groups of running dev commands (`NAME.pgid`), for a later worker.
    pub dev_run_dir: PathBuf,
    /// The resolver configuration written by `NetConfig`.
    pub resolv_conf: PathBuf,
}

impl Paths {
    /// The paths under `root` (`/` inside a VM).
    pub fn under(root: &Path) -> Self {
        Self {
            dev_log_dir: root.join("var/log/atelier/dev"),
            dev_run_dir: root.join("run/atelier/dev"),
            resolv_conf: root.join("etc/resolv.conf"),
        }
    }

    /// The paths under `$ATELIER_AGENT_ROOT`, or under `/` when it is unset or empty.
    pub fn from_env() -> Self {
        match std::env::var_os(ROOT_ENV) {
            Some(root) if !root.is_empty() => Self::under(Path::new(&root)),
            _ => Self::under(Path::new("/")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn system_paths() {
        let p = Paths::under(Path::new("/"));
        assert_eq!(p.dev_log_dir, Path::new("/var/log/atelier/dev"));
        assert_eq!(p.dev_run_dir, Path::new("/run/atelier/dev"));
        assert_eq!(p.resolv_conf, Path::new("/etc/resolv.conf"));
        assert_eq!(
            Paths::under(Path::new("/tmp/x")).resolv_conf,
            Path::new("/tmp/x/etc/resolv.conf")
        );
    }
}
