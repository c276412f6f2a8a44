//! Prometheus text exposition (format 0.0.4) of the status document, for
//! node_exporter's textfile collector (`--metrics-file`) and `molecule status
//! --format prometheus`. Both render the same JSON the connector writes to its
//! status file, so they always agree. Also the fixed-bucket histogram the counters
//! use. Pure: no I/O, no clocks.

use std::fmt::Write as _;

use serde_json::{Value, json};

/// Upper bounds (seconds) of every histogram's buckets; `+Inf` is implied.
pub const BUCKETS: [f64; 13] = [
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 900.0, 3600.0,
];

/// Observations of a duration, by bucket (not cumulative; the last is `+Inf`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Histogram {
    counts: [u64; BUCKETS.len() + 1],
    sum: f64,
}

impl Histogram {
    /// Counts one observation of `secs` (negative clock skew counts as 0).
    pub fn observe(&mut self, secs: f64) {
        let secs = if secs.is_finite() { secs.max(0.0) } else { 0.0 };
        let i = BUCKETS
            .iter()
            .position(|b| secs <= *b)
            .unwrap_or(BUCKETS.len());
        self.counts[i] = self.counts[i].saturating_add(1);
        self.sum += secs;
    }

    /// The status-file form: `{"le":[bounds],"counts":[per bucket, +Inf last],"sum":s}`.
    pub fn to_json(&self) -> Value {
        json!({"le": BUCKETS, "counts": self.counts, "sum": self.sum})
    }
}

/// The connector's own version, commit and target for `molecule_build_info` (the
/// values `--version` shows, set by src/build.rs).
pub fn build_info() -> Value {
    json!({
        "version": env!("CARGO_PKG_VERSION"),
        "commit": env!("MOLECULE_BUILD_COMMIT"),
        "target": env!("MOLECULE_BUILD_TARGET"),
    })
}

/// One workspace to render: its status document and whether it counts as up.
pub struct Sample<'a> {
    /// The status document (`<id>.status.json`).
    pub doc: &'a Value,
    /// `molecule_up`.
    pub up: bool,
}

type Family = (&'static str, &'static str, &'static str);

const FAMILIES: &[Family] = &[
    (
        "molecule_up",
        "gauge",
        "1 while the workspace runs (molecule status: while its health check passes), else 0.",
    ),
    (
        "molecule_build_info",
        "gauge",
        "The connector's version, commit and target; always 1.",
    ),
    (
        "molecule_messages_total",
        "counter",
        "Inbound messages by outcome; failed_attempt counts backend attempts that failed.",
    ),
    (
        "molecule_replies_total",
        "counter",
        "Replies the platform accepted, to a peer or to the canvas.",
    ),
    (
        "molecule_reply_resends_total",
        "counter",
        "Reply posts retried, or re-posted from the state file after a restart.",
    ),
    (
        "molecule_requests_total",
        "counter",
        "Platform requests by route pattern and HTTP status (error/timeout: no answer).",
    ),
    (
        "molecule_rate_limited_total",
        "counter",
        "Platform answers with HTTP 429.",
    ),
    (
        "molecule_rate_remaining",
        "gauge",
        "The last X-RateLimit-Remaining the platform sent.",
    ),
    (
        "molecule_backend_seconds",
        "histogram",
        "Duration of each backend run.",
    ),
    (
        "molecule_inbound_to_reply_seconds",
        "histogram",
        "From the inbound row's created_at to the reply being accepted.",
    ),
    (
        "molecule_in_flight",
        "gauge",
        "Messages fetched and not yet finished.",
    ),
    (
        "molecule_last_poll_timestamp_seconds",
        "gauge",
        "Unix time of the last successful poll (0: none yet).",
    ),
    (
        "molecule_last_heartbeat_timestamp_seconds",
        "gauge",
        "Unix time of the last successful heartbeat (0: none yet).",
    ),
    (
        "molecule_wedged",
        "gauge",
        "1 while the backend keeps failing (the heartbeat says wedged).",
    ),
];

const OUTCOMES: [&str; 5] = [
    "answered",
    "no_reply",
    "skipped",
    "dead_lettered",
    "failed_attempt",
];

/// Renders every workspace's metrics, grouped by metric family as the format asks.
pub fn render(samples: &[Sample<'_>]) -> String {
    let mut out = String::new();
    for (name, kind, help) in FAMILIES {
        let mut body = String::new();
        for s in samples {
            family(&mut body, name, s);
        }
        if body.is_empty() {
            continue;
        }
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        out.push_str(&body);
    }
    out
}

fn family(out: &mut String, name: &str, s: &Sample<'_>) {
    let doc = s.doc;
    let ws = doc
        .get("workspace_id")
        .and_then(Value::as_str)
        .unwrap_or("");
    let m = doc.get("metrics").unwrap_or(&Value::Null);
    let num = |v: &Value, k: &str| v.get(k).and_then(Value::as_u64).unwrap_or(0);
    let mut line = |labels: &[(&str, &str)], value: &str| {
        sample(out, name, ws, labels, value);
    };
    match name {
        "molecule_up" => line(&[], if s.up { "1" } else { "0" }),
        "molecule_build_info" => {
            let b = m.get("build").unwrap_or(&Value::Null);
            let f = |k: &str| b.get(k).and_then(Value::as_str).unwrap_or("unknown");
            line(
                &[
                    ("version", f("version")),
                    ("commit", f("commit")),
                    ("target", f("target")),
                ],
                "1",
            );
        }
        "molecule_messages_total" => {
            let msgs = m.get("messages").unwrap_or(&Value::Null);
            for o in OUTCOMES {
                line(&[("outcome", o)], &num(msgs, o).to_string());
            }
        }
        "molecule_replies_total" => {
            let r = m.get("replies").unwrap_or(&Value::Null);
            for to in ["peer", "canvas"] {
                line(&[("to", to)], &num(r, to).to_string());
            }
        }
        "molecule_reply_resends_total" => line(&[], &num(m, "reply_resends").to_string()),
        "molecule_requests_total" => {
            for r in m
                .get("requests")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                let f = |k: &str| r.get(k).and_then(Value::as_str).unwrap_or("");
                line(
                    &[("endpoint", f("endpoint")), ("code", f("code"))],
                    &num(r, "count").to_string(),
                );
            }
        }
        "molecule_rate_limited_total" => line(&[], &num(m, "rate_limited").to_string()),
        "molecule_rate_remaining" => {
            if let Some(n) = m.get("rate_remaining").and_then(Value::as_u64) {
                line(&[], &n.to_string());
            }
        }
        "molecule_backend_seconds" | "molecule_inbound_to_reply_seconds" => {
            let key = name.trim_start_matches("molecule_");
            histogram(out, name, ws, m.get(key).unwrap_or(&Value::Null));
        }
        "molecule_in_flight" => line(&[], &num(doc, "in_flight").to_string()),
        "molecule_last_poll_timestamp_seconds" => line(&[], &num(doc, "last_poll_ok").to_string()),
        "molecule_last_heartbeat_timestamp_seconds" => {
            line(&[], &num(doc, "last_heartbeat_ok").to_string())
        }
        "molecule_wedged" => {
            let wedged = doc.get("wedged").and_then(Value::as_bool) == Some(true);
            line(&[], if wedged { "1" } else { "0" });
        }
        _ => {}
    }
}

/// `_bucket` lines (cumulative, `+Inf` last), `_sum`, `_count`. A histogram the
/// document lacks renders as empty, so every family is always present.
fn histogram(out: &mut String, name: &str, ws: &str, h: &Value) {
    let bounds: Vec<f64> = h
        .get("le")
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(Value::as_f64).collect())
        .unwrap_or_else(|| BUCKETS.to_vec());
    let counts: Vec<u64> = h
        .get("counts")
        .and_then(Value::as_array)
        .map(|a| a.iter().map(|c| c.as_u64().unwrap_or(0)).collect())
        .unwrap_or_default();
    let mut total: u64 = 0;
    let bucket = format!("{name}_bucket");
    for (i, le) in bounds.iter().enumerate() {
        total = total.saturating_add(counts.get(i).copied().unwrap_or(0));
        sample(
            out,
            &bucket,
            ws,
            &[("le", &le.to_string())],
            &total.to_string(),
        );
    }
    // Whatever lies past the known bounds belongs to +Inf.
    total = counts
        .iter()
        .skip(bounds.len())
        .fold(total, |t, c| t.saturating_add(*c));
    sample(out, &bucket, ws, &[("le", "+Inf")], &total.to_string());
    let sum = h.get("sum").and_then(Value::as_f64).unwrap_or(0.0);
    sample(out, &format!("{name}_sum"), ws, &[], &sum.to_string());
    sample(out, &format!("{name}_count"), ws, &[], &total.to_string());
}

fn sample(out: &mut String, name: &str, ws: &str, labels: &[(&str, &str)], value: &str) {
    out.push_str(name);
    out.push_str("{workspace=\"");
    escape(out, ws);
    out.push('"');
    for (k, v) in labels {
        out.push(',');
        out.push_str(k);
        out.push_str("=\"");
        escape(out, v);
        out.push('"');
    }
    out.push_str("} ");
    out.push_str(value);
    out.push('\n');
}

/// Label values escape `\`, `"` and newlines (the format's only rules).
fn escape(out: &mut String, v: &str) {
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative() {
        let mut h = Histogram::default();
        for s in [0.05, 0.3, 0.3, 7200.0, -1.0] {
            h.observe(s);
        }
        let doc = json!({"workspace_id":"w","metrics":{"backend_seconds": h.to_json()}});
        let text = render(&[Sample {
            doc: &doc,
            up: true,
        }]);
        assert!(text.contains("molecule_backend_seconds_bucket{workspace=\"w\",le=\"0.1\"} 2\n"));
        assert!(text.contains("molecule_backend_seconds_bucket{workspace=\"w\",le=\"0.5\"} 4\n"));
        assert!(text.contains("molecule_backend_seconds_bucket{workspace=\"w\",le=\"3600\"} 4\n"));
        assert!(text.contains("molecule_backend_seconds_bucket{workspace=\"w\",le=\"+Inf\"} 5\n"));
        assert!(text.contains("molecule_backend_seconds_count{workspace=\"w\"} 5\n"));
        assert!(text.contains("molecule_backend_seconds_sum{workspace=\"w\"} 7200.65\n"));
    }

    #[test]
    fn families_grouped_and_labels_escaped() {
        let a = json!({"workspace_id":"a","wedged":true,"metrics":{
            "requests":[{"endpoint":"GET /x\"\\\n","code":"200","count":3}],
            "rate_remaining": 7}});
        let b = json!({"workspace_id":"b"});
        let text = render(&[Sample { doc: &a, up: true }, Sample { doc: &b, up: false }]);
        assert!(text.contains(
            "molecule_requests_total{workspace=\"a\",endpoint=\"GET /x\\\"\\\\\\n\",code=\"200\"} 3\n"
        ));
        assert!(text.contains("molecule_up{workspace=\"a\"} 1\nmolecule_up{workspace=\"b\"} 0\n"));
        assert!(text.contains("molecule_wedged{workspace=\"a\"} 1\n"));
        assert!(text.contains("molecule_rate_remaining{workspace=\"a\"} 7\n"));
        assert!(!text.contains("molecule_rate_remaining{workspace=\"b\"}"));
        assert_eq!(text.matches("# TYPE molecule_up gauge").count(), 1);
        for o in OUTCOMES {
            assert!(text.contains(&format!(
                "molecule_messages_total{{workspace=\"b\",outcome=\"{o}\"}} 0\n"
            )));
        }
    }
}
