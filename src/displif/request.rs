//! Decoding a copied request slot into an owned [`Request`], and encoding responses and
//! events. Decoding works on the private copy only; nothing here sees shared memory.

use zerocopy::{FromBytes, FromZeros, IntoBytes};

use super::wire::{self, op, Slot};

/// A decoded request. Values are still unvalidated guest input.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Request {
    DbufCreate {
        dbuf_cookie: u64,
        width: u32,
        height: u32,
        bpp: u32,
        buffer_sz: u32,
        flags: u32,
        gref_directory: u32,
        data_ofs: u32,
    },
    DbufDestroy {
        dbuf_cookie: u64,
    },
    FbAttach {
        dbuf_cookie: u64,
        fb_cookie: u64,
        width: u32,
        height: u32,
        pixel_format: u32,
    },
    FbDetach {
        fb_cookie: u64,
    },
    SetConfig {
        fb_cookie: u64,
        x: u32,
        y: u32,
        width: u32,
        height: u32,
        bpp: u32,
    },
    PgFlip {
        fb_cookie: u64,
    },
    GetEdid {
        buffer_sz: u32,
        gref_directory: u32,
    },
    /// An operation code this backend does not know.
    Unknown(u8),
}

/// A request with the header fields every response must echo.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Envelope {
    pub id: u16,
    pub operation: u8,
    pub request: Request,
}

fn read<T: FromBytes>(slot: &Slot) -> T {
    // Every wire type is exactly one slot long (checked at compile time in wire.rs).
    T::read_from_bytes(slot).expect("wire struct is one slot")
}

/// Decode a private copy of a request slot.
pub fn decode(slot: &Slot) -> Envelope {
    let id = u16::from_ne_bytes([slot[0], slot[1]]);
    let operation = slot[2];
    let request = match operation {
        op::DBUF_CREATE => {
            let r: wire::DbufCreateReq = read(slot);
            Request::DbufCreate {
                dbuf_cookie: r.dbuf_cookie,
                width: r.width,
                height: r.height,
                bpp: r.bpp,
                buffer_sz: r.buffer_sz,
                flags: r.flags,
                gref_directory: r.gref_directory,
                data_ofs: r.data_ofs,
            }
        }
        op::DBUF_DESTROY => Request::DbufDestroy {
            dbuf_cookie: read::<wire::CookieReq>(slot).cookie,
        },
        op::FB_ATTACH => {
            let r: wire::FbAttachReq = read(slot);
            Request::FbAttach {
                dbuf_cookie: r.dbuf_cookie,
                fb_cookie: r.fb_cookie,
                width: r.width,
                height: r.height,
                pixel_format: r.pixel_format,
            }
        }
        op::FB_DETACH => Request::FbDetach {
            fb_cookie: read::<wire::CookieReq>(slot).cookie,
        },
        op::SET_CONFIG => {
            let r: wire::SetConfigReq = read(slot);
            Request::SetConfig {
                fb_cookie: r.fb_cookie,
                x: r.x,
                y: r.y,
                width: r.width,
                height: r.height,
                bpp: r.bpp,
            }
        }
        op::PG_FLIP => Request::PgFlip {
            fb_cookie: read::<wire::CookieReq>(slot).cookie,
        },
        op::GET_EDID => {
            let r: wire::GetEdidReq = read(slot);
            Request::GetEdid {
                buffer_sz: r.buffer_sz,
                gref_directory: r.gref_directory,
            }
        }
        other => Request::Unknown(other),
    };
    Envelope {
        id,
        operation,
        request,
    }
}

impl Request {
    /// Encode as a slot (used by the simulated frontend and tests).
    pub fn encode(&self, id: u16) -> Slot {
        let mut slot = [0u8; wire::SLOT_SIZE];
        match *self {
            Request::DbufCreate {
                dbuf_cookie,
                width,
                height,
                bpp,
                buffer_sz,
                flags,
                gref_directory,
                data_ofs,
            } => {
                let r = wire::DbufCreateReq {
                    id,
                    operation: op::DBUF_CREATE,
                    dbuf_cookie,
                    width,
                    height,
                    bpp,
                    buffer_sz,
                    flags,
                    gref_directory,
                    data_ofs,
                    ..FromZeros::new_zeroed()
                };
                slot.copy_from_slice(r.as_bytes());
            }
            Request::DbufDestroy { dbuf_cookie } => {
                slot = cookie_req(id, op::DBUF_DESTROY, dbuf_cookie)
            }
            Request::FbAttach {
                dbuf_cookie,
                fb_cookie,
                width,
                height,
                pixel_format,
            } => {
                let r = wire::FbAttachReq {
                    id,
                    operation: op::FB_ATTACH,
                    dbuf_cookie,
                    fb_cookie,
                    width,
                    height,
                    pixel_format,
                    ..FromZeros::new_zeroed()
                };
                slot.copy_from_slice(r.as_bytes());
            }
            Request::FbDetach { fb_cookie } => slot = cookie_req(id, op::FB_DETACH, fb_cookie),
            Request::SetConfig {
                fb_cookie,
                x,
                y,
                width,
                height,
                bpp,
            } => {
                let r = wire::SetConfigReq {
                    id,
                    operation: op::SET_CONFIG,
                    fb_cookie,
                    x,
                    y,
                    width,
                    height,
                    bpp,
                    ..FromZeros::new_zeroed()
                };
                slot.copy_from_slice(r.as_bytes());
            }
            Request::PgFlip { fb_cookie } => slot = cookie_req(id, op::PG_FLIP, fb_cookie),
            Request::GetEdid {
                buffer_sz,
                gref_directory,
            } => {
                let r = wire::GetEdidReq {
                    id,
                    operation: op::GET_EDID,
                    buffer_sz,
                    gref_directory,
                    ..FromZeros::new_zeroed()
                };
                slot.copy_from_slice(r.as_bytes());
            }
            Request::Unknown(code) => {
                slot[..2].copy_from_slice(&id.to_ne_bytes());
                slot[2] = code;
            }
        }
        slot
    }
}

fn cookie_req(id: u16, operation: u8, cookie: u64) -> Slot {
    let r = wire::CookieReq {
        id,
        operation,
        cookie,
        ..FromZeros::new_zeroed()
    };
    let mut slot = [0u8; wire::SLOT_SIZE];
    slot.copy_from_slice(r.as_bytes());
    slot
}

/// Encode a response echoing `id` and `operation` (the Linux frontend checks both).
pub fn encode_response(id: u16, operation: u8, status: i32, edid_sz: u32) -> Slot {
    let r = wire::Resp {
        id,
        operation,
        status,
        edid_sz,
        ..FromZeros::new_zeroed()
    };
    let mut slot = [0u8; wire::SLOT_SIZE];
    slot.copy_from_slice(r.as_bytes());
    slot
}

/// Decode a response slot (simulated frontend).
pub fn decode_response(slot: &Slot) -> wire::Resp {
    read(slot)
}

/// Encode a page-flip event.
pub fn encode_pg_flip_event(id: u16, fb_cookie: u64) -> Slot {
    let e = wire::PgFlipEvt {
        id,
        type_: wire::EVT_PG_FLIP,
        fb_cookie,
        ..FromZeros::new_zeroed()
    };
    let mut slot = [0u8; wire::SLOT_SIZE];
    slot.copy_from_slice(e.as_bytes());
    slot
}

/// Decode an event slot (simulated frontend).
pub fn decode_event(slot: &Slot) -> wire::PgFlipEvt {
    read(slot)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_request_round_trips() {
        let reqs = [
            Request::DbufCreate {
                dbuf_cookie: 0xdead_beef_0000_0001,
                width: 1920,
                height: 1080,
                bpp: 32,
                buffer_sz: 1920 * 1080 * 4,
                flags: 1,
                gref_directory: 77,
                data_ofs: 64,
            },
            Request::DbufDestroy { dbuf_cookie: 5 },
            Request::FbAttach {
                dbuf_cookie: 5,
                fb_cookie: 6,
                width: 10,
                height: 11,
                pixel_format: 0x3432_5258,
            },
            Request::FbDetach { fb_cookie: 6 },
            Request::SetConfig {
                fb_cookie: 6,
                x: 1,
                y: 2,
                width: 3,
                height: 4,
                bpp: 32,
            },
            Request::PgFlip { fb_cookie: 6 },
            Request::GetEdid {
                buffer_sz: 32768,
                gref_directory: 9,
            },
            Request::Unknown(0x42),
        ];
        for (i, r) in reqs.iter().enumerate() {
            let slot = r.encode(i as u16 + 1000);
            let env = decode(&slot);
            assert_eq!(env.id, i as u16 + 1000);
            assert_eq!(env.request, *r);
        }
    }

    #[test]
    fn offsets_in_encoded_slots_match_displif_h() {
        let slot = Request::DbufCreate {
            dbuf_cookie: 1,
            width: 2,
            height: 3,
            bpp: 4,
            buffer_sz: 5,
            flags: 6,
            gref_directory: 7,
            data_ofs: 8,
        }
        .encode(0x0102);
        assert_eq!(&slot[0..3], &[0x02, 0x01, op::DBUF_CREATE]);
        assert_eq!(slot[40], 8);
        assert_eq!(slot[36], 7);
        let r = encode_response(7, op::PG_FLIP, -22, 0);
        assert_eq!(r[2], op::PG_FLIP);
        assert_eq!(i32::from_ne_bytes(r[4..8].try_into().unwrap()), -22);
    }
}
