//! The test pattern the simulated guest draws (and the harnesses check). One pure
//! function of (frame, connector, x, y), so any checker can recompute every pixel.

use crate::displif::format::PixelFormat;

/// The pattern's colour at (x, y) of `frame` on connector `conn`, as 0x00RRGGBB.
pub fn pixel(frame: u32, conn: u32, x: u32, y: u32) -> u32 {
    let r = x.wrapping_add(frame.wrapping_mul(3)) & 0xff;
    let g = y.wrapping_add(conn.wrapping_mul(64)) & 0xff;
    let b = (x ^ y).wrapping_add(frame) & 0xff;
    // A 64x64 white square moving right one pixel per frame marks the frame visibly.
    let sq_x = frame.wrapping_mul(4) % 4096;
    if (y / 64) == 1 && x.wrapping_sub(sq_x) % 4096 < 64 {
        return 0x00ff_ffff;
    }
    r << 16 | g << 8 | b
}

/// Encode one row of the pattern in `format` (the guest's memory layout, little-endian).
/// `out` must hold `format.min_pitch(width)` bytes. YUYV averages chroma over pixel pairs.
pub fn draw_row(format: PixelFormat, frame: u32, conn: u32, y: u32, out: &mut [u8]) {
    let bytes_pp = (format.bpp() / 8) as usize;
    let width = (out.len() / bytes_pp) as u32;
    let rgb = |x: u32| {
        let p = pixel(frame, conn, x, y);
        (p >> 16 & 0xff, p >> 8 & 0xff, p & 0xff)
    };
    if format == PixelFormat::Yuyv {
        for (i, mp) in out.chunks_exact_mut(4).enumerate() {
            let x = i as u32 * 2;
            let (a, b) = (rgb(x), rgb(x + 1));
            let (ya, ua, va) = rgb_to_yuv(a);
            let (yb, ub, vb) = rgb_to_yuv(b);
            mp.copy_from_slice(&[
                ya,
                (ua + ub).div_ceil(2) as u8,
                yb,
                (va + vb).div_ceil(2) as u8,
            ]);
        }
        return;
    }
    for x in 0..width {
        let (r, g, b) = rgb(x);
        let px = &mut out[x as usize * bytes_pp..][..bytes_pp];
        match format {
            PixelFormat::Xrgb8888 | PixelFormat::Argb8888 => {
                px.copy_from_slice(&(0xff00_0000 | r << 16 | g << 8 | b).to_le_bytes())
            }
            PixelFormat::Rgb888 => px.copy_from_slice(&[b as u8, g as u8, r as u8]),
            PixelFormat::Rgb565 => {
                px.copy_from_slice(&((r >> 3) << 11 | (g >> 2) << 5 | b >> 3).to_le_bytes()[..2])
            }
            PixelFormat::Xrgb4444 | PixelFormat::Argb4444 => px.copy_from_slice(
                &(0xf000 | (r >> 4) << 8 | (g >> 4) << 4 | b >> 4).to_le_bytes()[..2],
            ),
            PixelFormat::Xrgb1555 | PixelFormat::Argb1555 => px.copy_from_slice(
                &(0x8000 | (r >> 3) << 10 | (g >> 3) << 5 | b >> 3).to_le_bytes()[..2],
            ),
            PixelFormat::Yuyv => unreachable!("handled above"),
        }
    }
}

/// BT.601 limited-range RGB -> (Y, U, V); U and V returned wide for averaging.
fn rgb_to_yuv((r, g, b): (u32, u32, u32)) -> (u8, u32, u32) {
    let (r, g, b) = (r as i32, g as i32, b as i32);
    let y = 16 + ((66 * r + 129 * g + 25 * b + 128) >> 8);
    let u = 128 + ((-38 * r - 74 * g + 112 * b + 128) >> 8);
    let v = 128 + ((112 * r - 94 * g - 18 * b + 128) >> 8);
    (
        y.clamp(0, 255) as u8,
        u.clamp(0, 255) as u32,
        v.clamp(0, 255) as u32,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_encode_the_pattern() {
        let mut row = vec![0u8; 8 * 4];
        draw_row(PixelFormat::Xrgb8888, 3, 1, 5, &mut row);
        let p = u32::from_le_bytes(row[8..12].try_into().unwrap());
        assert_eq!(p & 0xff_ffff, pixel(3, 1, 2, 5));
        let mut row = vec![0u8; 8 * 2];
        draw_row(PixelFormat::Rgb565, 3, 1, 5, &mut row);
        let p = u32::from(u16::from_le_bytes([row[4], row[5]]));
        let want = pixel(3, 1, 2, 5);
        assert_eq!(p >> 11, (want >> 16 & 0xff) >> 3);
        let mut row = vec![0u8; 8 * 2];
        draw_row(PixelFormat::Yuyv, 0, 0, 64, &mut row);
        assert_eq!(row[0], 235, "white is Y=235 in limited range");
    }

    #[test]
    fn frames_differ() {
        assert_ne!(super::pixel(0, 0, 10, 10), super::pixel(1, 0, 10, 10));
        assert_ne!(super::pixel(0, 0, 10, 10), super::pixel(0, 1, 10, 10));
        assert_eq!(super::pixel(0, 0, 0, 64), 0x00ff_ffff);
    }
}
