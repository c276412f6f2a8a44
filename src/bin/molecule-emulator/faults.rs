//! Fault injection: scripted failures (status, body, headers, delay, dropped
//! connection) applied to the next N matching non-admin requests, in the order added.

use serde_json::{Value, json};

/// One scripted fault.
#[derive(Debug, Clone)]
pub struct Fault {
    pub id: u64,
    pub method: Option<String>,
    pub path_prefix: Option<String>,
    pub remaining: u64,
    pub action: FaultAction,
}

/// What a matched fault does to the request.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FaultAction {
    /// Sleep this long before anything else.
    pub delay_ms: u64,
    /// Close the connection without answering.
    pub drop: bool,
    /// Handle the request, then close the connection without answering: the
    /// "delivered, but the answer was lost" case a client must not double up.
    pub drop_after: bool,
    /// Apply `delay_ms`, `drop` and `status` after handling the request: the platform
    /// did the work and the answer is late, lost, or replaced by a gateway's 5xx.
    pub after: bool,
    /// Answer with this status (and `body`, `headers`) instead of handling.
    pub status: Option<u16>,
    pub body: Value,
    pub headers: Vec<(String, String)>,
}

/// The fault list.
#[derive(Debug, Default)]
pub struct Faults {
    next_id: u64,
    list: Vec<Fault>,
}

impl Faults {
    /// Add a fault from its admin JSON; returns its id.
    pub fn add(&mut self, spec: &Value) -> Result<u64, String> {
        if !spec.is_object() {
            return Err("fault must be a JSON object".into());
        }
        let method = match spec.get("method") {
            None | Some(Value::Null) => None,
            Some(Value::String(m)) => Some(m.to_ascii_uppercase()),
            Some(_) => return Err("method must be a string".into()),
        };
        let path_prefix = match spec.get("path_prefix") {
            None | Some(Value::Null) => None,
            Some(Value::String(p)) => Some(p.clone()),
            Some(_) => return Err("path_prefix must be a string".into()),
        };
        let count = match spec.get("count") {
            None | Some(Value::Null) => 1,
            Some(v) => v.as_u64().filter(|n| *n >= 1).ok_or("count must be >= 1")?,
        };
        let status = match spec.get("status") {
            None | Some(Value::Null) => None,
            Some(v) => Some(
                v.as_u64()
                    .filter(|s| (100..=599).contains(s))
                    .ok_or("status must be an HTTP status code")? as u16,
            ),
        };
        let mut headers = Vec::new();
        match spec.get("headers") {
            None | Some(Value::Null) => {}
            Some(Value::Object(m)) => {
                for (k, v) in m {
                    let v = match v {
                        Value::String(s) => s.clone(),
                        other => other.to_string(),
                    };
                    headers.push((k.clone(), v));
                }
            }
            Some(_) => return Err("headers must be an object".into()),
        }
        let action = FaultAction {
            delay_ms: spec.get("delay_ms").and_then(Value::as_u64).unwrap_or(0),
            drop: spec.get("drop").and_then(Value::as_bool).unwrap_or(false),
            drop_after: spec
                .get("drop_after")
                .and_then(Value::as_bool)
                .unwrap_or(false),
            after: spec.get("after").and_then(Value::as_bool).unwrap_or(false),
            status,
            body: spec
                .get("body")
                .cloned()
                .unwrap_or_else(|| json!({"error": "injected fault"})),
            headers,
        };
        self.next_id += 1;
        self.list.push(Fault {
            id: self.next_id,
            method,
            path_prefix,
            remaining: count,
            action,
        });
        Ok(self.next_id)
    }

    /// Remove every fault; returns how many were pending.
    pub fn clear(&mut self) -> usize {
        let n = self.list.len();
        self.list.clear();
        n
    }

    /// Pending faults, for `GET /_admin/faults`.
    pub fn to_json(&self) -> Value {
        Value::Array(
            self.list
                .iter()
                .map(|f| {
                    json!({
                        "fault_id": f.id,
                        "method": f.method,
                        "path_prefix": f.path_prefix,
                        "remaining": f.remaining,
                        "status": f.action.status,
                        "delay_ms": f.action.delay_ms,
                        "drop": f.action.drop,
                        "drop_after": f.action.drop_after,
                        "after": f.action.after,
                    })
                })
                .collect(),
        )
    }

    /// Consume one use of the first fault matching `method` and `path` (no query).
    pub fn take(&mut self, method: &str, path: &str) -> Option<FaultAction> {
        if self.list.is_empty() {
            return None;
        }
        let idx = self.list.iter().position(|f| {
            f.method.as_deref().is_none_or(|m| m == method)
                && f.path_prefix.as_deref().is_none_or(|p| path.starts_with(p))
        })?;
        let fault = &mut self.list[idx];
        fault.remaining -= 1;
        let action = fault.action.clone();
        if fault.remaining == 0 {
            self.list.remove(idx);
        }
        Some(action)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matching_order_and_counts() {
        let mut f = Faults::default();
        let a = f
            .add(
                &json!({"method":"get","path_prefix":"/workspaces/","count":2,"status":503,
                          "headers":{"Retry-After":"2"}}),
            )
            .unwrap();
        let b = f.add(&json!({"status": 500})).unwrap();
        assert!(b > a);
        // POST does not match the first fault, so it takes the catch-all.
        let act = f.take("POST", "/workspaces/x/a2a").unwrap();
        assert_eq!(act.status, Some(500));
        assert_eq!(act.body, json!({"error":"injected fault"}));
        assert!(f.take("POST", "/x").is_none());
        let act = f.take("GET", "/workspaces/x/activity").unwrap();
        assert_eq!(act.status, Some(503));
        assert_eq!(act.headers, vec![("Retry-After".into(), "2".into())]);
        assert!(f.take("GET", "/health").is_none(), "prefix must match");
        assert!(f.take("GET", "/workspaces/y").is_some());
        assert!(f.take("GET", "/workspaces/y").is_none(), "count exhausted");
    }

    #[test]
    fn delay_and_drop() {
        let mut f = Faults::default();
        f.add(&json!({"delay_ms": 5})).unwrap();
        f.add(&json!({"drop": true})).unwrap();
        let a = f.take("GET", "/a").unwrap();
        assert_eq!((a.delay_ms, a.drop, a.status), (5, false, None));
        let b = f.take("GET", "/a").unwrap();
        assert!(b.drop);
        assert_eq!(f.clear(), 0);
        f.add(&json!({"after": true, "status": 502})).unwrap();
        let c = f.take("POST", "/a").unwrap();
        assert!(c.after && c.status == Some(502));
    }

    #[test]
    fn rejects_bad_specs() {
        let mut f = Faults::default();
        assert!(f.add(&json!([])).is_err());
        assert!(f.add(&json!({"count": 0})).is_err());
        assert!(f.add(&json!({"status": 99})).is_err());
        assert!(f.add(&json!({"headers": "x"})).is_err());
    }
}
