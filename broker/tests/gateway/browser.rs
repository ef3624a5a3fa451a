//! The demo chat page in a real browser: headless Chromium (Debian's) driven by
//! playwright-core, against the gateway running the embedded demo config. One page talks
//! over WebSocket, one over WebTransport; they hear each other, and pushes through the
//! management API reach both (the WebSocket page's compressed: permessage-deflate).
//!
//! `.ci/run` installs Chromium and playwright-core and sets SWITCHBOARD_PLAYWRIGHT (the
//! directory holding `node_modules/playwright-core`) and SWITCHBOARD_REQUIRE_BROWSER=1, so
//! CI never skips this; elsewhere it runs when SWITCHBOARD_PLAYWRIGHT is set.

use serde_json::Value;

use crate::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_chat_works_over_both_transports_in_chromium() {
    let Some(playwright) = std::env::var_os("SWITCHBOARD_PLAYWRIGHT") else {
        assert!(
            std::env::var_os("SWITCHBOARD_REQUIRE_BROWSER").is_none(),
            "SWITCHBOARD_REQUIRE_BROWSER is set but SWITCHBOARD_PLAYWRIGHT is not"
        );
        eprintln!("skipped: SWITCHBOARD_PLAYWRIGHT is not set (see .ci/run)");
        return;
    };
    let gateway = TestGateway::start(switchboard::config::DEMO_CONFIG).await;
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/browser_chat.cjs");
    // Kept after the run (target/tmp), for a look at what the browser showed.
    let screenshot = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("browser-chat.png");
    let _ = std::fs::remove_file(&screenshot);
    let output = tokio::process::Command::new("node")
        .env(
            "NODE_PATH",
            std::path::Path::new(&playwright).join("node_modules"),
        )
        .arg(script)
        .arg(format!("http://{}", gateway.api_addr))
        .arg(&gateway.stage)
        .arg(&screenshot)
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{script} failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let result: Value = serde_json::from_str(stdout.trim()).unwrap();
    let (websocket, webtransport) = (
        result["websocket"].as_str().unwrap(),
        result["webtransport"].as_str().unwrap(),
    );
    assert_ne!(websocket, webtransport);
    // Chromium offered permessage-deflate, the demo takes it, and a large push arrived whole.
    assert!(
        result["extensions"]
            .as_str()
            .unwrap()
            .starts_with("permessage-deflate; server_no_context_takeover"),
        "{result}"
    );
    assert!(
        result["status"]
            .as_str()
            .unwrap()
            .contains("over webtransport"),
        "{result}"
    );
    // The page whose room name was refused says so, and shows the refused publish (to the
    // same invalid name) instead of losing the typed message.
    let refusal = &result["refusal"];
    assert!(
        refusal["status"]
            .as_str()
            .unwrap()
            .contains("not in a room"),
        "{refusal}"
    );
    let errors: Vec<&str> = refusal["errors"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert_eq!(errors.len(), 2, "{errors:?}");
    assert!(
        errors
            .iter()
            .all(|e| e.starts_with("Bad request: invalid room name")),
        "{errors:?}"
    );
    let metrics = gateway.metrics().await;
    for transport in ["websocket", "webtransport"] {
        let accepted = format!(
            "switchboard_connections_total{{result=\"accepted\",transport=\"{transport}\"}}"
        );
        let expected = if transport == "websocket" { 2.0 } else { 1.0 };
        assert_eq!(metric_value(&metrics, &accepted), expected, "{accepted}");
    }
    assert!(std::fs::metadata(&screenshot).unwrap().len() > 0);
    gateway.stop().await;
}
