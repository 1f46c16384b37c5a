//! Our side of a connector's `wl_shm` buffers: one unlinked file in shared memory holding
//! a few equally sized slots, written with `pwrite` (no mapping on our side). The file
//! outlives Wayland connections, so after a reconnect the last picture can be shown again.

use std::fs::File;
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::PathBuf;

/// Geometry of every slot of a store.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geometry {
    pub width: u32,
    pub height: u32,
    /// Bytes per line (a multiple of 4).
    pub stride: u32,
    /// The wl_shm format code (0 = ARGB8888, 1 = XRGB8888, else the DRM fourcc).
    pub shm_format: u32,
}

impl Geometry {
    /// Bytes of one slot; `None` on overflow.
    pub fn slot_bytes(&self) -> Option<usize> {
        (self.stride as usize).checked_mul(self.height as usize)
    }
}

/// Slots per connector: on screen, committed, queued, and one the compositor is slow
/// to release.
pub const SLOTS: usize = 4;

/// A connector's buffer file.
pub struct Store {
    pub file: File,
    pub geo: Geometry,
    /// Changes whenever the file is replaced; `wl_buffer`s carry it.
    pub gen: u64,
    /// Slot `i` is held by the compositor (attached and not yet released).
    pub held: [bool; SLOTS],
}

/// Where to create buffer files: /dev/shm, else `$XDG_RUNTIME_DIR`, else /tmp.
fn dirs() -> Vec<PathBuf> {
    let mut v = vec![PathBuf::from("/dev/shm")];
    if let Some(d) = std::env::var_os("XDG_RUNTIME_DIR") {
        v.push(PathBuf::from(d));
    }
    v.push(std::env::temp_dir());
    v
}

/// An anonymous (O_TMPFILE, never linked) read-write file of `len` bytes.
fn anonymous_file(len: usize) -> io::Result<File> {
    let mut last = io::Error::from_raw_os_error(libc::ENOENT);
    for dir in dirs() {
        match std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_TMPFILE | libc::O_CLOEXEC)
            .mode(0o600)
            .open(&dir)
        {
            Ok(f) => {
                f.set_len(len as u64)?;
                return Ok(f);
            }
            Err(e) => last = e,
        }
    }
    Err(last)
}

impl Store {
    /// A store of [`SLOTS`] slots of `geo`.
    pub fn new(geo: Geometry, gen: u64) -> io::Result<Self> {
        let slot = geo
            .slot_bytes()
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EOVERFLOW))?;
        let len = slot
            .checked_mul(SLOTS)
            .filter(|l| i32::try_from(*l).is_ok())
            .ok_or_else(|| io::Error::from_raw_os_error(libc::E2BIG))?;
        Ok(Store {
            file: anonymous_file(len)?,
            geo,
            gen,
            held: [false; SLOTS],
        })
    }

    /// Total file size (fits an i32, checked at creation).
    pub fn file_len(&self) -> usize {
        self.geo.slot_bytes().unwrap_or(0) * SLOTS
    }

    /// Byte offset of slot `i`.
    pub fn offset(&self, i: usize) -> usize {
        self.geo.slot_bytes().unwrap_or(0) * i
    }

    /// Write a whole slot's image.
    pub fn write(&self, slot: usize, pixels: &[u8]) -> io::Result<()> {
        self.file.write_all_at(pixels, self.offset(slot) as u64)
    }

    /// Read a whole slot's image back (tests, debugging).
    pub fn read(&self, slot: usize) -> io::Result<Vec<u8>> {
        let mut v = vec![0; self.geo.slot_bytes().unwrap_or(0)];
        self.file.read_exact_at(&mut v, self.offset(slot) as u64)?;
        Ok(v)
    }

    /// The compositor lost every buffer (a new connection): nothing is held.
    pub fn forget_held(&mut self) {
        self.held = [false; SLOTS];
    }
}
