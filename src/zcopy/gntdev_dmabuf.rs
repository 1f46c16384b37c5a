//! The gntdev dma-buf ioctls (`CONFIG_XEN_GNTDEV_DMABUF`, Linux
//! `include/uapi/xen/gntdev.h`, `drivers/xen/gntdev-dmabuf.c`) over a gntdev fd.
//!
//! This is the only module of `zcopy` with `unsafe`: the `ioctl(2)` calls and taking
//! ownership of the fd EXP_FROM_REFS returns.
//!
//! The gntdev fd is held as an `Arc<OwnedFd>`; every [`super::ExportedDmaBuf`] and
//! [`super::ImportedDmaBuf`] holds an `Arc` of the [`GntdevDmaBuf`], so the gntdev file
//! (whose open instance owns the exports and imports) outlives every buffer.

use std::fs::OpenOptions;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

use super::{DmaBufError, DmaBufFd, DmaBufOps, ExportFlags};
use crate::backend::{DomId, GrantRef};

/// `#define GNTDEV_DMA_FLAG_WC (1 << 0)`
pub const GNTDEV_DMA_FLAG_WC: u32 = 1 << 0;
/// `#define GNTDEV_DMA_FLAG_COHERENT (1 << 1)`
pub const GNTDEV_DMA_FLAG_COHERENT: u32 = 1 << 1;

/// ```c
/// struct ioctl_gntdev_dmabuf_exp_from_refs {
///     __u32 flags;    /* IN */
///     __u32 count;    /* IN */
///     __u32 fd;       /* OUT */
///     __u32 domid;    /* IN */
///     __u32 refs[1];  /* IN, variable: count entries */
/// };
/// ```
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, IntoBytes, FromBytes, Immutable, KnownLayout)]
pub struct ExpFromRefs {
    pub flags: u32,
    pub count: u32,
    pub fd: u32,
    pub domid: u32,
    pub refs: [u32; 1],
}

/// ```c
/// struct ioctl_gntdev_dmabuf_exp_wait_released {
///     __u32 fd;
///     __u32 wait_to_ms;
/// };
/// ```
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, IntoBytes, FromBytes, Immutable, KnownLayout)]
pub struct ExpWaitReleased {
    pub fd: u32,
    pub wait_to_ms: u32,
}

/// ```c
/// struct ioctl_gntdev_dmabuf_imp_to_refs {
///     __u32 fd;        /* IN */
///     __u32 count;     /* IN */
///     __u32 domid;     /* IN */
///     __u32 reserved;  /* must be zero */
///     __u32 refs[1];   /* OUT, variable: count entries */
/// };
/// ```
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, IntoBytes, FromBytes, Immutable, KnownLayout)]
pub struct ImpToRefs {
    pub fd: u32,
    pub count: u32,
    pub domid: u32,
    pub reserved: u32,
    pub refs: [u32; 1],
}

/// ```c
/// struct ioctl_gntdev_dmabuf_imp_release {
///     __u32 fd;
///     __u32 reserved;
/// };
/// ```
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, IntoBytes, FromBytes, Immutable, KnownLayout)]
pub struct ImpRelease {
    pub fd: u32,
    pub reserved: u32,
}

/// Byte offset of `refs[]` in both variable-length structs (the fixed header's size).
pub const REFS_OFFSET: usize = 16;

// All four use `_IOC(_IOC_NONE, 'G', nr, size)` = `size << 16 | 'G' << 8 | nr` with
// `_IOC_NONE = 0` (x86, arm, arm64, riscv); the size counts the 1-element refs array.

/// `#define IOCTL_GNTDEV_DMABUF_EXP_FROM_REFS _IOC(_IOC_NONE, 'G', 9, sizeof(struct ioctl_gntdev_dmabuf_exp_from_refs))`
pub const IOCTL_GNTDEV_DMABUF_EXP_FROM_REFS: u32 = 0x0014_4709;
/// `#define IOCTL_GNTDEV_DMABUF_EXP_WAIT_RELEASED _IOC(_IOC_NONE, 'G', 10, sizeof(struct ioctl_gntdev_dmabuf_exp_wait_released))`
pub const IOCTL_GNTDEV_DMABUF_EXP_WAIT_RELEASED: u32 = 0x0008_470a;
/// `#define IOCTL_GNTDEV_DMABUF_IMP_TO_REFS _IOC(_IOC_NONE, 'G', 11, sizeof(struct ioctl_gntdev_dmabuf_imp_to_refs))`
pub const IOCTL_GNTDEV_DMABUF_IMP_TO_REFS: u32 = 0x0014_470b;
/// `#define IOCTL_GNTDEV_DMABUF_IMP_RELEASE _IOC(_IOC_NONE, 'G', 12, sizeof(struct ioctl_gntdev_dmabuf_imp_release))`
pub const IOCTL_GNTDEV_DMABUF_IMP_RELEASE: u32 = 0x0008_470c;

/// The largest page count one call may carry (gntdev has its own, lower, `limit`).
const MAX_COUNT: usize = 1 << 20;

/// `ioctl(fd, request, arg)` on a buffer of u32 words, retrying on EINTR.
fn ioctl_words(
    fd: RawFd,
    request: u32,
    words: &mut [u32],
    op: &'static str,
) -> Result<(), DmaBufError> {
    // SAFETY: `words` is a live, exclusively borrowed, 4-byte aligned buffer at least as
    // large as the struct `request` encodes (callers size it for `count` refs plus the
    // header); the kernel reads and writes only within that size.
    match unsafe { crate::backend::ioctl::ioctl(fd, request, words.as_mut_ptr(), op) } {
        Ok(_) => Ok(()),
        Err(crate::backend::XenError::Io { op, source }) => Err(DmaBufError { op, source }),
        Err(e) => Err(DmaBufError {
            op,
            source: std::io::Error::other(e.to_string()),
        }),
    }
}

/// A header struct followed by `count` u32 refs, as one word buffer.
fn with_refs<T: IntoBytes + Immutable>(head: &T, count: usize) -> Vec<u32> {
    let mut words = vec![0u32; REFS_OFFSET / 4 + count.max(1)];
    words.as_mut_bytes()[..REFS_OFFSET].copy_from_slice(&head.as_bytes()[..REFS_OFFSET]);
    words
}

/// The dma-buf ioctls on one gntdev open file.
#[derive(Debug)]
pub struct GntdevDmaBuf {
    dev: Arc<OwnedFd>,
    /// `/dev/null`, duplicated onto the numbers of closed exports still unreleased.
    null: OwnedFd,
    /// Numbers of exports whose release wait timed out, held until gntdev releases them.
    reserved: Mutex<Vec<OwnedFd>>,
}

impl GntdevDmaBuf {
    /// Use an already open gntdev file (e.g. the one the grant mapper uses).
    pub fn new(dev: Arc<OwnedFd>) -> std::io::Result<Self> {
        let null = OpenOptions::new().read(true).open("/dev/null")?;
        Ok(GntdevDmaBuf {
            dev,
            null: null.into(),
            reserved: Mutex::new(Vec::new()),
        })
    }

    /// Open `/dev/xen/gntdev` (or another path) for our own use.
    pub fn open(path: &Path) -> std::io::Result<Self> {
        let file = OpenOptions::new().read(true).write(true).open(path)?;
        Self::new(Arc::new(OwnedFd::from(file)))
    }

    fn fd(&self) -> RawFd {
        self.dev.as_raw_fd()
    }

    fn lock_reserved(&self) -> MutexGuard<'_, Vec<OwnedFd>> {
        self.reserved.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Fd numbers still reserved for exports that outlived their release wait.
    pub fn reserved_numbers(&self) -> usize {
        self.lock_reserved().len()
    }

    /// Free the numbers of stale exports gntdev has released since.
    fn reap(&self) {
        let mut reserved = self.lock_reserved();
        reserved.retain(|p| {
            let r = self.wait_ioctl(p.as_raw_fd(), Duration::ZERO);
            matches!(&r, Err(e) if e.is_timeout())
        });
    }

    /// EXP_WAIT_RELEASED by number; ENOENT (already released) is `Ok`.
    fn wait_ioctl(&self, number: RawFd, timeout: Duration) -> Result<(), DmaBufError> {
        const OP: &str = "IOCTL_GNTDEV_DMABUF_EXP_WAIT_RELEASED";
        let arg = ExpWaitReleased {
            fd: number as u32,
            wait_to_ms: timeout.as_millis().min(u128::from(u32::MAX)) as u32,
        };
        let mut words = [0u32; 2];
        words.as_mut_bytes().copy_from_slice(arg.as_bytes());
        match ioctl_words(
            self.fd(),
            IOCTL_GNTDEV_DMABUF_EXP_WAIT_RELEASED,
            &mut words,
            OP,
        ) {
            // Already released (or never ours): "must not be treated as error" (gntdev.h).
            Err(e) if e.raw_errno() == libc::ENOENT => Ok(()),
            r => r,
        }
    }
}

fn check_count(count: usize, op: &'static str) -> Result<u32, DmaBufError> {
    if count == 0 || count > MAX_COUNT {
        return Err(DmaBufError::errno(op, libc::EINVAL));
    }
    Ok(count as u32)
}

impl DmaBufOps for GntdevDmaBuf {
    fn export_from_refs(
        &self,
        domid: DomId,
        refs: &[GrantRef],
        flags: ExportFlags,
    ) -> Result<DmaBufFd, DmaBufError> {
        const OP: &str = "IOCTL_GNTDEV_DMABUF_EXP_FROM_REFS";
        let count = check_count(refs.len(), OP)?;
        let head = ExpFromRefs {
            flags: flags.bits(),
            count,
            fd: u32::MAX,
            domid: u32::from(domid.0),
            refs: [0],
        };
        self.reap();
        let mut words = with_refs(&head, refs.len());
        for (w, r) in words[REFS_OFFSET / 4..].iter_mut().zip(refs) {
            *w = r.0;
        }
        ioctl_words(self.fd(), IOCTL_GNTDEV_DMABUF_EXP_FROM_REFS, &mut words, OP)?;
        let (out, _) = ExpFromRefs::read_from_prefix(words.as_bytes())
            .map_err(|_| DmaBufError::errno(OP, libc::EIO))?;
        let raw = out.fd as RawFd;
        if raw < 0 {
            return Err(DmaBufError::errno(OP, libc::EIO));
        }
        // SAFETY: on success the kernel installed a new dma-buf fd (O_CLOEXEC) in our
        // table and returned its number; nothing else owns it yet.
        let owned = unsafe { OwnedFd::from_raw_fd(raw) };
        Ok(DmaBufFd::from_owned(owned))
    }

    fn wait_released(&self, fd: DmaBufFd, timeout: Duration) -> Result<(), DmaBufError> {
        const OP: &str = "IOCTL_GNTDEV_DMABUF_EXP_WAIT_RELEASED";
        let Some(owned) = fd.into_owned() else {
            return Err(DmaBufError::errno(OP, libc::EBADF));
        };
        let raw = owned.into_raw_fd();
        // Drop our dma-buf reference but keep the number: /dev/null takes its place.
        // SAFETY: `raw` is an fd we own (just released from its OwnedFd) and `null` is
        // open; dup2 atomically closes the dma-buf file at `raw` and reuses the number.
        let rc = unsafe { libc::dup2(self.null.as_raw_fd(), raw) };
        // SAFETY: either way `raw` is an open fd that nothing else owns: the placeholder
        // if dup2 worked, still the dma-buf if it did not (then it is closed right here).
        let placeholder = unsafe { OwnedFd::from_raw_fd(raw) };
        let placeholder = if rc < 0 {
            drop(placeholder);
            None
        } else {
            Some(placeholder)
        };
        self.reap();
        let result = self.wait_ioctl(raw, timeout);
        match (&result, placeholder) {
            (Err(e), Some(p)) if e.is_timeout() => self.lock_reserved().push(p),
            _ => {}
        }
        result
    }

    fn probe(&self) -> Result<(), DmaBufError> {
        // No export ever has number -1 (u32::MAX): ENOENT (Ok) where the ioctl exists.
        self.wait_ioctl(-1, Duration::ZERO)
    }

    fn import_to_refs(
        &self,
        dmabuf: &DmaBufFd,
        domid: DomId,
        count: usize,
    ) -> Result<Vec<GrantRef>, DmaBufError> {
        const OP: &str = "IOCTL_GNTDEV_DMABUF_IMP_TO_REFS";
        let n = check_count(count, OP)?;
        if dmabuf.as_fd().is_none() {
            // A simulated fd means nothing to the kernel.
            return Err(DmaBufError::errno(OP, libc::EBADF));
        }
        let head = ImpToRefs {
            fd: dmabuf.raw() as u32,
            count: n,
            domid: u32::from(domid.0),
            reserved: 0,
            refs: [0],
        };
        let mut words = with_refs(&head, count);
        ioctl_words(self.fd(), IOCTL_GNTDEV_DMABUF_IMP_TO_REFS, &mut words, OP)?;
        Ok(words[REFS_OFFSET / 4..REFS_OFFSET / 4 + count]
            .iter()
            .map(|&r| GrantRef(r))
            .collect())
    }

    fn import_release(&self, imported_fd: RawFd) -> Result<(), DmaBufError> {
        const OP: &str = "IOCTL_GNTDEV_DMABUF_IMP_RELEASE";
        let arg = ImpRelease {
            fd: imported_fd as u32,
            reserved: 0,
        };
        let mut words = [0u32; 2];
        words.as_mut_bytes().copy_from_slice(arg.as_bytes());
        ioctl_words(self.fd(), IOCTL_GNTDEV_DMABUF_IMP_RELEASE, &mut words, OP)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::size_of;

    use crate::backend::ioctl::ioc_none;

    #[test]
    fn ioctl_numbers_match_the_structs() {
        assert_eq!(
            ioc_none(b'G', 9, size_of::<ExpFromRefs>()),
            IOCTL_GNTDEV_DMABUF_EXP_FROM_REFS
        );
        assert_eq!(
            ioc_none(b'G', 10, size_of::<ExpWaitReleased>()),
            IOCTL_GNTDEV_DMABUF_EXP_WAIT_RELEASED
        );
        assert_eq!(
            ioc_none(b'G', 11, size_of::<ImpToRefs>()),
            IOCTL_GNTDEV_DMABUF_IMP_TO_REFS
        );
        assert_eq!(
            ioc_none(b'G', 12, size_of::<ImpRelease>()),
            IOCTL_GNTDEV_DMABUF_IMP_RELEASE
        );
    }

    #[test]
    fn refs_start_after_a_16_byte_header() {
        assert_eq!(
            size_of::<ExpFromRefs>() - size_of::<[u32; 1]>(),
            REFS_OFFSET
        );
        assert_eq!(size_of::<ImpToRefs>() - size_of::<[u32; 1]>(), REFS_OFFSET);
        let head = ExpFromRefs {
            flags: 1,
            count: 3,
            fd: 0xdead,
            domid: 7,
            refs: [0],
        };
        let w = with_refs(&head, 3);
        assert_eq!(w, vec![1, 3, 0xdead, 7, 0, 0, 0]);
        let imp = ImpToRefs {
            fd: 5,
            count: 2,
            domid: 9,
            reserved: 0,
            refs: [0],
        };
        assert_eq!(with_refs(&imp, 2), vec![5, 2, 9, 0, 0, 0]);
    }

    #[test]
    fn flags_are_the_header_bits() {
        assert_eq!(ExportFlags::None.bits(), 0);
        assert_eq!(ExportFlags::WriteCombine.bits(), 1);
        assert_eq!(ExportFlags::Coherent.bits(), 2);
    }

    #[test]
    fn a_non_gntdev_fd_refuses_the_ioctls() {
        // /dev/null has no ioctls: the probe's "not supported" answer (ENOTTY).
        let dev = GntdevDmaBuf::open(Path::new("/dev/null")).unwrap();
        assert_eq!(dev.probe().unwrap_err().raw_errno(), libc::ENOTTY);
        let e = dev
            .export_from_refs(DomId(1), &[GrantRef(8)], ExportFlags::None)
            .unwrap_err();
        assert_eq!(e.raw_errno(), libc::ENOTTY);
        let e = dev
            .export_from_refs(DomId(1), &[], ExportFlags::None)
            .unwrap_err();
        assert_eq!(e.raw_errno(), libc::EINVAL);
        assert_eq!(dev.import_release(3).unwrap_err().raw_errno(), libc::ENOTTY);
    }

    #[test]
    fn wait_released_drops_our_reference_first() {
        use std::io::Read;
        use std::os::unix::net::UnixStream;
        let dev = GntdevDmaBuf::open(Path::new("/dev/null")).unwrap();
        let (ours, mut peer) = UnixStream::pair().unwrap();
        let fd = DmaBufFd::from_owned(OwnedFd::from(ours));
        // /dev/null answers ENOTTY: not a timeout, so nothing stays reserved.
        let e = dev
            .wait_released(fd, Duration::from_millis(10))
            .unwrap_err();
        assert_eq!(e.raw_errno(), libc::ENOTTY);
        assert_eq!(dev.reserved_numbers(), 0);
        // Our end is closed: the peer reads EOF instead of blocking.
        peer.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut b = [0u8; 1];
        assert_eq!(peer.read(&mut b).unwrap(), 0);
    }
}
