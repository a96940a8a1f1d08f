//! The docker driver: each VM of the orchestrator is a container of the
//! local Docker Engine, driven over its API socket with `bollard`.
//!
//! Containers are tern's by label (`tern.instance`, `tern.vm`), so two
//! control planes sharing one engine, or an operator's own containers, are
//! never touched. A tenant names an image of the operator's catalogue
//! (`[docker.images.NAME]`), never an image reference: what runs on the host
//! is the operator's choice. Resources come from the VM's spec (memory with
//! no swap on top, CPUs as a CPU quota); every container runs with no
//! capabilities, `no-new-privileges`, a pids limit and, by default, no
//! network (the host's own networking gives it an address when it needs one).

use crate::{DriverError, StartRequest, VmDriver, VmHandle};
use async_trait::async_trait;
use bollard::errors::Error as DockerError;
use bollard::models::{ContainerCreateBody, HealthConfig, HealthStatusEnum, HostConfig};
use bollard::query_parameters::{
    CreateContainerOptionsBuilder, InspectContainerOptions, ListContainersOptionsBuilder,
    RemoveContainerOptionsBuilder, StopContainerOptionsBuilder, UploadToContainerOptionsBuilder,
};
use bollard::Docker;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::time::{Duration, Instant};
use tern_proto::{VmConfig, VmId, VmSpec};

/// The image the project's scripts build (`scripts/docker-image.sh`): busybox
/// and tern's counter workload.
pub const TEST_IMAGE_REF: &str = "tern-workload:1";

/// Where `configure` puts the tenant's configuration inside the container.
pub const CONFIG_PATH: &str = "/etc/tern/config.json";

const LABEL_INSTANCE: &str = "tern.instance";
const LABEL_VM: &str = "tern.vm";
const MIB: i64 = 1024 * 1024;
/// Tries at removing a container before cleanup fails.
const REMOVE_ATTEMPTS: u32 = 3;

/// One catalogue entry: what a tenant's image name runs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ContainerImage {
    /// The engine's image reference (`name:tag`); it must already be on the
    /// host (no registry is asked).
    pub image: String,
    /// The command, when not the image's own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cmd: Option<Vec<String>>,
    /// A health command run inside the container (`["CMD", "prog", ...]`
    /// or `["CMD-SHELL", "..."]`); without one, running is healthy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<Vec<String>>,
}

/// Settings of the docker driver (`[docker]` in `tern up`'s config).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DockerConfig {
    /// The engine's API socket.
    pub socket: PathBuf,
    /// The `tern.instance` label of this control plane's containers.
    pub instance: String,
    /// The containers' network mode (`none`: no network).
    pub network: String,
    /// Seconds a stop waits for the workload before killing it.
    pub stop_timeout_secs: u32,
    /// Most processes one container may hold.
    pub pids_limit: i64,
    /// What tenants may run, by name. `test` is tern's workload image unless
    /// the operator names it otherwise.
    pub images: BTreeMap<String, ContainerImage>,
}

impl Default for DockerConfig {
    fn default() -> Self {
        Self {
            socket: PathBuf::from("/var/run/docker.sock"),
            instance: "tern".into(),
            network: "none".into(),
            stop_timeout_secs: 5,
            pids_limit: 512,
            images: BTreeMap::new(),
        }
    }
}

impl DockerConfig {
    /// The catalogue entry of `name`: the operator's, or the test workload
    /// for `test`.
    fn image(&self, name: &str) -> Option<ContainerImage> {
        self.images.get(name).cloned().or_else(|| {
            (name == crate::images::TEST_IMAGE).then(|| ContainerImage {
                image: TEST_IMAGE_REF.into(),
                cmd: None,
                health: Some(vec!["CMD".into(), "/bin/tern-health".into()]),
            })
        })
    }

    /// Every image name a tenant may ask for (`test` first).
    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.images.keys().cloned().collect();
        if !self.images.contains_key(crate::images::TEST_IMAGE) {
            names.insert(0, crate::images::TEST_IMAGE.into());
        }
        names
    }

    fn offered(&self) -> String {
        self.names().join(", ")
    }

    /// Refuses settings the engine would misread: an instance label that
    /// could match another's containers, empty references, a stop timeout
    /// past an hour, a pids limit below 16.
    pub fn validate(&self) -> Result<(), String> {
        let plain = |s: &str| {
            !s.is_empty()
                && s.len() <= 64
                && s.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        };
        if !plain(&self.instance) {
            return Err(format!(
                "docker.instance `{}` must be 1-64 letters, digits, - or _",
                self.instance
            ));
        }
        if !plain(&self.network) {
            return Err(format!(
                "docker.network `{}` is not a network name",
                self.network
            ));
        }
        if self.stop_timeout_secs > 3600 {
            return Err("docker.stop_timeout_secs must be at most 3600".into());
        }
        if self.pids_limit < 16 {
            return Err("docker.pids_limit must be at least 16".into());
        }
        for (name, entry) in &self.images {
            if !plain(name) {
                return Err(format!("docker.images: `{name}` is not a plain name"));
            }
            if entry.image.trim().is_empty() || entry.image.len() > 255 {
                return Err(format!(
                    "docker.images.{name}.image must be an image reference"
                ));
            }
        }
        Ok(())
    }
}

/// Runs VMs as containers of the local Docker Engine.
pub struct DockerDriver {
    docker: Docker,
    cfg: DockerConfig,
}

impl DockerDriver {
    /// Connects to the engine (agreeing on an API version it speaks) and
    /// checks that it answers.
    pub async fn connect(cfg: DockerConfig) -> Result<Self, DriverError> {
        let unavailable = |e: DockerError| {
            DriverError::Unavailable(format!(
                "the Docker Engine at {} does not answer: {e}",
                cfg.socket.display()
            ))
        };
        let socket = cfg.socket.to_string_lossy().into_owned();
        let docker = Docker::connect_with_unix(&socket, 60, bollard::API_DEFAULT_VERSION)
            .map_err(unavailable)?
            .negotiate_version()
            .await
            .map_err(unavailable)?;
        docker.ping().await.map_err(unavailable)?;
        Ok(Self { docker, cfg })
    }

    /// The container's name for VM `id`.
    pub fn container_name(&self, id: VmId) -> String {
        format!("{}-{id}", self.cfg.instance)
    }

    /// The engine client, for tests and tools that look inside containers.
    pub fn engine(&self) -> &Docker {
        &self.docker
    }

    /// The container of `id`, or `NotFound` when the engine has none.
    async fn inspect(
        &self,
        id: VmId,
    ) -> Result<bollard::models::ContainerInspectResponse, DriverError> {
        self.docker
            .inspect_container(&self.container_name(id), None::<InspectContainerOptions>)
            .await
            .map_err(|e| self.error(id, "inspect", e))
    }

    /// Maps an engine error: a 404 is `NotFound`, a failed connection makes
    /// the driver unavailable, anything else failed the operation.
    fn error(&self, id: VmId, op: &'static str, e: DockerError) -> DriverError {
        match e {
            DockerError::DockerResponseServerError {
                status_code: 404, ..
            } => DriverError::NotFound(id),
            DockerError::DockerResponseServerError { .. } => DriverError::OperationFailed {
                id,
                op,
                reason: e.to_string(),
            },
            other => DriverError::Unavailable(format!(
                "the Docker Engine at {}: {other}",
                self.cfg.socket.display()
            )),
        }
    }

    /// What a container of `spec` is created with.
    fn create_body(&self, req: &StartRequest, image: &ContainerImage) -> ContainerCreateBody {
        let memory = i64::from(req.spec.memory_mib) * MIB;
        let labels = HashMap::from([
            (LABEL_INSTANCE.to_string(), self.cfg.instance.clone()),
            (LABEL_VM.to_string(), req.id.to_string()),
            ("tern.host".to_string(), req.host.to_string()),
            ("tern.epoch".to_string(), req.epoch.0.to_string()),
        ]);
        ContainerCreateBody {
            image: Some(image.image.clone()),
            cmd: image.cmd.clone(),
            labels: Some(labels),
            healthcheck: image.health.clone().map(|test| HealthConfig {
                test: Some(test),
                interval: Some(1_000_000_000),
                timeout: Some(2_000_000_000),
                retries: Some(3),
                ..HealthConfig::default()
            }),
            host_config: Some(HostConfig {
                memory: Some(memory),
                memory_swap: Some(memory),
                nano_cpus: Some(i64::from(req.spec.vcpus) * 1_000_000_000),
                pids_limit: Some(self.cfg.pids_limit),
                network_mode: Some(self.cfg.network.clone()),
                cap_drop: Some(vec!["ALL".into()]),
                security_opt: Some(vec!["no-new-privileges".into()]),
                init: Some(true),
                ..HostConfig::default()
            }),
            ..ContainerCreateBody::default()
        }
    }

    /// The catalogue entry for `spec`, present on this engine.
    async fn resolve(&self, id: VmId, spec: &VmSpec) -> Result<ContainerImage, DriverError> {
        let failed = |reason: String| DriverError::StartFailed { id, reason };
        let image = self.cfg.image(&spec.image).ok_or_else(|| {
            failed(format!(
                "unknown image `{}` (this host offers: {})",
                spec.image,
                self.cfg.offered()
            ))
        })?;
        match self.docker.inspect_image(&image.image).await {
            Ok(_) => Ok(image),
            Err(DockerError::DockerResponseServerError {
                status_code: 404, ..
            }) => Err(failed(format!(
                "image `{}` names the container image `{}`, which is not on this host \
                 (no registry is asked: load or import it, e.g. scripts/docker-image.sh)",
                spec.image, image.image
            ))),
            Err(e) => Err(self.error(id, "start", e)),
        }
    }

    /// Creates and starts the container; on any failure removes it again.
    async fn create_and_start(
        &self,
        req: &StartRequest,
        image: &ContainerImage,
    ) -> Result<(), DriverError> {
        let name = self.container_name(req.id);
        let opts = CreateContainerOptionsBuilder::new().name(&name).build();
        let started = async {
            self.docker
                .create_container(Some(opts), self.create_body(req, image))
                .await?;
            self.docker.start_container(&name, None).await
        }
        .await;
        if let Err(e) = started {
            let _ = self.remove(req.id).await;
            return Err(DriverError::StartFailed {
                id: req.id,
                reason: format!("the engine refused container {name}: {e}"),
            });
        }
        Ok(())
    }

    /// Waits until the container runs; a container that exits first is a
    /// failed start (and is removed).
    async fn wait_running(&self, id: VmId) -> Result<VmHandle, DriverError> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let c = self.inspect(id).await?;
            let state = c.state.unwrap_or_default();
            if state.running == Some(true) {
                let short: String = c.id.unwrap_or_default().chars().take(12).collect();
                return Ok(VmHandle {
                    id,
                    driver: self.name().into(),
                    detail: format!(
                        "container {short} ({}), pid {}",
                        self.container_name(id),
                        state.pid.unwrap_or_default()
                    ),
                });
            }
            let exited = state.exit_code.is_some_and(|c| c != 0) || state.dead == Some(true);
            if exited || Instant::now() > deadline {
                let _ = self.remove(id).await;
                return Err(DriverError::StartFailed {
                    id,
                    reason: format!(
                        "container {} did not stay running (exit code {:?}, {})",
                        self.container_name(id),
                        state.exit_code,
                        state.error.unwrap_or_default()
                    ),
                });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Removes the container with its anonymous volumes; gone already is fine.
    async fn remove(&self, id: VmId) -> Result<(), DriverError> {
        let opts = RemoveContainerOptionsBuilder::new()
            .force(true)
            .v(true)
            .build();
        let name = self.container_name(id);
        let mut attempt = 1;
        loop {
            let err = match self
                .docker
                .remove_container(&name, Some(opts.clone()))
                .await
            {
                Ok(()) => return Ok(()),
                Err(e) => self.error(id, "cleanup", e),
            };
            match err {
                DriverError::NotFound(_) => return Ok(()),
                // A dropped connection, or an engine busy with the same
                // container (a removal or a stop in progress): ask again.
                e if attempt < REMOVE_ATTEMPTS => {
                    tracing::warn!(vm = %id, attempt, error = %e, "container removal failed; retrying");
                    attempt += 1;
                    tokio::time::sleep(Duration::from_millis(300)).await;
                }
                e => return Err(e),
            }
        }
    }
}

/// A tar archive holding `config` at [`CONFIG_PATH`] (relative to `/`).
fn config_archive(config: &VmConfig) -> std::io::Result<Vec<u8>> {
    let json = serde_json::to_vec_pretty(config)?;
    let mut tar = tar::Builder::new(Vec::new());
    let mut dir = tar::Header::new_gnu();
    dir.set_entry_type(tar::EntryType::Directory);
    dir.set_mode(0o755);
    dir.set_size(0);
    tar.append_data(&mut dir, "etc/tern/", std::io::empty())?;
    let mut file = tar::Header::new_gnu();
    file.set_mode(0o644);
    file.set_size(json.len() as u64);
    tar.append_data(&mut file, CONFIG_PATH.trim_start_matches('/'), &json[..])?;
    tar.into_inner()
}

#[async_trait]
impl VmDriver for DockerDriver {
    fn name(&self) -> &'static str {
        "docker"
    }

    async fn place(
        &self,
        _id: VmId,
        _spec: &VmSpec,
    ) -> Result<Option<tern_proto::HostId>, DriverError> {
        Ok(None)
    }

    async fn start(&self, req: &StartRequest) -> Result<VmHandle, DriverError> {
        req.spec
            .validate()
            .map_err(|reason| DriverError::StartFailed { id: req.id, reason })?;
        let image = self.resolve(req.id, &req.spec).await?;
        self.create_and_start(req, &image).await?;
        self.wait_running(req.id).await
    }

    async fn configure(&self, id: VmId, config: &VmConfig) -> Result<(), DriverError> {
        self.inspect(id).await?;
        let archive = config_archive(config).map_err(|e| DriverError::OperationFailed {
            id,
            op: "configure",
            reason: e.to_string(),
        })?;
        let opts = UploadToContainerOptionsBuilder::new().path("/").build();
        self.docker
            .upload_to_container(
                &self.container_name(id),
                Some(opts),
                bollard::body_full(archive.into()),
            )
            .await
            .map_err(|e| self.error(id, "configure", e))
    }

    async fn stop(&self, id: VmId) -> Result<(), DriverError> {
        let t = i32::try_from(self.cfg.stop_timeout_secs).unwrap_or(i32::MAX);
        let opts = StopContainerOptionsBuilder::new().t(t).build();
        match self
            .docker
            .stop_container(&self.container_name(id), Some(opts))
            .await
        {
            Ok(()) => Ok(()),
            // 304: already stopped.
            Err(DockerError::DockerResponseServerError {
                status_code: 304, ..
            }) => Ok(()),
            Err(e) => Err(self.error(id, "stop", e)),
        }
    }

    async fn is_healthy(&self, id: VmId) -> Result<bool, DriverError> {
        let state = self.inspect(id).await?.state.unwrap_or_default();
        let unhealthy = state
            .health
            .and_then(|h| h.status)
            .is_some_and(|s| s == HealthStatusEnum::UNHEALTHY);
        Ok(state.running == Some(true) && state.paused != Some(true) && !unhealthy)
    }

    async fn cleanup(&self, id: VmId) -> Result<(), DriverError> {
        self.remove(id).await
    }

    async fn list(&self) -> Result<Vec<VmId>, DriverError> {
        let filter = format!("{LABEL_INSTANCE}={}", self.cfg.instance);
        let filters = HashMap::from([("label", vec![filter.as_str()])]);
        let opts = ListContainersOptionsBuilder::new()
            .all(true)
            .filters(&filters)
            .build();
        let found = self.docker.list_containers(Some(opts)).await.map_err(|e| {
            DriverError::Unavailable(format!(
                "the Docker Engine at {}: {e}",
                self.cfg.socket.display()
            ))
        })?;
        Ok(found
            .into_iter()
            .filter_map(|c| c.labels?.get(LABEL_VM)?.parse().ok())
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_config_archive_holds_the_config_under_etc_tern() {
        let c = VmConfig {
            settings: [("k".to_string(), "v".to_string())].into(),
            allowed_tools: vec![],
        };
        let bytes = config_archive(&c).unwrap();
        let mut a = tar::Archive::new(&bytes[..]);
        let mut names = Vec::new();
        for e in a.entries().unwrap() {
            let mut e = e.unwrap();
            let name = e.path().unwrap().to_string_lossy().into_owned();
            if name.ends_with("config.json") {
                let back: VmConfig = serde_json::from_reader(&mut e).unwrap();
                assert_eq!(back, c);
            }
            names.push(name);
        }
        assert_eq!(names, ["etc/tern/", "etc/tern/config.json"]);
    }

    #[test]
    fn test_is_always_offered_and_the_operator_may_replace_it() {
        let mut c = DockerConfig::default();
        assert_eq!(c.image("test").unwrap().image, TEST_IMAGE_REF);
        assert!(c.image("nginx").is_none());
        c.images.insert(
            "test".into(),
            ContainerImage {
                image: "mine:2".into(),
                cmd: None,
                health: None,
            },
        );
        assert_eq!(c.image("test").unwrap().image, "mine:2");
        assert_eq!(c.offered(), "test");
    }
}
