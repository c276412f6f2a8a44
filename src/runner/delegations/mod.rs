//! The delegation tracker: finds the results of delegations this workspace sent
//! (`GET /workspaces/<own>/delegations`, §API-2.14) and delivers each terminal one
//! exactly once: one line in `<state-dir>/<id>.delegations.jsonl`, then one local
//! backend request (origin `delegation_result`). Nothing about a result is ever sent
//! to the platform; the backend's output is dropped (the agent may call `molecule
//! send`/`notify` itself).
//!
//! Runs on its own thread beside the heartbeat: once at start-up, then every
//! `--delegations-secs`, and at once when the poll thread sees a `delegate_result`
//! row (a [`Waker`]; the poll thread only does a non-blocking `try_send`).
//!
//! Exactly once, across restarts: `<id>.delegations.state.json` (0600, written
//! atomically) holds the delivered ids, a bounded LRU evicted oldest first (an id
//! the platform still lists is refreshed on every sighting), and the pending results
//! with how far each got. Before the JSONL line is appended the result is saved as
//! `log: "intent"`; a result found in that state (a crash between save and append,
//! or a failed append) has the file's tail checked before the line is written, so
//! the line is never written twice. A result counts as delivered only after the
//! backend returned, so a crash mid-run delivers it again rather than never.
//!
//! Skipped, never delivered: entries whose `source_id` is not our workspace (logged
//! once per id; a possible injection unless the delegation was sent *to* us), ids
//! that are not UUIDs, and non-terminal statuses (`pending`, `queued`, `dispatched`,
//! `in_progress`, `stuck`: `stuck` is a recoverable warning, §API-2.14). A result the
//! backend keeps failing on is given up after `MAX_FAILURES` runs (its line stays in
//! the JSONL file): one bad result must not be retried forever.

mod files;
mod thread;
mod tracker;

pub use files::open_error;
pub use thread::{Context, Waker, run, wake_channel};
pub use tracker::{Counters, Tracker};
