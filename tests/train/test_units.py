"""Pieces of the trainer checked against independent references: transformers' schedules and loss,
the chat template's own text, YAML merging, and the step plan's coverage of the data."""

import math

import pytest
import torch

from lorakit import LorakitError
from lorakit.train import TrainConfig
from lorakit.train.batches import StepPlan
from lorakit.train.build import lr_factor
from lorakit.train.data import IGNORE, Example, collate, encode
from lorakit.train.objective import loss_sum


@pytest.mark.parametrize("schedule,warmup", [("cosine", 0), ("cosine", 3), ("linear", 2), ("constant", 4)])
def test_schedule_matches_transformers(schedule, warmup):
    import transformers

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    make = {
        "cosine": transformers.get_cosine_schedule_with_warmup,
        "linear": transformers.get_linear_schedule_with_warmup,
    }
    if schedule == "constant":
        reference = transformers.get_constant_schedule_with_warmup(optimizer, warmup)
    else:
        reference = make[schedule](optimizer, warmup, 12)
    for step in range(12):
        assert lr_factor(step, warmup, 12, schedule) == pytest.approx(reference.get_last_lr()[0], abs=1e-12)
        optimizer.step()
        reference.step()


def test_step_plan_covers_each_epoch_once_and_splits_steps_exactly():
    plan = StepPlan(n_examples=10, batch_size=2, grad_accum=2, world_size=1, seed=3)
    stream = [i for step in range(5) for i in plan.step_indices(step)]  # 20 positions = 2 epochs
    assert sorted(stream[:10]) == list(range(10)) and sorted(stream[10:]) == list(range(10))
    assert stream[:10] != stream[10:]  # each epoch reshuffled
    two = StepPlan(n_examples=10, batch_size=1, grad_accum=2, world_size=2, seed=3)
    for step in range(5):
        parts = [i for rank in range(2) for micro in two.micro_batches(step, rank) for i in micro]
        assert sorted(parts) == sorted(plan.step_indices(step))


def test_yaml_then_flags(tmp_path):
    (tmp_path / "run.yaml").write_text(
        "model: m\ndata: d.jsonl\nout: o\nr: 4\nlr: 0.001\ntargets: q_proj,v_proj\nmax-steps: 7\n"
    )
    cfg = TrainConfig.from_sources(str(tmp_path / "run.yaml"), {"r": 2, "lr": None})
    assert (cfg.r, cfg.lr, cfg.targets, cfg.max_steps) == (2, 0.001, ["q_proj", "v_proj"], 7)
    (tmp_path / "bad.yaml").write_text("model: m\nrank: 4\n")
    with pytest.raises(LorakitError, match="unknown setting 'rank'"):
        TrainConfig.from_sources(str(tmp_path / "bad.yaml"))
    with pytest.raises(LorakitError, match=r"r=0 is invalid \(--r\)"):
        TrainConfig(model="m", data="d", out="o", r=0)


def test_chat_and_completion_targets(tiny_models):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_models["llama"])
    rows = [
        {
            "messages": [
                {"role": "user", "content": "what is the answer?"},
                {"role": "assistant", "content": "forty two"},
                {"role": "user", "content": "and the cat?"},
                {"role": "assistant", "content": "on the mat"},
            ]
        }
    ]
    (example,), _ = encode(rows, tokenizer, "causal-lm", 512, None, "chat.jsonl")
    assert tokenizer.decode(example.input_ids) == tokenizer.apply_chat_template(rows[0]["messages"], tokenize=False)
    learned = tokenizer.decode([t for t in example.labels if t != IGNORE])
    assert learned == "forty two<|im_end|>\non the mat<|im_end|>\n"  # the template's assistant text, nothing else

    rows = [{"prompt": "Q: the cat\nA:", "completion": " sat on the mat"}]
    (example,), _ = encode(rows, tokenizer, "causal-lm", 512, None, "pc.jsonl")
    assert tokenizer.decode([t for t in example.labels if t != IGNORE]) == " sat on the mat<|im_end|>"
    assert example.n_targets == len(tokenizer(" sat on the mat", add_special_tokens=False).input_ids) + 1


def test_loss_sum_equals_transformers_token_mean(tiny_models):
    """Completion-only loss through logits_to_keep == transformers' own loss over the padded batch."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_models["llama"]).eval()
    g = torch.Generator().manual_seed(0)
    examples = []
    for length, prompt in ((9, 6), (5, 2), (12, 10)):
        ids = torch.randint(0, 290, (length,), generator=g).tolist()
        examples.append(Example(ids, labels=[IGNORE] * prompt + ids[prompt:]))
    batch = collate(examples, pad_id=0)
    with torch.no_grad():
        total, _, count = loss_sum(model, batch, "causal-lm")
        reference = model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]
        ).loss
    assert count == sum(e.n_targets for e in examples) == 3 + 3 + 2
    assert math.isclose(total.item() / count, reference.item(), rel_tol=1e-5)


def test_csv_and_txt_files_and_classifier_heads(tmp_path):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from lorakit.train.build import classifier_heads
    from lorakit.train.data import load_rows

    (tmp_path / "d.csv").write_text('text,label\n"a good, warm film",1\nslow and dull,0\n')
    assert load_rows(str(tmp_path / "d.csv")) == [
        {"text": "a good, warm film", "label": 1},
        {"text": "slow and dull", "label": 0},
    ]
    (tmp_path / "d.txt").write_text("To be, or not to be:\nthat is the question.\n\nWhat's in a name?\n")
    assert [r["text"].strip() for r in load_rows(str(tmp_path / "d.txt"))] == [
        "To be, or not to be:\nthat is the question.",
        "What's in a name?",
    ]
    (tmp_path / "d.parquet").touch()
    with pytest.raises(LorakitError, match="unsupported file type"):
        load_rows(str(tmp_path / "d.parquet"))
    llama = LlamaForSequenceClassification(
        LlamaConfig(
            vocab_size=64,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_labels=2,
        )
    )
    assert classifier_heads(llama) == ["score"]


def test_jsonl_rows_are_what_datasets_reads(tmp_path):
    import json

    import datasets

    from lorakit.train.data import load_rows

    rows = [
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "a\u2028b"}]},
        {"messages": [{"role": "user", "content": "caf\u00e9"}, {"role": "assistant", "content": "ok"}]},
    ]
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n\n", encoding="utf-8")
    reference = datasets.load_dataset("json", data_files=str(path), split="train").to_list()
    assert load_rows(str(path)) == reference == rows
    path.write_text('{"text": "a"}\n{"text": \n')
    with pytest.raises(LorakitError, match=r"d.jsonl could not be read as JSON: line 2: "):
        load_rows(str(path))
    path.write_text('{"text": "a"}\n["text"]\n')
    with pytest.raises(LorakitError, match=r"line 2 is a list, not an object"):
        load_rows(str(path))
    path.write_bytes(b'{"text": "\xff"}\n')
    with pytest.raises(LorakitError, match=r"not UTF-8 text"):
        load_rows(str(path))
    path.write_text("\n\n")
    with pytest.raises(LorakitError, match=r"holds no rows"):
        load_rows(str(path))
