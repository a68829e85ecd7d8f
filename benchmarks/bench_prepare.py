"""Benchmark: census-scvi prepare vs the original pipeline's prepare step.

Both run on the same census(es), each case in its own child process so that peak RSS
(``ru_maxrss`` from ``os.wait4``) belongs to that case alone:

- ``ours``: ``census_scvi.prepare._stage.run_prepare`` (streamed Seurat v3 HVGs, chunked h5ad write);
- ``original``: what ``scvi-prepare.py`` does: ``cellxgene_census.experimental.pp.
  highly_variable_genes`` with default settings, then ``query.to_anndata(X_name="raw")`` on the
  HVGs and ``write_h5ad(compression="gzip")``.

Usage::

    census-scvi demo-data /tmp/bench/c50k --cells 50000 --genes 20000
    census-scvi demo-data /tmp/bench/c200k --cells 200000 --genes 20000
    python benchmarks/bench_prepare.py /tmp/bench/c50k /tmp/bench/c200k --top-n 8000

Prints one line per case and the ratios the issue's targets are stated in; ``--json PATH``
also writes the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

OBS_FILTER = "is_primary_data == True and nnz >= 300"
HVG_BATCH = ["suspension_type", "assay"]
BATCH_KEY = ["dataset_id", "assay", "suspension_type", "donor_id"]


# ----------------------------------------------------------------------------------------------
# the cases (run in a child process)
# ----------------------------------------------------------------------------------------------
def _ours(uri: str, out: Path, top_n: int, extra: list[str], obs_filter: str) -> dict:
    from census_scvi.config import load_config
    from census_scvi.prepare import run_prepare

    cfg = load_config(
        None,
        overrides=[
            f"census.uri={uri}",
            f"census.obs_query_model={obs_filter}",
            f"hvg.top_n_hvg={top_n}",
            *extra,
        ],
    )
    t = time.perf_counter()
    res = run_prepare(cfg, run_dir=out, force=True)
    import pandas as pd

    hvg = pd.read_parquet(out / "prepare" / "hvg.parquet")
    return {
        "seconds": time.perf_counter() - t,
        "n_cells": res.n_cells,
        "hvg": sorted(hvg.loc[hvg["highly_variable"], "soma_joinid"].tolist()),
        "h5ad_bytes": (out / "prepare" / "anndata_model.h5ad").stat().st_size,
    }


def _original(uri: str, out: Path, top_n: int, extra: list[str], obs_filter: str) -> dict:
    """The original scvi-prepare.py, minus config reading (same calls, same defaults)."""
    t0 = time.perf_counter()
    import functools

    import cellxgene_census
    import tiledbsoma as soma
    from cellxgene_census.experimental.pp import highly_variable_genes

    t_import = time.perf_counter() - t0
    census = cellxgene_census.open_soma(uri=uri)
    exp = census["census_data"]["homo_sapiens"]
    t1 = time.perf_counter()
    query = exp.axis_query(
        measurement_name="RNA", obs_query=soma.AxisQuery(value_filter=obs_filter)
    )
    hvgs_df = highly_variable_genes(query, n_top_genes=top_n, batch_key=HVG_BATCH)
    hv = hvgs_df.highly_variable
    hv_idx = hv[hv].index
    t_hvg = time.perf_counter() - t1
    query = exp.axis_query(
        measurement_name="RNA",
        obs_query=soma.AxisQuery(value_filter=obs_filter),
        var_query=soma.AxisQuery(coords=(list(hv_idx),)),
    )
    adata = query.to_anndata(
        X_name="raw", column_names={"obs": ["soma_joinid", *BATCH_KEY, "cell_type"]}
    )
    adata.obs["batch"] = functools.reduce(
        lambda a, b: a + b, [adata.obs[c].astype(str) for c in BATCH_KEY]
    )
    adata.var.set_index("feature_id", inplace=True)
    path = out / "anndata_model.h5ad"
    adata.write_h5ad(path, compression="gzip")
    census.close()
    return {
        "seconds": time.perf_counter() - t0,
        "import_seconds": t_import,
        "hvg_seconds": t_hvg,
        "n_cells": adata.n_obs,
        "hvg": sorted(int(i) for i in hv_idx),
        "h5ad_bytes": path.stat().st_size,
    }


def _child(
    method: str, uri: str, top_n: int, result_path: str, extra: list[str], obs_filter: str
) -> None:
    import logging

    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as d:
        fn = _ours if method == "ours" else _original
        res = fn(uri, Path(d), top_n, extra, obs_filter)
    Path(result_path).write_text(json.dumps(res))


# ----------------------------------------------------------------------------------------------
# the driver
# ----------------------------------------------------------------------------------------------
def _run_case(
    method: str, uri: str, top_n: int, extra: list[str], max_rss: float, obs_filter: str
) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        result_path = f.name
    cmd = [sys.executable, __file__, "--child", method, uri, "--top-n", str(top_n)]
    cmd += [a for e in extra for a in ("--set", e)]
    cmd += ["--result", result_path, "--filter", obs_filter]
    t = time.perf_counter()
    proc = subprocess.Popen(cmd)
    killed, status, usage = _watch(proc, max_rss)
    wall = time.perf_counter() - t
    peak = usage.ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    if killed:
        # the machine is shared: a case that would exhaust memory is stopped; its figures are
        # lower bounds (peak RSS >= the limit, wall >= the time it ran)
        return {
            "killed": killed,
            "n_cells": 0,
            "hvg": [],
            "h5ad_bytes": 0,
            "wall_seconds": wall,
            "peak_rss_bytes": peak,
        }
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{method} on {uri} failed ({status})")
    res = json.loads(Path(result_path).read_text())
    Path(result_path).unlink()
    res["wall_seconds"] = wall
    res["peak_rss_bytes"] = peak
    return res


def _watch(proc: subprocess.Popen, max_rss: float) -> tuple[str, int, Any]:
    """Wait for the child, killing it when its RSS passes ``max_rss`` or the machine runs short.

    Returns why it was stopped (empty when it finished), its wait status and its rusage.
    """
    import psutil

    child = psutil.Process(proc.pid)
    why = ""
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            return why, status, usage
        if not why:
            try:
                rss = child.memory_info().rss
            except psutil.NoSuchProcess:
                rss = 0
            avail = psutil.virtual_memory().available
            if rss > max_rss or avail < 2 * 2**30:
                proc.kill()
                why = f"stopped at RSS {rss / 2**30:.1f} GiB (available {avail / 2**30:.1f} GiB)"
                print(f"  [{why}]", flush=True)
        time.sleep(0.2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("census", nargs="+", help="census roots (smallest first)")
    ap.add_argument("--top-n", type=int, default=8000)
    ap.add_argument("--methods", default="ours,original")
    ap.add_argument("--set", action="append", default=[], help="extra config overrides (ours)")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument(
        "--obs-query",
        default=None,
        help="extra obs filter for both methods, e.g. 'soma_joinid < 100000' (a smaller size)",
    )
    ap.add_argument(
        "--max-rss-gib",
        type=float,
        default=18.0,
        help="stop a case whose RSS passes this (figures become lower bounds)",
    )
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--result", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--filter", default=OBS_FILTER, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        _child(args.child, args.census[0], args.top_n, args.result, args.set, args.filter)
        return

    methods = args.methods.split(",")
    obs_filter = OBS_FILTER if not args.obs_query else f"{OBS_FILTER} and ({args.obs_query})"
    table: dict[str, dict[str, dict]] = {}
    for uri in args.census:
        for method in methods:
            res = _run_case(method, uri, args.top_n, args.set, args.max_rss_gib * 2**30, obs_filter)
            table.setdefault(uri, {})[method] = res
            mark = ">=" if res.get("killed") else "  "
            print(
                f"{Path(uri).name:>10} {method:>8}: {res['n_cells']:>8,} cells  {mark}"
                f"wall {res['wall_seconds']:7.1f} s  peak RSS {res['peak_rss_bytes'] / 2**30:6.2f} GiB"
                f"  h5ad {res['h5ad_bytes'] / 2**20:7.1f} MiB",
                flush=True,
            )
        if {"ours", "original"} <= set(table[uri]) and table[uri]["original"]["hvg"]:
            a, b = set(table[uri]["ours"]["hvg"]), set(table[uri]["original"]["hvg"])
            print(f"{'':>10} HVG Jaccard ours vs original: {len(a & b) / len(a | b):.4f}")
    print()
    uris = list(table)
    if "ours" in methods and len(uris) > 1:
        r = table[uris[-1]]["ours"]["peak_rss_bytes"] / table[uris[0]]["ours"]["peak_rss_bytes"]
        print(f"ours peak RSS {Path(uris[-1]).name}/{Path(uris[0]).name}: {r:.2f} (target <= 1.3)")
    if {"ours", "original"} <= set(methods):
        for uri in uris:
            o, g = table[uri]["ours"], table[uri]["original"]
            stopped = bool(g.get("killed"))
            rss = o["peak_rss_bytes"] / g["peak_rss_bytes"]
            wall = (
                "n/a (original stopped)"
                if stopped
                else f"{o['wall_seconds'] / g['wall_seconds']:.2f}"
            )
            print(
                f"{Path(uri).name}: ours/original peak RSS {'<=' if stopped else ''}{rss:.2f} "
                f"(target <= 0.25), wall {wall} (target <= 1.0)"
            )
    if args.json:
        for per in table.values():
            for res in per.values():
                res.pop("hvg", None)
        args.json.write_text(json.dumps(table, indent=2))


if __name__ == "__main__":
    main()
