"""Group `wayland`: one plain VM (no Xen; Debian kernel, bochs-drm via -vga std) with
Debian's Weston (DRM backend, pixman renderer) from the Weston image piece (lib/weston.sh),
running its steps in order and printing HARNESS markers; the host takes QMP screendumps
and looks for the expected picture anywhere on the screen (Weston places windows).

  wayland-weston         Weston (desktop-shell) + weston-image showing a known picture:
                         the self-check of the Weston piece (no displback)
  wayland-demo           `displback demo --output wayland` as Weston's client (xdg-shell)
  wayland-demo-ivi       the same on Weston's ivi-shell (Debian's weston 10 ships ivi-shell.so)
  wayland-restart        Weston killed and restarted mid-demo: the picture must come back
"""

import os
import re
import subprocess

from . import cpio, pattern, vm, weston
from .common import Result, Stopwatch

SCENARIOS = ["wayland-weston", "wayland-demo", "wayland-demo-ivi", "wayland-restart"]
HOLD = 40  # seconds each step keeps its picture up while the host polls screendumps

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
}


def run_all(names: list[str], bins: dict, args, accel: list[str], build_images) -> list[Result]:
    results = {n: Result(n) for n in names}
    try:
        art = build_images("kms", args.workdir)
        w = build_images("weston", args.workdir)
    except RuntimeError as e:
        for r in results.values():
            r.detail = str(e)
        return list(results.values())
    steps = [n for n in names if n in STEPS]
    for n in names:
        if n not in STEPS:
            results[n].detail = "not implemented yet (needs `displback demo --output wayland`)"
    files = {
        "init": (0o755, INIT.encode()),
        "etc/steps": (0o644, " ".join(steps).encode()),
        "etc/weston-known.png": (0o644, weston.known_png(args.workdir)),
    }
    for s in steps:
        files[f"etc/step-{s}.sh"] = (0o644, STEPS[s].encode())
    initrd = os.path.join(args.workdir, "wayland.initrd")
    ov = os.path.join(args.workdir, "wayland.overlay.cpio")
    cpio.write_newc(ov, files)
    with open(initrd, "wb") as out:
        for p in (ov, w["WESTON_CPIO"], art["KMS_INITRAMFS"]):
            out.write(open(p, "rb").read())
    print(f"=== wayland VM: images in {art['build_secs'] + w['build_secs']:.1f}s "
          f"(weston cpio {os.path.getsize(w['WESTON_CPIO']) / 1e6:.1f} MB, cold build {w['WESTON_BUILD_SECS']} s)",
          flush=True)
    qargs = [*accel, "-m", "1G", "-smp", "2", "-machine", "pc", "-display", "none", "-vga", "std",
             "-kernel", art["VMLINUX"], "-initrd", initrd, "-append", "console=ttyS0 loglevel=4 panic=-1"]
    v = vm.VM(qargs, args.workdir, "wayland")
    i = 0
    try:
        i, _ = v.wait_for(r"HARNESS BOOTED", args.boot_timeout)
        i, m = v.wait_for(r"HARNESS DRM .*cards=(.*)", 60, i)
        for s in steps:
            res, sw = results[s], Stopwatch()
            try:
                i, _ = v.wait_for(rf"HARNESS STEP {s} BEGIN", 120, i)
                i, _ = v.wait_for(r"WESTON READY", 90, i, fail=rf"WESTON ERROR|HARNESS STEP {s} END")
                res.timings["weston-start"] = sw.lap()
                i, m = v.wait_for(r"HARNESS SHOWING client=(\S+) .*hold=(\d+)", 120, i,
                                  fail=rf"WESTON ERROR|HARNESS STEP {s} END")
                ok, detail = weston.poll_window(v, os.path.join(args.workdir, f"{s}.ppm"), int(m.group(2)) - 5)
                res.timings["window"] = sw.lap()
                i, e = v.wait_for(rf"HARNESS STEP {s} END rc=(\d+)", HOLD + 60, i)
                res.status = "PASS" if ok and e.group(1) == "0" else "FAIL"
                res.detail = f"{m.group(1)}: {detail}" + ("" if e.group(1) == "0" else f" | step rc={e.group(1)}")
            except vm.Timeout as e:
                res.status, res.detail = "FAIL", f"{e}\n{v.tail()}"
        v.wait_for(r"HARNESS-EXIT", 60, i)
    except vm.Timeout as e:
        for r in results.values():
            if r.detail == "not run":
                r.detail = f"wayland VM: {e}\n{v.tail()}"
    finally:
        v.stop(timeout=20)
    first = results[names[0]]
    first.timings["vm-total"] = v.elapsed()
    return list(results.values())
