"""The loss-curve picture of a training run (``train/logs/loss_curve.png``)."""

from __future__ import annotations

import os
from typing import Any

__all__ = ["plot_loss_curve"]


def plot_loss_curve(history: Any, path: str | os.PathLike[str], *, title: str = "") -> None:
    """Draw train and validation ELBO per epoch, with the KL weight (warm-up) on a second axis.

    Parameters
    ----------
    history
        ``pandas.DataFrame`` indexed by epoch with columns ``elbo_train``, ``elbo_validation``
        (optional), ``reconstruction_loss_*``, ``kl_local_*`` and ``kl_weight``.
    path
        PNG file to write.
    title
        Figure title.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    from census_scvi.rundir import atomic_path

    fig, (ax, ax_parts) = plt.subplots(1, 2, figsize=(11, 4), dpi=110)
    epochs = history.index.to_numpy() + 1
    styles = {"train": "-", "validation": "--"}
    for split, style in styles.items():
        col = f"elbo_{split}"
        if col in history and history[col].notna().any():
            ax.plot(epochs, history[col], style, marker="o", ms=3, label=f"ELBO ({split})")
        for part, color in (("reconstruction_loss", "tab:green"), ("kl_local", "tab:red")):
            pcol = f"{part}_{split}"
            if pcol in history and history[pcol].notna().any():
                ax_parts.plot(epochs, history[pcol], style, color=color, label=f"{part} ({split})")
    ax.set_xlabel("epoch")
    ax.set_ylabel("negative ELBO per cell")
    ax.set_title("ELBO")
    if "kl_weight" in history and history["kl_weight"].notna().any():
        ax_kl = ax.twinx()
        ax_kl.plot(epochs, history["kl_weight"], ":", color="tab:purple", label="KL weight")
        ax_kl.set_ylabel("KL weight (warm-up)")
        ax_kl.set_ylim(-0.02, max(1.0, float(history["kl_weight"].max())) * 1.05)
        lines = ax.get_legend_handles_labels()
        kl_lines = ax_kl.get_legend_handles_labels()
        ax.legend(lines[0] + kl_lines[0], lines[1] + kl_lines[1], fontsize=8, loc="upper right")
    else:
        ax.legend(fontsize=8)
    ax_parts.set_xlabel("epoch")
    ax_parts.set_title("ELBO terms")
    ax_parts.set_yscale("log")
    ax_parts.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
