//! Progress acks (§API-2.5, issue 12 item 3): the connector acks the highest `seq`
//! below which every row is finished: monotonic, never past a row still in the
//! backend, once more at shutdown, and not at all after a 404 (an older server).

use serde_json::{Value, json};

use crate::support::*;

const ACK_ROUTE: &str = "POST /workspaces/:id/activity/ack";

fn admin_ws(emu: &Emulator, ws: &str) -> Value {
    emu.get(&format!("/_admin/workspaces/{ws}"))
}

fn seq_of(emu: &Emulator, ws: &str, activity_id: &str) -> i64 {
    let rows = emu.get(&format!("/_admin/workspaces/{ws}/rows"))["rows"].clone();
    rows.as_array()
        .unwrap()
        .iter()
        .find(|r| r["id"] == activity_id)
        .and_then(|r| r["seq"].as_i64())
        .unwrap()
}

#[test]
fn acks_are_monotonic_and_never_pass_an_unfinished_row() {
    let Pair { emu, a, b, dir } = Test::new().pair();
    let gate = dir.path().join("gate");
    // "slow" waits for the test to open the gate; everything else answers at once.
    let cmd = format!(
        "cmd=x=$(cat); if [ \"$x\" = slow ]; then while [ ! -e {} ]; do sleep 0.05; done; fi; echo \"ok $x\"",
        gate.display()
    );
    let args = [
        "--backend",
        "exec",
        "--backend-opt",
        &cmd,
        "--concurrency",
        "2",
    ];
    let mut c = Connector::start(&emu, &a, &dir, &args);
    let first = emu.say(&a.id, Some(&b.id), "first");
    wait_received(&emu, &b.id, 1, &c);
    let first_seq = seq_of(&emu, &a.id, &first);
    wait_until(WAIT, "the first ack", &c, || {
        (admin_ws(&emu, &a.id)["acked_seq"].as_i64() >= Some(first_seq)).then_some(())
    });
    // A slow message from the peer, then a canvas one that finishes first.
    let slow = emu.say(&a.id, Some(&b.id), "slow");
    let slow_seq = seq_of(&emu, &a.id, &slow);
    let fast = emu.say(&a.id, None, "fast");
    wait_notifies(&emu, &a.id, 1, &c);
    let fast_seq = seq_of(&emu, &a.id, &fast);
    assert!(fast_seq > slow_seq);
    // Two more polls: the cursor (and any ack) could have moved by now.
    emu.wait_polls(2, &c);
    assert!(admin_ws(&emu, &a.id)["acked_seq"].as_i64().unwrap() < slow_seq);
    std::fs::write(&gate, "").unwrap();
    let got = wait_received(&emu, &b.id, 2, &c);
    let slow_done_ms = got[1]["at_ms"].as_i64().unwrap();
    wait_until(WAIT, "an ack covering every row", &c, || {
        (admin_ws(&emu, &a.id)["acked_seq"].as_i64() >= Some(fast_seq)).then_some(())
    });
    assert!(c.stop().success());
    let acks = admin_ws(&emu, &a.id)["acks"].as_array().unwrap().clone();
    let seqs: Vec<i64> = acks.iter().map(|x| x["seq"].as_i64().unwrap()).collect();
    assert!(
        seqs.windows(2).all(|w| w[0] < w[1]),
        "monotonic, no repeats: {seqs:?}"
    );
    for x in &acks {
        if x["at_ms"].as_i64().unwrap() < slow_done_ms {
            assert!(
                x["seq"].as_i64().unwrap() < slow_seq,
                "acked past the slow row: {acks:?}"
            );
        }
    }
    let status = molecule::status_path(&dir.path().join("state"), &a.id);
    let doc: Value = serde_json::from_slice(&std::fs::read(status).unwrap()).unwrap();
    assert!(doc["last_acked_seq"].as_i64() >= Some(fast_seq), "{doc}");
}

#[test]
fn a_once_run_acks_at_shutdown_and_a_404_stops_acking() {
    let Pair { emu, a, b, dir } = Test::new().pair();
    let last = emu.say(&a.id, Some(&b.id), "pending");
    let mut c = Connector::start(&emu, &a, &dir, &["--backend", "mock", "--once"]);
    assert!(c.wait_exit(WAIT).success(), "{}", c.stderr());
    assert_eq!(
        admin_ws(&emu, &a.id)["acked_seq"].as_i64(),
        Some(seq_of(&emu, &a.id, &last))
    );

    // An older server: the first ack gets 404, no other is tried.
    let Pair { emu, a, b, dir } = Test::new().pair();
    emu.fault(
        json!({"method": "POST", "path_prefix": format!("/workspaces/{}/activity/ack", a.id),
                     "status": 404, "body": {"error": "404 page not found"}, "count": 1000}),
    );
    let c = Connector::start(&emu, &a, &dir, &["--backend", "mock"]);
    emu.say(&a.id, Some(&b.id), "one");
    wait_received(&emu, &b.id, 1, &c);
    wait_until(WAIT, "the first ack", &c, || {
        (emu.route_count(ACK_ROUTE) >= 1).then_some(())
    });
    emu.say(&a.id, Some(&b.id), "two");
    wait_received(&emu, &b.id, 2, &c);
    // Over 5 s of polls at 100 ms: an ack would have been due again.
    emu.wait_polls(70, &c);
    assert_eq!(emu.route_count(ACK_ROUTE), 1);
    assert!(c.stderr().contains("does not take acks"), "{}", c.stderr());
}
