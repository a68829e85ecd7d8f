"""Evaluate stage: scib-metrics beside a PCA baseline, classifiers, UMAP, report, model card."""

from census_scvi.evaluate._stage import (
    EvaluateResult,
    benchmark_embeddings,
    classifier_accuracy,
    run_evaluate,
    stratified_sample,
)

__all__ = [
    "EvaluateResult",
    "benchmark_embeddings",
    "classifier_accuracy",
    "run_evaluate",
    "stratified_sample",
]
