//! A simulated XenStore daemon speaking the real wire protocol over socketpairs.
//!
//! Each [`SimXenstored::connect`] returns the client end of a socketpair that is the
//! connection of one domain: relative paths resolve under `/local/domain/<domid>`.
//! Every connection has a server thread (reads and handles requests) and a writer thread
//! (sends replies and watch events from a queue, so a mutation never blocks on a peer
//! that is not reading). Replies and events are queued under the store lock, so every
//! connection sees events in the order the changes happened.
//!
//! Supported: READ, WRITE (creates parents), MKDIR, RM (recursive), DIRECTORY, WATCH
//! (fires once at once; then on any change of the path or a descendant, and with the
//! watched path when an ancestor is removed), UNWATCH, TRANSACTION_START/END (optimistic:
//! a snapshot per transaction; commit fails with EAGAIN if anything was committed to the
//! store since the start), GET_DOMAIN_PATH, IS_DOMAIN_INTRODUCED (always `T`).
//! SET_PERMS and GET_PERMS are accepted but **permissions are not enforced**: every
//! connection may read and write everything. Other types get `EINVAL`. A payload over
//! 4096 bytes gets `E2BIG` and the connection is closed (framing can't be trusted).
//! A closed connection drops its watches and open transactions.

use std::collections::{BTreeMap, HashMap};
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::mpsc::{self, Sender};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread;

use crate::xen::xenstore::wire::*;

/// Longest accepted path (absolute), as xenstored's limit.
const PATH_MAX: usize = 3072;

type Tree = BTreeMap<String, String>;

/// A recorded change, for firing watches.
#[derive(Clone, Debug)]
struct Change {
    path: String,
    /// Removal: also fires watches on descendants of `path` (with their own path).
    removed: bool,
}

struct Watch {
    /// As given by the client (relative or absolute or `@special`).
    given: String,
    /// Absolute form (same as `given` for `@special`).
    abs: String,
    token: String,
}

struct Transaction {
    start_gen: u64,
    tree: Tree,
    changes: Vec<Change>,
}

struct Conn {
    domid: u16,
    out: Sender<Vec<u8>>,
    watches: Vec<Watch>,
    txs: HashMap<u32, Transaction>,
}

struct State {
    tree: Tree,
    /// Bumped on every change committed to `tree`.
    generation: u64,
    conns: HashMap<u64, Conn>,
    next_conn: u64,
    next_tx: u32,
    fail_commits: u32,
}

/// The simulated daemon; clones share one store.
#[derive(Clone)]
pub struct SimXenstored {
    inner: Arc<Mutex<State>>,
}

impl Default for SimXenstored {
    fn default() -> Self {
        Self::new()
    }
}

/// An error reply: the errno name.
type OpResult = Result<Vec<u8>, &'static str>;

impl SimXenstored {
    /// An empty store (just `/`).
    pub fn new() -> Self {
        let mut tree = Tree::new();
        tree.insert("/".into(), String::new());
        SimXenstored {
            inner: Arc::new(Mutex::new(State {
                tree,
                generation: 0,
                conns: HashMap::new(),
                next_conn: 1,
                next_tx: 1,
                fail_commits: 0,
            })),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panicking server thread must not wedge every other test assertion.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A new connection of domain `domid`; creates `/local/domain/<domid>/domid`.
    pub fn connect(&self, domid: u16) -> std::io::Result<UnixStream> {
        let (client, server) = UnixStream::pair()?;
        let mut reader = server.try_clone()?;
        let mut writer = server;
        let (tx, rx) = mpsc::channel::<Vec<u8>>();
        let id = {
            let mut st = self.lock();
            let id = st.next_conn;
            st.next_conn += 1;
            st.conns.insert(
                id,
                Conn {
                    domid,
                    out: tx,
                    watches: Vec::new(),
                    txs: HashMap::new(),
                },
            );
            let path = format!("{}/domid", domain_path(domid));
            st.global_write(&path, &domid.to_string());
            id
        };
        thread::Builder::new()
            .name(format!("sim-xs-w{id}"))
            .spawn(move || {
                for m in rx {
                    if writer.write_all(&m).is_err() {
                        break;
                    }
                }
            })?;
        let me = self.clone();
        thread::Builder::new()
            .name(format!("sim-xs-r{id}"))
            .spawn(move || {
                me.serve(id, &mut reader);
                me.lock().conns.remove(&id);
            })?;
        Ok(client)
    }

    /// Serve requests of connection `id` until EOF or a framing error.
    fn serve(&self, id: u64, s: &mut UnixStream) {
        loop {
            let mut h = [0u8; HEADER_LEN];
            if s.read_exact(&mut h).is_err() {
                return;
            }
            let Some(hdr) = Header::decode(&h) else {
                return;
            };
            if hdr.len as usize > PAYLOAD_MAX {
                let st = self.lock();
                if let Some(c) = st.conns.get(&id) {
                    let _ = c
                        .out
                        .send(encode_msg(XS_ERROR, hdr.req_id, hdr.tx_id, b"E2BIG\0").unwrap());
                }
                return;
            }
            let mut payload = vec![0u8; hdr.len as usize];
            if s.read_exact(&mut payload).is_err() {
                return;
            }
            let mut st = self.lock();
            st.handle(id, hdr, &payload);
        }
    }

    /// Make the next `n` transaction commits fail with EAGAIN.
    pub fn fail_next_commits(&self, n: u32) {
        self.lock().fail_commits = n;
    }

    /// Sorted `(path, value)` of `prefix` and everything below it.
    pub fn dump(&self, prefix: &str) -> Vec<(String, String)> {
        let st = self.lock();
        subtree_keys(&st.tree, prefix)
            .into_iter()
            .map(|k| {
                let v = st.tree[&k].clone();
                (k, v)
            })
            .collect()
    }

    /// Whether the absolute `path` exists.
    pub fn exists(&self, path: &str) -> bool {
        self.lock().tree.contains_key(path)
    }

    /// Read an absolute path directly (test/toolstack helper).
    pub fn read(&self, path: &str) -> Option<String> {
        self.lock().tree.get(path).cloned()
    }

    /// Write an absolute path directly, as a toolstack would (fires watches).
    pub fn write(&self, path: &str, value: &str) {
        self.lock().global_write(path, value);
    }

    /// Remove an absolute path and its children directly (fires watches).
    pub fn rm(&self, path: &str) {
        let mut st = self.lock();
        let mut tree = std::mem::take(&mut st.tree);
        let mut changes = Vec::new();
        if op_rm(&mut tree, path, &mut changes).is_ok() && !changes.is_empty() {
            st.generation += 1;
        }
        st.tree = tree;
        st.fire(&changes);
    }
}

fn domain_path(domid: u16) -> String {
    format!("/local/domain/{domid}")
}

/// Keys equal to `prefix` or below it, sorted.
fn subtree_keys(tree: &Tree, prefix: &str) -> Vec<String> {
    let mut out = Vec::new();
    if tree.contains_key(prefix) {
        out.push(prefix.to_string());
    }
    let below = if prefix == "/" {
        "/".to_string()
    } else {
        format!("{prefix}/")
    };
    for (k, _) in tree.range(below.clone()..) {
        if !k.starts_with(&below) {
            break;
        }
        if k != prefix {
            out.push(k.clone());
        }
    }
    out
}

fn parent_of(path: &str) -> Option<&str> {
    if path == "/" {
        return None;
    }
    match path.rfind('/') {
        Some(0) => Some("/"),
        Some(i) => Some(&path[..i]),
        None => None,
    }
}

/// Create `path` and missing parents with empty values; true if `path` was created.
fn ensure(tree: &mut Tree, path: &str) -> bool {
    if tree.contains_key(path) {
        return false;
    }
    if let Some(p) = parent_of(path) {
        ensure(tree, p);
    }
    tree.insert(path.to_string(), String::new());
    true
}

fn op_write(tree: &mut Tree, path: &str, value: &str, changes: &mut Vec<Change>) {
    ensure(tree, path);
    tree.insert(path.to_string(), value.to_string());
    changes.push(Change {
        path: path.to_string(),
        removed: false,
    });
}

fn op_rm(tree: &mut Tree, path: &str, changes: &mut Vec<Change>) -> Result<(), &'static str> {
    if path == "/" {
        return Err("EINVAL");
    }
    if !tree.contains_key(path) {
        // As xenstored: fine if the parent exists.
        return match parent_of(path) {
            Some(p) if tree.contains_key(p) => Ok(()),
            _ => Err("ENOENT"),
        };
    }
    for k in subtree_keys(tree, path) {
        tree.remove(&k);
    }
    changes.push(Change {
        path: path.to_string(),
        removed: true,
    });
    Ok(())
}

/// Validate and make absolute a path from connection of `domid`.
fn canonical(domid: u16, raw: &[u8]) -> Result<String, &'static str> {
    let s = std::str::from_utf8(raw).map_err(|_| "EINVAL")?;
    if s.is_empty() {
        return Err("EINVAL");
    }
    let abs = if s.starts_with('/') {
        s.to_string()
    } else {
        format!("{}/{s}", domain_path(domid))
    };
    let ok_chars = abs
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"-/_@".contains(&b));
    if !ok_chars
        || abs.len() > PATH_MAX
        || abs.contains("//")
        || (abs.len() > 1 && abs.ends_with('/'))
    {
        return Err("EINVAL");
    }
    Ok(abs)
}

/// Split `payload` at NULs into exactly `n` leading NUL-terminated args plus the rest.
fn args(payload: &[u8], n: usize) -> Result<(Vec<&[u8]>, &[u8]), &'static str> {
    let mut out = Vec::with_capacity(n);
    let mut rest = payload;
    for _ in 0..n {
        let i = rest.iter().position(|&b| b == 0).ok_or("EINVAL")?;
        out.push(&rest[..i]);
        rest = &rest[i + 1..];
    }
    Ok((out, rest))
}

/// The single argument of a request (`arg\0`, the NUL tolerated missing).
fn one_arg(payload: &[u8]) -> &[u8] {
    match payload.iter().position(|&b| b == 0) {
        Some(i) => &payload[..i],
        None => payload,
    }
}

impl State {
    /// A change outside any transaction, from the store itself (connect, helpers).
    fn global_write(&mut self, path: &str, value: &str) {
        let mut changes = Vec::new();
        op_write(&mut self.tree, path, value, &mut changes);
        self.generation += 1;
        self.fire(&changes);
    }

    fn send(&self, id: u64, ty: u32, req_id: u32, tx_id: u32, payload: &[u8]) {
        if let Some(c) = self.conns.get(&id) {
            if let Some(m) = encode_msg(ty, req_id, tx_id, payload) {
                let _ = c.out.send(m);
            } else {
                let _ = c
                    .out
                    .send(encode_msg(XS_ERROR, req_id, tx_id, b"E2BIG\0").unwrap());
            }
        }
    }

    /// Queue watch events for `changes` on every connection.
    fn fire(&self, changes: &[Change]) {
        for c in self.conns.values() {
            for w in &c.watches {
                for ch in changes {
                    let hit = if w.abs == ch.path || is_below(&ch.path, &w.abs) {
                        Some(ch.path.clone())
                    } else if ch.removed && is_below(&w.abs, &ch.path) {
                        Some(w.abs.clone())
                    } else {
                        None
                    };
                    if let Some(abs) = hit {
                        let shown = shown_path(c.domid, w, &abs);
                        let mut p = Vec::new();
                        p.extend_from_slice(shown.as_bytes());
                        p.push(0);
                        p.extend_from_slice(w.token.as_bytes());
                        p.push(0);
                        if let Some(m) = encode_msg(XS_WATCH_EVENT, 0, 0, &p) {
                            let _ = c.out.send(m);
                        }
                    }
                }
            }
        }
    }

    fn handle(&mut self, id: u64, hdr: Header, payload: &[u8]) {
        let Some(domid) = self.conns.get(&id).map(|c| c.domid) else {
            return;
        };
        match self.dispatch(id, domid, hdr, payload) {
            Ok(reply) => {
                self.send(id, hdr.ty, hdr.req_id, hdr.tx_id, &reply);
                if hdr.ty == XS_WATCH {
                    // The initial event goes after the OK.
                    self.fire_initial(id, payload);
                }
            }
            Err(name) => {
                let mut p = name.as_bytes().to_vec();
                p.push(0);
                self.send(id, XS_ERROR, hdr.req_id, hdr.tx_id, &p);
            }
        }
    }

    fn fire_initial(&self, id: u64, payload: &[u8]) {
        let Ok((a, _)) = args(payload, 2) else {
            return;
        };
        if let Some(c) = self.conns.get(&id) {
            let mut p = a[0].to_vec();
            p.push(0);
            p.extend_from_slice(a[1]);
            p.push(0);
            if let Some(m) = encode_msg(XS_WATCH_EVENT, 0, 0, &p) {
                let _ = c.out.send(m);
            }
        }
    }

    fn dispatch(&mut self, id: u64, domid: u16, hdr: Header, payload: &[u8]) -> OpResult {
        const OK: &[u8] = b"OK\0";
        match hdr.ty {
            XS_READ | XS_DIRECTORY | XS_GET_PERMS => {
                let path = canonical(domid, one_arg(payload))?;
                let tree = self.view(id, hdr.tx_id)?;
                if !tree.contains_key(&path) {
                    return Err("ENOENT");
                }
                match hdr.ty {
                    XS_READ => Ok(tree[&path].as_bytes().to_vec()),
                    XS_DIRECTORY => {
                        let mut out = Vec::new();
                        for k in subtree_keys(tree, &path) {
                            if parent_of(&k) == Some(path.as_str()) {
                                out.extend_from_slice(
                                    k.rsplit('/').next().unwrap_or("").as_bytes(),
                                );
                                out.push(0);
                            }
                        }
                        if out.len() > PAYLOAD_MAX {
                            return Err("E2BIG");
                        }
                        Ok(out)
                    }
                    _ => Ok(b"n0\0".to_vec()),
                }
            }
            XS_WRITE | XS_MKDIR | XS_RM | XS_SET_PERMS => {
                let (path_raw, value) = if hdr.ty == XS_WRITE {
                    let (a, rest) = args(payload, 1)?;
                    (a[0], rest)
                } else {
                    (one_arg(payload), &b""[..])
                };
                let path = canonical(domid, path_raw)?;
                if path.contains('@') {
                    return Err("EINVAL");
                }
                let value = std::str::from_utf8(value)
                    .map_err(|_| "EINVAL")?
                    .to_string();
                let ty = hdr.ty;
                self.mutate(id, hdr.tx_id, |tree, changes| {
                    match ty {
                        XS_WRITE => op_write(tree, &path, &value, changes),
                        XS_MKDIR => {
                            if ensure(tree, &path) {
                                changes.push(Change {
                                    path: path.clone(),
                                    removed: false,
                                });
                            }
                        }
                        XS_RM => op_rm(tree, &path, changes)?,
                        _ => {
                            // SET_PERMS: accepted, not enforced; the node must exist.
                            if !tree.contains_key(&path) {
                                return Err("ENOENT");
                            }
                        }
                    }
                    Ok(())
                })?;
                Ok(OK.to_vec())
            }
            XS_WATCH | XS_UNWATCH => {
                if hdr.tx_id != 0 {
                    return Err("EINVAL");
                }
                let (a, _) = args(payload, 2)?;
                let given = std::str::from_utf8(a[0]).map_err(|_| "EINVAL")?.to_string();
                let token = std::str::from_utf8(a[1]).map_err(|_| "EINVAL")?.to_string();
                let abs = if given.starts_with('@') {
                    given.clone()
                } else {
                    canonical(domid, a[0])?
                };
                let conn = self.conns.get_mut(&id).ok_or("EINVAL")?;
                let pos = conn
                    .watches
                    .iter()
                    .position(|w| w.given == given && w.token == token);
                if hdr.ty == XS_WATCH {
                    if pos.is_some() {
                        return Err("EEXIST");
                    }
                    conn.watches.push(Watch { given, abs, token });
                } else {
                    conn.watches.remove(pos.ok_or("ENOENT")?);
                }
                Ok(OK.to_vec())
            }
            XS_TRANSACTION_START => {
                if hdr.tx_id != 0 {
                    return Err("EBUSY");
                }
                let txid = self.next_tx;
                self.next_tx = self.next_tx.wrapping_add(1).max(1);
                let t = Transaction {
                    start_gen: self.generation,
                    tree: self.tree.clone(),
                    changes: Vec::new(),
                };
                let conn = self.conns.get_mut(&id).ok_or("EINVAL")?;
                conn.txs.insert(txid, t);
                Ok(format!("{txid}\0").into_bytes())
            }
            XS_TRANSACTION_END => {
                let commit = match one_arg(payload) {
                    b"T" => true,
                    b"F" => false,
                    _ => return Err("EINVAL"),
                };
                let conn = self.conns.get_mut(&id).ok_or("EINVAL")?;
                let t = conn.txs.remove(&hdr.tx_id).ok_or("ENOENT")?;
                if !commit {
                    return Ok(OK.to_vec());
                }
                if self.fail_commits > 0 {
                    self.fail_commits -= 1;
                    return Err("EAGAIN");
                }
                if t.start_gen != self.generation {
                    return Err("EAGAIN");
                }
                if !t.changes.is_empty() {
                    self.tree = t.tree;
                    self.generation += 1;
                    self.fire(&t.changes);
                }
                Ok(OK.to_vec())
            }
            XS_GET_DOMAIN_PATH => {
                let s = std::str::from_utf8(one_arg(payload)).map_err(|_| "EINVAL")?;
                let d: u16 = s.parse().map_err(|_| "EINVAL")?;
                Ok(format!("{}\0", domain_path(d)).into_bytes())
            }
            XS_IS_DOMAIN_INTRODUCED => Ok(b"T\0".to_vec()),
            _ => Err("EINVAL"),
        }
    }

    /// The tree a read sees: the transaction's snapshot or the store.
    fn view(&self, id: u64, tx_id: u32) -> Result<&Tree, &'static str> {
        if tx_id == 0 {
            return Ok(&self.tree);
        }
        let conn = self.conns.get(&id).ok_or("EINVAL")?;
        conn.txs.get(&tx_id).map(|t| &t.tree).ok_or("ENOENT")
    }

    /// Apply `f` to the store (firing watches) or to the transaction's snapshot.
    fn mutate(
        &mut self,
        id: u64,
        tx_id: u32,
        f: impl FnOnce(&mut Tree, &mut Vec<Change>) -> Result<(), &'static str>,
    ) -> Result<(), &'static str> {
        if tx_id == 0 {
            let mut changes = Vec::new();
            f(&mut self.tree, &mut changes)?;
            if !changes.is_empty() {
                self.generation += 1;
                self.fire(&changes);
            }
            return Ok(());
        }
        let conn = self.conns.get_mut(&id).ok_or("EINVAL")?;
        let t = conn.txs.get_mut(&tx_id).ok_or("ENOENT")?;
        f(&mut t.tree, &mut t.changes)
    }
}

/// `path` strictly below `ancestor`.
fn is_below(path: &str, ancestor: &str) -> bool {
    if ancestor == "/" {
        return path.len() > 1 && path.starts_with('/');
    }
    path.len() > ancestor.len()
        && path.starts_with(ancestor)
        && path.as_bytes()[ancestor.len()] == b'/'
}

/// The event path as the watcher sees it: relative if the watch was relative.
fn shown_path(domid: u16, w: &Watch, abs: &str) -> String {
    if w.given.starts_with('/') || w.given.starts_with('@') {
        return abs.to_string();
    }
    let base = format!("{}/", domain_path(domid));
    abs.strip_prefix(&base).unwrap_or(abs).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::xen::xenstore::{Tx, WatchEvent, XsClient};
    use std::time::{Duration, Instant};

    fn client(sim: &SimXenstored, domid: u16) -> XsClient {
        XsClient::from_stream(sim.connect(domid).unwrap()).unwrap()
    }

    /// Poll `take_watch_events` until `want` events arrived (or 5 s).
    fn events(c: &mut XsClient, want: usize) -> Vec<WatchEvent> {
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut all = Vec::new();
        while all.len() < want && Instant::now() < deadline {
            all.extend(c.take_watch_events().unwrap());
            if all.len() < want {
                std::thread::sleep(Duration::from_millis(2));
            }
        }
        all
    }

    fn ev(path: &str, token: &str) -> WatchEvent {
        WatchEvent {
            path: path.into(),
            token: token.into(),
        }
    }

    #[test]
    fn round_trips() {
        let sim = SimXenstored::new();
        let mut c = client(&sim, 0);
        assert_eq!(c.own_domid().unwrap(), 0);
        assert_eq!(c.read(Tx::NONE, "/a/b/c").unwrap(), None);
        c.write(Tx::NONE, "/a/b/c", "v1").unwrap();
        c.write(Tx::NONE, "/a/b/d", "").unwrap();
        assert_eq!(c.read(Tx::NONE, "/a/b/c").unwrap().as_deref(), Some("v1"));
        assert_eq!(c.read(Tx::NONE, "/a").unwrap().as_deref(), Some(""));
        assert_eq!(c.directory(Tx::NONE, "/a/b").unwrap(), vec!["c", "d"]);
        assert!(c.directory(Tx::NONE, "/nope").unwrap().is_empty());
        c.mkdir(Tx::NONE, "/m/n").unwrap();
        assert!(sim.exists("/m/n"));
        c.rm(Tx::NONE, "/a/b").unwrap();
        assert!(!sim.exists("/a/b/c"));
        assert!(sim.exists("/a"));
        c.rm(Tx::NONE, "/a/b").unwrap(); // missing: fine
        assert_eq!(
            sim.dump("/m"),
            vec![("/m".into(), "".into()), ("/m/n".into(), "".into())]
        );
        assert_eq!(c.get_domain_path(5).unwrap(), "/local/domain/5");
        // Relative paths resolve under our domain.
        c.write(Tx::NONE, "rel/x", "1").unwrap();
        assert_eq!(sim.read("/local/domain/0/rel/x").as_deref(), Some("1"));
        // Bad paths are the daemon's EINVAL.
        let e = c.write(Tx::NONE, "/bad path", "1").unwrap_err();
        assert!(matches!(e, crate::xen::xenstore::XsError::Daemon(ref n) if n == "EINVAL"));
        c.set_perms(Tx::NONE, "/m", &["n0", "r5"]).unwrap();
    }

    #[test]
    fn own_domid_of_guest() {
        let sim = SimXenstored::new();
        let mut c = client(&sim, 7);
        assert_eq!(c.own_domid().unwrap(), 7);
        assert_eq!(sim.read("/local/domain/7/domid").as_deref(), Some("7"));
    }

    #[test]
    fn watch_fires_on_set_and_recursive_rm() {
        let sim = SimXenstored::new();
        let mut c = client(&sim, 0);
        c.write(Tx::NONE, "/w/sub/leaf", "x").unwrap();
        c.watch("/w/sub", "t1").unwrap();
        assert_eq!(events(&mut c, 1), vec![ev("/w/sub", "t1")]);
        c.write(Tx::NONE, "/w/sub/leaf", "y").unwrap();
        c.write(Tx::NONE, "/w/other", "y").unwrap(); // not below the watch
        c.write(Tx::NONE, "/w/sub", "z").unwrap();
        assert_eq!(
            events(&mut c, 2),
            vec![ev("/w/sub/leaf", "t1"), ev("/w/sub", "t1")]
        );
        // Removing an ancestor fires with the watched path.
        c.rm(Tx::NONE, "/w").unwrap();
        assert_eq!(events(&mut c, 1), vec![ev("/w/sub", "t1")]);
        c.unwatch("/w/sub", "t1").unwrap();
        c.write(Tx::NONE, "/w/sub", "again").unwrap();
        std::thread::sleep(Duration::from_millis(20));
        assert!(c.take_watch_events().unwrap().is_empty());
        assert!(c.unwatch("/w/sub", "t1").is_err());
    }

    #[test]
    fn relative_watch_reports_relative_paths() {
        let sim = SimXenstored::new();
        let mut c = client(&sim, 3);
        c.watch("device", "d").unwrap();
        assert_eq!(events(&mut c, 1), vec![ev("device", "d")]);
        sim.write("/local/domain/3/device/vdispl/0/state", "1");
        assert_eq!(events(&mut c, 1), vec![ev("device/vdispl/0/state", "d")]);
    }

    #[test]
    fn idle_watcher_gets_event_without_blocking() {
        let sim = SimXenstored::new();
        let mut watcher = client(&sim, 0);
        let mut other = client(&sim, 1);
        watcher.watch("/local/domain/1/x", "tok").unwrap();
        assert_eq!(events(&mut watcher, 1).len(), 1);
        // Nothing pending: returns at once.
        let t0 = Instant::now();
        assert!(watcher.take_watch_events().unwrap().is_empty());
        assert!(t0.elapsed() < Duration::from_secs(1));
        other.write(Tx::NONE, "x", "hello").unwrap();
        // The other connection's write is visible to the watcher, and its event is
        // readable on the watcher's fd while the watcher makes no request.
        let mut pfd = libc::pollfd {
            fd: watcher.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd, count 1.
        let r = unsafe { libc::poll(&mut pfd, 1, 5000) };
        assert_eq!(r, 1);
        assert_eq!(
            events(&mut watcher, 1),
            vec![ev("/local/domain/1/x", "tok")]
        );
        assert_eq!(
            watcher
                .read(Tx::NONE, "/local/domain/1/x")
                .unwrap()
                .as_deref(),
            Some("hello")
        );
    }

    #[test]
    fn transaction_conflict_is_retried() {
        let sim = SimXenstored::new();
        let mut a = client(&sim, 0);
        let mut b = client(&sim, 0);
        a.write(Tx::NONE, "/cnt", "0").unwrap();
        let mut runs = 0;
        let v = a
            .transaction(|c, tx| {
                runs += 1;
                let n: u32 = c.read(tx, "/cnt")?.unwrap().parse().unwrap();
                if runs == 1 {
                    // A concurrent writer commits in between: our commit must fail.
                    b.write(Tx::NONE, "/cnt", "10").unwrap();
                }
                c.write(tx, "/cnt", &(n + 1).to_string())?;
                // Not visible outside the transaction before commit.
                assert_ne!(sim.read("/cnt"), Some((n + 1).to_string()));
                Ok(n + 1)
            })
            .unwrap();
        assert_eq!(runs, 2);
        assert_eq!(v, 11);
        assert_eq!(b.read(Tx::NONE, "/cnt").unwrap().as_deref(), Some("11"));
    }

    #[test]
    fn injected_commit_failures_are_retried() {
        let sim = SimXenstored::new();
        let mut a = client(&sim, 0);
        a.watch("/t", "w").unwrap();
        assert_eq!(events(&mut a, 1).len(), 1);
        sim.fail_next_commits(3);
        let mut runs = 0;
        a.transaction(|c, tx| {
            runs += 1;
            c.write(tx, "/t/a", "1")?;
            c.write(tx, "/t/b", "2")
        })
        .unwrap();
        assert_eq!(runs, 4);
        assert_eq!(sim.read("/t/b").as_deref(), Some("2"));
        // Watches fire once the commit lands (and only for the committed attempt).
        assert_eq!(events(&mut a, 2), vec![ev("/t/a", "w"), ev("/t/b", "w")]);
        std::thread::sleep(Duration::from_millis(20));
        assert!(a.take_watch_events().unwrap().is_empty());
        // Aborted transactions change nothing.
        let tx = a.transaction_start().unwrap();
        a.write(tx, "/t/c", "3").unwrap();
        assert!(a.transaction_end(tx, false).unwrap());
        assert!(!sim.exists("/t/c"));
    }

    #[test]
    fn two_connections_see_each_other() {
        let sim = SimXenstored::new();
        let mut a = client(&sim, 0);
        let mut b = client(&sim, 5);
        a.write(Tx::NONE, "/local/domain/5/device/x", "fromA")
            .unwrap();
        assert_eq!(
            b.read(Tx::NONE, "device/x").unwrap().as_deref(),
            Some("fromA")
        );
        b.write(Tx::NONE, "device/y", "fromB").unwrap();
        assert_eq!(
            a.read(Tx::NONE, "/local/domain/5/device/y")
                .unwrap()
                .as_deref(),
            Some("fromB")
        );
    }

    #[test]
    fn closed_connection_drops_watches() {
        let sim = SimXenstored::new();
        let mut a = client(&sim, 0);
        a.watch("/z", "t").unwrap();
        let _ = a.transaction_start().unwrap();
        drop(a);
        let deadline = Instant::now() + Duration::from_secs(5);
        while !sim.lock().conns.is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(2));
        }
        assert_eq!(sim.lock().conns.len(), 0);
        sim.write("/z", "1"); // no one to deliver to; must not fail
    }

    #[test]
    fn raw_errors_unknown_type_and_e2big() {
        let sim = SimXenstored::new();
        let mut s = sim.connect(0).unwrap();
        let read_msg = |s: &mut UnixStream| {
            let mut h = [0u8; HEADER_LEN];
            s.read_exact(&mut h).unwrap();
            let h = Header::decode(&h).unwrap();
            let mut p = vec![0u8; h.len as usize];
            s.read_exact(&mut p).unwrap();
            (h, p)
        };
        s.write_all(&encode_msg(99, 4, 0, b"").unwrap()).unwrap();
        let (h, p) = read_msg(&mut s);
        assert_eq!(
            (h.ty, h.req_id, p.as_slice()),
            (XS_ERROR, 4, &b"EINVAL\0"[..])
        );
        // Op in an unknown transaction.
        s.write_all(&encode_msg(XS_READ, 5, 77, b"/\0").unwrap())
            .unwrap();
        let (h, p) = read_msg(&mut s);
        assert_eq!(
            (h.ty, h.tx_id, p.as_slice()),
            (XS_ERROR, 77, &b"ENOENT\0"[..])
        );
        let big = Header {
            ty: XS_WRITE,
            req_id: 6,
            tx_id: 0,
            len: 5000,
        };
        s.write_all(&big.encode()).unwrap();
        let (h, p) = read_msg(&mut s);
        assert_eq!(
            (h.ty, h.req_id, p.as_slice()),
            (XS_ERROR, 6, &b"E2BIG\0"[..])
        );
        // Then the connection is closed.
        let mut rest = Vec::new();
        s.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty());
    }
}
