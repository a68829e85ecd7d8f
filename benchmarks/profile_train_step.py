"""Where one scVI training step's CPU time goes (torch.profiler), with the fast likelihood.

Builds ``scvi.model.SCVI`` on synthetic negative-binomial counts (the batches of
``bench_compile.py``), installs census-scvi's fast likelihood, runs ``--warmup`` steps, then
profiles ``--steps`` steps (forward, backward, Adam) and prints the operators by self CPU time.
Proportions hold on a loaded machine; absolute times do not.

    python benchmarks/profile_train_step.py --genes 8000 --hidden 128 --layers 2 --latent 50
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_compile import _batches, add_shape_args, registered_adata


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_shape_args(p)
    p.add_argument("--likelihood", default="nb", choices=["nb", "zinb", "poisson"])
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rows", type=int, default=25)
    a = p.parse_args()

    import scvi
    import torch
    from torch.profiler import ProfilerActivity, profile

    from census_scvi._allocators import use_lean_allocators
    from census_scvi.train._likelihood import install_fast_likelihood

    use_lean_allocators()
    torch.set_num_threads(a.threads)
    scvi.settings.seed = 0
    model = scvi.model.SCVI(
        registered_adata(a.genes),
        n_hidden=a.hidden,
        n_layers=a.layers,
        n_latent=a.latent,
        gene_likelihood=a.likelihood,
    )
    install_fast_likelihood(model)
    module = model.module
    module.train()
    opt = torch.optim.Adam(module.parameters(), lr=1e-3, eps=0.01)
    batches = _batches({**vars(a), "steps": a.steps, "warmup": a.warmup})

    def step(b: dict) -> None:
        _, _, loss = module(b, loss_kwargs={"kl_weight": 1.0})
        opt.zero_grad()
        loss.loss.backward()
        opt.step()

    for b in batches[: a.warmup]:
        step(b)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for b in batches[a.warmup :]:
            step(b)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=a.rows))


if __name__ == "__main__":
    main()
