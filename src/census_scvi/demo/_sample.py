"""One block's counts: exact negative binomials, dense for the top genes and sparse for the rest.

Every count is NB(mean ``mu = L * p``, dispersion ``phi``), ``L`` the cell's library size and
``p`` its profile's share of the gene (the design's ``combo_props``).

- **Dense genes** (:attr:`Design.dense`: every gene for the default shape, the 256 most expressed
  for the census shape): the gamma-Poisson mixture drawn per cell and gene, as Splatter does.
- **Sparse genes**: a cost per count instead of per gene, which is what makes a 20,000-gene
  census cheap (~2,000 non-zeros per cell). NB is a compound Poisson: ``Poisson(ln(1 + phi mu) /
  phi)`` clusters per cell and gene, each of ``Logarithmic(phi mu / (1 + phi mu))`` counts.
  Candidates are drawn at the Poisson rate ``mu`` (an upper bound), all of a cell's sparse
  genes at once (``Poisson(L * share)``, ``share`` its profile's sparse proportion), each given
  a gene in proportion to ``p`` (an alias table per profile, :mod:`census_scvi.demo._alias`),
  and a single uniform ``v`` both thins it to the cluster rate and draws its size by
  inversion: ``P(accept, size k) = q^k / (k x)``, with ``x = phi mu`` and ``q = x / (1 + x)``,
  so ``v < 1 / (1 + x)`` is one count (most candidates), ``v >= ln(1 + x) / x`` a rejection.

Measured with ``python benchmarks/bench_demo_data.py --sample 20000`` (2 cores shared, load ~5):
the census shape costs 0.29 ms of CPU per cell, every gene sampled densely 1.84 ms, for the same
2,066 non-zeros per cell (the two paths sample one distribution; see also the NB oracle tests),
before the per-cell sparse sampler and the counting sort (docs/benchmarks.md, "Census shape:
per-cell sparse sampling", has this machine's figures since).
The non-zeros come out in TileDB's global order, ready for
:class:`~census_scvi.soma._writer.CountsWriter`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numba
import numpy as np

from census_scvi.demo._model import BLOCK_CELLS, Cells, Design
from census_scvi.soma._writer import X_TILE

if TYPE_CHECKING:
    import numpy.typing as npt

__all__ = ["BlockX", "block_counts"]

_VALUE_BITS = 24  # counts are packed below the (row, gene) key for one integer sort
_MAX_SIZE_TERMS = 10_000  # inversion steps before a (vanishingly rare) cluster size is cut
_CELLS_PER_STEP = 256  # cells sampled together by _sparse (~11 MB of uniforms)


@dataclass
class BlockX:
    """One block's non-zeros in TileDB global order (row tiles of :data:`X_TILE` cells)."""

    rows: npt.NDArray[np.int64]  # soma_joinids
    cols: npt.NDArray[np.int64]
    values: npt.NDArray[np.float32]


def block_counts(d: Design, cells: Cells, rng: np.random.Generator) -> BlockX:
    """The counts of ``cells``: primary cells sampled, duplicates copied from their source row."""
    primary = np.flatnonzero(~cells.is_dup)
    combo = cells.combo(d)[primary]
    lib = np.exp(cells.log_lib[primary].astype(np.float64))
    parts = [_dense(d, primary, combo, lib, rng)]
    if len(d.sparse):
        parts += _sparse(d, primary, combo, lib, rng)
    parts += [_duplicate_rows(cells, p) for p in parts]
    return _global_order(np.concatenate(parts), start=cells.start)


def _dense(
    d: Design,
    primary: npt.NDArray[np.intp],
    combo: npt.NDArray[np.int64],
    lib: npt.NDArray[np.float64],
    rng: np.random.Generator,
) -> npt.NDArray[np.int64]:
    """Gamma-Poisson per primary cell and dense gene; the packed non-zeros (:func:`_pack`)."""
    genes = d.dense
    disp = d.dispersion[genes]
    mu = d.dense_props[combo] * lib[:, None].astype(np.float32)
    lam = rng.gamma((1.0 / disp)[None, :], 1.0, size=mu.shape).astype(np.float32)
    lam *= mu * disp[None, :]
    counts = rng.poisson(lam)
    r, c = np.nonzero(counts)
    return _pack(primary[r], genes[c], counts[r, c])


def _sparse(
    d: Design,
    primary: npt.NDArray[np.intp],
    combo: npt.NDArray[np.int64],
    lib: npt.NDArray[np.float64],
    rng: np.random.Generator,
) -> list[npt.NDArray[np.int64]]:
    """Compound-Poisson NB for the sparse genes (module docstring); packed, one array per step.

    Cells are taken in profile order (a profile's tables stay in the CPU caches while its cells
    are sampled), :data:`_CELLS_PER_STEP` at a time, so the per-candidate uniforms stay small.
    """
    t = d.sparse_tables
    order = np.argsort(combo, kind="stable")
    rows, prof, lib = primary[order], combo[order], lib[order]
    n = rng.poisson(lib * t.share[prof])  # candidates per cell: all its sparse genes at once
    out = []
    for a in range(0, len(rows), _CELLS_PER_STEP):
        b = min(a + _CELLS_PER_STEP, len(rows))
        n_hits = int(n[a:b].sum())
        u, v = rng.random(n_hits), rng.random(n_hits)  # its gene, then its thinning and size
        out.append(
            _place_candidates(
                n[a:b], u, v, rows[a:b], prof[a:b], lib[a:b], t.accept, t.alias, t.xbase, d.sparse
            )
        )
    return out


@numba.njit(nogil=True, cache=True)  # type: ignore[misc]
def _place_candidates(
    n: npt.NDArray[np.int64],
    u: npt.NDArray[np.float64],
    v: npt.NDArray[np.float64],
    rows: npt.NDArray[np.intp],
    prof: npt.NDArray[np.int64],
    lib: npt.NDArray[np.float64],
    accept: npt.NDArray[np.float32],
    alias: npt.NDArray[np.int32],
    xbase: npt.NDArray[np.float32],
    genes: npt.NDArray[np.int64],
) -> npt.NDArray[np.int64]:
    """The kept candidates of one step, packed (:func:`_pack`): ``n[c]`` candidates of each cell
    ``c``; each takes a gene from its profile's alias table with ``u`` and is thinned and sized
    with ``v`` (:func:`_cluster_size`).

    Per cell, not per (profile, gene) as before: that drew an exponential for every profile and
    sparse gene (3.4M per census-shape block, ~1,640 per cell), a Poisson for each pair with a
    candidate and a cell per candidate from an alias table of the profile's cells. Sparse genes:
    124.1 -> 94.6 us of CPU per census-shape cell (``python benchmarks/bench_demo_data.py
    --profile-blocks 20``, the old tree then this one).

    A cell's clusters of one gene are summed here (``total``, reset per cell), so each gene is one
    entry: a third fewer entries for :func:`_radix_sort` and the duplicate copies. "sparse
    genes" + "global order", us of CPU per census-shape cell, tree 59ed935 then this one,
    interleaved twice: 64.8 + 67.7 / 68.0 + 69.9 -> 79.6 + 37.4 / 79.1 + 38.2; the same counts
    (the summed sizes stay far below the 24 value bits, checked).
    """
    out = np.empty(u.shape[0], np.int64)
    m = accept.shape[1]
    total = np.zeros(m, np.int32)  # this cell's count per sparse gene so far
    touched = np.empty(n.max() if n.shape[0] else 0, np.int64)  # its genes with a count
    k = 0
    i = 0
    for c in range(n.shape[0]):
        p = prof[c]
        t = 0
        for _ in range(n[c]):
            draw = u[i] * m
            j = np.int64(draw)
            if not draw - j < accept[p, j]:
                j = alias[p, j]
            size = _cluster_size(np.float64(xbase[p, j]) * lib[c], v[i])
            i += 1
            if size:
                if total[j] == 0:
                    touched[t] = j
                    t += 1
                total[j] += size
        for q in range(t):  # one entry per gene: a third fewer non-zeros for the sort
            j = touched[q]
            if total[j] >> _VALUE_BITS:  # pragma: no cover - beyond any library size
                msg = "a sparse gene's count does not fit the value bits"
                raise ValueError(msg)
            out[k] = _pack_one(rows[c], genes[j], total[j])
            total[j] = 0
            k += 1
    return out[:k]


@numba.njit(nogil=True, cache=True)  # type: ignore[misc]
def _cluster_size(x: float, v: float) -> int:
    """0 (rejected) or the cluster size of a candidate, from one uniform ``v``."""
    if v * (1.0 + x) < 1.0:  # P(accept, size 1) = 1 / (1 + x): most candidates
        return 1
    if not v * x < np.log1p(x):  # P(accept) = ln(1 + x) / x
        return 0
    q = x / (1.0 + x)
    term = 1.0 / (1.0 + x)  # q^k / (k x) at k = 1
    cdf = term
    for k in range(2, _MAX_SIZE_TERMS + 2):
        term *= q * (k - 1) / k
        cdf += term
        if v < cdf:
            return k
    return _MAX_SIZE_TERMS  # pragma: no cover - rounding at the very end of the series


# Non-zeros are sorted as single integers: (column tile, row, column in tile, count), so that one
# sort gives TileDB's global order. A block is one row tile (BLOCK_CELLS == X_TILE == 2**11).
_TILE_BITS = 11
_ROW_SHIFT = _VALUE_BITS + _TILE_BITS  # row bits start here
_TILE_SHIFT = _ROW_SHIFT + _TILE_BITS  # column-tile bits start here
_LOW = (1 << _TILE_BITS) - 1
assert X_TILE == BLOCK_CELLS == 1 << _TILE_BITS


def _pack(
    rows: npt.NDArray[np.integer], cols: npt.NDArray[np.int64], vals: npt.NDArray[np.integer]
) -> npt.NDArray[np.int64]:
    """(row in block, gene, count) -> one sortable integer each (see the constants above)."""
    if len(vals) and int(vals.max()) >= 1 << _VALUE_BITS:  # pragma: no cover - beyond any library
        msg = f"a count of {int(vals.max())} does not fit the {_VALUE_BITS}-bit packing"
        raise AssertionError(msg)
    cols = cols.astype(np.int64)
    packed = (cols >> _TILE_BITS) << _TILE_SHIFT
    packed |= (cols & _LOW) << _VALUE_BITS
    packed |= rows.astype(np.int64) << _ROW_SHIFT
    packed |= vals
    return packed


@numba.njit(nogil=True, cache=True)  # type: ignore[misc]
def _pack_one(row: int, col: int, value: int) -> int:
    """:func:`_pack` of one non-zero (cluster sizes stop at ``_MAX_SIZE_TERMS``, far below the
    24 bits of the value)."""
    return (
        ((col >> _TILE_BITS) << _TILE_SHIFT)
        | ((col & _LOW) << _VALUE_BITS)
        | (row << _ROW_SHIFT)
        | value
    )


def _duplicate_rows(cells: Cells, packed: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
    """Copies of the packed non-zeros of every duplicate's source row, under the duplicate's row."""
    dups = np.flatnonzero(cells.is_dup)
    if len(dups) == 0:
        return packed[:0]
    src = cells.dup_source[dups]
    by_source = dups[np.argsort(src, kind="stable")].astype(np.int64)  # grouped by source row
    n_copies = np.bincount(src, minlength=cells.n)
    first_copy = np.cumsum(n_copies) - n_copies
    return _copy_rows(packed, n_copies, first_copy, by_source)


@numba.njit(nogil=True, cache=True)  # type: ignore[misc]
def _copy_rows(
    packed: npt.NDArray[np.int64],
    n_copies: npt.NDArray[np.int64],
    first_copy: npt.NDArray[np.int64],
    by_source: npt.NDArray[np.int64],
) -> npt.NDArray[np.int64]:
    """Each entry of ``packed`` once per duplicate of its row (``by_source[first_copy[r]:]``,
    ``n_copies[r]`` of them), the row bits replaced by the duplicate's.

    One pass instead of numpy's (row decode, ``np.repeat`` twice, gathers): 22.1 / 20.8 -> 7.2 /
    7.1 us of CPU per census-shape cell (``python benchmarks/bench_demo_data.py --profile-blocks
    20``, "duplicate cells", the old tree then this one, twice).
    """
    total = 0
    for i in range(packed.shape[0]):
        total += n_copies[(packed[i] >> _ROW_SHIFT) & _LOW]
    out = np.empty(total, np.int64)
    k = 0
    for i in range(packed.shape[0]):
        r = (packed[i] >> _ROW_SHIFT) & _LOW
        if n_copies[r] == 0:
            continue
        rest = packed[i] & ~(_LOW << _ROW_SHIFT)
        for j in range(first_copy[r], first_copy[r] + n_copies[r]):
            out[k] = rest | (by_source[j] << _ROW_SHIFT)
            k += 1
    return out


def _global_order(packed: npt.NDArray[np.int64], *, start: int) -> BlockX:
    """Sorted: tile by tile, row-major inside a tile (TileDB's global order); counts of one cell
    and gene (several clusters) summed."""
    rows, cols, values, n = _decode_sorted(_radix_sort(packed), start)
    return BlockX(rows[:n], cols[:n], values[:n])


@numba.njit(nogil=True, cache=True)  # type: ignore[misc]
def _radix_sort(packed: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
    """``packed`` ordered by its key (column tile, row, column in tile); the count bits below
    are left in any order (equal keys are summed after).

    Two stable counting passes, the column in the tile then (tile, row), instead of
    ``np.sort``. Census-shape blocks, CPU per cell of the sort and :func:`_decode_sorted`, on
    one machine (``python benchmarks/bench_demo_data.py --profile-blocks 20``, "global order"):
    ``np.sort`` 237 us with the earlier per-gene sparse sampler, 247 us with the per-cell one
    (random gene order within a cell), these passes 67 us. numpy has no radix sort for 64-bit
    integers.
    """
    n = packed.shape[0]
    tmp = np.empty_like(packed)
    low = np.zeros(_LOW + 2, np.int64)
    for i in range(n):
        low[((packed[i] >> _VALUE_BITS) & _LOW) + 1] += 1
    for d in range(1, low.shape[0]):
        low[d] += low[d - 1]
    for i in range(n):
        d = (packed[i] >> _VALUE_BITS) & _LOW
        tmp[low[d]] = packed[i]
        low[d] += 1
    high = np.zeros((packed.max() >> _ROW_SHIFT) + 2 if n else 1, np.int64)
    for i in range(n):
        high[(tmp[i] >> _ROW_SHIFT) + 1] += 1
    for d in range(1, high.shape[0]):
        high[d] += high[d - 1]
    out = packed  # sorted in place of the input
    for i in range(n):
        d = tmp[i] >> _ROW_SHIFT
        out[high[d]] = tmp[i]
        high[d] += 1
    return out


@numba.njit(nogil=True, cache=True)  # type: ignore[misc]
def _decode_sorted(
    packed: npt.NDArray[np.int64], start: int
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64], npt.NDArray[np.float32], int]:
    """Sorted packed non-zeros -> (rows, columns, counts, how many): one pass, equal keys summed.

    In numpy (shifts, masks, ``np.add.reduceat`` of the repeats, the cast) the sort and these
    passes cost 66.5 us of CPU per census-shape cell (2,084 non-zeros), now 48.0 us
    (``python benchmarks/bench_demo_data.py --profile-blocks 20``, "global order").
    """
    n = packed.shape[0]
    rows = np.empty(n, np.int64)
    cols = np.empty(n, np.int64)
    values = np.empty(n, np.float32)
    value_mask = (1 << _VALUE_BITS) - 1
    k = -1
    prev = -1
    total = 0
    for i in range(n):
        key = packed[i] >> _VALUE_BITS
        if key != prev:
            if k >= 0:
                values[k] = total
            k += 1
            prev = key
            total = 0
            rows[k] = ((key >> _TILE_BITS) & _LOW) + start
            cols[k] = ((key >> (2 * _TILE_BITS)) << _TILE_BITS) | (key & _LOW)
        total += packed[i] & value_mask
    if k >= 0:
        values[k] = total
    return rows, cols, values, k + 1
