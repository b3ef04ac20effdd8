"""PEFT's target_parameters format both ways, on tiny transformers MoE models.

PEFT (the installed version) wraps each targeted expert parameter in a ParamWrapper, nested per
module, and saves lora_A (E·r x k) and lora_B (d x r·E). Files written by either side must load in
the other with the same outputs, and hold the same tensors under the same keys.
"""

import json
import sys
import warnings
from pathlib import Path

import pytest
import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file

import lorakit
from lorakit import LoraConfig, LorakitError

sys.path.insert(0, str(Path(__file__).parents[1]))
from tiny_moe import EXPERT_PARAMETERS, KINDS, tiny_moe  # noqa: E402

IDS = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(0))


def logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


def randomize(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora_" in name:
                param.copy_(0.3 * torch.randn(param.shape, generator=g))


@pytest.mark.parametrize("kind", KINDS)
def test_peft_loads_what_lorakit_writes(kind, tmp_path):
    config = LoraConfig(r=2, alpha=6.0, target_modules=["q_proj"], target_parameters=EXPERT_PARAMETERS)
    model = lorakit.inject(tiny_moe(kind), config)
    randomize(model)
    expected = logits(model)
    lorakit.save_adapter(model, tmp_path / "a")
    saved = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert saved["target_modules"] == ["q_proj"] and len(saved["target_parameters"]) == 4
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = PeftModel.from_pretrained(tiny_moe(kind), tmp_path / "a").eval()
    torch.testing.assert_close(logits(peft_model), expected, atol=1e-5, rtol=1e-5)
    ours = load_file(tmp_path / "a" / "adapter_model.safetensors")
    theirs = {k: v for k, v in peft_model.state_dict().items() if ".lora_" in k}
    assert {k.replace(".default", "") for k in theirs} == set(ours)


@pytest.mark.parametrize("kind", KINDS)
def test_lorakit_loads_what_peft_writes(kind, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_config = PeftLoraConfig(
            r=2, lora_alpha=3, target_modules=[], target_parameters=EXPERT_PARAMETERS, init_lora_weights=False,
            rank_pattern={"down_proj": 3},
        )  # fmt: skip
        peft_model = get_peft_model(tiny_moe(kind), peft_config).eval()
        expected = logits(peft_model)
        peft_model.save_pretrained(tmp_path / "p")
    model = lorakit.load_adapter(tiny_moe(kind), tmp_path / "p", name="from_peft")
    torch.testing.assert_close(logits(model), expected, atol=1e-5, rtol=1e-5)
    ranks = {layer.parameter_name: layer.specs["from_peft"].r for _, layer in lorakit.model_state.lora_layers(model)}
    assert ranks == {"gate_up_proj": 2, "down_proj": 3}
    # and back out again: the same tensors under the same keys
    lorakit.save_adapter(model, tmp_path / "again", name="from_peft")
    first, again = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("p", "again"))
    assert set(first) == set(again) and all(torch.equal(first[k], again[k]) for k in first)


def test_fingerprint_finds_expert_parameters(tmp_path):
    model = lorakit.inject(tiny_moe("mixtral"), LoraConfig(r=2, target_modules=[], target_parameters=EXPERT_PARAMETERS))
    lorakit.save_adapter(model, tmp_path / "a")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same base: no mismatch warning
        lorakit.load_adapter(tiny_moe("mixtral"), tmp_path / "a", strict=True)
    with pytest.raises(LorakitError, match="trained on other base weights"):
        lorakit.load_adapter(tiny_moe("mixtral", seed=5), tmp_path / "a", strict=True)


def test_a_file_missing_one_expert_parameter_is_refused(tmp_path):
    model = lorakit.inject(tiny_moe("mixtral"), LoraConfig(r=2, target_modules=[], target_parameters=EXPERT_PARAMETERS))
    lorakit.save_adapter(model, tmp_path / "a")
    tensors = load_file(tmp_path / "a" / "adapter_model.safetensors")
    from safetensors.torch import save_file

    save_file(
        {k: v for k, v in tensors.items() if "layers.1.mlp.experts.base_layer" not in k},
        tmp_path / "a" / "adapter_model.safetensors",
    )
    fresh = tiny_moe("mixtral")
    with pytest.raises(LorakitError, match=r"no tensors for parameter 'model.layers.1.mlp.experts.gate_up_proj'"):
        lorakit.load_adapter(fresh, tmp_path / "a")
    assert not list(lorakit.model_state.lora_layers(fresh))


@pytest.mark.parametrize(
    ("kwargs", "target"),
    [
        ({"format": "kohya"}, "format='kohya'"),
        ({"format": "diffusers"}, "format='diffusers'"),
        ({"fold_scales": True}, "fold_scales"),
    ],
)
def test_formats_without_expert_stacks_refuse_them(kwargs, target, tmp_path):
    model = lorakit.inject(tiny_moe("mixtral"), LoraConfig(r=2, target_modules=[], target_parameters=EXPERT_PARAMETERS))
    out = tmp_path / ("a.safetensors" if kwargs.get("format") == "kohya" else "a")
    with pytest.raises(LorakitError, match=f"adapts expert parameters \\(target_parameters\\), which {target}"):
        lorakit.save_adapter(model, out, **kwargs)
    assert not out.exists()


def test_gguf_adapter_export_refuses_expert_stacks():
    from lorakit.formats.gguf import adapter_tensors

    model = lorakit.inject(tiny_moe("mixtral"), LoraConfig(r=2, target_modules=[], target_parameters=EXPERT_PARAMETERS))
    with pytest.raises(LorakitError, match="a llama.cpp LoRA adapter \\(use --merged\\)"):
        adapter_tensors(model, "default")
