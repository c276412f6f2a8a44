//! What to do after a 401 (§API-4.4): re-read the token from its source and retry
//! once if it changed; otherwise ask the open `GET /workspaces/<id>` whether the
//! workspace is gone (exit 4) or the token was revoked (exit 3). Never re-registers
//! to mint a new token: that would get around an operator's revocation.

use crate::api::Platform;
use std::time::{Duration, Instant};

use crate::config::Secret;
use crate::credentials::{Standing, rejected_message};
use crate::error::Error;
use crate::shutdown::Shutdown;

/// The answer to a 401.
#[derive(Debug, PartialEq, Eq)]
pub enum AuthVerdict {
    /// A new token is in place (loaded now, or by another thread meanwhile): retry.
    RetryWithNewToken,
    /// The platform could not be asked whether the workspace still exists: treat
    /// the 401 like a transient error and try again later.
    Unknown,
    /// Stop the process with this error.
    Fatal(Error),
}

/// How long a rejected token file is watched for the rotated token to appear: an
/// operator rotates on the platform first and writes the file a moment later.
const ROTATION_GRACE: Duration = Duration::from_secs(5);

/// Decides what a 401 means for a request made with the token `used`.
pub fn after_unauthorized(
    client: &dyn Platform,
    used: &Secret,
    shutdown: &Shutdown,
) -> AuthVerdict {
    let creds = client.credentials();
    // Another thread (or SIGHUP) may have loaded a new token since that request.
    if creds.token() != *used || creds.reload() {
        return AuthVerdict::RetryWithNewToken;
    }
    let ws = client.workspace_id();
    let standing = Standing::check(client);
    if matches!(standing, Standing::Exists) && creds.can_change() {
        let deadline = Instant::now() + ROTATION_GRACE;
        log::warn!("the workspace token was rejected; watching the token file for a rotated one");
        while !shutdown.wait_timeout(Duration::from_millis(250)) && Instant::now() < deadline {
            if creds.token() != *used || creds.reload() {
                return AuthVerdict::RetryWithNewToken;
            }
        }
    }
    if let Some(message) = standing.gone_message(ws, client.api_url()) {
        return AuthVerdict::Fatal(Error::Removed(message));
    }
    match standing {
        Standing::Unanswered(e) if e.is_retryable() => {
            log::warn!("401, and the workspace check failed too ({e}); will try again");
            AuthVerdict::Unknown
        }
        _ => AuthVerdict::Fatal(Error::Credentials(rejected_message(
            ws,
            creds.source(),
            true,
        ))),
    }
}
