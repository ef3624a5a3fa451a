//! Selection expressions: `SelectionExpression::parse` on any text never panics, and a
//! compiled expression evaluates any JSON body (`evaluate` and `evaluate_frame` agree).
//!
//! Input: `expression NUL json-body` as UTF-8 (no NUL: expression only, body `{}`).
#![no_main]

use libfuzzer_sys::fuzz_target;
use switchboard::selection::SelectionExpression;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let (expression, body) = text.split_once('\0').unwrap_or((text, "{}"));
    let Ok(compiled) = SelectionExpression::parse(expression) else { return };
    assert_eq!(compiled.source(), expression);
    let Ok(value) = serde_json::from_str::<serde_json::Value>(body) else { return };
    let selected = compiled.evaluate(&value).map(|key| key.into_owned());
    assert_eq!(selected, compiled.evaluate_frame(body.as_bytes()));
});
