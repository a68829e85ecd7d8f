"""Embed's count read: tiledbsoma's blockwise reader with the model genes as coordinates (what
embed used before) vs the shared range reader (``census_scvi.embed._io.iter_blocks``), with numpy's
default huge-page advice and with the stages' setting (``census_scvi._allocators``), by census size.

For each census, reads ``--cells`` consecutive cells x ``--genes`` randomly chosen genes (the
model's genes) at the start, middle and end of the cell ids, each read in its own child process
(fresh TileDB caches), and prints user and system CPU seconds per 8,192 cells and the ratio.
The two readers' blocks are checked equal.

    python benchmarks/bench_embed_read.py --census /tmp/scale/census-250000 /tmp/scale/census-2000000
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

CHILD = r"""
import json, resource, sys
import numpy as np, scipy.sparse as sp, tiledbsoma as soma
from census_scvi.embed._io import GeneMap, iter_blocks
from census_scvi.soma import tiledb_read_config
from census_scvi._allocators import use_lean_allocators

uri, reader, where, cells, n_genes = sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
ctx = soma.SOMATileDBContext(tiledb_config=tiledb_read_config(64 * 1024**2))
exp = soma.Experiment.open(uri + "/census_data/homo_sapiens", context=ctx)
X = exp.ms["RNA"].X["raw"]
n_var = exp.ms["RNA"].var.count
var = np.random.default_rng(0).choice(n_var, min(n_genes, n_var), replace=False)
genes = GeneMap(np.asarray(var, dtype=np.int64), np.ones(len(var), dtype=bool))
start = int((exp.obs.count - cells) * where)
ids = np.arange(start, start + cells, dtype=np.int64)

def blockwise():  # the reader embed used before
    read = X.read(coords=(ids, genes.read_joinids))
    for block, _ in read.blockwise(axis=0, size=8192, eager=True).scipy():
        yield sp.csr_matrix(block, dtype=np.float32)

if reader == "range-lean":
    use_lean_allocators()
r0 = resource.getrusage(resource.RUSAGE_SELF)
blocks = list(blockwise() if reader == "blockwise" else iter_blocks(X, ids, genes, block_rows=8192))
r1 = resource.getrusage(resource.RUSAGE_SELF)
m = sp.vstack(blocks).tocsr(); m.sort_indices()
digest = float(m.data.sum()) + float((m.indices.astype(np.float64) * m.data).sum())
print("__R__" + json.dumps({"user": r1.ru_utime - r0.ru_utime, "sys": r1.ru_stime - r0.ru_stime,
                           "nnz": int(m.nnz), "digest": digest}))
"""


def _child(*args: object) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, *map(str, args)], capture_output=True, text=True, check=False
    )
    for line in proc.stdout.splitlines():
        if line.startswith("__R__"):
            return json.loads(line[5:])
    raise RuntimeError(proc.stderr[-3000:])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--census", nargs="+", required=True, help="mini census paths")
    p.add_argument("--cells", type=int, default=16384, help="cells per read")
    p.add_argument("--genes", type=int, default=8000, help="model genes")
    args = p.parse_args()
    print(
        "census | reader | user s / 8192 cells | sys s / 8192 cells | CPU ratio (blockwise / range)"
    )
    for census in args.census:
        cpu = {}
        for reader in ("blockwise", "range", "range-lean"):
            runs = [_child(census, reader, w, args.cells, args.genes) for w in (0.0, 0.5, 1.0)]
            per = 8192 / args.cells / len(runs)
            user, sys_ = sum(r["user"] for r in runs) * per, sum(r["sys"] for r in runs) * per
            cpu[reader] = (user + sys_, [(r["nnz"], round(r["digest"], 1)) for r in runs])
            print(f"{census} | {reader} | {user:.2f} | {sys_:.2f} |", flush=True)
        for reader in ("range", "range-lean"):
            if cpu["blockwise"][1] != cpu[reader][1]:
                raise SystemExit(f"{reader} disagrees: {cpu['blockwise'][1]} vs {cpu[reader][1]}")
            ratio = cpu["blockwise"][0] / cpu[reader][0]
            print(f"{census} | blockwise / {reader} | | | {ratio:.2f}x", flush=True)


if __name__ == "__main__":
    main()
