"""A model file is data, not code (issue 12 item 1).

scvi-tools loads ``model.pt`` with ``torch.load(weights_only=False)``: a file holding the real
model plus a pickled object whose ``__reduce__`` runs code would run it. Every way census-scvi
reads a model (the encoder that map and embed load, the minified-model writer, the registry
readers, the model card's loader) must refuse such a file, naming it and the unexpected type,
before anything in it runs; a clean model must load and encode exactly as scvi-tools does.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

from census_scvi.errors import CensusScviError
from census_scvi.scvi_model import (
    encode_csr,
    load_encoder,
    load_model,
    model_file,
    model_file_globals,
    model_info,
    model_registry,
    model_var_names,
    save_minified_model,
    verify_torch_file,
)


class Payload:
    """Pickles as a call of ``exec`` that writes ``marker``: what a hostile model file holds."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('ran')",))


@pytest.fixture(scope="module")
def clean(tmp_path_factory) -> tuple[Path, object, np.ndarray, np.ndarray]:
    """A real tiny SCVI model saved by scvi-tools, its data and its latent (mean, variance)."""
    import scvi

    scvi.settings.seed = 0
    adata = scvi.data.synthetic_iid(batch_size=60, n_genes=40, n_batches=2)
    scvi.model.SCVI.setup_anndata(adata, batch_key="batch")
    model = scvi.model.SCVI(adata, n_latent=3, n_hidden=16)
    model.train(max_epochs=1, accelerator="cpu", enable_progress_bar=False)
    mean, var = model.get_latent_representation(return_dist=True)
    path = tmp_path_factory.mktemp("safety") / "clean.model"
    model.save(str(path), overwrite=True)
    return path, adata, mean, var


@pytest.fixture
def hostile(clean, tmp_path) -> tuple[Path, Path]:
    """The clean model's folder with ``model.pt`` = the real model + a payload; and the marker."""
    import shutil

    src, _, _, _ = clean
    marker = tmp_path / "payload-ran"
    folder = tmp_path / "hostile.model"
    shutil.copytree(src, folder)
    saved = torch.load(model_file(src), map_location="cpu", weights_only=False)  # our own file
    saved["attr_dict"]["payload"] = Payload(marker)
    torch.save(saved, model_file(folder))
    return folder, marker


def _entries(folder: Path, out: Path) -> dict[str, object]:
    n = 5
    obs = pd.DataFrame(index=[str(i) for i in range(n)])
    latent = np.zeros((n, 3), dtype=np.float32)
    return {
        "load_encoder (map, embed)": lambda: load_encoder(folder, accelerator="cpu"),
        "save_minified_model (embed)": lambda: save_minified_model(
            folder,
            out,
            obs=obs,
            batch_labels=np.array(["batch_0"] * n, dtype=object),
            qz_mean=latent,
            qz_var=latent + 1,
            library_size=np.ones(n, dtype=np.float32),
            accelerator="cpu",
        ),
        "model_var_names (evaluate, map)": lambda: model_var_names(folder),
        "model_registry": lambda: model_registry(folder),
        "model_info": lambda: model_info(folder),
        "load_model (evaluate's model card)": lambda: load_model(folder),
        "verify_torch_file": lambda: verify_torch_file(
            model_file(folder), allowed=model_file_globals()
        ),
    }


@pytest.mark.slow
@pytest.mark.parametrize(
    "entry",
    [
        "load_encoder (map, embed)",
        "save_minified_model (embed)",
        "model_var_names (evaluate, map)",
        "model_registry",
        "model_info",
        "load_model (evaluate's model card)",
        "verify_torch_file",
    ],
)
def test_every_model_reader_refuses_a_model_file_with_a_payload(hostile, tmp_path, entry):
    folder, marker = hostile
    load = _entries(folder, tmp_path / "minified")[entry]
    with pytest.raises(CensusScviError) as e:
        load()  # type: ignore[operator]
    msg = str(e.value)
    assert str(model_file(folder)) in msg and "builtins.exec" in msg, msg
    assert "\n" not in msg
    assert not marker.exists()
    assert not (tmp_path / "minified").exists()


@pytest.mark.slow
def test_map_entry_refuses_and_the_payload_is_real(hostile, clean):
    """encode_query (what ``census-scvi map`` runs) refuses; unrestricted torch.load runs it."""
    import anndata as ad

    from census_scvi.mapping import encode_query

    folder, marker = hostile
    _, adata, _, _ = clean
    query = ad.AnnData(X=sp.csr_matrix(adata.X), var=pd.DataFrame(index=adata.var_names))
    with pytest.raises(CensusScviError, match="refusing to load"):
        encode_query(query, folder, accelerator="cpu")
    assert not marker.exists()
    # the oracle: what scvi-tools' own load would have done
    torch.load(model_file(folder), map_location="cpu", weights_only=False)
    assert marker.read_text() == "ran"


@pytest.mark.slow
def test_clean_model_loads_and_encodes_as_scvi_tools_does(clean):
    path, adata, mean, var = clean
    encoder = load_encoder(path, accelerator="cpu")
    codes = pd.Index(encoder.batch_categories).get_indexer(adata.obs["batch"].astype(str))
    got_mean, got_var = encode_csr(encoder, sp.csr_matrix(adata.X), batch_index=codes)
    np.testing.assert_allclose(got_mean, mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got_var, var, rtol=1e-5, atol=1e-6)
    assert list(model_var_names(path)) == list(adata.var_names)
    info = model_info(path)
    assert info.batch_key == "batch" and list(info.batch_categories) == ["batch_0", "batch_1"]
    # the registry comes back as scvi-tools saved it (a defaultdict survives the safe unpickler)
    import scvi

    want = scvi.model.SCVI.load_registry(str(path))
    got = model_registry(path)
    assert type(got["field_registries"]) is type(want["field_registries"])
    assert got["field_registries"]["X"]["state_registry"]["n_vars"] == 40
    assert set(load_model(path).history) == set(scvi.model.SCVI.load(str(path), adata).history)


def test_not_a_torch_file_is_refused(tmp_path):
    folder = tmp_path / "pickle.model"
    folder.mkdir()
    model_file(folder).write_bytes(pickle.dumps({"attr_dict": {}}))
    with pytest.raises(CensusScviError, match=r"pickle\.model/model\.pt: it is not a torch\.save"):
        model_var_names(folder)
    with pytest.raises(CensusScviError, match="cannot read"):
        model_var_names(tmp_path / "missing.model")


def test_a_type_outside_the_allow_list_is_named(tmp_path):
    path = tmp_path / "state.pt"
    torch.save({"weights": torch.zeros(2), "when": pd.Timestamp("2024-01-01")}, path)
    with pytest.raises(CensusScviError, match=r"state\.pt: it holds pandas\..*_unpickle_timestamp"):
        verify_torch_file(path, allowed=model_file_globals())
    torch.save({"weights": torch.zeros(2), "epoch": 3}, path)
    data = verify_torch_file(path, allowed=())
    assert data == path.read_bytes()


@pytest.mark.slow
def test_lightning_checkpoint_needs_no_extra_globals(clean, tmp_path):
    """A Lightning ``last.ckpt`` of an scVI training holds only torch's weights_only defaults."""
    import scvi
    from lightning.pytorch.callbacks import ModelCheckpoint

    _, adata, _, _ = clean
    model = scvi.model.SCVI(adata, n_latent=3, n_hidden=16)
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    model.train(
        max_epochs=1,
        accelerator="cpu",
        enable_progress_bar=False,
        enable_checkpointing=True,
        callbacks=[ckpt],
        early_stopping=True,
        plan_kwargs={"reduce_lr_on_plateau": True},
    )
    last = tmp_path / "last.ckpt"
    assert torch.serialization.get_unsafe_globals_in_checkpoint(str(last)) == []
    verify_torch_file(last, allowed=())


@pytest.mark.slow
def test_cli_map_refuses_in_one_line_exit_2(hostile, clean, tmp_path):
    import shutil

    import anndata as ad
    from typer.testing import CliRunner

    from census_scvi.cli import app
    from census_scvi.config import dump_config, load_config

    folder, marker = hostile
    _, adata, _, _ = clean
    run = tmp_path / "run"
    shutil.copytree(folder, run / "train" / "scvi.model")
    (run / "config.yaml").write_text(dump_config(load_config(None)))
    query = tmp_path / "query.h5ad"
    ad.AnnData(X=sp.csr_matrix(adata.X), var=pd.DataFrame(index=adata.var_names)).write_h5ad(query)
    res = CliRunner().invoke(
        app, ["map", str(query), "--run", str(run), "-o", str(tmp_path / "o.h5ad")]
    )
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and "refusing to load" in lines[0] and "builtins.exec" in lines[0]
    assert not marker.exists() and not (tmp_path / "o.h5ad").exists()
