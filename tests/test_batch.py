"""Batch labels: joined obs columns, collision free with the default separator."""

from __future__ import annotations

import functools
import itertools

import numpy as np
import pandas as pd
import pytest

from census_scvi.batches import batch_codes, batch_labels
from census_scvi.config import load_config
from census_scvi.errors import CensusScviError


def _original(obs: pd.DataFrame, keys: list[str]) -> list[str]:
    """The original pipeline's label: the columns as str, glued with no separator."""
    return list(functools.reduce(lambda a, b: a + b, [obs[c].astype(str) for c in keys]))


def test_default_separator_joins_columns():
    obs = pd.DataFrame(
        {
            "dataset_id": pd.Categorical(["d1", "d1", "d2"]),
            "assay": ["10x 3' v3", "10x 5' v1", "10x 3' v3"],
            "donor_id": pd.Categorical(["x", "y", "x"], categories=["x", "y", "unused"]),
        }
    )
    labels = batch_labels(obs, ["dataset_id", "assay", "donor_id"])
    assert labels.tolist() == ["d1//10x 3' v3//x", "d1//10x 5' v1//y", "d2//10x 3' v3//x"]


def test_empty_separator_reproduces_original_labels():
    rng = np.random.default_rng(0)
    obs = pd.DataFrame(
        {
            "a": pd.Categorical(rng.choice(["ab", "a", "b/", ""], 200)),
            "b": rng.choice(["c", "bc", "/"], 200),
            "n": rng.integers(0, 3, 200),
            "flag": rng.random(200) > 0.5,
        }
    )
    keys = ["a", "b", "n", "flag"]
    assert batch_labels(obs, keys, "").tolist() == _original(obs, keys)


def test_original_labels_collide_but_default_does_not():
    obs = pd.DataFrame({"x": ["ab", "a"], "y": ["c", "bc"]})
    assert len(set(batch_labels(obs, ["x", "y"], ""))) == 1  # the original's flaw
    assert len(set(batch_labels(obs, ["x", "y"]))) == 2


@pytest.mark.parametrize("separator", ["//", "/", "-", "::", "|"])
def test_different_tuples_never_share_a_label(separator):
    # every tuple of 3 values from strings built of the separator's characters and a backslash
    alphabet = sorted({*separator, "\\", "a"})
    values = [""] + ["".join(p) for n in (1, 2, 3) for p in itertools.product(alphabet, repeat=n)]
    rng = np.random.default_rng(1)
    rows = rng.choice(len(values), size=(20_000, 3))
    obs = pd.DataFrame(
        {k: np.asarray(values, dtype=object)[rows[:, i]] for i, k in enumerate("xyz")}
    )
    labels = batch_labels(obs, ["x", "y", "z"], separator)
    tuples = pd.Series(list(map(tuple, obs.to_numpy())))
    n_tuples = tuples.nunique()
    assert len(set(labels)) == n_tuples
    # and the same tuple always gets the same label
    assert pd.DataFrame({"t": tuples, "l": labels}).groupby("t")["l"].nunique().max() == 1


def test_plain_values_are_not_escaped():
    obs = pd.DataFrame({"x": ["a b", "c'd"], "y": ["e.f", "g"]})
    assert batch_labels(obs, ["x", "y"]).tolist() == ["a b//e.f", "c'd//g"]


def test_missing_values_read_as_the_original():
    obs = pd.DataFrame({"x": pd.Categorical(["a", None]), "y": ["b", None]})
    assert batch_labels(obs, ["x", "y"], "").tolist() == _original(obs, ["x", "y"])
    assert batch_labels(obs, ["x", "y"]).tolist() == ["a//b", "nan//None"]


def test_codes_index_sorted_labels():
    obs = pd.DataFrame({"x": ["b", "a", "b", "c"], "y": [1, 2, 1, 3]})
    codes, labels = batch_codes(obs, ["x", "y"])
    assert labels.tolist() == sorted(labels.tolist()) == ["a//2", "b//1", "c//3"]
    assert codes.tolist() == [1, 0, 1, 2]
    assert codes.dtype == np.int32


def test_unknown_column_lists_valid_columns():
    obs = pd.DataFrame({"assay": ["a"], "donor_id": ["d"]})
    with pytest.raises(CensusScviError, match="'dataset' .*valid columns: assay, donor_id"):
        batch_labels(obs, ["dataset", "assay"])


def test_empty_frame():
    obs = pd.DataFrame({"x": pd.Series([], dtype=str)})
    assert batch_labels(obs, ["x"]).tolist() == []


def test_separator_with_backslash_is_rejected():
    with pytest.raises(CensusScviError, match="batch_key_separator"):
        load_config(None, overrides=["anndata.batch_key_separator=a\\b"])
