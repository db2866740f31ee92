"""The `reference` backend's computations: transformers' own modules, called as `Sam2Model.forward` calls them.

    maps = encode_images(sam.vision_encoder, pixel_values)   # vision_encoder(...).fpn_hidden_states
    masks, iou_scores, object_scores = decode_masks(sam, decoder_images(sam, *maps, mask_prompts=False), ...)

Nothing here is computed from weights: every layer is a module call, on the layout transformers uses, so this is the
path to debug with and the one every fast path is tested against (tests/speed/). It still encodes each image once
and gathers per object, as `Sam2Segmenter` does on every backend.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from sam2_peft import family
from sam2_peft.speed.decoder import DecoderImages, transformers_decode


def encode_images(vision_encoder: nn.Module, pixel_values: torch.Tensor) -> list[torch.Tensor]:
    """`vision_encoder(pixel_values).fpn_hidden_states`, the levels the decoder reads, high to low resolution."""
    levels = len(vision_encoder.config.backbone_feature_sizes)
    return list(vision_encoder(pixel_values).fpn_hidden_states[:levels])


def neck(trunk: family.Trunk, stage_outputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """`vision_encoder.neck` on the stage outputs (in the blocks' layout), as the vision encoder's forward calls it."""
    vision_encoder = trunk.vision_encoder
    if isinstance(trunk, family.ViTTrunk):  # its neck is module calls already
        return trunk.neck(stage_outputs)
    if isinstance(trunk, family.TimmTrunk):  # (B, C, H, W) -> the (B, H, W, C) views the neck takes
        stage_outputs = [output.permute(0, 2, 3, 1) for output in stage_outputs]
    fpn_hidden_states, _ = vision_encoder.neck(tuple(stage_outputs))
    return list(fpn_hidden_states[-vision_encoder.num_feature_levels :][::-1])


def project(decoder: nn.Module, image_features: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """`conv_s0` and `conv_s1` called on the two high-resolution levels (`Sam2Model.get_image_features`)."""
    feat_s0, feat_s1, embeddings = image_features
    return decoder.conv_s0(feat_s0), decoder.conv_s1(feat_s1), embeddings


def decoder_images(
    sam: nn.Module, feat_s0: torch.Tensor, feat_s1: torch.Tensor, embeddings: torch.Tensor, *, mask_prompts: bool
) -> DecoderImages:
    """The per-image maps as they are ((B, C, H, W) each), the last plus `no_memory_embedding` where the model's
    forward adds it; never a shared first layer, so `decode_masks` always takes `dense`."""
    if family.adds_no_memory(sam):
        # Sam2Model.forward: (B, C, h, w) -> (hw, B, C) tokens + embedding -> back, which is this broadcast.
        embeddings = embeddings + sam.no_memory_embedding.reshape(1, -1, 1, 1)
    return DecoderImages(feat_s0, feat_s1, embeddings, None)


def decode_masks(
    sam: nn.Module,
    images: DecoderImages,
    image_index: torch.Tensor,
    sparse: torch.Tensor,
    dense: torch.Tensor,
    *,
    grid: tuple[int, int],
    multimask_output: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`sam.mask_decoder(...)` on each object's image maps, gathered; the same contract as
    `speed.decoder.decode_masks` ((N, M, 4h, 4w) masks, (N, M) IoU, (N, 1) object-score logits)."""
    return transformers_decode(sam, images[:3], image_index, sparse, dense, multimask_output)
