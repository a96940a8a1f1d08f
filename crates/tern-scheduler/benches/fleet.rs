//! The scheduler on a simulated fleet of 1,000 hosts and 20,000 VMs:
//! placing every VM, then one rebalancing pass, each timed in CPU seconds
//! of this thread (`/proc/thread-self/schedstat`) and wall time, for a few
//! seeds. Run: `cargo bench -p tern-scheduler --bench fleet`.

use std::time::Instant;
use tern_scheduler::sim::{check, fill, heat, hosts, Rng};
use tern_scheduler::{Fleet, LoadBalance, Policy};

/// CPU time this thread has used, in seconds.
fn cpu_secs() -> f64 {
    let s = std::fs::read_to_string("/proc/thread-self/schedstat").unwrap_or_default();
    let ns: u64 = s
        .split_whitespace()
        .next()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    ns as f64 / 1e9
}

fn main() {
    const HOSTS: usize = 1000;
    const VMS: usize = 20_000;
    println!("scheduler, {HOSTS} hosts, {VMS} VMs (memory warm after the first seed)");
    println!("seed  place cpu s  place wall s  refused  hot hosts  rebalance cpu s  moves  hot after one pass");
    for seed in [1u64, 2, 3] {
        let mut rng = Rng::new(seed);
        let mut fleet = Fleet::new(hosts(HOSTS, &mut rng), Vec::new());
        let (c0, w0) = (cpu_secs(), Instant::now());
        let refused = fill(&mut fleet, VMS, &mut rng);
        let (place_cpu, place_wall) = (cpu_secs() - c0, w0.elapsed().as_secs_f64());
        let hot_before = heat(&mut fleet, &mut rng);
        let policy = LoadBalance::default();
        let c1 = cpu_secs();
        let plans = policy.plan(&fleet, 10_000);
        let rebalance_cpu = cpu_secs() - c1;
        for p in &plans {
            fleet.start_migration(&p.vm, &p.to).expect("plans fit");
            fleet.end_migration(&p.vm, &p.to, true, 10_000);
        }
        check(&fleet).expect("no host over capacity, labels kept");
        let hot = fleet
            .hosts()
            .filter(|h| fleet.pressure(&h.id) > policy.threshold)
            .count();
        println!(
            "{seed:>4}  {place_cpu:>11.3}  {place_wall:>12.3}  {refused:>7}  {hot_before:>9}  {rebalance_cpu:>15.3}  {:>5}  {hot:>18}",
            plans.len()
        );
    }
}
