//! `molecule delegate` (optionally `--wait` for the result) and `molecule
//! delegations`. The platform runs the delegation; we start it, then read
//! `GET /delegations` (newest first, several entries per delegation) until the newest
//! entry in a terminal status (`completed`/`failed`; `stuck` is still in flight).

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::{Ctx, Failure, Report, clip, describe, line, str_of, table};
use crate::api::{ApiError, Kind};
use crate::cli::DelegationsArgs;
use crate::config::agent;
use crate::error::Error;

/// Pause between polls while waiting: 1 s at first, then 2 s.
const FAST_POLLS: u32 = 10;

pub(super) fn delegate(ctx: &Ctx, d: &agent::Delegate) -> Result<Report, Failure> {
    let (target, timeout_secs) = (&d.target, d.timeout_secs);
    let key = d.key.as_deref();
    let started = ctx.call(|c| c.delegate(target, &d.task, key), describe_delegate)?;
    if started.delegation_id.is_empty() {
        return Err(Failure::runtime(
            "delegate: the platform answered without a delegation_id",
        ));
    }
    if let Some(w) = &started.warning {
        log::warn!("delegate: the platform says: {w}");
    }
    let did = started.delegation_id.clone();
    let status = started.status.clone().unwrap_or_default();
    if !d.wait {
        let mut human = line(&did);
        if started.idempotent_hit {
            human.push_str(&format!(
                "idempotent_hit: the key matched an earlier delegation (status {status})\n"
            ));
        }
        return Ok(Report {
            json: json!({
                "ok": true,
                "delegation_id": did,
                "status": status,
                "target_id": started.target_id.as_deref().unwrap_or(target),
                "idempotent_hit": started.idempotent_hit,
            }),
            human,
        });
    }
    log::info!(
        "delegation {did} to {target} {}; waiting up to {timeout_secs} s for the result",
        if started.idempotent_hit {
            "replayed (idempotent_hit)"
        } else {
            "started"
        }
    );
    wait_for(
        ctx,
        &did,
        started.idempotent_hit,
        Duration::from_secs(timeout_secs),
    )
}

fn describe_delegate(ctx: &Ctx, e: ApiError) -> Failure {
    let ws = ctx.workspace_id();
    match (&e, e.kind()) {
        (ApiError::Status { message, .. }, Kind::Forbidden)
            if message.contains("tool call failed") =>
        {
            Failure::runtime(format!(
                "{e}: this workspace is not allowed to delegate (its can_delegate ability is off)"
            ))
            .with("http_status", 403)
        }
        (ApiError::Status { message, .. }, Kind::NotFound) if !message.is_empty() => {
            Failure::new(Error::Removed(format!(
                "{e}: workspace {ws} is unknown to the platform at {}",
                ctx.api_url()
            )))
            .with("http_status", 404)
        }
        _ => describe(ctx, e),
    }
}

/// Polls the delegation list until `did` is terminal or `timeout` has passed.
fn wait_for(ctx: &Ctx, did: &str, replayed: bool, timeout: Duration) -> Result<Report, Failure> {
    let started = Instant::now();
    let deadline = started.checked_add(timeout).unwrap_or(started);
    let mut polls: u32 = 0;
    let mut last_status = String::from("unknown");
    let mut last_error: Option<ApiError> = None;
    loop {
        polls = polls.saturating_add(1);
        match ctx.client.delegations(None) {
            Ok(list) => {
                last_error = None;
                match pick(&list, did) {
                    Pick::Terminal(entry) => return finished(did, replayed, entry),
                    Pick::InFlight(status) => last_status = status,
                    Pick::Missing => {
                        if polls == 1 {
                            log::info!("delegation {did} is not listed yet");
                        }
                    }
                }
            }
            Err(e) if e.is_unauthorized() => {
                ctx.unauthorized(&e)
                    .map_err(|f| f.with("delegation_id", did))?;
                continue;
            }
            Err(e) if e.is_retryable() => {
                if last_error.is_none() {
                    log::warn!("{e}; still waiting for delegation {did}");
                }
                last_error = Some(e);
            }
            Err(e) => return Err(describe(ctx, e).with("delegation_id", did)),
        }
        let pause = if polls < FAST_POLLS {
            Duration::from_secs(1)
        } else {
            Duration::from_secs(2)
        };
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            let why = match &last_error {
                Some(e) => format!(" (last poll: {e})"),
                None => String::new(),
            };
            return Err(Failure::new(Error::Unreachable(format!(
                "delegate: delegation {did} is still {last_status} after {} s (--timeout){why}; \
                 it may still finish: check with molecule delegations",
                timeout.as_secs()
            )))
            .with("delegation_id", did)
            .with("status", last_status));
        }
        std::thread::sleep(pause.min(left));
    }
}

/// Where a delegation stands in one page of the list.
#[derive(Debug, PartialEq)]
enum Pick<'a> {
    /// The newest entry in a terminal status.
    Terminal(&'a Value),
    /// Listed, not finished: the newest entry's status.
    InFlight(String),
    /// Not in the (newest 50) list.
    Missing,
}

/// Entries come newest first, and several can share one `delegation_id` (dispatch row
/// plus result rows): the first terminal one is the newest terminal one (§API-2.14).
fn pick<'a>(list: &'a [Value], did: &str) -> Pick<'a> {
    let mine: Vec<&Value> = list
        .iter()
        .filter(|e| str_of(e, "delegation_id") == Some(did))
        .collect();
    if let Some(t) = mine
        .iter()
        .find(|e| matches!(str_of(e, "status"), Some("completed" | "failed")))
    {
        return Pick::Terminal(t);
    }
    match mine.first() {
        Some(e) => Pick::InFlight(str_of(e, "status").unwrap_or("unknown").to_string()),
        None => Pick::Missing,
    }
}

fn finished(did: &str, replayed: bool, entry: &Value) -> Result<Report, Failure> {
    let status = str_of(entry, "status").unwrap_or("");
    if status == "failed" {
        let error = str_of(entry, "error")
            .filter(|e| !e.is_empty())
            .unwrap_or("no error text from the platform");
        return Err(
            Failure::runtime(format!("delegate: delegation {did} failed: {error}"))
                .with("delegation_id", did)
                .with("status", "failed")
                .with("delegation", entry.clone()),
        );
    }
    let result = str_of(entry, "response_preview").map(str::to_string);
    let human = match &result {
        Some(r) => line(r),
        None => {
            log::warn!("delegation {did} completed without a result preview");
            String::new()
        }
    };
    Ok(Report {
        json: json!({
            "ok": true,
            "delegation_id": did,
            "status": "completed",
            "idempotent_hit": replayed,
            "result": result,
            "delegation": entry,
        }),
        human,
    })
}

pub(super) fn delegations(ctx: &Ctx, a: &DelegationsArgs) -> Result<Report, Failure> {
    let status = a.status.as_deref().map(str::trim).filter(|s| !s.is_empty());
    let list = ctx.call(|c| c.delegations(status), describe_delegate)?;
    // An older platform may ignore ?status=: filter here as well.
    let list: Vec<Value> = list
        .into_iter()
        .filter(|e| status.is_none_or(|s| str_of(e, "status") == Some(s)))
        .collect();
    let human = if list.is_empty() {
        match status {
            Some(s) => format!("no delegations with status {s}\n"),
            None => "no delegations (none sent or received among the newest 50)\n".to_string(),
        }
    } else {
        let mut rows = vec![vec![
            "DELEGATION".to_string(),
            "STATUS".to_string(),
            "DIR".to_string(),
            "PEER".to_string(),
            "UPDATED".to_string(),
            "SUMMARY".to_string(),
        ]];
        for e in &list {
            let dir = str_of(e, "direction").unwrap_or("");
            let peer = if dir == "received" {
                str_of(e, "source_id")
            } else {
                str_of(e, "target_id")
            }
            .unwrap_or("");
            rows.push(vec![
                str_of(e, "delegation_id")
                    .or_else(|| str_of(e, "id"))
                    .unwrap_or("?")
                    .to_string(),
                str_of(e, "status").unwrap_or("").to_string(),
                dir.to_string(),
                peer.get(..8).unwrap_or(peer).to_string(),
                str_of(e, "updated_at")
                    .or_else(|| str_of(e, "created_at"))
                    .unwrap_or("")
                    .to_string(),
                clip(str_of(e, "summary").unwrap_or(""), 50),
            ]);
        }
        table(&rows)
    };
    Ok(Report {
        json: Value::Array(list),
        human,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newest_terminal_entry_wins() {
        let list = vec![
            json!({"delegation_id": "x", "status": "completed"}),
            json!({"delegation_id": "d", "status": "stuck"}),
            json!({"delegation_id": "d", "status": "completed", "response_preview": "new"}),
            json!({"delegation_id": "d", "status": "failed"}),
        ];
        assert_eq!(pick(&list, "d"), Pick::Terminal(&list[2]));
        let in_flight = vec![
            json!({"delegation_id": "d", "status": "stuck"}),
            json!({"delegation_id": "d", "status": "dispatched"}),
        ];
        assert_eq!(pick(&in_flight, "d"), Pick::InFlight("stuck".into()));
        assert_eq!(pick(&in_flight, "zz"), Pick::Missing);
        assert_eq!(
            pick(&[json!("junk"), json!({"status": 1})], "d"),
            Pick::Missing
        );
    }

    #[test]
    fn failed_and_completed_outcomes() {
        let f = finished("d", false, &json!({"status": "failed", "error": "boom"})).unwrap_err();
        assert_eq!(f.error.exit_code(), 1);
        assert!(f.error.to_string().contains("boom"));
        let ok = finished(
            "d",
            true,
            &json!({"status": "completed", "response_preview": "42"}),
        )
        .unwrap();
        assert_eq!(ok.human, "42\n");
        assert_eq!(ok.json["result"], "42");
        assert_eq!(ok.json["idempotent_hit"], true);
    }
}
