//! Channel registry fed arbitrary frames and windows: never panics, never
//! delivers more than it granted.
#![no_main]
use libfuzzer_sys::fuzz_target;
use tether::mux::{Channels, Link};
use tether::protocol::{Frame, Window};

fuzz_target!(|data: &[u8]| {
    let ch = Channels::new(Link::new());
    let _h = ch.open(1, 64);
    for chunk in data.chunks(16) {
        if chunk.first().is_some_and(|b| b & 1 == 0) {
            if let Ok(f) = Frame::decode(bytes::Bytes::copy_from_slice(chunk), 64) {
                let _ = ch.on_frame(f);
            }
        } else if chunk.len() >= 9 {
            let limit = u64::from_le_bytes(chunk[1..9].try_into().unwrap());
            ch.on_window(Window { channel: 1, acked: limit / 2, limit });
        }
        for s in ch.states() {
            assert!(s.received <= s.limit);
        }
    }
});
