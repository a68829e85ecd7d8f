"""What a tune writes: ``leaderboard.csv``, ``summary.md``, ``total.png`` (all in ``RUN_DIR/tune``)."""

from __future__ import annotations

import csv
import json
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from census_scvi.rundir import atomic_path
from census_scvi.tune._trials import Score

__all__ = ["Finalist", "Run", "draw_totals", "rank_key", "summary_markdown", "write_leaderboard"]

LEADERBOARD_COLUMNS = (
    "trial",
    "seed",
    "run",
    "status",
    "Total",
    "Bio",
    "Batch",
    "ELBO",
    "celltype_knn",
    "batch_knn",
    "seconds",
    "params",
)


@dataclass
class Run:
    """One run of a parameter set: the sampled trial or a finalist's rerun with another seed."""

    label: int
    seed: int
    params: dict[str, Any]
    score: Score
    rerun: bool = False

    def row(self) -> dict[str, Any]:
        s = self.score
        return {
            "trial": self.label,
            "seed": self.seed,
            "run": "seed rerun" if self.rerun else "trial",
            "status": s.status,
            "Total": _r(s.total),
            "Bio": _r(s.bio),
            "Batch": _r(s.batch),
            "ELBO": _r(s.elbo, 2),
            "celltype_knn": _r(s.celltype_knn),
            "batch_knn": _r(s.batch_knn),
            "seconds": round(s.seconds, 1),
            "params": json.dumps(self.params, sort_keys=False),
        }


@dataclass
class Finalist:
    """A top trial with all its seeds; ranked by the mean of ``metric`` over them."""

    label: int
    params: dict[str, Any]
    runs: list[Run] = field(default_factory=list)

    def values(self, attr: str) -> list[float]:
        vals = [getattr(r.score, attr) for r in self.runs if r.score.ok]
        return [v for v in vals if v is not None]

    def mean(self, attr: str) -> float | None:
        vals = self.values(attr)
        return statistics.fmean(vals) if vals else None

    def spread(self, attr: str) -> float | None:
        vals = self.values(attr)
        return max(vals) - min(vals) if len(vals) > 1 else None


def _r(v: float | None, digits: int = 4) -> float | str:
    return "" if v is None else round(v, digits)


def write_leaderboard(path: Path, runs: Sequence[Run]) -> None:
    """``leaderboard.csv``: one row per run (trial, then its seed reruns), in trial order."""
    ordered = sorted(runs, key=lambda r: (r.label, r.rerun, r.seed))
    with atomic_path(path) as tmp, tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=LEADERBOARD_COLUMNS)
        writer.writeheader()
        writer.writerows(r.row() for r in ordered)


def draw_totals(
    path: Path,
    runs: Sequence[Run],
    *,
    metric: str,
    finalists: Sequence[Finalist] = (),
    best: int | None = None,
) -> None:
    """``total.png``: every trial's score by trial number, seed reruns and finalist means."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    points = [(r, v) for r in runs if r.score.ok and (v := r.score.value(metric)) is not None]
    fig, ax = plt.subplots(figsize=(7, 4))
    for rerun, marker, color in ((False, "o", "tab:blue"), (True, "x", "tab:orange")):
        xy = [(r.label, v) for r, v in points if r.rerun is rerun]
        if xy:
            xs, ys = zip(*xy, strict=True)
            name = "seed rerun" if rerun else "trial"
            ax.plot(xs, ys, ls="", marker=marker, color=color, label=name)
    attr = _attr(metric)
    means = [(f.label, m) for f in finalists if (m := f.mean(attr)) is not None]
    if means:
        xs, ys = zip(*means, strict=True)
        ax.hlines(
            ys, [x - 0.3 for x in xs], [x + 0.3 for x in xs], color="k", label="mean over seeds"
        )
    if best is not None:
        ax.axvline(best, color="tab:green", lw=1, ls="--", label=f"best: trial {best}")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    failed = [r.label for r in runs if not r.score.ok]
    if failed:
        ax.plot(failed, [ax.get_ylim()[0]] * len(failed), "v", color="tab:red", label="failed")
    ax.set_xlabel("trial")
    ax.set_ylabel(_METRIC_NAMES[metric])
    ax.set_title(f"census-scvi tune: {_METRIC_NAMES[metric]} per trial")
    ax.legend(loc="best", fontsize="small")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


_METRIC_NAMES = {
    "total": "scib Total",
    "bio": "scib Bio conservation",
    "batch": "scib Batch correction",
    "elbo": "validation ELBO (lower is better)",
}


def _fmt(v: float | None, digits: int = 3) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}"


def _params_text(params: Mapping[str, Any]) -> str:
    return ", ".join(
        f"{k.split('.', 1)[1]}={v:.3g}" if isinstance(v, float) else f"{k.split('.', 1)[1]}={v}"
        for k, v in params.items()
    )


def summary_markdown(
    *,
    command: str,
    metric: str,
    space: Sequence[str],
    runs: Sequence[Run],
    finalists: Sequence[Finalist],
    best: Finalist | None,
    best_yaml: Path,
    notes: Sequence[str] = (),
) -> str:
    """``summary.md``: how the tune ran, the top trials, the finalists over seeds, the choice."""
    trials = [r for r in runs if not r.rerun]
    failed = [r for r in trials if not r.score.ok]
    lines = [
        "# census-scvi tune",
        "",
        f"Command: `{command}`",
        "",
        f"{len(trials)} trials ({len(failed)} failed), ranked by {_METRIC_NAMES[metric]}; "
        f"the top {len(finalists)} rerun with more seeds, the best by the mean over seeds "
        "(validation ELBO breaks ties). Searched:",
        "",
        *(f"- `{s}`" for s in space),
        "",
        "## Top trials",
        "",
        "| trial | Total | Bio | Batch | ELBO | cell-type k-NN | batch k-NN | s | params |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    ranked = sorted(
        (r for r in trials if r.score.ok),
        key=lambda r: rank_key(r.score.value(metric), r.score.elbo, metric),
    )
    for r in ranked[:10]:
        s = r.score
        lines.append(
            f"| {r.label} | {_fmt(s.total)} | {_fmt(s.bio)} | {_fmt(s.batch)} | "
            f"{_fmt(s.elbo, 1)} | {_fmt(s.celltype_knn)} | {_fmt(s.batch_knn)} | "
            f"{s.seconds:.0f} | {_params_text(r.params)} |"
        )
    lines += _finalist_lines(finalists, metric)
    lines += _best_lines(best, best_yaml, metric)
    if failed:
        lines += ["", "## Failed trials", ""]
        lines += [f"- trial {r.label}: {r.score.status}" for r in failed]
    lines += ["", "## Notes", "", *(f"- {n}" for n in notes), "", "![per trial](total.png)", ""]
    return "\n".join(lines)


def _finalist_lines(finalists: Sequence[Finalist], metric: str) -> list[str]:
    attr = _attr(metric)
    lines = [
        "",
        "## Finalists over seeds",
        "",
        f"| trial | seeds | mean {attr} | spread | mean Bio | mean Batch | mean ELBO |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    for f in finalists:
        seeds = ", ".join(str(r.seed) for r in f.runs if r.score.ok)
        lines.append(
            f"| {f.label} | {seeds} | {_fmt(f.mean(attr))} | {_fmt(f.spread(attr))} | "
            f"{_fmt(f.mean('bio'))} | {_fmt(f.mean('batch'))} | {_fmt(f.mean('elbo'), 1)} |"
        )
    return lines


def _best_lines(best: Finalist | None, best_yaml: Path, metric: str) -> list[str]:
    if best is None:
        return ["", "## Best", "", "No trial finished; see the failed trials below."]
    attr = _attr(metric)
    return [
        "",
        "## Best",
        "",
        f"Trial {best.label}: mean {attr} {_fmt(best.mean(attr))} over "
        f"{len(best.values(attr))} seed(s); {_params_text(best.params)}.",
        "",
        f"Its full config is `{best_yaml}`; train it with",
        "",
        f"    census-scvi run -c {best_yaml}",
        "",
        "(add `--set train.max_epochs=N` for a longer run than the tune's).",
    ]


def _attr(metric: str) -> str:
    return {"total": "total", "bio": "bio", "batch": "batch", "elbo": "elbo"}[metric]


def rank_key(value: float | None, elbo: float | None, metric: str) -> tuple[float, float]:
    """Sort key, best first: the metric (rounded to 3 decimals), then the lower validation ELBO."""
    inf = float("inf")
    if value is None:
        return (inf, inf)
    v = round(value, 3) if metric != "elbo" else value
    return (-v if metric != "elbo" else v, elbo if elbo is not None else inf)
