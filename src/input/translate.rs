//! evdev events of one source device → backend-neutral [`Input`], one `SYN_REPORT`
//! frame at a time. Absolute values are normalized to `0..=NORM_MAX` from the device's
//! own axis ranges (the vkbd device scales them to the guest's declared size). Events
//! that make no sense (a slot beyond the device's, an axis without a range, a frame
//! the kernel dropped) are counted and skipped, never fatal.

use crate::kbdif::device::{Input, NORM_MAX};

use super::evdev::{AbsInfo, RawEvent};

pub const EV_SYN: u16 = 0;
pub const EV_KEY: u16 = 1;
pub const EV_REL: u16 = 2;
pub const EV_ABS: u16 = 3;
pub const SYN_REPORT: u16 = 0;
pub const SYN_DROPPED: u16 = 3;
pub const REL_X: u16 = 0;
pub const REL_Y: u16 = 1;
pub const REL_WHEEL: u16 = 8;
pub const ABS_X: u16 = 0;
pub const ABS_Y: u16 = 1;
pub const ABS_MT_SLOT: u16 = 0x2f;
pub const ABS_MT_POSITION_X: u16 = 0x35;
pub const ABS_MT_POSITION_Y: u16 = 0x36;
pub const ABS_MT_TRACKING_ID: u16 = 0x39;
/// `BTN_TOOL_PEN` .. `BTN_TOOL_QUINTTAP` and `BTN_TOUCH`: a touchscreen's own summary
/// keys; the guest's multi-touch device derives its own from the contacts.
const TOUCH_KEYS: std::ops::RangeInclusive<u16> = 0x140..=0x14f;
/// Contacts tracked per source (the guest takes at most its configured number).
pub const MAX_SLOTS: usize = 64;

/// The axes a source device reports, from `EVIOCGABS`.
#[derive(Clone, Copy, Debug, Default)]
pub struct Caps {
    pub abs_x: Option<AbsInfo>,
    pub abs_y: Option<AbsInfo>,
    pub mt_x: Option<AbsInfo>,
    pub mt_y: Option<AbsInfo>,
    /// Slots the device has (`ABS_MT_SLOT` maximum + 1); 0: not multi-touch.
    pub mt_slots: usize,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Slot {
    /// Down (tracking id ≥ 0) at the last frame / now.
    was_down: bool,
    down: bool,
    x: u32,
    y: u32,
    moved: bool,
}

/// Normalize `v` within `info`'s range to `0..=NORM_MAX`.
pub fn normalize(v: i32, info: &AbsInfo) -> u32 {
    let (min, max) = (i64::from(info.minimum), i64::from(info.maximum));
    if max <= min {
        return 0;
    }
    let v = i64::from(v).clamp(min, max);
    ((v - min) * i64::from(NORM_MAX) / (max - min)) as u32
}

/// Per-device translation state.
pub struct Translator {
    caps: Caps,
    slots: Vec<Slot>,
    cur: usize,
    abs: (u32, u32),
    abs_moved: bool,
    rel: (i32, i32, i32),
    keys: Vec<Input>,
    /// A `SYN_DROPPED` frame: skip until the next `SYN_REPORT`.
    dropping: bool,
    /// Events skipped as malformed.
    pub malformed: u64,
}

impl Translator {
    pub fn new(caps: Caps) -> Self {
        let n = caps.mt_slots.min(MAX_SLOTS);
        Translator {
            caps,
            slots: vec![Slot::default(); n],
            cur: 0,
            abs: (0, 0),
            abs_moved: false,
            rel: (0, 0, 0),
            keys: Vec::new(),
            dropping: false,
            malformed: 0,
        }
    }

    /// Feed one event; a `SYN_REPORT` appends the frame's input to `out`.
    pub fn feed(&mut self, ev: &RawEvent, out: &mut Vec<Input>) {
        if self.dropping && !(ev.ty == EV_SYN && ev.code == SYN_REPORT) {
            return;
        }
        match (ev.ty, ev.code) {
            (EV_SYN, SYN_REPORT) => {
                if self.dropping {
                    self.dropping = false;
                    self.reset_frame();
                    return;
                }
                self.flush(out);
            }
            (EV_SYN, SYN_DROPPED) => {
                self.malformed += 1;
                self.dropping = true;
            }
            (EV_SYN, _) => {}
            (EV_KEY, code) => {
                if self.caps.mt_slots > 0 && TOUCH_KEYS.contains(&code) {
                    return;
                }
                match ev.value {
                    0 | 1 => self.keys.push(Input::Key {
                        code: u32::from(code),
                        pressed: ev.value == 1,
                    }),
                    // Autorepeat: the guest repeats on its own.
                    2 => {}
                    _ => self.malformed += 1,
                }
            }
            (EV_REL, REL_X) => self.rel.0 = self.rel.0.saturating_add(ev.value),
            (EV_REL, REL_Y) => self.rel.1 = self.rel.1.saturating_add(ev.value),
            (EV_REL, REL_WHEEL) => self.rel.2 = self.rel.2.saturating_add(ev.value),
            (EV_ABS, ABS_MT_SLOT) => match usize::try_from(ev.value) {
                Ok(s) if s < self.slots.len() => self.cur = s,
                _ => {
                    self.malformed += 1;
                    // Park on an impossible slot: its contacts are ignored.
                    self.cur = usize::MAX;
                }
            },
            (EV_ABS, ABS_MT_TRACKING_ID) => match self.slots.get_mut(self.cur) {
                Some(s) => s.down = ev.value >= 0,
                None => self.malformed += 1,
            },
            (EV_ABS, ABS_MT_POSITION_X | ABS_MT_POSITION_Y) => {
                let info = if ev.code == ABS_MT_POSITION_X {
                    self.caps.mt_x
                } else {
                    self.caps.mt_y
                };
                match (self.slots.get_mut(self.cur), info) {
                    (Some(s), Some(info)) => {
                        let v = normalize(ev.value, &info);
                        if ev.code == ABS_MT_POSITION_X {
                            s.x = v;
                        } else {
                            s.y = v;
                        }
                        s.moved = true;
                    }
                    _ => self.malformed += 1,
                }
            }
            (EV_ABS, ABS_X | ABS_Y) => {
                // A touchscreen's single-touch emulation duplicates its contacts.
                if self.caps.mt_slots > 0 {
                    return;
                }
                let info = if ev.code == ABS_X {
                    self.caps.abs_x
                } else {
                    self.caps.abs_y
                };
                match info {
                    Some(info) => {
                        let v = normalize(ev.value, &info);
                        if ev.code == ABS_X {
                            self.abs.0 = v;
                        } else {
                            self.abs.1 = v;
                        }
                        self.abs_moved = true;
                    }
                    None => self.malformed += 1,
                }
            }
            // Other axes and event types (MSC, LED, pressure, ...) have no kbdif event.
            _ => {}
        }
    }

    fn reset_frame(&mut self) {
        self.keys.clear();
        self.rel = (0, 0, 0);
        self.abs_moved = false;
        for s in &mut self.slots {
            s.down = s.was_down;
            s.moved = false;
        }
    }

    fn flush(&mut self, out: &mut Vec<Input>) {
        out.append(&mut self.keys);
        let mut touched = false;
        for (i, s) in self.slots.iter_mut().enumerate() {
            let slot = i as u8;
            match (s.was_down, s.down) {
                (false, true) => out.push(Input::TouchDown {
                    slot,
                    x: s.x,
                    y: s.y,
                }),
                (true, true) if s.moved => out.push(Input::TouchMove {
                    slot,
                    x: s.x,
                    y: s.y,
                }),
                (true, false) => out.push(Input::TouchUp { slot }),
                _ => {
                    s.moved = false;
                    continue;
                }
            }
            touched = true;
            s.was_down = s.down;
            s.moved = false;
        }
        if touched {
            out.push(Input::TouchFrame);
        }
        let (dx, dy, wheel) = std::mem::take(&mut self.rel);
        if self.abs_moved {
            out.push(Input::Abs {
                x: self.abs.0,
                y: self.abs.1,
                wheel,
            });
            self.abs_moved = false;
        } else if (dx, dy, wheel) != (0, 0, 0) {
            out.push(Input::Motion { dx, dy, wheel });
        }
    }

    /// The device vanished: whatever is down is released (the vkbd device knows what
    /// it sent down, and lifts it).
    pub fn vanished(&mut self, out: &mut Vec<Input>) {
        self.reset_frame();
        for s in &mut self.slots {
            *s = Slot::default();
        }
        out.push(Input::ReleaseAll);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(max: i32) -> Option<AbsInfo> {
        Some(AbsInfo {
            maximum: max,
            ..AbsInfo::default()
        })
    }

    fn touch() -> Translator {
        Translator::new(Caps {
            mt_x: info(4095),
            mt_y: info(4095),
            mt_slots: 10,
            ..Caps::default()
        })
    }

    fn run(t: &mut Translator, evs: &[(u16, u16, i32)]) -> Vec<Input> {
        let mut out = Vec::new();
        for &(ty, code, value) in evs {
            t.feed(&RawEvent::new(ty, code, value), &mut out);
        }
        out
    }

    #[test]
    fn two_finger_gesture() {
        let mut t = touch();
        let out = run(
            &mut t,
            &[
                (EV_ABS, ABS_MT_SLOT, 0),
                (EV_ABS, ABS_MT_TRACKING_ID, 7),
                (EV_ABS, ABS_MT_POSITION_X, 0),
                (EV_ABS, ABS_MT_POSITION_Y, 4095),
                (EV_KEY, 0x14a, 1),
                (EV_ABS, ABS_MT_SLOT, 1),
                (EV_ABS, ABS_MT_TRACKING_ID, 8),
                (EV_ABS, ABS_MT_POSITION_X, 4095),
                (EV_ABS, ABS_MT_POSITION_Y, 0),
                (EV_ABS, ABS_X, 0),
                (EV_SYN, SYN_REPORT, 0),
                (EV_ABS, ABS_MT_SLOT, 0),
                (EV_ABS, ABS_MT_POSITION_X, 2048),
                (EV_SYN, SYN_REPORT, 0),
                (EV_ABS, ABS_MT_TRACKING_ID, -1),
                (EV_ABS, ABS_MT_SLOT, 1),
                (EV_ABS, ABS_MT_TRACKING_ID, -1),
                (EV_SYN, SYN_REPORT, 0),
            ],
        );
        let n = NORM_MAX;
        assert_eq!(
            out,
            vec![
                Input::TouchDown {
                    slot: 0,
                    x: 0,
                    y: n
                },
                Input::TouchDown {
                    slot: 1,
                    x: n,
                    y: 0
                },
                Input::TouchFrame,
                Input::TouchMove {
                    slot: 0,
                    x: 2048 * n / 4095,
                    y: n
                },
                Input::TouchFrame,
                Input::TouchUp { slot: 0 },
                Input::TouchUp { slot: 1 },
                Input::TouchFrame,
            ]
        );
        assert_eq!(t.malformed, 0);
    }

    #[test]
    fn malformed_events_are_counted_not_fatal() {
        let mut t = touch();
        let out = run(
            &mut t,
            &[
                (EV_ABS, ABS_MT_SLOT, 99),
                (EV_ABS, ABS_MT_TRACKING_ID, 1),
                (EV_ABS, ABS_MT_POSITION_X, 5),
                (EV_KEY, 30, 7),
                (EV_SYN, SYN_REPORT, 0),
                (EV_ABS, ABS_MT_SLOT, 0),
                (EV_ABS, ABS_MT_TRACKING_ID, 1),
                (EV_SYN, SYN_DROPPED, 0),
                (EV_KEY, 30, 1),
                (EV_SYN, SYN_REPORT, 0),
                (EV_KEY, 30, 1),
                (EV_SYN, SYN_REPORT, 0),
            ],
        );
        assert_eq!(t.malformed, 5);
        // The dropped frame is gone entirely; the next one goes through.
        assert_eq!(
            out,
            vec![Input::Key {
                code: 30,
                pressed: true
            }]
        );
    }

    #[test]
    fn keyboard_mouse_and_tablet() {
        let mut kbd = Translator::new(Caps::default());
        let out = run(
            &mut kbd,
            &[
                (EV_KEY, 42, 1),
                (EV_KEY, 30, 1),
                (EV_SYN, SYN_REPORT, 0),
                (EV_KEY, 30, 2),
                (EV_SYN, SYN_REPORT, 0),
                (EV_REL, REL_X, 3),
                (EV_REL, REL_X, 2),
                (EV_REL, REL_WHEEL, -1),
                (EV_SYN, SYN_REPORT, 0),
            ],
        );
        assert_eq!(
            out,
            vec![
                Input::Key {
                    code: 42,
                    pressed: true
                },
                Input::Key {
                    code: 30,
                    pressed: true
                },
                Input::Motion {
                    dx: 5,
                    dy: 0,
                    wheel: -1
                },
            ]
        );
        let mut tablet = Translator::new(Caps {
            abs_x: Some(AbsInfo {
                minimum: 100,
                maximum: 1100,
                ..AbsInfo::default()
            }),
            abs_y: info(1000),
            ..Caps::default()
        });
        let out = run(
            &mut tablet,
            &[
                (EV_ABS, ABS_X, 1100),
                (EV_ABS, ABS_Y, 500),
                (EV_SYN, SYN_REPORT, 0),
            ],
        );
        assert_eq!(
            out,
            vec![Input::Abs {
                x: NORM_MAX,
                y: NORM_MAX / 2,
                wheel: 0
            }]
        );
    }

    #[test]
    fn vanishing_mid_gesture_releases_everything() {
        let mut t = touch();
        let mut out = run(
            &mut t,
            &[
                (EV_ABS, ABS_MT_TRACKING_ID, 1),
                (EV_SYN, SYN_REPORT, 0),
                (EV_ABS, ABS_MT_POSITION_X, 9),
            ],
        );
        t.vanished(&mut out);
        assert_eq!(out.last(), Some(&Input::ReleaseAll));
    }
}
