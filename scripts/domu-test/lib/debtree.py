#!/usr/bin/env python3
"""Assemble a minimal file tree of Debian programs (+ the shared libraries they need) from
.debs, without a chroot or maintainer scripts: the reusable piece behind the Weston images.

usage: debtree.py SPEC OUT_DIR

SPEC is a small key=value file (lines; `#` comments):
  packages = weston libdrm-tests ...      packages whose files are wanted (seeds)
  elf = /usr/bin/weston /usr/lib/...so    ELF files to copy with their library closure
  data = /usr/share/X11/xkb /etc/fonts    files/directories copied as they are (their package
                                          must be in `packages` or `data_packages`)
  data_packages = xkb-data fonts-dejavu-core

Libraries are resolved by walking DT_NEEDED (readelf) over the packages downloaded so far;
an unresolved soname pulls in the direct Depends of the package that owns the file that
needs it (first alternative), and so on: only packages that hold a needed library or a
seed are downloaded (into $CACHE/debs, reused). A soname that cannot be found is an error.
Prints `packages=N files=N bytes=N` on stdout; the package list goes to OUT_DIR/../packages.
"""

import fcntl
import os
import re
import shutil
import subprocess
import sys

CACHE = os.environ.get("DISPLBACK_CACHE", "/var/cache/displback-domu-test")
DEBS = os.path.join(CACHE, "debs")
LIBDIRS = ["lib/x86_64-linux-gnu", "usr/lib/x86_64-linux-gnu", "lib64", "usr/lib", "lib"]


def log(msg: str) -> None:
    print(f"[debtree] {msg}", file=sys.stderr, flush=True)


def run(cmd: list[str], **kw) -> str:
    return subprocess.run(cmd, check=True, text=True, capture_output=True, **kw).stdout


def candidates(pkgs: list[str]) -> dict[str, str]:
    """Candidate versions of several packages (one `apt-cache policy` call)."""
    out = run(["apt-cache", "policy", *pkgs])
    vers, name = {}, None
    for line in out.splitlines():
        if line and not line[0].isspace() and line.endswith(":"):
            name = line[:-1]
        m = re.match(r"\s+Candidate: (\S+)", line)
        if m and name and m.group(1) != "(none)":
            vers[name] = m.group(1)
    missing = [p for p in pkgs if p not in vers]
    if missing:
        raise SystemExit(f"debtree: no candidate version of {' '.join(missing)}")
    return vers


def fetch_many(pkgs: list[str]) -> dict[str, str]:
    """Package -> .deb path in $CACHE/debs, downloading the missing ones in one call
    (holding $CACHE/debs/.lock, as common.sh's fetch_deb does: builds run concurrently)."""
    os.makedirs(DEBS, exist_ok=True)
    with open(os.path.join(DEBS, ".lock"), "a") as lk:
        fcntl.flock(lk, fcntl.LOCK_EX)
        return _fetch_many(pkgs)


def _fetch_many(pkgs: list[str]) -> dict[str, str]:
    vers = candidates(pkgs)
    have = sorted(os.listdir(DEBS))

    def find(p: str) -> str | None:
        prefix = f"{p}_{vers[p].replace(':', '%3a')}_"
        return next((os.path.join(DEBS, f) for f in have if f.startswith(prefix) and f.endswith(".deb")), None)

    todo = [p for p in pkgs if not find(p)]
    if todo:
        log(f"apt-get download {len(todo)}: {' '.join(todo)}")
        subprocess.run(["apt-get", "download", "-q", *[f"{p}={vers[p]}" for p in todo]], cwd=DEBS, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        have = sorted(os.listdir(DEBS))
    out = {}
    for p in pkgs:
        d = find(p)
        if not d:
            raise SystemExit(f"debtree: apt-get download {p} left no .deb")
        out[p] = d
    return out


def depends(pkg: str) -> list[str]:
    """Direct Depends/Pre-Depends (first alternative of each), real packages only."""
    out = run(["apt-cache", "depends", "--no-recommends", "--no-suggests", "--no-conflicts",
               "--no-breaks", "--no-replaces", "--no-enhances", pkg])
    deps, alt = [], False
    for line in out.splitlines()[1:]:
        m = re.match(r"\s*(\|)?(Depends|PreDepends): (\S+)", line)
        if m:
            if not alt and not m.group(3).startswith("<"):
                deps.append(m.group(3))
            alt = bool(m.group(1))  # "|Depends: a" means the next line is an alternative of a
        elif line.startswith("    "):
            continue
    return deps


def elf_info(path: str) -> tuple[list[str], list[str]] | None:
    """(NEEDED sonames, RUNPATH/RPATH dirs) or None when not an ELF file."""
    with open(path, "rb") as f:
        if f.read(4) != b"\x7fELF":
            return None
    out = subprocess.run(["readelf", "-d", "-W", path], text=True, capture_output=True).stdout
    needed = re.findall(r"\(NEEDED\)\s+Shared library: \[(.+?)\]", out)
    rp = re.findall(r"\((?:RUNPATH|RPATH)\)\s+Library r(?:un)?path: \[(.+?)\]", out)
    dirs = [d.replace("$ORIGIN", os.path.dirname(path)) for r in rp for d in r.split(":")]
    return needed, dirs


class Pool:
    """Packages extracted one directory each: file path -> owning package."""

    def __init__(self, work: str):
        self.work = work
        self.pkgs: dict[str, str] = {}  # name -> extracted dir
        self.debs: dict[str, str] = {}  # name -> .deb

    def add(self, pkgs: list[str]) -> None:
        new = sorted({p for p in pkgs if p not in self.pkgs})
        if not new:
            return
        for p, deb in fetch_many(new).items():
            d = os.path.join(self.work, p)
            if not os.path.isdir(d):
                subprocess.run(["dpkg-deb", "-x", deb, d + ".tmp"], check=True)
                os.rename(d + ".tmp", d)
            self.pkgs[p] = d
            self.debs[p] = deb

    def find(self, rel: str) -> tuple[str, str] | None:
        """(package, host path) of the absolute in-image path `rel` (no leading /)."""
        for p, d in self.pkgs.items():
            if os.path.lexists(os.path.join(d, rel)):
                return p, d
        return None

    def soname(self, name: str, extra_dirs: list[str]) -> tuple[str, str, str] | None:
        """(package, pkg dir, in-image path) of a library."""
        for p, d in self.pkgs.items():
            dirs = LIBDIRS + [x.lstrip("/") for x in extra_dirs]
            for ld in dirs:
                rel = os.path.join(ld, name)
                if os.path.lexists(os.path.join(d, rel)):
                    return p, d, rel
        return None


def parse_spec(path: str) -> dict[str, list[str]]:
    spec: dict[str, list[str]] = {}
    for line in open(path):
        line = line.split("#", 1)[0].strip()
        if "=" in line:
            k, v = line.split("=", 1)
            spec.setdefault(k.strip(), []).extend(v.split())
    return spec


def copy_in(src_root: str, rel: str, out: str) -> int:
    """Copy one path (file, symlink or directory tree) from src_root into out; bytes copied.
    A symlink is copied as a symlink and its target (inside the same package) too."""
    src, dst = os.path.join(src_root, rel), os.path.join(out, rel)
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    if os.path.islink(src):
        target = os.readlink(src)
        if not os.path.lexists(dst):
            os.symlink(target, dst)
        tgt_rel = os.path.normpath(os.path.join(os.path.dirname(rel), target)) if not target.startswith("/") \
            else target.lstrip("/")
        return copy_in(src_root, tgt_rel, out) if os.path.lexists(os.path.join(src_root, tgt_rel)) else 0
    if os.path.isdir(src):
        n = 0
        for name in os.listdir(src):
            n += copy_in(src_root, os.path.join(rel, name), out)
        return n
    if not os.path.exists(dst):
        shutil.copy2(src, dst)
        return os.path.getsize(dst)
    return 0


def resolve_in(root: str, rel: str) -> str:
    """Host path of in-image path `rel` under `root`, following symlinks inside `root`."""
    for _ in range(20):
        p = os.path.join(root, rel)
        if not os.path.islink(p):
            return p
        t = os.readlink(p)
        rel = t.lstrip("/") if t.startswith("/") else os.path.normpath(os.path.join(os.path.dirname(rel), t))
    raise SystemExit(f"debtree: symlink loop at {rel}")


def main() -> int:
    spec = parse_spec(sys.argv[1])
    out = sys.argv[2]
    work = os.path.join(os.path.dirname(os.path.abspath(out)), "pool")
    os.makedirs(work, exist_ok=True)
    pool = Pool(work)
    pool.add(spec.get("packages", []) + spec.get("data_packages", []) + ["libc6"])
    expanded = set()  # packages whose Depends were added
    nbytes = 0
    # Worklist of in-image ELF paths; each resolved with its libraries.
    todo = [e.lstrip("/") for e in spec.get("elf", [])]
    done: set[str] = set()
    # The programs' PT_INTERP is /lib64/ld-linux-x86-64.so.2; a /usr-merged suite (trixie)
    # ships the loader as /usr/lib64/... only, so the tree gets the /lib64 -> usr/lib64 link.
    if pool.find("lib64/ld-linux-x86-64.so.2"):
        todo.append("lib64/ld-linux-x86-64.so.2")
    else:
        todo.append("usr/lib64/ld-linux-x86-64.so.2")
        os.makedirs(out, exist_ok=True)
        if not os.path.lexists(os.path.join(out, "lib64")):
            os.symlink("usr/lib64", os.path.join(out, "lib64"))
    while todo:
        rel = todo.pop()
        if rel in done:
            continue
        hit = pool.find(rel)
        if not hit:
            raise SystemExit(f"debtree: {rel} is in none of the packages {sorted(pool.pkgs)}")
        owner, root = hit
        done.add(rel)
        nbytes += copy_in(root, rel, out)
        info = elf_info(resolve_in(root, rel))
        if not info:
            continue
        needed, rdirs = info
        rdirs = [os.path.relpath(d, root) if d.startswith(root) else d for d in rdirs]
        for so in needed:
            found = pool.soname(so, rdirs)
            frontier = [owner]
            while not found:
                # Pull in the owner's direct dependencies, then theirs, ... (breadth first).
                deps = []
                for p in frontier:
                    if p not in expanded:
                        expanded.add(p)
                        deps += depends(p)
                pool.add(deps)
                found = pool.soname(so, rdirs)
                frontier = [p for p in pool.pkgs if p not in expanded]
                if not found and not frontier:
                    raise SystemExit(f"debtree: {so} (needed by /{rel}) not found in {sorted(pool.pkgs)}")
            todo.append(found[2])
    for d in spec.get("data", []):
        # From every package that has it (/etc/fonts: fontconfig-config and the fonts).
        roots = [r for r in pool.pkgs.values() if os.path.lexists(os.path.join(r, d.lstrip("/")))]
        if not roots:
            raise SystemExit(f"debtree: data {d} is in none of the packages")
        for r in roots:
            nbytes += copy_in(r, d.lstrip("/"), out)
    with open(os.path.join(os.path.dirname(os.path.abspath(out)), "packages"), "w") as f:
        for p in sorted(pool.pkgs):
            f.write(f"{p} {os.path.basename(pool.debs[p])}\n")
    print(f"packages={len(pool.pkgs)} files={len(done)} bytes={nbytes}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
