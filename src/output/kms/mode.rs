//! Mode choice and where a guest image sits in the chosen mode: pure planning, no ioctls.

use drm::control::{connector, Mode, ModeFlags, ModeTypeFlags};

use crate::output::Frame;

/// The KMS name of a connector: `<type>-<type id>`, e.g. `HDMI-A-1`, `Virtual-1`.
pub fn connector_name(interface: connector::Interface, type_id: u32) -> String {
    format!("{}-{}", interface.as_str(), type_id)
}

/// What [`choose_mode`] looks at in a mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ModeInfo {
    pub width: u32,
    pub height: u32,
    pub refresh: u32,
    pub preferred: bool,
    pub interlaced: bool,
}

impl From<&Mode> for ModeInfo {
    fn from(m: &Mode) -> Self {
        let (w, h) = m.size();
        ModeInfo {
            width: u32::from(w),
            height: u32::from(h),
            refresh: m.vrefresh(),
            preferred: m.mode_type().contains(ModeTypeFlags::PREFERRED),
            interlaced: m.flags().contains(ModeFlags::INTERLACE),
        }
    }
}

/// How a guest image sits in the chosen mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fit {
    /// The mode has the image's size.
    Exact,
    /// The mode is larger: the image is centred on black.
    Letterbox,
    /// No mode is large enough: the centre of the image is shown.
    Crop,
}

/// Pick a mode for a `width` x `height` guest image: an exact size match (preferred
/// first, then progressive, then the highest refresh); else the preferred mode if the
/// image fits in it; else the smallest mode the image fits in; else the preferred mode
/// (cropping). `None` only if there are no modes.
pub fn choose_mode(modes: &[ModeInfo], width: u32, height: u32) -> Option<(usize, Fit)> {
    let exact = modes
        .iter()
        .enumerate()
        .filter(|(_, m)| m.width == width && m.height == height)
        .max_by_key(|(i, m)| (m.preferred, !m.interlaced, m.refresh, std::cmp::Reverse(*i)));
    if let Some((i, _)) = exact {
        return Some((i, Fit::Exact));
    }
    let preferred = modes
        .iter()
        .position(|m| m.preferred)
        .or(if modes.is_empty() { None } else { Some(0) })?;
    let fits = |m: &ModeInfo| m.width >= width && m.height >= height;
    if fits(&modes[preferred]) {
        return Some((preferred, Fit::Letterbox));
    }
    let smallest = modes
        .iter()
        .enumerate()
        .filter(|(_, m)| fits(m))
        .min_by_key(|(i, m)| {
            (
                u64::from(m.width) * u64::from(m.height),
                m.interlaced,
                std::cmp::Reverse(m.refresh),
                *i,
            )
        });
    match smallest {
        Some((i, _)) => Some((i, Fit::Letterbox)),
        None => Some((preferred, Fit::Crop)),
    }
}

/// Where the visible part of a guest image goes in a scanout buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Placement {
    /// Top-left of the image in the buffer.
    pub dst_x: u32,
    pub dst_y: u32,
    /// Top-left of the shown part of the image (non-zero when cropping).
    pub src_x: u32,
    pub src_y: u32,
    /// Size of the shown part.
    pub width: u32,
    pub height: u32,
}

impl Placement {
    /// Centre a `w` x `h` image in a `mode_w` x `mode_h` buffer, cropping its centre if
    /// it is larger. With `even_x` the crop starts on an even column (YUYV pairs).
    pub fn centre(mode_w: u32, mode_h: u32, w: u32, h: u32, even_x: bool) -> Placement {
        fn axis(mode: u32, img: u32) -> (u32, u32, u32) {
            if img <= mode {
                ((mode - img) / 2, 0, img)
            } else {
                (0, (img - mode) / 2, mode)
            }
        }
        let (dst_x, mut src_x, width) = axis(mode_w, w);
        let (dst_y, src_y, height) = axis(mode_h, h);
        if even_x {
            src_x &= !1;
        }
        Placement {
            dst_x,
            dst_y,
            src_x,
            src_y,
            width,
            height,
        }
    }

    /// True if the image covers the whole `mode_w` x `mode_h` buffer.
    pub fn covers(&self, mode_w: u32, mode_h: u32) -> bool {
        self.dst_x == 0 && self.dst_y == 0 && self.width == mode_w && self.height == mode_h
    }

    /// The shown part of `frame` as a frame of its own; `None` on overflow.
    pub fn crop<'a>(&self, frame: &Frame<'a>) -> Option<Frame<'a>> {
        let bytes_pp = (frame.format.bpp() / 8) as usize;
        let off = (self.src_y as usize)
            .checked_mul(frame.pitch as usize)?
            .checked_add((self.src_x as usize).checked_mul(bytes_pp)?)?;
        Some(Frame {
            offset: frame.offset.checked_add(off)?,
            width: self.width,
            height: self.height,
            ..*frame
        })
    }

    /// Byte offset of the image's top-left in a buffer with `pitch` (4 bytes a pixel).
    pub fn dst_offset(&self, pitch: usize) -> Option<usize> {
        (self.dst_y as usize)
            .checked_mul(pitch)?
            .checked_add((self.dst_x as usize).checked_mul(4)?)
    }
}

/// How a connector's current mode shows guest images (for [`Layout::holds_for`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    /// The plane scales the image (buffers of the guest's size).
    pub plane_fit: bool,
    /// On the atomic path.
    pub atomic: bool,
    /// Buffer size.
    pub size: (u32, u32),
    /// The guest size the layout was chosen for.
    pub guest: (u32, u32),
}

impl Layout {
    /// In the same mode, can a `guest`-sized image with `fit` be shown by just
    /// swapping buffers? A plane-fitted layout holds for its own size (atomic only);
    /// a copy layout always on the legacy path or for an exact mode, and on the atomic
    /// path for the guest size whose scaling was already decided.
    pub fn holds_for(&self, fit: Fit, guest: (u32, u32)) -> bool {
        if self.plane_fit {
            self.atomic && self.size == guest
        } else {
            fit == Fit::Exact || !self.atomic || self.guest == guest
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::mem::anonymous;
    use crate::displif::format::PixelFormat;
    use crate::output::convert::Copier;

    fn m(width: u32, height: u32, refresh: u32, preferred: bool) -> ModeInfo {
        ModeInfo {
            width,
            height,
            refresh,
            preferred,
            interlaced: false,
        }
    }

    #[test]
    fn names_follow_kms() {
        use connector::Interface;
        assert_eq!(connector_name(Interface::HDMIA, 1), "HDMI-A-1");
        assert_eq!(connector_name(Interface::DisplayPort, 2), "DP-2");
        assert_eq!(connector_name(Interface::VGA, 1), "VGA-1");
        assert_eq!(connector_name(Interface::Virtual, 1), "Virtual-1");
        assert_eq!(connector_name(Interface::EmbeddedDisplayPort, 1), "eDP-1");
        assert_eq!(connector_name(Interface::DVID, 3), "DVI-D-3");
    }

    #[test]
    fn mode_choice() {
        let modes = [
            m(1920, 1080, 60, true),
            m(1280, 720, 50, false),
            m(1280, 720, 60, false),
            m(1024, 768, 75, false),
            m(800, 600, 60, false),
        ];
        assert_eq!(choose_mode(&modes, 1280, 720), Some((2, Fit::Exact)));
        assert_eq!(choose_mode(&modes, 1920, 1080), Some((0, Fit::Exact)));
        assert_eq!(choose_mode(&modes, 1000, 700), Some((0, Fit::Letterbox)));
        assert_eq!(choose_mode(&modes, 2560, 1440), Some((0, Fit::Crop)));
        assert_eq!(choose_mode(&[], 1, 1), None);
        // Preferred too small: the smallest mode that fits.
        let modes = [
            m(1024, 768, 60, true),
            m(2560, 1600, 60, false),
            m(1920, 1200, 60, false),
        ];
        assert_eq!(choose_mode(&modes, 1600, 900), Some((2, Fit::Letterbox)));
        // Exact: progressive over interlaced, preferred over refresh.
        let mut i = m(1920, 1080, 120, false);
        i.interlaced = true;
        let modes = [i, m(1920, 1080, 60, false), m(1920, 1080, 30, true)];
        assert_eq!(choose_mode(&modes, 1920, 1080), Some((2, Fit::Exact)));
        assert_eq!(choose_mode(&modes[..2], 1920, 1080), Some((1, Fit::Exact)));
        // No preferred flag: the first mode stands in.
        let modes = [m(1024, 768, 60, false), m(800, 600, 60, false)];
        assert_eq!(choose_mode(&modes, 640, 480), Some((0, Fit::Letterbox)));
    }

    #[test]
    fn placement_centres_and_crops() {
        let p = Placement::centre(1920, 1080, 1280, 720, false);
        assert_eq!((p.dst_x, p.dst_y, p.src_x, p.src_y), (320, 180, 0, 0));
        assert_eq!((p.width, p.height), (1280, 720));
        assert!(!p.covers(1920, 1080));
        assert_eq!(p.dst_offset(7680), Some(180 * 7680 + 320 * 4));
        let p = Placement::centre(1024, 768, 1024, 768, false);
        assert!(p.covers(1024, 768));
        let p = Placement::centre(800, 600, 1025, 601, true);
        assert_eq!((p.dst_x, p.dst_y, p.src_x, p.src_y), (0, 0, 112, 0));
        assert_eq!((p.width, p.height), (800, 600));
        let p = Placement::centre(800, 600, 1027, 600, false);
        assert_eq!(p.src_x, 113);
        // Odd sizes and zero never panic.
        let p = Placement::centre(1, 1, 0, u32::MAX, true);
        assert_eq!((p.width, p.height), (0, 1));
        let p = Placement::centre(0, 0, 3, 3, false);
        assert_eq!((p.width, p.height), (0, 0));
    }

    #[test]
    fn crop_frame_and_copy() {
        // A 6x4 RGB565 image shown in a 4x2 mode: the centre 4x2 block.
        let mem = anonymous(4096).unwrap();
        for y in 0..4u32 {
            for x in 0..6u32 {
                let v: u16 = if (1..5).contains(&x) && (1..3).contains(&y) {
                    0xffff
                } else {
                    0
                };
                mem.write((y * 12 + x * 2) as usize, &v.to_le_bytes())
                    .unwrap();
            }
        }
        let f = Frame {
            mem: &mem,
            offset: 0,
            width: 6,
            height: 4,
            pitch: 12,
            format: PixelFormat::Rgb565,
            fb_cookie: 0,
        };
        let p = Placement::centre(4, 2, 6, 4, false);
        let sub = p.crop(&f).unwrap();
        assert_eq!((sub.offset, sub.width, sub.height), (14, 4, 2));
        let mut dst = vec![0u8; 4 * 4 * 2];
        Copier::new().copy_xrgb8888(&sub, &mut dst, 16).unwrap();
        assert!(dst.chunks_exact(4).all(|c| c == [0xff, 0xff, 0xff, 0]));
        let huge = Placement {
            dst_x: 0,
            dst_y: 0,
            src_x: u32::MAX,
            src_y: u32::MAX,
            width: 1,
            height: 1,
        };
        let big = Frame {
            offset: usize::MAX - 4,
            pitch: u32::MAX,
            ..f
        };
        assert!(huge.crop(&big).is_none());
    }

    #[test]
    fn layout_reuse() {
        let scaled = Layout {
            plane_fit: true,
            atomic: true,
            size: (1000, 700),
            guest: (1000, 700),
        };
        assert!(scaled.holds_for(Fit::Letterbox, (1000, 700)));
        assert!(!scaled.holds_for(Fit::Letterbox, (800, 500)));
        // Fell back to legacy: legacy cannot scale, so a new modeset.
        let legacy_scaled = Layout {
            atomic: false,
            ..scaled
        };
        assert!(!legacy_scaled.holds_for(Fit::Letterbox, (1000, 700)));
        let letterbox = Layout {
            plane_fit: false,
            atomic: true,
            size: (1024, 768),
            guest: (1000, 700),
        };
        assert!(letterbox.holds_for(Fit::Letterbox, (1000, 700)));
        // Another size: scaling is decided again.
        assert!(!letterbox.holds_for(Fit::Letterbox, (800, 500)));
        assert!(letterbox.holds_for(Fit::Exact, (1024, 768)));
        let legacy = Layout {
            atomic: false,
            ..letterbox
        };
        assert!(legacy.holds_for(Fit::Letterbox, (800, 500)));
        assert!(legacy.holds_for(Fit::Crop, (2000, 2000)));
    }
}
