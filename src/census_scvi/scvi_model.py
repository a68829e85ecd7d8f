"""Every touch of scvi-tools internals: read a saved model safely, load the encoder, run it on
count chunks, save the minified query model.

Reading a model: scvi-tools loads ``model.pt`` with ``torch.load(weights_only=False)``, which
runs any pickled object inside, so a model file would be code. Here every read goes through
:func:`verify_torch_file`'s rules (:mod:`census_scvi._torch_files`, re-exported here): the file
is read into memory once, its pickle is checked for globals outside an explicit allow-list
(:func:`model_file_globals`) and unpickled by torch's restricted ``weights_only`` unpickler;
scvi-tools then gets objects unpickled from those same bytes (:func:`_verified_model`), never the
path. The registry (genes, batch categories) is read
here only (:func:`model_info`).

The encoder pass calls the scvi-tools module exactly as ``SCVI.get_latent_representation(
return_dist=True)`` does (``module.inference(**module._get_inference_input(tensors))``, posterior
``qz.loc`` and ``qz.scale ** 2``) but on sparse chunks we read ourselves, so no AnnData (and no
``to_anndata`` of the whole census) is ever built around the counts.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from census_scvi._torch_files import (
    load_torch_bytes,
    model_file_globals,
    read_bytes,
    refuse,
    verify_torch_file,
)
from census_scvi.constants import BATCH_KEY
from census_scvi.errors import CensusScviError

if TYPE_CHECKING:
    import pandas as pd
    import scipy.sparse as sp

__all__ = [
    "MODEL_FILE",
    "EncoderModel",
    "ModelInfo",
    "batch_indices",
    "encode_csr",
    "load_encoder",
    "load_model",
    "load_torch_bytes",
    "model_file",
    "model_file_globals",
    "model_info",
    "model_registry",
    "model_var_names",
    "quiet_scvi",
    "save_minified_model",
    "verify_torch_file",
]

logger = logging.getLogger(__name__)

#: The file of an scvi-tools save folder that holds the weights and the registry.
MODEL_FILE = "model.pt"

_PATCH_LOCK = threading.RLock()


# ----------------------------------------------------------------------------------------------
# reading a model folder without running it
# ----------------------------------------------------------------------------------------------
def model_file(model_dir: str | os.PathLike[str]) -> Path:
    """``<model_dir>/model.pt``, the file scvi-tools' ``SCVI.save`` writes."""
    return Path(model_dir) / MODEL_FILE


def _read_model(model_dir: str | os.PathLike[str]) -> tuple[bytes, dict[str, Any]]:
    """The verified bytes of a model folder's ``model.pt`` and what they unpickle to."""
    path = model_file(model_dir)
    data = read_bytes(path)  # read once; verified as it is unpickled
    saved = load_torch_bytes(data, allowed=model_file_globals(), source=path)
    if not isinstance(saved, dict) or "attr_dict" not in saved:
        refuse(path, "is not an scvi-tools model file (no attr_dict)")
    return data, saved


@contextlib.contextmanager
def _verified_model(model_dir: str | os.PathLike[str]) -> Iterator[dict[str, Any]]:
    """Let scvi-tools read ``model_dir`` only from its verified bytes, inside this block.

    scvi-tools reads a saved model through ``_load_saved_files`` (``SCVI.load``,
    ``load_registry``, ``load_query_data``); inside the block that function, at each place
    scvi-tools imported it, unpickles the bytes verified at entry instead of opening the path.
    Yields what they unpickle to (``attr_dict``, ``var_names``, ``model_state_dict``).
    """
    import scvi.model.base._archesmixin as arches
    import scvi.model.base._base_model as base
    import scvi.model.base._save_load as save_load

    path = model_file(model_dir)
    data, saved = _read_model(model_dir)
    allowed = model_file_globals()
    want = Path(model_dir).resolve()

    def load_saved_files(
        dir_path: str,
        load_adata: bool,
        prefix: str | None = None,
        map_location: Any = None,
        backup_url: str | None = None,
    ) -> tuple[Any, Any, Any, None]:
        if Path(dir_path).resolve() != want or prefix or load_adata:
            msg = f"scvi-tools read {dir_path} (prefix={prefix}, load_adata={load_adata})"
            raise RuntimeError(msg + f"; only {want}'s verified model may be read here")
        fresh = load_torch_bytes(data, allowed=allowed, source=path, map_location=map_location)
        return fresh.get("attr_dict"), fresh.get("var_names"), fresh.get("model_state_dict"), None

    with _PATCH_LOCK:
        modules = (base, arches, save_load)
        before = [m._load_saved_files for m in modules]
        for m in modules:
            m._load_saved_files = load_saved_files  # type: ignore[assignment]
        try:
            yield saved
        finally:
            for m, original in zip(modules, before, strict=True):
                m._load_saved_files = original  # type: ignore[assignment]


# ----------------------------------------------------------------------------------------------
# the registry
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelInfo:
    """What a saved model's registry says: genes (feature_ids, model order), the obs column it
    was registered on (``setup_anndata(batch_key=...)``), the training batches in code order, and
    the whole registry (as ``SCVI.load_registry`` returns it)."""

    var_names: npt.NDArray[np.object_]
    batch_key: str
    batch_categories: npt.NDArray[np.object_]
    registry: dict[str, Any]


def _checked_registry(model_dir: str | os.PathLike[str], saved: dict[str, Any]) -> dict[str, Any]:
    registry: dict[str, Any] = saved["attr_dict"]["registry_"]
    if registry.get("model_name", "SCVI") != "SCVI":
        msg = f"the model at {model_dir} is a {registry.get('model_name')}, not an SCVI model"
        raise CensusScviError(msg)
    setup = registry.get("setup_args", {})
    extra = [k for k in ("categorical_covariate_keys", "continuous_covariate_keys") if setup.get(k)]
    if extra:
        msg = f"the model at {model_dir} uses covariates ({', '.join(extra)}), which embed cannot supply"
        raise CensusScviError(msg, hint="train with census-scvi (batch covariate only)")
    return registry


def _info(registry: dict[str, Any]) -> ModelInfo:
    fields = registry["field_registries"]
    batch_state = fields.get("batch", {}).get("state_registry", {})
    return ModelInfo(
        var_names=np.asarray(fields["X"]["state_registry"]["column_names"], dtype=object),
        batch_key=str(registry.get("setup_args", {}).get("batch_key") or BATCH_KEY),
        batch_categories=np.asarray(batch_state.get("categorical_mapping", ["0"]), dtype=object),
        registry=registry,
    )


def model_registry(model_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """The registry of a saved SCVI model (refused when not SCVI or with other covariates)."""
    return _checked_registry(model_dir, _read_model(model_dir)[1])


def model_info(model_dir: str | os.PathLike[str]) -> ModelInfo:
    """Genes, batch key and batch categories of a saved SCVI model (read safely)."""
    return _info(model_registry(model_dir))


def model_var_names(path: str | os.PathLike[str]) -> pd.Index:
    """The genes (feature_ids, in model order) a saved scvi-tools model was trained on."""
    import pandas as pd

    return pd.Index(model_info(path).var_names)


# ----------------------------------------------------------------------------------------------
# loading and encoding
# ----------------------------------------------------------------------------------------------
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


def load_model(model_dir: str | os.PathLike[str], *, accelerator: str = "cpu") -> Any:
    """``scvi.model.SCVI.load(model_dir, adata=False)``, from the verified ``model.pt``.

    For what the model holds besides the data (``history``, ``registry_``, settings).
    """
    import scvi

    with _verified_model(model_dir) as saved, quiet_scvi():
        _checked_registry(model_dir, saved)
        return scvi.model.SCVI.load(str(model_dir), adata=False, accelerator=accelerator)


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

    Raises
    ------
    CensusScviError
        When ``model.pt`` holds anything but a model's data (see :func:`verify_torch_file`).
    """
    import anndata as ad
    import pandas as pd
    import scipy.sparse as sp
    import scvi

    model_dir = Path(model_dir)
    with _verified_model(model_dir) as saved:
        info = _info(_checked_registry(model_dir, saved))
        # A one-cell stand-in AnnData lets SCVI.load rebuild the module from the registry (its
        # batch value is a known category; the encoder never sees it when encode_covariates is
        # false). It holds one count: SCVI.load takes an all-zero X for a minified AnnData.
        n_genes = len(info.var_names)
        stub = ad.AnnData(
            X=sp.csr_matrix((np.ones(1, dtype=np.float32), ([0], [0])), shape=(1, n_genes)),
            obs=pd.DataFrame(
                {info.batch_key: pd.Categorical([info.batch_categories[0]])}, index=["0"]
            ),
            var=pd.DataFrame(index=pd.Index(info.var_names.astype(str))),
        )
        with quiet_scvi(), warnings.catch_warnings():
            # scvi-tools warns that the stand-in's one cell is fewer than 3 per category
            warnings.filterwarnings("ignore", message=".*fewer than 3 cells.*")
            model = scvi.model.SCVI.load(str(model_dir), adata=stub, accelerator=accelerator)
    model.module.eval()
    encodes_batch = bool(getattr(model.module, "encode_covariates", False))
    n_latent = int(getattr(model.module, "n_latent", model.init_params_["non_kwargs"]["n_latent"]))
    return EncoderModel(
        model=model,
        var_names=info.var_names,
        batch_key=info.batch_key,
        batch_categories=info.batch_categories,
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
    batch_labels: npt.NDArray[np.object_] | pd.Categorical,
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
        The reference model (``train/scvi.model``); read through :func:`verify_torch_file`.
    out_dir
        Folder to save into (``embed/final_scvi_optimized``); ``scvi.model.SCVI.load`` reads it.
    obs
        One row per embedded cell (index: str soma_joinid).
    batch_labels
        Each cell's batch label, stored under the model's batch key: strings, or a
        ``pandas.Categorical`` (codes into a few labels: no string per cell is held).
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
    if not (len(qz_mean) == len(qz_var) == len(library_size) == len(batch_labels) == n):
        msg = "obs, batch labels, latent and library size lengths differ"
        raise AssertionError(msg)
    labels = (
        batch_labels
        if isinstance(batch_labels, pd.Categorical)
        else pd.Categorical(np.asarray(batch_labels).astype(str))
    )
    with _verified_model(model_dir) as saved:
        info = _info(_checked_registry(model_dir, saved))
        obs = obs.copy(deep=False)  # the caller's columns, shared; one column added
        obs[info.batch_key] = labels
        adata = ad.AnnData(
            X=sp.csr_matrix((n, len(info.var_names)), dtype=np.float32),
            obs=obs,
            var=pd.DataFrame(index=pd.Index(info.var_names.astype(str))),
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
