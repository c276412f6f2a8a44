//! Test support: start the emulator and the connector as child processes, talk to the
//! emulator's admin API, and wait for conditions with a deadline (never blind sleeps).

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

pub mod a2a_schema;
mod harness;
pub mod hostile;
mod run;

pub use harness::{Cli, Connected, Fleet, Pair, Test};
pub use run::{Agent, Out, Run, Running, delegate, run};

/// Default bound for "this should happen": generous, only hit when a test fails.
pub const WAIT: Duration = Duration::from_secs(20);

/// What [`backlog_wait`] adds per queued message (its poll share, reply and
/// self-report, cursor save), generous like [`WAIT`].
const PER_MESSAGE: Duration = Duration::from_millis(100);

/// The bound for a run whose work grows with a backlog of `messages`: [`WAIT`] plus
/// [`PER_MESSAGE`] each, so a bigger backlog on a loaded machine stays a pass. Still
/// only a failure bound, never a timing assertion.
pub fn backlog_wait(messages: usize) -> Duration {
    let n = u32::try_from(messages).unwrap_or(u32::MAX);
    WAIT.saturating_add(PER_MESSAGE.saturating_mul(n))
}

/// A running emulator, killed on drop.
pub struct Emulator {
    child: Child,
    pub url: String,
    agent: ureq::Agent,
}

impl Emulator {
    pub fn start() -> Emulator {
        Self::start_with(&[])
    }

    pub fn start_with(extra: &[&str]) -> Emulator {
        let mut child = Command::new(env!("CARGO_BIN_EXE_molecule-emulator"))
            .args(["--port", "0", "--quiet"])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start emulator");
        let stdout = child.stdout.take().unwrap();
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line).unwrap();
        let url = line
            .trim()
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("unexpected emulator banner {line:?}"))
            .to_string();
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(30)))
            .proxy(None)
            .build()
            .into();
        Emulator { child, url, agent }
    }

    pub fn get(&self, path: &str) -> Value {
        let mut resp = self
            .agent
            .get(format!("{}{path}", self.url))
            .call()
            .unwrap();
        let status = resp.status().as_u16();
        let body = resp
            .body_mut()
            .with_config()
            .limit(1 << 30)
            .read_to_string()
            .unwrap();
        assert!(status < 300, "GET {path}: {status} {body}");
        serde_json::from_str(&body).unwrap()
    }

    pub fn post(&self, path: &str, body: Value) -> Value {
        let mut resp = self
            .agent
            .post(format!("{}{path}", self.url))
            .send_json(&body)
            .unwrap();
        let status = resp.status().as_u16();
        let text = resp
            .body_mut()
            .with_config()
            .limit(1 << 30)
            .read_to_string()
            .unwrap();
        assert!(status < 300, "POST {path}: {status} {text}");
        serde_json::from_str(&text).unwrap_or(Value::Null)
    }

    /// Creates a workspace; returns (id, token).
    pub fn workspace(&self, body: Value) -> (String, String) {
        let v = self.post("/_admin/workspaces", body);
        (
            v["id"].as_str().unwrap().to_string(),
            v["token"].as_str().unwrap_or_default().to_string(),
        )
    }

    /// A connector workspace and a peer that may talk to it (siblings under a root).
    pub fn pair(&self) -> (Ws, Ws) {
        let (root, _) = self.workspace(json!({"name": "root"}));
        let (a, ta) =
            self.workspace(json!({"name": "agent", "parent_id": root, "delivery_mode": "poll"}));
        let (b, tb) =
            self.workspace(json!({"name": "peer", "parent_id": root, "delivery_mode": "poll"}));
        (Ws { id: a, token: ta }, Ws { id: b, token: tb })
    }

    pub fn enqueue(&self, ws: &str, body: Value) -> Value {
        self.post(&format!("/_admin/workspaces/{ws}/enqueue"), body)
    }

    /// Sends `text` from `from` (None = canvas user) to `to`; returns the activity id.
    pub fn say(&self, to: &str, from: Option<&str>, text: &str) -> String {
        let v = self.enqueue(to, json!({"from": from, "text": text}));
        v["activity_id"].as_str().unwrap().to_string()
    }

    pub fn received(&self, ws: &str) -> Vec<Value> {
        self.get(&format!("/_admin/workspaces/{ws}/received"))["messages"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    pub fn notifies(&self, ws: &str) -> Vec<Value> {
        self.get(&format!("/_admin/workspaces/{ws}/notifies"))["notifies"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    /// The `message` of each notify `ws` posted, in order.
    pub fn notify_texts(&self, ws: &str) -> Vec<String> {
        self.notifies(ws)
            .iter()
            .map(|n| n["message"].as_str().unwrap_or("").to_string())
            .collect()
    }

    pub fn heartbeats(&self, ws: &str) -> Value {
        self.get(&format!("/_admin/workspaces/{ws}/heartbeats"))
    }

    pub fn fault(&self, body: Value) {
        self.post("/_admin/faults", body);
    }

    /// Removes every fault not yet used up.
    pub fn clear_faults(&self) {
        let resp = self
            .agent
            .delete(format!("{}/_admin/faults", self.url))
            .call()
            .unwrap();
        assert!(resp.status().as_u16() < 300, "DELETE /_admin/faults");
    }

    /// Requests the emulator has served for `route` (e.g. "GET /workspaces/:id/activity").
    pub fn route_count(&self, route: &str) -> u64 {
        self.get("/_admin/stats")["by_route"][route]
            .as_u64()
            .unwrap_or(0)
    }

    /// Waits until the emulator has served `n` more activity polls than now.
    pub fn wait_polls(&self, n: u64, c: &Connector) {
        let start = self.route_count(POLL_ROUTE);
        wait_until(WAIT, &format!("{n} more polls"), c, || {
            (self.route_count(POLL_ROUTE) >= start + n).then_some(())
        });
    }
}

pub const POLL_ROUTE: &str = "GET /workspaces/:id/activity";

impl Drop for Emulator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A workspace id and its token.
#[derive(Clone, Debug)]
pub struct Ws {
    pub id: String,
    pub token: String,
}

/// A fresh temporary directory, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new() -> TempDir {
        let p = std::env::temp_dir().join(format!(
            "molecule-it-{}-{}",
            std::process::id(),
            molecule::uuid::new_v4()
        ));
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A base `molecule` command with a clean environment: no proxies, no MOLECULE_* or
/// RUST_LOG from the developer's shell. `MOLECULE_TEST_BIN` runs another build
/// instead (scripts/qemu-test.sh: a foreign release binary under qemu-user).
pub fn molecule() -> Command {
    let bin = std::env::var_os("MOLECULE_TEST_BIN")
        .unwrap_or_else(|| env!("CARGO_BIN_EXE_molecule").into());
    let mut cmd = Command::new(bin);
    for (k, _) in std::env::vars_os() {
        let k = k.to_string_lossy().to_string();
        if k.starts_with("MOLECULE_")
            || k.to_ascii_lowercase().ends_with("_proxy")
            || k == "RUST_LOG"
            || k == "XDG_CONFIG_HOME"
        {
            cmd.env_remove(&k);
        }
    }
    cmd
}

/// A running `molecule connect`, killed on drop. Its stderr is collected for
/// failure messages.
pub struct Connector {
    child: Option<Child>,
    stderr: Arc<Mutex<String>>,
    reader: JoinHandle<()>,
    pub dir: Arc<TempDir>,
    pub ws: Ws,
}

impl Connector {
    /// `molecule connect <ws>` against `emu` with a token file and state dir in `dir`.
    pub fn start(emu: &Emulator, ws: &Ws, dir: &Arc<TempDir>, args: &[&str]) -> Connector {
        Self::start_with_env(emu, ws, dir, args, &[])
    }

    /// Like [`Connector::start`] with extra environment variables.
    pub fn start_with_env(
        emu: &Emulator,
        ws: &Ws,
        dir: &Arc<TempDir>,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Connector {
        let token_file = dir.path().join("token");
        if !token_file.exists() {
            write_secret(&token_file, &ws.token);
        }
        let mut cmd = molecule();
        cmd.arg("connect")
            .arg(&ws.id)
            .args(["--api-url", &emu.url])
            .arg("--token-file")
            .arg(&token_file)
            .arg("--state-dir")
            .arg(dir.path().join("state"))
            // Blind polling unless a test asks for `--wake auto` (a later flag wins):
            // many tests count polls to prove that nothing happened.
            .args([
                "--interval-ms",
                "100",
                "--heartbeat-secs",
                "1",
                "--wake",
                "poll",
            ])
            .arg("-v")
            .args(args)
            .envs(env.iter().copied());
        Self::spawn(cmd, dir, ws)
    }

    /// Runs `cmd` (a `molecule` command line built by the test) as the connector;
    /// `ws` is the workspace the helpers below look at.
    pub fn spawn(mut cmd: Command, dir: &Arc<TempDir>, ws: &Ws) -> Connector {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start molecule connect");
        let stderr = Arc::new(Mutex::new(String::new()));
        let mut pipe = child.stderr.take().unwrap();
        let sink = stderr.clone();
        let reader = std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = pipe.read(&mut buf) {
                if n == 0 {
                    break;
                }
                sink.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        Connector {
            child: Some(child),
            stderr,
            reader,
            dir: dir.clone(),
            ws: ws.clone(),
        }
    }

    /// The connector's stdout (piped), for a test that reads it.
    pub fn take_stdout(&mut self) -> std::process::ChildStdout {
        self.child.as_mut().unwrap().stdout.take().unwrap()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    pub fn state_file(&self) -> PathBuf {
        self.dir
            .path()
            .join("state")
            .join(format!("{}.json", self.ws.id))
    }

    pub fn state(&self) -> Value {
        serde_json::from_slice(&std::fs::read(self.state_file()).unwrap()).unwrap()
    }

    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([&format!("-{sig}"), &self.pid().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -{sig} failed");
    }

    /// Waits for the process to exit on its own, then for its stderr to reach EOF
    /// (bounded: a backend child that outlives it may still hold the pipe).
    pub fn wait_exit(&mut self, within: Duration) -> ExitStatus {
        let child = self.child.as_mut().unwrap();
        let status = poll(within, || child.try_wait().unwrap()).unwrap_or_else(|| {
            panic!(
                "connector did not exit within {within:?}; stderr:\n{}",
                self.stderr()
            )
        });
        poll(Duration::from_secs(5), || {
            self.reader.is_finished().then_some(())
        });
        status
    }

    /// Whether the process is still running (not exited on its own).
    pub fn running(&mut self) -> bool {
        self.child.as_mut().unwrap().try_wait().unwrap().is_none()
    }

    /// SIGTERM, then wait for the exit.
    pub fn stop(&mut self) -> ExitStatus {
        self.signal("TERM");
        self.wait_exit(Duration::from_secs(10))
    }
}

impl Drop for Connector {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Polls `f` every 20 ms until it returns `Some`, or gives up after `within`.
pub fn poll<T>(within: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Polls `f` until it returns `Some`, or panics after `within` with the connector's
/// stderr.
pub fn wait_until<T>(
    within: Duration,
    what: &str,
    c: &Connector,
    f: impl FnMut() -> Option<T>,
) -> T {
    poll(within, f).unwrap_or_else(|| {
        panic!(
            "timed out waiting for {what}; connector stderr:\n{}",
            c.stderr()
        )
    })
}

/// Polls `f` until it returns `Some`, or panics after [`WAIT`] (a failure bound, not a
/// timing assertion).
pub fn eventually<T>(what: &str, f: impl FnMut() -> Option<T>) -> T {
    poll(WAIT, f).unwrap_or_else(|| panic!("timed out waiting for {what}"))
}

/// Waits until `ws` has received `n` A2A messages; returns them.
pub fn wait_received(emu: &Emulator, ws: &str, n: usize, c: &Connector) -> Vec<Value> {
    wait_until(WAIT, &format!("{n} message(s) at {ws}"), c, || {
        let r = emu.received(ws);
        (r.len() >= n).then_some(r)
    })
}

/// Waits until `ws` has sent `n` notifies; returns them.
pub fn wait_notifies(emu: &Emulator, ws: &str, n: usize, c: &Connector) -> Vec<Value> {
    wait_until(WAIT, &format!("{n} notify(s) from {ws}"), c, || {
        let r = emu.notifies(ws);
        (r.len() >= n).then_some(r)
    })
}

/// The replies the connector in `dir` saved for `ws` and has not finished, as (row,
/// text), from its state file and journal (a checkpoint moves them from one to the
/// other at any time: poll this until it holds what you wait for).
pub fn saved_replies(dir: &Path, ws: &str) -> Vec<(String, String)> {
    let state = dir.join("state");
    let text = |r: &Value| r["text"].as_str().unwrap_or_default().to_string();
    let mut saved: Vec<(String, String)> = std::fs::read(state.join(format!("{ws}.json")))
        .ok()
        .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
        .and_then(|v| v["pending"].as_object().cloned())
        .map(|m| m.iter().map(|(row, r)| (row.clone(), text(r))).collect())
        .unwrap_or_default();
    let journal = std::fs::read_to_string(state.join(format!("{ws}.journal")));
    for line in journal.unwrap_or_default().lines() {
        let Ok(r) = serde_json::from_str::<Value>(line) else {
            continue;
        };
        let row = r["row"].as_str().unwrap_or_default().to_string();
        match r["t"].as_str() {
            Some("reply") => saved.push((row, text(&r["reply"]))),
            Some("done") => saved.retain(|(saved_row, _)| *saved_row != row),
            _ => {}
        }
    }
    saved
}

/// The text of each A2A message (as the emulator's admin API lists them).
pub fn texts(msgs: &[Value]) -> Vec<String> {
    msgs.iter()
        .map(|m| m["text"].as_str().unwrap_or_default().to_string())
        .collect()
}

/// Whether process `pid` still runs. A zombie does not: it is dead, and its parent
/// (the connector, or init) reaps it.
pub fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        !s.rsplit(')')
            .next()
            .unwrap_or("")
            .trim_start()
            .starts_with('Z')
    })
}

/// Kills the listed pids on drop, so a failing test leaves no long sleeper behind.
pub struct KillOnDrop(pub Vec<u32>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        for &pid in &self.0 {
            let _ = molecule::signal::kill_process(pid, molecule::signal::SIGKILL);
        }
    }
}

/// Writes a token file with mode 0600, as an operator would.
pub fn write_secret(path: &Path, token: &str) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, token).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
}
