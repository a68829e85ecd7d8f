"""build-census: a Census-shaped SOMA census from h5ad files."""

from census_scvi.build._stage import (
    BuildResult,
    DatasetReport,
    build_census,
)

__all__ = [
    "BuildResult",
    "DatasetReport",
    "build_census",
]
