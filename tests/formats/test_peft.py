"""PEFT's adapter format, both ways, with PEFT itself as the reference implementation."""

import copy
import json

import pytest
import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from tiny_models import conv_inputs, conv_net, randomize_adapter, tiny_bert, tiny_gpt2, tiny_llama, token_ids

import lorakit
from lorakit import LoraConfig, LorakitError
from lorakit.layers import LoraWrapper

CASES = {
    "llama": (tiny_llama, dict(r=4, alpha=8, target_modules=["q_proj", "v_proj", "embed_tokens"])),
    "llama-dora-rslora": (tiny_llama, dict(r=4, alpha=8, target_modules="all-linear", use_dora=True, use_rslora=True)),
    "llama-rank-pattern": (
        tiny_llama,
        dict(
            r=4, alpha=8, target_modules=["q_proj", "v_proj"], rank_pattern={"v_proj": 2}, alpha_pattern={"q_proj": 3}
        ),
    ),
    "gpt2": (tiny_gpt2, dict(r=4, alpha=16, target_modules=["c_attn", "c_proj"], bias="lora_only")),
    "gpt2-dora": (tiny_gpt2, dict(r=2, alpha=4, target_modules=["c_attn"], use_dora=True)),
    "bert": (
        tiny_bert,
        dict(r=4, alpha=8, target_modules=["query", "value"], modules_to_save=["classifier"], bias="all"),
    ),
    "conv": (conv_net, dict(r=2, alpha=4, target_modules=["embed", "conv1d", "conv2d", "conv3d", "head"])),
}

PEFT_FIELDS = {
    "r": "r",
    "alpha": "lora_alpha",
    "target_modules": "target_modules",
    "use_dora": "use_dora",
    "use_rslora": "use_rslora",
    "rank_pattern": "rank_pattern",
    "alpha_pattern": "alpha_pattern",
    "bias": "bias",
    "modules_to_save": "modules_to_save",
}


def run(model, case):
    if case == "conv":
        return model(*conv_inputs())
    ids = token_ids(2, 7)
    return model(ids).logits


def perturb_saved_modules_and_biases(model):
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.requires_grad and "lora_" not in name:
                param.add_(0.05 * torch.randn_like(param))


@pytest.mark.parametrize("case", CASES)
def test_peft_loads_what_lorakit_writes(case, tmp_path):
    factory, kwargs = CASES[case]
    model = lorakit.inject(factory(), LoraConfig(**kwargs))
    randomize_adapter(model, "default")
    perturb_saved_modules_and_biases(model)
    expected = run(model, case)
    lorakit.save_adapter(model, tmp_path / "a")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA"
    peft_model = PeftModel.from_pretrained(factory(), tmp_path / "a").eval()
    torch.testing.assert_close(run(peft_model, case), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", CASES)
def test_lorakit_loads_what_peft_writes(case, tmp_path):
    factory, kwargs = CASES[case]
    peft_kwargs = {PEFT_FIELDS[k]: v for k, v in kwargs.items()}
    if case == "conv":
        peft_kwargs["target_modules"] = ["embed", "conv1d", "conv2d", "conv3d", "head"]
    peft_model = get_peft_model(factory(), PeftLoraConfig(**peft_kwargs, init_lora_weights=False)).eval()
    perturb_saved_modules_and_biases(peft_model)
    expected = run(peft_model, case)
    peft_model.save_pretrained(tmp_path / "p")
    model = lorakit.load_adapter(factory(), tmp_path / "p", name="from_peft")
    torch.testing.assert_close(run(model, case), expected, atol=1e-5, rtol=1e-5)
    # and back out again: the re-saved adapter gives PEFT the same outputs
    lorakit.save_adapter(model, tmp_path / "again", name="from_peft")
    again = PeftModel.from_pretrained(factory(), tmp_path / "again").eval()
    torch.testing.assert_close(run(again, case), expected, atol=1e-5, rtol=1e-5)


class NestedNames(torch.nn.Module):
    """`out.0` is a Linear while `blocks.0` is a container: the leaf name "0" alone would match both."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.blocks = torch.nn.ModuleList([torch.nn.ModuleDict({"fc": torch.nn.Linear(4, 4)})])
        self.out = torch.nn.Sequential(torch.nn.Linear(4, 3))

    def forward(self, x):
        return self.out(torch.tanh(self.blocks[0]["fc"](x)))


def test_saved_target_names_never_match_a_container(tmp_path):
    model = lorakit.inject(NestedNames(), LoraConfig(r=2, target_modules=["out.0"]))
    randomize_adapter(model, "default")
    x = torch.randn(2, 4)
    lorakit.save_adapter(model, tmp_path / "a")
    assert json.loads((tmp_path / "a" / "adapter_config.json").read_text())["target_modules"] == ["out.0"]
    peft_model = PeftModel.from_pretrained(NestedNames(), tmp_path / "a").eval()
    torch.testing.assert_close(peft_model(x), model(x), atol=1e-6, rtol=1e-6)


def test_save_load_round_trip_is_exact(tmp_path):
    model = lorakit.inject(tiny_llama(), LoraConfig(r=4, target_modules="all-linear", use_dora=True))
    randomize_adapter(model, "default")
    lorakit.save_adapter(model, tmp_path / "a")
    loaded = lorakit.load_adapter(tiny_llama(), tmp_path / "a", name="default")
    original = dict(model.named_parameters())
    for name, param in loaded.named_parameters():
        assert torch.equal(param, original[name]), name
    assert torch.equal(run(loaded, "llama"), run(model, "llama"))


def test_pissa_adapter_is_saved_relative_to_the_original_base(tmp_path):
    base = tiny_llama()
    model = lorakit.inject(copy.deepcopy(base), LoraConfig(r=2, alpha=4, target_modules=["q_proj"], init="pissa"))
    randomize_adapter(model, "default", std=0.05)
    expected = run(model, "llama")
    lorakit.save_adapter(model, tmp_path / "pissa")
    config = json.loads((tmp_path / "pissa" / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8
    peft_model = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "pissa")
    torch.testing.assert_close(run(peft_model, "llama"), expected, atol=1e-5, rtol=1e-5)


def test_pure_adapter_holds_only_lora_factors(tmp_path):
    model = lorakit.inject(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    lorakit.save_adapter(model, tmp_path / "pure", pure=True)
    keys = load_file(tmp_path / "pure" / "adapter_model.safetensors").keys()
    assert keys and all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in keys)
    dora = lorakit.inject(tiny_llama(), LoraConfig(target_modules=["q_proj"], use_dora=True))
    with pytest.raises(LorakitError, match="pure"):
        lorakit.save_adapter(dora, tmp_path / "x", pure=True)


def saved(tmp_path, **kwargs):
    model = lorakit.inject(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], **kwargs))
    randomize_adapter(model, "default")
    return lorakit.save_adapter(model, tmp_path / "a")


def assert_refused_and_unchanged(directory, match, model=None):
    model = model or tiny_llama()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(LorakitError, match=match):
        lorakit.load_adapter(model, directory)
    assert not any(isinstance(m, LoraWrapper) for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert "default" not in lorakit.list_adapters(model)


def test_adapter_for_another_model_is_refused_naming_the_tensor(tmp_path):
    directory = saved(tmp_path)
    from tiny_models import tiny_llama as make

    bigger = make()
    bigger.model.layers[1].self_attn.v_proj = torch.nn.Linear(32, 24, bias=False)
    assert_refused_and_unchanged(
        directory, r"model\.layers\.1\.self_attn\.v_proj\.lora_B.*shape \(16, 4\).*\(24, 4\)", bigger
    )
    assert_refused_and_unchanged(directory, "does not have", tiny_gpt2())


def test_missing_and_corrupt_files_are_refused(tmp_path):
    assert_refused_and_unchanged(tmp_path / "nowhere", "does not exist")
    directory = saved(tmp_path)
    tensors = load_file(directory / "adapter_model.safetensors")
    del tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"]
    save_file(tensors, directory / "adapter_model.safetensors")
    assert_refused_and_unchanged(directory, "lacks lora_B")
    (directory / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    assert_refused_and_unchanged(directory, "not a readable safetensors")
    (directory / "adapter_config.json").write_text("{broken")
    assert_refused_and_unchanged(directory, "not valid JSON")


def test_pickle_files_are_never_read(tmp_path):
    directory = tmp_path / "bin"
    directory.mkdir()
    (directory / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4}))
    torch.save({"x": torch.zeros(1)}, directory / "adapter_model.bin")
    assert_refused_and_unchanged(directory, "safetensors only")


def test_writes_are_atomic(tmp_path, monkeypatch):
    directory = saved(tmp_path)
    good = (directory / "adapter_model.safetensors").read_bytes()
    model = lorakit.inject(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"]))

    def explode(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("lorakit.io.os.replace", explode)
    with pytest.raises(OSError):
        lorakit.save_adapter(model, directory)
    assert (directory / "adapter_model.safetensors").read_bytes() == good
    assert sorted(p.name for p in directory.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]


def test_loaded_adapter_is_frozen_unless_asked(tmp_path):
    directory = saved(tmp_path)
    frozen = lorakit.load_adapter(tiny_llama(), directory)
    assert lorakit.count_parameters(frozen).trainable == 0
    trainable = lorakit.load_adapter(tiny_llama(), directory, trainable=True)
    assert lorakit.count_parameters(trainable).trainable == 2 * (4 * 64 + 4 * 48)


def test_a_classifier_adapter_without_its_head_loads_in_peft(tmp_path):
    """A SEQ_CLS task type makes PEFT demand the head in the file; an adapter without one gets no task type."""
    model = lorakit.inject(tiny_bert(), LoraConfig(r=2, target_modules=["query", "value"]))
    randomize_adapter(model, "default")
    lorakit.save_adapter(model, tmp_path / "a")
    assert json.loads((tmp_path / "a" / "adapter_config.json").read_text())["task_type"] is None
    peft_model = PeftModel.from_pretrained(tiny_bert(), tmp_path / "a").eval()
    torch.testing.assert_close(peft_model(token_ids(2, 7)).logits, model(token_ids(2, 7)).logits)
