"""Python mirror of src/sim/pattern.rs (keep the two in sync; every `run` checks
known values first, `self_test()` below). Returns the colour at (x, y) of `frame` on connector `conn` as 0xRRGGBB."""

M32 = 0xFFFFFFFF


def pixel(frame: int, conn: int, x: int, y: int) -> int:
    r = (x + frame * 3) & 0xFF
    g = (y + conn * 64) & 0xFF
    b = ((x ^ y) + frame) & 0xFF
    sq_x = ((frame * 4) & M32) % 4096
    if y // 64 == 1 and ((x - sq_x) & M32) % 4096 < 64:
        return 0xFFFFFF
    return r << 16 | g << 8 | b


def row_rgb(frame: int, conn: int, y: int, width: int) -> bytes:
    """One row of the pattern as packed R,G,B bytes (the layout of a PPM row)."""
    out = bytearray(width * 3)
    for x in range(width):
        v = pixel(frame, conn, x, y)
        out[3 * x] = v >> 16
        out[3 * x + 1] = (v >> 8) & 0xFF
        out[3 * x + 2] = v & 0xFF
    return bytes(out)


def self_test() -> None:
    # Values from the Rust unit tests in src/sim/pattern.rs.
    assert pixel(0, 0, 10, 10) != pixel(1, 0, 10, 10)
    assert pixel(0, 0, 10, 10) != pixel(0, 1, 10, 10)
    assert pixel(0, 0, 0, 64) == 0xFFFFFF
    assert pixel(5, 1, 300, 20) == ((300 + 15) & 0xFF) << 16 | (20 + 64) << 8 | (((300 ^ 20) + 5) & 0xFF)
