"""Training data: local JSONL / JSON / CSV / TXT files turned into token ids (JSONL read line by line
with the standard library, the other formats with `datasets`).

Causal LM, one of three row shapes (picked from the columns):
    text                  loss on every token (an end-of-sequence token is appended)
    prompt + completion   loss on the completion's tokens only
    messages              chat turns rendered with the model's chat template; loss on the
                          assistant turns only
Sequence classification: text + label (labels may be strings or integers; the label set comes
from the training file, or from --labels).
A TXT file is one example per paragraph (blank-line separated), as `text`.

Each Example keeps `labels` aligned with `input_ids` (-100 = no loss); the loss shifts them.
"""

from __future__ import annotations

import codecs
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import LorakitError

IGNORE = -100
_BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".txt": "text", ".tsv": "csv"}
_LAYOUT = {
    "json": "give one JSON object per line (.jsonl) or a list of objects (.json)",
    "csv": "give a header row, then one example per line",
    "text": "give plain text, one example per paragraph",
}
NEEDS = {
    "causal-lm": "a `text` column, or `prompt` + `completion`, or chat `messages`",
    "seq-cls": "`text` + `label` columns",
}


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int] | None = None  # causal LM: per token, aligned with input_ids
    label: int | None = None  # sequence classification: the class index

    @property
    def n_targets(self) -> int:
        """How many predictions this example is scored on (tokens after the shift, or 1 class)."""
        if self.labels is None:
            return 1
        return sum(1 for t in self.labels[1:] if t != IGNORE)


def load_rows(path: str, flag: str = "--data") -> list[dict[str, Any]]:
    """The rows of a local data file, as dicts: JSONL one object per line, the other formats via `datasets`."""
    file = Path(path)
    if not file.is_file():
        raise LorakitError(f"{flag} {path} does not exist; give a .jsonl, .json, .csv or .txt file")
    builder = _BUILDERS.get(file.suffix.lower())
    if builder is None:
        raise LorakitError(f"{flag} {path}: unsupported file type '{file.suffix}'; use .jsonl, .json, .csv or .txt")
    check_text(file, f"{flag} {path}")
    rows = _jsonl_rows(file, flag) if file.suffix.lower() == ".jsonl" else _dataset_rows(file, builder, flag)
    if not rows:
        raise LorakitError(f"{flag} {path} holds no rows; add some examples")
    return rows


def _jsonl_rows(file: Path, flag: str) -> list[dict[str, Any]]:
    """One JSON object per non-blank line. Read directly: importing `datasets` (pandas, pyarrow) and
    building an Arrow table cost ~1.3 CPU s of a run's start-up for rows used as plain dicts."""
    try:
        lines = file.read_text(encoding="utf-8").split("\n")  # not splitlines: U+2028 may sit inside a string
    except UnicodeDecodeError as err:
        raise LorakitError(f"{flag} {file} could not be read as JSON: not UTF-8 text ({err.reason})") from None
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise LorakitError(
                f"{flag} {file} could not be read as JSON: line {number}: {err.msg}; {_LAYOUT['json']}"
            ) from None
        except RecursionError:
            raise LorakitError(f"{flag} {file} line {number} nests too deeply; {_LAYOUT['json']}") from None
        if not isinstance(row, dict):
            raise LorakitError(
                f"{flag} {file} could not be read as JSON: line {number} is a {type(row).__name__}, not an object; "
                "write one {...} per line"
            )
        rows.append(row)
    return rows


def _dataset_rows(file: Path, builder: str, flag: str) -> list[dict[str, Any]]:
    import datasets

    options: dict[str, Any] = {"sample_by": "paragraph"} if builder == "text" else {}
    if file.suffix.lower() == ".tsv":
        options["delimiter"] = "\t"
    was_enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        loaded = datasets.load_dataset(builder, data_files=str(file), split="train", keep_in_memory=True, **options)
    except Exception as err:  # a user file failed to parse: report the root cause in one line
        cause = err
        while cause.__cause__ is not None or cause.__context__ is not None:
            cause = cause.__cause__ or cause.__context__
        message = (str(cause).strip().splitlines() or [type(cause).__name__])[0]
        if "corresponds to no data" in message:  # datasets' words for a file without rows
            raise LorakitError(f"{flag} {file} holds no rows; add some examples") from None
        raise LorakitError(
            f"{flag} {file} could not be read as {builder.upper()} ({message}); {_LAYOUT[builder]}"
        ) from None
    finally:
        if was_enabled:
            datasets.enable_progress_bars()
    return loaded.to_list()


def check_text(file: Path, what: str) -> None:
    """A data file is UTF-8 text with something in it (read in chunks: data files may be large)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset, blank = 0, True
    with file.open("rb") as f:
        while chunk := f.read(1 << 20):
            try:
                text = decoder.decode(chunk)
            except UnicodeDecodeError as err:
                raise LorakitError(
                    f"{what} is not UTF-8 text (byte {offset + err.start:,}); save it as UTF-8"
                ) from None
            blank = blank and not text.strip()
            offset += len(chunk)
    try:
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        raise LorakitError(f"{what} is not UTF-8 text (it ends inside a character); save it as UTF-8") from None
    if blank:
        raise LorakitError(f"{what} holds no rows; add some examples")


def row_kind(rows: list[dict[str, Any]], task: str, path: str) -> str:
    columns = set(rows[0])
    if task == "seq-cls":
        if {"text", "label"} <= columns:
            return "classification"
    elif "messages" in columns:
        return "messages"
    elif {"prompt", "completion"} <= columns:
        return "prompt-completion"
    elif "text" in columns:
        return "text"
    have = ", ".join(sorted(columns)) or "none"
    raise LorakitError(f"{path} has columns [{have}] but {task} needs {NEEDS[task]}; rename the columns")


def label_set(rows: list[dict[str, Any]], path: str) -> list:
    for i, row in enumerate(rows):
        label = row.get("label")
        if label is None:
            raise LorakitError(f"{path} row {i + 1} has no label; give every row a `label`")
        if isinstance(label, bool) or not isinstance(label, (str, int)):
            raise LorakitError(
                f"{path} row {i + 1}: label {label!r} is a {type(label).__name__}; labels are strings or integers"
            )
    values = {row["label"] for row in rows}
    kinds = {type(v) for v in values}
    if not (kinds <= {str} or kinds <= {int}):
        raise LorakitError(
            f"{path}: labels mix types ({', '.join(sorted(k.__name__ for k in kinds))}); use all strings or all "
            "integers"
        )
    return sorted(values)


def _text(row: dict[str, Any], key: str, index: int, path: str) -> str:
    value = row.get(key)
    if not isinstance(value, str):
        raise LorakitError(f"{path} row {index + 1}: `{key}` should be text, got {type(value).__name__}; fix that row")
    return value


def _ids(tokenizer, text: str, special: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def _chat_example(tokenizer, messages: Any, index: int, path: str) -> tuple[list[int], list[int]]:
    """Token ids of the rendered chat, with loss only on the assistant turns' tokens."""
    if not getattr(tokenizer, "chat_template", None):
        raise LorakitError(
            f"{path} has chat `messages` but the model's tokenizer has no chat template; use `text` or `prompt` + "
            "`completion` rows"
        )
    if not (
        isinstance(messages, list)
        and messages
        and all(isinstance(m, dict) and {"role", "content"} <= set(m) for m in messages)
    ):
        raise LorakitError(
            f'{path} row {index + 1}: `messages` should be a list of {{"role", "content"}} objects; fix that row'
        )

    def render(turns, generation_prompt=False) -> list[int]:
        text = tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=generation_prompt)
        return _ids(tokenizer, text, special=False)

    ids = render(messages)
    labels = [IGNORE] * len(ids)
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start, end = len(render(messages[:i], generation_prompt=True)), len(render(messages[: i + 1]))
        labels[start:end] = ids[start:end]
    if all(t == IGNORE for t in labels):
        raise LorakitError(f"{path} row {index + 1}: the chat has no assistant turn to learn from; add one")
    return ids, labels


def encode(
    rows: list[dict[str, Any]], tokenizer, task: str, max_length: int, labels: list | None, path: str
) -> tuple[list[Example], int]:
    """Examples for every row (truncated to max_length) and how many were dropped for having no target left."""
    kind = row_kind(rows, task, path)
    eos = tokenizer.eos_token_id
    examples, dropped = [], 0
    for i, row in enumerate(rows):
        if kind == "classification":
            if row.get("label") not in labels:
                raise LorakitError(
                    f"{path} row {i + 1}: label {row.get('label')!r} is not one of the labels {labels}; fix the row "
                    "or list it in --labels"
                )
            ids = _ids(tokenizer, _text(row, "text", i, path), special=True)[:max_length]
            examples.append(Example(ids, label=labels.index(row["label"])))
            continue
        if kind == "text":
            ids = _ids(tokenizer, _text(row, "text", i, path), special=True) + ([eos] if eos is not None else [])
            target = list(ids)
        elif kind == "prompt-completion":
            prompt = _ids(tokenizer, _text(row, "prompt", i, path), special=True)
            completion = _ids(tokenizer, _text(row, "completion", i, path), special=False) + (
                [eos] if eos is not None else []
            )
            ids, target = prompt + completion, [IGNORE] * len(prompt) + completion
        else:
            ids, target = _chat_example(tokenizer, row["messages"], i, path)
        example = Example(ids[:max_length], labels=target[:max_length])
        if example.n_targets == 0:
            dropped += 1
        else:
            examples.append(example)
    if not examples:
        raise LorakitError(
            f"{path}: no example has a target token within --max-length {max_length}; raise --max-length"
        )
    return examples, dropped


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded tensors: input_ids, attention_mask, and labels (per token, or one class per row)."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, e in enumerate(examples):
        ids[row, : len(e.input_ids)] = torch.tensor(e.input_ids)
        mask[row, : len(e.input_ids)] = 1
    batch = {"input_ids": ids, "attention_mask": mask}
    if examples[0].labels is not None:
        labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
        for row, e in enumerate(examples):
            labels[row, : len(e.labels)] = torch.tensor(e.labels)
        batch["labels"] = labels
    else:
        batch["labels"] = torch.tensor([e.label for e in examples], dtype=torch.long)
    return batch


@dataclass
class Prepared:
    train: list[Example]
    eval: list[Example] | None
    labels: list | None
    kind: str
    dropped: int


def prepare(cfg, tokenizer) -> Prepared:
    """Read, check and tokenize the training (and held-out) data a TrainConfig names."""
    rows = load_rows(cfg.data, "--data")
    kind = row_kind(rows, cfg.task, cfg.data)
    label_rows = rows  # the label set comes from the whole --data file, even when part of it is held out
    eval_rows = load_rows(cfg.eval_data, "--eval-data") if cfg.eval_data else None
    if eval_rows is not None and row_kind(eval_rows, cfg.task, cfg.eval_data) != kind:
        raise LorakitError(
            f"--eval-data {cfg.eval_data} has differently shaped rows than --data {cfg.data}; use the same columns in "
            "both"
        )
    if cfg.eval_fraction:
        order = list(range(len(rows)))
        random.Random(cfg.seed).shuffle(order)
        cut = len(rows) - max(1, round(len(rows) * cfg.eval_fraction))
        if cut < 1:
            raise LorakitError(
                f"--eval-fraction {cfg.eval_fraction} leaves no training rows out of {len(rows)}; lower it"
            )
        rows, eval_rows = [rows[i] for i in order[:cut]], [rows[i] for i in order[cut:]]
    labels = None
    if cfg.task == "seq-cls":
        labels = list(cfg.labels) if cfg.labels else label_set(label_rows, cfg.data)
        if cfg.labels and all(isinstance(r.get("label"), int) for r in label_rows):
            try:
                labels = [int(v) for v in labels]
            except ValueError:
                raise LorakitError(
                    f"--labels {','.join(map(str, labels))}: --data {cfg.data} has integer labels; list integers"
                ) from None
        if len(labels) < 2:
            raise LorakitError(
                f"--data {cfg.data} has only the label {labels}; classification needs at least two labels"
            )
    train, dropped = encode(rows, tokenizer, cfg.task, cfg.max_length, labels, cfg.data)
    held = None
    if eval_rows is not None:
        held, _ = encode(eval_rows, tokenizer, cfg.task, cfg.max_length, labels, cfg.eval_data or cfg.data)
    return Prepared(train, held, labels, kind, dropped)
