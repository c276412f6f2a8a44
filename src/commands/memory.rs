//! `molecule memory commit|search|namespaces|delete` (§API-2.18). Search is the v2
//! route: the v1 `GET /memories` ignores its query. 503 means the platform has no
//! memory plugin; GLOBAL is for root workspaces only; only LOCAL memories can be
//! deleted.

use serde_json::{Value, json};

use super::{
    Budget, Ctx, Failure, LIST_LIMIT, Report, clip, describe, message_text, refused, require_uuid,
    str_of, table,
};
use crate::api::{ApiError, Kind};
use crate::cli::MemoryArgs;

const SCOPES: [&str; 3] = ["LOCAL", "TEAM", "GLOBAL"];
const KINDS: [&str; 3] = ["fact", "summary", "checkpoint"];
/// The platform's cap on the `namespace` label.
const MAX_LABEL: usize = 50;

pub(super) fn run(ctx: &Ctx, a: &MemoryArgs) -> Result<Report, Failure> {
    let budget = Budget::new(a.budget_secs, "memory")?;
    match a.action.as_deref() {
        Some("commit") => commit(ctx, a, &budget),
        Some("search") => search(ctx, a, &budget),
        Some("namespaces") => namespaces(ctx, a, &budget),
        Some("delete") => delete(ctx, a, &budget),
        Some(other) => Err(Failure::input(format!(
            "memory: unknown action {other:?} (commit, search, namespaces or delete)"
        ))),
        None => Err(Failure::input(
            "memory: an action is required: commit, search, namespaces or delete",
        )),
    }
}

/// Options that only some actions take are refused elsewhere, not ignored.
fn only(a: &MemoryArgs, action: &str, allowed: &[&str]) -> Result<(), Failure> {
    let given = [
        ("--scope", a.scope.is_some()),
        ("--namespace", a.namespace.is_some()),
        ("--kind", a.kind.is_some()),
        ("--limit", a.limit.is_some()),
    ];
    for (flag, set) in given {
        if set && !allowed.contains(&flag) {
            return Err(Failure::input(format!(
                "memory {action}: {flag} does not apply here"
            )));
        }
    }
    Ok(())
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

fn commit(ctx: &Ctx, a: &MemoryArgs, budget: &Budget) -> Result<Report, Failure> {
    only(a, "commit", &["--scope", "--namespace"])?;
    let text = message_text(a.arg.as_deref(), "memory commit")?;
    let scope = a.scope.as_deref().unwrap_or("LOCAL").to_ascii_uppercase();
    if !SCOPES.contains(&scope.as_str()) {
        return Err(Failure::input(format!(
            "memory commit: --scope {scope:?}: must be LOCAL, TEAM or GLOBAL"
        )));
    }
    let mut body = json!({"content": text, "scope": scope});
    if let Some(label) = &a.namespace {
        if label.chars().count() > MAX_LABEL || label.trim().is_empty() {
            return Err(Failure::input(format!(
                "memory commit: --namespace: 1 to {MAX_LABEL} characters"
            )));
        }
        body["namespace"] = Value::from(label.as_str());
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

fn search(ctx: &Ctx, a: &MemoryArgs, budget: &Budget) -> Result<Report, Failure> {
    only(a, "search", &["--namespace", "--kind", "--limit"])?;
    let mut q: Vec<(&str, String)> = Vec::new();
    if let Some(query) = &a.arg {
        q.push(("q", query.clone()));
    }
    if let Some(ns) = &a.namespace {
        q.push(("namespace", ns.clone()));
    }
    if let Some(k) = &a.kind {
        if !KINDS.contains(&k.as_str()) {
            return Err(Failure::input(format!(
                "memory search: --kind {k:?}: must be fact, summary or checkpoint"
            )));
        }
        q.push(("kind", k.clone()));
    }
    if let Some(n) = a.limit {
        if !(1..=100).contains(&n) {
            return Err(Failure::input(
                "memory search: --limit must be between 1 and 100",
            ));
        }
        q.push(("limit", n.to_string()));
    }
    let query: Vec<(&str, &str)> = q.iter().map(|(k, v)| (*k, v.as_str())).collect();
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

fn namespaces(ctx: &Ctx, a: &MemoryArgs, budget: &Budget) -> Result<Report, Failure> {
    only(a, "namespaces", &[])?;
    if a.arg.is_some() {
        return Err(Failure::input("memory namespaces: takes no argument"));
    }
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

fn delete(ctx: &Ctx, a: &MemoryArgs, budget: &Budget) -> Result<Report, Failure> {
    only(a, "delete", &[])?;
    let id = require_uuid(a.arg.as_deref(), "memory delete", "memory id")?;
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
