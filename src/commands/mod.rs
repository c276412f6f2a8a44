//! The one-shot agent-side commands for shell scripts (`send`, `peers`, `discover`,
//! `info`, `delegate`, `delegations`, `notify`, `heartbeat`, `status`, `doctor` and
//! the platform tools `memory`, `ask`, `request(s)`, `history`, `card`, `broadcast`,
//! `download`) and what they share: the platform context with its 401 handling, the
//! retry budget, the error-to-diagnostic mapping, and output. Their arguments arrive
//! checked (`config::agent`, `config::tools`). Output is either human text or, with
//! `--json`, exactly one JSON document on stdout, failures included
//! (`{"ok":false,"error":…,"exit_code":N}`); logs and errors go to stderr.
//! No threads; a send's retries wait with a plain sleep (one-shot process).

mod card;
mod delegate;
mod doctor;
mod files;
mod history;
mod memory;
mod messaging;
mod registry;
mod requests;
mod send;
mod status;

use std::cell::Cell;
use std::io::Write;

use serde_json::{Map, Value};

use crate::api::{ApiError, Client, ClientConfig, Kind};
use crate::backend::BackendError;
use crate::cli::{Command, GlobalArgs};
use crate::config::agent;
use crate::config::{self, AgentConfig, ConfigError, tools};
use crate::credentials::{Credentials, Standing, rejected_message, removed_message};
use crate::error::Error;
use crate::state::StateError;
use crate::uuid::WorkspaceId;

/// Cap for the answers of the tool routes (lists of memories, requests, history).
const LIST_LIMIT: u64 = 16 * 1024 * 1024;

/// Runs one agent-side command and writes its output to `out`: human text, or one
/// JSON document with `--json` (also when the command fails). The error is returned
/// for `main` to print on stderr and turn into the exit code.
pub fn run(
    global: &GlobalArgs,
    command: Command,
    env: &dyn Fn(&str) -> Option<String>,
    out: &mut dyn Write,
) -> Result<(), Error> {
    let result = match command {
        Command::Send(a) => resolved(global, env, || agent::send(&a), send::run),
        Command::Peers(a) => Ctx::new(global, env).and_then(|c| registry::peers(&c, &a)),
        Command::Discover(a) => resolved(global, env, || agent::discover(&a), registry::discover),
        Command::Info(a) => resolved(
            global,
            env,
            || agent::info(&a),
            |c, id| registry::info(c, id.as_ref()),
        ),
        Command::Delegate(a) => resolved(global, env, || agent::delegate(&a), delegate::delegate),
        Command::Delegations(a) => {
            Ctx::new(global, env).and_then(|c| delegate::delegations(&c, &a))
        }
        Command::Notify(a) => resolved(global, env, || agent::notify(&a), messaging::notify),
        Command::Heartbeat(a) => {
            resolved(global, env, || agent::heartbeat(&a), messaging::heartbeat)
        }
        Command::Status {
            stale_after,
            prometheus,
        } => status::run(global, env, stale_after, prometheus),
        Command::Doctor(a) => doctor::run(global, env, &a),
        Command::Memory(a) => resolved(global, env, || tools::memory(&a), memory::run),
        Command::Ask(a) => resolved(global, env, || tools::ask(&a), requests::ask),
        Command::Requests(a) => resolved(global, env, || tools::requests(&a), requests::list),
        Command::Request(a) => resolved(global, env, || tools::request(&a), requests::one),
        Command::History(a) => resolved(global, env, || tools::history(&a), history::run),
        Command::Card(a) => resolved(global, env, || tools::card(&a), card::update),
        Command::Broadcast(a) => resolved(global, env, || tools::broadcast(&a), card::broadcast),
        // Only our own uploads can be fetched: this one resolves against the config.
        Command::Download(a) => Ctx::new(global, env).and_then(|c| {
            let d = tools::download(&a, c.workspace_id(), global.json)?;
            files::download(&c, &d)
        }),
        Command::Help(_)
        | Command::Version
        | Command::Connect(_)
        | Command::Completions(_)
        | Command::Man => Err(Failure::new(Error::Runtime(
            "internal: not an agent-side command".into(),
        ))),
    };
    match result {
        Ok(report) => {
            let text = if global.json {
                document(&report.json)
            } else {
                report.human
            };
            crate::output::write_quiet(out, &text)
        }
        Err(failure) => {
            let text = if global.json {
                Some(document(&failure.to_json()))
            } else {
                failure.human.clone()
            };
            if let Some(text) = text {
                crate::output::write_quiet(out, &text)?;
            }
            Err(*failure.error)
        }
    }
}

/// Runs a command whose arguments `resolve` checks: the platform settings first, then
/// the command's own (the order its errors are reported in), then `run` with both.
fn resolved<S>(
    global: &GlobalArgs,
    env: &dyn Fn(&str) -> Option<String>,
    resolve: impl FnOnce() -> Result<S, ConfigError>,
    run: impl FnOnce(&Ctx, &S) -> Result<Report, Failure>,
) -> Result<Report, Failure> {
    let ctx = Ctx::new(global, env)?;
    let settings = resolve()?;
    run(&ctx, &settings)
}

/// One JSON document on one line.
fn document(v: &Value) -> String {
    format!("{v}\n")
}

/// What a successful command prints.
#[derive(Debug)]
struct Report {
    /// The `--json` document.
    json: Value,
    /// Text for people.
    human: String,
}

/// A failed command: the error (its text goes to stderr, its exit code to `main`),
/// fields for the `--json` failure document, and text that still belongs on stdout
/// (`doctor`'s check lines). The error is boxed to keep `Result`s small.
#[derive(Debug)]
struct Failure {
    error: Box<Error>,
    extra: Map<String, Value>,
    human: Option<String>,
}

impl Failure {
    fn new(error: Error) -> Failure {
        Failure {
            error: Box::new(error),
            extra: Map::new(),
            human: None,
        }
    }

    /// Adds a field to the `--json` failure document.
    fn with(mut self, key: &str, value: impl Into<Value>) -> Failure {
        self.extra.insert(key.to_string(), value.into());
        self
    }

    /// Bad input or configuration (exit 2).
    fn input(msg: impl Into<String>) -> Failure {
        Failure::new(Error::Config(ConfigError(msg.into())))
    }

    /// A failure of the command itself (exit 1).
    fn runtime(msg: impl Into<String>) -> Failure {
        Failure::new(Error::Runtime(msg.into()))
    }

    fn to_json(&self) -> Value {
        let mut m = Map::new();
        m.insert("ok".into(), Value::Bool(false));
        m.insert("error".into(), Value::from(self.error.to_string()));
        m.insert("exit_code".into(), Value::from(self.error.exit_code()));
        for (k, v) in &self.extra {
            m.insert(k.clone(), v.clone());
        }
        Value::Object(m)
    }
}

impl From<Error> for Failure {
    fn from(e: Error) -> Self {
        Failure::new(e)
    }
}

impl From<ConfigError> for Failure {
    fn from(e: ConfigError) -> Self {
        Failure::new(Error::Config(e))
    }
}

impl From<StateError> for Failure {
    fn from(e: StateError) -> Self {
        Failure::new(Error::State(e))
    }
}

impl From<BackendError> for Failure {
    fn from(e: BackendError) -> Self {
        Failure::new(Error::Backend(e))
    }
}

/// A platform command's context: the client for our workspace and where the token
/// came from (re-read once after a 401).
struct Ctx {
    client: Client,
    cfg: AgentConfig,
    reauthed: Cell<bool>,
}

impl Ctx {
    fn new(g: &GlobalArgs, env: &dyn Fn(&str) -> Option<String>) -> Result<Ctx, Failure> {
        let cfg = config::agent_config(g, env)?;
        Ok(Ctx::from_config(cfg))
    }

    fn from_config(cfg: AgentConfig) -> Ctx {
        let mut client_cfg = ClientConfig::new(&cfg.common.api_url, &cfg.workspace_id);
        client_cfg.ca_roots = cfg.common.ca_roots.clone();
        client_cfg.org_id = cfg.common.org_id.clone();
        let client = Client::new(client_cfg, Credentials::of(&cfg.common));
        Ctx {
            client,
            cfg,
            reauthed: Cell::new(false),
        }
    }

    fn workspace_id(&self) -> &WorkspaceId {
        &self.cfg.workspace_id
    }

    fn api_url(&self) -> &str {
        &self.cfg.common.api_url
    }

    /// Runs one platform call; a 401 goes through [`Ctx::unauthorized`] (one retry
    /// with a re-read token), any other error through `describe`.
    fn call<T>(
        &self,
        mut f: impl FnMut(&Client) -> Result<T, ApiError>,
        describe: impl Fn(&Ctx, ApiError) -> Failure,
    ) -> Result<T, Failure> {
        loop {
            match f(&self.client) {
                Ok(v) => return Ok(v),
                Err(e) if e.is_unauthorized() => self.unauthorized(&e)?,
                Err(e) => return Err(describe(self, e)),
            }
        }
    }

    /// Like [`Ctx::call`], retrying what the one classification calls transient
    /// (network, 429, 5xx) with backoff until `budget` is spent. A call that creates
    /// something (`idempotent` false) is not retried after a timeout or an unreadable
    /// 2xx: it may have been applied.
    fn call_within<T>(
        &self,
        budget: &Budget,
        idempotent: bool,
        mut f: impl FnMut(&Client) -> Result<T, ApiError>,
        describe: impl Fn(&Ctx, ApiError) -> Failure,
    ) -> Result<T, Failure> {
        let seed = crate::uuid::random_u64();
        let mut attempt: u32 = 0;
        loop {
            attempt = attempt.saturating_add(1);
            let e = match f(&self.client) {
                Ok(v) => return Ok(v),
                Err(e) if e.is_unauthorized() => {
                    self.unauthorized(&e)?;
                    continue;
                }
                Err(e) => e,
            };
            let maybe_applied = matches!(e, ApiError::Timeout { .. } | ApiError::BadBody { .. });
            // A platform without the feature (503 "memory plugin is not configured")
            // will not grow it within the budget.
            let unconfigured =
                e.kind() == Kind::Unavailable && e.to_string().contains("not configured");
            if !e.is_retryable() || unconfigured || (!idempotent && maybe_applied) {
                return Err(describe(self, e));
            }
            let delay = BUDGET_BACKOFF.delay(attempt, seed.wrapping_add(u64::from(attempt)));
            let delay = e.retry_after().map_or(delay, |r| delay.max(r));
            if !budget.allows(delay) {
                let f = describe(self, e);
                let msg = format!(
                    "{}; gave up after {attempt} attempt(s) within --budget {} s",
                    f.error, budget.secs
                );
                let error = match *f.error {
                    Error::Unreachable(_) => Error::Unreachable(msg),
                    Error::Runtime(_) => Error::Runtime(msg),
                    other => other,
                };
                return Err(Failure {
                    error: Box::new(error),
                    ..f
                }
                .with("attempts", attempt));
            }
            log::warn!(
                "{e}; retrying in {:.1} s (attempt {attempt})",
                delay.as_secs_f64()
            );
            std::thread::sleep(delay);
        }
    }

    /// After a 401 (§API-4.4): `Ok(())` means the token file held a new token, now
    /// installed: retry once. Otherwise the open `GET /workspaces/<own>` tells a
    /// removed workspace (exit 4) from a rejected token (exit 3, with how to rotate).
    fn unauthorized(&self, e: &ApiError) -> Result<(), Failure> {
        if !self.reauthed.replace(true) && self.client.credentials().reload() {
            return Ok(());
        }
        let ws = self.workspace_id();
        let standing = Standing::check(&self.client);
        if let Standing::Removed { hint } = &standing {
            return Err(removed_failure(ws, hint.as_deref()));
        }
        let f = match standing.gone_message(ws, self.api_url()) {
            Some(gone) => Failure::new(Error::Removed(format!("{e}: {gone}"))),
            None => Failure::new(Error::Credentials(format!(
                "{e}: {}",
                rejected_message(ws, self.client.credentials().source(), false)
            ))),
        };
        Err(f.with("http_status", 401))
    }
}

/// Retry pacing inside a `--budget`: 1, 2, 4, 8 s, ±25 %.
const BUDGET_BACKOFF: crate::backoff::Backoff = crate::backoff::Backoff {
    base: std::time::Duration::from_secs(1),
    max: std::time::Duration::from_secs(8),
    jitter: 0.25,
};
/// The total time a command may spend retrying (`--budget SECS`).
struct Budget {
    secs: u64,
    deadline: std::time::Instant,
}

impl Budget {
    /// Starts the clock on a `--budget` the settings layer has checked.
    fn start(secs: u64) -> Budget {
        let now = std::time::Instant::now();
        let deadline = now
            .checked_add(std::time::Duration::from_secs(secs))
            .unwrap_or(now);
        Budget { secs, deadline }
    }

    /// Whether waiting `d` still ends inside the budget.
    fn allows(&self, d: std::time::Duration) -> bool {
        std::time::Instant::now()
            .checked_add(d)
            .is_some_and(|t| t <= self.deadline)
    }
}

/// A platform error in words, with the platform's reason and hint: the shared
/// diagnostic of the tool commands. `what` names the refused thing for 403/404.
fn refused(ctx: &Ctx, e: ApiError, what: &str) -> Failure {
    match &e {
        ApiError::Status {
            status: s, message, ..
        } if !message.is_empty()
            && matches!(
                e.kind(),
                Kind::Forbidden
                    | Kind::NotFound
                    | Kind::Conflict
                    | Kind::BadRequest
                    | Kind::RequestTooLarge
                    | Kind::Unprocessable
            ) =>
        {
            let mut f = Failure::runtime(match e.hint() {
                Some(h) => format!("{e}: {what}. Hint: {h}"),
                None => format!("{e}: {what}"),
            })
            .with("http_status", *s);
            if let Some(h) = e.hint() {
                f = f.with("hint", h);
            }
            if e.kind() == Kind::BadRequest {
                f.error = Box::new(Error::Config(ConfigError(f.error.to_string())));
            }
            f
        }
        _ => describe(ctx, e),
    }
}

/// "Workspace removed" from a 410 answer, with the platform's hint (exit 4).
fn removed_failure(id: &str, hint: Option<&str>) -> Failure {
    let msg = format!("removed: {}", removed_message(id, hint));
    let mut f = Failure::new(Error::Removed(msg))
        .with("removed", true)
        .with("id", id)
        .with("http_status", 410);
    if let Some(h) = hint {
        f = f.with("hint", h);
    }
    f
}

/// The fallback diagnostic for a platform error, in words: unreachable, rate limited
/// or platform trouble (exit 75, try again later), a missing org header (exit 2),
/// anything else (exit 1). The platform's `hint` is appended when it sent one.
fn describe(ctx: &Ctx, e: ApiError) -> Failure {
    let url = ctx.api_url();
    let (status, hint) = match &e {
        ApiError::Status { status, hint, .. } => (Some(*status), hint.clone()),
        _ => (None, None),
    };
    let with_hint = |msg: String| match &hint {
        Some(h) => format!("{msg}. Hint: {h}"),
        None => msg,
    };
    let org_header_missing = matches!(&e, ApiError::Status { code: Some(code), .. } if code == "TENANT_ORG_HEADER_REQUIRED");
    let empty = matches!(&e, ApiError::Status { message, .. } if message.is_empty());
    let mut f = match e.kind() {
        Kind::NoAnswer => Failure::new(Error::Unreachable(format!(
            "{e} (platform at {url}); check the URL and the network, or try again later"
        ))),
        Kind::BadRequest if org_header_missing => Failure::input(format!(
            "{e}: this platform needs its org id: pass --org-id or set MOLECULE_ORG_ID"
        )),
        Kind::RateLimited => Failure::new(Error::Unreachable(format!(
            "{e}: rate limited by the platform; try again later"
        ))),
        Kind::ServerError | Kind::Unavailable | Kind::Busy | Kind::Delivered => Failure::new(
            Error::Unreachable(with_hint(format!("{e}: platform error; try again later"))),
        ),
        Kind::NotFound if empty => Failure::runtime(format!(
            "{e}: an empty 404 usually means a wrong --org-id / MOLECULE_ORG_ID, or a URL that \
             is not the platform's"
        )),
        Kind::Invalid | Kind::Misconfigured => Failure::input(e.to_string()),
        _ => Failure::runtime(with_hint(e.to_string())),
    };
    if let Some(s) = status {
        f = f.with("http_status", s);
    }
    if let Some(h) = hint {
        f = f.with("hint", h);
    }
    f
}

/// A string field of a JSON object, if present and a string.
fn str_of<'a>(v: &'a Value, key: &str) -> Option<&'a str> {
    v.get(key).and_then(Value::as_str)
}

/// Lays out rows as left-aligned columns separated by two spaces; the last column is
/// not padded. Control characters from the platform are shown as `?` so a name cannot
/// drive the terminal.
fn table(rows: &[Vec<String>]) -> String {
    let clean = |s: &str| -> String {
        s.chars()
            .map(|c| if c.is_control() { '?' } else { c })
            .collect()
    };
    let rows: Vec<Vec<String>> = rows
        .iter()
        .map(|r| r.iter().map(|c| clean(c)).collect())
        .collect();
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let mut widths = vec![0usize; cols];
    for r in &rows {
        for (i, c) in r.iter().enumerate() {
            if let Some(w) = widths.get_mut(i) {
                *w = (*w).max(c.chars().count());
            }
        }
    }
    let mut out = String::new();
    for r in &rows {
        let mut line = String::new();
        for (i, c) in r.iter().enumerate() {
            if i + 1 == r.len() {
                line.push_str(c);
            } else {
                let w = widths.get(i).copied().unwrap_or(0);
                line.push_str(c);
                line.push_str(&" ".repeat(w.saturating_sub(c.chars().count()) + 2));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// At most `max` characters of `s` on one line, with `…` when cut.
fn clip(s: &str, max: usize) -> String {
    let one_line = s.split_whitespace().collect::<Vec<_>>().join(" ");
    if one_line.chars().count() <= max {
        one_line
    } else {
        let mut t: String = one_line.chars().take(max.saturating_sub(1)).collect();
        t.push('…');
        t
    }
}

/// Text that ends with exactly one newline (for human output).
fn line(s: &str) -> String {
    if s.ends_with('\n') {
        s.to_string()
    } else {
        format!("{s}\n")
    }
}

/// The `runtime_metadata` the connector sends, so a manual heartbeat does not clear
/// what the connector declared (§API-2.2).
fn runtime_metadata() -> Value {
    crate::wire::runtime_metadata()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    use crate::config::agent::{message_text, read_limited, require_uuid};

    /// The resolving layer's error as the command reports it.
    fn failure<T: std::fmt::Debug>(r: Result<T, ConfigError>) -> Failure {
        Failure::from(r.unwrap_err())
    }

    #[test]
    fn read_limited_caps_and_checks_utf8() {
        assert_eq!(read_limited(&b"hello"[..], 5).unwrap(), "hello");
        assert!(
            read_limited(&b"hello!"[..], 5)
                .unwrap_err()
                .contains("too large")
        );
        assert!(
            read_limited(&[0xff, 0xfe][..], 5)
                .unwrap_err()
                .contains("UTF-8")
        );
    }

    #[test]
    fn message_text_rules() {
        assert!(message_text(None, "send").is_err());
        let e = failure(message_text(Some("  \n\t"), "send"));
        assert_eq!(e.error.exit_code(), 2);
        assert!(e.error.to_string().contains("empty"));
        assert_eq!(message_text(Some("hi"), "send").unwrap(), "hi");
    }

    #[test]
    fn uuid_required() {
        let e = failure(require_uuid(Some("../etc"), "send", "peer id"));
        assert_eq!(e.error.exit_code(), 2);
        assert!(e.error.to_string().contains("not a UUID"));
        assert!(require_uuid(None, "send", "peer id").is_err());
        assert_eq!(
            require_uuid(Some(" 11111111-2222-4333-8444-555555555555 "), "x", "id").unwrap(),
            "11111111-2222-4333-8444-555555555555"
        );
    }

    #[test]
    fn table_layout_and_sanitising() {
        let t = table(&[
            vec!["ID".into(), "NAME".into(), "ROLE".into()],
            vec!["1".into(), "a\u{1b}[31m".into(), "".into()],
        ]);
        assert_eq!(t, "ID  NAME    ROLE\n1   a?[31m\n");
        assert_eq!(clip("a  b\nc", 10), "a b c");
        assert_eq!(clip("abcdef", 4), "abc…");
    }

    #[test]
    fn failure_document() {
        let f = Failure::runtime("boom").with("http_status", 403);
        let v = f.to_json();
        assert_eq!(
            v,
            json!({"ok": false, "error": "boom", "exit_code": 1, "http_status": 403})
        );
    }
}
