"""Load test for `lorakit serve`: 1,000 requests, 64 in flight, across 16 adapters, vs one at a time.

Setup (all offline, seeded): a byte-level BPE tokenizer (4,096 tokens) trained on Python's own
standard-library source, a small Llama-style model built from a config (hidden 256, 4 layers,
8 heads, intermediate 704, ~5M parameters; small so the whole test runs in minutes on 2 CPU
cores), and 16 adapters (LoRA r=8 on q,k,v,o with random non-zero weights) saved in PEFT's layout.
The server is the real CLI (`lorakit serve`) in its own process; requests go through the official
`openai` client from 64 threads. Prompts are lines of standard-library source (one adapter per
request, round-robin; 1 in 16 uses the base model), max_tokens 8-32, greedy; every 4th request
streams (SSE).

Checks: 0 errors, and every response equals what its adapter gives alone (the same prompt on a
separate copy of the model, lorakit.set_adapter + greedy HF generate, computed here).
Reports: requests/s, generated tokens/s, p50/p99 latency (and time to first token for streams),
for the concurrent run and for the same requests sent one at a time.

--hot-load also times loading an r=8 (q,k,v,o) adapter into the real SmolLM2-135M through the
server's adapter cache (read, inject, copy into the slot stacks), 16 fresh adapters, cold.

    python benchmarks/serve_load.py                    # the run recorded in RESULTS.md
    python benchmarks/serve_load.py --requests 100 --sequential 20   # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

ADAPTERS = 16
BASE = "small-llama"


def corpus_lines(limit: int = 40000) -> list[str]:
    """Non-trivial lines of the standard library's source, a zero-install text corpus."""
    import sysconfig

    lines = []
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        for line in path.read_text(errors="ignore").splitlines():
            if 30 <= len(line.strip()) <= 160:
                lines.append(line.strip())
        if len(lines) >= limit:
            break
    return lines


def build_assets(root: Path, lines: list[str]) -> tuple[Path, Path]:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    import lorakit
    from lorakit.model_state import lora_layers

    model_dir, adapters_dir = root / BASE, root / "adapters"
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=4096,
        special_tokens=["<|endoftext|>"],
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(lines, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    tokenizer.save_pretrained(model_dir)
    torch.manual_seed(0)
    eos = tokenizer.eos_token_id
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=256,
        intermediate_size=704,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=eos,
        pad_token_id=eos,
    )
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(model_dir)
    generator = torch.Generator().manual_seed(1)
    for i in range(ADAPTERS):
        name = f"user{i:02d}"
        lorakit.inject(
            model, lorakit.LoraConfig(r=8, alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]), name=name
        )
        with torch.no_grad():
            for _, layer in lora_layers(model):
                if name in layer.specs:
                    for store in (layer.lora_A, layer.lora_B):
                        store[name].copy_(torch.randn(store[name].shape, generator=generator) * 0.05)
        lorakit.save_adapter(model, adapters_dir / name, name=name)
    return model_dir, adapters_dir


def make_requests(count: int, lines: list[str]) -> list[dict]:
    generator = torch.Generator().manual_seed(2)
    picks = torch.randint(0, len(lines), (count,), generator=generator).tolist()
    lengths = torch.randint(8, 33, (count,), generator=generator).tolist()
    requests = []
    for i in range(count):
        model = BASE if i % (ADAPTERS + 1) == ADAPTERS else f"user{i % (ADAPTERS + 1):02d}"
        requests.append(
            {"i": i, "model": model, "prompt": lines[picks[i]], "max_tokens": lengths[i], "stream": i % 4 == 3}
        )
    return requests


def references(model_dir: Path, adapters_dir: Path, requests: list[dict]) -> list[str]:
    """Each request alone: a separate model, set_adapter, greedy HF generate."""
    from tqdm import tqdm

    import lorakit
    from lorakit.models import load_model, load_tokenizer

    tokenizer = load_tokenizer(str(model_dir))
    model = load_model(str(model_dir))
    for i in range(ADAPTERS):
        lorakit.load_adapter(model, adapters_dir / f"user{i:02d}", name=f"user{i:02d}")
    eos = tokenizer.eos_token_id
    texts = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one short sequence at a time: more threads only add synchronisation
    with torch.no_grad():
        for request in tqdm(requests, desc="reference (alone)", mininterval=5):
            lorakit.set_adapter(model, None if request["model"] == BASE else request["model"])
            ids = tokenizer(request["prompt"])["input_ids"]
            out = model.generate(
                torch.tensor([ids]),
                attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                max_new_tokens=request["max_tokens"],
                do_sample=False,
                eos_token_id=eos,
                pad_token_id=eos,
            )
            texts.append(
                tokenizer.decode([t for t in out[0, len(ids) :].tolist() if t != eos], skip_special_tokens=True)
            )
    torch.set_num_threads(threads)
    return texts


def start_server(model_dir: Path, adapters_dir: Path, max_batch: int, threads: int) -> tuple[subprocess.Popen, str]:
    command = [
        sys.executable,
        "-c",
        "import sys; from lorakit.cli.main import main; sys.exit(main())",
        "serve",
        "--model",
        str(model_dir),
        "--adapters",
        str(adapters_dir),
        "--port",
        "0",
        "--max-batch",
        str(max_batch),
        "--max-adapters",
        str(ADAPTERS),
        "--threads",
        str(threads),
    ]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.time() + 300
    while time.time() < deadline:
        line = process.stderr.readline()
        if not line and process.poll() is not None:
            raise SystemExit(f"lorakit serve exited with {process.returncode}")
        found = re.search(r"on (http://\S+)/v1", line)
        if found:
            threading.Thread(
                target=lambda: [None for _ in process.stderr], daemon=True
            ).start()  # keep the pipe drained
            return process, found[1]
    raise SystemExit("lorakit serve did not start in 300 s")


def send(client, request: dict) -> dict:
    start = time.perf_counter()
    try:
        kwargs = {
            "model": request["model"],
            "prompt": request["prompt"],
            "max_tokens": request["max_tokens"],
            "temperature": 0,
        }
        first = None
        if request["stream"]:
            parts, tokens = [], None
            for chunk in client.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs):
                if chunk.choices and chunk.choices[0].text and first is None:
                    first = time.perf_counter() - start
                parts.append(chunk.choices[0].text if chunk.choices else "")
                tokens = chunk.usage.completion_tokens if chunk.usage else tokens
            text = "".join(parts)
        else:
            answer = client.completions.create(**kwargs)
            text, tokens = answer.choices[0].text, answer.usage.completion_tokens
        return {
            "i": request["i"],
            "text": text,
            "tokens": tokens,
            "latency": time.perf_counter() - start,
            "ttft": first,
            "error": None,
        }
    except Exception as err:  # counted, never fatal
        return {
            "i": request["i"],
            "text": None,
            "tokens": 0,
            "latency": time.perf_counter() - start,
            "ttft": None,
            "error": f"{type(err).__name__}: {err}",
        }


def run_load(url: str, requests: list[dict], concurrency: int, label: str) -> dict:
    import openai
    from tqdm import tqdm

    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=600)
    results = []
    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool, tqdm(total=len(requests), desc=label, mininterval=5) as bar:
        for result in pool.map(lambda r: send(client, r), requests):
            results.append(result)
            bar.update()
    wall = time.perf_counter() - start
    latencies = sorted(r["latency"] for r in results)
    ttfts = sorted(r["ttft"] for r in results if r["ttft"] is not None)
    tokens = sum(r["tokens"] or 0 for r in results)

    def pct(values, q):
        return values[min(len(values) - 1, int(q * len(values)))] if values else None

    return {
        "requests": len(results),
        "concurrency": concurrency,
        "wall_s": wall,
        "requests_per_s": len(results) / wall,
        "tokens": tokens,
        "tokens_per_s": tokens / wall,
        "p50_latency_s": pct(latencies, 0.5),
        "p99_latency_s": pct(latencies, 0.99),
        "p50_ttft_s": pct(ttfts, 0.5),
        "p99_ttft_s": pct(ttfts, 0.99),
        "errors": [r["error"] for r in results if r["error"]],
        "results": results,
    }


def hot_load_times(count: int) -> dict:
    """Cold loads of r=8 q,k,v,o adapters into SmolLM2-135M through the server's AdapterCache."""
    import lorakit
    from lorakit.models import load_model
    from lorakit.serve import AdapterCache

    model = load_model("smollm2-135m-instruct")
    times, size = [], 0
    with tempfile.TemporaryDirectory() as tmp:
        donor = load_model("smollm2-135m-instruct")
        for i in range(count):
            lorakit.inject(
                donor, lorakit.LoraConfig(r=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]), name=f"a{i}"
            )
            lorakit.save_adapter(donor, Path(tmp) / f"a{i}", name=f"a{i}")
            lorakit.delete_adapter(donor, f"a{i}")
        size = (Path(tmp) / "a0" / "adapter_model.safetensors").stat().st_size
        cache = AdapterCache(model, tmp, capacity=count)
        cpu = []
        for i in range(count):
            start = time.process_time()  # CPU time: what a load costs on an idle core, whatever else runs
            times.append(cache.load(f"a{i}"))
            cpu.append(1000 * (time.process_time() - start))
    return {
        "model": "SmolLM2-135M-Instruct",
        "adapter": "r=8 on q,k,v,o (30 layers)",
        "file_bytes": size,
        "load_ms": times,
        "median_ms": statistics.median(times),
        "max_ms": max(times),
        "cpu_ms": cpu,
        "median_cpu_ms": statistics.median(cpu),
        "max_cpu_ms": max(cpu),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--sequential", type=int, help="send only the first N requests one at a time (default: all)")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads in the server (default 1: the clients share the 2 cores)"
    )
    parser.add_argument("--hot-load", type=int, default=16, metavar="N", help="SmolLM2 adapter loads to time (0 skips)")
    parser.add_argument("--hot-load-only", action="store_true", help="only time the SmolLM2 adapter loads")
    parser.add_argument("--json", default="benchmarks/results/serve_load.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from lorakit.cli.common import quiet_transformers

    quiet_transformers()
    record: dict = {
        "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "settings": vars(args),
        "machine": {
            "cpu_count": os.cpu_count(),
            "platform": platform.platform(),
            "torch": torch.__version__,
            "load_average_at_start": os.getloadavg(),
        },
    }
    if args.hot_load_only:
        h = hot_load_times(args.hot_load)
        print(
            f"{len(h['load_ms'])} cold loads of {h['adapter']} into {h['model']}: wall median {h['median_ms']:.1f} ms "
            f"(max {h['max_ms']:.1f}), CPU median {h['median_cpu_ms']:.1f} ms (max {h['max_cpu_ms']:.1f})"
        )
        path = Path(args.json).with_name("hot_load.json")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({**record, "hot_load": h}, indent=2))
        print(f"wrote {path}")
        return
    with tempfile.TemporaryDirectory() as tmp:
        lines = corpus_lines()
        model_dir, adapters_dir = build_assets(Path(tmp), lines)
        requests = make_requests(args.requests, lines)
        expected = references(model_dir, adapters_dir, requests)
        runs = {}
        for label, concurrency, subset in (
            ("concurrent", args.concurrency, requests),
            ("one at a time", 1, requests[: args.sequential or len(requests)]),
        ):
            process, url = start_server(model_dir, adapters_dir, max_batch=args.concurrency, threads=args.threads)
            try:
                runs[label] = run_load(url, subset, concurrency, label)
            finally:
                process.terminate()
                process.wait(timeout=60)
            run = runs[label]
            run["mismatches"] = [r["i"] for r in run["results"] if r["error"] is None and r["text"] != expected[r["i"]]]
    if args.hot_load:
        record["hot_load"] = hot_load_times(args.hot_load)

    print()
    print(
        f"{'run':14s} {'requests':>8s} {'errors':>6s} {'mismatch':>8s} {'req/s':>7s} {'tok/s':>7s} {'p50 s':>7s} "
        f"{'p99 s':>7s} "
        f"{'p50 TTFT':>8s}"
    )
    for label, run in runs.items():
        print(
            f"{label:14s} {run['requests']:8d} {len(run['errors']):6d} {len(run['mismatches']):8d} "
            f"{run['requests_per_s']:7.2f} "
            f"{run['tokens_per_s']:7.1f} {run['p50_latency_s']:7.3f} {run['p99_latency_s']:7.3f} "
            f"{run['p50_ttft_s'] if run['p50_ttft_s'] is not None else float('nan'):8.3f}"
        )
    concurrent, alone = runs["concurrent"], runs["one at a time"]
    record["ratios"] = {
        "throughput concurrent / one-at-a-time (tokens/s)": concurrent["tokens_per_s"] / alone["tokens_per_s"],
        "throughput concurrent / one-at-a-time (requests/s)": concurrent["requests_per_s"] / alone["requests_per_s"],
    }
    for name, value in record["ratios"].items():
        print(f"{name}: {value:.2f}x")
    if "hot_load" in record:
        h = record["hot_load"]
        print(
            f"hot load, {h['model']} {h['adapter']} ({h['file_bytes'] / 1e6:.1f} MB), {len(h['load_ms'])} cold loads: "
            f"wall median {h['median_ms']:.1f} ms (max {h['max_ms']:.1f}), CPU median {h['median_cpu_ms']:.1f} ms "
            f"(max {h['max_cpu_ms']:.1f})"
        )
    for label, run in runs.items():
        for error in run["errors"][:5]:
            print(f"{label} error: {error}")
    record["runs"] = runs
    record["machine"]["load_average_at_end"] = os.getloadavg()
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(record, indent=2))
    print(f"\nwrote {args.json}")
    ok = all(not run["errors"] and not run["mismatches"] for run in runs.values())
    print("PASS: 0 errors, every response equals its adapter alone" if ok else "FAIL: errors or mismatches (see JSON)")


if __name__ == "__main__":
    main()
