"""Segment everything in an image with a grid of point prompts (SAM's automatic mask generator), fine-tuned or not.

    sam2-peft segment --model facebook/sam2.1-hiera-tiny --adapter runs/lora/final --image cells.png \\
        --output cells_labels.png --points_per_side 32          # also writes cells_labels_overlay.png

    from sam2_peft.automatic import generate_masks, label_map, load_pixels, save_overlay
    pixels = load_pixels("cells.png")                        # (3, H, W) in [0, 1], as training saw it
    masks = generate_masks(model, pixels, points_per_side=32)  # a Sam2Model or a PeftModel around one
    labels = label_map(masks, pixels.shape[-2:])             # 0 background, i + 1 where mask i is
    save_overlay(pixels, labels, "cells_overlay.png")

The steps are those of SAM / SAM2's `SamAutomaticMaskGenerator` on a single crop (the whole image; no crop layers):
a regular `points_per_side` x `points_per_side` grid of positive clicks, each giving three candidate masks
(multimask output); candidates whose predicted IoU is not above `pred_iou_thresh` are dropped, then those whose
stability score (IoU of the mask thresholded at +offset and at -offset, computed on logits at the original size)
is below `stability_score_thresh`; non-maximum suppression over the masks' boxes (`torchvision.ops.batched_nms`,
scored by predicted IoU) removes duplicates; optionally small islands and holes are removed
(`min_mask_region_area`, as SAM's `postprocess_small_regions`). The image is encoded once and the grid runs through
`Sam2Segmenter` `points_per_batch` points at a time; logits are upsampled as everywhere else in this package
(`sam2_peft.training.masks_at_original_size`).

Differences from transformers' `pipeline("mask-generation")` (which has the same steps): grid points are placed in
the square, aspect-stretched model input as SAM2 does (the pipeline scales them as SAM1's longest-side resize, so on
non-square images its points land in the wrong place); pixels are resized in float
(see `sam2_peft.data.transforms`); masks without a pixel are dropped; the stability cut is `>=` (as SAM; the
pipeline's is `>`). On a square 8-bit image of the model's input size both give the same masks
(tests/test_automatic.py). The grid, stability score and mask boxes are transformers' own helpers (private functions
of `transformers.models.sam2.image_processing_sam2`); its public `generate_crop_boxes` and `filter_masks` are not
used because they place points by the longest side and send every mask through Python RLE encoding.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import batched_nms
from transformers.models.sam2.image_processing_sam2 import (
    _batched_mask_to_box,
    _build_point_grid,
    _compute_stability_score,
)

from sam2_peft.data.intensity import IntensityConfig, load_pixels, normalize_intensity
from sam2_peft.data.io import decode_row
from sam2_peft.data.transforms import Preprocessor
from sam2_peft.metrics.instances import aggregate_matches, match_instances
from sam2_peft.segmenter import POSITIVE, Sam2Segmenter


def check_options(height: int, width: int, *, points_per_side: int, points_per_batch: int, pred_iou_thresh: float,
                  stability_score_thresh: float, stability_score_offset: float, box_nms_thresh: float,
                  min_mask_region_area: int) -> None:
    """Raise a ValueError naming the flag for an option that cannot work on an (H, W) image."""
    if points_per_side < 1:
        raise ValueError(f"--points_per_side {points_per_side}: use at least 1 (32 is SAM's default).")
    if points_per_side > min(height, width):
        raise ValueError(
            f"--points_per_side {points_per_side} puts more grid points on a side than the image's shorter side has "
            f"pixels ({height}x{width}); use at most {min(height, width)}."
        )
    if points_per_batch < 1:
        raise ValueError(f"--points_per_batch {points_per_batch}: use at least 1 (64 is the default).")
    for flag, value in (("pred_iou_thresh", pred_iou_thresh), ("stability_score_thresh", stability_score_thresh)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"--{flag} {value}: must be in [0, 1] (0 switches that filter off).")
    if stability_score_offset <= 0:
        raise ValueError(f"--stability_score_offset {stability_score_offset}: must be > 0 (SAM uses 1).")
    if not 0.0 < box_nms_thresh <= 1.0:
        raise ValueError(f"--box_nms_thresh {box_nms_thresh}: must be in (0, 1] (1 keeps all but identical boxes).")
    if min_mask_region_area < 0:
        raise ValueError(f"--min_mask_region_area {min_mask_region_area}: must be >= 0 (0 switches it off).")


def upsample_logits(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(N, h, w) low-resolution logits -> (N, H, W) float logits, as `training.masks_at_original_size` resizes them."""
    return F.interpolate(logits[:, None].float(), size=size, mode="bilinear")[:, 0]


@torch.no_grad()
def generate_masks(
    model: nn.Module,
    image,
    *,
    points_per_side: int = 32,
    points_per_batch: int = 64,
    pred_iou_thresh: float = 0.88,
    stability_score_thresh: float = 0.95,
    stability_score_offset: float = 1.0,
    box_nms_thresh: float = 0.7,
    min_mask_region_area: int = 0,
    intensity: IntensityConfig = IntensityConfig(),
) -> list[dict]:
    """Segment everything in `image` with a point grid; see the module docstring for the steps.

    Args:
        model: a `Sam2Model` or a `PeftModel` around one; it is put in eval mode and runs on its own device.
        image: what `load_pixels` takes (a path, a raw array, or a (3, H, W) tensor in [0, 1]).
        points_per_side: grid points along each side (points_per_side ** 2 prompts); at most the shorter side.
        points_per_batch: prompts per decoder run (memory: 3 x this many float masks at the image's size).
        pred_iou_thresh: keep masks whose predicted IoU is above this, in [0, 1]; 0 keeps all.
        stability_score_thresh: keep masks whose stability score is at least this, in [0, 1]; 0 keeps all.
        stability_score_offset: the logit offset of the stability score (masks at > +offset vs > -offset).
        box_nms_thresh: box IoU above which the mask with the lower predicted IoU is suppressed.
        min_mask_region_area: remove islands and fill holes smaller than this many pixels (needs scipy); 0: off.
        intensity: how raw intensities map to [0, 1] (not used for tensor input).

    Returns:
        One dict per mask, by decreasing predicted IoU, with SAM's keys: `segmentation` (H, W) bool at the image's
        size, `area` (pixels), `bbox` (x, y, w, h covering the mask's pixels; SAM's w and h are one less),
        `predicted_iou`, `stability_score`, `point_coords` ([[x, y]], the grid point in image pixels) and
        `crop_box` ([0, 0, W, H]).

    Example:
        >>> model = load_sam2("facebook/sam2.1-hiera-tiny")
        >>> masks = generate_masks(model, "examples/data/val/images/cells_val_000.png", points_per_side=16)
        >>> sorted(masks[0])
        ['area', 'bbox', 'crop_box', 'point_coords', 'predicted_iou', 'segmentation', 'stability_score']
    """
    pixels = load_pixels(image, intensity)
    height, width = pixels.shape[-2:]
    check_options(height, width, points_per_side=points_per_side, points_per_batch=points_per_batch,
                  pred_iou_thresh=pred_iou_thresh, stability_score_thresh=stability_score_thresh,
                  stability_score_offset=stability_score_offset, box_nms_thresh=box_nms_thresh,
                  min_mask_region_area=min_mask_region_area)
    masks, scores, stability, grid = _grid_candidates(
        model, pixels, points_per_side=points_per_side, points_per_batch=points_per_batch,
        pred_iou_thresh=pred_iou_thresh, stability_score_thresh=stability_score_thresh,
        stability_score_offset=stability_score_offset,
    )  # fmt: skip
    boxes = _batched_mask_to_box(masks)
    keep = batched_nms(boxes.float(), scores, torch.zeros_like(scores), box_nms_thresh)
    masks, scores, stability, grid, boxes = masks[keep], scores[keep], stability[keep], grid[keep], boxes[keep]
    if min_mask_region_area > 0 and len(masks):
        masks, keep = remove_small_regions(masks, min_mask_region_area, box_nms_thresh)
        scores, stability, grid = scores[keep], stability[keep], grid[keep]
        boxes = _batched_mask_to_box(masks)
    return [
        {
            "segmentation": mask.cpu().numpy(),
            "area": int(mask.sum()),
            "bbox": [int(x0), int(y0), int(x1 - x0 + 1), int(y1 - y0 + 1)],
            "predicted_iou": float(score),
            "stability_score": float(stable),
            "point_coords": [point.tolist()],
            "crop_box": [0, 0, int(width), int(height)],
        }
        for mask, score, stable, point, (x0, y0, x1, y1) in zip(masks, scores, stability, grid, boxes.tolist())
    ]


def _grid_candidates(model: nn.Module, pixels: torch.Tensor, *, points_per_side: int, points_per_batch: int,
                     **cuts) -> tuple[torch.Tensor, ...]:
    """Prompt `model` with one click per grid point, in batches, and keep the candidates that pass `cuts`.

    Returns:
        masks (M, H, W) bool, predicted IoU (M,), stability score (M,) and the grid point (M, 2) in image pixels.
    """
    height, width = pixels.shape[-2:]
    segmenter = Sam2Segmenter(model).eval()
    device = next(model.parameters()).device
    preprocessor = Preprocessor.from_model(model)
    features = segmenter.project(segmenter.encode_images(preprocessor.pixel_values(pixels)[None].to(device)))
    points = _build_point_grid(points_per_side) * torch.tensor([float(width), float(height)])  # (P, 2) image x, y
    prompts = preprocessor.scale_coords(points, (height, width)).to(device)
    kept = []
    for start in range(0, len(points), points_per_batch):
        batch = prompts[start : start + points_per_batch, None]  # (n, 1, 2): one click per prompt
        output = segmenter(
            decoder_features=features,
            image_index=torch.zeros(len(batch), dtype=torch.long, device=device),
            point_coords=batch,
            point_labels=torch.full(batch.shape[:2], POSITIVE, device=device),
        )
        kept.append(_filter_candidates(
            output.mask_logits.flatten(0, 1), output.iou_scores.flatten(),
            points[start : start + points_per_batch].repeat_interleave(output.mask_logits.shape[1], dim=0),
            size=(height, width), **cuts,
        ))
    return tuple(torch.cat(part) for part in zip(*kept))


def _filter_candidates(logits, iou_scores, points, *, size, pred_iou_thresh, stability_score_thresh,
                       stability_score_offset):
    """Keep one batch's candidates that pass the IoU and stability cuts and are not empty.

    Args:
        logits: (N, h, w) low-resolution logits; iou_scores: (N,); points: (N, 2) their grid points.

    Returns:
        (K, H, W) bool masks, their (K,) predicted IoU and stability scores, and (K, 2) grid points.
    """
    keep = iou_scores > pred_iou_thresh if pred_iou_thresh > 0 else torch.ones_like(iou_scores, dtype=torch.bool)
    logits, iou_scores, points = logits[keep], iou_scores[keep].float().cpu(), points[keep]
    upsampled = upsample_logits(logits, size).cpu()  # (K, H, W), before any cut (as SAM)
    stability = _compute_stability_score(upsampled, 0.0, stability_score_offset)
    masks = upsampled > 0
    keep = masks.flatten(1).any(dim=1)
    if stability_score_thresh > 0:
        keep &= stability >= stability_score_thresh
    return masks[keep], iou_scores[keep], stability[keep], points[keep]


def remove_small_regions(masks: torch.Tensor, min_area: int, nms_thresh: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Fill holes and drop islands under `min_area` pixels, then suppress duplicates again, as SAM does.

    As SAM's `postprocess_small_regions`: 8-connected regions; holes are filled first, then islands removed (the
    largest island stays if all are small); NMS then prefers masks that needed no change.

    Args:
        masks: (N, H, W) bool masks, by decreasing predicted IoU.

    Returns:
        The cleaned masks that survive, in their input order, and their (K,) indices into `masks`.
    """
    try:
        from scipy import ndimage
    except ImportError:
        raise ImportError("--min_mask_region_area > 0 needs scipy (connected components): pip install scipy.") from None
    eight_connected = np.ones((3, 3), bool)
    cleaned, unchanged = [], []
    for mask in masks.numpy():
        holes, count = ndimage.label(~mask, structure=eight_connected)
        sizes = np.bincount(holes.ravel(), minlength=count + 1)
        small_holes = np.flatnonzero(sizes[1:] < min_area) + 1
        filled = mask | np.isin(holes, small_holes)
        islands, count = ndimage.label(filled, structure=eight_connected)
        sizes = np.bincount(islands.ravel(), minlength=count + 1)[1:]
        big = np.flatnonzero(sizes >= min_area) + 1
        has_small_islands = len(big) < count
        if has_small_islands and not len(big):
            big = [int(np.argmax(sizes)) + 1]
        cleaned.append(torch.from_numpy(np.isin(islands, big) if has_small_islands else filled))
        unchanged.append(float(not len(small_holes) and not has_small_islands))
    masks = torch.stack(cleaned)
    boxes = _batched_mask_to_box(masks).float()
    scores = torch.tensor(unchanged)
    keep = batched_nms(boxes, scores, torch.zeros_like(scores), nms_thresh).sort().values
    return masks[keep], keep


def label_map(masks: list, shape: tuple[int, int]) -> np.ndarray:
    """Paint masks into one (H, W) uint16 map: 0 background, i + 1 where mask i is.

    Larger masks are painted first, so a smaller mask lying on a larger one stays visible.

    Args:
        masks: `generate_masks`' dicts, or (H, W) bool arrays.
        shape: (H, W).
    """
    arrays = [np.asarray(m["segmentation"] if isinstance(m, dict) else m, bool) for m in masks]
    if len(arrays) > np.iinfo(np.uint16).max:
        raise ValueError(f"{len(arrays)} masks do not fit a 16-bit label map; raise the thresholds to keep fewer.")
    labels = np.zeros(tuple(shape), np.uint16)
    for index in sorted(range(len(arrays)), key=lambda i: -int(arrays[i].sum())):
        if arrays[index].shape != labels.shape:
            raise ValueError(f"Mask {index} has shape {arrays[index].shape}; the label map is {labels.shape}.")
        labels[arrays[index]] = index + 1
    return labels


def save_overlay(pixels, labels: np.ndarray, path: str | os.PathLike, *, alpha: float = 0.5, seed: int = 0) -> Path:
    """Write the image with each label blended in its own colour (background untouched) as an 8-bit RGB PNG.

    Args:
        pixels: (3, H, W) tensor or array in [0, 1] (`load_pixels`), or (H, W, 3).
        labels: (H, W) label map (`label_map`).
        alpha: opacity of the colours.
        seed: seeds the random palette (the same labels always get the same colours).
    """
    image = np.asarray(pixels, np.float32)
    image = image.transpose(1, 2, 0) if image.shape[0] == 3 and image.shape[-1] != 3 else image
    if image.shape[:2] != labels.shape:
        raise ValueError(f"labels {labels.shape} and image {image.shape[:2]} differ in size.")
    palette = np.random.default_rng(seed).uniform(0.15, 1.0, (int(labels.max()) + 1, 3)).astype(np.float32)
    blended = np.where((labels > 0)[..., None], (1 - alpha) * image + alpha * palette[labels], image)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    PIL.Image.fromarray((np.clip(blended, 0, 1) * 255).round().astype(np.uint8)).save(path)
    return path


def evaluate_everything(model: nn.Module, rows, *, intensity: IntensityConfig = IntensityConfig(),
                        iou_threshold: float = 0.5, split: str = "test", **generator_options) -> dict:
    """Segment every image of a split with `generate_masks` and match the masks to its instances.

    Args:
        model: a `Sam2Model` or a `PeftModel` around one.
        rows: one split as `sam2_peft.data.load_source` returns it (rows with `image`, `mask`, `image_id`); every
            label value v > 0 of a mask is one reference object.
        intensity: how raw intensities map to [0, 1], as in training.
        iou_threshold: a predicted mask and an object match when their IoU is at least this.
        split: the split's name, for error messages.
        **generator_options: passed to `generate_masks` (`points_per_side`, `pred_iou_thresh`, ...).

    Returns:
        `aggregate_matches` over the images (summed counts, micro precision / recall / F1, mean matched IoU,
        panoptic quality), `num_images`, and `per_image`: one dict per image with `image_id` and its
        `match_instances` scores (without the pairs).

    Example:
        >>> rows = load_source("examples/data")["val"]
        >>> evaluate_everything(model, rows, points_per_side=16)["f1"]
    """
    per_image, matches = [], []
    for index, row in enumerate(rows):
        image, labels = decode_row(row, where=f"split {split!r}, row {index}", mask_type="instance")
        pixels = torch.from_numpy(normalize_intensity(image, intensity))
        predicted = [m["segmentation"] for m in generate_masks(model, pixels, **generator_options)]
        references = [labels == value for value in np.unique(labels) if value > 0]
        match = match_instances(predicted, references, iou_threshold=iou_threshold)
        matches.append(match)
        per_image.append({"image_id": row.get("image_id", str(index)),
                          **{key: value for key, value in match.items() if key != "pairs"}})
    if not per_image:
        raise ValueError(f"split {split!r} has no images to segment.")
    return {**aggregate_matches(matches), "num_images": len(per_image), "per_image": per_image}
