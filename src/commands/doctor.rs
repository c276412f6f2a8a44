//! `molecule doctor`: can this host run `molecule connect` for the workspace? One line
//! per check (config, DNS, TCP, TLS/HTTP, auth, poll mode, the 410 cursor probe, state
//! dir, optionally the backend); exit 0 when all pass, 1 otherwise. A check whose
//! precondition failed is reported as `skip`, not as a second failure. The `config`
//! line and the JSON `version` name the binary (`molecule --version`).

use std::io::Write;
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::{Ctx, Failure, Report};
use crate::api::{ApiError, Kind, Since};
use crate::cli::{DoctorArgs, GlobalArgs};
use crate::config::{self, TokenSource};
use crate::error::Error;

/// TCP connect limit per address.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Body cap for the one-row activity probes.
const PROBE_BODY_LIMIT: u64 = 256 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Ok,
    Fail,
    Skip,
}

struct Check {
    name: &'static str,
    outcome: Outcome,
    detail: String,
}

#[derive(Default)]
struct Checks(Vec<Check>);

impl Checks {
    fn push(&mut self, name: &'static str, result: Result<String, String>) -> bool {
        let (outcome, detail) = match result {
            Ok(d) => (Outcome::Ok, d),
            Err(d) => (Outcome::Fail, d),
        };
        self.0.push(Check {
            name,
            outcome,
            detail,
        });
        outcome == Outcome::Ok
    }

    fn skip(&mut self, name: &'static str, why: &str) {
        self.0.push(Check {
            name,
            outcome: Outcome::Skip,
            detail: why.to_string(),
        });
    }
}

pub(super) fn run(
    g: &GlobalArgs,
    env: &dyn Fn(&str) -> Option<String>,
    a: &DoctorArgs,
) -> Result<Report, Failure> {
    let mut checks = Checks::default();
    match config::agent_config(g, env) {
        Err(e) => {
            checks.push("config", Err(format!("{e} (molecule {})", crate::VERSION)));
            for name in [
                "dns",
                "tcp",
                "http",
                "auth",
                "poll-mode",
                "cursor",
                "state-dir",
            ] {
                checks.skip(name, "needs a valid configuration");
            }
        }
        Ok(cfg) => {
            let source = match &cfg.common.token_source {
                TokenSource::File(p) => format!("token file {}", p.display()),
                TokenSource::Env => "MOLECULE_WORKSPACE_TOKEN".to_string(),
                TokenSource::Arg => "--token".to_string(),
            };
            checks.push(
                "config",
                Ok(format!(
                    "molecule {}, platform {}, workspace {}, token from {source}, state dir {}",
                    crate::VERSION,
                    cfg.common.api_url,
                    cfg.workspace_id,
                    cfg.common.state_dir.display()
                )),
            );
            let state_dir = cfg.common.state_dir.clone();
            network_checks(&mut checks, &Ctx::from_config(cfg));
            checks.push("state-dir", state_dir_writable(&state_dir));
        }
    }
    if a.backend.is_some() || !a.backend_opts.is_empty() {
        checks.push("backend", backend(a));
    }
    let human: String = checks
        .0
        .iter()
        .map(|c| {
            let tag = match c.outcome {
                Outcome::Ok => "ok  ",
                Outcome::Fail => "FAIL",
                Outcome::Skip => "skip",
            };
            format!("{tag} {}: {}\n", c.name, c.detail)
        })
        .collect();
    let list: Vec<Value> = checks
        .0
        .iter()
        .map(|c| {
            let result = match c.outcome {
                Outcome::Ok => "ok",
                Outcome::Fail => "fail",
                Outcome::Skip => "skip",
            };
            json!({"name": c.name, "result": result, "detail": c.detail})
        })
        .collect();
    let failed = checks
        .0
        .iter()
        .filter(|c| c.outcome == Outcome::Fail)
        .count();
    if failed == 0 {
        return Ok(Report {
            json: json!({"ok": true, "version": crate::VERSION, "checks": list}),
            human,
        });
    }
    let mut f = Failure::new(Error::Runtime(format!(
        "doctor: {failed} of {} check(s) failed",
        checks.0.len()
    )))
    .with("version", json!(crate::VERSION))
    .with("checks", list);
    f.human = Some(human);
    Err(f)
}

/// DNS, TCP, TLS/HTTP, auth, poll mode and the cursor probe, in that order; each
/// needs the one before it.
fn network_checks(checks: &mut Checks, ctx: &Ctx) {
    let http_name = if ctx.api_url().starts_with("https://") {
        "tls"
    } else {
        "http"
    };
    let later = [http_name, "auth", "poll-mode", "cursor", "events"];
    let skip_rest = |checks: &mut Checks, from: usize, why: &str| {
        for name in later.iter().skip(from) {
            checks.skip(name, why);
        }
    };
    let Some((host, port)) = host_port(ctx.api_url()) else {
        checks.push(
            "dns",
            Err(format!("cannot find a host in {}", ctx.api_url())),
        );
        checks.skip("tcp", "needs a host");
        skip_rest(checks, 0, "needs a host");
        return;
    };
    let addrs: Vec<SocketAddr> = match (host.as_str(), port).to_socket_addrs() {
        Ok(a) => a.collect(),
        Err(e) => {
            checks.push("dns", Err(format!("cannot resolve {host}: {e}")));
            checks.skip("tcp", "needs DNS");
            skip_rest(checks, 0, "needs DNS");
            return;
        }
    };
    let shown: Vec<String> = addrs.iter().take(3).map(|a| a.ip().to_string()).collect();
    if !checks.push(
        "dns",
        if addrs.is_empty() {
            Err(format!("{host} resolves to no address"))
        } else {
            Ok(format!("{host} resolves to {}", shown.join(", ")))
        },
    ) {
        checks.skip("tcp", "needs DNS");
        skip_rest(checks, 0, "needs DNS");
        return;
    }
    if !checks.push("tcp", tcp_connect(&addrs)) {
        skip_rest(checks, 0, "needs a TCP connection");
        return;
    }
    let t = Instant::now();
    let health = ctx
        .client
        .health()
        .map(|()| format!("GET /health answered in {} ms", t.elapsed().as_millis()))
        .map_err(|e| e.to_string());
    if !checks.push(later[0], health) {
        skip_rest(checks, 1, "needs the platform to answer HTTP");
        return;
    }
    let auth = match ctx.client.activity(&Since::Secs(1), 1, PROBE_BODY_LIMIT) {
        Ok(_) => Ok(format!(
            "the token is accepted (GET /workspaces/{}/activity)",
            ctx.workspace_id()
        )),
        Err(e) if e.is_unauthorized() => Err(match ctx.unauthorized(&e) {
            Ok(()) => format!(
                "{e}; the token file has changed since this check started: run doctor again"
            ),
            Err(f) => f.error.to_string(),
        }),
        Err(e) => Err(e.to_string()),
    };
    if !checks.push("auth", auth) {
        skip_rest(checks, 2, "needs a working token");
        return;
    }
    checks.push("poll-mode", poll_mode(ctx));
    checks.push("cursor", cursor_probe(ctx));
    match event_stream(ctx) {
        Ok(Some(d)) => {
            checks.push("events", Ok(d));
        }
        Ok(None) => checks.skip(
            "events",
            "the platform has no event stream (HTTP 404): connect --wake auto polls every --interval-ms instead",
        ),
        Err(e) => {
            checks.push("events", Err(e));
        }
    }
}

/// Does `GET /workspaces/<id>/events/stream` open (§API-2.17)? `None`: the platform
/// has none (404), which `--wake auto` handles by polling.
fn event_stream(ctx: &Ctx) -> Result<Option<String>, String> {
    let t = Instant::now();
    match crate::events::EventStream::open(&ctx.client, &crate::shutdown::Shutdown::new()) {
        Ok(_) => Ok(Some(format!(
            "the event stream opens (GET /workspaces/{}/events/stream, {} ms): connect wakes on events",
            ctx.workspace_id(),
            t.elapsed().as_millis()
        ))),
        Err(e) if e.kind() == Kind::NotFound => Ok(None),
        Err(e) => Err(format!(
            "{e}; connect falls back to polling every --interval-ms"
        )),
    }
}

/// `scheme://host[:port]/…` → host (IPv6 without brackets) and port.
fn host_port(url: &str) -> Option<(String, u16)> {
    let (scheme, rest) = url.split_once("://")?;
    let authority = rest.split(['/', '?', '#']).next()?;
    let default = if scheme == "https" { 443 } else { 80 };
    if let Some(v6) = authority.strip_prefix('[') {
        let (host, after) = v6.split_once(']')?;
        let port = match after.strip_prefix(':') {
            Some(p) => p.parse().ok()?,
            None => default,
        };
        return Some((host.to_string(), port));
    }
    match authority.rsplit_once(':') {
        Some((h, p)) => Some((h.to_string(), p.parse().ok()?)),
        None if !authority.is_empty() => Some((authority.to_string(), default)),
        None => None,
    }
}

fn tcp_connect(addrs: &[SocketAddr]) -> Result<String, String> {
    let mut errors = Vec::new();
    for addr in addrs {
        let t = Instant::now();
        match TcpStream::connect_timeout(addr, CONNECT_TIMEOUT) {
            Ok(_) => {
                return Ok(format!(
                    "connected to {addr} in {} ms",
                    t.elapsed().as_millis()
                ));
            }
            Err(e) => errors.push(format!("{addr}: {e}")),
        }
    }
    Err(format!("cannot connect: {}", errors.join("; ")))
}

/// Register in poll mode (idempotent; what `connect` does on start) and check the
/// echo (§API-2.1, §API-4.1).
fn poll_mode(ctx: &Ctx) -> Result<String, String> {
    let card = crate::wire::agent_card(ctx.workspace_id());
    match ctx.client.register(card) {
        Ok(r) => match r.delivery_mode.as_deref() {
            Some("poll") => Ok("register echoed delivery_mode \"poll\"".to_string()),
            other => Err(format!(
                "register answered delivery_mode {:?}, not \"poll\": the platform is too old for poll mode",
                other.unwrap_or("(none)")
            )),
        },
        Err(e) => Err(e.to_string()),
    }
}

/// An unknown `since_id` must answer 410, which is how the connector learns its
/// cursor was pruned (§API-4.2).
fn cursor_probe(ctx: &Ctx) -> Result<String, String> {
    let probe = Since::Cursor(crate::uuid::new_v4());
    match ctx.client.activity(&probe, 1, PROBE_BODY_LIMIT) {
        Err(e) if e.kind() == Kind::Gone => {
            Ok("an unknown since_id answers 410, so a pruned cursor is detected".to_string())
        }
        Ok(_) => Err(
            "an unknown since_id was accepted (HTTP 200): the platform ignores since_id, too old for poll mode"
                .to_string(),
        ),
        Err(e @ ApiError::Status { .. }) => Err(format!("{e} (expected HTTP 410)")),
        Err(e) => Err(e.to_string()),
    }
}

fn state_dir_writable(dir: &Path) -> Result<String, String> {
    crate::state::ensure_dir(dir).map_err(|e| e.to_string())?;
    let probe = dir.join(format!(".doctor-{}.tmp", crate::uuid::new_v4()));
    let written = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&probe)
        .and_then(|mut f| {
            f.write_all(b"molecule doctor\n")
                .and_then(|()| f.sync_all())
        });
    let removed = std::fs::remove_file(&probe);
    match (written, removed) {
        (Ok(()), Ok(())) => Ok(format!("{} is writable", dir.display())),
        (Err(e), _) => Err(format!("cannot create a file in {}: {e}", dir.display())),
        (Ok(()), Err(e)) => Err(format!("cannot remove {}: {e}", probe.display())),
    }
}

fn backend(a: &DoctorArgs) -> Result<String, String> {
    let name = a.backend.as_deref().unwrap_or("claude-code");
    let opts = config::backend_opts(&a.backend_opts).map_err(|e| e.to_string())?;
    crate::backend::build(name, &opts, 1)
        .and_then(|b| b.probe())
        .map_err(|e| {
            let e = e.to_string();
            e.strip_prefix("backend: ").unwrap_or(&e).to_string()
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_and_port() {
        assert_eq!(
            host_port("https://acme.example"),
            Some(("acme.example".into(), 443))
        );
        assert_eq!(
            host_port("http://127.0.0.1:8080/api"),
            Some(("127.0.0.1".into(), 8080))
        );
        assert_eq!(host_port("http://[::1]:9/"), Some(("::1".into(), 9)));
        assert_eq!(host_port("https://[::1]"), Some(("::1".into(), 443)));
        assert_eq!(host_port("http://h:notaport"), None);
        assert_eq!(host_port("nourl"), None);
    }

    #[test]
    fn state_dir_probe_leaves_nothing_behind() {
        let dir = std::env::temp_dir().join(format!("molecule-doctor-{}", crate::uuid::new_v4()));
        assert!(state_dir_writable(&dir).is_ok());
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
