"""Evaluate the embedding: scib-metrics vs an unintegrated PCA baseline, classifiers, UMAP, model card.

``run_evaluate`` reads the embedded cells (``embed/latent.npy``, ``embed/latent-idx.npy``), their
labels from the census obs, draws a stratified sample (``evaluate.sample_size``, stratified by the
label), and scores the scVI latent beside a PCA of log-normalised counts of the model's genes on the
same cells:

- scib-metrics ``Benchmarker`` (bio conservation, batch correction, aggregates) with the batch label
  (``batch``) and each of ``evaluate.batch_keys`` as batch;
- cell-type accuracy of logistic regression and k-NN classifiers (60/40 split), with chance levels;
- batch mixing: k-NN accuracy of predicting each batch key (lower is better), overall and within
  cell type, with chance levels;
- a UMAP of the scVI latent coloured by label and batch parts.

Outputs in ``RUN_DIR/evaluate/``: ``metrics.json``, ``report.md``, ``umap.png``, ``model_card.md``,
``manifest.json`` (written last, by :func:`census_scvi.rundir.run_stage`).

Examples
--------
>>> from census_scvi.config import load_config
>>> from census_scvi.evaluate._stage import run_evaluate
>>> result = run_evaluate(load_config(None), run_dir="census-scvi-runs/demo")  # doctest: +SKIP
>>> print(result.summary())  # doctest: +SKIP
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from census_scvi.constants import (
    BATCH_KEY,
    EMBED_DIR,
    EVALUATE_DIR,
    LATENT_FILE,
    LATENT_IDX_FILE,
    MANIFEST_FILE,
    METRICS_FILE,
    MODEL_CARD_FILE,
    REPORT_FILE,
    UMAP_FILE,
)
from census_scvi.errors import CensusScviError
from census_scvi.evaluate._card import (
    extra_versions,
    model_card_markdown,
    model_facts,
    n_train_cells,
)
from census_scvi.evaluate._classifiers import batch_mixing_accuracy, classifier_accuracy
from census_scvi.evaluate._metrics import (
    benchmark,
    pca_baseline,
    quiet_warnings,
    require_scib_metrics,
    scib_default_metrics,
)
from census_scvi.evaluate._report import AGGREGATES, report_markdown
from census_scvi.evaluate._sample import stratified_sample
from census_scvi.rundir import (
    StageRun,
    atomic_path,
    file_hash,
    load_embedding,
    model_dir,
    package_versions,
    peak_rss_bytes,
    run_stage,
    write_json_atomic,
)
from census_scvi.scvi_model import model_var_names

if TYPE_CHECKING:
    import anndata as ad
    import pandas as pd
    import tiledbsoma as soma

    from census_scvi.config import Config, EvaluateConfig

__all__ = ["EvaluateResult", "run_evaluate"]

logger = logging.getLogger(__name__)

SCVI = "scVI"
PCA = "PCA"
_CONFIG_SECTIONS = ["census", "anndata", "evaluate"]
_OUTPUTS = (METRICS_FILE, REPORT_FILE, UMAP_FILE, MODEL_CARD_FILE)
_KNN_K = 15
#: TileDB read buffers while reading the sample. The sampled cells are scattered over the whole
#: census, so their counts touch nearly every X tile; with TileDB's defaults (1 GiB buffers,
#: 10 GiB memory budget) the reader kept what it decompressed: evaluate peaked at 5.01 GB RSS
#: at 200k census cells, 2.13 GB at 50k (~19 kB per cell; read_counts alone 4.99 / 1.63 GB).
#: Capped: 2.12 / 2.11 GB (the floor is scib-metrics/JAX on the sample), read step 62 s -> 28 s.
_READ_BUFFER_BYTES = 64 * 1024**2


@dataclass
class EvaluateResult:
    """What ``run_evaluate`` did.

    Attributes
    ----------
    run_dir
        The run directory.
    skipped
        True when a finished evaluation matched the config and inputs.
    metrics
        The content of ``evaluate/metrics.json``.
    seconds
        Wall time.
    """

    run_dir: Path
    skipped: bool = False
    metrics: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def report_path(self) -> Path:
        return self.run_dir / EVALUATE_DIR / REPORT_FILE

    def summary(self) -> str:
        head = (
            "evaluate: skipped (already done for this config and embedding)"
            if self.skipped
            else (
                f"evaluate: {self.metrics.get('n_cells_sampled', 0):,} of "
                f"{self.metrics.get('n_cells_embedded', 0):,} embedded cells in {self.seconds:.0f} s"
            )
        )
        lines = [head]
        agg = self.metrics.get("aggregate", {})
        if agg:
            lines.append(f"  {'':6} {'bio conservation':>17} {'batch correction':>17} {'total':>7}")
            for emb, vals in agg.items():
                cells = [
                    f"{vals[k]:.3f}" if k in vals else "n/a"
                    for k in ("Bio conservation", "Batch correction", "Total")
                ]
                lines.append(f"  {emb:6} {cells[0]:>17} {cells[1]:>17} {cells[2]:>7}")
        for emb, vals in self.metrics.get("classifier", {}).items():
            chance = vals.get("chance_majority")
            lines.append(
                f"  {emb}: cell-type accuracy logistic regression "
                f"{vals['logreg_accuracy']:.3f}, k-NN {vals['knn_accuracy']:.3f}"
                + (f" (chance {chance:.3f})" if chance is not None else "")
            )
        for emb, vals in self.metrics.get("batch_classifier", {}).get(BATCH_KEY, {}).items():
            lines.append(
                f"  {emb}: batch k-NN accuracy {vals['knn_accuracy']:.3f} "
                f"(chance {vals['chance_majority']:.3f}; lower is better mixed)"
            )
        lines.append(f"  report: {self.report_path}")
        return "\n".join(lines)


# ------------------------------------------------------------------------------------------
# the stage
# ------------------------------------------------------------------------------------------
def run_evaluate(
    config: Config, *, run_dir: str | os.PathLike[str], force: bool = False
) -> EvaluateResult:
    """Score the embedding in ``run_dir`` and write the evaluation outputs.

    Parameters
    ----------
    config
        The resolved config (``census``, ``anndata``, ``model``, ``evaluate`` are used).
    run_dir
        Run directory with ``train/<model.filename>`` and ``embed/latent*.npy``.
    force
        Redo the evaluation even if a finished one matches.

    Returns
    -------
    :class:`EvaluateResult`; ``metrics`` holds ``metrics.json``.
    """
    require_scib_metrics()  # before any reading: a missing extra fails at once
    t0 = time.perf_counter()
    run_dir = Path(run_dir)
    mpath = model_dir(run_dir, config.model.filename)
    latent, joinids = load_embedding(run_dir)
    with run_stage(
        run_dir,
        EVALUATE_DIR,
        config=config,
        sections=_CONFIG_SECTIONS,
        inputs=_inputs(config, run_dir, mpath),
        force=force,
    ) as run:
        if run.skipped:
            return EvaluateResult(run_dir, skipped=True, metrics=_previous_metrics(run.dir))
        timings: dict[str, float] = {}
        genes = model_var_names(mpath)
        sample = _read_sample(config, joinids, list(genes), timings)
        embeddings = _embeddings(config.evaluate, latent, sample, timings)
        metrics = _scores(config.evaluate, embeddings, sample, timings)
        metrics = {
            "n_cells_embedded": int(joinids.size),
            "n_cells_sampled": int(sample.positions.size),
            "n_genes": len(genes),
            "n_pcs": int(embeddings[PCA].shape[1]),
            **metrics,
            "census": _census_info(config),
        }
        _pictures(config.evaluate, embeddings[SCVI], sample, run.dir, timings)
        metrics["seconds"] = {k: round(v, 2) for k, v in timings.items()}
        _write_reports(config, run_dir, mpath, metrics, list(embeddings))
        seconds = time.perf_counter() - t0
        _record(run, metrics, timings, seconds)
    logger.info(
        "evaluate: done in %.1f s; report %s", seconds, run_dir / EVALUATE_DIR / REPORT_FILE
    )
    return EvaluateResult(run_dir, metrics=metrics, seconds=seconds)


def _inputs(config: Config, run_dir: Path, model_path: Path) -> dict[str, str]:
    """The census, the model and the embedding: a change to any redoes the evaluation."""
    from census_scvi.soma import census_fingerprint

    embed = run_dir / EMBED_DIR
    inputs = {"census": census_fingerprint(config), "model": file_hash(model_path)}
    if (embed / MANIFEST_FILE).is_file():
        inputs["embed_manifest"] = file_hash(embed / MANIFEST_FILE)
    else:  # embedding written by hand or by an older version: hash the arrays themselves
        inputs["latent"] = file_hash(embed / LATENT_FILE, max_bytes=1 << 28)
        inputs["latent_idx"] = file_hash(embed / LATENT_IDX_FILE)
    return inputs


def _previous_metrics(out_dir: Path) -> dict[str, Any]:
    path = out_dir / METRICS_FILE
    try:
        return dict(json.loads(path.read_text()))
    except (OSError, json.JSONDecodeError) as e:
        msg = f"{path} is unreadable ({e}) although the manifest says evaluate finished"
        raise CensusScviError(msg, hint="rerun with --force") from None


@contextmanager
def _timed(timings: dict[str, float], name: str) -> Iterator[None]:
    t = time.perf_counter()
    yield
    timings[name] = time.perf_counter() - t


# ---- step 1: the sampled cells ------------------------------------------------------------
@dataclass
class _Sample:
    """The evaluated cells: their rows of the embedding, obs, and raw counts of the model's genes."""

    positions: npt.NDArray[np.int64]
    obs: pd.DataFrame
    counts: ad.AnnData
    labels: npt.NDArray[np.str_]
    batches: dict[str, npt.NDArray[np.str_]]


def _read_sample(
    config: Config, joinids: npt.NDArray[np.int64], genes: list[str], timings: dict[str, float]
) -> _Sample:
    """Draw the stratified sample, read its obs and counts; build its labels and batch keys."""
    from census_scvi.batches import batch_labels
    from census_scvi.soma import (
        get_experiment,
        open_census,
        read_counts,
        read_obs,
        tiledb_read_config,
    )
    from census_scvi.soma._obs import check_obs_columns

    ev = config.evaluate
    parts = list(config.anndata.batch_key)
    eval_keys = [k for k in ev.batch_keys if k != BATCH_KEY]
    capped = tiledb_read_config(_READ_BUFFER_BYTES)
    with (
        open_census(config, tiledb_config=capped) as census,
        _timed(timings, "read"),
        quiet_warnings(),
    ):
        exp = get_experiment(census, config.census.organism)
        columns = [ev.label_key, *parts, *eval_keys]
        check_obs_columns(exp, columns)  # before the one long read
        positions = _sample_positions(exp, joinids, ev)
        obs = read_obs(exp, joinids[positions], columns)
        counts = read_counts(exp, obs["soma_joinid"].to_numpy(np.int64), genes)
    obs[BATCH_KEY] = batch_labels(obs, parts, config.anndata.batch_key_separator)
    labels = obs[ev.label_key].astype(str).to_numpy()
    if np.unique(labels).size < 2:
        msg = (
            f"evaluate.label_key '{ev.label_key}' has a single value in the sampled cells "
            f"({labels[0]!r})"
        )
        raise CensusScviError(msg, hint="set evaluate.label_key to a column with several labels")
    batches = {
        BATCH_KEY: obs[BATCH_KEY].astype(str).to_numpy(),
        **{k: obs[k].astype(str).to_numpy() for k in eval_keys},
    }
    return _Sample(positions, obs, counts, labels, batches)


def _sample_positions(
    experiment: soma.Experiment, joinids: npt.NDArray[np.int64], ev: EvaluateConfig
) -> npt.NDArray[np.int64]:
    """Rows of the embedding in the sample, drawn from the label's codes of every embedded cell.

    The one thing read for every embedded cell is the label, as a 4-byte code per cell (beside
    the 8-byte joinids of ``latent-idx.npy``, the latent staying memory-mapped): 12 bytes per
    cell, ~1.2 GB for the 99.6M-cell Census. Every other obs column is read for the sampled
    cells only. The same sample as drawing from the labels: the strata are numbered by first
    appearance either way.
    """
    from census_scvi.soma._obs import read_obs_codes

    codes, _ = read_obs_codes(experiment, joinids, ev.label_key)
    return stratified_sample(codes, n=ev.sample_size, seed=ev.seed)


# ---- step 2: the embeddings scored --------------------------------------------------------
def _embeddings(
    ev: EvaluateConfig, latent: npt.NDArray[np.float32], sample: _Sample, timings: dict[str, float]
) -> dict[str, npt.NDArray[np.float32]]:
    """The scVI latent of the sampled cells and the PCA baseline of their counts."""
    z = np.asarray(latent[sample.positions], dtype=np.float32)
    with _timed(timings, "pca"), quiet_warnings():
        pcs = pca_baseline(sample.counts, n_pcs=ev.n_pcs, seed=ev.seed)
    return {SCVI: z, PCA: pcs}


# ---- step 3: the scores -------------------------------------------------------------------
def _scores(
    ev: EvaluateConfig,
    embeddings: Mapping[str, npt.NDArray[np.float32]],
    sample: _Sample,
    timings: dict[str, float],
) -> dict[str, Any]:
    """scib-metrics, cell-type classifiers and batch mixing: the scoring part of metrics.json."""
    labels, batches = sample.labels, sample.batches
    with _timed(timings, "scib"):
        scib = benchmark(
            embeddings, labels=labels, batches=batches, baseline=PCA, skip_metrics=ev.skip_metrics
        )
    timings.update({f"scib[{k}]": v for k, v in scib.seconds.items()})
    with _timed(timings, "classifier"):
        classifier = {
            name: classifier_accuracy(
                emb, labels, test_size=ev.test_size, n_neighbors=_KNN_K, seed=ev.seed
            )
            for name, emb in embeddings.items()
        }
    with _timed(timings, "batch_classifier"):
        mixing = _batch_mixing(embeddings, batches, labels=labels, skip=scib.single_valued, ev=ev)
    first = next(iter(scib.scores), None)
    aggregate = {
        name: {k: v for k, v in scib.scores[first][name].items() if k in AGGREGATES}
        for name in embeddings
        if first is not None
    }
    return {
        "label_key": ev.label_key,
        "n_labels": int(np.unique(labels).size),
        "batch_keys": list(batches),
        "n_batches": {k: int(np.unique(v).size) for k, v in batches.items()},
        "aggregate": aggregate,
        "scib": scib.scores,
        "scib_metrics_ran": scib.ran,
        "scib_default_metrics": scib_default_metrics(),
        "classifier": classifier,
        "classifier_settings": {
            "test_size": ev.test_size,
            "n_neighbors": _KNN_K,
            "knn_features": "embedding as is (Euclidean)",
            "logreg_features": "standardised on the training part",
            "chance_majority": "fraction of the test split in its most frequent class",
            "chance_uniform": "1 / number of classes",
        },
        "batch_classifier": mixing,
        "metrics_skipped": list(ev.skip_metrics),
    }


def _batch_mixing(
    embeddings: Mapping[str, npt.NDArray[np.float32]],
    batches: Mapping[str, npt.NDArray[np.str_]],
    *,
    labels: npt.NDArray[np.str_],
    skip: list[str],
    ev: EvaluateConfig,
) -> dict[str, dict[str, dict[str, float | None]]]:
    """``batch_classifier[batch_key][embedding]`` for every batch key with two or more values.

    The keys in ``skip`` (one value; the scib step has already said so) are left out silently.
    """
    return {
        key: {
            name: batch_mixing_accuracy(
                emb, values, labels=labels, test_size=ev.test_size, n_neighbors=_KNN_K, seed=ev.seed
            )
            for name, emb in embeddings.items()
        }
        for key, values in batches.items()
        if key not in skip and np.unique(values).size >= 2
    }


# ---- step 4: the picture ------------------------------------------------------------------
def _pictures(
    ev: EvaluateConfig,
    z: npt.NDArray[np.float32],
    sample: _Sample,
    out_dir: Path,
    timings: dict[str, float],
) -> None:
    """``umap.png``: the scVI latent coloured by the label and each evaluated batch part."""
    from census_scvi.plots import draw_umap, umap_coords

    panels = {ev.label_key: sample.labels}
    panels.update({k: v for k, v in sample.batches.items() if k != BATCH_KEY})
    with _timed(timings, "umap"), quiet_warnings():
        coords = umap_coords(z, seed=ev.seed)
        with atomic_path(out_dir / UMAP_FILE) as tmp:
            draw_umap(coords, panels, tmp, title="scVI latent")


# ---- step 5: the reports and the manifest -------------------------------------------------
def _census_info(config: Config) -> dict[str, Any]:
    parts = list(config.anndata.batch_key)
    sep = config.anndata.batch_key_separator
    return {
        "uri": config.census_uri(),
        "version": None if config.census_uri() else config.census.version,
        "organism": config.census.organism,
        "model_filter": config.model_obs_filter(),
        "batch_key": sep.join(parts) if sep else "+".join(parts),
    }


def _write_reports(
    config: Config,
    run_dir: Path,
    model_path: Path,
    metrics: dict[str, Any],
    embeddings: list[str],
) -> None:
    """``metrics.json``, ``report.md`` and ``model_card.md``."""
    from census_scvi.config import dump_config

    out_dir = run_dir / EVALUATE_DIR
    write_json_atomic(out_dir / METRICS_FILE, metrics)
    with atomic_path(out_dir / REPORT_FILE) as tmp:
        tmp.write_text(report_markdown(metrics, embeddings=embeddings))
    facts, history = model_facts(model_path, config.model)
    card = model_card_markdown(
        config_yaml=dump_config(config),
        census=metrics["census"],
        metrics=metrics,
        n_genes=metrics["n_genes"],
        n_train_cells=n_train_cells(run_dir),
        history=history,
        model_summary=facts,
        versions={**package_versions(), **extra_versions()},
    )
    with atomic_path(out_dir / MODEL_CARD_FILE) as tmp:
        tmp.write_text(card)


def _record(
    run: StageRun, metrics: Mapping[str, Any], timings: Mapping[str, float], seconds: float
) -> None:
    """What the manifest says: the key figures, the census, and each output's hash."""
    outputs = {name: run.dir / name for name in _OUTPUTS}
    run.record(
        figures={
            "n_cells_embedded": metrics["n_cells_embedded"],
            "n_cells_sampled": metrics["n_cells_sampled"],
            "n_genes": metrics["n_genes"],
            "aggregate": metrics["aggregate"],
            "seconds": round(seconds, 2),
            "peak_rss_bytes": peak_rss_bytes(),
            **{f"seconds_{k}": round(v, 2) for k, v in timings.items()},
        },
        outputs=outputs,
        census=metrics["census"],
        listed={name: file_hash(path) for name, path in outputs.items()},
    )
