"""The CLI end to end on tiny saved models: train, Ctrl-C + resume, eval, merge, generate, inspect, bad input.

Commands run in-process through lorakit.cli.main.main (as the console script does); results are
checked against PEFT and plain transformers, which load the same files independently.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_hf import reference_text_loss

from lorakit.cli.main import main


@pytest.fixture
def cli(capsys):
    def run(*argv: str) -> tuple[int, str, str]:
        try:
            code = main([str(a) for a in argv])
        except SystemExit as exit_:  # argparse usage errors
            code = exit_.code
        out, err = capsys.readouterr()
        return code, out, err

    return run


def train_args(model: Path, data: Path, out: Path, *extra) -> list:
    return [
        "train",
        "--model",
        model,
        "--data",
        data,
        "--out",
        out,
        "--batch-size",
        4,
        "--lr",
        0.02,
        "--no-progress",
        "--no-plot",
        *extra,
    ]


def test_train_interrupt_and_resume_is_bit_exact(cli, tiny_models, data_files, tmp_path):
    common = ["--max-steps", 40, "--dropout", 0.1, "--eval-fraction", 0.2, "--targets", "q_proj,v_proj,o_proj"]
    code, out, err = cli(
        *train_args(tiny_models["llama"], data_files["text"], tmp_path / "straight", *common, "--plot")
    )
    assert code == 0, err
    assert "held-out after" in out and (tmp_path / "straight/loss.png").stat().st_size > 1000
    run = json.loads((tmp_path / "straight/adapter/run.json").read_text())
    assert run["steps"] == 40 and run["eval_after"]["loss"] < run["eval_before"]["loss"]

    # Ctrl-C (a real SIGINT) once a few steps are logged: the step finishes, a checkpoint is saved, exit 130.
    metrics = tmp_path / "cut/metrics.jsonl"

    def interrupt():
        deadline = time.time() + 60
        while time.time() < deadline:
            if metrics.is_file() and metrics.read_text().count('"train"') >= 3:
                os.kill(os.getpid(), signal.SIGINT)
                return
            time.sleep(0.005)

    watcher = threading.Thread(target=interrupt)
    watcher.start()
    code, _, err = cli(
        *train_args(tiny_models["llama"], data_files["text"], tmp_path / "cut", *common, "--save-every", 1000)
    )
    watcher.join()
    assert code == 130, err
    saved = sorted((tmp_path / "cut/checkpoints").iterdir())
    assert len(saved) == 1 and not (tmp_path / "cut/adapter").exists()
    stopped_at = json.loads((saved[0] / "trainer_state.json").read_text())["step"]
    assert 3 <= stopped_at < 40

    code, _, err = cli(*train_args(tiny_models["llama"], data_files["text"], tmp_path / "cut", *common))
    assert code == 2 and "--resume" in err  # will not clobber a run by accident
    code, _, err = cli(*train_args(tiny_models["llama"], data_files["text"], tmp_path / "cut", *common, "--resume"))
    assert code == 0, err
    a = load_file(tmp_path / "straight/adapter/adapter_model.safetensors")
    b = load_file(tmp_path / "cut/adapter/adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    losses = [
        [
            r["loss"]
            for r in map(json.loads, (tmp_path / d / "metrics.jsonl").read_text().splitlines())
            if r["split"] == "train"
        ]
        for d in ("straight", "cut")
    ]
    assert losses[0] == losses[1]


def test_gradient_accumulation_gives_the_same_update(cli, tiny_models, data_files, tmp_path):
    for name, batch, accum in (("one", 4, 1), ("accum", 1, 4)):
        code, _, err = cli(
            *train_args(tiny_models["llama"], data_files["pc"], tmp_path / name, "--max-steps", 3),
            "--batch-size",
            batch,
            "--grad-accum",
            accum,
        )
        assert code == 0, err
    a = load_file(tmp_path / "one/adapter/adapter_model.safetensors")
    b = load_file(tmp_path / "accum/adapter/adapter_model.safetensors")
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_eval_merge_generate_agree_with_peft_and_transformers(cli, tiny_models, data_files, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = tiny_models["gpt2"]
    code, _, err = cli(
        *train_args(model_dir, data_files["chat"], tmp_path / "run", "--max-steps", 5, "--targets", "c_attn,c_proj")
    )
    assert code == 0, err
    adapter = tmp_path / "run/adapter"
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), adapter).eval()

    code, out, err = cli("eval", "--model", model_dir, "--adapter", adapter, "--data", data_files["text"], "--json")
    assert code == 0, err
    result = json.loads(out)
    assert set(result) == {"loss", "perplexity"}
    assert result["loss"] == pytest.approx(reference_text_loss(peft_model, tokenizer, data_files["text"]), rel=1e-4)

    code, out, err = cli("merge", "--model", model_dir, "--adapter", adapter, "--out", tmp_path / "merged")
    assert code == 0, err
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    probe = tokenizer("the cat sat on the mat", return_tensors="pt")
    with torch.no_grad():
        assert torch.allclose(merged(**probe).logits, peft_model(**probe).logits, atol=1e-5)
    assert sorted(p.name for p in (tmp_path / "merged").glob("*.safetensors")) == ["model.safetensors"]

    code, out, err = cli(
        "generate", "--model", model_dir, "--adapter", adapter, "--prompt", "what is the answer?", "--max-new-tokens", 6
    )
    assert code == 0, err
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "what is the answer?"}], tokenize=False, add_generation_prompt=True
    )
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        reference = merged.generate(**ids, max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert out.strip() == tokenizer.decode(reference[0, ids.input_ids.shape[1] :], skip_special_tokens=True).strip()


def test_seq_cls_defaults_to_training_the_head(cli, tiny_models, data_files, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    code, _, err = cli(
        *train_args(
            tiny_models["bert"],
            data_files["cls"],
            tmp_path / "run",
            "--task",
            "seq-cls",
            "--max-steps",
            6,
            "--lr",
            0.05,
        )
    )
    assert code == 0, err
    adapter = tmp_path / "run/adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["classifier"] and config["task_type"] == "SEQ_CLS"
    code, out, err = cli(
        "eval", "--model", tiny_models["bert"], "--adapter", adapter, "--data", data_files["cls"], "--json"
    )
    assert code == 0, err
    result = json.loads(out)
    assert list(result) == ["accuracy", "loss"]

    labels = json.loads((adapter / "run.json").read_text())["labels"]
    assert labels == ["negative", "positive"]
    base = AutoModelForSequenceClassification.from_pretrained(tiny_models["bert"], num_labels=2)
    reference = PeftModel.from_pretrained(base, adapter).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_models["bert"])
    rows = [json.loads(line) for line in data_files["cls"].read_text().splitlines()]
    with torch.no_grad():
        predicted = [reference(**tokenizer(r["text"], return_tensors="pt")).logits.argmax(-1).item() for r in rows]
    assert result["accuracy"] == pytest.approx(
        sum(labels[p] == r["label"] for p, r in zip(predicted, rows)) / len(rows)
    )


def test_inspect_counts_match_peft_and_the_update_spectrum(cli, tiny_models, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    code, out, err = cli("inspect", tiny_models["llama"], "--ranks", "4,8", "--json")
    assert code == 0, err
    report = json.loads(out)
    for entry in report["lora"]:
        targets = ["q_proj", "v_proj"] if entry["targets"].startswith("default") else "all-linear"
        peft_model = get_peft_model(
            AutoModelForCausalLM.from_pretrained(tiny_models["llama"]), LoraConfig(r=entry["r"], target_modules=targets)
        )
        assert entry["trainable"] == peft_model.get_nb_trainable_parameters()[0]

    # An adapter whose update has rank 2 in one layer: inspect must report rank 2 and ||s·B·A||_F.
    model = AutoModelForCausalLM.from_pretrained(tiny_models["llama"])
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]))
    layer = peft_model.base_model.model.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        layer.lora_B["default"].weight.copy_(torch.randn(32, 4))
        layer.lora_A["default"].weight.copy_(torch.randn(4, 32))
        layer.lora_A["default"].weight[2:] = 0
    peft_model.save_pretrained(tmp_path / "adapter")
    code, out, err = cli("inspect", tmp_path / "adapter", "--json")
    assert code == 0, err
    first = json.loads(out)["layers"][0]
    delta = 2.0 * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
    assert first["rank"] == torch.linalg.matrix_rank(delta).item() == 2
    assert first["norm"] == pytest.approx(torch.linalg.matrix_norm(delta).item(), rel=1e-5)
    code, out, _ = cli("inspect", tmp_path / "adapter")
    assert "eff. rank" in out and "model.layers.0.self_attn.q_proj" in out


def test_bad_inputs_end_with_one_line_and_exit_2(cli, tiny_models, data_files, tmp_path):
    (tmp_path / "empty_model").mkdir()
    (tmp_path / "empty_model/config.json").write_text(json.dumps({"model_type": "llama"}))
    (tmp_path / "wrong.jsonl").write_text('{"question": "a", "answer": "b"}\n')
    (tmp_path / "unknown_label.jsonl").write_text('{"text": "a good film", "label": "meh"}\n')
    code, _, _ = cli(*train_args(tiny_models["llama"], data_files["text"], tmp_path / "llama_run", "--max-steps", 1))
    assert code == 0
    llama, bert = tiny_models["llama"], tiny_models["bert"]
    cases = {
        "does not exist": train_args(llama, tmp_path / "missing.jsonl", tmp_path / "o1"),
        "needs a `text` column": train_args(llama, tmp_path / "wrong.jsonl", tmp_path / "o2"),
        "is not one of the labels": train_args(
            bert,
            data_files["cls"],
            tmp_path / "o3",
            "--task",
            "seq-cls",
            "--eval-data",
            tmp_path / "unknown_label.jsonl",
        ),
        "has no weights": train_args(tmp_path / "empty_model", data_files["text"], tmp_path / "o4"),
        "the adapter is for another model": [
            "eval",
            "--model",
            tiny_models["gpt2"],
            "--adapter",
            tmp_path / "llama_run/adapter",
            "--data",
            data_files["text"],
        ],
        "r=0 is invalid": train_args(llama, data_files["text"], tmp_path / "o5", "--r", 0),
        "not an adapter directory": ["merge", "--model", llama, "--adapter", tmp_path, "--out", tmp_path / "o6"],
    }
    for expected, argv in cases.items():
        code, out, err = cli(*argv)
        assert code == 2, (expected, err)
        assert expected in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(cli, tiny_models, data_files, tmp_path, monkeypatch):
    from lorakit.train import trainer

    calls = {"n": 0}
    real = trainer._pass_loss  # every forward pass of a step, packed or padded

    def poisoned(run, examples, packed):
        calls["n"] += 1
        loss = real(run, examples, packed)
        return loss * float("nan") if calls["n"] == 5 else loss

    monkeypatch.setattr(trainer, "_pass_loss", poisoned)
    code, _, err = cli(
        *train_args(tiny_models["llama"], data_files["text"], tmp_path / "run", "--max-steps", 8, "--save-every", 2)
    )
    assert code == 1
    last = err.strip().splitlines()[-1]
    assert "loss became nan at step 5" in last and "step-00000004" in last and "Traceback" not in err
    assert sorted(p.name for p in (tmp_path / "run/checkpoints").iterdir()) == ["step-00000002", "step-00000004"]
    assert not (tmp_path / "run/adapter").exists()


def test_memory_options(cli, tiny_models, data_files, tmp_path):
    """Gradient checkpointing recomputes exactly; a bf16 base trains fp32 adapters close to the fp32 run."""
    runs = {
        "plain": [],
        "ckpt": ["--gradient-checkpointing"],
        "bf16": ["--base-dtype", "bf16", "--gradient-checkpointing"],
    }
    for name, extra in runs.items():
        code, _, err = cli(
            *train_args(tiny_models["llama"], data_files["text"], tmp_path / name, "--max-steps", 3, *extra)
        )
        assert code == 0, err
    plain, ckpt, bf16 = (load_file(tmp_path / n / "adapter/adapter_model.safetensors") for n in runs)
    assert all(torch.allclose(plain[k], ckpt[k], atol=1e-6) for k in plain)
    assert all(v.dtype == torch.float32 for v in bf16.values())
    assert all(torch.allclose(plain[k], bf16[k], atol=0.05) for k in plain)
    assert any(not torch.equal(plain[k], bf16[k]) for k in plain)  # it did run in bf16


@pytest.mark.parametrize("command", ["train", "eval", "generate", "merge", "inspect"])
def test_help(cli, command):
    code, out, _ = cli(command, "--help")
    assert code == 0 and out.startswith("usage: lorakit " + command)


def test_train_an_moe_expert_adapter_that_peft_loads(cli, data_files, tmp_path):
    """--target-parameters trains one adapter per expert of a Mixtral's 3-D expert stacks; PEFT reads the
    file (its ParamWrapper layout) and gives the same logits as lorakit."""
    from peft import PeftModel
    from tiny_hf import tiny_tokenizer
    from tiny_moe import EXPERT_PARAMETERS, tiny_moe
    from transformers import AutoModelForCausalLM

    import lorakit

    model_dir = tmp_path / "mixtral"
    tokenizer = tiny_tokenizer(model_dir)
    tiny_moe("mixtral", vocab=len(tokenizer), eos=tokenizer.eos_token_id).save_pretrained(model_dir)
    experts = ",".join(EXPERT_PARAMETERS)
    args = train_args(model_dir, data_files["text"], tmp_path / "run", "--max-steps", 3, "--r", 2)
    code, _, err = cli(*args, "--targets", "q_proj", "--target-parameters", experts)
    assert code == 0, err
    adapter = tmp_path / "run/adapter"
    saved = json.loads((adapter / "adapter_config.json").read_text())
    # written as the exact parameters adapted (2 layers x 2 stacks), as target_modules are
    assert len(saved["target_parameters"]) == 4
    assert all(p.endswith(tuple(EXPERT_PARAMETERS)) for p in saved["target_parameters"])
    tensors = load_file(adapter / "adapter_model.safetensors")
    expert_b = [t for k, t in tensors.items() if "experts" in k and "lora_B" in k]
    assert expert_b and all(t.abs().sum() > 0 for t in expert_b)  # trained away from B = 0

    probe = torch.tensor([tokenizer("the cat sat on the mat").input_ids])
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), adapter).eval()
    ours = lorakit.load_adapter(AutoModelForCausalLM.from_pretrained(model_dir), adapter).eval()
    with torch.no_grad():
        base = AutoModelForCausalLM.from_pretrained(model_dir).eval()(probe).logits
        expected = peft_model(probe).logits
        torch.testing.assert_close(ours(probe).logits, expected, atol=1e-5, rtol=1e-5)
    assert (expected - base).abs().max() > 1e-4  # the adapter changes the answer
