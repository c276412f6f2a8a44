//! `molecule memory commit|search|namespaces|delete` (§API-2.18). Search is the v2
//! route: the v1 `GET /memories` ignores its query. 503 means the platform has no
//! memory plugin; GLOBAL is for root workspaces only; only LOCAL memories can be
//! deleted.

use serde_json::{Value, json};

use super::{Budget, Ctx, Failure, LIST_LIMIT, Report, clip, describe, refused, str_of, table};
use crate::api::{ApiError, Kind};
use crate::config::tools::{Memory, MemoryAction};

pub(super) fn run(ctx: &Ctx, m: &Memory) -> Result<Report, Failure> {
    let budget = Budget::start(m.budget_secs);
    match &m.action {
        MemoryAction::Commit {
            text,
            scope,
            namespace,
        } => commit(ctx, text, scope, namespace.as_deref(), &budget),
        MemoryAction::Search {
            query,
            namespace,
            kind,
            limit,
        } => search(
            ctx,
            [
                ("q", query.clone()),
                ("namespace", namespace.clone()),
                ("kind", kind.map(str::to_string)),
                ("limit", limit.map(|n| n.to_string())),
            ],
            &budget,
        ),
        MemoryAction::Namespaces => namespaces(ctx, &budget),
        MemoryAction::Delete { id } => delete(ctx, id, &budget),
    }
}

/// The plugin-less 503 and the GLOBAL 403 in words; the rest as usual.
fn describe_memory(ctx: &Ctx, e: ApiError) -> Failure {
    match e.kind() {
        Kind::Unavailable if e.to_string().contains("memory plugin") => Failure::runtime(format!(
            "{e}: this platform has no memory plugin, so memories are not available"
        ))
        .with("http_status", 503),
        Kind::Forbidden => refused(ctx, e, "refused"),
        Kind::NotFound => refused(
            ctx,
            e,
            "no such LOCAL memory (TEAM and GLOBAL memories cannot be deleted)",
        ),
        Kind::BadRequest => refused(ctx, e, "the platform refused the request"),
        _ => describe(ctx, e),
    }
}

fn commit(
    ctx: &Ctx,
    text: &str,
    scope: &str,
    namespace: Option<&str>,
    budget: &Budget,
) -> Result<Report, Failure> {
    let mut body = json!({"content": text, "scope": scope});
    if let Some(label) = namespace {
        body["namespace"] = Value::from(label);
    }
    let path = format!("/workspaces/{}/memories", ctx.workspace_id());
    let v = ctx.call_within(
        budget,
        false,
        |c| c.call_json("memory commit", "POST", &path, &[], Some(&body), LIST_LIMIT),
        describe_memory,
    )?;
    let id = str_of(&v, "id").unwrap_or("").to_string();
    let mut json = json!({"ok": true, "id": id, "scope": scope});
    if let Some(ns) = v.get("namespace") {
        json["namespace"] = ns.clone();
    }
    Ok(Report {
        json,
        human: format!("{id}\n"),
    })
}

/// `params`: the query string's fields, those given.
fn search(
    ctx: &Ctx,
    params: [(&str, Option<String>); 4],
    budget: &Budget,
) -> Result<Report, Failure> {
    let query: Vec<(&str, &str)> = params
        .iter()
        .filter_map(|(k, v)| Some((*k, v.as_deref()?)))
        .collect();
    let path = format!("/workspaces/{}/v2/memories", ctx.workspace_id());
    let v = ctx.call_within(
        budget,
        true,
        |c| c.call_json("memory search", "GET", &path, &query, None, LIST_LIMIT),
        describe_memory,
    )?;
    let memories = v
        .get("memories")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let mut rows = vec![vec![
        "ID".to_string(),
        "NAMESPACE".into(),
        "KIND".into(),
        "CREATED".into(),
        "CONTENT".into(),
    ]];
    for m in &memories {
        let f = |k: &str| str_of(m, k).unwrap_or("").to_string();
        rows.push(vec![
            f("id"),
            f("namespace"),
            f("kind"),
            f("created_at"),
            clip(str_of(m, "content").unwrap_or(""), 80),
        ]);
    }
    let human = if memories.is_empty() {
        "no memories found\n".to_string()
    } else {
        table(&rows)
    };
    Ok(Report {
        json: json!({"ok": true, "count": memories.len(), "memories": memories}),
        human,
    })
}

fn namespaces(ctx: &Ctx, budget: &Budget) -> Result<Report, Failure> {
    let path = format!("/workspaces/{}/v2/namespaces", ctx.workspace_id());
    let v = ctx.call_within(
        budget,
        true,
        |c| c.call_json("memory namespaces", "GET", &path, &[], None, LIST_LIMIT),
        describe_memory,
    )?;
    let list = |k: &str| {
        v.get(k)
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default()
    };
    let (readable, writable) = (list("readable"), list("writable"));
    let names = |l: &[Value]| -> Vec<String> {
        l.iter()
            .filter_map(|n| str_of(n, "name").map(str::to_string))
            .collect()
    };
    let writable_names = names(&writable);
    let mut rows = vec![vec![
        "NAME".to_string(),
        "KIND".into(),
        "ACCESS".into(),
        "LABEL".into(),
    ]];
    for n in &readable {
        let name = str_of(n, "name").unwrap_or("").to_string();
        let access = if writable_names.contains(&name) {
            "read-write"
        } else {
            "read"
        };
        rows.push(vec![
            name,
            str_of(n, "kind").unwrap_or("").into(),
            access.into(),
            str_of(n, "label").unwrap_or("").into(),
        ]);
    }
    Ok(Report {
        json: json!({"ok": true, "readable": readable, "writable": writable}),
        human: table(&rows),
    })
}

fn delete(ctx: &Ctx, id: &str, budget: &Budget) -> Result<Report, Failure> {
    let path = format!("/workspaces/{}/v2/memories/{id}", ctx.workspace_id());
    ctx.call_within(
        budget,
        true,
        |c| c.call_json("memory delete", "DELETE", &path, &[], None, LIST_LIMIT),
        describe_memory,
    )?;
    Ok(Report {
        json: json!({"ok": true, "id": id, "status": "deleted"}),
        human: format!("deleted {id}\n"),
    })
}
