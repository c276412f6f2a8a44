//! Shared application state and the per-connection loop: read a request, run faults,
//! rate limit and tenant guard, dispatch to the platform or admin routes, record stats.

use std::io::BufReader;
use std::net::{Shutdown, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use serde_json::json;

use crate::faults::{FaultAction, Faults};
use crate::guard::{self, RateLimiter};
use crate::http::{self, ReadError, Request, Response};
use crate::stats::Stats;
use crate::store::Store;
use crate::{admin, ids, routes};

/// Largest `/a2a` body the proxy accepts (§2.7.2).
pub const A2A_MAX_BODY: usize = 16 * 1024 * 1024;
/// Idle keep-alive connections are closed after this long.
const IDLE_TIMEOUT: Duration = Duration::from_secs(300);

/// Command-line settings.
#[derive(Debug, Clone, Default)]
pub struct Config {
    pub port: u16,
    pub org_id: Option<String>,
    pub rate_limit: Option<u64>,
    pub delegation_result_push: bool,
    /// Behave like a server from before `include=peer_info`: never add sender fields.
    pub no_peer_info: bool,
    pub quiet: bool,
    pub admin_token: Option<String>,
    /// Behave like a server without the event stream: 404 on every stream request.
    pub no_event_stream: bool,
}

/// Everything the handlers share.
#[derive(Debug)]
pub struct App {
    pub cfg: Config,
    pub store: Mutex<Store>,
    pub faults: Mutex<Faults>,
    pub stats: Mutex<Stats>,
    pub limiter: Option<Mutex<RateLimiter>>,
    /// Requests handled whose answer an `after` fault is holding back right now.
    pub held: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl App {
    pub fn new(cfg: Config) -> App {
        let mut store = Store::default();
        store.events.no_stream_anywhere = cfg.no_event_stream;
        App {
            limiter: cfg.rate_limit.map(|n| Mutex::new(RateLimiter::new(n))),
            cfg,
            store: Mutex::new(store),
            faults: Mutex::new(Faults::default()),
            stats: Mutex::new(Stats::default()),
            held: AtomicU64::new(0),
        }
    }

    pub fn store(&self) -> MutexGuard<'_, Store> {
        lock(&self.store)
    }

    pub fn faults(&self) -> MutexGuard<'_, Faults> {
        lock(&self.faults)
    }

    pub fn stats(&self) -> MutexGuard<'_, Stats> {
        lock(&self.stats)
    }

    /// `http://<Host>` of the request, for absolute URLs in responses.
    pub fn base_url(&self, req: &Request) -> String {
        match req.header("host").filter(|h| !h.is_empty()) {
            Some(h) => format!("http://{h}"),
            None => format!("http://127.0.0.1:{}", self.cfg.port),
        }
    }
}

fn is_admin_path(path: &str) -> bool {
    path == "/_admin" || path.starts_with("/_admin/")
}

/// The 413 answer for an oversized body.
pub fn too_large(path: &str, len: u64) -> Response {
    if path.ends_with("/a2a") {
        Response::json(
            413,
            &json!({
                "error": format!("request body exceeds {A2A_MAX_BODY} byte limit: got {len} bytes"),
                "truncated": true,
                "max_bytes": A2A_MAX_BODY,
            }),
        )
    } else {
        Response::error(413, "request body too large")
    }
}

/// Serve one connection until it closes.
pub fn serve_connection(app: Arc<App>, stream: TcpStream) {
    let _ = stream.set_nodelay(true);
    let _ = stream.set_read_timeout(Some(IDLE_TIMEOUT));
    let peer_ip = stream
        .peer_addr()
        .map(|a| a.ip().to_string())
        .unwrap_or_default();
    let Ok(mut writer) = stream.try_clone() else {
        return;
    };
    let mut reader = BufReader::with_capacity(64 * 1024, stream);
    loop {
        let mut req = match http::read_request(&mut reader, &mut writer) {
            Ok(r) => r,
            Err(ReadError::Closed | ReadError::Io) => break,
            Err(ReadError::Bad { status, message }) => {
                let _ = http::write_response(&mut writer, &Response::error(status, message), false);
                break;
            }
            Err(ReadError::TooLarge { path, len }) => {
                let _ = http::write_response(&mut writer, &too_large(&path, len), false);
                break;
            }
        };
        req.peer_ip.clone_from(&peer_ip);
        let keep_alive = !req.wants_close();
        match process(&app, &req) {
            Some(mut resp) if resp.stream.is_some() => {
                if let Some(sub) = resp.stream.take() {
                    let _ = crate::events::serve(&mut writer, sub, &resp.headers);
                }
                break;
            }
            Some(resp) => {
                if http::write_response(&mut writer, &resp, keep_alive).is_err() || !keep_alive {
                    break;
                }
            }
            None => break,
        }
    }
    let _ = writer.shutdown(Shutdown::Both);
}

/// Handle one request. None = drop the connection without an answer.
pub fn process(app: &Arc<App>, req: &Request) -> Option<Response> {
    let started = Instant::now();
    if is_admin_path(&req.path) {
        let resp = admin::handle(app, req);
        log(app, req, resp.status, started);
        return Some(resp);
    }
    let at_ms = ids::now_ms();
    let route = routes::classify(&req.method, &req.path);
    let resp = platform(app, req, &route);
    let status = resp.as_ref().map_or(0, |r| r.status);
    app.stats().record(
        &req.method,
        &format!("{} {}", req.method, route.template()),
        &req.path,
        &req.query,
        status,
        at_ms,
        route.workspace_id(),
    );
    log(app, req, status, started);
    resp
}

fn log(app: &App, req: &Request, status: u16, started: Instant) {
    if !app.cfg.quiet {
        eprintln!(
            "{} {} -> {} ({} us)",
            req.method,
            req.path,
            status,
            started.elapsed().as_micros()
        );
    }
}

fn platform(app: &Arc<App>, req: &Request, route: &routes::Route<'_>) -> Option<Response> {
    let fault = app.faults().take(&req.method, &req.path);
    let (mut drop_after, mut after) = (false, None);
    if let Some(action) = fault {
        drop_after = action.drop_after;
        if action.after {
            after = Some(action);
        } else if let Some(resp) = apply(&action) {
            return resp;
        }
    }
    let mut decision = None;
    if let Some(limiter) = &app.limiter {
        let key = RateLimiter::key_for(req);
        let d = lock(limiter).check(&key, Instant::now());
        if !d.allowed {
            return Some(d.decorate(d.rejection()));
        }
        decision = Some(d);
    }
    let resp = match app
        .cfg
        .org_id
        .as_deref()
        .and_then(|org| guard::tenant_guard(org, req))
    {
        Some(rejected) => rejected,
        None => routes::handle(app, req, route),
    };
    if drop_after {
        return None;
    }
    if let Some(action) = after {
        // The platform did the work; the answer is late, lost or replaced.
        app.held.fetch_add(1, Ordering::SeqCst);
        let replaced = apply(&action);
        app.held.fetch_sub(1, Ordering::SeqCst);
        if let Some(resp) = replaced {
            return resp;
        }
    }
    Some(match decision {
        Some(d) => d.decorate(resp),
        // Local-dev platforms are unlimited and say so (§1.4).
        None => resp
            .with_header("X-RateLimit-Limit", "unlimited")
            .with_header("X-RateLimit-Remaining", "unlimited")
            .with_header("X-RateLimit-Reset", "unlimited"),
    })
}

/// Sleeps for a fault's delay, then says what goes back instead of the platform's
/// answer: `Some(None)` drops the connection, `Some(Some(resp))` is the fault's
/// status; `None` lets the platform's own answer through.
fn apply(action: &FaultAction) -> Option<Option<Response>> {
    if action.delay_ms > 0 {
        std::thread::sleep(Duration::from_millis(action.delay_ms));
    }
    if action.drop {
        return Some(None);
    }
    let status = action.status?;
    let mut resp = Response::json(status, &action.body);
    resp.headers = action.headers.clone();
    Some(Some(resp))
}
