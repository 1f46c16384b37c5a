//! Memory shared with a guest: granted pages mapped into our address space.
//!
//! The guest can change these bytes at any moment, so no Rust reference ever points
//! into a mapping. Everything goes through [`MappedRegion`]'s copy-in/copy-out and
//! atomic accessors; callers validate the private copies they get.

use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

/// An offset/length that falls outside the mapping.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("access at {offset}+{len} is outside a {size}-byte mapping")]
pub struct OutOfBounds {
    pub offset: usize,
    pub len: usize,
    pub size: usize,
}

type Release = Box<dyn FnOnce(*mut u8, usize) + Send + Sync>;

/// A mapping of (granted or shared) pages, unmapped by its release hook on Drop.
pub struct MappedRegion {
    ptr: NonNull<u8>,
    len: usize,
    release: Option<Release>,
    /// How many times bytes were copied out (tests prove each request is read once).
    copies_out: AtomicU64,
}

// SAFETY: the region is plain shared memory; every access goes through raw-pointer
// copies or atomics, which are sound to do from any thread.
unsafe impl Send for MappedRegion {}
// SAFETY: as above; no `&`-access hands out references into the memory.
unsafe impl Sync for MappedRegion {}

impl std::fmt::Debug for MappedRegion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "MappedRegion({:p}, {} bytes)", self.ptr, self.len)
    }
}

impl MappedRegion {
    /// Wrap a mapping.
    ///
    /// # Safety
    /// `ptr..ptr+len` must be readable and writable (or readable only, if the caller never
    /// writes through this value) memory that stays mapped until `release` is called with
    /// the same pointer and length; `ptr` must be 4-byte aligned.
    pub unsafe fn from_raw(
        ptr: NonNull<u8>,
        len: usize,
        release: impl FnOnce(*mut u8, usize) + Send + Sync + 'static,
    ) -> Self {
        debug_assert_eq!(ptr.as_ptr() as usize % 4, 0);
        MappedRegion {
            ptr,
            len,
            release: Some(Box::new(release)),
            copies_out: AtomicU64::new(0),
        }
    }

    /// Size in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True if the mapping is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Number of [`MappedRegion::read`] calls so far.
    pub fn copies_out(&self) -> u64 {
        self.copies_out.load(Ordering::Relaxed)
    }

    /// Start address, for identification in logs and for the output's fast copies.
    pub fn as_ptr(&self) -> *const u8 {
        self.ptr.as_ptr()
    }

    fn check(&self, offset: usize, len: usize) -> Result<(), OutOfBounds> {
        match offset.checked_add(len) {
            Some(end) if end <= self.len => Ok(()),
            _ => Err(OutOfBounds {
                offset,
                len,
                size: self.len,
            }),
        }
    }

    /// Copy `dst.len()` bytes at `offset` out of the mapping.
    pub fn read(&self, offset: usize, dst: &mut [u8]) -> Result<(), OutOfBounds> {
        self.check(offset, dst.len())?;
        self.copies_out.fetch_add(1, Ordering::Relaxed);
        // SAFETY: bounds checked above; the source is mapped for our lifetime and `dst`
        // is private memory that cannot overlap a foreign mapping.
        unsafe {
            std::ptr::copy_nonoverlapping(
                self.ptr.as_ptr().add(offset),
                dst.as_mut_ptr(),
                dst.len(),
            )
        };
        Ok(())
    }

    /// [`MappedRegion::read`] for destinations the CPU will not read back soon (a
    /// scan-out buffer, a frame image): on x86_64 the bulk is written with
    /// non-temporal stores, which skip reading the destination's cache lines first and
    /// leave the cache to others (~1.5x faster than memcpy for a 1280x720 frame here:
    /// `benches/copy.rs`). Each source byte is still read exactly once.
    pub fn read_stream(&self, offset: usize, dst: &mut [u8]) -> Result<(), OutOfBounds> {
        self.check(offset, dst.len())?;
        self.copies_out.fetch_add(1, Ordering::Relaxed);
        // SAFETY: bounds checked above: `offset..offset + dst.len()` lies in the
        // mapping, which stays mapped for our lifetime; `dst` is private memory that
        // cannot overlap it.
        unsafe { stream_copy(self.ptr.as_ptr().add(offset), dst) };
        Ok(())
    }

    /// Copy `src` into the mapping at `offset`.
    pub fn write(&self, offset: usize, src: &[u8]) -> Result<(), OutOfBounds> {
        self.check(offset, src.len())?;
        // SAFETY: bounds checked above; the mapping is writable per `from_raw`'s contract.
        unsafe {
            std::ptr::copy_nonoverlapping(src.as_ptr(), self.ptr.as_ptr().add(offset), src.len())
        };
        Ok(())
    }

    /// Fill `len` bytes at `offset` with `byte`.
    pub fn fill(&self, offset: usize, len: usize, byte: u8) -> Result<(), OutOfBounds> {
        self.check(offset, len)?;
        // SAFETY: bounds checked above; the mapping is writable per `from_raw`'s contract.
        unsafe { std::ptr::write_bytes(self.ptr.as_ptr().add(offset), byte, len) };
        Ok(())
    }

    fn atomic_u32(&self, offset: usize) -> &AtomicU32 {
        assert!(
            offset % 4 == 0 && self.check(offset, 4).is_ok(),
            "bad ring index offset {offset}"
        );
        // SAFETY: in bounds and 4-byte aligned (the base is aligned per `from_raw`);
        // an AtomicU32 has the layout of u32 and tolerates concurrent foreign writes.
        unsafe { &*(self.ptr.as_ptr().add(offset) as *const AtomicU32) }
    }

    /// Load a shared ring index with acquire ordering (reads after it see the peer's data).
    pub fn load_u32(&self, offset: usize) -> u32 {
        self.atomic_u32(offset).load(Ordering::Acquire)
    }

    /// Store a shared ring index with release ordering (the peer sees our data first).
    pub fn store_u32(&self, offset: usize, value: u32) {
        self.atomic_u32(offset).store(value, Ordering::Release)
    }
}

/// Full barrier between our index store and our re-read of the peer's index (`xen_mb`).
pub fn full_barrier() {
    std::sync::atomic::fence(Ordering::SeqCst);
}

impl Drop for MappedRegion {
    fn drop(&mut self) {
        if let Some(release) = self.release.take() {
            if crate::harness_broken::is(crate::harness_broken::Mode::LeakMaps) {
                // The harness self-test's defect: the mapping outlives its owner.
                std::mem::forget(release);
                return;
            }
            release(self.ptr.as_ptr(), self.len);
        }
    }
}

/// Copy `dst.len()` bytes from `src` into `dst`, the bulk with non-temporal stores on
/// x86_64 (a plain copy elsewhere), fenced so the stores are visible before anything
/// after them.
///
/// # Safety
/// `src..src + dst.len()` must be readable and must not overlap `dst`.
unsafe fn stream_copy(src: *const u8, dst: &mut [u8]) {
    let len = dst.len();
    let d = dst.as_mut_ptr();
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{__m128i, _mm_loadu_si128, _mm_sfence, _mm_stream_si128};
        // Plain copy up to the first 16-byte aligned destination byte.
        let head = d.align_offset(16).min(len);
        // SAFETY: `head <= len`: within both ranges (the caller's contract).
        unsafe { std::ptr::copy_nonoverlapping(src, d, head) };
        let mut i = head;
        while i + 64 <= len {
            // SAFETY: `i + 64 <= len` keeps all four 16-byte loads and stores within
            // both ranges; `d + i` is 16-byte aligned (`head` aligned it, steps are 64),
            // as `_mm_stream_si128` requires; loads may be unaligned (`loadu`). SSE2 is
            // part of the x86_64 baseline.
            unsafe {
                let a = _mm_loadu_si128(src.add(i).cast::<__m128i>());
                let b = _mm_loadu_si128(src.add(i + 16).cast::<__m128i>());
                let c = _mm_loadu_si128(src.add(i + 32).cast::<__m128i>());
                let e = _mm_loadu_si128(src.add(i + 48).cast::<__m128i>());
                _mm_stream_si128(d.add(i).cast::<__m128i>(), a);
                _mm_stream_si128(d.add(i + 16).cast::<__m128i>(), b);
                _mm_stream_si128(d.add(i + 32).cast::<__m128i>(), c);
                _mm_stream_si128(d.add(i + 48).cast::<__m128i>(), e);
            }
            i += 64;
        }
        // SAFETY: a store fence has no memory-safety preconditions (SSE, baseline).
        #[allow(unused_unsafe)]
        unsafe {
            _mm_sfence()
        };
        // SAFETY: `i <= len`: the tail lies within both ranges.
        unsafe { std::ptr::copy_nonoverlapping(src.add(i), d.add(i), len - i) };
    }
    #[cfg(not(target_arch = "x86_64"))]
    // SAFETY: the caller's contract.
    unsafe {
        std::ptr::copy_nonoverlapping(src, d, len)
    };
}

/// Anonymous private memory, page aligned; for tests and local buffers.
pub fn anonymous(len: usize) -> std::io::Result<MappedRegion> {
    let flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS;
    map_new_region(len, flags, -1, "mmap anonymous")
}

/// `len` bytes of a file opened read-write (a dma-buf, for example), mapped shared.
pub fn shared(fd: std::os::fd::BorrowedFd<'_>, len: usize) -> std::io::Result<MappedRegion> {
    use std::os::fd::AsRawFd;
    map_new_region(len, libc::MAP_SHARED, fd.as_raw_fd(), "mmap shared")
}

/// A new read-write mapping of `len` bytes (at least one page) as a [`MappedRegion`].
fn map_new_region(
    len: usize,
    flags: libc::c_int,
    fd: std::os::fd::RawFd,
    op: &'static str,
) -> std::io::Result<MappedRegion> {
    let map_len = len.max(1);
    let rw = libc::PROT_READ | libc::PROT_WRITE;
    let ptr = super::ioctl::mmap_new(map_len, rw, flags, fd, 0, op).map_err(|e| match e {
        super::XenError::Io { source, .. } => source,
        other => std::io::Error::other(other.to_string()),
    })?;
    let release = move |p: *mut u8, _| {
        // SAFETY: unmapping exactly what mmap returned above, once.
        unsafe { libc::munmap(p.cast(), map_len) };
    };
    // SAFETY: the mapping is ours, RW, page aligned and unmapped only by the release hook.
    Ok(unsafe { MappedRegion::from_raw(ptr, len, release) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_stream_copies_exactly_like_read() {
        let m = anonymous(3 * 4096).unwrap();
        let pattern: Vec<u8> = (0..3 * 4096).map(|i| (i * 7 + i / 251) as u8).collect();
        m.write(0, &pattern).unwrap();
        // Every source offset and destination misalignment mod 16, lengths around the
        // 64-byte blocks and the head/tail splits; guard bytes around the destination.
        for len in [0usize, 1, 15, 16, 17, 63, 64, 65, 127, 200, 4096, 8191] {
            for off in [0usize, 1, 5, 16, 4095] {
                if off + len > m.len() {
                    continue;
                }
                for mis in 0..16 {
                    let mut buf = vec![0xeeu8; len + 32];
                    m.read_stream(off, &mut buf[mis..mis + len]).unwrap();
                    assert_eq!(
                        &buf[mis..mis + len],
                        &pattern[off..off + len],
                        "{len} {off} {mis}"
                    );
                    assert!(
                        buf[..mis].iter().all(|&b| b == 0xee),
                        "before {len} {off} {mis}"
                    );
                    assert!(
                        buf[mis + len..].iter().all(|&b| b == 0xee),
                        "after {len} {off} {mis}"
                    );
                }
            }
        }
        assert!(m.read_stream(3 * 4096 - 4, &mut [0u8; 5]).is_err());
    }

    #[test]
    fn bounds_are_checked_without_overflow() {
        let m = anonymous(4096).unwrap();
        let mut b = [0u8; 8];
        assert!(m.read(4088, &mut b).is_ok());
        assert!(m.read(4089, &mut b).is_err());
        assert!(m.read(usize::MAX - 2, &mut b).is_err());
        m.write(8, &[1, 2, 3, 4]).unwrap();
        m.read(8, &mut b[..4]).unwrap();
        assert_eq!(&b[..4], &[1, 2, 3, 4]);
        m.store_u32(0, 7);
        assert_eq!(m.load_u32(0), 7);
    }
}
