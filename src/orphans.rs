//! Backend process groups left behind by a connector that was killed (`kill -9`, the
//! OOM killer, a crash): recorded in `<state-dir>/<id>.running` while they run, and
//! ended at the next start before any message runs again (issue 11), so an old run
//! never works next to a new run of the same message.
//!
//! A pid is only a number the kernel hands out again, so a record is trusted only
//! while it still names the same process: same boot, the leader exists, leads the
//! recorded group, and started at the recorded time (`/proc/<pid>/stat`, field 22).
//! Without `/proc` nothing is recorded and nothing is signalled.

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::signal::{SIGKILL, SIGTERM, kill_process_group};

/// A record file larger than this is not ours (a few groups take a few hundred bytes).
const MAX_RECORD_BYTES: u64 = 64 * 1024;
/// How often a leftover group is looked at while it is given time to exit.
const POLL: Duration = Duration::from_millis(20);

/// `<dir>/<workspace-id>.running`.
pub fn running_path(dir: &Path, workspace_id: &str) -> PathBuf {
    dir.join(format!("{workspace_id}.running"))
}

/// What the file holds.
#[derive(Debug, Default, Serialize, Deserialize, PartialEq)]
struct RecordFile {
    /// `/proc/sys/kernel/random/boot_id`: start times only compare within one boot.
    #[serde(default)]
    boot_id: String,
    #[serde(default)]
    groups: Vec<Recorded>,
}

/// One running process group.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
struct Recorded {
    /// The group id, which is also its leader's pid (`process_group(0)`).
    pgid: u32,
    /// The leader's start time in clock ticks after boot.
    start: u64,
}

/// The process groups of one workspace's backend runs, kept in its `.running` file.
/// Cheap to clone (clones share the record); [`Groups::default`] records nothing
/// (`doctor`, unit tests).
#[derive(Clone, Default)]
pub struct Groups {
    inner: Option<Arc<Inner>>,
}

struct Inner {
    path: PathBuf,
    boot_id: String,
    /// Recorded groups with how many users hold each (a worker process and the
    /// requests it serves share one group).
    running: Mutex<Running>,
}

#[derive(Default)]
struct Running {
    groups: BTreeMap<u32, (u64, u32)>,
    /// The file as we wrote it last, kept open for the next write; `None` until
    /// there is one, and after a failed write.
    on_disk: Option<OnDisk>,
    /// A failed write was logged; say it once, not per message.
    warned: bool,
}

/// The record file while we keep it up to date.
struct OnDisk {
    file: fs::File,
    /// Its length: the longest record written so far.
    len: usize,
}

impl Groups {
    /// Records into `<dir>/<workspace-id>.running`.
    pub fn in_state_dir(dir: &Path, workspace_id: &str) -> Groups {
        Groups {
            inner: Some(Arc::new(Inner {
                path: running_path(dir, workspace_id),
                boot_id: boot_id(),
                running: Mutex::default(),
            })),
        }
    }

    /// A backend just started the process group `pgid` (its leader's pid).
    pub fn add(&self, pgid: u32) {
        let Some(inner) = &self.inner else { return };
        let mut running = inner.lock();
        if let Some((_, users)) = running.groups.get_mut(&pgid) {
            *users = users.saturating_add(1);
            return;
        }
        // Without a start time a later start could not tell this group from a
        // stranger that got the same pid: not recorded at all.
        let Some(start) = stat(pgid).map(|s| s.start) else {
            return;
        };
        running.groups.insert(pgid, (start, 1));
        inner.save(&mut running);
    }

    /// The process group `pgid` has ended (or was killed) for one of its users.
    pub fn remove(&self, pgid: u32) {
        let Some(inner) = &self.inner else { return };
        let mut running = inner.lock();
        let Some((_, users)) = running.groups.get_mut(&pgid) else {
            return;
        };
        *users = users.saturating_sub(1);
        if *users == 0 {
            running.groups.remove(&pgid);
            inner.save(&mut running);
        }
    }
}

impl Inner {
    fn lock(&self) -> std::sync::MutexGuard<'_, Running> {
        self.running.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Writes the current set, twice per message, so it is cheap: one `pwrite(2)` at
    /// offset 0 on a file kept open (no open, truncate or close per run), no fsync,
    /// and only the first time by rename. That is safe because the only reader is the
    /// next start after this process died while the kernel lived on: the page cache
    /// keeps what was written (a power cut or reboot ends every process anyway, and
    /// changes the boot id, so a lost write cannot make a later start signal a
    /// stranger), and a write(2) of a few hundred bytes is not cut in half by a kill.
    /// The file never shrinks while we run (shorter content is padded with spaces,
    /// which JSON ignores), so each write covers all of the last one and no stale
    /// tail can follow it. The fd is ours alone: the workspace lock keeps every
    /// other connector (and `end_leftovers`) away from the file while we run.
    fn save(&self, running: &mut Running) {
        let file = RecordFile {
            boot_id: self.boot_id.clone(),
            groups: running
                .groups
                .iter()
                .map(|(&pgid, &(start, _))| Recorded { pgid, start })
                .collect(),
        };
        let result = serde_json::to_vec(&file)
            .map_err(io::Error::other)
            .and_then(|mut bytes| match running.on_disk.take() {
                Some(mut disk) => {
                    if bytes.len() < disk.len {
                        bytes.resize(disk.len, b' ');
                    }
                    disk.file.write_all_at(&bytes, 0)?;
                    disk.len = bytes.len();
                    Ok(disk)
                }
                None => {
                    crate::state::write_file(&self.path, &bytes, false)?;
                    let file = crate::state::open_write_nofollow(&self.path)?;
                    Ok(OnDisk {
                        file,
                        len: bytes.len(),
                    })
                }
            });
        let result = result.map(|disk| running.on_disk = Some(disk));
        match result {
            Ok(_) => running.warned = false,
            Err(e) if !running.warned => {
                running.warned = true;
                log::warn!(
                    "{}: {e}; a backend left running by a crash now may not be ended at the next start",
                    self.path.display()
                );
            }
            Err(_) => {}
        }
    }
}

/// Ends what a previous connector for `workspace_id` left running, then forgets the
/// record. Call with the workspace's lock held (no live connector owns those
/// groups) and before any backend starts. Each group that is still ours gets
/// SIGTERM, up to `grace` to exit, then SIGKILL; a record that names another
/// process now (a reused pid) is dropped without a signal.
pub fn end_leftovers(dir: &Path, workspace_id: &str, grace: Duration) {
    let path = running_path(dir, workspace_id);
    let record = match read_record(&path) {
        Ok(Some(r)) => r,
        Ok(None) => return,
        Err(e) => {
            log::warn!("{}: {e}; not signalling anything it names", path.display());
            let _ = fs::remove_file(&path);
            return;
        }
    };
    let boot = boot_id();
    for g in &record.groups {
        match ownership(g, &record.boot_id, &boot) {
            Ok(()) => end_group(g.pgid, grace),
            Err(why) => log::info!(
                "process group {} recorded by a previous run is not signalled: {why}",
                g.pgid
            ),
        }
    }
    if let Err(e) = fs::remove_file(&path)
        && e.kind() != io::ErrorKind::NotFound
    {
        log::warn!("{}: {e}", path.display());
    }
}

fn read_record(path: &Path) -> io::Result<Option<RecordFile>> {
    let mut f = match crate::state::open_read_nofollow(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let meta = f.metadata()?;
    if !meta.is_file() || meta.len() > MAX_RECORD_BYTES {
        return Err(io::Error::other("not a small regular file"));
    }
    let mut raw = Vec::new();
    (&mut f).take(MAX_RECORD_BYTES).read_to_end(&mut raw)?;
    serde_json::from_slice(&raw)
        .map(Some)
        .map_err(io::Error::other)
}

/// `Ok` when the recorded group is still the one our backend started; else why not.
fn ownership(g: &Recorded, recorded_boot: &str, boot: &str) -> Result<(), String> {
    if recorded_boot.is_empty() || recorded_boot != boot {
        return Err("recorded before the last reboot".into());
    }
    // A leader that exited but whose group lives on cannot be told from a new group
    // that reused the number: left alone. (The leader of a killed run is normally
    // still there: it was waiting on its children, or is a zombie, which keeps its
    // stat line until init reaps it.)
    let Some(leader) = stat(g.pgid) else {
        return Err("it has exited".into());
    };
    if leader.pgrp != g.pgid {
        return Err(format!(
            "pid {} is now another process (in group {})",
            g.pgid, leader.pgrp
        ));
    }
    if leader.start != g.start {
        return Err(format!(
            "pid {} is now another process (started at tick {}, not {})",
            g.pgid, leader.start, g.start
        ));
    }
    Ok(())
}

/// SIGTERM the group, wait up to `grace` for it to go, then SIGKILL and wait again.
fn end_group(pgid: u32, grace: Duration) {
    if !group_alive(pgid) {
        return;
    }
    log::warn!(
        "ending process group {pgid}: a backend left running by a connector that was killed or crashed"
    );
    for sig in [SIGTERM, SIGKILL] {
        if let Err(e) = kill_process_group(pgid, sig) {
            log::warn!("process group {pgid}: {e}");
        }
        let deadline = Instant::now() + grace;
        while group_alive(pgid) {
            if Instant::now() >= deadline {
                break;
            }
            std::thread::sleep(POLL);
        }
        if !group_alive(pgid) {
            return;
        }
    }
    log::warn!("process group {pgid} is still running after SIGKILL");
}

/// Whether any process of group `pgid` still runs (zombies do not count: they are
/// dead and only wait for their parent, init by now, to reap them).
fn group_alive(pgid: u32) -> bool {
    let Ok(entries) = fs::read_dir("/proc") else {
        return false;
    };
    entries.flatten().any(|e| {
        e.file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
            .and_then(stat)
            .is_some_and(|s| s.pgrp == pgid && !matches!(s.state, 'Z' | 'X'))
    })
}

/// The fields of `/proc/<pid>/stat` we need.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Stat {
    state: char,
    pgrp: u32,
    start: u64,
}

/// Read once per backend run: one `read(2)` into a stack buffer normally takes the
/// whole line (a few hundred bytes; the kernel makes it at the first read), where
/// `read_to_string` would also `statx` and read in growing steps (9 syscalls).
fn stat(pid: u32) -> Option<Stat> {
    let mut f = fs::File::open(format!("/proc/{pid}/stat")).ok()?;
    let mut buf = [0u8; 1024];
    let mut len = 0;
    // A whole line ends with '\n'. The fields we need come in its first few hundred
    // bytes, so a line longer than the buffer still parses.
    while len < buf.len() && buf.get(..len).is_some_and(|b| !b.ends_with(b"\n")) {
        match f.read(buf.get_mut(len..)?) {
            Ok(0) => break,
            Ok(n) => len += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return None,
        }
    }
    parse_stat(std::str::from_utf8(buf.get(..len)?).ok()?)
}

/// `pid (comm) state ppid pgrp ...`: the command name may hold spaces and
/// parentheses, so fields are counted after its last `)`.
fn parse_stat(line: &str) -> Option<Stat> {
    let rest = &line[line.rfind(')')? + 1..];
    // `rest` starts at field 3 (state): pgrp is field 5, starttime field 22.
    let mut fields = rest.split_whitespace();
    Some(Stat {
        state: fields.next()?.chars().next()?,
        pgrp: fields.nth(1)?.parse().ok()?,
        start: fields.nth(16)?.parse().ok()?,
    })
}

fn boot_id() -> String {
    fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::CommandExt;
    use std::process::{Child, Command};

    fn tmpdir() -> PathBuf {
        let d = std::env::temp_dir().join(format!("molecule-orphans-{}", crate::uuid::new_v4()));
        crate::state::ensure_dir(&d).unwrap();
        d
    }

    /// A `sleep` in its own process group, killed on drop.
    struct Sleeper(Child);

    impl Sleeper {
        fn start(own_group: bool) -> Sleeper {
            let mut cmd = Command::new("sleep");
            cmd.arg("1000");
            if own_group {
                cmd.process_group(0);
            }
            Sleeper(cmd.spawn().unwrap())
        }
        fn pid(&self) -> u32 {
            self.0.id()
        }
        fn running(&mut self) -> bool {
            self.0.try_wait().unwrap().is_none()
        }
    }

    impl Drop for Sleeper {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    #[test]
    fn parses_stat_lines_with_odd_command_names() {
        let line = "42 (a) b (c)) S 1 40 40 0 -1 4194560 100 0 0 0 0 0 0 0 20 0 1 0 123456 1000 10";
        assert_eq!(
            parse_stat(line),
            Some(Stat {
                state: 'S',
                pgrp: 40,
                start: 123456
            })
        );
        assert_eq!(parse_stat("42 (x) S 1"), None);
    }

    #[test]
    fn stat_reads_the_same_fields_as_the_whole_file() {
        let pid = std::process::id();
        let whole = parse_stat(&fs::read_to_string(format!("/proc/{pid}/stat")).unwrap());
        assert!(whole.is_some());
        assert_eq!(stat(pid), whole);
        // Past the pid space: no such process.
        assert_eq!(stat(u32::MAX), None);
    }

    #[test]
    fn every_write_after_the_first_goes_to_the_open_file() {
        let d = tmpdir();
        let groups = Groups::in_state_dir(&d, "ws");
        let path = running_path(&d, "ws");
        let s = Sleeper::start(true);
        groups.add(s.pid());
        let inode = || std::os::unix::fs::MetadataExt::ino(&fs::metadata(&path).unwrap());
        let first = inode();
        groups.remove(s.pid());
        groups.add(s.pid());
        // Rewritten in place, not replaced by a rename.
        assert_eq!(inode(), first);
        let rec = read_record(&path).unwrap().unwrap();
        assert_eq!(
            rec.groups.iter().map(|g| g.pgid).collect::<Vec<_>>(),
            [s.pid()]
        );
        assert_eq!(rec.boot_id, boot_id());
        groups.remove(s.pid());
        assert_eq!(read_record(&path).unwrap().unwrap().groups, []);
    }

    #[test]
    fn records_while_running_and_forgets_after() {
        let d = tmpdir();
        let groups = Groups::in_state_dir(&d, "ws");
        let path = running_path(&d, "ws");
        let s = Sleeper::start(true);
        groups.add(s.pid());
        groups.add(s.pid());
        let rec = read_record(&path).unwrap().unwrap();
        assert_eq!(rec.groups.len(), 1);
        assert_eq!(rec.groups[0].pgid, s.pid());
        assert_eq!(Some(rec.groups[0].start), stat(s.pid()).map(|s| s.start));
        groups.remove(s.pid());
        assert_eq!(read_record(&path).unwrap().unwrap().groups.len(), 1);
        groups.remove(s.pid());
        assert_eq!(read_record(&path).unwrap().unwrap().groups, []);
        // Rewritten in place, padded: as long as the longest record was.
        let mut other = Sleeper::start(true);
        groups.add(other.pid());
        groups.add(s.pid());
        let longest = fs::metadata(&path).unwrap().len();
        groups.remove(other.pid());
        groups.remove(s.pid());
        assert_eq!(fs::metadata(&path).unwrap().len(), longest);
        assert_eq!(read_record(&path).unwrap().unwrap().groups, []);
        assert!(other.running());
    }

    #[test]
    fn ends_only_groups_that_are_still_ours() {
        let d = tmpdir();
        let boot = boot_id();
        let mut ours = Sleeper::start(true);
        let mut restarted = Sleeper::start(true);
        let mut not_a_leader = Sleeper::start(false);
        let start = |p: u32| stat(p).unwrap().start;
        let record = RecordFile {
            boot_id: boot.clone(),
            groups: vec![
                Recorded {
                    pgid: ours.pid(),
                    start: start(ours.pid()),
                },
                // Same pid, another start time: the pid was handed out again.
                Recorded {
                    pgid: restarted.pid(),
                    start: start(restarted.pid()) + 1,
                },
                // Right start time, but it leads no group of that id.
                Recorded {
                    pgid: not_a_leader.pid(),
                    start: start(not_a_leader.pid()),
                },
            ],
        };
        let path = running_path(&d, "ws");
        fs::write(&path, serde_json::to_vec(&record).unwrap()).unwrap();
        end_leftovers(&d, "ws", Duration::from_secs(5));
        // Reaped by us (its parent); a zombie until then.
        let status = ours.0.wait().unwrap();
        assert!(!status.success());
        assert!(restarted.running() && not_a_leader.running());
        assert!(!path.exists());

        // Another boot: nothing is ours.
        let other = RecordFile {
            boot_id: "another-boot".into(),
            groups: vec![Recorded {
                pgid: restarted.pid(),
                start: start(restarted.pid()),
            }],
        };
        fs::write(&path, serde_json::to_vec(&other).unwrap()).unwrap();
        end_leftovers(&d, "ws", Duration::from_secs(5));
        assert!(restarted.running());
    }

    #[test]
    fn a_planted_or_garbled_record_signals_nothing() {
        let d = tmpdir();
        let path = running_path(&d, "ws");
        fs::write(&path, b"{not json").unwrap();
        end_leftovers(&d, "ws", Duration::from_secs(1));
        assert!(!path.exists());
        let victim = d.join("victim");
        fs::write(&victim, b"{}").unwrap();
        std::os::unix::fs::symlink(&victim, &path).unwrap();
        assert!(read_record(&path).is_err());
    }
}
