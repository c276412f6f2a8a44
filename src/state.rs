//! The per-workspace state: cursor, handled-message ledger and pending replies. The
//! state file is saved atomically (temp file in the same directory, fsync, rename,
//! fsync of the directory; file 0600, directory 0700) with the Go CLI's path and core
//! fields (`<state-dir>/<workspace-id>.json` with `workspace_id`, `last_since_id`), so
//! users can switch; between checkpoints changes go to an append-only journal (a
//! saved reply fsynced before it is posted). Also the single-instance lock. No network.
//!
//! What a power cut leaves of the journal, and how replay reads it: a `reply` line is
//! fsynced before its post starts, and so is the `done` line of a row without a saved
//! reply (its only durable record); the `done` line of a row whose reply was saved is
//! not (losing it re-posts the saved reply under the same `messageId`). An fsync
//! covers every line before it, so the journal is a durable prefix ending at the last
//! fsynced line, then a tail of unsynced lines that a power cut may leave missing,
//! zero-filled or cut at any byte. Hence a damaged line (not a record, or zero bytes,
//! which we never write) followed only by more damage or by `done` lines of rows with
//! a saved reply is a torn tail: replay drops the damage with a warning, applies the
//! whole `done` lines after it (a whole line is what was written; one that is lost
//! only re-posts a saved reply) and checkpoints, which empties the journal. A damaged line followed by a line of an
//! fsynced kind lies inside the durable prefix: that is corruption, start-up stops
//! (exit 2) and the journal is left as it was for the operator. That reading needs
//! every line of an fsynced kind to be written only once the ones before it are on
//! disk: a saved reply is written first and fsynced a little later by its poster
//! ([`Store::record_reply_unsynced`], so the worker's next run need not wait for the
//! disk), and the next line of an fsynced kind fsyncs it first if the poster has not.
//! Such a reply line is marked `unsynced`: it is no line of an fsynced kind, so in a
//! torn tail it is kept like an unsynced `done`, and several may wait for their
//! posts at once, the first poster's fsync covering them all (group commit).
//!
//! After a busy stretch the checkpoint leaves the emptied journal zero-filled ahead
//! of the writes (see [`PREALLOC_MAX`]): an fsync of a line written into blocks that
//! exist, without changing the file's size, writes that data only, not the inode too
//! (measured on a backlog: 0.4 inode writes per message instead of 1). Records are
//! written at their offset, so the journal then ends in zero bytes that were never
//! written: zeros running from the last newline to the end of the file are that
//! unused room, not damage. (Zeros there can also be an unsynced line the power cut
//! lost, which is what a torn tail may lose anyway.)

use std::collections::{BTreeMap, VecDeque};
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader, Read, Seek, Write};
use std::os::unix::fs::{DirBuilderExt, FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::lru::Lru;

/// How many handled ids the ledger remembers.
pub const LEDGER_CAPACITY: usize = 2048;
/// Finished canvas replies remembered for the echo lookup after a restart: those of
/// the last [`CANVAS_POSTS_FOR_US`], at most this many.
const CANVAS_POSTS: usize = 1024;
/// A lookup's window starts a few seconds before the saved reply's post, and a post
/// whose answer was lost may have its echo a minute late: older posts can only reach
/// it through a chain of identical replies, and then the window is given up.
const CANVAS_POSTS_FOR_US: i64 = 300_000_000;
/// Journal lines before a checkpoint is forced.
const JOURNAL_MAX_LINES: u32 = 1024;
/// A moved cursor is checkpointed at most this late.
const CHECKPOINT_EVERY: Duration = Duration::from_millis(500);
/// Larger state files are refused rather than read into memory.
const MAX_STATE_BYTES: u64 = 16 * 1024 * 1024;
/// Longest journal line read back; a reply that large never fits a state file anyway.
const MAX_RECORD_BYTES: u64 = MAX_STATE_BYTES;
/// Most bytes of zeros a checkpoint writes ahead into the emptied journal: about what
/// [`JOURNAL_MAX_LINES`] short lines take. The room given is twice what the journal
/// held at that checkpoint (a steady stream then stays inside it), so the zeros cost
/// at most twice the writing of the lines before them, and only while busy.
const PREALLOC_MAX: u64 = 256 * 1024;
/// A journal that held less than this at its checkpoint gets no room ahead: with
/// messages that rare, the inode write of each fsync costs nothing worth the zeros.
const PREALLOC_MIN: u64 = 16 * 1024;
/// Zeros written per call when preallocating.
const ZEROS: [u8; 16 * 1024] = [0; 16 * 1024];
/// A journal line buffer up to this size is kept for the next record.
const LINE_KEEP: usize = 64 * 1024;

/// `O_NOFOLLOW` for Linux (std has no constant and the libc crate is not allowed):
/// opening a symlink fails with `ELOOP` instead of following it. The value differs
/// by architecture (asm-generic vs arm/powerpc).
#[cfg(all(
    target_os = "linux",
    any(
        target_arch = "arm",
        target_arch = "aarch64",
        target_arch = "powerpc",
        target_arch = "powerpc64"
    )
))]
const O_NOFOLLOW: i32 = 0o100000;
#[cfg(all(
    target_os = "linux",
    not(any(
        target_arch = "arm",
        target_arch = "aarch64",
        target_arch = "powerpc",
        target_arch = "powerpc64"
    ))
))]
const O_NOFOLLOW: i32 = 0o400000;
#[cfg(not(target_os = "linux"))]
const O_NOFOLLOW: i32 = 0x100; // macOS and the BSDs

/// `OpenOptions` for a file in the state dir: 0600 when created, and never through a
/// symlink (someone who can write the directory could plant one, §issue 11).
fn state_file_options() -> OpenOptions {
    let mut o = OpenOptions::new();
    o.mode(0o600).custom_flags(O_NOFOLLOW);
    o
}

/// Opens `path` for reading without following a symlink.
pub fn open_read_nofollow(path: &Path) -> io::Result<File> {
    state_file_options().read(true).open(path)
}

/// Opens an existing `path` for writing without following a symlink (no create, no
/// truncation).
pub fn open_write_nofollow(path: &Path) -> io::Result<File> {
    state_file_options().write(true).open(path)
}

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
    /// The state directory cannot be used (not a directory, not writable, or not
    /// safe: owned by someone else or writable by group/others).
    Unusable {
        /// The directory.
        path: PathBuf,
        /// What is wrong and how to fix it.
        detail: String,
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
            StateError::Unusable { path, detail } => {
                write!(f, "state dir {}: {detail}", path.display())
            }
        }
    }
}

impl std::error::Error for StateError {}

// By hand because `io::Error` is neither `Clone` nor `PartialEq`: a copy keeps its
// kind and its text, which is all anyone reads of it.
impl Clone for StateError {
    fn clone(&self) -> Self {
        match self {
            StateError::Io { path, source } => StateError::Io {
                path: path.clone(),
                source: io::Error::new(source.kind(), source.to_string()),
            },
            StateError::Corrupt { path, detail } => StateError::Corrupt {
                path: path.clone(),
                detail: detail.clone(),
            },
            StateError::Locked { path } => StateError::Locked { path: path.clone() },
            StateError::Unusable { path, detail } => StateError::Unusable {
                path: path.clone(),
                detail: detail.clone(),
            },
        }
    }
}

impl PartialEq for StateError {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (StateError::Io { path, source }, StateError::Io { path: p, source: s }) => {
                path == p && source.kind() == s.kind() && source.to_string() == s.to_string()
            }
            (StateError::Corrupt { path, detail }, StateError::Corrupt { path: p, detail: d })
            | (
                StateError::Unusable { path, detail },
                StateError::Unusable { path: p, detail: d },
            ) => path == p && detail == d,
            (StateError::Locked { path }, StateError::Locked { path: p }) => path == p,
            _ => false,
        }
    }
}

impl Eq for StateError {}

/// The JSON on disk. Unknown fields from other tools are tolerated.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct StateFile {
    /// The workspace this state belongs to.
    pub workspace_id: String,
    /// Id of the newest row below which everything is handled (the cursor); empty =
    /// cold start.
    #[serde(default)]
    pub last_since_id: String,
    /// Highest handled `seq`, for acks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_seq: Option<i64>,
    /// Recently handled keys, oldest first (activity ids and message ids).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub handled: Vec<String>,
    /// Replies produced by the backend but not yet confirmed posted, by activity id.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub pending: BTreeMap<String, PendingReply>,
    /// The newest finished canvas replies' posts, oldest first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub canvas_posts: Vec<CanvasPost>,
    /// Every canvas post dropped from `canvas_posts` had its echo by then (Unix µs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub canvas_forgotten_us: Option<i64>,
}

/// A finished canvas reply's posts, as far as their echo goes. Kept across restarts:
/// an identical reply saved before a crash must not take this one's echo for its
/// own, which would leave it never shown (see `runner/notified.rs`).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct CanvasPost {
    /// A stable hash of the text the canvas shows.
    pub text: u64,
    /// When its first post began (Unix µs, our clock).
    pub began_us: i64,
    /// The latest its echo can have been created (our clock).
    pub latest_us: i64,
    /// A post of it was answered 2xx: its echo is in.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub shown: bool,
    /// How many echoes its posts can have made (one per post not refused: a post
    /// whose answer was lost may have been shown too, and then its retry as well).
    #[serde(default = "one_post", skip_serializing_if = "is_one_post")]
    pub posts: u32,
}

fn one_post() -> u32 {
    1
}

fn is_one_post(n: &u32) -> bool {
    *n == 1
}

/// A backend reply saved before it is posted, so a crash re-posts it (same
/// `messageId`) instead of running the backend again.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct PendingReply {
    /// Reply text.
    pub text: String,
    /// Extra parts.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub parts: Vec<Value>,
    /// When it was saved, just before its post began (Unix µs): a canvas reply's
    /// echo row created after this shows it was already posted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub at_us: Option<i64>,
}

/// One line of the journal: what happened since the last checkpoint.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "t", rename_all = "snake_case")]
enum Record {
    /// The backend produced this reply for `row`; it is about to be posted.
    Reply {
        row: String,
        reply: PendingReply,
        /// Written without its own fsync ([`Store::record_reply_unsynced`]): in a
        /// torn tail it is kept like an unsynced `done`, not taken for proof that
        /// the damage before it was on disk.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        unsynced: bool,
    },
    /// `row` is finished (answered, skipped on purpose, or dead-lettered), with its
    /// canvas reply's posts if it had any.
    Done {
        row: String,
        keys: Vec<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        canvas: Option<CanvasPost>,
    },
}

/// Damage met while replaying the journal: where it starts, and the unsynced whole
/// lines after it, applied only if nothing fsynced follows.
struct TornTail {
    line_no: u64,
    detail: String,
    kept: Vec<Record>,
}

impl TornTail {
    /// Records damage on `line_no`; only the first is reported.
    fn note(torn: &mut Option<TornTail>, line_no: u64, detail: String) {
        torn.get_or_insert(TornTail {
            line_no,
            detail,
            kept: Vec::new(),
        });
    }
}

/// The connector's durable memory: cursor, handled-message ledger and pending
/// replies. Changes are appended to a journal (`<id>.journal`, one line each, a
/// saved reply fsynced at once) and folded into the state file at checkpoints, so a
/// message costs two small appends and at most one fsync instead of two rewrites of
/// the whole file.
#[derive(Debug)]
pub struct Store {
    path: PathBuf,
    journal_path: PathBuf,
    journal: File,
    /// Lines written so far (this process) that a line of an fsynced kind must not
    /// get ahead of on disk: every line but the records an fsync made durable at once
    /// count, numbered in order (saved replies, and `done` lines without an fsync).
    durable_written: u64,
    /// The journal's fsync side, shared with [`Unsynced`] replies.
    sync: Arc<Mutex<SyncSide>>,
    journal_lines: u32,
    /// Bytes of whole records in the journal, where the next one is written (a
    /// failed append is cut back to it); zeros may follow (see the module doc).
    journal_len: u64,
    dirty: bool,
    last_checkpoint: Instant,
    /// Workspace id.
    pub workspace_id: String,
    cursor: Option<String>,
    last_seq: Option<i64>,
    handled: Lru<String, ()>,
    pending: BTreeMap<String, PendingReply>,
    canvas_posts: VecDeque<CanvasPost>,
    canvas_forgotten_us: Option<i64>,
    /// The line being appended, kept between appends (no allocation per record).
    line: Vec<u8>,
    #[cfg(test)]
    fail_writes: bool,
    #[cfg(test)]
    fail_syncs: bool,
}

/// Another fd of the journal, for fsyncs outside the store's lock, and how far they
/// got. Lock order: the store, then this.
#[derive(Debug)]
struct SyncSide {
    file: File,
    /// Lines counted in [`Store::durable_written`] known on disk: an fsync or
    /// checkpoint after them.
    synced: u64,
    /// Lines counted in [`Store::durable_written`] written so far: what an fsync
    /// starting now covers.
    written: u64,
    /// An fsync failed once these were written: Linux may have dropped the unsynced
    /// ones from the page cache while a later fsync succeeds, so an [`Unsynced`]
    /// reply numbered up to here is saved again instead (until a checkpoint holds it).
    failed_upto: u64,
    /// Test seam: fsyncs done through here.
    #[cfg(test)]
    syncs: u32,
}

impl SyncSide {
    /// One fsync of the journal: every line written before it is on disk after it.
    fn sync(&mut self, path: &Path) -> Result<(), StateError> {
        let upto = self.written;
        #[cfg(test)]
        {
            self.syncs += 1;
        }
        match self.file.sync_data() {
            Ok(()) => {
                self.synced = self.synced.max(upto);
                Ok(())
            }
            Err(source) => {
                self.failed_upto = self.written;
                Err(StateError::Io {
                    path: path.to_path_buf(),
                    source,
                })
            }
        }
    }
}

/// A saved reply written to the journal but not yet fsynced: [`Unsynced::sync`]
/// before it is posted. Until then it survives a crash of this process (the page
/// cache has it), not a power cut.
#[derive(Debug, Clone)]
pub struct Unsynced {
    /// Its number among the lines of an fsynced kind.
    seq: u64,
    sync: Arc<Mutex<SyncSide>>,
    path: PathBuf,
}

impl Unsynced {
    /// Makes the reply durable (an fsync unless one already covered it). After an
    /// error, save the reply again ([`Store::record_reply`]): a failed fsync may have
    /// dropped the written line without saying so on the next try.
    ///
    /// Several replies waiting for their posts are made durable by the first one's
    /// fsync (group commit): it covers every line written before it.
    pub fn sync(&self) -> Result<(), StateError> {
        let mut side = self.sync.lock().unwrap_or_else(PoisonError::into_inner);
        if self.seq > 0 && self.seq <= side.failed_upto {
            return Err(StateError::Io {
                path: self.path.clone(),
                source: io::Error::other("an earlier fsync of the journal failed"),
            });
        }
        if side.synced >= self.seq {
            return Ok(());
        }
        side.sync(&self.path)
    }
}

/// `<dir>/<workspace-id>.json`.
pub fn state_path(dir: &Path, workspace_id: &str) -> PathBuf {
    dir.join(format!("{workspace_id}.json"))
}

/// Reads and checks a state file; `Ok(None)` when there is none.
pub fn read_state_file(path: &Path, workspace_id: &str) -> Result<Option<StateFile>, StateError> {
    let io_err = |source| StateError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut f = match open_read_nofollow(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err(e)),
    };
    let corrupt = |detail: String| StateError::Corrupt {
        path: path.to_path_buf(),
        detail,
    };
    let meta = f.metadata().map_err(io_err)?;
    if !meta.is_file() {
        return Err(corrupt("not a regular file".into()));
    }
    if meta.len() > MAX_STATE_BYTES {
        return Err(corrupt(format!("{} bytes is too large", meta.len())));
    }
    let mut raw = Vec::new();
    (&mut f)
        .take(MAX_STATE_BYTES)
        .read_to_end(&mut raw)
        .map_err(io_err)?;
    let file: StateFile = serde_json::from_slice(&raw).map_err(|e| corrupt(e.to_string()))?;
    if file.workspace_id != workspace_id {
        return Err(corrupt(format!(
            "it belongs to workspace {:?}",
            file.workspace_id
        )));
    }
    if !file.last_since_id.is_empty() && !crate::uuid::is_uuid(&file.last_since_id) {
        return Err(corrupt(format!(
            "cursor {:?} is not a UUID",
            file.last_since_id
        )));
    }
    Ok(Some(file))
}

impl Store {
    /// Opens the state of `workspace_id` in `dir`: the state file (if any) plus
    /// whatever the journal recorded after it, then checkpoints so the journal starts
    /// empty. A state file that does not parse or belongs to another workspace is an
    /// error, and so is a damaged journal line before a fsynced one; a torn tail (crash
    /// or power cut mid-write, see the module doc) is dropped.
    pub fn open(dir: &Path, workspace_id: &str) -> Result<Store, StateError> {
        let path = state_path(dir, workspace_id);
        let journal_path = dir.join(format!("{workspace_id}.journal"));
        let file = read_state_file(&path, workspace_id)?.unwrap_or_default();
        let io_err = |p: &Path| {
            let p = p.to_path_buf();
            move |source| StateError::Io { path: p, source }
        };
        // Not `append`: records are written at their offset, into preallocated zeros.
        let journal = state_file_options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&journal_path)
            .map_err(io_err(&journal_path))?;
        let sync = journal.try_clone().map_err(io_err(&journal_path))?;
        let mut store = Store {
            path,
            journal_path: journal_path.clone(),
            journal,
            durable_written: 0,
            sync: Arc::new(Mutex::new(SyncSide {
                file: sync,
                synced: 0,
                written: 0,
                failed_upto: 0,
                #[cfg(test)]
                syncs: 0,
            })),
            journal_lines: 0,
            journal_len: 0,
            dirty: false,
            last_checkpoint: Instant::now(),
            workspace_id: workspace_id.to_string(),
            cursor: Some(file.last_since_id).filter(|c| !c.is_empty()),
            last_seq: file.last_seq,
            handled: Lru::new(LEDGER_CAPACITY),
            pending: file.pending,
            canvas_posts: VecDeque::new(),
            canvas_forgotten_us: file.canvas_forgotten_us,
            line: Vec::new(),
            #[cfg(test)]
            fail_writes: false,
            #[cfg(test)]
            fail_syncs: false,
        };
        for key in file.handled {
            store.handled.insert(key, ());
        }
        for post in file.canvas_posts {
            store.keep_canvas_post(post);
        }
        let replayed = store.replay_journal()?;
        if replayed > 0 {
            log::info!(
                "recovered {replayed} journal record(s) from {}",
                journal_path.display()
            );
        }
        store.checkpoint()?;
        Ok(store)
    }

    /// Applies the journal, read as a stream (one bounded line at a time), each record
    /// as it comes: whether a `done` line was fsynced depends on the pending replies
    /// before it. Damage is dropped only where it can be an unsynced tail (module doc).
    fn replay_journal(&mut self) -> Result<usize, StateError> {
        let path = self.journal_path.clone();
        let io_err = |source| StateError::Io {
            path: path.clone(),
            source,
        };
        let corrupt = |detail: String| StateError::Corrupt {
            path: path.clone(),
            detail,
        };
        let meta = self.journal.metadata().map_err(io_err)?;
        if !meta.is_file() {
            return Err(corrupt("the journal is not a regular file".into()));
        }
        // A second handle on the same file: records are written at their offset
        // whatever the file position is.
        let mut reader = BufReader::new(self.journal.try_clone().map_err(io_err)?);
        reader.seek(io::SeekFrom::Start(0)).map_err(io_err)?;
        let mut torn: Option<TornTail> = None;
        let mut applied = 0usize;
        let mut line = Vec::new();
        let mut line_no = 0u64;
        loop {
            line.clear();
            let n = (&mut reader)
                .take(MAX_RECORD_BYTES.saturating_add(1))
                .read_until(b'\n', &mut line)
                .map_err(io_err)?;
            if n == 0 {
                break;
            }
            line_no += 1;
            if line.last() != Some(&b'\n') && line.iter().all(|b| *b == 0) {
                // From the last newline to the end, only zeros: room preallocated
                // at the last checkpoint and never written (module doc).
                break;
            }
            if line.last() != Some(&b'\n') && n as u64 > MAX_RECORD_BYTES {
                return Err(corrupt(format!(
                    "journal line {line_no} is longer than {MAX_RECORD_BYTES} bytes"
                )));
            }
            let body = line.strip_suffix(b"\n").unwrap_or(&line);
            // Zeroes are blocks whose data never reached the disk; a record may follow
            // them on the same line (its own newline survived, the one before did not).
            if body.contains(&0) {
                TornTail::note(&mut torn, line_no, "zero bytes".into());
            }
            for piece in body.split(|b| *b == 0) {
                if piece.iter().all(u8::is_ascii_whitespace) {
                    continue;
                }
                let record = match serde_json::from_slice::<Record>(piece) {
                    Ok(record) => record,
                    Err(e) => {
                        TornTail::note(&mut torn, line_no, format!("not a record: {e}"));
                        continue;
                    }
                };
                match &mut torn {
                    None => {
                        self.apply(record);
                        applied += 1;
                    }
                    Some(t) if self.was_fsynced(&record) => {
                        return Err(corrupt(format!(
                            "journal line {} is damaged ({}) and a record fsynced after it follows on line {line_no}, so it is not a torn tail",
                            t.line_no, t.detail
                        )));
                    }
                    Some(t) => t.kept.push(record),
                }
            }
        }
        if let Some(t) = torn {
            log::warn!(
                "{}: dropping a torn journal tail from line {} on ({}): lines not yet fsynced when the connector or the machine stopped; keeping {} whole line(s) after it",
                path.display(),
                t.line_no,
                t.detail,
                t.kept.len()
            );
            applied += t.kept.len();
            for record in t.kept {
                self.apply(record);
            }
        }
        Ok(applied)
    }

    /// Whether `record` is (or was, replayed) fsynced when appended: every reply, and
    /// the `done` of a row without a saved reply (see [`Store::record_done`]).
    fn was_fsynced(&self, record: &Record) -> bool {
        match record {
            Record::Reply { unsynced, .. } => !unsynced,
            Record::Done { row, .. } => !self.pending.contains_key(row),
        }
    }

    fn apply(&mut self, record: Record) {
        match record {
            Record::Reply { row, reply, .. } => {
                self.pending.insert(row, reply);
            }
            Record::Done { row, keys, canvas } => {
                self.pending.remove(&row);
                for key in keys {
                    self.handled.insert(key, ());
                }
                if let Some(post) = canvas {
                    self.keep_canvas_post(post);
                }
            }
        }
    }

    /// Keeps `post`, dropping (and noting when) those settled more than
    /// [`CANVAS_POSTS_FOR_US`] before it began and any beyond [`CANVAS_POSTS`]. A
    /// record replayed after a checkpoint that already holds it is not kept twice.
    fn keep_canvas_post(&mut self, post: CanvasPost) {
        if self.canvas_posts.contains(&post) {
            return;
        }
        let horizon = post.began_us.saturating_sub(CANVAS_POSTS_FOR_US);
        while let Some(old) = self.canvas_posts.front().copied()
            && (old.latest_us < horizon || self.canvas_posts.len() >= CANVAS_POSTS)
        {
            self.canvas_posts.pop_front();
            self.canvas_forgotten_us = self.canvas_forgotten_us.max(Some(old.latest_us));
        }
        self.canvas_posts.push_back(post);
    }

    /// Appends `record`; `durable` fsyncs it before returning. Without, the line is in
    /// the page cache (it survives the process, not a power cut) and becomes durable
    /// with the next durable append or checkpoint, whichever comes first: the journal
    /// is one file, so an fsync covers every line before it.
    fn append(&mut self, record: Record, durable: bool) -> Result<(), StateError> {
        if !durable {
            self.write_record(record, false)?;
            // A power cut during a later line's fsync may keep that line and not this
            // one: damage before a line of an fsynced kind stops the next start, so
            // that line fsyncs this one first ([`Store::sync_earlier`]).
            self.durable_written = self.durable_written.saturating_add(1);
            self.sync_side().written = self.durable_written;
            return Ok(());
        }
        if let Err(e) = self.write_record(record, true) {
            // Its fsync may have failed: the unsynced replies before it are suspect.
            let mut side = self.sync_side();
            side.failed_upto = side.written;
            return Err(e);
        }
        // That fsync covered every line before it too.
        self.durable_written = self.durable_written.saturating_add(1);
        let mut side = self.sync_side();
        side.written = self.durable_written;
        side.synced = self.durable_written;
        Ok(())
    }

    fn sync_side(&self) -> std::sync::MutexGuard<'_, SyncSide> {
        self.sync.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Before a line of an fsynced kind: fsyncs the earlier lines not known on disk
    /// (an [`Unsynced`] reply whose poster has not synced it yet, a `done` line).
    fn sync_earlier(&self) -> Result<(), StateError> {
        let mut side = self.sync_side();
        if side.synced < self.durable_written {
            side.sync(&self.journal_path)?;
        }
        Ok(())
    }

    /// Appends `record`, fsynced when `durable`. Whatever comes of an fsynced kind
    /// comes after every earlier one is on disk: an [`Unsynced`] reply's poster may
    /// not have got to it yet, and then this fsyncs it first.
    fn write_record(&mut self, record: Record, durable: bool) -> Result<(), StateError> {
        let mut line = std::mem::take(&mut self.line);
        line.clear();
        let result = self.write_line(&mut line, record, durable);
        // A line grown by a long reply is not kept.
        if line.capacity() <= LINE_KEEP {
            self.line = line;
        }
        result
    }

    /// [`Store::write_record`] with `line` as the buffer.
    fn write_line(
        &mut self,
        line: &mut Vec<u8>,
        record: Record,
        durable: bool,
    ) -> Result<(), StateError> {
        serde_json::to_writer(&mut *line, &record).map_err(|e| StateError::Io {
            path: self.journal_path.clone(),
            source: io::Error::other(e),
        })?;
        line.push(b'\n');
        if durable {
            self.sync_earlier()?;
        }
        let written = self
            .check_writable()
            .and_then(|()| self.journal.write_all_at(line, self.journal_len))
            .and_then(|()| {
                if durable {
                    self.journal.sync_data()
                } else {
                    Ok(())
                }
            });
        if let Err(source) = written {
            // A short write (full disk) must not leave half a line in the middle of
            // the journal: cut it back to the last whole record.
            let _ = self.journal.set_len(self.journal_len);
            return Err(StateError::Io {
                path: self.journal_path.clone(),
                source,
            });
        }
        self.journal_len = self.journal_len.saturating_add(line.len() as u64);
        self.journal_lines = self.journal_lines.saturating_add(1);
        self.apply(record);
        Ok(())
    }

    /// Writes `bytes` zeros at the start of the (empty) journal: the room the next
    /// records are written into.
    fn preallocate(&self, bytes: u64) -> io::Result<()> {
        self.check_writable()?;
        let mut at = 0;
        while at < bytes {
            self.journal.write_all_at(&ZEROS, at)?;
            at += ZEROS.len() as u64;
        }
        Ok(())
    }

    /// Test seam: every write fails as on a full disk while `on`.
    #[cfg(test)]
    pub(crate) fn fail_writes(&mut self, on: bool) {
        self.fail_writes = on;
    }

    /// Test seam: the checkpoint's fsync of the emptied journal fails while `on`.
    #[cfg(test)]
    pub(crate) fn fail_syncs(&mut self, on: bool) {
        self.fail_syncs = on;
    }

    fn check_syncable(&self) -> io::Result<()> {
        #[cfg(test)]
        if self.fail_syncs {
            return Err(io::Error::other("fsync failed (test)"));
        }
        Ok(())
    }

    fn check_writable(&self) -> io::Result<()> {
        #[cfg(test)]
        if self.fail_writes {
            return Err(io::Error::from(io::ErrorKind::StorageFull));
        }
        Ok(())
    }

    /// Durably records a reply that is about to be posted for `row`: once this
    /// returns, a crash or power cut cannot lose it.
    pub fn record_reply(&mut self, row: &str, reply: PendingReply) -> Result<(), StateError> {
        self.append(
            Record::Reply {
                row: row.to_string(),
                reply,
                unsynced: false,
            },
            true,
        )
    }

    /// [`Store::record_reply`] without its fsync, for a poster to do
    /// ([`Unsynced::sync`]) before the post: the store's lock is not held through it,
    /// and the worker's next run need not wait for it. A crash of this process before
    /// then still finds the reply (it is in the page cache); a power cut may lose it,
    /// and then the row comes again, its reply never posted.
    pub fn record_reply_unsynced(
        &mut self,
        row: &str,
        reply: PendingReply,
    ) -> Result<Unsynced, StateError> {
        // Marked unsynced, it is no line of an fsynced kind: the replies waiting
        // before it need no fsync first, one fsync covers them all.
        let record = Record::Reply {
            row: row.to_string(),
            reply,
            unsynced: true,
        };
        self.write_record(record, false)?;
        self.durable_written = self.durable_written.saturating_add(1);
        self.sync_side().written = self.durable_written;
        Ok(Unsynced {
            seq: self.durable_written,
            sync: Arc::clone(&self.sync),
            path: self.journal_path.clone(),
        })
    }

    /// Every saved reply written so far, as one [`Unsynced`]: its sync makes them all
    /// durable (a poster about to wait for a retry, with replies queued behind it).
    pub fn written_replies(&self) -> Unsynced {
        Unsynced {
            seq: self.durable_written,
            sync: Arc::clone(&self.sync),
            path: self.journal_path.clone(),
        }
    }

    /// Records that `row` is finished; `keys` go into the ledger. After a saved
    /// reply this is not fsynced on its own (one fsync per message instead of two):
    /// the next saved reply or the checkpoint that saves the cursor past `row` makes
    /// it durable, so neither gets ahead of it on disk. A process crash loses nothing
    /// (the line is in the page cache); a power cut before that fsync redelivers the
    /// row, which is the crash-after-post case the journal already covers: its saved
    /// reply goes out again under the same `messageId` (a canvas reply only if its
    /// echo is absent), never the backend's second answer. A row finished without a
    /// saved reply (no reply, a notice, dead-lettered) has no other durable record,
    /// so its line is fsynced: a power cut must not run its backend again.
    /// `canvas`: the posts of its canvas reply, if it had one, remembered for
    /// [`Store::canvas_posts`].
    pub fn record_done(
        &mut self,
        row: &str,
        keys: Vec<String>,
        canvas: Option<CanvasPost>,
    ) -> Result<(), StateError> {
        let record = Record::Done {
            row: row.to_string(),
            keys,
            canvas,
        };
        let durable = self.was_fsynced(&record);
        self.append(record, durable)
    }

    /// The newest finished canvas replies' posts (oldest first), and the time by
    /// which every older one had its echo.
    pub fn canvas_posts(&self) -> (Vec<CanvasPost>, Option<i64>) {
        (
            self.canvas_posts.iter().copied().collect(),
            self.canvas_forgotten_us,
        )
    }

    /// The reply saved for `row` and not yet confirmed posted, if any.
    pub fn pending_reply(&self, row: &str) -> Option<PendingReply> {
        self.pending.get(row).cloned()
    }

    /// The cursor: the newest row below which everything is handled.
    pub fn cursor(&self) -> Option<&str> {
        self.cursor.as_deref()
    }

    /// Highest handled `seq`.
    pub fn last_seq(&self) -> Option<i64> {
        self.last_seq
    }

    /// Moves the cursor (in memory; the next checkpoint saves it). A cursor is
    /// always a UUID: the platform answers anything else with a 500.
    pub fn set_cursor(&mut self, id: Option<String>, seq: Option<i64>) {
        let id = id.filter(|i| crate::uuid::is_uuid(i));
        if id != self.cursor {
            self.cursor = id;
            self.dirty = true;
        }
        if let Some(seq) = seq {
            self.last_seq = Some(self.last_seq.map_or(seq, |s| s.max(seq)));
        }
    }

    /// Has `key` been handled recently?
    pub fn is_handled(&self, key: &str) -> bool {
        self.handled.contains(&key.to_string())
    }

    /// Number of keys in the ledger.
    #[cfg(test)]
    pub fn handled_len(&self) -> usize {
        self.handled.len()
    }

    /// Lines of an fsynced kind written but not known on disk yet.
    #[cfg(test)]
    pub fn unsynced_lines(&self) -> u64 {
        self.durable_written.saturating_sub(self.sync_side().synced)
    }

    /// The state file.
    #[cfg(test)]
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Checkpoints when the journal has grown or the cursor moved a while ago.
    pub fn maybe_checkpoint(&mut self) -> Result<(), StateError> {
        let due = self.journal_lines >= JOURNAL_MAX_LINES
            || ((self.dirty || self.journal_lines > 0)
                && self.last_checkpoint.elapsed() >= CHECKPOINT_EVERY);
        if due { self.checkpoint() } else { Ok(()) }
    }

    /// Writes the whole state atomically, then empties the journal.
    pub fn checkpoint(&mut self) -> Result<(), StateError> {
        let file = StateFile {
            workspace_id: self.workspace_id.clone(),
            last_since_id: self.cursor.clone().unwrap_or_default(),
            last_seq: self.last_seq,
            handled: self.handled.keys_oldest_first().cloned().collect(),
            pending: self.pending.clone(),
            canvas_posts: self.canvas_posts.iter().copied().collect(),
            canvas_forgotten_us: self.canvas_forgotten_us,
        };
        let bytes = serde_json::to_vec_pretty(&file).map_err(|e| StateError::Io {
            path: self.path.clone(),
            source: io::Error::other(e),
        })?;
        self.check_writable()
            .and_then(|()| write_atomic(&self.path, &bytes))
            .map_err(|source| StateError::Io {
                path: self.path.clone(),
                source,
            })?;
        // Replaying records already in the state file is harmless, so a crash
        // between the rename and the truncation loses nothing. Zeros are never
        // replayed, so neither does one while preallocating.
        let room = if self.journal_len >= PREALLOC_MIN {
            self.journal_len
                .saturating_mul(2)
                .next_multiple_of(ZEROS.len() as u64)
                .min(PREALLOC_MAX)
        } else {
            0
        };
        let emptied = self.journal.set_len(0);
        if emptied.is_ok() {
            // Empty now, whatever fails next: the next record goes at its start. A
            // stale length would put it after a hole of zeros, damage before a line
            // of an fsynced kind, which stops the next start (exit 2).
            self.journal_len = 0;
            self.journal_lines = 0;
        }
        emptied
            .and_then(|()| {
                if let Err(e) = self.preallocate(room) {
                    // Only the fsyncs get slower until the next checkpoint.
                    log::debug!(
                        "journal {}: no room preallocated: {e}",
                        self.journal_path.display()
                    );
                    self.journal.set_len(0)?;
                }
                self.check_syncable()?;
                self.journal.sync_data()
            })
            .map_err(|source| StateError::Io {
                path: self.journal_path.clone(),
                source,
            })?;
        // The state file holds every saved reply now, durably.
        let mut side = self.sync_side();
        side.synced = self.durable_written;
        side.failed_upto = 0;
        drop(side);
        self.dirty = false;
        self.last_checkpoint = Instant::now();
        Ok(())
    }
}

/// Creates `dir` (and parents) with mode 0700 if missing, then checks it is safe to
/// keep state in, as ssh checks `~/.ssh`: a directory, owned by us (or root), not
/// writable by group or others.
pub fn ensure_dir(dir: &Path) -> Result<(), StateError> {
    let unusable = |detail: String| StateError::Unusable {
        path: dir.to_path_buf(),
        detail,
    };
    if let Err(e) = fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
    {
        return Err(unusable(format!(
            "state dir is not a writable directory ({e}); choose another with --state-dir"
        )));
    }
    let meta = fs::metadata(dir)
        .map_err(|e| unusable(format!("state dir is not a writable directory ({e})")))?;
    if !meta.is_dir() {
        return Err(unusable(
            "state dir is not a writable directory (it is a file); choose another with --state-dir"
                .into(),
        ));
    }
    check_dir_safety(dir, meta.uid(), meta.mode(), own_uid()).map_err(unusable)
}

/// Our effective uid, read from the owner of `/proc/self` (std has no `geteuid`);
/// `None` without `/proc`, and then ownership is not checked.
fn own_uid() -> Option<u32> {
    fs::metadata("/proc/self").ok().map(|m| m.uid())
}

fn check_dir_safety(dir: &Path, owner: u32, mode: u32, me: Option<u32>) -> Result<(), String> {
    if let Some(me) = me
        && owner != me
        && owner != 0
    {
        return Err(format!(
            "owned by uid {owner}, not by this user (uid {me}): another user could plant files in it; use a directory of your own (--state-dir) or `chown {me} {}`",
            dir.display()
        ));
    }
    if mode & 0o022 != 0 {
        return Err(format!(
            "writable by group or others (mode {:04o}): anyone with write access could plant symlinks or files; fix with `chmod 700 {}`",
            mode & 0o7777,
            dir.display()
        ));
    }
    Ok(())
}

/// Maps a failure to create a file in the state dir: a read-only or forbidden
/// directory is a configuration error, not a runtime one.
fn create_error(dir: &Path, path: PathBuf, source: io::Error) -> StateError {
    match source.kind() {
        io::ErrorKind::PermissionDenied | io::ErrorKind::ReadOnlyFilesystem => {
            StateError::Unusable {
                path: dir.to_path_buf(),
                detail: format!(
                    "state dir is not a writable directory ({source}); choose another with --state-dir"
                ),
            }
        }
        _ => StateError::Io { path, source },
    }
}

/// Temp file in the same directory, fsync, rename over `path`, fsync the directory:
/// a crash leaves either the old or the new file, never half of one.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    write_file(path, bytes, true)
}

/// Replaces `path` by rename (mode 0600) so readers never see half a file;
/// `durable` adds the fsyncs that make the new content survive a power cut.
pub fn write_file(path: &Path, bytes: &[u8], durable: bool) -> io::Result<()> {
    write_file_mode(path, bytes, durable, 0o600)
}

/// [`write_file`] with the file's permission bits set to `mode` whatever the umask
/// (the metrics file is 0644: node_exporter usually runs as another user).
pub fn write_file_mode(path: &Path, bytes: &[u8], durable: bool, mode: u32) -> io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "state".into());
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let result = (|| {
        // A stale (or planted) temp file goes; the new one is created exclusively,
        // which never follows a symlink.
        let _ = fs::remove_file(&tmp);
        let mut f = state_file_options()
            .write(true)
            .create_new(true)
            .open(&tmp)?;
        if mode != 0o600 {
            f.set_permissions(std::fs::Permissions::from_mode(mode))?;
        }
        f.write_all(bytes)?;
        if durable {
            f.sync_all()?;
        }
        fs::rename(&tmp, path)?;
        if !durable {
            return Ok(());
        }
        // The rename is durable only once the directory entry is.
        File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Rewrites an existing file in place (no new file, so no new blocks when it does
/// not grow past them): for advisory files that must still be updated on a full
/// disk. Readers may see a half-written file for a moment.
pub fn overwrite_in_place(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let mut f = state_file_options().write(true).open(path)?;
    f.write_all(bytes)?;
    f.set_len(bytes.len() as u64)
}

/// Appends `record` as one JSON line to `path` (created 0600) and fsyncs: for the
/// dead-letter and delegation-result files, where every line must survive a crash.
pub fn append_line(path: &Path, record: &serde_json::Value) -> io::Result<()> {
    let mut line = record.to_string().into_bytes();
    line.push(b'\n');
    let mut f = state_file_options().create(true).append(true).open(path)?;
    f.write_all(&line)?;
    f.sync_all()
}

/// Opens (creating, 0600) `<dir>/<workspace-id>.lock`.
fn open_lock_file(dir: &Path, workspace_id: &str) -> Result<(File, PathBuf), StateError> {
    let path = dir.join(format!("{workspace_id}.lock"));
    state_file_options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map(|file| (file, path.clone()))
        .map_err(|source| create_error(dir, path, source))
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
        let (file, path) = open_lock_file(dir, workspace_id)?;
        match file.try_lock() {
            Ok(()) => Ok(InstanceLock { _file: file, path }),
            Err(fs::TryLockError::WouldBlock) => Err(StateError::Locked { path }),
            Err(fs::TryLockError::Error(source)) => Err(StateError::Io { path, source }),
        }
    }

    /// Like [`InstanceLock::acquire`], but blocks until the holder lets go.
    pub fn acquire_blocking(dir: &Path, workspace_id: &str) -> Result<InstanceLock, StateError> {
        let (file, path) = open_lock_file(dir, workspace_id)?;
        match file.lock() {
            Ok(()) => Ok(InstanceLock { _file: file, path }),
            Err(source) => Err(StateError::Io { path, source }),
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

    fn reply(t: &str) -> PendingReply {
        PendingReply {
            text: t.into(),
            parts: vec![],
            at_us: None,
        }
    }

    #[test]
    fn missing_file_is_fresh() {
        let d = tmpdir();
        let s = Store::open(&d, WS).unwrap();
        assert!(s.cursor().is_none());
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
        let mut s = Store::open(&d, WS).unwrap();
        s.set_cursor(Some(ROW.into()), Some(42));
        s.record_done("r1", vec!["a:1".into(), "m:2".into()], None)
            .unwrap();
        s.checkpoint().unwrap();
        let mode = fs::metadata(s.path()).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        drop(s);
        let back = Store::open(&d, WS).unwrap();
        assert_eq!(back.cursor(), Some(ROW));
        assert_eq!(back.last_seq(), Some(42));
        assert!(back.is_handled("a:1") && back.is_handled("m:2"));
        // Go-CLI compatible field names.
        let v: serde_json::Value = serde_json::from_slice(&fs::read(back.path()).unwrap()).unwrap();
        assert_eq!(v["workspace_id"], WS);
        assert_eq!(v["last_since_id"], ROW);
        // No temp files left behind; the journal is empty after a checkpoint.
        let mut names: Vec<_> = fs::read_dir(&d)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(names, [format!("{WS}.journal"), format!("{WS}.json")]);
        assert_eq!(
            fs::metadata(d.join(format!("{WS}.journal"))).unwrap().len(),
            0
        );
    }

    #[test]
    fn journal_survives_a_crash_before_checkpoint() {
        let d = tmpdir();
        let mut s = Store::open(&d, WS).unwrap();
        s.record_reply("r1", reply("hello")).unwrap();
        s.record_reply("r2", reply("bye")).unwrap();
        s.record_done("r2", vec!["a:r2".into()], None).unwrap();
        // Crash: no checkpoint, and a torn half line at the end of the journal.
        let mut j = OpenOptions::new()
            .append(true)
            .open(d.join(format!("{WS}.journal")))
            .unwrap();
        j.write_all(b"{\"t\":\"done\",\"row\":\"r1").unwrap();
        drop(s);
        let back = Store::open(&d, WS).unwrap();
        assert_eq!(back.pending_reply("r1"), Some(reply("hello")));
        assert_eq!(back.pending_reply("r2"), None);
        assert!(back.is_handled("a:r2"));
        assert!(!back.is_handled("a:r1"));
        // Recovery checkpointed: the pending reply now lives in the state file.
        drop(back);
        fs::write(d.join(format!("{WS}.journal")), b"").unwrap();
        assert_eq!(
            Store::open(&d, WS).unwrap().pending_reply("r1"),
            Some(reply("hello"))
        );
    }

    #[test]
    fn damage_before_a_fsynced_line_is_corruption() {
        // A reply line, and the done line of a row without a saved reply, are fsynced:
        // whatever came before them was on disk, so damage there is not a torn tail.
        let fsynced_after = [
            r#"{"t":"reply","row":"r2","reply":{"text":"two"}}"#,
            r#"{"t":"done","row":"r9","keys":["a:r9"]}"#,
        ];
        for damage in [&b"garbage\n"[..], &[0u8; 64][..]] {
            for later in fsynced_after {
                let d = tmpdir();
                let mut s = Store::open(&d, WS).unwrap();
                s.record_reply("r1", reply("hello")).unwrap();
                drop(s);
                let jp = d.join(format!("{WS}.journal"));
                let mut j = OpenOptions::new().append(true).open(&jp).unwrap();
                j.write_all(damage).unwrap();
                j.write_all(format!("{later}\n").as_bytes()).unwrap();
                let before = fs::read(&jp).unwrap();
                let e = Store::open(&d, WS).unwrap_err();
                assert!(matches!(e, StateError::Corrupt { .. }), "{e}");
                let msg = e.to_string();
                assert!(
                    msg.contains(&format!("{WS}.journal"))
                        && msg.contains("line 2 is damaged")
                        && msg.contains("not a torn tail"),
                    "{msg}"
                );
                // Nothing was truncated: the operator can still inspect it.
                assert_eq!(fs::read(&jp).unwrap(), before);
            }
        }
    }

    #[test]
    fn finished_canvas_posts_survive_replay_and_checkpoints_bounded() {
        let d = tmpdir();
        let jp = d.join(format!("{WS}.journal"));
        let post = |i: i64| CanvasPost {
            text: i as u64,
            began_us: i * 10,
            latest_us: i * 10 + 5,
            shown: i % 2 == 0,
            posts: 1 + (i % 3) as u32,
        };
        let mut s = Store::open(&d, WS).unwrap();
        s.record_done("r0", vec!["a:r0".into()], Some(post(0)))
            .unwrap();
        s.record_done("rx", vec!["a:rx".into()], None).unwrap();
        drop(s);
        let journal = fs::read(&jp).unwrap();
        // From the journal, then from the state file it was folded into.
        let s = Store::open(&d, WS).unwrap();
        assert_eq!(s.canvas_posts(), (vec![post(0)], None));
        drop(s);
        // A crash between the checkpoint's rename and the journal's truncation
        // replays the record again: still one post.
        fs::write(&jp, &journal).unwrap();
        let mut s = Store::open(&d, WS).unwrap();
        assert_eq!(s.canvas_posts(), (vec![post(0)], None));
        let n = CANVAS_POSTS as i64 + 2;
        for i in 1..n {
            s.record_done(&format!("r{i}"), vec![format!("a:{i}")], Some(post(i)))
                .unwrap();
        }
        drop(s);
        let s = Store::open(&d, WS).unwrap();
        let (posts, forgotten) = s.canvas_posts();
        let expected: Vec<CanvasPost> = (2..n).map(post).collect();
        assert_eq!(posts, expected, "the newest, oldest first");
        assert_eq!(forgotten, Some(post(1).latest_us));
        drop(s);
        let mut s = Store::open(&d, WS).unwrap();
        assert_eq!(s.canvas_posts(), (expected, Some(post(1).latest_us)));
        // Long settled posts are dropped by age.
        let late = CanvasPost {
            began_us: post(n).latest_us + CANVAS_POSTS_FOR_US + 1,
            ..post(n)
        };
        s.record_done("late", vec!["a:late".into()], Some(late))
            .unwrap();
        assert_eq!(s.canvas_posts(), (vec![late], Some(post(n - 1).latest_us)));
    }

    /// A journal that was busy at its checkpoint: room preallocated (zeros), then
    /// `records` written into it as a crash leaves them. Returns the directory, the
    /// journal and the room's size.
    fn preallocated_journal(records: impl FnOnce(&mut Store)) -> (PathBuf, PathBuf, u64) {
        let d = tmpdir();
        let jp = d.join(format!("{WS}.journal"));
        let mut s = Store::open(&d, WS).unwrap();
        let mut i = 0;
        while s.journal_len < PREALLOC_MIN {
            i += 1;
            s.record_done(&format!("busy{i}"), vec![format!("a:busy{i}")], None)
                .unwrap();
        }
        s.checkpoint().unwrap();
        let room = fs::metadata(&jp).unwrap().len();
        assert!(room >= PREALLOC_MIN, "{room}");
        assert!(fs::read(&jp).unwrap().iter().all(|b| *b == 0));
        records(&mut s);
        drop(s);
        (d, jp, room)
    }

    #[test]
    fn records_written_into_a_preallocated_journal_survive_a_crash() {
        let (d, jp, room) = preallocated_journal(|s| {
            s.record_reply("r1", reply("one")).unwrap();
            s.record_reply("r2", reply("two")).unwrap();
            s.record_done("r2", vec!["a:r2".into()], None).unwrap();
            // Finished without a reply: fsynced on its own.
            s.record_done("r3", vec!["a:r3".into()], None).unwrap();
        });
        // Written in place: the file did not grow, zeros follow the last line.
        let raw = fs::read(&jp).unwrap();
        assert_eq!(raw.len() as u64, room);
        let end = raw.iter().rposition(|b| *b == b'\n').unwrap() + 1;
        assert_eq!(raw[..end].iter().filter(|b| **b == b'\n').count(), 4);
        assert!(raw[end..].iter().all(|b| *b == 0));
        let back = Store::open(&d, WS).unwrap();
        assert_eq!(back.pending_reply("r1"), Some(reply("one")));
        assert_eq!(back.pending_reply("r2"), None);
        assert!(back.is_handled("a:r2") && back.is_handled("a:r3"));
        assert!(back.is_handled("a:busy1"));
        // Replaying it was a quiet stretch: compacted, no room left ahead.
        assert_eq!(fs::metadata(&jp).unwrap().len(), 0);
    }

    #[test]
    fn damage_in_a_preallocated_journal_before_a_fsynced_line_is_corruption() {
        let (d, jp, _) = preallocated_journal(|s| {
            s.record_reply("r1", reply("one")).unwrap();
            let mut after = b"garbage\n".to_vec();
            after.extend_from_slice(br#"{"t":"reply","row":"r2","reply":{"text":"two"}}"#);
            after.push(b'\n');
            s.journal.write_all_at(&after, s.journal_len).unwrap();
        });
        let e = Store::open(&d, WS).unwrap_err();
        assert!(
            e.to_string().contains("line 2 is damaged")
                && e.to_string().contains("not a torn tail"),
            "{e}"
        );
        assert!(
            fs::metadata(&jp).unwrap().len() > 0,
            "left for the operator"
        );
    }

    #[test]
    fn a_quiet_journal_is_not_preallocated() {
        let d = tmpdir();
        let jp = d.join(format!("{WS}.journal"));
        let mut s = Store::open(&d, WS).unwrap();
        s.record_reply("r1", reply("one")).unwrap();
        s.record_done("r1", vec!["a:r1".into()], None).unwrap();
        s.checkpoint().unwrap();
        assert_eq!(fs::metadata(&jp).unwrap().len(), 0);
    }

    /// A journal as a power cut may find it: two saved replies (fsynced), then the
    /// done lines of both rows (not fsynced). Returns the directory, the journal and
    /// where its unsynced tail starts.
    fn journal_with_unsynced_tail() -> (PathBuf, PathBuf, usize) {
        let d = tmpdir();
        let jp = d.join(format!("{WS}.journal"));
        let mut s = Store::open(&d, WS).unwrap();
        s.record_reply("r1", reply("one")).unwrap();
        s.record_reply("r2", reply("two")).unwrap();
        let synced = fs::metadata(&jp).unwrap().len() as usize;
        s.record_done("r1", vec!["a:r1".into()], None).unwrap();
        s.record_done("r2", vec!["a:r2".into()], None).unwrap();
        drop(s);
        (d, jp, synced)
    }

    /// Opens `journal` (over a fresh state file) and checks which rows it finished,
    /// that the rest kept their saved replies, and that the journal was compacted.
    fn open_torn(d: &Path, jp: &Path, journal: &[u8], done: [bool; 2], what: &str) {
        let _ = fs::remove_file(state_path(d, WS));
        fs::write(jp, journal).unwrap();
        let s = Store::open(d, WS).unwrap_or_else(|e| panic!("{what}: {e}"));
        for (row, done) in ["r1", "r2"].into_iter().zip(done) {
            assert_eq!(s.is_handled(&format!("a:{row}")), done, "{what}: {row}");
            assert_eq!(s.pending_reply(row).is_none(), done, "{what}: {row}");
        }
        assert_eq!(fs::metadata(jp).unwrap().len(), 0, "{what}: compacted");
    }

    #[test]
    fn an_unsynced_tail_cut_at_any_byte_is_dropped() {
        let (d, jp, synced) = journal_with_unsynced_tail();
        let full = fs::read(&jp).unwrap();
        let r1_end = synced + full[synced..].iter().position(|b| *b == b'\n').unwrap() + 1;
        for cut in synced..=full.len() {
            // A line is whole once its closing brace is there, newline or not.
            let done = [cut + 1 >= r1_end, cut + 1 >= full.len()];
            open_torn(&d, &jp, &full[..cut], done, &format!("cut at {cut}"));
        }
    }

    #[test]
    fn zeroes_and_garbage_in_an_unsynced_tail_are_dropped() {
        let (d, jp, synced) = journal_with_unsynced_tail();
        let full = fs::read(&jp).unwrap();
        let r1_end = synced + full[synced..].iter().position(|b| *b == b'\n').unwrap() + 1;
        let mut r1_zeroed = full.clone();
        r1_zeroed[synced..r1_end].fill(0);
        let mut r1_holed = full.clone();
        r1_holed[synced + 5..r1_end - 5].fill(0);
        let mut all_zeroed = full.clone();
        all_zeroed[synced..].fill(0);
        let mut grown = full.clone();
        grown.extend([0u8; 4096]);
        let mut r1_garbage = full[..synced].to_vec();
        r1_garbage.extend(b"garbage\n");
        r1_garbage.extend(&full[r1_end..]);
        for (journal, done, what) in [
            // Done r1's block never reached the disk; done r2's did: r2 is kept, r1's
            // saved reply stays pending (re-posted under the same id).
            (r1_zeroed, [false, true], "done r1 zeroed"),
            (r1_holed, [false, true], "a hole in done r1"),
            (r1_garbage, [false, true], "done r1 is garbage"),
            (all_zeroed, [false, false], "the whole tail zeroed"),
            // The size reached the disk, the data after it did not.
            (grown, [true, true], "zeroes after the last line"),
        ] {
            open_torn(&d, &jp, &journal, done, what);
        }
        // The recovered state was checkpointed: it opens again from the state file.
        let back = Store::open(&d, WS).unwrap();
        assert!(back.is_handled("a:r1") && back.is_handled("a:r2"));
    }

    #[test]
    fn an_unsynced_reply_survives_a_crash_of_the_process() {
        let d = tmpdir();
        let mut s = Store::open(&d, WS).unwrap();
        let unsynced = s.record_reply_unsynced("r1", reply("one")).unwrap();
        assert_eq!(s.pending_reply("r1"), Some(reply("one")));
        // No fsync, no checkpoint: as if killed now. The page cache has the line.
        drop(s);
        let back = Store::open(&d, WS).unwrap();
        assert_eq!(back.pending_reply("r1"), Some(reply("one")));
        // Its checkpoint (at the open) made it durable already: the sync is a no-op.
        drop(back);
        unsynced.sync().unwrap();
    }

    #[test]
    fn a_done_line_fsynced_on_its_own_fsyncs_an_unsynced_done_line_before_it() {
        let d = tmpdir();
        let mut s = Store::open(&d, WS).unwrap();
        let syncs = |s: &Store| s.sync_side().syncs;
        let r1 = s.record_reply_unsynced("r1", reply("one")).unwrap();
        r1.sync().unwrap();
        // Not fsynced (its row had a saved reply).
        s.record_done("r1", vec!["a:r1".into()], None).unwrap();
        assert_eq!(s.unsynced_lines(), 1);
        let before = syncs(&s);
        // A row without one: its line is fsynced, and not written before r1's is on
        // disk (a power cut during its fsync could keep it and lose the one before).
        s.record_done("r2", vec!["a:r2".into()], None).unwrap();
        assert_eq!(syncs(&s), before + 1);
        assert_eq!(s.unsynced_lines(), 0);
        // Nothing unsynced before it: no fsync first.
        s.record_done("r3", vec!["a:r3".into()], None).unwrap();
        assert_eq!(syncs(&s), before + 1);
    }

    #[test]
    fn a_line_of_an_fsynced_kind_comes_only_after_the_earlier_ones_are_synced() {
        let d = tmpdir();
        let mut s = Store::open(&d, WS).unwrap();
        let synced = |s: &Store| s.sync_side().synced;
        let r1 = s.record_reply_unsynced("r1", reply("one")).unwrap();
        assert_eq!((synced(&s), s.durable_written), (0, 1));
        // Saved replies marked unsynced wait for their posters together: the first
        // one's fsync covers both (group commit), the second needs none.
        let r2 = s.record_reply_unsynced("r2", reply("two")).unwrap();
        assert_eq!((synced(&s), s.durable_written), (0, 2));
        r1.sync().unwrap();
        assert_eq!(synced(&s), 2);
        r2.sync().unwrap();
        assert_eq!(synced(&s), 2);
        // A done line after a saved reply is not fsynced; one without is, and it
        // fsyncs an earlier unsynced reply and done line too.
        s.record_done("r1", vec!["a:r1".into()], None).unwrap();
        assert_eq!((synced(&s), s.durable_written), (2, 3));
        let _r3 = s.record_reply_unsynced("r3", reply("three")).unwrap();
        s.record_done("r4", vec!["a:r4".into()], None).unwrap();
        assert_eq!((synced(&s), s.durable_written), (5, 5));
        let r5 = s.record_reply_unsynced("r5", reply("five")).unwrap();
        s.checkpoint().unwrap();
        assert_eq!(synced(&s), 6);
        r5.sync().unwrap();
        drop(s);
        let back = Store::open(&d, WS).unwrap();
        assert_eq!(back.pending_reply("r2"), Some(reply("two")));
        assert_eq!(back.pending_reply("r1"), None);
        assert!(back.is_handled("a:r4"));
    }

    #[test]
    fn one_sync_of_the_written_replies_covers_every_waiting_one() {
        let d = tmpdir();
        let mut s = Store::open(&d, WS).unwrap();
        let synced = |s: &Store| s.sync_side().synced;
        // Nothing written: nothing to do.
        s.written_replies().sync().unwrap();
        let r1 = s.record_reply_unsynced("r1", reply("one")).unwrap();
        let r2 = s.record_reply_unsynced("r2", reply("two")).unwrap();
        assert_eq!(synced(&s), 0);
        s.written_replies().sync().unwrap();
        assert_eq!(synced(&s), 2);
        r1.sync().unwrap();
        r2.sync().unwrap();
        assert_eq!(synced(&s), 2);
    }

    #[test]
    fn after_a_failed_fsync_a_waiting_reply_is_saved_again() {
        let d = tmpdir();
        let mut s = Store::open(&d, WS).unwrap();
        let r1 = s.record_reply_unsynced("r1", reply("one")).unwrap();
        let r2 = s.record_reply_unsynced("r2", reply("two")).unwrap();
        // Appending a line of an fsynced kind fails (its fsync, or as here its write
        // on a full disk): the two unsynced lines may be gone from the page cache
        // while a later fsync succeeds, so neither counts as durable any more.
        s.fail_writes(true);
        assert!(s.record_reply("r3", reply("three")).is_err());
        s.fail_writes(false);
        s.record_done("r9", vec!["a:r9".into()], None).unwrap();
        assert!(r1.sync().is_err());
        assert!(r2.sync().is_err());
        // A checkpoint holds them in the state file: durable again.
        s.checkpoint().unwrap();
        r1.sync().unwrap();
        r2.sync().unwrap();
    }

    #[test]
    fn after_a_checkpoint_whose_journal_fsync_failed_records_start_at_the_beginning() {
        let d = tmpdir();
        let mut s = Store::open(&d, WS).unwrap();
        for i in 0..3 {
            s.record_done(&format!("r{i}"), vec![format!("a:r{i}")], None)
                .unwrap();
        }
        // The state file is written and the journal emptied; only its fsync fails.
        s.fail_syncs(true);
        assert!(s.checkpoint().is_err());
        s.fail_syncs(false);
        s.record_done("r9", vec!["a:r9".into()], None).unwrap();
        drop(s);
        // The journal holds that one record, not a hole of zeros before it.
        let journal = fs::read(d.join(format!("{WS}.journal"))).unwrap();
        assert!(
            journal.starts_with(b"{"),
            "{:?}",
            &journal[..journal.len().min(16)]
        );
        let back = Store::open(&d, WS).unwrap();
        assert!(back.is_handled("a:r0") && back.is_handled("a:r9"));
    }

    #[test]
    fn an_unsynced_reply_after_damage_is_a_torn_tail_not_corruption() {
        let d = tmpdir();
        let jp = d.join(format!("{WS}.journal"));
        let mut s = Store::open(&d, WS).unwrap();
        s.record_reply("r1", reply("one")).unwrap();
        let _r2 = s.record_reply_unsynced("r2", reply("two")).unwrap();
        drop(s);
        // A power cut before the poster's fsync: the line before the second
        // unsynced reply did not reach the disk, the reply's did.
        let written = fs::read_to_string(&jp).unwrap();
        let r2_line = written.lines().nth(1).unwrap();
        assert!(r2_line.contains("\"unsynced\":true"), "{r2_line}");
        let mut torn = written.into_bytes();
        torn.extend_from_slice(&[0u8; 40]);
        torn.push(b'\n');
        torn.extend_from_slice(
            br#"{"t":"reply","row":"r3","reply":{"text":"three"},"unsynced":true}"#,
        );
        torn.push(b'\n');
        fs::write(&jp, torn).unwrap();
        let back = Store::open(&d, WS).unwrap();
        for (r, t) in [("r1", "one"), ("r2", "two"), ("r3", "three")] {
            assert_eq!(back.pending_reply(r), Some(reply(t)), "{r}");
        }
    }

    #[test]
    fn failed_append_leaves_no_half_line() {
        let d = tmpdir();
        let mut s = Store::open(&d, WS).unwrap();
        s.record_reply("r1", reply("one")).unwrap();
        s.fail_writes(true);
        assert!(s.record_reply("r2", reply("two")).is_err());
        assert!(s.record_reply_unsynced("r3", reply("three")).is_err());
        assert_eq!(s.pending_reply("r3"), None);
        assert!(s.checkpoint().is_err());
        assert_eq!(s.pending_reply("r2"), None);
        s.fail_writes(false);
        s.record_done("r1", vec!["a:r1".into()], None).unwrap();
        drop(s);
        let back = Store::open(&d, WS).unwrap();
        assert!(back.is_handled("a:r1"));
        assert_eq!(back.pending_reply("r1"), None);
    }

    #[test]
    fn state_files_never_follow_symlinks() {
        let d = tmpdir();
        let victim = d.join("victim");
        fs::write(&victim, b"precious").unwrap();
        for name in [
            format!("{WS}.journal"),
            format!("{WS}.lock"),
            format!("{WS}.json"),
        ] {
            let link = d.join(&name);
            std::os::unix::fs::symlink(&victim, &link).unwrap();
            let e = if name.ends_with(".lock") {
                InstanceLock::acquire(&d, WS).unwrap_err()
            } else {
                Store::open(&d, WS).unwrap_err()
            };
            assert!(e.to_string().contains(&name), "{name}: {e}");
            fs::remove_file(&link).unwrap();
        }
        let dl = d.join(format!("{WS}.deadletter.jsonl"));
        std::os::unix::fs::symlink(&victim, &dl).unwrap();
        assert!(append_line(&dl, &serde_json::json!({"text": "secret"})).is_err());
        // A planted temp-file link is replaced, not followed.
        let target = d.join("out.json");
        std::os::unix::fs::symlink(
            &victim,
            d.join(format!(".out.json.{}.tmp", std::process::id())),
        )
        .unwrap();
        write_atomic(&target, b"{}").unwrap();
        assert_eq!(fs::read(&victim).unwrap(), b"precious");
    }

    #[test]
    fn unsafe_state_dirs_are_refused() {
        let d = tmpdir();
        assert!(check_dir_safety(&d, 1000, 0o40700, Some(1000)).is_ok());
        assert!(check_dir_safety(&d, 0, 0o40700, Some(1000)).is_ok());
        let e = check_dir_safety(&d, 1001, 0o40700, Some(1000)).unwrap_err();
        assert!(e.contains("owned by uid 1001"), "{e}");
        let e = check_dir_safety(&d, 1000, 0o40775, Some(1000)).unwrap_err();
        assert!(e.contains("chmod 700"), "{e}");
        assert!(check_dir_safety(&d, 1000, 0o40757, None).is_err());
        fs::set_permissions(&d, fs::Permissions::from_mode(0o777)).unwrap();
        let e = ensure_dir(&d).unwrap_err();
        assert!(matches!(e, StateError::Unusable { .. }));
        let file = d.join("plain-file");
        fs::write(&file, b"").unwrap();
        let e = ensure_dir(&file).unwrap_err();
        assert!(
            e.to_string()
                .contains("state dir is not a writable directory"),
            "{e}"
        );
    }

    #[test]
    fn reads_go_cli_file() {
        let d = tmpdir();
        fs::write(
            state_path(&d, WS),
            format!(r#"{{"workspace_id":"{WS}","last_since_id":"{ROW}"}}"#),
        )
        .unwrap();
        assert_eq!(Store::open(&d, WS).unwrap().cursor(), Some(ROW));
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
            let e = Store::open(&d, WS).unwrap_err();
            assert!(matches!(e, StateError::Corrupt { .. }), "{bad}: {e}");
            assert!(e.to_string().contains("corrupt"));
        }
    }

    #[test]
    fn non_uuid_cursor_is_never_kept() {
        let d = tmpdir();
        let mut s = Store::open(&d, WS).unwrap();
        s.set_cursor(Some("act-1".into()), None);
        assert_eq!(s.cursor(), None);
    }

    #[test]
    fn ledger_is_bounded() {
        let d = tmpdir();
        let mut s = Store::open(&d, WS).unwrap();
        for i in 0..(LEDGER_CAPACITY + 10) {
            s.record_done(&format!("r{i}"), vec![format!("a:{i}")], None)
                .unwrap();
        }
        assert_eq!(s.handled_len(), LEDGER_CAPACITY);
        assert!(!s.is_handled("a:0"));
        s.checkpoint().unwrap();
        drop(s);
        let back = Store::open(&d, WS).unwrap();
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
