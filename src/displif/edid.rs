//! TEMPORARY stub; replaced by the real synthetic EDID on merge.
pub fn edid_for(_width: u32, _height: u32, _refresh_hz: u32) -> [u8; 128] {
    [0; 128]
}
