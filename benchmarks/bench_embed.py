"""Embed benchmark: the original create-latent approach against ``run_embed``, two sizes.

Original approach (the Census pipeline's scvi-create-latent-update.py): the whole AnnData of the
selected cells x model genes in memory (``get_anndata``), ``SCVI.prepare_query_anndata``,
``SCVI.load_query_data``, ``is_trained = True``, ``get_latent_representation(return_dist=True)``.
Ours: ``run_embed`` (chunked SOMA reads, encoder on sparse chunks, memory-mapped outputs) with
the SOMA array and minified model turned off, and once more with every output on.

Each case runs in its own child process, which reports its wall time (after imports) and its own
peak RSS (``ru_maxrss``), so one case's memory never counts against another's. Both approaches
embed the same cells (``soma_joinid < N``) of one mini census with one model.

``--profile`` instead runs ``run_embed`` with every output on, sampling the child's RSS every
20 ms and marking each step (rows, chunks, meta/SOMA writes, the minified model's obs read,
scvi-tools' ``load_query_data`` / ``minify_adata`` / ``save``): per step, the RSS it added over
the RSS at its start, and the bytes per cell of the growth between two sizes.

Usage::

    .venv/bin/python benchmarks/bench_embed.py --sizes 50000 200000
    .venv/bin/python benchmarks/bench_embed.py --profile --census /tmp/m200k --sizes 50000 200000
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

# heavy imports happen before the clock starts, for both approaches
CHILD_PREAMBLE = """
import json, resource, sys, time
import numpy as np
import cellxgene_census, scvi, torch
import census_scvi.embed._stage
t0 = time.perf_counter()
"""

CHILD_FOOTER = """
seconds = time.perf_counter() - t0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print("RESULT " + json.dumps({"seconds": seconds, "peak_rss": peak, "cells": int(n_cells)}))
"""

ORIGINAL = """
import cellxgene_census, scvi
from census_scvi.batches import batch_labels
model_dir, census_uri, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
var_names = scvi.model.SCVI.load_registry(model_dir)["field_registries"]["X"]["state_registry"]["column_names"]
with cellxgene_census.open_soma(uri=census_uri) as census:
    var = census["census_data"]["homo_sapiens"].ms["RNA"].var.read().concat().to_pandas()
    ids = var.set_index("feature_id").loc[list(var_names), "soma_joinid"].to_numpy()
    adata = cellxgene_census.get_anndata(census, "Homo sapiens", obs_value_filter=f"soma_joinid < {n}", var_coords=np.sort(ids))
adata.obs["batch"] = batch_labels(adata.obs, ["dataset_id", "assay", "suspension_type", "donor_id"], "//")
adata.var = adata.var.set_index("feature_id")
scvi.model.SCVI.prepare_query_anndata(adata, model_dir)
q = scvi.model.SCVI.load_query_data(adata, model_dir)
q.is_trained = True
qzm, qzv = q.get_latent_representation(return_dist=True)
n_cells = len(qzm)
"""

OURS = """
import shutil
from pathlib import Path
from census_scvi.config import load_config
from census_scvi.embed import run_embed
run_dir, census_uri, n, full, chunk = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4] == "1", sys.argv[5]
shutil.rmtree(run_dir / "embed", ignore_errors=True)
cfg = load_config(None, overrides=[
    f"census.uri={census_uri}", "census.demo=null", f"census.obs_query=soma_joinid < {n}",
    f"embed.chunk_size={chunk}", f"embed.write_soma={'true' if full else 'false'}",
    f"embed.write_minified_model={'true' if full else 'false'}",
])
res = run_embed(cfg, run_dir=run_dir, force=True)
n_cells = res.n_cells
"""


PROFILE = """
import shutil, threading
from pathlib import Path
import psutil
import census_scvi.embed._stage as stage_mod
from census_scvi.config import load_config
from census_scvi.embed import run_embed
run_dir, census_uri, n, chunk = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4]
extra_sets = sys.argv[5:]
proc, samples, marks, running = psutil.Process(), [], [], [True]

def sample():
    while running[0]:
        samples.append((time.perf_counter(), proc.memory_info().rss))
        time.sleep(0.02)

import tracemalloc
tracemalloc.start()
stack, traced = [], {}

def traced_mark():
    # fold the traced peak since the last mark into every open step, then reset it
    _cur, pk = tracemalloc.get_traced_memory()
    for entry in stack:
        entry[2] = max(entry[2], pk)
    tracemalloc.reset_peak()
    return tracemalloc.get_traced_memory()[0]

def wrap(owner, name, label):
    f = getattr(owner, name, None)
    if f is None:
        return  # an older layout: not every step exists
    def step(*a, **k):
        t = time.perf_counter()
        cur = traced_mark()
        stack.append([label, cur, cur])
        marks.append((label, "start", t, proc.memory_info().rss))
        try:
            return f(*a, **k)
        finally:
            traced_mark()
            lab, cur0, pk = stack.pop()
            traced[lab] = max(traced.get(lab, 0), pk - cur0)
            marks.append((label, "end", time.perf_counter(), proc.memory_info().rss))
    setattr(owner, name, step)

import importlib, scvi
for mod, name, label in [
    ("census_scvi.embed._chunks", "_rows", "rows (joinids, batch codes, genes)"),
    ("census_scvi.embed._chunks", "_encode_chunks", "encode chunks"),
    ("census_scvi.embed._outputs", "write_meta_yml", "meta.yml"),
    ("census_scvi.embed._outputs", "write_embedding_soma", "embedding.soma"),
    ("census_scvi.embed._stage", "write_embedding_soma", "embedding.soma"),
    ("census_scvi.embed._outputs", "select_cells", "minified: obs read"),
    ("census_scvi.embed._stage", "select_cells", "minified: obs read"),
    ("census_scvi.embed._outputs", "save_minified_model", "minified: save_minified_model"),
    ("census_scvi.embed._stage", "save_minified_model", "minified: save_minified_model"),
]:
    try:
        wrap(importlib.import_module(mod), name, label)
    except ImportError:
        pass
for name in ("load_query_data", "minify_adata", "save"):
    wrap(scvi.model.SCVI, name, "  scvi " + name)
threading.Thread(target=sample, daemon=True).start()
shutil.rmtree(run_dir / "embed", ignore_errors=True)
cfg = load_config(None, overrides=[
    f"census.uri={census_uri}", "census.demo=null", f"census.obs_query=soma_joinid < {n}",
    f"embed.chunk_size={chunk}", *extra_sets,
])
base = proc.memory_info().rss
res = run_embed(cfg, run_dir=run_dir, force=True)
running[0] = False
n_cells = res.n_cells
steps = {}
open_ = {}
for label, kind, t, rss in marks:
    if kind == "start":
        open_[label] = (t, rss)
        continue
    t0_, rss0 = open_.pop(label)
    peak = max([r for tt, r in samples if t0_ <= tt <= t] + [rss0, rss])
    s = steps.setdefault(label, {"seconds": 0.0, "added": 0, "peak": 0})
    s["seconds"] += t - t0_
    s["added"] = max(s["added"], peak - rss0)
    s["peak"] = max(s["peak"], peak)
    s["traced"] = traced.get(label, 0)
extra = {"steps": steps, "base_rss": base}
print("PROFILE " + json.dumps(extra))
"""


def _profile(run_dir: Path, census_uri: str, sizes: list[int], chunk: str, sets: list[str]) -> None:
    """Per step: RSS added (peak during the step minus RSS at its start), at each size."""
    by_size = {}
    for n in sizes:
        script = CHILD_PREAMBLE + textwrap.dedent(PROFILE) + CHILD_FOOTER
        out = subprocess.run(
            [sys.executable, "-c", script, str(run_dir), census_uri, str(n), chunk, *sets],
            capture_output=True,
            text=True,
            check=False,
        )
        lines = {
            ln.split(" ", 1)[0]: ln.split(" ", 1)[1] for ln in out.stdout.splitlines() if " " in ln
        }
        if "RESULT" not in lines:
            raise RuntimeError(out.stderr[-3000:])
        by_size[n] = {**json.loads(lines["RESULT"]), **json.loads(lines["PROFILE"])}
        r = by_size[n]
        print(f"{n:>9,} cells: {r['seconds']:.1f} s, peak RSS {r['peak_rss'] / 2**30:.2f} GiB")
        print(f"    {'step':<36} {'wall':>9}  {'RSS added':>13}  {'traced peak':>12}  (RSS peak)")
        for label, s in r["steps"].items():
            print(
                f"    {label:<36} {s['seconds']:7.1f} s  +{s['added'] / 2**20:8.1f} MiB"
                f"  {s['traced'] / 2**20:8.1f} MiB  (peak {s['peak'] / 2**20:8.1f} MiB)"
            )
    if len(sizes) >= 2:
        a, b = sizes[0], sizes[-1]
        ra, rb = by_size[a], by_size[b]
        print(f"growth per cell between {a:,} and {b:,} cells:")
        print(f"    {'peak RSS':<36} {(rb['peak_rss'] - ra['peak_rss']) / (b - a):8.0f} B/cell")
        print(f"    {'step':<36} {'RSS added':>14} {'traced peak':>14}")
        for label in rb["steps"]:
            if label in ra["steps"]:
                sa, sb = ra["steps"][label], rb["steps"][label]
                d, dt = sb["added"] - sa["added"], sb["traced"] - sa["traced"]
                print(f"    {label:<36} {d / (b - a):8.0f} B/cell {dt / (b - a):8.0f} B/cell")
    print(json.dumps(by_size))


def _child(code: str, *args: str) -> dict:
    script = CHILD_PREAMBLE + textwrap.dedent(code) + CHILD_FOOTER
    out = subprocess.run(
        [sys.executable, "-c", script, *args], capture_output=True, text=True, check=False
    )
    for line in out.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    raise RuntimeError(out.stderr[-3000:])


def _setup(
    work: Path, n_cells: int, n_genes: int, n_hvg: int, n_latent: int, census: Path | None = None
) -> tuple[str, Path]:
    """The mini census and a model trained briefly on 5,000 of its cells (cached in ``work``)."""
    import numpy as np

    census_uri = census or work / f"mini-{n_cells}x{n_genes}"
    if not census_uri.exists():
        from census_scvi.demo import make_mini_census

        t = time.perf_counter()
        make_mini_census(census_uri, n_cells=n_cells, n_genes=n_genes, seed=0)
        print(f"built {census_uri} in {time.perf_counter() - t:.0f} s", flush=True)
    run_dir = work / f"run-{census_uri.name}-{n_hvg}-{n_latent}"
    model_dir = run_dir / "train" / "scvi.model"
    if not (model_dir / "model.pt").is_file():
        import cellxgene_census
        import scvi

        from census_scvi.batches import batch_labels

        genes = np.linspace(0, n_genes - 1, n_hvg).astype(np.int64)
        with cellxgene_census.open_soma(uri=str(census_uri)) as census:
            adata = cellxgene_census.get_anndata(
                census,
                "Homo sapiens",
                obs_value_filter="is_primary_data == True and nnz >= 300 and soma_joinid < 5000",
                var_coords=genes,
            )
        adata.obs["batch"] = batch_labels(
            adata.obs, ["dataset_id", "assay", "suspension_type", "donor_id"], "//"
        )
        adata.var_names = adata.var["feature_id"].astype(str).to_numpy()
        adata.obs_names = adata.obs["soma_joinid"].astype(str).to_numpy()
        scvi.model.SCVI.setup_anndata(adata, batch_key="batch")
        model = scvi.model.SCVI(adata, n_latent=n_latent, n_hidden=128, encode_covariates=False)
        model.train(max_epochs=2, accelerator="cpu", enable_progress_bar=False)
        model.save(str(model_dir), overwrite=True)
    return str(census_uri), run_dir


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[50_000, 200_000])
    p.add_argument("--genes", type=int, default=2000, help="genes in the mini census")
    p.add_argument("--hvg", type=int, default=1000, help="model genes")
    p.add_argument("--latent", type=int, default=10)
    p.add_argument("--chunk-size", type=int, default=65_536)
    p.add_argument("--work", type=Path, default=Path("/tmp/census-scvi-bench"))
    p.add_argument("--skip-original", action="store_true")
    p.add_argument("--profile", action="store_true", help="RSS per step of run_embed")
    p.add_argument("--census", type=Path, help="an existing mini census (default: build one)")
    p.add_argument("--set", dest="sets", action="append", default=[], help="config override")
    args = p.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    census_uri, run_dir = _setup(
        args.work, max(args.sizes), args.genes, args.hvg, args.latent, census=args.census
    )
    model_dir = str(run_dir / "train" / "scvi.model")
    if args.profile:
        _profile(run_dir, census_uri, args.sizes, str(args.chunk_size), args.sets)
        return

    rows = []
    for n in args.sizes:
        cases = {}
        if not args.skip_original:
            cases["original"] = _child(ORIGINAL, model_dir, census_uri, str(n))
        chunk = str(args.chunk_size)
        cases["ours"] = _child(OURS, str(run_dir), census_uri, str(n), "0", chunk)
        cases["ours+soma+minified"] = _child(OURS, str(run_dir), census_uri, str(n), "1", chunk)
        for name, r in cases.items():
            r["cells_per_s"] = r["cells"] / r["seconds"]
            rows.append((n, name, r))
            print(
                f"{n:>9,} {name:<20} {r['seconds']:7.1f} s {r['cells_per_s']:>9,.0f} cells/s "
                f"peak RSS {r['peak_rss'] / 2**30:5.2f} GiB",
                flush=True,
            )
        if "original" in cases:
            o, u = cases["original"], cases["ours"]
            print(
                f"{n:>9,} ratio ours/original: cells/s {u['cells_per_s'] / o['cells_per_s']:.2f}x, "
                f"peak RSS {u['peak_rss'] / o['peak_rss']:.2f}x",
                flush=True,
            )
    print(json.dumps([{"n": n, "case": c, **r} for n, c, r in rows]))


if __name__ == "__main__":
    main()
