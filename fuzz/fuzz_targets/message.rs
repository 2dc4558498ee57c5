//! Control message parser: never panics; what parses re-parses identically.
#![no_main]
use libfuzzer_sys::fuzz_target;
use tether::protocol::Message;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data)
        && let Ok(m) = Message::decode(text)
    {
        let again = m.encode();
        if again.len() <= tether::protocol::MAX_CONTROL_BYTES {
            assert_eq!(Message::decode(&again).ok(), Some(m));
        }
    }
});
