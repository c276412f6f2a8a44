//! `molecule connect` end to end against the emulator.

use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};

use crate::support::*;

fn originals(msgs: &[Value]) -> Vec<&Value> {
    msgs.iter()
        .filter(|m| !m["duplicate"].as_bool().unwrap_or(false))
        .collect()
}

#[test]
fn peer_round_trip_with_kind_parts() {
    let Connected { emu, a, b, c, .. } = Test::new().mock().connect();
    let inbound = emu.enqueue(
        &a.id,
        json!({"from": b.id, "text": "hello", "part_key": "kind"}),
    );
    let got = wait_received(&emu, &b.id, 1, &c);
    let reply = &got[0];
    assert_eq!(
        reply["from"],
        a.id.as_str(),
        "reply attributed to our workspace"
    );
    assert_eq!(reply["text"], "echo: hello");
    let msg = &reply["body"]["params"]["message"];
    assert_eq!(reply["body"]["method"], "message/send");
    assert_eq!(msg["role"], "user");
    assert_eq!(
        msg["parts"],
        json!([{"kind": "text", "text": "echo: hello"}])
    );
    assert_eq!(msg["metadata"]["in_reply_to"], inbound["message_id"]);
    let expected_id = molecule::reply_message_id(&a.id, inbound["activity_id"].as_str().unwrap());
    assert_eq!(
        msg["messageId"],
        expected_id.as_str(),
        "deterministic reply id"
    );
    // Registered in poll mode, and heartbeats carry the honest payload.
    let reg = emu.get(&format!("/_admin/workspaces/{}/registers", a.id));
    assert_eq!(reg["last"]["delivery_mode"], "poll");
    assert_eq!(reg["last"]["agent_card"]["version"], molecule::VERSION);
    let hb = wait_until(WAIT, "a heartbeat", &c, || {
        let h = emu.heartbeats(&a.id);
        (h["count"].as_u64().unwrap_or(0) >= 1).then_some(h)
    });
    let last = &hb["last"];
    assert_eq!(last["workspace_id"], a.id.as_str());
    assert_eq!(
        last["runtime_metadata"]["connector"],
        format!("molecule {}", molecule::VERSION)
    );
    assert!(
        last.get("runtime_state").is_none(),
        "no runtime_state while healthy: {last}"
    );
    assert!(last["uptime_seconds"].is_u64());
}

#[test]
fn peer_round_trip_with_type_parts_and_exec_backend() {
    let Connected { emu, a, b, c, .. } = Test::new()
        .exec("printf 'got:'; cat; printf ' from %s' \"$MOLECULE_ORIGIN\"")
        .connect();
    let inbound = emu.enqueue(
        &a.id,
        json!({"from": b.id, "text": "typed", "part_key": "type"}),
    );
    let got = wait_received(&emu, &b.id, 1, &c);
    assert_eq!(got[0]["text"], "got:typed from peer");
    assert_eq!(got[0]["from"], a.id.as_str());
    let msg = &got[0]["body"]["params"]["message"];
    assert_eq!(msg["parts"][0]["kind"], "text");
    assert_eq!(msg["role"], "user");
    assert_eq!(msg["metadata"]["in_reply_to"], inbound["message_id"]);
    let id = molecule::reply_message_id(&a.id, inbound["activity_id"].as_str().unwrap());
    assert_eq!(msg["messageId"], id.as_str());
}

/// The round trip scripts/qemu-test.sh runs each foreign release binary through:
/// the exec backend answers a peer and a canvas user, then SIGTERM stops cleanly.
#[test]
fn exec_backend_answers_a_peer_and_a_canvas_user() {
    let Connected {
        emu, a, b, mut c, ..
    } = Test::new()
        .exec("printf '%s says: ' \"$MOLECULE_ORIGIN\"; cat")
        .connect();
    emu.enqueue(&a.id, json!({"from": b.id, "text": "ping"}));
    let got = wait_received(&emu, &b.id, 1, &c);
    assert_eq!(got[0]["text"], "peer says: ping");
    emu.say(&a.id, None, "hello from the canvas");
    let n = wait_notifies(&emu, &a.id, 1, &c);
    assert_eq!(n[0]["message"], "canvas says: hello from the canvas");
    assert!(c.stop().success(), "{}", c.stderr());
}

#[test]
fn canvas_message_gets_one_notify_and_the_echo_is_not_dispatched() {
    let Connected { emu, a, c, .. } = Test::new().mock().connect();
    emu.say(&a.id, None, "hi there");
    let n = wait_notifies(&emu, &a.id, 1, &c);
    assert_eq!(n[0]["message"], "echo: hi there");
    // The notify wrote an echo row into our own inbox; several polls later it must
    // still not have been answered.
    emu.wait_polls(5, &c);
    assert_eq!(
        emu.notifies(&a.id).len(),
        1,
        "echo row dispatched: {}",
        c.stderr()
    );
}

#[test]
fn an_identical_canvas_reply_saved_before_a_crash_is_still_shown() {
    let Pair { emu, a, dir, .. } = Test::new().pair();
    let c = Connector::start(&emu, &a, &dir, &["--backend", "mock"]);
    emu.say(&a.id, None, "same");
    wait_notifies(&emu, &a.id, 1, &c);
    // The second answer, identical, is saved but never shown: the crash comes while
    // its posts fail.
    emu.fault(
        json!({"method": "POST", "path_prefix": format!("/workspaces/{}/notify", a.id),
        "status": 503, "count": 1000}),
    );
    let second = emu.say(&a.id, None, "same");
    wait_until(WAIT, "the second reply saved", &c, || {
        let saved = saved_replies(dir.path(), &a.id);
        saved.iter().any(|(row, _)| *row == second).then_some(())
    });
    c.signal("KILL");
    drop(c);
    emu.clear_faults();
    // After the restart the first reply's echo (just before) is known to be its own.
    let c2 = Connector::start(&emu, &a, &dir, &["--backend", "mock"]);
    let n = wait_notifies(&emu, &a.id, 2, &c2);
    assert_eq!(n[1]["message"], "echo: same", "{}", c2.stderr());
    emu.wait_polls(3, &c2);
    assert_eq!(emu.notifies(&a.id).len(), 2, "{}", c2.stderr());
}

#[test]
fn cold_start_ignores_old_rows_and_answers_new_ones_once_in_order() {
    let Pair { emu, a, b, dir } = Test::new().pair();
    for i in 0..3 {
        emu.enqueue(
            &a.id,
            json!({"from": b.id, "text": format!("old {i}"), "age_secs": 120.0}),
        );
    }
    for i in 0..3 {
        emu.enqueue(
            &a.id,
            json!({"from": b.id, "text": format!("new {i}"), "age_secs": 5.0 - i as f64}),
        );
    }
    let c = Connector::start(&emu, &a, &dir, &["--backend", "mock", "--since-secs", "30"]);
    wait_received(&emu, &b.id, 3, &c);
    emu.wait_polls(5, &c);
    let got = emu.received(&b.id);
    assert_eq!(texts(&got), ["echo: new 0", "echo: new 1", "echo: new 2"]);
}

#[test]
fn pages_are_drained_without_waiting_an_interval_each() {
    let Pair { emu, a, b, dir } = Test::new().pair();
    let anchor = emu.say(&a.id, Some(&b.id), "already handled");
    let batch: Vec<Value> = (0..250)
        .map(|i| json!({"from": b.id, "text": format!("m{i:03}")}))
        .collect();
    emu.post(
        &format!("/_admin/workspaces/{}/enqueue_batch", a.id),
        json!({"messages": batch}),
    );
    std::fs::create_dir_all(dir.path().join("state")).unwrap();
    std::fs::write(
        dir.path().join("state").join(format!("{}.json", a.id)),
        json!({"workspace_id": a.id, "last_since_id": anchor}).to_string(),
    )
    .unwrap();
    // A one-minute interval: waiting it even once between pages would time the test out.
    let c = Connector::start(
        &emu,
        &a,
        &dir,
        &["--backend", "mock", "--interval-ms", "60000"],
    );
    let got = wait_received(&emu, &b.id, 250, &c);
    let expected: Vec<String> = (0..250).map(|i| format!("echo: m{i:03}")).collect();
    assert_eq!(texts(&got), expected);
}

#[test]
fn cursor_410_resets_to_the_window_and_keeps_answering() {
    let Pair { emu, a, b, dir } = Test::new().pair();
    // A saved cursor the platform no longer knows.
    std::fs::create_dir_all(dir.path().join("state")).unwrap();
    std::fs::write(
        dir.path().join("state").join(format!("{}.json", a.id)),
        json!({"workspace_id": a.id, "last_since_id": molecule::uuid::new_v4()}).to_string(),
    )
    .unwrap();
    emu.say(&a.id, Some(&b.id), "one");
    let c = Connector::start(&emu, &a, &dir, &["--backend", "mock"]);
    wait_received(&emu, &b.id, 1, &c);
    // Prune the whole inbox under the running connector: its cursor disappears.
    emu.post(&format!("/_admin/workspaces/{}/prune", a.id), json!({}));
    emu.say(&a.id, Some(&b.id), "two");
    let got = wait_received(&emu, &b.id, 2, &c);
    assert_eq!(texts(&got), ["echo: one", "echo: two"]);
    assert!(c.stderr().contains("is gone"), "{}", c.stderr());
}

#[test]
fn backend_failure_does_not_stop_the_loop() {
    let Connected { emu, a, b, dir, c } = Test::new()
        .exec("x=$(cat); if [ \"$x\" = fail ]; then echo boom >&2; exit 3; fi; echo \"ok $x\"")
        .args(&["--max-attempts", "2"])
        .connect();
    emu.say(&a.id, Some(&b.id), "fail");
    emu.say(&a.id, Some(&b.id), "after");
    let got = wait_received(&emu, &b.id, 2, &c);
    let error_reply = &got[0]["body"]["params"]["message"];
    assert_eq!(error_reply["metadata"]["molecule_error"], true);
    assert!(
        got[0]["text"]
            .as_str()
            .unwrap()
            .contains("could not handle"),
        "{}",
        got[0]
    );
    assert!(
        got[0]["text"].as_str().unwrap().contains("status 3"),
        "{}",
        got[0]
    );
    assert_eq!(got[1]["text"], "ok after");
    let dead = std::fs::read_to_string(
        dir.path()
            .join("state")
            .join(format!("{}.deadletter.jsonl", a.id)),
    )
    .unwrap();
    let line: Value = serde_json::from_str(dead.lines().next().unwrap()).unwrap();
    assert_eq!(line["text"], "fail");
    assert!(line["error"].as_str().unwrap().contains("boom"), "{line}");
}

#[test]
fn backend_timeout_kills_grandchildren_and_continues() {
    let Pair { emu, a, b, dir } = Test::new().pair();
    let pidfile = dir.path().join("grandchild.pid");
    let cmd = format!(
        "cmd=x=$(cat); if [ \"$x\" = hang ]; then (sleep 300; echo late) & echo $! > {}; sleep 300; fi; echo \"ok $x\"",
        pidfile.display()
    );
    let c = Connector::start(
        &emu,
        &a,
        &dir,
        &[
            "--backend",
            "exec",
            "--backend-opt",
            &cmd,
            "--backend-opt",
            "timeout=1s",
            "--max-attempts",
            "1",
        ],
    );
    emu.say(&a.id, Some(&b.id), "hang");
    emu.say(&a.id, Some(&b.id), "next");
    let got = wait_received(&emu, &b.id, 2, &c);
    assert!(
        got[0]["text"].as_str().unwrap().contains("timed out"),
        "{}",
        got[0]
    );
    assert_eq!(got[1]["text"], "ok next");
    let pid = std::fs::read_to_string(&pidfile)
        .unwrap()
        .trim()
        .to_string();
    let alive = std::path::Path::new(&format!("/proc/{pid}")).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .unwrap_or_default()
            .contains(") Z");
    assert!(!alive, "grandchild {pid} survived the timeout");
}

#[test]
fn transient_faults_lose_nothing_and_answer_once() {
    let Pair { emu, a, b, dir } = Test::new().pair();
    emu.fault(json!({"method": "GET", "path_prefix": format!("/workspaces/{}/activity", a.id), "status": 503, "count": 1}));
    emu.fault(json!({"method": "GET", "path_prefix": format!("/workspaces/{}/activity", a.id), "status": 429,
        "headers": {"Retry-After": "1"}, "body": {"error": "rate limit exceeded", "retry_after": 1}, "count": 1}));
    emu.fault(json!({"method": "GET", "path_prefix": format!("/workspaces/{}/activity", a.id), "drop": true, "count": 1}));
    emu.fault(json!({"method": "GET", "path_prefix": format!("/workspaces/{}/activity", a.id), "status": 500, "count": 1}));
    emu.fault(
        json!({"method": "POST", "path_prefix": "/registry/heartbeat", "status": 500, "count": 2}),
    );
    emu.fault(json!({"method": "POST", "path_prefix": format!("/workspaces/{}/a2a", b.id), "status": 502, "count": 2}));
    emu.fault(json!({"method": "POST", "path_prefix": format!("/workspaces/{}/a2a", b.id), "drop": true, "count": 1}));
    emu.fault(json!({"method": "POST", "path_prefix": format!("/workspaces/{}/notify", a.id), "status": 503, "count": 1}));
    emu.fault(json!({"method": "POST", "path_prefix": format!("/workspaces/{}/notify", a.id), "drop": true, "count": 1}));
    for i in 0..4 {
        emu.say(&a.id, Some(&b.id), &format!("p{i}"));
    }
    emu.say(&a.id, None, "canvas");
    let c = Connector::start(&emu, &a, &dir, &["--backend", "mock"]);
    let got = wait_until(Duration::from_secs(60), "4 distinct replies", &c, || {
        let r = emu.received(&b.id);
        (originals(&r).len() >= 4).then_some(r)
    });
    wait_notifies(&emu, &a.id, 1, &c);
    emu.wait_polls(3, &c);
    let got_now = emu.received(&b.id);
    assert_eq!(
        originals(&got_now).len(),
        4,
        "a reply was answered twice: {got:?}"
    );
    let mut t: Vec<String> = originals(&got_now)
        .iter()
        .map(|m| m["text"].as_str().unwrap().to_string())
        .collect();
    t.sort();
    assert_eq!(t, ["echo: p0", "echo: p1", "echo: p2", "echo: p3"]);
    assert!(
        emu.notifies(&a.id)
            .iter()
            .all(|n| n["message"] == "echo: canvas")
    );
}

#[test]
fn malformed_rows_are_skipped_and_never_used_in_a_url() {
    let Pair { emu, a, b, dir } = Test::new().pair();
    let rows = format!("/_admin/workspaces/{}/rows", a.id);
    emu.post(&rows, json!({"method": "message/send", "source_id": b.id}));
    emu.post(
        &rows,
        json!({"method": "message/send", "source_id": b.id, "request_body": "{not json"}),
    );
    emu.post(&rows, json!({"method": "message/send", "source_id": "not-a-uuid",
        "request_body": {"params": {"message": {"role": "user", "parts": [{"kind": "text", "text": "x"}]}}}}));
    emu.post(
        &rows,
        json!({"method": "tasks/cancel", "source_id": b.id, "request_body": {}}),
    );
    emu.say(&a.id, Some(&b.id), "good");
    let c = Connector::start(&emu, &a, &dir, &["--backend", "mock"]);
    let got = wait_received(&emu, &b.id, 1, &c);
    assert_eq!(texts(&got), ["echo: good"]);
    emu.wait_polls(3, &c);
    assert_eq!(emu.received(&b.id).len(), 1);
    let stats = emu.get("/_admin/stats");
    for r in stats["requests"].as_array().unwrap() {
        assert!(!r["path"].as_str().unwrap().contains("not-a-uuid"), "{r}");
    }
    assert!(c.stderr().contains("not a UUID"), "{}", c.stderr());
}

#[test]
fn sigterm_when_idle_saves_the_cursor_and_restart_does_not_reanswer() {
    let Connected {
        emu,
        a,
        b,
        dir,
        mut c,
    } = Test::new().mock().connect();
    let id = emu.say(&a.id, Some(&b.id), "first");
    wait_received(&emu, &b.id, 1, &c);
    emu.wait_polls(2, &c);
    let status = c.stop();
    assert_eq!(status.code(), Some(0), "{}", c.stderr());
    assert_eq!(c.state()["last_since_id"], id.as_str());
    let c2 = Connector::start(&emu, &a, &dir, &["--backend", "mock"]);
    emu.wait_polls(3, &c2);
    assert_eq!(
        emu.received(&b.id).len(),
        1,
        "re-answered after restart: {}",
        c2.stderr()
    );
    emu.say(&a.id, Some(&b.id), "second");
    let got = wait_received(&emu, &b.id, 2, &c2);
    assert_eq!(texts(&got), ["echo: first", "echo: second"]);
}

#[test]
fn a_clean_stop_posts_every_queued_self_report() {
    let Connected {
        emu, a, b, mut c, ..
    } = Test::new().mock().connect();
    // The first a2a_send self-report stalls past the request grace of a stop, so the
    // reports of the replies after it are still queued when the SIGTERM comes.
    emu.fault(
        json!({"method": "POST", "path_prefix": format!("/workspaces/{}/activity", a.id),
        "delay_ms": 4000, "count": 1}),
    );
    for i in 0..8 {
        emu.say(&a.id, Some(&b.id), &format!("m{i}"));
    }
    wait_received(&emu, &b.id, 8, &c);
    assert_eq!(c.stop().code(), Some(0), "{}", c.stderr());
    let rows = emu.get(&format!("/_admin/workspaces/{}/rows", a.id));
    let reports = rows["rows"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["activity_type"] == "a2a_send")
        .count();
    assert_eq!(reports, 8, "{}", c.stderr());
}

#[test]
fn a_reply_whose_post_hangs_does_not_hold_the_next_senders_reply() {
    let Connected { emu, a, b, c, .. } = Test::new().mock().connect();
    // The platform takes a minute to answer the post of b's reply: with one poster,
    // the canvas reply behind it would wait that minute too.
    emu.fault(
        json!({"method": "POST", "path_prefix": format!("/workspaces/{}/a2a", b.id),
        "delay_ms": 60_000, "count": 1}),
    );
    emu.say(&a.id, Some(&b.id), "slow");
    emu.say(&a.id, None, "quick");
    let shown = wait_notifies(&emu, &a.id, 1, &c);
    assert_eq!(shown.len(), 1, "{}", c.stderr());
    assert_eq!(emu.notify_texts(&a.id), ["echo: quick"], "{}", c.stderr());
}

#[test]
fn inbound_replies_are_not_auto_answered() {
    let Connected { emu, a, b, c, .. } = Test::new().mock().connect();
    emu.enqueue(
        &a.id,
        json!({"from": b.id, "text": "this is a reply", "metadata": {"in_reply_to": "x"}}),
    );
    emu.say(&a.id, Some(&b.id), "fresh");
    let got = wait_received(&emu, &b.id, 1, &c);
    emu.wait_polls(3, &c);
    assert_eq!(texts(&emu.received(&b.id)), ["echo: fresh"], "{got:?}");
}

#[test]
fn second_instance_is_refused() {
    let Connected { emu, a, dir, c, .. } = Test::new().mock().connect();
    emu.wait_polls(1, &c);
    let mut second = Connector::start(&emu, &a, &dir, &["--backend", "mock"]);
    let status = second.wait_exit(Duration::from_secs(10));
    assert_eq!(status.code(), Some(2));
    assert!(second.stderr().contains(".lock"), "{}", second.stderr());
}

#[test]
fn revoked_token_exits_3_and_removed_workspace_exits_4() {
    let Connected { emu, a, mut c, .. } = Test::new().mock().connect();
    emu.wait_polls(1, &c);
    emu.post(&format!("/_admin/workspaces/{}/revoke", a.id), json!({}));
    let status = c.wait_exit(WAIT);
    assert_eq!(status.code(), Some(3), "{}", c.stderr());
    assert!(c.stderr().contains("rotate"), "{}", c.stderr());
    assert!(!c.stderr().contains(&a.token), "token leaked to the log");

    let (x, _) = emu.pair();
    let dir = Arc::new(TempDir::new());
    let mut c = Connector::start(&emu, &x, &dir, &["--backend", "mock"]);
    emu.wait_polls(1, &c);
    emu.post(&format!("/_admin/workspaces/{}/remove", x.id), json!({}));
    let status = c.wait_exit(WAIT);
    assert_eq!(status.code(), Some(4), "{}", c.stderr());
    assert!(c.stderr().contains("removed"), "{}", c.stderr());
}

#[test]
fn rotated_token_file_is_picked_up_after_a_401() {
    let Connected { emu, a, b, dir, c } = Test::new().mock().connect();
    emu.wait_polls(1, &c);
    let rotated = emu.post(&format!("/_admin/workspaces/{}/rotate", a.id), json!({}));
    write_secret(
        &dir.path().join("token"),
        rotated["token"].as_str().unwrap(),
    );
    emu.say(&a.id, Some(&b.id), "after rotation");
    let got = wait_received(&emu, &b.id, 1, &c);
    assert_eq!(got[0]["text"], "echo: after rotation");
}

#[test]
fn platform_without_poll_mode_exits_5() {
    let Pair { emu, a, dir, .. } = Test::new().pair();
    emu.fault(
        json!({"method": "POST", "path_prefix": "/registry/register", "status": 200,
        "body": {"status": "registered", "delivery_mode": "push"}, "count": 1}),
    );
    let mut c = Connector::start(&emu, &a, &dir, &["--backend", "mock"]);
    assert_eq!(c.wait_exit(WAIT).code(), Some(5), "{}", c.stderr());
}

#[test]
fn failing_agents_do_not_ping_pong_error_replies() {
    let Pair { emu, a, b, .. } = Test::new().pair();
    let (da, db) = (Arc::new(TempDir::new()), Arc::new(TempDir::new()));
    let args = [
        "--backend",
        "exec",
        "--backend-opt",
        "cmd=exit 3",
        "--max-attempts",
        "1",
    ];
    let ca = Connector::start(&emu, &a, &da, &args);
    let cb = Connector::start(&emu, &b, &db, &args);
    emu.say(&a.id, Some(&b.id), "start");
    // A fails and tells B; B fails on that error reply and must stay quiet.
    wait_received(&emu, &b.id, 1, &ca);
    emu.wait_polls(10, &cb);
    assert_eq!(emu.received(&b.id).len(), 1, "{}", cb.stderr());
    assert_eq!(
        emu.received(&a.id).len(),
        0,
        "error reply answered: {}",
        cb.stderr()
    );
}

#[test]
fn a_row_with_a_wrongly_typed_field_does_not_block_the_inbox() {
    let Pair { emu, a, b, dir } = Test::new().pair();
    let rows = format!("/_admin/workspaces/{}/rows", a.id);
    emu.post(
        &rows,
        json!({"method": 5, "source_id": b.id, "summary": {"odd": true}}),
    );
    emu.say(&a.id, Some(&b.id), "after the odd row");
    let c = Connector::start(&emu, &a, &dir, &["--backend", "mock"]);
    let got = wait_received(&emu, &b.id, 1, &c);
    assert_eq!(texts(&got), ["echo: after the odd row"]);
}

#[test]
fn saved_reply_is_posted_after_a_crash_without_running_the_backend_again() {
    let Pair { emu, a, b, dir } = Test::new().pair();
    let inbound = emu.enqueue(&a.id, json!({"from": b.id, "text": "hi"}));
    let row = inbound["activity_id"].as_str().unwrap();
    // State as a crash would leave it: the backend's reply saved, not yet posted.
    std::fs::create_dir_all(dir.path().join("state")).unwrap();
    std::fs::write(
        dir.path().join("state").join(format!("{}.journal", a.id)),
        format!(
            "{}\n",
            json!({"t": "reply", "row": row, "reply": {"text": "saved answer"}})
        ),
    )
    .unwrap();
    let marker = dir.path().join("backend-ran");
    let cmd = format!("cmd=touch {}; echo should-not-run", marker.display());
    let c = Connector::start(
        &emu,
        &a,
        &dir,
        &["--backend", "exec", "--backend-opt", &cmd],
    );
    let got = wait_received(&emu, &b.id, 1, &c);
    assert_eq!(got[0]["text"], "saved answer");
    let id = molecule::reply_message_id(&a.id, row);
    assert_eq!(
        got[0]["body"]["params"]["message"]["messageId"],
        id.as_str()
    );
    assert!(!marker.exists(), "the backend ran again");
}

#[test]
fn concurrency_runs_senders_in_parallel_and_each_sender_in_order() {
    let emu = Emulator::start();
    let (root, _) = emu.workspace(json!({"name": "root"}));
    let (a, ta) = emu.workspace(json!({"parent_id": root}));
    let a = Ws { id: a, token: ta };
    let peers: Vec<String> = (0..3)
        .map(|_| {
            emu.workspace(json!({"parent_id": root, "delivery_mode": "poll"}))
                .0
        })
        .collect();
    let dir = Arc::new(TempDir::new());
    let log = dir.path().join("runs.log");
    let cmd = format!(
        "cmd=x=$(cat); echo \"start $x\" >> {l}; sleep 0.4; echo \"end $x\" >> {l}; echo \"$x\"",
        l = log.display()
    );
    for i in 0..3 {
        for p in &peers {
            emu.say(&a.id, Some(p), &format!("{}-{i}", &p[..8]));
        }
    }
    let c = Connector::start(
        &emu,
        &a,
        &dir,
        &[
            "--backend",
            "exec",
            "--backend-opt",
            &cmd,
            "--concurrency",
            "3",
        ],
    );
    for p in &peers {
        let got = wait_received(&emu, p, 3, &c);
        let expected: Vec<String> = (0..3).map(|i| format!("{}-{i}", &p[..8])).collect();
        assert_eq!(texts(&got), expected, "per-sender order");
    }
    let lines: Vec<String> = std::fs::read_to_string(&log)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect();
    let mut running: Vec<String> = Vec::new();
    let mut max_parallel = 0;
    for l in &lines {
        let (what, text) = l.split_once(' ').unwrap();
        let sender = text.split('-').next().unwrap().to_string();
        if what == "start" {
            assert!(
                !running.contains(&sender),
                "two runs of one sender at once: {lines:?}"
            );
            running.push(sender);
            max_parallel = max_parallel.max(running.len());
        } else {
            running.retain(|s| *s != sender);
        }
    }
    assert!(max_parallel >= 2, "runs never overlapped: {lines:?}");
}

/// Two peers of `a` (`p`, `q`) with three messages queued (p1, q1, p2), and `p`'s
/// replies refused with 503 until the faults are cleared: p1's reply stays in
/// delivery (journaled, retried).
fn reply_held_in_delivery() -> (Emulator, Ws, String, String) {
    let emu = Emulator::start();
    let (root, _) = emu.workspace(json!({"name": "root"}));
    let (a, ta) = emu.workspace(json!({"parent_id": root}));
    let a = Ws { id: a, token: ta };
    let (p, _) = emu.workspace(json!({"parent_id": root, "delivery_mode": "poll"}));
    let (q, _) = emu.workspace(json!({"parent_id": root, "delivery_mode": "poll"}));
    emu.fault(
        json!({"method": "POST", "path_prefix": format!("/workspaces/{p}/a2a"),
        "status": 503, "count": 1000}),
    );
    emu.say(&a.id, Some(&p), "p1");
    emu.say(&a.id, Some(&q), "q1");
    emu.say(&a.id, Some(&p), "p2");
    (emu, a, p, q)
}

/// Backends run so far (each run appends its message text to `log`).
fn runs(log: &std::path::Path) -> String {
    std::fs::read_to_string(log).unwrap_or_default()
}

/// An exec command that echoes each message and appends it to `log` (see [`runs`]).
fn echo_logging_runs(log: &std::path::Path) -> String {
    format!(
        "cmd=x=$(cat); echo \"$x\" >> {}; echo \"$x\"",
        log.display()
    )
}

/// Starts `cmd` at `--concurrency 1` on [`reply_held_in_delivery`]'s messages and
/// waits until q1 runs: with one backend slot, only while p1's reply is in delivery.
fn start_until_q1_runs(emu: &Emulator, a: &Ws, dir: &Arc<TempDir>, cmd: &str) -> Connector {
    let log = dir.path().join("runs.log");
    let c = Connector::start(
        emu,
        a,
        dir,
        &[
            "--backend",
            "exec",
            "--backend-opt",
            cmd,
            "--concurrency",
            "1",
        ],
    );
    wait_until(
        WAIT,
        "q1 to run while p1's reply is in delivery",
        &c,
        || runs(&log).contains("q1").then_some(()),
    );
    c
}

#[test]
fn a_reply_in_delivery_lets_another_sender_run_but_holds_its_own_sender() {
    let (emu, a, p, q) = reply_held_in_delivery();
    let dir = Arc::new(TempDir::new());
    let log = dir.path().join("runs.log");
    let c = start_until_q1_runs(&emu, &a, &dir, &echo_logging_runs(&log));
    // p1 cannot be delivered while the fault lasts, so p stays busy: p2 waits.
    assert_eq!(runs(&log), "p1\nq1\n", "{}", c.stderr());
    assert!(emu.received(&p).is_empty(), "{}", c.stderr());
    emu.clear_faults();
    let got = wait_received(&emu, &p, 2, &c);
    assert_eq!(texts(&got), ["p1", "p2"], "per-sender order");
    assert_eq!(texts(&wait_received(&emu, &q, 1, &c)), ["q1"]);
    assert_eq!(runs(&log), "p1\nq1\np2\n");
}

#[test]
fn sigterm_with_a_reply_in_delivery_drains_the_next_run_and_keeps_the_reply() {
    let (emu, a, p, q) = reply_held_in_delivery();
    let dir = Arc::new(TempDir::new());
    let log = dir.path().join("runs.log");
    let gate = dir.path().join("gate");
    // q1 runs until the test opens the gate.
    let cmd = format!(
        "cmd=x=$(cat); echo \"$x\" >> {}; if [ \"$x\" = q1 ]; then while [ ! -e {} ]; do sleep 0.05; done; fi; echo \"$x\"",
        log.display(),
        gate.display()
    );
    let mut c = start_until_q1_runs(&emu, &a, &dir, &cmd);
    c.signal("TERM");
    wait_until(WAIT, "the signal", &c, || {
        c.stderr().contains("signal received").then_some(())
    });
    std::fs::write(&gate, "").unwrap();
    let status = c.wait_exit(WAIT);
    assert_eq!(status.code(), Some(0), "{}", c.stderr());
    // The running backend finished and its reply went out; p1's reply stays saved,
    // not posted; p2 never started.
    assert_eq!(texts(&emu.received(&q)), ["q1"], "{}", c.stderr());
    assert!(emu.received(&p).is_empty(), "{}", c.stderr());
    assert_eq!(runs(&log), "p1\nq1\n");
    drop(c);
    emu.clear_faults();
    // After a restart p1's saved reply goes out without running a backend, then p2;
    // q1 is not answered again.
    let c2 = Connector::start(&emu, &a, &dir, &["--backend", "mock"]);
    let got = wait_received(&emu, &p, 2, &c2);
    assert_eq!(texts(&got), ["p1", "echo: p2"], "{}", c2.stderr());
    emu.wait_polls(3, &c2);
    assert_eq!(emu.received(&q).len(), 1, "{}", c2.stderr());
    assert_eq!(runs(&log), "p1\nq1\n");
}

#[test]
fn a_reply_waiting_for_a_busy_poster_is_journaled_and_survives_a_kill_9() {
    let emu = Emulator::start();
    let (root, _) = emu.workspace(json!({"name": "root"}));
    let (a, ta) = emu.workspace(json!({"parent_id": root}));
    let a = Ws { id: a, token: ta };
    let (p, _) = emu.workspace(json!({"parent_id": root, "delivery_mode": "poll"}));
    let (r, _) = emu.workspace(json!({"parent_id": root, "delivery_mode": "poll"}));
    let (q, _) = emu.workspace(json!({"parent_id": root, "delivery_mode": "poll"}));
    for peer in [&p, &r] {
        emu.fault(
            json!({"method": "POST", "path_prefix": format!("/workspaces/{peer}/a2a"),
            "status": 503, "count": 1000}),
        );
    }
    emu.say(&a.id, Some(&p), "p1");
    emu.say(&a.id, Some(&r), "r1");
    emu.say(&a.id, Some(&q), "q1");
    emu.say(&a.id, Some(&p), "p2");
    let dir = Arc::new(TempDir::new());
    let log = dir.path().join("runs.log");
    let c = start_until_q1_runs(&emu, &a, &dir, &echo_logging_runs(&log));
    // q1's reply waits for a poster (both are busy retrying p1's and r1's): it is
    // journaled already.
    wait_until(WAIT, "q1's reply saved", &c, || {
        let saved = saved_replies(dir.path(), &a.id);
        saved.iter().any(|(_, text)| text == "q1").then_some(())
    });
    c.signal("KILL");
    drop(c);
    emu.clear_faults();
    // After the restart both saved replies go out without running a backend again.
    let c2 = Connector::start(&emu, &a, &dir, &["--backend", "mock"]);
    assert_eq!(
        texts(&wait_received(&emu, &q, 1, &c2)),
        ["q1"],
        "{}",
        c2.stderr()
    );
    assert_eq!(texts(&wait_received(&emu, &r, 1, &c2)), ["r1"]);
    let got = wait_received(&emu, &p, 2, &c2);
    assert_eq!(texts(&got), ["p1", "echo: p2"], "{}", c2.stderr());
    emu.wait_polls(3, &c2);
    assert_eq!(emu.received(&q).len(), 1, "{}", c2.stderr());
    assert_eq!(emu.received(&r).len(), 1, "{}", c2.stderr());
    assert_eq!(runs(&log), "p1\nr1\nq1\n");
}

#[test]
fn crash_with_a_slow_message_in_flight_loses_nothing() {
    let emu = Emulator::start();
    let (root, _) = emu.workspace(json!({"name": "root"}));
    let (a, ta) = emu.workspace(json!({"parent_id": root}));
    let a = Ws { id: a, token: ta };
    let (slow_peer, _) = emu.workspace(json!({"parent_id": root, "delivery_mode": "poll"}));
    let (fast_peer, _) = emu.workspace(json!({"parent_id": root, "delivery_mode": "poll"}));
    emu.say(&a.id, Some(&slow_peer), "slow");
    emu.say(&a.id, Some(&fast_peer), "fast");
    let dir = Arc::new(TempDir::new());
    let cmd = "cmd=x=$(cat); if [ \"$x\" = slow ]; then sleep 300; fi; echo \"done $x\"";
    let c = Connector::start(
        &emu,
        &a,
        &dir,
        &[
            "--backend",
            "exec",
            "--backend-opt",
            cmd,
            "--concurrency",
            "2",
        ],
    );
    wait_received(&emu, &fast_peer, 1, &c);
    c.signal("KILL");
    drop(c);
    // The fast row finished but the slow one did not: after a restart the slow one
    // is answered and the fast one is not answered again.
    let c2 = Connector::start(&emu, &a, &dir, &["--backend", "mock"]);
    let got = wait_received(&emu, &slow_peer, 1, &c2);
    assert_eq!(texts(&got), ["echo: slow"]);
    emu.wait_polls(3, &c2);
    // A kill between posting the fast reply and journaling it re-posts it with the
    // same messageId, which the platform drops (marked duplicate): still one answer.
    let fresh = emu
        .received(&fast_peer)
        .into_iter()
        .filter(|m| m["duplicate"] != true)
        .count();
    assert_eq!(fresh, 1, "{}", c2.stderr());
}

#[test]
fn sigterm_lets_a_running_backend_finish_and_a_second_signal_forces() {
    let Pair { emu, a, b, dir } = Test::new().pair();
    let started = dir.path().join("started");
    let cmd = format!("cmd=touch {}; sleep 1; echo finished", started.display());
    let mut c = Connector::start(
        &emu,
        &a,
        &dir,
        &["--backend", "exec", "--backend-opt", &cmd],
    );
    emu.say(&a.id, Some(&b.id), "work");
    wait_until(WAIT, "the backend to start", &c, || {
        started.exists().then_some(())
    });
    c.signal("TERM");
    let status = c.wait_exit(WAIT);
    assert_eq!(status.code(), Some(0), "{}", c.stderr());
    assert_eq!(texts(&emu.received(&b.id)), ["finished"], "drained reply");

    // Second signal: a backend that would run for minutes is killed at once.
    let dir = Arc::new(TempDir::new());
    let started = dir.path().join("started");
    let cmd = format!("cmd=touch {}; sleep 300", started.display());
    let mut c = Connector::start(
        &emu,
        &a,
        &dir,
        &["--backend", "exec", "--backend-opt", &cmd],
    );
    emu.say(&a.id, Some(&b.id), "long");
    wait_until(WAIT, "the backend to start", &c, || {
        started.exists().then_some(())
    });
    c.signal("TERM");
    // Two signals sent back to back can merge into one in the kernel.
    wait_until(WAIT, "the first signal", &c, || {
        c.stderr().contains("signal received").then_some(())
    });
    c.signal("TERM");
    let status = c.wait_exit(WAIT);
    assert_eq!(status.code(), Some(0), "{}", c.stderr());
    assert!(c.stderr().contains("second signal"), "{}", c.stderr());
}

#[test]
fn wedged_is_reported_and_cleared() {
    let Connected { emu, a, b, c, .. } = Test::new()
        .exec("x=$(cat); case \"$x\" in bad*) exit 4;; esac; echo ok")
        .args(&["--max-attempts", "1"])
        .connect();
    for i in 0..3 {
        emu.say(&a.id, Some(&b.id), &format!("bad {i}"));
    }
    wait_until(WAIT, "a wedged heartbeat", &c, || {
        let h = emu.heartbeats(&a.id);
        (h["last"]["runtime_state"] == "wedged").then_some(())
    });
    let last = emu.heartbeats(&a.id)["last"].clone();
    assert!(
        last["sample_error"].as_str().unwrap().contains("status 4"),
        "{last}"
    );
    assert!((last["error_rate"].as_f64().unwrap() - 1.0).abs() < 1e-9);
    emu.say(&a.id, Some(&b.id), "good");
    wait_until(WAIT, "the wedge to clear", &c, || {
        let h = emu.heartbeats(&a.id);
        (h["last"]["runtime_state"] == "").then_some(())
    });
}

#[test]
fn a_dead_loop_thread_stops_the_process_with_a_failure() {
    let Pair { emu, a, dir, .. } = Test::new().pair();
    for thread in ["heartbeat", "poll"] {
        let mut c = Test::new()
            .mock()
            .env("MOLECULE_DEBUG_PANIC", thread)
            .start(&emu, &a, &dir);
        let status = c.wait_exit(WAIT);
        assert_eq!(status.code(), Some(1), "{thread}: {}", c.stderr());
        assert!(
            c.stderr().contains(&format!("{thread} thread panicked")),
            "{}",
            c.stderr()
        );
    }
}

#[test]
fn two_exec_cat_connectors_do_not_ping_pong() {
    let Pair { emu, a, b, .. } = Test::new().pair();
    let cat = ["--backend", "exec", "--backend-opt", "cmd=cat"];
    // Default: a reply is never answered automatically.
    let (da, db) = (Arc::new(TempDir::new()), Arc::new(TempDir::new()));
    let ca = Connector::start(&emu, &a, &da, &cat);
    let cb = Connector::start(&emu, &b, &db, &cat);
    emu.say(&a.id, Some(&b.id), "ping");
    wait_received(&emu, &b.id, 1, &ca);
    emu.wait_polls(10, &cb);
    assert_eq!(emu.received(&b.id).len(), 1);
    assert_eq!(emu.received(&a.id).len(), 0, "{}", cb.stderr());
    drop((ca, cb));

    // With --reply-to-replies on both sides, the per-conversation cap ends it.
    let (a, b) = emu.pair();
    let (da, db) = (Arc::new(TempDir::new()), Arc::new(TempDir::new()));
    let args = [&cat[..], &["--reply-to-replies", "--max-auto-replies", "3"]].concat();
    let ca = Connector::start(&emu, &a, &da, &args);
    let cb = Connector::start(&emu, &b, &db, &args);
    emu.enqueue(&a.id, json!({"from": b.id, "text": "ping", "metadata": {}}));
    wait_until(WAIT, "the cap to stop the exchange", &ca, || {
        (ca.stderr().contains("--max-auto-replies") || cb.stderr().contains("--max-auto-replies"))
            .then_some(())
    });
    emu.wait_polls(10, &ca);
    // A's answer to the fresh "ping", then at most 3 answers to replies on each side.
    let total = emu.received(&a.id).len() + emu.received(&b.id).len();
    assert!(total <= 7, "{total} messages exchanged");
}

#[test]
fn a_log_pipe_that_closes_does_not_stop_the_connector() {
    let emu = Emulator::start();
    let (a, b) = emu.pair();
    let dir = Arc::new(TempDir::new());
    let token_file = dir.path().join("token");
    write_secret(&token_file, &a.token);
    let mut child = molecule()
        .arg("connect")
        .arg(&a.id)
        .args([
            "--api-url",
            &emu.url,
            "--backend",
            "mock",
            "--interval-ms",
            "100",
        ])
        .arg("--token-file")
        .arg(&token_file)
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .arg("-v")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // The supervisor's end of the log pipe goes away: every later log line fails.
    drop(child.stderr.take());
    emu.say(&a.id, Some(&b.id), "still here?");
    let got = poll(WAIT, || {
        let got = emu.received(&b.id);
        (!got.is_empty()).then_some(got)
    });
    let alive = child.try_wait().unwrap().is_none();
    let _ = child.kill();
    let _ = child.wait();
    assert!(alive, "the connector exited when its stderr closed");
    assert_eq!(texts(&got.expect("no reply")), ["echo: still here?"]);
}
