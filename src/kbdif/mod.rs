//! The kbdif protocol (xen/include/public/io/kbdif.h): the `vkbd` device kind, serving
//! Linux's `xen-kbdfront` keys, absolute and relative pointer with wheel, and
//! multi-touch, from backend-neutral [`device::Input`].

pub mod device;
pub mod ring;
pub mod wire;
