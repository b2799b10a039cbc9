//! Running host tools with errors that name the step, the command and its output tail.

use std::collections::VecDeque;
use std::ffi::OsStr;
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Mutex;

use crate::{ImageError, Step};

/// How many output lines an error carries.
const TAIL_LINES: usize = 15;

/// Finds `tool` in PATH (plus the sbin directories root's PATH usually has).
pub(crate) fn require_tool(step: Step, tool: &str, package: &str) -> Result<PathBuf, ImageError> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let extra = ["/usr/local/sbin", "/usr/sbin", "/sbin", "/usr/bin", "/bin"];
    std::env::split_paths(&path)
        .chain(extra.iter().map(PathBuf::from))
        .map(|d| d.join(tool))
        .find(|p| p.is_file())
        .ok_or_else(|| ImageError::MissingTool {
            step,
            tool: tool.to_string(),
            package: package.to_string(),
        })
}

/// Renders a command line for messages.
pub(crate) fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

fn tail(text: &[u8]) -> String {
    let text = String::from_utf8_lossy(text);
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(TAIL_LINES)..].join("\n")
}

/// Runs a command to completion, capturing its output; a failure status is an error.
pub(crate) fn run(step: Step, cmd: &mut Command) -> Result<Output, ImageError> {
    let command = describe(cmd);
    tracing::debug!(%step, command, "running");
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|source| ImageError::Spawn {
            step,
            command: command.clone(),
            source,
        })?;
    if !out.status.success() {
        let mut all = out.stderr.clone();
        if all.iter().all(u8::is_ascii_whitespace) {
            all = out.stdout.clone();
        }
        return Err(ImageError::Command {
            step,
            command,
            status: out.status.to_string(),
            stderr_tail: tail(&all),
            log: None,
        });
    }
    Ok(out)
}

/// Runs a command, appending stdout and stderr to `log` line by line and calling
/// `on_line` with each line; a failure status is an error carrying the last lines.
pub(crate) fn run_logged(
    step: Step,
    cmd: &mut Command,
    log: &Path,
    on_line: &(dyn Fn(&str) + Sync),
) -> Result<(), ImageError> {
    let command = describe(cmd);
    tracing::debug!(%step, command, log = %log.display(), "running");
    let file = File::create(log).map_err(crate::error::io_err(step, "create log file", log))?;
    let file = Mutex::new(file);
    let recent: Mutex<VecDeque<String>> = Mutex::new(VecDeque::new());
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| ImageError::Spawn {
            step,
            command: command.clone(),
            source,
        })?;
    let stdout = child.stdout.take();
    let stderr = child.stderr.take();
    let pump = |r: Box<dyn Read + Send>| {
        for line in BufReader::new(r).split(b'\n') {
            let Ok(line) = line else { break };
            let line = String::from_utf8_lossy(&line).trim_end().to_string();
            if let Ok(mut f) = file.lock() {
                let _ = writeln!(f, "{line}");
            }
            if line.is_empty() {
                continue;
            }
            on_line(&line);
            if let Ok(mut r) = recent.lock() {
                if r.len() == TAIL_LINES {
                    r.pop_front();
                }
                r.push_back(line);
            }
        }
    };
    let status = std::thread::scope(|s| {
        if let Some(o) = stdout {
            s.spawn(|| pump(Box::new(o)));
        }
        if let Some(e) = stderr {
            s.spawn(|| pump(Box::new(e)));
        }
        child.wait()
    })
    .map_err(|source| ImageError::Spawn {
        step,
        command: command.clone(),
        source,
    })?;
    if !status.success() {
        let tail = recent
            .into_inner()
            .map(|r| Vec::from(r).join("\n"))
            .unwrap_or_default();
        return Err(ImageError::Command {
            step,
            command,
            status: status.to_string(),
            stderr_tail: tail,
            log: Some(log.to_path_buf()),
        });
    }
    Ok(())
}

/// Builds a `Command` from a program and arguments.
pub(crate) fn command<I, S>(program: impl AsRef<OsStr>, args: I) -> Command
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let mut c = Command::new(program);
    c.args(args);
    c
}
