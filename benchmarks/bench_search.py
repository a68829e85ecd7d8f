"""Nearest-cell search benchmark: index build time and peak RSS, query throughput, recall@30.

For each size n and latent width d, a synthetic run directory holds an scVI-like latent
(``embed/latent.npy``, float32, written chunk by chunk): 200 cell populations in an 8-dimensional
latent manifold, mapped into d dimensions, plus isotropic noise, with non-contiguous
soma_joinids. Then, each in its own child process (its own wall time and peak RSS):

1. ``run_index`` (stage ``census-scvi index``): staging, k-means, ingestion, and the nprobe
   calibration that picks the default nprobe reaching recall@30 >= 0.95;
2. a query of ``--queries`` new cells (embedded cells plus noise) at k = 30 and the calibrated
   nprobe: cells/s, and recall@30 against exact search (numpy, streamed over the memmap) on a
   sample of 1,000 of them, counted by soma_joinid.

Usage::

    .venv/bin/python benchmarks/bench_search.py --sizes 100000 1000000 --dims 10 50
"""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _measure import gib, measure

GENERATE = """
import json, numpy as np
from numpy.lib.format import open_memmap
run, n, d = {run!r}, {n}, {d}
rng = np.random.default_rng(0)
embed = run + "/embed"
import os; os.makedirs(embed, exist_ok=True)
centers = rng.normal(size=(200, 8)) * 2.0
w = np.linalg.qr(rng.normal(size=(d, 8)))[0] if d >= 8 else rng.normal(size=(d, 8))
lat = open_memmap(embed + "/latent.npy", mode="w+", dtype=np.float32, shape=(n, d))
for s in range(0, n, 1 << 18):
    m = min(n, s + (1 << 18)) - s
    u = centers[rng.integers(0, 200, m)] + rng.normal(size=(m, 8)) * 0.5
    lat[s:s + m] = (u @ w.T + rng.normal(size=(m, d)) * 0.05).astype(np.float32)
lat.flush()
ids = np.sort(rng.choice(int(n * 1.3), size=n, replace=False)).astype(np.int64)
np.save(embed + "/latent-idx.npy", ids)
json.dump({{"stage": "embed", "config_hash": "bench", "inputs": {{}}, "finished": "bench"}},
          open(embed + "/manifest.json", "w"))
"""

INDEX = """
import resource
import sklearn.cluster, tiledb.vector_search  # imported by the build; counted in the baseline
from census_scvi.config import load_config
from census_scvi.search import run_index
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
t = time.perf_counter()
res = run_index(load_config(None), run_dir={run!r}, build_memory_mib={mib})
extra = {{k: res.figures[k] for k in ("partitions", "nprobe", "recall", "build_seconds",
                                    "calibrate_seconds", "training_sample_size")}}
extra.update(stage_s=time.perf_counter() - t, base_rss=base)
"""

QUERY = """
import time, numpy as np
from census_scvi.search import exact_knn, open_index, query_index
from census_scvi.rundir import load_embedding, read_manifest
latent, ids = load_embedding({run!r})
nprobe = read_manifest({run!r} + "/index")["figures"]["nprobe"]
rng = np.random.default_rng(1)
rows = np.sort(rng.choice(latent.shape[0], size=min({queries}, latent.shape[0]), replace=False))
q = np.asarray(latent[rows]) + rng.normal(size=(rows.size, latent.shape[1])).astype(np.float32) * 0.05
index = open_index({run!r} + "/index/ivf_flat")
t = time.perf_counter()
found, _ = query_index(index, q, k=30, nprobe=nprobe)
query_s = time.perf_counter() - t
sample = rng.choice(rows.size, size=min(1000, rows.size), replace=False)
_, exact_rows = exact_knn(q[sample], latent, k=30)
exact = ids[exact_rows]
recall = float(np.mean([len(set(a) & set(b)) / 30 for a, b in zip(found[sample], exact)]))
extra = {{"nprobe": nprobe, "query_s": query_s, "cells_per_s": rows.size / query_s,
         "recall_at_30": recall, "n_queries": int(rows.size)}}
"""


def _case(base: Path, n: int, d: int, queries: int, mib: int) -> dict:
    run = str(base / f"run-{n}-{d}")
    measure(GENERATE.format(run=run, n=n, d=d))
    built = measure(INDEX.format(run=run, mib=mib))
    queried = measure(QUERY.format(run=run, queries=queries))
    return {"n": n, "d": d, "build": built, "query": queried}


def _row(r: dict) -> str:
    b, q = r["build"], r["query"]
    return (
        f"{r['n']:>9,} {r['d']:>3} | {b['partitions']:>6,} {b['nprobe']:>6} | "
        f"{b['build_seconds']:>8.1f} {b['calibrate_seconds']:>7.1f} {b['stage_s']:>8.1f} "
        f"{gib(b['peak_rss_bytes']):>10} {gib(b['peak_rss_bytes'] - b['base_rss']):>10} | "
        f"{q['cells_per_s']:>10,.0f} "
        f"{b['recall']:>8.3f} {q['recall_at_30']:>8.3f}"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    p.add_argument("--dims", type=int, nargs="+", default=[10, 50])
    p.add_argument("--queries", type=int, default=20_000, help="query cells per case")
    p.add_argument("--build-memory-mib", type=int, default=64, help="run_index's build_memory_mib")
    p.add_argument("--workdir", type=Path, default=None, help="default: a temporary folder")
    args = p.parse_args()
    print("command:", shlex.join([Path(sys.executable).name, *sys.argv]))
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        print(
            f"{'cells':>9} {'d':>3} | {'parts':>6} {'nprobe':>6} | {'build_s':>8} "
            f"{'calib_s':>7} {'stage_s':>8} {'peak RSS':>10} {'over base':>10} | {'query c/s':>10} "
            f"{'recall*':>8} {'recall':>8}"
        )
        for n in args.sizes:
            for d in args.dims:
                print(_row(_case(Path(tmp), n, d, args.queries, args.build_memory_mib)), flush=True)
    print(
        "build_s: staging + k-means + ingestion; calib_s: the nprobe calibration; stage_s: the "
        "whole run_index (after imports); peak RSS: that child's, and over base: above its RSS "
        "after importing tiledb.vector_search, sklearn and census_scvi. query c/s: query "
        "cells per second at k=30 and the calibrated nprobe (all cores); recall*: calibration's "
        "recall@30 (indexed cells, self excluded); recall: new cells against exact numpy k-NN."
    )


if __name__ == "__main__":
    main()
