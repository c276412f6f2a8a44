//! What the process tells its supervisor and its fleet: readiness (once every
//! workspace has polled, or failed for good), a one-line `STATUS=` on change,
//! `WATCHDOG=1` only while every poll and heartbeat loop is making progress,
//! reload and stop notices, and the `--metrics-file` rewritten every few seconds
//! and at exit. One thread ticks; readiness and notices are sent from where they
//! happen.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::notify::Notifier;
use crate::status_file::RunState;

use super::status::{RuntimeStatus, SharedStatus};

/// How often the status line is checked for a change (when someone listens).
const STATUS_EVERY: Duration = Duration::from_secs(1);
/// How often `--metrics-file` is rewritten.
pub const METRICS_EVERY: Duration = Duration::from_secs(5);
/// Longest status line sent.
const MAX_STATUS: usize = 120;

/// Whether a loop is making progress: it says `busy` when it starts work and `idle`
/// before a deliberate wait. A loop busy for longer than the watchdog interval (a
/// call that hangs, a lock that is never released) stops the pings.
#[derive(Debug)]
pub struct Progress(Mutex<(Instant, bool)>);

impl Default for Progress {
    fn default() -> Self {
        Progress(Mutex::new((Instant::now(), true)))
    }
}

impl Progress {
    /// The loop starts work.
    pub fn busy(&self) {
        *self.0.lock().unwrap_or_else(PoisonError::into_inner) = (Instant::now(), false);
    }

    /// The loop waits on purpose (its interval, a backoff, a worker).
    pub fn idle(&self) {
        *self.0.lock().unwrap_or_else(PoisonError::into_inner) = (Instant::now(), true);
    }

    /// How long the loop has been busy, if it is.
    fn busy_for(&self, now: Instant) -> Option<Duration> {
        let (since, idle) = *self.0.lock().unwrap_or_else(PoisonError::into_inner);
        (!idle).then(|| now.saturating_duration_since(since))
    }
}

/// One running workspace, as the supervisor sees it.
pub struct Watched {
    /// Workspace id.
    pub id: String,
    /// Counters and the wedge flag.
    pub status: SharedStatus,
    /// The poll loop.
    pub poll: Arc<Progress>,
    /// The heartbeat loop.
    pub heartbeat: Arc<Progress>,
    /// The last status document, for the metrics file.
    pub doc: Arc<Mutex<Option<crate::status_file::StatusFile>>>,
    /// Its platform client (request counters).
    pub client: crate::api::Client,
    /// Whether its event stream is wanted and up.
    pub wake: Option<Arc<super::wake::WakeState>>,
    /// Its threads have ended.
    pub stopped: Arc<AtomicBool>,
}

#[derive(Default)]
struct Inner {
    watched: Vec<Watched>,
    /// Workspaces that have neither polled nor failed for good yet.
    pending: usize,
    any_ready: bool,
    ready_sent: bool,
    stopping: bool,
    last_status: String,
    stuck_logged: bool,
}

/// Shared by every workspace thread and the signal watcher.
pub struct Supervisor {
    notifier: Notifier,
    metrics_file: Option<PathBuf>,
    metrics_failing: AtomicBool,
    inner: Mutex<Inner>,
}

impl Supervisor {
    /// A supervisor for `workspaces` workspaces.
    pub fn new(notifier: Notifier, metrics_file: Option<PathBuf>, workspaces: usize) -> Self {
        Supervisor {
            notifier,
            metrics_file,
            metrics_failing: AtomicBool::new(false),
            inner: Mutex::new(Inner {
                pending: workspaces,
                ..Inner::default()
            }),
        }
    }

    fn inner(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Does the ticking thread have anything to do?
    pub fn needs_thread(&self) -> bool {
        self.notifier.is_active() || self.metrics_file.is_some()
    }

    /// A workspace's loops are running.
    pub fn watch(&self, w: Watched) {
        self.inner().watched.push(w);
    }

    /// A workspace polled for the first time (`ok`) or stopped for good before it
    /// did. Called once per workspace; `READY=1` goes out when none is pending.
    pub fn settled(&self, ok: bool) {
        let mut inner = self.inner();
        inner.pending = inner.pending.saturating_sub(1);
        inner.any_ready |= ok;
        if inner.pending == 0 && inner.any_ready && !inner.ready_sent && !inner.stopping {
            inner.ready_sent = true;
            let line = status_line(&inner);
            inner.last_status = line.clone();
            drop(inner);
            log::debug!("ready: telling the supervisor");
            self.notifier.ready(&format!("STATUS={line}\n"));
        }
    }

    /// SIGHUP: the token files are being re-read. Before the first READY=1 (or
    /// while stopping) there is no ready state to leave, so nothing is said.
    pub fn reloading(&self) {
        if self.is_ready() {
            self.notifier
                .send("RELOADING=1\nSTATUS=reloading the token\n");
        }
    }

    /// The re-read is done.
    pub fn reloaded(&self) {
        let inner = self.inner();
        if inner.ready_sent && !inner.stopping {
            let line = status_line(&inner);
            drop(inner);
            self.notifier.send(&format!("READY=1\nSTATUS={line}\n"));
        }
    }

    fn is_ready(&self) -> bool {
        let inner = self.inner();
        inner.ready_sent && !inner.stopping
    }

    /// The drain starts; it may take up to `bound` (a backend finishing).
    pub fn stopping(&self, bound: Duration) {
        let mut inner = self.inner();
        if std::mem::replace(&mut inner.stopping, true) {
            return;
        }
        inner.last_status = "stopping: waiting for running backends".into();
        drop(inner);
        self.notifier.send(&format!(
            "STOPPING=1\nEXTEND_TIMEOUT_USEC={}\nSTATUS=stopping: waiting for running backends\n",
            bound.as_micros()
        ));
    }

    /// Runs until `stop` is dropped or sent to, then writes the metrics file once more.
    pub fn run(&self, stop: &mpsc::Receiver<()>) {
        let watchdog = self.notifier.watchdog_every();
        let mut tick = STATUS_EVERY;
        if let Some(w) = watchdog {
            tick = tick.min(w.max(Duration::from_millis(10)));
        }
        if self.metrics_file.is_some() && !self.notifier.is_active() {
            tick = METRICS_EVERY;
        }
        let mut next_metrics = Instant::now();
        let mut next_ping = Instant::now();
        loop {
            let now = Instant::now();
            if let Some(every) = watchdog
                && now >= next_ping
            {
                next_ping = now.checked_add(every).unwrap_or(now);
                if self.progressing(every, now) {
                    self.notifier.send("WATCHDOG=1");
                }
            }
            if self.notifier.is_active() {
                self.send_status_if_changed();
            }
            if now >= next_metrics {
                next_metrics = now.checked_add(METRICS_EVERY).unwrap_or(now);
                self.write_metrics();
            }
            match stop.recv_timeout(tick) {
                Err(RecvTimeoutError::Timeout) => {}
                _ => break,
            }
        }
        self.write_metrics();
    }

    /// Every running loop is idle or was busy for less than `limit`.
    fn progressing(&self, limit: Duration, now: Instant) -> bool {
        let mut inner = self.inner();
        let stuck = inner.watched.iter().find_map(|w| {
            if w.stopped.load(Ordering::Relaxed) {
                return None;
            }
            [("poll", &w.poll), ("heartbeat", &w.heartbeat)]
                .into_iter()
                .find_map(|(name, p)| {
                    p.busy_for(now)
                        .filter(|d| *d > limit)
                        .map(|d| (w.id.clone(), name, d))
                })
        });
        match stuck {
            None => {
                if std::mem::take(&mut inner.stuck_logged) {
                    log::info!("all loops make progress again: watchdog pings resume");
                }
                true
            }
            Some((ws, name, d)) => {
                if !std::mem::replace(&mut inner.stuck_logged, true) {
                    log::warn!(
                        "workspace {ws}: the {name} loop has been stuck for {} s: not pinging the watchdog",
                        d.as_secs()
                    );
                }
                false
            }
        }
    }

    fn send_status_if_changed(&self) {
        let mut inner = self.inner();
        if inner.stopping {
            return;
        }
        let line = status_line(&inner);
        if line != inner.last_status {
            inner.last_status = line.clone();
            drop(inner);
            self.notifier.send(&format!("STATUS={line}\n"));
        }
    }

    /// Rewrites `--metrics-file` atomically (temp file and rename in its directory),
    /// mode 0644: metrics are not secret.
    fn write_metrics(&self) {
        let Some(path) = &self.metrics_file else {
            return;
        };
        let docs: Vec<(Value, bool)> = self
            .inner()
            .watched
            .iter()
            .filter_map(|w| {
                let mut doc = w
                    .doc
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .clone()?;
                super::report::refresh(&mut doc, &w.status, w.client.stats());
                // A stop that gave up on the poll thread leaves its last document
                // saying running: once the workspace's threads are done it is down.
                let up = doc.state == RunState::Running && !w.stopped.load(Ordering::SeqCst);
                Some((doc.to_json(), up))
            })
            .collect();
        let samples: Vec<crate::metrics::Sample<'_>> = docs
            .iter()
            .map(|(doc, up)| crate::metrics::Sample { doc, up: *up })
            .collect();
        let text = crate::metrics::render(&samples);
        // Logged when it starts failing and when it works again, not every 5 s.
        match crate::state::write_file_mode(path, text.as_bytes(), false, 0o644) {
            Ok(()) if self.metrics_failing.swap(false, Ordering::Relaxed) => {
                log::info!("metrics file {}: written again", path.display());
            }
            Ok(()) => {}
            Err(e) if !self.metrics_failing.swap(true, Ordering::Relaxed) => {
                log::warn!("metrics file {}: {e}", path.display());
            }
            Err(_) => {}
        }
    }
}

/// `polling, 1,234 handled, 2 in flight, last error none` (one workspace), or the
/// same summed over several with how many poll.
fn status_line(inner: &Inner) -> String {
    let running: Vec<&Watched> = inner
        .watched
        .iter()
        .filter(|w| !w.stopped.load(Ordering::Relaxed))
        .collect();
    let (mut handled, mut active, mut polling, mut wedged) = (0u64, 0u32, 0usize, 0usize);
    let (mut want_events, mut events_up) = (0usize, 0usize);
    let mut last_error = String::new();
    for w in &running {
        let (c, a, is_wedged) = RuntimeStatus::snapshot(&w.status);
        handled = handled.saturating_add(c.handled);
        active = active.saturating_add(a);
        polling += usize::from(c.last_poll_ok.is_some());
        wedged += usize::from(is_wedged);
        if let Some(w) = w.wake.as_ref().filter(|w| w.wants_events()) {
            want_events += 1;
            events_up += usize::from(w.stream_up());
        }
        if last_error.is_empty() {
            last_error = c.last_error;
        }
    }
    let state = if running.len() > 1 || inner.watched.len() > 1 {
        format!("{} workspaces, {polling} polling", running.len())
    } else if wedged > 0 {
        "wedged (backend failing)".to_string()
    } else if polling > 0 {
        "polling".to_string()
    } else {
        "starting".to_string()
    };
    let mut line = state;
    match (running.len(), want_events, events_up) {
        (_, 0, _) => {}
        (1, _, 1) => line.push_str(", events connected"),
        (1, _, _) => line.push_str(", events not connected"),
        (_, _, up) => line.push_str(&format!(", {up} events connected")),
    }
    line.push_str(&format!(", {} handled", thousands(handled)));
    if active > 0 {
        line.push_str(&format!(", {active} running"));
    }
    if running.len() > 1 && wedged > 0 {
        line.push_str(&format!(", {wedged} wedged"));
    }
    line.push_str(", last error ");
    line.push_str(if last_error.is_empty() {
        "none"
    } else {
        &last_error
    });
    if line.chars().count() > MAX_STATUS {
        line = line.chars().take(MAX_STATUS - 3).collect::<String>() + "...";
    }
    line
}

/// `1234567` → `1,234,567`.
fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thousands_separators() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1234), "1,234");
        assert_eq!(thousands(1_234_567), "1,234,567");
    }

    #[test]
    fn busy_loops_stop_progress() {
        let p = Progress::default();
        let now = Instant::now();
        assert_eq!(p.busy_for(now), None);
        p.busy();
        let later = now + Duration::from_secs(5);
        assert!(p.busy_for(later).unwrap() >= Duration::from_secs(4));
        p.idle();
        assert_eq!(p.busy_for(later), None);
    }

    #[test]
    fn ready_waits_for_every_workspace_and_reload_waits_for_ready() {
        use std::os::unix::net::UnixDatagram;
        let path = std::env::temp_dir().join(format!(
            "molecule-supervise-{}-{}.sock",
            std::process::id(),
            crate::uuid::new_v4()
        ));
        let listener = UnixDatagram::bind(&path).unwrap();
        listener.set_nonblocking(true).unwrap();
        let notifier = Notifier::open(&crate::notify::NotifySettings {
            socket: Some(path.display().to_string()),
            ..Default::default()
        })
        .unwrap();
        let sup = Supervisor::new(notifier, None, 3);
        let next = || {
            let mut buf = [0u8; 512];
            listener
                .recv(&mut buf)
                .ok()
                .map(|n| String::from_utf8_lossy(&buf[..n]).into_owned())
        };
        // A SIGHUP during start-up must not claim readiness.
        sup.reloading();
        sup.reloaded();
        sup.settled(true);
        sup.settled(false);
        assert_eq!(next(), None);
        sup.settled(true);
        assert!(next().unwrap().starts_with("READY=1\nSTATUS="));
        sup.reloading();
        assert!(next().unwrap().starts_with("RELOADING=1\n"));
        sup.reloaded();
        assert!(next().unwrap().starts_with("READY=1\n"));
        sup.stopping(Duration::from_secs(40));
        let stop = next().unwrap();
        assert!(
            stop.contains("STOPPING=1\nEXTEND_TIMEOUT_USEC=40000000\n"),
            "{stop}"
        );
        sup.stopping(Duration::from_secs(40));
        sup.reloading();
        assert_eq!(next(), None);
        // Nothing ready at all: no READY=1.
        let none = Supervisor::new(Notifier::none(), None, 1);
        none.settled(false);
        assert!(!none.inner().ready_sent);
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn status_line_summarises() {
        let status = RuntimeStatus::new(Instant::now());
        let client = crate::api::Client::new(
            crate::api::ClientConfig::new(
                "http://127.0.0.1:1",
                &crate::runner::fake::id(crate::runner::fake::OWN),
            ),
            crate::config::Secret::new("t"),
        );
        let w = |id: &str, status: &SharedStatus| Watched {
            id: id.into(),
            status: status.clone(),
            poll: Arc::default(),
            heartbeat: Arc::default(),
            doc: Arc::default(),
            client: client.clone(),
            wake: None,
            stopped: Arc::default(),
        };
        let mut inner = Inner::default();
        inner.watched.push(w("a", &status));
        assert_eq!(status_line(&inner), "starting, 0 handled, last error none");
        RuntimeStatus::count(&status, |c| {
            c.handled = 1234;
            c.last_poll_ok = Some(std::time::SystemTime::now());
        });
        RuntimeStatus::note_error(&status, "poll: HTTP 503");
        assert_eq!(
            status_line(&inner),
            "polling, 1,234 handled, last error poll: HTTP 503"
        );
        // A workspace that wants an event stream says whether it is up.
        inner.watched[0].wake = Some(super::super::wake::WakeState::new(
            crate::config::WakeMode::Auto,
        ));
        assert_eq!(
            status_line(&inner),
            "polling, events not connected, 1,234 handled, last error poll: HTTP 503"
        );
        inner.watched[0].wake = None;
        inner
            .watched
            .push(w("b", &RuntimeStatus::new(Instant::now())));
        assert_eq!(
            status_line(&inner),
            "2 workspaces, 1 polling, 1,234 handled, last error poll: HTTP 503"
        );
    }
}
