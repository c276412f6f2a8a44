//! Files (§API-2.16): `notify --file` uploads local files to our own workspace
//! (`POST /chat/uploads`, one multipart request) after checking the platform's size
//! limits, and `molecule download` fetches a pending upload's bytes.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde_json::{Value, json};

use super::{Budget, Ctx, Failure, Report, describe, refused, str_of};
use crate::api::{ApiError, Kind};
use crate::config::agent::MAX_ATTACHMENTS;
use crate::config::tools::Download;

/// The platform's limits (`GET /uploads/limits`, §API-2.16).
const MAX_FILE_BYTES: u64 = 100 * 1024 * 1024;
const MAX_REQUEST_BYTES: u64 = 100 * 1024 * 1024;
/// Room for one part's multipart headers.
const PART_OVERHEAD: u64 = 512;

/// Reads and checks every file (all of them before any upload), uploads them in one
/// request and returns their `/notify` attachments.
pub(super) fn upload(
    ctx: &Ctx,
    budget: &Budget,
    paths: &[PathBuf],
    other_attachments: usize,
) -> Result<Vec<Value>, Failure> {
    if paths.len() + other_attachments > MAX_ATTACHMENTS {
        return Err(Failure::input(format!(
            "notify: {} attachments: the platform takes at most {MAX_ATTACHMENTS} per message",
            paths.len() + other_attachments
        )));
    }
    let mut total: u64 = 0;
    for p in paths {
        let size = checked_size(p)?;
        total = total.saturating_add(size + PART_OVERHEAD);
    }
    if total > MAX_REQUEST_BYTES {
        return Err(Failure::input(format!(
            "notify: the files add up to {total} bytes; the platform takes at most {MAX_REQUEST_BYTES} per upload"
        )));
    }
    let mut files = Vec::with_capacity(paths.len());
    for p in paths {
        let bytes = std::fs::read(p)
            .map_err(|e| Failure::input(format!("notify: --file {}: {e}", p.display())))?;
        if bytes.len() as u64 > MAX_FILE_BYTES || bytes.is_empty() {
            return Err(Failure::input(format!(
                "notify: --file {}: changed size while being read",
                p.display()
            )));
        }
        let name = p
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "file".into());
        files.push((name.clone(), mime_of(&name).to_string(), bytes));
    }
    let v = ctx.call_within(budget, false, |c| c.upload(&files), describe_upload)?;
    let staged = v
        .get("files")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    if staged.len() != files.len() {
        return Err(Failure::runtime(format!(
            "notify: the platform staged {} of {} files; the message was not sent",
            staged.len(),
            files.len()
        )));
    }
    staged
        .iter()
        .map(|f| {
            let (Some(uri), Some(name)) = (str_of(f, "uri"), str_of(f, "name")) else {
                return Err(Failure::runtime(
                    "notify: the platform's upload answer has a file without uri or name",
                ));
            };
            let mut a = json!({"uri": uri, "name": name});
            if let Some(m) = str_of(f, "mimeType").filter(|m| !m.is_empty()) {
                a["mimeType"] = Value::from(m);
            }
            if let Some(s) = f.get("size").filter(|s| s.is_u64()) {
                a["size"] = s.clone();
            }
            Ok(a)
        })
        .collect()
}

/// A regular, non-empty file within the per-file cap: its size.
fn checked_size(p: &Path) -> Result<u64, Failure> {
    let shown = p.display();
    let meta =
        std::fs::metadata(p).map_err(|e| Failure::input(format!("notify: --file {shown}: {e}")))?;
    if !meta.is_file() {
        return Err(Failure::input(format!(
            "notify: --file {shown}: not a regular file"
        )));
    }
    match meta.len() {
        0 => Err(Failure::input(format!(
            "notify: --file {shown}: the file is empty (the platform refuses empty files)"
        ))),
        n if n > MAX_FILE_BYTES => Err(Failure::input(format!(
            "notify: --file {shown}: {n} bytes; the platform takes at most {MAX_FILE_BYTES} per file"
        ))),
        n => Ok(n),
    }
}

fn describe_upload(ctx: &Ctx, e: ApiError) -> Failure {
    match e.kind() {
        Kind::RequestTooLarge => {
            Failure::input(format!("{e}: the file is larger than the platform accepts"))
                .with("http_status", 413)
        }
        Kind::Unprocessable => refused(
            ctx,
            e,
            "uploads need a poll-mode workspace (molecule connect registers one)",
        ),
        Kind::BadRequest => refused(ctx, e, "the platform refused the upload"),
        _ => describe(ctx, e),
    }
}

/// A MIME type from the file name, for the canvas to show the file well.
fn mime_of(name: &str) -> &'static str {
    let ext = name.rsplit_once('.').map(|(_, e)| e.to_ascii_lowercase());
    match ext.as_deref() {
        Some("txt" | "log") => "text/plain",
        Some("md") => "text/markdown",
        Some("csv") => "text/csv",
        Some("html" | "htm") => "text/html",
        Some("json") => "application/json",
        Some("pdf") => "application/pdf",
        Some("zip") => "application/zip",
        Some("png") => "image/png",
        Some("jpg" | "jpeg") => "image/jpeg",
        Some("gif") => "image/gif",
        Some("svg") => "image/svg+xml",
        Some("webp") => "image/webp",
        _ => "application/octet-stream",
    }
}

pub(super) fn download(ctx: &Ctx, d: &Download) -> Result<Report, Failure> {
    let budget = Budget::start(d.budget_secs);
    let fid = &d.file_id;
    let describe_download = |ctx: &Ctx, e: ApiError| match e.kind() {
        Kind::NotFound => refused(
            ctx,
            e,
            "no such pending upload (unknown, expired after 24 h, or deleted an hour after its ack)",
        ),
        _ => describe(ctx, e),
    };
    let limit = MAX_FILE_BYTES + 1;
    let (bytes, mime) = match &d.output {
        Some(path) => {
            let dir = path
                .parent()
                .filter(|d| !d.as_os_str().is_empty())
                .unwrap_or(Path::new("."));
            let tmp = dir.join(format!(
                ".{}.part-{}",
                path.file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default(),
                crate::uuid::new_v4()
            ));
            let result = ctx.call_within(
                &budget,
                true,
                |c| {
                    // A retry starts the file again.
                    let _ = std::fs::remove_file(&tmp);
                    let mut f = private_file(&tmp).map_err(|e| ApiError::Invalid {
                        op: "download",
                        detail: format!("{}: {e}", tmp.display()),
                    })?;
                    let got = c.download(fid, &mut f, limit)?;
                    f.sync_all().map_err(|e| ApiError::Invalid {
                        op: "download",
                        detail: format!("{}: {e}", tmp.display()),
                    })?;
                    Ok(got)
                },
                describe_download,
            );
            let got = match result {
                Ok(got) => got,
                Err(f) => {
                    let _ = std::fs::remove_file(&tmp);
                    return Err(f);
                }
            };
            std::fs::rename(&tmp, path).map_err(|e| {
                let _ = std::fs::remove_file(&tmp);
                Failure::runtime(format!("download: {}: {e}", path.display()))
            })?;
            got
        }
        None => {
            let mut out = std::io::stdout().lock();
            let got = ctx.call_within(
                &budget,
                false,
                |c| c.download(fid, &mut out, limit),
                describe_download,
            )?;
            let _ = out.flush();
            got
        }
    };
    if d.ack {
        let path = format!(
            "/workspaces/{}/pending-uploads/{fid}/ack",
            ctx.workspace_id()
        );
        ctx.call_within(
            &budget,
            true,
            |c| c.call_json("ack upload", "POST", &path, &[], None, 64 * 1024),
            describe_download,
        )?;
    }
    let human = match &d.output {
        Some(p) => format!("{bytes} bytes written to {}\n", p.display()),
        None => String::new(),
    };
    Ok(Report {
        json: json!({"ok": true, "file_id": fid, "bytes": bytes, "mime_type": mime,
                     "output": d.output.as_ref().map(|p| p.display().to_string()),
                     "acked": d.ack}),
        human,
    })
}

/// A new file only we can read (0600), replacing nothing.
fn private_file(path: &Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mime_types() {
        assert_eq!(mime_of("a.PNG"), "image/png");
        assert_eq!(mime_of("report"), "application/octet-stream");
    }
}
