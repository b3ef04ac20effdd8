"""per_row: each batch row with its own adapter equals running that row alone with that adapter."""

import pytest
import torch
from tiny_models import conv_inputs, conv_net, randomize_adapter, tiny_bert, tiny_llama, token_ids

import lorakit
from lorakit import LoraConfig, LorakitError


def multi_adapter_llama():
    model = tiny_llama()
    lorakit.inject(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj", "embed_tokens"]), name="sql")
    lorakit.inject(model, LoraConfig(r=8, alpha=4, target_modules="all-linear"), name="poet")
    lorakit.inject(model, LoraConfig(r=2, target_modules=["o_proj"], use_dora=True), name="dora")
    for i, name in enumerate(("sql", "poet", "dora")):
        randomize_adapter(model, name, seed=i)
    return model


def alone(model, ids, name, **kwargs):
    lorakit.set_adapter(model, name)
    return model(ids, **kwargs)


def test_mixed_batch_equals_each_row_alone():
    model = multi_adapter_llama()
    names = ["sql", None, "poet", "dora", "sql", "poet"]
    ids = token_ids(len(names), 7)
    with torch.no_grad():
        expected = torch.cat([alone(model, ids[i : i + 1], n).logits for i, n in enumerate(names)])
        lorakit.set_adapter(model, None)
        with lorakit.per_row(model, names):
            mixed = model(ids).logits
    torch.testing.assert_close(mixed, expected, atol=1e-5, rtol=1e-5)


def test_mixed_batch_generation_with_kv_cache():
    model = multi_adapter_llama()
    names = ["poet", "sql", None]
    prompt = token_ids(3, 5)
    with torch.no_grad():
        with lorakit.per_row(model, names):
            mixed = model.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)
        for i, name in enumerate(names):
            lorakit.set_adapter(model, name)
            single = model.generate(prompt[i : i + 1], max_new_tokens=6, do_sample=False, pad_token_id=0)
            assert torch.equal(mixed[i : i + 1], single)


def test_mixed_batch_backward_matches_per_row_gradients():
    model = multi_adapter_llama()
    ids = token_ids(2, 6)
    lorakit.set_trainable(model, "sql")
    with lorakit.per_row(model, ["sql", "poet"]):
        model(ids).logits[0].sum().backward()
    grad_mixed = model.model.layers[0].self_attn.q_proj.lora_B["sql"].grad.clone()
    model.zero_grad()
    alone(model, ids[:1], "sql").logits.sum().backward()
    torch.testing.assert_close(
        grad_mixed, model.model.layers[0].self_attn.q_proj.lora_B["sql"].grad, atol=1e-5, rtol=1e-4
    )


def test_modules_to_save_and_conv_layers_route_per_row():
    model = tiny_bert()
    lorakit.inject(model, LoraConfig(target_modules=["query", "value"], modules_to_save=["classifier"]), name="a")
    lorakit.inject(model, LoraConfig(target_modules=["query", "value"], modules_to_save=["classifier"]), name="b")
    randomize_adapter(model, "a", 1)
    randomize_adapter(model, "b", 2)
    with torch.no_grad():
        model.classifier.copies["b"].weight.mul_(-1)
    ids = token_ids(3, 6)
    names = ["a", "b", None]
    with torch.no_grad():
        expected = torch.cat([alone(model, ids[i : i + 1], n).logits for i, n in enumerate(names)])
        with lorakit.per_row(model, names):
            torch.testing.assert_close(model(ids).logits, expected, atol=1e-5, rtol=1e-5)

    conv = conv_net()
    lorakit.inject(conv, LoraConfig(r=2, target_modules=["embed", "conv1d", "conv2d", "conv3d", "head"]), name="x")
    lorakit.inject(conv, LoraConfig(r=3, target_modules=["conv2d", "head"]), name="y")
    randomize_adapter(conv, "x", 3)
    randomize_adapter(conv, "y", 4)
    inputs = conv_inputs(3)
    names = ["y", "x", None]
    with torch.no_grad():
        rows = []
        for i, n in enumerate(names):
            lorakit.set_adapter(conv, n)
            rows.append(conv(*(t[i : i + 1] for t in inputs)))
        with lorakit.per_row(conv, names):
            torch.testing.assert_close(conv(*inputs), torch.cat(rows), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("grad", [False, True])
def test_dora_conv_and_embedding_rows_equal_each_row_alone(grad):
    """DoRA and plain adapters on Conv1d/2d/3d, Embedding and Linear, mixed in one batch (with gradients
    on, the stack is rebuilt differentiably)."""
    conv = conv_net()
    every = ["embed", "conv1d", "conv2d", "conv3d", "head"]
    lorakit.inject(conv, LoraConfig(r=2, target_modules=every, use_dora=True), name="x")
    lorakit.inject(conv, LoraConfig(r=3, target_modules=["embed", "conv2d"], use_dora=True), name="y")
    lorakit.inject(conv, LoraConfig(r=2, target_modules=["embed", "conv3d", "head"]), name="z")
    for seed, name in enumerate("xyz"):
        randomize_adapter(conv, name, seed)
    inputs = conv_inputs(5)
    names = ["y", "x", None, "z", "x"]
    with torch.no_grad():
        expected = []
        for i, n in enumerate(names):
            lorakit.set_adapter(conv, n)
            expected.append(conv(*(t[i : i + 1] for t in inputs)))
    lorakit.set_trainable(conv, "x")
    with torch.set_grad_enabled(grad), lorakit.per_row(conv, names):
        torch.testing.assert_close(conv(*inputs), torch.cat(expected), atol=1e-6, rtol=1e-6)


def test_per_row_errors_are_clear():
    model = multi_adapter_llama()
    with pytest.raises(LorakitError, match="no adapter named 'zzz'"):
        with lorakit.per_row(model, ["zzz"]):
            pass
    with pytest.raises(LorakitError, match="batch has 2 rows"):
        with lorakit.per_row(model, ["sql"]):
            model(token_ids(2, 4))
    lorakit.set_adapter(model, "sql")
    lorakit.merge(model)
    with pytest.raises(LorakitError, match="merged"):
        with lorakit.per_row(model, ["sql"]):
            pass


def each_row_alone(model, ids, names):
    rows = []
    for i, name in enumerate(names):
        lorakit.set_adapter(model, name)
        rows.append(model(ids[i : i + 1]).logits)
    lorakit.set_adapter(model, None)
    return torch.cat(rows)


@pytest.mark.parametrize("length", [1, 5])
def test_one_token_rows_and_eval_without_no_grad(length):
    """One token per row takes the SDDMM + embedding_bag path; frozen adapters with grad mode on too."""
    model = multi_adapter_llama()
    model.requires_grad_(False)
    names = ["dora", "poet", None, "sql", "poet", "dora", "sql", None]
    ids = token_ids(len(names), length)
    with torch.no_grad():
        expected = each_row_alone(model, ids, names)
    with lorakit.per_row(model, names):
        torch.testing.assert_close(model(ids).logits, expected, atol=1e-5, rtol=1e-5)


def test_hot_load_delete_and_edit_between_mixed_batches():
    """The stack is synced incrementally: new, deleted, re-added and edited adapters all show up."""
    model = tiny_llama()
    lorakit.inject(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]), name="first")
    randomize_adapter(model, "first", seed=0)
    ids = token_ids(3, 1)
    with torch.no_grad():
        with lorakit.per_row(model, ["first", None, "first"]):
            model(ids)
        for i in range(6):  # more than the stack's first capacity (4), so it grows in place
            lorakit.inject(
                model, LoraConfig(r=2 + i % 3, target_modules=["q_proj", "k_proj", "v_proj"]), name=f"new{i}"
            )
            randomize_adapter(model, f"new{i}", seed=10 + i)
            with lorakit.per_row(model, [f"new{i}", "first", None]):
                model(ids)
        names = ["new5", "first", "new2"]
        expected = each_row_alone(model, ids, names)
        with lorakit.per_row(model, names):
            torch.testing.assert_close(model(ids).logits, expected, atol=1e-5, rtol=1e-5)

        lorakit.delete_adapter(model, "new2")
        lorakit.inject(model, LoraConfig(r=6, target_modules=["v_proj"]), name="new2")  # a larger rank: re-padded
        randomize_adapter(model, "new2", seed=99)
        model.model.layers[0].self_attn.q_proj.lora_B["first"].mul_(3.0)  # an in-place edit
        expected = each_row_alone(model, ids, names)
        with lorakit.per_row(model, names):
            torch.testing.assert_close(model(ids).logits, expected, atol=1e-5, rtol=1e-5)
