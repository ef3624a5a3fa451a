//! Presence events: members of a room with `presence_events` are told when another member
//! joins or leaves (a route, the API, a disconnect, a DELETE), with its user; a storm of
//! changes is coalesced into a summary instead of members × changes frames.

use std::time::Duration;

use futures_util::StreamExt;
use serde_json::{Value, json};

use crate::support::*;

const SECRET: &str = "presence-events-secret";

fn config(backend: &Backend) -> String {
    config_with(
        backend,
        &format!(
            r#"
[authorizer]
type = "jwt"
token = "query:token"
secret = "{SECRET}"
[rooms]
presence_events = true
[[rooms.class]]
pattern = "quiet:*"
presence_events = false
[routes.join]
integration = {{ type = "room_join", room = "$request.body.room" }}
[routes.leave]
integration = {{ type = "room_leave", room = "$request.body.room" }}
[routes.whoami]
integration = {{ type = "mock", body = "$context.connectionId" }}
response = true
"#
        ),
    )
}

async fn open(gateway: &TestGateway, user: &str) -> (Ws, String) {
    let claims = json!({"sub": user, "exp": 4_000_000_000u64});
    let token = crate::authorizers::hs256(claims, SECRET);
    let url = format!("{}?token={token}", gateway.ws_url());
    let mut ws = tokio_tungstenite::connect_async(url).await.unwrap().0;
    send_text(&mut ws, r#"{"action":"whoami"}"#).await;
    let id = next_text(&mut ws).await;
    (ws, id)
}

async fn members(gateway: &TestGateway, room: &str) -> usize {
    let url = gateway.api_url(&format!("/@rooms/{room}"));
    let body = http().get(url).send().await.unwrap().bytes().await.unwrap();
    serde_json::from_slice::<Value>(&body).unwrap()["count"]
        .as_u64()
        .unwrap() as usize
}

async fn join(gateway: &TestGateway, ws: &mut Ws, room: &str, count: usize) {
    send_text(ws, &json!({"action": "join", "room": room}).to_string()).await;
    for _ in 0..200 {
        if members(gateway, room).await == count {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("{room} never had {count} members");
}

/// The next frame, which must be a presence event.
async fn presence(ws: &mut Ws) -> Value {
    let frame = next_json(ws).await;
    assert_eq!(frame["type"], "presence", "{frame}");
    frame
}

async fn assert_quiet(ws: &mut Ws) {
    let next = tokio::time::timeout(Duration::from_millis(300), ws.next()).await;
    assert!(next.is_err(), "nothing more: {next:?}");
}

#[tokio::test]
async fn members_are_told_who_joins_and_leaves_however_it_happens() {
    let backend = Backend::start().await;
    let gateway = TestGateway::start(&config(&backend)).await;
    let (mut alice, _) = open(&gateway, "alice").await;
    join(&gateway, &mut alice, "lobby", 1).await;
    // Past the window of Alice's own join (a member may hear of changes up to a window
    // before it joined).
    tokio::time::sleep(Duration::from_millis(400)).await;
    // Bob joins: Alice is told, with his user; Bob is not told about himself.
    let (mut bob, bob_id) = open(&gateway, "bob").await;
    join(&gateway, &mut bob, "lobby", 2).await;
    let joined = presence(&mut alice).await;
    assert_eq!(
        joined,
        json!({"type": "presence", "room": "lobby", "event": "join", "connectionId": bob_id, "user": "bob"})
    );
    assert_quiet(&mut bob).await;
    // Leaving by the route.
    send_text(&mut bob, r#"{"action":"leave","room":"lobby"}"#).await;
    let left = presence(&mut alice).await;
    assert_eq!(
        (&left["event"], &left["connectionId"]),
        (&json!("leave"), &json!(bob_id))
    );
    // Leaving by disconnecting.
    join(&gateway, &mut bob, "lobby", 2).await;
    assert_eq!(presence(&mut alice).await["event"], "join");
    drop(bob);
    let left = presence(&mut alice).await;
    assert_eq!(
        (&left["event"], &left["connectionId"]),
        (&json!("leave"), &json!(bob_id))
    );
    // Leaving by DELETE @connections, and joining through the API.
    let (carol, carol_id) = open(&gateway, "carol").await;
    let put = gateway.api_url(&format!("/@rooms/lobby/connections/{carol_id}"));
    assert_eq!(http().put(put).send().await.unwrap().status(), 204);
    let joined = presence(&mut alice).await;
    assert_eq!(
        (&joined["event"], &joined["user"]),
        (&json!("join"), &json!("carol"))
    );
    let delete = gateway.api_url(&format!("/@connections/{carol_id}"));
    assert_eq!(http().delete(delete).send().await.unwrap().status(), 204);
    assert_eq!(presence(&mut alice).await["event"], "leave");
    drop(carol);
    // A class with presence events off: nothing.
    join(&gateway, &mut alice, "quiet:room", 1).await;
    let (mut dave, _) = open(&gateway, "dave").await;
    join(&gateway, &mut dave, "quiet:room", 2).await;
    assert_quiet(&mut alice).await;
    gateway.stop().await;
}

#[tokio::test]
async fn a_storm_of_joins_is_one_summary_not_members_times_changes() {
    const STORM: usize = 60;
    let backend = Backend::start().await;
    let gateway = TestGateway::start(&config(&backend)).await;
    let (mut watcher, _) = open(&gateway, "watcher").await;
    join(&gateway, &mut watcher, "big", 1).await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    let mut crowd = Vec::new();
    for n in 0..STORM {
        crowd.push(open(&gateway, &format!("user{n}")).await.0);
    }
    for ws in &mut crowd {
        send_text(ws, r#"{"action":"join","room":"big"}"#).await;
    }
    // Every change is accounted for, in few frames: single events for the first window's
    // few, summaries ("many") for the rest.
    let mut joined = 0;
    let mut frames = 0;
    while joined < STORM {
        let frame = presence(&mut watcher).await;
        frames += 1;
        match frame["event"].as_str().unwrap() {
            "join" => joined += 1,
            "many" => joined += frame["joined"].as_u64().unwrap() as usize,
            other => panic!("unexpected {other}: {frame}"),
        }
    }
    assert_eq!(joined, STORM);
    assert!(
        frames < STORM,
        "{frames} frames for {STORM} joins: coalesced"
    );
    assert_quiet(&mut watcher).await;
    gateway.stop().await;
}
