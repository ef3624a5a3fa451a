//! A numbered room's broadcast that never reached a node is mended from the room's
//! history. Room messages cross NATS as core messages: a node whose connection breaks loses
//! what was in it. Its members notice the gap at the next offset, and get what they missed
//! first, then the rest: every offset once, in order.

use std::time::Duration;

use futures_util::StreamExt;
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

use super::fencing::nodes_with_a_cuttable_first;
use crate::binary::GatewayProcess;
use crate::cluster::{connect, wait_for_members};
use crate::nats::{self, NatsServer};
use crate::support::*;

const NUMBERED: &str = "[[rooms.class]]\npattern = \"numbered:*\"\nhistory_size = 100\n";

/// A numbered room that node `node_id` numbers (its owner).
pub(super) async fn room_numbered_by(through: &GatewayProcess, node_id: u64) -> String {
    for n in 0..64 {
        let room = format!("numbered:gap-{n}");
        let url = format!("{}/@rooms/{room}", through.api_url);
        if get_json(&url).await["owner"] == node_id {
            return room;
        }
    }
    panic!("node {node_id} owns none of 64 rooms");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_numbered_broadcast_lost_with_a_broken_nats_connection_is_mended_from_the_history() {
    let Some(binary) = nats::binary() else { return };
    let server = NatsServer::start(&binary);
    let backend = Backend::start().await;
    let (relay, nodes, _files) = nodes_with_a_cuttable_first(&server, &backend, NUMBERED).await;
    // Numbered by node 2, published through it, heard on node 1 over NATS.
    let room = room_numbered_by(&nodes[0], 2).await;
    let (mut member, _) = connect(&nodes[0], &backend).await;
    send_text(
        &mut member,
        &json!({"action": "join", "room": room}).to_string(),
    )
    .await;
    wait_for_members(&nodes[1], &room, 1).await;
    let url = format!("{}/@rooms/{room}", nodes[1].api_url);
    assert_eq!(post_body(url.clone(), "m1").await.status(), 200);
    assert_eq!(next_text(&mut member).await, "m1");

    // Three broadcasts stuck in the member's node's NATS connection when it breaks: they
    // never reach that node.
    relay.cut();
    for text in ["m2", "m3", "m4"] {
        assert_eq!(post_body(url.clone(), text).await.status(), 200);
    }
    relay.reset();
    relay.heal();

    // Once the node is back on NATS, the next broadcast shows the gap. (Until then,
    // broadcasts are lost for it too, and mended the same way.)
    let mut published = 4;
    let mut heard = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while heard.last() != Some(&format!("m{published}")) {
        assert!(tokio::time::Instant::now() < deadline, "heard {heard:?}");
        if heard.is_empty() {
            published += 1;
            let text = format!("m{published}");
            assert_eq!(post_body(url.clone(), text).await.status(), 200);
        }
        let wait = Duration::from_millis(500);
        if let Ok(Some(Ok(Message::Text(text)))) = tokio::time::timeout(wait, member.next()).await {
            heard.push(text.to_string());
        }
    }
    let expected: Vec<String> = (2..=published).map(|n| format!("m{n}")).collect();
    assert_eq!(heard, expected, "every offset once, in order");
    let mended = r#"switchboard_room_gaps_total{outcome="mended"}"#;
    assert!(nodes[0].metric(mended).await >= 1.0);
}
