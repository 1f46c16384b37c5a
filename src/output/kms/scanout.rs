//! The card and our scan-out buffers: dumb buffers with a framebuffer and a persistent
//! CPU mapping, owned RAII-style (dropping a [`ScanBuf`] frees all three).

use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd};
use std::ptr::NonNull;
use std::sync::Arc;

use drm::buffer::{Buffer as _, DrmFourcc};
use drm::control::dumbbuffer::DumbBuffer;
use drm::control::{framebuffer, Device as ControlDevice};

use super::flip_queue::NBUF;
use super::mode::Placement;
use crate::displif::format::PixelFormat;
use crate::output::convert::Copier;
use crate::output::{Frame, OutputError};

/// A DRM card's device file, with the drm crate's device traits (also used by the
/// harness programs in `src/bin`).
pub struct Card(pub File);

impl AsFd for Card {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.0.as_fd()
    }
}

impl drm::Device for Card {}
impl ControlDevice for Card {}

/// A persistent CPU mapping of a dumb buffer (the drm crate's mapping borrows the
/// buffer and unmaps on drop; we keep ours for the buffer's whole life instead of
/// faulting the pages in again every frame).
struct DumbMap {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is plain shared memory owned by this value alone; moving it to
// another thread moves the only way to reach it.
unsafe impl Send for DumbMap {}

impl DumbMap {
    fn new(card: &Card, buffer: &DumbBuffer) -> std::io::Result<DumbMap> {
        let mut copy = *buffer;
        let mut mapping = card.map_dumb_buffer(&mut copy)?;
        let bytes: &mut [u8] = &mut mapping;
        let len = bytes.len();
        let ptr = NonNull::new(bytes.as_mut_ptr()).ok_or(std::io::ErrorKind::InvalidData)?;
        // Keep the mmap alive: from here on our Drop unmaps it.
        std::mem::forget(mapping);
        Ok(DumbMap { ptr, len })
    }

    fn bytes(&mut self) -> &mut [u8] {
        // SAFETY: `ptr..ptr+len` is a MAP_SHARED read/write mapping that stays mapped
        // until our Drop; `&mut self` makes this the only live reference into it. The
        // GEM object outlives the mapping (an mmap holds a reference), and the display
        // engine reading it concurrently is DMA, not a Rust access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for DumbMap {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly the range mmap returned (forgotten by the drm
        // crate's mapping), once; no slice into it outlives `&mut self`.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

/// One of our XRGB8888 scan-out buffers: a dumb buffer, its framebuffer and its CPU
/// mapping, freed together on drop.
pub(super) struct ScanBuf {
    card: Arc<Card>,
    db: DumbBuffer,
    pub(super) fb: framebuffer::Handle,
    map: Option<DumbMap>,
    /// The placement last drawn with: a different one first clears the borders.
    drawn: Option<Placement>,
}

impl ScanBuf {
    /// A `w` x `h` buffer with its framebuffer, mapped.
    pub(super) fn new(card: &Arc<Card>, w: u32, h: u32) -> std::io::Result<ScanBuf> {
        let db = card.create_dumb_buffer((w, h), DrmFourcc::Xrgb8888, 32)?;
        let fb = match card.add_framebuffer(&db, 24, 32) {
            Ok(fb) => fb,
            Err(e) => {
                let _ = card.destroy_dumb_buffer(db);
                return Err(e);
            }
        };
        // From here on Drop frees what exists.
        let mut buf = ScanBuf {
            card: Arc::clone(card),
            db,
            fb,
            map: None,
            drawn: None,
        };
        buf.map = Some(DumbMap::new(card, &db)?);
        Ok(buf)
    }

    /// [`NBUF`] buffers of `size` (all or none).
    pub(super) fn set(card: &Arc<Card>, (w, h): (u32, u32)) -> std::io::Result<Vec<ScanBuf>> {
        (0..NBUF).map(|_| ScanBuf::new(card, w, h)).collect()
    }

    fn bytes(&mut self) -> &mut [u8] {
        self.map.as_mut().map_or(&mut [], DumbMap::bytes)
    }

    /// Fill with black (a buffer shown in place of a guest's).
    pub(super) fn clear(&mut self) {
        self.bytes().fill(0);
        self.drawn = None;
    }

    /// Copy the visible part of `frame` into this `size` buffer: centred (letterboxed
    /// on black, or its centre cropped).
    pub(super) fn draw(
        &mut self,
        copier: &mut Copier,
        size: (u32, u32),
        frame: &Frame<'_>,
    ) -> Result<(), OutputError> {
        let even_x = frame.format == PixelFormat::Yuyv;
        let pl = Placement::centre(size.0, size.1, frame.width, frame.height, even_x);
        let sub = pl.crop(frame).ok_or(OutputError::Format(frame.format))?;
        let pitch = self.db.pitch() as usize;
        let start = pl
            .dst_offset(pitch)
            .ok_or(OutputError::Format(frame.format))?;
        let covers = pl.covers(size.0, size.1);
        let redraw_borders = self.drawn != Some(pl) && !covers;
        // Invalidate first: a failed copy must not leave "drawn" claiming clean borders.
        self.drawn = None;
        let bytes = self.bytes();
        if redraw_borders {
            bytes.fill(0);
        }
        let dst = bytes
            .get_mut(start..)
            .ok_or(OutputError::Format(frame.format))?;
        copier.copy_xrgb8888(&sub, dst, pitch)?;
        self.drawn = Some(pl);
        Ok(())
    }
}

impl Drop for ScanBuf {
    fn drop(&mut self) {
        if let Err(e) = self.card.destroy_framebuffer(self.fb) {
            tracing::debug!("destroying framebuffer: {e}");
        }
        drop(self.map.take());
        if let Err(e) = self.card.destroy_dumb_buffer(self.db) {
            tracing::debug!("destroying dumb buffer: {e}");
        }
    }
}
