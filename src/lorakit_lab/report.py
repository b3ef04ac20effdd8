"""What every experiment writes: report.md (tables, the command, versions, machine), PNG plots, results.json.

A Report collects markdown blocks and matplotlib figures while the study runs; `write(out)` then
puts them into a fresh staging folder beside `out` and renames it into place, so a crashed or
interrupted run never leaves a half-written report behind.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lorakit.io import atomic_directory, write_json


def fmt(value: Any, digits: int = 3) -> str:
    """A table cell: ints with thousands separators, floats to `digits` significant places."""
    if isinstance(value, bool) or value is None:
        return "-" if value is None else str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if value != value:  # NaN
            return "nan"
        if abs(value) >= 10**digits:
            return f"{value:,.0f}"
        return f"{value:.{digits}g}"
    return str(value)


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-flavoured markdown table."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(fmt(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.3g} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000.0
    return f"{n} B"


def machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        mem = 0
    import torch

    return {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "memory_gb": round(mem / 1e9, 1),
        "platform": platform.platform(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def versions(extra: Sequence[str] = ()) -> dict[str, str]:
    """Python and the packages behind the numbers; `extra` names further distributions (e.g. diffusers)."""
    out = {"python": sys.version.split()[0]}
    for package in ("torch", "transformers", "lorakit", "numpy", *extra):
        try:
            out[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:  # a missing optional package is reported, not fatal
            out[package] = "not installed"
    try:
        root = Path(__file__).resolve().parents[2]  # src/lorakit_lab/report.py -> the repository
        commit = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5
        )
        if commit.returncode == 0:
            out["lorakit_commit"] = commit.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return out


class Report:
    """Markdown blocks + figures + a results dict, written together at the end."""

    def __init__(self, name: str, title: str, command: str, quick: bool, packages: Sequence[str] = ()):
        self.name, self.title, self.command, self.quick = name, title, command, quick
        self.packages = tuple(packages)  # distributions to name in the header besides torch and transformers
        self.blocks: list[str] = []
        self.figures: list[tuple[str, Any]] = []
        self.started = time.time()

    def add(self, markdown: str) -> None:
        self.blocks.append(markdown.strip("\n"))

    def section(self, heading: str, markdown: str = "") -> None:
        self.add(f"## {heading}\n\n{markdown}" if markdown else f"## {heading}")

    def table(self, headers: Sequence[str], rows: Sequence[Sequence[Any]], caption: str = "") -> None:
        self.add((f"{caption}\n\n" if caption else "") + table(headers, rows))

    def figure(self, fig, filename: str, caption: str) -> None:
        """Keep a matplotlib figure to save as `filename` (PNG) and show it in the report."""
        self.figures.append((filename, fig))
        self.add(f"![{caption}]({filename})\n\n*{caption}*")

    def render(self, results: dict[str, Any]) -> str:
        env = results["environment"]
        head = [
            f"# {self.title}",
            "",
            f"Reproduce: `{self.command}`"
            + ("  (quick mode: a smoke-sized run, numbers are not meaningful)" if self.quick else ""),
            "",
            f"Ran {time.strftime('%Y-%m-%d %H:%M', time.localtime(self.started))}, {results['wall_seconds']:.0f} s "
            "wall; "
            f"machine: {env['machine']['cpu']} ({env['machine']['cpu_count']} cores, "
            f"{env['machine']['torch_threads']} torch threads, "
            f"{env['machine']['memory_gb']} GB RAM); " + ", ".join(f"{k} {v}" for k, v in env["versions"].items()),
            "",
        ]
        return "\n".join(head) + "\n" + "\n\n".join(self.blocks) + "\n"

    def write(self, out: str | os.PathLike, results: dict[str, Any]) -> Path:
        """Write report.md, results.json and the PNGs into `out`, replacing it whole."""
        import matplotlib.pyplot as plt

        out = Path(out)
        results = dict(results)
        results["experiment"] = self.name
        results["quick"] = self.quick
        results["command"] = self.command
        results["wall_seconds"] = round(time.time() - self.started, 1)
        results["environment"] = {"machine": machine(), "versions": versions(self.packages)}
        with atomic_directory(out) as staging:
            for filename, fig in self.figures:
                fig.savefig(staging / filename, dpi=110, bbox_inches="tight")
                plt.close(fig)
            write_json(staging / "results.json", results)
            (staging / "report.md").write_text(self.render(results))
        return out
