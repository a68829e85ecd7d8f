"""census-scvi: train scVI on a CELLxGENE Census, embed every cell, map your data, evaluate."""

from __future__ import annotations

from census_scvi._errors import CensusScviError
from census_scvi.config import Config, load_config

__version__ = "0.1.0"

__all__ = ["CensusScviError", "Config", "__version__", "load_config"]
