"""A mini census writer process: ``python -m census_scvi.demo._worker TASKS.json DIR``.

Runs its :class:`~census_scvi.demo._write.Task` list (JSON) in order, prints ``cells N`` for each
block written and saves each task's counts as ``DIR/result-<index>.npz`` (plain arrays: read back
with ``allow_pickle=False``) under a temporary name renamed when complete. Started by
:mod:`census_scvi.demo._parallel`.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

from census_scvi.demo._parallel import COUNT_ARRAYS
from census_scvi.demo._write import Task, TaskResult, run_task


def _save_result(result: TaskResult, path: Path) -> None:
    c = result.counts
    np.savez(
        path,
        **{name: getattr(c, name) for name in COUNT_ARRAYS},
        scalars=np.array([c.n_primary, c.n_low_nnz, result.peak_rss_bytes], dtype=np.int64),
        seconds=np.array([result.seconds]),
        model_cells=np.concatenate(c.model_cells) if c.model_cells else np.zeros(0, np.int64),
    )


def main(argv: list[str]) -> None:
    """Run the tasks of ``argv[0]`` (a JSON list), saving ``argv[1]/result-<index>.npz`` each."""
    from census_scvi._allocators import use_lean_allocators

    use_lean_allocators()  # a fresh interpreter: numpy's defaults until set here
    spec, out_dir = Path(argv[0]), Path(argv[1])
    for item in json.loads(spec.read_text()):
        index = item.pop("index")
        gen: Any = run_task(Task(**item))
        while True:
            try:
                print(f"cells {next(gen)}", flush=True)
            except StopIteration as stop:
                result: TaskResult = stop.value
                break
        out = out_dir / f"result-{index}.npz"
        tmp = out_dir / f".{out.name}.tmp-{os.getpid()}.npz"
        _save_result(result, tmp)
        tmp.replace(out)


if __name__ == "__main__":
    main(sys.argv[1:])
