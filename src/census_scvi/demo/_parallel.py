"""Running the writers' tasks: in this process, or as writer processes (``python -m``).

Each task writes its own contiguous range of cells as its own TileDB fragments; TileDB allows
concurrent fragment writes to one array, and the census's content does not depend on which
process writes which range (every block draws from its own seeded stream).

A writer process is ``python -m census_scvi.demo._worker TASKS.json DIR``: its tasks are JSON,
the counts come back as one ``.npz`` per task, read with ``allow_pickle=False``, and each block
written is one ``cells N`` line on its stdout, so one progress bar counts all of them. Not
``multiprocessing``: its ``spawn`` re-imports the caller's ``__main__`` (a script without a
``__main__`` guard starts workers forever) and its pools hang when a worker dies; ``fork`` would
copy the parent's TileDB threads.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import selectors
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import numpy as np

from census_scvi.demo._tables import OrganismCounts
from census_scvi.demo._write import Task, TaskResult, organism_design, run_task
from census_scvi.errors import CensusScviError
from census_scvi.progress import track

__all__ = ["COUNT_ARRAYS", "MAX_PROCESSES", "default_processes", "run_tasks"]

logger = logging.getLogger(__name__)

MAX_PROCESSES = 8
_CELLS_PER_PROCESS = 16_384  # below this many cells per writer, another process costs more
# than it saves (starting one: ~2 s to import numpy, pandas and tiledbsoma)
COUNT_ARRAYS = ("dataset_gene_nnz", "obs_per_dataset", "source_per_dataset", "per_type")
# glibc malloc serves arrays over 32 MiB with fresh mmaps, so every block's arrays fault in new
# zeroed pages: a writer spent 196 us of system time per cell (vs 294 us user) that way, 29 us
# with mmap off (the heap keeps and reuses the pages; RSS stays at the high-water mark, which is
# what a writer's does anyway). Ignored by other allocators.
_WRITER_ENV = {
    "PYTHONUNBUFFERED": "1",
    "MALLOC_MMAP_MAX_": "0",
    "MALLOC_TRIM_THRESHOLD_": str(1 << 40),
}


def default_processes(n_cells: int) -> int:
    """The CPU count, at most :data:`MAX_PROCESSES`, and one per 16,384 cells at least."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, min(cpus or 1, MAX_PROCESSES, n_cells // _CELLS_PER_PROCESS))


def run_tasks(tasks: list[Task], processes: int) -> list[TaskResult]:
    """Run ``tasks`` (results in task order) with a progress bar over their cells."""
    results: list[TaskResult] = []
    if processes == 1:
        events = _in_process(tasks, results)
    else:
        events = _processes(tasks, processes, results)
    total = sum(t.n_cells_here for t in tasks)
    for _ in track(events, description="generating", total=total, weight=int, unit="cells"):
        pass
    return results


def _in_process(tasks: list[Task], results: list[TaskResult]) -> Iterator[int]:
    for task in tasks:
        results.append((yield from run_task(task)))


# ------------------------------------------------------------------------------------------
# writer processes
# ------------------------------------------------------------------------------------------
@dataclasses.dataclass
class _Writer:
    proc: subprocess.Popen[str]
    tasks: list[int]
    """Indices of its tasks (run in this order); ``result-<index>.npz`` each."""
    err: IO[str]


def _processes(tasks: list[Task], processes: int, results: list[TaskResult]) -> Iterator[int]:
    """Cells written, as the writers report them; writer ``k`` runs tasks ``k, k + P, ...``."""
    with tempfile.TemporaryDirectory(prefix="census-scvi-writers-") as tmp_name:
        tmp = Path(tmp_name)
        groups = [list(range(k, len(tasks), processes)) for k in range(processes)]
        writers = [_start(k, g, tasks, tmp) for k, g in enumerate(groups) if g]
        sel = selectors.DefaultSelector()
        for w in writers:
            sel.register(w.proc.stdout, selectors.EVENT_READ, w)  # type: ignore[arg-type]
        try:
            while sel.get_map():
                for key, _ in sel.select(timeout=1.0):
                    w = key.data
                    line = w.proc.stdout.readline()
                    if line.startswith("cells "):
                        yield int(line.split()[1])
                    elif not line:  # the writer closed its stdout: it is done
                        sel.unregister(key.fileobj)
                        _check_exit(w, tasks)
        finally:
            sel.close()
            for w in writers:  # after a failure: stop the others
                if w.proc.poll() is None:
                    w.proc.kill()
                    w.proc.wait()
                w.err.close()
        results.extend(_load_result(tmp / f"result-{i}.npz", t) for i, t in enumerate(tasks))


def _start(k: int, group: list[int], tasks: list[Task], tmp: Path) -> _Writer:
    spec = tmp / f"writer-{k}.json"
    spec.write_text(json.dumps([{"index": i, **dataclasses.asdict(tasks[i])} for i in group]))
    err = (tmp / f"writer-{k}.err").open("w+")
    proc = subprocess.Popen(
        [sys.executable, "-m", "census_scvi.demo._worker", str(spec), str(tmp)],
        stdout=subprocess.PIPE,
        stderr=err,
        text=True,
        env={**os.environ, **_WRITER_ENV},
    )
    return _Writer(proc, group, err)


def _check_exit(w: _Writer, tasks: list[Task]) -> None:
    code = w.proc.wait()
    if code == 0:
        return
    w.err.seek(0)
    tail = w.err.read()[-2000:].strip()
    last = tail.splitlines()[-1] if tail else "no output"
    what = ", ".join(
        f"{tasks[i].organism} blocks {tasks[i].first}-{tasks[i].stop - 1}" for i in w.tasks
    )
    msg = f"mini census writer ({what}) failed (exit {code}): {last}"
    raise CensusScviError(msg, hint="rerun with --processes 1 to see the whole error")


def _load_result(path: Path, task: Task) -> TaskResult:
    d = organism_design(task.organism, task.n_cells, task.n_genes, task.seed, task.shape)
    counts = OrganismCounts.zeros(d)
    with np.load(path, allow_pickle=False) as z:
        for name in COUNT_ARRAYS:
            getattr(counts, name)[...] = z[name]
        counts.n_primary, counts.n_low_nnz, peak = (int(v) for v in z["scalars"])
        counts.model_cells = [z["model_cells"]]
        seconds = float(z["seconds"][0])
    return TaskResult(counts, seconds, peak)
