//! A uinput device (`/dev/uinput`): the harness's Dom0 replays a fixed script of input
//! through a keyboard and a touchscreen made with it. ioctls only here (`unsafe`).

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;

use zerocopy::{Immutable, IntoBytes, KnownLayout};

use super::evdev::{AbsInfo, RawEvent};

const fn iow(nr: u64, size: u64) -> u64 {
    (1 << 30) | (size << 16) | ((b'U' as u64) << 8) | nr
}
const UI_DEV_CREATE: u64 = (b'U' as u64) << 8 | 1;
const UI_DEV_DESTROY: u64 = (b'U' as u64) << 8 | 2;
const UI_DEV_SETUP: u64 = iow(3, std::mem::size_of::<Setup>() as u64);
const UI_ABS_SETUP: u64 = iow(4, std::mem::size_of::<AbsSetup>() as u64);
const UI_SET_EVBIT: u64 = iow(100, 4);
const UI_SET_KEYBIT: u64 = iow(101, 4);
const UI_SET_ABSBIT: u64 = iow(103, 4);
const UI_SET_PROPBIT: u64 = iow(110, 4);
/// `INPUT_PROP_DIRECT`: a touchscreen.
pub const INPUT_PROP_DIRECT: u16 = 1;
const BUS_VIRTUAL: u16 = 0x06;

/// `struct uinput_setup`.
#[derive(IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
struct Setup {
    bustype: u16,
    vendor: u16,
    product: u16,
    version: u16,
    name: [u8; 80],
    ff_effects_max: u32,
}

/// `struct uinput_abs_setup`.
#[derive(IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
struct AbsSetup {
    code: u16,
    pad: u16,
    info: AbsInfo,
}

const _: () = {
    assert!(std::mem::size_of::<Setup>() == 92);
    assert!(std::mem::size_of::<AbsSetup>() == 28);
    assert!(UI_DEV_SETUP == 0x405c_5503);
    assert!(UI_ABS_SETUP == 0x401c_5504);
    assert!(UI_SET_EVBIT == 0x4004_5564);
};

/// What a new device reports.
#[derive(Clone, Debug, Default)]
pub struct Spec {
    pub name: String,
    pub keys: Vec<u16>,
    /// Axis code and its range.
    pub abs: Vec<(u16, AbsInfo)>,
    pub props: Vec<u16>,
}

/// A created uinput device; destroyed on drop.
pub struct UinputDevice {
    file: File,
}

fn ioctl_int(file: &File, req: u64, arg: libc::c_int) -> io::Result<()> {
    // SAFETY: these requests take their int argument by value; no memory is passed.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), req as _, arg) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn ioctl_ptr<T: IntoBytes + Immutable>(file: &File, req: u64, arg: &T) -> io::Result<()> {
    // SAFETY: `arg` is the structure the request's encoded size names, alive across the
    // call; the kernel only reads it.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), req as _, arg as *const T) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

impl UinputDevice {
    /// Create a device as `spec` says.
    pub fn create(spec: &Spec) -> io::Result<Self> {
        let file = OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_CLOEXEC)
            .open("/dev/uinput")?;
        ioctl_int(&file, UI_SET_EVBIT, 0)?; // EV_SYN
        if !spec.keys.is_empty() {
            ioctl_int(&file, UI_SET_EVBIT, 1)?; // EV_KEY
            for k in &spec.keys {
                ioctl_int(&file, UI_SET_KEYBIT, libc::c_int::from(*k))?;
            }
        }
        if !spec.abs.is_empty() {
            ioctl_int(&file, UI_SET_EVBIT, 3)?; // EV_ABS
            for (code, info) in &spec.abs {
                ioctl_int(&file, UI_SET_ABSBIT, libc::c_int::from(*code))?;
                ioctl_ptr(
                    &file,
                    UI_ABS_SETUP,
                    &AbsSetup {
                        code: *code,
                        pad: 0,
                        info: *info,
                    },
                )?;
            }
        }
        for p in &spec.props {
            ioctl_int(&file, UI_SET_PROPBIT, libc::c_int::from(*p))?;
        }
        let mut name = [0u8; 80];
        let n = spec.name.len().min(79);
        name[..n].copy_from_slice(&spec.name.as_bytes()[..n]);
        ioctl_ptr(
            &file,
            UI_DEV_SETUP,
            &Setup {
                bustype: BUS_VIRTUAL,
                vendor: 0x1234,
                product: 0x5678,
                version: 1,
                name,
                ff_effects_max: 0,
            },
        )?;
        // SAFETY: UI_DEV_CREATE takes no argument.
        let rc = unsafe { libc::ioctl(file.as_raw_fd(), UI_DEV_CREATE as _) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(UinputDevice { file })
    }

    /// Emit events.
    pub fn emit(&mut self, events: &[RawEvent]) -> io::Result<()> {
        for e in events {
            self.file.write_all(e.as_bytes())?;
        }
        Ok(())
    }
}

impl Drop for UinputDevice {
    fn drop(&mut self) {
        // SAFETY: UI_DEV_DESTROY takes no argument.
        unsafe { libc::ioctl(self.file.as_raw_fd(), UI_DEV_DESTROY as _) };
    }
}
