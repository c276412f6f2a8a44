//! POSIX signals, the crate's only `unsafe`. The handler does the one thing POSIX
//! allows: it `write(2)`s one byte (the signal number) to a self-pipe whose fd sits
//! in an atomic. [`Signals::wait`] blocks on the read end, so the watcher thread acts
//! on signals with ordinary code (locks, logging) outside the handler.
//! Also: sending a signal to a backend's process group, waiting for a backend to
//! exit without reaping it, and what the `exec` backend needs to watch a run's pipes
//! and exit from one thread: `poll(2)`, `O_NONBLOCK`, and a pidfd.
#![allow(unsafe_code)]

use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Mutex;
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::Duration;

type CInt = i32;

/// SIGHUP: re-read the token file.
pub const SIGHUP: CInt = 1;
/// SIGINT: Ctrl-C, a clean stop.
pub const SIGINT: CInt = 2;
/// SIGKILL: the last resort for a backend's process group.
pub const SIGKILL: CInt = 9;
/// SIGTERM: a clean stop.
pub const SIGTERM: CInt = 15;
/// SIG_IGN as the handler value of `signal(2)`.
const SIG_IGN: usize = 1;

/// `waitid(2)` arguments: wait for one pid, for its exit, and leave it unreaped.
#[cfg(any(target_os = "linux", target_os = "android"))]
const P_PID: CInt = 1;
#[cfg(any(target_os = "linux", target_os = "android"))]
const WEXITED: CInt = 4;
#[cfg(any(target_os = "linux", target_os = "android"))]
const WNOWAIT: CInt = 0x0100_0000;
#[cfg(target_vendor = "apple")]
const P_PID: CInt = 1;
#[cfg(target_vendor = "apple")]
const WEXITED: CInt = 4;
#[cfg(target_vendor = "apple")]
const WNOWAIT: CInt = 0x20;
#[cfg(not(any(target_os = "linux", target_os = "android", target_vendor = "apple")))]
compile_error!("waitid(2) constants are only known for Linux and Apple targets");

/// `fcntl(2)` commands and the non-blocking flag.
const F_GETFL: CInt = 3;
const F_SETFL: CInt = 4;
#[cfg(any(target_os = "linux", target_os = "android"))]
const O_NONBLOCK: CInt = 0o4000;
#[cfg(target_vendor = "apple")]
const O_NONBLOCK: CInt = 0x4;
/// `pidfd_open(2)`: the same number on every Linux architecture we build for (the
/// table is shared from 424 on).
#[cfg(any(target_os = "linux", target_os = "android"))]
const SYS_PIDFD_OPEN: std::ffi::c_long = 434;
/// `nfds_t`: `unsigned long` on Linux, `unsigned int` on macOS.
#[cfg(any(target_os = "linux", target_os = "android"))]
type Nfds = std::ffi::c_ulong;
#[cfg(target_vendor = "apple")]
type Nfds = std::ffi::c_uint;

/// `poll(2)` events (the same bits on Linux and macOS): data to read (or end of
/// file), room to write, an error, the other end closed, not an open fd.
pub const POLLIN: i16 = 0x1;
/// See [`POLLIN`].
pub const POLLOUT: i16 = 0x4;
/// See [`POLLIN`].
pub const POLLERR: i16 = 0x8;
/// See [`POLLIN`].
pub const POLLHUP: i16 = 0x10;
/// See [`POLLIN`].
pub const POLLNVAL: i16 = 0x20;

/// `struct pollfd`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct PollFd {
    /// The fd to watch (negative: ignored).
    pub fd: CInt,
    /// What to wait for.
    pub events: i16,
    /// What happened (also POLLERR, POLLHUP, POLLNVAL unasked).
    pub revents: i16,
}

unsafe extern "C" {
    fn signal(signum: CInt, handler: usize) -> usize;
    fn write(fd: CInt, buf: *const u8, count: usize) -> isize;
    fn kill(pid: CInt, sig: CInt) -> CInt;
    fn waitid(idtype: CInt, id: u32, infop: *mut u8, options: CInt) -> CInt;
    fn poll(fds: *mut PollFd, nfds: Nfds, timeout: CInt) -> CInt;
    fn fcntl(fd: CInt, cmd: CInt, ...) -> CInt;
    #[cfg(any(target_os = "linux", target_os = "android"))]
    fn syscall(number: std::ffi::c_long, ...) -> std::ffi::c_long;
}

/// Write end of the self-pipe, read by the handler. -1 until installed.
static PIPE_WRITE_FD: AtomicI32 = AtomicI32::new(-1);
/// Keeps the write end open for the life of the process (and lets us wake the reader).
static PIPE_WRITER: Mutex<Option<io::PipeWriter>> = Mutex::new(None);

extern "C" fn on_signal(sig: CInt) {
    let fd = PIPE_WRITE_FD.load(Ordering::Relaxed);
    if fd >= 0 {
        let byte = u8::try_from(sig).unwrap_or(0);
        // SAFETY: write(2) is async-signal-safe; `byte` lives on this stack frame for
        // the duration of the call; the fd stays open because PIPE_WRITER is never
        // dropped once set. A failed or short write only loses this one signal.
        unsafe {
            write(fd, &byte, 1);
        }
    }
}

/// A signal the watcher reads from the self-pipe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// SIGTERM or SIGINT.
    Stop,
    /// SIGHUP.
    Reload,
    /// Not a signal: [`wake`] was called so the watcher can exit.
    Wake,
}

/// The read end of the self-pipe.
pub struct Signals {
    reader: io::PipeReader,
}

/// Installs handlers for SIGTERM, SIGINT and SIGHUP, and ignores SIGPIPE explicitly
/// (Rust already does; a closed pipe then shows up as `BrokenPipe`).
pub fn install() -> io::Result<Signals> {
    let (reader, writer) = io::pipe()?;
    PIPE_WRITE_FD.store(writer.as_raw_fd(), Ordering::SeqCst);
    *PIPE_WRITER
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(writer);
    let handler = on_signal as extern "C" fn(CInt) as usize;
    for sig in [SIGTERM, SIGINT, SIGHUP] {
        // SAFETY: `on_signal` only calls write(2) on an fd that stays open; installing
        // a handler has no other preconditions.
        unsafe {
            signal(sig, handler);
        }
    }
    // SAFETY: ignoring SIGPIPE has no preconditions.
    unsafe {
        signal(13, SIG_IGN);
    }
    Ok(Signals { reader })
}

impl Signals {
    /// Blocks until a signal (or a [`wake`]) arrives. `None` if the pipe is broken.
    pub fn wait(&mut self) -> Option<Signal> {
        let mut byte = [0u8; 1];
        loop {
            match self.reader.read(&mut byte) {
                Ok(0) => return None,
                Ok(_) => {
                    return Some(match CInt::from(byte[0]) {
                        SIGHUP => Signal::Reload,
                        SIGTERM | SIGINT => Signal::Stop,
                        _ => Signal::Wake,
                    });
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => return None,
            }
        }
    }
}

/// Wakes a watcher blocked in [`Signals::wait`] so its thread can be joined.
pub fn wake() {
    let mut guard = PIPE_WRITER
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some(w) = guard.as_mut() {
        let _ = w.write_all(&[0]);
    }
}

/// Sends `sig` to every process in the process group `pgid` (a backend started with
/// `process_group(0)`, so its pgid is its pid). Errors (e.g. the group is gone) are
/// returned, not raised.
pub fn kill_process_group(pgid: u32, sig: CInt) -> io::Result<()> {
    let pid = CInt::try_from(pgid).map_err(|_| io::Error::other("pid out of range"))?;
    if pid <= 1 {
        // kill(-1) or kill(0) would signal far more than one backend.
        return Err(io::Error::other("refusing to signal process group <= 1"));
    }
    // SAFETY: kill(2) has no memory preconditions; a negative pid targets the group.
    let rc = unsafe { kill(-pid, sig) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Sends `sig` to one process.
pub fn kill_process(pid: u32, sig: CInt) -> io::Result<()> {
    let pid = CInt::try_from(pid).map_err(|_| io::Error::other("pid out of range"))?;
    if pid <= 1 {
        return Err(io::Error::other("refusing to signal pid <= 1"));
    }
    // SAFETY: kill(2) has no memory preconditions.
    let rc = unsafe { kill(pid, sig) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Blocks until our child `pid` has exited, without reaping it. Until `Child::wait`
/// reaps it, the zombie keeps its pid, and so its process group's id, from being
/// handed to another process: its group can still be signalled safely meanwhile.
pub fn wait_exited(pid: u32) -> io::Result<()> {
    // siginfo_t is 128 bytes on Linux (104 on macOS); only waitid writes it.
    let mut info = [0u64; 16];
    loop {
        // SAFETY: `info` is writable, aligned and at least as large as siginfo_t;
        // waitid writes nothing else.
        let rc = unsafe { waitid(P_PID, pid, info.as_mut_ptr().cast(), WEXITED | WNOWAIT) };
        if rc == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Waits until one of `fds` is ready or `timeout` (`None`: no limit) passes; the
/// number of ready fds, 0 on timeout or when a signal interrupted the wait (the
/// caller looks at its clock and calls again).
pub fn wait_ready(fds: &mut [PollFd], timeout: Option<Duration>) -> io::Result<usize> {
    // Rounded up: a wait cut short by rounding down would wake just before the
    // deadline and spin.
    let ms = match timeout {
        None => -1,
        Some(d) => CInt::try_from(d.as_micros().div_ceil(1000)).unwrap_or(CInt::MAX),
    };
    let n = Nfds::try_from(fds.len()).map_err(|_| io::Error::other("too many fds"))?;
    // SAFETY: `fds` is a valid, writable array of `n` pollfd structs (`PollFd` is
    // `repr(C)` with pollfd's layout) for the duration of the call.
    let rc = unsafe { poll(fds.as_mut_ptr(), n, ms) };
    if rc >= 0 {
        return Ok(usize::try_from(rc).unwrap_or(0));
    }
    let e = io::Error::last_os_error();
    if e.kind() == io::ErrorKind::Interrupted {
        Ok(0)
    } else {
        Err(e)
    }
}

/// Makes writes to `fd` return `WouldBlock` instead of waiting (for a pipe end only
/// we hold: the flag belongs to the open file, which the reader does not share).
pub fn set_nonblocking(fd: &impl AsRawFd) -> io::Result<()> {
    let fd = fd.as_raw_fd();
    // SAFETY: fcntl(2) with F_GETFL/F_SETFL reads and sets an fd's status flags; it
    // has no memory preconditions.
    let flags = unsafe { fcntl(fd, F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: as above.
    if unsafe { fcntl(fd, F_SETFL, flags | O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// A pidfd for our child `pid` (Linux 5.3 on): it polls readable once the child has
/// exited, and leaves it unreaped (see [`wait_exited`] for why that matters).
/// `Unsupported` elsewhere; an older kernel or a seccomp filter gives an error too.
pub fn pidfd_open(pid: u32) -> io::Result<OwnedFd> {
    #[cfg(any(target_os = "linux", target_os = "android"))]
    {
        let pid = CInt::try_from(pid).map_err(|_| io::Error::other("pid out of range"))?;
        let flags: CInt = 0;
        // SAFETY: pidfd_open(2) takes a pid and flags (0) and returns a new fd or -1;
        // it has no memory preconditions.
        let rc = unsafe { syscall(SYS_PIDFD_OPEN, pid, flags) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        let fd = CInt::try_from(rc).map_err(|_| io::Error::other("fd out of range"))?;
        // SAFETY: the kernel just gave us this fd, open with O_CLOEXEC, and nothing
        // else owns it.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    }
    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    {
        let _ = pid;
        Err(io::ErrorKind::Unsupported.into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waiting_for_an_exit_leaves_the_child_unreaped() {
        let mut child = std::process::Command::new("sh")
            .args(["-c", "exit 3"])
            .spawn()
            .unwrap();
        wait_exited(child.id()).unwrap();
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", child.id())).unwrap();
        let state = stat.rsplit(") ").next().and_then(|r| r.chars().next());
        assert_eq!(
            state,
            Some('Z'),
            "still a zombie, its pid still taken: {stat}"
        );
        assert_eq!(child.wait().unwrap().code(), Some(3));
    }

    #[test]
    fn a_pidfd_turns_readable_at_the_exit_and_leaves_the_child_unreaped() {
        let mut child = std::process::Command::new("sh")
            .args(["-c", "read x; exit 4"])
            .stdin(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let pidfd = pidfd_open(child.id()).unwrap();
        let mut fds = [PollFd {
            fd: pidfd.as_raw_fd(),
            events: POLLIN,
            revents: 0,
        }];
        // Still running: nothing to see.
        assert_eq!(wait_ready(&mut fds, Some(Duration::ZERO)).unwrap(), 0);
        drop(child.stdin.take());
        assert_eq!(wait_ready(&mut fds, None).unwrap(), 1);
        assert_ne!(fds[0].revents & POLLIN, 0);
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", child.id())).unwrap();
        assert_eq!(
            stat.rsplit(") ").next().and_then(|r| r.chars().next()),
            Some('Z')
        );
        assert_eq!(child.wait().unwrap().code(), Some(4));
    }

    #[test]
    fn a_nonblocking_pipe_says_would_block_when_full() {
        let (mut reader, mut writer) = io::pipe().unwrap();
        set_nonblocking(&writer).unwrap();
        let chunk = [0u8; 4096];
        let mut total = 0usize;
        let err = loop {
            match writer.write(&chunk) {
                Ok(n) => total += n,
                Err(e) => break e,
            }
            assert!(total < 64 << 20, "a pipe never filled");
        };
        assert_eq!(err.kind(), io::ErrorKind::WouldBlock);
        let mut fds = [PollFd {
            fd: writer.as_raw_fd(),
            events: POLLOUT,
            revents: 0,
        }];
        assert_eq!(wait_ready(&mut fds, Some(Duration::ZERO)).unwrap(), 0);
        let mut buf = vec![0u8; total];
        reader.read_exact(&mut buf).unwrap();
        assert_eq!(
            wait_ready(&mut fds, Some(Duration::from_secs(10))).unwrap(),
            1
        );
        assert_ne!(fds[0].revents & POLLOUT, 0);
    }
}
