//! The command line: a lexopt loop that turns argv into raw `Args`, plus the help
//! texts. Checks only what the user typed (syntax, numbers); reads no env, files or
//! network: `config.rs` resolves and validates.

use std::ffi::OsString;
use std::fmt;
use std::path::PathBuf;

mod tools;
pub use tools::{
    AskArgs, BroadcastArgs, CardArgs, DownloadArgs, HistoryArgs, MemoryArgs, RequestArgs,
    RequestsArgs,
};
pub mod options;

/// An argument detached from the parser's borrow, so a helper can still call
/// `parser.value()` while we hold it.
#[derive(Debug)]
enum Arg {
    Short(char),
    Long(String),
    Value(OsString),
}
use Arg::{Long, Short, Value};

fn next(parser: &mut lexopt::Parser) -> Result<Option<Arg>, UsageError> {
    Ok(parser.next()?.map(|a| match a {
        lexopt::Arg::Short(c) => Short(c),
        lexopt::Arg::Long(l) => Long(l.to_string()),
        lexopt::Arg::Value(v) => Value(v),
    }))
}

/// `-h` or `--help`: the one place that recognises it, for every command's loop.
fn is_help(arg: &Arg) -> bool {
    matches!(arg, Short('h')) || matches!(arg, Long(l) if l == "help")
}

fn unexpected(arg: Arg) -> UsageError {
    match arg {
        Short(c) => UsageError(format!("invalid option '-{c}'")),
        Long(l) => UsageError(format!("invalid option '--{l}'")),
        Value(v) => UsageError(format!("unexpected argument {:?}", v.to_string_lossy())),
    }
}

/// Options every command accepts, before or after the command name.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct GlobalArgs {
    /// `--api-url`.
    pub api_url: Option<String>,
    /// `--workspace`.
    pub workspace: Option<String>,
    /// `--token-file`.
    pub token_file: Option<PathBuf>,
    /// `--org-id`.
    pub org_id: Option<String>,
    /// `--state-dir`.
    pub state_dir: Option<PathBuf>,
    /// `--ca-file`.
    pub ca_file: Option<PathBuf>,
    /// `--allow-insecure-http`.
    pub allow_insecure_http: bool,
    /// `--json`.
    pub json: bool,
    /// `-v` count minus `-q` count.
    pub verbosity: i8,
}

/// `connect` options as typed.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct ConnectArgs {
    /// Positional workspace id.
    pub workspace: Option<String>,
    /// `--backend`.
    pub backend: Option<String>,
    /// `--backend-opt KEY=VALUE`, in order.
    pub backend_opts: Vec<String>,
    /// `--token` (Go-CLI compatibility; visible in `ps`).
    pub token: Option<String>,
    /// `--mode`.
    pub mode: Option<String>,
    /// `--interval-ms`.
    pub interval_ms: Option<u64>,
    /// `--since-secs`.
    pub since_secs: Option<u64>,
    /// `--heartbeat-secs`.
    pub heartbeat_secs: Option<u64>,
    /// `--drain-timeout` (seconds).
    pub drain_timeout_secs: Option<u64>,
    /// `--max-attempts`.
    pub max_attempts: Option<u32>,
    /// `--reply-to-replies`.
    pub reply_to_replies: bool,
    /// `--max-auto-replies`.
    pub max_auto_replies: Option<u32>,
    /// `--concurrency`.
    pub concurrency: Option<usize>,
    /// `--once`.
    pub once: bool,
    /// `--max-messages`.
    pub max_messages: Option<u64>,
    /// `--idle-exit` (seconds).
    pub idle_exit_secs: Option<u64>,
    /// `--lock-wait` (seconds).
    pub lock_wait_secs: Option<u64>,
    /// `--delegations-secs` (0 = tracker off).
    pub delegations_secs: Option<u64>,
    /// `--delegations-capacity` (delivered ids remembered).
    pub delegations_capacity: Option<usize>,
    /// `--workspaces FILE`.
    pub workspaces: Option<PathBuf>,
    /// `--broadcasts-secs` (0 = inbound broadcasts off).
    pub broadcasts_secs: Option<u64>,
    /// `--card-file FILE`: the agent card sent on register.
    pub card_file: Option<PathBuf>,
    /// `--wake auto|events|poll`.
    pub wake: Option<String>,
    /// `--safety-poll-secs` (poll cadence while the event stream is healthy).
    pub safety_poll_secs: Option<u64>,
    /// `--rate-reserve PCT` (share of the rate bucket left to other clients).
    pub rate_reserve: Option<u64>,
    /// `--dry-run`.
    pub dry_run: bool,
    /// `--metrics-file PATH`.
    pub metrics_file: Option<PathBuf>,
    /// `--notification-fd FD` (s6 readiness).
    pub notification_fd: Option<u32>,
}

/// `send` options as typed.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct SendArgs {
    /// Positional peer workspace id.
    pub peer: Option<String>,
    /// Positional message text, or `-` for stdin.
    pub text: Option<String>,
    /// `--message-id` (caller-controlled dedupe).
    pub message_id: Option<String>,
    /// `--budget` (seconds, total for all attempts).
    pub budget_secs: Option<u64>,
}

/// `peers` options as typed.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct PeersArgs {
    /// `--query` (substring of name or role).
    pub query: Option<String>,
}

/// `discover` options as typed.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct DiscoverArgs {
    /// Positional peer workspace id.
    pub peer: Option<String>,
}

/// `info` options as typed.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct InfoArgs {
    /// Positional workspace id; own workspace when absent.
    pub id: Option<String>,
}

/// `delegate` options as typed.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct DelegateArgs {
    /// Positional target workspace id.
    pub target: Option<String>,
    /// Positional task text, or `-` for stdin.
    pub text: Option<String>,
    /// `--idempotency-key`.
    pub idempotency_key: Option<String>,
    /// `--wait`.
    pub wait: bool,
    /// `--timeout` (seconds) for `--wait`.
    pub timeout_secs: Option<u64>,
}

/// `delegations` options as typed.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct DelegationsArgs {
    /// `--status`.
    pub status: Option<String>,
}

/// `notify` options as typed.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct NotifyArgs {
    /// Positional message text, or `-` for stdin.
    pub text: Option<String>,
    /// `--attach URI[,NAME]`, in order.
    pub attach: Vec<String>,
    /// `--file PATH`, in order: uploaded first.
    pub files: Vec<PathBuf>,
}

/// `heartbeat` options as typed.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct HeartbeatArgs {
    /// `--current-task`.
    pub current_task: Option<String>,
    /// `--active-tasks`.
    pub active_tasks: Option<u32>,
    /// `--error-rate` (0.0 to 1.0).
    pub error_rate: Option<f64>,
    /// `--sample-error`.
    pub sample_error: Option<String>,
    /// `--uptime-secs`.
    pub uptime_secs: Option<u64>,
}

/// `doctor` options as typed.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct DoctorArgs {
    /// `--backend` (check it only when given, or when `--backend-opt` is).
    pub backend: Option<String>,
    /// `--backend-opt KEY=VALUE`, in order.
    pub backend_opts: Vec<String>,
}

/// What to do.
// Built once per process and moved once: the size of the `connect` variant costs
// nothing, and boxing it would only add noise to every match.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    /// Print help: general, or for the named command.
    Help(Option<String>),
    /// Print the version.
    Version,
    /// Run the connector.
    Connect(ConnectArgs),
    /// One A2A `message/send` to a peer.
    Send(SendArgs),
    /// List peers.
    Peers(PeersArgs),
    /// Check that a peer exists and may be talked to.
    Discover(DiscoverArgs),
    /// Show a workspace's platform record.
    Info(InfoArgs),
    /// Delegate a task to another workspace.
    Delegate(DelegateArgs),
    /// List delegations.
    Delegations(DelegationsArgs),
    /// Message the human on the canvas.
    Notify(NotifyArgs),
    /// Send one heartbeat.
    Heartbeat(HeartbeatArgs),
    /// Show what the connector's state file says.
    Status {
        /// `--stale-after` (seconds).
        stale_after: Option<u64>,
        /// `--format prometheus`: metrics instead of the table.
        prometheus: bool,
    },
    /// Check configuration, reachability, auth and poll support.
    Doctor(DoctorArgs),
    /// Memories: commit, search, namespaces, delete.
    Memory(MemoryArgs),
    /// Raise a request (approval or task), optionally wait for the answer.
    Ask(AskArgs),
    /// List requests raised or received.
    Requests(RequestsArgs),
    /// One request: show, respond, message, cancel.
    Request(RequestArgs),
    /// A conversation with a peer or the human.
    History(HistoryArgs),
    /// Update the agent card.
    Card(CardArgs),
    /// Message every workspace of the org.
    Broadcast(BroadcastArgs),
    /// Fetch a pending upload's bytes.
    Download(DownloadArgs),
    /// Print the completion script for this shell (one of `options::SHELLS`).
    Completions(String),
    /// Print the man page.
    Man,
}

/// Everything parsed from argv.
#[derive(Debug, Clone, PartialEq)]
pub struct Args {
    /// Global options.
    pub global: GlobalArgs,
    /// The command.
    pub command: Command,
}

/// A command line we cannot use (exit 2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageError(pub String);

impl fmt::Display for UsageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for UsageError {}

impl From<lexopt::Error> for UsageError {
    fn from(e: lexopt::Error) -> Self {
        UsageError(e.to_string())
    }
}

/// Parses argv (program name first).
pub fn parse<I>(argv: I) -> Result<Args, UsageError>
where
    I: IntoIterator,
    I::Item: Into<OsString>,
{
    let mut parser = lexopt::Parser::from_iter(argv);
    let mut global = GlobalArgs::default();
    let command_name = loop {
        let Some(arg) = next(&mut parser)? else {
            return Err(UsageError(format!("no command given\n\n{HELP}")));
        };
        if parse_global(&arg, &mut parser, &mut global)? {
            continue;
        }
        let early = match arg {
            ref a if is_help(a) => Command::Help(None),
            Short('V') => Command::Version,
            Long(ref l) if l == "version" => Command::Version,
            Value(v) => break string(v, "command")?,
            other => return Err(unexpected(other)),
        };
        return Ok(Args {
            global,
            command: early,
        });
    };
    let command = match command_name.as_str() {
        "connect" => parse_connect(&mut parser, &mut global)?,
        "send" => parse_send(&mut parser, &mut global)?,
        "peers" => parse_peers(&mut parser, &mut global)?,
        "discover" => parse_discover(&mut parser, &mut global)?,
        "info" => parse_info(&mut parser, &mut global)?,
        "delegate" => parse_delegate(&mut parser, &mut global)?,
        "delegations" => parse_delegations(&mut parser, &mut global)?,
        "notify" => parse_notify(&mut parser, &mut global)?,
        "heartbeat" => parse_heartbeat(&mut parser, &mut global)?,
        "status" => parse_status(&mut parser, &mut global)?,
        "doctor" => parse_doctor(&mut parser, &mut global)?,
        "completions" => parse_completions(&mut parser, &mut global)?,
        "man" => match sub_args(&mut parser, &mut global, "man", 0, |_, _| Ok(false))? {
            Some(_) => Command::Man,
            None => help("man"),
        },
        "help" => {
            let topic = match next(&mut parser)? {
                Some(Value(v)) => Some(string(v, "help topic")?),
                Some(other) => return Err(unexpected(other)),
                None => None,
            };
            Command::Help(topic)
        }
        "version" => match sub_args(&mut parser, &mut global, "version", 0, |_, _| Ok(false))? {
            Some(_) => Command::Version,
            None => help("version"),
        },
        other => match tools::parse(other, &mut parser, &mut global) {
            Some(parsed) => parsed?,
            None => {
                return Err(UsageError(format!(
                    "unknown command {other:?} (commands: {}; see 'molecule --help')",
                    options::COMMANDS
                        .iter()
                        .map(|c| c.name)
                        .collect::<Vec<_>>()
                        .join(", ")
                )));
            }
        },
    };
    Ok(Args { global, command })
}

/// Handles one global option; `Ok(false)` if `arg` is not one.
fn parse_global(
    arg: &Arg,
    parser: &mut lexopt::Parser,
    g: &mut GlobalArgs,
) -> Result<bool, UsageError> {
    let Long(name) = arg else {
        return match arg {
            Short('v') => {
                g.verbosity = g.verbosity.saturating_add(1);
                Ok(true)
            }
            Short('q') => {
                g.verbosity = g.verbosity.saturating_sub(1);
                Ok(true)
            }
            _ => Ok(false),
        };
    };
    if !options::has(options::GLOBAL, name) {
        return Ok(false);
    }
    match name.as_str() {
        "api-url" => g.api_url = Some(string(parser.value()?, "--api-url")?),
        "workspace" => g.workspace = Some(string(parser.value()?, "--workspace")?),
        "token-file" => g.token_file = Some(PathBuf::from(parser.value()?)),
        "org-id" => g.org_id = Some(string(parser.value()?, "--org-id")?),
        "state-dir" => g.state_dir = Some(PathBuf::from(parser.value()?)),
        "allow-insecure-http" => g.allow_insecure_http = true,
        "ca-file" => g.ca_file = Some(PathBuf::from(parser.value()?)),
        "json" => g.json = true,
        "verbose" => g.verbosity = g.verbosity.saturating_add(1),
        "quiet" => g.verbosity = g.verbosity.saturating_sub(1),
        _ => return Ok(false),
    }
    Ok(true)
}

fn parse_connect(parser: &mut lexopt::Parser, g: &mut GlobalArgs) -> Result<Command, UsageError> {
    let mut a = ConnectArgs::default();
    while let Some(arg) = next(parser)? {
        if parse_global(&arg, parser, g)? {
            continue;
        }
        if is_help(&arg) {
            return Ok(help("connect"));
        }
        let name = match &arg {
            Long(l) if options::has(options::of("connect"), l) => l.clone(),
            Long(_) => return Err(UsageError(format!("connect: {}", unexpected(arg)))),
            _ => String::new(),
        };
        match (name.as_str(), arg) {
            ("backend", _) => a.backend = Some(string(parser.value()?, "--backend")?),
            ("backend-opt", _) => a
                .backend_opts
                .push(string(parser.value()?, "--backend-opt")?),
            ("token", _) => a.token = Some(string(parser.value()?, "--token")?),
            ("mode", _) => a.mode = Some(string(parser.value()?, "--mode")?),
            ("interval-ms", _) => a.interval_ms = Some(number(parser, "--interval-ms")?),
            ("since-secs", _) => a.since_secs = Some(number(parser, "--since-secs")?),
            ("heartbeat-secs", _) => a.heartbeat_secs = Some(number(parser, "--heartbeat-secs")?),
            ("drain-timeout", _) => a.drain_timeout_secs = Some(number(parser, "--drain-timeout")?),
            ("max-attempts", _) => a.max_attempts = Some(number(parser, "--max-attempts")?),
            ("reply-to-replies", _) => a.reply_to_replies = true,
            ("max-auto-replies", _) => {
                a.max_auto_replies = Some(number(parser, "--max-auto-replies")?)
            }
            ("concurrency", _) => a.concurrency = Some(number(parser, "--concurrency")?),
            ("once", _) => a.once = true,
            ("max-messages", _) => a.max_messages = Some(number(parser, "--max-messages")?),
            ("idle-exit", _) => a.idle_exit_secs = Some(number(parser, "--idle-exit")?),
            ("lock-wait", _) => a.lock_wait_secs = Some(number(parser, "--lock-wait")?),
            ("delegations-secs", _) => {
                a.delegations_secs = Some(number(parser, "--delegations-secs")?)
            }
            ("delegations-capacity", _) => {
                a.delegations_capacity = Some(number(parser, "--delegations-capacity")?)
            }
            ("workspaces", _) => a.workspaces = Some(PathBuf::from(parser.value()?)),
            ("card-file", _) => a.card_file = Some(PathBuf::from(parser.value()?)),
            ("broadcasts-secs", _) => {
                a.broadcasts_secs = Some(number(parser, "--broadcasts-secs")?)
            }
            ("wake", _) => a.wake = Some(string(parser.value()?, "--wake")?),
            ("safety-poll-secs", _) => {
                a.safety_poll_secs = Some(number(parser, "--safety-poll-secs")?)
            }
            ("rate-reserve", _) => a.rate_reserve = Some(number(parser, "--rate-reserve")?),
            ("dry-run", _) => a.dry_run = true,
            ("metrics-file", _) => a.metrics_file = Some(PathBuf::from(parser.value()?)),
            ("notification-fd", _) => {
                a.notification_fd = Some(number(parser, "--notification-fd")?)
            }
            (_, Value(v)) if a.workspace.is_none() => {
                a.workspace = Some(string(v, "workspace id")?)
            }
            (_, Value(v)) => {
                return Err(UsageError(format!(
                    "connect: unexpected argument {:?} (one workspace id expected)",
                    v.to_string_lossy()
                )));
            }
            (_, other) => return Err(UsageError(format!("connect: {}", unexpected(other)))),
        }
    }
    Ok(Command::Connect(a))
}

/// The shared loop of the agent-side commands: global options anywhere, `-h`/`--help`,
/// up to `max_positional` values, and the command's own long options through `flag`
/// (which returns `false` for an option it does not know). `Ok(None)` = help asked.
fn sub_args(
    parser: &mut lexopt::Parser,
    g: &mut GlobalArgs,
    cmd: &str,
    max_positional: usize,
    mut flag: impl FnMut(&str, &mut lexopt::Parser) -> Result<bool, UsageError>,
) -> Result<Option<Vec<String>>, UsageError> {
    let mut positional = Vec::new();
    while let Some(arg) = next(parser)? {
        // `-hello` or `-vh` is message text that looks like options, not `-h`: only
        // a lone short option counts as one.
        if let Short(c) = arg
            && let Some(rest) = parser.optional_value()
        {
            return Err(looks_like_option(
                cmd,
                &format!("-{c}{}", rest.to_string_lossy()),
            ));
        }
        if parse_global(&arg, parser, g)? {
            continue;
        }
        if is_help(&arg) {
            return Ok(None);
        }
        match arg {
            Long(ref l) => {
                if !options::has(options::of(cmd), l) || !flag(l, parser)? {
                    return Err(looks_like_option(cmd, &format!("--{l}")));
                }
            }
            // Short options reach `flag` as "-c" (e.g. download's -o).
            Short(c) => {
                let known = options::of(cmd).iter().any(|o| o.short == Some(c));
                if !known || !flag(&format!("-{c}"), parser)? {
                    return Err(looks_like_option(cmd, &format!("-{c}")));
                }
            }
            Value(v) if positional.len() < max_positional => {
                positional.push(string(v, &format!("{cmd} argument"))?);
            }
            Value(v) => {
                return Err(UsageError(format!(
                    "{cmd}: unexpected argument {:?} (see 'molecule {cmd} --help'; put -- before text that starts with -)",
                    v.to_string_lossy()
                )));
            }
        }
    }
    Ok(Some(positional))
}

/// An unknown option, which may well be message text starting with `-`.
fn looks_like_option(cmd: &str, arg: &str) -> UsageError {
    UsageError(format!(
        "{cmd}: unknown option {arg:?} (if it is text, put -- before it, or pass - and write the text to stdin; see 'molecule {cmd} --help')"
    ))
}

fn help(cmd: &str) -> Command {
    Command::Help(Some(cmd.to_string()))
}

fn parse_send(parser: &mut lexopt::Parser, g: &mut GlobalArgs) -> Result<Command, UsageError> {
    let mut a = SendArgs::default();
    let Some(pos) = sub_args(parser, g, "send", 2, |name, p| {
        match name {
            "message-id" => a.message_id = Some(string(p.value()?, "--message-id")?),
            "budget" => a.budget_secs = Some(number(p, "--budget")?),
            _ => return Ok(false),
        }
        Ok(true)
    })?
    else {
        return Ok(help("send"));
    };
    let mut pos = pos.into_iter();
    a.peer = pos.next();
    a.text = pos.next();
    Ok(Command::Send(a))
}

fn parse_peers(parser: &mut lexopt::Parser, g: &mut GlobalArgs) -> Result<Command, UsageError> {
    let mut a = PeersArgs::default();
    let Some(_) = sub_args(parser, g, "peers", 0, |name, p| {
        match name {
            "query" => a.query = Some(string(p.value()?, "--query")?),
            _ => return Ok(false),
        }
        Ok(true)
    })?
    else {
        return Ok(help("peers"));
    };
    Ok(Command::Peers(a))
}

fn parse_discover(parser: &mut lexopt::Parser, g: &mut GlobalArgs) -> Result<Command, UsageError> {
    let Some(pos) = sub_args(parser, g, "discover", 1, |_, _| Ok(false))? else {
        return Ok(help("discover"));
    };
    Ok(Command::Discover(DiscoverArgs {
        peer: pos.into_iter().next(),
    }))
}

fn parse_info(parser: &mut lexopt::Parser, g: &mut GlobalArgs) -> Result<Command, UsageError> {
    let Some(pos) = sub_args(parser, g, "info", 1, |_, _| Ok(false))? else {
        return Ok(help("info"));
    };
    Ok(Command::Info(InfoArgs {
        id: pos.into_iter().next(),
    }))
}

fn parse_delegate(parser: &mut lexopt::Parser, g: &mut GlobalArgs) -> Result<Command, UsageError> {
    let mut a = DelegateArgs::default();
    let Some(pos) = sub_args(parser, g, "delegate", 2, |name, p| {
        match name {
            "idempotency-key" => a.idempotency_key = Some(string(p.value()?, "--idempotency-key")?),
            "wait" => a.wait = true,
            "timeout" => a.timeout_secs = Some(number(p, "--timeout")?),
            _ => return Ok(false),
        }
        Ok(true)
    })?
    else {
        return Ok(help("delegate"));
    };
    let mut pos = pos.into_iter();
    a.target = pos.next();
    a.text = pos.next();
    Ok(Command::Delegate(a))
}

fn parse_delegations(
    parser: &mut lexopt::Parser,
    g: &mut GlobalArgs,
) -> Result<Command, UsageError> {
    let mut a = DelegationsArgs::default();
    let Some(_) = sub_args(parser, g, "delegations", 0, |name, p| {
        match name {
            "status" => {
                let s = string(p.value()?, "--status")?;
                if !DELEGATION_STATUSES.contains(&s.trim()) {
                    return Err(UsageError(format!(
                        "delegations: --status {s:?} is not a delegation status (one of: {})",
                        DELEGATION_STATUSES.join(", ")
                    )));
                }
                a.status = Some(s.trim().to_string());
            }
            _ => return Ok(false),
        }
        Ok(true)
    })?
    else {
        return Ok(help("delegations"));
    };
    Ok(Command::Delegations(a))
}

fn parse_notify(parser: &mut lexopt::Parser, g: &mut GlobalArgs) -> Result<Command, UsageError> {
    let mut a = NotifyArgs::default();
    let Some(pos) = sub_args(parser, g, "notify", 1, |name, p| {
        match name {
            "attach" => a.attach.push(string(p.value()?, "--attach")?),
            "file" => a.files.push(PathBuf::from(p.value()?)),
            _ => return Ok(false),
        }
        Ok(true)
    })?
    else {
        return Ok(help("notify"));
    };
    a.text = pos.into_iter().next();
    Ok(Command::Notify(a))
}

fn parse_heartbeat(parser: &mut lexopt::Parser, g: &mut GlobalArgs) -> Result<Command, UsageError> {
    let mut a = HeartbeatArgs::default();
    let Some(_) = sub_args(parser, g, "heartbeat", 0, |name, p| {
        match name {
            "current-task" => a.current_task = Some(string(p.value()?, "--current-task")?),
            "active-tasks" => a.active_tasks = Some(number(p, "--active-tasks")?),
            "error-rate" => a.error_rate = Some(decimal(p, "--error-rate")?),
            "sample-error" => a.sample_error = Some(string(p.value()?, "--sample-error")?),
            "uptime-secs" => a.uptime_secs = Some(number(p, "--uptime-secs")?),
            _ => return Ok(false),
        }
        Ok(true)
    })?
    else {
        return Ok(help("heartbeat"));
    };
    Ok(Command::Heartbeat(a))
}

fn parse_status(parser: &mut lexopt::Parser, g: &mut GlobalArgs) -> Result<Command, UsageError> {
    let mut stale_after = None;
    let mut prometheus = false;
    let Some(_) = sub_args(parser, g, "status", 0, |name, p| {
        match name {
            "stale-after" => stale_after = Some(number(p, "--stale-after")?),
            "format" => {
                prometheus = match string(p.value()?, "--format")?.as_str() {
                    "text" => false,
                    "prometheus" => true,
                    other => {
                        return Err(UsageError(format!(
                            "status: --format {other:?}: use text or prometheus"
                        )));
                    }
                }
            }
            _ => return Ok(false),
        }
        Ok(true)
    })?
    else {
        return Ok(help("status"));
    };
    Ok(Command::Status {
        stale_after,
        prometheus,
    })
}

fn parse_doctor(parser: &mut lexopt::Parser, g: &mut GlobalArgs) -> Result<Command, UsageError> {
    let mut a = DoctorArgs::default();
    let Some(_) = sub_args(parser, g, "doctor", 0, |name, p| {
        match name {
            "backend" => a.backend = Some(string(p.value()?, "--backend")?),
            "backend-opt" => a.backend_opts.push(string(p.value()?, "--backend-opt")?),
            _ => return Ok(false),
        }
        Ok(true)
    })?
    else {
        return Ok(help("doctor"));
    };
    Ok(Command::Doctor(a))
}

fn parse_completions(
    parser: &mut lexopt::Parser,
    g: &mut GlobalArgs,
) -> Result<Command, UsageError> {
    let Some(pos) = sub_args(parser, g, "completions", 1, |_, _| Ok(false))? else {
        return Ok(help("completions"));
    };
    match pos.into_iter().next() {
        Some(shell) if options::SHELLS.contains(&shell.as_str()) => Ok(Command::Completions(shell)),
        other => Err(UsageError(format!(
            "completions: {} (expected one of: {})",
            other.map_or("which shell?".to_string(), |s| format!(
                "unknown shell {s:?}"
            )),
            options::SHELLS.join(", ")
        ))),
    }
}

fn decimal(parser: &mut lexopt::Parser, flag: &str) -> Result<f64, UsageError> {
    let raw = string(parser.value()?, flag)?;
    raw.trim()
        .parse::<f64>()
        .ok()
        .filter(|v| v.is_finite())
        .ok_or_else(|| UsageError(format!("{flag}: {raw:?} is not a number")))
}

fn string(v: OsString, what: &str) -> Result<String, UsageError> {
    v.into_string().map_err(|v| {
        UsageError(format!(
            "{what}: {:?} is not valid UTF-8",
            v.to_string_lossy()
        ))
    })
}

/// Unsigned whole-number option types, with their largest value for the message.
trait Whole: std::str::FromStr {
    const MAX: u128;
}
impl Whole for u32 {
    const MAX: u128 = u32::MAX as u128;
}
impl Whole for u64 {
    const MAX: u128 = u64::MAX as u128;
}
impl Whole for usize {
    const MAX: u128 = usize::MAX as u128;
}

fn number<T: Whole>(parser: &mut lexopt::Parser, flag: &str) -> Result<T, UsageError> {
    let raw = string(parser.value()?, flag)?;
    let t = raw.trim();
    t.parse().map_err(|_| {
        let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
        if digits(t) {
            UsageError(format!(
                "{flag}: {raw} is out of range (at most {})",
                T::MAX
            ))
        } else if t.strip_prefix('-').is_some_and(digits) {
            UsageError(format!("{flag}: {raw} is out of range (at least 0)"))
        } else {
            UsageError(format!("{flag}: {raw:?} is not a valid whole number"))
        }
    })
}

/// `molecule --help`.
pub const HELP: &str = "\
molecule: attach a local AI agent to a Molecule AI workspace (poll mode)

Usage: molecule [GLOBAL OPTIONS] <COMMAND> [OPTIONS]

Commands:
  connect <workspace-id>   run the connector: register, heartbeat, poll the inbox,
                           hand each message to a backend, post the reply
  send <peer-id> TEXT|-    send one message to a peer; print its reply (or queued)
  peers                    list the workspaces this one may talk to
  discover <peer-id>       check that a peer exists and may be talked to
  info [<workspace-id>]    show a workspace's platform record (default: own)
  delegate <target-id> TEXT|-
                           hand a task to another workspace; --wait for the result
  delegations              list delegations sent and received
  notify TEXT|-            send a message to the human on the canvas
  heartbeat                send one heartbeat (agents driven by cron)
  status                   show what the connector's state file says
  doctor                   check configuration, reachability, auth and poll support
  memory commit|search|namespaces|delete
                           remember across runs (the platform's memory plugin)
  ask TITLE                ask the human (or an agent) for an approval or a task;
                           --wait for the answer
  requests                 list requests raised (or --inbox: received)
  request show|respond|message|cancel <request-id>
                           one request and its thread
  history                  a conversation (--peer ID or --canvas), oldest first
  card update              change what the agent card says
  broadcast TEXT|-         message every workspace of the org
  download URI             fetch a file uploaded to this workspace
  completions bash|zsh|fish
                           print a shell completion script
  man                      print the man page (roff): molecule man | man -l -
  help [COMMAND]           show help for a command
  version                  print the version

The agent-side commands (send ... doctor) act for the workspace given by --workspace
or MOLECULE_WORKSPACE_ID.

Global options (accepted before or after the command; flag > env > default):
  --api-url URL            platform base URL                  [env MOLECULE_API_URL]
  --workspace ID           own workspace id (UUID)            [env MOLECULE_WORKSPACE_ID]
  --token-file PATH        read the workspace token from PATH [env MOLECULE_WORKSPACE_TOKEN_FILE]
                           (or put the token itself in env MOLECULE_WORKSPACE_TOKEN)
  --org-id ID              send X-Molecule-Org-Id (SaaS)      [env MOLECULE_ORG_ID]
  --state-dir DIR          where cursor state lives           [env MOLECULE_STATE_DIR]
                           default $XDG_CONFIG_HOME/molecule/state or ~/.config/molecule/state
  --allow-insecure-http    allow sending the token over plain http:// to a non-loopback host
  --ca-file PATH           trust the CA certificates (PEM) in PATH (a private CA)
                           [env MOLECULE_CA_FILE, else SSL_CERT_FILE]
  --json                   machine-readable output on stdout
  -v, --verbose            more logging (repeat for more)     [env MOLECULE_LOG=debug|info|...]
  -q, --quiet              less logging
  -h, --help               this help
  -V, --version            print the version

Logs go to stderr, never stdout. HTTP(S)_PROXY, ALL_PROXY and NO_PROXY are honoured.

Exit codes: 0 done or clean stop; 1 runtime failure; 2 usage or configuration error;
3 credentials rejected; 4 workspace removed or unknown; 5 platform too old (no poll mode);
75 platform unreachable after the retry budget (try again later).
";

/// The environment every agent-side command reads, for the per-command help.
macro_rules! agent_env {
    () => {
        "
Environment (or the matching global option, see 'molecule --help'):
  MOLECULE_API_URL               platform base URL                   (--api-url)
  MOLECULE_WORKSPACE_ID          own workspace id (UUID)             (--workspace)
  MOLECULE_WORKSPACE_TOKEN_FILE  file holding the workspace token    (--token-file)
  MOLECULE_WORKSPACE_TOKEN       the token itself
  MOLECULE_ORG_ID                X-Molecule-Org-Id for SaaS          (--org-id)
  MOLECULE_LOG                   log level on stderr                 (-v / -q)
A 401 re-reads the token file once and retries; if the token did not change the
command exits 3 with how to rotate it (4 if the workspace was removed).
--json prints exactly one JSON document on stdout, also on failure:
{\"ok\":false,\"error\":\"...\",\"exit_code\":N}. Logs and errors go to stderr.
"
    };
}

/// `molecule send --help`.
pub const SEND_HELP: &str = concat!(
    "\
molecule send: send one A2A message to a peer workspace and print its reply

Usage: molecule send <peer-id> TEXT [OPTIONS]
       molecule send <peer-id> - [OPTIONS]      (read the message from stdin)

Posts a JSON-RPC message/send (role user, kind text parts) to the peer through the
platform's A2A proxy. A push-mode peer's reply text is printed. A poll-mode or busy
peer makes the platform queue the message: that is success, printed as \"queued\",
and the peer's answer arrives later as a new message to this workspace.

Transport errors, timeouts, 429, 5xx (a 503 for a restarting or waking peer) are
retried with exponential backoff (1, 2, 4, 8, 16 s, +-25 % jitter; Retry-After is
honoured as a minimum) inside the --budget; every retry reuses the same messageId, so
the platform drops duplicates. Never retried: a 502 with delivery_confirmed (the peer
got it), a busy 503, and every other 4xx. Stdin is read up to 16 MiB; one trailing
newline is dropped.

Options:
  --message-id ID          messageId to use (default: a fresh UUID); reuse it when
                           re-running a send so the platform deduplicates it
  --budget SECS            total time for all attempts, waits included [default: 600]

Exit codes: 0 reply printed or queued; 1 the peer or platform refused (JSON-RPC error,
403 hierarchy rules, 404 no such workspace, busy 503, 502 delivered but the answer was
lost, other 4xx); 2 bad input (not a UUID, empty text, over 16 MiB or 413, unreadable
stdin); 3 token rejected; 4 workspace removed (410); 75 still failing when the budget
ran out (the last error is printed).
",
    agent_env!()
);

/// `molecule peers --help`.
pub const PEERS_HELP: &str = concat!(
    "\
molecule peers: list the workspaces this one may talk to

Usage: molecule peers [--query TEXT]

Lists siblings, children and the parent (GET /registry/<own>/peers). An empty list
says why; a failure says what the platform answered (401, 403, 404, 5xx, unreachable).
With --json the output is the platform's array as is.

Options:
  --query TEXT             only peers whose name or role contains TEXT
",
    agent_env!()
);

/// `molecule discover --help`.
pub const DISCOVER_HELP: &str = concat!(
    "\
molecule discover: check that a peer exists and that this workspace may talk to it

Usage: molecule discover <peer-id>

Asks GET /registry/discover/<peer-id>. Exit 0 if the peer exists and the hierarchy
rules allow talking to it; 1 if it does not exist (404) or may not be reached (403);
75 if it is not available right now or the platform is unreachable. The URL in the
answer is informational: messages always go through the platform (molecule send).
",
    agent_env!()
);

/// `molecule info --help`.
pub const INFO_HELP: &str = concat!(
    "\
molecule info: show a workspace's platform record

Usage: molecule info [<workspace-id>]

GET /workspaces/<id> for the given id, or this workspace. A removed workspace prints
\"removed\" with the platform's hint and exits 4; an unknown one exits 4 too.
",
    agent_env!()
);

/// `molecule delegate --help`.
pub const DELEGATE_HELP: &str = concat!(
    "\
molecule delegate: hand a task to another workspace through the platform

Usage: molecule delegate <target-id> TEXT|- [OPTIONS]

POST /workspaces/<own>/delegate. Prints the delegation id (and \"idempotent_hit\" when
the --idempotency-key matched an earlier delegation that has not failed). With --wait,
polls GET /workspaces/<own>/delegations every 1-2 s until the delegation is completed
or failed (\"stuck\" is still in flight) and prints the result.

Options:
  --idempotency-key KEY    the platform returns the existing delegation for a repeated
                           KEY instead of starting a new one (unless it failed)
  --wait                   wait for the result
  --timeout SECS           how long --wait waits               [default: 600]

Exit codes: 0 delegated, or with --wait completed (the result is printed); 1 the
delegation failed (its error is printed) or the platform refused it; 2 bad input;
3 token rejected; 4 own workspace removed or unknown; 75 --wait timed out (the
delegation may still finish: see molecule delegations) or the platform is unreachable.
",
    agent_env!()
);

/// The statuses a delegation can have (§API-2.14: activity log and ledger).
pub(crate) const DELEGATION_STATUSES: &[&str] = &[
    "pending",
    "dispatched",
    "queued",
    "in_progress",
    "stuck",
    "completed",
    "failed",
];

/// `molecule delegations --help`.
pub const DELEGATIONS_HELP: &str = concat!(
    "\
molecule delegations: list this workspace's delegations, newest first

Usage: molecule delegations [--status STATUS]

GET /workspaces/<own>/delegations (the platform keeps the newest 50). A table for
people; with --json the platform's array as is.

Options:
  --status STATUS          only entries with this status (pending, dispatched,
                           queued, in_progress, stuck, completed, failed)
",
    agent_env!()
);

/// `molecule notify --help`.
pub const NOTIFY_HELP: &str = concat!(
    "\
molecule notify: send a message to the human on the canvas

Usage: molecule notify TEXT|- [--file PATH]... [--attach URI[,NAME]]...

POST /workspaces/<own>/notify. Every call is a new chat message (no dedupe).

Options:
  --file PATH              attach a local file (repeatable): all files are checked
                           first (at most 10, each at most 100 MiB and not empty,
                           100 MiB in total), uploaded in one request
                           (POST /chat/uploads), then sent with the message
  --attach URI[,NAME]      attach a file already uploaded to the platform, by URI;
                           NAME defaults to the last part of the URI (repeatable;
                           everything after the first comma is the name)

Exit codes: 0 sent; 1 refused (403 talk_to_user_disabled prints the platform's hint:
forward the update to a parent workspace with molecule delegate); 2 bad input;
3 token rejected; 4 own workspace unknown; 75 platform unreachable.
",
    agent_env!()
);

/// `molecule heartbeat --help`.
pub const HEARTBEAT_HELP: &str = concat!(
    "\
molecule heartbeat: send one heartbeat for this workspace

Usage: molecule heartbeat [OPTIONS]

POST /registry/heartbeat once, with runtime_metadata and only the fields given (no
runtime_state): for agents that run from cron instead of molecule connect. The
platform marks a workspace awaiting_agent 180 s after its last heartbeat.

Options:
  --current-task TEXT      what the agent is working on (empty = idle)
  --active-tasks N         tasks in progress
  --error-rate R           recent failure rate, 0.0 to 1.0 (>= 0.5 shows degraded)
  --sample-error TEXT      the last error, shown for a degraded workspace
  --uptime-secs N          seconds the agent has been up (omitted unless given)
",
    agent_env!()
);

/// `molecule status --help`.
pub const STATUS_HELP: &str = "\
molecule status: is the connector for this workspace alive and working?

Usage: molecule status [--stale-after SECS] [--format text|prometheus] [--json]

Reads <state-dir>/<workspace-id>.status.json, which molecule connect rewrites about once
a second: state (running or stopped, and why), last successful poll and heartbeat, the
cursor, handled / failed / dead-lettered counts, messages in flight, the last error and
the wedged flag; plus the saved cursor from <workspace-id>.json. No network.

The connector counts as stale when it is not running (its process is gone or it
stopped), or its last successful poll is older than --stale-after seconds (default:
three poll intervals, at least 3 s, plus the 5 s the connector may take to refresh the
file while idle). Use it as a health check from cron, a systemd
timer or a Kubernetes exec probe.

Options:
  --stale-after SECS   how old the last successful poll may be
  --format prometheus  print the connector's metrics in the Prometheus text format
                       instead (the same as connect --metrics-file; molecule_up is 1
                       only when the check passes); the exit code is unchanged

Exit codes: 0 running and fresh; 1 stale, stopped or no status file; 2 bad
configuration or corrupt state file.

Environment: MOLECULE_WORKSPACE_ID (--workspace), MOLECULE_STATE_DIR (--state-dir),
XDG_CONFIG_HOME, HOME. --json prints one JSON document on stdout.
";

/// `molecule doctor --help`.
pub const DOCTOR_HELP: &str = concat!(
    "\
molecule doctor: check that this host can run molecule connect for the workspace

Usage: molecule doctor [--backend NAME] [--backend-opt KEY=VALUE]...

One line per check, \"ok   name: detail\" or \"FAIL name: detail\" (\"skip\" when an
earlier failure makes a check meaningless):
  config     URL, workspace id, token and state dir are present and sane; names
             this binary (molecule --version)
  dns, tcp   the platform's host resolves and its port accepts a connection
  tls/http   GET /health answers
  auth       the token is accepted (GET /workspaces/<id>/activity)
  poll-mode  register answers delivery_mode \"poll\" (register is idempotent: it is
             what molecule connect does on start)
  cursor     an unknown since_id answers 410, as poll mode needs
  events     the workspace's event stream opens (connect wakes on it); skipped when
             the platform has none (404: connect polls instead)
  state-dir  the state dir is writable (a temporary file is created and removed)
  backend    only with --backend/--backend-opt: the backend's command is found;
             for `worker` the worker is also started, seen ready (ready=true) or
             answering one probe request (method \"doctor/probe\"), and stopped

Exit codes: 0 every check passed; 1 at least one failed.
",
    agent_env!()
);

/// `molecule connect --help`.
pub const CONNECT_HELP: &str = "\
molecule connect: run the poll-mode connector for one workspace

Usage: molecule connect <workspace-id> [OPTIONS]

Registers the workspace in poll mode, sends a heartbeat on its own thread, polls the
workspace's inbox for A2A messages, hands each one to the backend and posts the reply:
to a peer agent as a new message/send, to the user on the canvas through /notify. A
message counts as handled only once its reply is posted (or it was deliberately not
answered, or dead-lettered), and that is journaled (fsync) before the cursor moves, so a
crash never loses a message. SIGTERM or SIGINT stops cleanly (exit 0); a second signal
forces.

Modes:
  long-running (default)   under systemd, runit, s6 or a container: answers as messages
                           arrive; the supervisor restarts it on exit 1 or 75
  --once                   from cron: register, heartbeat once, answer everything that is
                           pending (all pages), save, exit 0; a run that finds another
                           connector holding the lock exits 0 at once (see --lock-wait)
  --max-messages N         stop (exit 0) after N messages
  --idle-exit SECS         stop (exit 0) after SECS without any message
  --workspaces FILE        many workspaces in one process, instead of <workspace-id>: FILE
                           is a JSON list of {id, token_file, api_url?, backend?,
                           backend_opts?: {KEY: VALUE}}; the other options apply to all.
                           Each workspace has its own threads, state file, lock and
                           backend; one that stops (token revoked, removed) does not stop
                           the others

Options:
  --backend NAME           exec | claude-code | worker | mock     [default: claude-code]
  --backend-opt KEY=VALUE  backend option, repeatable:
                             exec:        cmd=SHELL-COMMAND (required), timeout=60s,
                                          max_output=1048576, format=text|json,
                                          pass_meta=false, kill_grace=2s
                             claude-code: bin=claude, args=..., timeout=5m, pass_meta=true
                             worker:      cmd=SHELL-COMMAND (required), workers=N
                                          (--concurrency / max_in_flight), max_in_flight=1,
                                          timeout=60s, kill_grace=2s, max_output=1048576
                                          (per answer), ready=false, start_timeout=30s
                             mock:        reply='echo: %s'
  --token TOKEN            workspace token (visible in ps: prefer --token-file or
                           env MOLECULE_WORKSPACE_TOKEN)
  --mode poll              delivery mode; only poll is supported
  --wake MODE              auto | events | poll                         [default: auto]
                           auto: keep the workspace's event stream open and poll at once
                           when it says a message was logged; blind polls only every
                           --safety-poll-secs while it is healthy; --interval-ms polling
                           while it is down or the platform has none (404). events: the
                           same, but a platform without a stream is an error (exit 5).
                           poll: no stream, poll every --interval-ms
  --safety-poll-secs N     blind poll period while the event stream is healthy (catches
                           dropped events)                                 [default: 30]
  --rate-reserve PCT       share of the platform's rate bucket (org or token) left to
                           other clients; requests are spent heartbeats first, then
                           replies/notifies/acks, then polls (stretched, in turn across
                           workspaces), from what X-RateLimit-Remaining says [default: 30]
  --interval-ms N          pause between polls when the inbox is empty and there is no
                           healthy event stream                          [default: 1000]
  --since-secs N           first start (no cursor) or after a pruned cursor (410): look
                           back N seconds                                [default: 30]
  --heartbeat-secs N       heartbeat period                              [default: 20]
  --max-attempts N         backend tries per message before giving up    [default: 3]
  --drain-timeout SECS     on SIGTERM, let running backends finish this long [default: 30]
  --concurrency N          backend runs at once, across different senders (messages from
                           one sender stay strictly in order)                [default: 1]
                           (worker backend: workers x max_in_flight)
  --reply-to-replies       also post answers to messages that are themselves replies
                           (off by default: two auto-replying agents would loop forever)
  --max-auto-replies N     second loop guard, for --reply-to-replies: at most N answers in
                           a row to replies, per peer conversation (peer + contextId); a
                           fresh message or 10 quiet minutes reset it; 0 = no cap
                                                                             [default: 20]
  --lock-wait SECS         if another connector holds this workspace's lock, wait up to
                           SECS for it; then (or at once, by default) a --once run exits
                           0 and a long-running one exits 2                 [default: 0]
  --delegations-secs SECS  check the results of delegations this workspace sent every
                           SECS (and at once when a delegate_result row arrives); each
                           completed/failed one is logged and handed to the backend once;
                           0 = off                                            [default: 30]
  --delegations-capacity N delivered delegation ids remembered across restarts (oldest
                           forgotten first; at least 64)                    [default: 1024]
  --broadcasts-secs SECS   broadcasts to the org: each is handed to the backend once
                           (MOLECULE_ORIGIN=broadcast) and never answered. With the
                           event stream up they are read when their event arrives
                           (full text) and cost nothing while idle; otherwise every
                           SECS (text cut at 120 characters by the platform);
                           0 = off                                            [default: 60]
  --card-file FILE         a JSON agent card (object) sent on register instead of the
                           built-in one (name, description, skills...; url is removed,
                           poll mode has none)
  --dry-run                check configuration and backend, print a summary, exit
  --metrics-file PATH      write Prometheus metrics (text format, for node_exporter's
                           textfile collector: name it *.prom) to PATH, replaced
                           atomically every 5 s and at exit; one file per process
  --notification-fd FD     s6 readiness: write a newline to FD once ready (put the same
                           number in the service directory's notification-fd file)

Supervisors: with NOTIFY_SOCKET set (systemd Type=notify) the connector sends READY=1
once registered and the first poll succeeded (with --workspaces: once every workspace
has, or has failed for good), STATUS= on change, RELOADING=1 ... READY=1 around a
SIGHUP token re-read, STOPPING=1 with EXTEND_TIMEOUT_USEC when the drain starts, and,
when WATCHDOG_USEC is set (WatchdogSec=), WATCHDOG=1 at half that period only while
every poll and heartbeat loop is making progress: a loop busy in one step for longer
than that stops the pings, and systemd restarts the service (WATCHDOG_PID, when set,
must be this process). The exec backend's agent does not inherit these variables.

The exec backend runs `/bin/sh -c CMD` in its own process group with the message on
stdin; stdout (trailing newline trimmed) is the reply. Exit 0 = reply (empty output =
no reply), 100 = handled, post nothing, 75 = retry later, anything else = failure.
Its environment has MOLECULE_WORKSPACE_ID, MOLECULE_API_URL, MOLECULE_CALLER_ID,
MOLECULE_CALLER_NAME, MOLECULE_CALLER_ROLE (when known), MOLECULE_ORIGIN
(peer|canvas|delegation_result|request_update|broadcast), MOLECULE_MESSAGE_ID,
MOLECULE_ACTIVITY_ID, MOLECULE_CONTEXT_ID, MOLECULE_ATTEMPT, MOLECULE_ATTACHMENTS
(JSON list of the message's files: uri, name, mimeType, size; fetch a
platform-pending: URI with 'molecule download'), MOLECULE_DELEGATION_ID for a
delegation result, MOLECULE_REQUEST_ID for a request_update. The output of a
delegation_result, request_update (the platform's notice that a request was
answered, discussed, or is waiting: messageId request-responded:, request-message:,
inbox-nudge-) or broadcast is never posted anywhere.

The worker backend starts CMD once per worker (own process group, MOLECULE_WORKSPACE_ID
and MOLECULE_API_URL set) and talks NDJSON: a line {\"id\":\"7\",\"text\":...,<the whole
request as exec's format=json gives it>} on its stdin; a line {\"id\":\"7\",\"text\":...}
(and/or \"parts\"), {\"id\":\"7\",\"no_reply\":true}, {\"id\":\"7\",\"retry_later\":true} or
{\"id\":\"7\",\"error\":\"...\"} on its stdout, in any order. Its stderr goes to our log. With
ready=true no request is sent before its first line {\"ready\":true}. A worker past its
timeout is killed and started afresh; one that exits is restarted with a backoff.

Files in the state dir: <id>.json (cursor: workspace_id, last_since_id; handled ids;
pending replies), <id>.journal (changes since the last checkpoint), <id>.lock (one
connector per workspace), <id>.status.json (for 'molecule status' and watchdogs),
<id>.deadletter.jsonl (messages given up on), <id>.broadcasts.json (broadcast
cursor and ids delivered), <id>.delegations.jsonl (one line per
delegation result), <id>.delegations.state.json (results delivered or pending).

Global options (--api-url, --token-file, --state-dir, ...): see 'molecule --help'.
";

/// `molecule completions --help`.
pub const COMPLETIONS_HELP: &str = "\
molecule completions: print a shell completion script

Usage: molecule completions bash|zsh|fish

Completes commands, options and the values of --backend, --mode and path options.
Generated from the same option tables the parser uses. Install:
  bash  molecule completions bash > /etc/bash_completion.d/molecule
        (or ~/.local/share/bash-completion/completions/molecule)
  zsh   molecule completions zsh > \"${fpath[1]}/_molecule\"
  fish  molecule completions fish > ~/.config/fish/completions/molecule.fish
";

/// `molecule man --help`.
pub const MAN_HELP: &str = "\
molecule man: print the man page

Usage: molecule man

Prints molecule(1) in roff, generated from the same option tables the parser uses
(the release archives ship it as molecule.1). Read it with: molecule man | man -l -
";

/// Help text for `topic`, or `None` if there is no such command.
pub fn help_for(topic: Option<&str>) -> Option<&'static str> {
    match topic {
        None | Some("help") | Some("version") => Some(HELP),
        Some("connect") => Some(CONNECT_HELP),
        Some("send") => Some(SEND_HELP),
        Some("peers") => Some(PEERS_HELP),
        Some("discover") => Some(DISCOVER_HELP),
        Some("info") => Some(INFO_HELP),
        Some("delegate") => Some(DELEGATE_HELP),
        Some("delegations") => Some(DELEGATIONS_HELP),
        Some("notify") => Some(NOTIFY_HELP),
        Some("heartbeat") => Some(HEARTBEAT_HELP),
        Some("status") => Some(STATUS_HELP),
        Some("doctor") => Some(DOCTOR_HELP),
        Some("completions") => Some(COMPLETIONS_HELP),
        Some("man") => Some(MAN_HELP),
        Some(other) => tools::help_for(other),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(args: &[&str]) -> Result<Args, UsageError> {
        parse(std::iter::once("molecule").chain(args.iter().copied()))
    }

    const PEER_ID: &str = "22222222-2222-4222-8222-222222222222";

    #[test]
    fn text_that_looks_like_an_option_is_not_help() {
        for cmd in [&["send", PEER_ID][..], &["notify"], &["delegate", PEER_ID]] {
            for text in ["-hello", "-h1", "-vh", "--hello", "-x"] {
                let mut argv = cmd.to_vec();
                argv.push(text);
                let e = p(&argv).unwrap_err();
                assert!(e.0.contains("put -- before it"), "{argv:?}: {e}");
                assert!(e.0.contains(text), "{argv:?}: {e}");
            }
            let mut argv = cmd.to_vec();
            argv.extend(["--", "-hello"]);
            assert!(!matches!(p(&argv).unwrap().command, Command::Help(_)));
            let mut argv = cmd.to_vec();
            argv.push("-h");
            assert!(matches!(p(&argv).unwrap().command, Command::Help(_)));
        }
        let a = p(&["send", PEER_ID, "--", "-hello"]).unwrap();
        let Command::Send(s) = a.command else {
            panic!()
        };
        assert_eq!(s.text.as_deref(), Some("-hello"));
    }

    #[test]
    fn numbers_out_of_range_say_so() {
        let e = p(&["heartbeat", "--active-tasks", "99999999999"]).unwrap_err();
        assert!(e.0.contains("out of range (at most 4294967295)"), "{e}");
        let e = p(&["heartbeat", "--active-tasks", "-1"]).unwrap_err();
        assert!(e.0.contains("out of range (at least 0)"), "{e}");
        let e = p(&["send", PEER_ID, "hi", "--budget", "abc"]).unwrap_err();
        assert!(e.0.contains("not a valid whole number"), "{e}");
        let e = p(&["delegations", "--status", "bogus"]).unwrap_err();
        assert!(e.0.contains("pending, dispatched"), "{e}");
    }

    #[test]
    fn no_args_is_usage_error() {
        let e = p(&[]).unwrap_err();
        assert!(
            e.0.starts_with("no command given") && e.0.contains("Commands:"),
            "{e}"
        );
        assert_eq!(p(&["--help"]).unwrap().command, Command::Help(None));
        assert_eq!(
            p(&["connect", "--help"]).unwrap().command,
            Command::Help(Some("connect".into()))
        );
        assert_eq!(
            p(&["help", "connect"]).unwrap().command,
            Command::Help(Some("connect".into()))
        );
    }

    #[test]
    fn globals_before_or_after_command() {
        let a = p(&["--api-url", "http://x", "connect", "abc"]).unwrap();
        let b = p(&["connect", "abc", "--api-url", "http://x"]).unwrap();
        assert_eq!(a, b);
        assert_eq!(a.global.api_url.as_deref(), Some("http://x"));
        match a.command {
            Command::Connect(c) => assert_eq!(c.workspace.as_deref(), Some("abc")),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn connect_flags() {
        let a = p(&[
            "connect",
            "ws",
            "--backend",
            "exec",
            "--backend-opt",
            "cmd=cat",
            "--backend-opt",
            "timeout=5s",
            "--interval-ms=250",
            "--since-secs",
            "60",
            "--dry-run",
            "-vv",
        ])
        .unwrap();
        assert_eq!(a.global.verbosity, 2);
        let Command::Connect(c) = a.command else {
            panic!()
        };
        assert_eq!(c.backend.as_deref(), Some("exec"));
        assert_eq!(c.backend_opts, ["cmd=cat", "timeout=5s"]);
        assert_eq!(c.interval_ms, Some(250));
        assert_eq!(c.since_secs, Some(60));
        assert!(c.dry_run);
    }

    #[test]
    fn agent_commands_parse() {
        let a = p(&[
            "send",
            "peer",
            "-",
            "--budget=3",
            "--json",
            "--message-id",
            "m",
        ])
        .unwrap();
        assert!(a.global.json);
        assert_eq!(
            a.command,
            Command::Send(SendArgs {
                peer: Some("peer".into()),
                text: Some("-".into()),
                message_id: Some("m".into()),
                budget_secs: Some(3),
            })
        );
        // Text that starts with a dash goes after `--`.
        let Command::Send(s) = p(&["send", "peer", "--", "-5 degrees"]).unwrap().command else {
            panic!()
        };
        assert_eq!(s.text.as_deref(), Some("-5 degrees"));
        let Command::Delegate(d) = p(&[
            "delegate",
            "t",
            "task",
            "--wait",
            "--timeout",
            "9",
            "--idempotency-key",
            "k",
        ])
        .unwrap()
        .command
        else {
            panic!()
        };
        assert!(d.wait);
        assert_eq!(
            (d.timeout_secs, d.idempotency_key.as_deref()),
            (Some(9), Some("k"))
        );
        let Command::Heartbeat(h) = p(&["heartbeat", "--error-rate", "0.5", "--active-tasks", "2"])
            .unwrap()
            .command
        else {
            panic!()
        };
        assert_eq!((h.error_rate, h.active_tasks), (Some(0.5), Some(2)));
        let Command::Notify(n) = p(&["notify", "hi", "--attach", "u,n", "--attach", "v"])
            .unwrap()
            .command
        else {
            panic!()
        };
        assert_eq!(n.attach, ["u,n", "v"]);
        assert_eq!(
            p(&["status"]).unwrap().command,
            Command::Status {
                stale_after: None,
                prometheus: false
            }
        );
        assert_eq!(
            p(&["status", "--stale-after", "9", "--format", "prometheus"])
                .unwrap()
                .command,
            Command::Status {
                stale_after: Some(9),
                prometheus: true
            }
        );
        assert!(p(&["status", "--format", "yaml"]).is_err());
        assert_eq!(
            p(&["info"]).unwrap().command,
            Command::Info(InfoArgs::default())
        );
        for cmd in ["send", "peers", "delegate", "doctor", "status"] {
            assert_eq!(
                p(&[cmd, "--help"]).unwrap().command,
                Command::Help(Some(cmd.into()))
            );
            assert!(help_for(Some(cmd)).is_some());
        }
    }

    #[test]
    fn agent_command_errors() {
        assert!(
            p(&["send", "a", "b", "c"])
                .unwrap_err()
                .0
                .contains("unexpected argument")
        );
        assert!(p(&["peers", "x"]).is_err());
        assert!(p(&["peers", "--nope"]).unwrap_err().0.contains("--nope"));
        assert!(p(&["heartbeat", "--error-rate", "lots"]).is_err());
        assert!(p(&["heartbeat", "--error-rate", "NaN"]).is_err());
        assert!(p(&["send", "a", "b", "--budget", "-1"]).is_err());
        assert!(p(&["delegate", "a", "b", "--wait=yes"]).is_err());
    }

    #[test]
    fn errors_are_usage_errors() {
        assert!(
            p(&["frobnicate"])
                .unwrap_err()
                .0
                .contains("unknown command")
        );
        assert!(p(&["connect", "--nope"]).is_err());
        assert!(
            p(&["connect", "a", "b"])
                .unwrap_err()
                .0
                .contains("unexpected argument")
        );
        let e = p(&["connect", "--interval-ms", "fast"]).unwrap_err();
        assert!(e.0.contains("--interval-ms"), "{}", e.0);
        assert!(p(&["connect", "--interval-ms", "-5"]).is_err());
        assert!(p(&["connect", "--backend"]).is_err());
    }
}
