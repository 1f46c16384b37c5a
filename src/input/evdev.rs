//! The evdev and inotify system interfaces, and nothing else: the only module of
//! `input` with `unsafe` (ioctls on an open evdev node, inotify syscalls). Reads go
//! through `std::fs::File` and are parsed from bytes with zerocopy.

use std::fs::{File, OpenOptions};
use std::io::{self, Read};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// `struct input_event` on 64-bit Linux (x86-64, arm64): a timeval, type, code, value.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable,
)]
#[repr(C)]
pub struct RawEvent {
    pub sec: i64,
    pub usec: i64,
    pub ty: u16,
    pub code: u16,
    pub value: i32,
}

const _: () = assert!(std::mem::size_of::<RawEvent>() == 24);

impl RawEvent {
    /// An event without a timestamp (tests, uinput writers).
    pub fn new(ty: u16, code: u16, value: i32) -> Self {
        RawEvent {
            sec: 0,
            usec: 0,
            ty,
            code,
            value,
        }
    }
}

/// `struct input_absinfo`.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable,
)]
#[repr(C)]
pub struct AbsInfo {
    pub value: i32,
    pub minimum: i32,
    pub maximum: i32,
    pub fuzz: i32,
    pub flat: i32,
    pub resolution: i32,
}

const IOC_WRITE: u64 = 1;
const IOC_READ: u64 = 2;

const fn ioc(dir: u64, nr: u64, size: u64) -> u64 {
    (dir << 30) | (size << 16) | ((b'E' as u64) << 8) | nr
}

/// `EVIOCGNAME(len)`.
const fn eviocgname(len: u64) -> u64 {
    ioc(IOC_READ, 0x06, len)
}
/// `EVIOCGABS(axis)`.
const fn eviocgabs(axis: u16) -> u64 {
    ioc(
        IOC_READ,
        0x40 + axis as u64,
        std::mem::size_of::<AbsInfo>() as u64,
    )
}
/// `EVIOCGBIT(EV_ABS, len)`.
const fn eviocgbit_abs(len: u64) -> u64 {
    ioc(IOC_READ, 0x20 + 0x03, len)
}
/// `EVIOCGRAB`.
const EVIOCGRAB: u64 = ioc(IOC_WRITE, 0x90, std::mem::size_of::<libc::c_int>() as u64);

/// An open evdev node (`/dev/input/eventN`), non-blocking.
pub struct Evdev {
    file: File,
}

impl Evdev {
    /// Open `path` read-only, non-blocking, close-on-exec.
    pub fn open(path: &Path) -> io::Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(path)?;
        Ok(Evdev { file })
    }

    /// Wrap an already open file (tests read events from a pipe).
    pub fn from_file(file: File) -> Self {
        Evdev { file }
    }

    /// The fd to poll.
    pub fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    /// The device's name (`EVIOCGNAME`).
    pub fn name(&self) -> io::Result<String> {
        let mut buf = [0u8; 256];
        // SAFETY: the kernel writes at most `buf.len()` bytes (the size encoded in the
        // request) into `buf`, which lives across the call.
        let rc = unsafe {
            libc::ioctl(
                self.file.as_raw_fd(),
                eviocgname(buf.len() as u64) as _,
                buf.as_mut_ptr(),
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        let end = buf.iter().position(|b| *b == 0).unwrap_or(buf.len());
        Ok(String::from_utf8_lossy(&buf[..end]).into_owned())
    }

    /// Whether the device reports absolute axis `axis` (`EVIOCGBIT(EV_ABS)`).
    pub fn has_abs(&self, axis: u16) -> bool {
        let mut bits = [0u8; 8];
        // SAFETY: the kernel writes at most `bits.len()` bytes into `bits`.
        let rc = unsafe {
            libc::ioctl(
                self.file.as_raw_fd(),
                eviocgbit_abs(bits.len() as u64) as _,
                bits.as_mut_ptr(),
            )
        };
        rc >= 0
            && bits
                .get(usize::from(axis / 8))
                .is_some_and(|b| b & (1 << (axis % 8)) != 0)
    }

    /// The range of absolute axis `axis` (`EVIOCGABS`).
    pub fn abs_info(&self, axis: u16) -> io::Result<AbsInfo> {
        let mut info = AbsInfo::default();
        // SAFETY: `info` is a `struct input_absinfo` (size encoded in the request) the
        // kernel fills; it lives across the call.
        let rc = unsafe {
            libc::ioctl(
                self.file.as_raw_fd(),
                eviocgabs(axis) as _,
                &mut info as *mut AbsInfo,
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(info)
    }

    /// Take (or release) the device exclusively (`EVIOCGRAB`): nobody else in the
    /// backend domain sees its events.
    pub fn grab(&self, on: bool) -> io::Result<()> {
        // SAFETY: EVIOCGRAB takes its argument by value; no memory is passed.
        let rc =
            unsafe { libc::ioctl(self.file.as_raw_fd(), EVIOCGRAB as _, libc::c_int::from(on)) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Read what is available (non-blocking) into `out`. `Ok(false)`: the device is gone
    /// (ENODEV or end of file). A short trailing record is counted in `partial`.
    pub fn read_events(&mut self, out: &mut Vec<RawEvent>, partial: &mut u64) -> io::Result<bool> {
        let mut buf = [0u8; 24 * 64];
        loop {
            match self.file.read(&mut buf) {
                Ok(0) => return Ok(false),
                Ok(n) => {
                    let mut chunks = buf[..n].chunks_exact(24);
                    for c in &mut chunks {
                        if let Ok(ev) = RawEvent::read_from_bytes(c) {
                            out.push(ev);
                        }
                    }
                    if !chunks.remainder().is_empty() {
                        *partial += 1;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(true),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.raw_os_error() == Some(libc::ENODEV) => return Ok(false),
                Err(e) => return Err(e),
            }
        }
    }
}

/// An inotify instance watching one directory for new entries.
pub struct DirWatch {
    fd: OwnedFd,
}

impl DirWatch {
    /// Watch `dir` for created, moved-in and attribute-changed entries (udev creates the
    /// node, then fixes its permissions).
    pub fn new(dir: &Path) -> io::Result<Self> {
        // SAFETY: no pointers; returns a new fd or -1.
        let raw = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` is a fresh fd we own from here on.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let path = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes())
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        let mask = libc::IN_CREATE | libc::IN_MOVED_TO | libc::IN_ATTRIB | libc::IN_DELETE;
        // SAFETY: `path` is a NUL-terminated string alive across the call.
        let wd = unsafe { libc::inotify_add_watch(fd.as_raw_fd(), path.as_ptr(), mask) };
        if wd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(DirWatch { fd })
    }

    /// The fd to poll.
    pub fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// Drain pending notifications; true if there were any.
    pub fn drain(&self) -> bool {
        let mut any = false;
        let mut buf = [0u8; 4096];
        loop {
            // SAFETY: reading at most `buf.len()` bytes into `buf`, alive across the call.
            let n = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if n <= 0 {
                return any;
            }
            any = true;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_numbers_match_linux() {
        // From <linux/input.h> on x86-64 / arm64.
        assert_eq!(eviocgname(256), 0x8100_4506);
        assert_eq!(eviocgabs(0x35), 0x8018_4575);
        assert_eq!(EVIOCGRAB, 0x4004_4590);
        assert_eq!(eviocgbit_abs(8), 0x8008_4523);
    }

    #[test]
    fn events_are_read_from_a_stream_and_eof_is_gone() {
        let path = std::env::temp_dir().join(format!("displback-evdev-{}", std::process::id()));
        let evs = [RawEvent::new(1, 30, 1), RawEvent::new(0, 0, 0)];
        let mut bytes: Vec<u8> = evs.iter().flat_map(|e| e.as_bytes().to_vec()).collect();
        bytes.extend_from_slice(&[1, 2, 3]);
        std::fs::write(&path, &bytes).unwrap();
        let mut dev = Evdev::open(&path).unwrap();
        let _ = std::fs::remove_file(&path);
        let mut out = Vec::new();
        let mut partial = 0;
        let alive = dev.read_events(&mut out, &mut partial).unwrap();
        assert!(!alive, "end of stream = gone");
        assert_eq!(out, evs);
        assert_eq!(partial, 1);
        // Not an evdev node: the ioctls fail cleanly.
        assert!(dev.name().is_err());
        assert!(dev.abs_info(0).is_err());
    }
}
