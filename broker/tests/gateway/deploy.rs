//! deploy/ kept true: every metric the Grafana dashboard and the alert rules query is one a
//! real gateway exports after some traffic; the YAML files parse and name files that exist;
//! the configs they ship pass `check-config`; `promtool` agrees with the rules when it is
//! installed.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use serde_json::{Value, json};

use crate::binary::BIN;
use crate::support::*;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn read(path: &str) -> String {
    std::fs::read_to_string(repo().join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// Every `switchboard_*` name in `text`, histogram suffixes removed.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = text;
    while let Some(start) = rest.find("switchboard_") {
        let tail = &rest[start..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        let name = &tail[..end];
        let base = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|suffix| name.strip_suffix(suffix))
            .unwrap_or(name);
        names.insert(base.to_owned());
        rest = &tail[end..];
    }
    names
}

/// The metric families a `/metrics` exposition declares.
fn exported(exposition: &str) -> BTreeSet<String> {
    exposition
        .lines()
        .filter_map(|line| line.strip_prefix("# TYPE "))
        .filter_map(|rest| rest.split_whitespace().next())
        .map(str::to_owned)
        .collect()
}

fn dashboard_exprs() -> String {
    let dashboard: Value = serde_json::from_str(&read("deploy/grafana/switchboard.json")).unwrap();
    let panels = dashboard["panels"].as_array().unwrap();
    assert!(panels.len() >= 10);
    panels
        .iter()
        .flat_map(|p| p["targets"].as_array().unwrap().iter())
        .map(|t| t["expr"].as_str().unwrap().to_owned())
        .collect::<Vec<_>>()
        .join("\n")
}

fn yaml(path: &str) -> Vec<yaml_rust2::Yaml> {
    yaml_rust2::YamlLoader::load_from_str(&read(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn alert_exprs() -> String {
    let rules = yaml("deploy/prometheus/alerts.yml");
    let mut exprs = Vec::new();
    for group in rules[0]["groups"].as_vec().unwrap() {
        for rule in group["rules"].as_vec().unwrap() {
            assert!(rule["alert"].as_str().is_some(), "every rule is an alert");
            exprs.push(rule["expr"].as_str().unwrap().to_owned());
        }
    }
    assert!(exprs.len() >= 5);
    exprs.join("\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_the_dashboard_and_alerts_query_is_exported() {
    let backend = Backend::start().await;
    let dead = dead_url().await;
    let config = config_with(
        &backend,
        &format!(
            r#"
[routes.broken]
integration = {{ type = "http", url = "{dead}" }}
[routes.order]
integration = {{ type = "queue", queue = "orders", ack = true }}
[routes.join]
integration = {{ type = "room_join", room = "$request.body.room" }}
[routes.publish]
integration = {{ type = "room_publish", room = "$request.body.room", data = "$request.body.data" }}
"#
        ),
    );
    let gateway = TestGateway::start(&config).await;
    // Before any traffic, the integration panels and alert already have their series.
    let fresh = exported(&gateway.metrics().await);
    for name in [
        "switchboard_integration_errors_total",
        "switchboard_integration_duration_seconds",
    ] {
        assert!(fresh.contains(name), "{name} exported from the start");
    }
    // Some traffic: a failed integration, a queue append and a commit, a join, a refused
    // publish, a broadcast, a disconnect.
    let (mut ws, _) = gateway.connect_with_id(&backend).await;
    send_text(&mut ws, r#"{"action":"broken"}"#).await;
    let _error_frame = next_json(&mut ws).await;
    send_text(&mut ws, r#"{"action":"order"}"#).await;
    assert_eq!(next_json(&mut ws).await["type"], "ack");
    send_text(&mut ws, r#"{"action":"publish","room":"r","data":"x"}"#).await;
    let _refused = next_json(&mut ws).await;
    send_text(&mut ws, r#"{"action":"join","room":"r"}"#).await;
    let commit = http()
        .post(gateway.api_url("/@queues/orders/commit"))
        .body(json!({"group": "audit", "offset": 0}).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(commit.status(), 200);
    let broadcast = http()
        .post(gateway.api_url("/@rooms/r"))
        .body("hello")
        .send()
        .await
        .unwrap();
    assert_eq!(broadcast.status(), 200);
    drop(ws);
    backend.wait_for("/disconnect", |_| true).await;

    let exposition = gateway.metrics().await;
    let exported = exported(&exposition);
    for (source, exprs) in [
        ("deploy/grafana/switchboard.json", dashboard_exprs()),
        ("deploy/prometheus/alerts.yml", alert_exprs()),
    ] {
        let queried = metric_names(&exprs);
        assert!(queried.len() >= 5, "{source} queries metrics");
        let missing: Vec<_> = queried.difference(&exported).collect();
        assert!(
            missing.is_empty(),
            "{source} queries metrics nobody exports: {missing:?}"
        );
    }
}

#[test]
fn deploy_yaml_parses_and_names_files_that_exist() {
    let compose = yaml("deploy/compose/docker-compose.yml");
    let services = compose[0]["services"].as_hash().unwrap();
    for name in [
        "sb1",
        "sb2",
        "sb3",
        "nats1",
        "nats2",
        "nats3",
        "lb",
        "prometheus",
        "grafana",
        "backend",
    ] {
        assert!(
            services.contains_key(&yaml_rust2::Yaml::String(name.into())),
            "compose runs {name}"
        );
    }
    // Every host path the compose file mounts exists.
    let compose_dir = repo().join("deploy/compose");
    for (_, service) in services {
        for volume in service["volumes"].as_vec().into_iter().flatten() {
            let spec = volume.as_str().unwrap();
            let host = spec.split(':').next().unwrap();
            if host.starts_with('.') {
                assert!(compose_dir.join(host).exists(), "compose mounts {host}");
            }
        }
    }
    assert!(repo().join("Dockerfile").is_file());
    assert!(repo().join(".dockerignore").is_file());

    let prometheus = yaml("deploy/prometheus/prometheus.yml");
    for rules in prometheus[0]["rule_files"].as_vec().unwrap() {
        let path = repo()
            .join("deploy/prometheus")
            .join(rules.as_str().unwrap());
        assert!(path.is_file(), "{} exists", path.display());
    }

    let mut kinds = Vec::new();
    for entry in std::fs::read_dir(repo().join("deploy/kubernetes")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "yaml") {
            let text = std::fs::read_to_string(&path).unwrap();
            for document in yaml_rust2::YamlLoader::load_from_str(&text).unwrap() {
                kinds.push(document["kind"].as_str().unwrap().to_owned());
            }
        }
    }
    for kind in ["StatefulSet", "Service", "PodDisruptionBudget", "ConfigMap"] {
        assert!(kinds.iter().any(|k| k == kind), "kubernetes/ has a {kind}");
    }
}

#[test]
fn deploy_configs_pass_check_config_once_their_secrets_are_given() {
    let dir = tempfile::tempdir().unwrap();
    // What the operator provides: a token (environment or secret file), the NATS password
    // and the CA that signed the NATS servers' certificates.
    let token = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, format!("{token}\n")).unwrap();
    let ca = rcgen::CertificateParams::new(vec!["nats".to_owned()])
        .unwrap()
        .self_signed(&rcgen::KeyPair::generate().unwrap())
        .unwrap();
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, ca.pem()).unwrap();
    let kubernetes = yaml("deploy/kubernetes/configmap.yaml");
    let configs = [
        ("docker", read("deploy/docker/switchboard.toml")),
        ("compose", read("deploy/compose/node.toml")),
        (
            "kubernetes",
            kubernetes[0]["data"]["node.toml"]
                .as_str()
                .unwrap()
                .to_owned(),
        ),
    ];
    for (name, text) in configs {
        let path = dir.path().join(format!("{name}.toml"));
        let data_dir = dir.path().join(format!("{name}-data"));
        let text = text
            .replace("@NODE_ID@", "1")
            .replace("/var/lib/switchboard", data_dir.to_str().unwrap())
            .replace(
                "/run/secrets/switchboard_token",
                token_file.to_str().unwrap(),
            )
            .replace(
                "/etc/switchboard/secret/token",
                token_file.to_str().unwrap(),
            )
            .replace("/certs/ca.pem", ca_file.to_str().unwrap())
            .replace(
                "/etc/switchboard/secret/nats-ca.pem",
                ca_file.to_str().unwrap(),
            );
        std::fs::write(&path, text).unwrap();
        let check = |env: &[(&str, &str)]| {
            std::process::Command::new(BIN)
                .arg("check-config")
                .arg(&path)
                .env_remove("SWITCHBOARD_TOKEN")
                .env_remove("NATS_PASSWORD")
                .envs(env.iter().copied())
                .output()
                .unwrap()
        };
        let given = check(&[
            ("SWITCHBOARD_TOKEN", token),
            ("NATS_PASSWORD", "nats-secret"),
        ]);
        assert!(
            given.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&given.stderr)
        );
        // Nothing in the repository opens them: without the operator's secrets they refuse.
        let bare = check(&[]);
        assert!(!bare.status.success(), "{name} starts with no secret given");
        let shown = String::from_utf8_lossy(&given.stdout);
        assert!(
            !shown.contains(token) && !shown.contains("nats-secret"),
            "{name}: {shown}"
        );
    }
    // None of them publishes metrics without a token.
    for path in ["deploy/docker/switchboard.toml", "deploy/compose/node.toml"] {
        assert!(!read(path).contains("public_metrics = true"), "{path}");
    }
    assert!(!read("deploy/kubernetes/configmap.yaml").contains("public_metrics = true"));
}

#[test]
fn promtool_accepts_the_alert_rules() {
    let Ok(output) = std::process::Command::new("promtool")
        .args(["check", "rules"])
        .arg(repo().join("deploy/prometheus/alerts.yml"))
        .output()
    else {
        assert!(
            std::env::var("SWITCHBOARD_REQUIRE_PROMTOOL").is_err(),
            "SWITCHBOARD_REQUIRE_PROMTOOL is set but promtool is missing"
        );
        eprintln!("skipped: no promtool (Debian package prometheus)");
        return;
    };
    assert!(
        output.status.success(),
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}
