//! The backend process: one event loop ([`server`]) serving every device kind
//! (`vdispl` via [`crate::displif`], `vkbd` via [`crate::kbdif`]) on the generic XenBus
//! layer ([`crate::xenbus`]) and the Xen interfaces ([`crate::xen`]), plus how it
//! reports readiness ([`readiness`]).

pub mod readiness;
pub mod server;

// Paths from before the split into `xen` / `xenbus` / `displif`, kept so code written
// against them (output, zcopy, other branches) still builds.
pub use crate::displif::device as frontend;
pub(crate) use crate::xen::ioctl;
pub use crate::xen::platform as xen;
pub use crate::xen::{evtchn, gntalloc, gntdev, mem, signals, types, xenstore};
pub use crate::xen::{DomId, EvtchnPort, GrantRef, XenError, XenbusState};
