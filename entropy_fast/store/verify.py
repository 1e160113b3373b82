"""Verifying committed files against the sizes and sha256 recorded at commit, cheaply.

Readers (`ProfileStore`) call `damaged_runs` at open. A file is hashed once: its (size,
mtime) when it verified is remembered in STORE/.verified.json, and later opens only stat
it, so reading a store costs one hash pass over new parts, not over the store. A file that
changes through the filesystem changes its mtime and is hashed again; damage that leaves
size and mtime alone (bit rot) is what `entropy-fast check`, which hashes everything,
is for.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from entropy_fast.store.layout import Store, write_json_atomic

CACHE = ".verified.json"


def sha256_file(path: Path) -> str:
    """sha256 (hex) of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_problem(store: Store, entry: Any, relative: str, *, always_hash: bool = False,
                 seen: dict[str, list[int]] | None = None) -> str | None:
    """What is wrong with a committed file (missing, other size, other sha256), or None.

    `seen` maps files already verified to [size, mtime_ns]; a match skips the hash unless
    `always_hash`. A file that verifies is added to `seen`.
    """
    path = store.root / relative
    try:
        stat = path.stat()
    except FileNotFoundError:
        return "committed in the manifest but missing"
    size = (entry.sizes or {}).get(relative)
    if size is not None and stat.st_size != size:
        return f"damaged: {stat.st_size} bytes, {size} at commit"
    expected = (entry.checksums or {}).get(relative)
    stamp = [stat.st_size, stat.st_mtime_ns]
    if expected is None or (not always_hash and seen is not None
                            and seen.get(relative) == stamp):
        return None
    if sha256_file(path) != expected:
        return "damaged: its sha256 differs from the one recorded at commit"
    if seen is not None:
        seen[relative] = stamp
    return None


def damaged_runs(store: Store, entries: Sequence[Any]) -> dict[str, list[str]]:
    """{run id: damaged files} over the committed files of `entries` (see module doc)."""
    cache = store.root / CACHE
    seen: dict[str, list[int]] = {}
    with contextlib.suppress(OSError, ValueError):
        seen = json.loads(cache.read_text())
    known = dict(seen)
    damaged: dict[str, list[str]] = defaultdict(list)
    for entry in entries:
        for relative in entry.files:
            problem = file_problem(store, entry, relative, seen=seen)
            if problem is not None:
                damaged[entry.run_id].append(f"{relative}: {problem}")
                seen.pop(relative, None)
    if seen != known:
        with contextlib.suppress(OSError):  # a read-only store: verify again next time
            write_json_atomic(cache, seen)
    return dict(damaged)
