//! User output on stdout, shared by the commands and `connect --dry-run`.

use std::io::Write;

use crate::error::Error;

/// Writes `s` to stdout-like `out`; a closed pipe is not an error (`molecule … | head`).
pub fn write_quiet(out: &mut dyn Write, s: &str) -> Result<(), Error> {
    match out.write_all(s.as_bytes()).and_then(|()| out.flush()) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        Err(e) => Err(Error::Runtime(format!("writing output: {e}"))),
    }
}
