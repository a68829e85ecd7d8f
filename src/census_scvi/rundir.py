"""Run-directory plumbing: atomic writes, manifests, skip/force decisions.

Every artifact is written under a temporary name in the same folder and renamed when complete,
so a reader never sees a half-written file; a stage is finished when its ``manifest.json`` exists.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from census_scvi.constants import (
    CONFIG_FILE,
    EMBED_DIR,
    LATENT_FILE,
    LATENT_IDX_FILE,
    MANIFEST_FILE,
    TRAIN_DIR,
)
from census_scvi.errors import CensusScviError

if TYPE_CHECKING:
    import pandas as pd

    from census_scvi.config import Config

__all__ = [
    "Manifest",
    "StageRun",
    "StageTimer",
    "atomic_path",
    "clean_stale_temporaries",
    "file_hash",
    "hold_lock",
    "load_embedding",
    "model_dir",
    "is_global_zero",
    "output_hashes",
    "output_sizes",
    "package_versions",
    "peak_rss_bytes",
    "pid_alive",
    "read_manifest",
    "read_table",
    "remove_within",
    "run_stage",
    "stage_dir",
    "tree_bytes",
    "write_json_atomic",
    "write_manifest",
    "write_run_config",
]

logger = logging.getLogger(__name__)

_VERSIONED = (
    "census-scvi",
    "scvi-tools",
    "torch",
    "lightning",
    "tiledbsoma",
    "tiledbsoma-ml",
    "cellxgene-census",
    "anndata",
    "scanpy",
    "numpy",
)


def package_versions() -> dict[str, str]:
    """Versions of the packages that decide a run's results."""
    out = {}
    for name in _VERSIONED:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (Linux/macOS)."""
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path next to ``final``; rename it onto ``final`` when the block succeeds.

    Works for files and folders. On error the temporary is removed and ``final`` is untouched.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    _remove(tmp)
    try:
        yield tmp
    except BaseException:
        _remove(tmp)
        raise
    _remove(final)
    tmp.replace(final)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def write_json_atomic(path: str | os.PathLike[str], data: Any) -> None:
    """Write JSON under a temporary name, then rename."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


def file_hash(path: str | os.PathLike[str], *, max_bytes: int | None = None) -> str:
    """sha256 of a file, or of a folder's file names, sizes and mtimes (cheap for big trees)."""
    path = Path(path)
    h = hashlib.sha256()
    if path.is_dir():
        for p in sorted(path.rglob("*")):
            if p.is_file():
                st = p.stat()
                h.update(f"{p.relative_to(path)}:{st.st_size}:{st.st_mtime_ns}\n".encode())
        return h.hexdigest()[:16]
    read = 0
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
            read += len(chunk)
            if max_bytes is not None and read >= max_bytes:
                h.update(str(path.stat().st_size).encode())
                break
    return h.hexdigest()[:16]


def stage_dir(run_dir: str | os.PathLike[str], stage: str) -> Path:
    """``RUN_DIR/<stage>``, created."""
    d = Path(run_dir) / stage
    d.mkdir(parents=True, exist_ok=True)
    return d


def write_run_config(run_dir: str | os.PathLike[str], config_yaml: str) -> None:
    """Write the resolved config into the run directory."""
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    with atomic_path(Path(run_dir) / CONFIG_FILE) as tmp:
        tmp.write_text(config_yaml)


@dataclass
class Manifest:
    """What a finished stage records (``<stage>/manifest.json``)."""

    stage: str
    config_hash: str
    inputs: dict[str, str] = field(default_factory=dict)
    census: dict[str, Any] = field(default_factory=dict)
    figures: dict[str, Any] = field(default_factory=dict)
    outputs: dict[str, str] = field(default_factory=dict)
    started: str = ""
    finished: str = ""
    versions: dict[str, str] = field(default_factory=package_versions)

    def to_dict(self) -> dict[str, Any]:
        return {
            "stage": self.stage,
            "started": self.started,
            "finished": self.finished,
            "config_hash": self.config_hash,
            "inputs": self.inputs,
            "census": self.census,
            "figures": self.figures,
            "outputs": self.outputs,
            "versions": self.versions,
        }

    def matches(self, other: Mapping[str, Any] | None) -> bool:
        """Same stage, config and inputs as a manifest read from disk."""
        if not other:
            return False
        return (
            other.get("stage") == self.stage
            and other.get("config_hash") == self.config_hash
            and other.get("inputs") == self.inputs
        )


def read_manifest(directory: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The manifest in ``directory``, or None when the stage has not finished."""
    p = Path(directory) / MANIFEST_FILE
    if not p.is_file():
        return None
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError:
        logger.warning("ignoring unreadable manifest %s", p)
        return None


def write_manifest(directory: str | os.PathLike[str], manifest: Manifest) -> Path:
    """Write ``manifest.json`` last: its presence marks the stage finished."""
    if not manifest.finished:
        manifest.finished = _now()
    p = Path(directory) / MANIFEST_FILE
    write_json_atomic(p, manifest.to_dict())
    return p


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


class StageTimer:
    """Wall time of a stage, with ISO start/end stamps."""

    def __init__(self) -> None:
        self.started = _now()
        self._t0 = time.perf_counter()

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self._t0


def refuse_overwrite(path: Path, *, force: bool, what: str) -> None:
    """Refuse to overwrite a finished artifact unless ``force``."""
    if path.exists() and not force:
        msg = f"{what} already exists at {path}"
        raise CensusScviError(msg, hint="pass --force to overwrite it")


# ----------------------------------------------------------------------------------------------
# identity of inputs
# ----------------------------------------------------------------------------------------------
def is_global_zero() -> bool:
    """False in a process that a launcher (Lightning, torchrun, SLURM) started as another rank."""
    for var in ("RANK", "SLURM_PROCID", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK"):
        try:
            if int(os.environ.get(var, "0") or 0) != 0:
                return False
        except ValueError:
            continue
    return True


def output_sizes(run_dir: Path, paths: Mapping[str, Path]) -> dict[str, int]:
    """Bytes of each output (a folder: the sum of its files), keyed by path relative to run_dir."""
    out = {}
    for path in paths.values():
        if path.is_dir():
            size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
        else:
            size = path.stat().st_size
        out[str(path.relative_to(run_dir))] = int(size)
    return out


#: Output files up to this size also get a content hash in the manifest, so a corrupt file of
#: the right size (a bad copy, a disk error) redoes its stage too; bigger ones (latents,
#: h5ads) are checked by size only: hashing 100 GB at every ``run`` would take minutes.
HASH_MAX_BYTES = 64 * 2**20


def output_hashes(run_dir: Path, paths: Mapping[str, Path]) -> dict[str, str]:
    """sha256 prefix of each output file up to :data:`HASH_MAX_BYTES`, keyed as output_sizes."""
    return {
        str(p.relative_to(run_dir)): file_hash(p)
        for p in paths.values()
        if p.is_file() and p.stat().st_size <= HASH_MAX_BYTES
    }


def _outputs_intact(
    run_dir: Path, recorded: Mapping[str, Any] | None, hashes: Mapping[str, str] | None = None
) -> bool:
    """Every output the manifest recorded is still there (files: same size, same hash if small)."""
    for rel, size in (recorded or {}).items():
        path = run_dir / rel
        if not path.exists():
            logger.info("%s is missing; redoing its stage", path)
            return False
        if path.is_dir():
            # a folder (a SOMA array, a saved model) is checked for presence only: later stages
            # legitimately add to it (the index records itself in embedding.soma's metadata)
            continue
        now = output_sizes(run_dir, {rel: path})[rel]
        if now != size:
            logger.info("%s changed size (%d -> %d bytes); redoing its stage", path, size, now)
            return False
    for rel, digest in (hashes or {}).items():
        path = run_dir / rel
        if path.is_file() and file_hash(path) != digest:
            logger.info("%s changed content (its hash differs); redoing its stage", path)
            return False
    return True


# ----------------------------------------------------------------------------------------------
# the bookkeeping every stage shares
# ----------------------------------------------------------------------------------------------
@dataclass
class StageRun:
    """One stage's run as :func:`run_stage` sees it.

    ``skipped`` is True when a finished run with the same config and inputs is on disk (then
    ``previous`` is its manifest and the stage returns at once). Otherwise the stage does its
    work, calls :meth:`record` with its figures and outputs, and ``run_stage`` writes the
    manifest last.
    """

    run_dir: Path
    dir: Path
    manifest: Manifest
    previous: dict[str, Any] | None
    skipped: bool
    timer: StageTimer = field(default_factory=StageTimer)
    _paths: dict[str, Path] = field(default_factory=dict)
    _extra: dict[str, Any] = field(default_factory=dict)
    _recorded: bool = False

    @property
    def figures(self) -> dict[str, Any]:
        """The previous run's figures when skipped, else this run's (after :meth:`record`)."""
        if self.skipped:
            return dict((self.previous or {}).get("figures", {}))
        return self.manifest.figures

    def record(
        self,
        *,
        figures: Mapping[str, Any],
        outputs: Mapping[str, Path],
        census: Mapping[str, Any] | None = None,
        listed: Mapping[str, str] | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        """What the manifest will say: figures, the output paths, the census read.

        ``outputs`` are checked for existence and their sizes recorded (``files``), so a rerun
        redoes the stage when one goes missing; ``listed`` overrides how they are listed under
        ``outputs`` (default: the path relative to the run directory). ``extra`` adds top-level
        fields (e.g. the resolved config).
        """
        missing = [str(p) for p in outputs.values() if not p.exists()]
        if missing:
            msg = f"{self.manifest.stage}: outputs missing after the run: {', '.join(missing)}"
            raise CensusScviError(msg, hint="this is a bug; please report it with --debug")
        self.manifest.figures = dict(figures)
        self.manifest.outputs = (
            dict(listed)
            if listed is not None
            else {k: str(p.relative_to(self.run_dir)) for k, p in outputs.items()}
        )
        if census is not None:
            self.manifest.census = dict(census)
        self._paths = dict(outputs)
        self._extra = dict(extra or {})
        self._recorded = True


@contextlib.contextmanager
def run_stage(
    run_dir: str | os.PathLike[str],
    stage: str,
    *,
    config: Config,
    sections: Iterable[str],
    inputs: Mapping[str, str],
    force: bool = False,
    write_config: bool = True,
    lock: str | None = None,
) -> Iterator[StageRun]:
    """The bookkeeping of one stage: skip if current, else run and write the manifest last.

    Parameters
    ----------
    run_dir
        The run directory; the stage works in ``run_dir/<stage>``.
    stage
        The stage's name (its folder).
    config
        The resolved config; written to ``run_dir/config.yaml`` when the stage runs.
    sections
        The config sections whose hash identifies this stage's run.
    inputs
        The stage's inputs (census fingerprint, upstream model hash, ...): a change redoes it.
    force
        Redo the stage even when its manifest matches.
    write_config
        Write the resolved config (off for worker ranks).
    lock
        Name of the lock file in the stage folder that makes this process its only writer
        (:func:`hold_lock`; e.g. ``STAGE_LOCK``, or one per embed shard); None takes no lock.
        Holding it, temporaries of killed earlier runs are removed.

    Yields
    ------
    A :class:`StageRun`. When it is ``skipped`` the caller returns its cached result; otherwise
    the caller does the work and calls ``record``; the manifest is written when the block ends
    without an error (never on error, so an interrupted stage is redone).
    """

    from census_scvi._allocators import use_lean_allocators

    use_lean_allocators()
    run_dir = Path(run_dir)
    sdir = stage_dir(run_dir, stage)
    with contextlib.ExitStack() as stack:
        if lock is not None:
            stack.enter_context(hold_lock(sdir / lock, what=f"{sdir}"))
            clean_stale_temporaries(sdir)
        yield from _stage_run(run_dir, sdir, stage, config, sections, inputs, force, write_config)


def _stage_run(
    run_dir: Path,
    sdir: Path,
    stage: str,
    config: Config,
    sections: Iterable[str],
    inputs: Mapping[str, str],
    force: bool,
    write_config: bool,
) -> Iterator[StageRun]:
    from census_scvi.config import config_hash, dump_config

    manifest = Manifest(stage=stage, config_hash=config_hash(config, sections=sections))
    manifest.inputs = dict(inputs)
    previous = read_manifest(sdir)
    current = (
        not force
        and manifest.matches(previous)
        and previous is not None
        and _outputs_intact(run_dir, previous.get("files"), previous.get("hashes"))
    )
    run = StageRun(run_dir, sdir, manifest, previous, skipped=current)
    if current:
        logger.info("%s: manifest matches config and inputs; skipping (--force redoes it)", stage)
        yield run
        return
    if previous is not None and not force:
        logger.info("%s: config, inputs or outputs changed since the last run; redoing it", stage)
    (sdir / MANIFEST_FILE).unlink(missing_ok=True)
    if write_config:
        write_run_config(run_dir, dump_config(config))
    manifest.started = run.timer.started
    yield run
    if not run._recorded:
        return  # a worker rank or a partial run (an embed shard): no manifest
    data = manifest.to_dict()
    data["files"] = output_sizes(run_dir, run._paths)
    data["hashes"] = output_hashes(run_dir, run._paths)
    data.update(run._extra)
    manifest.finished = _now()
    data["finished"] = manifest.finished
    write_json_atomic(sdir / MANIFEST_FILE, data)


# ----------------------------------------------------------------------------------------------
# reading what earlier stages wrote
# ----------------------------------------------------------------------------------------------
def read_table(path: Path, *, stage: str, columns: list[str] | None = None) -> pd.DataFrame:
    """A parquet table ``stage`` wrote; a truncated or corrupt one is one line with the fix."""
    import pandas as pd
    import pyarrow as pa

    try:
        return pd.read_parquet(path, columns=columns)
    except (OSError, ValueError, pa.ArrowException) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        msg = f"{path} is not a readable parquet table ({first}): truncated or corrupt"
        hint = (
            f"'census-scvi run' redoes {stage} (its manifest records the file's hash), "
            f"or run 'census-scvi {stage} --force'"
        )
        raise CensusScviError(msg, hint=hint) from None


def model_dir(run_dir: Path, filename: str) -> Path:
    """``RUN_DIR/train/<model.filename>``, or a clear error when training has not run."""
    path = Path(run_dir) / TRAIN_DIR / filename
    if not (path / "model.pt").is_file():
        msg = f"no trained model at {path}"
        raise CensusScviError(msg, hint="run 'census-scvi train' (or 'census-scvi run') first")
    return path


def load_embedding(run_dir: Path) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
    """The embedded cells: latent (memory-mapped, n_cells x n_latent) and their soma_joinids."""
    d = Path(run_dir) / EMBED_DIR
    lat, idx = d / LATENT_FILE, d / LATENT_IDX_FILE
    for p in (lat, idx):
        if not p.is_file():
            msg = f"embedding file missing: {p}"
            raise CensusScviError(msg, hint="run 'census-scvi embed' (or 'census-scvi run') first")
    latent = np.load(lat, mmap_mode="r")
    joinids = np.load(idx).astype(np.int64, copy=False)
    if latent.ndim != 2 or latent.shape[0] != joinids.shape[0]:
        msg = f"{lat} has shape {latent.shape} but {idx} has {joinids.shape[0]} rows"
        raise CensusScviError(msg, hint="re-run 'census-scvi embed --force'")
    return latent, joinids


# ----------------------------------------------------------------------------------------------
# one writer at a time, and what killed writers left behind
# ----------------------------------------------------------------------------------------------
#: Temporary names this package writes: ``.<name>.tmp-PID`` (atomic_path) and build-census's
#: ``.<name>.staging-PID`` / ``.<name>.old-PID`` folders.
_TEMPORARY = re.compile(r"^\..+\.(?:tmp|staging|old)-(\d+)$")


def pid_alive(pid: int) -> bool:
    """Whether a process with this PID lives on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def tree_bytes(path: Path) -> int:
    """Bytes of a file, or of every file below a folder (links not followed)."""
    if path.is_dir() and not path.is_symlink():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())
    return path.lstat().st_size


def remove_within(path: Path, root: Path) -> None:
    """Remove ``path`` (file or folder), which must lie inside ``root``; anything else is a bug."""
    path, root = Path(path), Path(root)
    inside = path.resolve().is_relative_to(root.resolve()) and path.resolve() != root.resolve()
    if not inside:
        msg = f"refusing to remove {path}: it is not inside {root}"
        raise CensusScviError(msg, hint="this is a bug; please report it with --debug")
    _remove(path)


def clean_stale_temporaries(directory: Path) -> int:
    """Remove temporaries in ``directory`` whose writer process is dead; returns bytes freed.

    Only names this package writes (``.X.tmp-PID``, ``.X.staging-PID``, ``.X.old-PID``) whose PID
    is not a live process on this host are removed, and only inside ``directory``.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return 0
    freed, names = 0, []
    for p in directory.iterdir():
        m = _TEMPORARY.match(p.name)
        if m is None or int(m.group(1)) == os.getpid() or pid_alive(int(m.group(1))):
            continue
        freed += tree_bytes(p)
        names.append(p.name)
        remove_within(p, directory)
    if names:
        logger.warning(
            "removed %d temporar%s left by killed runs in %s (%s freed): %s",
            len(names),
            "y" if len(names) == 1 else "ies",
            directory,
            _human_bytes(freed),
            ", ".join(sorted(names)),
        )
    return freed


def _human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return f"{n} B"  # pragma: no cover


@contextlib.contextmanager
def hold_lock(path: str | os.PathLike[str], *, what: str) -> Iterator[None]:
    """Be the only writer of ``what`` while the block runs (a lock file at ``path``).

    The lock file records PID, host and start time. Another live holder: fails at once with one
    line naming it. A holder on this host whose process is dead: taken over with a warning. A
    holder on another host cannot be checked: refused, naming the file to remove if it is gone.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    me = {"pid": os.getpid(), "host": socket.gethostname(), "since": _now()}
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            _break_or_refuse(path, what)
            continue
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        break
    else:  # pragma: no cover - three takeovers raced away
        msg = f"could not take the lock {path} for {what}"
        raise CensusScviError(msg, hint="another process keeps taking it; retry")
    try:
        yield
    finally:
        with contextlib.suppress(OSError, ValueError):
            if json.loads(path.read_text()).get("pid") == me["pid"]:
                path.unlink()


def _break_or_refuse(path: Path, what: str) -> None:
    try:
        holder = json.loads(path.read_text())
        pid, host, since = int(holder["pid"]), str(holder["host"]), str(holder["since"])
    except (OSError, ValueError, KeyError, TypeError):
        holder = None
    if holder is None:  # half-written by a writer that died at once, or unreadable
        age = time.time() - path.stat().st_mtime if path.exists() else 0.0
        if age < 5:
            time.sleep(0.2)
            return
        logger.warning("taking over unreadable lock %s", path)
        path.unlink(missing_ok=True)
        return
    if host == socket.gethostname() and not pid_alive(pid):
        logger.warning(
            "taking over the lock of %s from PID %d (host %s, since %s): that process is gone",
            what,
            pid,
            host,
            since,
        )
        path.unlink(missing_ok=True)
        return
    msg = f"{what} is in use by PID {pid} on {host} since {since} (lock {path})"
    hint = (
        "wait for it to finish"
        if host == socket.gethostname()
        else f"wait for it; if that process is gone, remove {path}"
    )
    raise CensusScviError(msg, hint=hint)
