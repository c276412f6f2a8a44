//! One message, start to finish: on a worker thread, run the backend (with bounded
//! retries) and save its reply durably; on that worker's poster thread
//! ([`Worker::deliver`]), post it to the sender and record the row as done.
//! A message that keeps failing is dead-lettered and its sender told; it never
//! stops intake.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::mpsc::SyncSender;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};

use crate::api::{ApiError, Kind, Platform, Since, before_ts_after};
use crate::backend::{Backend, BackendError, Outcome, RunHandle};
use crate::backoff::Backoff;
use crate::inbox::{self, Inbound};
use crate::shutdown::{Shutdown, StopReason};
use crate::state::{PendingReply, Store, Unsynced};

use super::auth::{AuthVerdict, after_unauthorized};
use super::notified::{Notified, PostId, ReplyId};
use super::sent;
use super::status::{RuntimeStatus, SharedStatus};

/// "Retry later" (exit 75) runs allowed per message before it counts as a failure.
const MAX_RETRY_LATER: u32 = 20;
/// How long a reply may keep failing with an error the platform reports about the
/// target (5xx) before it is dead-lettered. Network errors and 429 are retried for
/// as long as it takes: the platform itself is unreachable then, and polling waits
/// too.
const REPLY_TARGET_BUDGET: Duration = Duration::from_secs(600);

/// Retries of a failed state write: soon after space returns, without spinning.
pub(super) const STATE_RETRY: Backoff = Backoff {
    base: Duration::from_millis(500),
    max: Duration::from_secs(5),
    jitter: 0.25,
};

/// The echo lookup reads at most this many pages of this many rows.
const ECHO_PAGES: u32 = 8;
const ECHO_PAGE: u32 = 500;
/// Tries of one echo page when the platform answers a transient failure: a lookup
/// given up shows the reply again, so one 5xx or dropped connection must not decide.
const ECHO_TRIES: u32 = 4;

/// A conversation that has been quiet this long starts counting from zero again.
const QUIET_RESET: Duration = Duration::from_secs(600);
/// Conversations remembered for the guard (bounded like every cache).
const CONVERSATIONS: usize = 1024;

/// The second loop guard, for `--reply-to-replies`: counts automatic replies in a
/// row to messages that are themselves replies (`metadata.in_reply_to`), per peer
/// conversation (peer id + `contextId`). A fresh message from the peer breaks the
/// chain; so does 10 minutes of quiet. Fresh messages are never capped: a peer that
/// sends a steady stream must get every answer. Invariant: one lock; bounded LRU.
pub struct Conversations {
    max: u32,
    /// conversation -> (replies to replies in a row, when the last one went out).
    seen: Mutex<crate::lru::Lru<String, (u32, Instant)>>,
}

impl Conversations {
    /// A guard allowing `max` replies to replies in a row (0 = no cap).
    pub fn new(max: u32) -> Self {
        Conversations {
            max,
            seen: Mutex::new(crate::lru::Lru::new(CONVERSATIONS)),
        }
    }

    /// Counts one more automatic reply to `msg`'s conversation; `false` once the cap
    /// is reached. Canvas users are never capped: a notify cannot loop back.
    pub fn may_reply(&self, msg: &Inbound, now: Instant) -> bool {
        let Some(peer) = &msg.source_id else {
            return true;
        };
        if self.max == 0 {
            return true;
        }
        let key = format!("{peer}:{}", msg.context_id.as_deref().unwrap_or(""));
        let mut seen = self.seen.lock().unwrap_or_else(PoisonError::into_inner);
        if msg.in_reply_to.is_none() {
            seen.remove(&key);
            return true;
        }
        let count = match seen.peek(&key) {
            Some((n, last)) if now.saturating_duration_since(*last) < QUIET_RESET => *n,
            _ => 0,
        };
        if count >= self.max {
            // Keep the window open while the peer keeps answering.
            seen.insert(key, (count, now));
            return false;
        }
        seen.insert(key, (count + 1, now));
        true
    }
}

/// What every worker shares.
pub struct Context {
    /// The platform.
    pub client: Arc<dyn Platform>,
    /// The backend.
    pub backend: Arc<dyn Backend>,
    /// Durable state.
    pub store: Arc<Mutex<Store>>,
    /// Heartbeat numbers.
    pub status: SharedStatus,
    /// Stop flag.
    pub shutdown: Shutdown,
    /// Backend tries per message.
    pub max_attempts: u32,
    /// Post answers to inbound replies too.
    pub reply_to_replies: bool,
    /// The second loop guard.
    pub conversations: Conversations,
    /// `<state-dir>/<id>.deadletter.jsonl`.
    pub dead_letter_path: PathBuf,
    /// The queue of `a2a_send` self-reports (see [`super::sent`]).
    pub sent: SyncSender<sent::Report>,
    /// Our recent `/notify` posts: an identical reply's echo is not taken for another's.
    pub notified: Mutex<Notified>,
}

/// How a message ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    /// Done for good (answered, not answered on purpose, or dead-lettered).
    Done,
    /// Shutdown came first; the row stays unfinished and is redelivered.
    Interrupted,
}

/// What [`Worker::run`] leaves to do.
pub enum Ran {
    /// Nothing: the message ended (answered from a saved reply, not answered,
    /// dead-lettered) or was interrupted.
    Finished(Finish),
    /// A reply, journaled, for [`Worker::deliver`].
    Reply(Saved),
}

/// A reply its worker journaled. Its fsync is left to the poster (the worker's next
/// run need not wait for the disk) unless the hand-over has to wait
/// ([`Worker::make_durable`]): until then it survives a crash of the process, not a
/// power cut, and it is never posted before it is durable.
pub struct Saved {
    reply: PendingReply,
    unsynced: Option<Unsynced>,
}

enum ReplyFailure {
    Interrupted,
    Failed(String),
}

/// One worker's view: the shared context plus its own run handle and jitter seed.
pub struct Worker {
    ctx: Arc<Context>,
    run: RunHandle,
    seed: u64,
}

impl Worker {
    /// A worker whose backend runs can be cancelled through `run`.
    pub fn new(ctx: Arc<Context>, run: RunHandle) -> Self {
        Worker {
            ctx,
            run,
            seed: crate::uuid::random_u64(),
        }
    }

    fn store(&self) -> std::sync::MutexGuard<'_, Store> {
        self.ctx
            .store
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Handles one message (as a worker and its poster do, on one thread).
    #[cfg(test)]
    pub fn handle(&mut self, msg: &Inbound) -> Finish {
        match self.run(msg) {
            Ran::Finished(finish) => finish,
            Ran::Reply(reply) => self.deliver(msg, reply),
        }
    }

    /// Everything of [`Worker::handle`] up to a reply to post: the backend run, and
    /// every way a message ends without one. A reply comes back journaled, for
    /// [`Worker::deliver`] (which the next message's backend need not wait for).
    pub fn run(&mut self, msg: &Inbound) -> Ran {
        match self.run_to_reply(msg) {
            Ok(reply) => match self.journal(msg, reply) {
                Some(reply) => Ran::Reply(reply),
                None => Ran::Finished(Finish::Interrupted),
            },
            Err(finish) => Ran::Finished(finish),
        }
    }

    /// Saves a fresh reply before it waits for a poster: a crash while it waits
    /// behind a slow post must post it after the restart, not run the backend again.
    /// The fsync comes later ([`Worker::make_durable`]). `None`: stopped before it
    /// could be saved.
    fn journal(&mut self, msg: &Inbound, reply: PendingReply) -> Option<Saved> {
        // The canvas echo lookup after a restart searches from this time on: no
        // earlier than the post began.
        let reply = PendingReply {
            at_us: now_us(),
            ..reply
        };
        let mut unsynced = None;
        let saved = self.save(msg, "its reply (not posted)", |s| {
            unsynced = Some(s.record_reply_unsynced(&msg.activity_id, reply.clone())?);
            Ok(())
        });
        saved.then_some(Saved { reply, unsynced })
    }

    /// Makes a journaled reply durable: before its post, and before its worker waits
    /// at a busy poster's hand-over (a power cut during a long wait must not lose
    /// it). `None`: stopped before it could be saved.
    pub fn make_durable(&mut self, msg: &Inbound, saved: Saved) -> Option<Saved> {
        let Some(unsynced) = &saved.unsynced else {
            return Some(saved);
        };
        if let Err(e) = unsynced.sync() {
            // A failed fsync may have dropped the line without a later one saying so:
            // the reply is saved again, fsynced.
            log::warn!("{e}; saving the reply of row {} again", msg.activity_id);
            let reply = &saved.reply;
            if !self.save(msg, "its reply (not posted)", |s| {
                s.record_reply(&msg.activity_id, reply.clone())
            }) {
                return None;
            }
        }
        Some(Saved {
            reply: saved.reply,
            unsynced: None,
        })
    }

    /// Posts a reply [`Worker::run`] journaled (once it is durable), and records the
    /// row done.
    pub fn deliver(&mut self, msg: &Inbound, saved: Saved) -> Finish {
        match self.make_durable(msg, saved) {
            Some(saved) => self.post_and_finish(msg, saved.reply),
            None => Finish::Interrupted,
        }
    }

    /// [`Worker::run`]: `Ok` is a reply to deliver, `Err` how the message ended.
    fn run_to_reply(&mut self, msg: &Inbound) -> Result<PendingReply, Finish> {
        // A reply saved before a crash is posted again (same messageId), without
        // running the backend a second time.
        let saved = self.store().pending_reply(&msg.activity_id);
        if let Some(reply) = saved {
            // /notify has no idempotency key: look for the platform's echo of the
            // canvas reply before showing it a second time (§API-2.13, §API-2.4.1).
            let canvas = msg.source_id.is_none().then(|| {
                let id = self.notified().reply();
                (id, canvas_text(&reply.text, &reply.parts))
            });
            if let Some((id, shown)) = &canvas
                && let Some(echo) = self.canvas_echo(*id, shown, reply.at_us)
            {
                log::info!(
                    "row {}: its canvas reply is already shown (echo row {echo}); not posting it again",
                    msg.activity_id
                );
                self.count_handled();
                return Err(self.finish_posted(msg, Some(*id)));
            }
            log::info!(
                "row {}: posting the reply saved before a restart",
                msg.activity_id
            );
            RuntimeStatus::count(&self.ctx.status, |c| c.reply_resends += 1);
            return Err(self.post_and_finish(msg, reply));
        }
        let summary = msg.summary();
        // Message text stays out of info logs (journald keeps them); debug has it.
        log::info!(
            "row {}: message from {} ({} chars)",
            msg.activity_id,
            msg.sender_label(),
            msg.text.chars().count()
        );
        log::debug!("row {}: {summary}", msg.activity_id);
        RuntimeStatus::begin_task(&self.ctx.status, &summary);
        let result = self.run_backend(msg);
        match &result {
            // Interrupted by shutdown: says nothing about the backend's health.
            Err(None) => RuntimeStatus::abandon_task(&self.ctx.status),
            // The heartbeat carries the kind of failure only, not the backend's stderr.
            Err(Some(e)) => RuntimeStatus::end_task(&self.ctx.status, Some(&failure_class(e))),
            Ok(_) => RuntimeStatus::end_task(&self.ctx.status, None),
        }
        Err(match result {
            Ok(Outcome::NoReply) => {
                log::info!("row {}: backend chose not to reply", msg.activity_id);
                self.count_unanswered();
                self.finish(msg)
            }
            Ok(Outcome::Reply(_)) if !msg.origin().is_answered() => {
                // A platform notice (§API-2.19) looks like a canvas message: answering
                // it would post to the user's chat, which the notice says it is not.
                log::info!(
                    "row {}: request notice handled; its output is not posted",
                    msg.activity_id
                );
                self.count_handled();
                self.finish(msg)
            }
            Ok(Outcome::Reply(_)) if msg.in_reply_to.is_some() && !self.ctx.reply_to_replies => {
                // Loop guard: the inbound message is itself a reply; answering it
                // automatically lets two agents ping-pong forever.
                log::info!(
                    "row {}: inbound message is a reply; not posting the answer (--reply-to-replies to change)",
                    msg.activity_id
                );
                self.count_unanswered();
                self.finish(msg)
            }
            Ok(Outcome::Reply(_)) if !self.ctx.conversations.may_reply(msg, Instant::now()) => {
                log::warn!(
                    "row {}: {} answers in a row to replies from {} in this conversation; not posting more until it sends something fresh or pauses for {} min (--max-auto-replies)",
                    msg.activity_id,
                    self.ctx.conversations.max,
                    msg.sender_label(),
                    QUIET_RESET.as_secs() / 60
                );
                self.count_unanswered();
                self.finish(msg)
            }
            Ok(Outcome::Reply(r)) => {
                return Ok(PendingReply {
                    text: r.text,
                    parts: r.parts,
                    at_us: None,
                });
            }
            Err(None) => Finish::Interrupted,
            Err(Some(error)) => {
                log::error!("row {}: giving up: {error}", msg.activity_id);
                RuntimeStatus::count(&self.ctx.status, |c| c.failed += 1);
                self.dead_letter(msg, &error, None);
                self.tell_sender_of_failure(msg, &error)
            }
        })
    }

    /// Runs the backend until it succeeds or the attempts run out. `Err(None)` means
    /// interrupted by shutdown; `Err(Some(e))` means it gave up.
    fn run_backend(&mut self, msg: &Inbound) -> Result<Outcome, Option<String>> {
        let max = self.ctx.max_attempts;
        let mut attempt: u32 = 0;
        let mut retry_later: u32 = 0;
        loop {
            attempt = attempt.saturating_add(1);
            let req = msg.to_request(
                self.ctx.client.workspace_id(),
                self.ctx.client.api_url(),
                attempt,
            );
            let started = Instant::now();
            let result = self.ctx.backend.handle(&req, &self.run);
            let took = started.elapsed().as_secs_f64();
            if !matches!(result, Err(BackendError::Cancelled)) {
                RuntimeStatus::count(&self.ctx.status, |c| {
                    c.backend_seconds.observe(took);
                    if result.is_err() {
                        c.failed_attempts += 1;
                    }
                });
            }
            log::debug!(
                "row {}: backend attempt {attempt} took {} ms",
                msg.activity_id,
                started.elapsed().as_millis()
            );
            let e = match result {
                Ok(outcome) => return Ok(outcome),
                Err(BackendError::Cancelled) => return Err(None),
                Err(e) => e,
            };
            if self.ctx.shutdown.is_triggered() {
                return Err(None);
            }
            if e.is_retry_later() && retry_later < MAX_RETRY_LATER {
                retry_later += 1;
                attempt -= 1;
                log::info!("row {}: {e}; trying again later", msg.activity_id);
                if self.wait_backoff(retry_later, None) {
                    return Err(None);
                }
                continue;
            }
            if attempt >= max {
                return Err(Some(e.to_string()));
            }
            log::warn!("row {}: {e} (attempt {attempt}/{max})", msg.activity_id);
            if self.wait_backoff(attempt, None) {
                return Err(None);
            }
        }
    }

    fn post_and_finish(&mut self, msg: &Inbound, reply: PendingReply) -> Finish {
        let canvas = self.canvas_reply(msg);
        match self.post_reply(msg, canvas, &reply.text, &reply.parts, false) {
            Ok(()) => {
                let waited = msg.created_at_us.map(|created| {
                    let now = SystemTime::now()
                        .duration_since(UNIX_EPOCH)
                        .map_or(0, |d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX));
                    now.saturating_sub(created) as f64 / 1e6
                });
                RuntimeStatus::count(&self.ctx.status, |c| {
                    c.answered += 1;
                    if let Some(secs) = waited {
                        c.inbound_to_reply_seconds.observe(secs);
                    }
                });
                self.count_handled();
                self.finish_posted(msg, canvas)
            }
            Err(ReplyFailure::Interrupted) => Finish::Interrupted,
            Err(ReplyFailure::Failed(e)) => {
                log::error!("row {}: reply not delivered: {e}", msg.activity_id);
                self.dead_letter(msg, &e, Some(&reply.text));
                self.finish_posted(msg, canvas)
            }
        }
    }

    /// The id of a `notify` echo row showing `reply`'s canvas message `shown`, posted
    /// from `began_us` on, if the inbox holds one: more echoes of that text than our
    /// other posts of it can have made (see [`super::notified`]). Any doubt (no time
    /// saved, the lookup keeps failing, too many rows) answers `None`: a reply shown
    /// twice is better than one never shown.
    fn canvas_echo(
        &mut self,
        reply: ReplyId,
        shown: &str,
        began_us: Option<i64>,
    ) -> Option<String> {
        let began_us = began_us?;
        let now_us = now_us()?;
        let Some(from_us) = self.notified().window(reply, shown, began_us) else {
            log::info!(
                "looking for the canvas reply's echo: too many replies since its post to tell; posting again"
            );
            return None;
        };
        let secs = u64::try_from(now_us.saturating_sub(from_us) / 1_000_000)
            .unwrap_or(0)
            .saturating_add(2);
        let created_us = |r: &Value| {
            r.get("created_at")
                .and_then(Value::as_str)
                .and_then(crate::timestamp::parse_rfc3339)
        };
        let is_echo = |r: &Value| {
            r.get("method").and_then(Value::as_str) == Some("notify")
                && r.get("source_id").is_none_or(Value::is_null)
                && r.pointer("/response_body/result").and_then(Value::as_str) == Some(shown)
                && created_us(r).is_some_and(|t| t >= from_us)
        };
        // Every echo in the window counts, newest first; a busy inbox can hold more
        // than a page of rows newer than the post: page backwards (`before_ts`).
        // Rows at a page boundary come twice: they count once, by id.
        let mut echoes: HashSet<String> = HashSet::new();
        let mut newest: Option<String> = None;
        let mut since = Since::Secs(secs);
        let mut pages = 0;
        loop {
            if pages == ECHO_PAGES {
                log::warn!(
                    "looking for the canvas reply's echo: more than {} rows since the post; posting again",
                    ECHO_PAGES * ECHO_PAGE
                );
                return None;
            }
            pages += 1;
            let rows = self.echo_page(&since)?;
            for id in rows
                .iter()
                .filter(|r| is_echo(r))
                .filter_map(|r| r.get("id").and_then(Value::as_str))
            {
                if echoes.insert(id.to_string()) && newest.is_none() {
                    newest = Some(id.to_string());
                }
            }
            let Some(oldest) = rows.last().and_then(created_us) else {
                break;
            };
            if rows.len() < ECHO_PAGE as usize || oldest < from_us {
                break;
            }
            // This page was the step from the same oldest time: a whole page shares it.
            let step = before_ts_after(oldest, false);
            let stuck = matches!(&since, Since::Before(_, b) if *b == step);
            since = Since::Before(secs, before_ts_after(oldest, stuck));
        }
        let ours = self
            .notified()
            .matches(reply, shown, from_us, echoes.len(), now_us);
        if !ours && !echoes.is_empty() {
            log::info!(
                "the {} echo(es) of the same text since the post are other replies'; posting again",
                echoes.len()
            );
        }
        newest.filter(|_| ours)
    }

    /// One page of the echo lookup, retried with backoff while the failure is
    /// transient (up to [`ECHO_TRIES`]); `None` when it still fails or a stop comes.
    fn echo_page(&mut self, since: &crate::api::Since) -> Option<Vec<Value>> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            match self
                .ctx
                .client
                .activity_raw(since, ECHO_PAGE, 8 * 1024 * 1024)
            {
                Ok(rows) => return Some(rows),
                Err(e) => {
                    log::warn!("looking for the canvas reply's echo: {e}");
                    if !e.is_retryable()
                        || attempt == ECHO_TRIES
                        || self.wait_backoff(attempt, e.retry_after())
                    {
                        return None;
                    }
                }
            }
        }
    }

    fn notified(&self) -> std::sync::MutexGuard<'_, Notified> {
        self.ctx
            .notified
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// A fresh id for the posts of `msg`'s reply, if it goes to the canvas.
    fn canvas_reply(&self, msg: &Inbound) -> Option<ReplyId> {
        msg.source_id.is_none().then(|| self.notified().reply())
    }

    /// Records how a canvas post ended, for telling its echo from others'.
    fn settle_post(&self, post: PostId, result: &Result<(), ApiError>) {
        // Without a clock the post counts for ever (until forgotten): no false match.
        let now = now_us().unwrap_or(i64::MAX);
        let mut n = self.notified();
        match result {
            Ok(()) => n.shown(post, now),
            Err(e) if may_have_been_done(e) => n.lost(post, now),
            Err(_) => n.refused(post),
        }
    }

    /// One more message answered (or deliberately not answered) for the status file;
    /// dead-lettered ones are counted there instead.
    fn count_handled(&self) {
        RuntimeStatus::count(&self.ctx.status, |c| c.handled += 1);
    }

    /// Handled on purpose without posting an answer.
    fn count_unanswered(&self) {
        RuntimeStatus::count(&self.ctx.status, |c| {
            c.handled += 1;
            c.no_reply += 1;
        });
    }

    /// Records the row as done (activity id and message id into the ledger).
    fn finish(&mut self, msg: &Inbound) -> Finish {
        self.finish_posted(msg, None)
    }

    /// [`Worker::finish`] after posting to the canvas as `canvas`: its posts are
    /// saved with the row, for the echo lookup of an identical reply after a restart.
    fn finish_posted(&mut self, msg: &Inbound, canvas: Option<ReplyId>) -> Finish {
        let mut keys = Vec::with_capacity(2);
        if !msg.activity_id.is_empty() {
            keys.push(format!("a:{}", msg.activity_id));
        }
        keys.extend(msg.message_key());
        let posts = canvas.and_then(|reply| self.notified().finished(reply));
        if self.save(msg, "that it was handled", |s| {
            s.record_done(&msg.activity_id, keys.clone(), posts)
        }) {
            Finish::Done
        } else {
            Finish::Interrupted
        }
    }

    /// Runs the state write `write` until it succeeds; while it fails (full disk,
    /// read-only remount) the status says so, which pauses intake and wedges the
    /// heartbeat. `false` if a stop came first: then `what` is not saved, the row is
    /// not finished, and it is handled again after a restart.
    fn save(
        &mut self,
        msg: &Inbound,
        what: &str,
        mut write: impl FnMut(&mut Store) -> Result<(), crate::state::StateError>,
    ) -> bool {
        let mut attempt: u32 = 0;
        loop {
            let result = write(&mut self.store());
            match result {
                Ok(()) => {
                    if attempt > 0 && RuntimeStatus::state_ok(&self.ctx.status) {
                        log::info!("state is writable again; resuming intake");
                    }
                    return true;
                }
                Err(e) => {
                    if RuntimeStatus::state_failed(&self.ctx.status, &e.to_string()) {
                        log::error!("{e}: not taking new messages until the state can be written");
                    }
                }
            }
            attempt = attempt.saturating_add(1);
            self.seed = self.seed.wrapping_add(1);
            if self
                .ctx
                .shutdown
                .wait_timeout(STATE_RETRY.delay(attempt, self.seed))
            {
                log::error!(
                    "row {}: stopping before {what} could be saved; it will be handled again after a restart",
                    msg.activity_id
                );
                RuntimeStatus::count(&self.ctx.status, |c| c.unsaved += 1);
                return false;
            }
        }
    }

    /// Sends `text` to the peer (new `message/send`) or the canvas user (`/notify`,
    /// its posts tracked as `canvas`, see [`Worker::canvas_reply`]).
    fn post_reply(
        &mut self,
        msg: &Inbound,
        canvas: Option<ReplyId>,
        text: &str,
        parts: &[Value],
        is_error: bool,
    ) -> Result<(), ReplyFailure> {
        let started = Instant::now();
        let began_us = now_us();
        // A canvas reply's posts and what `/notify` shows of it.
        let canvas = canvas.map(|reply| (reply, canvas_text(text, parts)));
        let mut attempt: u32 = 0;
        // The last failure left it open whether the canvas reply was shown.
        let mut maybe_shown = false;
        loop {
            attempt = attempt.saturating_add(1);
            // /notify has no idempotency key: before posting a canvas reply again,
            // look for the echo of the post whose answer was lost (§API-2.13).
            if maybe_shown
                && let Some((reply, shown)) = &canvas
                && let Some(echo) = self.canvas_echo(*reply, shown, began_us)
            {
                log::info!(
                    "row {}: the canvas reply was shown although its answer was lost (echo row {echo}); not posting it again",
                    msg.activity_id
                );
                RuntimeStatus::count(&self.ctx.status, |c| c.replies_canvas += 1);
                return Ok(());
            }
            if attempt > 1 {
                RuntimeStatus::count(&self.ctx.status, |c| c.reply_resends += 1);
            }
            let used = self.ctx.client.credentials().token();
            let post = match (&canvas, now_us()) {
                (Some((reply, shown)), Some(now)) => {
                    Some(self.notified().begin(*reply, shown, now))
                }
                _ => None,
            };
            let result = self.post_once(msg, text, parts, is_error);
            if let Some(post) = post {
                self.settle_post(post, &result);
            }
            let e = match result {
                Ok(()) => {
                    RuntimeStatus::count(&self.ctx.status, |c| match msg.source_id {
                        Some(_) => c.replies_peer += 1,
                        None => c.replies_canvas += 1,
                    });
                    return Ok(());
                }
                Err(e) => e,
            };
            maybe_shown = may_have_been_done(&e);
            if e.is_unauthorized() {
                match after_unauthorized(self.ctx.client.as_ref(), &used, &self.ctx.shutdown) {
                    AuthVerdict::RetryWithNewToken => continue,
                    AuthVerdict::Unknown => {}
                    AuthVerdict::Fatal(error) => {
                        self.ctx.shutdown.trigger(StopReason::Fatal(error));
                        return Err(ReplyFailure::Interrupted);
                    }
                }
            } else if e.kind() == Kind::Delivered {
                // The target got it; only the answer was lost (§API-2.7.5).
                log::info!(
                    "row {}: {e}; the platform confirms delivery",
                    msg.activity_id
                );
                RuntimeStatus::count(&self.ctx.status, |c| c.replies_peer += 1);
                return Ok(());
            } else if !e.is_retryable() {
                return Err(ReplyFailure::Failed(e.to_string()));
            } else if is_platform_error(e.kind()) && started.elapsed() >= REPLY_TARGET_BUDGET {
                return Err(ReplyFailure::Failed(format!(
                    "{e} (still failing after {} s)",
                    REPLY_TARGET_BUDGET.as_secs()
                )));
            }
            if attempt == 1 || attempt.is_multiple_of(10) {
                log::warn!(
                    "row {}: {e}; retrying the reply (attempt {attempt})",
                    msg.activity_id
                );
            }
            // Replies queued behind this one are journaled but not yet fsynced: a
            // power cut during a long retry must not lose them (and run their
            // backends again), so they are made durable before the wait.
            let waiting = self.store().written_replies();
            if let Err(e) = waiting.sync() {
                log::debug!("row {}: {e}", msg.activity_id);
            }
            if self.wait_backoff(attempt, e.retry_after()) {
                return Err(ReplyFailure::Interrupted);
            }
        }
    }

    fn post_once(
        &self,
        msg: &Inbound,
        text: &str,
        parts: &[Value],
        is_error: bool,
    ) -> Result<(), ApiError> {
        let client = &self.ctx.client;
        match &msg.source_id {
            Some(peer) => {
                let id = inbox::reply_message_id(client.workspace_id(), &msg.activity_id);
                // Serialized once: the self-report carries the same bytes.
                let env = inbox::Envelope::reply(&id, text, parts, msg, is_error);
                let bytes = env.to_vec();
                let answer = client.send_a2a(peer, &bytes)?;
                // Our side of the conversation, for `molecule history` (best effort),
                // posted by the self-report thread while the next message starts.
                let report = sent::Report {
                    row: msg.activity_id.clone(),
                    body: env.report(peer.as_str(), &bytes),
                };
                sent::send(&self.ctx.sent, client.as_ref(), report);
                if answer.is_queued() {
                    log::info!("row {}: reply {id} queued for peer {peer}", msg.activity_id);
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
                Ok(())
            }
            None => {
                client.notify(&canvas_text(text, parts), inbox::attachments_of(parts))?;
                log::info!("row {}: reply sent to the canvas", msg.activity_id);
                Ok(())
            }
        }
    }

    /// The backend gave up on a message: tell the sender instead of staying silent.
    /// Only the kind of failure goes out (the backend's stderr may hold secrets), and
    /// never in answer to a reply or another error: two failing agents would loop.
    fn tell_sender_of_failure(&mut self, msg: &Inbound, error: &str) -> Finish {
        let is_error_reply = msg
            .raw
            .pointer("/params/message/metadata/molecule_error")
            .is_some();
        if !msg.origin().is_answered() {
            return self.finish(msg);
        }
        if msg.in_reply_to.is_some() || is_error_reply {
            log::info!(
                "row {}: not telling the sender: its message was itself a reply",
                msg.activity_id
            );
            return self.finish(msg);
        }
        let text = format!(
            "Sorry, the agent could not handle this message ({}).",
            failure_class(error)
        );
        let canvas = self.canvas_reply(msg);
        match self.post_reply(msg, canvas, &text, &[], true) {
            Ok(()) | Err(ReplyFailure::Failed(_)) => self.finish_posted(msg, canvas),
            Err(ReplyFailure::Interrupted) => Finish::Interrupted,
        }
    }

    /// Appends the message to the dead-letter file (0600, one JSON object per line).
    fn dead_letter(&self, msg: &Inbound, error: &str, reply: Option<&str>) {
        RuntimeStatus::count(&self.ctx.status, |c| c.dead_lettered += 1);
        RuntimeStatus::note_error(
            &self.ctx.status,
            &format!("row {}: {}", msg.activity_id, failure_class(error)),
        );
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
        let path = &self.ctx.dead_letter_path;
        let result = crate::state::append_line(path, &line);
        match result {
            Ok(()) => log::warn!("row {}: written to {}", msg.activity_id, path.display()),
            Err(e) => log::error!(
                "row {}: cannot write {}: {e}",
                msg.activity_id,
                path.display()
            ),
        }
    }

    /// Waits the backoff for `attempt` (at least `retry_after`). `true` = stop requested.
    fn wait_backoff(&mut self, attempt: u32, retry_after: Option<Duration>) -> bool {
        self.seed = self.seed.wrapping_add(1);
        let mut d = Backoff::default().delay(attempt, self.seed);
        if let Some(r) = retry_after {
            d = d.max(r);
        }
        self.ctx.shutdown.wait_timeout(d)
    }
}

/// The kind of a backend failure, without its output.
pub(super) fn failure_class(error: &str) -> String {
    // The command's stderr and a worker's error detail may hold anything.
    let head = error
        .split(" (stderr:")
        .next()
        .and_then(|h| h.split(" (detail:").next())
        .unwrap_or(error);
    head.strip_prefix("backend: ").unwrap_or(head).to_string()
}

/// What `/notify` shows for a canvas reply: its text, or for a files-only reply the
/// files' names (the platform needs a non-empty message).
fn canvas_text(text: &str, parts: &[Value]) -> String {
    if text.trim().is_empty() {
        attachment_names(&inbox::attachments_of(parts))
    } else {
        text.to_string()
    }
}

/// Now, in Unix µs.
fn now_us() -> Option<i64> {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .ok()
        .and_then(|d| i64::try_from(d.as_micros()).ok())
}

/// Whether a failed post may still have been carried out: no answer (timeout, a
/// dropped connection) or a 5xx, which a gateway can send after the platform did
/// the work. A 4xx, 429 included, was refused before anything happened.
fn may_have_been_done(e: &ApiError) -> bool {
    e.kind() == Kind::NoAnswer || is_platform_error(e.kind())
}

/// A 5xx: the platform (or the target behind it) failed, not our request.
fn is_platform_error(kind: Kind) -> bool {
    matches!(
        kind,
        Kind::ServerError | Kind::Unavailable | Kind::Busy | Kind::Delivered
    )
}

fn attachment_names(attachments: &[Value]) -> String {
    let names: Vec<&str> = attachments
        .iter()
        .filter_map(|a| a.get("name")?.as_str())
        .collect();
    if names.is_empty() {
        "(empty reply)".to_string()
    } else {
        format!("Attached: {}", names.join(", "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conversation_guard_caps_replies_to_replies_only() {
        let g = Conversations::new(2);
        let mut msg = crate::inbox::classify(
            &serde_json::from_value(json!({"id":"r","method":"message/send",
                "source_id":"22222222-2222-4222-8222-222222222222",
                "request_body":{"params":{"message":{"contextId":"c","parts":[{"kind":"text","text":"x"}]}}}}))
            .unwrap(),
            "11111111-1111-4111-8111-111111111111",
        )
        .unwrap();
        let t0 = Instant::now();
        // A steady stream of fresh messages is always answered.
        for _ in 0..50 {
            assert!(g.may_reply(&msg, t0));
        }
        // Replies to our replies are capped...
        msg.in_reply_to = Some("ours".into());
        assert!(g.may_reply(&msg, t0));
        assert!(g.may_reply(&msg, t0));
        assert!(!g.may_reply(&msg, t0 + Duration::from_secs(60)));
        // ...per conversation...
        msg.context_id = Some("other".into());
        assert!(g.may_reply(&msg, t0));
        msg.context_id = Some("c".into());
        // ...until the peer says something fresh, or the conversation goes quiet.
        assert!(g.may_reply(&msg, t0 + Duration::from_secs(60) + QUIET_RESET));
        assert!(g.may_reply(&msg, t0 + Duration::from_secs(61) + QUIET_RESET));
        assert!(!g.may_reply(&msg, t0 + Duration::from_secs(62) + QUIET_RESET));
        msg.in_reply_to = None;
        assert!(g.may_reply(&msg, t0));
        msg.in_reply_to = Some("ours".into());
        assert!(g.may_reply(&msg, t0));
        // Canvas users and a cap of 0 are never limited.
        msg.source_id = None;
        for _ in 0..5 {
            assert!(g.may_reply(&msg, t0));
        }
        let off = Conversations::new(0);
        msg.source_id = Some(crate::runner::fake::id(
            "22222222-2222-4222-8222-222222222222",
        ));
        for _ in 0..5 {
            assert!(off.may_reply(&msg, t0));
        }
    }

    #[test]
    fn failure_class_drops_stderr() {
        assert_eq!(
            failure_class("backend: command exited with status 3 (stderr: API_KEY=sk-123 boom)"),
            "command exited with status 3"
        );
        assert_eq!(
            failure_class("backend: the worker reported an error (detail: key sk-1)"),
            "the worker reported an error"
        );
        assert_eq!(
            failure_class("backend: command timed out after 1s"),
            "command timed out after 1s"
        );
    }

    #[test]
    fn files_only_canvas_reply_has_text() {
        assert_eq!(
            attachment_names(&[json!({"uri":"u","name":"a.png"})]),
            "Attached: a.png"
        );
        assert_eq!(attachment_names(&[]), "(empty reply)");
    }

    #[test]
    fn only_an_unanswered_post_or_a_5xx_may_have_been_done() {
        let status = |status| ApiError::Status {
            op: "notify",
            status,
            message: String::new(),
            hint: None,
            retry_after: None,
            delivery_confirmed: false,
            busy: false,
            code: None,
        };
        assert!(may_have_been_done(&ApiError::Timeout { op: "notify" }));
        assert!(may_have_been_done(&ApiError::Transport {
            op: "notify",
            detail: "connection reset".into()
        }));
        assert!(may_have_been_done(&status(502)));
        for refused in [429, 408, 401, 400] {
            assert!(!may_have_been_done(&status(refused)), "{refused}");
        }
    }

    /// A worker over the in-memory platform and the mock backend (`echo: %s`).
    mod worker {
        use std::collections::BTreeMap;

        use super::super::super::fake::{Fake, OWN, PEER, status};
        use super::super::*;
        use crate::backend::MockBackend;
        use crate::error::Error;
        use crate::inbox::Inbound;

        struct Setup {
            dir: PathBuf,
            worker: Worker,
            store: Arc<Mutex<Store>>,
            shutdown: Shutdown,
        }

        impl Drop for Setup {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.dir);
            }
        }

        fn setup(fake: &Arc<Fake>) -> Setup {
            let dir =
                std::env::temp_dir().join(format!("molecule-dispatch-{}", crate::uuid::new_v4()));
            std::fs::create_dir_all(&dir).unwrap();
            setup_in(fake, dir)
        }

        /// A worker over the state in `dir` (as a restart finds it).
        fn setup_in(fake: &Arc<Fake>, dir: PathBuf) -> Setup {
            let store = Arc::new(Mutex::new(Store::open(&dir, OWN).unwrap()));
            let shutdown = Shutdown::new();
            let platform: Arc<dyn Platform> = fake.clone();
            let ctx = Arc::new(Context {
                client: platform,
                backend: Arc::new(MockBackend::from_opts(&BTreeMap::new()).unwrap()),
                store: store.clone(),
                status: RuntimeStatus::new(Instant::now()),
                shutdown: shutdown.clone(),
                max_attempts: 1,
                reply_to_replies: false,
                conversations: Conversations::new(10),
                dead_letter_path: dir.join("dead.jsonl"),
                // No report thread: reports are posted inline.
                sent: sent::queue().0,
                notified: Mutex::new(Notified::new()),
            });
            Setup {
                worker: Worker::new(ctx, RunHandle::new()),
                dir,
                store,
                shutdown,
            }
        }

        fn message(source: Option<&str>) -> Inbound {
            let row: crate::wire::ActivityRow = serde_json::from_value(json!({
                "id": "33333333-3333-4333-8333-333333333333",
                "activity_type": "a2a_receive",
                "source_id": source,
                "method": "message/send",
                "request_body": {"jsonrpc": "2.0", "method": "message/send", "params": {
                    "message": {"role": "user", "messageId": "m-1",
                        "parts": [{"kind": "text", "text": "hello"}]}}}
            }))
            .unwrap();
            crate::inbox::classify(&row, OWN).unwrap()
        }

        fn handled(s: &Setup, msg: &Inbound) -> bool {
            s.store
                .lock()
                .unwrap()
                .is_handled(&format!("a:{}", msg.activity_id))
        }

        #[test]
        fn a_peer_message_is_answered_to_the_peer_and_recorded() {
            let fake = Fake::new(vec![]);
            let mut s = setup(&fake);
            let msg = message(Some(PEER));
            assert_eq!(s.worker.handle(&msg), Finish::Done);
            let sent = fake.sent();
            assert_eq!(sent.len(), 1, "{sent:?}");
            assert_eq!(sent[0].0, PEER);
            assert!(
                sent[0].1.to_string().contains("echo: hello"),
                "{}",
                sent[0].1
            );
            assert!(handled(&s, &msg));
        }

        /// The messageIds of the replies sent so far.
        fn sent_ids(fake: &Fake) -> Vec<String> {
            fake.sent()
                .iter()
                .map(|(_, env)| env["params"]["message"]["messageId"].to_string())
                .collect()
        }

        #[test]
        fn a_crash_after_the_unsynced_done_line_answers_once() {
            let fake = Fake::new(vec![]);
            let mut s = setup(&fake);
            let msg = message(Some(PEER));
            assert_eq!(s.worker.handle(&msg), Finish::Done);
            let lines = std::fs::read_to_string(s.dir.join(format!("{OWN}.journal"))).unwrap();
            assert_eq!(lines.lines().count(), 2, "{lines}");
            // What a restart finds in a state dir holding only `journal`.
            let restart = |journal: &str| {
                let dir = std::env::temp_dir()
                    .join(format!("molecule-dispatch-{}", crate::uuid::new_v4()));
                std::fs::create_dir_all(&dir).unwrap();
                std::fs::write(dir.join(format!("{OWN}.journal")), journal).unwrap();
                setup_in(&fake, dir)
            };
            // The process dies (no checkpoint): the done line, not fsynced, is in
            // the page cache, so the row is handled after the restart.
            assert!(handled(&restart(&lines), &msg));
            // The power goes: only the reply, fsynced before its post, is on disk.
            // The restart posts that saved reply again under the same messageId (the
            // platform drops it as a duplicate), never a second run's answer.
            let synced = lines.find('\n').unwrap() + 1;
            let mut after = restart(&lines[..synced]);
            assert!(!handled(&after, &msg));
            assert_eq!(after.worker.handle(&msg), Finish::Done);
            let ids = sent_ids(&fake);
            assert_eq!(ids.len(), 2, "{ids:?}");
            assert_eq!(ids[0], ids[1]);
            let (c, _, _) = RuntimeStatus::snapshot(&after.worker.ctx.status);
            assert_eq!(c.reply_resends, 1, "the saved reply, not a new run");
            assert!(handled(&after, &msg));
        }

        #[test]
        fn a_reply_is_journaled_unsynced_and_made_durable_before_its_post() {
            let fake = Fake::new(vec![]);
            let mut s = setup(&fake);
            let msg = message(Some(PEER));
            let Ran::Reply(saved) = s.worker.run(&msg) else {
                panic!("expected a reply to deliver");
            };
            // Journaled (a restart would find it), not yet fsynced, not posted.
            assert!(saved.unsynced.is_some());
            assert_eq!(s.store.lock().unwrap().unsynced_lines(), 1);
            assert!(
                s.store
                    .lock()
                    .unwrap()
                    .pending_reply(&msg.activity_id)
                    .is_some()
            );
            assert!(fake.sent().is_empty());
            // What a worker does when its poster is busy: fsync before waiting.
            let saved = s.worker.make_durable(&msg, saved).unwrap();
            assert!(saved.unsynced.is_none());
            assert_eq!(s.store.lock().unwrap().unsynced_lines(), 0);
            assert_eq!(s.worker.deliver(&msg, saved), Finish::Done);
            assert_eq!(fake.sent().len(), 1);
            assert!(handled(&s, &msg));
        }

        #[test]
        fn a_canvas_message_is_answered_through_notify() {
            let fake = Fake::new(vec![]);
            let mut s = setup(&fake);
            let msg = message(None);
            assert_eq!(s.worker.handle(&msg), Finish::Done);
            assert_eq!(fake.notified(), vec!["echo: hello".to_string()]);
            assert!(fake.sent().is_empty());
            assert!(handled(&s, &msg));
        }

        #[test]
        fn a_confirmed_delivery_is_not_sent_again() {
            let fake = Fake::new(vec![]);
            let mut confirmed = status("send", 502);
            if let ApiError::Status {
                delivery_confirmed, ..
            } = &mut confirmed
            {
                *delivery_confirmed = true;
            }
            fake.posts.lock().unwrap().push_back(confirmed);
            let mut s = setup(&fake);
            let msg = message(Some(PEER));
            assert_eq!(s.worker.handle(&msg), Finish::Done);
            assert!(fake.sent().is_empty(), "re-sent after a confirmed delivery");
            assert!(handled(&s, &msg));
        }

        #[test]
        fn a_lost_canvas_answer_whose_echo_lookup_fails_once_is_not_shown_again() {
            // The notify is shown but its answer is lost (a 502 after handling); the
            // first page of the echo lookup fails, the retry finds the echo.
            let echo = json!({
                "id": "44444444-4444-4444-8444-444444444444",
                "method": "notify",
                "source_id": null,
                "response_body": {"result": "echo: hello"},
                "created_at": crate::timestamp::rfc3339(now_us().unwrap() + 1_000_000),
            });
            let fake = Fake::new(vec![Err(status("poll", 500)), Ok(vec![echo])]);
            fake.posts.lock().unwrap().push_back(status("notify", 502));
            let mut s = setup(&fake);
            let msg = message(None);
            assert_eq!(s.worker.handle(&msg), Finish::Done);
            assert!(fake.notified().is_empty(), "shown a second time");
            assert_eq!(fake.asked().len(), 2, "{:?}", fake.asked());
            assert!(handled(&s, &msg));
        }

        #[test]
        fn a_refused_reply_is_dead_lettered_not_retried() {
            let fake = Fake::new(vec![]);
            fake.posts.lock().unwrap().push_back(status("send", 400));
            let mut s = setup(&fake);
            let msg = message(Some(PEER));
            assert_eq!(s.worker.handle(&msg), Finish::Done);
            assert!(fake.sent().is_empty());
            let dead = std::fs::read_to_string(s.dir.join("dead.jsonl")).unwrap();
            assert!(dead.contains(&msg.activity_id), "{dead}");
        }

        #[test]
        fn a_rejected_token_stops_the_process_and_leaves_the_message() {
            let fake = Fake::new(vec![]);
            fake.posts.lock().unwrap().push_back(status("send", 401));
            let mut s = setup(&fake);
            let msg = message(Some(PEER));
            assert_eq!(s.worker.handle(&msg), Finish::Interrupted);
            assert!(!handled(&s, &msg), "redelivered after a restart");
            match s.shutdown.reason() {
                Some(StopReason::Fatal(e @ Error::Credentials(_))) => assert_eq!(e.exit_code(), 3),
                other => panic!("{other:?}"),
            }
        }
    }
}
