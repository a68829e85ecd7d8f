"""Our embedding passes every check of the Census contributed-embedding format (issue 15 item 1).

Written from the format's facts (cellxgene-census ``tools/census_contrib``: the schema document,
``EmbeddingMetadata`` and ``validate.py``), with no network: the array (float32 SparseNDArray,
dims, shape, every embedded cell stored explicitly even where a value is zero, no duplicate
coordinates, every joinid in obs, at least one cell, TileDB storage version of the census,
bfloat16-representable values rounded half to even) and the metadata (required keys and types,
ISO submission_date, DOI not a URL), in ``CxG_embedding_info`` and in ``meta.yml``.
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import yaml

from census_scvi.config import load_config
from census_scvi.constants import EMBEDDING_INFO_KEY
from census_scvi.embed._embedding import (
    META_FIELDS,
    census_version_of,
    round_bfloat16,
    write_embedding_soma,
)
from census_scvi.errors import CensusScviError

CONTACT = {"name": "Sue Smith", "email": "sue@university.edu", "affiliation": "Smith Lab"}
STRINGS = ("id", "embedding_name", "title", "description", "DOI", "additional_information",
           "model_link", "data_type", "census_version", "experiment_name", "measurement_name",
           "submission_date")  # fmt: skip


def check_array(uri: str, census_uri: str, info: dict) -> None:
    """The format's array checks, as census_contrib's validate.py applies them."""
    import tiledbsoma as soma

    with soma.open(census_uri) as census:
        exp = census["census_data"][info["experiment_name"]]
        obs_ids = exp.obs.read(column_names=["soma_joinid"]).concat()["soma_joinid"].to_numpy()
        census_obs_uri = exp.obs.uri
        assert info["measurement_name"] in exp.ms
    with soma.open(uri) as arr:
        assert isinstance(arr, soma.SparseNDArray)
        assert arr.schema.field("soma_data").type == pa.float32()
        assert arr.schema.field("soma_dim_0").type == "int64"
        assert arr.schema.field("soma_dim_1").type == "int64"
        assert arr.shape == (obs_ids.max() + 1, info["n_features"])  # the obs shape
        assert arr.nnz > 0  # at least one cell
        tbl = arr.read(result_order="row-major").tables().concat()
    i = tbl["soma_dim_0"].to_numpy()
    j = tbl["soma_dim_1"].to_numpy()
    v = tbl["soma_data"].to_numpy()
    assert np.isin(i, obs_ids).all()  # every joinid present in obs
    assert ((j >= 0) & (j < info["n_features"])).all()
    flat = i * info["n_features"] + j
    assert (np.diff(flat) > 0).all()  # sorted, so no duplicate coordinates
    # every embedded cell stored explicitly: n_features values per cell, zeros included
    cells, per_cell = np.unique(i, return_counts=True)
    assert cells.size == info["n_embeddings"] and (per_cell == info["n_features"]).all()
    # bfloat16-representable (8-bit exponent, 7-bit mantissa): the low 16 bits are zero
    assert (v.astype(np.float32).view(np.uint32) & 0xFFFF == 0).all()
    tiledb = pytest.importorskip("tiledb")
    with tiledb.open(uri) as a, tiledb.open(census_obs_uri) as c:
        assert a.schema.version == c.schema.version  # TileDB storage version of the census


def check_metadata(info: dict) -> None:
    """Required keys with the right types (EmbeddingMetadata), ISO date, DOI not a URL."""
    assert tuple(info) == META_FIELDS  # exactly the fields: the tool forbids extra keys
    for key in STRINGS:
        assert isinstance(info[key], str), key
    for key in ("n_embeddings", "n_features"):
        assert isinstance(info[key], int) and not isinstance(info[key], bool), key
    assert info["n_embeddings"] >= 1 and info["n_features"] >= 1
    assert info["data_type"] == "obs_embedding" and info["measurement_name"] == "RNA"
    assert 1 <= len(info["title"]) <= 128 and 1 <= len(info["description"]) <= 2048
    for contact in [info["primary_contact"], *info["additional_contacts"]]:
        assert set(contact) == {"name", "email", "affiliation"}
        assert all(isinstance(x, str) for x in contact.values())
    assert isinstance(info["additional_contacts"], list)
    dt.date.fromisoformat(info["submission_date"])
    assert "://" not in info["DOI"] and not info["DOI"].startswith("doi.org")


# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def embedded(mini_census, tmp_path_factory) -> tuple[Path, dict]:
    from census_scvi.embed import run_embed
    from test_embed import embed_config, train_tiny_model

    run_dir = tmp_path_factory.mktemp("census-format") / "run"
    train_tiny_model(mini_census, run_dir)
    cfg = embed_config(
        mini_census,
        "embed.write_minified_model=false",
        "embed.embedding_id=CxG-contrib-99999",
        "embed.submitter_name=Sue Smith",
        "embed.submitter_email=sue@university.edu",
        "embed.doi=10.1038/s41592-018-0229-2",
        f"embed.additional_contacts=[{json.dumps(CONTACT)}]",
    )
    run_embed(cfg, run_dir=run_dir)
    return run_dir, json.loads((run_dir / "embed" / "manifest.json").read_text())


@pytest.mark.slow
def test_embedding_soma_passes_the_format_checks(embedded, mini_census):
    import tiledbsoma as soma

    run_dir, _ = embedded
    uri = str(run_dir / "embed" / "embedding.soma")
    with soma.open(uri) as arr:
        info = json.loads(arr.metadata[EMBEDDING_INFO_KEY])
    check_metadata(info)
    check_array(uri, mini_census, info)
    assert info["embedding_name"] == "scvi" and info["id"] == "CxG-contrib-99999"
    assert info["additional_contacts"] == [CONTACT]
    assert info["DOI"] == "10.1038/s41592-018-0229-2"
    # a local census: its own build date, as census_info/summary says
    with soma.open(mini_census) as census:
        summary = census["census_info"]["summary"].read().concat().to_pandas()
    assert info["census_version"] == summary.set_index("label").loc["census_build_date", "value"]


@pytest.mark.slow
def test_values_are_the_latent_rounded_half_to_even_and_latent_keeps_precision(embedded):
    import tiledbsoma as soma
    import torch

    run_dir, _ = embedded
    latent = np.load(run_dir / "embed" / "latent.npy")
    idx = np.load(run_dir / "embed" / "latent-idx.npy")
    with soma.open(str(run_dir / "embed" / "embedding.soma")) as arr:
        tbl = arr.read(result_order="row-major").tables().concat()
    dense = np.zeros((idx.max() + 1, latent.shape[1]), dtype=np.float32)
    dense[tbl["soma_dim_0"].to_numpy(), tbl["soma_dim_1"].to_numpy()] = tbl["soma_data"].to_numpy()
    want = torch.from_numpy(latent).to(torch.bfloat16).to(torch.float32).numpy()  # RNE
    np.testing.assert_array_equal(dense[idx], want)
    assert (latent.view(np.uint32) & 0xFFFF != 0).mean() > 0.9  # latent.npy: full float32


@pytest.mark.slow
def test_meta_yml_is_what_the_contribution_tool_reads(embedded):
    import tiledbsoma as soma

    run_dir, manifest = embedded
    text = (run_dir / "embed" / "meta.yml").read_text()
    meta = yaml.safe_load(text)
    assert tuple(meta) == META_FIELDS
    assert isinstance(meta["submission_date"], dt.date)  # an unquoted YAML date
    with soma.open(str(run_dir / "embed" / "embedding.soma")) as arr:
        info = json.loads(arr.metadata[EMBEDDING_INFO_KEY])
    assert {**meta, "submission_date": meta["submission_date"].isoformat()} == info
    assert manifest["outputs"]["meta.yml"] == "embed/meta.yml"


def test_every_cell_stored_even_where_the_value_is_zero(tmp_path, mini_census):
    latent = np.zeros((4, 3), dtype=np.float32)
    latent[1] = [1.0, 0.0, -2.0]
    info = {
        "experiment_name": "homo_sapiens",
        "measurement_name": "RNA",
        "n_embeddings": 4,
        "n_features": 3,
    }
    joinids = np.array([0, 5, 6, 2999], dtype=np.int64)
    uri = str(tmp_path / "e.soma")
    write_embedding_soma(uri, latent=latent, joinids=joinids, n_obs=3000, info=info)
    check_array(uri, mini_census, info)


def test_round_bfloat16_half_to_even():
    # 1 + 2^-8 is halfway between 1 and 1 + 2^-7: to even (1); 1 + 3*2^-8 -> 1 + 2^-6 (even)
    a = np.array([1 + 2**-8, 1 + 3 * 2**-8, -(1 + 2**-8), 1 + 2**-8 + 2**-20], dtype=np.float32)
    got = round_bfloat16(a.copy())
    np.testing.assert_array_equal(got, [1.0, 1 + 2**-6, -1.0, 1 + 2**-7])


class _Table:
    def __init__(self, rows: dict[str, str]) -> None:
        self.rows = rows

    def read(self):
        import pandas as pd
        import pyarrow as pa

        frame = pd.DataFrame({"label": list(self.rows), "value": list(self.rows.values())})
        return type("R", (), {"concat": lambda _s: pa.Table.from_pandas(frame)})()


def test_census_version_is_the_release_name_or_the_build_date():
    census = {"census_info": {"summary": _Table({"census_build_date": "2025-11-08"})}}
    assert census_version_of(census, "2025-01-30") == "2025-01-30"  # a release name: kept
    assert census_version_of(census, "stable") == "2025-11-08"  # an alias: its release
    assert census_version_of(census, None) == "2025-11-08"  # a local census: its build date
    assert census_version_of({"census_info": {}}, None) == "unknown"


@pytest.mark.parametrize(
    ("value", "ok"),
    [
        ("10.1038/s41592-018-0229-2", True),
        ("https://doi.org/10.1038/s41592-018-0229-2", False),
        ("doi.org/10.1/x", False),
        ("not a doi", False),
    ],
)
def test_doi_must_be_a_doi_not_a_url(value, ok):
    if ok:
        assert load_config(None, overrides=[f"embed.doi={value}"]).embed.doi == value
    else:
        with pytest.raises(CensusScviError, match="not a DOI"):
            load_config(None, overrides=[f"embed.doi={value}"])


def test_contacts_need_name_email_affiliation():
    with pytest.raises(CensusScviError, match="each needs exactly"):
        load_config(None, overrides=['embed.additional_contacts=[{"name": "x"}]'])
    cfg = load_config(None)
    assert cfg.embed.round_bfloat16 is True and cfg.embed.embedding_name == "scvi"
    assert cfg.embed.additional_contacts == [] and cfg.embed.doi == ""
