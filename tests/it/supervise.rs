//! Supervisors and fleets (issue 16): the systemd notify protocol against a datagram
//! socket the test owns (path and abstract), the watchdog following the poll loop,
//! s6 readiness on a notification fd, and the Prometheus metrics file.

use std::collections::BTreeMap;
use std::io::Read;
use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::support::*;

/// The systemd side of `NOTIFY_SOCKET`.
struct NotifyListener {
    sock: UnixDatagram,
    /// What to put in `NOTIFY_SOCKET`.
    name: String,
}

impl NotifyListener {
    fn at_path(dir: &TempDir) -> NotifyListener {
        let path = dir.path().join("notify.sock");
        NotifyListener {
            sock: UnixDatagram::bind(&path).unwrap(),
            name: path.display().to_string(),
        }
    }

    fn abstract_name() -> NotifyListener {
        use std::os::linux::net::SocketAddrExt;
        let name = format!("molecule-it-{}", molecule::uuid::new_v4());
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        NotifyListener {
            sock: UnixDatagram::bind_addr(&addr).unwrap(),
            name: format!("@{name}"),
        }
    }

    /// The next datagram within `within`, if any.
    fn next(&self, within: Duration) -> Option<String> {
        self.sock.set_read_timeout(Some(within)).unwrap();
        let mut buf = [0u8; 4096];
        match self.sock.recv(&mut buf) {
            Ok(n) => Some(String::from_utf8_lossy(&buf[..n]).into_owned()),
            Err(_) => None,
        }
    }

    /// Datagrams up to and including the first with a `STATUS=` line starting `prefix`.
    fn until_status(&self, prefix: &str, c: &Connector) -> Vec<String> {
        let deadline = Instant::now() + WAIT;
        let mut seen = Vec::new();
        while Instant::now() < deadline {
            if let Some(m) = self.next(Duration::from_millis(200)) {
                let hit = m.lines().any(|l| {
                    l.strip_prefix("STATUS=")
                        .is_some_and(|s| s.starts_with(prefix))
                });
                seen.push(m);
                if hit {
                    return seen;
                }
            }
        }
        panic!(
            "no STATUS={prefix}... within {WAIT:?}; got {seen:?}; connector stderr:\n{}",
            c.stderr()
        );
    }

    /// Datagrams up to and including the first with the line `line`.
    fn until(&self, line: &str, c: &Connector) -> Vec<String> {
        let deadline = Instant::now() + WAIT;
        let mut seen = Vec::new();
        while Instant::now() < deadline {
            if let Some(m) = self.next(Duration::from_millis(200)) {
                let hit = m.lines().any(|l| l == line);
                seen.push(m);
                if hit {
                    return seen;
                }
            }
        }
        panic!(
            "no {line} within {WAIT:?}; got {seen:?}; connector stderr:\n{}",
            c.stderr()
        );
    }
}

fn registers(emu: &Emulator, ws: &str) -> u64 {
    emu.get(&format!("/_admin/workspaces/{ws}/registers"))["count"]
        .as_u64()
        .unwrap()
}

/// The next `n` polls of `ws` answer 503.
fn refuse_polls(emu: &Emulator, ws: &str, n: u64) {
    emu.fault(
        json!({"method": "GET", "path_prefix": format!("/workspaces/{ws}/activity"),
        "status": 503, "count": n}),
    );
}

/// Has the emulator answered an inbox poll (`type=a2a_receive`) of `ws` with 200?
fn inbox_polled(stats: &serde_json::Value, ws: &str) -> bool {
    stats["requests"].as_array().unwrap().iter().any(|r| {
        r["workspace_id"] == ws
            && r["status"] == 200
            && r["path"].as_str().unwrap().ends_with("/activity")
            && r["query"].as_str().unwrap().contains("type=a2a_receive")
    })
}

fn pending_faults(emu: &Emulator) -> usize {
    emu.get("/_admin/faults")["faults"]
        .as_array()
        .map_or(0, Vec::len)
}

#[test]
fn systemd_ready_after_the_first_poll_then_reload_and_stop() {
    let Pair { emu, a, dir, .. } = Test::new().pair();
    // Register works, the first two polls fail: READY must wait for a good poll.
    refuse_polls(&emu, &a.id, 2);
    let listener = NotifyListener::at_path(&dir);
    let mut c = Connector::start_with_env(
        &emu,
        &a,
        &dir,
        &["--backend", "mock"],
        &[("NOTIFY_SOCKET", &listener.name)],
    );
    let before = listener.until("READY=1", &c);
    // At READY the register and three polls (two refused, one good) had happened.
    assert!(registers(&emu, &a.id) >= 1);
    assert!(emu.route_count(POLL_ROUTE) >= 3, "{before:?}");
    assert!(inbox_polled(&emu.get("/_admin/stats"), &a.id), "{before:?}");
    assert_eq!(pending_faults(&emu), 0);
    let ready = before.last().unwrap();
    assert!(ready.contains("STATUS=polling, "), "{ready:?}");
    assert!(ready.contains(", 0 handled, last error"), "{ready:?}");
    assert!(
        before[..before.len() - 1]
            .iter()
            .all(|m| !m.contains("READY=1")),
        "{before:?}"
    );

    c.signal("HUP");
    let reload = listener.until("RELOADING=1", &c);
    assert_eq!(reload.iter().filter(|m| m.contains("READY=1")).count(), 0);
    listener.until("READY=1", &c);

    c.signal("TERM");
    let stop = listener.until("STOPPING=1", &c);
    let stopping = stop.last().unwrap();
    let extend = stopping
        .lines()
        .find_map(|l| l.strip_prefix("EXTEND_TIMEOUT_USEC="))
        .unwrap_or_else(|| panic!("no EXTEND_TIMEOUT_USEC in {stopping:?}"));
    // --drain-timeout defaults to 30 s: the extension covers it.
    assert!(extend.parse::<u64>().unwrap() >= 30_000_000, "{stopping:?}");
    assert!(c.wait_exit(Duration::from_secs(10)).success());
}

#[test]
fn status_line_says_when_the_event_stream_is_up() {
    let Pair { emu, a, dir, .. } = Test::new().pair();
    let listener = NotifyListener::at_path(&dir);
    let c = Connector::start_with_env(
        &emu,
        &a,
        &dir,
        &["--backend", "mock", "--wake", "auto"],
        &[("NOTIFY_SOCKET", &listener.name)],
    );
    listener.until_status("polling, events connected, 0 handled", &c);
}

#[test]
fn workspaces_ready_once_each_has_polled_or_failed_for_good() {
    let emu = Emulator::start();
    let fleet = Fleet::new(&emu, 3, |_, _| {});
    let ids = &fleet.ids;
    // The first polls fine, the second only after three refusals, the third's token
    // is revoked (it stops for good at register).
    refuse_polls(&emu, &ids[1], 3);
    emu.post(&format!("/_admin/workspaces/{}/revoke", ids[2]), json!({}));
    let listener = NotifyListener::at_path(&fleet.dir);
    let mut c = fleet.connect_with_env(
        &emu,
        &[
            "--backend",
            "mock",
            "-v",
            "--interval-ms",
            "100",
            "--heartbeat-secs",
            "1",
        ],
        &[("NOTIFY_SOCKET", &listener.name)],
    );
    let before = listener.until("READY=1", &c);
    // At READY the slow workspace has polled successfully and the revoked one has
    // given up.
    let stats = emu.get("/_admin/stats");
    assert!(
        inbox_polled(&stats, &ids[0]) && inbox_polled(&stats, &ids[1]),
        "{before:?}"
    );
    assert_eq!(pending_faults(&emu), 0);
    let stopped = format!("workspace {}: stopped", ids[2]);
    wait_until(WAIT, "the revoked workspace's stop in the log", &c, || {
        c.stderr().contains(&stopped).then_some(())
    });
    assert!(
        before
            .last()
            .unwrap()
            .contains("STATUS=2 workspaces, 2 polling"),
        "{before:?}"
    );
    c.signal("TERM");
    listener.until("STOPPING=1", &c);
    c.wait_exit(Duration::from_secs(10));
}

#[test]
fn abstract_socket_and_the_watchdog_stops_while_a_loop_is_blocked() {
    let Pair { emu, a, dir, .. } = Test::new().pair();
    let listener = NotifyListener::abstract_name();
    let c = Connector::start_with_env(
        &emu,
        &a,
        &dir,
        &["--backend", "mock"],
        // Pings every 300 ms.
        &[
            ("NOTIFY_SOCKET", &listener.name),
            ("WATCHDOG_USEC", "600000"),
        ],
    );
    listener.until("READY=1", &c);
    for _ in 0..3 {
        listener.until("WATCHDOG=1", &c);
    }
    // The next poll hangs in the platform for 4 s; then the next heartbeat does.
    for (path, what) in [
        (format!("/workspaces/{}/activity", a.id), "poll"),
        ("/registry/heartbeat".to_string(), "heartbeat"),
    ] {
        emu.fault(json!({"path_prefix": path, "delay_ms": 4000, "count": 1}));
        wait_until(WAIT, &format!("the delayed {what} to start"), &c, || {
            (pending_faults(&emu) == 0).then_some(())
        });
        // While it hangs the pings stop: a whole second without one.
        let deadline = Instant::now() + WAIT;
        loop {
            assert!(
                Instant::now() < deadline,
                "watchdog pings never paused for the {what}; stderr:\n{}",
                c.stderr()
            );
            if listener.next(Duration::from_millis(1000)).is_none() {
                break;
            }
        }
        // And they resume once the call returns.
        listener.until("WATCHDOG=1", &c);
    }
    assert!(
        c.stderr().contains("not pinging the watchdog"),
        "{}",
        c.stderr()
    );
}

#[test]
fn s6_notification_fd_gets_one_newline_after_the_first_poll() {
    let Pair { emu, a, dir, .. } = Test::new().pair();
    refuse_polls(&emu, &a.id, 1);
    // The connector prints nothing on stdout, so its stdout pipe can stand in for the
    // pipe s6-supervise passes as the notification fd.
    let mut c = Connector::start(
        &emu,
        &a,
        &dir,
        &["--backend", "mock", "--notification-fd", "1"],
    );
    let mut stdout = c.take_stdout();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut buf = [0u8; 16];
        while let Ok(n) = stdout.read(&mut buf) {
            if n == 0 || tx.send(buf[..n].to_vec()).is_err() {
                break;
            }
        }
    });
    let got = rx
        .recv_timeout(WAIT)
        .unwrap_or_else(|_| panic!("no readiness line; stderr:\n{}", c.stderr()));
    assert_eq!(got, b"\n");
    assert!(emu.route_count(POLL_ROUTE) >= 2);
    c.stop();
}

/// One sample: metric name and labels (sorted).
type Series = (String, BTreeMap<String, String>);

/// Parses the Prometheus text format (0.0.4), checking its rules line by line: HELP
/// and TYPE at most once per family and before its samples, a family's samples
/// together, valid names, quoted and escaped label values, numeric values, histogram
/// buckets cumulative with `+Inf` equal to `_count`, and a `workspace` label on every
/// series.
fn parse_prometheus(text: &str) -> BTreeMap<Series, f64> {
    assert!(text.is_empty() || text.ends_with('\n'), "{text}");
    let is_name = |s: &str| {
        !s.is_empty()
            && s.chars().enumerate().all(|(i, c)| {
                c == '_' || c == ':' || c.is_ascii_alphabetic() || (i > 0 && c.is_ascii_digit())
            })
    };
    let mut types: BTreeMap<String, String> = BTreeMap::new();
    let mut finished: Vec<String> = Vec::new();
    let mut current = String::new();
    let mut out = BTreeMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# ") {
            let mut parts = rest.splitn(3, ' ');
            let (kw, name) = (parts.next().unwrap(), parts.next().unwrap());
            assert!(is_name(name), "{line}");
            if kw == "TYPE" {
                let t = parts.next().unwrap();
                assert!(
                    ["counter", "gauge", "histogram", "summary", "untyped"].contains(&t),
                    "{line}"
                );
                assert!(
                    types.insert(name.to_string(), t.to_string()).is_none(),
                    "{line}"
                );
                assert!(!finished.contains(&name.to_string()), "{line}");
            }
            continue;
        }
        let (name, rest) = line.split_at(line.find(['{', ' ']).unwrap());
        assert!(is_name(name), "{line}");
        let mut labels = BTreeMap::new();
        let mut rest = rest;
        if let Some(mut body) = rest.strip_prefix('{') {
            loop {
                if let Some(after) = body.strip_prefix('}') {
                    rest = after;
                    break;
                }
                let eq = body.find('=').unwrap_or_else(|| panic!("no = in {line}"));
                let key = &body[..eq];
                assert!(is_name(key) && !key.contains(':'), "{line}");
                let after = body[eq + 1..]
                    .strip_prefix('"')
                    .unwrap_or_else(|| panic!("unquoted label in {line}"));
                let mut value = String::new();
                let mut escaped = false;
                let mut close = None;
                for (i, ch) in after.char_indices() {
                    match (escaped, ch) {
                        (true, 'n') => (value.push('\n'), escaped = false).1,
                        (true, '\\' | '"') => (value.push(ch), escaped = false).1,
                        (true, _) => panic!("bad escape in {line}"),
                        (false, '\\') => escaped = true,
                        (false, '"') => {
                            close = Some(i);
                            break;
                        }
                        (false, _) => value.push(ch),
                    }
                }
                let close = close.unwrap_or_else(|| panic!("unterminated label in {line}"));
                assert!(labels.insert(key.to_string(), value).is_none(), "{line}");
                body = &after[close + 1..];
                if let Some(next) = body.strip_prefix(',') {
                    body = next;
                } else {
                    assert!(body.starts_with('}'), "bad label list in {line}");
                }
            }
        }
        assert!(rest.starts_with(' '), "{line}");
        let value = rest.trim_start().split(' ').next().unwrap();
        let v: f64 = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            "NaN" => f64::NAN,
            v => v.parse().unwrap_or_else(|_| panic!("bad value in {line}")),
        };
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| {
                name.strip_suffix(s)
                    .filter(|f| types.get(*f).is_some_and(|t| t == "histogram"))
            })
            .unwrap_or(name)
            .to_string();
        let t = types
            .get(&family)
            .unwrap_or_else(|| panic!("sample before its TYPE: {line}"));
        if t == "counter" {
            assert!(family.ends_with("_total"), "{line}");
            assert!(v >= 0.0, "{line}");
        }
        if family != current {
            assert!(!finished.contains(&family), "family split: {line}");
            if !current.is_empty() {
                finished.push(std::mem::take(&mut current));
            }
            current = family;
        }
        assert!(
            labels.contains_key("workspace"),
            "no workspace label: {line}"
        );
        assert!(
            out.insert((name.to_string(), labels), v).is_none(),
            "duplicate series: {line}"
        );
    }
    // Histograms: cumulative buckets, +Inf == _count.
    for (name, t) in &types {
        if t != "histogram" {
            continue;
        }
        let bucket = format!("{name}_bucket");
        let mut by_ws: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
        for ((n, l), v) in &out {
            if *n == bucket {
                let le = match l["le"].as_str() {
                    "+Inf" => f64::INFINITY,
                    s => s.parse().unwrap(),
                };
                by_ws
                    .entry(l["workspace"].clone())
                    .or_default()
                    .push((le, *v));
            }
        }
        for (ws, mut b) in by_ws {
            b.sort_by(|x, y| x.0.partial_cmp(&y.0).unwrap());
            assert!(b.windows(2).all(|w| w[0].1 <= w[1].1), "{name}: {b:?}");
            let count = out[&(format!("{name}_count"), ws_labels(&ws))];
            assert_eq!(b.last().unwrap(), &(f64::INFINITY, count), "{name}");
        }
    }
    out
}

/// A mock connector for `ws` writing `--metrics-file file`.
fn with_metrics_file(
    emu: &Emulator,
    ws: &Ws,
    dir: &std::sync::Arc<TempDir>,
    file: &std::path::Path,
) -> Connector {
    let file_arg = file.display().to_string();
    Connector::start(
        emu,
        ws,
        dir,
        &["--backend", "mock", "--metrics-file", &file_arg],
    )
}

/// `molecule status --format prometheus` for `ws`, from the test's state dir.
fn status_prometheus(dir: &TempDir, ws: &str) -> (i32, String, String) {
    let state_dir = dir.path().join("state").display().to_string();
    run(&[
        "status",
        "--workspace",
        ws,
        "--state-dir",
        &state_dir,
        "--format",
        "prometheus",
    ])
}

fn ws_labels(ws: &str) -> BTreeMap<String, String> {
    BTreeMap::from([("workspace".to_string(), ws.to_string())])
}

fn value(m: &BTreeMap<Series, f64>, name: &str, ws: &str, labels: &[(&str, &str)]) -> f64 {
    let mut l = ws_labels(ws);
    for (k, v) in labels {
        l.insert(k.to_string(), v.to_string());
    }
    *m.get(&(name.to_string(), l.clone()))
        .unwrap_or_else(|| panic!("no {name}{l:?} in {m:?}"))
}

#[test]
fn metrics_file_says_down_after_a_stop_that_gave_up_on_the_poll_thread() {
    let Pair { emu, a, b, dir } = Test::new().pair();
    let file = dir.path().join("molecule.prom");
    let mut c = with_metrics_file(&emu, &a, &dir, &file);
    emu.say(&a.id, Some(&b.id), "hello");
    wait_received(&emu, &b.id, 1, &c);
    let answered = |m: &BTreeMap<Series, f64>| {
        let mut l = ws_labels(&a.id);
        l.insert("outcome".into(), "answered".into());
        m.get(&("molecule_messages_total".to_string(), l)).copied()
    };
    wait_until(WAIT, "the answer in the metrics file", &c, || {
        let m = parse_prometheus(&std::fs::read_to_string(&file).ok()?);
        (answered(&m)? == 1.0).then_some(())
    });
    // The next poll hangs in the platform far past the stop's grace for requests, so
    // the stop gives up on the poll thread before it writes its final status.
    let activity = format!("/workspaces/{}/activity", a.id);
    emu.fault(json!({"path_prefix": activity, "delay_ms": 20_000, "count": 1}));
    wait_until(WAIT, "the delayed poll to start", &c, || {
        (pending_faults(&emu) == 0).then_some(())
    });
    assert!(c.stop().success(), "{}", c.stderr());
    assert!(
        c.stderr().contains("not waiting for them"),
        "{}",
        c.stderr()
    );
    let fin = parse_prometheus(&std::fs::read_to_string(&file).unwrap());
    assert_eq!(value(&fin, "molecule_up", &a.id, &[]), 0.0);
    assert_eq!(answered(&fin), Some(1.0));
    // The status file says stopped, and keeps the counts.
    let (code, out, _) = status_prometheus(&dir, &a.id);
    assert_eq!(code, 1, "{out}");
    let status = parse_prometheus(&out);
    assert_eq!(value(&status, "molecule_up", &a.id, &[]), 0.0);
    assert_eq!(answered(&status), Some(1.0));
}

#[test]
fn prometheus_parser_rejects_broken_text() {
    let ok = "# TYPE a_total counter\na_total{workspace=\"w\",x=\"q\\\"\"} 1\n";
    assert_eq!(parse_prometheus(ok).len(), 1);
    for bad in [
        "a_total{workspace=\"w\"} 1\n",                         // no TYPE
        "# TYPE a_total counter\na_total{workspace=\"w\"} x\n", // value
        "# TYPE a_total counter\na_total 1\n",                  // no workspace
        "# TYPE a gauge\na{workspace=\"w\"} 1\n# TYPE b gauge\nb{workspace=\"w\"} 1\na{workspace=\"v\"} 1\n",
    ] {
        assert!(
            std::panic::catch_unwind(|| parse_prometheus(bad)).is_err(),
            "accepted {bad:?}"
        );
    }
}

#[test]
fn metrics_file_is_prometheus_text_and_counts_match_the_emulator() {
    let Pair { emu, a, b, dir } = Test::new().pair();
    let metrics_dir = dir.path().join("textfile");
    std::fs::create_dir_all(&metrics_dir).unwrap();
    let file = metrics_dir.join("molecule.prom");
    let mut c = with_metrics_file(&emu, &a, &dir, &file);
    for i in 0..3 {
        emu.say(&a.id, Some(&b.id), &format!("peer {i}"));
    }
    for i in 0..2 {
        emu.say(&a.id, None, &format!("canvas {i}"));
    }
    // Every read parses (the file is never seen half-written), counters never go down,
    // and the file is replaced, not rewritten in place.
    let mut last: BTreeMap<Series, f64> = BTreeMap::new();
    let mut inodes = std::collections::BTreeSet::new();
    let read = |last: &mut BTreeMap<Series, f64>, inodes: &mut std::collections::BTreeSet<u64>| {
        use std::os::unix::fs::MetadataExt;
        let Ok(text) = std::fs::read_to_string(&file) else {
            return None;
        };
        if let Ok(meta) = std::fs::metadata(&file) {
            inodes.insert(meta.ino());
        }
        let m = parse_prometheus(&text);
        for ((name, labels), v) in last.iter() {
            if name.ends_with("_total") || name.ends_with("_count") || name.ends_with("_bucket") {
                let now = m
                    .get(&(name.clone(), labels.clone()))
                    .copied()
                    .unwrap_or(0.0);
                assert!(now >= *v, "{name}{labels:?} went from {v} to {now}");
            }
        }
        *last = m.clone();
        Some(m)
    };
    wait_until(WAIT, "5 answers in the metrics file", &c, || {
        let m = read(&mut last, &mut inodes)?;
        let answered = m.get(&(
            "molecule_messages_total".to_string(),
            BTreeMap::from([
                ("workspace".to_string(), a.id.clone()),
                ("outcome".to_string(), "answered".to_string()),
            ]),
        ))?;
        (*answered == 5.0).then_some(())
    });
    assert_eq!(emu.received(&b.id).len(), 3);
    assert_eq!(emu.notifies(&a.id).len(), 2);
    assert!(inodes.len() >= 2, "the file was never replaced: {inodes:?}");
    let live = read(&mut last, &mut inodes).unwrap();
    assert_eq!(value(&live, "molecule_up", &a.id, &[]), 1.0);

    // `status --format prometheus` renders the same document (and exits 0 while fresh).
    let (code, out, err) = status_prometheus(&dir, &a.id);
    assert_eq!(code, 0, "{err}");
    let status = parse_prometheus(&out);
    assert_eq!(value(&status, "molecule_up", &a.id, &[]), 1.0);
    assert!(
        value(
            &status,
            "molecule_messages_total",
            &a.id,
            &[("outcome", "answered")]
        ) <= 5.0
    );

    assert!(c.stop().success());
    let fin = read(&mut last, &mut inodes).unwrap();
    let v = |name: &str, labels: &[(&str, &str)]| value(&fin, name, &a.id, labels);
    assert_eq!(v("molecule_up", &[]), 0.0);
    assert_eq!(
        v("molecule_messages_total", &[("outcome", "answered")]),
        5.0
    );
    assert_eq!(
        v("molecule_messages_total", &[("outcome", "dead_lettered")]),
        0.0
    );
    assert_eq!(
        v("molecule_messages_total", &[("outcome", "failed_attempt")]),
        0.0
    );
    assert_eq!(v("molecule_replies_total", &[("to", "peer")]), 3.0);
    assert_eq!(v("molecule_replies_total", &[("to", "canvas")]), 2.0);
    assert_eq!(v("molecule_reply_resends_total", &[]), 0.0);
    assert_eq!(v("molecule_backend_seconds_count", &[]), 5.0);
    assert_eq!(v("molecule_inbound_to_reply_seconds_count", &[]), 5.0);
    assert_eq!(v("molecule_in_flight", &[]), 0.0);
    assert_eq!(v("molecule_wedged", &[]), 0.0);
    assert_eq!(v("molecule_rate_limited_total", &[]), 0.0);
    assert!(v("molecule_last_poll_timestamp_seconds", &[]) > 1.7e9);
    assert!(v("molecule_last_heartbeat_timestamp_seconds", &[]) > 1.7e9);
    let version = env!("CARGO_PKG_VERSION");
    assert!(fin.keys().any(|(n, l)| n == "molecule_build_info"
        && l.get("version").map(String::as_str) == Some(version)
        && l.contains_key("commit")
        && l.contains_key("target")));
    // Every request the emulator served is counted once, under its route pattern.
    let stats = emu.get("/_admin/stats");
    let mut ours: BTreeMap<String, f64> = BTreeMap::new();
    for ((n, l), v) in &fin {
        if n == "molecule_requests_total" {
            assert!(!l["endpoint"].contains(&a.id), "{l:?}");
            *ours.entry(l["endpoint"].clone()).or_default() += v;
        }
    }
    let theirs: BTreeMap<String, f64> = stats["by_route"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.as_f64().unwrap()))
        .collect();
    assert_eq!(ours, theirs);
    assert_eq!(ours["POST /workspaces/:id/a2a"], 3.0);
    assert_eq!(ours["POST /workspaces/:id/notify"], 2.0);
    // Nothing but the file itself is left in the textfile directory.
    let names: Vec<String> = std::fs::read_dir(&metrics_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, ["molecule.prom"]);
    // Readable by node_exporter, which usually runs as another user.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&file).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o644);

    // After the stop, the status command's metrics say down, with the same counts.
    let (code, out, _) = status_prometheus(&dir, &a.id);
    assert_eq!(code, 1);
    let status = parse_prometheus(&out);
    assert_eq!(value(&status, "molecule_up", &a.id, &[]), 0.0);
    assert_eq!(
        value(
            &status,
            "molecule_messages_total",
            &a.id,
            &[("outcome", "answered")]
        ),
        5.0
    );
}
