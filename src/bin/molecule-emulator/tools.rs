//! The platform tools an agent uses besides messaging (PLATFORM_API.md §2.16, §2.18–
//! §2.21): chat uploads and pending-upload fetches, memories (v1 write, v2 search,
//! namespaces, delete, with the plugin switch and secret redaction), the requests
//! inbox with its human routes and queued answer turns (drained one per heartbeat),
//! broadcasts, and `/chat-history`. Admin: `/_admin/tools`, `/_admin/requests`,
//! `/_admin/workspaces/:id/abilities`, `/_admin/workspaces/:id/rows_at`.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;

use serde_json::{Map, Value, json};

use crate::http::{Request, Response};
use crate::ids;
use crate::routes::{bearer, is_admin, workspace_auth};
use crate::server::App;
use crate::store::{Row, Store};

type Handled = Result<Response, Response>;

fn ok(status: u16, v: Value) -> Handled {
    Ok(Response::json(status, &v))
}

fn err(status: u16, msg: &str) -> Response {
    Response::error(status, msg)
}

/// Everything this module keeps, inside the one store lock.
#[derive(Debug, Default)]
pub struct Tools {
    /// `MEMORY_PLUGIN_URL` unset: every memory route answers 503.
    pub memory_plugin_off: bool,
    memories: Vec<Memory>,
    requests: HashMap<String, Req>,
    order: u64,
    /// Answer turns waiting in the A2A queue, per requester workspace.
    queued: HashMap<String, VecDeque<Value>>,
    uploads: HashMap<String, Upload>,
    /// Workspaces whose `broadcast_enabled` ability an admin switched on.
    broadcast: HashSet<String>,
}

#[derive(Debug, Clone)]
struct Memory {
    id: String,
    namespace: String,
    content: String,
    created_us: i64,
}

#[derive(Debug, Clone)]
struct Req {
    row: Map<String, Value>,
    messages: Vec<Value>,
    order: u64,
}

#[derive(Debug, Clone)]
struct Upload {
    workspace_id: String,
    name: String,
    mime: String,
    bytes: Vec<u8>,
}

/// A classified tool route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ToolRoute<'a> {
    MemoryWrite(&'a str),
    MemoryList(&'a str),
    Namespaces(&'a str),
    MemorySearch(&'a str),
    MemoryDelete(&'a str, &'a str),
    RequestCreate(&'a str),
    RequestList(&'a str),
    RequestInbox(&'a str),
    RequestShow(&'a str, &'a str),
    RequestAct(&'a str, &'a str, &'a str),
    HumanPending,
    HumanShow(&'a str),
    HumanAct(&'a str, &'a str),
    Broadcast(&'a str),
    Upload(&'a str),
    UploadContent(&'a str, &'a str),
    UploadAck(&'a str, &'a str),
    ChatHistory(&'a str),
    UploadLimits,
}

/// Map method + path segments to a tool route.
pub fn classify<'a>(method: &str, segs: &[&'a str]) -> Option<ToolRoute<'a>> {
    use ToolRoute::*;
    Some(match (method, segs) {
        ("POST", ["workspaces", id, "memories"]) => MemoryWrite(id),
        ("GET", ["workspaces", id, "memories"]) => MemoryList(id),
        ("GET", ["workspaces", id, "v2", "namespaces"]) => Namespaces(id),
        ("GET", ["workspaces", id, "v2", "memories"]) => MemorySearch(id),
        ("DELETE", ["workspaces", id, "v2", "memories", mid]) => MemoryDelete(id, mid),
        ("POST", ["workspaces", id, "requests"]) => RequestCreate(id),
        ("GET", ["workspaces", id, "requests"]) => RequestList(id),
        ("GET", ["workspaces", id, "requests", "inbox"]) => RequestInbox(id),
        ("GET", ["workspaces", id, "requests", rid]) => RequestShow(id, rid),
        (
            "POST",
            [
                "workspaces",
                id,
                "requests",
                rid,
                act @ ("respond" | "messages" | "cancel"),
            ],
        ) => RequestAct(id, rid, act),
        ("GET", ["requests", "pending"]) => HumanPending,
        ("GET", ["requests", rid]) => HumanShow(rid),
        ("POST", ["requests", rid, act @ ("respond" | "messages" | "cancel")]) => {
            HumanAct(rid, act)
        }
        ("POST", ["workspaces", id, "broadcast"]) => Broadcast(id),
        ("POST", ["workspaces", id, "chat", "uploads"]) => Upload(id),
        ("GET", ["workspaces", id, "pending-uploads", fid, "content"]) => UploadContent(id, fid),
        ("POST", ["workspaces", id, "pending-uploads", fid, "ack"]) => UploadAck(id, fid),
        ("GET", ["workspaces", id, "chat-history"]) => ChatHistory(id),
        ("GET", ["uploads", "limits"]) => UploadLimits,
        _ => return None,
    })
}

impl<'a> ToolRoute<'a> {
    /// Path template for statistics.
    pub fn template(&self) -> &'static str {
        use ToolRoute::*;
        match self {
            MemoryWrite(_) | MemoryList(_) => "/workspaces/:id/memories",
            Namespaces(_) => "/workspaces/:id/v2/namespaces",
            MemorySearch(_) => "/workspaces/:id/v2/memories",
            MemoryDelete(..) => "/workspaces/:id/v2/memories/:memoryId",
            RequestCreate(_) | RequestList(_) => "/workspaces/:id/requests",
            RequestInbox(_) => "/workspaces/:id/requests/inbox",
            RequestShow(..) => "/workspaces/:id/requests/:requestId",
            RequestAct(..) => "/workspaces/:id/requests/:requestId/:action",
            HumanPending => "/requests/pending",
            HumanShow(_) => "/requests/:requestId",
            HumanAct(..) => "/requests/:requestId/:action",
            Broadcast(_) => "/workspaces/:id/broadcast",
            Upload(_) => "/workspaces/:id/chat/uploads",
            UploadContent(..) => "/workspaces/:id/pending-uploads/:file_id/content",
            UploadAck(..) => "/workspaces/:id/pending-uploads/:file_id/ack",
            ChatHistory(_) => "/workspaces/:id/chat-history",
            UploadLimits => "/uploads/limits",
        }
    }

    /// The `:id` segment, if any.
    pub fn workspace_id(&self) -> Option<&'a str> {
        use ToolRoute::*;
        match *self {
            MemoryWrite(id)
            | MemoryList(id)
            | Namespaces(id)
            | MemorySearch(id)
            | MemoryDelete(id, _)
            | RequestCreate(id)
            | RequestList(id)
            | RequestInbox(id)
            | RequestShow(id, _)
            | RequestAct(id, ..)
            | Broadcast(id)
            | Upload(id)
            | UploadContent(id, _)
            | UploadAck(id, _)
            | ChatHistory(id) => Some(id),
            HumanPending | HumanShow(_) | HumanAct(..) | UploadLimits => None,
        }
    }
}

/// Dispatch a tool route.
pub fn handle(app: &Arc<App>, req: &Request, route: ToolRoute<'_>) -> Response {
    use ToolRoute::*;
    let mut st = app.store();
    let result = match route {
        UploadLimits => ok(
            200,
            json!({"max_attachments_per_message": 10, "per_file_bytes": 104857600,
                   "per_request_bytes": 104857600}),
        ),
        HumanPending | HumanShow(_) | HumanAct(..) => {
            human_auth(app, &st, req).and_then(|()| match route {
                HumanPending => human_pending(&st, req),
                HumanShow(rid) => show(&st, None, rid),
                HumanAct(rid, act) => act_on(&mut st, req, None, rid, act),
                _ => Err(err(404, "not found")),
            })
        }
        _ => {
            let id = route.workspace_id().unwrap_or("");
            workspace_auth(app, &st, req, id).and_then(|()| match route {
                MemoryWrite(id) => memory_write(&mut st, req, id),
                MemoryList(id) => memory_list(&st, id),
                Namespaces(id) => namespaces(&st, id),
                MemorySearch(id) => memory_search(&st, req, id),
                MemoryDelete(id, mid) => memory_delete(&mut st, id, mid),
                RequestCreate(id) => request_create(&mut st, req, id),
                RequestList(id) => request_list(&st, req, Some(id), false),
                RequestInbox(id) => request_list(&st, req, Some(id), true),
                RequestShow(id, rid) => show(&st, Some(id), rid),
                RequestAct(id, rid, act) => act_on(&mut st, req, Some(id), rid, act),
                Broadcast(id) => broadcast(&mut st, req, id),
                Upload(id) => upload(&mut st, req, id),
                UploadContent(id, fid) => upload_content(&mut st, id, fid),
                UploadAck(id, fid) => upload_ack(&st, id, fid),
                ChatHistory(id) => chat_history(&st, req, id),
                _ => Err(err(404, "not found")),
            })
        }
    };
    result.unwrap_or_else(|e| e)
}

/// AdminAuth (§2.19 human routes): the admin token when one is configured, else any
/// live workspace token.
fn human_auth(app: &App, st: &Store, req: &Request) -> Result<(), Response> {
    let Some(tok) = bearer(req) else {
        return Err(err(401, "admin auth required"));
    };
    let allowed = match app.cfg.admin_token {
        Some(_) => is_admin(app, tok),
        None => st.token_owner(tok).is_some(),
    };
    if allowed {
        Ok(())
    } else {
        Err(err(401, "invalid admin auth token"))
    }
}

fn body_object(req: &Request) -> Option<Map<String, Value>> {
    match serde_json::from_slice::<Value>(&req.body) {
        Ok(Value::Object(m)) => Some(m),
        _ => None,
    }
}

fn text<'a>(m: &'a Map<String, Value>, k: &str) -> Option<&'a str> {
    m.get(k).and_then(Value::as_str).filter(|s| !s.is_empty())
}

// ---------------------------------------------------------------- memories

/// The org root of `id` (itself for a root), walking at most 32 parents.
fn root_of(st: &Store, id: &str) -> String {
    let mut cur = id.to_string();
    for _ in 0..32 {
        match st.workspaces.get(&cur).and_then(|w| w.parent_id.clone()) {
            Some(p) if st.workspaces.contains_key(&p) => cur = p,
            _ => break,
        }
    }
    cur
}

/// (scope, namespace, writable) for `id` (§2.18 resolver).
fn scopes(st: &Store, id: &str) -> Vec<(&'static str, String, bool)> {
    let parent = st.workspaces.get(id).and_then(|w| w.parent_id.clone());
    let is_root = parent.is_none();
    vec![
        ("LOCAL", format!("workspace:{id}"), true),
        (
            "TEAM",
            format!("team:{}", parent.as_deref().unwrap_or(id)),
            true,
        ),
        ("GLOBAL", format!("org:{}", root_of(st, id)), is_root),
    ]
}

fn plugin_off() -> Response {
    err(
        503,
        "memory plugin is not configured (set MEMORY_PLUGIN_URL)",
    )
}

/// A simplified copy of the platform's redactor (memories.go:38-112).
fn redact(content: &str) -> String {
    let b64 = |t: &str| {
        t.len() >= 33
            && t.bytes()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'+' | b'/' | b'=' | b'_' | b'-'))
    };
    let prefixes = [
        "ghp_",
        "gho_",
        "ghs_",
        "ghu_",
        "ghr_",
        "github_pat_",
        "AKIA",
        "pplx-",
        "sk-",
        "ctx7_",
    ];
    let mut out: Vec<String> = Vec::new();
    let mut after_bearer = false;
    for word in content.split(' ') {
        let redacted = if after_bearer && !word.is_empty() {
            Some("[REDACTED:BEARER]".to_string())
        } else if let Some((k, v)) = word.split_once('=')
            && !v.is_empty()
            && ["_API_KEY", "_TOKEN", "_SECRET"]
                .iter()
                .any(|s| k.to_ascii_uppercase().ends_with(s))
        {
            Some(format!("{k}=[REDACTED:SECRET]"))
        } else if prefixes.iter().any(|p| word.starts_with(p)) && word.len() > 8 {
            Some("[REDACTED:TOKEN]".to_string())
        } else if b64(word) {
            Some("[REDACTED:BASE64]".to_string())
        } else {
            None
        };
        after_bearer = word == "Bearer";
        out.push(redacted.unwrap_or_else(|| word.to_string()));
    }
    out.join(" ")
}

fn memory_write(st: &mut Store, req: &Request, id: &str) -> Handled {
    let body = body_object(req).ok_or_else(|| err(400, "invalid request body"))?;
    let (Some(content), Some(scope)) = (text(&body, "content"), text(&body, "scope")) else {
        return Err(err(400, "invalid request body"));
    };
    let label = body
        .get("namespace")
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .unwrap_or("general");
    if !matches!(scope, "LOCAL" | "TEAM" | "GLOBAL") {
        return Err(err(400, "scope must be LOCAL, TEAM, or GLOBAL"));
    }
    if label.chars().count() > 50 {
        return Err(err(400, "namespace must be <= 50 characters"));
    }
    let resolved = scopes(st, id);
    let Some((_, ns, writable)) = resolved.iter().find(|(s, ..)| *s == scope) else {
        return Err(err(500, "failed to resolve writable namespaces"));
    };
    if !writable {
        return Err(err(403, "only root workspaces can write GLOBAL memories"));
    }
    if st.tools.memory_plugin_off {
        return Err(plugin_off());
    }
    let mut content = redact(content);
    if scope == "GLOBAL" {
        content = content.replace("[MEMORY ", "[_MEMORY ");
    }
    let mid = ids::new_uuid();
    st.tools.memories.push(Memory {
        id: mid.clone(),
        namespace: ns.clone(),
        content,
        created_us: ids::now_us(),
    });
    ok(201, json!({"id": mid, "namespace": label, "scope": scope}))
}

fn readable(st: &Store, id: &str) -> Vec<(&'static str, String)> {
    scopes(st, id).into_iter().map(|(s, n, _)| (s, n)).collect()
}

fn memory_list(st: &Store, id: &str) -> Handled {
    if st.tools.memory_plugin_off {
        return Err(plugin_off());
    }
    let ns = readable(st, id);
    let mut list: Vec<&Memory> = st
        .tools
        .memories
        .iter()
        .filter(|m| ns.iter().any(|(_, n)| *n == m.namespace))
        .collect();
    list.sort_by_key(|m| std::cmp::Reverse(m.created_us));
    let items: Vec<Value> = list
        .iter()
        .take(50)
        .map(|m| {
            let scope = ns
                .iter()
                .find(|(_, n)| *n == m.namespace)
                .map_or("LOCAL", |(s, _)| *s);
            json!({"id": m.id, "content": m.content, "scope": scope,
                   "created_at": ids::rfc3339(m.created_us)})
        })
        .collect();
    ok(200, Value::Array(items))
}

fn namespaces(st: &Store, id: &str) -> Handled {
    if st.tools.memory_plugin_off {
        return Err(plugin_off());
    }
    let name = st
        .workspaces
        .get(id)
        .map(|w| w.name.clone())
        .unwrap_or_default();
    let entry = |scope: &str, ns: &str| {
        let (kind, label) = match scope {
            "LOCAL" => ("workspace", format!("Workspace ({name})")),
            "TEAM" => ("team", "Team".to_string()),
            _ => ("org", "Org".to_string()),
        };
        json!({"name": ns, "kind": kind, "label": label})
    };
    let all = scopes(st, id);
    let readable: Vec<Value> = all.iter().map(|(s, n, _)| entry(s, n)).collect();
    let writable: Vec<Value> = all
        .iter()
        .filter(|(.., w)| *w)
        .map(|(s, n, _)| entry(s, n))
        .collect();
    ok(200, json!({"readable": readable, "writable": writable}))
}

/// Whole words of `s`, lower case (a stand-in for `plainto_tsquery('english')`).
fn words(s: &str) -> Vec<String> {
    s.split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(str::to_lowercase)
        .collect()
}

fn memory_search(st: &Store, req: &Request, id: &str) -> Handled {
    if st.tools.memory_plugin_off {
        return Err(plugin_off());
    }
    let q = req.query_param("q").unwrap_or_default();
    let kind = req.query_param("kind").filter(|k| !k.is_empty());
    if kind
        .as_deref()
        .is_some_and(|k| !matches!(k, "fact" | "summary" | "checkpoint"))
    {
        return Err(err(502, "memory plugin search failed"));
    }
    let limit = match req.query_param("limit").and_then(|l| l.parse::<i64>().ok()) {
        Some(n) if n > 0 => n.min(100) as usize,
        _ => 50,
    };
    let ns_all = readable(st, id);
    let wanted: Vec<String> = match req.query_param("namespace").filter(|n| !n.is_empty()) {
        // A namespace we cannot read gives an empty list, never 403.
        Some(n) => ns_all
            .iter()
            .filter(|(_, x)| *x == n)
            .map(|(_, x)| x.clone())
            .collect(),
        None => ns_all.iter().map(|(_, x)| x.clone()).collect(),
    };
    let qwords = words(&q);
    let mut hits: Vec<&Memory> = st
        .tools
        .memories
        .iter()
        .filter(|m| wanted.contains(&m.namespace))
        // Every memory is stored with kind fact (§2.18).
        .filter(|_| kind.as_deref().is_none_or(|k| k == "fact"))
        .filter(|m| match q.chars().count() {
            0 => true,
            1 => m.content.to_lowercase().contains(&q.to_lowercase()),
            _ => {
                let have = words(&m.content);
                !qwords.is_empty() && qwords.iter().all(|w| have.contains(w))
            }
        })
        .collect();
    hits.sort_by_key(|m| std::cmp::Reverse(m.created_us));
    let items: Vec<Value> = hits
        .iter()
        .take(limit)
        .map(|m| {
            json!({"id": m.id, "namespace": m.namespace, "content": m.content, "kind": "fact",
                   "source": "user", "pin": false, "created_at": ids::rfc3339(m.created_us)})
        })
        .collect();
    ok(200, json!({ "memories": items }))
}

fn memory_delete(st: &mut Store, id: &str, mid: &str) -> Handled {
    if st.tools.memory_plugin_off {
        return Err(plugin_off());
    }
    if !ids::is_uuid(mid) {
        return Err(err(502, "memory plugin delete failed"));
    }
    let own = format!("workspace:{id}");
    let before = st.tools.memories.len();
    st.tools
        .memories
        .retain(|m| !(m.id == mid && m.namespace == own));
    if st.tools.memories.len() == before {
        return Err(err(404, "memory not found"));
    }
    ok(200, json!({"status": "deleted"}))
}

// ---------------------------------------------------------------- requests

fn request_create(st: &mut Store, req: &Request, id: &str) -> Handled {
    let bad = || err(400, "invalid request body");
    let body = body_object(req).ok_or_else(bad)?;
    let (Some(kind), Some(rtype), Some(title)) = (
        text(&body, "kind"),
        text(&body, "recipient_type"),
        text(&body, "title"),
    ) else {
        return Err(bad());
    };
    if !matches!(kind, "task" | "approval") {
        return Err(err(400, "request: kind must be 'task' or 'approval'"));
    }
    if !matches!(rtype, "user" | "agent") {
        return Err(err(400, "request: type must be 'user' or 'agent'"));
    }
    let rid = ids::new_uuid();
    let now = ids::rfc3339(ids::now_us());
    let org = root_of(st, id);
    let rec_id = body
        .get("recipient_id")
        .and_then(Value::as_str)
        .unwrap_or("");
    let mut row = Map::new();
    for (k, v) in [
        ("id", json!(rid)),
        ("kind", json!(kind)),
        ("requester_type", json!("agent")),
        ("requester_id", json!(id)),
        ("org_id", json!(org)),
        ("recipient_type", json!(rtype)),
        ("recipient_id", json!(rec_id)),
        ("title", json!(title)),
        (
            "detail",
            json!(body.get("detail").and_then(Value::as_str).unwrap_or("")),
        ),
        ("status", json!("pending")),
        ("responder_type", Value::Null),
        ("responder_id", Value::Null),
        (
            "priority",
            body.get("priority").cloned().unwrap_or(json!(0)),
        ),
        ("created_at", json!(now)),
        ("updated_at", json!(now)),
        ("responded_at", Value::Null),
    ] {
        row.insert(k.into(), v);
    }
    let event = json!({"kind": kind, "recipient_id": rec_id, "recipient_type": rtype,
                       "request_id": rid, "title": title});
    let to = if rtype == "agent" && st.workspaces.contains_key(rec_id) {
        rec_id
    } else {
        id
    };
    st.events.publish(to, "REQUEST_CREATED", event);
    st.tools.order += 1;
    let order = st.tools.order;
    st.tools.requests.insert(
        rid.clone(),
        Req {
            row,
            messages: Vec::new(),
            order,
        },
    );
    ok(201, json!({"request_id": rid, "status": "pending"}))
}

fn field<'a>(r: &'a Req, k: &str) -> &'a str {
    r.row.get(k).and_then(Value::as_str).unwrap_or("")
}

fn request_list(st: &Store, req: &Request, id: Option<&str>, inbox: bool) -> Handled {
    let status = req.query_param("status").filter(|s| !s.is_empty());
    let mut list: Vec<&Req> = st
        .tools
        .requests
        .values()
        .filter(|r| match id {
            Some(id) if inbox => {
                field(r, "recipient_type") == "agent" && field(r, "recipient_id") == id
            }
            Some(id) => field(r, "requester_type") == "agent" && field(r, "requester_id") == id,
            None => true,
        })
        .filter(|r| status.as_deref().is_none_or(|s| field(r, "status") == s))
        .collect();
    list.sort_by_key(|r| std::cmp::Reverse(r.order));
    let rows: Vec<Value> = list
        .iter()
        .take(50)
        .map(|r| Value::Object(r.row.clone()))
        .collect();
    ok(200, Value::Array(rows))
}

fn human_pending(st: &Store, req: &Request) -> Handled {
    let kind = req.query_param("kind").filter(|k| !k.is_empty());
    let mut list: Vec<&Req> = st
        .tools
        .requests
        .values()
        .filter(|r| matches!(field(r, "status"), "pending" | "info_requested"))
        .filter(|r| field(r, "recipient_type") == "user")
        .filter(|r| kind.as_deref().is_none_or(|k| field(r, "kind") == k))
        .collect();
    list.sort_by_key(|r| std::cmp::Reverse(r.order));
    ok(
        200,
        Value::Array(list.iter().map(|r| Value::Object(r.row.clone())).collect()),
    )
}

fn is_participant(r: &Req, id: &str) -> bool {
    (field(r, "requester_type") == "agent" && field(r, "requester_id") == id)
        || (field(r, "recipient_type") == "agent" && field(r, "recipient_id") == id)
}

fn show(st: &Store, id: Option<&str>, rid: &str) -> Handled {
    let r = st
        .tools
        .requests
        .get(rid)
        .ok_or_else(|| err(404, "request not found"))?;
    if let Some(id) = id
        && !is_participant(r, id)
    {
        return Err(err(403, "not a participant"));
    }
    ok(200, json!({"messages": r.messages, "request": r.row}))
}

/// `respond`, `messages` or `cancel`, on the workspace route (`id` = caller) or the
/// human route (`id` None: no party checks, parties from the body).
fn act_on(st: &mut Store, req: &Request, id: Option<&str>, rid: &str, act: &str) -> Handled {
    let body = body_object(req);
    let gone = || err(404, "request not found or already resolved");
    let (status, kind, requester_type, requester_id, title) = {
        let r = st.tools.requests.get(rid);
        let Some(r) = r else {
            return Err(if act == "messages" {
                err(404, "request not found")
            } else {
                gone()
            });
        };
        (
            field(r, "status").to_string(),
            field(r, "kind").to_string(),
            field(r, "requester_type").to_string(),
            field(r, "requester_id").to_string(),
            field(r, "title").to_string(),
        )
    };
    let r = st.tools.requests.get(rid).ok_or_else(gone)?;
    let now = ids::rfc3339(ids::now_us());
    let open = matches!(status.as_str(), "pending" | "info_requested");
    match act {
        "respond" => {
            if let Some(id) = id
                && !(field(r, "recipient_type") == "agent" && field(r, "recipient_id") == id)
            {
                return Err(err(403, "not the recipient"));
            }
            let body = body.ok_or_else(|| err(400, "invalid request body"))?;
            let action = text(&body, "action").ok_or_else(|| err(400, "invalid request body"))?;
            let valid = match kind.as_str() {
                "task" => matches!(action, "done" | "rejected"),
                _ => matches!(action, "approved" | "rejected"),
            };
            if !valid {
                return Err(err(400, "request: invalid action for this request kind"));
            }
            let (rtype, rid_by) = match id {
                Some(id) => ("agent".to_string(), Some(id.to_string())),
                None => (
                    text(&body, "responder_type").unwrap_or("user").to_string(),
                    text(&body, "responder_id").map(str::to_string),
                ),
            };
            if rtype == requester_type && rid_by.as_deref() == Some(requester_id.as_str()) {
                return Err(err(400, "request: responder cannot be the requester"));
            }
            if !open {
                return Err(gone());
            }
            let Some(r) = st.tools.requests.get_mut(rid) else {
                return Err(gone());
            };
            r.row.insert("status".into(), json!(action));
            r.row.insert("responder_type".into(), json!(rtype));
            r.row.insert("responder_id".into(), json!(rid_by));
            r.row.insert("responded_at".into(), json!(now));
            r.row.insert("updated_at".into(), json!(now));
            if requester_type == "agent" {
                let event = json!({"kind": kind, "request_id": rid, "responder_id": rid_by,
                                   "responder_type": rtype, "status": action, "title": title});
                st.events.publish(&requester_id, "REQUEST_RESPONDED", event);
                let by = match (rtype.as_str(), &rid_by) {
                    ("agent", Some(a)) => format!("agent {a}"),
                    _ => "the user".to_string(),
                };
                let text = format!(
                    "Your {kind} request {title:?} (id {rid}) was {action} by {by}. Use get_request for the thread or check_requests for all your outcomes. If this outcome changes what you owe the user, acknowledge it briefly with send_message_to_user — this notification is a background turn and does NOT appear in their chat."
                );
                queue_turn(
                    st,
                    &requester_id,
                    &format!("request-responded:{rid}-{}", ids::new_uuid()),
                    &text,
                );
            }
            ok(200, json!({"request_id": rid, "status": action}))
        }
        "messages" => {
            if let Some(id) = id
                && !is_participant(r, id)
            {
                return Err(err(403, "not a participant"));
            }
            let body = body.ok_or_else(|| err(400, "invalid request body"))?;
            let (Some(text_body), Some(atype)) = (text(&body, "body"), text(&body, "author_type"))
            else {
                return Err(err(400, "invalid request body"));
            };
            let (atype, aid) = match id {
                Some(id) => ("agent".to_string(), Some(id.to_string())),
                None => (
                    atype.to_string(),
                    text(&body, "author_id").map(str::to_string),
                ),
            };
            let mid = ids::new_uuid();
            let from_requester =
                atype == requester_type && aid.as_deref() == Some(requester_id.as_str());
            let text_body = text_body.to_string();
            let Some(r) = st.tools.requests.get_mut(rid) else {
                return Err(err(404, "request not found"));
            };
            r.messages
                .push(json!({"id": mid, "request_id": rid, "author_type": atype,
                                   "author_id": aid, "body": text_body, "created_at": now}));
            if requester_type == "agent" {
                let event = json!({"author_id": aid, "author_type": atype, "message_id": mid,
                                   "request_id": rid});
                st.events.publish(&requester_id, "REQUEST_MESSAGE", event);
            }
            let Some(r) = st.tools.requests.get_mut(rid) else {
                return Err(err(404, "request not found"));
            };
            if !from_requester {
                if status == "pending" {
                    r.row.insert("status".into(), json!("info_requested"));
                    r.row.insert("updated_at".into(), json!(now));
                }
                if requester_type == "agent" {
                    let t = format!(
                        "More info requested on your {kind} request {title:?} (id {rid}): {text_body}\nReply with add_request_message."
                    );
                    queue_turn(
                        st,
                        &requester_id,
                        &format!("request-message:{mid}-{}", ids::new_uuid()),
                        &t,
                    );
                }
            }
            ok(
                201,
                json!({"message_id": mid, "request_id": rid, "status": "created"}),
            )
        }
        _ => {
            if let Some(id) = id
                && !(requester_type == "agent" && requester_id == id)
            {
                return Err(err(403, "not the requester"));
            }
            if !open {
                return Err(gone());
            }
            let Some(r) = st.tools.requests.get_mut(rid) else {
                return Err(gone());
            };
            r.row.insert("status".into(), json!("cancelled"));
            r.row.insert("updated_at".into(), json!(now));
            ok(200, json!({"request_id": rid, "status": "cancelled"}))
        }
    }
}

/// Puts an answer turn in `ws`'s A2A queue; the next heartbeat delivers it.
fn queue_turn(st: &mut Store, ws: &str, message_id: &str, text: &str) {
    let body = json!({"method": "message/send", "params": {"message": {
        "messageId": message_id, "parts": [{"kind": "text", "text": text}], "role": "user"}}});
    st.tools
        .queued
        .entry(ws.to_string())
        .or_default()
        .push_back(body);
}

/// One queued item for `ws` becomes an inbox row (the drain re-enters the proxy
/// with no caller: source null, `contextId` `canvas-<id>`, no metadata).
pub fn drain_one(st: &mut Store, ws: &str) {
    let Some(mut body) = st.tools.queued.get_mut(ws).and_then(VecDeque::pop_front) else {
        return;
    };
    let name = st
        .workspaces
        .get(ws)
        .map(|w| w.name.clone())
        .unwrap_or_default();
    body["jsonrpc"] = json!("2.0");
    body["id"] = json!(ids::new_uuid());
    body["params"]["message"]["contextId"] = json!(format!("canvas-{ws}"));
    let mut row = Row::new(ws, "a2a_receive");
    row.method = json!("message/send");
    row.target_id = json!(ws);
    row.summary = json!(format!("message/send → {name} (ingest)"));
    row.message_id = body
        .pointer("/params/message/messageId")
        .and_then(Value::as_str)
        .map(str::to_string);
    let content = crate::store::message_text(&body);
    row.request_body = Some(body);
    let data = row.event_data();
    let message_id = row.message_id.clone();
    st.insert_row(ws, row);
    st.events.publish(ws, "ACTIVITY_LOGGED", data);
    let event = json!({"content": content, "message_id": message_id, "workspace_id": ws});
    st.events.publish(ws, "USER_MESSAGE", event);
}

// ---------------------------------------------------------------- broadcast

fn broadcast(st: &mut Store, req: &Request, id: &str) -> Handled {
    if !ids::is_uuid(id) {
        return Err(err(400, "invalid workspace ID"));
    }
    let message = body_object(req)
        .and_then(|b| text(&b, "message").map(str::to_string))
        .ok_or_else(|| err(400, "message is required"))?;
    let sender = st
        .workspaces
        .get(id)
        .filter(|w| !w.is_removed())
        .map(|w| w.name.clone())
        .ok_or_else(|| err(404, "workspace not found"))?;
    if !st.tools.broadcast.contains(id) {
        return Err(Response::json(
            403,
            &json!({"error": "broadcast_disabled", "hint": "This workspace does not have the broadcast ability. Ask a user or admin to enable it via PATCH /workspaces/:id/abilities."}),
        ));
    }
    let root = root_of(st, id);
    let recipients: Vec<String> = st
        .workspaces
        .values()
        .filter(|w| !w.is_removed() && w.id != id)
        .map(|w| w.id.clone())
        .filter(|w| root_of(st, w) == root)
        .collect();
    let head: String = message.chars().take(120).collect();
    let cut = if message.chars().count() > 120 {
        "…"
    } else {
        ""
    };
    for r in &recipients {
        let mut row = Row::new(r, "broadcast_receive");
        row.method = json!("broadcast");
        row.source_id = json!(id);
        row.summary = json!(format!("Broadcast from {sender}: {head}{cut}"));
        st.insert_row(r, row);
        // The row is inserted directly: no ACTIVITY_LOGGED, only this (full text).
        let event = json!({"message": message, "sender": sender, "sender_id": id});
        st.events.publish(r, "BROADCAST_MESSAGE", event);
    }
    let mut own = Row::new(id, "broadcast_sent");
    own.method = json!("broadcast");
    own.summary = json!(format!(
        "Broadcast sent to {} workspace(s)",
        recipients.len()
    ));
    st.insert_row(id, own);
    ok(
        200,
        json!({"delivered": recipients.len(), "status": "sent"}),
    )
}

// ---------------------------------------------------------------- uploads

/// `SanitizeFilename` (§2.16), without the 100-character cut.
fn sanitize(name: &str) -> String {
    let base = name.rsplit(['/', '\\']).next().unwrap_or("");
    let s: String = base
        .chars()
        .map(|c| match c {
            ' ' => '_',
            c if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') => c,
            _ => '_',
        })
        .collect();
    if matches!(s.as_str(), "" | "." | "..") {
        "file".into()
    } else {
        s
    }
}

/// The `files` parts of a multipart body: (file name, content type, bytes).
fn multipart(req: &Request) -> Option<Vec<(String, String, Vec<u8>)>> {
    let ct = req.header("content-type")?;
    let boundary = ct
        .split(';')
        .find_map(|p| p.trim().strip_prefix("boundary="))?;
    let boundary = boundary.trim_matches('"');
    let delim = format!("--{boundary}").into_bytes();
    let body = &req.body;
    let find = |hay: &[u8], from: usize, needle: &[u8]| -> Option<usize> {
        hay.get(from..)?
            .windows(needle.len())
            .position(|w| w == needle)
            .map(|p| p + from)
    };
    let mut pos = find(body, 0, &delim)? + delim.len();
    let mut out = Vec::new();
    loop {
        if body.get(pos..pos + 2) == Some(b"--") {
            return Some(out);
        }
        pos += 2; // CRLF after the delimiter
        let head_end = find(body, pos, b"\r\n\r\n")?;
        let head = String::from_utf8_lossy(body.get(pos..head_end)?).to_string();
        let data_start = head_end + 4;
        let next = find(body, data_start, &delim)?;
        let data = body.get(data_start..next.checked_sub(2)?)?.to_vec();
        let mut name = None;
        let mut filename = None;
        let mut ctype = String::new();
        for line in head.lines() {
            let lower = line.to_ascii_lowercase();
            if lower.starts_with("content-disposition:") {
                for p in line.split(';') {
                    let p = p.trim();
                    if let Some(v) = p.strip_prefix("name=") {
                        name = Some(v.trim_matches('"').to_string());
                    }
                    if let Some(v) = p.strip_prefix("filename=") {
                        filename = Some(v.trim_matches('"').to_string());
                    }
                }
            } else if lower.starts_with("content-type:") {
                ctype = line[13..]
                    .split(';')
                    .next()
                    .unwrap_or("")
                    .trim()
                    .to_string();
            }
        }
        if name.as_deref() == Some("files") {
            out.push((filename.unwrap_or_default(), ctype, data));
        }
        pos = next + delim.len();
    }
}

fn upload(st: &mut Store, req: &Request, id: &str) -> Handled {
    if !ids::is_uuid(id) {
        return Err(err(400, "invalid workspace ID"));
    }
    let ws = st
        .workspaces
        .get(id)
        .ok_or_else(|| err(404, "workspace not found"))?;
    if ws.delivery_mode != "poll" {
        return Err(Response::json(
            422,
            &json!({"error": "workspace has no callback URL — upload requires push-mode + a public URL", "detail": "emulated"}),
        ));
    }
    let parts = multipart(req).ok_or_else(|| err(400, "malformed multipart body"))?;
    if parts.is_empty() {
        return Err(err(400, "no files field in request"));
    }
    if parts.len() > 64 {
        return Err(err(400, "too many files (limit 64)"));
    }
    if let Some((n, _, b)) = parts.iter().find(|(_, _, b)| b.len() > 104_857_600) {
        return Err(Response::json(
            413,
            &json!({"error": "file exceeds per-file cap", "filename": n, "max": 104857600, "size": b.len()}),
        ));
    }
    if parts.iter().any(|(_, _, b)| b.is_empty()) {
        return Err(err(500, "could not stage files"));
    }
    let mut files = Vec::new();
    for (name, mime, bytes) in parts {
        let fid = ids::new_uuid();
        let name = sanitize(&name);
        let uri = format!("platform-pending:{id}/{fid}");
        let size = bytes.len();
        st.tools.uploads.insert(
            fid.clone(),
            Upload {
                workspace_id: id.into(),
                name: name.clone(),
                mime: mime.clone(),
                bytes,
            },
        );
        let mut row = Row::new(id, "a2a_receive");
        row.method = json!("chat_upload_receive");
        row.target_id = json!(id);
        row.summary = json!(format!("chat_upload_receive: {name}"));
        row.request_body =
            Some(json!({"file_id": fid, "mimeType": mime, "name": name, "size": size, "uri": uri}));
        let data = row.event_data();
        st.insert_row(id, row);
        st.events.publish(id, "ACTIVITY_LOGGED", data);
        files.push(json!({"uri": uri, "name": name, "mimeType": mime, "size": size}));
    }
    ok(200, json!({ "files": files }))
}

fn upload_lookup<'a>(st: &'a Store, id: &str, fid: &str) -> Result<&'a Upload, Response> {
    if !ids::is_uuid(id) {
        return Err(err(400, "invalid workspace ID"));
    }
    if !ids::is_uuid(fid) {
        return Err(err(400, "invalid file_id"));
    }
    let u = st
        .tools
        .uploads
        .get(fid)
        .ok_or_else(|| err(404, "pending upload not found or expired"))?;
    if u.workspace_id != id {
        return Err(err(404, "pending upload not found"));
    }
    Ok(u)
}

fn upload_content(st: &mut Store, id: &str, fid: &str) -> Handled {
    let u = upload_lookup(st, id, fid)?;
    let mime = if u.mime.is_empty() {
        "application/octet-stream"
    } else {
        &u.mime
    };
    let mut resp = Response::empty(200);
    resp.body = u.bytes.clone();
    Ok(resp.with_header("Content-Type", mime).with_header(
        "Content-Disposition",
        format!("attachment; filename=\"{}\"", u.name),
    ))
}

fn upload_ack(st: &Store, id: &str, fid: &str) -> Handled {
    upload_lookup(st, id, fid)?;
    ok(200, json!({"acked": true}))
}

// ---------------------------------------------------------------- chat history

fn chat_history(st: &Store, req: &Request, id: &str) -> Handled {
    let ws = st
        .workspaces
        .get(id)
        .ok_or_else(|| err(404, "workspace not found"))?;
    let limit = match req.query_param("limit").and_then(|l| l.parse::<i64>().ok()) {
        Some(n) if n > 0 => n.min(1000) as usize,
        _ => 100,
    };
    let before = match req.query_param("before_ts").filter(|b| !b.is_empty()) {
        Some(b) => Some(
            ids::parse_rfc3339(&b)
                .ok_or_else(|| err(400, "before_ts must be an RFC3339 timestamp"))?,
        ),
        None => None,
    };
    let msgs: Vec<Value> = ws
        .inbox
        .rows()
        .iter()
        .rev()
        .filter(|r| r.activity_type.as_str() == Some("a2a_receive") && r.source_id.is_null())
        .filter(|r| before.is_none_or(|b| r.created_us < b))
        .filter_map(|r| {
            let (role, content) = match r.method.as_str() {
                Some("message/send") => {
                    ("user", crate::store::message_text(r.request_body.as_ref()?))
                }
                Some("notify") => (
                    "agent",
                    r.response_body
                        .as_ref()?
                        .get("result")?
                        .as_str()?
                        .to_string(),
                ),
                _ => return None,
            };
            Some(json!({"id": r.id, "role": role, "content": content,
                        "created_at": ids::rfc3339(r.created_us)}))
        })
        .take(limit + 1)
        .collect();
    let reached_end = msgs.len() <= limit;
    let msgs: Vec<Value> = msgs.into_iter().take(limit).collect();
    ok(200, json!({"messages": msgs, "reached_end": reached_end}))
}

// ---------------------------------------------------------------- admin

/// `/_admin/...` routes of this module; `None` if not one.
pub fn admin(app: &App, req: &Request, method: &str, segs: &[&str]) -> Option<Handled> {
    let mut st = app.store();
    let body = body_object(req).unwrap_or_default();
    Some(match (method, segs) {
        ("POST", ["tools"]) => {
            if let Some(on) = body.get("memory_plugin").and_then(Value::as_bool) {
                st.tools.memory_plugin_off = !on;
            }
            ok(200, json!({"memory_plugin": !st.tools.memory_plugin_off}))
        }
        ("GET", ["requests"]) => request_list(&st, req, None, false).map(|r| {
            let list: Value = serde_json::from_slice(&r.body).unwrap_or(Value::Null);
            Response::json(200, &json!({ "requests": list }))
        }),
        ("POST", ["workspaces", id, "abilities"]) => {
            if !st.workspaces.contains_key(*id) {
                return Some(Err(err(404, "workspace not found")));
            }
            match body.get("broadcast_enabled").and_then(Value::as_bool) {
                Some(true) => {
                    st.tools.broadcast.insert(id.to_string());
                }
                Some(false) => {
                    st.tools.broadcast.remove(*id);
                }
                None => {}
            }
            ok(
                200,
                json!({"broadcast_enabled": st.tools.broadcast.contains(*id)}),
            )
        }
        // Rows at an exact time, for paging tests (rows sharing a timestamp).
        ("POST", ["workspaces", id, "rows_at"]) => {
            let rows = body
                .get("rows")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default();
            let mut ids_out = Vec::new();
            for spec in rows {
                let mut row = Row::new(
                    id,
                    spec.get("activity_type")
                        .and_then(Value::as_str)
                        .unwrap_or("a2a_receive"),
                );
                for (k, slot) in [
                    ("source_id", &mut row.source_id),
                    ("target_id", &mut row.target_id),
                    ("method", &mut row.method),
                    ("summary", &mut row.summary),
                ] {
                    if let Some(v) = spec.get(k) {
                        *slot = v.clone();
                    }
                }
                row.request_body = spec.get("request_body").cloned();
                row.response_body = spec.get("response_body").cloned();
                row.created_us = spec
                    .get("created_at")
                    .and_then(Value::as_str)
                    .and_then(ids::parse_rfc3339)
                    .unwrap_or(0);
                match st.insert_row(id, row) {
                    Some((rid, _)) => ids_out.push(rid),
                    None => return Some(Err(err(404, "workspace not found"))),
                }
            }
            ok(200, json!({ "ids": ids_out }))
        }
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redaction_of_secrets() {
        let r = redact("key OPENAI_API_KEY=abc and Bearer xyz and sk-1234567890 ok");
        assert!(
            !r.contains("abc") && !r.contains("xyz") && !r.contains("sk-1234567890"),
            "{r}"
        );
        assert!(r.contains("ok"));
        assert!(redact(&"A".repeat(40)).contains("REDACTED"));
    }

    #[test]
    fn names_are_sanitised() {
        assert_eq!(sanitize("../a b$.txt"), "a_b_.txt");
        assert_eq!(sanitize(".."), "file");
    }

    #[test]
    fn whole_words() {
        assert_eq!(words("Deploy v2, now!"), ["deploy", "v2", "now"]);
    }
}
