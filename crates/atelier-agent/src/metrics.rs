//! Metrics from /proc and statvfs(/).

use atelier_agent_proto::{CpuTimes, Metrics};

/// Parses the aggregate `cpu` line and counts the `cpuN` lines of `/proc/stat`.
pub fn parse_stat(stat: &str) -> Option<(CpuTimes, u32)> {
    let mut cpu = None;
    let mut count = 0u32;
    for line in stat.lines() {
        let mut fields = line.split_ascii_whitespace();
        match fields.next() {
            Some("cpu") => {
                let v: Vec<u64> = fields.map(|f| f.parse().unwrap_or(0)).collect();
                let at = |i: usize| v.get(i).copied().unwrap_or(0);
                cpu = Some(CpuTimes {
                    user: at(0),
                    nice: at(1),
                    system: at(2),
                    idle: at(3),
                    iowait: at(4),
                    irq: at(5),
                    softirq: at(6),
                    steal: at(7),
                });
            }
            Some(name) if name.starts_with("cpu") => count += 1,
            _ => {}
        }
    }
    cpu.map(|c| (c, count))
}

/// `MemTotal` and `MemAvailable` of `/proc/meminfo`, in bytes.
pub fn parse_meminfo(meminfo: &str) -> Option<(u64, u64)> {
    let field = |key: &str| {
        meminfo.lines().find_map(|line| {
            let rest = line.strip_prefix(key)?.strip_prefix(':')?;
            let kib: u64 = rest.split_ascii_whitespace().next()?.parse().ok()?;
            Some(kib * 1024)
        })
    };
    Some((field("MemTotal")?, field("MemAvailable")?))
}

/// The three load averages of `/proc/loadavg`.
pub fn parse_loadavg(loadavg: &str) -> Option<[f64; 3]> {
    let mut it = loadavg
        .split_ascii_whitespace()
        .map(|f| f.parse::<f64>().ok());
    Some([it.next()??, it.next()??, it.next()??])
}

/// Seconds since boot from `/proc/uptime`.
pub fn parse_uptime(uptime: &str) -> Option<f64> {
    uptime.split_ascii_whitespace().next()?.parse().ok()
}

fn read(path: &str) -> Result<String, String> {
    std::fs::read_to_string(path).map_err(|e| format!("metrics: reading {path}: {e}"))
}

/// Takes a sample (blocking file reads).
pub fn collect() -> Result<Metrics, String> {
    let (cpu, cpu_count) =
        parse_stat(&read("/proc/stat")?).ok_or("metrics: no cpu line in /proc/stat")?;
    let (mem_total_bytes, mem_available_bytes) = parse_meminfo(&read("/proc/meminfo")?)
        .ok_or("metrics: /proc/meminfo lacks MemTotal or MemAvailable")?;
    let load_avg =
        parse_loadavg(&read("/proc/loadavg")?).ok_or("metrics: malformed /proc/loadavg")?;
    let uptime_secs =
        parse_uptime(&read("/proc/uptime")?).ok_or("metrics: malformed /proc/uptime")?;
    let fs = rustix::fs::statvfs("/").map_err(|e| format!("metrics: statvfs(/): {e}"))?;
    Ok(Metrics {
        cpu,
        cpu_count,
        mem_total_bytes,
        mem_available_bytes,
        disk_total_bytes: fs.f_blocks.saturating_mul(fs.f_frsize),
        disk_free_bytes: fs.f_bavail.saturating_mul(fs.f_frsize),
        load_avg,
        uptime_secs,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_files() {
        let stat = "cpu  10 1 5 100 2 0 3 0 0 0\ncpu0 5 0 2 50 1 0 1 0 0 0\ncpu1 5 1 3 50 1 0 2 0 0 0\nintr 1 2\nctxt 5\n";
        let (cpu, n) = parse_stat(stat).expect("stat");
        assert_eq!(n, 2);
        assert_eq!(
            cpu,
            CpuTimes {
                user: 10,
                nice: 1,
                system: 5,
                idle: 100,
                iowait: 2,
                irq: 0,
                softirq: 3,
                steal: 0
            }
        );
        let meminfo =
            "MemTotal:        2048 kB\nMemFree:          100 kB\nMemAvailable:    1024 kB\n";
        assert_eq!(parse_meminfo(meminfo), Some((2048 * 1024, 1024 * 1024)));
        assert_eq!(parse_meminfo("MemTotal: 1 kB\n"), None);
        assert_eq!(
            parse_loadavg("0.50 0.25 1.00 1/100 42\n"),
            Some([0.5, 0.25, 1.0])
        );
        assert_eq!(parse_loadavg("0.5"), None);
        assert_eq!(parse_uptime("123.45 200.00\n"), Some(123.45));
        assert_eq!(parse_stat("intr 1\n"), None);
    }

    #[test]
    fn collects_on_this_machine() {
        let m = collect().expect("metrics");
        assert!(m.cpu_count >= 1);
        assert!(m.mem_total_bytes >= m.mem_available_bytes);
        assert!(m.disk_total_bytes >= m.disk_free_bytes);
        assert!(m.uptime_secs > 0.0);
    }
}
