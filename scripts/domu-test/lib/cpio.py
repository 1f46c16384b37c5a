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
        _entry(out, name, stat.S_IFREG | perm, data, ino)
        ino += 1
    _entry(out, "TRAILER!!!", 0, b"", 0)
    out += b"\0" * (-len(out) % 512)
    with open(path + ".tmp", "wb") as f:
        f.write(out)
    os.replace(path + ".tmp", path)
