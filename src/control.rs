//! The control socket (`/run/displback/control`): read-only introspection for
//! `displback status`, served from the backend's event loop.
//!
//! One request line per connection (`status` or `status json`), one answer, then the
//! connection is closed. Nothing can change state through it. Everything is
//! non-blocking and bounded so no client can stall the loop: at most [`MAX_REQUEST`]
//! bytes are read, at most [`MAX_CLIENTS`] connections are kept, and a connection idle
//! for [`IDLE`] is dropped. Only root and our own user are answered (`SO_PEERCRED`);
//! the socket is 0600 in a directory we create 0700.

use std::collections::HashMap;
use std::io::{self, ErrorKind, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use mio::unix::SourceFd;
use mio::{Interest, Registry, Token};

/// Where `displback serve` listens and `displback status` asks by default.
pub const DEFAULT_SOCKET: &str = "/run/displback/control";
/// Longest request line read (anything longer is refused).
pub const MAX_REQUEST: usize = 256;
/// A connection making no progress for this long is dropped.
pub const IDLE: Duration = Duration::from_secs(1);
/// Connections served at once; more are closed at accept.
pub const MAX_CLIENTS: usize = 16;

/// What a client may ask.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Request {
    Status { json: bool },
}

/// Parse one request line.
pub fn parse_request(line: &str) -> Result<Request, String> {
    let words: Vec<&str> = line.split_whitespace().collect();
    match words.as_slice() {
        ["status"] => Ok(Request::Status { json: false }),
        ["status", "json"] => Ok(Request::Status { json: true }),
        _ => Err(format!(
            "unknown request {:?}: the only one is `status [json]`",
            line.trim()
        )),
    }
}

/// Ask the server at `socket` for its status (the `displback status` client).
pub fn query(socket: &Path, json: bool, timeout: Duration) -> io::Result<String> {
    let mut s = UnixStream::connect(socket)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    s.write_all(if json { b"status json\n" } else { b"status\n" })?;
    let mut answer = String::new();
    s.read_to_string(&mut answer)?;
    Ok(answer)
}

struct Client {
    stream: UnixStream,
    /// The request read so far.
    input: Vec<u8>,
    /// The answer, once there is one, and how much of it is written.
    output: Option<(Vec<u8>, usize)>,
    last_progress: Instant,
}

/// The listening socket and its connections, registered with the server's [`mio::Poll`].
pub struct ControlServer {
    listener: UnixListener,
    path: PathBuf,
    /// The socket file we bound (device, inode): removed at the end only if still ours.
    ident: (u64, u64),
    token: Token,
    clients: HashMap<Token, Client>,
    next: usize,
}

/// Client tokens are `CLIENT_BASE + n`, clear of the server's own tokens.
const CLIENT_BASE: usize = 1 << 20;

impl ControlServer {
    /// Bind `path` (creating its directory 0700 if missing; replacing a stale socket
    /// nobody answers on) and register it as `token`.
    pub fn bind(path: &Path, registry: &Registry, token: Token) -> io::Result<Self> {
        let dir = path
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        if !dir.exists() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)?;
        } else if let Ok(m) = dir.metadata() {
            if m.mode() & 0o022 != 0 {
                tracing::warn!(
                    "control socket directory {} is writable by others; \
                     only root and uid {} are answered",
                    dir.display(),
                    // SAFETY: geteuid cannot fail and touches no memory.
                    unsafe { libc::geteuid() }
                );
            }
        }
        match std::fs::symlink_metadata(path) {
            Ok(m) if m.file_type().is_socket() => match UnixStream::connect(path) {
                Ok(_) => {
                    return Err(io::Error::new(
                        ErrorKind::AddrInUse,
                        format!("another process answers on {}", path.display()),
                    ))
                }
                Err(_) => std::fs::remove_file(path)?,
            },
            Ok(_) => {
                return Err(io::Error::new(
                    ErrorKind::AlreadyExists,
                    format!("{} exists and is not a socket", path.display()),
                ))
            }
            Err(_) => {}
        }
        let listener = UnixListener::bind(path)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
        listener.set_nonblocking(true)?;
        let m = std::fs::symlink_metadata(path)?;
        registry.register(
            &mut SourceFd(&listener.as_raw_fd()),
            token,
            Interest::READABLE,
        )?;
        Ok(ControlServer {
            listener,
            path: path.to_path_buf(),
            ident: (m.dev(), m.ino()),
            token,
            clients: HashMap::new(),
            next: 0,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// True for the listener's token and its connections'.
    pub fn owns(&self, token: Token) -> bool {
        token == self.token || token.0 >= CLIENT_BASE
    }

    /// Handle readiness of `token`: accept, read. Returns the connections with a
    /// complete request; answer each with [`ControlServer::answer`].
    pub fn on_event(&mut self, registry: &Registry, token: Token) -> Vec<(Token, Request)> {
        let mut ready = Vec::new();
        if token == self.token {
            // New connections are reported readable (or writable) by the next poll.
            self.accept(registry);
        } else {
            self.service(registry, token, &mut ready);
        }
        ready
    }

    fn accept(&mut self, registry: &Registry) {
        loop {
            let stream = match self.listener.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::debug!("control socket accept: {e}");
                    return;
                }
            };
            if self.clients.len() >= MAX_CLIENTS {
                tracing::debug!("control socket: too many connections, dropping one");
                continue;
            }
            if !peer_allowed(&stream) {
                let _ = (&stream).write(b"error: permission denied\n");
                continue;
            }
            if stream.set_nonblocking(true).is_err() {
                continue;
            }
            self.next = self.next.wrapping_add(1) % (usize::MAX - CLIENT_BASE);
            let token = Token(CLIENT_BASE + self.next);
            if registry
                .register(
                    &mut SourceFd(&stream.as_raw_fd()),
                    token,
                    Interest::READABLE | Interest::WRITABLE,
                )
                .is_err()
            {
                continue;
            }
            self.clients.insert(
                token,
                Client {
                    stream,
                    input: Vec::new(),
                    output: None,
                    last_progress: Instant::now(),
                },
            );
        }
    }

    /// Read what `token` sent (or write what it is owed).
    fn service(&mut self, registry: &Registry, token: Token, ready: &mut Vec<(Token, Request)>) {
        let Some(c) = self.clients.get_mut(&token) else {
            return;
        };
        if c.output.is_some() {
            self.flush(registry, token);
            return;
        }
        match read_request(c) {
            Next::Wait => {}
            Next::Drop => self.drop_client(registry, token),
            Next::Refuse(why) => self.answer(registry, token, format!("error: {why}\n")),
            Next::Request(req) => ready.push((token, req)),
        }
    }

    /// Send `text` to `token` and close the connection once it is written.
    pub fn answer(&mut self, registry: &Registry, token: Token, text: String) {
        if let Some(c) = self.clients.get_mut(&token) {
            c.output = Some((text.into_bytes(), 0));
            c.last_progress = Instant::now();
            self.flush(registry, token);
        }
    }

    fn flush(&mut self, registry: &Registry, token: Token) {
        let Some(c) = self.clients.get_mut(&token) else {
            return;
        };
        let Some((out, done)) = c.output.as_mut() else {
            return;
        };
        while *done < out.len() {
            match c.stream.write(&out[*done..]) {
                Ok(0) => break,
                Ok(n) => {
                    *done += n;
                    c.last_progress = Instant::now();
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(_) => break,
            }
        }
        // Unread input would turn our close into a reset that can beat the answer to
        // the client: discard what is there (bounded; never waiting for more).
        let mut sink = [0u8; 4096];
        for _ in 0..16 {
            match c.stream.read(&mut sink) {
                Ok(n) if n > 0 => {}
                _ => break,
            }
        }
        self.drop_client(registry, token);
    }

    fn drop_client(&mut self, registry: &Registry, token: Token) {
        if let Some(c) = self.clients.remove(&token) {
            let _ = registry.deregister(&mut SourceFd(&c.stream.as_raw_fd()));
        }
    }

    /// When the next idle connection must be dropped.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.clients.values().map(|c| c.last_progress + IDLE).min()
    }

    /// Drop connections idle for [`IDLE`].
    pub fn expire(&mut self, registry: &Registry, now: Instant) {
        let idle: Vec<Token> = self
            .clients
            .iter()
            .filter(|(_, c)| now >= c.last_progress + IDLE)
            .map(|(t, _)| *t)
            .collect();
        for t in idle {
            tracing::debug!("control socket: dropping an idle connection");
            self.drop_client(registry, t);
        }
    }

    /// Stop listening and remove the socket file (if it is still ours).
    pub fn close(mut self, registry: &Registry) {
        let tokens: Vec<Token> = self.clients.keys().copied().collect();
        for t in tokens {
            self.drop_client(registry, t);
        }
        let _ = registry.deregister(&mut SourceFd(&self.listener.as_raw_fd()));
        let ours =
            std::fs::symlink_metadata(&self.path).is_ok_and(|m| (m.dev(), m.ino()) == self.ident);
        if ours {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// What to do with a connection after reading from it.
enum Next {
    Wait,
    Drop,
    Refuse(String),
    Request(Request),
}

/// Read at most [`MAX_REQUEST`] + 1 bytes of `c`'s request without blocking.
fn read_request(c: &mut Client) -> Next {
    let mut buf = [0u8; MAX_REQUEST + 1];
    let mut eof = false;
    loop {
        let room = MAX_REQUEST + 1 - c.input.len();
        if room == 0 || c.input.contains(&b'\n') {
            break;
        }
        match c.stream.read(&mut buf[..room]) {
            Ok(0) => {
                eof = true;
                break;
            }
            Ok(n) => {
                c.input.extend_from_slice(&buf[..n]);
                c.last_progress = Instant::now();
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) if e.kind() == ErrorKind::WouldBlock => break,
            Err(_) => return Next::Drop,
        }
    }
    let line = match c.input.iter().position(|&b| b == b'\n') {
        Some(end) if end <= MAX_REQUEST => &c.input[..end],
        None if eof && c.input.is_empty() => return Next::Drop,
        None if eof => &c.input[..],
        None if c.input.len() <= MAX_REQUEST => return Next::Wait,
        _ => return Next::Refuse(format!("request longer than {MAX_REQUEST} bytes")),
    };
    match std::str::from_utf8(line) {
        Ok(text) => match parse_request(text) {
            Ok(req) => Next::Request(req),
            Err(why) => Next::Refuse(why),
        },
        Err(_) => Next::Refuse("request is not UTF-8".into()),
    }
}

/// Root, or the user we run as.
fn peer_allowed(stream: &UnixStream) -> bool {
    // SAFETY: ucred is plain data; getsockopt writes at most `len` bytes into it.
    let mut cred: libc::ucred = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: a valid socket fd, and `cred`/`len` point to live locals of those sizes.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    // SAFETY: geteuid cannot fail and touches no memory.
    let me = unsafe { libc::geteuid() };
    rc == 0 && (cred.uid == 0 || cred.uid == me)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests() {
        assert_eq!(parse_request("status"), Ok(Request::Status { json: false }));
        assert_eq!(
            parse_request(" status  json \r"),
            Ok(Request::Status { json: true })
        );
        for bad in ["", "stop", "status xml", "status json now", "set 1"] {
            assert!(parse_request(bad).is_err(), "{bad:?}");
        }
    }
}
