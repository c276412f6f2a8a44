//! One-shot `molecule` commands (just's `Test` is the model): build the command line,
//! run it to completion under a deadline, and keep everything it printed, so that a
//! failed assertion shows the command and its whole output.

use std::ffi::OsStr;
use std::fmt;
use std::io::Write;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::Duration;

use serde_json::Value;

use super::{Emulator, TempDir, Ws, molecule, write_secret};

/// A failure bound, not a timing assertion: a command that hangs fails its test
/// (with the command line) instead of hanging the suite.
const BOUND: Duration = Duration::from_secs(60);

/// A `molecule` command line to run once.
pub struct Run {
    cmd: Command,
    stdin: Option<Vec<u8>>,
}

impl Run {
    /// `molecule <args>` with the clean environment of [`molecule`].
    pub fn new(args: &[&str]) -> Run {
        let mut cmd = molecule();
        cmd.args(args);
        Run::of(cmd)
    }

    /// Runs a command line the test built itself.
    pub fn of(cmd: Command) -> Run {
        Run { cmd, stdin: None }
    }

    pub fn arg(mut self, arg: impl AsRef<OsStr>) -> Run {
        self.cmd.arg(arg);
        self
    }

    pub fn args(mut self, args: &[&str]) -> Run {
        self.cmd.args(args);
        self
    }

    pub fn env(mut self, key: &str, value: &str) -> Run {
        self.cmd.env(key, value);
        self
    }

    /// Bytes on stdin (otherwise stdin is /dev/null).
    pub fn stdin(mut self, bytes: Option<&[u8]>) -> Run {
        self.stdin = bytes.map(<[u8]>::to_vec);
        self
    }

    pub fn env_remove(mut self, key: &str) -> Run {
        self.cmd.env_remove(key);
        self
    }

    /// Runs to completion; kills the process and fails the test if it outlives the bound.
    pub fn out(self) -> Out {
        self.start().out()
    }

    /// Starts the command and leaves it running, for a test that acts while it runs.
    pub fn start(mut self) -> Running {
        let command = format!("{:?}", self.cmd);
        let mut child = self
            .cmd
            .stdin(if self.stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {command}: {e}"));
        let writer = self.stdin.take().map(|bytes| {
            let mut pipe = child.stdin.take().unwrap();
            // The command may stop reading early (oversized input): count what it took.
            std::thread::spawn(move || {
                let mut written = 0;
                for chunk in bytes.chunks(64 * 1024) {
                    if pipe.write_all(chunk).is_err() {
                        break;
                    }
                    written += chunk.len();
                }
                written
            })
        });
        Running {
            child: Some(child),
            command,
            writer,
        }
    }
}

/// A started [`Run`], killed on drop unless [`Running::out`] collected it.
pub struct Running {
    child: Option<Child>,
    command: String,
    writer: Option<JoinHandle<usize>>,
}

impl Running {
    /// Waits for the exit (at most [`BOUND`]) and returns what it printed.
    pub fn out(mut self) -> Out {
        let child = self.child.take().unwrap();
        let pid = child.id();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(child.wait_with_output());
        });
        let output = match rx.recv_timeout(BOUND) {
            Ok(output) => output.unwrap(),
            Err(_) => {
                // Not reaped yet (the waiting thread holds it), so the pid is still ours.
                let _ = Command::new("kill")
                    .args(["-KILL", &pid.to_string()])
                    .status();
                panic!("{} did not finish within {BOUND:?}", self.command);
            }
        };
        Out {
            command: std::mem::take(&mut self.command),
            code: output.status.code().unwrap_or(-1),
            out: String::from_utf8_lossy(&output.stdout).into_owned(),
            err: String::from_utf8_lossy(&output.stderr).into_owned(),
            stdin_written: self.writer.take().map(|w| w.join().unwrap()),
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// What one run printed.
pub struct Out {
    pub command: String,
    pub code: i32,
    pub out: String,
    pub err: String,
    /// Bytes of the given stdin that went into the pipe before the command closed it.
    pub stdin_written: Option<usize>,
}

impl fmt::Debug for Out {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "\n$ {}\nexit code {}\n--- stdout ---\n{}\n--- stderr ---\n{}\n",
            self.command, self.code, self.out, self.err
        )
    }
}

impl Out {
    /// (exit code, stdout, stderr), for tests that take the parts apart.
    pub fn parts(self) -> (i32, String, String) {
        (self.code, self.out, self.err)
    }

    /// Stdout is exactly one JSON document (plus its newline).
    pub fn json(&self) -> Value {
        let mut docs = serde_json::Deserializer::from_str(&self.out).into_iter::<Value>();
        let first = docs
            .next()
            .unwrap_or_else(|| panic!("no JSON on stdout: {self:?}"))
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {self:?}"));
        assert!(docs.next().is_none(), "more than one document: {self:?}");
        assert!(
            self.out.ends_with('\n') && self.out.trim_end().lines().count() == 1,
            "{self:?}"
        );
        first
    }

    /// Exit `code`, one `molecule:` error line on stderr containing `needle`, no panic.
    pub fn fails(&self, code: i32, needle: &str) {
        assert_eq!(self.code, code, "{self:?}");
        let lines: Vec<&str> = self
            .err
            .lines()
            .filter(|l| l.starts_with("molecule: "))
            .collect();
        assert_eq!(lines.len(), 1, "one error line expected: {self:?}");
        assert!(
            lines[0].contains(needle),
            "{needle:?} not in {:?}",
            lines[0]
        );
        assert!(!self.err.contains("panicked"), "{self:?}");
    }

    /// `--json` failure document with `exit_code` = the process's code.
    pub fn json_failure(&self, code: i32, needle: &str) -> Value {
        let v = self.json();
        assert_eq!(v["ok"], false, "{v}");
        assert_eq!(v["exit_code"], code, "{v}");
        assert_eq!(self.code, code, "{self:?}");
        assert!(
            v["error"].as_str().unwrap().contains(needle),
            "{needle:?} not in {v}"
        );
        v
    }
}

/// Runs `molecule <args>` to completion; returns (exit code, stdout, stderr).
pub fn run(args: &[&str]) -> (i32, String, String) {
    Run::new(args).out().parts()
}

/// `molecule delegate <target> <task> --json` as workspace `ws` (token file in `dir`);
/// returns the delegation id.
pub fn delegate(emu: &Emulator, ws: &Ws, dir: &TempDir, target: &str, task: &str) -> String {
    let token_file = dir.path().join("token");
    if !token_file.exists() {
        write_secret(&token_file, &ws.token);
    }
    let o = Run::new(&["--api-url", &emu.url, "--workspace", &ws.id, "--token-file"])
        .arg(&token_file)
        .args(&["--json", "delegate", target, task])
        .out();
    assert_eq!(o.code, 0, "delegate failed: {o:?}");
    o.json()["delegation_id"].as_str().unwrap().to_string()
}

/// An agent on the command line: env for one workspace, a token file, a state dir.
pub struct Agent {
    pub url: String,
    pub ws: Ws,
    pub dir: TempDir,
}

impl Agent {
    pub fn new(emu: &Emulator, ws: &Ws) -> Agent {
        let dir = TempDir::new();
        write_secret(&dir.path().join("token"), &ws.token);
        Agent {
            url: emu.url.clone(),
            ws: ws.clone(),
            dir,
        }
    }

    pub fn token_file(&self) -> PathBuf {
        self.dir.path().join("token")
    }

    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    /// `molecule <args>` with this agent's MOLECULE_* environment.
    pub fn cmd(&self, args: &[&str]) -> Run {
        Run::new(args)
            .env("MOLECULE_API_URL", &self.url)
            .env("MOLECULE_WORKSPACE_ID", &self.ws.id)
            .env(
                "MOLECULE_WORKSPACE_TOKEN_FILE",
                self.token_file().to_str().unwrap(),
            )
            .env("MOLECULE_STATE_DIR", self.state_dir().to_str().unwrap())
    }

    pub fn run(&self, args: &[&str]) -> Out {
        self.cmd(args).out()
    }

    pub fn run_stdin(&self, args: &[&str], input: Option<&[u8]>) -> Out {
        self.cmd(args).stdin(input).out()
    }
}
