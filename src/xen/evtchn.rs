//! /dev/xen/evtchn: inter-domain event channels.
//!
//! One open file carries every port we bind. `read()` yields the u32 local ports that
//! fired; each stays masked until the same u32 is written back (unmask, a "late EOI"
//! since XSA-332). If the kernel's ring overflows, `read()` fails with EFBIG until
//! `IOCTL_EVTCHN_RESET`; we then treat every bound port as pending, which is always
//! safe for ring-based protocols (a spurious kick only makes the consumer re-check).

use std::collections::BTreeSet;
use std::mem::size_of;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::Path;

use super::ioctl::{ioc_none, ioctl, open_device};
use super::platform::EventChannels;
use super::types::{DomId, EvtchnPort, XenError};

/// `struct ioctl_evtchn_bind_interdomain { unsigned int remote_domain, remote_port; };`
/// (8 bytes)
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct EvtchnBindInterdomain {
    pub remote_domain: u32,
    pub remote_port: u32,
}

/// `struct ioctl_evtchn_unbind { unsigned int port; };` (4 bytes)
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct EvtchnUnbind {
    pub port: u32,
}

/// `struct ioctl_evtchn_notify { unsigned int port; };` (4 bytes)
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct EvtchnNotify {
    pub port: u32,
}

/// `#define IOCTL_EVTCHN_BIND_INTERDOMAIN _IOC(_IOC_NONE, 'E', 1, sizeof(struct ioctl_evtchn_bind_interdomain))`
/// sizeof == 8. The ioctl's return value is the new local port.
pub const IOCTL_EVTCHN_BIND_INTERDOMAIN: u32 = 0x0008_4501;
/// `#define IOCTL_EVTCHN_UNBIND _IOC(_IOC_NONE, 'E', 3, sizeof(struct ioctl_evtchn_unbind))`
/// sizeof == 4.
pub const IOCTL_EVTCHN_UNBIND: u32 = 0x0004_4503;
/// `#define IOCTL_EVTCHN_NOTIFY _IOC(_IOC_NONE, 'E', 4, sizeof(struct ioctl_evtchn_notify))`
/// sizeof == 4.
pub const IOCTL_EVTCHN_NOTIFY: u32 = 0x0004_4504;
/// `#define IOCTL_EVTCHN_RESET _IOC(_IOC_NONE, 'E', 5, 0)` (no argument): clears the
/// event ring and its overflow condition.
pub const IOCTL_EVTCHN_RESET: u32 = 0x0000_4505;

const _: () = {
    assert!(size_of::<EvtchnBindInterdomain>() == 8);
    assert!(size_of::<EvtchnUnbind>() == 4);
    assert!(size_of::<EvtchnNotify>() == 4);
    assert!(IOCTL_EVTCHN_BIND_INTERDOMAIN == ioc_none(b'E', 1, size_of::<EvtchnBindInterdomain>()));
    assert!(IOCTL_EVTCHN_UNBIND == ioc_none(b'E', 3, size_of::<EvtchnUnbind>()));
    assert!(IOCTL_EVTCHN_NOTIFY == ioc_none(b'E', 4, size_of::<EvtchnNotify>()));
    assert!(IOCTL_EVTCHN_RESET == ioc_none(b'E', 5, 0));
};

/// Ports read or written per syscall (the kernel caps one transfer at a page).
const PORTS_PER_IO: usize = 1024;
/// Upper bound on read() calls per `pending()`, so a misbehaving device cannot keep us
/// here forever (fired ports stay masked until we write them back, so a sane kernel
/// runs dry long before this).
const MAX_READS: usize = 64;

/// One open of /dev/xen/evtchn.
pub struct XenEvtchn {
    fd: OwnedFd,
    bound: BTreeSet<u32>,
}

impl XenEvtchn {
    /// Default device path.
    pub const PATH: &'static str = "/dev/xen/evtchn";

    /// Open /dev/xen/evtchn (non-blocking).
    pub fn open() -> Result<Self, XenError> {
        Self::open_path(Path::new(Self::PATH))
    }

    /// Open an evtchn device node at `path` (non-blocking).
    pub fn open_path(path: &Path) -> Result<Self, XenError> {
        let fd = open_device(path, libc::O_NONBLOCK, "open evtchn")?;
        Ok(XenEvtchn {
            fd,
            bound: BTreeSet::new(),
        })
    }

    /// Local ports currently bound through this handle.
    pub fn bound_ports(&self) -> impl Iterator<Item = EvtchnPort> + '_ {
        self.bound.iter().map(|&p| EvtchnPort(p))
    }

    fn ioctl_port(&self, request: u32, port: u32, op: &'static str) -> Result<(), XenError> {
        // Unbind and notify share the `{ unsigned int port; }` layout.
        let mut arg = EvtchnNotify { port };
        let fd = self.fd.as_raw_fd();
        // SAFETY: `arg` is a live repr(C) struct of the size encoded in `request`; the
        // kernel only reads it.
        unsafe { ioctl(fd, request, &mut arg as *mut EvtchnNotify, op) }?;
        Ok(())
    }

    fn reset(&self) -> Result<(), XenError> {
        let fd = self.fd.as_raw_fd();
        // SAFETY: IOCTL_EVTCHN_RESET takes no argument.
        unsafe {
            ioctl(
                fd,
                IOCTL_EVTCHN_RESET,
                std::ptr::null_mut::<u8>(),
                "IOCTL_EVTCHN_RESET",
            )
        }?;
        Ok(())
    }

    /// Read fired ports until EAGAIN or a short read. Returns `Ok(true)` on ring overflow (EFBIG).
    fn drain(&self, fired: &mut Vec<u32>) -> Result<bool, XenError> {
        let fd = self.fd.as_raw_fd();
        let mut buf = [0u32; PORTS_PER_IO];
        for _ in 0..MAX_READS {
            // SAFETY: `buf` is writable for its full byte size.
            let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), std::mem::size_of_val(&buf)) };
            if n < 0 {
                let err = std::io::Error::last_os_error();
                match err.raw_os_error() {
                    Some(libc::EINTR) => continue,
                    Some(libc::EAGAIN) => return Ok(false),
                    Some(libc::EFBIG) => return Ok(true),
                    _ => {
                        return Err(XenError::Io {
                            op: "read evtchn",
                            source: err,
                        })
                    }
                }
            }
            let ports = usize::try_from(n).unwrap_or(0) / size_of::<u32>();
            if ports == 0 {
                return Ok(false);
            }
            fired.extend_from_slice(&buf[..ports.min(PORTS_PER_IO)]);
            if ports < PORTS_PER_IO {
                // A short read took all there was: a port firing later wakes the
                // (edge-triggered) poll again, so no read that would only say EAGAIN.
                return Ok(false);
            }
        }
        Ok(false)
    }

    /// Write ports back to unmask them.
    fn unmask(&self, ports: &[u32]) -> Result<(), XenError> {
        let fd = self.fd.as_raw_fd();
        for chunk in ports.chunks(PORTS_PER_IO) {
            let mut done = 0usize;
            let total = std::mem::size_of_val(chunk);
            while done < total {
                // SAFETY: `chunk` is readable for `total` bytes and `done < total`.
                let n = unsafe {
                    libc::write(
                        fd,
                        chunk.as_ptr().cast::<u8>().add(done).cast(),
                        total - done,
                    )
                };
                if n < 0 {
                    let err = std::io::Error::last_os_error();
                    if err.raw_os_error() == Some(libc::EINTR) {
                        continue;
                    }
                    return Err(XenError::Io {
                        op: "write evtchn (unmask)",
                        source: err,
                    });
                }
                match usize::try_from(n) {
                    Ok(0) | Err(_) => {
                        return Err(XenError::Invalid("evtchn unmask wrote nothing".into()))
                    }
                    Ok(n) => done = done.saturating_add(n),
                }
            }
        }
        Ok(())
    }
}

impl EventChannels for XenEvtchn {
    fn bind_interdomain(
        &mut self,
        remote: DomId,
        remote_port: EvtchnPort,
    ) -> Result<EvtchnPort, XenError> {
        let mut arg = EvtchnBindInterdomain {
            remote_domain: u32::from(remote.0),
            remote_port: remote_port.0,
        };
        let fd = self.fd.as_raw_fd();
        let op = "IOCTL_EVTCHN_BIND_INTERDOMAIN";
        // SAFETY: `arg` is a live repr(C) struct of the size encoded in the number.
        let rc = unsafe {
            ioctl(
                fd,
                IOCTL_EVTCHN_BIND_INTERDOMAIN,
                &mut arg as *mut EvtchnBindInterdomain,
                op,
            )
        }?;
        // The ioctl's return value is the new local port.
        let local =
            u32::try_from(rc).map_err(|_| XenError::Invalid(format!("{op} returned {rc}")))?;
        self.bound.insert(local);
        Ok(EvtchnPort(local))
    }

    fn unbind(&mut self, local: EvtchnPort) -> Result<(), XenError> {
        // Forget the port whatever the kernel says: it is not ours to report any more.
        self.bound.remove(&local.0);
        self.ioctl_port(IOCTL_EVTCHN_UNBIND, local.0, "IOCTL_EVTCHN_UNBIND")
    }

    fn notify(&self, local: EvtchnPort) -> Result<(), XenError> {
        self.ioctl_port(IOCTL_EVTCHN_NOTIFY, local.0, "IOCTL_EVTCHN_NOTIFY")
    }

    fn pending(&mut self, out: &mut Vec<EvtchnPort>) -> Result<(), XenError> {
        let mut fired = Vec::new();
        // Ports read before a failure are still reported and unmasked.
        let mut result = match self.drain(&mut fired) {
            Ok(false) => Ok(()),
            Ok(true) => {
                tracing::warn!(
                    "evtchn: event ring overflowed; treating all bound ports as pending"
                );
                // Fired ports we never read are still masked: unmask every bound port
                // (writing an unmasked port is harmless) and report them all.
                fired.extend(self.bound.iter().copied());
                self.reset()
            }
            Err(e) => Err(e),
        };
        fired.sort_unstable();
        fired.dedup();
        if let Err(e) = self.unmask(&fired) {
            result = result.and(Err(e));
        }
        out.extend(fired.into_iter().map(EvtchnPort));
        result
    }

    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_numbers_match_the_headers() {
        let cases = [
            (
                IOCTL_EVTCHN_BIND_INTERDOMAIN,
                1,
                size_of::<EvtchnBindInterdomain>(),
                0x0008_4501,
            ),
            (
                IOCTL_EVTCHN_UNBIND,
                3,
                size_of::<EvtchnUnbind>(),
                0x0004_4503,
            ),
            (
                IOCTL_EVTCHN_NOTIFY,
                4,
                size_of::<EvtchnNotify>(),
                0x0004_4504,
            ),
            (IOCTL_EVTCHN_RESET, 5, 0, 0x0000_4505),
        ];
        for (value, nr, size, expected) in cases {
            assert_eq!(ioc_none(b'E', nr, size), value);
            assert_eq!(value, expected);
        }
    }

    #[test]
    fn missing_device_is_an_error() {
        assert!(XenEvtchn::open_path(Path::new("/nonexistent/evtchn")).is_err());
    }
}
