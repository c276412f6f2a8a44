//! `connect`: start-up (backend, lock, state, register), the threads (heartbeat,
//! poll, `--concurrency` workers, signal watcher), the drain on SIGTERM, and the stop
//! reason that `main` turns into an exit code. The only module that spawns threads
//! or waits between attempts.

mod auth;
mod dispatch;
mod heartbeat;
mod order;
mod poll;
mod register;
mod report;
mod status;

use std::io::Write;
use std::sync::mpsc;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use crate::api::{Client, ClientConfig};
use crate::backend::{self, Backend, RunHandle};
use crate::config::{ConnectConfig, TokenSource};
use crate::error::Error;
use crate::shutdown::{Shutdown, StopReason, ThreadGuard};
use crate::signal::{self, Signal};
use crate::state::{self, InstanceLock, StateError, Store};

pub use report::status_path;
pub use status::{RuntimeStatus, SharedStatus, WEDGE_AFTER};

/// After the drain timeout: time between SIGTERM and SIGKILL of the backends.
const KILL_GRACE: Duration = Duration::from_secs(2);

/// Runs `molecule connect` until a signal or a fatal error.
pub fn connect(cfg: ConnectConfig, out: &mut dyn Write) -> Result<(), Error> {
    let backend: Arc<dyn Backend> = Arc::from(backend::build(&cfg.backend, &cfg.backend_opts)?);
    if cfg.dry_run {
        let check = backend.check()?;
        let summary = format!(
            "molecule connect (dry run): workspace {} at {}\n  backend: {check}\n  state: {}\n  poll every {} ms, cold-start window {} s, heartbeat every {} s, concurrency {}\n",
            cfg.workspace_id,
            cfg.common.api_url,
            state::state_path(&cfg.common.state_dir, &cfg.workspace_id).display(),
            cfg.poll_interval.as_millis(),
            cfg.since_secs,
            cfg.heartbeat_every.as_secs(),
            cfg.concurrency,
        );
        return write_out(out, &summary);
    }
    state::ensure_dir(&cfg.common.state_dir)?;
    let lock =
        match InstanceLock::acquire_wait(&cfg.common.state_dir, &cfg.workspace_id, cfg.lock_wait) {
            Ok(lock) => lock,
            // Overlapping cron runs: the one already running does the work.
            Err(StateError::Locked { path }) if cfg.once => {
                log::info!(
                    "another connector is running for workspace {} (lock {}); nothing to do",
                    cfg.workspace_id,
                    path.display()
                );
                return Ok(());
            }
            Err(e) => return Err(e.into()),
        };
    log::debug!("lock held on {}", lock.path().display());
    let store = Arc::new(Mutex::new(Store::open(
        &cfg.common.state_dir,
        &cfg.workspace_id,
    )?));

    let mut client_cfg = ClientConfig::new(&cfg.common.api_url, &cfg.workspace_id);
    client_cfg.org_id = cfg.common.org_id.clone();
    let client = Client::new(client_cfg, cfg.common.token.clone());
    let shutdown = Shutdown::new();
    let run_handles: Vec<RunHandle> = (0..cfg.concurrency).map(|_| RunHandle::new()).collect();
    let (done_tx, done_rx) = mpsc::channel::<&'static str>();

    let signals = signal::install()
        .map_err(|e| Error::Runtime(format!("installing signal handlers: {e}")))?;
    let watcher = {
        let (shutdown, handles, client) = (shutdown.clone(), run_handles.clone(), client.clone());
        let (source, done_tx) = (cfg.common.token_source.clone(), done_tx.clone());
        spawn("signals", move || {
            watch_signals(signals, shutdown, handles, client, source, done_tx)
        })?
    };

    let result = run_connected(
        &cfg,
        client,
        backend,
        store,
        &shutdown,
        &run_handles,
        done_tx,
        &done_rx,
    );
    signal::wake();
    let _ = watcher.join();
    drop(lock);
    result
}

#[allow(clippy::too_many_arguments)]
fn run_connected(
    cfg: &ConnectConfig,
    client: Client,
    backend: Arc<dyn Backend>,
    store: Arc<Mutex<Store>>,
    shutdown: &Shutdown,
    run_handles: &[RunHandle],
    done_tx: mpsc::Sender<&'static str>,
    done_rx: &mpsc::Receiver<&'static str>,
) -> Result<(), Error> {
    let started = Instant::now();
    if !register::register(&client, &cfg.common.token_source, shutdown)? {
        return Ok(()); // stopped by a signal while registering
    }
    log::info!(
        "connected: workspace {} registered in poll mode at {}; backend {}; polling every {} ms",
        cfg.workspace_id,
        cfg.common.api_url,
        backend.name(),
        cfg.poll_interval.as_millis()
    );

    let status = RuntimeStatus::new(started);
    if cfg.once {
        // Cron mode may finish before the heartbeat thread's first beat: beat now.
        let hb = RuntimeStatus::heartbeat(&status, &cfg.workspace_id, Instant::now());
        match client.heartbeat(&hb) {
            Ok(()) => RuntimeStatus::count(&status, |c| {
                c.last_heartbeat_ok = Some(std::time::SystemTime::now())
            }),
            Err(e) => log::warn!("{e}"),
        }
    }
    let mut threads = Vec::new();
    {
        let (client, status, shutdown) = (client.clone(), status.clone(), shutdown.clone());
        let (every, source, done) = (
            cfg.heartbeat_every,
            cfg.common.token_source.clone(),
            done_tx.clone(),
        );
        threads.push(spawn("heartbeat", move || {
            let _guard = ThreadGuard::new(&shutdown, "heartbeat");
            let _done = DoneOnDrop(done, "heartbeat");
            debug_panic_hook("heartbeat");
            heartbeat::run(client, every, status, source, shutdown.clone());
        })?);
    }

    let ctx = Arc::new(dispatch::Context {
        client: client.clone(),
        backend,
        store: store.clone(),
        status: status.clone(),
        shutdown: shutdown.clone(),
        max_attempts: cfg.max_attempts,
        reply_to_replies: cfg.reply_to_replies,
        token_source: cfg.common.token_source.clone(),
        dead_letter_path: cfg
            .common
            .state_dir
            .join(format!("{}.deadletter.jsonl", cfg.workspace_id)),
    });
    let (events_tx, events_rx) = poll::event_channel(shutdown);
    let (jobs_tx, jobs_rx) = mpsc::sync_channel::<poll::Job>(cfg.concurrency);
    let jobs_rx = Arc::new(Mutex::new(jobs_rx));
    for (i, handle) in run_handles.iter().enumerate() {
        let (ctx, handle, jobs, events) = (
            ctx.clone(),
            handle.clone(),
            jobs_rx.clone(),
            events_tx.clone(),
        );
        let (shutdown, done) = (shutdown.clone(), done_tx.clone());
        threads.push(spawn(&format!("worker-{i}"), move || {
            let _guard = ThreadGuard::new(&shutdown, "worker");
            let _done = DoneOnDrop(done, "worker");
            let mut worker = dispatch::Worker::new(ctx, handle);
            loop {
                // Only the lock holder waits on the channel; a closed channel ends the worker.
                let job = jobs.lock().unwrap_or_else(PoisonError::into_inner).recv();
                let Ok(job) = job else { return };
                let finish = worker.handle(&job.msg);
                let _ = events.send(poll::Event::Finished {
                    ticket: job.ticket,
                    sender: job.sender,
                    finish,
                });
            }
        })?);
    }
    drop(events_tx);
    let poller = poll::Poller::new(
        client,
        poll::PollSettings {
            interval: cfg.poll_interval,
            since_secs: cfg.since_secs,
            concurrency: cfg.concurrency,
            token_source: cfg.common.token_source.clone(),
            once: cfg.once,
            max_messages: cfg.max_messages,
            idle_exit: cfg.idle_exit,
        },
        store,
        shutdown.clone(),
        status,
        report::Reporter::new(&cfg.common.state_dir, &cfg.workspace_id, cfg.poll_interval),
    );
    {
        let (shutdown, done) = (shutdown.clone(), done_tx);
        threads.push(spawn("poll", move || {
            let _guard = ThreadGuard::new(&shutdown, "poll");
            let _done = DoneOnDrop(done, "poll");
            debug_panic_hook("poll");
            poller.run(jobs_tx, events_rx);
        })?);
    }

    let reason = shutdown.wait();
    let clean = matches!(reason, StopReason::Signal | StopReason::Finished);
    if clean {
        log::info!(
            "stopping: waiting up to {}s for running backends",
            cfg.drain_timeout.as_secs()
        );
    } else {
        cancel_all(run_handles, signal::SIGTERM);
    }
    let drain = if clean { cfg.drain_timeout } else { KILL_GRACE };
    if wait_for_threads(done_rx, threads.len(), drain, run_handles) {
        for t in threads {
            let _ = t.join();
        }
    } else {
        log::warn!(
            "a thread did not stop in time; exiting anyway (state is journaled after every message)"
        );
    }
    match reason {
        StopReason::Signal | StopReason::Finished => {
            log::info!("stopped cleanly");
            Ok(())
        }
        StopReason::Fatal { code, message } => Err(Error::from_code(code, message)),
        StopReason::ThreadDied(m) => Err(Error::Runtime(m)),
    }
}

/// Debug builds only: `MOLECULE_DEBUG_PANIC=<thread>` panics that thread at start,
/// so the tests can prove a dead thread stops the whole process. Compiled out of
/// release builds (where a panic aborts the process anyway).
fn debug_panic_hook(thread: &str) {
    #[cfg(debug_assertions)]
    if std::env::var("MOLECULE_DEBUG_PANIC").is_ok_and(|v| v == thread) {
        panic!("MOLECULE_DEBUG_PANIC: injected panic in the {thread} thread");
    }
    #[cfg(not(debug_assertions))]
    let _ = thread;
}

fn cancel_all(handles: &[RunHandle], sig: i32) {
    for h in handles {
        h.cancel(sig);
    }
}

/// Waits for `n` thread-exit notices: `drain` for running backends to finish, then
/// SIGTERM to their process groups, a grace period, SIGKILL. `false` if they did not
/// all arrive (a thread stuck in a network call) or a second signal forced the stop.
fn wait_for_threads(
    done: &mpsc::Receiver<&'static str>,
    n: usize,
    drain: Duration,
    run: &[RunHandle],
) -> bool {
    let mut remaining = n;
    let phases = [
        (drain, Some(signal::SIGTERM)),
        (KILL_GRACE, Some(signal::SIGKILL)),
        (KILL_GRACE, None),
    ];
    for (wait, then_send) in phases {
        let deadline = Instant::now()
            .checked_add(wait)
            .unwrap_or_else(Instant::now);
        while remaining > 0 {
            match done.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok("forced") => return false,
                Ok(_) => remaining -= 1,
                Err(_) => break,
            }
        }
        if remaining == 0 {
            return true;
        }
        if let Some(sig) = then_send {
            log::warn!(
                "backend still running; sending {}",
                if sig == signal::SIGKILL {
                    "SIGKILL"
                } else {
                    "SIGTERM"
                }
            );
            cancel_all(run, sig);
        }
    }
    false
}

/// Sends the thread's name when it ends, panic or not.
struct DoneOnDrop(mpsc::Sender<&'static str>, &'static str);

impl Drop for DoneOnDrop {
    fn drop(&mut self) {
        let _ = self.0.send(self.1);
    }
}

/// The signal watcher: the first SIGTERM/SIGINT asks for a clean stop, a second one
/// kills the backends and stops at once; SIGHUP re-reads the token file.
fn watch_signals(
    mut signals: signal::Signals,
    shutdown: Shutdown,
    run_handles: Vec<RunHandle>,
    client: Client,
    source: TokenSource,
    done: mpsc::Sender<&'static str>,
) {
    while let Some(sig) = signals.wait() {
        match sig {
            Signal::Stop if shutdown.is_triggered() => {
                log::warn!("second signal: stopping now");
                cancel_all(&run_handles, signal::SIGKILL);
                let _ = done.send("forced");
            }
            Signal::Stop => {
                log::info!("signal received: stopping");
                shutdown.trigger(StopReason::Signal);
            }
            Signal::Reload => {
                if !auth::reload_token(&client, &source) {
                    log::info!("SIGHUP: token unchanged");
                }
            }
            Signal::Wake => return,
        }
    }
}

fn spawn<F: FnOnce() + Send + 'static>(
    name: &str,
    f: F,
) -> Result<std::thread::JoinHandle<()>, Error> {
    std::thread::Builder::new()
        .name(name.to_string())
        .spawn(f)
        .map_err(|e| Error::Runtime(format!("starting the {name} thread: {e}")))
}

fn write_out(out: &mut dyn Write, s: &str) -> Result<(), Error> {
    match out.write_all(s.as_bytes()).and_then(|()| out.flush()) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        Err(e) => Err(Error::Runtime(format!("writing output: {e}"))),
    }
}
