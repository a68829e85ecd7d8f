"""``training_plan.compile`` (torch.compile of the scVI module) on CPU, with and without the fast
likelihood: milliseconds per training step (forward, backward, Adam), same batches for every case.

Each case runs in its own child process (compilation caches do not leak between cases), builds
``scvi.model.SCVI`` on synthetic negative-binomial counts, and times ``--steps`` steps after
``--warmup`` steps (compilation happens there; its seconds are reported apart). The batches
differ in their number of non-zeros, as real ones do: the fast likelihood's sums over the
non-zeros have a data-dependent size, which is what torch.compile must cope with.

Usage::

    .venv/bin/python benchmarks/bench_compile.py --genes 8000 --hidden 128 --layers 2 --latent 50
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Any

CASES = {
    "eager": {"compile": False, "fast": False},
    "eager + fast likelihood": {"compile": False, "fast": True},
    "compiled": {"compile": True, "fast": False},
    "compiled + fast likelihood": {"compile": True, "fast": True},
}


def _batches(a: dict) -> list:
    import numpy as np
    import torch

    rng = np.random.default_rng(0)
    out = []
    for _ in range(a["warmup"] + a["steps"]):
        mu = rng.gamma(0.3, 2.0, size=(1, a["genes"])) * rng.uniform(0.5, 2.0, size=(a["batch"], 1))
        x = rng.negative_binomial(2, 2 / (2 + mu)).astype(np.float32)
        out.append(
            {
                "X": torch.from_numpy(x),
                "batch": torch.from_numpy(rng.integers(0, 4, size=(a["batch"], 1))),
                "labels": torch.zeros((a["batch"], 1), dtype=torch.int64),
            }
        )
    return out


def registered_adata(genes: int, n: int = 64) -> Any:
    """A tiny AnnData registered with scvi-tools (4 batches): it only shapes the model, the
    benchmarks feed their own batches (shared by profile_train_step.py and bench_optimizer.py)."""
    import anndata
    import numpy as np
    import pandas as pd
    import scipy.sparse as sp
    import scvi

    adata = anndata.AnnData(
        X=sp.csr_matrix(np.ones((n, genes), dtype=np.float32)),
        obs=pd.DataFrame({"batch": pd.Categorical([f"b{i % 4}" for i in range(n)])}),
    )
    adata.obs_names = [f"c{i}" for i in range(n)]
    scvi.model.SCVI.setup_anndata(adata, batch_key="batch")
    return adata


def add_shape_args(p: argparse.ArgumentParser) -> None:
    """The model-shape options every step benchmark takes."""
    p.add_argument("--genes", type=int, default=8000)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--latent", type=int, default=50)
    p.add_argument("--batch", type=int, default=1024)


def child(a: dict) -> dict:
    import scvi
    import torch

    from census_scvi.train._likelihood import install_fast_likelihood

    torch.set_num_threads(a["threads"])
    scvi.settings.seed = 0
    adata = registered_adata(a["genes"])
    model = scvi.model.SCVI(adata, n_hidden=a["hidden"], n_layers=a["layers"], n_latent=a["latent"])
    if a["fast"]:
        install_fast_likelihood(model)
    module = model.module
    module.train()
    step_fn = torch.compile(module, dynamic=False) if a["compile"] else module
    opt = torch.optim.Adam(module.parameters(), lr=1e-3, eps=0.01)
    batches = _batches(a)

    def step(b: dict) -> float:
        _, _, loss = step_fn(b, loss_kwargs={"kl_weight": 1.0})
        opt.zero_grad()
        loss.loss.backward()
        opt.step()
        return float(loss.loss)

    t0 = time.perf_counter()
    for b in batches[: a["warmup"]]:
        step(b)
    warm = time.perf_counter() - t0
    t0 = time.perf_counter()
    losses = [step(b) for b in batches[a["warmup"] :]]
    per_step = (time.perf_counter() - t0) / a["steps"]
    return {"ms_per_step": per_step * 1e3, "warmup_s": warm, "last_loss": losses[-1]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_shape_args(p)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--case-timeout", type=int, default=900, help="seconds per case")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(json.loads(args.child))), flush=True)
        return
    print("command:", " ".join([os.path.basename(sys.executable), *sys.argv]), flush=True)
    base = {k: v for k, v in vars(args).items() if k != "child"}
    res = {}
    for name, case in CASES.items():
        try:
            proc = subprocess.run(
                [sys.executable, __file__, "--child", json.dumps({**base, **case})],
                capture_output=True,
                text=True,
                check=False,
                timeout=args.case_timeout,
            )
        except subprocess.TimeoutExpired:
            print(f"  {name:28s} not done after {args.case_timeout} s (compiling)", flush=True)
            continue
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode or not lines:
            tail = proc.stderr.strip().splitlines()[-3:]
            print(f"  {name:28s} failed: {' | '.join(tail)}", flush=True)
            continue
        res[name] = json.loads(lines[-1][7:])
        r = res[name]
        ratio = res["eager"]["ms_per_step"] / r["ms_per_step"] if "eager" in res else float("nan")
        print(
            f"  {name:28s} {r['ms_per_step']:8.1f} ms/step ({ratio:4.2f}x eager)  "
            f"warm-up {r['warmup_s']:6.1f} s  loss {r['last_loss']:.1f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
