"""Plain-VM KMS scenarios (no Xen): the Debian kernel + a busybox initramfs under QEMU
with bochs-drm (-vga std) or virtio-gpu; one boot per scenario. A program draws the
test pattern on the VM's KMS device; on its HOLD marker the host takes a QMP
screendump and checks every pixel of the pattern rectangle."""

import os
import time

from . import cpio, pixels, scenarios, vm
from .common import ERROR_RX, HOLD_RX, Result, Stopwatch, hold_info, program_cmd

DISPLAYS = {
    "bochs": ["-vga", "std"],
    "virtio": ["-vga", "none", "-device", "virtio-gpu-pci"],
}

# name -> (display, program, format): the `spec` of the kms rows of lib/scenarios.py. No
# guest-client rgb565 there: neither bochs-drm nor virtio-gpu accepts RGB565 framebuffers
# (EINVAL); the demo converts, xen-drm-front takes it.
SCENARIOS = {s.name: s.spec for s in scenarios.TABLE if s.group == "kms"}

INIT = """#!/bin/sh
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
/bin/busybox mkdir -p /usr/bin /usr/sbin
/bin/busybox --install -s
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
echo "HARNESS BOOTED uptime=$(cut -d' ' -f1 /proc/uptime)"
for m in $(cat /etc/modules.load); do insmod $m || echo "HARNESS insmod $m failed"; done
i=0; while [ ! -e /dev/dri/card0 ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done
echo "HARNESS DRM uptime=$(cut -d' ' -f1 /proc/uptime) cards=$(ls /dev/dri 2>/dev/null | tr '\\n' ' ')"
sh /etc/test.cmd
echo "HARNESS-EXIT rc=$?"
poweroff -f
"""


def kv(line: str) -> dict[str, str]:
    """The key=value fields of a log line (tracing's and the programs' own; quotes of
    string values dropped)."""
    return {k: v.strip('"') for k, v in (t.split("=", 1) for t in line.split() if "=" in t)}


def check_reconfig(lines, status: str, detail: str, legacy: bool) -> tuple[str, str]:
    """The demo reconfigured (DEMO reconfigs>0) and the KMS output's exit line reports
    how many modesets it planned behind an event and restores it deferred; with
    `legacy`, the output said it drives the connector on the legacy path (and never
    atomic)."""
    demo = next((kv(l) for _, l in lines if l.startswith("DEMO flips=")), {})
    kms = next((kv(l) for _, l in lines if "KMS frames shown" in l), {})
    paths = {kv(l).get("path") for _, l in lines if "KMS path:" in l}
    reconfigs = int(demo.get("reconfigs", "0"))
    if reconfigs == 0 or "planned_modesets" not in kms:
        return "FAIL", f"{detail} | reconfigs={reconfigs} KMS counters missing: {kms}"
    if legacy and paths != {"legacy"}:
        return "FAIL", f"{detail} | expected only the legacy path, log says {paths}"
    deferred = int(kms["planned_modesets"]) + int(kms.get("deferred_restores", "0"))
    if not legacy and deferred == 0:
        # Reconfiguring right after flips must have met a flip in flight at least once
        # in 7 rounds, else this scenario did not test what it is for.
        return "FAIL", f"{detail} | no modeset or restore waited for a flip in flight: {kms}"
    return status, (f"{detail} | reconfigs={reconfigs} planned_modesets={kms['planned_modesets']}"
                    f" deferred_restores={kms['deferred_restores']} copied={kms.get('copied')}")


def run_one(name: str, art: dict, bins: dict, workdir: str, accel: list[str],
            frames: int, hold: int, program: str | None, boot_timeout: float) -> Result:
    display, prog, fmt = SCENARIOS[name]
    prog = program or prog
    res = Result(name)
    binary = {"guest-client": "guest_client", "demo": "displback",
              "demo-reconfig": "displback", "demo-legacy": "displback"}[prog]
    path = bins.get(binary, f"ERROR: {binary} not built")
    if path.startswith("ERROR"):
        res.detail = path
        return res
    cmd = program_cmd(prog, frames, hold, fmt)
    files = {
        "init": (0o755, INIT.encode()),
        "etc/test.cmd": (0o644, (cmd + "\n").encode()),
        f"bin/{binary}": (0o755, open(path, "rb").read()),
    }
    overlay = os.path.join(workdir, f"{name}.overlay.cpio")
    cpio.write_newc(overlay, files)
    initrd = os.path.join(workdir, f"{name}.initrd")
    with open(initrd, "wb") as out:
        # Uncompressed overlay first: the kernel cannot continue after a gzip member.
        out.write(open(overlay, "rb").read())
        out.write(open(art["KMS_INITRAMFS"], "rb").read())
    qargs = [*accel, "-m", "1G", "-smp", "2", "-machine", "pc", "-display", "none",
             *DISPLAYS[display], "-kernel", art["VMLINUX"], "-initrd", initrd,
             "-append", "console=ttyS0 loglevel=4 panic=-1"]
    sw = Stopwatch()
    v = vm.VM(qargs, workdir, name)
    try:
        i, _ = v.wait_for(r"HARNESS BOOTED", boot_timeout, fail=ERROR_RX)
        res.timings["boot"] = sw.lap()
        i, m = v.wait_for(r"HARNESS DRM .*cards=(.*)", 60, i, fail=ERROR_RX)
        if "card" not in m.group(1):
            raise vm.Timeout("no /dev/dri/card* after loading the DRM modules")
        res.timings["modules"] = sw.lap()
        # Flips under TCG: allow ~0.3 s per frame plus start-up.
        i, m = v.wait_for(HOLD_RX, 60 + frames * 0.3, i, fail=ERROR_RX + "|HARNESS-EXIT")
        res.timings["draw+flips"] = sw.lap()
        frame, conn, w, h = hold_info(m)
        stats = next((l for _, l in v.lines if "p50_us=" in l), "")
        time.sleep(0.3)
        ppm = os.path.join(workdir, f"{name}.ppm")
        v.screendump(ppm)
        chk = pixels.check_pattern(pixels.read_ppm(ppm), frame, conn, w, h, fmt)
        res.timings["check"] = sw.lap()
        res.status = "PASS" if chk.ok else "FAIL"
        res.detail = f"{prog}: {chk.detail}"
        if stats:
            res.detail += " | " + " ".join(t for t in stats.split() if "=" in t and t.split("=")[0] in
                                          ("p50_us", "p99_us", "max_us", "total_ms"))
        v.wait_for(r"HARNESS-EXIT", hold + 30, i)
        if prog in ("demo-reconfig", "demo-legacy"):
            res.status, res.detail = check_reconfig(v.lines, res.status, res.detail,
                                                    legacy=prog == "demo-legacy")
    except (vm.Timeout, RuntimeError, ValueError, OSError) as e:
        res.status, res.detail = "FAIL", f"{prog}: {e}\n{v.tail()}"
    finally:
        v.stop(timeout=20)
        res.timings["total"] = v.elapsed()
    return res
