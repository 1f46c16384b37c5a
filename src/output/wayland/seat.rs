//! Seat input (`[wayland] seat_input`): the compositor's pointer, keyboard and touch
//! events on a guest's surface, turned into [`Input`] for that guest.
//!
//! The protocol handlers ([`super::proto`]) only record [`SeatEv`]s, naming the surface
//! by the connector it was created for; [`Seat`] keeps the focus and the contacts and
//! translates, given each surface's [`Mapping`] (where the guest image lies on it).
//!
//! * Pointer: enter/motion → [`Input::Abs`] normalized to the guest image (letterbox
//!   border and viewport scaling accounted for, clamped); buttons → [`Input::Key`] with
//!   the Linux `BTN_*` code Wayland sends; the vertical axis → wheel notches (10 units
//!   each, as libinput reports a notch; positive Wayland axis = down = negative wheel).
//! * Keyboard: key → [`Input::Key`] (Wayland key codes are evdev codes). Keys already
//!   down at enter are not pressed for the guest (it never saw them go down).
//! * Touch: each touch id gets the lowest free slot of its surface's guest, at most
//!   `max_slots` at once: a further id is dropped, with its motion and lift, and counted.
//! * Leave (pointer or keyboard), cancel, a surface that goes away: what that focus held
//!   is released; a guest left with no focus and no contacts also gets
//!   [`Input::ReleaseAll`].
//! * A surface the output does not know (no connector, or its connector is gone):
//!   events are dropped and counted.

use std::collections::{BTreeMap, BTreeSet};

use crate::kbdif::device::{Input, NORM_MAX};
use crate::output::ConnectorId;

/// `KEY_MAX`: a key or button code above it is not a Linux one (dropped and counted, so
/// that the held-key sets stay bounded).
const KEY_MAX: u32 = 0x2ff;

/// Wheel units of one notch (`wl_pointer.axis`).
const AXIS_PER_NOTCH: f64 = 10.0;

/// Something the seat said (recorded by the protocol handlers, in order).
#[derive(Clone, Debug, PartialEq)]
pub enum SeatEv {
    /// `surface`: the connector of the surface, None if it is not one of ours.
    PointerEnter {
        surface: Option<ConnectorId>,
        x: f64,
        y: f64,
    },
    PointerLeave,
    PointerMotion {
        x: f64,
        y: f64,
    },
    Button {
        code: u32,
        pressed: bool,
    },
    /// Vertical axis (Wayland units: positive = down).
    Wheel(f64),
    KeyboardEnter {
        surface: Option<ConnectorId>,
    },
    KeyboardLeave,
    Key {
        code: u32,
        pressed: bool,
    },
    TouchDown {
        surface: Option<ConnectorId>,
        id: i32,
        x: f64,
        y: f64,
    },
    TouchMotion {
        id: i32,
        x: f64,
        y: f64,
    },
    TouchUp {
        id: i32,
    },
    TouchFrame,
    TouchCancel,
}

/// Where the guest image lies on its surface, in surface coordinates.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Mapping {
    pub x0: f64,
    pub y0: f64,
    pub width: f64,
    pub height: f64,
}

impl Mapping {
    /// Surface position → normalized guest position (clamped to the image).
    pub fn normalize(&self, x: f64, y: f64) -> (u32, u32) {
        fn one(v: f64, origin: f64, len: f64) -> u32 {
            if len <= 1.0 || !v.is_finite() {
                return 0;
            }
            // The last pixel (len - 1) is NORM_MAX.
            let t = ((v - origin) / (len - 1.0)).clamp(0.0, 1.0);
            (t * f64::from(NORM_MAX)).round() as u32
        }
        (one(x, self.x0, self.width), one(y, self.y0, self.height))
    }
}

/// Counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SeatStats {
    /// Events for a surface that is not a known guest's.
    pub unknown: u64,
    /// Touch events of ids beyond the slot limit (or of ids never down).
    pub touch_dropped: u64,
    /// Keys and buttons with a code above `KEY_MAX`.
    pub bad_code: u64,
}

/// Focus and contacts of the seat.
pub struct Seat {
    max_slots: u8,
    pointer: Option<ConnectorId>,
    pointer_pos: (u32, u32),
    buttons: BTreeSet<u32>,
    wheel_acc: f64,
    keyboard: Option<ConnectorId>,
    keys: BTreeSet<u32>,
    /// Touch id → (connector, slot).
    touches: BTreeMap<i32, (ConnectorId, u8)>,
    /// Connectors with touch events since the last frame.
    touched: BTreeSet<ConnectorId>,
    pub stats: SeatStats,
}

impl Seat {
    pub fn new(max_slots: u8) -> Self {
        Seat {
            max_slots,
            pointer: None,
            pointer_pos: (0, 0),
            buttons: BTreeSet::new(),
            wheel_acc: 0.0,
            keyboard: None,
            keys: BTreeSet::new(),
            touches: BTreeMap::new(),
            touched: BTreeSet::new(),
            stats: SeatStats::default(),
        }
    }

    /// Does any focus or contact of the seat rest on `conn`?
    fn engaged(&self, conn: ConnectorId) -> bool {
        self.pointer == Some(conn)
            || self.keyboard == Some(conn)
            || self.touches.values().any(|(c, _)| *c == conn)
    }

    /// `conn` lost some focus: release everything if nothing of the seat is left on it.
    fn maybe_release_all(&self, conn: ConnectorId, out: &mut Vec<(ConnectorId, Input)>) {
        if !self.engaged(conn) {
            out.push((conn, Input::ReleaseAll));
        }
    }

    fn pointer_leave(&mut self, out: &mut Vec<(ConnectorId, Input)>) {
        let Some(c) = self.pointer.take() else {
            return;
        };
        for code in std::mem::take(&mut self.buttons) {
            out.push((
                c,
                Input::Key {
                    code,
                    pressed: false,
                },
            ));
        }
        self.wheel_acc = 0.0;
        self.maybe_release_all(c, out);
    }

    fn keyboard_leave(&mut self, out: &mut Vec<(ConnectorId, Input)>) {
        let Some(c) = self.keyboard.take() else {
            return;
        };
        for code in std::mem::take(&mut self.keys) {
            out.push((
                c,
                Input::Key {
                    code,
                    pressed: false,
                },
            ));
        }
        self.maybe_release_all(c, out);
    }

    fn touch_cancel(&mut self, out: &mut Vec<(ConnectorId, Input)>) {
        let touches = std::mem::take(&mut self.touches);
        let mut conns = BTreeSet::new();
        for (_, (c, slot)) in touches {
            out.push((c, Input::TouchUp { slot }));
            conns.insert(c);
        }
        self.touched.clear();
        for c in conns {
            out.push((c, Input::TouchFrame));
            self.maybe_release_all(c, out);
        }
    }

    /// Translate one event. `known(conn)` gives the mapping of a connector's surface, or
    /// None if the connector is not (any more) a guest's shown surface.
    pub fn handle(
        &mut self,
        ev: SeatEv,
        known: impl Fn(ConnectorId) -> Option<Mapping>,
        out: &mut Vec<(ConnectorId, Input)>,
    ) {
        match ev {
            SeatEv::PointerEnter { surface, x, y } => {
                self.pointer_leave(out);
                let Some((c, m)) = surface.and_then(|c| known(c).map(|m| (c, m))) else {
                    self.stats.unknown += 1;
                    return;
                };
                self.pointer = Some(c);
                self.pointer_pos = m.normalize(x, y);
                let (x, y) = self.pointer_pos;
                out.push((c, Input::Abs { x, y, wheel: 0 }));
            }
            SeatEv::PointerLeave => self.pointer_leave(out),
            SeatEv::PointerMotion { x, y } => {
                let Some(c) = self.pointer else {
                    self.stats.unknown += 1;
                    return;
                };
                let Some(m) = known(c) else {
                    self.stats.unknown += 1;
                    return;
                };
                self.pointer_pos = m.normalize(x, y);
                let (x, y) = self.pointer_pos;
                out.push((c, Input::Abs { x, y, wheel: 0 }));
            }
            SeatEv::Button { code, .. } | SeatEv::Key { code, .. } if code > KEY_MAX => {
                self.stats.bad_code += 1;
            }
            SeatEv::Button { code, pressed } => {
                let Some(c) = self.pointer.filter(|c| known(*c).is_some()) else {
                    self.stats.unknown += 1;
                    return;
                };
                let changed = if pressed {
                    self.buttons.insert(code)
                } else {
                    self.buttons.remove(&code)
                };
                if changed {
                    out.push((c, Input::Key { code, pressed }));
                }
            }
            SeatEv::Wheel(v) => {
                let Some(c) = self.pointer.filter(|c| known(*c).is_some()) else {
                    self.stats.unknown += 1;
                    return;
                };
                if !v.is_finite() {
                    return;
                }
                self.wheel_acc += v;
                let notches = (self.wheel_acc / AXIS_PER_NOTCH).trunc();
                if notches != 0.0 {
                    self.wheel_acc -= notches * AXIS_PER_NOTCH;
                    let wheel = (-notches).clamp(-128.0, 128.0) as i32;
                    let (x, y) = self.pointer_pos;
                    out.push((c, Input::Abs { x, y, wheel }));
                }
            }
            SeatEv::KeyboardEnter { surface } => {
                self.keyboard_leave(out);
                match surface.filter(|c| known(*c).is_some()) {
                    Some(c) => self.keyboard = Some(c),
                    None => self.stats.unknown += 1,
                }
            }
            SeatEv::KeyboardLeave => self.keyboard_leave(out),
            SeatEv::Key { code, pressed } => {
                let Some(c) = self.keyboard.filter(|c| known(*c).is_some()) else {
                    self.stats.unknown += 1;
                    return;
                };
                let changed = if pressed {
                    self.keys.insert(code)
                } else {
                    self.keys.remove(&code)
                };
                if changed {
                    out.push((c, Input::Key { code, pressed }));
                }
            }
            SeatEv::TouchDown { surface, id, x, y } => {
                let Some((c, m)) = surface.and_then(|c| known(c).map(|m| (c, m))) else {
                    self.stats.unknown += 1;
                    return;
                };
                if self.touches.contains_key(&id) {
                    // A compositor bug (id reused while down): lift the old contact first.
                    if let Some((oc, slot)) = self.touches.remove(&id) {
                        out.push((oc, Input::TouchUp { slot }));
                        self.touched.insert(oc);
                    }
                }
                let used: BTreeSet<u8> = self
                    .touches
                    .values()
                    .filter(|(tc, _)| *tc == c)
                    .map(|(_, s)| *s)
                    .collect();
                let Some(slot) = (0..self.max_slots).find(|s| !used.contains(s)) else {
                    self.stats.touch_dropped += 1;
                    return;
                };
                self.touches.insert(id, (c, slot));
                self.touched.insert(c);
                let (x, y) = m.normalize(x, y);
                out.push((c, Input::TouchDown { slot, x, y }));
            }
            SeatEv::TouchMotion { id, x, y } => {
                let Some(&(c, slot)) = self.touches.get(&id) else {
                    self.stats.touch_dropped += 1;
                    return;
                };
                let Some(m) = known(c) else {
                    self.stats.unknown += 1;
                    return;
                };
                let (x, y) = m.normalize(x, y);
                self.touched.insert(c);
                out.push((c, Input::TouchMove { slot, x, y }));
            }
            SeatEv::TouchUp { id } => {
                let Some((c, slot)) = self.touches.remove(&id) else {
                    self.stats.touch_dropped += 1;
                    return;
                };
                self.touched.insert(c);
                out.push((c, Input::TouchUp { slot }));
            }
            SeatEv::TouchFrame => {
                for c in std::mem::take(&mut self.touched) {
                    out.push((c, Input::TouchFrame));
                }
            }
            SeatEv::TouchCancel => self.touch_cancel(out),
        }
    }

    /// `conn`'s surface is gone (connector removed or disabled, compositor lost): its
    /// focus and contacts end, the guest gets everything released.
    pub fn forget(&mut self, conn: ConnectorId, out: &mut Vec<(ConnectorId, Input)>) {
        let engaged = self.engaged(conn);
        if self.pointer == Some(conn) {
            self.pointer = None;
            self.buttons.clear();
            self.wheel_acc = 0.0;
        }
        if self.keyboard == Some(conn) {
            self.keyboard = None;
            self.keys.clear();
        }
        self.touches.retain(|_, (c, _)| *c != conn);
        self.touched.remove(&conn);
        if engaged {
            out.push((conn, Input::ReleaseAll));
        }
    }

    /// The connection is gone: every guest the seat was on is released.
    pub fn forget_all(&mut self, out: &mut Vec<(ConnectorId, Input)>) {
        let mut conns: BTreeSet<ConnectorId> = self.touches.values().map(|(c, _)| *c).collect();
        conns.extend(self.pointer);
        conns.extend(self.keyboard);
        for c in conns {
            self.forget(c, out);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::DomId;

    fn c(idx: u32) -> ConnectorId {
        ConnectorId {
            dom: DomId(5),
            dev: 0,
            idx,
        }
    }

    const FULL: Mapping = Mapping {
        x0: 0.0,
        y0: 0.0,
        width: 101.0,
        height: 51.0,
    };

    fn only0(conn: ConnectorId) -> Option<Mapping> {
        (conn == c(0)).then_some(FULL)
    }

    #[test]
    fn normalize_maps_corners_and_clamps_the_letterbox() {
        let m = Mapping {
            x0: 10.0,
            y0: 20.0,
            width: 101.0,
            height: 11.0,
        };
        assert_eq!(m.normalize(10.0, 20.0), (0, 0));
        assert_eq!(m.normalize(110.0, 30.0), (NORM_MAX, NORM_MAX));
        assert_eq!(
            m.normalize(60.0, 25.0),
            (NORM_MAX / 2 + 1, NORM_MAX / 2 + 1)
        );
        // In the border: clamped to the image's edge.
        assert_eq!(m.normalize(0.0, 500.0), (0, NORM_MAX));
        assert_eq!(m.normalize(f64::NAN, -1e300), (0, 0));
    }

    #[test]
    fn unknown_surfaces_and_ids_are_dropped_and_counted() {
        let mut s = Seat::new(2);
        let mut out = Vec::new();
        s.handle(
            SeatEv::PointerEnter {
                surface: Some(c(9)),
                x: 1.0,
                y: 1.0,
            },
            only0,
            &mut out,
        );
        s.handle(SeatEv::PointerMotion { x: 2.0, y: 2.0 }, only0, &mut out);
        s.handle(
            SeatEv::Button {
                code: 0x110,
                pressed: true,
            },
            only0,
            &mut out,
        );
        s.handle(SeatEv::KeyboardEnter { surface: None }, only0, &mut out);
        s.handle(
            SeatEv::Key {
                code: 30,
                pressed: true,
            },
            only0,
            &mut out,
        );
        s.handle(
            SeatEv::TouchDown {
                surface: Some(c(7)),
                id: 1,
                x: 0.0,
                y: 0.0,
            },
            only0,
            &mut out,
        );
        s.handle(SeatEv::TouchUp { id: 1 }, only0, &mut out);
        assert!(out.is_empty(), "{out:?}");
        assert_eq!(
            s.stats,
            SeatStats {
                unknown: 6,
                touch_dropped: 1,
                bad_code: 0,
            }
        );
        // Codes that are not Linux key codes, even on a known surface.
        s.handle(
            SeatEv::PointerEnter {
                surface: Some(c(0)),
                x: 0.0,
                y: 0.0,
            },
            only0,
            &mut out,
        );
        s.handle(
            SeatEv::KeyboardEnter {
                surface: Some(c(0)),
            },
            only0,
            &mut out,
        );
        out.clear();
        for code in [0x300, u32::MAX] {
            s.handle(
                SeatEv::Button {
                    code,
                    pressed: true,
                },
                only0,
                &mut out,
            );
            s.handle(
                SeatEv::Key {
                    code,
                    pressed: true,
                },
                only0,
                &mut out,
            );
        }
        assert!(out.is_empty(), "{out:?}");
        assert_eq!(s.stats.bad_code, 4);
    }

    #[test]
    fn touch_ids_beyond_the_slot_limit_are_dropped_with_their_motion_and_lift() {
        let mut s = Seat::new(2);
        let mut out = Vec::new();
        for id in [10, 20, 30] {
            s.handle(
                SeatEv::TouchDown {
                    surface: Some(c(0)),
                    id,
                    x: 100.0,
                    y: 0.0,
                },
                only0,
                &mut out,
            );
        }
        s.handle(
            SeatEv::TouchMotion {
                id: 30,
                x: 0.0,
                y: 0.0,
            },
            only0,
            &mut out,
        );
        s.handle(SeatEv::TouchUp { id: 30 }, only0, &mut out);
        s.handle(SeatEv::TouchUp { id: 10 }, only0, &mut out);
        s.handle(SeatEv::TouchFrame, only0, &mut out);
        // Slot 0 is free again: the next id gets it.
        s.handle(
            SeatEv::TouchDown {
                surface: Some(c(0)),
                id: 40,
                x: 0.0,
                y: 50.0,
            },
            only0,
            &mut out,
        );
        s.handle(SeatEv::TouchCancel, only0, &mut out);
        let i: Vec<Input> = out.iter().map(|(_, i)| *i).collect();
        assert_eq!(
            i,
            vec![
                Input::TouchDown {
                    slot: 0,
                    x: NORM_MAX,
                    y: 0
                },
                Input::TouchDown {
                    slot: 1,
                    x: NORM_MAX,
                    y: 0
                },
                Input::TouchUp { slot: 0 },
                Input::TouchFrame,
                Input::TouchDown {
                    slot: 0,
                    x: 0,
                    y: NORM_MAX
                },
                // Cancel lifts in touch id order (20 in slot 1, 40 in slot 0).
                Input::TouchUp { slot: 1 },
                Input::TouchUp { slot: 0 },
                Input::TouchFrame,
                Input::ReleaseAll,
            ]
        );
        assert_eq!(s.stats.touch_dropped, 3);
    }

    #[test]
    fn wheel_counts_notches_and_leave_releases_buttons() {
        let mut s = Seat::new(2);
        let mut out = Vec::new();
        let evs = [
            SeatEv::PointerEnter {
                surface: Some(c(0)),
                x: 0.0,
                y: 0.0,
            },
            SeatEv::Button {
                code: 0x110,
                pressed: true,
            },
            SeatEv::Wheel(5.0),
            SeatEv::Wheel(5.0),
            SeatEv::Wheel(-20.0),
            SeatEv::PointerLeave,
        ];
        for e in evs {
            s.handle(e, only0, &mut out);
        }
        let i: Vec<Input> = out.iter().map(|(_, i)| *i).collect();
        assert_eq!(
            i,
            vec![
                Input::Abs {
                    x: 0,
                    y: 0,
                    wheel: 0
                },
                Input::Key {
                    code: 0x110,
                    pressed: true
                },
                Input::Abs {
                    x: 0,
                    y: 0,
                    wheel: -1
                },
                Input::Abs {
                    x: 0,
                    y: 0,
                    wheel: 2
                },
                Input::Key {
                    code: 0x110,
                    pressed: false
                },
                Input::ReleaseAll,
            ]
        );
    }
}
