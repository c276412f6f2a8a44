//! The event reader thread (§API-2.17, issue 12): keeps one event stream open for
//! the workspace and turns what it says into wake-ups: an inbox row logged → poll
//! now; a delegation of ours finished → the tracker fetches now. While the stream is
//! healthy the poll thread only polls every `--safety-poll-secs`; when it fails or
//! goes silent (two heartbeat periods without a byte) the poll thread is told at
//! once and falls back to `--interval-ms`, and the stream is reopened with capped,
//! jittered backoff. An event is only ever a hint: the `since_id` poll stays the
//! source of truth, so a lost, doubled or late event costs latency, never a message.

use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use crate::api::{Client, Kind};
use crate::backoff::Backoff;
use crate::config::WakeMode;
use crate::error::Error;
use crate::events::{End, EventStream};
use crate::shutdown::{Shutdown, StopReason};
use crate::status_file::{WakeReport, unix};

use super::delegations::Waker;
use super::poll;

/// Reconnect schedule after a stream failed: 1, 2, 4 … 60 s, ±25 %.
const RECONNECT: Backoff = Backoff {
    base: Duration::from_secs(1),
    max: Duration::from_secs(60),
    jitter: 0.25,
};
/// A stream that stayed up this long counts as healthy: the next failure starts the
/// reconnect schedule from the beginning.
const STABLE_AFTER: Duration = Duration::from_secs(60);
/// How often a platform that answered 404 (no stream) is asked again, ±25 %.
const NO_STREAM_RETRY: Duration = Duration::from_secs(600);

/// What `status` shows about wake-ups; shared by the event thread (writer), the
/// poll thread (which interval to use) and the status file.
#[derive(Debug)]
pub struct WakeState {
    mode: WakeMode,
    inner: Mutex<Info>,
}

#[derive(Debug, Default, Clone)]
struct Info {
    connected_since: Option<SystemTime>,
    /// Why we poll on `--interval-ms` right now (stream down, none, not wanted).
    polling_because: Option<String>,
    events: u64,
    reconnects: u64,
}

impl WakeState {
    /// State for `mode`; polling until a stream connects.
    pub fn new(mode: WakeMode) -> Arc<WakeState> {
        let why = match mode {
            WakeMode::Poll => "--wake poll",
            _ => "event stream not connected yet",
        };
        Arc::new(WakeState {
            mode,
            inner: Mutex::new(Info {
                polling_because: Some(why.to_string()),
                ..Info::default()
            }),
        })
    }

    fn info(&self) -> std::sync::MutexGuard<'_, Info> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Is an event stream wanted at all (`--wake` other than `poll`, not `--once`)?
    pub fn wants_events(&self) -> bool {
        self.mode != WakeMode::Poll
    }

    /// The stream is open and healthy: blind polling is only a safety net.
    pub fn stream_up(&self) -> bool {
        self.info().connected_since.is_some()
    }

    fn connected(&self) {
        let mut i = self.info();
        i.connected_since = Some(SystemTime::now());
        i.polling_because = None;
    }

    fn polling(&self, why: String) {
        let mut i = self.info();
        if i.connected_since.take().is_some() {
            i.reconnects += 1;
        }
        i.polling_because = Some(why);
    }

    fn count_event(&self) {
        self.info().events += 1;
    }

    /// The `wake` part of the status file.
    pub fn report(&self) -> WakeReport {
        let i = self.info().clone();
        WakeReport {
            mode: self.mode.as_str().to_string(),
            events_connected_since: unix(i.connected_since),
            polling_because: i.polling_because,
            events_seen: i.events,
            stream_losses: i.reconnects,
        }
    }

    /// A short summary that changes when the state does (status-file fingerprint).
    pub fn fingerprint(&self) -> String {
        let i = self.info();
        format!("{:?}/{:?}", i.connected_since, i.polling_because)
    }
}

/// What the event thread needs.
pub struct Settings {
    /// `--wake` (never `Poll` here: no thread runs then).
    pub mode: WakeMode,
    /// A stream silent this long is dead: two heartbeat periods.
    pub silence: Duration,
    /// Fallback poll period, for the log line.
    pub interval: Duration,
    /// Safety-net poll period, for the log line.
    pub safety_poll: Duration,
}

/// Who the event thread wakes.
pub struct Wakes {
    /// The poll thread (an inbox row was logged).
    pub poll: Sender<poll::Event>,
    /// The delegation tracker (a delegation of ours finished).
    pub tracker: Option<Waker>,
    /// The broadcast thread (a broadcast arrived, with its full text).
    pub broadcasts: Option<super::broadcasts::Hints>,
}

/// The event thread: runs until shutdown.
pub fn run(
    client: Client,
    settings: Settings,
    state: Arc<WakeState>,
    wakes: Wakes,
    shutdown: Shutdown,
) {
    let Wakes {
        poll: poll_wake,
        tracker: tracker_wake,
        broadcasts,
    } = wakes;
    let hint = || {
        let _ = poll_wake.send(poll::Event::Hint(Instant::now()));
    };
    let mut failures: u32 = 0;
    let mut seed = crate::uuid::random_u64();
    let mut ever_connected = false;
    let mut said_no_stream = false;
    loop {
        if shutdown.is_triggered() {
            return;
        }
        let delay = match EventStream::open(&client, &shutdown) {
            Ok(stream) => {
                let opened = Instant::now();
                state.connected();
                if !ever_connected || failures > 0 {
                    log::info!(
                        "event stream connected: polling at once on new messages, otherwise every {} s",
                        settings.safety_poll.as_secs()
                    );
                }
                ever_connected = true;
                // Whatever arrived while we were not listening.
                hint();
                let end = listen(
                    stream,
                    &settings,
                    &state,
                    &hint,
                    tracker_wake.as_ref(),
                    broadcasts.as_ref(),
                );
                if end == End::Stopped {
                    return;
                }
                state.polling(format!("event stream lost: {end}"));
                hint();
                if opened.elapsed() >= STABLE_AFTER {
                    failures = 0;
                }
                // One line per loss (a flapping stream is slowed down by the backoff).
                log::warn!(
                    "{end}; polling every {} ms until it is back",
                    settings.interval.as_millis()
                );
                failures = failures.saturating_add(1);
                seed = seed.wrapping_add(1);
                // A stream that just ended cleanly may be reopened at once the first time.
                if failures == 1 {
                    Duration::ZERO
                } else {
                    RECONNECT.delay(failures - 1, seed)
                }
            }
            Err(e) if e.kind() == Kind::NotFound => {
                if settings.mode == WakeMode::Events {
                    shutdown.trigger(StopReason::Fatal(Error::PlatformTooOld(format!(
                        "--wake events: the platform has no event stream ({e}); use --wake auto or poll"
                    ))));
                    return;
                }
                state.polling("the platform has no event stream (HTTP 404)".into());
                if !said_no_stream {
                    // One quiet line, not one per attempt.
                    log::info!(
                        "the platform has no event stream (HTTP 404): polling every {} ms",
                        settings.interval.as_millis()
                    );
                    said_no_stream = true;
                }
                seed = seed.wrapping_add(1);
                Backoff {
                    base: NO_STREAM_RETRY,
                    max: NO_STREAM_RETRY.saturating_mul(2),
                    jitter: 0.25,
                }
                .delay(1, seed)
            }
            Err(e) => {
                state.polling(format!("event stream unavailable: {e}"));
                failures = failures.saturating_add(1);
                if failures == 1 || failures.is_multiple_of(20) {
                    log::warn!(
                        "{e}; polling every {} ms, retrying the stream (attempt {failures})",
                        settings.interval.as_millis()
                    );
                } else {
                    log::debug!("{e} (attempt {failures})");
                }
                seed = seed.wrapping_add(1);
                let d = RECONNECT.delay(failures, seed);
                e.retry_after().map_or(d, |r| d.max(r))
            }
        };
        if shutdown.wait_timeout(delay) {
            return;
        }
    }
}

/// Reads one open stream until it ends; returns why.
fn listen(
    mut stream: EventStream,
    settings: &Settings,
    state: &WakeState,
    hint: &dyn Fn(),
    tracker_wake: Option<&Waker>,
    broadcasts: Option<&super::broadcasts::Hints>,
) -> End {
    stream = stream.with_silence_limit(settings.silence);
    loop {
        match stream.next_event() {
            Ok(ev) => {
                state.count_event();
                log::trace!("event {}", ev.kind);
                if ev.is_inbox_hint() {
                    hint();
                }
                if ev.is_delegation_hint()
                    && let Some(w) = tracker_wake
                {
                    w.wake();
                }
                // The only place a broadcast's full text exists (§API-2.20).
                if ev.kind == "BROADCAST_MESSAGE"
                    && let Some(b) = broadcasts
                {
                    b.seen(&ev.data);
                }
            }
            Err(end) => return end,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The `wake` object as the status file has it.
    fn json(s: &WakeState) -> serde_json::Value {
        serde_json::to_value(s.report()).unwrap()
    }

    #[test]
    fn state_reports_mode_connection_and_why_polling() {
        let s = WakeState::new(WakeMode::Auto);
        assert!(!s.stream_up());
        assert_eq!(
            json(&s)["polling_because"],
            "event stream not connected yet"
        );
        let before = s.fingerprint();
        s.connected();
        assert!(s.stream_up());
        assert_ne!(s.fingerprint(), before);
        let j = json(&s);
        assert_eq!(j["mode"], "auto");
        assert!(j["events_connected_since"].is_number(), "{j}");
        assert!(j["polling_because"].is_null());
        s.polling("event stream lost: closed".into());
        assert!(!s.stream_up());
        assert_eq!(json(&s)["stream_losses"], 1);
        let p = WakeState::new(WakeMode::Poll);
        assert_eq!(json(&p)["polling_because"], "--wake poll");
    }
}
