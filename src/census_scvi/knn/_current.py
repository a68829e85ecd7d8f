"""Whether a run's nearest-cell index is there and current for the run's embedding.

``census-scvi index`` records, in ``RUN_DIR/index/manifest.json``'s inputs, the identity of the
embedding it indexed (:func:`embedding_identity`: the finished embed manifest and the latent
files' sizes and modification times). An index is current when that identity is today's:
``neighbors`` refuses any other, ``map`` falls back to exact search.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from census_scvi.constants import (
    EMBED_DIR,
    INDEX_DIR,
    INDEX_NAME,
    LATENT_FILE,
    LATENT_IDX_FILE,
)
from census_scvi.errors import CensusScviError
from census_scvi.rundir import read_manifest

__all__ = ["IndexStatus", "embedding_identity", "index_status"]


def embedding_identity(run_dir: str | Path) -> str:
    """What the index is built from: the finished embed manifest and the latent files' stats."""
    embed_dir = Path(run_dir) / EMBED_DIR
    manifest = read_manifest(embed_dir)
    if manifest is None:
        msg = f"the embedding in {embed_dir} is not finished (no manifest.json)"
        raise CensusScviError(msg, hint="run 'census-scvi embed' (or 'census-scvi run') first")
    parts = [
        str(manifest.get("config_hash")),
        json.dumps(manifest.get("inputs"), sort_keys=True),
        str(manifest.get("finished")),
    ]
    for name in (LATENT_FILE, LATENT_IDX_FILE):
        st = (embed_dir / name).stat()
        parts.append(f"{name}:{st.st_size}:{st.st_mtime_ns}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class IndexStatus:
    """The run's index: where it is, its build figures, and why it cannot be used (if so)."""

    path: Path
    problem: Literal["missing", "stale"] | None
    figures: dict[str, Any] = field(default_factory=dict)

    @property
    def current(self) -> bool:
        return self.problem is None

    @property
    def nprobe(self) -> int:
        """The nprobe calibrated at build time to reach the recall target (1 if unrecorded)."""
        return int(self.figures.get("nprobe") or 1)

    def reason(self) -> str:
        """One phrase: why the index cannot be used (empty when it can)."""
        if self.problem == "missing":
            return f"no finished index in {self.path.parent}"
        if self.problem == "stale":
            return (
                f"the index in {self.path.parent} was built from an earlier embedding of this run"
            )
        return ""


def index_status(run_dir: str | Path) -> IndexStatus:
    """The state of ``RUN_DIR/index/ivf_flat``: missing, stale (another embedding) or current.

    Raises
    ------
    CensusScviError
        When the run's embedding is not finished.
    """
    sdir = Path(run_dir) / INDEX_DIR
    path = sdir / INDEX_NAME
    manifest = read_manifest(sdir)
    if manifest is None or not path.exists():
        return IndexStatus(path, "missing")
    figures = dict(manifest.get("figures") or {})
    if (manifest.get("inputs") or {}).get("embedding") != embedding_identity(run_dir):
        return IndexStatus(path, "stale", figures)
    return IndexStatus(path, None, figures)
