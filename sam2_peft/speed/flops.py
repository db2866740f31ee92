"""FLOPs per training step, the chip's matmul ceiling, and the model FLOPs utilisation (MFU) between them.

    flops = count_flops(lambda: step(batch))          # FlopCounterMode over one eager step (forward + backward)
    ceiling = matmul_ceiling("cuda")                   # FLOP/s of a big bf16 matmul, timed with CUDA events
    utilisation = mfu(flops, seconds_per_step, ceiling)

`FlopCounterMode` counts the matmuls, convolutions and attention products it sees dispatched (2 FLOPs per
multiply-add, backward included when the step runs it): run it over an eager step (compiled kernels are not
dispatched op by op). `scripts/benchmark.py` reports MFU this way on CUDA.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count


def _cpu_attention(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query, key, value)


def _cpu_attention_backward(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out, query, key, value)


# FlopCounterMode knows the CUDA attention kernels (flash, memory-efficient, cuDNN) but not the CPU one
# `F.scaled_dot_product_attention` dispatches to (torch 2.14): the same formulas, for CPU runs of the count.
CPU_ATTENTION = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_attention_backward,
}


def count_flops(step: Callable[[], object]) -> int:
    """The FLOPs `step()` dispatches (matmuls, convolutions, attention), forward and backward."""
    with FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION) as counter:
        step()
    return counter.get_total_flops()


def matmul_ceiling(
    device: torch.device | str, size: int = 8192, dtype: torch.dtype = torch.bfloat16, repeats: int = 20
) -> float:
    """FLOP/s of a (size x size) @ (size x size) matmul in `dtype`: what the chip reaches at best, in practice.

    On CUDA the matmuls are timed with CUDA events after a warm-up (no host time in the measure); elsewhere with
    the host clock.
    """
    device = torch.device(device)
    left = torch.randn(size, size, device=device, dtype=dtype)
    right = torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(3):  # warm-up: kernel selection, clocks
        torch.mm(left, right)
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(repeats):
            torch.mm(left, right)
        end.record()
        end.synchronize()
        seconds = start.elapsed_time(end) / 1e3  # elapsed_time is in milliseconds
    else:
        begin = time.perf_counter()
        for _ in range(repeats):
            torch.mm(left, right)
        seconds = time.perf_counter() - begin
    return matmul_flops(size) * repeats / seconds


def matmul_flops(size: int) -> int:
    """FLOPs of one square matmul: size^3 multiply-adds, 2 FLOPs each."""
    return 2 * size**3


def mfu(flops_per_step: float, seconds_per_step: float, ceiling: float) -> float:
    """The fraction of `ceiling` (FLOP/s) that `flops_per_step` in `seconds_per_step` reaches."""
    if seconds_per_step <= 0 or ceiling <= 0:
        raise ValueError(f"mfu needs positive times and ceilings, got {seconds_per_step} s and {ceiling} FLOP/s.")
    return flops_per_step / seconds_per_step / ceiling
