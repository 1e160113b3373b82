"""Verifying committed files against the sizes and sha256 recorded at commit, cheaply.

Readers (`ProfileStore`) call `damaged_runs` at open. A file is hashed once: its (size,
mtime) when it verified is remembered in STORE/.verified.json, and later opens only stat
it, so reading a store costs one hash pass over new parts, not over the store. A file that
changes through the filesystem changes its mtime and is hashed again; damage that leaves
size and mtime alone (bit rot) is what `entropy-fast check`, which hashes everything,
is for. `report_damage` says which runs are left out, in one line on the `entropy_fast`
logger.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import shlex
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from entropy_fast.store.layout import Store, write_json_atomic

CACHE = ".verified.json"
log = logging.getLogger("entropy_fast")


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


def report_damage(store: Store, entries: Sequence[Any]) -> dict[str, list[str]]:
    """`damaged_runs`, and one WARNING line on the `entropy_fast` logger naming the runs
    left out and the command that repairs them: the CLI prints it as it prints every
    message, and a Python caller without logging set up still sees it on stderr (logging's
    last-resort handler), without a warnings.warn source line under it."""
    damaged = damaged_runs(store, entries)
    if damaged:
        models = {e.run_id: e.model for e in entries}
        runs = ", ".join(f"{run} ({models[run]})" for run in sorted(damaged))
        log.warning("%s: runs left out of every query, for missing or damaged files: %s; "
                    "run `entropy-fast check --repair %s` to set the damage aside (the "
                    "same profile command then recomputes it)", store.root, runs,
                    shlex.quote(str(store.root)))
    return damaged
