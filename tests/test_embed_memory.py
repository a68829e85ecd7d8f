"""What embed holds and reads per cell (issue 13 item 3): the count blocks equal dense counts, batch
labels are codes, the minified model keeps the obs columns asked for. The figures are in
``benchmarks/bench_embed.py --profile``; these tests pin the code paths on the mini census."""

from __future__ import annotations

import os
import subprocess
import sys

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


def _dense_counts(experiment, ids, var_joinids):
    """The oracle: every stored value of X, as a dense numpy array of ids x var_joinids."""
    t = experiment.ms["RNA"].X["raw"].read().tables().concat()
    full = np.zeros((experiment.obs.count, experiment.ms["RNA"].var.count), dtype=np.float32)
    full[t["soma_dim_0"].to_numpy(), t["soma_dim_1"].to_numpy()] = t["soma_data"].to_numpy()
    out = np.zeros((len(ids), len(var_joinids)), dtype=np.float32)
    present = var_joinids >= 0
    out[:, present] = full[np.ix_(ids, var_joinids[present])]
    return out


@pytest.mark.parametrize("step", [1, 7])  # a range of cell ids, and sparse ids (point reads)
def test_count_blocks_equal_dense_counts_with_a_missing_gene(experiment, step):
    """iter_blocks gives the model's genes in model order (an absent gene as zeros) for the
    cells asked, in their order, in blocks of block_rows."""
    from census_scvi.embed._io import iter_blocks, map_genes

    genes = _genes(experiment)[::-1]  # model order is not the census order
    genes.insert(3, "ENSG_NOT_IN_CENSUS")
    gmap = map_genes(experiment, genes)
    ids = np.arange(0, 1500 * step, step, dtype=np.int64)[:1500]
    ids = ids[ids < experiment.obs.count]
    blocks = list(iter_blocks(experiment.ms["RNA"].X["raw"], ids, gmap, block_rows=400))
    assert len(ids) > 400
    assert [b.shape[0] for b in blocks] == [min(400, len(ids) - s) for s in range(0, len(ids), 400)]
    got = np.vstack([b.toarray() for b in blocks])
    var = experiment.ms["RNA"].var.read(column_names=["soma_joinid", "feature_id"]).concat()
    where = dict(zip(var["feature_id"].to_pylist(), var["soma_joinid"].to_pylist(), strict=True))
    want = _dense_counts(experiment, ids, np.array([where.get(g, -1) for g in genes]))
    assert want[:, 3].sum() == 0 and want.sum() > 0
    np.testing.assert_array_equal(got, want)


def test_lean_allocators_turn_off_numpy_huge_pages_unless_kept(monkeypatch):
    """Stages turn numpy's huge-page advice off (seconds of system CPU per count block);
    CENSUS_SCVI_DEFAULT_ALLOCATORS=1 keeps numpy's default."""
    import numpy._core.multiarray as multiarray

    from census_scvi import _allocators

    before = multiarray._get_madvise_hugepage()
    try:
        multiarray._set_madvise_hugepage(True)
        monkeypatch.setattr(_allocators, "_done", False)
        monkeypatch.setenv(_allocators.KEEP_ENV, "1")
        _allocators.use_lean_allocators()
        assert multiarray._get_madvise_hugepage() is True
        monkeypatch.delenv(_allocators.KEEP_ENV)
        _allocators.use_lean_allocators()
        assert multiarray._get_madvise_hugepage() is False
    finally:
        multiarray._set_madvise_hugepage(before)


# glibc's malloc statistics (mallinfo2) in a fresh interpreter, for the probes below
_MALLINFO = """
import ctypes, sys
import numpy as np
from census_scvi._allocators import fix_mmap_threshold

class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                                               "usmblks", "fsmblks", "uordblks", "fordblks",
                                               "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = Info
"""

_MMAP_PROBE = (
    _MALLINFO
    + """
if sys.argv[1] == "fixed":
    assert fix_mmap_threshold(16 << 20)
a = np.ones(24 << 20, np.uint8)
del a  # glibc's default raises its mmap threshold (at most 32 MiB) past 24 MiB here
mapped = libc.mallinfo2().hblkhd
b = np.ones(24 << 20, np.uint8)
print("mapped" if libc.mallinfo2().hblkhd - mapped >= 24 << 20 else "heap")
"""
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
@pytest.mark.parametrize(("mode", "want"), [("default", "heap"), ("fixed", "mapped")])
def test_fixed_mmap_threshold_keeps_large_arrays_off_the_heap(mode, want):
    """glibc moves its thresholds up once a large block is freed (later blocks of that size come
    from the heap, and up to twice that is kept at the heap's top when freed); a fixed threshold
    turns that off: the block above it stays mapped."""
    import ctypes

    libc = ctypes.CDLL("libc.so.6")
    if not hasattr(libc, "mallinfo2"):
        pytest.skip("glibc < 2.33 has no mallinfo2")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    env.pop("CENSUS_SCVI_DEFAULT_ALLOCATORS", None)
    out = subprocess.run(
        [sys.executable, "-c", _MMAP_PROBE, mode],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    assert out.stdout.strip() == want


_TRIM_PROBE = (
    _MALLINFO
    + """
assert fix_mmap_threshold(16 << 20)
a = np.ones(8 << 20, np.uint8)  # below the mmap threshold: the heap's top
del a
print("kept" if libc.mallinfo2().arena >= 8 << 20 else "trimmed")
"""
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
@pytest.mark.parametrize(("trim_env", "want"), [(None, "kept"), ("131072", "trimmed")])
def test_fixed_mmap_threshold_keeps_the_heap_top_below_twice_it(trim_env, want):
    """With the mmap threshold fixed, glibc's trim threshold would stay at 128 KiB and a freed
    step-sized block at the heap's top be handed back (and faulted in again next step); it is
    fixed at twice the mmap threshold unless the environment sets it."""
    import ctypes

    libc = ctypes.CDLL("libc.so.6")
    if not hasattr(libc, "mallinfo2"):
        pytest.skip("glibc < 2.33 has no mallinfo2")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    env.pop("CENSUS_SCVI_DEFAULT_ALLOCATORS", None)
    if trim_env is not None:
        env["MALLOC_TRIM_THRESHOLD_"] = trim_env
    out = subprocess.run(
        [sys.executable, "-c", _TRIM_PROBE], capture_output=True, text=True, env=env, check=True
    )
    assert out.stdout.strip() == want


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
