"""Train-stage throughput: scvi-tools directly vs our memory mode vs our stream mode.

For each (HVG count, n_hidden) case, these variants train on the same prepared mini census, each
in its own child process (so peak RSS is per run):

  (a) scvi-tools called directly on the prepared h5ad (the anchor);
  (b) ``run_train`` with ``train.mode: memory``, with the census-scvi loader (shuffled chunks,
      read-ahead thread: ``train.memory_loader: census-scvi``) and with scvi-tools' own
      ``AnnDataLoader`` (``train.memory_loader: scvi-tools``);
  (c) ``run_train`` with ``train.mode: stream`` (SOMA -> our reader -> our data module; the
      first epoch's reads kept in the run's local cache for the later ones, ``c-nocache``
      without it);

(b) and (c) each with and without ``train.fast_likelihood``. Cells/s counts training steps only
(data loading included, validation and the first epoch excluded: start-up, numba compilation).
Stream mode is also run on a quarter of the cells to show that its peak RSS does not grow with
the cell count. The FLOP-bound ceiling uses sgemm throughput measured in the same run and
~12 * n_genes * n_hidden FLOPs per cell and step (encoder and decoder GEMMs, forward +
backward); each variant's "% ceiling" is its cells/s over that. ``--loaders`` / ``--loaders-only``
time the training data loaders alone (no model): scvi-tools' AnnDataLoader, the census-scvi
memory loader and the stream loader. ``--profile`` prints where a training step's time goes.

    python benchmarks/bench_train.py --cells 50000 --genes 4000 --hvg 2000 --hidden 128 512
    # a smoke run of every variant and loader at a tiny shape:
    python benchmarks/bench_train.py --cells 3000 --genes 1000 --hvg 500 --hidden 128 --loaders
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
        f"model.n_layers={a.get('layers', 1)}",
        f"model.n_latent={a.get('latent', 10)}",
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

        if a.get("lean"):  # the settings our train stage runs with: a steadier baseline
            from census_scvi._allocators import fix_mmap_threshold, use_lean_allocators

            use_lean_allocators()
            fix_mmap_threshold()
        adata = anndata.read_h5ad(run / "prepare/anndata_model.h5ad")
        scvi.settings.seed = 0
        scvi.model.SCVI.setup_anndata(adata, batch_key="batch")
        model = scvi.model.SCVI(
            adata,
            n_hidden=a["hidden"],
            n_layers=a.get("layers", 1),
            n_latent=a.get("latent", 10),
            gene_likelihood="nb",
        )
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

        cfg = load_config(
            None,
            overrides=[
                *_overrides(a),
                f"train.mode={a['variant']}",
                f"train.memory_loader={a.get('loader', 'census-scvi')}",
                f"train.fast_likelihood={str(a.get('fast', True)).lower()}",
                f"train.stream_cache={str(a.get('cache', True)).lower()}",
            ],
        )
        run_train(cfg, run_dir=run, force=True, callbacks=[tm])
    cells = sum(c for c, _ in tm.epochs[1:])
    cpu = sum(tm.cpu[1:])
    return {
        "cells_per_s": tm.cells_per_second(),
        "cells_per_cpu_s": cells / cpu * a["threads"] if cpu else None,
        "epochs": [(c, round(s, 2)) for c, s in tm.epochs],
        "wall_s": round(time.perf_counter() - t0, 1),
        "peak_rss_gib": round(_peak_rss_gib(), 2),
        **_cpu_split(),
    }


def _cpu_split() -> dict:
    """User and system CPU seconds of the whole child (system time: page faults, compaction)."""
    import resource

    use = resource.getrusage(resource.RUSAGE_SELF)
    return {"user_s": round(use.ru_utime, 1), "sys_s": round(use.ru_stime, 1)}


def loaders_only(a: dict) -> dict:
    """One pass of the training data loader alone (no model): the data side of a step."""
    run = Path(a["run"])
    if a["variant"] == "load-memory-scvi-tools":
        import anndata
        import scvi

        if a.get("lean"):  # the settings our train stage runs with: a steadier baseline
            from census_scvi._allocators import fix_mmap_threshold, use_lean_allocators

            use_lean_allocators()
            fix_mmap_threshold()
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
        from census_scvi.train._inputs import read_inputs
        from census_scvi.train._model import build_model

        mode = "memory" if a["variant"] == "load-memory" else "stream"
        cfg = load_config(
            None,
            overrides=[*_overrides(a), f"train.mode={mode}", "train.memory_loader=census-scvi"],
        )
        _, dm, _ = build_model(cfg, read_inputs(cfg, run / "prepare"))
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
    model = scvi.model.SCVI(
        adata,
        n_hidden=a["hidden"],
        n_layers=a.get("layers", 1),
        n_latent=a.get("latent", 10),
        gene_likelihood="nb",
    )
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


# key -> (label, child settings); c-quarter is stream mode on a quarter of the cells (its RSS);
# stream mode's local cache (train.stream_cache, on by default) serves every epoch after the
# first, which reads SOMA: c-nocache reads SOMA every epoch
VARIANTS: dict[str, tuple[str, dict]] = {
    "a": ("(a) scvi-tools direct", {"variant": "scvi"}),
    "a-lean": (
        "(a) scvi-tools direct, our allocator settings",
        {"variant": "scvi", "lean": True},
    ),
    "b": ("(b) memory", {"variant": "memory", "loader": "census-scvi", "fast": True}),
    "b-nofast": (
        "(b) memory, no fast likelihood",
        {"variant": "memory", "loader": "census-scvi", "fast": False},
    ),
    "b-scvi": (
        "(b) memory, scvi-tools loader",
        {"variant": "memory", "loader": "scvi-tools", "fast": True},
    ),
    "b-scvi-nofast": (
        "(b) memory, scvi-tools loader, no fast lik.",
        {"variant": "memory", "loader": "scvi-tools", "fast": False},
    ),
    "c": ("(c) stream", {"variant": "stream", "fast": True}),
    "c-nocache": (
        "(c) stream, no local cache",
        {"variant": "stream", "fast": True, "cache": False},
    ),
    "c-nofast": ("(c) stream, no fast likelihood", {"variant": "stream", "fast": False}),
    "c-quarter": ("(c) stream, N/4 cells", {"variant": "stream", "fast": True, "quarter": True}),
}
LOADERS = {
    "memory, scvi-tools AnnDataLoader": "load-memory-scvi-tools",
    "memory, census-scvi loader": "load-memory",
    "stream": "load-stream",
}
ANCHOR = VARIANTS["a"][0]


def _quarter_run(run: Path, work: Path, hvg: int) -> Path:
    """A run dir whose cells.parquet lists a quarter of the cells (stream mode reads SOMA)."""
    import pandas as pd

    quarter = work / f"run-hvg{hvg}-quarter"
    shutil.rmtree(quarter, ignore_errors=True)
    (quarter / "prepare").mkdir(parents=True)
    shutil.copy(run / "prepare/hvg.parquet", quarter / "prepare/hvg.parquet")
    cells = pd.read_parquet(run / "prepare/cells.parquet")
    cells.iloc[: len(cells) // 4].to_parquet(quarter / "prepare/cells.parquet", index=False)
    return quarter


def _loaders(case: dict) -> None:
    for label, v in LOADERS.items():
        r = run_child({**case, "variant": v})
        print(
            f"  loader only, {label:33s}: {r['cells_per_s']:8.0f} cells/s, "
            f"CPU-normalized {r['cells_per_cpu_s']:8.0f}, RSS {r['peak_rss_gib']} GiB"
        )


def _print_case(n_cells: int, hvg: int, hidden: int, batch: int, res: dict, ceiling: float):
    anchor = res.get(ANCHOR)
    print(f"\n{n_cells:,} cells x {hvg} HVGs, n_hidden {hidden}, batch {batch}:")
    for v, r in res.items():
        ratio = r["cells_per_s"] / anchor["cells_per_s"] if anchor else float("nan")
        cpu_ratio = (
            r["cells_per_cpu_s"] / anchor["cells_per_cpu_s"]
            if anchor and r["cells_per_cpu_s"] and anchor["cells_per_cpu_s"]
            else float("nan")
        )
        print(
            f"  {v:42s} {r['cells_per_s']:8.0f} cells/s ({ratio:4.2f}x, "
            f"{r['cells_per_s'] / ceiling:4.0%} of ceiling)  "
            f"CPU-normalized {r['cells_per_cpu_s'] or 0:8.0f} ({cpu_ratio:4.2f}x)  "
            f"peak RSS {r['peak_rss_gib']:.2f} GiB  wall {r['wall_s']} s"
        )
    print(f"  {'ceiling (sgemm-bound)':42s} {ceiling:8.0f} cells/s")


def _print_table(rows: list, gflops: float) -> None:
    print(
        f"\n| cells | HVGs | n_hidden | variant | cells/s | vs (a) | % of ceiling "
        f"(sgemm {gflops:.0f} GFLOP/s) | peak RSS | CPU-normalized |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for hvg, hidden, n, res, ceiling in rows:
        anchor = res.get(ANCHOR)
        for v, r in res.items():
            ratio = f"{r['cells_per_s'] / anchor['cells_per_s']:.2f}x" if anchor else "-"
            cells = n // 4 if v == VARIANTS["c-quarter"][0] else n
            print(
                f"| {cells:,} | {hvg} | {hidden} | {v} | {r['cells_per_s']:,.0f} | {ratio} "
                f"| {r['cells_per_s'] / ceiling:.1%} of {ceiling:,.0f} | "
                f"{r['peak_rss_gib']:.2f} GiB | {r['cells_per_cpu_s'] or 0:,.0f} |"
            )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--cells", type=int, default=50_000)
    p.add_argument("--genes", type=int, default=4_000)
    p.add_argument("--hvg", type=int, nargs="+", default=[2000])
    p.add_argument("--hidden", type=int, nargs="+", default=[128, 512])
    p.add_argument("--layers", type=int, default=1, help="model.n_layers (the issue's shape: 2)")
    p.add_argument("--latent", type=int, default=10, help="model.n_latent (the issue's shape: 50)")
    p.add_argument("--epochs", type=int, default=2, help="the first is not timed")
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--io-batch", type=int, default=16_384, help="I/O batch (cells), both modes")
    p.add_argument("--chunk", type=int, default=256, help="shuffle chunk (cells), both modes")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=1, help="runs per variant; the best is kept")
    p.add_argument(
        "--variants",
        nargs="+",
        choices=list(VARIANTS),
        default=list(VARIANTS),
        help="training variants to run (default all): "
        + ", ".join(f"{k} = {label}" for k, (label, _) in VARIANTS.items()),
    )
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
            "layers": args.layers,
            "latent": args.latent,
        }
        run = work / f"run-hvg{hvg}"
        prepare(str(census), run, {**base, "hidden": 128})
        import pandas as pd

        n_cells = len(pd.read_parquet(run / "prepare/cells.parquet"))
        if args.loaders:  # the loaders do not depend on n_hidden
            print(f"\n{n_cells:,} cells x {hvg} HVGs, batch {args.batch_size}, loaders alone:")
            _loaders({**base, "hidden": args.hidden[0], "run": str(run)})
        if args.loaders_only:
            continue
        quarter = _quarter_run(run, work, hvg) if "c-quarter" in args.variants else run
        for hidden in args.hidden:
            case = {**base, "hidden": hidden, "run": str(run)}
            if args.profile:
                print(f"\nprofile, {hvg} HVGs, n_hidden {hidden}:\n{profile(case)}")
            res: dict[str, dict] = {}
            for _ in range(args.reps):  # interleaved; the best run of each variant is kept
                for key in args.variants:
                    label, spec = VARIANTS[key][0], dict(VARIANTS[key][1])
                    where = quarter if spec.pop("quarter", False) else run
                    r = run_child({**case, **spec, "run": str(where)})
                    print(
                        f"  run: {label:42s} {r['cells_per_s']:8.0f} cells/s, "
                        f"user {r.get('user_s')} s, sys {r.get('sys_s')} s",
                        flush=True,
                    )
                    if label not in res or r["cells_per_s"] > res[label]["cells_per_s"]:
                        res[label] = r
            ceiling = gflops * 1e9 / (12 * hvg * hidden)
            rows.append((hvg, hidden, n_cells, res, ceiling))
            _print_case(n_cells, hvg, hidden, args.batch_size, res, ceiling)
    if rows:
        _print_table(rows, gflops)


if __name__ == "__main__":
    main()
