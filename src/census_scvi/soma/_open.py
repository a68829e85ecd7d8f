"""Opening a SOMA census: from ``census.uri`` (local or remote) or ``census.version`` (network)."""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from census_scvi.constants import CENSUS_DATA
from census_scvi.errors import CensusScviError

if TYPE_CHECKING:
    import tiledbsoma as soma

    from census_scvi.config import Config

__all__ = [
    "census_fingerprint",
    "ensure_demo_census",
    "experiment_name",
    "get_experiment",
    "open_census",
    "open_census_uri",
]

logger = logging.getLogger(__name__)


def experiment_name(organism: str) -> str:
    """``'Homo sapiens'`` / ``'homo_sapiens'`` -> ``'homo_sapiens'`` (as cellxgene_census does)."""
    return re.sub(r"[ ]+", "_", organism.strip()).lower()


def _soma_context(tiledb_config: dict[str, Any] | None = None) -> soma.SOMATileDBContext:
    import tiledbsoma as soma

    return soma.SOMATileDBContext(tiledb_config=tiledb_config or {})


def open_census_uri(uri: str, *, tiledb_config: dict[str, Any] | None = None) -> soma.Collection:
    """Open the SOMA collection at ``uri`` with a clear error when it is not a census."""
    import cellxgene_census
    import tiledbsoma as soma

    if "://" not in uri and not Path(uri).exists():
        msg = f"census.uri '{uri}' does not exist"
        raise CensusScviError(
            msg, hint="build one with 'census-scvi demo-data PATH' or 'census-scvi build-census'"
        )
    try:
        census = cellxgene_census.open_soma(uri=uri, context=_soma_context(tiledb_config))
    except (soma.DoesNotExistError, soma.SOMAError, ValueError) as e:
        msg = f"cannot open census.uri '{uri}' as a SOMA collection: {str(e).splitlines()[0]}"
        raise CensusScviError(msg) from None
    if CENSUS_DATA not in census:
        census.close()
        msg = f"census.uri '{uri}' has no '{CENSUS_DATA}' collection, so it is not a census"
        raise CensusScviError(msg, hint="point census.uri at the census root folder")
    return census


@contextlib.contextmanager
def open_census(
    config: Config, *, tiledb_config: dict[str, Any] | None = None
) -> Iterator[soma.Collection]:
    """Open the census a config names (``census.uri`` wins over ``census.version``).

    Parameters
    ----------
    config
        The resolved config.
    tiledb_config
        Extra TileDB settings (e.g. read buffer sizes) for the SOMA context.

    Yields
    ------
    The open top-level census collection; closed on exit.
    """
    uri = config.census_uri()
    if uri is not None:
        _ensure_demo(uri, config)
        census = open_census_uri(uri, tiledb_config=tiledb_config)
    else:
        census = _open_version(
            str(config.census.version), tiledb_config, timeout_s=config.census.timeout_s
        )
    try:
        yield census
    finally:
        census.close()


def census_fingerprint(config: Config) -> str:
    """The census a stage reads, as every stage records it in its manifest inputs.

    A local census folder is identified by its path and a hash of its files' names, sizes and
    mtimes (so a rebuilt census is a new input); a remote URI or a Census release by its name.
    """
    uri = config.census_uri()
    if uri is not None:
        _ensure_demo(uri, config)  # the fingerprint of the census as it will be read
    if uri is not None and "://" not in uri and Path(uri).exists():
        from census_scvi.rundir import file_hash

        return f"{uri}#{file_hash(uri)}"
    if uri is not None:
        return uri
    return f"census_version:{config.census.version}"


def _ensure_demo(uri: str, config: Config) -> None:
    if config.census.demo is not None and "://" not in uri and not Path(uri).exists():
        ensure_demo_census(uri, config)


def ensure_demo_census(uri: str, config: Config) -> None:
    """Build the mini census at ``uri`` (the demo config's cache folder) on first use."""
    from census_scvi.demo import make_mini_census

    demo = config.census.demo
    assert demo is not None
    logger.info("building the mini census at %s (first use; %d cells)", uri, demo.cells)
    try:
        make_mini_census(uri, n_cells=demo.cells, n_genes=demo.genes, seed=demo.seed)
    except CensusScviError:
        if not Path(uri).exists():  # another process may have built it meanwhile
            raise


def _open_version(
    version: str, tiledb_config: dict[str, Any] | None, *, timeout_s: float = 30.0
) -> soma.Collection:
    import cellxgene_census

    ms = int(timeout_s * 1000)
    bounded = {
        "vfs.s3.connect_timeout_ms": ms,
        "vfs.s3.request_timeout_ms": ms,
        **(tiledb_config or {}),
    }
    try:
        with _http_timeout(timeout_s):
            return cellxgene_census.open_soma(
                census_version=version, context=_soma_context(bounded)
            )
    except Exception as e:  # noqa: BLE001 - network, S3 and lookup errors all mean the same here
        first = (str(e).splitlines() or [type(e).__name__])[0][:160]
        msg = f"cannot open Census version '{version}' (offline, or unknown version?): {first}"
        raise CensusScviError(
            msg, hint="set census.uri to a local SOMA census (e.g. --set census.uri=PATH)"
        ) from None


class _TimedRequests:
    """``requests`` as cellxgene_census's release directory sees it, with a timeout on ``get``.

    cellxgene_census 1.18 calls ``requests.get(...)`` without a timeout, so a network that
    accepts but never answers hangs ``open_soma(census_version=...)`` forever.
    """

    def __init__(self, requests: Any, timeout_s: float) -> None:
        self._requests, self._timeout = requests, timeout_s

    def get(self, *args: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("timeout", self._timeout)
        return self._requests.get(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._requests, name)


@contextlib.contextmanager
def _http_timeout(timeout_s: float) -> Iterator[None]:
    from cellxgene_census import _release_directory as rd

    real = rd.requests
    rd.requests = _TimedRequests(real, timeout_s)  # type: ignore[assignment]
    try:
        yield
    finally:
        rd.requests = real


def get_experiment(census: soma.Collection, organism: str) -> soma.Experiment:
    """The experiment for ``organism`` (``'homo_sapiens'`` or ``'Homo sapiens'``).

    An unknown organism fails listing those present.
    """
    name = experiment_name(organism)
    data = census[CENSUS_DATA]
    if name not in data:
        present = ", ".join(sorted(data.keys())) or "none"
        msg = f"organism '{organism}' is not in this census; present: {present}"
        raise CensusScviError(msg, hint="set census.organism to one of those")
    return data[name]
