//! Test support shared by the store, orchestrator and API test suites: a fresh,
//! empty database per test on either back end.
//!
//! PostgreSQL tests read the admin URL from `TERN_TEST_POSTGRES_URL` (set by
//! `scripts/test.sh`, which starts the server). Without it they skip, saying so
//! on stderr, unless `TERN_REQUIRE_POSTGRES=1`, in which case they fail.

use crate::{PostgresStore, SqliteStore, Store};
use sqlx::Connection;
use std::sync::Arc;

/// A store plus whatever keeps it alive (the SQLite temp dir).
pub struct TestStore {
    /// The store.
    pub store: Arc<dyn Store>,
    /// URL it was opened from, to reopen it (restart tests).
    pub url: String,
    _dir: Option<tempfile::TempDir>,
}

/// A fresh SQLite store in a temporary directory.
pub async fn sqlite() -> TestStore {
    let dir = tempfile::tempdir().expect("temp dir");
    let url = format!("sqlite://{}", dir.path().join("tern.db").display());
    let store = SqliteStore::open(&url).await.expect("open sqlite store");
    TestStore {
        store: Arc::new(store),
        url,
        _dir: Some(dir),
    }
}

/// A fresh PostgreSQL database, or `None` (with a visible message) when no
/// server was configured for the tests.
pub async fn postgres(test: &str) -> Option<TestStore> {
    let admin = match std::env::var("TERN_TEST_POSTGRES_URL") {
        Ok(u) if !u.is_empty() => u,
        _ => {
            if std::env::var("TERN_REQUIRE_POSTGRES").as_deref() == Ok("1") {
                panic!("{test}: TERN_REQUIRE_POSTGRES=1 but TERN_TEST_POSTGRES_URL is not set");
            }
            eprintln!(
                "SKIPPED {test} on PostgreSQL: TERN_TEST_POSTGRES_URL is not set \
                 (scripts/test.sh starts a server and sets it)"
            );
            return None;
        }
    };
    let name = format!("tern_t_{}", uuid::Uuid::new_v4().simple());
    let mut conn = sqlx::PgConnection::connect(&admin)
        .await
        .unwrap_or_else(|e| panic!("{test}: cannot reach PostgreSQL at {admin}: {e}"));
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&mut conn)
        .await
        .expect("create test database");
    let base = admin.rsplit_once('/').map_or(admin.as_str(), |(b, _)| b);
    let url = format!("{base}/{name}");
    let store = PostgresStore::open(&url)
        .await
        .expect("open postgres store");
    Some(TestStore {
        store: Arc::new(store),
        url,
        _dir: None,
    })
}
