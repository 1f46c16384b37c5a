"""Host side of the Weston pieces: the known client picture and the screendump checks
(shared by the plain-VM `wayland` group and the Xen guest scenarios)."""

import os
import time

from . import pattern, pixels

# Weston's background (weston/weston.ini [shell] background-color) and the known picture
# weston-image shows: the project's test pattern (lib/pattern.py) of frame 7, connector 2.
# weston-image opens a 500x400 window and scales the picture to fit its interior, which
# is 424x303 with toytoolkit's frame (measured on Weston 10.0.1: a 200x120 picture was
# shown 2.12x larger, a 512x320 one 0.83x smaller); a picture of exactly that size is
# drawn 1:1 (scale 1.0, no translation), so every pixel can be compared.
BACKGROUND = 0x204060
KNOWN_W, KNOWN_H, KNOWN_FRAME, KNOWN_CONN = 424, 303, 7, 2


def known_rows() -> list[bytes]:
    return [pattern.row_rgb(KNOWN_FRAME, KNOWN_CONN, y, KNOWN_W) for y in range(KNOWN_H)]


def known_png(workdir: str) -> bytes:
    path = os.path.join(workdir, "weston-known.png")
    pixels.write_png(path, KNOWN_W, KNOWN_H, known_rows())
    return open(path, "rb").read()


WESTON_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "weston")


def overlay_files(workdir: str) -> dict:
    """The per-run Weston files for an overlay cpio (in front of the cached tree)."""
    return {
        "usr/local/bin/weston-run": (0o755, open(os.path.join(WESTON_DIR, "weston-run"), "rb").read()),
        "etc/weston/weston.ini": (0o644, open(os.path.join(WESTON_DIR, "weston.ini"), "rb").read()),
        "etc/weston/weston-ivi.ini": (0o644, open(os.path.join(WESTON_DIR, "weston-ivi.ini"), "rb").read()),
        "etc/weston-known.png": (0o644, known_png(workdir)),
    }


def poll_window(v, ppm: str, timeout: float, device: str | None = None,
                rows: list[bytes] | None = None, background: int | None = BACKGROUND,
                min_background: float = 0.3, at: tuple[int, int] | None = None,
                screen: tuple[int, int] | None = None) -> tuple[bool, str]:
    """Screendumps until the known picture appears exactly (every pixel, anywhere on the
    screen, or at `at` if given, on a screen of size `screen` if given) and at least
    `min_background` of the screen has Weston's background colour (no background check
    with `background=None`); (ok, detail) with the last screen's state on timeout."""
    rows = rows or known_rows()
    deadline = time.monotonic() + timeout
    n = 0
    while True:
        n += 1
        v.screendump(ppm, device)
        img = pixels.read_ppm(ppm)
        found = pixels.find_image(img, rows)
        bg = pixels.count_colour(img, background) / (img.width * img.height) if background is not None else 1.0
        detail = (f"picture {len(rows[0]) // 3}x{len(rows)} {'exact at +%d+%d' % found if found else 'NOT found'}"
                  f"{' (want +%d+%d)' % at if at else ''} on {img.width}x{img.height}"
                  f"{' (want %dx%d)' % screen if screen else ''}; "
                  + (f"background #{background:06x} on {bg:.1%} of the screen (want >= {min_background:.0%}); "
                     if background is not None else "")
                  + f"screendumps={n}")
        placed = found is not None and (at is None or tuple(found) == tuple(at)) \
            and (screen is None or (img.width, img.height) == tuple(screen))
        if placed and bg >= min_background:
            return True, detail
        if time.monotonic() > deadline:
            return False, f"after {timeout:.0f} s: {detail}"
        time.sleep(2)
