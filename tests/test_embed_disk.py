"""A full disk during embed (issue 12 item 6): one line naming the space needed and free, and
nothing half-written left visible; before, embed's memory maps grew into the full disk and the
process died of SIGBUS (exit 135) without a word."""

from __future__ import annotations

import errno
import os
import re
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import census_scvi.embed._store as store_mod
from census_scvi.embed._store import EmbedStore
from census_scvi.errors import CensusScviError

PLAN = {"fingerprint": "x", "n_cells": 5000, "n_latent": 10, "chunk_size": 1000, "n_chunks": 5}
LINE = re.compile(r"^need (about )?[0-9.e-]+ GiB free in \S+; [0-9.e-]+ GiB free$")


def _enospc(*_args):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _visible(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir() if p.name != ".lock")


def test_allocation_reserves_disk_blocks(tmp_path):
    store = EmbedStore(tmp_path / "embed")
    store.ensure_plan(PLAN, np.arange(5000, dtype=np.int64))
    for name in ("latent.npy", "latent-var.npy"):
        st = (store.dir / name).stat()
        assert st.st_size > 5000 * 10 * 4 and st.st_blocks * 512 >= st.st_size  # not sparse
    np.testing.assert_array_equal(store.joinids(), np.arange(5000))
    assert "progress.json" in _visible(store.dir)


def test_full_disk_at_allocation_is_one_line_and_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "posix_fallocate", _enospc)
    store = EmbedStore(tmp_path / "embed")
    with pytest.raises(CensusScviError) as e:
        store.ensure_plan(PLAN, np.arange(5000, dtype=np.int64))
    assert LINE.match(e.value.message), str(e.value)
    assert "\n" not in str(e.value) and str(store.dir) in str(e.value)
    assert _visible(store.dir) == []  # no latent*.npy, no progress.json, no temporaries


def test_not_enough_free_space_is_refused_before_writing(tmp_path, monkeypatch):
    import shutil

    real = shutil.disk_usage

    def tiny(path):
        return real(path)._replace(free=100_000)

    calls = []
    monkeypatch.setattr(store_mod.shutil, "disk_usage", tiny)
    monkeypatch.setattr(os, "posix_fallocate", lambda *a: calls.append(a))
    store = EmbedStore(tmp_path / "embed")
    with pytest.raises(CensusScviError, match=r"need 0\.00044 GiB free in .*; 9\.3e-05 GiB free"):
        store.ensure_plan(PLAN, np.arange(5000, dtype=np.int64))
    assert calls == [] and _visible(store.dir) == []


def test_file_systems_without_fallocate_still_work(tmp_path, monkeypatch):
    def unsupported(*_a):
        raise OSError(errno.EOPNOTSUPP, "not supported")

    monkeypatch.setattr(os, "posix_fallocate", unsupported)
    store = EmbedStore(tmp_path / "embed")
    store.ensure_plan(PLAN, np.arange(5000, dtype=np.int64))
    assert {"latent.npy", "latent-var.npy", "latent-idx.npy", "progress.json"} <= set(
        _visible(store.dir)
    )


# ----------------------------------------------------------------------------------------------
# the stage and the CLI, with a real tiny model
@pytest.fixture(scope="module")
def model_run(mini_census, tmp_path_factory) -> Path:
    from test_embed import train_tiny_model

    run_dir = tmp_path_factory.mktemp("embed-disk") / "model-run"
    train_tiny_model(mini_census, run_dir)
    return run_dir


def _fresh(model_run: Path, run_dir: Path) -> Path:
    import shutil

    shutil.copytree(model_run / "train", run_dir / "train")
    return run_dir


@pytest.mark.slow
def test_cli_embed_on_a_full_disk_exits_2_with_one_line(
    mini_census, model_run, tmp_path, monkeypatch
):
    from census_scvi.cli import app
    from census_scvi.config import dump_config
    from test_embed import embed_config

    run_dir = _fresh(model_run, tmp_path / "run")
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(dump_config(embed_config(mini_census)))
    monkeypatch.setattr(os, "posix_fallocate", _enospc)
    res = CliRunner().invoke(app, ["-q", "embed", "-c", str(cfg), "-o", str(run_dir)])
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and re.match(r"error: need [0-9.e-]+ GiB free in .*embed; ", lines[0])
    assert not list((run_dir / "embed").glob("latent*")) and not list(
        (run_dir / "embed").glob(".*tmp-*")
    )
    assert not (run_dir / "embed" / "progress.json").exists()


@pytest.mark.slow
def test_full_disk_while_writing_the_soma_embedding(mini_census, model_run, tmp_path, monkeypatch):
    """ENOSPC after the arrays (TileDB's write): the same line, no temporary, no manifest; the
    finished chunks stay, so a rerun with space only writes the outputs."""
    import census_scvi.embed._outputs as outputs
    from census_scvi.embed import run_embed
    from test_embed import embed_config

    run_dir = _fresh(model_run, tmp_path / "run")
    real = outputs.write_embedding_soma

    def full(uri, **kw):
        Path(uri).mkdir()  # a half-written array
        (Path(uri) / "part").write_bytes(b"x")
        raise RuntimeError("Cannot write to file: No space left on device")

    cfg = embed_config(mini_census, "embed.write_minified_model=false")
    monkeypatch.setattr(outputs, "write_embedding_soma", full)
    with pytest.raises(CensusScviError) as e:
        run_embed(cfg, run_dir=run_dir)
    assert LINE.match(e.value.message) and "about" in e.value.message, e.value.message
    embed = run_dir / "embed"
    assert not (embed / "manifest.json").exists() and not (embed / "embedding.soma").exists()
    assert not list(embed.glob(".embedding.soma.tmp-*"))
    monkeypatch.setattr(outputs, "write_embedding_soma", real)
    again = run_embed(cfg, run_dir=run_dir)
    assert again.complete and again.chunks_run == 0
