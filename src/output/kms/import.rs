//! Buffers imported into the card for zero-copy scan-out (PRIME imports and be-alloc
//! dumb buffers) and their framebuffers.

use std::sync::Arc;

use drm::buffer::{Buffer as _, DrmFourcc, DrmModifier, PlanarBuffer};
use drm::control::dumbbuffer::DumbBuffer;
use drm::control::Device as ControlDevice;

use super::Card;
use crate::backend::xen::PAGE_SIZE;
use crate::output::ImportedFb;
use crate::zcopy::{DmaBufFd, ScanoutImport};

/// A dma-buf imported into the card (or a be-alloc dumb buffer), and its framebuffers.
pub(super) struct KmsImport {
    pub(super) handle: drm::buffer::Handle,
    /// A PRIME import: GEM_CLOSE on release. A be-alloc dumb buffer's handle is freed
    /// by its [`KmsDumb`] instead.
    pub(super) close_handle: bool,
    pub(super) fbs: Vec<ImportedFb>,
}

/// A guest framebuffer in an imported buffer, for AddFB2.
pub(super) struct Planar {
    pub(super) size: (u32, u32),
    pub(super) format: DrmFourcc,
    pub(super) pitch: u32,
    pub(super) offset: u32,
    pub(super) handle: drm::buffer::Handle,
}

impl PlanarBuffer for Planar {
    fn size(&self) -> (u32, u32) {
        self.size
    }
    fn format(&self) -> DrmFourcc {
        self.format
    }
    fn modifier(&self) -> Option<DrmModifier> {
        None
    }
    fn pitches(&self) -> [u32; 4] {
        [self.pitch, 0, 0, 0]
    }
    fn handles(&self) -> [Option<drm::buffer::Handle>; 4] {
        [Some(self.handle), None, None, None]
    }
    fn offsets(&self) -> [u32; 4] {
        [self.offset, 0, 0, 0]
    }
}

/// A be-alloc dumb buffer of the card. The [`Kms`] output takes it off screen and
/// removes its framebuffers ([`Output::release_import`]); this frees the buffer itself.
pub(super) struct KmsDumb {
    pub(super) card: Arc<Card>,
    pub(super) db: DumbBuffer,
    pub(super) freed: bool,
}

impl ScanoutImport for KmsDumb {
    fn on_screen(&self) -> bool {
        false // Output::release_import ran first
    }
    fn take_off_screen(&mut self) -> std::io::Result<()> {
        Ok(())
    }
    fn release(&mut self) -> std::io::Result<()> {
        if std::mem::replace(&mut self.freed, true) {
            return Ok(());
        }
        self.card.destroy_dumb_buffer(self.db)
    }
}

impl crate::zcopy::DumbBuffer for KmsDumb {
    fn size(&self) -> usize {
        // CREATE_DUMB rounds `pitch * height` up to whole pages.
        (self.db.pitch() as usize * self.db.size().1 as usize).next_multiple_of(PAGE_SIZE)
    }
    fn pitch(&self) -> u32 {
        self.db.pitch()
    }
    fn prime_fd(&self) -> std::io::Result<DmaBufFd> {
        let flags = (libc::O_CLOEXEC | libc::O_RDWR) as u32;
        let fd = self.card.buffer_to_prime_fd(self.db.handle(), flags)?;
        Ok(DmaBufFd::from_owned(fd))
    }
}

impl Drop for KmsDumb {
    fn drop(&mut self) {
        if let Err(e) = self.release() {
            tracing::debug!("freeing a be-alloc dumb buffer: {e}");
        }
    }
}
