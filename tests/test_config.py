"""LoraConfig: every field checked on construction, errors naming field, value and what is allowed."""

import math

import pytest

from lorakit import LoraConfig, LorakitError

# field -> values that must be refused: wrong types, out of range, non-finite, strings for booleans
BAD = {
    "r": [0, -3, 2.5, True, "8", None, [8], 1 << 21, math.inf, math.nan],
    "alpha": [0, -1, True, "16", None, math.nan, math.inf, -math.inf, [16]],
    "dropout": [1.0, -0.1, True, "0.1", None, math.nan, [0.1]],
    "target_modules": ["q_proj(", [], [""], [5], ["  "], 5, {"q_proj": 1}, "[", "*"],
    "exclude_modules": ["(", [], [3], 3.5],
    "layers_to_transform": [[-1], "0", [True], 1.5, [], [0.5], True],
    "layers_pattern": ["(", 5, ""],
    "rank_pattern": [{"q_proj": 0}, {"q_proj": "2"}, {"q_proj": [2]}, {"(": 2}, {"": 2}, {"q_proj": True}, ["q"], "q"],
    "alpha_pattern": [{"q_proj": -1}, {"q_proj": math.nan}, {"q_proj": math.inf}, {"q_proj": "2"}, {"(": 1}, [1]],
    "bias": ["some", 1, True, None, ["all"]],
    "modules_to_save": [[1], [""], 5, {"classifier": 1}],
    "init": ["xavier", 1, True, None],
    "use_rslora": ["false", "no", 1, 0, None, "True"],
    "use_dora": ["yes", "false", 1, 0.0, None],
}


@pytest.mark.parametrize("field,value", [(f, v) for f, values in BAD.items() for v in values])
def test_every_bad_value_is_refused_in_one_line(field, value):
    with pytest.raises(LorakitError) as err:
        LoraConfig(**{field: value})
    assert f"LoraConfig.{field}=" in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"r": 0}, "r"),
        ({"r": -3}, "r"),
        ({"r": 2.5}, "r"),
        ({"alpha": 0}, "alpha"),
        ({"dropout": 1.0}, "dropout"),
        ({"bias": "some"}, "bias"),
        ({"init": "xavier"}, "init"),
        ({"target_modules": "q_proj("}, "target_modules"),
        ({"target_modules": []}, "target_modules"),
        ({"rank_pattern": {"q_proj": 0}}, "rank_pattern"),
        ({"alpha_pattern": {"q_proj": -1}}, "alpha_pattern"),
        ({"layers_to_transform": [-1]}, "layers_to_transform"),
        ({"use_dora": "yes"}, "use_dora"),
        ({"init": "pissa", "use_dora": True}, "init"),
    ],
)
def test_invalid_values_name_field_value_and_what_is_allowed(kwargs, field):
    with pytest.raises(LorakitError) as err:
        LoraConfig(**kwargs)
    message = str(err.value)
    assert f"LoraConfig.{field}=" in message
    assert "\n" not in message


def test_scale_is_alpha_over_r_or_alpha_over_sqrt_r():
    assert LoraConfig(r=8, alpha=16).scale_for("x.q_proj") == 2.0
    assert LoraConfig(r=16, alpha=16, use_rslora=True).scale_for("x.q_proj") == 4.0


def test_rank_and_alpha_patterns_apply_per_module():
    cfg = LoraConfig(r=8, alpha=16, rank_pattern={"v_proj": 2}, alpha_pattern={r"layers\.1\.self_attn\.q_proj": 4})
    assert cfg.rank_for("model.layers.0.self_attn.v_proj") == 2
    assert cfg.rank_for("model.layers.0.self_attn.q_proj") == 8
    assert cfg.alpha_for("model.layers.1.self_attn.q_proj") == 4
    assert cfg.alpha_for("model.layers.0.self_attn.q_proj") == 16


def test_single_layer_index_becomes_a_list():
    assert LoraConfig(layers_to_transform=3).layers_to_transform == [3]
