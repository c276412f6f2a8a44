//! Ordering for parallel dispatch: rows are tracked in the order they were fetched;
//! each sender (peer id, or the canvas) has a FIFO and at most one message in the
//! backend at a time; the cursor may only move to the newest row below which every
//! row is finished (the low-water mark), so a crash never skips an unfinished row.
//! Pure: no I/O, no clocks, no threads.
//!
//! Invariants: `slots[i]` has ticket `base + i`; a sender is in `ready` iff it has
//! queued tickets and is not `busy`; `rows` holds the row ids of all slots.

use std::collections::{HashMap, HashSet, VecDeque};

#[derive(Debug)]
struct Slot {
    row_id: String,
    seq: Option<i64>,
    done: bool,
}

/// The tracker.
#[derive(Debug, Default)]
pub struct Order {
    base: u64,
    slots: VecDeque<Slot>,
    rows: HashSet<String>,
    queues: HashMap<String, VecDeque<u64>>,
    busy: HashSet<String>,
    ready: VecDeque<String>,
}

impl Order {
    /// An empty tracker.
    pub fn new() -> Self {
        Self::default()
    }

    /// Is `row_id` fetched and not yet past the cursor?
    pub fn contains(&self, row_id: &str) -> bool {
        self.rows.contains(row_id)
    }

    /// Rows tracked (finished or not) that the cursor has not passed.
    pub fn outstanding(&self) -> usize {
        self.slots.len()
    }

    /// A row that needs no dispatch (skipped or already handled).
    pub fn push_done(&mut self, row_id: &str, seq: Option<i64>) -> u64 {
        self.push(row_id, seq, true)
    }

    /// A row for the backend, from `sender`. Returns its ticket.
    pub fn push_job(&mut self, row_id: &str, seq: Option<i64>, sender: &str) -> u64 {
        let ticket = self.push(row_id, seq, false);
        let queue = self.queues.entry(sender.to_string()).or_default();
        queue.push_back(ticket);
        if queue.len() == 1 && !self.busy.contains(sender) {
            self.ready.push_back(sender.to_string());
        }
        ticket
    }

    fn push(&mut self, row_id: &str, seq: Option<i64>, done: bool) -> u64 {
        let ticket = self.base + self.slots.len() as u64;
        self.slots.push_back(Slot {
            row_id: row_id.to_string(),
            seq,
            done,
        });
        self.rows.insert(row_id.to_string());
        ticket
    }

    /// The next message that may start: the oldest queued message of a sender that
    /// has nothing in the backend, senders taken in turn. Marks the sender busy.
    pub fn next_job(&mut self) -> Option<(u64, String)> {
        let sender = self.ready.pop_front()?;
        let queue = self.queues.get_mut(&sender)?;
        let ticket = queue.pop_front()?;
        if queue.is_empty() {
            self.queues.remove(&sender);
        }
        self.busy.insert(sender.clone());
        Some((ticket, sender))
    }

    /// A started message ended. `finished` is false when it was interrupted
    /// (shutdown): the row stays unfinished so the cursor never passes it.
    pub fn complete(&mut self, ticket: u64, sender: &str, finished: bool) {
        if finished
            && let Some(slot) = ticket
                .checked_sub(self.base)
                .and_then(|i| usize::try_from(i).ok())
                .and_then(|i| self.slots.get_mut(i))
        {
            slot.done = true;
        }
        self.busy.remove(sender);
        if self.queues.contains_key(sender) {
            self.ready.push_back(sender.to_string());
        }
    }

    /// The highest `seq` that may be acked when `handled` is the highest handled one:
    /// never at or past a row still tracked (unfinished, or finished behind one that
    /// is not), whatever order the platform's `seq` values came in.
    pub fn ack_ceiling(&self, handled: i64) -> i64 {
        self.slots
            .iter()
            .filter_map(|s| s.seq)
            .map(|s| s.saturating_sub(1))
            .fold(handled, i64::min)
    }

    /// Drops the finished prefix and returns the newest row it contained (the new
    /// cursor) with the highest `seq` seen in it.
    pub fn advance(&mut self) -> Option<(String, Option<i64>)> {
        let mut last: Option<(String, Option<i64>)> = None;
        while self.slots.front().is_some_and(|s| s.done) {
            let slot = self.slots.pop_front()?;
            self.base += 1;
            self.rows.remove(&slot.row_id);
            let seq = match (last.as_ref().and_then(|l| l.1), slot.seq) {
                (Some(a), Some(b)) => Some(a.max(b)),
                (a, b) => a.or(b),
            };
            last = Some((slot.row_id, seq));
        }
        last
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sequential_flow() {
        let mut o = Order::new();
        let t = o.push_job("r1", Some(1), "peer-a");
        assert_eq!(o.next_job(), Some((t, "peer-a".into())));
        assert_eq!(o.next_job(), None);
        assert_eq!(o.advance(), None);
        o.complete(t, "peer-a", true);
        assert_eq!(o.advance(), Some(("r1".into(), Some(1))));
        assert_eq!(o.outstanding(), 0);
    }

    #[test]
    fn one_at_a_time_per_sender_in_order() {
        let mut o = Order::new();
        let a1 = o.push_job("a1", None, "A");
        let a2 = o.push_job("a2", None, "A");
        let b1 = o.push_job("b1", None, "B");
        // A and B may run together; A's second message waits for its first.
        assert_eq!(o.next_job(), Some((a1, "A".into())));
        assert_eq!(o.next_job(), Some((b1, "B".into())));
        assert_eq!(o.next_job(), None);
        o.complete(a1, "A", true);
        assert_eq!(o.next_job(), Some((a2, "A".into())));
    }

    #[test]
    fn cursor_is_a_low_water_mark() {
        let mut o = Order::new();
        let a1 = o.push_job("a1", Some(1), "A");
        let b1 = o.push_job("b1", Some(2), "B");
        o.push_done("skip", Some(3));
        let (_, _) = (o.next_job(), o.next_job());
        // The newer row finishes first: the cursor must not move past a1.
        o.complete(b1, "B", true);
        assert_eq!(o.advance(), None);
        o.complete(a1, "A", true);
        assert_eq!(o.advance(), Some(("skip".into(), Some(3))));
    }

    #[test]
    fn acks_stay_below_every_tracked_row() {
        let mut o = Order::new();
        let a = o.push_job("a", Some(7), "A");
        o.push_done("b", Some(5)); // seqs need not follow the row order
        assert_eq!(o.ack_ceiling(10), 4);
        o.next_job();
        o.complete(a, "A", true);
        assert!(o.advance().is_some());
        assert_eq!(o.ack_ceiling(10), 10);
        o.push_job("c", None, "A");
        assert_eq!(o.ack_ceiling(10), 10, "a row without seq cannot lower it");
    }

    #[test]
    fn interrupted_rows_hold_the_cursor() {
        let mut o = Order::new();
        let a1 = o.push_job("a1", None, "A");
        o.push_done("x", None);
        o.next_job();
        o.complete(a1, "A", false);
        assert_eq!(o.advance(), None);
        assert!(o.contains("a1") && o.contains("x"));
    }

    #[test]
    fn senders_take_turns() {
        let mut o = Order::new();
        for i in 0..3 {
            o.push_job(&format!("a{i}"), None, "A");
        }
        let b = o.push_job("b0", None, "B");
        let (ta, _) = o.next_job().unwrap();
        o.complete(ta, "A", true);
        // B was waiting longer than A's second message: it goes first.
        assert_eq!(o.next_job(), Some((b, "B".into())));
    }
}
