"""SAM2's mask decoder on token layouts: `Sam2MaskDecoder.forward` for one prompt set per object, without its copies.

    images = decoder_images(sam, feat_s0, feat_s1, embeddings)        # once per image: (B, P, C) tokens
    masks, iou_scores, object_score_logits = decode_masks(sam, *images, image_index, sparse, dense, grid=(64, 64))

transformers' decoder takes (N, C, H, W) maps. Its two-way transformer reads them as (N, H * W, C) tokens through
a transposed view, so each image-side projection starts with a transposing copy and each residual add mixes two
layouts; its 2x2 transposed convolutions go through oneDNN, whose backward is slow on CPU; and the GELU before the
mask product gets a transposed gradient, which triples the time of its backward. `decode_masks` runs the same modules
on contiguous tokens, computes each transposed convolution as one GEMM whose output stays in *sub-pixel order* (the
2x2 children of each input pixel next to each other, so no pixel shuffle is ever copied), adds the high-resolution
features in that order, and reorders only the masks themselves (objects x masks x pixels, not objects x 32 channels
x pixels). Outputs and gradients are those of `Sam2MaskDecoder.forward` up to float rounding
(tests/test_mask_decoder.py). At hiera-tiny, 1024 px, a cached decoder-strategy step with 4 objects takes 0.66
instead of 1.0 s on 2 CPU cores.

Sub-pixel order at level L of a grid of h x w tokens: pixel (row, col) of the (2^L h, 2^L w) map is token
(i, j, a_1, b_1, ..., a_L, b_L) with row = 2^L i + 2^(L-1) a_1 + ... + a_L (col likewise with j and the b's), flattened
in that order. Level 0 is the plain row-major token grid.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.sam2.modeling_sam2 import Sam2LayerNorm


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


def _is_plain(module: nn.Module, cls: type) -> bool:
    """`module` is exactly `cls` with no hooks of its own, so computing its function from its weights is safe (an
    adapter wrapped around it, or accelerate's device hooks, must run: those modules are called instead)."""
    return type(module) is cls and not module._forward_hooks and not module._forward_pre_hooks


def transposed_conv_2x2(conv: nn.Module, tokens: torch.Tensor, level: int, grid: tuple[int, int]) -> torch.Tensor:
    """`conv`, a `ConvTranspose2d(kernel_size=2, stride=2)`, on level-L sub-pixel tokens; level L + 1 tokens out.

    Each input token's output is its 2x2 children, which in sub-pixel order follow each other: one GEMM,
    (N, R, C_in) @ (C_in, 2 * 2 * C_out), viewed as (N, 4R, C_out). A convolution that is not plain is called on
    the reordered map.
    """
    plain = _is_plain(conv, nn.ConvTranspose2d) and conv.kernel_size == conv.stride == (2, 2)
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
    """`norm`, a channels-first `Sam2LayerNorm`, on (N, R, C) tokens: a layer norm over their last axis."""
    if not _is_plain(norm, Sam2LayerNorm):
        return sub_pixel_order(norm(from_sub_pixel_order(tokens, level, grid)), level)
    return F.layer_norm(tokens, norm.normalized_shape, norm.weight, norm.bias, norm.eps)


def gather_objects(tokens: torch.Tensor, image_index: torch.Tensor) -> torch.Tensor:
    """(B, R, C) per image -> (N, R, C) per object: a broadcast view for one image, else `index_select`."""
    if tokens.shape[0] == 1:
        return tokens.expand(image_index.shape[0], -1, -1)
    return tokens.index_select(0, image_index)


def decoder_images(
    sam: nn.Module, feat_s0: torch.Tensor, feat_s1: torch.Tensor, embeddings: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The decoder's per-image inputs as tokens: what `decode_masks` takes, made once per image.

    Args:
        sam: the `Sam2Model`.
        feat_s0, feat_s1: the decoder's projections (`conv_s0`, `conv_s1`) of the two high-resolution FPN levels,
            (B, C/8, 4h, 4w) and (B, C/4, 2h, 2w).
        embeddings: the lowest FPN level, (B, C, h, w).

    Returns:
        (B, 16hw, C/8) and (B, 4hw, C/4) in sub-pixel order, and (B, hw, C) image tokens with SAM2's "no memory"
        embedding added (as for single images).
    """
    tokens = embeddings.flatten(2).transpose(1, 2).contiguous() + sam.no_memory_embedding
    return sub_pixel_order(feat_s0, 2), sub_pixel_order(feat_s1, 1), tokens


def decode_masks(
    sam: nn.Module,
    feat_s0: torch.Tensor,
    feat_s1: torch.Tensor,
    image_tokens: torch.Tensor,
    image_index: torch.Tensor,
    sparse: torch.Tensor,
    dense: torch.Tensor,
    *,
    grid: tuple[int, int],
    multimask_output: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`sam.mask_decoder` for N objects, each with one prompt set, on `decoder_images` tokens.

    Args:
        sam: the `Sam2Model` (inside the PeftModel, if any: adapter layers in the decoder run as they are).
        feat_s0, feat_s1, image_tokens: `decoder_images` of the B images.
        image_index: (N,) the image of each object, in [0, B).
        sparse: (N, 1, K, C) sparse prompt embeddings; dense: (N, C, h, w) dense ones (the prompt encoder's).
        grid: (h, w), the image tokens' grid.
        multimask_output: three masks per object, or one (chosen by stability outside training, as transformers).

    Returns:
        (N, M, 4h, 4w) mask logits, (N, M) IoU predictions, (N, 1) object-score logits; M = 3 or 1.
    """
    decoder = sam.mask_decoder
    count = image_index.shape[0]
    output_tokens = torch.cat([decoder.obj_score_token.weight, decoder.iou_token.weight, decoder.mask_tokens.weight])
    point_embeddings = torch.cat([output_tokens.expand(count, 1, -1, -1), sparse], dim=2)
    point_embeddings = point_embeddings.to(decoder.iou_token.weight.dtype)
    keys = (gather_objects(image_tokens, image_index) + dense.flatten(2).transpose(1, 2)).contiguous()
    positional = sam.get_image_wide_positional_embeddings().flatten(2).transpose(1, 2)  # (1, hw, C), contiguous
    # The transformer flattens (N, C, h, w) maps to (N, hw, C) tokens; channels-last views of tokens make that a view.
    queries, keys = decoder.transformer(
        point_embeddings=point_embeddings,
        image_embeddings=keys.transpose(1, 2).unflatten(2, grid),
        image_positional_embeddings=positional.expand(count, -1, -1).transpose(1, 2).unflatten(2, grid),
        attention_similarity=None,
    )
    upscaled = transposed_conv_2x2(decoder.upscale_conv1, keys[:, 0], 0, grid) + gather_objects(feat_s1, image_index)
    upscaled = decoder.activation(channel_norm(decoder.upscale_layer_norm, upscaled, 1, grid))
    upscaled = transposed_conv_2x2(decoder.upscale_conv2, upscaled, 1, grid) + gather_objects(feat_s0, image_index)
    upscaled = decoder.activation(upscaled)  # (N, 16hw, C/8), sub-pixel order

    tokens = queries[:, 0]  # (N, T, C): object score, IoU, mask tokens, prompts
    mask_tokens = tokens[:, 2 : 2 + decoder.num_mask_tokens]
    hyper_in = torch.stack([mlp(mask_tokens[:, i]) for i, mlp in enumerate(decoder.output_hypernetworks_mlps)], 2)
    iou_scores = decoder.iou_prediction_head(tokens[:, 1])
    object_score_logits = decoder.pred_obj_score_head(tokens[:, 0])
    stability = not multimask_output and decoder.dynamic_multimask_via_stability and not decoder.training
    chosen = slice(1, None) if multimask_output else slice(None) if stability else slice(0, 1)
    # (N, 16hw, C/8) @ (N, C/8, M): the gradient of `upscaled` comes out contiguous, like `upscaled` itself.
    masks = torch.bmm(upscaled, hyper_in[:, :, chosen])
    masks = from_sub_pixel_order(masks, 2, grid)  # (N, M, 4h, 4w)
    if stability:
        masks, iou_scores = decoder._dynamic_multimask_via_stability(masks[:, None], iou_scores[:, None])
        return masks[:, 0], iou_scores[:, 0], object_score_logits
    return masks, iou_scores[:, chosen], object_score_logits
