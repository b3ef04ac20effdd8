"""Does an adapter compute the same thing in every runtime it will be deployed to?

For one base model and adapter, each runtime gets the adapter as lorakit would hand it over and the same
input; its output is compared with lorakit's (max |difference|), the adapted modules it dropped are listed,
and where its per-module scale differs from the adapter's (rsLoRA, alpha_pattern, mixed ranks) that drift
is shown. Runtimes:

    PEFT            PeftModel.from_pretrained on the PEFT folder lorakit writes
    diffusers       model.load_lora_adapter on the diffusers file lorakit writes (image models)
    GGUF export     lorakit's llama.cpp adapter read back with the `gguf` package, applied as llama.cpp
                    does: W += (α / r)·B·A per tensor, llama.cpp's q/k row order undone
    llama.cpp       llama-cpp-python, when installed: the f32 base written as GGUF with lorakit's adapter
    vLLM            reads lora_alpha and r only: s = lora_alpha / r (or / √r) for every module
    llama.cpp conv. convert_lora_to_gguf.py writes one alpha = lora_alpha: s = alpha / r_m, no rsLoRA
The last two are the runtimes' documented scale rules applied to the PEFT folder (marked "rule"): a module
whose rule-scale differs from its real scale is drift, which `lorakit export --format peft --fold-scales`
removes. Both refuse DoRA and modules_to_save (export a merged model for them). A runtime that is not
installed is skipped.
"""

from __future__ import annotations

import importlib.util
import json
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import LorakitError
from .model_state import adapter_configs, lora_layers

DRIFT_TOLERANCE = 1e-6


@dataclass
class RuntimeCheck:
    runtime: str
    status: str  # ran | rule (its scale rule applied) | refuses X | not installed | n/a: why | failed: why
    max_diff: float | None = None
    dropped: list[str] = field(default_factory=list)
    drift: list[str] = field(default_factory=list)  # "path: runtime s vs adapter s"

    def agrees(self, tolerance: float, scale: float) -> bool | None:
        """True/False for runtimes that ran or whose rule was applied; None when skipped."""
        if self.status not in ("ran", "rule"):
            return False if self.status.startswith(("failed", "refuses")) else None
        close = self.max_diff is None or self.max_diff <= tolerance * max(1.0, scale)
        return close and not self.dropped and not self.drift


def _drift(runtime_scales: dict[str, float], scales: dict[str, float]) -> list[str]:
    return [
        f"{p}: {runtime_scales[p]:.4g} vs {s:.4g}"
        for p, s in sorted(scales.items())
        if p in runtime_scales and abs(runtime_scales[p] - s) > DRIFT_TOLERANCE * max(1.0, abs(s))
    ]


def _peft_layers(model: nn.Module, adapter: str) -> dict[str, float]:
    """path -> scaling of every module PEFT (or diffusers through PEFT) adapted."""
    out = {}
    for name, module in model.named_modules():
        scaling = getattr(module, "scaling", None)
        if isinstance(scaling, dict) and adapter in scaling and hasattr(module, "lora_A"):
            out[name.removeprefix("base_model.model.")] = float(scaling[adapter])
    return out


class Verifier:
    """Runs the checks for one adapted model. `fresh()` gives a new copy of the base; `run(model)` its output."""

    def __init__(
        self,
        model: nn.Module,
        fresh: Callable[[], nn.Module],
        run: Callable[[nn.Module], torch.Tensor],
        tokenizer: Any = None,
        token_ids: list[int] | None = None,
    ):
        if "default" not in adapter_configs(model):
            raise LorakitError("verify needs the adapter loaded as 'default'")
        self.model, self.fresh, self.run = model, fresh, run
        self.tokenizer, self.token_ids = tokenizer, token_ids
        self.layers = {p: layer for p, layer in lora_layers(model) if "default" in layer.specs}
        self.scales = {p: layer.specs["default"].scale for p, layer in self.layers.items()}
        self.reference = run(model)

    def _compare(self, runtime: str, other: nn.Module, adapted: dict[str, float]) -> RuntimeCheck:
        diff = (self.run(other) - self.reference).abs().max().item()
        dropped = sorted(set(self.scales) - set(adapted))
        return RuntimeCheck(runtime, "ran", diff, dropped, _drift(adapted, self.scales))

    def peft(self, tmp: Path) -> RuntimeCheck:
        from peft import PeftModel

        from .formats.peft import save_adapter

        save_adapter(self.model, tmp / "peft")
        other = PeftModel.from_pretrained(self.fresh(), tmp / "peft").eval()
        return self._compare("PEFT", other, _peft_layers(other, "default"))

    def diffusers(self, tmp: Path) -> RuntimeCheck:
        from .formats.diffusers import component_of
        from .formats.peft import save_adapter

        if not type(self.model).__module__.startswith("diffusers"):
            return RuntimeCheck("diffusers", "n/a: not a diffusers model")
        save_adapter(self.model, tmp / "diffusers", format="diffusers")
        other = self.fresh()
        other.load_lora_adapter(
            tmp / "diffusers", prefix=component_of(self.model), adapter_name="default", use_safetensors=True
        )
        return self._compare("diffusers", other.eval(), _peft_layers(other, "default"))

    def gguf(self, tmp: Path) -> RuntimeCheck:
        from .formats.gguf import ARCHS, llama_permute, row_heads, tensor_name, write_adapter

        if getattr(getattr(self.model, "config", None), "model_type", None) not in ARCHS:
            return RuntimeCheck("GGUF export", "n/a: architecture not in llama.cpp export")
        try:
            path = write_adapter(self.model, tmp / "adapter.gguf")
        except LorakitError as err:
            return RuntimeCheck("GGUF export", f"n/a: {err}")
        import gguf

        reader = gguf.GGUFReader(path)
        alpha = float(reader.fields["adapter.lora.alpha"].parts[-1][0])
        tensors = {t.name: torch.from_numpy(t.data.copy()).float() for t in reader.tensors}
        other, adapted = self.fresh(), {}
        for p in self.scales:
            name = tensor_name(other, f"{p}.weight")
            if f"{name}.lora_a" not in tensors:
                continue
            a, b = tensors[f"{name}.lora_a"], tensors[f"{name}.lora_b"]
            delta = alpha / a.shape[0] * (b @ a)
            heads = row_heads(other, f"{p}.weight")
            if heads is not None:  # undo llama.cpp's row order: invert the permutation of the row indices
                order = llama_permute(torch.arange(delta.shape[0]).unsqueeze(1), heads).squeeze(1)
                delta = delta[torch.argsort(order)]
            weight = other.get_submodule(p).weight
            with torch.no_grad():
                weight.add_(delta.to(weight.dtype))
            adapted[p] = self.scales[p]  # scales are folded into B, so only the output tells
        return self._compare("GGUF export", other, adapted)

    def llama_cpp(self, tmp: Path) -> RuntimeCheck:
        """llama.cpp itself (llama-cpp-python): the f32 base as GGUF plus lorakit's GGUF adapter, same tokens."""
        from llama_cpp import Llama

        from .formats.gguf import ARCHS, write_adapter, write_merged

        if self.tokenizer is None or not self.token_ids:
            return RuntimeCheck("llama.cpp", "n/a: not a language model")
        if getattr(getattr(self.model, "config", None), "model_type", None) not in ARCHS:
            return RuntimeCheck("llama.cpp", "n/a: architecture not in llama.cpp export")
        try:
            adapter = write_adapter(self.model, tmp / "llama-cpp-adapter.gguf")
        except LorakitError as err:
            return RuntimeCheck("llama.cpp", f"n/a: {err}")
        self.tokenizer.save_pretrained(tmp / "tokenizer")
        base = write_merged(self.fresh(), tmp / "base.gguf", tmp / "tokenizer", dtype="f32")
        f32 = 0  # GGML_TYPE_F32: llama.cpp's default f16 KV cache alone moves logits by ~1e-3
        llm = Llama(
            model_path=str(base),
            lora_path=str(adapter),
            logits_all=True,
            n_ctx=len(self.token_ids) + 16,
            type_k=f32,
            type_v=f32,
            verbose=False,
        )
        llm.eval(self.token_ids)
        got = torch.tensor(llm.scores[: len(self.token_ids)], dtype=torch.float32)
        diff = (got - self.reference.reshape(got.shape)).abs().max().item()
        return RuntimeCheck("llama.cpp", "ran", diff)

    def rule(self, runtime: str, scale_of: Callable[[dict, int], float]) -> RuntimeCheck:
        """A runtime's scale rule applied to the PEFT config lorakit writes: each module's update rescaled to it."""
        from .formats.peft import adapter_state

        _, config = adapter_state(self.model, "default", pure=False)
        ruled = {p: scale_of(config, layer.specs["default"].r) for p, layer in self.layers.items()}
        drift = _drift(ruled, self.scales)
        return RuntimeCheck(runtime, "rule", self._ruled_output(ruled) if drift else 0.0, [], drift)

    def _ruled_output(self, ruled: dict[str, float]) -> float:
        """Output difference when each module's update is scaled by the runtime's rule instead of its own."""
        specs = {p: layer.specs["default"] for p, layer in self.layers.items()}
        saved = {p: spec.scale for p, spec in specs.items()}
        try:
            for p, spec in specs.items():
                spec.scale = ruled[p]
            return (self.run(self.model) - self.reference).abs().max().item()
        finally:
            for p, spec in specs.items():
                spec.scale = saved[p]

    def all(self) -> list[RuntimeCheck]:
        def vllm_rule(config: dict, r: int) -> float:
            return config["lora_alpha"] / (config["r"] ** 0.5 if config.get("use_rslora") else config["r"])

        def llama_cpp_rule(config: dict, r: int) -> float:
            return config["lora_alpha"] / r

        checks = [RuntimeCheck("lorakit", "ran", 0.0)]
        with tempfile.TemporaryDirectory(prefix="lorakit-verify-") as tmp:
            for name, package, method in (
                ("PEFT", "peft", self.peft),
                ("diffusers", "diffusers", self.diffusers),
                ("GGUF export", "gguf", self.gguf),
                ("llama.cpp", "llama_cpp", self.llama_cpp),
            ):
                if importlib.util.find_spec(package) is None:
                    checks.append(RuntimeCheck(name, "not installed"))
                    continue
                try:
                    checks.append(method(Path(tmp)))
                except Exception as err:  # a runtime that crashes on the adapter is a finding, not a crash
                    checks.append(RuntimeCheck(name, f"failed: {type(err).__name__}: {str(err).splitlines()[0]}"))
        config = adapter_configs(self.model)["default"]
        blocker = "DoRA" if config.use_dora else "modules_to_save" if config.modules_to_save else None
        for runtime, rule in (("vLLM (scale rule)", vllm_rule), ("llama.cpp converter (scale rule)", llama_cpp_rule)):
            checks.append(RuntimeCheck(runtime, f"refuses {blocker}") if blocker else self.rule(runtime, rule))
        return checks


def table(checks: list[RuntimeCheck], tolerance: float, scale: float) -> str:
    rows = [("runtime", "status", "max |diff|", "dropped", "scale drift", "agrees")]
    for c in checks:
        verdict = c.agrees(tolerance, scale)
        rows.append(
            (
                c.runtime,
                c.status,
                "-" if c.max_diff is None else f"{c.max_diff:.2e}",
                str(len(c.dropped)) + (f" (e.g. {c.dropped[0]})" if c.dropped else ""),
                str(len(c.drift)) + (f" (e.g. {c.drift[0]})" if c.drift else ""),
                {True: "yes", False: "NO", None: "-"}[verdict],
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def as_json(checks: list[RuntimeCheck], tolerance: float, scale: float) -> str:
    return json.dumps(
        [dict(vars(c), agrees=c.agrees(tolerance, scale)) for c in checks], indent=2, default=_json_default
    )


def _json_default(value: Any) -> Any:
    return str(value)
