//! An in-memory driver with deterministic fault injection.
//!
//! This is a product feature, not only a test double: operators run
//! `tern up --driver mock` to rehearse failure handling (VMs that fail to
//! start, fail health checks, or start slowly) without a hypervisor.
//!
//! With a state file, the mock's VMs survive a restart of the control plane,
//! just as real VM processes do, so restart reconciliation can be rehearsed too.

use crate::{DriverError, StartRequest, VmDriver, VmHandle};
use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;
use tern_proto::{VmConfig, VmId, VmSpec};

/// Faults to inject. All counts are deterministic: no randomness.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MockFaults {
    /// After this many successful starts, every further start fails.
    #[serde(default)]
    pub fail_start_after: Option<u64>,
    /// Each VM answers healthy to this many probes, then unhealthy forever.
    #[serde(default)]
    pub fail_health_after: Option<u64>,
    /// Each start takes this long (milliseconds), like a slow boot.
    #[serde(default)]
    pub start_delay_ms: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct MockVm {
    spec: VmSpec,
    config: VmConfig,
    running: bool,
    health_probes: u64,
    /// Forced unhealthy by an operator or test.
    forced_unhealthy: bool,
}

#[derive(Default, Serialize, Deserialize)]
struct MockState {
    vms: BTreeMap<VmId, MockVm>,
    starts: u64,
}

/// The mock driver. Cheap to clone behind an `Arc`; all state sits behind one lock.
pub struct MockDriver {
    state: Mutex<MockState>,
    faults: Mutex<MockFaults>,
    state_file: Option<PathBuf>,
}

impl MockDriver {
    /// A purely in-memory driver.
    pub fn new(faults: MockFaults) -> Self {
        Self {
            state: Mutex::new(MockState::default()),
            faults: Mutex::new(faults),
            state_file: None,
        }
    }

    /// A driver whose VMs persist in `path` (JSON), so they outlive the process.
    pub fn with_state_file(faults: MockFaults, path: &Path) -> Result<Self, DriverError> {
        let state = match std::fs::read(path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| {
                DriverError::Unavailable(format!(
                    "mock state file {} is corrupt: {e}",
                    path.display()
                ))
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => MockState::default(),
            Err(e) => {
                return Err(DriverError::Unavailable(format!(
                    "cannot read mock state file {}: {e}",
                    path.display()
                )))
            }
        };
        Ok(Self {
            state: Mutex::new(state),
            faults: Mutex::new(faults),
            state_file: Some(path.to_owned()),
        })
    }

    /// Changes the injected faults while running.
    pub fn set_faults(&self, faults: MockFaults) {
        *self.faults.lock().expect("mock faults lock") = faults;
    }

    /// Makes one VM fail every health probe from now on.
    pub fn make_unhealthy(&self, id: VmId) -> Result<(), DriverError> {
        self.mutate(|s| {
            let vm = s.vms.get_mut(&id).ok_or(DriverError::NotFound(id))?;
            vm.forced_unhealthy = true;
            Ok(())
        })
    }

    /// Makes a VM vanish without the control plane's knowledge (a crashed VM process).
    pub fn vanish(&self, id: VmId) -> Result<(), DriverError> {
        self.mutate(|s| {
            s.vms.remove(&id).ok_or(DriverError::NotFound(id))?;
            Ok(())
        })
    }

    /// Starts a VM the control plane never asked for (an orphan), for reconciliation drills.
    pub fn inject_orphan(&self, id: VmId) -> Result<(), DriverError> {
        self.mutate(|s| {
            s.vms.insert(
                id,
                MockVm {
                    spec: VmSpec::default(),
                    config: VmConfig::default(),
                    running: true,
                    health_probes: 0,
                    forced_unhealthy: false,
                },
            );
            Ok(())
        })
    }

    /// The config last injected into a VM, if it exists.
    pub fn config_of(&self, id: VmId) -> Option<VmConfig> {
        let s = self.state.lock().expect("mock state lock");
        s.vms.get(&id).map(|v| v.config.clone())
    }

    /// Whether the driver currently holds this VM and it is running.
    pub fn is_running(&self, id: VmId) -> bool {
        let s = self.state.lock().expect("mock state lock");
        s.vms.get(&id).is_some_and(|v| v.running)
    }

    /// Number of VMs the driver holds.
    pub fn vm_count(&self) -> usize {
        self.state.lock().expect("mock state lock").vms.len()
    }

    fn mutate<T>(
        &self,
        f: impl FnOnce(&mut MockState) -> Result<T, DriverError>,
    ) -> Result<T, DriverError> {
        let mut s = self.state.lock().expect("mock state lock");
        let out = f(&mut s)?;
        if let Some(path) = &self.state_file {
            let bytes = serde_json::to_vec(&*s)
                .map_err(|e| DriverError::Unavailable(format!("cannot encode mock state: {e}")))?;
            let tmp = path.with_extension("tmp");
            std::fs::write(&tmp, bytes)
                .and_then(|_| std::fs::rename(&tmp, path))
                .map_err(|e| {
                    DriverError::Unavailable(format!(
                        "cannot write mock state file {}: {e}",
                        path.display()
                    ))
                })?;
        }
        Ok(out)
    }
}

#[async_trait]
impl VmDriver for MockDriver {
    fn name(&self) -> &'static str {
        "mock"
    }

    async fn place(
        &self,
        _id: VmId,
        _spec: &tern_proto::VmSpec,
    ) -> Result<Option<tern_proto::HostId>, DriverError> {
        // One machine: every VM runs on the control plane's host.
        Ok(None)
    }

    async fn start(&self, req: &StartRequest) -> Result<VmHandle, DriverError> {
        let faults = self.faults.lock().expect("mock faults lock").clone();
        if faults.start_delay_ms > 0 {
            tokio::time::sleep(Duration::from_millis(faults.start_delay_ms)).await;
        }
        self.mutate(|s| {
            if let Some(limit) = faults.fail_start_after {
                if s.starts >= limit {
                    return Err(DriverError::StartFailed {
                        id: req.id,
                        reason: format!("injected fault: starts fail after {limit}"),
                    });
                }
            }
            s.starts += 1;
            s.vms.insert(
                req.id,
                MockVm {
                    spec: req.spec.clone(),
                    config: VmConfig::default(),
                    running: true,
                    health_probes: 0,
                    forced_unhealthy: false,
                },
            );
            Ok(())
        })?;
        Ok(VmHandle {
            id: req.id,
            driver: "mock".into(),
            detail: format!(
                "mock vm, {} MiB, {} vcpu",
                req.spec.memory_mib, req.spec.vcpus
            ),
        })
    }

    async fn configure(&self, id: VmId, config: &VmConfig) -> Result<(), DriverError> {
        self.mutate(|s| {
            let vm = s.vms.get_mut(&id).ok_or(DriverError::NotFound(id))?;
            vm.config = config.clone();
            Ok(())
        })
    }

    async fn stop(&self, id: VmId) -> Result<(), DriverError> {
        self.mutate(|s| {
            if let Some(vm) = s.vms.get_mut(&id) {
                vm.running = false;
            }
            Ok(())
        })
    }

    async fn is_healthy(&self, id: VmId) -> Result<bool, DriverError> {
        let fail_after = self
            .faults
            .lock()
            .expect("mock faults lock")
            .fail_health_after;
        self.mutate(|s| {
            let vm = s.vms.get_mut(&id).ok_or(DriverError::NotFound(id))?;
            vm.health_probes += 1;
            let over_limit = fail_after.is_some_and(|n| vm.health_probes > n);
            Ok(vm.running && !vm.forced_unhealthy && !over_limit)
        })
    }

    async fn cleanup(&self, id: VmId) -> Result<(), DriverError> {
        self.mutate(|s| {
            s.vms.remove(&id);
            Ok(())
        })
    }

    async fn list(&self) -> Result<Vec<VmId>, DriverError> {
        let s = self.state.lock().expect("mock state lock");
        Ok(s.vms.keys().copied().collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req() -> StartRequest {
        StartRequest {
            id: VmId::new(),
            spec: VmSpec::default(),
            vsock_cid: None,
            host: tern_proto::HostId::new("local").unwrap(),
            epoch: tern_proto::OwnerEpoch(1),
        }
    }

    #[tokio::test]
    async fn the_mock_keeps_the_driver_contract() {
        let d = MockDriver::new(MockFaults::default());
        let make = |id, spec| StartRequest { id, spec, ..req() };
        crate::conformance::run(&d, VmSpec::default(), make, None).await;
    }

    #[tokio::test]
    async fn start_fails_after_n() {
        let d = MockDriver::new(MockFaults {
            fail_start_after: Some(2),
            ..Default::default()
        });
        d.start(&req()).await.unwrap();
        d.start(&req()).await.unwrap();
        let err = d.start(&req()).await.unwrap_err();
        assert!(matches!(err, DriverError::StartFailed { .. }));
        assert_eq!(d.vm_count(), 2);
    }

    #[tokio::test]
    async fn health_fails_after_n_probes() {
        let d = MockDriver::new(MockFaults {
            fail_health_after: Some(2),
            ..Default::default()
        });
        let r = req();
        d.start(&r).await.unwrap();
        assert!(d.is_healthy(r.id).await.unwrap());
        assert!(d.is_healthy(r.id).await.unwrap());
        assert!(!d.is_healthy(r.id).await.unwrap());
        assert!(matches!(
            d.is_healthy(VmId::new()).await,
            Err(DriverError::NotFound(_))
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn slow_start_takes_the_delay() {
        let d = MockDriver::new(MockFaults {
            start_delay_ms: 500,
            ..Default::default()
        });
        let t = tokio::time::Instant::now();
        d.start(&req()).await.unwrap();
        assert!(t.elapsed() >= Duration::from_millis(500));
    }

    #[tokio::test]
    async fn state_file_survives_restart_and_corruption_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mock.json");
        let r = req();
        {
            let d = MockDriver::with_state_file(MockFaults::default(), &path).unwrap();
            d.start(&r).await.unwrap();
            d.configure(r.id, &VmConfig::default()).await.unwrap();
        }
        let d = MockDriver::with_state_file(MockFaults::default(), &path).unwrap();
        assert_eq!(d.list().await.unwrap(), vec![r.id]);
        d.cleanup(r.id).await.unwrap();
        d.cleanup(r.id).await.unwrap(); // idempotent
        std::fs::write(&path, b"{not json").unwrap();
        let err = MockDriver::with_state_file(MockFaults::default(), &path)
            .err()
            .unwrap();
        assert!(err.to_string().contains("corrupt"));
    }
}
