"""The mini census: a Census-shaped SOMA census with Splatter-style counts."""

from census_scvi.demo._stage import (
    MiniCensusResult,
    OrganismSummary,
    make_mini_census,
)

__all__ = [
    "MiniCensusResult",
    "OrganismSummary",
    "make_mini_census",
]
