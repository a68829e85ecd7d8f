"""``census-scvi tune``: the search space, a real 3-trial tune, best.yaml, resume after kill -9."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from census_scvi.cli import app
from census_scvi.config import load_config
from census_scvi.errors import CensusScviError

optuna = pytest.importorskip("optuna")

from census_scvi.tune import DEFAULT_SPACE, load_space, parse_space, run_tune  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

#: A tiny census and model: 1 epoch, a small scib sample with two quick scib metrics.
TINY = """
census:
  organism: homo_sapiens
  version: null
  uri: "{uri}"
  obs_query_model: "is_primary_data == True and nnz >= 100"
hvg: {{top_n_hvg: 100}}
model: {{n_latent: 4, n_hidden: 16}}
train: {{max_epochs: 1, batch_size: 256, accelerator: cpu}}
embed: {{chunk_size: 500}}
evaluate:
  sample_size: 400
  skip_metrics: [kbet_per_label, nmi_ari_cluster_labels_leiden, nmi_ari_cluster_labels_kmeans,
                 isolated_labels, clisi_knn, bras, ilisi_knn, pcr_comparison]
"""

#: Two choices and a range: the test trials differ but keep shapes small.
SPACE = """
model:
  n_hidden: [8, 16]
training_plan:
  lr: {low: 1.0e-3, high: 1.0e-2, log: true}
"""


@pytest.fixture(scope="module")
def tiny_census(tmp_path_factory: pytest.TempPathFactory) -> str:
    from census_scvi.demo import make_mini_census

    path = tmp_path_factory.mktemp("tune-census") / "tiny"
    make_mini_census(path, n_cells=1500, n_genes=400, seed=1)
    return str(path)


@pytest.fixture
def tiny_config(tmp_path: Path, tiny_census: str) -> tuple[Path, Path]:
    cfg, space = tmp_path / "tiny.yaml", tmp_path / "space.yaml"
    cfg.write_text(TINY.format(uri=tiny_census))
    space.write_text(SPACE)
    return cfg, space


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open() as f:
        return list(csv.DictReader(f))


# ---- the space -------------------------------------------------------------------------------
def test_default_space_is_the_bundled_file_and_covers_the_issue_keys():
    base = load_config(None)
    default = load_space(None, base)
    bundled = load_space(REPO / "configs" / "tune-space.yaml", base)
    assert default == bundled
    keys = {p.key for p in default}
    assert keys == {
        "model.n_layers", "model.n_hidden", "model.n_latent", "model.dispersion",
        "model.gene_likelihood", "training_plan.lr", "training_plan.n_epochs_kl_warmup",
    }  # fmt: skip
    lr = next(p for p in default if p.key == "training_plan.lr")
    assert lr.log and not lr.integer and lr.describe() == "training_plan.lr in 0.0001..0.01 (log)"
    assert set(DEFAULT_SPACE) == {"model", "training_plan"}


def test_space_values_sampled_through_optuna():
    params = parse_space(
        {"model.n_layers": {"low": 1, "high": 3}, "training_plan": {"lr": [1e-3, 2e-3]}},
        load_config(None),
    )
    trial = optuna.trial.FixedTrial({"model.n_layers": 2, "training_plan.lr": 2e-3})
    assert [p.suggest(trial) for p in params] == [2, 2e-3]
    assert params[0].integer


@pytest.mark.parametrize(
    ("space", "message"),
    [
        (
            {"model": {"n_hiden": [64]}},
            "unknown key 'model.n_hiden'; did you mean 'model.n_hidden'?",
        ),
        ({"model.lr": [1e-3]}, "unknown key 'model.lr'; did you mean 'training_plan.lr'?"),
        ({"modle": {"n_hidden": [64]}}, "unknown section 'modle'; did you mean 'model'?"),
        ({"hvg": {"top_n_hvg": [100]}}, "'hvg.top_n_hvg' cannot be searched: every trial shares"),
        ({"hvg.top_n_hvg": [100]}, "'hvg.top_n_hvg' cannot be searched: every trial shares"),
        ({"evaluate": 3}, "'evaluate' cannot be searched: every trial shares"),
        ({"train.seed": [0, 1]}, "'train.seed' cannot be searched (tune reruns its finalists"),
        (
            {"model": {"gene_likelihood": ["nb", "zinbb"]}},
            "model.gene_likelihood='zinbb' is rejected",
        ),
        (
            {"model": {"n_layers": {"low": 0, "high": 3}}},
            "model.n_layers=0 is rejected by the config",
        ),
        (
            {"model": {"n_layers": {"low": 1.5, "high": 3}}},
            "is an integer key but its range is 1.5..3",
        ),
        ({"training_plan": {"lr": {"low": 0, "high": 1, "log": True}}}, "log=true needs low > 0"),
        ({"model": {"n_layers": 2}}, "model.n_layers must be a list of choices or {low"),
        ({"model": {"n_layers": []}}, "model.n_layers has no choices"),
        ([1, 2], "must be a mapping of section.key"),
    ],
)
def test_bad_spaces_fail_with_one_line(space, message):
    with pytest.raises(CensusScviError) as err:
        parse_space(space, load_config(None), where="space s.yaml")
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_cli_bad_space_file_is_one_line_before_any_work(tmp_path):
    bad = tmp_path / "space.yaml"
    bad.write_text("model:\n  n_hiden: [64, 128]\n")
    run_dir = tmp_path / "run"
    res = CliRunner().invoke(app, ["tune", "--space", str(bad), "-o", str(run_dir)])
    assert res.exit_code == 2
    lines = res.output.strip().splitlines()
    assert lines == [
        f"error: space {bad}: unknown key 'model.n_hiden'; did you mean 'model.n_hidden'?"
    ]
    assert not run_dir.exists()  # validated before the study, the lock or prepare
    bad.write_text("model: [unclosed\n")
    res = CliRunner().invoke(app, ["tune", "--space", str(bad), "-o", str(run_dir)])
    assert res.exit_code == 2 and "is not valid YAML" in res.output
    res = CliRunner().invoke(app, ["tune", "-o", str(run_dir), "--metric", "auc"])
    assert (
        res.exit_code == 2 and "--metric 'auc' is not one of total, bio, batch, elbo" in res.output
    )


# ---- a real tune -------------------------------------------------------------------------------
@pytest.mark.slow
def test_tune_three_trials_writes_a_runnable_best_yaml(tiny_config, tmp_path):
    from census_scvi.pipeline import run_pipeline

    cfg_path, space = tiny_config
    run_dir = tmp_path / "run"
    res = CliRunner().invoke(
        app,
        ["-q", "tune", "-c", str(cfg_path), "-o", str(run_dir), "--space", str(space),
         "--trials", "3", "--finalists", "1", "--seeds", "2"],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "tune: 3 trials (0 failed)" in res.output and "best: trial" in res.output
    tune = run_dir / "tune"
    rows = _rows(tune / "leaderboard.csv")
    assert len(rows) == 3 + 1  # 3 trials, 1 finalist rerun with a second seed
    assert [r["run"] for r in rows].count("seed rerun") == 1
    assert all(r["status"] == "ok" for r in rows)
    for r in rows:
        assert 0.0 < float(r["Total"]) <= 1.0 and float(r["ELBO"]) > 0
        assert set(json.loads(r["params"])) == {"model.n_hidden", "training_plan.lr"}
    rerun = next(r for r in rows if r["run"] == "seed rerun")
    assert rerun["seed"] == "1" and (tune / f"trial-{int(rerun['trial']):03d}-seed1").is_dir()
    # every trial shares one prepare, through a relative link
    link = tune / "trial-000" / "prepare"
    assert link.is_symlink() and (link / "anndata_model.h5ad").is_file()
    assert (tune / "summary.md").read_text().startswith("# census-scvi tune")
    assert (tune / "total.png").stat().st_size > 0

    best = load_config(tune / "best.yaml")  # unchanged: the full resolved config
    params = json.loads(rerun["params"])
    assert best.model.n_hidden == params["model.n_hidden"]
    assert best.training_plan.lr == pytest.approx(params["training_plan.lr"])
    assert best.train.max_epochs == 1 and best.embed.write_soma  # the user's settings kept
    assert Path(best.output.run_dir) == run_dir.resolve()
    out = run_pipeline(best, run_dir=best.output.run_dir, to_stage="embed")
    assert [(s.stage, s.skipped) for s in out.stages] == [
        ("prepare", True), ("train", False), ("embed", False),
    ]  # fmt: skip

    # rerunning the finished tune redoes nothing and says the same
    again = run_tune(load_config(cfg_path), run_dir=run_dir, space=space, trials=3, finalists=1)
    assert again.best is not None and again.best.label == int(rerun["trial"])
    assert len(_rows(tune / "leaderboard.csv")) == 4


@pytest.mark.slow
def test_tune_resumes_after_kill_9_without_redoing_finished_trials(tiny_config, tmp_path):
    cfg_path, space = tiny_config
    run_dir = tmp_path / "run"
    tune = run_dir / "tune"
    # --metric elbo: trials stop after train, so the kill lands in a trial within seconds
    cmd = [sys.executable, "-m", "census_scvi.cli", "-q", "tune", "-c", str(cfg_path),
           "-o", str(run_dir), "--space", str(space), "--trials", "2", "--metric", "elbo",
           "--seeds", "1"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    first = tune / "trial-000" / "train" / "manifest.json"
    deadline = time.monotonic() + 240
    while not (tune / "trial-001").exists():
        assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
        assert time.monotonic() < deadline, "the tune did not reach its second trial"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert first.is_file() and not (tune / "trial-001" / "train" / "manifest.json").exists()
    finished_at = first.stat().st_mtime_ns

    storage = f"sqlite:///{tune / 'study.db'}"
    study = optuna.load_study(study_name="census-scvi-tune", storage=storage)
    states = [t.state.name for t in study.trials]
    assert states == ["COMPLETE", "RUNNING"]  # the killed trial is left running

    result = run_tune(
        load_config(cfg_path), run_dir=run_dir, space=space, trials=2, metric="elbo", seeds=1
    )
    assert result.n_trials == 2 and result.n_failed == 0 and result.n_retried == 1
    assert first.stat().st_mtime_ns == finished_at  # trial 0 was not trained again
    study = optuna.load_study(study_name="census-scvi-tune", storage=storage)
    assert [t.state.name for t in study.trials] == ["COMPLETE", "FAIL", "COMPLETE"]
    retry = study.trials[2]
    assert retry.user_attrs["label"] == 1 and retry.user_attrs["retry_of"] == 1
    assert retry.params == study.trials[1].params  # the same parameters, in trial-001 again
    rows = _rows(tune / "leaderboard.csv")
    assert [(r["trial"], r["status"]) for r in rows] == [("0", "ok"), ("1", "ok")]
    assert yaml.safe_load((tune / "best.yaml").read_text())["train"]["max_epochs"] == 1


# ---- the bookkeeping, with a stand-in for the pipeline ------------------------------------------
@pytest.fixture
def fake_pipeline(monkeypatch: pytest.MonkeyPatch):
    """Trials scored by a function of their params instead of a real train/embed/evaluate."""
    from census_scvi.tune import _stage
    from census_scvi.tune._trials import Score

    calls: list[tuple[str, dict]] = []
    state = {"fail": False}

    def fake_run_trial(config, *, run_dir, tdir, metric):
        calls.append((tdir.name, {"lr": config.training_plan.lr, "seed": config.train.seed}))
        if state["fail"]:
            return Score(status="failed: no census at /nowhere")
        total = 0.5 + config.training_plan.lr * 10 + config.train.seed * 0.001
        return Score(total=total, bio=total, batch=total, elbo=100.0, seconds=0.1)

    monkeypatch.setattr(_stage, "run_trial", fake_run_trial)
    monkeypatch.setattr(_stage, "_shared_prepare", lambda config, run_dir: None)
    return calls, state


def test_set_up_failures_stop_the_tune_and_are_retried_on_the_next_run(fake_pipeline, tmp_path):
    calls, state = fake_pipeline
    space = tmp_path / "space.yaml"
    space.write_text("training_plan:\n  lr: {low: 1.0e-3, high: 1.0e-2, log: true}\n")
    cfg = load_config(None)
    state["fail"] = True
    with pytest.raises(
        CensusScviError, match="first 3 trials all failed, the last one failed: no census"
    ):
        run_tune(cfg, run_dir=tmp_path / "run", space=space, trials=5, finalists=2, seeds=2)
    assert [c[0] for c in calls] == ["trial-000", "trial-001", "trial-002"]
    first_lrs = [c[1]["lr"] for c in calls]
    calls.clear()
    state["fail"] = False
    result = run_tune(cfg, run_dir=tmp_path / "run", space=space, trials=5, finalists=2, seeds=2)
    # the failed trials ran again in their folders with their params, then two new ones, then
    # the two finalists with seed 1
    names = [c[0] for c in calls]
    assert names[:3] == ["trial-000", "trial-001", "trial-002"]
    assert [c[1]["lr"] for c in calls[:3]] == first_lrs
    assert names[3:5] == ["trial-003", "trial-004"]
    assert result.n_trials == 5 and result.n_failed == 0 and len(calls) == 7
    rows = _rows(tmp_path / "run" / "tune" / "leaderboard.csv")
    trials = [r for r in rows if r["run"] == "trial"]
    assert [r["trial"] for r in trials] == ["0", "1", "2", "3", "4"]
    top2 = sorted(trials, key=lambda r: -float(r["Total"]))[:2]
    assert names[5:] == [f"trial-{int(r['trial']):03d}-seed1" for r in top2]
    best_lr = max(json.loads(r["params"])["training_plan.lr"] for r in rows)
    assert result.best is not None and result.best.params["training_plan.lr"] == best_lr

    calls.clear()  # finished: a rerun reads everything back
    again = run_tune(cfg, run_dir=tmp_path / "run", space=space, trials=5, finalists=2, seeds=2)
    assert calls == [] and again.best is not None and again.best.label == result.best.label
    more = run_tune(cfg, run_dir=tmp_path / "run", space=space, trials=6, finalists=2, seeds=2)
    assert [c[0] for c in calls][0] == "trial-005" and more.n_trials == 6


def test_a_study_of_another_config_is_refused(fake_pipeline, tmp_path):
    space = tmp_path / "space.yaml"
    space.write_text("model:\n  n_hidden: [16, 32]\n")
    run_tune(load_config(None), run_dir=tmp_path / "run", space=space, trials=1, seeds=1)
    changed = load_config(None, overrides=["train.max_epochs=3"])
    with pytest.raises(CensusScviError, match="holds a tune of another config, space or metric"):
        run_tune(changed, run_dir=tmp_path / "run", space=space, trials=2, seeds=1)
    # output.run_dir is not part of what a trial means
    moved = load_config(None, overrides=["output.run_dir=elsewhere"])
    assert run_tune(moved, run_dir=tmp_path / "run", space=space, trials=1, seeds=1).n_trials == 1
