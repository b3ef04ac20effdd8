"""`lorakit serve` as users run it: a subprocess on an ephemeral port, stopped with Ctrl-C."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import openai
import pytest
from serve_assets import Reference, build_assets

LORAKIT = [sys.executable, "-c", "import sys; from lorakit.cli.main import main; sys.exit(main())"]


def _as_background_job() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # what a shell does to `cmd &`; Ctrl-C must still stop the server


@pytest.mark.parametrize("stop_signal", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_cli_serves_and_stops_cleanly(tmp_path, stop_signal):
    model_dir, adapters_dir = build_assets(tmp_path)
    # PYTHONFAULTHANDLER: if the server ever fails to stop, SIGABRT makes it print every thread's stack (below)
    process = subprocess.Popen(
        [
            *LORAKIT,
            "serve",
            "--model",
            str(model_dir),
            "--adapters",
            str(adapters_dir),
            "--port",
            "0",
            "--max-adapters",
            "2",
        ],
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=_as_background_job,
        env={**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONFAULTHANDLER": "1"},
    )
    try:
        url, deadline, log = None, time.time() + 120, []
        while url is None and time.time() < deadline:
            line = process.stderr.readline()
            log.append(line)
            found = re.search(r"on (http://\S+)/v1", line)
            url = found and found[1]
            assert line or process.poll() is None, "".join(log)
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        assert [m.id for m in client.models.list().data][0] == "tiny-llama"
        answer = client.completions.create(model="sql", prompt="SELECT name", max_tokens=6, temperature=0)
        assert answer.choices[0].text == Reference(model_dir, adapters_dir).text("sql", "SELECT name", 6)
    finally:
        stopped = _stop(process, stop_signal)
    if stopped != 0:
        pytest.fail(
            f"exit code {stopped}" if isinstance(stopped, int) else stopped, pytrace=False
        )  # the whole text, untruncated


def _stop(process: subprocess.Popen, stop_signal: int) -> int | str:
    """Signal the server to stop; its exit code, or (if it hangs) every thread's stack as text for the failure."""
    process.send_signal(stop_signal)
    try:
        process.communicate(
            timeout=60
        )  # communicate, not wait: it drains stderr, so a full pipe cannot block the server
        return process.returncode
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGABRT)
        try:
            _, stderr = process.communicate(timeout=30)
        finally:
            process.kill()
        stacks = stderr.split("\nExtension modules:")[0]  # the module list after the stacks says nothing here
        return f"lorakit serve did not stop within 60 s of {signal.Signals(stop_signal).name}; its threads:\n" + stacks


def test_cli_bad_input_is_one_line_and_exit_2(tmp_path):
    result = subprocess.run(
        [*LORAKIT, "serve", "--model", str(tmp_path), "--adapters", str(tmp_path / "missing")],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"lorakit serve: error: --adapters {tmp_path / 'missing'} is not a folder; give the folder that holds one "
        "subfolder per adapter"
    ]


@pytest.mark.parametrize(
    ("flag", "value", "allowed"),
    [("--max-prompts", "0", "an integer from 1 to 65536"), ("--read-timeout", "0", "seconds above 0, at most 3600")],
)
def test_cli_limits_are_checked_before_loading(tmp_path, flag, value, allowed):
    result = subprocess.run(
        [*LORAKIT, "serve", "--model", str(tmp_path / "no-model"), flag, value], capture_output=True, text=True
    )
    field = flag[2:].replace("-", "_")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"lorakit serve: error: {field}={float(value) if 'timeout' in flag else int(value)!r} is invalid ({flag}): "
        f"use {allowed}"
    ]
