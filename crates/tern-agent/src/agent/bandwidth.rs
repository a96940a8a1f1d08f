//! The host's migration bandwidth, shared among its outgoing migrations.
//!
//! Each migration runs in its guest's own process, so no token bucket can
//! be shared between them: the agent is where the host cap is split. It
//! weighs each priority class ([`MigrationReason::bandwidth_weight`]),
//! splits a class evenly among its migrations, keeps each under its own
//! cap, and gives what a capped one leaves to the others
//! ([`tern_transport::weighted_shares`]). Each guest process gets its share
//! with the job and a new one whenever a migration starts or ends; its data
//! session paces itself by it through a host limiter of its own.

use super::*;
use tern_proto::MigrationReason;
use tern_transport::{weighted_shares, Claim};

/// One outgoing migration's claim on the host's bandwidth.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct Bandwidth {
    /// Its priority class.
    pub(crate) reason: MigrationReason,
    /// Its own cap, bytes/s (0: none).
    pub(crate) cap: u64,
    /// Its share now, bytes/s.
    pub(crate) share: u64,
}

impl Agent {
    /// The host cap in bytes/s (0: none).
    fn host_rate(&self) -> u64 {
        self.inner
            .cfg
            .host_bandwidth_mbps
            .map_or(0, |m| m.saturating_mul(1_000_000))
    }

    /// The share a new migration would get beside those under way (0: the
    /// host has no cap).
    pub(super) fn share_for(&self, reason: MigrationReason, cap: u64) -> u64 {
        let host = self.host_rate();
        if host == 0 {
            return 0;
        }
        let mut claims = self
            .claims()
            .into_iter()
            .map(|(_, c)| c)
            .collect::<Vec<_>>();
        claims.push(Claim {
            weight: reason.bandwidth_weight(),
            cap,
        });
        *weighted_shares(host, &claims)
            .last()
            .expect("one claim at least")
    }

    /// Records migration `id`'s claim, then shares the host again.
    pub(super) fn claim_bandwidth(&self, id: &str, reason: MigrationReason, cap: u64, share: u64) {
        if share == 0 {
            return;
        }
        if let Some(m) = lock(&self.inner.migrations).get_mut(id) {
            m.bandwidth = Some(Bandwidth { reason, cap, share });
        }
        self.reshare();
    }

    /// The claims of the outgoing migrations under way.
    fn claims(&self) -> Vec<(String, Claim)> {
        lock(&self.inner.migrations)
            .iter()
            .filter(|(_, m)| !m.state.is_final())
            .filter_map(|(id, m)| {
                let b = m.bandwidth?;
                let claim = Claim {
                    weight: b.reason.bandwidth_weight(),
                    cap: b.cap,
                };
                Some((id.clone(), claim))
            })
            .collect()
    }

    /// Shares the host's bandwidth again among the migrations under way
    /// and sends each guest process whose share changed its new one.
    pub(super) fn reshare(&self) {
        let host = self.host_rate();
        if host == 0 {
            return;
        }
        let claims = self.claims();
        let shares = weighted_shares(host, &claims.iter().map(|c| c.1).collect::<Vec<_>>());
        let mut changed = Vec::new();
        {
            let mut ms = lock(&self.inner.migrations);
            for ((id, _), share) in claims.iter().zip(shares) {
                let Some(b) = ms.get_mut(id).and_then(|m| m.bandwidth.as_mut()) else {
                    continue;
                };
                if b.share != share {
                    b.share = share;
                    changed.push((id.clone(), share));
                }
            }
        }
        for (migration, bytes_per_sec) in changed {
            let Some(dir) = lock(&self.inner.routes).get(&migration).cloned() else {
                continue;
            };
            tokio::spawn(async move {
                let req = Request::SetShare {
                    migration: migration.clone(),
                    bytes_per_sec,
                };
                if let Err(e) = control::call::<()>(&dir.control(), &req, STATUS_TIMEOUT).await {
                    tracing::debug!(migration, error = %e, "bandwidth share not delivered");
                }
            });
        }
    }
}
