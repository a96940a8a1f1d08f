//! Decoding of stored rows into [`VmRecord`]s, shared by both back ends.
//!
//! Rows are read into plain column types first and then checked, so a row that
//! was hand-edited or written by a newer tern gives [`StoreError::Corrupt`], not a panic.

use crate::StoreError;
use chrono::{DateTime, Utc};
use tern_proto::{HostId, OwnerEpoch, TenantId, VmRecord, VmStatus, VsockCid};

/// Columns in the order every `SELECT` lists them.
pub(crate) const COLUMNS: &str = "id, tenant, status, host, owner_epoch, spec, config, vsock_cid, \
     consecutive_failures, last_health_check, created_at, updated_at, status_changed_at";

#[derive(sqlx::FromRow)]
pub(crate) struct RawVmRow {
    id: String,
    tenant: Option<String>,
    status: String,
    host: String,
    owner_epoch: i64,
    spec: String,
    config: String,
    vsock_cid: Option<i64>,
    consecutive_failures: i64,
    last_health_check: Option<i64>,
    created_at: i64,
    updated_at: i64,
    status_changed_at: i64,
}

/// Microseconds since the epoch: the stored time format on both back ends.
pub(crate) fn now_us() -> i64 {
    Utc::now().timestamp_micros()
}

pub(crate) fn time(us: i64, col: &str) -> Result<DateTime<Utc>, StoreError> {
    DateTime::from_timestamp_micros(us)
        .ok_or_else(|| StoreError::Corrupt(format!("{col} = {us} is not a time")))
}

impl RawVmRow {
    pub(crate) fn decode(self) -> Result<VmRecord, StoreError> {
        let bad = |col: &str, e: &dyn std::fmt::Display| {
            StoreError::Corrupt(format!("VM {}: column {col}: {e}", self.id))
        };
        Ok(VmRecord {
            id: self.id.parse().map_err(|e| bad("id", &e))?,
            tenant: self
                .tenant
                .as_deref()
                .map(TenantId::new)
                .transpose()
                .map_err(|e| bad("tenant", &e))?,
            status: self
                .status
                .parse::<VmStatus>()
                .map_err(|e| bad("status", &e))?,
            host: HostId::new(self.host.clone()).map_err(|e| bad("host", &e))?,
            owner_epoch: OwnerEpoch(
                u64::try_from(self.owner_epoch).map_err(|e| bad("owner_epoch", &e))?,
            ),
            spec: serde_json::from_str(&self.spec).map_err(|e| bad("spec", &e))?,
            config: serde_json::from_str(&self.config).map_err(|e| bad("config", &e))?,
            vsock_cid: self
                .vsock_cid
                .map(|c| {
                    u32::try_from(c)
                        .map_err(|e| bad("vsock_cid", &e))
                        .and_then(|c| VsockCid::new(c).map_err(|e| bad("vsock_cid", &e)))
                })
                .transpose()?,
            consecutive_failures: u32::try_from(self.consecutive_failures)
                .map_err(|e| bad("consecutive_failures", &e))?,
            last_health_check: self
                .last_health_check
                .map(|t| time(t, "last_health_check"))
                .transpose()?,
            created_at: time(self.created_at, "created_at")?,
            updated_at: time(self.updated_at, "updated_at")?,
            status_changed_at: time(self.status_changed_at, "status_changed_at")?,
        })
    }
}
