"""Runs `lorakit train` many times with a real SIGKILL at chosen points, cheaply: this process imports
lorakit, torch and transformers once, then forks one child per run (it never runs torch itself, so the
fork is safe). A child dies with kill -9 at the n-th call of a file-system function (os.replace,
os.fsync, os.unlink, os.rmdir): mid-write, mid-rename, mid-prune. Then a second child resumes.

    python kill_runner.py SPEC.json   ->  writes ROOT/results.json

SPEC: {"argv": [...train flags without --out...], "root": DIR, "calls": ["os.replace", ...],
       "per_call": 4}. Used by tests/train/test_checkpoint.py.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import datasets  # noqa: F401  (imported before the forks, so each child starts warm)
import transformers.models.llama.modeling_llama  # noqa: F401

from lorakit.cli.main import main


def _patch(call: str, kill_at: int | None, counts: dict[str, int]) -> None:
    """Count calls of os.<name>; SIGKILL this process at call number `kill_at`."""
    name = call.split(".", 1)[1]
    real = getattr(os, name)

    def counted(*args, **kwargs):
        counts[call] = counts.get(call, 0) + 1
        if counts[call] == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(*args, **kwargs)

    setattr(os, name, counted)


def _child(argv: list[str], patches: list[tuple[str, int | None]], counts_file: Path | None = None) -> int:
    """Fork, run `lorakit train argv` with the patches in the child; the child's exit status
    (-9 when it killed itself)."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            counts: dict[str, int] = {}
            for call, kill_at in patches:
                _patch(call, kill_at, counts)
            code = main(argv)
            if counts_file is not None:
                counts_file.write_text(json.dumps(counts))
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


def main_runner(spec: dict) -> dict:
    root, argv = Path(spec["root"]), [str(a) for a in spec["argv"]]
    counts_file = root / "counts.json"
    straight = _child(
        [*argv, "--out", str(root / "straight")], [(c, None) for c in spec["calls"]], counts_file=counts_file
    )
    counts = json.loads(counts_file.read_text())
    runs = []
    for call in spec["calls"]:
        total, k = counts.get(call, 0), spec["per_call"]
        points = sorted({max(1, round(total * (i + 0.5) / k)) for i in range(k)}) if total else []
        for n in points:
            out = root / f"{call.split('.')[1]}-{n}"
            killed = _child([*argv, "--out", str(out)], [(call, n)])
            resumed = _child([*argv, "--out", str(out), "--resume"], [])
            runs.append({"call": call, "n": n, "out": str(out), "killed": killed, "resumed": resumed})
    return {"straight": straight, "counts": counts, "runs": runs}


if __name__ == "__main__":
    spec = json.loads(Path(sys.argv[1]).read_text())
    (Path(spec["root"]) / "results.json").write_text(json.dumps(main_runner(spec)))
