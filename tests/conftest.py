"""Shared fixtures: tiny real objects on disk, no network."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
SHARED_DATA = SHARED / "data"
SEED_CONFIG = Path(__file__).resolve().parent / "fixtures" / "seed-scvi-config.yaml"

MINI_CELLS = 3000
MINI_GENES = 1000


@pytest.fixture(scope="session")
def mini_census_result(tmp_path_factory: pytest.TempPathFactory):
    """The mini census generator's result for a small census (3000 human cells x 1000 genes)."""
    from census_scvi.demo import make_mini_census

    path = tmp_path_factory.mktemp("census") / "mini"
    return make_mini_census(path, n_cells=MINI_CELLS, n_genes=MINI_GENES, seed=0)


@pytest.fixture(scope="session")
def mini_census(mini_census_result) -> str:
    """Path (str) of a small mini census; treat it as read-only."""
    return str(mini_census_result.path)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch):
    """Never touch the user's cache: the demo config's census goes to a temporary folder."""
    monkeypatch.setenv("CENSUS_SCVI_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


def shared_data(name: str) -> Path:
    """A file of ../shared/data, or skip the test when it is absent."""
    p = SHARED_DATA / name
    if not p.is_file():
        pytest.skip(f"{p} not present (../shared/data is optional)")
    return p


@pytest.fixture
def shared_file():
    """``shared_file("x.h5ad")`` -> Path in ../shared/data, skipping the test when absent."""
    return shared_data


@pytest.fixture(autouse=True)
def _census_scvi_logs_reach_caplog():
    """The CLI (run in-process by CliRunner) points our logger at stderr and stops propagation;
    undo that before each test so ``caplog`` sees the package's log records, and after it, so
    that the next module's fixtures do not log to a CliRunner stream closed since."""
    import logging

    def reset() -> None:
        log = logging.getLogger("census_scvi")
        log.handlers[:] = []
        log.propagate = True
        log.setLevel(logging.NOTSET)

    reset()
    yield
    reset()
