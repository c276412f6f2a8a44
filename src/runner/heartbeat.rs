//! The heartbeat thread: one beat at start, then every `--heartbeat-secs`, with the
//! live `RuntimeStatus`. Transient failures are logged and the next beat comes on
//! schedule; after an outage the workspace is registered again (§API-4.1.5); a 401
//! goes through the credential check (never a spin).

use std::time::{Duration, Instant, SystemTime};

use crate::api::Client;
use crate::shutdown::{Shutdown, StopReason};

use super::auth::{AuthVerdict, after_unauthorized};
use super::status::{RuntimeStatus, SharedStatus};
use super::supervise::Progress;

/// Failed beats in a row after which the next good one also re-registers.
const REREGISTER_AFTER: u32 = 3;

/// Runs until shutdown.
pub fn run(
    client: Client,
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
        let used = client.token();
        let mut result = client.heartbeat(&hb);
        if let Err(e) = &result
            && e.is_unauthorized()
        {
            match after_unauthorized(&client, &used, &shutdown) {
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
