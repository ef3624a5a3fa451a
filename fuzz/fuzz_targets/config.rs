//! The TOML config: `RawConfig::parse` then `validate` on any UTF-8 text never panics, and
//! `to_toml` (what `check-config` prints) parses again to a config that renders the same.
#![no_main]

use libfuzzer_sys::fuzz_target;
use switchboard::RawConfig;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let Ok(raw) = RawConfig::parse(text) else { return };
    let valid = raw.validate().is_ok();
    let rendered = raw.to_toml();
    let again = RawConfig::parse(&rendered)
        .unwrap_or_else(|e| panic!("to_toml output does not parse: {e}\n{rendered}"));
    assert_eq!(again.to_toml(), rendered, "to_toml is not a fixed point");
    assert_eq!(again.validate().is_ok(), valid, "re-rendering changed validity");
});
