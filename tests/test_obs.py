"""Reading one obs column of many cells as codes, and the stratified sample drawn from codes:
equal to the label versions (the earlier implementation is the oracle), in memory that does not
grow with a Python object per cell."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import tiledbsoma as soma

import census_scvi.soma._obs as obs_mod
from census_scvi.errors import CensusScviError
from census_scvi.evaluate import stratified_sample
from census_scvi.soma import read_obs, stratified_indices
from census_scvi.soma._obs import read_obs_codes, stratified_indices_codes


def _oracle(strata, n: int, seed: int = 0) -> np.ndarray:
    """``stratified_indices`` as it was before the codes version: argsort of all rows."""
    codes, _ = pd.factorize(np.asarray(strata), use_na_sentinel=False)
    total = codes.size
    if n >= total:
        return np.arange(total, dtype=np.int64)
    rng = np.random.default_rng(seed)
    sizes = np.bincount(codes)
    want = np.maximum(1, np.floor(sizes * n / total)).astype(np.int64)
    want = np.minimum(want, sizes)
    short = n - int(want.sum())
    if short > 0:
        room = sizes - want
        frac = sizes * n / total - want
        for s in np.argsort(-frac, kind="stable"):
            if short == 0:
                break
            if room[s] > 0:
                want[s] += 1
                short -= 1
    order = np.argsort(codes, kind="stable")
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    picked = [
        rng.choice(order[starts[s] : starts[s] + sizes[s]], size=int(want[s]), replace=False)
        for s in range(sizes.size)
    ]
    return np.sort(np.concatenate(picked)).astype(np.int64)


@pytest.fixture
def experiment(mini_census):
    with soma.open(mini_census) as census:
        yield census["census_data"]["homo_sapiens"]


# ---- the sampler --------------------------------------------------------------------------------
@pytest.mark.parametrize("chunk", [7, 97, 1 << 20])
def test_codes_sample_equals_the_label_sample(monkeypatch, chunk):
    monkeypatch.setattr(obs_mod, "_CHUNK", chunk)
    rng = np.random.default_rng(0)
    for _ in range(60):
        total, k = int(rng.integers(1, 2000)), int(rng.integers(1, 30))
        raw = rng.choice(k, size=total, p=rng.dirichlet(np.full(k, 0.3)))
        codes = (raw * 3 + 5).astype(np.int32)  # gaps and an order unlike first appearance
        labels = np.array([f"type {c}" for c in raw])
        n, seed = int(rng.integers(1, total + 3)), int(rng.integers(0, 50))
        want = _oracle(labels, n, seed)
        assert np.array_equal(stratified_indices_codes(codes, n, seed=seed), want)
        assert np.array_equal(stratified_indices(labels, n, seed=seed), want)
        assert np.array_equal(stratified_sample(codes, n=n, seed=seed), want)


def test_codes_sample_rejects_what_is_not_codes():
    with pytest.raises(CensusScviError, match="1-d integer"):
        stratified_indices_codes(np.array([0.5, 1.0]), 1)
    with pytest.raises(CensusScviError, match=">= 0"):
        stratified_indices_codes(np.array([0, -1]), 1)


def test_codes_sample_memory_is_per_chunk_not_per_row(monkeypatch):
    monkeypatch.setattr(obs_mod, "_CHUNK", 10_000)
    codes = np.random.default_rng(0).integers(0, 40, 1_000_000).astype(np.int32)
    tracemalloc.start()
    try:
        stratified_indices_codes(codes, 1000)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # the label version holds 16 B per row (int64 codes + argsort) = 16 MB here
    assert peak < 1_500_000, peak


# ---- the codes reader ---------------------------------------------------------------------------
@pytest.mark.parametrize("column", ["cell_type", "donor_id", "is_primary_data", "nnz"])
def test_read_obs_codes_equals_read_obs(experiment, column):
    n = int(experiment.obs.count)
    rng = np.random.default_rng(1)
    dense = rng.permutation(n)[: n - 50]  # shuffled, nearly every cell: range reads
    sparse = np.sort(rng.choice(n, size=40, replace=False))  # far apart: point reads
    for joinids in (dense, sparse, np.arange(n)):
        codes, values = read_obs_codes(experiment, joinids, column, chunk_size=700)
        assert codes.dtype == np.int32 and codes.size == joinids.size
        want = read_obs(experiment, joinids, [column])[column].astype(str).to_numpy()
        assert np.array_equal(np.array([str(values[c]) for c in codes]), want)


def test_chunked_codes_sample_equals_the_full_label_sample(experiment):
    """The brief's oracle: codes read in chunks + codes sampler == labels of all cells + sampler."""
    joinids = np.random.default_rng(2).permutation(int(experiment.obs.count))[:2500]
    labels = read_obs(experiment, joinids, ["cell_type"])["cell_type"].astype(str).to_numpy()
    codes, _ = read_obs_codes(experiment, joinids, "cell_type", chunk_size=300)
    for n, seed in ((300, 0), (301, 5), (2499, 1)):
        want = stratified_indices(labels, n, seed=seed)
        assert np.array_equal(stratified_indices_codes(codes, n, seed=seed), want)


def test_read_obs_codes_errors(experiment):
    with pytest.raises(CensusScviError, match="not in the census obs; valid"):
        read_obs_codes(experiment, np.arange(10), "no_such_column")
    n = int(experiment.obs.count)
    with pytest.raises(CensusScviError, match="1 embedded soma_joinids are not in the census"):
        read_obs_codes(experiment, np.array([0, 1, n + 5]), "cell_type")
    with pytest.raises(CensusScviError, match="chunk_size"):
        read_obs_codes(experiment, np.arange(10), "cell_type", chunk_size=0)


def test_encode_gives_missing_values_one_code_of_their_own():
    lookup: dict[object, int] = {"b": 0}
    plain = pa.chunked_array([pa.array(["a", None, "b", "a"]), pa.array([None, "c"])])
    codes = obs_mod._encode(plain, lookup)
    values = list(lookup)
    assert [values[c] for c in codes] == ["a", None, "b", "a", None, "c"]
    dictionary = pa.chunked_array([pa.array(["c", "d", None]).dictionary_encode()])
    codes = obs_mod._encode(dictionary, lookup)
    assert [list(lookup)[c] for c in codes] == ["c", "d", None]
    assert list(lookup)[: len(values)] == values  # codes already given keep their meaning


def test_read_obs_codes_holds_no_object_per_cell(experiment):
    n = int(experiment.obs.count)

    def traced_peak(joinids):
        tracemalloc.start()
        try:
            read_obs_codes(experiment, joinids, "cell_type", chunk_size=500)
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    traced_peak(np.arange(500))  # first read: TileDB's and tiledbsoma's one-off objects
    few, many = traced_peak(np.arange(500)), traced_peak(np.arange(n))
    # 4 B of code per extra cell, not a string or pandas row (read_obs: ~100 B per cell)
    assert many - few < 16 * (n - 500), (few, many)
