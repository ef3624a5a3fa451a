//! `parse_upgrade` on any bytes for stage `dev`: never panics; an accepted request has a
//! non-empty key, and `leftover` is a suffix of the input.
#![no_main]

use libfuzzer_sys::fuzz_target;
use switchboard::handshake::{accept_key, parse_upgrade};

fuzz_target!(|data: &[u8]| {
    if let Ok(Some(request)) = parse_upgrade(data, "dev") {
        assert!(!request.key.is_empty());
        assert!(data.ends_with(&request.leftover));
        assert_eq!(accept_key(&request.key).len(), 28);
    }
});
