//! The `molecule` binary: logger set-up, one call into the library, one error line,
//! one exit code. No logic lives here.

use std::process::ExitCode;

fn main() -> ExitCode {
    let env = |k: &str| std::env::var(k).ok();
    let argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let args = match molecule::parse_args(argv.iter().cloned()) {
        Ok(a) => a,
        Err(e) => {
            if let Some(doc) = molecule::parse_error_document(&argv, &e) {
                use std::io::Write;
                let _ = std::io::stdout().lock().write_all(doc.as_bytes());
            }
            eprintln!("molecule: {e}\nTry 'molecule --help'.");
            return ExitCode::from(e.exit_code());
        }
    };
    let level = molecule::log_level(args.global.verbosity, &env);
    // ureq/rustls TRACE is wire level and not redacted: cap them whatever our level.
    let _ = molecule::logger::init(
        simple_logger::SimpleLogger::new()
            .with_level(level)
            .with_module_level("ureq", log::LevelFilter::Warn)
            .with_module_level("ureq_proto", log::LevelFilter::Warn)
            .with_module_level("rustls", log::LevelFilter::Warn),
    );
    let mut stdout = std::io::stdout().lock();
    match molecule::run(args, &env, &mut stdout) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("molecule: {e}");
            if e.is_usage() {
                eprintln!("Try 'molecule --help'.");
            }
            ExitCode::from(e.exit_code())
        }
    }
}
