//! The rate budget (issue 12, item 2) at a small scale: four workspaces in one
//! process share one org bucket of 120 requests/min and poll every 100 ms (which
//! alone would be 2,400/min). The budget stretches the polls: no 429, every message
//! answered once, heartbeats keep coming, and the status file shows the budget.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::support::*;

const ORG: &str = "0f0f0f0f-0000-4000-8000-000000000001";

#[test]
fn workspaces_sharing_an_org_bucket_stay_under_the_limit() {
    let emu = Emulator::start_with(&["--org-id", ORG, "--rate-limit", "120"]);
    let (root, _) = emu.workspace(json!({"name": "root"}));
    let (peer, _) =
        emu.workspace(json!({"name": "peer", "parent_id": root, "delivery_mode": "poll"}));
    let dir = Arc::new(TempDir::new());
    let mut entries = Vec::new();
    let mut wss = Vec::new();
    for i in 0..4 {
        let (id, token) = emu.workspace(json!({"name": format!("agent{i}"), "parent_id": root}));
        let token_file = dir.path().join(format!("token-{i}"));
        write_secret(&token_file, &token);
        entries.push(json!({"id": id, "token_file": token_file}));
        wss.push(id);
    }
    let list = dir.path().join("workspaces.json");
    std::fs::write(&list, serde_json::to_vec(&entries).unwrap()).unwrap();
    let state = dir.path().join("state");
    let child = molecule()
        .args(["connect", "--workspaces", list.to_str().unwrap()])
        .args(["--api-url", &emu.url, "--org-id", ORG])
        .args(["--state-dir", state.to_str().unwrap(), "--backend", "mock"])
        .args([
            "--wake",
            "poll",
            "--interval-ms",
            "100",
            "--heartbeat-secs",
            "5",
        ])
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let _guard = KillOnDrop(child);
    let started = Instant::now();
    for round in 0..3 {
        for (i, ws) in wss.iter().enumerate() {
            emu.say(ws, Some(&peer), &format!("r{round} w{i}"));
        }
        let want = 4 * (round + 1);
        let deadline = Instant::now() + Duration::from_secs(40);
        while emu.received(&peer).len() < want && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        assert_eq!(emu.received(&peer).len(), want, "round {round}");
    }
    // At least 12 s of running, so every workspace has beaten a few times.
    while started.elapsed() < Duration::from_secs(12) {
        std::thread::sleep(Duration::from_millis(100));
    }
    let stats = emu.get("/_admin/stats");
    assert!(
        stats["by_status"].get("429").is_none(),
        "{}",
        stats["by_status"]
    );
    let texts: Vec<String> = emu
        .received(&peer)
        .iter()
        .map(|m| m["text"].as_str().unwrap().to_string())
        .collect();
    let mut unique = texts.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), 12, "{texts:?}");
    for ws in &wss {
        let beats = emu.heartbeats(ws)["count"].as_u64().unwrap();
        assert!(beats >= 3, "workspace {ws}: {beats} heartbeats");
        let path = molecule::runner::status_path(&state, ws);
        let doc: Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
        assert_eq!(doc["rate_budget"]["limit"], 120, "{doc}");
        assert_eq!(doc["rate_budget"]["workspaces"], 4, "{doc}");
        assert!(doc["rate_budget"]["remaining"].is_u64(), "{doc}");
    }
}

struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
