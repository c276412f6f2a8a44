//! Registration in poll mode (§API-2.1): bounded retries with backoff and jitter on
//! transient errors, the echoed mode checked, a freshly minted token noted (never
//! shown) and not used.

use crate::api::{ApiError, Kind, Platform};
use crate::backoff::Backoff;
use crate::error::Error;
use crate::shutdown::Shutdown;

use super::auth;

/// Register attempts on transient errors before giving up with exit 75.
const REGISTER_ATTEMPTS: u32 = 8;

/// Registers in poll mode, retrying transient failures with backoff. `Ok(false)` if
/// a stop was requested meanwhile.
pub fn register(client: &dyn Platform, shutdown: &Shutdown) -> Result<bool, Error> {
    let card = client.agent_card();
    let backoff = Backoff::default();
    let seed = crate::uuid::random_u64();
    let mut attempt: u32 = 0;
    loop {
        attempt += 1;
        let used = client.credentials().token();
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

#[cfg(test)]
mod tests {
    use super::super::fake::{Fake, status};
    use super::*;
    use crate::wire::RegisterResponse;

    fn answer(fake: &Fake, a: Result<RegisterResponse, ApiError>) {
        fake.registers.lock().unwrap().push_back(a);
    }

    #[test]
    fn poll_mode_echoed_is_registered() {
        let fake = Fake::new(vec![]);
        assert!(matches!(
            register(fake.as_ref(), &Shutdown::new()),
            Ok(true)
        ));
        assert_eq!(fake.registered(), 1);
    }

    #[test]
    fn another_mode_echoed_means_a_platform_too_old() {
        let fake = Fake::new(vec![]);
        answer(
            &fake,
            Ok(RegisterResponse {
                delivery_mode: Some("push".into()),
                auth_token: None,
            }),
        );
        match register(fake.as_ref(), &Shutdown::new()) {
            Err(Error::PlatformTooOld(m)) => assert!(m.contains("not \"poll\""), "{m}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_401_for_an_unknown_workspace_stops_with_the_unknown_error() {
        let fake = Fake::new(vec![]);
        answer(&fake, Err(status("register", 401)));
        *fake.info.lock().unwrap() = Some(status("workspace info", 404));
        match register(fake.as_ref(), &Shutdown::new()) {
            Err(Error::Removed(m)) => assert!(m.contains("unknown to the platform"), "{m}"),
            other => panic!("{other:?}"),
        }
        assert_eq!(fake.registered(), 1);
    }

    #[test]
    fn a_refusal_is_final_at_once() {
        let fake = Fake::new(vec![]);
        answer(&fake, Err(status("register", 403)));
        assert!(matches!(
            register(fake.as_ref(), &Shutdown::new()),
            Err(Error::Api(e)) if e.kind() == Kind::Forbidden
        ));
        assert_eq!(fake.registered(), 1, "not retried");
    }
}
