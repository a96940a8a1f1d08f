//! The wire of a *relayed* migration: a hypervisor that migrates itself (QEMU
//! today; CRIU images later) writes an opaque stream, and tern carries it
//! between agents on the same two sessions a native migration uses. This
//! module holds only what crosses the network (frame kinds, control messages,
//! chunk compression) so that its decoders can be fuzzed without the agent
//! that drives them.

use crate::protocol::{split, KIND_MSG};
use crate::MigrateError;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use std::borrow::Cow;

/// Hypervisor stream bytes, source → destination.
pub const KIND_STREAM: u8 = 20;
/// Hypervisor return-path bytes (post-copy page requests, acks), destination → source.
pub const KIND_RETURN: u8 = 21;
/// Largest chunk of stream carried in one frame, and the most a compressed
/// frame may claim to expand to: a hostile peer cannot make us allocate more.
pub const CHUNK: usize = 1 << 20;

/// How stream chunks are compressed on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Compress {
    /// As the hypervisor wrote them.
    None,
    /// LZ4: cheap, for fast links.
    Lz4,
    /// zstd level 3: for slow links, where bytes cost more than CPU.
    Zstd,
}

impl std::str::FromStr for Compress {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "none" => Ok(Compress::None),
            "lz4" => Ok(Compress::Lz4),
            "zstd" => Ok(Compress::Zstd),
            other => Err(format!("compress `{other}`: use none, lz4 or zstd")),
        }
    }
}

impl Compress {
    /// Packs one chunk (at most [`CHUNK`] bytes) for the wire.
    pub fn pack(self, chunk: &[u8]) -> Result<Vec<u8>, String> {
        match self {
            Compress::None => Ok(chunk.to_vec()),
            Compress::Lz4 => Ok(lz4_flex::compress_prepend_size(chunk)),
            Compress::Zstd => zstd::bulk::compress(chunk, 3).map_err(|e| format!("zstd: {e}")),
        }
    }

    /// Packs one chunk into a whole frame of `kind`: one copy for
    /// [`Compress::None`] (the frame), where [`Compress::pack`] then
    /// [`frame`](crate::protocol::frame) made two.
    fn pack_frame(self, kind: u8, chunk: &[u8]) -> Result<Bytes, String> {
        match self {
            Compress::None => Ok(crate::protocol::frame(kind, chunk)),
            c => Ok(crate::protocol::frame(kind, &c.pack(chunk)?)),
        }
    }

    /// Unpacks a chunk from the network. Bounded: it never expands past
    /// [`CHUNK`], and malformed input is an error, never a panic. An
    /// uncompressed chunk is lent, not copied.
    pub fn unpack(self, p: &[u8]) -> Result<Cow<'_, [u8]>, String> {
        match self {
            Compress::None => Ok(Cow::Borrowed(p)),
            Compress::Lz4 => {
                let claimed = p
                    .get(..4)
                    .and_then(|b| <[u8; 4]>::try_from(b).ok())
                    .map(|b| u32::from_le_bytes(b) as usize)
                    .ok_or("short lz4 frame")?;
                if claimed > CHUNK {
                    return Err(format!("lz4 frame claims {claimed} bytes"));
                }
                lz4_flex::decompress_size_prepended(p)
                    .map(Cow::Owned)
                    .map_err(|e| format!("lz4: {e}"))
            }
            Compress::Zstd => zstd::bulk::decompress(p, CHUNK)
                .map(Cow::Owned)
                .map_err(|e| format!("zstd: {e}")),
        }
    }
}

/// zstd's window for a relayed stream: 64 MiB. A hypervisor's stream
/// repeats itself far apart (the same file in the page cache and in an
/// initramfs, a kernel's text twice): measured on a QEMU guest's 92 MB
/// stream, chunks compressed alone came to 0.535 of it, one stream with
/// long-distance matching over 64 MiB to 0.443 (16 MiB: 0.532). The
/// receiver refuses a larger window, so a peer cannot make it allocate more.
pub const ZSTD_WINDOW_LOG: u32 = 26;

/// The sending half of a relayed stream's compression: zstd is one stream
/// across chunks (flushed at each, so every frame decodes on arrival);
/// the others pack each chunk alone.
pub struct Packer {
    how: Compress,
    zstd: Option<zstd::stream::raw::Encoder<'static>>,
}

impl Packer {
    /// A packer for `how`.
    pub fn new(how: Compress) -> Result<Packer, String> {
        let zstd = match how {
            Compress::Zstd => Some(zstd_encoder().map_err(|e| format!("zstd: {e}"))?),
            _ => None,
        };
        Ok(Packer { how, zstd })
    }

    /// Packs the next chunk (at most [`CHUNK`] bytes) into a whole frame of
    /// `kind`.
    pub fn frame(&mut self, kind: u8, chunk: &[u8]) -> Result<Bytes, String> {
        let Some(enc) = &mut self.zstd else {
            return self.how.pack_frame(kind, chunk);
        };
        use zstd::stream::raw::{InBuffer, Operation, OutBuffer};
        let mut out = Vec::with_capacity(1 + zstd::zstd_safe::compress_bound(chunk.len()));
        out.push(kind);
        let mut input = InBuffer::around(chunk);
        let err = |e: std::io::Error| format!("zstd: {e}");
        loop {
            if out.capacity() - out.len() < 4096 {
                out.reserve(64 << 10);
            }
            let pos = out.len();
            let mut o = OutBuffer::around_pos(&mut out, pos);
            if input.pos() < chunk.len() {
                enc.run(&mut input, &mut o).map_err(err)?;
            } else if enc.flush(&mut o).map_err(err)? == 0 {
                break;
            }
        }
        Ok(Bytes::from(out))
    }
}

fn zstd_encoder() -> std::io::Result<zstd::stream::raw::Encoder<'static>> {
    use zstd::stream::raw::CParameter;
    let mut e = zstd::stream::raw::Encoder::new(3)?;
    e.set_parameter(CParameter::WindowLog(ZSTD_WINDOW_LOG))?;
    e.set_parameter(CParameter::EnableLongDistanceMatching(true))?;
    Ok(e)
}

/// The receiving half of [`Packer`]. Bounded: no frame expands past
/// [`CHUNK`], zstd's window is at most [`ZSTD_WINDOW_LOG`], and malformed
/// input is an error, never a panic.
pub struct Unpacker {
    how: Compress,
    zstd: Option<(zstd::stream::raw::Decoder<'static>, Vec<u8>)>,
}

impl Unpacker {
    /// An unpacker for `how`.
    pub fn new(how: Compress) -> Result<Unpacker, String> {
        let zstd = match how {
            Compress::Zstd => {
                use zstd::stream::raw::DParameter;
                let err = |e: std::io::Error| format!("zstd: {e}");
                let mut d = zstd::stream::raw::Decoder::new().map_err(err)?;
                d.set_parameter(DParameter::WindowLogMax(ZSTD_WINDOW_LOG))
                    .map_err(err)?;
                Some((d, Vec::new()))
            }
            _ => None,
        };
        Ok(Unpacker { how, zstd })
    }

    /// Unpacks the next frame's payload (an uncompressed one is lent).
    pub fn unpack<'a>(&'a mut self, p: &'a [u8]) -> Result<Cow<'a, [u8]>, String> {
        let Some((dec, buf)) = &mut self.zstd else {
            return self.how.unpack(p);
        };
        use zstd::stream::raw::{InBuffer, Operation, OutBuffer};
        // One byte over CHUNK: filling it means the frame expands too far.
        buf.resize(CHUNK + 1, 0);
        let mut input = InBuffer::around(p);
        let mut o = OutBuffer::around(&mut buf[..]);
        loop {
            let before = (input.pos(), o.pos());
            dec.run(&mut input, &mut o)
                .map_err(|e| format!("zstd: {e}"))?;
            if o.pos() > CHUNK {
                return Err(format!("a zstd frame expands past {CHUNK} bytes"));
            }
            if (input.pos(), o.pos()) == before {
                break;
            }
        }
        if input.pos() < p.len() {
            return Err("a zstd frame was not all consumed".into());
        }
        let n = o.pos();
        Ok(Cow::Borrowed(&buf[..n]))
    }
}

/// Source → destination messages.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum RelaySourceMsg {
    /// Opens the migration.
    Start {
        /// `precopy`, `postcopy` or `hybrid` (sets the hypervisor's capabilities).
        mode: String,
        /// Chunk compression.
        compress: Compress,
    },
    /// A container's checkpoint follows as stream bytes: one archive of
    /// `bytes` bytes whose entries the signed manifest names (JSON of
    /// `tern_drivers::checkpoint::SignedCheckpoint`, checked before a byte
    /// of the archive is kept).
    Checkpoint {
        /// The signed manifest, as JSON.
        manifest: String,
        /// The archive's length.
        bytes: u64,
    },
    /// The source hypervisor closed its stream.
    StreamEnd,
    /// Ownership moves: run the guest.
    Commit {
        /// The last tick tern's workload printed on the source; `None` when
        /// the guest reports no check of its own (then QEMU's result alone
        /// judges the migration).
        #[serde(default)]
        last_tick: Option<u64>,
    },
    /// Stop; the source keeps the guest.
    Abort {
        /// Why.
        reason: String,
    },
}

/// Destination → source messages.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum RelayDestMsg {
    /// Ready to receive.
    Accept,
    /// Will not receive.
    Reject {
        /// Why.
        reason: String,
    },
    /// The destination hypervisor holds the guest (paused): commit may follow.
    Loaded,
    /// The guest runs here.
    Running,
    /// The guest's own report after switchover.
    Verified {
        /// Counter continued and every check held.
        ok: bool,
        /// What was seen.
        detail: String,
    },
    /// The destination failed.
    Failed {
        /// Why.
        reason: String,
    },
}

/// A frame of the other side, decoded as far as the wire allows.
#[derive(Debug, PartialEq, Eq)]
pub enum Incoming<M> {
    /// A control message.
    Msg(M),
    /// Stream bytes ([`KIND_STREAM`] or [`KIND_RETURN`]), still packed.
    Bytes(u8, Bytes),
}

/// Decodes a frame from the peer; anything else than a message of type `M`
/// or stream bytes is a protocol error.
pub fn decode<M: serde::de::DeserializeOwned>(f: &Bytes) -> Result<Incoming<M>, MigrateError> {
    let (k, p) = split(f).map_err(MigrateError::Protocol)?;
    match k {
        KIND_MSG => serde_json::from_slice(&p)
            .map(Incoming::Msg)
            .map_err(|e| MigrateError::Protocol(format!("bad message: {e}"))),
        KIND_STREAM | KIND_RETURN => Ok(Incoming::Bytes(k, p)),
        k => Err(MigrateError::Protocol(format!("unexpected frame kind {k}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{frame, msg_frame};

    /// `n` pseudo-random bytes from `seed` (incompressible alone).
    fn noise(seed: u64, n: usize) -> Vec<u8> {
        let mut x = seed | 1;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    #[test]
    fn a_packed_stream_round_trips_and_zstd_finds_repeats_across_chunks() {
        // Chunk 3 repeats chunk 0: alone it is noise, in one stream a match.
        let chunks = [
            noise(1, CHUNK),
            noise(2, CHUNK),
            noise(3, 1000),
            noise(1, CHUNK),
        ];
        for c in [Compress::None, Compress::Lz4, Compress::Zstd] {
            let (mut p, mut u) = (Packer::new(c).unwrap(), Unpacker::new(c).unwrap());
            let mut sizes = Vec::new();
            for ch in &chunks {
                let f = p.frame(KIND_STREAM, ch).unwrap();
                let Incoming::Bytes(KIND_STREAM, body) = decode::<RelaySourceMsg>(&f).unwrap()
                else {
                    panic!("{c:?}: not a stream frame")
                };
                assert_eq!(&u.unpack(&body).unwrap()[..], &ch[..], "{c:?}");
                sizes.push(f.len());
            }
            if c == Compress::Zstd {
                assert!(sizes[3] < CHUNK / 100, "the repeat took {} bytes", sizes[3]);
                assert!(sizes[0] > CHUNK, "noise does not shrink");
            }
        }
    }

    #[test]
    fn the_zstd_unpacker_refuses_bombs_big_windows_and_garbage() {
        // One frame that expands past CHUNK.
        let mut p = Packer::new(Compress::Zstd).unwrap();
        let big = p.frame(KIND_STREAM, &vec![0u8; CHUNK * 2]).unwrap();
        let mut u = Unpacker::new(Compress::Zstd).unwrap();
        assert!(u.unpack(&big[1..]).is_err());
        // A stream whose window is above ZSTD_WINDOW_LOG (streamed: a
        // known size would shrink the window it declares).
        let mut e = zstd::stream::raw::Encoder::new(3).unwrap();
        e.set_parameter(zstd::stream::raw::CParameter::WindowLog(
            ZSTD_WINDOW_LOG + 2,
        ))
        .unwrap();
        let mut wide = vec![0u8; 4096];
        let src = noise(5, 1000);
        let mut input = zstd::stream::raw::InBuffer::around(&src[..]);
        let mut o = zstd::stream::raw::OutBuffer::around(&mut wide[..]);
        use zstd::stream::raw::Operation;
        e.run(&mut input, &mut o).unwrap();
        e.finish(&mut o, true).unwrap();
        let n = o.pos();
        let wide = &wide[..n];
        assert!(Unpacker::new(Compress::Zstd).unwrap().unpack(wide).is_err());
        assert!(Unpacker::new(Compress::Zstd)
            .unwrap()
            .unpack(b"garbage")
            .is_err());
    }

    #[test]
    fn compression_round_trips_and_refuses_bombs() {
        let data: Vec<u8> = (0..100_000u32).map(|i| (i % 7) as u8).collect();
        for c in [Compress::None, Compress::Lz4, Compress::Zstd] {
            assert_eq!(c.unpack(&c.pack(&data).unwrap()).unwrap(), data, "{c:?}");
            let f = c.pack_frame(KIND_STREAM, &data).unwrap();
            match decode::<RelaySourceMsg>(&f).unwrap() {
                Incoming::Bytes(KIND_STREAM, p) => {
                    assert_eq!(c.unpack(&p).unwrap(), data, "{c:?} frame")
                }
                other => panic!("{c:?}: {other:?}"),
            }
        }
        let mut bomb = ((CHUNK + 1) as u32).to_le_bytes().to_vec();
        bomb.extend_from_slice(&[0u8; 16]);
        assert!(Compress::Lz4.unpack(&bomb).is_err());
        let big = Compress::Zstd.pack(&vec![0u8; CHUNK * 2]).unwrap();
        assert!(Compress::Zstd.unpack(&big).is_err());
        assert!(Compress::Zstd.unpack(b"garbage").is_err());
        assert!(Compress::Lz4.unpack(b"ab").is_err());
        assert!("brotli".parse::<Compress>().is_err());
    }

    #[test]
    fn frames_decode_to_what_was_sent_and_refuse_the_rest() {
        let m = RelaySourceMsg::Commit { last_tick: Some(7) };
        assert_eq!(
            decode::<RelaySourceMsg>(&msg_frame(&m)).unwrap(),
            Incoming::Msg(m)
        );
        let b = frame(KIND_STREAM, b"qemu");
        assert_eq!(
            decode::<RelaySourceMsg>(&b).unwrap(),
            Incoming::Bytes(KIND_STREAM, Bytes::from_static(b"qemu"))
        );
        assert!(decode::<RelaySourceMsg>(&Bytes::new()).is_err());
        assert!(decode::<RelaySourceMsg>(&frame(99, b"")).is_err());
        assert!(decode::<RelayDestMsg>(&frame(KIND_MSG, b"{\"type\":\"nope\"}")).is_err());
    }
}
