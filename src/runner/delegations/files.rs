//! The tracker's two files: `<id>.delegations.jsonl` (one line per result, the
//! record the agent reads) and `<id>.delegations.state.json` (delivered ids and
//! pending results, so delivery is exactly once across restarts).

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::state::{StateError, write_atomic};

/// Larger state files are refused rather than read.
const MAX_STATE_BYTES: u64 = 16 * 1024 * 1024;
/// Bytes at the end of the JSONL file searched for a line that may already be there.
const TAIL_BYTES: u64 = 256 * 1024;

/// `<dir>/<workspace-id>.delegations.jsonl`.
pub fn log_path(dir: &Path, workspace_id: &str) -> PathBuf {
    dir.join(format!("{workspace_id}.delegations.jsonl"))
}

/// `<dir>/<workspace-id>.delegations.state.json`.
pub fn state_path(dir: &Path, workspace_id: &str) -> PathBuf {
    dir.join(format!("{workspace_id}.delegations.state.json"))
}

/// One terminal delegation, as logged and handed to the backend.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DelegationResult {
    /// The delegation id (a UUID).
    pub delegation_id: String,
    /// The workspace that did the work.
    #[serde(default)]
    pub target_id: String,
    /// `completed` or `failed`.
    pub status: String,
    /// The platform's summary (the task as sent).
    #[serde(default)]
    pub summary: String,
    /// The start of the answer (≤ 300 bytes on the platform).
    #[serde(default)]
    pub response_preview: String,
    /// Why it failed.
    #[serde(default)]
    pub error: String,
    /// The platform's `updated_at` (or `created_at`), as sent.
    #[serde(default)]
    pub updated_at: Option<String>,
}

impl DelegationResult {
    /// The backend's input: a short neutral description, then the preview or error.
    pub fn request_text(&self) -> String {
        let target = if self.target_id.is_empty() {
            "(unknown)"
        } else {
            &self.target_id
        };
        let mut text = format!(
            "Delegation {} to workspace {target} {}.",
            self.delegation_id, self.status
        );
        if !self.response_preview.is_empty() {
            text.push_str("\n\nResult preview:\n");
            text.push_str(&self.response_preview);
        }
        if !self.error.is_empty() {
            text.push_str("\n\nError:\n");
            text.push_str(&self.error);
        }
        text
    }

    /// The JSONL line (and the `format=json` request body), at `time` (Unix seconds).
    pub fn to_record(&self, time: u64) -> Value {
        json!({
            "delegation_id": self.delegation_id,
            "target_id": self.target_id,
            "status": self.status,
            "summary": self.summary,
            "response_preview": self.response_preview,
            "error": self.error,
            "updated_at": self.updated_at,
            "time": time,
        })
    }
}

/// How far the JSONL line of a pending result got.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(super) enum Logged {
    /// Not written.
    No,
    /// About to be written, or written just before a crash: check the file first.
    Intent,
    /// Written.
    Yes,
}

#[derive(Debug, Serialize, Deserialize)]
pub(super) struct SavedPending {
    pub(super) result: DelegationResult,
    pub(super) logged: Logged,
    #[serde(default)]
    pub(super) failures: u32,
    #[serde(default)]
    pub(super) retry_later: u32,
}

/// The state file.
#[derive(Debug, Serialize, Deserialize)]
pub(super) struct Saved {
    pub(super) workspace_id: String,
    /// Delivered ids, oldest first.
    #[serde(default)]
    pub(super) delivered: Vec<String>,
    #[serde(default)]
    pub(super) pending: Vec<SavedPending>,
}

/// The start-up error for a tracker state that cannot be read. A corrupt file is a
/// configuration matter (exit 2) with its own advice: starting afresh is safe only
/// if delivering a listed result a second time is.
pub fn open_error(e: StateError) -> crate::error::Error {
    match e {
        StateError::Corrupt { path, detail } => {
            crate::error::Error::Config(crate::config::ConfigError(format!(
                "delegation state file {} is corrupt ({detail}); move it aside to start again (results the platform still lists are then delivered again)",
                path.display()
            )))
        }
        other => other.into(),
    }
}

pub(super) fn read_saved(path: &Path, workspace_id: &str) -> Result<Option<Saved>, StateError> {
    let corrupt = |detail: String| StateError::Corrupt {
        path: path.to_path_buf(),
        detail,
    };
    let raw = match std::fs::metadata(path) {
        Ok(m) if m.len() > MAX_STATE_BYTES => {
            return Err(corrupt(format!("{} bytes is too large", m.len())));
        }
        Ok(_) => std::fs::read(path),
        Err(e) => Err(e),
    };
    let raw = match raw {
        Ok(r) => r,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(StateError::Io {
                path: path.to_path_buf(),
                source,
            });
        }
    };
    let saved: Saved = serde_json::from_slice(&raw).map_err(|e| corrupt(e.to_string()))?;
    if !saved.workspace_id.eq_ignore_ascii_case(workspace_id) {
        return Err(corrupt(format!(
            "it belongs to workspace {:?}",
            saved.workspace_id
        )));
    }
    Ok(Some(saved))
}

/// Writes the state file atomically (0600).
pub(super) fn write_saved(path: &Path, saved: &Saved) -> Result<(), StateError> {
    let io_err = |source| StateError::Io {
        path: path.to_path_buf(),
        source,
    };
    let bytes = serde_json::to_vec_pretty(saved).map_err(|e| io_err(io::Error::other(e)))?;
    write_atomic(path, &bytes).map_err(io_err)
}

/// Does the tail of the JSONL file hold a line for `id`? Only the tail: a line that
/// may be there was written by the last delivery attempt, just before a crash.
pub(super) fn already_logged(path: &Path, id: &str) -> io::Result<bool> {
    let mut f = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e),
    };
    let len = f.metadata()?.len();
    f.seek(SeekFrom::Start(len.saturating_sub(TAIL_BYTES)))?;
    let mut buf = Vec::new();
    f.take(TAIL_BYTES).read_to_end(&mut buf)?;
    Ok(buf.split(|b| *b == b'\n').any(|line| {
        serde_json::from_slice::<Value>(line)
            .ok()
            .and_then(|v| {
                v.get("delegation_id")
                    .and_then(Value::as_str)
                    .map(|d| d.eq_ignore_ascii_case(id))
            })
            .unwrap_or(false)
    }))
}

pub(super) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
