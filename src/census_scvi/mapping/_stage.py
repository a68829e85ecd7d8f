"""Map a user's dataset onto a trained model: gene overlap, latent, label transfer, picture.

``run_map(QUERY.h5ad, run_dir=RUN_DIR, out=OUT.h5ad)``:

1. aligns the query's genes (var index, or the ``gene_ids`` column) to the model's (reordered,
   missing genes zero-filled, extra genes dropped) and reports the overlap: model genes found and
   the fraction of the query's counts they hold; warns under ``map.warn_overlap`` and refuses under
   ``map.min_overlap``, naming the likely cause;
2. checks X holds raw counts (no NaN, negative or fractional values);
3. computes the latent with the model's encoder, chunk by chunk (the batch is irrelevant: the
   encoder does not see covariates);
4. transfers ``labels`` from the reference, the run's embedded cells (``embed/latent.npy``,
   ``embed/latent-idx.npy``) labelled from the obs of the census the embed manifest records
   (:mod:`~census_scvi.mapping._census`: checked against its fingerprint, never a demo census
   built on the spot), by weighted k-NN with a per-cell confidence; ``"unknown"`` under
   ``map.unknown_threshold``. The neighbours come from the run's index over every embedded cell
   when it is current, else from exact search over a sample of ``map.knn_reference_cells``
   (:mod:`~census_scvi.mapping._search`); with ``truth``, scores the predictions against a query
   column (:mod:`~census_scvi.mapping._truth`);
5. writes OUT.h5ad (the query plus ``obsm["X_scvi"]``, ``obs["predicted_<labels>"]``,
   ``obs["predicted_<labels>_confidence"]``, ``uns["census_scvi_map"]`` with the overlap report
   and the search used)
   and ``OUT.umap.png`` (query and a reference sample in one UMAP).

Wrong ``--labels`` / ``--truth`` columns, a missing embedding and a census that is not the one
embedded are refused before the query's X is read.

Examples
--------
>>> from census_scvi.mapping._stage import run_map
>>> result = run_map("pbmc.h5ad", run_dir="runs/demo", out="pbmc-mapped.h5ad",
...                  gene_ids="gene_ids")  # doctest: +SKIP
>>> print(result.summary())  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
import pandas as pd

from census_scvi.constants import CONFIG_FILE
from census_scvi.errors import CensusScviError
from census_scvi.knn import KnnLabelTransfer, TransferResult
from census_scvi.mapping._census import EmbeddedCensus, embedded_census, open_reference
from census_scvi.mapping._genes import (
    OverlapReport,
    check_counts,
    gene_selection,
    likely_cause,
    log_counts_hint,
    query_gene_ids,
)
from census_scvi.mapping._picture import draw_map
from census_scvi.mapping._reference import (
    Reference,
    check_label_column,
    label_codes,
    present_classes,
    reference_sample,
)
from census_scvi.mapping._search import SearchPlan, index_transfer, plan_search
from census_scvi.mapping._truth import (
    TruthScores,
    check_truth_column,
    query_obs_columns,
    score_truth,
)
from census_scvi.rundir import atomic_path, model_dir, refuse_overwrite
from census_scvi.scvi_model import model_var_names

if TYPE_CHECKING:
    import anndata as ad
    import scipy.sparse as sp

    from census_scvi.config import Config, MapConfig

__all__ = [
    "MapResult",
    "align_genes",
    "encode_query",
    "gene_overlap",
    "run_map",
    "transfer_labels",
]

logger = logging.getLogger(__name__)

OBSM_KEY = "X_scvi"
UNS_KEY = "census_scvi_map"


@dataclass
class MapResult:
    """What ``run_map`` did.

    Attributes
    ----------
    out
        The output h5ad.
    picture
        The UMAP PNG (None when not drawn).
    overlap
        The gene overlap report.
    label_key
        The transferred reference column.
    counts
        Predicted label -> number of query cells.
    mean_confidence
        Mean confidence over the query cells.
    n_cells
        Query cells mapped.
    seconds
        Wall time.
    truth
        The scores against ``--truth`` (None without it).
    search
        The neighbour search used: ``"index"`` or ``"exact"``, and why.
    """

    out: Path
    picture: Path | None
    overlap: OverlapReport
    label_key: str
    counts: dict[str, int] = field(default_factory=dict)
    mean_confidence: float = float("nan")
    n_cells: int = 0
    seconds: float = 0.0
    truth: TruthScores | None = None
    search: str = ""

    def summary(self) -> str:
        lines = [
            f"map: {self.n_cells:,} cells in {self.seconds:.0f} s",
            f"  genes: {self.overlap.line()}",
        ]
        if self.overlap.n_duplicate_ids:
            lines.append(
                f"  genes: {self.overlap.n_duplicate_ids:,} query column(s) repeat another's "
                "gene id; their counts are summed"
            )
        if self.search:
            lines.append(f"  search: {self.search}")
        lines.append(f"  predicted {self.label_key} (mean confidence {self.mean_confidence:.2f}):")
        total = max(self.n_cells, 1)
        for name, n in sorted(self.counts.items(), key=lambda kv: -kv[1])[:12]:
            lines.append(f"    {n:7,} ({n / total:6.1%})  {name}")
        if len(self.counts) > 12:
            lines.append(f"    ... and {len(self.counts) - 12} more labels")
        if self.truth is not None:
            lines += self.truth.lines()
        lines.append(f"  wrote {self.out}")
        if self.picture is not None:
            lines.append(f"  picture {self.picture}")
        return "\n".join(lines)


# ------------------------------------------------------------------------------------------
# library functions
# ------------------------------------------------------------------------------------------
def _chunks(n: int, size: int) -> Iterable[tuple[int, int]]:
    for start in range(0, n, size):
        yield start, min(start + size, n)


def _csr(x: Any) -> sp.csr_matrix:
    import scipy.sparse as sp

    if sp.issparse(x):
        return sp.csr_matrix(x)
    return sp.csr_matrix(np.asarray(x))


def gene_overlap(
    adata: ad.AnnData,
    model_genes: Sequence[str],
    *,
    gene_ids: str | None = None,
    chunk_size: int = 16_384,
) -> OverlapReport:
    """Overlap of a query's genes with a model's, and a raw-counts check of X.

    Parameters
    ----------
    adata
        The query (raw counts in X).
    model_genes
        The model's gene ids (Ensembl ids for census models), in model order.
    gene_ids
        var column holding the ids; default the var index.
    chunk_size
        Cells read per pass step.

    Returns
    -------
    :class:`OverlapReport` (genes found / model genes, fraction of counts in them, ...).

    Raises
    ------
    CensusScviError
        When X holds NaN, negative or non-integer values (with a hint when raw counts seem to be
        in ``.raw`` or a ``counts`` layer).
    """
    ids = query_gene_ids(adata, gene_ids)
    s, used, n_dup = gene_selection(ids, model_genes)
    hint = log_counts_hint(adata)
    total = 0.0
    kept = 0.0
    for start, stop in _chunks(adata.n_obs, chunk_size):
        x = _csr(adata.X[start:stop])
        check_counts(x, where=f"cells {start}-{stop - 1}", log_hint=hint)
        col = np.asarray(x.sum(axis=0)).ravel()
        total += float(col.sum())
        kept += float(col[used].sum())
    found = np.asarray(s.sum(axis=0)).ravel() > 0
    missing = [str(g) for g, f in zip(model_genes, found, strict=True) if not f][:5]
    return OverlapReport(
        n_model_genes=len(model_genes),
        n_found=int(found.sum()),
        gene_fraction=float(found.mean()) if len(model_genes) else 0.0,
        n_query_genes=int(adata.n_vars),
        n_query_genes_used=int(used.sum()),
        count_fraction=kept / total if total > 0 else 0.0,
        n_duplicate_ids=n_dup,
        gene_id_source=gene_ids or "var_names",
        missing_examples=missing,
    )


def align_genes(
    adata: ad.AnnData, model_genes: Sequence[str], *, gene_ids: str | None = None
) -> sp.csr_matrix:
    """The query's counts as cells x model genes (model order; missing genes are zero columns).

    Query columns sharing one id are added up; genes the model lacks are dropped.

    Examples
    --------
    >>> x = align_genes(query, model.var_names, gene_ids="gene_ids")  # doctest: +SKIP
    """
    s, _, _ = gene_selection(query_gene_ids(adata, gene_ids), model_genes)
    return (_csr(adata.X).astype(np.float32) @ s).tocsr()


def encode_query(
    adata: ad.AnnData,
    model_dir: str | os.PathLike[str],
    *,
    gene_ids: str | None = None,
    chunk_size: int = 16_384,
    batch_size: int = 1024,
    accelerator: str = "auto",
) -> npt.NDArray[np.float32]:
    """Latent (posterior mean) of each query cell, by the saved model's encoder, chunk by chunk.

    Parameters
    ----------
    adata
        The query, raw counts in X.
    model_dir
        An scvi-tools SCVI save folder (``RUN_DIR/train/scvi.model``), trained with
        ``encode_covariates=False``.
    gene_ids
        var column with the model's kind of gene ids; default the var index.
    chunk_size
        Cells aligned (sparse) at once.
    batch_size
        Cells densified per encoder pass.
    accelerator
        Lightning accelerator name.

    Returns
    -------
    float32 array, n_cells x n_latent.
    """
    from census_scvi.scvi_model import encode_csr, load_encoder

    encoder = load_encoder(Path(model_dir), accelerator=accelerator)
    if encoder.encodes_batch:
        msg = (
            f"the model at {model_dir} encodes the batch (encode_covariates=true), so a dataset "
            "from an unseen batch cannot be mapped"
        )
        raise CensusScviError(msg, hint="retrain with model.encode_covariates=false")
    s, _, _ = gene_selection(query_gene_ids(adata, gene_ids), list(encoder.var_names))
    out = np.empty((adata.n_obs, encoder.n_latent), dtype=np.float32)
    from census_scvi.progress import track

    steps = list(_chunks(adata.n_obs, chunk_size))
    for start, stop in track(steps, description="encoding query"):
        x = (_csr(adata.X[start:stop]).astype(np.float32) @ s).tocsr()
        out[start:stop] = encode_csr(encoder, x, batch_size=batch_size)[0]
    return out


def transfer_labels(
    query: npt.NDArray[np.floating],
    reference: npt.NDArray[np.floating],
    reference_labels: npt.ArrayLike,
    *,
    n_neighbors: int = 15,
    unknown_threshold: float = 0.5,
    unknown_label: str = "unknown",
) -> TransferResult:
    """Weighted k-NN label transfer with a per-cell confidence in [0, 1].

    Parameters
    ----------
    query
        n_query x d embedding.
    reference
        n_ref x d embedding, same space.
    reference_labels
        One label per reference cell.
    n_neighbors
        Reference neighbours per query cell.
    unknown_threshold
        Cells whose confidence is below this get ``unknown_label``.
    unknown_label
        The label for low-confidence cells.

    Returns
    -------
    :class:`~census_scvi.knn.TransferResult` (``labels``, ``best``, ``confidence``).

    Examples
    --------
    >>> res = transfer_labels(z_query, z_ref, ref_cell_types)  # doctest: +SKIP
    >>> res.labels[:3], res.confidence[:3]  # doctest: +SKIP
    """
    if np.asarray(query).shape[1] != np.asarray(reference).shape[1]:
        msg = f"query has {np.asarray(query).shape[1]} dimensions, reference {np.asarray(reference).shape[1]}"
        raise CensusScviError(msg)
    if not 0.0 <= unknown_threshold <= 1.0:
        msg = f"unknown_threshold={unknown_threshold} must be in [0, 1]"
        raise CensusScviError(msg)
    knn = KnnLabelTransfer(reference, reference_labels, n_neighbors=n_neighbors)
    return knn.predict(query, unknown_threshold=unknown_threshold, unknown_label=unknown_label)


# ------------------------------------------------------------------------------------------
# the command
# ------------------------------------------------------------------------------------------
def _run_config(run_dir: Path, overrides: Sequence[str]) -> Config:
    from census_scvi.config import load_config

    path = run_dir / CONFIG_FILE
    if not path.is_file():
        msg = f"{run_dir} is not a run directory: {CONFIG_FILE} missing"
        raise CensusScviError(msg, hint="pass --run the folder 'census-scvi run' wrote (-o)")
    return load_config(path, overrides=overrides)


def _read_query(query: Path) -> ad.AnnData:
    import anndata as ad

    if not query.is_file():
        msg = f"query file not found: {query}"
        raise CensusScviError(msg)
    try:
        adata = ad.read_h5ad(query)
    except (OSError, KeyError, ValueError) as e:
        msg = f"cannot read {query} as an h5ad file: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
        raise CensusScviError(msg) from None
    if adata.X is None:
        msg = f"{query} has no X matrix"
        raise CensusScviError(msg, hint="put the raw counts in X")
    if adata.n_obs == 0 or adata.n_vars == 0:
        msg = f"{query} is empty ({adata.n_obs} cells x {adata.n_vars} genes)"
        raise CensusScviError(msg)
    return adata


@dataclass
class _Inputs:
    """What the checks before the heavy work found: the run's config, model, census, query."""

    config: Config
    model: Path
    model_genes: list[str]
    census: EmbeddedCensus
    latent: npt.NDArray[np.float32]
    joinids: npt.NDArray[np.int64]


def run_map(
    query: str | os.PathLike[str],
    *,
    run_dir: str | os.PathLike[str],
    out: str | os.PathLike[str],
    gene_ids: str | None = None,
    labels: str = "cell_type",
    truth: str | None = None,
    overrides: Sequence[str] = (),
    force: bool = False,
) -> MapResult:
    """Map ``query`` onto the model in ``run_dir`` and transfer ``labels``.

    Parameters
    ----------
    query
        h5ad of raw counts (cells x genes).
    run_dir
        A run directory with ``config.yaml``, ``train/<model.filename>`` and finished ``embed/``
        outputs; the reference labels come from the obs of the census the embed manifest
        records (checked against its fingerprint; ``--set census.uri=`` names a moved copy).
    out
        Output h5ad; the picture goes next to it as ``<out stem>.umap.png``.
    gene_ids
        Query var column with the model's gene ids (Ensembl); default the var index.
    labels
        Reference obs column to transfer.
    truth
        Query obs column with known labels: the predictions are scored against it
        (``uns["census_scvi_map"]["truth"]`` and the summary).
    overrides
        ``section.key=value`` settings applied over the run's config (e.g. ``map.n_neighbors=30``).
    force
        Overwrite ``out``.

    Returns
    -------
    :class:`MapResult`. OUT.h5ad holds the query plus ``obsm["X_scvi"]``,
    ``obs["predicted_<labels>"]`` (categorical), ``obs["predicted_<labels>_confidence"]`` (float32
    in [0, 1]) and ``uns["census_scvi_map"]`` (overlap report, settings, census, truth scores).

    Raises
    ------
    CensusScviError
        Before any heavy work: no run directory, model or finished embedding; a census that is
        missing or not the one embedded; ``labels`` not in the census obs or ``truth`` not in the
        query obs (the valid columns listed). Then: low gene overlap, X not raw counts.
    """
    t0 = time.perf_counter()
    query, run_dir, out = Path(query), Path(run_dir), Path(out)
    inputs = _inputs(run_dir, out, overrides, force=force)
    columns = query_obs_columns(query)  # from the h5ad's header: X is not read yet
    check_truth_column(columns, truth, query=query)
    with open_reference(inputs.census, inputs.config, inputs.joinids) as experiment:
        check_label_column(experiment, labels)
        adata = _read_query(query)
        if columns is None:
            check_truth_column([str(c) for c in adata.obs.columns], truth, query=query)
        report = _checked_overlap(inputs.config.map, adata, inputs.model_genes, gene_ids)
        search = _search(inputs, run_dir, label_codes(experiment, inputs.joinids, labels))
    ref = search.sample
    z, res = _predict(inputs, adata, search, gene_ids)
    scores = None
    if truth is not None:
        scores = score_truth(
            adata, truth, res, search.known_labels(), unknown_label=inputs.config.map.unknown_label
        )
    _annotate(adata, z, res, report, labels, inputs, run_dir, search, scores)
    with atomic_path(out) as tmp:
        adata.write_h5ad(tmp)
    picture = out.with_name(f"{out.stem}.umap.png")
    with atomic_path(picture) as tmp:
        draw_map(
            tmp,
            z,
            res.labels,
            ref,
            labels,
            n_reference=inputs.config.map.reference_sample_size,
            seed=inputs.config.map.seed,
        )
    counts = pd.Series(res.labels.astype(str)).value_counts()
    return MapResult(
        out=out,
        picture=picture,
        overlap=report,
        label_key=labels,
        counts={str(k): int(v) for k, v in counts.items()},
        mean_confidence=float(res.confidence.mean()),
        n_cells=int(adata.n_obs),
        seconds=time.perf_counter() - t0,
        truth=scores,
        search=search.line(),
    )


def _inputs(run_dir: Path, out: Path, overrides: Sequence[str], *, force: bool) -> _Inputs:
    """The light checks first: run directory, output, model, finished embedding, its census."""
    from census_scvi.rundir import load_embedding

    config = _run_config(run_dir, overrides)
    refuse_overwrite(out, force=force, what="output file")
    model_path = model_dir(run_dir, config.model.filename)
    model_genes = [str(g) for g in model_var_names(model_path)]  # verifies model.pt first
    census = embedded_census(run_dir, config, overrides)
    latent, joinids = load_embedding(run_dir)
    return _Inputs(config, model_path, model_genes, census, latent, joinids)


@dataclass
class _Search:
    """The label transfer's reference: the search plan, every embedded cell's label, a sample.

    The sample is the exact search's reference (``map.knn_reference_cells``) or, when the index
    serves the search, only the picture's (``map.reference_sample_size``).
    """

    plan: SearchPlan
    codes: npt.NDArray[np.int32]
    classes: npt.NDArray[np.object_]
    sample: Reference

    @property
    def n_cells(self) -> int:
        """Reference cells searched."""
        return self.sample.n_embedded if self.plan.kind == "index" else self.sample.n_cells

    def known_labels(self) -> npt.ArrayLike:
        """The labels the searched reference holds."""
        if self.plan.kind == "index":
            return present_classes(self.codes, self.classes)
        return self.sample.labels

    def line(self) -> str:
        where = "every" if self.plan.kind == "index" else "a sample of"
        return (
            f"{self.plan.kind}, over {where} {self.n_cells:,} embedded cells ({self.plan.reason})"
        )


def _search(
    inputs: _Inputs,
    run_dir: Path,
    labelled: tuple[npt.NDArray[np.int32], npt.NDArray[np.object_]],
) -> _Search:
    """Index or exact search (one log line says which), and the reference sample it needs."""
    mc = inputs.config.map
    plan = plan_search(run_dir, use_index=mc.use_index, nprobe=inputs.config.search.nprobe)
    codes, classes = labelled
    n = mc.reference_sample_size if plan.kind == "index" else mc.knn_reference_cells
    sample = reference_sample(inputs.latent, codes, classes, n_cells=n, seed=mc.seed)
    return _Search(plan, codes, classes, sample)


def _predict(
    inputs: _Inputs, adata: ad.AnnData, search: _Search, gene_ids: str | None
) -> tuple[npt.NDArray[np.float32], TransferResult]:
    """The query's latent (encoder, chunk by chunk), then the labels by weighted k-NN."""
    mc = inputs.config.map
    t = time.perf_counter()
    z = encode_query(
        adata,
        inputs.model,
        gene_ids=gene_ids,
        chunk_size=mc.chunk_size,
        batch_size=mc.batch_size,
        accelerator="cpu" if inputs.config.train.accelerator == "cpu" else "auto",
    )
    logger.info("map: latent of %d cells in %.1f s", adata.n_obs, time.perf_counter() - t)
    if search.plan.kind == "index":
        res = index_transfer(
            search.plan,
            z,
            search.codes,
            search.classes,
            inputs.joinids,
            n_neighbors=mc.n_neighbors,
            memory_gib=inputs.config.search.memory_gib,
            unknown_threshold=mc.unknown_threshold,
            unknown_label=mc.unknown_label,
        )
        return z, res
    res = transfer_labels(
        z,
        search.sample.z,
        search.sample.labels,
        n_neighbors=mc.n_neighbors,
        unknown_threshold=mc.unknown_threshold,
        unknown_label=mc.unknown_label,
    )
    return z, res


def _checked_overlap(
    mc: MapConfig, adata: ad.AnnData, model_genes: list[str], gene_ids: str | None
) -> OverlapReport:
    """The overlap report; refused under ``map.min_overlap``, a warning under ``warn_overlap``.

    Query columns that share one gene id (a gene listed twice, or ids equal once their Ensembl
    version is dropped) are summed into that gene, as the counts of one gene measured twice; a
    warning says how many and names one.
    """
    report = gene_overlap(adata, model_genes, gene_ids=gene_ids, chunk_size=mc.chunk_size)
    logger.info("map: %s", report.line())
    if report.gene_fraction < mc.min_overlap:
        cause = likely_cause(query_gene_ids(adata, gene_ids), model_genes)
        msg = (
            f"only {report.n_found:,} of {report.n_model_genes:,} model genes "
            f"({report.gene_fraction:.1%}) are in the query, below map.min_overlap "
            f"({mc.min_overlap:.0%}); likely cause: {cause}"
        )
        raise CensusScviError(msg)
    if report.gene_fraction < mc.warn_overlap:
        logger.warning(
            "map: only %.1f%% of the model's genes are in the query (warning under %.0f%%); "
            "the missing ones are zero-filled and predictions may be less reliable",
            100 * report.gene_fraction,
            100 * mc.warn_overlap,
        )
    if report.n_duplicate_ids:
        logger.warning("map: %s", duplicates_line(report, adata, model_genes, gene_ids))
    return report


def duplicates_line(
    report: OverlapReport, adata: ad.AnnData, model_genes: Sequence[str], gene_ids: str | None
) -> str:
    """``"N query columns repeat ... (e.g. 'ENSG...'): their counts are summed"``."""
    s, _, _ = gene_selection(query_gene_ids(adata, gene_ids), model_genes)
    per_gene = np.diff(s.tocsc().indptr)
    shared = np.flatnonzero(per_gene > 1)
    example = f", e.g. {model_genes[int(shared[0])]!r} from {int(per_gene[shared[0]])} columns"
    return (
        f"{report.n_duplicate_ids:,} query column(s) repeat the gene id of another "
        f"({shared.size:,} model gene(s){example if shared.size else ''}): their counts are "
        "summed into that gene"
    )


def _annotate(
    adata: ad.AnnData,
    z: npt.NDArray[np.float32],
    res: TransferResult,
    report: OverlapReport,
    labels: str,
    inputs: _Inputs,
    run_dir: Path,
    search: _Search,
    scores: TruthScores | None,
) -> None:
    """Add the latent, the predictions and the map report to the query."""
    mc = inputs.config.map
    adata.obsm[OBSM_KEY] = z
    adata.obs[f"predicted_{labels}"] = pd.Categorical(res.labels.astype(str))
    adata.obs[f"predicted_{labels}_confidence"] = res.confidence
    overlap = {k: ", ".join(v) if isinstance(v, list) else v for k, v in report.to_dict().items()}
    overlap["duplicate_ids"] = "summed"
    uns: dict[str, Any] = {
        "overlap": overlap,
        "run_dir": str(run_dir.resolve()),
        "model": str(inputs.model.resolve()),
        "census": inputs.census.name(),
        "label_key": labels,
        "n_neighbors": mc.n_neighbors,
        "unknown_threshold": mc.unknown_threshold,
        "n_reference_cells": search.n_cells,
        "n_embedded_cells": search.sample.n_embedded,
        **search.plan.to_uns(),
    }
    if scores is not None:
        uns["truth"] = scores.to_uns()
    adata.uns[UNS_KEY] = uns
