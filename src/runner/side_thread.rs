//! What the broadcast thread and the delegation tracker share: each hands work of
//! its own to the backend beside the workers, so it takes a turn only while a
//! worker slot is free (`--concurrency` bounds every task the backend runs), and a
//! `--once` run still makes its one pass.

use std::sync::Arc;
use std::time::Duration;

use crate::api::Platform;
use crate::backend::{Backend, RunHandle};
use crate::shutdown::{Shutdown, StopReason};

use super::status::{RuntimeStatus, SharedStatus};

/// One such thread's share of the workspace.
pub struct SideThread {
    /// The platform client.
    pub client: Arc<dyn Platform>,
    /// The backend its work is handed to.
    pub backend: Arc<dyn Backend>,
    /// Heartbeat numbers (busy check, current task).
    pub status: SharedStatus,
    /// Stop flag.
    pub shutdown: Shutdown,
    /// Lets the drain cancel a running delivery.
    pub run: RunHandle,
    /// How often to look (`--broadcasts-secs`, `--delegations-secs`).
    pub every: Duration,
    /// `--concurrency`: the backend is busy when this many tasks run.
    pub concurrency: usize,
}

impl SideThread {
    /// Is every worker slot taken? Then this thread's work waits its turn.
    pub fn backend_busy(&self) -> bool {
        let (_, active, _) = RuntimeStatus::snapshot(&self.status);
        active as usize >= self.concurrency
    }

    /// Should the loop end before its next pass? `first`: no pass made yet, which a
    /// finished `--once` run still makes (it delivers what it finds).
    pub fn should_stop(&self, first: bool) -> bool {
        match self.shutdown.reason() {
            None => false,
            Some(StopReason::Finished) => !first,
            Some(_) => true,
        }
    }
}
