//! Thin wrappers over the system calls PID 1 needs (mounts, hostname, loopback,
//! power off) and parsing of the files they read.

use std::path::Path;

use rustix::mount::MountFlags;

/// Default `PATH` given to the worker and the commands it runs.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The value of `key=` on a kernel command line (the last occurrence wins).
pub fn cmdline_param<'a>(cmdline: &'a str, key: &str) -> Option<&'a str> {
    cmdline
        .split_ascii_whitespace()
        .filter_map(|word| word.strip_prefix(key)?.strip_prefix('='))
        .next_back()
}

/// Whether `name` is a valid hostname (RFC 1123 labels, at most 64 bytes).
pub fn valid_hostname(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name.split('.').all(|label| {
            !label.is_empty()
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

/// Mount points listed in a `/proc/self/mountinfo` text (fifth field, unescaped `\040`).
pub fn mount_points(mountinfo: &str) -> Vec<String> {
    mountinfo
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(|p| p.replace("\\040", " "))
        .collect()
}

/// Mounts `fstype` on `target` unless something is mounted there already.
pub fn mount_if_missing(
    source: &str,
    target: &str,
    fstype: &str,
    flags: MountFlags,
    data: &str,
) -> Result<bool, String> {
    let mounted = std::fs::read_to_string("/proc/self/mountinfo")
        .map(|m| mount_points(&m).iter().any(|p| p == target))
        .unwrap_or(false);
    if mounted || (target == "/proc" && Path::new("/proc/self/stat").exists()) {
        return Ok(false);
    }
    std::fs::create_dir_all(target).map_err(|e| format!("creating mount point {target}: {e}"))?;
    let data = std::ffi::CString::new(data).map_err(|e| format!("mount options {data:?}: {e}"))?;
    rustix::mount::mount(source, target, fstype, flags, Some(data.as_c_str()))
        .map_err(|e| format!("mounting {fstype} on {target}: {e}"))?;
    Ok(true)
}

/// Remounts `/` read-write (or read-only when `read_only`).
pub fn remount_root(read_only: bool) -> Result<(), String> {
    let flags = if read_only {
        MountFlags::RDONLY
    } else {
        MountFlags::empty()
    };
    rustix::mount::mount_remount("/", flags, "").map_err(|e| format!("remounting / : {e}"))
}

/// Sets the kernel hostname.
pub fn set_hostname(name: &str) -> Result<(), String> {
    rustix::system::sethostname(name.as_bytes())
        .map_err(|e| format!("setting hostname {name:?}: {e}"))
}

/// Brings the loopback interface up (`SIOCSIFFLAGS` with `IFF_UP`).
#[allow(unsafe_code)]
pub fn loopback_up() -> Result<(), String> {
    use rustix::fd::AsRawFd;
    use rustix::net::{AddressFamily, SocketType};

    let sock = rustix::net::socket(AddressFamily::INET, SocketType::DGRAM, None)
        .map_err(|e| format!("opening a socket to configure lo: {e}"))?;
    let mut ifr = libc::ifreq {
        ifr_name: [0; libc::IFNAMSIZ],
        ifr_ifru: libc::__c_anonymous_ifr_ifru { ifru_flags: 0 },
    };
    ifr.ifr_name[0] = b'l' as libc::c_char;
    ifr.ifr_name[1] = b'o' as libc::c_char;
    // SAFETY: `sock` is an open socket and `ifr` a properly initialised ifreq that
    // outlives the call; SIOCGIFFLAGS only writes `ifr_ifru.ifru_flags`.
    let rc = unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut ifr) };
    if rc != 0 {
        return Err(format!(
            "reading flags of lo: {}",
            std::io::Error::last_os_error()
        ));
    }
    // SAFETY: SIOCGIFFLAGS succeeded, so the flags member of the union is initialised.
    let flags = unsafe { ifr.ifr_ifru.ifru_flags };
    ifr.ifr_ifru.ifru_flags = flags | (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
    // SAFETY: as above; SIOCSIFFLAGS only reads `ifr`.
    let rc = unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &ifr) };
    if rc != 0 {
        return Err(format!(
            "setting lo up: {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}

/// Reseeds the kernel CRNG from its input pool (`RNDRESEEDCRNG`), which mixes in the
/// CPU's RDRAND/RDSEED and the virtio-rng input. Guests restored from one memory
/// snapshot start with identical CRNG state; this makes them diverge at once.
#[allow(unsafe_code)]
pub fn reseed_crng() -> Result<(), String> {
    use rustix::fd::AsRawFd;
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/urandom")
        .map_err(|e| format!("opening /dev/urandom: {e}"))?;
    // _IO('R', 0x07)
    const RNDRESEEDCRNG: libc::c_ulong = 0x5207;
    // SAFETY: RNDRESEEDCRNG takes no argument; the fd is open for the whole call.
    let rc = unsafe { libc::ioctl(f.as_raw_fd(), RNDRESEEDCRNG as _) };
    if rc != 0 {
        return Err(format!(
            "RNDRESEEDCRNG: {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}

/// Sends `signal` to every process except PID 1 (`kill(-1, sig)`).
#[allow(unsafe_code)]
pub fn kill_all(signal: i32) {
    // SAFETY: kill(2) takes plain integers and has no memory-safety preconditions.
    let _ = unsafe { libc::kill(-1, signal) };
}

/// Makes `cmd`'s child lead a new session with its stdin (a pty slave) as controlling
/// terminal: `setsid()` then `TIOCSCTTY` on fd 0, between fork and exec.
#[allow(unsafe_code)]
pub fn new_session_with_stdin_as_ctty(cmd: &mut tokio::process::Command) {
    // SAFETY: the closure runs in the forked child before exec and only makes two raw
    // system calls through rustix (setsid, ioctl), which are async-signal-safe: no
    // allocation, no locks; the error conversion builds an `io::Error` from an errno
    // without allocating.
    unsafe {
        cmd.pre_exec(|| {
            rustix::process::setsid()?;
            rustix::process::ioctl_tiocsctty(rustix::stdio::stdin())?;
            Ok(())
        });
    }
}

/// Field `n` (0 = state) after the parenthesised command name of a `/proc/PID/stat`
/// text: state ppid pgrp session tty_nr tpgid ...
fn stat_field(stat: &str, n: usize) -> Option<i32> {
    let (_, rest) = stat.rsplit_once(')')?;
    rest.split_ascii_whitespace().nth(n)?.parse().ok()
}

/// Session id in a `/proc/PID/stat` text (0 for kernel threads).
pub fn stat_session(stat: &str) -> Option<i32> {
    stat_field(stat, 3)
}

/// Foreground process group of the controlling terminal in a `/proc/PID/stat` text,
/// if there is one.
pub fn stat_tpgid(stat: &str) -> Option<i32> {
    stat_field(stat, 5).filter(|g| *g > 0)
}

/// The foreground process group of the terminal that `pid` controls or runs on.
pub fn foreground_group(pid: i32) -> Option<i32> {
    stat_tpgid(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// Sends `signal` to every process whose session id is `sid` (found through `/proc`).
pub fn kill_session(sid: i32, signal: i32) {
    let Some(sig) = rustix::process::Signal::from_named_raw(signal) else {
        return;
    };
    if sid <= 1 {
        return;
    }
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return;
    };
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
            .and_then(rustix::process::Pid::from_raw)
        else {
            continue;
        };
        let stat = std::fs::read_to_string(entry.path().join("stat")).unwrap_or_default();
        if stat_session(&stat) == Some(sid) {
            let _ = rustix::process::kill_process(pid, sig);
        }
    }
}

/// The kernel's boot id, or `unknown`.
pub fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "unknown".into())
}

/// Syncs filesystems and powers off or reboots; only returns on failure.
pub fn power_off(reboot: bool) -> String {
    rustix::fs::sync();
    let cmd = if reboot {
        rustix::system::RebootCommand::Restart
    } else {
        rustix::system::RebootCommand::PowerOff
    };
    match rustix::system::reboot(cmd) {
        Ok(()) => "reboot(2) returned".into(),
        Err(e) => format!("reboot(2) failed: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cmdline() {
        let c = "console=ttyS0 root=/dev/vda atelier.hostname=box-1 quiet atelier.hostname=box-2\n";
        assert_eq!(cmdline_param(c, "atelier.hostname"), Some("box-2"));
        assert_eq!(cmdline_param(c, "root"), Some("/dev/vda"));
        assert_eq!(cmdline_param(c, "quiet"), None);
        assert_eq!(cmdline_param(c, "atelier.host"), None);
        assert_eq!(cmdline_param("", "x"), None);
    }

    #[test]
    fn hostnames() {
        assert!(valid_hostname("sbx-12.local"));
        assert!(!valid_hostname(""));
        assert!(!valid_hostname("-bad"));
        assert!(!valid_hostname("a..b"));
        assert!(!valid_hostname("has space"));
        assert!(!valid_hostname(&"a".repeat(65)));
    }

    #[test]
    fn mountinfo() {
        let m = "22 1 8:1 / / rw,relatime - ext4 /dev/vda rw\n\
                 23 22 0:5 / /proc rw - proc proc rw\n\
                 24 22 0:6 / /mnt/with\\040space rw - tmpfs tmpfs rw\n";
        assert_eq!(mount_points(m), vec!["/", "/proc", "/mnt/with space"]);
    }

    #[test]
    fn tpgid_from_stat() {
        let stat = "4242 (my (odd) prog) S 1 4242 4242 34816 4300 4194560 0 0";
        assert_eq!(stat_tpgid(stat), Some(4300));
        assert_eq!(stat_session(stat), Some(4242));
        assert_eq!(stat_session("2 (kthreadd) S 0 0 0 0 -1 2129984"), Some(0));
        assert_eq!(stat_tpgid("1 (init) S 0 1 1 0 -1 4194560"), None);
        assert_eq!(stat_tpgid("garbage"), None);
        // Our own stat parses (tpgid is -1 without a terminal).
        let own = std::fs::read_to_string("/proc/self/stat").expect("stat");
        assert!(own.rsplit_once(')').is_some());
    }

    #[test]
    fn boot_id_reads() {
        assert!(!boot_id().is_empty());
    }
}
