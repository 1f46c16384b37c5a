//! XenStore client speaking the wire protocol (xs_wire.h) over the xenstored Unix socket,
//! /dev/xen/xenbus, or any stream (the simulated daemon in `crate::sim`).
//!
//! STUB: API fixed, implementation pending.

use std::os::fd::RawFd;
use std::os::unix::net::UnixStream;

/// A transaction id; `Tx::NONE` is "outside a transaction".
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tx(pub u32);

impl Tx {
    pub const NONE: Tx = Tx(0);
}

/// A fired watch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WatchEvent {
    pub path: String,
    pub token: String,
}

/// XenStore errors. Daemon errors carry the errno name it sent (`ENOENT`, `EAGAIN`, ...).
#[derive(Debug, thiserror::Error)]
pub enum XsError {
    #[error("xenstore: {0}")]
    Daemon(String),
    #[error("xenstore i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("xenstore protocol: {0}")]
    Protocol(String),
}

impl XsError {
    /// True for the daemon's ENOENT.
    pub fn is_enoent(&self) -> bool {
        matches!(self, XsError::Daemon(e) if e == "ENOENT")
    }
    /// True for the daemon's EAGAIN (transaction conflict: retry).
    pub fn is_eagain(&self) -> bool {
        matches!(self, XsError::Daemon(e) if e == "EAGAIN")
    }
}

/// A XenStore connection.
pub struct XsClient {
    _private: (),
}

impl XsClient {
    /// Open the real XenStore: the daemon socket first, then /dev/xen/xenbus.
    pub fn open() -> Result<Self, XsError> {
        todo!()
    }
    /// Use a connected stream (the simulated daemon, tests).
    pub fn from_stream(_s: UnixStream) -> Result<Self, XsError> {
        todo!()
    }
    /// Read a node; `Ok(None)` if it does not exist.
    pub fn read(&mut self, _tx: Tx, _path: &str) -> Result<Option<String>, XsError> {
        todo!()
    }
    /// Write a node (creating parents).
    pub fn write(&mut self, _tx: Tx, _path: &str, _value: &str) -> Result<(), XsError> {
        todo!()
    }
    /// Create a directory node.
    pub fn mkdir(&mut self, _tx: Tx, _path: &str) -> Result<(), XsError> {
        todo!()
    }
    /// Remove a node and its children; removing a missing node is not an error.
    pub fn rm(&mut self, _tx: Tx, _path: &str) -> Result<(), XsError> {
        todo!()
    }
    /// List children; a missing node lists as empty.
    pub fn directory(&mut self, _tx: Tx, _path: &str) -> Result<Vec<String>, XsError> {
        todo!()
    }
    /// Register a watch (fires once at once, then on any change below `path`).
    pub fn watch(&mut self, _path: &str, _token: &str) -> Result<(), XsError> {
        todo!()
    }
    /// Remove a watch.
    pub fn unwatch(&mut self, _path: &str, _token: &str) -> Result<(), XsError> {
        todo!()
    }
    /// Start a transaction.
    pub fn transaction_start(&mut self) -> Result<Tx, XsError> {
        todo!()
    }
    /// End a transaction; `Ok(false)` means EAGAIN (conflict): the caller retries.
    pub fn transaction_end(&mut self, _tx: Tx, _commit: bool) -> Result<bool, XsError> {
        todo!()
    }
    /// Run `f` in a transaction, retrying it on EAGAIN (bounded).
    pub fn transaction<T>(
        &mut self,
        mut _f: impl FnMut(&mut Self, Tx) -> Result<T, XsError>,
    ) -> Result<T, XsError> {
        todo!()
    }
    /// `/local/domain/<domid>`, as the daemon says.
    pub fn get_domain_path(&mut self, _domid: u16) -> Result<String, XsError> {
        todo!()
    }
    /// Our own domain id (the relative node `domid`; 0 when absent, as in Dom0).
    pub fn own_domid(&mut self) -> Result<u16, XsError> {
        todo!()
    }
    /// Set permissions: `perms` like `["n0", "r5"]`.
    pub fn set_perms(&mut self, _tx: Tx, _path: &str, _perms: &[&str]) -> Result<(), XsError> {
        todo!()
    }
    /// Watch events received so far, reading whatever is on the fd without blocking.
    pub fn take_watch_events(&mut self) -> Result<Vec<WatchEvent>, XsError> {
        todo!()
    }
    /// The fd to poll for readability (watch events).
    pub fn as_raw_fd(&self) -> RawFd {
        todo!()
    }
}
