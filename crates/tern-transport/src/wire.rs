//! The bytes on a migration stream. Everything here decodes input from the
//! network, so every function returns an error for bad input and never panics.
//!
//! ```text
//! stream opens:  client -> Hello    magic "TTS1", kind 1, session id [16], resume token [32],
//!                                   stream index u16, stream count u16, flags u8 (1 = resume)
//!                server -> HelloAck magic "TTS1", kind 2, status u8, next expected seq u64
//! then:          client -> Data     kind 3, seq u64, len u32, header check u32,
//!                                   payload [len], xxh3-128(payload) on plaintext streams only
//!                client -> Finish   kind 6, total frames u64, header check u32
//!                server -> Ack      kind 4, applied-up-to u64 (every seq below it is applied)
//!                server -> Nack     kind 5, seq u64 (payload failed its checksum: resend)
//!                server -> FinishAck kind 7, total u64 (the end marker arrived)
//! ```
//! All integers little-endian. The header check (xxh3 of the header fields)
//! catches a damaged length before we trust it; the payload checksum catches
//! damaged data, which is then re-requested and never delivered.
//!
//! The payload checksum is xxh3-128, not a cryptographic hash, and only plaintext
//! streams carry it. On TLS streams AES-GCM already authenticates every byte: a
//! damaged record fails decryption, the connection drops, and the sender
//! reconnects and replays every unacknowledged frame, so a second checksum
//! would find nothing and cost both ends a pass over every byte (8 % of the
//! CPU of a TLS session, measured with perf). Proof that guest memory arrived
//! intact is the migration's signed BLAKE3 manifest, end to end.

use xxhash_rust::xxh3::xxh3_64;

/// Protocol magic and version (2: heartbeats).
pub const MAGIC: [u8; 4] = *b"TTS2";
/// Largest payload a frame may carry (bounds what a peer can make us allocate).
pub const MAX_PAYLOAD: usize = 32 << 20;
/// Bytes of Hello.
pub const HELLO_LEN: usize = 4 + 1 + 16 + 32 + 2 + 2 + 1;
/// Bytes of HelloAck.
pub const HELLO_ACK_LEN: usize = 4 + 1 + 1 + 8;
/// Bytes of a Data header (before the payload).
pub const DATA_HEADER_LEN: usize = 1 + 8 + 4 + 4;
/// Bytes of the payload hash after the payload.
pub const PAYLOAD_HASH_LEN: usize = 16;
/// Per-frame overhead on the wire: the header, plus the checksum on a
/// plaintext stream (`checksummed`).
pub const fn frame_overhead(checksummed: bool) -> usize {
    if checksummed {
        DATA_HEADER_LEN + PAYLOAD_HASH_LEN
    } else {
        DATA_HEADER_LEN
    }
}

const KIND_HELLO: u8 = 1;
const KIND_HELLO_ACK: u8 = 2;
/// Kind byte of a data frame.
pub const KIND_DATA: u8 = 3;
/// Kind byte of an ack.
pub const KIND_ACK: u8 = 4;
/// Kind byte of a nack.
pub const KIND_NACK: u8 = 5;
/// Kind byte of a finish.
pub const KIND_FINISH: u8 = 6;
/// Kind byte of a finish acknowledgement.
pub const KIND_FINISH_ACK: u8 = 7;
/// Kind byte of a heartbeat on a data stream (sender to receiver).
pub const KIND_PING: u8 = 8;
/// Kind byte of a heartbeat's answer (receiver to sender).
pub const KIND_PONG: u8 = 9;

/// A malformed message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// Not our protocol (a plaintext or foreign peer).
    #[error("peer does not speak the tern transport protocol (bad magic)")]
    BadMagic,
    /// A kind byte we do not know here.
    #[error("unexpected message kind {0}")]
    BadKind(u8),
    /// The header check failed: the stream is out of step.
    #[error("frame header is damaged (header check failed)")]
    HeaderCheck,
    /// A frame larger than we accept.
    #[error("frame of {0} bytes exceeds the {MAX_PAYLOAD}-byte limit")]
    TooLarge(u32),
    /// A field out of range.
    #[error("invalid field: {0}")]
    Invalid(&'static str),
}

/// Random id of a session, chosen by the sender.
pub type SessionId = [u8; 16];
/// Secret that proves a reconnecting stream belongs to the session.
pub type ResumeToken = [u8; 32];

/// First message on every stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hello {
    /// Session the stream belongs to.
    pub session: SessionId,
    /// Resume secret.
    pub token: ResumeToken,
    /// This stream's index.
    pub stream_index: u16,
    /// Streams in the session.
    pub stream_count: u16,
    /// Reattaching to an existing session (after a drop), not opening one.
    pub resume: bool,
}

impl Hello {
    /// Wire form.
    pub fn encode(&self) -> [u8; HELLO_LEN] {
        let mut b = [0u8; HELLO_LEN];
        b[..4].copy_from_slice(&MAGIC);
        b[4] = KIND_HELLO;
        b[5..21].copy_from_slice(&self.session);
        b[21..53].copy_from_slice(&self.token);
        b[53..55].copy_from_slice(&self.stream_index.to_le_bytes());
        b[55..57].copy_from_slice(&self.stream_count.to_le_bytes());
        b[57] = u8::from(self.resume);
        b
    }

    /// Parses and checks a Hello.
    pub fn decode(b: &[u8; HELLO_LEN]) -> Result<Self, WireError> {
        if b[..4] != MAGIC {
            return Err(WireError::BadMagic);
        }
        if b[4] != KIND_HELLO {
            return Err(WireError::BadKind(b[4]));
        }
        let stream_index = u16::from_le_bytes([b[53], b[54]]);
        let stream_count = u16::from_le_bytes([b[55], b[56]]);
        if stream_count == 0 || stream_count > 256 || stream_index >= stream_count {
            return Err(WireError::Invalid("stream index/count"));
        }
        if b[57] > 1 {
            return Err(WireError::Invalid("flags"));
        }
        Ok(Hello {
            session: b[5..21].try_into().expect("16 bytes"),
            token: b[21..53].try_into().expect("32 bytes"),
            stream_index,
            stream_count,
            resume: b[57] == 1,
        })
    }
}

/// Why a Hello was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HelloStatus {
    /// Accepted.
    Ok = 0,
    /// Resume of a session we do not know (or that already ended).
    UnknownSession = 1,
    /// Resume token does not match.
    BadToken = 2,
    /// Session id already open with other parameters.
    Mismatch = 3,
    /// The listener holds as many sessions as it takes.
    Busy = 4,
}

impl HelloStatus {
    fn from_byte(b: u8) -> Option<Self> {
        [
            Self::Ok,
            Self::UnknownSession,
            Self::BadToken,
            Self::Mismatch,
            Self::Busy,
        ]
        .into_iter()
        .find(|s| *s as u8 == b)
    }
}

/// Reply to a Hello.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HelloAck {
    /// Accepted or why not.
    pub status: HelloStatus,
    /// Lowest seq the receiver has not received (everything below arrived).
    pub next_expected: u64,
}

impl HelloAck {
    /// Wire form.
    pub fn encode(&self) -> [u8; HELLO_ACK_LEN] {
        let mut b = [0u8; HELLO_ACK_LEN];
        b[..4].copy_from_slice(&MAGIC);
        b[4] = KIND_HELLO_ACK;
        b[5] = self.status as u8;
        b[6..14].copy_from_slice(&self.next_expected.to_le_bytes());
        b
    }

    /// Parses a HelloAck.
    pub fn decode(b: &[u8; HELLO_ACK_LEN]) -> Result<Self, WireError> {
        if b[..4] != MAGIC {
            return Err(WireError::BadMagic);
        }
        if b[4] != KIND_HELLO_ACK {
            return Err(WireError::BadKind(b[4]));
        }
        Ok(HelloAck {
            status: HelloStatus::from_byte(b[5]).ok_or(WireError::Invalid("hello status"))?,
            next_expected: u64::from_le_bytes(b[6..14].try_into().expect("8 bytes")),
        })
    }
}

fn header_check(kind: u8, seq: u64, len: u32) -> u32 {
    let mut b = [0u8; 13];
    b[0] = kind;
    b[1..9].copy_from_slice(&seq.to_le_bytes());
    b[9..13].copy_from_slice(&len.to_le_bytes());
    xxh3_64(&b) as u32
}

/// A parsed data-stream header (sender to receiver).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DataHeader {
    /// A frame of `len` payload bytes follows (then its hash).
    Data {
        /// Sequence number.
        seq: u64,
        /// Payload bytes.
        len: u32,
    },
    /// The sender has sent `total` frames and will send no more.
    Finish {
        /// Frames in the session.
        total: u64,
    },
    /// A heartbeat: the stream is alive though it has nothing to carry.
    /// The receiver answers [`Control::Pong`] with the same number.
    Ping(u64),
}

/// Writes a Data header for `payload`.
pub fn data_header(seq: u64, len: u32) -> [u8; DATA_HEADER_LEN] {
    let mut b = [0u8; DATA_HEADER_LEN];
    b[0] = KIND_DATA;
    b[1..9].copy_from_slice(&seq.to_le_bytes());
    b[9..13].copy_from_slice(&len.to_le_bytes());
    b[13..17].copy_from_slice(&header_check(KIND_DATA, seq, len).to_le_bytes());
    b
}

/// Writes a Finish message (same size as a Data header).
pub fn finish_header(total: u64) -> [u8; DATA_HEADER_LEN] {
    let mut b = [0u8; DATA_HEADER_LEN];
    b[0] = KIND_FINISH;
    b[1..9].copy_from_slice(&total.to_le_bytes());
    b[13..17].copy_from_slice(&header_check(KIND_FINISH, total, 0).to_le_bytes());
    b
}

/// Writes a heartbeat (same size as a Data header).
pub fn ping_header(n: u64) -> [u8; DATA_HEADER_LEN] {
    let mut b = [0u8; DATA_HEADER_LEN];
    b[0] = KIND_PING;
    b[1..9].copy_from_slice(&n.to_le_bytes());
    b[13..17].copy_from_slice(&header_check(KIND_PING, n, 0).to_le_bytes());
    b
}

/// The payload checksum sent after each payload.
pub fn payload_hash(payload: &[u8]) -> [u8; PAYLOAD_HASH_LEN] {
    xxhash_rust::xxh3::xxh3_128(payload).to_le_bytes()
}

/// Parses a data-stream header.
pub fn parse_data_header(b: &[u8; DATA_HEADER_LEN]) -> Result<DataHeader, WireError> {
    let kind = b[0];
    let seq = u64::from_le_bytes(b[1..9].try_into().expect("8 bytes"));
    let len = u32::from_le_bytes(b[9..13].try_into().expect("4 bytes"));
    let check = u32::from_le_bytes(b[13..17].try_into().expect("4 bytes"));
    if ![KIND_DATA, KIND_FINISH, KIND_PING].contains(&kind) {
        return Err(WireError::BadKind(kind));
    }
    if check != header_check(kind, seq, len) {
        return Err(WireError::HeaderCheck);
    }
    match kind {
        KIND_DATA if len as usize > MAX_PAYLOAD => Err(WireError::TooLarge(len)),
        KIND_DATA => Ok(DataHeader::Data { seq, len }),
        _ if len != 0 => Err(WireError::Invalid("finish or ping with a length")),
        KIND_PING => Ok(DataHeader::Ping(seq)),
        _ => Ok(DataHeader::Finish { total: seq }),
    }
}

/// Bytes of a control message (receiver to sender).
pub const CONTROL_LEN: usize = 1 + 8 + 4;

/// A message from receiver to sender.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Control {
    /// Every seq below this is durably applied.
    Ack(u64),
    /// This seq failed its checksum: send it again.
    Nack(u64),
    /// The receiver has the end marker for this many frames.
    FinishAck(u64),
    /// The answer to [`DataHeader::Ping`]: the stream works both ways.
    Pong(u64),
}

impl Control {
    /// Wire form.
    pub fn encode(&self) -> [u8; CONTROL_LEN] {
        let (kind, v) = match *self {
            Control::Ack(v) => (KIND_ACK, v),
            Control::Nack(v) => (KIND_NACK, v),
            Control::FinishAck(v) => (KIND_FINISH_ACK, v),
            Control::Pong(v) => (KIND_PONG, v),
        };
        let mut b = [0u8; CONTROL_LEN];
        b[0] = kind;
        b[1..9].copy_from_slice(&v.to_le_bytes());
        b[9..13].copy_from_slice(&header_check(kind, v, 0).to_le_bytes());
        b
    }

    /// Parses a control message.
    pub fn decode(b: &[u8; CONTROL_LEN]) -> Result<Self, WireError> {
        let v = u64::from_le_bytes(b[1..9].try_into().expect("8 bytes"));
        let check = u32::from_le_bytes(b[9..13].try_into().expect("4 bytes"));
        if check != header_check(b[0], v, 0) {
            return Err(WireError::HeaderCheck);
        }
        match b[0] {
            KIND_ACK => Ok(Control::Ack(v)),
            KIND_NACK => Ok(Control::Nack(v)),
            KIND_FINISH_ACK => Ok(Control::FinishAck(v)),
            KIND_PONG => Ok(Control::Pong(v)),
            k => Err(WireError::BadKind(k)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn hello_round_trips(session: [u8; 16], token: [u8; 32], count in 1u16..=256, idx: u16, resume: bool) {
            let h = Hello { session, token, stream_index: idx % count, stream_count: count, resume };
            prop_assert_eq!(Hello::decode(&h.encode()).unwrap(), h);
        }

        #[test]
        fn data_headers_round_trip(seq: u64, len in 0u32..=MAX_PAYLOAD as u32) {
            prop_assert_eq!(parse_data_header(&data_header(seq, len)).unwrap(), DataHeader::Data { seq, len });
            prop_assert_eq!(parse_data_header(&finish_header(seq)).unwrap(), DataHeader::Finish { total: seq });
            prop_assert_eq!(parse_data_header(&ping_header(seq)).unwrap(), DataHeader::Ping(seq));
        }

        #[test]
        fn any_single_bit_flip_in_a_header_is_caught(seq: u64, len in 0u32..1000, bit in 0usize..(DATA_HEADER_LEN * 8)) {
            let mut h = data_header(seq, len);
            h[bit / 8] ^= 1 << (bit % 8);
            prop_assert!(parse_data_header(&h).is_err());
        }

        #[test]
        fn controls_round_trip(v: u64, kind in 0u8..4) {
            let c = [Control::Ack(v), Control::Nack(v), Control::FinishAck(v), Control::Pong(v)][kind as usize];
            prop_assert_eq!(Control::decode(&c.encode()).unwrap(), c);
        }

        #[test]
        fn arbitrary_bytes_never_panic(b in proptest::collection::vec(any::<u8>(), 64)) {
            let _ = Hello::decode(b[..HELLO_LEN].try_into().unwrap());
            let _ = HelloAck::decode(b[..HELLO_ACK_LEN].try_into().unwrap());
            let _ = parse_data_header(b[..DATA_HEADER_LEN].try_into().unwrap());
            let _ = Control::decode(b[..CONTROL_LEN].try_into().unwrap());
        }
    }

    #[test]
    fn plaintext_http_is_not_a_hello() {
        let mut b = [0u8; HELLO_LEN];
        b[..16].copy_from_slice(b"GET / HTTP/1.1\r\n");
        assert_eq!(Hello::decode(&b), Err(WireError::BadMagic));
        let h = data_header(1, (MAX_PAYLOAD + 1) as u32);
        assert_eq!(
            parse_data_header(&h),
            Err(WireError::TooLarge(MAX_PAYLOAD as u32 + 1))
        );
    }
}
