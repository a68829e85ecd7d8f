"""Mini census generation: wall time, cells/s and peak RSS at two sizes (each in its own process).

Usage: python benchmarks/bench_demo_data.py [--sizes 100000 1000000] [--genes 2000] [--out DIR]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

from _measure import gib, measure


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--genes", type=int, default=2000)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    root = Path(args.out or tempfile.mkdtemp(prefix="bench-demo-"))
    rows = []
    for n in args.sizes:
        path = root / f"mini-{n}"
        shutil.rmtree(path, ignore_errors=True)
        r = measure(
            f"""
            from census_scvi.demo import make_mini_census
            make_mini_census({str(path)!r}, n_cells={n}, n_genes={args.genes}, seed=0)
            """
        )
        size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
        rows.append((n, r["wall_s"], n / r["wall_s"], r["peak_rss_bytes"], size))
        print(
            f"cells={n:>9,} genes={args.genes:,}: {r['wall_s']:7.1f} s  "
            f"{n / r['wall_s']:8,.0f} cells/s  peak RSS {gib(r['peak_rss_bytes'])}  "
            f"on disk {gib(size)}",
            flush=True,
        )
        if args.out is None:
            shutil.rmtree(path, ignore_errors=True)
    if len(rows) >= 2:
        print(
            f"peak RSS ratio {rows[-1][0]:,}/{rows[0][0]:,} cells: {rows[-1][3] / rows[0][3]:.2f}x; "
            f"throughput ratio {rows[-1][2] / rows[0][2]:.2f}x"
        )


if __name__ == "__main__":
    main()
