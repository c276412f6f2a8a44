//! Peer metadata for `connect`: who sent a message (display name and role), so the
//! backend gets `MOLECULE_CALLER_NAME` / `MOLECULE_CALLER_ROLE`. Owns the cache, the
//! hand-off from the poll thread ([`Enrichment`]) and the loop of the one lookup
//! worker ([`run_worker`]); the runner spawns that thread. Never blocks the poll
//! thread on the network: a first message from a new peer may go out without a name.
//!
//! Where names come from: the `peer_name`/`peer_role` fields a server adds with
//! `include=peer_info` (§API-2.4), remembered as they pass; for servers without them,
//! `GET /registry/discover/<id>` (§API-2.9) on the worker, with a 2 s limit.
//!
//! Invariants (all behind the one `Mutex` of [`PeerCache`]):
//! - the LRU holds at most `capacity` entries (1024 in `connect`); each is stamped
//!   with its fetch time and answers only while younger than the TTL (300 s); a
//!   failed lookup is a negative entry with the same TTL, so a peer the registry will
//!   not describe is asked about at most once per TTL;
//! - keys are lower-case UUIDs: nothing else is ever stored, queued or put in a URL;
//! - an id is in the in-flight set exactly while it waits in the lookup queue or is
//!   being looked up, so one peer is never fetched twice at once; with a queue of
//!   [`QUEUE`] ids and one worker the set never holds more than `QUEUE + 1`;
//! - the high-water mark is the largest size the LRU ever had (for the status file).
//!
//! Memory stays flat under a burst of distinct peers: the LRU, the queue and the
//! in-flight set are all bounded, and an id that finds the queue full is dropped
//! (looked up on a later message instead).

use std::collections::HashSet;
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::inbox::Inbound;
use crate::lru::Lru;
use crate::shutdown::Shutdown;
use crate::uuid::WorkspaceId;

/// Peers remembered.
pub const CAPACITY: usize = 1024;
/// How long a name (or a failed lookup) is trusted.
pub const TTL: Duration = Duration::from_secs(300);
/// Whole-request limit of one discover lookup.
pub const LOOKUP_TIMEOUT: Duration = Duration::from_secs(2);
/// Ids waiting for the worker; more are dropped, not queued.
pub const QUEUE: usize = 64;
/// Longest name or role kept, in characters.
const MAX_LABEL: usize = 128;

/// What is known about a peer.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeerInfo {
    /// Display name.
    pub name: Option<String>,
    /// Role.
    pub role: Option<String>,
}

impl PeerInfo {
    /// Cleans both fields (see [`clean_label`]).
    pub fn new(name: Option<&str>, role: Option<&str>) -> Self {
        PeerInfo {
            name: name.and_then(clean_label),
            role: role.and_then(clean_label),
        }
    }

    /// Neither field is known.
    pub fn is_empty(&self) -> bool {
        self.name.is_none() && self.role.is_none()
    }
}

/// A cache answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cached {
    /// Known and fresh.
    Found(PeerInfo),
    /// A recent lookup failed: do not ask again before the TTL runs out.
    Failed,
    /// Not cached, or expired.
    Unknown,
}

#[derive(Debug, Clone)]
enum Entry {
    Found(PeerInfo),
    Failed,
}

struct Inner {
    lru: Lru<String, crate::lru::Stamped<Entry>>,
    in_flight: HashSet<String>,
    high_water: usize,
}

/// The peer metadata cache. One lock; every method holds it briefly and never
/// across I/O.
pub struct PeerCache {
    inner: Mutex<Inner>,
    ttl: Duration,
}

impl PeerCache {
    /// An empty cache of `capacity` peers whose entries live `ttl`.
    pub fn new(capacity: usize, ttl: Duration) -> Self {
        PeerCache {
            inner: Mutex::new(Inner {
                lru: Lru::new(capacity),
                in_flight: HashSet::new(),
                high_water: 0,
            }),
            ttl,
        }
    }

    // Entries are plain values replaced whole, so a panic elsewhere cannot leave one
    // half-written: using the data after a poisoned lock is safe.
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// What is known about `id` at `now` (a fresh hit becomes most recent).
    pub fn lookup(&self, id: &str, now: Instant) -> Cached {
        let Some(key) = key_of(id) else {
            return Cached::Unknown;
        };
        let ttl = self.ttl;
        answer(self.lock().lru.get_fresh(&key, now, ttl))
    }

    /// Stores what the platform told us about `id` at `now`.
    pub fn remember(&self, id: &str, info: PeerInfo, now: Instant) {
        if let Some(key) = key_of(id) {
            self.store(key, Entry::Found(info), now);
        }
    }

    /// Stores a failed lookup of `id` at `now` (a negative entry).
    #[cfg(test)]
    pub fn remember_failure(&self, id: &str, now: Instant) {
        if let Some(key) = key_of(id) {
            self.store(key, Entry::Failed, now);
        }
    }

    fn store(&self, key: String, entry: Entry, now: Instant) {
        let mut g = self.lock();
        g.lru.insert_at(key, entry, now);
        g.high_water = g.high_water.max(g.lru.len());
    }

    /// The cached answer for `id`, and whether the caller now owns a lookup of it:
    /// `true` only when nothing fresh is cached, no lookup is in flight and the
    /// in-flight set has room. The owner must hand the id to the worker or call
    /// [`PeerCache::release`].
    fn lookup_or_claim(&self, key: &str, now: Instant) -> (Cached, bool) {
        let ttl = self.ttl;
        let mut g = self.lock();
        let cached = answer(g.lru.get_fresh(&key.to_string(), now, ttl));
        if cached != Cached::Unknown || g.in_flight.len() > QUEUE {
            return (cached, false);
        }
        let claimed = g.in_flight.insert(key.to_string());
        (cached, claimed)
    }

    /// Ends the in-flight claim on `id`.
    pub fn release(&self, id: &str) {
        if let Some(key) = key_of(id) {
            self.lock().in_flight.remove(&key);
        }
    }

    /// Records the worker's result for `id` and ends its in-flight claim, under one
    /// lock so no reader sees "not in flight, not cached" in between.
    fn complete(&self, key: &str, entry: Entry, now: Instant) {
        let mut g = self.lock();
        g.lru.insert_at(key.to_string(), entry, now);
        g.high_water = g.high_water.max(g.lru.len());
        g.in_flight.remove(key);
    }

    /// Peers cached (fresh or not yet evicted).
    pub fn len(&self) -> usize {
        self.lock().lru.len()
    }

    /// Is nothing cached?
    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The most peers the cache may hold.
    pub fn capacity(&self) -> usize {
        self.lock().lru.capacity()
    }

    /// The most peers it ever held.
    pub fn high_water(&self) -> usize {
        self.lock().high_water
    }

    /// Lookups queued or running.
    pub fn in_flight(&self) -> usize {
        self.lock().in_flight.len()
    }
}

fn answer(entry: Option<&Entry>) -> Cached {
    match entry {
        Some(Entry::Found(info)) => Cached::Found(info.clone()),
        Some(Entry::Failed) => Cached::Failed,
        None => Cached::Unknown,
    }
}

/// The cache key: the id in lower case, or `None` if it is not a UUID.
fn key_of(id: &str) -> Option<String> {
    WorkspaceId::exact(id).map(|id| id.to_string())
}

/// A name or role as we pass it on: control characters removed (an environment
/// value cannot hold a NUL, and a newline would forge log lines), trimmed, at most
/// [`MAX_LABEL`] characters; `None` when nothing is left.
pub fn clean_label(s: &str) -> Option<String> {
    let cleaned: String = s
        .chars()
        .filter(|c| !c.is_control())
        .collect::<String>()
        .trim()
        .chars()
        .take(MAX_LABEL)
        .collect();
    let cleaned = cleaned.trim_end().to_string();
    (!cleaned.is_empty()).then_some(cleaned)
}

/// The poll thread's side: fills in names from the cache and queues lookups.
/// Cheap to clone; never blocks.
#[derive(Clone)]
pub struct Enrichment {
    cache: Arc<PeerCache>,
    queue: SyncSender<WorkspaceId>,
}

/// The enrichment handle and the worker's end of its bounded queue.
pub fn channel(cache: Arc<PeerCache>) -> (Enrichment, Receiver<WorkspaceId>) {
    let (queue, rx) = mpsc::sync_channel(QUEUE);
    (Enrichment { cache, queue }, rx)
}

impl Enrichment {
    /// Names the sender of `msg`: from the row's own `peer_info` fields when the
    /// server sent them (and remembered), else from the cache; on a miss the peer is
    /// queued for the worker and the message goes on without a name.
    pub fn apply(&self, msg: &mut Inbound, now: Instant) {
        let Some(peer) = msg.source_id.clone() else {
            return; // a canvas user
        };
        let from_row = PeerInfo::new(msg.peer_name.as_deref(), msg.peer_role.as_deref());
        if !from_row.is_empty() {
            msg.peer_name.clone_from(&from_row.name);
            msg.peer_role.clone_from(&from_row.role);
            self.cache.remember(&peer, from_row, now);
            return;
        }
        match self.cache.lookup_or_claim(&peer, now) {
            (Cached::Found(info), _) => {
                msg.peer_name = info.name;
                msg.peer_role = info.role;
            }
            (Cached::Failed, _) | (Cached::Unknown, false) => {}
            (Cached::Unknown, true) => match self.queue.try_send(peer) {
                Ok(()) => {}
                Err(TrySendError::Full(peer) | TrySendError::Disconnected(peer)) => {
                    // Dropped, not waited for: a later message from this peer asks again.
                    self.cache.release(&peer);
                }
            },
        }
    }

    /// The cache behind this handle.
    #[cfg(test)]
    pub fn cache(&self) -> &Arc<PeerCache> {
        &self.cache
    }
}

/// The name and role in a discover answer (`{"id","url","name"}`; `role` if a server
/// adds it). Anything else (the URL) is ignored: it is never dialled (§API-2.9).
pub fn info_from_discover(body: &Value) -> PeerInfo {
    PeerInfo::new(
        body.get("name").and_then(Value::as_str),
        body.get("role").and_then(Value::as_str),
    )
}

/// The lookup worker: takes ids off the queue until every [`Enrichment`] is gone
/// (the poll thread has ended), asks `lookup` about each and caches the answer, or a
/// negative entry when it fails. After a stop is requested the rest of the queue is
/// released unasked.
pub fn run_worker(
    queue: Receiver<WorkspaceId>,
    cache: &PeerCache,
    shutdown: &Shutdown,
    lookup: impl Fn(&WorkspaceId) -> Result<PeerInfo, String>,
) {
    while let Ok(key) = queue.recv() {
        if shutdown.is_triggered() {
            cache.release(&key);
            continue;
        }
        let started = Instant::now();
        let result = lookup(&key);
        let ms = started.elapsed().as_millis();
        let entry = match result {
            Ok(info) => {
                log::debug!("peer {key}: looked up in {ms} ms");
                Entry::Found(info)
            }
            Err(e) => {
                log::debug!(
                    "peer {key}: no name after {ms} ms ({e}); not asking again for a while"
                );
                Entry::Failed
            }
        };
        cache.complete(&key, entry, Instant::now());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const P1: &str = "22222222-2222-4222-8222-222222222222";
    const P2: &str = "33333333-3333-4333-8333-333333333333";

    fn peer(i: usize) -> String {
        format!("{i:08x}-0000-4000-8000-000000000000")
    }

    fn msg(source: Option<&str>, name: Option<&str>) -> Inbound {
        Inbound {
            activity_id: "a".into(),
            source_id: source.map(|s| WorkspaceId::exact(s).expect("a UUID")),
            message_id: None,
            in_reply_to: None,
            text: "hi".into(),
            other_parts: vec![],
            context_id: None,
            task_id: None,
            peer_name: name.map(str::to_string),
            peer_role: None,
            raw: Value::Null,
            created_at_us: None,
            is_request_update: false,
            request_id: None,
            attachments: vec![],
        }
    }

    fn info(name: &str) -> PeerInfo {
        PeerInfo::new(Some(name), None)
    }

    #[test]
    fn entries_expire_after_the_ttl() {
        let t0 = Instant::now();
        let c = PeerCache::new(8, TTL);
        c.remember(P1, info("alice"), t0);
        assert_eq!(
            c.lookup(P1, t0 + Duration::from_secs(299)),
            Cached::Found(info("alice"))
        );
        assert_eq!(c.lookup(P1, t0 + TTL), Cached::Unknown);
        assert!(c.is_empty(), "an expired entry gives its slot back");
    }

    #[test]
    fn failures_are_negative_entries_with_the_same_ttl() {
        let t0 = Instant::now();
        let c = PeerCache::new(8, TTL);
        c.remember_failure(P1, t0);
        assert_eq!(c.lookup(P1, t0 + Duration::from_secs(10)), Cached::Failed);
        assert_eq!(c.lookup(P1, t0 + TTL), Cached::Unknown);
        // A negative entry stops new lookups until it expires.
        let (e, rx) = channel(Arc::new(PeerCache::new(8, TTL)));
        e.cache().remember_failure(P1, t0);
        let mut m = msg(Some(P1), None);
        e.apply(&mut m, t0 + Duration::from_secs(1));
        assert!(rx.try_recv().is_err());
        e.apply(&mut m, t0 + TTL);
        assert_eq!(rx.try_recv().as_deref(), Ok(P1));
    }

    #[test]
    fn ids_are_validated_and_case_folded() {
        let t0 = Instant::now();
        let c = PeerCache::new(8, TTL);
        c.remember("../../etc/passwd", info("x"), t0);
        assert!(c.is_empty());
        c.remember(&P1.to_ascii_uppercase(), info("alice"), t0);
        assert_eq!(c.lookup(P1, t0), Cached::Found(info("alice")));
    }

    #[test]
    fn row_fields_fill_the_cache_and_skip_the_lookup() {
        let t0 = Instant::now();
        let (e, rx) = channel(Arc::new(PeerCache::new(8, TTL)));
        let mut m = msg(Some(P1), Some(" alice\n"));
        m.peer_role = Some("writer".into());
        e.apply(&mut m, t0);
        assert_eq!(m.peer_name.as_deref(), Some("alice"));
        assert!(rx.try_recv().is_err());
        // The next message from that peer without peer_info gets the name from the cache.
        let mut next = msg(Some(P1), None);
        e.apply(&mut next, t0 + Duration::from_secs(1));
        assert_eq!(next.peer_name.as_deref(), Some("alice"));
        assert_eq!(next.peer_role.as_deref(), Some("writer"));
    }

    #[test]
    fn a_miss_queues_one_lookup_and_never_two_at_once() {
        let t0 = Instant::now();
        let (e, rx) = channel(Arc::new(PeerCache::new(8, TTL)));
        let mut m = msg(Some(P1), None);
        e.apply(&mut m, t0);
        assert_eq!(
            m.peer_name, None,
            "the first message goes on without a name"
        );
        e.apply(&mut m, t0);
        assert_eq!(rx.try_recv().as_deref(), Ok(P1));
        assert!(rx.try_recv().is_err(), "in flight: not queued twice");
        assert_eq!(e.cache().in_flight(), 1);
        e.cache().complete(P1, Entry::Found(info("alice")), t0);
        assert_eq!(e.cache().in_flight(), 0);
        e.apply(&mut m, t0);
        assert_eq!(m.peer_name.as_deref(), Some("alice"));
    }

    #[test]
    fn a_full_queue_drops_instead_of_blocking() {
        let t0 = Instant::now();
        let (e, rx) = channel(Arc::new(PeerCache::new(CAPACITY, TTL)));
        for i in 0..1000 {
            e.apply(&mut msg(Some(&peer(i)), None), t0);
        }
        let queued: Vec<WorkspaceId> = rx.try_iter().collect();
        assert_eq!(queued.len(), QUEUE);
        assert_eq!(e.cache().in_flight(), QUEUE, "dropped ids are released");
        // A dropped peer is asked about on its next message.
        e.apply(&mut msg(Some(&peer(999)), None), t0);
        assert_eq!(rx.try_recv().unwrap(), peer(999).as_str());
    }

    #[test]
    fn a_burst_of_distinct_peers_stays_bounded() {
        let t0 = Instant::now();
        let c = PeerCache::new(CAPACITY, TTL);
        for i in 0..5000 {
            c.remember(&peer(i), info("p"), t0);
            assert!(c.len() <= CAPACITY);
        }
        assert_eq!(c.high_water(), CAPACITY);
        assert_eq!(c.lookup(&peer(0), t0), Cached::Unknown, "oldest evicted");
        assert_eq!(c.lookup(&peer(4999), t0), Cached::Found(info("p")));
    }

    #[test]
    fn worker_caches_answers_and_failures() {
        let (e, rx) = channel(Arc::new(PeerCache::new(8, TTL)));
        let cache = e.cache().clone();
        let t0 = Instant::now();
        e.apply(&mut msg(Some(P1), None), t0);
        e.apply(&mut msg(Some(P2), None), t0);
        drop(e);
        run_worker(rx, &cache, &Shutdown::new(), |id| {
            if *id == P1 {
                Ok(info_from_discover(
                    &json!({"id": P1, "name": "alice", "url": "x"}),
                ))
            } else {
                Err("HTTP 403".into())
            }
        });
        let now = Instant::now();
        assert_eq!(cache.lookup(P1, now), Cached::Found(info("alice")));
        assert_eq!(cache.lookup(P2, now), Cached::Failed);
        assert_eq!(cache.in_flight(), 0);
    }

    #[test]
    fn labels_are_cleaned() {
        assert_eq!(clean_label("  Bob\u{0}\n "), Some("Bob".into()));
        assert_eq!(clean_label("\n\t"), None);
        assert_eq!(
            clean_label(&"x".repeat(500)).map(|s| s.len()),
            Some(MAX_LABEL)
        );
    }
}
