//! The agent-side commands' settings: each command's raw `cli` arguments checked and
//! defaulted here, once, so its run function takes them as given (ripgrep's second
//! layer). Every error is a configuration error (exit 2), found in the order the
//! command's own checks used to find them. The only I/O is stdin, for text given as
//! `-`.

use std::io::Read;

use serde_json::{Value, json};

use super::ConfigError;
use super::Range::Between;
use crate::cli::{DelegateArgs, DiscoverArgs, HeartbeatArgs, InfoArgs, NotifyArgs, SendArgs};
use crate::uuid::WorkspaceId;

/// The platform's `/a2a` cap (§API-2.7.2), also applied to text read from stdin.
pub const MAX_MESSAGE_BYTES: usize = 16 * 1024 * 1024;
/// Attachments the platform takes per message (`GET /uploads/limits`, §API-2.16).
pub(crate) const MAX_ATTACHMENTS: usize = 10;
/// Largest `--budget` of `send` and the tool commands.
pub(crate) const MAX_BUDGET_SECS: u64 = 24 * 3600;
/// Default and largest `--timeout` of `delegate --wait` and `ask --wait`.
const DEFAULT_WAIT_SECS: u64 = 600;
const MAX_WAIT_SECS: u64 = 7 * 24 * 3600;
/// `send`'s default total budget for all attempts.
const DEFAULT_SEND_BUDGET_SECS: u64 = 600;
/// Longest `--message-id` accepted.
const MAX_MESSAGE_ID_LEN: usize = 200;
/// Longest free text sent in a heartbeat or agent card field.
pub(super) const MAX_FIELD: usize = 4096;

/// `molecule send`, checked.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Send {
    /// The peer's workspace id.
    pub peer: WorkspaceId,
    /// The message (from the argument or stdin).
    pub text: String,
    /// `--message-id`, or a fresh UUID.
    pub message_id: String,
    /// `--budget`, 1 to [`MAX_BUDGET_SECS`].
    pub budget_secs: u64,
}

/// Resolves `send`.
pub(crate) fn send(a: &SendArgs) -> Result<Send, ConfigError> {
    let peer = require_workspace(a.peer.as_deref(), "send", "peer id")?;
    let text = message_text(a.text.as_deref(), "send")?;
    let message_id = match &a.message_id {
        None => crate::uuid::new_v4(),
        Some(m) => {
            let m = m.trim();
            if m.is_empty() || m.len() > MAX_MESSAGE_ID_LEN || m.chars().any(char::is_control) {
                return Err(ConfigError(format!(
                    "send: --message-id {m:?} must be 1 to {MAX_MESSAGE_ID_LEN} printable characters"
                )));
            }
            m.to_string()
        }
    };
    let budget_secs = budget(a.budget_secs, DEFAULT_SEND_BUDGET_SECS, "send")?;
    Ok(Send {
        peer,
        text,
        message_id,
        budget_secs,
    })
}

/// `molecule delegate`, checked.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Delegate {
    /// The target's workspace id.
    pub target: WorkspaceId,
    /// The task text.
    pub task: String,
    /// `--idempotency-key`, trimmed and not empty.
    pub key: Option<String>,
    /// `--wait`.
    pub wait: bool,
    /// `--timeout` of `--wait`, 1 to 7 days.
    pub timeout_secs: u64,
}

/// Resolves `delegate`.
pub(crate) fn delegate(a: &DelegateArgs) -> Result<Delegate, ConfigError> {
    let target = require_workspace(a.target.as_deref(), "delegate", "target id")?;
    let task = message_text(a.text.as_deref(), "delegate")?;
    let key = a.idempotency_key.as_deref().map(str::trim);
    if key.is_some_and(str::is_empty) {
        return Err(ConfigError("delegate: --idempotency-key is empty".into()));
    }
    let timeout_secs = wait_timeout(a.timeout_secs, a.wait, "delegate")?;
    Ok(Delegate {
        target,
        task,
        key: key.map(str::to_string),
        wait: a.wait,
        timeout_secs,
    })
}

/// `--budget` (`default` when not given), 1 to [`MAX_BUDGET_SECS`].
pub(super) fn budget(given: Option<u64>, default: u64, cmd: &str) -> Result<u64, ConfigError> {
    let secs = given.unwrap_or(default);
    Between(1, MAX_BUDGET_SECS).check(format_args!("{cmd}: --budget {secs}"), secs, " seconds")
}

/// `--timeout` of `--wait` (refused without it), 1 s to 7 days.
pub(super) fn wait_timeout(given: Option<u64>, wait: bool, cmd: &str) -> Result<u64, ConfigError> {
    if given.is_some() && !wait {
        return Err(ConfigError(format!(
            "{cmd}: --timeout only makes sense with --wait"
        )));
    }
    let secs = given.unwrap_or(DEFAULT_WAIT_SECS);
    Between(1, MAX_WAIT_SECS).check(format_args!("{cmd}: --timeout {secs}"), secs, " seconds")
}

/// `molecule notify`, checked (the `--file`s are read and checked when uploaded).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Notify {
    /// The message.
    pub text: String,
    /// `--attach`, as `/notify` attachments (`{"uri", "name"}`).
    pub attachments: Vec<Value>,
    /// `--file`, in order.
    pub files: Vec<std::path::PathBuf>,
}

/// Resolves `notify`.
pub(crate) fn notify(a: &NotifyArgs) -> Result<Notify, ConfigError> {
    let text = message_text(a.text.as_deref(), "notify")?;
    let attachments = a
        .attach
        .iter()
        .map(|spec| attachment(spec))
        .collect::<Result<Vec<Value>, ConfigError>>()?;
    // With files the upload counts them all (and says so in its own words).
    if a.files.is_empty() && attachments.len() > MAX_ATTACHMENTS {
        return Err(ConfigError(format!(
            "notify: the platform takes at most {MAX_ATTACHMENTS} attachments per message"
        )));
    }
    Ok(Notify {
        text,
        attachments,
        files: a.files.clone(),
    })
}

/// `URI[,NAME]`: everything after the first comma is the name; without one, the last
/// segment of the URI.
fn attachment(spec: &str) -> Result<Value, ConfigError> {
    let (uri, name) = match spec.split_once(',') {
        Some((u, n)) => (u.trim(), n.trim().to_string()),
        None => {
            let u = spec.trim();
            let base = u
                .trim_end_matches('/')
                .rsplit(['/', ':'])
                .next()
                .unwrap_or("")
                .to_string();
            (u, base)
        }
    };
    if uri.is_empty() || uri.chars().any(char::is_whitespace) {
        return Err(ConfigError(format!(
            "notify: --attach {spec:?}: expected URI[,NAME] with a URI and no spaces in it"
        )));
    }
    if name.is_empty() {
        return Err(ConfigError(format!(
            "notify: --attach {spec:?}: no file name in the URI; give one as URI,NAME"
        )));
    }
    Ok(json!({"uri": uri, "name": name}))
}

/// Checks `heartbeat`'s fields (its arguments are sent as given).
pub(crate) fn heartbeat(a: &HeartbeatArgs) -> Result<HeartbeatArgs, ConfigError> {
    if let Some(r) = a.error_rate
        && !(0.0..=1.0).contains(&r)
    {
        return Err(ConfigError(format!(
            "heartbeat: --error-rate {r}: must be between 0.0 and 1.0"
        )));
    }
    for (flag, v) in [
        ("--current-task", &a.current_task),
        ("--sample-error", &a.sample_error),
    ] {
        if let Some(t) = v
            && t.len() > MAX_FIELD
        {
            return Err(ConfigError(format!(
                "heartbeat: {flag}: at most {MAX_FIELD} bytes"
            )));
        }
    }
    Ok(a.clone())
}

/// Resolves `discover`: the peer's id.
pub(crate) fn discover(a: &DiscoverArgs) -> Result<WorkspaceId, ConfigError> {
    require_workspace(a.peer.as_deref(), "discover", "peer id")
}

/// Resolves `info`: the workspace asked about, `None` for our own.
pub(crate) fn info(a: &InfoArgs) -> Result<Option<WorkspaceId>, ConfigError> {
    a.id.as_deref()
        .map(|id| require_workspace(Some(id), "info", "workspace id"))
        .transpose()
}

/// A workspace id given on the command line: present and a UUID (exit 2 otherwise),
/// in its one spelling.
pub(crate) fn require_workspace(
    value: Option<&str>,
    cmd: &str,
    what: &str,
) -> Result<WorkspaceId, ConfigError> {
    let raw = required(value, cmd, what)?;
    WorkspaceId::parse(raw).ok_or_else(|| not_a_uuid(cmd, what, raw))
}

/// Any other id given on the command line (a memory, a request): present and a
/// UUID (exit 2 otherwise), checked before any URL is built.
pub(crate) fn require_uuid(
    value: Option<&str>,
    cmd: &str,
    what: &str,
) -> Result<String, ConfigError> {
    let raw = required(value, cmd, what)?;
    let id = raw.trim();
    if !crate::uuid::is_uuid(id) {
        return Err(not_a_uuid(cmd, what, raw));
    }
    Ok(id.to_string())
}

pub(super) fn required<'a>(
    value: Option<&'a str>,
    cmd: &str,
    what: &str,
) -> Result<&'a str, ConfigError> {
    value.ok_or_else(|| {
        ConfigError(format!(
            "{cmd}: the {what} is required (see 'molecule {cmd} --help')"
        ))
    })
}

fn not_a_uuid(cmd: &str, what: &str, raw: &str) -> ConfigError {
    ConfigError(format!("{cmd}: {what} {raw:?} is not a UUID"))
}

/// Message text from the argument, or from stdin for `-`: at most 16 MiB, UTF-8,
/// not blank. One trailing newline from stdin is dropped (`echo hi | molecule …`).
pub(crate) fn message_text(arg: Option<&str>, cmd: &str) -> Result<String, ConfigError> {
    let text = match arg {
        None => {
            return Err(ConfigError(format!(
                "{cmd}: the message text is required (or - to read it from stdin)"
            )));
        }
        Some("-") => {
            let mut t = read_limited(std::io::stdin().lock(), MAX_MESSAGE_BYTES)
                .map_err(|e| ConfigError(format!("{cmd}: stdin: {e}")))?;
            if t.ends_with('\n') {
                t.pop();
                if t.ends_with('\r') {
                    t.pop();
                }
            }
            t
        }
        Some(t) => t.to_string(),
    };
    if text.len() > MAX_MESSAGE_BYTES {
        return Err(ConfigError(format!(
            "{cmd}: the message is too large: {} bytes, the platform accepts at most {MAX_MESSAGE_BYTES}",
            text.len()
        )));
    }
    if text.trim().is_empty() {
        return Err(ConfigError(format!("{cmd}: the message is empty")));
    }
    Ok(text)
}

/// Reads all of `r` as UTF-8, refusing more than `limit` bytes without reading
/// further than one byte past it.
pub(crate) fn read_limited(r: impl Read, limit: usize) -> Result<String, String> {
    let cap = u64::try_from(limit).unwrap_or(u64::MAX).saturating_add(1);
    let mut buf = Vec::new();
    r.take(cap)
        .read_to_end(&mut buf)
        .map_err(|e| format!("cannot read: {e}"))?;
    if buf.len() > limit {
        return Err(format!(
            "the message is too large: more than {limit} bytes (the platform's limit)"
        ));
    }
    String::from_utf8(buf).map_err(|_| "the message is not UTF-8 text".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workspace_ids_get_one_spelling() {
        let id = require_workspace(
            Some(" 11111111-AAAA-4333-8444-55555555555F "),
            "send",
            "peer id",
        );
        assert_eq!(id.unwrap(), "11111111-aaaa-4333-8444-55555555555f");
        let e = require_workspace(Some("../etc"), "send", "peer id").unwrap_err();
        assert_eq!(e.0, "send: peer id \"../etc\" is not a UUID");
        let e = require_workspace(None, "info", "workspace id").unwrap_err();
        assert!(e.0.contains("the workspace id is required"), "{e}");
    }

    #[test]
    fn attachment_specs() {
        assert_eq!(
            attachment("platform-pending:ws/f1,report.pdf").unwrap(),
            json!({"uri": "platform-pending:ws/f1", "name": "report.pdf"})
        );
        assert_eq!(
            attachment("https://x/files/a.png").unwrap(),
            json!({"uri": "https://x/files/a.png", "name": "a.png"})
        );
        assert_eq!(attachment("u,a, b").unwrap()["name"], "a, b");
        assert!(attachment(",name").is_err());
        assert!(attachment("https://x/").is_ok());
        assert!(attachment("a b").is_err());
    }
}
