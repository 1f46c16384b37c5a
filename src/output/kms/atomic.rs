//! Atomic modesetting for the KMS output: property lookup by name, the primary plane of
//! a CRTC, plane geometry (scaled or 1:1), and the commits (modeset, flip, restore).
//!
//! Everything that needs no device is a plain function or value here
//! ([`PropMap`], [`PlaneGeom`], [`fit_rect`], the `*_values` request builders), so it is
//! unit-tested without a card; the `commit_*` functions only turn those values into an
//! `ATOMIC` ioctl.

use std::io;

use drm::control::atomic::AtomicModeReq;
use drm::control::{
    connector, crtc, framebuffer, plane, property, AtomicCommitFlags, Device as ControlDevice,
    Mode, PlaneType, RawResourceHandle, ResourceHandle,
};

/// The properties of one KMS object, by name, with the values they had when read.
#[derive(Clone, Debug, Default)]
pub struct PropMap {
    props: Vec<(String, property::Handle, u64)>,
}

impl PropMap {
    /// A map of `(name, handle, value)` entries.
    pub fn from_entries(
        entries: impl IntoIterator<Item = (String, property::Handle, u64)>,
    ) -> Self {
        PropMap {
            props: entries.into_iter().collect(),
        }
    }

    /// Read every property of `obj` (one `GETPROPERTY` per property for its name).
    pub fn read<D: ControlDevice, T: ResourceHandle>(card: &D, obj: T) -> io::Result<PropMap> {
        let set = card.get_properties(obj)?;
        let (ids, vals) = set.as_props_and_values();
        let mut props = Vec::with_capacity(ids.len());
        for (&id, &value) in ids.iter().zip(vals) {
            let info = card.get_property(id)?;
            props.push((info.name().to_string_lossy().into_owned(), id, value));
        }
        Ok(PropMap { props })
    }

    /// The handle of property `name`.
    pub fn handle(&self, name: &str) -> Option<property::Handle> {
        self.props.iter().find(|p| p.0 == name).map(|p| p.1)
    }

    /// The value property `name` had when read.
    pub fn value(&self, name: &str) -> Option<u64> {
        self.props.iter().find(|p| p.0 == name).map(|p| p.2)
    }

    /// The handles of all of `names`, in order; `Err` names the first one missing.
    pub fn handles<const N: usize>(
        &self,
        names: [&'static str; N],
    ) -> Result<[property::Handle; N], &'static str> {
        let mut out = Vec::with_capacity(N);
        for name in names {
            out.push(self.handle(name).ok_or(name)?);
        }
        // N entries were pushed, so the conversion cannot fail.
        out.try_into().map_err(|_| "?")
    }

    /// The values of all of `names`, in order (missing ones as 0).
    pub fn values<const N: usize>(&self, names: [&'static str; N]) -> [u64; N] {
        names.map(|n| self.value(n).unwrap_or(0))
    }
}

/// The plane properties a modeset writes, in [`PlaneProps`] order.
pub const PLANE_PROPS: [&str; 10] = [
    "FB_ID", "CRTC_ID", "SRC_X", "SRC_Y", "SRC_W", "SRC_H", "CRTC_X", "CRTC_Y", "CRTC_W", "CRTC_H",
];
/// The CRTC properties a modeset writes.
pub const CRTC_PROPS: [&str; 2] = ["MODE_ID", "ACTIVE"];

/// Handles of [`PLANE_PROPS`] of one plane.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PlaneProps(pub [property::Handle; 10]);

impl PlaneProps {
    pub fn fb_id(&self) -> property::Handle {
        self.0[0]
    }
    pub fn src_x(&self) -> property::Handle {
        self.0[2]
    }
    pub fn src_y(&self) -> property::Handle {
        self.0[3]
    }
}

/// Handles of [`CRTC_PROPS`] of one CRTC.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CrtcProps {
    pub mode_id: property::Handle,
    pub active: property::Handle,
}

/// A rectangle in pixels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rect {
    pub x: u32,
    pub y: u32,
    pub w: u32,
    pub h: u32,
}

/// The largest `src`-shaped rectangle (aspect ratio kept, sides rounded to the
/// nearest pixel, at least 1) that fits in `dst`, centred. `None` if either is empty.
pub fn fit_rect(src: (u32, u32), dst: (u32, u32)) -> Option<Rect> {
    let (sw, sh) = (u64::from(src.0), u64::from(src.1));
    let (dw, dh) = (u64::from(dst.0), u64::from(dst.1));
    if sw == 0 || sh == 0 || dw == 0 || dh == 0 {
        return None;
    }
    let (w, h) = if sw * dh <= sh * dw {
        // Relatively taller (or the same shape): full height.
        (((sw * dh + sh / 2) / sh).clamp(1, dw), dh)
    } else {
        (dw, ((sh * dw + sw / 2) / sw).clamp(1, dh))
    };
    // w <= dw and h <= dh, both from u32 values: the casts are lossless.
    let (w, h) = (w as u32, h as u32);
    Some(Rect {
        x: (dst.0 - w) / 2,
        y: (dst.1 - h) / 2,
        w,
        h,
    })
}

/// What the primary plane shows: `src` of the framebuffer (pixels) on `dst` of the CRTC.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PlaneGeom {
    pub src: Rect,
    pub dst: Rect,
}

impl PlaneGeom {
    /// 1:1 over the whole `mode`, the framebuffer read from `pos` (what legacy
    /// `SET_CRTC` does).
    pub fn full(pos: (u32, u32), mode: (u32, u32)) -> PlaneGeom {
        PlaneGeom {
            src: Rect {
                x: pos.0,
                y: pos.1,
                w: mode.0,
                h: mode.1,
            },
            dst: Rect {
                x: 0,
                y: 0,
                w: mode.0,
                h: mode.1,
            },
        }
    }

    /// A `size` image at `pos` of the framebuffer, scaled to fit `mode` (aspect kept,
    /// centred). `None` if either is empty.
    pub fn scaled(pos: (u32, u32), size: (u32, u32), mode: (u32, u32)) -> Option<PlaneGeom> {
        Some(PlaneGeom {
            src: Rect {
                x: pos.0,
                y: pos.1,
                w: size.0,
                h: size.1,
            },
            dst: fit_rect(size, mode)?,
        })
    }

    /// True if the plane scales (source and destination sizes differ).
    pub fn is_scaled(&self) -> bool {
        (self.src.w, self.src.h) != (self.dst.w, self.dst.h)
    }

    /// Values for [`PLANE_PROPS`] from `SRC_X` on: source in 16.16 fixed point,
    /// destination in pixels.
    pub fn prop_values(&self) -> [u64; 8] {
        let fixed = |v: u32| u64::from(v) << 16;
        [
            fixed(self.src.x),
            fixed(self.src.y),
            fixed(self.src.w),
            fixed(self.src.h),
            u64::from(self.dst.x),
            u64::from(self.dst.y),
            u64::from(self.dst.w),
            u64::from(self.dst.h),
        ]
    }
}

/// One property assignment of an atomic request.
pub type Assign = (RawResourceHandle, property::Handle, u64);

fn raw<H: ResourceHandle>(h: H) -> RawResourceHandle {
    h.into()
}

fn id<H: ResourceHandle>(h: Option<H>) -> u64 {
    h.map_or(0, |h| u64::from(Into::<u32>::into(h)))
}

/// The connectors of a modeset (or restore) and their `CRTC_ID` property.
#[derive(Clone, Debug)]
pub struct ConnProps {
    pub conn: connector::Handle,
    pub crtc_id: property::Handle,
    /// `CRTC_ID` before we took the CRTC.
    pub saved: u64,
}

/// Everything a connector on the atomic path needs: the objects, their property
/// handles, and their state before we took them (restored on disable).
#[derive(Clone, Debug)]
pub struct AtomicState {
    pub crtc: crtc::Handle,
    pub plane: plane::Handle,
    pub crtc_props: CrtcProps,
    pub plane_props: PlaneProps,
    /// Our connector first, then any other connector that was on the CRTC.
    pub conns: Vec<ConnProps>,
    /// `ACTIVE` before we took the CRTC.
    pub saved_active: u64,
    /// [`PLANE_PROPS`] values before we took the plane.
    pub saved_plane: [u64; 10],
    /// What the plane shows now (kept current by the commits).
    pub geom: PlaneGeom,
}

/// The primary plane for `crtc` among `planes` as `(plane, possible on crtc, type,
/// current crtc)`: one on `crtc` now first, else the first possible one not in `taken`.
pub fn pick_primary<P: Copy + PartialEq>(
    planes: &[(P, bool, u64, bool)],
    taken: &[P],
) -> Option<P> {
    let ok = |p: &&(P, bool, u64, bool)| {
        p.1 && p.2 == PlaneType::Primary as u64 && !taken.contains(&p.0)
    };
    planes
        .iter()
        .filter(ok)
        .find(|p| p.3)
        .or_else(|| planes.iter().find(ok))
        .map(|p| p.0)
}

impl AtomicState {
    /// Look up what an atomic modeset of `conn` on `crtc` needs, and save the current
    /// state. `others` are connectors now on `crtc` (taken off it by the modeset);
    /// `taken` are planes other connectors of ours use. `Err` says what is missing.
    pub fn probe<D: ControlDevice>(
        card: &D,
        crtc: crtc::Handle,
        conn: connector::Handle,
        others: &[connector::Handle],
        taken: &[plane::Handle],
    ) -> Result<AtomicState, String> {
        let res = card
            .resource_handles()
            .map_err(|e| format!("resources: {e}"))?;
        let mut planes = Vec::new();
        for p in card.plane_handles().map_err(|e| format!("planes: {e}"))? {
            let Ok(info) = card.get_plane(p) else {
                continue;
            };
            let possible = res.filter_crtcs(info.possible_crtcs()).contains(&crtc);
            let kind = PropMap::read(card, p)
                .ok()
                .and_then(|m| m.value("type"))
                .unwrap_or(u64::MAX);
            planes.push((p, possible, kind, info.crtc() == Some(crtc)));
        }
        let plane = pick_primary(&planes, taken).ok_or("no free primary plane for the CRTC")?;
        let pm = PropMap::read(card, plane).map_err(|e| format!("plane properties: {e}"))?;
        let plane_props = PlaneProps(
            pm.handles(PLANE_PROPS)
                .map_err(|n| format!("plane has no {n}"))?,
        );
        let cm = PropMap::read(card, crtc).map_err(|e| format!("CRTC properties: {e}"))?;
        let [mode_id, active] = cm
            .handles(CRTC_PROPS)
            .map_err(|n| format!("CRTC has no {n}"))?;
        let mut conns = Vec::new();
        for &c in std::iter::once(&conn).chain(others.iter().filter(|&&o| o != conn)) {
            let m = PropMap::read(card, c).map_err(|e| format!("connector properties: {e}"))?;
            let [crtc_id] = m
                .handles(["CRTC_ID"])
                .map_err(|n| format!("connector has no {n}"))?;
            conns.push(ConnProps {
                conn: c,
                crtc_id,
                saved: m.value("CRTC_ID").unwrap_or(0),
            });
        }
        Ok(AtomicState {
            crtc,
            plane,
            crtc_props: CrtcProps { mode_id, active },
            plane_props,
            conns,
            saved_active: cm.value("ACTIVE").unwrap_or(0),
            saved_plane: pm.values(PLANE_PROPS),
            geom: PlaneGeom::full((0, 0), (0, 0)),
        })
    }

    /// A modeset: `mode_blob` on the CRTC, our connector (only) on it, `fb` shown with
    /// `geom` by the primary plane.
    pub fn modeset_values(
        &self,
        mode_blob: u64,
        fb: framebuffer::Handle,
        geom: &PlaneGeom,
    ) -> Vec<Assign> {
        let mut v = Vec::new();
        for (i, c) in self.conns.iter().enumerate() {
            let on = if i == 0 { id(Some(self.crtc)) } else { 0 };
            v.push((raw(c.conn), c.crtc_id, on));
        }
        v.push((raw(self.crtc), self.crtc_props.mode_id, mode_blob));
        v.push((raw(self.crtc), self.crtc_props.active, 1));
        let p = raw(self.plane);
        v.push((p, self.plane_props.0[0], id(Some(fb))));
        v.push((p, self.plane_props.0[1], id(Some(self.crtc))));
        for (h, val) in self.plane_props.0[2..].iter().zip(geom.prop_values()) {
            v.push((p, *h, val));
        }
        v
    }

    /// A flip (or same-mode switch) to `fb`, read from `pos`: `FB_ID`, and the source
    /// position only if it changes.
    pub fn flip_values(&self, fb: framebuffer::Handle, pos: (u32, u32)) -> Vec<Assign> {
        let p = raw(self.plane);
        let mut v = vec![(p, self.plane_props.fb_id(), id(Some(fb)))];
        if pos.0 != self.geom.src.x {
            v.push((p, self.plane_props.src_x(), u64::from(pos.0) << 16));
        }
        if pos.1 != self.geom.src.y {
            v.push((p, self.plane_props.src_y(), u64::from(pos.1) << 16));
        }
        v
    }

    /// Back to the saved state: `mode_blob` is the saved mode (0 if there was none).
    pub fn restore_values(&self, mode_blob: u64) -> Vec<Assign> {
        let mut v: Vec<Assign> = self
            .conns
            .iter()
            .map(|c| (raw(c.conn), c.crtc_id, c.saved))
            .collect();
        let active = if mode_blob == 0 { 0 } else { self.saved_active };
        v.push((raw(self.crtc), self.crtc_props.mode_id, mode_blob));
        v.push((raw(self.crtc), self.crtc_props.active, active));
        let p = raw(self.plane);
        for (h, val) in self.plane_props.0.iter().zip(self.saved_plane) {
            v.push((p, *h, val));
        }
        v
    }
}

fn request(values: &[Assign]) -> AtomicModeReq {
    let mut req = AtomicModeReq::new();
    for &(obj, prop, value) in values {
        req.add_raw_property(obj, prop, value);
    }
    req
}

/// A `MODE_ID` blob of `mode`, destroyed on drop (the committed state keeps its own
/// reference).
struct ModeBlob<'a, D: ControlDevice> {
    card: &'a D,
    id: u64,
}

impl<'a, D: ControlDevice> ModeBlob<'a, D> {
    fn new(card: &'a D, mode: &Mode) -> io::Result<Self> {
        match card.create_property_blob(mode)? {
            property::Value::Blob(id) => Ok(ModeBlob { card, id }),
            _ => Err(io::ErrorKind::InvalidData.into()),
        }
    }
}

impl<D: ControlDevice> Drop for ModeBlob<'_, D> {
    fn drop(&mut self) {
        if let Err(e) = self.card.destroy_property_blob(self.id) {
            tracing::debug!("destroying a mode blob: {e}");
        }
    }
}

/// Modeset `st` to `mode` showing `fb` with `geom`: blocking, non-blocking with a
/// flip-complete event (`nonblock`), or only tested with `test_only`. On success (not a
/// test) `st.geom` becomes `geom`.
pub fn commit_modeset<D: ControlDevice>(
    card: &D,
    st: &mut AtomicState,
    mode: &Mode,
    fb: framebuffer::Handle,
    geom: &PlaneGeom,
    test_only: bool,
    nonblock: bool,
) -> io::Result<()> {
    let blob = ModeBlob::new(card, mode)?;
    let mut flags = AtomicCommitFlags::ALLOW_MODESET;
    if test_only {
        flags |= AtomicCommitFlags::TEST_ONLY;
    } else if nonblock {
        flags |= AtomicCommitFlags::NONBLOCK | AtomicCommitFlags::PAGE_FLIP_EVENT;
    }
    card.atomic_commit(flags, request(&st.modeset_values(blob.id, fb, geom)))?;
    if !test_only {
        st.geom = *geom;
    }
    Ok(())
}

/// Show `fb` (read from `pos`) in the current mode: a non-blocking flip with a
/// flip-complete event (`event`), or a blocking switch without one.
pub fn commit_flip<D: ControlDevice>(
    card: &D,
    st: &mut AtomicState,
    fb: framebuffer::Handle,
    pos: (u32, u32),
    event: bool,
) -> io::Result<()> {
    let flags = if event {
        AtomicCommitFlags::PAGE_FLIP_EVENT | AtomicCommitFlags::NONBLOCK
    } else {
        AtomicCommitFlags::empty()
    };
    card.atomic_commit(flags, request(&st.flip_values(fb, pos)))?;
    st.geom.src.x = pos.0;
    st.geom.src.y = pos.1;
    Ok(())
}

/// Ask (`TEST_ONLY`) whether the plane would show `fb` (read from `pos`) in the current
/// mode. Drivers refuse what they cannot scan out in their check phase; one that fails
/// only while preparing the commit (VKMS vmapping an import) passes this.
pub fn test_flip<D: ControlDevice>(
    card: &D,
    st: &AtomicState,
    fb: framebuffer::Handle,
    pos: (u32, u32),
) -> io::Result<()> {
    card.atomic_commit(
        AtomicCommitFlags::TEST_ONLY,
        request(&st.flip_values(fb, pos)),
    )
}

/// Put back what was there before we took the CRTC (`saved_mode` from `GETCRTC`):
/// blocking, or non-blocking with a flip-complete event (`nonblock`).
pub fn commit_restore<D: ControlDevice>(
    card: &D,
    st: &AtomicState,
    saved_mode: Option<&Mode>,
    nonblock: bool,
) -> io::Result<()> {
    let blob = saved_mode.map(|m| ModeBlob::new(card, m)).transpose()?;
    let values = st.restore_values(blob.as_ref().map_or(0, |b| b.id));
    let mut flags = AtomicCommitFlags::ALLOW_MODESET;
    if nonblock {
        flags |= AtomicCommitFlags::NONBLOCK | AtomicCommitFlags::PAGE_FLIP_EVENT;
    }
    card.atomic_commit(flags, request(&values))
}

#[cfg(test)]
mod tests {
    use super::*;
    use drm::control::from_u32;

    fn h<T: From<RawResourceHandle>>(n: u32) -> T {
        from_u32(n).unwrap()
    }

    fn plane_map(base: u32) -> PropMap {
        let mut entries: Vec<(String, property::Handle, u64)> = PLANE_PROPS
            .iter()
            .enumerate()
            .map(|(i, n)| (n.to_string(), h(base + i as u32), 100 + i as u64))
            .collect();
        entries.push(("type".into(), h(base + 50), PlaneType::Primary as u64));
        PropMap::from_entries(entries)
    }

    fn state() -> AtomicState {
        let pm = plane_map(10);
        AtomicState {
            crtc: h(40),
            plane: h(31),
            crtc_props: CrtcProps {
                mode_id: h(1),
                active: h(2),
            },
            plane_props: PlaneProps(pm.handles(PLANE_PROPS).unwrap()),
            conns: vec![
                ConnProps {
                    conn: h(50),
                    crtc_id: h(3),
                    saved: 40,
                },
                ConnProps {
                    conn: h(51),
                    crtc_id: h(3),
                    saved: 40,
                },
            ],
            saved_active: 1,
            saved_plane: pm.values(PLANE_PROPS),
            geom: PlaneGeom::full((0, 0), (1024, 768)),
        }
    }

    #[test]
    fn prop_lookup() {
        let m = plane_map(10);
        assert_eq!(m.handle("FB_ID"), Some(h(10)));
        assert_eq!(m.handle("CRTC_H"), Some(h(19)));
        assert_eq!(m.value("SRC_W"), Some(104));
        assert_eq!(m.value("type"), Some(PlaneType::Primary as u64));
        assert_eq!(m.handle("IN_FORMATS"), None);
        assert_eq!(m.value("rotation"), None);
        let [fb, w] = m.handles(["FB_ID", "SRC_W"]).unwrap();
        assert_eq!((fb, w), (h(10), h(14)));
        assert_eq!(m.handles(["FB_ID", "zpos", "alpha"]), Err("zpos"));
        assert_eq!(m.values(["SRC_X", "zpos"]), [102, 0]);
        assert!(PropMap::default().handles(CRTC_PROPS).is_err());
        assert_eq!(PropMap::default().handles([]), Ok([]));
    }

    #[test]
    fn primary_plane_choice() {
        let (pri, ovl, cur) = (
            PlaneType::Primary as u64,
            PlaneType::Overlay as u64,
            PlaneType::Cursor as u64,
        );
        // (plane, possible on the CRTC, type, on the CRTC now)
        let planes = [
            (1, true, ovl, true),
            (2, false, pri, false),
            (3, true, pri, false),
            (4, true, pri, true),
            (5, true, cur, true),
        ];
        assert_eq!(pick_primary(&planes, &[]), Some(4));
        assert_eq!(pick_primary(&planes, &[4]), Some(3));
        assert_eq!(pick_primary(&planes, &[3, 4]), None);
        assert_eq!(pick_primary(&planes[..2], &[]), None);
        assert_eq!(pick_primary::<u32>(&[], &[]), None);
    }

    #[test]
    fn fit_keeps_aspect_and_centres() {
        let r = |x, y, w, h| Some(Rect { x, y, w, h });
        // Same shape: fills the mode.
        assert_eq!(fit_rect((800, 600), (1024, 768)), r(0, 0, 1024, 768));
        assert_eq!(fit_rect((1024, 768), (1024, 768)), r(0, 0, 1024, 768));
        // Wider image: full width, bars top and bottom.
        assert_eq!(fit_rect((1280, 720), (1024, 768)), r(0, 96, 1024, 576));
        // Taller image: full height, bars left and right.
        assert_eq!(fit_rect((768, 1024), (1920, 1080)), r(555, 0, 810, 1080));
        assert_eq!(fit_rect((1000, 700), (1024, 768)), r(0, 25, 1024, 717));
        // Downscaling too.
        assert_eq!(fit_rect((3840, 2160), (1920, 1200)), r(0, 60, 1920, 1080));
        // Rounded to the nearest pixel, never 0, never outside.
        assert_eq!(fit_rect((3, 1), (2, 2)), r(0, 0, 2, 1));
        assert_eq!(fit_rect((10000, 1), (100, 100)), r(0, 49, 100, 1));
        assert_eq!(fit_rect((1, 10000), (100, 100)), r(49, 0, 1, 100));
        // No overflow at the extremes.
        assert_eq!(
            fit_rect((u32::MAX, u32::MAX - 1), (u32::MAX, u32::MAX)),
            r(0, 0, u32::MAX, u32::MAX - 1)
        );
        // Empty.
        assert_eq!(fit_rect((0, 600), (1024, 768)), None);
        assert_eq!(fit_rect((800, 600), (1024, 0)), None);
    }

    #[test]
    fn plane_geometry() {
        let g = PlaneGeom::full((0, 0), (1024, 768));
        assert!(!g.is_scaled());
        assert_eq!(
            g.prop_values(),
            [0, 0, 1024 << 16, 768 << 16, 0, 0, 1024, 768]
        );
        let g = PlaneGeom::full((16, 8), (640, 480));
        assert_eq!(g.prop_values()[..2], [16 << 16, 8 << 16]);
        let g = PlaneGeom::scaled((0, 0), (1000, 700), (1024, 768)).unwrap();
        assert!(g.is_scaled());
        assert_eq!(
            g.prop_values(),
            [0, 0, 1000 << 16, 700 << 16, 0, 25, 1024, 717]
        );
        // Same size as the mode: a scaled layout that does not scale.
        let g = PlaneGeom::scaled((0, 0), (800, 600), (800, 600)).unwrap();
        assert!(!g.is_scaled());
        assert_eq!(PlaneGeom::scaled((0, 0), (0, 1), (800, 600)), None);
    }

    #[test]
    fn request_values() {
        let st = state();
        let fb: framebuffer::Handle = h(77);
        let g = PlaneGeom::scaled((0, 0), (1000, 700), (1024, 768)).unwrap();
        let v = st.modeset_values(99, fb, &g);
        let find = |obj: u32, prop: u32| {
            v.iter()
                .find(|a| a.0.get() == obj && Into::<u32>::into(a.1) == prop)
                .map(|a| a.2)
        };
        // Our connector on the CRTC, the other one off it.
        assert_eq!(find(50, 3), Some(40));
        assert_eq!(find(51, 3), Some(0));
        assert_eq!(find(40, 1), Some(99));
        assert_eq!(find(40, 2), Some(1));
        assert_eq!(find(31, 10), Some(77)); // FB_ID
        assert_eq!(find(31, 11), Some(40)); // CRTC_ID
        assert_eq!(find(31, 14), Some(1000 << 16)); // SRC_W
        assert_eq!(find(31, 17), Some(25)); // CRTC_Y
        assert_eq!(find(31, 19), Some(717)); // CRTC_H
        assert_eq!(v.len(), 2 + 2 + 10);

        // A flip changes FB_ID only, unless the source position moves.
        let v = st.flip_values(fb, (0, 0));
        assert_eq!(v, vec![(h(31), h(10), 77)]);
        let v = st.flip_values(fb, (0, 8));
        assert_eq!(v, vec![(h(31), h(10), 77), (h(31), h(13), 8 << 16)]);

        // Restore: the saved values, the new blob for the saved mode.
        let v = st.restore_values(5);
        assert!(v.contains(&(h(50), h(3), 40)));
        assert!(v.contains(&(h(51), h(3), 40)));
        assert!(v.contains(&(h(40), h(1), 5)));
        assert!(v.contains(&(h(40), h(2), 1)));
        assert!(v.contains(&(h(31), h(10), 100)));
        assert!(v.contains(&(h(31), h(19), 109)));
        // No saved mode: the CRTC goes inactive.
        let v = st.restore_values(0);
        assert!(v.contains(&(h(40), h(2), 0)));
        // The request merges per object without losing assignments.
        let _ = request(&st.modeset_values(99, fb, &g));
    }
}
