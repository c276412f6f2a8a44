//! Inbound broadcasts (§API-2.20): `broadcast_receive` rows, which the inbox poll
//! (`type=a2a_receive`) never returns. Their own thread reads them with their own
//! cursor (`type=broadcast_receive&since_id=`), hands each to the backend once
//! (`MOLECULE_ORIGIN=broadcast`; the text is the row's summary, cut at 120
//! characters by the platform) and never posts the output. The cursor and the ids
//! delivered lately live in `<state-dir>/<id>.broadcasts.json` (0600, atomic), saved
//! after every delivery, so a restart delivers nothing twice.
//!
//! With the event stream up, the thread costs nothing while idle: it looks once at
//! start, then only when the event thread hands it a `BROADCAST_MESSAGE` ([`Hints`]),
//! whose full text replaces the truncated summary of the matching row. When the stream
//! is down it looks every `--broadcasts-secs`.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::api::{Kind, Since};
use crate::backend::{BackendError, Origin, Request};
use crate::backoff::Backoff;
use crate::lru::Lru;
use crate::shutdown::Shutdown;
use crate::state::StateError;

use super::side_thread::SideThread;
use super::status::RuntimeStatus;

/// Delivered ids remembered (a 410 restarts from the time window; these stop repeats).
const REMEMBER: usize = 256;
/// Rows per page.
const PAGE: u32 = 100;
/// Page bytes accepted (rows are small: no bodies).
const PAGE_BYTES: u64 = 4 * 1024 * 1024;
/// Backend failures on one broadcast before it is given up.
const MAX_FAILURES: u32 = 3;
/// Larger state files are refused rather than read.
const MAX_STATE_BYTES: u64 = 1024 * 1024;
/// Full texts from the event stream kept until their row is read.
const MAX_HINTS: usize = 64;
/// How often "is the stream still up?" is asked while waiting (no request).
const STREAM_CHECK: Duration = Duration::from_secs(2);

/// The event thread's handle: `BROADCAST_MESSAGE` events (sender id and full text)
/// for the broadcast thread. Never blocks.
#[derive(Clone)]
pub struct Hints {
    texts: Arc<Mutex<VecDeque<(String, String)>>>,
    wake: SyncSender<()>,
}

impl Hints {
    /// The event's `data` (`{"message","sender","sender_id"}`, §API-2.17): keeps the
    /// text and wakes the thread.
    pub fn seen(&self, data: &Value) {
        let field = |k: &str| {
            data.get(k)
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string()
        };
        let (sender, message) = (field("sender_id"), field("message"));
        if message.is_empty() {
            return;
        }
        {
            let mut t = self.texts.lock().unwrap_or_else(PoisonError::into_inner);
            if t.len() >= MAX_HINTS {
                t.pop_front();
            }
            t.push_back((sender, message));
        }
        let _ = self.wake.try_send(());
    }

    /// The full text of `row`, if an event carried it: same sender, and the text the
    /// summary holds (cut at 120 characters) is its start.
    fn take_for(&self, row: &Value, short: &str) -> Option<String> {
        let sender = row.get("source_id").and_then(Value::as_str).unwrap_or("");
        let head = short.strip_suffix('…').unwrap_or(short);
        let mut t = self.texts.lock().unwrap_or_else(PoisonError::into_inner);
        let i = t
            .iter()
            .position(|(s, m)| s == sender && m.starts_with(head))?;
        t.remove(i).map(|(_, m)| m)
    }
}

/// The hint handle and the thread's end of it; a stop request wakes the thread too.
pub fn hint_channel(shutdown: &Shutdown) -> (Hints, Receiver<()>) {
    let (tx, rx) = mpsc::sync_channel(1);
    let hints = Hints {
        texts: Arc::default(),
        wake: tx,
    };
    let on_stop = hints.wake.clone();
    shutdown.on_trigger(move || {
        let _ = on_stop.try_send(());
    });
    (hints, rx)
}

/// `<dir>/<workspace-id>.broadcasts.json`.
pub fn state_path(dir: &Path, workspace_id: &str) -> PathBuf {
    dir.join(format!("{workspace_id}.broadcasts.json"))
}

/// What survives a restart.
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
pub struct Saved {
    /// The newest broadcast row handled.
    #[serde(default)]
    pub cursor: Option<String>,
    /// Ids handled lately, oldest first.
    #[serde(default)]
    pub delivered: Vec<String>,
}

/// Reads the state file; a missing file is a fresh start, a corrupt one an error.
pub fn load(path: &Path) -> Result<Saved, StateError> {
    let corrupt = |detail: String| StateError::Corrupt {
        path: path.to_path_buf(),
        detail,
    };
    match std::fs::metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Saved::default()),
        Ok(m) if m.len() > MAX_STATE_BYTES => {
            return Err(corrupt(format!("larger than {MAX_STATE_BYTES} bytes")));
        }
        _ => {}
    }
    let raw = std::fs::read(path).map_err(|e| corrupt(e.to_string()))?;
    let saved: Saved = serde_json::from_slice(&raw).map_err(|e| corrupt(e.to_string()))?;
    if saved
        .cursor
        .as_deref()
        .is_some_and(|c| !crate::uuid::is_uuid(c))
    {
        return Err(corrupt("cursor is not a UUID".into()));
    }
    Ok(saved)
}

/// What the thread keeps while it runs: the cursor and the ids delivered lately,
/// the oldest forgotten first ([`Saved`] is its form on disk).
struct Memory {
    cursor: Option<String>,
    delivered: Lru<String, ()>,
}

impl Memory {
    fn new(saved: Saved) -> Memory {
        let mut delivered = Lru::new(REMEMBER);
        for id in saved.delivered {
            delivered.insert(id, ());
        }
        Memory {
            cursor: saved.cursor,
            delivered,
        }
    }

    fn saved(&self) -> Saved {
        Saved {
            cursor: self.cursor.clone(),
            delivered: self.delivered.keys_oldest_first().cloned().collect(),
        }
    }
}

/// What the broadcast thread needs.
pub struct Context {
    /// The client, the backend broadcasts are handed to, `--broadcasts-secs`.
    pub side: SideThread,
    /// First look back (no cursor yet, or after a 410).
    pub since_secs: u64,
    /// The state file.
    pub path: PathBuf,
    /// Full texts from the event stream (shared with the event thread).
    pub hints: Hints,
    /// Whether the event stream is up right now (the event thread knows); `None`:
    /// no event thread, look every `every`.
    pub stream_up: Option<Arc<dyn Fn() -> bool + Send + Sync>>,
}

/// The thread: look at start-up and every `every`; deliver oldest first.
pub fn run(ctx: Context, saved: Saved, wake: Receiver<()>) {
    let mut memory = Memory::new(saved);
    let backoff = Backoff {
        max: ctx.side.every.max(Duration::from_secs(1)),
        ..Backoff::default()
    };
    let mut seed = crate::uuid::random_u64();
    let mut failures: u32 = 0;
    let mut first = true;
    loop {
        if ctx.side.should_stop(first) {
            return;
        }
        first = false;
        let wait = match fetch(&ctx, &memory) {
            Ok(rows) => {
                failures = 0;
                let full = rows.len() >= PAGE as usize;
                for row in rows {
                    if !deliver(&ctx, &mut memory, &row) {
                        return;
                    }
                }
                if full { Duration::ZERO } else { ctx.side.every }
            }
            Err(Gone) => {
                log::warn!(
                    "broadcasts: cursor gone (410): looking back {} s",
                    ctx.since_secs
                );
                memory.cursor = None;
                Duration::ZERO
            }
            Err(Failed(e)) => {
                failures = failures.saturating_add(1);
                if failures == 1 || failures.is_multiple_of(10) {
                    log::warn!("broadcasts: {e} (attempt {failures})");
                }
                seed = seed.wrapping_add(1);
                backoff.delay(failures, seed)
            }
        };
        if wait_for_hint(&ctx, &wake, wait) {
            return;
        }
    }
}

/// Waits `d`, or until a hint arrives; while the stream is up the time-based look is
/// skipped (a broadcast comes with its event). `true` = stop requested.
fn wait_for_hint(ctx: &Context, wake: &Receiver<()>, d: Duration) -> bool {
    let until = Instant::now().checked_add(d);
    // Updated every turn: a stream that drops and comes back within one wait still
    // triggers the look for what arrived while it was down.
    let mut was_up = ctx.stream_up.as_ref().is_some_and(|f| f());
    loop {
        if ctx.side.shutdown.is_triggered() {
            return true;
        }
        let up = ctx.stream_up.as_ref().is_some_and(|f| f());
        if up && !was_up {
            // The stream is back: what arrived while it was down had no event.
            return false;
        }
        let left = match until {
            Some(t) if !up => t.saturating_duration_since(Instant::now()),
            _ => STREAM_CHECK,
        };
        if !up && left.is_zero() {
            return false;
        }
        let step = if up {
            STREAM_CHECK
        } else {
            left.min(STREAM_CHECK)
        };
        was_up = up;
        match wake.recv_timeout(step) {
            Ok(()) => return ctx.side.shutdown.is_triggered(),
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => return ctx.side.shutdown.wait_timeout(step),
        }
    }
}

enum FetchError {
    Gone,
    Failed(String),
}
use FetchError::{Failed, Gone};

/// One page of broadcast rows after the cursor, oldest first.
fn fetch(ctx: &Context, memory: &Memory) -> Result<Vec<Value>, FetchError> {
    let since = match &memory.cursor {
        Some(c) => Since::Cursor(c.clone()),
        None => Since::Secs(ctx.since_secs),
    };
    match ctx.side.client.broadcasts(&since, PAGE, PAGE_BYTES) {
        Ok(Value::Array(mut rows)) => {
            if memory.cursor.is_none() {
                // Without a cursor the page is newest first (§API-4.2).
                rows.reverse();
            }
            Ok(rows)
        }
        Ok(_) => Ok(Vec::new()),
        Err(e) if e.kind() == Kind::Gone => Err(Gone),
        Err(e) => Err(Failed(e.to_string())),
    }
}

/// Hands one row to the backend (unless handled already) and saves. `false` = stop.
fn deliver(ctx: &Context, memory: &mut Memory, row: &Value) -> bool {
    let Some(id) = row
        .get("id")
        .and_then(Value::as_str)
        .filter(|i| crate::uuid::is_uuid(i))
    else {
        return true;
    };
    if !memory.delivered.contains(&id.to_string()) {
        let mut attempt: u32 = 0;
        let mut failures: u32 = 0;
        loop {
            if ctx.side.backend_busy() {
                if ctx.side.shutdown.wait_timeout(Duration::from_millis(250)) {
                    return false;
                }
                continue;
            }
            attempt = attempt.saturating_add(1);
            match run_backend(ctx, row, id, attempt) {
                Ok(()) => break,
                Err(BackendError::Cancelled) => return false,
                Err(e) if e.is_retry_later() && attempt < 20 => {}
                Err(e) => {
                    failures += 1;
                    if failures >= MAX_FAILURES || e.is_retry_later() {
                        log::error!("broadcast {id}: giving up: {e}");
                        break;
                    }
                    log::warn!("broadcast {id}: {e} (attempt {attempt})");
                }
            }
            let d = Backoff::default().delay(attempt, u64::from(attempt));
            if ctx.side.shutdown.wait_timeout(d) {
                return false;
            }
        }
        memory.delivered.insert(id.to_string(), ());
    }
    memory.cursor = Some(id.to_string());
    save(ctx, &memory.saved());
    true
}

fn save(ctx: &Context, saved: &Saved) {
    let bytes = serde_json::to_vec(saved).unwrap_or_default();
    if let Err(e) = crate::state::write_atomic(&ctx.path, &bytes) {
        log::error!("broadcasts: cannot save {}: {e}", ctx.path.display());
    }
}

/// The broadcast's words: the summary without the platform's `Broadcast from
/// <name>: ` prefix.
pub fn text_of(row: &Value) -> String {
    let summary = row.get("summary").and_then(Value::as_str).unwrap_or("");
    let name = row.get("peer_name").and_then(Value::as_str).unwrap_or("");
    let prefixed = format!("Broadcast from {name}: ");
    match summary.strip_prefix(&prefixed) {
        Some(t) if !name.is_empty() => t.to_string(),
        _ => summary
            .strip_prefix("Broadcast from ")
            .and_then(|t| t.split_once(": ").map(|(_, t)| t.to_string()))
            .unwrap_or_else(|| summary.to_string()),
    }
}

fn run_backend(ctx: &Context, row: &Value, id: &str, attempt: u32) -> Result<(), BackendError> {
    let s = |k: &str| row.get(k).and_then(Value::as_str).map(str::to_string);
    let short = text_of(row);
    let text = ctx.hints.take_for(row, &short).unwrap_or(short);
    let req = Request {
        workspace_id: ctx.side.client.workspace_id().to_string(),
        api_url: ctx.side.client.api_url().to_string(),
        text: text.clone(),
        other_parts: Vec::new(),
        caller_id: s("source_id").filter(|x| crate::uuid::is_uuid(x)),
        caller_name: s("peer_name"),
        caller_role: s("peer_role"),
        message_id: None,
        activity_id: id.to_string(),
        context_id: None,
        task_id: None,
        method: "broadcast".into(),
        origin: Origin::Broadcast,
        attempt,
        raw: row.clone(),
        extra_env: Default::default(),
        attachments: Vec::new(),
        request_id: None,
    };
    log::info!(
        "broadcast {id}: handing it to the backend ({} chars)",
        text.chars().count()
    );
    RuntimeStatus::begin_task(&ctx.side.status, "broadcast");
    let result = ctx.side.backend.handle(&req, &ctx.side.run);
    let failure = result
        .as_ref()
        .err()
        .map(|e| super::dispatch::failure_class(&e.to_string()));
    RuntimeStatus::end_task(&ctx.side.status, failure.as_deref());
    // The output goes nowhere: a broadcast is never answered.
    result.map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::super::fake::{Fake, OWN, PEER, Recorder, once_side_thread};
    use super::super::status::SharedStatus;
    use super::*;
    use serde_json::json;

    #[test]
    fn text_without_the_prefix() {
        let r = json!({"summary": "Broadcast from a: b: c", "peer_name": "a"});
        assert_eq!(text_of(&r), "b: c");
        assert_eq!(text_of(&json!({"summary": "Broadcast from x: hi"})), "hi");
        assert_eq!(text_of(&json!({"summary": "odd"})), "odd");
    }

    #[test]
    fn hints_give_the_full_text_of_the_matching_row() {
        let (h, _rx) = hint_channel(&Shutdown::new());
        let long = format!("{} and the rest", "x".repeat(120));
        h.seen(&json!({"message": long, "sender": "a", "sender_id": "s1"}));
        h.seen(&json!({"message": "short one", "sender": "a", "sender_id": "s1"}));
        let row = |summary: &str| json!({"source_id": "s1", "summary": summary, "peer_name": "a"});
        let cut = format!("Broadcast from a: {}…", "x".repeat(120));
        assert_eq!(
            h.take_for(&row(&cut), &text_of(&row(&cut))).as_deref(),
            Some(long.as_str())
        );
        let other = json!({"source_id": "s2", "summary": "Broadcast from b: short one"});
        assert_eq!(h.take_for(&other, "short one"), None, "another sender");
        assert_eq!(
            h.take_for(&row("x"), "short one").as_deref(),
            Some("short one")
        );
        assert_eq!(h.take_for(&row("x"), "short one"), None, "used once");
    }

    /// One `--once` pass of the thread over `fake`, delivering to `backend`, with
    /// the state in `dir`.
    fn one_pass(
        fake: &Arc<Fake>,
        backend: &Arc<Recorder>,
        dir: &Path,
        saved: Saved,
        status: SharedStatus,
    ) {
        let side = once_side_thread(fake, backend, status);
        let (hints, wake) = hint_channel(&side.shutdown);
        let ctx = Context {
            side,
            since_secs: 600,
            path: state_path(dir, OWN),
            hints,
            stream_up: None,
        };
        run(ctx, saved, wake);
    }

    fn idle() -> SharedStatus {
        RuntimeStatus::new(Instant::now())
    }

    fn broadcast(id: &str, words: &str) -> Value {
        json!({"id": id, "source_id": PEER, "peer_name": "a",
               "summary": format!("Broadcast from a: {words}")})
    }

    #[test]
    fn a_broadcast_is_delivered_once_across_pages_and_restarts() {
        const B1: &str = "bbbbbbbb-0000-4000-8000-000000000001";
        const B2: &str = "bbbbbbbb-0000-4000-8000-000000000002";
        let dir = std::env::temp_dir().join(format!("mol-bc-{}", crate::uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let fake = Fake::new(vec![]);
        // The platform lists it twice (newest first: no cursor yet).
        let page = json!([broadcast(B1, "hello all"), broadcast(B1, "hello all")]);
        fake.broadcast_pages.lock().unwrap().push_back(page);
        let backend = Arc::new(Recorder::default());
        one_pass(&fake, &backend, &dir, Saved::default(), idle());
        let seen = backend.seen();
        assert_eq!(seen.len(), 1, "{seen:?}");
        assert_eq!(seen[0].text, "hello all");
        assert_eq!(seen[0].origin, Origin::Broadcast);
        assert_eq!(seen[0].caller_id.as_deref(), Some(PEER));
        let saved = load(&state_path(&dir, OWN)).unwrap();
        assert_eq!(saved.cursor.as_deref(), Some(B1));
        assert_eq!(fake.asked(), [Since::Secs(600)]);

        // A restart whose cursor is gone (a 410) sees it again with a new one.
        let page = json!([broadcast(B2, "second"), broadcast(B1, "hello all")]);
        fake.broadcast_pages.lock().unwrap().push_back(page);
        let again = Arc::new(Recorder::default());
        let restarted = Saved {
            cursor: None,
            ..saved
        };
        one_pass(&fake, &again, &dir, restarted, idle());
        let texts: Vec<String> = again.seen().into_iter().map(|r| r.text).collect();
        assert_eq!(texts, ["second"]);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_broadcast_waits_while_every_worker_is_busy() {
        const B1: &str = "bbbbbbbb-0000-4000-8000-000000000001";
        let dir = std::env::temp_dir().join(format!("mol-bc-{}", crate::uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let fake = Fake::new(vec![]);
        let page = json!([broadcast(B1, "hello all")]);
        fake.broadcast_pages.lock().unwrap().push_back(page.clone());
        let busy = idle();
        RuntimeStatus::begin_task(&busy, "a message");
        let backend = Arc::new(Recorder::default());
        // The stop comes while it waits: nothing delivered, the cursor not moved.
        one_pass(&fake, &backend, &dir, Saved::default(), busy);
        assert!(backend.seen().is_empty());
        assert_eq!(load(&state_path(&dir, OWN)).unwrap(), Saved::default());
        fake.broadcast_pages.lock().unwrap().push_back(page);
        one_pass(&fake, &backend, &dir, Saved::default(), idle());
        assert_eq!(backend.seen().len(), 1);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn state_round_trip_and_corruption() {
        let dir = std::env::temp_dir().join(format!("mol-bc-{}", crate::uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = state_path(&dir, "w");
        assert_eq!(load(&p).unwrap(), Saved::default());
        std::fs::write(&p, b"{not json").unwrap();
        assert!(load(&p).is_err());
        std::fs::write(&p, br#"{"cursor":"x"}"#).unwrap();
        assert!(load(&p).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
