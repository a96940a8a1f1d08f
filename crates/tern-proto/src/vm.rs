//! The VM record and its lifecycle.
//!
//! The lifecycle is an explicit state machine: every change of status goes
//! through [`VmStatus::can_transition_to`], and the store applies it with a
//! compare-and-swap on the old status, so two actors can never both move a VM.

use crate::ids::{HostId, OwnerEpoch, TenantId, VmId, VsockCid};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

/// Where a VM is in its life.
///
/// ```text
///  Creating ──► Warm ──► Provisioning ──► Running ──► Unhealthy
///     │          │            ▲   │          │            │
///     │          │  (cold start)  │          │            │
///     ▼          ▼                ▼          ▼            ▼
///  Destroying ◄──┴────────────────┴──────────┴────────────┘ ──► Destroyed
/// ```
/// A VM is born `Creating` (booting for the warm pool) or `Provisioning`
/// (cold start for a tenant that found the pool empty).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VmStatus {
    /// Booting to join the warm pool; no tenant yet.
    Creating,
    /// Booted and idle in the warm pool, waiting for a tenant.
    Warm,
    /// Claimed by (or cold-started for) a tenant; config being injected.
    Provisioning,
    /// Serving its tenant.
    Running,
    /// Failed its health checks; a replacement is on its way.
    Unhealthy,
    /// Being torn down.
    Destroying,
    /// Gone; kept as history. Its vsock CID is free again.
    Destroyed,
}

/// An attempt to move a VM along an edge the lifecycle does not have.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("illegal transition {from} -> {to}")]
pub struct IllegalTransition {
    /// Status the VM was in.
    pub from: VmStatus,
    /// Status that was asked for.
    pub to: VmStatus,
}

impl VmStatus {
    /// Every status, in lifecycle order.
    pub const ALL: [VmStatus; 7] = [
        VmStatus::Creating,
        VmStatus::Warm,
        VmStatus::Provisioning,
        VmStatus::Running,
        VmStatus::Unhealthy,
        VmStatus::Destroying,
        VmStatus::Destroyed,
    ];

    /// Whether a record may be created in this status.
    pub fn is_initial(self) -> bool {
        matches!(self, VmStatus::Creating | VmStatus::Provisioning)
    }

    /// Whether the lifecycle has an edge `self -> next`.
    pub fn can_transition_to(self, next: VmStatus) -> bool {
        use VmStatus::*;
        matches!(
            (self, next),
            (Creating, Warm)
                | (Creating, Destroying)
                | (Warm, Provisioning)
                | (Warm, Destroying)
                | (Provisioning, Running)
                | (Provisioning, Destroying)
                | (Running, Unhealthy)
                | (Running, Destroying)
                | (Unhealthy, Destroying)
                | (Destroying, Destroyed)
        )
    }

    /// Checks an edge, naming it in the error when it does not exist.
    pub fn check_transition(self, next: VmStatus) -> Result<(), IllegalTransition> {
        if self.can_transition_to(next) {
            Ok(())
        } else {
            Err(IllegalTransition {
                from: self,
                to: next,
            })
        }
    }

    /// Whether the VM still exists on a host (anything but destroyed).
    pub fn is_live(self) -> bool {
        self != VmStatus::Destroyed
    }

    /// Stable lowercase name, used in the database and the API.
    pub fn as_str(self) -> &'static str {
        match self {
            VmStatus::Creating => "creating",
            VmStatus::Warm => "warm",
            VmStatus::Provisioning => "provisioning",
            VmStatus::Running => "running",
            VmStatus::Unhealthy => "unhealthy",
            VmStatus::Destroying => "destroying",
            VmStatus::Destroyed => "destroyed",
        }
    }
}

impl fmt::Display for VmStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for VmStatus {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        VmStatus::ALL
            .into_iter()
            .find(|st| st.as_str() == s)
            .ok_or_else(|| format!("unknown VM status `{s}`"))
    }
}

/// Whether `name` can name an image: 1-64 characters of `a-z`, `0-9`, `.`,
/// `_` and `-`, starting with a letter or digit, with no `..`: never a path.
pub fn is_image_name(name: &str) -> bool {
    let ok = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || "._-".contains(c);
    let first_ok = name
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    first_ok && name.len() <= 64 && name.chars().all(ok) && !name.contains("..")
}

/// What a VM is made of. Drivers read what they understand; unknown drivers
/// ignore fields that do not apply to them (a mock VM has no kernel).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmSpec {
    /// Guest RAM in MiB.
    #[serde(default = "VmSpec::default_memory")]
    pub memory_mib: u32,
    /// Number of vCPUs.
    #[serde(default = "VmSpec::default_vcpus")]
    pub vcpus: u8,
    /// Guest image, by name: `test` (tern's own test guest) or an image of
    /// the operator's catalogue. Never a path: the files an image boots are
    /// the operator's choice, not the tenant's.
    #[serde(default = "VmSpec::default_image")]
    pub image: String,
    /// Labels every host it runs on must carry (`region = "eu"`: data
    /// residency). It is never placed on, or migrated to, a host without
    /// them.
    #[serde(default, skip_serializing_if = "crate::Labels::is_empty")]
    pub labels: crate::Labels,
}

impl VmSpec {
    fn default_memory() -> u32 {
        256
    }
    fn default_vcpus() -> u8 {
        1
    }
    fn default_image() -> String {
        "test".into()
    }

    /// Refuses specs no driver could honour, with a message naming the field.
    pub fn validate(&self) -> Result<(), String> {
        if !(16..=1024 * 1024).contains(&self.memory_mib) {
            return Err(format!(
                "spec.memory_mib must be between 16 and 1048576, got {}",
                self.memory_mib
            ));
        }
        if !(1..=64).contains(&self.vcpus) {
            return Err(format!(
                "spec.vcpus must be between 1 and 64, got {}",
                self.vcpus
            ));
        }
        if self.labels.len() > 16
            || self
                .labels
                .iter()
                .any(|(k, v)| k.is_empty() || k.len() > 64 || v.len() > 64)
        {
            return Err(
                "spec.labels: at most 16, each key 1-64 and each value 0-64 characters".into(),
            );
        }
        if !is_image_name(&self.image) {
            return Err(format!(
                "spec.image `{}` is not an image name (1-64 characters of a-z, 0-9, `.`, `_`, `-`)",
                self.image.chars().take(80).collect::<String>()
            ));
        }
        Ok(())
    }
}

impl Default for VmSpec {
    fn default() -> Self {
        Self {
            memory_mib: Self::default_memory(),
            vcpus: Self::default_vcpus(),
            image: Self::default_image(),
            labels: crate::Labels::new(),
        }
    }
}

/// Tenant configuration injected into a VM when it is provisioned or reconfigured.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    /// Free-form settings (environment, workload parameters).
    #[serde(default)]
    pub settings: BTreeMap<String, String>,
    /// Tools the workload inside the VM may call; empty means none.
    #[serde(default)]
    pub allowed_tools: Vec<String>,
}

impl VmConfig {
    /// Refuses configs that would bloat records or smuggle junk into guests.
    pub fn validate(&self) -> Result<(), String> {
        if self.settings.len() > 256 {
            return Err("config.settings may hold at most 256 entries".into());
        }
        for (k, v) in &self.settings {
            if k.is_empty() || k.len() > 128 {
                return Err(format!(
                    "config.settings key `{k}` must be 1-128 characters"
                ));
            }
            if v.len() > 4096 {
                return Err(format!("config.settings.{k} is longer than 4096 bytes"));
            }
        }
        if self.allowed_tools.len() > 256 {
            return Err("config.allowed_tools may hold at most 256 entries".into());
        }
        for t in &self.allowed_tools {
            if t.is_empty() || t.len() > 128 {
                return Err(format!(
                    "config.allowed_tools entry `{t}` must be 1-128 characters"
                ));
            }
        }
        Ok(())
    }
}

/// Body of `POST /api/v1/vms`. Both fields are optional: an empty body gets a
/// warm VM of the pool's spec with no configuration.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateVmRequest {
    /// A spec other than the pool's cold-starts a VM of that spec.
    #[serde(default)]
    pub spec: Option<VmSpec>,
    /// Configuration to inject.
    #[serde(default)]
    pub config: VmConfig,
}

/// Everything the control plane knows about one VM.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VmRecord {
    /// The VM's identity.
    pub id: VmId,
    /// The tenant it serves; `None` while it sits in the warm pool.
    pub tenant: Option<TenantId>,
    /// Where it is in its life.
    pub status: VmStatus,
    /// The host that owns it.
    pub host: HostId,
    /// Ownership generation; bumped when the VM moves host.
    pub owner_epoch: OwnerEpoch,
    /// What it is made of.
    pub spec: VmSpec,
    /// The tenant's configuration.
    pub config: VmConfig,
    /// Its vsock CID; released (None) once destroyed.
    pub vsock_cid: Option<VsockCid>,
    /// Health checks failed in a row.
    pub consecutive_failures: u32,
    /// When its health was last checked.
    pub last_health_check: Option<DateTime<Utc>>,
    /// When the record was created.
    pub created_at: DateTime<Utc>,
    /// When anything in the record last changed.
    pub updated_at: DateTime<Utc>,
    /// When the status last changed (a warm VM's age in the pool).
    pub status_changed_at: DateTime<Utc>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn lifecycle_edges() {
        use VmStatus::*;
        assert!(Warm.can_transition_to(Provisioning));
        assert!(Running.can_transition_to(Unhealthy));
        assert!(!Destroyed.can_transition_to(Running));
        assert!(!Warm.can_transition_to(Running));
        assert!(!Running.can_transition_to(Warm));
        assert_eq!(
            Destroyed.check_transition(Warm).unwrap_err().to_string(),
            "illegal transition destroyed -> warm"
        );
    }

    proptest! {
        /// From any status, following only legal edges always ends in Destroyed
        /// and never revisits a status (the lifecycle has no cycles).
        #[test]
        fn lifecycle_is_acyclic_and_ends_destroyed(choices in proptest::collection::vec(0usize..7, 0..20)) {
            let mut st = VmStatus::Creating;
            let mut seen = vec![st];
            for c in choices {
                let next: Vec<_> = VmStatus::ALL.into_iter().filter(|n| st.can_transition_to(*n)).collect();
                if next.is_empty() { break; }
                st = next[c % next.len()];
                prop_assert!(!seen.contains(&st));
                seen.push(st);
            }
            // Destroying is reachable from every live status and Destroyed from it.
            if st != VmStatus::Destroyed && st != VmStatus::Destroying {
                prop_assert!(st.can_transition_to(VmStatus::Destroying));
            }
        }
    }

    #[test]
    fn status_names_round_trip() {
        for s in VmStatus::ALL {
            assert_eq!(s.as_str().parse::<VmStatus>().unwrap(), s);
            assert_eq!(serde_json::to_string(&s).unwrap(), format!("\"{s}\""));
        }
        assert!("zombie".parse::<VmStatus>().is_err());
    }

    #[test]
    fn specs_are_validated() {
        assert!(VmSpec::default().validate().is_ok());
        let bad = VmSpec {
            vcpus: 0,
            ..VmSpec::default()
        };
        assert!(bad.validate().unwrap_err().contains("spec.vcpus"));
        assert!(serde_json::from_str::<VmSpec>(r#"{"memry_mib": 3}"#).is_err());
    }

    /// Issue 14, finding 1: a tenant names an image, never a file.
    #[test]
    fn specs_name_no_files() {
        for field in ["kernel", "initrd", "cmdline"] {
            let body = format!(r#"{{"image": "linux", "{field}": "/var/lib/tern/jwt-secret"}}"#);
            let err = serde_json::from_str::<VmSpec>(&body).unwrap_err();
            assert!(err.to_string().contains("unknown field"), "{err}");
        }
        for image in ["/etc/shadow", "../../etc/shadow", "a/b", "", "Linux"] {
            let spec = VmSpec {
                image: image.into(),
                ..VmSpec::default()
            };
            assert!(
                spec.validate().unwrap_err().contains("spec.image"),
                "{image}"
            );
        }
    }
}
