//! Registration in poll mode (§API-2.1): bounded retries with backoff and jitter on
//! transient errors, the echoed mode checked, a freshly minted token noted (never
//! shown) and not used.

use crate::api::{ApiError, Client, Kind};
use crate::backoff::Backoff;
use crate::error::Error;
use crate::shutdown::Shutdown;

use super::auth;

/// Register attempts on transient errors before giving up with exit 75.
const REGISTER_ATTEMPTS: u32 = 8;

/// Registers in poll mode, retrying transient failures with backoff. `Ok(false)` if
/// a stop was requested meanwhile.
pub fn register(client: &Client, shutdown: &Shutdown) -> Result<bool, Error> {
    let card = client.agent_card();
    let backoff = Backoff::default();
    let seed = crate::uuid::random_u64();
    let mut attempt: u32 = 0;
    loop {
        attempt += 1;
        let used = client.token();
        let err = match client.register(card.clone()) {
            Ok(resp) => {
                match resp.delivery_mode.as_deref() {
                    Some("poll") => {}
                    other => {
                        return Err(Error::PlatformTooOld(format!(
                            "the platform at {} answered register with delivery_mode {:?}, not \"poll\": it is too old for poll mode",
                            client.api_url(),
                            other.unwrap_or("(none)")
                        )));
                    }
                }
                if resp.auth_token.is_some() {
                    log::info!(
                        "the platform issued a new workspace token at register (not shown); keeping the configured one"
                    );
                }
                return Ok(true);
            }
            Err(e) => e,
        };
        if err.is_unauthorized() {
            match auth::after_unauthorized(client, &used, shutdown) {
                auth::AuthVerdict::RetryWithNewToken => continue,
                auth::AuthVerdict::Fatal(error) => return Err(error),
                // The workspace check failed too: back off like a transient error.
                auth::AuthVerdict::Unknown if attempt < REGISTER_ATTEMPTS => {}
                auth::AuthVerdict::Unknown => {
                    // Could not tell revocation from an outage: retryable, not exit 3.
                    return Err(Error::Unreachable(format!(
                        "register: {err}, and the workspace check kept failing"
                    )));
                }
            }
        }
        if is_pre_poll_platform(&err) {
            return Err(Error::PlatformTooOld(format!(
                "{err}: the platform at {} does not support poll mode",
                client.api_url()
            )));
        }
        if !err.is_retryable() && !err.is_unauthorized() {
            return Err(Error::Api(err));
        }
        if attempt >= REGISTER_ATTEMPTS {
            return Err(Error::Unreachable(format!(
                "{err} (gave up after {attempt} attempts)"
            )));
        }
        let delay = backoff.delay(attempt, seed.wrapping_add(u64::from(attempt)));
        let delay = err.retry_after().map_or(delay, |r| delay.max(r));
        log::warn!(
            "{err}; retrying in {:.1}s ({attempt}/{REGISTER_ATTEMPTS})",
            delay.as_secs_f64()
        );
        if shutdown.wait_timeout(delay) {
            return Ok(false);
        }
    }
}

/// A platform from before poll mode demands a URL on register (§API-0.1).
fn is_pre_poll_platform(e: &ApiError) -> bool {
    e.kind() == Kind::BadRequest
        && matches!(e, ApiError::Status { message, .. } if message.contains("url is required") && !message.contains("push-mode"))
}
