//! Issue 11: hardening from a hostile review. A full state disk, planted symlinks,
//! corrupt journals, odd token files and arguments, hostile servers.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use serde_json::{Value, json};

use crate::support::*;

/// A tiny tmpfs mounted for one test (root only); unmounted on drop.
struct TinyFs(PathBuf);

impl TinyFs {
    /// `None` (with the reason printed) where the test cannot mount one.
    fn mount(at: &Path, size: &str) -> Option<TinyFs> {
        std::fs::create_dir_all(at).ok()?;
        let out = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(at)
            .output()
            .ok()?;
        if !out.status.success() {
            eprintln!(
                "skipping the full-disk test: cannot mount a tmpfs ({})",
                String::from_utf8_lossy(&out.stderr).trim()
            );
            return None;
        }
        Some(TinyFs(at.to_path_buf()))
    }

    /// Fills the filesystem to the last byte with `filler`.
    fn fill(&self) {
        let mut f = std::fs::File::create(self.0.join("filler")).unwrap();
        let block = vec![0u8; 4096];
        while f.write_all(&block).is_ok() {}
        let one = [0u8; 1];
        while f.write_all(&one).is_ok() {}
        let _ = f.sync_all();
    }

    fn free(&self) {
        std::fs::remove_file(self.0.join("filler")).unwrap();
    }
}

impl Drop for TinyFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

fn last_heartbeat(emu: &Emulator, ws: &str) -> Value {
    emu.heartbeats(ws)["last"].clone()
}

fn status_doc(c: &Connector) -> Option<Value> {
    let p = c
        .dir
        .path()
        .join("state")
        .join(format!("{}.status.json", c.ws.id));
    serde_json::from_slice(&std::fs::read(p).ok()?).ok()
}

/// Replies (peer) whose `in_reply_to` is `message_id`.
fn replies_to(emu: &Emulator, peer: &str, message_id: &str) -> usize {
    emu.received(peer)
        .iter()
        .filter(|m| m["metadata"]["in_reply_to"] == message_id && m["duplicate"] != true)
        .count()
}

/// Waits until the journal is empty (everything folded into the state file).
fn wait_checkpointed(c: &Connector) {
    let journal = c
        .dir
        .path()
        .join("state")
        .join(format!("{}.journal", c.ws.id));
    wait_until(WAIT, "a checkpoint", c, || {
        let empty = std::fs::metadata(&journal).is_ok_and(|m| m.len() == 0);
        let has_cursor = c.state()["last_since_id"]
            .as_str()
            .is_some_and(|s| !s.is_empty());
        (empty && has_cursor).then_some(())
    });
}

#[test]
fn a_full_state_disk_stops_intake_and_loses_nothing() {
    let Pair { emu, a, b, dir } = Test::new().pair();
    let Some(disk) = TinyFs::mount(&dir.path().join("state"), "64k") else {
        return;
    };
    let args = ["--backend", "mock"];
    let mut c = Connector::start(&emu, &a, &dir, &args);
    let first = emu.enqueue(&a.id, json!({"from": b.id, "text": "before"}));
    let first_id = first["message_id"].as_str().unwrap().to_string();
    wait_until(WAIT, "the first reply", &c, || {
        (replies_to(&emu, &b.id, &first_id) == 1).then_some(())
    });

    // Disk full (after a checkpoint, so the next journal record needs a new block):
    // the next message is not answered, the heartbeat says wedged, and the status
    // file says why.
    wait_checkpointed(&c);
    disk.fill();
    let second = emu.enqueue(&a.id, json!({"from": b.id, "text": "during"}));
    let second_id = second["message_id"].as_str().unwrap().to_string();
    wait_until(WAIT, "a wedged heartbeat", &c, || {
        let hb = last_heartbeat(&emu, &a.id);
        (hb["runtime_state"] == "wedged").then_some(hb)
    });
    let hb = last_heartbeat(&emu, &a.id);
    assert!(
        hb["sample_error"]
            .as_str()
            .unwrap()
            .contains("state not saved"),
        "{hb}"
    );
    wait_until(WAIT, "state_error in the status file", &c, || {
        status_doc(&c).filter(|d| d["state_error"].is_string())
    });
    let (code, out, _) = run(&[
        "status",
        "--json",
        "--workspace",
        &a.id,
        "--state-dir",
        dir.path().join("state").to_str().unwrap(),
    ]);
    assert_ne!(code, 0, "{out}");
    assert!(out.contains("state cannot be written"), "{out}");
    assert_eq!(replies_to(&emu, &b.id, &second_id), 0, "{}", c.stderr());

    // Space returns: it resumes by itself and answers exactly once.
    disk.free();
    wait_until(WAIT, "the reply after space returned", &c, || {
        (replies_to(&emu, &b.id, &second_id) == 1).then_some(())
    });
    wait_until(WAIT, "a recovered heartbeat", &c, || {
        (last_heartbeat(&emu, &a.id)["runtime_state"] == "").then_some(())
    });

    // Full again, then SIGTERM: exit non-zero saying what was not saved; after a
    // restart with space the message is answered once, the others not again.
    wait_checkpointed(&c);
    disk.fill();
    let third = emu.enqueue(&a.id, json!({"from": b.id, "text": "at stop"}));
    let third_id = third["message_id"].as_str().unwrap().to_string();
    wait_until(WAIT, "a wedged heartbeat again", &c, || {
        (last_heartbeat(&emu, &a.id)["runtime_state"] == "wedged").then_some(())
    });
    let status = c.stop();
    assert_eq!(status.code(), Some(1), "{}", c.stderr());
    assert!(
        c.stderr().contains("stopped without saving the state"),
        "{}",
        c.stderr()
    );
    assert!(!c.stderr().contains("stopped cleanly"), "{}", c.stderr());
    assert_eq!(replies_to(&emu, &b.id, &third_id), 0);
    disk.free();
    let c = Connector::start(&emu, &a, &dir, &args);
    wait_until(WAIT, "the reply after the restart", &c, || {
        (replies_to(&emu, &b.id, &third_id) == 1).then_some(())
    });
    emu.wait_polls(3, &c);
    for id in [&first_id, &second_id, &third_id] {
        assert_eq!(replies_to(&emu, &b.id, id), 1, "{id}");
    }
}

/// Unix microseconds now, for `created_at` of enqueued rows.
fn now_us() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_micros() as i64
}

#[test]
fn a_cold_start_reads_its_whole_window_oldest_first() {
    let Pair { emu, a, b, dir } = Test::new().pair();
    // 700 messages in the window, more than one 500-row page; rows 150..=260 share
    // one timestamp, so the first page ends in the middle of them.
    let base = now_us() - 60_000_000;
    let messages: Vec<Value> = (0..700)
        .map(|i| {
            let at = if (150..=260).contains(&i) { 150 } else { i };
            json!({"from": b.id, "text": format!("c{i:03}"),
                   "created_at": molecule::timestamp::rfc3339(base + at * 1000)})
        })
        .collect();
    let v = emu.post(
        &format!("/_admin/workspaces/{}/enqueue_batch", a.id),
        json!({ "messages": messages }),
    );
    assert_eq!(v["results"].as_array().unwrap().len(), 700, "{v}");
    let mut c = Connector::start(
        &emu,
        &a,
        &dir,
        &["--backend", "mock", "--since-secs", "600", "--once"],
    );
    let status = c.wait_exit(WAIT * 3);
    assert_eq!(status.code(), Some(0), "{}", c.stderr());
    let texts: Vec<String> = emu
        .received(&b.id)
        .iter()
        .filter(|m| m["duplicate"] != true)
        .map(|m| m["text"].as_str().unwrap_or("").to_string())
        .collect();
    let expected: Vec<String> = (0..700).map(|i| format!("echo: c{i:03}")).collect();
    assert_eq!(texts.len(), 700, "{}", c.stderr());
    assert_eq!(texts, expected, "every row once, oldest first");
    assert!(
        c.stderr().contains("reading the whole window"),
        "{}",
        c.stderr()
    );
}

const PEER: &str = "22222222-2222-4222-8222-222222222222";

#[test]
fn message_text_starting_with_a_dash_is_never_help() {
    let dir = TempDir::new();
    let tok = dir.path().join("token");
    write_secret(&tok, "t0k3n");
    let tok = tok.to_str().unwrap();
    let base = [
        "--api-url",
        "http://127.0.0.1:9",
        "--token-file",
        tok,
        "--workspace",
        PEER,
    ];
    for cmd in [&["send", PEER][..], &["notify"], &["delegate", PEER]] {
        for text in ["-hello", "-h1", "-vh"] {
            for json in [false, true] {
                let mut argv: Vec<&str> = base.to_vec();
                if json {
                    argv.push("--json");
                }
                argv.extend(cmd);
                argv.push(text);
                let (code, out, err) = run(&argv);
                assert_eq!(code, 2, "{argv:?}: {out}{err}");
                assert!(!out.contains("Usage:"), "{argv:?}: {out}");
                assert!(err.contains("put -- before it"), "{argv:?}: {err}");
                if json {
                    let v: Value = serde_json::from_str(&out).unwrap();
                    assert_eq!(v["ok"], false);
                    assert_eq!(v["exit_code"], 2);
                }
            }
        }
    }
}

#[test]
fn json_failures_are_one_document_parse_errors_included() {
    for argv in [
        &["--json", "peers", "--query"][..],
        &["--json", "send", PEER, "hi", "--budget", "abc"],
        &["--json", "heartbeat", "--active-tasks", "-1"],
        &["--json", "info", PEER, "extra"],
        &["--json", "frobnicate"],
        &["delegations", "--json", "--status", "bogus"],
    ] {
        let (code, out, err) = run(argv);
        assert_eq!(code, 2, "{argv:?}: {err}");
        let v: Value =
            serde_json::from_str(&out).unwrap_or_else(|e| panic!("{argv:?}: {e}: {out}"));
        assert_eq!(v["ok"], false, "{argv:?}");
        assert_eq!(v["exit_code"], 2, "{argv:?}");
        assert!(v["error"].as_str().is_some_and(|e| !e.is_empty()));
        assert_eq!(out.lines().count(), 1);
    }
}

#[test]
fn small_cli_items() {
    let dir = TempDir::new();
    let tok = dir.path().join("token");
    write_secret(&tok, "t0k3n");
    let tok = tok.to_str().unwrap();
    let (code, _, err) = run(&["delegations", "--status", "bogus"]);
    assert_eq!(code, 2);
    assert!(
        err.contains("pending, dispatched, queued, in_progress, stuck, completed, failed"),
        "{err}"
    );
    let (code, _, err) = run(&["heartbeat", "--active-tasks", "99999999999"]);
    assert_eq!(code, 2);
    assert!(err.contains("out of range (at most 4294967295)"), "{err}");
    let (code, _, err) = run(&[
        "connect",
        PEER,
        "--api-url",
        "http://127.0.0.1:70000",
        "--token-file",
        tok,
        "--dry-run",
    ]);
    assert_eq!(code, 2);
    assert!(err.contains("not a port number"), "{err}");
    // A state dir that is a file, or shared with others, is refused at start.
    let file = dir.path().join("plain");
    std::fs::write(&file, "").unwrap();
    let shared = dir.path().join("shared");
    std::fs::create_dir(&shared).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o777)).unwrap();
    for (state, want) in [
        (&file, "state dir is not a writable directory"),
        (&shared, "chmod 700"),
    ] {
        let (code, _, err) = run(&[
            "connect",
            PEER,
            "--api-url",
            "http://127.0.0.1:9",
            "--token-file",
            tok,
            "--state-dir",
            state.to_str().unwrap(),
            "--backend",
            "mock",
        ]);
        assert_eq!(code, 2, "{err}");
        assert!(err.contains(want), "{err}");
    }
    // The scripts find the binaries where cargo put them.
    let out = Command::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/scripts/target-dir.sh"
    ))
    .env("CARGO_TARGET_DIR", "/elsewhere/target")
    .output()
    .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "/elsewhere/target"
    );
}

#[test]
fn token_files_are_read_carefully() {
    let Pair { emu, a, .. } = Test::new().pair();
    let dir = TempDir::new();
    let state = dir.path().join("state");
    let connect = |token_file: &str| {
        run(&[
            "connect",
            &a.id,
            "--api-url",
            &emu.url,
            "--token-file",
            token_file,
            "--state-dir",
            state.to_str().unwrap(),
            "--backend",
            "mock",
            "--once",
        ])
    };
    let (code, _, err) = connect("/dev/zero");
    assert_eq!(code, 2);
    assert!(err.contains("not a regular file"), "{err}");
    let bad = dir.path().join("bad");
    write_secret(&bad, &format!("{}\u{e9}", a.token));
    let (code, _, err) = connect(bad.to_str().unwrap());
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("non-ASCII character"), "{err}");
    assert!(!err.contains(&a.token), "the token is never printed");
    // An editor's byte-order mark is stripped, with a note; group-readable warns.
    let bom = dir.path().join("bom");
    write_secret(&bom, &format!("\u{feff}{}\n", a.token));
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&bom, std::fs::Permissions::from_mode(0o640)).unwrap();
    let (code, _, err) = connect(bom.to_str().unwrap());
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("byte-order mark"), "{err}");
    assert!(err.contains("readable by group or others"), "{err}");
}

use crate::support::hostile::{Answer, Hostile};

const REGISTERED: &str = r#"{"status":"registered","delivery_mode":"poll"}"#;

/// `molecule connect` against a hostile server, with a token file in `dir`.
fn connect_to(url: &str, dir: &Arc<TempDir>, extra: &[&str]) -> Connector {
    let ws = Ws {
        id: PEER.into(),
        token: "t0k3n".into(),
    };
    let tok = dir.path().join("token");
    write_secret(&tok, &ws.token);
    let mut cmd = molecule();
    cmd.args(["connect", PEER, "--api-url", url, "--backend", "mock", "-v"])
        .arg("--token-file")
        .arg(&tok)
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .args(extra);
    Connector::spawn(cmd, dir, &ws)
}

#[test]
fn redirects_are_reported_with_their_location_and_exit_2() {
    let server = Hostile::start(|_, path| {
        Answer::Json(
            301,
            vec![("location", format!("https://moved.example{path}"))],
            String::new(),
        )
    });
    let dir = Arc::new(TempDir::new());
    let mut c = connect_to(&server.url, &dir, &[]);
    let status = c.wait_exit(WAIT);
    let err = c.stderr();
    assert_eq!(status.code(), Some(2), "{err}");
    assert!(
        err.contains("the platform moved: use --api-url https://moved.example"),
        "{err}"
    );
    // One register, never re-tried in a loop, never followed.
    assert_eq!(server.seen().len(), 1, "{:?}", server.seen());
    let (code, _, err) = run(&[
        "info",
        "--api-url",
        &server.url,
        "--workspace",
        PEER,
        "--token-file",
        dir.path().join("token").to_str().unwrap(),
    ]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("HTTP 301 redirect to https://moved.example/workspaces/"),
        "{err}"
    );
}

#[test]
fn sigterm_stops_on_time_when_the_platform_drips() {
    let server = Hostile::start(|_, path| {
        if path.starts_with("/registry/register") {
            Answer::Json(200, vec![], REGISTERED.into())
        } else if path.starts_with("/registry/heartbeat") {
            Answer::Json(200, vec![], "{}".into())
        } else {
            Answer::Drip(1 << 20)
        }
    });
    let dir = Arc::new(TempDir::new());
    let mut c = connect_to(&server.url, &dir, &["--drain-timeout", "30"]);
    wait_until(WAIT, "a poll", &c, || {
        server
            .seen()
            .iter()
            .any(|r| r.contains("/activity"))
            .then_some(())
    });
    c.signal("TERM");
    // Failure bound only: far below the 30 s drain and the 30 s request timeout.
    let status = c.wait_exit(std::time::Duration::from_secs(15));
    let err = c.stderr();
    assert_eq!(status.code(), Some(0), "{err}");
    assert!(!err.contains("waiting up to"), "no backend ran: {err}");
    assert!(err.contains("not waiting for them"), "{err}");
}

#[test]
fn once_gives_up_on_full_pages_that_never_move_the_cursor() {
    let page = |n: usize| {
        let rows: Vec<Value> = (0..n)
            .map(|i| {
                json!({"id": format!("00000000-0000-4000-8000-{i:012}"), "activity_type": "a2a_receive",
                       "method": "notify", "source_id": null, "created_at": "2026-01-01T00:00:00Z"})
            })
            .collect();
        Value::Array(rows).to_string()
    };
    let server = Hostile::start(move |_, path| {
        if path.starts_with("/registry/register") {
            Answer::Json(200, vec![], REGISTERED.into())
        } else if path.starts_with("/registry/heartbeat") {
            Answer::Json(200, vec![], "{}".into())
        } else {
            // A full page of the same rows whatever the cursor.
            let limit = path
                .split(['?', '&'])
                .find_map(|kv| kv.strip_prefix("limit="))
                .and_then(|l| l.parse().ok())
                .unwrap_or(100);
            Answer::Json(200, vec![], page(limit))
        }
    });
    let dir = Arc::new(TempDir::new());
    let mut c = connect_to(&server.url, &dir, &["--once", "--interval-ms", "50"]);
    let status = c.wait_exit(WAIT);
    let err = c.stderr();
    assert_eq!(status.code(), Some(75), "{err}");
    assert!(err.contains("do not move the cursor"), "{err}");
}

#[test]
fn a_private_ca_works_with_ca_file_and_bad_certificates_are_exit_2() {
    let dir = TempDir::new();
    let d = dir.path();
    let openssl = |args: &[&str]| {
        Command::new("openssl")
            .args(args)
            .current_dir(d)
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false)
    };
    std::fs::write(
        d.join("ext"),
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    let made = openssl(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=Test CA",
    ]) && openssl(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "leaf.key",
        "-out",
        "leaf.csr",
        "-subj",
        "/CN=127.0.0.1",
    ]) && openssl(&[
        "x509",
        "-req",
        "-in",
        "leaf.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "leaf.pem",
        "-days",
        "2",
        "-extfile",
        "ext",
    ]);
    if !made {
        eprintln!("skipping the private-CA test: openssl is not available");
        return;
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut server = Command::new("openssl")
        .args([
            "s_server",
            "-quiet",
            "-www",
            "-accept",
            &port.to_string(),
            "-cert",
            "leaf.pem",
            "-key",
            "leaf.key",
        ])
        .current_dir(d)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let url = format!("https://127.0.0.1:{port}");
    let tok = d.join("token");
    write_secret(&tok, "t0k3n");
    let info = |extra: &[&str], env: &[(&str, &str)]| {
        let mut run = Run::new(&["info", "--api-url", &url, "--workspace", PEER])
            .arg("--token-file")
            .arg(&tok)
            .args(extra);
        for (k, v) in env {
            run = run.env(k, v);
        }
        let o = run.out();
        (Some(o.code), o.err)
    };
    // Wait until the server answers the handshake at all.
    let (code, err) = eventually("the TLS server to answer the handshake", || {
        let r = info(&[], &[]);
        r.1.contains("certificate").then_some(r)
    });
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("--ca-file"), "{err}");
    // With the CA the handshake succeeds; the answer is s_server's HTML, not JSON.
    let ca = d.join("ca.pem");
    let ca = ca.to_str().unwrap();
    for (extra, env) in [
        (&["--ca-file", ca][..], &[][..]),
        (&[], &[("MOLECULE_CA_FILE", ca)]),
        (&[], &[("SSL_CERT_FILE", ca)]),
    ] {
        let (code, err) = info(extra, env);
        assert_eq!(code, Some(1), "{extra:?} {env:?}: {err}");
        assert!(err.contains("unreadable answer"), "{err}");
    }
    // The wrong host name is a configuration error too.
    let out = Run::new(&["info", "--api-url", &format!("https://localhost:{port}")])
        .args(&["--workspace", PEER, "--token-file"])
        .arg(&tok)
        .args(&["--ca-file", ca])
        .out();
    assert_eq!(out.code, 2, "{out:?}");
    assert!(out.err.contains("not valid for name"), "{out:?}");
    let _ = server.kill();
    let _ = server.wait();
    // An https:// URL on a plain-HTTP port says so.
    let emu = Emulator::start();
    let plain = emu.url.replace("http://", "https://");
    let out = Run::new(&[
        "info",
        "--api-url",
        &plain,
        "--workspace",
        PEER,
        "--token-file",
    ])
    .arg(&tok)
    .out();
    let err = &out.err;
    assert_eq!(out.code, 2, "{err}");
    assert!(err.contains("plain-HTTP port"), "{err}");
}

#[test]
fn after_a_forced_stop_status_says_forced() {
    let Connected {
        emu,
        a,
        b,
        dir,
        mut c,
    } = Test::new().exec("sleep 1000").connect();
    emu.say(&a.id, Some(&b.id), "take your time");
    wait_until(WAIT, "the backend to run", &c, || {
        status_doc(&c).filter(|d| d["active_tasks"] == 1)
    });
    c.signal("TERM");
    wait_until(WAIT, "the stop to begin", &c, || {
        c.stderr().contains("running backend").then_some(())
    });
    c.signal("TERM");
    c.wait_exit(WAIT);
    let (code, out, err) = run(&[
        "status",
        "--workspace",
        &a.id,
        "--state-dir",
        dir.path().join("state").to_str().unwrap(),
    ]);
    assert_ne!(code, 0);
    assert!(
        format!("{out}{err}").contains("stopped (forced)"),
        "{out}{err}"
    );
}

#[test]
fn connect_checks_the_exec_command_before_the_first_message() {
    let Pair { emu, a, b, .. } = Test::new().pair();
    emu.say(&a.id, Some(&b.id), "hello");
    let dir = TempDir::new();
    let tok = dir.path().join("token");
    write_secret(&tok, &a.token);
    let (code, _, err) = run(&[
        "connect",
        &a.id,
        "--api-url",
        &emu.url,
        "--token-file",
        tok.to_str().unwrap(),
        "--state-dir",
        dir.path().join("state").to_str().unwrap(),
        "--backend",
        "exec",
        "--backend-opt",
        "cmd=my-agent.sh",
        "--once",
    ]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("my-agent.sh"), "{err}");
    // Nothing was taken, nothing was told to the sender.
    assert!(emu.received(&b.id).is_empty());
}

#[test]
fn a_journaled_canvas_reply_already_shown_is_not_shown_again() {
    let Pair { emu, a, dir, .. } = Test::new().pair();
    let state = dir.path().join("state");
    std::fs::create_dir_all(&state).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o700)).unwrap();
    let tok = dir.path().join("token");
    write_secret(&tok, &a.token);
    // Two canvas messages whose replies were journaled before a kill; the first
    // reply reached the canvas (its echo is in the inbox), the second did not.
    let shown = emu.say(&a.id, None, "first");
    let lost = emu.say(&a.id, None, "second");
    let at = now_us() - 1000;
    let mut journal = String::new();
    for (row, text) in [(&shown, "echo: first"), (&lost, "echo: second")] {
        journal.push_str(
            &json!({"t": "reply", "row": row, "reply": {"text": text, "at_us": at}}).to_string(),
        );
        journal.push('\n');
    }
    let jp = state.join(format!("{}.journal", a.id));
    std::fs::write(&jp, journal).unwrap();
    std::fs::set_permissions(&jp, std::fs::Permissions::from_mode(0o600)).unwrap();
    let (code, _, err) = run(&[
        "notify",
        "echo: first",
        "--api-url",
        &emu.url,
        "--workspace",
        &a.id,
        "--token-file",
        tok.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{err}");
    let mut c = Connector::start(&emu, &a, &dir, &["--backend", "mock", "--once"]);
    assert_eq!(c.wait_exit(WAIT).code(), Some(0), "{}", c.stderr());
    let notes = emu.notify_texts(&a.id);
    assert_eq!(notes, ["echo: first", "echo: second"], "{}", c.stderr());
    assert!(c.stderr().contains("already shown"), "{}", c.stderr());
}

/// The agent of the orphan tests. Its first run records its shell's pid and its
/// child's in `$TEST_DIR/first`, then waits for ever; a later run appends the ones
/// still running to `$TEST_DIR/alive`, counts itself in `$TEST_DIR/runs` and answers.
const ORPHAN_AGENT: &str = r#"#!/bin/sh
d="$TEST_DIR"
if [ ! -e "$d/first" ]; then
  sleep 1000 &
  echo "$$ $!" > "$d/first.tmp" && mv "$d/first.tmp" "$d/first"
  wait
  exit 0
fi
for p in $(cat "$d/first"); do
  s=$(cut -d' ' -f3 "/proc/$p/stat" 2>/dev/null)
  case "$s" in ''|Z|X) ;; *) echo "$p $s" >> "$d/alive" ;; esac
done
echo run >> "$d/runs"
echo "answered: $(cat)"
"#;

/// Item 4 for `backend`, run with `--backend-opt <opt><agent path>`.
fn no_orphan_after_kill_9(backend: &str, opt: &str) {
    use std::os::unix::fs::PermissionsExt;
    let Pair { emu, a, b, dir } = Test::new().pair();
    let agent = dir.path().join("agent.sh");
    std::fs::write(&agent, ORPHAN_AGENT).unwrap();
    std::fs::set_permissions(&agent, std::fs::Permissions::from_mode(0o755)).unwrap();
    let opt = format!("{opt}{}", agent.display());
    let args = ["--backend", backend, "--backend-opt", &opt];
    let test_dir = dir.path().display().to_string();
    let env = [("TEST_DIR", test_dir.as_str())];
    let mut c = Connector::start_with_env(&emu, &a, &dir, &args, &env);
    emu.say(&a.id, Some(&b.id), "hello");
    let first = dir.path().join("first");
    let old: Vec<u32> = wait_until(WAIT, "the first run to start", &c, || {
        std::fs::read_to_string(&first).ok()
    })
    .split_whitespace()
    .map(|p| p.parse().unwrap())
    .collect();
    let _cleanup = KillOnDrop(old.clone());
    let running = dir.path().join("state").join(format!("{}.running", a.id));
    // The connector records the group just after the spawn returns; the agent may
    // write its file first.
    wait_until(WAIT, "the run's process group recorded", &c, || {
        let record = std::fs::read_to_string(&running).ok()?;
        record
            .contains(&format!("\"pgid\":{}", old[0]))
            .then_some(())
    });
    c.signal("KILL");
    c.wait_exit(WAIT);
    assert!(
        old.iter().all(|p| alive(*p)),
        "the killed connector's backend runs on"
    );

    let mut c = Connector::start_with_env(&emu, &a, &dir, &args, &env);
    let got = wait_received(&emu, &b.id, 1, &c);
    assert_eq!(got[0]["text"], "answered: hello", "{}", c.stderr());
    assert!(
        !dir.path().join("alive").exists(),
        "the old run still ran when the message ran again: {}",
        std::fs::read_to_string(dir.path().join("alive")).unwrap_or_default()
    );
    assert!(old.iter().all(|p| !alive(*p)));
    assert!(
        c.stderr()
            .contains(&format!("ending process group {}", old[0])),
        "{}",
        c.stderr()
    );
    assert_eq!(c.stop().code(), Some(0), "{}", c.stderr());
    let replies = emu
        .received(&b.id)
        .iter()
        .filter(|m| m["duplicate"] != true)
        .count();
    assert_eq!(replies, 1, "answered once");
    let runs = std::fs::read_to_string(dir.path().join("runs")).unwrap();
    assert_eq!(runs.lines().count(), 1, "ran once after the restart");
    let record: Value = serde_json::from_slice(&std::fs::read(&running).unwrap()).unwrap();
    assert_eq!(
        record["groups"],
        json!([]),
        "nothing runs after a clean stop"
    );
}

#[test]
fn an_exec_run_left_by_kill_9_is_ended_before_its_message_runs_again() {
    no_orphan_after_kill_9("exec", "cmd=sh ");
}

#[test]
fn a_claude_code_run_left_by_kill_9_is_ended_before_its_message_runs_again() {
    no_orphan_after_kill_9("claude-code", "bin=");
}

/// The start time of `pid` (field 22 of its stat line).
fn start_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let rest = &stat[stat.rfind(')').unwrap() + 1..];
    rest.split_whitespace().nth(19).unwrap().parse().unwrap()
}

#[test]
fn a_recorded_process_group_that_is_no_longer_ours_is_not_signalled() {
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::process::CommandExt;
    struct Sleeper(std::process::Child);
    impl Drop for Sleeper {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let sleep = |own_group: bool| {
        let mut cmd = Command::new("sleep");
        cmd.arg("1000");
        if own_group {
            cmd.process_group(0);
        }
        Sleeper(cmd.spawn().unwrap())
    };
    let Pair { emu, a, b, dir } = Test::new().pair();
    let state = dir.path().join("state");
    std::fs::create_dir_all(&state).unwrap();
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o700)).unwrap();
    // A group leader whose pid was handed out again since (another start time),
    // and a process with the right start time that leads no group of that id.
    let mut reused = sleep(true);
    let mut no_leader = sleep(false);
    let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap();
    let record = json!({
        "boot_id": boot.trim(),
        "groups": [
            {"pgid": reused.0.id(), "start": start_ticks(reused.0.id()) + 1},
            {"pgid": no_leader.0.id(), "start": start_ticks(no_leader.0.id())},
        ],
    });
    let running = state.join(format!("{}.running", a.id));
    std::fs::write(&running, record.to_string()).unwrap();
    emu.say(&a.id, Some(&b.id), "hello");
    let mut c = Connector::start(&emu, &a, &dir, &["--backend", "mock", "--once"]);
    assert_eq!(c.wait_exit(WAIT).code(), Some(0), "{}", c.stderr());
    assert_eq!(emu.received(&b.id).len(), 1, "{}", c.stderr());
    assert!(
        reused.0.try_wait().unwrap().is_none(),
        "signalled a stranger"
    );
    assert!(
        no_leader.0.try_wait().unwrap().is_none(),
        "signalled a stranger"
    );
    assert_eq!(
        c.stderr().matches("is not signalled").count(),
        2,
        "{}",
        c.stderr()
    );
    assert!(!running.exists());
}

#[test]
fn a_lost_canvas_answer_is_found_behind_more_than_a_page_of_newer_rows() {
    let Pair { emu, a, b, dir } = Test::new().pair();
    // The reply is shown, its answer held back for a while and then lost; meanwhile
    // 600 peer messages arrive, so the echo is not on the newest page any more.
    emu.fault(
        json!({"method": "POST", "path_prefix": format!("/workspaces/{}/notify", a.id),
                     "after": true, "delay_ms": 2000, "drop": true}),
    );
    emu.say(&a.id, None, "shown once");
    let mut c = Connector::start(&emu, &a, &dir, &["--backend", "mock"]);
    wait_until(
        WAIT,
        "the canvas reply shown and its answer held",
        &c,
        || (emu.get("/_admin/faults")["held"].as_u64() > Some(0)).then_some(()),
    );
    let messages: Vec<Value> = (0..600)
        .map(|i| json!({"from": b.id, "text": format!("p{i:03}")}))
        .collect();
    let v = emu.post(
        &format!("/_admin/workspaces/{}/enqueue_batch", a.id),
        json!({ "messages": messages }),
    );
    assert_eq!(v["results"].as_array().unwrap().len(), 600, "{v}");
    wait_until(backlog_wait(600), "600 replies", &c, || {
        let r = emu.received(&b.id);
        (r.len() >= 600).then_some(())
    });
    let notes: Vec<Value> = emu
        .notifies(&a.id)
        .iter()
        .map(|n| n["message"].clone())
        .collect();
    assert_eq!(notes, [json!("echo: shown once")], "{}", c.stderr());
    assert_eq!(c.stop().code(), Some(0));
}

#[test]
fn a_canvas_reply_whose_answer_was_lost_is_not_posted_again() {
    let emu = Emulator::start();
    let (a, _) = emu.pair();
    let dir = Arc::new(TempDir::new());
    let notify = format!("/workspaces/{}/notify", a.id);
    // The platform shows each reply, then the answer is lost: the connection drops,
    // or a gateway answers 502. A 503 before handling is a plain retry.
    for fault in [
        json!({"after": true, "drop": true}),
        json!({"after": true, "status": 502}),
        json!({"status": 503}),
    ] {
        let mut f = fault;
        f["method"] = json!("POST");
        f["path_prefix"] = json!(notify);
        emu.fault(f);
    }
    for text in ["one", "two", "three"] {
        emu.say(&a.id, None, text);
    }
    let mut c = Connector::start(&emu, &a, &dir, &["--backend", "mock"]);
    wait_notifies(&emu, &a.id, 3, &c);
    emu.wait_polls(5, &c);
    let notes = emu.notify_texts(&a.id);
    assert_eq!(
        notes,
        ["echo: one", "echo: two", "echo: three"],
        "{}",
        c.stderr()
    );
    assert_eq!(
        c.stderr().matches("although its answer was lost").count(),
        2,
        "{}",
        c.stderr()
    );
    assert_eq!(c.stop().code(), Some(0));
}

#[test]
fn identical_canvas_replies_are_each_shown_once_when_the_second_answer_is_lost() {
    let Connected { emu, a, mut c, .. } = Test::new().mock().connect();
    let notify = format!("/workspaces/{}/notify", a.id);
    // Two identical replies in a row, each time: the first is shown; the second's
    // answer is lost before the platform handled it (the connection drops, a gateway
    // answers 502), or after it was shown. The first's echo is not the second's.
    let rounds = [
        json!({"drop": true}),
        json!({"status": 502}),
        json!({"after": true, "drop": true}),
    ];
    for (i, second) in rounds.into_iter().enumerate() {
        for mut f in [json!({}), second] {
            f["method"] = json!("POST");
            f["path_prefix"] = json!(notify);
            emu.fault(f);
        }
        emu.say(&a.id, None, "same");
        emu.say(&a.id, None, "same");
        wait_notifies(&emu, &a.id, 2 * (i + 1), &c);
    }
    wait_until(WAIT, "the shown reply's echo found", &c, || {
        c.stderr()
            .contains("although its answer was lost")
            .then_some(())
    });
    emu.wait_polls(5, &c);
    let notes = emu.notify_texts(&a.id);
    assert_eq!(notes, ["echo: same"; 6], "{}", c.stderr());
    assert_eq!(
        c.stderr()
            .matches("are other replies'; posting again")
            .count(),
        2,
        "{}",
        c.stderr()
    );
    assert_eq!(c.stop().code(), Some(0));
}
