//! The option tables: every option the parser accepts, per command. The parser
//! rejects a long option that is not in its command's table, and the shell
//! completions and the man page (`completions.rs`) are generated from the same
//! tables, so the three cannot drift.
//!
//! To add an option: add its `Opt` row here AND its arm in the command's parse
//! function in `cli.rs` (and a line in its help text). The test
//! `every_table_option_is_parsed_completed_and_documented` fails until all three
//! agree; an arm without a row is rejected as an invalid option.

/// What an option takes after it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Takes {
    /// A switch.
    Nothing,
    /// A value, shown as this placeholder (`SECS`, `ID`).
    Value(&'static str),
    /// A file or directory path, shown as this placeholder; completed as a path.
    Path(&'static str),
    /// One of these words.
    OneOf(&'static [&'static str]),
}

/// One long option (with its short form, if any).
#[derive(Debug)]
pub struct Opt {
    /// Without the leading `--`.
    pub long: &'static str,
    /// `-v` for `--verbose`.
    pub short: Option<char>,
    /// What follows it.
    pub takes: Takes,
    /// One line for completions and the man page.
    pub help: &'static str,
}

/// One command: its name, its positional arguments (for the synopsis), a summary
/// and its options. Every command also accepts `-h`/`--help` and the global options.
#[derive(Debug)]
pub struct Cmd {
    /// As typed.
    pub name: &'static str,
    /// Positional arguments as shown in the usage line (may be empty).
    pub args: &'static str,
    /// One line.
    pub summary: &'static str,
    /// The words its first argument may be (`memory commit|search|...`), for completion.
    pub words: &'static [&'static str],
    /// Its own options.
    pub opts: &'static [Opt],
}

const fn flag(long: &'static str, help: &'static str) -> Opt {
    Opt {
        long,
        short: None,
        takes: Takes::Nothing,
        help,
    }
}

const fn value(long: &'static str, placeholder: &'static str, help: &'static str) -> Opt {
    Opt {
        long,
        short: None,
        takes: Takes::Value(placeholder),
        help,
    }
}

const fn path(long: &'static str, placeholder: &'static str, help: &'static str) -> Opt {
    Opt {
        long,
        short: None,
        takes: Takes::Path(placeholder),
        help,
    }
}

const BACKENDS: &[&str] = crate::backend::NAMES;

/// Accepted before or after the command name.
pub const GLOBAL: &[Opt] = &[
    value("api-url", "URL", "platform base URL [env MOLECULE_API_URL]"),
    value(
        "workspace",
        "ID",
        "own workspace id (UUID) [env MOLECULE_WORKSPACE_ID]",
    ),
    path(
        "token-file",
        "PATH",
        "read the workspace token from PATH [env MOLECULE_WORKSPACE_TOKEN_FILE]",
    ),
    value(
        "org-id",
        "ID",
        "send X-Molecule-Org-Id (SaaS) [env MOLECULE_ORG_ID]",
    ),
    path(
        "state-dir",
        "DIR",
        "where cursor state lives [env MOLECULE_STATE_DIR]",
    ),
    flag(
        "allow-insecure-http",
        "allow sending the token over plain http:// to a non-loopback host",
    ),
    path(
        "ca-file",
        "PATH",
        "trust the CA certificates (PEM) in PATH [env MOLECULE_CA_FILE, else SSL_CERT_FILE]",
    ),
    flag("json", "machine-readable output on stdout"),
    Opt {
        long: "verbose",
        short: Some('v'),
        takes: Takes::Nothing,
        help: "more logging (repeat for more)",
    },
    Opt {
        long: "quiet",
        short: Some('q'),
        takes: Takes::Nothing,
        help: "less logging",
    },
];

/// Accepted only before a command (`molecule --version`).
pub const TOP_LEVEL: &[Opt] = &[
    Opt {
        long: "help",
        short: Some('h'),
        takes: Takes::Nothing,
        help: "print help",
    },
    Opt {
        long: "version",
        short: Some('V'),
        takes: Takes::Nothing,
        help: "print the version",
    },
];

const CONNECT: &[Opt] = &[
    Opt {
        long: "backend",
        short: None,
        takes: Takes::OneOf(BACKENDS),
        help: "the agent behind the connector [default: claude-code]",
    },
    value(
        "backend-opt",
        "KEY=VALUE",
        "backend option, repeatable (see molecule connect --help)",
    ),
    value(
        "token",
        "TOKEN",
        "workspace token (visible in ps: prefer --token-file)",
    ),
    Opt {
        long: "mode",
        short: None,
        takes: Takes::OneOf(&["poll"]),
        help: "delivery mode; only poll is supported",
    },
    Opt {
        long: "wake",
        short: None,
        takes: Takes::OneOf(&["auto", "events", "poll"]),
        help: "how new messages are noticed: event stream, else polling [default: auto]",
    },
    value(
        "safety-poll-secs",
        "N",
        "blind poll period while the event stream is healthy [default: 30]",
    ),
    value(
        "rate-reserve",
        "PCT",
        "share of the rate bucket left to other clients [default: 30]",
    ),
    value(
        "interval-ms",
        "N",
        "pause between polls when no event stream is healthy [default: 1000]",
    ),
    value(
        "since-secs",
        "N",
        "look back N seconds on first start or after a pruned cursor [default: 30]",
    ),
    value("heartbeat-secs", "N", "heartbeat period [default: 20]"),
    value(
        "drain-timeout",
        "SECS",
        "on SIGTERM, let running backends finish this long [default: 30]",
    ),
    value(
        "max-attempts",
        "N",
        "backend tries per message before giving up [default: 3]",
    ),
    flag(
        "reply-to-replies",
        "also post answers to messages that are themselves replies",
    ),
    value(
        "max-auto-replies",
        "N",
        "with --reply-to-replies: answers in a row to replies per conversation [default: 20]",
    ),
    value("concurrency", "N", "backend runs at once [default: 1]"),
    flag("once", "answer everything pending, then exit (for cron)"),
    value("max-messages", "N", "stop after N messages"),
    value("idle-exit", "SECS", "stop after SECS without any message"),
    value(
        "lock-wait",
        "SECS",
        "wait up to SECS for another connector's lock [default: 0]",
    ),
    value(
        "delegations-secs",
        "SECS",
        "check sent delegations' results every SECS; 0 = off [default: 30]",
    ),
    value(
        "delegations-capacity",
        "N",
        "delivered delegation ids remembered across restarts [default: 1024]",
    ),
    value(
        "broadcasts-secs",
        "SECS",
        "without the event stream, look for broadcasts every SECS; 0 = off",
    ),
    path(
        "workspaces",
        "FILE",
        "many workspaces in one process, from a JSON list in FILE",
    ),
    flag(
        "dry-run",
        "check configuration and backend, print a summary, exit",
    ),
    path(
        "card-file",
        "FILE",
        "a JSON agent card sent on register instead of the built-in one",
    ),
    path(
        "metrics-file",
        "PATH",
        "write Prometheus metrics (text format) to PATH every 5 s",
    ),
    value(
        "notification-fd",
        "FD",
        "s6 readiness: write a newline to FD once ready",
    ),
];

const SEND: &[Opt] = &[
    value(
        "message-id",
        "ID",
        "messageId to use (reuse it when re-running a send) [default: a fresh UUID]",
    ),
    value(
        "budget",
        "SECS",
        "total time for all attempts, waits included [default: 600]",
    ),
];

const PEERS: &[Opt] = &[value(
    "query",
    "TEXT",
    "only peers whose name or role contains TEXT",
)];

const DELEGATE: &[Opt] = &[
    value(
        "idempotency-key",
        "KEY",
        "return the existing delegation for a repeated KEY",
    ),
    flag("wait", "wait for the result"),
    value("timeout", "SECS", "how long --wait waits [default: 600]"),
];

const DELEGATIONS: &[Opt] = &[Opt {
    long: "status",
    short: None,
    takes: Takes::OneOf(super::DELEGATION_STATUSES),
    help: "only entries with this status",
}];

const NOTIFY: &[Opt] = &[
    value(
        "attach",
        "URI[,NAME]",
        "attach a file already uploaded to the platform (repeatable)",
    ),
    path(
        "file",
        "PATH",
        "upload a local file and attach it (repeatable)",
    ),
];

const HEARTBEAT: &[Opt] = &[
    value(
        "current-task",
        "TEXT",
        "what the agent is working on (empty = idle)",
    ),
    value("active-tasks", "N", "tasks in progress"),
    value("error-rate", "R", "recent failure rate, 0.0 to 1.0"),
    value(
        "sample-error",
        "TEXT",
        "the last error, shown for a degraded workspace",
    ),
    value("uptime-secs", "N", "seconds the agent has been up"),
];

const STATUS: &[Opt] = &[
    value(
        "stale-after",
        "SECS",
        "how old the last successful poll may be",
    ),
    Opt {
        long: "format",
        short: None,
        takes: Takes::OneOf(&["text", "prometheus"]),
        help: "text (default) or the connector's metrics in the Prometheus text format",
    },
];

const DOCTOR: &[Opt] = &[
    Opt {
        long: "backend",
        short: None,
        takes: Takes::OneOf(BACKENDS),
        help: "also check this backend",
    },
    value(
        "backend-opt",
        "KEY=VALUE",
        "backend option to check, repeatable",
    ),
];

/// `--budget`, which every tool command accepts.
const BUDGET: Opt = value(
    "budget",
    "SECS",
    "total time for retries of transient failures [default: 60]",
);

const MEMORY: &[Opt] = &[
    Opt {
        long: "scope",
        short: None,
        takes: Takes::OneOf(&["LOCAL", "TEAM", "GLOBAL"]),
        help: "commit: who may read it [default: LOCAL]",
    },
    value(
        "namespace",
        "NAME",
        "commit: a label; search: the namespace",
    ),
    Opt {
        long: "kind",
        short: None,
        takes: Takes::OneOf(&["fact", "summary", "checkpoint"]),
        help: "search: only this kind",
    },
    value("limit", "N", "search: at most N (1..100) [default: 50]"),
    BUDGET,
];

const ASK: &[Opt] = &[
    value("detail", "TEXT", "longer description"),
    value("to", "user|ID", "who answers [default: user]"),
    Opt {
        long: "kind",
        short: None,
        takes: Takes::OneOf(&["approval", "task"]),
        help: "what is asked [default: approval]",
    },
    flag("wait", "wait for the answer"),
    value("timeout", "SECS", "how long --wait waits [default: 600]"),
    BUDGET,
];

const REQUESTS: &[Opt] = &[
    flag("inbox", "requests addressed to this workspace"),
    value("status", "STATUS", "only requests in this status"),
    BUDGET,
];

const HISTORY: &[Opt] = &[
    value("peer", "ID", "the peer workspace"),
    flag("canvas", "the human conversation"),
    value("limit", "N", "newest N entries [default: 20]"),
    value("before", "TS", "only entries older than TS (RFC 3339)"),
    BUDGET,
];

const CARD: &[Opt] = &[
    value("name", "NAME", "display name"),
    value("description", "TEXT", "what the agent does"),
    value(
        "skill",
        "ID:NAME",
        "a skill (repeatable; replaces the skill list)",
    ),
    BUDGET,
];

const DOWNLOAD: &[Opt] = &[
    Opt {
        long: "output",
        short: Some('o'),
        takes: Takes::Path("FILE"),
        help: "write to FILE instead of stdout",
    },
    flag("ack", "tell the platform the file was fetched"),
    BUDGET,
];

/// The shells `molecule completions` knows.
pub const SHELLS: &[&str] = &["bash", "zsh", "fish"];

/// Every command, in `--help` order.
pub const COMMANDS: &[Cmd] = &[
    Cmd {
        name: "connect",
        args: "<workspace-id>",
        summary: "run the connector: register, heartbeat, poll, hand each message to a backend, post the reply",
        words: &[],
        opts: CONNECT,
    },
    Cmd {
        name: "send",
        args: "<peer-id> TEXT|-",
        summary: "send one message to a peer; print its reply (or queued)",
        words: &[],
        opts: SEND,
    },
    Cmd {
        name: "peers",
        args: "",
        summary: "list the workspaces this one may talk to",
        words: &[],
        opts: PEERS,
    },
    Cmd {
        name: "discover",
        args: "<peer-id>",
        summary: "check that a peer exists and may be talked to",
        words: &[],
        opts: &[],
    },
    Cmd {
        name: "info",
        args: "[<workspace-id>]",
        summary: "show a workspace's platform record (default: own)",
        words: &[],
        opts: &[],
    },
    Cmd {
        name: "delegate",
        args: "<target-id> TEXT|-",
        summary: "hand a task to another workspace; --wait for the result",
        words: &[],
        opts: DELEGATE,
    },
    Cmd {
        name: "delegations",
        args: "",
        summary: "list delegations sent and received",
        words: &[],
        opts: DELEGATIONS,
    },
    Cmd {
        name: "notify",
        args: "TEXT|-",
        summary: "send a message to the human on the canvas",
        words: &[],
        opts: NOTIFY,
    },
    Cmd {
        name: "heartbeat",
        args: "",
        summary: "send one heartbeat (agents driven by cron)",
        words: &[],
        opts: HEARTBEAT,
    },
    Cmd {
        name: "status",
        args: "",
        summary: "show what the connector's state file says",
        words: &[],
        opts: STATUS,
    },
    Cmd {
        name: "doctor",
        args: "",
        summary: "check configuration, reachability, auth and poll support",
        words: &[],
        opts: DOCTOR,
    },
    Cmd {
        name: "memory",
        args: "commit|search|namespaces|delete [TEXT|QUERY|ID]",
        summary: "remember across runs (the platform's memory plugin)",
        words: &["commit", "search", "namespaces", "delete"],
        opts: MEMORY,
    },
    Cmd {
        name: "ask",
        args: "TITLE",
        summary: "ask the human (or an agent) for an approval or a task",
        words: &[],
        opts: ASK,
    },
    Cmd {
        name: "requests",
        args: "",
        summary: "list requests raised (or --inbox: received)",
        words: &[],
        opts: REQUESTS,
    },
    Cmd {
        name: "request",
        args: "show|respond|message|cancel <request-id> [ANSWER|TEXT]",
        summary: "one request and its thread",
        words: &["show", "respond", "message", "cancel"],
        opts: &[BUDGET],
    },
    Cmd {
        name: "history",
        args: "",
        summary: "a conversation (--peer ID or --canvas), oldest first",
        words: &[],
        opts: HISTORY,
    },
    Cmd {
        name: "card",
        args: "update",
        summary: "change what the agent card says",
        words: &["update"],
        opts: CARD,
    },
    Cmd {
        name: "broadcast",
        args: "TEXT|-",
        summary: "message every workspace of the org",
        words: &[],
        opts: &[BUDGET],
    },
    Cmd {
        name: "download",
        args: "URI",
        summary: "fetch a file uploaded to this workspace",
        words: &[],
        opts: DOWNLOAD,
    },
    Cmd {
        name: "completions",
        args: "bash|zsh|fish",
        summary: "print a shell completion script",
        words: SHELLS,
        opts: &[],
    },
    Cmd {
        name: "man",
        args: "",
        summary: "print the man page (roff)",
        words: &[],
        opts: &[],
    },
    Cmd {
        name: "help",
        args: "[COMMAND]",
        summary: "show help for a command",
        words: &[],
        opts: &[],
    },
    Cmd {
        name: "version",
        args: "",
        summary: "print the version",
        words: &[],
        opts: &[],
    },
];

/// The table of `command`'s own options (empty for an unknown command).
pub fn of(command: &str) -> &'static [Opt] {
    COMMANDS
        .iter()
        .find(|c| c.name == command)
        .map_or(&[], |c| c.opts)
}

/// Whether `--long` is in `table`.
pub fn has(table: &[Opt], long: &str) -> bool {
    table.iter().any(|o| o.long == long)
}
