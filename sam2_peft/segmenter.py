"""The training forward: images and per-object prompts in, low-resolution mask logits out.

`Sam2Model.forward` expects the same number of prompts for every image. Real data has a varying number of objects
per image, so `Sam2Segmenter` encodes each image once and gathers its features for every object (as official SAM2
training does), then runs the prompt encoder and mask decoder on the flat batch of objects.

    segmenter = Sam2Segmenter(model)                    # a Sam2Model, or the PeftModel that apply_strategy returns
    out = segmenter(pixel_values, image_index=idx, point_coords=coords, point_labels=labels)
    out.mask_logits                                     # (N, 3, 4 * E, 4 * E) with multimask_output=True
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import Sam2Model

# Point labels of the SAM2 prompt encoder. A box is encoded as its two corners (labels 2 and 3), exactly as the
# official predictor does, so boxes, clicks and both together share one tensor layout.
NEGATIVE, POSITIVE, BOX_TOP_LEFT, BOX_BOTTOM_RIGHT = 0, 1, 2, 3
NOT_A_POINT = -1
PADDING = -10


@dataclass
class SegmenterOutput:
    """Outputs for N objects.

    Attributes:
        mask_logits: (N, M, h, w) low-resolution mask logits, M = 3 for multimask output, else 1; h = w = image_size / 4.
        iou_scores: (N, M) predicted IoU of each mask, in [0, 1].
        object_score_logits: (N, 1) logit that the object is present in the image.
    """

    mask_logits: torch.Tensor
    iou_scores: torch.Tensor
    object_score_logits: torch.Tensor


def combine_prompts(
    boxes: torch.Tensor | None = None,
    points: torch.Tensor | None = None,
    point_labels: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge boxes and clicks into the point layout the prompt encoder takes.

    Args:
        boxes: (N, 4) `x1, y1, x2, y2` in model-input pixels.
        points: (N, K, 2) `x, y` in model-input pixels.
        point_labels: (N, K), 1 positive, 0 negative, -10 padding.

    Returns:
        coords (N, 2 + K or 2 or K, 2) and labels of the same leading shape, box corners first.
    """
    if boxes is None and points is None:
        raise ValueError("Give at least one prompt: `boxes` or `points` (with `point_labels`).")
    if points is not None and (point_labels is None or point_labels.shape != points.shape[:2]):
        raise ValueError(f"`point_labels` must have shape {tuple(points.shape[:2])} to match `points`.")
    coords, labels = [], []
    if boxes is not None:
        coords.append(boxes.reshape(-1, 2, 2).float())
        corner_labels = torch.tensor([BOX_TOP_LEFT, BOX_BOTTOM_RIGHT], device=boxes.device)
        labels.append(corner_labels.expand(boxes.shape[0], 2))
    if points is not None:
        coords.append(points.float())
        labels.append(point_labels.long())
    return torch.cat(coords, dim=1), torch.cat(labels, dim=1)


def base_sam2(model: nn.Module) -> Sam2Model:
    """Return the `Sam2Model` inside a `PeftModel` (adapter layers stay injected), or `model` itself."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not isinstance(base, Sam2Model):
        raise TypeError(f"Expected a Sam2Model or a PeftModel around one, got {type(base).__name__}.")
    return base


def pointwise_conv(conv: nn.Module, features: torch.Tensor) -> torch.Tensor:
    """`conv(features)`, computed as one batched matrix product when `conv` is a plain 1x1 `nn.Conv2d`.

    The decoder's `conv_s0` runs on the 256x256 feature map on every step once features are cached; on CPU,
    oneDNN's 1x1 convolution backward takes about three times as long as the equivalent GEMM. Anything else (an
    adapter layer around the convolution, say) is simply called.
    """
    plain = type(conv) is nn.Conv2d and conv.kernel_size == conv.stride == (1, 1) and conv.padding == (0, 0)
    if not plain or conv.groups != 1:
        return conv(features)
    batch, channels, height, width = features.shape
    weight = conv.weight.view(1, conv.out_channels, channels).expand(batch, -1, -1)
    flat = features.flatten(2)
    out = torch.bmm(weight, flat) if conv.bias is None else torch.baddbmm(conv.bias.view(1, -1, 1), weight, flat)
    return out.view(batch, conv.out_channels, height, width)


def evict_position_encoding(neck: nn.Module) -> None:
    """Free the position encoding the FPN neck leaves cached; call it after every run of the neck.

    The neck builds a sine position encoding per level, which the decoder does not use (it has its own), through a
    one-entry LRU cache shared by all models. The levels take turns in it, so it never hits, but it pins the last,
    largest one: (B, 256, S/4, S/4), 64 MB per image at 1024 px, for as long as the process lives. A 1x1 call takes
    its place.
    """
    neck.position_encoding((1, 1, 1, 1), "cpu", torch.float32)


class Sam2Segmenter(nn.Module):
    """Run SAM2 on a batch of images with a varying number of prompted objects per image.

    Args:
        model: a `Sam2Model`, or the `PeftModel` that `apply_strategy` returns. It is registered as `self.model`, so
            `accelerate.prepare(segmenter)` wraps everything that trains.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        base_sam2(model)
        self.model = model

    @property
    def sam(self) -> Sam2Model:
        """The `Sam2Model` (inside the PeftModel, if any); a property so its weights are registered only once."""
        return base_sam2(self.model)

    def encode_images(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        """Run the image encoder (Hiera trunk + FPN neck).

        Args:
            pixel_values: (B, 3, S, S) normalised images.

        Returns:
            The three FPN levels, high to low resolution: (B, C, S/4, S/4), (B, C, S/8, S/8), (B, C, S/16, S/16).
            Nothing of the mask decoder is applied yet, so these are what a frozen-encoder cache stores.
        """
        encoder = self.sam.vision_encoder
        features = list(encoder(pixel_values).fpn_hidden_states)
        evict_position_encoding(encoder.neck)
        return features

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        *,
        image_features: list[torch.Tensor] | None = None,
        image_index: torch.Tensor,
        point_coords: torch.Tensor,
        point_labels: torch.Tensor,
        mask_inputs: torch.Tensor | None = None,
        multimask_output: bool = True,
    ) -> SegmenterOutput:
        """Predict one set of masks per object.

        Args:
            pixel_values: (B, 3, S, S) normalised images; or pass `image_features` from `encode_images` instead.
            image_features: the encoder output for the B images (e.g. from a cache).
            image_index: (N,) the image each object belongs to, values in [0, B).
            point_coords: (N, K, 2) prompt points in model-input pixels (see `combine_prompts`).
            point_labels: (N, K) their labels (1, 0, 2, 3 for box corners, -10 padding).
            mask_inputs: optional (N, 1, h, w) mask-logit prompts at the decoder's low resolution.
            multimask_output: three candidate masks per object (True) or one (False).
        """
        if (pixel_values is None) == (image_features is None):
            raise ValueError("Pass exactly one of `pixel_values` or `image_features`.")
        if image_features is None:
            image_features = self.encode_images(pixel_values)
        sam = self.sam
        decoder = sam.mask_decoder
        feat_s0, feat_s1, embeddings = image_features
        # The decoder's own 1x1 projections of the high-resolution levels: they train with the decoder. Objects
        # gather their image's maps with `index_select`, whose backward (`index_add_`) is several times faster on
        # CPU than that of advanced indexing.
        feat_s0, feat_s1 = pointwise_conv(decoder.conv_s0, feat_s0), pointwise_conv(decoder.conv_s1, feat_s1)
        image_index = image_index.to(feat_s0.device)
        feat_s0, feat_s1 = feat_s0.index_select(0, image_index), feat_s1.index_select(0, image_index)
        # (1, 1, C) -> (1, C, 1, 1): the "no memory" token SAM2 adds to single-image features.
        embeddings = (embeddings + sam.no_memory_embedding.view(1, -1, 1, 1)).index_select(0, image_index)

        num_objects = image_index.shape[0]
        sparse, dense = sam.prompt_encoder(
            input_points=point_coords.unsqueeze(1),
            input_labels=point_labels.unsqueeze(1),
            input_boxes=None,
            input_masks=mask_inputs,
        )
        if dense.shape[0] != num_objects:
            dense = dense.expand(num_objects, -1, -1, -1)
        positional = sam.get_image_wide_positional_embeddings().expand(num_objects, -1, -1, -1)
        masks, iou_scores, _, object_score_logits = decoder(
            image_embeddings=embeddings,
            image_positional_embeddings=positional,
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=multimask_output,
            high_resolution_features=[feat_s0, feat_s1],
        )
        # Each object is its own decoder batch entry with one prompt set: drop that point-batch axis.
        return SegmenterOutput(masks[:, 0], iou_scores[:, 0], object_score_logits[:, 0])
