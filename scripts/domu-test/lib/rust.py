"""Build the Rust binaries the VMs run: x86_64, static glibc, stripped copies in the work dir."""

import os
import shutil
import subprocess

TARGET = "x86_64-unknown-linux-gnu"


def build(repo: str, workdir: str, bins: list[str], broken: str | None = None) -> dict[str, str]:
    """Returns bin name -> stripped path, or bin name -> 'ERROR: ...' for a failed build
    (each bin is built on its own so one broken binary does not hide the others).
    `broken`: build `displback` deliberately broken in that mode (feature harness-broken,
    DISPLBACK_BROKEN at build time: src/harness_broken.rs), for the harness self-test."""
    env = dict(os.environ)
    env["RUSTFLAGS"] = (env.get("RUSTFLAGS", "") + " -C target-feature=+crt-static").strip()
    target_dir = env.get("CARGO_TARGET_DIR", os.path.join(repo, "target"))
    out: dict[str, str] = {}
    for b in bins:
        log = os.path.join(workdir, f"cargo-{b}.log")
        cmd = ["cargo", "build", "--release", "--target", TARGET, "--bin", b]
        benv = env
        if broken and b == "displback":
            cmd += ["--features", "harness-broken"]
            benv = dict(env, DISPLBACK_BROKEN=broken)
        with open(log, "w") as f:
            rc = subprocess.call(cmd, cwd=repo, env=benv, stdout=f, stderr=subprocess.STDOUT)
        src = os.path.join(target_dir, TARGET, "release", b)
        if rc != 0 or not os.path.exists(src):
            tail = open(log).read().strip().splitlines()[-3:]
            out[b] = "ERROR: cargo build --bin %s failed: %s" % (b, " / ".join(tail))
            continue
        dst = os.path.join(workdir, b)
        shutil.copyfile(src, dst)
        subprocess.call(["strip", dst])
        os.chmod(dst, 0o755)
        out[b] = dst
    return out
