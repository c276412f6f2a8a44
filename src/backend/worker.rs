//! The `worker` backend: long-lived agent processes instead of a process per message.
//! Each of `workers` slots runs the command once, in its own process group, and
//! talks to it in newline-delimited JSON: a request line with an `id` goes to its
//! stdin, an answer line with the same `id` comes back on its stdout, in any order,
//! up to `max_in_flight` at a time. A supervisor thread per slot restarts a worker
//! that exits (capped backoff) and fails the requests it held, so the runner retries
//! them: every request ends exactly once, by its answer or by an error.
//!
//! `doctor`'s probe runs one worker that is never restarted: when it exits before it
//! is ready or has answered, every wait on it ends at once with how it ended.
//!
//! Threads per worker process: the slot's supervisor (waits for the exit, then reads
//! what is left on stdout), a stderr logger, and with `max_in_flight` > 1 a reader
//! (stdout: answers). A request thread writes its line to the worker's stdin itself
//! (non-blocking, with `poll(2)` while the pipe is full), and with `max_in_flight=1`
//! reads its answer itself too: a thread between them would cost a hand-off per
//! message. Lock order: a process's `stdout`, then the pool's state, then a
//! process's `pending` or `reaped`; a process's `writing`, then its `input`.

use std::collections::{BTreeMap, HashMap};
use std::io::{self, BufRead, BufReader, PipeReader, PipeWriter, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::process::CommandExt;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError, Sender};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use serde::{Deserialize, Deserializer};
use serde_json::{Map, Value};

use super::exec::{
    RequestJson, remove_supervisor_env, reply_from_object, shell_command, tail_text,
};
use super::{Backend, BackendError, Groups, Origin, Outcome, Request, RunHandle};
use crate::backoff::Backoff;
use crate::signal::{
    self, POLLIN, POLLOUT, PollFd, SIGKILL, SIGTERM, kill_process_group, wait_exited,
};

/// Options, for error messages.
const KEYS: &str =
    "cmd, workers, max_in_flight, timeout, kill_grace, max_output, ready, start_timeout";
/// Most workers or requests in flight per worker.
const MAX_COUNT: usize = 256;
/// Default `max_output`: 1 MiB per answer line.
const DEFAULT_MAX_OUTPUT: usize = 1 << 20;
/// The longest stderr line we log; the rest of it is cut.
const STDERR_LINE: usize = 1000;
/// Stderr lines logged in a burst, and then one per this interval.
const STDERR_BURST: u32 = 20;
const STDERR_REFILL: Duration = Duration::from_millis(100);
/// Stderr kept for error messages (the tail).
const STDERR_KEEP: usize = 2048;
/// What we keep of an answer line over `max_output`, to find its `id`.
const ID_SCAN: usize = 512;
/// Failed starts in a row after which [`Backend::trouble`] reports the worker.
const START_FAILURES: u32 = 3;
/// A worker that ran this long (or answered once) was healthy: its crash restarts
/// the backoff from the start.
const HEALTHY_AFTER: Duration = Duration::from_secs(30);
/// Delay before restarting a worker that exited: 200 ms, doubling, at most 30 s.
const RESTART: Backoff = Backoff {
    base: Duration::from_millis(200),
    max: Duration::from_secs(30),
    jitter: 0.25,
};
/// After a worker exited, how long its pipes may stay open (a background process it
/// left) before we stop waiting for its last lines.
const PIPES_AFTER_EXIT: Duration = Duration::from_secs(1);
/// Reads (of up to 64 KiB) of what a worker printed between requests done before
/// the next one is sent; past that, the request takes no line without its `id`.
const EARLY_READS: u32 = 16;

/// The `worker` backend's options, parsed and checked ([`Settings::parse`]).
#[derive(Debug, Clone)]
pub struct Settings {
    cmd: String,
    workers: usize,
    max_in_flight: usize,
    timeout: Duration,
    kill_grace: Duration,
    max_output: usize,
    ready: bool,
    start_timeout: Duration,
    /// [`HEALTHY_AFTER`] (shorter in tests).
    healthy_after: Duration,
}

/// Runs `workers` long-lived agent processes and hands them requests over NDJSON.
pub struct WorkerBackend {
    pool: Arc<Pool>,
}

impl WorkerBackend {
    /// Builds the backend from `--backend-opt` pairs; see [`Settings::parse`].
    #[cfg(test)]
    pub fn from_opts(
        opts: &BTreeMap<String, String>,
        concurrency: usize,
    ) -> Result<Self, BackendError> {
        Ok(Self::new(Settings::parse(opts, concurrency)?))
    }

    /// The backend for options already parsed; nothing starts until the first use.
    pub(crate) fn new(settings: Settings) -> Self {
        Self {
            pool: Arc::new(Pool::new(settings)),
        }
    }
}

impl Settings {
    /// Parses `--backend-opt` pairs; `cmd` is required, `workers` defaults to
    /// `concurrency` (`--concurrency`) divided by `max_in_flight`, rounded up.
    pub(crate) fn parse(
        opts: &BTreeMap<String, String>,
        concurrency: usize,
    ) -> Result<Self, BackendError> {
        let mut s = Settings {
            cmd: String::new(),
            workers: concurrency.clamp(1, MAX_COUNT),
            max_in_flight: 1,
            timeout: Duration::from_secs(60),
            kill_grace: Duration::from_secs(2),
            max_output: DEFAULT_MAX_OUTPUT,
            ready: false,
            start_timeout: Duration::from_secs(30),
            healthy_after: HEALTHY_AFTER,
        };
        for (key, value) in opts {
            let bad = |why: String| BackendError::Config(format!("worker: bad {key}: {why}"));
            let count = || match value.trim().parse::<usize>() {
                Ok(n) if (1..=MAX_COUNT).contains(&n) => Ok(n),
                _ => Err(bad(format!("{value:?} (want 1 to {MAX_COUNT})"))),
            };
            let positive = || match crate::duration::parse(value).map_err(bad)? {
                d if d.is_zero() => Err(bad(format!("{value:?} must be greater than zero"))),
                d => Ok(d),
            };
            match key.as_str() {
                "cmd" => s.cmd = value.trim().to_string(),
                "workers" => s.workers = count()?,
                "max_in_flight" => s.max_in_flight = count()?,
                "timeout" => s.timeout = positive()?,
                "start_timeout" => s.start_timeout = positive()?,
                "kill_grace" => s.kill_grace = crate::duration::parse(value).map_err(bad)?,
                "max_output" => {
                    s.max_output = match value.trim().parse::<usize>() {
                        Ok(n) if n > 0 => n,
                        _ => return Err(bad(format!("{value:?} (want a number of bytes > 0)"))),
                    }
                }
                "ready" => {
                    s.ready = match value.as_str() {
                        "true" => true,
                        "false" => false,
                        _ => return Err(bad(format!("{value:?} (want true or false)"))),
                    }
                }
                other => {
                    return Err(BackendError::Config(format!(
                        "worker: unknown option {other:?} (known: {KEYS})"
                    )));
                }
            }
        }
        if !opts.contains_key("workers") {
            // `--concurrency` runs at once: with several in flight per worker, that
            // many fewer workers (one worker taking all is the point of max_in_flight).
            s.workers = concurrency.div_ceil(s.max_in_flight).clamp(1, MAX_COUNT);
        }
        if s.cmd.is_empty() {
            return Err(BackendError::Config(
                "worker: missing option \"cmd\" (e.g. --backend-opt cmd='python3 agent.py')".into(),
            ));
        }
        Ok(s)
    }

    /// Requests all the workers take at once (`workers` × `max_in_flight`).
    pub(crate) fn capacity(&self) -> usize {
        self.workers.saturating_mul(self.max_in_flight)
    }

    /// Longest a request waits for a worker with room (one starting, restarting or
    /// busy) before it fails its attempt: `timeout` for a busy one to finish, plus
    /// `start_timeout` with `ready=true` for the next one to say it is ready.
    fn wait_for_worker(&self) -> Duration {
        if self.ready {
            self.timeout.saturating_add(self.start_timeout)
        } else {
            self.timeout
        }
    }

    /// A worker process, not yet started: its own process group, pipes, and the
    /// environment of an `exec` run minus the per-message variables, plus `env` (the
    /// workspace's id and URL; an empty value is left out).
    fn command(&self, env: &[(&str, String)]) -> Command {
        let mut cmd = shell_command(&self.cmd);
        cmd.process_group(0)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        remove_supervisor_env(&mut cmd);
        for (k, v) in env {
            if !v.is_empty() {
                cmd.env(k, v);
            }
        }
        cmd
    }
}

impl Backend for WorkerBackend {
    fn name(&self) -> &str {
        "worker"
    }

    fn handle(&self, req: &Request, run: &RunHandle) -> Result<Outcome, BackendError> {
        self.pool
            .start(&req.workspace_id, &req.api_url, &Groups::default())?;
        self.pool.request(req, run)
    }

    fn check(&self) -> Result<String, BackendError> {
        let s = &self.pool.settings;
        // The program is found the way `exec` finds it.
        let mut opts = BTreeMap::new();
        opts.insert("cmd".to_string(), s.cmd.clone());
        let how = super::ExecBackend::from_opts(&opts)?
            .check()
            .map_err(|e| match e {
                BackendError::Config(m) => BackendError::Config(m.replacen("exec:", "worker:", 1)),
                other => other,
            })?;
        let how = how
            .strip_prefix("exec: ")
            .unwrap_or(&how)
            .split(" (timeout ")
            .next()
            .unwrap_or_default()
            .to_string();
        Ok(format!(
            "worker: {how} ({} worker(s), {} in flight each, timeout {}{})",
            s.workers,
            s.max_in_flight,
            crate::duration::format(s.timeout),
            if s.ready { ", waits for ready" } else { "" }
        ))
    }

    fn probe(&self) -> Result<String, BackendError> {
        let checked = self.check()?;
        let s = &self.pool.settings;
        // One worker is enough to see the command start and answer.
        let mut one = s.clone();
        one.workers = 1;
        // Not restarted: a worker that exits at start is the answer, not a race
        // between the probe and the next restart.
        let pool = Arc::new(Pool::without_restarts(one));
        let started = Instant::now();
        let result = pool.start("", "", &Groups::default()).and_then(|()| {
            if s.ready {
                pool.wait_ready(s.start_timeout)
                    .map(|()| "it said it is ready".to_string())
            } else {
                let req = probe_request();
                pool.request(&req, &RunHandle::new())
                    .map(|_| "it answered a probe request".to_string())
            }
        });
        pool.stop();
        let how = result?;
        Ok(format!(
            "{checked}; started it: {how} after {} ms",
            started.elapsed().as_millis()
        ))
    }

    fn start(
        &self,
        workspace_id: &str,
        api_url: &str,
        groups: &Groups,
    ) -> Result<(), BackendError> {
        self.pool.start(workspace_id, api_url, groups)
    }

    fn drain(&self) {
        self.pool.drain();
    }

    fn stop(&self) {
        self.pool.stop();
    }

    fn trouble(&self) -> Option<String> {
        let st = self.pool.lock();
        // A worker up for a while (with ready=false nothing else says it started)
        // ends the crash loop, even before it answers anything.
        let up = st.slots.iter().flatten().any(|p| {
            p.ready.load(Ordering::SeqCst)
                && p.started.elapsed() >= self.pool.settings.healthy_after
        });
        (st.start_failures >= START_FAILURES && !up).then(|| {
            format!(
                "worker keeps failing at start ({} times in a row): {}",
                st.start_failures, st.last_start_error
            )
        })
    }
}

/// What `doctor` sends a worker that does not announce itself.
fn probe_request() -> Request {
    Request {
        workspace_id: String::new(),
        api_url: String::new(),
        text: "molecule doctor: probe".into(),
        other_parts: Vec::new(),
        caller_id: None,
        caller_name: None,
        caller_role: None,
        message_id: None,
        activity_id: String::new(),
        context_id: None,
        task_id: None,
        method: "doctor/probe".into(),
        origin: Origin::Canvas,
        attempt: 1,
        raw: Value::Null,
        extra_env: BTreeMap::new(),
        attachments: Vec::new(),
        request_id: None,
    }
}

/// The slots, their processes and what every thread waits on.
struct Pool {
    settings: Settings,
    /// Restart a worker that exited (`false` only for `doctor`'s probe).
    restart: bool,
    state: Mutex<State>,
    /// A worker became ready or free, exited, or the pool is stopping.
    changed: Condvar,
}

#[derive(Default)]
struct State {
    started: bool,
    /// The runner is stopping: no new request is sent, no worker (re)started.
    draining: bool,
    stopping: bool,
    /// The running process of each slot (ready or still starting).
    slots: Vec<Option<Arc<Proc>>>,
    supervisors: Vec<JoinHandle<()>>,
    /// Where the running workers' process groups are recorded.
    groups: Groups,
    next_id: u64,
    start_failures: u32,
    last_start_error: String,
    /// Without restarts: how the worker ended, for every wait on it.
    gone: Option<BackendError>,
}

/// Why we ended a worker ourselves.
#[derive(Debug, Clone, PartialEq)]
enum Ended {
    /// The request with this id ran past its timeout.
    Timeout(String),
    /// It did not say it was ready within `start_timeout`.
    NotReady,
    /// The pool is stopping.
    Stop,
}

/// One running worker process.
struct Proc {
    slot: usize,
    pgid: u32,
    started: Instant,
    /// The worker's stdin; `None` once it is to be closed.
    input: Mutex<Option<Input>>,
    /// Held while a request line goes in, so that lines never interleave.
    writing: Mutex<()>,
    /// Hangs up once `input` is closed: wakes a writer waiting for room in stdin,
    /// and a request thread waiting on stdout.
    closed: Option<PipeReader>,
    /// Its stdout, with `max_in_flight=1`: read by the thread that waits for an
    /// answer (a reader thread would cost a hand-off per message). `None` with a
    /// reader thread, and once at EOF.
    stdout: Mutex<Option<Answers>>,
    /// Requests sent (or about to be), by id.
    pending: Mutex<HashMap<String, Sender<Answer>>>,
    /// Takes requests (started, and ready if `ready=true`).
    ready: AtomicBool,
    /// Answered at least one request.
    answered: AtomicBool,
    /// Its stdout and stderr not yet at EOF.
    pipes_open: AtomicUsize,
    ended: Mutex<Option<Ended>>,
    stderr_tail: Mutex<Vec<u8>>,
    /// Set once the process is reaped: its pgid may then name an unrelated group, so
    /// [`Proc::signal`] checks it under this lock and the reap holds it.
    reaped: Mutex<bool>,
}

/// Why a thread reads a worker's stdout (without a reader thread).
#[derive(Clone, Copy)]
enum Reading {
    /// For an answer (or the ready line): until stdin is closed, then the thread
    /// that reaps the worker reads the rest. A line without an `id` goes to the
    /// only request in flight if `orphans`.
    Answer { orphans: bool },
    /// Before a request is sent: what the worker printed since is no answer to it,
    /// even without an `id`.
    Waiting,
    /// The rest, once the worker exited or is being ended.
    Rest,
}

/// Where [`Pool::read_stdout`] stopped.
enum Stopped {
    Done,
    Eof,
    TimedOut,
    /// The deadline passed with more to read.
    Budget,
    /// Stdin was closed (the worker is being ended).
    Closed,
    /// A reader thread reads this worker's stdout.
    NoReader,
}

/// A worker's stdout and where its reading stands.
struct Answers {
    lines: Lines<Stdout>,
    /// `ready=true` and the ready line not read yet.
    awaiting_ready: bool,
}

/// A worker's stdin, non-blocking, while it is open.
struct Input {
    /// Shared with the request writing to it: a close while that request waits for
    /// room takes effect (the pipe closes) as soon as the request gives up.
    stdin: Arc<ChildStdin>,
    /// Dropped with the input: the other end, [`Proc::closed`], then hangs up.
    _wake: PipeWriter,
}

impl Input {
    /// Stdin made non-blocking, and the pipe that says when it is closed.
    fn new(stdin: ChildStdin) -> io::Result<(Input, PipeReader)> {
        signal::set_nonblocking(&stdin)?;
        let (closed, wake) = io::pipe()?;
        let input = Input {
            stdin: Arc::new(stdin),
            _wake: wake,
        };
        Ok((input, closed))
    }
}

/// Waits up to `left` until the pipe end `fd` is ready for `events` (or failed) or
/// `closed` ([`Proc::closed`], or -1) hangs up: whether each happened.
fn wait_pipe_or_closed(
    fd: RawFd,
    events: i16,
    closed: RawFd,
    left: Option<Duration>,
) -> io::Result<(bool, bool)> {
    let mut fds = [
        PollFd {
            fd,
            events,
            revents: 0,
        },
        PollFd {
            fd: closed,
            events: POLLIN,
            revents: 0,
        },
    ];
    signal::wait_ready(&mut fds, left)?;
    let [pipe, closed] = fds;
    Ok((pipe.revents != 0, closed.revents != 0))
}

/// What a request thread gets back.
enum Answer {
    Done(Result<Outcome, BackendError>),
    /// The worker exited before answering.
    Gone {
        code: Option<i32>,
        ended: Option<Ended>,
        stderr_tail: String,
    },
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Proc {
    fn new(slot: usize, pgid: u32, input: Option<(Input, PipeReader)>) -> Self {
        let (input, closed) = input.unzip();
        Proc {
            slot,
            pgid,
            started: Instant::now(),
            input: Mutex::new(input),
            writing: Mutex::new(()),
            closed,
            stdout: Mutex::new(None),
            pending: Mutex::default(),
            ready: AtomicBool::new(false),
            answered: AtomicBool::new(false),
            pipes_open: AtomicUsize::new(2),
            ended: Mutex::new(None),
            stderr_tail: Mutex::default(),
            reaped: Mutex::new(false),
        }
    }

    fn load(&self) -> usize {
        lock(&self.pending).len()
    }

    /// Closes stdin: a worker reading to EOF exits on its own.
    fn close_input(&self) {
        lock(&self.input).take();
    }

    /// Ends the worker for `why` (the first reason wins): stdin closed, SIGTERM.
    fn end(&self, why: Ended) {
        // No new request may go to a worker on its way out.
        self.ready.store(false, Ordering::SeqCst);
        lock(&self.ended).get_or_insert(why);
        self.close_input();
        let _ = self.signal(SIGTERM);
    }

    /// Sends `sig` to the worker's process group, unless the worker was reaped.
    fn signal(&self, sig: i32) -> io::Result<()> {
        let reaped = lock(&self.reaped);
        if *reaped {
            return Err(io::Error::other("the worker was reaped"));
        }
        kill_process_group(self.pgid, sig)
    }

    /// Ends what is left of the exited worker's group, then reaps it: only the unreaped
    /// worker keeps its pid (the pgid) from being handed to another process group.
    fn end_group_and_reap(&self, child: &mut Child) -> io::Result<std::process::ExitStatus> {
        if let Err(e) = wait_exited(self.pgid) {
            log::warn!("worker {}: waiting for its exit: {e}", self.slot);
        }
        // What it left in its group must not outlive it, nor hold the pipes.
        let _ = self.signal(SIGKILL);
        let mut reaped = lock(&self.reaped);
        *reaped = true;
        // A zombie by now (or SIGKILLed just above): this wait is short.
        child.wait()
    }

    /// Writes `line` to the worker's stdin, waiting for room in the pipe until
    /// `deadline`; `false` when the deadline passed first. A closed stdin, or one
    /// closed while we wait, ends the write (the rest of the line is not sent), as
    /// does a write error: the worker is going, and its `Gone` follows.
    fn send(&self, line: &[u8], deadline: Option<Instant>) -> bool {
        let _one = lock(&self.writing);
        let Some(stdin) = lock(&self.input).as_ref().map(|i| Arc::clone(&i.stdin)) else {
            return true;
        };
        let mut rest = line;
        while !rest.is_empty() {
            match (&*stdin).write(rest) {
                Ok(n) if n > 0 => rest = rest.get(n..).unwrap_or_default(),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    let left = deadline.map(|d| d.saturating_duration_since(Instant::now()));
                    if left.is_some_and(|l| l.is_zero()) {
                        return false;
                    }
                    // Closed since: a close after this look hangs up `closed`, and
                    // the poll returns at once.
                    if lock(&self.input).is_none() {
                        return true;
                    }
                    let closed = self.closed.as_ref().map_or(-1, AsRawFd::as_raw_fd);
                    if let Err(e) = wait_pipe_or_closed(stdin.as_raw_fd(), POLLOUT, closed, left) {
                        log::warn!("worker {}: waiting to write a request: {e}", self.slot);
                        return true;
                    }
                }
                // `Ok(0)` (never for a pipe) or an error: the worker is going.
                _ => return true,
            }
        }
        true
    }

    /// Hands `result` to the request `id`, if it is still waiting. `false` for an id
    /// we never sent or that was already answered.
    fn answer(&self, id: &str, result: Result<Outcome, BackendError>) -> bool {
        match lock(&self.pending).remove(id) {
            Some(tx) => {
                let _ = tx.send(Answer::Done(result));
                true
            }
            None => false,
        }
    }

    fn stderr_tail(&self) -> String {
        tail_text(&lock(&self.stderr_tail))
    }
}

impl Pool {
    fn new(settings: Settings) -> Self {
        Pool {
            settings,
            restart: true,
            state: Mutex::new(State::default()),
            changed: Condvar::new(),
        }
    }

    /// A pool whose workers run once: when one ends, [`Pool::acquire`] and
    /// [`Pool::wait_ready`] return why instead of waiting for a restart.
    fn without_restarts(settings: Settings) -> Self {
        Pool {
            restart: false,
            ..Pool::new(settings)
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }

    /// Starts the supervisors once; later calls do nothing. Every worker process
    /// is kept in `groups` from its start until it is reaped.
    fn start(
        self: &Arc<Self>,
        workspace_id: &str,
        api_url: &str,
        groups: &Groups,
    ) -> Result<(), BackendError> {
        let mut st = self.lock();
        if st.started {
            return Ok(());
        }
        if st.stopping {
            return Err(BackendError::Cancelled);
        }
        st.started = true;
        st.groups = groups.clone();
        st.slots = vec![None; self.settings.workers];
        let env = Arc::new([
            ("MOLECULE_WORKSPACE_ID", workspace_id.to_string()),
            ("MOLECULE_API_URL", api_url.to_string()),
        ]);
        for slot in 0..self.settings.workers {
            let (pool, env) = (Arc::clone(self), Arc::clone(&env));
            let h = thread::Builder::new()
                .name(format!("worker-{slot}-supervisor"))
                .spawn(move || pool.supervise(slot, &env[..]))
                .map_err(|e| BackendError::Spawn(format!("cannot start a thread: {e}")))?;
            st.supervisors.push(h);
        }
        log::info!(
            "worker: starting {} worker(s): {}",
            self.settings.workers,
            self.settings.cmd
        );
        Ok(())
    }

    /// Sends `req` to the least busy ready worker and waits for its answer.
    fn request(self: &Arc<Self>, req: &Request, run: &RunHandle) -> Result<Outcome, BackendError> {
        let timeout = self.settings.timeout;
        // The request's own timeout runs from when it is sent: a worker still
        // starting must not eat into it, or a slow start would time out (and kill)
        // a healthy worker on its first request, and again on every retry.
        let deadline = Instant::now().checked_add(self.settings.wait_for_worker());
        let (tx, rx) = mpsc::channel();
        let (id, proc) = {
            let mut st = self.lock();
            st.next_id = st.next_id.wrapping_add(1);
            let id = st.next_id.to_string();
            drop(st);
            let proc = self.acquire(&id, tx, run, deadline)?;
            (id, proc)
        };
        // A cancel (the drain ran out) ends the worker as a stop does: stdin closed
        // first, then the signal, which the worker refuses once it is reaped.
        let signal_worker = {
            let p = Arc::clone(&proc);
            Arc::new(move |sig| {
                p.close_input();
                let _ = p.signal(sig);
            })
        };
        if !run.started_with(proc.pgid, Some(signal_worker)) {
            lock(&proc.pending).remove(&id);
            run.finished();
            self.changed.notify_all();
            return Err(BackendError::Cancelled);
        }
        let deadline = Instant::now().checked_add(timeout);
        // What the worker printed before this request is not its answer. Between
        // requests nobody reads its stdout (a worker printing over 64 KiB then waits
        // for the next request): what is there now is read first.
        let mut early = Stopped::Budget;
        for _ in 0..EARLY_READS {
            early = self.read_stdout(&proc, Reading::Waiting, Some(Instant::now()), |_| false);
            if !matches!(early, Stopped::Budget) {
                break;
            }
        }
        // Still more: a line without an id may be part of it, not the answer.
        let orphans = !matches!(early, Stopped::Budget);
        // A worker that stops reading its stdin times out as one that stops answering.
        let answer = if proc.send(&encode(&id, req), deadline) {
            let mut got = None;
            self.read_stdout(&proc, Reading::Answer { orphans }, deadline, |_| {
                got = rx.try_recv().ok();
                got.is_some()
            });
            match got {
                Some(a) => Ok(a),
                None => {
                    let left =
                        deadline.map_or(timeout, |d| d.saturating_duration_since(Instant::now()));
                    rx.recv_timeout(left)
                }
            }
        } else {
            Err(RecvTimeoutError::Timeout)
        };
        let answer = match answer {
            Ok(a) => Some(a),
            Err(RecvTimeoutError::Disconnected) => None,
            Err(RecvTimeoutError::Timeout) => {
                log::warn!(
                    "worker {}: request {id} ran past its timeout of {}; restarting that worker",
                    proc.slot,
                    crate::duration::format(timeout)
                );
                proc.end(Ended::Timeout(id.clone()));
                // The attempt failed: a late answer is for an unknown id now, and it
                // does not spare the SIGKILL either; only the worker's exit does.
                lock(&proc.pending).remove(&id);
                if !self.wait_reaped(&proc, self.settings.kill_grace) {
                    let _ = proc.signal(SIGKILL);
                }
                run.finished();
                return Err(BackendError::Timeout {
                    after: timeout,
                    stderr_tail: proc.stderr_tail(),
                });
            }
        };
        run.finished();
        match answer {
            Some(Answer::Done(r)) => r,
            Some(gone) => Err(self.gone_error(gone, &id, run)),
            None => Err(BackendError::Spawn("lost track of the worker".into())),
        }
    }

    /// Waits for a ready worker with room, and registers request `id` with it.
    fn acquire(
        self: &Arc<Self>,
        id: &str,
        tx: Sender<Answer>,
        run: &RunHandle,
        deadline: Option<Instant>,
    ) -> Result<Arc<Proc>, BackendError> {
        struct ClearWaker<'a>(&'a RunHandle);
        impl Drop for ClearWaker<'_> {
            fn drop(&mut self) {
                self.0.set_waker(None);
            }
        }
        let _clear = ClearWaker(run);
        // A cancel while we wait must wake us: the waker takes our lock first, so its
        // notify cannot fall between our check and our wait.
        let me = Arc::clone(self);
        run.set_waker(Some(Arc::new(move || {
            drop(me.lock());
            me.changed.notify_all();
        })));
        let mut st = self.lock();
        loop {
            // Draining, a request not sent yet stays unsent (it runs again after
            // the restart).
            if st.stopping || st.draining || run.is_cancelled() {
                return Err(BackendError::Cancelled);
            }
            if let Some(e) = &st.gone {
                return Err(e.clone());
            }
            let best = st
                .slots
                .iter()
                .flatten()
                .filter(|p| p.ready.load(Ordering::SeqCst))
                .map(|p| (p.load(), p))
                .filter(|(n, _)| *n < self.settings.max_in_flight)
                .min_by_key(|(n, _)| *n)
                .map(|(_, p)| Arc::clone(p));
            if let Some(p) = best {
                lock(&p.pending).insert(id.to_string(), tx);
                return Ok(p);
            }
            let left = deadline.map(|d| d.saturating_duration_since(Instant::now()));
            if left.is_some_and(|l| l.is_zero()) {
                let why = if st.last_start_error.is_empty() {
                    "every worker is busy or starting".to_string()
                } else {
                    st.last_start_error.clone()
                };
                return Err(BackendError::Spawn(format!(
                    "no worker ready within {}: {why}",
                    crate::duration::format(self.settings.wait_for_worker())
                )));
            }
            st = match left {
                Some(l) => {
                    self.changed
                        .wait_timeout(st, l)
                        .unwrap_or_else(PoisonError::into_inner)
                        .0
                }
                None => self
                    .changed
                    .wait(st)
                    .unwrap_or_else(PoisonError::into_inner),
            };
        }
    }

    /// The error for a request whose worker exited before answering it.
    fn gone_error(&self, gone: Answer, id: &str, run: &RunHandle) -> BackendError {
        let Answer::Gone {
            code,
            ended,
            stderr_tail,
        } = gone
        else {
            return BackendError::Spawn("lost track of the worker".into());
        };
        if run.is_cancelled() {
            return BackendError::Cancelled;
        }
        match ended {
            Some(Ended::Stop) => BackendError::Cancelled,
            Some(Ended::Timeout(t)) if t == id => BackendError::Timeout {
                after: self.settings.timeout,
                stderr_tail,
            },
            // Not this request's fault: it goes again without counting a failure.
            Some(Ended::Timeout(_)) => BackendError::Later(
                "the worker was restarted because another request it held timed out".into(),
            ),
            Some(Ended::NotReady) | None => BackendError::Failed { code, stderr_tail },
        }
    }

    /// `doctor`: waits until slot 0's worker is ready, or (without restarts) ended.
    fn wait_ready(&self, within: Duration) -> Result<(), BackendError> {
        let deadline = Instant::now().checked_add(within);
        let mut st = self.lock();
        loop {
            if st
                .slots
                .iter()
                .flatten()
                .any(|p| p.ready.load(Ordering::SeqCst))
            {
                return Ok(());
            }
            if let Some(e) = &st.gone {
                return Err(e.clone());
            }
            let left = deadline.map_or(within, |d| d.saturating_duration_since(Instant::now()));
            if left.is_zero() {
                return Err(not_ready(within));
            }
            st = self
                .changed
                .wait_timeout(st, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }

    /// Draining or stopping: nothing new is sent or started.
    fn closing(&self) -> bool {
        let st = self.lock();
        st.stopping || st.draining
    }

    /// The runner stops: requests in flight go on, the ones waiting for a worker
    /// end as cancelled, and a worker that exits is not started again.
    fn drain(&self) {
        self.lock().draining = true;
        self.changed.notify_all();
    }

    /// Closes every worker's stdin, waits `kill_grace` for them to exit, then
    /// SIGTERM, `kill_grace`, SIGKILL; joins the supervisors.
    fn stop(&self) {
        let procs: Vec<Arc<Proc>> = {
            let mut st = self.lock();
            if st.stopping {
                return;
            }
            st.stopping = true;
            st.slots.iter().flatten().cloned().collect()
        };
        self.changed.notify_all();
        for p in &procs {
            lock(&p.ended).get_or_insert(Ended::Stop);
            p.close_input();
        }
        let grace = self.settings.kill_grace;
        for sig in [Some(SIGTERM), Some(SIGKILL), None] {
            if self.wait_all_exited(grace) {
                break;
            }
            let Some(sig) = sig else { break };
            for p in &procs {
                let _ = p.signal(sig);
            }
        }
        let supervisors = std::mem::take(&mut self.lock().supervisors);
        for h in supervisors {
            let _ = h.join();
        }
    }

    fn wait_all_exited(&self, within: Duration) -> bool {
        let st = self.lock();
        let (_st, timeout) = self
            .changed
            .wait_timeout_while(st, within, |s| s.slots.iter().any(Option::is_some))
            .unwrap_or_else(PoisonError::into_inner);
        !timeout.timed_out()
    }

    /// One slot's life: start the worker, wait for it to exit, restart it.
    fn supervise(self: &Arc<Self>, slot: usize, env: &[(&str, String)]) {
        let mut crashes: u32 = 0;
        let mut seed = crate::uuid::random_u64();
        loop {
            let Some((child, proc)) = self.launch(slot, env) else {
                return;
            };
            let healthy_start = self.run_worker(child, &proc);
            let ended = lock(&proc.ended).clone();
            if !self.restart || matches!(ended, Some(Ended::Stop)) || self.closing() {
                return;
            }
            if matches!(ended, Some(Ended::Timeout(_))) {
                // Our doing, not a crash: a fresh worker at once.
                continue;
            }
            if healthy_start {
                crashes = 0;
            }
            crashes = crashes.saturating_add(1);
            seed = seed.wrapping_add(1);
            let delay = RESTART.delay(crashes, seed);
            log::warn!("worker {slot}: restarting in {} ms", delay.as_millis());
            let st = self.lock();
            let (st, _) = self
                .changed
                .wait_timeout_while(st, delay, |s| !s.stopping && !s.draining)
                .unwrap_or_else(PoisonError::into_inner);
            if st.stopping || st.draining {
                return;
            }
        }
    }

    /// Starts the slot's process and its helper threads. `None` when stopping.
    /// A start that fails is counted and retried by the caller's loop.
    fn launch(
        self: &Arc<Self>,
        slot: usize,
        env: &[(&str, String)],
    ) -> Option<(Option<Child>, Arc<Proc>)> {
        let mut st = self.lock();
        if st.stopping || st.draining {
            return None;
        }
        let spawned = self.settings.command(env).spawn();
        let mut child = match spawned {
            Ok(c) => c,
            Err(e) => {
                let why = format!("cannot start the worker: {e}");
                log::error!("worker {slot}: {why}");
                start_failed(&mut st, why);
                drop(st);
                // A placeholder process that "exited" so the caller backs off.
                let proc = Arc::new(Proc::new(slot, 0, None));
                return Some((None, proc));
            }
        };
        let input = child.stdin.take().map(Input::new).transpose();
        let (input, input_error) = match input {
            Ok(i) => (i, None),
            Err(e) => (None, Some(e)),
        };
        let proc = Arc::new(Proc::new(slot, child.id(), input));
        st.slots[slot] = Some(Arc::clone(&proc));
        st.groups.add(proc.pgid);
        drop(st);
        let (stdout, stderr) = (child.stdout.take(), child.stderr.take());
        let (ready_tx, ready_rx) = mpsc::channel::<()>();
        let helpers = (|| -> io::Result<()> {
            if let Some(e) = input_error {
                return Err(e);
            }
            if let Some(err) = stderr {
                let (p, me) = (Arc::clone(&proc), Arc::clone(self));
                named(&format!("worker-{slot}-stderr"), move || {
                    log_stderr(err, &p, |level, line| log::log!(level, "{line}"));
                    me.pipe_closed(&p);
                })?;
            }
            let max = self.settings.max_output;
            match stdout {
                Some(out) if self.settings.max_in_flight == 1 => {
                    let closed = proc.closed.as_ref().map(PipeReader::try_clone);
                    let out = Stdout::new(out, closed.transpose()?);
                    *lock(&proc.stdout) = Some(Answers {
                        lines: Lines::new(out, max, ID_SCAN),
                        awaiting_ready: self.settings.ready,
                    });
                }
                Some(out) => {
                    let (p, me) = (Arc::clone(&proc), Arc::clone(self));
                    named(&format!("worker-{slot}-stdout"), move || {
                        me.read_answers(out, &p, max, ready_tx)
                    })?;
                }
                None => {}
            }
            Ok(())
        })();
        if let Err(e) = helpers {
            log::error!("worker {slot}: cannot set up its pipes and threads: {e}");
            proc.end(Ended::Stop);
            let _ = proc.signal(SIGKILL);
        }
        if self.settings.ready {
            let within = self.settings.start_timeout;
            let until = Instant::now().checked_add(within);
            // `None`: it exited first, or is being ended; the wait for its exit sees it.
            let said_ready =
                match self.read_stdout(&proc, Reading::Answer { orphans: true }, until, |r| r) {
                    Stopped::Done => Some(true),
                    Stopped::TimedOut | Stopped::Budget => Some(false),
                    Stopped::Eof | Stopped::Closed => None,
                    Stopped::NoReader => match ready_rx.recv_timeout(within) {
                        Ok(()) => Some(true),
                        Err(RecvTimeoutError::Timeout) => Some(false),
                        Err(RecvTimeoutError::Disconnected) => None,
                    },
                };
            match said_ready {
                Some(true) => self.became_ready(&proc),
                Some(false) => {
                    log::error!(
                        "worker {slot}: not ready within start_timeout {}; stopping it",
                        crate::duration::format(within)
                    );
                    proc.end(Ended::NotReady);
                    if !self.wait_pipes(&proc, self.settings.kill_grace) {
                        let _ = proc.signal(SIGKILL);
                    }
                }
                None => {}
            }
        } else {
            proc.ready.store(true, Ordering::SeqCst);
            // Through the lock: a request between its look at the slots and its
            // wait would miss a bare notify and wait out its whole timeout.
            drop(self.lock());
            self.changed.notify_all();
        }
        Some((Some(child), proc))
    }

    fn pipe_closed(&self, proc: &Proc) {
        proc.pipes_open.fetch_sub(1, Ordering::SeqCst);
        drop(self.lock());
        self.changed.notify_all();
    }

    fn became_ready(&self, proc: &Proc) {
        log::info!(
            "worker {}: ready after {} ms",
            proc.slot,
            proc.started.elapsed().as_millis()
        );
        proc.ready.store(true, Ordering::SeqCst);
        // Not the end of a crash loop yet: a worker that says it is ready and then
        // exits is still failing at start (see `run_worker`).
        drop(self.lock());
        self.changed.notify_all();
    }

    /// Waits for the worker to exit, then fails what it still held. Returns whether
    /// it got going (it answered, or ran long enough): a ready line alone does not
    /// count, or a worker exiting right after it would restart every 200 ms forever
    /// without the heartbeat ever saying wedged.
    fn run_worker(&self, child: Option<Child>, proc: &Arc<Proc>) -> bool {
        let slot = proc.slot;
        let Some(mut child) = child else {
            if !self.restart {
                let mut st = self.lock();
                let why = BackendError::Spawn(st.last_start_error.clone());
                st.gone.get_or_insert(why);
                drop(st);
                self.changed.notify_all();
            }
            return false;
        };
        let status = proc.end_group_and_reap(&mut child);
        self.lock().groups.remove(proc.pgid);
        // A request that timed out waits for this (`wait_reaped`).
        self.changed.notify_all();
        let code = status.as_ref().ok().and_then(|s| s.code());
        let how = match &status {
            Ok(s) => s.to_string(),
            Err(e) => format!("lost: {e}"),
        };
        // A request thread reading stdout leaves the rest to us once stdin is closed.
        proc.close_input();
        // Deliver the answers the worker wrote before it exited.
        if !self.wait_pipes(proc, PIPES_AFTER_EXIT) {
            log::warn!("worker {slot}: a process outside its group still holds its stdout");
        }
        let ended = lock(&proc.ended).clone();
        let got_going = proc.answered.load(Ordering::SeqCst)
            || proc.started.elapsed() >= self.settings.healthy_after;
        let stderr_tail = proc.stderr_tail();
        let held: Vec<Sender<Answer>> = {
            let mut st = self.lock();
            if st.slots[slot]
                .as_ref()
                .is_some_and(|p| Arc::ptr_eq(p, proc))
            {
                st.slots[slot] = None;
            }
            if matches!(ended, None | Some(Ended::NotReady)) && !got_going {
                start_failed(&mut st, format!("worker exited ({how}) at start"));
            }
            if !self.restart {
                // Under the same lock as the slot: no request can take it after this.
                let why = match &ended {
                    Some(Ended::NotReady) => not_ready(self.settings.start_timeout),
                    Some(Ended::Timeout(_)) => BackendError::Timeout {
                        after: self.settings.timeout,
                        stderr_tail: stderr_tail.clone(),
                    },
                    Some(Ended::Stop) => BackendError::Cancelled,
                    None => BackendError::Failed {
                        code,
                        stderr_tail: stderr_tail.clone(),
                    },
                };
                st.gone.get_or_insert(why);
            }
            lock(&proc.pending).drain().map(|(_, tx)| tx).collect()
        };
        self.changed.notify_all();
        if !matches!(ended, Some(Ended::Stop)) {
            let tail = if stderr_tail.is_empty() {
                String::new()
            } else {
                format!(" (stderr: {stderr_tail})")
            };
            log::warn!(
                "worker {slot}: exited ({how}) holding {} request(s){tail}",
                held.len()
            );
        }
        for tx in held {
            let _ = tx.send(Answer::Gone {
                code,
                ended: ended.clone(),
                stderr_tail: stderr_tail.clone(),
            });
        }
        got_going
    }

    /// The reader thread (`max_in_flight` > 1): routes answer lines to their requests.
    fn read_answers(&self, out: impl Read, proc: &Arc<Proc>, max: usize, ready: Sender<()>) {
        let mut awaiting_ready = self.settings.ready;
        let mut lines = Lines::new(out, max, ID_SCAN);
        while let Some(line) = lines.next_line() {
            if self.route(proc, &line, &mut awaiting_ready, true) {
                let _ = ready.send(());
            }
        }
        self.pipe_closed(proc);
    }

    /// Routes one stdout line to its request by `id`; a line without one goes to the
    /// only request in flight, if `orphans_to_the_one`. `true` for the ready line
    /// awaited (`awaiting_ready`, then cleared).
    fn route(
        &self,
        proc: &Proc,
        line: &Line,
        awaiting_ready: &mut bool,
        orphans_to_the_one: bool,
    ) -> bool {
        let slot = proc.slot;
        let max = self.settings.max_output;
        let (text, too_long) = match line {
            Line::Whole(b) => (String::from_utf8_lossy(b), false),
            Line::TooLong(prefix) => (String::from_utf8_lossy(prefix), true),
        };
        if text.trim().is_empty() {
            return false;
        }
        let obj = if too_long { None } else { answer_object(&text) };
        if let Some(o) = &obj
            && o.get("ready") == Some(&Value::Bool(true))
            && !o.contains_key("id")
        {
            if *awaiting_ready {
                *awaiting_ready = false;
                return true;
            }
            log::debug!("worker {slot}: ready line ignored");
            return false;
        }
        if *awaiting_ready {
            log::warn!("worker {slot}: ignoring output before its ready line");
            return false;
        }
        let id = match &obj {
            Some(o) => o.get("id").and_then(id_text),
            None => scan_id(&text),
        };
        let result = match (obj, too_long) {
            (_, true) => Err(BackendError::BadOutput(format!(
                "answer exceeds max_output {max} bytes"
            ))),
            (Some(o), false) => parse_answer(o),
            (None, false) => Err(BackendError::BadOutput(
                "worker answer is not a JSON object".into(),
            )),
        };
        let id = id.or_else(|| {
            // A line we cannot attribute belongs to the only request in flight.
            let pending = lock(&proc.pending);
            (orphans_to_the_one && pending.len() == 1)
                .then(|| pending.keys().next().cloned())
                .flatten()
        });
        match id {
            Some(id) if proc.answer(&id, result) => {
                proc.answered.store(true, Ordering::SeqCst);
                let mut st = self.lock();
                if st.start_failures > 0 {
                    st.start_failures = 0;
                }
                drop(st);
                // The worker has room again: a request waiting for one looks.
                self.changed.notify_all();
            }
            Some(id) => log::warn!("worker {slot}: answer for unknown id {id:?} ignored"),
            None => log::warn!(
                "worker {slot}: ignoring an output line without an id ({} bytes)",
                text.len()
            ),
        }
        false
    }

    /// Reads `proc`'s stdout on this thread (`max_in_flight=1`; else `NoReader`),
    /// routing every line, until `done` (told whether the line was the awaited ready
    /// line) says so, `deadline` passes, or EOF.
    fn read_stdout(
        &self,
        proc: &Proc,
        reading: Reading,
        deadline: Option<Instant>,
        mut done: impl FnMut(bool) -> bool,
    ) -> Stopped {
        let mut guard = lock(&proc.stdout);
        let Some(answers) = guard.as_mut() else {
            return Stopped::NoReader;
        };
        answers
            .lines
            .inner()
            .limit(deadline, !matches!(reading, Reading::Rest));
        let orphans = match reading {
            Reading::Answer { orphans } => orphans,
            Reading::Waiting => false,
            Reading::Rest => true,
        };
        loop {
            match answers.lines.try_next_line() {
                Ok(Some(line)) => {
                    if done(self.route(proc, &line, &mut answers.awaiting_ready, orphans)) {
                        return Stopped::Done;
                    }
                }
                Ok(None) => {
                    *guard = None;
                    drop(guard);
                    self.pipe_closed(proc);
                    return Stopped::Eof;
                }
                Err(e) if e.kind() == io::ErrorKind::TimedOut => {
                    return if answers.lines.inner().refused {
                        Stopped::Budget
                    } else {
                        Stopped::TimedOut
                    };
                }
                Err(_) => return Stopped::Closed,
            }
        }
    }

    /// Reads what is left on the worker's stdout (without a reader thread) and waits
    /// for both pipes to reach EOF, within `within`.
    fn wait_pipes(&self, proc: &Proc, within: Duration) -> bool {
        let until = Instant::now().checked_add(within);
        self.read_stdout(proc, Reading::Rest, until, |_| false);
        let left = until.map_or(within, |u| u.saturating_duration_since(Instant::now()));
        self.wait_reader(proc, left)
    }

    /// Waits until the worker was reaped (by its supervisor, which saw it exit).
    fn wait_reaped(&self, proc: &Proc, within: Duration) -> bool {
        let st = self.lock();
        let (_st, t) = self
            .changed
            .wait_timeout_while(st, within, |_| !*lock(&proc.reaped))
            .unwrap_or_else(PoisonError::into_inner);
        !t.timed_out()
    }

    /// Waits until the worker's stdout and stderr reached EOF (it exited, or closed
    /// them).
    fn wait_reader(&self, proc: &Proc, within: Duration) -> bool {
        let st = self.lock();
        let (_st, t) = self
            .changed
            .wait_timeout_while(st, within, |_| proc.pipes_open.load(Ordering::SeqCst) > 0)
            .unwrap_or_else(PoisonError::into_inner);
        !t.timed_out()
    }
}

/// A worker that did not say it is ready within `within` (`start_timeout`).
fn not_ready(within: Duration) -> BackendError {
    BackendError::Spawn(format!(
        "the worker did not say it is ready within {}",
        crate::duration::format(within)
    ))
}

fn start_failed(st: &mut State, why: String) {
    st.start_failures = st.start_failures.saturating_add(1);
    st.last_start_error = why;
}

fn named(name: &str, f: impl FnOnce() + Send + 'static) -> io::Result<JoinHandle<()>> {
    thread::Builder::new().name(name.into()).spawn(f)
}

/// The request line: `{"id":"7", …the exec backend's format=json object…}`, `id`
/// first so that even a shell worker can pick it out, then `env` if there is one.
fn encode(id: &str, req: &Request) -> Vec<u8> {
    let mut body = RequestJson::new(req);
    body.env = (!req.extra_env.is_empty()).then_some(&req.extra_env);
    let mut line = Vec::with_capacity(512 + req.text.len());
    line.extend_from_slice(b"{\"id\":\"");
    line.extend_from_slice(id.as_bytes());
    line.push(b'"');
    let open = line.len();
    body.write_to(&mut line);
    // The body's `{` becomes the `,` after the id.
    if let Some(b) = line.get_mut(open) {
        *b = b',';
    }
    line.push(b'\n');
    line
}

/// The keys of an answer line that we read; the rest (a worker such as `cat` echoes
/// the whole request) is skipped, not built into a tree.
#[derive(Deserialize)]
struct AnswerKeys {
    #[serde(default, deserialize_with = "present")]
    id: Option<Value>,
    #[serde(default, deserialize_with = "present")]
    ready: Option<Value>,
    #[serde(default, deserialize_with = "present")]
    error: Option<Value>,
    #[serde(default, deserialize_with = "present")]
    retry_later: Option<Value>,
    #[serde(default, deserialize_with = "present")]
    no_reply: Option<Value>,
    #[serde(default, deserialize_with = "present")]
    text: Option<Value>,
    #[serde(default, deserialize_with = "present")]
    parts: Option<Value>,
}

/// A key that is there is `Some`, even when its value is `null`.
fn present<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Value>, D::Error> {
    Value::deserialize(d).map(Some)
}

/// An answer line as a JSON object with the keys we read, or `None` when it is not
/// a JSON object. A line the short way cannot take (a key twice, say) is parsed
/// whole, so the outcome is the same either way, with one exception: a skipped
/// value is checked less strictly (a lone surrogate escape in it passes).
fn answer_object(text: &str) -> Option<Map<String, Value>> {
    if text.trim_start().starts_with('{')
        && let Ok(k) = serde_json::from_str::<AnswerKeys>(text)
    {
        let keys = [
            ("id", k.id),
            ("ready", k.ready),
            ("error", k.error),
            ("retry_later", k.retry_later),
            ("no_reply", k.no_reply),
            ("text", k.text),
            ("parts", k.parts),
        ];
        return Some(
            keys.into_iter()
                .filter_map(|(key, v)| Some((key.to_string(), v?)))
                .collect(),
        );
    }
    match serde_json::from_str::<Value>(text) {
        Ok(Value::Object(o)) => Some(o),
        _ => None,
    }
}

/// An answer object (its `id` already read) as an outcome.
fn parse_answer(mut o: Map<String, Value>) -> Result<Outcome, BackendError> {
    o.remove("id");
    let note = |v: &Value| match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    match o.get("error") {
        None | Some(Value::Null) | Some(Value::Bool(false)) => {}
        Some(e) => return Err(BackendError::Reported(note(e))),
    }
    match o.get("retry_later") {
        None | Some(Value::Null) | Some(Value::Bool(false)) => {}
        Some(Value::Bool(true)) => {
            return Err(BackendError::Later(
                "the worker asked to retry later".into(),
            ));
        }
        Some(m) => {
            return Err(BackendError::Later(format!(
                "the worker asked to retry later ({})",
                note(m)
            )));
        }
    }
    reply_from_object(o)
}

/// An `id` as we compare it: a string, or a number written as digits.
fn id_text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// Finds `"id": "…"` (or a number) in a line that is not valid JSON or was cut.
fn scan_id(text: &str) -> Option<String> {
    let at = text.find("\"id\"")?;
    let rest = text
        .get(at + 4..)?
        .trim_start()
        .strip_prefix(':')?
        .trim_start();
    if let Some(s) = rest.strip_prefix('"') {
        return s.split('"').next().map(str::to_string);
    }
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    (!digits.is_empty()).then_some(digits)
}

/// The stderr logger: each line to `log` (cut at [`STDERR_LINE`], at most
/// [`STDERR_BURST`] at once, then one per [`STDERR_REFILL`], and how many were left
/// out); the tail is kept for error messages.
fn log_stderr(err: impl Read, proc: &Proc, mut log: impl FnMut(log::Level, String)) {
    let slot = proc.slot;
    let mut lines = Lines::new(err, STDERR_LINE, STDERR_LINE);
    let mut tokens = STDERR_BURST;
    let mut refilled = Instant::now();
    let mut dropped: u64 = 0;
    let not_logged =
        |dropped: u64| format!("worker {slot}: {dropped} stderr line(s) not logged (too many)");
    while let Some(line) = lines.next_line() {
        let bytes = match &line {
            Line::Whole(b) | Line::TooLong(b) => b,
        };
        {
            let mut tail = lock(&proc.stderr_tail);
            tail.extend_from_slice(bytes);
            tail.push(b'\n');
            let excess = tail.len().saturating_sub(STDERR_KEEP);
            tail.drain(..excess);
        }
        let now = Instant::now();
        let earned =
            now.saturating_duration_since(refilled).as_millis() / STDERR_REFILL.as_millis();
        if earned > 0 {
            tokens =
                STDERR_BURST.min(tokens.saturating_add(u32::try_from(earned).unwrap_or(u32::MAX)));
            refilled = now;
        }
        if tokens == 0 {
            dropped += 1;
            continue;
        }
        tokens -= 1;
        if dropped > 0 {
            log(log::Level::Warn, not_logged(dropped));
            dropped = 0;
        }
        let cut = if matches!(line, Line::TooLong(_)) {
            " [cut]"
        } else {
            ""
        };
        log(
            log::Level::Info,
            format!(
                "worker {slot}: {}{cut}",
                String::from_utf8_lossy(bytes).trim_end()
            ),
        );
    }
    // A flood just before the exit (a traceback) still says what it left out.
    if dropped > 0 {
        log(log::Level::Warn, not_logged(dropped));
    }
}

/// A worker's stdout as a request thread reads it (`max_in_flight=1`): up to its
/// deadline (then `TimedOut`, even with more to read, past the one read that is
/// always allowed), and, while `watch_closed`, only until the worker's stdin is
/// closed (then `WouldBlock`): its end is near, and the thread that reaps it reads
/// what is left, however long a process outside the group holds the pipe.
struct Stdout {
    out: ChildStdout,
    /// [`Proc::closed`], shared: it hangs up when stdin is closed.
    closed: Option<PipeReader>,
    deadline: Option<Instant>,
    watch_closed: bool,
    /// The first read since [`Stdout::limit`] is not done yet.
    first: bool,
    /// The last `TimedOut` left something to read.
    refused: bool,
}

impl Stdout {
    fn new(out: ChildStdout, closed: Option<PipeReader>) -> Self {
        Stdout {
            out,
            closed,
            deadline: None,
            watch_closed: false,
            first: true,
            refused: false,
        }
    }

    /// The limits of the reads that follow.
    fn limit(&mut self, deadline: Option<Instant>, watch_closed: bool) {
        self.deadline = deadline;
        self.watch_closed = watch_closed;
        self.first = true;
        self.refused = false;
    }
}

impl Read for Stdout {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let closed = match &self.closed {
            Some(c) if self.watch_closed => c.as_raw_fd(),
            _ => -1,
        };
        loop {
            let left = self
                .deadline
                .map(|d| d.saturating_duration_since(Instant::now()));
            let past = left.is_some_and(|l| l.is_zero());
            let (readable, hung_up) =
                wait_pipe_or_closed(self.out.as_raw_fd(), POLLIN, closed, left)?;
            // Closed first: a worker that keeps printing must not keep us.
            if hung_up {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            if readable && (!past || self.first) {
                self.first = false;
                // Readable, at EOF or failed: the read says which, without blocking.
                return self.out.read(buf);
            }
            if past {
                self.refused = readable;
                return Err(io::ErrorKind::TimedOut.into());
            }
            // Woken early (a signal), or at the deadline: look again.
        }
    }
}

/// A line read with a cap.
enum Line {
    Whole(Vec<u8>),
    /// Longer than the cap: its first bytes only (the rest was read and dropped).
    TooLong(Vec<u8>),
}

/// Splits a stream into lines of at most `cap` bytes without ever holding more; of
/// a longer line the first `keep` bytes (at most `cap`) are kept. A line read in
/// part when the reader says "not now" is kept for the next call.
struct Lines<R> {
    r: BufReader<R>,
    cap: usize,
    keep: usize,
    /// The line read so far.
    line: Vec<u8>,
    too_long: bool,
}

impl<R: Read> Lines<R> {
    fn new(r: R, cap: usize, keep: usize) -> Self {
        Lines {
            r: BufReader::with_capacity(64 * 1024, r),
            cap,
            keep: keep.min(cap),
            line: Vec::new(),
            too_long: false,
        }
    }

    fn inner(&mut self) -> &mut R {
        self.r.get_mut()
    }

    /// The next line without its newline; `None` at EOF (or a read error).
    fn next_line(&mut self) -> Option<Line> {
        loop {
            match self.try_next_line() {
                Ok(line) => return line,
                // Only a reader that waits with a limit says "not now".
                Err(_) => continue,
            }
        }
    }

    /// As [`Lines::next_line`], but a read that fails with `TimedOut` or
    /// `WouldBlock` is returned, the part of the line read so far kept.
    fn try_next_line(&mut self) -> io::Result<Option<Line>> {
        loop {
            let avail = match self.r.fill_buf() {
                Ok(a) => a,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock
                    ) =>
                {
                    return Err(e);
                }
                Err(_) => &[],
            };
            if avail.is_empty() {
                let line = std::mem::take(&mut self.line);
                let too_long = std::mem::take(&mut self.too_long);
                return Ok(match (line.is_empty() && !too_long, too_long) {
                    (true, _) => None,
                    (false, true) => Some(Line::TooLong(line)),
                    (false, false) => Some(Line::Whole(line)),
                });
            }
            let (chunk, used, end) = match avail.iter().position(|b| *b == b'\n') {
                Some(i) => (avail.get(..i).unwrap_or_default(), i + 1, true),
                None => (avail, avail.len(), false),
            };
            if !self.too_long {
                if self.line.len() + chunk.len() > self.cap {
                    self.too_long = true;
                    let keep = self.keep.saturating_sub(self.line.len().min(self.keep));
                    self.line
                        .extend_from_slice(chunk.get(..keep.min(chunk.len())).unwrap_or_default());
                    self.line.truncate(self.keep);
                } else {
                    self.line.extend_from_slice(chunk);
                }
            }
            self.r.consume(used);
            if end {
                let line = std::mem::take(&mut self.line);
                return Ok(Some(if std::mem::take(&mut self.too_long) {
                    Line::TooLong(line)
                } else {
                    Line::Whole(line)
                }));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::{Path, PathBuf};

    /// The example worker, as shipped.
    const EXAMPLE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/examples/worker.py");

    fn backend(pairs: &[(&str, &str)]) -> WorkerBackend {
        let opts = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        WorkerBackend::from_opts(&opts, 1).unwrap()
    }

    fn req(text: &str) -> Request {
        let mut r = probe_request();
        r.text = text.into();
        r.method = "message/send".into();
        r.activity_id = "act-1".into();
        r
    }

    fn ask(b: &WorkerBackend, text: &str) -> Result<Outcome, BackendError> {
        b.handle(&req(text), &RunHandle::new())
    }

    fn text(r: Result<Outcome, BackendError>) -> String {
        match r {
            Ok(Outcome::Reply(r)) => r.text,
            other => panic!("expected a reply, got {other:?}"),
        }
    }

    /// A fresh directory per test, removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new() -> Self {
            let p = std::env::temp_dir().join(format!("molecule-worker-{}", crate::uuid::new_v4()));
            std::fs::create_dir_all(&p).unwrap();
            TempDir(p)
        }
        fn file(&self, name: &str) -> String {
            self.0.join(name).display().to_string()
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// Whether the process `pid` runs: not gone and not a zombie (PID 1 here may not
    /// reap), whichever group it is in.
    fn alive(pid: u32) -> bool {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok();
        let state = stat.and_then(|s| s.rsplit(") ").next().and_then(|r| r.chars().next()));
        !matches!(state, None | Some('Z' | 'X'))
    }

    fn read_pid(path: &str) -> u32 {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(pid) = std::fs::read_to_string(path)
                .ok()
                .and_then(|s| s.trim().parse().ok())
            {
                return pid;
            }
            assert!(Instant::now() < deadline, "no pid in {path}");
            thread::sleep(Duration::from_millis(10));
        }
    }

    fn gone(pid: u32) -> bool {
        let deadline = Instant::now() + Duration::from_secs(10);
        while alive(pid) {
            if Instant::now() > deadline {
                return false;
            }
            thread::sleep(Duration::from_millis(10));
        }
        true
    }

    /// What [`Backend::trouble`] reports, once it does.
    fn wait_for_trouble(b: &WorkerBackend) -> String {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(t) = b.trouble() {
                return t;
            }
            assert!(Instant::now() < deadline, "never reported");
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// A shell worker answering each request with `reply` (`$id` expands), after
    /// running `before` (which sees `$l`, the request line).
    fn sh_worker(before: &str, reply: &str) -> String {
        format!(
            "echo $$ >> \"$PIDS\"; while IFS= read -r l; do id=${{l#'{{\"id\":\"'}}; id=${{id%%'\"'*}}; {before} printf '%s\\n' \"{reply}\"; done"
        )
    }

    #[test]
    fn example_worker_round_trip() {
        let b = backend(&[("cmd", &format!("python3 {EXAMPLE}")), ("ready", "true")]);
        assert_eq!(text(ask(&b, "héllo\nworld")), "echo: héllo\nworld");
        assert_eq!(text(ask(&b, "again")), "echo: again");
        let mut d = req("done");
        d.origin = Origin::DelegationResult;
        assert_eq!(b.handle(&d, &RunHandle::new()).unwrap(), Outcome::NoReply);
        b.stop();
        assert!(b.pool.lock().slots.iter().all(Option::is_none));
    }

    #[test]
    fn worker_environment_is_execs_without_the_supervisors() {
        let s = backend(&[("cmd", "cat")]).pool.settings.clone();
        let env = [
            ("MOLECULE_WORKSPACE_ID", "ws-1".to_string()),
            ("MOLECULE_API_URL", String::new()),
        ];
        let cmd = s.command(&env);
        let set: BTreeMap<String, Option<String>> = cmd
            .get_envs()
            .map(|(k, v)| {
                let text = |o: &std::ffi::OsStr| o.to_string_lossy().into_owned();
                (text(k), v.map(text))
            })
            .collect();
        for var in ["NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"] {
            assert_eq!(set.get(var), Some(&None), "{var} must be removed: {set:?}");
        }
        assert_eq!(set["MOLECULE_WORKSPACE_ID"].as_deref(), Some("ws-1"));
        assert!(!set.contains_key("MOLECULE_API_URL"), "{set:?}");
    }

    #[test]
    fn request_line_carries_the_whole_request() {
        let dir = TempDir::new();
        let seen = dir.file("seen");
        let cmd = format!(
            "while IFS= read -r l; do printf '%s\\n' \"$l\" >> '{seen}'; echo '{{\"id\":\"1\",\"no_reply\":true}}'; done"
        );
        let b = backend(&[("cmd", &cmd)]);
        let mut r = req("hi");
        r.caller_id = Some("peer-1".into());
        r.attempt = 2;
        r.raw = serde_json::json!({"id": 9});
        r.attachments = vec![serde_json::json!({"uri": "platform-pending:f1", "name": "a.txt"})];
        r.request_id = Some("req-3".into());
        r.extra_env
            .insert("MOLECULE_DELEGATION_ID".into(), "d-1".into());
        assert_eq!(b.handle(&r, &RunHandle::new()).unwrap(), Outcome::NoReply);
        b.stop();
        let line = std::fs::read_to_string(&seen).unwrap();
        assert!(line.starts_with("{\"id\":\"1\",\"activity_id\":"), "{line}");
        let v: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["text"], "hi");
        assert_eq!(v["caller_id"], "peer-1");
        assert_eq!(v["attempt"], 2);
        assert_eq!(v["origin"], "canvas");
        assert_eq!(v["request"]["id"], 9);
        assert_eq!(v["attachments"][0]["uri"], "platform-pending:f1");
        assert_eq!(v["request_id"], "req-3");
        assert_eq!(v["env"]["MOLECULE_DELEGATION_ID"], "d-1");
    }

    /// [`encode`] through the request's JSON tree.
    fn encode_tree(id: &str, req: &Request) -> Vec<u8> {
        let mut v = super::super::exec::request_tree(req);
        if !req.extra_env.is_empty() {
            v["env"] = serde_json::json!(req.extra_env);
        }
        let body = v.to_string();
        let mut line = format!("{{\"id\":\"{id}\",");
        line.push_str(body.strip_prefix('{').unwrap_or(&body));
        line.push('\n');
        line.into_bytes()
    }

    #[test]
    fn the_request_line_is_written_as_its_json_tree_would_be() {
        let mut r = req("hi \"there\"\n");
        assert_eq!(encode("7", &r), encode_tree("7", &r));
        r.caller_id = Some("peer-1".into());
        r.caller_name = Some("Peer".into());
        r.context_id = Some("ctx".into());
        r.attempt = 3;
        r.origin = Origin::Peer;
        r.raw = serde_json::json!({"b": [1, 2.5, null], "a": {"z": "\u{e9}\t</x>"}});
        r.other_parts = vec![serde_json::json!({"kind": "data", "data": {"k": 1}})];
        r.attachments = vec![serde_json::json!({"uri": "u", "name": "n"})];
        r.extra_env
            .insert("MOLECULE_DELEGATION_ID".into(), "d-1".into());
        let line = encode("12", &r);
        assert_eq!(line, encode_tree("12", &r));
        assert!(line.starts_with(b"{\"id\":\"12\",\"activity_id\":"));
        assert!(line.ends_with(b"}\n"));
    }

    #[test]
    fn answer_lines_read_as_their_whole_object_would() {
        let whole = |t: &str| match serde_json::from_str::<Value>(t) {
            Ok(Value::Object(o)) => {
                let keys = [
                    "id",
                    "ready",
                    "error",
                    "retry_later",
                    "no_reply",
                    "text",
                    "parts",
                ];
                Some(
                    o.into_iter()
                        .filter(|(k, _)| keys.contains(&k.as_str()))
                        .collect(),
                )
            }
            _ => None,
        };
        for line in [
            r#"{"id":"1","text":"hi","request":{"big":[1,2,{"x":null}]},"method":"m"}"#,
            r#"{"id":null,"ready":true}"#,
            r#"{"ready":true}"#,
            r#"{"id":7,"parts":[{"kind":"text","text":"p"}],"no_reply":false}"#,
            r#"{"id":"2","error":{"why":"x"},"retry_later":"soon"}"#,
            r#"{"id":"1","text":"a","text":"b"}"#,
            r#"  {"id":"3","text":"x"}  "#,
            r#"{"id":"3","text":"x"} trailing"#,
            r#"["id","text"]"#,
            r#"{"id":"4","other":[1,2"#,
            "not json",
            "{}",
        ] {
            assert_eq!(answer_object(line), whole(line), "{line}");
        }
        // The one difference: a skipped value is not checked as strictly.
        let lone = r#"{"id":"5","text":"x","request":"\ud800"}"#;
        assert_eq!(whole(lone), None);
        let o = answer_object(lone).unwrap();
        assert_eq!(
            (&o["id"], &o["text"], o.len()),
            (&"5".into(), &"x".into(), 2)
        );
    }

    #[test]
    fn answers_map_to_outcomes() {
        let dir = TempDir::new();
        let cmd = format!(
            "while IFS= read -r l; do id=${{l#'{{\"id\":\"'}}; id=${{id%%'\"'*}}; case $id in \
             1) printf '{{\"id\":%s,\"parts\":[{{\"type\":\"file\",\"file\":{{\"uri\":\"u\"}}}}]}}\\n' $id;; \
             2) printf '{{\"id\":\"%s\",\"retry_later\":true}}\\n' $id;; \
             3) printf '{{\"id\":\"%s\",\"error\":\"boom\"}}\\n' $id;; \
             4) printf '{{\"id\":\"%s\",\"text\":1}}\\n' $id;; \
             5) echo 'not json at all';; \
             6) printf '{{\"id\":\"999\",\"text\":\"stray\"}}\\n{{\"id\":\"%s\",\"text\":\"%080d\"}}\\n' $id 0;; \
             *) printf '{{\"id\":\"%s\",\"text\":\"fine\"}}\\n' $id;; esac; done # {}",
            dir.file("x")
        );
        let b = backend(&[("cmd", &cmd), ("max_output", "60")]);
        match ask(&b, "1").unwrap() {
            Outcome::Reply(r) => assert_eq!(r.parts[0]["kind"], "file"),
            other => panic!("{other:?}"),
        }
        let e = ask(&b, "2").unwrap_err();
        assert!(e.is_retry_later(), "{e}");
        let e = ask(&b, "3").unwrap_err();
        assert!(
            matches!(&e, BackendError::Reported(m) if m == "boom"),
            "{e:?}"
        );
        assert!(matches!(ask(&b, "4"), Err(BackendError::BadOutput(_))));
        // Not JSON: it fails the only request in flight, and nothing else.
        assert!(matches!(ask(&b, "5"), Err(BackendError::BadOutput(_))));
        // An unknown id is logged; an answer over max_output fails its own request.
        match ask(&b, "6") {
            Err(BackendError::BadOutput(m)) => assert_eq!(m, "answer exceeds max_output 60 bytes"),
            other => panic!("{other:?}"),
        }
        // The same worker goes on.
        assert_eq!(text(ask(&b, "7")), "fine");
        assert_eq!(b.pool.lock().start_failures, 0);
        b.stop();
    }

    #[test]
    fn several_in_flight_answered_out_of_order() {
        // Reads three requests, answers them last first, each with its own text.
        let cmd = "python3 -c 'import json, sys\n\
                   held = []\n\
                   for l in sys.stdin:\n\
                   \x20   held.append(json.loads(l))\n\
                   \x20   if len(held) == 3:\n\
                   \x20       for r in reversed(held): print(json.dumps({\"id\": r[\"id\"], \"text\": \"for \" + r[\"text\"]}), flush=True)\n\
                   \x20       held = []'";
        let b = Arc::new(backend(&[
            ("cmd", cmd),
            ("workers", "1"),
            ("max_in_flight", "3"),
        ]));
        let threads: Vec<_> = ["a", "b", "c"]
            .into_iter()
            .map(|t| {
                let b = Arc::clone(&b);
                thread::spawn(move || (t, text(ask(&b, t))))
            })
            .collect();
        for t in threads {
            let (asked, got) = t.join().unwrap();
            assert_eq!(
                got,
                format!("for {asked}"),
                "an answer went to another request"
            );
        }
        b.stop();
    }

    #[test]
    fn timeout_ends_the_group_and_a_fresh_worker_answers() {
        let dir = TempDir::new();
        let pids = dir.file("pids");
        let child = dir.file("child");
        let cmd = sh_worker(
            &format!(
                "case \"$l\" in *'\"text\":\"hang\"'*) sleep 30 & echo $! > '{child}'; trap '' TERM; wait;; esac;"
            ),
            "{\\\"id\\\":\\\"$id\\\",\\\"text\\\":\\\"ok\\\"}",
        );
        let b = backend(&[("cmd", &cmd), ("timeout", "300ms"), ("kill_grace", "200ms")]);
        let b = with_env(b, &pids);
        let started = Instant::now();
        let e = ask(&b, "hang").unwrap_err();
        assert!(matches!(e, BackendError::Timeout { .. }), "{e:?}");
        assert!(started.elapsed() < Duration::from_secs(5));
        assert!(gone(read_pid(&child)), "the worker's child survived");
        assert_eq!(text(ask(&b, "next")), "ok");
        let first = read_first_pid(&pids);
        assert!(gone(first), "the timed-out worker survived");
        b.stop();
    }

    /// Makes `PIDS` visible to the worker: options are the only input, so the path
    /// goes into the command itself.
    fn with_env(b: WorkerBackend, pids: &str) -> WorkerBackend {
        let mut s = b.pool.settings.clone();
        s.cmd = format!("PIDS='{pids}'; {}", s.cmd);
        WorkerBackend {
            pool: Arc::new(Pool::new(s)),
        }
    }

    fn read_first_pid(path: &str) -> u32 {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let first = std::fs::read_to_string(path)
                .ok()
                .and_then(|s| s.lines().next()?.trim().parse().ok());
            if let Some(pid) = first {
                return pid;
            }
            assert!(Instant::now() < deadline, "no pid in {path}");
            thread::sleep(Duration::from_millis(10));
        }
    }

    #[test]
    fn crash_mid_request_fails_that_attempt_and_restarts() {
        let dir = TempDir::new();
        let pids = dir.file("pids");
        let marker = dir.file("crashed");
        let left = dir.file("left");
        // The first worker also leaves a detached process in its group.
        let cmd = sh_worker(
            &format!(
                "if [ ! -e '{marker}' ]; then : > '{marker}'; sleep 30 >/dev/null 2>&1 & echo $! > '{left}'; echo dying >&2; exit 3; fi;"
            ),
            "{\\\"id\\\":\\\"$id\\\",\\\"text\\\":\\\"ok\\\"}",
        );
        let b = with_env(backend(&[("cmd", &cmd)]), &pids);
        match ask(&b, "x") {
            Err(BackendError::Failed {
                code: Some(3),
                stderr_tail,
            }) => assert_eq!(stderr_tail, "dying"),
            other => panic!("{other:?}"),
        }
        assert!(gone(read_pid(&left)), "the process left behind survived");
        assert_eq!(text(ask(&b, "x")), "ok");
        b.stop();
        for pid in std::fs::read_to_string(&pids).unwrap().lines() {
            assert!(gone(pid.parse().unwrap()), "worker {pid} survived");
        }
    }

    #[test]
    fn a_line_printed_between_requests_is_no_answer_to_the_next() {
        // One write: the first answer, then a line without an id; the request reading
        // its answer stops after the first, the second line waits in the buffer.
        let cmd = concat!(
            "IFS= read -r l; id=${l#'{\"id\":\"'}; id=${id%%'\"'*};",
            " printf '{\"id\":\"%s\",\"text\":\"one\"}\\n{\"text\":\"stray\"}\\n' \"$id\";",
            " IFS= read -r l; id=${l#'{\"id\":\"'}; id=${id%%'\"'*};",
            " printf '{\"id\":\"%s\",\"text\":\"two\"}\\n' \"$id\"; read -r l",
        );
        // (With a reader thread, the stray line races the next request.)
        let b = backend(&[("cmd", cmd)]);
        assert_eq!(text(ask(&b, "a")), "one");
        assert_eq!(text(ask(&b, "b")), "two");
        b.stop();
    }

    #[test]
    fn what_a_worker_printed_before_the_request_is_no_answer_to_it() {
        let dir = TempDir::new();
        let printed = dir.file("printed");
        // A banner of 2,000 lines without an id, printed before any request.
        let cmd = format!(
            "i=0; while [ $i -lt 2000 ]; do echo \"banner line $i\"; i=$((i+1)); done; echo $$ > '{printed}'; {}",
            sh_worker("", "{\\\"id\\\":\\\"$id\\\",\\\"text\\\":\\\"ok\\\"}")
        );
        let b = with_env(backend(&[("cmd", &cmd)]), &dir.file("pids"));
        b.start("", "", &Groups::default()).unwrap();
        read_pid(&printed);
        assert_eq!(text(ask(&b, "x")), "ok");
        b.stop();
    }

    #[test]
    fn a_worker_that_keeps_printing_still_times_out() {
        let b = backend(&[
            ("cmd", "IFS= read -r l; exec yes '{\"id\":\"nobody\"}'"),
            ("timeout", "300ms"),
            ("kill_grace", "100ms"),
        ]);
        match ask(&b, "x") {
            Err(BackendError::Timeout { .. }) => {}
            other => panic!("{other:?}"),
        }
        b.stop();
    }

    #[test]
    fn a_crash_while_a_process_outside_the_group_holds_stdout_ends_the_request() {
        let dir = TempDir::new();
        let left = dir.file("left");
        // The worker leaves a process in a session of its own, holding its stdout,
        // and exits: its request ends with the crash, not at its timeout.
        let cmd = format!(
            "IFS= read -r l; python3 -c 'import os,sys,time; os.setsid(); open(sys.argv[1], \"w\").write(str(os.getpid())); time.sleep(60)' '{left}' & i=0; while [ ! -s '{left}' ] && [ $i -lt 1000 ]; do sleep 0.01; i=$((i+1)); done; exit 3"
        );
        let b = backend(&[("cmd", &cmd), ("timeout", "60s")]);
        let asked = Instant::now();
        let r = ask(&b, "x");
        let took = asked.elapsed();
        let _ = Command::new("kill")
            .arg(read_pid(&left).to_string())
            .status();
        match r {
            Err(BackendError::Failed { code: Some(3), .. }) => {}
            other => panic!("{other:?}"),
        }
        assert!(took < Duration::from_secs(30), "it waited {took:?}");
        b.stop();
    }

    #[test]
    fn crash_loop_at_start_is_trouble() {
        let b = backend(&[("cmd", "echo broken >&2; exit 1"), ("timeout", "300ms")]);
        b.start("ws", "http://127.0.0.1:1", &Groups::default())
            .unwrap();
        let t = wait_for_trouble(&b);
        assert!(t.starts_with("worker keeps failing at start"), "{t}");
        assert!(
            !t.contains("broken"),
            "stderr must stay out of the heartbeat: {t}"
        );
        // A request meanwhile fails its attempt instead of waiting forever.
        let e = ask(&b, "x").unwrap_err();
        assert!(e.to_string().contains("no worker ready"), "{e}");
        b.stop();
    }

    #[test]
    fn exiting_right_after_the_ready_line_is_a_crash_loop_too() {
        let b = backend(&[
            ("cmd", "echo '{\"ready\":true}'; exit 1"),
            ("ready", "true"),
        ]);
        b.start("", "", &Groups::default()).unwrap();
        wait_for_trouble(&b);
        b.stop();
    }

    #[test]
    fn a_crash_loop_that_ends_is_no_longer_trouble() {
        let dir = TempDir::new();
        let fixed = dir.file("fixed");
        let cmd = format!("if [ -e '{fixed}' ]; then exec cat; fi; exit 1");
        let mut s = backend(&[("cmd", &cmd), ("kill_grace", "100ms")])
            .pool
            .settings
            .clone();
        s.healthy_after = Duration::from_millis(300);
        let b = WorkerBackend::new(s);
        b.start("", "", &Groups::default()).unwrap();
        wait_for_trouble(&b);
        let deadline = Instant::now() + Duration::from_secs(20);
        // Fixed: the next start stays up, and nothing is asked of it.
        std::fs::write(&fixed, "").unwrap();
        while let Some(t) = b.trouble() {
            assert!(Instant::now() < deadline, "still reported: {t}");
            thread::sleep(Duration::from_millis(20));
        }
        b.stop();
    }

    #[test]
    fn ready_line_gates_requests_and_start_timeout_applies() {
        let dir = TempDir::new();
        let early = dir.file("early");
        // Half a second before its ready line, it looks whether a request came early.
        let cmd = format!(
            "python3 -c 'import json, select, sys\n\
             if select.select([sys.stdin], [], [], 0.5)[0]: open(\"{early}\", \"w\").write(\"x\")\n\
             print(json.dumps({{\"ready\": True}}), flush=True)\n\
             for l in sys.stdin: print(json.dumps({{\"id\": json.loads(l)[\"id\"], \"text\": \"ok\"}}), flush=True)'"
        );
        let b = backend(&[("cmd", &cmd), ("ready", "true")]);
        assert_eq!(text(ask(&b, "x")), "ok");
        b.stop();
        assert!(!Path::new(&early).exists());

        let b = backend(&[
            ("cmd", "sleep 30"),
            ("ready", "true"),
            ("start_timeout", "200ms"),
            ("kill_grace", "100ms"),
        ]);
        b.start("", "", &Groups::default()).unwrap();
        wait_for_trouble(&b);
        b.stop();
    }

    #[test]
    fn a_late_answer_does_not_spare_a_timed_out_worker_the_sigkill() {
        let dir = TempDir::new();
        let pids = dir.file("pids");
        // Answers when it gets SIGTERM (after the timeout, within the grace), then
        // ignores it and stdin's EOF: only SIGKILL ends it.
        let cmd = r#"echo $$ >> "$PIDS"; trap 'printf "%s\n" "{\"id\":\"$id\",\"text\":\"late\"}"' TERM; while IFS= read -r l; do id=${l#'{"id":"'}; id=${id%%'"'*}; sleep 30 & wait $!; done; trap '' TERM; while :; do sleep 1; done"#;
        let b = with_env(
            backend(&[("cmd", cmd), ("timeout", "300ms"), ("kill_grace", "300ms")]),
            &pids,
        );
        let e = ask(&b, "x").unwrap_err();
        assert!(matches!(e, BackendError::Timeout { .. }), "{e:?}");
        let pid = read_first_pid(&pids);
        // Should it survive, it must not outlive the test.
        struct KillOnDrop(u32);
        impl Drop for KillOnDrop {
            fn drop(&mut self) {
                if alive(self.0) {
                    let _ = kill_process_group(self.0, SIGKILL);
                }
            }
        }
        let _guard = KillOnDrop(pid);
        assert!(gone(pid), "the timed-out worker survived");
        b.stop();
    }

    #[test]
    fn a_slow_start_does_not_count_against_the_first_requests_timeout() {
        // Ready after 1.5 s, then answers at once: the request, sent after the ready
        // line, takes far less than its 1 s timeout.
        let cmd = "sleep 1.5; echo '{\"ready\":true}'; while IFS= read -r l; do \
                   id=${l#'{\"id\":\"'}; id=${id%%'\"'*}; \
                   printf '{\"id\":\"%s\",\"text\":\"ok\"}\\n' $id; done";
        let b = backend(&[("cmd", cmd), ("ready", "true"), ("timeout", "1s")]);
        assert_eq!(text(ask(&b, "x")), "ok");
        assert_eq!(text(ask(&b, "y")), "ok");
        b.stop();
    }

    #[test]
    fn drain_lets_the_request_in_flight_finish_and_sends_no_more() {
        let dir = TempDir::new();
        let (seen, go) = (dir.file("seen"), dir.file("go"));
        // Notes each request, and answers it once `go` exists.
        let cmd = sh_worker(
            &format!(
                "printf '%s\\n' \"$l\" >> '{seen}'; while [ ! -e '{go}' ]; do sleep 0.05; done;"
            ),
            "{\\\"id\\\":\\\"$id\\\",\\\"text\\\":\\\"ok\\\"}",
        );
        let b = Arc::new(with_env(backend(&[("cmd", &cmd)]), &dir.file("pids")));
        let ask_in_thread = |text: &'static str| {
            let b = Arc::clone(&b);
            thread::spawn(move || ask(&b, text))
        };
        let first = ask_in_thread("one");
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::fs::read_to_string(&seen)
            .unwrap_or_default()
            .is_empty()
        {
            assert!(Instant::now() < deadline, "the first request never came");
            thread::sleep(Duration::from_millis(10));
        }
        // The only worker is busy: this one waits for it.
        let second = ask_in_thread("two");
        b.drain();
        std::fs::write(&go, "").unwrap();
        assert_eq!(text(first.join().unwrap()), "ok");
        assert!(matches!(
            second.join().unwrap(),
            Err(BackendError::Cancelled)
        ));
        let lines = std::fs::read_to_string(&seen).unwrap();
        assert_eq!(lines.lines().count(), 1, "sent while draining: {lines}");
        b.stop();
    }

    #[test]
    fn stop_closes_stdin_then_kills() {
        let dir = TempDir::new();
        let pids = dir.file("pids");
        // One worker exits on EOF, the other ignores it and TERM.
        for cmd in [
            "echo $$ >> \"$PIDS\"; cat >/dev/null",
            "echo $$ >> \"$PIDS\"; trap '' TERM; while :; do sleep 1; done",
        ] {
            let b = with_env(backend(&[("cmd", cmd), ("kill_grace", "200ms")]), &pids);
            b.start("", "", &Groups::default()).unwrap();
            let pid = read_first_pid(&pids);
            let started = Instant::now();
            b.stop();
            assert!(started.elapsed() < Duration::from_secs(5));
            assert!(gone(pid), "{cmd}: survived");
            std::fs::remove_file(&pids).unwrap();
            assert!(matches!(ask(&b, "x"), Err(BackendError::Cancelled)));
        }
    }

    #[test]
    fn a_cancel_closes_the_workers_stdin_before_the_signal() {
        // Takes requests without answering; ignores SIGTERM, exits at stdin's EOF.
        let cmd = "exec python3 -c 'import os, signal, sys, threading, time\n\
                   signal.signal(signal.SIGTERM, signal.SIG_IGN)\n\
                   def read():\n\
                   \x20   for l in sys.stdin: print(\"got\", file=sys.stderr, flush=True)\n\
                   \x20   os._exit(0)\n\
                   threading.Thread(target=read, daemon=True).start()\n\
                   time.sleep(60)'";
        let b = Arc::new(backend(&[("cmd", cmd), ("timeout", "20s")]));
        let (run, t) = handle_in_thread(&b, req("x"));
        wait_for_stderr(&b, "got");
        run.cancel(SIGTERM);
        // It exits on the EOF: the request ends now, not at its 20 s timeout.
        assert!(matches!(t.join().unwrap(), Err(BackendError::Cancelled)));
        b.stop();
    }

    /// `req` handled in a thread, with the run handle that can cancel it.
    fn handle_in_thread(
        b: &Arc<WorkerBackend>,
        req: Request,
    ) -> (RunHandle, JoinHandle<Result<Outcome, BackendError>>) {
        let run = RunHandle::new();
        let (b, r) = (Arc::clone(b), run.clone());
        (run, thread::spawn(move || b.handle(&req, &r)))
    }

    /// Waits until a worker's stderr tail is `want` (it got the request).
    fn wait_for_stderr(b: &WorkerBackend, want: &str) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !b
            .pool
            .lock()
            .slots
            .iter()
            .flatten()
            .any(|p| p.stderr_tail() == want)
        {
            assert!(Instant::now() < deadline, "the request never came");
            thread::sleep(Duration::from_millis(10));
        }
    }

    #[test]
    fn a_worker_that_does_not_read_its_stdin_still_times_out() {
        // Far more than a pipe holds: the write itself waits, until the timeout.
        let b = backend(&[
            ("cmd", "sleep 30"),
            ("timeout", "300ms"),
            ("kill_grace", "100ms"),
        ]);
        let started = Instant::now();
        let e = ask(&b, &"x".repeat(4 << 20)).unwrap_err();
        assert!(matches!(e, BackendError::Timeout { .. }), "{e:?}");
        assert!(started.elapsed() < Duration::from_secs(10));
        // The next request goes to the restarted worker (and times out the same way).
        let e = ask(&b, &"y".repeat(4 << 20)).unwrap_err();
        assert!(matches!(e, BackendError::Timeout { .. }), "{e:?}");
        b.stop();
    }

    #[test]
    fn a_cancel_while_the_request_is_written_closes_stdin_at_once() {
        let dir = TempDir::new();
        let (go, count) = (dir.file("go"), dir.file("count"));
        // Reads a little and stops (the pipe fills, the write waits), ignores SIGTERM;
        // once `go` exists, counts what is left up to stdin's EOF.
        let cmd = format!(
            "trap '' TERM; head -c 1000 >/dev/null; echo got >&2; \
             while [ ! -e '{go}' ]; do sleep 0.05; done; wc -c > '{count}'"
        );
        let b = Arc::new(backend(&[("cmd", &cmd), ("timeout", "20s")]));
        let (run, t) = handle_in_thread(&b, req(&"x".repeat(4 << 20)));
        wait_for_stderr(&b, "got");
        run.cancel(SIGTERM);
        std::fs::write(&go, "").unwrap();
        // The rest of the line was not sent: stdin closed, the worker saw its EOF
        // and exited, long before the 20 s timeout.
        assert!(matches!(t.join().unwrap(), Err(BackendError::Cancelled)));
        let left: usize = std::fs::read_to_string(&count)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        assert!(left < 2 << 20, "{left} bytes written after the cancel");
        b.stop();
    }

    #[test]
    fn cancel_wakes_a_request_waiting_for_a_worker() {
        let b = Arc::new(backend(&[
            ("cmd", "sleep 30"),
            ("ready", "true"),
            ("kill_grace", "100ms"),
        ]));
        let run = RunHandle::new();
        let t = {
            let (b, run) = (Arc::clone(&b), run.clone());
            thread::spawn(move || b.handle(&req("x"), &run))
        };
        thread::sleep(Duration::from_millis(100));
        run.cancel(SIGTERM);
        assert!(matches!(t.join().unwrap(), Err(BackendError::Cancelled)));
        b.stop();
    }

    #[test]
    fn options() {
        let err = |pairs: &[(&str, &str)]| {
            let opts = pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            match WorkerBackend::from_opts(&opts, 4) {
                Err(BackendError::Config(m)) => m,
                Err(other) => panic!("{other:?}"),
                Ok(_) => panic!("accepted {pairs:?}"),
            }
        };
        assert!(err(&[]).contains("missing option \"cmd\""));
        assert!(err(&[("cmd", "x"), ("bogus", "1")]).contains("known: cmd, workers"));
        for (k, v) in [
            ("workers", "0"),
            ("max_in_flight", "999"),
            ("timeout", "0s"),
            ("ready", "yes"),
            ("max_output", "-1"),
            ("start_timeout", "soon"),
        ] {
            let m = err(&[("cmd", "x"), (k, v)]);
            assert!(m.contains(k) && m.contains(v), "{m}");
        }
        let opts = [("cmd".to_string(), "cat".to_string())].into();
        let b = WorkerBackend::from_opts(&opts, 4).unwrap();
        assert_eq!(b.pool.settings.workers, 4);
        // With several in flight each, --concurrency needs fewer workers.
        let workers = |pairs: &[(&str, &str)], concurrency| {
            let opts = pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            let b = WorkerBackend::from_opts(&opts, concurrency).unwrap();
            b.pool.settings.workers
        };
        assert_eq!(workers(&[("cmd", "cat"), ("max_in_flight", "3")], 3), 1);
        assert_eq!(workers(&[("cmd", "cat"), ("max_in_flight", "2")], 5), 3);
        assert_eq!(workers(&[("cmd", "cat"), ("max_in_flight", "8")], 1), 1);
        let both = [("cmd", "cat"), ("max_in_flight", "3"), ("workers", "2")];
        assert_eq!(workers(&both, 3), 2);
        assert_eq!(
            b.check().unwrap(),
            "worker: cat (started directly, no shell) (4 worker(s), 1 in flight each, timeout 1m)"
        );
        let b = backend(&[("cmd", "no-such-worker-xyz")]);
        assert_eq!(
            b.check().unwrap_err().to_string(),
            "backend config: worker: command \"no-such-worker-xyz\" not found on PATH"
        );
    }

    #[test]
    fn probe_starts_and_stops_the_worker() {
        let b = backend(&[("cmd", &format!("python3 {EXAMPLE}")), ("ready", "true")]);
        let m = b.probe().unwrap();
        assert!(m.contains("it said it is ready"), "{m}");
        let b = backend(&[("cmd", "cat")]);
        // `cat` echoes the probe line back: an answer with the probe's id.
        let m = b.probe().unwrap();
        assert!(m.contains("answered a probe request"), "{m}");
        let b = backend(&[("cmd", "exit 1"), ("timeout", "2s")]);
        assert!(b.probe().is_err());
    }

    #[test]
    fn stderr_is_cut_and_rate_limited() {
        let proc = Proc::new(3, 0, None);
        let flood: String = (0..500)
            .map(|i| format!("{i} {}\n", "e".repeat(if i == 0 { 5000 } else { 10 })))
            .collect();
        let mut logged = Vec::new();
        log_stderr(flood.as_bytes(), &proc, |level, line| {
            logged.push((level, line))
        });
        let (last_level, last) = logged.pop().unwrap();
        let shown = logged.len();
        // A burst of 20, then 10 a second: reading 500 lines takes far less than the
        // 48 s that would let them all through.
        assert!((20..100).contains(&shown), "{shown} lines logged");
        assert!(logged.iter().all(|(l, _)| *l == log::Level::Info));
        assert_eq!(last_level, log::Level::Warn);
        assert_eq!(
            last,
            format!(
                "worker 3: {} stderr line(s) not logged (too many)",
                500 - shown
            )
        );
        let first = &logged[0].1;
        assert!(first.starts_with("worker 3: 0 eee") && first.ends_with("e [cut]"));
        assert_eq!(
            first.len(),
            "worker 3: ".len() + STDERR_LINE + " [cut]".len()
        );
        assert_eq!(logged[1].1, format!("worker 3: 1 {}", "e".repeat(10)));
        let tail = proc.stderr_tail();
        assert!(
            tail.len() <= STDERR_KEEP && tail.ends_with("499 eeeeeeeeee"),
            "{tail}"
        );
    }

    #[test]
    fn probe_reports_how_a_worker_that_exits_at_start_ended() {
        for ready in ["false", "true"] {
            let b = backend(&[
                ("cmd", "echo broken >&2; exit 2"),
                ("ready", ready),
                ("timeout", "1m"),
            ]);
            assert_eq!(
                b.probe().unwrap_err().to_string(),
                "backend: command exited with status 2 (stderr: broken)",
                "ready={ready}"
            );
        }
    }

    #[test]
    fn a_pool_without_restarts_answers_a_late_request_with_how_its_worker_ended() {
        let dir = TempDir::new();
        let starts = dir.file("starts");
        // A restarted worker would hang: only the first one exits.
        let cmd = format!(
            "echo x >> '{starts}'; [ \"$(wc -l < '{starts}')\" -gt 1 ] && exec sleep 30; echo broken >&2; exit 2"
        );
        let b = backend(&[("cmd", &cmd), ("timeout", "5s"), ("kill_grace", "100ms")]);
        let pool = Arc::new(Pool::without_restarts(b.pool.settings.clone()));
        pool.start("", "", &Groups::default()).unwrap();
        // The request comes after the worker exited: it must not wait for another.
        let deadline = Instant::now() + Duration::from_secs(10);
        while pool.lock().start_failures == 0 {
            assert!(Instant::now() < deadline, "the worker never exited");
            thread::sleep(Duration::from_millis(10));
        }
        let e = pool
            .request(&probe_request(), &RunHandle::new())
            .unwrap_err();
        assert_eq!(
            e,
            BackendError::Failed {
                code: Some(2),
                stderr_tail: "broken".into()
            }
        );
        pool.stop();
        assert_eq!(std::fs::read_to_string(&starts).unwrap(), "x\n");
    }

    #[test]
    fn lines_are_capped() {
        let data = format!("short\n{}\nlast", "x".repeat(2000));
        let mut l = Lines::new(data.as_bytes(), 100, ID_SCAN);
        assert!(matches!(l.next_line(), Some(Line::Whole(b)) if b == b"short"));
        assert!(matches!(l.next_line(), Some(Line::TooLong(b)) if b.len() == 100));
        assert!(matches!(l.next_line(), Some(Line::Whole(b)) if b == b"last"));
        assert!(l.next_line().is_none());
        assert_eq!(
            scan_id("{\"id\": \"12\", \"text\": \"xx"),
            Some("12".into())
        );
        assert_eq!(scan_id("{\"id\":7,"), Some("7".into()));
        assert_eq!(scan_id("garbage"), None);
    }
}
