//! `molecule card update` (§API-2.3: the stored card is replaced as sent, so the
//! current one is read first and only the given fields change) and `molecule
//! broadcast` (§API-2.20: off by default; 403 `broadcast_disabled` carries a hint).

use serde_json::{Value, json};

use super::{Budget, Ctx, Failure, LIST_LIMIT, Report, describe, refused, str_of};
use crate::api::{ApiError, Kind};
use crate::config::tools::{Broadcast, CardUpdate};

pub(super) fn update(ctx: &Ctx, a: &CardUpdate) -> Result<Report, Failure> {
    let budget = Budget::start(a.budget_secs);
    let ws = ctx.workspace_id();
    let current = ctx.call_within(&budget, true, |c| c.workspace_info(ws), describe)?;
    let mut card = match current.get("agent_card") {
        Some(Value::Object(m)) => Value::Object(m.clone()),
        _ => ctx.client.agent_card(),
    };
    if let Some(obj) = card.as_object_mut() {
        // A poll-mode card has no URL; the platform would check one (§API-2.3).
        obj.remove("url");
        if let Some(n) = &a.name {
            obj.insert("name".into(), Value::from(n.as_str()));
        }
        if let Some(d) = &a.description {
            obj.insert("description".into(), Value::from(d.as_str()));
        }
        if !a.skills.is_empty() {
            obj.insert("skills".into(), Value::Array(a.skills.clone()));
        }
    }
    let body = json!({"workspace_id": ws, "agent_card": card});
    ctx.call_within(
        &budget,
        true,
        |c| {
            c.call_json(
                "update card",
                "POST",
                "/registry/update-card",
                &[],
                Some(&body),
                LIST_LIMIT,
            )
        },
        |ctx, e| refused(ctx, e, "the platform refused the card"),
    )?;
    Ok(Report {
        json: json!({"ok": true, "status": "updated", "agent_card": card}),
        human: format!("card updated: {}\n", str_of(&card, "name").unwrap_or(ws)),
    })
}

pub(super) fn broadcast(ctx: &Ctx, b: &Broadcast) -> Result<Report, Failure> {
    let budget = Budget::start(b.budget_secs);
    let path = format!("/workspaces/{}/broadcast", ctx.workspace_id());
    let body = json!({"message": b.text});
    let describe_broadcast = |ctx: &Ctx, e: ApiError| match e.kind() {
        Kind::Forbidden if e.to_string().contains("broadcast_disabled") => refused(
            ctx,
            e,
            "this workspace does not have the broadcast ability (broadcast_disabled)",
        ),
        Kind::NotFound => refused(
            ctx,
            e,
            "workspace not found (or a platform older than 2026-05-14, without broadcasts)",
        ),
        _ => refused(ctx, e, "the platform refused the broadcast"),
    };
    let v = ctx.call_within(
        &budget,
        false,
        |c| c.call_json("broadcast", "POST", &path, &[], Some(&body), LIST_LIMIT),
        describe_broadcast,
    )?;
    let delivered = v.get("delivered").and_then(Value::as_u64).unwrap_or(0);
    Ok(Report {
        json: json!({"ok": true, "status": "sent", "delivered": delivered}),
        human: format!("sent to {delivered} workspace(s)\n"),
    })
}
