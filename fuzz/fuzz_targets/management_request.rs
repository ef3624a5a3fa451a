//! The `POST @connections` body: `BulkRequest::parse(body, 1000, 131072)` never panics and
//! an accepted request respects both limits and yields one unmasked final data frame; its
//! ids then go through `FanoutPlan::for_ids`, which places each id exactly once. Also
//! `ConnectionId::from_str` on the input (UTF-8, lossily): a parsed id renders back to
//! text that parses to the same id.
#![no_main]

use libfuzzer_sys::fuzz_target;
use switchboard::connection_id::ConnectionId;
use switchboard::fanout::FanoutPlan;
use switchboard::management::BulkRequest;

fuzz_target!(|data: &[u8]| {
    if let Ok((request, frame)) = BulkRequest::parse(data, 1000, 131072) {
        assert!(request.connection_ids.len() <= 1000);
        assert!(matches!(frame.first(), Some(0x81 | 0x82)));
        assert!(frame.len() <= 131072 + 10);
        let plan = FanoutPlan::for_ids(&request.connection_ids, 0, 0, 4);
        let placed: usize = plan.per_shard.iter().map(Vec::len).sum();
        assert_eq!(placed + plan.invalid.len(), request.connection_ids.len());
    }

    let text = String::from_utf8_lossy(data);
    if let Ok(id) = text.parse::<ConnectionId>() {
        let rendered = id.to_string();
        assert_eq!(rendered.len(), 22);
        assert_eq!(rendered.parse::<ConnectionId>(), Ok(id));
    }
});
