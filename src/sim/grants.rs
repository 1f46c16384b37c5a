//! Simulated grant tables.
//!
//! Every domain's "RAM" is one memfd that only grows; an allocation is a contiguous run
//! of its pages, mapped `MAP_SHARED` for the owner. A grant is (page, grantee, readonly);
//! mapping grants maps the same memfd pages again, so both sides see each other's writes
//! as with real grant mappings. Freed allocations give their memory back (hole punch)
//! once no grant of theirs is mapped any more; memfd offsets are never reused.
//!
//! Lifetimes follow Xen/Linux: ending access to a mapped grant fails (EBUSY); freeing
//! pages whose grants are still mapped defers the release until the last unmap; a
//! destroyed domain's grants cannot be newly mapped, but existing mappings stay valid.

use std::collections::HashMap;
use std::ffi::CString;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use super::errno;
use crate::xen::gntdev::checked_len;
use crate::xen::ioctl::mmap_new;
use crate::xen::mem::MappedRegion;
use crate::xen::platform::{GrantAllocator, GrantMapper, GrantedPages, PAGE_SIZE};
use crate::xen::types::{DomId, GrantRef, XenError};

/// The first grant ref issued by each domain (Linux reserves the first few).
pub const FIRST_GREF: u32 = 8;

type InstanceId = u64;

struct Grant {
    /// Page index in the domain's memfd.
    page: u64,
    /// Start page of the allocation the page belongs to.
    alloc: u64,
    to: DomId,
    readonly: bool,
    /// Live foreign mappings of this grant.
    maps: usize,
    /// Access ended (owner freed the pages or the domain died) while still mapped:
    /// removed at the last unmap, cannot be mapped again.
    ended: bool,
}

struct Alloc {
    pages: u64,
    /// The owner's own mapping still exists.
    owner_alive: bool,
    /// Grants ever issued on these pages (some may be gone already).
    refs: Vec<u32>,
    /// Grants of these pages still in the table.
    live_grants: usize,
}

/// One incarnation of a domain's memory and grant table.
struct DomMem {
    domid: DomId,
    memfd: Arc<OwnedFd>,
    size_pages: u64,
    dead: bool,
    next_ref: u32,
    grants: HashMap<u32, Grant>,
    allocs: HashMap<u64, Alloc>,
}

impl DomMem {
    fn new(domid: DomId) -> Result<Self, XenError> {
        let name = CString::new(format!("displback-sim-dom{}", domid.0))
            .map_err(|_| XenError::Invalid("memfd name".into()))?;
        // SAFETY: `name` is a valid NUL-terminated string.
        let fd = unsafe {
            libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING)
        };
        if fd < 0 {
            return Err(XenError::last_os("memfd_create"));
        }
        // SAFETY: `fd` was just created and is owned by nobody else.
        let memfd = Arc::new(unsafe { OwnedFd::from_raw_fd(fd) });
        // It only grows: sealed against shrinking, as udmabuf requires of the memfds it
        // makes dma-bufs of (the zero-copy path without Xen, `zcopy::udmabuf`).
        // SAFETY: F_ADD_SEALS on our own memfd with a plain flag argument.
        if unsafe { libc::fcntl(memfd.as_raw_fd(), libc::F_ADD_SEALS, libc::F_SEAL_SHRINK) } != 0 {
            return Err(XenError::last_os("sealing the memfd"));
        }
        Ok(DomMem {
            domid,
            memfd,
            size_pages: 0,
            dead: false,
            next_ref: FIRST_GREF,
            grants: HashMap::new(),
            allocs: HashMap::new(),
        })
    }

    /// A free grant ref: the next one in sequence, skipping refs still in use.
    fn alloc_ref(&mut self) -> Result<u32, XenError> {
        for _ in 0..=self.grants.len() {
            let r = self.next_ref;
            self.next_ref = match self.next_ref.checked_add(1) {
                Some(n) => n,
                None => FIRST_GREF,
            };
            if !self.grants.contains_key(&r) {
                return Ok(r);
            }
        }
        Err(errno("grant table full", libc::ENOSPC))
    }

    /// Drop a grant from the table; returns the allocation it belonged to.
    fn remove_grant(&mut self, gref: u32) -> Option<u64> {
        let g = self.grants.remove(&gref)?;
        if let Some(a) = self.allocs.get_mut(&g.alloc) {
            a.live_grants = a.live_grants.saturating_sub(1);
            if a.live_grants == 0 {
                a.refs.clear();
            }
        }
        Some(g.alloc)
    }

    /// Give an allocation's memory back once its owner and every grant are gone.
    fn maybe_release(&mut self, start: u64) {
        let Some(a) = self.allocs.get(&start) else {
            return;
        };
        if a.owner_alive || a.live_grants > 0 {
            return;
        }
        let pages = a.pages;
        self.allocs.remove(&start);
        let range = (page_offset(start), page_offset(pages));
        if let (Some(off), Some(len)) = range {
            // SAFETY: fallocate on our memfd; nothing maps these pages any more, so
            // discarding their contents affects no live mapping.
            let rc = unsafe {
                libc::fallocate(
                    self.memfd.as_raw_fd(),
                    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                    off,
                    len,
                )
            };
            if rc != 0 {
                tracing::warn!(
                    "sim grants: freeing {pages} pages of {:?}: {}",
                    self.domid,
                    std::io::Error::last_os_error()
                );
            }
        }
    }
}

/// Byte offset of page `page` as an `off_t`.
fn page_offset(page: u64) -> Option<libc::off_t> {
    page.checked_mul(PAGE_SIZE as u64)
        .and_then(|b| libc::off_t::try_from(b).ok())
}

#[derive(Default)]
struct State {
    next_instance: InstanceId,
    current: HashMap<DomId, InstanceId>,
    doms: HashMap<InstanceId, DomMem>,
}

impl State {
    fn current_instance(&mut self, domid: DomId) -> Result<InstanceId, XenError> {
        if let Some(&id) = self.current.get(&domid) {
            return Ok(id);
        }
        let mem = DomMem::new(domid)?;
        let id = self.next_instance;
        self.next_instance = self.next_instance.wrapping_add(1);
        self.doms.insert(id, mem);
        self.current.insert(domid, id);
        Ok(id)
    }

    /// Forget a dead incarnation once nothing of it is left.
    fn maybe_forget(&mut self, inst: InstanceId) {
        if let Some(d) = self.doms.get(&inst) {
            if d.dead && d.allocs.is_empty() && d.grants.is_empty() {
                self.doms.remove(&inst);
            }
        }
    }
}

/// The shared grant-table state of every simulated domain.
#[derive(Default)]
pub(crate) struct GrantHub {
    state: Mutex<State>,
    total_mapped: AtomicUsize,
}

/// Where an allocation lives.
#[derive(Clone, Copy, Debug)]
struct AllocId {
    inst: InstanceId,
    start: u64,
    pages: u64,
}

impl GrantHub {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn total_mapped_pages(&self) -> usize {
        self.total_mapped.load(Ordering::Relaxed)
    }

    /// Allocate `pages` zeroed pages of `domid` and map them for the owner. Dropping the
    /// region frees them (deferred while any of their grants is mapped).
    fn alloc(
        self: &Arc<Self>,
        domid: DomId,
        pages: usize,
    ) -> Result<(AllocId, MappedRegion), XenError> {
        let len = checked_len(pages)?;
        let npages = pages as u64;
        let mut st = self.lock();
        let inst = st.current_instance(domid)?;
        let Some(dom) = st.doms.get_mut(&inst) else {
            return Err(errno("sim grants: domain vanished", libc::ESRCH));
        };
        let start = dom.size_pages;
        let end = start
            .checked_add(npages)
            .ok_or_else(|| errno("sim grants: memory exhausted", libc::ENOMEM))?;
        let (Some(offset), Some(new_size)) = (page_offset(start), page_offset(end)) else {
            return Err(errno("sim grants: memory exhausted", libc::ENOMEM));
        };
        let fd = dom.memfd.as_raw_fd();
        // SAFETY: growing our own memfd; the new tail reads as zeroes.
        if unsafe { libc::ftruncate(fd, new_size) } != 0 {
            return Err(XenError::last_os("ftruncate memfd"));
        }
        dom.size_pages = end;
        let rw = libc::PROT_READ | libc::PROT_WRITE;
        let ptr = mmap_new(len, rw, libc::MAP_SHARED, fd, offset, "mmap memfd")?;
        dom.allocs.insert(
            start,
            Alloc {
                pages: npages,
                owner_alive: true,
                refs: Vec::new(),
                live_grants: 0,
            },
        );
        drop(st);
        let id = AllocId {
            inst,
            start,
            pages: npages,
        };
        let hub = Arc::clone(self);
        let release = move |p: *mut u8, _len: usize| {
            // SAFETY: unmapping exactly the owner mapping made above, once.
            if unsafe { libc::munmap(p.cast(), len) } != 0 {
                tracing::warn!("sim grants: munmap: {}", std::io::Error::last_os_error());
            }
            hub.free_alloc(id);
        };
        // SAFETY: `ptr..ptr+len` is our page-aligned RW mapping, unmapped only by
        // `release`.
        Ok((id, unsafe { MappedRegion::from_raw(ptr, len, release) }))
    }

    /// The owner let go of an allocation: end its grants (deferred where mapped).
    fn free_alloc(&self, id: AllocId) {
        let mut st = self.lock();
        let Some(dom) = st.doms.get_mut(&id.inst) else {
            return;
        };
        let refs = match dom.allocs.get_mut(&id.start) {
            Some(a) => {
                a.owner_alive = false;
                std::mem::take(&mut a.refs)
            }
            None => return,
        };
        for r in refs {
            match dom.grants.get_mut(&r) {
                Some(g) if g.alloc == id.start && g.maps > 0 => g.ended = true,
                Some(g) if g.alloc == id.start => {
                    dom.remove_grant(r);
                }
                _ => {}
            }
        }
        dom.maybe_release(id.start);
        st.maybe_forget(id.inst);
    }

    /// Grant every page of an allocation to `to`.
    fn grant(&self, id: AllocId, to: DomId, readonly: bool) -> Result<Vec<GrantRef>, XenError> {
        let mut st = self.lock();
        let Some(dom) = st.doms.get_mut(&id.inst) else {
            return Err(errno("sim grants: domain is gone", libc::ESRCH));
        };
        if dom.dead {
            return Err(errno("sim grants: domain was destroyed", libc::ESRCH));
        }
        if !dom.allocs.contains_key(&id.start) {
            return Err(errno("sim grants: pages were freed", libc::EINVAL));
        }
        let mut refs = Vec::with_capacity(usize::try_from(id.pages).unwrap_or(0));
        for i in 0..id.pages {
            let r = dom.alloc_ref()?;
            dom.grants.insert(
                r,
                Grant {
                    page: id.start + i,
                    alloc: id.start,
                    to,
                    readonly,
                    maps: 0,
                    ended: false,
                },
            );
            if let Some(a) = dom.allocs.get_mut(&id.start) {
                a.refs.push(r);
                a.live_grants += 1;
            }
            refs.push(GrantRef(r));
        }
        Ok(refs)
    }

    /// End access to grants of `domid`: all or nothing; EBUSY if any is still mapped.
    fn end_access(&self, domid: DomId, refs: &[GrantRef]) -> Result<(), XenError> {
        let mut st = self.lock();
        let Some(&inst) = st.current.get(&domid) else {
            return Err(errno("end_access: no such grant", libc::EINVAL));
        };
        let Some(dom) = st.doms.get_mut(&inst) else {
            return Err(errno("end_access: no such grant", libc::EINVAL));
        };
        for r in refs {
            match dom.grants.get(&r.0) {
                None => return Err(errno("end_access: no such grant", libc::EINVAL)),
                Some(g) if g.maps > 0 => {
                    return Err(errno("end_access: grant still mapped", libc::EBUSY))
                }
                Some(_) => {}
            }
        }
        for r in refs {
            if let Some(start) = dom.remove_grant(r.0) {
                dom.maybe_release(start);
            }
        }
        Ok(())
    }

    /// True if any of `domid`'s grants `refs` is mapped by some domain.
    fn is_mapped(&self, domid: DomId, refs: &[GrantRef]) -> bool {
        let st = self.lock();
        let Some(dom) = st.current.get(&domid).and_then(|inst| st.doms.get(inst)) else {
            return false;
        };
        refs.iter()
            .any(|r| dom.grants.get(&r.0).is_some_and(|g| g.maps > 0))
    }

    /// Validate grants `refs` of `from` for `mapper` and count them mapped: the
    /// incarnation, its memfd and the page index of each ref. [`GrantHub::unmapped`]
    /// undoes it.
    fn pin(
        &self,
        mapper: DomId,
        from: DomId,
        refs: &[GrantRef],
        writable: bool,
        counter: Option<&AtomicUsize>,
    ) -> Result<(InstanceId, Arc<OwnedFd>, Vec<u64>), XenError> {
        let bad = |what: &'static str| errno(what, libc::EINVAL);
        let mut st = self.lock();
        let Some(&inst) = st.current.get(&from) else {
            return Err(bad("map grant: no such domain"));
        };
        let Some(dom) = st.doms.get_mut(&inst) else {
            return Err(bad("map grant: no such domain"));
        };
        let mut pages = Vec::with_capacity(refs.len());
        for r in refs {
            let Some(g) = dom.grants.get(&r.0) else {
                return Err(bad("map grant: no such grant ref"));
            };
            if g.ended {
                return Err(bad("map grant: access ended"));
            }
            if g.to != mapper {
                return Err(bad("map grant: not granted to this domain"));
            }
            if writable && g.readonly {
                return Err(bad("map grant: read-only grant mapped writable"));
            }
            pages.push(g.page);
        }
        for r in refs {
            if let Some(g) = dom.grants.get_mut(&r.0) {
                g.maps += 1;
            }
        }
        let memfd = Arc::clone(&dom.memfd);
        drop(st);
        let n = refs.len();
        self.total_mapped.fetch_add(n, Ordering::Relaxed);
        if let Some(c) = counter {
            c.fetch_add(n, Ordering::Relaxed);
        }
        Ok((inst, memfd, pages))
    }

    /// Pin grants `refs` of `from` for `mapper` as an export would map them (udmabuf
    /// exports): counted mapped, their pages not freed, until the [`PinnedPages`] drops.
    pub(crate) fn pin_pages(
        self: &Arc<Self>,
        mapper: DomId,
        from: DomId,
        refs: &[GrantRef],
    ) -> Result<PinnedPages, XenError> {
        checked_len(refs.len())?;
        let (inst, memfd, pages) = self.pin(mapper, from, refs, true, None)?;
        Ok(PinnedPages {
            hub: Arc::clone(self),
            inst,
            memfd,
            pages,
            refs: refs.iter().map(|r| r.0).collect(),
        })
    }

    /// Map grants `refs` of `from` for `mapper` into one contiguous region.
    fn map(
        self: &Arc<Self>,
        mapper: DomId,
        from: DomId,
        refs: &[GrantRef],
        writable: bool,
        counter: Option<Arc<AtomicUsize>>,
    ) -> Result<MappedRegion, XenError> {
        let len = checked_len(refs.len())?;
        let (inst, memfd, pages) = self.pin(mapper, from, refs, writable, counter.as_deref())?;
        let raw_refs: Vec<u32> = refs.iter().map(|r| r.0).collect();
        let ptr = match map_pages(&memfd, &pages, len, writable) {
            Ok(p) => p,
            Err(e) => {
                self.unmapped(inst, &raw_refs, counter.as_deref());
                return Err(e);
            }
        };
        let hub = Arc::clone(self);
        let release = move |p: *mut u8, _len: usize| {
            // SAFETY: unmapping exactly the reservation made by `map_pages`, once; this
            // removes every sub-mapping placed inside it.
            if unsafe { libc::munmap(p.cast(), len) } != 0 {
                tracing::warn!("sim grants: munmap: {}", std::io::Error::last_os_error());
            }
            hub.unmapped(inst, &raw_refs, counter.as_deref());
        };
        // SAFETY: `ptr..ptr+len` is the page-aligned mapping just made (writable iff
        // `writable`, which the caller must respect), unmapped only by `release`.
        Ok(unsafe { MappedRegion::from_raw(ptr, len, release) })
    }

    /// Bookkeeping after grants were unmapped.
    fn unmapped(&self, inst: InstanceId, refs: &[u32], counter: Option<&AtomicUsize>) {
        self.total_mapped.fetch_sub(refs.len(), Ordering::Relaxed);
        if let Some(c) = counter {
            c.fetch_sub(refs.len(), Ordering::Relaxed);
        }
        let mut st = self.lock();
        let Some(dom) = st.doms.get_mut(&inst) else {
            return;
        };
        for r in refs {
            let done = match dom.grants.get_mut(r) {
                Some(g) => {
                    g.maps = g.maps.saturating_sub(1);
                    g.ended && g.maps == 0
                }
                None => false,
            };
            if done {
                if let Some(start) = dom.remove_grant(*r) {
                    dom.maybe_release(start);
                }
            }
        }
        st.maybe_forget(inst);
    }

    /// Destroy `domid`: its grants can no longer be mapped, unmapped ones are revoked,
    /// mapped ones stay valid until unmapped. A later use of the id starts afresh.
    pub(crate) fn destroy_domain(&self, domid: DomId) {
        let mut st = self.lock();
        let Some(inst) = st.current.remove(&domid) else {
            return;
        };
        if let Some(dom) = st.doms.get_mut(&inst) {
            dom.dead = true;
            let refs: Vec<u32> = dom.grants.keys().copied().collect();
            for r in refs {
                let unmapped = match dom.grants.get_mut(&r) {
                    Some(g) => {
                        g.ended = true;
                        g.maps == 0
                    }
                    None => false,
                };
                if unmapped {
                    if let Some(start) = dom.remove_grant(r) {
                        dom.maybe_release(start);
                    }
                }
            }
        }
        st.maybe_forget(inst);
    }
}

/// Reserve `len` bytes of address space and map `pages` of `memfd` into it in order,
/// one `mmap` per run of consecutive pages.
fn map_pages(
    memfd: &OwnedFd,
    pages: &[u64],
    len: usize,
    writable: bool,
) -> Result<NonNull<u8>, XenError> {
    let flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE;
    let base = mmap_new(len, libc::PROT_NONE, flags, -1, 0, "mmap reservation")?;
    let prot = if writable {
        libc::PROT_READ | libc::PROT_WRITE
    } else {
        libc::PROT_READ
    };
    let unreserve = || {
        // SAFETY: unmapping exactly the reservation made above (and anything placed in
        // it), which nobody else refers to yet.
        unsafe { libc::munmap(base.as_ptr().cast(), len) };
    };
    let mut i = 0;
    while i < pages.len() {
        let first = pages[i];
        let mut run = 1;
        while i + run < pages.len() && pages[i + run] == first.wrapping_add(run as u64) {
            run += 1;
        }
        let Some(offset) = page_offset(first) else {
            unreserve();
            return Err(errno("map grant: page offset overflows", libc::EINVAL));
        };
        // `i + run <= pages.len()` and `pages.len() * PAGE_SIZE == len`, so neither
        // multiplication overflows and the run lies inside the reservation.
        // SAFETY: replacing part of our own reservation [base, base+len) with a shared
        // mapping of pages that exist in the memfd (allocations are inside its size).
        let p = unsafe {
            libc::mmap(
                base.as_ptr().add(i * PAGE_SIZE).cast(),
                run * PAGE_SIZE,
                prot,
                libc::MAP_SHARED | libc::MAP_FIXED,
                memfd.as_raw_fd(),
                offset,
            )
        };
        if p == libc::MAP_FAILED {
            let err = XenError::last_os("mmap grant pages");
            unreserve();
            return Err(err);
        }
        i += run;
    }
    Ok(base)
}

/// A domain's view of its own memory and grant table (guest side).
#[derive(Clone)]
pub struct SimGuestMem {
    hub: Arc<GrantHub>,
    domid: DomId,
}

/// Zeroed pages of a simulated domain, contiguous; dropping them frees their grants
/// (deferred while mapped, like Linux's deferred grant release).
pub struct SimPages {
    region: MappedRegion,
    id: AllocId,
    domid: DomId,
}

impl std::fmt::Debug for SimPages {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "SimPages({:?}, {} pages at page {})",
            self.domid, self.id.pages, self.id.start
        )
    }
}

impl SimPages {
    /// The owner's mapping of the pages.
    pub fn region(&self) -> &MappedRegion {
        &self.region
    }

    /// Number of pages.
    pub fn pages(&self) -> usize {
        usize::try_from(self.id.pages).unwrap_or(usize::MAX)
    }

    /// The owning domain.
    pub fn domid(&self) -> DomId {
        self.domid
    }
}

impl SimGuestMem {
    pub(crate) fn new(hub: Arc<GrantHub>, domid: DomId) -> Self {
        SimGuestMem { hub, domid }
    }

    /// The domain this memory belongs to.
    pub fn domid(&self) -> DomId {
        self.domid
    }

    /// Allocate `pages` zeroed, contiguous pages.
    pub fn alloc(&self, pages: usize) -> Result<SimPages, XenError> {
        let (id, region) = self.hub.alloc(self.domid, pages)?;
        Ok(SimPages {
            region,
            id,
            domid: self.domid,
        })
    }

    /// Grant every page of `pages` to `to`: one ref per page, in order. Returns no refs
    /// if the domain was destroyed meanwhile or its grant table is full.
    pub fn grant(&self, pages: &SimPages, to: DomId, readonly: bool) -> Vec<GrantRef> {
        match self.hub.grant(pages.id, to, readonly) {
            Ok(refs) => refs,
            Err(e) => {
                tracing::warn!("sim grants: granting {pages:?} to {to:?}: {e}");
                Vec::new()
            }
        }
    }

    /// End foreign access to `refs`: fails with EBUSY (ending none) if any is mapped,
    /// EINVAL if any does not exist.
    pub fn end_access(&self, refs: &[GrantRef]) -> Result<(), XenError> {
        self.hub.end_access(self.domid, refs)
    }

    /// Map refs that `from` granted to this domain (e.g. backend-allocated buffers).
    pub fn map_foreign(
        &self,
        from: DomId,
        refs: &[GrantRef],
        writable: bool,
    ) -> Result<MappedRegion, XenError> {
        self.hub.map(self.domid, from, refs, writable, None)
    }
}

/// Grants of a guest held as an export holds them (see [`GrantHub::pin_pages`]): the
/// guest's memfd and the page index of each ref, in order.
pub struct PinnedPages {
    hub: Arc<GrantHub>,
    inst: InstanceId,
    memfd: Arc<OwnedFd>,
    pages: Vec<u64>,
    refs: Vec<u32>,
}

impl PinnedPages {
    /// The guest's memory.
    pub fn memfd(&self) -> BorrowedFd<'_> {
        self.memfd.as_fd()
    }

    /// Page index (in the memfd) of each ref.
    pub fn pages(&self) -> &[u64] {
        &self.pages
    }
}

impl Drop for PinnedPages {
    fn drop(&mut self) {
        self.hub.unmapped(self.inst, &self.refs, None);
    }
}

/// A simulated /dev/xen/gntdev of one (mapping) domain.
pub struct SimGntdev {
    hub: Arc<GrantHub>,
    domid: DomId,
    mapped: Arc<AtomicUsize>,
}

impl SimGntdev {
    pub(crate) fn new(hub: Arc<GrantHub>, domid: DomId) -> Self {
        SimGntdev {
            hub,
            domid,
            mapped: Arc::new(AtomicUsize::new(0)),
        }
    }
}

impl GrantMapper for SimGntdev {
    fn map(
        &self,
        domid: DomId,
        refs: &[GrantRef],
        writable: bool,
    ) -> Result<MappedRegion, XenError> {
        self.hub.map(
            self.domid,
            domid,
            refs,
            writable,
            Some(Arc::clone(&self.mapped)),
        )
    }

    fn mapped_pages(&self) -> usize {
        self.mapped.load(Ordering::Relaxed)
    }
}

/// A simulated /dev/xen/gntalloc of one (granting) domain.
pub struct SimGntalloc {
    hub: Arc<GrantHub>,
    domid: DomId,
}

impl SimGntalloc {
    pub(crate) fn new(hub: Arc<GrantHub>, domid: DomId) -> Self {
        SimGntalloc { hub, domid }
    }
}

impl GrantAllocator for SimGntalloc {
    fn alloc(&self, domid: DomId, pages: usize, writable: bool) -> Result<GrantedPages, XenError> {
        let (id, region) = self.hub.alloc(self.domid, pages)?;
        // On error `region` drops here, outside the hub lock, freeing the pages.
        let refs = self.hub.grant(id, domid, !writable)?;
        Ok(GrantedPages { region, refs })
    }

    fn foreign_mapped(&self, pages: &GrantedPages) -> Option<bool> {
        Some(self.hub.is_mapped(self.domid, &pages.refs))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sim::SimXen;

    const DOM0: DomId = DomId(0);
    const GUEST: DomId = DomId(3);

    fn einval_or_ebusy(e: &XenError) -> i32 {
        e.errno().unwrap_or(-1)
    }

    #[test]
    fn sim_devices_fit_the_platform_seams() {
        use crate::xen::platform::EventChannels;
        let sim = SimXen::new();
        let _evtchn: Box<dyn EventChannels> = Box::new(sim.evtchn(DOM0));
        let _grants: Arc<dyn GrantMapper> = sim.grant_mapper(DOM0);
        let _alloc: Option<Arc<dyn GrantAllocator>> = Some(sim.gntalloc(DOM0));
        let sim2 = sim.clone();
        std::thread::spawn(move || drop(sim2.guest_mem(GUEST).alloc(1).unwrap()))
            .join()
            .unwrap();
    }

    #[test]
    fn map_unmap_round_trip_sees_writes_both_ways() {
        let sim = SimXen::new();
        let mem = sim.guest_mem(GUEST);
        let pages = mem.alloc(4).unwrap();
        assert_eq!(pages.region().len(), 4 * PAGE_SIZE);
        let mut zero = vec![1u8; 4 * PAGE_SIZE];
        pages.region().read(0, &mut zero).unwrap();
        assert!(zero.iter().all(|&b| b == 0), "fresh pages are zeroed");
        let refs = mem.grant(&pages, DOM0, false);
        assert_eq!(refs.len(), 4);
        assert!(refs.iter().all(|r| r.0 >= FIRST_GREF));

        pages.region().write(PAGE_SIZE + 10, b"guest").unwrap();
        let gntdev = sim.grant_mapper(DOM0);
        let m = gntdev.map(GUEST, &refs, true).unwrap();
        assert_eq!(gntdev.mapped_pages(), 4);
        assert_eq!(sim.total_mapped_pages(), 4);
        let mut b = [0u8; 5];
        m.read(PAGE_SIZE + 10, &mut b).unwrap();
        assert_eq!(&b, b"guest");
        m.write(3 * PAGE_SIZE + 7, b"backend").unwrap();
        let mut b = [0u8; 7];
        pages.region().read(3 * PAGE_SIZE + 7, &mut b).unwrap();
        assert_eq!(&b, b"backend");
        m.store_u32(0, 0xabcd);
        assert_eq!(pages.region().load_u32(0), 0xabcd);

        drop(m);
        assert_eq!(gntdev.mapped_pages(), 0);
        assert_eq!(sim.total_mapped_pages(), 0);
        mem.end_access(&refs).unwrap();
    }

    #[test]
    fn large_buffer_maps_and_writes_through() {
        const N: usize = 2025;
        let sim = SimXen::new();
        let mem = sim.guest_mem(GUEST);
        // Something before it, so the buffer does not start at memfd offset 0.
        let _other = mem.alloc(3).unwrap();
        let pages = mem.alloc(N).unwrap();
        let refs = mem.grant(&pages, DOM0, false);
        assert_eq!(refs.len(), N);
        for i in 0..N {
            pages
                .region()
                .write(i * PAGE_SIZE, &(i as u32).to_le_bytes())
                .unwrap();
        }
        let gntdev = sim.grant_mapper(DOM0);
        let m = gntdev.map(GUEST, &refs, true).unwrap();
        assert_eq!(m.len(), N * PAGE_SIZE);
        let mut b = [0u8; 4];
        for i in 0..N {
            m.read(i * PAGE_SIZE, &mut b).unwrap();
            assert_eq!(u32::from_le_bytes(b), i as u32);
            m.write(i * PAGE_SIZE + 100, &(!(i as u32)).to_le_bytes())
                .unwrap();
        }
        for i in 0..N {
            pages.region().read(i * PAGE_SIZE + 100, &mut b).unwrap();
            assert_eq!(u32::from_le_bytes(b), !(i as u32));
        }
        assert_eq!(sim.total_mapped_pages(), N);
        drop(m);
        assert_eq!(sim.total_mapped_pages(), 0);
    }

    #[test]
    fn out_of_order_refs_map_in_request_order() {
        let sim = SimXen::new();
        let mem = sim.guest_mem(GUEST);
        let pages = mem.alloc(6).unwrap();
        let refs = mem.grant(&pages, DOM0, true);
        for i in 0..6 {
            pages
                .region()
                .fill(i * PAGE_SIZE, PAGE_SIZE, i as u8)
                .unwrap();
        }
        let order = [4usize, 5, 0, 1, 2, 2];
        let wanted: Vec<GrantRef> = order.iter().map(|&i| refs[i]).collect();
        let m = sim.grant_mapper(DOM0).map(GUEST, &wanted, false).unwrap();
        let mut b = [0u8; 1];
        for (slot, &i) in order.iter().enumerate() {
            m.read(slot * PAGE_SIZE + 17, &mut b).unwrap();
            assert_eq!(b[0], i as u8);
        }
        // Page 2 is mapped twice: still busy after one end_access attempt.
        assert_eq!(
            einval_or_ebusy(&mem.end_access(&[refs[2]]).unwrap_err()),
            libc::EBUSY
        );
        drop(m);
        mem.end_access(&refs).unwrap();
    }

    #[test]
    fn bad_refs_are_refused_without_leaking() {
        let sim = SimXen::new();
        let mem = sim.guest_mem(GUEST);
        let pages = mem.alloc(2).unwrap();
        let to_dom0 = mem.grant(&pages, DOM0, false);
        let to_other = mem.grant(&pages, DomId(9), false);
        let readonly = mem.grant(&pages, DOM0, true);
        let gntdev = sim.grant_mapper(DOM0);
        let cases: Vec<(DomId, Vec<GrantRef>, bool)> = vec![
            (GUEST, vec![GrantRef(0)], false),
            (GUEST, vec![GrantRef(123_456)], false),
            (GUEST, vec![to_dom0[0], GrantRef(999_999)], false),
            (GUEST, vec![to_other[0]], false),
            (GUEST, vec![to_dom0[0], to_other[1]], false),
            (GUEST, vec![readonly[0]], true),
            (GUEST, vec![to_dom0[1], readonly[1]], true),
            (DomId(42), vec![to_dom0[0]], false),
            (GUEST, vec![], false),
        ];
        for (dom, refs, writable) in cases {
            let err = gntdev.map(dom, &refs, writable).unwrap_err();
            assert_eq!(
                err.errno(),
                Some(libc::EINVAL),
                "{dom:?} {refs:?} {writable}"
            );
        }
        assert_eq!(gntdev.mapped_pages(), 0);
        assert_eq!(sim.total_mapped_pages(), 0);
        // Read-only grants map fine read-only; dom9's grant maps for dom9.
        drop(gntdev.map(GUEST, &readonly, false).unwrap());
        drop(
            sim.grant_mapper(DomId(9))
                .map(GUEST, &to_other, true)
                .unwrap(),
        );
        // Nothing stayed mapped: every grant can end.
        mem.end_access(&to_dom0).unwrap();
        mem.end_access(&to_other).unwrap();
        mem.end_access(&readonly).unwrap();
        assert!(mem.end_access(&readonly).is_err(), "already ended");
        let err = gntdev.map(GUEST, &to_dom0, false).unwrap_err();
        assert_eq!(err.errno(), Some(libc::EINVAL));
    }

    #[test]
    fn end_access_fails_while_mapped() {
        let sim = SimXen::new();
        let mem = sim.guest_mem(GUEST);
        let pages = mem.alloc(3).unwrap();
        let refs = mem.grant(&pages, DOM0, false);
        let m = sim.grant_mapper(DOM0).map(GUEST, &refs[1..], true).unwrap();
        let err = mem.end_access(&refs).unwrap_err();
        assert_eq!(err.errno(), Some(libc::EBUSY));
        // All or nothing: refs[0] was not ended either.
        drop(sim.grant_mapper(DOM0).map(GUEST, &refs[..1], true).unwrap());
        drop(m);
        mem.end_access(&refs).unwrap();
    }

    #[test]
    fn freeing_mapped_pages_is_deferred() {
        let sim = SimXen::new();
        let mem = sim.guest_mem(GUEST);
        let pages = mem.alloc(2).unwrap();
        let refs = mem.grant(&pages, DOM0, false);
        pages.region().write(5, b"kept").unwrap();
        let gntdev = sim.grant_mapper(DOM0);
        let m = gntdev.map(GUEST, &refs, true).unwrap();
        drop(pages);
        // Still valid for the mapper, but the grants cannot be mapped again.
        let mut b = [0u8; 4];
        m.read(5, &mut b).unwrap();
        assert_eq!(&b, b"kept");
        assert!(gntdev.map(GUEST, &refs, false).is_err());
        drop(m);
        assert_eq!(sim.total_mapped_pages(), 0);
        assert!(mem.end_access(&refs).is_err(), "freed with the pages");
    }

    #[test]
    fn gntalloc_pages_map_on_the_guest_side() {
        let sim = SimXen::new();
        let alloc = sim.gntalloc(DOM0);
        let granted = alloc.alloc(GUEST, 3, true).unwrap();
        assert_eq!(granted.refs.len(), 3);
        assert_eq!(granted.region.len(), 3 * PAGE_SIZE);
        let mem = sim.guest_mem(GUEST);
        let m = mem.map_foreign(DOM0, &granted.refs, true).unwrap();
        assert_eq!(sim.total_mapped_pages(), 3);
        granted.region.write(2 * PAGE_SIZE, b"be").unwrap();
        let mut b = [0u8; 2];
        m.read(2 * PAGE_SIZE, &mut b).unwrap();
        assert_eq!(&b, b"be");
        m.write(8, b"fe").unwrap();
        granted.region.read(8, &mut b).unwrap();
        assert_eq!(&b, b"fe");
        // Only the grantee may map them.
        assert!(sim
            .guest_mem(DomId(4))
            .map_foreign(DOM0, &granted.refs, false)
            .is_err());
        drop(m);
        drop(granted);
        assert_eq!(sim.total_mapped_pages(), 0);

        let ro = alloc.alloc(GUEST, 1, false).unwrap();
        assert!(mem.map_foreign(DOM0, &ro.refs, true).is_err());
        drop(mem.map_foreign(DOM0, &ro.refs, false).unwrap());
        assert!(alloc.alloc(GUEST, 0, true).is_err());
        assert!(alloc.alloc(GUEST, (1 << 20) + 1, true).is_err());
    }

    #[test]
    fn destroyed_domain_keeps_existing_mappings() {
        let sim = SimXen::new();
        let mem = sim.guest_mem(GUEST);
        let pages = mem.alloc(2).unwrap();
        let refs = mem.grant(&pages, DOM0, false);
        let gntdev = sim.grant_mapper(DOM0);
        let m = gntdev.map(GUEST, &refs[..1], true).unwrap();
        pages.region().write(0, b"alive").unwrap();
        sim.destroy_domain(GUEST);
        let mut b = [0u8; 5];
        m.read(0, &mut b).unwrap();
        assert_eq!(&b, b"alive");
        assert!(gntdev.map(GUEST, &refs[1..], false).is_err());
        assert!(mem.grant(&pages, DOM0, false).is_empty());
        drop(m);
        drop(pages);
        assert_eq!(sim.total_mapped_pages(), 0);
        // The id can be reused by a new incarnation, whose refs start afresh.
        let pages = mem.alloc(1).unwrap();
        let refs = mem.grant(&pages, DOM0, false);
        assert_eq!(refs, vec![GrantRef(FIRST_GREF)]);
        drop(gntdev.map(GUEST, &refs, true).unwrap());
    }

    #[test]
    fn freed_memory_is_released_once_unmapped() {
        let sim = SimXen::new();
        let mem = sim.guest_mem(GUEST);
        let pages = mem.alloc(2).unwrap();
        let refs = mem.grant(&pages, DOM0, false);
        let m = sim.grant_mapper(DOM0).map(GUEST, &refs, true).unwrap();
        pages.region().fill(0, 2 * PAGE_SIZE, 0x5a).unwrap();
        drop(pages);
        let mut b = [0u8; 1];
        m.read(PAGE_SIZE, &mut b).unwrap();
        assert_eq!(b[0], 0x5a, "not punched while mapped");
        let st = sim.grants.lock();
        let inst = st.current[&GUEST];
        assert_eq!(st.doms[&inst].allocs.len(), 1);
        drop(st);
        drop(m);
        let st = sim.grants.lock();
        assert!(st.doms[&inst].allocs.is_empty());
        assert!(st.doms[&inst].grants.is_empty());
    }
}
