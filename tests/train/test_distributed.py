"""The same `lorakit train` command under torchrun with 2 CPU processes (gloo) equals the 1-process run."""

import os
import subprocess
import sys

import torch
from safetensors.torch import load_file


def test_two_processes_match_one(tiny_models, data_files, tmp_path):
    common = [
        "train",
        "--model",
        str(tiny_models["llama"]),
        "--data",
        str(data_files["pc"]),
        "--eval-fraction",
        "0.2",
        "--max-steps",
        "4",
        "--lr",
        "0.02",
        "--no-progress",
        "--no-plot",
        "--device",
        "cpu",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run(
        [sys.executable, "-m", "lorakit", *common, "--batch-size", "4", "--out", str(tmp_path / "one")],
        capture_output=True,
        text=True,
        env=env,
        timeout=240,
    )
    assert one.returncode == 0, one.stderr
    two = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            "-m",
            "lorakit",
            *common,
            "--batch-size",
            "2",
            "--out",
            str(tmp_path / "two"),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=240,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    a = load_file(tmp_path / "one/adapter/adapter_model.safetensors")
    b = load_file(tmp_path / "two/adapter/adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-5), (key, (a[key] - b[key]).abs().max())
    assert not torch.equal(a[next(k for k in a if "lora_B" in k)], torch.zeros(1))  # it did train
    runs = [__import__("json").loads((tmp_path / d / "run.json").read_text()) for d in ("one", "two")]
    assert runs[1]["world_size"] == 2
    assert abs(runs[0]["eval_after"]["loss"] - runs[1]["eval_after"]["loss"]) < 1e-5
