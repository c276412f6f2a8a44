//! In-memory platform state behind one Mutex: workspaces, tokens, per-workspace activity
//! logs (sorted by `(created_at, seq)` with an id index), delegations, and the records
//! the admin API exposes (received A2A messages, notifies, heartbeats, registers).

use std::collections::{HashMap, HashSet, VecDeque};

use serde_json::{Map, Value, json};

use crate::ids;

/// Statuses from which heartbeats and registers never revive a workspace.
pub const FROZEN_STATUSES: [&str; 3] = ["removed", "paused", "hibernated"];
/// A workspace with no heartbeat for this long is shown as `awaiting_agent` (§2.2.1).
pub const STALE_AFTER_US: i64 = 180 * 1_000_000;
/// How many heartbeat payloads the admin API keeps per workspace.
const KEEP_HEARTBEATS: usize = 100;

/// A scripted answer for a push-mode workspace (admin API).
#[derive(Debug, Clone)]
pub struct PushReply {
    pub status: u16,
    pub body: Value,
    pub delay_ms: u64,
}

impl PushReply {
    /// Parse `{"status": u16, "body": any, "delay_ms"?: u64}`; `null` clears.
    pub fn from_json(v: &Value) -> Result<Option<PushReply>, String> {
        if v.is_null() {
            return Ok(None);
        }
        let status = v
            .get("status")
            .and_then(Value::as_u64)
            .filter(|s| (100..=599).contains(s))
            .ok_or("push_reply.status must be an HTTP status code")?;
        Ok(Some(PushReply {
            status: status as u16,
            body: v.get("body").cloned().unwrap_or(Value::Null),
            delay_ms: v.get("delay_ms").and_then(Value::as_u64).unwrap_or(0),
        }))
    }

    pub fn to_json(&self) -> Value {
        json!({"status": self.status, "body": self.body, "delay_ms": self.delay_ms})
    }
}

/// One activity-log row. String-typed columns are kept as JSON values so the admin API
/// can plant malformed rows (numbers, objects) for robustness tests.
#[derive(Debug, Clone)]
pub struct Row {
    pub id: String,
    pub workspace_id: String,
    pub activity_type: Value,
    pub source_id: Value,
    pub target_id: Value,
    pub method: Value,
    pub summary: Value,
    pub request_body: Option<Value>,
    pub response_body: Option<Value>,
    pub status: Value,
    pub error_detail: Value,
    pub duration_ms: Value,
    pub created_us: i64,
    pub seq: i64,
    pub message_id: Option<String>,
}

impl Row {
    /// A row of `activity_type` for `workspace_id`; id, seq and time are set on insert.
    pub fn new(workspace_id: &str, activity_type: &str) -> Row {
        Row {
            id: String::new(),
            workspace_id: workspace_id.to_string(),
            activity_type: Value::from(activity_type),
            source_id: Value::Null,
            target_id: Value::Null,
            method: Value::Null,
            summary: Value::Null,
            request_body: None,
            response_body: None,
            status: Value::from("ok"),
            error_detail: Value::Null,
            duration_ms: Value::Null,
            created_us: 0,
            seq: 0,
            message_id: None,
        }
    }

    fn key(&self) -> (i64, i64) {
        (self.created_us, self.seq)
    }

    /// The row as `GET /activity` shows it (§2.4): absent bodies are absent keys.
    pub fn to_json(&self) -> Map<String, Value> {
        let mut m = Map::new();
        m.insert("id".into(), Value::from(self.id.as_str()));
        m.insert(
            "workspace_id".into(),
            Value::from(self.workspace_id.as_str()),
        );
        m.insert("activity_type".into(), self.activity_type.clone());
        m.insert("source_id".into(), self.source_id.clone());
        m.insert("target_id".into(), self.target_id.clone());
        m.insert("method".into(), self.method.clone());
        m.insert("summary".into(), self.summary.clone());
        if let Some(b) = &self.request_body {
            m.insert("request_body".into(), b.clone());
        }
        if let Some(b) = &self.response_body {
            m.insert("response_body".into(), b.clone());
        }
        m.insert("duration_ms".into(), self.duration_ms.clone());
        m.insert("status".into(), self.status.clone());
        m.insert("error_detail".into(), self.error_detail.clone());
        m.insert(
            "created_at".into(),
            Value::from(ids::rfc3339(self.created_us)),
        );
        m.insert("seq".into(), Value::from(self.seq));
        m
    }
}

impl Row {
    /// The `data` of the `ACTIVITY_LOGGED` event for this row (activity.go:1170-1216):
    /// no `id`, `seq` or `created_at`; bodies only when set, `error_detail` only when
    /// non-empty, `message_id` only when the row has one.
    pub fn event_data(&self) -> Value {
        let mut m = Map::new();
        m.insert("activity_type".into(), self.activity_type.clone());
        m.insert("method".into(), self.method.clone());
        m.insert("summary".into(), self.summary.clone());
        m.insert("status".into(), self.status.clone());
        m.insert("source_id".into(), self.source_id.clone());
        m.insert("target_id".into(), self.target_id.clone());
        m.insert("duration_ms".into(), self.duration_ms.clone());
        if let Some(b) = &self.request_body {
            m.insert("request_body".into(), b.clone());
        }
        if let Some(b) = &self.response_body {
            m.insert("response_body".into(), b.clone());
        }
        if self.error_detail.as_str().is_some_and(|e| !e.is_empty()) {
            m.insert("error_detail".into(), self.error_detail.clone());
        }
        if let Some(id) = &self.message_id {
            m.insert("message_id".into(), Value::from(id.as_str()));
        }
        Value::Object(m)
    }
}

/// `source=` filter of `GET /activity`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceFilter {
    Canvas,
    Agent,
}

/// Parsed filters of `GET /activity` (all combine with AND).
#[derive(Debug, Clone, Default)]
pub struct ActivityQuery {
    pub activity_type: Option<String>,
    pub source: Option<SourceFilter>,
    pub peer_id: Option<String>,
    pub limit: usize,
    pub since_us: Option<i64>,
    pub before_us: Option<i64>,
    /// `(created_at, seq)` of the `since_id` cursor row.
    pub after_key: Option<(i64, i64)>,
}

impl ActivityQuery {
    fn matches(&self, r: &Row) -> bool {
        if let Some(t) = &self.activity_type
            && r.activity_type.as_str() != Some(t.as_str())
        {
            return false;
        }
        match self.source {
            Some(SourceFilter::Canvas) if !r.source_id.is_null() => return false,
            Some(SourceFilter::Agent) if r.source_id.is_null() => return false,
            _ => {}
        }
        if let Some(p) = &self.peer_id
            && r.source_id.as_str() != Some(p.as_str())
            && r.target_id.as_str() != Some(p.as_str())
        {
            return false;
        }
        true
    }
}

/// One workspace's activity log, sorted by `(created_at, seq)`.
#[derive(Debug, Default)]
pub struct Inbox {
    rows: Vec<Row>,
    keys: HashMap<String, (i64, i64)>,
    by_message_id: HashMap<String, String>,
}

impl Inbox {
    pub fn len(&self) -> usize {
        self.rows.len()
    }

    pub fn rows(&self) -> &[Row] {
        &self.rows
    }

    /// Insert `row` (id/seq/time already set). A row whose `message_id` is already
    /// present is not stored: returns the existing row's id and `true`.
    pub fn insert(&mut self, row: Row) -> (String, bool) {
        if let Some(m) = &row.message_id
            && let Some(existing) = self.by_message_id.get(m)
        {
            return (existing.clone(), true);
        }
        let key = row.key();
        let pos = self.rows.partition_point(|r| r.key() < key);
        let id = row.id.clone();
        self.keys.insert(id.clone(), key);
        if let Some(m) = &row.message_id {
            self.by_message_id.insert(m.clone(), id.clone());
        }
        self.rows.insert(pos, row);
        (id, false)
    }

    /// `(created_at, seq)` of row `id`, if it is in this log.
    pub fn key_of(&self, id: &str) -> Option<(i64, i64)> {
        self.keys.get(id).copied()
    }

    /// Delete row `id`.
    pub fn remove(&mut self, id: &str) -> bool {
        let Some(key) = self.keys.remove(id) else {
            return false;
        };
        if let Ok(pos) = self.rows.binary_search_by(|r| r.key().cmp(&key)) {
            let row = self.rows.remove(pos);
            if let Some(m) = row.message_id {
                self.by_message_id.remove(&m);
            }
        }
        true
    }

    /// Delete every row.
    pub fn clear(&mut self) -> usize {
        let n = self.rows.len();
        self.rows.clear();
        self.keys.clear();
        self.by_message_id.clear();
        n
    }

    /// Rows for `q`: newest first without a cursor, oldest first after it (§2.4).
    pub fn query(&self, q: &ActivityQuery) -> Vec<&Row> {
        let mut lo = match q.since_us {
            Some(t) => self.rows.partition_point(|r| r.created_us < t),
            None => 0,
        };
        let hi = match q.before_us {
            Some(t) => self.rows.partition_point(|r| r.created_us < t),
            None => self.rows.len(),
        };
        if let Some(key) = q.after_key {
            lo = lo.max(self.rows.partition_point(|r| r.key() <= key));
            if lo >= hi {
                return Vec::new();
            }
            self.rows[lo..hi]
                .iter()
                .filter(|r| q.matches(r))
                .take(q.limit)
                .collect()
        } else {
            if lo >= hi {
                return Vec::new();
            }
            self.rows[lo..hi]
                .iter()
                .rev()
                .filter(|r| q.matches(r))
                .take(q.limit)
                .collect()
        }
    }
}

/// An accepted `/a2a` message, for `GET /_admin/workspaces/:id/received`.
#[derive(Debug, Clone)]
pub struct Received {
    pub seq: u64,
    pub from: Option<String>,
    pub method: String,
    pub message_id: Option<String>,
    pub text: String,
    pub metadata: Value,
    pub body: Value,
    pub duplicate: bool,
    pub at_ms: i64,
}

/// A `/notify` call, for `GET /_admin/workspaces/:id/notifies`.
#[derive(Debug, Clone)]
pub struct NotifyRec {
    pub message: String,
    pub attachments: Value,
    pub at_ms: i64,
}

/// One workspace and everything recorded about it.
#[derive(Debug)]
pub struct Workspace {
    pub id: String,
    pub name: String,
    pub role: Option<String>,
    pub parent_id: Option<String>,
    pub status: String,
    pub delivery_mode: String,
    pub url: Option<String>,
    pub agent_card: Option<Value>,
    pub tokens: Vec<String>,
    pub inbound_secret: String,
    pub context_id: String,
    pub talk_to_user_enabled: bool,
    pub push_reply: Option<PushReply>,
    pub created_us: i64,
    pub removed_us: Option<i64>,
    pub last_heartbeat_us: Option<i64>,
    pub heartbeat_count: u64,
    pub heartbeats: VecDeque<Value>,
    pub register_count: u64,
    pub last_register: Option<Value>,
    pub acked_seq: i64,
    /// Every `acked_seq` received, with its time in ms (admin API; last 1000).
    pub acks: VecDeque<(i64, i64)>,
    pub active_tasks: i64,
    pub uptime_seconds: i64,
    /// Last `current_task` heartbeat value (a change broadcasts `TASK_UPDATED`).
    pub current_task: String,
    pub last_error_rate: f64,
    pub last_sample_error: String,
    pub wedged: bool,
    pub inbox: Inbox,
    pub received: Vec<Received>,
    pub received_ids: HashSet<String>,
    pub notifies: Vec<NotifyRec>,
}

impl Workspace {
    pub fn new(id: &str, name: &str) -> Workspace {
        Workspace {
            id: id.to_string(),
            name: name.to_string(),
            role: None,
            parent_id: None,
            status: "awaiting_agent".into(),
            delivery_mode: "push".into(),
            url: None,
            agent_card: None,
            tokens: Vec::new(),
            inbound_secret: ids::new_token(),
            context_id: ids::new_uuid(),
            talk_to_user_enabled: true,
            push_reply: None,
            created_us: ids::now_us(),
            removed_us: None,
            last_heartbeat_us: None,
            heartbeat_count: 0,
            heartbeats: VecDeque::new(),
            register_count: 0,
            last_register: None,
            acked_seq: 0,
            acks: VecDeque::new(),
            active_tasks: 0,
            uptime_seconds: 0,
            current_task: String::new(),
            last_error_rate: 0.0,
            last_sample_error: String::new(),
            wedged: false,
            inbox: Inbox::default(),
            received: Vec::new(),
            received_ids: HashSet::new(),
            notifies: Vec::new(),
        }
    }

    pub fn is_removed(&self) -> bool {
        self.status == "removed"
    }

    /// Status as the platform would show it now: a live workspace whose last
    /// heartbeat is older than the stale window reads `awaiting_agent`.
    pub fn effective_status(&self, now_us: i64) -> &str {
        if matches!(self.status.as_str(), "online" | "degraded")
            && self
                .last_heartbeat_us
                .is_some_and(|t| now_us.saturating_sub(t) > STALE_AFTER_US)
        {
            return "awaiting_agent";
        }
        &self.status
    }

    /// Record a heartbeat payload (§2.2).
    pub fn record_heartbeat(&mut self, payload: &Value) {
        self.heartbeat_count += 1;
        self.heartbeats.push_back(payload.clone());
        while self.heartbeats.len() > KEEP_HEARTBEATS {
            self.heartbeats.pop_front();
        }
        if FROZEN_STATUSES.contains(&self.status.as_str()) {
            return;
        }
        self.last_heartbeat_us = Some(ids::now_us());
        if let Some(n) = payload.get("active_tasks").and_then(Value::as_i64) {
            self.active_tasks = n;
        }
        if let Some(n) = payload.get("uptime_seconds").and_then(Value::as_i64) {
            self.uptime_seconds = n;
        }
        let rate = payload
            .get("error_rate")
            .and_then(Value::as_f64)
            .unwrap_or(0.0);
        self.last_error_rate = rate;
        if let Some(s) = payload.get("sample_error").and_then(Value::as_str) {
            self.last_sample_error = s.to_string();
        }
        if let Some(t) = payload.get("current_task").and_then(Value::as_str) {
            self.current_task = t.to_string();
        }
        let runtime_state = payload
            .get("runtime_state")
            .and_then(Value::as_str)
            .unwrap_or("");
        self.wedged = runtime_state == "wedged";
        if self.status == "degraded" {
            if rate < 0.1 && runtime_state.is_empty() {
                self.status = "online".into();
            }
        } else if self.wedged || rate >= 0.5 {
            self.status = "degraded".into();
        } else {
            self.status = "online".into();
        }
    }

    /// `GET /workspaces/:id` body (§2.12).
    pub fn public_json(&self, now_us: i64) -> Value {
        json!({
            "id": self.id,
            "name": self.name,
            "role": self.role.as_deref().filter(|r| !r.is_empty()),
            "tier": 2,
            "status": self.effective_status(now_us),
            "kind": "workspace",
            "url": self.url.clone().unwrap_or_default(),
            "parent_id": self.parent_id,
            "agent_card": self.agent_card,
            "active_tasks": self.active_tasks,
            "max_concurrent_tasks": 1,
            "last_error_rate": self.last_error_rate,
            "last_sample_error": self.last_sample_error,
            "uptime_seconds": self.uptime_seconds,
            "runtime": "external",
            "x": 0,
            "y": 0,
            "collapsed": false,
            "broadcast_enabled": false,
            "talk_to_user_enabled": self.talk_to_user_enabled,
            "compute": Value::Null,
            "loaded_mcp_tools": [],
            "mcp_surface": Value::Null,
            "last_outbound_at": Value::Null,
            "last_heartbeat_at": self.last_heartbeat_us.map(ids::rfc3339),
            "wedged": self.wedged,
        })
    }

    /// One entry of `GET /registry/:id/peers` (§2.10).
    pub fn peer_json(&self, now_us: i64) -> Value {
        json!({
            "id": self.id,
            "name": self.name,
            "role": self.role.as_deref().filter(|r| !r.is_empty()),
            "tier": 2,
            "status": self.effective_status(now_us),
            "url": self.url.clone().unwrap_or_default(),
            "parent_id": self.parent_id,
            "active_tasks": self.active_tasks,
            "agent_card": self.agent_card,
        })
    }

    /// Full internal record for `GET /_admin/workspaces/:id`.
    pub fn admin_json(&self, now_us: i64) -> Value {
        json!({
            "id": self.id,
            "name": self.name,
            "role": self.role,
            "parent_id": self.parent_id,
            "status": self.status,
            "effective_status": self.effective_status(now_us),
            "delivery_mode": self.delivery_mode,
            "url": self.url,
            "agent_card": self.agent_card,
            "tokens": self.tokens,
            "platform_inbound_secret": self.inbound_secret,
            "context_id": self.context_id,
            "talk_to_user_enabled": self.talk_to_user_enabled,
            "push_reply": self.push_reply.as_ref().map(PushReply::to_json),
            "created_at": ids::rfc3339(self.created_us),
            "removed_at": self.removed_us.map(ids::rfc3339),
            "last_heartbeat_at": self.last_heartbeat_us.map(ids::rfc3339),
            "heartbeat_count": self.heartbeat_count,
            "register_count": self.register_count,
            "acked_seq": self.acked_seq,
            "acks": self.acks.iter().map(|(seq, at)| json!({"seq": seq, "at_ms": at})).collect::<Vec<_>>(),
            "active_tasks": self.active_tasks,
            "rows": self.inbox.len(),
            "received": self.received.len(),
            "notifies": self.notifies.len(),
        })
    }
}

/// A platform-run or recorded delegation (§2.14).
#[derive(Debug, Clone)]
pub struct Delegation {
    pub id: String,
    pub source_id: String,
    pub target_id: String,
    pub task: String,
    pub status: String,
    pub created_us: i64,
    pub updated_us: i64,
    pub order: u64,
    pub response_preview: Option<String>,
    pub error: Option<String>,
    pub idempotency_key: Option<String>,
}

impl Delegation {
    pub fn is_terminal(&self) -> bool {
        matches!(self.status.as_str(), "completed" | "failed")
    }

    /// Ledger-style entry as seen from workspace `viewer`.
    pub fn ledger_json(&self, viewer: &str) -> Value {
        let mut m = Map::new();
        m.insert("delegation_id".into(), Value::from(self.id.as_str()));
        m.insert("source_id".into(), Value::from(self.source_id.as_str()));
        m.insert("target_id".into(), Value::from(self.target_id.as_str()));
        let direction = if self.source_id == viewer {
            "sent"
        } else {
            "received"
        };
        m.insert("direction".into(), Value::from(direction));
        m.insert("summary".into(), Value::from(truncate(&self.task, 300)));
        m.insert("status".into(), Value::from(self.status.as_str()));
        m.insert(
            "created_at".into(),
            Value::from(ids::rfc3339(self.created_us)),
        );
        m.insert(
            "updated_at".into(),
            Value::from(ids::rfc3339(self.updated_us)),
        );
        if let Some(p) = &self.response_preview {
            m.insert("response_preview".into(), Value::from(p.as_str()));
        }
        if let Some(e) = &self.error {
            m.insert("error".into(), Value::from(e.as_str()));
        }
        m.insert("_ledger".into(), Value::Bool(true));
        Value::Object(m)
    }
}

/// At most `max` bytes of `s`, cut on a character boundary.
pub fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Concatenated text of `params.message.parts[]` (parts with `kind` or `type` = `text`).
pub fn message_text(envelope: &Value) -> String {
    let parts = envelope
        .pointer("/params/message/parts")
        .and_then(Value::as_array);
    let mut out: Vec<&str> = Vec::new();
    for p in parts.into_iter().flatten() {
        let kind = p
            .get("kind")
            .or_else(|| p.get("type"))
            .and_then(Value::as_str);
        if kind == Some("text")
            && let Some(t) = p.get("text").and_then(Value::as_str)
        {
            out.push(t);
        }
    }
    out.join("\n")
}

/// The whole emulated platform.
#[derive(Debug, Default)]
pub struct Store {
    pub workspaces: HashMap<String, Workspace>,
    /// token → workspace id
    pub tokens: HashMap<String, String>,
    pub delegations: HashMap<String, Delegation>,
    /// (source workspace, idempotency key) → delegation id
    pub idempotency: HashMap<(String, String), String>,
    /// Event-stream subscribers and stream faults (§2.17).
    pub events: crate::events::Broadcaster,
    /// Memories, requests, uploads, abilities (tools.rs).
    pub tools: crate::tools::Tools,
    seq: i64,
    order: u64,
}

impl Store {
    /// Next global row sequence number.
    pub fn next_seq(&mut self) -> i64 {
        self.seq += 1;
        self.seq
    }

    /// Next insertion counter (tie-breaker for delegation listings).
    pub fn next_order(&mut self) -> u64 {
        self.order += 1;
        self.order
    }

    /// Add `ws` (replacing nothing: callers check for existence first).
    pub fn add_workspace(&mut self, ws: Workspace) {
        self.workspaces.insert(ws.id.clone(), ws);
    }

    /// Attach `token` to workspace `id`. False if the token is taken or `id` unknown.
    pub fn add_token(&mut self, id: &str, token: &str) -> bool {
        if self.tokens.contains_key(token) {
            return false;
        }
        let Some(ws) = self.workspaces.get_mut(id) else {
            return false;
        };
        ws.tokens.push(token.to_string());
        self.tokens.insert(token.to_string(), id.to_string());
        true
    }

    /// Mint a fresh token for `id`.
    pub fn mint_token(&mut self, id: &str) -> Option<String> {
        let token = ids::new_token();
        self.add_token(id, &token).then_some(token)
    }

    /// Revoke every token of `id`; returns how many.
    pub fn revoke_all(&mut self, id: &str) -> usize {
        let Some(ws) = self.workspaces.get_mut(id) else {
            return 0;
        };
        let tokens = std::mem::take(&mut ws.tokens);
        for t in &tokens {
            self.tokens.remove(t);
        }
        tokens.len()
    }

    /// The workspace a live token belongs to (tokens of removed workspaces are dead).
    pub fn token_owner(&self, token: &str) -> Option<&str> {
        let id = self.tokens.get(token)?;
        let ws = self.workspaces.get(id)?;
        (!ws.is_removed()).then_some(id.as_str())
    }

    /// Does `id` hold at least one live token?
    pub fn has_live_token(&self, id: &str) -> bool {
        self.workspaces
            .get(id)
            .is_some_and(|w| !w.is_removed() && !w.tokens.is_empty())
    }

    fn is_ancestor(&self, ancestor: &str, node: &str) -> bool {
        let mut cur = self
            .workspaces
            .get(node)
            .and_then(|w| w.parent_id.as_deref());
        for _ in 0..32 {
            match cur {
                Some(p) if p == ancestor => return true,
                Some(p) => cur = self.workspaces.get(p).and_then(|w| w.parent_id.as_deref()),
                None => return false,
            }
        }
        false
    }

    /// CanCommunicate (§1.6): same; siblings under one parent; ancestor/descendant.
    pub fn can_communicate(&self, a: &str, b: &str) -> bool {
        if a == b {
            return true;
        }
        let (Some(wa), Some(wb)) = (self.workspaces.get(a), self.workspaces.get(b)) else {
            return false;
        };
        if let (Some(pa), Some(pb)) = (&wa.parent_id, &wb.parent_id)
            && pa == pb
        {
            return true;
        }
        self.is_ancestor(a, b) || self.is_ancestor(b, a)
    }

    /// Insert `row` into workspace `ws_id`'s log, stamping id, seq and time
    /// (`created_us` 0 = now). Returns `(row id, duplicate)`; None if unknown workspace.
    pub fn insert_row(&mut self, ws_id: &str, mut row: Row) -> Option<(String, bool)> {
        if !self.workspaces.contains_key(ws_id) {
            return None;
        }
        row.id = ids::new_uuid();
        row.seq = self.next_seq();
        if row.created_us == 0 {
            row.created_us = ids::now_us();
        }
        let ws = self.workspaces.get_mut(ws_id)?;
        Some(ws.inbox.insert(row))
    }

    /// Broadcasts `DELEGATION_SENT` for a new delegation of `source` (§2.17).
    pub fn announce_delegation(&mut self, source: &str, did: &str, target: &str, task: &str) {
        let data = json!({"delegation_id": did, "target_id": target,
                          "task_preview": truncate(task, 100)});
        self.events.publish(source, "DELEGATION_SENT", data);
    }

    /// Inserts an inbound A2A row for `ws_id` and broadcasts what the proxy does
    /// (§2.17): for `message/send`, `ACTIVITY_LOGGED` twice (the ingest write, then
    /// the queued-for-poll write of the same row), with `USER_MESSAGE` between them for
    /// a canvas-class sender; for other methods once. A re-send the platform
    /// deduplicated fires the events again. Returns `(row id, duplicate)`.
    pub fn insert_inbound(&mut self, ws_id: &str, row: Row) -> Option<(String, bool)> {
        let data = row.event_data();
        let canvas = row.source_id.is_null();
        let is_send = row.method.as_str() == Some("message/send");
        let message_id = row.message_id.clone();
        let text = row
            .request_body
            .as_ref()
            .map(message_text)
            .unwrap_or_default();
        let inserted = self.insert_row(ws_id, row)?;
        if is_send {
            let mut ingest = data.clone();
            if let Some(s) = ingest["summary"].as_str() {
                let first = s.replace(" (queued for poll)", "");
                ingest["summary"] = Value::from(format!("{first} (ingest)"));
            }
            self.events.publish(ws_id, "ACTIVITY_LOGGED", ingest);
            if canvas && !text.is_empty() {
                self.events.publish(
                    ws_id,
                    "USER_MESSAGE",
                    json!({"content": text, "message_id": message_id, "workspace_id": ws_id}),
                );
            }
        }
        self.events.publish(ws_id, "ACTIVITY_LOGGED", data);
        Some(inserted)
    }

    /// Move delegation `did` to `status`; when `push_result` is set and the status is
    /// terminal, write a `delegate_result` row into the delegator's inbox (§2.4.1).
    pub fn set_delegation_status(
        &mut self,
        did: &str,
        status: &str,
        text: Option<&str>,
        error: Option<&str>,
        push_result: bool,
    ) -> Option<Delegation> {
        let now = ids::now_us();
        let d = self.delegations.get_mut(did)?;
        d.status = status.to_string();
        d.updated_us = now;
        if let Some(t) = text {
            d.response_preview = Some(truncate(t, 300).to_string());
        }
        if let Some(e) = error {
            d.error = Some(e.to_string());
        }
        let snapshot = d.clone();
        let (kind, data) = match status {
            "completed" => (
                "DELEGATION_COMPLETE",
                json!({"delegation_id": did, "target_id": snapshot.target_id,
                       "response_preview": truncate(text.unwrap_or_default(), 200)}),
            ),
            "failed" => (
                "DELEGATION_FAILED",
                json!({"delegation_id": did, "target_id": snapshot.target_id,
                       "error": snapshot.error.as_deref().unwrap_or_default()}),
            ),
            _ => (
                "DELEGATION_STATUS",
                json!({"delegation_id": did, "target_id": snapshot.target_id, "status": status}),
            ),
        };
        self.events.publish(&snapshot.source_id, kind, data);
        if push_result && snapshot.is_terminal() {
            let mut row = Row::new(&snapshot.source_id, "a2a_receive");
            row.source_id = Value::from(snapshot.source_id.as_str());
            row.target_id = Value::from(snapshot.target_id.as_str());
            row.method = Value::from("delegate_result");
            row.summary = Value::from(format!("Delegation {} {}", snapshot.id, snapshot.status));
            row.request_body = Some(json!({ "delegation_id": snapshot.id }));
            let mut resp = Map::new();
            resp.insert("text".into(), Value::from(text.unwrap_or_default()));
            resp.insert("delegation_id".into(), Value::from(snapshot.id.as_str()));
            if let Some(e) = &snapshot.error {
                resp.insert("error".into(), Value::from(e.as_str()));
            }
            row.response_body = Some(Value::Object(resp));
            if snapshot.status == "failed" {
                row.status = Value::from("error");
                row.error_detail = snapshot.error.clone().map_or(Value::Null, Value::from);
            }
            self.insert_row(&snapshot.source_id, row);
        }
        Some(snapshot)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store_with(tree: &[(&str, Option<&str>)]) -> Store {
        let mut s = Store::default();
        for (id, parent) in tree {
            let mut w = Workspace::new(id, id);
            w.parent_id = parent.map(str::to_string);
            s.add_workspace(w);
        }
        s
    }

    #[test]
    fn can_communicate_rules() {
        let s = store_with(&[
            ("root", None),
            ("a", Some("root")),
            ("b", Some("root")),
            ("a1", Some("a")),
            ("a11", Some("a1")),
            ("other", None),
        ]);
        assert!(s.can_communicate("a", "a"));
        assert!(s.can_communicate("a", "b"), "siblings");
        assert!(s.can_communicate("root", "a"), "parent/child");
        assert!(s.can_communicate("a", "root"), "symmetric");
        assert!(s.can_communicate("root", "a11"), "ancestor");
        assert!(s.can_communicate("a11", "a"), "descendant");
        assert!(!s.can_communicate("a1", "b"), "cousin/uncle");
        assert!(!s.can_communicate("root", "other"), "two roots");
        assert!(!s.can_communicate("a", "ghost"));
    }

    #[test]
    fn can_communicate_survives_cycles() {
        let s = store_with(&[("x", Some("y")), ("y", Some("x")), ("z", None)]);
        assert!(s.can_communicate("x", "y"));
        assert!(!s.can_communicate("x", "z"));
    }

    fn row_at(s: &mut Store, ws: &str, t: i64, mid: Option<&str>) -> String {
        let mut r = Row::new(ws, "a2a_receive");
        r.created_us = t;
        r.message_id = mid.map(str::to_string);
        s.insert_row(ws, r).unwrap().0
    }

    #[test]
    fn ordering_and_cursor() {
        let mut s = store_with(&[("w", None)]);
        let a = row_at(&mut s, "w", 100, None);
        let b = row_at(&mut s, "w", 100, None); // same time, higher seq
        let c = row_at(&mut s, "w", 50, None); // backdated
        let d = row_at(&mut s, "w", 200, None);
        let inbox = &s.workspaces["w"].inbox;
        let mut q = ActivityQuery {
            limit: 100,
            ..Default::default()
        };
        let ids: Vec<_> = inbox.query(&q).iter().map(|r| r.id.clone()).collect();
        assert_eq!(ids, vec![d.clone(), b.clone(), a.clone(), c.clone()]);
        q.after_key = inbox.key_of(&a);
        let ids: Vec<_> = inbox.query(&q).iter().map(|r| r.id.clone()).collect();
        assert_eq!(ids, vec![b.clone(), d.clone()]);
        q.after_key = inbox.key_of(&c);
        q.limit = 2;
        let ids: Vec<_> = inbox.query(&q).iter().map(|r| r.id.clone()).collect();
        assert_eq!(ids, vec![a, b]);
        q.after_key = inbox.key_of(&d);
        assert!(inbox.query(&q).is_empty());
        q.after_key = None;
        q.since_us = Some(100);
        q.limit = 100;
        assert_eq!(inbox.query(&q).len(), 3);
    }

    #[test]
    fn dedupe_by_message_id_and_prune() {
        let mut s = store_with(&[("w", None), ("v", None)]);
        let a = row_at(&mut s, "w", 10, Some("m1"));
        let mut r = Row::new("w", "a2a_receive");
        r.message_id = Some("m1".into());
        assert_eq!(s.insert_row("w", r), Some((a.clone(), true)));
        // Same message id in another workspace is a new row.
        let b = row_at(&mut s, "v", 10, Some("m1"));
        assert_ne!(a, b);
        assert_eq!(s.workspaces["w"].inbox.len(), 1);
        assert!(s.workspaces.get_mut("w").unwrap().inbox.remove(&a));
        assert_eq!(s.workspaces["w"].inbox.key_of(&a), None);
        // After pruning, the message id is free again.
        let c = row_at(&mut s, "w", 10, Some("m1"));
        assert_ne!(c, a);
    }

    #[test]
    fn tokens_die_with_workspace() {
        let mut s = store_with(&[("w", None)]);
        let t = s.mint_token("w").unwrap();
        assert_eq!(s.token_owner(&t), Some("w"));
        assert!(s.has_live_token("w"));
        s.workspaces.get_mut("w").unwrap().status = "removed".into();
        assert_eq!(s.token_owner(&t), None);
        assert!(!s.has_live_token("w"));
        assert_eq!(s.revoke_all("w"), 1);
        assert!(!s.add_token("ghost", "x"));
    }

    #[test]
    fn text_extraction() {
        let env = json!({"params":{"message":{"parts":[
            {"kind":"text","text":"a"},{"type":"text","text":"b"},{"kind":"file"},{"kind":"text"}]}}});
        assert_eq!(message_text(&env), "a\nb");
        assert_eq!(message_text(&json!(null)), "");
        assert_eq!(truncate("héllo", 2), "h");
    }
}
