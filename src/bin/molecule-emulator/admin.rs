//! Admin API under `/_admin` (no auth): create and mutate workspaces and tokens, plant
//! inbox rows, complete delegations, inject faults, and read back what the platform saw.
//! Event-stream faults: `POST /_admin/workspaces/:id/events` with any of
//! `{"no_stream": bool, "silence": true, "close": true, "drop_next": N}`; `GET` the
//! same path for the stream counters (open, opened, published, dropped).

use std::sync::Arc;

use serde_json::{Map, Value, json};

use crate::http::{Request, Response};
use crate::ids;
use crate::server::App;
use crate::store::{PushReply, Row, Store, Workspace};

type Handled = Result<Response, Response>;

fn ok(v: &Value) -> Handled {
    Ok(Response::json(200, v))
}

fn err(status: u16, msg: &str) -> Response {
    Response::error(status, msg)
}

/// Request body as an object; an empty body counts as `{}`.
fn body_object(req: &Request) -> Result<Map<String, Value>, Response> {
    if req.body.iter().all(u8::is_ascii_whitespace) {
        return Ok(Map::new());
    }
    match serde_json::from_slice::<Value>(&req.body) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err(err(400, "body must be a JSON object")),
        Err(_) => Err(err(400, "invalid JSON")),
    }
}

/// Handle one admin request.
pub fn handle(app: &Arc<App>, req: &Request) -> Response {
    let path = req.path.trim_end_matches('/');
    let segs: Vec<&str> = path.split('/').skip(2).collect();
    let result = match (req.method.as_str(), segs.as_slice()) {
        ("POST", ["workspaces"]) => create_workspace(app, req),
        ("GET", ["workspaces"]) => list_workspaces(app),
        ("GET", ["workspaces", id]) => with_ws(app, id, |ws| ok(&ws.admin_json(ids::now_us()))),
        ("POST", ["workspaces", id, "rotate"]) => rotate(app, id),
        ("POST", ["workspaces", id, "revoke"]) => revoke(app, id),
        ("POST", ["workspaces", id, "remove"]) => remove(app, id),
        ("POST", ["workspaces", id, "update"]) => update(app, req, id),
        ("POST", ["workspaces", id, "enqueue"]) => enqueue(app, req, id),
        ("POST", ["workspaces", id, "enqueue_batch"]) => enqueue_batch(app, req, id),
        ("POST", ["workspaces", id, "rows"]) => insert_raw_row(app, req, id),
        ("GET", ["workspaces", id, "rows"]) => with_ws(app, id, |ws| {
            let rows: Vec<Value> = ws
                .inbox
                .rows()
                .iter()
                .map(|r| Value::Object(r.to_json()))
                .collect();
            ok(&json!({ "rows": rows }))
        }),
        ("POST", ["workspaces", id, "prune"]) => prune(app, req, id),
        ("GET", ["workspaces", id, "received"]) => with_ws(app, id, |ws| {
            let msgs: Vec<Value> = ws
                .received
                .iter()
                .map(|m| {
                    json!({
                        "seq": m.seq,
                        "from": m.from,
                        "method": m.method,
                        "message_id": m.message_id,
                        "text": m.text,
                        "metadata": m.metadata,
                        "body": m.body,
                        "duplicate": m.duplicate,
                        "at_ms": m.at_ms,
                    })
                })
                .collect();
            ok(&json!({ "messages": msgs }))
        }),
        ("GET", ["workspaces", id, "notifies"]) => with_ws(app, id, |ws| {
            let list: Vec<Value> = ws
                .notifies
                .iter()
                .map(|n| json!({"message": n.message, "attachments": n.attachments, "at_ms": n.at_ms}))
                .collect();
            ok(&json!({ "notifies": list }))
        }),
        ("GET", ["workspaces", id, "heartbeats"]) => with_ws(app, id, |ws| {
            ok(&json!({
                "count": ws.heartbeat_count,
                "last": ws.heartbeats.back(),
                "all": ws.heartbeats,
            }))
        }),
        ("GET", ["workspaces", id, "registers"]) => with_ws(app, id, |ws| {
            ok(&json!({"count": ws.register_count, "last": ws.last_register}))
        }),
        ("POST", ["workspaces", id, "events"]) => body_object(req).and_then(|spec| {
            let mut st = app.store();
            match st.events.fault(id, &spec) {
                Ok(()) => ok(&st.events.to_json(id)),
                Err(e) => Err(err(400, &e)),
            }
        }),
        ("GET", ["workspaces", id, "events"]) => ok(&app.store().events.to_json(id)),
        ("GET", ["delegations"]) => list_delegations(app),
        ("POST", ["delegations", did, "complete"]) => complete_delegation(app, req, did),
        ("POST", ["faults"]) => {
            let spec = body_object(req).map(Value::Object);
            spec.and_then(|s| match app.faults().add(&s) {
                Ok(id) => ok(&json!({ "fault_id": id })),
                Err(e) => Err(err(400, &e)),
            })
        }
        ("DELETE", ["faults"]) => ok(&json!({ "cleared": app.faults().clear() })),
        ("GET", ["faults"]) => ok(&json!({
            "faults": app.faults().to_json(),
            "held": app.held.load(std::sync::atomic::Ordering::SeqCst),
        })),
        ("GET", ["stats"]) => ok(&app.stats().to_json()),
        ("POST", ["reset_stats"]) => {
            app.stats().reset();
            ok(&json!({"status": "ok"}))
        }
        ("POST", ["reset"]) => {
            let mut st = app.store();
            let no_stream = st.events.no_stream_anywhere;
            *st = Store::default();
            st.events.no_stream_anywhere = no_stream;
            drop(st);
            app.faults().clear();
            app.stats().reset();
            ok(&json!({"status": "ok"}))
        }
        (m, s) => crate::tools::admin(app, req, m, s).unwrap_or_else(|| Err(err(404, "not found"))),
    };
    result.unwrap_or_else(|e| e)
}

fn with_ws(app: &App, id: &str, f: impl FnOnce(&Workspace) -> Handled) -> Handled {
    let st = app.store();
    let ws = st
        .workspaces
        .get(id)
        .ok_or_else(|| err(404, "workspace not found"))?;
    f(ws)
}

fn opt_str_field(body: &Map<String, Value>, key: &str) -> Result<Option<Option<String>>, Response> {
    match body.get(key) {
        None => Ok(None),
        Some(Value::Null) => Ok(Some(None)),
        Some(Value::String(s)) => Ok(Some(Some(s.clone()))),
        Some(_) => Err(err(400, &format!("{key} must be a string or null"))),
    }
}

fn check_parent(st: &Store, id: &str, parent: Option<&str>) -> Result<(), Response> {
    if let Some(p) = parent {
        if p == id {
            return Err(err(400, "a workspace cannot be its own parent"));
        }
        if !st.workspaces.contains_key(p) {
            return Err(err(400, "parent workspace not found"));
        }
    }
    Ok(())
}

fn check_mode(body: &Map<String, Value>) -> Result<Option<String>, Response> {
    match body.get("delivery_mode") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(m)) if m == "push" || m == "poll" => Ok(Some(m.clone())),
        Some(_) => Err(err(400, "delivery_mode must be 'push' or 'poll'")),
    }
}

/// Fields shared by create and update; applied to `ws`.
fn apply_common(st: &Store, ws: &mut Workspace, body: &Map<String, Value>) -> Result<(), Response> {
    if let Some(name) = opt_str_field(body, "name")? {
        ws.name = name.unwrap_or_default();
    }
    if let Some(role) = opt_str_field(body, "role")? {
        ws.role = role;
    }
    if let Some(parent) = opt_str_field(body, "parent_id")? {
        check_parent(st, &ws.id, parent.as_deref())?;
        ws.parent_id = parent;
    }
    if let Some(mode) = check_mode(body)? {
        ws.delivery_mode = mode;
    }
    match body.get("talk_to_user_enabled") {
        None | Some(Value::Null) => {}
        Some(Value::Bool(b)) => ws.talk_to_user_enabled = *b,
        Some(_) => return Err(err(400, "talk_to_user_enabled must be a boolean")),
    }
    if let Some(pr) = body.get("push_reply") {
        ws.push_reply = PushReply::from_json(pr).map_err(|e| err(400, &e))?;
    }
    if let Some(status) = opt_str_field(body, "status")?.flatten() {
        if status == "removed" && ws.removed_us.is_none() {
            ws.removed_us = Some(ids::now_us());
        }
        ws.status = status;
    }
    if let Some(url) = opt_str_field(body, "url")? {
        ws.url = url;
    }
    if let Some(card) = body.get("agent_card") {
        ws.agent_card = (!card.is_null()).then(|| card.clone());
    }
    Ok(())
}

fn create_workspace(app: &App, req: &Request) -> Handled {
    let body = body_object(req)?;
    let id = match body.get("id") {
        None | Some(Value::Null) => ids::new_uuid(),
        Some(Value::String(s)) if ids::is_uuid(s) => s.clone(),
        Some(_) => return Err(err(400, "id must be a UUID")),
    };
    let token = match body.get("token") {
        None => {
            if body
                .get("no_token")
                .and_then(Value::as_bool)
                .unwrap_or(false)
            {
                None
            } else {
                Some(ids::new_token())
            }
        }
        Some(Value::Null) => None,
        Some(Value::String(t)) if !t.is_empty() => Some(t.clone()),
        Some(_) => return Err(err(400, "token must be a non-empty string or null")),
    };
    let mut st = app.store();
    if st.workspaces.contains_key(&id) {
        return Err(err(409, "workspace already exists"));
    }
    if let Some(t) = &token
        && st.tokens.contains_key(t)
    {
        return Err(err(409, "token already in use"));
    }
    let mut ws = Workspace::new(&id, &format!("ws-{}", &id[..8]));
    apply_common(&st, &mut ws, &body)?;
    st.add_workspace(ws);
    if let Some(t) = &token {
        st.add_token(&id, t);
    }
    ok(&json!({"id": id, "token": token}))
}

fn list_workspaces(app: &App) -> Handled {
    let st = app.store();
    let now = ids::now_us();
    let mut list: Vec<&Workspace> = st.workspaces.values().collect();
    list.sort_by_key(|w| (w.created_us, w.id.clone()));
    let out: Vec<Value> = list.into_iter().map(|w| w.admin_json(now)).collect();
    ok(&json!({ "workspaces": out }))
}

fn rotate(app: &App, id: &str) -> Handled {
    let mut st = app.store();
    if !st.workspaces.contains_key(id) {
        return Err(err(404, "workspace not found"));
    }
    st.revoke_all(id);
    let token = st
        .mint_token(id)
        .ok_or_else(|| err(500, "failed to mint token"))?;
    ok(&json!({ "token": token }))
}

fn revoke(app: &App, id: &str) -> Handled {
    let mut st = app.store();
    if !st.workspaces.contains_key(id) {
        return Err(err(404, "workspace not found"));
    }
    let n = st.revoke_all(id);
    ok(&json!({ "revoked": n }))
}

fn remove(app: &App, id: &str) -> Handled {
    let mut st = app.store();
    let ws = st
        .workspaces
        .get_mut(id)
        .ok_or_else(|| err(404, "workspace not found"))?;
    ws.status = "removed".into();
    let at = *ws.removed_us.get_or_insert_with(ids::now_us);
    ok(&json!({"id": id, "status": "removed", "removed_at": ids::rfc3339(at)}))
}

fn update(app: &App, req: &Request, id: &str) -> Handled {
    let body = body_object(req)?;
    let mut st = app.store();
    // Take the workspace out so `apply_common` can look at the others (parent checks).
    let mut ws = st
        .workspaces
        .remove(id)
        .ok_or_else(|| err(404, "workspace not found"))?;
    let result = apply_common(&st, &mut ws, &body);
    let view = ws.admin_json(ids::now_us());
    st.workspaces.insert(id.to_string(), ws);
    result?;
    ok(&view)
}

/// Canvas identity the admin `enqueue` stamps on canvas-origin messages.
fn canvas_identity() -> Value {
    json!({
        "source": "canvas_user",
        "user_identity_status": "AUTHENTICATED",
        "user_id": "u-1",
        "email": "a@b.c",
        "username": "a@b.c",
    })
}

/// `now - age_secs`, never 0 (0 means "now" to `insert_row`).
fn backdated(body: &Map<String, Value>) -> Result<i64, String> {
    // An exact time lets a test give many rows one timestamp (§2.4 orders them by seq).
    if let Some(at) = body.get("created_at").filter(|v| !v.is_null()) {
        return at
            .as_str()
            .and_then(ids::parse_rfc3339)
            .ok_or_else(|| "created_at must be an RFC 3339 timestamp".to_string());
    }
    match body.get("age_secs") {
        None | Some(Value::Null) => Ok(ids::now_us()),
        Some(v) => {
            let age = v
                .as_f64()
                .filter(|a| a.is_finite() && *a >= 0.0)
                .ok_or("age_secs must be a non-negative number")?;
            Ok(ids::now_us().saturating_sub((age * 1e6) as i64).max(1))
        }
    }
}

/// Write one simulated inbound message into `ws_id`'s inbox, as the proxy would.
fn enqueue_one(st: &mut Store, ws_id: &str, spec: &Value) -> Result<Value, String> {
    let body = spec.as_object().ok_or("message must be a JSON object")?;
    let from = match body.get("from") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(_) => return Err("from must be a string or null".into()),
    };
    let text = body
        .get("text")
        .and_then(Value::as_str)
        .ok_or("text is required")?;
    let message_id = match body.get("message_id") {
        None | Some(Value::Null) => ids::new_uuid(),
        Some(Value::String(s)) if !s.is_empty() => s.clone(),
        Some(_) => return Err("message_id must be a non-empty string".into()),
    };
    let part_key = match body.get("part_key").and_then(Value::as_str) {
        None | Some("kind") => "kind",
        Some("type") => "type",
        Some(_) => return Err("part_key must be 'kind' or 'type'".into()),
    };
    let method = match body.get("method") {
        None | Some(Value::Null) => "message/send".to_string(),
        Some(Value::String(s)) => s.clone(),
        Some(_) => return Err("method must be a string".into()),
    };
    let created_us = backdated(body)?;
    let ws = st.workspaces.get(ws_id).ok_or("workspace not found")?;
    let mut part = Map::new();
    part.insert(part_key.into(), Value::from("text"));
    part.insert("text".into(), Value::from(text));
    let mut message = Map::new();
    message.insert("role".into(), Value::from("user"));
    message.insert("messageId".into(), Value::from(message_id.as_str()));
    message.insert("parts".into(), json!([part]));
    match body.get("metadata") {
        None | Some(Value::Null) => {}
        Some(m @ Value::Object(_)) => {
            message.insert("metadata".into(), m.clone());
        }
        Some(_) => return Err("metadata must be an object".into()),
    }
    let mut params = Map::new();
    match body.get("context_id") {
        None | Some(Value::Null) => {}
        Some(Value::String(c)) => {
            message.insert("contextId".into(), Value::from(c.as_str()));
        }
        Some(_) => return Err("context_id must be a string".into()),
    }
    if from.is_none() {
        if !message.contains_key("contextId") {
            message.insert("contextId".into(), Value::from(ws.context_id.as_str()));
        }
        params.insert("metadata".into(), canvas_identity());
    }
    params.insert("message".into(), Value::Object(message));
    let envelope = json!({
        "jsonrpc": "2.0",
        "id": ids::new_uuid(),
        "method": method,
        "params": params,
    });
    let mut row = Row::new(ws_id, "a2a_receive");
    row.source_id = from.map_or(Value::Null, Value::from);
    row.target_id = Value::from(ws_id);
    row.method = Value::from(method.as_str());
    row.summary = Value::from(format!("{method} → {} (queued for poll)", ws.name));
    row.request_body = Some(envelope);
    row.message_id = Some(message_id.clone());
    row.created_us = created_us;
    let (activity_id, duplicate) = st.insert_inbound(ws_id, row).ok_or("workspace not found")?;
    Ok(json!({"activity_id": activity_id, "message_id": message_id, "duplicate": duplicate}))
}

fn enqueue(app: &App, req: &Request, id: &str) -> Handled {
    let body = body_object(req)?;
    let mut st = app.store();
    if !st.workspaces.contains_key(id) {
        return Err(err(404, "workspace not found"));
    }
    match enqueue_one(&mut st, id, &Value::Object(body)) {
        Ok(v) => ok(&v),
        Err(e) => Err(err(400, &e)),
    }
}

fn enqueue_batch(app: &App, req: &Request, id: &str) -> Handled {
    let body = body_object(req)?;
    let Some(messages) = body.get("messages").and_then(Value::as_array) else {
        return Err(err(400, "messages must be an array"));
    };
    let mut st = app.store();
    if !st.workspaces.contains_key(id) {
        return Err(err(404, "workspace not found"));
    }
    let results: Vec<Value> = messages
        .iter()
        .map(|m| enqueue_one(&mut st, id, m).unwrap_or_else(|e| json!({ "error": e })))
        .collect();
    ok(&json!({ "results": results }))
}

fn insert_raw_row(app: &App, req: &Request, id: &str) -> Handled {
    let body = body_object(req)?;
    let mut st = app.store();
    if !st.workspaces.contains_key(id) {
        return Err(err(404, "workspace not found"));
    }
    let mut row = Row::new(id, "a2a_receive");
    let field = |k: &str, default: Value| body.get(k).cloned().unwrap_or(default);
    row.activity_type = field("activity_type", Value::from("a2a_receive"));
    row.source_id = field("source_id", Value::Null);
    row.target_id = field("target_id", Value::Null);
    row.method = field("method", Value::Null);
    row.summary = field("summary", Value::Null);
    row.status = field("status", Value::from("ok"));
    row.error_detail = field("error_detail", Value::Null);
    row.duration_ms = field("duration_ms", Value::Null);
    row.request_body = body.get("request_body").cloned();
    row.response_body = body.get("response_body").cloned();
    row.message_id = body
        .get("message_id")
        .and_then(Value::as_str)
        .map(str::to_string);
    row.created_us = backdated(&body).map_err(|e| err(400, &e))?;
    // A planted row is announced like any logged row unless `"event": false`.
    let event = (body.get("event") != Some(&Value::Bool(false))).then(|| row.event_data());
    let (activity_id, duplicate) = st
        .insert_row(id, row)
        .ok_or_else(|| err(404, "workspace not found"))?;
    if let Some(data) = event {
        st.events.publish(id, "ACTIVITY_LOGGED", data);
    }
    ok(&json!({"activity_id": activity_id, "duplicate": duplicate}))
}

fn prune(app: &App, req: &Request, id: &str) -> Handled {
    let body = body_object(req)?;
    let mut st = app.store();
    let ws = st
        .workspaces
        .get_mut(id)
        .ok_or_else(|| err(404, "workspace not found"))?;
    let n = match body.get("activity_id") {
        None | Some(Value::Null) => ws.inbox.clear(),
        Some(Value::String(a)) => usize::from(ws.inbox.remove(a)),
        Some(_) => return Err(err(400, "activity_id must be a string")),
    };
    ok(&json!({ "pruned": n }))
}

fn list_delegations(app: &App) -> Handled {
    let st = app.store();
    let mut list: Vec<_> = st.delegations.values().collect();
    list.sort_by_key(|d| (d.created_us, d.order));
    let out: Vec<Value> = list
        .into_iter()
        .map(|d| {
            let mut v = d.ledger_json(&d.source_id);
            v["idempotency_key"] = d.idempotency_key.clone().map_or(Value::Null, Value::from);
            v
        })
        .collect();
    ok(&json!({ "delegations": out }))
}

fn complete_delegation(app: &App, req: &Request, did: &str) -> Handled {
    let body = body_object(req)?;
    let status = match body.get("status").and_then(Value::as_str) {
        Some(s @ ("completed" | "failed")) => s.to_string(),
        _ => return Err(err(400, "status must be one of: completed, failed")),
    };
    let text = body.get("text").and_then(Value::as_str);
    let error = body.get("error").and_then(Value::as_str);
    let mut st = app.store();
    let d = st
        .set_delegation_status(did, &status, text, error, app.cfg.delegation_result_push)
        .ok_or_else(|| err(404, "delegation not found"))?;
    ok(&d.ledger_json(&d.source_id))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::Config;

    fn app() -> Arc<App> {
        Arc::new(App::new(Config::default()))
    }

    fn call(app: &Arc<App>, method: &str, path: &str, body: Value) -> (u16, Value) {
        let req = Request {
            method: method.into(),
            path: path.into(),
            body: if body.is_null() {
                Vec::new()
            } else {
                body.to_string().into_bytes()
            },
            http11: true,
            ..Request::default()
        };
        let resp = handle(app, &req);
        let v = serde_json::from_slice(&resp.body).unwrap_or(Value::Null);
        (resp.status, v)
    }

    #[test]
    fn create_enqueue_and_dedupe() {
        let app = app();
        let (s, ws) = call(
            &app,
            "POST",
            "/_admin/workspaces",
            json!({"delivery_mode": "poll"}),
        );
        assert_eq!(s, 200);
        let id = ws["id"].as_str().unwrap().to_string();
        assert_eq!(ws["token"].as_str().unwrap().len(), 43);
        let (s, a) = call(
            &app,
            "POST",
            &format!("/_admin/workspaces/{id}/enqueue"),
            json!({"text": "hi", "message_id": "m1", "part_key": "type", "age_secs": 5.5}),
        );
        assert_eq!(s, 200, "{a}");
        assert_eq!(a["duplicate"], false);
        let (_, b) = call(
            &app,
            "POST",
            &format!("/_admin/workspaces/{id}/enqueue"),
            json!({"text": "again", "message_id": "m1"}),
        );
        assert_eq!(b["duplicate"], true);
        assert_eq!(b["activity_id"], a["activity_id"]);
        let (_, rows) = call(
            &app,
            "GET",
            &format!("/_admin/workspaces/{id}/rows"),
            Value::Null,
        );
        let row = &rows["rows"][0];
        assert_eq!(
            row["request_body"]["params"]["message"]["parts"][0]["type"],
            "text"
        );
        assert_eq!(
            row["request_body"]["params"]["metadata"]["source"],
            "canvas_user"
        );
        assert!(row["source_id"].is_null());
        let (_, batch) = call(
            &app,
            "POST",
            &format!("/_admin/workspaces/{id}/enqueue_batch"),
            json!({"messages": [{"text": "a"}, {"nope": 1}]}),
        );
        assert_eq!(batch["results"][0]["duplicate"], false);
        assert_eq!(batch["results"][1]["error"], "text is required");
        let (_, p) = call(
            &app,
            "POST",
            &format!("/_admin/workspaces/{id}/prune"),
            json!({}),
        );
        assert_eq!(p["pruned"], 2);
    }

    #[test]
    fn create_validation() {
        let app = app();
        assert_eq!(
            call(&app, "POST", "/_admin/workspaces", json!({"id": "x"})).0,
            400
        );
        assert_eq!(
            call(
                &app,
                "POST",
                "/_admin/workspaces",
                json!({"parent_id": ids::new_uuid()})
            )
            .0,
            400
        );
        let (_, ws) = call(
            &app,
            "POST",
            "/_admin/workspaces",
            json!({"no_token": true, "name": "n"}),
        );
        assert!(ws["token"].is_null());
        let id = ws["id"].as_str().unwrap();
        assert_eq!(
            call(&app, "POST", "/_admin/workspaces", json!({"id": id})).0,
            409
        );
        let (s, _) = call(
            &app,
            "POST",
            "/_admin/workspaces",
            json!({"token": "fixed", "parent_id": id}),
        );
        assert_eq!(s, 200);
        assert_eq!(
            call(
                &app,
                "POST",
                "/_admin/workspaces",
                json!({"token": "fixed"})
            )
            .0,
            409
        );
        let req = Request {
            method: "POST".into(),
            path: "/_admin/workspaces".into(),
            body: b"{bad".to_vec(),
            ..Request::default()
        };
        assert_eq!(handle(&app, &req).status, 400);
        assert_eq!(call(&app, "GET", "/_admin/nothing", Value::Null).0, 404);
    }
}
