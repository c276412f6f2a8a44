//! Writes the status file (its type: `crate::status_file`): what a watchdog or
//! `molecule status` needs to tell a healthy connector from a stuck one (last good
//! poll and heartbeat, cursor, counters, in-flight, last error, wedged; the peer
//! cache's size and the delegation tracker's counters). Rewritten at most once a
//! second.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use serde_json::{Value, json};

use super::status::{Counters, RuntimeStatus, SharedStatus};
use crate::api::RequestStats;
use crate::status_file::{IDLE_EVERY, PeerCacheReport, RunState, StatusFile, status_path, unix};

/// How often the file is rewritten while running.
const EVERY: Duration = Duration::from_secs(1);

/// Writes the status file on a schedule.
pub struct Reporter {
    path: PathBuf,
    workspace_id: String,
    poll_interval: Duration,
    started: SystemTime,
    last_write: Option<Instant>,
    /// What the last write said, minus the times.
    fingerprint: String,
    /// A change seen too soon after the last write, to be written once [`EVERY`]
    /// has passed (see [`Reporter::next_write_in`]).
    pending: bool,
    peers: Option<Arc<crate::peers::PeerCache>>,
    delegations: Option<Arc<super::delegations::Counters>>,
    /// Event-stream state and the safety-poll period used while it is up.
    wake: Option<(Arc<super::wake::WakeState>, Duration)>,
    /// The rate budget of this workspace's bucket.
    rate: Option<Arc<super::rate::RateBudget>>,
    /// The last write failed (logged once, not every second).
    failing: bool,
    /// The last document written, for the process's metrics file.
    published: Option<Arc<Mutex<Option<StatusFile>>>>,
}

impl Reporter {
    /// A reporter for `workspace_id` in `dir`.
    pub fn new(dir: &Path, workspace_id: &str, poll_interval: Duration) -> Self {
        Reporter {
            path: status_path(dir, workspace_id),
            workspace_id: workspace_id.to_string(),
            poll_interval,
            started: SystemTime::now(),
            last_write: None,
            fingerprint: String::new(),
            pending: false,
            peers: None,
            delegations: None,
            wake: None,
            rate: None,
            failing: false,
            published: None,
        }
    }

    /// Also keeps every document written in `slot` (the metrics file renders it).
    pub fn with_published(mut self, slot: Arc<Mutex<Option<StatusFile>>>) -> Self {
        self.published = Some(slot);
        self
    }

    /// Also reports the peer cache's size and the delegation tracker's counters.
    pub fn with_extras(
        mut self,
        peers: Option<Arc<crate::peers::PeerCache>>,
        delegations: Option<Arc<super::delegations::Counters>>,
    ) -> Self {
        self.peers = peers;
        self.delegations = delegations;
        self
    }

    /// Also reports how new messages are noticed (event stream or polling, and why);
    /// while the stream is up the blind poll period is `safety_poll`.
    pub fn with_wake(mut self, wake: Arc<super::wake::WakeState>, safety_poll: Duration) -> Self {
        self.wake = Some((wake, safety_poll));
        self
    }

    /// Also reports the rate budget as last seen (limit, remaining, reset).
    pub fn with_rate(mut self, rate: Arc<super::rate::RateBudget>) -> Self {
        self.rate = Some(rate);
        self
    }

    /// The current blind-poll period: `molecule status` judges staleness by it.
    fn poll_interval(&self) -> Duration {
        match &self.wake {
            Some((w, safety)) if w.stream_up() => *safety,
            _ => self.poll_interval,
        }
    }

    /// Rewrites the file: within a second of a change (counters, cursor, in flight,
    /// error, wedge), and every [`IDLE_EVERY`] otherwise so the poll and heartbeat
    /// times stay fresh for `molecule status`. Idle, that is one small write per
    /// 5 s instead of one per poll.
    pub fn maybe_write(
        &mut self,
        status: &SharedStatus,
        requests: Option<&RequestStats>,
        cursor: Option<&str>,
        in_flight: usize,
    ) {
        let (c, active, wedged) = RuntimeStatus::snapshot(status);
        // The first successful poll and heartbeat count as changes: until they are
        // written, `molecule status` says the connector has not polled yet.
        let fingerprint = format!(
            "{}/{}/{}/{}/{}/{in_flight}/{active}/{wedged}/{cursor:?}/{}/{:?}/{}",
            c.last_poll_ok.is_some(),
            c.last_heartbeat_ok.is_some(),
            c.handled,
            c.failed,
            c.dead_lettered,
            c.last_error,
            c.state_error,
            self.wake
                .as_ref()
                .map(|(w, _)| w.fingerprint())
                .unwrap_or_default()
        );
        let since = self.last_write.map(|t| t.elapsed());
        let due = match since {
            None => true,
            Some(s) if fingerprint != self.fingerprint => s >= EVERY,
            Some(s) => s >= IDLE_EVERY,
        };
        self.pending = !due && fingerprint != self.fingerprint;
        if due {
            self.fingerprint = fingerprint;
            self.write(status, requests, cursor, in_flight, RunState::Running, None);
        }
    }

    /// Whether [`Reporter::maybe_write`] could do anything now: not while a change
    /// is already waiting for [`EVERY`] to pass (it only notes changes then).
    pub fn worth_checking(&self) -> bool {
        !(self.pending && self.last_write.is_some_and(|t| t.elapsed() < EVERY))
    }

    /// How long the caller of [`Reporter::maybe_write`] may wait before calling it
    /// again without leaving a change unwritten for more than [`EVERY`] or the
    /// file older than [`IDLE_EVERY`].
    pub fn next_write_in(&self) -> Duration {
        let every = if self.pending { EVERY } else { IDLE_EVERY };
        self.last_write
            .map_or(Duration::ZERO, |t| every.saturating_sub(t.elapsed()))
    }

    /// Rewrites the file now.
    pub fn write(
        &mut self,
        status: &SharedStatus,
        requests: Option<&RequestStats>,
        cursor: Option<&str>,
        in_flight: usize,
        state: RunState,
        stop_reason: Option<&str>,
    ) {
        let (c, active, wedged) = RuntimeStatus::snapshot(status);
        let doc = StatusFile {
            workspace_id: self.workspace_id.clone(),
            pid: std::process::id(),
            state,
            stop_reason: stop_reason.map(str::to_string),
            started_at: unix(Some(self.started)),
            updated_at: unix(Some(SystemTime::now())),
            poll_interval_ms: Some(
                u64::try_from(self.poll_interval().as_millis()).unwrap_or(u64::MAX),
            ),
            last_poll_ok: unix(c.last_poll_ok),
            last_heartbeat_ok: unix(c.last_heartbeat_ok),
            cursor: cursor.map(str::to_string),
            handled: c.handled,
            failed: c.failed,
            dead_lettered: c.dead_lettered,
            in_flight: in_flight as u64,
            active_tasks: active,
            last_error: c.last_error.clone(),
            wedged,
            state_error: c.state_error.clone(),
            last_acked_seq: c.last_acked_seq,
            metrics: metrics_json(&c, requests),
            peer_cache: self.peers.as_ref().map(|p| PeerCacheReport {
                size: p.len(),
                capacity: p.capacity(),
                high_water: p.high_water(),
                in_flight: p.in_flight(),
            }),
            delegations: self.delegations.as_ref().map(|d| d.report()),
            wake: self.wake.as_ref().map(|(w, _)| w.report()),
            rate_budget: self.rate.as_ref().map(|r| r.report()),
        };
        match doc.write(&self.path) {
            Ok(()) => self.failing = false,
            Err(e) if !self.failing => {
                self.failing = true;
                log::warn!("status file {}: {e}", self.path.display());
            }
            Err(_) => {}
        }
        if let Some(slot) = &self.published {
            *slot.lock().unwrap_or_else(PoisonError::into_inner) = Some(doc);
        }
        self.last_write = Some(Instant::now());
    }
}

/// What the poll thread last published, and the live counters to bring it up to date.
pub struct Last<'a> {
    pub doc: &'a Mutex<Option<StatusFile>>,
    pub status: &'a SharedStatus,
    pub requests: &'a RequestStats,
}

/// Records in the status file that the workspace stopped with `reason`, unless this
/// process's poll thread already wrote its own final status (which has the counters).
/// With `last` (a stop that gave up on the poll thread) what it last published is
/// written as stopped, so the file keeps its cursor and up-to-date counters.
pub fn record_stop(
    dir: &Path,
    workspace_id: &str,
    poll_interval: Duration,
    reason: &str,
    last: Option<Last<'_>>,
) {
    // A forced stop overrides whatever the poll thread managed to write.
    let forced = reason.starts_with("forced");
    let published = last.and_then(|l| {
        let doc = l.doc.lock().unwrap_or_else(PoisonError::into_inner).clone();
        doc.map(|d| (d, l))
    });
    if let Some((mut doc, last)) = published {
        if doc.state == RunState::Stopped && !forced {
            return;
        }
        refresh(&mut doc, last.status, last.requests);
        doc.state = RunState::Stopped;
        doc.stop_reason = Some(reason.to_string());
        doc.updated_at = unix(Some(SystemTime::now()));
        let path = status_path(dir, workspace_id);
        if let Err(e) = doc.write(&path) {
            log::warn!("status file {}: {e}", path.display());
        }
        return;
    }
    let already = !forced
        && StatusFile::read(&status_path(dir, workspace_id))
            .ok()
            .flatten()
            .is_some_and(|f| f.state == RunState::Stopped && f.pid == std::process::id());
    if already {
        return;
    }
    let status = RuntimeStatus::new(Instant::now());
    RuntimeStatus::note_error(&status, reason);
    Reporter::new(dir, workspace_id, poll_interval).write(
        &status,
        None,
        None,
        0,
        RunState::Stopped,
        Some(reason),
    );
}

/// Brings a published document's counters and times up to date (the metrics file is
/// written more often than an idle status file, and once more after every thread
/// has stopped).
pub fn refresh(doc: &mut StatusFile, status: &SharedStatus, requests: &RequestStats) {
    let (c, active, wedged) = RuntimeStatus::snapshot(status);
    doc.last_poll_ok = unix(c.last_poll_ok);
    doc.last_heartbeat_ok = unix(c.last_heartbeat_ok);
    doc.active_tasks = active;
    doc.wedged = wedged;
    doc.metrics = metrics_json(&c, Some(requests));
}

/// The counters `molecule_*` metrics are rendered from (see `metrics.rs`).
fn metrics_json(c: &Counters, requests: Option<&RequestStats>) -> Value {
    let list: Vec<Value> = requests
        .map(RequestStats::requests)
        .unwrap_or_default()
        .into_iter()
        .map(|(endpoint, code, count)| json!({"endpoint": endpoint, "code": code, "count": count}))
        .collect();
    json!({
        "build": crate::metrics::build_info(),
        "messages": {
            "answered": c.answered,
            "no_reply": c.no_reply,
            "skipped": c.skipped,
            "dead_lettered": c.dead_lettered,
            "failed_attempt": c.failed_attempts,
        },
        "replies": {"peer": c.replies_peer, "canvas": c.replies_canvas},
        "reply_resends": c.reply_resends,
        "requests": list,
        "rate_limited": requests.map_or(0, RequestStats::rate_limited),
        "rate_remaining": requests.and_then(RequestStats::rate_remaining),
        "backend_seconds": c.backend_seconds.to_json(),
        "inbound_to_reply_seconds": c.inbound_to_reply_seconds.to_json(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runner::status::RuntimeStatus;

    #[test]
    fn a_change_right_after_a_write_is_written_within_a_second() {
        let dir = std::env::temp_dir().join(format!("molecule-report-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let status = RuntimeStatus::new(Instant::now());
        let mut r = Reporter::new(&dir, "ws", Duration::from_secs(3600));
        r.maybe_write(&status, None, None, 0);
        let read = || StatusFile::read(&status_path(&dir, "ws")).unwrap().unwrap();
        assert_eq!(read().last_poll_ok, None);
        // Nothing changed: the next write is the idle refresh.
        r.maybe_write(&status, None, None, 0);
        assert!(r.next_write_in() > EVERY);
        // The first poll succeeds just after the write: too soon to write it now,
        // but the caller is told to come back within a second.
        RuntimeStatus::count(&status, |c| c.last_poll_ok = Some(SystemTime::now()));
        r.maybe_write(&status, None, None, 0);
        assert_eq!(read().last_poll_ok, None);
        assert!(r.next_write_in() <= EVERY);
        r.last_write = r.last_write.and_then(|t| t.checked_sub(EVERY));
        assert_eq!(r.next_write_in(), Duration::ZERO);
        r.maybe_write(&status, None, None, 0);
        assert!(read().last_poll_ok.is_some());
        assert!(r.next_write_in() > EVERY);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
