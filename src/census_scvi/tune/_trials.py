"""One trial: a run directory sharing the tune's prepare, the pipeline from train on, its scores.

Every trial of a tune uses the same cells and genes (the space has no ``census``/``hvg``/
``anndata`` keys), so prepare runs once, in ``RUN_DIR/prepare``, and each trial folder
``RUN_DIR/tune/trial-NNN/`` gets ``prepare`` as a relative symbolic link to it: no bytes copied,
nothing to keep in sync, and the trial runs ``run_pipeline(from_stage="train")``, so it only
reads through the link (hard links would need a copy across file systems and one link per file).

A trial's config is the base config with the trial's params, plus bookkeeping that changes no
score: ``embed.write_soma`` and ``embed.write_minified_model`` off (the scores read
``embed/latent.npy``), and ``evaluate.batch_keys`` empty (the aggregate Total is computed on the
batch label alone; the other batch parts only add their own tables, at ~30 s of scib each).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from census_scvi.constants import EVALUATE_DIR, METRICS_FILE, PREPARE_DIR, TRAIN_DIR
from census_scvi.rundir import read_manifest
from census_scvi.tune._space import apply_params

if TYPE_CHECKING:
    from census_scvi.config import Config

__all__ = ["METRICS", "Score", "run_trial", "trial_config", "trial_dir"]

logger = logging.getLogger(__name__)

#: ``--metric`` -> (Score field, Optuna direction).
METRICS = {
    "total": ("total", "maximize"),
    "bio": ("bio", "maximize"),
    "batch": ("batch", "maximize"),
    "elbo": ("elbo", "minimize"),
}
#: The embedding name evaluate's metrics.json uses for the model's latent.
_SCVI = "scVI"


@dataclass
class Score:
    """What one run of a trial scored (None where not measured)."""

    status: str = "ok"
    total: float | None = None
    bio: float | None = None
    batch: float | None = None
    elbo: float | None = None
    celltype_knn: float | None = None
    batch_knn: float | None = None
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def value(self, metric: str) -> float | None:
        """The score ``--metric`` ranks by."""
        return getattr(self, METRICS[metric][0])

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Score:
        names = cls.__dataclass_fields__
        return cls(**{k: v for k, v in data.items() if k in names})


def trial_dir(tune_dir: Path, label: int, seed: int | None = None) -> Path:
    """``tune/trial-007`` (the sampled run) or ``tune/trial-007-seed1`` (a finalist's rerun)."""
    name = f"trial-{label:03d}" + (f"-seed{seed}" if seed is not None else "")
    return tune_dir / name


def trial_config(base: Config, params: Mapping[str, Any], run_dir: Path, *, seed: int) -> Config:
    """The config a trial runs: ``base`` + ``params`` + the bookkeeping in the module docstring."""
    return apply_params(
        base,
        params,
        train__seed=seed,
        embed__write_soma=False,
        embed__write_minified_model=False,
        evaluate__batch_keys=[],
        output__run_dir=str(run_dir),
    )


def link_prepare(run_dir: Path, tdir: Path) -> None:
    """``tdir/prepare`` -> ``run_dir/prepare`` (a relative symbolic link), made once."""
    tdir.mkdir(parents=True, exist_ok=True)
    link = tdir / PREPARE_DIR
    target = os.path.relpath(run_dir / PREPARE_DIR, tdir)
    if link.is_symlink() and str(link.readlink()) == target:
        return
    if link.is_symlink():
        link.unlink()
    link.symlink_to(target, target_is_directory=True)


def run_trial(config: Config, *, run_dir: Path, tdir: Path, metric: str) -> Score:
    """Run the pipeline from train on in ``tdir`` and read its scores; failures become a status.

    A killed run leaves its folder as it was: the next call continues it (training from its last
    checkpoint; finished stages are skipped by their manifests).
    """
    from census_scvi.pipeline import run_pipeline

    link_prepare(run_dir, tdir)
    last = "train" if metric == "elbo" else "evaluate"
    t0 = time.perf_counter()
    try:
        run_pipeline(config, run_dir=tdir, from_stage="train", to_stage=last)
    except Exception as e:  # a failed trial is a result; the tune goes on
        text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        logger.warning("tune: %s failed: %s", tdir.name, text)
        logger.debug("tune: %s failed", tdir.name, exc_info=True)
        return Score(status=f"failed: {text}", seconds=time.perf_counter() - t0)
    score = read_scores(tdir, with_evaluate=last == "evaluate")
    score.seconds = round(time.perf_counter() - t0, 1)
    value = score.value(metric)
    if score.ok and (value is None or not math.isfinite(value)):
        score.status = f"failed: {metric} is {value}"
    return score


def read_scores(tdir: Path, *, with_evaluate: bool) -> Score:
    """The scores a finished trial folder holds (train manifest; evaluate's metrics.json)."""
    score = Score()
    train = read_manifest(tdir / TRAIN_DIR) or {}
    final = train.get("figures", {}).get("final", {})
    score.elbo = _number(final.get("elbo_validation"))
    if not with_evaluate:
        return score
    path = tdir / EVALUATE_DIR / METRICS_FILE
    metrics = json.loads(path.read_text()) if path.is_file() else {}
    agg = metrics.get("aggregate", {}).get(_SCVI, {})
    score.total = _number(agg.get("Total"))
    score.bio = _number(agg.get("Bio conservation"))
    score.batch = _number(agg.get("Batch correction"))
    score.celltype_knn = _number(metrics.get("classifier", {}).get(_SCVI, {}).get("knn_accuracy"))
    mixing = metrics.get("batch_classifier", {})
    if mixing:
        first = next(iter(mixing.values()))
        score.batch_knn = _number(first.get(_SCVI, {}).get("knn_accuracy"))
    return score


def _number(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, int | float):
        return None
    return float(v)
