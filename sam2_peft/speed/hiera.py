"""A Hiera block with fused attention on its windows (`cuda`): `Sam2MultiScaleBlock.forward`, minus a dead product.

    hidden = hiera_block(block, hidden)          # (B, H, W, C) -> (B, H', W', C'), as block(hidden)

transformers' `Sam2MultiScaleAttention.forward` (5.25) computes `softmax(q k^T)` in float32 and then throws it away
before calling the attention interface, which computes it again: a full attention matrix per window (per image at
the global blocks) for nothing. `hiera_block` follows `Sam2MultiScaleBlock.forward` with the attention as one
`F.scaled_dot_product_attention` (flash or memory-efficient kernels on CUDA) on the (windows, heads, tokens, dim)
layout. The block's submodules (norms, `qkv`, `proj`, the MLP, PEFT adapter layers inside them) are called as
modules, so their hooks run; the block and its `attn` are not, so a block with hooks of its own runs as it is
(`fuses`). Outputs and gradients equal the block's up to float rounding (tests/speed/test_hiera.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.sam2.modeling_sam2 import (
    Sam2MultiScaleBlock,
    do_pool,
    window_partition,
    window_unpartition,
)

from sam2_peft.speed.layers import has_hooks


def fuses(block: nn.Module) -> bool:
    """Whether `hiera_block` computes `block(hidden)`: a Hiera block whose own and whose attention's hooks are none."""
    return isinstance(block, Sam2MultiScaleBlock) and not has_hooks(block) and not has_hooks(block.attn)


def window_attention(attention: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """`Sam2MultiScaleAttention.forward` through `F.scaled_dot_product_attention`: (W, h, w, C) windows in,
    (W, h', w', C') out (h' = h / query stride)."""
    windows, height, width, _ = hidden.shape
    heads = attention.num_attention_heads
    qkv = attention.qkv(hidden).reshape(windows, height * width, 3, heads, -1)
    query, key, value = torch.unbind(qkv, 2)  # (W, hw, heads, D) each
    if attention.query_stride:
        query = do_pool(query.reshape(windows, height, width, -1), attention.query_stride)
        height, width = query.shape[1:3]
        query = query.reshape(windows, height * width, heads, -1)
    attended = F.scaled_dot_product_attention(
        query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), scale=attention.scale
    )  # (W, heads, h'w', D)
    return attention.proj(attended.transpose(1, 2).reshape(windows, height, width, -1))


def hiera_block(block: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """`Sam2MultiScaleBlock.forward(hidden)` with `window_attention`: (B, H, W, C) -> (B, H', W', C')."""
    residual = hidden
    hidden = block.layer_norm1(hidden)
    if block.dim != block.dim_out:  # stage change: the residual is projected and pooled to the new width
        residual = do_pool(block.proj(hidden), block.query_stride)
    window_size = block.window_size
    height, width = hidden.shape[1:3]
    if window_size > 0:
        hidden, padded = window_partition(hidden, window_size)  # (B * windows, window, window, C)
    hidden = window_attention(block.attn, hidden)
    if block.query_stride:
        window_size = block.window_size // block.query_stride[0]
        height, width = residual.shape[1:3]
        padded = (height + (-height) % window_size, width + (-width) % window_size)
    if block.window_size > 0:
        hidden = window_unpartition(hidden, window_size, padded, (height, width))
    hidden = residual + hidden
    return hidden + block.mlp(block.layer_norm2(hidden))
