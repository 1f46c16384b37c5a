"""Image builds of a harness run, all started at once.

The image builds (lib/build.sh KIND) are mostly I/O: apt downloads, dpkg extraction,
debootstrap, mkfs. `Prebuild.start()` launches every one the run needs as a background
process (niced below the cargo build and the VMs) as soon as the scenario list is known,
so they overlap the cargo build and the earlier boots; `Prebuild.get(kind)` (the run's
`build_images`) then waits for that kind only. Builds that share a piece (every x86 kind
first prepares the Debian kernel) wait for each other on the cache's lock files
(common.sh build_once), never build it twice.

Each build keeps its own log: <workdir>/build-<kind>.log. A failed build raises
RuntimeError from get(), so the scenarios that need it FAIL with the log's tail.
"""

import os
import signal
import subprocess
import time

NICE = 15  # below cargo and QEMU (the harness runs those under the caller's niceness)


class Prebuild:
    def __init__(self, build_sh: str, workdir: str):
        self.build_sh = build_sh
        self.workdir = workdir
        self.procs: dict[str, tuple[subprocess.Popen, float, object]] = {}  # kind -> (process, start, stdout)
        self.done: dict[str, dict] = {}

    def _log(self, kind: str) -> str:
        return os.path.join(self.workdir, f"build-{kind}.log")

    def start(self, kinds: list[str]) -> None:
        for kind in kinds:
            if kind in self.procs or kind in self.done:
                continue
            err = open(self._log(kind), "w")
            out = open(os.path.join(self.workdir, f"build-{kind}.out"), "w+")
            # A process group of its own: stop() ends debootstrap/make under it too.
            p = subprocess.Popen(["nice", "-n", str(NICE), self.build_sh, kind], stdout=out, stderr=err,
                                 stdin=subprocess.DEVNULL, text=True, start_new_session=True)
            err.close()
            self.procs[kind] = (p, time.monotonic(), out)

    def get(self, kind: str, workdir: str | None = None) -> dict:
        """The build's KEY=VALUE lines (BUILD_SECS: the build's own wall time); build_secs =
        how long this call waited for it (0 when it was ready)."""
        if kind in self.done:
            return dict(self.done[kind], build_secs=0.0)
        if kind not in self.procs:
            self.start([kind])
        p, _, out = self.procs.pop(kind)
        t0 = time.monotonic()
        rc = p.wait()
        waited = time.monotonic() - t0
        out.seek(0)
        stdout = out.read()
        out.close()
        log = self._log(kind)
        if rc != 0:
            raise RuntimeError(f"image build ({kind}) failed (exit {rc}), see {log}:\n" + open(log).read()[-2000:])
        art = dict(l.split("=", 1) for l in stdout.splitlines() if "=" in l)
        self.done[kind] = art
        return dict(art, build_secs=waited)

    def stop(self) -> None:
        """Kill builds nobody waited for (the run ended early): only the ones started here."""
        for kind, (p, _, out) in list(self.procs.items()):
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
                try:
                    p.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    os.killpg(p.pid, signal.SIGKILL)
                    p.wait()
            out.close()
        self.procs.clear()


def kinds_for(names: list[str], kms_scenarios, xen_stock, xen_zcopy, zcopy_kind, third_party, wayland_scenarios,
              arm64_scenarios, wayland_gl_scenarios=()) -> list[str]:
    """The build kinds the scenario list needs, in the order the run uses them."""
    kinds = []
    if any(n in kms_scenarios or n in wayland_scenarios for n in names):
        kinds.append("kms")
    if any(n in xen_stock or n in xen_zcopy for n in names):
        kinds.append("xen")
    if any(n in xen_zcopy for n in names):
        kinds.append(zcopy_kind([n for n in names if n in xen_zcopy]))
    # kms-demo-udmabuf's VKMS + udmabuf modules come from the zcopy build, and so does
    # wayland-dmabuf's udmabuf.ko.
    if "zcopy" not in kinds and any((n in kms_scenarios and kms_scenarios[n][0] == "vkms")
                                    or n in wayland_gl_scenarios for n in names):
        kinds.append("zcopy")
    if any(n in third_party or (n in wayland_scenarios and n not in wayland_gl_scenarios) for n in names):
        kinds.append("weston")
    if any(n in wayland_gl_scenarios for n in names):
        kinds.append("weston-gl")
    if any(n in arm64_scenarios for n in names):
        kinds.append("arm64")
    return kinds
