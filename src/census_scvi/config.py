"""Typed, frozen, validated configuration (one YAML file, sections as in the original pipeline).

The original ``scvi-config.yaml`` loads unchanged and every key in it is honoured. Unknown keys,
wrong types and out-of-range values fail at load time with the section, the key, the value and the
valid choices. Importing this module does not import torch.

Examples
--------
>>> from census_scvi.config import load_config
>>> cfg = load_config("configs/census.yaml", overrides=["train.max_epochs=5"])
>>> cfg.train.max_epochs
5
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from census_scvi.constants import BATCH_METRICS, BIO_METRICS, CACHE_ENV
from census_scvi.errors import CensusScviError

__all__ = [
    "AnnDataConfig",
    "CensusConfig",
    "Config",
    "DemoConfig",
    "EmbedConfig",
    "EvaluateConfig",
    "HvgConfig",
    "MapConfig",
    "ModelConfig",
    "OutputConfig",
    "SearchConfig",
    "TrainConfig",
    "TrainingPlanConfig",
    "cache_dir",
    "config_hash",
    "default_config_path",
    "dump_config",
    "load_config",
]


_NUMBERS = (int, float, int | None, float | None)
_BOOLS = (bool, bool | None)
#: Config keys that name a file or folder inside a stage directory.
_FILE_NAME_FIELDS = ("filename", "model_filename")
#: Names a stage uses itself: a config name may not shadow (and so delete) them.
_RESERVED_NAMES = frozenset(
    {"manifest.json", "config.yaml", "logs", "checkpoints", "hvg.parquet", "cells.parquet"}
)
#: Marks a key that decides what runs after a stage, not the stage's outputs: config_hash leaves
#: it out, so switching it does not redo the stage (embed.index).
_UNHASHED: dict[str, Any] = {"hashed": False}


def check_file_name(name: str, *, key: str, reserved: Iterable[str] = ()) -> str:
    """``name`` if it is a plain file name (no folder part, not ``..``, not hidden), else an error.

    Examples
    --------
    >>> check_file_name("scvi.model", key="model.filename")
    'scvi.model'
    """
    bad = (
        not name
        or name in (".", "..")
        or name.startswith(".")
        or "/" in name
        or "\\" in name
        or "\0" in name
        or Path(name).is_absolute()
    )
    if bad:
        msg = f"{key} must be a plain file name (no '/', '..', leading '.' or absolute path)"
        raise ValueError(msg)
    if name in reserved:
        msg = f"{name!r} is a name census-scvi uses itself; choose another name"
        raise ValueError(msg)
    return name


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)

    @field_validator("*", mode="before")
    @classmethod
    def _strict_numbers_and_bools(cls, v: Any, info: ValidationInfo) -> Any:
        """``max_epochs: true`` is not 1 and ``early_stopping: 1`` is not true (YAML's 1.1 lax types)."""
        ann = cls.model_fields[info.field_name].annotation if info.field_name else None
        if isinstance(v, bool) and ann in _NUMBERS:
            msg = f"expected a number, got {v!r}"
            raise ValueError(msg)
        if ann in _BOOLS and v is not None and not isinstance(v, bool):
            msg = f"expected true or false, got {v!r}"
            raise ValueError(msg)
        return v

    @field_validator(*_FILE_NAME_FIELDS, mode="after", check_fields=False)
    @classmethod
    def _plain_file_name(cls, v: str, info: ValidationInfo) -> str:
        """Names joined under ``RUN_DIR/<stage>/`` (and removed when a stage redoes) stay there."""
        return check_file_name(v, key="the name", reserved=_RESERVED_NAMES)


class DemoConfig(_Section):
    """How to build the mini census when ``census.uri`` does not exist yet (demo config only)."""

    cells: int = Field(20_000, gt=0, description="human cells; mouse gets a tenth")
    genes: int = Field(2_000, gt=0, description="human genes; mouse gets half")
    seed: int = Field(0, ge=0)


class CensusConfig(_Section):
    """Which census and which cells."""

    organism: str = Field("homo_sapiens", description="'homo_sapiens' or 'Homo sapiens' style")
    obs_query: str | None = Field(
        None, description="extra obs filter (train on a subset; embed exactly these cells)"
    )
    obs_query_model: str = Field(
        "is_primary_data == True and nnz >= 300",
        description="filter for the cells the model is trained on",
    )
    version: str | None = Field(
        "stable", description="Census release for cellxgene_census.open_soma (network)"
    )
    uri: str | None = Field(
        None,
        description="local path or URI of a SOMA census root; wins over version. "
        "'{cache}' expands to the per-user cache folder",
    )
    timeout_s: float = Field(
        30.0,
        gt=0,
        description="seconds any network call (Census release directory, S3 connect/request) "
        "may take before census-scvi gives up with the offline message",
    )
    demo: DemoConfig | None = Field(
        None, description="if set and uri does not exist, build the mini census there first"
    )

    @field_validator("obs_query", "obs_query_model")
    @classmethod
    def _strip(cls, v: str | None) -> str | None:
        if v is None:
            return None
        v = v.strip()
        return v or None


class HvgConfig(_Section):
    """Highly variable gene selection (Seurat v3 on raw counts, batched)."""

    top_n_hvg: int = Field(8000, gt=0, description="number of HVGs to keep")
    hvg_batch: list[str] = Field(
        default_factory=lambda: ["suspension_type", "assay"],
        description="obs columns whose combination is the HVG batch",
    )
    min_genes: int | None = Field(
        None,
        ge=0,
        description="cells with fewer expressed genes (obs nnz) than this are left out of HVG "
        "selection and training, i.e. 'nnz >= min_genes' is added to obs_query_model "
        "(scanpy's filter_cells(min_genes=) meaning; it is counted as its own condition in "
        "the prepare summary, and embed still embeds every cell); null: no extra filter",
    )
    span: float = Field(
        0.3, gt=0.0, le=1.0, description="LOESS span of the Seurat v3 mean-variance fit"
    )
    max_loess_jitter: float = Field(
        1e-6,
        gt=0.0,
        description="when the LOESS fit fails numerically, retry with jitter up to this",
    )
    chunk_nnz: int = Field(
        4_000_000,
        ge=10_000,
        description="stored values read from X per chunk in every prepare pass; peak memory "
        "is about 100 bytes x chunk_nnz plus per-cell obs, whatever the number of cells",
    )
    processes: int = Field(
        1,
        ge=1,
        description="processes that split each HVG pass (partial sums merged in order; the "
        "same HVGs as one process); each holds one chunk, so memory grows with it",
    )
    read_buffer_bytes: int = Field(
        128 * 1024**2,
        ge=1024**2,
        description="TileDB read buffer per column (soma.init_buffer_bytes) during prepare",
    )


class AnnDataConfig(_Section):
    """The batch label and the prepared h5ad."""

    batch_key: list[str] = Field(
        default_factory=lambda: ["dataset_id", "assay", "suspension_type", "donor_id"],
        min_length=1,
        description="obs columns joined into the 'batch' label",
    )
    model_filename: str = Field("anndata_model.h5ad", description="prepared h5ad file name")
    batch_key_separator: str = Field(
        "//", description="separator between batch_key parts; '' reproduces the original labels"
    )
    write_hv_genes_pkl: bool = Field(
        False, description="also write the original pipeline's prepare/hv_genes.pkl"
    )
    compression: Literal["gzip", "lzf", "none"] = Field(
        "lzf",
        description="h5py compression of anndata_model.h5ad's X. lzf (default): fast, about "
        "1.4x the size of gzip, read by h5py/anndata (bundled filter); gzip: smallest and "
        "readable by any HDF5 tool, as the original, but it adds ~30% to prepare's wall time; "
        "none: fastest, ~4x larger",
    )
    compression_level: int = Field(
        1,
        ge=1,
        le=9,
        description="gzip level (gzip only); 1 writes about 1.7x faster than h5py's default 4 "
        "for ~4% larger files",
    )

    @field_validator("batch_key_separator")
    @classmethod
    def _no_backslash(cls, v: str) -> str:
        if "\\" in v:
            msg = f"batch_key_separator={v!r} must not contain a backslash (used to escape it)"
            raise ValueError(msg)
        return v


class ModelConfig(_Section):
    """scvi.model.SCVI arguments."""

    filename: str = Field("scvi.model", description="model folder name under train/")
    n_hidden: int = Field(128, gt=0)
    n_latent: int = Field(10, gt=0)
    n_layers: int = Field(1, gt=0)
    dropout_rate: float = Field(0.1, ge=0.0, lt=1.0)
    gene_likelihood: Literal["nb", "zinb", "poisson"] = "nb"
    dispersion: Literal["gene", "gene-batch", "gene-label", "gene-cell"] = "gene"
    latent_distribution: Literal["normal", "ln"] = "normal"
    encode_covariates: bool = Field(
        False, description="must stay false for embed/map of unseen batches"
    )
    deeply_inject_covariates: bool = True
    use_batch_norm: Literal["encoder", "decoder", "none", "both"] = "both"
    use_layer_norm: Literal["encoder", "decoder", "none", "both"] = "none"
    var_activation: Literal["exp", "softplus"] = Field(
        "exp", description="encoder variance activation; softplus avoids NaNs at scale"
    )


class TrainConfig(_Section):
    """Trainer and data settings."""

    max_epochs: int = Field(100, gt=0)
    batch_size: int = Field(128, gt=0)
    train_size: float = Field(0.9, gt=0.0, le=1.0)
    early_stopping: bool = False
    early_stopping_patience: int = Field(45, gt=0)
    early_stopping_monitor: Literal[
        "elbo_validation", "reconstruction_loss_validation", "kl_local_validation"
    ] = "elbo_validation"
    early_stopping_min_delta: float = Field(0.0, ge=0.0)
    multi_gpu: bool = False
    num_workers: int = Field(0, ge=0)
    devices: int | list[int] | Literal["auto"] = "auto"
    accelerator: Literal["auto", "cpu", "gpu", "cuda", "mps"] = "auto"
    num_nodes: int = Field(1, gt=0)
    strategy: str | None = Field(None, description="Lightning strategy; default ddp when >1 device")
    mode: Literal["memory", "stream"] = Field(
        "memory", description="memory: read prepare/anndata_model.h5ad; stream: read SOMA"
    )
    memory_loader: Literal["census-scvi", "scvi-tools"] = Field(
        "census-scvi",
        description="memory mode's mini-batches: census-scvi: shuffled chunks of "
        "stream_shuffle_chunk_size rows in I/O batches of stream_io_batch_size, as stream mode "
        "does, the next mini-batch built in a background thread (faster; no DataLoader worker "
        "processes); scvi-tools: its DataSplitter / AnnDataLoader (indexes the AnnData per "
        "mini-batch on the training thread; uses train.num_workers). Same train/validation "
        "split either way",
    )
    seed: int = Field(0, ge=0)
    checkpoint_every_n_epochs: int = Field(1, gt=0)
    checkpoint_every_minutes: float | None = Field(
        10.0,
        gt=0,
        description="also checkpoint when this many minutes passed since the last checkpoint "
        "(whichever of this and checkpoint_every_n_epochs comes first); null: by epochs only",
    )
    fused_optimizer: bool = Field(
        True,
        description="Adam/AdamW with torch's fused kernel (the same update, one pass per "
        "parameter; on CPU or CUDA); false: scvi-tools' default (torch's foreach kernel)",
    )
    fast_likelihood: bool = Field(
        True,
        description="train with census-scvi's same-math negative-binomial / ZINB likelihood "
        "(per-gene terms once per gene, zero-aware terms on non-zeros only; for nb its gradient "
        "in closed form from the decoder's logits) and, on CPU, the encoder's first layer from "
        "the counts' non-zeros; false: scvi-tools' own",
    )
    stream_io_batch_size: int = Field(
        16_384,
        gt=0,
        description="stream mode: cells read from SOMA per I/O batch (memory: two I/O batches "
        "of cells x model genes as CSR, whatever the number of cells)",
    )
    stream_cache: bool = Field(
        True,
        description="stream mode: keep the cells x model genes the first epoch reads in "
        "train/stream_cache/ (8 bytes per kept value; removed when training finishes) and read "
        "later epochs from there instead of SOMA (same data, same order); dropped with a "
        "warning when the disk would not hold it; not used for max_epochs 1, with num_workers > 0 "
        "or several ranks",
        json_schema_extra=_UNHASHED,
    )
    stream_shuffle_chunk_size: int = Field(
        256,
        gt=0,
        description="stream mode: cells (consecutive by soma_joinid) shuffled as a unit; larger "
        "reads faster, io_batch_size / shuffle_chunk_size chunks mix in each I/O batch",
    )

    @field_validator("devices")
    @classmethod
    def _devices(cls, v: Any) -> Any:
        if isinstance(v, int) and v < 1:
            msg = f"devices={v} must be >= 1, a list of device indices, or 'auto'"
            raise ValueError(msg)
        if isinstance(v, list) and not v:
            msg = "devices=[] is empty; give device indices, a count, or 'auto'"
            raise ValueError(msg)
        return v

    @model_validator(mode="after")
    def _stream_sizes(self) -> TrainConfig:
        if self.stream_io_batch_size % self.stream_shuffle_chunk_size:
            msg = (
                f"stream_io_batch_size={self.stream_io_batch_size} is not a multiple of "
                f"stream_shuffle_chunk_size={self.stream_shuffle_chunk_size}"
            )
            raise ValueError(msg)
        return self


class TrainingPlanConfig(_Section):
    """Keys passed to scvi-tools' TrainingPlan (``plan_kwargs``); others are rejected at load."""

    lr: float = Field(1e-3, gt=0.0)
    weight_decay: float = Field(1e-6, ge=0.0)
    eps: float = Field(0.01, gt=0.0)
    optimizer: Literal["Adam", "AdamW"] = "Adam"
    n_steps_kl_warmup: int | None = Field(None, ge=0)
    n_epochs_kl_warmup: int | None = Field(400, ge=0)
    reduce_lr_on_plateau: bool = False
    lr_factor: float = Field(0.6, gt=0.0, lt=1.0)
    lr_patience: int = Field(30, gt=0)
    lr_threshold: float = Field(0.0, ge=0.0)
    lr_scheduler_metric: Literal[
        "elbo_validation", "reconstruction_loss_validation", "kl_local_validation"
    ] = "elbo_validation"
    lr_min: float = Field(0.0, ge=0.0)
    max_kl_weight: float = Field(1.0, ge=0.0)
    min_kl_weight: float = Field(0.0, ge=0.0)


class EmbedConfig(_Section):
    """Embedding every cell."""

    chunk_size: int = Field(65_536, gt=0, description="cells per chunk read from SOMA")
    batch_size: int = Field(4096, gt=0, description="cells per encoder forward pass")
    io_block_size: int = Field(
        8192, gt=0, description="cells read from SOMA at once within a chunk (bounds memory)"
    )
    write_soma: bool = Field(True, description="write embed/embedding.soma")
    round_bfloat16: bool = Field(
        True,
        description="round embedding.soma's values to bfloat16 precision, as the Census "
        "contributed-embedding format requires (latent.npy keeps full precision)",
    )
    write_minified_model: bool = Field(
        True,
        description="write embed/final_scvi_optimized/ (written a block of cells at a time; "
        "its adata.h5ad holds every cell's obs: false skips it)",
    )
    minified_obs_columns: list[str] | None = Field(
        None,
        description="obs columns the minified model keeps (the batch parts always); null: all",
    )
    embedding_name: str = Field(
        "scvi",
        min_length=1,
        description="CxG_embedding_info embedding_name: the method's name, as the Census names "
        "its embeddings (scvi, geneformer, ...)",
    )
    title: str = Field(
        "census-scvi embedding",
        min_length=1,
        max_length=128,
        description="CxG_embedding_info title",
    )
    description: str = Field(
        "scVI latent space (posterior mean) trained with census-scvi", min_length=1, max_length=2048
    )
    submitter_name: str = Field("unknown", description="primary_contact name")
    submitter_email: str = Field("unknown", description="primary_contact email")
    submitter_affiliation: str = Field("unknown", description="primary_contact affiliation")
    additional_contacts: list[dict[str, str]] = Field(
        default_factory=list,
        description="more contacts: a list of {name, email, affiliation}",
    )
    doi: str = Field("", description="publication DOI (10.xxxx/...), not a URL; empty if none")
    embedding_id: str = Field("", description="CxG_embedding_info id (accession), if assigned")
    additional_information: str = Field("", description="CxG_embedding_info free text")
    model_link: str = Field("", description="CxG_embedding_info URL of the published model")
    accelerator: Literal["auto", "cpu", "gpu", "cuda", "mps"] = Field(
        "auto", description="device for the encoder forward passes"
    )
    index: bool = Field(
        False,
        description="build the nearest-cell index (census-scvi index, the search section) right "
        "after embed, in 'census-scvi embed' and 'run'",
        json_schema_extra=_UNHASHED,
    )

    @field_validator("additional_contacts")
    @classmethod
    def _contacts(cls, v: list[dict[str, str]]) -> list[dict[str, str]]:
        want = {"name", "email", "affiliation"}
        for i, contact in enumerate(v):
            if set(contact) != want:
                msg = f"additional_contacts[{i}] has keys {sorted(contact)}; each needs exactly {sorted(want)}"
                raise ValueError(msg)
        return v

    @field_validator("doi")
    @classmethod
    def _doi_not_url(cls, v: str) -> str:
        v = v.strip()
        if v and not re.match(r"^10\.\d{4,9}/\S+$", v):
            bare = re.sub(r"^(https?://)?(dx\.)?doi\.org/", "", v)
            msg = f"doi {v!r} is not a DOI (10.xxxx/suffix, not a URL); e.g. {bare!r}"
            raise ValueError(msg)
        return v


class EvaluateConfig(_Section):
    """Evaluation of the embedding."""

    sample_size: int = Field(50_000, gt=0, description="stratified sample of embedded cells")
    label_key: str = "cell_type"
    batch_keys: list[str] = Field(
        default_factory=lambda: ["dataset_id", "assay", "suspension_type"],
        description="batch parts evaluated besides the batch label",
    )
    n_pcs: int = Field(50, gt=0, description="PCA baseline dimensions")
    seed: int = Field(0, ge=0)
    skip_metrics: list[str] = Field(
        default_factory=lambda: ["kbet_per_label", "nmi_ari_cluster_labels_leiden"],
        description="scib-metrics metrics not computed (kBET: slowest, ~35 s of JAX compile on "
        "2 cores; Leiden NMI/ARI: off in scib-metrics' defaults too)",
    )
    test_size: float = Field(
        0.4, gt=0.0, lt=1.0, description="held-out fraction for the cell-type classifiers"
    )

    @field_validator("skip_metrics")
    @classmethod
    def _known_metrics(cls, v: list[str]) -> list[str]:
        known = (*BIO_METRICS, *BATCH_METRICS)
        bad = [m for m in v if m not in known]
        if bad:
            msg = f"unknown scib-metrics metric(s) {bad}; valid: {', '.join(known)}"
            raise ValueError(msg)
        return v


class MapConfig(_Section):
    """Mapping a user's dataset onto the model."""

    n_neighbors: int = Field(15, gt=0)
    warn_overlap: float = Field(0.8, ge=0.0, le=1.0, description="warn below this gene overlap")
    min_overlap: float = Field(0.3, ge=0.0, le=1.0, description="refuse below this gene overlap")
    unknown_threshold: float = Field(
        0.5, ge=0.0, le=1.0, description="confidence under which the label is 'unknown'"
    )
    reference_sample_size: int = Field(50_000, gt=0, description="reference cells in the UMAP")
    knn_reference_cells: int = Field(
        2_000_000,
        gt=0,
        description="reference cells (stratified by label) indexed for label transfer; all if fewer",
    )
    chunk_size: int = Field(16_384, gt=0, description="query cells aligned and encoded per chunk")
    batch_size: int = Field(1024, gt=0, description="cells per encoder forward pass")
    unknown_label: str = Field("unknown", description="the label of low-confidence cells")
    seed: int = Field(0, ge=0)
    use_index: bool = Field(
        True,
        description="search the run's index (census-scvi index) over every embedded cell when it "
        "is current; false: exact search over knn_reference_cells",
    )

    @model_validator(mode="after")
    def _overlap_order(self) -> MapConfig:
        if self.min_overlap > self.warn_overlap:
            msg = f"min_overlap={self.min_overlap} must be <= warn_overlap={self.warn_overlap}"
            raise ValueError(msg)
        return self


class SearchConfig(_Section):
    """The nearest-cell index (census-scvi index) and searching it (neighbors, map)."""

    partitions: int | None = Field(None, gt=0, description="k-means partitions; null: sqrt(cells)")
    k: int = Field(30, gt=0, description="neighbours per cell (neighbors) and the recall@k target")
    recall_target: float = Field(0.95, gt=0.0, le=1.0, description="recall the nprobe must reach")
    calibration_cells: int = Field(1000, gt=0, description="cells queried to calibrate nprobe")
    build_memory_mib: int = Field(64, gt=0, description="vectors read per build step, in MiB")
    memory_gib: float = Field(4.0, gt=0.0, description="index partitions held while querying")
    nprobe: int | None = Field(None, gt=0, description="partitions searched; null: calibrated")


class OutputConfig(_Section):
    """Where runs go."""

    run_dir: str = Field("census-scvi-runs/default", description="run directory (-o wins)")


class Config(_Section):
    """The whole configuration. Sections mirror the original ``scvi-config.yaml``."""

    census: CensusConfig = Field(default_factory=CensusConfig)  # type: ignore[arg-type]
    hvg: HvgConfig = Field(default_factory=HvgConfig)  # type: ignore[arg-type]
    anndata: AnnDataConfig = Field(default_factory=AnnDataConfig)  # type: ignore[arg-type]
    model: ModelConfig = Field(default_factory=ModelConfig)  # type: ignore[arg-type]
    train: TrainConfig = Field(default_factory=TrainConfig)  # type: ignore[arg-type]
    training_plan: TrainingPlanConfig = Field(default_factory=TrainingPlanConfig)  # type: ignore[arg-type]
    embed: EmbedConfig = Field(default_factory=EmbedConfig)  # type: ignore[arg-type]
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)  # type: ignore[arg-type]
    map: MapConfig = Field(default_factory=MapConfig)  # type: ignore[arg-type]
    search: SearchConfig = Field(default_factory=SearchConfig)  # type: ignore[arg-type]
    output: OutputConfig = Field(default_factory=OutputConfig)  # type: ignore[arg-type]

    @model_validator(mode="after")
    def _cross_checks(self) -> Config:
        if self.census.uri is None and self.census.version is None:
            msg = "census: set 'uri' (a local SOMA census) or 'version' (a Census release)"
            raise ValueError(msg)
        return self

    # -- convenience -------------------------------------------------------------------------
    def model_obs_filter(self) -> str:
        """The obs value filter for the training cells.

        ``obs_query_model``, ``obs_query`` and ``nnz >= hvg.min_genes``, each parenthesised and
        joined by ``and``.
        """
        parts = [self.census.obs_query_model, self.census.obs_query]
        if self.hvg.min_genes is not None:
            parts.append(f"nnz >= {self.hvg.min_genes}")
        return " and ".join(f"({p})" for p in parts if p)

    def census_uri(self) -> str | None:
        """``census.uri`` with ``{cache}`` and ``~`` expanded (None when unset)."""
        if self.census.uri is None:
            return None
        uri = self.census.uri.replace("{cache}", str(cache_dir()))
        if "://" not in uri:
            uri = str(Path(uri).expanduser())
        return uri


# ------------------------------------------------------------------------------------------
# loading
# ------------------------------------------------------------------------------------------
_SECTIONS: dict[str, type[_Section]] = {
    name: field.annotation  # type: ignore[misc]
    for name, field in Config.model_fields.items()
}


def cache_dir() -> Path:
    """Per-user cache folder: ``$CENSUS_SCVI_CACHE``, else ``$XDG_CACHE_HOME/census-scvi``."""
    if env := os.environ.get(CACHE_ENV):
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path("~/.cache").expanduser())
    return Path(base) / "census-scvi"


def default_config_path(name: str = "demo") -> Path:
    """Path of a bundled config (``demo`` or ``census``)."""
    here = Path(__file__).resolve().parent
    for folder in (here / "configs", here.parents[1] / "configs"):
        candidate = folder / f"{name}.yaml"
        if candidate.is_file():
            return candidate
    msg = f"bundled config '{name}.yaml' not found next to the package"
    raise CensusScviError(msg, hint="reinstall census-scvi")


def _suggest(key: str, valid: Iterable[str]) -> str:
    valid = list(valid)
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
    if close:
        return f"did you mean '{close[0]}'?"
    return "valid keys: " + ", ".join(sorted(valid))


def _check_keys(raw: Mapping[str, Any]) -> None:
    """Reject unknown sections/keys with a suggestion (friendlier than pydantic's message)."""
    for section, body in raw.items():
        if section not in _SECTIONS:
            msg = f"unknown section '{section}'; {_suggest(section, _SECTIONS)}"
            raise CensusScviError(msg)
        if body is None:
            continue
        if not isinstance(body, Mapping):
            msg = f"section '{section}' must be a mapping of keys to values, got {body!r}"
            raise CensusScviError(msg)
        fields = _SECTIONS[section].model_fields
        for key in body:
            if key not in fields:
                msg = f"unknown key '{key}' in section '{section}'; {_suggest(str(key), fields)}"
                raise CensusScviError(msg)


def _format_validation_error(err: ValidationError) -> str:
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"] if not str(p).startswith("function-"))
    value = first.get("input")
    text = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        return f"unknown key '{loc}'"
    more = len(err.errors()) - 1
    suffix = f" (and {more} more problem{'s' if more > 1 else ''})" if more else ""
    return f"invalid value for '{loc}': {value!r}: {text}{suffix}"


def _parse_override(item: str) -> tuple[str, str, Any]:
    if "=" not in item:
        msg = f"--set '{item}' is not of the form section.key=value"
        raise CensusScviError(msg, hint="e.g. --set train.max_epochs=5")
    lhs, rhs = item.split("=", 1)
    parts = lhs.strip().split(".")
    if len(parts) != 2 or not all(parts):
        msg = f"--set '{item}': the key must be section.key, got '{lhs}'"
        raise CensusScviError(msg, hint="e.g. --set train.max_epochs=5")
    try:
        value = yaml.safe_load(rhs) if rhs.strip() else None
    except yaml.YAMLError:
        value = rhs
    # a plain string for str fields: keep "2024-05-20" or "1e-4"-like text as the user typed it
    section, key = parts
    if section in _SECTIONS and key in _SECTIONS[section].model_fields:
        ann = str(_SECTIONS[section].model_fields[key].annotation)
        if ann in ("<class 'str'>", "str | None") and value is not None:
            value = rhs
    return section, key, value


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        msg = f"config file not found: {path}"
        raise CensusScviError(msg, hint="pass an existing YAML with -c, or omit -c for the demo")
    text = path.read_text()
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        msg = f"config {path} is not valid YAML{where}: {problem}"
        raise CensusScviError(msg) from None
    if raw is None:
        msg = f"config {path} is empty"
        raise CensusScviError(msg, hint="start from configs/demo.yaml or configs/census.yaml")
    if not isinstance(raw, dict):
        msg = f"config {path} must be a mapping of sections, got {type(raw).__name__}: {raw!r:.60}"
        raise CensusScviError(msg)
    return raw


def config_from_dict(raw: Mapping[str, Any], overrides: Iterable[str] = ()) -> Config:
    """Validate a mapping (as read from YAML) plus ``section.key=value`` overrides."""
    data: dict[str, dict[str, Any]] = {
        str(k): dict(v) if isinstance(v, Mapping) else v for k, v in raw.items()
    }
    _check_keys(data)
    for item in overrides:
        section, key, value = _parse_override(item)
        _check_keys({section: {key: value}})
        body = data.get(section)
        if not isinstance(body, dict):
            body = {}
            data[section] = body
        body[key] = value
    data = {k: v for k, v in data.items() if v is not None}
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        raise CensusScviError(_format_validation_error(e)) from None


def load_config(
    path: str | os.PathLike[str] | None = None, overrides: Iterable[str] = ()
) -> Config:
    """Load, validate and freeze a config.

    Parameters
    ----------
    path
        YAML file; ``None`` loads the bundled demo config.
    overrides
        ``section.key=value`` strings (values parsed as YAML, typed by the field).

    Returns
    -------
    The validated, frozen :class:`Config`.

    Examples
    --------
    >>> cfg = load_config(None, overrides=["model.n_latent=20"])
    >>> cfg.model.n_latent
    20
    """
    p = Path(path) if path is not None else default_config_path("demo")
    return config_from_dict(_read_yaml(p), overrides)


def dump_config(config: Config) -> str:
    """The resolved config (every default filled in) as YAML."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False, default_flow_style=False)


def config_hash(config: Config, sections: Iterable[str] | None = None) -> str:
    """Stable hash of the whole config or of some sections (for manifests)."""
    data = config.model_dump(mode="json")
    for name, section in _SECTIONS.items():
        for key, f in section.model_fields.items():
            if f.json_schema_extra == _UNHASHED:
                data[name].pop(key, None)
    if sections is not None:
        data = {s: data[s] for s in sections}
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]
