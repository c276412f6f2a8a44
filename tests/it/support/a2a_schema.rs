//! A small JSON Schema (draft-07) checker for the keywords the A2A v0.3.0 schema uses
//! on the objects we send: `$ref`, `type`, `properties`, `required`, `const`, `enum`,
//! `items`, `anyOf`, `additionalProperties`. Enough to hold every body we send to the
//! published schema without a dev-dependency; an unknown keyword fails loudly so the
//! checker never passes something it did not look at.

use serde_json::Value;

/// The A2A v0.3.0 schema, copied verbatim from the specification.
const SCHEMA: &str = include_str!("a2a-v0.3.0.json");

/// Keywords that carry no constraint.
const ANNOTATIONS: [&str; 4] = ["description", "default", "examples", "title"];

/// Checks `value` against `#/definitions/<definition>`; the error lists every
/// violation with its JSON pointer.
pub fn validate(definition: &str, value: &Value) -> Result<(), String> {
    let schema: Value = serde_json::from_str(SCHEMA).expect("the bundled schema is JSON");
    let root = Checker { schema: &schema };
    let target = root.resolve(&format!("#/definitions/{definition}"));
    let mut errors = Vec::new();
    root.check(target, value, "", &mut errors);
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors.join("; "))
    }
}

/// Panics unless `body` is a valid A2A v0.3.0 `message/send` request.
pub fn assert_valid(body: &Value) {
    if let Err(e) = validate("SendMessageRequest", body) {
        panic!("not valid A2A v0.3.0: {e}\nbody: {body}");
    }
}

struct Checker<'a> {
    schema: &'a Value,
}

impl<'a> Checker<'a> {
    fn resolve(&self, reference: &str) -> &'a Value {
        let pointer = reference
            .strip_prefix('#')
            .unwrap_or_else(|| panic!("only local $ref supported: {reference}"));
        self.schema
            .pointer(pointer)
            .unwrap_or_else(|| panic!("dangling $ref {reference}"))
    }

    fn check(&self, schema: &'a Value, v: &Value, at: &str, errors: &mut Vec<String>) {
        let Some(rules) = schema.as_object() else {
            panic!("schema at {at} is not an object");
        };
        for (key, rule) in rules {
            match key.as_str() {
                "$ref" => self.check(self.resolve(rule.as_str().unwrap()), v, at, errors),
                "type" => {
                    let ok = match rule {
                        Value::String(t) => has_type(v, t),
                        Value::Array(ts) => ts.iter().any(|t| has_type(v, t.as_str().unwrap())),
                        _ => panic!("bad type rule at {at}"),
                    };
                    if !ok {
                        errors.push(format!("{at}: {v} is not of type {rule}"));
                    }
                }
                "const" if v != rule => errors.push(format!("{at}: {v} is not {rule}")),
                "enum" if !rule.as_array().unwrap().contains(v) => {
                    errors.push(format!("{at}: {v} is not one of {rule}"));
                }
                "const" | "enum" => {}
                "required" => {
                    if let Some(obj) = v.as_object() {
                        for name in rule.as_array().unwrap() {
                            let name = name.as_str().unwrap();
                            if !obj.contains_key(name) {
                                errors.push(format!("{at}: missing required {name:?}"));
                            }
                        }
                    }
                }
                "properties" => {
                    if let Some(obj) = v.as_object() {
                        for (name, sub) in rule.as_object().unwrap() {
                            if let Some(child) = obj.get(name) {
                                self.check(sub, child, &format!("{at}/{name}"), errors);
                            }
                        }
                    }
                }
                "additionalProperties" => {
                    let known = rules.get("properties").and_then(Value::as_object);
                    if let Some(obj) = v.as_object() {
                        for (name, child) in obj {
                            if known.is_some_and(|k| k.contains_key(name)) {
                                continue;
                            }
                            match rule {
                                Value::Bool(false) => {
                                    errors.push(format!("{at}: unexpected property {name:?}"));
                                }
                                Value::Bool(true) => {}
                                sub => self.check(sub, child, &format!("{at}/{name}"), errors),
                            }
                        }
                    }
                }
                "items" => {
                    if let Some(items) = v.as_array() {
                        for (i, item) in items.iter().enumerate() {
                            self.check(rule, item, &format!("{at}/{i}"), errors);
                        }
                    }
                }
                "anyOf" => {
                    let branches = rule.as_array().unwrap();
                    let fits = branches.iter().any(|b| {
                        let mut e = Vec::new();
                        self.check(b, v, at, &mut e);
                        e.is_empty()
                    });
                    if !fits {
                        errors.push(format!("{at}: {v} matches none of anyOf"));
                    }
                }
                k if ANNOTATIONS.contains(&k) => {}
                k => panic!("schema keyword {k:?} at {at} is not supported by this checker"),
            }
        }
    }
}

fn has_type(v: &Value, t: &str) -> bool {
    match t {
        "object" => v.is_object(),
        "array" => v.is_array(),
        "string" => v.is_string(),
        "boolean" => v.is_boolean(),
        "null" => v.is_null(),
        "number" => v.is_number(),
        "integer" => v.is_i64() || v.is_u64(),
        other => panic!("unknown JSON type {other:?}"),
    }
}

#[test]
fn the_checker_rejects_what_the_schema_forbids() {
    use serde_json::json;
    let good = json!({"jsonrpc":"2.0","id":"1","method":"message/send","params":{"message":{
        "kind":"message","role":"user","messageId":"m","parts":[{"kind":"text","text":"hi"}]}}});
    validate("SendMessageRequest", &good).unwrap();
    let cases = [
        ("/params/message/kind", json!(null)),
        ("/params/message/role", json!("assistant")),
        ("/params/message/parts/0/kind", json!("txt")),
        ("/params/message/parts/0/text", json!(5)),
        ("/jsonrpc", json!("1.0")),
    ];
    for (pointer, bad) in cases {
        let mut v = good.clone();
        if bad.is_null() {
            v["params"]["message"]
                .as_object_mut()
                .unwrap()
                .remove("kind");
        } else {
            *v.pointer_mut(pointer).unwrap() = bad;
        }
        assert!(
            validate("SendMessageRequest", &v).is_err(),
            "{pointer} accepted"
        );
    }
}
