"""The FPN neck of `Sam2VisionModel` and `EdgeTamVisionModel` on GEMMs, without position encodings (`cpu`, `cuda`).

    maps = fpn_maps(model.vision_encoder, stage_outputs)   # (B, C, 4h, 4w), (B, C, 2h, 2w), (B, C, h, w)

The `reference` backend calls `vision_encoder.neck` itself (`sam2_peft.speed.reference.neck`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from sam2_peft.speed.layers import pointwise_conv


def fpn_maps(vision_encoder: nn.Module, stage_outputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The FPN neck of `Sam2VisionModel` (and of `EdgeTamVisionModel`) on the stage outputs, high to low resolution.

    The same maps as `vision_encoder.neck` up to float rounding (lateral convolutions, nearest-upsampled top-down
    sums on `fpn_top_down_levels`, the last `num_feature_levels` levels), with two differences that only save
    memory and time: the 1x1 lateral convolutions run as `pointwise_conv`, and the sine position encodings, which
    the decoder does not use (it has its own), are not built. transformers builds them through a one-entry LRU cache
    shared by all models; the levels take turns in it, so it never hits, but it keeps the largest one,
    (B, 256, S/4, S/4), 64 MB per image at 1024 px, alive for the life of the process. It reads the neck's weights
    without calling the neck, so hooks on the neck itself do not run.

    Args:
        vision_encoder: `Sam2Model.vision_encoder` (or `EdgeTamModel`'s).
        stage_outputs: the (B, H, W, C) output of each stage, high to low resolution.
    """
    neck = vision_encoder.neck
    last = len(neck.convs) - 1
    maps, previous = [], None
    for level in range(last, -1, -1):  # top-down: low to high resolution
        conv = neck.convs[last - level]
        current = pointwise_conv(conv, stage_outputs[level].permute(0, 3, 1, 2).to(conv.weight.dtype))
        if previous is not None and level in neck.fpn_top_down_levels:
            top_down = F.interpolate(previous.to(torch.float32), scale_factor=2.0, mode="nearest")
            current = current + top_down.to(current.dtype)
        maps.append(current)
        previous = current
    return maps[-vision_encoder.num_feature_levels :][::-1]
