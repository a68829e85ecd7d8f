"""Stream-mode reads: TileDB with the model genes as coordinates vs all genes, by shuffle chunk.

For reads of ``--cells`` training cells made of randomly chosen runs of ``chunk`` consecutive
cells, prints cells per CPU-second (x2 for the 2 TileDB threads, comparable with the loader
figures of bench_train.py) of: (1) ``X.read(coords=(cells, hvg_joinids))``, the read
tiledbsoma-ml's ExperimentDataset makes; (2) ``X.read(coords=(cells,))``, all genes; (3) our
``IOBatchReader.read`` (all genes + numba filter + CSR). Needs a prepared run dir (prepare/).

    python benchmarks/bench_stream_read.py --census /tmp/cbt/census-50000x4000 \
        --run /tmp/cbt/run-hvg2000 --chunks 64 256 512
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--census", required=True, help="census (mini census) path")
    p.add_argument("--run", required=True, help="run dir with prepare/cells.parquet, hvg.parquet")
    p.add_argument("--cells", type=int, default=8192, help="cells per read")
    p.add_argument("--chunks", type=int, nargs="+", default=[64, 256, 512])
    p.add_argument("--reps", type=int, default=3)
    args = p.parse_args()

    import numpy as np
    import pandas as pd
    import tiledbsoma as soma
    from tiledbsoma_ml.x_locator import XLocator

    from census_scvi.train._soma_reader import IOBatchReader

    prep = Path(args.run) / "prepare"
    cells = np.sort(pd.read_parquet(prep / "cells.parquet")["soma_joinid"].to_numpy())
    hvg = pd.read_parquet(prep / "hvg.parquet")
    genes = np.sort(hvg.loc[hvg["highly_variable"], "soma_joinid"].to_numpy())
    uri = f"{args.census}/census_data/homo_sapiens"
    exp = soma.Experiment.open(uri)
    X = exp.ms["RNA"].X["raw"]
    reader = IOBatchReader(XLocator.create(exp, measurement_name="RNA", layer_name="raw"), genes)
    rng = np.random.default_rng(0)
    print(
        f"{len(cells):,} cells, {len(genes):,} model genes of {X.shape[1]:,}; {args.cells} per read"
    )

    def pick(chunk: int) -> np.ndarray:
        runs = rng.choice(len(cells) // chunk, args.cells // chunk, replace=False)
        return np.sort(np.concatenate([cells[r * chunk : (r + 1) * chunk] for r in runs]))

    def timed(fn) -> float:
        fn(pick(64))  # warm-up (numba compilation, TileDB metadata)
        cpu = 0.0
        for _ in range(args.reps):
            ids = pick(chunk)
            c = time.process_time()
            fn(ids)
            cpu += time.process_time() - c
        return args.reps * args.cells / cpu * 2

    variants = {
        "model genes as coordinates": lambda ids: X.read(coords=(ids, genes)).tables().concat(),
        "all genes": lambda ids: X.read(coords=(ids,)).tables().concat(),
        "IOBatchReader.read (CSR)": reader.read,
    }
    for chunk in args.chunks:
        for name, fn in variants.items():
            print(f"chunk {chunk:5d}  {name:28s} {timed(fn):9,.0f} cells per CPU-second x2")
    reader.close()
    exp.close()


if __name__ == "__main__":
    main()
