//! Request statistics for `GET /_admin/stats`: totals, per templated route, per status,
//! and the last 1000 requests (never any header values).

use std::collections::{BTreeMap, VecDeque};

use serde_json::{Map, Value, json};

const KEEP_REQUESTS: usize = 1000;

#[derive(Debug, Clone)]
struct Entry {
    method: String,
    path: String,
    query: String,
    status: u16,
    at_ms: i64,
    workspace_id: Option<String>,
}

/// Counters since start or the last reset.
#[derive(Debug, Default)]
pub struct Stats {
    total: u64,
    by_route: BTreeMap<String, u64>,
    by_status: BTreeMap<String, u64>,
    recent: VecDeque<Entry>,
}

impl Stats {
    /// Count one request. `route` is the templated route (`GET /workspaces/:id/activity`);
    /// status 0 means the connection was dropped by a fault.
    #[allow(clippy::too_many_arguments)]
    pub fn record(
        &mut self,
        method: &str,
        route: &str,
        path: &str,
        query: &str,
        status: u16,
        at_ms: i64,
        workspace_id: Option<&str>,
    ) {
        self.total += 1;
        *self.by_route.entry(route.to_string()).or_default() += 1;
        *self.by_status.entry(status.to_string()).or_default() += 1;
        if self.recent.len() >= KEEP_REQUESTS {
            self.recent.pop_front();
        }
        self.recent.push_back(Entry {
            method: method.to_string(),
            path: path.to_string(),
            query: query.to_string(),
            status,
            at_ms,
            workspace_id: workspace_id.map(str::to_string),
        });
    }

    pub fn reset(&mut self) {
        *self = Stats::default();
    }

    pub fn to_json(&self) -> Value {
        let requests: Vec<Value> = self
            .recent
            .iter()
            .map(|e| {
                let mut m = Map::new();
                m.insert("method".into(), Value::from(e.method.as_str()));
                m.insert("path".into(), Value::from(e.path.as_str()));
                m.insert("query".into(), Value::from(e.query.as_str()));
                m.insert("status".into(), Value::from(e.status));
                m.insert("at_ms".into(), Value::from(e.at_ms));
                if let Some(w) = &e.workspace_id {
                    m.insert("workspace_id".into(), Value::from(w.as_str()));
                }
                Value::Object(m)
            })
            .collect();
        json!({
            "requests_total": self.total,
            "by_route": self.by_route,
            "by_status": self.by_status,
            "requests": requests,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_and_caps() {
        let mut s = Stats::default();
        for i in 0..1005 {
            s.record("GET", "GET /health", "/health", "", 200, i, None);
        }
        s.record(
            "POST",
            "POST /workspaces/:id/a2a",
            "/workspaces/w/a2a",
            "",
            502,
            1,
            Some("w"),
        );
        let v = s.to_json();
        assert_eq!(v["requests_total"], 1006);
        assert_eq!(v["by_route"]["GET /health"], 1005);
        assert_eq!(v["by_status"]["502"], 1);
        let reqs = v["requests"].as_array().unwrap();
        assert_eq!(reqs.len(), 1000);
        assert_eq!(reqs[999]["workspace_id"], "w");
        assert!(reqs[0].get("workspace_id").is_none());
        s.reset();
        assert_eq!(s.to_json()["requests_total"], 0);
    }
}
