//! What to do after a 401 (§API-4.4): re-read the token from its source and retry
//! once if it changed; otherwise ask the open `GET /workspaces/<id>` whether the
//! workspace is gone (exit 4) or the token was revoked (exit 3). Never re-registers
//! to mint a new token: that would get around an operator's revocation.

use crate::api::Client;
use crate::config::{TokenSource, read_token_file};
use crate::error::{EXIT_CREDENTIALS, EXIT_REMOVED};

/// The answer to a 401.
#[derive(Debug, PartialEq, Eq)]
pub enum AuthVerdict {
    /// A new token was loaded: retry the request once.
    RetryWithNewToken,
    /// Stop the process with this exit code and message.
    Fatal(u8, String),
}

/// Re-reads the token from `source`; installs it and returns `true` if it changed.
pub fn reload_token(client: &Client, source: &TokenSource) -> bool {
    let TokenSource::File(path) = source else {
        // An env var or argv cannot change under a running process.
        return false;
    };
    match read_token_file(path) {
        Ok(token) if token != client.token() => {
            client.set_token(token);
            log::info!("loaded a new workspace token from {}", path.display());
            true
        }
        Ok(_) => false,
        Err(e) => {
            log::warn!("re-reading the token: {e}");
            false
        }
    }
}

/// Decides what a 401 means.
pub fn after_unauthorized(client: &Client, source: &TokenSource) -> AuthVerdict {
    if reload_token(client, source) {
        return AuthVerdict::RetryWithNewToken;
    }
    let ws = client.workspace_id();
    match client.workspace_info(ws) {
        Err(e) if e.status() == Some(410) => {
            let hint = match &e {
                crate::api::ApiError::Status { hint: Some(h), .. } => format!(" Hint: {h}"),
                _ => String::new(),
            };
            AuthVerdict::Fatal(
                EXIT_REMOVED,
                format!("workspace {ws} was removed from the platform.{hint}"),
            )
        }
        Err(e) if e.status() == Some(404) => AuthVerdict::Fatal(
            EXIT_REMOVED,
            format!(
                "workspace {ws} is unknown to the platform at {}",
                client.api_url()
            ),
        ),
        _ => {
            let how = match source {
                TokenSource::File(p) => {
                    format!("write it to {} and send SIGHUP or restart", p.display())
                }
                TokenSource::Env => "set MOLECULE_WORKSPACE_TOKEN to it and restart".into(),
                TokenSource::Arg => "pass it with --token-file and restart".into(),
            };
            AuthVerdict::Fatal(
                EXIT_CREDENTIALS,
                format!(
                    "the platform rejected the workspace token (revoked or rotated). Get a new one \
                     (canvas: Settings → Workspace Tokens, or POST /workspaces/{ws}/external/rotate), then {how}"
                ),
            )
        }
    }
}
