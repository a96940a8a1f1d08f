//! Identifiers as newtypes, so a tenant can never be passed where a host is expected.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;
use uuid::Uuid;

/// Why a string was refused as an identifier.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IdError {
    /// The text is not a UUID (VM ids are UUIDs so they never collide across hosts).
    #[error("`{0}` is not a valid VM id (expected a UUID)")]
    BadVmId(String),
    /// The text is not a UUID (actor ids are UUIDs, like VM ids).
    #[error("`{0}` is not a valid actor id (expected a UUID)")]
    BadActorId(String),
    /// Names (tenants, hosts) must be short and printable so they are safe in logs, URLs and SQL.
    #[error("`{value}` is not a valid {kind}: use 1-64 characters from [A-Za-z0-9._-]")]
    BadName {
        /// Which kind of name was refused.
        kind: &'static str,
        /// The refused value.
        value: String,
    },
    /// vsock CIDs 0-2 are reserved by the vsock specification (hypervisor, local, host).
    #[error("vsock CID {0} is reserved; guest CIDs start at 3")]
    ReservedCid(u32),
}

/// A random UUID id: `new`, its 16 bytes, `Display` and `FromStr` (refusing
/// with the given `IdError` variant).
macro_rules! uuid_newtype {
    ($(#[$doc:meta])* $name:ident, $err:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(Uuid);

        impl $name {
            /// A fresh random id.
            pub fn new() -> Self {
                Self(Uuid::new_v4())
            }

            /// The id's 16 bytes, as binary records carry it.
            pub fn to_bytes(self) -> [u8; 16] {
                *self.0.as_bytes()
            }

            /// The id from its 16 bytes.
            pub fn from_bytes(b: [u8; 16]) -> Self {
                Self(Uuid::from_bytes(b))
            }
        }

        impl Default for $name {
            fn default() -> Self {
                Self::new()
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.fmt(f)
            }
        }

        impl FromStr for $name {
            type Err = IdError;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Uuid::parse_str(s)
                    .map(Self)
                    .map_err(|_| IdError::$err(s.to_owned()))
            }
        }
    };
}

uuid_newtype!(
    /// A VM's identity for its whole life, across hosts and migrations.
    VmId,
    BadVmId
);

uuid_newtype!(
    /// A WebAssembly actor's identity for its whole life, across executors,
    /// migrations and restores from checkpoints.
    ActorId,
    BadActorId
);

fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

macro_rules! name_newtype {
    ($(#[$doc:meta])* $name:ident, $kind:literal) => {
        $(#[$doc])*
        #[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl $name {
            /// Validates and wraps a name.
            pub fn new(s: impl Into<String>) -> Result<Self, IdError> {
                let s = s.into();
                if valid_name(&s) {
                    Ok(Self(s))
                } else {
                    Err(IdError::BadName { kind: $kind, value: s })
                }
            }

            /// The name as text.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl FromStr for $name {
            type Err = IdError;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Self::new(s)
            }
        }

        impl TryFrom<String> for $name {
            type Error = IdError;
            fn try_from(s: String) -> Result<Self, Self::Error> {
                Self::new(s)
            }
        }

        impl From<$name> for String {
            fn from(v: $name) -> String {
                v.0
            }
        }
    };
}

name_newtype!(
    /// The tenant a VM belongs to; the unit of isolation in the API.
    TenantId,
    "tenant id"
);
name_newtype!(
    /// A host (agent) that runs VMs; owner records name one.
    HostId,
    "host id"
);
name_newtype!(
    /// An actor executor (one per host, run by its agent or `tern executor`);
    /// it owns actors and signs their checkpoints.
    ExecutorId,
    "executor id"
);
name_newtype!(
    /// Who sends messages to actors (a client, an executor, another actor):
    /// actors handle each sender's messages once each, in its order.
    SenderId,
    "sender id"
);
name_newtype!(
    /// A migration, the same on both hosts and in the control plane's store.
    MigrationId,
    "migration id"
);

/// A guest's vsock context id: unique among live VMs on a control plane.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "u32", into = "u32")]
pub struct VsockCid(u32);

impl VsockCid {
    /// The first CID a guest may have.
    pub const FIRST: VsockCid = VsockCid(3);

    /// Validates a CID (0-2 are reserved).
    pub fn new(cid: u32) -> Result<Self, IdError> {
        if cid < 3 {
            Err(IdError::ReservedCid(cid))
        } else {
            Ok(Self(cid))
        }
    }

    /// The raw value.
    pub fn get(self) -> u32 {
        self.0
    }
}

impl TryFrom<u32> for VsockCid {
    type Error = IdError;
    fn try_from(v: u32) -> Result<Self, Self::Error> {
        Self::new(v)
    }
}

impl From<VsockCid> for u32 {
    fn from(v: VsockCid) -> u32 {
        v.0
    }
}

impl fmt::Display for VsockCid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// Generation of a VM's ownership: bumped each time the VM changes host, so a
/// stale host can be told apart from the current owner by compare-and-swap.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct OwnerEpoch(pub u64);

impl OwnerEpoch {
    /// The epoch after this one.
    pub fn next(self) -> Self {
        Self(self.0 + 1)
    }
}

impl fmt::Display for OwnerEpoch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_validated() {
        assert!(TenantId::new("acme-1.prod_x").is_ok());
        assert!(TenantId::new("").is_err());
        assert!(TenantId::new("a b").is_err());
        assert!(TenantId::new("x".repeat(65)).is_err());
        assert!(HostId::new("host'; drop table").is_err());
        let e = TenantId::new("a/b").unwrap_err();
        assert!(e.to_string().contains("tenant id"));
    }

    #[test]
    fn cids_start_at_three() {
        assert!(VsockCid::new(2).is_err());
        assert_eq!(VsockCid::new(3).unwrap(), VsockCid::FIRST);
    }

    #[test]
    fn ids_round_trip_through_json() {
        let t = TenantId::new("t1").unwrap();
        let j = serde_json::to_string(&t).unwrap();
        assert_eq!(j, "\"t1\"");
        assert!(serde_json::from_str::<TenantId>("\"bad name\"").is_err());
        let id = VmId::new();
        assert_eq!(id.to_string().parse::<VmId>().unwrap(), id);
        assert!("nope".parse::<VmId>().is_err());
    }
}
