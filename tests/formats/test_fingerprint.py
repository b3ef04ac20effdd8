"""Base fingerprint: recorded in the adapter file on save, same for the same base in any state, different for
another base; loading checks warn or refuse (strict)."""

import pytest
import torch
from safetensors import safe_open
from tiny_models import randomize_adapter, tiny_llama

import lorakit
from lorakit import LoraConfig, LorakitError
from lorakit.fingerprint import METADATA_KEY, BaseMismatchWarning, check, compare, from_metadata, record


def adapted(seed=0, **kwargs):
    model = lorakit.inject(tiny_llama(seed), LoraConfig(r=2, target_modules=["q_proj", "v_proj"], **kwargs))
    randomize_adapter(model, "default")
    return model


def recorded(directory):
    with safe_open(str(directory / "adapter_model.safetensors"), framework="pt") as f:
        return from_metadata(f.metadata())


def test_saved_adapter_records_its_base(tmp_path):
    model = adapted()
    lorakit.save_adapter(model, tmp_path / "a")
    fingerprint = recorded(tmp_path / "a")
    assert sorted(fingerprint["modules"]) == sorted(p for p, _ in lorakit.model_state.lora_layers(model))
    assert fingerprint["modules"]["model.layers.0.self_attn.q_proj"][:2] == [32, 32]
    assert compare(tiny_llama(0), fingerprint) == []


def test_same_base_matches_in_any_state():
    fingerprint = record(adapted(), ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.v_proj"])
    merged = lorakit.merge(adapted())
    assert compare(merged, fingerprint) == []
    assert compare(tiny_llama(0).to(torch.bfloat16), fingerprint) == []
    pissa = lorakit.inject(tiny_llama(0), LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init="pissa"))
    assert compare(pissa, fingerprint) == []


def test_other_base_is_named():
    fingerprint = record(adapted(), ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.v_proj"])
    other = tiny_llama(seed=1)
    differences = compare(other, fingerprint)
    assert len(differences) == 2 and "different weight values" in differences[0]
    slightly = tiny_llama(0)
    with torch.no_grad():
        slightly.model.layers[1].self_attn.v_proj.weight.mul_(1.05)  # a fine-tuned base: one module differs
    assert compare(slightly, fingerprint) == ["model.layers.1.self_attn.v_proj: different weight values"]
    with pytest.warns(BaseMismatchWarning, match="1 of 2 adapted modules differ"):
        check(slightly, fingerprint)
    with pytest.raises(LorakitError, match="trained on other base weights"):
        check(slightly, fingerprint, strict=True)
    from tiny_models import tiny_gpt2  # a model without those modules at all

    assert "not in this model" in compare(tiny_gpt2(), fingerprint)[0]


def test_files_without_a_fingerprint_are_not_checked():
    assert from_metadata({"format": "pt"}) is None
    assert from_metadata({METADATA_KEY: "{broken"}) is None
    assert check(tiny_llama(), None) == []


def test_load_adapter_checks_the_fingerprint(tmp_path):
    """lorakit.load_adapter (every format) warns for another base, refuses it with strict=True, model unchanged."""
    from lorakit.layers import LoraWrapper

    lorakit.save_adapter(adapted(), tmp_path / "a")
    with pytest.warns(BaseMismatchWarning):
        lorakit.load_adapter(tiny_llama(seed=1), tmp_path / "a")
    other = tiny_llama(seed=1)
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(LorakitError, match="trained on other base weights"):
        lorakit.load_adapter(other, tmp_path / "a", strict=True)
    assert not any(isinstance(m, LoraWrapper) for m in other.modules())
    assert all(torch.equal(before[k], v) for k, v in other.state_dict().items())
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", BaseMismatchWarning)
        lorakit.load_adapter(tiny_llama(0), tmp_path / "a", strict=True)  # its own base: silent
