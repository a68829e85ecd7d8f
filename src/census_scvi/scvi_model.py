"""The embed stage's model side: load the trained encoder, run it on count chunks, save the
minified query model.

The encoder pass calls the scvi-tools module exactly as ``SCVI.get_latent_representation(
return_dist=True)`` does (``module.inference(**module._get_inference_input(tensors))``, posterior
``qz.loc`` and ``qz.scale ** 2``) but on sparse chunks we read ourselves, so no AnnData (and no
``to_anndata`` of the whole census) is ever built around the counts.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from census_scvi.constants import BATCH_KEY
from census_scvi.errors import CensusScviError

if TYPE_CHECKING:
    import pandas as pd
    import scipy.sparse as sp

__all__ = [
    "EncoderModel",
    "batch_indices",
    "encode_csr",
    "load_encoder",
    "model_registry",
    "model_var_names",
    "quiet_scvi",
    "save_minified_model",
]

logger = logging.getLogger(__name__)


@dataclass
class EncoderModel:
    """A trained SCVI model ready for encoder passes."""

    model: Any  # scvi.model.SCVI (kept untyped so this module imports without scvi)
    var_names: npt.NDArray[np.object_]
    batch_key: str
    batch_categories: npt.NDArray[np.object_]
    encodes_batch: bool
    n_latent: int

    @property
    def module(self) -> Any:
        return self.model.module


@contextlib.contextmanager
def quiet_scvi() -> Iterator[None]:
    """Silence scvi-tools' INFO chatter ("File ... already downloaded") while loading models."""
    import scvi

    before = scvi.settings.verbosity
    scvi.settings.verbosity = max(before, logging.WARNING)
    try:
        yield
    finally:
        scvi.settings.verbosity = before


def model_registry(model_dir: Path) -> dict[str, Any]:
    import scvi

    if not (model_dir / "model.pt").is_file():
        msg = f"no trained model at {model_dir} (model.pt missing)"
        raise CensusScviError(msg, hint="run 'census-scvi train' first (or check model.filename)")
    with quiet_scvi():
        registry: dict[str, Any] = scvi.model.SCVI.load_registry(str(model_dir))
    if registry.get("model_name", "SCVI") != "SCVI":
        msg = f"the model at {model_dir} is a {registry.get('model_name')}, not an SCVI model"
        raise CensusScviError(msg)
    setup = registry.get("setup_args", {})
    extra = [k for k in ("categorical_covariate_keys", "continuous_covariate_keys") if setup.get(k)]
    if extra:
        msg = f"the model at {model_dir} uses covariates ({', '.join(extra)}), which embed cannot supply"
        raise CensusScviError(msg, hint="train with census-scvi (batch covariate only)")
    return registry


def load_encoder(model_dir: str | Path, *, accelerator: str = "auto") -> EncoderModel:
    """Load a saved SCVI model for encoding without its training AnnData.

    Parameters
    ----------
    model_dir
        An scvi-tools save folder (``train/scvi.model``).
    accelerator
        Lightning accelerator name for the forward passes.

    Returns
    -------
    The model in eval mode, its genes (``var_names``, in model order), batch registry and whether
    its encoder sees the batch (``encode_covariates``).
    """
    import anndata as ad
    import pandas as pd
    import scipy.sparse as sp
    import scvi

    model_dir = Path(model_dir)
    registry = model_registry(model_dir)
    fields = registry["field_registries"]
    var_names = np.asarray(fields["X"]["state_registry"]["column_names"], dtype=object)
    batch_state = fields.get("batch", {}).get("state_registry", {})
    categories = np.asarray(batch_state.get("categorical_mapping", ["0"]), dtype=object)
    batch_key = batch_state.get("original_key") or BATCH_KEY

    # A one-cell stand-in AnnData lets SCVI.load rebuild the module from the registry (its batch
    # value is a known category; the encoder never sees it when encode_covariates is false). It
    # holds one count: SCVI.load takes an all-zero X for a minified AnnData.
    stub_x = sp.csr_matrix(
        (np.ones(1, dtype=np.float32), ([0], [0])), shape=(1, len(var_names)), dtype=np.float32
    )
    stub = ad.AnnData(
        X=stub_x,
        obs=pd.DataFrame({batch_key: pd.Categorical([categories[0]])}, index=["0"]),
        var=pd.DataFrame(index=pd.Index(var_names.astype(str))),
    )
    with quiet_scvi():
        model = scvi.model.SCVI.load(str(model_dir), adata=stub, accelerator=accelerator)
    model.module.eval()
    encodes_batch = bool(getattr(model.module, "encode_covariates", False))
    n_latent = int(getattr(model.module, "n_latent", model.init_params_["non_kwargs"]["n_latent"]))
    return EncoderModel(
        model=model,
        var_names=var_names,
        batch_key=str(batch_key),
        batch_categories=categories,
        encodes_batch=encodes_batch,
        n_latent=n_latent,
    )


def batch_indices(
    encoder: EncoderModel, labels: npt.NDArray[np.object_] | None, n: int
) -> npt.NDArray[np.int64]:
    """The model's batch code for each cell (all zeros when the encoder ignores the batch).

    An encoder that sees the batch (``encode_covariates=True``) cannot embed batches it never saw;
    those fail here with the unseen labels named.
    """
    if not encoder.encodes_batch or labels is None:
        return np.zeros(n, dtype=np.int64)
    import pandas as pd

    codes = pd.Index(encoder.batch_categories).get_indexer(labels)
    if (codes < 0).any():
        unseen = sorted(set(np.asarray(labels)[codes < 0].tolist()))
        msg = (
            f"the model encodes the batch (encode_covariates=true) and {len(unseen)} batch(es) "
            f"were not in training, e.g. {unseen[0]!r}"
        )
        raise CensusScviError(msg, hint="retrain with model.encode_covariates=false")
    return codes.astype(np.int64)


def encode_csr(
    encoder: EncoderModel,
    x: sp.csr_matrix,
    *,
    batch_index: npt.NDArray[np.int64] | None = None,
    batch_size: int = 4096,
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
    """Posterior mean and variance of the latent for the rows of a counts matrix.

    Parameters
    ----------
    encoder
        From :func:`load_encoder`.
    x
        Cells x model genes (model order), raw counts.
    batch_index
        The model's batch code per row (see :func:`batch_indices`); zeros when None.
    batch_size
        Rows densified and passed through the encoder at once.

    Returns
    -------
    ``(qz_mean, qz_var)``, float32 arrays of shape ``(n_rows, n_latent)``; equal to
    ``model.get_latent_representation(return_dist=True)`` on the same cells.
    """
    import torch
    from scvi import REGISTRY_KEYS
    from scvi.module._constants import MODULE_KEYS

    module = encoder.module
    device = module.device
    n = x.shape[0]
    if batch_index is None:
        batch_index = np.zeros(n, dtype=np.int64)
    mean = np.empty((n, encoder.n_latent), dtype=np.float32)
    var = np.empty((n, encoder.n_latent), dtype=np.float32)
    with torch.inference_mode():
        for start in range(0, n, batch_size):
            stop = min(start + batch_size, n)
            tensors = {
                REGISTRY_KEYS.X_KEY: torch.from_numpy(
                    np.asarray(x[start:stop].toarray(), dtype=np.float32)
                ).to(device),
                REGISTRY_KEYS.BATCH_KEY: torch.from_numpy(batch_index[start:stop, None]).to(device),
            }
            out = module.inference(**module._get_inference_input(tensors))
            if MODULE_KEYS.QZ_KEY in out:
                qzm, qzv = out[MODULE_KEYS.QZ_KEY].loc, out[MODULE_KEYS.QZ_KEY].scale.square()
            else:
                qzm, qzv = out[MODULE_KEYS.QZM_KEY], out[MODULE_KEYS.QZV_KEY]
            mean[start:stop] = qzm.cpu().numpy()
            var[start:stop] = qzv.cpu().numpy()
    return mean, var


def save_minified_model(
    model_dir: str | Path,
    out_dir: str | Path,
    *,
    obs: pd.DataFrame,
    var_names: npt.NDArray[np.object_],
    batch_key: str,
    qz_mean: npt.NDArray[np.float32],
    qz_var: npt.NDArray[np.float32],
    library_size: npt.NDArray[np.float32],
    seed: int = 0,
    accelerator: str = "auto",
) -> None:
    """Save the query model with a minified AnnData, as the original create-latent step did.

    The original loaded every cell's counts, ran ``SCVI.load_query_data`` and
    ``minify_adata``. We give ``load_query_data`` an AnnData whose X is an all-zero sparse matrix
    (no counts are ever held) and fill in what minification needs from the embed outputs:
    the posterior mean/variance (``obsm``) and the observed library size (``obs``).

    Parameters
    ----------
    model_dir
        The reference model (``train/scvi.model``).
    out_dir
        Folder to save into (``embed/final_scvi_optimized``); ``scvi.model.SCVI.load`` reads it.
    obs
        One row per embedded cell (index: str soma_joinid), holding ``batch_key``.
    var_names
        The model's genes.
    batch_key
        The obs column the model was registered on.
    qz_mean, qz_var, library_size
        Per-cell posterior mean, variance and total counts over the model's genes.
    seed
        Seeds the random initial weights ``load_query_data`` gives batches new to the model.
    accelerator
        Lightning accelerator name.
    """
    import anndata as ad
    import pandas as pd
    import scipy.sparse as sp
    import scvi
    import torch

    n = len(obs)
    if not (len(qz_mean) == len(qz_var) == len(library_size) == n):
        msg = "obs, latent and library size lengths differ"
        raise AssertionError(msg)
    obs = obs.copy()
    obs[batch_key] = pd.Categorical(np.asarray(obs[batch_key]).astype(str))
    adata = ad.AnnData(
        X=sp.csr_matrix((n, len(var_names)), dtype=np.float32),
        obs=obs,
        var=pd.DataFrame(index=pd.Index(np.asarray(var_names).astype(str))),
    )
    torch.manual_seed(seed)
    with quiet_scvi():
        model = scvi.model.SCVI.load_query_data(adata, str(model_dir), accelerator=accelerator)
    model.is_trained = True
    # under the model's own obsm keys, so the minified AnnData holds one copy of each
    qzm_key, qzv_key = model._LATENT_QZM_KEY, model._LATENT_QZV_KEY
    adata.obsm[qzm_key] = np.asarray(qz_mean, dtype=np.float32)
    adata.obsm[qzv_key] = np.asarray(qz_var, dtype=np.float32)
    with quiet_scvi():
        model.minify_adata(use_latent_qzm_key=qzm_key, use_latent_qzv_key=qzv_key)
    # minify_adata sums X for the library size; ours is all zeros, so set the real totals
    model.adata.obs[model._OBSERVED_LIB_SIZE_KEY] = np.asarray(library_size, dtype=np.float32)
    with quiet_scvi():
        model.save(str(out_dir), save_anndata=True, overwrite=True)


def model_var_names(path: Path) -> pd.Index:
    """The genes (feature_ids, in model order) a saved scvi-tools model was trained on."""
    import pandas as pd

    registry = model_registry(Path(path))
    return pd.Index(registry["field_registries"]["X"]["state_registry"]["column_names"])
