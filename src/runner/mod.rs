//! `connect`: start-up (backend, state, lock, register), the heartbeat, poll and
//! signal-watcher threads, the drain on SIGTERM, and the stop reason that `main`
//! turns into an exit code. The only module that spawns threads or waits between
//! attempts.

mod auth;
mod heartbeat;
mod poll;
mod status;

use std::io::Write;
use std::sync::Arc;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::api::{ApiError, Client, ClientConfig};
use crate::backend::{self, Backend, RunHandle};
use crate::backoff::Backoff;
use crate::config::{ConnectConfig, TokenSource};
use crate::error::{EXIT_TOO_OLD, Error};
use crate::shutdown::{Shutdown, StopReason, ThreadGuard};
use crate::signal::{self, Signal};
use crate::state::{self, InstanceLock, State};

pub use status::{RuntimeStatus, SharedStatus, WEDGE_AFTER};

/// Register attempts on transient errors before giving up with exit 75.
const REGISTER_ATTEMPTS: u32 = 8;
/// After the drain timeout: time between SIGTERM and SIGKILL of the backend.
const KILL_GRACE: Duration = Duration::from_secs(2);

/// Runs `molecule connect` until a signal or a fatal error.
pub fn connect(cfg: ConnectConfig, out: &mut dyn Write) -> Result<(), Error> {
    let backend: Arc<dyn Backend> = Arc::from(backend::build(&cfg.backend, &cfg.backend_opts)?);
    if cfg.dry_run {
        let check = backend.check()?;
        let summary = format!(
            "molecule connect (dry run): workspace {} at {}\n  backend: {check}\n  state: {}\n  poll every {} ms, cold-start window {} s, heartbeat every {} s\n",
            cfg.workspace_id,
            cfg.common.api_url,
            state::state_path(&cfg.common.state_dir, &cfg.workspace_id).display(),
            cfg.poll_interval.as_millis(),
            cfg.since_secs,
            cfg.heartbeat_every.as_secs(),
        );
        return write_out(out, &summary);
    }
    state::ensure_dir(&cfg.common.state_dir)?;
    let lock = InstanceLock::acquire(&cfg.common.state_dir, &cfg.workspace_id)?;
    let state = State::load(&cfg.common.state_dir, &cfg.workspace_id)?;
    log::debug!("lock held on {}", lock.path().display());

    let mut client_cfg = ClientConfig::new(&cfg.common.api_url, &cfg.workspace_id);
    client_cfg.org_id = cfg.common.org_id.clone();
    let client = Client::new(client_cfg, cfg.common.token.clone());
    let shutdown = Shutdown::new();
    let run_handle = RunHandle::new();
    let (done_tx, done_rx) = mpsc::channel::<&'static str>();

    let signals = signal::install()
        .map_err(|e| Error::Runtime(format!("installing signal handlers: {e}")))?;
    let watcher = {
        let (shutdown, run_handle, client) = (shutdown.clone(), run_handle.clone(), client.clone());
        let (source, done_tx) = (cfg.common.token_source.clone(), done_tx.clone());
        spawn("signals", move || {
            watch_signals(signals, shutdown, run_handle, client, source, done_tx)
        })?
    };

    let result = run_connected(
        &cfg,
        client,
        backend,
        state,
        &shutdown,
        &run_handle,
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
    state: State,
    shutdown: &Shutdown,
    run_handle: &RunHandle,
    done_tx: mpsc::Sender<&'static str>,
    done_rx: &mpsc::Receiver<&'static str>,
) -> Result<(), Error> {
    let started = Instant::now();
    if !register(&client, &cfg.common.token_source, shutdown)? {
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
    let heartbeat = {
        let (client, status, shutdown) = (client.clone(), status.clone(), shutdown.clone());
        let (every, source, done) = (
            cfg.heartbeat_every,
            cfg.common.token_source.clone(),
            done_tx.clone(),
        );
        spawn("heartbeat", move || {
            let _guard = ThreadGuard::new(&shutdown, "heartbeat");
            let _done = DoneOnDrop(done, "heartbeat");
            heartbeat::run(client, every, status, source, shutdown.clone());
        })?
    };
    let poller = poll::Poller::new(
        client,
        backend,
        poll::PollSettings {
            interval: cfg.poll_interval,
            since_secs: cfg.since_secs,
            max_attempts: cfg.max_attempts,
            reply_to_replies: cfg.reply_to_replies,
            token_source: cfg.common.token_source.clone(),
            dead_letter_path: cfg
                .common
                .state_dir
                .join(format!("{}.deadletter.jsonl", cfg.workspace_id)),
        },
        state,
        status,
        run_handle.clone(),
        shutdown.clone(),
    );
    let poll = {
        let (shutdown, done) = (shutdown.clone(), done_tx);
        spawn("poll", move || {
            let _guard = ThreadGuard::new(&shutdown, "poll");
            let _done = DoneOnDrop(done, "poll");
            poller.run();
        })?
    };

    let reason = shutdown.wait();
    let clean = matches!(reason, StopReason::Signal | StopReason::Finished);
    if clean {
        log::info!(
            "stopping: waiting up to {}s for a running backend",
            cfg.drain_timeout.as_secs()
        );
    } else {
        run_handle.cancel(signal::SIGTERM);
    }
    let drain = if clean { cfg.drain_timeout } else { KILL_GRACE };
    if wait_for_threads(done_rx, 2, drain, run_handle) {
        let _ = heartbeat.join();
        let _ = poll.join();
    } else {
        log::warn!(
            "a loop thread did not stop in time; exiting anyway (state is saved after every message)"
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

/// Waits for `n` thread-exit notices: `drain` for a running backend to finish, then
/// SIGTERM to its process group, a grace period, SIGKILL. `false` if they did not
/// all arrive (a thread stuck in a network call) or a second signal forced the stop.
fn wait_for_threads(
    done: &mpsc::Receiver<&'static str>,
    n: usize,
    drain: Duration,
    run: &RunHandle,
) -> bool {
    let mut remaining = n;
    let phases = [
        (drain, None),
        (KILL_GRACE, Some(signal::SIGTERM)),
        (KILL_GRACE, Some(signal::SIGKILL)),
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
            run.cancel(sig);
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
/// kills the backend and stops at once; SIGHUP re-reads the token file.
fn watch_signals(
    mut signals: signal::Signals,
    shutdown: Shutdown,
    run_handle: RunHandle,
    client: Client,
    source: TokenSource,
    done: mpsc::Sender<&'static str>,
) {
    while let Some(sig) = signals.wait() {
        match sig {
            Signal::Stop if shutdown.is_triggered() => {
                log::warn!("second signal: stopping now");
                run_handle.cancel(signal::SIGKILL);
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

/// Registers in poll mode, retrying transient failures with backoff. `Ok(false)` if
/// a stop was requested meanwhile.
fn register(client: &Client, source: &TokenSource, shutdown: &Shutdown) -> Result<bool, Error> {
    let card = json!({
        // A name equal to the id is replaced by the workspace's display name (§API-2.1).
        "name": client.workspace_id(),
        "description": "",
        "version": env!("CARGO_PKG_VERSION"),
        "skills": [],
        "capabilities": {"streaming": false, "pushNotifications": false},
    });
    let backoff = Backoff::default();
    let seed = crate::uuid::random_u64();
    let mut reauthed = false;
    let mut attempt: u32 = 0;
    loop {
        attempt += 1;
        let err = match client.register(card.clone()) {
            Ok(resp) => {
                match resp.delivery_mode.as_deref() {
                    Some("poll") => {}
                    other => {
                        return Err(Error::PlatformTooOld(format!(
                            "the platform at {} answered register with delivery_mode {:?}, not \"poll\": it is too old for poll mode",
                            client.api_url(),
                            other.unwrap_or("(none)")
                        )));
                    }
                }
                if resp.auth_token.is_some() {
                    log::info!(
                        "the platform issued a new workspace token at register (not shown); keeping the configured one"
                    );
                }
                return Ok(true);
            }
            Err(e) => e,
        };
        if err.is_unauthorized() && !reauthed {
            reauthed = true;
            match auth::after_unauthorized(client, source) {
                auth::AuthVerdict::RetryWithNewToken => continue,
                auth::AuthVerdict::Fatal(code, message) => {
                    return Err(Error::from_code(code, message));
                }
            }
        }
        if err.is_unauthorized() {
            return Err(Error::Credentials(format!("register: {err}")));
        }
        if is_pre_poll_platform(&err) {
            return Err(Error::from_code(
                EXIT_TOO_OLD,
                format!(
                    "{err}: the platform at {} does not support poll mode",
                    client.api_url()
                ),
            ));
        }
        if !err.is_retryable() {
            return Err(Error::Api(err));
        }
        if attempt >= REGISTER_ATTEMPTS {
            return Err(Error::Unreachable(format!(
                "{err} (gave up after {attempt} attempts)"
            )));
        }
        let delay = backoff.delay(attempt, seed.wrapping_add(u64::from(attempt)));
        let delay = err.retry_after().map_or(delay, |r| delay.max(r));
        log::warn!(
            "{err}; retrying in {:.1}s ({attempt}/{REGISTER_ATTEMPTS})",
            delay.as_secs_f64()
        );
        if shutdown.wait_timeout(delay) {
            return Ok(false);
        }
    }
}

/// A platform from before poll mode demands a URL on register (§API-0.1).
fn is_pre_poll_platform(e: &ApiError) -> bool {
    matches!(e, ApiError::Status { status: 400, message, .. } if message.contains("url is required") && !message.contains("push-mode"))
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
