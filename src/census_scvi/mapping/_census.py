"""The reference census of a map: the one the run embedded, checked against its fingerprint.

The embed manifest (``RUN_DIR/embed/manifest.json``) records the census it read (an absolute
``uri`` or a Census ``version``) and a fingerprint (the embed stage's ``_census.py``): obs cell
count, number and sha256 of the embedded soma_joinids, and identifying obs values of a few
embedded cells. ``map`` opens that census, never the one ``config.yaml`` resolves to today (whose
``{cache}`` is the current user's), and never builds a demo census; a census that does not match
the fingerprint is refused with one line. ``--set census.uri=PATH`` (or ``census.version=``)
names a moved copy; it must match the fingerprint too.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import numpy as np
import numpy.typing as npt

from census_scvi.constants import EMBED_DIR, MANIFEST_FILE, SOMA_JOINID
from census_scvi.errors import CensusScviError

if TYPE_CHECKING:
    import tiledbsoma as soma

    from census_scvi.config import Config

__all__ = ["EmbeddedCensus", "embedded_census", "open_reference"]

logger = logging.getLogger(__name__)

_CENSUS_KEYS = ("census.uri", "census.version")


@dataclass(frozen=True)
class EmbeddedCensus:
    """Where the run's embedded cells came from (the embed manifest's ``census`` entry)."""

    uri: str | None
    version: str | None
    organism: str
    record: dict[str, Any]

    def name(self) -> str:
        """The URI, or ``census_version:<version>``."""
        return self.uri if self.uri is not None else f"census_version:{self.version}"


def embedded_census(run_dir: Path, config: Config, overrides: Sequence[str]) -> EmbeddedCensus:
    """The census the run embedded, from its embed manifest (``--set census.*`` wins).

    Raises
    ------
    CensusScviError
        When embed has not finished (no manifest), or the manifest names no census.
    """
    path = Path(run_dir) / EMBED_DIR / MANIFEST_FILE
    record = _manifest_census(path)
    organism = str(record.get("organism") or config.census.organism)
    if _overridden(overrides):
        uri = config.census_uri()
        logger.info("map: reading the census named by --set (%s)", uri or config.census.version)
        return EmbeddedCensus(uri, None if uri else config.census.version, organism, record)
    uri, version = record.get("uri"), record.get("version")
    if not uri and not version:
        msg = f"{path} names no census (uri or version)"
        raise CensusScviError(msg, hint="rerun 'census-scvi embed --force' for this run")
    return EmbeddedCensus(uri or None, None if uri else str(version), organism, record)


def _manifest_census(path: Path) -> dict[str, Any]:
    import json

    if not path.is_file():
        msg = f"{path} is missing: embed has not finished in this run directory"
        raise CensusScviError(
            msg, hint="run 'census-scvi embed' (or 'embed --merge' after shards) first"
        )
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        msg = f"cannot read {path}: {e}"
        raise CensusScviError(msg, hint="rerun 'census-scvi embed --force'") from None
    record = data.get("census") if isinstance(data, dict) else None
    return dict(record) if isinstance(record, dict) else {}


def _overridden(overrides: Sequence[str]) -> bool:
    return any(o.split("=", 1)[0].strip() in _CENSUS_KEYS for o in overrides)


@contextlib.contextmanager
def open_reference(
    census: EmbeddedCensus, config: Config, joinids: npt.NDArray[np.int64]
) -> Iterator[soma.Experiment]:
    """Open the embedded census (no demo census is ever built) and check its fingerprint.

    Yields the experiment; the census is closed on exit.
    """
    from census_scvi.soma import get_experiment, open_census, open_census_uri

    if census.uri is not None:
        if "://" not in census.uri and not Path(census.uri).exists():
            msg = f"the census this run embedded, {census.uri}, does not exist"
            raise CensusScviError(
                msg, hint="if it moved, pass --set census.uri=NEW_PATH (it is checked)"
            )
        ctx: Any = contextlib.closing(open_census_uri(census.uri))
    else:
        cfg = config.model_copy(
            update={
                "census": config.census.model_copy(
                    update={"uri": None, "version": census.version, "demo": None}
                )
            }
        )
        ctx = open_census(cfg)
    with ctx as opened:
        experiment = get_experiment(opened, census.organism)
        check_fingerprint(census, experiment, joinids)
        yield experiment


def check_fingerprint(
    census: EmbeddedCensus, experiment: soma.Experiment, joinids: npt.NDArray[np.int64]
) -> None:
    """Refuse a census (or embedding rows) that differ from what the embed manifest recorded."""
    rec = census.record
    if "obs_count" not in rec:
        logger.warning(
            "map: the embed manifest has no census fingerprint (embedded by an older "
            "census-scvi); %s is used unchecked ('census-scvi embed --force' records one)",
            census.name(),
        )
        return
    where = census.name()
    n_obs = int(experiment.obs.count)
    if n_obs != int(rec["obs_count"]):
        _mismatch(
            where, f"its obs has {n_obs:,} cells, the embedded census had {rec['obs_count']:,}"
        )
    if len(joinids) != int(rec["n_cells"]) or _sha256(joinids) != rec.get("joinids_sha256"):
        msg = (
            f"embed/latent-idx.npy ({len(joinids):,} rows) is not the embedding the manifest "
            f"recorded ({int(rec['n_cells']):,} cells)"
        )
        raise CensusScviError(msg, hint="rerun 'census-scvi embed --force'")
    _check_sample(where, experiment, rec.get("obs_sample") or {})


def _check_sample(where: str, experiment: soma.Experiment, sample: dict[str, list[str]]) -> None:
    from census_scvi.soma import read_obs

    ids = np.asarray([int(j) for j in sample.get(SOMA_JOINID, [])], dtype=np.int64)
    columns = [c for c in sample if c != SOMA_JOINID]
    if ids.size == 0:
        return
    missing = [c for c in columns if c not in set(experiment.obs.keys())]
    if missing:
        _mismatch(where, f"its obs lacks the column(s) {missing} the embedded census had")
    if int(ids.max()) >= int(experiment.obs.count):
        _mismatch(where, "it lacks some embedded soma_joinids")
    obs = read_obs(experiment, ids, columns)
    for c in columns:
        now = [str(v) for v in obs[c].astype(str).to_numpy()]
        for j, a, b in zip(ids, now, sample[c], strict=True):
            if a != b:
                _mismatch(where, f"cell {int(j)} has {c}={a!r}, the embedded census had {b!r}")


def _sha256(joinids: npt.NDArray[np.int64]) -> str:
    data = np.ascontiguousarray(np.asarray(joinids, dtype="<i8"))
    return hashlib.sha256(data.tobytes()).hexdigest()


def _mismatch(where: str, what: str) -> NoReturn:
    msg = f"the census at {where} is not the one this run embedded: {what}"
    raise CensusScviError(
        msg,
        hint="map with the census the run embedded (--set census.uri=PATH), or re-embed "
        "('census-scvi embed --force')",
    )
