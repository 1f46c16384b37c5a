//! systemd readiness without libsystemd: the sd_notify(3) datagram protocol.
//!
//! `$NOTIFY_SOCKET` names an `AF_UNIX` datagram socket, a path or (`@` first) an
//! abstract name; each message is one datagram of newline-separated `KEY=VALUE`
//! assignments (`READY=1`, `STATUS=...`, `STOPPING=1`, `WATCHDOG=1`). With
//! `$WATCHDOG_USEC` set (and `$WATCHDOG_PID` ours or unset) the service manager expects
//! `WATCHDOG=1` at least that often; we send it every half of it, from the event loop.
//!
//! Sending never fails the caller: a service manager that went away is logged once.

use std::io;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Where notifications go, and how often the watchdog wants to hear from us.
#[derive(Clone, Debug)]
pub struct Notifier {
    /// `$NOTIFY_SOCKET` as given: a path, or `@name` for an abstract socket.
    socket: String,
    /// `WATCHDOG_USEC / 2`, if the watchdog is on for this process.
    watchdog: Option<Duration>,
    /// A send failed already (logged once).
    failed: Arc<AtomicBool>,
}

impl Notifier {
    /// Notifications to `socket` (a path, or `@name` for an abstract socket); no watchdog.
    pub fn new(socket: impl Into<String>) -> Self {
        Notifier {
            socket: socket.into(),
            watchdog: None,
            failed: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Pet the watchdog every `interval` (the environment's is `WATCHDOG_USEC / 2`).
    pub fn with_watchdog(mut self, interval: Option<Duration>) -> Self {
        self.watchdog = interval;
        self
    }

    /// The notifier the service manager asked for in our environment, if any.
    pub fn from_env() -> Option<Self> {
        let socket = std::env::var("NOTIFY_SOCKET")
            .ok()
            .filter(|s| !s.is_empty())?;
        let usec = std::env::var("WATCHDOG_USEC").ok();
        let pid = std::env::var("WATCHDOG_PID").ok();
        let watchdog = watchdog_interval(usec.as_deref(), pid.as_deref(), std::process::id());
        Some(Notifier::new(socket).with_watchdog(watchdog))
    }

    /// How often to send `WATCHDOG=1`, if at all.
    pub fn watchdog(&self) -> Option<Duration> {
        self.watchdog
    }

    /// The socket's address.
    fn address(&self) -> io::Result<SocketAddr> {
        match self.socket.strip_prefix('@') {
            Some(name) => SocketAddr::from_abstract_name(name.as_bytes()),
            None if self.socket.starts_with('/') => SocketAddr::from_pathname(&self.socket),
            None => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "NOTIFY_SOCKET={:?} is neither a path nor @abstract",
                    self.socket
                ),
            )),
        }
    }

    /// Send one datagram of `KEY=VALUE` lines.
    pub fn send(&self, message: &str) -> io::Result<()> {
        let addr = self.address()?;
        let sock = UnixDatagram::unbound()?;
        let n = sock.send_to_addr(message.as_bytes(), &addr)?;
        if n != message.len() {
            return Err(io::Error::other("short sd_notify datagram"));
        }
        Ok(())
    }

    /// [`Notifier::send`], logging the first failure only (a service manager that went
    /// away must not flood the log or stop the backend).
    pub fn notify(&self, message: &str) {
        match self.send(message) {
            Ok(()) => tracing::debug!("sd_notify {}", message.replace('\n', " ")),
            Err(e) => {
                if !self.failed.swap(true, Ordering::Relaxed) {
                    tracing::warn!("sd_notify to {}: {e}", self.socket);
                }
            }
        }
    }
}

/// `STATUS=` text: no newline may end the assignment early.
pub fn status_line(status: &str) -> String {
    format!("STATUS={}", status.replace('\n', " "))
}

/// The watchdog interval sd_watchdog_enabled(3) implies: half of `WATCHDOG_USEC`, if
/// that is a positive number and `WATCHDOG_PID` is unset or `pid`.
pub fn watchdog_interval(usec: Option<&str>, pid: Option<&str>, own: u32) -> Option<Duration> {
    let usec: u64 = usec?.trim().parse().ok().filter(|&u| u > 0)?;
    if let Some(pid) = pid.filter(|p| !p.is_empty()) {
        if pid.trim().parse::<u32>().ok() != Some(own) {
            return None;
        }
    }
    Some(Duration::from_micros(usec / 2).max(Duration::from_millis(1)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn watchdog_interval_is_half_and_only_ours() {
        let half = Some(Duration::from_secs(5));
        assert_eq!(watchdog_interval(Some("10000000"), None, 42), half);
        assert_eq!(watchdog_interval(Some("10000000"), Some(""), 42), half);
        assert_eq!(watchdog_interval(Some("10000000"), Some("42"), 42), half);
        assert_eq!(watchdog_interval(Some("10000000"), Some("41"), 42), None);
        assert_eq!(watchdog_interval(Some("10000000"), Some("x"), 42), None);
        assert_eq!(watchdog_interval(None, Some("42"), 42), None);
        assert_eq!(watchdog_interval(Some("0"), None, 42), None);
        assert_eq!(watchdog_interval(Some("-5"), None, 42), None);
        assert_eq!(watchdog_interval(Some("soon"), None, 42), None);
    }

    fn recv(sock: &UnixDatagram) -> String {
        let mut buf = [0u8; 512];
        let n = sock.recv(&mut buf).unwrap();
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }

    #[test]
    fn sends_to_a_path_socket() {
        let dir = std::env::temp_dir().join(format!("displback-notify-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("notify");
        let _ = std::fs::remove_file(&path);
        let sock = UnixDatagram::bind(&path).unwrap();
        let n = Notifier::new(path.to_str().unwrap());
        n.send("READY=1\nSTATUS=ok").unwrap();
        assert_eq!(recv(&sock), "READY=1\nSTATUS=ok");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn sends_to_an_abstract_socket() {
        let name = format!("displback-notify-test-{}", std::process::id());
        let addr = SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let sock = UnixDatagram::bind_addr(&addr).unwrap();
        Notifier::new(format!("@{name}"))
            .send("WATCHDOG=1")
            .unwrap();
        assert_eq!(recv(&sock), "WATCHDOG=1");
    }

    #[test]
    fn bad_addresses_are_errors_not_panics() {
        assert!(Notifier::new("relative/path").send("READY=1").is_err());
        let gone = Notifier::new("/nonexistent/displback/notify");
        assert!(gone.send("READY=1").is_err());
        gone.notify("READY=1"); // logged, not fatal
        assert_eq!(status_line("a\nb"), "STATUS=a b");
    }
}
