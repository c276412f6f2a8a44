//! Delegation results and peer names inside `connect` (issue 5): each terminal
//! delegation is logged and handed to the backend exactly once (also across
//! restarts), a pushed `delegate_result` row wakes the tracker at once and is never
//! answered, and a burst of 2,000 distinct peers keeps the peer cache bounded while a
//! slow discover endpoint never holds up the inbox.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};

use crate::support::*;

const DELEGATIONS_ROUTE: &str = "GET /workspaces/:id/delegations";
const DISCOVER_ROUTE: &str = "GET /registry/discover/:id";
const SEND_ROUTE: &str = "POST /workspaces/:id/a2a";
const NOTIFY_ROUTE: &str = "POST /workspaces/:id/notify";

/// An exec backend that appends its input to `input`, then
/// `$MOLECULE_ORIGIN $MOLECULE_DELEGATION_ID` to `calls` (so a line in `calls` means
/// the input is complete), and replies nothing.
fn recording_backend(calls: &Path, input: &Path) -> Vec<String> {
    vec![
        "--backend".into(),
        "exec".into(),
        "--backend-opt".into(),
        format!(
            "cmd=cat >> {}; printf '%s %s\\n' \"$MOLECULE_ORIGIN\" \"$MOLECULE_DELEGATION_ID\" >> {}",
            input.display(),
            calls.display()
        ),
    ]
}

fn lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

fn jsonl(dir: &TempDir, ws: &str) -> PathBuf {
    dir.path()
        .join("state")
        .join(format!("{ws}.delegations.jsonl"))
}

fn status_file(dir: &TempDir, ws: &str) -> Option<Value> {
    let p = molecule::status_path(&dir.path().join("state"), ws);
    serde_json::from_slice(&std::fs::read(p).ok()?).ok()
}

pub(crate) const TASK: &str = "write the weekly report";

pub(crate) fn complete(emu: &Emulator, did: &str) {
    emu.post(
        &format!("/_admin/delegations/{did}/complete"),
        json!({"status": "completed", "text": "the report is done: 42 pages"}),
    );
}

fn args_of(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

#[test]
fn a_completed_delegation_is_logged_and_delivered_once_across_restarts() {
    let Pair { emu, a, b, dir } = Test::new().pair();
    let (calls, input) = (dir.path().join("calls"), dir.path().join("input"));
    let mut args = recording_backend(&calls, &input);
    args.extend(["--delegations-secs".into(), "1".into()]);
    let args = args_of(&args);

    let mut c = Connector::start(&emu, &a, &dir, &args);
    let did = delegate(&emu, &a, &dir, &b.id, TASK);
    // Not terminal yet: nothing is delivered while the delegation is in flight.
    let fetches = emu.route_count(DELEGATIONS_ROUTE);
    wait_until(WAIT, "two tracker fetches", &c, || {
        (emu.route_count(DELEGATIONS_ROUTE) >= fetches + 2).then_some(())
    });
    assert!(lines(&calls).is_empty());
    // The result arrives while the connector is down.
    assert!(c.stop().success(), "{}", c.stderr());
    complete(&emu, &did);

    let mut c = Connector::start(&emu, &a, &dir, &args);
    let got = wait_until(WAIT, "the result at the backend", &c, || {
        let l = lines(&calls);
        (!l.is_empty()).then_some(l)
    });
    assert_eq!(got, [format!("delegation_result {did}")]);
    let text = std::fs::read_to_string(&input).unwrap();
    assert!(
        text.starts_with(&format!(
            "Delegation {did} to workspace {} completed.",
            b.id
        )),
        "{text}"
    );
    assert!(text.contains("the report is done: 42 pages"), "{text}");
    let logged = lines(&jsonl(&dir, &a.id));
    assert_eq!(logged.len(), 1);
    let line: Value = serde_json::from_str(&logged[0]).unwrap();
    assert_eq!(line["delegation_id"], did.as_str());
    assert_eq!(line["target_id"], b.id.as_str());
    assert_eq!(line["status"], "completed");
    assert_eq!(line["response_preview"], "the report is done: 42 pages");
    assert!(line["time"].as_u64().unwrap() > 0);
    assert!(c.stop().success(), "{}", c.stderr());

    // After another restart the platform still lists it: no second line, no second run.
    let c = Connector::start(&emu, &a, &dir, &args);
    let fetches = emu.route_count(DELEGATIONS_ROUTE);
    wait_until(WAIT, "two more tracker fetches", &c, || {
        (emu.route_count(DELEGATIONS_ROUTE) >= fetches + 2).then_some(())
    });
    assert_eq!(lines(&calls).len(), 1, "{}", c.stderr());
    assert_eq!(lines(&jsonl(&dir, &a.id)).len(), 1);
    let st = wait_until(WAIT, "the status file", &c, || status_file(&dir, &a.id));
    assert_eq!(st["delegations"]["pending"], 0);
    // Nothing about the result went back to the platform.
    assert_eq!(emu.route_count(SEND_ROUTE), 0);
    assert_eq!(emu.route_count(NOTIFY_ROUTE), 0);
    assert_eq!(
        emu.received(&b.id).len(),
        1,
        "only the delegated task itself"
    );
}

#[test]
fn a_pushed_result_row_wakes_the_tracker_and_is_never_answered() {
    let Pair { emu, a, b, dir } = Test::new().emulator(&["--delegation-result-push"]).pair();
    let (calls, input) = (dir.path().join("calls"), dir.path().join("input"));
    let mut args = recording_backend(&calls, &input);
    // Only the row can trigger a delivery within this test.
    args.extend(["--delegations-secs".into(), "3600".into()]);
    let c = Connector::start(&emu, &a, &dir, &args_of(&args));
    wait_until(WAIT, "the start-up fetch", &c, || {
        (emu.route_count(DELEGATIONS_ROUTE) >= 1).then_some(())
    });
    emu.wait_polls(2, &c);
    let did = delegate(&emu, &a, &dir, &b.id, TASK);
    assert_eq!(
        emu.route_count(DELEGATIONS_ROUTE),
        1,
        "only the start-up fetch"
    );
    complete(&emu, &did);
    // Within the wait, nowhere near the 3600 s timer: the row triggered the fetch.
    let got = wait_until(WAIT, "the result at the backend", &c, || {
        let l = lines(&calls);
        (!l.is_empty()).then_some(l)
    });
    assert_eq!(got, [format!("delegation_result {did}")]);
    assert_eq!(emu.route_count(DELEGATIONS_ROUTE), 2, "start-up + the row");
    assert_eq!(lines(&jsonl(&dir, &a.id)).len(), 1);
    // The row itself was skipped, not dispatched: no other backend run, nothing sent.
    emu.wait_polls(3, &c);
    assert_eq!(lines(&calls).len(), 1, "{}", c.stderr());
    assert_eq!(emu.route_count(SEND_ROUTE), 0);
    assert_eq!(emu.route_count(NOTIFY_ROUTE), 0);
    let rows = emu.get(&format!("/_admin/workspaces/{}/rows", a.id))["rows"].clone();
    assert!(
        rows.as_array()
            .unwrap()
            .iter()
            .any(|r| r["method"] == "delegate_result"),
        "the emulator pushed a row: {rows}"
    );
}

#[test]
fn caller_names_come_from_peer_info_or_discover() {
    for no_peer_info in [false, true] {
        let emu = if no_peer_info {
            Emulator::start_with(&["--no-peer-info"])
        } else {
            Emulator::start()
        };
        let (a, b) = emu.pair();
        emu.post(
            &format!("/_admin/workspaces/{}/update", b.id),
            json!({"role": "writer"}),
        );
        let dir = Arc::new(TempDir::new());
        let c = Connector::start(
            &emu,
            &a,
            &dir,
            &[
                "--backend",
                "exec",
                "--backend-opt",
                "cmd=printf '%s|%s' \"$MOLECULE_CALLER_NAME\" \"$MOLECULE_CALLER_ROLE\"",
            ],
        );
        emu.say(&a.id, Some(&b.id), "one");
        let first = wait_received(&emu, &b.id, 1, &c);
        if no_peer_info {
            // The first message does not wait for the lookup; later ones have the name.
            wait_until(WAIT, "the looked-up name in the cache", &c, || {
                let st = status_file(&dir, &a.id)?;
                (st["peer_cache"]["size"].as_u64() >= Some(1)).then_some(())
            });
            emu.say(&a.id, Some(&b.id), "two");
            let got = wait_received(&emu, &b.id, 2, &c);
            // Discover answers a name only (§API-2.9).
            assert_eq!(got[1]["text"], "peer|", "{}", c.stderr());
            assert_eq!(emu.route_count(DISCOVER_ROUTE), 1, "cached: asked once");
        } else {
            assert_eq!(first[0]["text"], "peer|writer");
            assert_eq!(emu.route_count(DISCOVER_ROUTE), 0, "no lookup needed");
        }
    }
}

/// A workspace, 2,000 sibling peers (no tokens needed: they only receive), and a
/// connector with a cursor already set (so the burst is paged, not cold-started).
fn burst_setup(emu: &Emulator, extra: &[&str]) -> (Ws, Vec<String>, Arc<TempDir>, Connector) {
    let (root, _) = emu.workspace(json!({"name": "root"}));
    let (a, ta) =
        emu.workspace(json!({"name": "agent", "parent_id": root, "delivery_mode": "poll"}));
    let a = Ws { id: a, token: ta };
    let peers: Vec<String> = (0..2000)
        .map(|i| {
            emu.workspace(json!({
                "name": format!("peer-{i}"), "parent_id": root,
                "delivery_mode": "poll", "no_token": true,
            }))
            .0
        })
        .collect();
    let dir = Arc::new(TempDir::new());
    let mut args = vec!["--backend", "mock", "--concurrency", "4"];
    args.extend_from_slice(extra);
    let c = Connector::start(emu, &a, &dir, &args);
    emu.say(&a.id, Some(&peers[0]), "warm-up");
    wait_received(emu, &peers[0], 1, &c);
    (a, peers, dir, c)
}

/// Sends one message from each peer at once; waits until all are answered while
/// sampling the status file. Returns (discover lookups finished by the time the last
/// answer went out, largest cache size seen, last status).
fn burst(
    emu: &Emulator,
    a: &Ws,
    peers: &[String],
    dir: &TempDir,
    c: &Connector,
) -> (u64, u64, Value) {
    let batch: Vec<Value> = peers
        .iter()
        .enumerate()
        .map(|(i, p)| json!({"from": p, "text": format!("m{i}")}))
        .collect();
    let before = emu.route_count(SEND_ROUTE);
    emu.post(
        &format!("/_admin/workspaces/{}/enqueue_batch", a.id),
        json!({"messages": batch}),
    );
    let mut max_size = 0;
    let mut max_in_flight = 0;
    let mut looked_up = 0;
    let last = wait_until(Duration::from_secs(120), "2,000 answers", c, || {
        let st = status_file(dir, &a.id)?;
        looked_up = emu.route_count(DISCOVER_ROUTE);
        max_size = max_size.max(st["peer_cache"]["size"].as_u64().unwrap_or(0));
        max_in_flight = max_in_flight.max(st["peer_cache"]["in_flight"].as_u64().unwrap_or(0));
        let sent = emu.route_count(SEND_ROUTE).saturating_sub(before);
        (sent >= peers.len() as u64).then_some(st)
    });
    assert!(
        max_in_flight <= 65,
        "in-flight lookups bounded by the queue: {max_in_flight}"
    );
    (looked_up, max_size, last)
}

#[test]
fn two_thousand_peers_keep_the_peer_cache_within_its_capacity() {
    let emu = Emulator::start();
    let (a, peers, dir, c) = burst_setup(&emu, &[]);
    let (_, max_size, st) = burst(&emu, &a, &peers, &dir, &c);
    let cache = &st["peer_cache"];
    eprintln!("2,000 peers with peer_info: cache max {max_size}, status {cache}");
    assert_eq!(cache["capacity"], 1024);
    assert!(max_size <= 1024, "sampled size {max_size}");
    // The high-water mark is kept under the cache's lock: the true maximum.
    assert_eq!(
        cache["high_water"], 1024,
        "2,000 distinct peers filled it exactly"
    );
    assert_eq!(
        emu.route_count(DISCOVER_ROUTE),
        0,
        "names came with the rows"
    );
}

#[test]
fn a_slow_discover_endpoint_never_holds_up_the_inbox() {
    let emu = Emulator::start_with(&["--no-peer-info"]);
    // Every lookup takes 2 s (our limit): 2,000 in a row would take over an hour.
    emu.fault(json!({"path_prefix": "/registry/discover", "delay_ms": 2000, "count": 1_000_000}));
    let (a, peers, dir, c) = burst_setup(&emu, &[]);
    let (looked_up, max_size, st) = burst(&emu, &a, &peers, &dir, &c);
    let cache = &st["peer_cache"];
    eprintln!(
        "2,000 peers, discover 2 s each: {looked_up} looked up, cache max {max_size}, status {cache}"
    );
    // An answer that waited for its lookup would need that lookup finished first.
    assert!(
        looked_up < peers.len() as u64,
        "answers waited on discover: {looked_up} lookups done"
    );
    assert!(max_size <= 1024 && cache["high_water"].as_u64().unwrap() <= 1024);
    wait_until(WAIT, "a (slow) discover lookup", &c, || {
        (emu.route_count(DISCOVER_ROUTE) >= 1).then_some(())
    });
}
