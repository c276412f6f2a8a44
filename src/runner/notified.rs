//! Our recent `/notify` posts, so that a canvas reply whose answer was lost is taken
//! for shown only on an echo that no other post of ours can have made. An echo row
//! holds nothing but the text and its time (§API-2.13, §API-2.4.1), so echoes are
//! counted: a stretch of the inbox with more echoes of a text than our other posts of
//! that text could have put there holds one of this reply's. Pure: no I/O, no clocks
//! (times are Unix µs on our clock, passed in).
//!
//! Invariants: a kept post's echo, if it has one, was created (platform clock) within
//! `[began_us - SKEW_US, latest_us + SKEW_US]`, and a shown post has one; every
//! evicted post's echo is at or before `forgotten_us`; a post known not to be shown
//! is not kept; only settled posts are evicted (posts in flight are bounded by the
//! workers).
//!
//! Posts of an earlier process are known from the state: each finished canvas
//! reply's posts are saved with its `done` record ([`Notified::finished`],
//! [`Notified::restore`]). A reply saved before a crash has no posts of its own
//! here: an echo counts as its own unless another known post accounts for it.

use std::collections::VecDeque;

use crate::state::CanvasPost;

/// How far the platform's clock may be behind or ahead of ours.
const SKEW_US: i64 = 2_000_000;
/// A post whose answer was lost may still be at work on the platform; its echo, if
/// any, is expected within this long after we gave up on it (the request timeout is
/// 30 s).
const LOST_LATE_US: i64 = 60_000_000;
/// Posts kept; older settled ones are forgotten (a window reaching them is doubtful).
const CAPACITY: usize = 4096;

/// One reply's posts are told apart from every other's by this id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplyId(u64);

/// One post, from [`Notified::begin`] until it is settled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PostId(u64);

#[derive(Debug)]
struct Post {
    id: u64,
    reply: ReplyId,
    /// A hash of the text: a collision only makes a match less likely.
    text: u64,
    began_us: i64,
    state: State,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    InFlight,
    /// It may have been shown; its echo, if any, is created by `latest_us`.
    Lost {
        latest_us: i64,
    },
    /// The platform answered 2xx by `at_us`: its echo is in.
    Shown {
        at_us: i64,
    },
}

impl Post {
    /// The latest its echo can have been created; `None` while in flight.
    fn latest_us(&self) -> Option<i64> {
        match self.state {
            State::InFlight => None,
            State::Lost { latest_us } => Some(latest_us),
            State::Shown { at_us } => Some(at_us),
        }
    }
}

/// The tracker.
#[derive(Debug, Default)]
pub struct Notified {
    posts: VecDeque<Post>,
    forgotten_us: Option<i64>,
    next: u64,
}

impl Notified {
    /// An empty tracker.
    pub fn new() -> Self {
        Self::default()
    }

    /// Known posts of an earlier process (oldest first), each a finished reply's;
    /// every older one had its echo by `forgotten_us`.
    pub fn restore(&mut self, posts: &[CanvasPost], forgotten_us: Option<i64>) {
        if let Some(f) = forgotten_us {
            let end = f.saturating_add(SKEW_US);
            self.forgotten_us = self.forgotten_us.max(Some(end));
        }
        for saved in posts {
            // One post per echo it can have made, as before the restart: merged into
            // one, a reply whose lost post was shown and then its retry too would
            // account for one echo of the two, and an identical reply saved before
            // the crash would take the other for its own (never shown, then).
            // (More than CAPACITY would only evict each other: a damaged count is cut.)
            let reply = self.reply();
            let count = saved
                .posts
                .clamp(1, u32::try_from(CAPACITY).unwrap_or(u32::MAX));
            for i in 0..count {
                let state = if saved.shown && i == 0 {
                    State::Shown {
                        at_us: saved.latest_us,
                    }
                } else {
                    State::Lost {
                        latest_us: saved.latest_us,
                    }
                };
                self.next += 1;
                self.keep(Post {
                    id: self.next,
                    reply,
                    text: saved.text,
                    began_us: saved.began_us,
                    state,
                });
            }
        }
    }

    /// `reply`'s posts merged into one, to be saved once it is finished (none in
    /// flight), with how many there were: `None` if none can have an echo.
    pub fn finished(&self, reply: ReplyId) -> Option<CanvasPost> {
        let mut merged: Option<CanvasPost> = None;
        for p in self.posts.iter().filter(|p| p.reply == reply) {
            let latest_us = p.latest_us().unwrap_or(i64::MAX);
            let shown = matches!(p.state, State::Shown { .. });
            let m = merged.get_or_insert(CanvasPost {
                text: p.text,
                began_us: p.began_us,
                latest_us,
                shown,
                posts: 0,
            });
            m.began_us = m.began_us.min(p.began_us);
            m.latest_us = m.latest_us.max(latest_us);
            m.shown |= shown;
            m.posts = m.posts.saturating_add(1);
        }
        merged
    }

    /// A fresh id for one reply's posts.
    pub fn reply(&mut self) -> ReplyId {
        self.next += 1;
        ReplyId(self.next)
    }

    /// A post of `text` for `reply` starts now.
    pub fn begin(&mut self, reply: ReplyId, text: &str, now_us: i64) -> PostId {
        self.next += 1;
        let id = self.next;
        self.keep(Post {
            id,
            reply,
            text: hash(text),
            began_us: now_us,
            state: State::InFlight,
        });
        PostId(id)
    }

    /// The platform answered 2xx: the echo is in.
    pub fn shown(&mut self, post: PostId, now_us: i64) {
        self.settle(post, Some(State::Shown { at_us: now_us }));
    }

    /// No answer, or a 5xx: it may have been shown, a little later even.
    pub fn lost(&mut self, post: PostId, now_us: i64) {
        let latest_us = now_us.saturating_add(LOST_LATE_US);
        self.settle(post, Some(State::Lost { latest_us }));
    }

    /// Refused (4xx): it has no echo.
    pub fn refused(&mut self, post: PostId) {
        self.settle(post, None);
    }

    /// Where to start reading the inbox for an echo of `reply` (posted from
    /// `began_us`): early enough that every echo our other posts of `text` can have
    /// made in the window is inside it, so each counts once for an echo that is
    /// really there. `None` when a forgotten post may have made one: no match then.
    pub fn window(&self, reply: ReplyId, text: &str, began_us: i64) -> Option<i64> {
        let text = hash(text);
        let mut from = began_us.saturating_sub(SKEW_US);
        loop {
            let earliest = self
                .others(reply, text, from)
                .map(|p| p.began_us.saturating_sub(SKEW_US))
                .min();
            match earliest {
                Some(e) if e < from => from = e,
                _ => break,
            }
        }
        match self.forgotten_us {
            Some(f) if f >= from => None,
            _ => Some(from),
        }
    }

    /// Whether `echoes` echoes of `text` created from `from_us` (a [`Self::window`])
    /// include one of `reply`'s: more than our other posts can have made. A reply
    /// with no posts here (one saved before a restart) takes the echo it matched, so
    /// an identical one cannot take it too. When every other post counted was shown
    /// and the echoes are no more than them, none is `reply`'s: its lost posts are
    /// not kept, so they do not count against identical replies later.
    pub fn matches(
        &mut self,
        reply: ReplyId,
        text: &str,
        from_us: i64,
        echoes: usize,
        now_us: i64,
    ) -> bool {
        let key = hash(text);
        let (mut shown, mut maybe) = (0, 0);
        for p in self.others(reply, key, from_us) {
            match p.state {
                State::Shown { .. } => shown += 1,
                _ => maybe += 1,
            }
        }
        if echoes <= shown + maybe {
            if maybe == 0 {
                self.posts.retain(|p| p.reply != reply || p.text != key);
            }
            return false;
        }
        if !self.posts.iter().any(|p| p.reply == reply && p.text == key) {
            self.next += 1;
            self.keep(Post {
                id: self.next,
                reply,
                text: key,
                // Its echo was created from `from_us` on.
                began_us: from_us.saturating_add(SKEW_US),
                state: State::Shown { at_us: now_us },
            });
        }
        true
    }

    /// The posts of `text` other than `reply`'s whose echo can be created at or after
    /// `from_us`.
    fn others(&self, reply: ReplyId, text: u64, from_us: i64) -> impl Iterator<Item = &Post> {
        self.posts.iter().filter(move |p| {
            p.reply != reply
                && p.text == text
                && p.latest_us()
                    .is_none_or(|l| l.saturating_add(SKEW_US) >= from_us)
        })
    }

    /// `None`: the post has no echo.
    fn settle(&mut self, post: PostId, state: Option<State>) {
        let Some(i) = self.posts.iter().position(|p| p.id == post.0) else {
            return;
        };
        match state {
            Some(state) => self.posts[i].state = state,
            None => {
                self.posts.remove(i);
            }
        }
    }

    fn keep(&mut self, post: Post) {
        if self.posts.len() >= CAPACITY
            && let Some(i) = self.posts.iter().position(|p| p.state != State::InFlight)
            && let Some(old) = self.posts.remove(i)
        {
            let end = old.latest_us().map(|l| l.saturating_add(SKEW_US));
            self.forgotten_us = self.forgotten_us.max(end);
        }
        self.posts.push_back(post);
    }
}

/// FNV-1a: saved in the state, so it must hash the same in every build.
fn hash(text: &str) -> u64 {
    text.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: i64 = 1_000_000;

    #[test]
    fn an_earlier_identical_reply_accounts_for_its_own_echo() {
        let mut n = Notified::new();
        let first = n.reply();
        let p = n.begin(first, "ok", 100 * S);
        n.shown(p, 100 * S);
        let second = n.reply();
        let p = n.begin(second, "ok", 101 * S);
        n.lost(p, 102 * S);
        let from = n.window(second, "ok", 101 * S).unwrap();
        // Wide enough for the first post's echo, whatever the clocks.
        assert!(from <= 100 * S - SKEW_US, "{from}");
        // Both echoes: the second's is there.
        assert!(n.matches(second, "ok", from, 2, 103 * S));
        // Only the first reply's echo: the second was not shown...
        assert!(!n.matches(second, "ok", from, 1, 103 * S));
        // ...so its lost post does not count against the next identical reply.
        let third = n.reply();
        let p = n.begin(third, "ok", 104 * S);
        n.lost(p, 104 * S);
        let from = n.window(third, "ok", 104 * S).unwrap();
        assert!(n.matches(third, "ok", from, 2, 105 * S));
        // Other texts and long-past posts do not count.
        let fourth = n.reply();
        assert!(n.matches(fourth, "other", 200 * S, 1, 201 * S));
        let from = n.window(fourth, "ok", 300 * S).unwrap();
        assert_eq!(from, 300 * S - SKEW_US);
        assert!(n.matches(fourth, "ok", from, 1, 301 * S));
    }

    #[test]
    fn posts_in_flight_and_lost_ones_count_refused_ones_do_not() {
        let mut n = Notified::new();
        let (a, b, c) = (n.reply(), n.reply(), n.reply());
        let _in_flight = n.begin(a, "ok", 10 * S);
        let lost = n.begin(b, "ok", 10 * S);
        n.lost(lost, 11 * S);
        let refused = n.begin(b, "ok", 12 * S);
        n.refused(refused);
        let mine = n.begin(c, "ok", 12 * S);
        n.lost(mine, 13 * S);
        let from = n.window(c, "ok", 12 * S).unwrap();
        assert!(!n.matches(c, "ok", from, 2, 14 * S));
        // Posts that may be shown prove nothing: `c`'s lost post is kept.
        let d = n.reply();
        let from = n.window(d, "ok", 20 * S).unwrap();
        assert!(!n.matches(d, "ok", from, 3, 21 * S));
        assert!(n.matches(c, "ok", from, 3, 21 * S));
        // A lost post may still be shown a while after we gave up on it.
        let late = n.window(d, "ok", 11 * S + LOST_LATE_US).unwrap();
        assert!(late <= 10 * S - SKEW_US, "{late}");
    }

    #[test]
    fn a_reply_saved_before_a_restart_takes_the_echo_it_matched() {
        let mut n = Notified::new();
        let (first, second) = (n.reply(), n.reply());
        let from = n.window(first, "ok", 50 * S).unwrap();
        assert!(n.matches(first, "ok", from, 1, 60 * S));
        let from = n.window(second, "ok", 50 * S).unwrap();
        assert!(!n.matches(second, "ok", from, 1, 60 * S));
        assert!(n.matches(second, "ok", from, 2, 60 * S));
    }

    #[test]
    fn a_finished_reply_saved_and_restored_accounts_for_its_echo() {
        let mut before = Notified::new();
        let first = before.reply();
        let lost = before.begin(first, "ok", 100 * S);
        before.lost(lost, 101 * S);
        let p = before.begin(first, "ok", 102 * S);
        before.shown(p, 103 * S);
        let saved = before.finished(first).unwrap();
        assert_eq!(saved.began_us, 100 * S);
        assert_eq!(saved.latest_us, 101 * S + LOST_LATE_US);
        assert!(saved.shown);
        assert_eq!(saved.posts, 2);
        assert_eq!(saved.text, hash("ok"));
        let unposted = before.reply();
        assert_eq!(before.finished(unposted), None);
        // After a restart, a reply saved at 104 s: the first reply's echo is not its.
        let mut after = Notified::new();
        after.restore(&[saved], Some(50 * S));
        let second = after.reply();
        let from = after.window(second, "ok", 104 * S).unwrap();
        assert!(from <= 100 * S - SKEW_US, "{from}");
        // Its lost post may have been shown as well as its retry: two echoes are
        // both its own, as they are for the process before; a third is the saved one's.
        let in_process = before.reply();
        let from_before = before.window(in_process, "ok", 104 * S).unwrap();
        assert!(!before.matches(in_process, "ok", from_before, 2, 105 * S));
        assert!(!after.matches(second, "ok", from, 1, 105 * S));
        assert!(!after.matches(second, "ok", from, 2, 105 * S));
        assert!(after.matches(second, "ok", from, 3, 105 * S));
        // A window reaching the time of a post dropped from the state matches nothing.
        assert_eq!(after.window(second, "x", 51 * S), None);
        assert!(after.window(second, "x", 60 * S).is_some());
    }

    #[test]
    fn the_text_hash_is_stable() {
        // Saved in state files: a change would make old posts count for nothing.
        assert_eq!(hash(""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(hash("a"), 0xaf63_dc4c_8601_ec8c);
    }

    #[test]
    fn a_window_reaching_a_forgotten_post_matches_nothing() {
        let mut n = Notified::new();
        for i in 0..CAPACITY as i64 + 1 {
            let r = n.reply();
            let p = n.begin(r, &format!("t{i}"), i * S);
            n.shown(p, i * S);
        }
        let r = n.reply();
        assert_eq!(n.window(r, "x", SKEW_US), None);
        assert_eq!(n.window(r, "x", 10 * S), Some(10 * S - SKEW_US));
        assert_eq!(n.posts.len(), CAPACITY);
    }
}
