//! `molecule`: attach a local AI agent to a Molecule AI workspace in poll mode, and
//! give shell agents the platform calls they need.
//!
//! # Where things are
//! - Entry: `main.rs` calls [`parse_args`] and [`run`] here; `cli` turns argv into
//!   raw arguments (help texts in `cli/`), `config` resolves them with the
//!   environment into checked settings (`config/agent.rs` and `config/tools.rs`
//!   for the one-shot commands), `error` maps failures to exit codes.
//! - `connect`: `runner` starts and stops the threads of each workspace
//!   (`runner/mod.rs`), one file per thread: `register`, `heartbeat`, `poll` (with
//!   the pure `order`), `dispatch` (the workers), `wake` (event stream, read by
//!   `events`), `delegations/`, `broadcasts`, `supervise`; `report` writes the
//!   `status_file`.
//! - The platform: `api` (one `Client` method per endpoint), `credentials` (the
//!   token and where it came from), `wire` (its JSON shapes), `inbox` (what a row
//!   means, and the A2A message we send back), `peers` (names of other workspaces).
//! - The agent: `backend` (`exec`, `claude-code`, `mock`, long-lived workers);
//!   `orphans` ends backend process groups a crash left behind.
//! - On disk: `state` (cursor, handled ledger, pending replies, the lock),
//!   `status_file` (what `molecule status` reads), `metrics` (its Prometheus text).
//! - The process: `shutdown` (the stop flag every thread follows), `signal`
//!   (handlers, kill), `notify` (systemd/s6 readiness and status).
//! - One-shot commands (`send`, `status`, `doctor`, ...): `commands`, one file each;
//!   `completions` (shell completions, man page); `output` (writing to stdout).
//! - Small pure helpers: `backoff`, `lru`, `duration`, `timestamp`, `uuid`.
//!
//! # One message, end to end
//! `runner::poll` fetches the inbox (`GET /workspaces/<id>/activity`) through
//! `api::Client`, and `inbox::classify` turns each row into an `Inbound` or a skip;
//! `order` queues it behind its sender's earlier messages. A `dispatch::Worker` runs
//! the `backend`, saves the reply durably in `state`, posts it
//! (`inbox::reply_envelope` to a peer, `/notify` for the canvas user) and records
//! the row as done. When every earlier row is finished the poll thread moves the
//! saved cursor past it, so a crash neither loses nor double-answers a message
//! (replies carry a deterministic `messageId`).
//!
//! Log policy: logs go to stderr. `debug` is one line per request or message; the
//! token, the `Authorization` header, bodies and the environment are never logged,
//! and `ureq`/`rustls` are capped at `warn` (their TRACE is wire level, unredacted).

mod api;
mod backend;
mod backoff;
mod cli;
mod commands;
mod completions;
mod config;
mod credentials;
mod duration;
mod error;
pub mod events;
mod inbox;
pub mod logger;
mod lru;
mod metrics;
mod notify;
mod orphans;
mod output;
mod peers;
mod runner;
pub mod shutdown;
pub mod signal;
mod state;
mod status_file;
pub mod timestamp;
pub mod uuid;
mod wire;

use std::ffi::OsString;
use std::io::Write;

pub use error::Error;
use output::write_quiet;

// What the integration tests use besides the public modules above.
pub use api::{Client, ClientConfig};
pub use config::Secret;
pub use inbox::{classify, reply_envelope, reply_message_id};
pub use status_file::status_path;
pub use wire::{ActivityRow, Heartbeat};

/// `0.1.0 (1a2b3c4, x86_64-unknown-linux-musl)`: the crate version, the git commit it
/// was built from (`-dirty` for uncommitted changes, `unknown` without git) and the
/// target (set by src/build.rs). `--version`, the agent card, the heartbeat's
/// `runtime_metadata` and `doctor` all show it.
pub const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (",
    env!("MOLECULE_BUILD_COMMIT"),
    ", ",
    env!("MOLECULE_BUILD_TARGET"),
    ")"
);

/// Parses `argv` and runs the command, writing user output to `out`. `env` looks up
/// environment variables (injected so tests need not touch the process env).
/// Logging must already be initialised (see [`log_level`]).
pub fn run(
    args: cli::Args,
    env: &dyn Fn(&str) -> Option<String>,
    out: &mut dyn Write,
) -> Result<(), Error> {
    match args.command {
        cli::Command::Help(topic) => {
            let text = cli::help_for(topic.as_deref()).ok_or_else(|| {
                Error::Usage(cli::UsageError(format!(
                    "no help for {:?}: not a command",
                    topic.unwrap_or_default()
                )))
            })?;
            write_quiet(out, text)
        }
        cli::Command::Version => write_quiet(out, &format!("molecule {VERSION}\n")),
        cli::Command::Completions(shell) => {
            let script = completions::script(&shell).ok_or_else(|| {
                Error::Usage(cli::UsageError(format!(
                    "completions: unknown shell {shell:?}"
                )))
            })?;
            write_quiet(out, &script)
        }
        cli::Command::Man => write_quiet(out, &completions::man_page()),
        cli::Command::Connect(c) => {
            let sup = config::supervision(&c, env)?;
            match &c.workspaces {
                Some(file) => {
                    let cfgs = config::workspaces_config(&args.global, &c, file, env)?;
                    runner::connect_many(cfgs, &sup, out)
                }
                None => {
                    let cfg = config::connect_config(&args.global, &c, env)?;
                    runner::connect(cfg, &sup, out)
                }
            }
        }
        agent_side => commands::run(&args.global, agent_side, env, out),
    }
}

/// Parses the command line (program name first).
pub fn parse_args<I>(argv: I) -> Result<cli::Args, Error>
where
    I: IntoIterator,
    I::Item: Into<OsString>,
{
    Ok(cli::parse(argv)?)
}

/// The `{"ok":false,...}` document for an error found while parsing `argv`, when
/// `argv` asks for `--json` (before any `--`): with `--json`, stdout is one JSON
/// document whatever happens, parse errors included.
pub fn parse_error_document(argv: &[OsString], e: &Error) -> Option<String> {
    let json = argv
        .iter()
        .skip(1)
        .take_while(|a| *a != "--")
        .any(|a| a == "--json");
    json.then(|| {
        let doc = serde_json::json!({
            "ok": false,
            "error": e.to_string(),
            "exit_code": e.exit_code(),
        });
        format!("{doc}\n")
    })
}

/// The log level from `-v`/`-q`, else `MOLECULE_LOG`, else `RUST_LOG` (a bare
/// level), else `info`.
pub fn log_level(verbosity: i8, env: &dyn Fn(&str) -> Option<String>) -> log::LevelFilter {
    use log::LevelFilter::*;
    if verbosity != 0 {
        return match verbosity {
            i8::MIN..=-2 => Error,
            -1 => Warn,
            1 => Debug,
            _ => Trace,
        };
    }
    for var in ["MOLECULE_LOG", "RUST_LOG"] {
        if let Some(v) = env(var)
            && let Ok(level) = v.trim().parse::<log::LevelFilter>()
        {
            return level;
        }
    }
    Info
}
