//! The platform tools of issue 13 end to end against the emulator: memory, requests
//! and approvals (`ask`, `requests`, `request`), files (`notify --file`, `download`),
//! `history`, `card update` / `connect --card-file`, `broadcast`, and what `connect`
//! does with request notices, inbound attachments and broadcasts.

use std::sync::Arc;

use serde_json::{Value, json};

use crate::support::*;

/// A root workspace and a poll-mode child of it, each with an `Agent`.
fn family(emu: &Emulator) -> (Agent, Agent) {
    let (root, rt) = emu.workspace(json!({"name": "root", "delivery_mode": "poll"}));
    let (child, ct) =
        emu.workspace(json!({"name": "child", "parent_id": root, "delivery_mode": "poll"}));
    (
        Agent::new(
            emu,
            &Ws {
                id: root,
                token: rt,
            },
        ),
        Agent::new(
            emu,
            &Ws {
                id: child,
                token: ct,
            },
        ),
    )
}

/// A platform route called with a bearer token: (status, body).
fn call(
    emu: &Emulator,
    token: &str,
    method: &str,
    path: &str,
    body: Option<Value>,
) -> (u16, Value) {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .proxy(None)
        .build()
        .into();
    let url = format!("{}{path}", emu.url);
    let auth = format!("Bearer {token}");
    let mut resp = match (method, body) {
        ("GET", _) => agent.get(&url).header("Authorization", &auth).call(),
        (_, b) => agent
            .post(&url)
            .header("Authorization", &auth)
            .send_json(b.unwrap_or(json!({}))),
    }
    .unwrap();
    let status = resp.status().as_u16();
    let text = resp.body_mut().read_to_string().unwrap_or_default();
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

/// The human answers request `rid` on the canvas (the human route; without an admin
/// token any live workspace token may use it).
fn human_answers(emu: &Emulator, any: &Agent, rid: &str, action: &str) {
    let path = format!("/requests/{rid}/respond");
    let (s, v) = call(
        emu,
        &any.ws.token,
        "POST",
        &path,
        Some(json!({"action": action})),
    );
    assert_eq!(s, 200, "{v}");
}

fn requests_of(emu: &Emulator) -> Vec<Value> {
    emu.get("/_admin/requests")["requests"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

// ---------------------------------------------------------------- help

#[test]
fn every_tool_command_has_help() {
    for cmd in [
        "memory",
        "ask",
        "requests",
        "request",
        "history",
        "card",
        "broadcast",
        "download",
    ] {
        let (code, out, _) = run(&[cmd, "--help"]);
        assert_eq!(code, 0, "{cmd}");
        assert!(out.contains(&format!("molecule {cmd}")), "{cmd}: {out}");
        assert!(out.contains("--budget"), "{cmd}");
    }
    let (_, out, _) = run(&["notify", "--help"]);
    assert!(out.contains("--file PATH"));
    let (_, out, _) = run(&["connect", "--help"]);
    assert!(out.contains("--card-file") && out.contains("request_update"));
}

// ---------------------------------------------------------------- memory

#[test]
fn memory_commit_search_namespaces_delete() {
    let emu = Emulator::start();
    let (_root, child) = family(&emu);
    let o = child.run(&["memory", "commit", "deploys run on Fridays", "--json"]);
    let v = o.json();
    assert_eq!(
        (v["ok"].clone(), v["scope"].clone()),
        (json!(true), json!("LOCAL"))
    );
    let id = v["id"].as_str().unwrap().to_string();
    // Plain output is the id alone, for $(...).
    let o = child.run_stdin(
        &[
            "memory",
            "commit",
            "-",
            "--scope",
            "team",
            "--namespace",
            "ops",
        ],
        Some(b"on-call rota lives in the wiki\n"),
    );
    assert_eq!(o.code, 0, "{o:?}");
    let team_id = o.out.trim().to_string();
    assert!(molecule::uuid::is_uuid(&team_id), "{o:?}");

    let v = child.run(&["memory", "search", "Fridays", "--json"]).json();
    assert_eq!(v["count"], 1, "{v}");
    assert_eq!(v["memories"][0]["id"], id.as_str());
    let v = child
        .run(&["memory", "search", "--json", "--limit", "1"])
        .json();
    assert_eq!(v["count"], 1);
    assert!(child.run(&["memory", "search", "--kind", "opinion"]).code == 2);

    let v = child.run(&["memory", "namespaces", "--json"]).json();
    let names: Vec<&str> = v["readable"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["name"].as_str().unwrap())
        .collect();
    assert!(
        names.contains(&format!("workspace:{}", child.ws.id).as_str()),
        "{v}"
    );
    assert_eq!(
        v["writable"].as_array().unwrap().len(),
        2,
        "a child cannot write GLOBAL"
    );

    // Only LOCAL memories can be deleted: the TEAM one is 404 → exit 1.
    let o = child.run(&["memory", "delete", &team_id, "--json"]);
    let f = o.json_failure(1, "TEAM and GLOBAL memories cannot be deleted");
    assert_eq!(f["http_status"], 404);
    let o = child.run(&["memory", "delete", &id]);
    assert_eq!(o.code, 0, "{o:?}");
    assert_eq!(o.out, format!("deleted {id}\n"));
    assert_eq!(
        child.run(&["memory", "search", "Fridays", "--json"]).json()["count"],
        0
    );
    child
        .run(&["memory", "delete", "not-a-uuid"])
        .fails(2, "not a UUID");
}

#[test]
fn memory_refusals_plugin_global_and_redaction() {
    let emu = Emulator::start();
    let (root, child) = family(&emu);
    // GLOBAL from a child: 403 → exit 1 with the platform's reason.
    let o = child.run(&[
        "memory", "commit", "org fact", "--scope", "GLOBAL", "--json",
    ]);
    let f = o.json_failure(1, "only root workspaces can write GLOBAL memories");
    assert_eq!(f["http_status"], 403);
    // A root may.
    assert_eq!(
        root.run(&["memory", "commit", "org fact", "--scope", "GLOBAL"])
            .code,
        0
    );
    // Secrets are redacted by the platform before storage.
    let o = child.run(&[
        "memory",
        "commit",
        "use OPENAI_API_KEY=sk-live-123456789 here",
        "--json",
    ]);
    assert_eq!(o.code, 0, "{o:?}");
    let v = child.run(&["memory", "search", "here", "--json"]).json();
    let content = v["memories"][0]["content"].as_str().unwrap();
    assert!(
        content.contains("REDACTED") && !content.contains("sk-live"),
        "{content}"
    );
    // No memory plugin: 503 → exit 1 saying so (not "try again later").
    emu.post("/_admin/tools", json!({"memory_plugin": false}));
    for args in [
        vec!["memory", "commit", "x"],
        vec!["memory", "search", "x"],
        vec!["memory", "namespaces"],
    ] {
        let mut a = args.clone();
        a.push("--json");
        let o = child.run(&a);
        let f = o.json_failure(1, "no memory plugin");
        assert_eq!(f["http_status"], 503, "{args:?}");
    }
    child.run(&["memory"]).fails(2, "an action is required");
    child
        .run(&["memory", "commit", "x", "--kind", "fact"])
        .fails(2, "does not apply");
}

#[test]
fn transient_failures_are_retried_inside_the_budget() {
    let emu = Emulator::start();
    let (_root, child) = family(&emu);
    let path = format!("/workspaces/{}/v2/namespaces", child.ws.id);
    emu.fault(json!({"method": "GET", "path_prefix": path, "status": 503,
                     "body": {"error": "busy"}, "count": 1}));
    let o = child.run(&["memory", "namespaces", "--json"]);
    assert_eq!(o.code, 0, "{o:?}");
    emu.fault(json!({"method": "GET", "path_prefix": path, "status": 502,
                     "body": {"error": "down"}, "count": 100}));
    let o = child.run(&["memory", "namespaces", "--json", "--budget", "2"]);
    let f = o.json_failure(75, "--budget 2");
    assert!(f["attempts"].as_u64().unwrap() >= 2, "{f}");
}

// ---------------------------------------------------------------- requests

/// Runs `ask ... --wait` in the background; returns the child.
fn ask_wait(agent: &Agent, extra: &[&str]) -> Running {
    let mut args = vec![
        "ask",
        "Deploy v2",
        "--detail",
        "to prod",
        "--wait",
        "--json",
    ];
    args.extend_from_slice(extra);
    agent.cmd(&args).start()
}

fn pending_request(emu: &Emulator) -> String {
    eventually("a request", || {
        requests_of(emu)
            .first()
            .and_then(|r| r["id"].as_str().map(str::to_string))
    })
}

#[test]
fn ask_wait_approved_and_rejected() {
    let emu = Emulator::start();
    let (root, child) = family(&emu);
    let waiting = ask_wait(&child, &[]);
    let rid = pending_request(&emu);
    // The human answers (any live token works on the human routes without ADMIN_TOKEN).
    let (s, _) = call(
        &emu,
        &root.ws.token,
        "POST",
        &format!("/requests/{rid}/messages"),
        Some(json!({"body": "which region?", "author_type": "human"})),
    );
    assert_eq!(s, 201);
    human_answers(&emu, &root, &rid, "approved");
    let o = waiting.out();
    assert_eq!(o.code, 0, "{o:?}");
    let v = o.json();
    assert_eq!(v["status"], "approved");
    assert_eq!(v["messages"][0]["body"], "which region?");
    // Woken by REQUEST_RESPONDED: the status was read on start and after the event.
    let reads = emu.route_count("GET /workspaces/:id/requests/:requestId");
    assert!(reads <= 3, "{reads} status reads");

    let waiting = ask_wait(&child, &["--kind", "task"]);
    let rid2 = eventually("a second request", || {
        requests_of(&emu)
            .iter()
            .find(|r| r["id"] != rid.as_str())
            .and_then(|r| r["id"].as_str().map(str::to_string))
    });
    human_answers(&emu, &root, &rid2, "rejected");
    let o = waiting.out();
    let f = o.json_failure(1, "was rejected");
    assert_eq!(f["status"], "rejected");
    assert_eq!(f["request"]["kind"], "task");
}

#[test]
fn ask_wait_reads_the_status_without_an_event_stream() {
    let emu = Emulator::start_with(&["--no-event-stream"]);
    let (root, child) = family(&emu);
    let waiting = ask_wait(&child, &[]);
    let rid = pending_request(&emu);
    human_answers(&emu, &root, &rid, "approved");
    let o = waiting.out();
    assert_eq!(o.code, 0, "{o:?}");
    assert_eq!(o.json()["status"], "approved");
}

#[test]
fn respond_and_cancel_whose_answer_was_lost_still_succeed() {
    let emu = Emulator::start();
    let (root, child) = family(&emu);
    let ask = |title: &str| {
        let o = child.run(&["ask", title, "--to", &root.ws.id, "--json"]);
        o.json()["request_id"].as_str().unwrap().to_string()
    };
    // The platform applies the answer, then the connection drops: the retry finds
    // the request "already resolved" by that very answer.
    let rid = ask("Merge?");
    emu.fault(json!({"method": "POST",
                     "path_prefix": format!("/workspaces/{}/requests/{rid}/respond", root.ws.id),
                     "drop_after": true, "count": 1}));
    let o = root.run(&["request", "respond", &rid, "approved", "--json"]);
    assert_eq!(o.code, 0, "{o:?}");
    assert_eq!(o.json()["status"], "approved");
    let rid2 = ask("Deploy?");
    emu.fault(json!({"method": "POST",
                     "path_prefix": format!("/workspaces/{}/requests/{rid2}/cancel", child.ws.id),
                     "drop_after": true, "count": 1}));
    let o = child.run(&["request", "cancel", &rid2, "--json"]);
    assert_eq!(o.code, 0, "{o:?}");
    assert_eq!(o.json()["status"], "cancelled");
    // Answering again (a first attempt, not a retry) is still refused.
    root.run(&["request", "respond", &rid, "rejected"])
        .fails(1, "already");
}

#[test]
fn ask_wait_timed_out_and_cancelled() {
    let emu = Emulator::start();
    let (_root, child) = family(&emu);
    // Timed out: exit 75, the request stays open.
    let o = ask_wait(&child, &["--timeout", "1"]).out();
    let f = o.json_failure(75, "stays open");
    assert_eq!(f["timed_out"], true);
    let rid = f["request_id"].as_str().unwrap().to_string();
    let v = child
        .run(&["requests", "--status", "pending", "--json"])
        .json();
    assert_eq!(v["count"], 1);
    // Cancelled while waiting: exit 1.
    let waiting = ask_wait(&child, &[]);
    let rid2 = eventually("a second request", || {
        requests_of(&emu)
            .iter()
            .find(|r| r["id"] != rid.as_str())
            .and_then(|r| r["id"].as_str().map(str::to_string))
    });
    let o = child.run(&["request", "cancel", &rid2, "--json"]);
    assert_eq!(o.json()["status"], "cancelled");
    let o = waiting.out();
    o.json_failure(1, "was cancelled");
    // Cancelling again: already resolved → 404 → exit 1.
    child.run(&["request", "cancel", &rid2]).fails(1, "already");
    child.run(&["ask", ""]).fails(2, "title is required");
    child
        .run(&["ask", "x", "--to", "nobody"])
        .fails(2, "not a UUID");
    child
        .run(&["ask", "x", "--timeout", "5"])
        .fails(2, "only makes sense with --wait");
}

#[test]
fn agent_recipient_answers_with_request_respond() {
    let emu = Emulator::start();
    let (root, child) = family(&emu);
    let o = child.run(&["ask", "Merge?", "--to", &root.ws.id, "--json"]);
    let rid = o.json()["request_id"].as_str().unwrap().to_string();
    let v = root.run(&["requests", "--inbox", "--json"]).json();
    assert_eq!(v["requests"][0]["id"], rid.as_str());
    // The requester cannot answer its own request; the recipient can.
    child
        .run(&["request", "respond", &rid, "approved"])
        .fails(1, "not the recipient");
    root.run(&["request", "respond", &rid, "maybe"])
        .fails(2, "approved, rejected or done");
    let o = root.run(&["request", "message", &rid, "looks good", "--json"]);
    assert!(o.json()["message_id"].is_string(), "{o:?}");
    assert_eq!(root.run(&["request", "respond", &rid, "approved"]).code, 0);
    let o = child.run(&["request", "show", &rid]);
    assert_eq!(o.code, 0, "{o:?}");
    assert!(
        o.out.contains("approved by agent") && o.out.contains("looks good"),
        "{o:?}"
    );
    let stranger = emu.workspace(json!({"name": "stranger", "delivery_mode": "poll"}));
    let stranger = Agent::new(
        &emu,
        &Ws {
            id: stranger.0,
            token: stranger.1,
        },
    );
    stranger
        .run(&["request", "show", &rid])
        .fails(1, "not a participant");
    child
        .run(&["request", "show", "11111111-1111-4111-8111-111111111111"])
        .fails(1, "request not found");
}

/// An exec backend that appends `origin|request id|attachments|text` per run.
fn recorder(dir: &TempDir) -> (String, std::path::PathBuf) {
    let log = dir.path().join("seen.log");
    let cmd = format!(
        "cmd=printf '%s|%s|%s|%s\\n' \"$MOLECULE_ORIGIN\" \"$MOLECULE_REQUEST_ID\" \"$MOLECULE_ATTACHMENTS\" \"$(cat)\" >> {}; echo answered",
        log.display()
    );
    (cmd, log)
}

fn lines(path: &std::path::Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

#[test]
fn answer_turn_reaches_the_backend_and_is_never_notified() {
    let emu = Emulator::start();
    let (root, child) = family(&emu);
    let dir = Arc::new(TempDir::new());
    let (cmd, log) = recorder(&dir);
    let o = child.run(&["ask", "Deploy v2", "--json"]);
    let rid = o.json()["request_id"].as_str().unwrap().to_string();
    human_answers(&emu, &root, &rid, "approved");
    let c = Connector::start(
        &emu,
        &child.ws,
        &dir,
        &["--backend", "exec", "--backend-opt", &cmd],
    );
    // The answer turn is queued and drained by a heartbeat into the inbox.
    let seen = wait_until(WAIT, "the answer turn at the backend", &c, || {
        let l = lines(&log);
        (!l.is_empty()).then_some(l)
    });
    assert!(
        seen[0].starts_with(&format!("request_update|{rid}|[]|")),
        "{seen:?}"
    );
    assert!(seen[0].contains("was approved by the user"), "{seen:?}");
    // A canvas message after it is answered: the notice was not.
    emu.say(&child.ws.id, None, "hello");
    wait_notifies(&emu, &child.ws.id, 1, &c);
    let n = emu.notifies(&child.ws.id);
    assert_eq!(n.len(), 1, "{n:?}");
    assert_eq!(lines(&log).len(), 2);
}

// ---------------------------------------------------------------- files

#[test]
fn notify_file_upload_then_download() {
    let emu = Emulator::start();
    let (_root, child) = family(&emu);
    let file = child.dir.path().join("report.txt");
    std::fs::write(&file, b"the numbers").unwrap();
    let o = child.run(&[
        "notify",
        "see attached",
        "--file",
        file.to_str().unwrap(),
        "--attach",
        "https://x/y.png",
        "--json",
    ]);
    let v = o.json();
    assert_eq!(v["attachments"], 2, "{v}");
    let uri = v["files"][1]["uri"].as_str().unwrap().to_string();
    assert!(
        uri.starts_with(&format!("platform-pending:{}/", child.ws.id)),
        "{uri}"
    );
    let n = emu.notifies(&child.ws.id);
    assert_eq!(n[0]["attachments"][1]["name"], "report.txt");
    assert_eq!(n[0]["attachments"][1]["mimeType"], "text/plain");

    let out = child.dir.path().join("copy.txt");
    let o = child.run(&[
        "download",
        &uri,
        "-o",
        out.to_str().unwrap(),
        "--ack",
        "--json",
    ]);
    let v = o.json();
    assert_eq!(
        (v["bytes"].clone(), v["acked"].clone()),
        (json!(11), json!(true)),
        "{v}"
    );
    assert_eq!(std::fs::read(&out).unwrap(), b"the numbers");
    let o = child.run(&["download", &uri]);
    assert_eq!((o.code, o.out.as_str()), (0, "the numbers"), "{o:?}");
    child
        .run(&["download", &uri, "--json"])
        .fails(2, "add -o FILE");
    let other = "33333333-3333-4333-8333-333333333333";
    child
        .run(&["download", &format!("platform-pending:{other}/{other}")])
        .fails(2, "only a workspace's own uploads");
    child
        .run(&[
            "download",
            &format!("platform-pending:{}/{other}", child.ws.id),
        ])
        .fails(1, "no such pending upload");
}

#[test]
fn upload_over_the_limit_is_refused_before_uploading() {
    let emu = Emulator::start();
    let (_root, child) = family(&emu);
    let big = child.dir.path().join("big.bin");
    // Sparse: no 100 MiB written to disk.
    std::fs::File::create(&big)
        .unwrap()
        .set_len(100 * 1024 * 1024 + 1)
        .unwrap();
    let o = child.run(&["notify", "x", "--file", big.to_str().unwrap(), "--json"]);
    o.json_failure(2, "at most 104857600 per file");
    let empty = child.dir.path().join("empty.txt");
    std::fs::write(&empty, b"").unwrap();
    child
        .run(&["notify", "x", "--file", empty.to_str().unwrap()])
        .fails(2, "empty");
    let small = child.dir.path().join("s.txt");
    std::fs::write(&small, b"s").unwrap();
    let s = small.to_str().unwrap();
    let mut args = vec!["notify", "x"];
    for _ in 0..11 {
        args.extend(["--file", s]);
    }
    child.run(&args).fails(2, "at most 10 per message");
    assert_eq!(emu.route_count("POST /workspaces/:id/chat/uploads"), 0);
    assert!(emu.notifies(&child.ws.id).is_empty());
}

#[test]
fn inbound_attachments_reach_the_backend() {
    let emu = Emulator::start();
    let (_root, child) = family(&emu);
    let dir = Arc::new(TempDir::new());
    let log = dir.path().join("req.json");
    let cmd = format!("cmd=cat > {}; echo ok", log.display());
    let c = Connector::start(
        &emu,
        &child.ws,
        &dir,
        &[
            "--backend",
            "exec",
            "--backend-opt",
            &cmd,
            "--backend-opt",
            "format=json",
        ],
    );
    emu.post(
        &format!("/_admin/workspaces/{}/rows", child.ws.id),
        json!({
        "method": "message/send", "source_id": null, "message_id": "m-att",
        "request_body": {"jsonrpc": "2.0", "id": "1", "method": "message/send", "params": {
            "message": {"role": "user", "messageId": "m-att", "parts": [
                {"kind": "text", "text": "look"},
                {"kind": "file", "file": {"uri": format!("platform-pending:{}/f", child.ws.id),
                                          "name": "a.png", "mimeType": "image/png"}}]}}}}),
    );
    wait_notifies(&emu, &child.ws.id, 1, &c);
    let req: Value = serde_json::from_slice(&std::fs::read(&log).unwrap()).unwrap();
    assert_eq!(req["attachments"][0]["name"], "a.png", "{req}");
    assert_eq!(req["attachments"][0]["mimeType"], "image/png");
}

// ---------------------------------------------------------------- history

#[test]
fn history_pages_across_a_shared_timestamp() {
    let emu = Emulator::start();
    let (root, child) = family(&emu);
    let peer = root.ws.id.clone();
    // 10 rows in one microsecond, then 495 newer ones: the first page (500) ends in
    // the middle of the shared timestamp.
    let shared = "2026-05-01T00:00:00.000001Z";
    let mut rows: Vec<Value> = (0..10)
        .map(|i| {
            json!({"source_id": peer, "method": "message/send", "created_at": shared,
                        "summary": format!("shared {i}")})
        })
        .collect();
    for i in 0..495 {
        rows.push(json!({"source_id": peer, "method": "message/send",
                         "created_at": format!("2026-05-01T00:{:02}:{:02}Z", 1 + i / 60, i % 60),
                         "summary": format!("later {i}")}));
    }
    let ids = emu.post(
        &format!("/_admin/workspaces/{}/rows_at", child.ws.id),
        json!({"rows": rows}),
    );
    let ids: Vec<String> = ids["ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    let v = child
        .run(&["history", "--peer", &peer, "--limit", "505", "--json"])
        .json();
    let got: Vec<&str> = v["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["id"].as_str().unwrap())
        .collect();
    assert_eq!(
        got.len(),
        505,
        "rows sharing the boundary timestamp were lost"
    );
    assert_eq!(
        got,
        ids.iter().map(String::as_str).collect::<Vec<_>>(),
        "oldest first, in order"
    );
    assert!(v.get("partial").is_none());
    // --before: strictly older.
    let v = child
        .run(&[
            "history",
            "--peer",
            &peer,
            "--before",
            "2026-05-01T00:01:00Z",
            "--json",
        ])
        .json();
    assert_eq!(v["count"], 10);
    child
        .run(&["history", "--before", "yesterday"])
        .fails(2, "RFC 3339");
    assert_eq!(run(&["history", "--peer", "x", "--canvas"]).0, 2);
}

#[test]
fn history_shows_both_sides_of_a_peer_conversation() {
    let emu = Emulator::start();
    let (root, child) = family(&emu);
    emu.say(&child.ws.id, Some(&root.ws.id), "ping from root");
    let o = child.run(&["send", &root.ws.id, "pong from child"]);
    assert_eq!(o.code, 0, "{o:?}");
    let o = child.run(&["history", "--peer", &root.ws.id]);
    assert_eq!(o.code, 0, "{o:?}");
    let text: Vec<&str> = o.out.lines().collect();
    assert_eq!(text.len(), 2, "{o:?}");
    assert!(
        text[0].contains("<-") && text[0].contains("ping from root"),
        "{o:?}"
    );
    assert!(
        text[1].contains("->") && text[1].contains("pong from child"),
        "{o:?}"
    );
    // The canvas conversation: the user's message and our notify.
    emu.say(&child.ws.id, None, "hi human side");
    assert_eq!(child.run(&["notify", "hello user"]).code, 0);
    let v = child.run(&["history", "--canvas", "--json"]).json();
    let roles: Vec<&str> = v["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["role"].as_str().unwrap())
        .collect();
    assert_eq!(roles, ["user", "agent"], "{v}");
}

#[test]
fn connect_replies_are_self_reported_for_history() {
    let emu = Emulator::start();
    let (root, child) = family(&emu);
    let dir = Arc::new(TempDir::new());
    let c = Connector::start(&emu, &child.ws, &dir, &["--backend", "mock"]);
    emu.say(&child.ws.id, Some(&root.ws.id), "question");
    wait_received(&emu, &root.ws.id, 1, &c);
    let v = wait_until(WAIT, "the a2a_send row", &c, || {
        let v = child
            .run(&["history", "--peer", &root.ws.id, "--json"])
            .json();
        (v["count"] == 2).then_some(v)
    });
    assert_eq!(v["entries"][1]["activity_type"], "a2a_send");
    assert_eq!(
        v["entries"][1]["request_body"]["params"]["message"]["parts"][0]["text"],
        "echo: question"
    );
}

// ---------------------------------------------------------------- card

#[test]
fn card_update_and_connect_card_file() {
    let emu = Emulator::start();
    let (_root, child) = family(&emu);
    let dir = Arc::new(TempDir::new());
    let card = dir.path().join("card.json");
    std::fs::write(
        &card,
        r#"{"name":"Builder","description":"builds","url":"http://10.0.0.1/x",
        "skills":[{"id":"build","name":"Build"}]}"#,
    )
    .unwrap();
    let mut c = Connector::start(
        &emu,
        &child.ws,
        &dir,
        &[
            "--backend",
            "mock",
            "--card-file",
            card.to_str().unwrap(),
            "--once",
        ],
    );
    assert!(c.wait_exit(WAIT).success(), "{}", c.stderr());
    let reg = emu.get(&format!("/_admin/workspaces/{}/registers", child.ws.id));
    assert_eq!(reg["last"]["agent_card"]["name"], "Builder", "{reg}");
    assert!(reg["last"]["agent_card"].get("url").is_none());

    let o = child.run(&[
        "card",
        "update",
        "--description",
        "builds and ships",
        "--json",
    ]);
    let v = o.json();
    assert_eq!(
        v["agent_card"]["name"], "Builder",
        "the rest of the card is kept: {v}"
    );
    assert_eq!(v["agent_card"]["skills"][0]["id"], "build");
    let ws = emu.get(&format!("/_admin/workspaces/{}", child.ws.id));
    assert_eq!(ws["agent_card"]["description"], "builds and ships", "{ws}");
    child.run(&["card", "update"]).fails(2, "nothing to change");
    child
        .run(&["card", "update", "--skill", "a b"])
        .fails(2, "ID:NAME");
    let bad = dir.path().join("bad.json");
    std::fs::write(&bad, "[1]").unwrap();
    let (code, _, err) = run(&[
        "connect",
        &child.ws.id,
        "--card-file",
        bad.to_str().unwrap(),
        "--api-url",
        &emu.url,
        "--dry-run",
    ]);
    assert_eq!(code, 2, "{err}");
}

// ---------------------------------------------------------------- broadcast

#[test]
fn broadcast_disabled_then_sent() {
    let emu = Emulator::start();
    let (root, child) = family(&emu);
    let o = child.run(&["broadcast", "all hands", "--json"]);
    let f = o.json_failure(1, "broadcast_disabled");
    assert_eq!(f["http_status"], 403);
    assert!(f["hint"].as_str().unwrap().contains("abilities"), "{f}");
    emu.post(
        &format!("/_admin/workspaces/{}/abilities", child.ws.id),
        json!({"broadcast_enabled": true}),
    );
    let o = child.run(&["broadcast", "all hands"]);
    assert_eq!(
        (o.code, o.out.as_str()),
        (0, "sent to 1 workspace(s)\n"),
        "{o:?}"
    );
    let rows = emu.get(&format!("/_admin/workspaces/{}/rows", root.ws.id));
    assert_eq!(rows["rows"][0]["activity_type"], "broadcast_receive");
}

#[test]
fn broadcast_delivered_once_across_a_restart() {
    let emu = Emulator::start();
    let (root, child) = family(&emu);
    emu.post(
        &format!("/_admin/workspaces/{}/abilities", root.ws.id),
        json!({"broadcast_enabled": true}),
    );
    let dir = Arc::new(TempDir::new());
    let (cmd, log) = recorder(&dir);
    let args = [
        "--backend",
        "exec",
        "--backend-opt",
        &cmd,
        "--broadcasts-secs",
        "1",
    ];
    let mut c = Connector::start(&emu, &child.ws, &dir, &args);
    assert_eq!(root.run(&["broadcast", "maintenance at noon"]).code, 0);
    let seen = wait_until(WAIT, "the broadcast at the backend", &c, || {
        let l = lines(&log);
        (!l.is_empty()).then_some(l)
    });
    assert_eq!(seen, ["broadcast||[]|maintenance at noon"]);
    c.stop();
    let mut c = Connector::start(&emu, &child.ws, &dir, &args);
    // A second broadcast arrives after the restart; the first is not delivered again.
    assert_eq!(root.run(&["broadcast", "all clear"]).code, 0);
    wait_until(WAIT, "the second broadcast", &c, || {
        (lines(&log).len() >= 2).then_some(())
    });
    c.stop();
    assert_eq!(
        lines(&log),
        [
            "broadcast||[]|maintenance at noon",
            "broadcast||[]|all clear"
        ]
    );
    assert!(
        emu.notifies(&child.ws.id).is_empty(),
        "broadcasts are never answered"
    );
    assert!(
        emu.received(&root.ws.id).is_empty(),
        "broadcasts are never answered"
    );
}

/// Broadcast looks the connector made (`GET /activity?type=broadcast_receive`).
fn broadcast_looks(emu: &Emulator) -> usize {
    emu.get("/_admin/stats")["requests"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| {
            r["query"]
                .as_str()
                .unwrap_or("")
                .contains("type=broadcast_receive")
        })
        .count()
}

#[test]
fn broadcast_full_text_from_the_event_stream_and_no_idle_looks() {
    let emu = Emulator::start();
    let (root, child) = family(&emu);
    emu.post(
        &format!("/_admin/workspaces/{}/abilities", root.ws.id),
        json!({"broadcast_enabled": true}),
    );
    let dir = Arc::new(TempDir::new());
    let (cmd, log) = recorder(&dir);
    let c = Connector::start(
        &emu,
        &child.ws,
        &dir,
        &[
            "--backend",
            "exec",
            "--backend-opt",
            &cmd,
            "--broadcasts-secs",
            "1",
            "--wake",
            "auto",
        ],
    );
    // Connected and looked once at start.
    wait_until(WAIT, "the first broadcast look", &c, || {
        (broadcast_looks(&emu) >= 1).then_some(())
    });
    wait_until(WAIT, "the event stream", &c, || {
        c.stderr().contains("event stream connected").then_some(())
    });
    // Idle with the stream up: heartbeats go by (1 s each), no further look (after
    // the one the connection itself may cause).
    let beats = |emu: &Emulator| emu.heartbeats(&child.ws.id)["count"].as_u64().unwrap();
    let after = |n: u64| {
        wait_until(WAIT, "more heartbeats", &c, || {
            (beats(&emu) >= n).then_some(())
        });
    };
    after(beats(&emu) + 3);
    let looks = broadcast_looks(&emu);
    after(beats(&emu) + 3);
    assert_eq!(
        broadcast_looks(&emu),
        looks,
        "a look while idle with the stream up"
    );
    // A long broadcast arrives whole (the row's summary is cut at 120 characters).
    let long = format!("release notes: {}", "word ".repeat(40).trim_end());
    assert_eq!(root.run(&["broadcast", &long]).code, 0);
    let seen = wait_until(WAIT, "the broadcast at the backend", &c, || {
        let l = lines(&log);
        (!l.is_empty()).then_some(l)
    });
    assert_eq!(seen, [format!("broadcast||[]|{long}")]);
}
