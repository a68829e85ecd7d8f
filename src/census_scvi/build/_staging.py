"""Staging: every build writes into a sibling of ``OUT_URI`` and replaces it only on success.

A failure mid-append therefore leaves the existing census exactly as it was. When appending, the
staging census starts as a clone of the existing one in which TileDB fragment files (immutable once
written: TileDB never modifies a committed fragment, it only adds new ones) are hard links and every
other file (schemas, metadata, commit markers, group membership) is copied, so staging costs little
disk and time even for a large census.

One writer per census: a build holds ``.<name>.census-scvi.lock`` beside the census
(:func:`lock_path`, :func:`census_scvi.rundir.hold_lock`), so a second build of the same census
fails at once naming the holder. A build killed with ``kill -9`` leaves its census-sized
``.<name>.staging-PID`` (or, killed mid-swap, ``.<name>.old-PID``); the next build of that census,
holding the lock, removes those whose PID is dead (:func:`clean_stale`).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

from census_scvi.constants import RUN_LOCK
from census_scvi.errors import CensusScviError
from census_scvi.rundir import pid_alive, tree_bytes
from census_scvi.soma._writer import create_census_root, open_collection

__all__ = [
    "clean_stale",
    "clone_census",
    "create_staging_root",
    "lock_path",
    "remove",
    "staging_path",
    "swap_into_place",
]

logger = logging.getLogger(__name__)


def lock_path(out: Path) -> Path:
    """The lock file of the census at ``out``: beside it (the census folder itself is replaced)."""
    return out.with_name(f".{out.name}{RUN_LOCK}")


def clean_stale(out: Path) -> tuple[int, int]:
    """Remove this census's staging/old folders left by dead builds; ``(count, bytes freed)``.

    Only ``.<name>.staging-PID`` and ``.<name>.old-PID`` beside ``out`` (the names this module
    writes, which :func:`census_scvi.rundir.clean_stale_temporaries` also recognises) whose PID is
    not a live process; call it holding the census's lock. Other censuses' temporaries in the same
    folder are left alone: their builds may run on another host.
    """
    from census_scvi.rundir import remove_within

    pattern = re.compile(rf"^\.{re.escape(out.name)}\.(?:staging|old)-(\d+)$")
    if not out.parent.is_dir():
        return 0, 0
    count = freed = 0
    names = []
    for p in sorted(out.parent.iterdir()):
        m = pattern.match(p.name)
        if m is None or int(m.group(1)) == os.getpid() or pid_alive(int(m.group(1))):
            continue
        freed += tree_bytes(p)
        remove_within(p, out.parent)
        count += 1
        names.append(p.name)
    if count:
        logger.warning(
            "removed %d folder(s) left by killed builds of %s (%.1f MiB freed): %s",
            count,
            out.name,
            freed / 2**20,
            ", ".join(names),
        )
    return count, freed


def staging_path(out: Path, tag: str) -> Path:
    """A sibling of ``out`` (same file system, so the final rename is cheap)."""
    return out.with_name(f".{out.name}.{tag}-{os.getpid()}")


def remove(path: Path) -> None:
    """Delete a file or folder if present."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def create_staging_root(path: Path) -> None:
    """An empty census at ``path`` (whatever was there removed) for a new build."""
    remove(path)
    create_census_root(path, created_by="census-scvi build-census")


def clone_census(src: Path, dst: Path) -> None:
    """Copy the census at ``src`` to ``dst``: fragment files hard-linked, everything else copied.

    Falls back to copying a file when a hard link is impossible (another file system).
    """

    def link_or_copy(s: str, d: str) -> object:
        if "__fragments" in Path(s).parts:
            try:
                os.link(s, d)
                return d
            except OSError:
                pass
        return shutil.copy2(s, d)

    remove(dst)
    shutil.copytree(src, dst, copy_function=link_or_copy, symlinks=True)
    _check_self_contained(dst)


def _check_self_contained(root: Path) -> None:
    """Every member of the cloned census must resolve inside the clone (relative member URIs)."""
    import tiledbsoma as soma

    base = str(root.resolve())

    def walk(coll: Any, where: str) -> None:
        for key in coll:
            child = coll[key]
            if not str(Path(child.uri.removeprefix("file://")).resolve()).startswith(base):
                msg = (
                    f"census member '{where}{key}' is stored by absolute URI ({child.uri}), so "
                    "the census cannot be staged safely for --append"
                )
                raise CensusScviError(msg, hint="build a new census with build-census instead")
            if isinstance(child, soma.Collection | soma.Experiment | soma.Measurement):
                walk(child, f"{where}{key}/")

    with open_collection(root) as census:
        walk(census, "")


def swap_into_place(staging: Path, out: Path) -> None:
    """Rename ``staging`` onto ``out``; the previous ``out`` is kept until the rename succeeded."""
    if not out.exists():
        staging.replace(out)
        return
    old = staging_path(out, "old")
    remove(old)
    out.replace(old)
    try:
        staging.replace(out)
    except BaseException:
        old.replace(out)
        raise
    shutil.rmtree(old, ignore_errors=True)
