"""Scenario results, the summary table, and shared constants for the runners."""

import re
import subprocess
import time
from dataclasses import dataclass, field

# Which program draws in a scenario: name -> shell command template run inside the VM.
# {frames} {hold} {fmt} are filled in; switching a scenario's program is one word.
PROGRAMS = {
    "guest-client": "/bin/guest_client --frames {frames} --hold-secs {hold} --format {fmt} --wait-secs 20",
    "demo": "/bin/displback demo --output kms --frames {frames} --hold-secs {hold}{fmt_opt}",
    # Disable/re-enable and half-resolution modesets right after flips (still in flight).
    "demo-reconfig": "NO_COLOR=1 /bin/displback demo --output kms --frames {frames} --hold-secs {hold}{fmt_opt}"
                     " --reconfigure-every 40",
    # The same on the legacy path (SET_CRTC in displback's worker thread, PAGE_FLIP).
    "demo-legacy": "NO_COLOR=1 DISPLBACK_KMS_ATOMIC=0 /bin/displback demo --output kms --frames {frames}"
                   " --hold-secs {hold}{fmt_opt} --reconfigure-every 40",
}
# Serial markers the programs print when they hold a frame on screen.
HOLD_RX = (r"(?:GUEST-CLIENT HOLD frame=(?P<frame>\d+) width=(?P<w>\d+) height=(?P<h>\d+)(?: conn=(?P<gconn>\d+))?)"
           r"|(?:DEMO HOLD frame=(?P<dframe>\d+) conn=(?P<conn>\d+) width=(?P<dw>\d+) height=(?P<dh>\d+))")
ERROR_RX = r"GUEST-CLIENT ERROR|HARNESS-EXIT rc=[1-9]|Kernel panic"


# The backend's line for a request it refused with an errno (src/displif/connection.rs:
# "refused <Request>: <why> ... errno=N ... refused=true"): its `refused=true` field, not
# the prose, and not the counters that merely name refusals (`imports_refused=0` in the
# KMS exit line).
REFUSED_RX = re.compile(r"(?<![\w.])refused=true\b")


def refusals(lines) -> list[str]:
    """The backend log lines that report a refused request."""
    return [l for l in lines if REFUSED_RX.search(l)]


def hold_info(m) -> tuple[int, int, int, int]:
    """(frame, conn, width, height) from a HOLD_RX match."""
    if m.group("frame") is not None:
        return int(m.group("frame")), int(m.group("gconn") or 0), int(m.group("w")), int(m.group("h"))
    return int(m.group("dframe")), int(m.group("conn")), int(m.group("dw")), int(m.group("dh"))


def program_cmd(program: str, frames: int, hold: int, fmt: str) -> str:
    return PROGRAMS[program].format(frames=frames, hold=hold, fmt=fmt,
                                    fmt_opt=" --format rgb565" if fmt == "rgb565" else "")


@dataclass
class Result:
    name: str
    status: str = "FAIL"  # PASS / FAIL
    detail: str = "not run"
    timings: dict = field(default_factory=dict)  # label -> seconds

    def timing_str(self) -> str:
        return " ".join(f"{k}={v:.1f}s" for k, v in self.timings.items())


def sh(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, text=True, capture_output=True, **kw)


class Stopwatch:
    def __init__(self):
        self.t0 = time.monotonic()

    def lap(self) -> float:
        t = time.monotonic()
        d, self.t0 = t - self.t0, t
        return d
