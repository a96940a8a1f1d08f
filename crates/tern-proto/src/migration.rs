//! The phases of a live migration, one vocabulary for both ends.
//!
//! The engine publishes them in its progress, the agents serve them on
//! their APIs and write them in their journals, and the CLI prints them:
//! one enum, so no side can name a phase the others do not know.

use serde::{Deserialize, Serialize};

/// Where a migration stands, on either end. The destination passes through
/// the same phases as the source, each as it learns of it: it is in
/// `Precopy` while pages arrive, in `Switchover` while it verifies the
/// manifest and loads the state, and `Postcopy` once it runs the guest
/// with pages still to come.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MigrationPhase {
    /// Not started.
    #[default]
    Idle,
    /// The source asked; the destination is deciding.
    Requesting,
    /// Pages are copied while the guest runs on the source.
    Precopy,
    /// The source paused the guest and sends the rest; the destination
    /// verifies it and loads the state.
    Switchover,
    /// `Commit` went out unconfirmed: the paused source waits for the
    /// destination's verdict before it resumes or discards the guest.
    CommitInDoubt,
    /// Ownership moved: the guest runs on the destination while its last
    /// pages follow from the source.
    Postcopy,
    /// Ownership moved and every page arrived: the destination runs the
    /// guest, the source's copy is gone.
    Committed,
    /// Ended before commit: the source runs the guest, the destination
    /// discarded what it received.
    RolledBack,
    /// Ownership moved, but the guest's own check afterwards says its
    /// memory is wrong (QEMU reported success).
    Corrupted,
}

impl MigrationPhase {
    /// Whether the migration has ended.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            MigrationPhase::Committed | MigrationPhase::RolledBack | MigrationPhase::Corrupted
        )
    }

    /// Whether ownership of the guest has moved to the destination.
    pub fn ownership_moved(self) -> bool {
        matches!(
            self,
            MigrationPhase::Postcopy | MigrationPhase::Committed | MigrationPhase::Corrupted
        )
    }

    /// The name used on the wire and in logs (`precopy`, `rolled_back`, …).
    pub fn as_str(self) -> &'static str {
        match self {
            MigrationPhase::Idle => "idle",
            MigrationPhase::Requesting => "requesting",
            MigrationPhase::Precopy => "precopy",
            MigrationPhase::Switchover => "switchover",
            MigrationPhase::CommitInDoubt => "commit_in_doubt",
            MigrationPhase::Postcopy => "postcopy",
            MigrationPhase::Committed => "committed",
            MigrationPhase::RolledBack => "rolled_back",
            MigrationPhase::Corrupted => "corrupted",
        }
    }
}

impl std::fmt::Display for MigrationPhase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Which end of a migration a host is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MigrationRole {
    /// Sends the guest.
    Source,
    /// Receives it.
    Destination,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_match_serde() {
        for p in [
            MigrationPhase::Idle,
            MigrationPhase::Requesting,
            MigrationPhase::Precopy,
            MigrationPhase::Switchover,
            MigrationPhase::CommitInDoubt,
            MigrationPhase::Postcopy,
            MigrationPhase::Committed,
            MigrationPhase::RolledBack,
            MigrationPhase::Corrupted,
        ] {
            assert_eq!(serde_json::to_string(&p).unwrap(), format!("\"{p}\""));
            assert!(!(p.is_final() && p == MigrationPhase::Postcopy));
        }
    }
}
