//! The command line: a lexopt loop that turns argv into raw `Args`, plus the help
//! texts. Checks only what the user typed (syntax, numbers); reads no env, files or
//! network: `config.rs` resolves and validates.

use std::ffi::OsString;
use std::fmt;
use std::path::PathBuf;

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
    /// `--dry-run`.
    pub dry_run: bool,
}

/// What to do.
#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    /// Print help: general, or for the named command.
    Help(Option<String>),
    /// Print the version.
    Version,
    /// Run the connector.
    Connect(ConnectArgs),
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
#[derive(Debug)]
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

/// Commands that exist, for the "unknown command" message.
const COMMANDS: &[&str] = &["connect", "help", "version"];

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
            return Ok(Args {
                global,
                command: Command::Help(None),
            });
        };
        if parse_global(&arg, &mut parser, &mut global)? {
            continue;
        }
        match arg {
            Short('h') => {
                return Ok(Args {
                    global,
                    command: Command::Help(None),
                });
            }
            Long(ref l) if l == "help" => {
                return Ok(Args {
                    global,
                    command: Command::Help(None),
                });
            }
            Short('V') => {
                return Ok(Args {
                    global,
                    command: Command::Version,
                });
            }
            Long(ref l) if l == "version" => {
                return Ok(Args {
                    global,
                    command: Command::Version,
                });
            }
            Value(v) => break string(v, "command")?,
            other => return Err(unexpected(other)),
        }
    };
    let command = match command_name.as_str() {
        "connect" => parse_connect(&mut parser, &mut global)?,
        "help" => {
            let topic = match next(&mut parser)? {
                Some(Value(v)) => Some(string(v, "help topic")?),
                Some(other) => return Err(unexpected(other)),
                None => None,
            };
            Command::Help(topic)
        }
        "version" => Command::Version,
        other => {
            return Err(UsageError(format!(
                "unknown command {other:?} (commands: {}; see 'molecule --help')",
                COMMANDS.join(", ")
            )));
        }
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
    match name.as_str() {
        "api-url" => g.api_url = Some(string(parser.value()?, "--api-url")?),
        "workspace" => g.workspace = Some(string(parser.value()?, "--workspace")?),
        "token-file" => g.token_file = Some(PathBuf::from(parser.value()?)),
        "org-id" => g.org_id = Some(string(parser.value()?, "--org-id")?),
        "state-dir" => g.state_dir = Some(PathBuf::from(parser.value()?)),
        "allow-insecure-http" => g.allow_insecure_http = true,
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
        let name = match &arg {
            Short('h') => "help".to_string(),
            Long(l) => l.clone(),
            _ => String::new(),
        };
        match (name.as_str(), arg) {
            ("help", _) => return Ok(Command::Help(Some("connect".into()))),
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
            ("dry-run", _) => a.dry_run = true,
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

fn string(v: OsString, what: &str) -> Result<String, UsageError> {
    v.into_string().map_err(|v| {
        UsageError(format!(
            "{what}: {:?} is not valid UTF-8",
            v.to_string_lossy()
        ))
    })
}

fn number<T: std::str::FromStr>(parser: &mut lexopt::Parser, flag: &str) -> Result<T, UsageError> {
    let raw = string(parser.value()?, flag)?;
    raw.trim()
        .parse()
        .map_err(|_| UsageError(format!("{flag}: {raw:?} is not a valid whole number")))
}

/// `molecule --help`.
pub const HELP: &str = "\
molecule: attach a local AI agent to a Molecule AI workspace (poll mode)

Usage: molecule [GLOBAL OPTIONS] <COMMAND> [OPTIONS]

Commands:
  connect <workspace-id>   run the connector: register, heartbeat, poll the inbox,
                           hand each message to a backend, post the reply
  help [COMMAND]           show help for a command
  version                  print the version

Global options (accepted before or after the command; flag > env > default):
  --api-url URL            platform base URL                  [env MOLECULE_API_URL]
  --workspace ID           own workspace id (UUID)            [env MOLECULE_WORKSPACE_ID]
  --token-file PATH        read the workspace token from PATH [env MOLECULE_WORKSPACE_TOKEN_FILE]
                           (or put the token itself in env MOLECULE_WORKSPACE_TOKEN)
  --org-id ID              send X-Molecule-Org-Id (SaaS)      [env MOLECULE_ORG_ID]
  --state-dir DIR          where cursor state lives           [env MOLECULE_STATE_DIR]
                           default $XDG_CONFIG_HOME/molecule/state or ~/.config/molecule/state
  --allow-insecure-http    allow sending the token over plain http:// to a non-loopback host
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

/// `molecule connect --help`.
pub const CONNECT_HELP: &str = "\
molecule connect: run the poll-mode connector for one workspace

Usage: molecule connect <workspace-id> [OPTIONS]

Registers the workspace in poll mode, sends a heartbeat on its own thread, polls the
workspace's inbox for A2A messages, hands each one to the backend and posts the reply:
to a peer agent as a new message/send, to the user on the canvas through /notify. The
cursor is saved (atomically, 0600) only after a message is handled, so a crash never
loses a message. SIGTERM or SIGINT stops cleanly (exit 0); a second signal forces.

Options:
  --backend NAME           exec | claude-code | mock              [default: claude-code]
  --backend-opt KEY=VALUE  backend option, repeatable:
                             exec:        cmd=SHELL-COMMAND (required), timeout=60s,
                                          max_output=1048576, format=text|json,
                                          pass_meta=false, kill_grace=2s
                             claude-code: bin=claude, args=..., timeout=5m, pass_meta=true
                             mock:        reply='echo: %s'
  --token TOKEN            workspace token (visible in ps: prefer --token-file or
                           env MOLECULE_WORKSPACE_TOKEN)
  --mode poll              delivery mode; only poll is supported
  --interval-ms N          pause between polls when the inbox is empty   [default: 1000]
  --since-secs N           first start (no cursor): look back N seconds  [default: 30]
  --heartbeat-secs N       heartbeat period                              [default: 20]
  --max-attempts N         backend tries per message before giving up    [default: 3]
  --drain-timeout SECS     on SIGTERM, let a running backend finish this long [default: 30]
  --reply-to-replies       also post answers to messages that are themselves replies
                           (off by default: two auto-replying agents would loop forever)
  --dry-run                check configuration and backend, print a summary, exit

The exec backend runs `/bin/sh -c CMD` in its own process group with the message on
stdin; stdout (trailing newline trimmed) is the reply. Exit 0 = reply (empty output =
no reply), 100 = handled, post nothing, 75 = retry later, anything else = failure.
Its environment has MOLECULE_WORKSPACE_ID, MOLECULE_API_URL, MOLECULE_CALLER_ID,
MOLECULE_CALLER_NAME, MOLECULE_CALLER_ROLE, MOLECULE_ORIGIN (peer|canvas),
MOLECULE_MESSAGE_ID, MOLECULE_ACTIVITY_ID, MOLECULE_CONTEXT_ID, MOLECULE_ATTEMPT.

Files: <state-dir>/<workspace-id>.json holds the cursor (workspace_id, last_since_id)
and the ids of recently handled messages.

Global options (--api-url, --token-file, --state-dir, ...): see 'molecule --help'.
";

/// Help text for `topic`, or `None` if there is no such command.
pub fn help_for(topic: Option<&str>) -> Option<&'static str> {
    match topic {
        None | Some("help") | Some("version") => Some(HELP),
        Some("connect") => Some(CONNECT_HELP),
        Some(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(args: &[&str]) -> Result<Args, UsageError> {
        parse(std::iter::once("molecule").chain(args.iter().copied()))
    }

    #[test]
    fn no_args_is_help() {
        assert_eq!(p(&[]).unwrap().command, Command::Help(None));
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
