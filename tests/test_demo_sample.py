"""The mini census's count sampler: exact negative binomials, dense and sparse, in global order."""

from __future__ import annotations

import numpy as np
import pytest

from census_scvi.demo._alias import alias_rows
from census_scvi.demo._model import BLOCK_CELLS, SHAPES, Cells, block_cells, block_rng, design
from census_scvi.demo._sample import _VALUE_BITS, _cluster_size, _pack, _radix_sort, block_counts
from census_scvi.demo._tables import BlockStats, OrganismCounts
from census_scvi.soma._writer import X_TILE


def _one_profile_cells(d, log_lib: float, start: int = 0) -> Cells:
    """A full block of identical primary cells (one donor, one type, one library size)."""
    n = BLOCK_CELLS
    z = np.zeros(n, dtype=np.int32)
    return Cells(
        start=start,
        dataset=z,
        donor=z,
        cell_type=z,
        log_lib=np.full(n, log_lib, dtype=np.float32),
        dup_source=np.full(n, -1, dtype=np.int64),
    )


def test_dense_and_sparse_genes_follow_the_negative_binomial():
    """Per-gene mean, variance and P(0) of both samplers against NB(mu, phi) theory."""
    d = design("homo_sapiens", 6 * BLOCK_CELLS, 2000, 0, SHAPES["census"])
    assert 0 < len(d.dense) < d.n_genes and len(d.sparse) == d.n_genes - len(d.dense)
    lib = float(np.log(6000.0))
    dense = np.zeros((6 * BLOCK_CELLS, d.n_genes), dtype=np.float32)
    for b in range(6):
        x = block_counts(d, _one_profile_cells(d, lib), block_rng(d, b, 0, 1))
        dense[b * BLOCK_CELLS + x.rows, x.cols] = x.values
    mu = np.exp(lib) * d.combo_props[0].astype(np.float64)
    phi = d.dispersion.astype(np.float64)
    var = mu + phi * mu**2
    p0 = (1 + phi * mu) ** (-1 / phi)
    n = len(dense)
    for genes in (d.dense, d.sparse):
        ok = genes[(mu[genes] > 0.05) & (mu[genes] < 50)]
        assert len(ok) > 20
        se_mean = np.sqrt(var[ok] / n)
        z = (dense[:, ok].mean(axis=0) - mu[ok]) / se_mean
        assert np.abs(z).max() < 5.5 and abs(z.mean()) < 0.3, (z.min(), z.max(), z.mean())
        rel_var = dense[:, ok].var(axis=0, ddof=1) / var[ok]
        assert 0.8 < np.median(rel_var) < 1.2 and rel_var.min() > 0.6, np.median(rel_var)
        zero = (dense[:, ok] == 0).mean(axis=0)
        assert np.abs(zero - p0[ok]).max() < 0.04


def test_cluster_sizes_invert_the_thinned_logarithmic_series():
    """P(size k) = q^k / (k x) and P(rejected) = 1 - ln(1 + x) / x, from one uniform each."""
    rng = np.random.default_rng(0)
    for x in (0.05, 0.8, 6.0):
        size = np.array([_cluster_size(x, v) for v in rng.random(400_000).tolist()])
        q = x / (1 + x)
        for k in (1, 2, 3):
            assert abs((size == k).mean() - q**k / (k * x)) < 0.004, (x, k)
        assert abs((size == 0).mean() - (1 - np.log1p(x) / x)) < 0.004


def test_alias_tables_draw_in_proportion_to_the_weights():
    """Each row's table gives column j with probability w_j / sum(w), zero weights never."""
    rng = np.random.default_rng(1)
    weights = rng.lognormal(0, 1, (3, 12))
    weights[1, [0, 4, 5]] = 0.0
    weights[2] = 0.0
    weights[2, 7] = 2.5  # all of one row on one column
    accept, alias = alias_rows(weights)
    m = weights.shape[1]
    for r in range(len(weights)):
        u = rng.random(300_000) * m
        slot = u.astype(np.int64)
        got = np.where(u - slot < accept[r, slot], slot, alias[r, slot])
        freq = np.bincount(got, minlength=m) / len(got)
        np.testing.assert_allclose(freq, weights[r] / weights[r].sum(), atol=0.005)
        assert (freq[weights[r] == 0] == 0).all()


@pytest.mark.parametrize("n_genes", [300, 5000])
def test_blocks_come_in_global_order_with_duplicates_copied(n_genes):
    d = design("homo_sapiens", 3 * BLOCK_CELLS, n_genes, 2, SHAPES["census"])
    cells = block_cells(d, 1, 2)
    x = block_counts(d, cells, block_rng(d, 1, 2, 1))
    assert (x.rows >= cells.start).all() and (x.rows < cells.stop).all()
    key = (x.cols // X_TILE, x.rows, x.cols)
    order = np.lexsort(key[::-1])
    np.testing.assert_array_equal(order, np.arange(len(order)))  # sorted as TileDB wants
    assert len(np.unique(x.rows * n_genes + x.cols)) == len(x.rows)  # no duplicate coordinates
    assert (x.values > 0).all() and (x.values == np.round(x.values)).all()
    dense = np.zeros((cells.n, n_genes), dtype=np.float32)
    dense[x.rows - cells.start, x.cols] = x.values
    dups = np.flatnonzero(cells.is_dup)
    assert len(dups) > 100
    np.testing.assert_array_equal(dense[dups], dense[cells.dup_source[dups]])


def test_census_shape_density():
    """The census shape: ~1,500-2,500 non-zeros per (normal-quality) cell at 20,000 genes."""
    d = design("homo_sapiens", BLOCK_CELLS, 20_000, 0, SHAPES["census"])
    cells = block_cells(d, 0, 0)
    x = block_counts(d, cells, block_rng(d, 0, 0, 1))
    nnz = np.bincount(x.rows, minlength=cells.n)
    assert 1500 <= np.median(nnz) <= 2500, np.median(nnz)


def test_radix_sort_orders_the_keys_like_numpy():
    """The two counting passes give np.sort's key order and keep every packed value."""
    rng = np.random.default_rng(4)
    n = 50_000
    packed = _pack(
        rng.integers(0, BLOCK_CELLS, n), rng.integers(0, 20_000, n), rng.integers(1, 9, n)
    )
    got = _radix_sort(packed.copy())
    np.testing.assert_array_equal(got >> _VALUE_BITS, np.sort(packed) >> _VALUE_BITS)
    np.testing.assert_array_equal(np.sort(got), np.sort(packed))
    assert len(_radix_sort(packed[:0].copy())) == 0


def test_dataset_gene_counts_equal_a_dense_oracle():
    """OrganismCounts.count: cells with a count per (stored dataset, gene), as dense numpy says."""
    d = design("homo_sapiens", 3 * BLOCK_CELLS, 3000, 5, SHAPES["census"])
    counts = OrganismCounts.zeros(d)
    want = np.zeros_like(counts.dataset_gene_nnz)
    for b in (0, 2):
        cells = block_cells(d, b, 5)
        x = block_counts(d, cells, block_rng(d, b, 5, 1))
        counts.count(d, cells, x, BlockStats.of(x, cells))
        dense = np.zeros((cells.n, d.n_genes), dtype=bool)
        dense[x.rows - cells.start, x.cols] = True
        for ds in range(len(d.datasets)):
            want[ds] += dense[cells.obs_dataset(d) == ds].sum(axis=0)
    assert want[-1].sum() > 0  # the duplicates' compilation row is counted too
    np.testing.assert_array_equal(counts.dataset_gene_nnz, want)
