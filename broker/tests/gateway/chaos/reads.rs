//! Reads that follow writes, through any node, on replicated state: a consumer group that
//! commits an offset through one node and reads through another starts after its commit.
//! (The committed offsets live in a replicated JetStream bucket, whose own reads any
//! replica may answer, a lagging one too.)

use futures_util::SinkExt;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

use super::harness::Chaos;
use crate::support::*;

const ORDERS: u64 = 60;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_reads_after_its_own_commit_through_every_node() {
    let Some(chaos) = Chaos::start("reads").await else {
        return;
    };
    let (mut ws, _) = tokio_tungstenite::connect_async(&chaos.node(0).ws_url)
        .await
        .unwrap();
    let _welcome = next_text(&mut ws).await;
    for seq in 0..ORDERS {
        let order = json!({"action": "order", "seq": seq}).to_string();
        ws.send(Message::text(order)).await.unwrap();
        let ack: Value = serde_json::from_str(&next_text(&mut ws).await).unwrap();
        assert_eq!(ack["type"], "ack", "{ack}");
    }
    let api = |node: usize| chaos.node(node).api_url.clone();
    for offset in 1..ORDERS {
        let commit = json!({"group": "g", "offset": offset});
        let url = format!("{}/@queues/orders/commit", api(offset as usize % 3));
        let committed = http().post(url).json(&commit).send().await.unwrap();
        assert_eq!(committed.status(), 200);
        let committed: Value = committed.json().await.unwrap();
        assert_eq!(committed["offset"], offset, "{committed}");
        let read = format!(
            "{}/@queues/orders/messages?group=g&max=1",
            api((offset as usize + 1) % 3)
        );
        let page: Value = http().get(read).send().await.unwrap().json().await.unwrap();
        let first = &page["messages"][0]["offset"];
        assert_eq!(
            *first, offset,
            "read after committing {offset}: first {first}"
        );
    }
}
