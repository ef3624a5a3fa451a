//! The load generator end to end over both transports: a real gateway (the embedded demo
//! config on ephemeral ports) and the real `switchboard-loadgen` binary, small and bounded.

use std::time::Duration;

use serde_json::Value;
use switchboard::{Listeners, RawConfig};
use tokio_util::sync::CancellationToken;

/// Runs the loadgen binary with `args` against the gateway; returns its JSON report.
async fn loadgen(api: &str, args: &[&str]) -> Value {
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_switchboard-loadgen"))
        .args(["--api", api, "--json"])
        .args(args)
        .output()
        .await
        .unwrap();
    assert!(
        output.status.success(),
        "loadgen {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fanout_and_connect_run_over_websocket_and_webtransport() {
    let data_dir = tempfile::tempdir().unwrap();
    let mut raw = RawConfig::parse(switchboard::config::DEMO_CONFIG).unwrap();
    raw.server.listen = "127.0.0.1:0".into();
    raw.management.listen = "127.0.0.1:0".into();
    if let Some(webtransport) = &mut raw.server.webtransport {
        webtransport.listen = "127.0.0.1:0".into();
    }
    raw.server.shards = 1;
    raw.server.data_dir = data_dir.path().to_path_buf();
    let config = raw.validate().unwrap();
    let listeners = Listeners::bind(&config).unwrap();
    let ws_url = format!("ws://{}/dev", listeners.gateway_addr());
    let api = format!("http://{}/dev", listeners.management_addr());
    let shutdown = CancellationToken::new();
    let served = tokio::spawn(switchboard::serve(config, listeners, shutdown.clone()));

    for transport in ["websocket", "webtransport"] {
        let common = ["--url", ws_url.as_str(), "--transport", transport];
        let fanout = loadgen(
            &api,
            &[
                &common[..],
                &["fanout", "-c", "20", "-m", "50", "--room", transport],
            ]
            .concat(),
        )
        .await;
        assert_eq!(fanout["verdict"], "ok", "{transport}: {fanout}");
        assert_eq!(fanout["delivered"], 1000, "{transport}: {fanout}");
        let connect = loadgen(
            &api,
            &[&common[..], &["connect", "-c", "20", "--hold-secs", "0"]].concat(),
        )
        .await;
        assert_eq!(connect["connected"], 20, "{transport}: {connect}");
    }

    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(15), served)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}
