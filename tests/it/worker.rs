//! `--backend worker` end to end: one long-lived agent process, its failures, and
//! that no process outlives the connector.

use std::path::Path;
use std::sync::Arc;

use serde_json::{Value, json};

use crate::support::*;

const TEST_WORKER: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/it/support/worker.py");
const EXAMPLE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/examples/worker.py");

/// A connector running the test worker with `opts` (more `--backend-opt`s) and `args`.
fn start(emu: &Emulator, ws: &Ws, dir: &Arc<TempDir>, opts: &[&str], args: &[&str]) -> Connector {
    start_env(emu, ws, dir, opts, args, &[])
}

/// [`start`] with more environment for the test worker (`TEST_THREADS`, …).
fn start_env(
    emu: &Emulator,
    ws: &Ws,
    dir: &Arc<TempDir>,
    opts: &[&str],
    args: &[&str],
    env: &[(&str, &str)],
) -> Connector {
    let cmd = format!("cmd=python3 {TEST_WORKER}");
    let mut all = vec!["--backend", "worker", "--backend-opt", &cmd];
    for o in opts {
        all.extend(["--backend-opt", o]);
    }
    all.extend(args);
    let test_dir = dir.path().display().to_string();
    let mut env = env.to_vec();
    env.push(("TEST_DIR", &test_dir));
    Connector::start_with_env(emu, ws, dir, &all, &env)
}

/// A workspace and `n` poll-mode peers beside it (siblings: they may talk).
fn workspace_and_peers(emu: &Emulator, n: usize) -> (Ws, Vec<String>) {
    let (root, _) = emu.workspace(json!({"name": "root"}));
    let (a, ta) = emu.workspace(json!({"parent_id": root}));
    let peers = (0..n)
        .map(|_| {
            emu.workspace(json!({"parent_id": root, "delivery_mode": "poll"}))
                .0
        })
        .collect();
    (Ws { id: a, token: ta }, peers)
}

fn pids(dir: &Path) -> Vec<u32> {
    std::fs::read_to_string(dir.join("pids"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

/// Every worker process ever started in `dir` is gone.
fn assert_no_workers_left(dir: &Path, c: &Connector) {
    let all = pids(dir);
    assert!(!all.is_empty(), "no worker ever started");
    wait_until(WAIT, "every worker process to exit", c, || {
        all.iter().all(|p| !alive(*p)).then_some(())
    });
}

#[test]
fn example_worker_answers_peers_and_canvas() {
    let Pair { emu, a, b, dir } = Test::new().pair();
    let cmd = format!("cmd=python3 {EXAMPLE}");
    let mut c = Connector::start(
        &emu,
        &a,
        &dir,
        &[
            "--backend",
            "worker",
            "--backend-opt",
            &cmd,
            "--backend-opt",
            "ready=true",
        ],
    );
    emu.say(&a.id, Some(&b.id), "hello");
    emu.say(&a.id, None, "from the canvas");
    let got = wait_received(&emu, &b.id, 1, &c);
    assert_eq!(texts(&got), ["echo: hello"]);
    let n = wait_notifies(&emu, &a.id, 1, &c);
    assert_eq!(n[0]["message"], "echo: from the canvas");
    assert!(
        c.stderr().contains("worker 0: ready after"),
        "{}",
        c.stderr()
    );
    assert_eq!(c.stop().code(), Some(0), "{}", c.stderr());
}

#[test]
fn concurrency_keeps_per_sender_order_with_several_in_flight() {
    let emu = Emulator::start();
    let (a, peers) = workspace_and_peers(&emu, 3);
    for i in 0..4 {
        for p in &peers {
            emu.say(&a.id, Some(p), &format!("{}-{i}", &p[..8]));
        }
    }
    let dir = Arc::new(TempDir::new());
    // One process, three requests in flight, answered in whatever order they finish
    // (each after a random pause).
    let mut c = start_env(
        &emu,
        &a,
        &dir,
        &["workers=1", "max_in_flight=3"],
        &["--concurrency", "3"],
        &[("TEST_THREADS", "1")],
    );
    for p in &peers {
        let got = wait_received(&emu, p, 4, &c);
        let expected: Vec<String> = (0..4).map(|i| format!("w:{}-{i}", &p[..8])).collect();
        assert_eq!(texts(&got), expected, "per-sender order");
    }
    let same = std::fs::read_to_string(dir.path().join("same-sender")).unwrap_or_default();
    assert_eq!(
        same, "",
        "two messages of one sender were in flight at once"
    );
    assert_eq!(pids(dir.path()).len(), 1, "one worker for everything");
    c.stop();
    assert_no_workers_left(dir.path(), &c);
}

/// Two messages from two senders, each answered by the test worker only once the
/// other is in flight with it: they must run at once, in one worker process.
fn pair_in_one_worker(opts: &[&str], args: &[&str]) {
    let emu = Emulator::start();
    let (a, peers) = workspace_and_peers(&emu, 2);
    for (i, p) in peers.iter().enumerate() {
        emu.say(&a.id, Some(p), &format!("pair-{i}"));
    }
    let dir = Arc::new(TempDir::new());
    let mut c = start_env(&emu, &a, &dir, opts, args, &[("TEST_THREADS", "1")]);
    for (i, p) in peers.iter().enumerate() {
        let got = wait_received(&emu, p, 1, &c);
        assert_eq!(texts(&got), [format!("w:pair-{i}")], "{}", c.stderr());
    }
    assert_eq!(pids(dir.path()).len(), 1, "one worker");
    c.stop();
    assert_no_workers_left(dir.path(), &c);
}

#[test]
fn max_in_flight_alone_runs_that_many_messages_at_once() {
    // No --concurrency: max_in_flight sets it.
    pair_in_one_worker(&["workers=1", "max_in_flight=2"], &[]);
}

#[test]
fn concurrency_with_max_in_flight_starts_one_worker_for_both() {
    // No workers=: --concurrency 2 over 2 in flight each is one worker.
    pair_in_one_worker(&["max_in_flight=2"], &["--concurrency", "2"]);
}

#[test]
fn timeout_kills_the_worker_and_the_retry_is_answered_once() {
    let Pair { emu, a, b, dir } = Test::new().pair();
    let mut c = start(
        &emu,
        &a,
        &dir,
        &["timeout=1s", "kill_grace=500ms"],
        &["--max-attempts", "3"],
    );
    emu.say(&a.id, Some(&b.id), "hang-once");
    let got = wait_received(&emu, &b.id, 1, &c);
    assert_eq!(texts(&got), ["w:hang-once"]);
    assert!(
        c.stderr().contains("ran past its timeout"),
        "{}",
        c.stderr()
    );
    assert_eq!(
        pids(dir.path()).len(),
        2,
        "a fresh worker after the timeout"
    );
    emu.wait_polls(3, &c);
    assert_eq!(emu.received(&b.id).len(), 1, "answered once");
    c.stop();
    assert_no_workers_left(dir.path(), &c);
}

#[test]
fn crash_mid_request_restarts_the_worker_and_answers_once() {
    let Pair { emu, a, b, dir } = Test::new().pair();
    let mut c = start(&emu, &a, &dir, &[], &[]);
    emu.say(&a.id, Some(&b.id), "crash-once");
    emu.say(&a.id, Some(&b.id), "after");
    let got = wait_received(&emu, &b.id, 2, &c);
    assert_eq!(texts(&got), ["w:crash-once", "w:after"]);
    let log = c.stderr();
    assert!(log.contains("worker 0: crashing on purpose"), "{log}");
    assert!(
        log.contains("exited (exit status: 3) holding 1 request(s)"),
        "{log}"
    );
    emu.wait_polls(3, &c);
    assert_eq!(emu.received(&b.id).len(), 2, "answered once each");
    c.stop();
    assert_no_workers_left(dir.path(), &c);
}

#[test]
fn malformed_and_oversize_answers_fail_only_their_message() {
    let Pair { emu, a, b, dir } = Test::new().pair();
    let mut c = start(
        &emu,
        &a,
        &dir,
        &["max_output=1000"],
        &["--max-attempts", "1"],
    );
    for text in ["garbage", "big", "bad-part", "file-part", "fine"] {
        emu.say(&a.id, Some(&b.id), text);
    }
    let got = wait_received(&emu, &b.id, 5, &c);
    assert_eq!(
        texts(&got),
        [
            "Sorry, the agent could not handle this message (bad output: worker answer is not a JSON object).",
            "Sorry, the agent could not handle this message (bad output: answer exceeds max_output 1000 bytes).",
            "Sorry, the agent could not handle this message (bad output: json reply: part 1: a file part's \"file\" has no \"uri\" or \"bytes\" string).",
            "w:file-part",
            "w:fine"
        ]
    );
    // Every message sent is valid A2A, the worker's file and data parts included.
    for m in &got {
        a2a_schema::assert_valid(&m["body"]);
    }
    let parts = &got[3]["body"]["params"]["message"]["parts"];
    assert_eq!(
        parts[1]["file"]["uri"], "https://files.test/a.txt",
        "{parts}"
    );
    assert_eq!(parts[2]["kind"], "data", "{parts}");
    assert_eq!(pids(dir.path()).len(), 1, "the worker was not restarted");
    c.stop();
    assert_no_workers_left(dir.path(), &c);
}

#[test]
fn crash_loop_at_start_makes_the_heartbeat_wedged() {
    let Connected { emu, a, mut c, .. } = Test::new()
        .args(&[
            "--backend",
            "worker",
            "--backend-opt",
            "cmd=echo 'no API key' >&2; exit 1",
        ])
        .connect();
    let hb = wait_until(WAIT, "a wedged heartbeat", &c, || {
        let h = emu.heartbeats(&a.id);
        (h["last"]["runtime_state"] == "wedged").then_some(h)
    });
    let sample = hb["last"]["sample_error"].as_str().unwrap().to_string();
    assert!(sample.contains("worker keeps failing at start"), "{sample}");
    assert!(!sample.contains("API key"), "stderr leaked: {sample}");
    assert!(
        c.stderr().contains("worker 0: no API key"),
        "{}",
        c.stderr()
    );
    assert_eq!(c.stop().code(), Some(0), "{}", c.stderr());
}

#[test]
fn sigterm_drains_the_request_in_flight_then_stops_the_worker() {
    let Pair { emu, a, b, dir } = Test::new().pair();
    let mut c = start(&emu, &a, &dir, &[], &[]);
    emu.say(&a.id, Some(&b.id), "slow-1");
    wait_until(WAIT, "the worker to get the request", &c, || {
        dir.path().join("got-slow-1").exists().then_some(())
    });
    let status = c.stop();
    assert_eq!(status.code(), Some(0), "{}", c.stderr());
    assert_eq!(texts(&emu.received(&b.id)), ["w:slow-1"], "drained reply");
    assert_no_workers_left(dir.path(), &c);
}

#[test]
fn sigterm_sends_nothing_new_and_the_waiting_message_runs_after_the_restart() {
    let emu = Emulator::start();
    let (a, peers) = workspace_and_peers(&emu, 2);
    for (p, text) in peers.iter().zip(["slow-a", "slow-b"]) {
        emu.say(&a.id, Some(p), text);
    }
    let dir = Arc::new(TempDir::new());
    // One worker, two messages at once: one runs, the other waits for the worker.
    let opts = ["workers=1"];
    let args = ["--concurrency", "2"];
    let mut c = start(&emu, &a, &dir, &opts, &args);
    let got = |t: &str| dir.path().join(format!("got-{t}")).exists();
    let first = wait_until(WAIT, "a request at the worker", &c, || {
        ["slow-a", "slow-b"].into_iter().find(|t| got(t))
    });
    let (i, other) = if first == "slow-a" {
        (0, "slow-b")
    } else {
        (1, "slow-a")
    };
    assert_eq!(c.stop().code(), Some(0), "{}", c.stderr());
    assert_eq!(texts(&emu.received(&peers[i])), [format!("w:{first}")]);
    assert!(!got(other), "{other} was sent to the worker after SIGTERM");
    assert!(emu.received(&peers[1 - i]).is_empty());
    assert_no_workers_left(dir.path(), &c);
    // Not lost: the next connector runs it.
    let mut c = start(&emu, &a, &dir, &opts, &args);
    let replies = wait_received(&emu, &peers[1 - i], 1, &c);
    assert_eq!(texts(&replies), [format!("w:{other}")]);
    assert_eq!(emu.received(&peers[i]).len(), 1, "answered once");
    c.stop();
    assert_no_workers_left(dir.path(), &c);
}

#[test]
fn kill_9_with_requests_in_flight_answers_each_once_after_restart() {
    let Pair { emu, a, b, dir } = Test::new().pair();
    let c = start(&emu, &a, &dir, &["workers=2"], &["--concurrency", "2"]);
    emu.say(&a.id, Some(&b.id), "slow-a");
    emu.say(&a.id, None, "slow-b");
    wait_until(WAIT, "both requests in flight", &c, || {
        (dir.path().join("got-slow-a").exists() && dir.path().join("got-slow-b").exists())
            .then_some(())
    });
    c.signal("KILL");
    // Its workers see stdin close and go too: nothing is left behind.
    assert_no_workers_left(dir.path(), &c);
    drop(c);
    let mut c = start(&emu, &a, &dir, &["workers=2"], &["--concurrency", "2"]);
    let got = wait_received(&emu, &b.id, 1, &c);
    assert_eq!(texts(&got), ["w:slow-a"]);
    let n = wait_notifies(&emu, &a.id, 1, &c);
    assert_eq!(n[0]["message"], "w:slow-b");
    emu.wait_polls(5, &c);
    assert_eq!(emu.received(&b.id).len(), 1, "answered once");
    assert_eq!(emu.notifies(&a.id).len(), 1, "notified once");
    c.stop();
    assert_no_workers_left(dir.path(), &c);
}

#[test]
fn a_worker_left_hanging_by_kill_9_is_ended_before_the_next_worker_starts() {
    let Pair { emu, a, b, dir } = Test::new().pair();
    let cmd = format!("cmd=python3 {TEST_WORKER}");
    let args = ["--backend", "worker", "--backend-opt", &cmd];
    let test_dir = dir.path().display().to_string();
    let env = [("TEST_DIR", test_dir.as_str()), ("TEST_ALONE", "1")];
    let mut c = Connector::start_with_env(&emu, &a, &dir, &args, &env);
    emu.say(&a.id, Some(&b.id), "hang-once");
    wait_until(WAIT, "the worker to hang on the request", &c, || {
        dir.path().join("seen-hang-once").exists().then_some(())
    });
    let old = pids(dir.path());
    assert_eq!(old.len(), 1);
    let _cleanup = KillOnDrop(old.clone());
    c.signal("KILL");
    c.wait_exit(WAIT);
    // Busy with the request, it never reads the closed stdin: it would run on.
    assert!(alive(old[0]), "the hung worker outlived its connector");
    let mut c = Connector::start_with_env(&emu, &a, &dir, &args, &env);
    let got = wait_received(&emu, &b.id, 1, &c);
    assert_eq!(texts(&got), ["w:hang-once"]);
    assert!(
        !dir.path().join("overlap").exists(),
        "a new worker started next to the old one"
    );
    assert!(!alive(old[0]));
    assert_eq!(c.stop().code(), Some(0), "{}", c.stderr());
    assert_eq!(emu.received(&b.id).len(), 1, "answered once");
    assert_no_workers_left(dir.path(), &c);
}

#[test]
fn delegation_results_go_to_the_worker() {
    let Pair { emu, a, b, dir } = Test::new().pair();
    let mut c = start(&emu, &a, &dir, &[], &["--delegations-secs", "1"]);
    let did = delegate(&emu, &a, &dir, &b.id, crate::delegations::TASK);
    crate::delegations::complete(&emu, &did);
    let path = dir.path().join("delegations");
    let line = wait_until(WAIT, "the result at the worker", &c, || {
        std::fs::read_to_string(&path)
            .ok()
            .filter(|s| !s.is_empty())
    });
    let req: Value = serde_json::from_str(line.trim()).unwrap();
    assert_eq!(req["origin"], "delegation_result");
    assert_eq!(req["env"]["MOLECULE_DELEGATION_ID"], did.as_str());
    assert_eq!(req["request"]["delegation_id"], did.as_str());
    assert!(
        req["text"]
            .as_str()
            .unwrap()
            .contains("the report is done: 42 pages"),
        "{req}"
    );
    c.stop();
    assert_no_workers_left(dir.path(), &c);
}

#[test]
fn doctor_starts_the_worker_and_stops_it() {
    let Pair { emu, a, .. } = Test::new().pair();
    let dir = TempDir::new();
    let token = dir.path().join("token");
    write_secret(&token, &a.token);
    let cmd = format!("cmd=python3 {EXAMPLE}");
    let (code, out, err) = run(&[
        "doctor",
        "--api-url",
        &emu.url,
        "--workspace",
        &a.id,
        "--token-file",
        token.to_str().unwrap(),
        "--backend",
        "worker",
        "--backend-opt",
        &cmd,
        "--backend-opt",
        "ready=true",
    ]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("it said it is ready"), "{out}");
    let (code, out, _) = run(&[
        "doctor",
        "--api-url",
        &emu.url,
        "--workspace",
        &a.id,
        "--token-file",
        token.to_str().unwrap(),
        "--backend",
        "worker",
        "--backend-opt",
        "cmd=exit 2",
        "--backend-opt",
        "timeout=2s",
    ]);
    // The worker is not restarted for the probe: its exit is the answer, at once.
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("FAIL backend: command exited with status 2"),
        "{out}"
    );
}
