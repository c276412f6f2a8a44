//! Platform endpoints (PLATFORM_API.md §2.1–§2.14): registry, activity inbox, A2A
//! proxy, notify, delegations, discovery and workspace info, with the auth gates of §1.2.

use std::sync::Arc;
use std::time::Duration;

use serde_json::{Map, Value, json};

use crate::http::{Request, Response};
use crate::ids;
use crate::server::{A2A_MAX_BODY, App, too_large};
use crate::store::{
    ActivityQuery, Delegation, FROZEN_STATUSES, NotifyRec, PushReply, Received, Row, SourceFilter,
    Store, Workspace, message_text, truncate,
};

/// A classified platform request; ids borrow from the path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route<'a> {
    Health,
    Register,
    Heartbeat,
    UpdateCard,
    CheckAccess,
    Discover(&'a str),
    Peers(&'a str),
    GetWorkspace(&'a str),
    Activity(&'a str),
    SelfReport(&'a str),
    Ack(&'a str),
    A2a(&'a str),
    Notify(&'a str),
    Delegate(&'a str),
    Delegations(&'a str),
    RecordDelegation(&'a str),
    UpdateDelegation(&'a str, &'a str),
    Rotate(&'a str),
    EventStream(&'a str),
    /// Memories, requests, uploads, broadcast, chat history (tools.rs).
    Tool(crate::tools::ToolRoute<'a>),
    NotFound,
}

/// Map method + path (no query) to a route.
pub fn classify<'a>(method: &str, path: &'a str) -> Route<'a> {
    let segs: Vec<&'a str> = path.strip_prefix('/').unwrap_or(path).split('/').collect();
    match (method, segs.as_slice()) {
        ("GET", ["health"]) => Route::Health,
        ("POST", ["registry", "register"]) => Route::Register,
        ("POST", ["registry", "heartbeat"]) => Route::Heartbeat,
        ("POST", ["registry", "update-card"]) => Route::UpdateCard,
        ("POST", ["registry", "check-access"]) => Route::CheckAccess,
        ("GET", ["registry", "discover", id]) => Route::Discover(id),
        ("GET", ["registry", id, "peers"]) => Route::Peers(id),
        ("GET", ["workspaces", id]) => Route::GetWorkspace(id),
        ("GET", ["workspaces", id, "activity"]) => Route::Activity(id),
        ("POST", ["workspaces", id, "activity"]) => Route::SelfReport(id),
        ("POST", ["workspaces", id, "activity", "ack"]) => Route::Ack(id),
        ("POST", ["workspaces", id, "a2a"]) => Route::A2a(id),
        ("POST", ["workspaces", id, "notify"]) => Route::Notify(id),
        ("POST", ["workspaces", id, "delegate"]) => Route::Delegate(id),
        ("GET", ["workspaces", id, "delegations"]) => Route::Delegations(id),
        ("POST", ["workspaces", id, "delegations", "record"]) => Route::RecordDelegation(id),
        ("POST", ["workspaces", id, "delegations", did, "update"]) => {
            Route::UpdateDelegation(id, did)
        }
        ("POST", ["workspaces", id, "external", "rotate"]) => Route::Rotate(id),
        ("GET", ["workspaces", id, "events", "stream"]) => Route::EventStream(id),
        (m, s) => crate::tools::classify(m, s).map_or(Route::NotFound, Route::Tool),
    }
}

impl Route<'_> {
    /// Path template for statistics.
    pub fn template(&self) -> &'static str {
        match self {
            Route::Health => "/health",
            Route::Register => "/registry/register",
            Route::Heartbeat => "/registry/heartbeat",
            Route::UpdateCard => "/registry/update-card",
            Route::CheckAccess => "/registry/check-access",
            Route::Discover(_) => "/registry/discover/:id",
            Route::Peers(_) => "/registry/:id/peers",
            Route::GetWorkspace(_) => "/workspaces/:id",
            Route::Activity(_) | Route::SelfReport(_) => "/workspaces/:id/activity",
            Route::Ack(_) => "/workspaces/:id/activity/ack",
            Route::A2a(_) => "/workspaces/:id/a2a",
            Route::Notify(_) => "/workspaces/:id/notify",
            Route::Delegate(_) => "/workspaces/:id/delegate",
            Route::Delegations(_) => "/workspaces/:id/delegations",
            Route::RecordDelegation(_) => "/workspaces/:id/delegations/record",
            Route::UpdateDelegation(..) => "/workspaces/:id/delegations/:did/update",
            Route::Rotate(_) => "/workspaces/:id/external/rotate",
            Route::EventStream(_) => "/workspaces/:id/events/stream",
            Route::Tool(t) => t.template(),
            Route::NotFound => "(unmatched)",
        }
    }

    /// The `:id` segment, if any.
    pub fn workspace_id(&self) -> Option<&str> {
        match *self {
            Route::Discover(id)
            | Route::Peers(id)
            | Route::GetWorkspace(id)
            | Route::Activity(id)
            | Route::SelfReport(id)
            | Route::Ack(id)
            | Route::A2a(id)
            | Route::Notify(id)
            | Route::Delegate(id)
            | Route::Delegations(id)
            | Route::RecordDelegation(id)
            | Route::UpdateDelegation(id, _)
            | Route::Rotate(id)
            | Route::EventStream(id) => Some(id),
            Route::Tool(t) => t.workspace_id(),
            _ => None,
        }
    }
}

/// Dispatch a platform request (after faults, rate limit and tenant guard).
pub fn handle(app: &Arc<App>, req: &Request, route: &Route<'_>) -> Response {
    let result = match *route {
        Route::Health => Ok(Response::json(200, &json!({"status": "ok"}))),
        Route::Register => register(app, req),
        Route::Heartbeat => heartbeat(app, req),
        Route::UpdateCard => update_card(app, req),
        Route::CheckAccess => check_access(app, req),
        Route::Discover(id) => discover(app, req, id),
        Route::Peers(id) => peers(app, req, id),
        Route::GetWorkspace(id) => get_workspace(app, req, id),
        Route::Activity(id) => activity(app, req, id),
        Route::SelfReport(id) => self_report(app, req, id),
        Route::Ack(id) => ack(app, req, id),
        Route::A2a(id) => a2a(app, req, id),
        Route::Notify(id) => notify(app, req, id),
        Route::Delegate(id) => delegate(app, req, id),
        Route::Delegations(id) => delegations(app, req, id),
        Route::RecordDelegation(id) => record_delegation(app, req, id),
        Route::UpdateDelegation(id, did) => update_delegation(app, req, id, did),
        Route::Rotate(id) => rotate(app, req, id),
        Route::EventStream(id) => event_stream(app, req, id),
        Route::Tool(t) => Ok(crate::tools::handle(app, req, t)),
        Route::NotFound => Err(Response::error(404, "not found")),
    };
    result.unwrap_or_else(|e| e)
}

type Handled = Result<Response, Response>;

fn ok(v: &Value) -> Handled {
    Ok(Response::json(200, v))
}

fn err(status: u16, msg: &str) -> Response {
    Response::error(status, msg)
}

/// `Authorization: Bearer <token>` (prefix matched case-sensitively, §1.1).
pub fn bearer(req: &Request) -> Option<&str> {
    req.header("authorization")
        .and_then(|a| a.strip_prefix("Bearer "))
        .map(str::trim)
        .filter(|t| !t.is_empty())
}

pub fn is_admin(app: &App, token: &str) -> bool {
    app.cfg.admin_token.as_deref() == Some(token)
}

/// The body as a JSON object, or None.
fn json_object(body: &[u8]) -> Option<Map<String, Value>> {
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(m)) => Some(m),
        _ => None,
    }
}

/// A non-empty string field.
fn str_field<'a>(m: &'a Map<String, Value>, key: &str) -> Option<&'a str> {
    m.get(key).and_then(Value::as_str).filter(|s| !s.is_empty())
}

fn opt_string(v: Option<&str>) -> Value {
    v.map_or(Value::Null, Value::from)
}

/// WorkspaceAuth (§1.2): admin token, or a live token of workspace `id`.
pub fn workspace_auth(app: &App, st: &Store, req: &Request, id: &str) -> Result<(), Response> {
    let Some(tok) = bearer(req) else {
        return Err(err(401, "missing workspace auth token"));
    };
    if is_admin(app, tok) || st.token_owner(tok) == Some(id) {
        Ok(())
    } else {
        Err(err(401, "invalid workspace auth token"))
    }
}

/// Registry token gate (§1.2): bootstrap while `id` has no live token.
fn registry_gate(st: &Store, req: &Request, id: &str) -> Result<(), Response> {
    if !st.has_live_token(id) {
        return Ok(());
    }
    let Some(tok) = bearer(req) else {
        return Err(err(401, "missing workspace auth token"));
    };
    if st.token_owner(tok) == Some(id) {
        Ok(())
    } else {
        Err(err(401, "invalid workspace auth token"))
    }
}

/// Discovery auth (§1.2) for caller `id`.
fn discovery_auth(app: &App, st: &Store, req: &Request, id: &str) -> Result<(), Response> {
    if !st.has_live_token(id) {
        return Ok(());
    }
    workspace_auth(app, st, req, id)
}

// ---------------------------------------------------------------- registry

/// Fill agent-card gaps from the workspace row (§2.1).
fn reconcile_card(card: &mut Value, ws: &Workspace) {
    let Value::Object(m) = card else {
        return;
    };
    let name = m.get("name").and_then(Value::as_str).unwrap_or("");
    if name.is_empty() || name == ws.id {
        m.insert("name".into(), Value::from(ws.name.as_str()));
    }
    let display = m
        .get("name")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    if m.get("description")
        .and_then(Value::as_str)
        .unwrap_or("")
        .is_empty()
    {
        m.insert("description".into(), Value::from(display));
    }
    if m.get("role")
        .and_then(Value::as_str)
        .unwrap_or("")
        .is_empty()
        && let Some(role) = ws.role.as_deref().filter(|r| !r.is_empty())
    {
        m.insert("role".into(), Value::from(role));
    }
}

fn register(app: &App, req: &Request) -> Handled {
    let bad = || err(400, "invalid request body");
    let body = json_object(&req.body).ok_or_else(bad)?;
    let id = str_field(&body, "id").ok_or_else(bad)?.to_string();
    let mut card = match body.get("agent_card") {
        None | Some(Value::Null) => return Err(bad()),
        Some(c) => c.clone(),
    };
    let mode_in = match body.get("delivery_mode") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if s.is_empty() => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(_) => return Err(bad()),
    };
    let mut st = app.store();
    registry_gate(&st, req, &id)?;
    if let Some(m) = &mode_in
        && m != "push"
        && m != "poll"
    {
        return Err(err(400, "delivery_mode must be 'push' or 'poll'"));
    }
    if body.get("kind").and_then(Value::as_str) == Some("platform") {
        return Err(err(403, "registering as kind 'platform' is not allowed"));
    }
    let mode = mode_in
        .or_else(|| st.workspaces.get(&id).map(|w| w.delivery_mode.clone()))
        .unwrap_or_else(|| "push".to_string());
    let url = if mode == "push" {
        let url = str_field(&body, "url")
            .or_else(|| {
                card.get("url")
                    .and_then(Value::as_str)
                    .filter(|s| !s.is_empty())
            })
            .map(str::to_string);
        match url {
            Some(u) => Some(u),
            None => return Err(err(400, "url is required for push-mode workspaces")),
        }
    } else {
        None
    };
    if !ids::is_uuid(&id) {
        return Err(err(500, "registration failed"));
    }
    if !st.workspaces.contains_key(&id) {
        st.add_workspace(Workspace::new(&id, &id));
    }
    let Some(ws) = st.workspaces.get_mut(&id) else {
        return Err(err(500, "registration failed"));
    };
    ws.register_count += 1;
    ws.last_register = Some(Value::Object(body.clone()));
    if !FROZEN_STATUSES.contains(&ws.status.as_str()) {
        reconcile_card(&mut card, ws);
        ws.agent_card = Some(card);
        ws.delivery_mode.clone_from(&mode);
        ws.url = url;
        ws.status = "online".into();
        ws.last_heartbeat_us = Some(ids::now_us());
    }
    let secret = ws.inbound_secret.clone();
    let online = json!({"agent_card": ws.agent_card, "delivery_mode": mode, "url": ws.url});
    st.events.publish(&id, "WORKSPACE_ONLINE", online);
    let minted = if st.has_live_token(&id) {
        None
    } else {
        st.mint_token(&id)
    };
    let mut out = json!({
        "status": "registered",
        "delivery_mode": mode,
        "platform_inbound_secret": secret,
    });
    if let Some(t) = minted {
        out["auth_token"] = Value::from(t);
    }
    ok(&out)
}

fn heartbeat(app: &App, req: &Request) -> Handled {
    let bad = || err(400, "invalid request body");
    let body = json_object(&req.body).ok_or_else(bad)?;
    let id = str_field(&body, "workspace_id")
        .ok_or_else(bad)?
        .to_string();
    let mut st = app.store();
    registry_gate(&st, req, &id)?;
    let payload = Value::Object(body);
    match st.workspaces.get_mut(&id) {
        Some(ws) => {
            let task_before = ws.current_task.clone();
            ws.record_heartbeat(&payload);
            // The platform drains one queued A2A item per beat (§2.19).
            crate::tools::drain_one(&mut st, &id);
            let Some(ws) = st.workspaces.get_mut(&id) else {
                return Err(err(404, "workspace not found"));
            };
            let (active, uptime) = (ws.active_tasks, ws.uptime_seconds);
            let task_now = ws.current_task.clone();
            let frozen = FROZEN_STATUSES.contains(&ws.status.as_str());
            if ws.agent_card.is_none()
                && let Some(card) = payload.get("agent_card").filter(|c| !c.is_null())
            {
                ws.agent_card = Some(card.clone());
            }
            let answer = json!({
                "status": "ok",
                "generation": 1,
                "platform_inbound_secret": ws.inbound_secret,
            });
            if !frozen {
                // Every beat reaches our own stream: it is what keeps a healthy stream
                // talking (registry.go:1619-1645).
                if task_now != task_before {
                    let data = json!({"active_tasks": active, "current_task": task_now});
                    st.events.publish(&id, "TASK_UPDATED", data);
                }
                let data = json!({"active_tasks": active, "uptime_seconds": uptime});
                st.events.publish(&id, "WORKSPACE_HEARTBEAT", data);
            }
            ok(&answer)
        }
        None if !ids::is_uuid(&id) => Err(err(500, "failed to update")),
        None => ok(&json!({"status": "ok", "generation": 1})),
    }
}

fn update_card(app: &App, req: &Request) -> Handled {
    let bad = || err(400, "invalid request body");
    let body = json_object(&req.body).ok_or_else(bad)?;
    let id = str_field(&body, "workspace_id")
        .ok_or_else(bad)?
        .to_string();
    let card = body
        .get("agent_card")
        .filter(|c| !c.is_null())
        .ok_or_else(bad)?
        .clone();
    let mut st = app.store();
    registry_gate(&st, req, &id)?;
    match st.workspaces.get_mut(&id) {
        Some(ws) => ws.agent_card = Some(card),
        None if !ids::is_uuid(&id) => return Err(err(500, "failed to update card")),
        None => {}
    }
    ok(&json!({"status": "updated"}))
}

// ---------------------------------------------------------------- discovery

fn check_access(app: &App, req: &Request) -> Handled {
    let bad = || err(400, "invalid request body");
    let body = json_object(&req.body).ok_or_else(bad)?;
    let caller = str_field(&body, "caller_id").ok_or_else(bad)?;
    let target = str_field(&body, "target_id").ok_or_else(bad)?;
    let allowed = app.store().can_communicate(caller, target);
    ok(&json!({ "allowed": allowed }))
}

fn discover(app: &App, req: &Request, target: &str) -> Handled {
    let caller = req
        .header("x-workspace-id")
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .ok_or_else(|| err(400, "X-Workspace-ID header is required"))?;
    let st = app.store();
    discovery_auth(app, &st, req, caller)?;
    let ws = st
        .workspaces
        .get(target)
        .filter(|w| !w.is_removed())
        .ok_or_else(|| err(404, "workspace not found"))?;
    if !st.can_communicate(caller, target) {
        return Err(err(403, "not authorized to discover this workspace"));
    }
    ok(&json!({
        "id": ws.id,
        "url": ws.url.clone().unwrap_or_default(),
        "name": ws.name,
    }))
}

fn peers(app: &App, req: &Request, id: &str) -> Handled {
    let st = app.store();
    discovery_auth(app, &st, req, id)?;
    let me = st
        .workspaces
        .get(id)
        .ok_or_else(|| err(404, "workspace not found"))?;
    let q = req
        .query_param("q")
        .map(|s| s.to_lowercase())
        .filter(|s| !s.is_empty());
    let wanted = |w: &Workspace| {
        !w.is_removed()
            && w.id != id
            && q.as_deref().is_none_or(|q| {
                w.name.to_lowercase().contains(q)
                    || w.role.as_deref().unwrap_or("").to_lowercase().contains(q)
            })
    };
    let by_name =
        |v: &mut Vec<&Workspace>| v.sort_by(|a, b| a.name.cmp(&b.name).then(a.id.cmp(&b.id)));
    let mut siblings: Vec<&Workspace> = match me.parent_id.as_deref() {
        Some(p) => st
            .workspaces
            .values()
            .filter(|w| w.parent_id.as_deref() == Some(p) && wanted(w))
            .collect(),
        None => Vec::new(),
    };
    by_name(&mut siblings);
    let mut children: Vec<&Workspace> = st
        .workspaces
        .values()
        .filter(|w| w.parent_id.as_deref() == Some(id) && wanted(w))
        .collect();
    by_name(&mut children);
    let parent = me
        .parent_id
        .as_deref()
        .and_then(|p| st.workspaces.get(p))
        .filter(|w| wanted(w));
    let now = ids::now_us();
    let out: Vec<Value> = siblings
        .into_iter()
        .chain(children)
        .chain(parent)
        .map(|w| w.peer_json(now))
        .collect();
    ok(&Value::Array(out))
}

fn get_workspace(app: &App, req: &Request, id: &str) -> Handled {
    if !ids::is_uuid(id) {
        return Err(err(400, "invalid workspace ID"));
    }
    let st = app.store();
    let ws = st
        .workspaces
        .get(id)
        .ok_or_else(|| err(404, "workspace not found"))?;
    let include_removed = req.query_param("include_removed").as_deref() == Some("true");
    if ws.is_removed() && !include_removed {
        return Err(Response::json(
            410,
            &json!({
                "error": "workspace removed",
                "id": ws.id,
                "removed_at": ws.removed_us.map(ids::rfc3339),
                "hint": "Create a replacement workspace in Canvas, then open Settings → Workspace Tokens → + New Token",
            }),
        ));
    }
    ok(&ws.public_json(ids::now_us()))
}

fn rotate(app: &App, req: &Request, id: &str) -> Handled {
    let mut st = app.store();
    workspace_auth(app, &st, req, id)?;
    if !st.workspaces.contains_key(id) {
        return Err(err(404, "workspace not found"));
    }
    st.revoke_all(id);
    let token = st
        .mint_token(id)
        .ok_or_else(|| err(500, "failed to rotate token"))?;
    ok(&json!({ "auth_token": token }))
}

// ---------------------------------------------------------------- activity

const ACTIVITY_TYPES: [&str; 7] = [
    "a2a_send",
    "a2a_receive",
    "task_update",
    "agent_log",
    "skill_promotion",
    "memory_write",
    "error",
];
const MAX_SINCE_SECS: i64 = 30 * 24 * 3600;

/// Parse the `GET /activity` query (§2.4) against workspace `ws`.
fn activity_query(req: &Request, ws: &Workspace) -> Result<(ActivityQuery, bool), Response> {
    let pairs = req.query_pairs();
    let get = |k: &str| {
        pairs
            .iter()
            .find(|(n, _)| n == k)
            .map(|(_, v)| v.as_str())
            .filter(|v| !v.is_empty())
    };
    let mut q = ActivityQuery {
        activity_type: get("type").map(str::to_string),
        ..ActivityQuery::default()
    };
    q.source = match get("source") {
        None => None,
        Some("canvas") => Some(SourceFilter::Canvas),
        Some("agent") => Some(SourceFilter::Agent),
        Some(_) => return Err(err(400, "source must be 'canvas' or 'agent'")),
    };
    if let Some(p) = get("peer_id") {
        if !ids::is_uuid(p) {
            return Err(err(400, "peer_id must be a UUID"));
        }
        q.peer_id = Some(p.to_string());
    }
    q.limit = match get("limit").and_then(|l| l.parse::<i64>().ok()) {
        Some(n) if n > 0 => n.min(500) as usize,
        _ => 100,
    };
    let now = ids::now_us();
    if let Some(s) = get("since_secs") {
        match s.parse::<i64>() {
            Ok(n) if n > 0 => {
                q.since_us = Some(now - n.min(MAX_SINCE_SECS) * 1_000_000);
            }
            _ => return Err(err(400, "since_secs must be a positive integer")),
        }
    }
    if let Some(b) = get("before_ts") {
        q.before_us = Some(
            ids::parse_rfc3339(b)
                .ok_or_else(|| err(400, "before_ts must be an RFC 3339 timestamp"))?,
        );
    }
    if let Some(cursor) = get("since_id") {
        if !ids::is_uuid(cursor) {
            return Err(err(500, "cursor lookup failed"));
        }
        q.after_key = Some(ws.inbox.key_of(cursor).ok_or_else(|| {
            err(
                410,
                "since_id cursor not found (row may have been pruned or belongs to a different workspace); omit since_id to reset",
            )
        })?);
    }
    let peer_info = get("include").is_some_and(|v| v.split(',').any(|x| x.trim() == "peer_info"));
    Ok((q, peer_info))
}

/// `attachments` projection of `include=peer_info` (§2.4): file parts of the request.
fn attachments_of(row: &Row) -> Vec<Value> {
    let parts = row
        .request_body
        .as_ref()
        .and_then(|b| b.pointer("/params/message/parts"))
        .and_then(Value::as_array);
    let mut out = Vec::new();
    for p in parts.into_iter().flatten() {
        let kind = p
            .get("kind")
            .or_else(|| p.get("type"))
            .and_then(Value::as_str);
        if kind != Some("file") {
            continue;
        }
        let file = p.get("file").unwrap_or(&Value::Null);
        let mut a = Map::new();
        // The platform projection reads `mime_type` only (canvas writes `mimeType`).
        let mime = file.get("mime_type").and_then(Value::as_str);
        let k = match mime.and_then(|m| m.split('/').next()) {
            Some("image") => "image",
            Some("audio") => "audio",
            Some("video") => "video",
            _ => "file",
        };
        a.insert("kind".into(), Value::from(k));
        for key in ["uri", "name"] {
            if let Some(v) = file.get(key).and_then(Value::as_str) {
                a.insert(key.into(), Value::from(v));
            }
        }
        if let Some(m) = mime {
            a.insert("mime_type".into(), Value::from(m));
        }
        out.push(Value::Object(a));
    }
    out
}

fn activity(app: &App, req: &Request, id: &str) -> Handled {
    let st = app.store();
    workspace_auth(app, &st, req, id)?;
    let ws = st
        .workspaces
        .get(id)
        .ok_or_else(|| err(404, "workspace not found"))?;
    let (q, asked_peer_info) = activity_query(req, ws)?;
    let peer_info = asked_peer_info && !app.cfg.no_peer_info;
    let base = if peer_info {
        app.base_url(req)
    } else {
        String::new()
    };
    let rows: Vec<Value> = ws
        .inbox
        .query(&q)
        .into_iter()
        .map(|r| {
            let mut m = r.to_json();
            if peer_info {
                if let Some(src) = r.source_id.as_str() {
                    if let Some(p) = st.workspaces.get(src) {
                        m.insert("peer_name".into(), Value::from(p.name.as_str()));
                        if let Some(role) = p.role.as_deref().filter(|x| !x.is_empty()) {
                            m.insert("peer_role".into(), Value::from(role));
                        }
                    }
                    m.insert(
                        "agent_card_url".into(),
                        Value::from(format!("{base}/registry/discover/{src}")),
                    );
                }
                let att = attachments_of(r);
                if !att.is_empty() {
                    m.insert("attachments".into(), Value::Array(att));
                }
            }
            Value::Object(m)
        })
        .collect();
    ok(&Value::Array(rows))
}

fn ack(app: &App, req: &Request, id: &str) -> Handled {
    let mut st = app.store();
    workspace_auth(app, &st, req, id)?;
    let body = json_object(&req.body).unwrap_or_default();
    let n = match body.get("acked_seq") {
        Some(v) if v.is_i64() || v.is_u64() => v.as_i64().unwrap_or(i64::MAX),
        _ => return Err(err(400, "acked_seq is required")),
    };
    if n < 0 {
        return Err(err(400, "acked_seq must be >= 0"));
    }
    let ws = st
        .workspaces
        .get_mut(id)
        .ok_or_else(|| err(404, "workspace not found"))?;
    ws.acked_seq = ws.acked_seq.max(n);
    ws.acks.push_back((n, ids::now_ms()));
    if ws.acks.len() > 1000 {
        ws.acks.pop_front();
    }
    ok(&json!({ "last_acked_seq": ws.acked_seq }))
}

fn self_report(app: &App, req: &Request, id: &str) -> Handled {
    let mut st = app.store();
    workspace_auth(app, &st, req, id)?;
    let body = json_object(&req.body).ok_or_else(|| err(400, "invalid request body"))?;
    let kind = str_field(&body, "activity_type")
        .filter(|t| ACTIVITY_TYPES.contains(t))
        .ok_or_else(|| err(400, "invalid activity_type"))?;
    if let Some(src) = str_field(&body, "source_id")
        && src != id
    {
        return Err(err(403, "source_id must match authenticated workspace"));
    }
    if !st.workspaces.contains_key(id) {
        return Err(err(404, "workspace not found"));
    }
    let mut row = Row::new(id, kind);
    row.source_id = Value::from(id);
    row.target_id = opt_string(str_field(&body, "target_id"));
    row.method = opt_string(str_field(&body, "method"));
    row.summary = opt_string(str_field(&body, "summary"));
    row.status = Value::from(str_field(&body, "status").unwrap_or("ok"));
    row.error_detail = opt_string(str_field(&body, "error_detail"));
    row.duration_ms = body.get("duration_ms").cloned().unwrap_or(Value::Null);
    row.request_body = body
        .get("request_body")
        .or_else(|| body.get("metadata"))
        .filter(|v| !v.is_null())
        .cloned();
    row.response_body = body.get("response_body").filter(|v| !v.is_null()).cloned();
    let data = row.event_data();
    st.insert_row(id, row);
    st.events.publish(id, "ACTIVITY_LOGGED", data);
    ok(&json!({"status": "logged"}))
}

// ---------------------------------------------------------------- A2A proxy

/// `normalizeA2APayload` (§2.7.3): wrap, default messageId/role, content→parts,
/// part `type`→`kind`. Returns the envelope and its method ("" when absent).
pub fn normalize_envelope(body: &[u8]) -> Result<(Value, String), Response> {
    let Ok(Value::Object(mut payload)) = serde_json::from_slice::<Value>(body) else {
        return Err(err(400, "invalid JSON"));
    };
    if !payload.contains_key("jsonrpc") {
        let mut wrapped = Map::new();
        wrapped.insert("jsonrpc".into(), Value::from("2.0"));
        wrapped.insert("id".into(), Value::from(ids::new_uuid()));
        wrapped.insert(
            "method".into(),
            payload.remove("method").unwrap_or(Value::Null),
        );
        wrapped.insert(
            "params".into(),
            payload.remove("params").unwrap_or(Value::Null),
        );
        payload = wrapped;
    }
    if let Some(Value::Object(params)) = payload.get_mut("params")
        && let Some(Value::Object(msg)) = params.get_mut("message")
    {
        if !msg.contains_key("messageId") {
            msg.insert("messageId".into(), Value::from(ids::new_uuid()));
        }
        if !msg.contains_key("role") {
            msg.insert("role".into(), Value::from("user"));
        }
        if !msg.contains_key("parts") {
            match msg.remove("content") {
                Some(Value::String(s)) => {
                    msg.insert("parts".into(), json!([{"kind": "text", "text": s}]));
                }
                Some(Value::Array(a)) => {
                    msg.insert("parts".into(), Value::Array(a));
                }
                Some(_) => {
                    return Err(Response::json(
                        400,
                        &json!({
                            "error": "invalid params.message.content type",
                            "hint": "content must be a string (v0.2 compat) or omitted in favour of parts (v0.3)",
                        }),
                    ));
                }
                None => {
                    return Err(Response::json(
                        400,
                        &json!({
                            "error": "params.message must contain either 'parts' (v0.3) or 'content' (v0.2 compat)",
                            "hint": "v0.3 example: {\"parts\":[{\"kind\":\"text\",\"text\":\"...\"}]}",
                        }),
                    ));
                }
            }
        }
        if let Some(Value::Array(parts)) = msg.get_mut("parts") {
            for part in parts.iter_mut() {
                if let Value::Object(p) = part
                    && !p.contains_key("kind")
                    && let Some(t) = p.remove("type")
                {
                    p.insert("kind".into(), t);
                }
            }
        }
    }
    let method = payload
        .get("method")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    Ok((Value::Object(payload), method))
}

/// Canvas-class caller: identity metadata and a per-workspace contextId (§2.7.3).
pub fn inject_canvas(env: &mut Value, method: &str, context_id: &str, identity: &Value) {
    let Some(params) = env.get_mut("params").and_then(Value::as_object_mut) else {
        return;
    };
    if method == "message/send"
        && let Some(Value::Object(msg)) = params.get_mut("message")
        && !msg.contains_key("contextId")
    {
        msg.insert("contextId".into(), Value::from(context_id));
    }
    let meta = params
        .entry("metadata")
        .or_insert_with(|| Value::Object(Map::new()));
    if !meta.is_object() {
        *meta = Value::Object(Map::new());
    }
    if let (Some(m), Some(id)) = (meta.as_object_mut(), identity.as_object()) {
        for (k, v) in id {
            m.insert(k.clone(), v.clone());
        }
    }
}

fn message_id_of(env: &Value) -> Option<String> {
    match env.pointer("/params/message/messageId")? {
        Value::String(s) => Some(s.clone()),
        Value::Null => None,
        other => Some(other.to_string()),
    }
}

/// What happened to a delivered envelope.
#[derive(Debug)]
pub enum Delivery {
    /// Poll target: the inbox row was written (or already existed).
    Queued,
    /// Push target: the scripted reply, if any.
    Push(Option<PushReply>),
}

/// Deliver a normalised envelope from `caller` (None = canvas-class) to `target`,
/// as the proxy does after its checks: log the row and record it for the admin API.
/// The caller has verified that `target` exists.
pub fn deliver(
    st: &mut Store,
    caller: Option<&str>,
    target: &str,
    env: Value,
    method: &str,
) -> Delivery {
    let message_id = message_id_of(&env);
    let Some(ws) = st.workspaces.get(target) else {
        return Delivery::Push(None);
    };
    let poll = ws.delivery_mode == "poll";
    let name = ws.name.clone();
    let push_reply = ws.push_reply.clone();
    let mut duplicate = false;
    if poll || method == "message/send" {
        let mut row = Row::new(target, "a2a_receive");
        row.source_id = opt_string(caller);
        row.target_id = Value::from(target);
        row.method = if method.is_empty() {
            Value::Null
        } else {
            Value::from(method)
        };
        row.summary = Value::from(if poll {
            format!("{method} → {name} (queued for poll)")
        } else {
            format!("{method} → {name}")
        });
        row.request_body = Some(env.clone());
        row.message_id.clone_from(&message_id);
        if let Some((_, dup)) = st.insert_inbound(target, row) {
            duplicate = dup;
        }
    }
    let Some(ws) = st.workspaces.get_mut(target) else {
        return Delivery::Push(None);
    };
    if !poll && let Some(m) = &message_id {
        duplicate = !ws.received_ids.insert(m.clone());
    } else if let Some(m) = &message_id {
        ws.received_ids.insert(m.clone());
    }
    let rec = Received {
        seq: ws.received.len() as u64 + 1,
        from: caller.map(str::to_string),
        method: method.to_string(),
        message_id,
        text: message_text(&env),
        metadata: env
            .pointer("/params/message/metadata")
            .cloned()
            .unwrap_or(Value::Null),
        body: env,
        duplicate,
        at_ms: ids::now_ms(),
    };
    ws.received.push(rec);
    if poll {
        Delivery::Queued
    } else {
        Delivery::Push(push_reply)
    }
}

fn a2a(app: &Arc<App>, req: &Request, target: &str) -> Handled {
    if req.body.len() > A2A_MAX_BODY {
        return Err(too_large(&req.path, req.body.len() as u64));
    }
    let claim = req
        .header("x-workspace-id")
        .map(str::trim)
        .filter(|s| !s.is_empty());
    if let Some(c) = claim
        && ["webhook:", "system:", "test:", "channel:"]
            .iter()
            .any(|p| c.starts_with(p))
    {
        return Err(err(403, "invalid caller ID"));
    }
    let token = bearer(req).ok_or_else(|| err(401, "missing caller auth token"))?;
    let mut st = app.store();
    let caller: Option<String> = if is_admin(app, token) {
        None
    } else {
        let owner = st
            .token_owner(token)
            .ok_or_else(|| err(401, "invalid caller auth token"))?;
        if claim.is_some_and(|c| c != owner) {
            return Err(err(401, "caller ID does not match workspace auth token"));
        }
        Some(owner.to_string())
    };
    let context_id = match st.workspaces.get(target).filter(|w| !w.is_removed()) {
        Some(w) => w.context_id.clone(),
        None => return Err(err(404, "workspace not found")),
    };
    if let Some(c) = caller.as_deref()
        && !st.can_communicate(c, target)
    {
        return Err(err(
            403,
            "access denied: workspaces cannot communicate per hierarchy rules",
        ));
    }
    let (mut env, method) = normalize_envelope(&req.body)?;
    if caller.is_none() {
        let identity = json!({
            "source": "canvas_user",
            "user_identity_status": "UNAUTHENTICATED",
            "user_id": "",
            "email": "",
            "username": "",
        });
        inject_canvas(&mut env, &method, &context_id, &identity);
    }
    match deliver(&mut st, caller.as_deref(), target, env, &method) {
        Delivery::Queued => ok(&json!({
            "status": "queued",
            "delivery_mode": "poll",
            "method": method,
        })),
        Delivery::Push(None) => Err(err(502, "failed to reach workspace agent")),
        Delivery::Push(Some(reply)) => {
            drop(st);
            if reply.delay_ms > 0 {
                std::thread::sleep(Duration::from_millis(reply.delay_ms));
            }
            Ok(Response::json(reply.status, &reply.body))
        }
    }
}

// ---------------------------------------------------------------- events

/// `GET /workspaces/:id/events/stream` (§2.17): checks, then hands the connection a
/// subscription; `server` turns it into the SSE answer.
fn event_stream(app: &App, req: &Request, id: &str) -> Handled {
    let mut st = app.store();
    workspace_auth(app, &st, req, id)?;
    if !st.events.offers_stream(id) {
        // An older server without the route (gin's own 404 body).
        return Err(err(404, "404 page not found"));
    }
    if !st.workspaces.contains_key(id) {
        return Err(err(404, "workspace not found"));
    }
    let mut resp = Response::empty(200);
    resp.stream = Some(st.events.subscribe(id));
    Ok(resp)
}

// ---------------------------------------------------------------- notify

fn notify(app: &App, req: &Request, id: &str) -> Handled {
    let mut st = app.store();
    workspace_auth(app, &st, req, id)?;
    let body = json_object(&req.body).ok_or_else(|| err(400, "message is required"))?;
    let message = str_field(&body, "message")
        .ok_or_else(|| err(400, "message is required"))?
        .to_string();
    let attachments = match body.get("attachments") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(a)) => a.clone(),
        Some(_) => return Err(err(400, "invalid request body")),
    };
    for (i, a) in attachments.iter().enumerate() {
        let has = |k: &str| {
            a.get(k)
                .and_then(Value::as_str)
                .is_some_and(|s| !s.is_empty())
        };
        if !has("uri") || !has("name") {
            return Err(err(
                400,
                &format!("attachment[{i}]: uri and name are required"),
            ));
        }
    }
    let ws = st
        .workspaces
        .get(id)
        .ok_or_else(|| err(404, "workspace not found"))?;
    if !ws.talk_to_user_enabled {
        return Err(Response::json(
            403,
            &json!({
                "error": "talk_to_user_disabled",
                "hint": "This workspace is not allowed to send messages directly to the user. Forward your update to a parent workspace using delegate_task — they may be able to reach the user.",
            }),
        ));
    }
    let mut response_body = json!({ "result": message });
    if !attachments.is_empty() {
        let parts: Vec<Value> = attachments
            .iter()
            .map(|a| {
                let mut f = Map::new();
                for k in ["name", "mimeType", "uri", "size"] {
                    if let Some(v) = a.get(k) {
                        f.insert(k.into(), v.clone());
                    }
                }
                json!({"kind": "file", "file": f})
            })
            .collect();
        response_body["parts"] = Value::Array(parts);
    }
    let mut row = Row::new(id, "a2a_receive");
    row.method = Value::from("notify");
    row.summary = Value::from(truncate(&message, 200));
    row.response_body = Some(response_body);
    st.insert_row(id, row);
    // The echo row is inserted directly: AGENT_MESSAGE only, no ACTIVITY_LOGGED.
    let name = st
        .workspaces
        .get(id)
        .map(|w| w.name.clone())
        .unwrap_or_default();
    let mut data = json!({"message": message, "name": name, "workspace_id": id});
    if !attachments.is_empty() {
        data["attachments"] = Value::Array(attachments.clone());
    }
    st.events.publish(id, "AGENT_MESSAGE", data);
    if let Some(ws) = st.workspaces.get_mut(id) {
        ws.notifies.push(NotifyRec {
            message,
            attachments: Value::Array(attachments),
            at_ms: ids::now_ms(),
        });
    }
    ok(&json!({"status": "sent"}))
}

// ---------------------------------------------------------------- delegations

/// Answer text of a push agent's JSON-RPC response (a2aresp/extract.go order).
fn reply_text(body: &Value) -> String {
    let result = body.get("result").unwrap_or(&Value::Null);
    let candidates = [
        result.get("parts"),
        result
            .get("artifacts")
            .and_then(|a| a.get(0))
            .and_then(|a| a.get("parts")),
        result.pointer("/status/message/parts"),
        result.pointer("/message/parts"),
    ];
    for parts in candidates.into_iter().flatten() {
        let env = json!({"params": {"message": {"parts": parts}}});
        let text = message_text(&env);
        if !text.is_empty() {
            return text;
        }
    }
    match body {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Apply a push agent's scripted answer to delegation `did`.
fn finish_push_delegation(app: &App, did: &str, reply: &PushReply) {
    let push = app.cfg.delegation_result_push;
    let mut st = app.store();
    if (200..300).contains(&reply.status) {
        let text = reply_text(&reply.body);
        st.set_delegation_status(did, "completed", Some(&text), None, push);
    } else {
        let error = reply
            .body
            .get("error")
            .and_then(Value::as_str)
            .map(str::to_string)
            .unwrap_or_else(|| format!("agent returned HTTP {}", reply.status));
        st.set_delegation_status(did, "failed", None, Some(&error), push);
    }
}

fn delegate(app: &Arc<App>, req: &Request, id: &str) -> Handled {
    let mut st = app.store();
    // WorkspaceAuth already binds a per-workspace token to `:id` (401 otherwise), so the
    // platform's 403 "source workspace does not match authenticated identity" cannot
    // trigger here; the admin token may act for any workspace.
    workspace_auth(app, &st, req, id)?;
    let bad = || err(400, "invalid delegation request");
    let body = json_object(&req.body).ok_or_else(bad)?;
    let target = str_field(&body, "target_id").ok_or_else(bad)?.to_string();
    let task = str_field(&body, "task").ok_or_else(bad)?.to_string();
    if !ids::is_uuid(&target) {
        return Err(err(400, "target_id must be a valid UUID"));
    }
    if target == id {
        return Err(Response::json(
            400,
            &json!({
                "error": "self-delegation not permitted",
                "reason": "target_id is the delegating workspace itself",
                "hint": "Delegate to a peer or child workspace, or handle the task directly.",
            }),
        ));
    }
    if !st.workspaces.contains_key(id) {
        return Err(err(404, "workspace not found"));
    }
    let key = str_field(&body, "idempotency_key").map(|k| (id.to_string(), k.to_string()));
    if let Some(k) = &key
        && let Some(existing) = st.idempotency.get(k).cloned()
    {
        match st.delegations.get(&existing) {
            Some(d) if d.status != "failed" => {
                return Ok(Response::json(
                    200,
                    &json!({
                        "delegation_id": d.id,
                        "status": d.status,
                        "target_id": d.target_id,
                        "idempotent_hit": true,
                    }),
                ));
            }
            _ => {
                st.delegations.remove(&existing);
                st.idempotency.remove(k);
            }
        }
    }
    let did = ids::new_uuid();
    let now = ids::now_us();
    let order = st.next_order();
    st.delegations.insert(
        did.clone(),
        Delegation {
            id: did.clone(),
            source_id: id.to_string(),
            target_id: target.clone(),
            task: task.clone(),
            status: "pending".into(),
            created_us: now,
            updated_us: now,
            order,
            response_preview: None,
            error: None,
            idempotency_key: key.as_ref().map(|k| k.1.clone()),
        },
    );
    if let Some(k) = key {
        st.idempotency.insert(k, did.clone());
    }
    st.announce_delegation(id, &did, &target, &task);
    let push = app.cfg.delegation_result_push;
    let target_live = st.workspaces.get(&target).is_some_and(|w| !w.is_removed());
    if !target_live {
        st.set_delegation_status(&did, "failed", None, Some("workspace not found"), push);
    } else if !st.can_communicate(id, &target) {
        st.set_delegation_status(
            &did,
            "failed",
            None,
            Some("access denied: workspaces cannot communicate per hierarchy rules"),
            push,
        );
    } else {
        let env = json!({
            "jsonrpc": "2.0",
            "id": ids::new_uuid(),
            "method": "message/send",
            "params": {"message": {
                "role": "user",
                "messageId": did,
                "parts": [{"kind": "text", "text": task}],
                "metadata": {"delegation_id": did},
            }},
        });
        match deliver(&mut st, Some(id), &target, env, "message/send") {
            // The real platform marks a poll-mode delegation `completed` at once because
            // its proxy answers 200 `queued` (§2.7.6). We deliberately do not copy that
            // quirk: the task is in the target's inbox, so it is `dispatched`.
            Delivery::Queued => {
                st.set_delegation_status(&did, "dispatched", None, None, push);
            }
            Delivery::Push(None) => {
                st.set_delegation_status(
                    &did,
                    "failed",
                    None,
                    Some("failed to reach workspace agent"),
                    push,
                );
            }
            Delivery::Push(Some(reply)) => {
                st.set_delegation_status(&did, "dispatched", None, None, push);
                if reply.delay_ms > 0 {
                    let app2 = Arc::clone(app);
                    let did2 = did.clone();
                    std::thread::spawn(move || {
                        std::thread::sleep(Duration::from_millis(reply.delay_ms));
                        finish_push_delegation(&app2, &did2, &reply);
                    });
                } else {
                    drop(st);
                    finish_push_delegation(app, &did, &reply);
                }
            }
        }
    }
    Ok(Response::json(
        202,
        &json!({"delegation_id": did, "status": "delegated", "target_id": target}),
    ))
}

fn delegations(app: &App, req: &Request, id: &str) -> Handled {
    let st = app.store();
    workspace_auth(app, &st, req, id)?;
    let status = req.query_param("status").filter(|s| !s.is_empty());
    let mut list: Vec<&Delegation> = st
        .delegations
        .values()
        .filter(|d| d.source_id == id || d.target_id == id)
        .filter(|d| status.as_deref().is_none_or(|s| d.status == s))
        .collect();
    list.sort_by_key(|d| std::cmp::Reverse((d.created_us, d.order)));
    let out: Vec<Value> = list
        .into_iter()
        .take(50)
        .map(|d| d.ledger_json(id))
        .collect();
    ok(&Value::Array(out))
}

fn record_delegation(app: &App, req: &Request, id: &str) -> Handled {
    let mut st = app.store();
    workspace_auth(app, &st, req, id)?;
    let bad = || err(400, "invalid request body");
    let body = json_object(&req.body).ok_or_else(bad)?;
    let target = str_field(&body, "target_id").ok_or_else(bad)?.to_string();
    let task = str_field(&body, "task").ok_or_else(bad)?.to_string();
    let did = str_field(&body, "delegation_id")
        .ok_or_else(bad)?
        .to_string();
    if !ids::is_uuid(&target) {
        return Err(err(400, "target_id must be a valid UUID"));
    }
    if !st.delegations.contains_key(&did) {
        st.announce_delegation(id, &did, &target, &task);
        let now = ids::now_us();
        let order = st.next_order();
        st.delegations.insert(
            did.clone(),
            Delegation {
                id: did.clone(),
                source_id: id.to_string(),
                target_id: target,
                task,
                status: "dispatched".into(),
                created_us: now,
                updated_us: now,
                order,
                response_preview: None,
                error: None,
                idempotency_key: None,
            },
        );
    }
    Ok(Response::json(
        202,
        &json!({"delegation_id": did, "status": "recorded"}),
    ))
}

fn update_delegation(app: &App, req: &Request, id: &str, did: &str) -> Handled {
    let mut st = app.store();
    workspace_auth(app, &st, req, id)?;
    let body = json_object(&req.body).ok_or_else(|| err(400, "invalid request body"))?;
    let status = match str_field(&body, "status") {
        Some(s @ ("completed" | "failed")) => s.to_string(),
        _ => return Err(err(400, "status must be one of: completed, failed")),
    };
    if st.delegations.get(did).is_none_or(|d| d.source_id != id) {
        return Err(err(404, "delegation not found"));
    }
    let preview = str_field(&body, "response_preview").map(str::to_string);
    let error = str_field(&body, "error").map(str::to_string);
    st.set_delegation_status(
        did,
        &status,
        preview.as_deref(),
        error.as_deref(),
        app.cfg.delegation_result_push,
    );
    ok(&json!({"status": status, "delegation_id": did}))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classify_routes() {
        assert_eq!(classify("GET", "/health"), Route::Health);
        assert_eq!(
            classify("GET", "/workspaces/abc/activity"),
            Route::Activity("abc")
        );
        assert_eq!(
            classify("POST", "/workspaces/abc/activity"),
            Route::SelfReport("abc")
        );
        assert_eq!(
            classify("POST", "/workspaces/a/delegations/d/update"),
            Route::UpdateDelegation("a", "d")
        );
        assert_eq!(classify("GET", "/registry/x/peers"), Route::Peers("x"));
        assert_eq!(
            classify("GET", "/registry/discover/x"),
            Route::Discover("x")
        );
        assert_eq!(classify("DELETE", "/health"), Route::NotFound);
        assert_eq!(classify("GET", "/workspaces/a/activity/"), Route::NotFound);
        assert_eq!(classify("GET", "/"), Route::NotFound);
        assert_eq!(
            Route::UpdateDelegation("a", "d").template(),
            "/workspaces/:id/delegations/:did/update"
        );
    }

    fn norm(v: Value) -> Value {
        normalize_envelope(v.to_string().as_bytes()).unwrap().0
    }

    #[test]
    fn normalise_wraps_and_defaults() {
        let env = norm(json!({"method": "message/send", "extra": 1,
            "params": {"message": {"content": "hi"}}}));
        assert_eq!(env["jsonrpc"], "2.0");
        assert!(ids::is_uuid(env["id"].as_str().unwrap()));
        assert!(
            env.get("extra").is_none(),
            "other top-level keys are dropped"
        );
        let msg = &env["params"]["message"];
        assert_eq!(msg["role"], "user");
        assert!(ids::is_uuid(msg["messageId"].as_str().unwrap()));
        assert_eq!(msg["parts"], json!([{"kind": "text", "text": "hi"}]));
        assert!(msg.get("content").is_none());
    }

    #[test]
    fn normalise_keeps_and_renames() {
        let env = norm(json!({"jsonrpc": "2.0", "id": 7, "method": "message/send",
            "params": {"message": {"role": "assistant", "messageId": "m1",
                "parts": [{"type": "text", "text": "a"}, {"kind": "text", "type": "x", "text": "b"}],
                "metadata": {"in_reply_to": "z"}}}}));
        let msg = &env["params"]["message"];
        assert_eq!(env["id"], 7);
        assert_eq!(msg["role"], "assistant", "role is never validated");
        assert_eq!(msg["messageId"], "m1");
        assert_eq!(msg["parts"][0], json!({"kind": "text", "text": "a"}));
        assert_eq!(
            msg["parts"][1],
            json!({"kind": "text", "type": "x", "text": "b"})
        );
        assert_eq!(msg["metadata"]["in_reply_to"], "z");
        // content array becomes parts as-is
        let env = norm(json!({"jsonrpc": "2.0", "method": "message/send",
            "params": {"message": {"content": [{"type": "text", "text": "c"}]}}}));
        assert_eq!(
            env["params"]["message"]["parts"],
            json!([{"kind": "text", "text": "c"}])
        );
        // no message at all (e.g. tasks/get) passes through
        let (env, method) =
            normalize_envelope(br#"{"jsonrpc":"2.0","method":"tasks/get","params":{"id":"t"}}"#)
                .unwrap();
        assert_eq!(method, "tasks/get");
        assert_eq!(env["params"], json!({"id": "t"}));
    }

    #[test]
    fn normalise_rejects() {
        for body in [&b"not json"[..], b"[1,2]", b"\"s\"", b"null"] {
            let e = normalize_envelope(body).unwrap_err();
            assert_eq!(
                (e.status, String::from_utf8_lossy(&e.body).into_owned()),
                (400, r#"{"error":"invalid JSON"}"#.to_string())
            );
        }
        let e = normalize_envelope(
            br#"{"method":"message/send","params":{"message":{"role":"user"}}}"#,
        )
        .unwrap_err();
        assert_eq!(e.status, 400);
        assert!(String::from_utf8_lossy(&e.body).contains("must contain either 'parts'"));
        let e =
            normalize_envelope(br#"{"method":"message/send","params":{"message":{"content":5}}}"#)
                .unwrap_err();
        assert!(String::from_utf8_lossy(&e.body).contains("invalid params.message.content type"));
    }

    #[test]
    fn canvas_injection() {
        let mut env = norm(
            json!({"method": "message/send", "params": {"message": {"parts": []},
            "metadata": {"keep": 1}}}),
        );
        inject_canvas(
            &mut env,
            "message/send",
            "ctx",
            &json!({"source": "canvas_user"}),
        );
        assert_eq!(env["params"]["message"]["contextId"], "ctx");
        assert_eq!(
            env["params"]["metadata"],
            json!({"keep": 1, "source": "canvas_user"})
        );
    }

    fn store_with_poll_target() -> Store {
        let mut st = Store::default();
        let mut w = Workspace::new("t", "target");
        w.delivery_mode = "poll".into();
        st.add_workspace(w);
        st
    }

    #[test]
    fn deliver_dedupes_by_message_id() {
        let mut st = store_with_poll_target();
        let env = norm(json!({"method": "message/send",
            "params": {"message": {"messageId": "m1", "parts": [{"kind": "text", "text": "x"}]}}}));
        let first = deliver(&mut st, Some("c"), "t", env.clone(), "message/send");
        let second = deliver(&mut st, Some("c"), "t", env, "message/send");
        assert!(matches!(
            (first, second),
            (Delivery::Queued, Delivery::Queued)
        ));
        let ws = &st.workspaces["t"];
        assert!(!ws.received[0].duplicate);
        assert_eq!(ws.inbox.len(), 1);
        assert_eq!(ws.received.len(), 2);
        assert!(ws.received[1].duplicate);
        let row = &ws.inbox.rows()[0];
        assert_eq!(row.summary, "message/send → target (queued for poll)");
        assert_eq!(row.source_id, "c");
        assert!(row.response_body.is_none());
    }

    #[test]
    fn reply_text_extraction() {
        assert_eq!(
            reply_text(&json!({"result": {"parts": [{"kind": "text", "text": "a"}]}})),
            "a"
        );
        assert_eq!(
            reply_text(
                &json!({"result": {"artifacts": [{"parts": [{"type": "text", "text": "b"}]}]}})
            ),
            "b"
        );
        assert_eq!(
            reply_text(
                &json!({"result": {"status": {"message": {"parts": [{"kind": "text", "text": "c"}]}}}})
            ),
            "c"
        );
        assert_eq!(reply_text(&json!("plain")), "plain");
    }

    mod handlers {
        use super::super::*;
        use crate::server::Config;

        struct Fixture {
            app: Arc<App>,
            a: (String, String),
            b: (String, String),
            other: (String, String),
        }

        fn ws(st: &mut Store, parent: Option<&str>, mode: &str) -> (String, String) {
            let id = ids::new_uuid();
            let mut w = Workspace::new(&id, "w");
            w.parent_id = parent.map(str::to_string);
            w.delivery_mode = mode.into();
            st.add_workspace(w);
            let tok = st.mint_token(&id).unwrap();
            (id, tok)
        }

        fn fixture() -> Fixture {
            let app = Arc::new(App::new(Config::default()));
            let (a, b, other) = {
                let mut st = app.store();
                let root = ws(&mut st, None, "push");
                let a = ws(&mut st, Some(&root.0), "poll");
                let b = ws(&mut st, Some(&root.0), "poll");
                let other = ws(&mut st, None, "poll");
                (a, b, other)
            };
            Fixture { app, a, b, other }
        }

        fn call(
            app: &Arc<App>,
            method: &str,
            path_q: &str,
            headers: &[(&str, &str)],
            body: &str,
        ) -> (u16, Value) {
            let (path, query) = path_q.split_once('?').unwrap_or((path_q, ""));
            let req = Request {
                method: method.into(),
                path: path.into(),
                query: query.into(),
                http11: true,
                headers: headers
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
                body: body.as_bytes().to_vec(),
                ..Request::default()
            };
            let resp = handle(app, &req, &classify(method, path));
            (
                resp.status,
                serde_json::from_slice(&resp.body).unwrap_or(Value::Null),
            )
        }

        #[test]
        fn activity_cursor_errors_and_order() {
            let f = fixture();
            let bearer = format!("Bearer {}", f.a.1);
            let auth = [("authorization", bearer.as_str())];
            let base = format!("/workspaces/{}/activity", f.a.0);
            let send = |text: &str| {
                let b = format!("Bearer {}", f.b.1);
                let body = json!({"params": {"message": {"parts": [{"kind": "text", "text": text}]}}, "method": "message/send"});
                call(
                    &f.app,
                    "POST",
                    &format!("/workspaces/{}/a2a", f.a.0),
                    &[("authorization", &b)],
                    &body.to_string(),
                )
            };
            assert_eq!(send("one").0, 200);
            assert_eq!(send("two").0, 200);
            let (s, rows) = call(&f.app, "GET", &base, &auth, "");
            assert_eq!(s, 200);
            let rows = rows.as_array().unwrap().clone();
            assert_eq!(rows.len(), 2);
            assert_eq!(
                rows[0]["request_body"]["params"]["message"]["parts"][0]["text"], "two",
                "newest first"
            );
            assert_eq!(rows[0]["source_id"], f.b.0.as_str());
            assert!(rows[0].get("response_body").is_none());
            let oldest = rows[1]["id"].as_str().unwrap();
            let (s, after) = call(
                &f.app,
                "GET",
                &format!("{base}?since_id={oldest}"),
                &auth,
                "",
            );
            assert_eq!(s, 200);
            assert_eq!(after.as_array().unwrap().len(), 1);
            assert_eq!(after[0]["id"], rows[0]["id"]);
            let (s, e) = call(&f.app, "GET", &format!("{base}?since_id=act-1"), &auth, "");
            assert_eq!((s, e), (500, json!({"error": "cursor lookup failed"})));
            let (s, e) = call(
                &f.app,
                "GET",
                &format!("{base}?since_id={}", ids::new_uuid()),
                &auth,
                "",
            );
            assert_eq!(s, 410);
            assert_eq!(
                e,
                json!({"error": "since_id cursor not found (row may have been pruned or belongs to a different workspace); omit since_id to reset"})
            );
            assert_eq!(
                call(&f.app, "GET", &format!("{base}?since_secs=0"), &auth, "").0,
                400
            );
            assert_eq!(
                call(&f.app, "GET", &format!("{base}?source=x"), &auth, "").0,
                400
            );
            assert_eq!(
                call(&f.app, "GET", &format!("{base}?peer_id=x"), &auth, "").0,
                400
            );
            let (s, v) = call(
                &f.app,
                "GET",
                &format!("{base}?limit=junk&source=agent&include=peer_info"),
                &auth,
                "",
            );
            assert_eq!(s, 200);
            assert_eq!(v[0]["peer_name"], "w");
            let (s, e) = call(&f.app, "GET", &base, &[], "");
            assert_eq!(
                (s, e),
                (401, json!({"error": "missing workspace auth token"}))
            );
            let wrong = format!("Bearer {}", f.b.1);
            let (s, e) = call(&f.app, "GET", &base, &[("authorization", &wrong)], "");
            assert_eq!(
                (s, e),
                (401, json!({"error": "invalid workspace auth token"}))
            );
        }

        #[test]
        fn a2a_caller_auth() {
            let f = fixture();
            let path = format!("/workspaces/{}/a2a", f.a.0);
            let body =
                r#"{"method":"message/send","params":{"message":{"messageId":"m","parts":[]}}}"#;
            let b = format!("Bearer {}", f.b.1);
            let o = format!("Bearer {}", f.other.1);
            type Headers<'a> = Vec<(&'a str, &'a str)>;
            let cases: Vec<(Headers, u16, &str)> = vec![
                (
                    vec![("x-workspace-id", "system:x"), ("authorization", &b)],
                    403,
                    "invalid caller ID",
                ),
                (vec![], 401, "missing caller auth token"),
                (
                    vec![("authorization", "Bearer nope")],
                    401,
                    "invalid caller auth token",
                ),
                (
                    vec![("authorization", &b), ("x-workspace-id", &f.other.0)],
                    401,
                    "caller ID does not match workspace auth token",
                ),
                (
                    vec![("authorization", &o)],
                    403,
                    "access denied: workspaces cannot communicate per hierarchy rules",
                ),
            ];
            for (headers, status, msg) in cases {
                let (s, v) = call(&f.app, "POST", &path, &headers, body);
                assert_eq!((s, v), (status, json!({"error": msg})));
            }
            let (s, v) = call(
                &f.app,
                "POST",
                &format!("/workspaces/{}/a2a", ids::new_uuid()),
                &[("authorization", &b)],
                body,
            );
            assert_eq!((s, v), (404, json!({"error": "workspace not found"})));
            let (s, _) = call(&f.app, "POST", &path, &[("authorization", &b)], "{");
            assert_eq!(s, 400);
            let ok = json!({"status": "queued", "delivery_mode": "poll", "method": "message/send"});
            assert_eq!(
                call(&f.app, "POST", &path, &[("authorization", &b)], body),
                (200, ok.clone())
            );
            assert_eq!(
                call(&f.app, "POST", &path, &[("authorization", &b)], body),
                (200, ok)
            );
            let st = f.app.store();
            assert_eq!(st.workspaces[&f.a.0].inbox.len(), 1, "deduped by messageId");
            assert_eq!(st.workspaces[&f.a.0].received.len(), 2);
        }
    }
}
