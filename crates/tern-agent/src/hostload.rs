//! This host's load, as heartbeats report it: CPU busy share, memory in
//! use and free, network and disk throughput (from `/proc`, as rates
//! between two samples).

use std::time::Instant;
use tern_proto::{Capacity, HostLoad};

/// Counters read at one instant.
#[derive(Clone, Copy, Debug, Default)]
struct Counters {
    cpu_busy: u64,
    cpu_total: u64,
    net_bytes: u64,
    disk_bytes: u64,
}

/// How long the CPU busy share is averaged over (like the 1-minute load
/// average): the balancer sheds VMs off hosts that stay busy, and a burst
/// (a migration, a build, a boot) must not make a host look hot.
const CPU_AVERAGE_SECS: f64 = 60.0;

/// Turns successive `/proc` readings into rates.
pub struct Sampler {
    last: Option<(Instant, Counters)>,
    /// The CPU busy share, averaged exponentially over `CPU_AVERAGE_SECS`
    /// from 0 at start (a new host is not judged by its first seconds).
    cpu: f64,
}

impl Default for Sampler {
    fn default() -> Self {
        Self::new()
    }
}

impl Sampler {
    /// A sampler with no reading yet (the first sample reports no rates).
    pub fn new() -> Self {
        Self {
            last: None,
            cpu: 0.0,
        }
    }

    /// The load now; `vms` and `migrations` come from the agent.
    pub fn sample(&mut self, vms: u32, migrations: u32) -> HostLoad {
        let now = Instant::now();
        let c = read_counters();
        let (total_mib, free_mib) = memory_mib();
        let mut load = HostLoad {
            memory_used_mib: total_mib.saturating_sub(free_mib),
            memory_free_mib: free_mib,
            vms,
            migrations,
            ..HostLoad::default()
        };
        if let Some((at, prev)) = self.last {
            let secs = now.duration_since(at).as_secs_f64().max(1e-3);
            let d_total = c.cpu_total.saturating_sub(prev.cpu_total);
            if d_total > 0 {
                let busy = c.cpu_busy.saturating_sub(prev.cpu_busy) as f64 / d_total as f64;
                self.cpu = average(self.cpu, busy.clamp(0.0, 1.0), secs);
            }
            load.cpu = self.cpu;
            load.net_bytes_per_sec =
                (c.net_bytes.saturating_sub(prev.net_bytes) as f64 / secs) as u64;
            load.disk_bytes_per_sec =
                (c.disk_bytes.saturating_sub(prev.disk_bytes) as f64 / secs) as u64;
        }
        self.last = Some((now, c));
        load
    }
}

/// `avg` moved toward `now`, a rate measured over the last `secs`, as an
/// exponential average with time constant `CPU_AVERAGE_SECS`.
fn average(avg: f64, now: f64, secs: f64) -> f64 {
    let keep = (-secs / CPU_AVERAGE_SECS).exp();
    avg * keep + now * (1.0 - keep)
}

/// What this host offers when its configuration does not say: its memory
/// less 1 GiB for itself, and its cores.
pub fn default_capacity() -> Capacity {
    let (total, _) = memory_mib();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    Capacity {
        memory_mib: total.saturating_sub(1024).max(256),
        vcpus: cores as u32,
    }
}

fn read(path: &str) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

fn read_counters() -> Counters {
    let (cpu_busy, cpu_total) = parse_cpu(&read("/proc/stat"));
    Counters {
        cpu_busy,
        cpu_total,
        net_bytes: parse_net(&read("/proc/net/dev")),
        disk_bytes: parse_disk(&read("/proc/diskstats")),
    }
}

/// `(busy, total)` jiffies from the `cpu` line of `/proc/stat`.
fn parse_cpu(stat: &str) -> (u64, u64) {
    let Some(line) = stat.lines().find(|l| l.starts_with("cpu ")) else {
        return (0, 0);
    };
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let total: u64 = v.iter().take(8).sum();
    // idle + iowait are not busy.
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    (total.saturating_sub(idle), total)
}

/// Bytes received plus sent on every interface but loopback.
fn parse_net(dev: &str) -> u64 {
    dev.lines()
        .skip(2)
        .filter_map(|l| l.split_once(':'))
        .filter(|(name, _)| name.trim() != "lo")
        .map(|(_, rest)| {
            let v: Vec<u64> = rest
                .split_whitespace()
                .filter_map(|x| x.parse().ok())
                .collect();
            v.first().copied().unwrap_or(0) + v.get(8).copied().unwrap_or(0)
        })
        .sum()
}

/// Bytes read plus written on whole disks (sectors of 512 bytes).
fn parse_disk(stats: &str) -> u64 {
    stats
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let name = f.get(2)?;
            // Partitions and virtual devices would count bytes twice.
            let whole = !name.starts_with("loop")
                && !name.starts_with("ram")
                && !name.starts_with("dm-")
                && !name.chars().last()?.is_ascii_digit()
                || name.starts_with("nvme") && !name.contains('p');
            if !whole {
                return None;
            }
            let read: u64 = f.get(5)?.parse().ok()?;
            let written: u64 = f.get(9)?.parse().ok()?;
            Some((read + written) * 512)
        })
        .sum()
}

/// `(total, available)` memory in MiB from `/proc/meminfo`.
fn memory_mib() -> (u64, u64) {
    let info = read("/proc/meminfo");
    let field = |name: &str| {
        info.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
            / 1024
    };
    (field("MemTotal:"), field("MemAvailable:"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_files_parse() {
        let (busy, total) = parse_cpu("cpu  100 0 50 800 50 0 0 0 0 0\ncpu0 1 2 3\n");
        assert_eq!((busy, total), (150, 1000));
        let dev = "h1\nh2\n    lo: 999 0 0 0 0 0 0 0 999 0\n  eth0: 100 1 0 0 0 0 0 0 200 2\n";
        assert_eq!(parse_net(dev), 300);
        let disk =
            "   8       0 sda 1 0 10 0 1 0 20 0 0 0 0\n   8       1 sda1 1 0 10 0 1 0 20 0 0 0 0\n";
        assert_eq!(parse_disk(disk), 30 * 512);
    }

    #[test]
    fn the_second_sample_reports_rates_and_memory() {
        let mut s = Sampler::new();
        let first = s.sample(2, 1);
        assert_eq!((first.vms, first.migrations), (2, 1));
        assert!(first.memory_free_mib > 0);
        let second = s.sample(2, 0);
        assert!((0.0..=1.0).contains(&second.cpu));
    }

    #[test]
    fn a_burst_does_not_make_a_host_busy_but_a_steady_load_does() {
        // Three seconds at 100 % after an idle start: under 6 %.
        let mut avg = 0.0;
        for _ in 0..3 {
            avg = average(avg, 1.0, 1.0);
        }
        assert!(avg < 0.06, "{avg}");
        // Three minutes at 100 %: above 0.9 whatever the sampling step.
        for step in [1.0, 5.0, 30.0] {
            let mut avg = 0.0;
            for _ in 0..(180.0 / step) as usize {
                avg = average(avg, 1.0, step);
            }
            assert!(avg > 0.9, "{step}: {avg}");
        }
    }
}
