/*!
The log sink: simple_logger's level filter and line format (`INFO  [target] text`),
each line written with one `write(2)`. simple_logger hands its line to `eprintln!`,
which writes the text and the newline to the unbuffered stderr one after the other:
two system calls a line, and a fresh `String` for the level and the line. Here the
line is formatted into a per-thread buffer, newline included, and written at once
(which also keeps a line whole when threads log at the same time).
*/

use std::cell::RefCell;
use std::io::Write as _;

use log::{Log, Metadata, Record, SetLoggerError};
use simple_logger::SimpleLogger;

/// A thread's line buffer is kept while no line has grown it past this.
const KEEP: usize = 16 * 1024;

thread_local! {
    static LINE: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// Installs the logger: `filter` decides which records are written (its levels, per
/// module), this writes them.
pub fn init(filter: SimpleLogger) -> Result<(), SetLoggerError> {
    log::set_max_level(filter.max_level());
    log::set_boxed_logger(Box::new(Logger(filter)))
}

struct Logger(SimpleLogger);

impl Log for Logger {
    fn enabled(&self, metadata: &Metadata) -> bool {
        self.0.enabled(metadata)
    }

    fn log(&self, record: &Record) {
        if !self.0.enabled(record.metadata()) {
            return;
        }
        let write = |buf: &mut Vec<u8>| {
            buf.clear();
            format_line(buf, record);
            // A stderr that cannot be written (a supervisor's log pipe gone, a full
            // disk) loses the line, not the connector: `eprintln!` panicked here, and
            // with `panic = "abort"` that ended the process.
            let _ = std::io::stderr().lock().write_all(buf);
        };
        LINE.with(|line| match line.try_borrow_mut() {
            Ok(mut buf) => {
                write(&mut buf);
                if buf.capacity() > KEEP {
                    *buf = Vec::new();
                }
            }
            // A record logged while formatting another one.
            Err(_) => write(&mut Vec::new()),
        });
    }

    fn flush(&self) {}
}

/// simple_logger's line (without timestamps, colours or thread names, none of which
/// its features here enable), newline included.
fn format_line(buf: &mut Vec<u8>, record: &Record) {
    let target = if record.target().is_empty() {
        record.module_path().unwrap_or_default()
    } else {
        record.target()
    };
    // Writing into a Vec fails only if a `Display` impl does; the line is then cut.
    let _ = writeln!(buf, "{:<5} [{}] {}", record.level(), target, record.args());
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(level: log::Level, target: &str, args: std::fmt::Arguments) -> String {
        let mut buf = Vec::new();
        let record = Record::builder()
            .level(level)
            .target(target)
            .module_path_static(Some("molecule::runner"))
            .args(args)
            .build();
        format_line(&mut buf, &record);
        String::from_utf8(buf).unwrap()
    }

    #[test]
    fn lines_are_simple_loggers() {
        // simple_logger 5.2: format!("{}{} [{}{}] {}", "", format!("{:<5}", level.to_string()), target, "", args)
        assert_eq!(
            line(
                log::Level::Info,
                "molecule::runner::dispatch",
                format_args!("row {}: x", 7)
            ),
            "INFO  [molecule::runner::dispatch] row 7: x\n"
        );
        assert_eq!(
            line(log::Level::Error, "t", format_args!("a\nb")),
            "ERROR [t] a\nb\n"
        );
        assert_eq!(
            line(log::Level::Warn, "", format_args!("w")),
            "WARN  [molecule::runner] w\n"
        );
    }
}
