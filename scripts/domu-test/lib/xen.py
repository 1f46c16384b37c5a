"""Xen scenarios: Xen 4.17 + PV Dom0 (Debian kernel or the zero-copy Dom0 kernel, cached
debootstrap rootfs) + PV DomUs with a vdispl device, all under QEMU. One boot per Dom0
kernel runs every selected scenario of that kind in order (Dom0's /harness/dom0-init drives them; the host follows its markers on the
serial console, takes QMP screendumps while a guest holds a frame and checks pixels).

Per-run injection (no rootfs rebuild): the stage-1 initramfs carries an uncompressed
overlay with /inject/... (the displback .deb built by scripts/build-deb from the fresh
binary, the Dom0 scripts, the DomU initramfs with the fresh guest_client); stage 1 copies
it onto the snapshot root disk and Dom0's init installs the package with `dpkg -i` (the
installed /usr/bin/displback is what the scenarios run)."""

import os
import re
import subprocess
import time

from . import cpio, pattern, pixels, scenarios, vm, weston
from .common import HOLD_RX, Result, Stopwatch, hold_info, refusals

HERE = os.path.dirname(os.path.abspath(__file__))
XEN_DIR = os.path.join(os.path.dirname(HERE), "xen")
WESTON_DIR = os.path.join(os.path.dirname(HERE), "weston")

# Two Xen boots share this driver. "stock": Debian's kernel as Dom0, two bochs devices
# (-vga std and a secondary-vga, for two guests at once). "zcopy": the same kernel with an
# out-of-tree xen-gntdev that has dma-buf (lib/zcopy.sh) and a virtio-gpu whose dumb buffers can be
# granted (IMP_TO_REFS; bochs VRAM cannot).
STOCK_SCENARIOS = scenarios.own("xen")
# Scenarios whose DomU runs third-party programs from the Weston image (lib/weston.sh).
THIRD_PARTY = ("xen-weston-guest", "xen-modetest-guest", "xen-wayland")
ZCOPY_SCENARIOS = scenarios.own("zcopy")
# PCI slots of the display devices (Dom0 finds its cards by them) and QMP device ids.
VGA_PCI, VGA2_PCI, ZC_PCI = "00:02.0", "00:10.0", "00:11.0"
VGA2_ID, ZC_ID = "vga2", "zgpu"
# xen-noisy-neighbour: one card with two heads (a bochs device has one) for one backend
# serving two guests. Its driver is loaded by that scenario only. iommu_platform=on: see
# the zcopy device below.
NN_PCI, NN_ID = "00:11.0", "nngpu"
BOOT_DEVICES = {
    "stock": ["-device", f"secondary-vga,id={VGA2_ID},addr=0x10",
              "-device", f"virtio-gpu-pci,id={NN_ID},addr=0x11,max_outputs=2,xres=1024,yres=768,iommu_platform=on"],
    # iommu_platform=on (VIRTIO_F_ACCESS_PLATFORM): without it virtio-gpu hands QEMU
    # pseudo-physical addresses for its buffers, which in a PV Dom0 are not machine
    # addresses: the scanout stays black (measured, copy path and zero-copy alike).
    "zcopy": ["-device", f"virtio-gpu-pci,id={ZC_ID},addr=0x11,xres=1024,yres=768,iommu_platform=on"],
}
BOOT_PARAMS = {
    "stock": f"VGA_PCI={VGA_PCI}\nVGA2_PCI={VGA2_PCI}\nZC_PCI=\nNN_PCI={NN_PCI}\n",
    "zcopy": f"VGA_PCI={VGA_PCI}\nVGA2_PCI=\nZC_PCI={ZC_PCI}\nNN_PCI=\n",
}

XEN_CMDLINE = ("console=com1 com1=115200,8n1 dom0_mem=768M,max:768M dom0_max_vcpus=1 "
               "loglvl=all guest_loglvl=all smap=0")
DOM0_CMDLINE = "console=hvc0 earlyprintk=xen loglevel=4 root=/dev/vda"


def _read(p: str) -> bytes:
    return open(p, "rb").read()


def build_deb(binary: str, workdir: str) -> tuple[str, str]:
    """scripts/build-deb around the fresh static binary: (path of the .deb, path of the
    displback binary taken back out of it), or raises RuntimeError."""
    repo = os.path.abspath(os.path.join(XEN_DIR, "..", "..", ".."))
    out = os.path.join(workdir, "deb")
    p = subprocess.run([os.path.join(repo, "scripts", "build-deb"), "--binary", binary, "--out", out],
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if p.returncode != 0 or not p.stdout.strip():
        raise RuntimeError(f"scripts/build-deb failed: {p.stderr.strip()[-800:]}")
    deb = p.stdout.strip().splitlines()[-1]
    inner = os.path.join(out, "displback-from-deb")
    with open(inner, "wb") as f:
        tar = subprocess.run(["dpkg-deb", "--fsys-tarfile", deb], stdout=subprocess.PIPE, check=True).stdout
        f.write(subprocess.run(["tar", "-xO", "./usr/bin/displback"], input=tar, stdout=subprocess.PIPE,
                               check=True).stdout)
    os.chmod(inner, 0o755)
    return deb, inner


def _initrd(workdir: str, name: str, files: dict, base: str) -> str:
    """Uncompressed overlay cpio first, then the cached gzip base (see initramfs.sh)."""
    ov = os.path.join(workdir, f"{name}.overlay.cpio")
    cpio.write_newc(ov, files)
    out = os.path.join(workdir, f"{name}.cpio")
    with open(out, "wb") as f:
        f.write(_read(ov))
        f.write(_read(base))
    return out


class Run:
    def __init__(self, v: vm.VM, workdir: str, display: str | None):
        self.v, self.workdir, self.i = v, workdir, 0
        self.begin = 0  # serial line where the current scenario began (a scenario may repeat)
        self.display = display  # QMP device of the display guests show on (None: primary)

    def wait(self, rx: str, timeout: float, fail: str | None = None, what: str | None = None) -> re.Match:
        self.i, m = self.v.wait_for(rx, timeout, self.i, fail, what)
        return m

    def check_hold(self, dom: str, m: re.Match, tag: str, fmt: str = "xrgb8888",
                   device: str | None = None, head: int | None = None) -> pixels.CheckResult:
        frame, conn, w, h = hold_info(m)
        time.sleep(0.3)
        ppm = os.path.join(self.workdir, f"xen-{dom}-{tag}.ppm")
        self.v.screendump(ppm, device or self.display, head)
        return pixels.check_pattern(pixels.read_ppm(ppm), frame, conn, w, h, fmt)

    def guest_lines(self, dom: str, rx: str) -> list[str]:
        return [l for _, l in self.v.lines[self.begin:] if f"[{dom}]" in l and re.search(rx, l)]

    def marker_lines(self, rx: str) -> list[str]:
        return [l.strip() for _, l in self.v.lines[self.begin:] if re.search(rx, l)]

    def line_time(self, rx: str) -> float | None:
        """Host time (s since QEMU start) of the first serial line matching rx."""
        for t, l in self.v.lines[self.begin:]:
            if re.search(rx, l):
                return t
        return None


def _stats(r: Run, dom: str) -> str:
    for l in r.guest_lines(dom, r"p50_us="):
        return " ".join(t for t in l.split() if t.split("=")[0] in ("frames", "p50_us", "p99_us", "max_us", "total_ms"))
    return ""


def _xl_secs(r: Run, dom: str) -> float | None:
    for l in r.marker_lines(rf"XL-CREATE name={dom} "):
        m = re.search(r"rc=(\d+) domid=\S+ secs=([\d.]+)", l)
        if m:
            return float(m.group(2))
    return None


def _ack_host(r: Run, tag: str, end: str) -> None:
    """Tell Dom0 (dom0-init wait_host) that the host is done with the hold `tag` (its
    screendump taken). Its HOST-WAIT line may precede the guest's relayed HOLD line on the
    serial console, so it is looked for from the scenario's start."""
    rx = rf"HARNESS HOST-WAIT tag={re.escape(tag)} "
    if not r.marker_lines(rx):
        i = r.i
        r.wait(rx, 60, fail=end + r"|HOST-ACK-TIMEOUT", what=f"Dom0 waiting for the host ({tag})")
        r.i = i
    r.v.send(f"HOST-ACK {tag}\n")


def _guest_fail(dom: str, end: str, backend: str | None = None) -> str:
    """Stop waiting on a guest once it gave up, its backend cannot connect it, or the Dom0
    scenario ended."""
    rx = rf"{end}|\[{dom}\].*HARNESS-DOMU EXIT ok=0"
    return rx + (rf"|\[be-log:{backend}\].*cannot connect" if backend else "")


def _flip(r: Run, s: str, dom: str, fmt: str, res: Result, end: str) -> None:
    sw = Stopwatch()
    m = r.wait(rf"\[{dom}\].*(?:{HOLD_RX})", 400, fail=_guest_fail(dom, end, "main"), what=f"HOLD from DomU {dom}")
    res.timings["create→hold"] = sw.lap()
    xs = _xl_secs(r, dom)
    if xs is not None:
        res.timings["xl-create"] = xs
    chk = r.check_hold(dom, m, "hold", fmt)
    res.timings["check"] = sw.lap()
    res.status = "PASS" if chk.ok else "FAIL"
    res.detail = f"{chk.detail} | {_stats(r, dom)}"


def _two_domus(r: Run, res: Result, end: str) -> None:
    """Two guests, one backend each (--domid) on its own bochs head; each head must show
    exactly its guest's pattern (distinct pattern connectors), and both guests must have
    been flipping at the same time."""
    sw = Stopwatch()
    plan = r.wait(r"HARNESS TWO plan two1=dom(\d+)->(\S+) two2=dom(\d+)->(\S+) ", 60, fail=end)
    problems: list[str] = []
    m1 = r.wait(rf"\[two1\].*(?:{HOLD_RX})", 400, fail=_guest_fail("two1", end, "two1"), what="HOLD from two1")
    res.timings["create→hold1"] = sw.lap()
    c1 = r.check_hold("two1", m1, "hold", device=None)
    m2 = r.wait(rf"\[two2\].*(?:{HOLD_RX})", 400, fail=_guest_fail("two2", end, "two2"), what="HOLD from two2")
    res.timings["hold1→hold2"] = sw.lap()
    c2 = r.check_hold("two2", m2, "hold", device=VGA2_ID)
    # two1 must still be on the primary head while two2 holds (its hold outlasts two2's start).
    c1b = r.check_hold("two1", m1, "hold-again", device=None)
    for dom, want in (("two1", plan.group(1)), ("two2", plan.group(3))):
        got = [re.search(r"domid=(\S+)", l).group(1) for l in r.marker_lines(rf"XL-CREATE name={dom} ")]
        if got != [want]:
            problems.append(f"{dom} got domid {got} but its backend serves dom{want}")
    win = {}
    for dom in ("two1", "two2"):
        t0 = r.line_time(rf"\[{dom}\].*GUEST-CLIENT FLIPPING")
        t1 = r.line_time(rf"\[{dom}\].*GUEST-CLIENT .*p50_us=")
        win[dom] = (t0, t1)
    if None in win["two1"] + win["two2"]:
        problems.append(f"flip windows not seen: {win}")
        overlap = 0.0
    else:
        overlap = min(win["two1"][1], win["two2"][1]) - max(win["two1"][0], win["two2"][0])
        res.timings["flip-overlap"] = overlap
        if overlap < 2:
            problems.append(f"the guests did not flip at the same time (overlap {overlap:.1f} s)")
    ok = c1.ok and c2.ok and c1b.ok and not problems
    res.status = "PASS" if ok else "FAIL"
    res.detail = (f"two1 (dom{plan.group(1)}, {plan.group(2)}) on the primary VGA: {c1.detail}"
                  f"{'' if c1b.ok else ' | later: ' + c1b.detail}\n"
                  f"two2 (dom{plan.group(3)}, {plan.group(4)}) on {VGA2_ID}: {c2.detail}\n"
                  f"flipping overlapped {overlap:.1f} s | two1 {_stats(r, 'two1')} | two2 {_stats(r, 'two2')}"
                  + "".join(f"\nPROBLEM: {p}" for p in problems))


def _results(r: Run, dom: str) -> list[tuple[float, dict[str, str]]]:
    """The guest's `GUEST-CLIENT RESULT k=v ...` lines, in order: (host time, fields)."""
    out = []
    for t, l in r.v.lines[r.begin:]:
        if f"[{dom}]" in l and "GUEST-CLIENT RESULT " in l:
            out.append((t, dict(re.findall(r"(\w+)=(\S+)", l.split("GUEST-CLIENT RESULT ", 1)[1]))))
    return out


def _line_times(r: Run, rx: str) -> list[float]:
    return [t for t, l in r.v.lines[r.begin:] if re.search(rx, l)]


def _noisy_neighbour(r: Run, res: Result, end: str) -> None:
    """One backend, two guests on the two heads of one virtio-gpu (dom0-init
    scenario_xen-noisy-neighbour). The victim's flip p99 while the aggressor floods must
    be within 2x its solo p99 from the same boot; its pixels exact in both runs."""
    sw = Stopwatch()
    plan = r.wait(r"HARNESS NN plan card=(\S+) victim=(\S+) aggressor=(\S+) status0=(\S+) status1=(\S+) forced1=(\d)", 120,
                  fail=end, what="the noisy-neighbour plan (virtio-gpu with two heads)")
    vfail = _guest_fail("nnvictim", end, "nn")
    m1 = r.wait(rf"\[nnvictim\].*(?:{HOLD_RX})", 400, fail=vfail, what="the victim's solo HOLD")
    res.timings["create→solo-hold"] = sw.lap()
    c1 = r.check_hold("nnvictim", m1, "solo", device=NN_ID, head=0)
    r.i += 1
    m2 = r.wait(rf"\[nnvictim\].*(?:{HOLD_RX})", 900, fail=vfail, what="the victim's HOLD during the flood")
    res.timings["solo→flood-hold"] = sw.lap()
    c2 = r.check_hold("nnvictim", m2, "flood", device=NN_ID, head=0)
    r.wait(end, 900, what="the scenario's end")
    res.timings["hold→end"] = sw.lap()
    victim, aggr = _results(r, "nnvictim"), _results(r, "nnaggr")
    problems = [f"{what} pixels: {c.detail}" for what, c in (("solo", c1), ("flood", c2)) if not c.ok]
    solo = victim[0][1] if victim else {}
    flood = victim[1][1] if len(victim) > 1 else {}
    # The aggressor may have needed a second attempt (dom0-init says why): its last run counts.
    ag = aggr[-1][1] if aggr else {}
    att = [re.search(r"attempts=(\d+)", l).group(1) for l in r.marker_lines(r"HARNESS NN aggressor attempts=")]
    retried = r.marker_lines(r"HARNESS NN aggressor attempt=\d+ failed")
    for what, d in (("victim solo", solo), ("victim flood", flood), ("aggressor", ag)):
        if d.get("ok") != "1":
            problems.append(f"{what}: RESULT {'missing' if not d else 'ok=' + d.get('ok', '?')}")
    errs = r.marker_lines(r"\[nnvictim\].*GUEST-CLIENT ERROR")
    if ag.get("ok") != "1":
        errs += r.marker_lines(r"\[nnaggr\].*GUEST-CLIENT ERROR")
    problems += errs[:2]

    def num(d: dict, k: str) -> float | None:
        try:
            return float(d[k])
        except (KeyError, ValueError):
            return None

    sp99, fp99 = num(solo, "p99_ms"), num(flood, "p99_ms")
    ratio = fp99 / sp99 if sp99 and fp99 is not None else None
    if ratio is None or ratio > 2.0:
        problems.append(f"victim p99 during the flood {fp99} ms vs solo {sp99} ms: ratio {ratio} (limit 2)")
    if not ag or num(ag, "flips") in (None, 0.0):
        problems.append("the aggressor did not flip")
    # The victim's second run must lie inside the aggressor's flood (host times of the
    # aggressor's FLIPPING and RESULT lines, the victim's second FLIPPING and RESULT).
    af = _line_times(r, r"\[nnaggr\].*GUEST-CLIENT FLIPPING")
    vf = _line_times(r, r"\[nnvictim\].*GUEST-CLIENT FLIPPING")
    overlap = None
    if af and aggr and len(vf) > 1 and len(victim) > 1:
        a0, a1, v0, v1 = af[-1], aggr[-1][0], vf[1], victim[1][0]
        overlap = min(a1, v1) - max(a0, v0)
        res.timings["flood-overlap"] = overlap
        if v0 < a0 or v1 > a1:
            problems.append(f"the victim's flood run ({v0:.1f}-{v1:.1f} s) is not inside the aggressor's flood "
                            f"({a0:.1f}-{a1:.1f} s)")
    else:
        problems.append("flip windows not seen (aggressor FLIPPING/RESULT, victim's second FLIPPING/RESULT)")
    res.status = "PASS" if not problems else "FAIL"
    fmt = lambda v: "?" if v is None else f"{v:.3f}"  # noqa: E731
    res.detail = (f"{res.status} solo_p99_ms={fmt(sp99)} flood_p99_ms={fmt(fp99)} ratio={fmt(ratio)} limit=2 "
                  f"solo_p50_ms={solo.get('p50_ms', '?')} flood_p50_ms={flood.get('p50_ms', '?')} "
                  f"solo_max_ms={solo.get('max_ms', '?')} flood_max_ms={flood.get('max_ms', '?')} "
                  f"victim_flips={solo.get('flips', '?')},{flood.get('flips', '?')} "
                  f"aggressor_flips={ag.get('flips', '?')} aggressor_rate_hz={ag.get('rate_hz', '?')} "
                  f"aggressor_p50_ms={ag.get('p50_ms', '?')} aggressor_secs={ag.get('secs', '?')} "
                  f"overlap_s={fmt(overlap)} aggressor_attempts={att[-1] if att else '?'}\n"
                  f"one backend on {plan.group(1)}: victim {plan.group(2)} ({plan.group(4)}), "
                  f"aggressor {plan.group(3)} ({plan.group(5)}{', forced on' if plan.group(6) == '1' else ''}) "
                  f"| solo: {c1.detail} | flood: {c2.detail}"
                  + "".join(f"\nretried: {l}" for l in retried)
                  + "".join(f"\nPROBLEM: {p}" for p in problems))


def _destroy_loop(r: Run, res: Result, end: str) -> None:
    """20 guests in a row destroyed mid-flip (dom0-init scenario_xen-destroy-loop): the
    backend alive before and after, no gntdev/gntalloc mapping left, RSS growth < 1 MiB,
    then a final guest draws exact pixels."""
    sw = Stopwatch()
    iters = []
    while True:
        m = r.wait(r"HARNESS DLOOP i=(\d+) (.*?) uptime=|HARNESS MAPS name=main at=after", 400, fail=end,
                   what="the next destroy-loop iteration")
        if m.group(0).startswith("HARNESS MAPS"):
            break
        iters.append((int(m.group(1)), dict(re.findall(r"(\w+)=(\S+)", m.group(2)))))
        r.i += 1
    res.timings["loop"] = sw.lap()
    _flip(r, "xen-destroy-loop", "dlfinal", "xrgb8888", res, end)
    final_ok, final = res.status == "PASS", res.detail
    maps = _maps(r, "main")
    before, after = maps.get("before", {}), maps.get("after", {})
    problems = [] if final_ok else [f"final guest: {final}"]
    counted = [d for i, d in iters if i >= 1]
    bad = [f"i={i} {d}" for i, d in iters if d.get("flipping") != "1" or d.get("destroy_rc") != "0"
           or d.get("alive") != "1"]
    if len(counted) != 20:
        problems.append(f"{len(counted)} destroyed guests counted (want 20)")
    problems += [f"iteration {b}" for b in bad[:3]]
    for at, d in (("before", before), ("after", after)):
        if d.get("alive") != 1 or "rss_kib" not in d or "gntdev" not in d or "gntalloc" not in d:
            problems.append(f"snapshot {at}: backend not proven alive or values missing ({d or 'no MAPS line'})")
    waits = _unmap_waits(r, "main")
    for at in ("before", "after"):
        if waits.get(at, {}).get("ok") != "1":
            problems.append(f"mappings not released at '{at}' within 20 s: {waits.get(at) or 'no UNMAP-WAIT line'}")
    flipping = maps.get("flipping", {})
    if not flipping.get("gntdev"):
        problems.append(f"no gntdev mappings counted while a guest flipped ({flipping or 'no MAPS line'}): "
                        "the count at the end proves nothing")
    rb, ra = before.get("rss_kib"), after.get("rss_kib")
    mapped = after["gntdev"] + after["gntalloc"] if "gntdev" in after and "gntalloc" in after else None
    growth = ra - rb if ra is not None and rb is not None else None
    if mapped != 0:
        problems.append(f"gntdev+gntalloc mappings left after the loop: {mapped}")
    if growth is None or growth >= 1024:
        problems.append(f"RSS growth {growth} KiB (limit < 1024)")
    dsecs = [float(d["destroy_secs"]) for d in counted if "destroy_secs" in d]
    res.status = "PASS" if not problems else "FAIL"
    res.detail = (f"{res.status} rss_before_kib={rb} rss_after_kib={ra} rss_growth_kib={growth} "
                  f"mappings_after={mapped} gntdev_flipping={flipping.get('gntdev')} destroyed={len(counted)} "
                  f"destroy_secs_max={max(dsecs) if dsecs else '?'} rss_fresh_kib={maps.get('fresh', {}).get('rss_kib')}\n"
                  f"final guest: {final}" + "".join(f"\nPROBLEM: {p}" for p in problems))


def _refused(r: Run, res: Result, end: str) -> None:
    """The backend refuses the guest's SET_CONFIG (dom0-init scenario_xen-refused): the
    guest client must exit 1 with an ERROR line naming the driver's error and a RESULT
    ok=0 line, although every ioctl succeeded."""
    plan = r.wait(r"HARNESS REFUSED plan card=(\S+) conn=(\S+) status=(\S+)", 120, fail=end)
    m = r.wait(r"\[refused\].*HARNESS-DOMU EXIT ok=(\d)", 300, fail=end, what="the guest's exit")
    r.wait(end, 120, what="the scenario's end")
    err = r.guest_lines("refused", r"GUEST-CLIENT ERROR")
    runs = [re.search(r"rc=(\d+)", l).group(1) for l in r.guest_lines("refused", r"HARNESS-DOMU RUN n=")]
    results = _results(r, "refused")
    refusal = refusals(_be_log(r, "refused"))
    problems = []
    if not err:
        problems.append("no GUEST-CLIENT ERROR line")
    if runs != ["1"] or m.group(1) != "0":
        problems.append(f"client exit statuses {runs}, guest EXIT ok={m.group(1)} (want [1], ok=0)")
    if not results or results[0][1].get("ok") != "0" or results[0][1].get("driver_error") != "1":
        problems.append(f"RESULT lines {[d for _, d in results]} (want one with ok=0 driver_error=1: "
                        "the display driver logged the refusal)")
    if not refusal:
        problems.append("the backend did not log a refused request")
    res.status = "PASS" if not problems else "FAIL"
    res.detail = (f"{res.status} client_rc={','.join(runs) or '?'} backend connector {plan.group(2)} ({plan.group(3)}) | "
                  f"{err[0].split('GUEST-CLIENT ', 1)[1].strip() if err else 'no ERROR line'}"
                  + "".join(f"\nPROBLEM: {p}" for p in problems))


def _maps(r: Run, name: str) -> dict[str, dict[str, int]]:
    """MAPS lines of backend `name`: step -> {gntdev, gntalloc, dmabuf_maps, dmabuf_fds}."""
    out: dict[str, dict[str, int]] = {}
    for l in r.marker_lines(rf"HARNESS MAPS name={name} at="):
        m = re.search(r"at=(\w+) (.*?) uptime=", l)
        if m:
            out[m.group(1)] = {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", m.group(2))}
    return out


def _unmap_waits(r: Run, name: str) -> dict[str, dict[str, str]]:
    """dom0-init wait_unmapped's `UNMAP-WAIT name= at= ok= secs=` lines: at -> fields."""
    out = {}
    for l in r.marker_lines(rf"HARNESS UNMAP-WAIT name={name} at="):
        d = dict(re.findall(r"(\w+)=(\S+)", l.split("UNMAP-WAIT ", 1)[1]))
        out[d.get("at", "?")] = d
    return out


def _be_log(r: Run, name: str) -> list[str]:
    return [l.split("] ", 1)[1] if "] " in l else l for l in r.marker_lines(rf"^\[be-log:{name}\] ")]


DBUF_DESTROY = 0x11


def _kv(line: str) -> dict[str, str]:
    """The key=value words of a log line (tracing's fields). A value ends at a blank or a
    "(": on the serial console Xen's own "(XEN) ..." lines can land mid-line, right after
    a value ("status=0(XEN) can't find ...")."""
    return dict(re.findall(r"(?<![\w.])(\w+)=([^\s(]+)", line))


def _be_facts(log: list[str]) -> dict:
    """What the checks take from a backend's log, from its fields only (not its prose):
    the zero-copy decision at startup (`zc_guest=`/`zc_bealloc=`: `available` or a
    FallbackReason code, src/zcopy/policy.rs), the fallbacks logged as global
    (`zc_global=true zc_reason=`; which one depends on the buffers the guest used, so the
    checks count them), the KMS frame counters at exit (`copied= zero_copy=`)
    and the DBUF_DESTROY replies' statuses (`op= status=`)."""
    startup = next((_kv(l) for l in log if "zc_guest=" in l and "zc_bealloc=" in l), {})
    fallbacks = [d for d in map(_kv, log) if d.get("zc_global") == "true" and "zc_reason" in d]
    counters = next((d for d in map(_kv, log) if "copied" in d and "zero_copy" in d), {})

    def num(d: dict, k: str) -> int | None:
        try:
            return int(d[k])
        except (KeyError, ValueError):
            return None

    destroys = [num(d, "status") for d in map(_kv, log)
                if num(d, "op") == DBUF_DESTROY and num(d, "status") is not None]
    return {"zc_guest": startup.get("zc_guest"), "zc_bealloc": startup.get("zc_bealloc"),
            "fallbacks": [f"{d.get('zc_fallback')}:{d['zc_reason']}" for d in fallbacks],
            "copied": num(counters, "copied"), "zero_copy": num(counters, "zero_copy"),
            "destroys": destroys}


def _zero_copy(r: Run, s: str, res: Result, end: str) -> None:
    """Backend-allocation / zero-copy scenarios (dom0-init zc_run): pixels, the backend's
    mappings at each step, its zero-copy decision and KMS frame counters, and the
    DBUF_DESTROY replies, all from the backend's own log."""
    name = {"xen-bealloc": "bealloc", "xen-zcopy-auto-fallback": "zfallback", "xen-zcopy-bealloc": "zbealloc",
            "xen-zcopy-destroy": "zdestroy", "xen-zcopy-pv-fallback": "zpvfallback"}[s]
    sw = Stopwatch()
    m = r.wait(rf"\[{name}\].*(?:{HOLD_RX})", 400, fail=_guest_fail(name, end, name), what=f"HOLD from DomU {name}")
    res.timings["create→hold"] = sw.lap()
    if s == "xen-zcopy-destroy":  # the second client run, after the first one's buffers were destroyed
        r.i += 1
        m = r.wait(rf"\[{name}\].*(?:{HOLD_RX})", 200, fail=_guest_fail(name, end, name),
                   what=f"second HOLD from DomU {name}")
        res.timings["hold→hold2"] = sw.lap()
    chk = r.check_hold(name, m, "hold")
    # The backend's log is relayed when it stops, before the scenario's END marker.
    r.wait(end, 300, what="the scenario's end (backend stopped, log relayed)")
    res.timings["hold→end"] = sw.lap()
    maps = _maps(r, name)
    log = _be_log(r, name)
    problems: list[str] = [] if chk.ok else [f"pixels: {chk.detail}"]

    def need(cond: bool, why: str) -> None:
        if not cond:
            problems.append(why)

    facts = _be_facts(log)
    startup = f"zc_guest={facts['zc_guest']} zc_bealloc={facts['zc_bealloc']}"
    fallbacks = facts["fallbacks"]
    copied, zc, destroys = facts["copied"], facts["zero_copy"], facts["destroys"]
    refused = refusals(log)
    for step in ("card", "hold", "exited", "gone"):
        need(maps.get(step, {}).get("alive") == 1,
             f"no backend mappings reported at step '{step}', or the backend not alive: {maps.get(step)}")
    gw = _unmap_waits(r, name).get("gone", {})
    need(gw.get("ok") == "1", f"mappings not released within 20 s of the guest's end: {gw or 'no UNMAP-WAIT line'}")
    # The guest paused at CARD-READY and CLIENT-EXITED until Dom0 had taken those
    # snapshots (gate=ok), so they show the guest connected and idle, not shutting down.
    gates = [re.search(r"gate=(\w+)", l).group(1)
             for l in r.marker_lines(rf"^\[{name}\] HARNESS-DOMU LINGER-DONE gate=")]
    need(gates == ["ok", "ok"], f"guest pauses for the snapshots: {gates} (want ['ok', 'ok'])")
    card, hold, exited = maps.get("card", {}), maps.get("hold", {}), maps.get("exited", {})
    need(copied is not None, "no KMS frame counters (copied= zero_copy=) in the backend's log (did it exit cleanly?)")
    need(not refused, f"requests refused: {refused[:2]}")
    bealloc = s in ("xen-bealloc", "xen-zcopy-bealloc", "xen-zcopy-destroy")
    # In a PV Dom0 every buffer takes the copy path, for a reason the log states once:
    # guest buffers can't be exported there (EXP_FROM_REFS is EINVAL), and be-alloc
    # imports are not used there (IMP_TO_REFS may grant swiotlb bounce slots: measured,
    # whole pages of the picture stayed black), so be-alloc uses gntalloc pages.
    # (field, FallbackReason code): no_dmabuf "gntdev has no dma-buf support", pv_domain
    # "gntdev cannot export dma-bufs in a PV backend domain", pv_import "gntdev can grant
    # swiotlb bounce pages instead of the buffer's own in a PV backend domain".
    key, code = {"xen-bealloc": ("zc_bealloc", "no_dmabuf"), "xen-zcopy-auto-fallback": ("zc_guest", "no_dmabuf"),
                 "xen-zcopy-pv-fallback": ("zc_guest", "pv_domain"), "xen-zcopy-bealloc": ("zc_bealloc", "pv_import"),
                 "xen-zcopy-destroy": ("zc_bealloc", "pv_import")}[s]
    need(facts[key] == code, f"startup: want {key}={code}, got {startup}")
    need(len(fallbacks) == 1, f"{len(fallbacks)} global fallbacks logged (want 1): {fallbacks}")
    need(copied is not None and copied > 0 and zc == 0, f"counters copied={copied} zero_copy={zc}")
    if bealloc:
        need(hold.get("gntalloc", 0) > 0, f"no gntalloc mappings while the guest holds ({hold})")
        want_destroys = 4 if s == "xen-zcopy-destroy" else 2
        need(len(destroys) >= want_destroys and all(st == 0 for st in destroys),
             f"DBUF_DESTROY replies {destroys} (want >= {want_destroys}, all 0)")
        # Destroyed be-alloc buffers' gntalloc pages stay with the backend, charged to the
        # guest, until its domain is gone: Linux's gntalloc cannot tell whether the guest
        # still maps them (README "Guest isolation"). Never more than while holding (a
        # second client run reuses them), none once the guest is gone.
        gone = maps.get("gone", {})
        need(0 <= exited.get("gntalloc", -1) <= hold.get("gntalloc", 0)
             and exited.get("dmabuf_fds", -1) == 0
             and exited.get("dmabuf_maps", -1) == 0 and exited.get("gntdev", -1) == card.get("gntdev", -2),
             f"buffers left after the client exited: {exited} (with only the rings mapped: {card}, holding: {hold})")
        need(gone.get("gntalloc", -1) == 0 and gone.get("gntdev", -1) == 0
             and gone.get("dmabuf_fds", -1) == 0,
             f"mappings left after the guest was gone: {gone}")
    else:
        need(hold.get("gntdev", 0) > card.get("gntdev", 0),
             f"guest buffers not mapped through gntdev at hold ({card} -> {hold})")
    res.status = "PASS" if not problems else "FAIL"
    counts = f"copied={copied} zero_copy={zc}"
    res.detail = (f"{chk.detail} | {_stats(r, name)}\nbackend: {startup}; KMS frames {counts}; "
                  f"DBUF_DESTROY replies {destroys}\nmappings " +
                  " ".join(f"{k}:{','.join(f'{a}={b}' for a, b in v.items())}" for k, v in maps.items())
                  + "".join(f"\nPROBLEM: {p}" for p in problems))


def _drvdom(r: Run, res: Result, end: str, bealloc: bool) -> None:
    """A guest served by a PVH driver domain (dom0-init drvdom_run): the driver domain's
    own readback of its VKMS scan-out, displback's zero-copy decision, frame counters,
    DBUF_DESTROY replies and mappings, all from the driver domain's console. be-alloc
    buffers must be scanned out without a copy; guest buffers take the copy path (x86)."""
    sw = Stopwatch()
    # 81-131 s to its init under TCG at host load 15-22, either kernel (dom0-init waits 300 s).
    booted = r.wait(r"\[drvdom\].*HARNESS-DRVDOM BOOTED .*guest_type=(\S*)", 330,
                    fail=_guest_fail("drvdom", end), what="the driver domain's init")
    r.wait(r"\[drvdom\].*HARNESS-DRVDOM WATCHING", 120, fail=_guest_fail("drvdom", end) + "|BACKEND-FAILED",
           what="displback watching in the driver domain")
    res.timings["drvdom-ready"] = sw.lap()
    r.wait(rf"\[ddguest\].*(?:{HOLD_RX})", 400, fail=_guest_fail("ddguest", end), what="HOLD from the guest")
    res.timings["guest→hold"] = sw.lap()
    chk = r.wait(r"\[drvdom\].*SCANOUT-CHECK ok=(\d) (.*)", 300, fail=end, what="the scan-out check")
    res.timings["hold→check"] = sw.lap()
    r.wait(end, 300, what="the scenario's end")
    log = [l.split("BE-LOG ", 1)[1] for l in r.marker_lines(r"^\[drvdom\] BE-LOG ")]
    maps = {}
    for l in r.marker_lines(r"\[drvdom\] HARNESS-DRVDOM MAPS at="):
        m = re.search(r"at=(\w+) (.*?) uptime=", l)
        if m:
            maps[m.group(1)] = {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", m.group(2))}
    facts = _be_facts(log)
    startup = f"zc_guest={facts['zc_guest']} zc_bealloc={facts['zc_bealloc']}"
    copied, zc, destroys = facts["copied"], facts["zero_copy"], facts["destroys"]
    hold, gone = maps.get("hold", {}), maps.get("gone", {})
    problems = []
    for ok, why in (
        (booted.group(1) == "PVH", f"driver domain guest_type={booted.group(1)}"),
        (chk.group(1) == "1", f"scan-out: {chk.group(2)}"),
        # x86_device_map: "on x86 gntdev exports need a device mapping, which Xen refuses".
        (facts["zc_bealloc"] == "available" and facts["zc_guest"] == "x86_device_map",
         f"startup: {startup} (want zc_guest=x86_device_map zc_bealloc=available)"),
        (len(destroys) >= 2 and all(st == 0 for st in destroys), f"DBUF_DESTROY replies {destroys} (want >= 2, all 0)"),
        (hold.get("gntalloc", -1) == 0, f"gntalloc used at hold: {hold}"),
        (zc is not None and zc > 0 and copied == 0 if bealloc else copied is not None and copied > 0 and zc == 0,
         f"counters copied={copied} zero_copy={zc}"),
        (hold.get("dmabuf_fds", 0) > 0 if bealloc else hold.get("gntdev", 0) > 2 and hold.get("dmabuf_fds", -1) == 0,
         f"at hold: {hold} (want {'dma-bufs' if bealloc else 'the guest buffers mapped through gntdev'})"),
        (gone and all(v == 0 for v in gone.values()), f"after the guest left: {gone} (want all 0)"),
    ):
        if not ok:
            problems.append(why)
    res.status = "PASS" if not problems else "FAIL"
    res.detail = (f"driver domain ({booted.group(1)}) scan-out readback: {chk.group(2)} | {_stats(r, 'ddguest')}\n"
                  f"backend: {startup}; KMS frames copied={copied} zero_copy={zc}; DBUF_DESTROY replies {destroys}\n"
                  f"mappings hold:{hold} gone:{gone}" + "".join(f"\nPROBLEM: {p}" for p in problems))


def _prog_result(r: Run, dom: str, end: str) -> tuple[list[str], dict[str, str]]:
    """Wait for the DomU program's end (`HARNESS-DOMU PROG name= rc= kmsg_errors=`): the
    problems it shows and its fields."""
    m = r.wait(rf"\[{dom}\].*HARNESS-DOMU PROG (.*)", 200, fail=end, what=f"{dom}'s program result")
    d = dict(re.findall(r"(\w+)=(\S+)", m.group(1)))
    problems = []
    if d.get("rc") != "0":
        problems.append(f"the guest program exited rc={d.get('rc')}")
    if d.get("kmsg_errors") != "0":
        problems.append(f"the guest kernel logged {d.get('kmsg_errors')} DRM *ERROR* lines: "
                        + "; ".join(r.guest_lines(dom, r"\*ERROR\*")[:2]))
    return problems, d


def _weston_guest(r: Run, res: Result, end: str) -> None:
    """Weston (DRM backend on xen-drm-front, pixman) in a DomU with weston-image showing a
    known picture: found exactly on Dom0's screen, Weston's background around it."""
    sw = Stopwatch()
    fail = _guest_fail("weston", end, "main")
    m = r.wait(r"\[weston\].*WESTON READY (.*)", 300, fail=fail + r"|\[weston\].*WESTON ERROR",
               what="Weston ready in the DomU")
    res.timings["create→weston-ready"] = sw.lap()
    wsecs = re.search(r"secs=(\S+)", m.group(1))
    m = r.wait(r"\[weston\].*HARNESS-DOMU SHOWING client=(\S+) .*hold=(\d+)", 120, fail=fail)
    ok, detail = weston.poll_window(r.v, os.path.join(r.workdir, "xen-weston-guest.ppm"), int(m.group(2)) - 8,
                                    r.display)
    res.timings["window"] = sw.lap()
    problems, d = _prog_result(r, "weston", end)
    if not ok:
        problems.insert(0, f"screen: {detail}")
    res.status = "PASS" if not problems else "FAIL"
    res.detail = (f"{res.status} weston_start_secs={wsecs.group(1) if wsecs else '?'} client={m.group(1)} "
                  f"prog_rc={d.get('rc')} kmsg_errors={d.get('kmsg_errors')}\n{detail}"
                  + "".join(f"\nPROBLEM: {p}" for p in problems))


def _xen_wayland(r: Run, res: Result, end: str) -> None:
    """Dom0's Weston on its bochs head, `displback serve --output wayland` as its client, a
    guest flipping with guest_client: the guest's HOLD frame found exactly on the screen
    (Weston places the window), flip latency next to the KMS path's (xen-flip) if it ran."""
    sw = Stopwatch()
    r.wait(r"HARNESS WAYLAND weston up rc=0 ", 120, fail=end + r"|HARNESS WAYLAND weston up rc=[1-9]", what="Weston in Dom0")
    res.timings["weston"] = sw.lap()
    m = r.wait(rf"\[wl\].*(?:{HOLD_RX})", 400, fail=_guest_fail("wl", end, "wl"), what="HOLD from DomU wl")
    res.timings["create→hold"] = sw.lap()
    frame, conn, w, h = hold_info(m)
    rows = [pattern.row_rgb(frame, conn, y, w) for y in range(h)]
    ok, detail = weston.poll_window(r.v, os.path.join(r.workdir, "xen-wayland.ppm"), 10, r.display, rows=rows)
    res.timings["check"] = sw.lap()
    r.wait(end, 300, what="the scenario's end")
    wl = (_results(r, "wl") or [(0, {})])[-1][1]
    r_begin, r.begin = r.begin, 0
    kms = (_results(r, "flip") or [(0, {})])[-1][1]
    r.begin = r_begin
    problems = [] if ok else [f"screen: {detail}"]
    if wl.get("ok") != "1":
        problems.append(f"guest RESULT ok={wl.get('ok', 'missing')}")
    res.status = "PASS" if not problems else "FAIL"
    res.detail = (f"{res.status} wayland_p50_ms={wl.get('p50_ms', '?')} wayland_p99_ms={wl.get('p99_ms', '?')} "
                  f"flips={wl.get('flips', '?')} kms_p50_ms={kms.get('p50_ms', 'not run')} "
                  f"kms_p99_ms={kms.get('p99_ms', 'not run')}\n{detail}" + "".join(f"\nPROBLEM: {p}" for p in problems))


PLAIN = 0x777777  # modetest's "plain" fill: every byte 0x77


def _modetest_guest(r: Run, res: Result, end: str) -> None:
    """libdrm's modetest in a DomU: SMPTE bars after the modeset, then -v flips between
    the SMPTE buffer and a plain one. Every screendump (after the first exact SMPTE) must
    be exactly one of the two; both must be seen; modetest must report flip rates."""
    sw = Stopwatch()
    fail = _guest_fail("modetest", end, "main")
    m = r.wait(r"\[modetest\].*HARNESS-DOMU SHOWING client=modetest conn=(\S+) hold=(\d+)", 300, fail=fail,
               what="modetest's modeset in the DomU")
    res.timings["create→modeset"] = sw.lap()
    smpte = pixels.smpte_rows(1024, 768)
    plain = [bytes([PLAIN >> 16, (PLAIN >> 8) & 0xFF, PLAIN & 0xFF]) * 1024] * 768
    deadline = time.monotonic() + int(m.group(2)) - 8
    seen = {"smpte": 0, "plain": 0, "other": 0}
    last_other = ""
    ppm = os.path.join(r.workdir, "xen-modetest-guest.ppm")
    while time.monotonic() < deadline and not (seen["smpte"] >= 2 and seen["plain"] >= 2 and
                                                seen["smpte"] + seen["plain"] >= 8):
        r.v.screendump(ppm, r.display)
        img = pixels.read_ppm(ppm)
        c1 = pixels.check_rows(img, smpte, "SMPTE")
        c2 = pixels.check_rows(img, plain, "plain #777777") if not c1.ok else c1
        if c1.ok:
            seen["smpte"] += 1
            if seen["smpte"] == 1:
                os.replace(ppm, ppm.replace(".ppm", "-smpte.ppm"))  # kept for a post-mortem
        elif c2.ok:
            seen["plain"] += 1
        elif seen["smpte"]:  # before the first SMPTE screen: the modeset may not be shown yet
            seen["other"] += 1
            last_other = c1.detail
            os.replace(ppm, ppm.replace(".ppm", f"-other{seen['other']}.ppm"))
        time.sleep(0.7)
    res.timings["screens"] = sw.lap()
    mt = r.wait(r"\[modetest\].*HARNESS-DOMU MODETEST rc=(\d+) freq_lines=(\d+) freqs=(\S*)", 120, fail=end,
                what="modetest's flip report")
    problems, d = _prog_result(r, "modetest", end)
    freqs = [float(f) for f in mt.group(3).split(",") if f]
    # modetest's own output (relayed as "[modetest] [modetest] ..."). Its legacy gamma call
    # gets ENOSYS: xen-drm-front has no gamma LUT (the guest driver, not the backend).
    fails = [l for l in r.guest_lines("modetest", r"\[modetest\] \[modetest\] .*(failed|error|Error)")
             if "failed to set gamma: Function not implemented" not in l]
    if seen["smpte"] == 0 or seen["plain"] == 0:
        problems.append(f"not both flip buffers seen on screen: {seen}")
    if seen["other"]:
        problems.append(f"{seen['other']} screendumps were neither buffer: {last_other}")
    if not freqs or min(freqs) <= 0:
        problems.append(f"modetest reported no page-flip rate (freq lines: {mt.group(3) or 'none'})")
    if fails:
        problems.append(f"modetest printed errors: {fails[:2]}")
    res.status = "PASS" if not problems else "FAIL"
    res.detail = (f"{res.status} screens_smpte={seen['smpte']} screens_plain={seen['plain']} screens_other={seen['other']} "
                  f"flip_hz={','.join(f'{f:.1f}' for f in freqs) or 'none'} modetest_rc={mt.group(1)} "
                  f"kmsg_errors={d.get('kmsg_errors')} conn={m.group(1)}"
                  + "".join(f"\nPROBLEM: {p}" for p in problems))


def _launch(r: Run, res: Result, end: str) -> None:
    """`displback launch` (dom0-init scenario_xen-launch): the guest `launchg` is launched,
    shown (pixels), destroyed, launched again under the same name (a new domid) and shown
    again; the first launch spawned the per-guest instance, the second reused it (same
    pid), which served both domids; its status node read `ready` at each launch and
    `dead` after SIGTERM; the guest's `name` node is Dom0's (`n0`), read-only for it."""
    sw = Stopwatch()
    problems: list[str] = []
    checks = []
    launches = []
    for i in (1, 2):
        m = r.wait(rf"HARNESS LAUNCH i={i} rc=0 domid=(\d+) pid=(\S+) instance=(\S+) status=(\S+) name_perms=(\S*)",
                   120, fail=rf"{end}|\[launch\] ", what=f"launch #{i}")
        launches.append(m.groups())
        res.timings[f"launch{i}"] = sw.lap()
        h = r.wait(rf"\[launchg\].*(?:{HOLD_RX})", 400, fail=_guest_fail("launchg", end), what=f"HOLD of launch #{i}")
        res.timings[f"launch{i}→hold"] = sw.lap()
        checks.append(r.check_hold("launchg", h, f"launch{i}"))
        _ack_host(r, f"launch-hold{i}", end)  # Dom0 destroys the guest once told
        d = r.wait(rf"HARNESS LAUNCH-DESTROY i={i} rc=(\d+) pid_alive=(\d)", 120, fail=end)
        if d.groups() != ("0", "1"):
            problems.append(f"after destroy #{i}: xl destroy rc={d.group(1)} instance alive={d.group(2)}")
    st = r.wait(r"HARNESS LAUNCH-STOPPED status=(\S+) alive=(\d)", 60, fail=end)
    (d1, p1, how1, st1, perm1), (d2, p2, how2, st2, perm2) = launches
    if (how1, how2) != ("spawned", "reused"):
        problems.append(f"launches: {how1}, {how2} (want spawned, then reused)")
    if p1 == "none" or p1 != p2:
        problems.append(f"instance pid {p1} then {p2} (want one instance following the name)")
    if d1 == d2:
        problems.append(f"both guests got domid {d1}")
    if (st1, st2) != ("ready", "ready"):
        problems.append(f"status node at the launches: {st1}, {st2}")
    for perm in (perm1, perm2):
        if not perm.startswith("(n0,"):
            problems.append(f"guest name node perms {perm!r}: not owned by Dom0")
    if st.groups() != ("dead", "0"):
        problems.append(f"after SIGTERM: status node {st.group(1)}, alive={st.group(2)}")
    ok = all(c.ok for c in checks) and not problems
    res.status = "PASS" if ok else "FAIL"
    res.detail = (f"dom{d1} ({how1}, pid {p1}): {checks[0].detail}\n"
                  f"dom{d2} ({how2}, pid {p2}): {checks[1].detail}\n"
                  f"name node perms {perm1} {perm2}; status node ready at both launches, {st.group(1)} after SIGTERM"
                  + "".join(f"\nPROBLEM: {p}" for p in problems))


# xen-input: what input_replay (src/bin/input_replay.rs) sends, and what the guest must see.
INPUT_KEYS = [(42, 1), (30, 1), (30, 0), (42, 0), (29, 1), (46, 1), (46, 0), (29, 0), (88, 1), (88, 0)]
# Touchscreen frames: slot -> (x, y) in the uinput device's 0..4095, or None when lifted.
INPUT_FRAMES = [{0: (0, 0), 1: (4095, 4095)}, {0: (2048, 1024), 1: (1024, 2048)}, {0: None, 1: None},
                {3: (0, 4095)}, {3: (4095, 0)}, {3: None}]
INPUT_TOUCH_MAX, INPUT_MT_W, INPUT_MT_H = 4095, 1920, 1080


def _input_expected() -> tuple[list[str], list[str]]:
    """The guest's INPUT-KEY and INPUT-MT-FRAME lines for the replayed script: device
    values normalized to 0..65535, then scaled to the guest's declared size (integer
    division at each step, as the kbdif spec leaves rounding to the backend)."""
    def scale(v: int, size: int) -> int:
        return (v * 65535 // INPUT_TOUCH_MAX) * size // 65535
    keys = [f"INPUT-KEY dev=kbd code={c} value={v}" for c, v in INPUT_KEYS]
    frames, down = [], {}
    for f in INPUT_FRAMES:
        for slot, pos in f.items():
            if pos is None:
                down.pop(slot, None)
            else:
                down[slot] = (scale(pos[0], INPUT_MT_W), scale(pos[1], INPUT_MT_H))
        frames.append("INPUT-MT-FRAME contacts=" + ";".join(f"{s}:{x},{y}" for s, (x, y) in sorted(down.items())))
    return keys, frames


def _input(r: Run, res: Result, end: str) -> None:
    """xen-input: the exact keys (modifiers included) and multi-touch frames (slots and
    scaled coordinates, corners included) the DomU's xen-kbdfront delivered."""
    sw = Stopwatch()
    r.wait(r"\[input\].*INPUT-READY", 200, fail=end)
    res.timings["create→ready"] = sw.lap()
    r.wait(r"\[input\].*INPUT-DONE", 200, fail=end)
    res.timings["replay"] = sw.lap()
    # The display of the same guest flipped meanwhile: its held frame is checked, and
    # the replay ran between its first flip and its hold.
    m = r.wait(rf"\[input\].*(?:{HOLD_RX})", 200, fail=_guest_fail("input", end, "input"), what="HOLD from DomU input")
    chk = r.check_hold("input", m, "hold")
    res.timings["create→hold"] = sw.lap()
    r.wait(r"\[input\].*HARNESS-DOMU EXIT", 120, fail=end)
    gc_ok = any(d.get("ok") == "1" for _, d in _results(r, "input"))
    t_flip, t_go = r.line_time(r"\[input\].*GUEST-CLIENT FLIPPING"), r.line_time(r"\[replay\] REPLAY GO")
    t_done, t_hold = r.line_time(r"\[replay\] REPLAY DONE"), r.line_time(rf"\[input\].*(?:{HOLD_RX})")
    overlap = None not in (t_flip, t_go, t_done, t_hold) and t_flip <= t_go and t_done <= t_hold
    got = [re.sub(r"^.*?(INPUT-(KEY|MT-FRAME))", r"\1", l).strip()
           for l in r.guest_lines("input", r"INPUT-(KEY|MT-FRAME)")]
    want_keys, want_frames = _input_expected()
    keys = [l for l in got if l.startswith("INPUT-KEY")]
    frames = [l for l in got if l.startswith("INPUT-MT-FRAME")]
    keys_ok, frames_ok = keys == want_keys, frames == want_frames
    res.status = "PASS" if keys_ok and frames_ok and chk.ok and gc_ok and overlap else "FAIL"
    res.detail = (f"input_keys={len(keys)} keys_ok={int(keys_ok)} mt_frames={len(frames)} frames_ok={int(frames_ok)} "
                  f"display_ok={int(chk.ok)} client_ok={int(gc_ok)} input_while_flipping={int(bool(overlap))} | {chk.detail}"
                  + ("" if keys_ok else f"\n  keys got {keys}\n  want {want_keys}")
                  + ("" if frames_ok else f"\n  frames got {frames}\n  want {want_frames}"))


def _check_boot(r: Run, s: str, res: Result, end: str) -> None:
    """xen-boot: the DomU booted and exited."""
    sw = Stopwatch()
    r.wait(r"\[boot\].*HARNESS-DOMU BOOTED", 120, fail=end)
    res.timings["create→domu-init"] = sw.lap()
    r.wait(r"\[boot\].*HARNESS-DOMU EXIT", 60, fail=end)
    xs = _xl_secs(r, "boot")
    if xs is not None:
        res.timings["xl-create"] = xs
    res.status, res.detail = "PASS", "DomU without vdispl: xl create, boot, console relay, power-off"


def _check_pvh_boots(r: Run, s: str, res: Result, end: str) -> None:
    """xen-pvh-boots: every PVH DomU booted and powered off."""
    m = r.wait(rf"HARNESS SCENARIO {s} END rc=(\d+)", 1200)
    boots = r.marker_lines(r"HARNESS PVH-BOOT i=")
    bad = [l for l in boots if _kv(l).get("ok") != "1"]
    res.status = "PASS" if boots and not bad and m.group(1) == "0" else "FAIL"
    res.detail = f"{len(boots) - len(bad)} of {len(boots)} PVH DomUs booted and powered off"


def _check_destroy(r: Run, s: str, res: Result, end: str) -> None:
    """xen-destroy: destroyed mid-flip, mappings gone, backend alive; a second DomU draws."""
    m = r.wait(r"HARNESS GNTDEV (before=.*)", 400, fail=end)
    g = dict(re.findall(r"(\w+)=(\S+)", m.group(1)))
    need = ("before", "after", "destroy_rc", "destroy_secs", "backend_alive", "flipping",
            "ended_before_destroy", "unmap_wait_secs")
    missing = [k for k in need if k not in g]
    if not missing:
        res.timings["xl-destroy"] = float(g["destroy_secs"])
        res.timings["unmap-wait"] = float(g["unmap_wait_secs"])
    _flip(r, s, "destroy2", "xrgb8888", res, end)
    # Destroyed mid-flip (the guest said it flips and had not ended), mappings there
    # before and all gone after, the backend alive.
    ok = not missing and (int(g["before"]) > 0 and g["after"] == "0" and g["destroy_rc"] == "0"
                          and g["backend_alive"] == "1" and int(g["flipping"]) > 0
                          and g["ended_before_destroy"] == "0")
    res.detail = (f"gntdev_before={g.get('before')} gntdev_after={g.get('after')} destroy_rc={g.get('destroy_rc')} "
                  f"backend_alive={g.get('backend_alive')} flipping={g.get('flipping')} "
                  f"ended_before_destroy={g.get('ended_before_destroy')}"
                  + (f" MISSING {missing}" if missing else "") + f"; second DomU: {res.detail}")
    if not ok:
        res.status = "FAIL"


def _check_restart(r: Run, s: str, res: Result, end: str) -> None:
    """xen-restart: exact pixels before the kill and after the restart."""
    sw = Stopwatch()
    m = r.wait(rf"\[restart\].*(?:{HOLD_RX})", 400, fail=end)
    res.timings["create→hold1"] = sw.lap()
    c1 = r.check_hold("restart", m, "hold1")
    # Dom0 kills the backend once told the screendump is taken (dom0-init wait_host).
    _ack_host(r, "restart-hold1", end)
    r.wait(r"HARNESS BACKEND KILLED", 60, fail=end + r"|HOST-ACK-TIMEOUT")
    sw.lap()
    m = r.wait(rf"\[restart\].*(?:{HOLD_RX})", 400, fail=_guest_fail("restart", end))
    res.timings["restart→hold2"] = sw.lap()
    c2 = r.check_hold("restart", m, "hold2")
    res.status = "PASS" if c1.ok and c2.ok else "FAIL"
    res.detail = f"before kill: {c1.detail}\nafter restart: {c2.detail}"


# How the host checks each Xen scenario: lib/scenarios.py rows name a key here (and give
# extra arguments in their `spec`). A check sets res.status/res.detail; the Dom0 script's
# own rc (SCENARIO ... END rc=) is checked after it.
CHECKS = {
    "boot": _check_boot,
    "pvh_boots": _check_pvh_boots,
    "flip": lambda r, s, res, end, dom, fmt: _flip(r, s, dom, fmt, res, end),
    "destroy": _check_destroy,
    "restart": _check_restart,
    "two_domus": lambda r, s, res, end: _two_domus(r, res, end),
    "noisy_neighbour": lambda r, s, res, end: _noisy_neighbour(r, res, end),
    "destroy_loop": lambda r, s, res, end: _destroy_loop(r, res, end),
    "refused": lambda r, s, res, end: _refused(r, res, end),
    "xen_wayland": lambda r, s, res, end: _xen_wayland(r, res, end),
    "weston_guest": lambda r, s, res, end: _weston_guest(r, res, end),
    "modetest_guest": lambda r, s, res, end: _modetest_guest(r, res, end),
    "launch": lambda r, s, res, end: _launch(r, res, end),
    "input": lambda r, s, res, end: _input(r, res, end),
    "drvdom": lambda r, s, res, end, bealloc: _drvdom(r, res, end, bealloc=bealloc),
    "zero_copy": _zero_copy,
}
_unchecked = [x.name for x in scenarios.TABLE if x.group in ("xen", "zcopy") and x.check not in CHECKS]
assert not _unchecked, f"lib/scenarios.py rows without a check in lib/xen.py CHECKS: {_unchecked}"


def _scenario(r: Run, s: str, res: Result) -> None:
    end = rf"HARNESS SCENARIO {s} END"
    row = scenarios.BY_NAME.get(s)
    if row is None or row.group not in ("xen", "zcopy"):
        res.detail = "no Xen row in lib/scenarios.py"
        return
    CHECKS[row.check](r, s, res, end, *row.spec)
    m = r.wait(rf"HARNESS SCENARIO {s} END rc=(\d+)", 400)
    if m.group(1) != "0" and res.status == "PASS":
        res.status, res.detail = "FAIL", f"Dom0 scenario script rc={m.group(1)}; {res.detail}"


def zcopy_kind(names: list[str]) -> str:
    """The image build of the zcopy boot: "zcopy" = Debian's kernel + out-of-tree gntdev
    dma-buf and VKMS modules (lib/zcopy.sh, ~1-2.5 min cold), "dom0kernel" = the whole
    kernel built from linux-source-6.1 (lib/dom0kernel.sh, 8-26 min cold). The xen-drvdom-*
    scenarios still need the latter: with Debian's kernel in the driver domain its first
    VKMS modeset took 7.4 and 7.8 s, past xen-drm-front's 3 s request timeout (guest:
    "Failed to enable display: -110"), at host load 17-22. The built kernel took 0.18 s in an
    earlier run, but 4.8 s (the same FAIL) at load ~15: load, not only the kernel; until a
    run on a quieter host passes with the modules, the drvdom ones keep the built kernel.
    DISPLBACK_ZCOPY_DOM0=modules|source overrides."""
    force = os.environ.get("DISPLBACK_ZCOPY_DOM0", "")
    if force in ("modules", "source"):
        return "zcopy" if force == "modules" else "dom0kernel"
    return "dom0kernel" if any(n.startswith("xen-drvdom-") for n in names) else "zcopy"


def run_all(names: list[str], bins: dict, args, accel: list[str], build_images) -> list[Result]:
    """Every Xen scenario in `names`: one boot for the stock ones, one for the zcopy ones."""
    out: list[Result] = []
    for kind, kind_names in (("stock", STOCK_SCENARIOS), ("zcopy", ZCOPY_SCENARIOS)):
        mine = [n for n in names if n in kind_names]
        if mine and vm.run_deadline_passed():
            out += [Result(n, "FAIL", "not run: run deadline") for n in mine]
        elif mine:
            vm.boot_budget(args.boot_deadline, len(mine))
            out += run_boot(kind, mine, bins, args, accel, build_images)
    return out


def run_boot(kind: str, names: list[str], bins: dict, args, accel: list[str], build_images) -> list[Result]:
    # A name may repeat (--repeat): the second run of a scenario is reported as "name#2".
    results = {i: Result(n if names.index(n) == i else f"{n}#{names[:i + 1].count(n)}")
               for i, n in enumerate(names)}
    workdir = args.workdir
    try:
        art = build_images("xen", workdir)
        if kind == "zcopy":
            k = build_images(zcopy_kind(names), workdir)
            art.update({key: v for key, v in k.items() if key != "build_secs"})
            art["build_secs"] += k["build_secs"]
    except RuntimeError as e:
        for r in results.values():
            r.detail = str(e)
        return list(results.values())
    # The zcopy boot: Debian's kernel with an out-of-tree xen-gntdev with dma-buf (lib/zcopy.sh;
    # its driver domain loads that and an out-of-tree VKMS), or the kernel built from source
    # (DOM0K_*, everything built in): zcopy_kind().
    dom0_kernel = art.get("DOM0K_VMLINUX", art["VMLINUX"])
    stage1_base = art.get("STAGE1_NOMOD_INITRAMFS", art["STAGE1_INITRAMFS"])
    if "ZC_KMODS_BUILD_SECS" in art:
        kdesc = (f"Dom0 kernel {art['KVER']} + out-of-tree xen-gntdev (dma-buf) and vkms "
                 f"(built in {art['ZC_KMODS_BUILD_SECS']} s when cold)")
    elif "DOM0K_RELEASE" in art:
        kdesc = f"zero-copy Dom0 kernel {art['DOM0K_RELEASE']} (built in {art['DOM0K_BUILD_SECS']} s when cold)"
    else:
        kdesc = f"Dom0 kernel {art['KVER']}"
    print(f"=== xen images ready in {art['build_secs']:.1f}s (Xen {art['XEN_VERSION']}, {kdesc})", flush=True)
    gc = bins.get("guest_client", "ERROR")
    if gc.startswith("ERROR"):
        for r in results.values():
            r.detail = gc
        return list(results.values())
    domu_files = {
        "init": (0o755, _read(os.path.join(XEN_DIR, "domu-init"))),
        "bin/guest_client": (0o755, _read(gc)),
    }
    ir = bins.get("input_reader", "ERROR")
    if not ir.startswith("ERROR"):
        domu_files["bin/input_reader"] = (0o755, _read(ir))
    domu = _initrd(workdir, "domU", domu_files, art["DOMU_INITRAMFS"])
    params = (f"FRAMES={args.frames}\nHOLD={max(args.hold, 5)}\nSCENARIOS=\"{' '.join(names)}\"\n"
              + BOOT_PARAMS[kind])
    inject = {
        "init": (0o755, _read(os.path.join(XEN_DIR, "stage1-init"))),
        "inject/harness/dom0-init": (0o755, _read(os.path.join(XEN_DIR, "dom0-init"))),
        "inject/harness/domu.cfg": (0o644, _read(os.path.join(XEN_DIR, "domu.cfg"))),
        "inject/harness/params": (0o644, params.encode()),
        "inject/harness/domU.cpio": (0o644, _read(domu)),
    }
    be = bins.get("displback", "ERROR")
    be_note = ""
    if not be.startswith("ERROR"):
        try:
            deb, be = build_deb(be, workdir)
            inject["inject/harness/displback.deb"] = (0o644, _read(deb))
            be_note = f" (Dom0 installs {os.path.basename(deb)})"
        except (RuntimeError, OSError, subprocess.CalledProcessError) as e:
            be = f"ERROR: {e}"
    if be.startswith("ERROR"):
        be_note = f" (displback package not injected: {be})"
    rp = bins.get("input_replay", "ERROR")
    if not rp.startswith("ERROR"):
        inject["inject/usr/local/bin/input_replay"] = (0o755, _read(rp))
    if "ZC_GNTDEV_KO" in art:  # dom0-init insmods it instead of Debian's xen-gntdev
        inject["inject/harness/kmod/xen-gntdev-dmabuf.ko"] = (0o644, _read(art["ZC_GNTDEV_KO"]))
    if "xen-input" in names:
        # evdev and uinput for xen-input, without rebuilding the cached Dom0 rootfs (its
        # module set is DOM0_MODULES in lib/xen.sh); both have no dependencies.
        kmods = os.path.join(os.path.dirname(art["VMLINUX"]), "lib", "modules", art["KVER"], "kernel", "drivers", "input")
        for m in ("evdev.ko", "misc/uinput.ko"):
            inject[f"inject/harness/kmod/{os.path.basename(m)}"] = (0o644, _read(os.path.join(kmods, m)))
    if any(n.startswith("xen-drvdom-") for n in names):
        sc = bins.get("scanout_check", "ERROR")
        if be.startswith("ERROR") or sc.startswith("ERROR"):
            be_note += f" (driver domain incomplete: {be if be.startswith('ERROR') else sc})"
        else:
            # The driver domain boots Debian's kernel (PVH) with busybox, the modules of
            # ZC_DRVDOM_INITRAMFS (out-of-tree gntdev dma-buf and VKMS), displback and
            # scanout_check; Dom0's xl finds both under /harness.
            inject["inject/harness/drvdom-vmlinux"] = (0o644, _read(dom0_kernel))
            inject["inject/harness/drvdom.cpio"] = (0o644, _read(_initrd(workdir, "drvdom", {
                "init": (0o755, _read(os.path.join(XEN_DIR, "drvdom-init"))),
                "bin/displback": (0o755, _read(be)),
                "bin/scanout_check": (0o755, _read(sc)),
            }, art.get("ZC_DRVDOM_INITRAMFS", stage1_base))))
    if any(n in THIRD_PARTY for n in names):
        try:
            w = build_images("weston", workdir)
            art["build_secs"] += w["build_secs"]
            ov = os.path.join(workdir, "domU-weston.overlay.cpio")
            cpio.write_newc(ov, {
                "init": (0o755, _read(os.path.join(XEN_DIR, "domu-init"))),
                "bin/guest_client": (0o755, _read(gc)),
                "etc/prog-weston.sh": (0o644, _read(os.path.join(WESTON_DIR, "prog-weston.sh"))),
                "etc/prog-modetest.sh": (0o644, _read(os.path.join(WESTON_DIR, "prog-modetest.sh"))),
                **weston.overlay_files(workdir),
            })
            if "xen-wayland" in names:
                # Dom0's Weston: the same tree under /opt/weston (a chroot) + its run-time files.
                inject.update(cpio.reroot_newc(_read(w["WESTON_CPIO"]), "inject/opt/weston"))
                inject.update({f"inject/opt/weston/{k}": v for k, v in weston.overlay_files(workdir).items()})
                # A static busybox for the chroot's shell (Dom0's own needs libresolv).
                inject["inject/opt/weston/bin/busybox"] = (0o755, _read(art["BUSYBOX"]))
            # Uncompressed overlay and Weston tree first, then the gzip base (initramfs.sh).
            inject["inject/harness/domU-weston.cpio"] = (
                0o644, _read(ov) + _read(w["WESTON_CPIO"]) + _read(art["DOMU_INITRAMFS"]))
            print(f"=== Weston DomU image: {len(inject['inject/harness/domU-weston.cpio'][1]) / 1e6:.1f} MB "
                  f"(weston tree cold build {w['WESTON_BUILD_SECS']} s, this run {w['build_secs']:.1f} s)", flush=True)
        except RuntimeError as e:
            be_note += f" (no Weston DomU image: {e})"
    stage1 = _initrd(workdir, f"stage1-{kind}", inject, stage1_base)

    # PVH DomUs (the be-alloc scenarios) crash early under TCG on RDTSCP ("SVM Insn len
    # emulation failed"): hide it (reference/xen-in-qemu.md).
    # XSAVE hidden too: a PVH DomU sometimes ran with an XCR0 lacking the AVX bit (its
    # XRSTOR faulted, "Bad FPU state detected", then glibc's AVX2 strlen in init was a
    # #UD: SIGILL; 1 in 5-7 PVH boots on the zero-copy Dom0). Without XSAVE nobody uses
    # XCR0 (Xen saves with FXSAVE, guests use SSE).
    accel = ["max,-rdtscp,-xsave" if a == "max" else a for a in accel]
    qargs = [*accel, "-m", "2G", "-smp", "2", "-machine", "pc", "-display", "none", "-vga", "std",
             *BOOT_DEVICES[kind],
             "-drive", f"file={art['DOM0_IMG']},if=virtio,format=raw,snapshot=on",
             "-kernel", art["XEN"], "-append", XEN_CMDLINE,
             "-initrd", f"{dom0_kernel} {DOM0_CMDLINE},{stage1}"]
    print(f"=== booting Xen + Dom0 ({kind})" + be_note, flush=True)
    v = vm.VM(qargs, workdir, f"xen-{kind}")
    r = Run(v, workdir, ZC_ID if kind == "zcopy" else None)
    boot = {}
    try:
        sw = Stopwatch()
        r.wait(r"Xen version 4\.17", 60)
        boot["xen-banner"] = sw.lap()
        r.wait(r"HARNESS DOM0 BOOTED", 240, fail=r"Kernel panic|HARNESS-FATAL|Panic on CPU")
        boot["dom0-init"] = sw.lap()
        pkg = r.wait(r"HARNESS PKG INSTALLED rc=(\S+) version=(\S*) bin=(\S*) files=(\d+)", 180,
                     fail=r"Kernel panic|Panic on CPU", what="dpkg -i of the displback package")
        boot["dpkg-i"] = sw.lap()
        print(f"--- Dom0 installed the package: rc={pkg.group(1)} version={pkg.group(2)} "
              f"displback={pkg.group(3)} ({pkg.group(4)} paths in `dpkg -L displback`, listed in the log)",
              flush=True)
        if pkg.group(1) != "0" or pkg.group(3) != "/usr/bin/displback":
            raise RuntimeError(f"the displback package is not what Dom0 runs: {pkg.group(0)}")
        m = r.wait(r"HARNESS DOM0 READY cards=\[(.*?)\]", 120, fail=r"Kernel panic|Panic on CPU")
        boot["toolstack"] = sw.lap()
        print(f"--- Dom0 ready at {v.elapsed():.1f}s: " + " ".join(f"{k}={t:.1f}s" for k, t in boot.items())
              + f" cards: {m.group(1)}", flush=True)
        dead = ""  # why the rest of this boot's scenarios are not run
        for idx, s in enumerate(names):
            res = results[idx]
            if not dead and v.deadline_passed():
                dead = f"{v.deadline_what} passed"
            if dead:
                res.detail = f"not run: {dead}"
                print(f"--- {s}: FAIL {res.detail}", flush=True)
                continue
            res.timings.update({f"boot:{k}": t for k, t in boot.items()} if idx == 0 else {})
            t0 = time.monotonic()
            begin = r.i
            try:
                r.wait(rf"HARNESS SCENARIO {s} BEGIN", 600)
                begin = r.begin = r.i
                _scenario(r, s, res)
            except (vm.Timeout, RuntimeError, ValueError, OSError) as e:
                res.status = "FAIL"
                mine = [l for _, l in v.lines[begin:]]
                extra = [l.strip() for l in mine if re.search(
                    r"HARNESS (BACKEND|XL-CREATE|TIMEOUT|GAVE-UP|GNTDEV|ZC|TWO|NN|DLOOP|MAPS|UNMAP-WAIT|REFUSED|LAUNCH|HOST-ACK)|GUEST-CLIENT ERROR|unable to add|panic|\[diag:"
                    r"|\[be-log:\S+\].*(WARN|ERROR)", l)][:10]
                res.detail = f"{e}" + "".join(f"\n  {l}" for l in extra)
                if isinstance(e, vm.DeadlineExceeded):
                    dead = f"{v.deadline_what} passed"
                else:
                    # Resynchronise on this scenario's end marker; a Dom0 that does not get
                    # there is taken as hung: the rest of the boot is not waited for.
                    try:
                        r.wait(rf"HARNESS SCENARIO {s} END", 400)
                    except vm.DeadlineExceeded:
                        dead = f"{v.deadline_what} passed"
                    except vm.Timeout as e2:
                        dead = f"Dom0 did not end scenario {s} ({e2}): boot abandoned"
            res.timings["scenario"] = time.monotonic() - t0
            print(f"--- {s}: {res.status} {res.timing_str()}\n    {res.detail}", flush=True)
        if not dead:
            r.wait(r"HARNESS DOM0 DONE", 120)
    except (vm.Timeout, RuntimeError) as e:
        for res in results.values():
            if res.detail == "not run":
                why = "boot deadline: " if isinstance(e, vm.DeadlineExceeded) else ""
                res.detail = f"not run: {why}Xen boot/run ({kind}): {e}\n{v.tail()}"
    finally:
        rc = v.stop(timeout=60)
        total = v.elapsed()
    results[0].timings["vm-total"] = total
    results[0].timings["images"] = art["build_secs"]
    print(f"=== Xen VM ({kind}) exited rc={rc} after {total:.1f}s", flush=True)
    return list(results.values())
