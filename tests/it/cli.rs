//! Command-line behaviour that needs no platform: help, bad input, dry run.

use crate::support::*;

const WS: &str = "11111111-2222-4333-8444-555555555555";

#[test]
fn help_for_every_command() {
    for args in [
        &["--help"][..],
        &["connect", "--help"],
        &["help", "connect"],
    ] {
        let (code, out, err) = run(args);
        assert_eq!(code, 0, "{args:?}: {err}");
        assert!(out.contains("Usage: molecule"), "{args:?}: {out}");
        assert!(err.is_empty(), "{err}");
    }
    let (code, out, _) = run(&["--version"]);
    assert_eq!(code, 0);
    assert_eq!(out, format!("molecule {}\n", molecule::VERSION));
    // Bare `molecule` is a usage error: usage on stderr, exit 2.
    let (code, out, err) = run(&[]);
    assert_eq!(code, 2, "{err}");
    assert!(out.is_empty() && err.contains("Usage: molecule"), "{err}");
}

/// `molecule 0.1.0 (1a2b3c4[-dirty], <target>)`, or `unknown` for the commit when
/// built without git (src/build.rs).
#[test]
fn version_names_commit_and_target() {
    let (version, rest) = molecule::VERSION.split_once(" (").unwrap();
    assert_eq!(version, env!("CARGO_PKG_VERSION"));
    let (commit, target) = rest.strip_suffix(')').unwrap().split_once(", ").unwrap();
    let hash = commit.strip_suffix("-dirty").unwrap_or(commit);
    assert!(
        commit == "unknown" || (hash.len() == 7 && hash.chars().all(|c| c.is_ascii_hexdigit())),
        "{commit}"
    );
    assert_eq!(target, env!("MOLECULE_BUILD_TARGET"));
    assert!(target.contains("-linux-"), "{target}");
}

#[test]
fn bad_input_is_one_clear_line_and_exit_2() {
    let dir = TempDir::new();
    let state = dir.path().to_str().unwrap();
    let cases: &[(&[&str], &str)] = &[
        (&["frobnicate"], "unknown command"),
        (&["connect", "--no-such-flag"], "--no-such-flag"),
        (
            &["connect", "not-a-uuid", "--api-url", "http://127.0.0.1:9"],
            "not a UUID",
        ),
        (
            &[
                "connect",
                WS,
                "--api-url",
                "http://127.0.0.1:9",
                "--state-dir",
                state,
            ],
            "no workspace token",
        ),
        (
            &["connect", WS, "--token", "t", "--state-dir", state],
            "no platform URL",
        ),
        (
            &[
                "connect",
                WS,
                "--token",
                "t",
                "--api-url",
                "http://10.1.2.3:8080",
                "--state-dir",
                state,
            ],
            "--allow-insecure-http",
        ),
        (
            &[
                "connect",
                WS,
                "--token",
                "t",
                "--api-url",
                "http://127.0.0.1:9",
                "--mode",
                "push",
                "--state-dir",
                state,
            ],
            "not supported",
        ),
        (
            &[
                "connect",
                WS,
                "--token",
                "t",
                "--api-url",
                "http://127.0.0.1:9",
                "--interval-ms",
                "soon",
            ],
            "--interval-ms",
        ),
        (
            &[
                "connect",
                WS,
                "--token",
                "t",
                "--api-url",
                "http://127.0.0.1:9",
                "--backend",
                "nope",
                "--state-dir",
                state,
            ],
            "unknown backend",
        ),
        (
            &[
                "connect",
                WS,
                "--token",
                "t",
                "--api-url",
                "http://127.0.0.1:9",
                "--backend",
                "exec",
                "--state-dir",
                state,
            ],
            "cmd",
        ),
    ];
    for (args, needle) in cases {
        let (code, out, err) = run(args);
        assert_eq!(code, 2, "{args:?}: {err}");
        assert!(out.is_empty(), "{args:?}: stdout {out}");
        assert!(err.contains(needle), "{args:?}: {err}");
        let errors: Vec<&str> = err
            .lines()
            .filter(|l| l.starts_with("molecule: "))
            .collect();
        assert_eq!(errors.len(), 1, "{args:?}: one error line expected: {err}");
        assert!(!err.contains("panicked"), "{err}");
    }
}

#[test]
fn dry_run_checks_and_prints_without_network() {
    let dir = TempDir::new();
    let (code, out, err) = run(&[
        "connect",
        WS,
        "--token",
        "t",
        "--api-url",
        "https://platform.invalid",
        "--backend",
        "exec",
        "--backend-opt",
        "cmd=cat",
        "--dry-run",
        "--state-dir",
        dir.path().to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("dry run") && out.contains(WS), "{out}");
    assert!(!out.contains(" t ") && !err.contains("Bearer"));
}

#[test]
fn corrupt_state_file_is_a_clear_error() {
    let Pair { emu, a, dir, .. } = Test::new().pair();
    std::fs::write(dir.path().join(format!("{}.json", a.id)), "{oops").unwrap();
    let (code, _, err) = run(&[
        "connect",
        &a.id,
        "--backend",
        "mock",
        "--api-url",
        &emu.url,
        "--token",
        &a.token,
        "--state-dir",
        dir.path().to_str().unwrap(),
    ]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("corrupt"), "{err}");
    assert!(!err.contains(&a.token));
}
