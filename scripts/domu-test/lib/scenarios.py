"""Every scenario in one table: its name, the group (and so the boot) it runs in, what it
shows (`run --help` prints this table), and how the host checks it.

Adding a scenario is one row here plus what runs in the VM: for `xen`/`zcopy` a
`scenario_NAME` function in xen/dom0-init and, if no existing check fits, a function in
lib/xen.py's CHECKS; for `kms` the row's `spec` (display, program, format). Rows are one
per line and grouped by group, so parallel additions merge as separate lines.

Groups and boots: `kms` one plain VM per scenario (lib/kms.py); `xen` one Xen boot with
Debian's Dom0 kernel (lib/xen.py, kind "stock"); `zcopy` one Xen boot with the zero-copy
Dom0 kernel (kind "zcopy"); `wayland` plain VMs with Weston (lib/wayland.py, which takes its
list from here: one boot with Debian 12's Weston, one with the GL Weston for rows whose spec
is ("weston-gl",)); `arm64` Xen on arm64 (lib/arm64.py, which takes its scenario list from
the rows here).
`also` puts a scenario in more groups (it still runs in its own group's boot).
"""

from dataclasses import dataclass


@dataclass(frozen=True)
class Scenario:
    name: str
    group: str
    about: str
    # How the host checks it: kms: unused (see spec); xen/zcopy: a key of lib/xen.py CHECKS;
    # wayland/arm64: their runner's own.
    check: str = ""
    # kms: (display, program, format); xen checks: extra arguments of the check; wayland:
    # () or ("weston-gl",), the Weston image (and so the boot) it runs in.
    spec: tuple = ()
    also: tuple = ()
    # False: displback does not run in it (toolstack/program self-checks), so the
    # self-test (`run --broken-build`) does not expect it to fail.
    backend: bool = True


S = Scenario
TABLE: list[Scenario] = [
    # --- kms: a program draws on the VM's own KMS device; QMP screendump on its HOLD ---
    S("kms-bochs", "kms", "guest_client on the VM's own KMS device (bochs-drm, -vga std)", spec=("bochs", "guest-client", "xrgb8888"),
      backend=False),
    S("kms-virtio", "kms", "guest_client on virtio-gpu", spec=("virtio", "guest-client", "xrgb8888"),
      backend=False),
    S("kms-demo-bochs", "kms", "`displback demo --output kms` on bochs-drm", spec=("bochs", "demo", "xrgb8888")),
    S("kms-demo-virtio", "kms", "`displback demo --output kms` on virtio-gpu", spec=("virtio", "demo", "xrgb8888")),
    S("kms-demo-bochs-rgb565", "kms", "the demo with an RGB565 guest (converted)", spec=("bochs", "demo", "rgb565")),
    S("kms-demo-virtio-reconfig", "kms", "the demo reconfiguring (disable/enable, half-size modeset) right after flips",
      spec=("virtio", "demo-reconfig", "xrgb8888")),
    S("kms-demo-bochs-legacy", "kms", "the same forced onto the legacy path (DISPLBACK_KMS_ATOMIC=0)",
      spec=("bochs", "demo-legacy", "xrgb8888")),
    S("kms-demo-udmabuf", "kms", "Debian's kernel + out-of-tree udmabuf (vmap patch) and VKMS: `demo --zero-copy on` "
      "(scan-out read back, copied=0), udmabuf vmap off (per-buffer copy fallback), copy vs zero-copy "
      "per-flip table at 1024x768/1920x1080/3840x2160; one boot", spec=("vkms", "demo", "xrgb8888")),
    # --- xen: one Xen 4.17 boot, Debian Dom0 kernel; Dom0 installs the displback .deb ---
    S("xen-boot", "xen", "toolstack self-check: a DomU without vdispl boots and powers off (no displback)", check="boot",
      backend=False),
    S("xen-pvh-boots", "xen", "6 PVH DomUs without vdispl in a row", check="pvh_boots", backend=False),
    S("xen-flip", "xen", "`displback serve`; a DomU's guest_client flips 300 frames; pixels of its HOLD", check="flip",
      spec=("flip", "xrgb8888")),
    S("xen-rgb565", "xen", "the same with an RGB565 guest", check="flip", spec=("rgb565", "rgb565")),
    S("xen-destroy", "xen", "`xl destroy` mid-flip: gntdev maps before/after, backend alive, a second DomU draws",
      check="destroy"),
    S("xen-restart", "xen", "SIGKILL displback while the guest holds, restart: the guest draws again", check="restart"),
    S("xen-two-domus", "xen", "two DomUs at once, one backend each on its own bochs head", check="two_domus"),
    S("xen-noisy-neighbour", "xen", "one backend, two guests; the victim's p99 while the other floods", check="noisy_neighbour"),
    S("xen-destroy-loop", "xen", "20 DomUs destroyed mid-flip on one backend: nothing left, RSS flat", check="destroy_loop"),
    S("xen-refused", "xen", "a refused SET_CONFIG reaches guest_client as an error", check="refused"),
    S("xen-bealloc", "xen", "be-alloc (PVH) guest on the Debian kernel: gntalloc + copy path", check="zero_copy"),
    S("xen-zcopy-auto-fallback", "xen", "`--zero-copy auto` on the Debian kernel: copy path, reason logged once",
      check="zero_copy"),
    S("xen-launch", "xen", "`displback launch` per guest by name, twice (spawned, reused)", check="launch"),
    S("xen-input", "xen", "vkbd: replayed keys and multi-touch reach the DomU while it flips", check="input"),
    S("xen-weston-guest", "xen", "third-party guest: Debian's Weston on xen-drm-front", check="weston_guest"),
    S("xen-modetest-guest", "xen", "third-party guest: libdrm's modetest (modeset + page flips)", check="modetest_guest"),
    S("xen-wayland", "xen", "Dom0's Weston, `displback serve --output wayland`", check="xen_wayland", also=("wayland",)),
    # --- zcopy: one Xen boot with the Dom0 kernel built with gntdev dma-buf and VKMS ---
    S("xen-zcopy-bealloc", "zcopy", "be-alloc guest in the PV Dom0: copy path, nothing left", check="zero_copy"),
    S("xen-zcopy-destroy", "zcopy", "two runs (buffers destroyed between): nothing left", check="zero_copy"),
    S("xen-zcopy-pv-fallback", "zcopy", "frontend buffers in the PV Dom0: copy path, reason logged once", check="zero_copy"),
    S("xen-drvdom-bealloc", "zcopy", "displback in a PVH driver domain, be-alloc zero-copy on VKMS", check="drvdom",
      spec=(True,)),
    S("xen-drvdom-copy", "zcopy", "displback in a PVH driver domain, copy path", check="drvdom", spec=(False,)),
    # --- wayland: Debian's Weston on a plain VM (lib/wayland.py) ---
    S("wayland-weston", "wayland", "Weston + weston-image: the Weston piece's self-check (no displback)",
      backend=False),
    S("wayland-demo", "wayland", "`displback demo --output wayland` as Weston's client"),
    S("wayland-ivi", "wayland", "Weston's ivi-shell + hmi-controller: the demo's ivi-application surface 1000 exact at "
      "hmi-controller's first tile"),
    S("wayland-restart", "wayland", "Weston restarted under a running demo: its last frame on the new Weston"),
    S("wayland-dmabuf", "wayland", "second boot: Debian 13's Weston 14, GL renderer on llvmpipe; `demo --zero-copy on`: "
      "udmabuf frames imported via zwp_linux_dmabuf_v1, picture exact, zero_copy>0 copied=0 dmabuf_refused=0",
      spec=("weston-gl",)),
    # --- arm64: Xen 4.20 arm64 under qemu-system-aarch64 (lib/arm64.py) ---
    S("arm64-zcopy-frontend", "arm64", "be-alloc=0 guest, `--zero-copy on` on VKMS: EXP_FROM_REFS, PRIME import"),
    S("arm64-zcopy-bealloc", "arm64", "be-alloc=1 guest: VKMS dumb buffers granted with IMP_TO_REFS"),
    S("arm64-zcopy-destroy", "arm64", "`xl destroy` while a guest flips zero-copy buffers"),
    S("arm64-two-domus", "arm64", "two guests, one `--zero-copy on` backend, two VKMS outputs (test-bed patch): each read back"),
    S("arm64-zcopy-fallback", "arm64", "the real exporter without vmap (gntdev allow_vmap=0): VKMS refuses each imported "
      "framebuffer, `--zero-copy auto` copies those buffers: read back exact, imports_refused>0 copied>0"),
    S("arm64-cost", "arm64", "backend CPU per flip (/proc, utime/stime), copy vs zero-copy at 1024x768/1920x1080/3840x2160, "
      "guest p50/p99, the flip floor (flip_floor) and the backend's syscalls per zero-copy flip (strace): "
      "the per-flip table (goals printed met/NOT met)"),
    S("arm64-copy", "arm64", "Debian's gntdev: `--zero-copy on` refuses, `auto` copies"),
]
del S

BY_NAME: dict[str, Scenario] = {s.name: s for s in TABLE}
assert len(BY_NAME) == len(TABLE), "a scenario name appears twice in TABLE"
GROUP_ORDER = ["kms", "xen", "zcopy", "wayland", "arm64"]


def names(group: str) -> list[str]:
    """The scenarios of `group` in table order: its own and those `also` in it."""
    return [s.name for s in TABLE if s.group == group or group in s.also]


def own(group: str) -> list[str]:
    """The scenarios that run in `group`'s boot(s)."""
    return [s.name for s in TABLE if s.group == group]


def help_text() -> str:
    """The scenario list for `run --help`."""
    out = []
    for g in GROUP_ORDER:
        out.append(f"  group {g}:")
        for s in TABLE:
            if s.group == g:
                also = f" (also in {', '.join(s.also)})" if s.also else ""
                out.append(f"    {s.name:<26} {s.about}{also}{'' if s.backend else ' [no displback]'}")
    return "\n".join(out)
