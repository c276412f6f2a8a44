//! One `exec` run watched from the calling thread: its input written, its stdout and
//! stderr read, its exit noticed and its time limits kept, all in one `poll(2)` loop.
//! A thread per pipe and a waiter thread would cost three hand-offs per message (on a
//! busy machine each one waits for a core). The exit comes from a pidfd, which leaves
//! the child unreaped, so its process group can still be signalled safely; without
//! pidfds (macOS, an old kernel, a seccomp filter) a helper waits for the exit and
//! closes a pipe. It must not reap the child: [`super::exec`] does that after
//! killing what is left of its group.

use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::process::{ChildStderr, ChildStdin, ChildStdout};
use std::time::{Duration, Instant};

use super::RunHandle;
use super::helpers::HELPERS;
use crate::signal::{
    self, POLLERR, POLLHUP, POLLIN, POLLNVAL, POLLOUT, PollFd, SIGKILL, SIGTERM,
    kill_process_group, wait_exited,
};

/// Read chunk for the output pipes, on the caller's stack: a heap buffer this size is
/// an mmap and munmap per pipe per message.
const CHUNK: usize = 16 * 1024;

/// How a run learns that its command exited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum ExitWatch {
    /// A pidfd, or a helper thread where there is none.
    Pidfd,
    /// Always the helper thread (tests of that path).
    #[cfg_attr(not(test), allow(dead_code))]
    Thread,
}

/// The limits of one run.
#[derive(Debug, Clone, Copy)]
pub(super) struct Limits {
    /// From the start until SIGTERM to the group.
    pub timeout: Duration,
    /// From SIGTERM until SIGKILL.
    pub kill_grace: Duration,
    /// Most stdout kept; more ends the run (SIGKILL through the handle).
    pub max_output: usize,
    /// How much of the end of stderr is kept.
    pub stderr_keep: usize,
    /// After the exit, how long the pipes may stay open before the group is killed.
    pub drain_after_exit: Duration,
    /// After that kill, how long we still wait for the pipes to close.
    pub drain_after_kill: Duration,
    /// How the exit is noticed.
    pub exit_watch: ExitWatch,
}

/// Stdout as read.
#[derive(Debug, Default)]
pub(super) struct Capture {
    pub buf: Vec<u8>,
    /// More than the cap arrived; `buf` is incomplete and must not be used.
    pub overflowed: bool,
}

/// What a run left behind once it exited and its pipes closed (or were given up on).
#[derive(Debug, Default)]
pub(super) struct Collected {
    pub stdout: Capture,
    /// The last `stderr_keep` bytes of stderr.
    pub stderr: Vec<u8>,
    /// It ran past the timeout and was terminated.
    pub timed_out: bool,
    /// A process outside the group still held a pipe when we stopped waiting.
    pub abandoned_pipes: bool,
}

/// Input still to write, on a non-blocking stdin.
pub(super) struct Input {
    pub pipe: ChildStdin,
    pub bytes: Vec<u8>,
    /// How much of `bytes` is written.
    pub written: usize,
}

/// The pipes of a started command.
pub(super) struct Pipes {
    pub stdin: Option<Input>,
    pub stdout: Option<ChildStdout>,
    pub stderr: Option<ChildStderr>,
}

/// Where the loop is, and what happens when its deadline passes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Running: at the deadline (the timeout), SIGTERM.
    Running,
    /// SIGTERM sent: at the deadline (the grace), SIGKILL.
    Terminating,
    /// SIGKILL sent: wait for the exit, no deadline.
    Killed,
    /// Exited: at the deadline, SIGKILL the group (a background process holds a pipe).
    Draining,
    /// Killed while draining: at the deadline, stop waiting for the pipes.
    DrainKilled,
}

/// The fd that turns readable when the command exits.
enum ExitFd {
    Pidfd(OwnedFd),
    /// Its write end is dropped by a helper once the command exited.
    Pipe(io::PipeReader),
}

impl ExitFd {
    fn open(pid: u32, how: ExitWatch) -> io::Result<ExitFd> {
        if how == ExitWatch::Pidfd
            && let Ok(fd) = signal::pidfd_open(pid)
        {
            return Ok(ExitFd::Pidfd(fd));
        }
        let (reader, writer) = io::pipe()?;
        HELPERS.run(move || {
            let _ = wait_exited(pid);
            drop(writer);
        })?;
        Ok(ExitFd::Pipe(reader))
    }

    fn raw(&self) -> RawFd {
        match self {
            ExitFd::Pidfd(fd) => fd.as_raw_fd(),
            ExitFd::Pipe(r) => r.as_raw_fd(),
        }
    }
}

/// Watches the command `pid` (leader of group `pid`) until it has exited and its
/// pipes are closed, keeping `limits`. Errors only when the exit cannot be watched at
/// all (no pidfd and no helper thread) or `poll(2)` fails; the caller then kills and
/// reaps the group.
pub(super) fn watch(
    pid: u32,
    mut pipes: Pipes,
    limits: &Limits,
    handle: &RunHandle,
) -> io::Result<Collected> {
    let mut exit = Some(ExitFd::open(pid, limits.exit_watch)?);
    let mut out = Collected::default();
    let started = Instant::now();
    let end_of_run = started.checked_add(limits.timeout);
    let mut phase = Phase::Running;
    let mut deadline = end_of_run;
    let mut chunk = [0u8; CHUNK];
    loop {
        let pipes_open = pipes.stdin.is_some() || pipes.stdout.is_some() || pipes.stderr.is_some();
        if exit.is_none() && !pipes_open {
            return Ok(out);
        }
        let now = Instant::now();
        if let Some(d) = deadline
            && now >= d
        {
            match phase {
                Phase::Running => {
                    out.timed_out = true;
                    let _ = kill_process_group(pid, SIGTERM);
                    phase = Phase::Terminating;
                    deadline = now.checked_add(limits.kill_grace);
                }
                Phase::Terminating => {
                    let _ = kill_process_group(pid, SIGKILL);
                    phase = Phase::Killed;
                    deadline = None;
                }
                Phase::Draining => {
                    let _ = kill_process_group(pid, SIGKILL);
                    phase = Phase::DrainKilled;
                    deadline = now.checked_add(limits.drain_after_kill);
                }
                Phase::DrainKilled => {
                    out.abandoned_pipes = true;
                    return Ok(out);
                }
                Phase::Killed => deadline = None,
            }
            continue;
        }

        // Fixed slots: stdin, stdout, stderr, exit (-1: not watched, poll skips it).
        let slot = |fd: Option<RawFd>, events: i16| PollFd {
            fd: fd.unwrap_or(-1),
            events,
            revents: 0,
        };
        let mut fds = [
            slot(pipes.stdin.as_ref().map(|i| i.pipe.as_raw_fd()), POLLOUT),
            slot(pipes.stdout.as_ref().map(AsRawFd::as_raw_fd), POLLIN),
            slot(pipes.stderr.as_ref().map(AsRawFd::as_raw_fd), POLLIN),
            slot(exit.as_ref().map(ExitFd::raw), POLLIN),
        ];
        let wait = deadline.map(|d| d.saturating_duration_since(now));
        if signal::wait_ready(&mut fds, wait)? == 0 {
            continue;
        }
        let ready = |i: usize| {
            fds.get(i)
                .is_some_and(|f| f.revents & (POLLIN | POLLOUT | POLLERR | POLLHUP | POLLNVAL) != 0)
        };

        if ready(0) {
            write_some(&mut pipes.stdin);
        }
        if ready(1)
            && let Some(stdout) = &mut pipes.stdout
        {
            match read_some(stdout, &mut chunk) {
                Some(got) => {
                    if out.stdout.buf.len().saturating_add(got.len()) > limits.max_output {
                        // Past max_output the reply is lost anyway: end the command
                        // now instead of letting it run (`yes`) until the timeout.
                        out.stdout = Capture {
                            buf: Vec::new(),
                            overflowed: true,
                        };
                        handle.signal(SIGKILL);
                        pipes.stdout = None;
                    } else {
                        out.stdout.buf.extend_from_slice(got);
                    }
                }
                None => pipes.stdout = None,
            }
        }
        if ready(2)
            && let Some(stderr) = &mut pipes.stderr
        {
            match read_some(stderr, &mut chunk) {
                Some(got) => {
                    out.stderr.extend_from_slice(got);
                    let excess = out.stderr.len().saturating_sub(limits.stderr_keep);
                    out.stderr.drain(..excess);
                }
                None => pipes.stderr = None,
            }
        }
        if ready(3) {
            // Exited (and unreaped). A background process may still hold the pipes:
            // they get what is left of the timeout, at most `drain_after_exit`.
            exit = None;
            let now = Instant::now();
            let left = end_of_run.map_or(limits.drain_after_exit, |e| {
                e.saturating_duration_since(now)
            });
            phase = Phase::Draining;
            deadline = now.checked_add(limits.drain_after_exit.min(left));
        }
    }
}

/// One read from a pipe that polled ready: the bytes, or `None` at its end (or on an
/// error, which ends it too).
fn read_some<'a>(r: &mut impl Read, chunk: &'a mut [u8]) -> Option<&'a [u8]> {
    loop {
        match r.read(chunk) {
            Ok(0) => return None,
            Ok(n) => return chunk.get(..n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            // WouldBlock only after a spurious wake-up: nothing yet.
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Some(&[]),
            Err(_) => return None,
        }
    }
}

/// Writes what the (non-blocking) stdin takes now; closes it when all is written or
/// the command will not read more (`BrokenPipe`).
fn write_some(stdin: &mut Option<Input>) {
    let Some(input) = stdin else { return };
    let done = loop {
        let rest = input.bytes.get(input.written..).unwrap_or_default();
        if rest.is_empty() {
            break true;
        }
        match input.pipe.write(rest) {
            Ok(0) => break true,
            Ok(n) => input.written = input.written.saturating_add(n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break false,
            Err(_) => break true,
        }
    };
    if done {
        *stdin = None;
    }
}
