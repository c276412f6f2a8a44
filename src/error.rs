//! The top-level error and the only map from errors to exit codes (DESIGN.md §4).
//! Boundary errors convert in with `From`, so `?` works across layers.

use std::fmt;

use crate::api::ApiError;
use crate::backend::BackendError;
use crate::cli::UsageError;
use crate::config::ConfigError;
use crate::state::StateError;

/// Exit 1: runtime failure.
pub const EXIT_FAILURE: u8 = 1;
/// Exit 2: usage or configuration error.
pub const EXIT_USAGE: u8 = 2;
/// Exit 3: the platform rejected our credentials.
pub const EXIT_CREDENTIALS: u8 = 3;
/// Exit 4: the workspace was removed or is unknown.
pub const EXIT_REMOVED: u8 = 4;
/// Exit 5: the platform is too old (no poll mode).
pub const EXIT_TOO_OLD: u8 = 5;
/// Exit 75: platform unreachable after the retry budget; try again later.
pub const EXIT_UNREACHABLE: u8 = 75;

/// Everything that can end a command. Cloned and compared so that a loop's fatal
/// stop ([`crate::shutdown::StopReason::Fatal`]) can carry it to `main`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Error {
    /// Bad command line.
    Usage(UsageError),
    /// Bad configuration.
    Config(ConfigError),
    /// State file or lock trouble.
    State(StateError),
    /// Backend trouble at start-up (bad options, command not found).
    Backend(BackendError),
    /// A platform call failed in a way that ends the command.
    Api(ApiError),
    /// The token was rejected and re-reading it did not help.
    Credentials(String),
    /// The workspace is gone (410) or unknown (404).
    Removed(String),
    /// The platform does not support poll mode.
    PlatformTooOld(String),
    /// The platform stayed unreachable for the whole retry budget.
    Unreachable(String),
    /// Anything else that stops the process (a loop thread died, I/O).
    Runtime(String),
}

impl Error {
    /// The process exit code for this error.
    pub fn exit_code(&self) -> u8 {
        match self {
            Error::Usage(_) | Error::Config(_) | Error::Backend(_) => EXIT_USAGE,
            Error::State(
                StateError::Locked { .. }
                | StateError::Corrupt { .. }
                | StateError::Unusable { .. },
            ) => EXIT_USAGE,
            Error::State(_) => EXIT_FAILURE,
            Error::Api(ApiError::Misconfigured { .. }) => EXIT_USAGE,
            Error::Api(e) if e.is_retryable() => EXIT_UNREACHABLE,
            Error::Api(_) => EXIT_FAILURE,
            Error::Credentials(_) => EXIT_CREDENTIALS,
            Error::Removed(_) => EXIT_REMOVED,
            Error::PlatformTooOld(_) => EXIT_TOO_OLD,
            Error::Unreachable(_) => EXIT_UNREACHABLE,
            Error::Runtime(_) => EXIT_FAILURE,
        }
    }

    /// Is this a usage error (print the help hint)?
    pub fn is_usage(&self) -> bool {
        matches!(self, Error::Usage(_))
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Usage(e) => write!(f, "{e}"),
            Error::Config(e) => write!(f, "{e}"),
            Error::State(e) => write!(f, "{e}"),
            Error::Backend(e) => write!(f, "{e}"),
            Error::Api(e) => write!(f, "{e}"),
            Error::Credentials(m)
            | Error::Removed(m)
            | Error::PlatformTooOld(m)
            | Error::Unreachable(m)
            | Error::Runtime(m) => f.write_str(m),
        }
    }
}

impl std::error::Error for Error {}

impl From<UsageError> for Error {
    fn from(e: UsageError) -> Self {
        Error::Usage(e)
    }
}

impl From<ConfigError> for Error {
    fn from(e: ConfigError) -> Self {
        Error::Config(e)
    }
}

impl From<StateError> for Error {
    fn from(e: StateError) -> Self {
        Error::State(e)
    }
}

impl From<BackendError> for Error {
    fn from(e: BackendError) -> Self {
        Error::Backend(e)
    }
}

impl From<ApiError> for Error {
    fn from(e: ApiError) -> Self {
        Error::Api(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes() {
        assert_eq!(Error::Usage(UsageError("x".into())).exit_code(), 2);
        assert_eq!(Error::Config(ConfigError("x".into())).exit_code(), 2);
        assert_eq!(
            Error::State(StateError::Locked { path: "/x".into() }).exit_code(),
            2
        );
        assert_eq!(Error::Credentials("x".into()).exit_code(), 3);
        assert_eq!(Error::Removed("x".into()).exit_code(), 4);
        assert_eq!(Error::PlatformTooOld("x".into()).exit_code(), 5);
        assert_eq!(Error::Unreachable("x".into()).exit_code(), 75);
        assert_eq!(Error::Api(ApiError::Timeout { op: "x" }).exit_code(), 75);
        assert_eq!(Error::Runtime("x".into()).exit_code(), 1);
    }
}
