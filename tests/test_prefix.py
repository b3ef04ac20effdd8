"""Prefix tuning: forward parity with PEFT, the KV-cache semantics against a real prompt, generation,
mixed batches, LoRA + prefix on one model, training, removal and clear refusals."""

import copy

import pytest
import torch
from tiny_models import randomize_adapter, tiny_bert, tiny_gpt2, tiny_llama, token_ids
from torch import nn

import lorakit
from lorakit import LorakitError, PrefixConfig
from lorakit.prefix import HOLDER, prefix_shape, prefixes


def _mask(ids):
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # row 0 left-padded
    return mask


def _peft_prefix(base, task, n=5, projection=False, hidden=12):
    from peft import PrefixTuningConfig, get_peft_model

    config = PrefixTuningConfig(
        task_type=task, num_virtual_tokens=n, prefix_projection=projection, encoder_hidden_size=hidden
    )
    return get_peft_model(base, config)


def _copy_encoder(peft_model, model, name="prefix"):
    """Give lorakit's prefix PEFT's (random) prefix-encoder weights."""
    ours, theirs = prefixes(model).encoders[name], peft_model.prompt_encoder["default"]
    with torch.no_grad():
        ours.embedding.copy_(theirs.embedding.weight)
        if ours.projected:
            for mine, layer in ((("w1", "b1"), theirs.transform[0]), (("w2", "b2"), theirs.transform[2])):
                getattr(ours, mine[0]).copy_(layer.weight)
                getattr(ours, mine[1]).copy_(layer.bias)


@pytest.mark.parametrize("build, projection", [(tiny_llama, False), (tiny_llama, True), (tiny_gpt2, True)])
def test_decoder_forward_matches_peft(build, projection):
    model = build()
    ours = copy.deepcopy(model)
    reference = _peft_prefix(model, "CAUSAL_LM", projection=projection)
    lorakit.add_prefix(ours, PrefixConfig(num_virtual_tokens=5, prefix_projection=projection, encoder_hidden_size=12))
    _copy_encoder(reference, ours)
    ids = token_ids(batch=2, length=9)
    with torch.no_grad():
        for kwargs in ({"attention_mask": _mask(ids)}, {}):
            expected = reference(input_ids=ids, **kwargs).logits
            torch.testing.assert_close(ours(input_ids=ids, **kwargs).logits, expected, atol=1e-5, rtol=1e-5)


def test_encoder_forward_matches_peft():
    """BERT: PEFT's SEQ_CLS prefix path cannot run on transformers 5 (BertModel takes `cache`, PEFT looks for
    past_key_values), so the reference is PEFT's feature extraction on the encoder plus the same head."""
    model = tiny_bert()
    ours = copy.deepcopy(model)
    reference = _peft_prefix(model.bert, "FEATURE_EXTRACTION")
    lorakit.add_prefix(ours, PrefixConfig(num_virtual_tokens=5))
    _copy_encoder(reference, ours)
    ids = token_ids(batch=2, length=9)
    with torch.no_grad():
        hidden = reference(input_ids=ids, attention_mask=_mask(ids))
        logits = ours(input_ids=ids, attention_mask=_mask(ids)).logits
        torch.testing.assert_close(logits, model.classifier(hidden.pooler_output), atol=1e-5, rtol=1e-5)
        own = ours.bert(input_ids=ids, attention_mask=_mask(ids)).last_hidden_state
        torch.testing.assert_close(own, hidden.last_hidden_state, atol=1e-5, rtol=1e-5)


def _table_from_prompt(model, prompt):
    """The prefix that is exactly the keys and values `model` computes for `prompt` (1 x n)."""
    with torch.no_grad():
        cache = model(input_ids=prompt, use_cache=True).cache
    rows = []
    for layer in range(len(cache.layers)):
        k, v = cache.layers[layer].keys[0], cache.layers[layer].values[0]  # (heads, n, head_dim)
        rows += [k.permute(1, 0, 2).flatten(1), v.permute(1, 0, 2).flatten(1)]
    return torch.cat(rows, dim=1)  # (n, L·2·D), token-major as PEFT lays it out


def test_prefix_of_real_keys_values_equals_running_the_prompt():
    """Independent of PEFT: a prefix holding the K/V of real tokens p acts exactly like p in the input."""
    model = tiny_llama()
    prompt, text = token_ids(batch=1, length=4, seed=3), token_ids(batch=1, length=6, seed=4)
    table = _table_from_prompt(model, prompt)
    lorakit.add_prefix(model, PrefixConfig(num_virtual_tokens=4, init="zero"))
    with torch.no_grad():
        prefixes(model).encoders["prefix"].embedding.copy_(table)
        with_prefix = model(input_ids=text).logits
        lorakit.set_prefix(model, None)
        joined = model(input_ids=torch.cat([prompt, text], dim=1)).logits[:, 4:]
    torch.testing.assert_close(with_prefix, joined, atol=1e-5, rtol=1e-5)


def test_generate_equals_decoding_by_full_forwards():
    """HF generate (cache grows step by step) against recomputing every step from scratch."""
    model = tiny_llama()
    model.generation_config.pad_token_id = 0
    lorakit.add_prefix(model, PrefixConfig(num_virtual_tokens=3), seed=1)
    ids = token_ids(batch=2, length=5)
    mask = _mask(ids)
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
    seq = ids
    with torch.no_grad():
        for _ in range(5):
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            step = model(input_ids=seq, attention_mask=mask, position_ids=positions).logits[:, -1]
            seq = torch.cat([seq, step.argmax(-1, keepdim=True)], dim=1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    assert torch.equal(out, seq)


def test_mixed_batch_rows_with_their_own_prefix_equal_each_row_alone():
    model = tiny_llama()
    lorakit.add_prefix(model, PrefixConfig(num_virtual_tokens=3), name="short", seed=1)
    lorakit.add_prefix(model, PrefixConfig(num_virtual_tokens=6), name="long", seed=2)
    ids = token_ids(batch=3, length=7)
    names = ["long", None, "short"]
    with torch.no_grad(), lorakit.per_row(model, names):
        mixed = model(input_ids=ids).logits
    for row, name in enumerate(names):
        lorakit.set_prefix(model, name)
        with torch.no_grad():
            alone = model(input_ids=ids[row : row + 1]).logits
        torch.testing.assert_close(mixed[row : row + 1], alone, atol=1e-5, rtol=1e-5)


def test_lora_and_prefix_train_together_on_one_model():
    model = tiny_llama()
    lorakit.inject(model, lorakit.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    lorakit.add_prefix(model, PrefixConfig(num_virtual_tokens=4, prefix_projection=True), seed=0)
    base = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any("lora_B" in n for n in trainable) and any(HOLDER in n for n in trainable)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = token_ids(batch=2, length=8)
    losses = []
    for _ in range(5):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert all(torch.equal(p, base[n]) for n, p in model.named_parameters() if n in base)


def test_lora_plus_prefix_matches_peft_lora_merged_then_prefix():
    """PEFT cannot hold LoRA and a prefix in one model; the same function is the LoRA merged into the base,
    then PEFT's prefix on top."""
    model = tiny_llama()
    ours = copy.deepcopy(model)
    lorakit.inject(ours, lorakit.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    randomize_adapter(ours, "default")
    merged = lorakit.merge_and_unload(copy.deepcopy(ours))
    reference = _peft_prefix(merged, "CAUSAL_LM", projection=True)
    lorakit.add_prefix(ours, PrefixConfig(num_virtual_tokens=5, prefix_projection=True, encoder_hidden_size=12))
    _copy_encoder(reference, ours)
    ids = token_ids(batch=2, length=9)
    with torch.no_grad():
        expected = reference(input_ids=ids, attention_mask=_mask(ids)).logits
        torch.testing.assert_close(
            ours(input_ids=ids, attention_mask=_mask(ids)).logits, expected, atol=1e-5, rtol=1e-5
        )


def test_off_and_deleted_prefix_give_the_base_model_back():
    model = tiny_gpt2()
    ids = token_ids()
    with torch.no_grad():
        before = model(input_ids=ids).logits
    hooks = dict(model.transformer._forward_pre_hooks)
    lorakit.add_prefix(model, PrefixConfig(num_virtual_tokens=2), seed=0)
    assert lorakit.list_prefixes(model) == ["prefix"] and lorakit.active_prefix(model) == "prefix"
    with torch.no_grad():
        assert not torch.allclose(model(input_ids=ids).logits, before)
        lorakit.set_prefix(model, None)
        assert torch.equal(model(input_ids=ids).logits, before)
    lorakit.delete_prefix(model, "prefix")
    assert lorakit.list_prefixes(model) == [] and not hasattr(model.transformer, HOLDER)
    assert dict(model.transformer._forward_pre_hooks) == hooks


def test_shape_follows_grouped_query_attention_like_peft():
    shape = prefix_shape(tiny_llama())  # 4 query heads, 2 key/value heads of 8
    assert (shape.num_layers, shape.num_heads, shape.head_dim, shape.token_dim) == (2, 2, 8, 16)


def test_clear_refusals():
    model = tiny_llama()
    with pytest.raises(LorakitError, match="num_virtual_tokens=0"):
        PrefixConfig(num_virtual_tokens=0)
    with pytest.raises(LorakitError, match="init='kaiming'"):
        PrefixConfig(init="kaiming")
    with pytest.raises(LorakitError, match="no Hugging Face config"):
        lorakit.add_prefix(nn.Linear(2, 2), PrefixConfig())
    lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules=["q_proj"]), name="a")
    with pytest.raises(LorakitError, match="'a' already names"):
        lorakit.add_prefix(model, PrefixConfig(), name="a")
    with pytest.raises(LorakitError, match="no prefix named 'b'"):
        lorakit.set_prefix(model, "b")
    lorakit.add_prefix(model, PrefixConfig(num_virtual_tokens=2))
    ids = token_ids()
    with torch.no_grad():
        cache = model(input_ids=ids, use_cache=True).cache  # filled with the prefix: fine to continue
        model(input_ids=ids[:, :1], cache=cache)
        lorakit.set_prefix(model, None)
        foreign = model(input_ids=ids, use_cache=True).cache
        lorakit.set_prefix(model, "prefix")
        with pytest.raises(LorakitError, match="already holds tokens without it"):
            model(input_ids=ids[:, :1], cache=foreign)
