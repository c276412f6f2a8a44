//! The tracker's thread: when to fetch the platform's list, and handing each due
//! result to the backend.

use std::sync::Arc;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender};
use std::time::Instant;

use super::files::{DelegationResult, unix_now};
use super::tracker::{Run, Step, Tracker, later};
use crate::backend::{BackendError, Origin, Request};
use crate::backoff::Backoff;
use crate::peers::{Cached, PeerCache};
use crate::shutdown::Shutdown;

use super::super::side_thread::SideThread;
use super::super::status::RuntimeStatus;

/// The poll thread's handle: a `delegate_result` row wakes the tracker at once.
#[derive(Clone)]
pub struct Waker(SyncSender<()>);

impl Waker {
    /// Never blocks: a wake already waiting covers this one too.
    pub fn wake(&self) {
        let _ = self.0.try_send(());
    }
}

/// The wake channel, also woken when a stop is requested.
pub fn wake_channel(shutdown: &Shutdown) -> (Waker, Receiver<()>) {
    let (tx, rx) = mpsc::sync_channel(1);
    let waker = Waker(tx);
    let on_stop = waker.clone();
    shutdown.on_trigger(move || on_stop.wake());
    (waker, rx)
}

/// What the tracker thread needs besides the tracker.
pub struct Context {
    /// The client, the backend results are handed to, `--delegations-secs`.
    pub side: SideThread,
    /// Names for the target workspace, when known.
    pub peers: Option<Arc<PeerCache>>,
}

/// The tracker thread: fetch at start-up, every `ctx.side.every` and on a wake; deliver
/// what is due; wait for the earliest of the next fetch, the next retry and a wake.
/// The first pass also runs when `--once` has already finished the inbox, so a cron
/// run delivers the results it finds.
pub fn run(mut tracker: Tracker, ctx: Context, wake: Receiver<()>) {
    let fetch_backoff = Backoff {
        max: ctx.side.every,
        ..Backoff::default()
    };
    let mut seed = crate::uuid::random_u64();
    let mut next_fetch = Instant::now();
    let mut failures: u32 = 0;
    let mut woken = false;
    let mut first = true;
    loop {
        if ctx.side.should_stop(first) {
            break;
        }
        let now = Instant::now();
        if woken || now >= next_fetch {
            match ctx.side.client.delegations(None) {
                Ok(list) => {
                    if failures > 0 {
                        log::info!("delegations: reachable again after {failures} failure(s)");
                    }
                    failures = 0;
                    tracker.absorb(&list, now);
                    next_fetch = later(now, ctx.side.every);
                }
                Err(e) => {
                    failures = failures.saturating_add(1);
                    if failures == 1 || failures.is_multiple_of(10) {
                        log::warn!("{e} (attempt {failures})");
                    }
                    seed = seed.wrapping_add(1);
                    next_fetch = later(now, fetch_backoff.delay(failures, seed));
                }
            }
        }
        for id in tracker.ready(Instant::now()) {
            if ctx.side.shutdown.is_triggered() && !first {
                break;
            }
            let busy = ctx.side.backend_busy();
            let step = tracker.deliver(&id, Instant::now(), busy, &mut |r, attempt| {
                run_backend(&ctx, r, attempt)
            });
            if step == Step::Interrupted {
                break;
            }
        }
        first = false;
        let deadline = tracker.next_due().map_or(next_fetch, |d| d.min(next_fetch));
        let wait = deadline.saturating_duration_since(Instant::now());
        woken = match wake.recv_timeout(wait) {
            Ok(()) => true,
            Err(RecvTimeoutError::Timeout) => false,
            Err(RecvTimeoutError::Disconnected) => {
                ctx.side.shutdown.wait_timeout(wait);
                false
            }
        };
    }
    if let Err(e) = tracker.save() {
        log::error!("{e}");
    }
}

fn run_backend(ctx: &Context, r: &DelegationResult, attempt: u32) -> Run {
    let (caller_name, caller_role) = match ctx
        .peers
        .as_ref()
        .map(|p| p.lookup(&r.target_id, Instant::now()))
    {
        Some(Cached::Found(info)) => (info.name, info.role),
        _ => (None, None),
    };
    let mut extra_env = std::collections::BTreeMap::new();
    extra_env.insert(
        "MOLECULE_DELEGATION_ID".to_string(),
        r.delegation_id.clone(),
    );
    let req = Request {
        workspace_id: ctx.side.client.workspace_id().to_string(),
        api_url: ctx.side.client.api_url().to_string(),
        text: r.request_text(),
        other_parts: Vec::new(),
        caller_id: Some(r.target_id.clone()).filter(|t| crate::uuid::is_uuid(t)),
        caller_name,
        caller_role,
        message_id: None,
        activity_id: String::new(),
        context_id: None,
        task_id: None,
        method: "delegation_result".into(),
        origin: Origin::DelegationResult,
        attempt,
        raw: r.to_record(unix_now()),
        extra_env,
        attachments: Vec::new(),
        request_id: None,
    };
    let short = r.delegation_id.get(..8).unwrap_or(&r.delegation_id);
    RuntimeStatus::begin_task(&ctx.side.status, &format!("delegation result {short}"));
    let result = ctx.side.backend.handle(&req, &ctx.side.run);
    let (run, failure) = match result {
        // The output goes nowhere: posting it would be a message nobody asked for.
        Ok(_) => (Run::Delivered, None),
        Err(BackendError::Cancelled) => (Run::Interrupted, None),
        Err(e) if e.is_retry_later() => (Run::RetryLater(e.to_string()), None),
        Err(e) => {
            let text = e.to_string();
            // The heartbeat carries the kind of failure, not the backend's stderr.
            let class = super::super::dispatch::failure_class(&text);
            (Run::Failed(text), Some(class))
        }
    };
    RuntimeStatus::end_task(&ctx.side.status, failure.as_deref());
    run
}

#[cfg(test)]
mod tests {
    use super::super::super::fake::{Fake, OWN, PEER, Recorder, once_side_thread};
    use super::super::super::status::SharedStatus;
    use super::*;
    use serde_json::{Value, json};

    const D1: &str = "dddddddd-0000-4000-8000-000000000001";

    /// One `--once` pass of the thread over `fake`, with the tracker's files in `dir`.
    fn one_pass(
        fake: &Arc<Fake>,
        backend: &Arc<Recorder>,
        dir: &std::path::Path,
        status: SharedStatus,
    ) {
        let now = Instant::now();
        let tracker = Tracker::open(dir, OWN, 64, Arc::default(), now).unwrap();
        let side = once_side_thread(fake, backend, status);
        let (_waker, wake) = wake_channel(&side.shutdown);
        let ctx = Context { side, peers: None };
        run(tracker, ctx, wake);
    }

    fn entry(status: &str) -> Value {
        json!({"delegation_id": D1, "source_id": OWN, "target_id": PEER,
               "direction": "sent", "summary": "write the report", "status": status,
               "response_preview": "done: 42", "created_at": "2026-01-01T00:00:00Z"})
    }

    #[test]
    fn a_result_is_relayed_once_across_fetches_and_restarts() {
        let dir = std::env::temp_dir().join(format!("molecule-dt-{}", crate::uuid::new_v4()));
        crate::state::ensure_dir(&dir).unwrap();
        let fake = Fake::new(vec![]);
        // Newest first, several entries per delegation.
        let list = vec![entry("completed"), entry("in_progress")];
        fake.delegation_lists
            .lock()
            .unwrap()
            .push_back(list.clone());
        let backend = Arc::new(Recorder::default());
        one_pass(&fake, &backend, &dir, RuntimeStatus::new(Instant::now()));
        let seen = backend.seen();
        assert_eq!(seen.len(), 1, "{seen:?}");
        assert_eq!(seen[0].origin, Origin::DelegationResult);
        assert_eq!(seen[0].caller_id.as_deref(), Some(PEER));
        assert_eq!(
            seen[0]
                .extra_env
                .get("MOLECULE_DELEGATION_ID")
                .map(String::as_str),
            Some(D1)
        );
        assert!(seen[0].text.contains("done: 42"), "{}", seen[0].text);

        // The platform still lists it after a restart: not relayed again.
        fake.delegation_lists.lock().unwrap().push_back(list);
        let again = Arc::new(Recorder::default());
        one_pass(&fake, &again, &dir, RuntimeStatus::new(Instant::now()));
        assert!(again.seen().is_empty(), "{:?}", again.seen());
        assert!(fake.delegation_lists.lock().unwrap().is_empty(), "fetched");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_result_found_while_every_worker_is_busy_is_kept_for_later() {
        let dir = std::env::temp_dir().join(format!("molecule-dt-{}", crate::uuid::new_v4()));
        crate::state::ensure_dir(&dir).unwrap();
        let fake = Fake::new(vec![]);
        fake.delegation_lists
            .lock()
            .unwrap()
            .push_back(vec![entry("completed")]);
        let busy = RuntimeStatus::new(Instant::now());
        RuntimeStatus::begin_task(&busy, "a message");
        let backend = Arc::new(Recorder::default());
        one_pass(&fake, &backend, &dir, busy);
        assert!(backend.seen().is_empty(), "concurrency 1, one task running");
        // Next start: the platform no longer lists it, the saved pending result goes.
        one_pass(&fake, &backend, &dir, RuntimeStatus::new(Instant::now()));
        assert_eq!(backend.seen().len(), 1);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
