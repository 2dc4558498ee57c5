//! Binary frame decoder: never panics; what decodes re-encodes identically.
#![no_main]
use libfuzzer_sys::fuzz_target;
use tether::protocol::{Frame, MAX_FRAME_PAYLOAD};

fuzz_target!(|data: &[u8]| {
    let raw = bytes::Bytes::copy_from_slice(data);
    if let Ok(f) = Frame::decode(raw.clone(), MAX_FRAME_PAYLOAD) {
        assert_eq!(f.encode(), raw);
    }
});
