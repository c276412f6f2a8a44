//! `Shutdown`: the one stop flag every loop waits on. A `Mutex<Option<StopReason>>`
//! plus a `Condvar`, so a wait returns the moment a stop is requested instead of
//! sleeping blind. Spawns nothing.

use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::{Duration, Instant};

use crate::error::Error;

/// Why the process is stopping. The first reason recorded wins.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopReason {
    /// SIGTERM or SIGINT: a clean stop, exit 0.
    Signal,
    /// The work asked for is done (`--once`, `--max-messages`, idle exit).
    Finished,
    /// A fatal error ended a loop: the process ends with it (its exit code and
    /// message).
    Fatal(Error),
    /// A loop thread died unexpectedly (a panic): never stay up half-dead.
    ThreadDied(String),
}

type Hook = Box<dyn Fn() + Send>;

/// Cheap to clone; clones share one flag.
#[derive(Clone, Default)]
pub struct Shutdown {
    inner: Arc<(Mutex<Option<StopReason>>, Condvar)>,
    hooks: Arc<Mutex<Vec<Hook>>>,
}

impl Shutdown {
    /// A flag that is not set.
    pub fn new() -> Self {
        Self::default()
    }

    /// Requests a stop. Only the first reason is kept; later calls still wake waiters.
    pub fn trigger(&self, reason: StopReason) {
        {
            let (lock, cv) = &*self.inner;
            let mut guard = lock.lock().unwrap_or_else(PoisonError::into_inner);
            if guard.is_none() {
                *guard = Some(reason);
            }
            cv.notify_all();
        }
        for hook in self
            .hooks
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
        {
            hook();
        }
    }

    /// Runs `hook` on every trigger (and at once if already triggered): for waits
    /// that are not on this condvar, e.g. a thread blocked on a channel.
    pub fn on_trigger(&self, hook: impl Fn() + Send + 'static) {
        if self.is_triggered() {
            hook();
        }
        self.hooks
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(Box::new(hook));
    }

    /// Has a stop been requested?
    pub fn is_triggered(&self) -> bool {
        self.reason().is_some()
    }

    /// The recorded reason, if any.
    pub fn reason(&self) -> Option<StopReason> {
        let (lock, _) = &*self.inner;
        lock.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// Waits up to `d`; returns `true` as soon as a stop is requested.
    pub fn wait_timeout(&self, d: Duration) -> bool {
        let (lock, cv) = &*self.inner;
        let guard = lock.lock().unwrap_or_else(PoisonError::into_inner);
        let (guard, _) = cv
            .wait_timeout_while(guard, d, |stop| stop.is_none())
            .unwrap_or_else(PoisonError::into_inner);
        guard.is_some()
    }

    /// Waits until `deadline`; returns `true` as soon as a stop is requested.
    pub fn wait_until(&self, deadline: Instant) -> bool {
        self.wait_timeout(deadline.saturating_duration_since(Instant::now()))
    }

    /// Blocks until a stop is requested and returns its reason.
    pub fn wait(&self) -> StopReason {
        let (lock, cv) = &*self.inner;
        let guard = lock.lock().unwrap_or_else(PoisonError::into_inner);
        let guard = cv
            .wait_while(guard, |stop| stop.is_none())
            .unwrap_or_else(PoisonError::into_inner);
        guard.clone().unwrap_or(StopReason::Finished)
    }
}

/// Held by every loop thread: if the thread unwinds (a panic) the guard's `Drop`
/// stops the whole process, so no loop keeps running while another is dead.
pub struct ThreadGuard {
    shutdown: Shutdown,
    name: &'static str,
}

impl ThreadGuard {
    /// A guard for the thread called `name`.
    pub fn new(shutdown: &Shutdown, name: &'static str) -> Self {
        Self {
            shutdown: shutdown.clone(),
            name,
        }
    }
}

impl Drop for ThreadGuard {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.shutdown.trigger(StopReason::ThreadDied(format!(
                "{} thread panicked",
                self.name
            )));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wait_returns_at_once_when_triggered() {
        let s = Shutdown::new();
        assert!(!s.wait_timeout(Duration::from_millis(1)));
        let s2 = s.clone();
        let t = std::thread::spawn(move || s2.wait_timeout(Duration::from_secs(60)));
        s.trigger(StopReason::Signal);
        assert!(t.join().unwrap());
        assert_eq!(s.wait(), StopReason::Signal);
    }

    #[test]
    fn hooks_run_on_trigger() {
        let s = Shutdown::new();
        let (tx, rx) = std::sync::mpsc::channel();
        s.on_trigger(move || {
            let _ = tx.send(());
        });
        assert!(rx.try_recv().is_err());
        s.trigger(StopReason::Signal);
        assert!(rx.try_recv().is_ok());
    }

    #[test]
    fn first_reason_wins() {
        let s = Shutdown::new();
        let fatal = StopReason::Fatal(Error::Credentials("x".into()));
        s.trigger(fatal.clone());
        s.trigger(StopReason::Signal);
        assert_eq!(s.reason(), Some(fatal));
    }

    #[test]
    fn guard_triggers_on_panic_only() {
        let s = Shutdown::new();
        {
            let _g = ThreadGuard::new(&s, "ok");
        }
        assert!(!s.is_triggered());
        let s2 = s.clone();
        let r = std::thread::spawn(move || {
            let _g = ThreadGuard::new(&s2, "poll");
            panic!("boom");
        })
        .join();
        assert!(r.is_err());
        assert_eq!(
            s.reason(),
            Some(StopReason::ThreadDied("poll thread panicked".into()))
        );
    }
}
