"""The output head and cross-entropy fused, in chunks of rows, on the target positions only.

For hidden states h (N x H, one row per position that has a target), head weight W (V x H),
bias b and targets t:

    z_i    = W h_i + b                              (one row of logits, never all N at once)
    loss   = sum_i  logsumexp(z_i) - z_i[t_i]
    dz_i   = softmax(z_i) - onehot(t_i)             (d loss / d z_i)
    dh_i   = W^T dz_i,   dW = sum_i dz_i h_i^T,   db = sum_i dz_i

The rows are processed `chunk` at a time and the gradients are formed in the same pass (while
the chunk's logits are at hand), so the peak extra memory is one chunk of logits instead of
N x V logits, their fp32 copy, their softmax and its gradient. The result equals
F.cross_entropy(F.linear(h, W, b).float(), t, reduction="sum") and its gradients (tests check
both against that plain computation). Logits are formed in the head's dtype (as the model would),
the softmax and the loss in fp32; a head stored in bf16 gets its input in bf16, as the model's own
forward (under autocast) would give it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

CHUNK_ELEMENTS = 1 << 23  # logits per chunk (8M floats, 32 MB): big enough for a fast GEMM, small beside activations


def default_chunk(vocab: int) -> int:
    return max(1, CHUNK_ELEMENTS // max(1, vocab))


def _chunked(hidden, weight, bias, targets, chunk, want):
    """(loss sum, correct count, grads wanted by `want` = (hidden, weight, bias)) over row chunks."""
    loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
    correct = torch.zeros((), dtype=torch.long, device=hidden.device)
    grad_h = torch.empty_like(hidden) if want[0] else None
    grad_w = torch.zeros_like(weight, dtype=torch.float32) if want[1] else None
    grad_b = torch.zeros_like(bias, dtype=torch.float32) if want[2] else None
    for start in range(0, hidden.shape[0], chunk):
        h, t = hidden[start : start + chunk], targets[start : start + chunk]
        logits = F.linear(h.to(weight.dtype), weight, bias)  # a bf16 head sees bf16 input, as under autocast
        z = logits.float()
        lse = torch.logsumexp(z, dim=-1)
        picked = z.gather(1, t[:, None]).squeeze(1)
        loss += (lse - picked).sum()
        correct += (z.argmax(-1) == t).sum()
        if not any(want):
            continue
        dz = z.sub_(lse[:, None]).exp_()  # softmax, in place of the fp32 logits
        dz[torch.arange(len(t), device=t.device), t] -= 1.0
        dz = dz.to(logits.dtype)
        if grad_h is not None:
            grad_h[start : start + chunk] = dz @ weight
        if grad_w is not None:
            grad_w.addmm_(dz.t().float(), h.float())
        if grad_b is not None:
            grad_b += dz.float().sum(0)
    return loss, correct, grad_h, grad_w, grad_b


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk):
        want = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[2])
        loss, correct, grad_h, grad_w, grad_b = _chunked(hidden, weight, bias, targets, chunk, want)
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        ctx.mark_non_differentiable(correct)
        return loss, correct

    @staticmethod
    def backward(ctx, grad_loss, _grad_correct):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        scale = grad_loss
        return (
            None if grad_h is None else grad_h * scale.to(grad_h.dtype),
            None if grad_w is None else (grad_w * scale).to(ctx.dtypes[0]),
            None if grad_b is None else (grad_b * scale).to(ctx.dtypes[1]),
            None,
            None,
        )


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    chunk: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of cross-entropy losses, number of argmax hits) of the head (weight, bias) on `hidden` rows.

    hidden: N x H, one row per target; targets: N class indices (no ignore index: select rows first).
    """
    chunk = chunk or default_chunk(weight.shape[0])
    if not torch.is_grad_enabled() or not (hidden.requires_grad or weight.requires_grad or _needs(bias)):
        loss, correct, *_ = _chunked(hidden, weight, bias, targets, chunk, (False, False, False))
        return loss, correct
    return _LinearCrossEntropy.apply(hidden, weight, bias, targets, chunk)


def _needs(bias: torch.Tensor | None) -> bool:
    return bias is not None and bias.requires_grad
