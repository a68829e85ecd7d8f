"""``census-scvi tune``: a hyper-parameter search over model and training settings (Optuna).

Each trial is ``train -> embed -> evaluate`` on one shared prepare, scored by the scib Total; the
finalists are rerun with more seeds; ``RUN_DIR/tune/best.yaml`` is the winner's full config.
See :mod:`census_scvi.tune._stage` for the flow, :mod:`census_scvi.tune._study` for why Optuna,
and docs/tuning.md.
"""

from census_scvi.tune._space import DEFAULT_SPACE, Param, load_space, parse_space
from census_scvi.tune._stage import (
    BEST_FILE,
    LEADERBOARD_FILE,
    SUMMARY_FILE,
    TUNE_DIR,
    TuneResult,
    run_tune,
)

__all__ = [
    "BEST_FILE",
    "DEFAULT_SPACE",
    "LEADERBOARD_FILE",
    "SUMMARY_FILE",
    "TUNE_DIR",
    "Param",
    "TuneResult",
    "load_space",
    "parse_space",
    "run_tune",
]
