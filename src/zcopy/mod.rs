//! Zero-copy (gntdev dma-buf) and backend-allocation paths. See issue #5.
//!
//! * [`DmaBufOps`]: the four gntdev dma-buf ioctls behind a trait, with the real
//!   implementation over `/dev/xen/gntdev` ([`gntdev_dmabuf::GntdevDmaBuf`], the only
//!   module with `unsafe`) and a reference-counting simulation ([`sim::SimDmaBuf`]).
//! * [`ExportedDmaBuf`] / [`ImportedDmaBuf`]: owners of one export (guest grants →
//!   dma-buf) and one import (dma-buf → grants to the guest), releasing on Drop.
//! * [`policy`]: `--zero-copy auto|on|off`, the start-up capability probe and the
//!   per-buffer fallback to the copy path.
//! * [`buffer`]: the WAIT_FREE state machine of a zero-copy display buffer
//!   ([`buffer::ZeroCopyBuffer`]) and its be-alloc counterpart
//!   ([`buffer::BackendAllocBuffer`]).

use std::fmt;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::time::Duration;

use tracing::warn;

use crate::backend::{DomId, GrantRef};

pub mod buffer;
pub mod gntdev_dmabuf;
pub mod policy;
pub mod sim;
pub mod udmabuf;

pub use buffer::{BackendAllocBuffer, DestroyError, DumbBuffer, ScanoutImport, ZeroCopyBuffer};
pub use policy::{Arch, Capabilities, FallbackReason, ZeroCopyGate};
pub use sim::SimDmaBuf;

/// How long DBUF_DESTROY waits for an exported buffer to be released: below the guest's
/// 3000 ms response timeout, like displ_be's 2000 ms.
pub const DEFAULT_RELEASE_TIMEOUT: Duration = Duration::from_millis(2000);

/// How gntdev backs the pages of an exported dma-buf (`GNTDEV_DMA_FLAG_*`). The DMA
/// flags need `CONFIG_XEN_GRANT_DMA_ALLOC`; asking for both at once is EINVAL.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ExportFlags {
    /// Plain grant-mapped pages (flags 0).
    #[default]
    None,
    /// `GNTDEV_DMA_FLAG_WC`: `dma_alloc_wc` memory (what displ_be asks for).
    WriteCombine,
    /// `GNTDEV_DMA_FLAG_COHERENT`: `dma_alloc_coherent` memory.
    Coherent,
}

impl ExportFlags {
    /// The ioctl's `flags` word.
    pub fn bits(self) -> u32 {
        match self {
            ExportFlags::None => 0,
            ExportFlags::WriteCombine => gntdev_dmabuf::GNTDEV_DMA_FLAG_WC,
            ExportFlags::Coherent => gntdev_dmabuf::GNTDEV_DMA_FLAG_COHERENT,
        }
    }
}

/// A failed dma-buf operation: which one, and the errno.
#[derive(Debug, thiserror::Error)]
#[error("{op}: {source}")]
pub struct DmaBufError {
    pub op: &'static str,
    #[source]
    pub source: std::io::Error,
}

impl DmaBufError {
    /// An error with a plain errno.
    pub fn errno(op: &'static str, errno: i32) -> Self {
        DmaBufError {
            op,
            source: std::io::Error::from_raw_os_error(errno),
        }
    }

    /// The positive errno (EIO when there is none).
    pub fn raw_errno(&self) -> i32 {
        self.source.raw_os_error().unwrap_or(libc::EIO)
    }

    /// True for `ETIMEDOUT` (a release wait that ran out).
    pub fn is_timeout(&self) -> bool {
        self.raw_errno() == libc::ETIMEDOUT
    }
}

type OnClose = Box<dyn FnOnce() + Send + Sync>;

enum FdKind {
    /// A real fd, and what to do when it is closed (an exporter's bookkeeping).
    Os(OwnedFd, Option<OnClose>),
    Sim {
        raw: RawFd,
        on_close: Option<OnClose>,
    },
}

/// A dma-buf file descriptor we own; dropping it closes it (drops our reference).
///
/// Either a real fd or a simulated one whose "close" notifies the simulation.
pub struct DmaBufFd(FdKind);

impl DmaBufFd {
    /// Own a real dma-buf fd (e.g. from `DRM_IOCTL_PRIME_HANDLE_TO_FD`).
    pub fn from_owned(fd: OwnedFd) -> Self {
        DmaBufFd(FdKind::Os(fd, None))
    }

    /// Own a real dma-buf fd; `on_close` runs when it is closed (dropped), before the
    /// close itself. Not when ownership is given up ([`DmaBufFd::into_owned`]).
    pub fn from_owned_with_close(
        fd: OwnedFd,
        on_close: impl FnOnce() + Send + Sync + 'static,
    ) -> Self {
        DmaBufFd(FdKind::Os(fd, Some(Box::new(on_close))))
    }

    /// A simulated fd: number `raw`, and what closing it does.
    pub fn simulated(raw: RawFd, on_close: impl FnOnce() + Send + Sync + 'static) -> Self {
        DmaBufFd(FdKind::Sim {
            raw,
            on_close: Some(Box::new(on_close)),
        })
    }

    /// The fd number (the key gntdev uses for EXP_WAIT_RELEASED and IMP_RELEASE).
    pub fn raw(&self) -> RawFd {
        match &self.0 {
            FdKind::Os(fd, _) => fd.as_raw_fd(),
            FdKind::Sim { raw, .. } => *raw,
        }
    }

    /// The real fd, for handing to the kernel (`PRIME_FD_TO_HANDLE`); None when simulated.
    pub fn as_fd(&self) -> Option<BorrowedFd<'_>> {
        match &self.0 {
            FdKind::Os(fd, _) => Some(fd.as_fd()),
            FdKind::Sim { .. } => None,
        }
    }

    /// Give up ownership of a real fd without closing it; None (and nothing happens
    /// but the simulated close) when simulated.
    pub fn into_owned(mut self) -> Option<OwnedFd> {
        let dummy = FdKind::Sim {
            raw: -1,
            on_close: None,
        };
        match std::mem::replace(&mut self.0, dummy) {
            FdKind::Os(fd, _) => Some(fd),
            sim => {
                self.0 = sim;
                None
            }
        }
    }

    /// True for a simulated fd.
    pub fn is_simulated(&self) -> bool {
        matches!(self.0, FdKind::Sim { .. })
    }
}

impl Drop for DmaBufFd {
    fn drop(&mut self) {
        let (FdKind::Sim { on_close, .. } | FdKind::Os(_, on_close)) = &mut self.0;
        if let Some(f) = on_close.take() {
            f();
        }
        // A real OwnedFd closes itself.
    }
}

impl fmt::Debug for DmaBufFd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = if self.is_simulated() { "sim" } else { "os" };
        write!(f, "DmaBufFd({kind} {})", self.raw())
    }
}

/// The gntdev dma-buf interface (`CONFIG_XEN_GNTDEV_DMABUF`), one per gntdev open file:
/// exports are looked up by fd number *on the file they were made on*.
pub trait DmaBufOps: Send + Sync {
    /// `IOCTL_GNTDEV_DMABUF_EXP_FROM_REFS`: map `refs` of `domid` and export them as one
    /// dma-buf of `refs.len() * 4096` bytes.
    fn export_from_refs(
        &self,
        domid: DomId,
        refs: &[GrantRef],
        flags: ExportFlags,
    ) -> Result<DmaBufFd, DmaBufError>;

    /// Close `fd` (our reference to an export this file made), then
    /// `IOCTL_GNTDEV_DMABUF_EXP_WAIT_RELEASED` with its number: wait until the export has
    /// no references left and its grants are unmapped. Already released (ENOENT) is
    /// `Ok`; running out of time is an `ETIMEDOUT` error.
    ///
    /// gntdev finds the export by fd *number*, so the number stays reserved (a
    /// placeholder fd sits on it) until the export is really released: otherwise a later
    /// export reusing the number would be confused with a stale one that timed out.
    fn wait_released(&self, fd: DmaBufFd, timeout: Duration) -> Result<(), DmaBufError>;

    /// Whether this file has the dma-buf ioctls: EXP_WAIT_RELEASED of a number never
    /// exported answers ENOENT (`Ok`) where they exist, ENOTTY where they don't.
    fn probe(&self) -> Result<(), DmaBufError>;

    /// `IOCTL_GNTDEV_DMABUF_IMP_TO_REFS`: grant the `count` pages of `dmabuf` (exactly
    /// `count * 4096` bytes) to `domid`; returns one ref per page.
    fn import_to_refs(
        &self,
        dmabuf: &DmaBufFd,
        domid: DomId,
        count: usize,
    ) -> Result<Vec<GrantRef>, DmaBufError>;

    /// `IOCTL_GNTDEV_DMABUF_IMP_RELEASE`: end the guest's access to the import made from
    /// fd number `imported_fd` and detach it. The fd must still be open.
    fn import_release(&self, imported_fd: RawFd) -> Result<(), DmaBufError>;
}

/// One export of guest grants as a dma-buf. Dropping it closes our fd without waiting;
/// [`ExportedDmaBuf::wait_released`] is the orderly end.
pub struct ExportedDmaBuf {
    ops: Arc<dyn DmaBufOps>,
    fd: Option<DmaBufFd>,
    /// The fd number gntdev recorded at export time.
    exported_as: RawFd,
    domid: DomId,
    pages: usize,
}

impl ExportedDmaBuf {
    /// Export `refs` of `domid` through `ops`.
    pub fn export(
        ops: Arc<dyn DmaBufOps>,
        domid: DomId,
        refs: &[GrantRef],
        flags: ExportFlags,
    ) -> Result<Self, DmaBufError> {
        let fd = ops.export_from_refs(domid, refs, flags)?;
        Ok(ExportedDmaBuf {
            ops,
            exported_as: fd.raw(),
            fd: Some(fd),
            domid,
            pages: refs.len(),
        })
    }

    /// Our dma-buf fd, for the output to import (`PRIME_FD_TO_HANDLE`, a compositor).
    pub fn fd(&self) -> &DmaBufFd {
        self.fd
            .as_ref()
            .expect("the fd lives until wait_released consumes self")
    }

    /// The fd number the buffer was exported as.
    pub fn exported_as(&self) -> RawFd {
        self.exported_as
    }

    /// Size in pages.
    pub fn pages(&self) -> usize {
        self.pages
    }

    /// The guest whose grants back this buffer.
    pub fn domid(&self) -> DomId {
        self.domid
    }

    /// Close our fd first, then wait (up to `timeout`) until every other holder let go
    /// and gntdev unmapped the guest's grants.
    pub fn wait_released(mut self, timeout: Duration) -> Result<(), DmaBufError> {
        let fd = self.fd.take().expect("present until consumed");
        self.ops.wait_released(fd, timeout)
    }
}

impl Drop for ExportedDmaBuf {
    fn drop(&mut self) {
        if self.fd.take().is_some() {
            tracing::debug!(
                fd = self.exported_as,
                dom = self.domid.0,
                "dma-buf export dropped without waiting for its release"
            );
        }
    }
}

impl fmt::Debug for ExportedDmaBuf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ExportedDmaBuf")
            .field("exported_as", &self.exported_as)
            .field("domid", &self.domid)
            .field("pages", &self.pages)
            .finish()
    }
}

/// Pages of a local dma-buf granted to a guest. Dropping it ends the guest's access
/// (IMP_RELEASE), then closes the dma-buf fd.
pub struct ImportedDmaBuf {
    ops: Arc<dyn DmaBufOps>,
    fd: Option<DmaBufFd>,
    refs: Vec<GrantRef>,
    domid: DomId,
}

impl ImportedDmaBuf {
    /// Grant the `count` pages of `dmabuf` to `domid`. On failure the fd is closed.
    pub fn import(
        ops: Arc<dyn DmaBufOps>,
        dmabuf: DmaBufFd,
        domid: DomId,
        count: usize,
    ) -> Result<Self, DmaBufError> {
        let refs = ops.import_to_refs(&dmabuf, domid, count)?;
        if refs.len() != count {
            // Keep the fd open for the release, which looks the import up by its number.
            let _ = ops.import_release(dmabuf.raw());
            return Err(DmaBufError::errno("IMP_TO_REFS ref count", libc::EIO));
        }
        Ok(ImportedDmaBuf {
            ops,
            fd: Some(dmabuf),
            refs,
            domid,
        })
    }

    /// One ref per page, in order (what goes into the guest's page directory).
    pub fn refs(&self) -> &[GrantRef] {
        &self.refs
    }

    /// The guest the pages are granted to.
    pub fn domid(&self) -> DomId {
        self.domid
    }

    /// End the guest's access and close the fd, reporting a failed release.
    pub fn release(mut self) -> Result<(), DmaBufError> {
        self.release_inner()
    }

    fn release_inner(&mut self) -> Result<(), DmaBufError> {
        let Some(fd) = self.fd.take() else {
            return Ok(());
        };
        // Release before close: gntdev finds the import by the fd number.
        let result = self.ops.import_release(fd.raw());
        drop(fd);
        result
    }
}

impl Drop for ImportedDmaBuf {
    fn drop(&mut self) {
        if let Err(e) = self.release_inner() {
            warn!(dom = self.domid.0, "releasing a granted dma-buf: {e}");
        }
    }
}

impl fmt::Debug for ImportedDmaBuf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ImportedDmaBuf")
            .field("fd", &self.fd)
            .field("domid", &self.domid)
            .field("pages", &self.refs.len())
            .finish()
    }
}

#[cfg(test)]
mod tests;
