"""The search space: which config keys a tune varies, and over which values.

A space maps ``section.key`` to either a list of choices or a range::

    model:
      n_layers: [1, 2, 3]                                # choices (any YAML scalars)
      n_hidden: [64, 128, 256, 512]
    training_plan:
      lr: {low: 1.0e-4, high: 1.0e-2, log: true}          # a float range (log scale)
      n_epochs_kl_warmup: {low: 5, high: 400, log: true}  # an int range (both ends integers)

``section.key: ...`` at the top level works too. Only ``model``, ``training_plan`` and ``train``
keys can be searched: every trial shares one prepare (``census``, ``hvg``, ``anndata``), and the
evaluation must stay the same for the scores to compare. A space file replaces the default space
(:data:`DEFAULT_SPACE`) as a whole. Every choice and both ends of every range are checked with
the config's own validation, so a value the config would reject fails before any training.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import yaml

from census_scvi.config import Config, config_from_dict
from census_scvi.errors import CensusScviError

if TYPE_CHECKING:
    import optuna

__all__ = [
    "DEFAULT_SPACE",
    "SEARCHABLE_SECTIONS",
    "Param",
    "apply_params",
    "load_space",
    "parse_space",
    "searchable_keys",
]

#: The config sections a trial may vary.
SEARCHABLE_SECTIONS = ("model", "training_plan", "train")

#: Keys of those sections that are not model choices, with the reason given when named.
_NOT_SEARCHED = {
    "model.filename": "a file name, not a model choice",
    "train.seed": "tune reruns its finalists with other seeds itself",
    "train.mode": "memory and stream train the same model; the data path is not a choice",
    "train.devices": "hardware, not a model choice",
    "train.accelerator": "hardware, not a model choice",
    "train.num_nodes": "hardware, not a model choice",
    "train.strategy": "hardware, not a model choice",
    "train.multi_gpu": "hardware, not a model choice",
    "train.num_workers": "data loading, not a model choice",
    "train.checkpoint_every_n_epochs": "bookkeeping, not a model choice",
    "train.checkpoint_every_minutes": "bookkeeping, not a model choice",
    "train.fused_optimizer": "the same update computed faster, not a model choice",
}

_RANGE_KEYS = frozenset({"low", "high", "log", "step"})


@dataclass(frozen=True)
class Param:
    """One searched key: a list of ``choices``, or a ``low``..``high`` range (int or float)."""

    key: str
    choices: tuple[Any, ...] | None = None
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    integer: bool = False

    def suggest(self, trial: optuna.Trial) -> Any:
        """The value Optuna's sampler picks for this key in ``trial``."""
        if self.choices is not None:
            return trial.suggest_categorical(self.key, list(self.choices))
        assert self.low is not None and self.high is not None
        if self.integer:
            step = int(self.step) if self.step is not None else 1
            return trial.suggest_int(
                self.key, int(self.low), int(self.high), step=step, log=self.log
            )
        return trial.suggest_float(self.key, self.low, self.high, step=self.step, log=self.log)

    def describe(self) -> str:
        """``model.n_layers in [1, 2, 3]`` or ``training_plan.lr in 0.0001..0.01 (log)``."""
        if self.choices is not None:
            return f"{self.key} in {list(self.choices)}"
        extra = " (log)" if self.log else (f" (step {self.step:g})" if self.step else "")
        return f"{self.key} in {self.low:g}..{self.high:g}{extra}"

    def to_dict(self) -> dict[str, Any]:
        """As written in a space file (``{section: {key: spec}}`` leaf)."""
        if self.choices is not None:
            return {"choices": list(self.choices)}
        out: dict[str, Any] = {"low": self.low, "high": self.high}
        if self.log:
            out["log"] = True
        if self.step is not None:
            out["step"] = self.step
        return out


#: The space searched without ``--space``: the knobs issue 16 found to matter (depth, width,
#: latent size, learning rate, KL warm-up, dispersion, likelihood), spanning the seed config
#: (2x512, z50, lr 1e-4), scvi-tools' defaults (1x128, z10, lr 1e-3) and the demo values.
DEFAULT_SPACE: dict[str, dict[str, Any]] = {
    "model": {
        "n_layers": [1, 2, 3],
        "n_hidden": [64, 128, 256, 512],
        "n_latent": [10, 20, 30, 50],
        "dispersion": ["gene", "gene-batch"],
        "gene_likelihood": ["nb", "zinb"],
    },
    "training_plan": {
        "lr": {"low": 1.0e-4, "high": 1.0e-2, "log": True},
        "n_epochs_kl_warmup": [5, 20, 100, 400],
    },
}


def searchable_keys() -> list[str]:
    """Every ``section.key`` a space may name."""
    out: list[str] = []
    for section in SEARCHABLE_SECTIONS:
        fields = Config.model_fields[section].annotation.model_fields  # type: ignore[union-attr]
        out.extend(f"{section}.{k}" for k in fields if f"{section}.{k}" not in _NOT_SEARCHED)
    return out


def load_space(path: str | os.PathLike[str] | None, base: Config) -> list[Param]:
    """Read and validate a space file (None: :data:`DEFAULT_SPACE`) against ``base``.

    Raises
    ------
    CensusScviError
        One line naming the file, the key and the value: unknown keys get the closest valid one.
    """
    if path is None:
        return parse_space(DEFAULT_SPACE, base, where="the default space")
    p = Path(path)
    if not p.is_file():
        msg = f"space file not found: {p}"
        raise CensusScviError(
            msg, hint="pass an existing YAML with --space (see configs/tune-space.yaml)"
        )
    try:
        raw = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        msg = f"space {p} is not valid YAML{where}: {getattr(e, 'problem', None) or e}"
        raise CensusScviError(msg) from None
    return parse_space(raw, base, where=f"space {p}")


def parse_space(raw: Any, base: Config, *, where: str = "space") -> list[Param]:
    """Validate a space mapping (as read from YAML); returns its params in file order."""
    if not isinstance(raw, Mapping) or not raw:
        msg = f"{where} must be a mapping of section.key to choices or a range, got {raw!r:.60}"
        raise CensusScviError(msg, hint="see configs/tune-space.yaml")
    params = [_param(key, spec, base, where) for key, spec in _flatten(raw, where)]
    seen: set[str] = set()
    for p in params:
        if p.key in seen:
            msg = f"{where}: '{p.key}' is given twice"
            raise CensusScviError(msg)
        seen.add(p.key)
    return params


def _flatten(raw: Mapping[Any, Any], where: str) -> list[tuple[str, Any]]:
    """``{section: {key: spec}}`` and ``{"section.key": spec}`` as ``[("section.key", spec)]``."""
    out: list[tuple[str, Any]] = []
    for top, body in raw.items():
        top = str(top)
        if "." in top:
            out.append((top, body))
        elif top in SEARCHABLE_SECTIONS and isinstance(body, Mapping):
            out.extend((f"{top}.{k}", spec) for k, spec in body.items())
        elif top in SEARCHABLE_SECTIONS:
            msg = f"{where}: section '{top}' must map keys to choices or ranges, got {body!r:.60}"
            raise CensusScviError(msg)
        elif top in Config.model_fields:  # a section of prepare or evaluate: say why not
            first = next(iter(body), None) if isinstance(body, Mapping) else None
            _not_searchable(f"{top}.{first}" if first is not None else top, where)
        else:
            sections = difflib.get_close_matches(top, SEARCHABLE_SECTIONS, n=1, cutoff=0.6)
            if not sections:
                _unknown(top, where)
            msg = f"{where}: unknown section '{top}'; did you mean '{sections[0]}'?"
            raise CensusScviError(msg)
    for key, _ in out:
        _check_key(key, where)
    return out


def _check_key(key: str, where: str) -> None:
    if key in _NOT_SEARCHED:
        msg = f"{where}: '{key}' cannot be searched ({_NOT_SEARCHED[key]})"
        raise CensusScviError(msg)
    section = key.split(".", 1)[0]
    if section not in SEARCHABLE_SECTIONS and section in Config.model_fields:
        _not_searchable(key, where)
    if key not in searchable_keys():
        _unknown(key, where)


def _not_searchable(key: str, where: str) -> NoReturn:
    msg = (
        f"{where}: '{key}' cannot be searched: every trial shares one prepare and one "
        f"evaluation, so only {', '.join(SEARCHABLE_SECTIONS)} keys vary"
    )
    raise CensusScviError(msg)


def _unknown(key: str, where: str) -> NoReturn:
    valid = searchable_keys()
    # the same key name in another section first, so "model.lr" finds "training_plan.lr"
    names = {k.split(".", 1)[1]: k for k in valid}
    name = key.split(".")[-1]
    close = (
        [names[name]]
        if name in names
        else difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
        or [names[m] for m in difflib.get_close_matches(name, names, n=1, cutoff=0.6)]
    )
    hint = f"did you mean '{close[0]}'?" if close else "valid keys: " + ", ".join(valid)
    msg = f"{where}: unknown key '{key}'; {hint}"
    raise CensusScviError(msg)


def _param(key: str, spec: Any, base: Config, where: str) -> Param:
    if isinstance(spec, list | tuple):
        return _choices(key, list(spec), base, where)
    if isinstance(spec, Mapping) and set(spec) == {"choices"}:
        return _choices(key, list(spec["choices"] or []), base, where)
    if isinstance(spec, Mapping) and {"low", "high"} <= set(spec) <= _RANGE_KEYS:
        return _range(key, spec, base, where)
    msg = (
        f"{where}: {key} must be a list of choices or {{low: .., high: ..[, log: true]}}, "
        f"got {spec!r:.60}"
    )
    raise CensusScviError(msg, hint="a fixed value belongs in the config, not the space")


def _choices(key: str, values: list[Any], base: Config, where: str) -> Param:
    if not values:
        msg = f"{where}: {key} has no choices"
        raise CensusScviError(msg)
    for v in values:
        if not (v is None or isinstance(v, bool | int | float | str)):
            msg = f"{where}: {key} choice {v!r:.40} is not a plain value (number, string, bool)"
            raise CensusScviError(msg)
        _validate(key, v, base, where)
    return Param(key, choices=tuple(dict.fromkeys(values)))


def _range(key: str, spec: Mapping[str, Any], base: Config, where: str) -> Param:
    low, high, log, step = spec["low"], spec["high"], spec.get("log", False), spec.get("step")
    for name, v in (("low", low), ("high", high), ("step", step)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int | float)):
            msg = f"{where}: {key} {name}={v!r} is not a number"
            raise CensusScviError(msg)
    if not isinstance(log, bool):
        msg = f"{where}: {key} log={log!r} must be true or false"
        raise CensusScviError(msg)
    if not low < high:
        msg = f"{where}: {key} low={low} must be below high={high}"
        raise CensusScviError(msg)
    if log and (low <= 0 or step is not None):
        msg = f"{where}: {key} log=true needs low > 0 and no step (low={low}, step={step})"
        raise CensusScviError(msg)
    integer = _is_int_field(key)
    if integer and not all(isinstance(v, int) for v in (low, high, step) if v is not None):
        msg = f"{where}: {key} is an integer key but its range is {low}..{high} (step {step})"
        raise CensusScviError(msg, hint="give integer low/high/step")
    for v in (low, high):
        _validate(key, v, base, where)
    return Param(key, low=low, high=high, log=log, step=step, integer=integer)


def _is_int_field(key: str) -> bool:
    section, name = key.split(".", 1)
    model = Config.model_fields[section].annotation
    ann = str(model.model_fields[name].annotation)  # type: ignore[union-attr]
    return "int" in ann and "float" not in ann


def _validate(key: str, value: Any, base: Config, where: str) -> None:
    """``value`` for ``key`` passes the config's own checks (type, range, cross-checks)."""
    try:
        apply_params(base, {key: value})
    except CensusScviError as e:
        msg = f"{where}: {key}={value!r} is rejected by the config: {e.message}"
        raise CensusScviError(msg) from None


def apply_params(base: Config, params: Mapping[str, Any], **fixed: Any) -> Config:
    """``base`` with ``params`` (``{"section.key": value}``) set, validated as a whole config.

    ``fixed`` takes more ``section__key=value`` settings (the tune's per-trial bookkeeping).
    """
    data = base.model_dump(mode="json")
    items = [*params.items(), *((k.replace("__", ".", 1), v) for k, v in fixed.items())]
    for key, value in items:
        section, name = key.split(".", 1)
        data[section][name] = value
    return config_from_dict(data)
