"""Screendump (PPM P6) parsing and comparison with the expected test pattern."""

from dataclasses import dataclass

from . import pattern


@dataclass
class Image:
    width: int
    height: int
    rgb: bytes  # packed R,G,B rows


def read_ppm(path: str) -> Image:
    data = open(path, "rb").read()
    fields: list[bytes] = []
    pos = 0
    while len(fields) < 4:
        while data[pos:pos + 1].isspace():
            pos += 1
        if data[pos:pos + 1] == b"#":
            pos = data.index(b"\n", pos) + 1
            continue
        end = pos
        while not data[end:end + 1].isspace():
            end += 1
        fields.append(data[pos:end])
        pos = end
    pos += 1  # the single whitespace after maxval
    if fields[0] != b"P6" or int(fields[3]) != 255:
        raise ValueError(f"{path}: not a P6/255 PPM")
    w, h = int(fields[1]), int(fields[2])
    rgb = data[pos:pos + w * h * 3]
    if len(rgb) != w * h * 3:
        raise ValueError(f"{path}: truncated PPM")
    return Image(w, h, rgb)


@dataclass
class CheckResult:
    ok: bool
    detail: str


def check_pattern(img: Image, frame: int, conn: int, width: int, height: int,
                  fmt: str = "xrgb8888") -> CheckResult:
    """Exact check of the width x height pattern rectangle. If the screen is larger the
    rectangle is expected centred (letterboxed); for rgb565 the comparison is done on
    the 5/6/5 most significant bits (QEMU expands 565 to 888 by itself)."""
    if img.width < width or img.height < height:
        return CheckResult(False, f"screen {img.width}x{img.height} smaller than expected {width}x{height}")
    ox, oy = (img.width - width) // 2, (img.height - height) // 2
    masks = (0xF8, 0xFC, 0xF8) if fmt == "rgb565" else (0xFF, 0xFF, 0xFF)
    mismatches = 0
    first: list[str] = []
    stride = img.width * 3
    for y in range(height):
        want = pattern.row_rgb(frame, conn, y, width)
        start = (oy + y) * stride + ox * 3
        got = img.rgb[start:start + width * 3]
        if fmt != "rgb565" and got == want:
            continue
        for x in range(width):
            for c in range(3):
                if (got[3 * x + c] ^ want[3 * x + c]) & masks[c]:
                    mismatches += 1
                    if len(first) < 5:
                        g = got[3 * x:3 * x + 3].hex()
                        e = want[3 * x:3 * x + 3].hex()
                        first.append(f"({x},{y}) got #{g} want #{e}")
                    break
    where = f"{width}x{height} at +{ox}+{oy} of {img.width}x{img.height}"
    if mismatches:
        # Tell a stale/other frame apart from garbage: does a neighbouring frame match row 100?
        hint = ""
        y = min(100, height - 1)
        start = (oy + y) * stride + ox * 3
        got = img.rgb[start:start + width * 3]
        for f in range(max(0, frame - 5), frame + 6):
            if f != frame and got == pattern.row_rgb(f, conn, y, width):
                hint = f"; row {y} matches frame {f} instead"
                break
        return CheckResult(False, f"{mismatches} pixels differ ({where}): {'; '.join(first)}{hint}")
    return CheckResult(True, f"all {width * height} pixels exact ({where}, frame {frame}, {fmt})")
