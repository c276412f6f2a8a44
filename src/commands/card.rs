//! `molecule card update` (§API-2.3: the stored card is replaced as sent, so the
//! current one is read first and only the given fields change) and `molecule
//! broadcast` (§API-2.20: off by default; 403 `broadcast_disabled` carries a hint).

use serde_json::{Value, json};

use super::{Budget, Ctx, Failure, LIST_LIMIT, Report, describe, message_text, refused, str_of};
use crate::api::{ApiError, Kind};
use crate::cli::{BroadcastArgs, CardArgs};

/// Longest name and description sent.
const MAX_FIELD: usize = 4096;

pub(super) fn update(ctx: &Ctx, a: &CardArgs) -> Result<Report, Failure> {
    let budget = Budget::new(a.budget_secs, "card")?;
    match a.action.as_deref() {
        Some("update") => {}
        Some(other) => {
            return Err(Failure::input(format!(
                "card: unknown action {other:?} (update)"
            )));
        }
        None => return Err(Failure::input("card: an action is required: update")),
    }
    if a.name.is_none() && a.description.is_none() && a.skills.is_empty() {
        return Err(Failure::input(
            "card update: nothing to change: give --name, --description or --skill",
        ));
    }
    for (flag, v) in [("--name", &a.name), ("--description", &a.description)] {
        if let Some(t) = v
            && (t.len() > MAX_FIELD || (flag == "--name" && t.trim().is_empty()))
        {
            return Err(Failure::input(format!(
                "card update: {flag}: 1 to {MAX_FIELD} bytes"
            )));
        }
    }
    let skills = a
        .skills
        .iter()
        .map(|s| skill(s))
        .collect::<Result<Vec<Value>, Failure>>()?;
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
        if !skills.is_empty() {
            obj.insert("skills".into(), Value::Array(skills));
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

/// `ID:NAME` (NAME defaults to ID) as an A2A skill.
fn skill(spec: &str) -> Result<Value, Failure> {
    let (id, name) = match spec.split_once(':') {
        Some((i, n)) => (i.trim(), n.trim()),
        None => (spec.trim(), spec.trim()),
    };
    if id.is_empty() || id.chars().any(char::is_whitespace) || name.is_empty() {
        return Err(Failure::input(format!(
            "card update: --skill {spec:?}: expected ID:NAME, the ID without spaces"
        )));
    }
    Ok(json!({"id": id, "name": name, "description": name, "tags": []}))
}

pub(super) fn broadcast(ctx: &Ctx, a: &BroadcastArgs) -> Result<Report, Failure> {
    let budget = Budget::new(a.budget_secs, "broadcast")?;
    let text = message_text(a.text.as_deref(), "broadcast")?;
    let path = format!("/workspaces/{}/broadcast", ctx.workspace_id());
    let body = json!({"message": text});
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn skill_specs() {
        assert_eq!(skill("sum:Add numbers").unwrap()["name"], "Add numbers");
        assert_eq!(skill("sum").unwrap()["name"], "sum");
        assert!(skill(":x").is_err());
        assert!(skill("a b:c").is_err());
    }
}
