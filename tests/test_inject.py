"""inject(): target matching, freezing, parameter counts, and refusing bad configs cleanly."""

import copy

import pytest
import torch
from tiny_models import conv_net, tiny_bert, tiny_gpt2, tiny_llama, token_ids
from torch import nn

import lorakit
from lorakit import LoraConfig, LorakitError
from lorakit.layers import Linear, LoraWrapper, SavedModule
from lorakit.model_state import lora_layers


def adapted(model):
    return sorted(path for path, _ in lora_layers(model))


def test_list_targets_match_exact_names_and_dotted_suffixes(llama):
    lorakit.inject(llama, LoraConfig(target_modules=["q_proj", "layers.1.mlp.up_proj"]))
    assert adapted(llama) == [
        "model.layers.0.self_attn.q_proj",
        "model.layers.1.mlp.up_proj",
        "model.layers.1.self_attn.q_proj",
    ]


def test_regex_target_must_match_the_whole_name(llama):
    lorakit.inject(llama, LoraConfig(target_modules=r".*layers\.0\.self_attn\.(k|o)_proj"))
    assert adapted(llama) == ["model.layers.0.self_attn.k_proj", "model.layers.0.self_attn.o_proj"]


def test_all_linear_skips_the_output_head():
    model = tiny_llama()
    lorakit.inject(model, LoraConfig(target_modules="all-linear"))
    paths = adapted(model)
    assert len(paths) == 2 * 7 and "lm_head" not in paths
    gpt2 = tiny_gpt2()
    lorakit.inject(gpt2, LoraConfig(target_modules="all-linear"))
    assert len(adapted(gpt2)) == 2 * 4 and "lm_head" not in adapted(gpt2)


def test_exclude_and_layers_to_transform(llama):
    cfg = LoraConfig(target_modules="all-linear", exclude_modules=["down_proj", "o_proj"], layers_to_transform=[1])
    lorakit.inject(llama, cfg)
    assert adapted(llama) == [
        f"model.layers.1.{m}"
        for m in ("mlp.gate_proj", "mlp.up_proj", "self_attn.k_proj", "self_attn.q_proj", "self_attn.v_proj")
    ]


def test_default_targets_per_architecture():
    assert {p.rsplit(".", 1)[-1] for p in adapted(lorakit.inject(tiny_llama(), LoraConfig()))} == {"q_proj", "v_proj"}
    assert {p.rsplit(".", 1)[-1] for p in adapted(lorakit.inject(tiny_gpt2(), LoraConfig()))} == {"c_attn"}
    assert {p.rsplit(".", 1)[-1] for p in adapted(lorakit.inject(tiny_bert(), LoraConfig()))} == {"query", "value"}


def test_rank_pattern_sets_per_module_rank():
    model = lorakit.inject(
        tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], rank_pattern={"v_proj": 2})
    )
    ranks = {p: layer.specs["default"].r for p, layer in lora_layers(model)}
    assert ranks["model.layers.0.self_attn.v_proj"] == 2 and ranks["model.layers.0.self_attn.q_proj"] == 4


def test_nothing_matched_lists_the_candidates(llama):
    with pytest.raises(LorakitError) as err:
        lorakit.inject(llama, LoraConfig(target_modules=["q_projj"]))
    message = str(err.value)
    assert "matched no module" in message and "q_proj" in message and "v_proj" in message


def test_unsupported_module_type_is_named(llama):
    with pytest.raises(LorakitError, match="LlamaRMSNorm"):
        lorakit.inject(llama, LoraConfig(target_modules=["input_layernorm"]))


def test_failed_inject_leaves_model_unchanged():
    model = conv_net()
    reference = copy.deepcopy(model.state_dict())
    with pytest.raises(LorakitError, match="'head'.*exceeds"):  # conv2d (6 x 27) takes r=20, head (5 x 18) not
        lorakit.inject(model, LoraConfig(r=20, target_modules=["conv2d", "head"], use_dora=True))
    assert not any(isinstance(m, LoraWrapper) for m in model.modules())
    assert all(torch.equal(reference[k], v) for k, v in model.state_dict().items())


def test_only_adapter_parameters_train_and_counts_are_exact(llama):
    lorakit.inject(llama, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    trainable = {n for n, p in llama.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    # q_proj 32x32 and v_proj 16x32 (GQA) in 2 layers: r·(d+k) each
    expected = 2 * (4 * (32 + 32) + 4 * (16 + 32))
    count = lorakit.count_parameters(llama)
    assert count == (expected, sum(p.numel() for p in llama.parameters()))
    assert "model.layers.0.self_attn.q_proj" in str(count) and "trainable params" in str(count)


def test_count_matches_the_documents_arithmetic():
    model = nn.Sequential(nn.Linear(4096, 4096, bias=False))
    lorakit.inject(model, LoraConfig(r=8, target_modules=["0"]))
    trainable, total = lorakit.count_parameters(model)
    assert trainable == 65_536 and total == 4096 * 4096 + 65_536
    small = nn.Sequential(nn.Linear(1000, 1000, bias=False))
    lorakit.inject(small, LoraConfig(r=2, target_modules=["0"]))
    assert lorakit.count_parameters(small).trainable == 4_000


def test_bias_modes(llama):
    gpt2 = lorakit.inject(tiny_gpt2(), LoraConfig(target_modules=["c_attn"], bias="lora_only"))
    trainable = {n for n, p in gpt2.named_parameters() if p.requires_grad}
    assert "transformer.h.0.attn.c_attn.base_layer.bias" in trainable
    assert "transformer.h.0.mlp.c_fc.bias" not in trainable
    gpt2_all = lorakit.inject(tiny_gpt2(), LoraConfig(target_modules=["c_attn"], bias="all"))
    assert gpt2_all.transformer.h[0].mlp.c_fc.bias.requires_grad


def test_modules_to_save_trains_a_copy_and_base_head_stays():
    model = tiny_bert()
    head_weight = model.classifier.weight.detach().clone()
    lorakit.inject(model, LoraConfig(target_modules=["query", "value"], modules_to_save=["classifier"]))
    assert isinstance(model.classifier, SavedModule)
    assert all(p.requires_grad for p in model.classifier.copies["default"].parameters())
    assert not model.classifier.original_module.weight.requires_grad
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model(token_ids(4, 6), labels=torch.tensor([0, 1, 2, 0])).loss.backward()
    opt.step()
    assert torch.equal(model.classifier.original_module.weight, head_weight)
    assert not torch.equal(model.classifier.copies["default"].weight, head_weight)


def test_base_weights_unchanged_after_training_steps(llama):
    before = {n: p.detach().clone() for n, p in llama.named_parameters()}
    lorakit.inject(llama, LoraConfig(r=4, target_modules="all-linear"))
    llama.train()
    opt = torch.optim.AdamW([p for p in llama.parameters() if p.requires_grad], lr=1e-2)
    ids = token_ids(2, 10)
    for _ in range(3):
        llama(ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    params = dict(llama.named_parameters())
    for name, value in before.items():
        wrapped = (
            name.replace(".weight", ".base_layer.weight")
            if name.replace(".weight", ".base_layer.weight") in params
            else name
        )
        assert torch.equal(params[wrapped], value), name


def test_second_adapter_reuses_wrappers_and_is_the_only_trainable(llama):
    lorakit.inject(llama, LoraConfig(target_modules=["q_proj"]), name="one")
    lorakit.inject(llama, LoraConfig(target_modules=["q_proj", "v_proj"]), name="two")
    q = llama.model.layers[0].self_attn.q_proj
    assert isinstance(q, Linear) and set(q.specs) == {"one", "two"}
    assert not q.lora_A["one"].requires_grad and q.lora_A["two"].requires_grad
    assert lorakit.active_adapter(llama) == "two"
    with pytest.raises(LorakitError, match="already exists"):
        lorakit.inject(llama, LoraConfig(target_modules=["q_proj"]), name="two")


def test_bad_adapter_name_is_refused(llama):
    with pytest.raises(LorakitError, match="adapter name"):
        lorakit.inject(llama, LoraConfig(target_modules=["q_proj"]), name="../evil")


def test_seed_makes_init_reproducible():
    a = lorakit.inject(tiny_llama(), LoraConfig(target_modules=["q_proj"]), seed=7)
    b = lorakit.inject(tiny_llama(), LoraConfig(target_modules=["q_proj"]), seed=7)
    assert torch.equal(
        a.model.layers[1].self_attn.q_proj.lora_A["default"], b.model.layers[1].self_attn.q_proj.lora_A["default"]
    )
