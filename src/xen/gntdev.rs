//! /dev/xen/gntdev: mapping a foreign domain's grant references into our address space.
//!
//! Flow (as libxengnttab does it): `IOCTL_GNTDEV_MAP_GRANT_REF` with all N refs in one
//! call returns an mmap offset (`index`); one `mmap(N pages, MAP_SHARED, fd, index)`
//! maps them contiguously. Teardown is `munmap` first, then `IOCTL_GNTDEV_UNMAP_GRANT_REF`
//! with the same index and count; the release hook of the returned
//! [`MappedRegion`] does both and keeps the gntdev fd alive until then.

use std::mem::size_of;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

use super::ioctl::{ioc_none, ioctl, mmap_new, open_device};
use super::mem::MappedRegion;
use super::platform::{GrantMapper, PAGE_SIZE};
use super::types::{DomId, GrantRef, XenError};

/// Refuse to map more pages than this in one request (hostile or corrupt counts).
pub const MAX_MAP_PAGES: usize = 1 << 20;

/// `struct ioctl_gntdev_grant_ref { __u32 domid; __u32 ref; };` (8 bytes)
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, IntoBytes, FromBytes, Immutable, KnownLayout)]
pub(crate) struct GntdevGrantRef {
    pub domid: u32,
    pub gref: u32,
}

/// ```c
/// struct ioctl_gntdev_map_grant_ref {
///     __u32 count;    /* IN */
///     __u32 pad;
///     __u64 index;    /* OUT: mmap offset */
///     struct ioctl_gntdev_grant_ref refs[1];  /* IN, `count` entries */
/// };  /* sizeof == 24 */
/// ```
/// This is the 1-element form used for the ioctl number; the call itself passes a
/// buffer with `count` trailing refs starting at byte 16.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, IntoBytes, FromBytes, Immutable, KnownLayout)]
pub(crate) struct GntdevMapGrantRef {
    pub count: u32,
    pub pad: u32,
    pub index: u64,
    pub refs: [GntdevGrantRef; 1],
}

/// ```c
/// struct ioctl_gntdev_unmap_grant_ref {
///     __u64 index;    /* IN: the offset returned by MAP_GRANT_REF */
///     __u32 count;    /* IN */
///     __u32 pad;
/// };  /* sizeof == 16 */
/// ```
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, IntoBytes, FromBytes, Immutable, KnownLayout)]
pub(crate) struct GntdevUnmapGrantRef {
    pub index: u64,
    pub count: u32,
    pub pad: u32,
}

/// Byte offset of `refs[0]` in the map request.
const MAP_REFS_OFFSET: usize = 16;

/// `#define IOCTL_GNTDEV_MAP_GRANT_REF _IOC(_IOC_NONE, 'G', 0, sizeof(struct ioctl_gntdev_map_grant_ref))`
/// sizeof == 24.
pub const IOCTL_GNTDEV_MAP_GRANT_REF: u32 = 0x0018_4700;
/// `#define IOCTL_GNTDEV_UNMAP_GRANT_REF _IOC(_IOC_NONE, 'G', 1, sizeof(struct ioctl_gntdev_unmap_grant_ref))`
/// sizeof == 16.
pub const IOCTL_GNTDEV_UNMAP_GRANT_REF: u32 = 0x0010_4701;

const _: () = {
    assert!(size_of::<GntdevGrantRef>() == 8);
    assert!(size_of::<GntdevMapGrantRef>() == 24);
    assert!(size_of::<GntdevUnmapGrantRef>() == 16);
    assert!(IOCTL_GNTDEV_MAP_GRANT_REF == ioc_none(b'G', 0, size_of::<GntdevMapGrantRef>()));
    assert!(IOCTL_GNTDEV_UNMAP_GRANT_REF == ioc_none(b'G', 1, size_of::<GntdevUnmapGrantRef>()));
};

/// Validate a page count for one map/alloc request and return its length in bytes.
/// Bad counts are EINVAL, as the kernel reports them.
pub(crate) fn checked_len(pages: usize) -> Result<usize, XenError> {
    if pages == 0 || pages > MAX_MAP_PAGES {
        return Err(XenError::Io {
            op: "grant page count out of range (1..=1<<20)",
            source: std::io::Error::from_raw_os_error(libc::EINVAL),
        });
    }
    // Cannot overflow: pages <= 1<<20.
    Ok(pages.saturating_mul(PAGE_SIZE))
}

/// Build the MAP_GRANT_REF argument: header plus `refs.len()` entries, in a u64-aligned
/// buffer the kernel may write `index` into.
pub(crate) fn build_map_request(domid: DomId, refs: &[GrantRef]) -> Result<Vec<u64>, XenError> {
    checked_len(refs.len())?;
    let count =
        u32::try_from(refs.len()).map_err(|_| XenError::Invalid(format!("{} refs", refs.len())))?;
    let bytes = refs
        .len()
        .checked_mul(size_of::<GntdevGrantRef>())
        .and_then(|n| n.checked_add(MAP_REFS_OFFSET))
        .ok_or_else(|| XenError::Invalid("map request size overflows".into()))?
        .max(size_of::<GntdevMapGrantRef>());
    let mut buf = vec![0u64; bytes.div_ceil(8)];
    let raw = buf.as_mut_bytes();
    let header = GntdevMapGrantRef {
        count,
        ..Default::default()
    };
    raw[..MAP_REFS_OFFSET].copy_from_slice(&header.as_bytes()[..MAP_REFS_OFFSET]);
    for (slot, r) in raw[MAP_REFS_OFFSET..]
        .chunks_exact_mut(size_of::<GntdevGrantRef>())
        .zip(refs)
    {
        let entry = GntdevGrantRef {
            domid: u32::from(domid.0),
            gref: r.0,
        };
        slot.copy_from_slice(entry.as_bytes());
    }
    Ok(buf)
}

/// The `index` the kernel wrote into a map request buffer.
pub(crate) fn map_request_index(buf: &[u64]) -> u64 {
    // `index` is the second u64 of the header (byte offset 8).
    buf.get(1).copied().unwrap_or(0)
}

fn unmap_grant_ref(fd: RawFd, index: u64, count: u32) -> Result<(), XenError> {
    let mut arg = GntdevUnmapGrantRef {
        index,
        count,
        pad: 0,
    };
    // SAFETY: `arg` is a live repr(C) struct of exactly the size encoded in the ioctl
    // number; the kernel only reads it.
    unsafe {
        ioctl(
            fd,
            IOCTL_GNTDEV_UNMAP_GRANT_REF,
            &mut arg as *mut GntdevUnmapGrantRef,
            "IOCTL_GNTDEV_UNMAP_GRANT_REF",
        )
    }?;
    Ok(())
}

/// One open of /dev/xen/gntdev.
pub struct Gntdev {
    fd: Arc<OwnedFd>,
    mapped: Arc<AtomicUsize>,
}

impl Gntdev {
    /// Default device path.
    pub const PATH: &'static str = "/dev/xen/gntdev";

    /// Open /dev/xen/gntdev.
    pub fn open() -> Result<Self, XenError> {
        Self::open_path(Path::new(Self::PATH))
    }

    /// Open a gntdev device node at `path`.
    pub fn open_path(path: &Path) -> Result<Self, XenError> {
        let fd = open_device(path, 0, "open gntdev")?;
        Ok(Gntdev {
            fd: Arc::new(fd),
            mapped: Arc::new(AtomicUsize::new(0)),
        })
    }

    /// The gntdev fd, for the dma-buf ioctls issued on the same open file.
    pub fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl GrantMapper for Gntdev {
    /// Map `refs` of `domid` contiguously. With `writable == false` the pages are mapped
    /// PROT_READ only and the caller must never write through the region.
    fn map(
        &self,
        domid: DomId,
        refs: &[GrantRef],
        writable: bool,
    ) -> Result<MappedRegion, XenError> {
        let len = checked_len(refs.len())?;
        let count = u32::try_from(refs.len())
            .map_err(|_| XenError::Invalid(format!("{} refs", refs.len())))?;
        let mut req = build_map_request(domid, refs)?;
        let fd = self.fd.as_raw_fd();
        // SAFETY: `req` is a u64-aligned buffer holding the header and `count` refs, as
        // the kernel reads (and writes `index` into) for this request.
        unsafe {
            ioctl(
                fd,
                IOCTL_GNTDEV_MAP_GRANT_REF,
                req.as_mut_ptr(),
                "IOCTL_GNTDEV_MAP_GRANT_REF",
            )
        }?;
        let index = map_request_index(&req);
        let Ok(offset) = libc::off_t::try_from(index) else {
            if let Err(e) = unmap_grant_ref(fd, index, count) {
                tracing::warn!("gntdev: undoing map at index {index:#x}: {e}");
            }
            return Err(XenError::Invalid(format!(
                "gntdev index {index:#x} out of range"
            )));
        };
        let prot = if writable {
            libc::PROT_READ | libc::PROT_WRITE
        } else {
            libc::PROT_READ
        };
        let ptr = match mmap_new(len, prot, libc::MAP_SHARED, fd, offset, "mmap gntdev") {
            Ok(p) => p,
            Err(err) => {
                if let Err(e) = unmap_grant_ref(fd, index, count) {
                    tracing::warn!("gntdev: undoing map at index {index:#x}: {e}");
                }
                return Err(err);
            }
        };
        self.mapped.fetch_add(refs.len(), Ordering::Relaxed);
        let keep_fd = Arc::clone(&self.fd);
        let mapped = Arc::clone(&self.mapped);
        let pages = refs.len();
        let release = move |p: *mut u8, _len: usize| {
            // SAFETY: unmapping exactly the mapping made above, once (release hooks run
            // once, from MappedRegion's Drop).
            if unsafe { libc::munmap(p.cast(), len) } != 0 {
                tracing::warn!(
                    "gntdev: munmap of {pages} pages failed: {}",
                    std::io::Error::last_os_error()
                );
            }
            if let Err(e) = unmap_grant_ref(keep_fd.as_raw_fd(), index, count) {
                tracing::warn!("gntdev: unmapping {pages} grants at index {index:#x}: {e}");
            }
            mapped.fetch_sub(pages, Ordering::Relaxed);
        };
        // SAFETY: `ptr..ptr+len` is our page-aligned mapping, readable (and writable iff
        // `writable`, which the trait makes the caller's contract), and stays mapped until
        // `release` unmaps it.
        Ok(unsafe { MappedRegion::from_raw(ptr, len, release) })
    }

    fn mapped_pages(&self) -> usize {
        self.mapped.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_numbers_match_the_headers() {
        assert_eq!(
            ioc_none(b'G', 0, size_of::<GntdevMapGrantRef>()),
            IOCTL_GNTDEV_MAP_GRANT_REF
        );
        assert_eq!(
            ioc_none(b'G', 1, size_of::<GntdevUnmapGrantRef>()),
            IOCTL_GNTDEV_UNMAP_GRANT_REF
        );
        assert_eq!(IOCTL_GNTDEV_MAP_GRANT_REF, 0x0018_4700);
        assert_eq!(IOCTL_GNTDEV_UNMAP_GRANT_REF, 0x0010_4701);
    }

    #[test]
    fn map_request_layout() {
        let refs = [GrantRef(8), GrantRef(9), GrantRef(0xdead_beef)];
        let buf = build_map_request(DomId(5), &refs).unwrap();
        let b = buf.as_bytes();
        assert_eq!(b.len(), 16 + 3 * 8);
        assert_eq!(&b[0..4], &3u32.to_ne_bytes());
        assert_eq!(&b[4..16], &[0u8; 12]);
        for (i, r) in refs.iter().enumerate() {
            let o = 16 + 8 * i;
            assert_eq!(&b[o..o + 4], &5u32.to_ne_bytes());
            assert_eq!(&b[o + 4..o + 8], &r.0.to_ne_bytes());
        }
        // The kernel writes `index` at byte 8.
        let mut buf = buf;
        buf.as_mut_bytes()[8..16].copy_from_slice(&0x1234_5000u64.to_ne_bytes());
        assert_eq!(map_request_index(&buf), 0x1234_5000);
    }

    #[test]
    fn struct_layouts_match_the_c_headers() {
        let req = GntdevMapGrantRef {
            count: 1,
            pad: 0,
            index: 0x0102_0304_0506_0708,
            refs: [GntdevGrantRef {
                domid: 0x1111_1111,
                gref: 0x2222_2222,
            }],
        };
        let b = req.as_bytes();
        assert_eq!(&b[8..16], &0x0102_0304_0506_0708u64.to_ne_bytes());
        assert_eq!(&b[MAP_REFS_OFFSET..20], &0x1111_1111u32.to_ne_bytes());
        assert_eq!(&b[20..24], &0x2222_2222u32.to_ne_bytes());
        let unmap = GntdevUnmapGrantRef {
            index: 7,
            count: 9,
            pad: 0,
        };
        assert_eq!(&unmap.as_bytes()[8..12], &9u32.to_ne_bytes());
    }

    #[test]
    fn single_ref_buffer_covers_the_ioctl_size() {
        let buf = build_map_request(DomId(1), &[GrantRef(8)]).unwrap();
        assert!(buf.as_bytes().len() >= size_of::<GntdevMapGrantRef>());
    }

    #[test]
    fn hostile_counts_are_refused() {
        assert!(build_map_request(DomId(1), &[]).is_err());
        let many = vec![GrantRef(8); MAX_MAP_PAGES + 1];
        assert!(build_map_request(DomId(1), &many).is_err());
        assert!(checked_len(MAX_MAP_PAGES).is_ok());
        assert!(checked_len(0).is_err());
    }

    #[test]
    fn missing_device_is_an_error() {
        assert!(Gntdev::open_path(Path::new("/nonexistent/gntdev")).is_err());
    }
}
