//! The event stream end to end: the crate's SSE reader (`molecule::events`) against
//! the emulator's `GET /workspaces/:id/events/stream` with the platform's payloads,
//! quiet periods longer than a read tick, and the stream faults.

use std::time::{Duration, Instant};

use molecule::events::{ACTIVITY_LOGGED, End, EventStream, TICK, WORKSPACE_HEARTBEAT};
use molecule::shutdown::Shutdown;
use molecule::uuid::WorkspaceId;
use molecule::{Client, ClientConfig, Secret};
use serde_json::json;

use crate::support::*;

fn client(emu: &Emulator, ws: &Ws) -> Client {
    let id = WorkspaceId::parse(&ws.id).expect("the emulator's ids are UUIDs");
    Client::new(ClientConfig::new(&emu.url, &id), Secret::new(&ws.token))
}

/// The next event within the test bound (skipping none).
fn next(s: &mut EventStream) -> molecule::events::Event {
    s.next_event()
        .unwrap_or_else(|e| panic!("stream ended: {e}"))
}

#[test]
fn stream_carries_the_platform_events_and_outlives_quiet_ticks() {
    let Pair { emu, a, b, .. } = Test::new().pair();
    let shutdown = Shutdown::new();
    let s = EventStream::open(&client(&emu, &a), &shutdown).unwrap();
    // Quiet for longer than a read tick: the stream waits, it does not end.
    let quiet = s
        .with_deadline(Instant::now() + TICK * 2 + Duration::from_millis(500))
        .next_event();
    assert_eq!(quiet, Err(End::Deadline));
    let mut s = EventStream::open(&client(&emu, &a), &shutdown)
        .unwrap()
        .with_whole_data();
    emu.enqueue(
        &a.id,
        json!({"from": b.id, "text": "hello", "message_id": "m-1"}),
    );
    for summary in ["(ingest)", "(queued for poll)"] {
        let ev = next(&mut s);
        assert_eq!(ev.kind, ACTIVITY_LOGGED);
        assert!(ev.is_inbox_hint());
        assert_eq!(ev.data["message_id"], "m-1");
        assert_eq!(ev.data["source_id"], b.id.as_str());
        assert!(ev.data.get("id").is_none() && ev.data.get("seq").is_none());
        assert!(ev.data["summary"].as_str().unwrap().ends_with(summary));
    }
    let c = client(&emu, &a);
    c.heartbeat(&molecule::Heartbeat {
        workspace_id: a.id.clone(),
        error_rate: 0.0,
        sample_error: String::new(),
        active_tasks: 0,
        current_task: String::new(),
        uptime_seconds: 3,
        runtime_state: None,
        runtime_metadata: json!({}),
    })
    .unwrap();
    let ev = next(&mut s);
    assert_eq!(ev.kind, WORKSPACE_HEARTBEAT);
    assert_eq!(ev.data["uptime_seconds"], 3);
}

#[test]
fn stream_faults_end_the_stream_the_way_the_platform_does() {
    let Pair { emu, a, b, .. } = Test::new().pair();
    let shutdown = Shutdown::new();
    let path = format!("/_admin/workspaces/{}/events", a.id);

    // Silent without closing: only the silence limit notices.
    let mut s = EventStream::open(&client(&emu, &a), &shutdown)
        .unwrap()
        .with_silence_limit(Duration::from_millis(1500));
    emu.post(&path, json!({"silence": true}));
    emu.say(&a.id, Some(&b.id), "lost in silence");
    assert_eq!(
        s.next_event(),
        Err(End::Silent(Duration::from_millis(1500)))
    );

    // Closed: the stream just breaks.
    let mut s = EventStream::open(&client(&emu, &a), &shutdown).unwrap();
    emu.post(&path, json!({"close": true}));
    assert_eq!(s.next_event(), Err(End::Closed));

    // Dropped events leave no gap marker.
    let mut s = EventStream::open(&client(&emu, &a), &shutdown)
        .unwrap()
        .with_whole_data();
    emu.post(&path, json!({"drop_next": 2}));
    emu.say(&a.id, Some(&b.id), "dropped");
    emu.say(&a.id, Some(&b.id), "seen");
    let ev = next(&mut s);
    assert!(
        ev.data["request_body"].to_string().contains("seen"),
        "{ev:?}"
    );
    assert_eq!(emu.get(&path)["dropped"], 2);

    // No stream at all: 404 before the stream starts.
    emu.post(&path, json!({"no_stream": true}));
    let e = EventStream::open(&client(&emu, &a), &shutdown)
        .err()
        .unwrap();
    assert_eq!(e.status(), Some(404));

    // A stop request ends a quiet stream within a tick.
    emu.post(&path, json!({"no_stream": false}));
    let mut s = EventStream::open(&client(&emu, &a), &shutdown).unwrap();
    // The stop comes while the reader waits on the quiet stream (or just before it
    // starts to): either way the reader must end, not wait for data.
    let (reading, started) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        reading.send(()).unwrap();
        s.next_event()
    });
    started.recv().unwrap();
    shutdown.trigger(molecule::shutdown::StopReason::Signal);
    assert_eq!(reader.join().unwrap(), Err(End::Stopped));
}

#[test]
fn older_server_has_no_stream() {
    let Pair { emu, a, .. } = Test::new().emulator(&["--no-event-stream"]).pair();
    let e = EventStream::open(&client(&emu, &a), &Shutdown::new())
        .err()
        .unwrap();
    assert_eq!(e.status(), Some(404));
}
