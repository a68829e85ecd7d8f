"""Peak RSS of stream-mode training per phase (each training epoch, each validation pass).

Samples the process RSS every 20 ms during ``run_train`` (``train.mode: stream``) and prints the
largest value seen in each phase, so growth from epoch to epoch (something kept between passes)
shows apart from the one-pass peak. Needs a run dir whose prepare/ stage is done (e.g. the
``run-hvg8000-quarter`` dir bench_train.py makes). Set ``MALLOC_ARENA_MAX=1`` in the environment to
compare with glibc limited to one malloc arena.

    python benchmarks/bench_train_rss.py --census /tmp/bench/c200k \
        --run /tmp/cbt8/run-hvg8000-quarter --hvg 8000 --epochs 2
"""

from __future__ import annotations

import argparse
import resource
import threading
import time
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--census", required=True)
    p.add_argument("--run", required=True, help="run dir with a finished prepare/")
    p.add_argument("--hvg", type=int, default=8000)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="another config override (repeatable), e.g. train.stream_cache=false",
    )
    args = p.parse_args()

    import psutil
    import torch
    from lightning.pytorch import Callback

    from census_scvi.config import load_config
    from census_scvi.train import run_train

    torch.set_num_threads(args.threads)
    proc = psutil.Process()
    phase = ["start-up"]
    peaks: dict[str, float] = {}
    epoch_s: list[float] = []

    def sample() -> None:
        while True:
            rss = proc.memory_info().rss / 2**30
            peaks[phase[0]] = max(peaks.get(phase[0], 0.0), rss)
            time.sleep(0.02)

    class Phases(Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            phase[0] = f"train epoch {trainer.current_epoch}"
            epoch_s.append(-time.perf_counter())

        def on_validation_epoch_start(self, trainer, pl_module):
            if epoch_s and epoch_s[-1] < 0:
                epoch_s[-1] += time.perf_counter()
            phase[0] = f"validation {trainer.current_epoch}"

        def on_fit_end(self, trainer, pl_module):
            phase[0] = "end"

    threading.Thread(target=sample, daemon=True).start()
    cfg = load_config(
        None,
        overrides=[
            f"census.uri={args.census}",
            f"hvg.top_n_hvg={args.hvg}",
            f"model.n_hidden={args.hidden}",
            f"train.max_epochs={args.epochs}",
            "train.mode=stream",
            "train.batch_size=1024",
            "train.accelerator=cpu",
            *args.set,
        ],
    )
    run_train(cfg, run_dir=Path(args.run), force=True, callbacks=[Phases()])
    time.sleep(0.1)
    for name, gib in peaks.items():
        print(f"{name:16s} peak RSS {gib:5.2f} GiB")
    print("training epochs (s):", " ".join(f"{s:.1f}" for s in epoch_s if s > 0))
    print(f"process peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")


if __name__ == "__main__":
    main()
