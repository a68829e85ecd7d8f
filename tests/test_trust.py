"""Trust: names from a config stay names, one writer at a time, nothing stale counts as done.

Each test here failed on 203684b's behaviour (the item numbers are issue 12's).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from census_scvi.cli import app
from census_scvi.config import load_config
from census_scvi.constants import RUN_LOCK, STAGE_LOCK
from census_scvi.errors import CensusScviError
from census_scvi.rundir import clean_stale_temporaries, hold_lock, remove_within, run_stage

NAME_KEYS = ("model.filename", "anndata.model_filename")
BAD_NAMES = ("/tmp", "..", "../x", "a/b", ".hidden", "", "logs", "manifest.json")


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


# -- item 2: config file names cannot reach outside RUN_DIR/<stage>/ -------------------------
@pytest.mark.parametrize("key", NAME_KEYS)
@pytest.mark.parametrize("name", BAD_NAMES)
def test_name_keys_accept_plain_file_names_only(key, name):
    with pytest.raises(CensusScviError, match=rf"'{key}'"):
        load_config(None, overrides=[f"{key}={name}"])


@pytest.mark.parametrize("key", NAME_KEYS)
def test_cli_refuses_a_directory_as_a_name_and_deletes_nothing(tmp_path, key):
    victim = tmp_path / "precious"
    victim.mkdir()
    (victim / "data.txt").write_text("keep me")
    run_dir = tmp_path / "run"
    res = CliRunner().invoke(app, ["train", "-o", str(run_dir), "--set", f"{key}={victim}"])
    assert res.exit_code == 2
    assert "plain file name" in res.output and res.output.count("\n") <= 2
    assert (victim / "data.txt").read_text() == "keep me"
    assert not run_dir.exists()  # refused at config load, before anything was written


def test_remove_within_refuses_paths_outside_the_root(tmp_path):
    root = tmp_path / "run" / "train"
    root.mkdir(parents=True)
    outside = tmp_path / "other"
    outside.mkdir()
    for target in (outside, root / ".." / ".." / "other", root):
        with pytest.raises(CensusScviError, match="refusing to remove"):
            remove_within(target, root)
    assert outside.is_dir() and root.is_dir()
    inside = root / "old.model"
    inside.mkdir()
    remove_within(inside, root)
    assert not inside.exists()


# -- item 3: shell metacharacters stay literal -------------------------------------------------
def test_shell_metacharacters_in_values_stay_literal(tmp_path):
    marker = tmp_path / "pwned"
    name = f"m;touch {marker};$(touch {marker})`touch {marker}`"
    cfg = load_config(
        None,
        overrides=[
            f"census.obs_query=dataset_id == '$(touch {marker})'",
            f"embed.title=x && touch {marker}",
        ],
    )
    assert cfg.census.obs_query == f"dataset_id == '$(touch {marker})'"
    assert cfg.embed.title == f"x && touch {marker}"
    res = CliRunner().invoke(app, ["config", "--set", f"embed.description={name}"])
    assert res.exit_code == 0, res.output
    assert yaml.safe_load(res.output)["embed"]["description"] == name
    assert not marker.exists()


# -- item 12: strict numbers and booleans ----------------------------------------------------
@pytest.mark.parametrize(
    ("item", "why"),
    [
        ("train.max_epochs=true", "expected a number"),
        ("model.n_hidden=false", "expected a number"),
        ("train.early_stopping=1", "expected true or false"),
        ("train.early_stopping=yes please", "expected true or false"),
    ],
)
def test_booleans_are_not_numbers(item, why):
    with pytest.raises(CensusScviError, match=why):
        load_config(None, overrides=[item])


def test_yaml_numbers_still_load():
    cfg = load_config(None, overrides=["training_plan.lr=3e-4", "train.max_epochs=3"])
    assert cfg.training_plan.lr == pytest.approx(3e-4) and cfg.train.max_epochs == 3


# -- item 4: one writer per run directory / stage ----------------------------------------------
_HOLDER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from census_scvi.rundir import hold_lock
    with hold_lock(Path(sys.argv[1]), what="test"):
        print("held", flush=True)
        time.sleep(120)
    """
)


def _hold_in_child(lock: Path) -> subprocess.Popen[str]:
    child = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(lock)], stdout=subprocess.PIPE, text=True
    )
    assert child.stdout is not None and child.stdout.readline().strip() == "held"
    return child


def test_lock_names_the_live_holder_and_is_taken_over_when_it_dies(tmp_path, caplog):
    lock = tmp_path / "stage" / STAGE_LOCK
    child = _hold_in_child(lock)
    try:
        t0 = time.perf_counter()
        with pytest.raises(CensusScviError) as err, hold_lock(lock, what="stage"):
            pass
        assert time.perf_counter() - t0 < 2  # at once, not after a wait
        text = str(err.value)
        assert f"PID {child.pid}" in text and socket.gethostname() in text and "since" in text
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    with caplog.at_level("WARNING"), hold_lock(lock, what="stage"):
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert "that process is gone" in caplog.text
    assert not lock.exists()  # released


def test_lock_of_another_host_is_not_broken(tmp_path):
    lock = tmp_path / STAGE_LOCK
    lock.write_text(json.dumps({"pid": 1, "host": "elsewhere.example", "since": "2026-01-01"}))
    with pytest.raises(CensusScviError, match="PID 1 on elsewhere.example") as err:
        with hold_lock(lock, what="x"):
            pass
    assert str(lock) in str(err.value)  # names the file to remove if that process is gone
    assert lock.exists()


def test_second_run_on_the_same_run_directory_fails_at_once(tmp_path):
    run_dir = tmp_path / "run"
    child = _hold_in_child(run_dir / RUN_LOCK)
    try:
        res = CliRunner().invoke(
            app, ["run", "-o", str(run_dir), "--set", f"census.uri={tmp_path / 'none'}"]
        )
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert res.exit_code == 2, res.output
    assert f"in use by PID {child.pid}" in res.output


# -- items 5 and 7 through run_stage: outputs really there; temporaries of dead runs removed ---
def _stage(run_dir: Path, *, force: bool = False):
    cfg = load_config(None)
    return run_stage(run_dir, "toy", config=cfg, sections=["model"], inputs={"x": "1"},
                     force=force, lock=STAGE_LOCK)  # fmt: skip


def _finish(run_dir: Path) -> Path:
    with _stage(run_dir) as st:
        assert not st.skipped
        out = st.dir / "out.bin"
        out.write_bytes(b"x" * 1000)
        st.record(figures={"n": 1}, outputs={"out": out})
    return out


def test_stage_redone_when_an_output_is_missing_or_truncated(tmp_path, caplog):
    out = _finish(tmp_path)
    manifest = json.loads((tmp_path / "toy" / "manifest.json").read_text())
    assert manifest["files"] == {"toy/out.bin": 1000} and manifest["outputs"] == {
        "out": "toy/out.bin"
    }
    with _stage(tmp_path) as st:
        assert st.skipped and st.figures == {"n": 1}
    out.unlink()
    with caplog.at_level("INFO"), _stage(tmp_path) as st:
        assert not st.skipped
    assert "out.bin is missing" in caplog.text
    out = _finish(tmp_path)
    out.write_bytes(b"x" * 10)  # truncated
    with _stage(tmp_path) as st:
        assert not st.skipped


def test_stage_redone_when_a_small_output_is_corrupt_at_the_same_size(tmp_path, caplog):
    out = _finish(tmp_path)
    manifest = json.loads((tmp_path / "toy" / "manifest.json").read_text())
    assert set(manifest["hashes"]) == {"toy/out.bin"}
    out.write_bytes(b"y" * 1000)  # same size, other bytes (a bad copy, a disk error)
    with caplog.at_level("INFO"), _stage(tmp_path) as st:
        assert not st.skipped
    assert "out.bin changed content" in caplog.text


def test_corrupt_prepared_table_is_one_line_naming_file_and_fix(tmp_path):
    from census_scvi.rundir import read_table

    bad = tmp_path / "hvg.parquet"
    bad.write_bytes(b"PAR1" + b"\0" * 200)
    with pytest.raises(CensusScviError) as e:
        read_table(bad, stage="prepare")
    text = str(e.value)
    assert str(bad) in text and "truncated or corrupt" in text
    assert "'census-scvi run' redoes prepare" in text and "prepare --force" in text
    assert len(text.splitlines()) == 1


def test_truncated_model_file_is_one_line_naming_file_and_retrain(tmp_path):
    import torch

    from census_scvi.scvi_model import model_var_names

    folder = tmp_path / "model"
    folder.mkdir()
    torch.save({"attr_dict": {}, "var_names": ["a"]}, folder / "model.pt")
    data = (folder / "model.pt").read_bytes()
    (folder / "model.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CensusScviError) as e:
        model_var_names(folder)
    text = str(e.value)
    assert "model.pt: it is not a torch.save file (truncated or corrupt)" in text
    assert "'census-scvi run' retrains" in text and len(text.splitlines()) == 1


def test_folder_outputs_may_grow_but_not_vanish(tmp_path):
    with _stage(tmp_path) as st:
        folder = st.dir / "embedding.soma"
        folder.mkdir()
        (folder / "data").write_bytes(b"x" * 100)
        st.record(figures={}, outputs={"soma": folder})
    (folder / "__meta").mkdir()  # e.g. the index recording itself in the array's metadata
    (folder / "__meta" / "m").write_bytes(b"y")
    with _stage(tmp_path) as st:
        assert st.skipped
    import shutil

    shutil.rmtree(folder)
    with _stage(tmp_path) as st:
        assert not st.skipped


def test_no_manifest_when_the_stage_fails(tmp_path):
    _finish(tmp_path)
    with pytest.raises(RuntimeError), _stage(tmp_path, force=True) as st:
        assert not st.skipped
        raise RuntimeError("boom")
    assert not (tmp_path / "toy" / "manifest.json").exists()
    assert not (tmp_path / "toy" / STAGE_LOCK).exists()


def test_temporaries_of_dead_runs_are_removed_live_ones_kept(tmp_path, caplog):
    sdir = tmp_path / "toy"
    sdir.mkdir()
    dead = _dead_pid()
    stale_file = sdir / f".anndata_model.h5ad.tmp-{dead}"
    stale_file.write_bytes(b"x" * 4096)
    stale_dir = sdir / f".embedding.soma.tmp-{dead}"
    (stale_dir / "frag").mkdir(parents=True)
    (stale_dir / "frag" / "data").write_bytes(b"y" * 2048)
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        kept = sdir / f".scvi.model.tmp-{live.pid}"
        kept.write_bytes(b"z")
        unrelated = sdir / "notes.tmp-1"  # not one of our names
        unrelated.write_text("mine")
        with caplog.at_level("WARNING"):
            freed = clean_stale_temporaries(sdir)
        assert freed == 4096 + 2048
        assert not stale_file.exists() and not stale_dir.exists()
        assert kept.exists() and unrelated.exists()
        assert "6.0 KiB freed" in caplog.text
    finally:
        live.kill()
        live.wait()
    # run_stage does the same on start
    stale_file.write_bytes(b"x")
    with _stage(tmp_path) as st:
        assert not st.skipped
    assert not stale_file.exists()


# -- item 9: a network that accepts but never answers cannot hang us ----------------------------
def test_census_version_open_is_bounded_by_timeout(monkeypatch):
    from cellxgene_census import _release_directory as rd

    from census_scvi.soma import open_census

    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)  # the kernel accepts connections; nobody ever answers
    url = f"http://127.0.0.1:{silent.getsockname()[1]}/directory.json"
    monkeypatch.setattr(rd, "CELL_CENSUS_RELEASE_DIRECTORY_URL", url)
    monkeypatch.setattr(rd, "CELL_CENSUS_MIRRORS_DIRECTORY_URL", url)
    cfg = load_config(
        None, overrides=["census.uri=null", "census.version=stable", "census.timeout_s=1"]
    )
    t0 = time.perf_counter()
    try:
        with pytest.raises(CensusScviError, match="cannot open Census version 'stable'"):
            with open_census(cfg):
                pass
    finally:
        silent.close()
    assert time.perf_counter() - t0 < 10


# -- item 6: a full disk reported by HDF5 or TileDB (no errno) is one line, exit 2 ------------
@pytest.mark.parametrize(
    "error",
    [
        OSError(
            "Can't synchronously write data (errno = 28, error message = 'No space left on device')"
        ),
        RuntimeError("[TileDB::IO] Error: Cannot write to file; No space left on device"),
    ],
)
def test_cli_turns_any_disk_full_error_into_one_line(tmp_path, monkeypatch, error):
    import census_scvi.prepare

    def full(*a, **k):
        raise error

    monkeypatch.setattr(census_scvi.prepare, "run_prepare", full)
    res = CliRunner().invoke(app, ["prepare", "-o", str(tmp_path / "run")])
    assert res.exit_code == 2, res.output
    assert res.output.strip().splitlines() == [
        "error: no space left on the device (free disk space, rerun)"
    ]
