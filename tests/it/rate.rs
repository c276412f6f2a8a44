//! The rate budget (issue 12, item 2) at a small scale: four workspaces in one
//! process share one org bucket of 120 requests/min and poll every 100 ms (which
//! alone would be 2,400/min). The budget stretches the polls: no 429, every message
//! answered once, heartbeats keep coming, and the status file shows the budget.

use std::time::Duration;

use serde_json::Value;

use crate::support::*;

const ORG: &str = "0f0f0f0f-0000-4000-8000-000000000001";

#[test]
fn workspaces_sharing_an_org_bucket_stay_under_the_limit() {
    let emu = Emulator::start_with(&["--org-id", ORG, "--rate-limit", "120"]);
    let fleet = Fleet::new(&emu, 4, |_, _| {});
    let (peer, wss, state) = (&fleet.peer, &fleet.ids, &fleet.state);
    let c = fleet.connect(
        &emu,
        &[
            "--org-id",
            ORG,
            "--backend",
            "mock",
            "--wake",
            "poll",
            "--interval-ms",
            "100",
            "--heartbeat-secs",
            "5",
        ],
    );
    for round in 0..3 {
        for (i, ws) in wss.iter().enumerate() {
            emu.say(ws, Some(peer), &format!("r{round} w{i}"));
        }
        let want = 4 * (round + 1);
        wait_until(
            Duration::from_secs(40),
            &format!("round {round}"),
            &c,
            || (emu.received(peer).len() >= want).then_some(()),
        );
        assert_eq!(emu.received(peer).len(), want, "round {round}");
    }
    // Running long enough that every workspace has beaten a few times.
    wait_until(Duration::from_secs(40), "3 heartbeats each", &c, || {
        wss.iter()
            .all(|ws| emu.heartbeats(ws)["count"].as_u64().unwrap_or(0) >= 3)
            .then_some(())
    });
    let stats = emu.get("/_admin/stats");
    assert!(
        stats["by_status"].get("429").is_none(),
        "{}",
        stats["by_status"]
    );
    let texts: Vec<String> = emu
        .received(peer)
        .iter()
        .map(|m| m["text"].as_str().unwrap().to_string())
        .collect();
    let mut unique = texts.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), 12, "{texts:?}");
    for ws in wss {
        let beats = emu.heartbeats(ws)["count"].as_u64().unwrap();
        assert!(beats >= 3, "workspace {ws}: {beats} heartbeats");
        let path = molecule::status_path(state, ws);
        let doc: Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
        assert_eq!(doc["rate_budget"]["limit"], 120, "{doc}");
        assert_eq!(doc["rate_budget"]["workspaces"], 4, "{doc}");
        assert!(doc["rate_budget"]["remaining"].is_u64(), "{doc}");
    }
}
