use super::*;

fn error_of(text: &str) -> String {
    RawConfig::parse(text)
        .and_then(|raw| raw.validate())
        .unwrap_err()
        .to_string()
}

/// A config that sets every key, optional ones included (parsed, not validated: the
/// files it names need not exist).
const EVERY_KEY: &str = r#"
[rooms]
presence = true
history_size = 5
history_ttl_secs = 60
history_durable = false
envelope = true
presence_events = false
conflate = false
[[rooms.class]]
pattern = "ticker:*"
presence = false
history_size = 1
history_ttl_secs = 5
history_durable = true
envelope = false
presence_events = true
conflate = true
[webhooks]
url = "http://127.0.0.1:1/hooks"
events = ["room_occupied"]
secret = "0123456789abcdef"
[routes.join]
integration = { type = "room_join", room = "$request.body.room", history = "$request.body.history", since = "$request.body.since", epoch = "$request.body.epoch" }
[server]
allowed_origins = ["https://app.example"]
trusted_proxies = ["10.0.0.0/8"]
[server.tls]
cert = "c.pem"
key = "k.pem"
[server.webtransport]
cert = "c.pem"
key = "k.pem"
max_handshakes_per_ip = 64
[server.compression]
enabled = true
min_bytes = 128
level = 3
[management]
public_metrics = true
tokens_file = "tokens.txt"
[[management.aws_keys]]
access_key_id = "AKID"
secret_access_key = "secret"
[management.tls]
cert = "c.pem"
key = "k.pem"
[queues.q]
max_messages = 5
[routes.a]
integration = { type = "http", url = "http://x/" }
response = true
[routes.b]
integration = { type = "mock", body = "hi" }
[routes.c]
integration = { type = "room_publish", room = "r", data = "$request.body.d", allow = "$context.authorizer.rooms", key = "$request.body.symbol" }
[routes.d]
integration = { type = "queue", queue = "q", deliver_to = "http://x/" }
[authorizer]
type = "http"
secret = "s"
public_key = "p.pem"
jwks = "j.json"
issuer = "i"
audience = "a"
keys = ["k"]
url = "http://x/"
identity_sources = ["header:A"]
[cluster]
nats_url = "nats://x:4222"
credentials = "c.creds"
token = "t"
user = "u"
password = "p"
tls_ca = "ca.pem"
tls_cert = "client.pem"
tls_key = "client-key.pem"
"#;

/// Dotted key paths of a TOML table; queue and route names become NAME and KEY.
fn key_paths(prefix: &str, table: &toml::Table, out: &mut std::collections::BTreeSet<String>) {
    for (key, value) in table {
        let key = match prefix {
            "queues" => "NAME",
            "routes" => "KEY",
            _ => key.as_str(),
        };
        let path = if prefix.is_empty() {
            key.to_owned()
        } else {
            format!("{prefix}.{key}")
        };
        match value {
            toml::Value::Table(inner) => key_paths(&path, inner, out),
            toml::Value::Array(items)
                if items.iter().all(toml::Value::is_table) && !items.is_empty() =>
            {
                for item in items {
                    if let toml::Value::Table(inner) = item {
                        key_paths(&path, inner, out);
                    }
                }
            }
            _ => {
                out.insert(path);
            }
        }
    }
}

#[test]
fn every_config_key_is_in_the_reference() {
    let raw = RawConfig::parse(EVERY_KEY).unwrap();
    let written: toml::Table = toml::from_str(&raw.to_toml()).unwrap();
    let mut code = std::collections::BTreeSet::new();
    key_paths("", &written, &mut code);
    let reference: std::collections::BTreeSet<String> = include_str!("../../../docs/REFERENCE.md")
        .lines()
        .filter_map(|line| line.strip_prefix("| `"))
        .filter_map(|rest| rest.split('`').next())
        .filter(|name| name.contains('.') && !name.starts_with('/'))
        .map(str::to_owned)
        .collect();
    assert_eq!(code, reference);
}

#[test]
fn push_batches_and_windows_are_bounded() {
    let config = RawConfig::parse("[queues.q]\nbatch_size = 50\nmax_in_flight = 4")
        .unwrap()
        .validate()
        .unwrap();
    assert_eq!(
        config.queues[0].push,
        PushConfig {
            batch_size: 50,
            max_in_flight: 4
        }
    );
    assert!(error_of("[queues.q]\nbatch_size = 0").contains("queues.q.batch_size"));
    assert!(error_of("[queues.q]\nmax_in_flight = 65").contains("queues.q.max_in_flight"));
}

#[test]
fn webtransport_keys_are_checked() {
    let config = RawConfig::parse("[server.webtransport]")
        .unwrap()
        .validate()
        .unwrap();
    let webtransport = config.server.webtransport.unwrap();
    assert_eq!(webtransport.listen.port(), 4433);
    assert!(webtransport.certificate.self_signed_hash().is_some());
    assert!(
        error_of("[server.webtransport]\ncert = \"c.pem\"").contains("server.webtransport.key")
    );
    assert!(
        error_of("[server.webtransport]\ncert = \"/nonexistent.pem\"\nkey = \"k.pem\"")
            .contains("server.webtransport.cert")
    );
    assert!(
        error_of("[server.webtransport]\nquic_idle_timeout_secs = 0")
            .contains("server.webtransport.quic_idle_timeout_secs")
    );
    assert!(
        error_of("[server.webtransport]\nlisten = \"nope\"").contains("server.webtransport.listen")
    );
}

#[test]
fn demo_config_is_valid() {
    let config = RawConfig::parse(DEMO_CONFIG).unwrap().validate().unwrap();
    assert!(config.routes.get(DEFAULT_ROUTE).is_some());
}

#[test]
fn empty_file_gets_every_default() {
    let config = RawConfig::parse("").unwrap().validate().unwrap();
    assert_eq!(config.server.listen.port(), 8080);
    assert_eq!(config.management.listen.port(), 9090);
    assert_eq!(config.api.stage, "dev");
    assert_eq!(config.limits.max_frame_bytes, 32768);
    assert!(config.server.shards >= 1);
}

#[test]
fn design_example_parses() {
    let text = r#"
[server]
listen = "127.0.0.1:8080"
shards = 0
data_dir = "./data"
[management]
listen = "127.0.0.1:9090"
[api]
stage = "dev"
route_selection_expression = "$request.body.action"
[limits]
max_frame_bytes = 32768
max_message_bytes = 131072
idle_timeout_secs = 600
max_connection_secs = 7200
outbound_queue_frames = 1024
[routes."$connect"]
integration = { type = "http", url = "http://127.0.0.1:3000/connect", timeout_ms = 29000 }
[routes.sendMessage]
integration = { type = "http", url = "http://127.0.0.1:3000/message" }
response = true
"#;
    let config = RawConfig::parse(text).unwrap().validate().unwrap();
    assert!(config.routes.get("sendMessage").unwrap().response);
    assert!(!config.routes.get("$connect").unwrap().response);
}

#[test]
fn default_shards_leave_a_core_spare() {
    assert_eq!(default_shards(1), 1);
    assert_eq!(default_shards(2), 1);
    assert_eq!(default_shards(16), 15);
}

#[test]
fn unknown_keys_are_named() {
    assert!(error_of("[server]\nlisten_addr = \"x\"").contains("listen_addr"));
    assert!(error_of("[bogus]\n").contains("bogus"));
    let err =
        error_of("[routes.a]\nintegration = { type = \"http\", url = \"http://x\", extra = 1 }");
    assert!(err.contains("extra"), "{err}");
    let err = error_of("[routes.a]\nintegration = { type = \"carrier_pigeon\" }");
    assert!(err.contains("carrier_pigeon"), "{err}");
}

#[test]
fn bad_values_are_named() {
    assert!(error_of("[server]\nlisten = \"nowhere\"").contains("server.listen"));
    assert!(
        error_of("[api]\nroute_selection_expression = \"${x\"")
            .contains("api.route_selection_expression")
    );
    assert!(error_of("[api]\nstage = \"a/b\"").contains("api.stage"));
    assert!(error_of("[api]\nresume_window_secs = 0").contains("api.resume_window_secs"));
    assert!(error_of("[api]\nresume_buffer_frames = 0").contains("api.resume_buffer_frames"));
    assert!(error_of("[api]\nresume_buffer_bytes = 0").contains("api.resume_buffer_bytes"));
    assert!(error_of("[limits]\nmax_frame_bytes = 0").contains("limits.max_frame_bytes"));
    assert!(
        error_of("[limits]\nmax_frame_bytes = 10\nmax_message_bytes = 5")
            .contains("limits.max_message_bytes")
    );
    assert!(
        error_of("[limits]\nmax_message_bytes = 100000000").contains("limits.max_message_bytes")
    );
    assert!(error_of("[management]\nlisten = \"0.0.0.0:9090\"").contains("management.tokens"));
    let err = error_of("[routes.a]\nintegration = { type = \"http\", url = \"ftp://x\" }");
    assert!(err.contains("routes.\"a\".integration.url"), "{err}");
    assert!(error_of("[routes.\"$weird\"]\nintegration = { type = \"echo\" }").contains("$weird"));
    assert!(error_of("[limits]\nidle_timeout_secs = -1").contains("idle_timeout_secs"));
    let err = error_of("[routes.j]\nintegration = { type = \"room_join\", room = \"${x\" }");
    assert!(err.contains("routes.\"j\".integration.room"), "{err}");
    let err = error_of("[routes.j]\nintegration = { type = \"room_join\" }");
    assert!(err.contains("room"), "{err}");
    assert!(error_of("[storage]\nfsync = \"sometimes\"").contains("storage.fsync"));
    assert!(error_of("[queues.\"a b\"]\n").contains("queues.a b"));
    let err = error_of(
        "[routes.q]\nintegration = { type = \"queue\", queue = \"x\", deliver_to = \"nope\" }",
    );
    assert!(err.contains("deliver_to"), "{err}");
    assert!(error_of("[queues.x]\nmax_messages = 0").contains("queues.x"));
}

#[test]
fn queues_keep_a_bounded_size_and_age_by_default() {
    let text = "[routes.q]\nintegration = { type = \"queue\", queue = \"orders\" }\n[queues.audit]\nmax_messages = 5";
    let config = RawConfig::parse(text).unwrap().validate().unwrap();
    for queue in &config.queues {
        assert_eq!(queue.retention.max_bytes, Some(1 << 30), "{}", queue.name);
        assert_eq!(
            queue.retention.max_age,
            Some(Duration::from_secs(7 * 24 * 3600)),
            "{}",
            queue.name
        );
    }
    assert_eq!(config.queues.len(), 2);
    assert!(error_of("[queues.x]\nmax_bytes = 0").contains("queues.x"));
}

#[test]
fn limits_are_on_by_default_and_zero_turns_a_rate_off() {
    let config = RawConfig::parse("").unwrap().validate().unwrap();
    let limits = &config.limits;
    assert_eq!(limits.inbound.messages.map(|r| r.per_sec), Some(100));
    assert_eq!(limits.inbound.bytes.map(|r| r.burst), Some(2 << 20));
    assert_eq!(limits.per_ip.max_connections, 1000);
    assert!(limits.per_ip.connects.is_some());
    assert!(config.management.public_metrics, "loopback listener");
    let off = RawConfig::parse("[limits]\nmessages_per_sec = 0\nconnects_per_sec_per_ip = 0")
        .unwrap()
        .validate()
        .unwrap();
    assert!(off.limits.inbound.messages.is_none() && off.limits.per_ip.connects.is_none());
    assert!(
        error_of("[limits]\nmessages_per_sec = 10\nmessage_burst = 5")
            .contains("limits.message_burst")
    );
    assert!(error_of("[limits]\nipv6_prefix_len = 0").contains("limits.ipv6_prefix_len"));
}

#[test]
fn check_config_output_round_trips() {
    let raw = RawConfig::parse(DEMO_CONFIG).unwrap();
    let again = RawConfig::parse(&raw.to_toml()).unwrap();
    assert_eq!(again.to_toml(), raw.to_toml());
}

#[test]
fn the_webhook_queue_name_is_reserved() {
    let err = error_of("[queues.\"switchboard.webhooks\"]\nmax_messages = 5\n");
    assert!(err.contains("queues.switchboard.webhooks"), "{err}");
    let err = error_of(
        "[routes.q]\nintegration = { type = \"queue\", queue = \"switchboard.webhooks\" }\n",
    );
    assert!(err.contains("gateway's own queue"), "{err}");
}

#[test]
fn durable_history_is_a_queue_on_one_node_and_not_in_a_cluster() {
    let durable = "[rooms]\nhistory_size = 5\nhistory_durable = true\n";
    let has_queue = |text: &str| {
        let config = RawConfig::parse(text)
            .and_then(|raw| raw.validate())
            .unwrap();
        config
            .queues
            .iter()
            .any(|q| q.name == "switchboard.history")
    };
    assert!(has_queue(durable));
    let clustered = format!("{durable}[cluster]\nnats_url = \"nats://127.0.0.1:4222\"\n");
    assert!(
        !has_queue(&clustered),
        "a cluster keeps it in a JetStream stream"
    );
}

#[test]
fn compression_is_on_unless_disabled_and_its_level_is_checked() {
    let config = RawConfig::parse("").and_then(|raw| raw.validate()).unwrap();
    let deflate = config.server.compression.unwrap();
    assert_eq!((deflate.level, deflate.min_bytes), (6, 256));
    let off = RawConfig::parse("[server.compression]\nenabled = false\n")
        .and_then(|raw| raw.validate())
        .unwrap();
    assert_eq!(off.server.compression, None);
    let err = error_of("[server.compression]\nenabled = true\nlevel = 0\n");
    assert!(err.contains("server.compression.level"), "{err}");
}
