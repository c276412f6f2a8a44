//! The poll thread: fetch a page of the inbox → filter → dedupe → run the backend →
//! reply → record the row as handled and save the cursor. It owns the state file.
//! A failure on one row is retried a bounded number of times and then
//! dead-lettered; it never stops intake.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};

use crate::api::{ApiError, Client, Since};
use crate::backend::{Backend, BackendError, Outcome, RunHandle};
use crate::backoff::Backoff;
use crate::config::TokenSource;
use crate::inbox::{self, Inbound, Skip};
use crate::shutdown::{Shutdown, StopReason};
use crate::state::State;
use crate::wire::ActivityRow;

use super::auth::{AuthVerdict, after_unauthorized};
use super::status::{RuntimeStatus, SharedStatus};

/// Rows per page. A full page means more is waiting: fetch again at once.
const PAGE_LIMIT: u32 = 100;
/// Rows asked for on a cold start (§API-4.2).
const COLD_LIMIT: u32 = 500;
/// Bytes accepted for one page; above it the page size is halved.
const PAGE_BYTES: u64 = 32 * 1024 * 1024;
/// "Retry later" (exit 75) runs allowed per message before it counts as a failure.
const MAX_RETRY_LATER: u32 = 20;
/// How long a reply may keep failing transiently before it is dead-lettered.
const REPLY_BUDGET: Duration = Duration::from_secs(120);

/// Settings the poll thread needs.
pub struct PollSettings {
    /// Pause between polls when the inbox is empty.
    pub interval: Duration,
    /// Cold-start window.
    pub since_secs: u64,
    /// Backend tries per message.
    pub max_attempts: u32,
    /// Post replies to messages that are themselves replies.
    pub reply_to_replies: bool,
    /// Where the token came from (re-read on 401).
    pub token_source: TokenSource,
    /// `<state-dir>/<id>.deadletter.jsonl`.
    pub dead_letter_path: PathBuf,
}

/// What happened to one row.
enum RowResult {
    /// Handled (answered, skipped or dead-lettered): advance the cursor past it.
    Done,
    /// Shutdown came first: leave the cursor before it.
    Interrupted,
}

/// The poll loop and everything it owns.
pub struct Poller {
    client: Client,
    backend: Arc<dyn Backend>,
    settings: PollSettings,
    state: State,
    status: SharedStatus,
    run_handle: RunHandle,
    shutdown: Shutdown,
    backoff: Backoff,
    seed: u64,
    page_limit: u32,
    /// The cold-start window is counted back from here: start-up, or the last good
    /// poll before a 410. A slow first poll (platform down) must not shrink it.
    window_anchor: Instant,
}

impl Poller {
    /// Assembles a poller; `run` starts it.
    pub fn new(
        client: Client,
        backend: Arc<dyn Backend>,
        settings: PollSettings,
        state: State,
        status: SharedStatus,
        run_handle: RunHandle,
        shutdown: Shutdown,
    ) -> Self {
        Poller {
            client,
            backend,
            settings,
            state,
            status,
            run_handle,
            shutdown,
            // Polls give up waiting sooner than other calls: a long pause after an
            // outage is added straight to message latency.
            backoff: Backoff {
                max: Duration::from_secs(15),
                ..Backoff::default()
            },
            seed: crate::uuid::random_u64(),
            page_limit: PAGE_LIMIT,
            window_anchor: Instant::now(),
        }
    }

    /// Polls until shutdown.
    pub fn run(mut self) {
        let mut failures: u32 = 0;
        let mut logged_first_poll = false;
        let mut last_good_poll = Instant::now();
        loop {
            if self.shutdown.is_triggered() {
                return;
            }
            let since = match &self.state.cursor {
                Some(c) => Since::Cursor(c.clone()),
                None => Since::Secs(
                    self.settings
                        .since_secs
                        .saturating_add(self.window_anchor.elapsed().as_secs_f64().ceil() as u64),
                ),
            };
            let limit = match since {
                Since::Secs(_) => COLD_LIMIT.min(self.page_limit.max(1) * 5),
                Since::Cursor(_) => self.page_limit,
            };
            match self.client.activity(&since, limit, PAGE_BYTES) {
                Ok(mut rows) => {
                    last_good_poll = Instant::now();
                    if !logged_first_poll {
                        log::info!("inbox reachable; first poll returned {} row(s)", rows.len());
                        logged_first_poll = true;
                    }
                    if failures > 0 {
                        log::info!("polling recovered after {failures} failed attempt(s)");
                        failures = 0;
                    }
                    let full = rows.len() >= limit as usize;
                    if let Since::Secs(secs) = since {
                        // Without a cursor the page is newest first (§API-4.2).
                        rows.reverse();
                        if full {
                            log::warn!(
                                "more than {limit} messages in the last {secs}s: older ones in that window are skipped"
                            );
                        }
                    }
                    let interrupted = self.handle_page(rows);
                    if interrupted {
                        return;
                    }
                    if full {
                        continue;
                    }
                    if self.shutdown.wait_timeout(self.settings.interval) {
                        return;
                    }
                }
                Err(e) => {
                    if e.status() == Some(410) {
                        self.window_anchor = last_good_poll;
                    }
                    if self.on_poll_error(&e, &mut failures) {
                        return;
                    }
                }
            }
        }
    }

    /// Handles the rows of one page in order. Returns `true` if shutdown interrupted it.
    fn handle_page(&mut self, rows: Vec<ActivityRow>) -> bool {
        for row in rows {
            if self.shutdown.is_triggered() {
                return true;
            }
            match self.handle_row(&row) {
                RowResult::Done => self.advance(&row),
                RowResult::Interrupted => return true,
            }
        }
        false
    }

    /// Marks `row` handled and moves the cursor past it, durably.
    fn advance(&mut self, row: &ActivityRow) {
        if !crate::uuid::is_uuid(&row.id) {
            // Never a cursor: the platform answers a non-UUID since_id with a 500.
            self.state.mark_handled(format!("a:{}", row.id));
            return;
        }
        self.state.mark_handled(format!("a:{}", row.id));
        self.state.cursor = Some(row.id.clone());
        if let Some(seq) = row.seq {
            self.state.last_seq = Some(self.state.last_seq.map_or(seq, |s| s.max(seq)));
        }
        if let Err(e) = self.state.save() {
            // The row is handled; a lost save only means a re-delivery after a crash,
            // which the reply id makes harmless.
            log::error!("{e}");
        }
    }

    /// Returns `true` if the loop must stop.
    fn on_poll_error(&mut self, e: &ApiError, failures: &mut u32) -> bool {
        if e.status() == Some(410) {
            log::warn!(
                "inbox cursor {} is gone (pruned, or state from another workspace): restarting from the last {}s",
                self.state.cursor.as_deref().unwrap_or("-"),
                self.settings.since_secs
            );
            self.state.cursor = None;
            if let Err(e) = self.state.save() {
                log::error!("{e}");
            }
            return false;
        }
        if e.is_unauthorized() {
            return match after_unauthorized(&self.client, &self.settings.token_source) {
                AuthVerdict::RetryWithNewToken => false,
                AuthVerdict::Fatal(code, message) => {
                    self.shutdown.trigger(StopReason::Fatal { code, message });
                    true
                }
            };
        }
        if let ApiError::TooLarge { .. } = e
            && self.page_limit > 1
        {
            self.page_limit = (self.page_limit / 2).max(1);
            log::warn!("{e}: asking for {} rows per page", self.page_limit);
            return false;
        }
        *failures = failures.saturating_add(1);
        let hint = match e.status() {
            Some(400) | Some(404) if !e.is_retryable() => {
                " (on a SaaS tenant this usually means the Origin/X-Molecule-Org-Id header is rejected: check --api-url and --org-id)"
            }
            _ => "",
        };
        if *failures == 1 || failures.is_multiple_of(10) {
            log::warn!("{e}{hint} (attempt {failures})");
        }
        // Permanent errors are retried too, slowly: intake must never stop for good.
        let attempt = if e.is_retryable() {
            *failures
        } else {
            failures.saturating_add(5)
        };
        self.wait_backoff(attempt, e.retry_after())
    }

    /// Waits the backoff for `attempt` (at least `retry_after`). `true` = stop requested.
    fn wait_backoff(&mut self, attempt: u32, retry_after: Option<Duration>) -> bool {
        self.seed = self.seed.wrapping_add(1);
        let mut d = self.backoff.delay(attempt, self.seed);
        if let Some(r) = retry_after {
            d = d.max(r);
        }
        self.shutdown.wait_timeout(d)
    }

    fn handle_row(&mut self, row: &ActivityRow) -> RowResult {
        if self.state.is_handled(&format!("a:{}", row.id)) {
            log::debug!("row {} already handled", row.id);
            return RowResult::Done;
        }
        let own = self.client.workspace_id().to_string();
        let msg = match inbox::classify(row, &own) {
            Ok(m) => m,
            Err(skip) => {
                log_skip(&row.id, &skip);
                return RowResult::Done;
            }
        };
        if let Some(key) = msg.message_key()
            && self.state.is_handled(&key)
        {
            log::info!(
                "row {}: message {key} was already answered; skipping the duplicate",
                row.id
            );
            return RowResult::Done;
        }
        let result = self.dispatch(&msg);
        if let (RowResult::Done, Some(key)) = (&result, msg.message_key()) {
            self.state.mark_handled(key);
        }
        result
    }

    /// Runs the backend (with retries) and delivers its outcome.
    fn dispatch(&mut self, msg: &Inbound) -> RowResult {
        let summary = msg.summary();
        log::info!("row {}: {summary}", msg.activity_id);
        let mut attempt: u32 = 0;
        let mut retry_later: u32 = 0;
        let mut last_error;
        loop {
            attempt = attempt.saturating_add(1);
            let req = msg.to_request(self.client.workspace_id(), self.client.api_url(), attempt);
            RuntimeStatus::begin_task(&self.status, &summary);
            let started = Instant::now();
            let outcome = self.backend.handle(&req, &self.run_handle);
            let elapsed = started.elapsed();
            match outcome {
                Ok(outcome) => {
                    RuntimeStatus::end_task(&self.status, None);
                    log::debug!(
                        "row {}: backend done in {} ms",
                        msg.activity_id,
                        elapsed.as_millis()
                    );
                    return self.deliver(msg, outcome);
                }
                Err(BackendError::Cancelled) => {
                    RuntimeStatus::end_task(&self.status, None);
                    return RowResult::Interrupted;
                }
                Err(e) if e.is_retry_later() && retry_later < MAX_RETRY_LATER => {
                    RuntimeStatus::end_task(&self.status, None);
                    retry_later += 1;
                    attempt = attempt.saturating_sub(1);
                    log::info!("row {}: {e}; trying again later", msg.activity_id);
                    if self.wait_backoff(retry_later, None) {
                        return RowResult::Interrupted;
                    }
                }
                Err(e) => {
                    last_error = e.to_string();
                    RuntimeStatus::end_task(&self.status, Some(&last_error));
                    if attempt >= self.settings.max_attempts {
                        break;
                    }
                    log::warn!(
                        "row {}: {e} (attempt {attempt}/{})",
                        msg.activity_id,
                        self.settings.max_attempts
                    );
                    if self.wait_backoff(attempt, None) {
                        return RowResult::Interrupted;
                    }
                }
            }
        }
        log::error!(
            "row {}: giving up after {attempt} attempt(s): {last_error}",
            msg.activity_id
        );
        self.dead_letter(msg, &last_error, None);
        self.tell_sender_of_failure(msg, &last_error)
    }

    /// Posts the backend's outcome to whoever sent the message.
    fn deliver(&mut self, msg: &Inbound, outcome: Outcome) -> RowResult {
        let reply = match outcome {
            Outcome::NoReply => {
                log::info!("row {}: backend chose not to reply", msg.activity_id);
                return RowResult::Done;
            }
            Outcome::Reply(r) => r,
        };
        if msg.in_reply_to.is_some() && !self.settings.reply_to_replies {
            // Loop guard: the inbound message is itself a reply; answering it
            // automatically lets two agents ping-pong forever.
            log::info!(
                "row {}: inbound message is a reply; not posting the backend's answer (--reply-to-replies to change)",
                msg.activity_id
            );
            return RowResult::Done;
        }
        match self.post_reply(msg, &reply.text, &reply.parts, false) {
            Ok(()) => RowResult::Done,
            Err(ReplyFailure::Interrupted) => RowResult::Interrupted,
            Err(ReplyFailure::Failed(e)) => {
                log::error!("row {}: reply not delivered: {e}", msg.activity_id);
                self.dead_letter(msg, &e, Some(&reply.text));
                RowResult::Done
            }
        }
    }

    /// Sends `text` to the peer (new `message/send`) or the canvas user (`/notify`).
    /// Transient failures are retried within [`REPLY_BUDGET`].
    fn post_reply(
        &mut self,
        msg: &Inbound,
        text: &str,
        parts: &[Value],
        is_error: bool,
    ) -> Result<(), ReplyFailure> {
        let deadline = Instant::now().checked_add(REPLY_BUDGET);
        let mut attempt: u32 = 0;
        let mut reauthed = false;
        loop {
            attempt = attempt.saturating_add(1);
            let result = match &msg.source_id {
                Some(peer) => {
                    let id = inbox::reply_message_id(self.client.workspace_id(), &msg.activity_id);
                    let mut env =
                        inbox::reply_envelope(&id, text, parts, msg.message_id.as_deref());
                    if is_error {
                        env["params"]["message"]["metadata"]["molecule_error"] = json!(true);
                    }
                    self.client.send_a2a(peer, &env).map(|answer| {
                        if answer.is_queued() {
                            log::info!(
                                "row {}: reply {id} queued for peer {peer}",
                                msg.activity_id
                            );
                        } else if let Some(err) = answer.body.get("error") {
                            log::warn!(
                                "row {}: peer {peer} answered our reply with an error: {err}",
                                msg.activity_id
                            );
                        } else {
                            log::info!(
                                "row {}: reply {id} delivered to peer {peer}",
                                msg.activity_id
                            );
                        }
                    })
                }
                None => self
                    .client
                    .notify(text, inbox::attachments_of(parts))
                    .map(|()| log::info!("row {}: reply sent to the canvas", msg.activity_id)),
            };
            let e = match result {
                Ok(()) => return Ok(()),
                Err(e) => e,
            };
            if e.is_unauthorized() && !reauthed {
                reauthed = true;
                match after_unauthorized(&self.client, &self.settings.token_source) {
                    AuthVerdict::RetryWithNewToken => continue,
                    AuthVerdict::Fatal(code, message) => {
                        self.shutdown.trigger(StopReason::Fatal { code, message });
                        return Err(ReplyFailure::Interrupted);
                    }
                }
            }
            let out_of_time = deadline.is_none_or(|d| Instant::now() >= d);
            if !e.is_retryable() || out_of_time {
                return Err(ReplyFailure::Failed(e.to_string()));
            }
            log::warn!(
                "row {}: {e}; retrying the reply (attempt {attempt})",
                msg.activity_id
            );
            if self.wait_backoff(attempt, e.retry_after()) {
                return Err(ReplyFailure::Interrupted);
            }
        }
    }

    /// The backend gave up on a message: tell the sender instead of staying silent.
    fn tell_sender_of_failure(&mut self, msg: &Inbound, error: &str) -> RowResult {
        let text = format!(
            "Sorry, the agent could not handle this message ({}).",
            short(error, 160)
        );
        match self.post_reply(msg, &text, &[], true) {
            Ok(()) | Err(ReplyFailure::Failed(_)) => RowResult::Done,
            Err(ReplyFailure::Interrupted) => RowResult::Interrupted,
        }
    }

    /// Appends the message to the dead-letter file (0600, one JSON object per line).
    fn dead_letter(&self, msg: &Inbound, error: &str, reply: Option<&str>) {
        let at = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let line = json!({
            "at_unix": at,
            "activity_id": msg.activity_id,
            "source_id": msg.source_id,
            "message_id": msg.message_id,
            "origin": msg.origin().as_str(),
            "text": msg.text,
            "error": error,
            "reply": reply,
        });
        let path = &self.settings.dead_letter_path;
        let result = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(path)
            .and_then(|mut f| {
                f.write_all(format!("{line}\n").as_bytes())?;
                f.sync_all()
            });
        match result {
            Ok(()) => log::warn!("row {}: written to {}", msg.activity_id, path.display()),
            Err(e) => log::error!(
                "row {}: cannot write {}: {e}",
                msg.activity_id,
                path.display()
            ),
        }
    }
}

enum ReplyFailure {
    Interrupted,
    Failed(String),
}

fn log_skip(id: &str, skip: &Skip) {
    if skip.is_surprising() {
        log::warn!("row {id}: skipped: {skip}");
    } else {
        log::debug!("row {id}: skipped: {skip}");
    }
}

fn short(s: &str, n: usize) -> String {
    let one: String = s.split_whitespace().collect::<Vec<_>>().join(" ");
    if one.chars().count() <= n {
        one
    } else {
        one.chars().take(n).collect::<String>() + "..."
    }
}
