//! The command line of the platform tools an agent uses from a shell (`memory`, `ask`,
//! `requests`, `request`, `history`, `card`, `broadcast`, `download`): raw arguments and
//! their help texts. Same rules as the parent module: syntax only, no env or I/O.

use std::path::PathBuf;

use super::{Command, GlobalArgs, UsageError, help, number, string, sub_args};

/// `memory` options as typed.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct MemoryArgs {
    /// `commit`, `search`, `namespaces` or `delete`.
    pub action: Option<String>,
    /// The text (commit), query (search) or id (delete).
    pub arg: Option<String>,
    /// `--scope`.
    pub scope: Option<String>,
    /// `--namespace`.
    pub namespace: Option<String>,
    /// `--kind`.
    pub kind: Option<String>,
    /// `--limit`.
    pub limit: Option<u32>,
    /// `--budget` (seconds).
    pub budget_secs: Option<u64>,
}

/// `ask` options as typed.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct AskArgs {
    /// Positional title.
    pub title: Option<String>,
    /// `--detail`.
    pub detail: Option<String>,
    /// `--to user|<workspace-id>`.
    pub to: Option<String>,
    /// `--kind approval|task`.
    pub kind: Option<String>,
    /// `--wait`.
    pub wait: bool,
    /// `--timeout` (seconds) for `--wait`.
    pub timeout_secs: Option<u64>,
    /// `--budget` (seconds).
    pub budget_secs: Option<u64>,
}

/// `requests` options as typed.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct RequestsArgs {
    /// `--inbox`: requests addressed to us instead of raised by us.
    pub inbox: bool,
    /// `--status`.
    pub status: Option<String>,
    /// `--budget` (seconds).
    pub budget_secs: Option<u64>,
}

/// `request` options as typed.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct RequestArgs {
    /// `show`, `respond`, `message` or `cancel`.
    pub action: Option<String>,
    /// The request id.
    pub id: Option<String>,
    /// The answer (respond) or the text (message).
    pub arg: Option<String>,
    /// `--budget` (seconds).
    pub budget_secs: Option<u64>,
}

/// `history` options as typed.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct HistoryArgs {
    /// `--peer ID`.
    pub peer: Option<String>,
    /// `--canvas`.
    pub canvas: bool,
    /// `--limit`.
    pub limit: Option<u32>,
    /// `--before TS`.
    pub before: Option<String>,
    /// `--budget` (seconds).
    pub budget_secs: Option<u64>,
}

/// `card` options as typed.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct CardArgs {
    /// `update`.
    pub action: Option<String>,
    /// `--name`.
    pub name: Option<String>,
    /// `--description`.
    pub description: Option<String>,
    /// `--skill ID:NAME`, in order.
    pub skills: Vec<String>,
    /// `--budget` (seconds).
    pub budget_secs: Option<u64>,
}

/// `broadcast` options as typed.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct BroadcastArgs {
    /// Positional text, or `-` for stdin.
    pub text: Option<String>,
    /// `--budget` (seconds).
    pub budget_secs: Option<u64>,
}

/// `download` options as typed.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct DownloadArgs {
    /// Positional `platform-pending:<ws>/<file_id>` URI (or a bare file id).
    pub uri: Option<String>,
    /// `-o` / `--output FILE`.
    pub output: Option<PathBuf>,
    /// `--ack`: tell the platform the upload was fetched.
    pub ack: bool,
    /// `--budget` (seconds).
    pub budget_secs: Option<u64>,
}

/// Parses the tool command `name`, or `None` if `name` is not one.
pub(super) fn parse(
    name: &str,
    parser: &mut lexopt::Parser,
    g: &mut GlobalArgs,
) -> Option<Result<Command, UsageError>> {
    let parsed = match name {
        "memory" => parse_memory(parser, g),
        "ask" => parse_ask(parser, g),
        "requests" => parse_requests(parser, g),
        "request" => parse_request(parser, g),
        "history" => parse_history(parser, g),
        "card" => parse_card(parser, g),
        "broadcast" => parse_broadcast(parser, g),
        "download" => parse_download(parser, g),
        _ => return None,
    };
    Some(parsed)
}

/// `--budget SECS`, shared by every tool command.
fn budget(name: &str, p: &mut lexopt::Parser, slot: &mut Option<u64>) -> Result<bool, UsageError> {
    if name == "budget" {
        *slot = Some(number(p, "--budget")?);
        return Ok(true);
    }
    Ok(false)
}

fn parse_memory(parser: &mut lexopt::Parser, g: &mut GlobalArgs) -> Result<Command, UsageError> {
    let mut a = MemoryArgs::default();
    let Some(pos) = sub_args(parser, g, "memory", 2, |name, p| {
        match name {
            "scope" => a.scope = Some(string(p.value()?, "--scope")?),
            "namespace" => a.namespace = Some(string(p.value()?, "--namespace")?),
            "kind" => a.kind = Some(string(p.value()?, "--kind")?),
            "limit" => a.limit = Some(number(p, "--limit")?),
            other => return budget(other, p, &mut a.budget_secs),
        }
        Ok(true)
    })?
    else {
        return Ok(help("memory"));
    };
    let mut pos = pos.into_iter();
    a.action = pos.next();
    a.arg = pos.next();
    Ok(Command::Memory(a))
}

fn parse_ask(parser: &mut lexopt::Parser, g: &mut GlobalArgs) -> Result<Command, UsageError> {
    let mut a = AskArgs::default();
    let Some(pos) = sub_args(parser, g, "ask", 1, |name, p| {
        match name {
            "detail" => a.detail = Some(string(p.value()?, "--detail")?),
            "to" => a.to = Some(string(p.value()?, "--to")?),
            "kind" => a.kind = Some(string(p.value()?, "--kind")?),
            "wait" => a.wait = true,
            "timeout" => a.timeout_secs = Some(number(p, "--timeout")?),
            other => return budget(other, p, &mut a.budget_secs),
        }
        Ok(true)
    })?
    else {
        return Ok(help("ask"));
    };
    a.title = pos.into_iter().next();
    Ok(Command::Ask(a))
}

fn parse_requests(parser: &mut lexopt::Parser, g: &mut GlobalArgs) -> Result<Command, UsageError> {
    let mut a = RequestsArgs::default();
    let Some(_) = sub_args(parser, g, "requests", 0, |name, p| {
        match name {
            "inbox" => a.inbox = true,
            "status" => a.status = Some(string(p.value()?, "--status")?),
            other => return budget(other, p, &mut a.budget_secs),
        }
        Ok(true)
    })?
    else {
        return Ok(help("requests"));
    };
    Ok(Command::Requests(a))
}

fn parse_request(parser: &mut lexopt::Parser, g: &mut GlobalArgs) -> Result<Command, UsageError> {
    let mut a = RequestArgs::default();
    let Some(pos) = sub_args(parser, g, "request", 3, |name, p| {
        budget(name, p, &mut a.budget_secs)
    })?
    else {
        return Ok(help("request"));
    };
    let mut pos = pos.into_iter();
    a.action = pos.next();
    a.id = pos.next();
    a.arg = pos.next();
    Ok(Command::Request(a))
}

fn parse_history(parser: &mut lexopt::Parser, g: &mut GlobalArgs) -> Result<Command, UsageError> {
    let mut a = HistoryArgs::default();
    let Some(_) = sub_args(parser, g, "history", 0, |name, p| {
        match name {
            "peer" => a.peer = Some(string(p.value()?, "--peer")?),
            "canvas" => a.canvas = true,
            "limit" => a.limit = Some(number(p, "--limit")?),
            "before" => a.before = Some(string(p.value()?, "--before")?),
            other => return budget(other, p, &mut a.budget_secs),
        }
        Ok(true)
    })?
    else {
        return Ok(help("history"));
    };
    if a.peer.is_some() && a.canvas {
        return Err(UsageError(
            "history: --peer and --canvas exclude each other".into(),
        ));
    }
    Ok(Command::History(a))
}

fn parse_card(parser: &mut lexopt::Parser, g: &mut GlobalArgs) -> Result<Command, UsageError> {
    let mut a = CardArgs::default();
    let Some(pos) = sub_args(parser, g, "card", 1, |name, p| {
        match name {
            "name" => a.name = Some(string(p.value()?, "--name")?),
            "description" => a.description = Some(string(p.value()?, "--description")?),
            "skill" => a.skills.push(string(p.value()?, "--skill")?),
            other => return budget(other, p, &mut a.budget_secs),
        }
        Ok(true)
    })?
    else {
        return Ok(help("card"));
    };
    a.action = pos.into_iter().next();
    Ok(Command::Card(a))
}

fn parse_broadcast(parser: &mut lexopt::Parser, g: &mut GlobalArgs) -> Result<Command, UsageError> {
    let mut a = BroadcastArgs::default();
    let Some(pos) = sub_args(parser, g, "broadcast", 1, |name, p| {
        budget(name, p, &mut a.budget_secs)
    })?
    else {
        return Ok(help("broadcast"));
    };
    a.text = pos.into_iter().next();
    Ok(Command::Broadcast(a))
}

fn parse_download(parser: &mut lexopt::Parser, g: &mut GlobalArgs) -> Result<Command, UsageError> {
    let mut a = DownloadArgs::default();
    let Some(pos) = sub_args(parser, g, "download", 1, |name, p| {
        match name {
            "-o" | "output" => a.output = Some(PathBuf::from(p.value()?)),
            "ack" => a.ack = true,
            other => return budget(other, p, &mut a.budget_secs),
        }
        Ok(true)
    })?
    else {
        return Ok(help("download"));
    };
    a.uri = pos.into_iter().next();
    Ok(Command::Download(a))
}

/// Help text for a tool command.
pub(super) fn help_for(topic: &str) -> Option<&'static str> {
    Some(match topic {
        "memory" => MEMORY_HELP,
        "ask" => ASK_HELP,
        "requests" => REQUESTS_HELP,
        "request" => REQUEST_HELP,
        "history" => HISTORY_HELP,
        "card" => CARD_HELP,
        "broadcast" => BROADCAST_HELP,
        "download" => DOWNLOAD_HELP,
        _ => return None,
    })
}

/// The lines every tool command's help ends with.
macro_rules! tool_tail {
    () => {
        "
  --budget SECS            total time for retries of transient failures (network,
                           429, 5xx), with backoff                       [default: 60]

Exit codes: 0 done; 1 refused by the platform (its reason and hint are printed);
2 bad input or configuration; 3 token rejected; 4 workspace removed or unknown;
75 platform unreachable or busy after the budget (try again later).

Environment (or the matching global option, see 'molecule --help'):
  MOLECULE_API_URL, MOLECULE_WORKSPACE_ID, MOLECULE_WORKSPACE_TOKEN_FILE,
  MOLECULE_WORKSPACE_TOKEN, MOLECULE_ORG_ID, MOLECULE_LOG.
--json prints exactly one JSON document on stdout, also on failure:
{\"ok\":false,\"error\":\"...\",\"exit_code\":N}. Logs and errors go to stderr.
"
    };
}

/// `molecule memory --help`.
pub const MEMORY_HELP: &str = concat!(
    "\
molecule memory: remember things across runs (the platform's memory plugin)

Usage: molecule memory commit TEXT|- [--scope LOCAL|TEAM|GLOBAL] [--namespace LABEL]
       molecule memory search [QUERY] [--namespace NAME] [--kind KIND] [--limit N]
       molecule memory namespaces
       molecule memory delete <memory-id>

commit      stores TEXT (or stdin) and prints the new memory's id. --scope LOCAL (the
            default) is this workspace only, TEAM is shared with the parent's team,
            GLOBAL with the whole org and may only be written by a root workspace
            (403 otherwise). --namespace is a label (at most 50 characters, default
            \"general\") that the platform only echoes back.
            The platform redacts secrets before storing: API keys, tokens, Bearer
            values, private keys, credentials in URLs and any run of 33 or more
            base64 characters become [REDACTED:...].
search      the v2 search (GET /v2/memories): QUERY of 2 or more characters is a
            full-text (whole word) search, 1 character a substring match, none lists
            the newest; --namespace NAME (e.g. workspace:<id>, from 'namespaces'),
            --kind fact|summary|checkpoint, --limit 1..100 (default 50)
namespaces  the namespaces this workspace may read and write
delete      deletes a LOCAL memory; TEAM and GLOBAL ones cannot be deleted (404)

A platform without a memory plugin answers 503: exit 1 saying so.

Options:",
    tool_tail!()
);

/// `molecule ask --help`.
pub const ASK_HELP: &str = concat!(
    "\
molecule ask: ask a human (or another agent) for an approval or a task, and wait

Usage: molecule ask TITLE [--detail TEXT] [--to user|<workspace-id>] [--kind approval|task]
                    [--wait [--timeout SECS]]

Raises a request in the platform's Tasks/Approvals inbox (POST /workspaces/<own>/requests)
and prints its id. --to user (the default) asks the human on the canvas; a workspace id
asks that agent. --kind approval (the default) is answered approved or rejected; task is
answered done or rejected.

With --wait, waits for the answer and prints the request's thread: exit 0 approved or
done, 1 rejected or cancelled, 75 still open after --timeout (default 600 s; the request
stays open, see 'molecule request show ID'). Waiting reads the request's status with
backoff (2 s growing to 30 s), never a tight loop.

Options:
  --detail TEXT            longer description
  --to user|ID             who answers                                 [default: user]
  --kind approval|task                                             [default: approval]
  --wait                   wait for the answer
  --timeout SECS           how long --wait waits                       [default: 600]",
    tool_tail!()
);

/// `molecule requests --help`.
pub const REQUESTS_HELP: &str = concat!(
    "\
molecule requests: list requests this workspace raised, or (--inbox) received

Usage: molecule requests [--inbox] [--status STATUS]

Newest first, at most 50. STATUS is pending, info_requested, done, approved, rejected or
cancelled.

Options:
  --inbox                  requests addressed to this workspace
  --status STATUS          only requests in this status",
    tool_tail!()
);

/// `molecule request --help`.
pub const REQUEST_HELP: &str = concat!(
    "\
molecule request: show, answer, discuss or cancel one request

Usage: molecule request show <request-id>
       molecule request respond <request-id> approved|rejected|done
       molecule request message <request-id> TEXT|-
       molecule request cancel <request-id>

show     the request and its thread (requester or recipient only)
respond  answer a request addressed to this workspace (approval: approved|rejected;
         task: done|rejected); 404 when unknown or already answered
message  add to the thread (a message from the recipient asks the requester for info)
cancel   withdraw a pending request this workspace raised

Options:",
    tool_tail!()
);

/// `molecule history --help`.
pub const HISTORY_HELP: &str = concat!(
    "\
molecule history: print a conversation, oldest first

Usage: molecule history [--peer <workspace-id> | --canvas] [--limit N] [--before TS]

--peer: this workspace's activity with that peer (GET /activity?peer_id=): what the
peer sent, and what this workspace sent, because molecule send and the connector's
replies report each message they send (an a2a_send row), as the Python runtime does.
--canvas (the default): the conversation with the human (GET /chat-history).
Pages backwards with before_ts, without losing rows that share a timestamp.

Options:
  --peer ID                the peer workspace
  --canvas                 the human conversation
  --limit N                newest N entries                              [default: 20]
  --before TS              only entries older than TS (RFC 3339 with a zone, e.g.
                           2026-05-01T00:00:00Z)",
    tool_tail!()
);

/// `molecule card --help`.
pub const CARD_HELP: &str = concat!(
    "\
molecule card: update what this workspace's agent card says

Usage: molecule card update [--name NAME] [--description TEXT] [--skill ID:NAME]...

POST /registry/update-card replaces the whole stored card: the card sent is the one
the connector registers with (name, skills, poll mode, no url) with the given fields
replaced. --skill may be repeated; ID:NAME (NAME defaults to ID). To send a card of
your own on every start, use 'molecule connect --card-file FILE'.

Options:
  --name NAME              display name
  --description TEXT       what the agent does
  --skill ID:NAME          a skill (repeatable; replaces the skill list)",
    tool_tail!()
);

/// `molecule broadcast --help`.
pub const BROADCAST_HELP: &str = concat!(
    "\
molecule broadcast: send a message to every workspace of the org

Usage: molecule broadcast TEXT|-

POST /workspaces/<own>/broadcast: every workspace under the org root (except this one)
gets it. The broadcast ability is off by default: 403 broadcast_disabled exits 1 with
the platform's hint (an admin can enable it). molecule connect hands received
broadcasts to its backend (MOLECULE_ORIGIN=broadcast) and never answers them.

Options:",
    tool_tail!()
);

/// `molecule download --help`.
pub const DOWNLOAD_HELP: &str = concat!(
    "\
molecule download: fetch the bytes of a file uploaded to this workspace

Usage: molecule download <platform-pending:WS/FILE-ID> [-o FILE] [--ack]

Files a user attaches on the canvas are staged on the platform for 24 h; molecule
connect gives their URIs to the backend (MOLECULE_ATTACHMENTS). Without -o the bytes
go to stdout (not with --json). -o writes FILE (0600, replaced atomically).

Options:
  -o, --output FILE        write to FILE instead of stdout
  --ack                    tell the platform the file was fetched (it is then deleted
                           an hour later)",
    tool_tail!()
);
