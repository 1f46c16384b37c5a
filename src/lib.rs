//! displback: a Xen para-virtual display backend (displif, `vdispl`).
//!
//! Layout:
//! * [`xen`]: Xen interfaces (XenStore, event channels, grants, shared memory), no
//!   protocol knowledge.
//! * [`xenbus`]: the XenBus device layer, generic over device kinds: state machine,
//!   watches, hot attach/detach, port routing.
//! * [`backend`]: the one event loop serving every kind, and readiness reporting.
//! * [`displif`]: the `vdispl` kind: wire types, rings, request decoding and handling.
//! * [`kbdif`]: the `vkbd` kind: keyboard, pointer and multi-touch events.
//! * [`input`]: evdev input sources of the backend domain, per guest device.
//! * [`output`]: where frames go (headless, KMS).
//! * [`zcopy`]: dma-buf paths (zero-copy, backend allocation).
//! * [`sim`]: an in-process simulated Xen and a frontend that behaves like Linux's
//!   `xen-drm-front`, for tests and `displback demo`.
//! * [`notify`], [`control`], [`status`]: readiness (sd_notify), the control socket and
//!   what `displback status` shows.
//! * [`harness_broken`]: deliberate defects for the VM harness's self-test (feature
//!   `harness-broken` only).
#![deny(unsafe_op_in_unsafe_fn)]

pub mod backend;
pub mod config;
pub mod control;
pub mod demo;
pub mod displif;
pub mod domain_name;
pub mod harness_broken;
pub mod input;
pub mod kbdif;
pub mod launch;
pub mod log_limit;
pub mod notify;
pub mod output;
pub mod serve;
pub mod sim;
pub mod status;
pub mod xen;
pub mod xenbus;
pub mod zcopy;
