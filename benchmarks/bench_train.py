"""Train-stage throughput: scvi-tools directly vs our memory mode vs our stream mode.

For each (HVG count, n_hidden) case, three variants train on the same prepared mini census, each
in its own child process (so peak RSS is per run):

  (a) scvi-tools called directly on the prepared h5ad (the anchor);
  (b) ``run_train`` with ``train.mode: memory``;
  (c) ``run_train`` with ``train.mode: stream`` (SOMA -> tiledbsoma-ml -> our data module).

Cells/s counts training steps only (data loading included, validation and the first epoch
excluded: start-up, numba compilation). Stream mode is also run on a quarter of the cells to show
that its peak RSS does not grow with the cell count. The FLOP-bound ceiling uses sgemm throughput
measured in the same run and ~12 * n_genes * n_hidden FLOPs per cell and step (encoder and
decoder GEMMs, forward + backward). ``--profile`` prints where a training step's time goes.

    python benchmarks/bench_train.py --cells 50000 --genes 4000 --hvg 2000 --hidden 128 512
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path


def _peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def _overrides(a: dict) -> list[str]:
    return [
        f"census.uri={a['census']}",
        f"hvg.top_n_hvg={a['hvg']}",
        f"model.n_hidden={a['hidden']}",
        f"train.max_epochs={a['epochs']}",
        f"train.batch_size={a['batch_size']}",
        "train.accelerator=cpu",
        f"train.stream_io_batch_size={a['io_batch']}",
        f"train.stream_shuffle_chunk_size={a['chunk']}",
        "training_plan.n_epochs_kl_warmup=10",
    ]


# ------------------------------------------------------------------------------------------
# child: one measured run
# ------------------------------------------------------------------------------------------
def child(a: dict) -> dict:
    import torch

    torch.set_num_threads(a["threads"])
    from census_scvi.config import load_config
    from census_scvi.train._callbacks import ThroughputMonitor

    class Clock(ThroughputMonitor):
        """Also the process CPU time of each timed span (all threads; stabler under load)."""

        def __init__(self) -> None:
            super().__init__()
            self.cpu: list[float] = []

        def on_train_epoch_start(self, trainer, pl_module):
            super().on_train_epoch_start(trainer, pl_module)
            self._c0 = time.process_time()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
            self._c_last = time.process_time()

        def on_train_epoch_end(self, trainer, pl_module):
            self.cpu.append(self._c_last - self._c0)
            super().on_train_epoch_end(trainer, pl_module)

    if a["variant"].startswith("load-"):
        return loaders_only(a)
    run = Path(a["run"])
    tm = Clock()
    t0 = time.perf_counter()
    if a["variant"] == "scvi":
        import anndata
        import scvi

        adata = anndata.read_h5ad(run / "prepare/anndata_model.h5ad")
        scvi.settings.seed = 0
        scvi.model.SCVI.setup_anndata(adata, batch_key="batch")
        model = scvi.model.SCVI(adata, n_hidden=a["hidden"], n_latent=10, gene_likelihood="nb")
        model.train(
            max_epochs=a["epochs"],
            accelerator="cpu",
            devices=1,
            batch_size=a["batch_size"],
            train_size=0.9,
            check_val_every_n_epoch=1,
            plan_kwargs={"n_epochs_kl_warmup": 10},
            callbacks=[tm],
        )
    else:
        from census_scvi.train import run_train

        mode = "memory" if a["variant"] == "memory" else "stream"
        cfg = load_config(None, overrides=[*_overrides(a), f"train.mode={mode}"])
        run_train(cfg, run_dir=run, force=True, callbacks=[tm])
    cells = sum(c for c, _ in tm.epochs[1:])
    cpu = sum(tm.cpu[1:])
    return {
        "cells_per_s": tm.cells_per_second(),
        "cells_per_cpu_s": cells / cpu * a["threads"] if cpu else None,
        "epochs": [(c, round(s, 2)) for c, s in tm.epochs],
        "wall_s": round(time.perf_counter() - t0, 1),
        "peak_rss_gib": round(_peak_rss_gib(), 2),
    }


def loaders_only(a: dict) -> dict:
    """One pass of the training data loader alone (no model): the data side of a step."""
    run = Path(a["run"])
    if a["variant"] == "load-memory":
        import anndata
        import scvi

        adata = anndata.read_h5ad(run / "prepare/anndata_model.h5ad")
        scvi.model.SCVI.setup_anndata(adata, batch_key="batch")
        model = scvi.model.SCVI(adata)
        splitter = scvi.dataloaders.DataSplitter(
            model.adata_manager, train_size=0.9, batch_size=a["batch_size"]
        )
        splitter.setup()
        loader = splitter.train_dataloader()
    else:
        from census_scvi.config import load_config
        from census_scvi.train._inputs import stream_inputs
        from census_scvi.train._model import build_model

        cfg = load_config(None, overrides=[*_overrides(a), "train.mode=stream"])
        _, dm, _ = build_model(cfg, stream_inputs(cfg, run / "prepare"))
        dm.setup()
        loader = dm.train_dataloader()
    for _ in zip(range(2), loader, strict=False):  # warm-up (numba compilation)
        pass
    t, c0, cells = time.perf_counter(), time.process_time(), 0
    for batch in loader:
        cells += int(batch["X"].shape[0])
    wall, cpu = time.perf_counter() - t, time.process_time() - c0
    return {
        "cells_per_s": cells / wall,
        "cells_per_cpu_s": cells / cpu * a["threads"],
        "epochs": [],
        "wall_s": round(wall, 1),
        "peak_rss_gib": round(_peak_rss_gib(), 2),
    }


def sgemm_gflops(threads: int, n: int = 2048, reps: int = 10) -> float:
    import torch

    torch.set_num_threads(threads)
    a = torch.randn(n, n)
    b = torch.randn(n, n)
    torch.mm(a, b)
    t = time.perf_counter()
    for _ in range(reps):
        torch.mm(a, b)
    return 2 * n**3 * reps / (time.perf_counter() - t) / 1e9


def profile(a: dict, steps: int = 15) -> str:
    """Top ops of scVI training steps (forward, backward, Adam) on the prepared data."""
    import anndata
    import scvi
    import torch
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as tprofile

    torch.set_num_threads(a["threads"])
    adata = anndata.read_h5ad(Path(a["run"]) / "prepare/anndata_model.h5ad")
    scvi.model.SCVI.setup_anndata(adata, batch_key="batch")
    model = scvi.model.SCVI(adata, n_hidden=a["hidden"], n_latent=10, gene_likelihood="nb")
    dl = model._make_data_loader(adata, batch_size=a["batch_size"], shuffle=True)
    opt = torch.optim.Adam(model.module.parameters(), lr=1e-3, eps=0.01)
    model.module.train()
    batches: list = []
    while len(batches) < steps + 3:
        batches += [b for _, b in zip(range(steps + 3 - len(batches)), dl, strict=False)]

    def step(batch):
        _, _, loss = model.module(batch, loss_kwargs={"kl_weight": 1.0})
        opt.zero_grad()
        loss.loss.backward()
        opt.step()

    for b in batches[:3]:
        step(b)
    with tprofile(activities=[ProfilerActivity.CPU]) as prof:
        for b in batches[3:]:
            step(b)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15)


# ------------------------------------------------------------------------------------------
# parent
# ------------------------------------------------------------------------------------------
def run_child(a: dict) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(a["threads"]), PYTHONUNBUFFERED="1")
    proc = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(a)],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not lines:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"child failed: {a['variant']}")
    return json.loads(lines[-1][7:])


def prepare(census: str, run: Path, a: dict) -> None:
    from census_scvi.config import load_config
    from census_scvi.prepare import run_prepare

    cfg = load_config(None, overrides=[*_overrides({**a, "census": census}), "train.mode=memory"])
    run_prepare(cfg, run_dir=run)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--cells", type=int, default=50_000)
    p.add_argument("--genes", type=int, default=4_000)
    p.add_argument("--hvg", type=int, nargs="+", default=[2000])
    p.add_argument("--hidden", type=int, nargs="+", default=[128, 512])
    p.add_argument("--epochs", type=int, default=2, help="the first is not timed")
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--io-batch", type=int, default=16_384, help="stream I/O batch (cells)")
    p.add_argument("--chunk", type=int, default=256, help="stream shuffle chunk (cells)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=1, help="runs per variant; the best is kept")
    p.add_argument("--workdir", default="/tmp/census-scvi-bench-train")
    p.add_argument("--census", help="an existing (mini) census to use instead of generating one")
    p.add_argument("--profile", action="store_true", help="print a step profile per case")
    p.add_argument("--loaders", action="store_true", help="also time the data loaders alone")
    p.add_argument("--loaders-only", action="store_true", help="only time the data loaders")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    args.loaders = args.loaders or args.loaders_only
    if args.child:
        print("RESULT " + json.dumps(child(json.loads(args.child))), flush=True)
        return

    from census_scvi.demo import make_mini_census

    work = Path(args.workdir)
    census = Path(args.census) if args.census else work / f"census-{args.cells}x{args.genes}"
    t = time.perf_counter()
    if not census.exists():  # reused between runs of the benchmark
        make_mini_census(census, n_cells=args.cells, n_genes=args.genes, seed=0)
    print(
        f"mini census {census} ({args.cells:,} x {args.genes:,} if generated): "
        f"{time.perf_counter() - t:.0f} s"
    )
    gflops = sgemm_gflops(args.threads)
    print(f"sgemm 2048^3, {args.threads} threads: {gflops:.1f} GFLOP/s")
    rows = []
    for hvg in args.hvg:
        base = {
            "census": str(census),
            "hvg": hvg,
            "epochs": args.epochs,
            "batch_size": args.batch_size,
            "io_batch": args.io_batch,
            "chunk": args.chunk,
            "threads": args.threads,
        }
        run = work / f"run-hvg{hvg}"
        prepare(str(census), run, {**base, "hidden": 128})
        # a quarter of the cells, for stream mode's RSS against cell count
        quarter = work / f"run-hvg{hvg}-quarter"
        shutil.rmtree(quarter, ignore_errors=True)
        (quarter / "prepare").mkdir(parents=True)
        import pandas as pd

        for f in ("hvg.parquet",):
            shutil.copy(run / "prepare" / f, quarter / "prepare" / f)
        cells = pd.read_parquet(run / "prepare/cells.parquet")
        cells.iloc[: len(cells) // 4].to_parquet(quarter / "prepare/cells.parquet", index=False)
        n_cells = len(cells)
        for hidden in args.hidden:
            case = {**base, "hidden": hidden, "run": str(run)}
            if args.profile:
                print(f"\nprofile, {hvg} HVGs, n_hidden {hidden}:\n{profile(case)}")
            res: dict[str, dict] = {}
            for _ in range(args.reps):  # interleaved; the best run of each variant is kept
                for v in ("scvi", "memory", "stream", "stream/4"):
                    r = run_child(
                        {
                            **case,
                            "variant": v.split("/")[0],
                            "run": str(quarter if "/" in v else run),
                        }
                    )
                    if v not in res or r["cells_per_s"] > res[v]["cells_per_s"]:
                        res[v] = r
            if args.loaders:
                for v in ("load-memory", "load-stream"):
                    r = run_child({**case, "variant": v})
                    print(
                        f"  loader only, {v[5:]:6s}: {r['cells_per_s']:8.0f} cells/s, "
                        f"CPU-normalized {r['cells_per_cpu_s']:8.0f}, RSS {r['peak_rss_gib']} GiB"
                    )
            if args.loaders_only:
                continue
            ceiling = gflops * 1e9 / (12 * hvg * hidden)
            anchor = res["scvi"]["cells_per_s"]
            rows.append((hvg, hidden, n_cells, res, ceiling))
            print(f"\n{n_cells:,} cells x {hvg} HVGs, n_hidden {hidden}, batch {args.batch_size}:")
            for v, r in res.items():
                ratio = r["cells_per_s"] / anchor if anchor else float("nan")
                cpu_ratio = r["cells_per_cpu_s"] / res["scvi"]["cells_per_cpu_s"]
                print(
                    f"  {v:9s} {r['cells_per_s']:8.0f} cells/s ({ratio:4.2f}x)  "
                    f"CPU-normalized {r['cells_per_cpu_s']:8.0f} ({cpu_ratio:4.2f}x)  "
                    f"peak RSS {r['peak_rss_gib']:.2f} GiB  wall {r['wall_s']} s"
                )
            print(
                f"  ceiling   {ceiling:8.0f} cells/s (sgemm-bound); anchor at {anchor / ceiling:.0%}"
            )
    print(
        "\n| cells | HVGs | n_hidden | scvi direct | memory | stream | stream RSS N/4 -> N | ceiling | CPU-normalized a / b / c |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for hvg, hidden, n, res, ceiling in rows:
        a = res["scvi"]["cells_per_s"]
        print(
            f"| {n:,} | {hvg} | {hidden} | {a:,.0f} c/s, {res['scvi']['peak_rss_gib']:.2f} GiB "
            f"| {res['memory']['cells_per_s']:,.0f} ({res['memory']['cells_per_s'] / a:.2f}x), "
            f"{res['memory']['peak_rss_gib']:.2f} GiB "
            f"| {res['stream']['cells_per_s']:,.0f} ({res['stream']['cells_per_s'] / a:.2f}x), "
            f"{res['stream']['peak_rss_gib']:.2f} GiB "
            f"| {res['stream/4']['peak_rss_gib']:.2f} -> {res['stream']['peak_rss_gib']:.2f} GiB "
            f"| {ceiling:,.0f} c/s |"
            f" {res['scvi']['cells_per_cpu_s']:,.0f} / {res['memory']['cells_per_cpu_s']:,.0f}"
            f" / {res['stream']['cells_per_cpu_s']:,.0f} |"
        )


if __name__ == "__main__":
    main()
