"""One block's counts: exact negative binomials, dense for the top genes and sparse for the rest.

Every count is NB(mean ``mu = L * p``, dispersion ``phi``), ``L`` the cell's library size and
``p`` its profile's share of the gene (the design's ``combo_props``).

- **Dense genes** (:attr:`Design.dense`: every gene for the default shape, the 256 most expressed
  for the census shape): the gamma-Poisson mixture drawn per cell and gene, as Splatter does.
- **Sparse genes**: a cost per count instead of per gene, which is what makes a 20,000-gene
  census cheap (~2,000 non-zeros per cell). NB is a compound Poisson: ``Poisson(ln(1 + phi mu) /
  phi)`` clusters per cell and gene, each of ``Logarithmic(phi mu / (1 + phi mu))`` counts.
  Candidates are drawn at the Poisson rate ``mu`` (an upper bound) for all cells of a profile at
  once (per profile and gene: is there a first arrival before ``sum L * p``, then how many more),
  each is given a cell in proportion to ``L`` (an alias table per profile), and a single uniform ``v`` both thins it to the
  cluster rate and draws its size by inversion: ``P(accept, size k) = q^k / (k x)``, with ``x =
  phi mu`` and ``q = x / (1 + x)``, so ``v < 1 / (1 + x)`` is one count (most candidates),
  ``v >= ln(1 + x) / x`` a rejection.

Measured with ``python benchmarks/bench_demo_data.py --sample 20000`` (2 cores shared, load ~5):
the census shape costs 0.29 ms of CPU per cell, every gene sampled densely 1.84 ms, for the same
2,066 non-zeros per cell (the two paths sample one distribution; see also the NB oracle tests).
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
_PROFILES_PER_STEP = 16  # expression profiles sampled together by _sparse


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

    Profiles are taken :data:`_PROFILES_PER_STEP` at a time, so the per-candidate arrays stay
    small enough for the CPU caches; a candidate's cell comes from its profile's alias table
    (a binary search per candidate cost ~3x more).
    """
    order = np.argsort(combo, kind="stable")
    profiles, starts, sizes = np.unique(combo[order], return_index=True, return_counts=True)
    lib_sorted = lib[order]
    total = np.add.reduceat(lib_sorted, starts)  # library of each profile's cells
    accept, alias = _alias_tables(lib_sorted, starts, sizes)
    out = []
    for a in range(0, len(profiles), _PROFILES_PER_STEP):
        b = min(a + _PROFILES_PER_STEP, len(profiles))
        props = d.sparse_props[profiles[a:b]]
        lam = props * total[a:b, None].astype(np.float32)
        first = rng.standard_exponential(lam.shape, dtype=np.float32)
        pi, gi = np.nonzero(first < lam)  # (profile, gene) with at least one candidate
        n = 1 + rng.poisson(lam[pi, gi] - first[pi, gi])
        n_hits = int(n.sum())
        # two uniforms per candidate: its cell (alias table), then its thinning and size
        u, v = rng.random(n_hits), rng.random(n_hits)
        xbase = (d.dispersion[d.sparse[gi]] * props[pi, gi]).astype(np.float64)
        out.append(
            _place_candidates(
                n,
                u,
                v,
                xbase,
                sizes[pi + a],
                starts[pi + a],
                accept,
                alias,
                lib_sorted,
                primary[order],
                d.sparse[gi],
            )
        )
    return out


@numba.njit(nogil=True, cache=True)  # type: ignore[misc]
def _place_candidates(
    n: npt.NDArray[np.int64],
    u: npt.NDArray[np.float64],
    v: npt.NDArray[np.float64],
    xbase: npt.NDArray[np.float64],
    size_of: npt.NDArray[np.intp],
    start_of: npt.NDArray[np.intp],
    accept: npt.NDArray[np.float64],
    alias: npt.NDArray[np.int64],
    lib_sorted: npt.NDArray[np.float64],
    row_of: npt.NDArray[np.intp],
    gene_of: npt.NDArray[np.int64],
) -> npt.NDArray[np.int64]:
    """The kept candidates of one step, packed (:func:`_pack`): ``n[p]`` candidates of each
    (profile, gene) pair ``p``; each takes a cell from its profile's alias table with ``u`` and
    is thinned and sized with ``v`` (:func:`_cluster_size`).

    One pass per candidate, the same draws and results as the numpy version (gathers,
    ``np.where``, the vectorised size series, masks, the packing), with which the sparse genes
    cost 176 us of CPU per census-shape cell (~2,800 candidates), now 125 us
    (``python benchmarks/bench_demo_data.py --profile-blocks 20``, "sparse genes").
    """
    out = np.empty(u.shape[0], np.int64)
    k = 0
    i = 0
    for p in range(n.shape[0]):
        m = size_of[p]
        for _ in range(n[p]):
            draw = u[i] * m
            j = np.int64(draw)
            slot = start_of[p] + j
            pos = slot if draw - j < accept[slot] else alias[slot]
            size = _cluster_size(xbase[p] * lib_sorted[pos], v[i])
            i += 1
            if size:
                out[k] = _pack_one(row_of[pos], gene_of[p], size)
                k += 1
    return out[:k]


def _alias_tables(
    weights: npt.NDArray[np.float64], starts: npt.NDArray[np.intp], sizes: npt.NDArray[np.intp]
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.int64]]:
    """Walker/Vose alias tables of each segment ``[start, start + size)`` of ``weights``.

    Slot ``i`` of a segment keeps itself with probability ``accept[i]``, else gives ``alias[i]``;
    drawing a uniform slot of the segment then gives each index with probability ``w / sum(w)``.
    """
    accept = np.ones(len(weights))
    alias = np.arange(len(weights), dtype=np.int64)
    for s0, m in zip(starts.tolist(), sizes.tolist(), strict=True):
        if m == 1:
            continue
        w = weights[s0 : s0 + m]
        p = (w * (m / w.sum())).tolist()
        small = [i for i in range(m) if p[i] < 1.0]
        large = [i for i in range(m) if p[i] >= 1.0]
        while small and large:
            lo, hi = small.pop(), large.pop()
            accept[s0 + lo], alias[s0 + lo] = p[lo], s0 + hi
            p[hi] += p[lo] - 1.0
            (small if p[hi] < 1.0 else large).append(hi)
    return accept, alias


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
    by_source = dups[np.argsort(src, kind="stable")]  # duplicate rows, grouped by source row
    n_copies = np.bincount(src, minlength=cells.n)
    first_copy = np.cumsum(n_copies) - n_copies
    rows = (packed >> _ROW_SHIFT) & _LOW
    copies = n_copies[rows]
    entry = np.flatnonzero(copies)
    reps = copies[entry]
    e = np.repeat(entry, reps)
    k = np.arange(len(e)) - np.repeat(np.cumsum(reps) - reps, reps)  # copy number of the entry
    new_rows = by_source[first_copy[rows[e]] + k].astype(np.int64)
    return (packed[e] & ~(_LOW << _ROW_SHIFT)) | (new_rows << _ROW_SHIFT)


def _global_order(packed: npt.NDArray[np.int64], *, start: int) -> BlockX:
    """Sorted: tile by tile, row-major inside a tile (TileDB's global order); counts of one cell
    and gene (several clusters) summed."""
    packed.sort()
    rows, cols, values, n = _decode_sorted(packed, start)
    return BlockX(rows[:n], cols[:n], values[:n])


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
