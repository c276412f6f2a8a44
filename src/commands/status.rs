//! `molecule status`: is the connector for this workspace alive and working? Reads
//! the status file the connector rewrites on change and every few seconds
//! (`<state-dir>/<id>.status.json`) and the saved cursor from the state file. A
//! health check: exit 0 only when the connector runs and polled recently. No network.
//! `--format prometheus` prints the same document as metrics.

use std::fs;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};

use super::{Failure, Report, table};
use crate::cli::GlobalArgs;
use crate::config;
use crate::error::Error;
use crate::state;

/// Status files larger than this are not a status file.
const MAX_STATUS_BYTES: u64 = 1024 * 1024;

pub(super) fn run(
    g: &GlobalArgs,
    env: &dyn Fn(&str) -> Option<String>,
    stale_after: Option<u64>,
    prometheus: bool,
) -> Result<Report, Failure> {
    let ws = config::workspace_id(g, env)?;
    let dir = config::resolve_state_dir(g, env)?;
    let status_path = crate::runner::status_path(&dir, &ws);
    let saved = state::read_state_file(&state::state_path(&dir, &ws), &ws)?;
    let saved_cursor = saved
        .as_ref()
        .map(|s| s.last_since_id.clone())
        .filter(|c| !c.is_empty());
    let Some(doc) = read_status(&status_path)? else {
        return Err(Failure::new(Error::Runtime(format!(
            "status: no status file at {}: molecule connect is not running for workspace {ws} \
             with this state dir (or never ran; check --state-dir / MOLECULE_STATE_DIR)",
            status_path.display()
        )))
        .with("status_file", status_path.display().to_string())
        .with("saved_cursor", saved_cursor));
    };

    let now = unix_now();
    let num = |k: &str| doc.get(k).and_then(Value::as_u64);
    let interval_ms = num("poll_interval_ms").unwrap_or(1000);
    // Three poll intervals (at least 3 s), plus the time the connector may take to
    // refresh the file while idle.
    let limit = stale_after.unwrap_or_else(|| {
        (3 * interval_ms).div_ceil(1000).max(3) + crate::runner::STATUS_IDLE_REFRESH.as_secs()
    });
    let last_poll = num("last_poll_ok");
    let poll_age = last_poll.map(|t| now.saturating_sub(t));
    let running = doc.get("state").and_then(Value::as_str) == Some("running");
    // A bounded run (--once, --max-messages, --idle-exit) that finished cleanly is
    // healthy as long as its last poll is recent: cron runs it again.
    let finished = doc.get("state").and_then(Value::as_str) == Some("stopped")
        && doc.get("stop_reason").and_then(Value::as_str) == Some("finished");
    let alive = num("pid").is_some_and(process_alive);
    let problem = if finished {
        match poll_age {
            Some(age) if age <= limit => None,
            Some(age) => Some(format!(
                "last run finished; its last successful poll was {age} s ago (limit {limit} s)"
            )),
            None => Some("the last run finished without a successful poll".to_string()),
        }
    } else if !running {
        Some(format!(
            "the connector stopped ({})",
            doc.get("stop_reason")
                .and_then(Value::as_str)
                .unwrap_or("no reason recorded")
        ))
    } else if !alive {
        Some("the connector's process is gone (killed or crashed)".to_string())
    } else if let Some(e) = doc.get("state_error").and_then(Value::as_str) {
        Some(format!(
            "state cannot be written ({e}); intake is paused until it can"
        ))
    } else {
        match poll_age {
            None => Some("the connector has not completed a poll yet".to_string()),
            Some(age) if age > limit => Some(format!(
                "last successful poll was {age} s ago (limit {limit} s)"
            )),
            Some(_) => None,
        }
    };

    let ago = |k: &str| {
        num(k).map_or("never".to_string(), |t| {
            format!("{} s ago", now.saturating_sub(t))
        })
    };
    let text = |k: &str| doc.get(k).and_then(Value::as_str).unwrap_or("").to_string();
    let mut rows = vec![
        vec!["workspace:".to_string(), ws.clone()],
        vec![
            "state:".to_string(),
            match &problem {
                None if finished => "finished a bounded run (cron)".to_string(),
                None => "running".to_string(),
                Some(p) => format!("STALE: {p}"),
            },
        ],
        vec!["last poll:".to_string(), ago("last_poll_ok")],
        vec!["last heartbeat:".to_string(), ago("last_heartbeat_ok")],
        vec![
            "cursor:".to_string(),
            doc.get("cursor")
                .and_then(Value::as_str)
                .map(str::to_string)
                .or(saved_cursor.clone())
                .unwrap_or_else(|| "none (cold start)".to_string()),
        ],
        vec![
            "messages:".to_string(),
            format!(
                "{} handled, {} failed, {} dead-lettered, {} in flight",
                num("handled").unwrap_or(0),
                num("failed").unwrap_or(0),
                num("dead_lettered").unwrap_or(0),
                num("in_flight").unwrap_or(0)
            ),
        ],
        vec![
            "wedged:".to_string(),
            if doc.get("wedged").and_then(Value::as_bool) == Some(true) {
                "yes"
            } else {
                "no"
            }
            .to_string(),
        ],
    ];
    if let Some(w) = doc.get("wake").filter(|w| w.is_object()) {
        let wtext = |k: &str| w.get(k).and_then(Value::as_str).unwrap_or("");
        let how = match w.get("events_connected_since").and_then(Value::as_u64) {
            Some(t) => format!(
                "events (stream connected {} s ago, {} events seen)",
                now.saturating_sub(t),
                w.get("events_seen").and_then(Value::as_u64).unwrap_or(0)
            ),
            None => format!("polling: {}", wtext("polling_because")),
        };
        rows.push(vec![
            "wake:".to_string(),
            format!("{how}; --wake {}", wtext("mode")),
        ]);
    }
    if let Some(r) = doc
        .get("rate_budget")
        .filter(|r| r.get("limit").is_some_and(|l| !l.is_null()))
    {
        let n = |k: &str| {
            r.get(k).map_or("?".to_string(), |v| match v {
                Value::String(s) => s.clone(),
                Value::Null => "?".to_string(),
                other => other.to_string(),
            })
        };
        rows.push(vec![
            "rate budget:".to_string(),
            format!(
                "limit {}, remaining {}, reset in {} s (as last seen); {} waited, {} x 429",
                n("limit"),
                n("remaining"),
                n("reset_secs"),
                n("waited"),
                n("rate_limited")
            ),
        ]);
    }
    if let Some(seq) = doc.get("last_acked_seq").and_then(Value::as_i64) {
        rows.push(vec!["acked seq:".to_string(), seq.to_string()]);
    }
    let last_error = text("last_error");
    if !last_error.is_empty() {
        rows.push(vec!["last error:".to_string(), last_error]);
    }
    // The same rendering as `connect --metrics-file`, from the same document.
    let human = if prometheus {
        crate::metrics::render(&[crate::metrics::Sample {
            doc: &doc,
            up: problem.is_none(),
        }])
    } else {
        table(&rows)
    };
    let mut out = doc.clone();
    if let Some(m) = out.as_object_mut() {
        m.insert("ok".into(), Value::Bool(problem.is_none()));
        m.insert("stale".into(), Value::Bool(problem.is_some()));
        m.insert("stale_after_secs".into(), json!(limit));
        m.insert("last_poll_age_secs".into(), json!(poll_age));
        m.insert("process_alive".into(), json!(alive));
        m.insert("saved_cursor".into(), json!(saved_cursor));
        m.insert(
            "status_file".into(),
            json!(status_path.display().to_string()),
        );
    }
    match problem {
        None => Ok(Report { json: out, human }),
        Some(p) => {
            let mut f = Failure::new(Error::Runtime(format!("status: workspace {ws}: {p}")));
            if let Value::Object(m) = out {
                for (k, v) in m {
                    f = f.with(&k, v);
                }
            }
            f.human = Some(human);
            Err(f)
        }
    }
}

/// The status file as JSON; `None` if there is none.
fn read_status(path: &Path) -> Result<Option<Value>, Failure> {
    let meta = match fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(Failure::runtime(format!(
                "status file {}: {e}",
                path.display()
            )));
        }
    };
    if meta.len() > MAX_STATUS_BYTES {
        return Err(Failure::runtime(format!(
            "status file {}: too large",
            path.display()
        )));
    }
    let raw = fs::read(path)
        .map_err(|e| Failure::runtime(format!("status file {}: {e}", path.display())))?;
    serde_json::from_slice(&raw)
        .map(Some)
        .map_err(|e| Failure::runtime(format!("status file {}: not JSON: {e}", path.display())))
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Is there a process with this pid? (`/proc`, so Linux only; elsewhere assume yes.)
fn process_alive(pid: u64) -> bool {
    let proc = Path::new("/proc");
    if !proc.is_dir() {
        return true;
    }
    match fs::read_to_string(proc.join(pid.to_string()).join("stat")) {
        // A zombie (state Z) has exited already.
        Ok(stat) => stat
            .rsplit_once(')')
            .is_none_or(|(_, rest)| !rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}
