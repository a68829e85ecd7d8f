"""The Optuna study behind ``census-scvi tune``: storage, resuming, and what each trial recorded.

Why Optuna and not scvi-tools' ``scvi.autotune`` (Ray Tune)
-----------------------------------------------------------
Measured on this project's machine (Python 3.11, 2 shared CPU cores, scvi-tools 1.4.2; the
commands are in docs/tuning.md):

=====================================  ==========================  ============================
                                       Optuna 5.0.0 (+ sqlite)     Ray Tune 2.60.0 (autotune)
=====================================  ==========================  ============================
wheels to download (new packages)      5.5 MB (optuna 0.4 MB,      81 MB (ray 79 MB, hyperopt,
                                       SQLAlchemy 4.7, alembic)    tensorboardX, msgpack)
installed size, new packages           35 MB                       248 MB
``import``                             0.3-0.6 s                   1.6-4.9 s (``ray.tune``)
3 no-op trials, start to end           1.2 s (sqlite study)        13 s (``ray.init`` + actors)
=====================================  ==========================  ============================

- **Resuming**: Optuna keeps every trial in an RDB (``RUN_DIR/tune/study.db``, sqlite) as it
  finishes; ``create_study(load_if_exists=True)`` reopens it and the next ``ask()`` continues.
  A trial that was running when the process was killed (``kill -9``) is still RUNNING there;
  this module marks it failed and enqueues the same parameters again, in the same trial folder,
  so its training continues from its last checkpoint. Ray Tune can ``Tuner.restore`` an
  experiment folder, but restores its own trial actors, not our stage bookkeeping.
- **What a trial is**: here a trial is a full ``train -> embed -> evaluate`` of the pipeline in
  its own run directory (memory or stream mode, checkpoints, manifests, the scib Total), which
  is a plain function call for Optuna's ask/tell. ``scvi.autotune`` tunes an in-memory
  ``AnnData`` with its own training loop and validation metrics (or scib on a subsample), so it
  would bypass stream mode and the stages' outputs, and it pulls in Ray for one machine.
- **Parallel**: Ray schedules trials across processes and a cluster; Optuna does the same
  through a shared RDB (several processes or hosts calling ``ask`` on one PostgreSQL/MySQL or
  journal storage). One tune process per run directory is what ``census-scvi tune`` runs now
  (it holds a lock); the study format already allows more workers later.

The study records, per trial: the sampled params (Optuna's own), and user attributes ``label``
(the trial folder number, kept across retries), ``retry_of``, the scores and ``status``; a
failed trial has an ``error``. Seed reruns of the finalists are study attributes
``rerun:<label>:<seed>`` (they are not samples for the sampler).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from census_scvi.errors import CensusScviError

if TYPE_CHECKING:
    import optuna

__all__ = [
    "STUDY_FILE",
    "STUDY_NAME",
    "finished_trials",
    "label_of",
    "open_study",
    "recover_interrupted",
    "rerun_key",
]

logger = logging.getLogger(__name__)

STUDY_FILE = "study.db"
STUDY_NAME = "census-scvi-tune"


def import_optuna() -> Any:
    """``optuna``, or a one-line error naming the install command."""
    try:
        import optuna
    except ImportError:
        msg = "census-scvi tune needs Optuna, which is not installed"
        raise CensusScviError(msg, hint="pip install 'census-scvi[tune]'") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


def identity(config_data: Mapping[str, Any], space: list[dict[str, Any]], metric: str) -> str:
    """A hash of what the study's trials mean: base config (less ``output``), space, metric."""
    data = {
        "config": {k: v for k, v in config_data.items() if k != "output"},
        "space": space,
        "metric": metric,
    }
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def open_study(tune_dir: Path, *, ident: str, direction: str, seed: int) -> optuna.Study:
    """Create or reopen ``tune_dir/study.db``; refuse one made for another config or space.

    The sampler (TPE) is seeded with ``seed`` plus the number of trials already in the study, so
    a resumed tune does not draw the first trials' parameters again.
    """
    optuna = import_optuna()
    tune_dir.mkdir(parents=True, exist_ok=True)
    path = tune_dir / STUDY_FILE
    storage = optuna.storages.RDBStorage(
        f"sqlite:///{path.resolve()}", engine_kwargs={"connect_args": {"timeout": 60}}
    )
    study = optuna.create_study(
        storage=storage, study_name=STUDY_NAME, direction=direction, load_if_exists=True
    )
    recorded = study.user_attrs.get("identity")
    if recorded is None:
        study.set_user_attr("identity", ident)
    elif recorded != ident:
        msg = (
            f"{path} holds a tune of another config, space or metric (identity {recorded}, "
            f"this one {ident})"
        )
        raise CensusScviError(
            msg, hint=f"use another -o RUN_DIR, or remove {tune_dir} to start over"
        )
    if study.direction.name.lower() != direction:
        msg = f"{path} was created to {study.direction.name.lower()} its metric, not {direction}"
        raise CensusScviError(msg, hint=f"remove {tune_dir} to start over")
    n = len(study.get_trials(deepcopy=False))
    study.sampler = optuna.samplers.TPESampler(seed=seed + n)
    return study


def label_of(trial: optuna.trial.FrozenTrial) -> int:
    """The trial folder number: the original trial's number, kept by its retries."""
    return int(trial.user_attrs.get("label", trial.number))


def rerun_key(label: int, seed: int) -> str:
    """The study attribute holding a finalist's rerun with ``seed``."""
    return f"rerun:{label}:{seed}"


def recover_interrupted(study: optuna.Study) -> int:
    """Enqueue again the trials to retry; returns how many.

    Retried: trials a killed process left RUNNING (marked failed first; call this holding the
    tune lock, so that no live process owns one), trials interrupted by Ctrl-C (failed without an
    ``error`` attribute), and, while no trial of the study has succeeded, failed trials too: then
    the cause is most likely the set-up (a missing package, a broken census), not the params.
    A retry keeps its trial's ``label``, so it reuses the trial folder (and its checkpoint).
    """
    from optuna.trial import TrialState

    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        logger.warning("tune: trial %d was running when its process died; retrying it", label_of(t))
        study.tell(t.number, state=TrialState.FAIL)
    trials = study.get_trials(deepcopy=False)
    retried = _retried(trials)
    none_ok = not any(t.state == TrialState.COMPLETE for t in trials)
    n = 0
    for t in trials:
        if t.state != TrialState.FAIL or t.number in retried:
            continue
        if "error" not in t.user_attrs or none_ok:
            study.enqueue_trial(
                dict(t.params), user_attrs={"label": label_of(t), "retry_of": t.number}
            )
            n += 1
    return n


def _retried(trials: list[optuna.trial.FrozenTrial]) -> set[int]:
    return {int(t.user_attrs["retry_of"]) for t in trials if "retry_of" in t.user_attrs}


def finished_trials(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """Trials that count toward ``--trials``: completed, or failed with an error, not retried."""
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    retried = _retried(trials)
    return [
        t
        for t in trials
        if t.state == TrialState.COMPLETE
        or (t.state == TrialState.FAIL and "error" in t.user_attrs and t.number not in retried)
    ]
