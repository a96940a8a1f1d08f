//! The fleet's records: hosts, migrations, VM ownership moves and the
//! leases that keep each background loop on one control-plane replica.
//!
//! Ownership is the store's: a migration's commit moves a VM's owner
//! `(host, epoch)` by compare-and-swap, so a host that was declared down and
//! comes back finds its epoch stale and stops its copy. A VM has at most one
//! migration that has not ended (a partial unique index says so, whoever
//! writes). The SQL is the same on both back ends.

use crate::row::time;
use crate::{Result, StoreError};
use async_trait::async_trait;
use serde::de::DeserializeOwned;
use std::time::Duration;
use tern_proto::{
    HostId, HostLoad, HostRecord, HostState, MigrationId, MigrationPhase, MigrationRecord,
    OwnerEpoch, VmId, VmRecord,
};

/// What the fleet half of the store does.
#[async_trait]
pub trait FleetStore: Send + Sync {
    /// Records a host joining (or re-joining: its addresses, keys, labels,
    /// capacity and API token hash are replaced, and it is active again).
    async fn upsert_host(
        &self,
        host: &HostRecord,
        token_hash: &str,
        api_token: &str,
    ) -> Result<HostRecord>;

    /// The token the control plane calls this host's agent API with (kept
    /// out of [`HostRecord`], which the hosts API lists).
    async fn host_api_token(&self, id: &HostId) -> Result<Option<String>>;

    /// The hash of the token a host authenticates its heartbeats with.
    async fn host_token_hash(&self, id: &HostId) -> Result<Option<String>>;

    /// Stores a one-time join token (by its hash) valid for `ttl`.
    async fn add_join_token(&self, hash: &str, ttl: Duration) -> Result<()>;

    /// Uses up a join token for `host`: true once, for a token that exists
    /// and has not expired; false ever after.
    async fn redeem_join_token(&self, hash: &str, host: &HostId) -> Result<bool>;

    /// One host.
    async fn get_host(&self, id: &HostId) -> Result<Option<HostRecord>>;

    /// Every host, by id.
    async fn list_hosts(&self) -> Result<Vec<HostRecord>>;

    /// A heartbeat: the host's load, and the time it arrived.
    async fn heartbeat(&self, id: &HostId, load: &HostLoad) -> Result<HostRecord>;

    /// Removes a host from the fleet: it is `down` and its token stops
    /// working, so no peer trusts it after their next heartbeat and it
    /// cannot beat again (it must join anew). Its record stays: VMs and
    /// migrations name it.
    async fn remove_host(&self, id: &HostId) -> Result<HostRecord>;

    /// Moves a host `from -> to` if it is still `from`.
    async fn set_host_state(
        &self,
        id: &HostId,
        from: HostState,
        to: HostState,
    ) -> Result<HostRecord>;

    /// Marks `down` every host not yet down whose last heartbeat is older
    /// than `silence`; returns them.
    async fn mark_silent_hosts_down(&self, silence: Duration) -> Result<Vec<HostId>>;

    /// Records a new migration; refused while the VM has one that has not ended.
    async fn insert_migration(&self, m: &MigrationRecord) -> Result<MigrationRecord>;

    /// One migration.
    async fn get_migration(&self, id: &MigrationId) -> Result<Option<MigrationRecord>>;

    /// Migrations, oldest first (only those not ended, if `active_only`).
    async fn list_migrations(&self, active_only: bool) -> Result<Vec<MigrationRecord>>;

    /// Moves a migration `from -> to` if it is still `from`, with its error
    /// and report when it ends.
    async fn update_migration(
        &self,
        id: &MigrationId,
        from: MigrationPhase,
        to: MigrationPhase,
        error: Option<&str>,
        report: Option<&serde_json::Value>,
    ) -> Result<MigrationRecord>;

    /// Moves `vm`'s ownership from `(from, epoch)` to `to` at `epoch + 1`,
    /// only if it is still owned by `from` at `epoch`.
    async fn move_owner(
        &self,
        vm: VmId,
        from: &HostId,
        epoch: OwnerEpoch,
        to: &HostId,
    ) -> Result<VmRecord>;

    /// Takes or renews the lease `name` for `holder` for `ttl`; false while
    /// another holder's lease has not expired.
    async fn try_lease(&self, name: &str, holder: &str, ttl: Duration) -> Result<bool>;

    /// Gives the lease up (if `holder` has it).
    async fn release_lease(&self, name: &str, holder: &str) -> Result<()>;
}

/// The fleet tables (schema version 2), the same SQL on both back ends.
pub(crate) const V2: &[&str] = &[
    "CREATE TABLE hosts (
        id TEXT PRIMARY KEY,
        migrate_addr TEXT NOT NULL,
        api_url TEXT NOT NULL,
        cert_pin TEXT NOT NULL,
        manifest_key TEXT NOT NULL,
        labels TEXT NOT NULL,
        capacity TEXT NOT NULL,
        state TEXT NOT NULL,
        load TEXT NOT NULL,
        last_heartbeat BIGINT,
        joined_at BIGINT NOT NULL,
        token_hash TEXT NOT NULL
    )",
    "CREATE TABLE join_tokens (
        hash TEXT PRIMARY KEY,
        expires_at BIGINT NOT NULL,
        used_by TEXT
    )",
    "CREATE TABLE migrations (
        id TEXT PRIMARY KEY,
        vm TEXT NOT NULL,
        from_host TEXT NOT NULL,
        to_host TEXT NOT NULL,
        reason TEXT NOT NULL,
        priority BIGINT NOT NULL,
        phase TEXT NOT NULL,
        error TEXT,
        report TEXT,
        created_at BIGINT NOT NULL,
        updated_at BIGINT NOT NULL
    )",
    "CREATE UNIQUE INDEX migrations_one_open_per_vm ON migrations (vm)
        WHERE phase NOT IN ('committed', 'rolled_back', 'corrupted')",
    "CREATE INDEX migrations_phase ON migrations (phase, created_at)",
    "CREATE TABLE leases (
        name TEXT PRIMARY KEY,
        holder TEXT NOT NULL,
        expires_at BIGINT NOT NULL
    )",
];

/// Schema version 3: the token the control plane calls a host's agent API
/// with (the host sends it when it joins), and the options a migration
/// was asked with (mode, downtime budget, bandwidth), which whichever
/// replica runs it passes to the source's agent.
pub(crate) const V3: &[&str] = &[
    "ALTER TABLE hosts ADD COLUMN api_token TEXT NOT NULL DEFAULT ''",
    "ALTER TABLE migrations ADD COLUMN options TEXT NOT NULL DEFAULT '{}'",
];

pub(crate) const HOST_COLUMNS: &str = "id, migrate_addr, api_url, cert_pin, manifest_key, labels, \
     capacity, state, load, last_heartbeat, joined_at";

pub(crate) const MIGRATION_COLUMNS: &str =
    "id, vm, from_host, to_host, reason, phase, error, report, created_at, updated_at, options";

/// Phases that end a migration, inlined into SQL (names from the enum).
pub(crate) const ENDED: &str = "('committed', 'rolled_back', 'corrupted')";

#[derive(sqlx::FromRow)]
pub(crate) struct RawHost {
    id: String,
    migrate_addr: String,
    api_url: String,
    cert_pin: String,
    manifest_key: String,
    labels: String,
    capacity: String,
    state: String,
    load: String,
    last_heartbeat: Option<i64>,
    joined_at: i64,
}

#[derive(sqlx::FromRow)]
pub(crate) struct RawMigration {
    id: String,
    vm: String,
    from_host: String,
    to_host: String,
    reason: String,
    phase: String,
    error: Option<String>,
    report: Option<String>,
    created_at: i64,
    updated_at: i64,
    options: String,
}

pub(crate) fn corrupt(what: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(format!("{what}: {e}"))
}

pub(crate) fn from_json<T: DeserializeOwned>(what: &str, s: &str) -> Result<T> {
    serde_json::from_str(s).map_err(|e| corrupt(what, e))
}

/// An enum stored by its serde name.
pub(crate) fn from_name<T: DeserializeOwned>(what: &str, s: &str) -> Result<T> {
    serde_json::from_value(serde_json::Value::String(s.to_owned())).map_err(|e| corrupt(what, e))
}

pub(crate) fn to_json<T: serde::Serialize>(v: &T) -> Result<String> {
    serde_json::to_string(v).map_err(|e| corrupt("cannot encode", e))
}

impl RawHost {
    pub(crate) fn decode(self) -> Result<HostRecord> {
        Ok(HostRecord {
            id: HostId::new(self.id).map_err(|e| corrupt("host id", e))?,
            migrate_addr: self.migrate_addr,
            api_url: self.api_url,
            cert_pin: self.cert_pin,
            manifest_key: self.manifest_key,
            labels: from_json("host labels", &self.labels)?,
            capacity: from_json("host capacity", &self.capacity)?,
            state: from_name("host state", &self.state)?,
            load: from_json("host load", &self.load)?,
            last_heartbeat: self
                .last_heartbeat
                .map(|t| time(t, "last_heartbeat"))
                .transpose()?,
            joined_at: time(self.joined_at, "joined_at")?,
        })
    }
}

impl RawMigration {
    pub(crate) fn decode(self) -> Result<MigrationRecord> {
        Ok(MigrationRecord {
            id: MigrationId::new(self.id).map_err(|e| corrupt("migration id", e))?,
            vm: self.vm.parse().map_err(|e| corrupt("migration vm", e))?,
            from: HostId::new(self.from_host).map_err(|e| corrupt("from_host", e))?,
            to: HostId::new(self.to_host).map_err(|e| corrupt("to_host", e))?,
            reason: from_name("migration reason", &self.reason)?,
            phase: from_name("migration phase", &self.phase)?,
            error: self.error,
            report: self
                .report
                .map(|r| from_json("migration report", &r))
                .transpose()?,
            created_at: time(self.created_at, "created_at")?,
            updated_at: time(self.updated_at, "updated_at")?,
            options: from_json("migration options", &self.options)?,
        })
    }
}

pub(crate) fn is_unique_violation(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(db) if db.is_unique_violation())
}

macro_rules! fleet_impl {
    ($store:ident) => {
        impl $store {
            async fn fetch_host(&self, id: &HostId) -> Result<Option<HostRecord>> {
                let sql = format!("SELECT {HOST_COLUMNS} FROM hosts WHERE id = $1");
                let row: Option<RawHost> = sqlx::query_as(&sql)
                    .bind(id.as_str())
                    .fetch_optional(&self.pool)
                    .await?;
                row.map(RawHost::decode).transpose()
            }

            async fn fetch_migration(&self, id: &MigrationId) -> Result<Option<MigrationRecord>> {
                let sql = format!("SELECT {MIGRATION_COLUMNS} FROM migrations WHERE id = $1");
                let row: Option<RawMigration> = sqlx::query_as(&sql)
                    .bind(id.as_str())
                    .fetch_optional(&self.pool)
                    .await?;
                row.map(RawMigration::decode).transpose()
            }
        }

        #[async_trait]
        impl FleetStore for $store {
            async fn upsert_host(
                &self,
                h: &HostRecord,
                token_hash: &str,
                api_token: &str,
            ) -> Result<HostRecord> {
                let sql = format!(
                    "INSERT INTO hosts ({HOST_COLUMNS}, token_hash, api_token) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7, 'active', $8, $9, $9, $10, $11) \
                     ON CONFLICT (id) DO UPDATE SET migrate_addr = excluded.migrate_addr, \
                     api_url = excluded.api_url, cert_pin = excluded.cert_pin, \
                     manifest_key = excluded.manifest_key, labels = excluded.labels, \
                     capacity = excluded.capacity, state = 'active', load = excluded.load, \
                     last_heartbeat = excluded.last_heartbeat, token_hash = excluded.token_hash, \
                     api_token = excluded.api_token \
                     RETURNING {HOST_COLUMNS}"
                );
                let row: RawHost = sqlx::query_as(&sql)
                    .bind(h.id.as_str())
                    .bind(&h.migrate_addr)
                    .bind(&h.api_url)
                    .bind(&h.cert_pin)
                    .bind(&h.manifest_key)
                    .bind(to_json(&h.labels)?)
                    .bind(to_json(&h.capacity)?)
                    .bind(to_json(&h.load)?)
                    .bind(now_us())
                    .bind(token_hash)
                    .bind(api_token)
                    .fetch_one(&self.pool)
                    .await?;
                row.decode()
            }

            async fn host_api_token(&self, id: &HostId) -> Result<Option<String>> {
                Ok(sqlx::query_scalar("SELECT api_token FROM hosts WHERE id = $1")
                    .bind(id.as_str())
                    .fetch_optional(&self.pool)
                    .await?)
            }

            async fn host_token_hash(&self, id: &HostId) -> Result<Option<String>> {
                Ok(sqlx::query_scalar("SELECT token_hash FROM hosts WHERE id = $1")
                    .bind(id.as_str())
                    .fetch_optional(&self.pool)
                    .await?)
            }

            async fn add_join_token(&self, hash: &str, ttl: Duration) -> Result<()> {
                let until = now_us().saturating_add(i64::try_from(ttl.as_micros()).unwrap_or(i64::MAX));
                sqlx::query("INSERT INTO join_tokens (hash, expires_at, used_by) VALUES ($1, $2, NULL)")
                    .bind(hash)
                    .bind(until)
                    .execute(&self.pool)
                    .await?;
                Ok(())
            }

            async fn redeem_join_token(&self, hash: &str, host: &HostId) -> Result<bool> {
                let res = sqlx::query(
                    "UPDATE join_tokens SET used_by = $1 \
                     WHERE hash = $2 AND used_by IS NULL AND expires_at > $3",
                )
                .bind(host.as_str())
                .bind(hash)
                .bind(now_us())
                .execute(&self.pool)
                .await?;
                Ok(res.rows_affected() == 1)
            }

            async fn get_host(&self, id: &HostId) -> Result<Option<HostRecord>> {
                self.fetch_host(id).await
            }

            async fn list_hosts(&self) -> Result<Vec<HostRecord>> {
                let sql = format!("SELECT {HOST_COLUMNS} FROM hosts ORDER BY id");
                let rows: Vec<RawHost> = sqlx::query_as(&sql).fetch_all(&self.pool).await?;
                rows.into_iter().map(RawHost::decode).collect()
            }

            async fn heartbeat(&self, id: &HostId, load: &HostLoad) -> Result<HostRecord> {
                let sql = format!(
                    "UPDATE hosts SET load = $1, last_heartbeat = $2 WHERE id = $3 RETURNING {HOST_COLUMNS}"
                );
                let row: Option<RawHost> = sqlx::query_as(&sql)
                    .bind(to_json(load)?)
                    .bind(now_us())
                    .bind(id.as_str())
                    .fetch_optional(&self.pool)
                    .await?;
                row.ok_or_else(|| StoreError::HostNotFound(id.clone()))?.decode()
            }

            async fn remove_host(&self, id: &HostId) -> Result<HostRecord> {
                let sql = format!(
                    "UPDATE hosts SET state = 'down', token_hash = '' WHERE id = $1 RETURNING {HOST_COLUMNS}"
                );
                let row: Option<RawHost> = sqlx::query_as(&sql)
                    .bind(id.as_str())
                    .fetch_optional(&self.pool)
                    .await?;
                row.ok_or_else(|| StoreError::HostNotFound(id.clone()))?.decode()
            }

            async fn set_host_state(
                &self,
                id: &HostId,
                from: HostState,
                to: HostState,
            ) -> Result<HostRecord> {
                let sql = format!(
                    "UPDATE hosts SET state = $1 WHERE id = $2 AND state = $3 RETURNING {HOST_COLUMNS}"
                );
                let row: Option<RawHost> = sqlx::query_as(&sql)
                    .bind(to.as_str())
                    .bind(id.as_str())
                    .bind(from.as_str())
                    .fetch_optional(&self.pool)
                    .await?;
                match row {
                    Some(r) => r.decode(),
                    None => match self.fetch_host(id).await? {
                        Some(h) => Err(StoreError::HostConflict {
                            id: id.clone(),
                            expected: from,
                            actual: h.state,
                        }),
                        None => Err(StoreError::HostNotFound(id.clone())),
                    },
                }
            }

            async fn mark_silent_hosts_down(&self, silence: Duration) -> Result<Vec<HostId>> {
                let cutoff = now_us() - i64::try_from(silence.as_micros()).unwrap_or(i64::MAX);
                let ids: Vec<String> = sqlx::query_scalar(
                    "UPDATE hosts SET state = 'down' \
                     WHERE state <> 'down' AND COALESCE(last_heartbeat, joined_at) < $1 RETURNING id",
                )
                .bind(cutoff)
                .fetch_all(&self.pool)
                .await?;
                ids.into_iter()
                    .map(|s| HostId::new(s).map_err(|e| corrupt("host id", e)))
                    .collect()
            }

            async fn insert_migration(&self, m: &MigrationRecord) -> Result<MigrationRecord> {
                let sql = format!(
                    "INSERT INTO migrations ({MIGRATION_COLUMNS}, priority) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $9, $11, $10) RETURNING {MIGRATION_COLUMNS}"
                );
                let res: std::result::Result<RawMigration, sqlx::Error> = sqlx::query_as(&sql)
                    .bind(m.id.as_str())
                    .bind(m.vm.to_string())
                    .bind(m.from.as_str())
                    .bind(m.to.as_str())
                    .bind(m.reason.as_str())
                    .bind(m.phase.as_str())
                    .bind(m.error.as_deref())
                    .bind(m.report.as_ref().map(to_json).transpose()?)
                    .bind(now_us())
                    .bind(m.reason as i64)
                    .bind(to_json(&m.options)?)
                    .fetch_one(&self.pool)
                    .await;
                match res {
                    Ok(r) => r.decode(),
                    Err(e) if is_unique_violation(&e) => {
                        if self.fetch_migration(&m.id).await?.is_some() {
                            Err(StoreError::MigrationExists(m.id.clone()))
                        } else {
                            Err(StoreError::VmMigrating(m.vm))
                        }
                    }
                    Err(e) => Err(e.into()),
                }
            }

            async fn get_migration(&self, id: &MigrationId) -> Result<Option<MigrationRecord>> {
                self.fetch_migration(id).await
            }

            async fn list_migrations(&self, active_only: bool) -> Result<Vec<MigrationRecord>> {
                let filter = if active_only {
                    format!("WHERE phase NOT IN {ENDED}")
                } else {
                    String::new()
                };
                let sql = format!(
                    "SELECT {MIGRATION_COLUMNS} FROM migrations {filter} ORDER BY created_at, id"
                );
                let rows: Vec<RawMigration> = sqlx::query_as(&sql).fetch_all(&self.pool).await?;
                rows.into_iter().map(RawMigration::decode).collect()
            }

            async fn update_migration(
                &self,
                id: &MigrationId,
                from: MigrationPhase,
                to: MigrationPhase,
                error: Option<&str>,
                report: Option<&serde_json::Value>,
            ) -> Result<MigrationRecord> {
                let sql = format!(
                    "UPDATE migrations SET phase = $1, error = COALESCE($2, error), \
                     report = COALESCE($3, report), updated_at = $4 \
                     WHERE id = $5 AND phase = $6 RETURNING {MIGRATION_COLUMNS}"
                );
                let row: Option<RawMigration> = sqlx::query_as(&sql)
                    .bind(to.as_str())
                    .bind(error)
                    .bind(report.map(to_json).transpose()?)
                    .bind(now_us())
                    .bind(id.as_str())
                    .bind(from.as_str())
                    .fetch_optional(&self.pool)
                    .await?;
                match row {
                    Some(r) => r.decode(),
                    None => match self.fetch_migration(id).await? {
                        Some(m) => Err(StoreError::MigrationConflict {
                            id: id.clone(),
                            expected: from,
                            actual: m.phase,
                        }),
                        None => Err(StoreError::MigrationNotFound(id.clone())),
                    },
                }
            }

            async fn move_owner(
                &self,
                vm: VmId,
                from: &HostId,
                epoch: OwnerEpoch,
                to: &HostId,
            ) -> Result<VmRecord> {
                let sql = format!(
                    "UPDATE vm_instances SET host = $1, owner_epoch = owner_epoch + 1, updated_at = $2 \
                     WHERE id = $3 AND host = $4 AND owner_epoch = $5 RETURNING {COLUMNS}"
                );
                let row: Option<RawVmRow> = sqlx::query_as(&sql)
                    .bind(to.as_str())
                    .bind(now_us())
                    .bind(vm.to_string())
                    .bind(from.as_str())
                    .bind(i64::try_from(epoch.0).unwrap_or(i64::MAX))
                    .fetch_optional(&self.pool)
                    .await?;
                match row {
                    Some(r) => r.decode(),
                    None => match self.fetch(vm).await? {
                        Some(rec) => Err(StoreError::OwnerConflict {
                            vm,
                            expected: (from.clone(), epoch),
                            actual: (rec.host, rec.owner_epoch),
                        }),
                        None => Err(StoreError::NotFound(vm)),
                    },
                }
            }

            async fn try_lease(&self, name: &str, holder: &str, ttl: Duration) -> Result<bool> {
                let now = now_us();
                let until = now.saturating_add(i64::try_from(ttl.as_micros()).unwrap_or(i64::MAX));
                let res = sqlx::query(
                    "INSERT INTO leases (name, holder, expires_at) VALUES ($1, $2, $3) \
                     ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, expires_at = excluded.expires_at \
                     WHERE leases.holder = excluded.holder OR leases.expires_at < $4",
                )
                .bind(name)
                .bind(holder)
                .bind(until)
                .bind(now)
                .execute(&self.pool)
                .await?;
                Ok(res.rows_affected() == 1)
            }

            async fn release_lease(&self, name: &str, holder: &str) -> Result<()> {
                sqlx::query("DELETE FROM leases WHERE name = $1 AND holder = $2")
                    .bind(name)
                    .bind(holder)
                    .execute(&self.pool)
                    .await?;
                Ok(())
            }
        }
    };
}

pub(crate) use fleet_impl;
