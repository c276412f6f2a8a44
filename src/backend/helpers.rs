//! Helper threads of the `exec` backend, kept for reuse: a run without a pidfd needs
//! one to wait for its command's exit (see `watch`), and starting and ending a thread
//! costs about 25 syscalls (a stack and a signal stack mapped and unmapped, its name,
//! its exit). A job runs at once on an idle helper or on a new one, never queued
//! behind another job, so reuse changes no timing a run relies on. Invariant: an idle helper's sender is in the idle list exactly while
//! the helper waits for a job; a helper ends only after removing it under the lock.

use std::io;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Mutex, PoisonError};
use std::thread;
use std::time::Duration;

/// Stack of a helper (a wait: shallow); the 2 MiB default costs more to map.
const STACK: usize = 128 * 1024;

/// The helpers of every `exec` run in this process. An idle helper ends after 5 s
/// without a job (an idle connector keeps none); at most 16 wait idle.
pub(super) static HELPERS: Helpers = Helpers::new(Duration::from_secs(5), 16);

type Job = Box<dyn FnOnce() + Send + 'static>;

/// One idle helper: where to send its next job, and who it is.
struct Idle {
    id: u64,
    jobs: Sender<Job>,
}

struct Pool {
    idle: Vec<Idle>,
    /// Helpers started so far (also their ids).
    started: u64,
    /// Helpers alive now, busy or idle.
    live: usize,
}

/// A set of reusable helper threads.
pub(super) struct Helpers {
    pool: Mutex<Pool>,
    idle_for: Duration,
    max_idle: usize,
}

impl Helpers {
    const fn new(idle_for: Duration, max_idle: usize) -> Self {
        Helpers {
            pool: Mutex::new(Pool {
                idle: Vec::new(),
                started: 0,
                live: 0,
            }),
            idle_for,
            max_idle,
        }
    }

    fn pool(&self) -> std::sync::MutexGuard<'_, Pool> {
        self.pool.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Runs `job` on a helper thread now: an idle one, else a new one.
    pub(super) fn run(&'static self, job: impl FnOnce() + Send + 'static) -> io::Result<()> {
        let mut job: Job = Box::new(job);
        loop {
            let idle = self.pool().idle.pop();
            let Some(helper) = idle else { break };
            // A send fails only if that helper died (a panicking job, in tests).
            match helper.jobs.send(job) {
                Ok(()) => return Ok(()),
                Err(mpsc::SendError(j)) => job = j,
            }
        }
        let (tx, rx) = mpsc::channel();
        let id = {
            let mut pool = self.pool();
            pool.started = pool.started.wrapping_add(1);
            pool.live += 1;
            pool.started
        };
        let spawned = thread::Builder::new()
            .name("exec-helper".into())
            .stack_size(STACK)
            .spawn(move || {
                self.serve(id, job, &tx, &rx);
                self.pool().live -= 1;
            });
        if let Err(e) = spawned {
            self.pool().live -= 1;
            return Err(e);
        }
        Ok(())
    }

    /// A helper's life: its first job, then whatever comes while it is idle.
    fn serve(&self, id: u64, first: Job, tx: &Sender<Job>, rx: &Receiver<Job>) {
        first();
        loop {
            {
                let mut pool = self.pool();
                if pool.idle.len() >= self.max_idle {
                    return;
                }
                pool.idle.push(Idle {
                    id,
                    jobs: tx.clone(),
                });
            }
            let job = match rx.recv_timeout(self.idle_for) {
                Ok(job) => job,
                Err(RecvTimeoutError::Disconnected) => return,
                Err(RecvTimeoutError::Timeout) => {
                    let mut pool = self.pool();
                    let Some(i) = pool.idle.iter().position(|h| h.id == id) else {
                        // `run` took this helper meanwhile: its job is on the way.
                        drop(pool);
                        match rx.recv() {
                            Ok(job) => {
                                job();
                                continue;
                            }
                            Err(_) => return,
                        }
                    };
                    pool.idle.swap_remove(i);
                    return;
                }
            };
            job();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc::channel;
    use std::time::Instant;

    fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !cond() {
            assert!(Instant::now() < deadline, "timed out waiting until {what}");
            thread::yield_now();
        }
    }

    #[test]
    fn jobs_run_at_once_even_while_others_block() {
        static H: Helpers = Helpers::new(Duration::from_secs(60), 4);
        // Two jobs that each wait for the other finish only if neither is queued
        // behind the other.
        let (a_tx, a_rx) = channel::<()>();
        let (b_tx, b_rx) = channel::<()>();
        let (done_tx, done_rx) = channel::<&str>();
        let d1 = done_tx.clone();
        H.run(move || {
            a_tx.send(()).unwrap();
            b_rx.recv_timeout(Duration::from_secs(10)).unwrap();
            d1.send("a").unwrap();
        })
        .unwrap();
        H.run(move || {
            a_rx.recv_timeout(Duration::from_secs(10)).unwrap();
            b_tx.send(()).unwrap();
            done_tx.send("b").unwrap();
        })
        .unwrap();
        let mut got = [
            done_rx.recv_timeout(Duration::from_secs(10)).unwrap(),
            done_rx.recv_timeout(Duration::from_secs(10)).unwrap(),
        ];
        got.sort_unstable();
        assert_eq!(got, ["a", "b"]);
    }

    #[test]
    fn an_idle_helper_takes_the_next_job() {
        static H: Helpers = Helpers::new(Duration::from_secs(60), 4);
        let (tx, rx) = channel();
        for _ in 0..3 {
            let t = tx.clone();
            H.run(move || t.send(thread::current().id()).unwrap())
                .unwrap();
            rx.recv_timeout(Duration::from_secs(10)).unwrap();
            wait_until("the helper is idle", || H.pool().idle.len() == 1);
        }
        assert_eq!(
            H.pool().started,
            1,
            "each job after the first reused the helper"
        );
    }

    #[test]
    fn a_helper_idle_long_enough_ends() {
        static H: Helpers = Helpers::new(Duration::from_millis(20), 4);
        let (tx, rx) = channel();
        H.run(move || tx.send(()).unwrap()).unwrap();
        rx.recv_timeout(Duration::from_secs(10)).unwrap();
        wait_until("the idle helper ended", || H.pool().live == 0);
        let pool = H.pool();
        assert_eq!((pool.started, pool.idle.len()), (1, 0));
    }
}
