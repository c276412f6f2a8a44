//! Operations: cron mode (`--once`, `--max-messages`, `--idle-exit`), overlapping
//! runs, and the status file with `molecule status` as a health check.

use std::time::Duration;

use serde_json::{Value, json};

use crate::support::*;

fn status(dir: &TempDir, ws: &str, extra: &[&str]) -> (i32, String, String) {
    let state = dir.path().join("state");
    let mut args = vec![
        "status",
        "--workspace",
        ws,
        "--state-dir",
        state.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    run(&args)
}

#[test]
fn once_drains_a_multi_page_backlog_and_exits_0_with_the_cursor_saved() {
    let Pair { emu, a, b, dir } = Test::new().pair();
    let (first, second) = (230, 150);
    let batch: Vec<Value> = (0..first)
        .map(|i| json!({"from": b.id, "text": format!("c{i:03}")}))
        .collect();
    emu.post(
        &format!("/_admin/workspaces/{}/enqueue_batch", a.id),
        json!({"messages": batch}),
    );
    // The first run starts cold (one page of up to 500); the second pages from the cursor.
    let mut c = Connector::start(
        &emu,
        &a,
        &dir,
        &["--backend", "mock", "--once", "--since-secs", "600"],
    );
    // The work grows with the backlog, and so does the bound.
    let status_code = c.wait_exit(backlog_wait(first));
    assert_eq!(status_code.code(), Some(0), "{}", c.stderr());
    assert!(c.stderr().contains("drained"), "{}", c.stderr());
    let got = emu.received(&b.id);
    assert_eq!(got.len(), first);
    let last = emu.get(&format!("/_admin/workspaces/{}/rows", a.id))["rows"]
        .as_array()
        .unwrap()
        .iter()
        .rev()
        // Not the connector's own a2a_send self-reports of its replies.
        .find(|r| r["method"] == "message/send" && r["activity_type"] == "a2a_receive")
        .unwrap()["id"]
        .clone();
    assert_eq!(c.state()["last_since_id"], last);
    assert!(emu.heartbeats(&a.id)["count"].as_u64().unwrap() >= 1);

    // More messages across pages, then a second --once run from the saved cursor.
    let batch: Vec<Value> = (0..second)
        .map(|i| json!({"from": b.id, "text": format!("d{i:03}")}))
        .collect();
    emu.post(
        &format!("/_admin/workspaces/{}/enqueue_batch", a.id),
        json!({"messages": batch}),
    );
    let mut c = Connector::start(&emu, &a, &dir, &["--backend", "mock", "--once"]);
    let status_code = c.wait_exit(backlog_wait(second));
    assert_eq!(status_code.code(), Some(0), "{}", c.stderr());
    let got = emu.received(&b.id);
    assert_eq!(got.len(), first + second);
    let expected: Vec<String> = (0..first)
        .map(|i| format!("echo: c{i:03}"))
        .chain((0..second).map(|i| format!("echo: d{i:03}")))
        .collect();
    assert_eq!(texts(&got), expected);
}

#[test]
fn overlapping_once_runs_answer_each_message_once() {
    let Pair { emu, a, b, dir } = Test::new().pair();
    for i in 0..20 {
        emu.say(&a.id, Some(&b.id), &format!("o{i}"));
    }
    let started = dir.path().join("started");
    // The first run is slow on its first message, so the second overlaps it.
    let cmd = format!(
        "cmd=x=$(cat); [ -e {s} ] || {{ touch {s}; sleep 1; }}; echo \"$x\"",
        s = started.display()
    );
    let args = [
        "--backend",
        "exec",
        "--backend-opt",
        &cmd,
        "--once",
        "--since-secs",
        "600",
    ];
    let mut first = Connector::start(&emu, &a, &dir, &args);
    wait_until(WAIT, "the first run to start work", &first, || {
        started.exists().then_some(())
    });
    let mut second = Connector::start(&emu, &a, &dir, &args);
    assert_eq!(
        second.wait_exit(WAIT).code(),
        Some(0),
        "{}",
        second.stderr()
    );
    assert!(
        second.stderr().contains("nothing to do"),
        "{}",
        second.stderr()
    );
    assert_eq!(first.wait_exit(WAIT).code(), Some(0), "{}", first.stderr());
    let got = emu.received(&b.id);
    let expected: Vec<String> = (0..20).map(|i| format!("o{i}")).collect();
    assert_eq!(
        texts(&got),
        expected,
        "each message answered once, in order"
    );

    // --lock-wait makes an overlapping run wait its turn instead.
    emu.say(&a.id, Some(&b.id), "later");
    std::fs::remove_file(&started).unwrap();
    let mut first = Connector::start(&emu, &a, &dir, &args);
    wait_until(WAIT, "the first run to start work", &first, || {
        started.exists().then_some(())
    });
    let mut waiting = Connector::start(
        &emu,
        &a,
        &dir,
        &["--backend", "mock", "--once", "--lock-wait", "30"],
    );
    assert_eq!(first.wait_exit(WAIT).code(), Some(0), "{}", first.stderr());
    assert_eq!(
        waiting.wait_exit(WAIT).code(),
        Some(0),
        "{}",
        waiting.stderr()
    );
    assert!(
        waiting.stderr().contains("waiting up to 30 s"),
        "{}",
        waiting.stderr()
    );
    assert!(waiting.stderr().contains("drained"), "{}", waiting.stderr());
    assert_eq!(emu.received(&b.id).len(), 21);
}

#[test]
fn max_messages_and_idle_exit_bound_a_run() {
    let Pair { emu, a, b, dir } = Test::new().pair();
    for i in 0..5 {
        emu.say(&a.id, Some(&b.id), &format!("x{i}"));
    }
    let mut c = Connector::start(
        &emu,
        &a,
        &dir,
        &["--backend", "mock", "--max-messages", "2"],
    );
    assert_eq!(c.wait_exit(WAIT).code(), Some(0), "{}", c.stderr());
    assert_eq!(texts(&emu.received(&b.id)), ["echo: x0", "echo: x1"]);
    // The rest are still pending: the next run picks them up from the cursor.
    let mut c = Connector::start(&emu, &a, &dir, &["--backend", "mock", "--idle-exit", "1"]);
    assert_eq!(c.wait_exit(WAIT).code(), Some(0), "{}", c.stderr());
    assert!(c.stderr().contains("--idle-exit"), "{}", c.stderr());
    assert_eq!(emu.received(&b.id).len(), 5);
}

#[test]
fn status_is_fresh_while_running_and_stale_after_a_stop_or_crash() {
    let Pair { emu, a, b, dir } = Test::new().pair();
    let (code, _, err) = status(&dir, &a.id, &[]);
    assert_eq!(code, 1, "missing status file");
    assert!(err.contains("no status file"), "{err}");

    let mut c = Connector::start(&emu, &a, &dir, &["--backend", "mock"]);
    emu.say(&a.id, Some(&b.id), "count me");
    wait_received(&emu, &b.id, 1, &c);
    let v = wait_until(WAIT, "a fresh status with the handled message", &c, || {
        let (code, out, _) = status(&dir, &a.id, &["--json"]);
        let v: Value = serde_json::from_str(&out).ok()?;
        (code == 0 && v["handled"] == 1).then_some(v)
    });
    assert_eq!(v["ok"], true);
    assert_eq!(v["state"], "running");
    assert_eq!(v["wedged"], false);
    assert!(v["last_heartbeat_ok"].is_u64(), "{v}");
    let (code, out, _) = status(&dir, &a.id, &[]);
    assert_eq!(code, 0);
    assert!(out.contains("1 handled"), "{out}");

    assert_eq!(c.stop().code(), Some(0));
    let (code, out, err) = status(&dir, &a.id, &["--json"]);
    assert_eq!(code, 1, "{err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["stale"], true);
    assert_eq!(v["state"], "stopped");

    // A crashed connector leaves "running" behind; its pid is gone.
    let c = Connector::start(&emu, &a, &dir, &["--backend", "mock"]);
    wait_until(WAIT, "a fresh status", &c, || {
        (status(&dir, &a.id, &[]).0 == 0).then_some(())
    });
    c.signal("KILL");
    drop(c);
    let (code, _, err) = status(&dir, &a.id, &[]);
    assert_eq!(code, 1);
    assert!(err.contains("process is gone"), "{err}");

    // A connector that cannot poll goes stale after --stale-after.
    let c = Connector::start(&emu, &a, &dir, &["--backend", "mock"]);
    wait_until(WAIT, "a fresh status", &c, || {
        (status(&dir, &a.id, &[]).0 == 0).then_some(())
    });
    emu.fault(
        json!({"method": "GET", "path_prefix": format!("/workspaces/{}/activity", a.id),
        "status": 503, "count": 1000}),
    );
    let (_, _, err) = wait_until(Duration::from_secs(30), "a stale status", &c, || {
        let r = status(&dir, &a.id, &["--stale-after", "1"]);
        (r.0 == 1).then_some(r)
    });
    assert!(err.contains("last successful poll"), "{err}");
}

#[test]
fn many_workspaces_in_one_process_and_a_revoked_one_stops_alone() {
    let emu = Emulator::start();
    // Half use the command line's backend, half their own.
    let fleet = Fleet::new(&emu, 20, |i, e| {
        if i % 2 == 1 {
            e["backend"] = json!("mock");
            e["backend_opts"] = json!({"reply": format!("ws{i}: %s")});
        }
    });
    let (peer, wss, state) = (&fleet.peer, &fleet.ids, &fleet.state);
    let mut c = fleet.connect(
        &emu,
        &[
            "--backend",
            "mock",
            "--interval-ms",
            "100",
            "--heartbeat-secs",
            "1",
            // Event wake-ups (the default); a revoked token shows at the next safety poll.
            "--safety-poll-secs",
            "1",
        ],
    );
    for (i, ws) in wss.iter().enumerate() {
        emu.say(ws, Some(peer), &format!("hello {i}"));
    }
    wait_received(&emu, peer, 20, &c);
    let got = texts(&emu.received(peer));
    assert_eq!(got.len(), 20, "{got:?}");
    for i in 0..20 {
        let want = if i % 2 == 1 {
            format!("ws{i}: hello {i}")
        } else {
            format!("echo: hello {i}")
        };
        assert!(got.contains(&want), "{want} missing from {got:?}");
    }
    // Revoke one workspace's token: it stops (exit-3 reason in its status file), the
    // others keep answering.
    let revoked = &wss[3];
    emu.post(&format!("/_admin/workspaces/{revoked}/revoke"), json!({}));
    let status_of = |ws: &str| {
        let r = run(&[
            "status",
            "--json",
            "--workspace",
            ws,
            "--state-dir",
            state.to_str().unwrap(),
        ]);
        serde_json::from_str::<Value>(&r.1).unwrap_or(Value::Null)
    };
    let st = wait_until(
        Duration::from_secs(30),
        "the revoked one to stop",
        &c,
        || {
            let st = status_of(revoked);
            (st["state"] == "stopped").then_some(st)
        },
    );
    assert_eq!(st["state"], "stopped", "{st}");
    assert!(
        st["stop_reason"]
            .as_str()
            .unwrap_or("")
            .contains("rejected"),
        "{st}"
    );
    for (i, ws) in wss.iter().enumerate() {
        emu.say(ws, Some(peer), &format!("again {i}"));
    }
    wait_received(&emu, peer, 39, &c);
    let got = texts(&emu.received(peer));
    assert_eq!(got.len(), 39, "19 workspaces still answer: {got:?}");
    assert!(!got.iter().any(|t| t.ends_with("again 3")));
    assert!(c.running(), "the process must keep running");
    assert_eq!(status_of(&wss[0])["ok"], true);
    // SIGTERM stops all of them cleanly.
    assert_eq!(c.stop().code(), Some(0), "{}", c.stderr());
}
