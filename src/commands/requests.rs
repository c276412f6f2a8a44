//! Requests and approvals (§API-2.19): `molecule ask` (raise one, optionally wait
//! for the answer), `molecule requests` (lists) and `molecule request
//! show|respond|message|cancel` for either side. Waiting listens on the workspace's
//! event stream for `REQUEST_RESPONDED` (a hint: the request's status stays the
//! truth, read again then and every 30 s); without a stream it reads the status
//! with a growing pause (2 s to 30 s). Never a tight poll.

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::{Budget, Ctx, Failure, LIST_LIMIT, Report, clip, refused, str_of, table};
use crate::api::{ApiError, Kind};
use crate::backoff::Backoff;
use crate::config::tools::{Ask, Recipient, Request, RequestAction, Requests};
use crate::error::Error;

/// Pause between status reads while waiting: 2 s, doubling to 30 s.
const WAIT_BACKOFF: Backoff = Backoff {
    base: Duration::from_secs(2),
    max: Duration::from_secs(30),
    jitter: 0.1,
};

/// Statuses after which a request never changes.
fn is_terminal(status: &str) -> bool {
    matches!(status, "done" | "approved" | "rejected" | "cancelled")
}

fn describe_request(ctx: &Ctx, e: ApiError) -> Failure {
    let what = match e.kind() {
        Kind::NotFound if is_already_resolved(&e) => {
            "no such open request (unknown, or already answered or cancelled)"
        }
        Kind::NotFound => {
            "no such request (or this platform has no requests inbox: older than 2026-06-10)"
        }
        Kind::Forbidden => "this workspace may not do that to the request",
        _ => "the platform refused the request",
    };
    refused(ctx, e, what)
}

pub(super) fn ask(ctx: &Ctx, a: &Ask) -> Result<Report, Failure> {
    let budget = Budget::start(a.budget_secs);
    let body = json!({
        "kind": a.kind,
        "recipient_type": a.to.kind(),
        "recipient_id": a.to.id(),
        "title": a.title,
        "detail": a.detail,
    });
    let path = format!("/workspaces/{}/requests", ctx.workspace_id());
    let v = ctx.call_within(
        &budget,
        false,
        |c| c.call_json("ask", "POST", &path, &[], Some(&body), LIST_LIMIT),
        describe_request,
    )?;
    let Some(rid) = str_of(&v, "request_id")
        .filter(|r| crate::uuid::is_uuid(r))
        .map(str::to_string)
    else {
        return Err(Failure::runtime(format!(
            "ask: the platform accepted the request but returned no request id: {}",
            clip(&v.to_string(), 200)
        )));
    };
    if !a.wait {
        return Ok(Report {
            json: json!({"ok": true, "request_id": rid, "status": "pending", "kind": a.kind}),
            human: format!("{rid}\n"),
        });
    }
    log::info!(
        "request {rid} raised ({} for {}); waiting up to {} s for the answer",
        a.kind,
        match &a.to {
            Recipient::User => "the user",
            Recipient::Agent(id) => id.as_str(),
        },
        a.timeout_secs
    );
    wait_for(ctx, &rid, Duration::from_secs(a.timeout_secs))
}

/// Read of the request status while the event stream is up (events can be dropped).
const SAFETY_READ: Duration = Duration::from_secs(30);

/// Where the wait's wake-ups come from.
enum Hints {
    /// The workspace's event stream (opened before the first read, so an answer in
    /// between is not missed).
    Stream(crate::events::EventStream),
    /// No stream (older platform, or it ended): the growing pause.
    Pause,
}

impl Hints {
    fn open(ctx: &Ctx) -> Hints {
        let shutdown = crate::shutdown::Shutdown::new();
        match crate::events::EventStream::open(&ctx.client, &shutdown) {
            Ok(s) => Hints::Stream(s),
            Err(e) => {
                log::debug!("no event stream ({e}); reading the request's status instead");
                Hints::Pause
            }
        }
    }

    /// Waits until `REQUEST_RESPONDED` for `rid`, `pause` (no stream) or the safety
    /// read is due, never past `until`.
    fn wait(&mut self, rid: &str, pause: Duration, until: Instant) {
        if let Hints::Stream(stream) = self {
            let due = Instant::now()
                .checked_add(SAFETY_READ)
                .unwrap_or(until)
                .min(until);
            let mut s = std::mem::replace(stream, placeholder()).with_deadline(due);
            loop {
                match s.next_event() {
                    Ok(ev)
                        if ev.kind == "REQUEST_RESPONDED"
                            && ev.data.get("request_id").and_then(Value::as_str) == Some(rid) =>
                    {
                        *stream = s;
                        return;
                    }
                    Ok(_) => {}
                    Err(crate::events::End::Deadline) => {
                        *stream = s;
                        return;
                    }
                    Err(end) => {
                        log::info!("{end}; reading the request's status instead");
                        *self = Hints::Pause;
                        return;
                    }
                }
            }
        }
        let left = until.saturating_duration_since(Instant::now());
        std::thread::sleep(pause.min(left));
    }
}

/// An empty stream to hold the place of the real one while it is borrowed out.
fn placeholder() -> crate::events::EventStream {
    crate::events::EventStream::from_reader(
        Box::new(std::io::empty()),
        &crate::shutdown::Shutdown::new(),
    )
}

/// Reads the request until it is answered or `timeout` has passed.
fn wait_for(ctx: &Ctx, rid: &str, timeout: Duration) -> Result<Report, Failure> {
    let started = Instant::now();
    let deadline = started.checked_add(timeout).unwrap_or(started);
    let mut hints = Hints::open(ctx);
    let seed = crate::uuid::random_u64();
    let mut reads: u32 = 0;
    let mut last: Option<Value> = None;
    let mut last_error: Option<ApiError> = None;
    loop {
        reads = reads.saturating_add(1);
        match ctx.client.call_json(
            "request show",
            "GET",
            &request_path(ctx, rid),
            &[],
            None,
            LIST_LIMIT,
        ) {
            Ok(v) => {
                last_error = None;
                let status = v.pointer("/request/status").and_then(Value::as_str);
                if status.is_some_and(is_terminal) {
                    return answered(rid, &v);
                }
                last = Some(v);
            }
            Err(e) if e.is_unauthorized() => {
                ctx.unauthorized(&e)
                    .map_err(|f| f.with("request_id", rid))?;
                continue;
            }
            Err(e) if e.is_retryable() => {
                if last_error.is_none() {
                    log::warn!("{e}; still waiting for request {rid}");
                }
                last_error = Some(e);
            }
            Err(e) => return Err(describe_request(ctx, e).with("request_id", rid)),
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            let status = last
                .as_ref()
                .and_then(|v| v.pointer("/request/status"))
                .and_then(Value::as_str)
                .unwrap_or("unknown")
                .to_string();
            let why = last_error
                .map(|e| format!(" (last read: {e})"))
                .unwrap_or_default();
            let mut f = Failure::new(Error::Unreachable(format!(
                "ask: request {rid} is still {status} after {} s (--timeout){why}; it stays open: \
                 check it with molecule request show {rid}",
                timeout.as_secs()
            )))
            .with("request_id", rid)
            .with("status", status)
            .with("timed_out", true);
            if let Some(v) = last {
                f = f.with("request", v.get("request").cloned().unwrap_or(Value::Null));
            }
            return Err(f);
        }
        let pause = WAIT_BACKOFF.delay(reads, seed.wrapping_add(u64::from(reads)));
        hints.wait(rid, pause, deadline);
    }
}

/// The answered request: exit 0 approved/done, 1 rejected/cancelled; the thread is
/// printed either way.
fn answered(rid: &str, v: &Value) -> Result<Report, Failure> {
    let request = v.get("request").cloned().unwrap_or(Value::Null);
    let messages = v.get("messages").cloned().unwrap_or(json!([]));
    let status = str_of(&request, "status").unwrap_or("").to_string();
    let human = thread_text(&request, &messages);
    if matches!(status.as_str(), "approved" | "done") {
        return Ok(Report {
            json: json!({"ok": true, "request_id": rid, "status": status,
                         "request": request, "messages": messages}),
            human,
        });
    }
    let mut f = Failure::runtime(format!("ask: request {rid} was {status}"))
        .with("request_id", rid)
        .with("status", status)
        .with("request", request)
        .with("messages", messages);
    f.human = Some(human);
    Err(f)
}

/// 404 "request not found or already resolved" (§API-2.19).
fn is_already_resolved(e: &ApiError) -> bool {
    e.kind() == Kind::NotFound && e.to_string().contains("already resolved")
}

/// The answer our earlier attempt would have had, when the request now shows
/// `status` (that attempt was applied and only its answer was lost).
fn applied_before(c: &crate::api::Client, path: &str, status: &str) -> Option<Value> {
    let v = c
        .call_json("request show", "GET", path, &[], None, LIST_LIMIT)
        .ok()?;
    let now = v.pointer("/request/status").and_then(Value::as_str)?;
    (now == status).then(|| json!({"request_id": v.pointer("/request/id"), "status": now}))
}

fn request_path(ctx: &Ctx, rid: &str) -> String {
    format!("/workspaces/{}/requests/{rid}", ctx.workspace_id())
}

/// A request and its thread, for people.
fn thread_text(request: &Value, messages: &Value) -> String {
    let f = |k: &str| str_of(request, k).unwrap_or("").to_string();
    let mut out = format!(
        "{} {} {:?}: {}",
        f("kind"),
        f("id"),
        clip(&f("title"), 100),
        f("status")
    );
    let responder = f("responder_type");
    if !responder.is_empty() {
        out.push_str(&format!(" by {responder}"));
        let rid = f("responder_id");
        if !rid.is_empty() {
            out.push_str(&format!(" {rid}"));
        }
    }
    out.push('\n');
    if !f("detail").is_empty() {
        out.push_str(&format!("  {}\n", clip(&f("detail"), 200)));
    }
    for m in messages.as_array().into_iter().flatten() {
        let g = |k: &str| str_of(m, k).unwrap_or("").to_string();
        let who = match g("author_id").as_str() {
            "" => g("author_type"),
            id => format!("{} {id}", g("author_type")),
        };
        out.push_str(&format!("{} {who}: {}\n", g("created_at"), g("body")));
    }
    out
}

pub(super) fn list(ctx: &Ctx, a: &Requests) -> Result<Report, Failure> {
    let budget = Budget::start(a.budget_secs);
    let path = if a.inbox {
        format!("/workspaces/{}/requests/inbox", ctx.workspace_id())
    } else {
        format!("/workspaces/{}/requests", ctx.workspace_id())
    };
    let q: Vec<(&str, &str)> = a.status.iter().map(|s| ("status", *s)).collect();
    let v = ctx.call_within(
        &budget,
        true,
        |c| c.call_json("requests", "GET", &path, &q, None, LIST_LIMIT),
        describe_request,
    )?;
    let items = v.as_array().cloned().unwrap_or_default();
    let mut rows = vec![vec![
        "ID".to_string(),
        "KIND".into(),
        "STATUS".into(),
        if a.inbox { "FROM" } else { "TO" }.into(),
        "CREATED".into(),
        "TITLE".into(),
    ]];
    for r in &items {
        let f = |k: &str| str_of(r, k).unwrap_or("").to_string();
        let party = if a.inbox {
            format!("{} {}", f("requester_type"), f("requester_id"))
        } else {
            format!("{} {}", f("recipient_type"), f("recipient_id"))
        };
        rows.push(vec![
            f("id"),
            f("kind"),
            f("status"),
            party.trim().to_string(),
            f("created_at"),
            clip(&f("title"), 60),
        ]);
    }
    let human = if items.is_empty() {
        "no requests\n".to_string()
    } else {
        table(&rows)
    };
    Ok(Report {
        json: json!({"ok": true, "count": items.len(), "requests": items}),
        human,
    })
}

pub(super) fn one(ctx: &Ctx, r: &Request) -> Result<Report, Failure> {
    let budget = Budget::start(r.budget_secs);
    let rid = &r.id;
    let base = request_path(ctx, rid);
    let (method, path, body, idempotent) = match &r.action {
        RequestAction::Show => ("GET", base, None, true),
        // Answering twice fails (already resolved): safe to retry.
        RequestAction::Respond(answer) => (
            "POST",
            format!("{base}/respond"),
            Some(json!({"action": answer})),
            true,
        ),
        RequestAction::Message(text) => {
            // The workspace route overrides the author but still requires the field.
            let body = json!({"body": text, "author_type": "agent",
                              "author_id": ctx.workspace_id()});
            ("POST", format!("{base}/messages"), Some(body), false)
        }
        RequestAction::Cancel => ("POST", format!("{base}/cancel"), None, true),
    };
    let op = r.action.op();
    // What a respond or cancel leaves behind: after a lost answer the retry finds the
    // request "already resolved", by our own first attempt if it shows that outcome.
    let outcome = match &r.action {
        RequestAction::Respond(answer) => Some(*answer),
        RequestAction::Cancel => Some("cancelled"),
        RequestAction::Show | RequestAction::Message(_) => None,
    };
    let mut tries: u32 = 0;
    let v = ctx
        .call_within(
            &budget,
            idempotent,
            |c| {
                tries += 1;
                match c.call_json(op, method, &path, &[], body.as_ref(), LIST_LIMIT) {
                    Err(e) if tries > 1 && is_already_resolved(&e) => {
                        match outcome.and_then(|o| applied_before(c, &request_path(ctx, rid), o)) {
                            Some(v) => Ok(v),
                            None => Err(e),
                        }
                    }
                    other => other,
                }
            },
            describe_request,
        )
        .map_err(|f| f.with("request_id", rid.as_str()))?;
    let human = match &r.action {
        RequestAction::Show => thread_text(
            v.get("request").unwrap_or(&Value::Null),
            v.get("messages").unwrap_or(&Value::Null),
        ),
        RequestAction::Message(_) => format!(
            "message {} added to request {rid}\n",
            str_of(&v, "message_id").unwrap_or("")
        ),
        _ => format!(
            "request {rid}: {}\n",
            str_of(&v, "status").unwrap_or("done")
        ),
    };
    let mut json = json!({"ok": true, "request_id": rid});
    if let (Value::Object(m), Value::Object(extra)) = (&mut json, v) {
        for (k, val) in extra {
            m.entry(k).or_insert(val);
        }
    }
    Ok(Report { json, human })
}
