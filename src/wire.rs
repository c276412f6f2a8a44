//! Serde shapes of the platform's JSON (PLATFORM_API.md). Lenient on input: unknown
//! fields are ignored and anything the platform may omit is optional. No logic, no I/O.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// `POST /registry/register` body (§API-2.1).
#[derive(Debug, Serialize)]
pub struct RegisterRequest<'a> {
    /// Our workspace id.
    pub id: &'a str,
    /// Agent card; the platform fills gaps from the workspace row.
    pub agent_card: Value,
    /// Always `"poll"`: the stored default is push (§API-2.1).
    pub delivery_mode: &'a str,
}

/// `POST /registry/register` answer.
#[derive(Debug, Default, Deserialize)]
pub struct RegisterResponse {
    /// The effective mode; must be `"poll"`.
    #[serde(default)]
    pub delivery_mode: Option<String>,
    /// Only when the platform minted a token (bootstrap). Prints as `***`.
    #[serde(default)]
    pub auth_token: Option<crate::config::Secret>,
}

/// `POST /registry/heartbeat` body (§API-2.2).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Heartbeat {
    /// Our workspace id.
    pub workspace_id: String,
    /// Rolling failure rate of recent backend runs, 0.0 to 1.0.
    pub error_rate: f64,
    /// Last failure, short; empty when none.
    pub sample_error: String,
    /// Backend runs in progress.
    pub active_tasks: u32,
    /// Summary of what the backend is working on; empty when idle.
    pub current_task: String,
    /// Seconds since the connector started.
    pub uptime_seconds: u64,
    /// `"wedged"` only while the backend keeps failing; omitted otherwise so the
    /// platform can recover the workspace (§API-5.7).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub runtime_state: Option<String>,
    /// Sent on every beat: omitting it clears declared overrides (§API-2.2).
    pub runtime_metadata: Value,
}

/// One activity-log row (§API-2.4). Everything but `id` may be missing or odd.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct ActivityRow {
    /// Row id, the cursor value.
    #[serde(default)]
    pub id: String,
    /// Sender workspace; null for canvas users.
    #[serde(default)]
    pub source_id: Option<String>,
    /// JSON-RPC method or a marker (`notify`, `delegate_result`, ...).
    #[serde(default)]
    pub method: Option<String>,
    /// The normalised JSON-RPC envelope; absent for notify echoes.
    #[serde(default)]
    pub request_body: Option<Value>,
    /// RFC 3339 timestamp.
    #[serde(default)]
    pub created_at: Option<String>,
    /// Monotonic sequence (newer servers).
    #[serde(default)]
    pub seq: Option<i64>,
    /// With `include=peer_info`.
    #[serde(default)]
    pub peer_name: Option<String>,
    /// With `include=peer_info`.
    #[serde(default)]
    pub peer_role: Option<String>,
}

/// `POST /workspaces/:id/notify` body (§API-2.13).
#[derive(Debug, Serialize)]
pub struct NotifyRequest<'a> {
    /// Non-empty message text.
    pub message: &'a str,
    /// Attachments by URI.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub attachments: Vec<Value>,
}

/// A heartbeat sent by `molecule heartbeat` (§API-2.2): only the fields the operator
/// gave, plus `runtime_metadata`; never `runtime_state`.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ManualHeartbeat {
    /// Our workspace id.
    pub workspace_id: String,
    /// Failure rate, 0.0 to 1.0.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error_rate: Option<f64>,
    /// Last error.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sample_error: Option<String>,
    /// Tasks in progress.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub active_tasks: Option<u32>,
    /// What the agent is working on.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub current_task: Option<String>,
    /// Seconds since the agent started, when it knows.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub uptime_seconds: Option<u64>,
    /// Sent every time: omitting it clears declared overrides (§API-2.2).
    pub runtime_metadata: Value,
}

/// `POST /workspaces/:id/delegate` body (§API-2.14).
#[derive(Debug, Serialize)]
pub struct DelegateRequest<'a> {
    /// Target workspace (UUID).
    pub target_id: &'a str,
    /// The task text.
    pub task: &'a str,
    /// Replay key: a repeated key returns the existing delegation unless it failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<&'a str>,
}

/// `POST /workspaces/:id/delegate` answer (202 new, 200 idempotent replay).
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
pub struct DelegateResponse {
    /// The delegation id.
    #[serde(default)]
    pub delegation_id: String,
    /// `delegated`, or the current status on a replay.
    #[serde(default)]
    pub status: Option<String>,
    /// Target workspace.
    #[serde(default)]
    pub target_id: Option<String>,
    /// The key matched an earlier delegation that has not failed.
    #[serde(default)]
    pub idempotent_hit: bool,
    /// e.g. "delegation dispatched but status tracking unavailable".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warning: Option<String>,
}

/// The platform's error body: `{"error": ..., "hint"?: ..., ...}` (§API-1.5).
#[derive(Debug, Default, Deserialize)]
pub struct ErrorBody {
    /// Human text.
    #[serde(default)]
    pub error: Option<Value>,
    /// Optional hint.
    #[serde(default)]
    pub hint: Option<String>,
    /// Optional detail.
    #[serde(default)]
    pub detail: Option<Value>,
    /// Seconds to wait (429, some 503s).
    #[serde(default)]
    pub retry_after: Option<Value>,
    /// 502 on /a2a: the target did receive the message.
    #[serde(default)]
    pub delivery_confirmed: Option<bool>,
    /// 503 on /a2a: target busy.
    #[serde(default)]
    pub busy: Option<bool>,
    /// Machine code (`TENANT_ORG_HEADER_REQUIRED`, ...).
    #[serde(default)]
    pub code: Option<String>,
}

/// The agent card we register with (§API-2.1). A name equal to the id is replaced
/// by the workspace's display name, so the operator's name is kept.
pub fn agent_card(workspace_id: &str) -> Value {
    serde_json::json!({
        "name": workspace_id,
        "description": "",
        "version": crate::VERSION,
        "skills": [],
        "capabilities": {"streaming": false, "pushNotifications": false},
    })
}

/// The `runtime_metadata` sent with every heartbeat: omitting it would clear what
/// was declared before (§API-2.2).
pub fn runtime_metadata() -> Value {
    serde_json::json!({
        "capabilities": {"streaming": false, "pushNotifications": false},
        "connector": format!("molecule {}", crate::VERSION),
        "delivery_mode": "poll",
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn activity_row_tolerates_missing_and_unknown_fields() {
        let rows: Vec<ActivityRow> = serde_json::from_str(
            r#"[{"id":"a","workspace_id":"w","activity_type":"a2a_receive","source_id":null,
                 "method":"notify","status":"ok","created_at":"2026-01-01T00:00:00.1+00:00",
                 "seq":7,"brand_new_field":{"x":1}},
                {"id":"b"}]"#,
        )
        .unwrap();
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].method.as_deref(), Some("notify"));
        assert!(rows[0].request_body.is_none());
        assert_eq!(rows[0].seq, Some(7));
        assert!(rows[1].source_id.is_none());
    }

    #[test]
    fn heartbeat_omits_runtime_state_when_healthy() {
        let hb = Heartbeat {
            workspace_id: "w".into(),
            error_rate: 0.0,
            sample_error: String::new(),
            active_tasks: 0,
            current_task: String::new(),
            uptime_seconds: 5,
            runtime_state: None,
            runtime_metadata: serde_json::json!({}),
        };
        let v = serde_json::to_value(&hb).unwrap();
        assert!(v.get("runtime_state").is_none());
        assert_eq!(v["uptime_seconds"], 5);
        assert!(v.get("runtime_metadata").is_some());
    }

    #[test]
    fn manual_heartbeat_sends_only_given_fields() {
        let hb = ManualHeartbeat {
            workspace_id: "w".into(),
            error_rate: None,
            sample_error: None,
            active_tasks: Some(2),
            current_task: Some("x".into()),
            uptime_seconds: None,
            runtime_metadata: serde_json::json!({"a": 1}),
        };
        let v = serde_json::to_value(&hb).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"workspace_id":"w","active_tasks":2,"current_task":"x","runtime_metadata":{"a":1}})
        );
        let d: DelegateResponse = serde_json::from_str(
            r#"{"delegation_id":"d","status":"queued","idempotent_hit":true,"z":0}"#,
        )
        .unwrap();
        assert!(d.idempotent_hit);
        let r = DelegateRequest {
            target_id: "t",
            task: "do",
            idempotency_key: None,
        };
        assert!(
            serde_json::to_value(&r)
                .unwrap()
                .get("idempotency_key")
                .is_none()
        );
    }

    #[test]
    fn error_body_parses_leniently() {
        let e: ErrorBody =
            serde_json::from_str(r#"{"error":"workspace removed","hint":"make a new one","x":1}"#)
                .unwrap();
        assert_eq!(e.hint.as_deref(), Some("make a new one"));
        let e: ErrorBody = serde_json::from_str(r#"{"error":{"nested":true}}"#).unwrap();
        assert!(e.error.is_some());
    }
}
