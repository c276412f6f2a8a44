//! The workspace token and where it came from, and what a rejected token means
//! (§API-4.4), said once for the connector and the commands: the token is re-read
//! from its source, and the open `GET /workspaces/<own>` tells a removed or unknown
//! workspace (exit 4) from a token that was revoked or rotated (exit 3).

use std::sync::{Arc, PoisonError, RwLock};

use crate::api::{ApiError, Kind, Platform};
use crate::config::{Common, Secret, TokenSource, read_token_file};

/// The token in use and its source. Cheap to clone: clones (and the clients that
/// hold them) share one token, so a re-read by one is seen by all.
#[derive(Clone)]
pub struct Credentials(Arc<Inner>);

struct Inner {
    token: RwLock<Secret>,
    source: TokenSource,
}

impl Credentials {
    /// `token`, read from `source`.
    pub fn new(token: Secret, source: TokenSource) -> Self {
        Credentials(Arc::new(Inner {
            token: RwLock::new(token),
            source,
        }))
    }

    /// The token and source the configuration resolved.
    pub fn of(common: &Common) -> Self {
        Credentials::new(common.token.clone(), common.token_source.clone())
    }

    /// The token in use.
    pub fn token(&self) -> Secret {
        self.0
            .token
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Where the token came from.
    pub fn source(&self) -> &TokenSource {
        &self.0.source
    }

    /// Whether [`Credentials::reload`] can ever find a new token (a token file).
    pub fn can_change(&self) -> bool {
        matches!(self.0.source, TokenSource::File(_))
    }

    /// Re-reads the token from its source (after a 401 or SIGHUP); installs it and
    /// returns `true` if it changed. An env var or argv cannot change under a running
    /// process: only a file is re-read.
    pub fn reload(&self) -> bool {
        let TokenSource::File(path) = &self.0.source else {
            return false;
        };
        match read_token_file(path) {
            Ok(token) if token != self.token() => {
                *self.0.token.write().unwrap_or_else(PoisonError::into_inner) = token;
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
}

/// A token given directly (a test, a one-off client): nothing to re-read.
impl From<Secret> for Credentials {
    fn from(token: Secret) -> Self {
        Credentials::new(token, TokenSource::Arg)
    }
}

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
    pub fn check(client: &dyn Platform) -> Standing {
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
    fn reload_installs_a_changed_token_file_only() {
        let dir = std::env::temp_dir().join(format!("molecule-cred-{}", crate::uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("token");
        std::fs::write(&path, "tok-one-aaaaaaaaaaaa\n").unwrap();
        let first = read_token_file(&path).unwrap();
        let creds = Credentials::new(first.clone(), TokenSource::File(path.clone()));
        let shared = creds.clone();
        assert!(!creds.reload(), "unchanged file");
        std::fs::write(&path, "tok-two-bbbbbbbbbbbb\n").unwrap();
        assert!(creds.reload());
        assert_ne!(shared.token(), first, "clones share the token");
        assert!(!Credentials::from(first).reload(), "nothing to re-read");
        std::fs::remove_dir_all(&dir).unwrap();
    }

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
