//! The pixel formats the Linux frontend offers (xen_drm_front_conn.c), as DRM fourccs.

/// Build a DRM fourcc code.
pub const fn fourcc(s: &[u8; 4]) -> u32 {
    (s[0] as u32) | (s[1] as u32) << 8 | (s[2] as u32) << 16 | (s[3] as u32) << 24
}

/// A single-plane pixel format a guest may attach a framebuffer with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PixelFormat {
    Rgb565,
    Rgb888,
    Xrgb8888,
    Argb8888,
    Xrgb4444,
    Argb4444,
    Xrgb1555,
    Argb1555,
    Yuyv,
}

impl PixelFormat {
    /// Every format, in the order the frontend lists them.
    pub const ALL: [PixelFormat; 9] = [
        PixelFormat::Rgb565,
        PixelFormat::Rgb888,
        PixelFormat::Xrgb8888,
        PixelFormat::Argb8888,
        PixelFormat::Xrgb4444,
        PixelFormat::Argb4444,
        PixelFormat::Xrgb1555,
        PixelFormat::Argb1555,
        PixelFormat::Yuyv,
    ];

    /// The DRM fourcc.
    pub const fn fourcc(self) -> u32 {
        match self {
            PixelFormat::Rgb565 => fourcc(b"RG16"),
            PixelFormat::Rgb888 => fourcc(b"RG24"),
            PixelFormat::Xrgb8888 => fourcc(b"XR24"),
            PixelFormat::Argb8888 => fourcc(b"AR24"),
            PixelFormat::Xrgb4444 => fourcc(b"XR12"),
            PixelFormat::Argb4444 => fourcc(b"AR12"),
            PixelFormat::Xrgb1555 => fourcc(b"XR15"),
            PixelFormat::Argb1555 => fourcc(b"AR15"),
            PixelFormat::Yuyv => fourcc(b"YUYV"),
        }
    }

    /// Look up a guest-supplied fourcc; `None` if unsupported.
    pub fn from_fourcc(code: u32) -> Option<Self> {
        Self::ALL.into_iter().find(|f| f.fourcc() == code)
    }

    /// Bits per pixel (YUYV: 16, two pixels per 32-bit macropixel).
    pub const fn bpp(self) -> u32 {
        match self {
            PixelFormat::Rgb888 => 24,
            PixelFormat::Xrgb8888 | PixelFormat::Argb8888 => 32,
            _ => 16,
        }
    }

    /// The pitch the Linux frontend uses for a dumb buffer of this width:
    /// `ceil(width * bpp / 8)`; `None` on overflow.
    pub fn min_pitch(self, width: u32) -> Option<u32> {
        let bits = u64::from(width) * u64::from(self.bpp());
        u32::try_from(bits.div_ceil(8)).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fourccs_match_drm_fourcc_h() {
        assert_eq!(PixelFormat::Xrgb8888.fourcc(), 0x3432_5258);
        assert_eq!(PixelFormat::Rgb565.fourcc(), 0x3631_4752);
        assert_eq!(PixelFormat::Yuyv.fourcc(), 0x5659_5559);
        assert_eq!(
            PixelFormat::from_fourcc(0x3432_5241),
            Some(PixelFormat::Argb8888)
        );
        assert_eq!(PixelFormat::from_fourcc(0), None);
        assert_eq!(PixelFormat::Rgb888.min_pitch(3), Some(9));
    }
}
