//! `RuntimeStatus`: what the heartbeat reports, written by the poll thread and read
//! by the heartbeat thread, behind one mutex. Invariant: `active_tasks` counts
//! backend runs between `begin_task` and `end_task`.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Instant, SystemTime};

use crate::wire::Heartbeat;

/// Outcomes kept for the rolling error rate.
const WINDOW: usize = 20;
/// Consecutive backend failures before the heartbeat says `wedged`.
pub const WEDGE_AFTER: u32 = 3;
/// Longest `sample_error` / `current_task` sent.
const MAX_TEXT: usize = 200;

/// Live numbers for the heartbeat.
#[derive(Debug)]
pub struct RuntimeStatus {
    started: Instant,
    active_tasks: u32,
    current_task: String,
    recent: VecDeque<bool>,
    sample_error: String,
    consecutive_failures: u32,
    was_wedged: bool,
    /// The backend's own trouble (a worker failing at start), wedged like failures.
    trouble: Option<String>,
    /// Counters and times for the status file.
    pub counters: Counters,
}

/// What the status file reports besides the heartbeat numbers.
#[derive(Debug, Default, Clone)]
pub struct Counters {
    /// Messages answered or deliberately not answered.
    pub handled: u64,
    /// Messages the backend gave up on.
    pub failed: u64,
    /// Messages written to the dead-letter file.
    pub dead_lettered: u64,
    /// Last error of any kind, short.
    pub last_error: String,
    /// When the last poll succeeded.
    pub last_poll_ok: Option<SystemTime>,
    /// When the last heartbeat succeeded.
    pub last_heartbeat_ok: Option<SystemTime>,
    /// Why the state cannot be written right now (intake is paused meanwhile).
    pub state_error: Option<String>,
    /// Messages whose outcome could not be saved when the process stopped.
    pub unsaved: u64,
    /// The `seq` the platform last confirmed as acked (§API-2.5).
    pub last_acked_seq: Option<i64>,
    /// Messages whose reply the platform accepted.
    pub answered: u64,
    /// Messages handled without posting an answer (the backend's choice, loop guards).
    pub no_reply: u64,
    /// Inbox rows not given to the backend (filtered, duplicates, malformed).
    pub skipped: u64,
    /// Backend attempts that failed (retried or not).
    pub failed_attempts: u64,
    /// Replies accepted, to peers.
    pub replies_peer: u64,
    /// Replies accepted, to the canvas.
    pub replies_canvas: u64,
    /// Reply posts retried, or re-posted from the state file after a restart.
    pub reply_resends: u64,
    /// Duration of each backend run.
    pub backend_seconds: crate::metrics::Histogram,
    /// From the inbound row's `created_at` to the accepted reply.
    pub inbound_to_reply_seconds: crate::metrics::Histogram,
}

/// Shared handle.
pub type SharedStatus = Arc<Mutex<RuntimeStatus>>;

impl RuntimeStatus {
    /// A status for a connector that started at `started`.
    pub fn new(started: Instant) -> SharedStatus {
        Arc::new(Mutex::new(RuntimeStatus {
            started,
            active_tasks: 0,
            current_task: String::new(),
            recent: VecDeque::with_capacity(WINDOW),
            sample_error: String::new(),
            consecutive_failures: 0,
            was_wedged: false,
            trouble: None,
            counters: Counters::default(),
        }))
    }

    /// A message went to the backend.
    pub fn begin_task(shared: &SharedStatus, summary: &str) {
        let mut s = shared.lock().unwrap_or_else(PoisonError::into_inner);
        s.active_tasks = s.active_tasks.saturating_add(1);
        s.current_task = clip(summary);
    }

    /// A message left the backend: `Some(error)` if the backend gave up on it,
    /// `None` if it succeeded (or was interrupted: that says nothing about health).
    /// Counted once per message, not per attempt, so one bad message does not look
    /// like a wedged backend.
    pub fn end_task(shared: &SharedStatus, error: Option<&str>) {
        let mut s = shared.lock().unwrap_or_else(PoisonError::into_inner);
        s.active_tasks = s.active_tasks.saturating_sub(1);
        if s.active_tasks == 0 {
            s.current_task.clear();
        }
        if s.recent.len() == WINDOW {
            s.recent.pop_front();
        }
        s.recent.push_back(error.is_none());
        match error {
            Some(e) => {
                s.consecutive_failures = s.consecutive_failures.saturating_add(1);
                s.sample_error = clip(e);
                if s.consecutive_failures >= WEDGE_AFTER {
                    s.was_wedged = true;
                }
            }
            None => {
                s.consecutive_failures = 0;
                if s.recent.iter().all(|ok| *ok) {
                    s.sample_error.clear();
                }
            }
        }
    }

    /// A message left the backend because of shutdown: one task fewer, no verdict on
    /// the backend's health.
    pub fn abandon_task(shared: &SharedStatus) {
        let mut s = shared.lock().unwrap_or_else(PoisonError::into_inner);
        s.active_tasks = s.active_tasks.saturating_sub(1);
        if s.active_tasks == 0 {
            s.current_task.clear();
        }
    }

    /// Updates the counters under the lock.
    pub fn count(shared: &SharedStatus, f: impl FnOnce(&mut Counters)) {
        f(&mut shared
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .counters);
    }

    /// A state write failed: intake pauses and the heartbeat says wedged until a
    /// write succeeds again. `true` the first time (log it once, not per retry).
    pub fn state_failed(shared: &SharedStatus, error: &str) -> bool {
        let mut s = shared.lock().unwrap_or_else(PoisonError::into_inner);
        let first = s.counters.state_error.is_none();
        s.counters.state_error = Some(clip(error));
        s.counters.last_error = clip(error);
        s.was_wedged = true;
        first
    }

    /// A state write succeeded: `true` if that ends a failure.
    pub fn state_ok(shared: &SharedStatus) -> bool {
        let mut s = shared.lock().unwrap_or_else(PoisonError::into_inner);
        s.counters.state_error.take().is_some()
    }

    /// Why the state cannot be written, if it cannot.
    pub fn state_error(shared: &SharedStatus) -> Option<String> {
        let s = shared.lock().unwrap_or_else(PoisonError::into_inner);
        s.counters.state_error.clone()
    }

    /// Records an error for the status file (one line, clipped).
    pub fn note_error(shared: &SharedStatus, error: &str) {
        Self::count(shared, |c| c.last_error = clip(error));
    }

    /// What the backend reports about itself (see `Backend::trouble`), read before
    /// every beat.
    pub fn set_trouble(shared: &SharedStatus, trouble: Option<String>) {
        let mut s = shared.lock().unwrap_or_else(PoisonError::into_inner);
        if trouble.is_some() {
            s.was_wedged = true;
        }
        s.trouble = trouble.map(|t| clip(&t));
    }

    fn wedged(&self) -> bool {
        self.consecutive_failures >= WEDGE_AFTER
            || self.trouble.is_some()
            || self.counters.state_error.is_some()
    }

    /// A copy of the counters, the active task count and the wedge flag.
    pub fn snapshot(shared: &SharedStatus) -> (Counters, u32, bool) {
        let s = shared.lock().unwrap_or_else(PoisonError::into_inner);
        (s.counters.clone(), s.active_tasks, s.wedged())
    }

    /// The heartbeat body for `workspace_id`, at `now`.
    pub fn heartbeat(shared: &SharedStatus, workspace_id: &str, now: Instant) -> Heartbeat {
        let s = shared.lock().unwrap_or_else(PoisonError::into_inner);
        let failures = s.recent.iter().filter(|ok| !**ok).count();
        let error_rate = if s.recent.is_empty() {
            0.0
        } else {
            failures as f64 / s.recent.len() as f64
        };
        let state_error = s.counters.state_error.as_ref();
        Heartbeat {
            workspace_id: workspace_id.to_string(),
            error_rate,
            sample_error: match (state_error, &s.trouble) {
                (Some(e), _) => clip(&format!("state not saved, intake paused: {e}")),
                (None, Some(t)) => t.clone(),
                (None, None) => s.sample_error.clone(),
            },
            active_tasks: s.active_tasks,
            current_task: s.current_task.clone(),
            uptime_seconds: now.saturating_duration_since(s.started).as_secs(),
            // Absent while healthy; "wedged" while failing; and after a wedge the
            // explicit empty value the platform needs to recover (§API-2.2).
            runtime_state: if s.wedged() {
                Some("wedged".to_string())
            } else if s.was_wedged {
                Some(String::new())
            } else {
                None
            },
            runtime_metadata: crate::wire::runtime_metadata(),
        }
    }
}

fn clip(s: &str) -> String {
    let one_line: String = s.split_whitespace().collect::<Vec<_>>().join(" ");
    if one_line.chars().count() <= MAX_TEXT {
        one_line
    } else {
        one_line.chars().take(MAX_TEXT - 3).collect::<String>() + "..."
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn honest_heartbeat() {
        let start = Instant::now();
        let s = RuntimeStatus::new(start);
        let hb = RuntimeStatus::heartbeat(&s, "w", start + Duration::from_secs(42));
        assert_eq!(hb.uptime_seconds, 42);
        assert_eq!(hb.active_tasks, 0);
        assert!(hb.runtime_state.is_none());
        RuntimeStatus::begin_task(&s, "reply to x: hi");
        let hb = RuntimeStatus::heartbeat(&s, "w", start);
        assert_eq!(hb.active_tasks, 1);
        assert_eq!(hb.current_task, "reply to x: hi");
        RuntimeStatus::end_task(&s, None);
        let hb = RuntimeStatus::heartbeat(&s, "w", start);
        assert_eq!(hb.active_tasks, 0);
        assert_eq!(hb.current_task, "");
    }

    #[test]
    fn state_failure_wedges_until_a_write_succeeds() {
        let s = RuntimeStatus::new(Instant::now());
        assert!(RuntimeStatus::state_failed(
            &s,
            "journal: No space left on device"
        ));
        assert!(!RuntimeStatus::state_failed(
            &s,
            "journal: No space left on device"
        ));
        let hb = RuntimeStatus::heartbeat(&s, "w", Instant::now());
        assert_eq!(hb.runtime_state.as_deref(), Some("wedged"));
        assert!(
            hb.sample_error.contains("No space left"),
            "{}",
            hb.sample_error
        );
        assert!(RuntimeStatus::snapshot(&s).2);
        assert!(RuntimeStatus::state_ok(&s));
        assert!(!RuntimeStatus::state_ok(&s));
        let hb = RuntimeStatus::heartbeat(&s, "w", Instant::now());
        assert_eq!(hb.runtime_state.as_deref(), Some(""));
        assert_eq!(hb.sample_error, "");
    }

    #[test]
    fn wedge_set_and_cleared() {
        let s = RuntimeStatus::new(Instant::now());
        for _ in 0..WEDGE_AFTER {
            RuntimeStatus::begin_task(&s, "t");
            RuntimeStatus::end_task(&s, Some("exit 1\nboom"));
        }
        let hb = RuntimeStatus::heartbeat(&s, "w", Instant::now());
        assert_eq!(hb.runtime_state.as_deref(), Some("wedged"));
        assert_eq!(hb.sample_error, "exit 1 boom");
        assert!((hb.error_rate - 1.0).abs() < f64::EPSILON);
        RuntimeStatus::begin_task(&s, "t");
        RuntimeStatus::end_task(&s, None);
        let hb = RuntimeStatus::heartbeat(&s, "w", Instant::now());
        assert_eq!(hb.runtime_state.as_deref(), Some(""));
        assert!(hb.error_rate > 0.0 && hb.error_rate < 1.0);
    }
}
