"""lm-evaluation-harness against a live `lorakit serve`: its `local-completions` model (the OpenAI
completions client lm-eval uses for served models) runs loglikelihood requests (echo + logprobs, what
multiple-choice tasks send) and generate_until requests. The scores must equal lm-eval's own `hf` model
with `peft=<the adapter folder>` (transformers + PEFT, independent of lorakit) and a plain forward.
lm_eval is in the dev extra; the test skips only where it is not installed.
"""

from __future__ import annotations

import threading

import pytest
import torch
from serve_assets import Reference, build_assets

from lorakit.models import load_model, load_tokenizer
from lorakit.serve import create_server

pytest.importorskip("lm_eval")
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402
from lm_eval.models.openai_completions import LocalCompletionsAPI  # noqa: E402

BASE = "tiny-llama"
PAIRS = [  # (context, continuation): a multiple-choice item's question and each answer
    ("SELECT name FROM", " users WHERE age"),
    ("SELECT name FROM", " the lazy dog"),
    ("Shall I compare thee", " to a summer's day?"),
    ("def add(a, b):", "\n    return a + b"),
]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    model_dir, adapters_dir = build_assets(tmp_path_factory.mktemp("lm_eval"))
    server = create_server(load_model(str(model_dir)), load_tokenizer(str(model_dir)), adapters_dir, name=BASE, port=0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server, model_dir, adapters_dir, Reference(model_dir, adapters_dir)
    server.close()


def local_completions(server, model_dir, model: str) -> LocalCompletionsAPI:
    return LocalCompletionsAPI(
        base_url=server.url + "/v1/completions",
        model=model,
        tokenizer=str(model_dir),
        tokenizer_backend="huggingface",
        max_length=64,
        max_retries=1,
        batch_size=2,  # two items per request: lists of token-id prompts
    )


def plain_loglikelihood(reference: Reference, adapter: str, context: str, continuation: str) -> float:
    """sum of log p(continuation tokens | everything before), from one forward with the adapter."""
    import lorakit

    tokenizer = reference.tokenizer
    ctx = tokenizer(context)["input_ids"]
    ids = ctx + tokenizer(continuation)["input_ids"]
    lorakit.set_adapter(reference.model, adapter)
    with torch.no_grad():
        logprobs = torch.log_softmax(reference.model(input_ids=torch.tensor([ids])).logits[0].double(), -1)
    return sum(float(logprobs[i - 1, ids[i]]) for i in range(len(ctx), len(ids)))


@pytest.mark.parametrize("adapter", ["sql", "dora_bot"])
def test_loglikelihood_equals_hf_peft(served, adapter):
    server, model_dir, adapters_dir, reference = served
    requests = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(PAIRS)]
    got = local_completions(server, model_dir, adapter).loglikelihood(requests, disable_tqdm=True)
    hf = HFLM(pretrained=str(model_dir), peft=str(adapters_dir / adapter), device="cpu", batch_size=1, max_length=64)
    want = hf.loglikelihood(requests, disable_tqdm=True)
    for (ll, greedy), (ll_hf, greedy_hf), pair in zip(got, want, PAIRS):
        assert ll == pytest.approx(ll_hf, abs=1e-5) and greedy == greedy_hf, pair
        assert ll == pytest.approx(plain_loglikelihood(reference, adapter, *pair), abs=1e-5), pair
    base = local_completions(server, model_dir, BASE).loglikelihood(requests[:1], disable_tqdm=True)
    assert base[0][0] != pytest.approx(got[0][0], abs=1e-3)  # the adapter really was applied


def test_generate_until_equals_reference(served):
    server, model_dir, _, reference = served
    contexts = [c for c, _ in PAIRS[::2]]
    requests = [
        Instance("generate_until", {}, (c, {"until": ["\n\n"], "max_gen_toks": 8}), i) for i, c in enumerate(contexts)
    ]
    got = local_completions(server, model_dir, "poet").generate_until(requests, disable_tqdm=True)
    assert got == [reference.text("poet", c, 8).split("\n\n")[0] for c in contexts]


def test_multiple_choice_task_file_scores_like_hf_peft(served, tmp_path):
    """A whole lm-eval run (simple_evaluate) of a local multiple-choice task file, served vs hf + peft."""
    import json

    import lm_eval
    from lm_eval.tasks import TaskManager

    server, model_dir, adapters_dir, _ = served
    docs = [
        {"question": "SELECT name", "choices": [" FROM users", " the lazy dog", " a summer's day"], "answer": 0},
        {"question": "Shall I compare thee", "choices": [" to a summer's day?", " FROM users", " + b"], "answer": 0},
        {"question": "def add(a, b):", "choices": ["\n    return a + b", " hello world", " the quick"], "answer": 0},
    ]
    (tmp_path / "mc.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (tmp_path / "lorakit_mc.yaml").write_text(
        "task: lorakit_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {tmp_path / 'mc.jsonl'}\ntest_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: "{{answer}}"\n'
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
    )
    tasks = TaskManager(include_path=str(tmp_path))
    runs = {}
    for name, model, args in [
        ("served", "local-completions", dict(base_url=server.url + "/v1/completions", model="sql")),
        ("hf", "hf", dict(pretrained=str(model_dir), peft=str(adapters_dir / "sql"), device="cpu")),
    ]:
        args.update(tokenizer=str(model_dir), max_length=64)
        if model == "local-completions":
            args["tokenizer_backend"] = "huggingface"
        runs[name] = lm_eval.simple_evaluate(
            model=model, model_args=args, tasks=["lorakit_mc"], task_manager=tasks, log_samples=True
        )
    served_run, hf_run = runs["served"], runs["hf"]
    assert served_run["results"]["lorakit_mc"]["acc,none"] == hf_run["results"]["lorakit_mc"]["acc,none"]
    for mine, theirs in zip(served_run["samples"]["lorakit_mc"], hf_run["samples"]["lorakit_mc"]):
        for (ll, greedy), (ll_hf, greedy_hf) in zip((r[0] for r in mine["resps"]), (r[0] for r in theirs["resps"])):
            assert ll == pytest.approx(ll_hf, abs=1e-4) and greedy == greedy_hf
