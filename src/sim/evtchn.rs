//! Simulated event channels: a per-process "hypervisor" table of ports and one handle
//! per open of /dev/xen/evtchn, each with an eventfd that becomes readable when any of
//! its ports fires.
//!
//! Semantics follow Xen: a guest allocates an *unbound* port for a remote domain
//! (`alloc_unbound`), the remote binds to it (`bind_interdomain`); closing either end
//! puts the other end back into the unbound state, where notifies are silently dropped.
//! A fired port is reported once until it is drained (like the kernel's mask-until-
//! unmask). Port numbers are per domain, start at 1 and are not reused.
//!
//! Like Xen's test-and-set of a port's pending bit, a notify of a port that is already
//! pending is a lock-free no-op: each receiving port has a [`PortFlag`] that the
//! notifier caches. Without it a guest kicking in a loop would make the backend wait for
//! the table's lock, which a hypervisor does not do.

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use super::errno;
use crate::xen::platform::EventChannels;
use crate::xen::types::{DomId, EvtchnPort, XenError};

type HandleId = u64;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum PortKind {
    /// Accepts a binding from `remote`; notifies go nowhere.
    Unbound { remote: DomId },
    /// Connected to `remote`'s `remote_port`.
    Bound { remote: DomId, remote_port: u32 },
}

struct Port {
    handle: HandleId,
    kind: PortKind,
}

/// A receiving port's state as its notifiers see it: [`IDLE`], [`PENDING`] (it is in
/// its handle's `pending` list), or [`DEAD`] (the port is closed: look again).
type PortFlag = Arc<AtomicU8>;
const IDLE: u8 = 0;
const PENDING: u8 = 1;
const DEAD: u8 = 2;

struct Handle {
    domid: DomId,
    efd: Arc<File>,
    pending: Vec<u32>,
    /// Flags of this handle's ports that have been notified.
    flags: HashMap<u32, PortFlag>,
}

impl Handle {
    /// Empty `pending` into `out` (or drop it), marking the ports idle.
    fn take_pending(&mut self, out: Option<&mut Vec<EvtchnPort>>) {
        for p in &self.pending {
            if let Some(f) = self.flags.get(p) {
                f.store(IDLE, Ordering::Release);
            }
        }
        match out {
            Some(out) => out.extend(self.pending.drain(..).map(EvtchnPort)),
            None => self.pending.clear(),
        }
    }
}

#[derive(Default)]
struct State {
    next_handle: HandleId,
    next_port: HashMap<DomId, u32>,
    ports: HashMap<(DomId, u32), Port>,
    handles: HashMap<HandleId, Handle>,
}

impl State {
    fn alloc_port(&mut self, dom: DomId) -> Result<u32, XenError> {
        let next = self.next_port.entry(dom).or_insert(1);
        let port = *next;
        *next = next
            .checked_add(1)
            .ok_or_else(|| errno("evtchn port space exhausted", libc::ENOSPC))?;
        Ok(port)
    }

    /// Check that `(dom, port)` exists and belongs to `handle`.
    fn owned(&self, handle: HandleId, dom: DomId, port: u32) -> Result<PortKind, XenError> {
        match self.ports.get(&(dom, port)) {
            Some(p) if p.handle == handle => Ok(p.kind),
            _ => Err(errno(
                "evtchn: port not bound by this handle",
                libc::ENOTCONN,
            )),
        }
    }

    /// Close `(dom, port)`: its peer (if still connected to it) becomes unbound.
    fn close(&mut self, dom: DomId, port: u32) {
        let Some(p) = self.ports.remove(&(dom, port)) else {
            return;
        };
        if let Some(h) = self.handles.get_mut(&p.handle) {
            h.pending.retain(|&x| x != port);
            if let Some(f) = h.flags.remove(&port) {
                f.store(DEAD, Ordering::Release);
            }
        }
        if let PortKind::Bound {
            remote,
            remote_port,
        } = p.kind
        {
            if let Some(peer) = self.ports.get_mut(&(remote, remote_port)) {
                if peer.kind
                    == (PortKind::Bound {
                        remote: dom,
                        remote_port: port,
                    })
                {
                    peer.kind = PortKind::Unbound { remote: dom };
                }
            }
        }
    }
}

/// The shared event-channel table.
#[derive(Default)]
pub(crate) struct EvtchnHub {
    state: Mutex<State>,
}

impl EvtchnHub {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A new handle (one "open of /dev/xen/evtchn") in `domid`.
    pub(crate) fn open(self: &Arc<Self>, domid: DomId) -> Result<SimEvtchn, XenError> {
        // SAFETY: eventfd has no memory preconditions.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if fd < 0 {
            return Err(XenError::last_os("eventfd"));
        }
        // SAFETY: `fd` was just created and is owned by nobody else.
        let efd = Arc::new(unsafe { File::from_raw_fd(fd) });
        let mut st = self.lock();
        let id = st.next_handle;
        st.next_handle = st.next_handle.wrapping_add(1);
        st.handles.insert(
            id,
            Handle {
                domid,
                efd: Arc::clone(&efd),
                pending: Vec::new(),
                flags: HashMap::new(),
            },
        );
        Ok(SimEvtchn {
            hub: Arc::clone(self),
            id,
            domid,
            efd,
            peers: Mutex::new(HashMap::new()),
        })
    }

    /// Close every port of `domid` (peers see their ports unbound, so notifies to the
    /// dead domain are dropped) and forget its unbound ports.
    pub(crate) fn destroy_domain(&self, domid: DomId) {
        let mut st = self.lock();
        let ports: Vec<u32> = st
            .ports
            .keys()
            .filter(|(d, _)| *d == domid)
            .map(|&(_, p)| p)
            .collect();
        for p in ports {
            st.close(domid, p);
        }
        for h in st.handles.values_mut().filter(|h| h.domid == domid) {
            h.take_pending(None);
        }
    }
}

/// One simulated open of /dev/xen/evtchn in a domain.
pub struct SimEvtchn {
    hub: Arc<EvtchnHub>,
    id: HandleId,
    domid: DomId,
    efd: Arc<File>,
    /// Our bound port -> its own flag (DEAD once closed) and the flag of the peer port
    /// it notifies (the lock-free path).
    peers: Mutex<HashMap<u32, (PortFlag, PortFlag)>>,
}

impl std::fmt::Debug for SimEvtchn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SimEvtchn({:?}, handle {})", self.domid, self.id)
    }
}

impl SimEvtchn {
    /// The domain this handle lives in.
    pub fn domid(&self) -> DomId {
        self.domid
    }

    /// Allocate a port that `remote` may bind to (the guest side of a connection, like
    /// the kernel's `xenbus_alloc_evtchn`).
    pub fn alloc_unbound(&mut self, remote: DomId) -> Result<EvtchnPort, XenError> {
        let mut st = self.hub.lock();
        let port = st.alloc_port(self.domid)?;
        st.ports.insert(
            (self.domid, port),
            Port {
                handle: self.id,
                kind: PortKind::Unbound { remote },
            },
        );
        Ok(EvtchnPort(port))
    }

    /// Wait up to `timeout` for a port to fire, then drain: the ports that fired (empty
    /// on timeout).
    pub fn wait(&mut self, timeout: Duration) -> Result<Vec<EvtchnPort>, XenError> {
        let deadline = std::time::Instant::now().checked_add(timeout);
        let mut out = Vec::new();
        loop {
            self.pending(&mut out)?;
            if !out.is_empty() {
                return Ok(out);
            }
            let left = match deadline {
                Some(d) => d.saturating_duration_since(std::time::Instant::now()),
                None => timeout,
            };
            // A wake-up can find nothing (the port was unbound meanwhile): wait again.
            if left.is_zero() || !poll_readable(self.efd.as_raw_fd(), left)? {
                return Ok(out);
            }
        }
    }
}

/// Wait until `fd` is readable or `timeout` passes.
pub(crate) fn poll_readable(fd: RawFd, timeout: Duration) -> Result<bool, XenError> {
    let deadline = std::time::Instant::now().checked_add(timeout);
    loop {
        let left = match deadline {
            Some(d) => d.saturating_duration_since(std::time::Instant::now()),
            None => Duration::from_millis(i32::MAX as u64),
        };
        // Round up so a sub-millisecond wait does not become a busy loop.
        let ms = left.as_micros().div_ceil(1000).min(i32::MAX as u128) as libc::c_int;
        let mut pfd = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: `pfd` is one valid pollfd for the duration of the call.
        let rc = unsafe { libc::poll(&mut pfd, 1, ms) };
        if rc < 0 {
            let err = std::io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            return Err(XenError::Io {
                op: "poll",
                source: err,
            });
        }
        return Ok(rc > 0);
    }
}

impl EventChannels for SimEvtchn {
    fn bind_interdomain(
        &mut self,
        remote: DomId,
        remote_port: EvtchnPort,
    ) -> Result<EvtchnPort, XenError> {
        let mut st = self.hub.lock();
        match st.ports.get(&(remote, remote_port.0)) {
            Some(p) if p.kind == (PortKind::Unbound { remote: self.domid }) => {}
            _ => {
                return Err(errno(
                    "bind_interdomain: remote port is not unbound for us",
                    libc::EINVAL,
                ))
            }
        }
        let local = st.alloc_port(self.domid)?;
        st.ports.insert(
            (self.domid, local),
            Port {
                handle: self.id,
                kind: PortKind::Bound {
                    remote,
                    remote_port: remote_port.0,
                },
            },
        );
        if let Some(peer) = st.ports.get_mut(&(remote, remote_port.0)) {
            peer.kind = PortKind::Bound {
                remote: self.domid,
                remote_port: local,
            };
        }
        Ok(EvtchnPort(local))
    }

    fn unbind(&mut self, local: EvtchnPort) -> Result<(), XenError> {
        self.peers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&local.0);
        let mut st = self.hub.lock();
        st.owned(self.id, self.domid, local.0)?;
        st.close(self.domid, local.0);
        Ok(())
    }

    fn notify(&self, local: EvtchnPort) -> Result<(), XenError> {
        let cached = self
            .peers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&local.0)
            .cloned();
        if cached.is_some_and(|(own, peer)| {
            own.load(Ordering::Acquire) != DEAD && peer.load(Ordering::Acquire) == PENDING
        }) {
            return Ok(());
        }
        let mut st = self.hub.lock();
        let PortKind::Bound {
            remote,
            remote_port,
        } = st.owned(self.id, self.domid, local.0)?
        else {
            // Sending on an unbound port is a no-op, as in Xen.
            return Ok(());
        };
        let Some(peer) = st.ports.get(&(remote, remote_port)) else {
            return Ok(());
        };
        let back = PortKind::Bound {
            remote: self.domid,
            remote_port: local.0,
        };
        if peer.kind != back {
            return Ok(());
        }
        let peer_handle = peer.handle;
        let Some(own) = st
            .handles
            .get_mut(&self.id)
            .map(|h| Arc::clone(h.flags.entry(local.0).or_default()))
        else {
            return Ok(());
        };
        let Some(h) = st.handles.get_mut(&peer_handle) else {
            return Ok(());
        };
        let flag = Arc::clone(h.flags.entry(remote_port).or_default());
        self.peers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(local.0, (own, Arc::clone(&flag)));
        if h.pending.contains(&remote_port) {
            // Already signalled and not drained yet: kicks coalesce, as in Xen.
            return Ok(());
        }
        h.pending.push(remote_port);
        flag.store(PENDING, Ordering::Release);
        let efd = Arc::clone(&h.efd);
        // Signal outside the lock: the reader drains `pending` under the lock after
        // resetting the fd, so a late signal is at worst a spurious wake-up.
        drop(st);
        if let Err(e) = (&*efd).write(&1u64.to_ne_bytes()) {
            // Only fails if the counter would overflow, i.e. it is already readable.
            tracing::warn!("sim evtchn: signalling eventfd: {e}");
        }
        Ok(())
    }

    fn pending(&mut self, out: &mut Vec<EvtchnPort>) -> Result<(), XenError> {
        let mut st = self.hub.lock();
        let Some(h) = st.handles.get_mut(&self.id) else {
            return Ok(());
        };
        // Reset the eventfd under the lock, so a concurrent notify either lands in
        // `pending` before we take it or signals the fd again afterwards.
        let mut counter = [0u8; 8];
        match (&*h.efd).read(&mut counter) {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(source) => {
                return Err(XenError::Io {
                    op: "read eventfd",
                    source,
                })
            }
        }
        h.take_pending(Some(out));
        Ok(())
    }

    fn as_raw_fd(&self) -> RawFd {
        self.efd.as_raw_fd()
    }
}

impl Drop for SimEvtchn {
    /// Closing the device closes every port bound through it.
    fn drop(&mut self) {
        let mut st = self.hub.lock();
        let ports: Vec<(DomId, u32)> = st
            .ports
            .iter()
            .filter(|(_, p)| p.handle == self.id)
            .map(|(&k, _)| k)
            .collect();
        for (d, p) in ports {
            st.close(d, p);
        }
        st.handles.remove(&self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sim::SimXen;

    const DOM0: DomId = DomId(0);
    const GUEST: DomId = DomId(3);
    const SHORT: Duration = Duration::from_millis(20);
    const LONG: Duration = Duration::from_secs(5);

    fn readable(h: &SimEvtchn, timeout: Duration) -> bool {
        poll_readable(h.as_raw_fd(), timeout).unwrap()
    }

    fn connect(sim: &SimXen) -> (SimEvtchn, EvtchnPort, SimEvtchn, EvtchnPort) {
        let mut guest = sim.evtchn(GUEST);
        let mut back = sim.evtchn(DOM0);
        let gport = guest.alloc_unbound(DOM0).unwrap();
        let bport = back.bind_interdomain(GUEST, gport).unwrap();
        (guest, gport, back, bport)
    }

    #[test]
    fn notify_wakes_the_peer() {
        let sim = SimXen::new();
        let (mut guest, gport, mut back, bport) = connect(&sim);
        assert_eq!(gport, EvtchnPort(1));
        assert_eq!(bport, EvtchnPort(1));
        assert!(!readable(&back, SHORT));

        guest.notify(gport).unwrap();
        guest.notify(gport).unwrap();
        assert!(readable(&back, LONG));
        let mut out = Vec::new();
        back.pending(&mut out).unwrap();
        assert_eq!(out, vec![bport], "repeated kicks coalesce");
        assert!(!readable(&back, SHORT), "drained");

        back.notify(bport).unwrap();
        assert_eq!(guest.wait(LONG).unwrap(), vec![gport]);
        assert!(guest.wait(SHORT).unwrap().is_empty());
    }

    #[test]
    fn wakes_across_threads() {
        let sim = SimXen::new();
        let (mut guest, gport, back, bport) = connect(&sim);
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(30));
            back.notify(bport).unwrap();
            back
        });
        assert_eq!(guest.wait(LONG).unwrap(), vec![gport]);
        drop(t.join().unwrap());
    }

    #[test]
    fn notify_after_unbind_is_dropped() {
        let sim = SimXen::new();
        let (guest, gport, mut back, bport) = connect(&sim);
        guest.notify(gport).unwrap();
        back.unbind(bport).unwrap();
        // Pending kick of the unbound port is gone too.
        let mut out = Vec::new();
        back.pending(&mut out).unwrap();
        assert!(out.is_empty());
        guest.notify(gport).unwrap();
        assert!(!readable(&back, SHORT));
        back.pending(&mut out).unwrap();
        assert!(out.is_empty());
        // Our side no longer owns the port.
        assert_eq!(
            back.notify(bport).unwrap_err().errno(),
            Some(libc::ENOTCONN)
        );
        assert!(back.unbind(bport).is_err());
        // The guest's port is unbound again: a new backend instance may bind to it.
        let rebound = back.bind_interdomain(GUEST, gport).unwrap();
        assert_ne!(rebound, bport, "ports are not reused");
        guest.notify(gport).unwrap();
        assert!(readable(&back, LONG));
        back.pending(&mut out).unwrap();
        assert_eq!(out, vec![rebound]);
    }

    #[test]
    fn binding_needs_an_unbound_port_for_us() {
        let sim = SimXen::new();
        let mut guest = sim.evtchn(GUEST);
        let mut back = sim.evtchn(DOM0);
        let einval = Some(libc::EINVAL);
        assert_eq!(
            back.bind_interdomain(GUEST, EvtchnPort(1))
                .unwrap_err()
                .errno(),
            einval
        );
        let for_other = guest.alloc_unbound(DomId(7)).unwrap();
        assert_eq!(
            back.bind_interdomain(GUEST, for_other).unwrap_err().errno(),
            einval
        );
        assert_eq!(
            back.bind_interdomain(DomId(5), for_other)
                .unwrap_err()
                .errno(),
            einval
        );
        let p = guest.alloc_unbound(DOM0).unwrap();
        assert_eq!(p, EvtchnPort(2));
        back.bind_interdomain(GUEST, p).unwrap();
        assert_eq!(back.bind_interdomain(GUEST, p).unwrap_err().errno(), einval);
        // Notify on a port that is still unbound is a no-op.
        guest.notify(for_other).unwrap();
    }

    #[test]
    fn destroy_domain_closes_its_channels() {
        let sim = SimXen::new();
        let (mut guest, gport, mut back, bport) = connect(&sim);
        let spare = guest.alloc_unbound(DOM0).unwrap();
        guest.notify(gport).unwrap();
        sim.destroy_domain(GUEST);
        back.notify(bport).unwrap();
        assert!(guest.wait(SHORT).unwrap().is_empty());
        assert!(back.bind_interdomain(GUEST, spare).is_err());
        assert!(guest.notify(gport).is_err());
        let mut out = Vec::new();
        back.pending(&mut out).unwrap();
        assert_eq!(out, vec![bport], "kick sent before the crash is still seen");
        back.unbind(bport).unwrap();
    }

    #[test]
    fn dropping_a_handle_closes_its_ports() {
        let sim = SimXen::new();
        let (mut guest, gport, back, bport) = connect(&sim);
        let _ = bport;
        drop(back);
        guest.notify(gport).unwrap();
        let mut back2 = sim.evtchn(DOM0);
        let p = back2.bind_interdomain(GUEST, gport).unwrap();
        back2.notify(p).unwrap();
        assert_eq!(guest.wait(LONG).unwrap(), vec![gport]);
    }
}
