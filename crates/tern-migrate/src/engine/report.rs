//! What a migration publishes while it runs ([`Progress`]) and reports when
//! it ends ([`Report`]).

use serde::{Deserialize, Serialize};
use tern_proto::MigrationPhase;

/// A live view of a migration, published after every frame and round.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Progress {
    /// Where it stands.
    pub phase: MigrationPhase,
    /// Pre-copy round (0 before the first).
    pub round: u32,
    /// Pages sent so far (all rounds; on the destination, received).
    pub pages_sent: u64,
    /// Pages still to send in this round plus those dirtied since it began.
    pub pages_remaining: u64,
    /// Encoded page bytes on the wire so far (sent, or received).
    pub wire_bytes: u64,
    /// Pages the guest dirtied per second in the last round.
    pub dirty_pages_per_sec: f64,
    /// Best measured link throughput, bytes/s.
    pub throughput_bytes_per_sec: f64,
    /// Downtime of switching over now, from the dirty set and throughput.
    pub predicted_downtime_ms: f64,
    /// Time left, from what remains, the dirty rate and the throughput.
    pub eta_seconds: f64,
    /// Guest RAM.
    pub memory_bytes: u64,
    /// Post-copy only: the link is down and the migration waits for it
    /// (the destination guest waits on its missing pages meanwhile).
    #[serde(default)]
    pub link_down: bool,
    /// Switchover: the destination verified everything it received and is
    /// ready to run the guest; `Commit` goes next.
    #[serde(default)]
    pub destination_ready: bool,
}

/// The destination's count of a page frame it placed: `pages` pages in
/// `bytes` on the wire (in post-copy, fewer still to come).
pub(super) fn received(progress: &tokio::sync::watch::Sender<Progress>, pages: u64, bytes: usize) {
    progress.send_modify(|x| {
        x.pages_sent += pages;
        x.pages_remaining = x.pages_remaining.saturating_sub(pages);
        x.wire_bytes += bytes as u64;
    });
}

/// One round's figures.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RoundStats {
    /// Round number.
    pub round: u32,
    /// Pages sent.
    pub pages: u64,
    /// Bytes on the wire (encoded).
    pub wire_bytes: u64,
    /// How long it took.
    pub seconds: f64,
    /// Pages written during it (sent next round).
    pub dirtied: u64,
    /// Predicted downtime of switching over after it.
    pub predicted_downtime_ms: f64,
}

/// What a finished (or rolled back) migration did.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Report {
    /// Final phase.
    pub phase: MigrationPhase,
    /// Rounds.
    pub rounds: Vec<RoundStats>,
    /// Pages sent in all (including switchover).
    pub pages_sent: u64,
    /// Encoded page bytes on the wire.
    pub wire_bytes: u64,
    /// Guest RAM.
    pub memory_bytes: u64,
    /// Pause on the source → running on the destination (measured).
    pub downtime_ms: f64,
    /// Whole migration.
    pub total_ms: f64,
    /// Whether the guest ran on the destination before all pages arrived.
    #[serde(default)]
    pub postcopy: bool,
    /// Post-copy: pages the destination asked for because the guest touched them.
    #[serde(default)]
    pub faults_served: u64,
    /// Post-copy: guest started on the destination → last page acknowledged.
    #[serde(default)]
    pub postcopy_ms: f64,
    /// Times the link went down during post-copy and was waited for.
    #[serde(default)]
    pub postcopy_link_losses: u64,
    /// Pages the guest never wrote: zeros on both sides, not sent at all.
    #[serde(default)]
    pub pages_never_written: u64,
    /// Auto-converge: the most the guest was throttled, percent.
    #[serde(default)]
    pub throttle_percent: u8,
    /// The bandwidth cap was raised to this (bytes/s; 0: never raised).
    #[serde(default)]
    pub bandwidth_raised_to: u64,
    /// Where the downtime went, step by step.
    #[serde(default)]
    pub switchover: SwitchoverTimes,
    /// Pages sent, by how each was encoded (the compression `auto` chose
    /// shows in `lz4`, `zstd` and `raw`).
    #[serde(default)]
    pub encodings: Encodings,
}

/// Pages sent, by encoding.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Encodings {
    /// All zeros (a tag, no payload).
    pub zero: u64,
    /// Same as a page the destination holds.
    pub duplicate: u64,
    /// XOR delta against the copy sent before.
    pub delta: u64,
    /// LZ4-compressed.
    pub lz4: u64,
    /// zstd-compressed.
    pub zstd: u64,
    /// As they are (compression off, or it did not pay).
    pub raw: u64,
}

impl From<&tern_pagecodec::EncodeStats> for Encodings {
    fn from(s: &tern_pagecodec::EncodeStats) -> Self {
        use tern_pagecodec::Tag;
        Self {
            zero: s.count(Tag::Zero),
            duplicate: s.count(Tag::Duplicate),
            delta: s.count(Tag::XorDelta),
            lz4: s.count(Tag::Lz4),
            zstd: s.count(Tag::Zstd),
            raw: s.count(Tag::Raw),
        }
    }
}

/// The steps of a switchover, in ms, in the order they happen: they add up
/// to the downtime, so a budget overrun says which step to blame.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SwitchoverTimes {
    /// Stopping the guest and its final dirty scan.
    pub pause_ms: f64,
    /// Sending the last pages, the device state and the signed manifest.
    pub send_ms: f64,
    /// Of `send_ms`: reading, hashing, encoding and queueing the last pages.
    #[serde(default)]
    pub last_pages_ms: f64,
    /// Of `send_ms`: saving the device state (vCPU registers, devices).
    #[serde(default)]
    pub device_state_ms: f64,
    /// Until the destination said `Ready` (it drained the link, checked the
    /// manifest and loaded the guest).
    pub ready_ms: f64,
    /// The source's durable commit record. The native engine writes it
    /// just before the pause, so it is not part of the downtime; the relays
    /// write it after `Ready`.
    pub commit_record_ms: f64,
    /// `Commit` → `Running` (the destination's record and its guest start).
    pub running_ms: f64,
}

impl Report {
    /// An empty report for a guest of `memory_bytes`.
    pub fn new(memory_bytes: u64) -> Self {
        Self {
            memory_bytes,
            ..Self::default()
        }
    }
}
