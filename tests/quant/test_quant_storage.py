"""Int4Weight, Int8Weight, HalfWeight and the compute plan, against formulas written out here."""

from __future__ import annotations

import logging
import math

import pytest
import torch

from lorakit.errors import LorakitError
from lorakit.quant import ComputePlan, HalfWeight, Int4Weight, Int8Weight, compute, plan, set_plan
from lorakit.quant.int4 import kernel_layout


@pytest.fixture
def restore_plan():
    old = set_plan(None)
    yield
    set_plan(old)


def reference_int4(codes, scale, zero):
    """W = (q - 8)·s + z per group of 32, s and z rounded to bf16 as stored."""
    s, z = scale.bfloat16().float(), zero.bfloat16().float()
    return ((codes.float() - 8).view(codes.shape[0], -1, 32) * s[..., None] + z[..., None]).reshape(codes.shape)


@pytest.mark.parametrize("rows", [16, 48, 64, 176])  # whole blocks and tails of every kernel layout
def test_int4_codes_round_trip_through_the_kernel_layout(rows):
    g = torch.Generator().manual_seed(rows)
    codes = torch.randint(0, 16, (rows, 96), generator=g, dtype=torch.uint8)
    scale = torch.rand(rows, 3, generator=g) * 0.1
    zero = torch.randn(rows, 3, generator=g) * 0.1
    weight = Int4Weight.from_codes(codes, scale, zero)
    assert torch.equal(weight.codes_t().t(), codes)
    torch.testing.assert_close(weight.dequantize(), reference_int4(codes, scale, zero), rtol=0, atol=0)
    assert weight.kernel == (kernel_layout() is not None)


def test_int4_quantize_is_round_to_nearest_on_each_group():
    weight = torch.randn(64, 128, generator=torch.Generator().manual_seed(0))
    stored = Int4Weight.quantize(weight)
    back = stored.dequantize()
    groups = weight.view(64, 4, 32)
    step = (groups.amax(-1) - groups.amin(-1)) / 15
    error = (back - weight).abs().view(64, 4, 32).amax(-1)
    assert (error <= 0.5 * step * 1.02 + 1e-6).all()  # half a step (2% for the bf16 scale)
    assert stored.nbytes() == 64 * 128 // 2 + 64 * 4 * 4  # 4 bits + (s, z) in bf16 per 32


def test_int4_kernel_matches_the_dequantized_matmul():
    if kernel_layout() is None:
        pytest.skip("this torch build has no CPU int4 kernel layout lorakit knows")
    weight = Int4Weight.quantize(torch.randn(96, 64, generator=torch.Generator().manual_seed(1)))
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(2))
    expected = x @ weight.dequantize().t()
    torch.testing.assert_close(weight.kernel_matmul(x), expected, atol=0.02 * expected.abs().max().item(), rtol=0)


def test_int8_is_one_scale_per_row_and_rows_look_up_without_the_table():
    weight = torch.randn(40, 24, generator=torch.Generator().manual_seed(3))
    stored = Int8Weight.quantize(weight)
    scale = weight.abs().amax(1) / 127
    expected = torch.round(weight / scale[:, None]) * scale[:, None]
    torch.testing.assert_close(stored.dequantize(), expected)
    ids = torch.tensor([[3, 0], [39, 3]])
    torch.testing.assert_close(stored.rows(ids), expected[ids])
    x = torch.randn(3, 24)
    reference = x @ expected.t()
    torch.testing.assert_close(stored.kernel_matmul(x), reference, atol=0.02 * reference.abs().max().item(), rtol=0)


def test_half_storage_is_exact_bf16():
    weight = torch.randn(8, 16)
    stored = HalfWeight.quantize(weight)
    assert stored.weight.dtype == torch.bfloat16 and stored.kind == "bf16"
    torch.testing.assert_close(stored.dequantize(), weight.bfloat16().float(), rtol=0, atol=0)


def test_plan_follows_the_cpu_and_is_logged(restore_plan, caplog, monkeypatch):
    monkeypatch.delenv("LORAKIT_KERNEL_ROWS", raising=False)
    with caplog.at_level(logging.INFO, logger="lorakit.quant"):
        chosen = plan()
    assert "quantized base compute path" in caplog.text and chosen.capability in caplog.text
    native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    assert chosen.native_bf16 == native
    bf16 = HalfWeight.quantize(torch.randn(4, 4))
    # storage is not compute: without native bf16 a batch never runs a bf16 GEMM
    assert compute.use_kernel(bf16, 64, torch.device("cpu")) == native
    assert chosen.kernel_rows["int4"] in (0, compute.KERNEL_ROWS)


def test_pinned_plan_and_its_errors(restore_plan, monkeypatch):
    monkeypatch.setenv("LORAKIT_KERNEL_ROWS", "int4=4,bf16=inf")
    chosen = plan()
    assert chosen.kernel_rows["int4"] == 4 and math.isinf(chosen.kernel_rows["bf16"])
    assert chosen.source == "LORAKIT_KERNEL_ROWS"
    set_plan(None)
    monkeypatch.setenv("LORAKIT_KERNEL_ROWS", "int3=4")
    with pytest.raises(LorakitError, match="LORAKIT_KERNEL_ROWS='int3=4' is invalid"):
        plan()


def test_no_kernels_plan_runs_every_size_dequantized(restore_plan):
    set_plan(ComputePlan("test", {}))
    stored = Int4Weight.quantize(torch.randn(32, 32))
    assert not compute.use_kernel(stored, 1, torch.device("cpu"))


@pytest.mark.parametrize("k", [8, 24, 40, 576])
def test_int8_kernel_is_right_for_every_width(k):
    """torch's AVX-512 int8 kernel is wrong for K % 16 != 0: those widths must not reach it."""
    weight = torch.randn(64, k, generator=torch.Generator().manual_seed(k))
    stored = Int8Weight.quantize(weight)
    x = torch.randn(3, k, generator=torch.Generator().manual_seed(1))
    reference = x.bfloat16().float() @ stored.dequantize().t()
    torch.testing.assert_close(stored.kernel_matmul(x), reference, atol=0.02 * reference.abs().max().item(), rtol=0)
    assert stored.has_kernel == (k % 16 == 0)
