//! Cross-cutting middleware: the SaaS tenant guard (§1.3) and the fixed-window rate
//! limiter (§1.4).

use std::collections::HashMap;
use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::time::{Duration, Instant};

use serde_json::json;

use crate::http::{Request, Response};

/// Paths the tenant guard lets through without an org header.
fn tenant_exempt(path: &str) -> bool {
    matches!(
        path,
        "/health" | "/buildinfo" | "/metrics" | "/registry/register" | "/registry/heartbeat"
    ) || path.starts_with("/_admin/")
        || path == "/_admin"
}

/// Does `Origin`/`Referer` claim the same origin as `Host`?
fn same_origin(req: &Request) -> bool {
    let Some(host) = req.header("host").filter(|h| !h.is_empty()) else {
        return false;
    };
    let matches = |v: &str| {
        ["http://", "https://"].iter().any(|scheme| {
            v.strip_prefix(scheme)
                .and_then(|rest| rest.strip_prefix(host))
                .is_some_and(|tail| tail.is_empty() || tail.starts_with('/'))
        })
    };
    req.header("origin").is_some_and(matches) || req.header("referer").is_some_and(matches)
}

/// Tenant guard for org `org_id`: None = let through, Some(resp) = reject.
pub fn tenant_guard(org_id: &str, req: &Request) -> Option<Response> {
    if tenant_exempt(&req.path) {
        return None;
    }
    let header = req
        .header("x-molecule-org-id")
        .map(str::trim)
        .filter(|h| !h.is_empty());
    if header == Some(org_id) || same_origin(req) {
        return None;
    }
    match header {
        None => Some(Response::json(
            400,
            &json!({
                "error": "missing tenant routing header",
                "code": "TENANT_ORG_HEADER_REQUIRED",
                "required_header": "X-Molecule-Org-Id",
                "detail": "This tenant requires the X-Molecule-Org-Id header (or a same-origin Origin/Referer) on every request except /health, /registry/register and /registry/heartbeat.",
            }),
        )),
        Some(_) => Some(Response::empty(404)),
    }
}

/// Outcome of one rate-limit check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateDecision {
    pub allowed: bool,
    pub limit: u64,
    pub remaining: u64,
    /// Seconds until the bucket's window resets (at least 1).
    pub reset_secs: u64,
}

impl RateDecision {
    /// Add the `X-RateLimit-*` headers to `resp`.
    pub fn decorate(&self, resp: Response) -> Response {
        resp.with_header("X-RateLimit-Limit", self.limit.to_string())
            .with_header("X-RateLimit-Remaining", self.remaining.to_string())
            .with_header("X-RateLimit-Reset", self.reset_secs.to_string())
    }

    /// The 429 answer.
    pub fn rejection(&self) -> Response {
        Response::json(
            429,
            &json!({"error": "rate limit exceeded", "retry_after": self.reset_secs}),
        )
        .with_header("Retry-After", self.reset_secs.to_string())
    }
}

/// Fixed 60-second windows per bucket.
#[derive(Debug)]
pub struct RateLimiter {
    limit: u64,
    window: Duration,
    buckets: HashMap<String, (Instant, u64)>,
}

impl RateLimiter {
    pub fn new(limit: u64) -> Self {
        Self::with_window(limit, Duration::from_secs(60))
    }

    pub fn with_window(limit: u64, window: Duration) -> Self {
        RateLimiter {
            limit,
            window,
            buckets: HashMap::new(),
        }
    }

    /// Bucket key: org header, else a hash of the bearer, else the client IP.
    pub fn key_for(req: &Request) -> String {
        if let Some(org) = req.header("x-molecule-org-id").filter(|s| !s.is_empty()) {
            return format!("org:{org}");
        }
        if let Some(tok) = req
            .header("authorization")
            .and_then(|a| a.strip_prefix("Bearer "))
            .filter(|t| !t.is_empty())
        {
            let mut h = DefaultHasher::new();
            tok.hash(&mut h);
            return format!("tok:{:016x}", h.finish());
        }
        format!("ip:{}", req.peer_ip)
    }

    /// Count one request in `key`'s bucket at `now`.
    pub fn check(&mut self, key: &str, now: Instant) -> RateDecision {
        if self.buckets.len() > 10_000 {
            let window = self.window;
            self.buckets
                .retain(|_, (start, _)| now.duration_since(*start) < window);
        }
        let entry = self.buckets.entry(key.to_string()).or_insert((now, 0));
        if now.duration_since(entry.0) >= self.window {
            *entry = (now, 0);
        }
        let elapsed = now.duration_since(entry.0);
        let left = self.window.saturating_sub(elapsed);
        let reset_secs = left.as_secs() + u64::from(left.subsec_nanos() > 0);
        let reset_secs = reset_secs.max(1);
        if entry.1 >= self.limit {
            return RateDecision {
                allowed: false,
                limit: self.limit,
                remaining: 0,
                reset_secs,
            };
        }
        entry.1 += 1;
        RateDecision {
            allowed: true,
            limit: self.limit,
            remaining: self.limit - entry.1,
            reset_secs,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(path: &str, headers: &[(&str, &str)]) -> Request {
        Request {
            method: "GET".into(),
            path: path.into(),
            headers: headers
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            peer_ip: "127.0.0.1".into(),
            ..Request::default()
        }
    }

    #[test]
    fn tenant_guard_rules() {
        let org = "org-1";
        assert!(tenant_guard(org, &req("/health", &[])).is_none());
        assert!(tenant_guard(org, &req("/registry/register", &[])).is_none());
        assert!(tenant_guard(org, &req("/_admin/stats", &[])).is_none());
        let r = tenant_guard(org, &req("/workspaces/x/activity", &[])).unwrap();
        assert_eq!(r.status, 400);
        assert!(String::from_utf8_lossy(&r.body).contains("TENANT_ORG_HEADER_REQUIRED"));
        let r = tenant_guard(org, &req("/workspaces/x", &[("x-molecule-org-id", "nope")])).unwrap();
        assert_eq!((r.status, r.body.len()), (404, 0));
        assert!(
            tenant_guard(
                org,
                &req("/workspaces/x", &[("x-molecule-org-id", "org-1")])
            )
            .is_none()
        );
        let same = [("host", "127.0.0.1:9"), ("origin", "http://127.0.0.1:9")];
        assert!(tenant_guard(org, &req("/workspaces/x", &same)).is_none());
        let referer = [("host", "h:1"), ("referer", "http://h:1/canvas")];
        assert!(tenant_guard(org, &req("/workspaces/x", &referer)).is_none());
        let other = [("host", "h:1"), ("origin", "http://h:12")];
        assert_eq!(
            tenant_guard(org, &req("/workspaces/x", &other))
                .unwrap()
                .status,
            400
        );
    }

    #[test]
    fn rate_limit_window() {
        let mut rl = RateLimiter::with_window(2, Duration::from_secs(60));
        let t0 = Instant::now();
        assert!(rl.check("k", t0).allowed);
        let d = rl.check("k", t0);
        assert!(d.allowed && d.remaining == 0);
        let d = rl.check("k", t0 + Duration::from_secs(10));
        assert!(!d.allowed);
        assert_eq!(d.reset_secs, 50);
        assert!(rl.check("other", t0).allowed);
        assert!(rl.check("k", t0 + Duration::from_secs(61)).allowed);
        let key = RateLimiter::key_for(&req("/x", &[("authorization", "Bearer abc")]));
        assert!(key.starts_with("tok:") && !key.contains("abc"));
        assert_eq!(RateLimiter::key_for(&req("/x", &[])), "ip:127.0.0.1");
    }
}
