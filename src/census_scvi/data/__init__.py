"""Shared data plumbing: opening a census, batch labels, HVGs, data modules, the mini census."""

from __future__ import annotations

from census_scvi.data._census import experiment_name, get_experiment, open_census, open_census_uri

__all__ = ["experiment_name", "get_experiment", "open_census", "open_census_uri"]
