//! displif.h wire layouts (protocol v2; v1 is the same with `data_ofs` reserved as 0).
//!
//! Every slot is 64 bytes; offsets are checked at compile time against displif.h.
//! Structs are native-endian like the C header (Xen runs little-endian on x86 and Arm).

use std::mem::{offset_of, size_of};

use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// Operation codes.
pub mod op {
    pub const DBUF_CREATE: u8 = 0x10;
    pub const DBUF_DESTROY: u8 = 0x11;
    pub const FB_ATTACH: u8 = 0x12;
    pub const FB_DETACH: u8 = 0x13;
    pub const SET_CONFIG: u8 = 0x14;
    pub const PG_FLIP: u8 = 0x15;
    /// v2 only.
    pub const GET_EDID: u8 = 0x16;
}

/// Event type of "page flip complete".
pub const EVT_PG_FLIP: u8 = 0x00;
/// `flags` bit of DBUF_CREATE: the backend allocates the buffer.
pub const DBUF_FLG_REQ_ALLOC: u32 = 1 << 0;
/// Size of every request, response and event.
pub const SLOT_SIZE: usize = 64;
/// Minimum EDID buffer the frontend provides (`XENDISPL_EDID_MAX_SIZE`).
pub const EDID_MAX_SIZE: u32 = 128 * 256;

/// One raw slot as copied out of shared memory.
pub type Slot = [u8; SLOT_SIZE];

/// `struct xendispl_dbuf_create_req` with its request header.
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct DbufCreateReq {
    pub id: u16,
    pub operation: u8,
    pub reserved: [u8; 5],
    pub dbuf_cookie: u64,
    pub width: u32,
    pub height: u32,
    pub bpp: u32,
    pub buffer_sz: u32,
    pub flags: u32,
    pub gref_directory: u32,
    pub data_ofs: u32,
    pub reserved2: [u8; 20],
}

/// DBUF_DESTROY, FB_DETACH and PG_FLIP: one cookie at offset 8.
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct CookieReq {
    pub id: u16,
    pub operation: u8,
    pub reserved: [u8; 5],
    pub cookie: u64,
    pub reserved2: [u8; 48],
}

/// `struct xendispl_fb_attach_req`.
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct FbAttachReq {
    pub id: u16,
    pub operation: u8,
    pub reserved: [u8; 5],
    pub dbuf_cookie: u64,
    pub fb_cookie: u64,
    pub width: u32,
    pub height: u32,
    pub pixel_format: u32,
    pub reserved2: [u8; 28],
}

/// `struct xendispl_set_config_req`.
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct SetConfigReq {
    pub id: u16,
    pub operation: u8,
    pub reserved: [u8; 5],
    pub fb_cookie: u64,
    pub x: u32,
    pub y: u32,
    pub width: u32,
    pub height: u32,
    pub bpp: u32,
    pub reserved2: [u8; 28],
}

/// `struct xendispl_get_edid_req` (v2).
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct GetEdidReq {
    pub id: u16,
    pub operation: u8,
    pub reserved: [u8; 5],
    pub buffer_sz: u32,
    pub gref_directory: u32,
    pub reserved2: [u8; 48],
}

/// `struct xendispl_resp`; for GET_EDID the first payload word is `edid_sz`.
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct Resp {
    pub id: u16,
    pub operation: u8,
    pub reserved: u8,
    pub status: i32,
    pub edid_sz: u32,
    pub reserved2: [u8; 52],
}

/// `struct xendispl_evt` carrying `xendispl_pg_flip_evt`.
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct PgFlipEvt {
    pub id: u16,
    pub type_: u8,
    pub reserved: [u8; 5],
    pub fb_cookie: u64,
    pub reserved2: [u8; 48],
}

/// Shared request ring (`struct xen_displif_sring`) layout.
pub mod ring {
    pub const REQ_PROD: usize = 0;
    pub const REQ_EVENT: usize = 4;
    pub const RSP_PROD: usize = 8;
    pub const RSP_EVENT: usize = 12;
    /// First slot (after the 64-byte header).
    pub const SLOTS: usize = 64;
    /// `__RING_SIZE`: round-down power of two of (4096 - 64) / 64.
    pub const SIZE: u32 = 32;
}

/// Event page (`struct xendispl_event_page`) layout.
pub mod evt_page {
    pub const IN_CONS: usize = 0;
    pub const IN_PROD: usize = 4;
    /// `XENDISPL_IN_RING_OFFS`.
    pub const RING_OFFS: usize = 64;
    /// `XENDISPL_IN_RING_LEN`: 4032 / 64; not a power of two, so index with `%`.
    pub const RING_LEN: u32 = 63;
}

/// Page directory page: `{ u32 gref_dir_next_page; u32 gref[1023]; }`.
pub mod pgdir {
    pub const NEXT: usize = 0;
    pub const GREFS: usize = 4;
    /// Grant refs per directory page.
    pub const PER_PAGE: usize = (4096 - 4) / 4;
}

const _: () = {
    assert!(size_of::<DbufCreateReq>() == SLOT_SIZE);
    assert!(size_of::<CookieReq>() == SLOT_SIZE);
    assert!(size_of::<FbAttachReq>() == SLOT_SIZE);
    assert!(size_of::<SetConfigReq>() == SLOT_SIZE);
    assert!(size_of::<GetEdidReq>() == SLOT_SIZE);
    assert!(size_of::<Resp>() == SLOT_SIZE);
    assert!(size_of::<PgFlipEvt>() == SLOT_SIZE);
    assert!(offset_of!(DbufCreateReq, operation) == 2);
    assert!(offset_of!(DbufCreateReq, dbuf_cookie) == 8);
    assert!(offset_of!(DbufCreateReq, width) == 16);
    assert!(offset_of!(DbufCreateReq, height) == 20);
    assert!(offset_of!(DbufCreateReq, bpp) == 24);
    assert!(offset_of!(DbufCreateReq, buffer_sz) == 28);
    assert!(offset_of!(DbufCreateReq, flags) == 32);
    assert!(offset_of!(DbufCreateReq, gref_directory) == 36);
    assert!(offset_of!(DbufCreateReq, data_ofs) == 40);
    assert!(offset_of!(CookieReq, cookie) == 8);
    assert!(offset_of!(FbAttachReq, dbuf_cookie) == 8);
    assert!(offset_of!(FbAttachReq, fb_cookie) == 16);
    assert!(offset_of!(FbAttachReq, width) == 24);
    assert!(offset_of!(FbAttachReq, height) == 28);
    assert!(offset_of!(FbAttachReq, pixel_format) == 32);
    assert!(offset_of!(SetConfigReq, fb_cookie) == 8);
    assert!(offset_of!(SetConfigReq, x) == 16);
    assert!(offset_of!(SetConfigReq, y) == 20);
    assert!(offset_of!(SetConfigReq, width) == 24);
    assert!(offset_of!(SetConfigReq, height) == 28);
    assert!(offset_of!(SetConfigReq, bpp) == 32);
    assert!(offset_of!(GetEdidReq, buffer_sz) == 8);
    assert!(offset_of!(GetEdidReq, gref_directory) == 12);
    assert!(offset_of!(Resp, operation) == 2);
    assert!(offset_of!(Resp, status) == 4);
    assert!(offset_of!(Resp, edid_sz) == 8);
    assert!(offset_of!(PgFlipEvt, type_) == 2);
    assert!(offset_of!(PgFlipEvt, fb_cookie) == 8);
    assert!(ring::SLOTS + ring::SIZE as usize * SLOT_SIZE <= 4096);
    assert!(evt_page::RING_OFFS + evt_page::RING_LEN as usize * SLOT_SIZE == 4096);
    assert!(pgdir::GREFS + pgdir::PER_PAGE * 4 == 4096);
};
