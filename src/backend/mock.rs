//! The `mock` backend: answers every message from a fixed template, for demos and
//! tests. It must not spawn processes, touch files or the network.

use std::collections::BTreeMap;

use super::{Backend, BackendError, Outcome, Reply, Request, RunHandle};

/// Option names the mock backend accepts, for error messages.
const KNOWN: &str = "reply";
/// Default reply template; `%s` becomes the request text.
const DEFAULT_REPLY: &str = "echo: %s";

/// Replies with `reply` (default `echo: %s`), every `%s` replaced by the request text.
#[derive(Debug, Clone)]
pub struct MockBackend {
    template: String,
}

impl MockBackend {
    /// Builds the backend from `--backend-opt` pairs (only `reply` is known).
    pub fn from_opts(opts: &BTreeMap<String, String>) -> Result<Self, BackendError> {
        let mut template = DEFAULT_REPLY.to_string();
        for (key, value) in opts {
            match key.as_str() {
                "reply" => template.clone_from(value),
                other => {
                    return Err(BackendError::Config(format!(
                        "mock: unknown option {other:?} (known: {KNOWN})"
                    )));
                }
            }
        }
        Ok(Self { template })
    }
}

impl Backend for MockBackend {
    fn name(&self) -> &str {
        "mock"
    }

    fn handle(&self, req: &Request, _handle: &RunHandle) -> Result<Outcome, BackendError> {
        Ok(Outcome::Reply(Reply {
            text: self.template.replace("%s", &req.text),
            parts: vec![],
        }))
    }

    fn check(&self) -> Result<String, BackendError> {
        Ok(format!("mock backend, reply template {:?}", self.template))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::Origin;

    fn req(text: &str) -> Request {
        Request {
            workspace_id: "ws-1".into(),
            api_url: "http://127.0.0.1:1".into(),
            text: text.into(),
            other_parts: vec![],
            caller_id: None,
            caller_name: None,
            caller_role: None,
            message_id: None,
            activity_id: "act-1".into(),
            context_id: None,
            task_id: None,
            method: "message/send".into(),
            origin: Origin::Canvas,
            attempt: 1,
            raw: serde_json::Value::Null,
            extra_env: BTreeMap::new(),
            attachments: Vec::new(),
            request_id: None,
        }
    }

    fn opts(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn text_of(out: Outcome) -> String {
        match out {
            Outcome::Reply(r) => r.text,
            Outcome::NoReply => panic!("expected a reply"),
        }
    }

    #[test]
    fn default_template_echoes() {
        let b = MockBackend::from_opts(&opts(&[])).unwrap();
        let out = b.handle(&req("hi"), &RunHandle::new()).unwrap();
        assert_eq!(text_of(out), "echo: hi");
        assert_eq!(b.name(), "mock");
        assert!(b.check().unwrap().contains("echo: %s"));
    }

    #[test]
    fn custom_template_replaces_every_placeholder() {
        let b = MockBackend::from_opts(&opts(&[("reply", "%s and %s, no %d")])).unwrap();
        let out = b.handle(&req("x"), &RunHandle::new()).unwrap();
        assert_eq!(text_of(out), "x and x, no %d");
    }

    #[test]
    fn unknown_option_is_config_error() {
        let err = MockBackend::from_opts(&opts(&[("x", "1")])).unwrap_err();
        match err {
            BackendError::Config(m) => assert_eq!(m, "mock: unknown option \"x\" (known: reply)"),
            other => panic!("unexpected {other:?}"),
        }
    }
}
