"""Fast likelihood benchmark: forward + backward of scVI's reconstruction log-likelihood,
scvi-tools' ``px.log_prob(x).sum(-1)`` against ``fast_log_prob_sum(px, x)`` (what
``install_fast_likelihood`` makes ``VAE.loss`` call, including finding the non-zeros and the
support check).

Each torch thread count runs in its own child process; inside it, stock and fast alternate rep
by rep (so load from other jobs hits both alike) and the medians and their ratio come from that
same process. Data: counts at the given density (non-zeros 1 + Poisson(3)); means a softmax
over genes times a library size of 3,000 (a leaf, so both time only the likelihood); gene-wise
theta; ZINB logits N(0, 1).
``--compile`` also times ``torch.compile`` of both functions (inductor, CPU, gcc).

Usage::

    .venv/bin/python benchmarks/bench_likelihood.py --shapes 1024x8000 1024x2000 --threads 1 2
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys

CHILD = r"""
import json, statistics, sys, time, warnings
import torch
from scvi.distributions import NegativeBinomial, ZeroInflatedNegativeBinomial
from census_scvi.train._likelihood import _counts_in_support, _find_nonzeros, fast_log_prob_sum

args = json.loads(sys.argv[1])
torch.set_num_threads(args["threads"])
torch.manual_seed(0)
warnings.simplefilter("ignore")


def make(n, g, density):
    keep = torch.rand(n, g) < density
    x = torch.where(keep, torch.poisson(torch.full((n, g), 3.0)) + 1, 0.0)
    mu = (torch.softmax(torch.randn(n, g), -1) * 3000.0).requires_grad_()
    px_r = torch.randn(g).requires_grad_()
    pi = torch.randn(n, g).requires_grad_()
    return x, mu, px_r, pi


def px_of(kind, mu, px_r, pi):
    if kind == "nb":
        return NegativeBinomial(mu=mu, theta=px_r.exp())
    return ZeroInflatedNegativeBinomial(mu=mu, theta=px_r.exp(), zi_logits=pi)


def stock(px, x):
    return px.log_prob(x).sum(-1)


def step(f, kind, x, mu, px_r, pi):
    mu.grad = px_r.grad = pi.grad = None
    t = time.perf_counter()
    out = f(px_of(kind, mu, px_r, pi), x)
    out.sum().backward()
    return time.perf_counter() - t


def median_time(f, reps):
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        f()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


results = []
for shape in args["shapes"]:
    n, g = map(int, shape.split("x"))
    x, mu, px_r, pi = make(n, g, args["density"])
    fns = {"stock": stock, "fast": fast_log_prob_sum}
    if args["compile"]:
        fns["stock_compiled"] = torch.compile(stock)
        fns["fast_compiled"] = torch.compile(fast_log_prob_sum)
    for kind in args["likelihoods"]:
        row = {"shape": shape, "kind": kind, "threads": args["threads"]}
        for name, f in fns.items():
            t0 = time.perf_counter()
            step(f, kind, x, mu, px_r, pi)  # warm-up (and compilation)
            row[name + "_first_s"] = time.perf_counter() - t0
        times = {name: [] for name in fns}
        for _ in range(args["reps"]):
            for name, f in fns.items():
                times[name].append(step(f, kind, x, mu, px_r, pi))
        for name in fns:
            row[name + "_ms"] = 1e3 * statistics.median(times[name])
        nz = _find_nonzeros(x)
        row["nonzeros_ms"] = 1e3 * median_time(lambda: _find_nonzeros(x), args["reps"])
        row["support_ms"] = 1e3 * median_time(lambda: _counts_in_support(x, nz), args["reps"])
        results.append(row)
print("RESULT " + json.dumps(results))
"""


def _child(args: argparse.Namespace, threads: int) -> list[dict]:
    payload = {
        "threads": threads,
        "shapes": args.shapes,
        "likelihoods": args.likelihoods,
        "density": args.density,
        "reps": args.reps,
        "compile": args.compile,
    }
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps(payload)],
        capture_output=True,
        text=True,
        check=False,
    )
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    raise RuntimeError(f"child failed ({proc.returncode}):\n{proc.stderr[-3000:]}")


def _print(rows: list[dict], *, compiled: bool) -> None:
    head = (
        "| shape | likelihood | threads | stock | fast | stock / fast | non-zeros | support check |"
    )
    print(head + (" stock compiled | fast compiled |" if compiled else ""))
    print("|---" * (head.count("|") - 1 + (2 if compiled else 0)) + "|")
    for r in rows:
        line = (
            f"| {r['shape']} | {r['kind']} | {r['threads']} | {r['stock_ms']:.1f} ms "
            f"| {r['fast_ms']:.1f} ms | {r['stock_ms'] / r['fast_ms']:.2f}x "
            f"| {r['nonzeros_ms']:.1f} ms | {r['support_ms']:.1f} ms |"
        )
        if compiled:
            line += f" {r['stock_compiled_ms']:.1f} ms | {r['fast_compiled_ms']:.1f} ms |"
        print(line)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=["1024x8000", "1024x2000"])
    parser.add_argument("--likelihoods", nargs="+", default=["nb", "zinb"])
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--density", type=float, default=0.15)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--compile", action="store_true", help="also time torch.compile")
    args = parser.parse_args()
    print("command: " + shlex.join([sys.executable, *sys.argv]))
    rows = [row for threads in args.threads for row in _child(args, threads)]
    _print(rows, compiled=args.compile)
    if args.compile:
        for r in rows:
            first = r["stock_compiled_first_s"], r["fast_compiled_first_s"]
            print(
                f"{r['shape']} {r['kind']} threads={r['threads']}: first call (compile) "
                f"stock {first[0]:.1f} s, fast {first[1]:.1f} s"
            )


if __name__ == "__main__":
    main()
