//! The heartbeat thread: one beat at start, then every `--heartbeat-secs`, with the
//! live `RuntimeStatus`. Transient failures are logged and the next beat comes on
//! schedule; after an outage the workspace is registered again (§API-4.1.5); a 401
//! goes through the credential check (never a spin).

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use crate::api::Platform;
use crate::shutdown::{Shutdown, StopReason};

use super::auth::{AuthVerdict, after_unauthorized};
use super::status::{RuntimeStatus, SharedStatus};
use super::supervise::Progress;

/// Failed beats in a row after which the next good one also re-registers.
const REREGISTER_AFTER: u32 = 3;

/// Runs until shutdown.
pub fn run(
    client: Arc<dyn Platform>,
    every: Duration,
    status: SharedStatus,
    shutdown: Shutdown,
    backend_trouble: &dyn Fn() -> Option<String>,
    progress: &Progress,
) {
    let mut failures: u32 = 0;
    let mut next = Instant::now();
    loop {
        progress.idle();
        if shutdown.wait_until(next) {
            return;
        }
        progress.busy();
        next = Instant::now()
            .checked_add(every)
            .unwrap_or_else(Instant::now);
        RuntimeStatus::set_trouble(&status, backend_trouble());
        let hb = RuntimeStatus::heartbeat(&status, client.workspace_id(), Instant::now());
        let used = client.credentials().token();
        let mut result = client.heartbeat(&hb);
        if let Err(e) = &result
            && e.is_unauthorized()
        {
            match after_unauthorized(client.as_ref(), &used, &shutdown) {
                AuthVerdict::RetryWithNewToken => result = client.heartbeat(&hb),
                AuthVerdict::Unknown => {}
                AuthVerdict::Fatal(error) => {
                    shutdown.trigger(StopReason::Fatal(error));
                    return;
                }
            }
        }
        match result {
            Ok(()) => {
                RuntimeStatus::count(&status, |c| c.last_heartbeat_ok = Some(SystemTime::now()));
                if failures >= REREGISTER_AFTER {
                    // The platform may have marked us offline meanwhile; register is
                    // cheap and idempotent.
                    match client.register(client.agent_card()) {
                        Ok(_) => log::info!("registered again after {failures} failed heartbeats"),
                        Err(e) => log::warn!("re-register after the outage failed: {e}"),
                    }
                }
                if failures > 0 {
                    log::info!("heartbeat recovered after {failures} failed attempt(s)");
                }
                failures = 0;
                log::debug!(
                    "heartbeat sent (active_tasks={}, runtime_state={:?})",
                    hb.active_tasks,
                    hb.runtime_state
                );
            }
            Err(e) => {
                RuntimeStatus::note_error(&status, &e.to_string());
                failures = failures.saturating_add(1);
                // First failure and then every tenth: the platform marks us offline
                // after 180 s without beats, which the operator sees anyway.
                if failures == 1 || failures.is_multiple_of(10) {
                    log::warn!(
                        "{e} (attempt {failures}; next beat in {}s)",
                        every.as_secs()
                    );
                }
                if let Some(wait) = e.retry_after() {
                    next = next.max(Instant::now().checked_add(wait).unwrap_or(next));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::fake::{Fake, status};
    use super::*;
    use crate::api::ApiError;
    use crate::error::Error;

    /// A first beat answered 401, the workspace check answered `info` (`None`: it
    /// exists): the fake, and why the thread stopped itself.
    fn after_a_401(info: Option<ApiError>) -> (Arc<Fake>, Option<StopReason>) {
        let fake = Fake::new(vec![]);
        fake.beats
            .lock()
            .unwrap()
            .push_back(status("heartbeat", 401));
        *fake.info.lock().unwrap() = info;
        let shutdown = Shutdown::new();
        run(
            fake.clone(),
            Duration::from_secs(3600),
            RuntimeStatus::new(Instant::now()),
            shutdown.clone(),
            &|| None,
            &Progress::default(),
        );
        (fake, shutdown.reason())
    }

    #[test]
    fn a_401_for_a_removed_workspace_stops_with_the_removed_error() {
        let (fake, reason) = after_a_401(Some(status("workspace info", 410)));
        match reason {
            Some(StopReason::Fatal(Error::Removed(m))) => {
                assert!(m.contains("was removed from the platform"), "{m}");
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(fake.heartbeats(), 1, "not retried with the same token");
    }

    #[test]
    fn a_401_for_an_existing_workspace_is_a_rejected_token() {
        let (fake, reason) = after_a_401(None);
        assert!(
            matches!(reason, Some(StopReason::Fatal(Error::Credentials(_)))),
            "{reason:?}"
        );
        assert_eq!(fake.heartbeats(), 1);
    }

    #[test]
    fn a_good_beat_after_an_outage_registers_again_once() {
        let fake = Fake::new(vec![]);
        for _ in 0..REREGISTER_AFTER {
            fake.beats
                .lock()
                .unwrap()
                .push_back(status("heartbeat", 503));
        }
        let shutdown = Shutdown::new();
        let status = RuntimeStatus::new(Instant::now());
        let thread = {
            let (fake, shutdown, status) = (fake.clone(), shutdown.clone(), status.clone());
            std::thread::spawn(move || {
                run(
                    fake,
                    Duration::ZERO,
                    status,
                    shutdown,
                    &|| None,
                    &Progress::default(),
                );
            })
        };
        // Beats come back to back (every = 0): wait for the one after the outage.
        let deadline = Instant::now() + Duration::from_secs(10);
        while fake.heartbeats() <= REREGISTER_AFTER as usize + 1 {
            assert!(Instant::now() < deadline, "no beat after the outage");
            std::thread::yield_now();
        }
        shutdown.trigger(StopReason::Signal);
        thread.join().unwrap();
        assert_eq!(fake.registered(), 1);
        assert!(
            RuntimeStatus::snapshot(&status)
                .0
                .last_heartbeat_ok
                .is_some()
        );
    }
}
