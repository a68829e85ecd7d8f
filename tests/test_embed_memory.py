"""What embed holds per cell (issue 13 item 3): the count reads leave no garbage behind, batch
labels are codes, the minified model keeps the obs columns asked for. The figures are in
``benchmarks/bench_embed.py --profile``; these tests pin the code paths on the mini census."""

from __future__ import annotations

import gc

import numpy as np
import pandas as pd
import pytest

from census_scvi.batches import batch_labels
from census_scvi.scvi_model import EncoderModel, batch_indices

PARTS = ["dataset_id", "assay", "suspension_type", "donor_id"]


@pytest.fixture(scope="module")
def experiment(mini_census):
    import tiledbsoma as soma

    with soma.open(f"{mini_census}/census_data/homo_sapiens") as exp:
        yield exp


def _genes(experiment, n: int = 50) -> list[str]:
    var = experiment.ms["RNA"].var.read(column_names=["feature_id"]).concat().to_pandas()
    return list(var["feature_id"].astype(str))[:: max(1, len(var) // n)]


def test_count_reads_leave_no_garbage_cycles(experiment):
    """tiledbsoma's read-ahead leaves each read's buffers in reference cycles; iter_blocks
    collects them when a read ends, so they never pile up chunk after chunk."""
    from census_scvi.embed._io import iter_blocks, map_genes

    genes = map_genes(experiment, _genes(experiment))
    x = experiment.ms["RNA"].X["raw"]
    ids = np.arange(3000, dtype=np.int64)
    gc.collect()
    gc.disable()  # only our own collection may run
    try:
        for start in range(0, 3000, 750):
            rows = sum(
                m.shape[0] for m in iter_blocks(x, ids[start : start + 750], genes, block_rows=200)
            )
            assert rows == 750
            left = [o for o in gc.get_objects() if type(o).__name__ == "EagerIterator"]
            assert left == [], f"{len(left)} read-ahead iterators still alive after a read"
    finally:
        gc.enable()


def test_rows_batch_codes_equal_labels(experiment, mini_census):
    """An encoder that sees the batch gets each cell's model code via the distinct batches,
    equal to looking up every cell's label string."""
    from census_scvi.config import load_config
    from census_scvi.embed._chunks import _rows
    from census_scvi.embed._io import select_cells

    obs = select_cells(experiment, None, PARTS)
    labels = batch_labels(obs, PARTS, "//")
    categories = np.array(sorted(set(labels.tolist()), reverse=True), dtype=object)
    encoder = EncoderModel(
        model=None,
        var_names=np.array(_genes(experiment), dtype=object),
        batch_key="batch",
        batch_categories=categories,
        encodes_batch=True,
        n_latent=4,
    )
    cfg = load_config(None, overrides=[f"census.uri={mini_census}", "census.demo=null"])
    rows = _rows(cfg, experiment, encoder)
    np.testing.assert_array_equal(rows.joinids, obs["soma_joinid"].to_numpy())
    np.testing.assert_array_equal(rows.codes, batch_indices(encoder, labels, len(labels)))


@pytest.mark.slow
def test_minified_model_keeps_the_obs_columns_asked_for(mini_census, tmp_path):
    import scvi

    from census_scvi.embed import run_embed
    from test_embed import embed_config, train_tiny_model

    run_dir = tmp_path / "run"
    train_tiny_model(mini_census, run_dir)
    cfg = embed_config(mini_census, "embed.minified_obs_columns=[cell_type]")
    run_embed(cfg, run_dir=run_dir)
    model = scvi.model.SCVI.load(str(run_dir / "embed" / "final_scvi_optimized"))
    obs = model.adata.obs
    assert {"soma_joinid", "cell_type", *PARTS, "batch"} <= set(obs.columns)
    assert "tissue" not in obs.columns and "observation_joinid" not in obs.columns
    assert isinstance(obs["batch"].dtype, pd.CategoricalDtype)
    np.testing.assert_array_equal(
        obs["batch"].astype(str).to_numpy(), batch_labels(obs, PARTS, "//").astype(str)
    )
    np.testing.assert_allclose(
        model.get_latent_representation(), np.load(run_dir / "embed" / "latent.npy")
    )


def test_unknown_minified_obs_column_is_refused(experiment, mini_census):
    from census_scvi.config import load_config
    from census_scvi.embed._outputs import _obs_columns
    from census_scvi.errors import CensusScviError

    cfg = load_config(
        None, overrides=[f"census.uri={mini_census}", "embed.minified_obs_columns=[celltype]"]
    )
    with pytest.raises(CensusScviError, match=r"\['celltype'\] are not census obs columns"):
        _obs_columns(cfg, experiment)
