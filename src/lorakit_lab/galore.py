"""GaLoreAdamW: AdamW whose moments live in a low-rank projection of each matrix's gradient.

GaLore (Zhao et al. 2024, arXiv:2403.03507) keeps every weight full-rank and trainable but
compresses the optimizer: for a matrix W (m x n) with gradient G, every `update_gap` steps it
takes P = the top-`rank` singular vectors of G (left ones if m <= n, right ones otherwise), and
in between

    R = P^T G  (or G P),    Adam moments on R,    W <- W - lr * scale * P N   (or N P^T)

where N is Adam's normalised step for R. Adam's state is rank x n instead of m x n, so memory
drops like LoRA's, yet the subspace moves with the gradient, so the sum of all updates is not
limited to rank `rank` (unlike a LoRA adapter, whose B·A never exceeds it).
Vectors (norms, biases) and parameter groups without "rank" get plain AdamW.
"""

from __future__ import annotations

import math

import torch

from lorakit.errors import LorakitError


class GaLoreAdamW(torch.optim.Optimizer):
    """AdamW; parameter groups holding "rank" (with optional "update_gap", "scale") use GaLore on their matrices."""

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas=(0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        rank: int | None = None,
        update_gap: int = 200,
        scale: float = 0.25,
    ):
        if lr <= 0:
            raise LorakitError(f"GaLoreAdamW lr={lr} is invalid: use a learning rate > 0")
        if rank is not None and (not isinstance(rank, int) or rank < 1):
            raise LorakitError(f"GaLoreAdamW rank={rank!r} is invalid: use an integer >= 1 or None")
        if not isinstance(update_gap, int) or update_gap < 1:
            raise LorakitError(
                f"GaLoreAdamW update_gap={update_gap!r} is invalid: use an integer >= 1 (steps between SVDs)"
            )
        defaults = dict(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, rank=rank, update_gap=update_gap, scale=scale
        )
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad.float()
                state = self.state[p]
                low_rank = group["rank"] is not None and p.dim() == 2 and group["rank"] < min(p.shape)
                if not state:
                    state["step"] = 0
                if low_rank:
                    grad = self._project(p, grad, state, group)
                if "exp_avg" not in state:
                    state["exp_avg"] = torch.zeros_like(grad)
                    state["exp_avg_sq"] = torch.zeros_like(grad)
                state["step"] += 1
                t = state["step"]
                state["exp_avg"].mul_(beta1).add_(grad, alpha=1 - beta1)
                state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                denom = (state["exp_avg_sq"] / (1 - beta2**t)).sqrt_().add_(group["eps"])
                update = (state["exp_avg"] / (1 - beta1**t)) / denom
                if low_rank:
                    update = self._project_back(update, state) * group["scale"]
                if group["weight_decay"]:
                    p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(update.to(p.dtype), alpha=-group["lr"])
        return loss

    @staticmethod
    def _project(p: torch.Tensor, grad: torch.Tensor, state: dict, group: dict) -> torch.Tensor:
        rank = group["rank"]
        left = p.shape[0] <= p.shape[1]  # project the smaller side: state is rank x max(m, n)
        if state["step"] % group["update_gap"] == 0:
            u, _, vh = torch.linalg.svd(grad, full_matrices=False)
            state["projector"] = u[:, :rank].contiguous() if left else vh[:rank].T.contiguous()
            state["left"] = left
        proj = state["projector"]
        return proj.T @ grad if left else grad @ proj

    @staticmethod
    def _project_back(update: torch.Tensor, state: dict) -> torch.Tensor:
        proj = state["projector"]
        return proj @ update if state["left"] else update @ proj.T


def cosine_schedule(step: int, total: int, warmup: int, floor: float = 0.1) -> float:
    """Learning-rate multiplier: linear warm-up, then cosine decay to `floor`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
