//! README.md's quickstart, run as written and in order: the demo on its default ports, the
//! Python client block, the curl block (with the connectionId the client printed), the boto3
//! block and the DELETE block, each printing what the README says it prints.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::binary::BIN;
use crate::support::python_has;

/// The fenced code blocks of the README's quickstart section, in order.
fn quickstart_blocks() -> Vec<String> {
    let readme = include_str!("../../../README.md");
    let section = readme
        .split("## Five-minute quickstart")
        .nth(1)
        .and_then(|rest| rest.split("\n## ").next())
        .expect("README has a quickstart section");
    section
        .split("```")
        .skip(1)
        .step_by(2)
        .map(|block| {
            block
                .split_once('\n')
                .map_or("", |(_, code)| code)
                .to_owned()
        })
        .collect()
}

fn bash(script: &str) -> String {
    let output = Command::new("bash")
        .args(["-euo", "pipefail", "-c", script])
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{script}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// The client block as a child process (without its `pip install` line), and a channel of
/// the lines it prints.
fn start_client(block: &str) -> (std::process::Child, std::sync::mpsc::Receiver<String>) {
    let script: String = block
        .lines()
        .filter(|line| !line.contains("pip install"))
        .collect::<Vec<_>>()
        .join("\n");
    let mut child = Command::new("bash")
        .args(["-c", &script])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (lines, receiver) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = lines.send(line);
        }
    });
    (child, receiver)
}

/// The connectionId from the welcome frame the client prints first (resume is on in the
/// demo), which whoami's answer, printed next, repeats.
fn connection_id_from(lines: &std::sync::mpsc::Receiver<String>) -> String {
    let next_json = |what: &str| -> serde_json::Value {
        let line = lines.recv_timeout(Duration::from_secs(10)).expect(what);
        serde_json::from_str(&line).unwrap()
    };
    let welcome = next_json("the client prints the welcome frame");
    assert_eq!(welcome["type"], "welcome", "{welcome}");
    assert!(welcome["resumeToken"].is_string(), "{welcome}");
    let whoami = next_json("the client prints whoami's answer");
    assert_eq!(whoami["connectionId"], welcome["connectionId"], "{whoami}");
    whoami["connectionId"].as_str().unwrap().to_owned()
}

#[test]
fn the_readme_quickstart_works_as_written() {
    let required = std::env::var("SWITCHBOARD_REQUIRE_BOTO3").is_ok();
    if !(python_has("websockets") && python_has("boto3")) {
        assert!(!required, "CI installs websockets and boto3 for this test");
        eprintln!("skipped: python3 websockets or boto3 missing");
        return;
    }
    let blocks = quickstart_blocks();
    assert_eq!(blocks.len(), 4, "client, curl, boto3, delete blocks");
    let dir = tempfile::tempdir().unwrap();
    let mut demo = Command::new(BIN)
        .arg("serve")
        .current_dir(dir.path())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let up = (0..100).any(|_| {
        std::thread::sleep(Duration::from_millis(100));
        std::net::TcpStream::connect("127.0.0.1:9090").is_ok()
    });
    assert!(up, "the demo listens on 127.0.0.1:9090");

    // The client prints its welcome, its connectionId and the queue's ack, then what
    // reaches it.
    let (mut client, lines) = start_client(&blocks[0]);
    let id = connection_id_from(&lines);
    let next = || lines.recv_timeout(Duration::from_secs(10)).unwrap();
    let ack: serde_json::Value = serde_json::from_str(&next()).unwrap();
    assert_eq!(ack["type"], "ack", "{ack}");
    let with_id = |block: &str| block.replace("ID=...", &format!("ID={id}"));
    let printed = bash(&with_id(&blocks[1]));
    for expected in [
        "\"connectedAt\"",
        "{\"delivered\":1,\"offset\":1}",
        "\"count\":1",
        "\"data\":\"to everyone in lobby\",\"offset\":1",
        "{\"delivered\":1,\"gone\":[\"AAAAAAAAAAAAAAAAAAAAAA\"]}",
        "\"routeKey\":\"enqueue\"",
        "\"next\":1",
    ] {
        assert!(printed.contains(expected), "{expected} in {printed}");
    }
    for expected in ["pushed by curl", "to everyone in lobby", "hello"] {
        assert_eq!(next(), expected);
    }

    // boto3 on the same client, then the DELETE that ends it.
    let output = Command::new("python3")
        .args(["-c", &blocks[2], &id])
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(String::from_utf8_lossy(&output.stdout).contains("ConnectedAt"));
    assert_eq!(next(), "hello from boto3");
    let script = format!("ID={id}\n{}", blocks[3]);
    bash(&script);
    let status = client.wait().unwrap();
    assert!(status.success(), "the client ends when DELETE closes it");
    let _ = demo.kill();
    let _ = demo.wait();
}
