"""Config: the original YAML loads unchanged, typos and bad values fail with clear messages."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from census_scvi import CensusScviError, load_config
from census_scvi.cli import app
from census_scvi.config import Config, config_hash, default_config_path, dump_config
from conftest import REPO, SEED_CONFIG

runner = CliRunner()


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_seed_config_loads_unchanged_and_every_key_maps_to_a_field():
    raw = yaml.safe_load(SEED_CONFIG.read_text())
    cfg = load_config(SEED_CONFIG)
    dumped = cfg.model_dump()
    for section, body in raw.items():
        for key, value in body.items():
            got = dumped[section][key]
            if isinstance(value, list):
                assert list(got) == value, (section, key)
            else:
                assert got == value, (section, key)
    assert cfg.model.n_hidden == 512
    assert cfg.model.n_latent == 50
    assert cfg.train.devices == [0, 1, 2, 3]
    assert cfg.training_plan.lr == pytest.approx(1e-4)
    assert cfg.census.version == "2024-05-20"


def test_bundled_census_config_is_the_seed():
    a = load_config(REPO / "configs" / "census.yaml")
    b = load_config(SEED_CONFIG)
    assert a == b


def test_atlas_preset_is_the_census_layout_with_the_tuned_model():
    """configs/atlas.yaml keeps the seed config's cells, genes and batch label and changes only
    model, training_plan and train (the values docs/tuning.md documents)."""
    atlas = load_config(REPO / "configs" / "atlas.yaml")
    seed = load_config(REPO / "configs" / "census.yaml")
    for section in ("census", "hvg", "anndata"):
        assert getattr(atlas, section) == getattr(seed, section), section
    assert atlas.model != seed.model and atlas.training_plan != seed.training_plan
    doc = (REPO / "docs" / "tuning.md").read_text()
    m = atlas.model
    assert f"n_layers={m.n_layers}, n_hidden={m.n_hidden}, n_latent={m.n_latent}" in doc


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        (
            "train.max_epoch=3",
            "unknown key 'max_epoch' in section 'train'; did you mean 'max_epochs'?",
        ),
        ("trian.max_epochs=3", "unknown section 'trian'; did you mean 'train'?"),
        ("model.n_hiden=3", "did you mean 'n_hidden'"),
    ],
)
def test_unknown_keys_name_section_key_and_suggestion(override, needle):
    with pytest.raises(CensusScviError) as e:
        load_config(SEED_CONFIG, overrides=[override])
    assert needle in str(e.value)


def test_unknown_key_in_file_lists_valid_keys_when_nothing_is_close(tmp_path):
    p = _write(tmp_path, "hvg:\n  zzzz: 3\n")
    with pytest.raises(CensusScviError) as e:
        load_config(p)
    msg = str(e.value)
    assert "'zzzz'" in msg and "'hvg'" in msg and "top_n_hvg" in msg


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("model.n_hidden=-5", "-5"),
        ("model.n_hidden=abc", "'abc'"),
        ("train.train_size=1.5", "1.5"),
        ("model.gene_likelihood=gauss", "'gauss'"),
        ("train.devices=0", "devices=0"),
    ],
)
def test_bad_values_show_the_value(override, needle):
    with pytest.raises(CensusScviError) as e:
        load_config(SEED_CONFIG, overrides=[override])
    assert needle in str(e.value)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("search.k=0", "invalid value for 'search.k': 0: Input should be greater than 0"),
        ("search.recall_target=1.5", "'search.recall_target': 1.5: Input should be less than"),
        ("search.nprobe=0", "invalid value for 'search.nprobe': 0"),
        ("search.partitions=-3", "invalid value for 'search.partitions': -3"),
        ("search.memory_gib=0", "invalid value for 'search.memory_gib': 0"),
        ("search.build_memory_mib=true", "expected a number, got True"),
        ("map.use_index=1", "'map.use_index': 1: expected true or false"),
        ("embed.index=2", "'embed.index': 2: expected true or false"),
        ("search.nprob=4", "unknown key 'nprob' in section 'search'; did you mean 'nprobe'?"),
    ],
)
def test_search_keys_refuse_bad_values(override, needle):
    with pytest.raises(CensusScviError) as e:
        load_config(None, overrides=[override])
    assert needle in str(e.value)
    assert "\n" not in str(e.value)


def test_search_section_defaults_and_embed_index_leaves_stage_hashes_alone(tmp_path):
    cfg = load_config(None)
    s = cfg.search
    assert (s.partitions, s.k, s.recall_target, s.calibration_cells) == (None, 30, 0.95, 1000)
    assert (s.build_memory_mib, s.memory_gib, s.nprobe) == (64, 4.0, None)
    assert cfg.map.use_index is True and cfg.embed.index is False
    on = load_config(None, overrides=["embed.index=true", "search.nprobe=8", "map.use_index=false"])
    assert on.embed.index is True and on.search.nprobe == 8 and on.map.use_index is False
    # switching the index on does not redo embed (its hash leaves the key out); the other embed
    # keys still count
    embed = ["census", "anndata", "embed"]
    assert config_hash(on, embed) == config_hash(cfg, embed)
    other = load_config(None, overrides=["embed.round_bfloat16=false"])
    assert config_hash(other, embed) != config_hash(cfg, embed)
    # a YAML file with the section loads; the dump carries it
    path = _write(tmp_path, "search:\n  k: 10\n  partitions: 50\nembed:\n  index: true\n")
    from_file = load_config(path)
    assert from_file.search.k == 10 and from_file.search.partitions == 50
    assert "search:" in dump_config(from_file) and "use_index: true" in dump_config(from_file)


def test_overrides_are_typed_by_field():
    cfg = load_config(
        SEED_CONFIG,
        overrides=[
            "train.max_epochs=5",
            "training_plan.lr=3e-4",
            "census.version=2023-12-15",
            "hvg.hvg_batch=[assay]",
            "train.early_stopping=true",
            "census.obs_query=tissue_general == 'blood'",
        ],
    )
    assert cfg.train.max_epochs == 5
    assert cfg.training_plan.lr == pytest.approx(3e-4)
    assert cfg.census.version == "2023-12-15"
    assert cfg.hvg.hvg_batch == ["assay"]
    assert cfg.train.early_stopping is True
    assert cfg.census.obs_query == "tissue_general == 'blood'"


def test_config_is_frozen():
    cfg = load_config(SEED_CONFIG)
    with pytest.raises(Exception):  # noqa: B017 - pydantic's ValidationError for frozen models
        cfg.model.n_hidden = 3  # type: ignore[misc]


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("", "is empty"),
        ("- a\n- b\n", "must be a mapping"),
        ("train: [1, 2\n", "not valid YAML"),
        ("train: 3\n", "section 'train' must be a mapping"),
    ],
)
def test_malformed_files_give_one_clear_line(tmp_path, text, needle):
    with pytest.raises(CensusScviError) as e:
        load_config(_write(tmp_path, text))
    assert needle in str(e.value)
    assert "\n" not in str(e.value)


def test_missing_file(tmp_path):
    with pytest.raises(CensusScviError, match="not found"):
        load_config(tmp_path / "nope.yaml")


def test_model_filter_joins_parts_with_and():
    cfg = load_config(
        SEED_CONFIG, overrides=["census.obs_query=tissue == 'lung'", "hvg.min_genes=500"]
    )
    assert cfg.model_obs_filter() == (
        "(is_primary_data == True and nnz >= 300) and (tissue == 'lung') and (nnz >= 500)"
    )


def test_dump_roundtrips_and_fills_defaults():
    cfg = load_config(None)
    text = dump_config(cfg)
    again = Config.model_validate(yaml.safe_load(text))
    assert again == cfg
    assert config_hash(again) == config_hash(cfg)
    assert "dropout_rate" in text  # a default not written in demo.yaml


def test_default_config_is_demo():
    assert default_config_path().name == "demo.yaml"
    cfg = load_config(None)
    assert cfg.census.demo is not None
    assert "{cache}" in (cfg.census.uri or "")


def test_cli_config_prints_resolved_seed_config():
    res = runner.invoke(app, ["config", "-c", str(SEED_CONFIG)])
    assert res.exit_code == 0, res.output
    printed = yaml.safe_load(res.stdout)
    assert printed["model"]["n_hidden"] == 512
    assert printed["model"]["gene_likelihood"] == "nb"
    assert "n_hidden: 512" in res.stdout


def test_cli_typo_exits_2_naming_the_key():
    res = runner.invoke(app, ["config", "-c", str(SEED_CONFIG), "--set", "train.max_epoch=3"])
    assert res.exit_code == 2
    assert "max_epoch" in res.stderr
    assert "Traceback" not in res.output


def test_cli_version_and_help():
    res = runner.invoke(app, ["--version"])
    assert res.exit_code == 0 and "census-scvi" in res.stdout
    res = runner.invoke(app, ["--help"])
    assert res.exit_code == 0
    for cmd in (
        "demo-data",
        "config",
        "prepare",
        "train",
        "embed",
        "evaluate",
        "run",
        "map",
        "build-census",
    ):
        assert cmd in res.stdout
