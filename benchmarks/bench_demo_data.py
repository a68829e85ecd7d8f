"""Mini census generation: wall time, cells/s and peak RSS at two sizes (each in its own process).

Usage: python benchmarks/bench_demo_data.py [--sizes 100000 1000000] [--genes 2000]
       [--shape default|census] [--processes P] [--out DIR]

The peak RSS is the parent's; the writers' largest is printed beside it (``writer RSS``).

``--x-write N`` instead times the X write alone for N human cells, three ways, each in its own
process on the same generated counts (generation not timed): ``global`` (the generator's
:class:`~census_scvi.soma._writer.CountsWriter`, one global-order fragment), ``unordered`` (the
same 4M-value writes left for TileDB to sort, the generator's path before) and ``from_anndata``
(``tiledbsoma.io.from_anndata`` of the whole matrix, build-census's path).

``--sample GENES`` instead times the count sampler alone (CPU per cell, no writing) at GENES human
genes: the census shape (256 dense genes, the rest sparse) against every gene sampled densely.

``--profile-blocks N`` instead prints where the CPU of generating N census-shape blocks (20,000
genes, no writing) goes, step by step, in microseconds per cell, with the writer processes'
allocator settings.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

from _measure import gib, measure

_X_SETUP = """
import time
import numpy as np
import scipy.sparse as sp
from census_scvi.demo._model import SHAPES, block_cells, block_rng, design
from census_scvi.demo._sample import block_counts
from census_scvi.soma._writer import (
    CountsWriter, create_census_root, create_counts_array, create_experiment,
)

d = design("homo_sapiens", {n}, {genes}, 0, SHAPES["default"])
blocks = []
for b in range(d.n_blocks):
    x = block_counts(d, block_cells(d, b, 0), block_rng(d, b, 0, 1))
    order = np.lexsort((x.cols, x.rows))  # row-major, as CountsWriter.append takes them
    blocks.append((x.rows[order], x.cols[order], x.values[order]))
root = {root!r}
create_census_root(root, created_by="bench")
ms = create_experiment(root + "/census_data", "homo_sapiens") + "/ms/RNA"
t0 = time.perf_counter()
"""

_X_MODES = {
    "global": """
with CountsWriter(create_counts_array(ms, (d.n_cells, d.n_genes)), checked=False) as w:
    for r, c, v in blocks:
        w.append(r, c, v)
""",
    "unordered": """
import pyarrow as pa, tiledbsoma as soma
uri = create_counts_array(ms, (d.n_cells, d.n_genes))
with soma.SparseNDArray.open(uri, "w") as arr:
    buf, n = [], 0
    for piece in blocks + [None]:
        if piece is not None:
            buf.append(piece)
            n += len(piece[2])
        if buf and (piece is None or n >= 4_000_000):
            r, c, v = (np.concatenate(p) for p in zip(*buf))
            arr.write(pa.table({{"soma_dim_0": r, "soma_dim_1": c.astype(np.int64), "soma_data": v}}))
            buf, n = [], 0
""",
    "from_anndata": """
import anndata as ad, pandas as pd, tiledbsoma.io as tio
r, c, v = (np.concatenate(p) for p in zip(*blocks))
x = sp.csr_matrix((v, (r, c)), shape=(d.n_cells, d.n_genes))
obs = pd.DataFrame(index=[str(i) for i in range(d.n_cells)])
t0 = time.perf_counter()  # the matrix is built; time the ingestion alone
tio.from_anndata(root + "/x-anndata", ad.AnnData(X=x, obs=obs, var=pd.DataFrame(index=d.gene_ids)),
                 "RNA", X_layer_name="raw", uns_keys=[],
                 platform_config={{"tiledb": {{"create": {{"goal_chunk_nnz": 16_000_000}}}}}})
""",
}


def x_write(n: int, genes: int, root: Path) -> None:
    for mode, body in _X_MODES.items():
        path = root / f"x-{mode}"
        shutil.rmtree(path, ignore_errors=True)
        code = _X_SETUP.format(n=n, genes=genes, root=str(path)) + body.format()
        code += (
            "extra = {'write_s': time.perf_counter() - t0, 'nnz': sum(len(b[2]) for b in blocks)}\n"
        )
        r = measure(code)
        print(
            f"X write {mode:>12}: {r['nnz']:,} nnz ({n:,} cells x {genes:,} genes) in "
            f"{r['write_s']:6.1f} s = {r['nnz'] / r['write_s'] / 1e6:5.2f}M nnz/s; "
            f"peak RSS {gib(r['peak_rss_bytes'])}",
            flush=True,
        )
        shutil.rmtree(path, ignore_errors=True)


_SAMPLE = """
import resource
from census_scvi.demo._model import SHAPES, Shape, block_cells, block_rng, design
from census_scvi.demo._sample import block_counts

shape = SHAPES["census"] if {census} else Shape("dense", "lognormal", None)
d = design("homo_sapiens", 4 * 2048, {genes}, 0, shape)
cells = [block_cells(d, b, 0) for b in range(4)]
block_counts(d, cells[0], block_rng(d, 0, 0, 1))  # warm-up (caches)
r0 = resource.getrusage(resource.RUSAGE_SELF)
nnz = sum(len(block_counts(d, c, block_rng(d, b, 0, 1)).values) for b, c in enumerate(cells[1:], 1))
r1 = resource.getrusage(resource.RUSAGE_SELF)
n = sum(c.n for c in cells[1:])
extra = {{"cpu_us": (r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime) / n * 1e6,
          "nnz": nnz / n}}
"""


def sample(genes: int) -> None:
    for census in (True, False):
        r = measure(_SAMPLE.format(census=census, genes=genes))
        name = "census shape (256 dense)" if census else "every gene dense"
        print(
            f"sampler {name:>24}, {genes:,} genes: {r['cpu_us']:6.0f} us CPU per cell, "
            f"{r['nnz']:,.0f} non-zeros per cell",
            flush=True,
        )


_PROFILE = """
import time
import numpy as np
from census_scvi._allocators import use_lean_allocators
from census_scvi.demo import _sample as S
from census_scvi.demo._model import BLOCK_CELLS, SHAPES, block_cells, block_rng, design
from census_scvi.demo._tables import BlockStats, OrganismCounts, obs_block, obs_categories
from census_scvi.soma._schema import OBS_COLUMNS
from census_scvi.soma._writer import schema_table

use_lean_allocators()
d = design("homo_sapiens", 1_000_000, 20_000, 0, SHAPES["census"])
cats = obs_categories(d)
counts = OrganismCounts.zeros(d)
cpu = {{}}
def step(name, t0):
    cpu[name] = cpu.get(name, 0.0) + time.process_time() - t0
    return time.process_time()
S.block_counts(d, block_cells(d, 0, 0), block_rng(d, 0, 0, 1))  # numba: load the kernels first
nnz = 0
for b in range({n}):
    t = time.process_time()
    cells = block_cells(d, b, 0); t = step("cells", t)
    rng = block_rng(d, b, 0, 1)
    primary = np.flatnonzero(~cells.is_dup)
    combo = cells.combo(d)[primary]
    lib = np.exp(cells.log_lib[primary].astype(np.float64))
    parts = [S._dense(d, primary, combo, lib, rng)]; t = step("dense genes", t)
    parts += S._sparse(d, primary, combo, lib, rng); t = step("sparse genes", t)
    parts += [S._duplicate_rows(cells, p) for p in parts]; t = step("duplicate cells", t)
    bx = S._global_order(np.concatenate(parts), start=cells.start); t = step("global order", t)
    stats = BlockStats.of(bx, cells); t = step("row stats", t)
    counts.count(d, cells, bx, stats); t = step("dataset counts", t)
    schema_table(obs_block(d, cells, stats, cats), OBS_COLUMNS, first_joinid=cells.start)
    t = step("obs table", t)
    nnz += len(bx.values)
n_cells = {n} * BLOCK_CELLS
extra = {{"cpu_us": {{k: v / n_cells * 1e6 for k, v in cpu.items()}}, "nnz": nnz / n_cells}}
"""


def profile_blocks(n: int) -> None:
    import os

    from census_scvi.demo._parallel import _WRITER_ENV

    r = measure(_PROFILE.format(n=n), env={**os.environ, **_WRITER_ENV})  # the writers' malloc
    total = sum(r["cpu_us"].values())
    for name, us in r["cpu_us"].items():
        print(f"{name:>16}: {us:6.1f} us CPU per cell ({100 * us / total:4.1f}%)")
    print(f"{'total':>16}: {total:6.1f} us CPU per cell, {r['nnz']:,.0f} non-zeros per cell")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--genes", type=int, default=2000)
    ap.add_argument("--shape", choices=["default", "census"], default="default")
    ap.add_argument("--processes", type=int, default=None)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--x-write", type=int, default=None, metavar="N")
    ap.add_argument("--sample", type=int, default=None, metavar="GENES")
    ap.add_argument("--profile-blocks", type=int, default=None, metavar="N")
    args = ap.parse_args()
    if args.profile_blocks:
        profile_blocks(args.profile_blocks)
        return
    root = Path(args.out or tempfile.mkdtemp(prefix="bench-demo-"))
    if args.sample:
        sample(args.sample)
        return
    if args.x_write:
        x_write(args.x_write, args.genes, root)
        return
    rows = []
    for n in args.sizes:
        path = root / f"mini-{n}"
        shutil.rmtree(path, ignore_errors=True)
        r = measure(
            f"""
            from census_scvi.demo import make_mini_census
            res = make_mini_census({str(path)!r}, n_cells={n}, n_genes={args.genes}, seed=0,
                                   shape={args.shape!r}, processes={args.processes!r})
            extra = {{"writer_rss": res.writer_peak_rss_bytes, "processes": res.processes}}
            """
        )
        size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
        rows.append((n, r["wall_s"], n / r["wall_s"], r["peak_rss_bytes"], size))
        print(
            f"cells={n:>9,} genes={args.genes:,} shape={args.shape} P={r['processes']}: "
            f"{r['wall_s']:7.1f} s  {n / r['wall_s']:8,.0f} cells/s  peak RSS "
            f"{gib(r['peak_rss_bytes'])} (writer RSS {gib(r['writer_rss'])})  on disk {gib(size)}",
            flush=True,
        )
        if args.out is None:
            shutil.rmtree(path, ignore_errors=True)
    if len(rows) >= 2:
        print(
            f"peak RSS ratio {rows[-1][0]:,}/{rows[0][0]:,} cells: {rows[-1][3] / rows[0][3]:.2f}x; "
            f"throughput ratio {rows[-1][2] / rows[0][2]:.2f}x"
        )


if __name__ == "__main__":
    main()
