//! `molecule send`: one A2A `message/send` to a peer through the platform proxy, with
//! retries inside a total budget. The same `messageId` goes out on every attempt, so
//! the platform drops duplicates; a message the platform says was delivered (502
//! `delivery_confirmed`) or could not take (busy 503) is never re-sent.

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::{Ctx, Failure, Report, describe, line};
use crate::api::{ApiError, Kind, SendAnswer};
use crate::backoff::Backoff;
use crate::config::agent;
use crate::error::Error;
use crate::inbox::text_of_parts;

/// The retry schedule: 1, 2, 4, 8, 16, 16 … s, ±25 %.
const BACKOFF: Backoff = Backoff {
    base: Duration::from_secs(1),
    max: Duration::from_secs(16),
    jitter: 0.25,
};

pub(super) fn run(ctx: &Ctx, s: &agent::Send) -> Result<Report, Failure> {
    let (peer, message_id, budget_secs) = (&s.peer, &s.message_id, s.budget_secs);
    let budget = Duration::from_secs(budget_secs);
    let envelope = crate::inbox::Envelope::new(message_id, &s.text, &[], Default::default());
    let body = envelope.to_vec();
    let sent = Sent { peer, message_id };
    let started = Instant::now();
    let deadline = started.checked_add(budget).unwrap_or(started);
    let seed = crate::uuid::random_u64();
    let mut attempt: u32 = 0;
    loop {
        attempt = attempt.saturating_add(1);
        // Each attempt may use what is left of the budget, no more.
        let left = deadline.saturating_duration_since(Instant::now());
        let timeout = left.max(Duration::from_millis(100));
        let err = match ctx.client.send_a2a_within(peer, &body, timeout) {
            Ok(answer) => {
                // Our side of the conversation, for `molecule history` (best effort).
                if let Err(e) = ctx.client.self_report_json(&envelope.report(peer, &body)) {
                    log::debug!("a2a_send self-report failed: {e}");
                }
                return sent.answer(answer, attempt);
            }
            Err(e) if e.is_unauthorized() => {
                ctx.unauthorized(&e).map_err(|f| sent.tag(f, attempt))?;
                continue;
            }
            Err(e) => e,
        };
        if !err.kind().is_resendable() {
            return Err(sent.tag(sent.refused(ctx, err), attempt));
        }
        let delay = BACKOFF.delay(attempt, seed.wrapping_add(u64::from(attempt)));
        let delay = err.retry_after().map_or(delay, |r| delay.max(r));
        let resume = Instant::now().checked_add(delay);
        if resume.is_none_or(|t| t > deadline) {
            let f = Failure::new(Error::Unreachable(format!(
                "{err}; gave up after {attempt} attempt(s) in {:.1} s: the next try would pass --budget {budget_secs} s",
                started.elapsed().as_secs_f64()
            )));
            let f = match err.status() {
                Some(s) => f.with("http_status", s),
                None => f,
            };
            return Err(sent.tag(f, attempt));
        }
        log::warn!(
            "{err}; retrying in {:.1} s (attempt {attempt}, {:.0} s of the budget left)",
            delay.as_secs_f64(),
            deadline
                .saturating_duration_since(Instant::now())
                .as_secs_f64()
        );
        wait(delay);
    }
}

/// The pause between attempts. A one-shot command has nothing else to do meanwhile.
fn wait(d: Duration) {
    std::thread::sleep(d);
}

/// What was sent, for messages and the JSON document.
struct Sent<'a> {
    peer: &'a str,
    message_id: &'a str,
}

impl Sent<'_> {
    fn tag(&self, f: Failure, attempts: u32) -> Failure {
        f.with("peer_id", self.peer)
            .with("message_id", self.message_id)
            .with("attempts", attempts)
    }

    /// A status or error that ends the send at once, in words.
    fn refused(&self, ctx: &Ctx, e: ApiError) -> Failure {
        let peer = self.peer;
        let f = match e.kind() {
            Kind::Invalid => return Failure::input(format!("{e} (the message is too large)")),
            Kind::Unreadable | Kind::AnswerTooLarge => {
                return Failure::runtime(format!(
                    "{e}: the peer's answer could not be read; the message was delivered, so it is not re-sent"
                ));
            }
            Kind::Delivered => Failure::runtime(format!(
                "{e}: delivered to {peer}, but its answer was lost on the way back; not re-sent"
            ))
            .with("delivered", true),
            Kind::Busy => Failure::runtime(format!(
                "{e}: peer {peer} is busy and could not queue the message; not retried. Send again \
                 later with --message-id {} so the platform drops a duplicate",
                self.message_id
            )),
            Kind::Forbidden => Failure::runtime(format!(
                "{e}: not allowed to talk to this workspace (hierarchy rules: only siblings, \
                 parent and children, and ancestors may talk)"
            )),
            Kind::NotFound => Failure::runtime(format!("{e}: no such workspace {peer}")),
            Kind::Gone => {
                Failure::new(Error::Removed(format!("{e}: workspace {peer} was removed")))
            }
            Kind::RequestTooLarge => {
                Failure::input(format!("{e}: the message is too large for the platform"))
            }
            _ => return describe(ctx, e),
        };
        match e.status() {
            Some(status) => f.with("http_status", status),
            None => f,
        }
    }

    /// The platform's 2xx answer: the peer's reply text, `queued`, or its JSON-RPC error.
    fn answer(&self, answer: SendAnswer, attempts: u32) -> Result<Report, Failure> {
        let peer = self.peer;
        let base = json!({
            "ok": true,
            "peer_id": peer,
            "message_id": self.message_id,
            "attempts": attempts,
        });
        if answer.is_queued() {
            let mut json = base;
            json["status"] = Value::from("queued");
            if let Some(q) = answer.body.get("queue_id") {
                json["queue_id"] = q.clone();
            }
            return Ok(Report {
                json,
                human: format!(
                    "queued: the platform holds the message for {peer} (a poll-mode or busy peer); \
                     its answer will arrive as a new message to this workspace\n"
                ),
            });
        }
        let body = &answer.body;
        if body.is_null() {
            return Err(self.tag(
                Failure::runtime(format!(
                    "send: the platform accepted the message for {peer} (HTTP {}) but its answer \
                     was empty or unreadable; not re-sent",
                    answer.status
                ))
                .with("delivered", true)
                .with("http_status", answer.status),
                attempts,
            ));
        }
        if let Some(err) = body.get("error") {
            let detail = match err {
                Value::String(s) => s.clone(),
                other => {
                    let msg = other.get("message").and_then(Value::as_str).unwrap_or("");
                    match (msg.is_empty(), other.get("code")) {
                        (false, Some(c)) => format!("{msg} (code {c})"),
                        (false, None) => msg.to_string(),
                        (true, Some(c)) => format!("JSON-RPC error with no message (code {c})"),
                        (true, None) => "JSON-RPC error with no message".to_string(),
                    }
                }
            };
            return Err(self.tag(
                Failure::runtime(format!(
                    "send: the peer {peer} answered with an error: {detail}"
                ))
                .with("http_status", answer.status),
                attempts,
            ));
        }
        let Some(result) = body.get("result") else {
            return Err(self.tag(
                Failure::runtime(format!(
                    "send: unexpected answer from {peer} (no result, no error): {}",
                    super::clip(&body.to_string(), 200)
                )),
                attempts,
            ));
        };
        let reply = reply_text(result);
        let mut json = base;
        json["status"] = Value::from("replied");
        json["reply"] = reply.clone().map_or(Value::Null, Value::from);
        json["response"] = body.clone();
        let human = match &reply {
            Some(t) => line(t),
            None => {
                log::warn!("the peer {peer} answered without any text part");
                String::new()
            }
        };
        Ok(Report { json, human })
    }
}

/// The reply text of a push-mode peer, from the first place that has any (§API-2.7.5):
/// `result.parts`, `result.artifacts[].parts`, `result.status.message.parts`,
/// `result.message.parts`.
fn reply_text(result: &Value) -> Option<String> {
    let mut candidates: Vec<&Value> = Vec::new();
    if let Some(p) = result.get("parts") {
        candidates.push(p);
    }
    for artifact in result
        .get("artifacts")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        if let Some(p) = artifact.get("parts") {
            candidates.push(p);
        }
    }
    candidates.extend(result.pointer("/status/message/parts"));
    candidates.extend(result.pointer("/message/parts"));
    candidates
        .into_iter()
        .map(text_of_parts)
        .find(|t| !t.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn is_retryable(e: &ApiError) -> bool {
        e.kind().is_resendable()
    }

    fn status(status: u16, delivery_confirmed: bool, busy: bool) -> ApiError {
        ApiError::Status {
            op: "send",
            status,
            message: String::new(),
            hint: None,
            retry_after: None,
            delivery_confirmed,
            busy,
            code: None,
        }
    }

    #[test]
    fn retry_classification() {
        for s in [429, 500, 502, 503, 504] {
            assert!(is_retryable(&status(s, false, false)), "{s}");
        }
        assert!(!is_retryable(&status(502, true, false)), "delivered");
        assert!(!is_retryable(&status(503, false, true)), "busy");
        for s in [400, 401, 403, 404, 410, 413] {
            assert!(!is_retryable(&status(s, false, false)), "{s}");
        }
        assert!(is_retryable(&ApiError::Timeout { op: "send" }));
        assert!(!is_retryable(&ApiError::BadBody {
            op: "send",
            detail: String::new()
        }));
    }

    #[test]
    fn schedule_grows_to_the_cap() {
        let mins: Vec<f64> = (1..=6)
            .map(|a| {
                (0..200u64)
                    .map(|s| BACKOFF.delay(a, s).as_secs_f64())
                    .fold(f64::MAX, f64::min)
            })
            .collect();
        assert!(mins[0] >= 0.75 && mins[1] >= 1.5 && mins[2] >= 3.0 && mins[3] >= 6.0);
        for a in 1..=8 {
            for s in 0..200u64 {
                assert!(BACKOFF.delay(a, s) <= Duration::from_secs(16));
            }
        }
    }

    #[test]
    fn reply_text_from_each_shape() {
        let shapes = [
            json!({"parts": [{"kind": "text", "text": "a"}]}),
            json!({"artifacts": [{"parts": []}, {"parts": [{"type": "text", "text": "a"}]}]}),
            json!({"status": {"message": {"parts": [{"kind": "text", "text": "a"}]}}}),
            json!({"message": {"parts": [{"type": "text", "text": "a"}]}}),
        ];
        for s in shapes {
            assert_eq!(reply_text(&s).as_deref(), Some("a"), "{s}");
        }
        assert_eq!(
            reply_text(&json!({"parts": [{"kind": "text", "text": "first"}],
                               "message": {"parts": [{"kind": "text", "text": "second"}]}}))
            .as_deref(),
            Some("first")
        );
        assert_eq!(reply_text(&json!({"kind": "task", "id": "t"})), None);
        assert_eq!(reply_text(&json!("plain")), None);
    }
}
