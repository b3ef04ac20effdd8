"""The one attach path, fuzzed: hundreds of generated bad adapter files and configs.

Each variant starts from a valid adapter (written by lorakit or by PEFT) and breaks one thing: a tensor
(extra, missing, renamed, wrong dtype/shape/rank, NaN), a config field (wrong type, out of range, a
disagreement with the tensors, an option lorakit does not implement) or the files themselves (links out
of the folder, oversized or malformed JSON/safetensors). Every variant must be refused with one
LorakitError line, and the model must be exactly as before: same module types, same tensors, bitwise.
"""

from __future__ import annotations

import json
import os
import struct

import pytest
import torch
from peft import LoraConfig as PeftLoraConfig
from peft import get_peft_model
from safetensors.torch import load_file, save_file
from tiny_models import conv_net, randomize_adapter, tiny_bert, tiny_llama, token_ids

import lorakit
from lorakit import LoraConfig, LorakitError

SOURCES = {  # name -> (model factory, how the valid adapter is made)
    "llama-qv": (tiny_llama, dict(r=4, alpha=8, target_modules=["q_proj", "v_proj"])),
    "llama-emb": (tiny_llama, dict(r=2, alpha=4, target_modules=["q_proj", "embed_tokens"])),
    "llama-dora": (tiny_llama, dict(r=2, alpha=4, target_modules=["k_proj", "down_proj"], use_dora=True)),
    "bert-head-bias": (tiny_bert, dict(r=2, target_modules=["query"], modules_to_save=["classifier"], bias="all")),
    "conv": (conv_net, dict(r=2, alpha=4, target_modules=["conv1d", "conv2d", "head"])),
}


def snapshot(model):
    tensors = {n: t.detach().clone() for n, t in model.state_dict(keep_vars=True).items()}
    return tensors, [(n, type(m)) for n, m in model.named_modules()]


def assert_unchanged(model, before):
    tensors, modules = snapshot(model)
    assert modules == before[1]
    assert tensors.keys() == before[0].keys()
    for name, value in before[0].items():
        assert tensors[name].dtype == value.dtype and torch.equal(tensors[name], value), name
    assert lorakit.list_adapters(model) == []


def write(directory, config, tensors):
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "adapter_config.json").write_text(json.dumps(config))
    save_file({k: v.clone().contiguous() for k, v in tensors.items()}, directory / "adapter_model.safetensors")
    return directory


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """A valid lorakit-written adapter per SOURCES entry, and a PEFT-written one for llama."""
    root = tmp_path_factory.mktemp("valid")
    made = {}
    for name, (factory, kwargs) in SOURCES.items():
        model = lorakit.inject(factory(), LoraConfig(**kwargs))
        randomize_adapter(model, "default")
        directory = lorakit.save_adapter(model, root / name)
        made[name] = (
            factory,
            json.loads((directory / "adapter_config.json").read_text()),
            load_file(directory / "adapter_model.safetensors"),
        )
    peft_model = get_peft_model(
        tiny_llama(), PeftLoraConfig(r=4, target_modules=["q_proj", "o_proj"], init_lora_weights=False)
    )
    peft_model.save_pretrained(root / "peft")
    made["peft-llama"] = (
        tiny_llama,
        json.loads((root / "peft" / "adapter_config.json").read_text()),
        load_file(root / "peft" / "adapter_model.safetensors"),
    )
    return made


# ----- generated variants -----------------------------------------------------------------------
def tensor_variants(factory, tensors):
    """(label, tensors) pairs, each breaking one thing about the tensors."""
    lora_keys = [k for k in tensors if ".lora_" in k]
    first = lora_keys[0]
    for key in lora_keys:
        value = tensors[key]
        for dtype in (torch.int32, torch.int64, torch.int8, torch.uint8, torch.bool):
            yield f"{key} as {dtype}", {**tensors, key: value.to(dtype)}
        yield f"{key} NaN", {**tensors, key: value.clone().fill_(float("nan"))}
        yield f"{key} inf", {**tensors, key: value.clone().index_fill_(0, torch.tensor([0]), float("inf"))}
        yield f"{key} 0-d", {**tensors, key: torch.tensor(1.0)}
        if value.dim() > 1 and value.shape[0] != value.shape[1]:
            yield f"{key} transposed", {**tensors, key: value.transpose(0, 1).contiguous()}
        yield f"{key} extra dim", {**tensors, key: value.unsqueeze(0)}
        empty = value[:0] if value.dim() == 1 or "lora_A" in key or "embedding_A" in key else value[:, :0]
        yield f"{key} rank 0", {**tensors, key: empty}
        yield (
            f"{key} one row less",
            {**tensors, key: value[:-1] if value.shape[0] > 1 else value.repeat(2, *[1] * (value.dim() - 1))},
        )
        yield f"drop {key}", {k: v for k, v in tensors.items() if k != key}
        for bad in (".lora_A.zzz.weight", ".lora_A.default.weight", ".lora_C.weight", ".lora_A.weight.extra"):
            yield (
                f"rename {key} {bad}",
                {**{k: v for k, v in tensors.items() if k != key}, key.rsplit(".lora_", 1)[0] + bad: value},
            )
    yield "no prefix", {k.removeprefix("base_model.model."): v for k, v in tensors.items()}
    yield "unknown module", {**tensors, first.replace("base_model.model.", "base_model.model.nowhere."): tensors[first]}
    yield "empty file", {}
    model = factory()
    for name, param in model.named_parameters():  # a tensor for every base parameter: must never overwrite it
        if f"base_model.model.{name}" in tensors:
            continue  # a bias the adapter owns (bias="all"): changing its value is legitimate
        yield f"base {name}", {**tensors, f"base_model.model.{name}": param.detach() + 1.0}
        if name.endswith("weight") and "." in name:
            owner = name.rsplit(".", 1)[0]
            yield f"base_layer {name}", {**tensors, f"base_model.model.{owner}.base_layer.weight": param.detach() * 2}


BAD_VALUES = {  # adapter_config.json field -> values that must be refused
    "r": ["8", 8.5, True, -1, 0, 1e400, [8], {"r": 8}, 3],
    "lora_alpha": ["16", True, -1, 0, float("nan"), 1e400, [16]],
    "lora_dropout": ["0.1", 1.0, -0.1, True, [0]],
    "use_rslora": ["false", "no", 1, 0.0 + 1, "true"],
    "use_dora": ["false", "yes", 1, "true"],
    "bias": ["some", 1, True, ["all"]],
    "target_modules": [5, [5], [""], ["nonexistent_module"], "(", ["q_proj"] * 0 or "nomatch.*"],
    "rank_pattern": ["x", {"(": 2}, {"q_proj": "2"}, {"q_proj": 0}, {"q_proj": [2]}, {"nomatch": 2}, {"q_proj": True}],
    "alpha_pattern": [[1], {"(": 2}, {"q_proj": "2"}, {"q_proj": -1}, {"nomatch": 2}, {"q_proj": float("inf")}],
    "modules_to_save": ["classifier", [1], [""], ["lm_head"]],
    "layers_to_transform": ["0", [-1], [True], 1.5, [7]],
    "exclude_modules": [5, [5], "("],
    "init_lora_weights": ["pissa", "olora", "loftq", 3],
    "peft_type": ["PREFIX_TUNING", "IA3", 5],
    "lora_bias": [True],
    "layer_replication": [[[0, 1]]],
    "target_parameters": [["mlp.experts.gate_up_proj"]],
    "use_qalora": [True],
    "task_type": ["TOKEN_CLS"],
}


def config_variants(config):
    for key, values in BAD_VALUES.items():
        for value in values:
            yield f"{key}={value!r}", {**config, key: value}
    yield "r disagrees", {**config, "r": config["r"] * 2}
    yield "dora on", {**config, "use_dora": not config.get("use_dora", False)}
    yield "top-level list", [config]
    yield "nested deep", {**config, "extra": json.loads("[" * 40 + "]" * 40)}


# ----- the tests --------------------------------------------------------------------------------
CASES = [(name, "tensors") for name in [*SOURCES, "peft-llama"]] + [
    (name, "config") for name in ("llama-qv", "llama-dora", "bert-head-bias", "peft-llama")
]


@pytest.mark.parametrize("source,kind", CASES)
def test_every_broken_variant_is_refused_and_changes_nothing(source, kind, sources, tmp_path, record_property):
    factory, config, tensors = sources[source]
    model = factory()
    before = snapshot(model)
    variants = list(tensor_variants(factory, tensors) if kind == "tensors" else config_variants(config))
    for i, (label, variant) in enumerate(variants):
        directory = tmp_path / f"v{i}"
        if kind == "tensors":
            write(directory, config, variant)
        else:
            directory.mkdir()
            (directory / "adapter_config.json").write_text(json.dumps(variant))
            save_file(tensors, directory / "adapter_model.safetensors")
        with pytest.raises(LorakitError) as err:
            lorakit.load_adapter(model, directory)
            pytest.fail(f"accepted: {label}")
        assert "\n" not in str(err.value), label
        assert_unchanged(model, before)
    record_property("variants", len(variants))
    assert len(variants) >= 20
    lorakit.load_adapter(model, write(tmp_path / "valid", config, tensors))  # and the valid one still loads
    assert lorakit.list_adapters(model) == ["default"]


FILE_BREAKS = {
    "config link out": lambda d, o: _link(d / "adapter_config.json", o / "adapter_config.json"),
    "weights link out": lambda d, o: _link(d / "adapter_model.safetensors", o / "adapter_model.safetensors"),
    "config is a folder": lambda d, o: _replace_dir(d / "adapter_config.json"),
    "config not utf-8": lambda d, o: (d / "adapter_config.json").write_bytes(b"\xff\xfe{\x00"),
    "config duplicate key": lambda d, o: (d / "adapter_config.json").write_text(
        '{"r": 4, "r": 8, "peft_type": "LORA"}'
    ),
    "config NaN literal": lambda d, o: _edit_config(d, lambda s: s.replace('"lora_alpha": 8', '"lora_alpha": NaN')),
    "config 100k deep": lambda d, o: (d / "adapter_config.json").write_text("[" * 100_000 + "]" * 100_000),
    "config 5 MB": lambda d, o: (d / "adapter_config.json").write_text('{"x": "' + "a" * 5_000_000 + '"}'),
    "config empty": lambda d, o: (d / "adapter_config.json").write_text(""),
    "weights empty": lambda d, o: (d / "adapter_model.safetensors").write_bytes(b""),
    "weights truncated": lambda d, o: _truncate(d / "adapter_model.safetensors"),
    "weights huge header": lambda d, o: (d / "adapter_model.safetensors").write_bytes(
        struct.pack("<Q", 1 << 40) + b"{}"
    ),
    "weights garbage": lambda d, o: (d / "adapter_model.safetensors").write_bytes(os.urandom(256)),
    "weights missing, pickle beside": lambda d, o: _pickle_only(d),
    "I32 header on float bytes": lambda d, o: _retype(d / "adapter_model.safetensors"),
}


def _link(path, target):
    path.unlink()
    path.symlink_to(target)


def _replace_dir(path):
    path.unlink()
    path.mkdir()


def _edit_config(d, change):
    path = d / "adapter_config.json"
    path.write_text(change(path.read_text()))


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _pickle_only(d):
    (d / "adapter_model.safetensors").unlink()
    torch.save({"x": torch.zeros(1)}, d / "adapter_model.bin")


def _retype(path):
    data = path.read_bytes()
    size = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + size])
    for key, info in header.items():
        if key != "__metadata__":
            info["dtype"] = "I32"
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + size :])


@pytest.mark.parametrize("label", FILE_BREAKS)
def test_broken_files_are_refused(label, sources, tmp_path):
    factory, config, tensors = sources["llama-qv"]
    outside = write(tmp_path / "outside", config, tensors)
    directory = write(tmp_path / "adapter", {**config, "lora_alpha": 8}, tensors)
    FILE_BREAKS[label](directory, outside)
    model = factory()
    before = snapshot(model)
    with pytest.raises(LorakitError) as err:
        lorakit.load_adapter(model, directory)
    assert "\n" not in str(err.value)
    assert_unchanged(model, before)


# ----- inject and combine go through the same path ----------------------------------------------
PLAN_FAILURES = {  # LoraConfig that is valid on its own but not for this model -> what the error says
    "rank above the layer": (dict(r=1 << 19, target_modules=["q_proj"]), "exceeds the layer"),
    "rank_pattern above the layer": (dict(target_modules=["q_proj"], rank_pattern={"q_proj": 4096}), "exceeds"),
    "rank_pattern matches nothing": (dict(target_modules=["q_proj"], rank_pattern={"v_proj": 2}), "rank_pattern key"),
    "alpha_pattern matches nothing": (dict(target_modules=["q_proj"], alpha_pattern={"zz": 2}), "alpha_pattern key"),
    "exclude removes all": (dict(target_modules=["q_proj"], exclude_modules=["q_proj"]), "exclude_modules"),
    "layers keep none": (dict(target_modules=["q_proj"], layers_to_transform=[7]), "layers_to_transform"),
    "nothing matched": (dict(target_modules=["nope"]), "matched no module"),
    "not adaptable": (dict(target_modules=["input_layernorm"]), "cannot adapt"),
    "saved matches nothing": (dict(target_modules=["q_proj"], modules_to_save=["nope"]), "modules_to_save"),
}


@pytest.mark.parametrize("case", PLAN_FAILURES)
def test_inject_failures_change_nothing(case):
    kwargs, message = PLAN_FAILURES[case]
    model = tiny_llama()
    before = snapshot(model)
    with pytest.raises(LorakitError, match=message):
        lorakit.inject(model, LoraConfig(**kwargs))
    assert_unchanged(model, before)


@pytest.mark.parametrize("base_dtype", [torch.int8, "nf4", torch.float64, 5])  # int8/int4 are names, not dtypes
def test_bad_base_dtype_is_refused_before_anything_changes(base_dtype):
    model = tiny_llama()
    before = snapshot(model)
    with pytest.raises(LorakitError, match="base_dtype"):
        lorakit.inject(model, LoraConfig(target_modules=["q_proj"]), base_dtype=base_dtype)
    assert_unchanged(model, before)


@pytest.mark.parametrize("init", ["kaiming", "pissa"])
@pytest.mark.parametrize("fail_at", [1, 3])
def test_a_failure_while_applying_is_undone_bitwise(init, fail_at, monkeypatch):
    """Out of memory half way through: every wrapped layer, added adapter and PiSSA residual is undone."""
    from lorakit.layers import LoraWrapper

    model = tiny_llama()
    before = snapshot(model)
    original, calls = LoraWrapper.add_adapter, []

    def flaky(self, *args, **kwargs):
        calls.append(1)
        original(self, *args, **kwargs)  # the layer is fully changed, then memory runs out
        if len(calls) == fail_at:
            raise MemoryError

    monkeypatch.setattr(LoraWrapper, "add_adapter", flaky)
    with pytest.raises(LorakitError, match="not enough memory"):
        lorakit.inject(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init=init))
    assert_unchanged(model, before)


def test_deleting_an_adapter_gives_the_base_its_biases_back(sources, tmp_path):
    factory, config, tensors = sources["bert-head-bias"]
    model = factory()
    before = snapshot(model)
    shifted = {k: v + 0.5 if k.endswith("bias") else v for k, v in tensors.items()}
    lorakit.load_adapter(model, write(tmp_path / "a", config, shifted))
    bias = "bert.encoder.layer.0.attention.output.dense.bias"
    assert not torch.equal(model.get_parameter(bias), before[0][bias])  # the adapter's own biases are in place
    lorakit.delete_adapter(model, "default")
    assert_unchanged(model, before)
    trained = lorakit.inject(factory(), LoraConfig(r=2, target_modules=["query"], bias="all"))
    start = snapshot(trained)[0][bias].clone()
    with torch.no_grad():
        trained.get_parameter(bias).add_(1.0)  # as training would
    lorakit.delete_adapter(trained, "default")
    assert torch.equal(trained.get_parameter(bias), start)


@pytest.mark.parametrize(
    "weights,rank,message",
    [
        ({"a": float("nan")}, None, "finite"),
        ({"a": True}, None, "finite"),
        ({"a": 1.0, "zz": 1.0}, None, "no adapter named"),
        ({"a": 1.0}, 0, "rank"),
        ({}, None, "non-empty"),
    ],
)
def test_combine_refusals_change_nothing(weights, rank, message):
    model = lorakit.inject(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"]), name="a")
    before = snapshot(model)
    with pytest.raises(LorakitError, match=message):
        lorakit.combine(model, weights, name="mix", rank=rank)
    tensors, modules = snapshot(model)
    assert modules == before[1] and all(torch.equal(tensors[k], v) for k, v in before[0].items())
    assert lorakit.list_adapters(model) == ["a"]


def test_loaded_factors_give_the_plain_matmul(sources, tmp_path):
    """What the attach path puts in place computes W0·x + s·B·A·x (a plain matmul as the reference)."""
    factory, config, tensors = sources["llama-qv"]
    model = lorakit.load_adapter(factory(), write(tmp_path / "a", config, tensors))
    reference = factory()
    prefix = "base_model.model.model.layers.0.self_attn.q_proj."
    a, b = tensors[prefix + "lora_A.weight"], tensors[prefix + "lora_B.weight"]
    with torch.no_grad():
        reference.model.layers[0].self_attn.q_proj.weight += (config["lora_alpha"] / config["r"]) * b @ a
        x = torch.randn(3, 32)
        expected = reference.model.layers[0].self_attn.q_proj(x)
        got = model.model.layers[0].self_attn.q_proj(x)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert model(token_ids()).logits.isfinite().all()
