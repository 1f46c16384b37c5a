//! A synthetic EDID 1.4 base block for a connector, answered to GET_EDID (displif v2).
//!
//! Vendor "XEN", digital 8-bit input, physical size at 96 DPI, gamma 2.2, sRGB
//! chromaticity and default colour space, no established or standard timings, and four
//! 18-byte descriptors: the preferred detailed timing (CVT reduced-blanking style), a
//! monitor name "displback", display range limits matching that timing (or a dummy
//! descriptor when the limits don't fit their 8-bit fields), and a dummy descriptor.

/// Size of an EDID base block.
pub const EDID_LEN: usize = 128;
/// Largest width/height a detailed timing descriptor can carry (12 bits).
pub const MAX_DIM: u32 = 4095;
/// Refresh rates accepted, in Hz.
pub const MIN_REFRESH: u32 = 1;
pub const MAX_REFRESH: u32 = 240;

const HEADER: [u8; 8] = [0x00, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0x00];
const PRODUCT_CODE: u16 = 0x0D15;
const SERIAL: u32 = 1;
const MONITOR_NAME: &[u8] = b"displback";

// CVT reduced blanking (v1) constants.
const H_BLANK: u32 = 160;
const H_SYNC_OFFSET: u32 = 48;
const H_SYNC_WIDTH: u32 = 32;
const V_FRONT_PORCH: u32 = 3;
const MIN_V_BACK_PORCH: u32 = 6;
/// Minimum vertical blanking time, in ns.
const MIN_VBLANK_NS: u64 = 460_000;

/// The timing put in the detailed timing descriptor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timing {
    pub hactive: u32,
    pub hblank: u32,
    pub hsync_offset: u32,
    pub hsync_width: u32,
    pub vactive: u32,
    pub vblank: u32,
    pub vsync_offset: u32,
    pub vsync_width: u32,
    /// Refresh rate the pixel clock was computed for.
    pub refresh_hz: u32,
    /// Pixel clock in 10 kHz units (the DTD's unit).
    pub pixel_clock_10khz: u16,
}

impl Timing {
    /// CVT-RB-like timing for `w`x`h`@`refresh`; `None` if out of range or the pixel
    /// clock doesn't fit the DTD's 16 bits (655.35 MHz).
    pub fn cvt_rb(w: u32, h: u32, refresh: u32) -> Option<Timing> {
        if !(1..=MAX_DIM).contains(&w)
            || !(1..=MAX_DIM).contains(&h)
            || !(MIN_REFRESH..=MAX_REFRESH).contains(&refresh)
        {
            return None;
        }
        let vsync_width = vsync_width_for(w, h);
        // Lines in the minimum blanking time: h_period = (1/refresh - 460us) / vactive.
        let frame_ns = 1_000_000_000u64;
        let r = u64::from(refresh);
        let vbi = MIN_VBLANK_NS * r * u64::from(h) / (frame_ns - MIN_VBLANK_NS * r) + 1;
        let min_vbi = u64::from(V_FRONT_PORCH + vsync_width + MIN_V_BACK_PORCH);
        let vblank = vbi.max(min_vbi);
        if vblank > u64::from(MAX_DIM) {
            return None;
        }
        let htotal = u64::from(w + H_BLANK);
        let vtotal = u64::from(h) + vblank;
        let clock_hz = htotal * vtotal * r;
        // Rounded to the DTD's 10 kHz; tiny modes (under 10 kHz) get the smallest
        // non-zero clock, so their refresh rate is only nominal.
        let clock_10khz = ((clock_hz + 5_000) / 10_000).max(1);
        if clock_10khz > u64::from(u16::MAX) {
            return None;
        }
        Some(Timing {
            hactive: w,
            hblank: H_BLANK,
            hsync_offset: H_SYNC_OFFSET,
            hsync_width: H_SYNC_WIDTH,
            vactive: h,
            vblank: vblank as u32,
            vsync_offset: V_FRONT_PORCH,
            vsync_width,
            refresh_hz: refresh,
            pixel_clock_10khz: clock_10khz as u16,
        })
    }

    fn htotal(&self) -> u32 {
        self.hactive + self.hblank
    }

    fn vtotal(&self) -> u32 {
        self.vactive + self.vblank
    }
}

/// CVT's vsync width encodes the aspect ratio.
fn vsync_width_for(w: u32, h: u32) -> u32 {
    let is = |a: u32, b: u32| u64::from(w) * u64::from(b) == u64::from(h) * u64::from(a);
    if is(4, 3) {
        4
    } else if is(16, 9) {
        5
    } else if is(16, 10) {
        6
    } else if is(5, 4) || is(15, 9) {
        7
    } else {
        10
    }
}

/// The physical size of `px` pixels at 96 DPI, in millimetres (`mm`) or centimetres.
fn size_at_96dpi(px: u32, mm: bool) -> u32 {
    // px / 96 in * 25.4 mm/in, rounded.
    let tenth_mm = u64::from(px) * 254 / 96; // in 0.1 mm
    let v = if mm {
        (tenth_mm + 5) / 10
    } else {
        (tenth_mm + 50) / 100
    };
    v as u32
}

/// An EDID for `width`x`height`@`refresh_hz`, or `None` if the mode can't be described
/// exactly (dimensions outside 1..=4095, refresh outside 1..=240, or a pixel clock above
/// 655.35 MHz).
pub fn try_edid_for(width: u32, height: u32, refresh_hz: u32) -> Option<[u8; EDID_LEN]> {
    Timing::cvt_rb(width, height, refresh_hz).map(|t| build(&t))
}

/// An EDID for `width`x`height`@`refresh_hz`. Never fails: dimensions are clamped to
/// 1..=4095, refresh to 1..=240 Hz, and when the pixel clock would not fit the DTD the
/// refresh rate is lowered until it does (e.g. 4095x4095 ends up below 60 Hz).
pub fn edid_for(width: u32, height: u32, refresh_hz: u32) -> [u8; EDID_LEN] {
    let w = width.clamp(1, MAX_DIM);
    let h = height.clamp(1, MAX_DIM);
    let r = refresh_hz.clamp(MIN_REFRESH, MAX_REFRESH);
    // At 1 Hz even 4095x4095 needs < 20 MHz, so some rate always fits.
    for r in (MIN_REFRESH..=r).rev() {
        if let Some(t) = Timing::cvt_rb(w, h, r) {
            return build(&t);
        }
    }
    build(&FALLBACK)
}

/// 640x480@60 (CVT-RB-like); never used in practice, see [`edid_for`].
const FALLBACK: Timing = Timing {
    hactive: 640,
    hblank: H_BLANK,
    hsync_offset: H_SYNC_OFFSET,
    hsync_width: H_SYNC_WIDTH,
    vactive: 480,
    vblank: 14,
    vsync_offset: V_FRONT_PORCH,
    vsync_width: 4,
    refresh_hz: 60,
    pixel_clock_10khz: 2371,
};

fn build(t: &Timing) -> [u8; EDID_LEN] {
    let mut e = [0u8; EDID_LEN];
    e[0..8].copy_from_slice(&HEADER);
    // Manufacturer "XEN": three 5-bit letters ('A' = 1), big-endian.
    let l = |c: u8| u16::from(c - b'A' + 1);
    let mfg = (l(b'X') << 10) | (l(b'E') << 5) | l(b'N');
    e[8..10].copy_from_slice(&mfg.to_be_bytes());
    e[10..12].copy_from_slice(&PRODUCT_CODE.to_le_bytes());
    e[12..16].copy_from_slice(&SERIAL.to_le_bytes());
    e[16] = 1; // week
    e[17] = (2024 - 1990) as u8; // year
    e[18] = 1; // EDID 1.4
    e[19] = 4;
    // Digital input, 8 bits per colour, interface not defined.
    e[20] = 0x80 | (0b010 << 4);
    // Screen size in cm at 96 DPI; both zero if either rounds to zero.
    let (wcm, hcm) = (
        size_at_96dpi(t.hactive, false),
        size_at_96dpi(t.vactive, false),
    );
    if wcm > 0 && hcm > 0 {
        e[21] = wcm.min(255) as u8;
        e[22] = hcm.min(255) as u8;
    }
    e[23] = 120; // gamma 2.2: (2.2 * 100) - 100
                 // No DPMS, RGB 4:4:4, sRGB default colour space, preferred timing is native,
                 // not continuous frequency.
    e[24] = 0b0000_0110;
    chromaticity(&mut e[25..35]);
    // 35..38: no established timings. 38..54: unused standard timings.
    for i in 0..8 {
        e[38 + 2 * i] = 0x01;
        e[38 + 2 * i + 1] = 0x01;
    }
    dtd(&mut e[54..72], t);
    monitor_name(&mut e[72..90]);
    if !range_limits(&mut e[90..108], t) {
        dummy(&mut e[90..108]);
    }
    dummy(&mut e[108..126]);
    e[126] = 0; // no extensions
    let sum = e[..127].iter().fold(0u8, |a, &b| a.wrapping_add(b));
    e[127] = 0u8.wrapping_sub(sum);
    e
}

/// sRGB primaries and D65 white, as 10-bit binary fractions.
fn chromaticity(out: &mut [u8]) {
    // (x, y) in 1/10000.
    const PTS: [(u32, u32); 4] = [
        (6400, 3300), // red
        (3000, 6000), // green
        (1500, 600),  // blue
        (3127, 3290), // white
    ];
    let q = |v: u32| (v * 1024 + 5000) / 10000;
    let c: Vec<(u32, u32)> = PTS.iter().map(|&(x, y)| (q(x), q(y))).collect();
    let lo = |v: u32| (v & 3) as u8;
    out[0] = (lo(c[0].0) << 6) | (lo(c[0].1) << 4) | (lo(c[1].0) << 2) | lo(c[1].1);
    out[1] = (lo(c[2].0) << 6) | (lo(c[2].1) << 4) | (lo(c[3].0) << 2) | lo(c[3].1);
    for (i, &(x, y)) in c.iter().enumerate() {
        out[2 + 2 * i] = (x >> 2) as u8;
        out[3 + 2 * i] = (y >> 2) as u8;
    }
}

fn dtd(d: &mut [u8], t: &Timing) {
    let lo8 = |v: u32| (v & 0xFF) as u8;
    let hi4 = |v: u32| ((v >> 8) & 0x0F) as u8;
    d[0..2].copy_from_slice(&t.pixel_clock_10khz.to_le_bytes());
    d[2] = lo8(t.hactive);
    d[3] = lo8(t.hblank);
    d[4] = (hi4(t.hactive) << 4) | hi4(t.hblank);
    d[5] = lo8(t.vactive);
    d[6] = lo8(t.vblank);
    d[7] = (hi4(t.vactive) << 4) | hi4(t.vblank);
    d[8] = lo8(t.hsync_offset);
    d[9] = lo8(t.hsync_width);
    d[10] = (((t.vsync_offset & 0x0F) as u8) << 4) | (t.vsync_width & 0x0F) as u8;
    d[11] = ((((t.hsync_offset >> 8) & 3) as u8) << 6)
        | ((((t.hsync_width >> 8) & 3) as u8) << 4)
        | ((((t.vsync_offset >> 4) & 3) as u8) << 2)
        | (((t.vsync_width >> 4) & 3) as u8);
    let wmm = size_at_96dpi(t.hactive, true).min(4095);
    let hmm = size_at_96dpi(t.vactive, true).min(4095);
    d[12] = lo8(wmm);
    d[13] = lo8(hmm);
    d[14] = (hi4(wmm) << 4) | hi4(hmm);
    d[15] = 0; // no borders
    d[16] = 0;
    // Non-interlaced, no stereo, digital separate sync, vsync negative, hsync positive
    // (the CVT-RB polarities).
    d[17] = 0b0001_1010;
}

fn monitor_name(d: &mut [u8]) {
    d[..5].copy_from_slice(&[0, 0, 0, 0xFC, 0]);
    let text = &mut d[5..18];
    text.fill(0x20);
    text[..MONITOR_NAME.len()].copy_from_slice(MONITOR_NAME);
    text[MONITOR_NAME.len()] = 0x0A;
}

/// Display range limits bracketing the timing; false if they don't fit.
fn range_limits(d: &mut [u8], t: &Timing) -> bool {
    let clock_hz = u64::from(t.pixel_clock_10khz) * 10_000;
    let hfreq_hz = clock_hz / u64::from(t.htotal());
    let hmin = (hfreq_hz / 1000).max(1);
    let hmax = hfreq_hz.div_ceil(1000).max(hmin);
    // Actual vertical rate from the rounded clock, bracketed.
    let vfreq = clock_hz as f64 / (f64::from(t.htotal()) * f64::from(t.vtotal()));
    let vmin = (vfreq.floor() as u64).max(1);
    let vmax = (vfreq.ceil() as u64).max(vmin);
    let max_clock_10mhz = clock_hz.div_ceil(10_000_000);
    if hmax > 255 || vmax > 255 || max_clock_10mhz > 255 {
        return false;
    }
    d[..5].copy_from_slice(&[0, 0, 0, 0xFD, 0]);
    d[5] = vmin as u8;
    d[6] = vmax as u8;
    d[7] = hmin as u8;
    d[8] = hmax as u8;
    d[9] = max_clock_10mhz as u8;
    d[10] = 0x01; // range limits only, no timing formula
    d[11] = 0x0A;
    d[12..18].fill(0x20);
    true
}

fn dummy(d: &mut [u8]) {
    d.fill(0);
    d[3] = 0x10;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Decode DTD 1 independently of the encoder.
    fn decode_dtd(e: &[u8; 128]) -> (u32, u32, u32, u32, u32) {
        let d = &e[54..72];
        let clock = u32::from(u16::from_le_bytes([d[0], d[1]]));
        let hact = u32::from(d[2]) | (u32::from(d[4] >> 4) << 8);
        let hbl = u32::from(d[3]) | (u32::from(d[4] & 0xF) << 8);
        let vact = u32::from(d[5]) | (u32::from(d[7] >> 4) << 8);
        let vbl = u32::from(d[6]) | (u32::from(d[7] & 0xF) << 8);
        (clock, hact, hbl, vact, vbl)
    }

    fn checksum_ok(e: &[u8; 128]) -> bool {
        e.iter().fold(0u8, |a, &b| a.wrapping_add(b)) == 0
    }

    #[test]
    fn fhd_matches_cvt_rb() {
        let e = edid_for(1920, 1080, 60);
        assert_eq!(&e[..8], &HEADER);
        assert!(checksum_ok(&e));
        let (clock, hact, hbl, vact, vbl) = decode_dtd(&e);
        assert_eq!((hact, vact), (1920, 1080));
        // CVT-RB 1920x1080@60: htotal 2080, vtotal 1111, ~138.6 MHz.
        assert_eq!(hact + hbl, 2080);
        assert_eq!(vact + vbl, 1111);
        assert_eq!(clock, 13865);
        assert_eq!((e[18], e[19]), (1, 4));
        assert_eq!(e[126], 0);
        // 96 DPI: 50.8 x 28.6 cm.
        assert_eq!((e[21], e[22]), (51, 29));
    }

    #[test]
    fn manufacturer_is_xen_and_name_descriptor() {
        let e = edid_for(800, 600, 60);
        let m = u16::from_be_bytes([e[8], e[9]]);
        let letter = |s: u16| (b'A' - 1 + ((m >> s) & 0x1F) as u8) as char;
        let s: String = [letter(10), letter(5), letter(0)].iter().collect();
        assert_eq!(s, "XEN");
        assert_eq!(m & 0x8000, 0);
        let name = e[54..126]
            .chunks(18)
            .find(|d| d[..4] == [0, 0, 0, 0xFC])
            .expect("name descriptor");
        assert_eq!(&name[5..15], b"displback\n");
        // Range limits bracket 60 Hz.
        let r = e[54..126]
            .chunks(18)
            .find(|d| d[..4] == [0, 0, 0, 0xFD])
            .expect("range descriptor");
        assert!(r[5] <= 60 && r[6] >= 60, "{} {}", r[5], r[6]);
        // No established timings, unused standard timings.
        assert_eq!(&e[35..38], &[0, 0, 0]);
        assert!(e[38..54].iter().all(|&b| b == 1));
    }

    #[test]
    fn many_modes_valid() {
        for &(w, h, r) in &[
            (640, 480, 60),
            (1024, 768, 75),
            (1366, 768, 60),
            (2560, 1440, 144),
            (3840, 2160, 60),
            (4095, 4095, 30),
            (1, 1, 1),
            (4095, 1, 240),
        ] {
            let e = try_edid_for(w, h, r).unwrap_or_else(|| panic!("{w}x{h}@{r}"));
            assert!(checksum_ok(&e), "{w}x{h}@{r}");
            let (clock, hact, hbl, vact, vbl) = decode_dtd(&e);
            assert_eq!((hact, vact), (w, h));
            assert!(clock > 0);
            // Refresh from the decoded totals is within 1% of the request (modes with
            // a clock under 1 MHz suffer from the 10 kHz unit).
            let f = f64::from(clock) * 1e4 / f64::from((hact + hbl) * (vact + vbl));
            if clock >= 100 {
                assert!(
                    (f - f64::from(r)).abs() / f64::from(r) < 0.01,
                    "{w}x{h}@{r}: {f}"
                );
            }
            // Blanking holds front porch + sync + minimum back porch.
            let d = &e[54..72];
            let vso = u32::from(d[10] >> 4) | (u32::from((d[11] >> 2) & 3) << 4);
            let vsw = u32::from(d[10] & 0xF) | (u32::from(d[11] & 3) << 4);
            assert_eq!(vso, 3);
            assert!((4..=10).contains(&vsw));
            assert!(vbl >= vso + vsw + 6, "{w}x{h}@{r}: vblank {vbl}");
            // Horizontal: 160 blank, sync at +48 for 32.
            assert_eq!((hbl, d[8], d[9]), (160, 48, 32));
        }
    }

    #[test]
    fn fallback_is_consistent() {
        assert_eq!(Timing::cvt_rb(640, 480, 60), Some(FALLBACK));
    }

    #[test]
    fn out_of_range_clamped_or_rejected() {
        assert!(try_edid_for(0, 100, 60).is_none());
        assert!(try_edid_for(4096, 100, 60).is_none());
        assert!(try_edid_for(100, 100, 0).is_none());
        assert!(try_edid_for(4095, 4095, 60).is_none()); // > 655.35 MHz
        let e = edid_for(4095, 4095, 60);
        assert!(checksum_ok(&e));
        let (clock, hact, hbl, vact, vbl) = decode_dtd(&e);
        assert_eq!((hact, vact), (4095, 4095));
        let f = f64::from(clock) * 1e4 / f64::from((hact + hbl) * (vact + vbl));
        assert!(f < 60.0 && f > 20.0, "{f}");
        let e = edid_for(10_000, 0, 1000);
        assert!(checksum_ok(&e));
        let (_, hact, _, vact, _) = decode_dtd(&e);
        assert_eq!((hact, vact), (4095, 1));
    }
}
