"""LoraWrapper: a frozen base layer plus any number of named low-rank adapters (named for what it is, a
wrapper around the base layer; loralib's `LoRALayer` mixin is a different thing, see loralib.py).

Every adapted weight is seen as a matrix W (d x k): d outputs, k inputs (a Linear's weight, a
GPT-2 Conv1D's weight transposed, an Embedding table transposed, a Conv kernel flattened per output
channel). Adapter `n` holds A (r x k) and B (d x r) and adds ΔW = s·B·A, s = alpha/r.

Subclasses say how W maps to that matrix view (`weight_2d`) and how the low-rank term s·B·A·x is
computed for their input (`_low_rank`); this class keeps the storage, the initialisations, the
forward template, DoRA, merge / unmerge, and the per-row interface (the slot stack of all adapters
that a batch with one adapter per row gathers from, per_row_stack.py).

DoRA (arXiv:2402.09353) rescales each output channel of the adapted weight to a learned magnitude:

    W' = g ⊙ (W0 + s·B·A),   g = m / ||W0 + s·B·A||   (norm of each output channel's row, detached)
    h  = W'·x + b = out + (g - 1)·W0·x + g·s·B·A·x     (out = W0·x + b, the base output)

for every kind: a Conv's output channel row spans c_in x kernel, an Embedding's spans the vocabulary
(W = Eᵀ), as in PEFT.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import LorakitError, merged_error
from .per_row import PerRow
from .per_row_stack import SlotStack, Stacked


@dataclass
class AdapterSpec:
    """What a layer needs to know about one adapter besides its tensors."""

    r: int
    scale: float
    dropout: float = 0.0
    use_dora: bool = False
    init: str = "kaiming"


class LoraWrapper(nn.Module):
    """Base class; holds `base_layer` (frozen) and adapters in ParameterDicts keyed by name."""

    parameter_name: str | None = None  # set by layers that adapt one parameter of a module (target_parameters)

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        self.train(base_layer.training)  # a wrapper made inside an eval() model must not start dropping out
        self.base_layer = base_layer
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.lora_magnitude = nn.ParameterDict()  # DoRA only: m, one entry per output row
        self.specs: dict[str, AdapterSpec] = {}
        self.active: str | None = None  # adapter used by forward; None = base only
        self.merged: str | None = None  # adapter currently folded into the base weight
        self.per_row: PerRow | None = None  # set by lorakit.per_row: each batch row's own adapter
        self._dora_factor: Tensor | None = None  # m / ||W + ΔW|| at merge time, to unmerge exactly
        self._pissa_start: dict[str, tuple[Tensor, Tensor]] = {}
        self._stack = SlotStack()  # every adapter padded into one stack, for per-row batches
        # A, B and m by name: the ParameterDicts' own dicts (changed in place as adapters come and go),
        # held here because per-row batches read them for every adapter of every layer at each step
        # and a plain dict lookup costs ~1/20 of ParameterDict's.
        self._by_name = (self.lora_A._parameters, self.lora_B._parameters, self.lora_magnitude._parameters)

    # ----- what subclasses define ------------------------------------------------------------
    def weight_param(self) -> Tensor:
        """The base parameter this layer adapts."""
        return self.base_layer.weight

    def rank_of(self, a: Tensor) -> int:
        """The rank r of a lora_A tensor shaped like `_a_shape(r)`."""
        return a.shape[0]

    def target_key(self, path: str) -> str:
        """The name the config's patterns (rank_pattern, alpha_pattern) match for the layer at `path`."""
        return path

    def weight_2d(self) -> Tensor:
        """The base weight as a (d x k) view that shares storage with it."""
        raise NotImplementedError

    def _low_rank(self, x: Tensor, name: str) -> Tensor:
        """s·B·A·x for adapter `name`, shaped like the base output (in the adapter's dtype)."""
        raise NotImplementedError

    def _base_product(self, x: Tensor) -> Tensor:
        """W0·x without the bias (DoRA recomputes it when dropout changed x)."""
        raise NotImplementedError

    def _add_low_rank(self, out: Tensor, x: Tensor, name: str) -> Tensor:
        """out + s·B·A·x; a kind that can fuse the add into its last matmul overrides this."""
        return out + self._low_rank(x, name).to(out.dtype)

    def _per_channel(self, v: Tensor) -> Tensor:
        """A (d,) vector shaped to broadcast over the output's channel axis (the last one, unless overridden)."""
        return v

    def _dropout(self, x: Tensor, spec: AdapterSpec) -> Tensor:
        return F.dropout(x, spec.dropout, self.training) if spec.dropout else x

    def _a_shape(self, r: int) -> tuple[int, ...]:
        return (r, self.in_dim)

    def _b_shape(self, r: int) -> tuple[int, ...]:
        return (self.out_dim, r)

    @property
    def out_dim(self) -> int:
        return self.weight_2d().shape[0]

    @property
    def in_dim(self) -> int:
        return self.weight_2d().shape[1]

    # ----- adapters --------------------------------------------------------------------------
    def add_adapter(
        self,
        name: str,
        spec: AdapterSpec,
        generator: torch.Generator | None = None,
        factors: tuple[Tensor, Tensor] | None = None,
    ) -> None:
        """Add adapter `name`, initialised per `spec.init`, or holding `factors` = (A, B) as given
        (already shaped like lora_A / lora_B; used as storage when dtype and device match)."""
        if name in self.specs:
            raise LorakitError(f"adapter '{name}' already exists on this layer; delete it first or pick another name")
        problem = self.refusal(spec)
        if problem:
            raise LorakitError(problem)
        weight = self.weight_2d()
        dtype = weight.dtype if weight.dtype == torch.float64 else torch.float32
        if factors is not None:  # loading from a file: no initialisation to throw away
            a, b = (t.detach().to(device=weight.device, dtype=dtype).contiguous() for t in factors)
        else:
            a = torch.empty(self._a_shape(spec.r), dtype=dtype, device=weight.device)
            b = torch.zeros(self._b_shape(spec.r), dtype=dtype, device=weight.device)
            self._init_pair(a, b, spec, generator)
        self.lora_A[name] = nn.Parameter(a)
        self.lora_B[name] = nn.Parameter(b)
        self.specs[name] = spec
        if spec.init == "pissa":
            self._init_pissa(name)
        if spec.use_dora:
            with torch.no_grad():
                magnitude = self.weight_2d().float().norm(dim=1).to(dtype).reshape(self.magnitude_shape())
            self.lora_magnitude[name] = nn.Parameter(magnitude)

    def _init_pair(self, a: Tensor, b: Tensor, spec: AdapterSpec, generator: torch.Generator | None) -> None:
        # ΔW = B·A starts at zero, so the adapted model starts exactly at the base model.
        with torch.no_grad():
            if spec.init == "gaussian":
                a.normal_(0.0, 1.0 / spec.r, generator=generator)
            else:  # kaiming-uniform with a=sqrt(5), torch's nn.Linear default (PEFT and loralib use it)
                bound = 1.0 / math.sqrt(self.in_dim)
                a.uniform_(-bound, bound, generator=generator)

    def _init_pissa(self, name: str) -> None:
        """PiSSA: A, B from the top-r singular triplets of W; W keeps the residual."""
        spec = self.specs[name]
        self._writable_base()
        with torch.no_grad():
            weight = self.weight_2d()
            u, s, vh = torch.linalg.svd(weight.float(), full_matrices=False)
            root = (s[: spec.r] / spec.scale).sqrt()
            b = u[:, : spec.r] * root
            a = root[:, None] * vh[: spec.r]
            self.lora_A[name].data.copy_(a.reshape(self.lora_A[name].shape))
            self.lora_B[name].data.copy_(b.reshape(self.lora_B[name].shape))
            weight.sub_((spec.scale * b @ a).to(weight.dtype))
            self._pissa_start[name] = (self.lora_A[name].detach().clone(), self.lora_B[name].detach().clone())

    def _writable_base(self) -> None:
        """A quantized base (lorakit.quant) is replaced by its exact fp32 dequantization before W is
        written: folding s·B·A into 4 or 8 bits would lose most of it, and unmerge could not undo that."""
        dequantized = getattr(self.base_layer, "dequantized", None)
        if getattr(self.base_layer, "lorakit_quantized", False) and callable(dequantized):
            self.base_layer = dequantized()
            self.base_changed()

    def base_changed(self) -> None:
        """Called after `base_layer` is replaced (quantized or dequantized): re-read what depends on its type."""

    def delete_adapter(self, name: str) -> None:
        if self.merged == name:
            self.unmerge()
        if name in self._pissa_start:  # give the base back the top-r part PiSSA took from it
            a0, b0 = self._pissa_start.pop(name)
            with torch.no_grad():
                weight = self.weight_2d()
                weight.add_(
                    (self.specs[name].scale * b0.reshape(self.out_dim, -1) @ a0.reshape(a0.shape[0], -1)).to(
                        weight.dtype
                    )
                )
        for store in (self.lora_A, self.lora_B, self.lora_magnitude):
            if name in store:
                del store[name]
        del self.specs[name]
        if self.active == name:
            self.active = None

    def refusal(self, spec: AdapterSpec) -> str | None:
        """Why this layer cannot take an adapter like `spec` (None if it can): the one home of these rules."""
        if spec.init == "pissa" and self.specs:
            return "init='pissa' rewrites the base weight, so it must be the only adapter on a layer"
        if any(s.init == "pissa" for s in self.specs.values()):
            return "this layer holds a PiSSA adapter, which rewrote its base weight; delete that adapter first"
        weight = self.weight_param()
        if not weight.is_floating_point():
            return f"the base weight is {weight.dtype}; LoRA needs a floating-point base weight"
        if spec.r > max(weight.shape[0], weight.numel() // max(weight.shape[0], 1)):  # max(d, k), any layout
            return (
                f"rank r={spec.r} exceeds the layer's larger dimension ({self.out_dim} x {self.in_dim}); a rank above "
                "min(d, k) adds parameters but no expressiveness"
            )
        return None

    def discard_adapter(self, name: str, restore_weight: Tensor | None = None) -> None:
        """Forget adapter `name` as if it was never added (undoing a failed attach): no arithmetic on
        the base weight; `restore_weight` (a saved copy of it) is put back bitwise when given."""
        for store in (self.lora_A, self.lora_B, self.lora_magnitude):
            if name in store:
                del store[name]
        self.specs.pop(name, None)
        self._pissa_start.pop(name, None)
        if restore_weight is not None:
            with torch.no_grad():
                self.weight_param().copy_(restore_weight)
        if self.active == name:
            self.active = None

    def magnitude_shape(self) -> tuple[int, ...]:
        """Shape of DoRA's magnitude m as stored (and saved, PEFT's layout): one entry per output row of
        the (d x k) view. The one home of this rule: the attach path checks loaded files against it."""
        return (self.out_dim,)

    def a_2d(self, name: str) -> Tensor:
        return self.lora_A[name].reshape(self.specs[name].r, -1)

    def b_2d(self, name: str) -> Tensor:
        return self.lora_B[name].reshape(-1, self.specs[name].r)

    def delta_weight(self, name: str) -> Tensor:
        """s·B·A as a (d x k) matrix (without DoRA's rescaling)."""
        return self.specs[name].scale * (self.b_2d(name) @ self.a_2d(name))

    def live_adapter(self) -> str | None:
        """The adapter forward must add on top of the base output, if any."""
        if self.merged is not None or self.active not in self.specs:
            return None
        return self.active

    # ----- forward ---------------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        """out = base(x), plus the live adapter's term; under lorakit.per_row, each row's own adapter's."""
        out = self.base_layer(x)
        if self.per_row is not None:
            return self._forward_per_row(x, out)
        name = self.live_adapter()
        if name is None:
            return out
        spec = self.specs[name]
        x = self._dropout(x, spec)
        if spec.use_dora:
            return out + self.adapter_term(x, out, name).to(out.dtype)
        return self._add_low_rank(out, x, name)  # out + s·B·A·x, the add fused where the kind allows

    def adapter_term(self, x: Tensor, out: Tensor, name: str) -> Tensor:
        """What adapter `name` adds to the base output `out` of input x: s·B·A·x, or for DoRA
        (g - 1)·W0·x + g·s·B·A·x (module docstring)."""
        if not self.specs[name].use_dora:
            return self._low_rank(x, name)
        g = self._per_channel(self.dora_scale(name))
        if self.specs[name].dropout and self.training:  # dropout changed x: W0·x is recomputed on it
            base = self._base_product(x)
        else:
            bias = getattr(self.base_layer, "bias", None)
            base = out if bias is None else out - self._per_channel(bias)
        return (g - 1) * base + g * self._low_rank(x, name)

    def dora_scale(self, name: str) -> Tensor:
        """g = m / ||W + s·B·A||, a (d,) vector: one per output row; the norm is detached (DoRA paper, Sec. 4.3)."""
        weight, magnitude = self.weight_2d(), self.lora_magnitude[name].reshape(-1)
        with torch.no_grad():
            norm = (weight.float() + self.delta_weight(name).float()).norm(dim=1).to(magnitude.dtype)
        return magnitude / norm

    # ----- merge -----------------------------------------------------------------------------
    def merge(self, name: str | None = None) -> None:
        """Fold adapter `name` (default: the active one) into the base weight. Idempotent."""
        name = self.active if name is None else name
        if self.merged == name or name not in self.specs:
            return
        if self.merged is not None:
            raise merged_error(self.merged, f"merging '{name}'")
        self._writable_base()
        with torch.no_grad():
            weight = self.weight_2d()
            delta = self.delta_weight(name)
            if self.specs[name].use_dora:
                factor = self.dora_scale(name)
                weight.copy_(((weight.double() + delta.double()) * factor[:, None].double()).to(weight.dtype))
                self._dora_factor = factor.detach().clone()
            else:
                weight.add_(delta.to(weight.dtype))
        self.merged = name

    def unmerge(self) -> None:
        """Take the merged adapter back out of the base weight. Idempotent."""
        if self.merged is None:
            return
        name, self.merged = self.merged, None
        with torch.no_grad():
            weight = self.weight_2d()
            delta = self.delta_weight(name)
            if self._dora_factor is not None:
                restored = weight.double() / self._dora_factor[:, None].double() - delta.double()
                weight.copy_(restored.to(weight.dtype))
                self._dora_factor = None
            else:
                weight.sub_(delta.to(weight.dtype))

    # ----- per-row batches (per_row.py, per_row_stack.py) ------------------------------------
    def _forward_per_row(self, x: Tensor, out: Tensor) -> Tensor:
        """`out` plus, for each row b of the batch, the term of adapter `self.per_row.names[b]`."""
        raise NotImplementedError

    def stacked(self, used: list[str] | None = None) -> Stacked:
        """Slot per adapter, A (n+1, r_max, k), (s·B)ᵀ (n+1, r_max, d), DoRA's g (n+1, d) or None;
        slot 0 is no adapter. `used` (adapters of this layer; default all) are guaranteed in it."""
        return self._stack.stacked(self, list(self.specs) if used is None else used)

    def reserve_slots(self, count: int) -> None:
        """Room for `count` adapters in the per-row stack now, so later loads never grow it."""
        self._stack.reserve(count)

    def adapter_tensors(self) -> tuple[Mapping[str, Tensor], Mapping[str, Tensor], Mapping[str, Tensor]]:
        """A, B and DoRA's m of every adapter, by name (read them, never write: add_adapter and
        delete_adapter are the way in and out)."""
        return self._by_name

    def adapter_keys(self, names: list[str]) -> list[tuple]:
        """For each adapter, what its output depends on: the identities and versions of A and B (and
        of m and W0 for DoRA) and its scale. Equal keys mean an unchanged adapter as long as the caller
        holds on to the tensors (so that no id is reused); the per-row stack recopies only the others."""
        (a_of, b_of, m_of), specs = self._by_name, self.specs
        w0 = self.weight_2d()._version if m_of else None
        keys = []
        for name in names:
            a, b, m = a_of[name], b_of[name], m_of.get(name)
            key = (id(a), a._version, id(b), b._version, specs[name].scale)
            keys.append(key if m is None else (*key, id(m), m._version, w0))
        return keys

    def extra_repr(self) -> str:
        adapters = ", ".join(
            f"{n}: r={s.r} s={s.scale:g}{' dora' if s.use_dora else ''}" for n, s in self.specs.items()
        )
        return f"adapters=[{adapters}], active={self.active!r}, merged={self.merged!r}"


def autocast_enabled(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4 has no device argument
        return torch.is_autocast_cpu_enabled() if device_type == "cpu" else torch.is_autocast_enabled()


def add_scaled_product(out: Tensor, xa: Tensor, b: Tensor, scale: float) -> Tensor:
    """out + scale · xa @ bᵀ, the scale and the add fused into one GEMM (addmm)."""
    if out.dtype == xa.dtype == b.dtype or autocast_enabled(out.device.type):
        flat = torch.addmm(out.reshape(-1, out.shape[-1]), xa.reshape(-1, xa.shape[-1]), b.t(), alpha=scale)
        return flat.view(out.shape)
    return out + (scale * F.linear(xa, b.to(xa.dtype))).to(out.dtype)
