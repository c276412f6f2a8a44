//! The `exec` and `claude-code` backends: run one `/bin/sh -c` command per message in
//! its own process group, feed it the message, read its capped output and map its exit
//! status; `watch` does the waiting, in one `poll(2)` loop on the calling thread. It
//! must not leave processes behind, check for the exit in a loop (`try_wait`) or
//! sleep, read the environment (except `PATH`, once when built and in `check`), or
//! log environment values or message text.

use std::collections::BTreeMap;
use std::io::{self, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use serde::Serialize;
use serde_json::Value;

use super::parts::a2a_part;
use super::watch::{Capture, ExitWatch, Input, Limits, Pipes, watch};
use super::{
    Backend, BackendError, EXIT_NO_REPLY, EXIT_RETRY_LATER, Outcome, Reply, Request, RunHandle,
};
use crate::signal::{self, SIGKILL, kill_process_group};

/// The shell every command runs under.
const SHELL: &str = "/bin/sh";
/// Options of `exec`, for error messages.
const EXEC_KEYS: &str = "cmd, timeout, max_output, format, pass_meta, kill_grace";
/// Options of `claude-code`, for error messages.
const CLAUDE_KEYS: &str = "bin, args, timeout, max_output, format, pass_meta, kill_grace";
/// Default `max_output`: 1 MiB.
const DEFAULT_MAX_OUTPUT: usize = 1 << 20;
/// Default `kill_grace`: time between SIGTERM and SIGKILL of the group.
const DEFAULT_KILL_GRACE: Duration = Duration::from_secs(2);
/// How much stderr we keep while the command runs (the tail only).
const STDERR_KEEP: usize = 2048;
/// How much of that tail goes into error messages.
const STDERR_SHOW: usize = 1024;
/// After the command exits, how long a background process may keep our pipes open
/// before we kill its group: long enough to drain what the command itself wrote.
const DRAIN_AFTER_EXIT: Duration = Duration::from_millis(200);
/// After that kill, how long we wait for the pipes to close. Only a process that left
/// the group (setsid) can outlast it; we then stop waiting and close our ends.
const DRAIN_AFTER_KILL: Duration = Duration::from_secs(1);
/// Input up to this size is written at once: no pipe is smaller (PIPE_BUF, one
/// page), so the write cannot block. Larger input is written as the pipe takes it.
const INLINE_INPUT: usize = 4096;
/// First words that are shell syntax or builtins: `check` can't resolve them on PATH.
const SHELL_WORDS: &[&str] = &[
    "!", ".", ":", "[", "[[", "{", "}", "alias", "bg", "break", "case", "cd", "command",
    "continue", "do", "done", "echo", "elif", "else", "esac", "eval", "exec", "exit", "export",
    "false", "fg", "fi", "for", "function", "getopts", "hash", "if", "jobs", "kill", "local",
    "printf", "pwd", "read", "readonly", "return", "select", "set", "shift", "test", "then",
    "time", "times", "trap", "true", "type", "ulimit", "umask", "unalias", "unset", "until",
    "wait", "while",
];

/// How the message goes in and the reply comes out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    /// Message text on stdin, reply text on stdout.
    Text,
    /// One JSON object each way.
    Json,
}

/// Options shared by `exec` and `claude-code`.
#[derive(Debug, Clone)]
struct Settings {
    timeout: Duration,
    max_output: usize,
    format: Format,
    pass_meta: bool,
    kill_grace: Duration,
}

impl Settings {
    fn new(timeout: Duration, pass_meta: bool) -> Self {
        Self {
            timeout,
            max_output: DEFAULT_MAX_OUTPUT,
            format: Format::Text,
            pass_meta,
            kill_grace: DEFAULT_KILL_GRACE,
        }
    }

    /// Applies one shared option. `Ok(false)` means the key is not a shared option.
    fn apply(&mut self, backend: &str, key: &str, value: &str) -> Result<bool, BackendError> {
        let bad = |why: String| BackendError::Config(format!("{backend}: bad {key}: {why}"));
        match key {
            "timeout" => {
                let d = crate::duration::parse(value).map_err(bad)?;
                if d.is_zero() {
                    return Err(bad(format!("{value:?} must be greater than zero")));
                }
                self.timeout = d;
            }
            "kill_grace" => self.kill_grace = crate::duration::parse(value).map_err(bad)?,
            "max_output" => {
                self.max_output = match value.trim().parse::<usize>() {
                    Ok(n) if n > 0 => n,
                    _ => return Err(bad(format!("{value:?} (want a number of bytes > 0)"))),
                }
            }
            "format" => {
                self.format = match value {
                    "text" => Format::Text,
                    "json" => Format::Json,
                    _ => return Err(bad(format!("{value:?} (want text or json)"))),
                }
            }
            "pass_meta" => {
                self.pass_meta = match value {
                    "true" => true,
                    "false" => false,
                    _ => return Err(bad(format!("{value:?} (want true or false)"))),
                }
            }
            _ => return Ok(false),
        }
        Ok(true)
    }
}

fn unknown_option(backend: &str, key: &str, known: &str) -> BackendError {
    BackendError::Config(format!(
        "{backend}: unknown option {key:?} (known: {known})"
    ))
}

/// Runs a shell command per message (`exec`), or `claude -p` (`claude-code`).
#[derive(Debug, Clone)]
pub struct ExecBackend {
    name: &'static str,
    cmd: String,
    /// The program `check` should find: `bin` for claude-code, else the first word of `cmd`.
    program: Option<String>,
    /// `cmd` as words with the program found on PATH once, when it needs no shell.
    argv: Option<Vec<String>>,
    settings: Settings,
    /// How a run notices its command's exit (tests also take the fallback).
    exit_watch: ExitWatch,
}

impl ExecBackend {
    /// Builds the `exec` backend from `--backend-opt` pairs; `cmd` is required.
    pub fn from_opts(opts: &BTreeMap<String, String>) -> Result<Self, BackendError> {
        let name = "exec";
        let mut settings = Settings::new(Duration::from_secs(60), false);
        let mut cmd = None;
        for (key, value) in opts {
            match key.as_str() {
                "cmd" => cmd = Some(value.clone()),
                k if settings.apply(name, k, value)? => {}
                k => return Err(unknown_option(name, k, EXEC_KEYS)),
            }
        }
        let cmd = match cmd {
            Some(c) if !c.trim().is_empty() => c,
            Some(_) => return Err(BackendError::Config("exec: cmd is empty".into())),
            None => {
                return Err(BackendError::Config(
                    "exec: missing option \"cmd\" (e.g. --backend-opt cmd='./agent.sh')".into(),
                ));
            }
        };
        let program = checkable_first_word(&cmd);
        Ok(Self {
            name,
            argv: direct_argv(&cmd),
            cmd,
            program,
            settings,
            exit_watch: ExitWatch::Pidfd,
        })
    }

    /// Builds the `claude-code` preset: `<bin> -p [args]`, timeout 5m, meta on.
    pub fn claude_code(opts: &BTreeMap<String, String>) -> Result<Self, BackendError> {
        let name = "claude-code";
        let mut settings = Settings::new(Duration::from_secs(300), true);
        let mut bin = "claude".to_string();
        let mut args = String::new();
        for (key, value) in opts {
            match key.as_str() {
                "bin" => bin.clone_from(value),
                "args" => args.clone_from(value),
                k if settings.apply(name, k, value)? => {}
                k => return Err(unknown_option(name, k, CLAUDE_KEYS)),
            }
        }
        if bin.trim().is_empty() {
            return Err(BackendError::Config("claude-code: bin is empty".into()));
        }
        // `bin` is a program path, so it is quoted; `args` is shell text on purpose
        // (`--model x --allowedTools "Bash(git:*)"`).
        let mut cmd = format!("{} -p", shell_quote(&bin));
        let args = args.trim();
        if !args.is_empty() {
            cmd.push(' ');
            cmd.push_str(args);
        }
        Ok(Self {
            name,
            argv: direct_argv(&cmd),
            cmd,
            program: Some(bin),
            settings,
            exit_watch: ExitWatch::Pidfd,
        })
    }

    /// The command with our environment and pipes, not yet started (see
    /// [`shell_command`]).
    fn command(&self, req: &Request) -> Command {
        let mut c = command_for(self.argv.as_deref(), &self.cmd);
        c
            // Own group (pgid = pid): a timeout or cancel can kill the whole tree.
            .process_group(0)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        remove_supervisor_env(&mut c);
        // Values come from the platform: a NUL byte cannot go into the environment
        // (the spawn would fail), so it is dropped rather than failing the message.
        let opt = |o: &Option<String>| env_safe(o.as_deref().unwrap_or_default());
        c.env("MOLECULE_WORKSPACE_ID", &req.workspace_id)
            .env("MOLECULE_API_URL", &req.api_url)
            .env("MOLECULE_CALLER_ID", opt(&req.caller_id))
            .env("MOLECULE_CALLER_NAME", opt(&req.caller_name))
            .env("MOLECULE_CALLER_ROLE", opt(&req.caller_role))
            .env("MOLECULE_ORIGIN", req.origin.as_str())
            .env("MOLECULE_MESSAGE_ID", opt(&req.message_id))
            .env("MOLECULE_ACTIVITY_ID", env_safe(&req.activity_id))
            .env("MOLECULE_CONTEXT_ID", opt(&req.context_id))
            .env("MOLECULE_ATTEMPT", req.attempt.to_string())
            .env(
                "MOLECULE_ATTACHMENTS",
                serde_json::Value::from(req.attachments.clone()).to_string(),
            );
        if let Some(rid) = &req.request_id {
            c.env("MOLECULE_REQUEST_ID", env_safe(rid));
        }
        if self.settings.pass_meta {
            c.env("MOLECULE_TASK_ID", opt(&req.task_id))
                .env("MOLECULE_METHOD", env_safe(&req.method));
        }
        for (k, v) in &req.extra_env {
            if !k.is_empty() && !k.contains(['\0', '=']) {
                c.env(k, env_safe(v));
            }
        }
        c
    }

    /// What the command reads on stdin.
    fn input(&self, req: &Request) -> Vec<u8> {
        match self.settings.format {
            Format::Text => req.text.as_bytes().to_vec(),
            Format::Json => {
                let mut bytes = Vec::with_capacity(512 + req.text.len());
                RequestJson::new(req).write_to(&mut bytes);
                bytes.push(b'\n');
                bytes
            }
        }
    }

    /// Starts the command and collects its result; `guard` cleans up on every path.
    fn run(&self, req: &Request, guard: &mut GroupGuard<'_>) -> Result<Outcome, BackendError> {
        let input = self.input(req);
        let child = self.command(req).spawn().map_err(|e| {
            let program = self
                .argv
                .as_deref()
                .and_then(<[String]>::first)
                .map_or(SHELL, String::as_str);
            BackendError::Spawn(format!("{program}: {e}"))
        })?;
        let pgid = child.id();
        let child = guard.child.insert(child);
        let (stdin, stdout, stderr) =
            (child.stdin.take(), child.stdout.take(), child.stderr.take());
        if !guard.handle.started(pgid) {
            // Cancelled before we got here: nothing may run (the guard kills it).
            return Err(BackendError::Cancelled);
        }

        let stdin = match stdin {
            // Fits an empty pipe of any size: this write cannot block. BrokenPipe (the
            // command didn't read it) is fine.
            Some(mut pipe) if input.len() <= INLINE_INPUT => {
                let _ = pipe.write_all(&input);
                None
            }
            Some(pipe) => {
                // A command that never reads stdin must not block us: the rest is
                // written as the pipe takes it, between reads of its output.
                signal::set_nonblocking(&pipe).map_err(|e| {
                    BackendError::Spawn(format!("cannot set up the command's stdin: {e}"))
                })?;
                Some(Input {
                    pipe,
                    bytes: input,
                    written: 0,
                })
            }
            None => None,
        };
        let pipes = Pipes {
            stdin,
            stdout,
            stderr,
        };
        let got = watch(pgid, pipes, &self.limits(), guard.handle)
            .map_err(|e| BackendError::Spawn(format!("cannot watch the command: {e}")))?;
        if got.abandoned_pipes {
            log::warn!(
                "{}: a process outside the command's group still holds its pipes; not waiting for it",
                self.name
            );
        }
        // Exited: kill what is left of its group, then reap it.
        let status = guard.end();
        let stdout = got.stdout;
        let stderr_tail = tail_text(&got.stderr);
        let timed_out = got.timed_out;

        if guard.handle.is_cancelled() {
            return Err(BackendError::Cancelled);
        }
        if stdout.overflowed {
            return Err(BackendError::BadOutput(format!(
                "output too large: more than max_output {} bytes",
                self.settings.max_output
            )));
        }
        if timed_out {
            return Err(BackendError::Timeout {
                after: self.settings.timeout,
                stderr_tail,
            });
        }
        let status = match status {
            Some(Ok(s)) => s,
            Some(Err(e)) => {
                return Err(BackendError::Spawn(format!("waiting for the command: {e}")));
            }
            None => return Err(BackendError::Spawn("lost track of the command".into())),
        };
        match status.code() {
            Some(0) => self.parse_output(stdout),
            Some(EXIT_NO_REPLY) => Ok(Outcome::NoReply),
            Some(EXIT_RETRY_LATER) => Err(BackendError::RetryLater { stderr_tail }),
            code => Err(BackendError::Failed { code, stderr_tail }),
        }
    }

    fn limits(&self) -> Limits {
        Limits {
            timeout: self.settings.timeout,
            kill_grace: self.settings.kill_grace,
            max_output: self.settings.max_output,
            stderr_keep: STDERR_KEEP,
            drain_after_exit: DRAIN_AFTER_EXIT,
            drain_after_kill: DRAIN_AFTER_KILL,
            exit_watch: self.exit_watch,
        }
    }

    /// Turns the stdout of a successful run into an outcome.
    fn parse_output(&self, out: Capture) -> Result<Outcome, BackendError> {
        if out.overflowed {
            return Err(BackendError::BadOutput(format!(
                "reply exceeds max_output {} bytes",
                self.settings.max_output
            )));
        }
        let text = String::from_utf8(out.buf)
            .map_err(|_| BackendError::BadOutput("reply is not valid UTF-8".into()))?;
        if text.trim().is_empty() {
            return Ok(Outcome::NoReply);
        }
        match self.settings.format {
            Format::Text => {
                let text = text
                    .strip_suffix('\n')
                    .map_or(text.as_str(), |t| t.strip_suffix('\r').unwrap_or(t));
                Ok(Outcome::Reply(Reply {
                    text: text.to_string(),
                    parts: vec![],
                }))
            }
            Format::Json => parse_json_reply(&text),
        }
    }
}

impl Backend for ExecBackend {
    fn name(&self) -> &str {
        self.name
    }

    fn handle(&self, req: &Request, handle: &RunHandle) -> Result<Outcome, BackendError> {
        let mut guard = GroupGuard {
            child: None,
            handle,
        };
        self.run(req, &mut guard)
    }

    fn check(&self) -> Result<String, BackendError> {
        let name = self.name;
        if !is_executable(Path::new(SHELL)) {
            return Err(BackendError::Config(format!("{name}: {SHELL} not found")));
        }
        if let Some(program) = &self.program {
            if program.contains('/') {
                if !is_executable(Path::new(program)) {
                    return Err(BackendError::Config(format!(
                        "{name}: command {program:?} is not an executable file"
                    )));
                }
            } else if !on_path(program) {
                return Err(BackendError::Config(format!(
                    "{name}: command {program:?} not found on PATH"
                )));
            }
        }
        let how = match plain_argv(&self.cmd) {
            Some(_) => format!("{} (started directly, no shell)", self.cmd),
            None => format!("{SHELL} -c '{}'", self.cmd),
        };
        Ok(format!(
            "{name}: {how} (timeout {})",
            crate::duration::format(self.settings.timeout)
        ))
    }
}

/// Owns the started command and ends its group on every return path of a run
/// (including early errors), in the one safe order: see [`end_group`].
struct GroupGuard<'a> {
    child: Option<Child>,
    handle: &'a RunHandle,
}

impl GroupGuard<'_> {
    /// Ends the group and reaps the command; `None` if none was started (or it was
    /// reaped already).
    fn end(&mut self) -> Option<io::Result<ExitStatus>> {
        let mut child = self.child.take()?;
        // A background process the command left behind must not outlive the run.
        // ESRCH (nobody left) is the normal case.
        Some(end_group(&mut child, self.handle, |pgid| {
            let _ = kill_process_group(pgid, SIGKILL);
        }))
    }
}

impl Drop for GroupGuard<'_> {
    fn drop(&mut self) {
        self.end();
    }
}

/// Kills what is left of `child`'s group with `kill`, makes the handle forget the
/// group (so a cancel cannot signal it either), and only then reaps the leader: until
/// it is reaped, its pid (the pgid) cannot be handed to an unrelated process group,
/// so nothing signals the group once that could happen.
fn end_group(
    child: &mut Child,
    handle: &RunHandle,
    kill: impl FnOnce(u32),
) -> io::Result<ExitStatus> {
    kill(child.id());
    handle.finished();
    child.wait()
}

/// `s` without NUL bytes, which an environment value cannot hold.
fn env_safe(s: &str) -> String {
    s.replace('\0', "")
}

/// The last ~1 KiB of stderr as trimmed text for error messages.
pub(super) fn tail_text(buf: &[u8]) -> String {
    let start = buf.len().saturating_sub(STDERR_SHOW);
    let mut tail = buf.get(start..).unwrap_or_default();
    if start > 0 {
        // Don't start with the remains of a character we cut in half.
        while let Some((b, rest)) = tail.split_first() {
            if b & 0xC0 != 0x80 {
                break;
            }
            tail = rest;
        }
    }
    String::from_utf8_lossy(tail).trim().to_string()
}

/// Parses a `format=json` reply: `{"text": …, "parts": [...]}` or `{"no_reply": true}`.
fn parse_json_reply(out: &str) -> Result<Outcome, BackendError> {
    let bad = |m: &str| BackendError::BadOutput(format!("json reply: {m}"));
    let v: Value = serde_json::from_str(out).map_err(|e| bad(&e.to_string()))?;
    let Value::Object(obj) = v else {
        return Err(bad("not a JSON object"));
    };
    reply_from_object(obj)
}

/// A JSON reply object: `{"text": …, "parts": [...]}` or `{"no_reply": true}`. Shared
/// with the worker backend, whose answers are the same objects plus an `id`.
pub(super) fn reply_from_object(
    mut obj: serde_json::Map<String, Value>,
) -> Result<Outcome, BackendError> {
    let bad = |m: &str| BackendError::BadOutput(format!("json reply: {m}"));
    if obj.get("no_reply") == Some(&Value::Bool(true)) {
        return Ok(Outcome::NoReply);
    }
    let text = match obj.remove("text") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s),
        Some(_) => return Err(bad("\"text\" is not a string")),
    };
    let parts = match obj.remove("parts") {
        None | Some(Value::Null) => None,
        Some(Value::Array(a)) => Some(a),
        Some(_) => return Err(bad("\"parts\" is not an array")),
    };
    if text.is_none() && parts.is_none() {
        return Err(bad("neither \"text\" nor \"parts\""));
    }
    let parts = parts
        .unwrap_or_default()
        .into_iter()
        .enumerate()
        .map(|(i, p)| a2a_part(p).map_err(|why| bad(&format!("part {}: {why}", i + 1))))
        .collect::<Result<Vec<_>, _>>()?;
    let text = text.unwrap_or_default();
    if text.trim().is_empty() && parts.is_empty() {
        return Ok(Outcome::NoReply);
    }
    Ok(Outcome::Reply(Reply { text, parts }))
}

/// The whole request as one JSON object: the `format=json` input of `exec`, and the
/// body of a `worker` request line (which adds `env`). Written straight from the
/// request, in the field order (sorted) serde_json gives an object's keys: building a
/// JSON tree first would copy the whole envelope (`raw`).
#[derive(Serialize)]
pub(super) struct RequestJson<'a> {
    activity_id: &'a str,
    attachments: &'a [Value],
    attempt: u32,
    caller_id: &'a Option<String>,
    caller_name: &'a Option<String>,
    caller_role: &'a Option<String>,
    context_id: &'a Option<String>,
    /// A worker's extra environment; `exec` sets it as variables instead.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) env: Option<&'a BTreeMap<String, String>>,
    message_id: &'a Option<String>,
    method: &'a str,
    origin: &'a str,
    parts: &'a [Value],
    request: &'a Value,
    request_id: &'a Option<String>,
    task_id: &'a Option<String>,
    text: &'a str,
    workspace_id: &'a str,
}

impl<'a> RequestJson<'a> {
    /// `req`'s object, without `env`.
    pub(super) fn new(req: &'a Request) -> Self {
        RequestJson {
            activity_id: &req.activity_id,
            attachments: &req.attachments,
            attempt: req.attempt,
            caller_id: &req.caller_id,
            caller_name: &req.caller_name,
            caller_role: &req.caller_role,
            context_id: &req.context_id,
            env: None,
            message_id: &req.message_id,
            method: &req.method,
            origin: req.origin.as_str(),
            parts: &req.other_parts,
            request: &req.raw,
            request_id: &req.request_id,
            task_id: &req.task_id,
            text: &req.text,
            workspace_id: &req.workspace_id,
        }
    }

    /// Appends the object's JSON to `out`.
    pub(super) fn write_to(&self, out: &mut Vec<u8>) {
        // Strings, numbers and `Value`s into a Vec: serializing cannot fail.
        let _ = serde_json::to_writer(out, self);
    }
}

/// The supervisor's notify socket and watchdog are the connector's: an agent that
/// ran systemd-notify would speak for it. Every agent process (`exec` runs, `worker`
/// processes) starts without them.
pub(super) fn remove_supervisor_env(c: &mut Command) {
    for var in ["NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"] {
        c.env_remove(var);
    }
}

/// `cmd` started directly when it is a plain command (words only: no quoting,
/// expansion, redirection or builtin), as `sh -c` would end up doing: that saves a
/// shell per message (about 1 ms, measured). Anything else goes through `/bin/sh -c`.
pub(super) fn shell_command(cmd: &str) -> Command {
    command_for(direct_argv(cmd).as_deref(), cmd)
}

fn command_for(argv: Option<&[String]>, cmd: &str) -> Command {
    match argv {
        Some([program, args @ ..]) => {
            let mut c = Command::new(program);
            c.args(args);
            c
        }
        _ => {
            let mut c = Command::new(SHELL);
            c.arg("-c").arg(cmd);
            c
        }
    }
}

/// [`plain_argv`] with the program looked up on PATH now, once: a bare name would be
/// searched again at every spawn (an `execve` attempt per PATH entry). Not found, it
/// stays a bare name and the spawn reports it.
fn direct_argv(cmd: &str) -> Option<Vec<String>> {
    let mut argv = plain_argv(cmd)?;
    if let Some(first) = argv.first_mut()
        && !first.contains('/')
        && let Some(found) = find_on_path(first)
    {
        *first = found;
    }
    Some(argv)
}

/// Quotes `s` for the shell unless it is plainly safe.
fn shell_quote(s: &str) -> String {
    if s.chars()
        .all(|c| c.is_ascii_alphanumeric() || "_-./+:@%,".contains(c))
    {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

/// `cmd` split into words when the shell would do nothing but split it: only
/// letters, digits and `-_./:,+@%=` (no `=` in the first word: an assignment), and a
/// first word that is not a builtin or keyword.
fn plain_argv(cmd: &str) -> Option<Vec<String>> {
    let plain = |c: char| c.is_ascii_alphanumeric() || " \t-_./:,+@%=".contains(c);
    if !cmd.chars().all(plain) {
        return None;
    }
    let argv: Vec<String> = cmd.split_whitespace().map(str::to_string).collect();
    let first = argv.first()?;
    if SHELL_WORDS.contains(&first.as_str()) || first.contains('=') {
        return None;
    }
    Some(argv)
}

/// The first word of `cmd` if `check` can look it up: not a builtin or keyword, no
/// expansion, quoting, redirection or assignment that only the shell can resolve.
fn checkable_first_word(cmd: &str) -> Option<String> {
    let word = cmd.split_whitespace().next()?;
    let shell_syntax = |c: char| "$'\"\\`()<>;&|=*?[]{}~#!".contains(c);
    if SHELL_WORDS.contains(&word) || word.contains(shell_syntax) {
        return None;
    }
    Some(word.to_string())
}

fn is_executable(p: &Path) -> bool {
    p.metadata()
        .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

fn on_path(program: &str) -> bool {
    find_on_path(program).is_some()
}

/// The first executable `program` on PATH, as `sh` would find it. The one environment
/// read of this module.
fn find_on_path(program: &str) -> Option<String> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|p| is_executable(p))
        .and_then(|p| p.into_os_string().into_string().ok())
}

/// The request object as a JSON tree, field by field: what [`RequestJson`] must write.
#[cfg(test)]
pub(super) fn request_tree(req: &Request) -> Value {
    serde_json::json!({
        "text": req.text,
        "parts": req.other_parts,
        "caller_id": req.caller_id,
        "caller_name": req.caller_name,
        "caller_role": req.caller_role,
        "origin": req.origin.as_str(),
        "message_id": req.message_id,
        "activity_id": req.activity_id,
        "context_id": req.context_id,
        "task_id": req.task_id,
        "method": req.method,
        "attempt": req.attempt,
        "workspace_id": req.workspace_id,
        "attachments": req.attachments,
        "request_id": req.request_id,
        "request": req.raw,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::Origin;
    use crate::signal::{SIGTERM, wait_exited};
    use serde_json::json;
    use std::path::PathBuf;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::thread;
    use std::time::Instant;

    fn opts(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn exec(pairs: &[(&str, &str)]) -> ExecBackend {
        ExecBackend::from_opts(&opts(pairs)).unwrap()
    }

    fn req(text: &str) -> Request {
        Request {
            workspace_id: "ws-1".into(),
            api_url: "http://127.0.0.1:1".into(),
            text: text.into(),
            other_parts: vec![],
            caller_id: None,
            caller_name: Some("Ada".into()),
            caller_role: None,
            message_id: Some("m-1".into()),
            activity_id: "act-1".into(),
            context_id: None,
            task_id: Some("t-1".into()),
            method: "message/send".into(),
            origin: Origin::Canvas,
            attempt: 2,
            raw: json!({"id": 7}),
            extra_env: BTreeMap::new(),
            attachments: vec![json!({"uri": "platform-pending:w/f", "name": "a.txt"})],
            request_id: None,
        }
    }

    #[test]
    fn the_json_input_is_the_request_tree() {
        let b = exec(&[("cmd", "cat"), ("format", "json")]);
        let mut r = req("hi \"there\"\n\u{e9}");
        let tree = |r: &Request| format!("{}\n", request_tree(r)).into_bytes();
        assert_eq!(b.input(&r), tree(&r));
        r.caller_id = Some("peer-1".into());
        r.context_id = Some("ctx".into());
        r.request_id = Some("req-1".into());
        r.origin = Origin::Peer;
        r.raw = json!({"b": [1, 2.5, null], "a": {"z": "</x>\t"}});
        r.other_parts = vec![json!({"kind": "data", "data": {"k": 1}})];
        // A worker's environment goes to `exec` as variables, not in the object.
        r.extra_env
            .insert("MOLECULE_DELEGATION_ID".into(), "d-1".into());
        assert_eq!(b.input(&r), tree(&r));
    }

    fn run(b: &ExecBackend, text: &str) -> Result<Outcome, BackendError> {
        b.handle(&req(text), &RunHandle::new())
    }

    fn reply_text(r: Result<Outcome, BackendError>) -> String {
        match r {
            Ok(Outcome::Reply(r)) => r.text,
            other => panic!("expected a reply, got {other:?}"),
        }
    }

    fn config_err(r: Result<ExecBackend, BackendError>) -> String {
        match r {
            Err(BackendError::Config(m)) => m,
            other => panic!("expected a config error, got {other:?}"),
        }
    }

    /// A fresh directory per test, removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new() -> Self {
            static N: AtomicU32 = AtomicU32::new(0);
            let p = std::env::temp_dir().join(format!(
                "molecule-exec-test-{}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ));
            std::fs::create_dir_all(&p).unwrap();
            Self(p)
        }
        fn file(&self, name: &str) -> String {
            self.0.join(name).to_str().unwrap().to_string()
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn read_pid(path: &str) -> u32 {
        std::fs::read_to_string(path)
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    }

    /// The state letter of `pid` in `/proc` (`Z` for a zombie); `None` once reaped.
    fn proc_state(pid: u32) -> Option<char> {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|s| s.rsplit(") ").next().and_then(|r| r.chars().next()))
    }

    /// True once `pid` is dead: gone, or a zombie waiting for a reaper (PID 1 here
    /// may not reap). Polling is fine in tests; the deadline is a failure bound.
    fn gone(pid: u32) -> bool {
        let deadline = Instant::now() + Duration::from_secs(2);
        loop {
            let state = proc_state(pid);
            if matches!(state, None | Some('Z' | 'X')) {
                return true;
            }
            if Instant::now() > deadline {
                return false;
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    #[test]
    fn plain_commands_skip_the_shell() {
        assert_eq!(plain_argv("cat"), Some(vec!["cat".to_string()]));
        assert_eq!(
            plain_argv("python3 agent.py --mode=fast"),
            Some(vec![
                "python3".into(),
                "agent.py".into(),
                "--mode=fast".into()
            ])
        );
        for shell_only in [
            "exit 3",
            "echo hi",
            "cat | tr a b",
            "x=$(cat)",
            "FOO=1 cat",
            "cat > f",
            "a; b",
            "printf '%s'",
            "~/bin/agent",
            "cat *",
            "",
            "   ",
        ] {
            assert_eq!(plain_argv(shell_only), None, "{shell_only}");
        }
    }

    #[test]
    fn options_defaults_and_errors() {
        let b = exec(&[("cmd", "cat")]);
        assert_eq!(b.name(), "exec");
        assert_eq!(b.settings.timeout, Duration::from_secs(60));
        assert_eq!(b.settings.max_output, 1_048_576);
        assert_eq!(b.settings.format, Format::Text);
        assert!(!b.settings.pass_meta);
        assert_eq!(b.settings.kill_grace, Duration::from_secs(2));

        let b = exec(&[
            ("cmd", "cat"),
            ("timeout", "1m30s"),
            ("max_output", "10"),
            ("format", "json"),
            ("pass_meta", "true"),
            ("kill_grace", "0"),
        ]);
        assert_eq!(b.settings.timeout, Duration::from_secs(90));
        assert_eq!(b.settings.max_output, 10);
        assert_eq!(b.settings.format, Format::Json);
        assert!(b.settings.pass_meta);
        assert_eq!(b.settings.kill_grace, Duration::ZERO);

        let m = config_err(ExecBackend::from_opts(&opts(&[
            ("cmd", "x"),
            ("bogus", "1"),
        ])));
        assert!(m.contains("unknown option \"bogus\""), "{m}");
        assert!(m.contains("cmd, timeout, max_output"), "{m}");
        let m = config_err(ExecBackend::from_opts(&opts(&[
            ("cmd", "x"),
            ("timeout", "soon"),
        ])));
        assert!(m.contains("timeout") && m.contains("soon"), "{m}");
        let m = config_err(ExecBackend::from_opts(&opts(&[
            ("cmd", "x"),
            ("timeout", "0s"),
        ])));
        assert!(m.contains("greater than zero"), "{m}");
        for (k, v) in [
            ("max_output", "0"),
            ("max_output", "1MB"),
            ("format", "xml"),
            ("pass_meta", "yes"),
            ("kill_grace", "-1"),
        ] {
            let m = config_err(ExecBackend::from_opts(&opts(&[("cmd", "x"), (k, v)])));
            assert!(m.contains(k) && m.contains(v), "{m}");
        }
        let m = config_err(ExecBackend::from_opts(&opts(&[])));
        assert!(m.contains("cmd"), "{m}");
        let m = config_err(ExecBackend::from_opts(&opts(&[("cmd", "  ")])));
        assert!(m.contains("cmd"), "{m}");
    }

    #[test]
    fn claude_code_preset() {
        let b = ExecBackend::claude_code(&opts(&[("args", "--x")])).unwrap();
        assert_eq!(b.name(), "claude-code");
        assert_eq!(b.cmd, "claude -p --x");
        assert_eq!(b.settings.timeout, Duration::from_secs(300));
        assert!(b.settings.pass_meta);

        let b = ExecBackend::claude_code(&opts(&[("bin", "/opt/my claude")])).unwrap();
        assert_eq!(b.cmd, "'/opt/my claude' -p");
        let b =
            ExecBackend::claude_code(&opts(&[("pass_meta", "false"), ("timeout", "1s")])).unwrap();
        assert!(!b.settings.pass_meta);
        assert_eq!(b.settings.timeout, Duration::from_secs(1));

        let m = config_err(ExecBackend::claude_code(&opts(&[("cmd", "x")])));
        assert!(m.starts_with("claude-code: unknown option \"cmd\""), "{m}");
    }

    #[test]
    fn check_resolves_the_command() {
        let ok = exec(&[("cmd", "sh -c true")]).check().unwrap();
        // duration::format writes 60s as 1m.
        assert_eq!(
            ok,
            "exec: sh -c true (started directly, no shell) (timeout 1m)"
        );
        // Builtins and shell syntax can't be resolved up front; they pass.
        exec(&[("cmd", "echo hi")]).check().unwrap();
        exec(&[("cmd", "$AGENT run")]).check().unwrap();
        exec(&[("cmd", "FOO=1 ./nope")]).check().unwrap();

        let err = exec(&[("cmd", "no-such-command-xyz --flag")])
            .check()
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "backend config: exec: command \"no-such-command-xyz\" not found on PATH"
        );
        let err = exec(&[("cmd", "./no/such/file")]).check().unwrap_err();
        assert!(err.to_string().contains("not an executable file"), "{err}");
        let b = ExecBackend::claude_code(&opts(&[("bin", "no-such-claude-xyz")])).unwrap();
        assert_eq!(
            b.check().unwrap_err().to_string(),
            "backend config: claude-code: command \"no-such-claude-xyz\" not found on PATH"
        );
        let b = ExecBackend::claude_code(&opts(&[("bin", "/bin/sh")])).unwrap();
        assert!(
            b.check()
                .unwrap()
                .starts_with("claude-code: /bin/sh -p (started directly, no shell)")
        );
    }

    #[test]
    fn reply_trims_one_trailing_newline() {
        let b = exec(&[("cmd", "printf 'a\\n\\n'")]);
        assert_eq!(reply_text(run(&b, "")), "a\n");
        let b = exec(&[("cmd", "printf 'a\\r\\n'")]);
        assert_eq!(reply_text(run(&b, "")), "a");
        let b = exec(&[("cmd", "printf '  a'")]);
        assert_eq!(reply_text(run(&b, "")), "  a");
        let b = exec(&[("cmd", "cat")]);
        assert_eq!(reply_text(run(&b, "héllo\nworld")), "héllo\nworld");
    }

    #[test]
    fn empty_output_and_exit_100_are_no_reply() {
        for cmd in ["true", "printf ' \\n'", "echo something; exit 100"] {
            let b = exec(&[("cmd", cmd)]);
            assert_eq!(run(&b, "x").unwrap(), Outcome::NoReply, "{cmd}");
        }
    }

    #[test]
    fn exit_75_is_retry_later() {
        let b = exec(&[("cmd", "echo busy >&2; exit 75")]);
        match run(&b, "x") {
            Err(e @ BackendError::RetryLater { .. }) => {
                assert!(e.is_retry_later());
                assert!(e.to_string().contains("busy"), "{e}");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn failure_carries_stderr_tail() {
        let b = exec(&[("cmd", "echo partial; echo 'it broke' >&2; exit 3")]);
        let err = run(&b, "x").unwrap_err();
        assert!(
            matches!(&err, BackendError::Failed { code: Some(3), stderr_tail } if stderr_tail == "it broke"),
            "{err:?}"
        );
        assert_eq!(
            err.to_string(),
            "backend: command exited with status 3 (stderr: it broke)"
        );

        // Only the tail of a long stderr is kept.
        let b = exec(&[(
            "cmd",
            "head -c 100000 /dev/zero | tr '\\0' x >&2; echo END >&2; exit 1",
        )]);
        match run(&b, "x").unwrap_err() {
            BackendError::Failed { stderr_tail, .. } => {
                assert!(stderr_tail.ends_with("xxxEND"), "{stderr_tail}");
                assert!(stderr_tail.len() <= STDERR_SHOW, "{}", stderr_tail.len());
            }
            other => panic!("{other:?}"),
        }

        let b = exec(&[("cmd", "kill -9 $$")]);
        assert!(matches!(
            run(&b, "x"),
            Err(BackendError::Failed { code: None, .. })
        ));
    }

    #[test]
    fn env_is_visible_to_the_command() {
        let b = exec(&[(
            "cmd",
            "printf %s \"$MOLECULE_ORIGIN:$MOLECULE_CALLER_ID:$MOLECULE_CALLER_NAME:$MOLECULE_MESSAGE_ID:\
             $MOLECULE_ACTIVITY_ID:$MOLECULE_ATTEMPT:$MOLECULE_WORKSPACE_ID:$MOLECULE_API_URL:\
             ${MOLECULE_TASK_ID-unset}:$MOLECULE_DELEGATION_ID\"",
        )]);
        let mut r = req("x");
        r.extra_env
            .insert("MOLECULE_DELEGATION_ID".into(), "d-9".into());
        let out = reply_text(b.handle(&r, &RunHandle::new()));
        assert_eq!(
            out,
            "canvas::Ada:m-1:act-1:2:ws-1:http://127.0.0.1:1:unset:d-9"
        );

        let b = exec(&[
            ("cmd", "printf %s \"$MOLECULE_TASK_ID:$MOLECULE_METHOD\""),
            ("pass_meta", "true"),
        ]);
        assert_eq!(reply_text(run(&b, "x")), "t-1:message/send");
    }

    #[test]
    fn json_in_and_out() {
        let dir = TempDir::new();
        let input = dir.file("in.json");
        let cmd = format!(
            "cat > '{input}'; printf '%s' '{{\"text\":\"ok\",\"parts\":[{{\"type\":\"file\",\"file\":{{\"uri\":\"u\"}}}}]}}'"
        );
        let b = exec(&[("cmd", &cmd), ("format", "json")]);
        let mut r = req("hello");
        r.other_parts = vec![json!({"kind": "data", "data": {}})];
        let out = b.handle(&r, &RunHandle::new()).unwrap();
        assert_eq!(
            out,
            Outcome::Reply(Reply {
                text: "ok".into(),
                parts: vec![json!({"type": "file", "kind": "file", "file": {"uri": "u"}})],
            })
        );
        let raw = std::fs::read_to_string(&input).unwrap();
        assert!(raw.ends_with("}\n"));
        let v: Value = serde_json::from_str(&raw).unwrap();
        assert_eq!(v["text"], "hello");
        assert_eq!(v["parts"][0]["kind"], "data");
        assert_eq!(v["caller_id"], Value::Null);
        assert_eq!(v["caller_name"], "Ada");
        assert_eq!(v["origin"], "canvas");
        assert_eq!(v["message_id"], "m-1");
        assert_eq!(v["activity_id"], "act-1");
        assert_eq!(v["task_id"], "t-1");
        assert_eq!(v["method"], "message/send");
        assert_eq!(v["attempt"], 2);
        assert_eq!(v["workspace_id"], "ws-1");
        assert_eq!(v["request"]["id"], 7);

        let json_run = |cmd: &str| run(&exec(&[("cmd", cmd), ("format", "json")]), "x");
        assert_eq!(
            json_run("echo '{\"no_reply\":true}'").unwrap(),
            Outcome::NoReply
        );
        assert_eq!(json_run("true").unwrap(), Outcome::NoReply);
        assert_eq!(
            json_run("echo '{\"text\":\"\"}'").unwrap(),
            Outcome::NoReply
        );
        assert_eq!(
            reply_text(json_run("printf %s '{\"text\":\"a\\n\"}'")),
            "a\n"
        );
        for bad in [
            "echo not json",
            "echo '[1]'",
            "echo '{}'",
            "echo '{\"text\":1}'",
            "echo '{\"parts\":{}}'",
            "echo '{\"parts\":[1]}'",
        ] {
            assert!(
                matches!(json_run(bad), Err(BackendError::BadOutput(_))),
                "{bad}"
            );
        }
        // A part that is not valid A2A fails the request, saying which and why.
        match json_run("echo '{\"text\":\"t\",\"parts\":[{\"kind\":\"file\",\"uri\":\"u\"}]}'") {
            Err(BackendError::BadOutput(m)) => {
                assert_eq!(m, "json reply: part 1: a file part has no \"file\" object")
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn unread_stdin_does_not_deadlock() {
        let b = exec(&[("cmd", "echo hi")]);
        let big = "x".repeat(5 << 20);
        let started = Instant::now();
        assert_eq!(reply_text(run(&b, &big)), "hi");
        assert!(started.elapsed() < Duration::from_secs(2));
    }

    #[test]
    fn large_input_and_output_flow_at_once() {
        // cat writes back while we still write: the input must go in between reads of
        // its output, or both sides block on full pipes.
        let text: String = (0..600_000)
            .map(|i| char::from(b'a' + (i % 26) as u8))
            .collect();
        let b = exec(&[("cmd", "cat")]);
        assert_eq!(reply_text(run(&b, &text)), text);
        // The same through a shell that reads only part of it, then exits.
        let b = exec(&[("cmd", "head -c 10 | tr a A")]);
        assert_eq!(reply_text(run(&b, &text)), "Abcdefghij");
    }

    #[test]
    fn the_helper_thread_exit_watch_behaves_the_same() {
        let with_thread = |pairs: &[(&str, &str)]| {
            let mut b = exec(pairs);
            b.exit_watch = ExitWatch::Thread;
            b
        };
        let b = with_thread(&[("cmd", "cat")]);
        assert_eq!(reply_text(run(&b, "héllo")), "héllo");
        let text = "y".repeat(300_000);
        assert_eq!(reply_text(run(&b, &text)), text);
        let b = with_thread(&[("cmd", "echo hi")]);
        assert_eq!(reply_text(run(&b, &"x".repeat(5 << 20))), "hi");
        let b = with_thread(&[("cmd", "echo 'no' >&2; exit 7")]);
        assert!(matches!(
            run(&b, "x"),
            Err(BackendError::Failed { code: Some(7), stderr_tail }) if stderr_tail == "no"
        ));
        let dir = TempDir::new();
        let pid_file = dir.file("pid");
        let b = with_thread(&[
            (
                "cmd",
                &format!("sleep 30 & echo $! > '{pid_file}'; exec sleep 30"),
            ),
            ("timeout", "200ms"),
            ("kill_grace", "200ms"),
        ]);
        assert!(matches!(run(&b, "x"), Err(BackendError::Timeout { .. })));
        assert!(gone(read_pid(&pid_file)), "grandchild survived");
    }

    #[test]
    fn nul_bytes_from_the_platform_never_fail_the_start() {
        let b = exec(&[("cmd", "printf %s \"$MOLECULE_MESSAGE_ID\"")]);
        let mut r = req("x");
        r.message_id = Some("m-\u{0}1".into());
        r.activity_id = "act\u{0}".into();
        let mut g = GroupGuard {
            child: None,
            handle: &RunHandle::new(),
        };
        assert_eq!(reply_text(b.run(&r, &mut g)), "m-1");
    }

    #[test]
    fn a_start_failure_names_the_real_program() {
        let b = exec(&[("cmd", "/nonexistent/my-agent.sh")]);
        match run(&b, "x") {
            Err(BackendError::Spawn(m)) => {
                assert!(m.starts_with("/nonexistent/my-agent.sh:"), "{m}")
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn output_limits() {
        let b = exec(&[("cmd", "printf '%020d' 0"), ("max_output", "10")]);
        match run(&b, "x") {
            Err(BackendError::BadOutput(m)) => {
                assert_eq!(m, "output too large: more than max_output 10 bytes")
            }
            other => panic!("{other:?}"),
        }
        // Exactly at the cap is fine.
        let b = exec(&[("cmd", "printf '%010d' 0"), ("max_output", "10")]);
        assert_eq!(reply_text(run(&b, "x")), "0000000000");
        // Far over the cap: we keep draining so the command can finish.
        let b = exec(&[("cmd", "head -c 5000000 /dev/zero"), ("max_output", "1000")]);
        assert!(matches!(run(&b, "x"), Err(BackendError::BadOutput(_))));
        // A command that never stops writing is ended at the cap, not at the timeout.
        let b = exec(&[("cmd", "yes"), ("max_output", "1000"), ("timeout", "300s")]);
        match run(&b, "x") {
            Err(BackendError::BadOutput(m)) => assert!(m.starts_with("output too large"), "{m}"),
            other => panic!("{other:?}"),
        }
        let b = exec(&[("cmd", "printf 'a\\377b'")]);
        assert!(matches!(run(&b, "x"), Err(BackendError::BadOutput(m)) if m.contains("UTF-8")));
    }

    #[test]
    fn timeout_kills_the_whole_group() {
        for shape in [
            "(sleep 30; echo late) & echo $! > '{pid}'; exec sleep 30",
            "sleep 30 & echo $! > '{pid}'; echo started; wait",
        ] {
            let dir = TempDir::new();
            let pid_file = dir.file("pid");
            let cmd = shape.replace("{pid}", &pid_file);
            let b = exec(&[("cmd", &cmd), ("timeout", "300ms"), ("kill_grace", "200ms")]);
            let started = Instant::now();
            let err = run(&b, "x").unwrap_err();
            assert!(
                matches!(err, BackendError::Timeout { after, .. } if after == Duration::from_millis(300)),
                "{err:?}"
            );
            assert!(started.elapsed() < Duration::from_secs(2), "{shape}");
            assert!(gone(read_pid(&pid_file)), "{shape}: grandchild survived");
        }
    }

    #[test]
    fn timeout_escalates_to_sigkill() {
        let b = exec(&[
            ("cmd", "trap '' TERM; sleep 30"),
            ("timeout", "200ms"),
            ("kill_grace", "200ms"),
        ]);
        let started = Instant::now();
        assert!(matches!(run(&b, "x"), Err(BackendError::Timeout { .. })));
        assert!(started.elapsed() < Duration::from_secs(2));
    }

    #[test]
    fn background_holder_of_stdout_is_killed_after_exit() {
        let dir = TempDir::new();
        let pid_file = dir.file("pid");
        let b = exec(&[(
            "cmd",
            &format!("(sleep 30) & echo $! > '{pid_file}'; echo done"),
        )]);
        let started = Instant::now();
        assert_eq!(reply_text(run(&b, "x")), "done");
        assert!(started.elapsed() < Duration::from_secs(2));
        assert!(gone(read_pid(&pid_file)), "grandchild survived");

        // A background process that let go of the pipes is killed too.
        let b = exec(&[(
            "cmd",
            &format!("sleep 30 >/dev/null 2>&1 & echo $! > '{pid_file}'; echo done"),
        )]);
        assert_eq!(reply_text(run(&b, "x")), "done");
        assert!(gone(read_pid(&pid_file)), "detached grandchild survived");
    }

    #[test]
    fn the_group_is_killed_before_its_leader_is_reaped() {
        let dir = TempDir::new();
        let pid_file = dir.file("pid");
        // A leader that exits at once, leaving a detached member in its group.
        let mut child = shell_command(&format!(
            "sleep 30 >/dev/null 2>&1 & echo $! > '{pid_file}'"
        ))
        .process_group(0)
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
        let leader = child.id();
        wait_exited(leader).unwrap();
        let handle = RunHandle::new();
        assert!(handle.started(leader));
        let mut seen_at_kill = None;
        let status = end_group(&mut child, &handle, |pgid| {
            seen_at_kill = proc_state(leader);
            let _ = kill_process_group(pgid, SIGKILL);
        })
        .unwrap();
        assert_eq!(
            seen_at_kill,
            Some('Z'),
            "the leader still held its pid when the group was killed"
        );
        assert!(status.success());
        assert!(gone(read_pid(&pid_file)), "the group member survived");
    }

    #[test]
    fn cancel_stops_a_run() {
        let dir = TempDir::new();
        let flag = dir.file("started");
        let b = exec(&[("cmd", &format!("echo > '{flag}'; sleep 30"))]);
        let handle = RunHandle::new();
        let canceller = {
            let handle = handle.clone();
            let flag = flag.clone();
            thread::spawn(move || {
                let deadline = Instant::now() + Duration::from_secs(5);
                while !Path::new(&flag).exists() && Instant::now() < deadline {
                    thread::sleep(Duration::from_millis(5));
                }
                handle.cancel(SIGTERM);
            })
        };
        let started = Instant::now();
        let r = b.handle(&req("x"), &handle);
        canceller.join().unwrap();
        assert!(matches!(r, Err(BackendError::Cancelled)), "{r:?}");
        assert!(started.elapsed() < Duration::from_secs(2));

        // Cancelled before it started: nothing runs.
        let marker = dir.file("ran");
        let b = exec(&[("cmd", &format!("sleep 1; echo > '{marker}'"))]);
        let handle = RunHandle::new();
        handle.cancel(SIGTERM);
        assert!(matches!(
            b.handle(&req("x"), &handle),
            Err(BackendError::Cancelled)
        ));
        assert!(!Path::new(&marker).exists());
    }

    #[test]
    fn concurrent_runs_are_independent() {
        let b = Arc::new(exec(&[("cmd", "cat")]));
        let threads: Vec<_> = (0..8)
            .map(|i| {
                let b = Arc::clone(&b);
                thread::spawn(move || reply_text(run(&b, &format!("msg {i}"))))
            })
            .collect();
        for (i, t) in threads.into_iter().enumerate() {
            assert_eq!(t.join().unwrap(), format!("msg {i}"));
        }
    }

    #[test]
    fn plain_commands_are_found_on_path_once() {
        let argv = direct_argv("sh -c true").unwrap();
        assert!(
            argv[0].starts_with('/') && argv[0].ends_with("/sh"),
            "{argv:?}"
        );
        assert_eq!(argv[1..], ["-c", "true"]);
        assert_eq!(direct_argv("./x y").unwrap(), ["./x", "y"]);
        assert_eq!(direct_argv("no-such-xyz").unwrap(), ["no-such-xyz"]);
        assert_eq!(direct_argv("echo $HOME"), None);
        let b = exec(&[("cmd", "cat")]);
        assert!(b.argv.as_ref().unwrap()[0].ends_with("/cat"));
        assert_eq!(reply_text(run(&b, "resolved")), "resolved");
    }

    #[test]
    fn helpers() {
        assert_eq!(shell_quote("claude"), "claude");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
        assert_eq!(
            checkable_first_word("  ./agent.sh --x"),
            Some("./agent.sh".into())
        );
        assert_eq!(checkable_first_word("if true; then x; fi"), None);
        assert_eq!(checkable_first_word("\"my agent\""), None);
        let mut long = "é".repeat(600).into_bytes();
        long.extend_from_slice(b" end \n");
        let t = tail_text(&long);
        assert!(t.ends_with("é end") && !t.starts_with('\u{fffd}'), "{t}");
        assert_eq!(tail_text(b"\xff oops "), "\u{fffd} oops");
    }
}
