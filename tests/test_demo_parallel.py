"""Mini census writer processes: the same census for any number of them, bounded memory."""

from __future__ import annotations

import tracemalloc

import cellxgene_census
import numpy as np
import pytest
from typer.testing import CliRunner

from census_scvi import CensusScviError
from census_scvi.cli import app
from census_scvi.demo import make_mini_census
from census_scvi.demo._model import BLOCK_CELLS


def _read_back(path):
    """Per organism: X coordinates and values sorted by (row, col), obs and var frames."""
    out = {}
    with cellxgene_census.open_soma(uri=str(path)) as census:
        for org in ("homo_sapiens", "mus_musculus"):
            exp = census["census_data"][org]
            t = exp.ms["RNA"].X["raw"].read().tables().concat()
            r, c, v = (t[k].to_numpy() for k in ("soma_dim_0", "soma_dim_1", "soma_data"))
            o = np.lexsort((c, r))
            obs = exp.obs.read().concat().to_pandas().sort_values("soma_joinid")
            var = exp.ms["RNA"].var.read().concat().to_pandas().sort_values("soma_joinid")
            pm = exp.ms["RNA"]["feature_dataset_presence_matrix"].read().tables().concat()
            out[org] = (
                r[o],
                c[o],
                v[o],
                obs.reset_index(drop=True),
                var.reset_index(drop=True),
                pm,
            )
    return out


def test_same_census_for_one_or_two_writer_processes(tmp_path):
    """P=1 (in this process) and P=2 (two writer processes, two X fragments) read back equal."""
    n = 2 * BLOCK_CELLS + 500  # three blocks: writer 0 gets two, writer 1 one
    one = make_mini_census(tmp_path / "p1", n_cells=n, n_genes=1200, shape="census", processes=1)
    two = make_mini_census(tmp_path / "p2", n_cells=n, n_genes=1200, shape="census", processes=2)
    assert one.processes == 1 and two.processes == 2
    a, b = _read_back(one.path), _read_back(two.path)
    for org in a:
        for i in range(3):
            np.testing.assert_array_equal(a[org][i], b[org][i])
        assert a[org][3].equals(b[org][3]), org
        assert a[org][4].equals(b[org][4]), org
        assert a[org][5].equals(b[org][5]), org
    np.testing.assert_array_equal(
        one.organisms["homo_sapiens"].model_cells, two.organisms["homo_sapiens"].model_cells
    )
    human = "census_data/homo_sapiens"
    assert len(list((two.path / human / "ms/RNA/X/raw/__fragments").iterdir())) == 2
    assert len(list((two.path / human / "obs/__fragments").iterdir())) == 1  # consolidated


def test_writer_memory_is_bounded_by_the_block(tmp_path, monkeypatch):
    """Traced memory per block stays flat as blocks go by: nothing per cell accumulates except
    the model cells' joinids (8 bytes per passing cell). (obs rows, buffered for 16 blocks in
    production, are written at every block here.)"""
    from census_scvi.demo import _write
    from census_scvi.demo._stage import _tasks
    from census_scvi.demo._write import organism_design, run_task
    from census_scvi.soma._writer import create_census_root

    monkeypatch.setattr(_write, "_OBS_BLOCKS", 1)

    n_blocks = 6
    d = organism_design("homo_sapiens", n_blocks * BLOCK_CELLS, 2000, 0, "census")
    create_census_root(tmp_path / "m", created_by="test")
    (task,) = _tasks(tmp_path / "m", d, 0, 1)
    tracemalloc.start()
    try:
        peaks, current = [], []
        gen = run_task(task)
        for _ in range(n_blocks):
            tracemalloc.reset_peak()
            next(gen)
            cur, peak = tracemalloc.get_traced_memory()
            peaks.append(peak)
            current.append(cur)
        with pytest.raises(StopIteration):
            next(gen)
    finally:
        tracemalloc.stop()
    assert max(peaks[2:]) < 1.25 * max(peaks[:2]), peaks
    per_block = (current[-1] - current[1]) / (n_blocks - 2)
    assert per_block < 8 * BLOCK_CELLS + 64 * 1024, current  # joinids, little else


def test_cli_shape_and_processes(tmp_path):
    runner = CliRunner()
    out = tmp_path / "c"
    args = ["demo-data", str(out), "--cells", "300", "--genes", "400", "--shape", "census"]
    res = runner.invoke(app, [*args, "--processes", "1"])
    assert res.exit_code == 0, res.output
    assert "shape census" in res.stdout and "1 writer process" in res.stdout
    res = runner.invoke(app, ["demo-data", str(tmp_path / "x"), "--shape", "atlas"])
    assert res.exit_code == 2
    assert "unknown mini census shape 'atlas'" in res.stderr and "census" in res.stderr
    res = runner.invoke(app, ["demo-data", str(tmp_path / "y"), "--processes", "0"])
    assert res.exit_code == 2


def test_refuses_bad_processes(tmp_path):
    with pytest.raises(CensusScviError, match="processes must be between 1 and 64"):
        make_mini_census(tmp_path / "z", n_cells=300, n_genes=120, processes=0)
    assert not (tmp_path / "z").exists()
