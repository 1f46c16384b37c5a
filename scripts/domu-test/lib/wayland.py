"""Group `wayland`: one plain VM (no Xen; Debian kernel, bochs-drm via -vga std) with
Debian's Weston (DRM backend, pixman renderer) from the Weston image piece (lib/weston.sh),
running its steps in order and printing HARNESS markers; the host takes QMP screendumps
and looks for the expected picture anywhere on the screen (Weston places windows).

  wayland-weston         Weston (desktop-shell) + weston-image showing a known picture:
                         the self-check of the Weston piece (no displback)
  wayland-demo           `displback demo --output wayland` as Weston's client (xdg-shell)
  wayland-ivi            Weston with ivi-shell.so + hmi-controller.so (weston/weston-ivi.ini),
                         `displback demo --wayland-shell ivi --unique-id 1000`: an
                         ivi-application surface with id 1000 that hmi-controller (Weston's
                         reference controller, no ivi-wm protocol) tiles at the top left,
                         scaled to 1/4 x 1/2 of the screen above its 70 px panel; the demo's
                         resolution is that tile (320x365 on the 1280x800 head) so the
                         picture must be exact at +0+0
  wayland-restart        Weston killed and restarted mid-demo: the picture must come back
  wayland-dmabuf         a second boot (GL_SCENARIOS): Debian 13's Weston 14 with the GL
                         renderer on Mesa's llvmpipe (lib/weston-gl.sh; Weston's pixman
                         renderer takes no dma-bufs), udmabuf.ko (lib/zcopy.sh):
                         `displback demo --output wayland --zero-copy on`, its udmabuf
                         frames imported through zwp_linux_dmabuf_v1: the picture exact on
                         the screen and the demo's counters zero_copy>0 copied=0
                         dmabuf_refused=0; Weston's XR24/LINEAR offer read by wayland-info
"""

import base64
import os
import re
import subprocess

from . import cpio, pattern, pixels, scenarios, vm, weston
from .common import Result, Stopwatch

# The group's scenarios and their descriptions are lib/scenarios.py's `wayland` rows (in
# table order; each needs a STEPS entry below). A row's spec names its Weston image
# (build.sh kind): ("weston-gl",) puts it in the second boot, the GL Weston (trixie)
# instead of Debian 12's.
SCENARIOS = scenarios.own("wayland")
GL_SCENARIOS = [n for n in SCENARIOS if scenarios.BY_NAME[n].spec[:1] == ("weston-gl",)]
DEMO_RES = (320, 240)
# hmi-controller's tile for the first application surface (mode_divided_into_tiling):
# (screen width / 4) x ((screen height - 70 px panel) / 2) at +0+0; Weston sets the bochs
# head to 1280x800.
IVI_SCREEN = (1280, 800)
IVI_TILE = (IVI_SCREEN[0] // 4, (IVI_SCREEN[1] - 70) // 2)
IVI_ID = 1000
# wayland-restart stops Weston once the demo reports this many presented flips (DEMO
# PROGRESS), waited for at most RESTART_WAIT s.
RESTART_AFTER = 30
RESTART_WAIT = 90
HOLD = 25  # seconds each step keeps its picture up while the host polls screendumps (found in 1-2)

INIT = """#!/bin/sh
export PATH=/usr/local/bin:/bin:/sbin:/usr/bin:/usr/sbin
/bin/busybox mkdir -p /usr/bin /usr/sbin
/bin/busybox --install -s
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /run /tmp && mount -t tmpfs tmpfs /run && mount -t tmpfs tmpfs /tmp
echo "HARNESS BOOTED uptime=$(cut -d' ' -f1 /proc/uptime)"
for m in $(cat /etc/modules.load); do insmod $m 2>/dev/null; done
i=0; while [ ! -e /dev/dri/card0 ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done
echo "HARNESS DRM uptime=$(cut -d' ' -f1 /proc/uptime) cards=$(ls /dev/dri 2>/dev/null | tr '\\n' ' ')"
export WAYLAND_DISPLAY=wayland-1 XDG_RUNTIME_DIR=/run/weston
for s in $(cat /etc/steps); do
    echo "HARNESS STEP $s BEGIN uptime=$(cut -d' ' -f1 /proc/uptime)"
    sh /etc/step-$s.sh
    echo "HARNESS STEP $s END rc=$? uptime=$(cut -d' ' -f1 /proc/uptime)"
done
echo "HARNESS-EXIT rc=0"
poweroff -f
"""


def _demo_script(start: str, demo_args: str, during: str = "", hold_wait: int = 120) -> str:
    """Start Weston (`start`), run `displback demo --output wayland DEMO_ARGS` as its client
    and print its DEMO HOLD/WAYLAND lines (frame, size: what the host looks for); `during`
    runs while the demo holds its last frame. DEMO HOLD must come within `hold_wait` s."""
    return f"""
{start} || exit 1
# The previous step's log goes first: its DEMO HOLD line would end the wait below before
# the new demo's `>` has emptied the file (wayland-ivi read wayland-demo's lines so).
rm -f /tmp/demo.log
displback demo --output wayland {demo_args} --frames 120 --hold-secs {HOLD} > /tmp/demo.log 2>&1 &
d=$!
i=0; while ! grep -q 'DEMO HOLD' /tmp/demo.log && kill -0 $d 2>/dev/null && [ $i -lt {hold_wait * 10} ]; do sleep 0.1; i=$((i+1)); done
grep -E 'DEMO (HOLD|WAYLAND|PRESENTED)' /tmp/demo.log || {{ sed 's/^/[demo] /' /tmp/demo.log | tail -10; echo "HARNESS DEMO ERROR no HOLD"; }}
kill -0 $d 2>/dev/null && ! grep -q 'DEMO HOLD' /tmp/demo.log && echo "HARNESS TIMEOUT waiting for DEMO HOLD ({hold_wait} s)"
echo "HARNESS SHOWING client=displback-demo pid=$d hold={HOLD}"
{during}
wait $d; rc=$?
sed 's/^/[demo] /' /tmp/demo.log | grep -v -E 'DEMO (HOLD|WAYLAND)' | tail -5
weston-run stop
exit $rc
"""

# The GL boot's Weston: udmabuf.ko first (the demo's zero-copy buffers), then Weston with
# the GL renderer; wayland-info's linux-dmabuf table as machine-readable counts.
DMABUF_START = r"""
insmod /lib/modules/extra/udmabuf.ko || echo "HARNESS insmod udmabuf.ko failed"
echo "HARNESS UDMABUF dev=$(ls /dev/udmabuf 2>/dev/null)"
WESTON_TIMEOUT=150 WESTON_RENDERER=gl WESTON_BACKEND=headless weston-run start desktop || exit 1
wayland-info > /tmp/wayland-info.txt 2>&1
sed -n '/zwp_linux_dmabuf_v1/,/^interface/p' /tmp/wayland-info.txt > /tmp/dmabuf.txt
echo "HARNESS DMABUF-OFFER version=$(sed -n "s/.*'zwp_linux_dmabuf_v1', *version: *\([0-9]*\).*/\1/p" /tmp/dmabuf.txt)" \
     "pairs=$(grep -c " = " /tmp/dmabuf.txt)" \
     "xr24_linear=$(grep -c "'XR24'; 0x0000000000000000" /tmp/dmabuf.txt)" \
     "ar24_linear=$(grep -c "'AR24'; 0x0000000000000000" /tmp/dmabuf.txt)"
grep -i -E 'GL renderer|GL version|dmabuf' /run/weston/weston.log | sed 's/^/[weston-gl] /' | head -5
true"""
# llvmpipe under TCG draws Weston's first frames slowly (shader compiles): the demo flips
# its first frame until Weston presented it before animating, or its frames would run out
# (completed unshown) before its surface is on screen; and flips its last frame until
# presented before DEMO HOLD, so the screenshot below shows it. A wait that runs out fails
# the demo (no DEMO HOLD: the host's check FAILs).
DMABUF_WAIT = 90
# While the demo holds (its last frame presented: --wait-presented): Weston's own read-back
# of its output (weston-screenshooter, allowed by --debug), sent to the host as base64
# between HARNESS PNG markers.
SCREENSHOT = r"""
mkdir -p /tmp/shot && rm -f /tmp/shot/*
(cd /tmp/shot && XDG_PICTURES_DIR=/tmp/shot HOME=/tmp/shot weston-screenshooter > /tmp/shot.log 2>&1)
f=$(ls /tmp/shot/*.png 2>/dev/null | head -n 1)
if [ -n "$f" ]; then
    echo "HARNESS PNG BEGIN bytes=$(wc -c < "$f")"
    base64 "$f"
    echo "HARNESS PNG END"
else
    sed 's/^/[screenshooter] /' /tmp/shot.log | tail -5
    echo "HARNESS PNG NONE"
fi"""

STEPS = {
    "wayland-weston": f"""
weston-run start desktop card0 || exit 1
weston-image /etc/weston-known.png > /tmp/weston-image.log 2>&1 &
c=$!
echo "HARNESS SHOWING client=weston-image pid=$c hold={HOLD}"
sleep {HOLD}
kill -0 $c 2>/dev/null; alive=$?
kill $c 2>/dev/null
sed 's/^/[weston-image] /' /tmp/weston-image.log | tail -5
weston-run stop
[ $alive = 0 ]
""",
    # displback demo as a Wayland client of Weston; its DEMO HOLD line (frame, size) tells
    # the host which picture to look for.
    "wayland-demo": _demo_script("weston-run start desktop card0",
                                 f"--resolution {DEMO_RES[0]}x{DEMO_RES[1]}"),
    # The IVI shell: an ivi-application surface whose id is the connector's unique-id;
    # hmi-controller places it (the host checks where).
    "wayland-ivi": _demo_script("WESTON_INI=/etc/weston/weston-ivi.ini weston-run start ivi card0",
                                f"--wayland-shell ivi --unique-id {IVI_ID} --resolution {IVI_TILE[0]}x{IVI_TILE[1]}"),
    # A real compositor importing the demo's udmabuf dma-bufs (GL boot).
    "wayland-dmabuf": _demo_script(DMABUF_START, f"--zero-copy on --wait-presented {DMABUF_WAIT} "
                                   f"--resolution {DEMO_RES[0]}x{DEMO_RES[1]}",
                                   SCREENSHOT, hold_wait=2 * DMABUF_WAIT + 120),
    # Weston stopped (SIGTERM) once it has presented RESTART_AFTER of a 1200-frame demo's
    # flips (the demo's DEMO PROGRESS lines, once a second) and started again: displback
    # must reconnect and its last frame must be on the new Weston's screen.
    "wayland-restart": f"""
weston-run start desktop card0 || exit 1
displback demo --output wayland --resolution {DEMO_RES[0]}x{DEMO_RES[1]} --frames 1200 --hold-secs {HOLD} \\
    --progress > /tmp/demo.log 2>&1 &
d=$!
p=0; i=0; while kill -0 $d 2>/dev/null && [ $i -lt {RESTART_WAIT * 10} ]; do
    # (f-string: the sed backreference is written \\1)
    p=$(sed -n 's/^DEMO PROGRESS .* presented=\\([0-9]*\\).*/\\1/p' /tmp/demo.log | tail -n 1)
    case "$p" in ''|*[!0-9]*) p=0;; esac
    [ "$p" -ge {RESTART_AFTER} ] && break
    sleep 0.1; i=$((i+1))
done
grep 'DEMO PROGRESS' /tmp/demo.log | tail -n 1
if [ "$p" -lt {RESTART_AFTER} ]; then
    sed 's/^/[demo] /' /tmp/demo.log | tail -5
    echo "HARNESS TIMEOUT waiting for presented>={RESTART_AFTER} before the restart ({RESTART_WAIT} s, demo_alive=$(kill -0 $d 2>/dev/null && echo 1 || echo 0))"
    kill $d 2>/dev/null; weston-run stop; exit 1
fi
echo "HARNESS RESTART weston demo_alive=$(kill -0 $d 2>/dev/null && echo 1 || echo 0)"
weston-run stop
weston-run start desktop card0 || exit 1
i=0; while ! grep -q 'DEMO HOLD' /tmp/demo.log && kill -0 $d 2>/dev/null && [ $i -lt 3000 ]; do sleep 0.1; i=$((i+1)); done
grep -E 'DEMO (HOLD|WAYLAND)' /tmp/demo.log || {{ sed 's/^/[demo] /' /tmp/demo.log | tail -10; echo "HARNESS DEMO ERROR no HOLD"; }}
echo "HARNESS SHOWING client=displback-demo pid=$d hold={HOLD}"
wait $d; rc=$?
sed 's/^/[demo] /' /tmp/demo.log | grep -v -E 'DEMO (HOLD|WAYLAND)' | tail -5
weston-run stop
exit $rc
""",
}


assert set(SCENARIOS) <= set(STEPS), f"wayland rows without steps: {set(SCENARIOS) - set(STEPS)}"

def run_all(names: list[str], bins: dict, args, accel: list[str], build_images) -> list[Result]:
    results = {n: Result(n) for n in names}
    try:
        art = build_images("kms", args.workdir)
    except RuntimeError as e:
        for r in results.values():
            r.detail = str(e)
        return list(results.values())
    steps = [n for n in names if n in STEPS]
    demo = [n for n in steps if "displback demo" in STEPS[n]]
    be = bins.get("displback", "ERROR: displback not built")
    why = be if be.startswith("ERROR") else None
    if not why:
        h = subprocess.run([be, "demo", "--help"], capture_output=True, text=True, timeout=30).stdout
        if "wayland" not in h:
            why = "`displback demo --help` offers no `--output wayland` (src/output/wayland.rs not in this tree)"
    if demo and why:
        for n in demo:
            results[n].status, results[n].detail = "FAIL", why
        steps = [n for n in steps if n not in demo]
    plain = [n for n in steps if n not in GL_SCENARIOS]
    gl = [n for n in steps if n in GL_SCENARIOS]
    if plain:
        _boot("wayland", plain, results, art, "weston", {}, None if why else be, args, accel, build_images)
    if gl:
        extra = {}
        try:
            zc = build_images("zcopy", args.workdir)
            extra["lib/modules/extra/udmabuf.ko"] = (0o644, open(zc["ZC_UDMABUF_KO"], "rb").read())
        except (RuntimeError, KeyError) as e:
            for n in gl:
                results[n].status, results[n].detail = "FAIL", f"no udmabuf.ko (build.sh zcopy): {e}"
            gl = []
        if gl:
            _boot("wayland-gl", gl, results, art, "weston-gl", extra, be, args, accel, build_images)
    return list(results.values())


def _boot(label: str, steps: list[str], results: dict, art: dict, image: str, extra: dict, be: str | None,
          args, accel: list[str], build_images) -> None:
    """One plain VM with the `image` Weston tree (build.sh IMAGE: `weston` = Debian 12's,
    pixman; `weston-gl` = Debian 13's, GL on llvmpipe) running `steps` in order."""
    try:
        w = build_images(image, args.workdir)
    except RuntimeError as e:
        for s in steps:
            results[s].status, results[s].detail = "FAIL", str(e)
        return
    cpio_key = "WESTON_GL_CPIO" if image == "weston-gl" else "WESTON_CPIO"
    secs_key = "WESTON_GL_BUILD_SECS" if image == "weston-gl" else "WESTON_BUILD_SECS"
    files = {
        "init": (0o755, INIT.encode()),
        "etc/steps": (0o644, " ".join(steps).encode()),
        **weston.overlay_files(args.workdir),
        **extra,
    }
    for s in steps:
        files[f"etc/step-{s}.sh"] = (0o644, STEPS[s].encode())
    if be:
        files["bin/displback"] = (0o755, open(be, "rb").read())
    initrd = os.path.join(args.workdir, f"{label}.initrd")
    ov = os.path.join(args.workdir, f"{label}.overlay.cpio")
    cpio.write_newc(ov, files)
    with open(initrd, "wb") as out:
        for p in (ov, w[cpio_key], art["KMS_INITRAMFS"]):
            out.write(open(p, "rb").read())
    print(f"=== {label} VM: images in {art['build_secs'] + w['build_secs']:.1f}s "
          f"({image} cpio {os.path.getsize(w[cpio_key]) / 1e6:.1f} MB, cold build {w[secs_key]} s)",
          flush=True)
    # The GL tree (Mesa + LLVM) is ~230 MB unpacked in the initramfs.
    mem = "2G" if image == "weston-gl" else "1G"
    qargs = [*accel, "-m", mem, "-smp", "2", "-machine", "pc", "-display", "none", "-vga", "std",
             "-kernel", art["VMLINUX"], "-initrd", initrd, "-append", "console=ttyS0 loglevel=4 panic=-1"]
    v = vm.VM(qargs, args.workdir, label)
    i = 0
    try:
        i, _ = v.wait_for(r"HARNESS BOOTED", args.boot_timeout)
        i, m = v.wait_for(r"HARNESS DRM .*cards=(.*)", 60, i)
        for s in steps:
            res, sw = results[s], Stopwatch()
            try:
                i, _ = v.wait_for(rf"HARNESS STEP {s} BEGIN", 120, i)
                # llvmpipe compiles Weston's shaders under TCG: the GL Weston starts slower.
                i, _ = v.wait_for(r"WESTON READY", 180 if s in GL_SCENARIOS else 90, i,
                                  fail=rf"WESTON ERROR|HARNESS STEP {s} END")
                res.timings["weston-start"] = sw.lap()
                # The GL step's demo waits for Weston's presentations (DMABUF_WAIT, twice).
                i, m = v.wait_for(r"HARNESS SHOWING client=(\S+) .*hold=(\d+)",
                                  2 * DMABUF_WAIT + 180 if s in GL_SCENARIOS else 180, i,
                                  fail=rf"WESTON ERROR|HARNESS TIMEOUT|HARNESS STEP {s} END")
                rows = None
                if m.group(1) == "displback-demo":
                    hold = [l for _, l in v.lines[:i] if "DEMO HOLD" in l]
                    if not hold:
                        raise vm.Timeout("displback demo printed no DEMO HOLD line")
                    h = re.search(r"frame=(\d+) conn=(\d+) width=(\d+) height=(\d+)", hold[-1])
                    f, c, w_, h_ = (int(x) for x in h.groups())
                    rows = [pattern.row_rgb(f, c, y, w_) for y in range(h_)]
                ivi = s == "wayland-ivi"
                if s in GL_SCENARIOS:
                    # Headless Weston: its own screenshot instead of QMP's screendump.
                    i, _ = v.wait_for(r"HARNESS PNG (END|NONE)", 90, i, fail=rf"HARNESS STEP {s} END")
                    ok, detail = _check_png(v.lines[:i], rows, os.path.join(args.workdir, f"{s}.png"))
                else:
                    # The IVI screen is hmi-controller's background image and panel, not
                    # desktop-shell's background colour: the place of the picture is checked.
                    ok, detail = weston.poll_window(v, os.path.join(args.workdir, f"{s}.ppm"),
                                                    int(m.group(2)) - 5, rows=rows,
                                                    background=None if ivi else weston.BACKGROUND,
                                                    at=(0, 0) if ivi else None,
                                                    screen=IVI_SCREEN if ivi else None)
                if m.group(1) == "displback-demo":
                    # displback's Wayland counters (src/demo.rs): a restart must show as a
                    # disconnect and a second connect.
                    wl = [l for _, l in v.lines[:i] if "DEMO WAYLAND " in l]
                    c = dict(re.findall(r"(\w+)=(\d+)", wl[-1])) if wl else {}
                    detail += " | DEMO WAYLAND " + (" ".join(f"{k}={x}" for k, x in c.items()) or "line missing")
                    want = (2, 1) if s == "wayland-restart" else (1, 0)
                    if int(c.get("connects", 0)) < want[0] or int(c.get("disconnects", -1)) < want[1] \
                            or int(c.get("presented", 0)) == 0:
                        ok = False
                        detail += f" (want connects>={want[0]} disconnects>={want[1]} presented>0)"
                    if ivi and (int(c.get("ivi_surfaces", 0)) < 1 or int(c.get("xdg_surfaces", -1)) != 0):
                        ok = False
                        detail += " (want ivi_surfaces>=1 xdg_surfaces=0)"
                    if s in GL_SCENARIOS:
                        ok, detail = _check_dmabuf(v.lines[:i], c, ok, detail)
                res.timings["window"] = sw.lap()
                i, e = v.wait_for(rf"HARNESS STEP {s} END rc=(\d+)", HOLD + 60, i)
                res.status = "PASS" if ok and e.group(1) == "0" else "FAIL"
                res.detail = f"{m.group(1)}: {detail}" + ("" if e.group(1) == "0" else f" | step rc={e.group(1)}")
            except vm.Timeout as e:
                res.status, res.detail = "FAIL", f"{e}\n{v.tail()}"
        v.wait_for(r"HARNESS-EXIT", 60, i)
    except vm.Timeout as e:
        for s in steps:
            if results[s].detail == "not run":
                results[s].detail = f"{label} VM: {e}\n{v.tail()}"
    finally:
        v.stop(timeout=20)
    results[steps[0]].timings[f"{label}-vm-total"] = v.elapsed()


def _check_png(lines, rows: list[bytes], path: str) -> tuple[bool, str]:
    """The screenshot between the last HARNESS PNG BEGIN/END: the picture `rows` exact
    somewhere and Weston's background on >= 30 % of the screen."""
    begin = max((k for k, (_, l) in enumerate(lines) if "HARNESS PNG BEGIN" in l), default=None)
    if begin is None:
        return False, "no screenshot (HARNESS PNG NONE: weston-screenshooter wrote no file)"
    body = []
    for _, l in lines[begin + 1:]:
        if "HARNESS PNG END" in l:
            break
        body.append(l.strip())
    with open(path, "wb") as f:
        f.write(base64.b64decode("".join(body)))
    img = pixels.read_png(path)
    found = pixels.find_image(img, rows)
    bg = pixels.count_colour(img, weston.BACKGROUND) / (img.width * img.height)
    ok = found is not None and bg >= 0.3
    return ok, (f"screenshot {img.width}x{img.height}: picture {len(rows[0]) // 3}x{len(rows)} "
                f"{'exact at +%d+%d' % found if found else 'NOT found'}; background #{weston.BACKGROUND:06x} "
                f"on {bg:.1%} of the screen (want >= 30%)")


def _check_dmabuf(lines, c: dict, ok: bool, detail: str) -> tuple[bool, str]:
    """wayland-dmabuf: /dev/udmabuf was there, the compositor offered XR24 with the linear
    modifier, and every frame the demo showed went through an imported dma-buf (no copy,
    no refused import)."""
    ud = next((l for _, l in reversed(lines) if "HARNESS UDMABUF " in l), "")
    offer = next((l for _, l in reversed(lines) if "HARNESS DMABUF-OFFER " in l), "")
    o = dict(re.findall(r"(\w+)=(\d+)", offer))
    detail += f" | udmabuf {'present' if '/dev/udmabuf' in ud else 'MISSING'}" \
              f" | linux-dmabuf offer " + (" ".join(f"{k}={x}" for k, x in o.items()) or "line missing")
    if "/dev/udmabuf" not in ud:
        ok = False
    if int(o.get("xr24_linear", 0)) < 1:
        ok = False
        detail += " (want xr24_linear>=1)"
    # zero_copy counts frames handed over as dma-buf wl_buffers (also while no compositor
    # is there); dmabuf_imported the compositor's `created` answers: both must be > 0.
    if int(c.get("zero_copy", 0)) == 0 or c.get("copied") != "0" or c.get("dmabuf_refused") != "0" \
            or int(c.get("dmabuf_imported", 0)) == 0:
        ok = False
        detail += " (want zero_copy>0 copied=0 dmabuf_refused=0 dmabuf_imported>0)"
    return ok, detail
