"""Where a step of census-scvi's own training loop goes: phase timings, or a torch profile.

Runs ``run_train`` on an existing run directory's prepare output (one epoch) with a callback
that times each step's phases: between steps (the loader and Lightning), forward and loss,
backward, and the optimizer. ``--profile`` instead profiles steps 10-19 of the epoch with
torch.profiler and prints the top ops by self CPU time.

    python benchmarks/bench_train_loop.py RUN --census CENSUS --hvg 8000 --hidden 512
    python benchmarks/bench_train_loop.py RUN --census CENSUS --hvg 2000 --hidden 512 --profile

RUN is retrained (``--force``): use a copy of a run directory holding ``prepare/``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from lightning.pytorch.callbacks import Callback

PHASES = ("between steps", "forward + loss", "backward", "optimizer + rest")


class Phases(Callback):
    """Per step: (gap before it, forward, backward, optimizer) in seconds."""

    def __init__(self) -> None:
        self.rows: list[tuple[float, ...]] = []
        self._end: float | None = None
        self._t: dict[str, float] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        now = time.perf_counter()
        self._t = {"gap": now - self._end if self._end else np.nan, "start": now}

    def on_before_backward(self, trainer, pl_module, loss):
        self._t["fwd"] = time.perf_counter()

    def on_after_backward(self, trainer, pl_module):
        self._t["bwd"] = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        now, t = time.perf_counter(), self._t
        if "bwd" in t:
            self.rows.append((t["gap"], t["fwd"] - t["start"], t["bwd"] - t["fwd"], now - t["bwd"]))
        self._end = now

    def on_train_epoch_end(self, trainer, pl_module):
        self._end = None


class Profile(Callback):
    """torch.profiler over steps ``first`` to ``first + steps - 1``, then stop training."""

    def __init__(self, first: int = 10, steps: int = 10, rows: int = 30) -> None:
        self.first, self.steps, self.n_rows, self.prof = first, steps, rows, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        from torch.profiler import ProfilerActivity, profile

        if batch_idx == self.first:
            self.prof = profile(activities=[ProfilerActivity.CPU])
            self.prof.__enter__()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.prof is not None and batch_idx == self.first + self.steps - 1:
            self.prof.__exit__(None, None, None)
            table = self.prof.key_averages().table(
                sort_by="self_cpu_time_total", row_limit=self.n_rows
            )
            print(f"{self.steps} steps:\n{table}")
            self.prof = None
            trainer.should_stop = True


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", type=Path)
    p.add_argument("--census", required=True)
    p.add_argument("--hvg", type=int, default=8000)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--mode", default="memory", choices=["memory", "stream"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--profile", action="store_true")
    args = p.parse_args()

    import torch

    from census_scvi.config import load_config
    from census_scvi.train import run_train

    torch.set_num_threads(args.threads)
    cfg = load_config(
        None,
        overrides=[
            f"census.uri={args.census}", f"hvg.top_n_hvg={args.hvg}",
            f"model.n_hidden={args.hidden}", "model.n_layers=2", "model.n_latent=50",
            "train.max_epochs=1", "train.batch_size=1024", "train.accelerator=cpu",
            f"train.mode={args.mode}",
            "training_plan.n_epochs_kl_warmup=10",
        ],
    )  # fmt: skip
    callback: Callback = Profile() if args.profile else Phases()
    run_train(cfg, run_dir=args.run, force=True, callbacks=[callback])
    if isinstance(callback, Phases):
        rows = np.array(callback.rows[5:])  # the first steps: numba compilation, warm-up
        medians = ", ".join(
            f"{name} {np.nanmedian(rows[:, k]) * 1e3:.1f}" for k, name in enumerate(PHASES)
        )
        total = np.nansum(rows, axis=1).mean() * 1e3
        print(f"{len(rows)} steps, median ms: {medians}; mean step {total:.1f} ms")


if __name__ == "__main__":
    main()
