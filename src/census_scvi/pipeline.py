"""The whole pipeline: prepare -> train -> embed -> evaluate, skipping stages already done.

Each stage decides by itself whether its ``manifest.json`` matches its config and inputs (then it
returns a "skipped" result at once), so a rerun after a crash or a config change redoes exactly
the stages whose inputs changed: a new model changes embed's inputs, a new embedding evaluate's.
``evaluate`` runs when its optional dependency (scib-metrics, the ``eval`` extra) is installed;
otherwise ``run`` skips it with one line naming the install command.

With ``embed.index: true``, ``run`` and ``census-scvi embed`` (:func:`run_embed_and_index`) build
the nearest-cell index (``census-scvi index``, the ``search`` section's settings) right after a
complete embedding: here rather than in ``embed/``, because a stage may not import another. The
index is redone exactly when the embedding changed (its own manifest decides, as every stage's);
TileDB-Vector-Search, the ``search`` extra, is checked before any stage runs.

Examples
--------
>>> from census_scvi.config import load_config
>>> from census_scvi.pipeline import run_pipeline
>>> result = run_pipeline(load_config(None), run_dir="census-scvi-runs/demo")  # doctest: +SKIP
>>> print(result.summary())  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from census_scvi.constants import (
    CONFIG_FILE,
    EMBED_DIR,
    EVALUATE_DIR,
    LATENT_FILE,
    REPORT_FILE,
    RUN_LOCK,
    STAGES,
    TRAIN_DIR,
)
from census_scvi.errors import CensusScviError
from census_scvi.rundir import hold_lock, is_global_zero, write_run_config

if TYPE_CHECKING:
    from census_scvi.config import Config

__all__ = [
    "EmbedAndIndexResult",
    "PipelineResult",
    "StageRun",
    "index_after_embed",
    "run_embed_and_index",
    "run_pipeline",
    "stage_range",
]

logger = logging.getLogger(__name__)


@dataclass
class StageRun:
    """One stage's result within a pipeline run."""

    stage: str
    result: Any
    seconds: float

    @property
    def skipped(self) -> bool:
        return bool(getattr(self.result, "skipped", False))


@dataclass
class PipelineResult:
    """What ``run_pipeline`` did: the stages run (or skipped) in order."""

    run_dir: Path
    stages: list[StageRun] = field(default_factory=list)
    seconds: float = 0.0
    unavailable: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """Where the outputs are and each stage's key figures."""
        ran = [s.stage for s in self.stages if not s.skipped]
        skipped = [s.stage for s in self.stages if s.skipped]
        head = f"census-scvi run: {len(ran)} stage(s) run"
        if skipped:
            head += f", {len(skipped)} up to date ({', '.join(skipped)})"
        lines = [f"{head} in {self.seconds:.1f} s", f"run directory: {self.run_dir.resolve()}"]
        for s in self.stages:
            text = s.result.summary() if hasattr(s.result, "summary") else str(s.result)
            timing = "" if s.skipped else f" [{s.seconds:.1f} s]"
            first, *rest = text.splitlines() or [s.stage]
            lines.append(f"  {first}{timing}")
            lines.extend(f"  {line}" for line in rest)
        for stage in self.unavailable:
            lines.append(
                f"  {stage}: skipped, scib-metrics is not installed "
                "(pip install 'census-scvi[eval]')"
            )
        key_files = [
            self.run_dir / CONFIG_FILE,
            self.run_dir / TRAIN_DIR,
            self.run_dir / EMBED_DIR / LATENT_FILE,
            self.run_dir / EVALUATE_DIR / REPORT_FILE,
        ]
        present = [str(p) for p in key_files if p.exists()]
        if present:
            lines.append("outputs: " + ", ".join(present))
        return "\n".join(lines)


#: The optional dependency each optional stage needs (the ``eval`` extra installs it).
_OPTIONAL = {"evaluate": "scib_metrics"}


def _available(stage: str) -> bool:
    need = _OPTIONAL.get(stage)
    return need is None or importlib.util.find_spec(need) is not None


def stage_range(
    from_stage: str | None, to_stage: str | None, *, available: Callable[[str], bool] = _available
) -> tuple[list[str], list[str]]:
    """The stages to run, in order, and the optional ones left out as not installed.

    Parameters
    ----------
    from_stage, to_stage
        First and last stage (``prepare``, ``train``, ``embed``, ``evaluate``); None for the ends.
    available
        Whether a stage's module can be imported (only ``evaluate`` is optional).

    Returns
    -------
    ``(stages, unavailable)``.
    """
    names = {}
    for flag, value in (("--from", from_stage), ("--to", to_stage)):
        if value is None:
            continue
        name = value.strip().lower()
        if name not in STAGES:
            msg = f"{flag} '{value}' is not a stage; valid stages: {', '.join(STAGES)}"
            raise CensusScviError(msg)
        names[flag] = name
    first = STAGES.index(names.get("--from", STAGES[0]))
    last = STAGES.index(names.get("--to", STAGES[-1]))
    if first > last:
        msg = f"--from {names['--from']} comes after --to {names['--to']}"
        raise CensusScviError(msg, hint=f"stages run in this order: {' -> '.join(STAGES)}")
    stages = list(STAGES[first : last + 1])
    unavailable = []
    if "evaluate" in stages and not available("evaluate"):
        if names.get("--to") == "evaluate" or names.get("--from") == "evaluate":
            msg = "the evaluate stage needs scib-metrics, which is not installed"
            raise CensusScviError(msg, hint="pip install 'census-scvi[eval]'")
        stages.remove("evaluate")
        unavailable.append("evaluate")
    return stages, unavailable


def _run_stage(stage: str, config: Config, run_dir: Path, force: bool) -> Any:
    if stage == "prepare":
        from census_scvi.prepare import run_prepare

        return run_prepare(config, run_dir=run_dir, force=force)
    if stage == "train":
        from census_scvi.train import run_train

        # an interrupted run of the same config continues from its checkpoint by itself
        return run_train(config, run_dir=run_dir, force=force)
    if stage == "embed":
        from census_scvi.embed import run_embed

        return run_embed(config, run_dir=run_dir, force=force)
    if stage == "evaluate":
        from census_scvi.evaluate import run_evaluate

        return run_evaluate(config, run_dir=run_dir, force=force)
    msg = f"unknown stage {stage!r}"  # pragma: no cover - stage_range validated it
    raise CensusScviError(msg)


def _check_index_extra(config: Config) -> None:
    """With ``embed.index: true``, refuse before any work when the ``search`` extra is missing."""
    if config.embed.index:
        from census_scvi.knn import vector_search

        vector_search()


def index_after_embed(
    config: Config, run_dir: str | os.PathLike[str], embed_result: Any
) -> Any | None:
    """With ``embed.index: true``, build (or find current) the index once embed is complete.

    Returns the ``IndexResult``, or None when the index is off, the embedding is not complete yet
    (a shard of several) or this process is not rank 0.
    """
    if not config.embed.index or not getattr(embed_result, "complete", False):
        return None
    if not is_global_zero():
        return None
    from census_scvi.search import run_index

    return run_index(config, run_dir=run_dir)


@dataclass
class EmbedAndIndexResult:
    """``census-scvi embed`` with ``embed.index: true``: the embedding, then its index."""

    embed: Any
    index: Any

    @property
    def skipped(self) -> bool:
        return bool(getattr(self.embed, "skipped", False) and getattr(self.index, "skipped", False))

    def summary(self) -> str:
        return f"{self.embed.summary()}\n{self.index.summary()}"


def run_embed_and_index(
    config: Config,
    *,
    run_dir: str | os.PathLike[str],
    force: bool = False,
    shard: tuple[int, int] | None = None,
    merge: bool = False,
) -> Any:
    """``census-scvi embed``: ``run_embed``, then the index when ``embed.index`` is true.

    Returns the ``EmbedResult`` alone when no index was built, else an
    :class:`EmbedAndIndexResult`.
    """
    from census_scvi.embed import run_embed

    _check_index_extra(config)
    result = run_embed(config, run_dir=run_dir, force=force, shard=shard, merge=merge)
    index = index_after_embed(config, run_dir, result)
    return result if index is None else EmbedAndIndexResult(result, index)


def run_pipeline(
    config: Config,
    *,
    run_dir: str | os.PathLike[str],
    from_stage: str | None = None,
    to_stage: str | None = None,
    force: bool = False,
) -> PipelineResult:
    """Run the stages from ``from_stage`` to ``to_stage`` in order.

    Parameters
    ----------
    config
        The resolved config (``census-scvi run`` without ``-c`` uses the demo config, whose mini
        census is built in the cache on first use).
    run_dir
        The run directory (``config.yaml``, ``prepare/``, ``train/``, ``embed/``,
        ``evaluate/``).
    from_stage, to_stage
        First and last stage to run (default: all of ``prepare, train, embed, evaluate``).
        Stages before ``from_stage`` must be finished already.
    force
        Redo the selected stages even when their manifests match.

    Returns
    -------
    A :class:`PipelineResult` (``.summary()`` lists outputs and key figures).
    """
    from census_scvi.config import dump_config

    stages, unavailable = stage_range(from_stage, to_stage)
    if "TORCHELASTIC_RUN_ID" in os.environ:
        msg = "census-scvi run cannot itself be started by torchrun (every rank would prepare)"
        raise CensusScviError(
            msg, hint="run 'census-scvi prepare' once, then torchrun the train and embed commands"
        )
    worker = not is_global_zero()
    if worker and "train" in stages:
        # a process Lightning's DDP launcher started re-runs this command: it joins training
        # (prepare is already done, so skipped) and stops; rank 0 goes on with embed/evaluate
        stages = stages[: stages.index("train") + 1]
    if "embed" in stages and not worker:
        _check_index_extra(config)
    run_dir = Path(run_dir)
    if not worker:
        write_run_config(run_dir, dump_config(config))
    result = PipelineResult(run_dir=run_dir, unavailable=unavailable)
    t0 = time.perf_counter()
    with contextlib.ExitStack() as stack:
        if not worker:  # one 'census-scvi run' per run directory; DDP worker ranks join rank 0's
            stack.enter_context(hold_lock(run_dir / RUN_LOCK, what=f"run directory {run_dir}"))
        for stage in stages:
            logger.info("census-scvi run: %s", stage)
            t = time.perf_counter()
            stage_result = _run_stage(stage, config, run_dir, force)
            result.stages.append(StageRun(stage, stage_result, time.perf_counter() - t))
            if stage == "embed" and config.embed.index:
                t = time.perf_counter()
                index = index_after_embed(config, run_dir, stage_result)
                if index is not None:
                    result.stages.append(StageRun("index", index, time.perf_counter() - t))
    result.seconds = time.perf_counter() - t0
    return result
