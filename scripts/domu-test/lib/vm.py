"""QEMU process control: serial console capture with marker waits, QMP, accelerator choice."""

import json
import os
import re
import socket
import subprocess
import threading
import time


def choose_accel() -> tuple[list[str], str]:
    """KVM only if /dev/kvm opens AND the CPU has VMX/SVM; otherwise TCG, said loudly."""
    flags = set()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("flags"):
                flags.update(line.split(":", 1)[1].split())
    except OSError:
        pass
    kvm_ok = False
    try:
        fd = os.open("/dev/kvm", os.O_RDWR)
        os.close(fd)
        kvm_ok = True
    except OSError:
        pass
    if kvm_ok and ({"vmx", "svm"} & flags):
        return ["-accel", "kvm", "-cpu", "host"], "kvm"
    why = "no /dev/kvm" if not kvm_ok else "kvm-pvm, no VMX/SVM"
    print(f"*** KVM unusable ({why}) -> TCG (slow; timings are for TCG) ***", flush=True)
    return ["-accel", "tcg,thread=multi", "-cpu", "max"], "tcg"


class Timeout(Exception):
    pass


class DeadlineExceeded(Timeout):
    """The VM's boot deadline or the run's deadline passed: nothing more is waited for."""


# Deadlines (monotonic seconds; None = none). The runner sets RUN_DEADLINE once and
# NEXT_BOOT_SECS before it starts each boot; every VM gets min(start + NEXT_BOOT_SECS,
# RUN_DEADLINE) as its own, and every wait_for stops there. BOOTS records each VM's budget
# and what it used, for the summary.
RUN_DEADLINE: float | None = None
NEXT_BOOT_SECS: float | None = None
BOOTS: list[dict] = []


def boot_budget(override: float, n: int) -> None:
    """The deadline of the VMs started from now on, each running `n` scenarios: `override`
    seconds if > 0, else 600 s + 150 s per scenario."""
    global NEXT_BOOT_SECS
    NEXT_BOOT_SECS = override if override > 0 else 600 + 150 * n


def run_deadline_passed() -> bool:
    return RUN_DEADLINE is not None and time.monotonic() >= RUN_DEADLINE


class VM:
    """A QEMU instance whose serial console is its stdout."""

    def __init__(self, args: list[str], workdir: str, name: str, binary: str = "qemu-system-x86_64"):
        self.workdir = workdir
        self.name = name
        self.qmp_path = os.path.join(workdir, f"{name}.qmp")
        self.log_path = os.path.join(workdir, f"{name}.serial.log")
        if os.path.exists(self.qmp_path):
            os.unlink(self.qmp_path)
        # A human monitor socket for post-mortems of a hung VM (the harness uses only QMP):
        #   echo 'info registers' | socat - unix-connect:out/domu-test/NAME.hmp
        self.hmp_path = os.path.join(workdir, f"{name}.hmp")
        cmd = [binary, *args, "-serial", "stdio", "-monitor", "none",
               "-qmp", f"unix:{self.qmp_path},server=on,wait=off", "-no-reboot",
               "-chardev", f"socket,id=hmp0,path={self.hmp_path},server=on,wait=off",
               "-mon", "chardev=hmp0,mode=readline"]
        with open(os.path.join(workdir, f"{name}.cmdline"), "w") as f:
            f.write(" ".join(cmd) + "\n")
        self.t0 = time.monotonic()
        ends = []
        if NEXT_BOOT_SECS is not None:
            ends.append((self.t0 + NEXT_BOOT_SECS, f"boot deadline ({NEXT_BOOT_SECS:.0f} s)"))
        if RUN_DEADLINE is not None:
            ends.append((RUN_DEADLINE, "run deadline"))
        self.deadline, self.deadline_what = min(ends) if ends else (None, "")
        self.boot = {"name": name, "budget": (self.deadline - self.t0) if self.deadline else None,
                     "used": None, "what": self.deadline_what, "hit": False}
        BOOTS.append(self.boot)
        # stdin is the serial console's input (Xen passes it to Dom0's hvc0): send().
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT)
        self.lines: list[tuple[float, str]] = []
        self.cond = threading.Condition()
        self.eof = False
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        self._qmp: socket.socket | None = None
        self._qmp_buf = b""

    def _read(self) -> None:
        with open(self.log_path, "w") as log:
            buf = b""
            while True:
                chunk = self.proc.stdout.read1(65536)  # type: ignore[union-attr]
                if not chunk:
                    break
                buf += chunk
                while b"\n" in buf:
                    raw, buf = buf.split(b"\n", 1)
                    line = raw.decode("utf-8", "replace").replace("\r", "")
                    t = time.monotonic() - self.t0
                    log.write(f"[{t:8.2f}] {line}\n")
                    log.flush()
                    with self.cond:
                        self.lines.append((t, line))
                        self.cond.notify_all()
            with self.cond:
                self.eof = True
                self.cond.notify_all()

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def deadline_passed(self) -> bool:
        if self.deadline is not None and time.monotonic() >= self.deadline:
            self.boot["hit"] = True
            return True
        return False

    def send(self, text: str) -> None:
        """Type `text` on the serial console (a line: end it with a newline)."""
        self.proc.stdin.write(text.encode())  # type: ignore[union-attr]
        self.proc.stdin.flush()  # type: ignore[union-attr]

    def wait_for(self, pattern: str, timeout: float, start: int = 0,
                 fail: str | None = None, what: str | None = None) -> tuple[int, re.Match]:
        """Wait for a serial line matching `pattern` (searched from line index `start`).
        Returns (index, match). Raises Timeout on timeout, on QEMU exit, or when a line
        matches `fail` first; raises DeadlineExceeded once the VM's deadline passed."""
        what = what or repr(pattern)
        rx = re.compile(pattern)
        frx = re.compile(fail) if fail else None
        deadline = time.monotonic() + timeout
        hard = self.deadline is not None and self.deadline < deadline
        if hard:
            deadline = self.deadline
        i = start
        with self.cond:
            while True:
                while i < len(self.lines):
                    line = self.lines[i][1]
                    m = rx.search(line)
                    if m:
                        return i, m
                    if frx and frx.search(line):
                        raise Timeout(f"no {what}; instead: {line.strip()}")
                    i += 1
                if self.eof:
                    raise Timeout(f"QEMU exited (rc={self.proc.poll()}) before {what}")
                left = deadline - time.monotonic()
                if left <= 0:
                    if hard:
                        self.boot["hit"] = True
                        raise DeadlineExceeded(f"no {what}: {self.deadline_what} of {self.name} passed")
                    raise Timeout(f"no {what} within {timeout:.0f} s")
                self.cond.wait(min(left, 1.0))

    def tail(self, n: int = 15) -> str:
        with self.cond:
            return "\n".join("    | " + l for _, l in self.lines[-n:])

    # --- QMP -------------------------------------------------------------------------
    def _qmp_connect(self, timeout: float = 20.0) -> socket.socket:
        if self._qmp:
            return self._qmp
        deadline = time.monotonic() + timeout
        while True:
            try:
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.settimeout(30)
                s.connect(self.qmp_path)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise Timeout("QMP socket did not come up")
                time.sleep(0.1)
        self._qmp = s
        self._qmp_recv()  # greeting
        self.qmp("qmp_capabilities")
        return s

    def _qmp_recv(self) -> dict:
        while b"\n" not in self._qmp_buf:
            chunk = self._qmp.recv(65536)  # type: ignore[union-attr]
            if not chunk:
                raise Timeout("QMP connection closed")
            self._qmp_buf += chunk
        line, self._qmp_buf = self._qmp_buf.split(b"\n", 1)
        return json.loads(line)

    def qmp(self, cmd: str, **arguments) -> dict:
        s = self._qmp_connect()
        msg = {"execute": cmd}
        if arguments:
            msg["arguments"] = arguments
        s.sendall(json.dumps(msg).encode() + b"\n")
        while True:
            r = self._qmp_recv()
            if "return" in r or "error" in r:
                if "error" in r:
                    raise RuntimeError(f"QMP {cmd}: {r['error']}")
                return r["return"]
            # asynchronous events are ignored

    def screendump(self, path: str, device: str | None = None, head: int | None = None) -> None:
        """PPM of the primary display, or of the display device with QOM id `device`
        (its head `head` on a multi-head device)."""
        if os.path.exists(path):
            os.unlink(path)
        if device:
            extra = {} if head is None else {"head": head}
            self.qmp("screendump", filename=path, device=device, **extra)
        else:
            self.qmp("screendump", filename=path)
        if not os.path.exists(path):
            raise RuntimeError("screendump produced no file")

    def stop(self, timeout: float = 30.0) -> int | None:
        """Wait for QEMU to exit by itself, killing it after `timeout` s (at once if the
        deadline passed)."""
        if self.deadline_passed():
            timeout = 0.1
        try:
            if self.proc.stdin:
                self.proc.stdin.close()
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            return None
        finally:
            if self._qmp:
                self._qmp.close()
            self.reader.join(timeout=5)
            self.boot["used"] = self.elapsed()
