//! The `a2a_send` self-reports of our replies to peers (§API-2.6, for `molecule
//! history`), posted by one thread off the reply path: a reply no longer waits for
//! a second round trip before the next message starts. Reports go out in the order
//! the replies did, best effort as before (a failure is logged, not retried). At
//! most [`QUEUE`] wait: a worker that finds the queue full posts its report itself
//! rather than wait (only then may one go out ahead of queued ones). The thread ends
//! when every worker has ended (they hold the senders), after posting what is
//! queued; a stop gives it [`STOP_WAIT`] for that.

use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::time::Duration;

use crate::api::Platform;

/// Reports that may wait for the thread.
const QUEUE: usize = 16;
/// The thread's name, as its end is reported to the drain.
pub const THREAD: &str = "sent-reports";
/// How long a stop waits, once only this thread is left, for it to post what the
/// workers queued (at most [`QUEUE`] small posts): more than the request grace of the
/// other threads, which would lose the history of replies already sent.
pub const STOP_WAIT: Duration = Duration::from_secs(5);

/// One report: the inbound row it answers (for the log) and the row to post.
pub struct Report {
    /// The inbound row the reply answered.
    pub row: String,
    /// The `a2a_send` row's JSON (see [`crate::inbox::Envelope::report`]).
    pub body: Vec<u8>,
}

/// The workers' end and the thread's end of the queue.
pub fn queue() -> (SyncSender<Report>, Receiver<Report>) {
    mpsc::sync_channel(QUEUE)
}

/// Hands `report` to the thread; posts it on the calling thread instead when the queue
/// is full (a worker never waits for it) or the thread is gone (unit tests have none).
pub fn send(queue: &SyncSender<Report>, client: &dyn Platform, report: Report) {
    match queue.try_send(report) {
        Ok(()) => {}
        Err(TrySendError::Full(report) | TrySendError::Disconnected(report)) => {
            post(client, &report);
        }
    }
}

/// Posts a report now, on the calling thread.
fn post(client: &dyn Platform, report: &Report) {
    if let Err(e) = client.self_report_json(&report.body) {
        log::debug!("row {}: a2a_send self-report failed: {e}", report.row);
    }
}

/// The thread: posts each report in turn until every sender is gone.
pub fn run(client: &dyn Platform, reports: &Receiver<Report>) {
    for report in reports {
        post(client, &report);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runner::fake::Fake;
    use serde_json::json;

    fn report(i: usize) -> Report {
        Report {
            row: format!("row-{i}"),
            body: json!({ "n": i }).to_string().into_bytes(),
        }
    }

    #[test]
    fn a_worker_posts_its_report_itself_when_the_queue_is_full() {
        let fake = Fake::new(vec![]);
        let (tx, rx) = queue();
        let (done_tx, done_rx) = mpsc::channel();
        let worker = {
            let fake = fake.clone();
            std::thread::spawn(move || {
                // No thread drains the queue: the report after the 16th must not wait.
                for i in 0..=QUEUE {
                    send(&tx, fake.as_ref(), report(i));
                }
                done_tx.send(()).unwrap();
            })
        };
        done_rx
            .recv_timeout(Duration::from_secs(10))
            .expect("a worker blocked on the full queue");
        worker.join().unwrap();
        assert_eq!(fake.reports(), [json!({ "n": QUEUE })]);
        let queued: Vec<Vec<u8>> = rx.try_iter().map(|r| r.body).collect();
        let first: Vec<Vec<u8>> = (0..QUEUE).map(|i| report(i).body).collect();
        assert_eq!(queued, first, "the rest are still queued, in order");
    }
}
