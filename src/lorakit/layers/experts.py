"""LoRA on a parameter: the 3-D expert stacks of mixture-of-experts layers (PEFT's `target_parameters`).

Modern MoE layers (transformers' Mixtral, Qwen2/3-MoE, OLMoE, GPT-OSS, ...) keep all experts of a
layer in one parameter W of shape (E, d, k) (`gate_up_proj`, `down_proj`; GPT-OSS and Aria store
(E, k, d) and say so with `is_transposed`). Their forward reads W directly, so LoRA cannot add to an
output; it adds to the weight instead, for the duration of the call:

    W'[e] = W[e] + s·B_e·A_e,    A_e (r x k), B_e (d x r),    e = 1..E

One adapter per expert, rank r each, as PEFT does it, for two reasons: experts specialise (a shared
ΔW would move every expert the same way, which is what the router exists to avoid), and it is PEFT's
layout, so files go both ways. PEFT stores the E pairs as one Linear pair of rank r·E:

    lora_A (E·r x k): row e·r + j is A_e[j]           (expert-major)
    lora_B (d x r·E): column j·E + e is B_e[:, j]      (rank-major: the transposition vLLM trips on)

and lorakit keeps exactly those tensors. A 2-D parameter is one matrix (d x k), E = 1. Several
parameters of one module nest, one wrapper each, the first registered innermost (PEFT's order, so
the tensor keys `experts.base_layer.lora_A.weight` agree). Dropout, DoRA and PiSSA are refused (x
cannot be factored out of ΔW·x inside the module, as PEFT says). Mixed batches run the module once
per adapter on that adapter's rows (a token's row is its position in the flattened batch).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import Tensor, nn

from ..errors import LorakitError
from .base import AdapterSpec, LoraWrapper
from .per_row import check_unmerged


def innermost(module: nn.Module) -> nn.Module:
    """The module under every lorakit wrapper: the one that owns the parameters."""
    while isinstance(module, LoraWrapper):
        module = module.base_layer
    return module


def parameter_layers(module: nn.Module) -> dict[str, ExpertParameter]:
    """The parameter wrappers nested at one module path, by parameter name (outermost first)."""
    found = {}
    while isinstance(module, ExpertParameter):
        found[module.parameter_name] = module
        module = module.base_layer
    return found


class ExpertParameter(LoraWrapper):
    """Wraps the module that owns parameter `parameter_name` (2-D, or 3-D with experts first)."""

    def __init__(self, base_layer: nn.Module, parameter_name: str):
        owner = innermost(base_layer)
        param = owner._parameters.get(parameter_name) if isinstance(parameter_name, str) else None
        if param is None or param.dim() not in (2, 3):
            shape = None if param is None else tuple(param.shape)
            raise LorakitError(
                f"{type(owner).__name__}.{parameter_name} is {'not a parameter' if shape is None else shape}; "
                "target_parameters adapts 2-D weights and 3-D expert stacks (experts, out, in)"
            )
        super().__init__(base_layer)
        self.parameter_name = parameter_name
        self.num_experts = param.shape[0] if param.dim() == 3 else 1
        self.transposed = param.dim() == 3 and bool(getattr(owner, "is_transposed", False))

    # ----- the template's views ------------------------------------------------------------------
    def weight_param(self) -> Tensor:
        return innermost(self.base_layer)._parameters[self.parameter_name]

    def weight_2d(self) -> Tensor:
        """The parameter in its own layout (E x d x k, E x k x d when transposed, or d x k)."""
        return self.weight_param()

    @property
    def out_dim(self) -> int:
        shape = self.weight_param().shape
        return shape[-1] if self.transposed else shape[-2]

    @property
    def in_dim(self) -> int:
        shape = self.weight_param().shape
        return shape[-2] if self.transposed else shape[-1]

    def _a_shape(self, r: int) -> tuple[int, ...]:
        return (self.num_experts * r, self.in_dim)

    def _b_shape(self, r: int) -> tuple[int, ...]:
        return (self.out_dim, r * self.num_experts)

    def rank_of(self, a: Tensor) -> int:
        return a.shape[0] // self.num_experts

    def target_key(self, path: str) -> str:
        """`<module path>.<parameter>`: what target_parameters and rank/alpha patterns match (as in PEFT)."""
        return f"{path.replace('.base_layer', '')}.{self.parameter_name}"

    def refusal(self, spec: AdapterSpec) -> str | None:
        if spec.dropout:
            return "dropout is not supported on target_parameters (x cannot be factored out of ΔW·x); set dropout=0"
        if spec.use_dora:
            return "use_dora is not supported on target_parameters (as in PEFT); set use_dora=False"
        if spec.init == "pissa":
            return "init='pissa' is not supported on target_parameters; use init='kaiming' or 'gaussian'"
        if spec.r > max(self.out_dim, self.in_dim):
            return (
                f"rank r={spec.r} exceeds the expert's larger dimension ({self.out_dim} x {self.in_dim}); a rank above "
                "min(d, k) adds parameters but no expressiveness"
            )
        return super().refusal(spec)

    def a_2d(self, name: str) -> Tensor:
        return self.lora_A[name].reshape(self.num_experts, self.specs[name].r, self.in_dim)  # A_e, (E, r, k)

    def b_2d(self, name: str) -> Tensor:
        b = self.lora_B[name].reshape(self.out_dim, self.specs[name].r, self.num_experts)
        return b.permute(2, 0, 1)  # B_e, (E, d, r)

    def delta_weight(self, name: str) -> Tensor:
        """s·B_e·A_e for every expert, shaped like the parameter."""
        delta = self.specs[name].scale * torch.bmm(self.b_2d(name), self.a_2d(name))  # (E, d, k)
        if self.transposed:
            return delta.transpose(1, 2)
        return delta if self.weight_param().dim() == 3 else delta[0]

    def stacked(self, used: list[str] | None = None):
        """No slot stack: per-row batches run the module once per adapter (see _forward_per_row)."""
        weight = self.weight_param()
        return {}, weight.new_zeros((1, 1, self.in_dim)), weight.new_zeros((1, 1, self.out_dim)), None

    # ----- forward -------------------------------------------------------------------------------
    @contextmanager
    def _weight_as(self, name: str | None):
        """Inside the block the owner's forward reads W + s·ΔW_name (W itself when name is None)."""
        owner, key = innermost(self.base_layer), self.parameter_name
        original = owner._parameters[key]
        if name is not None:
            owner._parameters[key] = original + self.delta_weight(name).to(original.dtype)
        try:
            yield
        finally:
            owner._parameters[key] = original

    def forward(self, *args, **kwargs):
        if self.per_row is not None:
            return self._forward_per_row(*args, **kwargs)
        with self._weight_as(self.live_adapter()):
            return self.base_layer(*args, **kwargs)

    def _chain(self) -> list[ExpertParameter]:
        return list(parameter_layers(self).values())

    def _forward_per_row(self, x: Tensor, *args, **kwargs):
        """Row b's tokens are the b-th of len(rows) equal chunks of the leading dimension (a batch-major
        flattening, as MoE blocks do); each adapter's rows run through the module with its weights."""
        rows, n = self.per_row.names, x.shape[0]
        check_unmerged(self.merged)
        if n % len(rows):
            raise LorakitError(
                f"per_row was given {len(rows)} adapter names but this expert layer sees {n} tokens, which do not "
                "split into that many rows; pass one name (or None) per batch row"
            )
        row_of_token = torch.arange(n, device=x.device) // (n // len(rows))
        out = None
        for name in dict.fromkeys(rows):
            picked = torch.tensor([i for i, r in enumerate(rows) if r == name], device=x.device)
            index = torch.nonzero(torch.isin(row_of_token, picked)).flatten()
            sliced = [a[index] if isinstance(a, Tensor) and a.shape[:1] == (n,) else a for a in (x, *args)]
            kw = {k: v[index] if isinstance(v, Tensor) and v.shape[:1] == (n,) else v for k, v in kwargs.items()}
            part = self._run_as(name, *sliced, **kw)
            out = part.new_zeros((n, *part.shape[1:])) if out is None else out
            out = out.index_copy(0, index, part)
        return out

    def _run_as(self, name: str | None, *args, **kwargs):
        """Run the nested chain with every wrapper set to adapter `name` alone (None: the base)."""
        chain = self._chain()
        saved = [(layer.per_row, layer.active) for layer in chain]
        try:
            for layer in chain:
                layer.per_row, layer.active = None, name
            return self.forward(*args, **kwargs)
        finally:
            for layer, (routing, active) in zip(chain, saved):
                layer.per_row, layer.active = routing, active
