"""One scVI training step with each of the fast likelihood's CPU paths on and off, in one process.

Builds ``scvi.model.SCVI`` on the first cells of a prepared h5ad, installs census-scvi's fast
likelihood (``train.fast_likelihood``) and Adam with torch's fused kernel (what ``run_train``
uses), then times steps (forward, backward, optimizer) round by round, switching in place
between:

  all:       the NB likelihood from the decoder's logits and the sparse first encoder layer;
  no-sparse: the encoder's first layer dense (scvi-tools' ``FCLayers``);
  no-logits: the likelihood's gradient by autograd through softmax and mu;
  neither:   the fast likelihood of before both (zero-aware sums on mu).

The same mini-batches in every variant, interleaved, so a busy or drifting machine hits them
alike; the median ms/step of the rounds is printed with each round's figures.

    python benchmarks/bench_train_step.py --h5ad RUN/prepare/anndata_model.h5ad --hidden 512
"""

from __future__ import annotations

import argparse
import statistics
import time

VARIANTS = ("all", "no-sparse", "no-logits", "neither")


def _switch(module, variant: str) -> None:
    from scvi.nn import FCLayers

    from census_scvi.train._sparse_input import SparseFirstLayerFCLayers

    sparse = variant in ("all", "no-logits")
    module.z_encoder.encoder.__class__ = SparseFirstLayerFCLayers if sparse else FCLayers
    module.decoder.keeps_logits = variant in ("all", "no-sparse")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--h5ad", required=True, help="a prepared anndata_model.h5ad")
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--latent", type=int, default=50)
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--steps", type=int, default=6, help="timed steps per variant and round")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()

    import anndata
    import numpy as np
    import scvi
    import torch

    from census_scvi._allocators import fix_mmap_threshold, use_lean_allocators
    from census_scvi.train._likelihood import install_fast_likelihood

    use_lean_allocators()
    fix_mmap_threshold()
    torch.set_num_threads(a.threads)
    n_cells = a.batch * (a.steps + 2)
    adata = anndata.read_h5ad(a.h5ad)[:n_cells].copy()
    scvi.model.SCVI.setup_anndata(adata, batch_key="batch")
    scvi.settings.seed = 0
    model = scvi.model.SCVI(
        adata, n_hidden=a.hidden, n_layers=a.layers, n_latent=a.latent, gene_likelihood="nb"
    )
    install_fast_likelihood(model)
    module = model.module
    module.train()
    opt = torch.optim.Adam(module.parameters(), lr=1e-3, eps=0.01, fused=True)
    batch_codes = torch.from_numpy(adata.obs["_scvi_batch"].to_numpy()).reshape(-1, 1).long()

    def batch(k: int) -> dict:
        rows = np.arange(k * a.batch, (k + 1) * a.batch)
        return {
            "X": torch.from_numpy(adata.X[rows].toarray()),
            "batch": batch_codes[rows],
            "labels": torch.zeros(a.batch, 1),
        }

    batches = [batch(k) for k in range(a.steps + 2)]

    def step(b: dict) -> None:
        _, _, losses = module(b, loss_kwargs={"kl_weight": 1.0})
        opt.zero_grad()
        losses.loss.backward()
        opt.step()

    density = float((batches[0]["X"] > 0).float().mean())
    print(f"{a.batch} cells x {adata.n_vars} genes ({density:.1%} non-zero), n_hidden {a.hidden}")
    for variant in VARIANTS:  # warm-up: numba compilation, first allocations
        _switch(module, variant)
        step(batches[0])
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for _ in range(a.rounds):
        for variant in VARIANTS:
            _switch(module, variant)
            step(batches[1])
            t = time.perf_counter()
            for b in batches[2:]:
                step(b)
            times[variant].append((time.perf_counter() - t) / a.steps * 1e3)
    base = statistics.median(times["neither"])
    for variant in VARIANTS:
        med = statistics.median(times[variant])
        rounds = ", ".join(f"{t:.0f}" for t in times[variant])
        print(f"  {variant:10s} {med:7.1f} ms/step  ({base / med:.2f}x neither)  rounds: {rounds}")


if __name__ == "__main__":
    main()
