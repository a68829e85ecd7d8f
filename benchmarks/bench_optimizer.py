"""One optimizer step of scVI's parameters: scvi-tools' Adam (torch's foreach kernel), the
per-parameter loop, and the fused kernel ``train.fused_optimizer`` uses; milliseconds per step.

    python benchmarks/bench_optimizer.py --genes 8000 --hidden 128 512 --layers 2 --latent 50
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_compile import registered_adata


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--genes", type=int, default=8000)
    p.add_argument("--hidden", type=int, nargs="+", default=[128, 512])
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--latent", type=int, default=50)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()

    import scvi
    import torch

    torch.set_num_threads(a.threads)
    adata = registered_adata(a.genes)
    print("n_hidden | parameters | kernel | ms/step | vs foreach")
    for hidden in a.hidden:
        module = scvi.model.SCVI(
            adata, n_hidden=hidden, n_layers=a.layers, n_latent=a.latent, gene_likelihood="nb"
        ).module
        # px_dropout_decoder gets no gradient with nb: scvi-tools' Adam skips it too
        params = [q for name, q in module.named_parameters() if "px_dropout" not in name]
        for q in params:
            q.grad = torch.randn_like(q)
        base = None
        for label, kw in (("foreach (scvi-tools)", {}), ("loop", {"foreach": False}),
                          ("fused (census-scvi)", {"fused": True})):  # fmt: skip
            opt = torch.optim.Adam(params, lr=1e-3, eps=0.01, weight_decay=1e-6, **kw)
            for _ in range(3):
                opt.step()
            t0 = time.perf_counter()
            for _ in range(a.steps):
                opt.step()
            ms = (time.perf_counter() - t0) / a.steps * 1e3
            base = base or ms
            size = sum(q.numel() for q in params)
            print(f"{hidden} | {size:,} | {label} | {ms:.1f} | {base / ms:.2f}x", flush=True)


if __name__ == "__main__":
    main()
