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
