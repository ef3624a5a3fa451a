//! `parse_upgrade` on any bytes for stage `dev`: never panics; an accepted request has a
//! 24-character key (16 bytes in base64) and a non-empty host, and `leftover` is a suffix
//! of the input.
#![no_main]

use libfuzzer_sys::fuzz_target;
use switchboard::handshake::{accept_key, parse_upgrade};

fuzz_target!(|data: &[u8]| {
    if let Ok(Some(request)) = parse_upgrade(data, "dev") {
        assert_eq!(request.key.len(), 24);
        assert!(!request.host.is_empty());
        assert!(data.ends_with(&request.leftover));
        assert_eq!(accept_key(&request.key).len(), 28);
    }
});
