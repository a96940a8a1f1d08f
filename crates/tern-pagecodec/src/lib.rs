//! What each 4 KiB guest page becomes on the wire.
//!
//! Pure and I/O-free: the migration engine hands an [`Encoder`] runs of pages
//! and gets one frame back; the destination hands a [`Decoder`] the frame and
//! its guest memory. Per page the encoder picks the cheapest of:
//!
//! - [`Tag::Zero`]: the page is all zeros (word-wise scan at memory speed);
//! - [`Tag::Duplicate`]: its content was already sent as another page that
//!   still holds it on the destination (128-bit content hash);
//! - [`Tag::XorDelta`]: XOR against the copy sent last time (bounded cache),
//!   zero-run-length encoded, as QEMU's XBZRLE does; dropped when not smaller;
//! - [`Tag::Lz4`] / [`Tag::Zstd`]: compressed, when compression is on and pays;
//! - [`Tag::Raw`]: the bytes as they are.
//!
//! Encoder and decoder are stateful (caches, what was sent): frames must be
//! decoded in the order they were encoded, which the transport guarantees.
//! [`AdaptivePolicy`] chooses the compression from link and CPU budgets.
//!
//! The decoder trusts nothing: every index, length and reference is checked,
//! the whole frame is decoded into a staging area first, and guest memory is
//! only written once the frame is known good.

mod decoder;
mod encoder;
mod policy;
mod scan;
mod zrle;

pub use decoder::{DecodeError, DecodeStats, Decoder, Staged};
pub use encoder::{EncodeStats, Encoder, EncoderConfig};
pub use policy::{AdaptivePolicy, LinkBudget};
pub use scan::is_zero_page;

/// Guest page size the codec works in (tern's one page size, `tern_guest::PAGE_SIZE`).
pub const PAGE_SIZE: usize = tern_guest::PAGE_SIZE as usize;

/// Most pages one frame may carry (bounds the decoder's staging memory: 16 MiB).
pub const MAX_PAGES_PER_FRAME: usize = 4096;

/// Frame magic and format version.
pub const FRAME_MAGIC: [u8; 4] = *b"TPG1";

/// Compression applied to pages that are not zero, duplicate or delta.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Compression {
    /// None: fastest; right for fast links.
    None,
    /// LZ4: cheap, moderate ratio.
    Lz4,
    /// zstd at a level (1-19): better ratio, more CPU; right for slow links.
    Zstd(i32),
}

/// How one page was encoded (the byte on the wire).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Tag {
    /// All zeros; no payload.
    Zero = 0,
    /// Same content as another page; payload: that page's index (u64).
    Duplicate = 1,
    /// XOR against the last copy sent; payload: u16 length + zero-run-length data.
    XorDelta = 2,
    /// LZ4 block; payload: u16 length + data.
    Lz4 = 3,
    /// zstd frame; payload: u16 length + data.
    Zstd = 4,
    /// Uncompressed; payload: 4096 bytes.
    Raw = 5,
}

impl Tag {
    /// All tags, for statistics tables.
    pub const ALL: [Tag; 6] = [
        Tag::Zero,
        Tag::Duplicate,
        Tag::XorDelta,
        Tag::Lz4,
        Tag::Zstd,
        Tag::Raw,
    ];

    fn from_byte(b: u8) -> Option<Tag> {
        Tag::ALL.into_iter().find(|t| *t as u8 == b)
    }
}
