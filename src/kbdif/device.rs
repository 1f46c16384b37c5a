//! The `vkbd` device kind: one shared page with the in-event ring and one event channel
//! per device; the parameters the toolstack wrote in our backend directory (xl.cfg
//! `vkb = [...]`), the features we advertise, what the frontend requested, and the
//! translation of backend-neutral [`Input`] into kbdif events.

use std::collections::BTreeSet;

use tracing::{debug, info, warn};

use crate::displif::device::{parse_u32, valid_unique_id, MAX_DIMENSION};
use crate::log_limit::LogLimiter;
use crate::xen::xenstore::Tx;
use crate::xen::{DomId, EvtchnPort, GrantRef, Platform};
use crate::xenbus::{DeviceError, DeviceIds, DeviceKind, Effects, XenbusDevice};

use super::ring::{GarbageIndex, InProducer};
use super::wire::{field, InEvent, DEFAULT_HEIGHT, DEFAULT_WIDTH, RAW_MAX};

/// Most multi-touch contacts we accept from the toolstack (`contact_id` is a u8; Linux
/// allocates one slot per contact).
pub const MAX_CONTACTS: u32 = 64;
/// Absolute input values are normalized to `0..=NORM_MAX` by the source; the device
/// scales them to the guest's declared size.
pub const NORM_MAX: u32 = 0xffff;
/// First key code of the pointer's buttons (`BTN_MISC`) and the first key code after
/// them (`KEY_OK`): Linux routes 0x100..0x160 to the pointer device.
const BTN_FIRST: u32 = 0x100;
const BTN_END: u32 = 0x160;
/// `KEY_MAX`.
const KEY_MAX: u32 = 0x2ff;

/// Input for one guest device, independent of where it came from (evdev, a test).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Input {
    /// A key or button (`KEY_*` / `BTN_*` code).
    Key {
        code: u32,
        pressed: bool,
    },
    /// Relative pointer motion and wheel.
    Motion {
        dx: i32,
        dy: i32,
        wheel: i32,
    },
    /// Absolute pointer position (normalized, `0..=NORM_MAX`) and wheel.
    Abs {
        x: u32,
        y: u32,
        wheel: i32,
    },
    /// A contact touches down in `slot` (normalized position).
    TouchDown {
        slot: u8,
        x: u32,
        y: u32,
    },
    TouchMove {
        slot: u8,
        x: u32,
        y: u32,
    },
    TouchUp {
        slot: u8,
    },
    /// The end of one multi-touch frame.
    TouchFrame,
    /// The source vanished: lift every contact and release every key still down.
    ReleaseAll,
}

/// The device's parameters from our backend directory (the toolstack's, validated).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VkbdParams {
    pub disable_keyboard: bool,
    pub disable_pointer: bool,
    pub width: u32,
    pub height: u32,
    pub mt_width: u32,
    pub mt_height: u32,
    /// 0: no multi-touch.
    pub mt_contacts: u32,
    pub unique_id: Option<String>,
}

/// Counters of one device (kept across connections).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VkbdStats {
    /// Events put on the ring.
    pub sent: u64,
    /// Events lost to a full ring (the guest does not consume).
    pub dropped: u64,
    /// Input the guest cannot take (feature disabled or not requested, contact out of
    /// range, a lift of a contact that is not down).
    pub filtered: u64,
}

/// A live connection.
pub struct KbdLive {
    ring: InProducer,
    pub port: EvtchnPort,
    /// `request-abs-pointer`, `request-raw-pointer`, `request-multi-touch`.
    pub abs: bool,
    pub raw: bool,
    pub mt: bool,
    /// Contacts down (bit per slot).
    down: u64,
    /// The contact the last multi-touch event named.
    cur: u8,
    /// Keys and buttons pressed.
    keys: BTreeSet<u32>,
}

/// The vkbd device kind.
#[derive(Default)]
pub struct Vkbd {
    pub params: Option<VkbdParams>,
    pub live: Option<KbdLive>,
    pub stats: VkbdStats,
    /// Ring-full and filtered warnings.
    log: LogLimiter,
}

/// One vkbd device of one frontend domain.
pub type KbdDevice = XenbusDevice<Vkbd>;

fn flag(plat: &mut Platform, path: &str) -> Result<bool, DeviceError> {
    Ok(match plat.store.read(Tx::NONE, path)? {
        None => false,
        Some(v) => match parse_u32(&v) {
            Some(0) => false,
            Some(1) => true,
            _ => return Err(DeviceError::Config(format!("{path} = {v:?} is not 0 or 1"))),
        },
    })
}

fn number(
    plat: &mut Platform,
    path: &str,
    default: u32,
    range: std::ops::RangeInclusive<u32>,
) -> Result<u32, DeviceError> {
    let Some(v) = plat.store.read(Tx::NONE, path)? else {
        return Ok(default);
    };
    parse_u32(&v)
        .filter(|n| range.contains(n))
        .ok_or_else(|| DeviceError::Config(format!("{path} = {v:?} is not in {range:?}")))
}

/// Read and validate what the toolstack put in our backend directory.
pub fn read_params(plat: &mut Platform, be_path: &str) -> Result<VkbdParams, DeviceError> {
    let p = |f: &str| format!("{be_path}/{f}");
    let unique_id = plat.store.read(Tx::NONE, &p(field::UNIQUE_ID))?;
    if let Some(id) = &unique_id {
        if !valid_unique_id(id) {
            return Err(DeviceError::Config(format!(
                "{} = {id:?} is not a valid id",
                p(field::UNIQUE_ID)
            )));
        }
    }
    let dims = 1..=MAX_DIMENSION;
    Ok(VkbdParams {
        disable_keyboard: flag(plat, &p(field::FEAT_DSBL_KEYBRD))?,
        disable_pointer: flag(plat, &p(field::FEAT_DSBL_POINTER))?,
        width: number(plat, &p(field::WIDTH), DEFAULT_WIDTH, dims.clone())?,
        height: number(plat, &p(field::HEIGHT), DEFAULT_HEIGHT, dims.clone())?,
        mt_width: number(plat, &p(field::MT_WIDTH), DEFAULT_WIDTH, dims.clone())?,
        mt_height: number(plat, &p(field::MT_HEIGHT), DEFAULT_HEIGHT, dims)?,
        mt_contacts: number(plat, &p(field::MT_NUM_CONTACTS), 0, 0..=MAX_CONTACTS)?,
        unique_id,
    })
}

/// `v` (`0..=NORM_MAX`) scaled to `0..=max`.
pub fn scale(v: u32, max: u32) -> i32 {
    let v = u64::from(v.min(NORM_MAX));
    // At most MAX_DIMENSION or RAW_MAX: fits an i32.
    (v * u64::from(max) / u64::from(NORM_MAX)) as i32
}

impl DeviceKind for Vkbd {
    const TYPE: &'static str = "vkbd";
    /// libxl's kind for `backend-type=linux` (a user-space backend in a Linux domain);
    /// `backend/vkbd` is QEMU's (`backend-type=qemu`).
    const BACKEND_DIR: &'static str = "vinput";
    type Ctx = ();

    fn span(dom: DomId, dev: u32) -> tracing::Span {
        tracing::info_span!("vkbd", dom = dom.0, dev)
    }

    fn advertise(&mut self, plat: &mut Platform, ids: &DeviceIds) -> Result<(), DeviceError> {
        let params = read_params(plat, &ids.be_path)?;
        let w = |plat: &mut Platform, f: &str, v: &str| {
            plat.store
                .write(Tx::NONE, &format!("{}/{f}", ids.be_path), v)
        };
        w(plat, field::FEAT_ABS_POINTER, "1")?;
        w(plat, field::FEAT_RAW_POINTER, "1")?;
        let mt = if params.mt_contacts > 0 { "1" } else { "0" };
        w(plat, field::FEAT_MTOUCH, mt)?;
        self.params = Some(params);
        Ok(())
    }

    fn connect(
        &mut self,
        plat: &mut Platform,
        _ctx: &mut (),
        ids: &DeviceIds,
        fx: &mut Effects,
    ) -> Result<(), DeviceError> {
        let params = self
            .params
            .clone()
            .ok_or_else(|| DeviceError::Config("no parameters".into()))?;
        let p = |f: &str| format!("{}/{f}", ids.fe_path);
        let read = |plat: &mut Platform, f: &str| -> Result<u32, DeviceError> {
            let path = p(f);
            let v = plat
                .store
                .read(Tx::NONE, &path)?
                .ok_or_else(|| DeviceError::Config(format!("{path} is missing")))?;
            parse_u32(&v)
                .ok_or_else(|| DeviceError::Config(format!("{path} = {v:?} is not a number")))
        };
        let gref = read(plat, field::RING_GREF)?;
        let remote = read(plat, field::EVT_CHANNEL)?;
        if gref == 0 {
            return Err(DeviceError::Config(format!(
                "{}: grant ref 0",
                p(field::RING_GREF)
            )));
        }
        // Requests for features we did not advertise have no effect (kbdif.h).
        let abs = flag(plat, &p(field::REQ_ABS_POINTER))?;
        let raw = abs && flag(plat, &p(field::REQ_RAW_POINTER))?;
        let mt = params.mt_contacts > 0 && flag(plat, &p(field::REQ_MTOUCH))?;
        let page = plat.grants.map(ids.dom, &[GrantRef(gref)], true)?;
        let port = plat.evtchn.bind_interdomain(ids.dom, EvtchnPort(remote))?;
        fx.bound.push((port, 0));
        info!(abs, raw, mt, "event page mapped");
        self.live = Some(KbdLive {
            ring: InProducer::new(page),
            port,
            abs,
            raw,
            mt,
            down: 0,
            cur: 0,
            keys: BTreeSet::new(),
        });
        Ok(())
    }

    fn disconnect(&mut self, plat: &mut Platform, _ctx: &mut (), fx: &mut Effects) {
        if let Some(live) = self.live.take() {
            let st = self.stats;
            info!(
                sent = st.sent,
                dropped = st.dropped,
                filtered = st.filtered,
                "input events of this device so far"
            );
            if let Err(e) = plat.evtchn.unbind(live.port) {
                warn!("unbinding {:?}: {e}", live.port);
            }
            fx.unbound.push(live.port);
        }
    }

    fn is_connected(&self) -> bool {
        self.live.is_some()
    }

    fn connect_when_frontend_connected() -> bool {
        // xen-kbdfront goes Connected as soon as it sees our InitWait, without waiting
        // for us: a Connected frontend has published its page and channel.
        true
    }
}

impl Vkbd {
    /// Translate `input` into the kbdif events this guest can take; the rest is counted
    /// in `filtered`.
    fn translate(&mut self, input: &[Input], out: &mut Vec<InEvent>) {
        let (Some(params), Some(live)) = (self.params.as_ref(), self.live.as_mut()) else {
            return;
        };
        let mut filtered = 0u64;
        for ev in input {
            match *ev {
                Input::Key { code, pressed } => {
                    let pointer = (BTN_FIRST..BTN_END).contains(&code);
                    let disabled = if pointer {
                        params.disable_pointer
                    } else {
                        params.disable_keyboard
                    };
                    if disabled || code > KEY_MAX || code == 0 {
                        filtered += 1;
                        continue;
                    }
                    if pressed {
                        live.keys.insert(code);
                    } else {
                        live.keys.remove(&code);
                    }
                    out.push(InEvent::Key {
                        pressed,
                        keycode: code,
                    });
                }
                Input::Motion { dx, dy, wheel } => {
                    if params.disable_pointer || (live.abs && (dx != 0 || dy != 0)) {
                        filtered += 1;
                        continue;
                    }
                    out.push(InEvent::Motion {
                        rel_x: dx,
                        rel_y: dy,
                        rel_z: wheel,
                    });
                }
                Input::Abs { x, y, wheel } => {
                    if params.disable_pointer || !live.abs {
                        filtered += 1;
                        continue;
                    }
                    let (mx, my) = if live.raw {
                        (RAW_MAX, RAW_MAX)
                    } else {
                        (params.width, params.height)
                    };
                    out.push(InEvent::Position {
                        abs_x: scale(x, mx),
                        abs_y: scale(y, my),
                        rel_z: wheel,
                    });
                }
                Input::TouchDown { slot, x, y } | Input::TouchMove { slot, x, y } => {
                    let down = matches!(ev, Input::TouchDown { .. });
                    let is_down = live.down & (1u64 << (slot % 64)) != 0;
                    if !live.mt || u32::from(slot) >= params.mt_contacts || (!down && !is_down) {
                        filtered += 1;
                        continue;
                    }
                    live.down |= 1u64 << slot;
                    live.cur = slot;
                    let (x, y) = (scale(x, params.mt_width), scale(y, params.mt_height));
                    out.push(if down && !is_down {
                        InEvent::TouchDown {
                            contact: slot,
                            x,
                            y,
                        }
                    } else {
                        InEvent::TouchMotion {
                            contact: slot,
                            x,
                            y,
                        }
                    });
                }
                Input::TouchUp { slot } => {
                    if !live.mt
                        || u32::from(slot) >= params.mt_contacts
                        || live.down & (1u64 << slot) == 0
                    {
                        filtered += 1;
                        continue;
                    }
                    live.down &= !(1u64 << slot);
                    live.cur = slot;
                    out.push(InEvent::TouchUp { contact: slot });
                }
                Input::TouchFrame => {
                    if !live.mt {
                        filtered += 1;
                        continue;
                    }
                    out.push(InEvent::TouchFrame { contact: live.cur });
                }
                Input::ReleaseAll => {
                    if live.down != 0 {
                        for slot in 0..64u8 {
                            if live.down & (1u64 << slot) != 0 {
                                out.push(InEvent::TouchUp { contact: slot });
                                live.cur = slot;
                            }
                        }
                        live.down = 0;
                        out.push(InEvent::TouchFrame { contact: live.cur });
                    }
                    for code in std::mem::take(&mut live.keys) {
                        out.push(InEvent::Key {
                            pressed: false,
                            keycode: code,
                        });
                    }
                }
            }
        }
        self.stats.filtered += filtered;
    }
}

impl XenbusDevice<Vkbd> {
    /// Deliver `input` to the guest: translate, put what fits on the ring, notify. A
    /// full ring loses events (counted, rate-limited log). A garbage consumer index
    /// means a broken ring: the caller closes this device.
    pub fn deliver(&mut self, plat: &mut Platform, input: &[Input]) -> Result<(), GarbageIndex> {
        let _span = self.span.clone().entered();
        let mut events = Vec::with_capacity(input.len() + 4);
        self.kind.translate(input, &mut events);
        let Some(live) = self.kind.live.as_mut() else {
            return Ok(());
        };
        if events.is_empty() {
            return Ok(());
        }
        let slots: Vec<_> = events.iter().map(InEvent::encode).collect();
        let pushed = live.ring.push(&slots)?;
        if pushed.sent > 0 {
            let _ = plat.evtchn.notify(live.port);
        }
        self.kind.stats.sent += u64::from(pushed.sent);
        if pushed.dropped > 0 {
            self.kind.stats.dropped += u64::from(pushed.dropped);
            if let Some(suppressed) = self.kind.log.allow() {
                warn!(
                    suppressed,
                    dropped = self.kind.stats.dropped,
                    "event ring full (the guest does not consume): input lost"
                );
            }
        }
        debug!(sent = pushed.sent, "input delivered");
        Ok(())
    }

    /// The `unique-id` the toolstack gave this device.
    pub fn unique_id(&self) -> Option<&str> {
        self.kind.params.as_ref()?.unique_id.as_deref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scaling_covers_the_declared_range() {
        assert_eq!(scale(0, 1920), 0);
        assert_eq!(scale(NORM_MAX, 1920), 1920);
        assert_eq!(scale(NORM_MAX / 2 + 1, 1080), 540);
        assert_eq!(scale(u32::MAX, 1080), 1080);
        assert_eq!(scale(NORM_MAX, RAW_MAX), RAW_MAX as i32);
    }
}
