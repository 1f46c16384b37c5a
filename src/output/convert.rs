//! Pixel copies out of guest mappings: same-format row copies and conversion of every
//! guest [`PixelFormat`] to XRGB8888 (the one format every KMS driver scans out).
//!
//! XRGB8888 here is DRM's: a little-endian `u32` `0xXXRRGGBB`, i.e. bytes B, G, R, X in
//! memory. Converters write X = 0, expand narrow channels by bit replication
//! (5 → 8 bits is `(v << 3) | (v >> 2)`), drop alpha, and turn YUYV into RGB with
//! BT.601 limited-range integer math.
//!
//! Guest memory is only ever read with [`MappedRegion::read`] (a bounds-checked
//! memcpy), so a guest scribbling on its buffer during a copy can tear the image but
//! never break us.

use crate::backend::mem::{MappedRegion, OutOfBounds};
use crate::displif::format::PixelFormat;
use crate::output::frame_copy::{self, Way};

use super::{Frame, OutputError};

/// Why a frame copy was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CopyError {
    /// The frame's rectangle reaches outside its mapping.
    #[error("source {0}")]
    Source(#[from] OutOfBounds),
    /// The destination slice is too small for the rectangle at the given pitch.
    #[error("destination of {have} bytes is too small (need {need})")]
    Destination { need: usize, have: usize },
    /// The destination pitch is smaller than one converted row.
    #[error("destination pitch {pitch} is smaller than a row of {row} bytes")]
    Pitch { pitch: usize, row: usize },
    /// Sizes overflow `usize`.
    #[error("frame geometry overflows")]
    Overflow,
}

impl From<CopyError> for OutputError {
    fn from(e: CopyError) -> Self {
        tracing::warn!("frame copy refused: {e}");
        OutputError::Device(std::io::Error::from_raw_os_error(libc::EINVAL))
    }
}

/// Bytes one row of `width` pixels of `format` occupies (the frontend's minimal pitch).
pub fn row_bytes(format: PixelFormat, width: u32) -> Option<usize> {
    format
        .min_pitch(width)
        .and_then(|p| usize::try_from(p).ok())
}

/// Bytes from the start of a frame's first row to the end of its last visible byte:
/// `pitch * (height - 1) + row`, or 0 for an empty frame.
fn span(pitch: usize, height: usize, row: usize) -> Option<usize> {
    match height {
        0 => Some(0),
        h => pitch.checked_mul(h - 1)?.checked_add(row),
    }
}

#[inline(always)]
fn put(dst: &mut [u8], rgb: u32) {
    dst.copy_from_slice(&rgb.to_le_bytes());
}

#[inline(always)]
fn expand5(v: u32) -> u32 {
    (v << 3) | (v >> 2)
}

#[inline(always)]
fn expand6(v: u32) -> u32 {
    (v << 2) | (v >> 4)
}

#[inline(always)]
fn clamp8(v: i32) -> u32 {
    v.clamp(0, 255) as u32
}

/// One BT.601 limited-range YCbCr sample to 0x00RRGGBB.
#[inline(always)]
pub fn yuv_to_rgb(y: u8, u: u8, v: u8) -> u32 {
    let c = 298 * (i32::from(y) - 16);
    let d = i32::from(u) - 128;
    let e = i32::from(v) - 128;
    let r = clamp8((c + 409 * e + 128) >> 8);
    let g = clamp8((c - 100 * d - 208 * e + 128) >> 8);
    let b = clamp8((c + 516 * d + 128) >> 8);
    r << 16 | g << 8 | b
}

/// Convert one row of `width` pixels of `format` in `src` into XRGB8888 bytes in `dst`.
///
/// Converts as many pixels as both slices hold (at most `width`); returns that count.
/// For YUYV with an odd width the last pixel's missing V sample is taken as neutral.
pub fn convert_row(format: PixelFormat, src: &[u8], dst: &mut [u8], width: usize) -> usize {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports AVX2, the only requirement of `convert_row_avx2`
        // (checked just above; the check is a cached load).
        return unsafe { convert_row_avx2(format, src, dst, width) };
    }
    convert_row_impl(format, src, dst, width)
}

/// [`convert_row`] compiled for AVX2: the baseline x86-64 (SSE2) build of these
/// loops is several times slower.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn convert_row_avx2(format: PixelFormat, src: &[u8], dst: &mut [u8], width: usize) -> usize {
    convert_row_impl(format, src, dst, width)
}

#[inline(always)]
fn convert_row_impl(format: PixelFormat, src: &[u8], dst: &mut [u8], width: usize) -> usize {
    let n = (dst.len() / 4).min(width);
    let dst = &mut dst[..n * 4];
    match format {
        PixelFormat::Xrgb8888 | PixelFormat::Argb8888 => {
            let n = (src.len() / 4).min(dst.len() / 4);
            for (d, s) in dst.chunks_exact_mut(4).zip(src.chunks_exact(4)) {
                d.copy_from_slice(&[s[0], s[1], s[2], 0]);
            }
            n
        }
        PixelFormat::Rgb888 => {
            let n = (src.len() / 3).min(dst.len() / 4);
            for (d, s) in dst.chunks_exact_mut(4).zip(src.chunks_exact(3)) {
                d.copy_from_slice(&[s[0], s[1], s[2], 0]);
            }
            n
        }
        PixelFormat::Rgb565 => conv16(src, dst, |v| {
            (expand5(v >> 11) << 16) | (expand6((v >> 5) & 0x3f) << 8) | expand5(v & 0x1f)
        }),
        PixelFormat::Xrgb1555 | PixelFormat::Argb1555 => conv16(src, dst, |v| {
            (expand5((v >> 10) & 0x1f) << 16) | (expand5((v >> 5) & 0x1f) << 8) | expand5(v & 0x1f)
        }),
        PixelFormat::Xrgb4444 | PixelFormat::Argb4444 => conv16(src, dst, |v| {
            ((((v >> 8) & 0xf) * 0x11) << 16)
                | ((((v >> 4) & 0xf) * 0x11) << 8)
                | ((v & 0xf) * 0x11)
        }),
        PixelFormat::Yuyv => {
            let n = (src.len() / 2).min(dst.len() / 4);
            let dst = &mut dst[..n * 4];
            let mut pairs = dst.chunks_exact_mut(8);
            let mut macros = src.chunks_exact(4);
            for (d, s) in (&mut pairs).zip(&mut macros) {
                put(&mut d[..4], yuv_to_rgb(s[0], s[1], s[3]));
                put(&mut d[4..], yuv_to_rgb(s[2], s[1], s[3]));
            }
            let rest = pairs.into_remainder();
            if rest.len() >= 4 {
                // Odd width: the last macropixel may hold only Y0 and U.
                let s = &src[(n - 1) * 2..];
                let v = s.get(3).copied().unwrap_or(128);
                put(&mut rest[..4], yuv_to_rgb(s[0], s[1], v));
            }
            n
        }
    }
}

#[inline(always)]
fn conv16(src: &[u8], dst: &mut [u8], f: impl Fn(u32) -> u32) -> usize {
    let n = (src.len() / 2).min(dst.len() / 4);
    for (d, s) in dst.chunks_exact_mut(4).zip(src.chunks_exact(2)) {
        put(d, f(u32::from(u16::from_le_bytes([s[0], s[1]]))));
    }
    n
}

/// Copies frames out of guest memory, keeping a scratch row between calls.
#[derive(Debug, Default)]
pub struct Copier {
    scratch: Vec<u8>,
}

impl Copier {
    /// A copier with an empty scratch row.
    pub fn new() -> Self {
        Self::default()
    }

    /// Copy the frame's visible rectangle, unchanged, to `dst` (rows `dst_pitch` apart).
    /// When both pitches equal the row size the whole frame is one memcpy. Bytes of
    /// `dst` outside the rectangle's rows are not touched.
    pub fn copy_same(
        &mut self,
        frame: &Frame<'_>,
        dst: &mut [u8],
        dst_pitch: usize,
    ) -> Result<(), CopyError> {
        let row = row_bytes(frame.format, frame.width).ok_or(CopyError::Overflow)?;
        copy_rows(
            frame.mem,
            frame.offset,
            frame.pitch as usize,
            row,
            frame.height as usize,
            dst,
            dst_pitch,
        )
    }

    /// Copy the frame's visible rectangle to `dst` as XRGB8888 (rows `dst_pitch` apart).
    /// XRGB8888 and ARGB8888 sources are copied as they are (the X byte is ignored by
    /// scanout, so ARGB's alpha does no harm); other formats are converted row by row.
    pub fn copy_xrgb8888(
        &mut self,
        frame: &Frame<'_>,
        dst: &mut [u8],
        dst_pitch: usize,
    ) -> Result<(), CopyError> {
        if matches!(frame.format, PixelFormat::Xrgb8888 | PixelFormat::Argb8888) {
            return self.copy_same(frame, dst, dst_pitch);
        }
        self.convert(frame, dst, dst_pitch)
    }

    /// Like [`Copier::copy_xrgb8888`] but always converting (X forced to 0, alpha
    /// dropped), for consumers that read the fourth byte.
    pub fn convert(
        &mut self,
        frame: &Frame<'_>,
        dst: &mut [u8],
        dst_pitch: usize,
    ) -> Result<(), CopyError> {
        let width = frame.width as usize;
        let height = frame.height as usize;
        let src_row = row_bytes(frame.format, frame.width).ok_or(CopyError::Overflow)?;
        let dst_row = width.checked_mul(4).ok_or(CopyError::Overflow)?;
        let src_pitch = frame.pitch as usize;
        check_dst(dst, dst_pitch, dst_row, height)?;
        let src_span = span(src_pitch, height, src_row).ok_or(CopyError::Overflow)?;
        let end = frame
            .offset
            .checked_add(src_span)
            .ok_or(CopyError::Overflow)?;
        if end > frame.mem.len() {
            return Err(CopyError::Source(OutOfBounds {
                offset: frame.offset,
                len: src_span,
                size: frame.mem.len(),
            }));
        }
        self.scratch.resize(src_row, 0);
        for y in 0..height {
            let so = frame.offset + y * src_pitch;
            frame.mem.read(so, &mut self.scratch)?;
            let d = y * dst_pitch;
            convert_row(frame.format, &self.scratch, &mut dst[d..d + dst_row], width);
        }
        Ok(())
    }
}

fn check_dst(dst: &[u8], dst_pitch: usize, row: usize, height: usize) -> Result<(), CopyError> {
    if height > 1 && dst_pitch < row {
        return Err(CopyError::Pitch {
            pitch: dst_pitch,
            row,
        });
    }
    let need = span(dst_pitch, height, row).ok_or(CopyError::Overflow)?;
    if need > dst.len() {
        return Err(CopyError::Destination {
            need,
            have: dst.len(),
        });
    }
    Ok(())
}

/// Copy `height` rows of `row` bytes from `mem` (starting at `offset`, `src_pitch`
/// apart) into `dst` (`dst_pitch` apart). One read when both pitches equal `row`.
pub fn copy_rows(
    mem: &MappedRegion,
    offset: usize,
    src_pitch: usize,
    row: usize,
    height: usize,
    dst: &mut [u8],
    dst_pitch: usize,
) -> Result<(), CopyError> {
    check_dst(dst, dst_pitch, row, height)?;
    if height == 0 || row == 0 {
        return Ok(());
    }
    if height > 1 && src_pitch < row {
        return Err(CopyError::Pitch {
            pitch: src_pitch,
            row,
        });
    }
    // A frame-sized copy goes to memory the CPU will not read back soon (a scan-out
    // buffer, an image): non-temporal stores (`MappedRegion::read_stream`) where they
    // were measured faster on this machine's own frame copies (`output::frame_copy`).
    let bytes = row.saturating_mul(height);
    let way = frame_copy::way_for(bytes);
    let read = |o: usize, d: &mut [u8]| match way {
        Way::Stream => mem.read_stream(o, d),
        Way::Plain => mem.read(o, d),
    };
    let timer = frame_copy::Timer::start(way, bytes);
    if height <= 1 || (src_pitch == row && dst_pitch == row) {
        let len = row.checked_mul(height).ok_or(CopyError::Overflow)?;
        read(offset, &mut dst[..len])?;
        timer.finish();
        return Ok(());
    }
    let src_span = span(src_pitch, height, row).ok_or(CopyError::Overflow)?;
    // One up-front check so the loop below cannot fail half-way.
    if offset.checked_add(src_span).is_none_or(|e| e > mem.len()) {
        return Err(CopyError::Source(OutOfBounds {
            offset,
            len: src_span,
            size: mem.len(),
        }));
    }
    for (y, d) in dst.chunks_mut(dst_pitch).take(height).enumerate() {
        read(offset + y * src_pitch, &mut d[..row])?;
    }
    timer.finish();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::mem::anonymous;

    fn conv1(format: PixelFormat, src: &[u8], width: usize) -> Vec<u32> {
        let mut dst = vec![0xaau8; width * 4];
        assert_eq!(convert_row(format, src, &mut dst, width), width);
        dst.chunks_exact(4)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()
    }

    #[test]
    fn rgb565() {
        let px = [0xf800u16, 0x07e0, 0x001f, 0xffff, 0x0000, 0x8410];
        let src: Vec<u8> = px.iter().flat_map(|p| p.to_le_bytes()).collect();
        assert_eq!(
            conv1(PixelFormat::Rgb565, &src, 6),
            [0xff0000, 0x00ff00, 0x0000ff, 0xffffff, 0, 0x848284]
        );
    }

    #[test]
    fn rgb888_is_bgr_in_memory() {
        let src = [0x11, 0x22, 0x33, 0xff, 0x00, 0x80];
        assert_eq!(conv1(PixelFormat::Rgb888, &src, 2), [0x332211, 0x8000ff]);
    }

    #[test]
    fn xrgb_argb_drop_the_top_byte() {
        let src = [0x11, 0x22, 0x33, 0x44, 0x01, 0x02, 0x03, 0xff];
        assert_eq!(conv1(PixelFormat::Xrgb8888, &src, 2), [0x332211, 0x030201]);
        assert_eq!(conv1(PixelFormat::Argb8888, &src, 2), [0x332211, 0x030201]);
    }

    #[test]
    fn x4444_and_a4444() {
        let px = [0xf123u16, 0x0fff, 0x1f00, 0x00f0];
        let src: Vec<u8> = px.iter().flat_map(|p| p.to_le_bytes()).collect();
        let want = [0x112233, 0xffffff, 0xff0000, 0x00ff00];
        assert_eq!(conv1(PixelFormat::Xrgb4444, &src, 4), want);
        assert_eq!(conv1(PixelFormat::Argb4444, &src, 4), want);
    }

    #[test]
    fn x1555_and_a1555() {
        let px = [0xfc00u16, 0x03e0, 0x801f, 0x4210];
        let src: Vec<u8> = px.iter().flat_map(|p| p.to_le_bytes()).collect();
        let want = [0xff0000, 0x00ff00, 0x0000ff, 0x848484];
        assert_eq!(conv1(PixelFormat::Xrgb1555, &src, 4), want);
        assert_eq!(conv1(PixelFormat::Argb1555, &src, 4), want);
    }

    #[test]
    fn yuyv_bt601_limited() {
        // Black, white, and the 75% colour-bar red/blue in BT.601 limited range.
        let src = [16, 128, 235, 128, 81, 90, 81, 240, 41, 240, 41, 110];
        let got = conv1(PixelFormat::Yuyv, &src, 6);
        assert_eq!(got[0], 0x000000);
        assert_eq!(got[1], 0xffffff);
        // Y=81 U=90 V=240 is pure red; Y=41 U=240 V=110 pure blue (±1 rounding).
        let near = |a: u32, b: u32| {
            (0..3).all(|i| ((a >> (i * 8)) & 0xff).abs_diff((b >> (i * 8)) & 0xff) <= 1)
        };
        assert!(near(got[2], 0xff0000), "{:06x}", got[2]);
        assert!(near(got[3], 0xff0000), "{:06x}", got[3]);
        assert!(near(got[4], 0x0000ff), "{:06x}", got[4]);
        // Odd width: the last pixel has no V sample.
        assert_eq!(conv1(PixelFormat::Yuyv, &[235, 128], 1), [0xffffff]);
    }

    #[test]
    fn short_slices_do_not_panic() {
        for f in PixelFormat::ALL {
            let mut dst = [0u8; 7];
            convert_row(f, &[1, 2, 3], &mut dst, 5);
            convert_row(f, &[], &mut dst, 5);
            convert_row(f, &[1; 64], &mut [], 5);
        }
    }

    fn frame_of(mem: &MappedRegion, format: PixelFormat, w: u32, h: u32, pitch: u32) -> Frame<'_> {
        Frame {
            mem,
            offset: 64,
            width: w,
            height: h,
            pitch,
            format,
            fb_cookie: 1,
        }
    }

    #[test]
    fn same_format_copy_with_pitches() {
        let mem = anonymous(4096).unwrap();
        let bytes: Vec<u8> = (0..4096u32).map(|i| i as u8).collect();
        mem.write(0, &bytes).unwrap();
        // 3x4 XRGB8888 with a 16-byte pitch into a 20-byte-pitch destination.
        let f = frame_of(&mem, PixelFormat::Xrgb8888, 3, 4, 16);
        let mut dst = vec![0xeeu8; 20 * 4];
        Copier::new().copy_same(&f, &mut dst, 20).unwrap();
        for y in 0..4 {
            assert_eq!(
                &dst[y * 20..y * 20 + 12],
                &bytes[64 + y * 16..64 + y * 16 + 12]
            );
            assert!(dst[y * 20 + 12..y * 20 + 20].iter().all(|&b| b == 0xee));
        }
        // Tight pitches: one read.
        let f = frame_of(&mem, PixelFormat::Rgb888, 5, 3, 15);
        let mut dst = vec![0u8; 45];
        Copier::new().copy_same(&f, &mut dst, 15).unwrap();
        assert_eq!(&dst[..], &bytes[64..109]);
        // The last row needs only `row` bytes of destination, not a whole pitch.
        let f = frame_of(&mem, PixelFormat::Xrgb8888, 2, 2, 8);
        let mut dst = vec![0u8; 100 + 8];
        Copier::new().copy_same(&f, &mut dst, 100).unwrap();
    }

    #[test]
    fn copies_refuse_bad_geometry() {
        let mem = anonymous(4096).unwrap();
        let mut c = Copier::new();
        let mut dst = vec![0u8; 1 << 16];
        let f = frame_of(&mem, PixelFormat::Xrgb8888, 64, 64, 256);
        assert!(matches!(
            c.copy_same(&f, &mut dst, 256),
            Err(CopyError::Source(_))
        ));
        assert!(matches!(
            c.convert(&f, &mut dst, 256),
            Err(CopyError::Source(_))
        ));
        let f = frame_of(&mem, PixelFormat::Xrgb8888, 4, 4, 16);
        assert!(matches!(
            c.copy_same(&f, &mut dst[..40], 16),
            Err(CopyError::Destination { .. })
        ));
        assert!(matches!(
            c.copy_same(&f, &mut dst, 8),
            Err(CopyError::Pitch { .. })
        ));
        let f = frame_of(&mem, PixelFormat::Xrgb8888, u32::MAX, u32::MAX, u32::MAX);
        assert!(c.copy_same(&f, &mut dst, 16).is_err());
        assert!(c.convert(&f, &mut dst, 16).is_err());
        let f = frame_of(&mem, PixelFormat::Rgb565, 0, 0, 0);
        c.convert(&f, &mut dst, 0).unwrap();
    }

    #[test]
    fn convert_frame_rgb565() {
        let mem = anonymous(4096).unwrap();
        // 2x2, pitch 6 (one padding pixel per row).
        for (i, p) in [0xf800u16, 0x07e0, 0x1234, 0x001f, 0xffff, 0x1234]
            .iter()
            .enumerate()
        {
            mem.write(64 + i * 2, &p.to_le_bytes()).unwrap();
        }
        let f = frame_of(&mem, PixelFormat::Rgb565, 2, 2, 6);
        let mut dst = vec![0x55u8; 12 * 2];
        let mut c = Copier::new();
        c.copy_xrgb8888(&f, &mut dst, 12).unwrap();
        let px = |o: usize| u32::from_le_bytes(dst[o..o + 4].try_into().unwrap());
        assert_eq!(
            [px(0), px(4), px(8), px(12), px(16)],
            [0xff0000, 0x00ff00, 0x55555555, 0x0000ff, 0xffffff]
        );
    }
}
