//! The workspace event stream (§2.17): `GET /workspaces/:id/events/stream` as SSE.
//! A broadcaster in the store fans events out to each workspace's subscribers, each
//! with a 64-event buffer that drops (with no gap marker) when full, as the real
//! server does. The stream starts with `: ping`, then sends one `data:` block per
//! event and nothing at all while idle; it never ends on its own. Faults: no stream
//! (404), a stream that goes silent without closing, streams closed, the next N
//! events dropped.

use std::collections::HashMap;
use std::io::{self, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::time::Duration;

use serde_json::{Value, json};

use crate::ids;

/// Events buffered per subscriber before new ones are dropped (broadcaster.go:159).
pub const BUFFER: usize = 64;
/// How often a stream writer checks whether it was closed by a fault.
const CHECK_EVERY: Duration = Duration::from_millis(100);

/// What one subscriber shares with the broadcaster.
#[derive(Debug, Default)]
struct Flags {
    /// Deliver nothing more, but keep the connection open.
    silent: AtomicBool,
    /// Break the connection.
    closed: AtomicBool,
}

#[derive(Debug)]
struct Subscriber {
    tx: SyncSender<Arc<str>>,
    flags: Arc<Flags>,
}

/// Per-workspace stream settings and counters (admin API).
#[derive(Debug, Default)]
struct Channel {
    subscribers: Vec<Subscriber>,
    /// Answer 404 to new stream requests (an older server).
    no_stream: bool,
    /// Drop this many of the next events for every subscriber.
    drop_next: u64,
    opened: u64,
    published: u64,
    dropped: u64,
}

/// Fan-out of events to stream subscribers, by workspace.
#[derive(Debug, Default)]
pub struct Broadcaster {
    channels: HashMap<String, Channel>,
    /// Every stream refused with 404 (`--no-event-stream`).
    pub no_stream_anywhere: bool,
}

/// One open stream, handed to the connection thread.
#[derive(Debug)]
pub struct Subscription {
    rx: Receiver<Arc<str>>,
    flags: Arc<Flags>,
}

impl Broadcaster {
    /// Whether `ws` may open a stream now.
    pub fn offers_stream(&self, ws: &str) -> bool {
        !self.no_stream_anywhere && !self.channels.get(ws).is_some_and(|c| c.no_stream)
    }

    /// A new subscriber for `ws`'s events.
    pub fn subscribe(&mut self, ws: &str) -> Subscription {
        let (tx, rx) = mpsc::sync_channel(BUFFER);
        let flags = Arc::new(Flags::default());
        let ch = self.channels.entry(ws.to_string()).or_default();
        ch.subscribers
            .retain(|s| !s.flags.closed.load(Ordering::Relaxed));
        ch.subscribers.push(Subscriber {
            tx,
            flags: flags.clone(),
        });
        ch.opened += 1;
        Subscription { rx, flags }
    }

    /// Sends event `kind` with `data` to `ws`'s subscribers (`RecordAndBroadcast`):
    /// never blocks; a full buffer or a `drop` fault loses the event silently.
    pub fn publish(&mut self, ws: &str, kind: &str, data: Value) {
        let Some(ch) = self.channels.get_mut(ws) else {
            return;
        };
        ch.published += 1;
        if ch.drop_next > 0 {
            ch.drop_next -= 1;
            ch.dropped += ch.subscribers.len() as u64;
            return;
        }
        // Key order `type`, `timestamp`, `data` as the server's struct (sse.go:16-20).
        let line: Arc<str> = format!(
            "{{\"type\":{},\"timestamp\":{},\"data\":{}}}",
            Value::from(kind),
            ids::now_ms(),
            data
        )
        .into();
        let mut dropped = 0;
        ch.subscribers.retain(|s| {
            if s.flags.closed.load(Ordering::Relaxed) {
                return false;
            }
            if s.flags.silent.load(Ordering::Relaxed) {
                return true;
            }
            match s.tx.try_send(line.clone()) {
                Ok(()) => true,
                Err(TrySendError::Full(_)) => {
                    dropped += 1;
                    true
                }
                Err(TrySendError::Disconnected(_)) => false,
            }
        });
        ch.dropped += dropped;
    }

    /// Applies an admin stream fault to `ws`: `{"no_stream": bool}`, `{"silence":
    /// true}`, `{"close": true}`, `{"drop_next": N}` (any combination).
    pub fn fault(&mut self, ws: &str, spec: &serde_json::Map<String, Value>) -> Result<(), String> {
        let ch = self.channels.entry(ws.to_string()).or_default();
        if let Some(v) = spec.get("no_stream") {
            ch.no_stream = v.as_bool().ok_or("no_stream must be a boolean")?;
        }
        if let Some(n) = spec.get("drop_next") {
            ch.drop_next = n.as_u64().ok_or("drop_next must be a count")?;
        }
        let flag = |key: &str| -> Result<bool, String> {
            match spec.get(key) {
                None => Ok(false),
                Some(v) => v.as_bool().ok_or(format!("{key} must be a boolean")),
            }
        };
        let (silence, close) = (flag("silence")?, flag("close")?);
        for s in &ch.subscribers {
            if silence {
                s.flags.silent.store(true, Ordering::Relaxed);
            }
            if close {
                s.flags.closed.store(true, Ordering::Relaxed);
            }
        }
        if close {
            ch.subscribers.clear();
        }
        Ok(())
    }

    /// Counters for the admin API.
    pub fn to_json(&self, ws: &str) -> Value {
        let ch = self.channels.get(ws);
        let open = ch.map_or(0, |c| {
            c.subscribers
                .iter()
                .filter(|s| !s.flags.closed.load(Ordering::Relaxed))
                .count()
        });
        json!({
            "open": open,
            "opened": ch.map_or(0, |c| c.opened),
            "published": ch.map_or(0, |c| c.published),
            "dropped": ch.map_or(0, |c| c.dropped),
            "no_stream": !self.offers_stream(ws),
        })
    }
}

/// Writes the SSE answer on `w` until the client goes away or a fault closes it.
/// `extra` are headers added by middleware (rate limit). Chunked, as the real server
/// on HTTP/1.1 (no `Content-Length`).
pub fn serve(w: &mut TcpStream, sub: Subscription, extra: &[(String, String)]) -> io::Result<()> {
    let mut head = String::from(
        "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n\
         Connection: keep-alive\r\nX-Accel-Buffering: no\r\nTransfer-Encoding: chunked\r\n",
    );
    for (k, v) in extra {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    w.write_all(head.as_bytes())?;
    write_chunk(w, b": ping\n\n")?;
    loop {
        if sub.flags.closed.load(Ordering::Relaxed) {
            // "The stream just breaks, with no final event."
            return Ok(());
        }
        match sub.rx.recv_timeout(CHECK_EVERY) {
            Ok(line) => {
                if sub.flags.silent.load(Ordering::Relaxed) {
                    continue;
                }
                write_chunk(w, format!("data: {line}\n\n").as_bytes())?;
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => return Ok(()),
        }
    }
}

fn write_chunk(w: &mut TcpStream, data: &[u8]) -> io::Result<()> {
    let mut out = format!("{:x}\r\n", data.len()).into_bytes();
    out.extend_from_slice(data);
    out.extend_from_slice(b"\r\n");
    w.write_all(&out)?;
    w.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn recv(sub: &Subscription) -> Option<Value> {
        sub.rx
            .try_recv()
            .ok()
            .map(|l| serde_json::from_str(&l).unwrap())
    }

    #[test]
    fn fan_out_drop_and_silence() {
        let mut b = Broadcaster::default();
        b.publish("w", "X", json!({})); // nobody listening: nothing to do
        let a = b.subscribe("w");
        let other = b.subscribe("v");
        b.publish(
            "w",
            "ACTIVITY_LOGGED",
            json!({"activity_type": "a2a_receive"}),
        );
        let ev = recv(&a).unwrap();
        assert_eq!(ev["type"], "ACTIVITY_LOGGED");
        assert!(ev["timestamp"].as_i64().unwrap() > 0);
        assert_eq!(ev["data"]["activity_type"], "a2a_receive");
        assert!(recv(&other).is_none(), "events are per workspace");
        let mut spec = serde_json::Map::new();
        spec.insert("drop_next".into(), json!(1));
        b.fault("w", &spec).unwrap();
        b.publish("w", "A", json!({}));
        b.publish("w", "B", json!({}));
        assert_eq!(recv(&a).unwrap()["type"], "B");
        for _ in 0..BUFFER + 5 {
            b.publish("w", "C", json!({}));
        }
        assert_eq!(b.to_json("w")["dropped"], 1 + 5);
        let mut spec = serde_json::Map::new();
        spec.insert("no_stream".into(), json!(true));
        b.fault("w", &spec).unwrap();
        assert!(!b.offers_stream("w") && b.offers_stream("v"));
    }
}
