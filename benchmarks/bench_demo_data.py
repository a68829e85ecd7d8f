"""Mini census generation: wall time, cells/s and peak RSS at two sizes (each in its own process).

Usage: python benchmarks/bench_demo_data.py [--sizes 100000 1000000] [--genes 2000] [--out DIR]

``--x-write N`` instead times the X write alone for N human cells, three ways, each in its own
process on the same generated counts (generation not timed): ``global`` (the generator's
:class:`~census_scvi.soma._writer.CountsWriter`, global-order writes), ``unordered`` (the same
4M-value writes left for TileDB to sort, the generator's path before) and ``from_anndata``
(``tiledbsoma.io.from_anndata`` of the whole matrix, build-census's path).
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
from census_scvi.demo._model import BLOCK_CELLS, block_counts, design
from census_scvi.soma._writer import CountsWriter, create_census_root, create_experiment

d = design("homo_sapiens", {n}, {genes}, 0)
blocks = []
for start in range(0, d.n_cells, BLOCK_CELLS):
    counts = block_counts(d, start, min(start + BLOCK_CELLS, d.n_cells), 0)
    r, c = np.nonzero(counts)
    blocks.append((r.astype(np.int64) + start, c, counts[r, c]))
root = {root!r}
create_census_root(root, created_by="bench")
ms = create_experiment(root + "/census_data", "homo_sapiens") + "/ms/RNA"
t0 = time.perf_counter()
"""

_X_MODES = {
    "global": """
with CountsWriter(ms, (d.n_cells, d.n_genes)) as w:
    for r, c, v in blocks:
        w.append(r, c, v)
""",
    "unordered": """
from tiledbsoma.options import TileDBWriteOptions
w = CountsWriter(ms, (d.n_cells, d.n_genes))
w._array.close()
import pyarrow as pa, tiledbsoma as soma
with soma.SparseNDArray.open(ms + "/X/raw", "w") as arr:
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--genes", type=int, default=2000)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--x-write", type=int, default=None, metavar="N")
    args = ap.parse_args()
    root = Path(args.out or tempfile.mkdtemp(prefix="bench-demo-"))
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
            make_mini_census({str(path)!r}, n_cells={n}, n_genes={args.genes}, seed=0)
            """
        )
        size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
        rows.append((n, r["wall_s"], n / r["wall_s"], r["peak_rss_bytes"], size))
        print(
            f"cells={n:>9,} genes={args.genes:,}: {r['wall_s']:7.1f} s  "
            f"{n / r['wall_s']:8,.0f} cells/s  peak RSS {gib(r['peak_rss_bytes'])}  "
            f"on disk {gib(size)}",
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
