//! Per-tenant quotas: how many VMs, how much memory and how many vCPUs a
//! tenant may hold at once, checked when a VM is created.

use crate::{TenantId, VmRecord, VmSpec};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// One tenant's limits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Quota {
    /// Live VMs at once.
    pub max_vms: u64,
    /// Guest RAM over all its live VMs, MiB.
    pub max_memory_mib: u64,
    /// vCPUs over all its live VMs.
    pub max_vcpus: u64,
}

impl Default for Quota {
    fn default() -> Self {
        Self {
            max_vms: 64,
            max_memory_mib: 256 * 1024,
            max_vcpus: 256,
        }
    }
}

/// Quotas of every tenant: a default, and overrides by tenant name.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Quotas {
    /// For tenants without an entry of their own.
    pub default: Quota,
    /// Per-tenant overrides.
    pub tenants: BTreeMap<String, Quota>,
}

/// A create that would take a tenant over its quota.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("tenant {tenant} is over its quota: {what} would be {would_be}, the limit is {limit}")]
pub struct QuotaExceeded {
    /// The tenant.
    pub tenant: String,
    /// `VMs`, `memory MiB` or `vCPUs`.
    pub what: &'static str,
    /// What the tenant would hold with the new VM.
    pub would_be: u64,
    /// Its limit.
    pub limit: u64,
}

impl Quotas {
    /// The limits of `tenant`.
    pub fn of(&self, tenant: &TenantId) -> Quota {
        self.tenants
            .get(tenant.as_str())
            .copied()
            .unwrap_or(self.default)
    }

    /// Whether `tenant`, holding `live`, may add a VM of `spec`.
    pub fn admit(
        &self,
        tenant: &TenantId,
        live: &[VmRecord],
        spec: &VmSpec,
    ) -> Result<(), QuotaExceeded> {
        let q = self.of(tenant);
        let sum = |f: fn(&VmSpec) -> u64| live.iter().map(|v| f(&v.spec)).sum::<u64>() + f(spec);
        let checks = [
            ("VMs", live.len() as u64 + 1, q.max_vms),
            ("memory MiB", sum(|s| s.memory_mib as u64), q.max_memory_mib),
            ("vCPUs", sum(|s| s.vcpus as u64), q.max_vcpus),
        ];
        for (what, would_be, limit) in checks {
            if would_be > limit {
                return Err(QuotaExceeded {
                    tenant: tenant.to_string(),
                    what,
                    would_be,
                    limit,
                });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overrides_apply_and_every_dimension_counts() {
        let q: Quotas = toml_like(
            r#"{"default": {"max_vms": 3}, "tenants": {"small": {"max_vms": 1, "max_memory_mib": 512, "max_vcpus": 2}}}"#,
        );
        let small = TenantId::new("small").unwrap();
        let big = TenantId::new("big").unwrap();
        assert_eq!(q.of(&big).max_vms, 3);
        assert_eq!(q.of(&big).max_vcpus, 256);
        let spec = VmSpec {
            memory_mib: 1024,
            ..VmSpec::default()
        };
        let e = q.admit(&small, &[], &spec).unwrap_err();
        assert_eq!(e.what, "memory MiB");
        q.admit(&small, &[], &VmSpec::default()).unwrap();
        q.admit(&big, &[], &spec).unwrap();
    }

    fn toml_like(json: &str) -> Quotas {
        serde_json::from_str(json).unwrap()
    }
}
