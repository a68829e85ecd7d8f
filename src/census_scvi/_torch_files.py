"""Reading ``torch.save`` files without running them: the allow-list of a model file's globals,
a static scan of the pickle, torch's restricted ``weights_only`` unpickler.

``torch.load(weights_only=False)`` (what scvi-tools and Lightning call) runs any pickled object in
the file, so a model or checkpoint from someone else would be code. :func:`verify_torch_file`
reads a file once and checks it unpickles to data only; :func:`load_torch_bytes` unpickles the
verified bytes (never the path again, which may have changed since). Re-exported by
:mod:`census_scvi.scvi_model`, which adds the scvi-tools side (the registry, loading a model).
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

import numpy as np

from census_scvi.errors import CensusScviError

__all__ = [
    "load_torch_bytes",
    "model_file_globals",
    "read_bytes",
    "refuse",
    "verify_torch_file",
]

# the numpy dtypes a model's arrays may have (their classes are rebuilt by name when unpickled)
_DTYPE_CLASSES = (
    "BoolDType", "Int8DType", "Int16DType", "Int32DType", "Int64DType", "UInt8DType",
    "UInt16DType", "UInt32DType", "UInt64DType", "Float16DType", "Float32DType", "Float64DType",
    "ObjectDType", "StrDType", "BytesDType",
)  # fmt: skip
_DEFAULTDICT = "collections.defaultdict"
_DEFAULT_FACTORIES = (dict, list, set, int)


def model_file_globals() -> list[Any]:
    """What an scvi-tools ``model.pt`` may hold besides tensors (torch's own defaults).

    Measured with ``torch.serialization.get_unsafe_globals_in_checkpoint`` on models saved by
    scvi-tools 1.4 (``synthetic_iid`` and census-scvi's train stage, memory and stream modes):
    builtins ``dict``/``bytes``/``slice``, ``collections.defaultdict`` (the registry's
    ``field_registries``), numpy arrays (``ndarray``, ``dtype``, ``_reconstruct``; the dtype
    classes are rebuilt by name while unpickling, so the data dtypes are listed too) and the
    pandas frames of the training history (``DataFrame``, ``BlockManager``, ``_unpickle_block``,
    ``Index``, ``_new_Index``). ``numpy.core.multiarray._reconstruct`` is numpy 1's name for the
    same function, for models saved under numpy 1.

    Returns
    -------
    A list for ``torch.serialization.safe_globals`` (objects, or ``(object, name)`` pairs).
    """
    import collections

    import numpy.dtypes
    import pandas as pd
    from pandas._libs.internals import _unpickle_block
    from pandas.core.indexes.base import _new_Index
    from pandas.core.internals.managers import BlockManager

    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # pragma: no cover - numpy 1
        from numpy.core.multiarray import _reconstruct  # type: ignore[no-redef]
    dtypes = [getattr(numpy.dtypes, n) for n in _DTYPE_CLASSES if hasattr(numpy.dtypes, n)]
    return [
        dict,
        bytes,
        slice,
        collections.defaultdict,
        np.ndarray,
        np.dtype,
        _reconstruct,
        (_reconstruct, "numpy.core.multiarray._reconstruct"),
        *dtypes,
        pd.DataFrame,
        pd.Index,
        _new_Index,
        BlockManager,
        _unpickle_block,
    ]


def _global_name(g: Any) -> str:
    return g[1] if isinstance(g, tuple) else f"{g.__module__}.{g.__qualname__}"


def verify_torch_file(path: str | os.PathLike[str], *, allowed: Sequence[Any]) -> bytes:
    """Read a ``torch.save`` file once and check that it unpickles to data only.

    Parameters
    ----------
    path
        The file (``model.pt``, a Lightning ``last.ckpt``).
    allowed
        The globals (classes, functions) the file may name besides torch's ``weights_only``
        defaults, as ``torch.serialization.safe_globals`` takes them; e.g.
        :func:`model_file_globals`.

    Returns
    -------
    The file's bytes, verified: load them with :func:`load_torch_bytes` (never the path again,
    which may have changed since).

    Raises
    ------
    CensusScviError
        When the file cannot be read, is not a ``torch.save`` file, or names anything outside
        ``allowed`` (the message names the file and the types).
    """
    path = Path(path)
    data = read_bytes(path)
    load_torch_bytes(data, allowed=allowed, source=path)
    return data


def read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        msg = f"cannot read {path}: {e.strerror or e}"
        raise CensusScviError(msg, hint="check the path (a model folder holds model.pt)") from None


def load_torch_bytes(
    data: bytes, *, allowed: Sequence[Any], source: str | os.PathLike[str], map_location: Any = None
) -> Any:
    """Unpickle ``torch.save`` bytes with torch's restricted unpickler, ``allowed`` added.

    A static scan first names every global outside the allow-list (the clearest refusal); the
    ``weights_only`` unpickler then refuses anything the scan cannot see (objects built on the
    way). ``collections.defaultdict`` is rebuilt as a plain dict (torch's unpickler fills dicts
    only) and turned back into a defaultdict afterwards.
    """
    import pickle

    import torch

    made: list[tuple[dict[Any, Any], Any]] = []

    def defaultdict_as_dict(factory: Any = None) -> dict[Any, Any]:
        if factory is not None and factory not in _DEFAULT_FACTORIES:
            msg = f"defaultdict with factory {factory!r}"
            raise pickle.UnpicklingError(msg)
        d: dict[Any, Any] = {}
        made.append((d, factory))
        return d

    safe = [
        (defaultdict_as_dict, _DEFAULTDICT) if _global_name(g) == _DEFAULTDICT else g
        for g in allowed
    ]
    try:
        with torch.serialization.safe_globals(safe):
            unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(io.BytesIO(data))
            if unsafe:
                refuse(source, f"holds {', '.join(sorted(unsafe))}")
            obj = torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, ValueError, EOFError, TypeError) as e:
        reason = _reason(e)
        if reason == _NOT_TORCH:
            msg = f"cannot load {source}: it {reason} (truncated or corrupt)"
            hint = (
                "if this run trained it, 'census-scvi run' retrains (its manifest records the "
                "model's size and hash), or pass --force to 'census-scvi train'"
            )
            raise CensusScviError(msg, hint=hint) from None
        refuse(source, reason)
    return _restore_defaultdicts(obj, {id(d): f for d, f in made}) if made else obj


_NOT_TORCH = "is not a torch.save file"


def refuse(source: str | os.PathLike[str], what: str) -> NoReturn:
    msg = f"refusing to load {source}: it {what}, not only a model's data"
    raise CensusScviError(
        msg, hint="load only models saved by scvi-tools or census-scvi, from a source you trust"
    ) from None


def _reason(e: Exception) -> str:
    """One line from torch's many-line unpickling error."""
    text = str(e)
    if "Expected input to be a checkpoint" in text or "zip archive" in text:
        return _NOT_TORCH
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for i, line in enumerate(lines):
        if line.startswith("WeightsUnpickler error") and i + 1 < len(lines):
            return f"cannot be unpickled as data ({lines[i + 1]})"
    return f"cannot be unpickled as data ({lines[0] if lines else type(e).__name__})"


def _restore_defaultdicts(obj: Any, factories: dict[int, Any]) -> Any:
    import collections

    if isinstance(obj, dict):
        for k, v in obj.items():
            obj[k] = _restore_defaultdicts(v, factories)
        return collections.defaultdict(factories[id(obj)], obj) if id(obj) in factories else obj
    if isinstance(obj, list):
        obj[:] = [_restore_defaultdicts(v, factories) for v in obj]
    elif isinstance(obj, tuple):
        return tuple(_restore_defaultdicts(v, factories) for v in obj)
    return obj
