"""Layers computed from their weights as GEMMs on the layout at hand, where oneDNN's kernels are slow or copy.

    pointwise_conv(conv, maps)                            # a 1x1 nn.Conv2d as one matrix product
    tokens = sub_pixel_order(maps, level=1)               # (B, C, 2h, 2w) -> (B, 4hw, C), each pixel's 2x2 children together
    tokens = transposed_conv_2x2(upscale, tokens, 1, grid)  # a 2x2 ConvTranspose2d on such tokens: one GEMM, level 2 out

Each computes exactly what the module computes when the module is plain (`is_plain`); any other module (an adapter
wrapped around it, one with hooks) is called as it is, on the layout it expects.

Sub-pixel order at level L of a grid of h x w tokens: pixel (row, col) of the (2^L h, 2^L w) map is token
(i, j, a_1, b_1, ..., a_L, b_L) with row = 2^L i + 2^(L-1) a_1 + ... + a_L (col likewise with j and the b's),
flattened in that order. Level 0 is the plain row-major token grid.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.edgetam.modeling_edgetam import EdgeTamLayerNorm
from transformers.models.sam2.modeling_sam2 import Sam2LayerNorm
from transformers.models.sam3_tracker.modeling_sam3_tracker import Sam3TrackerLayerNorm

# The mask decoders' channels-first layer norm: one class per family member, generated from Sam2's with the same code.
CHANNEL_LAYER_NORMS = (Sam2LayerNorm, Sam3TrackerLayerNorm, EdgeTamLayerNorm)


def has_hooks(module: nn.Module) -> bool:
    """Whether `module` has hooks of its own: PyTorch's (forward or backward; FSDP2's units have them) or an
    accelerate hook (device placement, offloading), which wraps its `forward`."""
    torch_hooks = module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
    return bool(torch_hooks or module._backward_pre_hooks or getattr(module, "_hf_hook", None) is not None)


def is_plain(module: nn.Module, cls: type | tuple[type, ...]) -> bool:
    """`module` is exactly a `cls` (or one of the classes) and has no hooks, so computing its function from its weights
    gives what calling it would. An adapter wrapped around it, or a hook, must run: such modules are called instead."""
    return type(module) in (cls if isinstance(cls, tuple) else (cls,)) and not has_hooks(module)


def pointwise_conv(conv: nn.Module, features: torch.Tensor) -> torch.Tensor:
    """`conv(features)`, computed as a matrix product over channels when `conv` is a plain 1x1 `nn.Conv2d`.

    On CPU, oneDNN's 1x1 convolution backward takes about three times as long as the equivalent GEMM, and it
    allocates a full-size copy of the incoming gradient (64 MB for the neck's 256-channel S/4 level at 1024 px).
    Channels-first maps go through `baddbmm`; channels-last ones (the neck's S/8 and S/16 inputs: Hiera's
    (B, H, W, C) tokens, permuted) through `F.linear` on their (B, H, W, C) view, so neither input is copied, and
    the output keeps the input's layout. A convolution that is not plain (see `is_plain`) is called.
    """
    plain = is_plain(conv, nn.Conv2d) and conv.kernel_size == conv.stride == (1, 1) and conv.padding == (0, 0)
    if not plain or conv.groups != 1:
        return conv(features)
    weight = conv.weight.flatten(1)  # (out, in)
    if not features.is_contiguous() and features.is_contiguous(memory_format=torch.channels_last):
        return F.linear(features.permute(0, 2, 3, 1), weight, conv.bias).permute(0, 3, 1, 2)
    batch, channels, height, width = features.shape
    flat = features.flatten(2)
    weight = weight.unsqueeze(0).expand(batch, -1, -1)
    out = torch.bmm(weight, flat) if conv.bias is None else torch.baddbmm(conv.bias.view(1, -1, 1), weight, flat)
    return out.view(batch, conv.out_channels, height, width)


def sub_pixel_order(maps: torch.Tensor, level: int) -> torch.Tensor:
    """(B, C, 2^L h, 2^L w) maps -> (B, h * w * 4^L, C) tokens in sub-pixel order (a copy, unless L = 0 and the
    maps are channels-last)."""
    batch, channels, height, width = maps.shape
    h, w = height >> level, width >> level
    # (B, C, h, a_1..a_L, w, b_1..b_L) -> (B, h, w, a_1, b_1, ..., a_L, b_L, C)
    split = maps.reshape(batch, channels, h, *[2] * level, w, *[2] * level)
    rows, cols = list(range(3, 3 + level)), list(range(4 + level, 4 + 2 * level))
    interleaved = [axis for pair in zip(rows, cols) for axis in pair]
    return split.permute(0, 2, 3 + level, *interleaved, 1).reshape(batch, h * w * 4**level, channels)


def from_sub_pixel_order(tokens: torch.Tensor, level: int, grid: tuple[int, int]) -> torch.Tensor:
    """The inverse of `sub_pixel_order`: (B, h * w * 4^L, C) tokens -> (B, C, 2^L h, 2^L w) maps."""
    batch, _, channels = tokens.shape
    h, w = grid
    split = tokens.reshape(batch, h, w, *[2] * (2 * level), channels)
    rows, cols = list(range(3, 3 + 2 * level, 2)), list(range(4, 4 + 2 * level, 2))
    maps = split.permute(0, 3 + 2 * level, 1, *rows, 2, *cols)
    return maps.reshape(batch, channels, h << level, w << level)


def transposed_conv_2x2(conv: nn.Module, tokens: torch.Tensor, level: int, grid: tuple[int, int]) -> torch.Tensor:
    """`conv`, a `ConvTranspose2d(kernel_size=2, stride=2)`, on level-L sub-pixel tokens; level L + 1 tokens out.

    Each input token's output is its 2x2 children, which in sub-pixel order follow each other: one GEMM,
    (N, R, C_in) @ (C_in, 2 * 2 * C_out), viewed as (N, 4R, C_out). A convolution that is not plain is called on
    the reordered map.
    """
    plain = is_plain(conv, nn.ConvTranspose2d) and conv.kernel_size == conv.stride == (2, 2)
    plain = plain and conv.padding == (0, 0) and conv.output_padding == (0, 0) and conv.dilation == (1, 1)
    if not plain or conv.groups != 1:
        return sub_pixel_order(conv(from_sub_pixel_order(tokens, level, grid)), level + 1)
    batch, rows, _ = tokens.shape
    out_channels = conv.out_channels
    # (C_in, C_out, a, b) -> (a, b, C_out, C_in): output features ordered (a, b, C_out), as sub-pixel order needs
    weight = conv.weight.permute(2, 3, 1, 0).reshape(4 * out_channels, conv.in_channels)
    bias = None if conv.bias is None else conv.bias.repeat(4)
    return F.linear(tokens, weight, bias).view(batch, 4 * rows, out_channels)


def channel_norm(norm: nn.Module, tokens: torch.Tensor, level: int, grid: tuple[int, int]) -> torch.Tensor:
    """`norm`, a channels-first `Sam2LayerNorm` (or a family copy), on (N, R, C) tokens: a layer norm over their last
    axis."""
    if not is_plain(norm, CHANNEL_LAYER_NORMS):
        return sub_pixel_order(norm(from_sub_pixel_order(tokens, level, grid)), level)
    return F.layer_norm(tokens, norm.normalized_shape, norm.weight, norm.bias, norm.eps)
