"""Lightning DDP with 2 CPU processes (gloo) in both data modes and with both memory loaders:
disjoint data per rank, one model.

Lightning's DDP launcher starts rank 1 by re-running the command line of rank 0, so each case runs
a small script in a subprocess (as a user's ``census-scvi train`` would), not inside pytest.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from census_scvi.config import load_config
from census_scvi.prepare import run_prepare
from census_scvi.train._stage import DDP_STRATEGY

SCRIPT = textwrap.dedent(
    """
    import sys
    from pathlib import Path

    import numpy as np
    from lightning.pytorch import Callback

    from census_scvi.config import load_config
    from census_scvi.train import run_train

    mode, uri, run_dir, out = sys.argv[1:5]


    class Record(Callback):
        # what each rank trains on: soma_joinids per epoch
        def on_train_epoch_start(self, trainer, pl_module):
            self.ids = []
            if mode == "memory-scvi-tools":
                dl = trainer.train_dataloader
                rows = np.asarray(dl.indices)[np.concatenate([np.asarray(b) for b in dl.sampler])]
                self.ids.append(trainer._model.adata.obs["soma_joinid"].to_numpy()[rows])

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if mode == "stream":
                self.ids.append(batch["soma_joinid"].cpu().numpy())
            elif mode == "memory":  # the census-scvi loader names the h5ad rows
                rows = batch["row"].cpu().numpy()
                self.ids.append(trainer._model.adata.obs["soma_joinid"].to_numpy()[rows])

        def on_train_epoch_end(self, trainer, pl_module):
            name = f"rank{trainer.global_rank}-epoch{trainer.current_epoch}.npy"
            np.save(Path(out) / name, np.concatenate(self.ids))


    cfg = load_config(None, overrides=[
        f"census.uri={uri}", "hvg.top_n_hvg=50", "model.n_hidden=16", "model.n_latent=4",
        "train.max_epochs=2", "train.batch_size=256", "train.accelerator=cpu",
        "train.multi_gpu=true", "train.devices=2", f"train.mode={mode.split('-')[0]}",
        f"train.memory_loader={'scvi-tools' if mode.endswith('scvi-tools') else 'census-scvi'}",
        "train.stream_io_batch_size=1024",
        # epoch 1 is not a multiple: rank 0's clock decides for both ranks whether to save
        "train.checkpoint_every_n_epochs=5",
    ])
    result = run_train(cfg, run_dir=Path(run_dir), callbacks=[Record()])
    print("RESULT", result.is_global_zero, result.epochs, flush=True)
    """
)


@pytest.fixture(scope="module")
def prepared(mini_census, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("ddp") / "prepared"
    cfg = load_config(None, overrides=[f"census.uri={mini_census}", "hvg.top_n_hvg=50"])
    run_prepare(cfg, run_dir=run)
    return run


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["memory", "stream", "memory-scvi-tools"])
def test_ddp_two_cpu_processes(mode, prepared, mini_census, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(prepared / "prepare", run / "prepare")
    out = tmp_path / "seen"
    out.mkdir()
    script = tmp_path / "train_ddp.py"
    script.write_text(SCRIPT)
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "RANK", "WORLD_SIZE")}
    env["PYTHONUNBUFFERED"] = "1"
    proc = subprocess.run(
        [sys.executable, str(script), mode, mini_census, str(run), str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "RESULT True 2" in proc.stdout  # rank 0 saved and reports 2 epochs

    cells = pd.read_parquet(run / "prepare/cells.parquet")
    for epoch in (0, 1):
        r0 = np.load(out / f"rank0-epoch{epoch}.npy")
        r1 = np.load(out / f"rank1-epoch{epoch}.npy")
        assert len(r0) == len(r1) > 0
        assert not set(r0) & set(r1), "ranks trained on overlapping cells"
        assert len(set(r0)) == len(r0) and len(set(r1)) == len(r1)
        both = set(r0) | set(r1)
        assert both <= set(cells["soma_joinid"])
        assert len(both) >= 0.85 * len(cells)  # ~90% train split, all of it covered
    # one model, saved once, by rank 0
    model_dir = run / "train/scvi.model"
    assert sorted(p.name for p in model_dir.iterdir()) == ["model.pt"]
    assert not list((run / "train").glob(".*.tmp-*"))
    manifest = json.loads((run / "train/manifest.json").read_text())
    device = manifest["figures"]["device"]
    assert device["world_size"] == 2 and device["strategy"] == DDP_STRATEGY
    assert manifest["figures"]["epochs"] == 2
    hist = pd.read_csv(run / "train/logs/history.csv")
    assert list(hist["epoch"]) == [0, 1]
