//! `connect` wakes on the event stream (issue 12, item 1): an event polls at once
//! (a duplicate does no harm), a dropped event is caught by the safety poll, a silent
//! stream is replaced, a closed one falls back to polling and reconnects, no stream
//! means polling with one quiet log line, and the delegation tracker wakes too. The
//! fallback and safety periods are set far apart so only the path under test can
//! explain an answer.

use serde_json::{Value, json};

use crate::support::*;

const STREAM_ROUTE: &str = "GET /workspaces/:id/events/stream";

fn stream(emu: &Emulator, ws: &str) -> Value {
    emu.get(&format!("/_admin/workspaces/{ws}/events"))
}

fn stream_fault(emu: &Emulator, ws: &str, spec: Value) {
    emu.post(&format!("/_admin/workspaces/{ws}/events"), spec);
}

/// Waits until `n` streams have been opened for `ws` and one is open.
fn wait_streams(emu: &Emulator, ws: &str, n: u64, c: &Connector) {
    wait_until(WAIT, &format!("{n} stream(s) opened"), c, || {
        let s = stream(emu, ws);
        (s["opened"].as_u64() >= Some(n) && s["open"].as_u64() >= Some(1)).then_some(())
    });
}

fn status(c: &Connector) -> Value {
    let path = molecule::status_path(&c.dir.path().join("state"), &c.ws.id);
    serde_json::from_slice(&std::fs::read(path).unwrap_or_default()).unwrap_or(Value::Null)
}

/// The mock backend woken by events only: no blind poll within a test, a safety
/// poll every `safety_secs`.
fn events_only(safety_secs: u32) -> Test {
    Test::new().mock().args(&[
        "--wake",
        "auto",
        "--interval-ms",
        "3600000",
        "--safety-poll-secs",
        &safety_secs.to_string(),
    ])
}

#[test]
fn events_wake_the_poll_and_a_duplicate_event_does_no_harm() {
    // Neither blind period would fire within the test: only events can wake a poll.
    let Connected { emu, a, b, c, .. } = events_only(3600).connect();
    wait_streams(&emu, &a.id, 1, &c);
    // ...and a finished poll: `status` calls a file from before the first one stale.
    wait_until(WAIT, "the status file says events and a poll", &c, || {
        let s = status(&c);
        (s["wake"]["events_connected_since"].is_number() && !s["last_poll_ok"].is_null())
            .then_some(())
    });
    emu.enqueue(
        &a.id,
        json!({"from": b.id, "text": "one", "message_id": "m-1"}),
    );
    wait_received(&emu, &b.id, 1, &c);
    // The same message again: the platform dedupes the row but fires the events.
    let v = emu.enqueue(
        &a.id,
        json!({"from": b.id, "text": "one", "message_id": "m-1"}),
    );
    assert_eq!(v["duplicate"], true);
    emu.say(&a.id, Some(&b.id), "two");
    let got = wait_received(&emu, &b.id, 2, &c);
    let texts: Vec<&str> = got.iter().map(|m| m["text"].as_str().unwrap()).collect();
    assert_eq!(texts, ["echo: one", "echo: two"]);
    assert_eq!(emu.received(&b.id).len(), 2, "nothing answered twice");
    assert_eq!(emu.route_count(STREAM_ROUTE), 1);
    let state = c.dir.path().join("state");
    let (code, out, err) = run(&[
        "status",
        "--workspace",
        &a.id,
        "--state-dir",
        state.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("wake:") && out.contains("events (stream connected"),
        "{out}"
    );
}

#[test]
fn a_dropped_event_is_caught_by_the_safety_poll() {
    let Connected { emu, a, b, c, .. } = events_only(1).connect();
    wait_streams(&emu, &a.id, 1, &c);
    // Both events of the message are lost (a full buffer, another replica).
    stream_fault(&emu, &a.id, json!({"drop_next": 2}));
    emu.say(&a.id, Some(&b.id), "no event for me");
    let got = wait_received(&emu, &b.id, 1, &c);
    assert_eq!(got[0]["text"], "echo: no event for me");
    assert_eq!(stream(&emu, &a.id)["dropped"], 2);
}

#[test]
fn a_silent_stream_is_replaced_and_a_closed_one_reconnects() {
    // --heartbeat-secs 1 (support default): silence over 2 s means a dead stream.
    let Connected { emu, a, b, c, .. } = events_only(3600).connect();
    wait_streams(&emu, &a.id, 1, &c);
    stream_fault(&emu, &a.id, json!({"silence": true}));
    wait_streams(&emu, &a.id, 2, &c);
    emu.say(&a.id, Some(&b.id), "after silence");
    wait_received(&emu, &b.id, 1, &c);
    // Closed: back to polling at once, then a new stream.
    stream_fault(&emu, &a.id, json!({"close": true}));
    wait_streams(&emu, &a.id, 3, &c);
    emu.say(&a.id, Some(&b.id), "after close");
    let got = wait_received(&emu, &b.id, 2, &c);
    assert_eq!(got[1]["text"], "echo: after close");
    let log = c.stderr();
    assert!(log.contains("silent for 2 s"), "{log}");
    assert!(log.contains("closed the event stream"), "{log}");
    wait_until(WAIT, "stream losses in the status file", &c, || {
        (status(&c)["wake"]["stream_losses"].as_u64() >= Some(2)).then_some(())
    });
}

#[test]
fn no_stream_means_polling_with_one_quiet_log_line() {
    let Connected { emu, a, b, c, .. } = Test::new()
        .emulator(&["--no-event-stream"])
        .mock()
        .args(&["--wake", "auto"])
        .connect();
    emu.say(&a.id, Some(&b.id), "polled");
    wait_received(&emu, &b.id, 1, &c);
    emu.wait_polls(10, &c);
    let log = c.stderr();
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("molecule::runner::wake"))
        .collect();
    assert_eq!(lines.len(), 1, "{log}");
    assert!(lines[0].starts_with("INFO"), "{log}");
    assert_eq!(emu.route_count(STREAM_ROUTE), 1, "not retried per poll");
    // The status file is rewritten within a second of the change.
    let s = wait_until(WAIT, "the status file says why it polls", &c, || {
        let s = status(&c);
        s["wake"]["polling_because"]
            .as_str()
            .is_some_and(|w| w.contains("no event stream"))
            .then_some(s)
    });
    assert_eq!(s["wake"]["mode"], "auto");
}

#[test]
fn wake_events_without_a_stream_exits_5() {
    let Connected {
        emu: _emu, mut c, ..
    } = Test::new()
        .emulator(&["--no-event-stream"])
        .mock()
        .args(&["--wake", "events"])
        .connect();
    let status = c.wait_exit(WAIT);
    assert_eq!(status.code(), Some(5), "{}", c.stderr());
    assert!(c.stderr().contains("--wake events"), "{}", c.stderr());
}

#[test]
fn the_delegation_tracker_wakes_on_the_stream() {
    let Pair { emu, a, b, dir } = Test::new().pair();
    let calls = dir.path().join("calls");
    let cmd = format!(
        "cmd=cat >/dev/null; echo \"$MOLECULE_ORIGIN $MOLECULE_DELEGATION_ID\" >> {}",
        calls.display()
    );
    let args = [
        "--backend",
        "exec",
        "--backend-opt",
        &cmd,
        "--wake",
        "auto",
        "--delegations-secs",
        "3600",
    ];
    let c = Connector::start(&emu, &a, &dir, &args);
    wait_streams(&emu, &a.id, 1, &c);
    let did = delegate(&emu, &a, &dir, &b.id, "summarise the logs");
    emu.post(
        &format!("/_admin/delegations/{did}/complete"),
        json!({"status": "completed", "text": "done"}),
    );
    let got = wait_until(WAIT, "the result at the backend", &c, || {
        let l = std::fs::read_to_string(&calls).unwrap_or_default();
        (!l.is_empty()).then_some(l)
    });
    assert_eq!(got.trim(), format!("delegation_result {did}"));
}
