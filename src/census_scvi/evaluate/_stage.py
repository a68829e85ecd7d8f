"""Evaluate the embedding: scib-metrics vs an unintegrated PCA baseline, classifiers, UMAP, model card.

``run_evaluate`` reads the embedded cells (``embed/latent.npy``, ``embed/latent-idx.npy``), their
labels from the census obs, draws a stratified sample (``evaluate.sample_size``, stratified by the
label), and scores the scVI latent beside a PCA of log-normalised counts of the model's genes on the
same cells:

- scib-metrics ``Benchmarker`` (bio conservation, batch correction, aggregates) with the batch label
  (``batch``) and each of ``evaluate.batch_keys`` as batch;
- cell-type accuracy of logistic regression and k-NN classifiers (60/40 split);
- a UMAP of the scVI latent coloured by label and batch parts.

Outputs in ``RUN_DIR/evaluate/``: ``metrics.json``, ``report.md``, ``umap.png``, ``model_card.md``,
``manifest.json`` (written last).

Examples
--------
>>> from census_scvi.config import load_config
>>> from census_scvi.evaluate._stage import run_evaluate
>>> result = run_evaluate(load_config(None), run_dir="census-scvi-runs/demo")  # doctest: +SKIP
>>> print(result.summary())  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping, Sequence
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
    PREPARE_DIR,
    REPORT_FILE,
    UMAP_FILE,
)
from census_scvi.errors import CensusScviError
from census_scvi.evaluate._metrics import benchmark, classifier_scores, pca_baseline
from census_scvi.evaluate._report import model_card_markdown, report_markdown
from census_scvi.plots import draw_umap, umap_coords
from census_scvi.rundir import (
    Manifest,
    StageTimer,
    atomic_path,
    file_hash,
    load_embedding,
    model_dir,
    package_versions,
    peak_rss_bytes,
    read_manifest,
    stage_dir,
    write_json_atomic,
    write_manifest,
    write_run_config,
)
from census_scvi.scvi_model import model_var_names
from census_scvi.soma import read_counts, read_obs, stratified_indices

if TYPE_CHECKING:
    from census_scvi.config import Config

__all__ = [
    "EvaluateResult",
    "benchmark_embeddings",
    "classifier_accuracy",
    "run_evaluate",
    "stratified_sample",
]

logger = logging.getLogger(__name__)

SCVI = "scVI"
PCA = "PCA"
_CONFIG_SECTIONS = ["census", "anndata", "evaluate"]


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
        cls = self.metrics.get("classifier", {})
        for emb, vals in cls.items():
            lines.append(
                f"  {emb}: cell-type accuracy logistic regression "
                f"{vals['logreg_accuracy']:.3f}, k-NN {vals['knn_accuracy']:.3f}"
            )
        lines.append(f"  report: {self.report_path}")
        return "\n".join(lines)


# ------------------------------------------------------------------------------------------
# library functions
# ------------------------------------------------------------------------------------------
def stratified_sample(strata: npt.ArrayLike, *, n: int, seed: int = 0) -> npt.NDArray[np.int64]:
    """Positions of a sample of ``n`` rows, proportional per stratum, every stratum kept.

    Parameters
    ----------
    strata
        One label per row (e.g. cell type).
    n
        Sample size; all rows when there are fewer.
    seed
        Random seed.

    Returns
    -------
    Sorted row positions.

    Examples
    --------
    >>> stratified_sample(["a"] * 95 + ["b"] * 5, n=20).size
    20
    """
    if n <= 0:
        msg = f"sample size n={n} must be > 0"
        raise CensusScviError(msg)
    return stratified_indices(strata, n, seed=seed)


def benchmark_embeddings(
    embeddings: Mapping[str, npt.NDArray[np.floating]],
    *,
    labels: npt.ArrayLike,
    batches: Mapping[str, npt.ArrayLike],
    baseline: str,
    skip_metrics: Sequence[str] = (),
) -> dict[str, dict[str, dict[str, float]]]:
    """scib-metrics scores of several embeddings of the same cells.

    Parameters
    ----------
    embeddings
        Name -> (n_cells x d) array; must include ``baseline``.
    labels
        Cell labels (bio conservation).
    batches
        Batch key name -> one batch per cell. The first gets bio conservation and batch
        correction, the others batch correction only.
    baseline
        The unintegrated embedding (used by ``pcr_comparison``).
    skip_metrics
        scib-metrics function names to leave out (e.g. ``"kbet_per_label"``).

    Returns
    -------
    ``scores[batch_key][embedding][metric]`` with the aggregates ``Bio conservation``,
    ``Batch correction`` and ``Total``.

    Examples
    --------
    >>> scores = benchmark_embeddings(
    ...     {"scVI": z, "PCA": pcs}, labels=cell_type, batches={"batch": b}, baseline="PCA"
    ... )  # doctest: +SKIP
    """
    if baseline not in embeddings:
        msg = f"baseline '{baseline}' is not one of the embeddings {list(embeddings)}"
        raise CensusScviError(msg)
    n = np.asarray(labels).shape[0]
    for name, emb in embeddings.items():
        if np.asarray(emb).shape[0] != n:
            msg = f"embedding '{name}' has {np.asarray(emb).shape[0]} rows, labels have {n}"
            raise CensusScviError(msg)
    return benchmark(
        embeddings, labels=labels, batches=batches, baseline=baseline, skip_metrics=skip_metrics
    )[0]


def classifier_accuracy(
    embedding: npt.NDArray[np.floating],
    labels: npt.ArrayLike,
    *,
    test_size: float = 0.4,
    seed: int = 0,
) -> dict[str, float]:
    """Cell-type accuracy and macro F1 of logistic regression and k-NN on an embedding.

    Parameters
    ----------
    embedding
        n_cells x d.
    labels
        One label per cell.
    test_size
        Held-out fraction (0.4: the 60/40 split of the Census embedding benchmark).
    seed
        Split seed.

    Returns
    -------
    ``logreg_accuracy``, ``logreg_macro_f1``, ``knn_accuracy``, ``knn_macro_f1``, ``n_train``,
    ``n_test``.
    """
    if not 0.0 < test_size < 1.0:
        msg = f"test_size={test_size} must be in (0, 1)"
        raise CensusScviError(msg)
    return classifier_scores(embedding, labels, test_size=test_size, seed=seed)


# ------------------------------------------------------------------------------------------
# the stage
# ------------------------------------------------------------------------------------------
def _inputs(run_dir: Path, model_path: Path) -> dict[str, str]:
    embed = run_dir / EMBED_DIR
    inputs = {"model": file_hash(model_path)}
    if (embed / MANIFEST_FILE).is_file():
        inputs["embed_manifest"] = file_hash(embed / MANIFEST_FILE)
    else:  # embedding written by hand or by an older version: hash the arrays themselves
        inputs["latent"] = file_hash(embed / LATENT_FILE, max_bytes=1 << 28)
        inputs["latent_idx"] = file_hash(embed / LATENT_IDX_FILE)
    return inputs


def _n_train_cells(run_dir: Path) -> int | None:
    p = run_dir / PREPARE_DIR / "cells.parquet"
    if not p.is_file():
        return None
    import pyarrow.parquet as pq

    return int(pq.read_metadata(p).num_rows)


def _model_facts(model_path: Path, config: Config) -> tuple[dict[str, Any], Any]:
    """Model settings for the card (from the saved registry) and its training history."""
    import warnings

    import scvi

    from census_scvi.scvi_model import quiet_scvi

    with warnings.catch_warnings(), quiet_scvi():
        warnings.simplefilter("ignore")
        model = scvi.model.SCVI.load(str(model_path), adata=False, accelerator="cpu")
    registry = model.registry_
    n_batches = None
    try:
        state = registry["field_registries"][BATCH_KEY]["state_registry"]
        n_batches = len(state["categorical_mapping"])
    except KeyError:
        pass
    m = config.model
    facts = {
        "class": "scvi.model.SCVI",
        "scvi-tools": registry.get("scvi_version", "?"),
        "n_latent": m.n_latent,
        "n_hidden": m.n_hidden,
        "n_layers": m.n_layers,
        "dropout_rate": m.dropout_rate,
        "gene_likelihood": m.gene_likelihood,
        "encode_covariates": m.encode_covariates,
        "batches (batch_key 'batch')": n_batches,
        "saved at": str(model_path),
    }
    return facts, model.history


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
    from census_scvi.config import config_hash, dump_config
    from census_scvi.soma import get_experiment, open_census

    t0 = time.perf_counter()
    run_dir = Path(run_dir)
    ev = config.evaluate
    mpath = model_dir(run_dir, config.model.filename)
    out_dir = run_dir / EVALUATE_DIR
    manifest = Manifest(
        stage="evaluate",
        config_hash=config_hash(config, sections=_CONFIG_SECTIONS),
        inputs=_inputs(run_dir, mpath),
    )
    old = read_manifest(out_dir)
    if not force and manifest.matches(old) and (out_dir / METRICS_FILE).is_file():
        import json

        done = json.loads((out_dir / METRICS_FILE).read_text())
        logger.info(
            "evaluate: skipped, %s matches the config and embedding", out_dir / MANIFEST_FILE
        )
        return EvaluateResult(run_dir, skipped=True, metrics=done)
    timer = StageTimer()
    manifest.started = timer.started
    config_yaml = dump_config(config)
    write_run_config(run_dir, config_yaml)
    out_dir = stage_dir(run_dir, EVALUATE_DIR)
    (out_dir / MANIFEST_FILE).unlink(missing_ok=True)
    timings: dict[str, float] = {}

    latent, joinids = load_embedding(run_dir)
    genes = model_var_names(mpath)
    batch_parts = list(config.anndata.batch_key)
    eval_keys = [k for k in ev.batch_keys if k != BATCH_KEY]
    label = ev.label_key
    with open_census(config) as census:
        exp = get_experiment(census, config.census.organism)
        t = time.perf_counter()
        obs = read_obs(exp, joinids, [label, *batch_parts, *eval_keys])
        sample = stratified_sample(
            obs[label].astype(str).to_numpy(), n=ev.sample_size, seed=ev.seed
        )
        obs = obs.iloc[sample].reset_index(drop=True)
        counts = read_counts(exp, obs["soma_joinid"].to_numpy(np.int64), list(genes))
        timings["read"] = time.perf_counter() - t
    from census_scvi.batches import batch_labels

    obs[BATCH_KEY] = batch_labels(obs, batch_parts, config.anndata.batch_key_separator)
    z = np.asarray(latent[sample], dtype=np.float32)
    t = time.perf_counter()
    pcs = pca_baseline(counts, n_pcs=ev.n_pcs, seed=ev.seed)
    timings["pca"] = time.perf_counter() - t
    labels = obs[label].astype(str).to_numpy()
    if np.unique(labels).size < 2:
        msg = (
            f"evaluate.label_key '{label}' has a single value in the sampled cells ({labels[0]!r})"
        )
        raise CensusScviError(msg, hint="set evaluate.label_key to a column with several labels")
    embeddings = {SCVI: z, PCA: pcs}
    batches = {
        BATCH_KEY: obs[BATCH_KEY].to_numpy(),
        **{k: obs[k].astype(str).to_numpy() for k in eval_keys},
    }

    t = time.perf_counter()
    scores, scib_seconds = benchmark(
        embeddings, labels=labels, batches=batches, baseline=PCA, skip_metrics=ev.skip_metrics
    )
    timings["scib"] = time.perf_counter() - t
    timings.update({f"scib[{k}]": v for k, v in scib_seconds.items()})
    t = time.perf_counter()
    classifier = {
        name: classifier_accuracy(emb, labels, test_size=ev.test_size, seed=ev.seed)
        for name, emb in embeddings.items()
    }
    timings["classifier"] = time.perf_counter() - t

    first = next(iter(scores), None)
    aggregate = (
        {
            name: {
                k: v
                for k, v in scores[first][name].items()
                if k in ("Bio conservation", "Batch correction", "Total")
            }
            for name in embeddings
        }
        if first
        else {}
    )
    census_info = {
        "uri": config.census_uri(),
        "version": None if config.census_uri() else config.census.version,
        "organism": config.census.organism,
        "model_filter": config.model_obs_filter(),
        "batch_key": config.anndata.batch_key_separator.join(batch_parts)
        if config.anndata.batch_key_separator
        else "+".join(batch_parts),
    }
    metrics: dict[str, Any] = {
        "n_cells_embedded": int(joinids.size),
        "n_cells_sampled": int(sample.size),
        "n_genes": len(genes),
        "n_pcs": int(pcs.shape[1]),
        "label_key": label,
        "n_labels": int(np.unique(labels).size),
        "batch_keys": list(batches),
        "n_batches": {k: int(np.unique(v).size) for k, v in batches.items()},
        "aggregate": aggregate,
        "scib": scores,
        "classifier": classifier,
        "metrics_skipped": list(ev.skip_metrics),
        "census": census_info,
    }

    t = time.perf_counter()
    coords = umap_coords(z, seed=ev.seed)
    panels = {label: labels, **{k: obs[k].astype(str).to_numpy() for k in eval_keys}}
    with atomic_path(out_dir / UMAP_FILE) as tmp:
        draw_umap(coords, panels, tmp, title="scVI latent")
    timings["umap"] = time.perf_counter() - t
    metrics["seconds"] = {k: round(v, 2) for k, v in timings.items()}

    write_json_atomic(out_dir / METRICS_FILE, metrics)
    with atomic_path(out_dir / REPORT_FILE) as tmp:
        tmp.write_text(report_markdown(metrics, embeddings=list(embeddings)))
    facts, history = _model_facts(mpath, config)
    card = model_card_markdown(
        config_yaml=config_yaml,
        census=census_info,
        metrics=metrics,
        n_genes=len(genes),
        n_train_cells=_n_train_cells(run_dir),
        history=history,
        model_summary=facts,
        versions={**package_versions(), **_extra_versions()},
    )
    with atomic_path(out_dir / MODEL_CARD_FILE) as tmp:
        tmp.write_text(card)

    seconds = time.perf_counter() - t0
    manifest.census = census_info
    manifest.figures = {
        "n_cells_embedded": int(joinids.size),
        "n_cells_sampled": int(sample.size),
        "n_genes": len(genes),
        "aggregate": aggregate,
        "seconds": round(seconds, 2),
        "peak_rss_bytes": peak_rss_bytes(),
        **{f"seconds_{k}": round(v, 2) for k, v in timings.items()},
    }
    manifest.outputs = {
        name: file_hash(out_dir / name)
        for name in (METRICS_FILE, REPORT_FILE, UMAP_FILE, MODEL_CARD_FILE)
    }
    write_manifest(out_dir, manifest)
    logger.info("evaluate: done in %.1f s; report %s", seconds, out_dir / REPORT_FILE)
    return EvaluateResult(run_dir, metrics=metrics, seconds=seconds)


def _extra_versions() -> dict[str, str]:
    from importlib import metadata

    out = {}
    for name in ("scib-metrics", "jax", "scikit-learn"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out
