//! `connect`: start-up (backend, lock, state, register), the threads (heartbeat,
//! poll, `--concurrency` workers each with a reply poster, signal watcher), the drain
//! on SIGTERM, and the stop reason that `main` turns into an exit code. The only
//! module that spawns threads or waits between attempts.

mod auth;
mod broadcasts;
mod delegations;
mod dispatch;
#[cfg(test)]
mod fake;
mod heartbeat;
mod notified;
mod order;
mod poll;
mod rate;
mod register;
mod report;
mod sent;
mod side_thread;
mod status;
mod supervise;
mod wake;

use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use crate::api::{Client, ClientConfig, Platform, Transport};
use crate::backend::{Backend, RunHandle};
use crate::config::{ConnectConfig, Supervision, WakeMode};
use crate::credentials::Credentials;
use crate::error::Error;
use crate::orphans::{self, Groups};
use crate::output::write_quiet;
use crate::shutdown::{Shutdown, StopReason, ThreadGuard};
use crate::signal::{self, Signal};
use crate::state::{self, InstanceLock, StateError, Store};

use status::{RuntimeStatus, SharedStatus};
use supervise::{Progress, Supervisor, Watched};

/// After the drain timeout: time between SIGTERM and SIGKILL of the backends.
const KILL_GRACE: Duration = Duration::from_secs(2);
/// Once no backend runs, how long a stop waits for requests still in flight (a
/// stalled platform must not hold the exit for a whole request timeout). State is
/// journaled before every side effect, so leaving them is safe.
const REQUEST_GRACE: Duration = Duration::from_secs(2);
/// Replies a worker may leave waiting for its poster, journaled but not yet fsynced:
/// the poster's first fsync then covers them all (group commit). Each is of another
/// sender (one stays busy until its reply is posted). Bounded: a reply may be as
/// large as the backend's output cap.
const POST_QUEUE: usize = 8;

/// Posters per worker. Replies waiting in one worker's queue are all to different
/// senders (a sender's next message waits for its reply's `Finished`), so two may be
/// posted at once: one poster spends most of a reply waiting for the platform's
/// answer, and with `exec`-fast backends that wait, not the backend, set the pace
/// (bench, mock backlog: ~2,800 msg/s with one poster, ~3,400 with two).
const POSTERS_PER_WORKER: usize = 2;

/// Runs `molecule connect` for one workspace until a signal or a fatal error.
pub fn connect(cfg: ConnectConfig, sup: &Supervision, out: &mut dyn Write) -> Result<(), Error> {
    let backend: Arc<dyn Backend> = Arc::from(cfg.backend.build());
    if cfg.dry_run {
        return write_quiet(out, &dry_run_summary(&cfg, backend.as_ref())?);
    }
    // The same check as `doctor`, before any message: a command that cannot start
    // would otherwise fail every message and tell every sender.
    backend.check()?;
    let process = Process::start(sup, std::slice::from_ref(&cfg))?;
    let result = run_workspace(&cfg, backend, &process, Duration::ZERO);
    process.finish();
    result
}

/// Runs `molecule connect --workspaces FILE`: every workspace with its own threads,
/// state file, lock, ledger and backend, in one process. One workspace that stops
/// (revoked token, removed, bad lock) is logged and shows in its status file; the
/// others go on. Start-up is staggered and jittered so the polls do not align.
pub fn connect_many(
    cfgs: Vec<ConnectConfig>,
    sup: &Supervision,
    out: &mut dyn Write,
) -> Result<(), Error> {
    let backends: Vec<Arc<dyn Backend>> = cfgs
        .iter()
        .map(|cfg| Arc::from(cfg.backend.build()))
        .collect();
    if cfgs.iter().any(|c| c.dry_run) {
        let mut text = String::new();
        for (cfg, backend) in cfgs.iter().zip(&backends) {
            text.push_str(&dry_run_summary(cfg, backend.as_ref())?);
        }
        return write_quiet(out, &text);
    }
    for (cfg, backend) in cfgs.iter().zip(&backends) {
        backend.check().map_err(|e| {
            Error::Config(crate::config::ConfigError(format!(
                "workspace {}: {e}",
                cfg.workspace_id
            )))
        })?;
    }
    let process = Process::start(sup, &cfgs)?;
    let seed = crate::uuid::random_u64();
    let mut threads = Vec::with_capacity(cfgs.len());
    for (i, (cfg, backend)) in cfgs.into_iter().zip(backends).enumerate() {
        // Spread the first polls over one interval.
        let interval_ms = u64::try_from(cfg.poll_interval.as_millis())
            .unwrap_or(1000)
            .max(1);
        let jitter = Duration::from_millis(
            crate::uuid::splitmix64(seed.wrapping_add(i as u64)) % interval_ms,
        );
        let process = process.clone();
        let name = format!("ws-{}", cfg.workspace_id.get(..8).unwrap_or("x"));
        threads.push(spawn(&name, move || {
            let ws = cfg.workspace_id.clone();
            let result = run_workspace(&cfg, backend, &process, jitter);
            match &result {
                Ok(()) => log::info!("workspace {ws}: stopped"),
                Err(e) => log::error!("workspace {ws}: stopped: {e}"),
            }
            result
        })?);
    }
    let mut errors = Vec::new();
    for t in threads {
        match t.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => errors.push(e),
            Err(_) => errors.push(Error::Runtime("a workspace thread panicked".into())),
        }
    }
    let signalled = process.shutdown.is_triggered();
    process.finish();
    match errors.into_iter().next() {
        // Stopped by a signal, or every workspace finished its bounded run.
        _ if signalled => Ok(()),
        None => Ok(()),
        // Every workspace ended on its own and at least one failed: report the first.
        Some(e) => Err(e),
    }
}

/// How new messages are noticed, in words.
fn wake_summary(cfg: &ConnectConfig) -> String {
    if cfg.wake == WakeMode::Poll || cfg.once {
        return format!("polling every {} ms", cfg.poll_interval.as_millis());
    }
    format!(
        "waking on the event stream (--wake {}; safety poll every {} s, polling every {} ms while the stream is down)",
        cfg.wake.as_str(),
        cfg.safety_poll.as_secs(),
        cfg.poll_interval.as_millis()
    )
}

fn dry_run_summary(cfg: &ConnectConfig, backend: &dyn Backend) -> Result<String, Error> {
    let check = backend.check()?;
    Ok(format!(
        "molecule connect (dry run): workspace {} at {}\n  backend: {check}\n  state: {}\n  {}, cold-start window {} s, heartbeat every {} s, concurrency {}\n",
        cfg.workspace_id,
        cfg.common.api_url,
        state::state_path(&cfg.common.state_dir, &cfg.workspace_id).display(),
        wake_summary(cfg),
        cfg.since_secs,
        cfg.heartbeat_every.as_secs(),
        cfg.concurrency,
    ))
}

/// What the signal watcher acts on for one running workspace.
struct Target {
    handles: Vec<RunHandle>,
    client: Client,
    done: mpsc::Sender<Done>,
}

type Ticker = (std::thread::JoinHandle<()>, mpsc::Sender<()>);

/// Process-wide parts: the signal watcher, the stop flag every workspace follows, and
/// what the supervisor is told.
#[derive(Clone)]
struct Process {
    shutdown: Shutdown,
    /// One connection pool and TLS set-up for every workspace in the process.
    transport: Transport,
    targets: Arc<Mutex<Vec<Target>>>,
    watcher: Arc<Mutex<Option<std::thread::JoinHandle<()>>>>,
    supervisor: Arc<Supervisor>,
    ticker: Arc<Mutex<Option<Ticker>>>,
    /// One workspace: its own stop is the process's stop.
    single: bool,
    /// Longest a drain may take (for `EXTEND_TIMEOUT_USEC`).
    drain_bound: Duration,
    /// One rate budget per platform bucket (org, else token), for every workspace.
    budgets: Arc<Mutex<std::collections::HashMap<String, Arc<rate::RateBudget>>>>,
}

impl Process {
    fn start(sup: &Supervision, cfgs: &[ConnectConfig]) -> Result<Process, Error> {
        let notifier = crate::notify::Notifier::open(&sup.notify)
            .map_err(|e| Error::Config(crate::config::ConfigError(e)))?;
        let supervisor = Arc::new(Supervisor::new(
            notifier,
            sup.metrics_file.clone(),
            cfgs.len(),
        ));
        // Drain, then TERM, grace, KILL, grace (see wait_for_threads), the wait for
        // queued self-reports, plus saving state.
        let drain_bound = cfgs
            .iter()
            .map(|c| c.drain_timeout)
            .max()
            .unwrap_or_default()
            .saturating_add(KILL_GRACE * 2 + sent::STOP_WAIT + Duration::from_secs(5));
        let signals = signal::install()
            .map_err(|e| Error::Runtime(format!("installing signal handlers: {e}")))?;
        let shutdown = Shutdown::new();
        let targets: Arc<Mutex<Vec<Target>>> = Arc::default();
        let watcher = {
            let (shutdown, targets, sup) = (shutdown.clone(), targets.clone(), supervisor.clone());
            spawn("signals", move || {
                watch_signals(signals, shutdown, targets, &sup, drain_bound)
            })?
        };
        let ticker = if supervisor.needs_thread() {
            let (tx, rx) = mpsc::channel();
            let sup = supervisor.clone();
            Some((spawn("supervise", move || sup.run(&rx))?, tx))
        } else {
            None
        };
        Ok(Process {
            shutdown,
            // --ca-file is a global option: every workspace shares it (and one transport).
            transport: Transport::shared(cfgs.first().and_then(|c| c.common.ca_roots.as_ref())),
            targets,
            watcher: Arc::new(Mutex::new(Some(watcher))),
            supervisor,
            ticker: Arc::new(Mutex::new(ticker)),
            single: cfgs.len() == 1,
            drain_bound,
            budgets: Arc::default(),
        })
    }

    /// The rate budget of `cfg`'s bucket (§API-1.4): the org when an org id is sent,
    /// else the workspace's own token; created by the first workspace in it.
    fn budget_for(&self, cfg: &ConnectConfig) -> Arc<rate::RateBudget> {
        let key = match &cfg.common.org_id {
            Some(org) => format!("{} org:{org}", cfg.common.api_url),
            None => format!("{} ws:{}", cfg.common.api_url, cfg.workspace_id),
        };
        self.budgets
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(key)
            .or_insert_with(|| rate::RateBudget::new(cfg.rate_reserve_pct))
            .clone()
    }

    fn add(&self, target: Target) {
        self.targets
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(target);
    }

    /// Stops the watcher and the supervisor's ticker (which writes the metrics file
    /// a last time) and waits for them.
    fn finish(self) {
        let ticker = self
            .ticker
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some((handle, stop)) = ticker {
            drop(stop);
            let _ = handle.join();
        }
        signal::wake();
        let handle = self
            .watcher
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(h) = handle {
            let _ = h.join();
        }
    }
}

/// Takes the workspace's lock, waiting up to `--lock-wait` for another connector to
/// let go: a blocking lock on a helper thread and a channel timeout, not a
/// sleep-and-retry loop. If the wait times out the helper stays blocked until the
/// process exits, which it is about to.
fn acquire_lock(cfg: &ConnectConfig) -> Result<InstanceLock, StateError> {
    let (dir, ws) = (&cfg.common.state_dir, &cfg.workspace_id);
    match InstanceLock::acquire(dir, ws) {
        Err(StateError::Locked { path }) if !cfg.lock_wait.is_zero() => {
            log::info!(
                "waiting up to {} s for the lock on {}",
                cfg.lock_wait.as_secs(),
                path.display()
            );
            let (tx, rx) = mpsc::channel();
            let (dir, ws) = (dir.clone(), ws.clone());
            std::thread::spawn(move || {
                let _ = tx.send(InstanceLock::acquire_blocking(&dir, &ws));
            });
            rx.recv_timeout(cfg.lock_wait)
                .unwrap_or(Err(StateError::Locked { path }))
        }
        other => other,
    }
}

/// One workspace from lock to stop. Its own `Shutdown` follows the process's. A
/// workspace that ends before its first poll counts as failed for readiness.
fn run_workspace(
    cfg: &ConnectConfig,
    backend: Arc<dyn Backend>,
    process: &Process,
    start_delay: Duration,
) -> Result<(), Error> {
    let settled = Arc::new(AtomicBool::new(false));
    let result = run_locked(cfg, backend, process, start_delay, &settled);
    if !settled.swap(true, Ordering::SeqCst) {
        process.supervisor.settled(false);
    }
    result
}

fn run_locked(
    cfg: &ConnectConfig,
    backend: Arc<dyn Backend>,
    process: &Process,
    start_delay: Duration,
    settled: &Arc<AtomicBool>,
) -> Result<(), Error> {
    state::ensure_dir(&cfg.common.state_dir)?;
    let lock = match acquire_lock(cfg) {
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
    // Under the lock no other connector runs this workspace's backends: whatever
    // the last one recorded as running was left behind by a crash, and must not
    // run next to the messages it was handling when they run again.
    orphans::end_leftovers(&cfg.common.state_dir, &cfg.workspace_id, KILL_GRACE);
    let groups = Groups::in_state_dir(&cfg.common.state_dir, &cfg.workspace_id);
    let store = Arc::new(Mutex::new(Store::open(
        &cfg.common.state_dir,
        &cfg.workspace_id,
    )?));

    let mut client_cfg = ClientConfig::new(&cfg.common.api_url, &cfg.workspace_id);
    client_cfg.org_id = cfg.common.org_id.clone();
    client_cfg.agent_card = cfg.agent_card.clone();
    let shutdown = Shutdown::new();
    {
        let ws_shutdown = shutdown.clone();
        process
            .shutdown
            .on_trigger(move || ws_shutdown.trigger(StopReason::Signal));
    }
    let client =
        Client::with_transport(&process.transport, client_cfg, Credentials::of(&cfg.common))
            .with_pacer(process.budget_for(cfg).pacer(&shutdown));
    // One run handle per worker, then the delegation tracker's and the broadcast
    // thread's, so a second signal can kill every backend run.
    let run_handles: Vec<RunHandle> = (0..cfg.concurrency + 2)
        .map(|_| RunHandle::recording(groups.clone()))
        .collect();
    let (done_tx, done_rx) = mpsc::channel::<Done>();
    process.add(Target {
        handles: run_handles.clone(),
        client: client.clone(),
        done: done_tx.clone(),
    });
    if !start_delay.is_zero() && shutdown.wait_timeout(start_delay) {
        return Ok(());
    }
    let connected = Connected {
        cfg,
        process,
        status: RuntimeStatus::new(Instant::now()),
        client,
        backend: backend.clone(),
        store,
        shutdown,
        run_handles,
        groups,
        done: done_tx,
        threads: Vec::new(),
    };
    let result = connected.run(&done_rx, lock, settled);
    // Long-lived backend processes go after the drain: stdin closed, then TERM/KILL.
    backend.stop();
    if let Err(e) = &result {
        // A workspace that stops before its poll thread ran (register refused, bad
        // state) must still show why in its status file.
        report::record_stop(
            &cfg.common.state_dir,
            &cfg.workspace_id,
            cfg.poll_interval,
            &e.to_string(),
            None,
        );
    }
    result
}

/// What ends up on a workspace's done channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Done {
    /// This thread ended (panic or not).
    Thread(&'static str),
    /// A second signal: stop at once, do not wait for the rest.
    Forced,
}

/// One locked workspace: what its threads share and the threads started so far. `run`
/// registers, starts one thread per `start_*` method and drains.
struct Connected<'a> {
    cfg: &'a ConnectConfig,
    process: &'a Process,
    status: SharedStatus,
    client: Client,
    backend: Arc<dyn Backend>,
    store: Arc<Mutex<Store>>,
    shutdown: Shutdown,
    /// The workers' run handles, then the tracker's, then the broadcast thread's.
    run_handles: Vec<RunHandle>,
    /// Where the backends' running process groups are recorded.
    groups: Groups,
    done: mpsc::Sender<Done>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Connected<'_> {
    fn run(
        mut self,
        done_rx: &mpsc::Receiver<Done>,
        lock: InstanceLock,
        settled: &Arc<AtomicBool>,
    ) -> Result<(), Error> {
        let cfg = self.cfg;
        if !register::register(&self.client, &self.shutdown)? {
            return Ok(()); // stopped by a signal while registering
        }
        log::info!(
            "connected: workspace {} registered in poll mode at {}; backend {}; {}",
            cfg.workspace_id,
            cfg.common.api_url,
            self.backend.name(),
            wake_summary(cfg)
        );
        self.backend.start(
            self.client.workspace_id(),
            self.client.api_url(),
            &self.groups,
        )?;
        if cfg.once {
            self.beat_now();
        }
        // Peer names and delegation results (issue 5). The tracker's and the broadcast
        // thread's state are read before any thread starts: a corrupt file stops
        // start-up, not a half-started process.
        let peer_cache = Arc::new(crate::peers::PeerCache::new(
            crate::peers::CAPACITY,
            crate::peers::TTL,
        ));
        let delegation_counters = Arc::new(delegations::Counters::default());
        let tracker = self.open_tracker(&delegation_counters)?;
        let broadcast_saved = self.load_broadcasts()?;
        let wake_state = wake::WakeState::new(if cfg.once { WakeMode::Poll } else { cfg.wake });
        let watched = Watched {
            id: cfg.workspace_id.to_string(),
            status: self.status.clone(),
            poll: Arc::new(Progress::default()),
            heartbeat: Arc::new(Progress::default()),
            doc: Arc::default(),
            client: self.client.clone(),
            wake: Some(wake_state.clone()),
            stopped: Arc::default(),
        };
        let (poll_progress, heartbeat_progress, published, stopped) = (
            watched.poll.clone(),
            watched.heartbeat.clone(),
            watched.doc.clone(),
            watched.stopped.clone(),
        );
        self.process.supervisor.watch(watched);
        self.start_heartbeat(heartbeat_progress)?;
        let enrichment = self.start_peers(&peer_cache)?;
        let tracker_on = tracker.is_some();
        let delegation_wake = match tracker {
            Some(tracker) => Some(self.start_delegations(tracker, &peer_cache)?),
            None => None,
        };
        // A cron run drains and exits: an event stream would only add a request.
        let events_on = cfg.wake != WakeMode::Poll && !cfg.once;
        let broadcast_hints = match broadcast_saved {
            Some((saved, path)) => {
                Some(self.start_broadcasts(saved, path, events_on, &wake_state)?)
            }
            None => None,
        };
        let (events_tx, events_rx) = poll::event_channel(&self.shutdown);
        let jobs_tx = self.start_workers(&events_tx)?;
        if events_on {
            let wakes = wake::Wakes {
                poll: events_tx.clone(),
                tracker: delegation_wake.clone(),
                broadcasts: broadcast_hints,
            };
            self.start_events(wake_state.clone(), wakes)?;
        }
        drop(events_tx);
        let reporter =
            report::Reporter::new(&cfg.common.state_dir, &cfg.workspace_id, cfg.poll_interval)
                .with_extras(Some(peer_cache), tracker_on.then_some(delegation_counters))
                .with_published(published.clone())
                .with_wake(wake_state.clone(), cfg.safety_poll)
                .with_rate(self.process.budget_for(cfg));
        let poller = self
            .poller(reporter)
            .with_hooks(Some(enrichment), delegation_wake)
            .with_wake(wake_state, cfg.safety_poll)
            .with_supervision(poll_progress, {
                let (settled, sup) = (settled.clone(), self.process.supervisor.clone());
                Box::new(move || {
                    if !settled.swap(true, Ordering::SeqCst) {
                        sup.settled(true);
                    }
                })
            });
        self.start("poll", "poll", move || poller.run(jobs_tx, events_rx))?;
        self.drain(done_rx, lock, &stopped, &published)
    }

    fn open_tracker(
        &self,
        counters: &Arc<delegations::Counters>,
    ) -> Result<Option<delegations::Tracker>, Error> {
        let cfg = self.cfg;
        if cfg.delegations_every.is_zero() {
            return Ok(None);
        }
        delegations::Tracker::open(
            &cfg.common.state_dir,
            &cfg.workspace_id,
            cfg.delegations_capacity,
            counters.clone(),
            Instant::now(),
        )
        .map(Some)
        .map_err(delegations::open_error)
    }

    /// The broadcast thread's saved state and its path; `None` when it is off.
    fn load_broadcasts(&self) -> Result<Option<(broadcasts::Saved, PathBuf)>, Error> {
        let cfg = self.cfg;
        if cfg.broadcasts_every.is_zero() {
            return Ok(None);
        }
        let path = broadcasts::state_path(&cfg.common.state_dir, &cfg.workspace_id);
        Ok(Some((broadcasts::load(&path)?, path)))
    }

    /// The poll loop, before its hooks are attached.
    fn poller(&self, reporter: report::Reporter) -> poll::Poller {
        let cfg = self.cfg;
        poll::Poller::new(
            Arc::new(self.client.clone()),
            poll::PollSettings {
                interval: cfg.poll_interval,
                since_secs: cfg.since_secs,
                concurrency: cfg.concurrency,
                once: cfg.once,
                max_messages: cfg.max_messages,
                idle_exit: cfg.idle_exit,
            },
            self.store.clone(),
            self.shutdown.clone(),
            self.status.clone(),
            reporter,
        )
    }

    /// Starts a thread for `role`: a panic in it stops the workspace, and its end is
    /// reported on the done channel, panic or not.
    fn start(
        &mut self,
        name: &str,
        role: &'static str,
        f: impl FnOnce() + Send + 'static,
    ) -> Result<(), Error> {
        let done = self.done.clone();
        let thread = self.spawn_guarded(name, role, move || {
            let _done = DoneOnDrop(done, role);
            f();
        })?;
        self.threads.push(thread);
        Ok(())
    }

    /// A thread for `role` whose panic stops the workspace; nobody waits for its end
    /// unless [`Connected::start`] does.
    fn spawn_guarded(
        &self,
        name: &str,
        role: &'static str,
        f: impl FnOnce() + Send + 'static,
    ) -> Result<std::thread::JoinHandle<()>, Error> {
        let shutdown = self.shutdown.clone();
        spawn(name, move || {
            let _guard = ThreadGuard::new(&shutdown, role);
            debug_panic_hook(role);
            f();
        })
    }

    /// Cron mode may finish before the heartbeat thread's first beat: beat now.
    fn beat_now(&self) {
        let hb = RuntimeStatus::heartbeat(&self.status, &self.cfg.workspace_id, Instant::now());
        match self.client.heartbeat(&hb) {
            Ok(()) => RuntimeStatus::count(&self.status, |c| {
                c.last_heartbeat_ok = Some(std::time::SystemTime::now())
            }),
            Err(e) => log::warn!("{e}"),
        }
    }

    fn start_heartbeat(&mut self, progress: Arc<Progress>) -> Result<(), Error> {
        let client: Arc<dyn Platform> = Arc::new(self.client.clone());
        let (status, shutdown) = (self.status.clone(), self.shutdown.clone());
        let backend = self.backend.clone();
        let every = self.cfg.heartbeat_every;
        self.start("heartbeat", "heartbeat", move || {
            let trouble = move || backend.trouble();
            heartbeat::run(client, every, status, shutdown, &trouble, &progress);
        })
    }

    /// The peer-name lookup worker; it ends when the poll thread drops its end of the
    /// queue.
    fn start_peers(
        &mut self,
        cache: &Arc<crate::peers::PeerCache>,
    ) -> Result<crate::peers::Enrichment, Error> {
        let (enrichment, lookups) = crate::peers::channel(cache.clone());
        let (client, cache, shutdown) = (self.client.clone(), cache.clone(), self.shutdown.clone());
        self.start("peers", "peers", move || {
            crate::peers::run_worker(lookups, &cache, &shutdown, |id| {
                client
                    .discover_within(id, crate::peers::LOOKUP_TIMEOUT)
                    .map(|body| crate::peers::info_from_discover(&body))
                    .map_err(|e| e.to_string())
            });
        })?;
        Ok(enrichment)
    }

    fn start_delegations(
        &mut self,
        tracker: delegations::Tracker,
        peers: &Arc<crate::peers::PeerCache>,
    ) -> Result<delegations::Waker, Error> {
        let (waker, wake_rx) = delegations::wake_channel(&self.shutdown);
        let dctx = delegations::Context {
            side: self.side_thread(0, self.cfg.delegations_every),
            peers: Some(peers.clone()),
        };
        self.start("delegations", "delegations", move || {
            delegations::run(tracker, dctx, wake_rx);
        })?;
        Ok(waker)
    }

    /// The broadcast thread; returns where the event thread puts broadcast texts.
    fn start_broadcasts(
        &mut self,
        saved: broadcasts::Saved,
        path: PathBuf,
        events_on: bool,
        wake_state: &Arc<wake::WakeState>,
    ) -> Result<broadcasts::Hints, Error> {
        let (hints, wake_rx) = broadcasts::hint_channel(&self.shutdown);
        let bctx = broadcasts::Context {
            side: self.side_thread(1, self.cfg.broadcasts_every),
            since_secs: self.cfg.since_secs,
            path,
            hints: hints.clone(),
            stream_up: events_on.then(|| {
                let state = wake_state.clone();
                Arc::new(move || state.stream_up()) as Arc<dyn Fn() -> bool + Send + Sync>
            }),
        };
        self.start("broadcasts", "broadcasts", move || {
            broadcasts::run(bctx, saved, wake_rx);
        })?;
        Ok(hints)
    }

    /// `--concurrency` workers taking jobs from one queue; returns its sending end.
    fn start_workers(
        &mut self,
        events: &mpsc::Sender<poll::Event>,
    ) -> Result<mpsc::SyncSender<poll::Job>, Error> {
        let cfg = self.cfg;
        let (sent_tx, sent_rx) = sent::queue();
        let client = self.client.clone();
        // Ends once the workers have (they hold the queue's senders), after the last report.
        self.start(sent::THREAD, sent::THREAD, move || {
            sent::run(&client, &sent_rx);
        })?;
        let ctx = Arc::new(dispatch::Context {
            client: Arc::new(self.client.clone()),
            backend: self.backend.clone(),
            store: self.store.clone(),
            status: self.status.clone(),
            shutdown: self.shutdown.clone(),
            max_attempts: cfg.max_attempts,
            reply_to_replies: cfg.reply_to_replies,
            conversations: dispatch::Conversations::new(cfg.max_auto_replies),
            dead_letter_path: cfg
                .common
                .state_dir
                .join(format!("{}.deadletter.jsonl", cfg.workspace_id)),
            sent: sent_tx,
            notified: Mutex::new(self.restored_canvas_posts()),
        });
        let (jobs_tx, jobs_rx) = poll::jobs_channel(cfg.concurrency);
        let jobs_rx = Arc::new(Mutex::new(jobs_rx));
        let workers = cfg.concurrency.min(self.run_handles.len());
        for i in 0..workers {
            // Each worker journals its reply and hands it to its own posters, which
            // fsync and post it while the worker runs the backend for the next
            // message (of another sender: this one stays busy until `Finished`). Up
            // to POST_QUEUE replies wait (journaled, so a crash of the process loses
            // no run; a poster fsyncs them before a retry's wait, and the worker
            // before it waits at a full queue).
            let (post_tx, post_rx) = mpsc::sync_channel::<(poll::Job, dispatch::Saved)>(POST_QUEUE);
            let post_rx = Arc::new(Mutex::new(post_rx));
            for p in 0..POSTERS_PER_WORKER {
                let (ctx, events, post_rx) = (ctx.clone(), events.clone(), post_rx.clone());
                // Ends after its worker (which holds the sender), with the last reply.
                self.start(&format!("poster-{i}.{p}"), "poster", move || {
                    let mut poster = dispatch::Worker::new(ctx, RunHandle::default());
                    loop {
                        // Only the lock holder waits on the queue; a closed and empty
                        // queue ends the poster.
                        let next = post_rx
                            .lock()
                            .unwrap_or_else(PoisonError::into_inner)
                            .recv();
                        let Ok((job, reply)) = next else { return };
                        let finish = poster.deliver(&job.msg, reply);
                        finished(&events, job, finish);
                    }
                })?;
            }
            let (ctx, handle, jobs, events, stop) = (
                ctx.clone(),
                self.run_handles[i].clone(),
                jobs_rx.clone(),
                events.clone(),
                self.shutdown.clone(),
            );
            self.start(&format!("worker-{i}"), "worker", move || {
                let mut worker = dispatch::Worker::new(ctx, handle);
                loop {
                    // Only the lock holder waits on the channel; a closed channel ends
                    // the worker.
                    let job = jobs.lock().unwrap_or_else(PoisonError::into_inner).recv();
                    let Ok(job) = job else { return };
                    // Queued before a stop: not started, it runs again after the restart.
                    if stop.is_triggered() {
                        finished(&events, job, dispatch::Finish::Interrupted);
                        continue;
                    }
                    let reply = match worker.run(&job.msg) {
                        dispatch::Ran::Finished(finish) => {
                            finished(&events, job, finish);
                            continue;
                        }
                        dispatch::Ran::Reply(reply) => reply,
                    };
                    let ticket = job.ticket;
                    let sent = match post_tx.try_send((job, reply)) {
                        Ok(()) => Ok(()),
                        // The poster is busy: the reply must not wait unsynced.
                        Err(mpsc::TrySendError::Full((job, reply))) => {
                            match worker.make_durable(&job.msg, reply) {
                                Some(reply) => post_tx
                                    .send((job, reply))
                                    .map_err(|mpsc::SendError(back)| back),
                                None => {
                                    finished(&events, job, dispatch::Finish::Interrupted);
                                    continue;
                                }
                            }
                        }
                        Err(mpsc::TrySendError::Disconnected(back)) => Err(back),
                    };
                    match sent {
                        Ok(()) => {
                            let _ = events.send(poll::Event::Posting { ticket });
                        }
                        // The poster is gone (it only ends after us): deliver here.
                        Err((job, reply)) => {
                            let finish = worker.deliver(&job.msg, reply);
                            finished(&events, job, finish);
                        }
                    }
                }
            })?;
        }
        Ok(jobs_tx)
    }

    /// What the state knows of the canvas posts made before this start.
    fn restored_canvas_posts(&self) -> notified::Notified {
        let (posts, forgotten_us) = self
            .store
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .canvas_posts();
        let mut n = notified::Notified::new();
        n.restore(&posts, forgotten_us);
        n
    }

    /// The event-stream reader (`--wake`), waking the poll loop and the others.
    fn start_events(
        &mut self,
        state: Arc<wake::WakeState>,
        wakes: wake::Wakes,
    ) -> Result<(), Error> {
        let cfg = self.cfg;
        let settings = wake::Settings {
            mode: cfg.wake,
            silence: cfg.heartbeat_every.saturating_mul(2),
            interval: cfg.poll_interval,
            safety_poll: cfg.safety_poll,
        };
        let (client, shutdown) = (self.client.clone(), self.shutdown.clone());
        // Not joined at the stop: it only reads the stream and wakes the others, and
        // its read notices the stop only after a tick (up to 1 s, a slow SIGTERM).
        self.spawn_guarded("events", "events", move || {
            wake::run(client, settings, state, wakes, shutdown);
        })?;
        Ok(())
    }

    /// What a thread beside the workers needs, with the run handle after the
    /// workers' (0: the tracker's, 1: the broadcast thread's).
    fn side_thread(&self, i: usize, every: Duration) -> side_thread::SideThread {
        let workers = self.cfg.concurrency.min(self.run_handles.len());
        side_thread::SideThread {
            client: Arc::new(self.client.clone()),
            backend: self.backend.clone(),
            status: self.status.clone(),
            shutdown: self.shutdown.clone(),
            run: self
                .run_handles
                .get(workers + i)
                .cloned()
                .unwrap_or_default(),
            every,
            concurrency: self.cfg.concurrency,
        }
    }

    /// Waits for the stop, drains (backends first, then TERM/KILL), and turns the
    /// stop reason into the workspace's result.
    fn drain(
        self,
        done_rx: &mpsc::Receiver<Done>,
        lock: InstanceLock,
        stopped: &AtomicBool,
        published: &Mutex<Option<crate::status_file::StatusFile>>,
    ) -> Result<(), Error> {
        let cfg = self.cfg;
        let reason = self.shutdown.wait();
        // Nothing new goes to the backend; what it holds may finish.
        self.backend.drain();
        let clean = matches!(reason, StopReason::Signal | StopReason::Finished);
        if self.process.single || self.process.shutdown.is_triggered() {
            self.process.supervisor.stopping(self.process.drain_bound);
        }
        if clean {
            let (_, active, _) = RuntimeStatus::snapshot(&self.status);
            if active > 0 {
                log::info!(
                    "stopping: waiting up to {}s for {active} running backend(s)",
                    cfg.drain_timeout.as_secs()
                );
            } else {
                log::info!("stopping");
            }
        } else {
            cancel_all(&self.run_handles, signal::SIGTERM);
        }
        let drain = if clean { cfg.drain_timeout } else { KILL_GRACE };
        let busy = || RuntimeStatus::snapshot(&self.status).1 > 0;
        let reports = self
            .threads
            .iter()
            .any(|t| t.thread().name() == Some(sent::THREAD));
        let waited = wait_for_threads(
            done_rx,
            (self.threads.len(), reports),
            drain,
            &self.run_handles,
            &busy,
        );
        match waited {
            Ok(()) => {
                for t in self.threads {
                    let _ = t.join();
                }
            }
            Err(unfinished) => {
                if unfinished == Unfinished::Forced {
                    // The signal watcher kills them too, perhaps not yet: nothing we
                    // started may outlive the exit.
                    cancel_all(&self.run_handles, signal::SIGKILL);
                } else {
                    log::warn!(
                        "a thread did not stop in time; exiting anyway (state is journaled before every side effect)"
                    );
                }
                // Without this the status file would still say running, and `status`
                // would call the exit a crash.
                report::record_stop(
                    &cfg.common.state_dir,
                    &cfg.workspace_id,
                    cfg.poll_interval,
                    unfinished.reason(),
                    Some(report::Last {
                        doc: published,
                        status: &self.status,
                        requests: self.client.stats(),
                    }),
                );
                // That thread may still write the state: keep the lock until the
                // process exits, so no other connector starts on this workspace
                // meanwhile.
                std::mem::forget(lock);
            }
        }
        let (counters, _, _) = RuntimeStatus::snapshot(&self.status);
        stopped.store(true, Ordering::SeqCst);
        match reason {
            StopReason::Signal | StopReason::Finished
                if counters.state_error.is_some() || counters.unsaved > 0 =>
            {
                Err(Error::Runtime(format!(
                    "stopped without saving the state ({}): {} message(s) in progress were not recorded and will be handled again after a restart",
                    counters.state_error.as_deref().unwrap_or("a write failed"),
                    counters.unsaved
                )))
            }
            StopReason::Signal | StopReason::Finished => {
                log::info!("stopped cleanly");
                Ok(())
            }
            StopReason::Fatal(error) => Err(error),
            StopReason::ThreadDied(m) => Err(Error::Runtime(m)),
        }
    }
}

/// Tells the poll thread that `job` ended.
fn finished(events: &mpsc::Sender<poll::Event>, job: poll::Job, finish: dispatch::Finish) {
    let _ = events.send(poll::Event::Finished {
        ticket: job.ticket,
        sender: job.sender,
        finish,
    });
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

/// Waits for `threads.0` thread-exit notices: `drain` for running backends to finish, then
/// SIGTERM to their process groups, a grace period, SIGKILL. With no backend running
/// only [`REQUEST_GRACE`] is given to threads stuck in a request; once only the
/// self-report thread is left (`threads.1`: it was started) it gets
/// [`sent::STOP_WAIT`] to post what is queued. `Err` (the stop reason for the status
/// file) if they did not all arrive or a second signal forced the stop.
fn wait_for_threads(
    done: &mpsc::Receiver<Done>,
    threads: (usize, bool),
    drain: Duration,
    run: &[RunHandle],
    busy: &dyn Fn() -> bool,
) -> Result<(), Unfinished> {
    let (mut remaining, mut reports_running) = threads;
    let mut reports_waited = false;
    let phases = [
        (drain, Some(signal::SIGTERM)),
        (KILL_GRACE, Some(signal::SIGKILL)),
        (KILL_GRACE, None),
    ];
    for (i, (wait, then_send)) in phases.into_iter().enumerate() {
        let mut deadline = Instant::now()
            .checked_add(wait)
            .unwrap_or_else(Instant::now);
        let mut graced = false;
        while remaining > 0 {
            // The drain is for backends; with none running, threads stuck in a
            // request get a short grace, not the rest of the drain.
            if i == 0 && !graced && !busy() {
                graced = true;
                deadline = deadline.min(Instant::now() + REQUEST_GRACE);
            }
            let tick = deadline
                .saturating_duration_since(Instant::now())
                .min(Duration::from_millis(200));
            match done.recv_timeout(tick) {
                Ok(Done::Forced) => return Err(Unfinished::Forced),
                Ok(Done::Thread(role)) => {
                    remaining -= 1;
                    reports_running &= role != sent::THREAD;
                    if i == 0 && reports_running && remaining == 1 {
                        // Only the report thread is left: its own bound, not the
                        // request grace.
                        (graced, reports_waited) = (true, true);
                        deadline = Instant::now() + sent::STOP_WAIT;
                    }
                }
                Err(_) if Instant::now() >= deadline => break,
                Err(_) => {}
            }
        }
        if remaining == 0 {
            return Ok(());
        }
        if i == 0 && graced && !busy() {
            if reports_waited {
                log::warn!(
                    "a2a_send self-reports still queued after {}s; not waiting for them",
                    sent::STOP_WAIT.as_secs()
                );
            } else {
                log::warn!(
                    "requests still in flight after {}s; not waiting for them",
                    REQUEST_GRACE.as_secs()
                );
            }
            return Err(Unfinished::RequestsAbandoned);
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
    Err(Unfinished::TimedOut)
}

/// Why [`wait_for_threads`] stopped waiting before every thread had ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Unfinished {
    /// A second signal.
    Forced,
    /// No backend ran any more; only requests were still in flight.
    RequestsAbandoned,
    /// Even SIGKILL did not end every thread in time.
    TimedOut,
}

impl Unfinished {
    /// The stop reason for the status file (a forced one starts with `forced`).
    fn reason(self) -> &'static str {
        match self {
            Unfinished::Forced => "forced",
            Unfinished::RequestsAbandoned => "signal (requests in flight abandoned)",
            Unfinished::TimedOut => "forced (a thread did not stop in time)",
        }
    }
}

/// Sends the thread's name when it ends, panic or not.
struct DoneOnDrop(mpsc::Sender<Done>, &'static str);

impl Drop for DoneOnDrop {
    fn drop(&mut self) {
        let _ = self.0.send(Done::Thread(self.1));
    }
}

/// The signal watcher: the first SIGTERM/SIGINT asks every workspace for a clean
/// stop, a second one kills the backends and stops at once; SIGHUP re-reads the token
/// files.
fn watch_signals(
    mut signals: signal::Signals,
    shutdown: Shutdown,
    targets: Arc<Mutex<Vec<Target>>>,
    supervisor: &Supervisor,
    drain_bound: Duration,
) {
    let targets = || targets.lock().unwrap_or_else(PoisonError::into_inner);
    while let Some(sig) = signals.wait() {
        match sig {
            Signal::Stop if shutdown.is_triggered() => {
                log::warn!("second signal: stopping now");
                for t in targets().iter() {
                    // The notice first: a backend the kill ends must not let every
                    // thread report done before it, or the stop reads as clean. The
                    // runner kills too before it records the stop.
                    let _ = t.done.send(Done::Forced);
                    cancel_all(&t.handles, signal::SIGKILL);
                }
            }
            Signal::Stop => {
                log::info!("signal received: stopping");
                supervisor.stopping(drain_bound);
                shutdown.trigger(StopReason::Signal);
            }
            Signal::Reload => {
                supervisor.reloading();
                for t in targets().iter() {
                    if !t.client.credentials().reload() {
                        log::info!(
                            "SIGHUP: token unchanged for workspace {}",
                            t.client.workspace_id()
                        );
                    }
                }
                supervisor.reloaded();
            }
            Signal::Wake => return,
        }
    }
}

fn spawn<T, F>(name: &str, f: F) -> Result<std::thread::JoinHandle<T>, Error>
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    std::thread::Builder::new()
        .name(name.to_string())
        .spawn(f)
        .map_err(|e| Error::Runtime(format!("starting the {name} thread: {e}")))
}
