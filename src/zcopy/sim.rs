//! A simulated gntdev dma-buf: exports and imports with reference counting, so the
//! release rules can be tested without Xen.
//!
//! Model (after `drivers/xen/gntdev-dmabuf.c`): every dma-buf has holders — each open fd
//! and each importer (a KMS GEM handle or framebuffer, a compositor; tests add them with
//! [`SimDmaBuf::hold`]). An export made by EXP_FROM_REFS is released, and leaves the
//! export list, when its last holder lets go; EXP_WAIT_RELEASED looks the export up by
//! the fd number it was made with (newest first, as gntdev's `list_add`) and waits for
//! that. Fd numbers are reused lowest-first, like the kernel's.

use std::collections::HashMap;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::buffer::{DumbBuffer, ScanoutImport};
use super::{DmaBufError, DmaBufFd, DmaBufOps, ExportFlags};
use crate::backend::xen::PAGE_SIZE;
use crate::backend::{DomId, GrantRef};

/// What the simulated kernel supports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SimMode {
    /// `CONFIG_XEN_GNTDEV_DMABUF` in an HVM/PVH/Arm backend domain: everything works.
    Supported,
    /// A PV backend domain (gntdev in PTE-mod mode): EXP_FROM_REFS fails with EINVAL,
    /// the other ioctls work.
    PteMod,
    /// No `CONFIG_XEN_GNTDEV_DMABUF`: every dma-buf ioctl fails with this errno
    /// (ENOTTY from a real kernel; ENOSYS from some stubs).
    Missing(i32),
}

/// One step the simulation saw, in order (tests assert orderings on these).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SimEvent {
    Exported {
        fd: RawFd,
    },
    FdClosed {
        fd: RawFd,
    },
    HolderAdded {
        fd: RawFd,
        what: String,
    },
    HolderDropped {
        what: String,
    },
    /// A gntdev export lost its last holder: grants unmapped.
    Released {
        fd: RawFd,
    },
    WaitStarted {
        fd: RawFd,
    },
    WaitEnded {
        fd: RawFd,
        released: bool,
    },
    Imported {
        fd: RawFd,
        pages: usize,
    },
    ImportReleased {
        fd: RawFd,
    },
    /// Recorded by a test or a simulated hook.
    Note(String),
}

struct Buf {
    size: usize,
    holders: u32,
    /// Made by EXP_FROM_REFS (so it has a release to wait for).
    exported: bool,
}

struct State {
    mode: SimMode,
    next_id: u64,
    bufs: HashMap<u64, Buf>,
    /// Open fd number → buffer.
    fds: HashMap<RawFd, u64>,
    /// gntdev's export list: (fd number at export, buffer), newest first.
    exports: Vec<(RawFd, u64)>,
    /// Numbers of closed exports kept reserved until the export is released.
    reserved: HashMap<RawFd, u64>,
    /// Live imports: fd number at import → (buffer, refs).
    imports: HashMap<RawFd, (u64, usize)>,
    next_gref: u32,
    events: Vec<SimEvent>,
    export_calls: u64,
}

struct Shared {
    state: Mutex<State>,
    cv: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panicking test thread must not hide the state from the others.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Drop one holder of `id`; release an export that lost its last one.
    fn unhold(&self, st: &mut State, id: u64) {
        let Some(buf) = st.bufs.get_mut(&id) else {
            return;
        };
        buf.holders = buf.holders.saturating_sub(1);
        if buf.holders == 0 {
            let exported = buf.exported;
            st.bufs.remove(&id);
            if exported {
                let pos = st.exports.iter().position(|&(_, b)| b == id);
                if let Some(pos) = pos {
                    let (fd, _) = st.exports.remove(pos);
                    st.events.push(SimEvent::Released { fd });
                }
                st.reserved.retain(|_, b| *b != id);
            }
            self.cv.notify_all();
        }
    }
}

/// The simulated gntdev dma-buf interface. Clones share one simulated kernel.
#[derive(Clone)]
pub struct SimDmaBuf {
    shared: Arc<Shared>,
}

impl Default for SimDmaBuf {
    fn default() -> Self {
        Self::new(SimMode::Supported)
    }
}

impl std::fmt::Debug for SimDmaBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let st = self.shared.lock();
        f.debug_struct("SimDmaBuf")
            .field("mode", &st.mode)
            .field("exports", &st.exports.len())
            .field("imports", &st.imports.len())
            .finish()
    }
}

/// First simulated fd number (so they don't look like the process's own).
const FIRST_FD: RawFd = 100;

impl SimDmaBuf {
    pub fn new(mode: SimMode) -> Self {
        SimDmaBuf {
            shared: Arc::new(Shared {
                state: Mutex::new(State {
                    mode,
                    next_id: 1,
                    bufs: HashMap::new(),
                    fds: HashMap::new(),
                    exports: Vec::new(),
                    reserved: HashMap::new(),
                    imports: HashMap::new(),
                    next_gref: 1000,
                    events: Vec::new(),
                    export_calls: 0,
                }),
                cv: Condvar::new(),
            }),
        }
    }

    /// Change what the simulated kernel supports.
    pub fn set_mode(&self, mode: SimMode) {
        self.shared.lock().mode = mode;
    }

    /// Everything seen so far, in order.
    pub fn events(&self) -> Vec<SimEvent> {
        self.shared.lock().events.clone()
    }

    /// Append a note to the event log (for hooks the test provides).
    pub fn record(&self, note: impl Into<String>) {
        self.shared.lock().events.push(SimEvent::Note(note.into()));
    }

    /// How many times EXP_FROM_REFS was called (successful or not).
    pub fn export_calls(&self) -> u64 {
        self.shared.lock().export_calls
    }

    /// Exports not yet released (grants still mapped).
    pub fn live_exports(&self) -> usize {
        self.shared.lock().exports.len()
    }

    /// Imports not yet released (pages still granted).
    pub fn live_imports(&self) -> usize {
        self.shared.lock().imports.len()
    }

    /// Fd numbers reserved for closed exports not yet released.
    pub fn reserved_numbers(&self) -> usize {
        self.shared.lock().reserved.len()
    }

    /// Open simulated fds.
    pub fn open_fds(&self) -> usize {
        self.shared.lock().fds.len()
    }

    /// A new buffer with one holder (its fd), as the fd it is reachable by.
    fn new_fd(&self, st: &mut State, size: usize, exported: bool) -> DmaBufFd {
        let id = st.next_id;
        st.next_id += 1;
        st.bufs.insert(
            id,
            Buf {
                size,
                holders: 1,
                exported,
            },
        );
        let mut raw = FIRST_FD;
        while st.fds.contains_key(&raw) || st.reserved.contains_key(&raw) {
            raw += 1;
        }
        st.fds.insert(raw, id);
        let shared = self.shared.clone();
        DmaBufFd::simulated(raw, move || {
            let mut st = shared.lock();
            if let Some(id) = st.fds.remove(&raw) {
                st.events.push(SimEvent::FdClosed { fd: raw });
                shared.unhold(&mut st, id);
            }
        })
    }

    /// A dma-buf made elsewhere (e.g. a KMS dumb buffer's `PRIME_HANDLE_TO_FD`).
    pub fn foreign_buffer(&self, size: usize) -> DmaBufFd {
        let mut st = self.shared.lock();
        self.new_fd(&mut st, size, false)
    }

    /// Take a reference on the buffer behind `fd`, as an importer would (KMS
    /// `PRIME_FD_TO_HANDLE`, a compositor). It lasts until the holder is dropped.
    pub fn hold(&self, fd: &DmaBufFd, what: impl Into<String>) -> Option<SimHolder> {
        let what = what.into();
        let mut st = self.shared.lock();
        let id = *st.fds.get(&fd.raw())?;
        st.bufs.get_mut(&id)?.holders += 1;
        st.events.push(SimEvent::HolderAdded {
            fd: fd.raw(),
            what: what.clone(),
        });
        Some(SimHolder {
            shared: self.shared.clone(),
            id,
            what,
        })
    }

    fn missing(st: &State, op: &'static str) -> Result<(), DmaBufError> {
        match st.mode {
            SimMode::Missing(errno) => Err(DmaBufError::errno(op, errno)),
            _ => Ok(()),
        }
    }
}

/// One importer's reference on a simulated dma-buf.
pub struct SimHolder {
    shared: Arc<Shared>,
    id: u64,
    what: String,
}

impl Drop for SimHolder {
    fn drop(&mut self) {
        let mut st = self.shared.lock();
        st.events.push(SimEvent::HolderDropped {
            what: std::mem::take(&mut self.what),
        });
        self.shared.unhold(&mut st, self.id);
    }
}

impl DmaBufOps for SimDmaBuf {
    fn export_from_refs(
        &self,
        _domid: DomId,
        refs: &[GrantRef],
        _flags: ExportFlags,
    ) -> Result<DmaBufFd, DmaBufError> {
        const OP: &str = "EXP_FROM_REFS";
        let mut st = self.shared.lock();
        st.export_calls += 1;
        Self::missing(&st, OP)?;
        if st.mode == SimMode::PteMod {
            return Err(DmaBufError::errno(OP, libc::EINVAL));
        }
        // A grant that cannot be mapped fails the whole call with EINVAL, as
        // gntdev_map_grant_pages does; ref 0 is never a valid buffer ref.
        if refs.is_empty() || refs.iter().any(|r| r.0 == 0) {
            return Err(DmaBufError::errno(OP, libc::EINVAL));
        }
        let fd = self.new_fd(&mut st, refs.len() * PAGE_SIZE, true);
        let id = st.fds[&fd.raw()];
        st.exports.insert(0, (fd.raw(), id));
        st.events.push(SimEvent::Exported { fd: fd.raw() });
        Ok(fd)
    }

    fn wait_released(&self, fd: DmaBufFd, timeout: Duration) -> Result<(), DmaBufError> {
        const OP: &str = "EXP_WAIT_RELEASED";
        let deadline = Instant::now() + timeout;
        let exported_as = fd.raw();
        {
            let mut st = self.shared.lock();
            // Keep the number while the export lives (the real one dup2s /dev/null on it).
            if let Some(&id) = st.fds.get(&exported_as) {
                if st.exports.iter().any(|&(_, b)| b == id) {
                    st.reserved.insert(exported_as, id);
                }
            }
        }
        drop(fd); // our reference; the close hook takes the lock
        let mut st = self.shared.lock();
        Self::missing(&st, OP)?;
        let Some(&(_, id)) = st.exports.iter().find(|&&(fd, _)| fd == exported_as) else {
            return Ok(()); // ENOENT: already released
        };
        st.events.push(SimEvent::WaitStarted { fd: exported_as });
        // Buffer ids are never reused: gone from `bufs` = released.
        while st.bufs.contains_key(&id) {
            let now = Instant::now();
            if now >= deadline {
                st.events.push(SimEvent::WaitEnded {
                    fd: exported_as,
                    released: false,
                });
                return Err(DmaBufError::errno(OP, libc::ETIMEDOUT));
            }
            st = self
                .shared
                .cv
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        st.events.push(SimEvent::WaitEnded {
            fd: exported_as,
            released: true,
        });
        Ok(())
    }

    fn probe(&self) -> Result<(), DmaBufError> {
        Self::missing(&self.shared.lock(), "EXP_WAIT_RELEASED")
    }

    fn import_to_refs(
        &self,
        dmabuf: &DmaBufFd,
        _domid: DomId,
        count: usize,
    ) -> Result<Vec<GrantRef>, DmaBufError> {
        const OP: &str = "IMP_TO_REFS";
        let mut st = self.shared.lock();
        Self::missing(&st, OP)?;
        let raw = dmabuf.raw();
        let Some(&id) = st.fds.get(&raw) else {
            return Err(DmaBufError::errno(OP, libc::EBADF));
        };
        if count == 0 || st.bufs[&id].size != count * PAGE_SIZE {
            return Err(DmaBufError::errno(OP, libc::EINVAL));
        }
        if st.imports.contains_key(&raw) {
            return Err(DmaBufError::errno(OP, libc::EBUSY));
        }
        st.bufs.get_mut(&id).expect("checked").holders += 1;
        let first = st.next_gref;
        st.next_gref += count as u32;
        st.imports.insert(raw, (id, count));
        st.events.push(SimEvent::Imported {
            fd: raw,
            pages: count,
        });
        Ok((first..first + count as u32).map(GrantRef).collect())
    }

    fn import_release(&self, imported_fd: RawFd) -> Result<(), DmaBufError> {
        const OP: &str = "IMP_RELEASE";
        let mut st = self.shared.lock();
        Self::missing(&st, OP)?;
        let Some((id, _)) = st.imports.remove(&imported_fd) else {
            return Err(DmaBufError::errno(OP, libc::ENOENT));
        };
        st.events.push(SimEvent::ImportReleased { fd: imported_fd });
        self.shared.unhold(&mut st, id);
        Ok(())
    }
}

/// A simulated KMS import of a dma-buf (GEM handle + framebuffer): one holder while
/// imported, an on-screen flag, and a flip counter. Hook calls go to the event log.
pub struct SimScanout {
    sim: SimDmaBuf,
    holder: Option<SimHolder>,
    on_screen: Arc<AtomicBool>,
    /// Make `take_off_screen` fail (a stuck CRTC).
    pub fail_off_screen: bool,
    flips: AtomicU64,
    name: String,
}

impl SimScanout {
    /// Import `fd` (like `PRIME_FD_TO_HANDLE` + AddFB2).
    pub fn import(sim: &SimDmaBuf, fd: &DmaBufFd, name: &str) -> Option<Self> {
        let holder = sim.hold(fd, name)?;
        Some(SimScanout {
            sim: sim.clone(),
            holder: Some(holder),
            on_screen: Arc::new(AtomicBool::new(false)),
            fail_off_screen: false,
            flips: AtomicU64::new(0),
            name: name.to_string(),
        })
    }

    /// Shared on-screen flag (a test flips it as a CRTC would).
    pub fn screen_flag(&self) -> Arc<AtomicBool> {
        self.on_screen.clone()
    }

    /// The per-flip work of a zero-copy flip in the simulation: mark it on screen and
    /// count it (a real KMS flip is one `DRM_IOCTL_MODE_PAGE_FLIP`).
    pub fn flip(&self) {
        self.on_screen.store(true, Ordering::Relaxed);
        self.flips.fetch_add(1, Ordering::Relaxed);
    }

    /// Flips issued.
    pub fn flips(&self) -> u64 {
        self.flips.load(Ordering::Relaxed)
    }
}

impl ScanoutImport for SimScanout {
    fn on_screen(&self) -> bool {
        self.on_screen.load(Ordering::Relaxed)
    }

    fn take_off_screen(&mut self) -> std::io::Result<()> {
        self.sim.record(format!("{}: off screen", self.name));
        if self.fail_off_screen {
            return Err(std::io::Error::from_raw_os_error(libc::EBUSY));
        }
        self.on_screen.store(false, Ordering::Relaxed);
        Ok(())
    }

    fn release(&mut self) -> std::io::Result<()> {
        self.sim.record(format!("{}: released", self.name));
        // RmFB of a framebuffer still on a CRTC disables that CRTC; GEM_CLOSE drops
        // the import's reference on the dma-buf.
        self.on_screen.store(false, Ordering::Relaxed);
        self.holder = None;
        Ok(())
    }
}

/// A simulated KMS dumb buffer for be-alloc.
pub struct SimDumb {
    sim: SimDmaBuf,
    size: usize,
    pitch: u32,
    on_screen: bool,
    /// Make `prime_fd` fail (a driver without PRIME export).
    pub fail_prime: Option<i32>,
    name: String,
}

impl SimDumb {
    /// A dumb buffer of `size` bytes with `pitch`-byte lines.
    pub fn new(sim: &SimDmaBuf, size: usize, pitch: u32, name: &str) -> Self {
        SimDumb {
            sim: sim.clone(),
            size,
            pitch,
            on_screen: false,
            fail_prime: None,
            name: name.to_string(),
        }
    }
}

impl ScanoutImport for SimDumb {
    fn on_screen(&self) -> bool {
        self.on_screen
    }

    fn take_off_screen(&mut self) -> std::io::Result<()> {
        self.on_screen = false;
        Ok(())
    }

    fn release(&mut self) -> std::io::Result<()> {
        self.sim.record(format!("{}: freed", self.name));
        Ok(())
    }
}

impl DumbBuffer for SimDumb {
    fn size(&self) -> usize {
        self.size
    }

    fn pitch(&self) -> u32 {
        self.pitch
    }

    fn prime_fd(&self) -> std::io::Result<DmaBufFd> {
        if let Some(errno) = self.fail_prime {
            return Err(std::io::Error::from_raw_os_error(errno));
        }
        Ok(self.sim.foreign_buffer(self.size))
    }
}

/// The simulated Xen's dma-buf exporter on a real kernel: guest grants become a real
/// dma-buf of the guest's own memfd pages through `/dev/udmabuf`
/// ([`super::udmabuf`]), so the KMS output's PRIME import, AddFB2 and scan-out run
/// for real with simulated guests (`displback demo --output kms --zero-copy on`).
///
/// Like gntdev, an export holds the grants mapped (the guest's pages are not freed)
/// until our fd closes. Unlike gntdev, udmabuf has no "released" notification:
/// [`DmaBufOps::wait_released`] closes our fd and returns; the kernel keeps the pages
/// referenced until the last importer (a GEM handle or framebuffer) lets go, which the
/// KMS output has done before the wait (it takes the buffer off screen first). No
/// be-alloc: [`DmaBufOps::import_to_refs`] is `EOPNOTSUPP`.
pub struct UdmabufExporter {
    dev: super::udmabuf::Udmabuf,
    hub: Arc<crate::sim::grants::GrantHub>,
    /// The backend domain (the grants must be granted to it).
    mapper: DomId,
    exports: Arc<AtomicU64>,
}

impl std::fmt::Debug for UdmabufExporter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UdmabufExporter")
            .field("mapper", &self.mapper)
            .field("live_exports", &self.live_exports())
            .finish()
    }
}

impl UdmabufExporter {
    pub(crate) fn new(
        dev: super::udmabuf::Udmabuf,
        hub: Arc<crate::sim::grants::GrantHub>,
        mapper: DomId,
    ) -> Self {
        UdmabufExporter {
            dev,
            hub,
            mapper,
            exports: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Exports whose fd is still open.
    pub fn live_exports(&self) -> u64 {
        self.exports.load(Ordering::SeqCst)
    }
}

impl DmaBufOps for UdmabufExporter {
    fn export_from_refs(
        &self,
        domid: DomId,
        refs: &[GrantRef],
        _flags: ExportFlags,
    ) -> Result<DmaBufFd, DmaBufError> {
        const OP: &str = "UDMABUF_CREATE_LIST";
        if refs.is_empty() {
            return Err(DmaBufError::errno(OP, libc::EINVAL));
        }
        // Like EXP_FROM_REFS: a grant that cannot be mapped fails the call with EINVAL.
        let pinned = self
            .hub
            .pin_pages(self.mapper, domid, refs)
            .map_err(|e| DmaBufError::errno(OP, e.errno().unwrap_or(libc::EINVAL)))?;
        let items = super::udmabuf::items_for_pages(pinned.pages(), PAGE_SIZE as u64);
        let fd = self
            .dev
            .create_list(pinned.memfd(), &items)
            .map_err(|source| DmaBufError { op: OP, source })?;
        self.exports.fetch_add(1, Ordering::SeqCst);
        let exports = Arc::clone(&self.exports);
        Ok(DmaBufFd::from_owned_with_close(fd, move || {
            exports.fetch_sub(1, Ordering::SeqCst);
            drop(pinned);
        }))
    }

    fn wait_released(&self, fd: DmaBufFd, _timeout: Duration) -> Result<(), DmaBufError> {
        drop(fd);
        Ok(())
    }

    fn probe(&self) -> Result<(), DmaBufError> {
        Ok(()) // the device is open
    }

    fn import_to_refs(
        &self,
        _dmabuf: &DmaBufFd,
        _domid: DomId,
        _count: usize,
    ) -> Result<Vec<GrantRef>, DmaBufError> {
        Err(DmaBufError::errno("IMP_TO_REFS", libc::EOPNOTSUPP))
    }

    fn import_release(&self, _imported_fd: RawFd) -> Result<(), DmaBufError> {
        Err(DmaBufError::errno("IMP_RELEASE", libc::EOPNOTSUPP))
    }
}
