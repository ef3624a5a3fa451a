//! The `POST @connections` body: `BulkRequest::parse(body, 1000, 131072)` never panics and
//! an accepted request respects both limits and yields one unmasked final data frame; its
//! ids then go through `FanoutPlan::for_ids`, which places each distinct id exactly once.
//! Also `ConnectionId::from_str` on the input (UTF-8, lossily): a parsed id renders back
//! to 22 characters that parse to the same id.
#![no_main]

use std::collections::HashSet;

use libfuzzer_sys::fuzz_target;
use switchboard::connection_id::ConnectionId;
use switchboard::fanout::FanoutPlan;
use switchboard::management::BulkRequest;

fuzz_target!(|data: &[u8]| {
    if let Ok((request, frame)) = BulkRequest::parse(data, 1000, 131072) {
        let ids = &request.connection_ids;
        assert!(ids.len() <= 1000);
        assert!(matches!(frame.first(), Some(0x81 | 0x82)));
        assert!(frame.len() <= 131072 + 10);
        let plan = FanoutPlan::for_ids(ids, 0, 0, 4);
        let mut planned: Vec<u32> = plan.invalid.clone();
        planned.extend(plan.per_shard.iter().flatten().map(|&(_, index)| index));
        let distinct: HashSet<&String> = ids.iter().collect();
        assert_eq!(planned.len(), distinct.len());
        let indices: HashSet<u32> = planned.iter().copied().collect();
        assert_eq!(indices.len(), planned.len(), "an index planned twice");
        assert!(planned.iter().all(|&i| (i as usize) < ids.len()));
    }

    let text = String::from_utf8_lossy(data);
    if let Ok(id) = text.parse::<ConnectionId>() {
        let rendered = id.to_string();
        assert_eq!(rendered.len(), 22);
        assert_eq!(rendered.parse::<ConnectionId>(), Ok(id));
    }
});
