"""build-census under concurrency, kill -9 and wrong inputs: one writer per census, killed builds'
folders removed, another organism's genes and the same cells twice refused, dropped obs columns
said (issue 12, items 4, 7, 11)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from census_scvi.build import build_census
from census_scvi.build._digest import METADATA_KEY
from census_scvi.build._staging import lock_path
from census_scvi.errors import CensusScviError
from census_scvi.soma._writer import open_collection

CLI = [sys.executable, "-m", "census_scvi.cli"]


def _h5ad(path: Path, *, n: int = 40, seed: int = 0, prefix: str = "ENSG", obs=None, genes=30):
    rng = np.random.default_rng(seed)
    x = sp.csr_matrix(rng.poisson(0.8, (n, genes)).astype(np.float32))
    ids = [f"{prefix}{i:011d}" for i in range(genes)]
    frame = pd.DataFrame(obs or {}, index=[f"cell{i}" for i in range(n)])
    ad.AnnData(X=x, obs=frame, var=pd.DataFrame(index=ids)).write_h5ad(path)
    return path


def _datasets(uri: Path) -> list[str]:
    import tiledbsoma as soma

    with soma.open(f"{uri}/census_info/datasets") as df:
        return sorted(df.read().concat().to_pandas()["dataset_id"].astype(str))


def _cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *args], capture_output=True, text=True, timeout=timeout, check=False
    )


def _paused_build(out: Path, h5ad: Path, *, at: str, append: bool) -> subprocess.Popen[str]:
    """A real build-census in another process that prints ``paused`` and sleeps at step ``at``
    (a function of census_scvi.build._stage) until it is killed or its stdin closes."""
    code = textwrap.dedent(
        f"""
        import sys
        import census_scvi.build._stage as stage
        real = stage.{at}
        def paused(*a, **k):
            print("paused", flush=True)
            sys.stdin.read()  # until the test closes it
            return real(*a, **k)
        stage.{at} = paused
        stage.build_census({str(out)!r}, [{str(h5ad)!r}], append={append})
        print("done", flush=True)
        """
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout.readline().strip() == "paused", proc.stderr.read()
    return proc


# ----------------------------------------------------------------------------------------------
# item 4: one writer per census
# ----------------------------------------------------------------------------------------------
def test_second_build_of_a_census_is_refused_at_once_then_both_appends_are_kept(tmp_path):
    out = tmp_path / "atlas"
    build_census(str(out), [_h5ad(tmp_path / "a.h5ad", seed=1)])
    b, c = _h5ad(tmp_path / "b.h5ad", seed=2), _h5ad(tmp_path / "c.h5ad", seed=3)
    holder = _paused_build(out, b, at="_staged_build", append=True)  # holds the lock
    try:
        t0 = time.perf_counter()
        refused = _cli("build-census", str(out), str(c), "--append")
        waited = time.perf_counter() - t0
        assert refused.returncode == 2, refused.stderr
        line = refused.stderr.strip().splitlines()[0]
        assert f"census {out} is in use by PID {holder.pid}" in line, refused.stderr
        assert "since" in line and "Traceback" not in refused.stderr
        assert waited < 60  # refused at once: it did not wait for the holder
        assert lock_path(out).exists()
    finally:
        holder.stdin.close()  # the holder goes on and appends b
        assert holder.wait(timeout=300) == 0, holder.stderr.read()
    assert not lock_path(out).exists()
    again = _cli("build-census", str(out), str(c), "--append")
    assert again.returncode == 0, again.stderr
    assert _datasets(out) == ["a", "b", "c"]  # nothing lost


def test_two_concurrent_appends_never_lose_a_dataset(tmp_path):
    out = tmp_path / "atlas"
    build_census(str(out), [_h5ad(tmp_path / "a.h5ad", seed=1)])
    files = [_h5ad(tmp_path / f"{n}.h5ad", seed=s) for n, s in (("b", 2), ("c", 3))]
    procs = [
        subprocess.Popen(
            [*CLI, "build-census", str(out), str(f), "--append"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for f in files
    ]
    results = [(p.wait(timeout=300), p.stdout.read(), p.stderr.read()) for p in procs]
    added = []
    for (code, stdout, stderr), name in zip(results, ("b", "c"), strict=True):
        if code == 0:
            assert f"added {name}" in stdout
            added.append(name)
        else:  # the other held the lock
            assert code == 2 and "is in use by PID" in stderr, stderr
    assert added and _datasets(out) == sorted(["a", *added])


# ----------------------------------------------------------------------------------------------
# item 7: folders of killed builds
# ----------------------------------------------------------------------------------------------
def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_rerun_removes_the_staging_of_a_build_killed_with_sigkill(tmp_path):
    out = tmp_path / "atlas"
    build_census(str(out), [_h5ad(tmp_path / "a.h5ad", seed=1)])
    killed = _paused_build(out, _h5ad(tmp_path / "b.h5ad", seed=2), at="_build", append=True)
    staging = tmp_path / f".atlas.staging-{killed.pid}"
    assert staging.is_dir()  # the clone of the census, being built
    killed.send_signal(signal.SIGKILL)
    killed.wait(timeout=60)
    assert staging.is_dir() and lock_path(out).exists()  # what kill -9 leaves
    old = tmp_path / f".atlas.old-{_dead_pid()}"  # killed mid-swap
    shutil.copytree(out, old)
    size = sum(p.stat().st_size for d in (staging, old) for p in d.rglob("*") if p.is_file())
    other = tmp_path / f".other.staging-{_dead_pid()}"  # another census's: not ours to remove
    other.mkdir()
    live = tmp_path / f".atlas.staging-{os.getpid()}"  # a live process's (this test's)
    live.mkdir()

    res = _cli("build-census", str(out), str(_h5ad(tmp_path / "c.h5ad", seed=3)), "--append")
    assert res.returncode == 0, res.stderr
    assert not staging.exists() and not old.exists()
    assert other.exists() and live.exists()
    assert f"removed 2 folder(s) left by killed builds ({size / 2**20:.1f} MiB freed)" in res.stdout
    assert "taking over the lock" in res.stderr  # the dead holder's lock, with a warning
    assert _datasets(out) == ["a", "c"]  # the killed build's b was never swapped in


# ----------------------------------------------------------------------------------------------
# item 11: another organism's genes, the same cells twice, dropped obs columns
# ----------------------------------------------------------------------------------------------
def test_mouse_gene_ids_into_a_human_census_are_refused(tmp_path):
    mouse = _h5ad(tmp_path / "mouse.h5ad", prefix="ENSMUSG")
    with pytest.raises(CensusScviError) as e:
        build_census(str(tmp_path / "c"), [mouse])
    assert "mouse.h5ad: 100% of its Ensembl gene ids are Mus musculus ids (ENSMUSG...)" in str(
        e.value
    )
    assert "not Homo sapiens (ENSG...)" in str(e.value)
    assert "--organism mus_musculus" in str(e.value)
    assert not (tmp_path / "c").exists()
    human = _h5ad(tmp_path / "human.h5ad")
    with pytest.raises(CensusScviError, match=r"are Homo sapiens ids.*--organism homo_sapiens"):
        build_census(str(tmp_path / "m"), [human], organism="mus_musculus")
    # a few ids of another organism (spike-ins, a merged annotation) are not a wrong file
    genes = [f"ENSG{i:011d}" for i in range(27)] + [f"ENSMUSG{i:011d}" for i in range(3)]
    x = sp.csr_matrix(np.ones((5, 30), np.float32))
    ad.AnnData(X=x, var=pd.DataFrame(index=genes)).write_h5ad(tmp_path / "mixed.h5ad")
    assert build_census(str(tmp_path / "ok"), [tmp_path / "mixed.h5ad"]).n_genes == 30
    res = build_census(str(tmp_path / "mm"), [mouse], organism="mus_musculus")
    assert res.organism == "mus_musculus" and res.n_cells == 40


def test_the_same_cells_under_another_file_name_are_refused(tmp_path):
    out = tmp_path / "atlas"
    a = _h5ad(tmp_path / "a.h5ad", seed=1)
    build_census(str(out), [a])
    shutil.copy(a, tmp_path / "a_again.h5ad")
    with pytest.raises(CensusScviError) as e:
        build_census(str(out), [tmp_path / "a_again.h5ad"], append=True)
    msg = str(e.value)
    assert "a_again.h5ad: its 40 cells are already in the census as dataset 'a'" in msg
    assert "the same counts and genes" in msg and "--replace" in msg
    assert _datasets(out) == ["a"]
    # both copies in one build
    with pytest.raises(CensusScviError, match="already in the census as dataset 'a'"):
        build_census(str(tmp_path / "two"), [a, tmp_path / "a_again.h5ad"])
    # replacing a dataset with the same content under its own id is an update, not a duplicate
    res = build_census(str(out), [a], append=True, replace=True)
    assert res.datasets[0].replaced


def test_the_same_observation_joinids_are_refused_unless_non_primary(tmp_path):
    out = tmp_path / "atlas"
    joinids = {"observation_joinid": [f"J{i:05d}" for i in range(40)]}
    build_census(str(out), [_h5ad(tmp_path / "a.h5ad", seed=1, obs=joinids)])
    # re-processed counts, same cells
    redo = _h5ad(tmp_path / "a_reprocessed.h5ad", seed=9, obs=joinids)
    with pytest.raises(CensusScviError, match=r"dataset 'a' \(the same observation_joinids\)"):
        build_census(str(out), [redo], append=True)
    # a non-primary copy of the same cells (CELLxGENE repeats cells that way) is fine
    copy = _h5ad(
        tmp_path / "compilation.h5ad", seed=1, obs={**joinids, "is_primary_data": [False] * 40}
    )
    assert build_census(str(out), [copy], append=True).n_cells == 80
    # a census without recorded digests (built before them, or elsewhere): read from obs
    with open_collection(out, "w") as root:
        del root.metadata[METADATA_KEY]
    with pytest.raises(CensusScviError, match="the same observation_joinids"):
        build_census(str(out), [redo], append=True)
    with open_collection(out) as root:
        assert METADATA_KEY not in root.metadata  # the failed build did not touch the census
    build_census(str(out), [_h5ad(tmp_path / "d.h5ad", seed=4)], append=True)
    with open_collection(out) as root:
        recorded = json.loads(root.metadata[METADATA_KEY])
    assert set(recorded) == {"a", "compilation", "d"}  # recovered from obs, then recorded
    assert recorded["a"]["joinids"] and recorded["a"]["counts"] is None


def test_the_summary_lists_the_obs_columns_it_drops(tmp_path):
    kang = _h5ad(
        tmp_path / "kang.h5ad",
        obs={"batch": ["ctrl", "stim"] * 20, "cell_type": ["T cell"] * 40, "n_genes": [5] * 40},
    )
    res = build_census(str(tmp_path / "c"), [kang])
    assert res.datasets[0].dropped_obs == ["batch", "n_genes"]
    assert (
        "2 obs column(s) of the file not stored (not Census columns; --columns maps one onto a "
        "Census column): batch, n_genes"
    ) in res.summary()
    (tmp_path / "cols.yaml").write_text("donor_id: batch\n")
    res = build_census(str(tmp_path / "d"), [kang], columns=tmp_path / "cols.yaml")
    assert res.datasets[0].dropped_obs == ["n_genes"]
