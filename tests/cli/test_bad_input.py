"""Generated bad input for the command line: flags, --config files, data files, model and adapter folders.

The contract (docs/reliability.md): every case ends with exit code 2 and exactly one line on stderr,
`lorakit COMMAND: error: <problem>; <fix>`, never a traceback, and `lorakit train` writes no adapter.
The cases are generated, not listed: every int / float / choice / switch flag of every subcommand gets
values argparse must refuse, every required flag is left out once, every TrainConfig field is given
out-of-range values (as a flag and as a YAML key) and wrong YAML types, and data / model / YAML files
are mutated (bytes, structure, nesting, aliases). Commands run in-process (lorakit.cli.main.main);
a few run as real subprocesses to check the exit status and stderr of the installed command.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path

import pytest

from lorakit.cli.main import build_parser, main
from lorakit.train.config import TrainConfig

ONE_LINE = re.compile(r"lorakit( [a-z-]+)?: error: \S.*")
BIG = str(2**64)


@dataclass
class Case:
    id: str
    argv: list[str]  # placeholders: {tmp} {llama} {bert} {text} {cls} {chat} {adapter} {out}
    setup: Callable[[Path, dict], None] | None = None  # writes the files the case needs under tmp
    expect: str = ""  # a piece of the error line (e.g. the flag's name)


def _fill(text: str, tmp: Path, paths: dict) -> str:
    """The placeholders {llama}, {tmp}, {out} ... replaced (plain replace: YAML braces stay as they are)."""
    for key, value in {**paths, "tmp": str(tmp), "out": str(tmp / "out")}.items():
        text = text.replace("{" + key + "}", value)
    return text


def _write(name: str, content: str | bytes) -> Callable[[Path, dict], None]:
    def setup(tmp: Path, paths: dict) -> None:
        data = _fill(content, tmp, paths).encode() if isinstance(content, str) else content
        (tmp / name).write_bytes(data)

    return setup


# ----- 1. flags argparse must refuse, for every subcommand ------------------------------------------
BAD_INTS = ["x", "", "1.5", "0x10", "nan", BIG, "1e3"]
BAD_FLOATS = ["x", "", "nan", "inf", "-inf", "1e400", "1,5"]


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def _required_argv(parser: argparse.ArgumentParser, skip: str = "") -> list[str]:
    """Values for the required flags (and positionals) so that only the mutated flag is wrong."""
    argv = []
    for action in parser._actions:
        if action.dest == skip or action.dest in ("help", "parser"):
            continue
        if action.required and action.option_strings:
            argv.append(f"{action.option_strings[-1]}={action.choices[0] if action.choices else 'x'}")
        elif not action.option_strings and action.nargs != "?":
            argv.append(next(iter(action.choices)) if action.choices else "x")
    return argv


def flag_cases() -> list[Case]:
    cases = []
    for command, parser in _subparsers().items():
        for action in parser._actions:
            if not action.option_strings or action.dest == "help":
                continue
            flag = action.option_strings[-1]
            base = [command, *_required_argv(parser, skip=action.dest)]
            if action.type is int:
                values = BAD_INTS
            elif action.type is float:
                values = BAD_FLOATS
            elif action.choices:
                values = ["zzz", "", str(list(action.choices)[0]).upper() + "!"]
            elif action.nargs == 0:
                values = ["yes"]  # a switch takes no value
            else:
                values = []
            cases += [Case(f"{command} {flag}={v!r}", [*base, f"{flag}={v}"], expect=flag) for v in values]
            if action.required:
                cases.append(Case(f"{command} without {flag}", base, expect=flag))
        cases.append(Case(f"{command} --zzz", [command, *_required_argv(parser), "--zzz"], expect="--zzz"))
    cases += [Case("no command", [], expect="COMMAND"), Case("unknown command", ["zzz"], expect="zzz")]
    return cases


# ----- 2. TrainConfig values out of range, as flags and as YAML keys ----------------------------------
# The allowed range of each setting, written from the documentation of the flags (not from the checks):
RANGES = [
    (("r", "max_steps", "batch_size", "grad_accum", "keep_checkpoints", "log_every", "eval_batch_size"), ["0", "-1"]),
    (("r", "max_steps", "batch_size", "grad_accum", "keep_checkpoints", "log_every", "eval_batch_size"), [str(2**40)]),
    (("batch_size", "grad_accum", "eval_batch_size"), [str(2**17)]),  # one step's examples are held in memory
    (("max_length",), ["1", "0", "-1", str(2**40)]),
    (("prefix_tokens",), ["0", "-1", str(2**40)]),
    (("warmup_steps", "eval_every", "save_every"), ["-1", str(2**40)]),
    (("seed",), ["-1", str(2**32), BIG[:-1]]),
    (("alpha", "epochs"), ["0", "-1", "-0.5"]),
    (("lr", "head_lr"), ["0", "1", "2", "-1e-4"]),
    (("dropout",), ["1", "1.5", "-0.1"]),
    (("eval_fraction",), ["0", "1", "-0.5", "3"]),
    (("checkpoint_layers",), ["0", "1.5", "-1"]),
    (("weight_decay", "max_grad_norm"), ["-1", "-0.001"]),
    (("targets", "exclude", "modules_to_save", "labels"), [",", " , ", ",,,"]),
    (("labels",), ["a,a"]),
    (("targets",), ["((", "[", "a|("]),
]
OUT_OF_RANGE: dict[str, list[str]] = {}
for _names, _values in RANGES:
    for _name in _names:
        OUT_OF_RANGE.setdefault(_name, []).extend(_values)
TRAIN = ["train", "--model", "{llama}", "--data", "{text}", "--out", "{out}", "--no-progress", "--no-plot"]
BASE_YAML = "model: {llama}\ndata: {text}\nout: {out}\nmax_steps: 1\nprogress: false\nplot: false\n"


def _yaml_with(key: str, value: str) -> str:
    lines = [line for line in BASE_YAML.splitlines() if not line.startswith(f"{key}:")]
    return "\n".join([*lines, f"{key}: {value}"]) + "\n"


def range_cases() -> list[Case]:
    cases = []
    for name, values in OUT_OF_RANGE.items():
        flag = "--" + name.replace("_", "-")
        for value in values:
            expect = "target" if name == "targets" else name  # a bad regex is reported as LoraConfig.target_modules
            cases.append(Case(f"train {flag}={value}", [*TRAIN, f"{flag}={value}"], expect=expect))
            quoted = json.dumps(value) if not re.fullmatch(r"-?[0-9.e]+", value) else value
            cases.append(
                Case(
                    f"yaml {name}: {quoted}",
                    ["train", "--config", "{tmp}/run.yaml"],
                    _write("run.yaml", _yaml_with(name, quoted)),
                    expect=expect,
                )
            )
    return cases


# ----- 3. wrong YAML types for every field --------------------------------------------------------------
WRONG_TYPES = {
    "bool": ["yes", "on", "1", '"true"', "[true]", "{a: 1}", "null"],
    "int": ["1.5", '"8"', "true", "[8]", "{a: 8}", ".nan", "8x"],
    "float": ['"x"', "true", "[1]", "{a: 1}", ".nan", ".inf", "-.inf", "1e400"],
    "str": ["5", "[a]", "{a: 1}", "true", "2020-01-01"],
    "list": ["5", "{a: 1}", "[[a]]", "[]", '""', "[a, [b]]", "[true]"],
}


def _kind(annotation: str) -> str:
    for kind in ("bool", "list", "float", "int", "str"):
        if annotation.startswith(kind) or (kind == "list" and "list" in annotation):
            return kind
    raise AssertionError(annotation)


def type_cases() -> list[Case]:
    cases = []
    for field in fields(TrainConfig):
        kind = _kind(str(field.type))
        values = WRONG_TYPES[kind]
        if field.name in ("eval_data",) or kind == "float":
            values = [v for v in values if v != "null"]  # null = not given, valid for optional settings
        if field.name == "labels":
            values = [v for v in values if v != "5"]  # a label may be an integer
        for value in values:
            if value == "null" and field.default is None:
                continue
            cases.append(
                Case(
                    f"yaml {field.name}: {value}",
                    ["train", "--config", "{tmp}/run.yaml"],
                    _write("run.yaml", _yaml_with(field.name, value)),
                )
            )
    return cases


# ----- 4. broken --config files ---------------------------------------------------------------------------
def _alias_bomb(levels: int = 9) -> str:
    lines = ['l0: &l0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    lines += [f"l{i}: &l{i} [" + ",".join([f"*l{i - 1}"] * 9) + "]" for i in range(1, levels)]
    return "\n".join(lines) + f"\nr: *l{levels - 1}\n"


YAML_FILES = {
    "alias bomb as r": _alias_bomb(),
    "alias": "model: &m {llama}\ndata: *m\n",
    "merge key": "base: &b {r: 4}\n<<: *b\n",
    "duplicate key": BASE_YAML + "max_steps: 2\n",
    "duplicate key, other spelling": BASE_YAML + "max-steps: 2\n",
    "deep flow nesting": "r: " + "[" * 5000 + "]" * 5000 + "\n",
    "deep block nesting": "".join(" " * i + f"k{i}:\n" for i in range(200)),
    "non-UTF-8": b"r: \xff\xfe\n",
    "UTF-16": "r: 4\n".encode("utf-16"),
    "latin-1": "model: caf\xe9\n".encode("latin-1"),
    "a list": "- r: 4\n",
    "a scalar": "just text\n",
    "unknown key": BASE_YAML + "rank: 4\n",
    "integer key": BASE_YAML + "1: 2\n",
    "list key": BASE_YAML + "? [a, b]\n: 1\n",
    "python tag": "model: !!python/object/apply:os.system [ls]\n",
    "binary tag": BASE_YAML.replace("model: {llama}", "model: !!binary aGVsbG8="),
    "two documents": BASE_YAML + "---\nr: 4\n",
    "tabs": "model:\t{llama}\n\tr: 4\n",
    "unclosed": "r: [4\n",
    "bad indentation": "model: {llama}\n  r: 4\n",
    "over 1 MB": "# " + "x" * (1024 * 1024) + "\n" + BASE_YAML,
    "empty (no model)": "",
    "only a comment": "# nothing\n",
    "null byte": "r: 4\x00\n",
    "timestamp model": "model: 2020-01-01\n",
}


def yaml_cases() -> list[Case]:
    cases = [
        Case(f"yaml: {k}", ["train", "--config", "{tmp}/run.yaml"], _write("run.yaml", v))
        for k, v in YAML_FILES.items()
    ]
    cases += [
        Case("yaml: missing", ["train", "--config", "{tmp}/nope.yaml"]),
        Case("yaml: a folder", ["train", "--config", "{tmp}"]),
    ]
    return cases


# ----- 5. broken data files --------------------------------------------------------------------------------
def _rows(rows: list) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


GOOD = {"text": "the cat sat on the mat"}
CLS = [{"text": "a good film", "label": "pos"}, {"text": "a bad film", "label": "neg"}]
DATA_FILES = {
    "empty.jsonl": "",
    "blank.jsonl": "\n\n  \n",
    "nonutf8.jsonl": b'{"text": "caf\xe9"}\n',
    "nonutf8-late.jsonl": (_rows([GOOD] * 50) + '{"text": "\xff"}\n').encode("latin-1"),
    "cut-utf8.jsonl": _rows([GOOD]).encode() + b'{"text": "\xe2\x82',
    "utf16.jsonl": _rows([GOOD]).encode("utf-16"),
    "nonutf8.csv": b"text\ncaf\xe9\n",
    "nonutf8.txt": b"caf\xe9 au lait\n",
    "garbage.jsonl": "{not json\n",
    "array.json": "[]",
    "object.json": "{}",
    "deep.json": "[" * 100000 + "]" * 100000,
    "deep-row.jsonl": '{"text": ' + "[" * 5000 + "]" * 5000 + "}\n",
    "scalars.jsonl": "1\n2\n",
    "wrong-columns.jsonl": _rows([{"question": "a", "answer": "b"}]),
    "text-int.jsonl": _rows([{"text": 5}]),
    "text-list.jsonl": _rows([{"text": ["a", "b"]}]),
    "text-dict.jsonl": _rows([{"text": {"a": "b"}}]),
    "text-null.jsonl": _rows([{"text": None}]),
    "prompt-int.jsonl": _rows([{"prompt": 1, "completion": "x"}]),
    "messages-str.jsonl": _rows([{"messages": "hello"}]),
    "messages-no-role.jsonl": _rows([{"messages": [{"content": "hi"}]}]),
    "messages-no-assistant.jsonl": _rows([{"messages": [{"role": "user", "content": "hi"}]}]),
    "messages-empty.jsonl": _rows([{"messages": []}]),
    "header-only.csv": "text\n",
    "empty.csv": "",
    "data.parquet": "PAR1",
    "data": "text\n",
}
CLS_FILES = {
    "label-list.jsonl": _rows([{"text": "a", "label": [1, 2]}, {"text": "b", "label": [3]}]),
    "label-dict.jsonl": _rows([{"text": "a", "label": {"a": 1}}, {"text": "b", "label": {"b": 2}}]),
    "label-float.jsonl": _rows([{"text": "a", "label": 0.5}, {"text": "b", "label": 1.5}]),
    "label-bool.jsonl": _rows([{"text": "a", "label": True}, {"text": "b", "label": False}]),
    "label-null.jsonl": _rows([{"text": "a", "label": None}, {"text": "b", "label": "x"}]),
    "label-mixed.jsonl": _rows([{"text": "a", "label": 1}, {"text": "b", "label": "x"}]),
    "label-one.jsonl": _rows([{"text": "a", "label": "x"}] * 2),
    "no-label.jsonl": _rows([{"text": "a"}]),
}


def data_cases() -> list[Case]:
    cases = [
        Case(f"data: {name}", [*TRAIN[:3], "--data", f"{{tmp}}/{name}", *TRAIN[5:]], _write(name, content))
        for name, content in DATA_FILES.items()
    ]
    for name, content in CLS_FILES.items():
        argv = ["train", "--model", "{bert}", "--task", "seq-cls", "--data", f"{{tmp}}/{name}", *TRAIN[5:]]
        cases.append(Case(f"data (seq-cls): {name}", argv, _write(name, content)))
    cases += [
        Case("data: missing", [*TRAIN[:3], "--data", "{tmp}/nope.jsonl", *TRAIN[5:]]),
        Case("data: a folder", [*TRAIN[:3], "--data", "{tmp}", *TRAIN[5:]]),
        Case(
            "eval data: non-UTF-8",
            [*TRAIN, "--eval-data", "{tmp}/e.jsonl"],
            _write("e.jsonl", b'{"text": "\xff"}\n'),
        ),
        Case(
            "eval data: other columns",
            [*TRAIN, "--eval-data", "{tmp}/e.jsonl"],
            _write("e.jsonl", _rows([{"question": "a"}])),
        ),
        Case(
            "labels: not in data",
            ["train", "--model", "{bert}", "--task", "seq-cls", "--data", "{cls}", "--labels", "x,y", *TRAIN[5:]],
        ),
    ]
    return cases


# ----- 6. broken model folders -----------------------------------------------------------------------------
def _model_copy(change: Callable[[Path], None]) -> Callable[[Path, dict], None]:
    def setup(tmp: Path, paths: dict) -> None:
        shutil.copytree(paths["llama"], tmp / "model")
        change(tmp / "model")

    return setup


def _edit_config(**changes) -> Callable[[Path], None]:
    def change(folder: Path) -> None:
        config = json.loads((folder / "config.json").read_text())
        config.update(changes)
        (folder / "config.json").write_text(json.dumps(config))

    return change


def _bytes(name: str, data: bytes | Callable[[bytes], bytes]) -> Callable[[Path], None]:
    def change(folder: Path) -> None:
        path = folder / name
        path.write_bytes(data(path.read_bytes()) if callable(data) else data)

    return change


MODEL_CHANGES = {
    "no config.json": lambda f: (f / "config.json").unlink(),
    "no weights": lambda f: (f / "model.safetensors").unlink(),
    "weights only a pickle": lambda f: (f / "model.safetensors").rename(f / "pytorch_model.bin"),
    "config not JSON": _bytes("config.json", b"{"),
    "config not UTF-8": _bytes("config.json", b'{"model_type": "caf\xe9"}'),
    "config a list": _bytes("config.json", b"[]"),
    "unknown model_type": _edit_config(model_type="zzz"),
    "no model_type": lambda f: _bytes(
        "config.json", lambda b: json.dumps({k: v for k, v in json.loads(b).items() if k != "model_type"}).encode()
    )(f),
    "hidden_size a string": _edit_config(hidden_size="big"),
    "negative layers": _edit_config(num_hidden_layers=-1),
    "heads do not divide": _edit_config(num_attention_heads=5),
    "weights truncated": _bytes("model.safetensors", lambda b: b[:1000]),
    "weights random": _bytes("model.safetensors", os.urandom(4096)),
    "weights empty": _bytes("model.safetensors", b""),
    "weights huge header": _bytes("model.safetensors", (1 << 60).to_bytes(8, "little") + b"{}"),
    "weights of another size": _edit_config(hidden_size=64, intermediate_size=128),
    "tokenizer broken": _bytes("tokenizer.json", b"{"),
}


DIFFUSERS_CONFIGS = {
    "no weights": {"_class_name": "UNet2DConditionModel"},
    "a pickle only": {"_class_name": "UNet2DConditionModel"},
    "unknown class": {"_class_name": "NoSuchModel"},
    "a dunder class": {"_class_name": "__class__"},
    "class a list": {"_class_name": ["UNet2DConditionModel"]},
}


def _diffusers_folder(name: str) -> Callable[[Path, dict], None]:
    def setup(tmp: Path, paths: dict) -> None:
        (tmp / "unet").mkdir()
        (tmp / "unet/config.json").write_text(json.dumps(DIFFUSERS_CONFIGS[name]))
        if name == "a pickle only":  # never unpickled: only safetensors are read
            (tmp / "unet/diffusion_pytorch_model.bin").write_bytes(b"\x80\x04cos\nsystem\n.")

    return setup


def model_cases() -> list[Case]:
    model_argv = ["train", "--model", "{tmp}/model", *TRAIN[3:]]
    cases = [Case(f"model: {k}", model_argv, _model_copy(v)) for k, v in MODEL_CHANGES.items()]
    cases += [
        Case("model: missing folder", ["train", "--model", "{tmp}/nope", *TRAIN[3:]]),
        Case("model: a file", ["train", "--model", "{tmp}/f.bin", *TRAIN[3:]], _write("f.bin", "x")),
        Case("model: a broken .gguf", ["train", "--model", "{tmp}/m.gguf", *TRAIN[3:]], _write("m.gguf", "GGUFxxxx")),
        Case("model: an empty folder", ["train", "--model", "{tmp}", *TRAIN[3:]]),
    ]
    for name in DIFFUSERS_CONFIGS:
        export = ["export", "--adapter", "{adapter}", "--format", "peft", "--out", "{out}"]
        cases.append(Case(f"export: diffusers {name}", [*export, "--model", "{tmp}/unet"], _diffusers_folder(name)))
        verify = ["verify", "--adapter", "{adapter}", "--model", "{tmp}/unet"]
        cases.append(Case(f"verify: diffusers {name}", verify, _diffusers_folder(name)))
    return cases


# ----- 7. the other commands on bad folders -------------------------------------------------------------------
def _seq_cls_copy(tmp: Path, paths: dict) -> None:
    """A causal-LM adapter relabelled task_type SEQ_CLS (no head in the file): PEFT's sequence-classification kind."""
    shutil.copytree(paths["adapter"], tmp / "sc")
    (tmp / "sc/run.json").unlink()
    config = json.loads((tmp / "sc/adapter_config.json").read_text())
    (tmp / "sc/adapter_config.json").write_text(json.dumps({**config, "task_type": "SEQ_CLS"}))


RUN_JSON = {
    "not UTF-8": b'{"task": "caf\xe9"}',
    "a list": b"[]",
    "empty": b"",
    "deep": b"[" * 100000 + b"]" * 100000,
    "task zzz": b'{"task": "zzz"}',
    "task a list": b'{"task": ["a"]}',
    "labels a string": b'{"task": "seq-cls", "labels": "abc"}',
    "labels a dict": b'{"task": "seq-cls", "labels": {"a": 1}}',
    "one label": b'{"task": "seq-cls", "labels": ["a"]}',
    "nested labels": b'{"task": "seq-cls", "labels": [[1], [2]]}',
    "model a number": b'{"task": "causal-lm", "model": 5}',
}


def _adapter_with_run_json(data: bytes) -> Callable[[Path, dict], None]:
    def setup(tmp: Path, paths: dict) -> None:
        shutil.copytree(paths["adapter"], tmp / "a")
        (tmp / "a/run.json").write_bytes(data)

    return setup


def command_cases() -> list[Case]:
    merge = ["merge", "--model", "{llama}", "--out", "{out}", "--adapter"]
    return [
        Case("merge: SEQ_CLS adapter, causal base", [*merge, "{tmp}/sc"], _seq_cls_copy, expect="classifier head"),
        Case(
            "eval: SEQ_CLS adapter, causal base",
            ["eval", "--model", "{llama}", "--data", "{cls}", "--adapter", "{tmp}/sc"],
            _seq_cls_copy,
        ),
        Case("merge: not an adapter", [*merge, "{tmp}"]),
        Case("merge: missing adapter", [*merge, "{tmp}/nope"]),
        Case("merge: adapter for gpt2", ["merge", "--model", "{gpt2}", "--out", "{out}", "--adapter", "{adapter}"]),
        Case("eval: empty data", ["eval", "--model", "{llama}", "--data", "{tmp}/e.jsonl"], _write("e.jsonl", "")),
        Case("eval: --batch-size 0", ["eval", "--model", "{llama}", "--data", "{text}", "--batch-size", "0"]),
        Case("generate: --top-p 2", ["generate", "--model", "{llama}", "--prompt", "hi", "--top-p", "2"]),
        Case(
            "generate: adapter weight", ["generate", "--model", "{llama}", "--prompt", "hi", "--adapter", "{adapter}:x"]
        ),
        Case(
            "generate: adapter weight nan",
            ["generate", "--model", "{llama}", "--prompt", "hi", "--adapter", "{adapter}:nan"],
        ),
        Case("inspect: a data file", ["inspect", "{text}"]),
        Case("inspect: missing", ["inspect", "{tmp}/nope"]),
        Case(
            "export: not an adapter",
            ["export", "--model", "{llama}", "--adapter", "{tmp}", "--format", "peft", "--out", "{out}"],
        ),
        Case("verify: not an adapter", ["verify", "--model", "{llama}", "--adapter", "{tmp}"]),
        Case("train: --out is a file", ["train", "--model", "{llama}", "--data", "{text}", "--out", "{text}"]),
        Case("train: --resume with other settings", [*TRAIN[:6], "{adapter}/..", "--resume", "--r", "4"]),
    ] + [
        Case(f"{argv[0]}: run.json {name}", [*argv, "{tmp}/a"], _adapter_with_run_json(data), expect="run.json")
        for name, data in RUN_JSON.items()
        for argv in (merge, ["eval", "--model", "{llama}", "--data", "{text}", "--adapter"])
    ]


ALL = flag_cases() + range_cases() + type_cases() + yaml_cases() + data_cases() + model_cases() + command_cases()


@pytest.fixture(scope="module")
def paths(tiny_models, data_files, tmp_path_factory) -> dict[str, str]:
    """The tiny models and data files, plus an adapter trained for one step on the tiny Llama."""
    run = tmp_path_factory.mktemp("run")
    assert (
        main(
            [
                "train",
                "--model",
                str(tiny_models["llama"]),
                "--data",
                str(data_files["text"]),
                "--out",
                str(run),
                "--max-steps",
                "1",
                "--no-progress",
                "--no-plot",
            ]
        )
        == 0
    )
    return {
        **{k: str(v) for k, v in tiny_models.items()},
        **{k: str(v) for k, v in data_files.items()},
        "adapter": str(run / "adapter"),
    }


def _argv(case: Case, tmp: Path, paths: dict) -> list[str]:
    return [_fill(a, tmp, paths) for a in case.argv]


@pytest.mark.parametrize("case", ALL, ids=[c.id for c in ALL])
def test_bad_input_ends_in_one_line_and_exit_2(case, paths, tmp_path, capsys):
    if case.setup is not None:
        case.setup(tmp_path, paths)
    code = main(_argv(case, tmp_path, paths))
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2, f"exit {code}: {err[-2000:]}"
    assert len(lines) == 1 and ONE_LINE.fullmatch(lines[0]), err[-2000:]
    assert case.expect in lines[0], lines[0]
    assert not (tmp_path / "out/adapter").exists()


def test_the_suite_is_large_and_covers_every_subcommand():
    assert len(ALL) >= 400, len(ALL)
    assert len({tuple(c.argv) + (c.id,) for c in ALL}) == len(ALL)  # no case twice
    covered = {c.argv[0] for c in ALL if c.argv}
    assert set(_subparsers()) <= covered


SUBPROCESS_CASES = [
    "train --r='x'",
    "yaml: alias bomb as r",
    "model: weights truncated",
    "merge: SEQ_CLS adapter, causal base",
]


@pytest.mark.parametrize("case_id", SUBPROCESS_CASES)
def test_the_installed_command_prints_one_line_and_exits_2(case_id, paths, tmp_path):
    """The real `python -m lorakit` process: exit status 2, stderr exactly one line, stdout empty."""
    case = next(c for c in ALL if c.id == case_id)
    if case.setup is not None:
        case.setup(tmp_path, paths)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "lorakit", *_argv(case, tmp_path, paths)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 2, done.stderr
    assert done.stdout == "" and done.stderr.count("\n") == 1 and ONE_LINE.fullmatch(done.stderr.strip()), done.stderr
