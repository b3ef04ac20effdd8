"""A short end-to-end tour of lorakit on a tiny seeded Llama (no downloads): inject, train, save, load, merge."""

import tempfile

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import lorakit

torch.manual_seed(0)
model = LlamaForCausalLM(
    LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
).eval()
ids = torch.randint(0, 256, (4, 32))
base_logits = model(ids).logits.detach()

lorakit.inject(model, lorakit.LoraConfig(r=8, alpha=16, target_modules=["q_proj", "v_proj"]), seed=0)
print(lorakit.count_parameters(model))

model.train()
optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
for step in range(20):
    loss = model(ids, labels=ids).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    if step % 5 == 0 or step == 19:
        print(f"step {step:2d}  loss {loss.item():.4f}")
model.eval()

adapted = model(ids).logits
with tempfile.TemporaryDirectory() as out:
    lorakit.save_adapter(model, out)  # PEFT layout: adapter_config.json + adapter_model.safetensors
    lorakit.load_adapter(model, out, name="reloaded")
    print("reloaded == trained:", torch.equal(model(ids).logits, adapted))
    lorakit.set_adapter(model, "default")
with lorakit.disabled(model):
    assert torch.allclose(model(ids).logits, base_logits, atol=1e-6)
lorakit.merge(model)
print("merged == unmerged:", torch.allclose(model(ids).logits, adapted, atol=1e-5))
