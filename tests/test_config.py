import dataclasses
import math
import re
import typing
from pathlib import Path

import pytest

from transfusion.config import Config, ConfigError, Range, dumps_toml, from_dict, load_config


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


# -- every key validated at load --------------------------------------------------------------------------------


REPO = Path(__file__).resolve().parents[1]
# Free-form strings: paths, shard specs, names. Every other key is a number with a Range, a choice (Literal) or a bool.
FREE_STRINGS = {"run.dir", "run.device", "data.shards", "data.eval_shards", "data.caption_field", "data.tokenizer",
                "data.segments_field", "latents.vae_path", "sample.prompts", "model.pretrained",
                "model.flex_options"}  # a table of torch's kernel options: names checked at load (tests/test_flex.py)


def leaf_keys(cls=Config, prefix=""):
    hints = typing.get_type_hints(cls, include_extras=True)
    for f in dataclasses.fields(cls):
        typ, key = hints[f.name], f"{prefix}{f.name}"
        if dataclasses.is_dataclass(typ):
            yield from leaf_keys(typ, f"{key}.")
        else:
            yield key, typ


def bad_values(typ) -> list[str]:
    """TOML literals that the key's own type rule must refuse."""
    origin = typing.get_origin(typ)
    if origin is typing.Literal:
        return ['"no-such-choice"']
    if origin is list:
        return [f"[{v}]" for v in bad_values(typing.get_args(typ)[0])]
    base, rule = typing.get_args(typ)
    is_int = base is int
    out = []
    step = 1 if is_int else 0.5
    if rule.lo is not None:
        below = rule.lo if rule.lo_open else rule.lo - step
        while below in rule.also:
            below -= step
        out.append(below)
    if rule.hi is not None:
        out.append(rule.hi if rule.hi_open else rule.hi + step)
    if not is_int:
        out += [math.nan, math.inf]
    return [("nan" if v != v else "inf" if v == math.inf else repr(int(v) if is_int else float(v))) for v in out]


def test_every_numeric_and_choice_key_carries_a_rule():
    keys = dict(leaf_keys())
    assert len(keys) > 90  # the walk reaches every section, nested ones included
    for key, typ in keys.items():
        if typ is bool or key in FREE_STRINGS:
            continue
        origin = typing.get_origin(typ)
        inner = typing.get_args(typ)[0] if origin is list else typ
        rule_ok = typing.get_origin(inner) is typing.Literal or (
            typing.get_origin(inner) is typing.Annotated and isinstance(typing.get_args(inner)[1], Range))
        assert rule_ok, f"{key} ({typ}) has no Range or Literal rule"
        assert bad_values(typ), key


@pytest.mark.parametrize("key,typ", [kv for kv in leaf_keys() if kv[1] is not bool and kv[0] not in FREE_STRINGS])
def test_out_of_range_values_stop_at_load_naming_the_key(key, typ):
    for bad in bad_values(typ):
        with pytest.raises(ConfigError, match=re.escape(key.split(".")[-1])):
            load_config(REPO / "recipes/shapes_tiny.toml", [f"--{key}={bad}"])


@pytest.mark.parametrize("override,needle", [
    ("--model.n_heads=0", "model.n_heads"),
    ("--model.n_heads=3", "divisible"),
    ("--model.dim=40", "even"),  # 40 / 8 heads = head dim 5
    ("--data.seq_len=10", "data.seq_len 10 cannot hold one document"),
    ("--data.image_size=0", "data.image_size"),
    ("--data.image_size=30", "not divisible"),
    ("--sample.guidance=-5", "sample.guidance"),
    ("--sample.sampler=ddim", "sample.sampler"),  # the recipe trains flow: ddim does not fit
    ("--model.adapter=unet", None),  # valid: patch 4 -> 3 U-Net widths, the default
    ("--model.adapter=unet --model.unet.channels=[32,64]", "log2(model.patch_size) + 1"),
    ("--model.adapter=unet --model.unet.channels=[30,64,128]", "multiples of model.unet.groups"),
    ("--model.head=mar --model.adapter=unet", "needs model.adapter = 'linear'"),
    ("--run.device=gpu", "run.device"),
    ("--data.caption_field=json:", "data.caption_field"),
    ("--latents.kind=vae", "vae_path"),
    ("--train.autocast=fp16", "train.autocast"),
])
def test_cross_field_rules(override, needle):
    overrides = override.split()
    if needle is None:
        load_config(REPO / "recipes/shapes_tiny.toml", overrides)
        return
    with pytest.raises(ConfigError, match=re.escape(needle)):
        load_config(REPO / "recipes/shapes_tiny.toml", overrides)


def test_seq_len_rule_counts_the_clean_copy():
    # 8x8 patches: a one-token caption document is 69 tokens; with a clean copy 134
    load_config(REPO / "recipes/shapes_tiny.toml", ["--data.seq_len=69"])
    with pytest.raises(ConfigError, match="needs 134 tokens"):
        load_config(REPO / "recipes/shapes_tiny.toml", ["--data.seq_len=100", "--data.clean_copy=true"])


def test_every_recipe_and_the_defaults_load():
    load_config(None)
    for recipe in sorted((REPO / "recipes").glob("*.toml")):
        load_config(recipe)
