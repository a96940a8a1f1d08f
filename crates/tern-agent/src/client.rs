//! A client of the host API, for the CLI and the tests.

use crate::agent::MigrateRequest;
use crate::views::{MigrationView, VmView};
use serde::de::DeserializeOwned;
use tern_proto::{GuestSpec, MigrationId, VmId};

/// A request to an agent failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The agent could not be reached.
    #[error("cannot reach the agent at {url}: {source}")]
    Unreachable {
        /// Its URL.
        url: String,
        /// Why.
        source: reqwest::Error,
    },
    /// It answered with an error.
    #[error("the agent answered {status}: {message}")]
    Api {
        /// HTTP status.
        status: u16,
        /// Its error message.
        message: String,
    },
}

/// One agent's API.
#[derive(Clone)]
pub struct AgentClient {
    base: String,
    token: String,
    http: reqwest::Client,
}

impl AgentClient {
    /// A client of `base` (e.g. `http://127.0.0.1:7070`).
    pub fn new(base: &str, token: &str) -> Self {
        Self {
            base: base.trim_end_matches('/').into(),
            token: token.into(),
            // A host that is down must not hold its caller for TCP's
            // own connect timeout (minutes).
            http: reqwest::Client::builder()
                .connect_timeout(std::time::Duration::from_secs(5))
                .build()
                .expect("an HTTP client builds"),
        }
    }

    async fn call<T: DeserializeOwned>(
        &self,
        req: reqwest::RequestBuilder,
    ) -> Result<T, ClientError> {
        let url = self.base.clone();
        let resp = req
            .bearer_auth(&self.token)
            .send()
            .await
            .map_err(|source| ClientError::Unreachable {
                url: url.clone(),
                source,
            })?;
        let status = resp.status();
        let text = resp
            .text()
            .await
            .map_err(|source| ClientError::Unreachable { url, source })?;
        if !status.is_success() {
            let message = serde_json::from_str::<serde_json::Value>(&text)
                .ok()
                .and_then(|v| v["error"].as_str().map(str::to_string))
                .unwrap_or(text);
            return Err(ClientError::Api {
                status: status.as_u16(),
                message,
            });
        }
        let text = if text.is_empty() { "null".into() } else { text };
        serde_json::from_str(&text).map_err(|e| ClientError::Api {
            status: status.as_u16(),
            message: format!("unexpected answer: {e}"),
        })
    }

    /// Host name, migration address and public key.
    pub async fn host(&self) -> Result<serde_json::Value, ClientError> {
        self.call(self.http.get(format!("{}/api/v1/host", self.base)))
            .await
    }

    /// Boots a VM.
    pub async fn create_vm(&self, spec: &GuestSpec) -> Result<VmView, ClientError> {
        self.call(
            self.http
                .post(format!("{}/api/v1/vms", self.base))
                .json(spec),
        )
        .await
    }

    /// Boots VM `id` at owner `epoch` (idempotent for the same id, epoch
    /// and spec: the control plane may retry).
    pub async fn put_vm(
        &self,
        id: &VmId,
        epoch: u64,
        spec: &GuestSpec,
    ) -> Result<VmView, ClientError> {
        self.call(
            self.http
                .put(format!("{}/api/v1/vms/{id}", self.base))
                .json(&serde_json::json!({ "spec": spec, "epoch": epoch })),
        )
        .await
    }

    /// Keeps a VM's configuration beside it.
    pub async fn set_config(
        &self,
        id: &VmId,
        config: &serde_json::Value,
    ) -> Result<(), ClientError> {
        self.call::<serde_json::Value>(
            self.http
                .put(format!("{}/api/v1/vms/{id}/config", self.base))
                .json(config),
        )
        .await
        .map(|_| ())
    }

    /// One VM.
    pub async fn vm(&self, id: &VmId) -> Result<VmView, ClientError> {
        self.call(self.http.get(format!("{}/api/v1/vms/{id}", self.base)))
            .await
    }

    /// Every VM.
    pub async fn vms(&self) -> Result<Vec<VmView>, ClientError> {
        self.call(self.http.get(format!("{}/api/v1/vms", self.base)))
            .await
    }

    /// Stops a VM.
    pub async fn stop_vm(&self, id: &VmId) -> Result<(), ClientError> {
        self.call::<serde_json::Value>(self.http.delete(format!("{}/api/v1/vms/{id}", self.base)))
            .await
            .map(|_| ())
    }

    /// Starts a migration.
    pub async fn migrate(
        &self,
        vm: &VmId,
        req: &MigrateRequest,
    ) -> Result<MigrationView, ClientError> {
        self.call(
            self.http
                .post(format!("{}/api/v1/vms/{vm}/migrate", self.base))
                .json(req),
        )
        .await
    }

    /// One migration.
    pub async fn migration(&self, id: &MigrationId) -> Result<MigrationView, ClientError> {
        self.call(
            self.http
                .get(format!("{}/api/v1/migrations/{id}", self.base)),
        )
        .await
    }

    /// Cancels an outgoing migration before its switchover.
    pub async fn cancel_migration(&self, id: &MigrationId) -> Result<MigrationView, ClientError> {
        self.call(
            self.http
                .delete(format!("{}/api/v1/migrations/{id}", self.base)),
        )
        .await
    }

    /// Points an outgoing migration at the destination's new migration
    /// address (a post-copy whose old route is gone).
    pub async fn redirect_migration(
        &self,
        id: &MigrationId,
        addr: std::net::SocketAddr,
    ) -> Result<MigrationView, ClientError> {
        self.call(
            self.http
                .post(format!("{}/api/v1/migrations/{id}/redirect", self.base))
                .json(&crate::api::RedirectRequest { addr }),
        )
        .await
    }

    /// Every migration the agent ran since it started.
    pub async fn migrations_list(&self) -> Result<Vec<MigrationView>, ClientError> {
        self.call(self.http.get(format!("{}/api/v1/migrations", self.base)))
            .await
    }

    /// Raw server-sent events of a migration, as the server wrote them.
    pub async fn events_text(&self, id: &MigrationId) -> Result<String, ClientError> {
        let url = format!("{}/api/v1/migrations/{id}/events", self.base);
        let resp = self
            .http
            .get(&url)
            .bearer_auth(&self.token)
            .send()
            .await
            .map_err(|source| ClientError::Unreachable {
                url: url.clone(),
                source,
            })?;
        resp.text()
            .await
            .map_err(|source| ClientError::Unreachable { url, source })
    }
}
