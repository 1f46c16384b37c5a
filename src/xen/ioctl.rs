//! The one place the Xen device modules (evtchn, gntdev, gntalloc, gntdev dma-buf) open
//! device nodes, issue ioctls and create mappings.

use std::os::fd::{OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::ptr::NonNull;

use super::types::XenError;

/// `_IOC(_IOC_NONE, type, nr, size)` as on x86, Arm and Arm64 (`_IOC_NONE == 0`,
/// size in bits 16..30, type in bits 8..16, nr in bits 0..8).
pub(crate) const fn ioc_none(ty: u8, nr: u8, size: usize) -> u32 {
    ((size as u32) << 16) | ((ty as u32) << 8) | nr as u32
}

/// `ioctl(fd, request, arg)`, retried on EINTR; the non-negative result, or the OS error
/// named by `op`.
///
/// # Safety
/// `arg` must be null for an ioctl without argument, or point to live memory that is at
/// least as large as what the kernel reads and writes for `request` (the struct the
/// request number encodes, plus any trailing array its header announces), and that
/// nothing else accesses during the call.
pub(crate) unsafe fn ioctl<T>(
    fd: RawFd,
    request: u32,
    arg: *mut T,
    op: &'static str,
) -> Result<libc::c_int, XenError> {
    loop {
        // SAFETY: forwarded from this function's contract.
        let rc = unsafe { libc::ioctl(fd, request as libc::Ioctl, arg) };
        if rc >= 0 {
            return Ok(rc);
        }
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::EINTR) {
            return Err(XenError::Io { op, source: err });
        }
    }
}

/// Open a Xen device node read-write and close-on-exec, plus `extra` open flags.
pub(crate) fn open_device(
    path: &Path,
    extra: libc::c_int,
    op: &'static str,
) -> Result<OwnedFd, XenError> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC | extra)
        .open(path)
        .map(OwnedFd::from)
        .map_err(|source| XenError::Io { op, source })
}

/// A new mapping, `mmap(NULL, len, prot, flags, fd, offset)`; the error is named by `op`.
/// Never `MAP_FIXED`: the kernel picks fresh address space, so no existing memory is
/// touched. The caller owns the mapping and unmaps it.
pub(crate) fn mmap_new(
    len: usize,
    prot: libc::c_int,
    flags: libc::c_int,
    fd: RawFd,
    offset: libc::off_t,
    op: &'static str,
) -> Result<NonNull<u8>, XenError> {
    if flags & libc::MAP_FIXED != 0 {
        return Err(XenError::Invalid(format!(
            "{op}: mmap_new never maps at a fixed address"
        )));
    }
    // SAFETY: no MAP_FIXED (checked above), so this only creates a new mapping.
    let ptr = unsafe { libc::mmap(std::ptr::null_mut(), len, prot, flags, fd, offset) };
    match NonNull::new(ptr.cast::<u8>()) {
        Some(p) if ptr != libc::MAP_FAILED => Ok(p),
        _ => Err(XenError::last_os(op)),
    }
}
