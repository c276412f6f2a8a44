//! An in-memory platform for the runner's unit tests: answers from a script,
//! records what was asked. No network, no emulator. Also a backend that notes what
//! it was handed.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};

use crate::api::{ApiError, Platform, RequestStats, SendAnswer, Since};
use crate::backend::{Backend, BackendError, Outcome, Reply, Request, RunHandle};
use crate::config::{Secret, TokenSource};
use crate::credentials::Credentials;
use crate::shutdown::{Shutdown, StopReason};
use crate::uuid::WorkspaceId;
use crate::wire::{Heartbeat, RegisterResponse};

use super::side_thread::SideThread;
use super::status::SharedStatus;

/// Our workspace.
pub const OWN: &str = "11111111-1111-4111-8111-111111111111";
/// A peer that writes to us.
pub const PEER: &str = "22222222-2222-4222-8222-222222222222";

/// `raw` as a workspace id (a test constant: a UUID).
pub fn id(raw: &str) -> WorkspaceId {
    WorkspaceId::parse(raw).expect("a UUID")
}

/// Scripted answers (then empty pages and accepted sends), and what was asked.
pub struct Fake {
    own: WorkspaceId,
    creds: Credentials,
    pages: Mutex<VecDeque<Result<Vec<Value>, ApiError>>>,
    /// The answer to `GET /workspaces/<own>`: `None` = it exists.
    pub info: Mutex<Option<ApiError>>,
    asked: Mutex<Vec<Since>>,
    /// Answers to `/a2a` sends and notifies, in turn; then success.
    pub posts: Mutex<VecDeque<ApiError>>,
    sent: Mutex<Vec<(String, Value)>>,
    notified: Mutex<Vec<String>>,
    reports: Mutex<Vec<Value>>,
    /// Answers to heartbeats, in turn; then success.
    pub beats: Mutex<VecDeque<ApiError>>,
    beaten: Mutex<usize>,
    /// Answers to register, in turn; then poll mode.
    pub registers: Mutex<VecDeque<Result<RegisterResponse, ApiError>>>,
    registered: Mutex<usize>,
    /// `GET /delegations` lists, in turn; then an empty one.
    pub delegation_lists: Mutex<VecDeque<Vec<Value>>>,
    /// Broadcast pages, in turn; then an empty answer.
    pub broadcast_pages: Mutex<VecDeque<Value>>,
}

impl Fake {
    /// A platform whose inbox answers `pages` in turn.
    pub fn new(pages: Vec<Result<Vec<Value>, ApiError>>) -> Arc<Fake> {
        Arc::new(Fake {
            own: id(OWN),
            creds: Credentials::new(Secret::new("tok-aaaaaaaaaaaaaaaa"), TokenSource::Env),
            pages: Mutex::new(pages.into()),
            info: Mutex::new(None),
            asked: Mutex::new(Vec::new()),
            posts: Mutex::new(VecDeque::new()),
            sent: Mutex::new(Vec::new()),
            notified: Mutex::new(Vec::new()),
            reports: Mutex::default(),
            beats: Mutex::default(),
            beaten: Mutex::default(),
            registers: Mutex::default(),
            registered: Mutex::default(),
            delegation_lists: Mutex::default(),
            broadcast_pages: Mutex::default(),
        })
    }

    /// Heartbeats sent so far (answered or not).
    pub fn heartbeats(&self) -> usize {
        *self.beaten.lock().unwrap()
    }

    /// Registers sent so far.
    pub fn registered(&self) -> usize {
        *self.registered.lock().unwrap()
    }

    /// The inbox requests so far.
    pub fn asked(&self) -> Vec<Since> {
        self.asked.lock().unwrap().clone()
    }

    /// The `a2a_send` self-reports posted so far.
    pub fn reports(&self) -> Vec<Value> {
        self.reports.lock().unwrap().clone()
    }

    /// The `/a2a` sends the platform took: (target, body).
    pub fn sent(&self) -> Vec<(String, Value)> {
        self.sent.lock().unwrap().clone()
    }

    /// The `/notify` texts the platform took.
    pub fn notified(&self) -> Vec<String> {
        self.notified.lock().unwrap().clone()
    }

    fn next_post(&self) -> Option<ApiError> {
        self.posts.lock().unwrap().pop_front()
    }
}

/// A refusal with `status` and a body message.
pub fn status(op: &'static str, status: u16) -> ApiError {
    ApiError::Status {
        op,
        status,
        message: "refused".into(),
        hint: None,
        retry_after: None,
        delivery_confirmed: false,
        busy: false,
        code: None,
    }
}

impl Platform for Fake {
    fn workspace_id(&self) -> &WorkspaceId {
        &self.own
    }
    fn api_url(&self) -> &str {
        "http://platform.test"
    }
    fn credentials(&self) -> &Credentials {
        &self.creds
    }
    fn stats(&self) -> Option<&RequestStats> {
        None
    }
    fn activity_raw(&self, since: &Since, _: u32, _: u64) -> Result<Vec<Value>, ApiError> {
        self.asked.lock().unwrap().push(since.clone());
        self.pages
            .lock()
            .unwrap()
            .pop_front()
            .unwrap_or(Ok(Vec::new()))
    }
    fn ack(&self, seq: i64) -> Result<i64, ApiError> {
        Ok(seq)
    }
    fn workspace_info(&self, _: &WorkspaceId) -> Result<Value, ApiError> {
        match self.info.lock().unwrap().clone() {
            Some(e) => Err(e),
            None => Ok(json!({"id": OWN})),
        }
    }
    fn send_a2a(&self, target: &WorkspaceId, body: &[u8]) -> Result<SendAnswer, ApiError> {
        if let Some(e) = self.next_post() {
            return Err(e);
        }
        self.sent
            .lock()
            .unwrap()
            .push((target.to_string(), serde_json::from_slice(body).unwrap()));
        Ok(SendAnswer {
            status: 200,
            body: json!({"result": {}}),
        })
    }
    fn self_report_json(&self, row: &[u8]) -> Result<(), ApiError> {
        let row = serde_json::from_slice(row).unwrap();
        self.reports.lock().unwrap().push(row);
        Ok(())
    }
    fn notify(&self, message: &str, _: Vec<Value>) -> Result<(), ApiError> {
        if let Some(e) = self.next_post() {
            return Err(e);
        }
        self.notified.lock().unwrap().push(message.to_string());
        Ok(())
    }
    fn agent_card(&self) -> Value {
        crate::wire::agent_card(OWN)
    }
    fn register(&self, _: Value) -> Result<RegisterResponse, ApiError> {
        *self.registered.lock().unwrap() += 1;
        self.registers
            .lock()
            .unwrap()
            .pop_front()
            .unwrap_or(Ok(RegisterResponse {
                delivery_mode: Some("poll".into()),
                auth_token: None,
            }))
    }
    fn heartbeat(&self, _: &Heartbeat) -> Result<(), ApiError> {
        *self.beaten.lock().unwrap() += 1;
        self.beats.lock().unwrap().pop_front().map_or(Ok(()), Err)
    }
    fn delegations(&self, _: Option<&str>) -> Result<Vec<Value>, ApiError> {
        Ok(self
            .delegation_lists
            .lock()
            .unwrap()
            .pop_front()
            .unwrap_or_default())
    }
    fn broadcasts(&self, since: &Since, _: u32, _: u64) -> Result<Value, ApiError> {
        self.asked.lock().unwrap().push(since.clone());
        Ok(self
            .broadcast_pages
            .lock()
            .unwrap()
            .pop_front()
            .unwrap_or(Value::Null))
    }
}

/// A broadcast or tracker thread's share for one `--once` pass over `fake`: the
/// stop (`Finished`) already requested, one worker slot, an hour between looks.
pub fn once_side_thread(
    fake: &Arc<Fake>,
    backend: &Arc<Recorder>,
    status: SharedStatus,
) -> SideThread {
    let shutdown = Shutdown::new();
    shutdown.trigger(StopReason::Finished);
    SideThread {
        client: fake.clone(),
        backend: backend.clone(),
        status,
        shutdown,
        run: RunHandle::new(),
        every: Duration::from_secs(3600),
        concurrency: 1,
    }
}

/// A backend that notes every request it is handed and answers `ok`.
#[derive(Default)]
pub struct Recorder {
    seen: Mutex<Vec<Request>>,
}

impl Recorder {
    /// The requests so far, in order.
    pub fn seen(&self) -> Vec<Request> {
        self.seen.lock().unwrap().clone()
    }
}

impl Backend for Recorder {
    fn name(&self) -> &str {
        "recorder"
    }
    fn handle(&self, req: &Request, _: &RunHandle) -> Result<Outcome, BackendError> {
        self.seen.lock().unwrap().push(req.clone());
        Ok(Outcome::Reply(Reply {
            text: "ok".into(),
            parts: vec![],
        }))
    }
    fn check(&self) -> Result<String, BackendError> {
        Ok("recorder".into())
    }
}
