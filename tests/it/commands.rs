//! The agent-side commands (`send`, `peers`, `discover`, `info`, `delegate`,
//! `delegations`, `notify`, `heartbeat`, `status`, `doctor`) end to end: the real
//! binary against the emulator, every failure branch with its diagnostic and exit code,
//! and `--json` (exactly one document on stdout, failures included).

use serde_json::{Value, json};

use crate::support::*;

/// A push-mode sibling that answers with `body`.
fn push_peer(emu: &Emulator, a: &Ws, body: Value) -> Ws {
    let parent = emu.get(&format!("/_admin/workspaces/{}", a.id))["parent_id"]
        .as_str()
        .unwrap()
        .to_string();
    let (id, token) = emu.workspace(json!({
        "name": "pusher", "parent_id": parent, "delivery_mode": "push",
        "push_reply": {"status": 200, "body": body},
    }));
    Ws { id, token }
}

fn set_push_reply(emu: &Emulator, ws: &str, status: u16, body: Value) {
    emu.post(
        &format!("/_admin/workspaces/{ws}/update"),
        json!({"push_reply": {"status": status, "body": body}}),
    );
}

/// `at_ms` of every request the emulator saw on `path`.
fn request_times(emu: &Emulator, path: &str) -> Vec<i64> {
    emu.get("/_admin/stats")["requests"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["path"] == path)
        .map(|r| r["at_ms"].as_i64().unwrap())
        .collect()
}

fn total_requests(emu: &Emulator) -> u64 {
    emu.get("/_admin/stats")["requests_total"].as_u64().unwrap()
}

/// A port on 127.0.0.1 where nothing listens.
fn closed_port_url() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    drop(l);
    format!("http://127.0.0.1:{port}")
}

const NOT_A_UUID: &str = "../../registry/x";

// ------------------------------------------------------------------ help, config

#[test]
fn every_command_has_help_with_options_and_env() {
    let cases: &[(&str, &[&str])] = &[
        (
            "send",
            &["--message-id", "--budget", "MOLECULE_API_URL", "75"],
        ),
        ("peers", &["--query", "MOLECULE_WORKSPACE_ID"]),
        ("discover", &["<peer-id>", "MOLECULE_WORKSPACE_TOKEN_FILE"]),
        ("info", &["removed", "MOLECULE_ORG_ID"]),
        (
            "delegate",
            &["--idempotency-key", "--wait", "--timeout", "75"],
        ),
        ("delegations", &["--status", "MOLECULE_API_URL"]),
        ("notify", &["--attach", "talk_to_user_disabled"]),
        (
            "heartbeat",
            &[
                "--current-task",
                "--active-tasks",
                "--error-rate",
                "--uptime-secs",
            ],
        ),
        (
            "status",
            &["MOLECULE_STATE_DIR", "status.json", "--stale-after"],
        ),
        ("doctor", &["--backend", "--backend-opt", "cursor", "FAIL"]),
    ];
    for (cmd, needles) in cases {
        for args in [vec![*cmd, "--help"], vec!["help", cmd], vec![*cmd, "-h"]] {
            let (code, out, err) = run(&args);
            assert_eq!(code, 0, "{args:?}: {err}");
            assert!(out.contains(&format!("Usage: molecule {cmd}")), "{out}");
            for n in *needles {
                assert!(out.contains(n), "{cmd} help lacks {n:?}:\n{out}");
            }
        }
    }
    let (_, out, _) = run(&["--help"]);
    for cmd in [
        "send",
        "peers",
        "discover",
        "info",
        "delegate",
        "delegations",
        "notify",
        "heartbeat",
        "status",
        "doctor",
    ] {
        assert!(out.contains(&format!("\n  {cmd}")), "{cmd} not in --help");
    }
}

#[test]
fn missing_or_bad_workspace_id_is_exit_2() {
    let Cli {
        emu: _emu, agent, ..
    } = Test::new().cli();
    let o = agent
        .cmd(&["peers"])
        .env_remove("MOLECULE_WORKSPACE_ID")
        .out();
    assert_eq!(o.code, 2, "{o:?}");
    assert!(o.err.contains("MOLECULE_WORKSPACE_ID"), "{o:?}");
    let o = agent.run(&["--json", "peers", "--workspace", "nope"]);
    o.json_failure(2, "not a UUID");
    o.fails(2, "not a UUID");
}

// ------------------------------------------------------------------ send

#[test]
fn send_prints_the_push_reply_from_each_result_shape() {
    let Cli { emu, a, agent, .. } = Test::new().cli();
    let peer = push_peer(&emu, &a, json!({}));
    let shapes = [
        json!({"parts": [{"kind": "text", "text": "from parts"}]}),
        json!({"artifacts": [{"parts": [{"type": "text", "text": "from artifacts"}]}]}),
        json!({"status": {"message": {"parts": [{"kind": "text", "text": "from status"}]}}}),
        json!({"message": {"parts": [{"type": "text", "text": "from message"}]}}),
    ];
    for (i, result) in shapes.iter().enumerate() {
        set_push_reply(
            &emu,
            &peer.id,
            200,
            json!({"jsonrpc": "2.0", "id": 1, "result": result}),
        );
        let o = agent.run(&["send", &peer.id, &format!("question {i}")]);
        assert_eq!(o.code, 0, "{o:?}");
        let want = [
            "from parts",
            "from artifacts",
            "from status",
            "from message",
        ][i];
        assert_eq!(o.out, format!("{want}\n"));
    }
    let o = agent.run(&["send", &peer.id, "json please", "--json"]);
    let v = o.json();
    assert_eq!(v["ok"], true);
    assert_eq!(v["status"], "replied");
    assert_eq!(v["reply"], "from message");
    assert_eq!(v["attempts"], 1);
    // What the peer received: kind parts, role user, our id, the messageId we report.
    let got = emu.received(&peer.id);
    assert_eq!(got.len(), 5);
    let last = &got[4];
    assert_eq!(last["from"], a.id.as_str(), "attributed via X-Workspace-ID");
    let msg = &last["body"]["params"]["message"];
    assert_eq!(last["body"]["method"], "message/send");
    assert_eq!(msg["role"], "user");
    assert_eq!(
        msg["parts"],
        json!([{"kind": "text", "text": "json please"}])
    );
    assert_eq!(msg["messageId"], v["message_id"]);
    let ids: std::collections::HashSet<&str> = got
        .iter()
        .map(|m| m["message_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids.len(), 5, "a fresh messageId per send");
}

#[test]
fn send_to_a_poll_peer_is_queued_and_succeeds() {
    let Cli { emu, b, agent, .. } = Test::new().cli();
    let o = agent.run(&["send", &b.id, "are you there?"]);
    assert_eq!(o.code, 0, "{o:?}");
    assert!(o.out.starts_with("queued:"), "{}", o.out);
    let o = agent.run(&[
        "--json",
        "send",
        &b.id,
        "again",
        "--message-id",
        "m-fixed-1",
    ]);
    let v = o.json();
    assert_eq!(
        (v["ok"].clone(), v["status"].clone()),
        (json!(true), json!("queued"))
    );
    assert_eq!(v["message_id"], "m-fixed-1");
    // The same --message-id again: the platform keeps one inbox row.
    assert_eq!(
        agent
            .run(&["send", &b.id, "again", "--message-id", "m-fixed-1"])
            .code,
        0
    );
    let rows = emu.get(&format!("/_admin/workspaces/{}/rows", b.id))["rows"]
        .as_array()
        .unwrap()
        .len();
    assert_eq!(rows, 2, "deduplicated by messageId");
    // A 202 queued:true answer (busy push peer that could queue) is success too.
    emu.fault(
        json!({"path_prefix": format!("/workspaces/{}/a2a", b.id), "status": 202,
        "body": {"queued": true, "queue_id": "q-1", "queue_depth": 1, "message": "queued"}}),
    );
    let v = agent.run(&["--json", "send", &b.id, "busy?"]).json();
    assert_eq!(v["status"], "queued");
    assert_eq!(v["queue_id"], "q-1");
}

#[test]
fn send_reads_stdin_with_dash_and_drops_one_newline() {
    let Cli { emu, b, agent, .. } = Test::new().cli();
    let o = agent.run_stdin(
        &["send", &b.id, "-"],
        Some("line one\nline two\n".as_bytes()),
    );
    assert_eq!(o.code, 0, "{o:?}");
    let got = emu.received(&b.id);
    assert_eq!(got[0]["text"], "line one\nline two");
}

#[test]
fn send_bad_input_is_exit_2_before_any_request() {
    let Cli { emu, b, agent, .. } = Test::new().cli();
    let before = total_requests(&emu);
    agent
        .run(&["send", NOT_A_UUID, "hi"])
        .fails(2, "not a UUID");
    agent.run(&["send", &b.id, ""]).fails(2, "empty");
    agent.run(&["send", &b.id, " \n\t "]).fails(2, "empty");
    agent.run(&["send", &b.id]).fails(2, "text is required");
    agent.run(&["send"]).fails(2, "peer id is required");
    agent
        .run_stdin(&["send", &b.id, "-"], Some(b""))
        .fails(2, "empty");
    agent
        .run_stdin(&["send", &b.id, "-"], Some(&[0xff, 0xfe, 0x00]))
        .fails(2, "not UTF-8");
    agent
        .run(&["send", &b.id, "x", "--budget", "0"])
        .fails(2, "--budget");
    let v = agent
        .run(&["--json", "send", NOT_A_UUID, "hi"])
        .json_failure(2, "not a UUID");
    assert!(v.get("http_status").is_none());
    // 17 MiB on stdin: refused at 16 MiB, without reading the rest (what went into
    // the pipe is at most the limit plus one pipe buffer).
    let big = vec![b'a'; 17 * 1024 * 1024];
    let o = agent.run_stdin(&["send", &b.id, "-"], Some(&big));
    o.fails(2, "too large");
    let taken = o.stdin_written.unwrap();
    assert!(taken < big.len(), "read all {taken} bytes: {o:?}");
    assert_eq!(total_requests(&emu), before, "no request for bad input");
}

#[test]
fn send_retries_with_growing_gaps_and_stops_at_the_budget() {
    let Cli { emu, b, agent, .. } = Test::new().cli();
    let path = format!("/workspaces/{}/a2a", b.id);
    emu.fault(json!({"path_prefix": path, "count": 5, "status": 502,
        "body": {"error": "failed to reach workspace agent"}}));
    let o = agent.run(&["--json", "send", &b.id, "hello", "--budget", "4"]);
    let v = o.json_failure(75, "failed to reach workspace agent");
    assert!(v["error"].as_str().unwrap().contains("--budget 4"), "{v}");
    // Stopped at the budget: the emulator's record of the attempts (below) ends within
    // 4 s of the first.
    assert!(o.err.contains("retrying in"), "{}", o.err);
    let times = request_times(&emu, &path);
    assert!(times.len() >= 3, "attempts: {times:?}");
    assert_eq!(v["attempts"], times.len());
    let gaps: Vec<i64> = times.windows(2).map(|w| w[1] - w[0]).collect();
    assert!(gaps[0] >= 700, "first wait ~1 s: {gaps:?}");
    for w in gaps.windows(2) {
        assert!(w[1] > w[0], "gaps grow: {gaps:?}");
    }
    let last = *times.last().unwrap() - times[0];
    assert!(last <= 4000, "no attempt after the budget: {times:?}");
}

#[test]
fn send_retries_transient_answers_with_the_same_message_id() {
    let Cli { emu, b, agent, .. } = Test::new().cli();
    let path = format!("/workspaces/{}/a2a", b.id);
    emu.fault(json!({"path_prefix": path, "count": 1, "status": 503,
        "body": {"error": "workspace agent unreachable — container restart triggered", "restarting": true}}));
    emu.fault(json!({"path_prefix": path, "count": 1, "status": 429,
        "headers": {"Retry-After": "1"}, "body": {"error": "rate limit exceeded", "retry_after": 1}}));
    let o = agent.run(&["--json", "send", &b.id, "persist", "--budget", "30"]);
    let v = o.json();
    assert_eq!(o.code, 0, "{o:?}");
    assert_eq!(v["attempts"], 3);
    assert_eq!(request_times(&emu, &path).len(), 3);
    let got = emu.received(&b.id);
    assert_eq!(got.len(), 1);
    assert_eq!(got[0]["message_id"], v["message_id"]);
}

#[test]
fn send_never_retries_a_busy_503_or_a_delivered_502() {
    let Cli { emu, a, b, agent } = Test::new().cli();
    let path = format!("/workspaces/{}/a2a", b.id);
    emu.fault(json!({"path_prefix": path, "count": 3, "status": 503,
        "headers": {"Retry-After": "1"},
        "body": {"error": "workspace agent busy — retry after a short backoff", "busy": true, "retry_after": 1}}));
    let o = agent.run(&["send", &b.id, "x", "--message-id", "busy-1"]);
    o.fails(1, "is busy");
    assert!(o.err.contains("--message-id busy-1"), "{}", o.err);
    assert_eq!(request_times(&emu, &path).len(), 1, "busy 503 not retried");
    // A second peer, so the busy fault's unused repeats do not get in the way.
    let c = push_peer(&emu, &a, json!({}));
    let path = format!("/workspaces/{}/a2a", c.id);
    emu.fault(json!({"path_prefix": path, "count": 3, "status": 502,
        "body": {"error": "agent response lost", "delivery_confirmed": true}}));
    let o = agent.run(&["--json", "send", &c.id, "y"]);
    let v = o.json_failure(1, "delivered");
    assert_eq!(v["delivered"], true);
    assert_eq!(v["http_status"], 502);
    assert_eq!(
        request_times(&emu, &path).len(),
        1,
        "delivered 502 not retried"
    );
}

#[test]
fn send_failures_say_why() {
    let Cli { emu, a, b, agent } = Test::new().cli();
    // Another org root: hierarchy rules forbid it.
    let (stranger, _) = emu.workspace(json!({"name": "stranger", "delivery_mode": "poll"}));
    agent
        .run(&["send", &stranger, "hi"])
        .fails(1, "not allowed to talk to this workspace (hierarchy rules");
    let unknown = molecule::uuid::new_v4();
    agent
        .run(&["send", &unknown, "hi"])
        .fails(1, "no such workspace");
    let v = agent
        .run(&["--json", "send", &unknown, "hi"])
        .json_failure(1, "no such workspace");
    assert_eq!(v["http_status"], 404);
    let path = format!("/workspaces/{}/a2a", b.id);
    emu.fault(json!({"path_prefix": path, "status": 410, "body": {"error": "workspace removed"}}));
    agent.run(&["send", &b.id, "hi"]).fails(4, "was removed");
    emu.fault(json!({"path_prefix": path, "status": 413,
        "body": {"error": "request body exceeds 16777216 byte limit", "truncated": true}}));
    agent.run(&["send", &b.id, "hi"]).fails(2, "too large");
    emu.fault(json!({"path_prefix": path, "status": 400,
        "body": {"error": "missing tenant routing header", "code": "TENANT_ORG_HEADER_REQUIRED"}}));
    agent.run(&["send", &b.id, "hi"]).fails(2, "--org-id");
    // The peer's own JSON-RPC error in a 200.
    let peer = push_peer(
        &emu,
        &a,
        json!({"jsonrpc": "2.0", "id": 1, "error": {"code": -32000, "message": "model overloaded"}}),
    );
    agent
        .run(&["send", &peer.id, "hi"])
        .fails(1, "model overloaded (code -32000)");
    // Nothing listening: transport errors are retried until the budget is spent.
    let o = agent
        .cmd(&["send", &b.id, "hi", "--budget", "2"])
        .env("MOLECULE_API_URL", &closed_port_url())
        .out();
    assert_eq!(o.code, 75, "{o:?}");
    assert!(o.err.contains("cannot reach the platform"), "{o:?}");
}

// ------------------------------------------------------------------ 401 on any command

#[test]
fn a_rejected_token_exits_3_with_how_to_rotate() {
    let Cli { emu, a, b, agent } = Test::new().cli();
    // Rotate (not just revoke): with no live token left the platform's registry and
    // discovery routes fall back to bootstrap and would let any caller through.
    emu.post(&format!("/_admin/workspaces/{}/rotate", a.id), json!({}));
    let token_file = agent.token_file().display().to_string();
    for args in [
        vec!["send", b.id.as_str(), "hi"],
        vec!["peers"],
        vec!["discover", b.id.as_str()],
        vec!["delegate", b.id.as_str(), "task"],
        vec!["delegations"],
        vec!["notify", "hi"],
        vec!["heartbeat"],
    ] {
        let o = agent.run(&args);
        o.fails(3, "rejected the workspace token");
        assert!(
            o.err.contains("rotate") && o.err.contains(&token_file),
            "{o:?}"
        );
        let mut j = vec!["--json"];
        j.extend(&args);
        agent
            .run(&j)
            .json_failure(3, "rejected the workspace token");
    }
}

#[test]
fn a_removed_workspace_exits_4_with_the_platform_hint() {
    let Cli { emu, a, b, agent } = Test::new().cli();
    emu.post(&format!("/_admin/workspaces/{}/remove", a.id), json!({}));
    agent.run(&["send", &b.id, "hi"]).fails(4, "removed");
    let v = agent
        .run(&["--json", "delegations"])
        .json_failure(4, "removed");
    assert!(
        v["hint"]
            .as_str()
            .unwrap()
            .contains("Create a replacement workspace")
    );
    // info on the open route says "removed" with the hint directly.
    let o = agent.run(&["info"]);
    o.fails(4, "removed");
    assert!(
        o.err.contains("Hint: Create a replacement workspace"),
        "{o:?}"
    );
    let v = agent.run(&["--json", "info"]).json_failure(4, "removed");
    assert_eq!(v["removed"], true);
    assert_eq!(v["id"], a.id.as_str());
}

#[test]
fn a_rotated_token_in_the_file_is_picked_up_and_retried_once() {
    let Cli { emu, a, agent, .. } = Test::new().cli();
    // Rotate: the file still holds the old token. Slow the first peers call down so
    // the file can be updated after the command read it and before the 401 arrives.
    let fresh = emu.post(&format!("/_admin/workspaces/{}/rotate", a.id), json!({}))["token"]
        .as_str()
        .unwrap()
        .to_string();
    emu.fault(
        json!({"path_prefix": format!("/registry/{}/peers", a.id), "count": 1,
        "delay_ms": 1500}),
    );
    let child = agent.cmd(&["--json", "peers"]).start();
    eventually("the slowed request to arrive", || {
        emu.get("/_admin/faults")["faults"]
            .as_array()
            .unwrap()
            .is_empty()
            .then_some(())
    });
    write_secret(&agent.token_file(), &fresh);
    let o = child.out();
    assert_eq!(o.code, 0, "{o:?}");
    let v: Value = serde_json::from_str(&o.out).unwrap();
    assert_eq!(v.as_array().unwrap().len(), 2);
    assert_eq!(
        request_times(&emu, &format!("/registry/{}/peers", a.id)).len(),
        2
    );
}

// ------------------------------------------------------------------ peers, discover, info

#[test]
fn peers_lists_explains_empty_and_failed() {
    let Cli { emu, a, b, agent } = Test::new().cli();
    let o = agent.run(&["peers"]);
    assert_eq!(o.code, 0, "{o:?}");
    assert!(o.out.starts_with("ID "), "{}", o.out);
    assert!(o.out.contains(&b.id) && o.out.contains("peer") && o.out.contains("root"));
    let v = agent.run(&["--json", "peers"]).json();
    assert_eq!(v.as_array().unwrap().len(), 2);
    let v = agent.run(&["peers", "--query", "PEE", "--json"]).json();
    assert_eq!(v.as_array().unwrap().len(), 1);
    assert_eq!(v[0]["id"], b.id.as_str());
    let o = agent.run(&["peers", "--query", "nobody"]);
    assert_eq!((o.code, o.out.starts_with("no peers:")), (0, true), "{o:?}");
    // A lone workspace has nobody to talk to, and says so.
    let (lone, lone_tok) = emu.workspace(json!({"name": "lone", "delivery_mode": "poll"}));
    let lone = Agent::new(
        &emu,
        &Ws {
            id: lone,
            token: lone_tok,
        },
    );
    let o = lone.run(&["peers"]);
    assert_eq!(o.code, 0);
    assert!(
        o.out.contains("no siblings, children or parent"),
        "{}",
        o.out
    );
    assert_eq!(lone.run(&["--json", "peers"]).json(), json!([]));
    // Failures, in words.
    let path = format!("/registry/{}/peers", a.id);
    emu.fault(
        json!({"path_prefix": path, "status": 404, "body": {"error": "workspace not found"}}),
    );
    agent
        .run(&["peers"])
        .fails(4, "is not registered with the platform");
    emu.fault(json!({"path_prefix": path, "status": 403,
        "body": {"error": "org token not authorized for this workspace's org"}}));
    agent.run(&["peers"]).fails(1, "refused to list the peers");
    emu.fault(json!({"path_prefix": path, "status": 500, "body": {"error": "lookup failed"}}));
    let v = agent
        .run(&["--json", "peers"])
        .json_failure(75, "platform error");
    assert_eq!(v["http_status"], 500);
    let o = agent
        .cmd(&["peers"])
        .env("MOLECULE_API_URL", &closed_port_url())
        .out();
    assert_eq!(o.code, 75, "{o:?}");
    assert!(o.err.contains("cannot reach the platform"), "{o:?}");
}

#[test]
fn discover_checks_existence_and_access() {
    let Cli { emu, b, agent, .. } = Test::new().cli();
    let o = agent.run(&["discover", &b.id]);
    assert_eq!(o.code, 0, "{o:?}");
    assert!(o.out.contains("may talk to it"), "{}", o.out);
    assert_eq!(
        agent.run(&["--json", "discover", &b.id]).json()["id"],
        b.id.as_str()
    );
    let (stranger, _) = emu.workspace(json!({"name": "stranger"}));
    agent
        .run(&["discover", &stranger])
        .fails(1, "not allowed to talk to");
    agent
        .run(&["discover", &molecule::uuid::new_v4()])
        .fails(1, "no such workspace");
    agent.run(&["discover", NOT_A_UUID]).fails(2, "not a UUID");
    emu.fault(
        json!({"path_prefix": format!("/registry/discover/{}", b.id), "status": 503,
        "body": {"error": "workspace not available", "status": "offline"}}),
    );
    agent
        .run(&["discover", &b.id])
        .fails(75, "not available right now");
}

#[test]
fn info_shows_own_or_other_workspace() {
    let Cli { emu, a, b, agent } = Test::new().cli();
    let o = agent.run(&["info"]);
    assert_eq!(o.code, 0, "{o:?}");
    assert!(
        o.out.contains(&a.id) && o.out.contains("agent"),
        "{}",
        o.out
    );
    let v = agent.run(&["--json", "info", &b.id]).json();
    assert_eq!(v["name"], "peer");
    agent
        .run(&["info", &molecule::uuid::new_v4()])
        .fails(4, "no workspace");
    agent.run(&["info", NOT_A_UUID]).fails(2, "not a UUID");
    emu.post(&format!("/_admin/workspaces/{}/remove", b.id), json!({}));
    let v = agent
        .run(&["--json", "info", &b.id])
        .json_failure(4, "removed");
    assert!(v["hint"].as_str().unwrap().contains("New Token"));
}

// ------------------------------------------------------------------ delegate

/// Spawns `molecule delegate … --wait`, completes the delegation from the test once
/// it shows up, and returns what the command printed.
fn delegate_and_complete(agent: &Agent, emu: &Emulator, target: &str, outcome: Value) -> Out {
    let child = agent
        .cmd(&[
            "--json",
            "delegate",
            target,
            "count the files",
            "--wait",
            "--timeout",
            "60",
        ])
        .start();
    let did = eventually("the delegation to appear", || {
        emu.get("/_admin/delegations")["delegations"]
            .as_array()
            .unwrap()
            .iter()
            .find(|d| d["source_id"] == agent.ws.id.as_str() && d["status"] == "dispatched")
            .map(|d| d["delegation_id"].as_str().unwrap().to_string())
    });
    emu.post(&format!("/_admin/delegations/{did}/complete"), outcome);
    child.out()
}

#[test]
fn delegate_prints_the_id_and_replays_an_idempotency_key() {
    let Cli {
        emu: _emu,
        a,
        b,
        agent,
    } = Test::new().cli();
    let o = agent.run(&["delegate", &b.id, "summarise the logs"]);
    assert_eq!(o.code, 0, "{o:?}");
    let did = o.out.trim().to_string();
    assert!(molecule::uuid::is_uuid(&did), "{}", o.out);
    let first = agent.run(&["delegate", &b.id, "t", "--idempotency-key", "k-1"]);
    let again = agent.run(&["delegate", &b.id, "t", "--idempotency-key", "k-1"]);
    let id1 = first.out.lines().next().unwrap();
    assert_eq!(again.out.lines().next().unwrap(), id1, "{again:?}");
    assert!(!first.out.contains("idempotent_hit"));
    assert!(again.out.contains("idempotent_hit"), "{}", again.out);
    let v = agent
        .run(&["--json", "delegate", &b.id, "t", "--idempotency-key", "k-1"])
        .json();
    assert_eq!(v["idempotent_hit"], true);
    assert_eq!(v["delegation_id"], id1);
    // Bad input and a refused delegation.
    agent
        .run(&["delegate", NOT_A_UUID, "x"])
        .fails(2, "not a UUID");
    agent.run(&["delegate", &b.id, "  "]).fails(2, "empty");
    agent
        .run(&["delegate", &b.id, "x", "--timeout", "5"])
        .fails(2, "--wait");
    let o = agent.run(&["delegate", &a.id, "myself"]);
    o.fails(1, "self-delegation not permitted");
    assert!(o.err.contains("Hint:"), "{o:?}");
}

#[test]
fn delegate_wait_completed_prints_the_result() {
    let Cli { emu, a, b, agent } = Test::new().cli();
    let o = delegate_and_complete(
        &agent,
        &emu,
        &b.id,
        json!({"status": "completed", "text": "42 files"}),
    );
    assert_eq!(o.code, 0, "{o:?}");
    let v = o.json();
    assert_eq!(v["status"], "completed");
    assert_eq!(v["result"], "42 files");
    // Human output is the result itself.
    let peer = push_peer(
        &emu,
        &a,
        json!({"jsonrpc": "2.0", "result": {"parts": [{"kind": "text", "text": "done at once"}]}}),
    );
    let o = agent.run(&["delegate", &peer.id, "quick one", "--wait"]);
    assert_eq!((o.code, o.out.as_str()), (0, "done at once\n"), "{o:?}");
}

#[test]
fn delegate_wait_failed_exits_1_with_the_error() {
    let Cli { emu, b, agent, .. } = Test::new().cli();
    let o = delegate_and_complete(
        &agent,
        &emu,
        &b.id,
        json!({"status": "failed", "error": "disk full"}),
    );
    let v = o.json_failure(1, "disk full");
    assert_eq!(v["status"], "failed");
    o.fails(1, "failed: disk full");
    // A target that does not exist fails at once on the platform's side.
    let o = agent.run(&["delegate", &molecule::uuid::new_v4(), "x", "--wait"]);
    o.fails(1, "workspace not found");
}

#[test]
fn delegate_wait_times_out_with_75() {
    let Cli { emu, b, agent, .. } = Test::new().cli();
    let o = agent.run(&["delegate", &b.id, "slow", "--wait", "--timeout", "2"]);
    o.fails(75, "still dispatched after 2 s");
    // It gave up at the timeout: a look a second for 2 s, not the 60 s default.
    let looks = emu.route_count("GET /workspaces/:id/delegations");
    assert!((2..=4).contains(&looks), "{looks} looks: {o:?}");
    let v = agent
        .run(&[
            "--json",
            "delegate",
            &b.id,
            "slow",
            "--wait",
            "--timeout",
            "1",
        ])
        .json_failure(75, "--timeout");
    assert!(molecule::uuid::is_uuid(
        v["delegation_id"].as_str().unwrap()
    ));
}

#[test]
fn delegations_lists_and_filters() {
    let Cli { emu, b, agent, .. } = Test::new().cli();
    let o = agent.run(&["delegations"]);
    assert_eq!(
        (o.code, o.out.as_str()),
        (
            0,
            "no delegations (none sent or received among the newest 50)\n"
        )
    );
    assert_eq!(agent.run(&["--json", "delegations"]).json(), json!([]));
    let did = agent
        .run(&["delegate", &b.id, "first task"])
        .out
        .trim()
        .to_string();
    emu.post(
        &format!("/_admin/delegations/{did}/complete"),
        json!({"status": "completed", "text": "ok"}),
    );
    agent.run(&["delegate", &b.id, "second task"]);
    let o = agent.run(&["delegations"]);
    assert_eq!(o.code, 0);
    assert!(o.out.starts_with("DELEGATION "), "{}", o.out);
    assert!(o.out.contains("first task") && o.out.contains("second task"));
    let all = agent.run(&["--json", "delegations"]).json();
    assert_eq!(all.as_array().unwrap().len(), 2);
    assert_eq!(all[0]["summary"], "second task", "newest first");
    let done = agent
        .run(&["--json", "delegations", "--status", "completed"])
        .json();
    assert_eq!(done.as_array().unwrap().len(), 1);
    assert_eq!(done[0]["delegation_id"], did.as_str());
    let o = agent.run(&["delegations", "--status", "failed"]);
    assert_eq!(o.out, "no delegations with status failed\n");
}

// ------------------------------------------------------------------ notify, heartbeat

#[test]
fn notify_sends_with_attachments_and_explains_a_403() {
    let Cli { emu, a, agent, .. } = Test::new().cli();
    let o = agent.run(&[
        "notify",
        "build finished",
        "--attach",
        "platform-pending:ws/f1,report.pdf",
        "--attach",
        "https://files.example/logs/run.txt",
    ]);
    assert_eq!((o.code, o.out.as_str()), (0, "sent\n"), "{o:?}");
    let n = emu.notifies(&a.id);
    assert_eq!(n[0]["message"], "build finished");
    assert_eq!(
        n[0]["attachments"],
        json!([{"uri": "platform-pending:ws/f1", "name": "report.pdf"},
               {"uri": "https://files.example/logs/run.txt", "name": "run.txt"}])
    );
    let v = agent
        .run_stdin(&["--json", "notify", "-"], Some(b"from stdin\n"))
        .json();
    assert_eq!(v, json!({"ok": true, "status": "sent", "attachments": 0}));
    assert_eq!(emu.notifies(&a.id)[1]["message"], "from stdin");
    agent.run(&["notify", ""]).fails(2, "empty");
    agent
        .run(&["notify", "x", "--attach", ",name"])
        .fails(2, "--attach");
    emu.post(
        &format!("/_admin/workspaces/{}/update", a.id),
        json!({"talk_to_user_enabled": false}),
    );
    let o = agent.run(&["notify", "hello?"]);
    o.fails(1, "talk_to_user_disabled");
    assert!(
        o.err.contains("Hint: This workspace is not allowed"),
        "{o:?}"
    );
    let v = agent
        .run(&["--json", "notify", "hello?"])
        .json_failure(1, "not allowed to message the user");
    assert_eq!(v["http_status"], 403);
    assert!(v["hint"].as_str().unwrap().contains("delegate_task"));
}

#[test]
fn heartbeat_sends_only_the_given_fields() {
    let Cli { emu, a, agent, .. } = Test::new().cli();
    let o = agent.run(&[
        "heartbeat",
        "--current-task",
        "indexing",
        "--active-tasks",
        "2",
        "--error-rate",
        "0.25",
        "--sample-error",
        "timeout talking to llm",
    ]);
    assert_eq!(o.code, 0, "{o:?}");
    assert_eq!(o.out, format!("heartbeat sent for {}\n", a.id));
    let hb = emu.heartbeats(&a.id)["last"].clone();
    assert_eq!(hb["workspace_id"], a.id.as_str());
    assert_eq!(hb["current_task"], "indexing");
    assert_eq!(hb["active_tasks"], 2);
    assert_eq!(hb["error_rate"], 0.25);
    assert_eq!(hb["sample_error"], "timeout talking to llm");
    assert!(hb["runtime_metadata"].is_object(), "{hb}");
    assert!(hb.get("runtime_state").is_none(), "{hb}");
    assert!(hb.get("uptime_seconds").is_none(), "only when given: {hb}");
    let v = agent
        .run(&["--json", "heartbeat", "--uptime-secs", "120"])
        .json();
    assert_eq!(v["ok"], true);
    let hb = emu.heartbeats(&a.id)["last"].clone();
    assert_eq!(hb["uptime_seconds"], 120);
    assert!(hb.get("current_task").is_none(), "{hb}");
    agent
        .run(&["heartbeat", "--error-rate", "1.5"])
        .fails(2, "between 0.0 and 1.0");
    agent
        .run(&["heartbeat", "--active-tasks", "-1"])
        .fails(2, "--active-tasks");
}

// ------------------------------------------------------------------ status, doctor

#[test]
fn doctor_passes_against_the_emulator_and_flags_a_bad_token() {
    let Cli { emu, a, agent, .. } = Test::new().cli();
    let o = agent.run(&["doctor", "--backend", "exec", "--backend-opt", "cmd=cat"]);
    assert_eq!(o.code, 0, "{o:?}");
    let names: Vec<&str> = o
        .out
        .lines()
        .map(|l| {
            assert!(l.starts_with("ok   "), "{l}");
            l[5..].split(':').next().unwrap()
        })
        .collect();
    assert_eq!(
        names,
        [
            "config",
            "dns",
            "tcp",
            "http",
            "auth",
            "poll-mode",
            "cursor",
            "events",
            "state-dir",
            "backend"
        ]
    );
    let reg = emu.get(&format!("/_admin/workspaces/{}/registers", a.id));
    assert_eq!(reg["last"]["delivery_mode"], "poll");
    let v = agent.run(&["--json", "doctor"]).json();
    assert_eq!(v["ok"], true);
    assert_eq!(v["version"], molecule::VERSION);
    assert!(
        v["checks"][0]["detail"]
            .as_str()
            .unwrap()
            .starts_with(&format!("molecule {}, platform ", molecule::VERSION)),
        "{v}"
    );
    assert_eq!(
        v["checks"].as_array().unwrap().len(),
        9,
        "no backend line unless asked"
    );
    // A platform without an event stream: skipped, not failed.
    emu.post(
        &format!("/_admin/workspaces/{}/events", a.id),
        json!({"no_stream": true}),
    );
    let o = agent.run(&["doctor"]);
    assert_eq!(o.code, 0, "{o:?}");
    assert!(
        o.out
            .contains("skip events: the platform has no event stream"),
        "{}",
        o.out
    );
    // A wrong token: auth fails, what depends on it is skipped, exit 1.
    write_secret(&agent.token_file(), "not-the-token");
    let o = agent.run(&["doctor"]);
    o.fails(1, "check(s) failed");
    assert!(o.out.contains("FAIL auth: "), "{}", o.out);
    assert!(o.out.contains("skip poll-mode: "), "{}", o.out);
    assert!(o.out.contains("ok   state-dir: "), "{}", o.out);
    let v = agent.run(&["--json", "doctor"]).json_failure(1, "failed");
    let auth = v["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "auth")
        .unwrap()
        .clone();
    assert_eq!(auth["result"], "fail");
    // Missing backend command, and an unreachable platform.
    write_secret(&agent.token_file(), &a.token);
    let o = agent.run(&[
        "doctor",
        "--backend",
        "exec",
        "--backend-opt",
        "cmd=/nonexistent/agent",
    ]);
    assert_eq!(o.code, 1);
    assert!(o.out.contains("FAIL backend: "), "{}", o.out);
    let o = agent
        .cmd(&["doctor"])
        .env("MOLECULE_API_URL", &closed_port_url())
        .out();
    assert_eq!(o.code, 1, "{o:?}");
    assert!(
        o.out.contains("FAIL tcp: ") && o.out.contains("skip auth: "),
        "{o:?}"
    );
    // No configuration at all.
    let o = agent
        .cmd(&["doctor"])
        .env_remove("MOLECULE_WORKSPACE_TOKEN_FILE")
        .out();
    assert_eq!(o.code, 1, "{o:?}");
    assert!(
        o.out.starts_with("FAIL config: no workspace token"),
        "{o:?}"
    );
}

// ------------------------------------------------------------------ --json everywhere

#[test]
fn json_output_is_one_document_for_every_command() {
    let Cli {
        emu: _emu,
        b,
        agent,
        ..
    } = Test::new().cli();
    let b = b.id.as_str();
    let ok: Vec<Vec<&str>> = vec![
        vec!["send", b, "hi"],
        vec!["peers"],
        vec!["discover", b],
        vec!["info"],
        vec!["delegate", b, "t"],
        vec!["delegations"],
        vec!["notify", "n"],
        vec!["heartbeat"],
        vec!["doctor"],
    ];
    for args in ok {
        let mut full = vec!["--json"];
        full.extend(&args);
        let o = agent.run(&full);
        assert_eq!(o.code, 0, "{o:?}");
        o.json();
    }
    // Failures: one document each, exit code inside; --json after the command works too.
    let bad = NOT_A_UUID;
    for (args, code) in [
        (vec!["send", bad, "hi", "--json"], 2),
        (vec!["discover", bad, "--json"], 2),
        (vec!["info", bad, "--json"], 2),
        (vec!["delegate", bad, "x", "--json"], 2),
        (vec!["notify", "", "--json"], 2),
        (vec!["heartbeat", "--error-rate", "9", "--json"], 2),
        (vec!["status", "--json"], 1),
    ] {
        let o = agent.run(&args);
        let v = o.json();
        assert_eq!(
            (v["ok"].clone(), v["exit_code"].clone()),
            (json!(false), json!(code)),
            "{o:?}"
        );
        assert_eq!(o.code, code);
    }
}
