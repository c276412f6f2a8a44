//! What a rejected token means (§API-4.4), said once for the connector and the
//! commands: the open `GET /workspaces/<own>` tells a removed or unknown workspace
//! (exit 4) from a token that was revoked or rotated (exit 3), and the texts say
//! what to do about each.

use crate::api::{ApiError, Client, Kind};
use crate::config::TokenSource;

/// What `GET /workspaces/<own>` says about our workspace.
#[derive(Debug)]
pub enum Standing {
    /// It exists: a 401 means the token itself was refused.
    Exists,
    /// 410: removed from the platform, with the platform's hint.
    Removed {
        /// The body's `hint`, when present.
        hint: Option<String>,
    },
    /// 404: unknown to the platform at this URL.
    Unknown,
    /// The check itself failed; [`ApiError::is_retryable`] says whether it may pass later.
    Unanswered(ApiError),
}

impl Standing {
    /// Asks the platform about `client`'s own workspace.
    pub fn check(client: &Client) -> Standing {
        match client.workspace_info(client.workspace_id()) {
            Ok(_) => Standing::Exists,
            Err(e) => match e.kind() {
                Kind::Gone => Standing::Removed {
                    hint: e.hint().map(str::to_string),
                },
                Kind::NotFound => Standing::Unknown,
                _ => Standing::Unanswered(e),
            },
        }
    }

    /// The exit-4 message when the workspace is gone, `None` while it exists.
    pub fn gone_message(&self, ws: &str, api_url: &str) -> Option<String> {
        match self {
            Standing::Removed { hint } => Some(removed_message(ws, hint.as_deref())),
            Standing::Unknown => Some(format!(
                "workspace {ws} is unknown to the platform at {api_url}"
            )),
            Standing::Exists | Standing::Unanswered(_) => None,
        }
    }
}

/// "Workspace removed", with the platform's hint.
pub fn removed_message(ws: &str, hint: Option<&str>) -> String {
    match hint {
        Some(h) => format!("workspace {ws} was removed from the platform. Hint: {h}"),
        None => format!("workspace {ws} was removed from the platform"),
    }
}

/// The exit-3 message: the token was refused although the workspace exists.
/// `connector`: the reader runs a long-lived connector, which also has to pick the
/// new token up.
pub fn rejected_message(ws: &str, source: &TokenSource, connector: bool) -> String {
    let how = match (source, connector) {
        (TokenSource::File(p), true) => {
            format!("write it to {} and send SIGHUP or restart", p.display())
        }
        (TokenSource::File(p), false) => format!("write it to {}", p.display()),
        (TokenSource::Env, true) => "set MOLECULE_WORKSPACE_TOKEN to it and restart".into(),
        (TokenSource::Env, false) => "set MOLECULE_WORKSPACE_TOKEN to it".into(),
        (TokenSource::Arg, true) => "pass it with --token-file and restart".into(),
        (TokenSource::Arg, false) => "pass it with --token-file".into(),
    };
    format!(
        "the platform rejected the workspace token (revoked or rotated, or not the token of \
         workspace {ws}). Get a new one (canvas: Settings → Workspace Tokens, or POST \
         /workspaces/{ws}/external/rotate), then {how}"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gone_messages() {
        let ws = "ws-1";
        let removed = Standing::Removed {
            hint: Some("re-create it".into()),
        };
        assert_eq!(
            removed.gone_message(ws, "http://p").as_deref(),
            Some("workspace ws-1 was removed from the platform. Hint: re-create it")
        );
        assert_eq!(
            Standing::Unknown.gone_message(ws, "http://p").as_deref(),
            Some("workspace ws-1 is unknown to the platform at http://p")
        );
        assert_eq!(Standing::Exists.gone_message(ws, "http://p"), None);
    }

    #[test]
    fn rejected_says_how_to_replace_the_token() {
        let file = TokenSource::File("/t".into());
        assert!(
            rejected_message("w", &file, true)
                .ends_with("write it to /t and send SIGHUP or restart")
        );
        assert!(rejected_message("w", &file, false).ends_with("write it to /t"));
        let m = rejected_message("w", &TokenSource::Env, false);
        assert!(m.contains("/workspaces/w/external/rotate"), "{m}");
        assert!(m.ends_with("set MOLECULE_WORKSPACE_TOKEN to it"), "{m}");
    }
}
