//! The two back ends. Their SQL is the same except where the databases differ
//! (how a claim locks, how migrations serialise, pool sizing), so one macro
//! writes both implementations and the differences are passed in by name.
//!
//! Placeholders are `$N` and always appear in increasing order of first use:
//! PostgreSQL reads them as positions, SQLite as named parameters numbered by
//! first appearance, which then agree.

use crate::fleet::*;
use crate::row::{now_us, RawVmRow, COLUMNS};
use crate::schema::{latest_version, CREATE_SCHEMA_TABLE, MIGRATIONS};
use crate::{NewVm, Result, Store, StoreError, VmFilter};
use async_trait::async_trait;
use sqlx::postgres::PgPoolOptions;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{PgPool, SqlitePool};
use std::str::FromStr;
use std::time::Duration;
use tern_proto::{
    HostId, HostLoad, HostRecord, HostState, MigrationId, MigrationPhase, MigrationRecord,
    OwnerEpoch, TenantId, VmConfig, VmId, VmRecord, VmStatus,
};

/// How many times an insert retries when another writer took the same vsock CID.
const CID_ATTEMPTS: u32 = 32;

/// Lowest free CID from 3 upwards: 3 if free, else the smallest taken CID whose
/// successor is free.
const FREE_CID_SQL: &str = "SELECT MIN(c) FROM (
    SELECT CAST(3 AS BIGINT) AS c WHERE NOT EXISTS (SELECT 1 FROM vm_instances WHERE vsock_cid = 3)
    UNION ALL
    SELECT v.vsock_cid + 1 AS c FROM vm_instances v
     WHERE v.vsock_cid IS NOT NULL
       AND NOT EXISTS (SELECT 1 FROM vm_instances w WHERE w.vsock_cid = v.vsock_cid + 1)
) AS free_cids";

fn json<T: serde::Serialize>(v: &T) -> Result<String> {
    serde_json::to_string(v).map_err(|e| StoreError::Corrupt(format!("cannot encode: {e}")))
}

fn is_cid_collision(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Database(db) => {
            db.is_unique_violation()
                && (db.constraint().is_some_and(|c| c.contains("vsock_cid"))
                    || db.message().contains("vsock_cid"))
        }
        _ => false,
    }
}

fn list_sql(filter: &VmFilter) -> String {
    let mut sql = format!("SELECT {COLUMNS} FROM vm_instances WHERE 1 = 1");
    if filter.tenant.is_some() {
        sql.push_str(" AND tenant = $1");
    }
    if !filter.statuses.is_empty() {
        // Status names come from the enum, never from input, so inlining is safe.
        let names: Vec<String> = filter
            .statuses
            .iter()
            .map(|s| format!("'{}'", s.as_str()))
            .collect();
        sql.push_str(&format!(" AND status IN ({})", names.join(", ")));
    }
    sql.push_str(" ORDER BY created_at, id");
    sql
}

macro_rules! store_impl {
    (
        $store:ident, $pool:ty, backend = $backend:literal,
        claim_lock = $claim_lock:literal,
        migration_lock = $migration_lock:expr,
        cid_lock = $cid_lock:expr,
        pick_sql = $pick:ident
    ) => {
        impl $store {
            /// The underlying pool, for tests and tools.
            pub fn pool(&self) -> &$pool {
                &self.pool
            }

            async fn migrate(&self) -> Result<()> {
                let mut tx = self.pool.begin().await?;
                if let Some(lock) = $migration_lock {
                    sqlx::query(lock).execute(&mut *tx).await?;
                }
                sqlx::query(CREATE_SCHEMA_TABLE).execute(&mut *tx).await?;
                let current: Option<i64> = sqlx::query_scalar("SELECT MAX(version) FROM tern_schema")
                    .fetch_one(&mut *tx)
                    .await?;
                let current = current.unwrap_or(0);
                if current > latest_version() {
                    return Err(StoreError::SchemaTooNew {
                        found: current,
                        known: latest_version(),
                    });
                }
                for m in MIGRATIONS.iter().filter(|m| m.version > current) {
                    tracing::info!(backend = $backend, version = m.version, name = m.name, "applying schema migration");
                    for stmt in m.$pick {
                        sqlx::query(stmt).execute(&mut *tx).await?;
                    }
                    sqlx::query("INSERT INTO tern_schema (version, name, applied_at) VALUES ($1, $2, $3)")
                        .bind(m.version)
                        .bind(m.name)
                        .bind(now_us())
                        .execute(&mut *tx)
                        .await?;
                }
                tx.commit().await?;
                Ok(())
            }

            /// The schema version the database is at.
            pub async fn schema_version(&self) -> Result<i64> {
                let v: Option<i64> = sqlx::query_scalar("SELECT MAX(version) FROM tern_schema")
                    .fetch_one(&self.pool)
                    .await?;
                Ok(v.unwrap_or(0))
            }

            async fn fetch(&self, id: VmId) -> Result<Option<VmRecord>> {
                let sql = format!("SELECT {COLUMNS} FROM vm_instances WHERE id = $1");
                let row: Option<RawVmRow> = sqlx::query_as(&sql)
                    .bind(id.to_string())
                    .fetch_optional(&self.pool)
                    .await?;
                row.map(RawVmRow::decode).transpose()
            }

            /// Why an update that matched no row matched none.
            async fn explain_miss(&self, id: VmId, expected: VmStatus) -> StoreError {
                match self.fetch(id).await {
                    Ok(Some(rec)) => StoreError::Conflict { id, expected, actual: rec.status },
                    Ok(None) => StoreError::NotFound(id),
                    Err(e) => e,
                }
            }
        }

        #[async_trait]
        impl Store for $store {
            fn backend(&self) -> &'static str {
                $backend
            }

            async fn insert_vm(&self, new: NewVm) -> Result<VmRecord> {
                if !new.status.is_initial() {
                    return Err(StoreError::NotInitial(new.status));
                }
                let spec = json(&new.spec)?;
                let config = json(&new.config)?;
                for attempt in 0..CID_ATTEMPTS {
                    // Pick and insert in one transaction; on PostgreSQL an advisory lock
                    // also serialises allocators, so collisions only come from writers
                    // outside this code, and those are retried.
                    let mut tx = self.pool.begin().await?;
                    if let Some(lock) = $cid_lock {
                        sqlx::query(lock).execute(&mut *tx).await?;
                    }
                    let cid: Option<i64> = sqlx::query_scalar(FREE_CID_SQL).fetch_one(&mut *tx).await?;
                    let cid = cid.unwrap_or(3);
                    let now = now_us();
                    let res = sqlx::query(
                        "INSERT INTO vm_instances (id, tenant, status, host, owner_epoch, spec, config, \
                         vsock_cid, consecutive_failures, last_health_check, created_at, updated_at, status_changed_at) \
                         VALUES ($1, $2, $3, $4, 1, $5, $6, $7, 0, NULL, $8, $8, $8)",
                    )
                    .bind(new.id.to_string())
                    .bind(new.tenant.as_ref().map(|t| t.as_str().to_owned()))
                    .bind(new.status.as_str())
                    .bind(new.host.as_str())
                    .bind(&spec)
                    .bind(&config)
                    .bind(cid)
                    .bind(now)
                    .execute(&mut *tx)
                    .await;
                    match res {
                        Ok(_) => {
                            tx.commit().await?;
                            return self.fetch(new.id).await?.ok_or(StoreError::NotFound(new.id));
                        }
                        Err(e) if is_cid_collision(&e) => {
                            drop(tx);
                            tracing::debug!(cid, attempt, "vsock CID taken concurrently, retrying");
                            tokio::task::yield_now().await;
                        }
                        Err(e) => return Err(e.into()),
                    }
                }
                Err(StoreError::CidExhausted(CID_ATTEMPTS))
            }

            async fn get_vm(&self, id: VmId) -> Result<Option<VmRecord>> {
                self.fetch(id).await
            }

            async fn list_vms(&self, filter: &VmFilter) -> Result<Vec<VmRecord>> {
                let sql = list_sql(filter);
                let mut q = sqlx::query_as::<_, RawVmRow>(&sql);
                if let Some(t) = &filter.tenant {
                    q = q.bind(t.as_str());
                }
                q.fetch_all(&self.pool)
                    .await?
                    .into_iter()
                    .map(RawVmRow::decode)
                    .collect()
            }

            async fn transition(&self, id: VmId, from: VmStatus, to: VmStatus) -> Result<VmRecord> {
                from.check_transition(to)?;
                let sql = format!(
                    "UPDATE vm_instances SET status = $1, updated_at = $2, status_changed_at = $2, \
                     vsock_cid = CASE WHEN $1 = 'destroyed' THEN NULL ELSE vsock_cid END \
                     WHERE id = $3 AND status = $4 RETURNING {COLUMNS}"
                );
                let row: Option<RawVmRow> = sqlx::query_as(&sql)
                    .bind(to.as_str())
                    .bind(now_us())
                    .bind(id.to_string())
                    .bind(from.as_str())
                    .fetch_optional(&self.pool)
                    .await?;
                match row {
                    Some(r) => r.decode(),
                    None => Err(self.explain_miss(id, from).await),
                }
            }

            async fn claim_warm(&self, tenant: &TenantId, config: &VmConfig) -> Result<Option<VmRecord>> {
                let sql = format!(
                    "UPDATE vm_instances SET status = 'provisioning', tenant = $1, config = $2, \
                     updated_at = $3, status_changed_at = $3 \
                     WHERE id = (SELECT id FROM vm_instances WHERE status = 'warm' \
                                 ORDER BY created_at, id LIMIT 1 {}) \
                       AND status = 'warm' RETURNING {COLUMNS}",
                    $claim_lock
                );
                let mut tx = self.pool.begin().await?;
                let row: Option<RawVmRow> = sqlx::query_as(&sql)
                    .bind(tenant.as_str())
                    .bind(json(config)?)
                    .bind(now_us())
                    .fetch_optional(&mut *tx)
                    .await?;
                tx.commit().await?;
                row.map(RawVmRow::decode).transpose()
            }

            async fn set_config(&self, id: VmId, config: &VmConfig) -> Result<VmRecord> {
                let sql = format!(
                    "UPDATE vm_instances SET config = $1, updated_at = $2 WHERE id = $3 RETURNING {COLUMNS}"
                );
                let row: Option<RawVmRow> = sqlx::query_as(&sql)
                    .bind(json(config)?)
                    .bind(now_us())
                    .bind(id.to_string())
                    .fetch_optional(&self.pool)
                    .await?;
                row.ok_or(StoreError::NotFound(id))?.decode()
            }

            async fn record_health(&self, id: VmId, healthy: bool) -> Result<VmRecord> {
                let sql = format!(
                    "UPDATE vm_instances SET \
                     consecutive_failures = CASE WHEN $1 THEN 0 ELSE consecutive_failures + 1 END, \
                     last_health_check = $2, updated_at = $2 WHERE id = $3 RETURNING {COLUMNS}"
                );
                let row: Option<RawVmRow> = sqlx::query_as(&sql)
                    .bind(healthy)
                    .bind(now_us())
                    .bind(id.to_string())
                    .fetch_optional(&self.pool)
                    .await?;
                row.ok_or(StoreError::NotFound(id))?.decode()
            }

            async fn count_by_status(&self) -> Result<Vec<(VmStatus, u64)>> {
                let rows: Vec<(String, i64)> =
                    sqlx::query_as("SELECT status, COUNT(*) FROM vm_instances GROUP BY status")
                        .fetch_all(&self.pool)
                        .await?;
                let mut out: Vec<(VmStatus, u64)> = VmStatus::ALL.iter().map(|s| (*s, 0)).collect();
                for (name, n) in rows {
                    let st: VmStatus = name.parse().map_err(StoreError::Corrupt)?;
                    if let Some(slot) = out.iter_mut().find(|(s, _)| *s == st) {
                        slot.1 = u64::try_from(n).unwrap_or(0);
                    }
                }
                Ok(out)
            }
        }
    };
}

/// The embedded default: one SQLite file, one connection. Every write is a
/// transaction on that connection, so claims are serialised by construction.
pub struct SqliteStore {
    pool: SqlitePool,
}

impl SqliteStore {
    /// Opens (creating if missing) `sqlite://PATH` or `sqlite::memory:` and migrates it.
    pub async fn open(url: &str) -> Result<Self> {
        let opts = SqliteConnectOptions::from_str(url)
            .map_err(|_| StoreError::BadUrl(url.to_owned()))?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(Duration::from_secs(10));
        let pool = SqlitePoolOptions::new()
            .max_connections(1)
            .min_connections(1)
            .idle_timeout(None)
            .max_lifetime(None)
            .connect_with(opts)
            .await?;
        let store = Self { pool };
        store.migrate().await?;
        Ok(store)
    }
}

store_impl!(
    SqliteStore,
    SqlitePool,
    backend = "sqlite",
    claim_lock = "",
    migration_lock = None::<&str>,
    cid_lock = None::<&str>,
    pick_sql = sqlite
);
fleet_impl!(SqliteStore);

/// The fleet back end: a shared PostgreSQL database. Claims lock the chosen row
/// with `FOR UPDATE SKIP LOCKED`, so concurrent claimers (tasks or replicas)
/// take different warm VMs without waiting on each other.
pub struct PostgresStore {
    pool: PgPool,
}

impl PostgresStore {
    /// Connects to `postgres://...` and migrates the schema (under an advisory lock).
    pub async fn open(url: &str) -> Result<Self> {
        let pool = PgPoolOptions::new()
            .max_connections(16)
            .acquire_timeout(Duration::from_secs(10))
            .connect(url)
            .await?;
        let store = Self { pool };
        store.migrate().await?;
        Ok(store)
    }
}

store_impl!(
    PostgresStore,
    PgPool,
    backend = "postgres",
    claim_lock = "FOR UPDATE SKIP LOCKED",
    migration_lock = Some("SELECT pg_advisory_xact_lock(7306454)"),
    cid_lock = Some("SELECT pg_advisory_xact_lock(7306455)"),
    pick_sql = postgres
);
fleet_impl!(PostgresStore);
