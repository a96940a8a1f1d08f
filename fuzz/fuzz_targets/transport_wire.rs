//! Every decoder of transport messages on arbitrary bytes: none may panic, and
//! anything accepted must re-encode to the same bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tern_transport::wire::{
    self, Control, Hello, HelloAck, CONTROL_LEN, DATA_HEADER_LEN, HELLO_ACK_LEN, HELLO_LEN,
};

fuzz_target!(|data: &[u8]| {
    if let Some(b) = data.get(..HELLO_LEN) {
        if let Ok(h) = Hello::decode(b.try_into().unwrap()) {
            assert_eq!(&h.encode()[..], b);
        }
    }
    if let Some(b) = data.get(..HELLO_ACK_LEN) {
        if let Ok(h) = HelloAck::decode(b.try_into().unwrap()) {
            assert_eq!(&h.encode()[..], b);
        }
    }
    if let Some(b) = data.get(..DATA_HEADER_LEN) {
        if let Ok(wire::DataHeader::Data { seq, len }) = wire::parse_data_header(b.try_into().unwrap()) {
            assert_eq!(&wire::data_header(seq, len)[..], b);
        }
    }
    if let Some(b) = data.get(..CONTROL_LEN) {
        if let Ok(c) = Control::decode(b.try_into().unwrap()) {
            assert_eq!(&c.encode()[..], b);
        }
    }
});
