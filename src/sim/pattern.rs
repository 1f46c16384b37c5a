//! The test pattern the simulated guest draws (and the harnesses check). One pure
//! function of (frame, connector, x, y), so any checker can recompute every pixel.

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

#[cfg(test)]
mod tests {
    #[test]
    fn frames_differ() {
        assert_ne!(super::pixel(0, 0, 10, 10), super::pixel(1, 0, 10, 10));
        assert_ne!(super::pixel(0, 0, 10, 10), super::pixel(0, 1, 10, 10));
        assert_eq!(super::pixel(0, 0, 0, 64), 0x00ff_ffff);
    }
}
