"""Group `arm64`: Xen 4.20 on arm64 (Debian trixie) under qemu-system-aarch64 (TCG), one boot
for every selected scenario. Dom0 (Debian's 6.12 arm64 kernel, an initramfs with the Xen
tools) runs displback on VKMS with an out-of-tree gntdev that has CONFIG_XEN_GNTDEV_DMABUF;
DomUs (the same kernel, drm_xen_front built out of tree) run guest_client. The host cannot
screendump VKMS: Dom0 reads its scan-out back (scanout_check) while a guest holds.

Binaries: static aarch64 builds from scripts/build-arm64 (Debian's rustc 1.85 in a
chroot); images: lib/build.sh arm64 (cached by content). Per run, an uncompressed overlay
cpio (init, params, displback, scanout_check, the DomU initramfs with guest_client) goes
before the cached Dom0 base initramfs.

VKMS composes planes in software, so it vmaps every buffer it scans out: gntdev's dma-buf
exporter needs vmap for that (lib/arm64/gntdev-dmabuf-vmap.patch). Real Arm display
controllers scan out by DMA from the sg table; that patch is a limit of testing in QEMU,
not something the product needs."""

import os
import re
import subprocess
import time

from . import cpio, scenarios, vm
from .common import Result, Stopwatch, refusals

HERE = os.path.dirname(os.path.abspath(__file__))
XEN_DIR = os.path.join(os.path.dirname(HERE), "xen")
REPO = os.path.abspath(os.path.join(HERE, "..", "..", ".."))

SCENARIOS = scenarios.names("arm64")  # lib/scenarios.py's rows, in table order
# The gntdev module each scenario needs, one kind per boot (xenstored and xenconsoled keep
# /dev/xen/gntdev open, so it cannot be swapped): "dmabuf" = the harness's gntdev with
# CONFIG_XEN_GNTDEV_DMABUF, "stock" = Debian's (no dma-buf). A boot takes ~25 s to Dom0.
GNTDEV_KIND = {"arm64-copy": "stock"}
TARGET = "aarch64-unknown-linux-gnu"
BINS = ["displback", "guest_client", "scanout_check", "flip_floor"]
FRAMES = 120  # flips per guest (TCG on arm64 is slow; 120 keeps the warm run near 3 min)
# arm64-cost: flips per flooding guest; the measured window (first answered flip to the
# guest's HOLD) must hold at least COST_MIN_FLIPS of them.
COST_FLIPS, COST_MIN_FLIPS = 360, 300
COST_SIZES = ["1024x768", "1920x1080", "3840x2160"]
COST_PATHS = {"copy": "copy", "zcopy": "zero-copy"}  # run name -> displback status path
USER_HZ = 100  # /proc/PID/stat ticks: USER_HZ is 100 on arm64
# Goals (issue 13 item 5): zero-copy per-flip CPU flat in resolution, and cheap next to a copy.
GOAL_FLAT, GOAL_VS_COPY = 1.2, 0.1
XEN_CMDLINE = "console=dtuart dom0_mem=1G,max:1G dom0_max_vcpus=1 loglvl=all guest_loglvl=all"
DOM0_CMDLINE = "console=hvc0 earlycon=xen loglevel=4 rdinit=/init"
# QEMU puts the device tree at RAM base + 128 MiB (0x48000000) when there is no -initrd:
# the ~38 MB Image goes at 0x49000000, the Dom0 initramfs at 0x4c000000.
KERNEL_ADDR, INITRD_ADDR = "0x49000000", "0x4c000000"


def build_bins(workdir: str) -> dict[str, str]:
    """scripts/build-arm64 (static aarch64, rustc 1.85): bin -> path or 'ERROR: ...'."""
    log = os.path.join(workdir, "cargo-aarch64.log")  # build-arm64.log is the images build (build.sh arm64)
    with open(log, "w") as f:
        rc = subprocess.call([os.path.join(REPO, "scripts", "build-arm64"), *BINS], cwd=REPO,
                             stdout=f, stderr=subprocess.STDOUT)
    out = {}
    for b in BINS:
        p = os.path.join(REPO, "target", TARGET, "release", "stripped", b)
        if rc != 0 or not os.path.exists(p):
            tail = open(log).read().strip().splitlines()[-3:]
            out[b] = f"ERROR: scripts/build-arm64 failed (rc={rc}, {log}): " + " / ".join(tail)
        else:
            out[b] = p
    return out


def _read(p: str) -> bytes:
    return open(p, "rb").read()


def _initrd(workdir: str, name: str, files: dict, base: str) -> str:
    """Uncompressed overlay first, then the cached gzip base (the kernel does not resume
    parsing after a gzip member)."""
    ov = os.path.join(workdir, f"{name}.overlay.cpio")
    cpio.write_newc(ov, files)
    out = os.path.join(workdir, f"{name}.cpio")
    with open(out, "wb") as f:
        f.write(_read(ov))
        f.write(_read(base))
    return out


class Run:
    def __init__(self, v: vm.VM):
        self.v, self.i, self.begin = v, 0, 0
        self.dmabufs_base = 0  # dma-bufs alive in Dom0 before the first scenario

    def wait(self, rx: str, timeout: float, fail: str | None = None, what: str | None = None) -> re.Match:
        self.i, m = self.v.wait_for(rx, timeout, self.i, fail, what)
        return m

    def lines(self, rx: str) -> list[str]:
        return [l.strip() for _, l in self.v.lines[self.begin:self.i + 1] if re.search(rx, l)]


def _kv(text: str) -> dict[str, int]:
    return {k: int(v) for k, v in re.findall(r"(\w+)=(-?\d+)", text)}


def _check_cost(r: Run, res: Result) -> None:
    """arm64-cost: the six HARNESS COST lines (copy / zero-copy x three sizes) and the two
    backends' KMS counters. A missing or short measurement is a FAIL; a missed goal is
    reported as "NOT met" (TCG figures, see README) and does not fail the scenario."""
    problems: list[str] = []
    rows: dict[tuple[str, str], dict[str, str]] = {}
    for l in r.lines(r"HARNESS COST path="):
        kv = dict(re.findall(r"(\w+)=(\S+)", l.split("HARNESS COST ", 1)[1]))
        rows[(kv.get("path", "?"), kv.get("size", "?"))] = kv
    counters = {}
    for path in COST_PATHS:
        line = next((l for l in r.lines(rf"^\[be-log:cost-{path}\] .*KMS frames shown")), "")
        m = re.search(r"copied=(\d+) zero_copy=(\d+)", line)
        counters[path] = (int(m.group(1)), int(m.group(2))) if m else None
    if counters["copy"] is None or counters["copy"][0] == 0 or counters["copy"][1] != 0:
        problems.append(f"copy backend's KMS counters (copied, zero_copy) = {counters['copy']}: want copies only")
    if counters["zcopy"] is None or counters["zcopy"][0] != 0 or counters["zcopy"][1] == 0:
        problems.append(f"zero-copy backend's KMS counters (copied, zero_copy) = {counters['zcopy']}: want no copies")
    idle = {m.group(1): (int(m.group(2)), int(m.group(3)))
            for l in r.lines(r"HARNESS COST-IDLE ")
            if (m := re.search(r"path=(\w+) secs=5 cpu_ticks=(-?\d+) cpu_ns=(-?\d+)", l))}
    us: dict[tuple[str, str], float] = {}
    table = ["  path       size        flips  cpu_ms  us/flip(stat)  user  sys  us/flip(schedstat)  guest p50_ms  p99_ms"]
    keyvals = []
    for path, want_path in COST_PATHS.items():
        for size in COST_SIZES:
            kv = rows.get((path, size))
            if kv is None or "error" in kv:
                problems.append(f"{path} {size}: no measurement ({kv.get('error') if kv else 'no COST line'})")
                continue
            try:
                flips, ticks, ns = int(kv["flips"]), int(kv["cpu_ticks"]), int(kv["cpu_ns"])
            except (KeyError, ValueError):
                problems.append(f"{path} {size}: unreadable COST line {kv}")
                continue
            bad = []
            if flips < COST_MIN_FLIPS:
                bad.append(f"only {flips} flips measured (want >= {COST_MIN_FLIPS})")
            if kv.get("guest_ok") != "1":
                bad.append(f"guest client ok={kv.get('guest_ok')}")
            if kv.get("status_path") != want_path:
                bad.append(f"status says path={kv.get('status_path')} (want {want_path})")
            if ticks <= 0:
                bad.append("no CPU time measured")
            if bad:
                problems.append(f"{path} {size}: " + "; ".join(bad))
                continue
            us[(path, size)] = ticks * 1e6 / USER_HZ / flips
            us_ns = ns / 1e3 / flips
            ut, st = int(kv.get("utime_ticks", -1)), int(kv.get("stime_ticks", -1))
            if ut < 0 or st < 0:
                problems.append(f"{path} {size}: no utime/stime split in {kv}")
            ut_us, st_us = ut * 1e6 / USER_HZ / flips, st * 1e6 / USER_HZ / flips
            p50, p99 = kv.get("guest_p50_ms", "?"), kv.get("guest_p99_ms", "?")
            keyvals.append(f"ARM64-COST path={path} size={size} flips={flips} cpu_ticks={ticks} "
                           f"utime_ticks={ut} stime_ticks={st} us_per_flip={us[(path, size)]:.0f} "
                           f"user_us_per_flip={ut_us:.0f} sys_us_per_flip={st_us:.0f} "
                           f"schedstat_us_per_flip={us_ns:.0f} p50_ms={p50} p99_ms={p99}")
            table.append(f"  {want_path:<10} {size:<10} {flips:>6} {ticks * 1e3 / USER_HZ:>7.0f} "
                         f"{us[(path, size)]:>14.0f} {ut_us:>5.0f} {st_us:>4.0f} {us_ns:>19.0f} {p50:>13} {p99:>7}")
    # The floor: flip_floor's two dumb buffers flipped with the backend's commit + event read.
    for size in COST_SIZES:
        fl = next((l for l in r.lines(rf"^\[floor\] FLIP-FLOOR .*size={size}")), "")
        fk = dict(re.findall(r"(\w+)=(\S+)", fl))
        if fk.get("ok") != "1":
            problems.append(f"floor {size}: {fl or 'no FLIP-FLOOR line'}")
            continue
        flips, ut, st = int(fk["flips"]), int(fk["utime_ticks"]), int(fk["stime_ticks"])
        if flips < COST_MIN_FLIPS or ut + st <= 0:
            problems.append(f"floor {size}: {flips} flips, {ut + st} ticks (want >= {COST_MIN_FLIPS} flips, CPU > 0)")
            continue
        us[("floor", size)] = (ut + st) * 1e6 / USER_HZ / flips
        keyvals.append(f"ARM64-COST path=floor size={size} flips={flips} cpu_ticks={ut + st} utime_ticks={ut} "
                       f"stime_ticks={st} us_per_flip={us[('floor', size)]:.0f} "
                       f"user_us_per_flip={ut * 1e6 / USER_HZ / flips:.0f} sys_us_per_flip={st * 1e6 / USER_HZ / flips:.0f}")
        table.append(f"  {'floor':<10} {size:<10} {flips:>6} {(ut + st) * 1e3 / USER_HZ:>7.0f} "
                     f"{us[('floor', size)]:>14.0f} {ut * 1e6 / USER_HZ / flips:>5.0f} {st * 1e6 / USER_HZ / flips:>4.0f}"
                     f"{'-':>20} {'-':>13} {'-':>7}  (flip_floor: dumb buffers, no guest)")
    # The backend's syscalls per zero-copy flip at 1920x1080 (strace, a window of its own).
    sc = next((l for l in r.lines(r"HARNESS SYSCALLS ")), "")
    sck = _kv(sc)
    if "flips" not in sck or sck["flips"] <= 0:
        problems.append(f"syscall count: {sc or 'no SYSCALLS line'}")
    else:
        calls = [(m.group(1), int(m.group(2))) for l in r.lines(r"HARNESS SYSCALL name=")
                 if (m := re.search(r"name=(\S+) calls=(\d+)", l))]
        total = sum(n for _, n in calls)
        if total == 0:
            problems.append(f"syscall count: no call between the two status answers ({sc})")
        keyvals.append(f"ARM64-SYSCALLS path=zcopy size=1920x1080 flips={sck['flips']} calls={total} "
                       f"per_flip={total / sck['flips']:.2f}")
        for name, n in calls:
            keyvals.append(f"ARM64-SYSCALL name={name} calls={n} per_flip={n / sck['flips']:.2f}")
        table.append(f"  backend syscalls per zero-copy flip at 1920x1080 (strace -f, {sck['flips']} flips between "
                     "two status answers): "
                     f"{total / sck['flips']:.1f}: " + ", ".join(f"{k} {n / sck['flips']:.2f}" for k, n in calls))
    for path in COST_PATHS:
        if path in idle:
            keyvals.append(f"ARM64-COST-IDLE path={path} secs=5 cpu_ticks={idle[path][0]} cpu_ns={idle[path][1]}")
            table.append(f"  {COST_PATHS[path]:<10} idle 5 s, no guest: {idle[path][0] * 1e3 / USER_HZ:.0f} ms CPU")
        else:
            problems.append(f"{path}: no idle measurement")
    goals = []

    def goal(name: str, num: tuple[str, str], den: tuple[str, str], limit: float, what: str) -> None:
        if num in us and den in us and us[den] > 0:
            ratio = us[num] / us[den]
            met = ratio <= limit
            keyvals.append(f"ARM64-COST-GOAL name={name} ratio={ratio:.3f} limit={limit} met={int(met)}")
            goals.append(f"{what}: {ratio:.2f} (goal <= {limit}): {'met' if met else 'NOT met'}")
        else:
            goals.append(f"{what}: not measured")

    goal("zcopy-flat", ("zcopy", "3840x2160"), ("zcopy", "1920x1080"), GOAL_FLAT,
         "zero-copy per-flip CPU 3840x2160 / 1920x1080")
    goal("zcopy-vs-copy", ("zcopy", "1920x1080"), ("copy", "1920x1080"), GOAL_VS_COPY,
         "zero-copy / copy per-flip CPU at 1920x1080")
    for size in COST_SIZES:  # not goals: how much of a zero-copy flip the floor is
        if ("zcopy", size) in us and ("floor", size) in us:
            keyvals.append(f"ARM64-COST-FLOOR size={size} zcopy_us={us[('zcopy', size)]:.0f} "
                           f"floor_us={us[('floor', size)]:.0f} backend_own_us={us[('zcopy', size)] - us[('floor', size)]:.0f}")
    if ("copy", "1920x1080") in us and ("floor", "1920x1080") in us:
        r_ = us[("floor", "1920x1080")] / us[("copy", "1920x1080")]
        goals.append(f"the floor alone (flip_floor) / copy at 1920x1080: {r_:.2f} (zero-copy cannot go below the floor)")
    res.cost_lines = keyvals  # printed by run_all at the end of the group
    res.status = "PASS" if not problems else "FAIL"
    res.detail = ("backend CPU per flip (utime+stime over the window; TCG, VKMS vmaps each buffer per commit), "
                  f"KMS counters copy={counters['copy']} zero-copy={counters['zcopy']}\n"
                  + "\n".join(table) + "\n" + "\n".join(goals)
                  + "".join(f"\nPROBLEM: {p}" for p in problems))


def _check(r: Run, s: str, res: Result) -> None:
    """Reads a finished scenario's markers (between its BEGIN and END) and judges it."""
    if s == "arm64-cost":
        _check_cost(r, res)
        return
    name = {"arm64-zcopy-frontend": "zfront", "arm64-zcopy-bealloc": "zbealloc", "arm64-copy": "zcopy",
            "arm64-zcopy-destroy": "zdestroy", "arm64-two-domus": "ztwo", "arm64-zcopy-fallback": "zfallback"}[s]
    problems: list[str] = []

    def need(cond: bool, why: str) -> None:
        if not cond:
            problems.append(why)

    belog = [l.split("] ", 1)[1] for l in r.lines(rf"^\[be-log:{name}\] ")]
    counters = next((l for l in belog if "KMS frames shown" in l), "")
    cm = re.search(r"copied=(\d+) zero_copy=(\d+)", counters)
    copied, zc = (int(cm.group(1)), int(cm.group(2))) if cm else (None, None)
    fallbacks = [l[l.find("zero-copy"):] for l in belog if "using the copy path" in l or "copying it" in l]
    startup = next((l[l.find("zero-copy"):] for l in belog if re.search(r"zero-copy (On|Auto):", l)), "")
    maps = {}
    for l in r.lines(rf"HARNESS MAPS name={name} at="):
        m = re.search(r"at=(\w+) (.*?) uptime=", l)
        if m:
            maps[m.group(1)] = _kv(m.group(2))
    stopped = next((_kv(l) for l in r.lines(rf"HARNESS BACKEND STOPPED name={name} ")), {})
    scans = [l.split("] ", 1)[1] for l in r.lines(rf"^\[scan:{name}2?\] SCANOUT-CHECK ")]
    stats = next((l.split("GUEST-CLIENT ", 1)[1] for l in r.lines(r"GUEST-CLIENT .*p50_us=")), "")
    stats = " ".join(t for t in stats.split() if t.split("=")[0] in ("frames", "p50_us", "p99_us", "max_us"))
    refused = [l.split("] ", 1)[1] for l in refusals(belog)]

    need(bool(scans) and scans[-1].startswith("SCANOUT-CHECK ok=1"),
         f"scan-out readback: {scans[-1] if scans else 'no SCANOUT-CHECK line'}")
    need(cm is not None, "no 'KMS frames shown' counters in the backend's log (did it exit cleanly?)")
    need(not refused, f"requests refused: {refused[:2]}")
    gone = maps.get("gone", {})
    need(bool(gone) and all(gone.get(k, -1) == 0 for k in ("gntdev", "gntalloc", "dmabuf_maps", "dmabuf_fds")),
         f"backend mappings after the guest was gone: {gone or 'not reported'} (want gntdev/gntalloc/dma-bufs 0)")
    need(stopped.get("dmabufs_sys", -1) == r.dmabufs_base,
         f"dma-bufs alive in Dom0 after the backend stopped: {stopped.get('dmabufs_sys')} (before: {r.dmabufs_base})")
    if s == "arm64-two-domus":  # one readback per guest (pattern connectors 0 and 1)
        for tag, conn in (("ztwo", "left=Virtual-1"), ("ztwo2", "right=Virtual-2")):
            sc = [l.split("] ", 1)[1] for l in r.lines(rf"^\[scan:{tag}\] SCANOUT-CHECK ")]
            need(bool(sc) and sc[-1].startswith("SCANOUT-CHECK ok=1"),
                 f"guest on {conn}: {sc[-1] if sc else 'no SCANOUT-CHECK line'}")
        n_ok = len([l for l in r.lines(r"GUEST-CLIENT RESULT ok=1")])
        need(n_ok == 2, f"{n_ok} guest clients reported ok=1 (want 2)")
        # At the same time: both were flipping before either held (console order in Dom0).
        seen = [(j, l) for j, (_, l) in enumerate(r.v.lines[r.begin:r.i + 1])]
        flipping = [next((j for j, l in seen if f"[ztwo{g}] GUEST-CLIENT FLIPPING" in l), None) for g in "ab"]
        first_hold = next((j for j, l in seen if re.search(r"\[ztwo[ab]\] GUEST-CLIENT HOLD", l)), None)
        need(None not in flipping and first_hold is not None and max(flipping) < first_hold,
             f"the guests did not flip at the same time (FLIPPING lines at {flipping}, first HOLD at {first_hold})")
    rm_ = re.search(r"imports_refused=(\d+)", counters)
    imports_refused = int(rm_.group(1)) if rm_ else None
    if s == "arm64-zcopy-fallback":
        vm_ = next((l for l in r.lines(r"HARNESS FALLBACK allow_vmap=")), "")
        need("allow_vmap=0 " in vm_ or "allow_vmap=N " in vm_, f"gntdev's vmap not switched off: {vm_ or 'no FALLBACK line'}")
        need(copied is not None and copied > 0 and zc == 0 and (imports_refused or 0) > 0,
             f"counters copied={copied} zero_copy={zc} imports_refused={imports_refused} "
             "(want copies of refused imports: copied>0 zero_copy=0 imports_refused>0)")
        why = next((l[l.find("the display refuses"):] for l in belog if "the display refuses to scan out" in l), "")
        need(bool(why), "no 'the display refuses to scan out zero-copy buffer' line in the backend's log")
        need(not any("legacy from now on" in l for l in belog), "the backend blamed atomic ('legacy from now on')")
        extra = f"allow_vmap=0; imports_refused={imports_refused}; {why[:160]}; "
    elif s == "arm64-copy":
        ref = next((l for l in r.lines(r"HARNESS REFUSED rc=")), "")
        rm = re.search(r"rc=(\d+) reason=(.*?) uptime=", ref)
        need(bool(rm) and rm.group(1) not in ("0", "124") and "CONFIG_XEN_GNTDEV_DMABUF" in rm.group(2),
             f"--zero-copy on with the stock gntdev: {ref or 'no REFUSED line'} (want a refusal naming CONFIG_XEN_GNTDEV_DMABUF)")
        need(copied is not None and copied > 0 and zc == 0, f"counters copied={copied} zero_copy={zc} (want copies)")
        need(len(fallbacks) >= 1, "no 'using the copy path' reason in the log")
        extra = f"--zero-copy on refused: {rm.group(2) if rm else '?'}; "
    if s not in ("arm64-copy", "arm64-zcopy-fallback"):
        need(copied == 0 and zc is not None and zc > 0, f"counters copied={copied} zero_copy={zc} (want no copies)")
        need(not fallbacks, f"copy-path lines: {fallbacks[:2]}")
        hold = maps.get("hold", {})
        if s != "arm64-zcopy-destroy":
            need(hold.get("dmabufs_sys", 0) > 0, f"no dma-buf alive while the guest holds: {hold}")
        extra = ""
    if s == "arm64-zcopy-destroy":
        d = next((l for l in r.lines(r"HARNESS DESTROYED rc=")), "")
        dm = re.search(r"rc=(\d+) secs=(\S+) alive=(\d) before=\[(.*?)\] after=\[(.*?)\]", d)
        if not dm:
            problems.append(f"no DESTROYED line: {d}")
        else:
            before, after = _kv(dm.group(4)), _kv(dm.group(5))
            need(dm.group(1) == "0" and dm.group(3) == "1", f"xl destroy rc={dm.group(1)} backend alive={dm.group(3)}")
            need(before.get("dmabufs_sys", 0) > 0, f"no zero-copy buffers live at the destroy: {before}")
            need(all(after.get(k, -1) == 0 for k in ("gntdev", "dmabuf_maps", "dmabuf_fds")),
                 f"left mapped after xl destroy: {after}")
            extra = (f"xl destroy rc={dm.group(1)} in {dm.group(2)} s, backend alive={dm.group(3)}, "
                     f"before [{dm.group(4)}] after [{dm.group(5)}]; next guest: ")
            res.timings["xl-destroy"] = float(dm.group(2))
    res.status = "PASS" if not problems else "FAIL"
    shown = " / ".join(scans[-2:]) if s == "arm64-two-domus" else (scans[-1] if scans else "(no readback)")
    res.detail = (f"{extra}{shown} | {stats}\n"
                  f"backend: {startup or '(no zero-copy line)'}; KMS frames copied={copied} zero_copy={zc}\n"
                  f"mappings " + " ".join(f"{k}:{','.join(f'{a}={b}' for a, b in v.items())}" for k, v in maps.items())
                  + f" stopped:dmabufs_sys={stopped.get('dmabufs_sys')} (base {r.dmabufs_base})"
                  + "".join(f"\nPROBLEM: {p}" for p in problems))


def run_all(names: list[str], args, build_images) -> list[Result]:
    """Builds once, then one boot per gntdev kind (dmabuf first)."""
    t0 = time.monotonic()
    bins = build_bins(args.workdir)
    bins_secs = time.monotonic() - t0
    err = next((p for p in bins.values() if p.startswith("ERROR")), None)
    try:
        art = build_images("arm64", args.workdir)
    except RuntimeError as e:
        err = err or str(e)
        art = {"build_secs": 0.0}
    print(f"=== arm64: aarch64 binaries in {bins_secs:.1f}s, images in {art['build_secs']:.1f}s "
          f"(Xen {art.get('ARM64_XEN_VERSION', '?')}, Linux {art.get('ARM64_KV', '?')}-arm64)", flush=True)
    out: list[Result] = []
    for kind in ("dmabuf", "stock"):
        mine = [n for n in names if GNTDEV_KIND.get(n, "dmabuf") == kind]
        if not mine:
            continue
        if err:
            out += [Result(n, "FAIL", err) for n in mine]
            continue
        res = run_boot(kind, mine, bins, art, args)
        if not out:
            res[0].timings["images"] = art["build_secs"]
            res[0].timings["aarch64-build"] = bins_secs
        out += res
    cost = [x for x in out if getattr(x, "cost_lines", None) is not None]
    for x in cost:  # the per-flip table, at the end of the group
        print("=== arm64 per-flip cost (real ioctls, Xen 4.20 arm64 under TCG)", flush=True)
        for l in x.cost_lines:
            print(l, flush=True)
        print(x.detail, flush=True)
    return out


def run_boot(kind: str, names: list[str], bins: dict, art: dict, args) -> list[Result]:
    results = {i: Result(n if names.index(n) == i else f"{n}#{names[:i + 1].count(n)}")
               for i, n in enumerate(names)}
    workdir = args.workdir
    domu = _initrd(workdir, "arm64-domU", {
        "init": (0o755, _read(os.path.join(XEN_DIR, "domu-init"))),
        "bin/guest_client": (0o755, _read(bins["guest_client"])),
    }, art["ARM64_DOMU_BASE"])
    params = (f"FRAMES={FRAMES}\nHOLD={max(args.hold, 5)}\nSCENARIOS=\"{' '.join(names)}\"\nGNTDEV_KIND={kind}\n"
              f"COST_FLIPS={COST_FLIPS}\nCOST_MIN_FLIPS={COST_MIN_FLIPS}\n")
    dom0 = _initrd(workdir, f"arm64-dom0-{kind}", {
        "init": (0o755, _read(os.path.join(XEN_DIR, "arm64-dom0-init"))),
        "harness/params": (0o644, params.encode()),
        "harness/domu.cfg": (0o644, _read(os.path.join(XEN_DIR, "arm64-domu.cfg"))),
        "harness/domU.cpio": (0o644, _read(domu)),
        "usr/local/bin/displback": (0o755, _read(bins["displback"])),
        "usr/local/bin/scanout_check": (0o755, _read(bins["scanout_check"])),
        "usr/local/bin/flip_floor": (0o755, _read(bins["flip_floor"])),
    }, art["ARM64_DOM0_BASE"])
    print("*** arm64: TCG (qemu-system-aarch64 has no accelerator on an x86 host) ***", flush=True)
    qargs = ["-M", "virt,virtualization=on,gic-version=3", "-cpu", "cortex-a57", "-smp", "2", "-m", "3G",
             "-accel", "tcg,thread=multi", "-display", "none",
             "-kernel", art["ARM64_XEN"], "-append", XEN_CMDLINE,
             "-device", f"guest-loader,addr={KERNEL_ADDR},kernel={art['ARM64_IMAGE']},bootargs={DOM0_CMDLINE}",
             "-device", f"guest-loader,addr={INITRD_ADDR},initrd={dom0}"]
    print(f"=== booting Xen arm64 + Dom0 (gntdev: {kind})", flush=True)
    v = vm.VM(qargs, workdir, f"xen-arm64-{kind}", binary="qemu-system-aarch64")
    r = Run(v)
    boot = {}
    try:
        sw = Stopwatch()
        r.wait(r"Xen version 4\.20", 60)
        boot["xen-banner"] = sw.lap()
        r.wait(r"HARNESS DOM0 BOOTED", 240, fail=r"Kernel panic|Panic on CPU")
        boot["dom0-init"] = sw.lap()
        m = r.wait(r"HARNESS DOM0 READY cards=\[(.*?)\] xl=(\S*) .*dmabufs_base=(\d+)", 180,
                   fail=r"Kernel panic|Panic on CPU")
        r.dmabufs_base = int(m.group(3))
        boot["toolstack"] = sw.lap()
        print(f"--- arm64 Dom0 ready at {v.elapsed():.1f}s: " + " ".join(f"{k}={t:.1f}s" for k, t in boot.items())
              + f" cards: {m.group(1)} xen {m.group(2)}", flush=True)
        for idx, s in enumerate(names):
            res = results[idx]
            if idx == 0:
                res.timings.update({f"boot:{k}": t for k, t in boot.items()})
            t1 = time.monotonic()
            try:
                r.wait(rf"HARNESS SCENARIO {s} BEGIN", 600)
                r.begin = r.i
                sw = Stopwatch()
                hold = r.wait(r"GUEST-CLIENT HOLD", 600, fail=rf"HARNESS SCENARIO {s} END",
                              what="a guest's HOLD")
                res.timings["to-hold"] = sw.lap()
                del hold
                m = r.wait(rf"HARNESS SCENARIO {s} END rc=(\d+)", 1800 if s == "arm64-cost" else 600)
                _check(r, s, res)
                if m.group(1) != "0" and res.status == "PASS":
                    res.status, res.detail = "FAIL", f"Dom0 scenario script rc={m.group(1)}; {res.detail}"
            except (vm.Timeout, RuntimeError, ValueError, OSError) as e:
                res.status = "FAIL"
                mine = [l.strip() for _, l in v.lines[r.begin:] if re.search(
                    r"HARNESS (BACKEND|XL-CREATE|TIMEOUT|GAVE-UP|REFUSED|GNTDEV|DESTROY)|GUEST-CLIENT ERROR|SCANOUT-CHECK"
                    r"|panic|\[be-log:\S+\].*(WARN|ERROR)", l)][:12]
                res.detail = f"{e}" + "".join(f"\n  {l}" for l in mine)
                try:
                    r.wait(rf"HARNESS SCENARIO {s} END", 400)
                except vm.Timeout:
                    pass
            res.timings["scenario"] = time.monotonic() - t1
            print(f"--- {s}: {res.status} {res.timing_str()}\n    {res.detail}", flush=True)
        r.wait(r"HARNESS DOM0 DONE", 120)
    except vm.Timeout as e:
        for res in results.values():
            if res.detail == "not run":
                res.detail = f"Xen arm64 boot/run: {e}\n{v.tail()}"
    finally:
        rc = v.stop(timeout=60)
        total = v.elapsed()
    results[0].timings["vm-total"] = total
    print(f"=== Xen arm64 VM ({kind}) exited rc={rc} after {total:.1f}s", flush=True)
    return list(results.values())
