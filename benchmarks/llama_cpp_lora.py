"""llama.cpp runs lorakit's GGUF exports with lorakit's numbers (optional: needs llama-cpp-python).

For each adapter on the real SmolLM2-135M-Instruct (or --tiny, a seeded tiny Llama):
  lorakit            the adapted model in lorakit (fp32): the reference logits
  adapter.gguf       the f32 base as GGUF + `lorakit export --format gguf` loaded with llama.cpp's lora_path
  converter-style    the same adapter as llama.cpp's convert_lora_to_gguf.py writes it from the PEFT folder
                     (one alpha = lora_alpha, B as saved): shows the scale drift a runtime that reads one
                     alpha gets with rsLoRA / alpha_pattern / rank_pattern
  merged f32 / q8_0  `lorakit export --format gguf --merged`
Each row: max |logit difference| from lorakit over the prompt's tokens, and whether the greedy next token
at every position agrees. llama-cpp-python builds llama.cpp from source (~45 min on 2 cores), so this is
not part of `make test`; tests/formats/test_gguf.py checks the same files with the `gguf` reader.

    pip install llama-cpp-python==0.3.36
    python benchmarks/llama_cpp_lora.py               # SmolLM2-135M-Instruct, the run in RESULTS.md
    python benchmarks/llama_cpp_lora.py --tiny        # seconds
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

PROMPT = "LoRA adds a low-rank update to a frozen weight matrix, so a small adapter changes what the model says."
ADAPTERS = {
    "q,v r=8 a=16": dict(r=8, alpha=16, target_modules=["q_proj", "v_proj"]),
    "all-linear rsLoRA, v r=4, o alpha 24": dict(
        r=8,
        alpha=16,
        target_modules="all-linear",
        use_rslora=True,
        rank_pattern={"v_proj": 4},
        alpha_pattern={"o_proj": 24},
    ),
}


def base_model(tiny: bool, folder: Path):
    from lorakit.models import load_model, load_tokenizer, resolve

    if tiny:
        from tiny_hf import save_tiny

        path = str(save_tiny(folder / "tiny", "llama"))
    else:
        path = resolve("smollm2-135m-instruct")
    return path, load_model(path), load_tokenizer(path)


def llama_logits(model_path: Path, ids: list[int], lora_path: Path | None = None) -> np.ndarray:
    from llama_cpp import Llama

    llm = Llama(
        model_path=str(model_path),
        lora_path=str(lora_path) if lora_path else None,
        logits_all=True,
        n_ctx=128,
        n_threads=2,
        type_k=0,  # GGML_TYPE_F32 KV cache: the default f16 cache alone moves logits by ~1e-3
        type_v=0,
        verbose=False,
    )
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float64)


def converter_style(model, path: Path) -> Path:
    """The adapter as convert_lora_to_gguf.py writes it from lorakit's PEFT folder: alpha = lora_alpha, B as saved."""
    import gguf

    from lorakit.formats.fold import factor_keys
    from lorakit.formats.gguf import llama_permute, row_heads, tensor_name
    from lorakit.formats.peft import adapter_state

    tensors, config = adapter_state(model, "default", pure=True)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(config["lora_alpha"]))
    for module, keys in sorted(factor_keys(tensors).items()):
        a, b = tensors[keys["A"]].float(), tensors[keys["B"]].float()
        heads = row_heads(model, f"{module}.weight")
        b = llama_permute(b, heads) if heads is not None else b
        name = tensor_name(model, f"{module}.weight")
        writer.add_tensor(f"{name}.lora_a", a.numpy())
        writer.add_tensor(f"{name}.lora_b", b.numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="a seeded tiny Llama instead of SmolLM2-135M")
    parser.add_argument("--out", default="benchmarks/results/llama_cpp_lora.json")
    args = parser.parse_args()
    torch.manual_seed(0)
    import copy

    import llama_cpp
    from tiny_models import randomize_adapter

    import lorakit
    from lorakit.formats.gguf import write_adapter, write_merged

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        path, base, tokenizer = base_model(args.tiny, tmp)
        ids = tokenizer(PROMPT).input_ids
        tokenizer.save_pretrained(tmp / "tok")
        write_merged(copy.deepcopy(base), tmp / "base.gguf", tmp / "tok", dtype="f32")
        with torch.no_grad():
            plain = base(torch.tensor([ids])).logits[0].double().numpy()
        results.append(
            dict(adapter="(none)", runtime="base f32", **compare(plain, llama_logits(tmp / "base.gguf", ids)))
        )
        for label, kwargs in ADAPTERS.items():
            model = lorakit.inject(copy.deepcopy(base), lorakit.LoraConfig(**kwargs))
            randomize_adapter(model, "default", std=0.02)
            with torch.no_grad():
                expected = model(torch.tensor([ids])).logits[0].double().numpy()
            change = float(np.abs(expected - plain).max())
            rows = {
                "lorakit export adapter.gguf": (tmp / "base.gguf", write_adapter(model, tmp / "a.gguf")),
                "converter-style adapter": (tmp / "base.gguf", converter_style(model, tmp / "c.gguf")),
            }
            merged = lorakit.merge_and_unload(copy.deepcopy(model))
            for dtype in ("f32", "q8_0"):
                rows[f"lorakit export --merged {dtype}"] = (
                    write_merged(merged, tmp / f"m-{dtype}.gguf", tmp / "tok", dtype),
                    None,
                )
            for runtime, (model_path, lora) in rows.items():
                got = llama_logits(model_path, ids, lora)
                results.append(dict(adapter=label, runtime=runtime, adapter_change=change, **compare(expected, got)))
    print(
        f"model: {'tiny llama' if args.tiny else 'SmolLM2-135M-Instruct'}, prompt {len(ids)} tokens, "
        f"llama-cpp-python {llama_cpp.__version__}, {platform.processor() or platform.machine()}"
    )
    print("| adapter | runtime | max abs logit diff vs lorakit | greedy tokens agree | adapter's own max change |")
    print("|---|---|---:|---:|---:|")
    for r in results:
        print(
            f"| {r['adapter']} | {r['runtime']} | {r['max_diff']:.2e} | {r['greedy_agree']} | "
            f"{r.get('adapter_change', 0):.3f} |"
        )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"tiny": args.tiny, "tokens": len(ids), "rows": results}, indent=2) + "\n")


def compare(expected: np.ndarray, got: np.ndarray) -> dict:
    agree = (expected.argmax(-1) == got.argmax(-1)).mean()
    return {"max_diff": float(np.abs(expected - got).max()), "greedy_agree": f"{agree:.0%}"}


if __name__ == "__main__":
    main()
