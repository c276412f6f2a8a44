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
use crate::status_file::{IDLE_EVERY, RunState, StatusFile, status_path};

pub(super) fn run(
    g: &GlobalArgs,
    env: &dyn Fn(&str) -> Option<String>,
    stale_after: Option<u64>,
    prometheus: bool,
) -> Result<Report, Failure> {
    let ws = config::workspace_id(g, env)?;
    let dir = config::resolve_state_dir(g, env)?;
    let status_path = status_path(&dir, &ws);
    let saved = state::read_state_file(&state::state_path(&dir, &ws), &ws)?;
    let saved_cursor = saved
        .as_ref()
        .map(|s| s.last_since_id.clone())
        .filter(|c| !c.is_empty());
    let Some(file) = StatusFile::read(&status_path).map_err(Failure::runtime)? else {
        return Err(Failure::new(Error::Runtime(format!(
            "status: no status file at {}: molecule connect is not running for workspace {ws} \
             with this state dir (or never ran; check --state-dir / MOLECULE_STATE_DIR)",
            status_path.display()
        )))
        .with("status_file", status_path.display().to_string())
        .with("saved_cursor", saved_cursor));
    };

    let health = Health::judge(&file, unix_now(), stale_after);
    let doc = file.to_json();
    // The same rendering as `connect --metrics-file`, from the same document.
    let human = if prometheus {
        crate::metrics::render(&[crate::metrics::Sample {
            doc: &doc,
            up: health.problem.is_none(),
        }])
    } else {
        table(&rows(&ws, &file, &health, saved_cursor.as_deref()))
    };
    let mut out = doc;
    if let Some(m) = out.as_object_mut() {
        m.insert("ok".into(), Value::Bool(health.problem.is_none()));
        m.insert("stale".into(), Value::Bool(health.problem.is_some()));
        m.insert("stale_after_secs".into(), json!(health.limit));
        m.insert("last_poll_age_secs".into(), json!(health.poll_age));
        m.insert("process_alive".into(), json!(health.alive));
        m.insert("saved_cursor".into(), json!(saved_cursor));
        m.insert(
            "status_file".into(),
            json!(status_path.display().to_string()),
        );
    }
    match health.problem {
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

/// What the status file says about the connector, judged at `now`.
struct Health {
    now: u64,
    /// Staleness limit for the last poll, seconds.
    limit: u64,
    poll_age: Option<u64>,
    /// The connector's process still exists.
    alive: bool,
    /// A bounded run (--once, --max-messages, --idle-exit) that finished cleanly.
    finished: bool,
    /// Why it is not healthy; `None`: healthy.
    problem: Option<String>,
}

impl Health {
    fn judge(file: &StatusFile, now: u64, stale_after: Option<u64>) -> Health {
        let interval_ms = file.poll_interval_ms.unwrap_or(1000);
        // Three poll intervals (at least 3 s), plus the time the connector may take to
        // refresh the file while idle.
        let limit = stale_after
            .unwrap_or_else(|| (3 * interval_ms).div_ceil(1000).max(3) + IDLE_EVERY.as_secs());
        let poll_age = file.last_poll_ok.map(|t| now.saturating_sub(t));
        let running = file.state == RunState::Running;
        // A finished bounded run is healthy as long as its last poll is recent: cron
        // runs it again.
        let finished =
            file.state == RunState::Stopped && file.stop_reason.as_deref() == Some("finished");
        let alive = file.pid != 0 && process_alive(u64::from(file.pid));
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
                file.stop_reason.as_deref().unwrap_or("no reason recorded")
            ))
        } else if !alive {
            Some("the connector's process is gone (killed or crashed)".to_string())
        } else if let Some(e) = &file.state_error {
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
        Health {
            now,
            limit,
            poll_age,
            alive,
            finished,
            problem,
        }
    }
}

/// The text table.
fn rows(ws: &str, f: &StatusFile, h: &Health, saved_cursor: Option<&str>) -> Vec<Vec<String>> {
    let ago = |t: Option<u64>| {
        t.map_or("never".to_string(), |t| {
            format!("{} s ago", h.now.saturating_sub(t))
        })
    };
    let row = |k: &str, v: String| vec![k.to_string(), v];
    let mut rows = vec![
        row("workspace:", ws.to_string()),
        row(
            "state:",
            match &h.problem {
                None if h.finished => "finished a bounded run (cron)".to_string(),
                None => "running".to_string(),
                Some(p) => format!("STALE: {p}"),
            },
        ),
        row("last poll:", ago(f.last_poll_ok)),
        row("last heartbeat:", ago(f.last_heartbeat_ok)),
        row(
            "cursor:",
            f.cursor
                .as_deref()
                .or(saved_cursor)
                .unwrap_or("none (cold start)")
                .to_string(),
        ),
        row(
            "messages:",
            format!(
                "{} handled, {} failed, {} dead-lettered, {} in flight",
                f.handled, f.failed, f.dead_lettered, f.in_flight
            ),
        ),
        row("wedged:", if f.wedged { "yes" } else { "no" }.to_string()),
    ];
    if let Some(w) = &f.wake {
        let how = match w.events_connected_since {
            Some(t) => format!(
                "events (stream connected {} s ago, {} events seen)",
                h.now.saturating_sub(t),
                w.events_seen
            ),
            None => format!("polling: {}", w.polling_because.as_deref().unwrap_or("")),
        };
        rows.push(row("wake:", format!("{how}; --wake {}", w.mode)));
    }
    if let Some(r) = f.rate_budget.as_ref().filter(|r| !r.limit.is_null()) {
        let n = |v: Option<u64>| v.map_or("?".to_string(), |n| n.to_string());
        let limit = match &r.limit {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        rows.push(row(
            "rate budget:",
            format!(
                "limit {limit}, remaining {}, reset in {} s (as last seen); {} waited, {} x 429",
                n(r.remaining),
                n(r.reset_secs),
                r.waited,
                r.rate_limited
            ),
        ));
    }
    if let Some(seq) = f.last_acked_seq {
        rows.push(row("acked seq:", seq.to_string()));
    }
    if !f.last_error.is_empty() {
        rows.push(row("last error:", f.last_error.clone()));
    }
    rows
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
