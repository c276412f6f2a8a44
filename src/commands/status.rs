//! `molecule status`: what the connector last saved for this workspace, read from
//! `<state-dir>/<id>.json` (and its journal, when there is one). No network. There is
//! no live status file yet (last poll, heartbeat, counters): the output says so
//! rather than inventing numbers.

use std::fs;
use std::io::{self, Read};
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};

use super::{Failure, Report, table};
use crate::cli::GlobalArgs;
use crate::config;
use crate::error::Error;
use crate::state::{self, StateError, StateFile};

/// The honest answer for everything the state file does not hold.
pub const NO_LIVE_STATUS: &str =
    "no live status file (connector status reporting comes with the operations work)";
/// State files larger than this are refused rather than read.
const MAX_STATE_BYTES: u64 = 16 * 1024 * 1024;

pub(super) fn run(g: &GlobalArgs, env: &dyn Fn(&str) -> Option<String>) -> Result<Report, Failure> {
    let ws = config::workspace_id(g, env)?;
    let dir = config::resolve_state_dir(g, env)?;
    let path = state::state_path(&dir, &ws);
    let (file, extra, saved) = match read(&path, &ws)? {
        Some(found) => found,
        None => {
            return Err(Failure::new(Error::Runtime(format!(
                "status: no state file at {}: molecule connect has not saved state for workspace \
                 {ws} in this state dir (check --state-dir / MOLECULE_STATE_DIR)",
                path.display()
            )))
            .with("state_file", path.display().to_string()));
        }
    };
    let now = SystemTime::now();
    let age = |t: SystemTime| now.duration_since(t).unwrap_or(Duration::ZERO).as_secs();
    let unix = |t: SystemTime| t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let cursor = Some(file.last_since_id.clone()).filter(|c| !c.is_empty());
    let pending = extra
        .get("pending")
        .and_then(Value::as_object)
        .map_or(0, |m| m.len());
    let journal_path = dir.join(format!("{ws}.journal"));
    let journal = journal_info(&journal_path);

    let mut rows = vec![
        vec!["workspace:".to_string(), ws.clone()],
        vec!["state file:".to_string(), path.display().to_string()],
        vec![
            "saved:".to_string(),
            saved.map_or("unknown".to_string(), |t| format!("{} s ago", age(t))),
        ],
        vec![
            "cursor:".to_string(),
            cursor.clone().unwrap_or_else(|| {
                "none (cold start: the connector begins with its --since-secs window)".to_string()
            }),
        ],
        vec![
            "last seq:".to_string(),
            file.last_seq.map_or("none".to_string(), |s| s.to_string()),
        ],
        vec![
            "handled:".to_string(),
            format!("{} recent message id(s) in the ledger", file.handled.len()),
        ],
    ];
    if pending > 0 {
        rows.push(vec![
            "pending:".to_string(),
            format!("{pending} reply(ies) produced but not yet confirmed posted"),
        ]);
    }
    if let Some((lines, modified)) = journal {
        rows.push(vec![
            "journal:".to_string(),
            format!(
                "{lines} change(s) since the last save{}",
                modified.map_or(String::new(), |t| format!(
                    ", last written {} s ago",
                    age(t)
                ))
            ),
        ]);
    }
    rows.push(vec!["live status:".to_string(), NO_LIVE_STATUS.to_string()]);
    Ok(Report {
        json: json!({
            "ok": true,
            "workspace_id": ws,
            "state_file": path.display().to_string(),
            "saved_at_unix": saved.map(unix),
            "saved_secs_ago": saved.map(age),
            "cursor": cursor,
            "last_seq": file.last_seq,
            "handled": file.handled.len(),
            "pending_replies": pending,
            "journal_records": journal.map(|(n, _)| n),
            "live_status": Value::Null,
            "note": NO_LIVE_STATUS,
        }),
        human: table(&rows),
    })
}

type Found = (StateFile, Value, Option<SystemTime>);

/// The state file parsed the way the connector parses it, plus the raw JSON (for
/// fields newer than `StateFile`) and its modification time; `None` if absent.
fn read(path: &Path, ws: &str) -> Result<Option<Found>, Failure> {
    let io_err = |source: io::Error| StateError::Io {
        path: path.to_path_buf(),
        source,
    };
    let corrupt = |detail: String| StateError::Corrupt {
        path: path.to_path_buf(),
        detail,
    };
    let meta = match fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err(e).into()),
    };
    if meta.len() > MAX_STATE_BYTES {
        return Err(corrupt(format!("{} bytes is too large", meta.len())).into());
    }
    let raw = fs::read(path).map_err(io_err)?;
    let file: StateFile = serde_json::from_slice(&raw).map_err(|e| corrupt(e.to_string()))?;
    if file.workspace_id != ws {
        return Err(corrupt(format!("it belongs to workspace {:?}", file.workspace_id)).into());
    }
    let value: Value = serde_json::from_slice(&raw).unwrap_or(Value::Null);
    Ok(Some((file, value, meta.modified().ok())))
}

/// Line count and modification time of the connector's journal, if it has one.
fn journal_info(path: &Path) -> Option<(usize, Option<SystemTime>)> {
    let f = fs::File::open(path).ok()?;
    let modified = f.metadata().ok().and_then(|m| m.modified().ok());
    let mut buf = Vec::new();
    f.take(MAX_STATE_BYTES).read_to_end(&mut buf).ok()?;
    let lines = buf.iter().filter(|b| **b == b'\n').count();
    Some((lines, modified))
}
