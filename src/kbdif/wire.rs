//! kbdif.h wire layouts: the shared page (`struct xenkbd_page` and the in-event ring) and
//! the 40-byte in events (backend → frontend). Offsets are checked at compile time against
//! kbdif.h; native-endian like the C header.

use std::mem::{offset_of, size_of};

use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// `XENKBD_TYPE_*`.
pub mod ty {
    pub const MOTION: u8 = 1;
    pub const KEY: u8 = 3;
    pub const POS: u8 = 4;
    pub const MTOUCH: u8 = 5;
}

/// `XENKBD_MT_EV_*`.
pub mod mt {
    pub const DOWN: u8 = 0;
    pub const UP: u8 = 1;
    pub const MOTION: u8 = 2;
    pub const SYN: u8 = 3;
    pub const SHAPE: u8 = 4;
    pub const ORIENT: u8 = 5;
}

/// XenStore nodes (`XENKBD_FIELD_*`).
pub mod field {
    pub const FEAT_DSBL_KEYBRD: &str = "feature-disable-keyboard";
    pub const FEAT_DSBL_POINTER: &str = "feature-disable-pointer";
    pub const FEAT_ABS_POINTER: &str = "feature-abs-pointer";
    pub const FEAT_RAW_POINTER: &str = "feature-raw-pointer";
    pub const FEAT_MTOUCH: &str = "feature-multi-touch";
    pub const REQ_ABS_POINTER: &str = "request-abs-pointer";
    pub const REQ_RAW_POINTER: &str = "request-raw-pointer";
    pub const REQ_MTOUCH: &str = "request-multi-touch";
    pub const RING_GREF: &str = "page-gref";
    pub const EVT_CHANNEL: &str = "event-channel";
    pub const WIDTH: &str = "width";
    pub const HEIGHT: &str = "height";
    pub const MT_WIDTH: &str = "multi-touch-width";
    pub const MT_HEIGHT: &str = "multi-touch-height";
    pub const MT_NUM_CONTACTS: &str = "multi-touch-num-contacts";
    pub const UNIQUE_ID: &str = "unique-id";
}

/// `XENKBD_IN_EVENT_SIZE`.
pub const EVENT_SIZE: usize = 40;
/// `XENKBD_IN_RING_OFFS`, `XENKBD_IN_RING_SIZE`, `XENKBD_IN_RING_LEN` (51: not a power
/// of two; slots are `idx % 51`).
pub const IN_RING_OFFS: usize = 1024;
pub const IN_RING_SIZE: usize = 2048;
pub const IN_RING_LEN: u32 = (IN_RING_SIZE / EVENT_SIZE) as u32;
/// Raw (unscaled) absolute coordinates range over `0..=RAW_MAX` (`request-raw-pointer`).
pub const RAW_MAX: u32 = 0x7fff;
/// Linux's pointer size without `width`/`height` nodes (`XENFB_WIDTH`, `XENFB_HEIGHT`).
pub const DEFAULT_WIDTH: u32 = 800;
pub const DEFAULT_HEIGHT: u32 = 600;

/// One in event as written to the ring.
pub type EventSlot = [u8; EVENT_SIZE];

/// `struct xenkbd_page`: the indices at the start of the shared page.
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct Page {
    pub in_cons: u32,
    pub in_prod: u32,
    pub out_cons: u32,
    pub out_prod: u32,
}

/// `struct xenkbd_motion`.
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct Motion {
    pub ty: u8,
    pub reserved: [u8; 3],
    pub rel_x: i32,
    pub rel_y: i32,
    pub rel_z: i32,
    pub reserved2: [u8; 24],
}

/// `struct xenkbd_key`.
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct Key {
    pub ty: u8,
    pub pressed: u8,
    pub reserved: [u8; 2],
    pub keycode: u32,
    pub reserved2: [u8; 32],
}

/// `struct xenkbd_position`.
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct Position {
    pub ty: u8,
    pub reserved: [u8; 3],
    pub abs_x: i32,
    pub abs_y: i32,
    pub rel_z: i32,
    pub reserved2: [u8; 24],
}

/// `struct xenkbd_mtouch`; `u` holds `pos {abs_x, abs_y}`, `shape {major, minor}` or
/// `orientation` (an i16 in its first two bytes).
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct MTouch {
    pub ty: u8,
    pub event_type: u8,
    pub contact_id: u8,
    pub reserved: [u8; 5],
    pub u0: i32,
    pub u1: i32,
    pub reserved2: [u8; 24],
}

const _: () = {
    assert!(size_of::<Page>() == 16);
    assert!(offset_of!(Page, in_cons) == 0);
    assert!(offset_of!(Page, in_prod) == 4);
    assert!(offset_of!(Page, out_cons) == 8);
    assert!(offset_of!(Page, out_prod) == 12);
    assert!(size_of::<Motion>() == EVENT_SIZE);
    assert!(offset_of!(Motion, rel_x) == 4);
    assert!(offset_of!(Motion, rel_y) == 8);
    assert!(offset_of!(Motion, rel_z) == 12);
    assert!(size_of::<Key>() == EVENT_SIZE);
    assert!(offset_of!(Key, pressed) == 1);
    assert!(offset_of!(Key, keycode) == 4);
    assert!(size_of::<Position>() == EVENT_SIZE);
    assert!(offset_of!(Position, abs_x) == 4);
    assert!(offset_of!(Position, abs_y) == 8);
    assert!(offset_of!(Position, rel_z) == 12);
    assert!(size_of::<MTouch>() == EVENT_SIZE);
    assert!(offset_of!(MTouch, event_type) == 1);
    assert!(offset_of!(MTouch, contact_id) == 2);
    assert!(offset_of!(MTouch, u0) == 8);
    assert!(offset_of!(MTouch, u1) == 12);
    assert!(IN_RING_LEN == 51);
    assert!(IN_RING_OFFS + IN_RING_SIZE <= 4096);
};

/// An in event, decoded (what a frontend sees; the simulated frontend decodes with it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InEvent {
    Motion {
        rel_x: i32,
        rel_y: i32,
        rel_z: i32,
    },
    Key {
        pressed: bool,
        keycode: u32,
    },
    Position {
        abs_x: i32,
        abs_y: i32,
        rel_z: i32,
    },
    TouchDown {
        contact: u8,
        x: i32,
        y: i32,
    },
    TouchMotion {
        contact: u8,
        x: i32,
        y: i32,
    },
    TouchUp {
        contact: u8,
    },
    TouchFrame {
        contact: u8,
    },
    TouchShape {
        contact: u8,
        major: u32,
        minor: u32,
    },
    TouchOrient {
        contact: u8,
        orientation: i16,
    },
    /// A type the frontend ignores (never sent by this backend).
    Unknown(u8),
}

impl InEvent {
    /// The 40 bytes of this event, reserved bytes zero.
    pub fn encode(&self) -> EventSlot {
        let mut slot = [0u8; EVENT_SIZE];
        let mt = |event_type: u8, contact_id: u8, u0: i32, u1: i32| MTouch {
            ty: ty::MTOUCH,
            event_type,
            contact_id,
            reserved: [0; 5],
            u0,
            u1,
            reserved2: [0; 24],
        };
        let written = match *self {
            InEvent::Motion {
                rel_x,
                rel_y,
                rel_z,
            } => Motion {
                ty: ty::MOTION,
                reserved: [0; 3],
                rel_x,
                rel_y,
                rel_z,
                reserved2: [0; 24],
            }
            .write_to(&mut slot[..])
            .is_ok(),
            InEvent::Key { pressed, keycode } => Key {
                ty: ty::KEY,
                pressed: pressed.into(),
                reserved: [0; 2],
                keycode,
                reserved2: [0; 32],
            }
            .write_to(&mut slot[..])
            .is_ok(),
            InEvent::Position {
                abs_x,
                abs_y,
                rel_z,
            } => Position {
                ty: ty::POS,
                reserved: [0; 3],
                abs_x,
                abs_y,
                rel_z,
                reserved2: [0; 24],
            }
            .write_to(&mut slot[..])
            .is_ok(),
            InEvent::TouchDown { contact, x, y } => {
                mt(mt::DOWN, contact, x, y).write_to(&mut slot[..]).is_ok()
            }
            InEvent::TouchMotion { contact, x, y } => mt(mt::MOTION, contact, x, y)
                .write_to(&mut slot[..])
                .is_ok(),
            InEvent::TouchUp { contact } => {
                mt(mt::UP, contact, 0, 0).write_to(&mut slot[..]).is_ok()
            }
            InEvent::TouchFrame { contact } => {
                mt(mt::SYN, contact, 0, 0).write_to(&mut slot[..]).is_ok()
            }
            InEvent::TouchShape {
                contact,
                major,
                minor,
            } => mt(mt::SHAPE, contact, major as i32, minor as i32)
                .write_to(&mut slot[..])
                .is_ok(),
            InEvent::TouchOrient {
                contact,
                orientation,
            } => mt(mt::ORIENT, contact, i32::from(orientation as u16), 0)
                .write_to(&mut slot[..])
                .is_ok(),
            InEvent::Unknown(t) => {
                slot[0] = t;
                true
            }
        };
        assert!(written, "every event is 40 bytes");
        slot
    }

    /// Decode a slot copied out of the ring.
    pub fn decode(slot: &EventSlot) -> InEvent {
        match slot[0] {
            ty::MOTION => {
                let m = Motion::read_from_bytes(&slot[..]).expect("40 bytes");
                InEvent::Motion {
                    rel_x: m.rel_x,
                    rel_y: m.rel_y,
                    rel_z: m.rel_z,
                }
            }
            ty::KEY => {
                let k = Key::read_from_bytes(&slot[..]).expect("40 bytes");
                InEvent::Key {
                    pressed: k.pressed != 0,
                    keycode: k.keycode,
                }
            }
            ty::POS => {
                let p = Position::read_from_bytes(&slot[..]).expect("40 bytes");
                InEvent::Position {
                    abs_x: p.abs_x,
                    abs_y: p.abs_y,
                    rel_z: p.rel_z,
                }
            }
            ty::MTOUCH => {
                let m = MTouch::read_from_bytes(&slot[..]).expect("40 bytes");
                let contact = m.contact_id;
                match m.event_type {
                    mt::DOWN => InEvent::TouchDown {
                        contact,
                        x: m.u0,
                        y: m.u1,
                    },
                    mt::MOTION => InEvent::TouchMotion {
                        contact,
                        x: m.u0,
                        y: m.u1,
                    },
                    mt::UP => InEvent::TouchUp { contact },
                    mt::SYN => InEvent::TouchFrame { contact },
                    mt::SHAPE => InEvent::TouchShape {
                        contact,
                        major: m.u0 as u32,
                        minor: m.u1 as u32,
                    },
                    mt::ORIENT => InEvent::TouchOrient {
                        contact,
                        orientation: m.u0 as u16 as i16,
                    },
                    _ => InEvent::Unknown(ty::MTOUCH),
                }
            }
            t => InEvent::Unknown(t),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_layout() {
        let all = [
            InEvent::Motion {
                rel_x: -3,
                rel_y: 7,
                rel_z: 1,
            },
            InEvent::Key {
                pressed: true,
                keycode: 42,
            },
            InEvent::Position {
                abs_x: 1919,
                abs_y: 0,
                rel_z: -1,
            },
            InEvent::TouchDown {
                contact: 9,
                x: 100,
                y: 200,
            },
            InEvent::TouchMotion {
                contact: 1,
                x: 5,
                y: 6,
            },
            InEvent::TouchUp { contact: 3 },
            InEvent::TouchFrame { contact: 3 },
            InEvent::TouchShape {
                contact: 2,
                major: 10,
                minor: 4,
            },
            InEvent::TouchOrient {
                contact: 2,
                orientation: -90,
            },
        ];
        for e in all {
            assert_eq!(InEvent::decode(&e.encode()), e);
        }
        // Byte positions as kbdif.h draws them.
        let k = InEvent::Key {
            pressed: true,
            keycode: 0x1d,
        }
        .encode();
        assert_eq!(&k[..8], &[3, 1, 0, 0, 0x1d, 0, 0, 0]);
        let t = InEvent::TouchDown {
            contact: 4,
            x: 0x0102,
            y: 0x0304,
        }
        .encode();
        assert_eq!(&t[..16], &[5, 0, 4, 0, 0, 0, 0, 0, 2, 1, 0, 0, 4, 3, 0, 0]);
        assert!(t[16..].iter().all(|b| *b == 0));
    }
}
