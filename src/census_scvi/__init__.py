"""census-scvi: train scVI on a CELLxGENE Census, embed every cell, map your data, evaluate."""

from __future__ import annotations

from census_scvi.config import Config, load_config
from census_scvi.errors import CensusScviError

__version__ = "0.1.0"

__all__ = ["CensusScviError", "Config", "__version__", "load_config"]
