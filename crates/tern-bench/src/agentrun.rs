//! What the agent benchmarks share: one migration asked of an agent and
//! followed to its end.

use anyhow::{bail, Context};
use std::time::{Duration, Instant};
use tern_agent::{AgentClient, MigrateRequest, MigrationPhase, Report};
use tern_proto::VmId;

/// Migrates `vm` from `c` to `to` by pre-copy (downtime budget
/// `max_downtime_ms`) and waits up to `limit` for it to commit: its report.
pub async fn migrate_committed(
    c: &AgentClient,
    vm: &VmId,
    to: &str,
    max_downtime_ms: Option<u64>,
    limit: Duration,
) -> anyhow::Result<Report> {
    migrate_committed_in(c, vm, to, "precopy", max_downtime_ms, limit).await
}

/// [`migrate_committed`] in `mode` (`precopy`, `postcopy` or `hybrid`).
pub async fn migrate_committed_in(
    c: &AgentClient,
    vm: &VmId,
    to: &str,
    mode: &str,
    max_downtime_ms: Option<u64>,
    limit: Duration,
) -> anyhow::Result<Report> {
    let req = MigrateRequest {
        to: tern_proto::HostId::new(to)?,
        mode: mode.into(),
        max_downtime_ms,
        bandwidth_mbps: None,
        deadline_secs: None,
        max_bandwidth_mbps: None,
        auto_converge: None,
        compress: None,
        id: None,
        reason: None,
    };
    let m = c.migrate(vm, &req).await.context("migrate")?;
    let t = Instant::now();
    let done = loop {
        let v = c.migration(&m.id).await?;
        if v.state.is_final() {
            break v;
        }
        if t.elapsed() > limit {
            bail!("migration {} did not end", m.id);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    if done.state != MigrationPhase::Committed {
        bail!(
            "migration {} ended {:?}: {:?}",
            m.id,
            done.state,
            done.error
        );
    }
    done.report.context("no report")
}
