"""The evaluated cells: a stratified sample of the embedded cells."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from census_scvi.errors import CensusScviError
from census_scvi.soma import stratified_indices
from census_scvi.soma._obs import stratified_indices_codes

__all__ = ["stratified_sample"]


def stratified_sample(strata: npt.ArrayLike, *, n: int, seed: int = 0) -> npt.NDArray[np.int64]:
    """Positions of a sample of ``n`` rows, proportional per stratum, every stratum kept.

    The checked public face of :func:`census_scvi.soma.stratified_indices` (the one
    implementation, shared with the mapping stage's reference sample). An integer array is
    taken as stratum codes (:func:`census_scvi.soma._obs.stratified_indices_codes`: the same
    sample, in memory independent of the number of rows).

    Parameters
    ----------
    strata
        One label per row (e.g. cell type), or one integer code per row.
    n
        Sample size (> 0); all rows when there are fewer.
    seed
        Random seed.

    Returns
    -------
    Sorted row positions.

    Examples
    --------
    >>> stratified_sample(["a"] * 95 + ["b"] * 5, n=20).size
    20
    """
    if n <= 0:
        msg = f"sample size n={n} must be > 0"
        raise CensusScviError(msg, hint="set evaluate.sample_size to a positive number of cells")
    if isinstance(strata, np.ndarray) and np.issubdtype(strata.dtype, np.integer):
        return stratified_indices_codes(strata, n, seed=seed)
    return stratified_indices(strata, n, seed=seed)
