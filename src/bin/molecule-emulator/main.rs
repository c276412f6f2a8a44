//! `molecule-emulator`: a local emulator of the Molecule AI platform HTTP API (see
//! PLATFORM_API.md) for integration tests, the demo and the benchmark. This file owns
//! the command line, the listener and the accept loop.

mod admin;
mod events;
mod faults;
mod guard;
mod http;
mod ids;
mod routes;
mod server;
mod stats;
mod store;
mod tools;

use std::io::Write;
use std::net::TcpListener;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use server::{App, Config};

const USAGE: &str = "\
molecule-emulator: local emulator of the Molecule AI platform HTTP API

Usage: molecule-emulator [OPTIONS]

Options:
  --port N                   port on 127.0.0.1 (default 0 = pick a free one)
  --org-id UUID              enable the SaaS tenant guard for this org id
  --rate-limit N             requests per 60 s window per bucket (default: unlimited)
  --delegation-result-push   write delegate_result rows into the delegator's inbox
  --no-peer-info             ignore include=peer_info (an older server): no peer_name/role
  --no-event-stream          answer 404 to GET /workspaces/:id/events/stream (an older server)
  --admin-token T            accept T as the platform ADMIN_TOKEN bearer
  --quiet                    no per-request log lines on stderr
  -h, --help                 print this help

On start it prints one line to stdout: `listening on http://127.0.0.1:PORT`.
Admin API (no auth) under /_admin; see admin.rs.
";

fn parse_args(args: impl IntoIterator<Item = String>) -> Result<Option<Config>, String> {
    let mut cfg = Config::default();
    let mut it = args.into_iter();
    while let Some(arg) = it.next() {
        let (name, inline) = match arg.split_once('=') {
            Some((n, v)) if n.starts_with("--") => (n.to_string(), Some(v.to_string())),
            _ => (arg.clone(), None),
        };
        let mut value = |what: &str| -> Result<String, String> {
            inline
                .clone()
                .or_else(|| it.next())
                .ok_or_else(|| format!("{name} needs {what}"))
        };
        match name.as_str() {
            "-h" | "--help" => return Ok(None),
            "--port" => {
                let v = value("a port number")?;
                cfg.port = v.parse().map_err(|_| format!("invalid port: {v}"))?;
            }
            "--org-id" => {
                let v = value("an org id")?;
                if v.is_empty() {
                    return Err("--org-id must not be empty".into());
                }
                cfg.org_id = Some(v);
            }
            "--rate-limit" => {
                let v = value("a number")?;
                let n: u64 = v.parse().map_err(|_| format!("invalid rate limit: {v}"))?;
                cfg.rate_limit = (n > 0).then_some(n);
            }
            "--admin-token" => {
                let v = value("a token")?;
                cfg.admin_token = (!v.is_empty()).then_some(v);
            }
            "--delegation-result-push" if inline.is_none() => cfg.delegation_result_push = true,
            "--no-peer-info" if inline.is_none() => cfg.no_peer_info = true,
            "--no-event-stream" if inline.is_none() => cfg.no_event_stream = true,
            "--quiet" if inline.is_none() => cfg.quiet = true,
            other => return Err(format!("unknown argument: {other}")),
        }
    }
    Ok(Some(cfg))
}

fn main() -> ExitCode {
    let mut cfg = match parse_args(std::env::args().skip(1)) {
        Ok(Some(cfg)) => cfg,
        Ok(None) => {
            print!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("molecule-emulator: {e}\n\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let listener = match TcpListener::bind(("127.0.0.1", cfg.port)) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("molecule-emulator: cannot bind 127.0.0.1:{}: {e}", cfg.port);
            return ExitCode::from(1);
        }
    };
    cfg.port = listener.local_addr().map(|a| a.port()).unwrap_or(cfg.port);
    {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "listening on http://127.0.0.1:{}", cfg.port);
        let _ = out.flush();
    }
    let app = Arc::new(App::new(cfg));
    for stream in listener.incoming() {
        match stream {
            Ok(s) => {
                let app = Arc::clone(&app);
                let spawned = std::thread::Builder::new()
                    .name("conn".into())
                    .spawn(move || server::serve_connection(app, s));
                if let Err(e) = spawned {
                    eprintln!("molecule-emulator: cannot spawn connection thread: {e}");
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                eprintln!("molecule-emulator: accept failed: {e}");
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
    ExitCode::SUCCESS
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(a: &[&str]) -> Result<Option<Config>, String> {
        parse_args(a.iter().map(|s| s.to_string()))
    }

    #[test]
    fn parses_flags() {
        let c = args(&[
            "--port",
            "8080",
            "--org-id=o",
            "--rate-limit",
            "5",
            "--quiet",
            "--delegation-result-push",
            "--no-peer-info",
            "--admin-token",
            "t",
        ])
        .unwrap()
        .unwrap();
        assert_eq!(c.port, 8080);
        assert_eq!(c.org_id.as_deref(), Some("o"));
        assert_eq!(c.rate_limit, Some(5));
        assert!(c.quiet && c.delegation_result_push && c.no_peer_info);
        assert_eq!(c.admin_token.as_deref(), Some("t"));
        assert!(args(&["--help"]).unwrap().is_none());
        assert!(args(&["--port"]).is_err());
        assert!(args(&["--port", "x"]).is_err());
        assert!(args(&["--bogus"]).is_err());
        assert_eq!(args(&[]).unwrap().unwrap().port, 0);
    }
}
