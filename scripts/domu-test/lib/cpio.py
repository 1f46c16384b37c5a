"""Minimal newc (SVR4) cpio writer for the per-run overlay archives (files owned by root)."""

import os
import stat


def _entry(out: bytearray, name: str, mode: int, data: bytes, ino: int) -> None:
    nameb = name.encode() + b"\0"
    hdr = "070701" + "".join(f"{v:08x}" for v in (
        ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(nameb), 0))
    out += hdr.encode() + nameb
    out += b"\0" * (-len(out) % 4)
    out += data
    out += b"\0" * (-len(out) % 4)


def write_newc(path: str, files: dict[str, tuple[int, bytes]]) -> None:
    """files: archive path (no leading /) -> (permission bits, content). Parent
    directories are added automatically (mode 0755)."""
    out = bytearray()
    ino = 1
    dirs: set[str] = set()
    for name in sorted(files):
        parts = name.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            d = "/".join(parts[:i])
            if d not in dirs:
                dirs.add(d)
                _entry(out, d, stat.S_IFDIR | 0o755, b"", ino)
                ino += 1
        perm, data = files[name]
        # A full mode (file type bits set, e.g. a symlink from reroot_newc) is kept.
        _entry(out, name, perm if perm & 0o170000 else stat.S_IFREG | perm, data, ino)
        ino += 1
    _entry(out, "TRAILER!!!", 0, b"", 0)
    out += b"\0" * (-len(out) % 512)
    with open(path + ".tmp", "wb") as f:
        f.write(out)
    os.replace(path + ".tmp", path)


def reroot_newc(src: bytes, prefix: str) -> dict[str, tuple[int, bytes]]:
    """The regular files and symlinks of an uncompressed newc archive, renamed under
    `prefix` (e.g. "inject/opt/weston"), as write_newc's `files` plus a symlink table:
    returns {name: (mode, data)} where mode keeps the file type bits (S_IFLNK for links)."""
    out: dict[str, tuple[int, bytes]] = {}
    pos = 0
    while True:
        hdr = src[pos:pos + 110]
        if hdr[:6] != b"070701":
            raise ValueError(f"not a newc archive at {pos}")
        f = [int(hdr[6 + 8 * i:14 + 8 * i], 16) for i in range(13)]
        mode, size, namesize = f[1], f[6], f[11]
        name = src[pos + 110:pos + 110 + namesize - 1].decode()
        pos += 110 + namesize
        pos += -pos % 4
        data = src[pos:pos + size]
        pos += size
        pos += -pos % 4
        if name == "TRAILER!!!":
            return out
        if stat.S_ISREG(mode) or stat.S_ISLNK(mode):
            out[f"{prefix}/{name.lstrip('./')}"] = (mode, data)
