//! What runs through the faults, and what it saw:
//!
//! * clients with resume on, all in one room, that drop their own sockets now and then
//!   (as phones do) and resume on a node picked at random, so sessions move between nodes
//!   all the time; a resume refused starts a new session;
//! * a broadcaster (`b:N` to the room), a pusher (`p:ID:N` to each client's session) and a
//!   bulk sender (`k:N` to every client's session in one call), each call through a node
//!   picked at random;
//! * a producer appending `{"action":"order","seq":N}` to the acked queue `orders`, one at a
//!   time, sending again what was not acked (so duplicates may appear, losses may not), on
//!   a new connection to a node picked at random every 40 orders.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

use super::harness::{Endpoint, Rng};
use crate::support::*;

/// How many resumable clients.
pub(crate) const CLIENTS: usize = 6;
/// Orders the producer sends on one connection before it opens another (to a node picked
/// at random): appends go through every node, and connects happen throughout the faults.
const ORDERS_PER_CONNECTION: u64 = 40;
/// How often each driver acts.
const TICK: Duration = Duration::from_millis(50);

/// Everything the workload saw, for the checker.
#[derive(Default)]
pub(crate) struct Seen {
    /// connectionId → the data frames its client received, with when.
    pub(crate) received: HashMap<String, Vec<(String, Instant)>>,
    /// Every push tried: (connectionId, its number for that session, the HTTP status).
    pub(crate) pushed: Vec<(String, u64, u16)>,
    /// Every broadcast tried, in order.
    pub(crate) broadcast: Vec<Broadcast>,
    /// Every bulk send tried, in order.
    pub(crate) bulk: Vec<Bulk>,
    /// Queue sequence numbers acked, with their messageIds.
    pub(crate) acked: Vec<(u64, String)>,
    /// Each client's session now.
    pub(crate) current: Vec<Option<String>>,
    /// Whether each client is connected now (its session served, not moving).
    connected: Vec<bool>,
    pub(crate) resumes: usize,
    pub(crate) new_sessions: usize,
    /// The room every client is in.
    pub(crate) room: &'static str,
    /// connectionId → what happened to its session, for a violation's report.
    pub(crate) trace: HashMap<String, Vec<String>>,
}

/// One `POST @rooms/chaos` of `b:{number}`.
#[derive(Debug, Clone)]
pub(crate) struct Broadcast {
    pub(crate) number: u64,
    /// The node that took it (its publisher).
    pub(crate) via: usize,
    pub(crate) status: u16,
    /// The answer's `delivered`.
    pub(crate) delivered: u64,
    /// When it was sent, and when its answer came.
    pub(crate) sent: Instant,
    pub(crate) answered: Instant,
}

impl Broadcast {
    /// Answered 200 with every client counted: each member's queue had it before the next
    /// broadcast was published, so every member must get it, before the next.
    pub(crate) fn reached_everyone(&self) -> bool {
        self.status == 200 && self.delivered >= CLIENTS as u64
    }
}

/// One bulk `POST @connections` of `k:{number}` to every client's session.
#[derive(Debug, Clone)]
pub(crate) struct Bulk {
    pub(crate) number: u64,
    pub(crate) status: u16,
    /// The sessions it named.
    pub(crate) to: Vec<String>,
    /// The ones its answer said were gone.
    pub(crate) gone: Vec<String>,
}

impl Bulk {
    /// Whether session `id` must get it: answered 200, naming `id`, not saying it was gone.
    pub(crate) fn owed_to(&self, id: &String) -> bool {
        self.status == 200 && self.to.contains(id) && !self.gone.contains(id)
    }
}

impl Seen {
    /// Every client's session now.
    pub(crate) fn live(&self) -> Vec<String> {
        self.current.iter().flatten().cloned().collect()
    }

    fn note(&mut self, id: &str, what: String) {
        self.trace.entry(id.to_owned()).or_default().push(what);
    }
}

pub(crate) struct Workload {
    pub(crate) seen: Arc<Mutex<Seen>>,
    drivers: CancellationToken,
    /// Cancelled, the clients stop dropping their sockets.
    moving: CancellationToken,
    clients: CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    client_tasks: Vec<tokio::task::JoinHandle<()>>,
}

/// A node to call, picked at random among the running ones.
fn pick(endpoints: &RwLock<Vec<Endpoint>>, rng: &Rng) -> Endpoint {
    pick_node(endpoints, rng).1
}

fn pick_node(endpoints: &RwLock<Vec<Endpoint>>, rng: &Rng) -> (usize, Endpoint) {
    let endpoints = endpoints.read().unwrap();
    let up: Vec<(usize, &Endpoint)> = endpoints.iter().enumerate().filter(|(_, e)| e.up).collect();
    let (index, endpoint) = up[rng.below(up.len())];
    (index, endpoint.clone())
}

/// Where a client comes back after its socket dropped.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Comeback {
    /// Any node: the session moves across nodes all the time.
    AnyNode,
    /// The node it was on, while that node runs (another one only once it is down).
    SameNode,
}

impl Workload {
    pub(crate) fn start(
        endpoints: Arc<RwLock<Vec<Endpoint>>>,
        rng: Rng,
        comeback: Comeback,
        room: &'static str,
    ) -> Self {
        Self::start_with_producer_on(endpoints, rng, comeback, room, None)
    }

    /// The workload with its producer's first connection to node `producer` (by index; a
    /// node picked at random if `None`, as for every later one).
    pub(crate) fn start_with_producer_on(
        endpoints: Arc<RwLock<Vec<Endpoint>>>,
        rng: Rng,
        comeback: Comeback,
        room: &'static str,
        producer_on: Option<usize>,
    ) -> Self {
        let seen = Arc::new(Mutex::new(Seen {
            current: vec![None; CLIENTS],
            connected: vec![false; CLIENTS],
            room,
            ..Seen::default()
        }));
        let (drivers, clients) = (CancellationToken::new(), CancellationToken::new());
        let moving = CancellationToken::new();
        let client_tasks = (0..CLIENTS)
            .map(|index| {
                let client = Client {
                    index,
                    comeback,
                    endpoints: endpoints.clone(),
                    rng: rng.clone(),
                    seen: seen.clone(),
                    moving: moving.clone(),
                };
                tokio::spawn(client.run(clients.clone()))
            })
            .collect();
        let tasks = vec![
            tokio::spawn(broadcaster(
                endpoints.clone(),
                rng.clone(),
                seen.clone(),
                drivers.clone(),
            )),
            tokio::spawn(pusher(
                endpoints.clone(),
                rng.clone(),
                seen.clone(),
                drivers.clone(),
            )),
            tokio::spawn(bulk_sender(
                endpoints.clone(),
                rng.clone(),
                seen.clone(),
                drivers.clone(),
            )),
            tokio::spawn(producer(
                endpoints,
                (rng, producer_on),
                seen.clone(),
                drivers.clone(),
            )),
        ];
        Self {
            seen,
            drivers,
            moving,
            clients,
            tasks,
            client_tasks,
        }
    }

    /// Stops sending, and lets what is in flight arrive.
    pub(crate) async fn stop_drivers(&mut self) {
        self.drivers.cancel();
        for task in self.tasks.drain(..) {
            let _ = task.await;
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }

    /// The clients stop dropping their sockets; returns once every one is connected (a
    /// session that was moving between nodes has arrived), or after 15 s.
    pub(crate) async fn hold_still(&mut self) {
        self.moving.cancel();
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline && !self.seen.lock().unwrap().connected.iter().all(|c| *c) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // A new session's join is on its way.
        tokio::time::sleep(Duration::from_millis(300)).await;
    }

    /// Closes every client with a close frame (their sessions end: one `$disconnect` each).
    pub(crate) async fn close_clients(&mut self) {
        self.clients.cancel();
        for task in self.client_tasks.drain(..) {
            let _ = task.await;
        }
    }
}

/// One resumable client.
struct Client {
    index: usize,
    comeback: Comeback,
    endpoints: Arc<RwLock<Vec<Endpoint>>>,
    rng: Rng,
    seen: Arc<Mutex<Seen>>,
    /// Cancelled, it drops its socket no more.
    moving: CancellationToken,
}

/// A client's session: its id, token and count of data frames received.
struct Session {
    id: String,
    token: String,
    received: u64,
}

impl Client {
    async fn run(self, stop: CancellationToken) {
        let mut session: Option<Session> = None;
        let mut home: Option<usize> = None;
        while !stop.is_cancelled() {
            let (index, node) = match home {
                Some(index) if self.comeback == Comeback::SameNode => {
                    let endpoint = self.endpoints.read().unwrap()[index].clone();
                    if endpoint.up {
                        (index, endpoint)
                    } else {
                        pick_node(&self.endpoints, &self.rng)
                    }
                }
                _ => pick_node(&self.endpoints, &self.rng),
            };
            home = Some(index);
            let url = match &session {
                Some(s) => format!("{}?resume={}&received={}", node.ws_url, s.token, s.received),
                None => node.ws_url.clone(),
            };
            let opened = tokio::time::timeout(
                Duration::from_secs(5),
                tokio_tungstenite::connect_async(url),
            )
            .await;
            let Ok(Ok((mut ws, _))) = opened else {
                tokio::time::sleep(Duration::from_millis(100 + self.rng.below(200) as u64)).await;
                continue;
            };
            let asked = session.as_ref().map(|s| s.received);
            if !self.begin(&mut ws, &mut session).await {
                continue;
            }
            if let Some(s) = &session {
                let what = format!(
                    "{:?} on {} (asked from {asked:?}); received {} so far",
                    Instant::now(),
                    node.ws_url,
                    s.received
                );
                self.seen.lock().unwrap().note(&s.id.clone(), what);
            }
            // Served until the socket dies, the client drops it, or the run ends.
            let life = Duration::from_millis(800 + self.rng.below(1500) as u64);
            let dropped = async {
                tokio::select! {
                    _ = tokio::time::sleep(life) => {}
                    _ = self.moving.cancelled() => std::future::pending().await,
                }
            };
            tokio::pin!(dropped);
            self.seen.lock().unwrap().connected[self.index] = true;
            loop {
                tokio::select! {
                    _ = stop.cancelled() => {
                        let _ = ws.close(None).await;
                        // Reads until the close comes back (frames on the way still count).
                        let closing = async { while let Some(Ok(m)) = ws.next().await {
                            if let Message::Text(text) = m {
                                self.record(session.as_mut(), text.to_string());
                            }
                        } };
                        let _ = tokio::time::timeout(Duration::from_secs(5), closing).await;
                        return;
                    }
                    _ = &mut dropped => {
                        // A phone losing its network: no close frame.
                        if let Some(s) = &session {
                            let what = format!("{:?} dropped after {}", Instant::now(), s.received);
                            self.seen.lock().unwrap().note(&s.id.clone(), what);
                        }
                        break;
                    }
                    frame = ws.next() => match frame {
                        Some(Ok(Message::Text(text))) => self.record(session.as_mut(), text.to_string()),
                        Some(Ok(_)) => {}
                        _ => break,
                    },
                }
            }
            self.seen.lock().unwrap().connected[self.index] = false;
        }
    }

    /// Reads the first frame: resumed (same session) or welcome (a new one, which joins
    /// the room). False if the connection did not get that far.
    async fn begin(&self, ws: &mut Ws, session: &mut Option<Session>) -> bool {
        let first = tokio::time::timeout(Duration::from_secs(5), ws.next()).await;
        let Ok(Some(Ok(Message::Text(text)))) = first else {
            return false;
        };
        let Ok(frame) = serde_json::from_str::<Value>(&text) else {
            return false;
        };
        let token = frame["resumeToken"].as_str().unwrap_or_default().to_owned();
        let id = frame["connectionId"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        match frame["type"].as_str() {
            Some("resumed") => {
                if let Some(s) = session.as_mut() {
                    s.token = token;
                    let what = format!("resumed: {text}");
                    self.seen.lock().unwrap().note(&s.id.clone(), what);
                }
                self.seen.lock().unwrap().resumes += 1;
                true
            }
            Some("welcome") => {
                *session = Some(Session {
                    id: id.clone(),
                    token,
                    received: 0,
                });
                {
                    let mut seen = self.seen.lock().unwrap();
                    seen.new_sessions += 1;
                    seen.current[self.index] = Some(id.clone());
                    seen.received.entry(id).or_default();
                }
                let room = self.seen.lock().unwrap().room;
                let join = json!({"action": "join", "room": room}).to_string();
                ws.send(Message::text(join)).await.is_ok()
            }
            _ => false,
        }
    }

    fn record(&self, session: Option<&mut Session>, text: String) {
        let Some(session) = session else { return };
        session.received += 1;
        let mut seen = self.seen.lock().unwrap();
        seen.received
            .entry(session.id.clone())
            .or_default()
            .push((text, Instant::now()));
    }
}

async fn broadcaster(
    endpoints: Arc<RwLock<Vec<Endpoint>>>,
    rng: Rng,
    seen: Arc<Mutex<Seen>>,
    stop: CancellationToken,
) {
    let mut number = 0u64;
    while !stop.is_cancelled() {
        number += 1;
        let (via, node) = pick_node(&endpoints, &rng);
        let sent = Instant::now();
        let call = http()
            .post(format!(
                "{}/@rooms/{}",
                node.api_url,
                seen.lock().unwrap().room
            ))
            .body(format!("b:{number}"))
            .timeout(Duration::from_secs(5))
            .send();
        let (status, answer) = answered(call).await;
        let delivered = answer["delivered"].as_u64().unwrap_or(0);
        let broadcast = Broadcast {
            number,
            via,
            status,
            delivered,
            sent,
            answered: Instant::now(),
        };
        seen.lock().unwrap().broadcast.push(broadcast);
        tokio::time::sleep(TICK).await;
    }
}

async fn pusher(
    endpoints: Arc<RwLock<Vec<Endpoint>>>,
    rng: Rng,
    seen: Arc<Mutex<Seen>>,
    stop: CancellationToken,
) {
    let mut counters: HashMap<String, u64> = HashMap::new();
    while !stop.is_cancelled() {
        let ids = seen.lock().unwrap().live();
        for id in ids {
            let n = counters.entry(id.clone()).or_default();
            *n += 1;
            let text = format!("p:{id}:{n}");
            let node = pick(&endpoints, &rng);
            let url = format!("{}/@connections/{id}", node.api_url);
            let call = http()
                .post(url)
                .body(text)
                .timeout(Duration::from_secs(5))
                .send();
            let status = call.await.map_or(0, |r| r.status().as_u16());
            seen.lock().unwrap().pushed.push((id, *n, status));
        }
        tokio::time::sleep(TICK).await;
    }
}

/// A call's status and JSON answer; 0 and `null` if it got no answer.
async fn answered(call: impl Future<Output = reqwest::Result<reqwest::Response>>) -> (u16, Value) {
    match call.await {
        Ok(response) => {
            let status = response.status().as_u16();
            (status, response.json::<Value>().await.unwrap_or_default())
        }
        Err(_) => (0, Value::Null),
    }
}

/// Sends `k:N` to every client's current session in one bulk call, then the next.
async fn bulk_sender(
    endpoints: Arc<RwLock<Vec<Endpoint>>>,
    rng: Rng,
    seen: Arc<Mutex<Seen>>,
    stop: CancellationToken,
) {
    let mut number = 0u64;
    while !stop.is_cancelled() {
        let to = seen.lock().unwrap().live();
        number += 1;
        let node = pick(&endpoints, &rng);
        let call = http()
            .post(format!("{}/@connections", node.api_url))
            .json(&json!({"connectionIds": to, "data": format!("k:{number}")}))
            .timeout(Duration::from_secs(5))
            .send();
        let (status, answer) = answered(call).await;
        let gone = (answer["gone"].as_array().into_iter().flatten())
            .filter_map(|id| Some(id.as_str()?.to_owned()))
            .collect();
        let bulk = Bulk {
            number,
            status,
            to,
            gone,
        };
        seen.lock().unwrap().bulk.push(bulk);
        tokio::time::sleep(TICK).await;
    }
}

/// Appends orders one at a time; what is not acked (the node died, the socket was cut) is
/// sent again on a new connection.
async fn producer(
    endpoints: Arc<RwLock<Vec<Endpoint>>>,
    (rng, mut first): (Rng, Option<usize>),
    seen: Arc<Mutex<Seen>>,
    stop: CancellationToken,
) {
    let mut seq = 0u64;
    'connections: while !stop.is_cancelled() {
        let node = match first.take() {
            Some(index) => endpoints.read().unwrap()[index].clone(),
            None => pick(&endpoints, &rng),
        };
        let opened = tokio::time::timeout(
            Duration::from_secs(5),
            tokio_tungstenite::connect_async(&node.ws_url),
        )
        .await;
        let Ok(Ok((mut ws, _))) = opened else {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        let _welcome = tokio::time::timeout(Duration::from_secs(5), ws.next()).await;
        while !stop.is_cancelled() {
            let order = json!({"action": "order", "seq": seq}).to_string();
            if ws.send(Message::text(order)).await.is_err() {
                continue 'connections;
            }
            let answer = tokio::time::timeout(Duration::from_secs(5), ws.next()).await;
            let Ok(Some(Ok(Message::Text(text)))) = answer else {
                continue 'connections;
            };
            let ack: Value = serde_json::from_str(&text).unwrap_or_default();
            match ack["messageId"].as_str() {
                Some(id) if ack["type"] == "ack" => {
                    seen.lock().unwrap().acked.push((seq, id.to_owned()));
                    seq += 1;
                    if seq.is_multiple_of(ORDERS_PER_CONNECTION) {
                        let _ = ws.close(None).await;
                        continue 'connections;
                    }
                }
                // An error frame (the queue was unavailable): the same order again.
                _ => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
        let _ = ws.close(None).await;
    }
}
