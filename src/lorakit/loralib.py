"""A drop-in for Microsoft's loralib: `from lorakit import loralib as lora`.

Same classes, arguments, parameter names and shapes as loralib 0.1.2, so its checkpoints
(`lora.lora_state_dict(model)`) load either way. Each layer is the base layer itself with
`lora_A` (r x k) and `lora_B` (d x r) added, and computes h = W0·x + b + (alpha/r)·B·A·dropout(x).

One deliberate difference: loralib folds B·A into the weight as a side effect of `.eval()`
(`merge_weights=True`). Here merging is explicit (`layer.merge()` / `lora.merge(model)`); the
outputs are the same either way, and `merge_weights` is accepted and ignored.
Conv1d and Conv3d use factor shapes whose product fits the kernel (loralib's do not).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import LorakitError


class LoRALayer:
    """Shared state of the loralib-style layers (a mixin, as in loralib)."""

    def __init__(self, r: int, lora_alpha: float, lora_dropout: float, merge_weights: bool):
        if not isinstance(r, int) or r < 0:
            raise LorakitError(f"r={r!r} is invalid: use an integer >= 0 (0 disables LoRA)")
        self.r = r
        self.lora_alpha = lora_alpha
        self.lora_dropout = nn.Dropout(p=lora_dropout) if lora_dropout > 0 else nn.Identity()
        self.merged = False
        self.merge_weights = merge_weights  # accepted for compatibility; merging is explicit here

    def delta_weight(self) -> Tensor:
        raise NotImplementedError

    def _base_weight(self) -> Tensor:
        return self.weight

    def merge(self) -> None:
        """W0 += s·B·A (idempotent)."""
        if self.r > 0 and not self.merged:
            self._base_weight().data += self.delta_weight()
            self.merged = True

    def unmerge(self) -> None:
        """W0 -= s·B·A (idempotent)."""
        if self.r > 0 and self.merged:
            self._base_weight().data -= self.delta_weight()
            self.merged = False


class Embedding(nn.Embedding, LoRALayer):
    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        r: int = 0,
        lora_alpha: float = 1,
        merge_weights: bool = True,
        **kwargs,
    ):
        nn.Embedding.__init__(self, num_embeddings, embedding_dim, **kwargs)
        LoRALayer.__init__(self, r=r, lora_alpha=lora_alpha, lora_dropout=0, merge_weights=merge_weights)
        if r > 0:
            self.lora_A = nn.Parameter(self.weight.new_zeros((r, num_embeddings)))
            self.lora_B = nn.Parameter(self.weight.new_zeros((embedding_dim, r)))
            self.scaling = self.lora_alpha / self.r
            self.weight.requires_grad = False
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.Embedding.reset_parameters(self)
        if hasattr(self, "lora_A"):
            nn.init.zeros_(self.lora_A)
            nn.init.normal_(self.lora_B)

    def delta_weight(self) -> Tensor:
        return (self.lora_B @ self.lora_A).T * self.scaling

    def forward(self, x: Tensor) -> Tensor:
        result = nn.Embedding.forward(self, x)
        if self.r == 0 or self.merged:
            return result
        after_a = F.embedding(
            x, self.lora_A.T, self.padding_idx, self.max_norm, self.norm_type, self.scale_grad_by_freq, self.sparse
        )
        return result + (after_a @ self.lora_B.T) * self.scaling


class _FactoredLinear(nn.Linear, LoRALayer):
    """What loralib's Linear and MergedLinear share: a Linear (weight optionally stored transposed)
    with factors A (rows x k) and B (cols x r) initialised as nn.Linear's weight and zero."""

    def _setup(
        self,
        r: int,
        lora_alpha: float,
        lora_dropout: float,
        merge_weights: bool,
        fan_in_fan_out: bool,
        a_shape: tuple[int, int] | None,
        b_shape: tuple[int, int] | None,
    ) -> None:
        LoRALayer.__init__(self, r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, merge_weights=merge_weights)
        self.fan_in_fan_out = fan_in_fan_out
        if a_shape is not None:
            self.lora_A = nn.Parameter(self.weight.new_zeros(a_shape))
            self.lora_B = nn.Parameter(self.weight.new_zeros(b_shape))
            self.scaling = self.lora_alpha / self.r
            self.weight.requires_grad = False
        self.reset_parameters()
        if fan_in_fan_out:
            self.weight.data = self.weight.data.T

    def reset_parameters(self) -> None:
        nn.Linear.reset_parameters(self)
        if hasattr(self, "lora_A"):
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B)

    def _t(self, w: Tensor) -> Tensor:
        return w.T if self.fan_in_fan_out else w


class Linear(_FactoredLinear):
    def __init__(
        self,
        in_features: int,
        out_features: int,
        r: int = 0,
        lora_alpha: float = 1,
        lora_dropout: float = 0.0,
        fan_in_fan_out: bool = False,
        merge_weights: bool = True,
        **kwargs,
    ):
        nn.Linear.__init__(self, in_features, out_features, **kwargs)
        shapes = ((r, in_features), (out_features, r)) if r > 0 else (None, None)
        self._setup(r, lora_alpha, lora_dropout, merge_weights, fan_in_fan_out, *shapes)

    def delta_weight(self) -> Tensor:
        return self._t(self.lora_B @ self.lora_A) * self.scaling

    def forward(self, x: Tensor) -> Tensor:
        result = F.linear(x, self._t(self.weight), bias=self.bias)
        if self.r == 0 or self.merged:
            return result
        return result + (self.lora_dropout(x) @ self.lora_A.T @ self.lora_B.T) * self.scaling


class MergedLinear(_FactoredLinear):
    """A fused projection (e.g. qkv) where only the slices with enable_lora[i] = True are adapted."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        r: int = 0,
        lora_alpha: float = 1,
        lora_dropout: float = 0.0,
        enable_lora: list[bool] = (False,),
        fan_in_fan_out: bool = False,
        merge_weights: bool = True,
        **kwargs,
    ):
        nn.Linear.__init__(self, in_features, out_features, **kwargs)
        if out_features % len(enable_lora) != 0:
            raise LorakitError(f"len(enable_lora)={len(enable_lora)} must divide out_features={out_features}")
        self.enable_lora = list(enable_lora)
        n_on = sum(self.enable_lora)
        shapes = (None, None)
        if r > 0 and n_on:
            shapes = ((r * n_on, in_features), (out_features // len(enable_lora) * n_on, r))
            lora_ind = torch.zeros(len(enable_lora), out_features // len(enable_lora), dtype=torch.bool)
            lora_ind[torch.tensor(self.enable_lora)] = True
            self.register_buffer("lora_ind", lora_ind.view(-1), persistent=False)
        self._setup(r, lora_alpha, lora_dropout, merge_weights, fan_in_fan_out, *shapes)

    def _active(self) -> bool:
        return self.r > 0 and any(self.enable_lora)

    def merge_AB(self) -> Tensor:  # noqa: N802 (loralib's name)
        """Block-diagonal B_i·A_i for the enabled slices, zero rows for the others (d x k)."""
        n_on = sum(self.enable_lora)
        blocks = [b @ a for b, a in zip(self.lora_B.chunk(n_on, dim=0), self.lora_A.chunk(n_on, dim=0))]
        delta = self.lora_B.new_zeros((len(self.lora_ind), self.in_features))
        delta[self.lora_ind] = torch.cat(blocks, dim=0)
        return self._t(delta)

    def delta_weight(self) -> Tensor:
        return self.merge_AB() * self.scaling

    def merge(self) -> None:
        if self._active():
            LoRALayer.merge(self)

    def unmerge(self) -> None:
        if self._active():
            LoRALayer.unmerge(self)

    def forward(self, x: Tensor) -> Tensor:
        result = F.linear(x, self._t(self.weight), bias=self.bias)
        if not self._active() or self.merged:
            return result
        return result + self.lora_dropout(x) @ self._t(self.merge_AB()).T * self.scaling


class ConvLoRA(nn.Module, LoRALayer):
    """conv(x, W0 + s·(B·A).view(W0.shape)); the base conv sits in `self.conv`, as in loralib."""

    def __init__(
        self,
        conv_module: type,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        r: int = 0,
        lora_alpha: float = 1,
        lora_dropout: float = 0.0,
        merge_weights: bool = True,
        **kwargs,
    ):
        nn.Module.__init__(self)
        self.conv = conv_module(in_channels, out_channels, kernel_size, **kwargs)
        LoRALayer.__init__(self, r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, merge_weights=merge_weights)
        if not isinstance(kernel_size, int):
            raise LorakitError(f"kernel_size={kernel_size!r}: loralib's ConvLoRA takes one integer kernel size")
        if r > 0:
            dims = self.conv.weight.dim() - 2
            k_out, k_in = kernel_size ** (dims // 2), kernel_size ** (dims - dims // 2)
            self.lora_A = nn.Parameter(self.conv.weight.new_zeros((r * k_out, in_channels // self.conv.groups * k_in)))
            self.lora_B = nn.Parameter(self.conv.weight.new_zeros((out_channels * k_out, r * k_out)))
            self.scaling = self.lora_alpha / self.r
            self.conv.weight.requires_grad = False
        self.reset_parameters()

    def reset_parameters(self) -> None:
        self.conv.reset_parameters()
        if hasattr(self, "lora_A"):
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B)

    def _base_weight(self) -> Tensor:
        return self.conv.weight

    def delta_weight(self) -> Tensor:
        return (self.lora_B @ self.lora_A).view(self.conv.weight.shape) * self.scaling

    def forward(self, x: Tensor) -> Tensor:
        if self.r == 0 or self.merged:
            return self.conv(x)
        return self.conv._conv_forward(self.lora_dropout(x), self.conv.weight + self.delta_weight(), self.conv.bias)


class Conv1d(ConvLoRA):
    def __init__(self, *args, **kwargs):
        super().__init__(nn.Conv1d, *args, **kwargs)


class Conv2d(ConvLoRA):
    def __init__(self, *args, **kwargs):
        super().__init__(nn.Conv2d, *args, **kwargs)


class Conv3d(ConvLoRA):
    def __init__(self, *args, **kwargs):
        super().__init__(nn.Conv3d, *args, **kwargs)


_BIASES = ("none", "all", "lora_only")


def _check_bias(bias: str) -> None:
    if bias not in _BIASES:
        raise LorakitError(f"bias={bias!r} is invalid: choose one of {', '.join(_BIASES)}")


def mark_only_lora_as_trainable(model: nn.Module, bias: str = "none") -> None:
    """Freeze every parameter whose name lacks 'lora_', then unfreeze biases as asked."""
    _check_bias(bias)
    for name, param in model.named_parameters():
        param.requires_grad = "lora_" in name
    if bias == "all":
        for name, param in model.named_parameters():
            if "bias" in name:
                param.requires_grad = True
    elif bias == "lora_only":
        for module in model.modules():
            if isinstance(module, LoRALayer) and getattr(module, "bias", None) is not None:
                module.bias.requires_grad = True


def lora_state_dict(model: nn.Module, bias: str = "none") -> dict[str, Tensor]:
    """Only the LoRA tensors (and biases as asked): what a LoRA checkpoint needs."""
    _check_bias(bias)
    state = model.state_dict()
    if bias == "none":
        return {k: v for k, v in state.items() if "lora_" in k}
    if bias == "all":
        return {k: v for k, v in state.items() if "lora_" in k or "bias" in k}
    result = {}
    for key, value in state.items():
        if "lora_" in key:
            result[key] = value
            bias_name = key.split("lora_")[0] + "bias"
            if bias_name in state:
                result[bias_name] = state[bias_name]
    return result


def merge(model: nn.Module) -> None:
    """Merge every loralib-style layer in `model` (explicit replacement for loralib's eval() merge)."""
    for module in model.modules():
        if isinstance(module, LoRALayer):
            module.merge()


def unmerge(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, LoRALayer):
            module.unmerge()
