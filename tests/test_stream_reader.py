"""Stream-mode reading: the SOMA -> CSR reader against dense numpy and tiledbsoma, mini-batching."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest


def _dense_oracle(dim0, dim1, data, joinids, var_joinids):
    """X[joinids, var_joinids] from COO with plain numpy (rows/columns by position)."""
    out = np.zeros((len(joinids), len(var_joinids)), dtype=np.float32)
    row = {int(j): i for i, j in enumerate(joinids)}
    col = {int(v): i for i, v in enumerate(var_joinids)}
    for r, c, v in zip(dim0, dim1, data, strict=True):
        if int(r) in row and int(c) in col:
            out[row[int(r)], col[int(c)]] = v
    return out


def test_kernels_match_dense_numpy():
    from census_scvi.train._soma_reader import coo_to_csr, filter_coo

    rng = np.random.default_rng(0)
    n_cells, n_genes = 60, 50
    dense = rng.poisson(0.3, size=(n_cells, n_genes)).astype(np.float32)
    dim0, dim1 = np.nonzero(dense)
    data = dense[dim0, dim1]
    # joinids are sparse and unordered in the result, genes beyond the model's range exist
    joinid_of_cell = np.sort(rng.choice(10_000, n_cells, replace=False))
    order = rng.permutation(len(dim0))
    d0, d1, v = joinid_of_cell[dim0][order], dim1[order].astype(np.int64), data[order]
    rows = np.sort(rng.choice(joinid_of_cell, 25, replace=False))  # some cells are not asked
    genes = np.sort(rng.choice(40, 15, replace=False))  # genes 40..49 exceed col_of_var
    col_of_var = np.full(genes.max() + 1, -1, dtype=np.int32)
    col_of_var[genes] = np.arange(len(genes))
    r, c, vals = filter_coo(d0, d1, v, rows, col_of_var)
    assert r.dtype == np.int32 and vals.dtype == np.float32
    # in two pieces, as two result tables of one read
    h = len(r) // 2
    parts = [(r[:h], c[:h], vals[:h]), (r[h:], c[h:], vals[h:])]
    indptr, indices, values = coo_to_csr(parts, len(rows))
    assert parts == []  # consumed
    import scipy.sparse as sp

    got = sp.csr_matrix((values, indices, indptr), shape=(len(rows), len(genes))).toarray()
    np.testing.assert_array_equal(got, _dense_oracle(d0, d1, v, rows, genes))
    assert indptr[-1] == np.count_nonzero(got)


@pytest.mark.parametrize("buffer_bytes", [None, 4096])
def test_reader_equals_tiledbsoma_read(mini_census, monkeypatch, buffer_bytes):
    import tiledbsoma as soma
    from tiledbsoma_ml.x_locator import XLocator

    from census_scvi.train import _soma_reader

    if buffer_bytes is not None:  # many small result tables: the concatenating path
        monkeypatch.setattr(_soma_reader, "READ_BUFFER_BYTES", buffer_bytes)
    uri = f"{mini_census}/census_data/homo_sapiens"
    rng = np.random.default_rng(1)
    with soma.Experiment.open(uri) as exp:
        locator = XLocator.create(exp, measurement_name="RNA", layer_name="raw")
        X = exp.ms["RNA"].X["raw"]
        n_obs, n_var = X.shape
        joinids = np.sort(rng.choice(n_obs, 300, replace=False)).astype(np.int64)
        var_joinids = np.sort(rng.choice(n_var, 120, replace=False)).astype(np.int64)
        tbl = X.read(coords=(joinids, var_joinids)).tables().concat()
    expected = _dense_oracle(
        tbl["soma_dim_0"].to_numpy(),
        tbl["soma_dim_1"].to_numpy(),
        tbl["soma_data"].to_numpy(),
        joinids,
        var_joinids,
    )
    assert expected.any()
    reader = _soma_reader.IOBatchReader(locator, var_joinids)
    try:
        got = reader.read(joinids)
        assert got.shape == (len(joinids), len(var_joinids)) and got.dtype == np.float32
        np.testing.assert_array_equal(got.toarray(), expected)
        # read-ahead yields the same batches, in order
        halves = [joinids[:150], joinids[150:]]
        out = list(reader.prefetched(halves))
        assert [len(i) for i, _ in out] == [150, 150]
        np.testing.assert_array_equal(
            np.vstack([x.toarray() for _, x in out]), expected, strict=True
        )
    finally:
        reader.close()


def _module(mini_census, **kwargs):
    """A stream data module over every mini-census cell, 100 genes, dataset as the batch."""
    import tiledbsoma as soma

    from census_scvi.train._datamodule import SomaStreamDataModule

    uri = f"{mini_census}/census_data/homo_sapiens"
    with soma.Experiment.open(uri) as exp:
        obs = exp.obs.read(column_names=["soma_joinid", "dataset_id"]).concat().to_pandas()
    codes = pd.Categorical(obs["dataset_id"]).codes
    dm = SomaStreamDataModule(
        uri,
        obs_joinids=obs["soma_joinid"].to_numpy(),
        batch_codes=codes,
        var_joinids=kwargs.pop("var_joinids", np.arange(0, 1000, 10)),
        n_batch=int(codes.max()) + 1,
        train_size=0.9,
        seed=0,
        **kwargs,
    )
    dm.setup()
    return dm


def test_minibatches_are_full_across_io_batches(mini_census):
    # 100-cell batches from 512-cell I/O batches: most batches take cells from two I/O batches
    dm = _module(mini_census, batch_size=100, io_batch_size=512, shuffle_chunk_size=16)
    loader = dm.train_dataloader()
    sizes = [len(b["soma_joinid"]) for b in loader]
    assert len(sizes) == len(loader)
    assert all(s == 100 for s in sizes[:-1]) and 1 < sizes[-1] <= 100
    assert sum(sizes) == dm.n_train
    # validation is read in order, unshuffled
    val = np.concatenate([b["soma_joinid"].numpy() for b in dm.val_dataloader()])
    np.testing.assert_array_equal(val, dm.val_joinids)


def test_dataloader_workers_split_cells(mini_census):
    # two spawned workers each open their own TileDB handle and read a contiguous part
    dm = _module(
        mini_census,
        batch_size=128,
        io_batch_size=256,
        shuffle_chunk_size=32,
        num_workers=2,
    )
    loader = dm.train_dataloader()
    batches = list(loader)
    assert len(batches) == len(loader)
    seen = np.concatenate([b["soma_joinid"].numpy() for b in batches])
    np.testing.assert_array_equal(np.sort(seen), dm.train_joinids)  # each cell exactly once


# ------------------------------------------------------------------------------------------
# the local stream cache
# ------------------------------------------------------------------------------------------
_SIZES = {"batch_size": 100, "io_batch_size": 512, "shuffle_chunk_size": 16}


def _passes(dm, n):
    """``n`` training passes and one validation pass: every mini-batch's ids and counts."""
    out = []
    for loader in [dm.train_dataloader()] * n + [dm.val_dataloader()]:
        out.append([(b["soma_joinid"].numpy(), b["X"].numpy()) for b in loader])
    return out


def _assert_same_passes(got, want):
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert len(g) == len(w)
        for (gi, gx), (wi, wx) in zip(g, w, strict=True):
            np.testing.assert_array_equal(gi, wi)
            np.testing.assert_array_equal(gx, wx)


def _no_soma(monkeypatch):
    from census_scvi.train import _soma_reader

    def refuse(self, ids):
        raise AssertionError("SOMA read although every cell is cached")

    monkeypatch.setattr(_soma_reader.IOBatchReader, "read", refuse)


def test_stream_cache_gives_the_soma_passes_and_later_ones_skip_soma(
    mini_census, tmp_path, monkeypatch
):
    want = _passes(_module(mini_census, **_SIZES), 2)
    cache_dir = tmp_path / "stream_cache"
    dm = _module(mini_census, cache_dir=cache_dir, **_SIZES)
    first = _passes(dm, 1)  # SOMA, written through (training cells, then validation cells)
    assert dm.cache.holds(dm.train_joinids) and dm.cache.holds(dm.val_joinids)
    _no_soma(monkeypatch)
    _assert_same_passes([first[0], *_passes(dm, 1)], want)
    _assert_same_passes(first[1:], want[2:])
    # a new module (a resumed run) reuses the files: same data, still no SOMA read
    again = _module(mini_census, cache_dir=cache_dir, **_SIZES)
    _assert_same_passes(_passes(again, 2), want)


def test_stream_cache_of_other_genes_or_inconsistent_is_rebuilt(mini_census, tmp_path):
    cache_dir = tmp_path / "stream_cache"
    dm = _module(mini_census, cache_dir=cache_dir, **_SIZES)
    _passes(dm, 1)
    assert dm.cache.holds(dm.train_joinids)
    other = _module(mini_census, cache_dir=cache_dir, var_joinids=np.arange(5, 1000, 10), **_SIZES)
    assert not other.cache.holds(other.train_joinids)  # another gene set: started again
    assert not (cache_dir / "offsets.i64").exists()
    _passes(other, 1)
    # an index pointing past the values (a truncated copy) is not trusted
    (cache_dir / "data.f32").write_bytes(b"")
    reopened = _module(
        mini_census, cache_dir=cache_dir, var_joinids=np.arange(5, 1000, 10), **_SIZES
    )
    assert not reopened.cache.holds(reopened.train_joinids)


def test_stream_cache_gene_columns_are_checked_on_read(mini_census, tmp_path):
    from census_scvi.errors import CensusScviError

    cache_dir = tmp_path / "stream_cache"
    dm = _module(mini_census, cache_dir=cache_dir, **_SIZES)
    _passes(dm, 1)
    bad = np.fromfile(cache_dir / "indices.i32", dtype=np.int32)
    bad[0] = 10**6  # a column far outside the 100 model genes
    bad.tofile(cache_dir / "indices.i32")
    with pytest.raises(CensusScviError, match="gene columns outside 0..99"):
        dm.cache.read(dm.train_joinids)  # the first value written is a training cell's


def test_stream_cache_dropped_when_the_disk_would_not_hold_it(mini_census, tmp_path, monkeypatch):
    from collections import namedtuple

    from census_scvi.train import _stream_cache

    want = _passes(_module(mini_census, **_SIZES), 2)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(_stream_cache.shutil, "disk_usage", lambda p: usage(1, 1, 1000))
    cache_dir = tmp_path / "stream_cache"
    dm = _module(mini_census, cache_dir=cache_dir, **_SIZES)
    got = _passes(dm, 2)
    assert not dm.cache.enabled and not cache_dir.exists()
    _assert_same_passes(got, want)


def test_stream_cache_never_writes_through_links_and_survives_an_early_stop(mini_census, tmp_path):
    import json

    cache_dir = tmp_path / "stream_cache"
    _module(mini_census, cache_dir=cache_dir, **_SIZES)  # writes the cache's manifest
    key = json.loads((cache_dir / "cache.json").read_text())["key"]
    # stopped before its first pass ended: a manifest, no index yet
    again = _module(mini_census, cache_dir=cache_dir, **_SIZES)
    assert not again.cache.holds(again.train_joinids)
    # somebody else's run directory with the cache's files linked to a file of the user's
    outside = tmp_path / "precious.bin"
    outside.write_bytes(b"keep me")
    for name in ("indices.i32", "data.f32", "offsets.i64", "lengths.i32", "offsets.tmp"):
        (cache_dir / name).unlink(missing_ok=True)
        (cache_dir / name).symlink_to(outside)
    (cache_dir / "cache.json").write_text(json.dumps({"format": 1, "key": key}))
    planted = _module(mini_census, cache_dir=cache_dir, **_SIZES)
    _passes(planted, 1)
    assert outside.read_bytes() == b"keep me"
    assert not any(p.is_symlink() for p in cache_dir.iterdir())
    assert planted.cache.holds(planted.train_joinids)


def test_stream_cache_resumed_after_a_stop_between_its_writes_stays_aligned(
    mini_census, tmp_path, monkeypatch
):
    want = _passes(_module(mini_census, **_SIZES), 1)
    cache_dir = tmp_path / "stream_cache"
    dm = _module(mini_census, cache_dir=cache_dir, **_SIZES)
    list(dm.train_dataloader())  # training cells cached, validation cells not yet
    with (cache_dir / "indices.i32").open("ab") as f:  # stopped after one file's append
        f.write(np.arange(7, dtype=np.int32).tobytes())
    resumed = _module(mini_census, cache_dir=cache_dir, **_SIZES)
    assert resumed.cache.holds(resumed.train_joinids)
    assert not resumed.cache.holds(resumed.val_joinids)
    got = _passes(resumed, 1)  # validation now written through, then every pass read back
    _assert_same_passes(got, want)
    again = _module(mini_census, cache_dir=cache_dir, **_SIZES)
    assert again.cache.holds(again.val_joinids)  # kept, not found inconsistent and rebuilt
    _no_soma(monkeypatch)
    _assert_same_passes(_passes(again, 1), want)
