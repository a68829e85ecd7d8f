"""Run-directory plumbing: atomic writes, manifests, skip/force decisions.

Every artifact is written under a temporary name in the same folder and renamed when complete,
so a reader never sees a half-written file; a stage is finished when its ``manifest.json`` exists.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from census_scvi.constants import CONFIG_FILE, MANIFEST_FILE
from census_scvi.errors import CensusScviError

__all__ = [
    "Manifest",
    "StageTimer",
    "atomic_path",
    "file_hash",
    "package_versions",
    "peak_rss_bytes",
    "read_manifest",
    "stage_dir",
    "write_json_atomic",
    "write_manifest",
    "write_run_config",
]

logger = logging.getLogger(__name__)

_VERSIONED = (
    "census-scvi",
    "scvi-tools",
    "torch",
    "lightning",
    "tiledbsoma",
    "tiledbsoma-ml",
    "cellxgene-census",
    "anndata",
    "scanpy",
    "numpy",
)


def package_versions() -> dict[str, str]:
    """Versions of the packages that decide a run's results."""
    out = {}
    for name in _VERSIONED:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (Linux/macOS)."""
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path next to ``final``; rename it onto ``final`` when the block succeeds.

    Works for files and folders. On error the temporary is removed and ``final`` is untouched.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    _remove(tmp)
    try:
        yield tmp
    except BaseException:
        _remove(tmp)
        raise
    _remove(final)
    tmp.replace(final)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def write_json_atomic(path: str | os.PathLike[str], data: Any) -> None:
    """Write JSON under a temporary name, then rename."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


def file_hash(path: str | os.PathLike[str], *, max_bytes: int | None = None) -> str:
    """sha256 of a file, or of a folder's file names, sizes and mtimes (cheap for big trees)."""
    path = Path(path)
    h = hashlib.sha256()
    if path.is_dir():
        for p in sorted(path.rglob("*")):
            if p.is_file():
                st = p.stat()
                h.update(f"{p.relative_to(path)}:{st.st_size}:{st.st_mtime_ns}\n".encode())
        return h.hexdigest()[:16]
    read = 0
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
            read += len(chunk)
            if max_bytes is not None and read >= max_bytes:
                h.update(str(path.stat().st_size).encode())
                break
    return h.hexdigest()[:16]


def stage_dir(run_dir: str | os.PathLike[str], stage: str) -> Path:
    """``RUN_DIR/<stage>``, created."""
    d = Path(run_dir) / stage
    d.mkdir(parents=True, exist_ok=True)
    return d


def write_run_config(run_dir: str | os.PathLike[str], config_yaml: str) -> None:
    """Write the resolved config into the run directory."""
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    with atomic_path(Path(run_dir) / CONFIG_FILE) as tmp:
        tmp.write_text(config_yaml)


@dataclass
class Manifest:
    """What a finished stage records (``<stage>/manifest.json``)."""

    stage: str
    config_hash: str
    inputs: dict[str, str] = field(default_factory=dict)
    census: dict[str, Any] = field(default_factory=dict)
    figures: dict[str, Any] = field(default_factory=dict)
    outputs: dict[str, str] = field(default_factory=dict)
    started: str = ""
    finished: str = ""
    versions: dict[str, str] = field(default_factory=package_versions)

    def to_dict(self) -> dict[str, Any]:
        return {
            "stage": self.stage,
            "started": self.started,
            "finished": self.finished,
            "config_hash": self.config_hash,
            "inputs": self.inputs,
            "census": self.census,
            "figures": self.figures,
            "outputs": self.outputs,
            "versions": self.versions,
        }

    def matches(self, other: Mapping[str, Any] | None) -> bool:
        """Same stage, config and inputs as a manifest read from disk."""
        if not other:
            return False
        return (
            other.get("stage") == self.stage
            and other.get("config_hash") == self.config_hash
            and other.get("inputs") == self.inputs
        )


def read_manifest(directory: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The manifest in ``directory``, or None when the stage has not finished."""
    p = Path(directory) / MANIFEST_FILE
    if not p.is_file():
        return None
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError:
        logger.warning("ignoring unreadable manifest %s", p)
        return None


def write_manifest(directory: str | os.PathLike[str], manifest: Manifest) -> Path:
    """Write ``manifest.json`` last: its presence marks the stage finished."""
    if not manifest.finished:
        manifest.finished = _now()
    p = Path(directory) / MANIFEST_FILE
    write_json_atomic(p, manifest.to_dict())
    return p


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


class StageTimer:
    """Wall time of a stage, with ISO start/end stamps."""

    def __init__(self) -> None:
        self.started = _now()
        self._t0 = time.perf_counter()

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self._t0


def refuse_overwrite(path: Path, *, force: bool, what: str) -> None:
    """Refuse to overwrite a finished artifact unless ``force``."""
    if path.exists() and not force:
        msg = f"{what} already exists at {path}"
        raise CensusScviError(msg, hint="pass --force to overwrite it")
