import json

import pytest

from tests.conftest import write
from twotower_cli.config import load_config
from twotower_cli.errors import ConfigError


def test_defaults_are_the_documented_ones():
    cfg = load_config(env={}, env_origin={})
    assert cfg.train.batch_size == 256 and cfg.train.epochs == 8 and cfg.train.learning_rate == 1e-2
    assert cfg.model.shared_embeddings is True and cfg.data.tokenize == "auto"
    assert cfg.sources["train"]["batch_size"] == "default"


def test_precedence_default_toml_env_flag(tmp_path, monkeypatch):
    write(tmp_path / "config.toml", "[train]\nbatch_size = 64\nepochs = 7\nlearning_rate = 0.01\n")
    write(tmp_path / ".env", "TWOTOWER_TRAIN_EPOCHS=9\nTWOTOWER_TRAIN_LEARNING_RATE=0.02\n")
    monkeypatch.setenv("TWOTOWER_TRAIN_LEARNING_RATE", "0.03")  # real variable beats .env
    cfg = load_config(overrides={("train", "seed"): 5})
    assert cfg.train.batch_size == 64 and cfg.sources["train"]["batch_size"] == "config.toml"
    assert cfg.train.epochs == 9 and cfg.sources["train"]["epochs"] == "env"
    assert cfg.train.learning_rate == 0.03
    assert cfg.train.seed == 5 and cfg.sources["train"]["seed"] == "flag"
    assert cfg.train.hidden_dim if hasattr(cfg.train, "hidden_dim") else cfg.model.hidden_dim == 128
    cfg = load_config(overrides={("train", "epochs"): 2})
    assert cfg.train.epochs == 2  # flag beats env


def test_config_path_from_flag_and_variable(tmp_path, monkeypatch):
    write(tmp_path / "other.toml", "[train]\nepochs = 11\n")
    assert load_config(tmp_path / "other.toml", env={}).train.epochs == 11
    monkeypatch.setenv("TWOTOWER_CONFIG", str(tmp_path / "other.toml"))
    assert load_config().train.epochs == 11


def test_wandb_aliases(monkeypatch):
    monkeypatch.setenv("WANDB_PROJECT", "proj")
    monkeypatch.setenv("WANDB_API_KEY", "secret-key-123456")
    cfg = load_config()
    assert cfg.wandb.project == "proj"
    assert "secret-key-123456" not in json.dumps(cfg.to_dict())


@pytest.mark.parametrize("toml,needle", [
    ("[train]\nbatchsize = 3\n", "train.batchsize"),
    ("[train]\nbatch_size = 'big'\n", "train.batch_size"),
    ("[nope]\nx = 1\n", "[nope]"),
    ("[train\n", "not valid TOML"),
])
def test_bad_config_file_is_one_clear_error(tmp_path, toml, needle, cli):
    write(tmp_path / "config.toml", toml)
    with pytest.raises(ConfigError, match=None) as exc:
        load_config()
    assert needle in str(exc.value) and "config.toml" in str(exc.value)
    res = cli("config")
    assert res.exit_code == 1 and needle in res.stderr and "Traceback" not in res.stderr


def test_bad_environment_names_the_variable(monkeypatch, cli):
    monkeypatch.setenv("TWOTOWER_TRAIN_EPOCS", "3")
    res = cli("config")
    assert res.exit_code == 1 and "TWOTOWER_TRAIN_EPOCS" in res.stderr
    monkeypatch.delenv("TWOTOWER_TRAIN_EPOCS")
    monkeypatch.setenv("TWOTOWER_TRAIN_EPOCHS", "three")
    res = cli("config")
    assert res.exit_code == 1 and "TWOTOWER_TRAIN_EPOCHS" in res.stderr and "int" in res.stderr


def test_variables_outside_the_settings_sections_are_left_alone(monkeypatch, cli):
    """CI and other tools use TWOTOWER_* names of their own (TWOTOWER_REQUIRE_CHROMIUM); only a typo inside a
    known section is an error."""
    monkeypatch.setenv("TWOTOWER_REQUIRE_CHROMIUM", "1")
    assert cli("config").exit_code == 0
    monkeypatch.setenv("TWOTOWER_MODEL_HIDEN_DIM", "3")
    res = cli("config")
    assert res.exit_code == 1 and "TWOTOWER_MODEL_HIDEN_DIM" in res.stderr


def test_config_command_json_shows_sources_and_masks_secrets(tmp_path, monkeypatch, cli):
    write(tmp_path / "config.toml", "[model]\nembedding_dim = 32\n")
    write(tmp_path / ".env", "WANDB_API_KEY=abcdef0123456789\n")
    monkeypatch.setenv("TWOTOWER_TRAIN_EPOCHS", "4")
    res = cli("config", "--json")
    assert res.exit_code == 0, res.stderr
    doc = json.loads(res.stdout)
    assert doc["model"]["embedding_dim"] == {"value": 32, "source": "config.toml"}
    assert doc["train"]["epochs"] == {"value": 4, "source": "env"}
    assert doc["train"]["batch_size"]["source"] == "default"
    assert doc["wandb"]["api_key"]["source"] == "env"
    assert "abcdef0123456789" not in res.stdout + res.stderr
    table = cli("config")
    assert "abcdef0123456789" not in table.stdout and "config.toml" in table.stdout


def test_shipped_config_toml_lists_every_setting_with_its_default():
    import tomllib

    from tests.conftest import ROOT
    from twotower_cli.config import FIELDS
    from twotower_cli.config_template import render

    text = (ROOT / "config.toml").read_text()
    assert text == render(), "regenerate it: python -m twotower_cli.config_template > config.toml"
    uncommented = "\n".join(line[2:].split("    #")[0] if line.startswith("# ") and " = " in line else line
                            for line in text.splitlines())
    parsed = tomllib.loads(uncommented)
    for section, kv in FIELDS.items():
        for key, (default, _) in kv.items():
            if key != "api_key":
                assert parsed[section][key] == default, f"{section}.{key}"
