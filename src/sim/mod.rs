//! An in-process simulated Xen (XenStore daemon, event channels, grant tables) and a
//! frontend that behaves like Linux's xen-drm-front.
pub mod pattern;
pub mod xenstored;
