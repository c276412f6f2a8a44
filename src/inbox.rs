//! What an inbox row means (§API-2.4.1) and what we send back. Pure functions: row →
//! dispatch or skip (with the reason), row → backend request, reply → A2A envelope.
//! No I/O, no clocks.

use serde::Serialize;
use serde_json::{Value, json};

use crate::backend::{Origin, Request};
use crate::uuid::{WorkspaceId, is_uuid};
use crate::wire::ActivityRow;

/// A row we will hand to the backend.
#[derive(Debug, Clone)]
pub struct Inbound {
    /// Activity row id (the cursor value).
    pub activity_id: String,
    /// Sender workspace, `None` for canvas users.
    pub source_id: Option<WorkspaceId>,
    /// Inbound `messageId`.
    pub message_id: Option<String>,
    /// `params.message.metadata.in_reply_to`: the message is itself a reply.
    pub in_reply_to: Option<String>,
    /// Joined text parts.
    pub text: String,
    /// Non-text parts.
    pub other_parts: Vec<Value>,
    /// `contextId`.
    pub context_id: Option<String>,
    /// `taskId`.
    pub task_id: Option<String>,
    /// Sender name from `include=peer_info`.
    pub peer_name: Option<String>,
    /// Sender role from `include=peer_info`.
    pub peer_role: Option<String>,
    /// The envelope.
    pub raw: Value,
    /// The row's `created_at`, Unix µs (for the inbound-to-reply metric).
    pub created_at_us: Option<i64>,
    /// A platform notice about a request (answer turn, thread message, nudge):
    /// handed to the backend, never answered.
    pub is_request_update: bool,
    /// The request a notice is about, when it names one.
    pub request_id: Option<String>,
    /// File parts as `{uri, name, mimeType?, size?}`.
    pub attachments: Vec<Value>,
}

/// `messageId` prefixes of the platform's request notices (§API-2.19, §API-4.5).
const REQUEST_NOTICE_PREFIXES: [&str; 3] =
    ["request-responded:", "request-message:", "inbox-nudge-"];

impl Inbound {
    /// Where it came from.
    pub fn origin(&self) -> Origin {
        if self.is_request_update {
            Origin::RequestUpdate
        } else if self.source_id.is_some() {
            Origin::Peer
        } else {
            Origin::Canvas
        }
    }

    /// Ledger key for the inbound `messageId`, scoped to the sender.
    pub fn message_key(&self) -> Option<String> {
        self.message_id
            .as_ref()
            .map(|m| format!("m:{}:{m}", self.source_id.as_deref().unwrap_or("canvas")))
    }

    /// Who sent it, for logs: the peer's name, a short peer id, or the canvas user.
    pub fn sender_label(&self) -> String {
        match (&self.peer_name, &self.source_id) {
            (Some(n), _) => n.clone(),
            (None, Some(s)) => format!("peer {}", short_id(s)),
            (None, None) => "canvas user".to_string(),
        }
    }

    /// A short, single-line summary for `current_task` (and debug logs).
    pub fn summary(&self) -> String {
        let who = self.sender_label();
        let mut text: String = self.text.split_whitespace().collect::<Vec<_>>().join(" ");
        if text.chars().count() > 80 {
            text = text.chars().take(77).collect::<String>() + "...";
        }
        format!("reply to {who}: {text}")
    }

    /// The backend request for attempt number `attempt`.
    pub fn to_request(&self, workspace_id: &str, api_url: &str, attempt: u32) -> Request {
        Request {
            workspace_id: workspace_id.to_string(),
            api_url: api_url.to_string(),
            text: self.text.clone(),
            other_parts: self.other_parts.clone(),
            caller_id: self.source_id.as_ref().map(WorkspaceId::to_string),
            caller_name: self.peer_name.clone(),
            caller_role: self.peer_role.clone(),
            message_id: self.message_id.clone(),
            activity_id: self.activity_id.clone(),
            context_id: self.context_id.clone(),
            task_id: self.task_id.clone(),
            method: "message/send".into(),
            origin: self.origin(),
            attempt,
            raw: self.raw.clone(),
            extra_env: Default::default(),
            attachments: self.attachments.clone(),
            request_id: self.request_id.clone(),
        }
    }
}

/// Why a row is not dispatched. Every skipped row still advances the cursor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Skip {
    /// Our own `/notify` reply coming back (method `notify`, no source).
    NotifyEcho,
    /// A row we wrote about ourselves (source = own id).
    OwnSource,
    /// A delegation result pushed into our inbox (handled by delegation tracking).
    DelegationResult,
    /// A canvas file upload row: not a chat message by itself.
    Upload,
    /// A JSON-RPC method we do not serve.
    Method(String),
    /// A row we cannot use safely; the reason says why.
    Malformed(String),
}

impl Skip {
    /// Expected rows are skipped quietly; surprising ones deserve a warning.
    pub fn is_surprising(&self) -> bool {
        matches!(self, Skip::Method(_) | Skip::Malformed(_))
    }
}

impl std::fmt::Display for Skip {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Skip::NotifyEcho => write!(f, "own notify echo"),
            Skip::OwnSource => write!(f, "row from our own workspace"),
            Skip::DelegationResult => write!(f, "delegation result"),
            Skip::Upload => write!(f, "chat upload row"),
            Skip::Method(m) => write!(f, "method {m:?} is not message/send"),
            Skip::Malformed(why) => write!(f, "malformed row: {why}"),
        }
    }
}

/// One row of an activity page as an [`ActivityRow`], moving its fields out of the
/// JSON tree instead of rebuilding it (`serde_json::from_value` re-allocates every
/// map of the `request_body`). Same result as `from_value`; a row it would refuse
/// comes back with the same error, untouched.
pub fn activity_row(raw: Value) -> Result<ActivityRow, (serde_json::Error, Value)> {
    fn opt_str(v: Option<&Value>) -> bool {
        v.is_none_or(|v| v.is_null() || v.is_string())
    }
    let typed = raw.as_object().is_some_and(|map| {
        map.get("id").is_none_or(Value::is_string)
            && [
                "source_id",
                "method",
                "created_at",
                "peer_name",
                "peer_role",
            ]
            .iter()
            .all(|k| opt_str(map.get(*k)))
            && map
                .get("seq")
                .is_none_or(|v| v.is_null() || v.as_i64().is_some())
    });
    let Value::Object(mut map) = raw else {
        return slow_row(raw);
    };
    if !typed {
        return slow_row(Value::Object(map));
    }
    let mut text = |k: &str| match map.remove(k) {
        Some(Value::String(s)) => Some(s),
        _ => None,
    };
    let id = text("id").unwrap_or_default();
    let source_id = text("source_id");
    let method = text("method");
    let created_at = text("created_at");
    let peer_name = text("peer_name");
    let peer_role = text("peer_role");
    Ok(ActivityRow {
        id,
        source_id,
        method,
        created_at,
        peer_name,
        peer_role,
        seq: map.get("seq").and_then(Value::as_i64),
        request_body: map.remove("request_body").filter(|b| !b.is_null()),
    })
}

/// The row through serde (rows with a field of an unexpected type).
fn slow_row(raw: Value) -> Result<ActivityRow, (serde_json::Error, Value)> {
    use serde::Deserialize;
    ActivityRow::deserialize(&raw).map_err(|e| (e, raw))
}

/// Decides what to do with one `a2a_receive` row.
pub fn classify(row: &ActivityRow, own_id: &str) -> Result<Inbound, Skip> {
    classify_owned(row.clone(), own_id)
}

/// [`classify`], taking the row: its envelope becomes the message's `raw` without
/// a copy.
pub fn classify_owned(row: ActivityRow, own_id: &str) -> Result<Inbound, Skip> {
    let method = row.method.as_deref().unwrap_or("");
    let source = row.source_id.as_deref().filter(|s| !s.is_empty());
    if method == "notify" && source.is_none() {
        return Err(Skip::NotifyEcho);
    }
    if let Some(s) = source
        && s.eq_ignore_ascii_case(own_id)
    {
        return Err(if method == "delegate_result" {
            Skip::DelegationResult
        } else {
            Skip::OwnSource
        });
    }
    if method == "chat_upload_receive" {
        return Err(Skip::Upload);
    }
    if method == "delegate_result" {
        // A result row must come from ourselves; any other source is not ours to act on.
        return Err(Skip::Malformed(
            "delegate_result from a foreign source".into(),
        ));
    }
    if method != "message/send" {
        return Err(Skip::Method(method.to_string()));
    }
    let source_id = match source {
        None => None,
        Some(s) => Some(
            WorkspaceId::exact(s)
                .ok_or_else(|| Skip::Malformed(format!("source_id {s:?} is not a UUID")))?,
        ),
    };
    let Some(body) = row.request_body.as_ref() else {
        return Err(Skip::Malformed("no request_body".into()));
    };
    if !body.is_object() {
        return Err(Skip::Malformed("request_body is not a JSON object".into()));
    }
    let Some(message) = body.pointer("/params/message").filter(|m| m.is_object()) else {
        return Err(Skip::Malformed("no params.message".into()));
    };
    let (text, other_parts) = split_parts(message);
    if text.is_empty() && other_parts.is_empty() {
        return Err(Skip::Malformed("message has no usable parts".into()));
    }
    let str_field = |v: &Value, key: &str| v.get(key).and_then(Value::as_str).map(str::to_string);
    let message_id = str_field(message, "messageId");
    let is_request_update = source.is_none()
        && message_id
            .as_deref()
            .is_some_and(|m| REQUEST_NOTICE_PREFIXES.iter().any(|p| m.starts_with(p)));
    let request_id = if is_request_update {
        notice_request_id(message_id.as_deref().unwrap_or(""), &text)
    } else {
        None
    };
    let attachments = attachments_of(&other_parts);
    let in_reply_to = message
        .pointer("/metadata/in_reply_to")
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .map(str::to_string);
    let context_id = str_field(message, "contextId");
    let task_id = str_field(message, "taskId");
    let created_at_us = row
        .created_at
        .as_deref()
        .and_then(crate::timestamp::parse_rfc3339);
    let ActivityRow {
        id,
        request_body,
        peer_name,
        peer_role,
        ..
    } = row;
    Ok(Inbound {
        is_request_update,
        request_id,
        attachments,
        activity_id: id,
        source_id,
        message_id,
        in_reply_to,
        text,
        other_parts,
        context_id,
        task_id,
        peer_name: peer_name.filter(|s| !s.is_empty()),
        peer_role: peer_role.filter(|s| !s.is_empty()),
        raw: request_body.unwrap_or_default(),
        created_at_us,
    })
}

/// The request a notice is about: `request-responded:<rid>-<uuid>` names it; a
/// thread message's id names the message, so its text's `(id <rid>)` is used.
fn notice_request_id(message_id: &str, text: &str) -> Option<String> {
    let lead = |s: &str| s.get(..36).filter(|id| is_uuid(id)).map(str::to_string);
    if let Some(rest) = message_id.strip_prefix("request-responded:") {
        return lead(rest);
    }
    text.match_indices("(id ")
        .find_map(|(i, _)| text.get(i + 4..).and_then(lead))
}

/// Text parts (`kind` or `type` = `text`) joined with newlines, and the rest.
fn split_parts(message: &Value) -> (String, Vec<Value>) {
    if let Some(parts) = message.get("parts").and_then(Value::as_array) {
        let others = parts
            .iter()
            .filter(|p| p.is_object() && !is_text_part(p))
            .cloned()
            .collect();
        (text_of(parts), others)
    } else if let Some(content) = message.get("content").and_then(Value::as_str) {
        // A2A v0.2 shape; newer platforms convert it, older ones store it as is.
        (content.to_string(), Vec::new())
    } else {
        (String::new(), Vec::new())
    }
}

/// The text parts (`kind` or `type` = `text`) of an A2A parts array, joined with
/// newlines; anything else in it is ignored.
pub fn text_of_parts(parts: &Value) -> String {
    parts.as_array().map_or_else(String::new, |p| text_of(p))
}

fn text_of(parts: &[Value]) -> String {
    let texts: Vec<&str> = parts
        .iter()
        .filter(|p| is_text_part(p))
        .filter_map(|p| p.get("text").and_then(Value::as_str))
        .collect();
    texts.join("\n")
}

fn is_text_part(part: &Value) -> bool {
    part.get("kind")
        .or_else(|| part.get("type"))
        .and_then(Value::as_str)
        == Some("text")
}

/// The `messageId` of our reply to activity row `activity_id`: the same on every
/// attempt and after a restart, so the platform deduplicates a re-sent reply.
pub fn reply_message_id(own_id: &str, activity_id: &str) -> String {
    crate::uuid::v5(own_id, &format!("reply:{activity_id}"))
}

/// Where a message sits in a conversation: the A2A `contextId` that threads it and
/// the `messageId` it answers (our `metadata.in_reply_to` convention, §API-2.7.6).
#[derive(Debug, Clone, Copy, Default)]
pub struct Thread<'a> {
    /// The conversation; a reply carries the inbound message's.
    pub context_id: Option<&'a str>,
    /// The inbound `messageId` this answers.
    pub in_reply_to: Option<&'a str>,
}

/// A JSON-RPC `message/send` envelope holding one A2A v0.3.0 `Message`
/// (`kind:"message"`, `role:"user"` as the platform's runtimes send to peers,
/// `kind`-tagged parts). The only place that builds a message we send. As a `Value`
/// for the one-shot tools; the connector serializes [`Envelope`] straight to bytes.
pub fn message_send(message_id: &str, text: &str, extra_parts: &[Value], thread: Thread) -> Value {
    let env = Envelope::new(message_id, text, extra_parts, thread);
    // Plain strings, `Value`s and flags: nothing here can fail to serialize.
    serde_json::to_value(&env).unwrap_or_default()
}

/// A `message/send` envelope ([`message_send`]) borrowed from the reply it carries,
/// serialized without building a `Value` tree. Its fields are declared in the order
/// serde_json sorts an object's keys: the bytes are those of [`message_send`]'s
/// `Value`.
#[derive(Debug, Serialize)]
pub struct Envelope<'a> {
    id: String,
    jsonrpc: &'static str,
    method: &'static str,
    params: Params<'a>,
}

#[derive(Debug, Serialize)]
struct Params<'a> {
    message: Message<'a>,
}

#[derive(Debug, Serialize)]
struct Message<'a> {
    #[serde(rename = "contextId", skip_serializing_if = "Option::is_none")]
    context_id: Option<&'a str>,
    kind: &'static str,
    #[serde(rename = "messageId")]
    message_id: &'a str,
    #[serde(skip_serializing_if = "Metadata::is_empty")]
    metadata: Metadata<'a>,
    parts: Parts<'a>,
    role: &'static str,
}

#[derive(Debug, Serialize)]
struct Metadata<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    in_reply_to: Option<&'a str>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    molecule_error: bool,
}

impl Metadata<'_> {
    fn is_empty(&self) -> bool {
        self.in_reply_to.is_none() && !self.molecule_error
    }
}

/// The text part (when there is text), then the extra parts as they are.
#[derive(Debug)]
struct Parts<'a> {
    text: &'a str,
    extra: &'a [Value],
}

#[derive(Serialize)]
struct TextPart<'a> {
    kind: &'static str,
    text: &'a str,
}

impl Serialize for Parts<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeSeq;
        let text = !self.text.is_empty();
        let mut seq = s.serialize_seq(Some(usize::from(text) + self.extra.len()))?;
        if text {
            seq.serialize_element(&TextPart {
                kind: "text",
                text: self.text,
            })?;
        }
        for part in self.extra {
            seq.serialize_element(part)?;
        }
        seq.end()
    }
}

impl<'a> Envelope<'a> {
    /// The envelope of [`message_send`], with a fresh JSON-RPC id.
    pub fn new(
        message_id: &'a str,
        text: &'a str,
        extra_parts: &'a [Value],
        thread: Thread<'a>,
    ) -> Self {
        Envelope {
            id: crate::uuid::new_v4(),
            jsonrpc: "2.0",
            method: "message/send",
            params: Params {
                message: Message {
                    context_id: thread.context_id,
                    kind: "message",
                    message_id,
                    metadata: Metadata {
                        in_reply_to: thread.in_reply_to,
                        molecule_error: false,
                    },
                    parts: Parts {
                        text,
                        extra: extra_parts,
                    },
                    role: "user",
                },
            },
        }
    }

    /// The envelope of our reply to `msg` ([`reply_envelope`]); an `error` reply
    /// (telling the sender its message failed) carries `metadata.molecule_error`.
    pub fn reply(
        message_id: &'a str,
        text: &'a str,
        extra_parts: &'a [Value],
        msg: &'a Inbound,
        error: bool,
    ) -> Self {
        let mut env = Envelope::new(message_id, text, extra_parts, thread_of(msg));
        env.params.message.metadata.molecule_error = error;
        env
    }

    /// The JSON bytes, as `serde_json::to_vec` of [`message_send`]'s `Value`.
    pub fn to_vec(&self) -> Vec<u8> {
        let m = &self.params.message;
        let guess = 256 + m.parts.text.len() + m.parts.extra.len() * 128;
        let mut out = Vec::with_capacity(guess);
        // Plain strings, `Value`s and flags: writing into a Vec cannot fail.
        let _ = serde_json::to_writer(&mut out, self);
        out
    }

    /// The text a self-report summarizes: the first part's that has one.
    fn first_text(&self) -> &str {
        let parts = &self.params.message.parts;
        if !parts.text.is_empty() {
            return parts.text;
        }
        parts
            .extra
            .iter()
            .find_map(|p| p.get("text").and_then(Value::as_str))
            .unwrap_or("")
    }

    /// The `a2a_send` self-report of this envelope sent to `peer` (§API-2.6), as JSON
    /// bytes around `bytes`, this envelope's own ([`Envelope::to_vec`]): the envelope
    /// is serialized once for both posts. The platform never logs our side of a
    /// conversation in our own log, so without it `/activity?peer_id=` (history)
    /// shows only the peer's words (§API-2.21).
    pub fn report(&self, peer: &str, bytes: &[u8]) -> Vec<u8> {
        let summary = report_summary(self.first_text());
        let mut out = Vec::with_capacity(bytes.len() + summary.len() + peer.len() + 128);
        // The keys of `send_report`'s object, in serde_json's (sorted) order.
        out.extend_from_slice(
            br#"{"activity_type":"a2a_send","method":"message/send","request_body":"#,
        );
        out.extend_from_slice(bytes);
        out.extend_from_slice(br#","summary":"#);
        let _ = serde_json::to_writer(&mut out, &summary);
        out.extend_from_slice(br#","target_id":"#);
        let _ = serde_json::to_writer(&mut out, peer);
        out.push(b'}');
        out
    }
}

fn thread_of(msg: &Inbound) -> Thread<'_> {
    Thread {
        context_id: msg.context_id.as_deref(),
        in_reply_to: msg.message_id.as_deref(),
    }
}

/// The `message/send` envelope of our reply to `msg` (§API-2.7.6): threaded by the
/// inbound `contextId` and marked as answering its `messageId`.
pub fn reply_envelope(message_id: &str, text: &str, extra_parts: &[Value], msg: &Inbound) -> Value {
    message_send(message_id, text, extra_parts, thread_of(msg))
}

/// The `a2a_send` self-report of a message we sent to `peer` (§API-2.6), as a JSON
/// tree: what [`Envelope::report`] must write.
#[cfg(test)]
fn send_report(peer: &str, envelope: &Value) -> Value {
    let text = envelope
        .pointer("/params/message/parts")
        .and_then(Value::as_array)
        .and_then(|parts| {
            parts
                .iter()
                .find_map(|p| p.get("text").and_then(Value::as_str))
        })
        .unwrap_or("");
    json!({
        "activity_type": "a2a_send",
        "method": "message/send",
        "target_id": peer,
        "summary": report_summary(text),
        "request_body": envelope,
    })
}

/// Summary characters of a self-report: longer text is cut to one less and `…`.
const SUMMARY_CHARS: usize = 120;

/// A self-report's `summary` of `text`: its words joined by single spaces, cut at
/// [`SUMMARY_CHARS`]. Stops copying once it knows the text is longer.
fn report_summary(text: &str) -> String {
    let mut out = String::new();
    let mut chars = 0;
    'words: for word in text.split_whitespace() {
        if chars > 0 {
            out.push(' ');
            chars += 1;
        }
        for c in word.chars() {
            if chars > SUMMARY_CHARS {
                break 'words;
            }
            out.push(c);
            chars += 1;
        }
    }
    if chars > SUMMARY_CHARS {
        let end = out
            .char_indices()
            .nth(SUMMARY_CHARS - 1)
            .map_or(out.len(), |(i, _)| i);
        out.truncate(end);
        out.push('…');
    }
    out
}

/// File parts of a reply as `/notify` attachments (`uri` and `name` required).
pub fn attachments_of(parts: &[Value]) -> Vec<Value> {
    parts
        .iter()
        .filter_map(|p| {
            let file = p.get("file")?;
            let uri = file.get("uri")?.as_str()?;
            let name = file.get("name")?.as_str()?;
            let mut a = json!({"uri": uri, "name": name});
            if let Some(m) = file.get("mimeType").or_else(|| file.get("mime_type")) {
                a["mimeType"] = m.clone();
            }
            if let Some(s) = file.get("size").filter(|s| s.is_u64()) {
                a["size"] = s.clone();
            }
            Some(a)
        })
        .collect()
}

fn short_id(id: &str) -> &str {
    id.get(..8).unwrap_or(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_text() {
        let parts = json!([{"kind":"text","text":"a"},{"type":"text","text":"b"},
                           {"kind":"file","file":{}},{"kind":"text"}]);
        assert_eq!(text_of_parts(&parts), "a\nb");
        assert_eq!(text_of_parts(&json!("x")), "");
    }

    const OWN: &str = "11111111-1111-4111-8111-111111111111";
    const PEER: &str = "22222222-2222-4222-8222-222222222222";

    fn row(v: Value) -> ActivityRow {
        serde_json::from_value(v).unwrap()
    }

    fn msg_row(source: Option<&str>, parts: Value) -> ActivityRow {
        row(json!({
            "id": "33333333-3333-4333-8333-333333333333",
            "activity_type": "a2a_receive",
            "source_id": source,
            "method": "message/send",
            "request_body": {"jsonrpc":"2.0","method":"message/send","params":{"message":{
                "role":"user","messageId":"m-1","contextId":"c-1","parts": parts,
                "metadata": {"in_reply_to": "orig"}}}}
        }))
    }

    #[test]
    fn dispatches_kind_and_type_parts() {
        for key in ["kind", "type"] {
            let r = msg_row(
                Some(PEER),
                json!([{key: "text", "text": "hello"}, {key: "text", "text": "world"}]),
            );
            let m = classify(&r, OWN).unwrap();
            assert_eq!(m.text, "hello\nworld");
            assert_eq!(m.origin(), Origin::Peer);
            assert_eq!(m.message_id.as_deref(), Some("m-1"));
            assert_eq!(m.context_id.as_deref(), Some("c-1"));
            assert_eq!(m.in_reply_to.as_deref(), Some("orig"));
            assert_eq!(m.message_key().unwrap(), format!("m:{PEER}:m-1"));
        }
    }

    #[test]
    fn file_parts_are_kept() {
        let r = msg_row(None, json!([{"kind":"file","file":{"uri":"u","name":"n"}}]));
        let m = classify(&r, OWN).unwrap();
        assert_eq!(m.text, "");
        assert_eq!(m.other_parts.len(), 1);
        assert_eq!(m.origin(), Origin::Canvas);
    }

    #[test]
    fn skips_per_contract() {
        let echo = row(
            json!({"id":"x","method":"notify","source_id":null,"response_body":{"result":"hi"}}),
        );
        assert_eq!(classify(&echo, OWN).unwrap_err(), Skip::NotifyEcho);
        let own = msg_row(Some(OWN), json!([{"kind":"text","text":"x"}]));
        assert_eq!(classify(&own, OWN).unwrap_err(), Skip::OwnSource);
        let dr = row(
            json!({"id":"x","method":"delegate_result","source_id":OWN,"request_body":{"delegation_id":"d"}}),
        );
        assert_eq!(classify(&dr, OWN).unwrap_err(), Skip::DelegationResult);
        let foreign_dr = row(json!({"id":"x","method":"delegate_result","source_id":PEER}));
        assert!(matches!(
            classify(&foreign_dr, OWN).unwrap_err(),
            Skip::Malformed(_)
        ));
        let up = row(
            json!({"id":"x","method":"chat_upload_receive","source_id":null,"request_body":{}}),
        );
        assert_eq!(classify(&up, OWN).unwrap_err(), Skip::Upload);
        let other = row(json!({"id":"x","method":"tasks/get","source_id":PEER,"request_body":{}}));
        assert_eq!(
            classify(&other, OWN).unwrap_err(),
            Skip::Method("tasks/get".into())
        );
    }

    #[test]
    fn malformed_rows_never_dispatch() {
        let cases = [
            json!({"id":"x","method":"message/send","source_id":PEER}),
            json!({"id":"x","method":"message/send","source_id":PEER,"request_body":"not json {"}),
            json!({"id":"x","method":"message/send","source_id":PEER,"request_body":{"params":{}}}),
            json!({"id":"x","method":"message/send","source_id":"../../etc","request_body":{"params":{"message":{"parts":[{"kind":"text","text":"x"}]}}}}),
            json!({"id":"x","method":"message/send","source_id":PEER,"request_body":{"params":{"message":{"parts":[]}}}}),
            json!({"id":"x","method":"message/send","source_id":PEER,"request_body":{"params":{"message":{"parts":"nope"}}}}),
        ];
        for c in cases {
            let e = classify(&row(c.clone()), OWN).unwrap_err();
            assert!(matches!(e, Skip::Malformed(_)), "{c}: {e:?}");
            assert!(e.is_surprising());
        }
    }

    #[test]
    fn rows_are_read_as_serde_reads_them() {
        let body = json!({"params":{"message":{"parts":[{"kind":"text","text":"x"}]}}});
        let cases = [
            json!({"id":"a","seq":7,"source_id":PEER,"method":"message/send","request_body":body,
                   "created_at":"2026-01-01T00:00:00Z","peer_name":"n","peer_role":"r","extra":[1]}),
            json!({"id":"a","seq":null,"source_id":null,"request_body":null}),
            json!({}),
            json!({"id":5}),
            json!({"id":null}),
            json!({"id":"a","seq":1.5}),
            json!({"id":"a","seq":u64::MAX}),
            json!({"id":"a","method":["x"]}),
            json!({"id":"a","peer_role":7}),
            json!("not a row"),
            json!(null),
        ];
        for c in cases {
            let want = serde_json::from_value::<ActivityRow>(c.clone());
            match (activity_row(c.clone()), want) {
                (Ok(got), Ok(want)) => assert_eq!(format!("{got:?}"), format!("{want:?}"), "{c}"),
                (Err((got, back)), Err(want)) => {
                    assert_eq!(got.to_string(), want.to_string(), "{c}");
                    assert_eq!(back, c, "the row comes back untouched");
                }
                (got, want) => panic!("{c}: {got:?} vs {want:?}"),
            }
        }
    }

    #[test]
    fn classify_owned_moves_the_envelope() {
        let r = msg_row(Some(PEER), json!([{"kind":"text","text":"hi"}]));
        let body = r.request_body.clone().unwrap();
        let m = classify_owned(r.clone(), OWN).unwrap();
        assert_eq!(m.raw, body);
        assert_eq!(
            format!("{m:?}"),
            format!("{:?}", classify(&r, OWN).unwrap())
        );
    }

    #[test]
    fn v02_content_string() {
        let r = row(json!({"id":"x","method":"message/send","source_id":null,
            "request_body":{"params":{"message":{"content":"old style"}}}}));
        assert_eq!(classify(&r, OWN).unwrap().text, "old style");
    }

    #[test]
    fn reply_ids_are_deterministic() {
        let a = reply_message_id(OWN, "row-1");
        assert_eq!(a, reply_message_id(OWN, "row-1"));
        assert_ne!(a, reply_message_id(OWN, "row-2"));
        assert_ne!(a, reply_message_id(PEER, "row-1"));
        assert!(is_uuid(&a));
    }

    #[test]
    fn envelope_shape() {
        let r = msg_row(Some(PEER), json!([{"kind":"text","text":"ping"}]));
        let inbound = classify(&r, OWN).unwrap();
        let e = reply_envelope("mid", "pong", &[], &inbound);
        assert_eq!(e["method"], "message/send");
        assert_eq!(e["jsonrpc"], "2.0");
        let m = &e["params"]["message"];
        assert_eq!(m["kind"], "message");
        assert_eq!(m["role"], "user");
        assert_eq!(m["messageId"], "mid");
        assert_eq!(m["contextId"], "c-1");
        assert_eq!(m["parts"], json!([{"kind":"text","text":"pong"}]));
        assert_eq!(m["metadata"]["in_reply_to"], "m-1");
        let e = message_send("mid", "x", &[], Thread::default());
        let m = &e["params"]["message"];
        assert_eq!(m["kind"], "message");
        assert!(m.get("metadata").is_none());
        assert!(m.get("contextId").is_none());
    }

    /// `message_send` as it was built before [`Envelope`]: the bytes must not change.
    fn old_message_send(
        message_id: &str,
        text: &str,
        extra: &[Value],
        thread: Thread,
        id: &str,
    ) -> Value {
        let mut parts = Vec::with_capacity(1 + extra.len());
        if !text.is_empty() {
            parts.push(json!({"kind": "text", "text": text}));
        }
        parts.extend(extra.iter().cloned());
        let mut message = json!({
            "kind": "message",
            "role": "user",
            "messageId": message_id,
            "parts": parts,
        });
        if let Some(c) = thread.context_id {
            message["contextId"] = json!(c);
        }
        if let Some(id) = thread.in_reply_to {
            message["metadata"] = json!({"in_reply_to": id});
        }
        json!({
            "jsonrpc": "2.0",
            "id": id,
            "method": "message/send",
            "params": {"message": message},
        })
    }

    /// `send_report` as it was before [`report_summary`].
    fn old_summary(text: &str) -> String {
        let mut summary: String = text.split_whitespace().collect::<Vec<_>>().join(" ");
        if summary.chars().count() > 120 {
            summary = summary.chars().take(119).collect::<String>() + "…";
        }
        summary
    }

    #[test]
    fn envelope_and_report_bytes_are_those_of_the_value_built_before() {
        let file = json!({"kind": "file", "file": {"uri": "u", "name": "a \"b\".png", "size": 3}});
        let odd = json!({"kind": "data", "text": "from a part\n", "data": {"z": 1, "a": [null]}});
        let long = format!("  é\t{}\n\u{2003}x ", "ü ".repeat(90));
        let texts = ["pong", "", "line 1\nline \"2\" \u{1F600}", long.as_str()];
        let extras: [&[Value]; 3] = [
            &[],
            std::slice::from_ref(&file),
            &[odd.clone(), file.clone()],
        ];
        let threads = [
            Thread::default(),
            Thread {
                context_id: Some("c-1"),
                in_reply_to: None,
            },
            Thread {
                context_id: None,
                in_reply_to: Some("m-1"),
            },
            Thread {
                context_id: Some("c\u{1}"),
                in_reply_to: Some("m-1"),
            },
        ];
        for text in texts {
            for extra in extras {
                for thread in threads {
                    for error in [false, true] {
                        let mut env = Envelope::new("mid", text, extra, thread);
                        env.params.message.metadata.molecule_error = error;
                        let mut old = old_message_send("mid", text, extra, thread, &env.id);
                        if error {
                            old["params"]["message"]["metadata"]["molecule_error"] = json!(true);
                        }
                        let bytes = env.to_vec();
                        assert_eq!(
                            String::from_utf8(bytes.clone()).unwrap(),
                            serde_json::to_string(&old).unwrap()
                        );
                        let report = env.report(PEER, &bytes);
                        assert_eq!(
                            String::from_utf8(report).unwrap(),
                            serde_json::to_string(&send_report(PEER, &old)).unwrap()
                        );
                        if !error {
                            let value = message_send("mid", text, extra, thread);
                            let mut old = old;
                            old["id"] = value["id"].clone();
                            assert_eq!(value, old);
                        }
                    }
                }
            }
        }
        let r = msg_row(Some(PEER), json!([{"kind":"text","text":"ping"}]));
        let inbound = classify(&r, OWN).unwrap();
        let env = Envelope::reply("mid", "pong", &[], &inbound, true);
        let value: Value = serde_json::from_slice(&env.to_vec()).unwrap();
        assert_eq!(value["params"]["message"]["contextId"], "c-1");
        assert_eq!(
            value["params"]["message"]["metadata"],
            json!({"in_reply_to": "m-1", "molecule_error": true})
        );
    }

    #[test]
    fn report_summary_is_the_joined_words_cut_as_before() {
        let mut cases = vec![String::new(), " \n\t ".into(), "a  b\n c".into()];
        for n in [118, 119, 120, 121, 122, 300] {
            cases.push("x".repeat(n));
            cases.push("é".repeat(n));
            cases.push(format!("{} {}", "y".repeat(n - 2), "zz"));
            cases.push(format!("{}  \n w", "y".repeat(n.min(120))));
            cases.push("ab ".repeat(n / 3 + 1));
        }
        for c in &cases {
            assert_eq!(report_summary(c), old_summary(c), "{c:?}");
        }
    }

    #[test]
    fn summary_is_short_single_line() {
        let r = msg_row(
            None,
            json!([{"kind":"text","text": format!("a\nb {}", "x".repeat(200))}]),
        );
        let s = classify(&r, OWN).unwrap().summary();
        assert!(!s.contains('\n'));
        assert!(s.chars().count() < 120, "{s}");
    }
}
