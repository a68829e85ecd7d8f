"""Config -> scvi-tools: the ``SCVI`` arguments, the plan arguments, the model and its data.

In memory mode the model is set up on the prepared AnnData, as a user of scvi-tools would, and
its cells come from :class:`~census_scvi.train._datamodule.MemoryDataModule` over that AnnData's
X (``train.memory_loader: census-scvi``: shuffled chunks, read-ahead thread, the stream design)
or from scvi-tools' own ``DataSplitter`` (``scvi-tools``, :func:`memory_loader_kwargs`). In
stream mode it is set up on a few-row AnnData that carries the same registry (genes, batch
categories) and its cells come from
:class:`~census_scvi.train._datamodule.SomaStreamDataModule`. Either way the model is a plain
``scvi.model.SCVI`` with the same registry and save format.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np

from census_scvi.constants import BATCH_KEY, MEASUREMENT, X_RAW

if TYPE_CHECKING:
    from pathlib import Path

    import anndata

    from census_scvi.config import Config, ModelConfig, TrainingPlanConfig
    from census_scvi.train._inputs import TrainInputs

__all__ = [
    "build_model",
    "distribution_checks_off",
    "memory_loader_kwargs",
    "registry_adata",
    "scvi_model_kwargs",
    "FusedOptimizer",
    "fused_plan_kwargs",
    "scvi_plan_kwargs",
]

logger = logging.getLogger(__name__)


def scvi_model_kwargs(model: ModelConfig) -> dict[str, Any]:
    """``scvi.model.SCVI(adata, **kwargs)`` arguments for every ``model`` key.

    ``n_hidden`` … ``latent_distribution`` are SCVI's own arguments; ``encode_covariates``,
    ``deeply_inject_covariates``, ``use_batch_norm``, ``use_layer_norm`` and ``var_activation``
    travel through SCVI's ``**kwargs`` to ``scvi.module.VAE`` (``var_activation: softplus`` becomes
    ``torch.nn.functional.softplus``; ``exp`` is VAE's default and is not passed).
    ``filename`` names the output folder and is not a model argument.
    """
    kwargs: dict[str, Any] = {
        "n_hidden": model.n_hidden,
        "n_latent": model.n_latent,
        "n_layers": model.n_layers,
        "dropout_rate": model.dropout_rate,
        "dispersion": model.dispersion,
        "gene_likelihood": model.gene_likelihood,
        "latent_distribution": model.latent_distribution,
        "encode_covariates": model.encode_covariates,
        "deeply_inject_covariates": model.deeply_inject_covariates,
        "use_batch_norm": model.use_batch_norm,
        "use_layer_norm": model.use_layer_norm,
    }
    if model.var_activation == "softplus":
        import torch

        kwargs["var_activation"] = torch.nn.functional.softplus
    return kwargs


def scvi_plan_kwargs(plan: TrainingPlanConfig) -> dict[str, Any]:
    """``plan_kwargs`` for scvi-tools' ``TrainingPlan``: every ``training_plan`` key, as is."""
    return plan.model_dump()


class FusedOptimizer:
    """scvi-tools' ``optimizer_creator`` for its Adam/AdamW with ``fused=True``.

    The same update as scvi-tools' own creator (same lr, eps, weight decay), computed by torch's
    fused kernel: one pass per parameter instead of the foreach kernel's several. Measured on 2
    busy CPU cores, one optimizer step of scVI over 8000 genes (n_layers 2, n_latent 50):
    n_hidden 512 (17.0M parameters) 630 -> 89 ms, n_hidden 128 (4.2M) 49 -> 15 ms
    (``benchmarks/bench_optimizer.py``). A class, not a lambda: Lightning's
    checkpoints and DDP's spawned ranks pickle it.
    """

    def __init__(self, name: str, lr: float, eps: float, weight_decay: float) -> None:
        self.name, self.lr, self.eps, self.weight_decay = name, lr, eps, weight_decay

    def __call__(self, params: Any) -> Any:
        import torch

        cls = torch.optim.AdamW if self.name == "AdamW" else torch.optim.Adam
        return cls(params, lr=self.lr, eps=self.eps, weight_decay=self.weight_decay, fused=True)


def fused_plan_kwargs(kwargs: dict[str, Any], accelerator: str) -> dict[str, Any]:
    """``plan_kwargs`` with Adam/AdamW made fused (:class:`FusedOptimizer`) on CPU or CUDA."""
    if kwargs.get("optimizer") not in ("Adam", "AdamW") or accelerator not in (
        "cpu",
        "gpu",
        "cuda",
    ):
        return kwargs
    creator = FusedOptimizer(
        kwargs["optimizer"], kwargs["lr"], kwargs["eps"], kwargs["weight_decay"]
    )
    return {**kwargs, "optimizer": "Custom", "optimizer_creator": creator}


def registry_adata(inputs: TrainInputs) -> anndata.AnnData:
    """A few-row AnnData that carries the model registry for a streamed model.

    One row per batch category: var_names are the genes, obs ``batch`` the categories, X is
    empty. The registry is then what memory mode registers for the same prepared cells.
    """
    import anndata
    import pandas as pd
    import scipy.sparse as sp

    n = len(inputs.categories)
    obs = pd.DataFrame(
        {BATCH_KEY: pd.Categorical(inputs.categories, categories=inputs.categories)},
        index=[f"batch-{i}" for i in range(n)],
    )
    var = pd.DataFrame(index=pd.Index(inputs.gene_ids, name=None))
    return anndata.AnnData(X=sp.csr_matrix((n, inputs.n_genes), dtype=np.float32), obs=obs, var=var)


def memory_loader_kwargs(num_workers: int, *, distributed: bool) -> dict[str, Any]:
    """``datasplitter_kwargs`` of memory mode: the DataLoader workers, and equal DDP shares.

    With workers they are persistent: started once per training, not once per epoch and per
    validation (the original config's 4 workers made 40 small epochs 2.1x slower than none;
    measured here on a busy 2-core machine, 40 epochs of 1,500 cells: 114-189 s of fit with 4
    workers started per epoch against 44-97 s with none, 23-69 s with 2 persistent ones, the
    cap of :func:`~._devices.loader_workers`; ``benchmarks/bench_train_workers.py``), and
    the loaders draw their iterators' base seed from a generator of their own rather than from
    torch's global one: a persistent loader makes its iterator once per fit, so a resumed fit
    would otherwise draw one number more from the global generator than the uninterrupted one
    and shuffle differently from then on. (The shuffle itself still comes from the global
    generator, as in scvi-tools: a ``RandomSampler`` without a generator.)
    """
    kwargs: dict[str, Any] = {"num_workers": num_workers}
    if num_workers > 0:
        import torch

        kwargs["persistent_workers"] = True
        kwargs["generator"] = torch.Generator()
    if distributed:
        # give each rank a disjoint, equal share: drop up to world-1 cells rather than
        # repeat cells on some ranks (DistributedSampler's default), as stream mode does
        kwargs["drop_dataset_tail"] = True
    return kwargs


@contextlib.contextmanager
def distribution_checks_off() -> Iterator[None]:
    """Within the block, ``torch.distributions`` objects do not check their arguments.

    Every ``Normal(loc, scale)`` scvi-tools builds (encoder posteriors, prior, library size)
    checks by default (``Distribution._validate_args``, on unless python runs with ``-O``), and
    each check reads ``constraint.check(x).all()`` on the host: on a GPU a wait for the device,
    several times per step. scvi-tools has no switch for it (``scvi.settings`` has none in 1.4;
    its own count distributions already pass ``validate_args=False``), so torch's process-wide
    default is turned off here and restored after. What the checks caught while training, NaN
    parameters from NaN weights, then makes a NaN loss, which
    :class:`~._callbacks.NonFiniteLossGuard` stops at with its one-line error.
    """
    from torch.distributions import Distribution

    before = Distribution._validate_args
    Distribution.set_default_validate_args(False)
    try:
        yield
    finally:
        Distribution.set_default_validate_args(before)


def build_model(
    config: Config, inputs: TrainInputs, *, num_workers: int = 0, cache_dir: Path | None = None
) -> tuple[Any, Any, int]:
    """``(model, datamodule or None, n_cells)``: the SCVI model and the data module it trains on.

    The data module is None for ``train.memory_loader: scvi-tools`` (``model.train`` makes its
    ``DataSplitter``). ``num_workers`` is the stream data module's DataLoader workers (with
    scvi-tools' loader they are given to ``model.train``, :func:`memory_loader_kwargs`; the
    census-scvi memory loader uses none). ``cache_dir``: stream mode's local cache
    (:mod:`._stream_cache`), when ``train.stream_cache`` is on.
    """
    if inputs.mode == "memory":
        if num_workers and config.train.memory_loader == "census-scvi":
            logger.info(
                "train.num_workers=%d not used: memory mode's census-scvi loader reads ahead in "
                "a thread (train.memory_loader: scvi-tools uses workers)",
                num_workers,
            )
        built = _memory_model(config, inputs)
    else:
        # one epoch reads every cell once: a cache would only cost disk
        cache = cache_dir if config.train.stream_cache and config.train.max_epochs > 1 else None
        built = _stream_model(config, inputs, num_workers=num_workers, cache_dir=cache)
    if config.train.fast_likelihood:
        # same numbers, ~3-4x faster likelihood on CPU (docs/benchmarks.md); the saved model
        # stays a plain scvi.model.SCVI
        from census_scvi.train._likelihood import install_fast_likelihood

        install_fast_likelihood(built[0])
    return built


def _memory_model(config: Config, inputs: TrainInputs) -> tuple[Any, Any, int]:
    import anndata
    import pandas as pd
    import scvi

    assert inputs.adata_path is not None
    adata = anndata.read_h5ad(inputs.adata_path)
    adata.obs[BATCH_KEY] = pd.Categorical(
        adata.obs[BATCH_KEY].astype(str), categories=inputs.categories
    )
    scvi.model.SCVI.setup_anndata(adata, batch_key=BATCH_KEY)
    model = scvi.model.SCVI(adata, **scvi_model_kwargs(config.model))
    t = config.train
    if t.memory_loader == "scvi-tools":
        return model, None, adata.n_obs
    from census_scvi.train._datamodule import MemoryDataModule

    dm = MemoryDataModule(
        adata.X,
        # the integers the model's registry gave the batch categories
        batch_codes=model.adata_manager.get_from_registry(scvi.REGISTRY_KEYS.BATCH_KEY),
        n_batch=len(inputs.categories),
        train_size=t.train_size,
        batch_size=t.batch_size,
        seed=t.seed,
        io_batch_size=t.stream_io_batch_size,
        shuffle_chunk_size=t.stream_shuffle_chunk_size,
    )
    return model, dm, adata.n_obs


def _stream_model(
    config: Config, inputs: TrainInputs, *, num_workers: int, cache_dir: Path | None
) -> tuple[Any, Any, int]:
    import scvi

    from census_scvi.train._datamodule import SomaStreamDataModule

    assert inputs.cell_joinids is not None and inputs.cell_codes is not None
    reg = registry_adata(inputs)
    with warnings.catch_warnings():
        # one row per category by construction; the real counts are in cells.parquet
        warnings.filterwarnings("ignore", message="Category .* has fewer than 3 cells")
        scvi.model.SCVI.setup_anndata(reg, batch_key=BATCH_KEY)
    model = scvi.model.SCVI(reg, **scvi_model_kwargs(config.model))
    n_cells = len(inputs.cell_joinids)
    x_reg = model.adata_manager.registry["field_registries"]["X"]
    x_reg["state_registry"]["n_obs"] = n_cells
    x_reg["summary_stats"]["n_cells"] = n_cells
    t = config.train
    dm = SomaStreamDataModule(
        str(inputs.experiment_uri),
        obs_joinids=inputs.cell_joinids,
        batch_codes=inputs.cell_codes,
        var_joinids=inputs.var_joinids,
        n_batch=len(inputs.categories),
        train_size=t.train_size,
        batch_size=t.batch_size,
        seed=t.seed,
        io_batch_size=t.stream_io_batch_size,
        shuffle_chunk_size=t.stream_shuffle_chunk_size,
        num_workers=num_workers,
        measurement_name=MEASUREMENT,
        layer_name=X_RAW,
        tiledb_config=inputs.tiledb_config,
        cache_dir=cache_dir,
    )
    return model, dm, n_cells
