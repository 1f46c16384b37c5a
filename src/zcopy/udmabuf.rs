//! Linux `udmabuf` (`/dev/udmabuf`, `CONFIG_UDMABUF`): memfd pages as a dma-buf.
//!
//! The simulated Xen's guest pages are memfd pages ([`crate::sim::grants`]), so this
//! turns a guest buffer into a real dma-buf of *the same pages* the guest draws into,
//! which the KMS output imports with `PRIME_FD_TO_HANDLE` exactly like a gntdev export
//! ([`super::sim::UdmabufExporter`] puts it behind [`super::DmaBufOps`]). The only
//! `unsafe` of it is here: the device's one ioctl.
//!
//! The kernel wants the memfd sealed against shrinking (`F_SEAL_SHRINK`) and not against
//! writes; each item is a page-aligned range of one memfd.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::path::Path;

/// The device node.
pub const DEVICE: &str = "/dev/udmabuf";

/// `UDMABUF_FLAGS_CLOEXEC`.
const UDMABUF_FLAGS_CLOEXEC: u32 = 0x01;

/// `_IOW('u', 0x43, struct udmabuf_create_list)` (the struct is 8 bytes: flags, count,
/// then the flexible item array).
const UDMABUF_CREATE_LIST: libc::c_ulong =
    (1 << 30) | (8 << 16) | ((b'u' as libc::c_ulong) << 8) | 0x43;

/// One range of a memfd (`struct udmabuf_create_item`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Item {
    /// Byte offset in the memfd (page-aligned).
    pub offset: u64,
    /// Length in bytes (whole pages).
    pub size: u64,
}

/// An open `/dev/udmabuf`.
#[derive(Debug)]
pub struct Udmabuf(File);

impl Udmabuf {
    /// Open [`DEVICE`]. `ENOENT` means the kernel lacks `CONFIG_UDMABUF` (or the module
    /// is not loaded).
    pub fn open() -> io::Result<Self> {
        Self::open_path(Path::new(DEVICE))
    }

    /// Open a udmabuf device at `path`.
    pub fn open_path(path: &Path) -> io::Result<Self> {
        let f = OpenOptions::new().read(true).write(true).open(path)?;
        Ok(Udmabuf(f))
    }

    /// `UDMABUF_CREATE_LIST`: one dma-buf of `items` of `memfd`, in order. The pages
    /// stay referenced by the dma-buf until its last holder closes it.
    pub fn create_list(&self, memfd: BorrowedFd<'_>, items: &[Item]) -> io::Result<OwnedFd> {
        if items.is_empty() || items.len() > u32::MAX as usize {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        // Header (flags, count) then 24-byte items (memfd, pad, offset, size), in u64s so
        // every field is naturally aligned.
        let mut buf: Vec<u64> = Vec::with_capacity(1 + 3 * items.len());
        buf.push(u64::from(UDMABUF_FLAGS_CLOEXEC) | (items.len() as u64) << 32);
        let fd = u64::from(memfd.as_raw_fd() as u32);
        for it in items {
            buf.extend([fd, it.offset, it.size]);
        }
        // SAFETY: UDMABUF_CREATE_LIST reads `struct udmabuf_create_list` with `count`
        // items following it; `buf` holds exactly that in the kernel's little-endian
        // layout on the platforms we build for (header: flags, count; each item: memfd,
        // pad, offset, size), stays alive and unmoved for the call, and the kernel only
        // reads it. The memfd is borrowed for the duration of the call.
        let ret = unsafe { libc::ioctl(self.0.as_raw_fd(), UDMABUF_CREATE_LIST, buf.as_ptr()) };
        if ret < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: on success the ioctl returns a new file descriptor nobody else owns.
        Ok(unsafe { OwnedFd::from_raw_fd(ret) })
    }
}

/// Ranges of whole pages `pages` (page indices in one memfd, in buffer order), with
/// runs of consecutive pages merged into one item.
pub fn items_for_pages(pages: &[u64], page_size: u64) -> Vec<Item> {
    let mut items: Vec<Item> = Vec::new();
    for &p in pages {
        let offset = p * page_size;
        match items.last_mut() {
            Some(last) if last.offset + last.size == offset => last.size += page_size,
            _ => items.push(Item {
                offset,
                size: page_size,
            }),
        }
    }
    items
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn consecutive_pages_merge_into_one_item() {
        let items = items_for_pages(&[4, 5, 6, 9, 10, 3], 4096);
        assert_eq!(
            items,
            vec![
                Item {
                    offset: 4 * 4096,
                    size: 3 * 4096
                },
                Item {
                    offset: 9 * 4096,
                    size: 2 * 4096
                },
                Item {
                    offset: 3 * 4096,
                    size: 4096
                },
            ]
        );
        assert!(items_for_pages(&[], 4096).is_empty());
    }

    #[test]
    fn the_ioctl_number_is_the_kernels() {
        // include/uapi/linux/udmabuf.h: _IOW('u', 0x43, struct udmabuf_create_list).
        assert_eq!(UDMABUF_CREATE_LIST, 0x4008_7543);
    }
}
