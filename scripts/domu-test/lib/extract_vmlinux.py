#!/usr/bin/env python3
"""Write the uncompressed vmlinux ELF contained in an XZ-compressed bzImage.

usage: extract_vmlinux.py VMLINUZ OUT
(Xen and QEMU load the ELF directly; decompressing XZ under TCG costs seconds.)
"""
import lzma
import sys

data = open(sys.argv[1], "rb").read()
pos = data.find(b"\xfd7zXZ\x00")
while pos >= 0:
    try:
        d = lzma.LZMADecompressor(format=lzma.FORMAT_XZ)
        out = d.decompress(data[pos:])
        if out[:4] == b"\x7fELF":
            open(sys.argv[2], "wb").write(out)
            sys.exit(0)
    except lzma.LZMAError:
        pass
    pos = data.find(b"\xfd7zXZ\x00", pos + 1)
sys.exit("extract_vmlinux: no XZ-compressed ELF found in " + sys.argv[1])
