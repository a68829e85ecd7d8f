"""Config -> scvi-tools: the ``SCVI`` arguments, the plan arguments, the model and its data.

In memory mode the model is set up on the prepared AnnData, as a user of scvi-tools would. In
stream mode it is set up on a few-row AnnData that carries the same registry (genes, batch
categories) and its cells come from :class:`~census_scvi.train._datamodule.SomaStreamDataModule`.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any

import numpy as np

from census_scvi.constants import BATCH_KEY, MEASUREMENT, X_RAW

if TYPE_CHECKING:
    import anndata

    from census_scvi.config import Config, ModelConfig, TrainingPlanConfig
    from census_scvi.train._inputs import TrainInputs

__all__ = ["build_model", "registry_adata", "scvi_model_kwargs", "scvi_plan_kwargs"]


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


def build_model(config: Config, inputs: TrainInputs) -> tuple[Any, Any, int]:
    """``(model, datamodule or None, n_cells)``: the SCVI model and, in stream mode, its data."""
    if inputs.mode == "memory":
        return _memory_model(config, inputs)
    return _stream_model(config, inputs)


def _memory_model(config: Config, inputs: TrainInputs) -> tuple[Any, None, int]:
    import anndata
    import pandas as pd
    import scvi

    assert inputs.adata_path is not None
    adata = anndata.read_h5ad(inputs.adata_path)
    adata.obs[BATCH_KEY] = pd.Categorical(
        adata.obs[BATCH_KEY].astype(str), categories=inputs.categories
    )
    scvi.model.SCVI.setup_anndata(adata, batch_key=BATCH_KEY)
    return scvi.model.SCVI(adata, **scvi_model_kwargs(config.model)), None, adata.n_obs


def _stream_model(config: Config, inputs: TrainInputs) -> tuple[Any, Any, int]:
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
        num_workers=t.num_workers,
        measurement_name=MEASUREMENT,
        layer_name=X_RAW,
        tiledb_config=inputs.tiledb_config,
    )
    return model, dm, n_cells
