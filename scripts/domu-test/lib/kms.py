"""Plain-VM KMS scenarios (no Xen): the Debian kernel + a busybox initramfs under QEMU
with bochs-drm (-vga std) or virtio-gpu; one boot per scenario. A program draws the
test pattern on the VM's KMS device; on its HOLD marker the host takes a QMP
screendump and checks every pixel of the pattern rectangle."""

import os
import re
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

# In the VM: (1) the demo with --zero-copy on, its scan-out read back; (2) the same with
# udmabuf's vmap switched off (VKMS then refuses every commit of an imported
# framebuffer: the per-buffer fallback must copy and show the right picture); (3) the
# per-flip table, copy vs zero-copy at three sizes. Every line is tagged [label].
UDMABUF_CMD = r"""
D=/bin/displback
export NO_COLOR=1
echo "UDMABUF dev=$(ls /dev/udmabuf 2>/dev/null) allow_vmap=$(cat /sys/module/udmabuf/parameters/allow_vmap 2>/dev/null)"
check() { # label, demo options...
  l=$1; shift
  $D demo --output kms --frames {frames} --hold-secs 12 "$@" > /tmp/$l.log 2>&1 &
  pid=$!
  i=0
  while ! grep -q "DEMO HOLD" /tmp/$l.log && kill -0 $pid 2>/dev/null && [ $i -lt 900 ]; do sleep 0.2; i=$((i+1)); done
  f=$(sed -n 's/.*DEMO HOLD frame=\([0-9]*\).*/\1/p' /tmp/$l.log | head -n 1)
  [ -n "$f" ] && /bin/scanout_check --frame $f --conn 0 --timeout-secs 10 2>&1 | sed "s/^/[$l] /"
  wait $pid
  echo "[$l] DEMO-EXIT rc=$?"
  grep -E "KMS frames shown|DEMO |refuses|Error|ERROR" /tmp/$l.log | sed "s/^/[$l] /"
}
check zc --zero-copy on
echo 0 > /sys/module/udmabuf/parameters/allow_vmap
check refused --zero-copy auto
echo 1 > /sys/module/udmabuf/parameters/allow_vmap
for res in 1024x768 1920x1080 3840x2160; do
  for zc in off on; do
    $D demo --output kms --bench --frames {bench} --resolution $res --zero-copy $zc > /tmp/b.out 2> /tmp/b.err
    rc=$?
    sed "s/^/[bench-$zc] /" /tmp/b.out
    grep -E "KMS frames shown|Error|refused=true" /tmp/b.err | sed "s/^/[bench-$zc] /"
    echo "[bench-$zc] BENCH-EXIT res=$res rc=$rc"
  done
done
"""


def _tagged(lines, tag: str) -> list[str]:
    p = f"[{tag}] "
    return [l[l.index(p) + len(p):] for _, l in lines if p in l]


def _kms_counts(lines: list[str]) -> dict[str, str]:
    return next((kv(l) for l in lines if "KMS frames shown" in l), {})


def check_udmabuf(lines) -> tuple[str, str]:
    """PASS when (1) zero-copy: scan-out read back exact, copied=0 zero_copy>0; (2) vmap
    refused: the demo still ran (rc 0), scan-out exact, copied>0 zero_copy=0
    imports_refused>0; (3) bench lines for 1024x768, 1920x1080 and 3840x2160 (VKMS has
    that mode from lib/arm64/vkms-uhd-mode.patch), copy and zero-copy."""
    problems, out = [], []
    for tag, want_zc in (("zc", True), ("refused", False)):
        t = _tagged(lines, tag)
        scan = next((l for l in t if l.startswith("SCANOUT-CHECK")), "")
        rc = next((kv(l).get("rc") for l in t if l.startswith("DEMO-EXIT")), None)
        k = _kms_counts(t)
        copied, zc = int(k.get("copied", "-1")), int(k.get("zero_copy", "-1"))
        refused = int(k.get("imports_refused", "0"))
        out.append(f"{tag}: {scan or 'no SCANOUT-CHECK'} | rc={rc} copied={copied} zero_copy={zc} "
                   f"imports_refused={refused}")
        if not scan.startswith("SCANOUT-CHECK ok=1"):
            problems.append(f"{tag}: scan-out check failed")
        if rc != "0":
            problems.append(f"{tag}: demo exit {rc}")
        if want_zc and not (copied == 0 and zc > 0):
            problems.append(f"{tag}: expected copied=0 zero_copy>0")
        if not want_zc and not (copied > 0 and zc == 0 and refused > 0):
            problems.append(f"{tag}: expected copied>0 zero_copy=0 imports_refused>0")
    bench: dict[tuple[str, str], dict] = {}
    for zcm in ("off", "on"):
        t = _tagged(lines, f"bench-{zcm}")
        cur, why = None, ""
        for l in t:
            if l.startswith("DEMO BENCH"):
                cur = kv(l)
            elif "refused=true" in l and not why:
                # The backend's reason: its message, before the fields (conn=...).
                m = re.search(r"WARN (refused .*?) conn=\d", l)
                why = (m.group(1) if m else l.strip())[:240]
            elif l.startswith("BENCH-EXIT"):
                e = kv(l)
                if e.get("rc") == "0" and cur:
                    bench[(e["res"], zcm)] = cur
                else:
                    err = f"rc={e.get('rc')}" + (f" ({why})" if why else "")
                    bench[(e["res"], zcm)] = {"error": err}
                cur, why = None, ""
    for res in ("1024x768", "1920x1080", "3840x2160"):
        row = [f"BENCH res={res}"]
        for zcm, name in (("off", "copy"), ("on", "zcopy")):
            b = bench.get((res, zcm), {"error": "missing"})
            if "error" in b:
                row.append(f"{name}_error={b['error']}")
                problems.append(f"bench {res} {name}: {b['error']}")
            else:
                row.append(f"{name}_cpu_us_per_flip={b['cpu_us_per_flip']} {name}_flips={b['flips']} "
                           f"{name}_p50_us={b['p50_us']} {name}_p99_us={b['p99_us']}")
        c, z = bench.get((res, "off"), {}), bench.get((res, "on"), {})
        if "cpu_us_per_flip" in c and "cpu_us_per_flip" in z and int(c["cpu_us_per_flip"]) > 0:
            row.append(f"zcopy_over_copy={int(z['cpu_us_per_flip']) / int(c['cpu_us_per_flip']):.3f}")
        out.append(" ".join(row))
    return ("FAIL" if problems else "PASS"), "\n".join(out + [f"problem: {p}" for p in problems])


def _initrd(name: str, workdir: str, files: dict, base: str) -> str:
    """The VM's initramfs: an overlay cpio of `files` (path -> (mode, bytes)), then the
    cached `base`; returns its path."""
    overlay = os.path.join(workdir, f"{name}.overlay.cpio")
    cpio.write_newc(overlay, files)
    initrd = os.path.join(workdir, f"{name}.initrd")
    with open(initrd, "wb") as out:
        # Uncompressed overlay first: the kernel cannot continue after a gzip member.
        out.write(open(overlay, "rb").read())
        out.write(open(base, "rb").read())
    return initrd


def run_udmabuf(name: str, art: dict, bins: dict, workdir: str, accel: list[str],
                frames: int, boot_timeout: float) -> Result:
    """kms-demo-udmabuf: one boot of a plain VM, Debian's kernel with VKMS and udmabuf."""
    res = Result(name)
    need = {k: bins.get(k, f"ERROR: {k} not built") for k in ("displback", "scanout_check")}
    bad = [p for p in need.values() if p.startswith("ERROR")]
    if bad or "ZC_UDMABUF_KO" not in art:
        res.detail = "; ".join(bad) or "no out-of-tree vkms/udmabuf modules (build.sh zcopy)"
        return res
    bench_frames = max(300, frames)
    cmd = UDMABUF_CMD.replace("{frames}", str(min(frames, 60))).replace("{bench}", str(bench_frames))
    files = {
        "init": (0o755, INIT_VKMS.encode()),
        "lib/modules/extra/vkms.ko": (0o644, open(art["ZC_VKMS_KO"], "rb").read()),
        "lib/modules/extra/udmabuf.ko": (0o644, open(art["ZC_UDMABUF_KO"], "rb").read()),
        "etc/test.cmd": (0o644, cmd.encode()),
        "bin/displback": (0o755, open(need["displback"], "rb").read()),
        "bin/scanout_check": (0o755, open(need["scanout_check"], "rb").read()),
    }
    # Busybox and Debian's DRM modules.
    initrd = _initrd(name, workdir, files, art["ZC_KMS_INITRAMFS"])
    qargs = [*accel, "-m", "1G", "-smp", "2", "-machine", "pc", "-display", "none", "-vga", "none",
             "-kernel", art["VMLINUX"], "-initrd", initrd,
             "-append", "console=ttyS0 loglevel=4 panic=-1"]
    sw = Stopwatch()
    v = vm.VM(qargs, workdir, name)
    try:
        v.wait_for(r"HARNESS BOOTED", boot_timeout, fail=ERROR_RX)
        res.timings["boot"] = sw.lap()
        i, m = v.wait_for(r"UDMABUF dev=(\S*) allow_vmap=(\S*)", 60, fail=ERROR_RX)
        if "udmabuf" not in m.group(1) or m.group(2) not in ("Y", "1"):
            raise vm.Timeout(f"no /dev/udmabuf with allow_vmap in this kernel: {m.group(0)}")
        i, _ = v.wait_for(r"\[refused\] DEMO-EXIT", 600, i, fail=r"Kernel panic|HARNESS-EXIT")
        res.timings["checks"] = sw.lap()
        v.wait_for(r"HARNESS-EXIT rc=", 1200, i, fail=r"Kernel panic")
        res.timings["bench"] = sw.lap()
        res.status, res.detail = check_udmabuf(v.lines)
    except (vm.Timeout, RuntimeError, ValueError, OSError) as e:
        res.status, res.detail = "FAIL", f"{e}\n{v.tail()}"
    finally:
        v.stop(timeout=20)
        res.timings["total"] = v.elapsed()
    return res


INIT = """#!/bin/sh
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
/bin/busybox mkdir -p /usr/bin /usr/sbin
/bin/busybox --install -s
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
echo "HARNESS BOOTED uptime=$(cut -d' ' -f1 /proc/uptime)"
for m in $(cat /etc/modules.load) EXTRA_MODULES; do insmod $m || echo "HARNESS insmod $m failed"; done
i=0; while [ ! -e /dev/dri/card0 ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done
echo "HARNESS DRM uptime=$(cut -d' ' -f1 /proc/uptime) cards=$(ls /dev/dri 2>/dev/null | tr '\\n' ' ')"
sh /etc/test.cmd
echo "HARNESS-EXIT rc=$?"
poweroff -f
"""
# The plain VM of kms-demo-udmabuf: Debian's kernel; its DRM modules (the base's
# /etc/modules.load), then the out-of-tree vkms.ko and udmabuf.ko (lib/zcopy.sh) from the
# overlay's /lib/modules/extra.
INIT_VKMS = INIT.replace("EXTRA_MODULES", "/lib/modules/extra/vkms.ko /lib/modules/extra/udmabuf.ko")
INIT = INIT.replace(" EXTRA_MODULES", "")


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
    if display == "vkms":
        return run_udmabuf(name, art, bins, workdir, accel, frames, boot_timeout)
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
    initrd = _initrd(name, workdir, files, art["KMS_INITRAMFS"])
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
