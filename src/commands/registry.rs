//! `molecule peers`, `discover` and `info`: who this workspace may talk to, whether a
//! peer exists and may be reached, and a workspace's platform record. Empty or failed
//! answers are explained in words (401/403/404/5xx/unreachable, 410 removed).

use serde_json::{Value, json};

use super::{Ctx, Failure, Report, describe, removed_failure, str_of, table};
use crate::api::{ApiError, Kind};
use crate::cli::PeersArgs;
use crate::error::Error;
use crate::uuid::WorkspaceId;

pub(super) fn peers(ctx: &Ctx, a: &PeersArgs) -> Result<Report, Failure> {
    let query = a.query.as_deref().map(str::trim).filter(|q| !q.is_empty());
    let list = ctx.call(|c| c.peers(query), describe_peers)?;
    let human = if list.is_empty() {
        let ws = ctx.workspace_id();
        match query {
            Some(q) => format!(
                "no peers: no sibling, child or parent of {ws} has {q:?} in its name or role\n"
            ),
            None => format!(
                "no peers: workspace {ws} has no siblings, children or parent (an org root \
                 without children, or a lone workspace), so there is nobody it may talk to\n"
            ),
        }
    } else {
        let mut rows = vec![vec![
            "ID".to_string(),
            "STATUS".to_string(),
            "TASKS".to_string(),
            "NAME".to_string(),
            "ROLE".to_string(),
        ]];
        for p in &list {
            rows.push(vec![
                str_of(p, "id").unwrap_or("?").to_string(),
                str_of(p, "status").unwrap_or("").to_string(),
                p.get("active_tasks")
                    .and_then(Value::as_i64)
                    .map(|n| n.to_string())
                    .unwrap_or_default(),
                str_of(p, "name").unwrap_or("").to_string(),
                str_of(p, "role").unwrap_or("").to_string(),
            ]);
        }
        table(&rows)
    };
    Ok(Report {
        json: Value::Array(list),
        human,
    })
}

fn describe_peers(ctx: &Ctx, e: ApiError) -> Failure {
    let ws = ctx.workspace_id();
    match e.kind() {
        Kind::Forbidden => Failure::runtime(format!(
            "{e}: the platform refused to list the peers of {ws} with this token (a token of \
             another workspace or org?)"
        ))
        .with("http_status", 403),
        Kind::NotFound if !is_bare(&e) => Failure::new(Error::Removed(format!(
            "{e}: workspace {ws} is not registered with the platform at {}: check --workspace / \
             MOLECULE_WORKSPACE_ID, or run molecule connect once to register it",
            ctx.api_url()
        )))
        .with("http_status", 404),
        _ => describe(ctx, e),
    }
}

pub(super) fn discover(ctx: &Ctx, peer: &WorkspaceId) -> Result<Report, Failure> {
    let found = ctx.call(
        |c| c.discover(peer),
        |ctx, e| match e.kind() {
            Kind::Forbidden => Failure::runtime(format!(
                "{e}: not allowed to talk to {peer} (hierarchy rules: only siblings, parent and \
                 children, and ancestors may talk)"
            ))
            .with("http_status", 403),
            Kind::NotFound if !is_bare(&e) => {
                Failure::runtime(format!("{e}: no such workspace {peer}")).with("http_status", 404)
            }
            Kind::Unavailable | Kind::Busy => Failure::new(Error::Unreachable(format!(
                "{e}: {peer} exists but is not available right now (offline, paused or \
                 hibernated); a message to it may still be queued"
            )))
            .with("http_status", 503),
            _ => describe(ctx, e),
        },
    )?;
    let name = str_of(&found, "name").unwrap_or("");
    Ok(Report {
        human: format!("ok: {peer} ({name}) exists and this workspace may talk to it\n"),
        json: found,
    })
}

pub(super) fn info(ctx: &Ctx, id: Option<&WorkspaceId>) -> Result<Report, Failure> {
    let id = id.unwrap_or(ctx.workspace_id());
    let record = ctx.call(
        |c| c.workspace_info(id),
        |ctx, e| match e.kind() {
            Kind::Gone => removed_failure(id, e.hint()),
            Kind::NotFound if !is_bare(&e) => Failure::new(Error::Removed(format!(
                "{e}: no workspace {id} on the platform at {}",
                ctx.api_url()
            )))
            .with("http_status", 404),
            _ => describe(ctx, e),
        },
    )?;
    let mut rows = Vec::new();
    for key in [
        "id",
        "name",
        "role",
        "status",
        "tier",
        "parent_id",
        "runtime",
        "active_tasks",
        "last_heartbeat_at",
        "uptime_seconds",
        "last_error_rate",
        "last_sample_error",
        "talk_to_user_enabled",
        "wedged",
    ] {
        let shown = match record.get(key) {
            None => continue,
            Some(Value::Null) => "-".to_string(),
            Some(Value::String(s)) if s.is_empty() => "-".to_string(),
            Some(Value::String(s)) => s.clone(),
            Some(other) => other.to_string(),
        };
        rows.push(vec![format!("{key}:"), shown]);
    }
    let human = if rows.is_empty() {
        format!("{}\n", json!(record))
    } else {
        table(&rows)
    };
    Ok(Report {
        json: record,
        human,
    })
}

/// A 404 with an empty body comes from a tenant guard or a URL that is not the
/// platform, not from the handler: the generic diagnostic explains that.
fn is_bare(e: &ApiError) -> bool {
    matches!(e, ApiError::Status { message, .. } if message.is_empty())
}
