//! `molecule history` (§API-2.21): a conversation, oldest first. With a peer, from our
//! own activity log (`/activity?peer_id=`), where our side is there only because we
//! self-report each message we send (`a2a_send`); with the human, `/chat-history`.
//! Both page backwards with `before_ts`, which compares `created_at` strictly: the
//! next page starts one microsecond after the oldest row seen and rows already seen
//! are dropped by id, so rows sharing the boundary timestamp are not lost.

use std::collections::HashSet;

use serde_json::{Value, json};

use super::{Budget, Ctx, Failure, LIST_LIMIT, Report, describe, str_of};
use crate::config::tools::History;
use crate::timestamp::{parse_rfc3339 as parse_micros, rfc3339 as format_micros};

/// The two conversations.
#[derive(Clone, Copy)]
enum Source<'a> {
    Peer(&'a str),
    Canvas,
}

pub(super) fn run(ctx: &Ctx, h: &History) -> Result<Report, Failure> {
    let budget = Budget::start(h.budget_secs);
    let source = match &h.peer {
        Some(p) => Source::Peer(p),
        None => Source::Canvas,
    };
    let limit = h.limit;
    let mut before = h.before;
    let page_max: u32 = match source {
        Source::Peer(_) => 500,
        Source::Canvas => 1000,
    };
    let mut seen: HashSet<String> = HashSet::new();
    // Newest first while paging; reversed at the end.
    let mut entries: Vec<Value> = Vec::new();
    let mut inclusive = false;
    let mut partial = false;
    while entries.len() < limit as usize {
        let want = (limit as usize - entries.len()).min(page_max as usize);
        // Re-reading the boundary timestamp costs the rows seen there: ask for them too.
        let ask = (want
            + if inclusive {
                seen_at_boundary(&entries)
            } else {
                0
            })
        .min(page_max as usize);
        let before_ts = before.map(|t| format_micros(if inclusive { t + 1 } else { t }));
        let page = fetch(ctx, &budget, source, ask, before_ts.as_deref())?;
        let full = page.len() >= ask;
        let mut fresh = 0usize;
        let mut oldest = before;
        for item in page {
            let key = entry_key(&item);
            let at = str_of(&item, "created_at").and_then(parse_micros);
            if let Some(t) = at {
                oldest = Some(oldest.map_or(t, |o: i64| o.min(t)));
            }
            if !seen.insert(key) {
                continue;
            }
            fresh += 1;
            if entries.len() < limit as usize {
                entries.push(item);
            }
        }
        if !full {
            break;
        }
        if fresh == 0 {
            if !inclusive {
                break;
            }
            // More rows share one microsecond than a page holds: step past it.
            partial = true;
            log::warn!(
                "history: more than {ask} entries share the timestamp {}; some of them are not shown",
                before.map(format_micros).unwrap_or_default()
            );
            inclusive = false;
            continue;
        }
        if oldest.is_none() {
            break;
        }
        before = oldest;
        inclusive = true;
    }
    entries.reverse();
    let human = render(source, &entries, ctx.workspace_id());
    let mut json = json!({"ok": true, "count": entries.len(), "entries": entries});
    match source {
        Source::Peer(p) => json["peer_id"] = Value::from(p),
        Source::Canvas => json["canvas"] = Value::Bool(true),
    }
    if partial {
        json["partial"] = Value::Bool(true);
    }
    Ok(Report { json, human })
}

/// Entries of the newest page that sit at its oldest timestamp (re-read next time).
fn seen_at_boundary(entries: &[Value]) -> usize {
    let times: Vec<Option<i64>> = entries
        .iter()
        .map(|e| str_of(e, "created_at").and_then(parse_micros))
        .collect();
    let oldest = times.iter().flatten().min().copied();
    times
        .iter()
        .filter(|t| **t == oldest && oldest.is_some())
        .count()
}

/// One page, newest first.
fn fetch(
    ctx: &Ctx,
    budget: &Budget,
    source: Source<'_>,
    limit: usize,
    before_ts: Option<&str>,
) -> Result<Vec<Value>, Failure> {
    let ws = ctx.workspace_id();
    let limit = limit.to_string();
    let mut q: Vec<(&str, &str)> = vec![("limit", &limit)];
    if let Some(b) = before_ts {
        q.push(("before_ts", b));
    }
    let path = match source {
        Source::Peer(p) => {
            q.push(("peer_id", p));
            format!("/workspaces/{ws}/activity")
        }
        Source::Canvas => format!("/workspaces/{ws}/chat-history"),
    };
    let v = ctx.call_within(
        budget,
        true,
        |c| c.call_json("history", "GET", &path, &q, None, LIST_LIMIT),
        describe,
    )?;
    let list = match source {
        Source::Peer(_) => v,
        Source::Canvas => v.get("messages").cloned().unwrap_or(Value::Null),
    };
    Ok(list.as_array().cloned().unwrap_or_default())
}

/// Identity of an entry for de-duplication across pages.
fn entry_key(v: &Value) -> String {
    match str_of(v, "id") {
        Some(id) => id.to_string(),
        None => format!(
            "{}|{}|{}",
            str_of(v, "created_at").unwrap_or(""),
            str_of(v, "role").unwrap_or(""),
            text_of(v)
        ),
    }
}

/// The words of an activity row or chat message.
fn text_of(v: &Value) -> String {
    for p in ["/request_body/params/message/parts", "/response_body/parts"] {
        if let Some(parts) = v.pointer(p) {
            let t = crate::inbox::text_of_parts(parts);
            if !t.is_empty() {
                return t;
            }
        }
    }
    for k in ["content", "text", "message"] {
        if let Some(t) = str_of(v, k) {
            return t.to_string();
        }
    }
    if let Some(t) = v.pointer("/response_body/result").and_then(Value::as_str) {
        return t.to_string();
    }
    str_of(v, "summary").unwrap_or("").to_string()
}

fn render(source: Source<'_>, entries: &[Value], own: &str) -> String {
    if entries.is_empty() {
        return "no history\n".to_string();
    }
    let mut out = String::new();
    for e in entries {
        let at = str_of(e, "created_at").unwrap_or("");
        let who = match source {
            Source::Peer(peer) => {
                let kind = str_of(e, "activity_type").unwrap_or("");
                let from_us = str_of(e, "source_id") == Some(own) || kind == "a2a_send";
                let arrow = if from_us { "->" } else { "<-" };
                format!("{arrow} {} {kind}", short(peer))
            }
            Source::Canvas => str_of(e, "role").unwrap_or("message").to_string(),
        };
        let text: String = text_of(e)
            .chars()
            .map(|c| if c.is_control() && c != '\n' { '?' } else { c })
            .collect();
        out.push_str(&format!("{at} {who}: {}\n", text.replace('\n', "\n    ")));
    }
    out
}

fn short(id: &str) -> &str {
    id.get(..8).unwrap_or(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn texts_from_each_shape() {
        let recv =
            json!({"request_body":{"params":{"message":{"parts":[{"kind":"text","text":"hi"}]}}}});
        assert_eq!(text_of(&recv), "hi");
        assert_eq!(text_of(&json!({"content":"c","summary":"s"})), "c");
        assert_eq!(
            text_of(&json!({"summary":"Broadcast from a: x"})),
            "Broadcast from a: x"
        );
        assert_eq!(text_of(&json!({"response_body":{"result":"r"}})), "r");
    }

    #[test]
    fn boundary_count() {
        let e = [
            json!({"created_at":"2026-05-01T00:00:02Z"}),
            json!({"created_at":"2026-05-01T00:00:01Z"}),
            json!({"created_at":"2026-05-01T00:00:01.000000+00:00"}),
        ];
        assert_eq!(seen_at_boundary(&e), 2);
    }
}
