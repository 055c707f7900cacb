import pytest

from transfusion.config import Config, ConfigError, dumps_toml, from_dict, load_config


def test_defaults_and_overrides(tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text('[train]\nsteps = 7\n[data]\nshards = "a.tar"\n')
    cfg = load_config(recipe, ["--train.lr=0.5", "--model.dim=64", "--run.dir=/tmp/x", "--sample.prompts=['a', 'b']"])
    assert cfg.train.steps == 7 and cfg.train.lr == 0.5 and cfg.model.dim == 64
    assert cfg.data.shards == "a.tar" and cfg.run.dir == "/tmp/x" and cfg.sample.prompts == ["a", "b"]


def test_unknown_key_is_named(tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text("[model]\ndimm = 3\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'model\.dimm'"):
        load_config(recipe)
    with pytest.raises(ConfigError, match=r"unknown config key 'nosuch'"):
        load_config(None, ["--nosuch.key=1"])
    with pytest.raises(ConfigError, match=r"train\.stepz"):
        load_config(None, ["--train.stepz=1"])


def test_type_and_value_errors(tmp_path):
    with pytest.raises(ConfigError, match="expects an integer"):
        load_config(None, ["--train.steps=abc"])
    with pytest.raises(ConfigError, match="known: pixels, vae"):
        load_config(None, ["--latents.kind=jpeg"])
    with pytest.raises(ConfigError, match="recipe not found"):
        load_config(tmp_path / "missing.toml")


def test_resolved_config_round_trips():
    import tomllib

    cfg = load_config(None, ["--train.steps=3", "--sample.prompts=['x \"y\"']"])
    again = from_dict(Config, tomllib.loads(dumps_toml(cfg)))
    assert again == cfg
