"""GaLoreAdamW against torch's AdamW and against the projection written out by hand."""

import pytest
import torch

from lorakit import LorakitError
from lorakit_lab.galore import GaLoreAdamW, cosine_schedule


def _train(opt_factory, steps=5):
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(6, 10))
    b = torch.nn.Parameter(torch.randn(6))
    opt = opt_factory([w, b])
    x = torch.randn(32, 10)
    for _ in range(steps):
        loss = ((x @ w.T + b).tanh() ** 2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
    return w.detach(), b.detach()


def test_without_projection_it_is_adamw():
    ref = _train(lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1))
    ours = _train(lambda p: GaLoreAdamW(p, lr=1e-2, weight_decay=0.1, rank=None))
    full_rank = _train(lambda p: GaLoreAdamW(p, lr=1e-2, weight_decay=0.1, rank=6))  # rank >= min(m, n): no projection
    for a, b in ((ref, ours), (ref, full_rank)):
        torch.testing.assert_close(a[0], b[0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(a[1], b[1], rtol=1e-5, atol=1e-6)


def test_first_step_is_the_projected_sign_update():
    torch.manual_seed(1)
    w = torch.nn.Parameter(torch.randn(8, 20))
    w0 = w.detach().clone()
    grad = torch.randn(8, 20)
    w.grad = grad.clone()
    GaLoreAdamW([w], lr=0.1, rank=3, scale=0.5, eps=0.0).step()
    u = torch.linalg.svd(grad, full_matrices=False)[0][:, :3]  # m <= n: left singular vectors
    r = u.T @ grad
    # Adam's first normalised step is m/sqrt(v) = sign(r); projected back and scaled
    expected = w0 - 0.1 * 0.5 * (u @ torch.sign(r))
    torch.testing.assert_close(w.detach(), expected, rtol=1e-5, atol=1e-6)
    assert torch.linalg.matrix_rank(w.detach() - w0) == 3


def test_state_is_low_rank_and_bad_arguments_fail():
    w = torch.nn.Parameter(torch.randn(40, 30))
    w.grad = torch.randn(40, 30)
    opt = GaLoreAdamW([w], rank=4)
    opt.step()
    assert opt.state[w]["exp_avg"].shape == (40, 4)  # m > n: right projection, state m x rank
    with pytest.raises(LorakitError, match="rank"):
        GaLoreAdamW([w], rank=0)
    with pytest.raises(LorakitError, match="update_gap"):
        GaLoreAdamW([w], rank=2, update_gap=0)


def test_cosine_schedule():
    assert cosine_schedule(0, 100, 10) == pytest.approx(0.1)
    assert cosine_schedule(9, 100, 10) == pytest.approx(1.0)
    assert cosine_schedule(99, 100, 10) == pytest.approx(0.1, abs=1e-3)
