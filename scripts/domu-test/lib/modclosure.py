#!/usr/bin/env python3
"""Resolve kernel modules and their dependencies from modules.dep.

usage: modclosure.py MODDIR NAME... -> prints module paths (relative to MODDIR),
one per line, in a valid load order (dependencies first). Names may use - or _.
A name not found is an error (exit 1), so a missing driver fails loudly.
"""
import os
import sys


def main() -> int:
    moddir, names = sys.argv[1], sys.argv[2:]
    deps: dict[str, list[str]] = {}
    by_name: dict[str, str] = {}
    with open(os.path.join(moddir, "modules.dep")) as f:
        for line in f:
            path, _, rest = line.partition(":")
            deps[path] = rest.split()
            base = os.path.basename(path).split(".ko")[0].replace("-", "_")
            by_name[base] = path
    order: list[str] = []
    seen: set[str] = set()

    def visit(path: str) -> None:
        if path in seen:
            return
        seen.add(path)
        for d in deps.get(path, []):
            visit(d)
        order.append(path)

    missing = []
    for n in names:
        p = by_name.get(n.replace("-", "_"))
        if p is None:
            missing.append(n)
        else:
            visit(p)
    if missing:
        print("modclosure: modules not found: " + " ".join(missing), file=sys.stderr)
        return 1
    print("\n".join(order))
    return 0


if __name__ == "__main__":
    sys.exit(main())
