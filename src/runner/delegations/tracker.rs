//! The tracker's memory and decisions: which listed delegations are ours, terminal
//! and not yet delivered, and how far each pending one got. Pure apart from its two
//! files (`files.rs`); time comes in as `now`.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::files::{
    DelegationResult, Logged, Saved, SavedPending, already_logged, log_path, read_saved,
    state_path, unix_now, write_saved,
};
use crate::backoff::Backoff;
use crate::lru::Lru;
use crate::state::StateError;
use crate::status_file::DelegationCounts;

/// Statuses after which a delegation never changes again.
pub const TERMINAL: [&str; 2] = ["completed", "failed"];
/// Failed backend runs (not counting "retry later", exit 75) before a result is
/// given up.
pub const MAX_FAILURES: u32 = 10;
/// "Retry later" answers before a result is given up.
const MAX_RETRY_LATER: u32 = 100;
/// Results waiting for the backend at most; more wait on the platform's list.
const MAX_PENDING: usize = 256;
/// Foreign delegation ids remembered so each is logged once.
const FOREIGN_MEMORY: usize = 1024;
/// Longest text field kept from an entry, in characters.
const MAX_FIELD: usize = 4000;

#[derive(Debug, Clone)]
struct Pending {
    result: DelegationResult,
    logged: Logged,
    failures: u32,
    retry_later: u32,
    busy: u32,
    log_failures: u32,
    next_try: Instant,
    seq: u64,
}

/// Numbers for the status file; the tracker writes, the reporter reads.
#[derive(Debug, Default)]
pub struct Counters {
    pending: AtomicU64,
    delivered: AtomicU64,
    logged: AtomicU64,
    foreign_skipped: AtomicU64,
    given_up: AtomicU64,
}

impl Counters {
    /// The `delegations` object of the status file.
    pub fn report(&self) -> DelegationCounts {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        DelegationCounts {
            pending: get(&self.pending),
            delivered: get(&self.delivered),
            logged: get(&self.logged),
            foreign_skipped: get(&self.foreign_skipped),
            given_up: get(&self.given_up),
        }
    }

    fn add(a: &AtomicU64) {
        a.fetch_add(1, Ordering::Relaxed);
    }
}

/// How one backend run for a result ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Run {
    /// The backend took it (its output is dropped).
    Delivered,
    /// Exit 75: try again later; does not count as a failure.
    RetryLater(String),
    /// Any other failure.
    Failed(String),
    /// Cancelled by shutdown: still pending.
    Interrupted,
}

/// What [`Tracker::deliver`] did with one result.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Delivered (logged and run).
    Delivered,
    /// Logged; the backend is busy, tried again shortly.
    Busy,
    /// Logging or the run failed; tried again after a backoff.
    Retry,
    /// Given up after too many failed runs.
    GaveUp,
    /// Shutdown interrupted the run.
    Interrupted,
    /// Not pending (already delivered).
    Gone,
}

/// The tracker's memory and decisions. Pure apart from its two files; time comes in
/// as `now`.
pub struct Tracker {
    own: String,
    state_path: PathBuf,
    log_path: PathBuf,
    delivered: Lru<String, ()>,
    pending: BTreeMap<String, Pending>,
    warned: Lru<String, ()>,
    counters: Arc<Counters>,
    seed: u64,
    next_seq: u64,
}

impl Tracker {
    /// Loads the tracker of `workspace_id` from `dir`, remembering up to `capacity`
    /// delivered ids. A state file that does not parse or belongs to another
    /// workspace is an error: starting afresh could deliver results twice.
    pub fn open(
        dir: &Path,
        workspace_id: &str,
        capacity: usize,
        counters: Arc<Counters>,
        now: Instant,
    ) -> Result<Tracker, StateError> {
        let state_path = state_path(dir, workspace_id);
        let saved = read_saved(&state_path, workspace_id)?;
        let mut t = Tracker {
            own: workspace_id.to_ascii_lowercase(),
            log_path: log_path(dir, workspace_id),
            state_path,
            delivered: Lru::new(capacity),
            pending: BTreeMap::new(),
            warned: Lru::new(FOREIGN_MEMORY),
            counters,
            seed: crate::uuid::random_u64(),
            next_seq: 0,
        };
        if let Some(saved) = saved {
            for id in saved.delivered {
                t.delivered.insert(id, ());
            }
            for p in saved.pending {
                let id = p.result.delegation_id.clone();
                if !crate::uuid::is_uuid(&id) || t.delivered.contains(&id) {
                    continue;
                }
                let seq = t.take_seq();
                t.pending.insert(
                    id,
                    Pending {
                        result: p.result,
                        // `Intent`: the last process may or may not have written the
                        // line; `write_line` checks the file before appending.
                        logged: p.logged,
                        failures: p.failures,
                        retry_later: p.retry_later,
                        busy: 0,
                        log_failures: 0,
                        next_try: now,
                        seq,
                    },
                );
            }
        }
        t.update_gauge();
        Ok(t)
    }

    fn take_seq(&mut self) -> u64 {
        self.next_seq = self.next_seq.wrapping_add(1);
        self.next_seq
    }

    fn update_gauge(&self) {
        self.counters
            .pending
            .store(self.pending.len() as u64, Ordering::Relaxed);
    }

    /// Takes in one `GET /delegations` answer (newest first): every terminal
    /// delegation of ours not yet delivered becomes pending. Returns how many are new.
    pub fn absorb(&mut self, entries: &[Value], now: Instant) -> usize {
        let mut seen: HashSet<String> = HashSet::new();
        let mut added = 0;
        let mut full_logged = false;
        for e in entries {
            let text = |k: &str| e.get(k).and_then(Value::as_str).unwrap_or("");
            let did = text("delegation_id").trim();
            if did.is_empty() {
                continue; // an activity-log entry without a delegation id
            }
            let source = text("source_id");
            if !source.eq_ignore_ascii_case(&self.own) {
                self.note_foreign(did, source, text("target_id"));
                continue;
            }
            if !crate::uuid::is_uuid(did) {
                self.note_foreign(did, source, text("target_id"));
                continue;
            }
            let did = did.to_ascii_lowercase();
            // Several entries may share an id (dispatch row, result rows): the list
            // is newest first, so the first terminal one is the newest.
            if !TERMINAL.contains(&text("status")) || !seen.insert(did.clone()) {
                continue;
            }
            if self.delivered.get(&did).is_some() || self.pending.contains_key(&did) {
                continue;
            }
            if self.pending.len() >= MAX_PENDING {
                if !full_logged {
                    log::warn!(
                        "{MAX_PENDING} delegation results are waiting for the backend; newer ones wait on the platform"
                    );
                    full_logged = true;
                }
                continue;
            }
            let seq = self.take_seq();
            let result = result_of(e, &did);
            log::info!(
                "delegation {did} to {} {}: delivering the result",
                result.target_id,
                result.status
            );
            self.pending.insert(
                did,
                Pending {
                    result,
                    logged: Logged::No,
                    failures: 0,
                    retry_later: 0,
                    busy: 0,
                    log_failures: 0,
                    next_try: now,
                    seq,
                },
            );
            added += 1;
        }
        if added > 0 {
            self.update_gauge();
            self.save_logged();
        }
        added
    }

    fn note_foreign(&mut self, did: &str, source: &str, target: &str) {
        let key: String = did.chars().take(64).collect();
        if self.warned.contains(&key) {
            return;
        }
        self.warned.insert(key.clone(), ());
        Counters::add(&self.counters.foreign_skipped);
        let source: String = source.chars().take(64).collect();
        if target.eq_ignore_ascii_case(&self.own) && crate::uuid::is_uuid(did) {
            log::debug!("delegation {key} was sent to this workspace by {source:?}: not ours");
        } else {
            log::warn!(
                "skipping delegation {key:?}: its source {source:?} is not this workspace; possible injection"
            );
        }
    }

    /// Pending ids whose next try is due at `now`, oldest first.
    pub fn ready(&self, now: Instant) -> Vec<String> {
        let mut due: Vec<(&u64, &String)> = self
            .pending
            .iter()
            .filter(|(_, p)| p.next_try <= now)
            .map(|(id, p)| (&p.seq, id))
            .collect();
        due.sort();
        due.into_iter().map(|(_, id)| id.clone()).collect()
    }

    /// When the next pending result is due, if any is pending.
    pub fn next_due(&self) -> Option<Instant> {
        self.pending.values().map(|p| p.next_try).min()
    }

    /// Results not yet delivered.
    #[cfg(test)]
    pub fn pending_len(&self) -> usize {
        self.pending.len()
    }

    /// Was `id` delivered (and not yet forgotten)?
    #[cfg(test)]
    pub fn is_delivered(&self, id: &str) -> bool {
        self.delivered.contains(&id.to_ascii_lowercase())
    }

    /// Takes pending result `id` one step: writes its JSONL line if that is not
    /// done, then, unless `busy`, runs it through `run` (given the result and the
    /// attempt number).
    pub fn deliver(
        &mut self,
        id: &str,
        now: Instant,
        busy: bool,
        run: &mut dyn FnMut(&DelegationResult, u32) -> Run,
    ) -> Step {
        let Some(logged) = self.pending.get(id).map(|p| p.logged) else {
            return Step::Gone;
        };
        if logged != Logged::Yes && !self.write_line(id, logged, now) {
            return Step::Retry;
        }
        if busy {
            // Not a failure: check again soon, so the result follows the running task.
            self.seed = self.seed.wrapping_add(1);
            let seed = self.seed;
            if let Some(p) = self.pending.get_mut(id) {
                p.busy = p.busy.saturating_add(1);
                p.next_try = later(now, busy_backoff().delay(p.busy, seed));
            }
            return Step::Busy;
        }
        let Some((result, attempt)) = self.pending.get_mut(id).map(|p| {
            p.busy = 0;
            let attempt = p.failures.saturating_add(p.retry_later).saturating_add(1);
            (p.result.clone(), attempt)
        }) else {
            return Step::Gone;
        };
        match run(&result, attempt) {
            Run::Delivered => {
                self.finish(id);
                Counters::add(&self.counters.delivered);
                log::info!("delegation {id}: result delivered to the backend");
                Step::Delivered
            }
            Run::Interrupted => Step::Interrupted,
            Run::RetryLater(e) => self.after_failure(id, now, &e, true),
            Run::Failed(e) => self.after_failure(id, now, &e, false),
        }
    }

    /// Writes the JSONL line of `id` exactly once; `false` = try again later.
    fn write_line(&mut self, id: &str, logged: Logged, now: Instant) -> bool {
        if logged == Logged::No {
            self.set_logged(id, Logged::Intent);
            if let Err(e) = self.save() {
                // Without the intent on disk a crash after the append would write the
                // line a second time: do not append yet.
                log::error!("delegation {id}: {e}; not logging the result yet");
                self.set_logged(id, Logged::No);
                self.defer(id, now);
                return false;
            }
        }
        let Some(result) = self.pending.get(id).map(|p| p.result.clone()) else {
            return false;
        };
        let written = match already_logged(&self.log_path, id) {
            Ok(true) => {
                log::info!("delegation {id}: already in {}", self.log_path.display());
                Ok(())
            }
            // Unreadable tail: appending could duplicate the line, so wait.
            Err(e) => Err(e),
            Ok(false) => crate::state::append_line(&self.log_path, &result.to_record(unix_now()))
                .map(|()| {
                    Counters::add(&self.counters.logged);
                }),
        };
        if let Err(e) = written {
            log::error!(
                "delegation {id}: cannot write {}: {e}",
                self.log_path.display()
            );
            self.defer(id, now);
            return false;
        }
        self.set_logged(id, Logged::Yes);
        // Only a crash before this save matters, and the tail check covers it.
        self.save_logged();
        true
    }

    fn set_logged(&mut self, id: &str, logged: Logged) {
        if let Some(p) = self.pending.get_mut(id) {
            p.logged = logged;
        }
    }

    /// Backs off result `id` after a failure to log or save it.
    fn defer(&mut self, id: &str, now: Instant) {
        self.seed = self.seed.wrapping_add(1);
        let seed = self.seed;
        if let Some(p) = self.pending.get_mut(id) {
            p.log_failures = p.log_failures.saturating_add(1);
            p.next_try = later(now, failure_backoff().delay(p.log_failures, seed));
        }
    }

    fn after_failure(&mut self, id: &str, now: Instant, error: &str, retry_later: bool) -> Step {
        self.seed = self.seed.wrapping_add(1);
        let seed = self.seed;
        let Some(p) = self.pending.get_mut(id) else {
            return Step::Gone;
        };
        let (count, max) = if retry_later {
            p.retry_later = p.retry_later.saturating_add(1);
            (p.retry_later, MAX_RETRY_LATER)
        } else {
            p.failures = p.failures.saturating_add(1);
            (p.failures, MAX_FAILURES)
        };
        if count >= max {
            log::error!(
                "delegation {id}: giving up after {count} backend runs ({error}); the result stays in {}",
                self.log_path.display()
            );
            self.finish(id);
            Counters::add(&self.counters.given_up);
            return Step::GaveUp;
        }
        let delay = failure_backoff().delay(count, seed);
        p.next_try = later(now, delay);
        log::warn!(
            "delegation {id}: {error}; delivering the result again in {} s",
            delay.as_secs()
        );
        self.save_logged();
        Step::Retry
    }

    /// Moves `id` from pending to delivered and saves.
    fn finish(&mut self, id: &str) {
        self.pending.remove(id);
        self.delivered.insert(id.to_string(), ());
        self.update_gauge();
        self.save_logged();
    }

    fn save_logged(&self) {
        if let Err(e) = self.save() {
            log::error!("{e}");
        }
    }

    /// Writes the state file atomically (0600).
    pub fn save(&self) -> Result<(), StateError> {
        let mut pending: Vec<&Pending> = self.pending.values().collect();
        pending.sort_by_key(|p| p.seq);
        let saved = Saved {
            workspace_id: self.own.clone(),
            delivered: self.delivered.keys_oldest_first().cloned().collect(),
            pending: pending
                .into_iter()
                .map(|p| SavedPending {
                    result: p.result.clone(),
                    logged: p.logged,
                    failures: p.failures,
                    retry_later: p.retry_later,
                })
                .collect(),
        };
        write_saved(&self.state_path, &saved)
    }
}

fn result_of(e: &Value, did: &str) -> DelegationResult {
    let field = |k: &str| {
        e.get(k)
            .and_then(Value::as_str)
            .map(|s| s.chars().take(MAX_FIELD).collect::<String>())
            .unwrap_or_default()
    };
    let updated = field("updated_at");
    let created = field("created_at");
    DelegationResult {
        delegation_id: did.to_string(),
        target_id: field("target_id"),
        status: field("status"),
        summary: field("summary"),
        response_preview: field("response_preview"),
        error: field("error"),
        updated_at: [updated, created].into_iter().find(|s| !s.is_empty()),
    }
}

pub(super) fn later(now: Instant, d: Duration) -> Instant {
    now.checked_add(d).unwrap_or(now)
}

/// While every worker is busy: re-check soon, so a result follows the running task.
fn busy_backoff() -> Backoff {
    Backoff {
        base: Duration::from_millis(250),
        max: Duration::from_secs(2),
        jitter: 0.25,
    }
}

fn failure_backoff() -> Backoff {
    Backoff {
        base: Duration::from_secs(2),
        max: Duration::from_secs(300),
        jitter: 0.25,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const OWN: &str = "11111111-1111-4111-8111-111111111111";
    const PEER: &str = "22222222-2222-4222-8222-222222222222";
    const D1: &str = "aaaaaaaa-0000-4000-8000-000000000001";
    const D2: &str = "aaaaaaaa-0000-4000-8000-000000000002";
    const D3: &str = "aaaaaaaa-0000-4000-8000-000000000003";

    struct Dir(PathBuf);

    impl Dir {
        fn new() -> Dir {
            let d = std::env::temp_dir()
                .join(format!("molecule-delegations-{}", crate::uuid::new_v4()));
            crate::state::ensure_dir(&d).unwrap();
            Dir(d)
        }

        fn open(&self, capacity: usize) -> Tracker {
            Tracker::open(&self.0, OWN, capacity, Arc::default(), Instant::now()).unwrap()
        }

        fn lines(&self) -> Vec<Value> {
            std::fs::read_to_string(log_path(&self.0, OWN))
                .unwrap_or_default()
                .lines()
                .map(|l| serde_json::from_str(l).unwrap())
                .collect()
        }
    }

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn entry(did: &str, source: &str, status: &str) -> Value {
        json!({
            "delegation_id": did, "source_id": source, "target_id": PEER,
            "direction": "sent", "summary": "write the report", "status": status,
            "response_preview": "done: 42", "created_at": "2026-01-01T00:00:00Z",
        })
    }

    /// Delivers everything due at `now`; returns the ids the backend saw.
    fn drive(t: &mut Tracker, now: Instant, busy: bool) -> Vec<String> {
        let mut seen = Vec::new();
        for id in t.ready(now) {
            t.deliver(&id, now, busy, &mut |r, _| {
                seen.push(r.delegation_id.clone());
                Run::Delivered
            });
        }
        seen
    }

    #[test]
    fn foreign_sources_are_skipped_and_logged_once() {
        let dir = Dir::new();
        let mut t = dir.open(64);
        let list = [
            entry(D1, PEER, "completed"),
            entry(D2, "", "completed"),
            entry(D3, OWN, "completed"),
        ];
        assert_eq!(t.absorb(&list, Instant::now()), 1);
        assert_eq!(t.absorb(&list, Instant::now()), 0);
        assert_eq!(t.counters.foreign_skipped.load(Ordering::Relaxed), 2);
        assert_eq!(drive(&mut t, Instant::now(), false), [D3]);
        assert_eq!(dir.lines().len(), 1);
    }

    #[test]
    fn only_terminal_statuses_are_delivered() {
        let dir = Dir::new();
        let mut t = dir.open(64);
        let now = Instant::now();
        for status in [
            "pending",
            "queued",
            "dispatched",
            "in_progress",
            "stuck",
            "",
        ] {
            assert_eq!(t.absorb(&[entry(D1, OWN, status)], now), 0, "{status}");
        }
        assert!(drive(&mut t, now, false).is_empty());
        assert_eq!(t.absorb(&[entry(D1, OWN, "failed")], now), 1);
        assert_eq!(t.absorb(&[entry(D2, OWN, "completed")], now), 1);
        assert_eq!(drive(&mut t, now, false), [D1, D2]);
    }

    #[test]
    fn newest_terminal_entry_wins() {
        let dir = Dir::new();
        let mut t = dir.open(64);
        let mut newest = entry(D1, OWN, "failed");
        newest["error"] = json!("target crashed");
        let list = [
            entry(D1, OWN, "dispatched"),
            newest,
            entry(D1, OWN, "completed"),
        ];
        assert_eq!(t.absorb(&list, Instant::now()), 1);
        drive(&mut t, Instant::now(), false);
        let lines = dir.lines();
        assert_eq!(lines.len(), 1);
        assert_eq!(lines[0]["status"], "failed");
        assert_eq!(lines[0]["error"], "target crashed");
    }

    #[test]
    fn exactly_once_across_a_restart() {
        let dir = Dir::new();
        let list = [entry(D1, OWN, "completed")];
        {
            let mut t = dir.open(64);
            t.absorb(&list, Instant::now());
            assert_eq!(drive(&mut t, Instant::now(), false), [D1]);
        }
        let mut t = dir.open(64);
        assert!(t.is_delivered(D1));
        assert_eq!(t.absorb(&list, Instant::now()), 0);
        assert!(drive(&mut t, Instant::now(), false).is_empty());
        let lines = dir.lines();
        assert_eq!(lines.len(), 1);
        assert_eq!(lines[0]["delegation_id"], D1);
        assert_eq!(lines[0]["target_id"], PEER);
        assert_eq!(lines[0]["response_preview"], "done: 42");
        assert!(lines[0]["time"].as_u64().unwrap() > 0);
    }

    #[test]
    fn a_restart_between_log_and_delivery_delivers_once_and_logs_once() {
        let dir = Dir::new();
        let list = [entry(D1, OWN, "completed")];
        {
            let mut t = dir.open(64);
            t.absorb(&list, Instant::now());
            // The backend is busy: logged, not run. Then the process stops.
            assert!(drive(&mut t, Instant::now(), true).is_empty());
            assert_eq!(dir.lines().len(), 1);
        }
        let mut t = dir.open(64);
        assert_eq!(t.pending_len(), 1, "still pending after the restart");
        t.absorb(&list, Instant::now());
        assert_eq!(drive(&mut t, Instant::now(), false), [D1]);
        assert_eq!(dir.lines().len(), 1, "the line is not written again");
    }

    #[test]
    fn a_crash_right_after_the_append_does_not_log_twice() {
        let dir = Dir::new();
        let r = result_of(&entry(D1, OWN, "completed"), D1);
        // What a crash between the append and the following save leaves behind.
        let saved = json!({"workspace_id": OWN, "delivered": [],
            "pending": [{"result": r, "logged": "intent"}]});
        std::fs::write(state_path(&dir.0, OWN), saved.to_string()).unwrap();
        crate::state::append_line(&log_path(&dir.0, OWN), &r.to_record(1)).unwrap();
        let mut t = dir.open(64);
        assert_eq!(drive(&mut t, Instant::now(), false), [D1]);
        assert_eq!(dir.lines().len(), 1);
        // And the intent without the line (crash before the append) writes it once.
        let dir = Dir::new();
        std::fs::write(state_path(&dir.0, OWN), saved.to_string()).unwrap();
        let mut t = dir.open(64);
        assert_eq!(drive(&mut t, Instant::now(), false), [D1]);
        assert_eq!(dir.lines().len(), 1);
    }

    #[test]
    fn a_busy_backend_delays_but_does_not_lose_a_result() {
        let dir = Dir::new();
        let mut t = dir.open(64);
        let t0 = Instant::now();
        t.absorb(&[entry(D1, OWN, "completed")], t0);
        for i in 0..5 {
            let now = t.next_due().unwrap().max(t0);
            assert!(drive(&mut t, now, true).is_empty(), "busy round {i}");
            assert!(t.next_due().unwrap() > now, "retried later, not dropped");
            assert!(t.next_due().unwrap() <= now + Duration::from_secs(2));
        }
        assert_eq!(t.pending_len(), 1);
        let now = t.next_due().unwrap();
        assert_eq!(drive(&mut t, now, false), [D1]);
        assert_eq!(t.pending_len(), 0);
        assert_eq!(dir.lines().len(), 1);
    }

    #[test]
    fn a_failing_backend_is_retried_with_backoff_then_given_up() {
        let dir = Dir::new();
        let mut t = dir.open(64);
        let t0 = Instant::now();
        t.absorb(&[entry(D1, OWN, "completed")], t0);
        let mut attempts = Vec::new();
        let mut now = t0;
        for _ in 0..MAX_FAILURES {
            let ids = t.ready(now);
            assert_eq!(ids, [D1]);
            t.deliver(D1, now, false, &mut |_, attempt| {
                attempts.push(attempt);
                Run::Failed("backend: command exited with status 1".into())
            });
            match t.next_due() {
                Some(due) => {
                    assert!(due > now);
                    now = due;
                }
                None => break,
            }
        }
        assert_eq!(attempts, (1..=MAX_FAILURES).collect::<Vec<_>>());
        assert_eq!(t.pending_len(), 0, "given up");
        assert!(t.is_delivered(D1), "and never tried again");
        assert_eq!(t.counters.given_up.load(Ordering::Relaxed), 1);
        assert_eq!(dir.lines().len(), 1, "the result stays in the file");
    }

    #[test]
    fn retry_later_and_interrupted_keep_it_pending() {
        let dir = Dir::new();
        let mut t = dir.open(64);
        let now = Instant::now();
        t.absorb(&[entry(D1, OWN, "completed")], now);
        let step = t.deliver(D1, now, false, &mut |_, _| Run::Interrupted);
        assert_eq!(step, Step::Interrupted);
        assert_eq!(t.ready(now), [D1]);
        let step = t.deliver(D1, now, false, &mut |_, _| Run::RetryLater("75".into()));
        assert_eq!(step, Step::Retry);
        assert!(t.ready(now).is_empty());
        assert_eq!(t.pending_len(), 1);
    }

    #[test]
    fn delivered_ids_are_a_bounded_lru_oldest_evicted_first() {
        let dir = Dir::new();
        let mut t = dir.open(2);
        let now = Instant::now();
        for d in [D1, D2, D3] {
            t.absorb(&[entry(d, OWN, "completed")], now);
            drive(&mut t, now, false);
        }
        let saved: Value =
            serde_json::from_slice(&std::fs::read(state_path(&dir.0, OWN)).unwrap()).unwrap();
        assert_eq!(saved["delivered"], json!([D2, D3]));
        let t = dir.open(2);
        assert!(!t.is_delivered(D1) && t.is_delivered(D2) && t.is_delivered(D3));
    }

    #[test]
    fn a_delivered_id_still_listed_is_refreshed() {
        let dir = Dir::new();
        let mut t = dir.open(2);
        let now = Instant::now();
        for d in [D1, D2] {
            t.absorb(&[entry(d, OWN, "completed")], now);
            drive(&mut t, now, false);
        }
        // D1 is listed again, so it becomes the most recent and D2 goes first.
        t.absorb(&[entry(D1, OWN, "completed")], now);
        t.absorb(&[entry(D3, OWN, "completed")], now);
        drive(&mut t, now, false);
        assert!(t.is_delivered(D1) && !t.is_delivered(D2));
    }

    #[test]
    fn odd_ids_and_bad_state_files_are_refused() {
        let dir = Dir::new();
        let mut t = dir.open(64);
        assert_eq!(
            t.absorb(&[entry("../../x", OWN, "completed")], Instant::now()),
            0
        );
        std::fs::write(state_path(&dir.0, OWN), "{not json").unwrap();
        assert!(matches!(
            Tracker::open(&dir.0, OWN, 64, Arc::default(), Instant::now()),
            Err(StateError::Corrupt { .. })
        ));
        std::fs::write(
            state_path(&dir.0, OWN),
            json!({"workspace_id": PEER}).to_string(),
        )
        .unwrap();
        assert!(Tracker::open(&dir.0, OWN, 64, Arc::default(), Instant::now()).is_err());
    }

    #[test]
    fn files_are_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = Dir::new();
        let mut t = dir.open(64);
        t.absorb(&[entry(D1, OWN, "completed")], Instant::now());
        drive(&mut t, Instant::now(), false);
        for p in [state_path(&dir.0, OWN), log_path(&dir.0, OWN)] {
            let mode = std::fs::metadata(&p).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600, "{}", p.display());
        }
    }

    #[test]
    fn the_request_text_is_neutral_and_carries_the_result() {
        let mut r = result_of(&entry(D1, OWN, "completed"), D1);
        assert_eq!(
            r.request_text(),
            format!("Delegation {D1} to workspace {PEER} completed.\n\nResult preview:\ndone: 42")
        );
        r.status = "failed".into();
        r.response_preview.clear();
        r.error = "timeout".into();
        assert!(r.request_text().ends_with("failed.\n\nError:\ntimeout"));
    }
}
