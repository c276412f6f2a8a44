//! Telling the supervisor how we are. systemd: the notify protocol, one datagram of
//! `KEY=VALUE` lines to the `NOTIFY_SOCKET` (a path, or `@name` for an abstract
//! socket), written by hand instead of linking libsystemd. s6: readiness is one
//! newline written to the notification fd (`notification-fd` in the service
//! directory; we are told its number with `--notification-fd`). Nothing is sent when
//! neither is configured. No threads here; callers decide when to say what.

use std::fs::File;
use std::io::Write;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::path::Path;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

/// Where to send, as resolved from the environment and the command line.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct NotifySettings {
    /// `NOTIFY_SOCKET`: a path or `@abstract-name`.
    pub socket: Option<String>,
    /// Half of `WATCHDOG_USEC` (when `WATCHDOG_PID`, if set, is this process).
    pub watchdog_every: Option<Duration>,
    /// `--notification-fd`: s6 readiness.
    pub notification_fd: Option<u32>,
}

impl NotifySettings {
    /// Reads `NOTIFY_SOCKET`, `WATCHDOG_USEC` and `WATCHDOG_PID` through `env`;
    /// `pid` is this process's id. A malformed watchdog value is an error: the unit
    /// asked for a watchdog we would silently not feed.
    pub fn from_env(
        env: &dyn Fn(&str) -> Option<String>,
        pid: u32,
        notification_fd: Option<u32>,
    ) -> Result<NotifySettings, String> {
        let socket = env("NOTIFY_SOCKET").filter(|s| !s.is_empty());
        let for_us = match env("WATCHDOG_PID").filter(|s| !s.is_empty()) {
            None => true,
            Some(p) => p.trim().parse::<u32>().ok() == Some(pid),
        };
        let watchdog_every =
            match env("WATCHDOG_USEC").filter(|s| !s.is_empty()) {
                Some(raw) if for_us => {
                    let usec: u64 =
                        raw.trim().parse().ok().filter(|u| *u > 0).ok_or_else(|| {
                            format!("WATCHDOG_USEC={raw:?} is not a positive number")
                        })?;
                    Some(Duration::from_micros(usec / 2))
                }
                _ => None,
            };
        Ok(NotifySettings {
            socket,
            // The pings go to the notify socket: without one there is nobody to feed.
            watchdog_every: watchdog_every.filter(|_| env("NOTIFY_SOCKET").is_some()),
            notification_fd,
        })
    }
}

/// The open channels to the supervisor. Sends never block and never fail the
/// caller: a supervisor that went away must not stop the connector.
#[derive(Debug)]
pub struct Notifier {
    socket: Option<(UnixDatagram, SocketAddr)>,
    s6: Mutex<Option<File>>,
    watchdog_every: Option<Duration>,
}

impl Notifier {
    /// Nothing configured: every send is a no-op.
    #[cfg(test)]
    pub fn none() -> Notifier {
        Notifier {
            socket: None,
            s6: Mutex::new(None),
            watchdog_every: None,
        }
    }

    /// Opens what `settings` names: an unbound datagram socket for systemd (an
    /// unusable address is logged and skipped), the notification fd for s6 (reopened
    /// through `/proc/self/fd`, which needs no `unsafe`; failing that is an error).
    pub fn open(settings: &NotifySettings) -> Result<Notifier, String> {
        // An address we cannot use (a newer systemd's `vsock:`) must not stop the
        // connector: it runs without notifications, and says so.
        let socket = settings.socket.as_ref().and_then(|name| {
            let opened = socket_addr(name).and_then(|addr| {
                let sock = UnixDatagram::unbound()?;
                sock.set_nonblocking(true)?;
                Ok((sock, addr))
            });
            opened
                .map_err(|e| log::warn!("NOTIFY_SOCKET={name:?}: {e}; not notifying systemd"))
                .ok()
        });
        let s6 = match settings.notification_fd {
            None => None,
            Some(fd) => Some(
                File::options()
                    .write(true)
                    .open(format!("/proc/self/fd/{fd}"))
                    .map_err(|e| format!("--notification-fd {fd}: cannot write to it: {e}"))?,
            ),
        };
        Ok(Notifier {
            socket,
            s6: Mutex::new(s6),
            watchdog_every: settings.watchdog_every,
        })
    }

    /// Is anyone listening?
    pub fn is_active(&self) -> bool {
        self.socket.is_some()
            || self
                .s6
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .is_some()
    }

    /// How often to send `WATCHDOG=1`, if systemd wants a watchdog.
    pub fn watchdog_every(&self) -> Option<Duration> {
        self.watchdog_every
    }

    /// Sends one notify datagram (`KEY=VALUE` lines) to systemd.
    pub fn send(&self, message: &str) {
        if let Some((sock, addr)) = &self.socket
            && let Err(e) = sock.send_to_addr(message.as_bytes(), addr)
        {
            log::debug!("NOTIFY_SOCKET: {e}");
        }
    }

    /// Ready: `READY=1` (with `extra` lines) to systemd, and the newline s6 waits
    /// for (once; the fd is closed after it).
    pub fn ready(&self, extra: &str) {
        self.send(&format!("READY=1\n{extra}"));
        let s6 = self
            .s6
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(mut f) = s6
            && let Err(e) = f.write_all(b"\n")
        {
            log::warn!("--notification-fd: {e}");
        }
    }
}

/// `@name` is an abstract socket (Linux); anything else a path.
fn socket_addr(name: &str) -> std::io::Result<SocketAddr> {
    match name.strip_prefix('@') {
        Some(abstract_name) => abstract_addr(abstract_name),
        None if name.starts_with('/') => SocketAddr::from_pathname(Path::new(name)),
        None => Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "not a socket path or @abstract name",
        )),
    }
}

#[cfg(any(target_os = "linux", target_os = "android"))]
fn abstract_addr(name: &str) -> std::io::Result<SocketAddr> {
    #[cfg(target_os = "android")]
    use std::os::android::net::SocketAddrExt;
    #[cfg(target_os = "linux")]
    use std::os::linux::net::SocketAddrExt;
    SocketAddr::from_abstract_name(name.as_bytes())
}

#[cfg(not(any(target_os = "linux", target_os = "android")))]
fn abstract_addr(_: &str) -> std::io::Result<SocketAddr> {
    Err(std::io::Error::new(
        std::io::ErrorKind::Unsupported,
        "abstract sockets are Linux only",
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env<'a>(vars: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |k| {
            vars.iter()
                .find(|(name, _)| *name == k)
                .map(|(_, v)| v.to_string())
        }
    }

    #[test]
    fn settings_from_env() {
        let none = NotifySettings::from_env(&env(&[]), 7, None).unwrap();
        assert_eq!(none, NotifySettings::default());
        let s = NotifySettings::from_env(
            &env(&[("NOTIFY_SOCKET", "@x"), ("WATCHDOG_USEC", "3000000")]),
            7,
            Some(3),
        )
        .unwrap();
        assert_eq!(s.socket.as_deref(), Some("@x"));
        assert_eq!(s.watchdog_every, Some(Duration::from_millis(1500)));
        assert_eq!(s.notification_fd, Some(3));
        // Another process's watchdog (the variables leaked to a child) is not ours.
        let other = NotifySettings::from_env(
            &env(&[
                ("NOTIFY_SOCKET", "@x"),
                ("WATCHDOG_USEC", "3000000"),
                ("WATCHDOG_PID", "8"),
            ]),
            7,
            None,
        )
        .unwrap();
        assert_eq!(other.watchdog_every, None);
        let bad = NotifySettings::from_env(
            &env(&[("NOTIFY_SOCKET", "@x"), ("WATCHDOG_USEC", "soon")]),
            7,
            None,
        );
        assert!(bad.is_err());
    }

    #[test]
    fn sends_to_path_and_abstract_sockets() {
        let dir = std::env::temp_dir().join(format!("molecule-notify-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("notify.sock");
        let _ = std::fs::remove_file(&path);
        let listener = UnixDatagram::bind(&path).unwrap();
        let name = format!("molecule-notify-test-{}", std::process::id());
        let abs = UnixDatagram::bind_addr(&abstract_addr(&name).unwrap()).unwrap();
        for (target, sock) in [
            (path.display().to_string(), &listener),
            (format!("@{name}"), &abs),
        ] {
            let n = Notifier::open(&NotifySettings {
                socket: Some(target),
                ..NotifySettings::default()
            })
            .unwrap();
            assert!(n.is_active());
            n.ready("STATUS=polling\n");
            let mut buf = [0u8; 256];
            let len = sock.recv(&mut buf).unwrap();
            assert_eq!(&buf[..len], b"READY=1\nSTATUS=polling\n");
        }
        let unusable = Notifier::open(&NotifySettings {
            socket: Some("vsock:2:1234".into()),
            ..NotifySettings::default()
        })
        .unwrap();
        assert!(!unusable.is_active());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn nothing_configured_sends_nothing() {
        let n = Notifier::open(&NotifySettings::default()).unwrap();
        assert!(!n.is_active());
        n.ready("");
        n.send("WATCHDOG=1");
    }
}
