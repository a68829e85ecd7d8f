"""The ``census-scvi`` command line: parse, load config, call ``run_*``, print a result.

Heavy libraries are imported inside the commands so ``census-scvi --help`` is fast. Errors of the
project's own type print one line on stderr and exit 2 (traceback only with ``--debug``).
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from census_scvi import __version__
from census_scvi.errors import CensusScviError, is_disk_full

if TYPE_CHECKING:
    from collections.abc import Callable

    from census_scvi.config import Config

app = typer.Typer(
    name="census-scvi",
    help="Train scVI on a CELLxGENE Census (or any Census-schema SOMA experiment), embed every "
    "cell, evaluate, and map your own data onto the model.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

_STATE: dict[str, Any] = {"debug": False}

ConfigOpt = Annotated[
    Path | None,
    typer.Option("-c", "--config", help="YAML config (default: the bundled demo config)."),
]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override one key: section.key=value (repeatable)."),
]
RunDirOpt = Annotated[
    Path | None, typer.Option("-o", "--run-dir", help="Run directory (default: output.run_dir).")
]
ForceOpt = Annotated[bool, typer.Option("--force", help="Redo and overwrite finished artifacts.")]


def _version(value: bool) -> None:
    if value:
        typer.echo(f"census-scvi {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    verbose: Annotated[int, typer.Option("-v", "--verbose", count=True, help="More logs.")] = 0,
    quiet: Annotated[
        bool, typer.Option("-q", "--quiet", help="Only warnings and results.")
    ] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Full tracebacks on errors.")] = False,
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="Print the version."),
    ] = False,
) -> None:
    """census-scvi: scVI on the CELLxGENE Census, at any scale."""
    from census_scvi._allocators import use_lean_allocators
    from census_scvi.progress import set_progress

    use_lean_allocators()

    level = logging.WARNING if quiet else (logging.DEBUG if verbose > 0 or debug else logging.INFO)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("census_scvi")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False
    set_progress(not quiet)
    _STATE["debug"] = debug
    _STATE["quiet"] = quiet


def _fail(err: BaseException) -> None:
    if _STATE.get("debug"):
        raise err
    typer.echo(f"error: {err}", err=True)
    raise typer.Exit(2)


def _guard(fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except CensusScviError as e:
        _fail(e)
    except Exception as e:
        # ENOSPC from Python, HDF5 (an OSError without errno) or TileDB (its own error type)
        if not is_disk_full(e):
            raise
        filename = getattr(e, "filename", None)
        where = f" writing {filename}" if filename else ""
        _fail(CensusScviError(f"no space left on the device{where}", hint="free disk space, rerun"))
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        raise typer.Exit(130) from None


def _stage(
    module: str, config: Path | None, sets: list[str] | None, run_dir: Path | None, **kw: Any
) -> None:
    """The body every config-driven command shares: load config, ``run_<module>``, print."""

    def go() -> Any:
        import importlib

        run = getattr(importlib.import_module(f"census_scvi.{module}"), f"run_{module}")
        cfg = _load(config, sets)
        return run(cfg, run_dir=_run_dir(cfg, run_dir), **kw)

    _print_result(_guard(go))


def _load(config: Path | None, sets: list[str] | None) -> Config:
    from census_scvi.config import load_config

    return load_config(config, overrides=sets or [])


def _run_dir(cfg: Config, run_dir: Path | None) -> Path:
    return Path(run_dir) if run_dir is not None else Path(cfg.output.run_dir).expanduser()


def _print_result(result: Any) -> None:
    text = result.summary() if hasattr(result, "summary") else str(result)
    typer.echo(text)


# ----------------------------------------------------------------------------------------------
@app.command("demo-data")
def demo_data(
    path: Annotated[Path, typer.Argument(help="Folder to write the mini census into.")],
    cells: Annotated[int, typer.Option("--cells", min=100, help="Human cells.")] = 20_000,
    genes: Annotated[
        int | None,
        typer.Option(
            "--genes", min=100, help="Human genes [default: 2000; 20000 with --shape census]."
        ),
    ] = None,
    seed: Annotated[int, typer.Option("--seed", min=0, help="Random seed.")] = 0,
    shape: Annotated[
        str,
        typer.Option(
            "--shape",
            help="default: ~1,000 non-zeros per cell at 2,000 genes; census: Census-like, "
            "~2,000 non-zeros per cell at 20,000 genes (so 8,000 HVGs make sense).",
        ),
    ] = "default",
    processes: Annotated[
        int | None,
        typer.Option(
            "--processes",
            min=1,
            max=64,
            help="Writer processes, each writing its own range of cells "
            "[default: the CPU count, at most 8, one per 16,384 cells]. "
            "The census is the same for any number.",
        ),
    ] = None,
    force: ForceOpt = False,
) -> None:
    """Write the mini census: a small SOMA census in the Census layout and schema."""

    def go() -> Any:
        from census_scvi.demo import make_mini_census

        return make_mini_census(
            path,
            n_cells=cells,
            n_genes=genes,
            seed=seed,
            force=force,
            shape=shape,  # type: ignore[arg-type]
            processes=processes,
        )

    _print_result(_guard(go))


@app.command("config")
def config_cmd(config: ConfigOpt = None, set_: SetOpt = None) -> None:
    """Print the resolved config (every default filled in) as YAML."""

    def go() -> str:
        from census_scvi.config import dump_config

        return dump_config(_load(config, set_))

    typer.echo(_guard(go), nl=False)


@app.command("prepare")
def prepare_cmd(
    config: ConfigOpt = None,
    run_dir: RunDirOpt = None,
    set_: SetOpt = None,
    force: ForceOpt = False,
) -> None:
    """Select cells and highly variable genes; write the training data (mode memory)."""
    _stage("prepare", config, set_, run_dir, force=force)


@app.command("train")
def train_cmd(
    config: ConfigOpt = None,
    run_dir: RunDirOpt = None,
    set_: SetOpt = None,
    force: ForceOpt = False,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue from the last checkpoint.")
    ] = False,
) -> None:
    """Train scVI exactly as configured (in memory or streamed from SOMA)."""
    _stage("train", config, set_, run_dir, force=force, resume=resume)


def _parse_shard(shard: str | None) -> tuple[int, int] | None:
    if shard is None:
        return None
    try:
        k, n = (int(x) for x in shard.split("/"))
    except ValueError:
        msg = f"--shard '{shard}' is not K/N (e.g. 1/4)"
        raise CensusScviError(msg) from None
    return k, n  # run_embed checks the range


@app.command("embed")
def embed_cmd(
    config: ConfigOpt = None,
    run_dir: RunDirOpt = None,
    set_: SetOpt = None,
    force: ForceOpt = False,
    shard: Annotated[
        str | None, typer.Option("--shard", help="Embed only shard K of N (e.g. 2/4).")
    ] = None,
    merge: Annotated[
        bool, typer.Option("--merge", help="Check all shards are done; write outputs.")
    ] = False,
) -> None:
    """Embed every selected cell with the trained model, in chunks, resumable.

    With embed.index: true, then build the nearest-cell index (as 'census-scvi index').
    """

    parsed = _guard(lambda: _parse_shard(shard))

    def go() -> Any:
        from census_scvi.pipeline import run_embed_and_index

        cfg = _load(config, set_)
        return run_embed_and_index(
            cfg, run_dir=_run_dir(cfg, run_dir), force=force, shard=parsed, merge=merge
        )

    _print_result(_guard(go))


@app.command("evaluate")
def evaluate_cmd(
    config: ConfigOpt = None,
    run_dir: RunDirOpt = None,
    set_: SetOpt = None,
    force: ForceOpt = False,
) -> None:
    """Score the embedding (scib-metrics, classifiers), draw a UMAP, write a model card."""
    _stage("evaluate", config, set_, run_dir, force=force)


@app.command("run")
def run_cmd(
    config: ConfigOpt = None,
    run_dir: RunDirOpt = None,
    set_: SetOpt = None,
    force: ForceOpt = False,
    from_: Annotated[
        str | None, typer.Option("--from", help="First stage (prepare|train|embed|evaluate).")
    ] = None,
    to: Annotated[str | None, typer.Option("--to", help="Last stage.")] = None,
) -> None:
    """Run prepare -> train -> embed -> evaluate, skipping stages that are already done."""

    _stage("pipeline", config, set_, run_dir, from_stage=from_, to_stage=to, force=force)


@app.command("map")
def map_cmd(
    query: Annotated[Path, typer.Argument(help="h5ad of raw counts to map.")],
    run: Annotated[Path, typer.Option("--run", help="Run directory with a trained model.")],
    out: Annotated[Path, typer.Option("-o", "--out", help="Output h5ad.")],
    gene_ids: Annotated[
        str | None, typer.Option("--gene-ids", help="var column with Ensembl ids (default: index).")
    ] = None,
    labels: Annotated[
        str, typer.Option("--labels", help="Reference obs column to transfer.")
    ] = "cell_type",
    truth: Annotated[
        str | None,
        typer.Option("--truth", help="Query obs column with known labels: score the predictions."),
    ] = None,
    set_: SetOpt = None,
    force: ForceOpt = False,
) -> None:
    """Map a user's dataset onto the model: latent, predicted labels with confidence, UMAP."""

    def go() -> Any:
        from census_scvi.mapping import run_map

        return run_map(
            query, run_dir=run, out=out, gene_ids=gene_ids, labels=labels, truth=truth,
            overrides=set_ or [], force=force,
        )  # fmt: skip

    _print_result(_guard(go))


@app.command("build-census")
def build_census_cmd(
    out_uri: Annotated[str, typer.Argument(help="Census root to create or append to.")],
    h5ads: Annotated[list[Path], typer.Argument(help="Input h5ad files (one dataset each).")],
    organism: Annotated[str, typer.Option("--organism", help="Organism.")] = "homo_sapiens",
    gene_ids: Annotated[
        str | None, typer.Option("--gene-ids", help="var column with Ensembl ids (default: index).")
    ] = None,
    counts_layer: Annotated[
        str | None, typer.Option("--counts-layer", help="Layer with raw counts (default: X/.raw).")
    ] = None,
    columns: Annotated[
        Path | None, typer.Option("--columns", help="YAML mapping census column: your column.")
    ] = None,
    append: Annotated[bool, typer.Option("--append", help="Add to an existing census.")] = False,
    replace: Annotated[
        bool, typer.Option("--replace", help="Replace datasets already present (with --append).")
    ] = False,
) -> None:
    """Build a Census-schema SOMA experiment from h5ad files."""

    def go() -> Any:
        from census_scvi.build import build_census

        return build_census(
            out_uri, h5ads, organism=organism, gene_ids=gene_ids, counts_layer=counts_layer,
            columns=columns, append=append, replace=replace,
        )  # fmt: skip

    _print_result(_guard(go))


# ----------------------------------------------------------------------------------------------
# nearest-cell search and scvi-hub export
def _run_config(config: Path | None, run_dir: Path | None) -> Path | None:
    """``-c`` when given, else the run's own ``config.yaml`` when it has one (else the default)."""
    if config is not None or run_dir is None:
        return config
    own = Path(run_dir) / "config.yaml"
    return own if own.is_file() else None


@app.command("index")
def index_cmd(
    config: Annotated[
        Path | None,
        typer.Option("-c", "--config", help="YAML config (default: RUN_DIR/config.yaml)."),
    ] = None,
    run_dir: RunDirOpt = None,
    set_: SetOpt = None,
    force: ForceOpt = False,
    partitions: Annotated[
        int | None,
        typer.Option(
            "--partitions",
            min=1,
            help="k-means partitions (default: search.partitions; null: sqrt(cells)).",
        ),
    ] = None,
) -> None:
    """Build the nearest-cell index (TileDB-Vector-Search IVF_FLAT) over every embedded cell.

    Settings: the config's search section (--set search.KEY=VALUE); --partitions wins.
    """

    def go() -> Any:
        from census_scvi.search import run_index

        cfg = _load(_run_config(config, run_dir), set_)
        return run_index(cfg, run_dir=_run_dir(cfg, run_dir), force=force, partitions=partitions)

    _print_result(_guard(go))


@app.command("neighbors")
def neighbors_cmd(
    query: Annotated[Path, typer.Argument(help="h5ad of raw counts.")],
    run: Annotated[Path, typer.Option("--run", help="Run directory with an index.")],
    out: Annotated[Path, typer.Option("-o", "--out", help="Output h5ad.")],
    k: Annotated[
        int | None,
        typer.Option(
            "-k",
            "--n-neighbors",
            min=1,
            help="Nearest embedded cells per cell (default: search.k, 30).",
        ),
    ] = None,
    columns: Annotated[
        str, typer.Option("--columns", help="Census obs columns to predict, comma-separated.")
    ] = "cell_type,tissue_general,disease",
    nprobe: Annotated[
        int | None,
        typer.Option(
            "--nprobe",
            min=1,
            help="Partitions searched (default: search.nprobe; null: calibrated).",
        ),
    ] = None,
    gene_ids: Annotated[
        str | None, typer.Option("--gene-ids", help="var column with Ensembl ids (default: index).")
    ] = None,
    set_: SetOpt = None,
    force: ForceOpt = False,
) -> None:
    """Find each cell's nearest embedded cells; predict obs columns with a confidence."""

    def go() -> Any:
        from census_scvi.search import run_neighbors

        return run_neighbors(
            query, run_dir=run, out=out, k=k, columns=[c for c in columns.split(",") if c.strip()],
            nprobe=nprobe, gene_ids=gene_ids, overrides=set_ or [], force=force,
        )  # fmt: skip

    _print_result(_guard(go))


@app.command("export-hub")
def export_hub_cmd(
    run_dir: Annotated[Path, typer.Argument(help="Run directory with a minified model.")],
    out_dir: Annotated[Path, typer.Argument(help="Folder to write for scvi-hub.")],
    force: ForceOpt = False,
    license_info: Annotated[
        str, typer.Option("--license", help="Model card license.")
    ] = "cc-by-4.0",
    repo_id: Annotated[
        str | None, typer.Option("--repo-id", help="Hugging Face repo (user/name) to print.")
    ] = None,
    training_data_url: Annotated[
        str | None, typer.Option("--training-data-url", help="URL of the training data.")
    ] = None,
) -> None:
    """Write the minified model, model card and metrics for scvi-hub; print the upload command."""

    def go() -> Any:
        from census_scvi.hub import export_hub

        return export_hub(
            run_dir, out_dir, force=force, license_info=license_info, repo_id=repo_id,
            training_data_url=training_data_url,
        )  # fmt: skip

    _print_result(_guard(go))


@app.command("tune")
def tune_cmd(
    config: ConfigOpt = None,
    run_dir: RunDirOpt = None,
    set_: SetOpt = None,
    space: Annotated[
        Path | None,
        typer.Option("--space", help="Search space YAML (default: configs/tune-space.yaml's)."),
    ] = None,
    trials: Annotated[int, typer.Option("--trials", min=1, help="Trials to finish.")] = 20,
    metric: Annotated[
        str, typer.Option("--metric", help="Rank by total|bio|batch (scib) or elbo.")
    ] = "total",
    finalists: Annotated[
        int, typer.Option("--finalists", min=1, help="Top trials rerun with more seeds.")
    ] = 3,
    seeds: Annotated[
        int, typer.Option("--seeds", min=1, help="Training seeds per finalist (1: no reruns).")
    ] = 2,
) -> None:
    """Search model/training settings for the best scib Total; resumable; writes best.yaml."""
    parts = ["census-scvi tune"] + (["-c", str(config)] if config else [])
    parts += [f"--set {s}" for s in set_ or []] + (["-o", str(run_dir)] if run_dir else [])
    parts += (["--space", str(space)] if space else []) + ["--trials", str(trials)]
    parts += ["--metric", metric, "--finalists", str(finalists), "--seeds", str(seeds)]
    _stage(
        "tune", config, set_, run_dir, space=space, trials=trials, metric=metric,
        finalists=finalists, seeds=seeds, command=" ".join(parts),
    )  # fmt: skip


def main() -> None:
    """Entry point of the ``census-scvi`` command."""
    app()


if __name__ == "__main__":
    main()
