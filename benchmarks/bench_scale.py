"""Scale benchmark: the whole pipeline at several census sizes, each stage in its own process.

For each size N it builds (or reuses) a mini census of N human cells, then runs
``prepare`` (stream mode: no h5ad), ``train`` (1 epoch, stream), ``embed``, ``index`` (the
nearest-cell index over every embedded cell, so that ``map`` searches it), ``evaluate`` (a
sample) and ``map`` (a query of ``--query-cells`` cells cut from the census) as separate
``census-scvi`` processes under ``/usr/bin/time``, recording wall time, CPU time (user + sys),
peak RSS and the bytes the stage left in its folder. It prints, per stage, seconds per million
cells and the RSS slope in bytes per cell between consecutive sizes, writes the figures as JSON
and draws cost and peak RSS against cells (log-log) as a PNG.

Usage::

    .venv/bin/python benchmarks/bench_scale.py --sizes 250000 1000000 2000000 \\
        --genes 20000 --root /tmp/scale --png docs/scale.png --json docs/scale.json

Censuses are large: keep ``--root`` on a disk with room (never inside the repository).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

STAGES = ("prepare", "train", "embed", "index", "evaluate", "map")
BIN = Path(sys.executable).with_name("census-scvi")


def _timed(cmd: list[str], log: Path) -> dict:
    """Run ``cmd`` under /usr/bin/time; wall, user+sys CPU seconds and peak RSS (bytes)."""
    fmt = "__TIME__ %e %U %S %M"
    t0 = time.perf_counter()
    with log.open("w") as f:
        proc = subprocess.run(
            ["/usr/bin/time", "-f", fmt, *cmd], stdout=f, stderr=subprocess.STDOUT, check=False
        )
    wall = time.perf_counter() - t0
    line = [x for x in log.read_text().splitlines() if x.startswith("__TIME__")]
    if proc.returncode != 0 or not line:
        tail = "\n".join(log.read_text().splitlines()[-15:])
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{tail}")
    _, e, u, s, m = line[-1].split()
    return {"wall_s": float(e) or wall, "cpu_s": float(u) + float(s), "peak_rss": int(m) * 1024}


def _du(path: Path) -> int:
    if not path.exists():
        return 0
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _census(root: Path, n: int, genes: int, extra: list[str]) -> tuple[Path, dict]:
    path = root / f"census-{n}"
    if (path / "census_info").exists():
        return path, {"reused": True}
    cmd = [str(BIN), "-q", "demo-data", str(path), "--cells", str(n), "--genes", str(genes), *extra]
    fig = _timed(cmd, root / f"demo-{n}.log")
    fig["disk_bytes"] = _du(path)
    return path, fig


def _query(census: Path, out: Path, n_query: int) -> None:
    """A query h5ad: the first ``n_query`` cells of the census (raw counts, Ensembl ids)."""
    if out.exists():
        return
    code = f"""
import cellxgene_census
with cellxgene_census.open_soma(uri={str(census)!r}) as c:
    a = cellxgene_census.get_anndata(c, "Homo sapiens", obs_value_filter="soma_joinid < {n_query}")
a.var_names = a.var["feature_id"].astype(str).to_numpy()
a.write_h5ad({str(out)!r})
"""
    subprocess.run([sys.executable, "-c", code], check=True)


def _stage_cmd(stage: str, census: Path, run_dir: Path, query: Path, sets: list[str]) -> list[str]:
    common = ["--set", f"census.uri={census}", "--set", "census.demo=null", *sets]
    if stage == "map":
        return [str(BIN), "-q", "map", str(query), "--run", str(run_dir),
                "-o", str(run_dir / "mapped.h5ad"), "--force"]  # fmt: skip
    return [str(BIN), "-q", stage, "-o", str(run_dir), "--force", *common]


def run_size(args: argparse.Namespace, n: int) -> dict:
    root = Path(args.root)
    root.mkdir(parents=True, exist_ok=True)
    census, demo = _census(root, n, args.genes, args.demo_args)
    run_dir = root / f"run-{n}"
    stages = [s for s in STAGES if s in args.stages]
    if run_dir.exists() and "prepare" in stages:
        shutil.rmtree(run_dir)
    query = root / f"query-{n}.h5ad"
    if "map" in stages:
        _query(census, query, args.query_cells)
    sets = [
        "--set", "train.mode=stream", "--set", "train.max_epochs=1",
        "--set", f"hvg.top_n_hvg={args.hvg}", "--set", f"evaluate.sample_size={args.sample}",
        *[x for kv in args.sets for x in ("--set", kv)],
    ]  # fmt: skip
    out: dict = {"cells": n, "demo-data": demo}
    for stage in stages:
        if stage == "train" and args.model_from:
            # embed, evaluate and map need a model over the census's genes, not one trained on
            # these very cells: a smaller size's model saves the largest stage's hour
            shutil.rmtree(run_dir / "train", ignore_errors=True)  # e.g. a stopped training's
            shutil.copytree(Path(args.model_from) / "train", run_dir / "train")
            out["train"] = {"reused": str(args.model_from)}
            continue
        cmd = _stage_cmd(stage, census, run_dir, query, sets)
        fig = _timed(cmd, root / f"{stage}-{n}.log")
        sdir = run_dir / stage if stage != "map" else run_dir / "mapped.h5ad"
        fig["disk_bytes"] = _du(sdir)
        out[stage] = fig
        print(f"  {n:>9,} cells  {stage:<9} {fig['wall_s']:8.1f} s  cpu {fig['cpu_s']:8.1f} s  "
              f"rss {fig['peak_rss'] / 2**30:6.2f} GiB  disk {fig['disk_bytes'] / 2**30:6.2f} GiB",
              flush=True)  # fmt: skip
    return out


def merge(paths: list[str]) -> list[dict]:
    """Results of several runs, one entry per size: a later file's stages replace earlier ones."""
    by_size: dict[int, dict] = {}
    for path in paths:
        for r in json.loads(Path(path).read_text()):
            entry = by_size.setdefault(r["cells"], {"cells": r["cells"]})
            entry.update({k: v for k, v in r.items() if k != "cells" and "wall_s" in v})
            for k, v in r.items():
                if k != "cells" and k not in entry:
                    entry[k] = v
    return [by_size[n] for n in sorted(by_size)]


def report(results: list[dict]) -> str:
    """Per stage and size: wall and CPU seconds per million cells, peak RSS; then the targets.

    The last columns compare the largest size with the smallest: peak RSS ratio (target <=
    1.25) and seconds per cell ratio, wall and CPU (target <= 1.2; CPU time is the steadier
    figure on a shared machine), and the RSS slope in bytes per cell between consecutive sizes.
    """
    head = " | ".join(f"{r['cells']:,} cells: wall, CPU s/M; peak RSS" for r in results)
    lines = [f"| stage | {head} | RSS ratio | s/cell ratio wall, CPU | RSS slope (bytes/cell) |",
             "|---" * (len(results) + 4) + "|"]  # fmt: skip
    for stage in ("demo-data", *STAGES):
        cells = []
        for r in results:
            f = r.get(stage, {})
            if "wall_s" not in f:
                cells.append("reused" if f.get("reused") else "-")
                continue
            m = 1.0 if stage == "map" else r["cells"] / 1e6  # map: a fixed query, seconds
            unit = "s" if stage == "map" else "s/M"
            cells.append(f"{f['wall_s'] / m:,.0f}, {f['cpu_s'] / m:,.0f} {unit}; "
                         f"{f['peak_rss'] / 2**30:.2f} GiB")  # fmt: skip
        done = [r for r in results if "wall_s" in r.get(stage, {})]
        ratio = per_cell = "-"
        if len(done) >= 2:
            a, b = done[0], done[-1]
            fa, fb = a[stage], b[stage]
            ratio = f"{fb['peak_rss'] / fa['peak_rss']:.2f}"
            n = 1.0 if stage == "map" else b["cells"] / a["cells"]
            per_cell = f"{fb['wall_s'] / fa['wall_s'] / n:.2f}, {fb['cpu_s'] / fa['cpu_s'] / n:.2f}"
        slopes = [
            f"{(b[stage]['peak_rss'] - a[stage]['peak_rss']) / (b['cells'] - a['cells']):.0f}"
            for a, b in zip(done, done[1:], strict=False)
        ]
        lines.append(f"| {stage} | " + " | ".join(cells)
                     + f" | {ratio} | {per_cell} | {', '.join(slopes) or '-'} |")  # fmt: skip
    return "\n".join(lines)


CENSUS_CELLS = 99_600_000  # unique human cells, Census 2025-11-08
CORES = os.cpu_count() or 1


def _fit(results: list[dict], stage: str, key: str) -> tuple[float, float] | None:
    """Least-squares ``a + b * cells`` of ``key`` over the sizes (None with under 2 sizes)."""
    pts = [(r["cells"], r[stage][key]) for r in results if key in r.get(stage, {})]
    if len(pts) < 2:
        return None
    import numpy as np

    x, y = np.array(pts, dtype=float).T
    b, a = np.polyfit(x, y, 1)
    return float(a), float(b)


def projection(results: list[dict], cells: int = CENSUS_CELLS) -> str:
    """Per stage at ``cells``: wall here, core-hours, peak RSS and disk, from fitted lines.

    Wall and CPU are linear fits through the sizes (their slope is the cost per cell); peak RSS
    and disk too (intercept = the fixed part, slope = bytes per cell).
    """
    lines = [
        f"Projection to {cells:,} cells (linear fits over {len(results)} sizes; "
        f"this machine: {CORES} cores):",
        "",
        "| stage | wall here | CPU core-hours | peak RSS | RSS bytes/cell | disk |",
        "|---|---|---|---|---|---|",
    ]
    for stage in ("demo-data", *STAGES):
        wall, cpu = _fit(results, stage, "wall_s"), _fit(results, stage, "cpu_s")
        rss, disk = _fit(results, stage, "peak_rss"), _fit(results, stage, "disk_bytes")
        if wall is None or cpu is None or rss is None:
            continue
        # never below the largest size's figure: a stage whose cost is mostly fixed (evaluate's
        # sample, map's query) fits a falling line that would project below zero
        last = [r[stage] for r in results if "wall_s" in r.get(stage, {})][-1]
        hours = max(wall[0] + wall[1] * cells, last["wall_s"]) / 3600
        core_h = max(cpu[0] + cpu[1] * cells, last["cpu_s"]) / 3600
        peak = max(rss[0] + rss[1] * cells, last["peak_rss"]) / 2**30
        gib = max(disk[0] + disk[1] * cells, last["disk_bytes"]) / 2**30 if disk else float("nan")
        lines.append(
            f"| {stage} | {hours:,.1f} h | {core_h:,.1f} | {peak:,.2f} GiB | {rss[1]:,.1f} | "
            f"{gib:,.1f} GiB |"
        )
    return "\n".join(lines)


def plot(results: list[dict], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for stage in ("demo-data", *STAGES):
        pts = [(r["cells"], r[stage]) for r in results if "wall_s" in r.get(stage, {})]
        if not pts:
            continue
        x = [p[0] for p in pts]
        ax1.plot(x, [p[1]["wall_s"] for p in pts], "o-", label=stage)
        ax2.plot(x, [p[1]["peak_rss"] / 2**30 for p in pts], "o-", label=stage)
    for ax, title in ((ax1, "wall time (s)"), (ax2, "peak RSS (GiB)")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("cells")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
    ax1.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[250_000, 1_000_000, 2_000_000])
    p.add_argument("--genes", type=int, default=20_000)
    p.add_argument("--hvg", type=int, default=8000)
    p.add_argument("--sample", type=int, default=10_000, help="evaluate.sample_size")
    p.add_argument("--query-cells", type=int, default=10_000)
    p.add_argument("--root", default="/tmp/census-scvi-scale")
    p.add_argument("--demo-args", nargs=argparse.REMAINDER, default=[],
                   help="extra demo-data flags (last on the line)")  # fmt: skip
    p.add_argument(
        "--stages",
        nargs="*",
        default=list(STAGES),
        choices=STAGES,
        help="stages to run (without prepare the run directory is kept; none: only build "
        "the censuses)",
    )
    p.add_argument(
        "--model-from",
        metavar="RUN_DIR",
        help="copy this run's train/ instead of training (bigger sizes)",
    )
    p.add_argument(
        "--report-only",
        metavar="JSON",
        nargs="+",
        help="print the tables of saved runs (merged by size, later files win)",
    )
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="another config override for every stage (repeatable)")  # fmt: skip
    p.add_argument("--png", default="docs/scale.png")
    p.add_argument("--json", default="docs/scale.json")
    args = p.parse_args()
    if args.report_only:
        saved = merge(args.report_only)
        print(report(saved) + "\n\n" + projection(saved))
        plot(saved, Path(args.png))
        return
    print("command:", " ".join([os.path.basename(sys.executable), *sys.argv]), flush=True)
    results = []
    for n in sorted(args.sizes):
        results.append(run_size(args, n))
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    print(report(results) + "\n\n" + projection(results))
    plot(results, Path(args.png))
    print(f"wrote {args.json} and {args.png}")


if __name__ == "__main__":
    main()
