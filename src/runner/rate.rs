//! One rate budget per platform bucket (§API-1.4, issue 12): the platform allows a
//! fixed window of N requests per bucket (the org when `X-Molecule-Org-Id` is sent,
//! else the token), shared with everyone else in it. Every answer's
//! `X-RateLimit-Remaining`/`-Reset` updates the budget, and requests are let through
//! by class: heartbeats while anything is left; answers (replies, notifies, acks)
//! while the heartbeats of every workspace in the bucket and half the reserve stay
//! covered; reads (polls, tracker reads, lookups, streams) only above the whole
//! reserve, spaced evenly over what is left of the window and taken in turn, so
//! many workspaces sharing a bucket stretch their polls fairly instead of meeting a
//! 429. Without the headers (older servers) or with `unlimited` nothing waits.

use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use serde_json::json;

use crate::api::{Class, Limit, Pacer, RateHeaders};
use crate::shutdown::Shutdown;
use crate::status_file::RateReport;

/// The window assumed when a reset time is not known (the platform's is 60 s).
const WINDOW: Duration = Duration::from_secs(60);
/// Heartbeats per workspace kept in hand for the rest of a window (20 s beats).
const BEATS_PER_WINDOW: u64 = 3;

/// A bucket's budget, shared by every workspace client in it.
pub struct RateBudget {
    inner: Mutex<Bucket>,
    cv: Condvar,
    reserve_pct: u64,
}

#[derive(Debug)]
struct Bucket {
    /// `None`: no limit known (no headers yet, an older server, or `unlimited`).
    limit: Option<u64>,
    unlimited: bool,
    /// Requests left in this window, by our estimate.
    remaining: u64,
    /// The platform's last word, for the status file.
    last_remaining: Option<u64>,
    reset_at: Instant,
    /// Sent, not yet answered.
    in_flight: u64,
    /// The next free slot for a read.
    next_read: Instant,
    /// Workspaces sharing the bucket.
    members: u64,
    /// Requests that had to wait for the budget.
    waited: u64,
    /// 429 answers seen.
    rate_limited: u64,
}

impl RateBudget {
    /// A budget leaving `reserve_pct` % of the bucket to other clients.
    pub fn new(reserve_pct: u8) -> Arc<RateBudget> {
        let now = Instant::now();
        Arc::new(RateBudget {
            inner: Mutex::new(Bucket {
                limit: None,
                unlimited: false,
                remaining: 0,
                last_remaining: None,
                reset_at: now,
                in_flight: 0,
                next_read: now,
                members: 0,
                waited: 0,
                rate_limited: 0,
            }),
            cv: Condvar::new(),
            reserve_pct: u64::from(reserve_pct.min(90)),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Bucket> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A workspace client joins the bucket; `shutdown` ends its waits at once.
    pub fn pacer(self: &Arc<Self>, shutdown: &Shutdown) -> Arc<dyn Pacer> {
        self.lock().members += 1;
        let me = Arc::clone(self);
        shutdown.on_trigger(move || me.cv.notify_all());
        Arc::new(Member {
            budget: Arc::clone(self),
            shutdown: shutdown.clone(),
        })
    }

    /// What the status file shows: limit, remaining and reset as last seen, the
    /// reserve, and how many requests waited or met a 429.
    pub fn report(&self) -> RateReport {
        let b = self.lock();
        let now = Instant::now();
        RateReport {
            limit: if b.unlimited {
                json!("unlimited")
            } else {
                json!(b.limit)
            },
            remaining: b.last_remaining,
            reset_secs: b
                .limit
                .map(|_| b.reset_at.saturating_duration_since(now).as_secs()),
            reserve_pct: self.reserve_pct,
            workspaces: b.members,
            waited: b.waited,
            rate_limited: b.rate_limited,
        }
    }

    /// Blocks until a request of `class` may go, or `shutdown` is triggered (then it
    /// goes at once: a stopping connector sends its last few requests regardless).
    fn acquire(&self, class: Class, shutdown: &Shutdown) {
        let mut b = self.lock();
        let mut counted = false;
        let mut my_slot: Option<Instant> = None;
        loop {
            let now = Instant::now();
            let Some(limit) = b.limit else { break };
            if shutdown.is_triggered() {
                break;
            }
            if now >= b.reset_at {
                // A new window: everything is back, minus what is still on the way.
                b.remaining = limit.saturating_sub(b.in_flight);
                b.reset_at = now + WINDOW;
                b.next_read = now;
            }
            let left = b.reset_at.saturating_duration_since(now);
            let floor = self.floor(&b, class, left, limit);
            let wait_until = if b.remaining <= floor {
                b.reset_at
            } else if class == Class::Read {
                // Reads take turns, spaced over what is left of the window.
                let spare = b.remaining - floor;
                let spacing = left / u32::try_from(spare).unwrap_or(u32::MAX).max(1);
                let slot = *my_slot.get_or_insert_with(|| {
                    let slot = b.next_read.max(now);
                    b.next_read = slot + spacing;
                    slot
                });
                if slot <= now {
                    break;
                }
                slot
            } else {
                break;
            };
            if !counted {
                b.waited += 1;
                counted = true;
            }
            let d = wait_until.saturating_duration_since(now);
            b = self
                .cv
                .wait_timeout(b, d.max(Duration::from_millis(1)))
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        b.remaining = b.remaining.saturating_sub(1);
        b.in_flight += 1;
    }

    /// Requests of `class` may go only while more than this many are left.
    fn floor(&self, b: &Bucket, class: Class, left: Duration, limit: u64) -> u64 {
        let beats = b.members.saturating_mul(BEATS_PER_WINDOW);
        let beats = beats.saturating_mul(left.as_millis() as u64) / WINDOW.as_millis() as u64;
        let reserve = limit.saturating_mul(self.reserve_pct) / 100;
        match class {
            Class::Liveness => 0,
            Class::Answer => beats + reserve / 2,
            Class::Read => beats + reserve,
        }
    }

    fn observe(&self, h: Option<RateHeaders>) {
        let mut b = self.lock();
        b.in_flight = b.in_flight.saturating_sub(1);
        let Some(h) = h else { return };
        let now = Instant::now();
        match h.limit {
            Some(Limit::Unlimited) => {
                b.unlimited = true;
                b.limit = None;
            }
            Some(Limit::PerWindow(n)) if n > 0 => {
                b.unlimited = false;
                b.limit = Some(n);
            }
            _ => {}
        }
        if let Some(r) = h.remaining {
            b.last_remaining = Some(r);
            if b.limit.is_some() {
                // Our other requests on the way may not be counted in it yet.
                b.remaining = r.saturating_sub(b.in_flight);
            }
        }
        if let Some(s) = h.reset_secs {
            b.reset_at = now + Duration::from_secs(s.min(3600));
        }
        if h.rate_limited {
            b.rate_limited += 1;
            b.remaining = 0;
            if let Some(r) = h.retry_after {
                b.reset_at = b.reset_at.max(now + r);
            }
        }
        drop(b);
        self.cv.notify_all();
    }
}

/// One workspace's view of a shared budget.
struct Member {
    budget: Arc<RateBudget>,
    shutdown: Shutdown,
}

impl Pacer for Member {
    fn before(&self, class: Class) {
        self.budget.acquire(class, &self.shutdown);
    }

    fn after(&self, headers: Option<RateHeaders>) {
        self.budget.observe(headers);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The `rate_budget` object as the status file has it.
    fn json(b: &RateBudget) -> serde_json::Value {
        serde_json::to_value(b.report()).unwrap()
    }

    fn headers(limit: u64, remaining: u64, reset: u64) -> Option<RateHeaders> {
        Some(RateHeaders {
            limit: Some(Limit::PerWindow(limit)),
            remaining: Some(remaining),
            reset_secs: Some(reset),
            rate_limited: false,
            retry_after: None,
        })
    }

    #[test]
    fn nothing_waits_without_headers_or_when_unlimited() {
        let b = RateBudget::new(30);
        let p = b.pacer(&Shutdown::new());
        p.before(Class::Read);
        p.after(None);
        p.before(Class::Read);
        p.after(Some(RateHeaders {
            limit: Some(Limit::Unlimited),
            ..RateHeaders::default()
        }));
        for _ in 0..1000 {
            p.before(Class::Read);
            p.after(None);
        }
        assert_eq!(json(&b)["limit"], "unlimited");
        assert_eq!(json(&b)["waited"], 0);
    }

    #[test]
    fn classes_stop_at_their_floor_in_priority_order() {
        let b = RateBudget::new(30);
        let p = b.pacer(&Shutdown::new());
        p.before(Class::Liveness);
        // 100 per window, 25 left: the reserve (30) already covers more than that.
        p.after(headers(100, 25, 60));
        let bucket = b.lock();
        let left = Duration::from_secs(60);
        assert_eq!(b.floor(&bucket, Class::Liveness, left, 100), 0);
        assert_eq!(b.floor(&bucket, Class::Answer, left, 100), 3 + 15);
        assert_eq!(b.floor(&bucket, Class::Read, left, 100), 3 + 30);
        assert!(bucket.remaining > b.floor(&bucket, Class::Answer, left, 100));
        assert!(bucket.remaining <= b.floor(&bucket, Class::Read, left, 100));
        drop(bucket);
        // Heartbeats and answers still go at once; a read would wait for the reset.
        p.before(Class::Liveness);
        p.after(None);
        p.before(Class::Answer);
        p.after(None);
        assert_eq!(json(&b)["waited"], 0);
    }

    #[test]
    fn reads_wait_their_turn_and_stop_waiting_on_shutdown() {
        let b = RateBudget::new(0);
        let stop = Shutdown::new();
        let p = b.pacer(&stop);
        p.before(Class::Read);
        // Few left with a long window: reads are spaced far apart.
        p.after(headers(600, 10, 60));
        p.before(Class::Read); // the first slot is now
        p.after(None);
        let stopper = stop.clone();
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            stopper.trigger(crate::shutdown::StopReason::Signal);
        });
        p.before(Class::Read); // spaced to seconds from now: only the stop ends it
        p.after(None);
        t.join().unwrap();
        let j = json(&b);
        assert_eq!(j["waited"], 1);
        assert_eq!(j["remaining"], 10);
        assert_eq!(j["limit"], 600);
    }

    #[test]
    fn a_429_empties_the_window() {
        let b = RateBudget::new(30);
        let p = b.pacer(&Shutdown::new());
        p.before(Class::Answer);
        p.after(Some(RateHeaders {
            rate_limited: true,
            retry_after: Some(Duration::from_secs(30)),
            ..headers(600, 0, 30).unwrap()
        }));
        assert_eq!(b.lock().remaining, 0);
        assert_eq!(json(&b)["rate_limited"], 1);
    }
}
