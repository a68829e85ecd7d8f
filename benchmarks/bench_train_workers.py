"""Memory-mode training time by ``train.num_workers``: many small epochs, where worker start-up shows.

Each value trains the same tiny mini census (``--cells`` x ``--genes``, 100 HVGs, n_hidden 32,
batch 256) for ``--epochs`` epochs on the CPU, in its own child process, and prints the wall
time, the fit time (Lightning's fit loop) and the DataLoader workers actually used (the train
stage caps ``num_workers`` at the CPU cores available and keeps its workers for the whole fit).

    python benchmarks/bench_train_workers.py --workers 0 4 --epochs 40
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _overrides(census: str, epochs: int, workers: int) -> list[str]:
    return [
        f"census.uri={census}",
        "hvg.top_n_hvg=100",
        "model.n_hidden=32",
        "model.n_latent=4",
        f"train.max_epochs={epochs}",
        "train.batch_size=256",
        "train.accelerator=cpu",
        f"train.num_workers={workers}",
    ]


def child(census: str, prepared: str, epochs: int, workers: int) -> dict:
    from census_scvi.config import load_config
    from census_scvi.train import run_train

    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda r: records.append(r.getMessage())  # type: ignore[method-assign]
    logging.getLogger("census_scvi").addHandler(handler)
    logging.getLogger("census_scvi").setLevel(logging.INFO)
    cfg = load_config(None, overrides=_overrides(census, epochs, workers))
    run = Path(tempfile.mkdtemp()) / "run"
    shutil.copytree(Path(prepared) / "prepare", run / "prepare")
    t0 = time.perf_counter()
    run_train(cfg, run_dir=run)
    wall = time.perf_counter() - t0
    fig = json.loads((run / "train/manifest.json").read_text())["figures"]
    capped = [m for m in records if "capped at" in m]
    shutil.rmtree(run.parent)
    return {"workers": workers, "wall_s": wall, "fit_s": fig["fit_seconds"], "capped": capped}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workers", type=int, nargs="+", default=[0, 4])
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--cells", type=int, default=1500)
    p.add_argument("--genes", type=int, default=400)
    p.add_argument("--child", nargs=4, metavar=("CENSUS", "PREPARED", "EPOCHS", "WORKERS"))
    a = p.parse_args()
    if a.child:
        census, prepared, epochs, workers = a.child
        print(json.dumps(child(census, prepared, int(epochs), int(workers))))
        return
    from census_scvi.config import load_config
    from census_scvi.demo import make_mini_census
    from census_scvi.prepare import run_prepare

    print("$", " ".join(["python", *sys.argv]))
    tmp = Path(tempfile.mkdtemp(prefix="bench-workers-"))
    census = str(make_mini_census(tmp / "census", n_cells=a.cells, n_genes=a.genes, seed=1).path)
    run_prepare(load_config(None, overrides=_overrides(census, 1, 0)), run_dir=tmp / "prepared")
    for w in a.workers:
        cmd = [sys.executable, __file__, "--child", census, str(tmp / "prepared"), str(a.epochs)]
        out = subprocess.run([*cmd, str(w)], capture_output=True, text=True, check=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        note = f"  ({r['capped'][0]})" if r["capped"] else ""
        print(
            f"num_workers={w}: {a.epochs} epochs, wall {r['wall_s']:.1f} s, "
            f"fit {r['fit_s']:.1f} s{note}"
        )
    shutil.rmtree(tmp)


if __name__ == "__main__":
    main()
