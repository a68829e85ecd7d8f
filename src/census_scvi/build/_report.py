"""What a build-census run did: one :class:`DatasetReport` per input, one :class:`BuildResult`."""

from __future__ import annotations

from dataclasses import dataclass, field

from census_scvi.soma._schema import UNKNOWN

__all__ = ["BuildResult", "DatasetReport"]


@dataclass
class DatasetReport:
    """What happened to one input file."""

    dataset_id: str
    path: str
    n_cells: int
    n_genes: int
    counts_source: str
    n_genes_in: int
    n_missing_ids: int
    n_merged_ids: int
    symbol_keyed: bool
    placeholders: list[str]
    mapped: dict[str, str]
    replaced: bool
    dropped_obs: list[str] = field(default_factory=list)


@dataclass
class BuildResult:
    """Result of :func:`build_census`."""

    uri: str
    organism: str
    created: bool
    datasets: list[DatasetReport]
    kept_datasets: int
    """Datasets of the organism that were already in the census and are still there."""
    n_cells: int
    """Cells of the organism's experiment after the build."""
    n_genes: int
    """Genes (var rows) of the organism's experiment after the build."""
    total_cells: int
    """Cells in the whole census (all organisms)."""
    seconds: float
    peak_rss_bytes: int
    warnings: list[str] = field(default_factory=list)
    cleaned: tuple[int, int] = (0, 0)
    """Folders left by killed builds that this build removed, and the bytes freed."""

    def summary(self) -> str:
        verb = "created" if self.created else "updated"
        lines = [
            f"census {verb} at {self.uri} ({self.seconds:.1f} s, peak RSS "
            f"{self.peak_rss_bytes / 2**30:.2f} GiB)",
            f"  {self.organism}: {self.n_cells:,} cells x {self.n_genes:,} genes "
            f"({self.kept_datasets + len(self.datasets)} datasets, "
            f"{len(self.datasets)} from this build); whole census {self.total_cells:,} cells",
        ]
        for d in self.datasets:
            action = "replaced" if d.replaced else "added"
            lines.append(
                f"  {action} {d.dataset_id} <- {d.path}: {d.n_cells:,} cells x {d.n_genes:,} "
                f"genes, counts from {d.counts_source}"
            )
            if d.n_missing_ids:
                lines.append(f"    dropped {d.n_missing_ids:,} genes without an id")
            if d.n_merged_ids:
                lines.append(f"    summed {d.n_merged_ids:,} genes sharing an id with another")
            if d.mapped:
                pairs = ", ".join(f"{k} <- {v}" for k, v in d.mapped.items())
                lines.append(f"    mapped columns: {pairs}")
            if d.placeholders:
                # an ontology id column whose label column is a placeholder too goes unsaid
                shown = [
                    c
                    for c in d.placeholders
                    if not (
                        c.endswith("_ontology_term_id")
                        and c.removesuffix("_ontology_term_id") in d.placeholders
                    )
                ]
                lines.append(
                    f"    {len(d.placeholders)} columns set to '{UNKNOWN}' (not in the file, not "
                    f"mapped): {', '.join(shown)} (and their ontology ids)"
                )
            if d.dropped_obs:
                lines.append(
                    f"    {len(d.dropped_obs)} obs column(s) of the file not stored (not Census "
                    f"columns; --columns maps one onto a Census column): {_listing(d.dropped_obs)}"
                )
        if self.cleaned[0]:
            lines.append(
                f"  removed {self.cleaned[0]} folder(s) left by killed builds "
                f"({_size(self.cleaned[1])} freed)"
            )
        lines += [f"  warning: {w}" for w in self.warnings]
        return "\n".join(lines)


def _size(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def _listing(names: list[str], limit: int = 20) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")
