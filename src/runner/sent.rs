//! The `a2a_send` self-reports of our replies to peers (§API-2.6, for `molecule
//! history`), posted by one thread off the reply path: a reply no longer waits for
//! a second round trip before the next message starts. Reports go out in the order
//! the replies did, best effort as before (a failure is logged, not retried). At
//! most [`QUEUE`] wait: a worker that finds the queue full waits rather than drop
//! one. The thread ends when every worker has ended (they hold the senders), after
//! posting what is queued.

use std::sync::mpsc::{self, Receiver, SyncSender};

use serde_json::Value;

use crate::api::Platform;

/// Reports that may wait for the thread.
const QUEUE: usize = 16;

/// One report: the inbound row it answers (for the log) and the row to post.
pub struct Report {
    /// The inbound row the reply answered.
    pub row: String,
    /// The `a2a_send` row (see [`crate::inbox::send_report`]).
    pub body: Value,
}

/// The workers' end and the thread's end of the queue.
pub fn queue() -> (SyncSender<Report>, Receiver<Report>) {
    mpsc::sync_channel(QUEUE)
}

/// Posts a report now, on the calling thread.
pub fn post(client: &dyn Platform, report: &Report) {
    if let Err(e) = client.self_report(&report.body) {
        log::debug!("row {}: a2a_send self-report failed: {e}", report.row);
    }
}

/// The thread: posts each report in turn until every sender is gone.
pub fn run(client: &dyn Platform, reports: &Receiver<Report>) {
    for report in reports {
        post(client, &report);
    }
}
