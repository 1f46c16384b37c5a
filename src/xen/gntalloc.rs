//! /dev/xen/gntalloc: granting our own (zeroed) pages to another domain.
//!
//! `IOCTL_GNTALLOC_ALLOC_GREF` allocates `count` pages, grants them to `domid` and
//! returns their grant refs plus an mmap offset (`index`) through which we map them.
//! Teardown: `munmap`, then `IOCTL_GNTALLOC_DEALLOC_GREF`; the kernel frees the pages
//! once the remote side has unmapped them too.

use std::mem::size_of;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::Path;
use std::sync::Arc;

use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

use super::gntdev::checked_len;
use super::ioctl::{ioc_none, ioctl, mmap_new, open_device};
use super::mem::MappedRegion;
use super::platform::{GrantAllocator, GrantedPages};
use super::types::{DomId, GrantRef, XenError};

/// ```c
/// struct ioctl_gntalloc_alloc_gref {
///     __u16 domid;        /* IN: domain given access */
///     __u16 flags;        /* IN: GNTALLOC_FLAG_WRITABLE */
///     __u32 count;        /* IN: number of pages */
///     __u64 index;        /* OUT: mmap offset */
///     __u32 gref_ids[1];  /* OUT: `count` grant refs */
/// };  /* sizeof == 24 (20 padded to 8) */
/// ```
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, IntoBytes, FromBytes, Immutable, KnownLayout)]
pub(crate) struct GntallocAllocGref {
    pub domid: u16,
    pub flags: u16,
    pub count: u32,
    pub index: u64,
    pub gref_ids: [u32; 1],
    /// Tail padding of the C struct, made explicit.
    pub pad: u32,
}

/// ```c
/// struct ioctl_gntalloc_dealloc_gref {
///     __u64 index;    /* IN: offset returned by ALLOC_GREF */
///     __u32 count;    /* IN */
/// };  /* sizeof == 16 (12 padded to 8) */
/// ```
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, IntoBytes, FromBytes, Immutable, KnownLayout)]
pub(crate) struct GntallocDeallocGref {
    pub index: u64,
    pub count: u32,
    /// Tail padding of the C struct, made explicit.
    pub pad: u32,
}

/// `#define GNTALLOC_FLAG_WRITABLE 1`
pub const GNTALLOC_FLAG_WRITABLE: u16 = 1;

/// Byte offset of `gref_ids[0]`.
const GREF_IDS_OFFSET: usize = 16;

/// `#define IOCTL_GNTALLOC_ALLOC_GREF _IOC(_IOC_NONE, 'G', 5, sizeof(struct ioctl_gntalloc_alloc_gref))`
/// sizeof == 24.
pub const IOCTL_GNTALLOC_ALLOC_GREF: u32 = 0x0018_4705;
/// `#define IOCTL_GNTALLOC_DEALLOC_GREF _IOC(_IOC_NONE, 'G', 6, sizeof(struct ioctl_gntalloc_dealloc_gref))`
/// sizeof == 16.
pub const IOCTL_GNTALLOC_DEALLOC_GREF: u32 = 0x0010_4706;

const _: () = {
    assert!(size_of::<GntallocAllocGref>() == 24);
    assert!(size_of::<GntallocDeallocGref>() == 16);
    assert!(IOCTL_GNTALLOC_ALLOC_GREF == ioc_none(b'G', 5, size_of::<GntallocAllocGref>()));
    assert!(IOCTL_GNTALLOC_DEALLOC_GREF == ioc_none(b'G', 6, size_of::<GntallocDeallocGref>()));
};

/// Build the ALLOC_GREF argument in a u64-aligned buffer with room for `count` refs
/// (and never less than the 24 bytes the kernel copies in).
pub(crate) fn build_alloc_request(
    domid: DomId,
    pages: usize,
    writable: bool,
) -> Result<Vec<u64>, XenError> {
    checked_len(pages)?;
    let count = u32::try_from(pages).map_err(|_| XenError::Invalid(format!("{pages} pages")))?;
    let bytes = pages
        .checked_mul(size_of::<u32>())
        .and_then(|n| n.checked_add(GREF_IDS_OFFSET))
        .ok_or_else(|| XenError::Invalid("alloc request size overflows".into()))?
        .max(size_of::<GntallocAllocGref>());
    let mut buf = vec![0u64; bytes.div_ceil(8)];
    let header = GntallocAllocGref {
        domid: domid.0,
        flags: if writable { GNTALLOC_FLAG_WRITABLE } else { 0 },
        count,
        ..Default::default()
    };
    buf.as_mut_bytes()[..GREF_IDS_OFFSET].copy_from_slice(&header.as_bytes()[..GREF_IDS_OFFSET]);
    Ok(buf)
}

/// The `index` and the first `pages` grant refs the kernel wrote into an alloc request.
pub(crate) fn parse_alloc_reply(buf: &[u64], pages: usize) -> Option<(u64, Vec<GrantRef>)> {
    let index = *buf.get(1)?;
    let ids = buf.as_bytes().get(GREF_IDS_OFFSET..)?;
    let refs: Vec<GrantRef> = ids
        .chunks_exact(size_of::<u32>())
        .take(pages)
        .map(|c| GrantRef(u32::from_ne_bytes([c[0], c[1], c[2], c[3]])))
        .collect();
    (refs.len() == pages).then_some((index, refs))
}

fn dealloc_gref(fd: RawFd, index: u64, count: u32) -> Result<(), XenError> {
    let mut arg = GntallocDeallocGref {
        index,
        count,
        pad: 0,
    };
    // SAFETY: `arg` is a live repr(C) struct of the size encoded in the ioctl number;
    // the kernel only reads it.
    unsafe {
        ioctl(
            fd,
            IOCTL_GNTALLOC_DEALLOC_GREF,
            &mut arg as *mut GntallocDeallocGref,
            "IOCTL_GNTALLOC_DEALLOC_GREF",
        )
    }?;
    Ok(())
}

/// One open of /dev/xen/gntalloc.
pub struct Gntalloc {
    fd: Arc<OwnedFd>,
}

impl Gntalloc {
    /// Default device path.
    pub const PATH: &'static str = "/dev/xen/gntalloc";

    /// Open /dev/xen/gntalloc.
    pub fn open() -> Result<Self, XenError> {
        Self::open_path(Path::new(Self::PATH))
    }

    /// Open a gntalloc device node at `path`.
    pub fn open_path(path: &Path) -> Result<Self, XenError> {
        let fd = open_device(path, 0, "open gntalloc")?;
        Ok(Gntalloc { fd: Arc::new(fd) })
    }
}

impl GrantAllocator for Gntalloc {
    fn alloc(&self, domid: DomId, pages: usize, writable: bool) -> Result<GrantedPages, XenError> {
        let len = checked_len(pages)?;
        let count =
            u32::try_from(pages).map_err(|_| XenError::Invalid(format!("{pages} pages")))?;
        let mut req = build_alloc_request(domid, pages, writable)?;
        let fd = self.fd.as_raw_fd();
        // SAFETY: `req` is a u64-aligned buffer with the header and room for `count`
        // grant ids, which is what the kernel reads and writes for this request.
        unsafe {
            ioctl(
                fd,
                IOCTL_GNTALLOC_ALLOC_GREF,
                req.as_mut_ptr(),
                "IOCTL_GNTALLOC_ALLOC_GREF",
            )
        }?;
        let Some((index, refs)) = parse_alloc_reply(&req, pages) else {
            return Err(XenError::Invalid("short gntalloc reply".into()));
        };
        let undo = |why: XenError| {
            if let Err(e) = dealloc_gref(fd, index, count) {
                tracing::warn!("gntalloc: undoing alloc at index {index:#x}: {e}");
            }
            why
        };
        let offset = libc::off_t::try_from(index).map_err(|_| {
            undo(XenError::Invalid(format!(
                "gntalloc index {index:#x} out of range"
            )))
        })?;
        let rw = libc::PROT_READ | libc::PROT_WRITE;
        let ptr = mmap_new(len, rw, libc::MAP_SHARED, fd, offset, "mmap gntalloc").map_err(undo)?;
        let keep_fd = Arc::clone(&self.fd);
        let release = move |p: *mut u8, _len: usize| {
            // SAFETY: unmapping exactly the mapping made above, once.
            if unsafe { libc::munmap(p.cast(), len) } != 0 {
                tracing::warn!(
                    "gntalloc: munmap of {pages} pages failed: {}",
                    std::io::Error::last_os_error()
                );
            }
            if let Err(e) = dealloc_gref(keep_fd.as_raw_fd(), index, count) {
                tracing::warn!("gntalloc: freeing {pages} grants at index {index:#x}: {e}");
            }
        };
        // SAFETY: `ptr..ptr+len` is our page-aligned read-write mapping of our own
        // pages, unmapped only by `release`.
        let region = unsafe { MappedRegion::from_raw(ptr, len, release) };
        Ok(GrantedPages { region, refs })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_numbers_match_the_headers() {
        assert_eq!(
            ioc_none(b'G', 5, size_of::<GntallocAllocGref>()),
            IOCTL_GNTALLOC_ALLOC_GREF
        );
        assert_eq!(
            ioc_none(b'G', 6, size_of::<GntallocDeallocGref>()),
            IOCTL_GNTALLOC_DEALLOC_GREF
        );
        assert_eq!(IOCTL_GNTALLOC_ALLOC_GREF, 0x0018_4705);
        assert_eq!(IOCTL_GNTALLOC_DEALLOC_GREF, 0x0010_4706);
    }

    #[test]
    fn alloc_request_layout_and_reply() {
        let mut buf = build_alloc_request(DomId(7), 3, true).unwrap();
        {
            let b = buf.as_bytes();
            assert_eq!(b.len(), 32); // 16 + 3*4 = 28, rounded to u64
            assert_eq!(&b[0..2], &7u16.to_ne_bytes());
            assert_eq!(&b[2..4], &GNTALLOC_FLAG_WRITABLE.to_ne_bytes());
            assert_eq!(&b[4..8], &3u32.to_ne_bytes());
            assert_eq!(&b[8..], &[0u8; 24]);
        }
        let b = buf.as_mut_bytes();
        b[8..16].copy_from_slice(&0x4000u64.to_ne_bytes());
        for (i, id) in [100u32, 101, 205].iter().enumerate() {
            b[16 + 4 * i..20 + 4 * i].copy_from_slice(&id.to_ne_bytes());
        }
        let (index, refs) = parse_alloc_reply(&buf, 3).unwrap();
        assert_eq!(index, 0x4000);
        assert_eq!(refs, vec![GrantRef(100), GrantRef(101), GrantRef(205)]);
        assert!(parse_alloc_reply(&buf, 5).is_none());
    }

    #[test]
    fn struct_layouts_match_the_c_headers() {
        let req = GntallocAllocGref {
            domid: 0x0102,
            flags: 1,
            count: 0x0a0b_0c0d,
            index: 0x1122_3344_5566_7788,
            gref_ids: [0xfeed_f00d],
            pad: 0,
        };
        let b = req.as_bytes();
        assert_eq!(&b[0..2], &0x0102u16.to_ne_bytes());
        assert_eq!(&b[4..8], &0x0a0b_0c0du32.to_ne_bytes());
        assert_eq!(&b[8..16], &0x1122_3344_5566_7788u64.to_ne_bytes());
        assert_eq!(&b[GREF_IDS_OFFSET..20], &0xfeed_f00du32.to_ne_bytes());
    }

    #[test]
    fn readonly_and_small_requests() {
        let buf = build_alloc_request(DomId(1), 1, false).unwrap();
        let b = buf.as_bytes();
        assert_eq!(b.len(), size_of::<GntallocAllocGref>());
        assert_eq!(&b[2..4], &0u16.to_ne_bytes());
        assert!(build_alloc_request(DomId(1), 0, true).is_err());
        assert!(build_alloc_request(DomId(1), (1 << 20) + 1, true).is_err());
    }

    #[test]
    fn missing_device_is_an_error() {
        assert!(Gntalloc::open_path(Path::new("/nonexistent/gntalloc")).is_err());
    }
}
