//! Actor migration between two executors over mutual TLS on loopback.
//!
//! For actors holding 1, 10 and 100 MB of state (non-zero pages of linear
//! memory), 20 migrations each, back and forth, while a writer keeps
//! sending the actor writes: the total time (request to confirmation) and
//! the pause (final checkpoint to confirmation), p50 and p99. Then the
//! messages per second one actor handles, and what an idle actor costs in
//! memory, with how many fit in what the machine has free.
//!
//! Memory was warm: the state is written before the first migration, and
//! each run moves the same actor again. Run: `cargo bench -p tern-actors`.

#[path = "../tests/support/mod.rs"]
mod support;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tern_actors::examples::{self, kv};
use tern_actors::manager::{ManagerError, SendOutcome};
use tern_actors::policy::MigrationReason;
use tern_actors::runtime::{ActorConfig, ActorError, ActorMode};
use tern_actors::Envelope;
use tern_proto::{ActorId, SenderId};

const RUNS: usize = 20;
const PAGE: u32 = 4096;

fn config(limit: u64) -> ActorConfig {
    ActorConfig {
        mode: ActorMode::Stateful {
            checkpoint_interval: Duration::from_secs(3600),
            max_state_size_bytes: limit,
        },
        fuel_per_message: 1 << 32,
        mailbox_capacity: 4096,
        tenant: None,
    }
}

fn percentile(v: &mut [Duration], p: f64) -> Duration {
    v.sort();
    v[((v.len() - 1) as f64 * p).round() as usize]
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(run());
}

async fn run() {
    let mut c = support::cluster(2, 512 << 20).await;
    // Answers are not looked at here: drain them.
    for mut rx in std::mem::take(&mut c.handled) {
        tokio::spawn(async move { while rx.recv().await.is_some() {} });
    }
    // Idle actors first, while the allocator holds no memory freed by
    // migrations (which new actors would reuse without growing the RSS).
    let idle = idle_actors(&c);
    let rate = throughput(&c).await;
    let c = Arc::new(c);
    println!("actor migration over mutual TLS on loopback ({RUNS} runs each, memory warm, a writer running)");
    println!(
        "{:>8} {:>12} {:>12} {:>12} {:>12}",
        "state", "total p50", "total p99", "pause p50", "pause p99"
    );
    // TERN_BENCH_SIZES=1,10 runs only those sizes (MB).
    let sizes: Vec<u32> = std::env::var("TERN_BENCH_SIZES")
        .ok()
        .map(|v| v.split(',').filter_map(|s| s.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![1, 10, 100]);
    for mb in sizes {
        let (mut totals, mut pauses) = migrate_runs(&c, mb).await;
        println!(
            "{:>5} MB {:>12.2?} {:>12.2?} {:>12.2?} {:>12.2?}",
            mb,
            percentile(&mut totals, 0.5),
            percentile(&mut totals, 0.99),
            percentile(&mut pauses, 0.5),
            percentile(&mut pauses, 0.99),
        );
    }
    println!("{rate}");
    println!("{idle}");
}

/// Where the actor runs now.
fn holder(c: &support::Cluster, actor: ActorId) -> usize {
    (0..c.nodes.len())
        .find(|&i| c.nodes[i].with(|m| m.runs(actor)))
        .unwrap_or(0)
}

async fn migrate_runs(c: &Arc<support::Cluster>, mb: u32) -> (Vec<Duration>, Vec<Duration>) {
    let bytes = mb << 20;
    let actor = c.nodes[0]
        .with(|m| m.deploy(examples::KV.as_bytes(), config(512 << 20)))
        .unwrap();
    // Memory past the table (which ends at 1.1 MiB), written page by page.
    let pages_needed = (bytes + (2 << 20)).div_ceil(65536);
    c.nodes[0].with(|m| {
        m.call(actor, &kv::grow(pages_needed.saturating_sub(32)))
            .unwrap();
        m.call(actor, &kv::touch(2 << 20, bytes / PAGE, PAGE, 0x5a))
            .unwrap();
    });
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (c, stop) = (c.clone(), stop.clone());
        std::thread::spawn(move || write_while(&c, actor, bytes, &stop))
    };
    let (mut totals, mut pauses) = (Vec::new(), Vec::new());
    for _ in 0..RUNS {
        let from = holder(c, actor);
        let to = c.nodes[1 - from].with(|m| m.id().clone());
        let id = c.nodes[from]
            .with(|m| m.initiate_migration(actor, to, MigrationReason::Operator, Instant::now()))
            .unwrap();
        loop {
            let done = c.nodes[from].with(|m| {
                let s = m.get_state(&id).unwrap();
                s.state
                    .is_final()
                    .then(|| (s.state.clone(), s.total(), s.pause()))
            });
            if let Some((state, total, pause)) = done {
                assert_eq!(state, tern_actors::manager::MigrationState::Complete);
                totals.push(total.unwrap());
                pauses.push(pause.unwrap());
                break;
            }
            tokio::time::sleep(Duration::from_micros(200)).await;
        }
        // Past the cooldown is irrelevant (operator moves); let the writer run.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.store(true, Ordering::Relaxed);
    writer.join().unwrap();
    (totals, pauses)
}

/// Sends the actor a write every millisecond wherever it is, in order.
fn write_while(c: &support::Cluster, actor: ActorId, bytes: u32, stop: &AtomicBool) {
    let sender = SenderId::new("writer").unwrap();
    let (mut seq, mut at) = (1u64, 0usize);
    while !stop.load(Ordering::Relaxed) {
        let offset = (2 << 20) + (seq as u32 * 7919 * PAGE) % bytes;
        let e = Envelope {
            sender: sender.clone(),
            seq,
            payload: kv::touch(offset, 1, 1, seq as u8),
        };
        match c.nodes[at].with(|m| m.send(actor, e, None)) {
            Ok(SendOutcome::Accepted(_)) => seq += 1,
            Ok(SendOutcome::Moved(_)) | Ok(SendOutcome::Unknown) => at = 1 - at,
            Err(ManagerError::Actor(ActorError::OutOfOrder(o))) => seq = o.expected,
            Err(_) => {}
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Messages per second through one counter actor on one executor.
async fn throughput(c: &support::Cluster) -> String {
    let actor = c.nodes[0]
        .with(|m| m.deploy(examples::COUNTER.as_bytes(), config(64 << 20)))
        .unwrap();
    let sender = SenderId::new("load").unwrap();
    const N: u64 = 200_000;
    let start = Instant::now();
    let mut seq = 1;
    while seq <= N {
        let e = Envelope {
            sender: sender.clone(),
            seq,
            payload: 1i64.to_le_bytes().to_vec(),
        };
        match c.nodes[0].with(|m| m.send(actor, e, None)) {
            Ok(SendOutcome::Accepted(_)) => seq += 1,
            _ => tokio::time::sleep(Duration::from_micros(100)).await,
        }
    }
    loop {
        let total = c.nodes[0].with(|m| m.call(actor, &0i64.to_le_bytes()).unwrap());
        if i64::from_le_bytes(total.try_into().unwrap()) as u64 >= N {
            break;
        }
        tokio::time::sleep(Duration::from_micros(200)).await;
    }
    let rate = N as f64 / start.elapsed().as_secs_f64();
    format!(
        "messages through one actor (sent through the manager, handled by its driver): {rate:.0}/s"
    )
}

/// What an idle actor costs: resident memory over 2,000 new counter actors, measured first.
fn idle_actors(c: &support::Cluster) -> String {
    let rss = || {
        let s = std::fs::read_to_string("/proc/self/statm").unwrap();
        s.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() * 4096
    };
    const N: u64 = 2000;
    let before = rss();
    let ids: Vec<ActorId> = c.nodes[1].with(|m| {
        (0..N)
            .map(|_| {
                m.deploy(examples::COUNTER.as_bytes(), config(1 << 20))
                    .unwrap()
            })
            .collect()
    });
    let per = (rss() - before) / N;
    c.nodes[1].with(|m| {
        for id in ids {
            m.remove(id).unwrap();
        }
    });
    let avail: u64 = std::fs::read_to_string("/proc/meminfo")
        .unwrap()
        .lines()
        .find(|l| l.starts_with("MemAvailable:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|n| n.parse::<u64>().ok())
        .unwrap()
        * 1024;
    format!(
        "an idle actor (counter, one 64 KiB page of memory): {:.1} KiB resident; {} would fit in the {} GiB available",
        per as f64 / 1024.0,
        avail / per.max(1),
        avail >> 30
    )
}
