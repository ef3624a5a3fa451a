//! The invariants, checked once a scenario's faults are healed (docs/RELIABILITY.md):
//!
//! 1. Every acked queue entry is in the queue (at least once; duplicates are counted).
//! 2. Exactly one `$disconnect` per connection ever opened.
//! 3. Nothing from or to a connection after its `$disconnect`: no frame of its reaches the
//!    backend, no message reaches its client.
//! 4. Every session saw its messages once and in order; one that lived to the end (however
//!    many times it resumed and moved) saw every push and bulk send answered 200 (and not
//!    saying it was gone) and every broadcast from its first to its last, with no gap.
//! 5. Every node agrees on who is connected and in the room: `GET @connections/{id}`,
//!    `GET @rooms/{room}` and its presence, through each node.
//! 6. `/health` is 200 on every node.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::harness::Chaos;
use super::workload::{Broadcast, Seen, Workload};
use crate::support::*;

/// What the scenario did to the cluster, which decides what a short count means.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Faults {
    /// None: every broadcast answered 200 must reach every session that lived through it.
    None,
    /// Some: a broadcast published while a node was out of reach is delivered to fewer
    /// members, as its `delivered` says; one that counted every client must reach them all.
    Injected,
}

/// Runs the checks; panics with every violation found (and the seed, in the schedule).
pub(crate) async fn check(chaos: &Chaos, mut workload: Workload, faults: Faults) {
    chaos.settle().await;
    chaos.step("stop the drivers");
    workload.stop_drivers().await;
    chaos.step("hold the clients still");
    workload.hold_still().await;
    let mut violations = Vec::new();
    let live = workload.seen.lock().unwrap().live();
    let room = workload.seen.lock().unwrap().room;
    agreement(chaos, room, &live, &mut violations).await;
    chaos.step("close the clients");
    workload.close_clients().await;
    let seen = std::mem::take(&mut *workload.seen.lock().unwrap());
    queue(chaos, &seen, &mut violations).await;
    let disconnects = one_disconnect_each(chaos, &mut violations).await;
    nothing_after_disconnect(chaos, &seen, &disconnects, &mut violations);
    once_in_order(&seen, &live, faults, &mut violations);
    for node in 0..3 {
        if chaos.nodes[node].is_some() && chaos.health(node).await != 200 {
            violations.push(format!("node {} is not healthy at the end", node + 1));
        }
    }
    chaos.step(&format!(
        "checked: {} sessions, {} resumes, {} broadcasts, {} pushes, {} bulk sends, {} orders acked",
        seen.received.len(),
        seen.resumes,
        seen.broadcast.len(),
        seen.pushed.len(),
        seen.bulk.len(),
        seen.acked.len()
    ));
    assert!(
        violations.is_empty(),
        "{} violations:\n{}",
        violations.len(),
        violations.join("\n")
    );
}

/// 5: every running node sees every live session, and the room holds exactly them.
async fn agreement(chaos: &Chaos, room: &str, live: &[String], violations: &mut Vec<String>) {
    let expected: BTreeSet<&str> = live.iter().map(String::as_str).collect();
    let endpoints = chaos.endpoints.read().unwrap().clone();
    for (node, endpoint) in endpoints.iter().enumerate() {
        if !endpoint.up {
            continue;
        }
        for id in live {
            let url = format!("{}/@connections/{id}", endpoint.api_url);
            let status = http().get(url).send().await.map(|r| r.status().as_u16());
            if !matches!(status, Ok(200)) {
                violations.push(format!(
                    "node {}: GET @connections/{id} answered {status:?}",
                    node + 1
                ));
            }
        }
        let listing = get_json(&format!("{}/@rooms/{room}", endpoint.api_url)).await;
        let listed: BTreeSet<&str> = listing["connectionIds"]
            .as_array()
            .map(|ids| ids.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        if listed != expected {
            violations.push(format!(
                "node {}: room lists {listed:?}, live are {expected:?}",
                node + 1
            ));
        }
        let presence = get_json(&format!("{}/@rooms/{room}/presence", endpoint.api_url)).await;
        if presence["count"].as_u64() != Some(live.len() as u64) {
            violations.push(format!(
                "node {}: presence counts {}, live are {}",
                node + 1,
                presence["count"],
                live.len()
            ));
        }
    }
}

/// 1: every acked order is in the queue, read through a running node.
async fn queue(chaos: &Chaos, seen: &Seen, violations: &mut Vec<String>) {
    let endpoint = chaos
        .endpoints
        .read()
        .unwrap()
        .iter()
        .find(|e| e.up)
        .cloned()
        .unwrap();
    let mut stored: BTreeMap<u64, usize> = BTreeMap::new();
    let mut next = 0u64;
    loop {
        if next > 0 {
            let commit = serde_json::json!({"group": "checker", "offset": next});
            let url = format!("{}/@queues/orders/commit", endpoint.api_url);
            let _ = http().post(url).json(&commit).send().await;
        }
        let url = format!(
            "{}/@queues/orders/messages?group=checker&max=1000",
            endpoint.api_url
        );
        let page = get_json(&url).await;
        let messages = page["messages"].as_array().cloned().unwrap_or_default();
        for message in &messages {
            let body: Value =
                serde_json::from_str(message["event"]["body"].as_str().unwrap_or("{}"))
                    .unwrap_or_default();
            if let Some(seq) = body["seq"].as_u64() {
                *stored.entry(seq).or_default() += 1;
            }
        }
        let Some(after) = page["next"].as_u64() else {
            break;
        };
        if messages.is_empty() || after == next {
            break;
        }
        next = after;
    }
    let lost: Vec<u64> = seen
        .acked
        .iter()
        .map(|(seq, _)| *seq)
        .filter(|seq| !stored.contains_key(seq))
        .collect();
    if !lost.is_empty() {
        violations.push(format!("acked orders missing from the queue: {lost:?}"));
    }
    let doubled = stored.values().filter(|count| **count > 1).count();
    chaos.step(&format!(
        "queue: {} acked, {} stored, {doubled} stored more than once",
        seen.acked.len(),
        stored.len()
    ));
}

/// 2: one `$disconnect` per `$connect`ed id (waiting, bounded, for the late ones: resume
/// windows running out, takeovers). Returns when each arrived.
async fn one_disconnect_each(
    chaos: &Chaos,
    violations: &mut Vec<String>,
) -> HashMap<String, Instant> {
    let backend = &chaos.backend;
    let connected: BTreeSet<String> = backend
        .events("/connect-log")
        .iter()
        .map(connection_id)
        .collect();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let reported: BTreeSet<String> = backend
            .events("/disconnect")
            .iter()
            .map(connection_id)
            .collect();
        if connected.is_subset(&reported) || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let mut when: HashMap<String, Instant> = HashMap::new();
    // Each connection's reports: their reasons, as the backend got them.
    let mut reasons: HashMap<String, Vec<String>> = HashMap::new();
    for (event, at) in backend.timed_events("/disconnect") {
        let id = connection_id(&event);
        let reason = &event["requestContext"]["disconnectReason"];
        reasons
            .entry(id.clone())
            .or_default()
            .push(reason.to_string());
        when.entry(id).or_insert(at);
    }
    for id in &connected {
        match reasons.get(id).map(Vec::as_slice) {
            Some([_]) => {}
            None => violations.push(format!("{id}: no $disconnect")),
            Some(all) => violations.push(format!("{id}: {} $disconnects: {all:?}", all.len())),
        }
    }
    when
}

/// 3: no frame from, and no message to, a connection after its `$disconnect`.
fn nothing_after_disconnect(
    chaos: &Chaos,
    seen: &Seen,
    disconnects: &HashMap<String, Instant>,
    violations: &mut Vec<String>,
) {
    for (event, at) in chaos.backend.timed_events("/message") {
        let id = connection_id(&event);
        if disconnects.get(&id).is_some_and(|gone| at > *gone) {
            violations.push(format!(
                "{id}: a frame reached the backend after its $disconnect: {}",
                event["body"]
            ));
        }
    }
    for (id, frames) in &seen.received {
        let Some(gone) = disconnects.get(id) else {
            continue;
        };
        for (text, at) in frames {
            if at > gone {
                violations.push(format!("{id}: received {text:?} after its $disconnect"));
            }
        }
    }
}

/// 4: once and in order; and nothing missing for the sessions that lived to the end.
///
/// "In order" is what the gateway promises a room that does not number its messages:
/// broadcasts through one node arrive in the order they were published; a broadcast that
/// reached every member before the next was published arrives before it; pushes answered
/// 200 arrive in the order they were answered. (A push answered 503 may still arrive, late:
/// its outcome was unknown. A broadcast counted short was delivered to fewer members, as
/// its answer said.)
fn once_in_order(seen: &Seen, live: &[String], faults: Faults, violations: &mut Vec<String>) {
    let owed = |b: &Broadcast| match faults {
        Faults::None => b.status == 200,
        Faults::Injected => b.reached_everyone(),
    };
    let broadcasts: HashMap<u64, &Broadcast> =
        seen.broadcast.iter().map(|b| (b.number, b)).collect();
    for (id, frames) in &seen.received {
        let prefix = format!("p:{id}:");
        let pushes: Vec<u64> = (frames.iter())
            .filter_map(|(text, _)| text.strip_prefix(&prefix)?.parse().ok())
            .collect();
        let got: Vec<&Broadcast> = (frames.iter())
            .filter_map(|(text, _)| text.strip_prefix("b:")?.parse().ok())
            .filter_map(|number: u64| broadcasts.get(&number).copied())
            .collect();
        let mut report = |what: String| violations.push(format!("{id}: {what}"));
        let answered: HashMap<u64, u16> = (seen.pushed.iter())
            .filter(|(to, _, _)| to == id)
            .map(|(_, n, status)| (*n, *status))
            .collect();
        let pushes_ok: Vec<u64> = (pushes.iter().copied())
            .filter(|n| answered.get(n) == Some(&200))
            .collect();
        if let Some(twice) = first_repeat(&pushes) {
            report(format!("push {twice} arrived twice"));
        }
        if let Some(pair) = pushes_ok.windows(2).find(|w| w[1] < w[0]) {
            report(format!(
                "pushes answered 200 out of order: {} then {}",
                pair[0], pair[1]
            ));
        }
        let numbers: Vec<u64> = got.iter().map(|b| b.number).collect();
        if let Some(twice) = first_repeat(&numbers) {
            report(format!("broadcast {twice} arrived twice"));
        }
        for via in 0..3 {
            let through: Vec<u64> = got
                .iter()
                .filter(|b| b.via == via)
                .map(|b| b.number)
                .collect();
            if let Some(pair) = through.windows(2).find(|w| w[1] < w[0]) {
                report(format!(
                    "broadcasts through node {} out of order: {} then {}",
                    via + 1,
                    pair[0],
                    pair[1]
                ));
            }
        }
        let everyone: Vec<u64> = got
            .iter()
            .filter(|b| b.reached_everyone())
            .map(|b| b.number)
            .collect();
        if let Some(pair) = everyone.windows(2).find(|w| w[1] < w[0]) {
            report(format!(
                "broadcasts that reached everyone out of order: {} then {}",
                pair[0], pair[1]
            ));
        }
        bulks_once_in_order(seen, id, frames, live.contains(id), &mut report);
        if !live.contains(id) {
            continue;
        }
        let missing: Vec<u64> = (answered.iter())
            .filter(|(n, status)| **status == 200 && !pushes.contains(n))
            .map(|(n, _)| *n)
            .collect();
        if !missing.is_empty() {
            report(format!("pushes answered 200 never arrived: {missing:?}"));
        }
        if let (Some(first), Some(last)) = (numbers.iter().min(), numbers.iter().max()) {
            let gaps: Vec<&Broadcast> = (seen.broadcast.iter())
                .filter(|b| b.number > *first && b.number < *last && owed(b))
                .filter(|b| !numbers.contains(&b.number))
                .collect();
            if !gaps.is_empty() {
                let trace = seen.trace.get(id).cloned().unwrap_or_default();
                let gaps: Vec<String> = (gaps.iter())
                    .map(|b| {
                        format!(
                            "b:{} through node {}, sent at {:?}, answered {} at {:?} counting {}",
                            b.number,
                            b.via + 1,
                            b.sent,
                            b.status,
                            b.answered,
                            b.delivered
                        )
                    })
                    .collect();
                report(format!(
                    "broadcasts owed to it, between {first} and {last}, never arrived: \
                     {gaps:?}\n  received (number/via): {}\n  trace:\n    {}",
                    (got.iter().map(|b| format!("{}/{}", b.number, b.via + 1)))
                        .collect::<Vec<_>>()
                        .join(" "),
                    trace.join("\n    ")
                ));
            }
        }
    }
}

fn first_repeat(numbers: &[u64]) -> Option<u64> {
    let mut seen = BTreeSet::new();
    numbers.iter().copied().find(|n| !seen.insert(*n))
}

/// Bulk sends, for session `id` which received `frames`: none twice; those it is owed
/// (answered 200, naming it, not saying it was gone) in the order they were answered; and,
/// if it lived to the end, every one it is owed.
fn bulks_once_in_order(
    seen: &Seen,
    id: &String,
    frames: &[(String, Instant)],
    lived: bool,
    report: &mut impl FnMut(String),
) {
    let got: Vec<u64> = (frames.iter())
        .filter_map(|(text, _)| text.strip_prefix("k:")?.parse().ok())
        .collect();
    if let Some(twice) = first_repeat(&got) {
        report(format!("bulk send {twice} arrived twice"));
    }
    let owed: BTreeSet<u64> = (seen.bulk.iter())
        .filter(|bulk| bulk.owed_to(id))
        .map(|bulk| bulk.number)
        .collect();
    let got_owed: Vec<u64> = got.iter().copied().filter(|n| owed.contains(n)).collect();
    if let Some(pair) = got_owed.windows(2).find(|w| w[1] < w[0]) {
        report(format!(
            "bulk sends answered 200 out of order: {} then {}",
            pair[0], pair[1]
        ));
    }
    let missing: Vec<&u64> = owed.iter().filter(|n| !got.contains(n)).collect();
    if lived && !missing.is_empty() {
        report(format!(
            "bulk sends answered 200 never arrived: {missing:?}"
        ));
    }
}
