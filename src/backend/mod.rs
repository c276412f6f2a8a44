//! Backends: turn one inbound request into one reply. `trait Backend` plus one file
//! per built-in backend. Backends know nothing of HTTP, threads or the state file;
//! the runner decides what to do with their outcome.

mod exec;
mod helpers;
mod mock;
mod parts;
mod watch;
mod worker;

use std::collections::BTreeMap;
use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use crate::orphans::Groups;

pub use exec::ExecBackend;
pub use mock::MockBackend;
pub use worker::{Settings as WorkerSettings, WorkerBackend};

/// Exit status an `exec` command uses to say "I handled it, post nothing".
pub const EXIT_NO_REPLY: i32 = 100;
/// Exit status an `exec` command uses to say "retry this message later"
/// (EX_TEMPFAIL); it does not count toward poisoning.
pub const EXIT_RETRY_LATER: i32 = 75;

/// Where an inbound request came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// Another workspace's agent (`source_id` is a workspace id).
    Peer,
    /// A human on the canvas (or another caller without a workspace).
    Canvas,
    /// A local delegation result (never from the platform as a task).
    DelegationResult,
    /// The platform's notice about a request we raised or hold (an answer, a thread
    /// message, a nudge, §API-2.19): never answered.
    RequestUpdate,
    /// A broadcast to the org (§API-2.20): never answered.
    Broadcast,
}

impl Origin {
    /// The value of `MOLECULE_ORIGIN`.
    pub fn as_str(self) -> &'static str {
        match self {
            Origin::Peer => "peer",
            Origin::Canvas => "canvas",
            Origin::DelegationResult => "delegation_result",
            Origin::RequestUpdate => "request_update",
            Origin::Broadcast => "broadcast",
        }
    }

    /// Whether the backend's output is posted back to the sender.
    pub fn is_answered(self) -> bool {
        matches!(self, Origin::Peer | Origin::Canvas)
    }
}

/// One message for the backend.
#[derive(Debug, Clone)]
pub struct Request {
    /// Our own workspace id.
    pub workspace_id: String,
    /// Platform base URL (for agents that call back with `molecule send`).
    pub api_url: String,
    /// Text parts joined in order (parts with `kind` or `type` = `text`).
    pub text: String,
    /// Non-text parts (files, data), as the platform sent them.
    pub other_parts: Vec<serde_json::Value>,
    /// Sender workspace id; `None` for canvas users.
    pub caller_id: Option<String>,
    /// Sender's display name, when known.
    pub caller_name: Option<String>,
    /// Sender's role, when known.
    pub caller_role: Option<String>,
    /// Inbound `params.message.messageId`.
    pub message_id: Option<String>,
    /// The activity row id.
    pub activity_id: String,
    /// `params.message.contextId`, when present.
    pub context_id: Option<String>,
    /// `params.message.taskId`, when present.
    pub task_id: Option<String>,
    /// JSON-RPC method (normally `message/send`).
    pub method: String,
    /// Where the message came from.
    pub origin: Origin,
    /// 1 for the first try, then counts up on retries of the same message.
    pub attempt: u32,
    /// The whole request envelope, for `format=json`.
    pub raw: serde_json::Value,
    /// Extra environment for the backend (e.g. `MOLECULE_DELEGATION_ID`).
    pub extra_env: BTreeMap<String, String>,
    /// Files that came with the message: `{uri, name, mimeType?, size?}` (canvas
    /// uploads are `platform-pending:` URIs, fetched with `molecule download`).
    pub attachments: Vec<serde_json::Value>,
    /// The request a `request_update` is about, when the notice names it.
    pub request_id: Option<String>,
}

/// What a backend produced.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Post this reply.
    Reply(Reply),
    /// Handled; post nothing (exit [`EXIT_NO_REPLY`] or empty output).
    NoReply,
}

/// A reply: text plus optional non-text parts (from `format=json` output).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Reply {
    /// The reply text (may be empty when `parts` carry the content).
    pub text: String,
    /// Extra parts, already in A2A shape (`kind` key).
    pub parts: Vec<serde_json::Value>,
}

/// Why a backend run failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackendError {
    /// Bad backend configuration (unknown option, bad value): exit 2 at start-up.
    Config(String),
    /// The command could not be started.
    Spawn(String),
    /// The command exited non-zero (not 75, not 100).
    Failed {
        /// Exit code, or `None` when killed by a signal.
        code: Option<i32>,
        /// The last part of its stderr.
        stderr_tail: String,
    },
    /// The command asked to be retried later (exit 75).
    RetryLater {
        /// The last part of its stderr.
        stderr_tail: String,
    },
    /// The run exceeded its timeout and its process group was killed.
    Timeout {
        /// The configured limit.
        after: Duration,
        /// The last part of its stderr.
        stderr_tail: String,
    },
    /// The run was cancelled (shutdown drain ran out).
    Cancelled,
    /// Output was unusable: too large, not UTF-8, or bad JSON with `format=json`.
    BadOutput(String),
    /// Try again later without counting a failure: a worker answered `retry_later`,
    /// or was restarted because another request it held timed out.
    Later(String),
    /// A worker answered `error`: a failure of this attempt.
    Reported(String),
}

impl BackendError {
    /// Exit 75: try again later, does not count as a failure of the message.
    pub fn is_retry_later(&self) -> bool {
        matches!(
            self,
            BackendError::RetryLater { .. } | BackendError::Later(_)
        )
    }
}

impl fmt::Display for BackendError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fn tail(s: &str) -> String {
            if s.trim().is_empty() {
                String::new()
            } else {
                format!(" (stderr: {})", s.trim())
            }
        }
        match self {
            BackendError::Config(m) => write!(f, "backend config: {m}"),
            BackendError::Spawn(m) => write!(f, "backend: cannot start command: {m}"),
            BackendError::Failed {
                code: Some(c),
                stderr_tail,
            } => write!(
                f,
                "backend: command exited with status {c}{}",
                tail(stderr_tail)
            ),
            BackendError::Failed {
                code: None,
                stderr_tail,
            } => write!(
                f,
                "backend: command killed by a signal{}",
                tail(stderr_tail)
            ),
            BackendError::RetryLater { stderr_tail } => {
                write!(
                    f,
                    "backend: command asked to retry later (exit 75){}",
                    tail(stderr_tail)
                )
            }
            BackendError::Timeout { after, stderr_tail } => write!(
                f,
                "backend: command timed out after {}{}",
                crate::duration::format(*after),
                tail(stderr_tail)
            ),
            BackendError::Cancelled => write!(f, "backend: run cancelled by shutdown"),
            BackendError::BadOutput(m) => write!(f, "backend: bad output: {m}"),
            BackendError::Later(m) => write!(f, "backend: {m}; trying again later"),
            BackendError::Reported(m) => {
                write!(f, "backend: the worker reported an error (detail: {m})")
            }
        }
    }
}

impl std::error::Error for BackendError {}

/// Lets the runner stop a backend run from another thread (drain timeout on
/// shutdown). The exec backend records its process group here while it runs, and
/// the handle passes it on to the workspace's [`Groups`] record so a later start can
/// end it if the connector dies first.
#[derive(Clone, Default)]
pub struct RunHandle {
    inner: Arc<Mutex<RunState>>,
    groups: Groups,
}

/// Called by [`RunHandle::cancel`], for a run that waits on something other than a
/// process (a worker backend waiting for a free worker).
pub type Waker = Arc<dyn Fn() + Send + Sync>;

/// Signals a run's process group on behalf of [`RunHandle`], for a group whose owner
/// knows better than its pgid when it may be signalled (a shared worker process).
pub type Signaller = Arc<dyn Fn(i32) + Send + Sync>;

#[derive(Default)]
struct RunState {
    pgid: Option<u32>,
    signaller: Option<Signaller>,
    cancelled: bool,
    waker: Option<Waker>,
}

impl RunState {
    fn signal(&self, sig: i32) {
        match (&self.signaller, self.pgid) {
            (Some(signal), _) => signal(sig),
            (None, Some(pgid)) => {
                let _ = crate::signal::kill_process_group(pgid, sig);
            }
            (None, None) => {}
        }
    }
}

impl RunHandle {
    /// A handle with nothing running.
    pub fn new() -> Self {
        Self::default()
    }

    /// A handle whose runs' process groups are also kept in `groups`.
    pub fn recording(groups: Groups) -> Self {
        RunHandle {
            inner: Arc::default(),
            groups,
        }
    }

    /// Records the process group of a run that just started. Returns `false` if the
    /// handle was already cancelled: the caller must kill the group at once.
    pub fn started(&self, pgid: u32) -> bool {
        self.started_with(pgid, None)
    }

    /// [`RunHandle::started`], with signals going through `signaller` instead of
    /// straight to `pgid`.
    pub fn started_with(&self, pgid: u32, signaller: Option<Signaller>) -> bool {
        let cancelled = {
            let mut s = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
            s.pgid = Some(pgid);
            s.signaller = signaller;
            s.cancelled
        };
        self.groups.add(pgid);
        !cancelled
    }

    /// The run ended; nothing to signal any more.
    pub fn finished(&self) {
        let pgid = {
            let mut s = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
            s.signaller = None;
            s.pgid.take()
        };
        if let Some(pgid) = pgid {
            self.groups.remove(pgid);
        }
    }

    /// Has [`RunHandle::cancel`] been called?
    pub fn is_cancelled(&self) -> bool {
        self.inner
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .cancelled
    }

    /// Sets (or clears) what [`RunHandle::cancel`] calls besides signalling.
    pub fn set_waker(&self, waker: Option<Waker>) {
        self.inner
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .waker = waker;
    }

    /// Sends `sig` to the running process group, if any, without cancelling the run.
    /// Never after [`RunHandle::finished`], which comes before the group's leader is
    /// reaped: a reaped leader's pgid may name an unrelated group.
    pub fn signal(&self, sig: i32) {
        self.inner
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .signal(sig);
    }

    /// Marks the handle cancelled and sends `sig` to the running process group, if any.
    pub fn cancel(&self, sig: i32) {
        let waker = {
            let mut s = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
            s.cancelled = true;
            s.signal(sig);
            s.waker.clone()
        };
        // Outside our lock: the waker takes the backend's own lock.
        if let Some(wake) = waker {
            wake();
        }
    }
}

/// Turns one request into one outcome. Implementations must be safe to call from
/// several threads at once (one call per thread).
pub trait Backend: Send + Sync {
    /// Short name for logs (`exec`, `claude-code`, `mock`).
    fn name(&self) -> &str;
    /// Handles one request. `handle` lets the runner cancel a long run.
    fn handle(&self, req: &Request, handle: &RunHandle) -> Result<Outcome, BackendError>;
    /// Checks that the backend can run at all (e.g. the command exists), for
    /// `--dry-run` and `doctor`. Returns a short description on success.
    fn check(&self) -> Result<String, BackendError>;
    /// `doctor`: [`Backend::check`], and for a long-lived backend also start it, see
    /// that it answers, and stop it.
    fn probe(&self) -> Result<String, BackendError> {
        self.check()
    }
    /// `connect` is about to take messages for `workspace_id` at `api_url`: start
    /// anything long-lived now (in the background) rather than on the first message,
    /// and keep its process groups in `groups` while they run.
    fn start(
        &self,
        _workspace_id: &str,
        _api_url: &str,
        _groups: &Groups,
    ) -> Result<(), BackendError> {
        Ok(())
    }
    /// The runner is stopping: requests already with the backend may finish (within
    /// `--drain-timeout`), but nothing new should start. A long-lived backend ends a
    /// request still waiting for a process of its own with [`BackendError::Cancelled`]
    /// (the message runs again after the restart).
    fn drain(&self) {}
    /// No more requests will come: stop anything long-lived (after the runner's drain).
    fn stop(&self) {}
    /// A problem the heartbeat must report as `wedged` although no message failed
    /// (a worker that keeps failing at start); short, never the agent's output.
    fn trouble(&self) -> Option<String> {
        None
    }
}

/// Every backend `build` knows, in `--help` order (also what completions offer for
/// `--backend`).
pub const NAMES: &[&str] = &["exec", "claude-code", "worker", "mock"];

/// A `--backend` with its `--backend-opt`s parsed and checked. `connect` makes it
/// when its configuration is resolved, so a bad option stops it before anything
/// runs; [`BackendSpec::build`] then makes the backend itself.
#[derive(Debug, Clone)]
pub enum BackendSpec {
    /// `exec` or `claude-code`: a command per message.
    Exec(ExecBackend),
    /// `worker`: long-lived processes.
    Worker(WorkerSettings),
    /// `mock`: a fixed reply.
    Mock(MockBackend),
}

impl BackendSpec {
    /// Parses `--backend NAME` and its `--backend-opt` pairs; `concurrency` is
    /// `--concurrency` (the default number of workers).
    pub fn parse(
        name: &str,
        opts: &BTreeMap<String, String>,
        concurrency: usize,
    ) -> Result<Self, BackendError> {
        match name {
            "exec" => Ok(Self::Exec(ExecBackend::from_opts(opts)?)),
            "claude-code" => Ok(Self::Exec(ExecBackend::claude_code(opts)?)),
            "worker" => Ok(Self::Worker(WorkerSettings::parse(opts, concurrency)?)),
            "mock" => Ok(Self::Mock(MockBackend::from_opts(opts)?)),
            other => Err(BackendError::Config(format!(
                "unknown backend {other:?} (choose {})",
                NAMES.join(", ")
            ))),
        }
    }

    /// The backend's name, as `--backend` spells it.
    #[cfg(test)]
    pub fn name(&self) -> &str {
        match self {
            Self::Exec(b) => b.name(),
            Self::Worker(_) => "worker",
            Self::Mock(b) => b.name(),
        }
    }

    /// The backend; nothing starts until it is used.
    pub fn build(&self) -> Box<dyn Backend> {
        match self {
            Self::Exec(b) => Box::new(b.clone()),
            Self::Worker(s) => Box::new(WorkerBackend::new(s.clone())),
            Self::Mock(b) => Box::new(b.clone()),
        }
    }
}

/// Builds a backend by name from `--backend-opt` pairs (for `doctor`); see
/// [`BackendSpec::parse`].
pub fn build(
    name: &str,
    opts: &BTreeMap<String, String>,
    concurrency: usize,
) -> Result<Box<dyn Backend>, BackendError> {
    Ok(BackendSpec::parse(name, opts, concurrency)?.build())
}
