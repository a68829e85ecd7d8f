"""scvi-hub export: a run's minified model, model card and metrics, as ``scvi.hub.HubModel`` loads.

Needs the ``hub`` extra (``pip install 'census-scvi[hub]'``: huggingface_hub, which
``scvi.hub`` imports).
"""

from census_scvi.hub._stage import HUB_INSTALL_HINT, HubExport, export_hub

__all__ = ["HUB_INSTALL_HINT", "HubExport", "export_hub"]
