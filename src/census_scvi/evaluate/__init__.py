"""Evaluate stage: scib-metrics beside a PCA baseline, classifiers, UMAP, report, model card."""

from census_scvi.evaluate._classifiers import (
    batch_mixing_accuracy,
    chance_levels,
    classifier_accuracy,
)
from census_scvi.evaluate._sample import stratified_sample
from census_scvi.evaluate._stage import EvaluateResult, run_evaluate

__all__ = [
    "EvaluateResult",
    "batch_mixing_accuracy",
    "chance_levels",
    "classifier_accuracy",
    "run_evaluate",
    "stratified_sample",
]
