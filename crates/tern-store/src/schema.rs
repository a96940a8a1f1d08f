//! Versioned schema migrations.
//!
//! Each migration has a version, a name and SQL per back end. They are applied in
//! order at open, each in its own transaction together with the row that records
//! it in `tern_schema`, so a crash mid-upgrade leaves the previous version intact.
//! PostgreSQL takes an advisory lock first so replicas starting together apply
//! each migration once. A database newer than the binary is refused.

/// One schema step.
pub struct Migration {
    /// Strictly increasing version.
    pub version: i64,
    /// What it does, for the log.
    pub name: &'static str,
    /// Statements for SQLite.
    pub sqlite: &'static [&'static str],
    /// Statements for PostgreSQL.
    pub postgres: &'static [&'static str],
}

/// Table that records applied versions (same SQL on both back ends).
pub const CREATE_SCHEMA_TABLE: &str = "CREATE TABLE IF NOT EXISTS tern_schema (
    version BIGINT PRIMARY KEY,
    name TEXT NOT NULL,
    applied_at BIGINT NOT NULL
)";

/// The first schema: plain SQL that both back ends accept.
const V1: &[&str] = &[
    "CREATE TABLE vm_instances (
        id TEXT PRIMARY KEY,
        tenant TEXT,
        status TEXT NOT NULL,
        host TEXT NOT NULL,
        owner_epoch BIGINT NOT NULL,
        spec TEXT NOT NULL,
        config TEXT NOT NULL,
        vsock_cid BIGINT UNIQUE,
        consecutive_failures BIGINT NOT NULL DEFAULT 0,
        last_health_check BIGINT,
        created_at BIGINT NOT NULL,
        updated_at BIGINT NOT NULL,
        status_changed_at BIGINT NOT NULL
    )",
    "CREATE INDEX vm_instances_status_created ON vm_instances (status, created_at)",
    "CREATE INDEX vm_instances_tenant ON vm_instances (tenant)",
];

/// Every migration this build knows, oldest first.
pub const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "vm_instances",
        sqlite: V1,
        postgres: V1,
    },
    Migration {
        version: 2,
        name: "fleet: hosts, migrations, leases",
        sqlite: crate::fleet::V2,
        postgres: crate::fleet::V2,
    },
    Migration {
        version: 3,
        name: "fleet: the control plane's token for each host's API",
        sqlite: crate::fleet::V3,
        postgres: crate::fleet::V3,
    },
];

/// Newest schema version this build knows.
pub fn latest_version() -> i64 {
    MIGRATIONS.last().map_or(0, |m| m.version)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_strictly_increase() {
        let mut last = 0;
        for m in MIGRATIONS {
            assert!(m.version > last, "migration {} out of order", m.name);
            assert!(!m.sqlite.is_empty() && !m.postgres.is_empty());
            last = m.version;
        }
    }
}
