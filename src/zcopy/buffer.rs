//! Zero-copy display buffers and their release ("WAIT_FREE") rules.
//!
//! The guest ends foreign access to its pages right after the DBUF_DESTROY response,
//! so before answering, displback must drop every reference it holds on the exported
//! dma-buf and wait until gntdev has unmapped the grants ([`ZeroCopyBuffer::destroy`]).
//! Unlike displ_be, which answers 0 even when the wait timed out, the status says
//! whether the release really happened.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::warn;

use super::{DmaBufError, DmaBufFd, DmaBufOps, ExportedDmaBuf, ImportedDmaBuf};
use crate::backend::xen::PAGE_SIZE;
use crate::backend::{DomId, GrantRef};

/// The output's hold on a dma-buf (KMS: the GEM handle from `PRIME_FD_TO_HANDLE` and
/// every framebuffer made from it). Implemented by the output; the buffer calls it in
/// [`ZeroCopyBuffer::destroy`] and on Drop.
pub trait ScanoutImport: Send {
    /// Whether the buffer is being scanned out now, or a flip to it is still pending.
    fn on_screen(&self) -> bool;
    /// Stop scanning it out (disable the plane or flip away) and wait for that to be in
    /// effect, so the hardware no longer reads it.
    fn take_off_screen(&mut self) -> std::io::Result<()>;
    /// Drop every reference the output holds: framebuffers (RmFB), then the GEM handle
    /// (GEM_CLOSE). Called once; later calls must be no-ops.
    fn release(&mut self) -> std::io::Result<()>;
}

/// Why a display buffer's destruction is not a clean "released".
#[derive(Debug, thiserror::Error)]
pub enum DestroyError {
    /// Still referenced after the wait, and the scanout could not be stopped or an
    /// output reference could not be dropped.
    #[error("buffer still in use after {waited:?}: {why}")]
    Busy { waited: Duration, why: String },
    /// Someone else (a compositor, a leaked import) still holds it after the wait.
    #[error("buffer not released within {waited:?}")]
    TimedOut { waited: Duration },
    /// The wait itself failed.
    #[error("waiting for the release: {0}")]
    Wait(DmaBufError),
    /// Ending the guest's access to backend-allocated pages failed.
    #[error("ending the guest's access: {0}")]
    Release(DmaBufError),
}

impl DestroyError {
    /// The DBUF_DESTROY response status (negative errno).
    pub fn status(&self) -> i32 {
        -match self {
            DestroyError::Busy { .. } => libc::EBUSY,
            DestroyError::TimedOut { .. } => libc::ETIMEDOUT,
            DestroyError::Wait(e) | DestroyError::Release(e) => e.raw_errno(),
        }
    }
}

/// A guest-allocated display buffer shown without copying: the guest's grants exported
/// as a dma-buf, plus the output's imports of it.
///
/// Holds, in release order, the output's imports (framebuffers + GEM handles) and then
/// the export (our dma-buf fd). Dropping it releases both in that order without
/// waiting; [`ZeroCopyBuffer::destroy`] also waits for gntdev's release.
pub struct ZeroCopyBuffer {
    imports: Vec<Box<dyn ScanoutImport>>,
    export: Option<ExportedDmaBuf>,
}

impl std::fmt::Debug for ZeroCopyBuffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ZeroCopyBuffer")
            .field("imports", &self.imports.len())
            .field("export", &self.export)
            .finish()
    }
}

impl ZeroCopyBuffer {
    /// Wrap an export; the output adds its imports with [`ZeroCopyBuffer::add_import`].
    pub fn new(export: ExportedDmaBuf) -> Self {
        ZeroCopyBuffer {
            imports: Vec::new(),
            export: Some(export),
        }
    }

    /// The dma-buf to import into the output.
    pub fn dmabuf(&self) -> &DmaBufFd {
        self.export().fd()
    }

    /// The export (fd number, size).
    pub fn export(&self) -> &ExportedDmaBuf {
        self.export
            .as_ref()
            .expect("the export lives until destroy consumes self")
    }

    /// Record an output's hold on the buffer; released before our fd is closed.
    pub fn add_import(&mut self, import: Box<dyn ScanoutImport>) {
        self.imports.push(import);
    }

    /// Whether any import is on screen.
    pub fn on_screen(&self) -> bool {
        self.imports.iter().any(|i| i.on_screen())
    }

    /// DBUF_DESTROY: take the buffer off screen if it is still scanned out, drop the
    /// framebuffers and GEM handles, close our dma-buf fd, then wait up to `timeout`
    /// (keep it under the guest's 3000 ms; [`super::DEFAULT_RELEASE_TIMEOUT`]) for gntdev
    /// to release the grants. `Ok` only if they were released.
    pub fn destroy(mut self, timeout: Duration) -> Result<(), DestroyError> {
        let mut trouble: Vec<String> = Vec::new();
        for import in &mut self.imports {
            if import.on_screen() {
                if let Err(e) = import.take_off_screen() {
                    trouble.push(format!("taking it off screen: {e}"));
                }
            }
        }
        for mut import in self.imports.drain(..) {
            if let Err(e) = import.release() {
                trouble.push(format!("releasing the output's import: {e}"));
            }
        }
        let export = self.export.take().expect("present until destroy");
        let start = Instant::now();
        match export.wait_released(timeout) {
            Ok(()) => {
                for why in &trouble {
                    warn!("zero-copy buffer released despite an error {why}");
                }
                Ok(())
            }
            Err(e) if e.is_timeout() => {
                let waited = start.elapsed();
                if trouble.is_empty() {
                    Err(DestroyError::TimedOut { waited })
                } else {
                    Err(DestroyError::Busy {
                        waited,
                        why: trouble.join("; "),
                    })
                }
            }
            Err(e) => Err(DestroyError::Wait(e)),
        }
    }
}

impl Drop for ZeroCopyBuffer {
    fn drop(&mut self) {
        for mut import in self.imports.drain(..) {
            if let Err(e) = import.release() {
                warn!("releasing a zero-copy buffer's output import: {e}");
            }
        }
        // Then the export closes our fd (no wait: nobody is waiting for an answer).
        self.export.take();
    }
}

/// A KMS dumb buffer (for be-alloc), implemented by the output. Its
/// [`ScanoutImport::release`] removes its framebuffers and destroys the dumb buffer.
pub trait DumbBuffer: ScanoutImport {
    /// Allocated size in bytes (the kernel rounds it up to whole pages).
    fn size(&self) -> usize;
    /// Bytes per line the driver chose.
    fn pitch(&self) -> u32;
    /// `DRM_IOCTL_PRIME_HANDLE_TO_FD` (O_CLOEXEC | O_RDWR).
    fn prime_fd(&self) -> std::io::Result<DmaBufFd>;
}

/// Why a be-alloc buffer could not be made zero-copy (the caller falls back to gntalloc
/// pages and the copy path, or fails the request under `--zero-copy on`).
#[derive(Debug, thiserror::Error)]
pub enum BackendAllocError {
    /// No pitch travels in the protocol: the guest assumes `ceil(width*bpp/8)` and a
    /// buffer of exactly its page count, so a driver that pads lines can't be used.
    #[error("dumb buffer has pitch {pitch} and {size} bytes; the guest expects pitch {want_pitch} and {want_pages} pages")]
    Geometry {
        pitch: u32,
        size: usize,
        want_pitch: u32,
        want_pages: usize,
    },
    /// Creating the dumb buffer failed.
    #[error("creating a dumb buffer: {0}")]
    Create(std::io::Error),
    /// The driver cannot export it (`PRIME_HANDLE_TO_FD`).
    #[error("exporting the dumb buffer: {0}")]
    Prime(std::io::Error),
    /// IMP_TO_REFS refused it (no gntdev dma-buf, VRAM/IOMEM pages: EINVAL).
    #[error("{0}")]
    Import(DmaBufError),
}

impl BackendAllocError {
    /// The positive errno for a request that must fail.
    pub fn errno(&self) -> i32 {
        match self {
            BackendAllocError::Geometry { .. } => libc::EINVAL,
            BackendAllocError::Create(e) | BackendAllocError::Prime(e) => {
                e.raw_os_error().unwrap_or(libc::EIO)
            }
            BackendAllocError::Import(e) => e.raw_errno(),
        }
    }
}

/// A backend-allocated (be-alloc) display buffer in zero-copy form: a KMS dumb buffer
/// whose pages are granted to the guest through IMP_TO_REFS, so the guest draws
/// straight into what the output scans out.
pub struct BackendAllocBuffer {
    import: Option<ImportedDmaBuf>,
    dumb: Option<Box<dyn DumbBuffer>>,
}

impl std::fmt::Debug for BackendAllocBuffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BackendAllocBuffer")
            .field("import", &self.import)
            .finish()
    }
}

impl BackendAllocBuffer {
    /// Grant `dumb`'s pages to `domid`. The guest's page directory has `pages` slots and
    /// the guest assumes `pitch`-byte lines; `dumb` must match both.
    pub fn create(
        ops: Arc<dyn DmaBufOps>,
        dumb: Box<dyn DumbBuffer>,
        domid: DomId,
        pages: usize,
        pitch: u32,
    ) -> Result<Self, BackendAllocError> {
        if dumb.pitch() != pitch || dumb.size() != pages * PAGE_SIZE {
            return Err(BackendAllocError::Geometry {
                pitch: dumb.pitch(),
                size: dumb.size(),
                want_pitch: pitch,
                want_pages: pages,
            });
        }
        let fd = dumb.prime_fd().map_err(BackendAllocError::Prime)?;
        let import =
            ImportedDmaBuf::import(ops, fd, domid, pages).map_err(BackendAllocError::Import)?;
        Ok(BackendAllocBuffer {
            import: Some(import),
            dumb: Some(dumb),
        })
    }

    /// The refs to write into the guest's page directory.
    pub fn refs(&self) -> &[GrantRef] {
        self.import.as_ref().map_or(&[], |i| i.refs())
    }

    /// The dumb buffer, for the output to make framebuffers of and scan out.
    pub fn dumb(&self) -> &dyn DumbBuffer {
        self.dumb.as_deref().expect("present until destroy")
    }

    /// DBUF_DESTROY (the Linux frontend has unmapped the pages already): take it off
    /// screen, end the guest's access (IMP_RELEASE) and close the PRIME fd, then free the
    /// dumb buffer. Everything is freed even when a step fails; the error says which.
    pub fn destroy(mut self) -> Result<(), DestroyError> {
        self.teardown()
    }

    fn teardown(&mut self) -> Result<(), DestroyError> {
        let mut result = Ok(());
        let mut dumb = self.dumb.take();
        if let Some(d) = dumb.as_mut() {
            if d.on_screen() {
                if let Err(e) = d.take_off_screen() {
                    result = Err(DestroyError::Busy {
                        waited: Duration::ZERO,
                        why: format!("taking it off screen: {e}"),
                    });
                }
            }
        }
        if let Some(import) = self.import.take() {
            if let Err(e) = import.release() {
                if result.is_ok() {
                    result = Err(DestroyError::Release(e));
                }
            }
        }
        if let Some(mut d) = dumb {
            if let Err(e) = d.release() {
                warn!("freeing a be-alloc dumb buffer: {e}");
            }
        }
        result
    }
}

impl Drop for BackendAllocBuffer {
    fn drop(&mut self) {
        if let Err(e) = self.teardown() {
            warn!("dropping a be-alloc buffer: {e}");
        }
    }
}
