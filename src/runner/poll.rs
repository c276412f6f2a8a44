//! The poll thread: fetch pages of the inbox, filter and dedupe the rows, hand
//! messages to the worker threads (at most one per sender at a time, up to
//! `--concurrency` at once), and move the cursor to the low-water mark as they
//! finish. It owns the fetch position and the cursor; workers own their messages.

use std::collections::{HashMap, HashSet};
use std::sync::mpsc::{self, Receiver, Sender, SyncSender};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use serde_json::Value;

use crate::api::{ApiError, Kind, Platform, Since, before_ts_after};
use crate::backoff::Backoff;
use crate::config::ConfigError;
use crate::credentials::Standing;
use crate::error::Error;
use crate::inbox::{self, Inbound, Skip};
use crate::shutdown::{Shutdown, StopReason};
use crate::state::Store;
use crate::uuid::WorkspaceId;

use super::auth::{AuthVerdict, after_unauthorized};
use super::dispatch::Finish;
use super::report::Reporter;
use super::status::{RuntimeStatus, SharedStatus};
use super::supervise::Progress;
use crate::status_file::RunState;

/// Rows per page. A full page means more is waiting: fetch again at once.
const PAGE_LIMIT: u32 = 100;
/// Rows asked for on a cold start (§API-4.2).
const COLD_LIMIT: u32 = 500;
/// Bytes accepted for one page; above it the page size is halved.
const PAGE_BYTES: u64 = 32 * 1024 * 1024;
/// Failed polls after which a `--once` run gives up (exit 75; about 15 s of backoff).
const ONCE_POLL_ATTEMPTS: u32 = 5;
/// Consecutive permanent poll errors after which the connector stops (a few minutes).
const MAX_PERMANENT_POLL_FAILURES: u32 = 12;
/// Full pages in a row that do not move the cursor before a `--once` run gives up.
const STUCK_PAGES_ONCE: u32 = 3;
/// Acks go out at most this often (and once more at shutdown).
const ACK_EVERY: Duration = Duration::from_secs(5);
/// Fetched rows not yet behind the cursor before fetching pauses (bounds memory).
const MAX_OUTSTANDING: usize = 1000;

/// Settings the poll thread needs.
pub struct PollSettings {
    /// Pause between polls when the inbox is empty.
    pub interval: Duration,
    /// Cold-start window.
    pub since_secs: u64,
    /// Workers.
    pub concurrency: usize,
    /// Cron mode: stop once the inbox is drained.
    pub once: bool,
    /// Stop after this many messages.
    pub max_messages: Option<u64>,
    /// Stop after this long without messages.
    pub idle_exit: Option<Duration>,
}

/// A message for a worker.
pub struct Job {
    /// Tracker ticket.
    pub ticket: u64,
    /// Sender key.
    pub sender: String,
    /// The message.
    pub msg: Inbound,
}

/// What the poll thread waits for.
pub enum Event {
    /// A worker finished (or was interrupted on) a job.
    Finished {
        /// Tracker ticket.
        ticket: u64,
        /// Sender key.
        sender: String,
        /// How it ended.
        finish: Finish,
    },
    /// A job's backend is done and its reply is being posted: the worker may take
    /// another job, the sender stays busy until `Finished`.
    Posting {
        /// Tracker ticket.
        ticket: u64,
    },
    /// Shutdown was requested: stop waiting.
    Wake,
    /// The event stream says a row was logged, or its health changed: poll now
    /// (unless a poll started after this was sent; the platform sends two events
    /// per message).
    Hint(Instant),
}

/// The poll loop and what it owns.
pub struct Poller {
    client: Arc<dyn Platform>,
    settings: PollSettings,
    store: Arc<Mutex<Store>>,
    shutdown: Shutdown,
    order: super::order::Order,
    /// Jobs tracked until `Finished`; the message moves to its worker on release.
    jobs: HashMap<u64, Option<Inbound>>,
    /// Jobs sent to the workers (queued for one, or in a backend), not yet
    /// `Posting` or `Finished`.
    running: usize,
    /// Jobs whose reply is being posted (`Posting`, not yet `Finished`).
    posting: HashSet<u64>,
    fetch_from: Option<String>,
    page_limit: u32,
    backoff: Backoff,
    seed: u64,
    /// The cold-start window is counted back from here: start-up, or the last good
    /// poll before a 410. A slow first poll (platform down) must not shrink it.
    window_anchor: Instant,
    last_good_poll: Instant,
    failures: u32,
    /// Consecutive failures that retrying cannot fix (4xx other than 401/410).
    permanent_failures: u32,
    logged_first_poll: bool,
    status: SharedStatus,
    reporter: Reporter,
    /// Messages handed to workers so far (for `--max-messages`).
    released: u64,
    /// The last fetch returned a short page: nothing more is waiting.
    caught_up: bool,
    last_activity: Instant,
    /// Names senders from the peer cache and queues lookups (never blocks).
    peers: Option<crate::peers::Enrichment>,
    /// Wakes the delegation tracker when a `delegate_result` row arrives.
    delegation_wake: Option<super::delegations::Waker>,
    /// Event-stream health: decides between the safety-net and the fallback period.
    wake: Option<(Arc<super::wake::WakeState>, Duration)>,
    /// When the last fetch started (older hints are already answered).
    last_fetch_at: Option<Instant>,
    /// A hint newer than the last fetch arrived.
    hinted: bool,
    /// The last fetch failed: its backoff wins over hints.
    retrying: bool,
    /// Progress acks (§API-2.5).
    acks: Acks,
    /// A cold start reading its window backwards (see [`Poller::scan_window`]).
    scan: Option<WindowScan>,
    /// Full pages in a row that did not move the fetch position.
    stuck_pages: u32,
    /// Failed state checkpoints in a row, and when to try the next.
    state_attempts: u32,
    state_retry_at: Instant,
    /// Tells the supervisor the loop is not stuck.
    progress: Arc<Progress>,
    /// Called once, after the first successful poll (readiness).
    on_ready: Option<Box<dyn FnOnce() + Send>>,
}

impl Poller {
    /// A poller starting from the store's cursor.
    pub fn new(
        client: Arc<dyn Platform>,
        settings: PollSettings,
        store: Arc<Mutex<Store>>,
        shutdown: Shutdown,
        status: SharedStatus,
        reporter: Reporter,
    ) -> Self {
        let fetch_from = store
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .cursor()
            .map(str::to_string);
        Poller {
            client,
            settings,
            store,
            shutdown,
            order: super::order::Order::new(),
            jobs: HashMap::new(),
            running: 0,
            posting: HashSet::new(),
            fetch_from,
            page_limit: PAGE_LIMIT,
            // Polls give up waiting sooner than other calls: a long pause after an
            // outage is added straight to message latency.
            backoff: Backoff {
                max: Duration::from_secs(15),
                ..Backoff::default()
            },
            seed: crate::uuid::random_u64(),
            window_anchor: Instant::now(),
            last_good_poll: Instant::now(),
            failures: 0,
            permanent_failures: 0,
            logged_first_poll: false,
            status,
            reporter,
            released: 0,
            caught_up: false,
            last_activity: Instant::now(),
            peers: None,
            delegation_wake: None,
            wake: None,
            last_fetch_at: None,
            hinted: false,
            retrying: false,
            acks: Acks::default(),
            scan: None,
            stuck_pages: 0,
            state_attempts: 0,
            state_retry_at: Instant::now(),
            progress: Arc::default(),
            on_ready: None,
        }
    }

    /// Reports the loop's progress to `progress` and calls `on_ready` after the
    /// first successful poll.
    pub fn with_supervision(
        mut self,
        progress: Arc<Progress>,
        on_ready: Box<dyn FnOnce() + Send>,
    ) -> Self {
        self.progress = progress;
        self.on_ready = Some(on_ready);
        self
    }

    /// Adds sender naming and the delegation tracker's wake-up (each optional).
    pub fn with_hooks(
        mut self,
        peers: Option<crate::peers::Enrichment>,
        delegation_wake: Option<super::delegations::Waker>,
    ) -> Self {
        self.peers = peers;
        self.delegation_wake = delegation_wake;
        self
    }

    /// Polls on event-stream hints, and only every `safety_poll` while the stream
    /// is healthy.
    pub fn with_wake(mut self, state: Arc<super::wake::WakeState>, safety_poll: Duration) -> Self {
        self.wake = Some((state, safety_poll));
        self
    }

    /// The pause after an empty poll: the safety net while the event stream is
    /// healthy, else `--interval-ms`.
    fn idle_interval(&self) -> Duration {
        match &self.wake {
            Some((state, safety)) if state.stream_up() => *safety,
            _ => self.settings.interval,
        }
    }

    fn store(&self) -> std::sync::MutexGuard<'_, Store> {
        self.store.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Runs until shutdown, then waits for running jobs (main cancels them when the
    /// drain time is up), saves the state and returns.
    pub fn run(mut self, jobs_tx: SyncSender<Job>, events: Receiver<Event>) {
        let mut next_fetch = Instant::now();
        while !self.shutdown.is_triggered() {
            self.progress.busy();
            while let Ok(ev) = events.try_recv() {
                self.on_event(ev);
            }
            let state_ok = self.state_writable();
            if state_ok {
                self.release(&jobs_tx);
            }
            self.advance_cursor();
            self.maybe_ack(false);
            self.report(RunState::Running, None);
            if let Some(why) = self.finished() {
                log::info!("{why}: stopping");
                self.shutdown.trigger(StopReason::Finished);
            }
            if self.shutdown.is_triggered() {
                break;
            }
            // While the state cannot be written nothing new is taken in.
            if std::mem::take(&mut self.hinted) && !self.retrying {
                next_fetch = Instant::now();
            }
            let can_fetch = state_ok && self.order.outstanding() < MAX_OUTSTANDING;
            if can_fetch && Instant::now() >= next_fetch {
                self.last_fetch_at = Some(Instant::now());
                let fetched = self.fetch();
                self.retrying = matches!(fetched, Fetched::RetryIn(_));
                next_fetch = match fetched {
                    Fetched::More => Instant::now(),
                    Fetched::Idle => Instant::now() + self.idle_interval(),
                    Fetched::RetryIn(d) => Instant::now() + d,
                };
                continue;
            }
            let mut wait = if can_fetch {
                next_fetch.saturating_duration_since(Instant::now())
            } else if !state_ok {
                self.state_retry_at
                    .saturating_duration_since(Instant::now())
            } else {
                Duration::from_secs(3600)
            };
            // The status file stays fresh between rare polls (event wake-ups), and a
            // change made just after a write is written within a second.
            wait = wait.min(self.reporter.next_write_in());
            // The idle deadline only matters when nothing is running: a long backend
            // run must not turn this wait into a spin.
            if let Some(idle) = self.settings.idle_exit
                && self.unfinished() == 0
                && self.order.outstanding() == 0
            {
                wait = wait.min(idle.saturating_sub(self.last_activity.elapsed()));
            }
            self.progress.idle();
            if let Ok(ev) = events.recv_timeout(wait) {
                self.on_event(ev);
            }
        }
        // Drain: nothing new starts; running jobs finish or are cancelled by main.
        drop(jobs_tx);
        while self.unfinished() > 0 {
            self.progress.idle();
            match events.recv() {
                Ok(ev) => self.on_event(ev),
                Err(_) => break,
            }
        }
        self.advance_cursor();
        let saved = self.store().checkpoint();
        match saved {
            Ok(()) => {
                RuntimeStatus::state_ok(&self.status);
                // The last progress, once it is on disk (not after a fatal stop: the
                // token or the workspace may be gone).
                if !matches!(self.shutdown.reason(), Some(StopReason::Fatal(_))) {
                    self.maybe_ack(true);
                }
            }
            Err(e) => {
                log::error!("{e}");
                RuntimeStatus::state_failed(&self.status, &e.to_string());
            }
        }
        let reason = match self.shutdown.reason() {
            Some(StopReason::Fatal(e)) => Some(e.to_string()),
            Some(StopReason::ThreadDied(m)) => Some(m),
            Some(StopReason::Finished) => Some("finished".to_string()),
            Some(StopReason::Signal) => Some("signal".to_string()),
            None => None,
        };
        self.report(RunState::Stopped, reason.as_deref());
    }

    fn report(&mut self, state: RunState, stop_reason: Option<&str>) {
        // A change waits to be written anyway: nothing to look at before then.
        if state == RunState::Running && !self.reporter.worth_checking() {
            return;
        }
        let cursor = self.store().cursor().map(str::to_string);
        let in_flight = self.order.outstanding();
        if state == RunState::Running {
            self.reporter.maybe_write(
                &self.status,
                self.client.stats(),
                cursor.as_deref(),
                in_flight,
            );
        } else {
            self.reporter.write(
                &self.status,
                self.client.stats(),
                cursor.as_deref(),
                in_flight,
                state,
                stop_reason,
            );
        }
    }

    /// Why a bounded run (`--once`, `--max-messages`, `--idle-exit`) is over, if it is.
    fn finished(&self) -> Option<String> {
        let idle = self.unfinished() == 0 && self.order.outstanding() == 0;
        if self.settings.once && idle && self.caught_up {
            return Some("--once: the inbox is drained".into());
        }
        if let Some(max) = self.settings.max_messages
            && self.released >= max
            && self.unfinished() == 0
        {
            return Some(format!("--max-messages: {max} message(s) handled"));
        }
        if let Some(limit) = self.settings.idle_exit
            && idle
            && self.last_activity.elapsed() >= limit
        {
            return Some(format!("--idle-exit: no message for {} s", limit.as_secs()));
        }
        None
    }

    fn on_event(&mut self, ev: Event) {
        match ev {
            Event::Finished {
                ticket,
                sender,
                finish,
            } => {
                self.last_activity = Instant::now();
                // A job that did not go through `Posting` (or whose `Finished` came
                // first) still holds its backend slot.
                if !self.posting.remove(&ticket) {
                    self.running = self.running.saturating_sub(1);
                }
                self.jobs.remove(&ticket);
                self.order.complete(ticket, &sender, finish == Finish::Done);
            }
            Event::Posting { ticket } => {
                if self.jobs.contains_key(&ticket) && self.posting.insert(ticket) {
                    self.running = self.running.saturating_sub(1);
                }
            }
            Event::Hint(sent) => {
                if self.last_fetch_at.is_none_or(|f| sent >= f) {
                    self.hinted = true;
                }
            }
            Event::Wake => {}
        }
    }

    /// Jobs handed to workers and not finished: in the backend or being posted.
    fn unfinished(&self) -> usize {
        self.running + self.posting.len()
    }

    /// Hands waiting messages to free workers, one per sender at a time (at most
    /// [`queue_depth`] out).
    fn release(&mut self, jobs_tx: &SyncSender<Job>) {
        while self.running < queue_depth(self.settings.concurrency) {
            if self
                .settings
                .max_messages
                .is_some_and(|max| self.released >= max)
            {
                return;
            }
            let Some((ticket, sender)) = self.order.next_job() else {
                return;
            };
            let Some(msg) = self.jobs.get_mut(&ticket).and_then(Option::take) else {
                self.order.complete(ticket, &sender, true);
                continue;
            };
            // The channel holds as many jobs as may be out: this never blocks.
            if jobs_tx
                .send(Job {
                    ticket,
                    sender,
                    msg,
                })
                .is_err()
            {
                return;
            }
            self.running += 1;
            self.released += 1;
            self.last_activity = Instant::now();
        }
    }

    /// Acks the highest `seq` below which every row is finished, at most every
    /// [`ACK_EVERY`] (`now` ignores that, for the last one at shutdown). Never past
    /// an unfinished row; a 404 turns acking off for good.
    fn maybe_ack(&mut self, now: bool) {
        if self.acks.unsupported {
            return;
        }
        if !now && self.acks.last_try.is_some_and(|t| t.elapsed() < ACK_EVERY) {
            return;
        }
        let Some(handled) = self.store().last_seq() else {
            return;
        };
        let seq = self.order.ack_ceiling(handled);
        if seq < 0 || self.acks.acked.is_some_and(|a| a >= seq) {
            return;
        }
        self.acks.last_try = Some(Instant::now());
        match self.client.ack(seq) {
            Ok(stored) => {
                let acked = stored.max(seq);
                log::debug!("acked seq {seq} (the platform has {stored})");
                self.acks.acked = Some(acked);
                RuntimeStatus::count(&self.status, |c| c.last_acked_seq = Some(acked));
            }
            Err(e) if e.kind() == Kind::NotFound => {
                log::info!("the platform does not take acks ({e}): not acking");
                self.acks.unsupported = true;
            }
            Err(e) => log::debug!("{e}; acking again later"),
        }
    }

    fn advance_cursor(&mut self) {
        let moved = self.order.advance();
        let mut store = self.store();
        if let Some((id, seq)) = moved {
            store.set_cursor(Some(id), seq);
        }
        let result = store.maybe_checkpoint();
        drop(store);
        if let Err(e) = result
            && RuntimeStatus::state_failed(&self.status, &e.to_string())
        {
            log::error!("{e}: not taking new messages until the state can be written");
        }
    }

    /// Whether the state can be written. After a failure (here or on a worker) this
    /// retries a checkpoint with backoff; the first success resumes intake.
    fn state_writable(&mut self) -> bool {
        if RuntimeStatus::state_error(&self.status).is_none() {
            self.state_attempts = 0;
            return true;
        }
        if Instant::now() < self.state_retry_at {
            return false;
        }
        let result = self.store().checkpoint();
        match result {
            Ok(()) => {
                if RuntimeStatus::state_ok(&self.status) {
                    log::info!("state is writable again; resuming intake");
                }
                self.state_attempts = 0;
                true
            }
            Err(e) => {
                RuntimeStatus::state_failed(&self.status, &e.to_string());
                self.state_attempts = self.state_attempts.saturating_add(1);
                self.seed = self.seed.wrapping_add(1);
                self.state_retry_at = Instant::now()
                    + super::dispatch::STATE_RETRY.delay(self.state_attempts, self.seed);
                false
            }
        }
    }

    fn fetch(&mut self) -> Fetched {
        let secs = self
            .settings
            .since_secs
            .saturating_add(self.window_anchor.elapsed().as_secs_f64().ceil() as u64);
        let since = match (&self.fetch_from, &self.scan) {
            (Some(c), _) => Since::Cursor(c.clone()),
            (None, Some(scan)) => Since::Before(secs, scan.before.clone()),
            (None, None) => Since::Secs(secs),
        };
        let limit = match since {
            Since::Cursor(_) => self.page_limit,
            _ => COLD_LIMIT.min(self.page_limit.saturating_mul(5)),
        };
        let used = self.client.credentials().token();
        match self.client.activity_raw(&since, limit, PAGE_BYTES) {
            Ok(mut rows) => {
                self.last_good_poll = Instant::now();
                RuntimeStatus::count(&self.status, |c| c.last_poll_ok = Some(SystemTime::now()));
                if !self.logged_first_poll {
                    log::info!("inbox reachable; first poll returned {} row(s)", rows.len());
                    self.logged_first_poll = true;
                    if let Some(ready) = self.on_ready.take() {
                        ready();
                    }
                }
                self.permanent_failures = 0;
                if self.failures > 0 {
                    log::info!(
                        "polling recovered after {} failed attempt(s)",
                        self.failures
                    );
                    self.failures = 0;
                }
                let full = rows.len() >= limit as usize;
                if !matches!(since, Since::Cursor(_)) && (full || self.scan.is_some()) {
                    return self.scan_window(rows, full, secs, limit);
                }
                if !matches!(since, Since::Cursor(_)) {
                    // Without a cursor the page is newest first (§API-4.2).
                    rows.reverse();
                }
                self.caught_up = !full;
                let before = self.fetch_from.clone();
                self.take_page(rows);
                if !full {
                    self.stuck_pages = 0;
                    return Fetched::Idle;
                }
                if self.fetch_from != before {
                    self.stuck_pages = 0;
                    return Fetched::More;
                }
                self.stuck_full_page(limit)
            }
            Err(e) => self.on_poll_error(&e, &used),
        }
    }

    /// A full page that did not move the fetch position (rows without usable ids):
    /// never fetched again in a hot loop, and a `--once` run stops instead of
    /// polling the same page forever.
    fn stuck_full_page(&mut self, limit: u32) -> Fetched {
        self.stuck_pages = self.stuck_pages.saturating_add(1);
        let why = format!(
            "the platform keeps answering full pages of {limit} rows that do not move the cursor"
        );
        if self.settings.once && self.stuck_pages >= STUCK_PAGES_ONCE {
            log::warn!("{why}");
            self.shutdown
                .trigger(StopReason::Fatal(Error::Unreachable(format!(
                    "--once: {why} ({} pages); try again later",
                    self.stuck_pages
                ))));
        } else if self.stuck_pages == 1 || self.stuck_pages.is_multiple_of(100) {
            log::warn!("{why}");
        }
        Fetched::Idle
    }

    /// A cold start that meets more rows than one page: read the whole
    /// `--since-secs` window instead of answering only the newest page. Pages go
    /// backwards with `before_ts` (§API-2.4) to the window's oldest row, keeping
    /// only that row; it is handled first and becomes the cursor, and the rest of
    /// the window then comes oldest first through `since_id`, whose
    /// `(created_at, seq)` order loses nothing at a page boundary. Rows sharing a
    /// page's oldest timestamp come again and are recognised ([`before_ts_after`]).
    fn scan_window(&mut self, rows: Vec<Value>, full: bool, secs: u64, limit: u32) -> Fetched {
        self.caught_up = false;
        let previous = self.scan.take();
        let oldest = rows
            .into_iter()
            .next_back()
            .or_else(|| previous.as_ref().map(|p| p.oldest.clone()));
        let Some(oldest) = oldest else {
            return Fetched::More;
        };
        if previous.is_none() {
            log::info!(
                "cold start: more than one page of messages in the last {secs}s; reading the whole window, oldest first"
            );
        }
        if full {
            let created = oldest.get("created_at").and_then(Value::as_str);
            let same = previous
                .as_ref()
                .is_some_and(|p| p.oldest.get("id") == oldest.get("id"));
            let stepped = previous.as_ref().is_some_and(|p| p.stepped);
            // No progress means a whole page shares one timestamp.
            let before = created
                .and_then(crate::timestamp::parse_rfc3339)
                .map(|us| before_ts_after(us, same));
            match before {
                // Stepping past the timestamp did not help either: the platform
                // ignores before_ts. Go on forward from here.
                Some(_) if same && stepped => log::warn!(
                    "the platform ignores before_ts: older rows in the last {secs}s window are skipped"
                ),
                Some(before) => {
                    if same {
                        log::warn!(
                            "more than a page of rows share the timestamp {}; some of them may be skipped",
                            created.unwrap_or("")
                        );
                    }
                    self.scan = Some(WindowScan {
                        before,
                        oldest,
                        stepped: same,
                    });
                    return Fetched::More;
                }
                None => log::warn!(
                    "row without a usable created_at: older rows in the last {secs}s window are skipped"
                ),
            }
        }
        // The window's oldest row: handle it, then page forward from it.
        let before = self.fetch_from.clone();
        self.take_page(vec![oldest]);
        if self.fetch_from == before {
            log::warn!("the oldest row of the window has no usable id: older rows are skipped");
            return self.stuck_full_page(limit);
        }
        self.stuck_pages = 0;
        Fetched::More
    }

    /// Sorts one page's rows into "done already" and "for the backend". Rows are
    /// read and classified first (pure), the ledger is asked about all of them under
    /// one lock, then they are taken in page order.
    fn take_page(&mut self, rows: Vec<Value>) {
        let own = self.client.workspace_id().to_string();
        let mut page: Vec<Taken> = rows
            .into_iter()
            .filter_map(|raw| self.read_row(raw, &own))
            .collect();
        {
            let store = self.store();
            let mut key = String::new();
            for taken in &mut page {
                let Ok(class) = &taken.class else { continue };
                key.clear();
                key.push_str("a:");
                key.push_str(&taken.id);
                taken.handled = store.is_handled(&key);
                if !taken.handled
                    && let Ok(msg) = class
                {
                    taken.duplicate = msg.message_key().filter(|k| store.is_handled(k));
                }
            }
        }
        for Taken {
            id,
            seq,
            class,
            handled,
            duplicate,
        } in page
        {
            let class = match class {
                Ok(class) => class,
                Err(e) => {
                    // One odd row must not block the inbox: skip it, keep its id.
                    log::warn!("row {id}: skipped: malformed row: {e}");
                    self.count_skipped();
                    self.note_done(&id, seq);
                    continue;
                }
            };
            // Seen earlier on this page.
            if self.order.contains(&id) {
                continue;
            }
            if !crate::uuid::is_uuid(&id) {
                log::warn!("row {id:?}: skipped: its id is not a UUID");
                continue;
            }
            self.fetch_from = Some(id.clone());
            if handled {
                log::debug!("row {id}: already handled");
                self.count_skipped();
                self.order.push_done(&id, seq);
                continue;
            }
            let mut msg = match class {
                Ok(m) => m,
                Err(skip) => {
                    if skip == Skip::DelegationResult
                        && let Some(wake) = &self.delegation_wake
                    {
                        wake.wake();
                    }
                    log_skip(&id, &skip);
                    self.count_skipped();
                    self.order.push_done(&id, seq);
                    continue;
                }
            };
            if let Some(key) = duplicate {
                log::info!("row {id}: message {key} was already answered; skipping the duplicate");
                self.count_skipped();
                self.order.push_done(&id, seq);
                continue;
            }
            if let Some(peers) = &self.peers {
                peers.apply(&mut msg, Instant::now());
            }
            let sender = msg.source_id.as_ref().map_or("canvas", WorkspaceId::as_str);
            let ticket = self.order.push_job(&id, seq, sender);
            self.jobs.insert(ticket, Some(msg));
        }
    }

    /// One row of a page, read and classified (no ledger look-up yet); `None` for a
    /// row without an id or one the tracker holds already (not classified again).
    fn read_row(&self, raw: Value, own: &str) -> Option<Taken> {
        let row = match inbox::activity_row(raw) {
            Ok(r) => r,
            Err((error, raw)) => {
                let id = raw.get("id").and_then(Value::as_str).unwrap_or("");
                return Some(Taken {
                    id: id.to_string(),
                    seq: raw.get("seq").and_then(Value::as_i64),
                    class: Err(error),
                    handled: false,
                    duplicate: None,
                });
            }
        };
        if row.id.is_empty() || self.order.contains(&row.id) {
            return None;
        }
        Some(Taken {
            id: row.id.clone(),
            seq: row.seq,
            class: Ok(inbox::classify_owned(row, own)),
            handled: false,
            duplicate: None,
        })
    }

    fn count_skipped(&self) {
        RuntimeStatus::count(&self.status, |c| c.skipped += 1);
    }

    fn note_done(&mut self, id: &str, seq: Option<i64>) {
        if crate::uuid::is_uuid(id) && !self.order.contains(id) {
            self.fetch_from = Some(id.to_string());
            self.order.push_done(id, seq);
        }
    }

    fn on_poll_error(&mut self, e: &ApiError, used: &crate::config::Secret) -> Fetched {
        RuntimeStatus::note_error(&self.status, &e.to_string());
        if e.kind() == Kind::Gone {
            log::warn!(
                "inbox cursor {} is gone (pruned, or state from another workspace): restarting from the last {}s",
                self.fetch_from.as_deref().unwrap_or("-"),
                self.settings.since_secs
            );
            self.fetch_from = None;
            self.scan = None;
            self.window_anchor = self.last_good_poll;
            return Fetched::More;
        }
        if e.is_unauthorized() {
            match after_unauthorized(self.client.as_ref(), used, &self.shutdown) {
                AuthVerdict::RetryWithNewToken => return Fetched::More,
                AuthVerdict::Unknown => {}
                AuthVerdict::Fatal(error) => {
                    self.shutdown.trigger(StopReason::Fatal(error));
                    return Fetched::Idle;
                }
            }
        }
        if matches!(e, ApiError::TooLarge { .. }) && self.page_limit > 1 {
            self.page_limit = (self.page_limit / 2).max(1);
            log::warn!("{e}: asking for {} rows per page", self.page_limit);
            return Fetched::More;
        }
        if e.kind() == Kind::NotFound && self.workspace_is_gone() {
            return Fetched::Idle;
        }
        self.failures = self.failures.saturating_add(1);
        if !e.is_retryable() && !e.is_unauthorized() {
            self.permanent_failures = self.permanent_failures.saturating_add(1);
        }
        if let Some(stop) = self.give_up(e) {
            self.shutdown.trigger(stop);
            return Fetched::Idle;
        }
        let hint = match e.kind() {
            Kind::BadRequest | Kind::NotFound => {
                " (on a SaaS tenant this usually means the Origin/X-Molecule-Org-Id header is rejected: check --api-url and --org-id)"
            }
            _ => "",
        };
        if self.failures == 1 || self.failures.is_multiple_of(10) {
            log::warn!("{e}{hint} (attempt {})", self.failures);
        }
        // Permanent errors are retried too, slowly: intake must never stop for good.
        let attempt = if e.is_retryable() {
            self.failures
        } else {
            self.failures.saturating_add(5)
        };
        self.seed = self.seed.wrapping_add(1);
        let d = self.backoff.delay(attempt, self.seed);
        Fetched::RetryIn(e.retry_after().map_or(d, |r| d.max(r)))
    }

    /// Whether polling should stop for good after `e`. A `--once` run must not hang
    /// on an unreachable platform (the next cron run could not start); and an inbox
    /// that keeps refusing us with the same 4xx while heartbeats keep the workspace
    /// online is the Go connector's half-dead state (§API-5.8), so it ends the process
    /// with an exit code the supervisor will not restart-loop on.
    fn give_up(&self, e: &ApiError) -> Option<StopReason> {
        if matches!(e, ApiError::Misconfigured { .. }) {
            return Some(StopReason::Fatal(Error::Config(ConfigError(e.to_string()))));
        }
        if self.settings.once && self.failures >= ONCE_POLL_ATTEMPTS {
            return Some(StopReason::Fatal(Error::Unreachable(format!(
                "--once: the inbox could not be read after {} attempts: {e}",
                self.failures
            ))));
        }
        if self.permanent_failures < MAX_PERMANENT_POLL_FAILURES {
            return None;
        }
        let why = |why: &str| format!("{why}: {e} ({} attempts in a row)", self.permanent_failures);
        Some(StopReason::Fatal(match e.kind() {
            Kind::Forbidden => Error::Credentials(why(
                "the platform refuses this token access to the workspace's inbox",
            )),
            _ => Error::Config(ConfigError(why(
                "the platform keeps rejecting the inbox request (on a SaaS tenant: check --api-url and --org-id)",
            ))),
        }))
    }

    /// After a 404 on our own inbox: is the workspace itself gone? Stops the process
    /// (exit 4) if so.
    fn workspace_is_gone(&mut self) -> bool {
        let ws = self.client.workspace_id();
        let Some(message) =
            Standing::check(self.client.as_ref()).gone_message(ws, self.client.api_url())
        else {
            return false;
        };
        self.shutdown
            .trigger(StopReason::Fatal(Error::Removed(message)));
        true
    }
}

/// Where a cold start's backward scan of its window has got to.
struct WindowScan {
    /// `before_ts` of the next page.
    before: String,
    /// The oldest row seen so far.
    oldest: Value,
    /// `before` already steps past a timestamp a whole page shared.
    stepped: bool,
}

/// One row of a page on its way through [`Poller::take_page`].
struct Taken {
    id: String,
    seq: Option<i64>,
    /// What the row means, or why it cannot be read.
    class: Result<Result<Inbound, Skip>, serde_json::Error>,
    /// The ledger has the row.
    handled: bool,
    /// The ledger has its message: the key.
    duplicate: Option<String>,
}

/// What has been acked, and when.
#[derive(Default)]
struct Acks {
    /// The platform's stored value after our last ack.
    acked: Option<i64>,
    last_try: Option<Instant>,
    /// 404: a server from before acks; stop trying.
    unsupported: bool,
}

/// What a fetch means for the next one.
enum Fetched {
    /// A full page: fetch again at once.
    More,
    /// Nothing more for now: wait the poll interval.
    Idle,
    /// Failed: wait this long.
    RetryIn(Duration),
}

fn log_skip(id: &str, skip: &Skip) {
    if skip.is_surprising() {
        log::warn!("row {id}: skipped: {skip}");
    } else {
        log::debug!("row {id}: skipped: {skip}");
    }
}

/// Jobs out at once for `concurrency` workers: one per worker, none queued ahead.
/// A job queued ahead (tried: twice this) spares a worker the wait for this thread
/// after each message, but measured more connector CPU per message (cat worker
/// backlog, 0.46 against 0.41 ms) for no clear gain in throughput on 2 cores. It
/// would be safe: a queued job's sender is busy like a running one's (per-sender
/// order holds), and a worker that takes a job after a stop reports it interrupted
/// without starting it, so it runs again after the restart.
pub fn queue_depth(concurrency: usize) -> usize {
    concurrency.max(1)
}

/// Creates the poll-thread → workers job channel, room for [`queue_depth`] jobs.
pub fn jobs_channel(concurrency: usize) -> (SyncSender<Job>, Receiver<Job>) {
    mpsc::sync_channel(queue_depth(concurrency))
}

/// Creates the worker → poll-thread event channel, woken on shutdown.
pub fn event_channel(shutdown: &Shutdown) -> (Sender<Event>, Receiver<Event>) {
    let (tx, rx) = mpsc::channel();
    let wake = tx.clone();
    shutdown.on_trigger(move || {
        let _ = wake.send(Event::Wake);
    });
    (tx, rx)
}

#[cfg(test)]
mod tests {
    //! The loop against an in-memory platform: no network, no emulator.

    use std::path::{Path, PathBuf};

    use serde_json::json;

    use super::super::fake::{Fake, OWN, PEER};
    use super::*;
    use crate::error::Error;

    fn id(n: u32) -> String {
        format!("00000000-0000-4000-8000-{n:012}")
    }

    fn message(n: u32) -> Value {
        json!({
            "id": id(n),
            "seq": n,
            "activity_type": "a2a_receive",
            "source_id": PEER,
            "method": "message/send",
            "request_body": {"jsonrpc": "2.0", "method": "message/send", "params": {"message": {
                "role": "user", "messageId": format!("m-{n}"),
                "parts": [{"kind": "text", "text": format!("hello {n}")}]}}}
        })
    }

    /// A cold-start page: newest first (§API-4.2).
    fn cold_page(ns: &[u32]) -> Result<Vec<Value>, ApiError> {
        Ok(ns.iter().rev().map(|n| message(*n)).collect())
    }

    fn refusal(status: u16) -> ApiError {
        super::super::fake::status("poll", status)
    }

    struct Run {
        handled: Vec<String>,
        cursor: Option<String>,
        stop: Option<StopReason>,
    }

    /// Runs one poll loop over `fake` with one worker that hands each job to
    /// `work`, until the loop stops (`--once` drained, or a fatal stop).
    fn run(fake: &Arc<Fake>, work: impl Fn(&Job, &Shutdown) -> Finish + Send + 'static) -> Run {
        let dir = temp_dir();
        let r = run_in(&dir, fake, work);
        std::fs::remove_dir_all(&dir).unwrap();
        r
    }

    fn temp_dir() -> PathBuf {
        let dir = std::env::temp_dir().join(format!("molecule-poll-{}", crate::uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// Like [`run`], with the state in `dir` (a restart keeps it).
    fn run_in(
        dir: &Path,
        fake: &Arc<Fake>,
        work: impl Fn(&Job, &Shutdown) -> Finish + Send + 'static,
    ) -> Run {
        let dir = dir.to_path_buf();
        let store = Arc::new(Mutex::new(Store::open(&dir, OWN).unwrap()));
        let shutdown = Shutdown::new();
        let settings = PollSettings {
            interval: Duration::from_millis(10),
            since_secs: 600,
            concurrency: 1,
            once: true,
            max_messages: None,
            idle_exit: None,
        };
        let platform: Arc<dyn Platform> = fake.clone();
        let poller = Poller::new(
            platform,
            settings,
            store.clone(),
            shutdown.clone(),
            RuntimeStatus::new(Instant::now()),
            Reporter::new(&dir, OWN, Duration::from_millis(10)),
        );
        let (jobs_tx, jobs_rx) = jobs_channel(1);
        let (events_tx, events_rx) = event_channel(&shutdown);
        let worker_stop = shutdown.clone();
        let ledger = store.clone();
        let worker = std::thread::spawn(move || {
            let mut handled = Vec::new();
            for job in jobs_rx {
                // As a worker does: a job queued before a stop is not started.
                let finish = if worker_stop.is_triggered() {
                    Finish::Interrupted
                } else {
                    handled.push(job.msg.activity_id.clone());
                    work(&job, &worker_stop)
                };
                if finish == Finish::Done {
                    // As a worker does: the ledger first, then the poll thread is told.
                    let row = &job.msg.activity_id;
                    ledger
                        .lock()
                        .unwrap()
                        .record_done(row, vec![format!("a:{row}")], None)
                        .unwrap();
                }
                let _ = events_tx.send(Event::Finished {
                    ticket: job.ticket,
                    sender: job.sender,
                    finish,
                });
            }
            handled
        });
        poller.run(jobs_tx, events_rx);
        let handled = worker.join().unwrap();
        let cursor = store.lock().unwrap().cursor().map(str::to_string);
        let reopened = Store::open(&dir, OWN).unwrap().cursor().map(str::to_string);
        assert_eq!(cursor, reopened, "the cursor in memory is the one on disk");
        Run {
            handled,
            cursor,
            stop: shutdown.reason(),
        }
    }

    #[test]
    fn a_page_is_handled_in_order_and_the_cursor_follows() {
        let fake = Fake::new(vec![cold_page(&[1, 2, 3])]);
        let r = run(&fake, |_, _| Finish::Done);
        assert_eq!(r.handled, vec![id(1), id(2), id(3)]);
        assert_eq!(r.cursor, Some(id(3)));
        assert_eq!(r.stop, Some(StopReason::Finished));
        // Cold start, then (if the loop polls again before the jobs end) onwards
        // from the last row fetched.
        let asked = fake.asked();
        assert!(matches!(asked[0], Since::Secs(_)), "{asked:?}");
        assert!(
            asked[1..].iter().all(|s| *s == Since::Cursor(id(3))),
            "{asked:?}"
        );
    }

    #[test]
    fn the_cursor_never_passes_an_unfinished_message() {
        let fake = Fake::new(vec![cold_page(&[1, 2, 3])]);
        let r = run(&fake, |job, stop| {
            if job.msg.activity_id == id(2) {
                // Shutdown came first: the message is redelivered after a restart.
                stop.trigger(StopReason::Signal);
                return Finish::Interrupted;
            }
            Finish::Done
        });
        assert_eq!(r.handled, vec![id(1), id(2)]);
        assert_eq!(r.cursor, Some(id(1)));
        assert_eq!(r.stop, Some(StopReason::Signal));
    }

    fn canvas_message(n: u32) -> Value {
        let mut m = message(n);
        m["source_id"] = Value::Null;
        m
    }

    #[test]
    fn a_job_queued_when_a_stop_comes_is_not_started_and_not_passed() {
        // Two senders: with a job queued ahead (`queue_depth`) the canvas message
        // waits in the channel while the peer's runs; either way it never starts
        // after the stop, and the cursor stays before it.
        let page = vec![canvas_message(2), message(1)];
        let fake = Fake::new(vec![Ok(page)]);
        let r = run(&fake, |job, stop| {
            if job.msg.activity_id == id(1) {
                stop.trigger(StopReason::Signal);
            }
            Finish::Done
        });
        assert_eq!(r.handled, vec![id(1)]);
        assert_eq!(r.cursor, Some(id(1)));
    }

    #[test]
    fn rows_seen_again_and_handled_rows_are_not_run_twice() {
        let dir = temp_dir();
        let first = run_in(&dir, &Fake::new(vec![cold_page(&[1, 2])]), |_, _| {
            Finish::Done
        });
        assert_eq!(first.handled, vec![id(1), id(2)]);
        // A pruned cursor: the window again, with row 2 twice and a malformed row.
        let mut page = cold_page(&[1, 2, 2, 3]).unwrap();
        page.insert(1, json!({"id": id(9), "seq": "nine"}));
        let fake = Fake::new(vec![Err(refusal(410)), Ok(page)]);
        let r = run_in(&dir, &fake, |_, _| Finish::Done);
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(r.handled, vec![id(3)]);
        assert_eq!(r.cursor, Some(id(3)));
    }

    #[test]
    fn a_retryable_failure_is_retried_from_the_same_place() {
        let fake = Fake::new(vec![Err(refusal(503)), cold_page(&[1])]);
        let r = run(&fake, |_, _| Finish::Done);
        assert_eq!(r.handled, vec![id(1)]);
        assert_eq!(r.cursor, Some(id(1)));
        let asked = fake.asked();
        assert!(
            matches!((&asked[0], &asked[1]), (Since::Secs(_), Since::Secs(_))),
            "{asked:?}"
        );
    }

    #[test]
    fn a_pruned_cursor_restarts_from_the_window() {
        let dir = temp_dir();
        let first = run_in(&dir, &Fake::new(vec![cold_page(&[1])]), |_, _| Finish::Done);
        assert_eq!(first.cursor, Some(id(1)));
        // After a restart the saved cursor is gone on the platform.
        let fake = Fake::new(vec![Err(refusal(410)), cold_page(&[1, 2])]);
        let r = run_in(&dir, &fake, |_, _| Finish::Done);
        std::fs::remove_dir_all(&dir).unwrap();
        // Row 1 comes again in the window and is recognised, not handled twice.
        assert_eq!(r.handled, vec![id(2)]);
        assert_eq!(r.cursor, Some(id(2)));
        let asked = fake.asked();
        assert_eq!(asked[0], Since::Cursor(id(1)), "{asked:?}");
        assert!(matches!(asked[1], Since::Secs(_)), "{asked:?}");
        assert!(
            asked[2..].iter().all(|s| *s == Since::Cursor(id(2))),
            "{asked:?}"
        );
    }

    #[test]
    fn a_rejected_token_that_cannot_change_stops_with_exit_3() {
        let fake = Fake::new(vec![Err(refusal(401))]);
        let r = run(&fake, |_, _| Finish::Done);
        assert!(r.handled.is_empty());
        match r.stop {
            Some(StopReason::Fatal(e @ Error::Credentials(_))) => {
                assert_eq!(e.exit_code(), 3);
                assert!(e.to_string().contains("MOLECULE_WORKSPACE_TOKEN"), "{e}");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_401_for_a_removed_workspace_stops_with_exit_4() {
        let fake = Fake::new(vec![Err(refusal(401))]);
        *fake.info.lock().unwrap() = Some(refusal(410));
        let r = run(&fake, |_, _| Finish::Done);
        match r.stop {
            Some(StopReason::Fatal(e)) => {
                assert_eq!(e.exit_code(), 4);
                assert!(e.to_string().contains("was removed"), "{e}");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn an_inbox_404_for_an_unknown_workspace_stops_with_exit_4() {
        let fake = Fake::new(vec![Err(refusal(404))]);
        *fake.info.lock().unwrap() = Some(refusal(404));
        let r = run(&fake, |_, _| Finish::Done);
        match r.stop {
            Some(StopReason::Fatal(e)) => {
                assert_eq!(e.exit_code(), 4);
                assert!(e.to_string().contains("unknown to the platform"), "{e}");
            }
            other => panic!("{other:?}"),
        }
    }
}
