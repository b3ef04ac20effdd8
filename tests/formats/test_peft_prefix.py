"""PEFT's PREFIX_TUNING files both ways: lorakit-saved prefixes run in PEFT with the same outputs, PEFT-saved
ones run in lorakit; bad files are refused with one line and the model left as it was."""

import copy
import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_models import tiny_bert, tiny_gpt2, tiny_llama, token_ids

import lorakit
from lorakit import LorakitError, PrefixConfig
from lorakit.formats.peft_prefix import load_prefix, save_prefix
from lorakit.prefix import prefixes


def _mask(ids):
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    return mask


def _randomize(model, name="prefix", seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in prefixes(model).encoders[name].parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)


CASES = [(tiny_llama, "CAUSAL_LM", False), (tiny_gpt2, "CAUSAL_LM", True), (lambda: tiny_bert().bert, None, False)]


@pytest.mark.parametrize("build, task, projection", CASES)
def test_lorakit_saved_prefix_gives_the_same_outputs_in_peft(tmp_path, build, task, projection):
    from peft import PeftModel

    model = build()
    ours = copy.deepcopy(model)
    lorakit.add_prefix(ours, PrefixConfig(num_virtual_tokens=4, prefix_projection=projection), seed=0)
    _randomize(ours)
    save_prefix(ours, tmp_path / "p")
    saved = json.loads((tmp_path / "p" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "PREFIX_TUNING" and saved["prefix_projection"] is projection
    assert list(load_file(tmp_path / "p" / "adapter_model.safetensors")) == ["prompt_embeddings"]
    reference = PeftModel.from_pretrained(model, tmp_path / "p").eval()
    ids = token_ids(batch=2, length=8)
    with torch.no_grad():
        expected, got = (
            reference(input_ids=ids, attention_mask=_mask(ids)),
            ours(input_ids=ids, attention_mask=_mask(ids)),
        )
    key = "logits" if task else "last_hidden_state"
    torch.testing.assert_close(getattr(got, key), getattr(expected, key), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("build, task, projection", CASES)
def test_peft_saved_prefix_gives_the_same_outputs_in_lorakit(tmp_path, build, task, projection):
    from peft import PrefixTuningConfig, get_peft_model

    model = build()
    ours = copy.deepcopy(model)
    reference = get_peft_model(
        model,
        PrefixTuningConfig(task_type=task or "FEATURE_EXTRACTION", num_virtual_tokens=4, prefix_projection=projection),
    ).eval()
    reference.save_pretrained(tmp_path / "p")
    load_prefix(ours, tmp_path / "p", name="theirs")
    assert lorakit.active_prefix(ours) == "theirs"
    assert not any(p.requires_grad for p in ours.parameters())  # PEFT's inference mode
    ids = token_ids(batch=2, length=8)
    with torch.no_grad():
        expected, got = (
            reference(input_ids=ids, attention_mask=_mask(ids)),
            ours(input_ids=ids, attention_mask=_mask(ids)),
        )
    key = "logits" if task else "last_hidden_state"
    torch.testing.assert_close(getattr(got, key), getattr(expected, key), atol=1e-5, rtol=1e-5)


def test_encoder_prefix_file_drives_the_whole_classifier(tmp_path):
    """A prefix saved from PEFT's BERT encoder, loaded into the sequence classifier around it."""
    from peft import PrefixTuningConfig, get_peft_model

    model = tiny_bert()
    ours = copy.deepcopy(model)
    reference = get_peft_model(model.bert, PrefixTuningConfig(task_type="FEATURE_EXTRACTION", num_virtual_tokens=3))
    reference.save_pretrained(tmp_path / "p")
    load_prefix(ours, tmp_path / "p")
    ids = token_ids(batch=2, length=8)
    with torch.no_grad():
        expected = model.classifier(reference(input_ids=ids).pooler_output)
        torch.testing.assert_close(ours(input_ids=ids).logits, expected, atol=1e-5, rtol=1e-5)


def test_trainable_load_continues_training_the_table(tmp_path):
    model = tiny_llama()
    lorakit.add_prefix(model, PrefixConfig(num_virtual_tokens=3, prefix_projection=True), seed=0)
    save_prefix(model, tmp_path / "p")
    fresh = tiny_llama()
    load_prefix(fresh, tmp_path / "p", trainable=True)
    trainable = [n for n, p in fresh.named_parameters() if p.requires_grad]
    assert trainable == ["model.lorakit_prefix.encoders.prefix.embedding"]  # P itself: PEFT saves no MLP
    ids = token_ids()
    with torch.no_grad():
        torch.testing.assert_close(fresh(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-5, rtol=1e-5)


def _break(directory, config=None, tensors=None):
    path = directory / "adapter_config.json"
    values = json.loads(path.read_text())
    values.update(config or {})
    path.write_text(json.dumps(values))
    if tensors is not None:
        save_file(tensors, directory / "adapter_model.safetensors")


def test_bad_files_are_refused_and_the_model_is_untouched(tmp_path):
    model = tiny_llama()
    lorakit.add_prefix(model, PrefixConfig(num_virtual_tokens=3), seed=0)
    good = tmp_path / "good"
    save_prefix(model, good)
    table = load_file(good / "adapter_model.safetensors")["prompt_embeddings"]
    cases = {
        "another model": (
            {"num_layers": 1},
            {"prompt_embeddings": table[:, :32].contiguous()},
            "this model has 2 x 2 x 8",
        ),
        "heads": ({"num_attention_heads": 4}, None, "4 key/value heads"),
        "mismatch": (None, {"prompt_embeddings": table[:2]}, "the file and its config disagree"),
        "nan": (None, {"prompt_embeddings": table * float("nan")}, "finite"),
        "head tensor": (None, {"prompt_embeddings": table, "base_model.score.weight": table.clone()}, "score.weight"),
        "enc-dec": ({"num_transformer_submodules": 2}, None, "encoder-decoder"),
        "tokens": ({"num_virtual_tokens": 0}, None, "num_virtual_tokens=0"),
        "type": ({"peft_type": "LORA"}, None, "peft_type='LORA'"),
    }
    fresh = tiny_llama()
    state = copy.deepcopy(fresh.state_dict())
    for case, (config, tensors, message) in cases.items():
        bad = tmp_path / case
        bad.mkdir()
        for f in ("adapter_config.json", "adapter_model.safetensors"):
            (bad / f).write_bytes((good / f).read_bytes())
        _break(bad, config, tensors)
        with pytest.raises(LorakitError, match=message):
            load_prefix(fresh, bad)
        assert lorakit.list_prefixes(fresh) == []
        assert all(torch.equal(v, state[k]) for k, v in fresh.state_dict().items())
    with pytest.raises(LorakitError, match="does not exist"):
        load_prefix(fresh, tmp_path / "missing")
