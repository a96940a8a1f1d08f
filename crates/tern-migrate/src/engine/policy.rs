//! How the source runs a migration.

use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// A request to stop a migration before its switchover (an operator's
/// cancel, or a more urgent migration preempting this one). Clones share
/// it; the engine looks at it between frames of pre-copy, and a migration
/// that already began its switchover finishes.
#[derive(Clone, Debug, Default)]
pub struct Cancel(Arc<AtomicBool>);

impl Cancel {
    /// Asks the migration to stop.
    pub fn cancel(&self) {
        self.0.store(true, Ordering::SeqCst);
    }

    /// Whether it was asked to stop.
    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

/// How pages move.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// Copy while the guest runs, stop it for the last dirty pages.
    Precopy,
    /// Start the guest on the destination at once; pages follow on demand
    /// and in the background.
    Postcopy,
    /// Pre-copy rounds while they converge (up to `hybrid_rounds`), then post-copy.
    Hybrid,
}

impl std::str::FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "precopy" => Ok(Mode::Precopy),
            "postcopy" => Ok(Mode::Postcopy),
            "hybrid" => Ok(Mode::Hybrid),
            other => Err(format!(
                "unknown mode `{other}` (precopy, postcopy, hybrid)"
            )),
        }
    }
}

/// How pages that are not zero, duplicate or a small delta are compressed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Codec {
    /// Chosen as pages go, from the measured link rate and what each codec
    /// achieves on this guest's pages (`engine/codec.rs`): none on a fast
    /// link or incompressible memory, LZ4 or zstd on slower links.
    #[default]
    Auto,
    /// Never compressed.
    None,
    /// Always LZ4.
    Lz4,
    /// Always zstd (level 3).
    Zstd,
}

impl std::str::FromStr for Codec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Codec::Auto),
            "none" => Ok(Codec::None),
            "lz4" => Ok(Codec::Lz4),
            "zstd" => Ok(Codec::Zstd),
            other => Err(format!("compress `{other}`: use auto, none, lz4 or zstd")),
        }
    }
}

/// How the source runs a migration.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default)]
pub struct Policy {
    /// Pre-copy, post-copy or hybrid.
    pub mode: Mode,
    /// Hybrid: pre-copy rounds before switching to post-copy.
    pub hybrid_rounds: u32,
    /// Throttle the guest when pre-copy rounds stop shrinking (auto-converge).
    pub auto_converge: bool,
    /// Give up and roll back if switchover has not begun by then.
    pub deadline: Option<Duration>,
    /// The longest the guest may be stopped.
    pub max_downtime: Duration,
    /// Rounds before switching over regardless.
    pub max_rounds: u32,
    /// Pages per codec frame (256: 1 MiB frames keep the source within its
    /// RAM + 5 %; 4 MiB frames took a busy 1 GiB guest's process to +6 %
    /// with no gain in speed).
    pub frame_pages: usize,
    /// How long to wait for each reply.
    pub reply_timeout: Duration,
    /// Cap on the data session's rate in bytes/s (0: none).
    pub bandwidth_bytes_per_sec: u64,
    /// When pre-copy stops converging under a cap, raise the cap (×1.5 per
    /// round) up to this before throttling the guest (0: never raise).
    pub max_bandwidth_bytes_per_sec: u64,
    /// Why the migration is asked for (sent to the destination, logged there).
    pub reason: String,
    /// Page compression (default: adaptive).
    pub compression: Codec,
    /// Stops it before switchover (not sent anywhere: the process that
    /// runs the migration holds it).
    #[serde(skip)]
    pub cancel: Cancel,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            mode: Mode::Precopy,
            hybrid_rounds: 2,
            auto_converge: true,
            deadline: None,
            max_downtime: Duration::from_millis(50),
            max_rounds: 30,
            frame_pages: 256,
            reply_timeout: Duration::from_secs(30),
            bandwidth_bytes_per_sec: 0,
            max_bandwidth_bytes_per_sec: 0,
            reason: "operator".into(),
            compression: Codec::Auto,
            cancel: Cancel::default(),
        }
    }
}
