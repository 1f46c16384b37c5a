//! The Xen interfaces the backend needs, as small traits with a real implementation over
//! the kernel devices (`evtchn.rs`, `gntdev.rs`, `gntalloc.rs`) and a simulated one
//! (`crate::sim`). XenStore needs no trait: one wire-protocol client
//! ([`super::xenstore::XsClient`]) talks to the real daemon, /dev/xen/xenbus, or the
//! simulated daemon.

use std::os::fd::RawFd;
use std::sync::Arc;

use super::mem::MappedRegion;
use super::types::{DomId, EvtchnPort, GrantRef, XenError};
use super::xenstore::XsClient;

/// Event channels: one handle (one fd) for every guest.
pub trait EventChannels: Send {
    /// Bind to `remote_port` of `remote`; returns our local port.
    fn bind_interdomain(
        &mut self,
        remote: DomId,
        remote_port: EvtchnPort,
    ) -> Result<EvtchnPort, XenError>;
    /// Unbind a local port.
    fn unbind(&mut self, local: EvtchnPort) -> Result<(), XenError>;
    /// Kick the peer of a local port.
    fn notify(&self, local: EvtchnPort) -> Result<(), XenError>;
    /// Append the local ports that fired (non-blocking) to `out`, and unmask them.
    fn pending(&mut self, out: &mut Vec<EvtchnPort>) -> Result<(), XenError>;
    /// The fd that becomes readable when a port fires (registered with mio).
    fn as_raw_fd(&self) -> RawFd;
}

/// Mapping of a foreign domain's grants (gntdev).
pub trait GrantMapper: Send + Sync {
    /// Map `refs` of `domid`, in order, into one contiguous region of `refs.len()` pages.
    fn map(
        &self,
        domid: DomId,
        refs: &[GrantRef],
        writable: bool,
    ) -> Result<MappedRegion, XenError>;
    /// Number of grant pages currently mapped through this mapper (leak checks).
    fn mapped_pages(&self) -> usize;
}

/// Local pages granted to a foreign domain; access ends on Drop.
pub struct GrantedPages {
    /// Our view of the pages, contiguous.
    pub region: MappedRegion,
    /// One ref per page, in order.
    pub refs: Vec<GrantRef>,
}

/// Granting local pages to another domain (gntalloc).
pub trait GrantAllocator: Send + Sync {
    /// Allocate `pages` zeroed pages and grant them to `domid`.
    fn alloc(&self, domid: DomId, pages: usize, writable: bool) -> Result<GrantedPages, XenError>;
    /// Whether the foreign domain still maps any of `pages`: `Some` where the allocator
    /// can tell, `None` where it cannot (Linux's gntalloc ends access lazily and never
    /// says whether the grant was still in use).
    fn foreign_mapped(&self, _pages: &GrantedPages) -> Option<bool> {
        None
    }
}

/// Everything the backend needs from Xen, real or simulated.
pub struct Platform {
    /// Our own domain id.
    pub domid: DomId,
    pub store: XsClient,
    pub evtchn: Box<dyn EventChannels>,
    pub grants: Arc<dyn GrantMapper>,
    /// None when /dev/xen/gntalloc is missing (be-alloc then falls back or fails).
    pub gntalloc: Option<Arc<dyn GrantAllocator>>,
}

/// Page size of every grant (Xen's `XEN_PAGE_SIZE`).
pub const PAGE_SIZE: usize = 4096;
