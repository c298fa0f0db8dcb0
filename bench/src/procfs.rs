//! What Linux's /proc says about a process: CPU time used and resident memory.

use std::path::Path;

/// Clock ticks per second of /proc's CPU times (USER_HZ, 100 on every Linux ABI).
const TICKS_PER_SECOND: f64 = 100.0;

/// User + system CPU time of a process (all its threads, living and exited), in seconds.
/// `None` if /proc cannot tell (not Linux, or the process is gone).
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces; fields after its closing ')' are plain.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After ')' come field 3 (state) at index 0, so utime (14) and stime (15) are 11 and 12.
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / TICKS_PER_SECOND)
}

/// User + system CPU seconds of the threads of `pid` named `name` (living ones; Linux's
/// 15-character thread name), e.g. the server's `audit-writer`. `None` if /proc cannot tell
/// or no thread has that name.
pub fn thread_cpu_seconds(pid: u32, name: &str) -> Option<f64> {
    let mut total = None;
    for entry in std::fs::read_dir(format!("/proc/{pid}/task"))
        .ok()?
        .flatten()
    {
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        if stat.get(open + 1..close) != Some(name) {
            continue;
        }
        let fields: Vec<&str> = stat[close + 1..].split_whitespace().collect();
        // The same fields as in `cpu_seconds`, for one thread.
        let ticks = fields
            .get(11)
            .and_then(|u| u.parse::<f64>().ok())
            .zip(fields.get(12).and_then(|s| s.parse::<f64>().ok()));
        if let Some((utime, stime)) = ticks {
            *total.get_or_insert(0.0) += (utime + stime) / TICKS_PER_SECOND;
        }
    }
    total
}

/// The parent process id of `pid`, from /proc (`None` if it cannot tell).
pub fn parent_pid(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // After ')' come field 3 (state) at index 0, then field 4 (ppid).
    stat[stat.rfind(')')? + 1..]
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// User + system CPU seconds of `pid` and of every living child of it (a PostgreSQL
/// postmaster and its backends and background workers). `None` if `pid` is gone.
pub fn family_cpu_seconds(pid: u32) -> Option<f64> {
    let mut total = cpu_seconds(pid)?;
    let entries = std::fs::read_dir("/proc").ok()?;
    for entry in entries.flatten() {
        let Some(child) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        if child != pid && parent_pid(child) == Some(pid) {
            // A child that exits between the two reads is simply not counted.
            total += cpu_seconds(child).unwrap_or(0.0);
        }
    }
    Some(total)
}

/// CPU seconds of this process.
pub fn own_cpu_seconds() -> Option<f64> {
    cpu_seconds(std::process::id())
}

/// Resident memory of a process now and at its peak, in MiB (`VmRSS`, `VmHWM`).
pub fn rss_mib(pid: u32) -> Option<(f64, f64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| -> Option<f64> {
        let line = status.lines().find(|l| l.starts_with(name))?;
        let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kib / 1024.0)
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}

/// A short description of the machine: CPU model, cores, memory, and the file system of
/// `dir` (from /proc; best effort).
pub fn machine(dir: &Path) -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mem_gib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|k| k.parse::<f64>().ok())
        })
        .map_or(0.0, |kib| kib / 1024.0 / 1024.0);
    let fs = filesystem_of(dir).unwrap_or_else(|| "unknown fs".into());
    format!("{cpu}, {cores} cores, {mem_gib:.0} GiB RAM, data dir on {fs}")
}

/// The type of the file system `dir` is on, from the longest matching /proc/mounts entry.
fn filesystem_of(dir: &Path) -> Option<String> {
    let dir = std::fs::canonicalize(dir).ok()?;
    let mounts = std::fs::read_to_string("/proc/mounts").ok()?;
    mounts
        .lines()
        .filter_map(|line| {
            let mut parts = line.split_whitespace();
            let device = parts.next()?;
            let mount = parts.next()?;
            let fstype = parts.next()?;
            dir.starts_with(mount)
                .then(|| (mount.len(), format!("{fstype} ({device} at {mount})")))
        })
        .max_by_key(|(len, _)| *len)
        .map(|(_, text)| text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_own_process() {
        // Spin a little so the counters are not all zero on a fast machine; no timing assertion.
        let mut x = 0u64;
        for i in 0..1_000_000u64 {
            x = x.wrapping_add(i * i);
        }
        assert!(x > 0);
        assert!(own_cpu_seconds().is_some());
        let me = std::process::id();
        assert!(parent_pid(me).is_some_and(|p| p != me));
        // This process's own CPU is part of its family's (children add to it).
        let family = family_cpu_seconds(me).unwrap();
        assert!(family >= cpu_seconds(me).unwrap() - 0.05, "{family}");
        let (rss, peak) = rss_mib(std::process::id()).unwrap();
        assert!(rss > 0.0 && peak >= rss * 0.5);
        assert!(!machine(Path::new("/")).is_empty());
    }

    #[test]
    fn reads_a_thread_by_its_name() {
        let (stop, stopped) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("bench-named".into())
            .spawn(move || stopped.recv())
            .unwrap();
        let me = std::process::id();
        // The thread has had a name since it started; its CPU may round to 0 ticks.
        while thread_cpu_seconds(me, "bench-named").is_none() {
            std::thread::yield_now();
        }
        assert!(thread_cpu_seconds(me, "bench-named").unwrap() >= 0.0);
        assert_eq!(thread_cpu_seconds(me, "no-such-thread"), None);
        stop.send(()).unwrap();
        thread.join().unwrap().unwrap();
    }
}
