//! `Client`: the one `ureq::Agent`, the base URL, the auth headers, and one method per
//! platform endpoint. Status codes are ours to interpret (`http_status_as_error` off),
//! every body is read with a size cap, and every failure becomes one `ApiError` with
//! one retry classification (§API-4.3). No sleeping, no retrying, no logging of
//! secrets here: the caller decides what to do with an error.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde_json::Value;
use ureq::http::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE, HeaderName, HeaderValue, ORIGIN};

use crate::config::Secret;
use crate::credentials::Credentials;
use crate::uuid::WorkspaceId;
use crate::wire::{
    ActivityRow, DelegateRequest, DelegateResponse, ErrorBody, Heartbeat, ManualHeartbeat,
    NotifyRequest, RegisterRequest, RegisterResponse,
};

/// Cap for small JSON answers (register, heartbeat, notify, errors).
const SMALL_BODY_LIMIT: u64 = 256 * 1024;
/// Cap for lists (peers with agent cards, delegations).
const LIST_BODY_LIMIT: u64 = 8 * 1024 * 1024;
/// Cap for an `/a2a` answer (a push-mode peer's reply text).
const A2A_BODY_LIMIT: u64 = 16 * 1024 * 1024;
/// The platform refuses `/a2a` bodies above this (§API-2.7.2).
pub const A2A_REQUEST_LIMIT: usize = 16 * 1024 * 1024;
/// Longest error-body snippet kept in an error (STYLE: ≤ 200 bytes).
const SNIPPET_LEN: usize = 200;
/// Longest wait a `Retry-After` may ask of us.
const RETRY_AFTER_CAP: Duration = Duration::from_secs(300);
/// Whole-request and connect limits of ordinary calls, unless configured.
const TIMEOUT: Duration = Duration::from_secs(30);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// What went wrong talking to the platform.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ApiError {
    /// DNS, connect, TLS or I/O failure: the request may not have arrived.
    Transport {
        /// Operation, e.g. `poll`.
        op: &'static str,
        /// What the transport said.
        detail: String,
    },
    /// No complete answer in time. For a send this does not mean "not delivered".
    Timeout {
        /// Operation.
        op: &'static str,
    },
    /// The platform answered with a non-success status.
    Status {
        /// Operation.
        op: &'static str,
        /// HTTP status.
        status: u16,
        /// `error` (+ `hint`/`detail`) from the body, or a snippet of it.
        message: String,
        /// The body's `hint`, when present (410 on `/workspaces/:id`).
        hint: Option<String>,
        /// `Retry-After` header or `retry_after` body field, clamped.
        retry_after: Option<Duration>,
        /// 502 from `/a2a` with `delivery_confirmed:true`: delivered, do not resend.
        delivery_confirmed: bool,
        /// 503 from `/a2a` with `busy:true`: not delivered, queue full.
        busy: bool,
        /// The body's `code`, when present.
        code: Option<String>,
    },
    /// The answer was larger than we accept for this endpoint.
    TooLarge {
        /// Operation.
        op: &'static str,
        /// The cap in bytes.
        limit: u64,
    },
    /// A success status with a body we could not parse.
    BadBody {
        /// Operation.
        op: &'static str,
        /// Parser message.
        detail: String,
    },
    /// The platform cannot be used as configured: it redirects (the token must not
    /// follow), its certificate does not verify, or the port does not speak TLS.
    /// Retrying cannot help; the operator must change `--api-url` or `--ca-file`.
    Misconfigured {
        /// Operation.
        op: &'static str,
        /// What is wrong and what to do.
        detail: String,
    },
    /// A request we refuse to send (bad URL, body too large): our side, permanent.
    Invalid {
        /// Operation.
        op: &'static str,
        /// Why.
        detail: String,
    },
}

/// What a failed platform call means: the one reading of statuses and body flags
/// (§API-4.3). Callers branch on this, never on a raw status code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// No answer: the transport failed or timed out (the request may have arrived).
    NoAnswer,
    /// 429: over the rate limit; wait [`ApiError::retry_after`].
    RateLimited,
    /// 408: the platform gave up waiting for our request.
    RequestTimeout,
    /// A 5xx not covered below: platform trouble.
    ServerError,
    /// 503 (not `busy`): the platform, a feature or the target is not available now.
    Unavailable,
    /// A 5xx with `busy:true` (503 from `/a2a`): not delivered, the target's queue is full.
    Busy,
    /// A 5xx with `delivery_confirmed:true` (502 from `/a2a`): delivered; never resend.
    Delivered,
    /// A success status whose body we could not read: the call was applied.
    Unreadable,
    /// 401: the token was rejected.
    Unauthorized,
    /// 403: this token may not do that.
    Forbidden,
    /// 404: no such thing (or, empty, not the platform's route).
    NotFound,
    /// 410: gone for good (a removed workspace, a pruned cursor).
    Gone,
    /// 400: the platform cannot use the request as sent.
    BadRequest,
    /// 413: the request is larger than the platform accepts.
    RequestTooLarge,
    /// 409: conflicts with the current state (e.g. a request already answered).
    Conflict,
    /// 422: well-formed, but not for this workspace (e.g. uploads need poll mode).
    Unprocessable,
    /// Any other refusal (409, other 4xx).
    Rejected,
    /// The answer was larger than we accept ([`ApiError::TooLarge`]).
    AnswerTooLarge,
    /// The platform cannot be used as configured ([`ApiError::Misconfigured`]).
    Misconfigured,
    /// A request we refused to send ([`ApiError::Invalid`]).
    Invalid,
}

impl ApiError {
    /// What this error means; see [`Kind`].
    pub fn kind(&self) -> Kind {
        match self {
            ApiError::Transport { .. } | ApiError::Timeout { .. } => Kind::NoAnswer,
            ApiError::BadBody { .. } => Kind::Unreadable,
            ApiError::TooLarge { .. } => Kind::AnswerTooLarge,
            ApiError::Misconfigured { .. } => Kind::Misconfigured,
            ApiError::Invalid { .. } => Kind::Invalid,
            ApiError::Status {
                status,
                delivery_confirmed,
                busy,
                ..
            } => match *status {
                // The body's flags speak only for an answer that would be retried.
                s if s >= 500 && *delivery_confirmed => Kind::Delivered,
                s if s >= 500 && *busy => Kind::Busy,
                s => Kind::of_status(s),
            },
        }
    }

    /// May succeed on a later try (§API-4.3): no answer, 408, 429, 5xx, an
    /// unreadable answer. Not a 5xx that confirms delivery: the message arrived.
    pub fn is_retryable(&self) -> bool {
        self.kind().is_retryable()
    }

    /// The HTTP status, when the platform answered.
    pub fn status(&self) -> Option<u16> {
        match self {
            ApiError::Status { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// How long the platform asked us to wait, if it did.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            ApiError::Status { retry_after, .. } => *retry_after,
            _ => None,
        }
    }

    /// The body's `hint`, when the platform gave one (410 on `/workspaces/:id`).
    pub fn hint(&self) -> Option<&str> {
        match self {
            ApiError::Status { hint, .. } => hint.as_deref(),
            _ => None,
        }
    }

    /// 401: the token was rejected.
    pub fn is_unauthorized(&self) -> bool {
        self.kind() == Kind::Unauthorized
    }
}

impl Kind {
    /// What a refusal with `status` means by its status alone (the body's flags
    /// aside); also read off every answer's rate-limit headers.
    fn of_status(status: u16) -> Kind {
        match status {
            503 => Kind::Unavailable,
            s if s >= 500 => Kind::ServerError,
            429 => Kind::RateLimited,
            408 => Kind::RequestTimeout,
            401 => Kind::Unauthorized,
            403 => Kind::Forbidden,
            404 => Kind::NotFound,
            410 => Kind::Gone,
            400 => Kind::BadRequest,
            413 => Kind::RequestTooLarge,
            409 => Kind::Conflict,
            422 => Kind::Unprocessable,
            _ => Kind::Rejected,
        }
    }

    /// See [`ApiError::is_retryable`].
    pub fn is_retryable(self) -> bool {
        matches!(
            self,
            Kind::NoAnswer
                | Kind::RateLimited
                | Kind::RequestTimeout
                | Kind::ServerError
                | Kind::Unavailable
                | Kind::Busy
                | Kind::Unreadable
        )
    }

    /// Worth re-sending an `/a2a` message: the platform did not take it and may
    /// next time. Not a busy queue (the sender decides when to try again), not an
    /// unreadable 2xx (it was delivered). A timeout is re-sent: the same
    /// `messageId` makes that harmless.
    pub fn is_resendable(self) -> bool {
        self.is_retryable() && !matches!(self, Kind::Busy | Kind::Unreadable)
    }
}

impl fmt::Display for ApiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ApiError::Transport { op, detail } => {
                write!(f, "{op}: cannot reach the platform: {detail}")
            }
            ApiError::Timeout { op } => write!(f, "{op}: timed out waiting for the platform"),
            ApiError::Status {
                op,
                status,
                message,
                ..
            } => {
                if message.is_empty() {
                    write!(f, "{op}: HTTP {status}")
                } else {
                    write!(f, "{op}: HTTP {status}: {message}")
                }
            }
            ApiError::TooLarge { op, limit } => write!(f, "{op}: answer larger than {limit} bytes"),
            ApiError::BadBody { op, detail } => write!(f, "{op}: unreadable answer: {detail}"),
            ApiError::Invalid { op, detail } | ApiError::Misconfigured { op, detail } => {
                write!(f, "{op}: {detail}")
            }
        }
    }
}

impl std::error::Error for ApiError {}

/// Which rows to ask the inbox for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Since {
    /// Cold start: rows from the last N seconds, newest first.
    Secs(u64),
    /// Rows strictly after this row id, oldest first. Must be a UUID.
    Cursor(String),
    /// A later cold-start page: rows of the last N seconds created strictly before
    /// an RFC 3339 time (§API-2.4 `before_ts`), newest first.
    Before(u64, String),
}

/// The `before_ts` of the page after a newest-first page whose oldest row was created
/// at `oldest_us`. `before_ts` compares strictly, so it is one microsecond later: rows
/// sharing that timestamp come again (callers drop the ones seen) rather than being
/// skipped. `stuck` (the page made no progress: a whole page shares the timestamp)
/// steps past it instead, the one way on.
pub fn before_ts_after(oldest_us: i64, stuck: bool) -> String {
    let us = if stuck {
        oldest_us
    } else {
        oldest_us.saturating_add(1)
    };
    crate::timestamp::rfc3339(us)
}

/// The answer to an `/a2a` send that the platform accepted.
#[derive(Debug, Clone)]
pub struct SendAnswer {
    /// HTTP status (200 or 202).
    pub status: u16,
    /// Parsed body (may be `Null` when empty).
    pub body: Value,
}

impl SendAnswer {
    /// The platform queued the message (poll-mode target or busy queue) rather than
    /// returning the peer's answer (§API-2.7.4, §API-2.7.5).
    pub fn is_queued(&self) -> bool {
        self.status == 202
            || self.body.get("status").and_then(Value::as_str) == Some("queued")
            || self.body.get("queued").and_then(Value::as_bool) == Some(true)
    }
}

/// Connection settings for [`Client::new`].
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// Base URL without a trailing slash.
    pub api_url: String,
    /// Our workspace id.
    pub workspace_id: WorkspaceId,
    /// `X-Molecule-Org-Id`, when configured.
    pub org_id: Option<String>,
    /// Whole-request limit for ordinary calls. Defaults to 30 s.
    pub timeout: Duration,
    /// Connect limit. Defaults to 10 s.
    pub connect_timeout: Duration,
    /// Whole-request limit for `/a2a` sends (a push-mode peer answers synchronously).
    /// Defaults to 5 min.
    pub send_timeout: Duration,
    /// The agent card to register with (`connect --card-file`); `None` = the
    /// built-in one ([`crate::wire::agent_card`]).
    pub agent_card: Option<Value>,
    /// Root certificates from `--ca-file` (a private CA). Defaults to none: the
    /// built-in Mozilla roots.
    pub ca_roots: Option<CaRoots>,
}

/// Root certificates read from a PEM file (`--ca-file`, `MOLECULE_CA_FILE`,
/// `SSL_CERT_FILE`). Cheap to clone.
#[derive(Clone)]
pub struct CaRoots(Arc<Vec<ureq::tls::Certificate<'static>>>);

impl CaRoots {
    /// Parses every certificate in `pem`; at least one is required.
    pub fn from_pem(pem: &[u8]) -> Result<CaRoots, String> {
        let mut certs = Vec::new();
        for item in ureq::tls::parse_pem(pem) {
            match item {
                Ok(ureq::tls::PemItem::Certificate(c)) => certs.push(c),
                Ok(_) => {}
                Err(e) => return Err(format!("not a PEM certificate file: {e}")),
            }
        }
        if certs.is_empty() {
            return Err("no PEM certificate (-----BEGIN CERTIFICATE-----) in it".into());
        }
        Ok(CaRoots(Arc::new(certs)))
    }

    /// How many certificates.
    pub fn len(&self) -> usize {
        self.0.len()
    }
}

impl fmt::Debug for CaRoots {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CaRoots({} certificate(s))", self.0.len())
    }
}

impl ClientConfig {
    /// Defaults for everything but the URL and workspace.
    pub fn new(api_url: &str, workspace_id: &WorkspaceId) -> Self {
        Self {
            api_url: api_url.trim_end_matches('/').to_string(),
            workspace_id: workspace_id.clone(),
            org_id: None,
            timeout: TIMEOUT,
            connect_timeout: CONNECT_TIMEOUT,
            send_timeout: Duration::from_secs(300),
            agent_card: None,
            ca_roots: None,
        }
    }
}

/// The HTTP agent (connection pool, TLS roots, timeouts) behind one or more clients.
#[derive(Clone)]
pub struct Transport(ureq::Agent);

impl Transport {
    /// One agent for many clients: the default timeouts, trusting `ca_roots` when
    /// given (`--ca-file` is global).
    pub fn shared(ca_roots: Option<&CaRoots>) -> Self {
        Self::new(TIMEOUT, CONNECT_TIMEOUT, ca_roots)
    }

    /// One agent with these timeouts, statuses left to us, and no redirects (the
    /// token must not follow one).
    fn new(timeout: Duration, connect_timeout: Duration, ca_roots: Option<&CaRoots>) -> Self {
        let mut tls = ureq::tls::TlsConfig::builder();
        if let Some(roots) = ca_roots {
            // ureq 3 takes either its built-in roots or a list of certificates, and
            // the built-in set holds trust anchors, not certificates: with a CA file,
            // that file is the trust store (as with curl's --cacert).
            tls = tls.root_certs(ureq::tls::RootCerts::Specific(roots.0.clone()));
        }
        let config = ureq::Agent::config_builder()
            .timeout_global(Some(timeout))
            .timeout_connect(Some(connect_timeout))
            .http_status_as_error(false)
            .max_redirects(0)
            // Kept open for reuse: ureq's default of 3 per host is fewer than `connect`
            // uses at once (the poll, each worker's two posters, the self-reports, the
            // heartbeat), and each one over it would be a new connection per request.
            .max_idle_connections(IDLE_CONNECTIONS)
            .max_idle_connections_per_host(IDLE_CONNECTIONS)
            .tls_config(tls.build())
            .user_agent(concat!("molecule/", env!("CARGO_PKG_VERSION")))
            .build();
        Transport(ureq::Agent::with_parts(
            config,
            ureq::unversioned::transport::DefaultConnector::default(),
            Resolver::default(),
        ))
    }
}

/// Idle connections kept for reuse (ureq closes each after 15 s unused).
const IDLE_CONNECTIONS: usize = 16;

/// How long a resolved host name is reused.
const RESOLVE_TTL: Duration = Duration::from_secs(30);

/// ureq's resolver starts a thread for every request that has a timeout (every one of
/// ours), even for an IP address on a reused connection. This one answers an IP
/// address at once and keeps a host name's addresses for [`RESOLVE_TTL`]; only a
/// miss goes to ureq's resolver (and its timeout).
#[derive(Debug, Default)]
struct Resolver {
    last: std::sync::Mutex<Option<(String, std::time::Instant, ResolvedAddrs)>>,
}

type ResolvedAddrs = ureq::unversioned::resolver::ResolvedSocketAddrs;

impl ureq::unversioned::resolver::Resolver for Resolver {
    fn resolve(
        &self,
        uri: &ureq::http::Uri,
        config: &ureq::config::Config,
        timeout: ureq::unversioned::transport::NextTimeout,
    ) -> Result<ResolvedAddrs, ureq::Error> {
        use ureq::unversioned::resolver::DefaultResolver;
        let port = uri.port_u16().or(match uri.scheme_str() {
            Some("https") => Some(443),
            Some("http") => Some(80),
            _ => None,
        });
        let (Some(host), Some(port)) = (uri.host(), port) else {
            return DefaultResolver::default().resolve(uri, config, timeout);
        };
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        if let Ok(ip) = bare.parse::<std::net::IpAddr>() {
            let mut addrs = self.empty();
            addrs.push(std::net::SocketAddr::new(ip, port));
            return Ok(addrs);
        }
        let key = format!("{host}:{port}");
        let now = std::time::Instant::now();
        {
            let last = self.last.lock().unwrap_or_else(PoisonError::into_inner);
            if let Some((k, at, addrs)) = last.as_ref()
                && *k == key
                && now.saturating_duration_since(*at) < RESOLVE_TTL
            {
                return Ok(addrs.clone());
            }
        }
        let addrs = DefaultResolver::default().resolve(uri, config, timeout)?;
        *self.last.lock().unwrap_or_else(PoisonError::into_inner) = Some((key, now, addrs.clone()));
        Ok(addrs)
    }
}

/// The platform client. Cheap to clone: clones share the connection pool and token.
#[derive(Clone)]
pub struct Client {
    agent: ureq::Agent,
    cfg: Arc<ClientConfig>,
    origin: Arc<str>,
    credentials: Credentials,
    stats: Arc<RequestStats>,
    pacer: Option<Arc<dyn Pacer>>,
    fixed: Arc<Fixed>,
}

/// What every request of a client repeats, built once: header values (`None` when
/// one is no valid header value: then it goes as before, and ureq's error with it)
/// and the self-report path.
struct Fixed {
    origin_header: Option<HeaderValue>,
    workspace_header: Option<HeaderValue>,
    activity: String,
}

impl Fixed {
    fn new(origin: &str, workspace_id: &WorkspaceId) -> Fixed {
        Fixed {
            origin_header: HeaderValue::from_str(origin).ok(),
            workspace_header: HeaderValue::from_str(workspace_id.as_str()).ok(),
            activity: format!("/workspaces/{workspace_id}/activity"),
        }
    }
}

/// `application/json`, for `Accept` and `Content-Type`.
static JSON: HeaderValue = HeaderValue::from_static("application/json");

/// How much a request matters when the rate budget is short (§API-1.4): liveness
/// first, then what delivers an answer, then reads that can wait.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// Heartbeat, register.
    Liveness,
    /// Replies, notifies, acks: an answer must never be lost.
    Answer,
    /// Polls, tracker reads, lookups, the event stream: stretched first.
    Read,
}

impl Class {
    fn of(op: &str) -> Class {
        match op {
            "heartbeat" | "register" => Class::Liveness,
            "send" | "notify" | "ack" | "self-report" | "upload" | "delegate" => Class::Answer,
            _ => Class::Read,
        }
    }
}

/// What a rate-limit header set said (§API-1.4), as read from one answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RateHeaders {
    /// `X-RateLimit-Limit`; `None` when absent.
    pub limit: Option<Limit>,
    /// `X-RateLimit-Remaining`.
    pub remaining: Option<u64>,
    /// `X-RateLimit-Reset`: seconds until the window resets.
    pub reset_secs: Option<u64>,
    /// The answer was a 429: over the limit.
    pub rate_limited: bool,
    /// `Retry-After` on a 429.
    pub retry_after: Option<Duration>,
}

/// `X-RateLimit-Limit`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    /// Requests per window.
    PerWindow(u64),
    /// A dev platform without a limit.
    Unlimited,
}

/// The seam between the client and the connector's rate budget: `before` may block
/// (the budget lives in the runner, which owns waiting); `after` is called once per
/// `before`, with the headers when there was an answer.
pub trait Pacer: Send + Sync {
    /// Before a request of `class` is sent.
    fn before(&self, class: Class);
    /// After it: `None` when no answer came (transport error, timeout).
    fn after(&self, headers: Option<RateHeaders>);
}

impl RateHeaders {
    fn read(status: u16, headers: &ureq::http::HeaderMap) -> RateHeaders {
        let get = |k: &str| headers.get(k).and_then(|v| v.to_str().ok()).map(str::trim);
        let number = |k: &str| get(k).and_then(|v| v.parse::<u64>().ok());
        let limit = get("x-ratelimit-limit").and_then(|v| {
            if v.eq_ignore_ascii_case("unlimited") {
                Some(Limit::Unlimited)
            } else {
                v.parse().ok().map(Limit::PerWindow)
            }
        });
        // Seconds until the reset; a Unix time (some limiters send one) is converted.
        let reset_secs = number("x-ratelimit-reset").map(|r| {
            if r > 1_000_000_000 {
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs());
                r.saturating_sub(now)
            } else {
                r
            }
        });
        RateHeaders {
            limit,
            remaining: number("x-ratelimit-remaining"),
            reset_secs,
            rate_limited: Kind::of_status(status) == Kind::RateLimited,
            retry_after: get("retry-after").and_then(parse_retry_after),
        }
    }
}

/// What a client's requests met, for the metrics: answers per endpoint (the route
/// pattern, ids replaced by `:id`) and status (`error`/`timeout` when there was no
/// answer), 429s, and the last `X-RateLimit-Remaining` the platform sent (§API-1.4).
#[derive(Debug, Default)]
pub struct RequestStats {
    /// endpoint -> code -> answers: counted without building a key once both are in.
    requests: Mutex<BTreeMap<String, BTreeMap<String, u64>>>,
    rate_limited: AtomicU64,
    /// `u64::MAX` until the platform has sent the header.
    rate_remaining: AtomicU64,
}

impl RequestStats {
    fn new() -> Self {
        RequestStats {
            rate_remaining: AtomicU64::new(u64::MAX),
            ..RequestStats::default()
        }
    }

    fn record(&self, method: &str, path: &str, code: &str) {
        ENDPOINT.with(|buf| {
            let mut fresh = String::new();
            let mut kept = buf.try_borrow_mut();
            let endpoint = kept.as_deref_mut().unwrap_or(&mut fresh);
            endpoint.clear();
            endpoint_into(endpoint, method, path);
            let mut requests = self.requests.lock().unwrap_or_else(PoisonError::into_inner);
            if !requests.contains_key(endpoint.as_str()) {
                requests.insert(endpoint.clone(), BTreeMap::new());
            }
            let Some(codes) = requests.get_mut(endpoint.as_str()) else {
                return;
            };
            match codes.get_mut(code) {
                Some(n) => *n += 1,
                None => {
                    codes.insert(code.to_string(), 1);
                }
            }
        });
    }

    fn note_rate_limit(&self, status: u16, headers: &ureq::http::HeaderMap) {
        if Kind::of_status(status) == Kind::RateLimited {
            self.rate_limited.fetch_add(1, Ordering::Relaxed);
        }
        let remaining = headers
            .get("x-ratelimit-remaining")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok());
        if let Some(n) = remaining {
            self.rate_remaining
                .store(n.min(u64::MAX - 1), Ordering::Relaxed);
        }
    }

    /// `(endpoint, code, count)` for every pair seen, sorted.
    pub fn requests(&self) -> Vec<(String, String, u64)> {
        self.requests
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .flat_map(|(e, codes)| codes.iter().map(|(c, n)| (e.clone(), c.clone(), *n)))
            .collect()
    }

    /// 429 answers so far.
    pub fn rate_limited(&self) -> u64 {
        self.rate_limited.load(Ordering::Relaxed)
    }

    /// The last `X-RateLimit-Remaining`, if the platform sent one.
    pub fn rate_remaining(&self) -> Option<u64> {
        Some(self.rate_remaining.load(Ordering::Relaxed)).filter(|n| *n != u64::MAX)
    }
}

/// [`endpoint_into`] as a new string.
#[cfg(test)]
fn endpoint_of(method: &str, path: &str) -> String {
    let mut out = String::new();
    endpoint_into(&mut out, method, path);
    out
}

thread_local! {
    /// [`RequestStats::record`]'s endpoint, built per request in a kept buffer.
    static ENDPOINT: std::cell::RefCell<String> = const { std::cell::RefCell::new(String::new()) };
}

/// `GET /workspaces/:id/activity` for `GET /workspaces/<uuid>/activity`, appended to
/// `out`: metrics name the route, never an id (ids only reach paths as UUIDs,
/// §API-1.7).
fn endpoint_into(out: &mut String, method: &str, path: &str) {
    let path = path.split('?').next().unwrap_or(path);
    out.reserve(method.len() + path.len() + 1);
    out.push_str(method);
    out.push(' ');
    for (i, seg) in path.split('/').enumerate() {
        if i > 0 {
            out.push('/');
        }
        out.push_str(if crate::uuid::is_uuid(seg) {
            ":id"
        } else {
            seg
        });
    }
}

impl Client {
    /// Builds the one agent. `HTTP(S)_PROXY`/`ALL_PROXY`/`NO_PROXY` from the
    /// environment are honoured (ureq's default).
    pub fn new(cfg: ClientConfig, credentials: impl Into<Credentials>) -> Self {
        let transport = Transport::new(cfg.timeout, cfg.connect_timeout, cfg.ca_roots.as_ref());
        Self::with_transport(&transport, cfg, credentials)
    }

    /// A client that shares `transport` (its connection pool and TLS set-up) with
    /// other clients: many workspaces in one process need one, not one each.
    pub fn with_transport(
        transport: &Transport,
        cfg: ClientConfig,
        credentials: impl Into<Credentials>,
    ) -> Self {
        let origin: Arc<str> = origin_of(&cfg.api_url).into();
        let fixed = Arc::new(Fixed::new(&origin, &cfg.workspace_id));
        Self {
            fixed,
            agent: transport.0.clone(),
            cfg: Arc::new(cfg),
            origin,
            credentials: credentials.into(),
            stats: Arc::new(RequestStats::new()),
            pacer: None,
        }
    }

    /// Every request first asks `pacer` for its turn (the connector's rate budget)
    /// and every answer's rate-limit headers go back to it.
    pub fn with_pacer(mut self, pacer: Arc<dyn Pacer>) -> Self {
        self.pacer = Some(pacer);
        self
    }

    /// Waits for the pacer's permission to send a request of `op`'s class.
    fn pace(&self, op: &'static str) {
        if let Some(p) = &self.pacer {
            p.before(Class::of(op));
        }
    }

    /// Our workspace id.
    pub fn workspace_id(&self) -> &WorkspaceId {
        &self.cfg.workspace_id
    }

    /// The base URL.
    pub fn api_url(&self) -> &str {
        &self.cfg.api_url
    }

    /// The agent card register sends.
    pub fn agent_card(&self) -> Value {
        self.cfg
            .agent_card
            .clone()
            .unwrap_or_else(|| crate::wire::agent_card(&self.cfg.workspace_id))
    }

    /// The token in use.
    pub fn token(&self) -> Secret {
        self.credentials.token()
    }

    /// The token and its source; [`Credentials::reload`] re-reads it after a 401.
    pub fn credentials(&self) -> &Credentials {
        &self.credentials
    }

    /// `POST /registry/register` in poll mode (§API-2.1).
    pub fn register(&self, agent_card: Value) -> Result<RegisterResponse, ApiError> {
        let body = RegisterRequest {
            id: &self.cfg.workspace_id,
            agent_card,
            delivery_mode: "poll",
        };
        let resp = self.post("register", "/registry/register", &body)?;
        read_json("register", resp, SMALL_BODY_LIMIT)
    }

    /// `POST /registry/heartbeat` (§API-2.2).
    pub fn heartbeat(&self, hb: &Heartbeat) -> Result<(), ApiError> {
        let resp = self.post("heartbeat", "/registry/heartbeat", hb)?;
        drain("heartbeat", resp)
    }

    /// `GET /workspaces/<own>/activity?type=a2a_receive…` (§API-2.4). Rows come back
    /// exactly as the platform ordered them. `body_limit` caps the page's bytes.
    pub fn activity(
        &self,
        since: &Since,
        limit: u32,
        body_limit: u64,
    ) -> Result<Vec<ActivityRow>, ApiError> {
        let rows = self.activity_raw(since, limit, body_limit)?;
        rows.into_iter()
            .map(serde_json::from_value)
            .collect::<Result<_, _>>()
            .map_err(|e| ApiError::BadBody {
                op: "poll",
                detail: e.to_string(),
            })
    }

    /// Like [`Client::activity`], but each row as raw JSON, so the connector can skip
    /// one malformed row instead of failing the whole page.
    pub fn activity_raw(
        &self,
        since: &Since,
        limit: u32,
        body_limit: u64,
    ) -> Result<Vec<Value>, ApiError> {
        let op = "poll";
        let path = format!("/workspaces/{}/activity", self.cfg.workspace_id);
        let mut req = self
            .with_headers(self.agent.get(self.url(&path)), false)
            .query("type", "a2a_receive")
            .query("include", "peer_info")
            .query("limit", limit.to_string());
        req = match since {
            Since::Secs(n) => req.query("since_secs", n.to_string()),
            Since::Before(n, ts) => req
                .query("since_secs", n.to_string())
                .query("before_ts", ts),
            Since::Cursor(id) => {
                if !crate::uuid::is_uuid(id) {
                    return Err(ApiError::Invalid {
                        op,
                        detail: format!("cursor {id:?} is not a UUID"),
                    });
                }
                req.query("since_id", id)
            }
        };
        self.pace(op);
        let resp = self.answered(op, "GET", &path, req.call())?;
        read_json(op, resp, body_limit)
    }

    /// `GET /workspaces/<own>/activity?type=broadcast_receive…` (§API-2.20): the
    /// answer as sent (the rows, `Null` when empty), at most `body_limit` bytes.
    pub fn broadcasts(
        &self,
        since: &Since,
        limit: u32,
        body_limit: u64,
    ) -> Result<Value, ApiError> {
        let path = format!("/workspaces/{}/activity", self.cfg.workspace_id);
        let limit = limit.to_string();
        let mut query = vec![
            ("type", "broadcast_receive"),
            ("include", "peer_info"),
            ("limit", limit.as_str()),
        ];
        let secs;
        match since {
            Since::Cursor(id) => query.push(("since_id", id.as_str())),
            Since::Secs(n) | Since::Before(n, _) => {
                secs = n.to_string();
                query.push(("since_secs", secs.as_str()));
            }
        }
        if let Since::Before(_, ts) = since {
            query.push(("before_ts", ts.as_str()));
        }
        self.call_json("broadcasts", "GET", &path, &query, None, body_limit)
    }

    /// `POST /workspaces/<target>/a2a` with our `X-Workspace-ID` (§API-2.7), `body`
    /// the envelope's JSON bytes. A queued answer is success; see
    /// [`SendAnswer::is_queued`].
    pub fn send_a2a(&self, target: &WorkspaceId, body: &[u8]) -> Result<SendAnswer, ApiError> {
        self.send_a2a_within(target, body, self.cfg.send_timeout)
    }

    /// [`Client::send_a2a`] with a whole-request limit of `timeout` for this call (a
    /// one-shot `molecule send` gives each attempt what is left of its budget).
    pub fn send_a2a_within(
        &self,
        target: &WorkspaceId,
        bytes: &[u8],
        timeout: Duration,
    ) -> Result<SendAnswer, ApiError> {
        let op = "send";
        if bytes.len() > A2A_REQUEST_LIMIT {
            return Err(ApiError::Invalid {
                op,
                detail: format!(
                    "message is {} bytes, over the platform's {A2A_REQUEST_LIMIT}-byte limit",
                    bytes.len()
                ),
            });
        }
        let path = format!("/workspaces/{target}/a2a");
        let req = self
            .with_headers(self.agent.post(self.url(&path)), true)
            .header(CONTENT_TYPE, JSON.clone())
            .config()
            .timeout_global(Some(timeout))
            .build();
        self.pace(op);
        let resp = self.answered(op, "POST", &path, req.send(bytes))?;
        let status = resp.status().as_u16();
        // A 2xx means the platform took the message: an unreadable answer must not
        // turn it into a failure (and a resend).
        let body = read_value(op, resp, A2A_BODY_LIMIT).unwrap_or_else(|e| {
            log::debug!("{e}; the message was accepted (HTTP {status})");
            Value::Null
        });
        Ok(SendAnswer { status, body })
    }

    /// `POST /workspaces/<own>/notify`: a message to the human on the canvas (§API-2.13).
    pub fn notify(&self, message: &str, attachments: Vec<Value>) -> Result<(), ApiError> {
        let path = format!("/workspaces/{}/notify", self.cfg.workspace_id);
        let body = NotifyRequest {
            message,
            attachments,
        };
        let resp = self.post("notify", &path, &body)?;
        // Delivered once the status is 2xx, whatever happens to the body.
        let _ = drain("notify", resp);
        Ok(())
    }

    /// `POST /workspaces/<own>/activity/ack` (§API-2.5): rows up to `seq` are done,
    /// so retention may prune them after 7 days instead of 30. Returns the stored
    /// value, which only grows (someone may have acked further). A 404 is a server
    /// from before acks.
    pub fn ack(&self, seq: i64) -> Result<i64, ApiError> {
        let op = "ack";
        let path = format!("/workspaces/{}/activity/ack", self.cfg.workspace_id);
        let resp = self.post(op, &path, &serde_json::json!({ "acked_seq": seq }))?;
        let body = read_value(op, resp, SMALL_BODY_LIMIT)?;
        Ok(body
            .get("last_acked_seq")
            .and_then(Value::as_i64)
            .unwrap_or(seq))
    }

    /// `POST /workspaces/<own>/activity` (§API-2.6): a row in our own log, as JSON
    /// (the `a2a_send` rows are built as bytes: [`crate::inbox::Envelope::report`]).
    /// The answer must be JSON (or empty), as [`Client::call_json`] would require;
    /// nothing of it is kept.
    pub fn self_report_json(&self, row: &[u8]) -> Result<(), ApiError> {
        let op = "self-report";
        let path = &self.fixed.activity;
        let req = self
            .with_headers(self.agent.post(self.url(path)), false)
            .header(CONTENT_TYPE, JSON.clone());
        self.pace(op);
        let resp = self.answered(op, "POST", path, req.send(row))?;
        let raw = read_body(op, resp, SMALL_BODY_LIMIT)?;
        if raw.iter().all(u8::is_ascii_whitespace) {
            return Ok(());
        }
        serde_json::from_slice::<serde::de::IgnoredAny>(&raw)
            .map(|_| ())
            .map_err(|e| ApiError::BadBody {
                op,
                detail: e.to_string(),
            })
    }

    /// `GET /workspaces/<id>` (open route): tells a revoked token (200) from a removed
    /// workspace (410) after a 401 (§API-2.12).
    pub fn workspace_info(&self, id: &WorkspaceId) -> Result<Value, ApiError> {
        let op = "workspace info";
        let path = format!("/workspaces/{id}");
        self.pace(op);
        let sent = self
            .with_headers(self.agent.get(self.url(&path)), false)
            .call();
        let resp = self.answered(op, "GET", &path, sent)?;
        read_value(op, resp, SMALL_BODY_LIMIT)
    }

    /// `GET /health` (open): is the platform's HTTP(S) endpoint answering?
    pub fn health(&self) -> Result<(), ApiError> {
        let resp = self.get("health", "/health", &[], false)?;
        drain("health", resp)
    }

    /// `GET /registry/<own>/peers[?q=…]` (§API-2.10): siblings, children, parent.
    pub fn peers(&self, query: Option<&str>) -> Result<Vec<Value>, ApiError> {
        let op = "peers";
        let path = format!("/registry/{}/peers", self.cfg.workspace_id);
        let q: Vec<(&str, &str)> = query.map(|q| ("q", q)).into_iter().collect();
        let resp = self.get(op, &path, &q, true)?;
        read_list(op, resp)
    }

    /// `GET /registry/discover/<target>` with our `X-Workspace-ID` (§API-2.9): an
    /// existence and access check. Never dial the URL it returns.
    pub fn discover(&self, target: &WorkspaceId) -> Result<Value, ApiError> {
        self.discover_within(target, self.cfg.timeout)
    }

    /// [`Client::discover`] with a whole-request limit of `timeout` for this call: a
    /// background peer-name lookup gives up fast, a slow registry only delays names.
    pub fn discover_within(
        &self,
        target: &WorkspaceId,
        timeout: Duration,
    ) -> Result<Value, ApiError> {
        let op = "discover";
        let path = format!("/registry/discover/{target}");
        self.pace(op);
        let sent = self
            .with_headers(self.agent.get(self.url(&path)), true)
            .config()
            .timeout_global(Some(timeout))
            .build()
            .call();
        let resp = self.answered(op, "GET", &path, sent)?;
        read_value(op, resp, SMALL_BODY_LIMIT)
    }

    /// `POST /workspaces/<own>/delegate` (§API-2.14).
    pub fn delegate(
        &self,
        target: &WorkspaceId,
        task: &str,
        idempotency_key: Option<&str>,
    ) -> Result<DelegateResponse, ApiError> {
        let op = "delegate";
        let body = DelegateRequest {
            target_id: target,
            task,
            idempotency_key,
        };
        let path = format!("/workspaces/{}/delegate", self.cfg.workspace_id);
        let resp = self.post(op, &path, &body)?;
        read_json(op, resp, SMALL_BODY_LIMIT)
    }

    /// `GET /workspaces/<own>/delegations[?status=…]` (§API-2.14): newest first, at
    /// most 50. Entries are returned as the platform sent them.
    pub fn delegations(&self, status: Option<&str>) -> Result<Vec<Value>, ApiError> {
        let op = "delegations";
        let path = format!("/workspaces/{}/delegations", self.cfg.workspace_id);
        let q: Vec<(&str, &str)> = status.map(|s| ("status", s)).into_iter().collect();
        let resp = self.get(op, &path, &q, false)?;
        read_list(op, resp)
    }

    /// `POST /registry/heartbeat` with only the given fields (`molecule heartbeat`).
    pub fn heartbeat_once(&self, hb: &ManualHeartbeat) -> Result<(), ApiError> {
        let resp = self.post("heartbeat", "/registry/heartbeat", hb)?;
        drain("heartbeat", resp)
    }

    /// `GET /workspaces/<own>/events/stream` (§API-2.17): the open SSE body. No
    /// whole-request limit (the stream lasts as long as it is healthy); instead every
    /// read waits at most `tick` and then fails with `ErrorKind::TimedOut`, which
    /// leaves the stream usable: the reader checks its stop flag and silence deadline
    /// and reads on. A 404 is the platform saying it has no stream (or no workspace).
    pub fn event_stream(&self, tick: Duration) -> Result<EventBody, ApiError> {
        let op = "events";
        let path = format!("/workspaces/{}/events/stream", self.cfg.workspace_id);
        self.pace(op);
        let resp = self
            .auth_headers(self.agent.get(self.url(&path)))
            .header("Accept", "text/event-stream")
            .config()
            .timeout_global(None)
            .timeout_recv_response(Some(self.cfg.timeout))
            .timeout_per_read(Some(tick))
            .build()
            .call();
        let resp = self.answered(op, "GET", &path, resp)?;
        Ok(EventBody(resp.into_body().into_reader()))
    }

    /// One JSON call to a platform route: `method` (`GET`, `POST`, `DELETE`) on `path`
    /// with `query` and an optional JSON `body`; the answer as JSON (`Null` when
    /// empty), capped at `limit` bytes. The shared path of the agent-side tools
    /// (memories, requests, history, card, broadcast).
    pub fn call_json(
        &self,
        op: &'static str,
        method: &str,
        path: &str,
        query: &[(&str, &str)],
        body: Option<&Value>,
        limit: u64,
    ) -> Result<Value, ApiError> {
        let url = self.url(path);
        let sent = match (method, body) {
            ("GET", _) => {
                let mut req = self.with_headers(self.agent.get(url), false);
                for (k, v) in query {
                    req = req.query(*k, *v);
                }
                self.pace(op);
                req.call()
            }
            ("DELETE", _) => {
                let mut req = self.with_headers(self.agent.delete(url), false);
                for (k, v) in query {
                    req = req.query(*k, *v);
                }
                self.pace(op);
                req.call()
            }
            (_, body) => {
                let bytes = match body {
                    Some(b) => serde_json::to_vec(b).map_err(|e| ApiError::Invalid {
                        op,
                        detail: e.to_string(),
                    })?,
                    None => Vec::new(),
                };
                let mut req = self.with_headers(self.agent.post(url), false);
                for (k, v) in query {
                    req = req.query(*k, *v);
                }
                if body.is_some() {
                    req = req.header("Content-Type", "application/json");
                }
                self.pace(op);
                req.send(&bytes[..])
            }
        };
        let resp = self.answered(op, method, path, sent)?;
        read_value(op, resp, limit)
    }

    /// `POST /workspaces/<own>/chat/uploads` (§API-2.16): `files` as one
    /// `multipart/form-data` body of `files` parts (name, MIME type, bytes).
    pub fn upload(&self, files: &[(String, String, Vec<u8>)]) -> Result<Value, ApiError> {
        let op = "upload";
        let boundary = format!("molecule-{}", crate::uuid::new_v4());
        let mut body = Vec::new();
        for (name, mime, bytes) in files {
            // Quotes and line breaks cannot appear in a header value; the platform
            // sanitises the name anyway.
            let safe: String = name
                .chars()
                .map(|c| if c == '"' || c.is_control() { '_' } else { c })
                .collect();
            body.extend_from_slice(
                format!(
                    "--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"{safe}\"\r\nContent-Type: {mime}\r\n\r\n"
                )
                .as_bytes(),
            );
            body.extend_from_slice(bytes);
            body.extend_from_slice(b"\r\n");
        }
        body.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
        let path = format!("/workspaces/{}/chat/uploads", self.cfg.workspace_id);
        self.pace(op);
        let sent = self
            .with_headers(self.agent.post(self.url(&path)), false)
            .header(
                "Content-Type",
                format!("multipart/form-data; boundary={boundary}"),
            )
            .config()
            .timeout_global(Some(self.cfg.send_timeout))
            .build()
            .send(&body[..]);
        let resp = self.answered(op, "POST", &path, sent)?;
        read_value(op, resp, SMALL_BODY_LIMIT)
    }

    /// `GET /workspaces/<own>/pending-uploads/<file_id>/content` (§API-2.16): the
    /// bytes are copied to `sink` (at most `limit`); returns the byte count and the
    /// `Content-Type`.
    pub fn download(
        &self,
        file_id: &str,
        sink: &mut dyn std::io::Write,
        limit: u64,
    ) -> Result<(u64, Option<String>), ApiError> {
        let op = "download";
        check_uuid(op, "file id", file_id)?;
        let path = format!(
            "/workspaces/{}/pending-uploads/{file_id}/content",
            self.cfg.workspace_id
        );
        self.pace(op);
        let sent = self
            .with_headers(self.agent.get(self.url(&path)), false)
            .config()
            .timeout_global(Some(self.cfg.send_timeout))
            .build()
            .call();
        let mut resp = self.answered(op, "GET", &path, sent)?;
        let mime = resp
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let mut reader = resp.body_mut().with_config().limit(limit).reader();
        // A failure mid-body is BadBody: part of the bytes may already be written.
        let n = std::io::copy(&mut reader, sink).map_err(|e| {
            if e.to_string().contains("limit") {
                ApiError::TooLarge { op, limit }
            } else {
                ApiError::BadBody {
                    op,
                    detail: e.to_string(),
                }
            }
        })?;
        Ok((n, mime))
    }

    fn get(
        &self,
        op: &'static str,
        path: &str,
        query: &[(&str, &str)],
        workspace_header: bool,
    ) -> Result<Resp, ApiError> {
        let mut req = self.with_headers(self.agent.get(self.url(path)), workspace_header);
        for (k, v) in query {
            req = req.query(*k, *v);
        }
        self.pace(op);
        self.answered(op, "GET", path, req.call())
    }

    fn url(&self, path: &str) -> String {
        let mut url = String::with_capacity(self.cfg.api_url.len() + path.len());
        url.push_str(&self.cfg.api_url);
        url.push_str(path);
        url
    }

    fn with_headers<B>(&self, req: ureq::RequestBuilder<B>, a2a: bool) -> ureq::RequestBuilder<B> {
        let mut req = self.auth_headers(req).header(ACCEPT, JSON.clone());
        if a2a {
            // Always together with Origin on /a2a: see §API-2.7.1's same-origin note.
            req = match &self.fixed.workspace_header {
                Some(v) => req.header(HeaderName::from_static("x-workspace-id"), v.clone()),
                None => req.header("X-Workspace-ID", self.cfg.workspace_id.as_str()),
            };
        }
        req
    }

    /// `Authorization`, `Origin` and the org header: on every call (§API-1.1). The
    /// values that never change are built once ([`Fixed`]).
    fn auth_headers<B>(&self, req: ureq::RequestBuilder<B>) -> ureq::RequestBuilder<B> {
        let token = self.token();
        let mut bearer = String::with_capacity(7 + token.expose().len());
        bearer.push_str("Bearer ");
        bearer.push_str(token.expose());
        let req = req.header(AUTHORIZATION, bearer);
        let mut req = match &self.fixed.origin_header {
            Some(v) => req.header(ORIGIN, v.clone()),
            None => req.header("Origin", &*self.origin),
        };
        if let Some(org) = &self.cfg.org_id {
            req = req.header("X-Molecule-Org-Id", org);
        }
        req
    }

    fn post<T: serde::Serialize>(
        &self,
        op: &'static str,
        path: &str,
        body: &T,
    ) -> Result<Resp, ApiError> {
        let bytes = serde_json::to_vec(body).map_err(|e| ApiError::Invalid {
            op,
            detail: e.to_string(),
        })?;
        let req = self
            .with_headers(self.agent.post(self.url(path)), false)
            .header(CONTENT_TYPE, JSON.clone());
        self.pace(op);
        self.answered(op, "POST", path, req.send(&bytes[..]))
    }

    /// Every answer (or transport failure) passes here once: counted for the metrics
    /// by endpoint and status, the rate-limit headers noted, then classified.
    fn answered(
        &self,
        op: &'static str,
        method: &str,
        path: &str,
        sent: Result<Resp, ureq::Error>,
    ) -> Result<Resp, ApiError> {
        match sent {
            Ok(resp) => {
                let status = resp.status().as_u16();
                let mut digits = [0u8; 5];
                self.stats
                    .record(method, path, status_code(status, &mut digits));
                self.stats.note_rate_limit(status, resp.headers());
                if let Some(p) = &self.pacer {
                    p.after(Some(RateHeaders::read(status, resp.headers())));
                }
                check_status(op, resp)
            }
            Err(e) => {
                let e = transport_error(op, e);
                let code = match e {
                    ApiError::Timeout { .. } => "timeout",
                    _ => "error",
                };
                self.stats.record(method, path, code);
                if let Some(p) = &self.pacer {
                    p.after(None);
                }
                Err(e)
            }
        }
    }

    /// The request counters this client (and its clones) have kept.
    pub fn stats(&self) -> &RequestStats {
        &self.stats
    }
}

/// The platform calls the poll loop and the workers make, as a seam: [`Client`] in
/// production, an in-memory fake in their unit tests (ureq's test transport is the
/// model: the code above it cannot tell). Kept to what they use.
pub trait Platform: Send + Sync {
    /// Our workspace id.
    fn workspace_id(&self) -> &WorkspaceId;
    /// The base URL (for messages).
    fn api_url(&self) -> &str;
    /// The token in use and its source.
    fn credentials(&self) -> &Credentials;
    /// Request counters for the status file, when kept.
    fn stats(&self) -> Option<&RequestStats>;
    /// See [`Client::activity_raw`].
    fn activity_raw(
        &self,
        since: &Since,
        limit: u32,
        body_limit: u64,
    ) -> Result<Vec<Value>, ApiError>;
    /// See [`Client::ack`].
    fn ack(&self, seq: i64) -> Result<i64, ApiError>;
    /// See [`Client::workspace_info`].
    fn workspace_info(&self, id: &WorkspaceId) -> Result<Value, ApiError>;
    /// See [`Client::send_a2a`]: `body` is the envelope's JSON.
    fn send_a2a(&self, target: &WorkspaceId, body: &[u8]) -> Result<SendAnswer, ApiError>;
    /// See [`Client::self_report_json`]: `row` is the row's JSON.
    fn self_report_json(&self, row: &[u8]) -> Result<(), ApiError>;
    /// See [`Client::agent_card`].
    fn agent_card(&self) -> Value;
    /// See [`Client::register`].
    fn register(&self, agent_card: Value) -> Result<RegisterResponse, ApiError>;
    /// See [`Client::heartbeat`].
    fn heartbeat(&self, hb: &Heartbeat) -> Result<(), ApiError>;
    /// See [`Client::delegations`].
    fn delegations(&self, status: Option<&str>) -> Result<Vec<Value>, ApiError>;
    /// See [`Client::broadcasts`].
    fn broadcasts(&self, since: &Since, limit: u32, body_limit: u64) -> Result<Value, ApiError>;
    /// See [`Client::notify`].
    fn notify(&self, message: &str, attachments: Vec<Value>) -> Result<(), ApiError>;
}

impl Platform for Client {
    fn workspace_id(&self) -> &WorkspaceId {
        Client::workspace_id(self)
    }
    fn api_url(&self) -> &str {
        Client::api_url(self)
    }
    fn credentials(&self) -> &Credentials {
        Client::credentials(self)
    }
    fn stats(&self) -> Option<&RequestStats> {
        Some(Client::stats(self))
    }
    fn activity_raw(
        &self,
        since: &Since,
        limit: u32,
        body_limit: u64,
    ) -> Result<Vec<Value>, ApiError> {
        Client::activity_raw(self, since, limit, body_limit)
    }
    fn ack(&self, seq: i64) -> Result<i64, ApiError> {
        Client::ack(self, seq)
    }
    fn workspace_info(&self, id: &WorkspaceId) -> Result<Value, ApiError> {
        Client::workspace_info(self, id)
    }
    fn send_a2a(&self, target: &WorkspaceId, body: &[u8]) -> Result<SendAnswer, ApiError> {
        Client::send_a2a(self, target, body)
    }
    fn self_report_json(&self, row: &[u8]) -> Result<(), ApiError> {
        Client::self_report_json(self, row)
    }
    fn agent_card(&self) -> Value {
        Client::agent_card(self)
    }
    fn register(&self, agent_card: Value) -> Result<RegisterResponse, ApiError> {
        Client::register(self, agent_card)
    }
    fn heartbeat(&self, hb: &Heartbeat) -> Result<(), ApiError> {
        Client::heartbeat(self, hb)
    }
    fn delegations(&self, status: Option<&str>) -> Result<Vec<Value>, ApiError> {
        Client::delegations(self, status)
    }
    fn broadcasts(&self, since: &Since, limit: u32, body_limit: u64) -> Result<Value, ApiError> {
        Client::broadcasts(self, since, limit, body_limit)
    }
    fn notify(&self, message: &str, attachments: Vec<Value>) -> Result<(), ApiError> {
        Client::notify(self, message, attachments)
    }
}

/// An open event-stream body ([`Client::event_stream`]): bytes as they arrive, with
/// no size cap (the SSE reader bounds each event). A read that waited a whole tick
/// without data fails with `ErrorKind::TimedOut` and may be retried.
pub struct EventBody(ureq::BodyReader<'static>);

impl std::io::Read for EventBody {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.0.read(buf).map_err(|e| {
            let timed_out = e
                .get_ref()
                .and_then(|inner| inner.downcast_ref::<ureq::Error>())
                .is_some_and(|u| matches!(u, ureq::Error::Timeout(_)));
            if timed_out {
                std::io::Error::new(std::io::ErrorKind::TimedOut, "no event data this tick")
            } else {
                e
            }
        })
    }
}

/// `status` in decimal (as `to_string` writes it), in `buf`.
fn status_code(status: u16, buf: &mut [u8; 5]) -> &str {
    let mut n = status;
    let mut at = buf.len();
    loop {
        at -= 1;
        buf[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    std::str::from_utf8(&buf[at..]).unwrap_or("?")
}

/// `scheme://host[:port]` of the base URL, for the `Origin` header.
fn origin_of(api_url: &str) -> String {
    match api_url.split_once("://") {
        Some((scheme, rest)) => {
            let authority = rest.split(['/', '?', '#']).next().unwrap_or(rest);
            format!("{scheme}://{authority}")
        }
        None => api_url.to_string(),
    }
}

fn transport_error(op: &'static str, e: ureq::Error) -> ApiError {
    match e {
        ureq::Error::Timeout(_) => ApiError::Timeout { op },
        ureq::Error::BodyExceedsLimit(limit) => ApiError::TooLarge { op, limit },
        ureq::Error::Json(e) => ApiError::BadBody {
            op,
            detail: e.to_string(),
        },
        ureq::Error::BadUri(detail) => ApiError::Invalid {
            op,
            detail: format!("bad URL: {detail}"),
        },
        ureq::Error::HostNotFound => ApiError::Transport {
            op,
            detail: "host not found".into(),
        },
        ureq::Error::ConnectionFailed => ApiError::Transport {
            op,
            detail: "connection failed".into(),
        },
        ureq::Error::Rustls(e) => tls_error(op, &e.to_string()),
        ureq::Error::Tls(e) => tls_error(op, e),
        // rustls failures usually arrive wrapped in an I/O error.
        other => tls_error(op, &other.to_string()),
    }
}

/// The base URL a redirect points at: the `Location` up to our API path.
fn moved_base(location: &str) -> &str {
    ["/registry/", "/workspaces/", "/api/"]
        .iter()
        .filter_map(|p| location.find(p))
        .min()
        .map_or(location, |i| &location[..i])
}

/// A TLS failure: a certificate that does not verify or a server that does not
/// speak TLS is a configuration error (retrying for minutes would only hide it).
fn tls_error(op: &'static str, detail: &str) -> ApiError {
    if detail.contains("invalid peer certificate") || detail.contains("UnknownIssuer") {
        ApiError::Misconfigured {
            op,
            detail: format!(
                "TLS: {detail} (a private CA: pass --ca-file PATH or set MOLECULE_CA_FILE; or the host name in --api-url is not the one in the certificate)"
            ),
        }
    } else if detail.contains("corrupt message") || detail.contains("InvalidContentType") {
        ApiError::Misconfigured {
            op,
            detail: format!(
                "TLS: {detail}: the server does not speak TLS on that port; is it a plain-HTTP port (http://)?"
            ),
        }
    } else {
        ApiError::Transport {
            op,
            detail: detail.to_string(),
        }
    }
}

type Resp = ureq::http::Response<ureq::Body>;

/// Passes 2xx through; turns anything else into `ApiError::Status` with what the
/// body and headers say.
fn check_status(op: &'static str, mut resp: Resp) -> Result<Resp, ApiError> {
    let status = resp.status().as_u16();
    if (200..300).contains(&status) {
        return Ok(resp);
    }
    if (300..400).contains(&status) {
        // Never followed (the token would go along); said plainly instead.
        let location = resp
            .headers()
            .get("location")
            .and_then(|v| v.to_str().ok())
            .map(|l| snippet(l.trim()))
            .unwrap_or_default();
        let detail = if location.is_empty() {
            format!("HTTP {status} redirect without a Location: check --api-url")
        } else {
            format!(
                "HTTP {status} redirect to {location}: the platform moved: use --api-url {} (redirects are not followed, so the token never goes to another host)",
                moved_base(&location)
            )
        };
        return Err(ApiError::Misconfigured { op, detail });
    }
    let header_retry = resp
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(parse_retry_after);
    let raw = resp
        .body_mut()
        .with_config()
        .limit(SMALL_BODY_LIMIT)
        .read_to_vec()
        .unwrap_or_default();
    let parsed: ErrorBody = serde_json::from_slice(&raw).unwrap_or_default();
    let mut message = match &parsed.error {
        Some(Value::String(s)) => s.clone(),
        Some(other) => other.to_string(),
        None => snippet(&String::from_utf8_lossy(&raw)),
    };
    if let Some(Value::String(d)) = &parsed.detail {
        message = format!("{message} ({d})");
    }
    let body_retry = parsed.retry_after.as_ref().and_then(|v| match v {
        Value::Number(n) => n.as_f64().map(|s| s.to_string()),
        Value::String(s) => Some(s.clone()),
        _ => None,
    });
    let retry_after = header_retry.or_else(|| body_retry.as_deref().and_then(parse_retry_after));
    Err(ApiError::Status {
        op,
        status,
        message: snippet(&message),
        hint: parsed.hint,
        retry_after,
        delivery_confirmed: parsed.delivery_confirmed.unwrap_or(false),
        busy: parsed.busy.unwrap_or(false),
        code: parsed.code,
    })
}

/// Seconds (integer or decimal), clamped to [0, 300 s]. HTTP dates are not used by
/// the platform and are ignored.
fn parse_retry_after(v: &str) -> Option<Duration> {
    let secs: f64 = v.trim().parse().ok()?;
    if !secs.is_finite() || secs < 0.0 {
        return None;
    }
    Some(Duration::from_secs_f64(
        secs.min(RETRY_AFTER_CAP.as_secs_f64()),
    ))
}

fn snippet(s: &str) -> String {
    let s = s.trim();
    if s.len() <= SNIPPET_LEN {
        return s.to_string();
    }
    let mut end = SNIPPET_LEN;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

fn read_json<T: DeserializeOwned>(
    op: &'static str,
    mut resp: Resp,
    limit: u64,
) -> Result<T, ApiError> {
    let raw = resp
        .body_mut()
        .with_config()
        .limit(limit)
        .read_to_vec()
        .map_err(|e| transport_error(op, e))?;
    serde_json::from_slice(&raw).map_err(|e| ApiError::BadBody {
        op,
        detail: e.to_string(),
    })
}

/// The body, at most `limit` bytes, read into a buffer of its announced length (up
/// to [`PREALLOCATE`]) rather than grown from empty.
fn read_body(op: &'static str, mut resp: Resp, limit: u64) -> Result<Vec<u8>, ApiError> {
    use std::io::Read as _;
    let announced = resp
        .headers()
        .get(ureq::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0);
    let capacity = usize::try_from(announced.min(limit).min(PREALLOCATE)).unwrap_or(0);
    let mut raw = Vec::with_capacity(capacity);
    resp.body_mut()
        .with_config()
        .limit(limit)
        .reader()
        .read_to_end(&mut raw)
        .map_err(|e| transport_error(op, ureq::Error::from(e)))?;
    Ok(raw)
}

/// The most [`read_body`] allocates ahead of what a body sends.
const PREALLOCATE: u64 = 64 * 1024;

/// Like [`read_json`] but an empty body is `Null`, not an error.
fn read_value(op: &'static str, resp: Resp, limit: u64) -> Result<Value, ApiError> {
    let raw = read_body(op, resp, limit)?;
    if raw.iter().all(u8::is_ascii_whitespace) {
        return Ok(Value::Null);
    }
    serde_json::from_slice(&raw).map_err(|e| ApiError::BadBody {
        op,
        detail: e.to_string(),
    })
}

/// A JSON array body (lists of peers or delegations).
fn read_list(op: &'static str, resp: Resp) -> Result<Vec<Value>, ApiError> {
    match read_value(op, resp, LIST_BODY_LIMIT)? {
        Value::Array(items) => Ok(items),
        Value::Null => Ok(Vec::new()),
        other => Err(ApiError::BadBody {
            op,
            detail: format!("expected a JSON array, got {}", snippet(&other.to_string())),
        }),
    }
}

/// A file id goes into a URL path only after this check (§API-1.7). Workspace ids
/// need none: they arrive as [`WorkspaceId`], checked where they were read.
fn check_uuid(op: &'static str, what: &str, id: &str) -> Result<(), ApiError> {
    if crate::uuid::is_uuid(id) {
        Ok(())
    } else {
        Err(ApiError::Invalid {
            op,
            detail: format!("{what} {id:?} is not a UUID"),
        })
    }
}

/// Reads and discards a small body so the connection can be reused.
fn drain(op: &'static str, mut resp: Resp) -> Result<(), ApiError> {
    resp.body_mut()
        .with_config()
        .limit(SMALL_BODY_LIMIT)
        .read_to_vec()
        .map(|_| ())
        .map_err(|e| transport_error(op, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_next_page_comes_back_to_a_shared_timestamp_unless_stuck_on_it() {
        let t = crate::timestamp::parse_rfc3339("2026-05-01T00:00:00.000005Z").unwrap();
        assert_eq!(before_ts_after(t, false), "2026-05-01T00:00:00.000006Z");
        assert_eq!(before_ts_after(t, true), "2026-05-01T00:00:00.000005Z");
    }

    #[test]
    fn resolver_answers_addresses_itself_and_caches_names() {
        use ureq::unversioned::resolver::Resolver as _;
        let r = Resolver::default();
        let config = ureq::config::Config::default();
        let resolve = |u: &str| {
            let uri: ureq::http::Uri = u.parse().unwrap();
            r.resolve(&uri, &config, Default::default())
                .map(|a| a.iter().copied().collect::<Vec<_>>())
        };
        assert_eq!(
            resolve("http://127.0.0.1:9/x").unwrap(),
            ["127.0.0.1:9".parse().unwrap()]
        );
        assert_eq!(
            resolve("https://[::1]/").unwrap(),
            ["[::1]:443".parse().unwrap()]
        );
        assert!(r.last.lock().unwrap().is_none(), "addresses are not cached");
        let first = resolve("http://localhost:8/").unwrap();
        assert!(!first.is_empty());
        let cached = r.last.lock().unwrap().clone().unwrap();
        assert_eq!(cached.0, "localhost:8");
        assert_eq!(resolve("http://localhost:8/").unwrap(), first);
    }

    fn status(status: u16, delivery_confirmed: bool) -> ApiError {
        ApiError::Status {
            op: "x",
            status,
            message: String::new(),
            hint: None,
            retry_after: None,
            delivery_confirmed,
            busy: false,
            code: None,
        }
    }

    #[test]
    fn classification() {
        for s in [429, 500, 502, 503, 504] {
            assert!(status(s, false).is_retryable(), "{s}");
        }
        for s in [400, 401, 403, 404, 410, 413] {
            assert!(!status(s, false).is_retryable(), "{s}");
        }
        assert!(!status(502, true).is_retryable());
        assert!(ApiError::Timeout { op: "x" }.is_retryable());
        assert!(
            ApiError::Transport {
                op: "x",
                detail: String::new()
            }
            .is_retryable()
        );
        assert!(!ApiError::TooLarge { op: "x", limit: 1 }.is_retryable());
    }

    #[test]
    fn kinds() {
        let mut busy = status(503, false);
        if let ApiError::Status { busy: b, .. } = &mut busy {
            *b = true;
        }
        let cases = [
            (status(401, false), Kind::Unauthorized),
            (status(403, false), Kind::Forbidden),
            (status(404, false), Kind::NotFound),
            (status(410, false), Kind::Gone),
            (status(400, false), Kind::BadRequest),
            (status(409, false), Kind::Conflict),
            (status(413, false), Kind::RequestTooLarge),
            (status(422, false), Kind::Unprocessable),
            (status(418, false), Kind::Rejected),
            (status(408, false), Kind::RequestTimeout),
            (status(429, false), Kind::RateLimited),
            (status(500, false), Kind::ServerError),
            (status(502, false), Kind::ServerError),
            (status(502, true), Kind::Delivered),
            (status(503, false), Kind::Unavailable),
            (busy, Kind::Busy),
            (ApiError::Timeout { op: "x" }, Kind::NoAnswer),
            (
                ApiError::TooLarge { op: "x", limit: 1 },
                Kind::AnswerTooLarge,
            ),
        ];
        for (e, kind) in cases {
            assert_eq!(e.kind(), kind, "{e}");
        }
        // Only a send treats a busy queue and an unreadable 2xx as final.
        assert!(Kind::Busy.is_retryable() && !Kind::Busy.is_resendable());
        assert!(Kind::Unreadable.is_retryable() && !Kind::Unreadable.is_resendable());
        assert!(Kind::NoAnswer.is_resendable() && Kind::Unavailable.is_resendable());
    }

    #[test]
    fn retry_after_parsing() {
        assert_eq!(parse_retry_after("5"), Some(Duration::from_secs(5)));
        assert_eq!(
            parse_retry_after(" 1.5 "),
            Some(Duration::from_millis(1500))
        );
        assert_eq!(parse_retry_after("99999"), Some(RETRY_AFTER_CAP));
        assert_eq!(parse_retry_after("-1"), None);
        assert_eq!(parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT"), None);
        assert_eq!(parse_retry_after("NaN"), None);
    }

    #[test]
    fn endpoints_name_routes_not_ids() {
        let id = "11111111-1111-4111-8111-111111111111";
        assert_eq!(
            endpoint_of("GET", &format!("/workspaces/{id}/activity?since_id={id}")),
            "GET /workspaces/:id/activity"
        );
        assert_eq!(
            endpoint_of("GET", &format!("/registry/discover/{id}")),
            "GET /registry/discover/:id"
        );
        assert_eq!(
            endpoint_of("POST", "/registry/heartbeat"),
            "POST /registry/heartbeat"
        );
    }

    #[test]
    fn status_codes_are_written_as_to_string_writes_them() {
        for status in [0, 7, 42, 100, 200, 202, 429, 503, 999, 1000, 65535] {
            let mut buf = [0u8; 5];
            assert_eq!(status_code(status, &mut buf), status.to_string());
        }
    }

    #[test]
    fn request_counts_come_out_by_endpoint_and_code() {
        let stats = RequestStats::new();
        let id = "11111111-1111-4111-8111-111111111111";
        for (path, code) in [
            (format!("/workspaces/{id}/a2a"), "200"),
            ("/registry/heartbeat".to_string(), "200"),
            (format!("/workspaces/{id}/a2a"), "202"),
            (format!("/workspaces/{id}/a2a"), "200"),
            (format!("/workspaces/{id}/a2a?x=1"), "error"),
        ] {
            stats.record("POST", &path, code);
        }
        let get = |e: &str, c: &str, n: u64| (e.to_string(), c.to_string(), n);
        assert_eq!(
            stats.requests(),
            [
                get("POST /registry/heartbeat", "200", 1),
                get("POST /workspaces/:id/a2a", "200", 2),
                get("POST /workspaces/:id/a2a", "202", 1),
                get("POST /workspaces/:id/a2a", "error", 1),
            ]
        );
    }

    #[test]
    fn origin() {
        assert_eq!(
            origin_of("https://acme.moleculesai.app"),
            "https://acme.moleculesai.app"
        );
        assert_eq!(
            origin_of("http://127.0.0.1:8080/api/"),
            "http://127.0.0.1:8080"
        );
    }

    #[test]
    fn snippet_is_bounded_on_char_boundary() {
        let s = "é".repeat(300);
        let out = snippet(&s);
        assert!(out.len() <= SNIPPET_LEN + 3);
    }

    #[test]
    fn queued_detection() {
        let a = SendAnswer {
            status: 200,
            body: serde_json::json!({"status":"queued","delivery_mode":"poll"}),
        };
        assert!(a.is_queued());
        let b = SendAnswer {
            status: 202,
            body: serde_json::json!({"queued":true,"queue_id":"q"}),
        };
        assert!(b.is_queued());
        let c = SendAnswer {
            status: 200,
            body: serde_json::json!({"result":{"parts":[]}}),
        };
        assert!(!c.is_queued());
    }
}
