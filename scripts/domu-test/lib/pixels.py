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


def read_png(path: str) -> Image:
    """An 8-bit RGB or RGBA, non-interlaced PNG (what weston-screenshooter writes) as an
    Image (alpha dropped)."""
    import struct
    import zlib

    data = open(path, "rb").read()
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError(f"{path}: not a PNG")
    pos, idat, hdr = 8, b"", None
    while pos < len(data):
        n, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + n]
        if kind == b"IHDR":
            hdr = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat += body
        elif kind == b"IEND":
            break
        pos += 12 + n
    if not hdr or hdr[2] != 8 or hdr[3] not in (2, 6) or hdr[6] != 0:
        raise ValueError(f"{path}: PNG not 8-bit RGB/RGBA non-interlaced: {hdr}")
    w, h, bpp = hdr[0], hdr[1], 3 if hdr[3] == 2 else 4
    raw, stride = zlib.decompress(idat), w * bpp
    prev, out = bytearray(stride), bytearray()
    for y in range(h):
        f, line = raw[y * (stride + 1)], bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        for x in range(stride):
            a = line[x - bpp] if x >= bpp else 0
            b, c = prev[x], prev[x - bpp] if x >= bpp else 0
            if f == 1:
                line[x] = (line[x] + a) & 0xFF
            elif f == 2:
                line[x] = (line[x] + b) & 0xFF
            elif f == 3:
                line[x] = (line[x] + (a + b) // 2) & 0xFF
            elif f == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[x] = (line[x] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 0xFF
        out += line if bpp == 3 else b"".join(line[i:i + 3] for i in range(0, stride, 4))
        prev = line
    return Image(w, h, bytes(out))


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


def write_png(path: str, width: int, height: int, rows: list[bytes]) -> None:
    """An 8-bit RGB PNG of `rows` (packed R,G,B bytes each): the known picture a
    third-party client (weston-image) shows."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    raw = b"".join(b"\0" + r for r in rows)
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
                + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))


def find_image(img: Image, rows: list[bytes]) -> tuple[int, int] | None:
    """Top-left (x, y) where the picture `rows` appears exactly (every pixel) on the
    screen, or None."""
    width = len(rows[0]) // 3
    stride = img.width * 3
    for y in range(img.height - len(rows) + 1):
        line = img.rgb[y * stride:(y + 1) * stride]
        start = 0
        while True:
            x3 = line.find(rows[0], start)
            if x3 < 0:
                break
            start = x3 + 1
            if x3 % 3:
                continue
            if all(img.rgb[(y + j) * stride + x3:(y + j) * stride + x3 + width * 3] == rows[j]
                   for j in range(1, len(rows))):
                return x3 // 3, y
    return None


def count_colour(img: Image, rgb: int) -> int:
    """How many screen pixels have exactly colour 0xRRGGBB."""
    px = bytes([(rgb >> 16) & 0xFF, (rgb >> 8) & 0xFF, rgb & 0xFF])
    return sum(1 for i in range(0, len(img.rgb), 3) if img.rgb[i:i + 3] == px)


def smpte_rows(width: int, height: int) -> list[bytes]:
    """libdrm's SMPTE test pattern for 32-bit RGB formats (tests/util/pattern.c,
    fill_smpte_rgb32, libdrm 2.4.114), as packed R,G,B rows: what `modetest` draws."""
    top = [(192, 192, 192), (192, 192, 0), (0, 192, 192), (0, 192, 0), (192, 0, 192), (192, 0, 0), (0, 0, 192)]
    middle = [(0, 0, 192), (19, 19, 19), (192, 0, 192), (19, 19, 19), (0, 192, 192), (19, 19, 19), (192, 192, 192)]
    bottom = [(0, 33, 76), (255, 255, 255), (50, 0, 106), (19, 19, 19), (9, 9, 9), (19, 19, 19), (29, 29, 29),
              (19, 19, 19)]
    rows = []
    top_row = bytes(c for x in range(width) for c in top[x * 7 // width])
    mid_row = bytes(c for x in range(width) for c in middle[x * 7 // width])
    bot = []
    for x in range(width):
        if x < width * 5 // 7:
            bot.append(bottom[x * 4 // (width * 5 // 7)])
        elif x < width * 6 // 7:
            bot.append(bottom[(x - width * 5 // 7) * 3 // (width // 7) + 4])
        else:
            bot.append(bottom[7])
    bot_row = bytes(c for px in bot for c in px)
    for y in range(height):
        rows.append(top_row if y < height * 6 // 9 else mid_row if y < height * 7 // 9 else bot_row)
    return rows


def check_rows(img: Image, rows: list[bytes], what: str) -> CheckResult:
    """Exact check of a full picture `rows`, centred on the screen as in check_pattern."""
    width, height = len(rows[0]) // 3, len(rows)
    if img.width < width or img.height < height:
        return CheckResult(False, f"screen {img.width}x{img.height} smaller than {what} {width}x{height}")
    ox, oy = (img.width - width) // 2, (img.height - height) // 2
    stride = img.width * 3
    bad, first = 0, []
    for y in range(height):
        got = img.rgb[(oy + y) * stride + ox * 3:(oy + y) * stride + (ox + width) * 3]
        if got == rows[y]:
            continue
        for x in range(width):
            if got[3 * x:3 * x + 3] != rows[y][3 * x:3 * x + 3]:
                bad += 1
                if len(first) < 5:
                    first.append(f"({x},{y}) got #{got[3 * x:3 * x + 3].hex()} want #{rows[y][3 * x:3 * x + 3].hex()}")
    where = f"{width}x{height} at +{ox}+{oy} of {img.width}x{img.height}"
    if bad:
        return CheckResult(False, f"{what}: {bad} pixels differ ({where}): {'; '.join(first)}")
    return CheckResult(True, f"{what}: all {width * height} pixels exact ({where})")
