"""Benchmark build-census: ingestion speed (cells/s) and peak RSS for a synthetic h5ad.

Each measured case runs in its own child process (this script with ``--child``), which reports
its wall time and its own peak RSS (``getrusage(RUSAGE_SELF)``), so cases do not share memory.

Cases, on the same file:
- ``read``: ``anndata.read_h5ad`` alone (the floor: what any ingestion must pay);
- ``baseline``: plain ``tiledbsoma.io.from_h5ad`` into a fresh experiment (no count checks,
  no Census columns, no staging): the library's own single-file ingestion;
- ``build``: ``build_census`` creating a census from the file;
- ``append``: ``build_census --append`` of a second file of the same size (another seed, another
  dataset_id: a copy of the first would be refused as the same cells) into that census
  (hard-linked staging clone, registration against the existing experiment, var/presence/info
  rewrite);
- ``build-100M``: ``build`` with tiledbsoma's default X write chunk (100M non-zeros) instead of
  ours (16M), to show what the smaller chunk buys in memory.

Usage::

    python benchmarks/bench_build_census.py --cells 200000 --genes 2000 --nnz-per-cell 400
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def make_h5ad(path: Path, n_cells: int, n_genes: int, nnz_per_cell: int, seed: int) -> int:
    """Write a synthetic count h5ad (CSR float32 integers, Ensembl-like ids); returns nnz."""
    import anndata as ad
    import pandas as pd
    import scipy.sparse as sp

    rng = np.random.default_rng(seed)
    weights = rng.gamma(0.6, 1.0, n_genes)
    weights /= weights.sum()
    chunks = []
    for start in range(0, n_cells, 20_000):
        n = min(20_000, n_cells - start)
        k = rng.poisson(nnz_per_cell, n).clip(1, n_genes)
        indptr = np.concatenate([[0], np.cumsum(k)])
        cols = np.empty(indptr[-1], dtype=np.int32)
        for i in range(n):  # distinct genes per cell, drawn by expression weight
            cols[indptr[i] : indptr[i + 1]] = np.sort(
                rng.choice(n_genes, k[i], replace=False, p=weights)
            )
        data = (rng.geometric(0.4, indptr[-1])).astype(np.float32)
        chunks.append(sp.csr_matrix((data, cols, indptr), shape=(n, n_genes)))
    x = sp.vstack(chunks, format="csr")
    obs = pd.DataFrame(
        {
            "cell_type": pd.Categorical(rng.choice([f"type{i}" for i in range(12)], n_cells)),
            "donor": pd.Categorical(rng.choice([f"donor{i}" for i in range(8)], n_cells)),
        },
        index=[f"cell{i}" for i in range(n_cells)],
    )
    var = pd.DataFrame(
        {"feature_name": [f"GENE{i}" for i in range(n_genes)]},
        index=[f"ENSG{i:011d}" for i in range(n_genes)],
    )
    ad.AnnData(X=x, obs=obs, var=var).write_h5ad(path)
    return int(x.nnz)


def child(mode: str, h5ad: str, out: str, columns: str) -> dict[str, float]:
    t0 = time.perf_counter()
    if mode == "read":
        import anndata as ad

        ad.read_h5ad(h5ad)
    elif mode == "baseline":
        import tiledbsoma.io as tio

        tio.from_h5ad(out, h5ad, "RNA", X_layer_name="raw", uns_keys=[])
    elif mode in ("build", "append", "build-100M"):
        import census_scvi.build._ingest as bs
        from census_scvi.build import build_census

        if mode == "build-100M":  # tiledbsoma's default write chunk, for comparison
            bs.WRITE_CHUNK_NNZ = 100_000_000
        build_census(out, [h5ad], columns=columns, append=mode == "append")
    else:
        raise ValueError(mode)
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"seconds": seconds, "peak_rss_bytes": float(peak)}


def run_child(mode: str, h5ad: Path, out: Path, columns: Path) -> dict[str, float]:
    cmd = [sys.executable, __file__, "--child", mode, str(h5ad), str(out), str(columns)]
    res = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--cells", type=int, default=200_000)
    p.add_argument("--genes", type=int, default=2_000)
    p.add_argument("--nnz-per-cell", type=int, default=400)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", type=Path, default=None, help="default: a temporary folder")
    p.add_argument("--child", nargs=4, metavar=("MODE", "H5AD", "OUT", "COLUMNS"))
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(*args.child)))
        return

    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench-build-census-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        h5ad = work / "synthetic.h5ad"
        t0 = time.perf_counter()
        nnz = make_h5ad(h5ad, args.cells, args.genes, args.nnz_per_cell, args.seed)
        gen_s = time.perf_counter() - t0
        copy = work / "synthetic_second.h5ad"  # other counts: a copy is refused as the same cells
        make_h5ad(copy, args.cells, args.genes, args.nnz_per_cell, args.seed + 1)
        columns = work / "cols.yaml"
        columns.write_text("donor_id: donor\n")
        x_bytes = nnz * 8 + (args.cells + 1) * 8  # float32 data + int32 indices + indptr
        print(
            f"# {args.cells:,} cells x {args.genes:,} genes, {nnz:,} non-zeros "
            f"({nnz / args.cells:.0f}/cell); X in memory {x_bytes / 2**20:.0f} MiB; "
            f"h5ad {h5ad.stat().st_size / 2**20:.0f} MiB (generated in {gen_s:.0f} s); "
            f"{os.cpu_count()} CPUs"
        )
        results = {
            "read": run_child("read", h5ad, work / "unused", columns),
            "baseline": run_child("baseline", h5ad, work / "baseline.soma", columns),
            "build": run_child("build", h5ad, work / "census", columns),
            "append": run_child("append", copy, work / "census", columns),
            "build-100M": run_child("build-100M", h5ad, work / "census-100M", columns),
        }
        base = results["baseline"]["seconds"]
        print(
            f"{'case':10s} {'seconds':>8s} {'cells/s':>10s} {'vs baseline':>11s} {'peak RSS':>9s}"
        )
        for mode, r in results.items():
            rate = args.cells / r["seconds"]
            print(
                f"{mode:10s} {r['seconds']:8.1f} {rate:10,.0f} {r['seconds'] / base:10.2f}x "
                f"{r['peak_rss_bytes'] / 2**30:7.2f} GiB"
            )
        print(
            f"build peak RSS / X in memory: {results['build']['peak_rss_bytes'] / x_bytes:.1f}x; "
            f"append peak RSS / X in memory: {results['append']['peak_rss_bytes'] / x_bytes:.1f}x"
        )
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
