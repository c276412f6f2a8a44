//! Reply parts from a backend (exec `format=json`, the worker's `parts`), held to the
//! A2A v0.3.0 `Part` schema before they are posted: `TextPart | FilePart | DataPart`,
//! a file being `FileWithBytes | FileWithUri`. A malformed part fails its request like
//! any malformed answer, rather than going out in a message the schema refuses.
//! Pure: no I/O.

use serde_json::{Map, Value};

/// `part` in A2A shape (an older agent's `type` stands for a missing `kind`), or why
/// it is not a valid A2A part.
pub(super) fn a2a_part(part: Value) -> Result<Value, String> {
    let Value::Object(mut part) = part else {
        return Err(format!("{} is not an object", kind_of(&part)));
    };
    if !part.contains_key("kind")
        && let Some(t) = part.get("type").cloned()
    {
        part.insert("kind".into(), t);
    }
    if part.get("metadata").is_some_and(|m| !m.is_object()) {
        return Err("\"metadata\" is not an object".into());
    }
    match part.get("kind").and_then(Value::as_str) {
        Some("text") => match part.get("text") {
            Some(Value::String(_)) => {}
            None => return Err("a text part has no \"text\"".into()),
            Some(t) => return Err(format!("a text part's \"text\" is {}", kind_of(t))),
        },
        Some("file") => match part.get("file") {
            Some(Value::Object(file)) => check_file(file)?,
            _ => return Err("a file part has no \"file\" object".into()),
        },
        Some("data") => match part.get("data") {
            Some(Value::Object(_)) => {}
            _ => return Err("a data part has no \"data\" object".into()),
        },
        Some(other) => {
            return Err(format!(
                "kind {other:?} is not \"text\", \"file\" or \"data\""
            ));
        }
        None => return Err("no \"kind\" (\"text\", \"file\" or \"data\")".into()),
    }
    Ok(Value::Object(part))
}

/// `FileWithBytes | FileWithUri`: content as a `bytes` or a `uri` string, and a
/// `name` and `mimeType`, when there, that are strings.
fn check_file(file: &Map<String, Value>) -> Result<(), String> {
    for key in ["name", "mimeType"] {
        if file.get(key).is_some_and(|v| !v.is_string()) {
            return Err(format!("a file part's \"{key}\" is not a string"));
        }
    }
    let is_string = |key| file.get(key).is_some_and(Value::is_string);
    if is_string("uri") || is_string("bytes") {
        Ok(())
    } else {
        Err("a file part's \"file\" has no \"uri\" or \"bytes\" string".into())
    }
}

fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn valid_parts_pass_unchanged() {
        for part in [
            json!({"kind": "text", "text": "hi", "metadata": {"k": 1}}),
            json!({"kind": "file", "file": {"uri": "https://x/a.png", "name": "a.png",
                   "mimeType": "image/png"}}),
            json!({"kind": "file", "file": {"bytes": "aGk="}, "extra": true}),
            json!({"kind": "data", "data": {}}),
        ] {
            assert_eq!(a2a_part(part.clone()), Ok(part));
        }
        // `type` stands for a missing `kind`.
        assert_eq!(
            a2a_part(json!({"type": "data", "data": {"n": 1}})),
            Ok(json!({"type": "data", "kind": "data", "data": {"n": 1}}))
        );
    }

    #[test]
    fn each_kind_of_malformed_part_is_refused_with_a_reason() {
        for (part, why) in [
            (json!("text"), "a string is not an object"),
            (
                json!({"text": "hi"}),
                "no \"kind\" (\"text\", \"file\" or \"data\")",
            ),
            (
                json!({"kind": "image", "uri": "u"}),
                "kind \"image\" is not \"text\", \"file\" or \"data\"",
            ),
            (json!({"kind": "text"}), "a text part has no \"text\""),
            (
                json!({"kind": "text", "text": 5}),
                "a text part's \"text\" is a number",
            ),
            (
                json!({"type": "file", "uri": "u"}),
                "a file part has no \"file\" object",
            ),
            (
                json!({"kind": "file", "file": {"name": "a.txt"}}),
                "a file part's \"file\" has no \"uri\" or \"bytes\" string",
            ),
            (
                json!({"kind": "file", "file": {"uri": 1}}),
                "a file part's \"file\" has no \"uri\" or \"bytes\" string",
            ),
            (
                json!({"kind": "file", "file": {"uri": "u", "name": 3}}),
                "a file part's \"name\" is not a string",
            ),
            (
                json!({"kind": "data", "data": [1]}),
                "a data part has no \"data\" object",
            ),
            (
                json!({"kind": "text", "text": "hi", "metadata": "x"}),
                "\"metadata\" is not an object",
            ),
        ] {
            assert_eq!(a2a_part(part.clone()), Err(why.to_string()), "{part}");
        }
    }
}
