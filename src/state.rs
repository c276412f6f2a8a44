//! The per-workspace state file: cursor and handled-message ledger, loaded at start
//! and saved atomically (temp file in the same directory, fsync, rename, fsync of the
//! directory; file 0600, directory 0700). Same path and core fields as the Go CLI
//! (`<state-dir>/<workspace-id>.json` with `workspace_id`, `last_since_id`), so users
//! can switch. Also the single-instance lock. No network.

use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::lru::Lru;

/// How many handled ids the ledger remembers.
pub const LEDGER_CAPACITY: usize = 2048;
/// Larger state files are refused rather than read into memory.
const MAX_STATE_BYTES: u64 = 16 * 1024 * 1024;

/// What went wrong with the state file or lock.
#[derive(Debug)]
pub enum StateError {
    /// Reading, writing or locking failed.
    Io {
        /// The file involved.
        path: PathBuf,
        /// What failed.
        source: io::Error,
    },
    /// The file exists but is not ours to trust.
    Corrupt {
        /// The file.
        path: PathBuf,
        /// Why.
        detail: String,
    },
    /// Another connector holds the workspace's lock.
    Locked {
        /// The lock file.
        path: PathBuf,
    },
}

impl fmt::Display for StateError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StateError::Io { path, source } => write!(f, "state file {}: {source}", path.display()),
            StateError::Corrupt { path, detail } => write!(
                f,
                "state file {} is corrupt ({detail}); move it aside to start again from the --since-secs window",
                path.display()
            ),
            StateError::Locked { path } => write!(
                f,
                "another connector is already running for this workspace (lock held on {})",
                path.display()
            ),
        }
    }
}

impl std::error::Error for StateError {}

/// The JSON on disk. Unknown fields from other tools are tolerated.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct StateFile {
    /// The workspace this state belongs to.
    pub workspace_id: String,
    /// Id of the newest handled activity row (the cursor); empty = cold start.
    #[serde(default)]
    pub last_since_id: String,
    /// Highest handled `seq`, for acks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_seq: Option<i64>,
    /// Recently handled keys, oldest first (activity ids and message ids).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub handled: Vec<String>,
}

/// The loaded state: cursor plus an LRU of handled keys.
#[derive(Debug, Clone)]
pub struct State {
    path: PathBuf,
    /// Workspace id.
    pub workspace_id: String,
    /// Cursor; `None` = cold start.
    pub cursor: Option<String>,
    /// Highest handled `seq`.
    pub last_seq: Option<i64>,
    handled: Lru<String, ()>,
}

/// `<dir>/<workspace-id>.json`.
pub fn state_path(dir: &Path, workspace_id: &str) -> PathBuf {
    dir.join(format!("{workspace_id}.json"))
}

impl State {
    /// Loads the state for `workspace_id` from `dir`, or a fresh one if there is no
    /// file. A file that does not parse, or belongs to another workspace, is an error.
    pub fn load(dir: &Path, workspace_id: &str) -> Result<State, StateError> {
        let path = state_path(dir, workspace_id);
        let mut state = State {
            path: path.clone(),
            workspace_id: workspace_id.to_string(),
            cursor: None,
            last_seq: None,
            handled: Lru::new(LEDGER_CAPACITY),
        };
        let meta = match fs::metadata(&path) {
            Ok(m) => m,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(state),
            Err(source) => return Err(StateError::Io { path, source }),
        };
        if meta.len() > MAX_STATE_BYTES {
            return Err(StateError::Corrupt {
                path,
                detail: format!("{} bytes is too large", meta.len()),
            });
        }
        let raw = fs::read(&path).map_err(|source| StateError::Io {
            path: path.clone(),
            source,
        })?;
        let file: StateFile = serde_json::from_slice(&raw).map_err(|e| StateError::Corrupt {
            path: path.clone(),
            detail: e.to_string(),
        })?;
        if file.workspace_id != workspace_id {
            return Err(StateError::Corrupt {
                path,
                detail: format!("it belongs to workspace {:?}", file.workspace_id),
            });
        }
        if !file.last_since_id.is_empty() && !crate::uuid::is_uuid(&file.last_since_id) {
            return Err(StateError::Corrupt {
                path,
                detail: format!("cursor {:?} is not a UUID", file.last_since_id),
            });
        }
        state.cursor = Some(file.last_since_id).filter(|c| !c.is_empty());
        state.last_seq = file.last_seq;
        for key in file.handled {
            state.handled.insert(key, ());
        }
        Ok(state)
    }

    /// The file this state saves to.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Has `key` been handled recently?
    pub fn is_handled(&self, key: &str) -> bool {
        self.handled.contains(&key.to_string())
    }

    /// Records `key` as handled (in memory; [`State::save`] persists).
    pub fn mark_handled(&mut self, key: String) {
        self.handled.insert(key, ());
    }

    /// Number of keys in the ledger.
    pub fn handled_len(&self) -> usize {
        self.handled.len()
    }

    /// Writes the state atomically.
    pub fn save(&self) -> Result<(), StateError> {
        let file = StateFile {
            workspace_id: self.workspace_id.clone(),
            last_since_id: self.cursor.clone().unwrap_or_default(),
            last_seq: self.last_seq,
            handled: self.handled.keys_oldest_first().cloned().collect(),
        };
        let bytes = serde_json::to_vec_pretty(&file).map_err(|e| StateError::Io {
            path: self.path.clone(),
            source: io::Error::other(e),
        })?;
        write_atomic(&self.path, &bytes).map_err(|source| StateError::Io {
            path: self.path.clone(),
            source,
        })
    }
}

/// Creates `dir` (and parents) with mode 0700 if missing.
pub fn ensure_dir(dir: &Path) -> Result<(), StateError> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|source| StateError::Io {
            path: dir.to_path_buf(),
            source,
        })
}

/// Temp file in the same directory, fsync, rename over `path`, fsync the directory:
/// a crash leaves either the old or the new file, never half of one.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "state".into());
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        fs::rename(&tmp, path)?;
        // The rename is durable only once the directory entry is.
        File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// An exclusive lock on `<dir>/<workspace-id>.lock`, held while the value lives.
#[derive(Debug)]
pub struct InstanceLock {
    _file: File,
    path: PathBuf,
}

impl InstanceLock {
    /// Takes the lock or fails at once with [`StateError::Locked`].
    pub fn acquire(dir: &Path, workspace_id: &str) -> Result<InstanceLock, StateError> {
        let path = dir.join(format!("{workspace_id}.lock"));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)
            .map_err(|source| StateError::Io {
                path: path.clone(),
                source,
            })?;
        match file.try_lock() {
            Ok(()) => Ok(InstanceLock { _file: file, path }),
            Err(fs::TryLockError::WouldBlock) => Err(StateError::Locked { path }),
            Err(fs::TryLockError::Error(source)) => Err(StateError::Io { path, source }),
        }
    }

    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    const WS: &str = "11111111-2222-4333-8444-555555555555";
    const ROW: &str = "aaaaaaaa-2222-4333-8444-555555555555";

    fn tmpdir() -> PathBuf {
        let d = std::env::temp_dir().join(format!("molecule-state-{}", crate::uuid::new_v4()));
        ensure_dir(&d).unwrap();
        d
    }

    #[test]
    fn missing_file_is_fresh() {
        let d = tmpdir();
        let s = State::load(&d, WS).unwrap();
        assert!(s.cursor.is_none());
        assert_eq!(s.handled_len(), 0);
    }

    #[test]
    fn round_trip_with_modes() {
        let d = tmpdir().join("nested");
        ensure_dir(&d).unwrap();
        assert_eq!(
            fs::metadata(&d).unwrap().permissions().mode() & 0o777,
            0o700
        );
        let mut s = State::load(&d, WS).unwrap();
        s.cursor = Some(ROW.into());
        s.last_seq = Some(42);
        s.mark_handled("a:1".into());
        s.mark_handled("m:2".into());
        s.save().unwrap();
        let mode = fs::metadata(s.path()).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let back = State::load(&d, WS).unwrap();
        assert_eq!(back.cursor.as_deref(), Some(ROW));
        assert_eq!(back.last_seq, Some(42));
        assert!(back.is_handled("a:1") && back.is_handled("m:2"));
        // Go-CLI compatible field names.
        let v: serde_json::Value = serde_json::from_slice(&fs::read(s.path()).unwrap()).unwrap();
        assert_eq!(v["workspace_id"], WS);
        assert_eq!(v["last_since_id"], ROW);
        // No temp files left behind.
        let names: Vec<_> = fs::read_dir(&d)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 1, "{names:?}");
    }

    #[test]
    fn reads_go_cli_file() {
        let d = tmpdir();
        fs::write(
            state_path(&d, WS),
            format!(r#"{{"workspace_id":"{WS}","last_since_id":"{ROW}"}}"#),
        )
        .unwrap();
        assert_eq!(State::load(&d, WS).unwrap().cursor.as_deref(), Some(ROW));
    }

    #[test]
    fn corrupt_files_are_errors() {
        let d = tmpdir();
        for bad in [
            "{not json".to_string(),
            r#"{"workspace_id":"other","last_since_id":""}"#.to_string(),
            format!(r#"{{"workspace_id":"{WS}","last_since_id":"act-1"}}"#),
            String::new(),
        ] {
            fs::write(state_path(&d, WS), &bad).unwrap();
            let e = State::load(&d, WS).unwrap_err();
            assert!(matches!(e, StateError::Corrupt { .. }), "{bad}: {e}");
            assert!(e.to_string().contains("corrupt"));
        }
    }

    #[test]
    fn ledger_is_bounded() {
        let d = tmpdir();
        let mut s = State::load(&d, WS).unwrap();
        for i in 0..(LEDGER_CAPACITY + 10) {
            s.mark_handled(format!("a:{i}"));
        }
        assert_eq!(s.handled_len(), LEDGER_CAPACITY);
        assert!(!s.is_handled("a:0"));
        s.save().unwrap();
        let back = State::load(&d, WS).unwrap();
        assert!(back.is_handled(&format!("a:{}", LEDGER_CAPACITY + 9)));
        assert_eq!(back.handled_len(), LEDGER_CAPACITY);
    }

    #[test]
    fn lock_is_exclusive() {
        let d = tmpdir();
        let first = InstanceLock::acquire(&d, WS).unwrap();
        let e = InstanceLock::acquire(&d, WS).unwrap_err();
        assert!(matches!(e, StateError::Locked { .. }));
        assert!(e.to_string().contains(".lock"));
        drop(first);
        InstanceLock::acquire(&d, WS).unwrap();
    }
}
