"""Checkpoints survive kill -9 anywhere: a resumed run ends bitwise where an uninterrupted one does.

A real SIGKILL (no `finally`, no atexit) hits `lorakit train` at evenly spread calls of os.replace,
os.fsync, os.unlink and os.rmdir: while a tensor file is written, while a checkpoint or the adapter
is renamed into place, while an old checkpoint is pruned. kill_runner.py forks those runs from one
warm process so the whole test takes seconds, not minutes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from lorakit.io import LEFTOVER
from lorakit.train import checkpoint

CALLS = ["os.replace", "os.fsync", "os.unlink", "os.rmdir"]
PER_CALL = 4
ARGV = ["train", "--batch-size", 4, "--lr", 0.02, "--dropout", 0.1, "--max-steps", 6, "--save-every", 2]
ARGV += ["--keep-checkpoints", 1, "--targets", "q_proj,v_proj", "--no-progress", "--no-plot"]


def _leftovers(run: Path) -> list[str]:
    return [str(p.relative_to(run)) for p in run.rglob("*") if LEFTOVER.fullmatch(p.name)]


def test_kill_9_anywhere_then_resume_is_bitwise_equal(tiny_models, data_files, tmp_path):
    argv = [*ARGV, "--model", tiny_models["llama"], "--data", data_files["text"]]
    spec = {"argv": [str(a) for a in argv], "root": str(tmp_path), "calls": CALLS, "per_call": PER_CALL}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    runner = Path(__file__).with_name("kill_runner.py")
    done = subprocess.run([sys.executable, runner, tmp_path / "spec.json"], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["straight"] == 0
    reference = load_file(tmp_path / "straight/adapter/adapter_model.safetensors")
    assert all(results["counts"].get(c, 0) >= PER_CALL for c in CALLS), results["counts"]
    assert len(results["runs"]) >= 14
    for run in results["runs"]:
        out = Path(run["out"])
        where = f"killed at {run['call']} #{run['n']}"
        assert run["killed"] == -9 and run["resumed"] == 0, (where, run)
        resumed = load_file(out / "adapter/adapter_model.safetensors")
        assert resumed.keys() == reference.keys(), where
        assert all(torch.equal(resumed[k], reference[k]) for k in reference), where
        assert _leftovers(out) == [], (where, _leftovers(out))
        assert [p.name for p in checkpoint.checkpoints(out)] == ["step-00000006"], where


def _fake_checkpoint(folder: Path, files=checkpoint.FILES) -> Path:
    for name in files:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text("{}")
    return folder


def test_only_complete_checkpoints_are_listed_and_leftovers_are_removed(tmp_path):
    ckpts = tmp_path / checkpoint.FOLDER
    good = _fake_checkpoint(ckpts / "step-00000004")
    _fake_checkpoint(ckpts / "step-00000006", files=[checkpoint.STATE])  # a prune cut short by an old lorakit
    _fake_checkpoint(ckpts / "step-00000008", files=checkpoint.FILES[1:])
    (ckpts / "step-x").mkdir()  # not a step number: not ours, kept
    leftovers = [
        ckpts / ".step-00000010.tmp-ab_12",
        ckpts / ".step-00000002.del-4242",
        ckpts / ".step-00000004.old-77",
        tmp_path / ".adapter.tmp-zz9",
        tmp_path / ".adapter.old-123",
    ]
    for path in leftovers:
        _fake_checkpoint(path)
    (tmp_path / ".run.json.k3j2.tmp").write_text("{")
    (tmp_path / ".keep-me").write_text("a user's file")
    assert checkpoint.checkpoints(tmp_path) == [good]
    removed = checkpoint.remove_stale(tmp_path)
    assert len(removed) == len(leftovers) + 3
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-00000004", "step-x"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".keep-me", checkpoint.FOLDER]
