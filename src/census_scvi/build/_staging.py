"""Staging: every build writes into a sibling of ``OUT_URI`` and replaces it only on success.

A failure mid-append therefore leaves the existing census exactly as it was. When appending, the
staging census starts as a clone of the existing one in which TileDB fragment files (immutable once
written: TileDB never modifies a committed fragment, it only adds new ones) are hard links and every
other file (schemas, metadata, commit markers, group membership) is copied, so staging costs little
disk and time even for a large census.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from census_scvi.errors import CensusScviError
from census_scvi.soma._writer import create_census_root, open_collection

__all__ = ["clone_census", "create_staging_root", "remove", "staging_path", "swap_into_place"]


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
