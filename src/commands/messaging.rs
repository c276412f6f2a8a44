//! `molecule notify` (a message to the human on the canvas, with attachments by URI)
//! and `molecule heartbeat` (one heartbeat for agents driven by cron).

use serde_json::{Value, json};

use super::{Ctx, Failure, Report, describe, runtime_metadata};
use crate::api::{ApiError, Kind};
use crate::cli::HeartbeatArgs;
use crate::config::agent;
use crate::error::Error;
use crate::wire::ManualHeartbeat;

pub(super) fn notify(ctx: &Ctx, n: &agent::Notify) -> Result<Report, Failure> {
    let mut attachments = n.attachments.clone();
    if !n.files.is_empty() {
        let budget = super::Budget::start(crate::config::tools::DEFAULT_BUDGET_SECS);
        let uploaded = super::files::upload(ctx, &budget, &n.files, attachments.len())?;
        attachments.extend(uploaded);
    }
    let count = attachments.len();
    ctx.call(|c| c.notify(&n.text, attachments.clone()), describe_notify)?;
    let mut json = json!({"ok": true, "status": "sent", "attachments": count});
    if !n.files.is_empty() {
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
        ApiError::Status { message, hint, .. }
            if e.kind() == Kind::Forbidden && message.contains("talk_to_user_disabled") =>
        {
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
        ApiError::Status { message, .. } if e.kind() == Kind::NotFound && !message.is_empty() => {
            Failure::new(Error::Removed(format!(
                "{e}: workspace {ws} is unknown to the platform at {}",
                ctx.api_url()
            )))
            .with("http_status", 404)
        }
        _ => describe(ctx, e),
    }
}

pub(super) fn heartbeat(ctx: &Ctx, a: &HeartbeatArgs) -> Result<Report, Failure> {
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
