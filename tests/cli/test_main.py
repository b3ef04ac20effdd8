"""cli/main.py: the one-line contract for what no check foresaw, and the parser's own errors."""

from __future__ import annotations

import errno
import importlib

import pytest

from lorakit.cli.main import TRACEBACK_ENV, main

inspect_command = importlib.import_module("lorakit.cli.inspect")


def _failing(exc: BaseException):
    def run(args):
        raise exc

    return run


@pytest.mark.parametrize(
    "exc,code,words",
    [
        (TypeError("unsupported operand"), 1, "unexpected TypeError: unsupported operand (a bug in lorakit"),
        (RecursionError("maximum recursion depth"), 1, "unexpected RecursionError"),
        (OSError(errno.ENOSPC, "No space left on device", "/x/y"), 2, "No space left on device (/x/y); check"),
        (PermissionError(errno.EACCES, "Permission denied", "/root/z"), 2, "Permission denied (/root/z)"),
        (MemoryError(), 2, "out of memory; lower --batch-size"),
        (ValueError("line one\nline two"), 1, "line one line two"),
    ],
)
def test_unexpected_errors_are_one_line(exc, code, words, monkeypatch, capsys):
    monkeypatch.setattr(inspect_command, "run", _failing(exc))  # add_parser sets run=run when main() builds the parser
    monkeypatch.delenv(TRACEBACK_ENV, raising=False)
    assert main(["inspect", "x"]) == code
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("lorakit inspect: error: ") and words in err, err
    monkeypatch.setenv(TRACEBACK_ENV, "1")
    with pytest.raises(type(exc)):
        main(["inspect", "x"])


def test_help_still_prints_usage_and_exits_0(capsys):
    assert main(["train", "--help"]) == 0
    assert capsys.readouterr().out.startswith("usage: lorakit train")


def test_a_value_with_a_newline_stays_on_one_line(capsys):
    assert main(["train", "--r", "1\n2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--r" in err, err
