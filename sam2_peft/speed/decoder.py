"""SAM2's mask decoder on tokens (the `cpu` and `cuda` backends): `Sam2MaskDecoder.forward` per object, without copies.

    images = decoder_images(sam, feat_s0, feat_s1, embeddings, mask_prompts=False)   # once per image
    masks, iou_scores, object_score_logits = decode_masks(sam, images, image_index, sparse, grid=(64, 64))

transformers' decoder takes (N, C, H, W) maps. Its two-way transformer reads them as (N, H * W, C) tokens through
a transposed view, so each image-side projection starts with a transposing copy and each residual add mixes two
layouts; its 2x2 transposed convolutions go through oneDNN, whose backward is slow on CPU; and the GELU before the
mask product gets a transposed gradient, which triples the time of its backward. `decode_masks` runs the same modules
on contiguous tokens, computes each transposed convolution as one GEMM whose output stays in *sub-pixel order* (the
2x2 children of each input pixel next to each other, so no pixel shuffle is ever copied), adds the high-resolution
features in that order, and reorders only the masks themselves (objects x masks x pixels, not objects x 32 channels
x pixels). Without mask prompts, every object of an image enters the first two-way layer with the same image
tokens, so that layer's three image-side projections (a quarter of the decoder's GEMM work per object) run once per
image (unless they draw dropout, which must differ per object). Outputs and gradients are those of
`Sam2MaskDecoder.forward` up to float rounding (tests/test_mask_decoder.py). A decoder with hooks anywhere in it
(accelerate's device hooks, an FSDP unit) must see its modules called, so it runs as transformers' own forward.
At hiera-tiny, 1024 px, a cached decoder-strategy training step takes about 0.6 instead of 1.0 s with 4 objects,
and 2.3 instead of 5.1 s with 16, on 2 CPU cores (sharing the first layer accounts for 10% and 15% of that).

Sub-pixel order and the GEMM layers are in `sam2_peft.speed.layers`; the `reference` backend runs transformers'
decoder instead (`sam2_peft.speed.reference`).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.sam2.modeling_sam2 import eager_attention_forward

# A module reference: `family` imports this package (for its neck), so its names are read when a function runs.
from sam2_peft import family
from sam2_peft.speed.layers import (
    channel_norm,
    from_sub_pixel_order,
    has_hooks,
    sub_pixel_order,
    transposed_conv_2x2,
)


def gather_objects(tokens: torch.Tensor, image_index: torch.Tensor) -> torch.Tensor:
    """(B, R, C) per image -> (N, R, C) per object: a broadcast view for one image, else `index_select`."""
    if tokens.shape[0] == 1:
        return tokens.expand(image_index.shape[0], -1, -1)
    return tokens.index_select(0, image_index)


def positional_tokens(sam: nn.Module) -> torch.Tensor:
    """SAM2's image-wide positional embedding as (1, hw, C) tokens (a view: transformers builds it channels-last)."""
    return sam.get_image_wide_positional_embeddings().flatten(2).transpose(1, 2)


class DecoderImages(NamedTuple):
    """The mask decoder's per-image inputs, B rows each, made once per image by `decoder_images`.

    Attributes:
        feat_s0: (B, 16hw, C/8) the decoder's projection of the S/4 FPN level, in sub-pixel order.
        feat_s1: (B, 4hw, C/4) that of the S/8 level, in sub-pixel order.
        tokens: (B, hw, C) image tokens plus SAM2's "no memory" embedding where the model's forward adds it
            (`family.adds_no_memory`); with `first_layer`, plus the prompt encoder's no-mask embedding too.
        first_layer: without mask prompts, the image side of the first two-way layer, the same for every object of
            an image: its token-to-image keys and values and its image-to-token queries, (B, hw, C/2) each.
            None when it is made per object (see `decoder_images`).
    """

    feat_s0: torch.Tensor
    feat_s1: torch.Tensor
    tokens: torch.Tensor
    first_layer: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None


def decoder_images(
    sam: nn.Module, feat_s0: torch.Tensor, feat_s1: torch.Tensor, embeddings: torch.Tensor, *, mask_prompts: bool
) -> DecoderImages:
    """The decoder's per-image inputs as tokens: what `decode_masks` takes.

    Args:
        sam: the `Sam2Model` (or `Sam3TrackerModel`, `EdgeTamModel`).
        feat_s0, feat_s1: the decoder's projections (`conv_s0`, `conv_s1`) of the two high-resolution FPN levels,
            (B, C/8, 4h, 4w) and (B, C/4, 2h, 2w).
        embeddings: the lowest FPN level, (B, C, h, w).
        mask_prompts: whether the objects come with mask prompts. Without, the first two-way layer's image-side
            projections are made here, once per image, unless they are adapter layers in training (whose dropout
            must be drawn per object) or the decoder has hooks (see `decode_masks`).
    """
    tokens = embeddings.flatten(2).transpose(1, 2).contiguous()
    if family.adds_no_memory(sam):
        tokens = tokens + sam.no_memory_embedding
    first_layer = None
    layer = sam.mask_decoder.transformer.layers[0]
    token_to_image, image_to_token = layer.cross_attn_token_to_image, layer.cross_attn_image_to_token
    projections = (token_to_image.k_proj, token_to_image.v_proj, image_to_token.q_proj)
    shared = not mask_prompts and type(layer) in family.TWO_WAY_BLOCKS and layer.skip_first_layer_pe
    shared = shared and all(type(module) is nn.Linear or not module.training for module in projections)
    if shared and not _decoder_has_hooks(sam):
        tokens = tokens + sam.prompt_encoder.no_mask_embed.weight
        keys = tokens + positional_tokens(sam)
        first_layer = (token_to_image.k_proj(keys), token_to_image.v_proj(tokens), image_to_token.q_proj(keys))
    return DecoderImages(sub_pixel_order(feat_s0, 2), sub_pixel_order(feat_s1, 1), tokens, first_layer)


def decode_masks(
    sam: nn.Module,
    images: DecoderImages,
    image_index: torch.Tensor,
    sparse: torch.Tensor,
    dense: torch.Tensor | None = None,
    *,
    grid: tuple[int, int],
    multimask_output: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`sam.mask_decoder` for N objects, each with one prompt set, on `decoder_images` of their B images.

    The decoder's modules are called one by one, so hooks on the decoder itself, or on its transformer and layers,
    would not run: a decoder with hooks in any of its modules runs as transformers' `Sam2MaskDecoder.forward`.

    Args:
        sam: the `Sam2Model` (inside the PeftModel, if any: adapter layers in the decoder run as they are).
        images: `decoder_images` of the B images.
        image_index: (N,) the image of each object, in [0, B).
        sparse: (N, 1, K, C) sparse prompt embeddings (the prompt encoder's).
        dense: (N, C, h, w) dense prompt embeddings when `images.first_layer` is None; else None (the no-mask
            embedding is in `images` already).
        grid: (h, w), the image tokens' grid.
        multimask_output: three masks per object, or one (chosen by stability outside training, as transformers).

    Returns:
        (N, M, 4h, 4w) mask logits, (N, M) IoU predictions, (N, 1) object-score logits; M = 3 or 1.

    Example:
        >>> images = decoder_images(sam, feat_s0, feat_s1, embeddings, mask_prompts=False)
        >>> masks, iou_scores, object_scores = decode_masks(sam, images, torch.tensor([0, 0]), sparse, grid=(64, 64))
        >>> masks.shape
        torch.Size([2, 3, 256, 256])
    """
    if (dense is None) == (images.first_layer is None):
        raise ValueError(
            f"decode_masks got dense={'None' if dense is None else tuple(dense.shape)} with images.first_layer "
            f"{'None' if images.first_layer is None else 'set'}: pass `dense` exactly when `images.first_layer` is "
            "None (decoder_images(..., mask_prompts=True), or a decoder that cannot share it)."
        )
    decoder = sam.mask_decoder
    if _decoder_has_hooks(sam):
        return _hooked_decode(sam, images, image_index, sparse, dense, grid, multimask_output)
    count = image_index.shape[0]
    output_tokens = torch.cat([decoder.obj_score_token.weight, decoder.iou_token.weight, decoder.mask_tokens.weight])
    point_embeddings = torch.cat([output_tokens.expand(count, 1, -1, -1), sparse], dim=2)
    point_embeddings = point_embeddings.to(decoder.iou_token.weight.dtype)  # (N, 1, T, C)
    positional = positional_tokens(sam).expand(count, -1, -1)
    if images.first_layer is None:
        keys = (gather_objects(images.tokens, image_index) + dense.flatten(2).transpose(1, 2)).contiguous()
        # The transformer flattens (N, C, h, w) maps to (N, hw, C) tokens: on channels-last views of tokens, a view.
        queries, keys = decoder.transformer(
            point_embeddings=point_embeddings,
            image_embeddings=keys.transpose(1, 2).unflatten(2, grid),
            image_positional_embeddings=positional.transpose(1, 2).unflatten(2, grid),
            attention_similarity=None,
        )
    else:
        queries, keys = _two_way_transformer(decoder.transformer, point_embeddings, images, image_index, positional)
    upscaled = transposed_conv_2x2(decoder.upscale_conv1, keys[:, 0], 0, grid)
    upscaled = upscaled + gather_objects(images.feat_s1, image_index)
    upscaled = decoder.activation(channel_norm(decoder.upscale_layer_norm, upscaled, 1, grid))
    upscaled = transposed_conv_2x2(decoder.upscale_conv2, upscaled, 1, grid)
    upscaled = decoder.activation(upscaled + gather_objects(images.feat_s0, image_index))  # (N, 16hw, C/8)

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


def _decoder_has_hooks(sam: nn.Module) -> bool:
    return any(has_hooks(module) for module in sam.mask_decoder.modules())


def _hooked_decode(sam, images, image_index, sparse, dense, grid, multimask_output):
    """transformers' `Sam2MaskDecoder.forward` on per-object maps, for a decoder whose hooks must run."""
    maps = [from_sub_pixel_order(tokens, level, grid) for tokens, level in zip(images[:3], (2, 1, 0))]
    return transformers_decode(sam, maps, image_index, sparse, dense, multimask_output)


def transformers_decode(sam, maps, image_index, sparse, dense, multimask_output):
    """`sam.mask_decoder(...)` on each object's image maps, gathered from the (B, C, H, W) `maps` of its image:
    (N, M, 4h, 4w) masks, (N, M) IoU, (N, 1) object-score logits."""
    feat_s0, feat_s1, embeddings = (levels.index_select(0, image_index) for levels in maps)
    positional = sam.get_image_wide_positional_embeddings().expand(image_index.shape[0], -1, -1, -1)
    masks, iou_scores, _, object_score_logits = sam.mask_decoder(
        image_embeddings=embeddings,
        image_positional_embeddings=positional,
        sparse_prompt_embeddings=sparse,
        dense_prompt_embeddings=dense,
        multimask_output=multimask_output,
        high_resolution_features=[feat_s0, feat_s1],
    )
    return masks[:, 0], iou_scores[:, 0], object_score_logits[:, 0]  # one prompt set per decoder batch entry


def _two_way_transformer(
    transformer: nn.Module,
    point_embeddings: torch.Tensor,
    images: DecoderImages,
    image_index: torch.Tensor,
    positional: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`Sam2TwoWayTransformer.forward` whose first layer takes its image side from `images.first_layer`.

    The first layer follows `Sam2TwoWayAttentionBlock.forward` with `skip_first_layer_pe` (as in every SAM2); the
    later layers and the final attention are transformers' modules.

    Returns:
        (N, 1, T, C) queries and (N, 1, hw, C) keys, as the transformer.
    """
    layer = transformer.layers[0]
    image, keys, values, image_queries = (gather_objects(t, image_index) for t in (images.tokens, *images.first_layer))
    token_to_image, image_to_token = layer.cross_attn_token_to_image, layer.cross_attn_image_to_token
    queries, _ = layer.self_attn(query=point_embeddings, key=point_embeddings, value=point_embeddings)
    queries = layer.layer_norm1(queries)
    attended = _attend(token_to_image, token_to_image.q_proj(queries + point_embeddings)[:, 0], keys, values)
    queries = layer.layer_norm2(queries + attended[:, None])
    queries = layer.layer_norm3(queries + layer.mlp(queries))
    prompts = queries + point_embeddings
    attended = _attend(image_to_token, image_queries, image_to_token.k_proj(prompts)[:, 0],
                       image_to_token.v_proj(queries)[:, 0])
    keys = layer.layer_norm4(image + attended)[:, None]
    positional = positional[:, None]
    for layer in transformer.layers[1:]:
        queries, keys, _ = layer(queries=queries, keys=keys, query_point_embedding=point_embeddings,
                                 key_point_embedding=positional, attention_similarity=None)
    attended, _ = transformer.final_attn_token_to_image(
        query=queries + point_embeddings, key=keys + positional, value=keys
    )
    return transformer.layer_norm_final_attn(queries + attended), keys


def _attend(attention: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """`Sam2Attention.forward` after its q/k/v projections, with the attention implementation its config names:
    (N, L, D) projected queries, (N, S, D) keys and values in, (N, L, C) out (through `o_proj`)."""
    heads = attention.num_attention_heads

    def split(states: torch.Tensor) -> torch.Tensor:
        return states.unflatten(-1, (heads, -1)).transpose(1, 2)  # (N, L, D) -> (N, heads, L, D / heads)

    interface = ALL_ATTENTION_FUNCTIONS.get_interface(attention.config._attn_implementation, eager_attention_forward)
    attended, _ = interface(attention, split(query), split(key), split(value), attention_mask=None, dropout=0.0,
                            scaling=attention.scaling, is_causal=attention.is_causal)
    return attention.o_proj(attended.flatten(2))  # the interface returns (N, L, heads, D / heads)
