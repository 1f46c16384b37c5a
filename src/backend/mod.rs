//! Xen backend plumbing: ids, shared memory, XenStore, event channels, grants, and the
//! per-frontend XenBus lifecycle driven by one event loop.

pub mod evtchn;
pub mod frontend;
pub mod gntalloc;
pub mod gntdev;
pub(crate) mod ioctl;
pub mod mem;
pub mod readiness;
pub mod server;
pub mod signals;
pub mod types;
pub mod xen;
pub mod xenstore;

pub use types::{DomId, EvtchnPort, GrantRef, XenError, XenbusState};
