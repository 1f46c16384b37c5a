//! XenStore client speaking the wire protocol (xs_wire.h) over the xenstored Unix socket,
//! /dev/xen/xenbus, or any stream (the simulated daemon in `crate::sim`).
//!
//! One request is outstanding at a time. The reply to it is the first message that is
//! not a watch event and whose `req_id` is ours or 0 (`/dev/xen/xenbus` answers
//! WATCH/UNWATCH with a synthesized reply carrying `req_id` 0); watch events that arrive
//! while waiting are queued for [`XsClient::take_watch_events`]. The fd is kept
//! non-blocking so it can be polled for watch events by an event loop; reads go through
//! an internal buffer that copes with messages split across reads.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

/// Wire-level constants and framing shared with the simulated daemon.
pub mod wire {
    /// Largest payload either side may send (`XENSTORE_PAYLOAD_MAX`).
    pub const PAYLOAD_MAX: usize = 4096;
    /// Size of `struct xsd_sockmsg`.
    pub const HEADER_LEN: usize = 16;

    pub const XS_CONTROL: u32 = 0;
    pub const XS_DIRECTORY: u32 = 1;
    pub const XS_READ: u32 = 2;
    pub const XS_GET_PERMS: u32 = 3;
    pub const XS_WATCH: u32 = 4;
    pub const XS_UNWATCH: u32 = 5;
    pub const XS_TRANSACTION_START: u32 = 6;
    pub const XS_TRANSACTION_END: u32 = 7;
    pub const XS_INTRODUCE: u32 = 8;
    pub const XS_RELEASE: u32 = 9;
    pub const XS_GET_DOMAIN_PATH: u32 = 10;
    pub const XS_WRITE: u32 = 11;
    pub const XS_MKDIR: u32 = 12;
    pub const XS_RM: u32 = 13;
    pub const XS_SET_PERMS: u32 = 14;
    pub const XS_WATCH_EVENT: u32 = 15;
    pub const XS_ERROR: u32 = 16;
    pub const XS_IS_DOMAIN_INTRODUCED: u32 = 17;

    /// `struct xsd_sockmsg`, host byte order on the wire.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct Header {
        pub ty: u32,
        pub req_id: u32,
        pub tx_id: u32,
        pub len: u32,
    }

    impl Header {
        /// Decode the first 16 bytes of `b` (`None` if shorter).
        pub fn decode(b: &[u8]) -> Option<Header> {
            let w = |i: usize| -> Option<u32> {
                Some(u32::from_ne_bytes(b.get(i..i + 4)?.try_into().ok()?))
            };
            Some(Header {
                ty: w(0)?,
                req_id: w(4)?,
                tx_id: w(8)?,
                len: w(12)?,
            })
        }

        /// The 16 header bytes.
        pub fn encode(&self) -> [u8; HEADER_LEN] {
            let mut out = [0u8; HEADER_LEN];
            out[0..4].copy_from_slice(&self.ty.to_ne_bytes());
            out[4..8].copy_from_slice(&self.req_id.to_ne_bytes());
            out[8..12].copy_from_slice(&self.tx_id.to_ne_bytes());
            out[12..16].copy_from_slice(&self.len.to_ne_bytes());
            out
        }
    }

    /// One whole message (header + payload) in a single buffer, so it can be written
    /// with one `write()` (required by /dev/xen/xenbus). `None` if the payload is too big.
    pub fn encode_msg(ty: u32, req_id: u32, tx_id: u32, payload: &[u8]) -> Option<Vec<u8>> {
        if payload.len() > PAYLOAD_MAX {
            return None;
        }
        let h = Header {
            ty,
            req_id,
            tx_id,
            len: payload.len() as u32,
        };
        let mut v = Vec::with_capacity(HEADER_LEN + payload.len());
        v.extend_from_slice(&h.encode());
        v.extend_from_slice(payload);
        Some(v)
    }
}

use wire::*;

/// How long to wait for a reply before giving up.
const REPLY_TIMEOUT: Duration = Duration::from_secs(10);
/// How many times [`XsClient::transaction`] runs its closure before giving up on EAGAIN.
const TX_RETRIES: u32 = 100;

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

/// A received message.
struct Msg {
    hdr: Header,
    payload: Vec<u8>,
}

/// A XenStore connection.
pub struct XsClient {
    /// The socket or device, non-blocking.
    fd: File,
    /// True for a stream socket (writes may be partial); false for the xenbus device
    /// (each write must be one whole message).
    is_socket: bool,
    /// Bytes read but not yet parsed into messages.
    rbuf: Vec<u8>,
    /// Watch events received but not yet taken.
    events: VecDeque<WatchEvent>,
    /// The last [`XsClient::take_watch_events`] stopped at its bound with data left.
    drain_bounded: bool,
    /// Last request id used (never 0).
    req_id: u32,
    /// Set once the stream is unusable (framing lost, EOF, timeout).
    broken: Option<String>,
}

impl XsClient {
    /// Open the real XenStore: the daemon socket first, then /dev/xen/xenbus.
    ///
    /// `$XENSTORED_PATH`, when set, is tried first, as a socket or as a device.
    pub fn open() -> Result<Self, XsError> {
        let mut tried = Vec::new();
        let env = std::env::var_os("XENSTORED_PATH");
        let mut candidates: Vec<std::path::PathBuf> = Vec::new();
        if let Some(p) = env {
            candidates.push(p.into());
        }
        for p in [
            "/run/xenstored/socket",
            "/var/run/xenstored/socket",
            "/dev/xen/xenbus",
            "/proc/xen/xenbus",
        ] {
            candidates.push(p.into());
        }
        for path in candidates {
            let meta = match std::fs::metadata(&path) {
                Ok(m) => m,
                Err(e) => {
                    tried.push(format!("{}: {e}", path.display()));
                    continue;
                }
            };
            let res = if meta.file_type().is_socket() {
                UnixStream::connect(&path)
                    .map_err(XsError::from)
                    .and_then(Self::from_stream)
            } else {
                OpenOptions::new()
                    .read(true)
                    .write(true)
                    .custom_flags(libc::O_NONBLOCK)
                    .open(&path)
                    .map_err(XsError::from)
                    .map(|f| Self::new(f, false))
            };
            match res {
                Ok(c) => {
                    tracing::debug!("xenstore: using {}", path.display());
                    return Ok(c);
                }
                Err(e) => tried.push(format!("{}: {e}", path.display())),
            }
        }
        Err(XsError::Io(io::Error::new(
            io::ErrorKind::NotFound,
            format!("no xenstore transport ({})", tried.join("; ")),
        )))
    }

    /// Use a connected stream (the simulated daemon, tests).
    pub fn from_stream(s: UnixStream) -> Result<Self, XsError> {
        s.set_nonblocking(true)?;
        Ok(Self::new(File::from(OwnedFd::from(s)), true))
    }

    fn new(fd: File, is_socket: bool) -> Self {
        XsClient {
            fd,
            is_socket,
            rbuf: Vec::new(),
            events: VecDeque::new(),
            drain_bounded: false,
            req_id: 0,
            broken: None,
        }
    }

    /// Read a node; `Ok(None)` if it does not exist. Trailing NULs some writers include
    /// are stripped; invalid UTF-8 is replaced (values are validated by their users).
    pub fn read(&mut self, tx: Tx, path: &str) -> Result<Option<String>, XsError> {
        match self.request(XS_READ, tx, &[arg(path)?], true) {
            Ok(v) => {
                let v = strip_nuls(&v);
                Ok(Some(String::from_utf8_lossy(v).into_owned()))
            }
            Err(e) if e.is_enoent() => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Write a node (creating parents).
    pub fn write(&mut self, tx: Tx, path: &str, value: &str) -> Result<(), XsError> {
        check_str(value, "value", true)?;
        self.request(XS_WRITE, tx, &[arg(path)?, b"\0", value.as_bytes()], false)
            .map(drop)
    }

    /// Create a directory node.
    pub fn mkdir(&mut self, tx: Tx, path: &str) -> Result<(), XsError> {
        self.request(XS_MKDIR, tx, &[arg(path)?], true).map(drop)
    }

    /// Remove a node and its children; removing a missing node is not an error.
    pub fn rm(&mut self, tx: Tx, path: &str) -> Result<(), XsError> {
        match self.request(XS_RM, tx, &[arg(path)?], true) {
            Ok(_) => Ok(()),
            Err(e) if e.is_enoent() => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// List children; a missing node lists as empty.
    pub fn directory(&mut self, tx: Tx, path: &str) -> Result<Vec<String>, XsError> {
        match self.request(XS_DIRECTORY, tx, &[arg(path)?], true) {
            Ok(v) => Ok(split_strings(&v)),
            Err(e) if e.is_enoent() => Ok(Vec::new()),
            Err(e) => Err(e),
        }
    }

    /// Register a watch (fires once at once, then on any change below `path`).
    pub fn watch(&mut self, path: &str, token: &str) -> Result<(), XsError> {
        check_str(token, "token", false)?;
        self.request(
            XS_WATCH,
            Tx::NONE,
            &[arg(path)?, b"\0", token.as_bytes(), b"\0"],
            false,
        )
        .map(drop)
    }

    /// Remove a watch.
    pub fn unwatch(&mut self, path: &str, token: &str) -> Result<(), XsError> {
        check_str(token, "token", false)?;
        self.request(
            XS_UNWATCH,
            Tx::NONE,
            &[arg(path)?, b"\0", token.as_bytes(), b"\0"],
            false,
        )
        .map(drop)
    }

    /// Start a transaction.
    pub fn transaction_start(&mut self) -> Result<Tx, XsError> {
        let v = self.request(XS_TRANSACTION_START, Tx::NONE, &[b"\0"], false)?;
        let s = std::str::from_utf8(strip_nuls(&v))
            .map_err(|_| XsError::Protocol("transaction id is not UTF-8".into()))?;
        match s.parse::<u32>() {
            Ok(id) if id != 0 => Ok(Tx(id)),
            _ => Err(XsError::Protocol(format!("bad transaction id {s:?}"))),
        }
    }

    /// End a transaction; `Ok(false)` means EAGAIN (conflict): the caller retries.
    pub fn transaction_end(&mut self, tx: Tx, commit: bool) -> Result<bool, XsError> {
        let arg: &[u8] = if commit { b"T\0" } else { b"F\0" };
        match self.request(XS_TRANSACTION_END, tx, &[arg], false) {
            Ok(_) => Ok(true),
            Err(e) if e.is_eagain() => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Run `f` in a transaction, retrying it on EAGAIN (bounded).
    ///
    /// EAGAIN from the commit or from any operation inside `f` restarts the whole
    /// transaction; any other error from `f` aborts it and is returned.
    pub fn transaction<T>(
        &mut self,
        mut f: impl FnMut(&mut Self, Tx) -> Result<T, XsError>,
    ) -> Result<T, XsError> {
        for attempt in 0..TX_RETRIES {
            let tx = self.transaction_start()?;
            match f(self, tx) {
                Ok(v) => {
                    if self.transaction_end(tx, true)? {
                        return Ok(v);
                    }
                }
                Err(e) if e.is_eagain() => {
                    // Best effort: the daemon may already have dropped it.
                    if let Err(e2) = self.transaction_end(tx, false) {
                        if !matches!(e2, XsError::Daemon(_)) {
                            return Err(e2);
                        }
                    }
                }
                Err(e) => {
                    if let Err(e2) = self.transaction_end(tx, false) {
                        tracing::debug!("xenstore: abort after error {e}: {e2}");
                    }
                    return Err(e);
                }
            }
            tracing::debug!("xenstore: transaction conflict, retry {}", attempt + 1);
        }
        Err(XsError::Daemon("EAGAIN".into()))
    }

    /// `/local/domain/<domid>`, as the daemon says.
    pub fn get_domain_path(&mut self, domid: u16) -> Result<String, XsError> {
        let v = self.request(
            XS_GET_DOMAIN_PATH,
            Tx::NONE,
            &[domid.to_string().as_bytes()],
            true,
        )?;
        String::from_utf8(strip_nuls(&v).to_vec())
            .map_err(|_| XsError::Protocol("domain path is not UTF-8".into()))
    }

    /// Our own domain id (the relative node `domid`; 0 when absent, as in Dom0).
    pub fn own_domid(&mut self) -> Result<u16, XsError> {
        match self.read(Tx::NONE, "domid")? {
            None => Ok(0),
            Some(s) => s
                .trim()
                .parse::<u16>()
                .map_err(|_| XsError::Protocol(format!("bad domid {s:?}"))),
        }
    }

    /// Set permissions: `perms` like `["n0", "r5"]`.
    pub fn set_perms(&mut self, tx: Tx, path: &str, perms: &[&str]) -> Result<(), XsError> {
        let mut parts: Vec<&[u8]> = vec![arg(path)?, b"\0"];
        for p in perms {
            check_str(p, "permission", false)?;
            parts.push(p.as_bytes());
            parts.push(b"\0");
        }
        self.request(XS_SET_PERMS, tx, &parts, false).map(drop)
    }

    /// Watch events received so far, reading whatever is on the fd without blocking.
    pub fn take_watch_events(&mut self) -> Result<Vec<WatchEvent>, XsError> {
        self.check_broken()?;
        // Bounded, so a flooding peer can't keep us here forever; what is left is
        // taken at the next call ([`XsClient::needs_drain`] says so).
        self.drain_bounded = true;
        for _ in 0..256 {
            let more = matches!(self.fill()?, Fill::Data);
            while let Some(m) = self.parse_one()? {
                if m.hdr.ty == XS_WATCH_EVENT {
                    self.queue_event(&m.payload);
                } else {
                    tracing::warn!(
                        "xenstore: unsolicited message type {} req_id {} dropped",
                        m.hdr.ty,
                        m.hdr.req_id
                    );
                }
            }
            if !more {
                self.drain_bounded = false;
                break;
            }
        }
        Ok(self.events.drain(..).collect())
    }

    /// Whether [`XsClient::take_watch_events`] has work that the fd polling readable
    /// will not announce: events or bytes read while waiting for a reply, or a drain
    /// that stopped at its bound. The server drains when this is true or the fd fired
    /// (edge-triggered: each arrival fires again), not on every turn of its loop.
    pub fn needs_drain(&self) -> bool {
        self.drain_bounded || !self.events.is_empty() || !self.rbuf.is_empty()
    }

    /// The fd to poll for readability (watch events).
    pub fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    // ---- internals ----

    fn check_broken(&self) -> Result<(), XsError> {
        match &self.broken {
            Some(why) => Err(XsError::Protocol(format!("connection unusable: {why}"))),
            None => Ok(()),
        }
    }

    fn poison(&mut self, why: String) -> XsError {
        self.broken = Some(why.clone());
        XsError::Protocol(why)
    }

    /// Send one request made of `parts` (concatenated), with a trailing NUL when
    /// `nul_terminate`, and wait for its reply payload. XS_ERROR replies become
    /// `XsError::Daemon`.
    fn request(
        &mut self,
        ty: u32,
        tx: Tx,
        parts: &[&[u8]],
        nul_terminate: bool,
    ) -> Result<Vec<u8>, XsError> {
        self.check_broken()?;
        let mut payload: Vec<u8> = parts.concat();
        if nul_terminate {
            payload.push(0);
        }
        if payload.len() > PAYLOAD_MAX {
            return Err(XsError::Protocol(format!(
                "request payload of {} bytes exceeds {PAYLOAD_MAX}",
                payload.len()
            )));
        }
        self.req_id = self.req_id.wrapping_add(1).max(1);
        let req_id = self.req_id;
        let msg = encode_msg(ty, req_id, tx.0, &payload).expect("payload checked above");
        self.send(&msg)?;
        let reply = self.wait_reply(req_id)?;
        if reply.hdr.ty == XS_ERROR {
            let name = String::from_utf8_lossy(strip_nuls(&reply.payload)).into_owned();
            return Err(XsError::Daemon(name));
        }
        if reply.hdr.ty != ty {
            return Err(self.poison(format!("reply type {} to request type {ty}", reply.hdr.ty)));
        }
        Ok(reply.payload)
    }

    fn send(&mut self, msg: &[u8]) -> Result<(), XsError> {
        let deadline = Instant::now() + REPLY_TIMEOUT;
        let mut off = 0;
        while off < msg.len() {
            match self.fd.write(&msg[off..]) {
                Ok(0) => return Err(self.poison("write returned 0".into())),
                Ok(n) => {
                    if !self.is_socket && n != msg.len() {
                        return Err(self.poison(format!(
                            "short write {n} of {} to the xenbus device",
                            msg.len()
                        )));
                    }
                    off += n;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if !self.wait_fd(libc::POLLOUT, deadline)? {
                        return Err(self.poison("timed out writing a request".into()));
                    }
                }
                Err(e) => {
                    self.broken = Some(format!("write: {e}"));
                    return Err(e.into());
                }
            }
        }
        Ok(())
    }

    fn wait_reply(&mut self, req_id: u32) -> Result<Msg, XsError> {
        let deadline = Instant::now() + REPLY_TIMEOUT;
        loop {
            while let Some(m) = self.parse_one()? {
                if m.hdr.ty == XS_WATCH_EVENT {
                    self.queue_event(&m.payload);
                } else if m.hdr.req_id == req_id || m.hdr.req_id == 0 {
                    return Ok(m);
                } else {
                    tracing::warn!(
                        "xenstore: stale reply req_id {} (waiting for {req_id}) dropped",
                        m.hdr.req_id
                    );
                }
            }
            match self.fill()? {
                Fill::Data => {}
                Fill::WouldBlock => {
                    if !self.wait_fd(libc::POLLIN, deadline)? {
                        return Err(self.poison("timed out waiting for a reply".into()));
                    }
                }
            }
        }
    }

    /// Poll our fd for `events` until `deadline`; false on timeout.
    fn wait_fd(&self, events: libc::c_short, deadline: Instant) -> Result<bool, XsError> {
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(false);
            }
            let mut pfd = libc::pollfd {
                fd: self.fd.as_raw_fd(),
                events,
                revents: 0,
            };
            let ms = left.as_millis().clamp(1, i32::MAX as u128) as libc::c_int;
            // SAFETY: `pfd` is a valid, initialized pollfd that lives across the call and
            // we pass a count of exactly 1.
            let r = unsafe { libc::poll(&mut pfd, 1, ms) };
            if r < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e.into());
            }
            if r > 0 {
                // Readable, writable, HUP or ERR: the next read/write reports which.
                return Ok(true);
            }
        }
    }

    /// One non-blocking read into the buffer.
    fn fill(&mut self) -> Result<Fill, XsError> {
        let mut tmp = [0u8; HEADER_LEN + PAYLOAD_MAX];
        loop {
            match self.fd.read(&mut tmp) {
                Ok(0) => {
                    self.broken = Some("closed by the daemon".into());
                    return Err(XsError::Io(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "xenstore connection closed",
                    )));
                }
                Ok(n) => {
                    self.rbuf.extend_from_slice(&tmp[..n]);
                    return Ok(Fill::Data);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Fill::WouldBlock),
                Err(e) => {
                    self.broken = Some(format!("read: {e}"));
                    return Err(e.into());
                }
            }
        }
    }

    /// Take one whole message off the buffer, if there is one.
    fn parse_one(&mut self) -> Result<Option<Msg>, XsError> {
        let Some(hdr) = Header::decode(&self.rbuf) else {
            return Ok(None);
        };
        let len = hdr.len as usize;
        if len > PAYLOAD_MAX {
            return Err(self.poison(format!("message payload of {len} bytes exceeds limit")));
        }
        if self.rbuf.len() < HEADER_LEN + len {
            return Ok(None);
        }
        let payload = self.rbuf[HEADER_LEN..HEADER_LEN + len].to_vec();
        self.rbuf.drain(..HEADER_LEN + len);
        Ok(Some(Msg { hdr, payload }))
    }

    fn queue_event(&mut self, payload: &[u8]) {
        let mut it = payload.split(|&b| b == 0);
        match (it.next(), it.next()) {
            (Some(path), Some(token)) if !path.is_empty() => self.events.push_back(WatchEvent {
                path: String::from_utf8_lossy(path).into_owned(),
                token: String::from_utf8_lossy(token).into_owned(),
            }),
            _ => tracing::warn!("xenstore: malformed watch event dropped"),
        }
    }
}

enum Fill {
    Data,
    WouldBlock,
}

/// A path (or similar single argument) as bytes; it must not contain NUL.
fn arg(s: &str) -> Result<&[u8], XsError> {
    check_str(s, "path", false)?;
    Ok(s.as_bytes())
}

fn strip_nuls(v: &[u8]) -> &[u8] {
    let mut end = v.len();
    while end > 0 && v[end - 1] == 0 {
        end -= 1;
    }
    &v[..end]
}

/// NUL-separated strings (each terminated), empty ones skipped.
fn split_strings(v: &[u8]) -> Vec<String> {
    v.split(|&b| b == 0)
        .filter(|s| !s.is_empty())
        .map(|s| String::from_utf8_lossy(s).into_owned())
        .collect()
}

fn check_str(s: &str, what: &str, allow_empty: bool) -> Result<(), XsError> {
    if s.contains('\0') {
        return Err(XsError::Protocol(format!("{what} contains NUL")));
    }
    if !allow_empty && s.is_empty() {
        return Err(XsError::Protocol(format!("empty {what}")));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::thread;

    /// Read one request from the fake server side (blocking).
    fn read_req(s: &mut UnixStream) -> (Header, Vec<u8>) {
        let mut h = [0u8; HEADER_LEN];
        s.read_exact(&mut h).unwrap();
        let hdr = Header::decode(&h).unwrap();
        let mut p = vec![0u8; hdr.len as usize];
        s.read_exact(&mut p).unwrap();
        (hdr, p)
    }

    fn msg(ty: u32, req_id: u32, payload: &[u8]) -> Vec<u8> {
        encode_msg(ty, req_id, 0, payload).unwrap()
    }

    fn pair() -> (XsClient, UnixStream) {
        let (a, b) = UnixStream::pair().unwrap();
        (XsClient::from_stream(a).unwrap(), b)
    }

    #[test]
    fn read_reply_split_across_writes() {
        let (mut c, mut s) = pair();
        let t = thread::spawn(move || {
            let (h, p) = read_req(&mut s);
            assert_eq!(h.ty, XS_READ);
            assert_eq!(h.tx_id, 7);
            assert_eq!(p, b"/a/b\0");
            let m = msg(XS_READ, h.req_id, b"hello");
            // Dribble the reply out byte by byte.
            for b in m {
                s.write_all(&[b]).unwrap();
                s.flush().unwrap();
            }
            s
        });
        assert_eq!(c.read(Tx(7), "/a/b").unwrap().as_deref(), Some("hello"));
        t.join().unwrap();
    }

    #[test]
    fn watch_event_before_reply_is_queued() {
        let (mut c, mut s) = pair();
        let t = thread::spawn(move || {
            let (h, p) = read_req(&mut s);
            assert_eq!(h.ty, XS_WRITE);
            assert_eq!(p, b"/x\0val");
            let mut out = msg(XS_WATCH_EVENT, 0, b"/x\0tok\0");
            out.extend(msg(XS_WRITE, h.req_id, b"OK\0"));
            // Also one event after the reply, in the same write.
            out.extend(msg(XS_WATCH_EVENT, 0, b"/y\0tok2\0"));
            s.write_all(&out).unwrap();
            s
        });
        c.write(Tx::NONE, "/x", "val").unwrap();
        let _s = t.join().unwrap();
        let ev = c.take_watch_events().unwrap();
        assert_eq!(
            ev,
            vec![
                WatchEvent {
                    path: "/x".into(),
                    token: "tok".into()
                },
                WatchEvent {
                    path: "/y".into(),
                    token: "tok2".into()
                }
            ]
        );
        // Nothing more, and no blocking.
        assert!(c.take_watch_events().unwrap().is_empty());
        assert!(!c.needs_drain());
    }

    #[test]
    fn needs_drain_after_events_read_with_a_reply() {
        let (mut c, mut s) = pair();
        assert!(!c.needs_drain(), "a new client has nothing to drain");
        let t = thread::spawn(move || {
            let (h, _) = read_req(&mut s);
            let mut out = msg(XS_WATCH_EVENT, 0, b"/x\0tok\0");
            out.extend(msg(XS_WRITE, h.req_id, b"OK\0"));
            s.write_all(&out).unwrap();
            s
        });
        c.write(Tx::NONE, "/x", "val").unwrap();
        let _s = t.join().unwrap();
        // The event came with the reply: the fd will not fire for it.
        assert!(c.needs_drain());
        assert_eq!(c.take_watch_events().unwrap().len(), 1);
        assert!(!c.needs_drain());
    }

    #[test]
    fn take_watch_events_partial_message_does_not_block() {
        let (mut c, mut s) = pair();
        let m = msg(XS_WATCH_EVENT, 0, b"/p\0t\0");
        s.write_all(&m[..10]).unwrap();
        assert!(c.take_watch_events().unwrap().is_empty());
        s.write_all(&m[10..]).unwrap();
        assert_eq!(c.take_watch_events().unwrap().len(), 1);
    }

    #[test]
    fn error_names_map() {
        let (mut c, mut s) = pair();
        let t = thread::spawn(move || {
            for name in [
                &b"ENOENT\0"[..],
                b"ENOENT\0",
                b"ENOENT\0",
                b"EACCES\0",
                b"EAGAIN\0",
            ] {
                let (h, _) = read_req(&mut s);
                s.write_all(&msg(XS_ERROR, h.req_id, name)).unwrap();
            }
            s
        });
        assert_eq!(c.read(Tx::NONE, "/n").unwrap(), None);
        assert!(c.directory(Tx::NONE, "/n").unwrap().is_empty());
        c.rm(Tx::NONE, "/n").unwrap();
        let e = c.write(Tx::NONE, "/n", "v").unwrap_err();
        assert!(matches!(&e, XsError::Daemon(n) if n == "EACCES"), "{e:?}");
        assert!(!c.transaction_end(Tx(3), true).unwrap());
        t.join().unwrap();
    }

    #[test]
    fn oversized_length_rejected() {
        let (mut c, mut s) = pair();
        let h = Header {
            ty: XS_WATCH_EVENT,
            req_id: 0,
            tx_id: 0,
            len: (PAYLOAD_MAX + 1) as u32,
        };
        s.write_all(&h.encode()).unwrap();
        assert!(matches!(c.take_watch_events(), Err(XsError::Protocol(_))));
        // The connection stays unusable rather than resynchronising on garbage.
        assert!(c.read(Tx::NONE, "/a").is_err());
    }

    #[test]
    fn oversized_request_rejected_locally() {
        let (mut c, _s) = pair();
        let big = "v".repeat(PAYLOAD_MAX);
        assert!(matches!(
            c.write(Tx::NONE, "/a", &big),
            Err(XsError::Protocol(_))
        ));
        assert!(matches!(
            c.read(Tx::NONE, "/a\0/b"),
            Err(XsError::Protocol(_))
        ));
    }

    #[test]
    fn directory_and_req_id_zero_reply_and_stale_reply() {
        let (mut c, mut s) = pair();
        let t = thread::spawn(move || {
            let (h, p) = read_req(&mut s);
            assert_eq!((h.ty, p.as_slice()), (XS_WATCH, &b"/w\0tok\0"[..]));
            // Like /dev/xen/xenbus: synthesized reply with req_id 0.
            s.write_all(&msg(XS_WATCH, 0, b"OK\0")).unwrap();
            let (h, _) = read_req(&mut s);
            assert_eq!(h.ty, XS_DIRECTORY);
            // A stale reply with another id first: must be skipped.
            let mut out = msg(XS_DIRECTORY, h.req_id.wrapping_add(100), b"zz\0");
            out.extend(msg(XS_DIRECTORY, h.req_id, b"a\0bb\0c\0"));
            s.write_all(&out).unwrap();
            s
        });
        c.watch("/w", "tok").unwrap();
        assert_eq!(c.directory(Tx::NONE, "/d").unwrap(), vec!["a", "bb", "c"]);
        t.join().unwrap();
    }

    #[test]
    fn transaction_retries_on_eagain() {
        let (mut c, mut s) = pair();
        let t = thread::spawn(move || {
            // attempt 1: start, write -> EAGAIN, abort; attempt 2: start, write, commit
            // -> EAGAIN; attempt 3: start, write, commit OK.
            let script: Vec<(u32, &[u8], u32, &[u8])> = vec![
                (XS_TRANSACTION_START, b"\0", XS_TRANSACTION_START, b"5\0"),
                (XS_WRITE, b"/k\0v", XS_ERROR, b"EAGAIN\0"),
                (XS_TRANSACTION_END, b"F\0", XS_ERROR, b"ENOENT\0"),
                (XS_TRANSACTION_START, b"\0", XS_TRANSACTION_START, b"6\0"),
                (XS_WRITE, b"/k\0v", XS_WRITE, b"OK\0"),
                (XS_TRANSACTION_END, b"T\0", XS_ERROR, b"EAGAIN\0"),
                (XS_TRANSACTION_START, b"\0", XS_TRANSACTION_START, b"7\0"),
                (XS_WRITE, b"/k\0v", XS_WRITE, b"OK\0"),
                (XS_TRANSACTION_END, b"T\0", XS_TRANSACTION_END, b"OK\0"),
            ];
            for (want_ty, want_p, rty, rp) in script {
                let (h, p) = read_req(&mut s);
                assert_eq!(h.ty, want_ty);
                assert_eq!(p, want_p);
                s.write_all(&msg(rty, h.req_id, rp)).unwrap();
            }
            s
        });
        let mut runs = 0;
        let mut txs = Vec::new();
        let r = c
            .transaction(|c, tx| {
                runs += 1;
                txs.push(tx);
                c.write(tx, "/k", "v")?;
                Ok(42)
            })
            .unwrap();
        assert_eq!(r, 42);
        assert_eq!(runs, 3);
        assert_eq!(txs, vec![Tx(5), Tx(6), Tx(7)]);
        t.join().unwrap();
    }

    #[test]
    fn eof_is_an_error() {
        let (mut c, s) = pair();
        drop(s);
        assert!(matches!(c.take_watch_events(), Err(XsError::Io(_))));
        assert!(c.read(Tx::NONE, "/a").is_err());
    }

    #[test]
    fn own_domid_absent_is_zero() {
        let (mut c, mut s) = pair();
        let t = thread::spawn(move || {
            let (h, p) = read_req(&mut s);
            assert_eq!(p, b"domid\0");
            s.write_all(&msg(XS_ERROR, h.req_id, b"ENOENT\0")).unwrap();
            let (h, _) = read_req(&mut s);
            s.write_all(&msg(XS_READ, h.req_id, b"12")).unwrap();
            s
        });
        assert_eq!(c.own_domid().unwrap(), 0);
        assert_eq!(c.own_domid().unwrap(), 12);
        t.join().unwrap();
    }
}
