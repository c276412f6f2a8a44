//! A bounded least-recently-used map. Pure: no I/O, no clocks, no logging. Callers
//! that need expiry store a [`Stamped`] value and pass the current time in, so tests
//! control time without sleeping.
//!
//! Invariant: `map` and `order` hold the same keys; each key's tick in `map` is its
//! key in `order`; `map.len() <= capacity`.

use std::collections::{BTreeMap, HashMap};
use std::hash::Hash;
use std::time::{Duration, Instant};

/// Bounded LRU map. `get` and `insert` make an entry the most recent; inserting past
/// the capacity evicts the least recent. Capacity 0 stores nothing.
#[derive(Debug, Clone)]
pub struct Lru<K, V> {
    map: HashMap<K, (V, u64)>,
    order: BTreeMap<u64, K>,
    tick: u64,
    capacity: usize,
}

impl<K: Eq + Hash + Clone, V> Lru<K, V> {
    /// An empty map holding at most `capacity` entries.
    pub fn new(capacity: usize) -> Self {
        Self {
            map: HashMap::new(),
            order: BTreeMap::new(),
            tick: 0,
            capacity,
        }
    }

    /// Maximum number of entries.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Is it empty?
    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Is `k` present? Does not change recency.
    pub fn contains(&self, k: &K) -> bool {
        self.map.contains_key(k)
    }

    /// The value for `k`, made most recent.
    pub fn get(&mut self, k: &K) -> Option<&V> {
        let tick = self.next_tick();
        let (_, old) = self.map.get(k)?;
        let old = *old;
        self.order.remove(&old);
        self.order.insert(tick, k.clone());
        let entry = self.map.get_mut(k)?;
        entry.1 = tick;
        Some(&entry.0)
    }

    /// The value for `k` without changing recency.
    pub fn peek(&self, k: &K) -> Option<&V> {
        self.map.get(k).map(|(v, _)| v)
    }

    /// Inserts or replaces `k` as the most recent entry; returns the evicted entry
    /// when the map was full.
    pub fn insert(&mut self, k: K, v: V) -> Option<(K, V)> {
        if self.capacity == 0 {
            return Some((k, v));
        }
        let tick = self.next_tick();
        if let Some((_, old)) = self.map.get(&k) {
            self.order.remove(&old.clone());
        }
        self.order.insert(tick, k.clone());
        self.map.insert(k, (v, tick));
        if self.map.len() > self.capacity {
            let (_, oldest) = self.order.pop_first()?;
            let (v, _) = self.map.remove(&oldest)?;
            return Some((oldest, v));
        }
        None
    }

    /// Removes `k`.
    pub fn remove(&mut self, k: &K) -> Option<V> {
        let (v, tick) = self.map.remove(k)?;
        self.order.remove(&tick);
        Some(v)
    }

    /// Keys from least to most recent.
    pub fn keys_oldest_first(&self) -> impl Iterator<Item = &K> {
        self.order.values()
    }

    fn next_tick(&mut self) -> u64 {
        self.tick = self.tick.wrapping_add(1);
        self.tick
    }
}

/// A cached value and the time it was stored, for maps with expiry.
#[derive(Debug, Clone, PartialEq)]
pub struct Stamped<V> {
    /// The value.
    pub value: V,
    /// When it was stored (fetched, for a cache).
    pub at: Instant,
}

impl<K: Eq + Hash + Clone, V> Lru<K, Stamped<V>> {
    /// Stores `value` for `k` as fetched at `now`, as the most recent entry.
    pub fn insert_at(&mut self, k: K, value: V, now: Instant) -> Option<(K, Stamped<V>)> {
        self.insert(k, Stamped { value, at: now })
    }

    /// The value for `k` if it is younger than `ttl` at `now`, made most recent. An
    /// expired entry is removed, so it neither answers nor holds a slot. A stamp later
    /// than `now` counts as fresh.
    pub fn get_fresh(&mut self, k: &K, now: Instant, ttl: Duration) -> Option<&V> {
        let at = self.peek(k)?.at;
        if now.saturating_duration_since(at) >= ttl {
            self.remove(k);
            return None;
        }
        self.get(k).map(|s| &s.value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn evicts_least_recent() {
        let mut l = Lru::new(2);
        assert!(l.insert("a", 1).is_none());
        assert!(l.insert("b", 2).is_none());
        assert_eq!(l.insert("c", 3), Some(("a", 1)));
        assert!(!l.contains(&"a"));
        assert_eq!(l.len(), 2);
    }

    #[test]
    fn get_promotes() {
        let mut l = Lru::new(2);
        l.insert("a", 1);
        l.insert("b", 2);
        assert_eq!(l.get(&"a"), Some(&1));
        assert_eq!(l.insert("c", 3), Some(("b", 2)));
        assert_eq!(
            l.keys_oldest_first().copied().collect::<Vec<_>>(),
            ["a", "c"]
        );
    }

    #[test]
    fn peek_does_not_promote() {
        let mut l = Lru::new(2);
        l.insert("a", 1);
        l.insert("b", 2);
        assert_eq!(l.peek(&"a"), Some(&1));
        assert_eq!(l.insert("c", 3), Some(("a", 1)));
    }

    #[test]
    fn replace_in_place() {
        let mut l = Lru::new(2);
        l.insert("a", 1);
        l.insert("b", 2);
        assert!(l.insert("a", 10).is_none());
        assert_eq!(l.len(), 2);
        assert_eq!(l.peek(&"a"), Some(&10));
        assert_eq!(l.insert("c", 3), Some(("b", 2)));
    }

    #[test]
    fn capacity_zero_and_one() {
        let mut z = Lru::new(0);
        assert_eq!(z.insert(1, 1), Some((1, 1)));
        assert!(z.is_empty());
        let mut o = Lru::new(1);
        o.insert(1, 1);
        assert_eq!(o.insert(2, 2), Some((1, 1)));
        assert_eq!(o.len(), 1);
        assert_eq!(o.remove(&2), Some(2));
        assert!(o.is_empty());
    }

    #[test]
    fn stays_bounded() {
        let mut l = Lru::new(100);
        for i in 0..10_000 {
            l.insert(i, i);
            assert!(l.len() <= 100);
        }
        assert_eq!(l.keys_oldest_first().next(), Some(&9900));
    }

    #[test]
    fn ttl_expiry_without_sleeping() {
        let t0 = Instant::now();
        let ttl = Duration::from_secs(300);
        let mut l = Lru::new(4);
        l.insert_at("a", 1, t0);
        assert_eq!(
            l.get_fresh(&"a", t0 + Duration::from_secs(299), ttl),
            Some(&1)
        );
        // Exactly at the TTL the entry is stale, and it is dropped, not kept.
        assert_eq!(l.get_fresh(&"a", t0 + ttl, ttl), None);
        assert!(!l.contains(&"a"));
        assert_eq!(l.get_fresh(&"missing", t0, ttl), None);
    }

    #[test]
    fn refresh_restarts_the_ttl_in_place() {
        let t0 = Instant::now();
        let ttl = Duration::from_secs(10);
        let mut l = Lru::new(2);
        l.insert_at("a", 1, t0);
        l.insert_at("b", 2, t0);
        assert!(l.insert_at("a", 3, t0 + Duration::from_secs(8)).is_none());
        assert_eq!(l.len(), 2);
        assert_eq!(
            l.get_fresh(&"a", t0 + Duration::from_secs(15), ttl),
            Some(&3)
        );
        assert_eq!(l.get_fresh(&"b", t0 + Duration::from_secs(15), ttl), None);
    }

    #[test]
    fn get_fresh_promotes() {
        let t0 = Instant::now();
        let ttl = Duration::from_secs(10);
        let mut l = Lru::new(2);
        l.insert_at("a", 1, t0);
        l.insert_at("b", 2, t0);
        assert_eq!(l.get_fresh(&"a", t0, ttl), Some(&1));
        let evicted = l.insert_at("c", 3, t0).map(|(k, _)| k);
        assert_eq!(evicted, Some("b"));
    }
}
