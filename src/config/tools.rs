//! The platform tools' settings (`memory`, `ask`, `requests`, `request`, `history`,
//! `card`, `broadcast`, `download`): each command's raw `cli` arguments checked and
//! defaulted here, once, as [`super::agent`] does for the agent-side commands. A
//! command with actions gets one variant per action, holding only what that action
//! takes. Every error is a configuration error (exit 2), found in the order the run
//! functions used to find them. The only I/O is stdin, for text given as `-`.

use std::path::PathBuf;

use serde_json::{Value, json};

use super::ConfigError;
use super::Range::Between;
use super::agent::{
    MAX_FIELD, budget, message_text, require_uuid, require_workspace, required, wait_timeout,
};
use crate::cli::{
    AskArgs, BroadcastArgs, CardArgs, DownloadArgs, HistoryArgs, MemoryArgs, RequestArgs,
    RequestsArgs,
};
use crate::uuid::WorkspaceId;

/// `--budget` of the tool commands when not given (also the budget of `notify
/// --file`'s upload, which has no flag for it).
pub(crate) const DEFAULT_BUDGET_SECS: u64 = 60;
/// The platform's cap on a memory's `namespace` label.
const MAX_LABEL: usize = 50;
/// Longest `ask` title and detail sent (the platform stores them as text).
const MAX_TITLE: usize = 1000;
const MAX_DETAIL: usize = 64 * 1024;
/// Default and largest `history --limit`.
const DEFAULT_HISTORY_LIMIT: u32 = 20;
const MAX_HISTORY_LIMIT: u32 = 5000;
/// URI scheme of a file staged on the platform.
const PENDING: &str = "platform-pending:";

const SCOPES: [&str; 3] = ["LOCAL", "TEAM", "GLOBAL"];
const MEMORY_KINDS: [&str; 3] = ["fact", "summary", "checkpoint"];
const REQUEST_STATUSES: [&str; 6] = [
    "pending",
    "info_requested",
    "done",
    "approved",
    "rejected",
    "cancelled",
];
const ANSWERS: [&str; 3] = ["approved", "rejected", "done"];

/// `molecule memory`, checked.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Memory {
    pub action: MemoryAction,
    /// `--budget`, 1 to 24 h.
    pub budget_secs: u64,
}

/// What `memory` does, with what that action takes.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum MemoryAction {
    Commit {
        /// From the argument or stdin.
        text: String,
        /// One of [`SCOPES`], upper case.
        scope: &'static str,
        /// 1 to 50 characters.
        namespace: Option<String>,
    },
    Search {
        query: Option<String>,
        namespace: Option<String>,
        /// One of [`MEMORY_KINDS`].
        kind: Option<&'static str>,
        /// 1 to 100.
        limit: Option<u32>,
    },
    Namespaces,
    Delete {
        /// A UUID.
        id: String,
    },
}

/// Resolves `memory`.
pub(crate) fn memory(a: &MemoryArgs) -> Result<Memory, ConfigError> {
    let budget_secs = budget(a.budget_secs, DEFAULT_BUDGET_SECS, "memory")?;
    let action = match a.action.as_deref() {
        Some("commit") => memory_commit(a)?,
        Some("search") => memory_search(a)?,
        Some("namespaces") => {
            only(a, "namespaces", &[])?;
            if a.arg.is_some() {
                return Err(input("memory namespaces: takes no argument"));
            }
            MemoryAction::Namespaces
        }
        Some("delete") => {
            only(a, "delete", &[])?;
            MemoryAction::Delete {
                id: require_uuid(a.arg.as_deref(), "memory delete", "memory id")?,
            }
        }
        Some(other) => {
            return Err(input(format!(
                "memory: unknown action {other:?} (commit, search, namespaces or delete)"
            )));
        }
        None => {
            return Err(input(
                "memory: an action is required: commit, search, namespaces or delete",
            ));
        }
    };
    Ok(Memory {
        action,
        budget_secs,
    })
}

fn memory_commit(a: &MemoryArgs) -> Result<MemoryAction, ConfigError> {
    only(a, "commit", &["--scope", "--namespace"])?;
    let text = message_text(a.arg.as_deref(), "memory commit")?;
    let scope = a.scope.as_deref().unwrap_or("LOCAL").to_ascii_uppercase();
    let Some(scope) = one_of(&SCOPES, &scope) else {
        return Err(input(format!(
            "memory commit: --scope {scope:?}: must be LOCAL, TEAM or GLOBAL"
        )));
    };
    if let Some(label) = &a.namespace
        && (label.chars().count() > MAX_LABEL || label.trim().is_empty())
    {
        return Err(input(format!(
            "memory commit: --namespace: 1 to {MAX_LABEL} characters"
        )));
    }
    Ok(MemoryAction::Commit {
        text,
        scope,
        namespace: a.namespace.clone(),
    })
}

fn memory_search(a: &MemoryArgs) -> Result<MemoryAction, ConfigError> {
    only(a, "search", &["--namespace", "--kind", "--limit"])?;
    let kind = match a.kind.as_deref() {
        None => None,
        Some(k) => Some(one_of(&MEMORY_KINDS, k).ok_or_else(|| {
            input(format!(
                "memory search: --kind {k:?}: must be fact, summary or checkpoint"
            ))
        })?),
    };
    if a.limit.is_some_and(|n| !(1..=100).contains(&n)) {
        return Err(input("memory search: --limit must be between 1 and 100"));
    }
    Ok(MemoryAction::Search {
        query: a.arg.clone(),
        namespace: a.namespace.clone(),
        kind,
        limit: a.limit,
    })
}

/// Options that only some actions take are refused elsewhere, not ignored.
fn only(a: &MemoryArgs, action: &str, allowed: &[&str]) -> Result<(), ConfigError> {
    let given = [
        ("--scope", a.scope.is_some()),
        ("--namespace", a.namespace.is_some()),
        ("--kind", a.kind.is_some()),
        ("--limit", a.limit.is_some()),
    ];
    match given
        .iter()
        .find(|(flag, set)| *set && !allowed.contains(flag))
    {
        Some((flag, _)) => Err(input(format!(
            "memory {action}: {flag} does not apply here"
        ))),
        None => Ok(()),
    }
}

/// `molecule ask`, checked.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Ask {
    /// Trimmed, 1 to 1000 bytes.
    pub title: String,
    /// `--detail`, empty when not given.
    pub detail: String,
    /// `approval` or `task`.
    pub kind: &'static str,
    pub to: Recipient,
    pub wait: bool,
    /// `--timeout` of `--wait`, 1 s to 7 days.
    pub timeout_secs: u64,
    pub budget_secs: u64,
}

/// Who answers an `ask`.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Recipient {
    /// The human on the canvas.
    User,
    /// Another workspace's agent.
    Agent(WorkspaceId),
}

impl Recipient {
    /// The platform's `recipient_type`.
    pub(crate) fn kind(&self) -> &'static str {
        match self {
            Recipient::User => "user",
            Recipient::Agent(_) => "agent",
        }
    }

    /// The platform's `recipient_id` (empty for the user).
    pub(crate) fn id(&self) -> &str {
        match self {
            Recipient::User => "",
            Recipient::Agent(id) => id,
        }
    }
}

/// Resolves `ask`.
pub(crate) fn ask(a: &AskArgs) -> Result<Ask, ConfigError> {
    let budget_secs = budget(a.budget_secs, DEFAULT_BUDGET_SECS, "ask")?;
    let title = a.title.as_deref().map(str::trim).filter(|t| !t.is_empty());
    let title = required(title, "ask", "title")?;
    let detail = a.detail.as_deref().unwrap_or("");
    if title.len() > MAX_TITLE || detail.len() > MAX_DETAIL {
        return Err(input(format!(
            "ask: the title is limited to {MAX_TITLE} bytes and --detail to {MAX_DETAIL}"
        )));
    }
    let kind = match a.kind.as_deref().unwrap_or("approval") {
        "approval" => "approval",
        "task" => "task",
        other => {
            return Err(input(format!(
                "ask: --kind {other:?}: must be approval or task"
            )));
        }
    };
    let to = match a.to.as_deref().map(str::trim) {
        None | Some("user") => Recipient::User,
        Some(id) => Recipient::Agent(require_workspace(
            Some(id),
            "ask",
            "--to workspace id (or user)",
        )?),
    };
    let timeout_secs = wait_timeout(a.timeout_secs, a.wait, "ask")?;
    Ok(Ask {
        title: title.to_string(),
        detail: detail.to_string(),
        kind,
        to,
        wait: a.wait,
        timeout_secs,
        budget_secs,
    })
}

/// `molecule requests`, checked.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Requests {
    /// Addressed to us instead of raised by us.
    pub inbox: bool,
    /// One of [`REQUEST_STATUSES`].
    pub status: Option<&'static str>,
    pub budget_secs: u64,
}

/// Resolves `requests`.
pub(crate) fn requests(a: &RequestsArgs) -> Result<Requests, ConfigError> {
    let budget_secs = budget(a.budget_secs, DEFAULT_BUDGET_SECS, "requests")?;
    let status = match a.status.as_deref() {
        None => None,
        Some(s) => Some(one_of(&REQUEST_STATUSES, s).ok_or_else(|| {
            input(format!(
                "requests: --status {s:?}: one of {}",
                REQUEST_STATUSES.join(", ")
            ))
        })?),
    };
    Ok(Requests {
        inbox: a.inbox,
        status,
        budget_secs,
    })
}

/// `molecule request`, checked.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Request {
    /// The request's id, a UUID.
    pub id: String,
    pub action: RequestAction,
    pub budget_secs: u64,
}

/// What `request` does to the request.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum RequestAction {
    Show,
    /// `approved`, `rejected` or `done`.
    Respond(&'static str),
    /// Text for the thread, from the argument or stdin.
    Message(String),
    Cancel,
}

impl RequestAction {
    /// The operation's name in logs and errors.
    pub(crate) fn op(&self) -> &'static str {
        match self {
            RequestAction::Show => "request show",
            RequestAction::Respond(_) => "request respond",
            RequestAction::Message(_) => "request message",
            RequestAction::Cancel => "request cancel",
        }
    }
}

/// Resolves `request`.
pub(crate) fn request(a: &RequestArgs) -> Result<Request, ConfigError> {
    let budget_secs = budget(a.budget_secs, DEFAULT_BUDGET_SECS, "request")?;
    let action = a.action.as_deref().unwrap_or("");
    if !matches!(action, "show" | "respond" | "message" | "cancel") {
        return Err(input(format!(
            "request: action {action:?}: one of show, respond, message, cancel"
        )));
    }
    let cmd = format!("request {action}");
    let id = require_uuid(a.id.as_deref(), &cmd, "request id")?;
    let action = match action {
        "show" | "cancel" if a.arg.is_some() => {
            return Err(input(format!("{cmd}: takes only the request id")));
        }
        "show" => RequestAction::Show,
        "cancel" => RequestAction::Cancel,
        "respond" => {
            let answer = a.arg.as_deref().unwrap_or("");
            RequestAction::Respond(one_of(&ANSWERS, answer).ok_or_else(|| {
                input(format!(
                    "request respond: the answer must be approved, rejected or done, not {answer:?}"
                ))
            })?)
        }
        _ => RequestAction::Message(message_text(a.arg.as_deref(), &cmd)?),
    };
    Ok(Request {
        id,
        action,
        budget_secs,
    })
}

/// `molecule history`, checked (`--peer` with `--canvas` is refused while parsing).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct History {
    /// `--peer`; `None` is the canvas conversation.
    pub peer: Option<WorkspaceId>,
    /// 1 to 5000 entries.
    pub limit: u32,
    /// `--before`, in microseconds since the epoch.
    pub before: Option<i64>,
    pub budget_secs: u64,
}

/// Resolves `history`.
pub(crate) fn history(a: &HistoryArgs) -> Result<History, ConfigError> {
    let budget_secs = budget(a.budget_secs, DEFAULT_BUDGET_SECS, "history")?;
    let peer = a
        .peer
        .as_deref()
        .map(|p| require_workspace(Some(p), "history", "--peer id"))
        .transpose()?;
    let limit = a.limit.unwrap_or(DEFAULT_HISTORY_LIMIT);
    let limit =
        Between(1, MAX_HISTORY_LIMIT).check(format_args!("history: --limit {limit}"), limit, "")?;
    let before = match &a.before {
        None => None,
        Some(t) => Some(crate::timestamp::parse_rfc3339(t).ok_or_else(|| {
            input(format!(
                "history: --before {t:?}: not an RFC 3339 timestamp with a zone (e.g. 2026-05-01T00:00:00Z)"
            ))
        })?),
    };
    Ok(History {
        peer,
        limit,
        before,
        budget_secs,
    })
}

/// `molecule card update`, checked: at least one field to change.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct CardUpdate {
    /// Not blank, at most 4096 bytes.
    pub name: Option<String>,
    /// At most 4096 bytes.
    pub description: Option<String>,
    /// `--skill`s as A2A skills, in order; empty keeps the card's.
    pub skills: Vec<Value>,
    pub budget_secs: u64,
}

/// Resolves `card`.
pub(crate) fn card(a: &CardArgs) -> Result<CardUpdate, ConfigError> {
    let budget_secs = budget(a.budget_secs, DEFAULT_BUDGET_SECS, "card")?;
    match a.action.as_deref() {
        Some("update") => {}
        Some(other) => {
            return Err(input(format!("card: unknown action {other:?} (update)")));
        }
        None => return Err(input("card: an action is required: update")),
    }
    if a.name.is_none() && a.description.is_none() && a.skills.is_empty() {
        return Err(input(
            "card update: nothing to change: give --name, --description or --skill",
        ));
    }
    for (flag, v) in [("--name", &a.name), ("--description", &a.description)] {
        if let Some(t) = v
            && (t.len() > MAX_FIELD || (flag == "--name" && t.trim().is_empty()))
        {
            return Err(input(format!(
                "card update: {flag}: 1 to {MAX_FIELD} bytes"
            )));
        }
    }
    let skills = a
        .skills
        .iter()
        .map(|s| skill(s))
        .collect::<Result<Vec<Value>, ConfigError>>()?;
    Ok(CardUpdate {
        name: a.name.clone(),
        description: a.description.clone(),
        skills,
        budget_secs,
    })
}

/// `ID:NAME` (NAME defaults to ID) as an A2A skill.
fn skill(spec: &str) -> Result<Value, ConfigError> {
    let (id, name) = match spec.split_once(':') {
        Some((i, n)) => (i.trim(), n.trim()),
        None => (spec.trim(), spec.trim()),
    };
    if id.is_empty() || id.chars().any(char::is_whitespace) || name.is_empty() {
        return Err(input(format!(
            "card update: --skill {spec:?}: expected ID:NAME, the ID without spaces"
        )));
    }
    Ok(json!({"id": id, "name": name, "description": name, "tags": []}))
}

/// `molecule broadcast`, checked.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Broadcast {
    /// From the argument or stdin.
    pub text: String,
    pub budget_secs: u64,
}

/// Resolves `broadcast`.
pub(crate) fn broadcast(a: &BroadcastArgs) -> Result<Broadcast, ConfigError> {
    let budget_secs = budget(a.budget_secs, DEFAULT_BUDGET_SECS, "broadcast")?;
    let text = message_text(a.text.as_deref(), "broadcast")?;
    Ok(Broadcast { text, budget_secs })
}

/// `molecule download`, checked.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Download {
    /// The upload's id, a lower-case UUID.
    pub file_id: String,
    /// `-o`; `None` is stdout (never with `--json`).
    pub output: Option<PathBuf>,
    pub ack: bool,
    pub budget_secs: u64,
}

/// Resolves `download` for workspace `own` (only its own uploads can be fetched);
/// `json` is the global `--json`, which leaves stdout no room for the bytes.
pub(crate) fn download(
    a: &DownloadArgs,
    own: &WorkspaceId,
    json: bool,
) -> Result<Download, ConfigError> {
    let budget_secs = budget(a.budget_secs, DEFAULT_BUDGET_SECS, "download")?;
    let uri = required(a.uri.as_deref(), "download", "URI")?;
    let file_id = file_id_of(uri, own)?;
    if json && a.output.is_none() {
        return Err(input(
            "download: with --json the bytes need a file: add -o FILE",
        ));
    }
    Ok(Download {
        file_id,
        output: a.output.clone(),
        ack: a.ack,
        budget_secs,
    })
}

/// The file id of `platform-pending:<ws>/<file_id>` (our own workspace only), or a
/// bare file id.
fn file_id_of(uri: &str, own: &str) -> Result<String, ConfigError> {
    let uri = uri.trim();
    let id = match uri.strip_prefix(PENDING) {
        Some(rest) => {
            let Some((ws, id)) = rest.split_once('/') else {
                return Err(input(format!(
                    "download: {uri:?}: expected {PENDING}<workspace-id>/<file-id>"
                )));
            };
            if !ws.eq_ignore_ascii_case(own) {
                return Err(input(format!(
                    "download: {uri:?} belongs to workspace {ws}, not to this one ({own}); only a workspace's own uploads can be fetched"
                )));
            }
            id
        }
        None => uri,
    };
    if !crate::uuid::is_uuid(id) {
        return Err(input(format!(
            "download: {uri:?}: expected {PENDING}<workspace-id>/<file-id> with a UUID file id"
        )));
    }
    Ok(id.to_ascii_lowercase())
}

/// `word` as the platform's own spelling from `list`, if it is one.
fn one_of(list: &[&'static str], word: &str) -> Option<&'static str> {
    list.iter().copied().find(|w| *w == word)
}

fn input(msg: impl Into<String>) -> ConfigError {
    ConfigError(msg.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    const WS: &str = "11111111-1111-4111-8111-111111111111";
    const F: &str = "22222222-2222-4222-8222-222222222222";

    /// The error text of a resolution that must fail.
    fn refused<T: std::fmt::Debug>(r: Result<T, ConfigError>) -> String {
        let e = r.unwrap_err();
        // Every resolution error is a configuration error: exit 2.
        assert_eq!(crate::error::Error::Config(e.clone()).exit_code(), 2);
        e.0
    }

    fn mem(action: &str, arg: Option<&str>) -> MemoryArgs {
        MemoryArgs {
            action: Some(action.into()),
            arg: arg.map(str::to_string),
            ..MemoryArgs::default()
        }
    }

    #[test]
    fn memory_actions() {
        let mut a = mem("commit", Some("remember this"));
        a.scope = Some("team".into());
        a.namespace = Some("ops".into());
        assert_eq!(
            memory(&a).unwrap(),
            Memory {
                action: MemoryAction::Commit {
                    text: "remember this".into(),
                    scope: "TEAM",
                    namespace: Some("ops".into()),
                },
                budget_secs: 60,
            }
        );
        let mut a = mem("search", Some("q"));
        a.kind = Some("fact".into());
        a.limit = Some(5);
        a.budget_secs = Some(5);
        assert_eq!(
            memory(&a).unwrap(),
            Memory {
                action: MemoryAction::Search {
                    query: Some("q".into()),
                    namespace: None,
                    kind: Some("fact"),
                    limit: Some(5),
                },
                budget_secs: 5,
            }
        );
        assert_eq!(
            memory(&mem("namespaces", None)).unwrap().action,
            MemoryAction::Namespaces
        );
        assert_eq!(
            memory(&mem("delete", Some(&format!(" {F} "))))
                .unwrap()
                .action,
            MemoryAction::Delete { id: F.into() }
        );
    }

    #[test]
    fn memory_refusals() {
        assert_eq!(
            refused(memory(&MemoryArgs::default())),
            "memory: an action is required: commit, search, namespaces or delete"
        );
        assert_eq!(
            refused(memory(&mem("forget", None))),
            "memory: unknown action \"forget\" (commit, search, namespaces or delete)"
        );
        let mut a = mem("forget", None);
        a.budget_secs = Some(0);
        assert_eq!(
            refused(memory(&a)),
            "memory: --budget 0: must be between 1 and 86400 seconds",
            "the budget is checked first"
        );
        let mut a = mem("commit", Some("x"));
        a.kind = Some("fact".into());
        assert_eq!(
            refused(memory(&a)),
            "memory commit: --kind does not apply here"
        );
        let mut a = mem("commit", Some("x"));
        a.scope = Some("world".into());
        assert_eq!(
            refused(memory(&a)),
            "memory commit: --scope \"WORLD\": must be LOCAL, TEAM or GLOBAL"
        );
        let mut a = mem("commit", Some("x"));
        a.namespace = Some("n".repeat(51));
        assert_eq!(
            refused(memory(&a)),
            "memory commit: --namespace: 1 to 50 characters"
        );
        assert_eq!(
            refused(memory(&mem("commit", Some(" ")))),
            "memory commit: the message is empty"
        );
        let mut a = mem("search", None);
        a.kind = Some("opinion".into());
        assert_eq!(
            refused(memory(&a)),
            "memory search: --kind \"opinion\": must be fact, summary or checkpoint"
        );
        let mut a = mem("search", None);
        a.limit = Some(101);
        assert_eq!(
            refused(memory(&a)),
            "memory search: --limit must be between 1 and 100"
        );
        let mut a = mem("search", None);
        a.scope = Some("LOCAL".into());
        assert_eq!(
            refused(memory(&a)),
            "memory search: --scope does not apply here"
        );
        assert_eq!(
            refused(memory(&mem("namespaces", Some("x")))),
            "memory namespaces: takes no argument"
        );
        let mut a = mem("delete", Some(F));
        a.limit = Some(1);
        assert_eq!(
            refused(memory(&a)),
            "memory delete: --limit does not apply here"
        );
        assert_eq!(
            refused(memory(&mem("delete", None))),
            "memory delete: the memory id is required (see 'molecule memory delete --help')"
        );
        assert_eq!(
            refused(memory(&mem("delete", Some("../x")))),
            "memory delete: memory id \"../x\" is not a UUID"
        );
    }

    fn ask_args(title: &str) -> AskArgs {
        AskArgs {
            title: Some(title.into()),
            ..AskArgs::default()
        }
    }

    #[test]
    fn ask_settings() {
        assert_eq!(
            ask(&ask_args(" Deploy? ")).unwrap(),
            Ask {
                title: "Deploy?".into(),
                detail: String::new(),
                kind: "approval",
                to: Recipient::User,
                wait: false,
                timeout_secs: 600,
                budget_secs: 60,
            }
        );
        let mut a = ask_args("Build it");
        a.kind = Some("task".into());
        a.to = Some(format!(" {} ", WS.to_uppercase()));
        a.wait = true;
        a.timeout_secs = Some(30);
        let s = ask(&a).unwrap();
        assert_eq!((s.kind, s.timeout_secs), ("task", 30));
        assert_eq!((s.to.kind(), s.to.id()), ("agent", WS));
        assert_eq!((Recipient::User.kind(), Recipient::User.id()), ("user", ""));
    }

    #[test]
    fn ask_refusals() {
        assert_eq!(
            refused(ask(&AskArgs::default())),
            "ask: the title is required (see 'molecule ask --help')"
        );
        assert_eq!(
            refused(ask(&ask_args("  "))),
            "ask: the title is required (see 'molecule ask --help')"
        );
        let mut a = ask_args("t");
        a.detail = Some("d".repeat(MAX_DETAIL + 1));
        assert_eq!(
            refused(ask(&a)),
            "ask: the title is limited to 1000 bytes and --detail to 65536"
        );
        let mut a = ask_args("t");
        a.kind = Some("poll".into());
        assert_eq!(
            refused(ask(&a)),
            "ask: --kind \"poll\": must be approval or task"
        );
        let mut a = ask_args("t");
        a.to = Some("bob".into());
        assert_eq!(
            refused(ask(&a)),
            "ask: --to workspace id (or user) \"bob\" is not a UUID"
        );
        let mut a = ask_args("t");
        a.timeout_secs = Some(5);
        assert_eq!(
            refused(ask(&a)),
            "ask: --timeout only makes sense with --wait"
        );
        a.wait = true;
        a.timeout_secs = Some(0);
        assert_eq!(
            refused(ask(&a)),
            "ask: --timeout 0: must be between 1 and 604800 seconds"
        );
    }

    #[test]
    fn requests_list_settings() {
        let a = RequestsArgs {
            inbox: true,
            status: Some("pending".into()),
            budget_secs: None,
        };
        assert_eq!(
            requests(&a).unwrap(),
            Requests {
                inbox: true,
                status: Some("pending"),
                budget_secs: 60,
            }
        );
        let a = RequestsArgs {
            status: Some("open".into()),
            ..RequestsArgs::default()
        };
        assert_eq!(
            refused(requests(&a)),
            "requests: --status \"open\": one of pending, info_requested, done, approved, \
             rejected, cancelled"
        );
    }

    fn req(action: &str, arg: Option<&str>) -> RequestArgs {
        RequestArgs {
            action: Some(action.into()),
            id: Some(F.into()),
            arg: arg.map(str::to_string),
            budget_secs: None,
        }
    }

    #[test]
    fn request_actions() {
        let cases = [
            (req("show", None), RequestAction::Show),
            (req("cancel", None), RequestAction::Cancel),
            (req("respond", Some("done")), RequestAction::Respond("done")),
            (
                req("message", Some("more please")),
                RequestAction::Message("more please".into()),
            ),
        ];
        for (a, action) in cases {
            assert_eq!(
                request(&a).unwrap(),
                Request {
                    id: F.into(),
                    action,
                    budget_secs: 60,
                }
            );
        }
        assert_eq!(RequestAction::Cancel.op(), "request cancel");
    }

    #[test]
    fn request_refusals() {
        assert_eq!(
            refused(request(&RequestArgs::default())),
            "request: action \"\": one of show, respond, message, cancel"
        );
        let mut a = req("show", None);
        a.id = None;
        assert_eq!(
            refused(request(&a)),
            "request show: the request id is required (see 'molecule request show --help')"
        );
        assert_eq!(
            refused(request(&req("cancel", Some("now")))),
            "request cancel: takes only the request id"
        );
        assert_eq!(
            refused(request(&req("respond", Some("maybe")))),
            "request respond: the answer must be approved, rejected or done, not \"maybe\""
        );
        assert_eq!(
            refused(request(&req("message", None))),
            "request message: the message text is required (or - to read it from stdin)"
        );
    }

    #[test]
    fn history_settings() {
        let s = history(&HistoryArgs::default()).unwrap();
        assert_eq!(
            s,
            History {
                peer: None,
                limit: 20,
                before: None,
                budget_secs: 60,
            }
        );
        let a = HistoryArgs {
            peer: Some(WS.to_uppercase()),
            limit: Some(5000),
            before: Some("1970-01-01T00:00:01Z".into()),
            ..HistoryArgs::default()
        };
        let s = history(&a).unwrap();
        assert_eq!(s.peer.as_deref(), Some(WS));
        assert_eq!((s.limit, s.before), (5000, Some(1_000_000)));
        let a = HistoryArgs {
            limit: Some(0),
            ..HistoryArgs::default()
        };
        assert_eq!(
            refused(history(&a)),
            "history: --limit 0: must be between 1 and 5000"
        );
        let a = HistoryArgs {
            before: Some("yesterday".into()),
            ..HistoryArgs::default()
        };
        assert!(refused(history(&a)).contains("not an RFC 3339 timestamp"));
        let a = HistoryArgs {
            peer: Some("x".into()),
            ..HistoryArgs::default()
        };
        assert_eq!(
            refused(history(&a)),
            "history: --peer id \"x\" is not a UUID"
        );
    }

    #[test]
    fn card_settings() {
        let a = CardArgs {
            action: Some("update".into()),
            name: Some("Builder".into()),
            skills: vec!["sum:Add numbers".into(), "sum".into()],
            ..CardArgs::default()
        };
        let s = card(&a).unwrap();
        assert_eq!(s.name.as_deref(), Some("Builder"));
        assert_eq!(s.skills[0]["name"], "Add numbers");
        assert_eq!(s.skills[1]["name"], "sum");
        let update = |f: fn(&mut CardArgs)| {
            let mut a = CardArgs {
                action: Some("update".into()),
                ..CardArgs::default()
            };
            f(&mut a);
            refused(card(&a))
        };
        assert_eq!(
            update(|_| {}),
            "card update: nothing to change: give --name, --description or --skill"
        );
        assert_eq!(
            update(|a| a.name = Some(" ".into())),
            "card update: --name: 1 to 4096 bytes"
        );
        assert_eq!(
            update(|a| a.skills = vec!["a b".into()]),
            "card update: --skill \"a b\": expected ID:NAME, the ID without spaces"
        );
        assert!(update(|a| a.skills = vec![":x".into()]).contains("ID:NAME"));
        assert_eq!(
            update(|a| a.action = Some("show".into())),
            "card: unknown action \"show\" (update)"
        );
        assert_eq!(
            update(|a| a.action = None),
            "card: an action is required: update"
        );
    }

    #[test]
    fn broadcast_settings() {
        let a = BroadcastArgs {
            text: Some("hello all".into()),
            budget_secs: Some(86400),
        };
        assert_eq!(
            broadcast(&a).unwrap(),
            Broadcast {
                text: "hello all".into(),
                budget_secs: 86400,
            }
        );
        let a = BroadcastArgs {
            text: Some("x".into()),
            budget_secs: Some(86401),
        };
        assert_eq!(
            refused(broadcast(&a)),
            "broadcast: --budget 86401: must be between 1 and 86400 seconds"
        );
    }

    #[test]
    fn download_settings() {
        let own = WorkspaceId::parse(WS).unwrap();
        let a = DownloadArgs {
            uri: Some(format!("platform-pending:{}/{F}", WS.to_uppercase())),
            output: Some("out.bin".into()),
            ..DownloadArgs::default()
        };
        assert_eq!(
            download(&a, &own, true).unwrap(),
            Download {
                file_id: F.into(),
                output: Some("out.bin".into()),
                ack: false,
                budget_secs: 60,
            }
        );
        let bare = DownloadArgs {
            uri: Some(F.into()),
            ..DownloadArgs::default()
        };
        assert_eq!(
            refused(download(&bare, &own, true)),
            "download: with --json the bytes need a file: add -o FILE"
        );
        assert_eq!(download(&bare, &own, false).unwrap().file_id, F);
        assert_eq!(
            refused(download(&DownloadArgs::default(), &own, false)),
            "download: the URI is required (see 'molecule download --help')"
        );
    }

    #[test]
    fn pending_uris() {
        assert_eq!(
            file_id_of(&format!("platform-pending:{WS}/{F}"), WS).unwrap(),
            F
        );
        assert_eq!(file_id_of(F, WS).unwrap(), F);
        let other = "33333333-3333-4333-8333-333333333333";
        assert!(
            refused(file_id_of(&format!("platform-pending:{other}/{F}"), WS))
                .contains("only a workspace's own uploads can be fetched")
        );
        assert_eq!(
            refused(file_id_of("platform-pending:x", WS)),
            "download: \"platform-pending:x\": expected platform-pending:<workspace-id>/<file-id>"
        );
        assert!(file_id_of(&format!("platform-pending:{WS}/../etc"), WS).is_err());
    }
}
