//! `molecule notify` (a message to the human on the canvas, with attachments by URI)
//! and `molecule heartbeat` (one heartbeat for agents driven by cron).

use serde_json::{Value, json};

use super::{Ctx, Failure, Report, describe, message_text, runtime_metadata};
use crate::api::ApiError;
use crate::cli::{HeartbeatArgs, NotifyArgs};
use crate::error::Error;
use crate::wire::ManualHeartbeat;

/// Longest free text sent in a heartbeat field.
const MAX_FIELD: usize = 4096;

pub(super) fn notify(ctx: &Ctx, a: &NotifyArgs) -> Result<Report, Failure> {
    let text = message_text(a.text.as_deref(), "notify")?;
    let mut attachments = a
        .attach
        .iter()
        .map(|spec| attachment(spec))
        .collect::<Result<Vec<Value>, Failure>>()?;
    if !a.files.is_empty() {
        let budget = super::Budget::new(None, "notify")?;
        let uploaded = super::files::upload(ctx, &budget, &a.files, attachments.len())?;
        attachments.extend(uploaded);
    } else if attachments.len() > super::files::MAX_ATTACHMENTS {
        return Err(Failure::input(format!(
            "notify: the platform takes at most {} attachments per message",
            super::files::MAX_ATTACHMENTS
        )));
    }
    let count = attachments.len();
    ctx.call(|c| c.notify(&text, attachments.clone()), describe_notify)?;
    let mut json = json!({"ok": true, "status": "sent", "attachments": count});
    if !a.files.is_empty() {
        // What was uploaded and sent, so a script can reuse the URIs.
        json["files"] = Value::from(attachments);
    }
    Ok(Report {
        json,
        human: "sent\n".to_string(),
    })
}

fn describe_notify(ctx: &Ctx, e: ApiError) -> Failure {
    let ws = ctx.workspace_id();
    match &e {
        ApiError::Status {
            status: 403,
            message,
            hint,
            ..
        } if message.contains("talk_to_user_disabled") => {
            let mut msg = format!(
                "{e}: workspace {ws} is not allowed to message the user directly (talk_to_user_disabled)"
            );
            if let Some(h) = hint {
                msg.push_str(&format!(". Hint: {h}"));
            }
            let f = Failure::runtime(msg).with("http_status", 403);
            match hint {
                Some(h) => f.with("hint", h.clone()),
                None => f,
            }
        }
        ApiError::Status {
            status: 404,
            message,
            ..
        } if !message.is_empty() => Failure::new(Error::Removed(format!(
            "{e}: workspace {ws} is unknown to the platform at {}",
            ctx.api_url()
        )))
        .with("http_status", 404),
        _ => describe(ctx, e),
    }
}

/// `URI[,NAME]`: everything after the first comma is the name; without one, the last
/// segment of the URI.
fn attachment(spec: &str) -> Result<Value, Failure> {
    let (uri, name) = match spec.split_once(',') {
        Some((u, n)) => (u.trim(), n.trim().to_string()),
        None => {
            let u = spec.trim();
            let base = u
                .trim_end_matches('/')
                .rsplit(['/', ':'])
                .next()
                .unwrap_or("")
                .to_string();
            (u, base)
        }
    };
    if uri.is_empty() || uri.chars().any(char::is_whitespace) {
        return Err(Failure::input(format!(
            "notify: --attach {spec:?}: expected URI[,NAME] with a URI and no spaces in it"
        )));
    }
    if name.is_empty() {
        return Err(Failure::input(format!(
            "notify: --attach {spec:?}: no file name in the URI; give one as URI,NAME"
        )));
    }
    Ok(json!({"uri": uri, "name": name}))
}

pub(super) fn heartbeat(ctx: &Ctx, a: &HeartbeatArgs) -> Result<Report, Failure> {
    if let Some(r) = a.error_rate
        && !(0.0..=1.0).contains(&r)
    {
        return Err(Failure::input(format!(
            "heartbeat: --error-rate {r}: must be between 0.0 and 1.0"
        )));
    }
    for (flag, v) in [
        ("--current-task", &a.current_task),
        ("--sample-error", &a.sample_error),
    ] {
        if let Some(t) = v
            && t.len() > MAX_FIELD
        {
            return Err(Failure::input(format!(
                "heartbeat: {flag}: at most {MAX_FIELD} bytes"
            )));
        }
    }
    let hb = ManualHeartbeat {
        workspace_id: ctx.workspace_id().to_string(),
        error_rate: a.error_rate,
        sample_error: a.sample_error.clone(),
        active_tasks: a.active_tasks,
        current_task: a.current_task.clone(),
        uptime_seconds: a.uptime_secs,
        runtime_metadata: runtime_metadata(),
    };
    ctx.call(|c| c.heartbeat_once(&hb), describe)?;
    let mut json = serde_json::to_value(&hb).unwrap_or(Value::Null);
    if let Value::Object(m) = &mut json {
        m.remove("runtime_metadata");
        m.insert("ok".into(), Value::Bool(true));
        m.insert("status".into(), Value::from("sent"));
    }
    Ok(Report {
        json,
        human: format!("heartbeat sent for {}\n", ctx.workspace_id()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attachment_specs() {
        assert_eq!(
            attachment("platform-pending:ws/f1,report.pdf").unwrap(),
            json!({"uri": "platform-pending:ws/f1", "name": "report.pdf"})
        );
        assert_eq!(
            attachment("https://x/files/a.png").unwrap(),
            json!({"uri": "https://x/files/a.png", "name": "a.png"})
        );
        assert_eq!(attachment("u,a, b").unwrap()["name"], "a, b");
        assert!(attachment(",name").is_err());
        assert!(attachment("https://x/").is_ok());
        assert!(attachment("a b").is_err());
    }
}
