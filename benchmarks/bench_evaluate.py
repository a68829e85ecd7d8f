"""Evaluate benchmark: scib-metrics cost per metric, and our settings vs the Benchmarker defaults.

For each sample size, on a synthetic latent (10-d, 12 cell types, 8 batches with shifts) and a
50-d "PCA" of the same cells:

- baseline: ``scib_metrics.benchmark.Benchmarker`` with its defaults (pynndescent neighbours,
  every default metric including kBET), one batch key;
- ours: ``census_scvi.evaluate._metrics.benchmark`` (exact scikit-learn neighbours shared across batch
  keys, ``evaluate.skip_metrics`` default: no kBET, no Leiden), one batch key;
- per metric: each scib-metrics function timed alone on the scVI-like embedding (first call,
  JAX compilation included, as in a real run).

Each case runs in its own child process, which reports its wall time (after imports) and its peak
RSS (``ru_maxrss``).

Usage::

    .venv/bin/python benchmarks/bench_evaluate.py --sizes 2000 10000
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import textwrap

from census_scvi.constants import BATCH_METRICS, BIO_METRICS

CHILD = """
import json, os, resource, sys, time, warnings
os.environ.setdefault("JAX_PLATFORMS", "cpu")
warnings.simplefilter("ignore")
import numpy as np
import scib_metrics
from scib_metrics.benchmark import Benchmarker
import anndata as ad, pandas as pd
from census_scvi.evaluate._metrics import benchmark, _CachedNeighbors

n, case = int(sys.argv[1]), sys.argv[2]
rng = np.random.default_rng(0)
labels = rng.integers(0, 12, n)
batch = rng.integers(0, 8, n)
z = ((rng.normal(size=(12, 10)) * 3)[labels] + rng.normal(size=(n, 10))
     + 0.7 * rng.normal(size=(8, 10))[batch]).astype(np.float32)
pca = ((rng.normal(size=(12, 50)) * 2)[labels] + rng.normal(size=(n, 50))
       + 2.0 * rng.normal(size=(8, 50))[batch]).astype(np.float32)
L, B = labels.astype(str), batch.astype(str)
out = {}
t0 = time.perf_counter()
if case == "baseline":
    a = ad.AnnData(obs=pd.DataFrame({"l": pd.Categorical(L), "b": pd.Categorical(B)},
                                    index=[str(i) for i in range(n)]))
    a.obsm["scVI"], a.obsm["PCA"] = z, pca
    bm = Benchmarker(a, batch_key="b", label_key="l", embedding_obsm_keys=["scVI", "PCA"],
                     pre_integrated_embedding_obsm_key="PCA", progress_bar=False)
    bm.benchmark()
elif case == "ours":
    benchmark({"scVI": z, "PCA": pca}, labels=L, batches={"batch": B}, baseline="PCA",
              skip_metrics=["kbet_per_label", "nmi_ari_cluster_labels_leiden"])
else:
    r = _CachedNeighbors()(z, 90)
    fns = {
        "isolated_labels": lambda: scib_metrics.isolated_labels(z, L, B),
        "nmi_ari_cluster_labels_kmeans": lambda: scib_metrics.nmi_ari_cluster_labels_kmeans(z, L),
        "nmi_ari_cluster_labels_leiden": lambda: scib_metrics.nmi_ari_cluster_labels_leiden(
            r.subset_neighbors(15), L),
        "silhouette_label": lambda: scib_metrics.silhouette_label(z, L),
        "clisi_knn": lambda: scib_metrics.clisi_knn(r, L),
        "bras": lambda: scib_metrics.bras(z, L, B),
        "ilisi_knn": lambda: scib_metrics.ilisi_knn(r, B),
        "kbet_per_label": lambda: scib_metrics.kbet_per_label(r.subset_neighbors(50), B, L),
        "graph_connectivity": lambda: scib_metrics.graph_connectivity(r.subset_neighbors(15), L),
        "pcr_comparison": lambda: scib_metrics.pcr_comparison(pca, z, B, categorical=True),
    }
    t = time.perf_counter()
    f = fns[case]; f()
    out["metric_s"] = time.perf_counter() - t
out["wall_s"] = time.perf_counter() - t0
out["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps(out))
"""

METRICS = [*BIO_METRICS, *BATCH_METRICS]


def run(n: int, case: str) -> dict:
    res = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(CHILD), str(n), case],
        capture_output=True,
        text=True,
        check=False,
    )
    if res.returncode != 0:
        return {"error": res.stderr.strip().splitlines()[-1] if res.stderr else "failed"}
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[2000, 10000])
    p.add_argument("--no-per-metric", action="store_true")
    args = p.parse_args()
    for n in args.sizes:
        base = run(n, "baseline")
        ours = run(n, "ours")
        print(f"n={n:,} cells, 2 embeddings, 1 batch key")
        print(
            f"  Benchmarker defaults (pynndescent, kBET on): {base.get('wall_s', float('nan')):7.1f} s,"
            f" peak RSS {base.get('peak_rss_mib', float('nan')):6.0f} MiB {base.get('error', '')}"
        )
        print(
            f"  census-scvi (exact k-NN, no kBET/Leiden):    {ours.get('wall_s', float('nan')):7.1f} s,"
            f" peak RSS {ours.get('peak_rss_mib', float('nan')):6.0f} MiB {ours.get('error', '')}"
        )
        if "wall_s" in base and "wall_s" in ours:
            print(f"  speed-up: {base['wall_s'] / ours['wall_s']:.2f}x")
        if args.no_per_metric:
            continue
        print("  per metric, one embedding, first call (JAX compile included):")
        for m in METRICS:
            r = run(n, m)
            print(f"    {m:32s} {r.get('metric_s', float('nan')):7.2f} s {r.get('error', '')}")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
