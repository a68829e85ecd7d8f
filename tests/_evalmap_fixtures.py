"""Run directories shared by the evaluate and map tests (built once per test session).

``reference_run`` runs the real pipeline stages (prepare -> train -> embed) on the mini census with
two whole datasets held out of training and of the embedding (``census.obs_query``), so that the
evaluate test scores the embedding of the reference datasets and the map calibration test maps
the held-out datasets as a user's query.
"""

from __future__ import annotations

import functools
from pathlib import Path

from census_scvi.config import Config, load_config

HELD_OUT = ("hs-dataset-05", "hs-dataset-06")  # 10x 3' v2 nucleus (lung), 10x 3' v3 cell (blood)
_HELD = ", ".join(f"'{d}'" for d in HELD_OUT)
REFERENCE_QUERY = f"dataset_id not in [{_HELD}] and is_primary_data == True"
HELD_OUT_QUERY = f"dataset_id in [{_HELD}] and is_primary_data == True"


def tiny_config(census_uri: str, *extra: str) -> Config:
    """The demo config pointed at ``census_uri``: a small scVI that trains in about a minute."""
    return load_config(
        None,
        overrides=[
            f"census.uri={census_uri}",
            "census.demo=null",
            f"census.obs_query={REFERENCE_QUERY}",
            "hvg.top_n_hvg=500",
            "model.n_latent=10",
            "model.n_hidden=128",
            "train.max_epochs=60",
            "train.batch_size=256",
            "train.checkpoint_every_n_epochs=1000",
            "training_plan.lr=5e-3",
            "training_plan.n_epochs_kl_warmup=10",
            "embed.chunk_size=1000",
            "embed.write_minified_model=false",
            "evaluate.sample_size=1500",
            *extra,
        ],
    )


@functools.cache
def reference_run(census_uri: str, base: str) -> Path:
    """prepare -> train -> embed on the reference datasets; cached for the session."""
    import torch

    from census_scvi.pipeline import run_pipeline

    torch.set_num_threads(2)
    run_dir = Path(base) / "evalmap-reference-run"
    run_pipeline(tiny_config(census_uri), run_dir=run_dir, to_stage="embed")
    return run_dir


def held_out_query(census_uri: str, path: Path) -> Path:
    """The held-out datasets as a user's h5ad: raw counts, var index = Ensembl ids, all genes."""
    import cellxgene_census

    with cellxgene_census.open_soma(uri=census_uri) as census:
        q = cellxgene_census.get_anndata(census, "homo_sapiens", obs_value_filter=HELD_OUT_QUERY)
    q.var_names = q.var["feature_id"].astype(str).to_numpy()
    q.obs_names = q.obs["soma_joinid"].astype(str).to_numpy()
    q.obs = q.obs[["cell_type", "dataset_id", "nnz"]].copy()
    q.var = q.var[["feature_name"]].copy()
    q.write_h5ad(path)
    return path
