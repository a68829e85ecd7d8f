"""``census-scvi tune``: search model / training settings for the best scib Total, resumably.

``run_tune(config, run_dir=RUN_DIR, ...)``:

1. validates the space (``--space`` or :data:`~census_scvi.tune._space.DEFAULT_SPACE`) against
   the config, before any heavy work;
2. opens (or reopens) the Optuna study ``RUN_DIR/tune/study.db``; trials a killed tune left
   running are marked failed and enqueued again (:mod:`census_scvi.tune._study`);
3. prepares once, in ``RUN_DIR/prepare`` (skipped when done): every trial shares it;
4. runs trials until ``trials`` have finished: each is ``train -> embed -> evaluate`` in
   ``RUN_DIR/tune/trial-NNN/`` with the sampled params (:mod:`census_scvi.tune._trials`),
   scored by ``evaluate/metrics.json``'s ``aggregate -> scVI -> Total`` (``--metric``), the
   validation ELBO of ``train/manifest.json`` breaking ties;
5. reruns the top ``finalists`` with ``seeds - 1`` more training seeds (seed-to-seed spread of
   the Total reaches 0.08, more than many differences between trials) and picks the best by the
   mean over seeds;
6. writes ``RUN_DIR/tune/leaderboard.csv``, ``summary.md``, ``total.png`` and ``best.yaml``: the
   full resolved config of the best, with ``output.run_dir: RUN_DIR``, so that
   ``census-scvi run -c RUN_DIR/tune/best.yaml`` trains it next to the shared prepare.

Every trial trains as the config says (``train.max_epochs`` and the rest): set small values for
a fast tune. Rerunning the same command continues where it stopped; finished trials and reruns
are read back, not redone.

Examples
--------
>>> from census_scvi.config import load_config
>>> from census_scvi.tune import run_tune
>>> result = run_tune(load_config(None), run_dir="runs/tune", trials=10)  # doctest: +SKIP
>>> print(result.summary())  # doctest: +SKIP
"""

from __future__ import annotations

import importlib.util
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from census_scvi.config import dump_config
from census_scvi.constants import RUN_LOCK
from census_scvi.errors import CensusScviError
from census_scvi.rundir import atomic_path, hold_lock
from census_scvi.tune._report import (
    Finalist,
    Run,
    draw_totals,
    rank_key,
    summary_markdown,
    write_leaderboard,
)
from census_scvi.tune._space import Param, apply_params, load_space
from census_scvi.tune._study import (
    finished_trials,
    identity,
    import_optuna,
    label_of,
    open_study,
    recover_interrupted,
    rerun_key,
)
from census_scvi.tune._trials import METRICS, Score, run_trial, trial_config, trial_dir

if TYPE_CHECKING:
    import optuna

    from census_scvi.config import Config

__all__ = ["BEST_FILE", "LEADERBOARD_FILE", "SUMMARY_FILE", "TUNE_DIR", "TuneResult", "run_tune"]

logger = logging.getLogger(__name__)

TUNE_DIR = "tune"
LEADERBOARD_FILE = "leaderboard.csv"
SUMMARY_FILE = "summary.md"
PLOT_FILE = "total.png"
BEST_FILE = "best.yaml"


@dataclass
class TuneResult:
    """What ``run_tune`` did: trials, the best parameter set and where the outputs are."""

    run_dir: Path
    metric: str
    n_trials: int
    n_failed: int
    n_retried: int
    best: Finalist | None
    outputs: dict[str, Path] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def best_params(self) -> dict[str, Any]:
        return dict(self.best.params) if self.best else {}

    def summary(self) -> str:
        """A few lines: trials, the best and its mean score, the outputs, the next command."""
        retried = f", {self.n_retried} interrupted and retried" if self.n_retried else ""
        lines = [
            f"tune: {self.n_trials} trials ({self.n_failed} failed{retried}) in "
            f"{self.seconds:.0f} s, ranked by {self.metric}"
        ]
        if self.best is not None:
            attr = METRICS[self.metric][0]
            mean = self.best.mean(attr)
            params = _text(self.best.params)
            lines.append(
                f"  best: trial {self.best.label}, mean {self.metric} "
                f"{mean:.4g} over {len(self.best.values(attr))} seed(s): {params}"
            )
        lines.append("  outputs: " + ", ".join(str(p) for p in self.outputs.values()))
        if BEST_FILE in self.outputs:
            lines.append(f"  next: census-scvi run -c {self.outputs[BEST_FILE]}")
        return "\n".join(lines)


def run_tune(
    config: Config,
    *,
    run_dir: str | os.PathLike[str],
    space: str | os.PathLike[str] | None = None,
    trials: int = 20,
    metric: str = "total",
    finalists: int = 3,
    seeds: int = 2,
    command: str | None = None,
) -> TuneResult:
    """Search ``space`` for the config scoring best on ``metric``; resumable.

    Parameters
    ----------
    config
        The base config: every trial is it plus the trial's params.
    run_dir
        The run directory: ``prepare/`` (shared) and ``tune/`` go there.
    space
        A space YAML (see :mod:`census_scvi.tune._space`); None: the default space.
    trials
        Trials to finish (a rerun with more continues the same study).
    metric
        ``total`` (scib Total), ``bio``, ``batch``, or ``elbo`` (validation ELBO only; no embed
        and no evaluate, so it is fast, but it does not score the embedding).
    finalists
        Top trials rerun with more seeds.
    seeds
        Training seeds per finalist, the trial's own included (1: no reruns).
    command
        The command line, for ``summary.md``.

    Returns
    -------
    A :class:`TuneResult`; outputs in ``RUN_DIR/tune/``.
    """
    _check_args(trials=trials, metric=metric, finalists=finalists, seeds=seeds)
    import_optuna()
    if metric != "elbo" and importlib.util.find_spec("scib_metrics") is None:
        msg = f"--metric {metric} is scored by evaluate, which needs scib-metrics (not installed)"
        raise CensusScviError(msg, hint="pip install 'census-scvi[eval]', or use --metric elbo")
    params = load_space(space, config)
    run_dir = Path(run_dir)
    tune_dir = run_dir / TUNE_DIR
    t0 = time.perf_counter()
    with hold_lock(tune_dir / RUN_LOCK, what=f"the tune in {tune_dir}"):
        ident = identity(config.model_dump(mode="json"), [_spec(p) for p in params], metric)
        study = open_study(
            tune_dir, ident=ident, direction=METRICS[metric][1], seed=config.train.seed
        )
        n_retried = recover_interrupted(study)
        _shared_prepare(config, run_dir)
        _search(study, config, params, run_dir=run_dir, trials=trials, metric=metric)
        runs = _trial_runs(study, config)
        chosen = _finalists(runs, finalists, metric)
        reruns = _rerun_seeds(study, config, chosen, run_dir=run_dir, seeds=seeds, metric=metric)
        best = min(chosen, key=lambda f: _mean_key(f, metric)) if chosen else None
        outputs = _write_outputs(
            config,
            run_dir=run_dir,
            runs=runs + reruns,
            chosen=chosen,
            best=best,
            params=params,
            metric=metric,
            command=command or _command(run_dir, space, trials, metric, finalists, seeds),
        )
    n_failed = sum(not r.score.ok for r in runs)
    if best is None:
        first = next((r.score.status for r in runs if not r.score.ok), "no trial ran")
        msg = f"all {len(runs)} tune trials failed; the first: {first}"
        raise CensusScviError(msg, hint=f"see {outputs[SUMMARY_FILE]}; rerun with --debug -v")
    return TuneResult(
        run_dir=run_dir,
        metric=metric,
        n_trials=len(runs),
        n_failed=n_failed,
        n_retried=n_retried,
        best=best,
        outputs=outputs,
        seconds=time.perf_counter() - t0,
    )


def _check_args(*, trials: int, metric: str, finalists: int, seeds: int) -> None:
    if metric not in METRICS:
        msg = f"--metric '{metric}' is not one of {', '.join(METRICS)}"
        raise CensusScviError(msg, hint="--metric total ranks by the scib Total")
    for name, value in (("--trials", trials), ("--finalists", finalists), ("--seeds", seeds)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            msg = f"{name} {value!r} must be a whole number >= 1"
            raise CensusScviError(msg)


def _spec(p: Param) -> dict[str, Any]:
    return {"key": p.key, **p.to_dict(), "integer": p.integer}


def _shared_prepare(config: Config, run_dir: Path) -> None:
    """``RUN_DIR/prepare`` for every trial (skipped when its manifest matches)."""
    from census_scvi.pipeline import run_pipeline

    logger.info("tune: prepare (shared by every trial) in %s", run_dir)
    run_pipeline(config, run_dir=run_dir, to_stage="prepare")


# ---- the search ----------------------------------------------------------------------------
def _search(
    study: optuna.Study,
    config: Config,
    params: Sequence[Param],
    *,
    run_dir: Path,
    trials: int,
    metric: str,
) -> None:
    """Ask, run and tell trials until ``trials`` have finished (those on disk count)."""
    from optuna.trial import TrialState

    done, failures = len(finished_trials(study)), 0
    if done:
        logger.info("tune: %d of %d trials already finished in %s", done, trials, run_dir)
    while done < trials:
        trial = study.ask()
        label = int(trial.user_attrs.get("label", _next_label(study)))
        trial.set_user_attr("label", label)
        values = {p.key: p.suggest(trial) for p in params}
        tdir = trial_dir(run_dir / TUNE_DIR, label)
        logger.info("tune: trial %d (%d of %d): %s", label, done + 1, trials, _text(values))
        try:
            score = _run(config, values, run_dir=run_dir, tdir=tdir, metric=metric)
        except BaseException:
            study.tell(trial, state=TrialState.FAIL)  # no 'error': retried by the next run
            raise
        trial.set_user_attr("seed", config.train.seed)
        trial.set_user_attr("score", score.to_dict())
        if score.ok:
            failures = 0
            study.tell(trial, score.value(metric))
            logger.info("tune: trial %d: %s %.4g in %.0f s", label, metric, score.value(metric), score.seconds)  # fmt: skip
        else:
            trial.set_user_attr("error", score.status)
            study.tell(trial, state=TrialState.FAIL)
            _stop_if_nothing_works(study, failures := failures + 1, score.status)
        done += 1


def _next_label(study: optuna.Study) -> int:
    """The next trial folder number (retries reuse theirs, so folders stay consecutive)."""
    labels = [
        int(t.user_attrs["label"])
        for t in study.get_trials(deepcopy=False)
        if "label" in t.user_attrs
    ]
    return max(labels, default=-1) + 1


#: Failed trials in a row, none succeeded before, after which the tune stops (a set-up error).
_STOP_AFTER = 3


def _stop_if_nothing_works(study: optuna.Study, failures: int, status: str) -> None:
    from optuna.trial import TrialState

    if failures < _STOP_AFTER or study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        return
    msg = f"the tune's first {failures} trials all failed, the last one {status}"
    raise CensusScviError(
        msg,
        hint="fix the cause and rerun the same command (failed trials are retried while none succeeded)",
    )


def _run(
    config: Config,
    values: dict[str, Any],
    *,
    run_dir: Path,
    tdir: Path,
    metric: str,
    seed: int | None = None,
) -> Score:
    """One run; a parameter combination the config rejects as a whole is a failed run."""
    try:
        cfg = trial_config(config, values, tdir, seed=config.train.seed if seed is None else seed)
    except CensusScviError as e:
        return Score(status=f"failed: {e.message}")
    return run_trial(cfg, run_dir=run_dir, tdir=tdir, metric=metric)


def _text(values: dict[str, Any]) -> str:
    return ", ".join(
        f"{k.split('.', 1)[1]}={v:.3g}" if isinstance(v, float) else f"{k.split('.', 1)[1]}={v}"
        for k, v in values.items()
    )


def _trial_runs(study: optuna.Study, config: Config) -> list[Run]:
    """The finished trials as runs (one per trial folder)."""
    out: dict[int, Run] = {}
    for t in finished_trials(study):
        score = Score.from_dict(
            t.user_attrs.get("score", {"status": t.user_attrs.get("error", "failed")})
        )
        if "error" in t.user_attrs:
            score.status = str(t.user_attrs["error"])
        seed = int(t.user_attrs.get("seed", config.train.seed))
        out[label_of(t)] = Run(label_of(t), seed, dict(t.params), score)
    return [out[k] for k in sorted(out)]


# ---- finalists -----------------------------------------------------------------------------
def _finalists(runs: Sequence[Run], n: int, metric: str) -> list[Finalist]:
    ok = [r for r in runs if r.score.ok]
    ranked = sorted(ok, key=lambda r: rank_key(r.score.value(metric), r.score.elbo, metric))
    return [Finalist(r.label, dict(r.params), runs=[r]) for r in ranked[:n]]


def _rerun_seeds(
    study: optuna.Study,
    config: Config,
    chosen: Sequence[Finalist],
    *,
    run_dir: Path,
    seeds: int,
    metric: str,
) -> list[Run]:
    """Each finalist with ``seeds - 1`` more training seeds (recorded runs are read back)."""
    base = config.train.seed
    out = []
    for f in chosen:
        for seed in range(base + 1, base + seeds):
            key = rerun_key(f.label, seed)
            recorded = study.user_attrs.get(key)
            if recorded is not None:
                score = Score.from_dict(recorded)
            else:
                tdir = trial_dir(run_dir / TUNE_DIR, f.label, seed)
                logger.info("tune: finalist trial %d with seed %d", f.label, seed)
                score = _run(config, f.params, run_dir=run_dir, tdir=tdir, metric=metric, seed=seed)
                study.set_user_attr(key, score.to_dict())
            run = Run(f.label, seed, dict(f.params), score, rerun=True)
            f.runs.append(run)
            out.append(run)
    return out


def _mean_key(f: Finalist, metric: str) -> tuple[float, float]:
    return rank_key(f.mean(METRICS[metric][0]), f.mean("elbo"), metric)


# ---- outputs -------------------------------------------------------------------------------
def _write_outputs(
    config: Config,
    *,
    run_dir: Path,
    runs: list[Run],
    chosen: list[Finalist],
    best: Finalist | None,
    params: Sequence[Param],
    metric: str,
    command: str,
) -> dict[str, Path]:
    tune_dir = run_dir / TUNE_DIR
    out = {
        LEADERBOARD_FILE: tune_dir / LEADERBOARD_FILE,
        SUMMARY_FILE: tune_dir / SUMMARY_FILE,
        PLOT_FILE: tune_dir / PLOT_FILE,
    }
    write_leaderboard(out[LEADERBOARD_FILE], runs)
    draw_totals(
        out[PLOT_FILE], runs, metric=metric, finalists=chosen, best=best.label if best else None
    )
    if best is not None:
        out[BEST_FILE] = tune_dir / BEST_FILE
        _write_best(out[BEST_FILE], config, best, run_dir=run_dir, metric=metric)
    text = summary_markdown(
        command=command,
        metric=metric,
        space=[p.describe() for p in params],
        runs=runs,
        finalists=chosen,
        best=best,
        best_yaml=out.get(BEST_FILE, tune_dir / BEST_FILE),
        notes=_notes(config, metric),
    )
    with atomic_path(out[SUMMARY_FILE]) as tmp:
        tmp.write_text(text)
    return out


def _write_best(path: Path, config: Config, best: Finalist, *, run_dir: Path, metric: str) -> None:
    """The best's full resolved config; ``output.run_dir`` is RUN_DIR (its prepare is done)."""
    cfg = apply_params(config, best.params, output__run_dir=str(run_dir.resolve()))
    attr = METRICS[metric][0]
    mean = best.mean(attr)
    head = (
        f"# census-scvi tune: trial {best.label}, mean {metric} "
        f"{'n/a' if mean is None else f'{mean:.4f}'} over {len(best.values(attr))} seed(s); "
        f"see {path.parent / SUMMARY_FILE}\n"
        f"# train it: census-scvi run -c {path}\n"
    )
    with atomic_path(path) as tmp:
        tmp.write_text(head + dump_config(cfg))


def _notes(config: Config, metric: str) -> list[str]:
    notes = [
        "Trials train as the config says (train.max_epochs etc.); each ran with "
        "embed.write_soma and embed.write_minified_model off and evaluate.batch_keys empty "
        "(the aggregate is computed on the batch label); best.yaml keeps your settings.",
        f"Training seeds: trials use train.seed={config.train.seed}; finalists rerun with the "
        "next seeds. The evaluation sample and split (evaluate.seed) are the same for all.",
    ]
    skipped = list(config.evaluate.skip_metrics)
    if metric != "elbo" and skipped:
        notes.append(
            f"scib metrics skipped (evaluate.skip_metrics): {', '.join(skipped)}; the "
            "aggregates differ from scib-metrics' defaults when kBET is among them."
        )
    return notes


def _command(
    run_dir: Path, space: Any, trials: int, metric: str, finalists: int, seeds: int
) -> str:
    parts = ["census-scvi tune", f"-o {run_dir}"]
    if space is not None:
        parts.append(f"--space {space}")
    parts += [
        f"--trials {trials}",
        f"--metric {metric}",
        f"--finalists {finalists}",
        f"--seeds {seeds}",
    ]
    return " ".join(parts)
