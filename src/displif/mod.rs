//! The displif protocol (xen/include/public/io/displif.h, v1 and v2): wire types, rings,
//! request decoding, page directories, EDID, and per-connection request handling.

pub mod budget;
pub mod connection;
pub mod device;
pub mod edid;
pub mod format;
pub mod pgdir;
pub mod request;
pub mod ring;
pub mod stats;
pub mod turn;
pub mod wire;
