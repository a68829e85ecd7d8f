"""Map benchmark: our chunked query encoding against scvi-tools' own query path.

Baseline (what a user would write with scvi-tools): ``SCVI.prepare_query_anndata`` (pads missing
genes, reorders) + ``SCVI.load_query_data`` + ``get_latent_representation`` on the whole query.
Ours: ``census_scvi.mapping._stage.gene_overlap`` (overlap report + raw-count check) and
``encode_query`` (sparse per-chunk alignment, encoder passes), then ``transfer_labels`` (weighted
k-NN over the reference embedding) reported separately.

The query: N cells resampled (with replacement) from a mini census, all its genes, raw counts,
var index = Ensembl ids. Each case runs in its own child process, which reports its wall time
(after imports and loading the query) and its peak RSS.

Usage::

    .venv/bin/python benchmarks/bench_map.py --sizes 20000 100000 [--run RUN_DIR]

Without ``--run`` a mini census and a small model (prepare -> train -> embed, 10 epochs) are built
in a temporary folder first.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

CHILD = """
import json, os, resource, sys, time, warnings, logging
warnings.simplefilter("ignore")
logging.disable(logging.WARNING)
import numpy as np, anndata as ad, torch
torch.set_num_threads(2)
import scvi
from census_scvi.mapping import encode_query, gene_overlap, transfer_labels
query, run_dir, case = sys.argv[1:4]
model_dir = os.path.join(run_dir, "train", "scvi.model")
adata = ad.read_h5ad(query)
out = {}
t0 = time.perf_counter()
if case == "scvi":
    scvi.model.SCVI.prepare_query_anndata(adata, model_dir)
    adata.obs["batch"] = "query"
    q = scvi.model.SCVI.load_query_data(adata, model_dir)
    q.is_trained = True
    z = q.get_latent_representation(batch_size=1024)
else:
    rep = gene_overlap(adata, list(scvi.model.SCVI.prepare_query_anndata(
        None, model_dir, return_reference_var_names=True)))
    z = encode_query(adata, model_dir, chunk_size=16384, batch_size=1024, accelerator="cpu")
    out["encode_s"] = time.perf_counter() - t0
    ref = np.load(os.path.join(run_dir, "embed", "latent.npy"))
    labels = np.arange(ref.shape[0]) % 7
    t = time.perf_counter()
    transfer_labels(z, ref, labels.astype(str))
    out["transfer_s"] = time.perf_counter() - t
out["wall_s"] = time.perf_counter() - t0
out["n"] = int(z.shape[0])
out["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps(out))
"""


def build_run(base: Path) -> Path:
    from census_scvi.config import load_config
    from census_scvi.demo import make_mini_census
    from census_scvi.pipeline import run_pipeline

    census = base / "mini"
    make_mini_census(census, n_cells=5000, n_genes=2000, seed=0)
    cfg = load_config(
        None,
        overrides=[
            f"census.uri={census}",
            "census.demo=null",
            "train.max_epochs=10",
            "train.checkpoint_every_n_epochs=1000",
            "embed.write_minified_model=false",
            "embed.write_soma=false",
        ],
    )
    run_dir = base / "run"
    run_pipeline(cfg, run_dir=run_dir, to_stage="embed")
    return run_dir


def make_query(run_dir: Path, n: int, path: Path) -> None:
    import cellxgene_census
    import numpy as np

    from census_scvi.config import load_config

    uri = load_config(run_dir / "config.yaml").census_uri()
    with cellxgene_census.open_soma(uri=uri) as census:
        a = cellxgene_census.get_anndata(census, "homo_sapiens", obs_column_names=["soma_joinid"])
    a.var_names = a.var["feature_id"].astype(str).to_numpy()
    rows = np.random.default_rng(0).integers(0, a.n_obs, n)
    q = a[rows].copy()
    q.obs_names = [str(i) for i in range(n)]
    q.obs = q.obs[[]]
    q.var = q.var[[]]
    q.write_h5ad(path)


def run(query: Path, run_dir: Path, case: str) -> dict:
    res = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(CHILD), str(query), str(run_dir), case],
        capture_output=True,
        text=True,
        check=False,
    )
    if res.returncode != 0:
        return {"error": (res.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[20000, 100000])
    p.add_argument("--run", type=Path, default=None, help="run directory with a model + embed")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        run_dir = args.run or build_run(base)
        for n in args.sizes:
            query = base / f"query-{n}.h5ad"
            make_query(run_dir, n, query)
            ref = run(query, run_dir, "scvi")
            ours = run(query, run_dir, "ours")
            print(f"query of {n:,} cells")
            print(
                f"  scvi-tools prepare_query_anndata + load_query_data + latent: "
                f"{ref.get('wall_s', float('nan')):7.1f} s, peak RSS "
                f"{ref.get('peak_rss_mib', float('nan')):6.0f} MiB {ref.get('error', '')}"
            )
            print(
                f"  census-scvi overlap check + chunked encoder:                  "
                f"{ours.get('encode_s', float('nan')):7.1f} s, peak RSS "
                f"{ours.get('peak_rss_mib', float('nan')):6.0f} MiB {ours.get('error', '')}"
            )
            if "wall_s" in ref and "encode_s" in ours:
                print(f"  speed-up: {ref['wall_s'] / ours['encode_s']:.2f}x")
            print(f"  label transfer (weighted k-NN): {ours.get('transfer_s', float('nan')):.1f} s")
            sys.stdout.flush()


if __name__ == "__main__":
    main()
