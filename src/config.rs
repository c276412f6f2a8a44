//! Resolves raw `Args` plus an injected environment lookup into a validated config.
//! Owns `Secret` (a token that never prints). No network; no global env reads (the
//! env is a parameter, so tests inject it).

use std::collections::BTreeMap;
use std::fmt;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::backend::{BackendError, BackendSpec};
use crate::cli::{ConnectArgs, GlobalArgs};
use crate::uuid::{WorkspaceId, is_uuid};

pub(crate) mod agent;
pub(crate) mod tools;

/// A token. `Debug` and `Display` print `***`; use [`Secret::expose`] to send it.
#[derive(Clone, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// Wraps a token.
    pub fn new(s: impl Into<String>) -> Self {
        Self(s.into())
    }

    /// The token itself, for the `Authorization` header only.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// Where the token came from: re-read from the same place after a 401 or SIGHUP.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenSource {
    /// `--token-file` or `MOLECULE_WORKSPACE_TOKEN_FILE`.
    File(PathBuf),
    /// `MOLECULE_WORKSPACE_TOKEN`.
    Env,
    /// `--token` on the command line.
    Arg,
}

/// A configuration we cannot run with (exit 2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError(pub String);

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ConfigError {}

/// Settings shared by every command that talks to the platform.
#[derive(Debug, Clone)]
pub struct Common {
    /// Base URL without a trailing slash.
    pub api_url: String,
    /// `X-Molecule-Org-Id`, if any.
    pub org_id: Option<String>,
    /// Directory for state files.
    pub state_dir: PathBuf,
    /// The token (never printed).
    pub token: Secret,
    /// Where it came from.
    pub token_source: TokenSource,
    /// Extra trust roots from `--ca-file` / `MOLECULE_CA_FILE` / `SSL_CERT_FILE`.
    pub ca_roots: Option<crate::api::CaRoots>,
}

/// Everything `connect` needs, validated.
#[derive(Debug, Clone)]
pub struct ConnectConfig {
    /// URL, token, state dir.
    pub common: Common,
    /// Own workspace id.
    pub workspace_id: WorkspaceId,
    /// The backend with its options, parsed and checked.
    pub backend: BackendSpec,
    /// Pause between polls when the inbox is empty.
    pub poll_interval: Duration,
    /// Cold-start look-back window.
    pub since_secs: u64,
    /// Heartbeat period.
    pub heartbeat_every: Duration,
    /// How long a running backend may finish after SIGTERM.
    pub drain_timeout: Duration,
    /// Backend tries per message.
    pub max_attempts: u32,
    /// Post answers to inbound replies too (loop guard off).
    pub reply_to_replies: bool,
    /// Automatic replies in a row to one peer conversation (0 = no cap).
    pub max_auto_replies: u32,
    /// Backend runs at once (across senders).
    pub concurrency: usize,
    /// Cron mode: drain what is pending, then exit.
    pub once: bool,
    /// Stop after this many messages.
    pub max_messages: Option<u64>,
    /// Stop after this long without messages.
    pub idle_exit: Option<Duration>,
    /// Wait this long for another connector's lock instead of giving up at once.
    pub lock_wait: Duration,
    /// Delegation-result tracker cadence; zero = tracker off.
    pub delegations_every: Duration,
    /// Delivered delegation ids remembered (persisted LRU).
    pub delegations_capacity: usize,
    /// How new messages are noticed (`--wake`).
    pub wake: WakeMode,
    /// Poll period while the event stream is healthy (`--safety-poll-secs`).
    pub safety_poll: Duration,
    /// Percent of the rate bucket left for other clients (`--rate-reserve`).
    pub rate_reserve_pct: u8,
    /// Check and print, do not run.
    pub dry_run: bool,
    /// Broadcast cadence; zero = off.
    pub broadcasts_every: Duration,
    /// `--card-file`: the agent card to register with.
    pub agent_card: Option<serde_json::Value>,
}

/// `--wake`: how `connect` learns that a message is waiting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WakeMode {
    /// The event stream where the platform has one, else polling.
    Auto,
    /// The event stream; a platform without one is an error.
    Events,
    /// Polling only.
    Poll,
}

impl WakeMode {
    /// The flag's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            WakeMode::Auto => "auto",
            WakeMode::Events => "events",
            WakeMode::Poll => "poll",
        }
    }
}

/// Largest `--concurrency` (also the most a worker backend's capacity sets it to).
const MAX_CONCURRENCY: usize = 64;

/// Resolves `connect`'s configuration. `env` looks up one environment variable.
pub fn connect_config(
    g: &GlobalArgs,
    a: &ConnectArgs,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<ConnectConfig, ConfigError> {
    resolve_connect(g, a, env).map_err(|refused| match refused {
        Refused::Flags(e) => e,
        Refused::Backend(_, e) => ConfigError(e.to_string()),
    })
}

/// Why `connect`'s configuration was refused: its flags, or its backend's options
/// (checked last, once the flags are good; with `--workspaces` every entry's flags
/// are checked before any backend, and a backend's error names the workspace).
enum Refused {
    Flags(ConfigError),
    Backend(WorkspaceId, BackendError),
}

impl From<ConfigError> for Refused {
    fn from(e: ConfigError) -> Self {
        Refused::Flags(e)
    }
}

fn resolve_connect(
    g: &GlobalArgs,
    a: &ConnectArgs,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<ConnectConfig, Refused> {
    let workspace_id = a
        .workspace
        .clone()
        .or_else(|| g.workspace.clone())
        .or_else(|| non_empty(env("MOLECULE_WORKSPACE_ID")))
        .ok_or_else(|| {
            ConfigError(
                "connect: a workspace id is required (molecule connect <workspace-id>)".into(),
            )
        })?;
    // One spelling per workspace: file names, the lock and the reply ids derive
    // from it, so `ABC…` and `abc…` must not become two connectors.
    let workspace_id = WorkspaceId::parse(&workspace_id).ok_or_else(|| {
        ConfigError(format!(
            "connect: workspace id {:?} is not a UUID",
            workspace_id.trim().to_ascii_lowercase()
        ))
    })?;
    if let Some(mode) = &a.mode {
        match mode.as_str() {
            "poll" => {}
            "push" => {
                return Err(ConfigError(
                    "connect: --mode push is not supported; poll mode needs no public URL".into(),
                )
                .into());
            }
            other => {
                return Err(ConfigError(format!("connect: --mode {other:?}: must be poll")).into());
            }
        }
    }
    let common = common(g, a.token.as_deref(), env)?;
    let backend_name = a.backend.as_deref().unwrap_or("claude-code");
    let backend_opts = backend_opts(&a.backend_opts)?;
    let interval_ms = a.interval_ms.unwrap_or(1000);
    let interval_ms = Between(10, 3_600_000).check(
        format_args!("--interval-ms {interval_ms}"),
        interval_ms,
        "",
    )?;
    let since_secs = a.since_secs.unwrap_or(30);
    let since_secs = Between(1, 30 * 86_400).check(
        format_args!("--since-secs {since_secs}"),
        since_secs,
        " (30 days)",
    )?;
    let heartbeat_secs = a.heartbeat_secs.unwrap_or(20);
    let heartbeat_secs = Between(1, 120).check(
        format_args!("--heartbeat-secs {heartbeat_secs}"),
        heartbeat_secs,
        " (the platform marks a workspace offline after 180 s)",
    )?;
    let drain_secs = a.drain_timeout_secs.unwrap_or(30);
    let drain_secs =
        AtMost(3600).check(format_args!("--drain-timeout {drain_secs}"), drain_secs, "")?;
    let max_attempts = a.max_attempts.unwrap_or(3);
    let max_attempts = Between(1, 100).check(
        format_args!("--max-attempts {max_attempts}"),
        max_attempts,
        "",
    )?;
    let concurrency = a.concurrency.unwrap_or(1);
    let concurrency = Between(1, MAX_CONCURRENCY).check(
        format_args!("--concurrency {concurrency}"),
        concurrency,
        "",
    )?;
    if let Some(n) = a.max_messages {
        AtLeast(1).check(format_args!("--max-messages {n}"), n, "")?;
    }
    if let Some(s) = a.idle_exit_secs {
        AtLeast(1).check(format_args!("--idle-exit {s}"), s, " second")?;
    }
    if let Some(s) = a.lock_wait_secs {
        AtMost(86_400).check("--lock-wait", s, " seconds")?;
    }
    let delegations_secs = a.delegations_secs.unwrap_or(30);
    let delegations_secs = AtMost(86_400).check(
        format_args!("--delegations-secs {delegations_secs}"),
        delegations_secs,
        " (0 turns the tracker off)",
    )?;
    let broadcasts_secs = a.broadcasts_secs.unwrap_or(60);
    let broadcasts_secs = AtMost(86_400).check(
        format_args!("--broadcasts-secs {broadcasts_secs}"),
        broadcasts_secs,
        " (0 turns broadcasts off)",
    )?;
    let delegations_capacity = a.delegations_capacity.unwrap_or(1024);
    // The platform lists up to 50 delegations: remembering fewer delivered ids could
    // forget one that is still listed and deliver it again.
    let delegations_capacity = Between(64, 1_000_000).check(
        format_args!("--delegations-capacity {delegations_capacity}"),
        delegations_capacity,
        "",
    )?;
    let wake = match a.wake.as_deref() {
        None | Some("auto") => WakeMode::Auto,
        Some("events") => WakeMode::Events,
        Some("poll") => WakeMode::Poll,
        Some(other) => {
            return Err(
                ConfigError(format!("--wake {other:?}: must be auto, events or poll")).into(),
            );
        }
    };
    let safety_poll_secs = a.safety_poll_secs.unwrap_or(30);
    let safety_poll_secs = Between(1, 3600).check(
        format_args!("--safety-poll-secs {safety_poll_secs}"),
        safety_poll_secs,
        "",
    )?;
    let rate_reserve = a.rate_reserve.unwrap_or(30);
    let rate_reserve = Between(0, 90).check(
        format_args!("--rate-reserve {rate_reserve}"),
        rate_reserve,
        " (percent of the bucket)",
    )?;
    let agent_card = a.card_file.as_deref().map(read_card_file).transpose()?;
    let backend = BackendSpec::parse(backend_name, &backend_opts, concurrency)
        .map_err(|e| Refused::Backend(workspace_id.clone(), e))?;
    // Without --concurrency a worker backend runs as many messages at once as its
    // workers take: `workers=N` or `max_in_flight=N` alone means N at once.
    let concurrency = match (&backend, a.concurrency) {
        (BackendSpec::Worker(w), None) => w.capacity().clamp(1, MAX_CONCURRENCY),
        _ => concurrency,
    };
    Ok(ConnectConfig {
        common,
        workspace_id,
        backend,
        poll_interval: Duration::from_millis(interval_ms),
        since_secs,
        heartbeat_every: Duration::from_secs(heartbeat_secs),
        drain_timeout: Duration::from_secs(drain_secs),
        max_attempts,
        reply_to_replies: a.reply_to_replies,
        max_auto_replies: a.max_auto_replies.unwrap_or(20),
        concurrency,
        once: a.once,
        max_messages: a.max_messages,
        idle_exit: a.idle_exit_secs.map(Duration::from_secs),
        lock_wait: Duration::from_secs(a.lock_wait_secs.unwrap_or(0)),
        delegations_every: Duration::from_secs(delegations_secs),
        delegations_capacity,
        wake,
        safety_poll: Duration::from_secs(safety_poll_secs),
        rate_reserve_pct: u8::try_from(rate_reserve).unwrap_or(90),
        dry_run: a.dry_run,
        agent_card,
        broadcasts_every: Duration::from_secs(broadcasts_secs),
    })
}

/// The values a numeric setting may take. Its error names the range in the same
/// words for every flag: `must be between A and B`, `at most B`, `must be at least A`.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Range<T> {
    /// `A..=B`.
    Between(T, T),
    /// `..=B`.
    AtMost(T),
    /// `A..`.
    AtLeast(T),
}
use Range::{AtLeast, AtMost, Between};

impl<T: PartialOrd + Copy + fmt::Display> Range<T> {
    /// `value` if the range holds it, else the configuration error (exit 2)
    /// `{what}: {the range}{note}`, where `what` names the flag (and usually the value).
    pub(crate) fn check(
        self,
        what: impl fmt::Display,
        value: T,
        note: &str,
    ) -> Result<T, ConfigError> {
        let (ok, says) = match self {
            Between(lo, hi) => (
                lo <= value && value <= hi,
                format!("must be between {lo} and {hi}"),
            ),
            AtMost(hi) => (value <= hi, format!("at most {hi}")),
            AtLeast(lo) => (lo <= value, format!("must be at least {lo}")),
        };
        if ok {
            Ok(value)
        } else {
            Err(ConfigError(format!("{what}: {says}{note}")))
        }
    }
}

/// Process-wide `connect` settings: what the supervisor is told and where the
/// metrics go (one of each per process, however many workspaces it runs).
#[derive(Debug, Clone, Default)]
pub struct Supervision {
    /// systemd notify socket, watchdog and s6 notification fd.
    pub notify: crate::notify::NotifySettings,
    /// `--metrics-file`.
    pub metrics_file: Option<PathBuf>,
}

/// Resolves [`Supervision`] from `connect`'s options and `NOTIFY_SOCKET`,
/// `WATCHDOG_USEC`, `WATCHDOG_PID`.
pub fn supervision(
    a: &ConnectArgs,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Supervision, ConfigError> {
    let notify =
        crate::notify::NotifySettings::from_env(env, std::process::id(), a.notification_fd)
            .map_err(ConfigError)?;
    if let Some(path) = &a.metrics_file {
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        if path.file_name().is_none() || !dir.is_dir() {
            return Err(ConfigError(format!(
                "--metrics-file {}: its directory does not exist",
                path.display()
            )));
        }
    }
    Ok(Supervision {
        notify,
        metrics_file: a.metrics_file.clone(),
    })
}

/// Largest `--card-file` read.
const MAX_CARD_FILE: u64 = 256 * 1024;

/// `--card-file FILE`: a JSON object. A `url` is dropped: a poll-mode card has none,
/// and the platform would check it (and refuse a private address, §API-2.3).
pub fn read_card_file(path: &Path) -> Result<serde_json::Value, ConfigError> {
    let shown = path.display();
    let mut raw = Vec::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(MAX_CARD_FILE + 1).read_to_end(&mut raw))
        .map_err(|e| ConfigError(format!("--card-file {shown}: {e}")))?;
    if raw.len() as u64 > MAX_CARD_FILE {
        return Err(ConfigError(format!(
            "--card-file {shown}: larger than {MAX_CARD_FILE} bytes"
        )));
    }
    let mut card: serde_json::Value = serde_json::from_slice(&raw)
        .map_err(|e| ConfigError(format!("--card-file {shown}: not JSON: {e}")))?;
    let Some(obj) = card.as_object_mut() else {
        return Err(ConfigError(format!(
            "--card-file {shown}: the agent card must be a JSON object"
        )));
    };
    if obj.remove("url").is_some() {
        log::warn!("--card-file {shown}: its url is ignored (poll mode has none)");
    }
    Ok(card)
}

/// Largest `--workspaces` file read.
const MAX_WORKSPACES_FILE: u64 = 4 * 1024 * 1024;

/// Resolves `connect --workspaces FILE`: one `ConnectConfig` per entry of the JSON
/// list `[{"id", "token_file", "api_url"?, "backend"?, "backend_opts"?}]`; every
/// other option comes from the command line and applies to all.
pub fn workspaces_config(
    g: &GlobalArgs,
    a: &ConnectArgs,
    file: &Path,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Vec<ConnectConfig>, ConfigError> {
    let what = format!("--workspaces {}", file.display());
    if a.workspace.is_some() {
        return Err(ConfigError(format!(
            "{what}: give either a workspace id or --workspaces, not both"
        )));
    }
    if a.token.is_some() || g.token_file.is_some() {
        return Err(ConfigError(format!(
            "{what}: each workspace names its own token_file; drop --token/--token-file"
        )));
    }
    let meta = std::fs::metadata(file).map_err(|e| ConfigError(format!("{what}: {e}")))?;
    if meta.len() > MAX_WORKSPACES_FILE {
        return Err(ConfigError(format!("{what}: file too large")));
    }
    let raw = std::fs::read(file).map_err(|e| ConfigError(format!("{what}: {e}")))?;
    let entries: Vec<serde_json::Value> = serde_json::from_slice(&raw)
        .map_err(|e| ConfigError(format!("{what}: not a JSON list of workspaces: {e}")))?;
    if entries.is_empty() {
        return Err(ConfigError(format!("{what}: the list is empty")));
    }
    let mut seen = std::collections::HashSet::new();
    let mut out = Vec::with_capacity(entries.len());
    // The first entry whose backend options are bad, reported once every entry's
    // flags are known to be good.
    let mut bad_backend = None;
    for (i, e) in entries.iter().enumerate() {
        let at = format!("{what}: entry {i}");
        let field = |k: &str| -> Result<Option<String>, ConfigError> {
            match e.get(k) {
                None | Some(serde_json::Value::Null) => Ok(None),
                Some(serde_json::Value::String(s)) => Ok(Some(s.clone())),
                Some(_) => Err(ConfigError(format!("{at}: {k} must be a string"))),
            }
        };
        if !e.is_object() {
            return Err(ConfigError(format!("{at}: must be an object")));
        }
        let id = field("id")?.ok_or_else(|| ConfigError(format!("{at}: id is required")))?;
        let token_file = field("token_file")?
            .ok_or_else(|| ConfigError(format!("{at}: token_file is required")))?;
        if !seen.insert(id.trim().to_ascii_lowercase()) {
            return Err(ConfigError(format!("{at}: workspace {id} is listed twice")));
        }
        let mut ge = g.clone();
        ge.token_file = Some(PathBuf::from(token_file));
        if let Some(url) = field("api_url")? {
            ge.api_url = Some(url);
        }
        let mut ae = a.clone();
        ae.workspaces = None;
        ae.workspace = Some(id);
        if let Some(backend) = field("backend")? {
            // A different backend takes only its own options.
            ae.backend = Some(backend);
            ae.backend_opts.clear();
        }
        match e.get("backend_opts") {
            None | Some(serde_json::Value::Null) => {}
            Some(serde_json::Value::Object(m)) => {
                ae.backend_opts.clear();
                for (k, v) in m {
                    let v = match v {
                        serde_json::Value::String(s) => s.clone(),
                        other => other.to_string(),
                    };
                    ae.backend_opts.push(format!("{k}={v}"));
                }
            }
            Some(_) => {
                return Err(ConfigError(format!(
                    "{at}: backend_opts must be an object of KEY: VALUE"
                )));
            }
        }
        match resolve_connect(&ge, &ae, env) {
            Ok(cfg) => out.push(cfg),
            Err(Refused::Flags(err)) => return Err(ConfigError(format!("{at}: {err}"))),
            Err(Refused::Backend(id, err)) => {
                bad_backend.get_or_insert(ConfigError(format!("workspace {id}: {err}")));
            }
        }
    }
    match bad_backend {
        Some(err) => Err(err),
        None => Ok(out),
    }
}

/// URL, org, state dir and token, shared by every platform command.
pub fn common(
    g: &GlobalArgs,
    token_arg: Option<&str>,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Common, ConfigError> {
    let api_url = g
        .api_url
        .clone()
        .or_else(|| non_empty(env("MOLECULE_API_URL")))
        .ok_or_else(|| {
            ConfigError("no platform URL: pass --api-url or set MOLECULE_API_URL".into())
        })?;
    let api_url = validate_url(&api_url)?;
    let org_id = g
        .org_id
        .clone()
        .or_else(|| non_empty(env("MOLECULE_ORG_ID")));
    if let Some(org) = &org_id
        && !is_uuid(org)
    {
        return Err(ConfigError(format!("--org-id {org:?} is not a UUID")));
    }
    let state_dir = state_dir(g, env)?;
    let (token, token_source) = resolve_token(g, token_arg, env)?;
    let ca_roots = ca_roots(g, env)?;
    if is_plain_http(&api_url) && !is_loopback_url(&api_url) && !g.allow_insecure_http {
        return Err(ConfigError(format!(
            "refusing to send the workspace token over plain http to {api_url}: use https, or pass --allow-insecure-http for a trusted LAN platform"
        )));
    }
    Ok(Common {
        api_url,
        org_id,
        state_dir,
        token,
        token_source,
        ca_roots,
    })
}

/// Largest CA file read (a full system bundle is about 200 KB).
const MAX_CA_FILE: u64 = 4 * 1024 * 1024;

/// `--ca-file`, else `MOLECULE_CA_FILE`, else `SSL_CERT_FILE`: read and parsed at
/// start, so a bad file is exit 2 and not a TLS error on every request.
fn ca_roots(
    g: &GlobalArgs,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Option<crate::api::CaRoots>, ConfigError> {
    use std::io::Read;
    let (path, what) = match (
        &g.ca_file,
        non_empty(env("MOLECULE_CA_FILE")),
        non_empty(env("SSL_CERT_FILE")),
    ) {
        (Some(p), _, _) => (p.clone(), "--ca-file"),
        (None, Some(p), _) => (PathBuf::from(p), "MOLECULE_CA_FILE"),
        (None, None, Some(p)) => (PathBuf::from(p), "SSL_CERT_FILE"),
        (None, None, None) => return Ok(None),
    };
    let fail = |detail: String| ConfigError(format!("{what} {}: {detail}", path.display()));
    let meta = std::fs::metadata(&path).map_err(|e| fail(e.to_string()))?;
    if !meta.is_file() {
        return Err(fail("not a regular file".into()));
    }
    let mut pem = Vec::new();
    std::fs::File::open(&path)
        .and_then(|f| f.take(MAX_CA_FILE + 1).read_to_end(&mut pem))
        .map_err(|e| fail(e.to_string()))?;
    if pem.len() as u64 > MAX_CA_FILE {
        return Err(fail(format!("larger than {MAX_CA_FILE} bytes")));
    }
    let roots = crate::api::CaRoots::from_pem(&pem).map_err(fail)?;
    log::debug!(
        "{what}: {} CA certificate(s) from {}",
        roots.len(),
        path.display()
    );
    Ok(Some(roots))
}

fn resolve_token(
    g: &GlobalArgs,
    token_arg: Option<&str>,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<(Secret, TokenSource), ConfigError> {
    if g.token_file.is_some() && token_arg.is_some() {
        return Err(ConfigError(
            "give either --token-file or --token, not both".into(),
        ));
    }
    if let Some(path) = &g.token_file {
        return Ok((read_token_file(path)?, TokenSource::File(path.clone())));
    }
    if let Some(t) = token_arg {
        log::warn!(
            "--token is visible to other users in `ps`; prefer --token-file or MOLECULE_WORKSPACE_TOKEN"
        );
        return Ok((check_token(t, "--token")?, TokenSource::Arg));
    }
    if let Some(path) = non_empty(env("MOLECULE_WORKSPACE_TOKEN_FILE")) {
        let path = PathBuf::from(path);
        return Ok((read_token_file(&path)?, TokenSource::File(path)));
    }
    if let Some(t) = env("MOLECULE_WORKSPACE_TOKEN") {
        return Ok((
            check_token(&t, "MOLECULE_WORKSPACE_TOKEN")?,
            TokenSource::Env,
        ));
    }
    Err(ConfigError(
        "no workspace token: pass --token-file PATH or set MOLECULE_WORKSPACE_TOKEN".into(),
    ))
}

/// Settings for the agent-side commands (`send`, `peers`, ...): platform access plus
/// our own workspace id.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// URL, token, state dir.
    pub common: Common,
    /// Own workspace id.
    pub workspace_id: WorkspaceId,
}

/// Resolves an agent-side command's configuration: `--workspace` /
/// `MOLECULE_WORKSPACE_ID` (a UUID) and the common platform settings.
pub fn agent_config(
    g: &GlobalArgs,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<AgentConfig, ConfigError> {
    let workspace_id = workspace_id(g, env)?;
    let common = common(g, None, env)?;
    Ok(AgentConfig {
        common,
        workspace_id,
    })
}

/// Own workspace id from `--workspace` or `MOLECULE_WORKSPACE_ID`, trimmed and
/// checked to be a UUID.
pub fn workspace_id(
    g: &GlobalArgs,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<WorkspaceId, ConfigError> {
    let raw = g
        .workspace
        .clone()
        .or_else(|| non_empty(env("MOLECULE_WORKSPACE_ID")))
        .ok_or_else(|| {
            ConfigError("no workspace id: pass --workspace ID or set MOLECULE_WORKSPACE_ID".into())
        })?;
    WorkspaceId::parse(&raw).ok_or_else(|| {
        ConfigError(format!(
            "workspace id {:?} is not a UUID",
            raw.trim().to_ascii_lowercase()
        ))
    })
}

/// The state directory alone (flag, env, XDG, HOME), for commands that need no
/// platform access.
pub fn resolve_state_dir(
    g: &GlobalArgs,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<PathBuf, ConfigError> {
    state_dir(g, env)
}

/// `--backend-opt KEY=VALUE` pairs as a map (later keys win), for `doctor`.
pub fn backend_opts(pairs: &[String]) -> Result<BTreeMap<String, String>, ConfigError> {
    let mut opts = BTreeMap::new();
    for kv in pairs {
        let (k, v) = kv
            .split_once('=')
            .filter(|(k, _)| !k.trim().is_empty())
            .ok_or_else(|| ConfigError(format!("--backend-opt: {kv:?} is not KEY=VALUE")))?;
        opts.insert(k.trim().to_string(), v.to_string());
    }
    Ok(opts)
}

/// Longest token file read: a token is 43 characters; a few KB leaves room for
/// comments-free files with odd line endings and nothing more.
const MAX_TOKEN_FILE: u64 = 4096;

/// Reads and checks a token file (whitespace around the token is ignored; a UTF-8
/// byte-order mark, as some editors write, is stripped with a note). Only a regular
/// file (or a symlink to one, as Kubernetes mounts Secrets) is read, and at most a
/// few KB of it: `/dev/zero` or a FIFO must not hang or fill memory.
pub fn read_token_file(path: &Path) -> Result<Secret, ConfigError> {
    use std::io::Read;
    use std::os::unix::fs::PermissionsExt;
    let what = format!("token file {}", path.display());
    let fail = |detail: String| ConfigError(format!("{what}: {detail}"));
    // Checked before opening: opening a FIFO would block until a writer comes.
    let meta = std::fs::metadata(path).map_err(|e| fail(e.to_string()))?;
    if !meta.is_file() {
        return Err(fail("not a regular file".into()));
    }
    let file = std::fs::File::open(path).map_err(|e| fail(e.to_string()))?;
    let meta = file.metadata().map_err(|e| fail(e.to_string()))?;
    if !meta.is_file() {
        return Err(fail("not a regular file".into()));
    }
    let mut raw = Vec::new();
    file.take(MAX_TOKEN_FILE + 1)
        .read_to_end(&mut raw)
        .map_err(|e| fail(e.to_string()))?;
    if raw.len() as u64 > MAX_TOKEN_FILE {
        return Err(fail(format!(
            "larger than {MAX_TOKEN_FILE} bytes: too large to be a token"
        )));
    }
    if meta.permissions().mode() & 0o044 != 0 {
        log::warn!("{what} is readable by group or others; chmod 600 it");
    }
    let raw = match raw.strip_prefix(b"\xef\xbb\xbf") {
        Some(rest) => {
            log::info!("{what}: ignoring the UTF-8 byte-order mark at its start");
            rest.to_vec()
        }
        None => raw,
    };
    let text = String::from_utf8(raw).map_err(|_| fail("not UTF-8 text".into()))?;
    check_token(&text, &what)
}

fn check_token(raw: &str, what: &str) -> Result<Secret, ConfigError> {
    let t = raw.trim();
    if t.is_empty() {
        return Err(ConfigError(format!("{what}: the token is empty")));
    }
    // A token goes into a header: printable ASCII only, nothing the HTTP library
    // would reject later (which would look like a network error and be retried).
    if let Some((i, c)) = t.chars().enumerate().find(|(_, c)| !c.is_ascii_graphic()) {
        let kind = if c.is_whitespace() {
            "a space"
        } else if c.is_control() {
            "a control character"
        } else {
            "a non-ASCII character"
        };
        return Err(ConfigError(format!(
            "{what}: the token contains {kind} (U+{:04X}) at character {}; a token is printable ASCII",
            u32::from(c),
            i + 1
        )));
    }
    Ok(Secret::new(t))
}

fn state_dir(g: &GlobalArgs, env: &dyn Fn(&str) -> Option<String>) -> Result<PathBuf, ConfigError> {
    if let Some(d) = &g.state_dir {
        return Ok(d.clone());
    }
    if let Some(d) = non_empty(env("MOLECULE_STATE_DIR")) {
        return Ok(PathBuf::from(d));
    }
    if let Some(x) = non_empty(env("XDG_CONFIG_HOME")) {
        return Ok(PathBuf::from(x).join("molecule").join("state"));
    }
    if let Some(h) = non_empty(env("HOME")) {
        return Ok(PathBuf::from(h)
            .join(".config")
            .join("molecule")
            .join("state"));
    }
    Err(ConfigError(
        "no state directory: pass --state-dir or set MOLECULE_STATE_DIR (HOME is not set)".into(),
    ))
}

fn validate_url(raw: &str) -> Result<String, ConfigError> {
    let url = raw.trim().trim_end_matches('/');
    let Some((scheme, rest)) = url.split_once("://") else {
        return Err(ConfigError(format!(
            "platform URL {raw:?} must start with https:// or http://"
        )));
    };
    if !matches!(scheme, "http" | "https") {
        return Err(ConfigError(format!(
            "platform URL {raw:?}: scheme must be https or http"
        )));
    }
    let authority = rest.split('/').next().unwrap_or("");
    if authority.is_empty() || authority.contains('@') {
        return Err(ConfigError(format!(
            "platform URL {raw:?}: needs a host (and no user:password@)"
        )));
    }
    if url.contains(['?', '#', ' ']) || url.chars().any(char::is_control) {
        return Err(ConfigError(format!(
            "platform URL {raw:?}: no query, fragment or spaces allowed"
        )));
    }
    // The port, if any, follows the last ':' outside an IPv6 literal's brackets.
    let after_host = authority.rsplit_once(']').map_or(authority, |(_, p)| p);
    if let Some((_, port)) = after_host.rsplit_once(':')
        && port.parse::<u16>().ok().filter(|p| *p > 0).is_none()
    {
        return Err(ConfigError(format!(
            "platform URL {raw:?}: port {port:?} is not a port number (1 to 65535)"
        )));
    }
    Ok(url.to_string())
}

fn is_plain_http(url: &str) -> bool {
    url.starts_with("http://")
}

/// Loopback hosts: `localhost`, 127.0.0.0/8, `[::1]`.
fn is_loopback_url(url: &str) -> bool {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let authority = rest.split('/').next().unwrap_or("");
    let host = if let Some(v6) = authority.strip_prefix('[') {
        v6.split(']').next().unwrap_or("")
    } else {
        authority.rsplit_once(':').map_or(authority, |(h, _)| h)
    };
    if host.eq_ignore_ascii_case("localhost") || host == "::1" {
        return true;
    }
    host.parse::<std::net::Ipv4Addr>()
        .is_ok_and(|ip| ip.is_loopback())
}

fn non_empty(v: Option<String>) -> Option<String> {
    v.filter(|s| !s.trim().is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    const WS: &str = "11111111-2222-4333-8444-555555555555";

    fn env_of(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let m: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| m.get(k).cloned()
    }

    fn connect(args: &[&str], env: &[(&str, &str)]) -> Result<ConnectConfig, ConfigError> {
        let a = crate::cli::parse(std::iter::once("molecule").chain(args.iter().copied())).unwrap();
        let crate::cli::Command::Connect(c) = a.command else {
            panic!()
        };
        connect_config(&a.global, &c, &env_of(env))
    }

    #[test]
    fn defaults_and_env() {
        let c = connect(
            &["connect", WS],
            &[
                ("MOLECULE_API_URL", "https://x.example/"),
                ("MOLECULE_WORKSPACE_TOKEN", " tok "),
                ("HOME", "/home/u"),
            ],
        )
        .unwrap();
        assert_eq!(c.common.api_url, "https://x.example");
        assert_eq!(c.common.token.expose(), "tok");
        assert_eq!(c.common.token_source, TokenSource::Env);
        assert_eq!(
            c.common.state_dir,
            PathBuf::from("/home/u/.config/molecule/state")
        );
        assert_eq!(c.poll_interval, Duration::from_secs(1));
        assert_eq!(c.since_secs, 30);
        assert_eq!(c.backend.name(), "claude-code");
        assert_eq!(format!("{:?}", c.common.token), "***");
    }

    #[test]
    fn xdg_and_flag_precedence() {
        let env = [
            ("MOLECULE_API_URL", "https://env.example"),
            ("MOLECULE_WORKSPACE_TOKEN", "t"),
            ("XDG_CONFIG_HOME", "/xdg"),
            ("HOME", "/home/u"),
        ];
        let c = connect(&["connect", WS], &env).unwrap();
        assert_eq!(c.common.state_dir, PathBuf::from("/xdg/molecule/state"));
        let c = connect(
            &[
                "connect",
                WS,
                "--api-url",
                "https://flag.example",
                "--state-dir",
                "/s",
            ],
            &env,
        )
        .unwrap();
        assert_eq!(c.common.api_url, "https://flag.example");
        assert_eq!(c.common.state_dir, PathBuf::from("/s"));
    }

    #[test]
    fn rejects_bad_input() {
        let env = [
            ("MOLECULE_API_URL", "https://x"),
            ("MOLECULE_WORKSPACE_TOKEN", "t"),
            ("HOME", "/h"),
        ];
        assert!(
            connect(&["connect", "not-a-uuid"], &env)
                .unwrap_err()
                .0
                .contains("not a UUID")
        );
        assert!(
            connect(&["connect"], &env)
                .unwrap_err()
                .0
                .contains("workspace id is required")
        );
        assert!(
            connect(&["connect", WS, "--mode", "push"], &env)
                .unwrap_err()
                .0
                .contains("not supported")
        );
        assert!(connect(&["connect", WS, "--backend-opt", "novalue"], &env).is_err());
        assert!(connect(&["connect", WS, "--interval-ms", "0"], &env).is_err());
        assert!(connect(&["connect", WS, "--api-url", "ftp://x"], &env).is_err());
        assert!(
            connect(
                &["connect", WS],
                &[("MOLECULE_API_URL", "https://x"), ("HOME", "/h")]
            )
            .unwrap_err()
            .0
            .contains("no workspace token")
        );
        assert!(
            connect(
                &["connect", WS],
                &[("MOLECULE_WORKSPACE_TOKEN", "t"), ("HOME", "/h")]
            )
            .unwrap_err()
            .0
            .contains("no platform URL")
        );
        let bad_tok = [
            ("MOLECULE_API_URL", "https://x"),
            ("MOLECULE_WORKSPACE_TOKEN", "a b"),
            ("HOME", "/h"),
        ];
        assert!(connect(&["connect", WS], &bad_tok).is_err());
    }

    #[test]
    fn delegation_tracker_flags() {
        let env = [
            ("MOLECULE_API_URL", "https://x"),
            ("MOLECULE_WORKSPACE_TOKEN", "t"),
            ("HOME", "/h"),
        ];
        let c = connect(&["connect", WS], &env).unwrap();
        assert_eq!(c.delegations_every, Duration::from_secs(30));
        assert_eq!(c.delegations_capacity, 1024);
        let c = connect(
            &[
                "connect",
                WS,
                "--delegations-secs",
                "0",
                "--delegations-capacity",
                "64",
            ],
            &env,
        )
        .unwrap();
        assert!(c.delegations_every.is_zero(), "0 turns the tracker off");
        assert_eq!(c.delegations_capacity, 64);
        for bad in [
            &["--delegations-capacity", "63"][..],
            &["--delegations-capacity", "0"],
            &["--delegations-secs", "86401"],
        ] {
            let args: Vec<&str> = ["connect", WS].iter().chain(bad).copied().collect();
            assert!(connect(&args, &env).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn wake_flags() {
        let env = [
            ("MOLECULE_API_URL", "https://x"),
            ("MOLECULE_WORKSPACE_TOKEN", "t"),
            ("HOME", "/h"),
        ];
        let c = connect(&["connect", WS], &env).unwrap();
        assert_eq!(c.wake, WakeMode::Auto);
        assert_eq!(c.safety_poll, Duration::from_secs(30));
        assert_eq!(c.rate_reserve_pct, 30);
        let args = ["connect", WS, "--wake", "poll", "--safety-poll-secs", "5"];
        let c = connect(&args, &env).unwrap();
        assert_eq!(
            (c.wake, c.safety_poll),
            (WakeMode::Poll, Duration::from_secs(5))
        );
        let c = connect(&["connect", WS, "--wake", "events"], &env).unwrap();
        assert_eq!(c.wake.as_str(), "events");
        for bad in [
            &["--wake", "push"][..],
            &["--safety-poll-secs", "0"],
            &["--safety-poll-secs", "3601"],
            &["--rate-reserve", "91"],
        ] {
            let args: Vec<&str> = ["connect", WS].iter().chain(bad).copied().collect();
            let e = connect(&args, &env).unwrap_err();
            assert!(e.0.contains(bad[0]), "{e}");
        }
    }

    #[test]
    fn insecure_http_only_for_loopback_unless_allowed() {
        let tok = ("MOLECULE_WORKSPACE_TOKEN", "t");
        let home = ("HOME", "/h");
        for ok in [
            "http://127.0.0.1:8080",
            "http://localhost:1",
            "http://[::1]:9",
        ] {
            assert!(
                connect(&["connect", WS], &[("MOLECULE_API_URL", ok), tok, home]).is_ok(),
                "{ok}"
            );
        }
        let lan = [("MOLECULE_API_URL", "http://192.168.1.5:8080"), tok, home];
        let e = connect(&["connect", WS], &lan).unwrap_err();
        assert!(e.0.contains("--allow-insecure-http"), "{e}");
        assert!(!e.0.contains('t') || !e.0.contains("Bearer"));
        assert!(connect(&["connect", WS, "--allow-insecure-http"], &lan).is_ok());
        assert!(
            connect(
                &["connect", WS],
                &[("MOLECULE_API_URL", "http://localhost.evil.com"), tok, home]
            )
            .is_err()
        );
    }

    #[test]
    fn agent_config_needs_a_uuid_workspace() {
        let env = [
            ("MOLECULE_API_URL", "https://x"),
            ("MOLECULE_WORKSPACE_TOKEN", "t"),
            ("HOME", "/h"),
        ];
        let g = GlobalArgs::default();
        let e = agent_config(&g, &env_of(&env)).unwrap_err();
        assert!(e.0.contains("MOLECULE_WORKSPACE_ID"), "{e}");
        let mut with_ws = env.to_vec();
        with_ws.push((
            "MOLECULE_WORKSPACE_ID",
            " 11111111-2222-4333-8444-555555555555 ",
        ));
        let c = agent_config(&g, &env_of(&with_ws)).unwrap();
        assert_eq!(c.workspace_id, WS);
        let g = GlobalArgs {
            workspace: Some("nope".into()),
            ..GlobalArgs::default()
        };
        assert!(
            agent_config(&g, &env_of(&with_ws))
                .unwrap_err()
                .0
                .contains("not a UUID")
        );
        assert_eq!(
            resolve_state_dir(&GlobalArgs::default(), &env_of(&env)).unwrap(),
            PathBuf::from("/h/.config/molecule/state")
        );
        assert!(backend_opts(&["cmd=cat".into(), "x".into()]).is_err());
        assert_eq!(backend_opts(&["cmd=a=b".into()]).unwrap()["cmd"], "a=b");
    }

    #[test]
    fn ranges_say_their_shape() {
        assert_eq!(Between(1, 64).check("--x 9", 9, "").unwrap(), 9);
        assert_eq!(AtMost(5).check("--x", 5, "").unwrap(), 5);
        assert_eq!(AtLeast(1).check("--x", u64::MAX, "").unwrap(), u64::MAX);
        let e = Between(1, 64).check("--concurrency 0", 0, "").unwrap_err();
        assert_eq!(e.0, "--concurrency 0: must be between 1 and 64");
        let e = AtMost(86_400)
            .check("--lock-wait", 86_401, " seconds")
            .unwrap_err();
        assert_eq!(e.0, "--lock-wait: at most 86400 seconds");
        let e = AtLeast(1).check("--idle-exit 0", 0, " second").unwrap_err();
        assert_eq!(e.0, "--idle-exit 0: must be at least 1 second");
    }

    #[test]
    fn ports_are_checked() {
        for bad in [
            "https://h:70000",
            "https://h:0",
            "http://[::1]:99999/x",
            "https://h:x",
        ] {
            let e = validate_url(bad).unwrap_err();
            assert!(e.0.contains("not a port number"), "{bad}: {e}");
        }
        for good in [
            "https://h:443",
            "http://[::1]:8080/x",
            "https://h",
            "http://[::1]",
        ] {
            assert!(validate_url(good).is_ok(), "{good}");
        }
    }

    #[test]
    fn token_files_are_read_carefully() {
        let dir = std::env::temp_dir().join(format!("molecule-cfg-{}", crate::uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("tok");
        // Editors' byte-order mark is stripped.
        std::fs::write(&f, b"\xef\xbb\xbfsecret-token\r\n").unwrap();
        assert_eq!(read_token_file(&f).unwrap().expose(), "secret-token");
        // Not a regular file, or far too large: refused without reading it whole.
        let e = read_token_file(Path::new("/dev/zero")).unwrap_err();
        assert!(e.0.contains("not a regular file"), "{e}");
        let e = read_token_file(&dir).unwrap_err();
        assert!(e.0.contains("not a regular file"), "{e}");
        std::fs::write(&f, vec![b'a'; 5000]).unwrap();
        assert!(read_token_file(&f).unwrap_err().0.contains("too large"));
        // Anything but printable ASCII is named.
        for (bad, kind) in [
            ("tok\u{e9}n", "non-ASCII character (U+00E9) at character 4"),
            ("to\u{7}k", "control character (U+0007)"),
            ("to k", "a space"),
        ] {
            std::fs::write(&f, bad).unwrap();
            let e = read_token_file(&f).unwrap_err();
            assert!(e.0.contains(kind), "{bad:?}: {e}");
            assert!(!e.0.contains(bad), "the token itself is never printed: {e}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn backend_options_are_checked_after_the_flags() {
        let env = [
            ("MOLECULE_API_URL", "https://x"),
            ("MOLECULE_WORKSPACE_TOKEN", "t"),
            ("HOME", "/h"),
        ];
        let c = connect(&["connect", WS, "--backend", "mock"], &env).unwrap();
        assert_eq!(c.backend.name(), "mock");
        let e = connect(&["connect", WS, "--backend", "exec"], &env).unwrap_err();
        assert!(
            e.0.starts_with("backend config: exec: missing option"),
            "{e}"
        );
        let e = connect(&["connect", WS, "--backend-opt", "x=1"], &env).unwrap_err();
        assert!(e.0.contains("claude-code: unknown option \"x\""), "{e}");
        // A bad flag is reported first, as when the backend was built at start.
        let e = connect(
            &["connect", WS, "--backend", "exec", "--concurrency", "0"],
            &env,
        )
        .unwrap_err();
        assert!(e.0.contains("--concurrency 0"), "{e}");

        let dir = std::env::temp_dir().join(format!("molecule-cfg-{}", crate::uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let tok = dir.join("tok");
        std::fs::write(&tok, "t\n").unwrap();
        let list = dir.join("ws.json");
        let other = "22222222-2222-4222-8222-222222222222";
        let entry = |id: &str, backend: &str| serde_json::json!({"id": id, "token_file": tok, "backend": backend});
        let workspaces = |entries: serde_json::Value| {
            std::fs::write(&list, entries.to_string()).unwrap();
            let a = crate::cli::parse(["molecule", "connect", "--workspaces", "x"]).unwrap();
            let crate::cli::Command::Connect(c) = a.command else {
                panic!()
            };
            workspaces_config(&a.global, &c, &list, &env_of(&[env[0], env[2]]))
        };
        let e =
            workspaces(serde_json::json!([entry(WS, "exec"), entry(other, "nope")])).unwrap_err();
        assert_eq!(
            e.0,
            format!(
                "workspace {WS}: backend config: exec: missing option \"cmd\" (e.g. --backend-opt cmd='./agent.sh')"
            )
        );
        let e =
            workspaces(serde_json::json!([entry(WS, "exec"), {"id": "bad", "token_file": tok}]))
                .unwrap_err();
        assert!(e.0.contains("entry 1: connect: workspace id"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_worker_backend_sets_the_default_concurrency() {
        let env = [
            ("MOLECULE_API_URL", "https://x"),
            ("MOLECULE_WORKSPACE_TOKEN", "t"),
            ("HOME", "/h"),
        ];
        let worker = |more: &[&str]| {
            let mut args = vec!["connect", WS, "--backend", "worker"];
            args.extend(["--backend-opt", "cmd=cat"]);
            args.extend(more);
            connect(&args, &env).unwrap().concurrency
        };
        assert_eq!(worker(&[]), 1);
        assert_eq!(worker(&["--backend-opt", "workers=3"]), 3);
        assert_eq!(worker(&["--backend-opt", "max_in_flight=4"]), 4);
        let both = [
            "--backend-opt",
            "workers=2",
            "--backend-opt",
            "max_in_flight=3",
        ];
        assert_eq!(worker(&both), 6);
        let many = [
            "--backend-opt",
            "workers=100",
            "--backend-opt",
            "max_in_flight=100",
        ];
        assert_eq!(worker(&many), 64);
        // --concurrency given wins, and is the default number of workers.
        assert_eq!(
            worker(&["--backend-opt", "max_in_flight=4", "--concurrency", "2"]),
            2
        );
        assert_eq!(worker(&["--concurrency", "5"]), 5);
        let c = connect(&["connect", WS, "--backend", "mock"], &env).unwrap();
        assert_eq!(c.concurrency, 1);
    }

    #[test]
    fn token_file() {
        let dir = std::env::temp_dir().join(format!("molecule-cfg-{}", crate::uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("tok");
        std::fs::write(&f, "secret-token\n").unwrap();
        let env = [("MOLECULE_API_URL", "https://x"), ("HOME", "/h")];
        let c = connect(&["connect", WS, "--token-file", f.to_str().unwrap()], &env).unwrap();
        assert_eq!(c.common.token.expose(), "secret-token");
        assert_eq!(c.common.token_source, TokenSource::File(f.clone()));
        std::fs::write(&f, "  \n").unwrap();
        assert!(connect(&["connect", WS, "--token-file", f.to_str().unwrap()], &env).is_err());
        let missing = dir.join("missing");
        let e = connect(
            &["connect", WS, "--token-file", missing.to_str().unwrap()],
            &env,
        )
        .unwrap_err();
        assert!(e.0.contains("missing"), "{e}");
        assert!(
            connect(
                &[
                    "connect",
                    WS,
                    "--token-file",
                    f.to_str().unwrap(),
                    "--token",
                    "x"
                ],
                &env
            )
            .is_err()
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
