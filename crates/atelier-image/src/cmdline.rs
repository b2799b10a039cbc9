//! The guest kernel command line and the host TSC frequency it embeds.

use std::process::Command;

/// The kernel command line for Atelier guests.
///
/// `panic=-1` with `reboot=t` makes a guest that cannot start reset at once, which QEMU
/// run with `-no-reboot` turns into an exit. `tsc_early_khz`/`tsc=reliable` skip TSC
/// calibration, which hangs when several TCG guests boot at once (no HPET/PM timer on
/// microvm). `i8042.noaux` skips probing the PS/2 aux port of a controller microvm does not have (PNP reports none).
pub fn kernel_cmdline(tsc_khz: Option<u64>) -> String {
    let mut s = String::from(
        "console=ttyS0 root=/dev/vda rw quiet panic=-1 reboot=t \
         i8042.noaux",
    );
    if let Some(khz) = tsc_khz {
        s.push_str(&format!(" tsc_early_khz={khz}"));
    }
    s.push_str(" tsc=reliable");
    s
}

/// The host's TSC frequency in kHz, if it can be found (x86 only): from sysfs, from the
/// kernel log (`tsc: Refined TSC clocksource calibration` / `tsc: Detected ... MHz`), or
/// from `/proc/cpuinfo` when the CPU has a constant TSC.
pub fn host_tsc_khz() -> Option<u64> {
    if !cfg!(target_arch = "x86_64") {
        return None;
    }
    if let Ok(s) = std::fs::read_to_string("/sys/devices/system/cpu/cpu0/tsc_freq_khz")
        && let Ok(v) = s.trim().parse()
    {
        return Some(v);
    }
    if let Ok(out) = Command::new("dmesg").output()
        && out.status.success()
        && let Some(v) = tsc_from_kernel_log(&String::from_utf8_lossy(&out.stdout))
    {
        return Some(v);
    }
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    tsc_from_cpuinfo(&cpuinfo)
}

fn mhz_to_khz(mhz: &str) -> Option<u64> {
    let v: f64 = mhz.trim().parse().ok()?;
    (v > 0.0).then(|| (v * 1000.0).round() as u64)
}

/// Parses the TSC frequency out of kernel log text, preferring the refined value.
fn tsc_from_kernel_log(log: &str) -> Option<u64> {
    let find = |marker: &str| {
        log.lines().rev().find_map(|l| {
            let rest = l.split(marker).nth(1)?;
            mhz_to_khz(rest.split_whitespace().next()?)
        })
    };
    find("Refined TSC clocksource calibration:").or_else(|| find("tsc: Detected"))
}

/// Parses `cpu MHz` from /proc/cpuinfo when the CPU flags include `constant_tsc`.
fn tsc_from_cpuinfo(cpuinfo: &str) -> Option<u64> {
    let constant = cpuinfo
        .lines()
        .any(|l| l.starts_with("flags") && l.split_whitespace().any(|f| f == "constant_tsc"));
    if !constant {
        return None;
    }
    cpuinfo
        .lines()
        .find(|l| l.starts_with("cpu MHz"))
        .and_then(|l| mhz_to_khz(l.split(':').nth(1)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cmdline_has_required_parts() {
        let c = kernel_cmdline(Some(2_596_120));
        for part in [
            "console=ttyS0",
            "root=/dev/vda",
            "rw",
            "panic=-1",
            "tsc_early_khz=2596120",
            "tsc=reliable",
        ] {
            assert!(c.split(' ').any(|p| p == part), "{part} missing in {c}");
        }
        assert!(!kernel_cmdline(None).contains("tsc_early_khz"));
    }

    #[test]
    fn parses_kernel_log() {
        let log = "[    0.000059] tsc: Detected 2596.120 MHz processor\n\
                   [    1.2] tsc: Refined TSC clocksource calibration: 2596.001 MHz\n";
        assert_eq!(tsc_from_kernel_log(log), Some(2_596_001));
        assert_eq!(
            tsc_from_kernel_log("[0.0] tsc: Detected 2596.120 MHz processor"),
            Some(2_596_120)
        );
        assert_eq!(tsc_from_kernel_log("nothing"), None);
    }

    #[test]
    fn parses_cpuinfo() {
        let c = "cpu MHz\t\t: 2596.120\nflags\t\t: fpu tsc constant_tsc\n";
        assert_eq!(tsc_from_cpuinfo(c), Some(2_596_120));
        assert_eq!(tsc_from_cpuinfo("cpu MHz : 1000\nflags : fpu\n"), None);
    }
}
