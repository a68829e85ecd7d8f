"""RSS of a stream training at its start and after 20 batches: the memory it holds per cell.

Copies ``RUN_DIR/prepare`` of a finished scale run (``bench_scale.py``) into ``WORK``, trains
with the run's config and stops after 20 batches, printing the process RSS at ``on_fit_start``,
``on_train_start`` and batches 1 and 20. Run it on two sizes: the difference at
``on_train_start`` divided by the difference in cells is the per-cell state (joinids, batch
codes, splits); later figures add the I/O batches in flight.

    python benchmarks/probe_train_setup_rss.py /tmp/scale/run-250000 /tmp/probe-250000
    python benchmarks/probe_train_setup_rss.py /tmp/scale/run-1000000 /tmp/probe-1000000
"""

from __future__ import annotations

import resource
import shutil
import sys
from pathlib import Path

from lightning.pytorch.callbacks import Callback


def _rss() -> float:
    text = Path("/proc/self/status").read_text()
    return int(text.split("VmRSS:")[1].split()[0]) / 2**20


def _peak() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


class Probe(Callback):
    def on_fit_start(self, trainer, pl_module):
        print(f"fit start rss {_rss():.3f} GiB", flush=True)

    def on_train_start(self, trainer, pl_module):
        print(f"train start rss {_rss():.3f} GiB", flush=True)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx in (1, 20):
            print(f"batch {batch_idx} rss {_rss():.3f} GiB peak {_peak():.3f}", flush=True)
        if batch_idx == 20:
            raise KeyboardInterrupt


def main() -> None:
    from census_scvi.config import load_config
    from census_scvi.train import run_train

    src, run = Path(sys.argv[1]), Path(sys.argv[2])
    shutil.rmtree(run, ignore_errors=True)
    run.mkdir(parents=True)
    shutil.copytree(src / "prepare", run / "prepare")
    cfg = load_config(src / "config.yaml")
    try:
        run_train(cfg, run_dir=run, callbacks=[Probe()], force=True)
    except (KeyboardInterrupt, SystemExit) as e:
        print("stopped after 20 batches", type(e).__name__)
    print(f"end peak {_peak():.3f} GiB")


if __name__ == "__main__":
    main()
