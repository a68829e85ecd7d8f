"""The preset table of docs/tuning.md from ``census-scvi tune`` leaderboards.

Each ``NAME=RUN_DIR`` is a tune run directory; its finalist (``summary.md``'s best, the trial
with the best mean over seeds) is summarised as the mean and spread over its seeds of Total,
Bio, Batch, cell-type and batch k-NN accuracy. A one-point space (``--trials 1 --finalists 1
--seeds 2``) gives one configuration's two seeds.

    python benchmarks/preset_table.py real: preset=/tmp/atlas/real/tune seed=/tmp/atlas/real/seed \\
        defaults=/tmp/atlas/real/scvi-defaults
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

COLUMNS = ("Total", "Bio", "Batch", "celltype_knn", "batch_knn")


def finalist(run_dir: Path) -> tuple[int, list[dict[str, str]]]:
    """The trial with the best mean Total over its seeds, and its rows."""
    import csv

    rows = list(csv.DictReader((run_dir / "tune" / "leaderboard.csv").open()))
    ok = [r for r in rows if r["status"] == "ok"]
    by_trial: dict[int, list[dict[str, str]]] = {}
    for r in ok:
        by_trial.setdefault(int(r["trial"]), []).append(r)
    multi = {t: rs for t, rs in by_trial.items() if len(rs) > 1} or by_trial

    def mean_total(t: int) -> float:
        return sum(float(r["Total"]) for r in multi[t]) / len(multi[t])

    best = max(multi, key=mean_total)
    return best, multi[best]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("groups", nargs="+", help="DATASET: then NAME=RUN_DIR ...")
    args = p.parse_args()
    head = " | ".join(f"{c} (mean, spread)" for c in COLUMNS)
    print(f"| data | config | trial | seeds | {head} | params |")
    print("|---" * (5 + len(COLUMNS)) + "|")
    dataset = ""
    for item in args.groups:
        if item.endswith(":"):
            dataset = item[:-1]
            continue
        name, run = item.split("=", 1)
        trial, rows = finalist(Path(run))
        cells = []
        for c in COLUMNS:
            v = [float(r[c]) for r in rows]
            cells.append(f"{sum(v) / len(v):.3f} ({max(v) - min(v):.3f})")
        params = json.loads(rows[0]["params"])
        short = ", ".join(f"{k.split('.')[-1]}={v:.3g}" if isinstance(v, float)
                          else f"{k.split('.')[-1]}={v}" for k, v in params.items())  # fmt: skip
        seeds = ", ".join(r["seed"] for r in rows)
        print(f"| {dataset} | {name} | {trial} | {seeds} | " + " | ".join(cells) + f" | {short} |")


if __name__ == "__main__":
    main()
