//! The workspace event stream (`GET /workspaces/:id/events/stream`, SSE, §API-2.17)
//! read as a sequence of events: a bounded, hand-written SSE parser over any byte
//! reader, and [`EventStream`], which opens the stream for a workspace and hands out
//! events until a stop is requested, a deadline passes, the stream closes or it stays
//! silent too long. Events are hints (no row ids, duplicates, drops when the server's
//! buffer is full): callers poll the source of truth when one arrives. Every event
//! type reaches the caller; the `is_*_hint` helpers only name the common ones.
//! Spawns nothing and never sleeps: each read waits at most one tick.

use std::fmt;
use std::io::{self, Read};
use std::time::{Duration, Instant};

use serde::de::{self, IgnoredAny, MapAccess, Visitor};
use serde::{Deserialize, Deserializer};
use serde_json::Value;

use crate::api::{ApiError, Client};
use crate::shutdown::Shutdown;

/// Largest event kept whole. Bigger ones (an `ACTIVITY_LOGGED` carrying a huge
/// `request_body`) are reported with their type only.
const MAX_EVENT: usize = 1024 * 1024;
/// Bytes kept from an oversized event to find its `type`.
const SNIFF: usize = 256;
/// Bytes asked of the reader at a time.
const CHUNK: usize = 16 * 1024;
/// The longest a read may block: how soon a stop request or a passed deadline is
/// noticed while the stream is quiet. A stop does not wait for the connector's
/// reader (it holds no state), so this only bounds how long it lingers; each tick
/// costs a timed-out read (10 a second measured 0.08 % of a core idle).
pub const TICK: Duration = Duration::from_secs(1);

/// `type` of the event the platform sends when a row is logged in our activity.
pub const ACTIVITY_LOGGED: &str = "ACTIVITY_LOGGED";
/// `type` of the event each of our own heartbeats produces.
pub const WORKSPACE_HEARTBEAT: &str = "WORKSPACE_HEARTBEAT";

/// One event: `{"type": …, "timestamp": …, "data": …}`.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// The event name (`ACTIVITY_LOGGED`, `WORKSPACE_HEARTBEAT`, `REQUEST_RESPONDED`,
    /// …); empty when the event could not be read as JSON.
    pub kind: String,
    /// Broadcast time in Unix milliseconds, when given.
    pub timestamp_ms: Option<i64>,
    /// The payload; `Null` when `truncated` or unreadable, and for `ACTIVITY_LOGGED`,
    /// which is read for its `activity_type` only (two arrive with every message)
    /// unless the stream was opened [`EventStream::with_whole_data`].
    pub data: Value,
    /// `data.activity_type` of an `ACTIVITY_LOGGED` event, when it is a string.
    pub activity_type: Option<String>,
    /// The event was over the size cap: its kind is known, its payload dropped.
    pub truncated: bool,
}

impl Event {
    /// A row was logged that an inbox poll (`type=a2a_receive`) will return. An event
    /// we could not read whole counts too: one extra poll is cheap, a missed message
    /// would wait for the safety poll.
    pub fn is_inbox_hint(&self) -> bool {
        match self.kind.as_str() {
            ACTIVITY_LOGGED => {
                self.truncated
                    || self
                        .activity_type
                        .as_deref()
                        .is_none_or(|t| t == "a2a_receive")
            }
            "" => true,
            _ => false,
        }
    }

    /// A delegation this workspace sent has a result (`DELEGATION_COMPLETE` or
    /// `DELEGATION_FAILED`, §API-2.17); its `delegate_result` row has no event.
    pub fn is_delegation_hint(&self) -> bool {
        matches!(
            self.kind.as_str(),
            "DELEGATION_COMPLETE" | "DELEGATION_FAILED"
        )
    }

    fn parse(raw: &[u8], truncated: bool, whole: bool) -> Event {
        if truncated {
            return Event {
                kind: sniff_type(raw).unwrap_or_default(),
                timestamp_ms: None,
                data: Value::Null,
                activity_type: None,
                truncated: true,
            };
        }
        if !whole
            && raw.trim_ascii_start().starts_with(b"{")
            && let Ok(head) = serde_json::from_slice::<LoggedHead>(raw)
            && head.kind == ACTIVITY_LOGGED
        {
            return Event {
                kind: head.kind,
                timestamp_ms: head.timestamp,
                data: Value::Null,
                activity_type: head.data.and_then(|d| d.activity_type),
                truncated: false,
            };
        }
        let mut v: Value = serde_json::from_slice(raw).unwrap_or(Value::Null);
        let kind = v.get("type").and_then(Value::as_str).unwrap_or_default();
        let logged = kind == ACTIVITY_LOGGED;
        let activity_type = logged
            .then(|| {
                v.pointer("/data/activity_type")?
                    .as_str()
                    .map(str::to_string)
            })
            .flatten();
        Event {
            kind: kind.to_string(),
            timestamp_ms: v.get("timestamp").and_then(Value::as_i64),
            data: match v.get_mut("data") {
                Some(d) if whole || !logged => d.take(),
                _ => Value::Null,
            },
            activity_type,
            truncated: false,
        }
    }
}

/// What is read of an event at first: its `type`, its `timestamp` and, for an
/// `ACTIVITY_LOGGED`, `data.activity_type`; the rest (the message's request and
/// response bodies) is skipped, not built into a tree. Any doubt (a field of
/// another type, a key given twice) fails this read, and the whole one decides.
#[derive(Deserialize)]
struct LoggedHead {
    #[serde(rename = "type")]
    kind: String,
    timestamp: Option<i64>,
    data: Option<LoggedData>,
}

/// `data` of an `ACTIVITY_LOGGED`, from an object only (a derived struct would take
/// an array too, by position).
struct LoggedData {
    activity_type: Option<String>,
}

impl<'de> Deserialize<'de> for LoggedData {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(field_identifier, rename_all = "snake_case")]
        enum Key {
            ActivityType,
            #[serde(other)]
            Other,
        }
        struct Fields;
        impl<'de> Visitor<'de> for Fields {
            type Value = LoggedData;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<LoggedData, A::Error> {
                let mut activity_type = None;
                while let Some(key) = map.next_key()? {
                    match key {
                        Key::ActivityType if activity_type.is_some() => {
                            return Err(de::Error::duplicate_field("activity_type"));
                        }
                        Key::ActivityType => activity_type = Some(map.next_value()?),
                        Key::Other => {
                            map.next_value::<IgnoredAny>()?;
                        }
                    }
                }
                Ok(LoggedData {
                    activity_type: activity_type.flatten(),
                })
            }
        }
        d.deserialize_map(Fields)
    }
}

/// `"type":"NAME"` near the start of a cut-off event (the platform writes `type`
/// first).
fn sniff_type(head: &[u8]) -> Option<String> {
    let text = String::from_utf8_lossy(head);
    let rest = text.split_once("\"type\"")?.1.trim_start();
    let rest = rest.strip_prefix(':')?.trim_start().strip_prefix('"')?;
    let name = rest.split('"').next()?;
    name.chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '_')
        .then(|| name.to_string())
}

/// What one step of the parser produced.
#[derive(Debug, PartialEq)]
pub enum Next {
    /// A complete event.
    Event(Event),
    /// No complete event yet: the read waited a tick, or only a comment (`: ping`)
    /// or partial data arrived.
    Quiet,
    /// The server ended the stream.
    Closed,
}

/// A bounded SSE parser (the subset the platform speaks: `data:` lines, comments,
/// blank-line dispatch; `event:`, `id:` and `retry:` are ignored). Lines may end in
/// `\n`, `\r\n` or `\r`. Memory is bounded by [`MAX_EVENT`] whatever the server sends.
pub struct SseReader<R> {
    inner: R,
    buf: Vec<u8>,
    /// The `data` of the event being read (lines joined with `\n`).
    data: Vec<u8>,
    /// The event being read went over the cap; `data` holds its first bytes.
    oversized: bool,
    /// The current line is over the cap: drop it up to its end.
    skipping_line: bool,
    /// The last line ended in `\r`: a `\n` right after belongs to it.
    after_cr: bool,
    /// Bytes received so far: any byte, a comment included, shows the stream lives.
    received: u64,
    /// Keep every event's `data`, `ACTIVITY_LOGGED`'s too.
    whole: bool,
}

impl<R: Read> SseReader<R> {
    /// A parser reading from `inner`. A read failing with `TimedOut` or `WouldBlock`
    /// means "nothing this tick" and is not an error.
    pub fn new(inner: R) -> Self {
        SseReader {
            inner,
            buf: Vec::with_capacity(CHUNK),
            data: Vec::new(),
            oversized: false,
            skipping_line: false,
            after_cr: false,
            received: 0,
            whole: false,
        }
    }

    /// Bytes received so far.
    pub fn received(&self) -> u64 {
        self.received
    }

    /// The next event, or `Quiet` after at most one read, or `Closed`.
    pub fn read_next(&mut self) -> io::Result<Next> {
        loop {
            if let Some(ev) = self.take_lines() {
                return Ok(Next::Event(ev));
            }
            let mut chunk = [0u8; CHUNK];
            match self.inner.read(&mut chunk) {
                Ok(0) => return Ok(Next::Closed),
                Ok(n) => {
                    self.received = self.received.saturating_add(n as u64);
                    self.buf.extend_from_slice(&chunk[..n]);
                    if let Some(ev) = self.take_lines() {
                        return Ok(Next::Event(ev));
                    }
                    return Ok(Next::Quiet);
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock
                    ) =>
                {
                    return Ok(Next::Quiet);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                // A chunked stream cut off mid-way: the server went away.
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::UnexpectedEof
                            | io::ErrorKind::ConnectionReset
                            | io::ErrorKind::ConnectionAborted
                    ) =>
                {
                    return Ok(Next::Closed);
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Consumes complete lines from `buf`; returns the first event they finish.
    fn take_lines(&mut self) -> Option<Event> {
        loop {
            if self.after_cr && self.buf.first() == Some(&b'\n') {
                self.buf.remove(0);
            }
            self.after_cr = false;
            let Some(end) = self.buf.iter().position(|&b| b == b'\n' || b == b'\r') else {
                if self.buf.len() > MAX_EVENT {
                    // A line longer than any event we keep: remember its start, drop the rest.
                    if !self.skipping_line {
                        let head: Vec<u8> = self.buf[..SNIFF.min(self.buf.len())].to_vec();
                        self.field_line(&head, true);
                    }
                    self.skipping_line = true;
                    self.buf.clear();
                }
                return None;
            };
            self.after_cr = self.buf[end] == b'\r';
            let line: Vec<u8> = self.buf.drain(..=end).take(end).collect();
            if std::mem::take(&mut self.skipping_line) {
                continue; // the tail of an over-long line
            }
            if line.is_empty() {
                if let Some(ev) = self.dispatch() {
                    return Some(ev);
                }
                continue;
            }
            self.field_line(&line, false);
        }
    }

    fn field_line(&mut self, line: &[u8], cut: bool) {
        if line.first() == Some(&b':') {
            return; // comment, e.g. the first `: ping`
        }
        let (name, value) = match line.iter().position(|&b| b == b':') {
            Some(i) => {
                let v = &line[i + 1..];
                (&line[..i], v.strip_prefix(b" ").unwrap_or(v))
            }
            None => (line, &[][..]),
        };
        if name != b"data" {
            return;
        }
        if !self.data.is_empty() {
            self.data.push(b'\n');
        }
        let room = MAX_EVENT.saturating_sub(self.data.len());
        if cut || value.len() > room {
            if !self.oversized {
                let keep = SNIFF.saturating_sub(self.data.len()).min(value.len());
                self.data.truncate(SNIFF);
                self.data.extend_from_slice(&value[..keep]);
            }
            self.oversized = true;
        } else if !self.oversized {
            self.data.extend_from_slice(value);
        }
    }

    fn dispatch(&mut self) -> Option<Event> {
        let truncated = std::mem::take(&mut self.oversized);
        if self.data.is_empty() && !truncated {
            return None;
        }
        let ev = Event::parse(&self.data, truncated, self.whole);
        self.data.clear();
        Some(ev)
    }
}

/// Why [`EventStream::next_event`] returned no event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum End {
    /// A stop was requested.
    Stopped,
    /// The deadline given with [`EventStream::with_deadline`] passed.
    Deadline,
    /// The server closed the stream.
    Closed,
    /// Nothing at all arrived for this long (the silence limit).
    Silent(Duration),
    /// Reading failed.
    Failed(String),
}

impl fmt::Display for End {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            End::Stopped => write!(f, "stop requested"),
            End::Deadline => write!(f, "deadline passed"),
            End::Closed => write!(f, "the platform closed the event stream"),
            End::Silent(d) => write!(f, "the event stream was silent for {} s", d.as_secs()),
            End::Failed(e) => write!(f, "reading the event stream: {e}"),
        }
    }
}

/// An open event stream for one workspace.
pub struct EventStream {
    reader: SseReader<Box<dyn Read + Send>>,
    shutdown: Shutdown,
    silence: Option<Duration>,
    deadline: Option<Instant>,
    last_heard: Instant,
    heard: u64,
}

impl EventStream {
    /// Opens `client`'s workspace stream (one request). `shutdown` ends
    /// [`EventStream::next_event`] within a tick. A 404 means the platform has no stream
    /// (an older server) or no such workspace.
    pub fn open(client: &Client, shutdown: &Shutdown) -> Result<EventStream, ApiError> {
        let body = client.event_stream(TICK)?;
        Ok(Self::from_reader(Box::new(body), shutdown))
    }

    /// A stream over any byte source (tests, replays). Reads should give up with
    /// `TimedOut` after a tick when there is nothing to read.
    pub fn from_reader(reader: Box<dyn Read + Send>, shutdown: &Shutdown) -> EventStream {
        EventStream {
            reader: SseReader::new(reader),
            shutdown: shutdown.clone(),
            silence: None,
            deadline: None,
            last_heard: Instant::now(),
            heard: 0,
        }
    }

    /// Ends the stream with [`End::Silent`] when not a byte arrives for `limit`. The
    /// platform never pings; our own heartbeats are what it says while healthy.
    pub fn with_silence_limit(mut self, limit: Duration) -> Self {
        self.silence = Some(limit);
        self
    }

    /// Keeps the whole `data` of `ACTIVITY_LOGGED` events too, for a reader that
    /// looks inside them (the connector only needs their `activity_type`).
    pub fn with_whole_data(mut self) -> Self {
        self.reader.whole = true;
        self
    }

    /// Ends the stream with [`End::Deadline`] at `deadline` (one-shot waits).
    pub fn with_deadline(mut self, deadline: Instant) -> Self {
        self.deadline = Some(deadline);
        self
    }

    /// The next event of any type, or why there is none. After an `End` other than
    /// `Deadline` the stream is finished: open a new one.
    pub fn next_event(&mut self) -> Result<Event, End> {
        loop {
            if self.shutdown.is_triggered() {
                return Err(End::Stopped);
            }
            if self.deadline.is_some_and(|d| Instant::now() >= d) {
                return Err(End::Deadline);
            }
            let step = self.reader.read_next();
            if self.reader.received() != self.heard {
                self.heard = self.reader.received();
                self.last_heard = Instant::now();
            }
            match step {
                Ok(Next::Event(ev)) => return Ok(ev),
                Ok(Next::Closed) => return Err(End::Closed),
                Err(e) => return Err(End::Failed(e.to_string())),
                Ok(Next::Quiet) => {
                    let quiet = self.last_heard.elapsed();
                    if let Some(limit) = self.silence
                        && quiet > limit
                    {
                        return Err(End::Silent(limit));
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::VecDeque;

    /// Hands out scripted chunks; `None` is a tick without data; the end is EOF.
    struct Script(VecDeque<Option<Vec<u8>>>);

    impl Read for Script {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            match self.0.pop_front() {
                None => Ok(0),
                Some(None) => Err(io::Error::new(io::ErrorKind::TimedOut, "tick")),
                Some(Some(mut bytes)) => {
                    let n = bytes.len().min(buf.len());
                    buf[..n].copy_from_slice(&bytes[..n]);
                    if n < bytes.len() {
                        self.0.push_front(Some(bytes.split_off(n)));
                    }
                    Ok(n)
                }
            }
        }
    }

    fn script(parts: &[Option<&[u8]>]) -> Script {
        Script(parts.iter().map(|p| p.map(<[u8]>::to_vec)).collect())
    }

    fn events(parts: &[Option<&[u8]>]) -> Vec<Event> {
        let mut r = SseReader::new(script(parts));
        let mut out = Vec::new();
        loop {
            match r.read_next().unwrap() {
                Next::Event(e) => out.push(e),
                Next::Quiet => {}
                Next::Closed => return out,
            }
        }
    }

    const HB: &[u8] =
        br#"data: {"type":"WORKSPACE_HEARTBEAT","timestamp":17,"data":{"active_tasks":0}}"#;

    #[test]
    fn parses_the_platform_stream_across_chunk_and_line_ending_variants() {
        let activity = br#"data: {"type":"ACTIVITY_LOGGED","timestamp":5,"data":{"activity_type":"a2a_receive","message_id":"m"}}"#;
        for sep in [&b"\n"[..], b"\r\n", b"\r"] {
            let mut whole = b": ping".to_vec();
            whole.extend_from_slice(sep);
            whole.extend_from_slice(sep);
            whole.extend_from_slice(HB);
            whole.extend_from_slice(sep);
            whole.extend_from_slice(sep);
            whole.extend_from_slice(activity);
            whole.extend_from_slice(sep);
            whole.extend_from_slice(sep);
            // Byte by byte, so every boundary (a `\r\n` split included) is crossed.
            let bytes: Vec<Vec<u8>> = whole.iter().map(|b| vec![*b]).collect();
            let parts: Vec<Option<&[u8]>> = bytes.iter().map(|b| Some(&b[..])).collect();
            let got = events(&parts);
            assert_eq!(got.len(), 2, "{sep:?}: {got:?}");
            assert_eq!(got[0].kind, WORKSPACE_HEARTBEAT);
            assert_eq!(got[0].timestamp_ms, Some(17));
            assert!(!got[0].is_inbox_hint());
            assert_eq!(got[1].kind, ACTIVITY_LOGGED);
            assert_eq!(got[1].timestamp_ms, Some(5));
            assert_eq!(got[1].activity_type.as_deref(), Some("a2a_receive"));
            assert!(got[1].is_inbox_hint());
        }
    }

    #[test]
    fn multi_line_data_other_fields_and_unknown_types() {
        let got = events(&[Some(
            b"event: x\nid: 7\nretry: 5\ndata: {\"type\":\"REQUEST_RESPONDED\",\ndata:\"data\":{\"request_id\":\"r\"}}\n\n\n\ndata: not json\n\n",
        )]);
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].kind, "REQUEST_RESPONDED");
        assert_eq!(got[0].data["request_id"], "r");
        assert!(!got[0].is_inbox_hint() && !got[0].is_delegation_hint());
        assert_eq!(got[1].kind, "");
        assert!(got[1].is_inbox_hint(), "unreadable events wake the poll");
    }

    #[test]
    fn hints_by_type() {
        let ev = |kind: &str| Event {
            kind: kind.into(),
            timestamp_ms: None,
            data: Value::Null,
            activity_type: None,
            truncated: false,
        };
        let logged = |activity: Option<&str>| Event {
            activity_type: activity.map(str::to_string),
            ..ev(ACTIVITY_LOGGED)
        };
        assert!(logged(Some("a2a_receive")).is_inbox_hint());
        assert!(
            !logged(Some("task_update")).is_inbox_hint(),
            "our self-report"
        );
        assert!(
            logged(None).is_inbox_hint(),
            "an unknown row may be a message"
        );
        assert!(ev("DELEGATION_COMPLETE").is_delegation_hint());
        assert!(ev("DELEGATION_FAILED").is_delegation_hint());
        assert!(!ev("DELEGATION_SENT").is_delegation_hint());
        assert!(!ev("AGENT_MESSAGE").is_inbox_hint());
    }

    /// The whole read of an event, as the light read must match it.
    fn whole_read(raw: &[u8]) -> (String, Option<i64>, Option<String>) {
        let v: Value = serde_json::from_slice(raw).unwrap_or(Value::Null);
        let kind = v["type"].as_str().unwrap_or_default().to_string();
        let activity = v["data"]["activity_type"].as_str().map(str::to_string);
        (kind, v["timestamp"].as_i64(), activity)
    }

    #[test]
    fn logged_rows_read_light_as_they_read_whole() {
        let cases: [&[u8]; 13] = [
            br#"{"type":"ACTIVITY_LOGGED","timestamp":5,"data":{"activity_type":"a2a_receive","request_body":{"a":[1,{"b":null}]}}}"#,
            br#"{"data":{"activity_type":"task_update"},"type":"ACTIVITY_LOGGED"}"#,
            br#"{"type":"ACTIVITY_LOGGED","data":{"activity_type":"a2a_send","activity_type":"a2a_receive"}}"#,
            br#"{"type":"ACTIVITY_LOGGED","type":"WORKSPACE_HEARTBEAT","data":{}}"#,
            br#"{"type":"ACTIVITY_LOGGED","data":{"activity_type":7}}"#,
            br#"{"type":"ACTIVITY_LOGGED","data":["activity_type"]}"#,
            br#"{"type":"ACTIVITY_LOGGED","data":null,"timestamp":null}"#,
            br#"{"type":"ACTIVITY_LOGGED","timestamp":5.5,"data":{"activity_type":null}}"#,
            br#"{"type":"ACTIVITY_LOGGED","timestamp":-3}"#,
            br#"{"type":"ACTIVITY_LOGGED","data":{"activity_type":"a2a_receive"}} x"#,
            br#"{"type":7,"data":{"activity_type":"task_update"}}"#,
            br#"["ACTIVITY_LOGGED",5,{"activity_type":"task_update"}]"#,
            br#"{"type":"WORKSPACE_HEARTBEAT","timestamp":9,"data":{"active_tasks":0}}"#,
        ];
        for raw in cases {
            let ev = Event::parse(raw, false, false);
            let (kind, ts, activity) = whole_read(raw);
            let text = String::from_utf8_lossy(raw);
            assert_eq!(ev.kind, kind, "{text}");
            assert_eq!(ev.timestamp_ms, ts, "{text}");
            assert_eq!(
                ev.activity_type,
                activity.filter(|_| kind == ACTIVITY_LOGGED),
                "{text}"
            );
            if kind == ACTIVITY_LOGGED {
                assert_eq!(ev.data, Value::Null, "{text}");
            }
        }
        let hb = Event::parse(cases[12], false, false);
        assert_eq!(hb.data["active_tasks"], 0, "other events keep their data");
        let whole = Event::parse(cases[0], false, true);
        assert_eq!(whole.data["request_body"]["a"][0], 1, "unless asked to");
        assert_eq!(whole.activity_type.as_deref(), Some("a2a_receive"));
    }

    #[test]
    fn oversized_events_keep_their_type_and_memory_stays_bounded() {
        let mut big =
            br#"data: {"type":"ACTIVITY_LOGGED","timestamp":1,"data":{"request_body":""#.to_vec();
        big.extend(std::iter::repeat_n(b'x', MAX_EVENT * 2));
        big.extend_from_slice(b"\"}}\n\n");
        let mut r = SseReader::new(script(&[Some(&big), Some(HB), Some(b"\n\n")]));
        let mut got = Vec::new();
        for _ in 0..1000 {
            match r.read_next().unwrap() {
                Next::Event(e) => got.push(e),
                Next::Quiet => {}
                Next::Closed => break,
            }
            assert!(r.buf.len() <= MAX_EVENT + CHUNK && r.data.len() <= MAX_EVENT);
        }
        assert_eq!(got.len(), 2, "{got:?}");
        assert!(got[0].truncated && got[0].is_inbox_hint());
        assert_eq!(got[0].kind, ACTIVITY_LOGGED);
        assert_eq!(got[1].kind, WORKSPACE_HEARTBEAT);
    }

    #[test]
    fn the_stream_ends_on_stop_silence_deadline_and_close() {
        let sd = Shutdown::new();
        let ticks = || Box::new(Script((0..100).map(|_| None).collect())) as Box<dyn Read + Send>;
        let mut s = EventStream::from_reader(ticks(), &sd).with_silence_limit(Duration::ZERO);
        assert_eq!(s.next_event(), Err(End::Silent(Duration::ZERO)));
        let past = Instant::now();
        let mut s = EventStream::from_reader(ticks(), &sd).with_deadline(past);
        assert_eq!(s.next_event(), Err(End::Deadline));
        let mut s = EventStream::from_reader(Box::new(script(&[Some(HB), Some(b"\n\n")])), &sd);
        assert_eq!(s.next_event().unwrap().kind, WORKSPACE_HEARTBEAT);
        assert_eq!(s.next_event(), Err(End::Closed));
        sd.trigger(crate::shutdown::StopReason::Signal);
        let mut s = EventStream::from_reader(ticks(), &sd);
        assert_eq!(s.next_event(), Err(End::Stopped));
    }
}
