"""init="tokens": a prefix that starts as the frozen model's keys and values of real tokens acts, untrained,
exactly like those tokens written in front of the input (the reference: a plain forward of the joined
ids), holds what the plain model caches for them, saves as an ordinary PEFT prefix, and bad settings are
refused with one line."""

import copy

import pytest
import torch
from tiny_models import randomize_adapter, tiny_bert, tiny_gpt2, tiny_llama, token_ids

import lorakit
from lorakit import LorakitError, PrefixConfig
from lorakit.formats.peft_prefix import save_prefix
from lorakit.prefix import prefixes
from lorakit.prefix_init import prefix_token_ids

N = 4
PROMPT = [5, 17, 99, 3]  # the real tokens that start the prefix


def _tokens(n=N, projection=False, hidden=None):
    return PrefixConfig(
        num_virtual_tokens=n,
        init="tokens",
        token_ids=PROMPT[:n],
        prefix_projection=projection,
        encoder_hidden_size=hidden,
    )


def _joined(model, text):
    """The reference: the plain model (no prefix) run on PROMPT followed by `text`, logits of `text`'s positions."""
    prompt = torch.tensor([PROMPT]).expand(text.shape[0], -1)
    with torch.no_grad():
        return model(input_ids=torch.cat([prompt, text], dim=1)).logits[:, len(PROMPT) :]


@pytest.mark.parametrize(
    "build, projection", [(tiny_llama, False), (tiny_gpt2, False), (tiny_llama, True), (tiny_gpt2, True)]
)
def test_untrained_tokens_prefix_equals_the_tokens_in_front(build, projection):
    """Rotary (Llama) and learned (GPT-2) positions alike: the prefix sits at 0..n-1, the text at n.."""
    model = build()
    plain = copy.deepcopy(model)
    lorakit.add_prefix(model, _tokens(projection=projection, hidden=16), seed=0)
    text = token_ids(batch=2, length=6, seed=4)
    with torch.no_grad():
        got = model(input_ids=text).logits
    torch.testing.assert_close(got, _joined(plain, text), atol=1e-5, rtol=1e-5)
    trainable = [n for n, p in prefixes(model).named_parameters()]
    assert (len(trainable) == 5) is projection  # E, W1, b1, W2, b2 with the MLP; E alone without


def test_table_holds_the_plain_models_cached_keys_and_values():
    """The table, unpacked the way the forward hook reads it, is the plain model's KV cache of PROMPT."""
    model = tiny_llama()
    with torch.no_grad():
        cache = model(input_ids=torch.tensor([PROMPT]), use_cache=True).cache
    lorakit.add_prefix(model, _tokens())
    with torch.no_grad():
        unpacked = prefixes(model).keys_values(["prefix"], torch.float32)
    assert len(unpacked) == len(cache.layers) == 2
    for (k, v), layer in zip(unpacked, cache.layers):
        torch.testing.assert_close(k, layer.keys, atol=0, rtol=0)
        torch.testing.assert_close(v, layer.values, atol=0, rtol=0)


def test_tokens_are_run_through_active_lora_with_other_prefixes_off():
    model = tiny_llama()
    lorakit.inject(model, lorakit.LoraConfig(r=4, target_modules=["q_proj", "k_proj", "v_proj"]))
    randomize_adapter(model, "default")
    lorakit.add_prefix(model, PrefixConfig(num_virtual_tokens=3), name="other", seed=1)  # active, random
    plain = copy.deepcopy(model)
    lorakit.set_prefix(plain, None)
    model.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    lorakit.add_prefix(model, _tokens(), name="prefix")
    assert model.training and lorakit.active_prefix(model) == "prefix"
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters() if n in before)
    model.eval()
    text = token_ids(batch=1, length=5, seed=2)
    with torch.no_grad():
        got = model(input_ids=text).logits
    torch.testing.assert_close(got, _joined(plain, text), atol=1e-5, rtol=1e-5)


def test_saved_tokens_prefix_is_a_plain_peft_prefix_with_equal_outputs(tmp_path):
    from peft import PeftModel

    model = tiny_llama()
    ours = copy.deepcopy(model)
    lorakit.add_prefix(ours, _tokens(projection=True, hidden=16), seed=0)
    save_prefix(ours, tmp_path / "p")
    reference = PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "p").eval()
    text = token_ids(batch=2, length=6, seed=4)
    with torch.no_grad():
        theirs, mine = reference(input_ids=text).logits, ours(input_ids=text).logits
    torch.testing.assert_close(mine, theirs, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(theirs, _joined(model, text), atol=1e-5, rtol=1e-5)


def test_prefix_token_ids_repeat_or_cut_the_tokenizers_encoding():
    def tokenizer(text):
        return {"input_ids": [7, 8, 9]}

    assert prefix_token_ids(tokenizer, "abc", 7) == [7, 8, 9, 7, 8, 9, 7]
    assert prefix_token_ids(tokenizer, "abc", 2) == [7, 8]
    with pytest.raises(LorakitError, match="non-empty"):
        prefix_token_ids(tokenizer, "  ", 2)
    with pytest.raises(LorakitError, match="no tokens"):
        prefix_token_ids(lambda text: {"input_ids": []}, "x", 2)


@pytest.mark.parametrize(
    "kwargs, expect",
    [
        ({"init": "tokens"}, r"token_ids=None is invalid for init='tokens'"),
        ({"init": "tokens", "token_ids": [1, 2]}, "token_ids has 2 ids but num_virtual_tokens=4"),
        ({"init": "tokens", "token_ids": [1, -2, 3, 4]}, "integers >= 0"),
        ({"init": "tokens", "token_ids": [1, True, 3, 4]}, "integers >= 0"),
        ({"init": "tokens", "token_ids": "abcd"}, "give a list of 4 token ids"),
        ({"init": "random", "token_ids": [1, 2, 3, 4]}, "token_ids is given but init='random'"),
        ({"init": "words"}, "init='words' is invalid for a prefix: choose random, zero, tokens"),
    ],
)
def test_bad_configs_are_refused(kwargs, expect):
    with pytest.raises(LorakitError, match=expect):
        PrefixConfig(num_virtual_tokens=4, **kwargs)


def test_models_that_cannot_start_from_tokens_are_refused_untouched():
    model = tiny_llama()  # vocabulary 128
    bad_id = PrefixConfig(num_virtual_tokens=2, init="tokens", token_ids=[1, 128])
    with pytest.raises(LorakitError, match="token_ids holds 128, outside this model's vocabulary of 128"):
        lorakit.add_prefix(model, bad_id)
    with pytest.raises(LorakitError, match="encoder_hidden_size >= num_virtual_tokens"):
        lorakit.add_prefix(model, _tokens(projection=True, hidden=3))
    with pytest.raises(LorakitError, match="returns no KV cache"):
        lorakit.add_prefix(tiny_bert(), _tokens())
    assert lorakit.list_prefixes(model) == []
