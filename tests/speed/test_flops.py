"""FLOP counting and MFU arithmetic (what `scripts/benchmark.py` reports on CUDA), checked on CPU by hand counts."""

import pytest
import torch

from sam2_peft.speed.flops import count_flops, matmul_ceiling, matmul_flops, mfu


def test_a_linear_training_step_counts_forward_and_both_backward_matmuls():
    layer = torch.nn.Linear(64, 32)
    inputs = torch.randn(16, 64, requires_grad=True)
    forward = 2 * 16 * 64 * 32  # 16 x 64 @ 64 x 32: a multiply-add per (row, in, out)
    assert count_flops(lambda: layer(inputs)) == forward
    # backward: the input gradient and the weight gradient, one matmul of the same size each
    assert count_flops(lambda: layer(inputs).sum().backward()) == 3 * forward


def test_attention_and_convolution_are_counted():
    query = torch.randn(2, 4, 16, 8)
    # q k^T and attention @ v: two (16 x 8) @ (8 x 16)-sized products per batch and head
    expected = 2 * (2 * 2 * 4 * 16 * 16 * 8)
    assert count_flops(lambda: torch.nn.functional.scaled_dot_product_attention(query, query, query)) == expected
    query.requires_grad_()  # backward: grad of q, k, v and of the attention matrix, 2.5x the forward's products
    assert count_flops(lambda: torch.nn.functional.scaled_dot_product_attention(query, query, query).sum().backward()
                       ) == expected + 5 * expected // 2
    conv = torch.nn.Conv2d(3, 5, kernel_size=1, bias=False)
    assert count_flops(lambda: conv(torch.randn(1, 3, 4, 4))) == 2 * 3 * 5 * 16


def test_mfu_arithmetic():
    assert matmul_flops(8192) == 2 * 8192**3
    # 8 TFLOP in 20 ms on a chip that does 804 TFLOP/s: 400 TFLOP/s reached
    assert mfu(8e12, 0.02, 804e12) == pytest.approx(400 / 804, rel=1e-12)
    with pytest.raises(ValueError, match="positive times"):
        mfu(1.0, 0.0, 1.0)


def test_matmul_ceiling_times_the_products_it_counts(monkeypatch):
    """On the host clock: 5 products of 2 * 64^3 FLOPs in (a mocked) 1 ms."""
    clock = iter([10.0, 10.001])
    monkeypatch.setattr("sam2_peft.speed.flops.time.perf_counter", lambda: next(clock))
    assert matmul_ceiling("cpu", size=64, dtype=torch.float32, repeats=5) == pytest.approx(5 * 2 * 64**3 / 1e-3)
