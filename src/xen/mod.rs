//! Xen interfaces of the backend domain, with no protocol knowledge: ids and errors,
//! shared memory, the XenStore client, event channels, grant mapping (gntdev) and
//! granting (gntalloc), and the [`Platform`] bundle a backend runs on (real devices or
//! the simulated Xen of [`crate::sim`]).

pub mod evtchn;
pub mod gntalloc;
pub mod gntdev;
pub(crate) mod ioctl;
pub mod mem;
pub mod platform;
pub mod signals;
pub mod types;
pub mod xenstore;

pub use platform::{EventChannels, GrantAllocator, GrantMapper, GrantedPages, Platform, PAGE_SIZE};
pub use types::{DomId, EvtchnPort, GrantRef, XenError, XenbusState};
