//! The set-up most tests share, as one builder: an emulator (with its flags), a
//! connector workspace and a peer under one root, a temporary directory, and
//! optionally `molecule connect` running for the first workspace; or a [`Fleet`] of
//! workspaces for one `connect --workspaces` process.
//!
//! ```ignore
//! let Connected { emu, a, b, c, .. } = Test::new().exec("cat").connect();
//! ```

use std::path::PathBuf;
use std::sync::Arc;

use serde_json::{Value, json};

use super::{Agent, Connector, Emulator, TempDir, Ws, molecule, write_secret};

/// What to start; nothing runs until [`Test::pair`] or [`Test::connect`].
#[derive(Default)]
pub struct Test {
    emulator: Vec<String>,
    args: Vec<String>,
    env: Vec<(String, String)>,
}

impl Test {
    pub fn new() -> Test {
        Test::default()
    }

    /// Flags for `molecule-emulator`.
    pub fn emulator(mut self, flags: &[&str]) -> Test {
        self.emulator.extend(flags.iter().map(|f| f.to_string()));
        self
    }

    /// Extra `molecule connect` arguments (after the defaults of [`Connector::start`]).
    pub fn args<S: AsRef<str>>(mut self, args: &[S]) -> Test {
        self.args
            .extend(args.iter().map(|a| a.as_ref().to_string()));
        self
    }

    /// `--backend mock`.
    pub fn mock(self) -> Test {
        self.args(&["--backend", "mock"])
    }

    /// `--backend exec` running the shell command `cmd`.
    pub fn exec(self, cmd: &str) -> Test {
        self.args(&["--backend", "exec", "--backend-opt", &format!("cmd={cmd}")])
    }

    /// An environment variable for the connector.
    pub fn env(mut self, key: &str, value: &str) -> Test {
        self.env.push((key.into(), value.into()));
        self
    }

    /// The emulator, the two workspaces and the directory; no connector yet.
    pub fn pair(&self) -> Pair {
        let flags: Vec<&str> = self.emulator.iter().map(String::as_str).collect();
        let emu = Emulator::start_with(&flags);
        let (a, b) = emu.pair();
        Pair {
            emu,
            a,
            b,
            dir: Arc::new(TempDir::new()),
        }
    }

    /// [`Test::pair`] with an [`Agent`] for `a`: one-shot commands, no connector.
    pub fn cli(&self) -> Cli {
        let Pair { emu, a, b, .. } = self.pair();
        let agent = Agent::new(&emu, &a);
        Cli { emu, a, b, agent }
    }

    /// [`Test::pair`] with `molecule connect` running for `a`.
    pub fn connect(self) -> Connected {
        let Pair { emu, a, b, dir } = self.pair();
        let c = self.start(&emu, &a, &dir);
        Connected { emu, a, b, dir, c }
    }

    /// Starts the connector this builder describes for `ws` on an existing set-up.
    pub fn start(&self, emu: &Emulator, ws: &Ws, dir: &Arc<TempDir>) -> Connector {
        let args: Vec<&str> = self.args.iter().map(String::as_str).collect();
        let env: Vec<(&str, &str)> = self
            .env
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        Connector::start_with_env(emu, ws, dir, &args, &env)
    }
}

/// A started emulator with a connector workspace `a` and its peer `b`.
pub struct Pair {
    pub emu: Emulator,
    pub a: Ws,
    pub b: Ws,
    pub dir: Arc<TempDir>,
}

/// A [`Pair`] whose `a` runs commands as `agent`.
pub struct Cli {
    pub emu: Emulator,
    pub a: Ws,
    pub b: Ws,
    pub agent: Agent,
}

/// A [`Pair`] with `molecule connect` running for `a`. Bind `emu` (as `emu: _emu` if
/// unused): a field left to `..` is dropped at once, and the emulator would stop.
pub struct Connected {
    pub emu: Emulator,
    pub a: Ws,
    pub b: Ws,
    pub dir: Arc<TempDir>,
    pub c: Connector,
}

/// `n` workspaces under one root, each with a token file, listed in a
/// `--workspaces` file; and a peer that may talk to all of them.
pub struct Fleet {
    pub peer: String,
    pub ids: Vec<String>,
    pub list: PathBuf,
    pub state: PathBuf,
    pub dir: Arc<TempDir>,
}

impl Fleet {
    /// `entry(i, e)` may add fields to the list entry of workspace `i`.
    pub fn new(emu: &Emulator, n: usize, entry: impl Fn(usize, &mut Value)) -> Fleet {
        let (root, _) = emu.workspace(json!({"name": "root"}));
        let (peer, _) =
            emu.workspace(json!({"name": "peer", "parent_id": root, "delivery_mode": "poll"}));
        let dir = Arc::new(TempDir::new());
        let mut entries = Vec::new();
        let mut ids = Vec::new();
        for i in 0..n {
            let (id, token) =
                emu.workspace(json!({"name": format!("agent{i}"), "parent_id": root}));
            let token_file = dir.path().join(format!("token-{i}"));
            write_secret(&token_file, &token);
            let mut e = json!({"id": id, "token_file": token_file});
            entry(i, &mut e);
            entries.push(e);
            ids.push(id);
        }
        let list = dir.path().join("workspaces.json");
        std::fs::write(&list, serde_json::to_vec(&entries).unwrap()).unwrap();
        Fleet {
            peer,
            ids,
            state: dir.path().join("state"),
            list,
            dir,
        }
    }

    /// `molecule connect --workspaces <list> --api-url <emu> --state-dir <state> <args>`.
    pub fn connect(&self, emu: &Emulator, args: &[&str]) -> Connector {
        self.connect_with_env(emu, args, &[])
    }

    /// Like [`Fleet::connect`] with extra environment variables.
    pub fn connect_with_env(
        &self,
        emu: &Emulator,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Connector {
        let mut cmd = molecule();
        cmd.args(["connect", "--workspaces"])
            .arg(&self.list)
            .args(["--api-url", &emu.url, "--state-dir"])
            .arg(&self.state)
            .args(args)
            .envs(env.iter().copied());
        let first = Ws {
            id: self.ids[0].clone(),
            token: String::new(),
        };
        Connector::spawn(cmd, &self.dir, &first)
    }
}
