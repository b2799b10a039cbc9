//! Dev commands: long-running commands (dev servers, watchers) the agent supervises.
//!
//! The host starts one with [`crate::HostMessage::DevStart`] and a [`DevSpec`]; the agent
//! runs `/bin/sh -c COMMAND` in its own process group, appends its stdout and stderr to
//! a rotated log file, restarts it per [`RestartPolicy`] and reports [`DevStatus`].

use serde::{Deserialize, Serialize};

/// Longest dev command name.
pub const DEV_NAME_MAX: usize = 30;

/// The rule of [`valid_dev_name`] as a regular expression (ECMA 262 and Rust `regex`
/// syntax), for API schemas.
pub const DEV_NAME_PATTERN: &str = "^[a-z][a-z0-9-]{0,29}$";

/// What the agent does when a dev command exits on its own (not by `DevStop`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum RestartPolicy {
    /// Restart after every exit, successful or not.
    Always,
    /// Restart after a non-zero exit code or a death by signal.
    #[default]
    OnFailure,
    /// Never restart.
    Never,
}

impl RestartPolicy {
    /// The policy's name as text (`always`, `on-failure`, `never`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Always => "always",
            Self::OnFailure => "on-failure",
            Self::Never => "never",
        }
    }
}

/// A dev command to run (see the module docs).
///
/// `Debug` prints the names of `env` but never its values: they may hold secrets.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DevSpec {
    /// 1 to [`DEV_NAME_MAX`] characters of `[a-z0-9-]`, starting with a letter; also
    /// names the log file (`/var/log/atelier/dev/NAME.log`).
    pub name: String,
    /// Shell command line, run with `/bin/sh -c`.
    pub command: String,
    /// Working directory (absolute, must exist); `/` when `None`.
    pub cwd: Option<String>,
    /// Variables set on top of the agent's environment.
    pub env: Vec<(String, String)>,
    /// TCP port the command serves on; [`DevStatus::listening`] reports whether it listens.
    pub port: Option<u16>,
    /// Restart policy.
    pub restart: RestartPolicy,
}

impl std::fmt::Debug for DevSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let env_names: Vec<&str> = self.env.iter().map(|(k, _)| k.as_str()).collect();
        f.debug_struct("DevSpec")
            .field("name", &self.name)
            .field("command", &self.command)
            .field("cwd", &self.cwd)
            .field("env_names", &env_names)
            .field("port", &self.port)
            .field("restart", &self.restart)
            .finish()
    }
}

impl DevSpec {
    /// `command` as dev command `name`, with no extra env, cwd `/`, no port, `OnFailure`.
    pub fn new(name: impl Into<String>, command: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            command: command.into(),
            cwd: None,
            env: Vec::new(),
            port: None,
            restart: RestartPolicy::default(),
        }
    }

    /// Adds an environment variable.
    pub fn env(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    /// Sets the working directory.
    pub fn cwd(mut self, cwd: impl Into<String>) -> Self {
        self.cwd = Some(cwd.into());
        self
    }

    /// Sets the port the command listens on.
    pub fn port(mut self, port: u16) -> Self {
        self.port = Some(port);
        self
    }

    /// Sets the restart policy.
    pub fn restart(mut self, restart: RestartPolicy) -> Self {
        self.restart = restart;
        self
    }

    /// Checks the fields that do not depend on the guest (the agent also checks that
    /// `cwd` exists). The message names the offending field, never an env value.
    pub fn validate(&self) -> Result<(), String> {
        if !valid_dev_name(&self.name) {
            return Err(format!(
                "invalid dev command name {:?}: use 1 to {DEV_NAME_MAX} characters of \
                 [a-z0-9-], starting with a letter",
                self.name
            ));
        }
        if self.command.trim().is_empty() || self.command.contains('\0') {
            return Err(format!(
                "dev command {}: the command must be non-empty and contain no NUL byte",
                self.name
            ));
        }
        if let Some(cwd) = &self.cwd
            && (!cwd.starts_with('/') || cwd.contains('\0'))
        {
            return Err(format!(
                "dev command {}: cwd {cwd:?} must be an absolute path",
                self.name
            ));
        }
        for (key, value) in &self.env {
            if key.is_empty() || key.contains(['=', '\0']) {
                return Err(format!(
                    "dev command {}: invalid environment variable name {key:?}",
                    self.name
                ));
            }
            if value.contains('\0') {
                return Err(format!(
                    "dev command {}: the value of {key} contains a NUL byte",
                    self.name
                ));
            }
        }
        if self.port == Some(0) {
            return Err(format!("dev command {}: port 0 is not a port", self.name));
        }
        Ok(())
    }
}

/// Whether `name` is a valid dev command name (see [`DevSpec::name`]).
pub fn valid_dev_name(name: &str) -> bool {
    let bytes = name.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= DEV_NAME_MAX
        && bytes[0].is_ascii_lowercase()
        && bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
}

/// Lifecycle state of a dev command.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum DevState {
    /// Running, but its `port` does not listen yet.
    Starting,
    /// Running (and listening, when it has a `port`).
    Running,
    /// Exited; waiting out the back-off before the next start.
    Restarting,
    /// Exited with code 0 and its policy does not restart it.
    Exited,
    /// Stopped by `DevStop` (or the start of its replacement is pending).
    Stopped,
    /// Exited unsuccessfully (or could not be spawned) and its policy does not restart it.
    Failed,
}

impl DevState {
    /// The state's name as text (`starting`, `running`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Starting => "starting",
            Self::Running => "running",
            Self::Restarting => "restarting",
            Self::Exited => "exited",
            Self::Stopped => "stopped",
            Self::Failed => "failed",
        }
    }
}

/// Status of one dev command, as listed by `DevList`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DevStatus {
    /// Its name.
    pub name: String,
    /// Its command line.
    pub command: String,
    /// The port it serves on, if any.
    pub port: Option<u16>,
    /// Lifecycle state.
    pub state: DevState,
    /// Pid of the running shell (leader of the process group), if running.
    pub pid: Option<u32>,
    /// Times the agent restarted it after an exit (policy restarts only).
    pub restarts: u32,
    /// How the last run ended: the exit code, or minus the signal number.
    pub last_exit: Option<i32>,
    /// Whether some socket in the guest listens on `port` (TCP, IPv4 or IPv6).
    pub listening: bool,
    /// Seconds the current run has been up (0 when not running).
    pub uptime_secs: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for ok in ["web", "a", "api-2", &"a".repeat(DEV_NAME_MAX)] {
            assert!(valid_dev_name(ok), "{ok}");
        }
        for bad in [
            "",
            "2web",
            "-x",
            "Web",
            "we b",
            "we_b",
            "é",
            &"a".repeat(31),
        ] {
            assert!(!valid_dev_name(bad), "{bad}");
        }
    }

    #[test]
    fn validation() {
        assert!(DevSpec::new("web", "npm run dev").validate().is_ok());
        assert!(DevSpec::new("Web", "x").validate().is_err());
        assert!(DevSpec::new("web", "  ").validate().is_err());
        assert!(DevSpec::new("web", "x").cwd("rel").validate().is_err());
        assert!(DevSpec::new("web", "x").env("A=B", "v").validate().is_err());
        assert!(DevSpec::new("web", "x").env("", "v").validate().is_err());
        assert!(DevSpec::new("web", "x").port(0).validate().is_err());
        let err = DevSpec::new("web", "x")
            .env("TOKEN", "sec\0ret")
            .validate()
            .expect_err("nul");
        assert!(!err.contains("sec"), "{err}");
    }

    #[test]
    fn debug_hides_env_values() {
        let spec = DevSpec::new("web", "run").env("API_TOKEN", "hunter2");
        let text = format!("{spec:?}");
        assert!(text.contains("API_TOKEN"), "{text}");
        assert!(!text.contains("hunter2"), "{text}");
    }
}
