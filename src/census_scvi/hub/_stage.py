"""Export a run's minified model as a directory ``scvi.hub.HubModel`` loads, ready to publish.

``export_hub(RUN_DIR, OUT_DIR)`` writes, atomically:

- ``model.pt`` and ``adata.h5ad``: the minified model (``embed/final_scvi_optimized``), which
  loads with no counts;
- ``README.md``: the model card, scvi-hub's template with the Hugging Face YAML header it
  expects (``library_name: scvi-tools``, ``license``, ``model_cls_name:SCVI`` /
  ``scvi_version:`` / ``anndata_version:`` tags), built by ``scvi.hub.HubModelCardHelper``;
- ``_scvi_required_metadata.json``: ``scvi.hub.HubMetadata``;
- ``metrics.json``: ``evaluate/metrics.json`` when the run was evaluated.

Nothing is uploaded: the result names the one ``hf upload`` command (huggingface_hub's CLI)
that would publish the folder. ``scvi.hub.HubModel.push_to_huggingface_hub`` is not the command
we print because it also adds the model to the scvi-tools collection, which only that
organisation's members may do.

Examples
--------
>>> from census_scvi.hub import export_hub
>>> print(export_hub("runs/demo", "runs/demo-hub").summary())  # doctest: +SKIP
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import shutil
from dataclasses import dataclass, field
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

from census_scvi.constants import (
    CONFIG_FILE,
    EMBED_DIR,
    EVALUATE_DIR,
    METRICS_FILE,
    MINIFIED_MODEL_DIR,
    TRAIN_DIR,
)
from census_scvi.errors import CensusScviError
from census_scvi.hub._card import description_markdown
from census_scvi.rundir import atomic_path, read_manifest

__all__ = ["HUB_INSTALL_HINT", "HubExport", "export_hub"]

logger = logging.getLogger(__name__)

HUB_INSTALL_HINT = "pip install 'census-scvi[hub]'"
#: scvi-hub's file names (scvi.hub._constants): its metadata and the model card
METADATA_FILE = "_scvi_required_metadata.json"
CARD_FILE = "README.md"
_MODEL_FILES = ("model.pt", "adata.h5ad")


@dataclass
class HubExport:
    """What ``export_hub`` wrote and how to publish it."""

    out_dir: Path
    files: list[str] = field(default_factory=list)
    upload_command: str = ""

    def summary(self) -> str:
        return "\n".join(
            [
                f"export-hub: wrote {self.out_dir} ({', '.join(self.files)}); "
                "load it with scvi.hub.HubModel(local_dir=...).",
                "Publish it on the Hugging Face Hub (after 'hf auth login') with:",
                f"  {self.upload_command}",
            ]
        )


def _scvi_hub() -> Any:
    try:
        import scvi.hub as hub
    except ImportError as e:
        msg = f"exporting to scvi-hub needs huggingface_hub, which is not installed ({e})"
        raise CensusScviError(msg, hint=f"install it with: {HUB_INSTALL_HINT}") from None
    return hub


def _check_paths(run_dir: Path, out_dir: Path, *, force: bool) -> Path:
    """The minified model folder; refuses a missing model and an unsafe ``out_dir``."""
    model = run_dir / EMBED_DIR / MINIFIED_MODEL_DIR
    missing = [n for n in _MODEL_FILES if not (model / n).is_file()]
    if missing:
        msg = f"no minified model in {model} ({', '.join(missing)} missing)"
        raise CensusScviError(
            msg, hint="run 'census-scvi embed' with embed.write_minified_model: true (the default)"
        )
    if run_dir.resolve().is_relative_to(out_dir.resolve()):
        msg = f"the output folder {out_dir} holds the run directory {run_dir}"
        raise CensusScviError(msg, hint="pick a new folder, e.g. RUN_DIR-hub")
    if out_dir.exists():
        if not force:
            msg = f"output folder already exists at {out_dir}"
            raise CensusScviError(msg, hint="pass --force to overwrite it")
        previous = out_dir.is_dir() and (
            (out_dir / METADATA_FILE).is_file() or not any(out_dir.iterdir())
        )
        if not previous:
            msg = f"{out_dir} exists and is not an earlier export (no {METADATA_FILE})"
            raise CensusScviError(msg, hint="pick a new folder; --force replaces only exports")
    return model


def _run_facts(run_dir: Path) -> tuple[str, str, dict[str, Any], dict[str, Any] | None, str]:
    """Census, organism, embed figures, evaluate metrics (or None), anndata version of training."""
    import yaml

    cfg_path = run_dir / CONFIG_FILE
    cfg = yaml.safe_load(cfg_path.read_text()) if cfg_path.is_file() else {}
    census_cfg = (cfg or {}).get("census") or {}
    census = str(census_cfg.get("uri") or census_cfg.get("version") or "unknown")
    organism = str(census_cfg.get("organism") or "unknown")
    embed_figures = dict((read_manifest(run_dir / EMBED_DIR) or {}).get("figures", {}))
    metrics_path = run_dir / EVALUATE_DIR / METRICS_FILE
    metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else None
    versions = (read_manifest(run_dir / TRAIN_DIR) or {}).get("versions", {})
    anndata_version = str(versions.get("anndata") or importlib_metadata.version("anndata"))
    return census, organism, embed_figures, metrics, anndata_version


def export_hub(
    run_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    force: bool = False,
    license_info: str = "cc-by-4.0",
    training_data_url: str | None = None,
    repo_id: str | None = None,
) -> HubExport:
    """Write ``out_dir`` for ``scvi.hub.HubModel`` from the run's minified model.

    Parameters
    ----------
    run_dir
        A run directory whose embed stage wrote ``final_scvi_optimized/``.
    out_dir
        The folder to create (replaced only with ``force``, and only an earlier export).
    force
        Replace an earlier export at ``out_dir``.
    license_info
        The model card's license (the Census's data are CC BY 4.0).
    training_data_url
        Where the training data can be found (scvi-hub validates it; it is checked online).
    repo_id
        The Hugging Face repository (``user/name``) named in the upload command.

    Returns
    -------
    A :class:`HubExport` with the files written and the upload command.
    """
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    model = _check_paths(run_dir, out_dir, force=force)
    hub = _scvi_hub()
    census, organism, embed_figures, metrics, anndata_version = _run_facts(run_dir)
    with atomic_path(out_dir) as tmp:
        tmp.mkdir(parents=True)
        for name in _MODEL_FILES:
            shutil.copy2(model / name, tmp / name)
        if metrics is not None:
            shutil.copy2(run_dir / EVALUATE_DIR / METRICS_FILE, tmp / METRICS_FILE)
        card = hub.HubModelCardHelper.from_dir(
            str(tmp),
            license_info=license_info,
            anndata_version=anndata_version,
            data_is_minified=True,
            data_modalities=["rna"],
            training_data_url=training_data_url,
            description=description_markdown(
                census=census, organism=organism, embed_figures=embed_figures, metrics=metrics
            ),
        )
        meta = hub.HubMetadata.from_dir(
            str(tmp), anndata_version=anndata_version, training_data_url=training_data_url
        )
        hub.HubModel(str(tmp), metadata=meta, model_card=card).save(overwrite=True)
        files = sorted(p.name for p in tmp.iterdir())
    target = repo_id or "<hf-user>/<model-name>"
    command = f"hf upload {target} {shlex.quote(str(out_dir))} . --repo-type model"
    logger.info("export-hub: wrote %s", out_dir)
    return HubExport(out_dir=out_dir, files=files, upload_command=command)
