//! The status file `<state-dir>/<id>.status.json`: one type, written by the
//! connector (`runner/report.rs`) and read back by `molecule status`, the metrics
//! file and the connector itself when it records a stop. Every field is optional on
//! reading, so a file from an older connector still reads.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// How often the connector rewrites the file when nothing but the times changed;
/// `molecule status` adds this to its staleness limit.
pub const IDLE_EVERY: Duration = Duration::from_secs(5);

/// Status files larger than this are not a status file.
const MAX_BYTES: u64 = 1024 * 1024;

/// `<dir>/<workspace-id>.status.json`.
pub fn status_path(dir: &Path, workspace_id: &str) -> PathBuf {
    dir.join(format!("{workspace_id}.status.json"))
}

/// Whether the connector was running when it last wrote the file.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RunState {
    /// Polling.
    Running,
    /// Stopped; `stop_reason` says why (`finished` for a clean bounded run).
    #[default]
    Stopped,
}

/// The whole document. Times are Unix seconds.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct StatusFile {
    pub workspace_id: String,
    /// 0: not recorded.
    pub pid: u32,
    pub state: RunState,
    pub stop_reason: Option<String>,
    pub started_at: Option<u64>,
    pub updated_at: Option<u64>,
    /// The blind-poll period in force: `molecule status` judges staleness by it.
    pub poll_interval_ms: Option<u64>,
    pub last_poll_ok: Option<u64>,
    pub last_heartbeat_ok: Option<u64>,
    pub cursor: Option<String>,
    pub handled: u64,
    pub failed: u64,
    pub dead_lettered: u64,
    pub in_flight: u64,
    pub active_tasks: u32,
    /// Empty: none.
    pub last_error: String,
    pub wedged: bool,
    pub state_error: Option<String>,
    pub last_acked_seq: Option<i64>,
    /// The counters `molecule_*` metrics are rendered from (see `metrics.rs`).
    pub metrics: Value,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peer_cache: Option<PeerCacheReport>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub delegations: Option<DelegationCounts>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub wake: Option<WakeReport>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rate_budget: Option<RateReport>,
}

/// The peer cache's size.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct PeerCacheReport {
    pub size: usize,
    pub capacity: usize,
    pub high_water: usize,
    pub in_flight: usize,
}

/// The delegation tracker's counters.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct DelegationCounts {
    pub pending: u64,
    pub delivered: u64,
    pub logged: u64,
    pub foreign_skipped: u64,
    pub given_up: u64,
}

/// How new messages are noticed: the event stream, or polling and why.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct WakeReport {
    /// `--wake`.
    pub mode: String,
    pub events_connected_since: Option<u64>,
    pub polling_because: Option<String>,
    pub events_seen: u64,
    pub stream_losses: u64,
}

/// The rate budget as last seen.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct RateReport {
    /// A number, `"unlimited"`, or null while no limit is known.
    pub limit: Value,
    pub remaining: Option<u64>,
    pub reset_secs: Option<u64>,
    pub reserve_pct: u64,
    pub workspaces: u64,
    pub waited: u64,
    pub rate_limited: u64,
}

impl StatusFile {
    /// The document as JSON (keys sorted, as it has always been written).
    pub fn to_json(&self) -> Value {
        serde_json::to_value(self).unwrap_or(Value::Null)
    }

    /// Reads the file at `path`; `None` if there is none.
    pub fn read(path: &Path) -> Result<Option<StatusFile>, String> {
        let meta = match fs::metadata(path) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(format!("status file {}: {e}", path.display())),
        };
        if meta.len() > MAX_BYTES {
            return Err(format!("status file {}: too large", path.display()));
        }
        let raw = fs::read(path).map_err(|e| format!("status file {}: {e}", path.display()))?;
        serde_json::from_slice(&raw)
            .map(Some)
            .map_err(|e| format!("status file {}: not JSON: {e}", path.display()))
    }

    /// Rewrites the file at `path` atomically. Advisory, so not fsynced.
    pub fn write(&self, path: &Path) -> std::io::Result<()> {
        let bytes = format!("{:#}\n", self.to_json());
        crate::state::write_file(path, bytes.as_bytes(), false)
            // On a full disk a new file cannot be made, but the old one's blocks can
            // be overwritten, so `molecule status` still learns why intake stopped.
            .or_else(|_| crate::state::overwrite_in_place(path, bytes.as_bytes()))
    }
}

/// Unix seconds.
pub fn unix(t: Option<SystemTime>) -> Option<u64> {
    t.and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map(|d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn written_and_read_back_alike() {
        let dir = std::env::temp_dir().join(format!("molecule-status-{}", crate::uuid::new_v4()));
        fs::create_dir_all(&dir).unwrap();
        let path = status_path(&dir, "w");
        let doc = StatusFile {
            workspace_id: "w".into(),
            pid: 7,
            state: RunState::Running,
            cursor: Some("c".into()),
            wake: Some(WakeReport {
                mode: "auto".into(),
                ..WakeReport::default()
            }),
            ..StatusFile::default()
        };
        doc.write(&path).unwrap();
        assert_eq!(StatusFile::read(&path).unwrap(), Some(doc));
        let raw: Value = serde_json::from_slice(&fs::read(&path).unwrap()).unwrap();
        assert_eq!(raw["state"], "running");
        assert!(raw["stop_reason"].is_null());
        assert!(raw.get("rate_budget").is_none());
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn missing_fields_read_as_unknown() {
        let doc: StatusFile = serde_json::from_str(r#"{"state":"running","pid":3}"#).unwrap();
        assert_eq!(doc.state, RunState::Running);
        assert_eq!(doc.last_poll_ok, None);
        assert_eq!(doc.poll_interval_ms, None);
    }
}
