"""`lorakit inspect` on broken adapters: the loader's own checks, one line and exit code 2, never a traceback."""

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_models import randomize_adapter, tiny_llama

import lorakit
from lorakit import LoraConfig
from lorakit.cli.main import main

KEY = "base_model.model.model.layers.0.self_attn.q_proj."


def broken(directory, change):
    path = directory / "adapter_model.safetensors"
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path)
    return directory


@pytest.mark.parametrize(
    "label,change",
    [
        ("NaN factor", lambda t: t[KEY + "lora_A.weight"].fill_(float("nan"))),
        ("ranks disagree", lambda t: t.__setitem__(KEY + "lora_B.weight", t[KEY + "lora_B.weight"][:, :3].clone())),
        ("integer factor", lambda t: t.__setitem__(KEY + "lora_A.weight", t[KEY + "lora_A.weight"].to(torch.int32))),
        ("0-d factor", lambda t: t.__setitem__(KEY + "lora_A.weight", torch.tensor(1.0))),
    ],
)
def test_broken_adapters_end_in_one_line(label, change, tmp_path, capsys):
    model = lorakit.inject(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"]))
    randomize_adapter(model, "default")
    directory = lorakit.save_adapter(model, tmp_path / "a")
    assert main(["inspect", str(directory)]) == 0
    capsys.readouterr()
    assert main(["inspect", str(broken(directory, change))]) == 2, label
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err


def test_expert_stacks_are_shown_per_expert(tmp_path):
    import sys
    from pathlib import Path

    from lorakit.cli.inspect import inspect_adapter
    from lorakit.model_state import lora_layers

    sys.path.insert(0, str(Path(__file__).parents[1]))
    from tiny_moe import EXPERT_PARAMETERS, tiny_moe

    config = LoraConfig(
        r=2, target_modules=["q_proj"], target_parameters=EXPERT_PARAMETERS, rank_pattern={"down_proj": 3}
    )
    model = lorakit.inject(tiny_moe("mixtral"), config)
    randomize_adapter(model, "default")
    report = inspect_adapter(lorakit.save_adapter(model, tmp_path / "moe"))
    layers = {row["module"]: row for row in report["layers"]}
    for path, layer in lora_layers(model):
        row = layers[path]
        assert row["r"] == layer.specs["default"].r and row["scale"] == pytest.approx(layer.specs["default"].scale)
        assert row["norm"] == pytest.approx(float(layer.delta_weight("default").detach().norm()), rel=1e-4)
    assert layers["model.layers.0.mlp.experts"]["shape"] == "4 x 16 x 24"
