"""Prompt simulation: jittered boxes, positive/negative clicks, mask prompts and correction clicks.

Training follows official SAM2 (`sam2/modeling/sam2_utils.py`): each object gets a box (with probability
`box_prob`, corners jittered by `box_noise` of the box side, at most `box_noise_max` model-input pixels) or clicks;
later rounds add one correction click from the error region of the previous prediction
(`sample_correction_clicks`). Evaluation uses a fixed protocol (`EvalPrompt`): `box`, `point` or `points:K`.

Prompts are computed on the object's mask at its own resolution (pixel indices, as official SAM2) and mapped to
model-input pixels by the `Preprocessor`; they come out in the segmenter's layout (`combine_prompts`: box corners
labelled 2 and 3, clicks 1 / 0, padding -10).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.nn import functional as F

from sam2_peft.data.io import DataError
from sam2_peft.data.objects import mask_to_box
from sam2_peft.data.transforms import Preprocessor
from sam2_peft.segmenter import NEGATIVE, PADDING, POSITIVE, combine_prompts

# Logit given to mask-prompt pixels: large enough that sigmoid(logit) is ~1 / ~0, like a confident prediction.
MASK_PROMPT_LOGIT = 10.0


@dataclass(frozen=True)
class PromptConfig:
    """Random prompts for training.

    Attributes:
        box_prob: probability that an object is prompted with a box (else with clicks); official SAM2 uses 0.5.
        box_noise: corner jitter as a fraction of the box width / height (official: 0.1).
        box_noise_max: cap on that jitter, in model-input pixels (official: 20).
        num_positive: clicks inside the object when it gets clicks.
        num_negative: clicks outside it.
        mask_prompts: also give every object a low-resolution mask prompt (its target, randomly dilated or eroded).
    """

    box_prob: float = 0.5
    box_noise: float = 0.1
    box_noise_max: float = 20.0
    num_positive: int = 1
    num_negative: int = 0
    mask_prompts: bool = False

    def __post_init__(self):
        if not 0.0 <= self.box_prob <= 1.0:
            raise DataError(f"box_prob={self.box_prob} must be in [0, 1].")
        if self.box_prob < 1.0 and self.num_positive + self.num_negative < 1:
            raise DataError("num_positive + num_negative must be >= 1 when box_prob < 1 (objects without a box need clicks).")


@dataclass(frozen=True)
class EvalPrompt:
    """A deterministic evaluation protocol: `box`, `point` (the object's innermost pixel) or `points:K` (K seeded clicks).

    Example:
        >>> EvalPrompt.parse("points:3").num_points
        3
    """

    kind: str
    num_points: int = 1

    @classmethod
    def parse(cls, spec: str) -> EvalPrompt:
        """Parse `box`, `point` or `points:K`."""
        if spec in ("box", "point"):
            return cls(spec)
        head, _, count = spec.partition(":")
        if head == "points" and count.isdigit() and int(count) >= 1:
            return cls("points", int(count))
        raise DataError(f"prompt={spec!r} is not a protocol; use 'box', 'point' or 'points:K' (K >= 1).")


@dataclass
class Prompts:
    """Prompts for N objects in model-input pixels.

    Attributes:
        point_coords: (N, K, 2) float32 `x, y`.
        point_labels: (N, K) int64; 2/3 box corners, 1 positive, 0 negative, -10 padding.
        mask_inputs: (N, 1, S/4, S/4) float32 logits, or None.
    """

    point_coords: torch.Tensor
    point_labels: torch.Tensor
    mask_inputs: torch.Tensor | None = None


def simulate_prompts(
    masks: np.ndarray, preprocessor: Preprocessor, config: PromptConfig, rng: np.random.Generator
) -> Prompts:
    """Draw training prompts for (N, H, W) bool masks; an empty mask (a negative image) gets one random click."""
    size = masks.shape[1:]
    boxes = preprocessor.scale_coords(torch.from_numpy(mask_to_box(masks)).view(-1, 2, 2), size).view(-1, 4)
    per_object = []
    for mask, box in zip(masks, boxes):
        if mask.any() and rng.random() < config.box_prob:
            per_object.append(combine_prompts(boxes=_jitter(box, config, preprocessor.image_size, rng)[None]))
            continue
        if mask.any():
            points, labels = _clicks(mask, config.num_positive, config.num_negative, rng)
        else:
            points, labels = _random_pixels(np.ones_like(mask), 1, rng), np.full(1, POSITIVE)
        coords = preprocessor.scale_coords(torch.from_numpy(points), size)
        per_object.append(combine_prompts(points=coords[None], point_labels=torch.from_numpy(labels)[None]))
    coords, labels = pad_prompts(per_object)
    mask_inputs = _mask_prompts(masks, preprocessor, rng) if config.mask_prompts else None
    return Prompts(coords, labels, mask_inputs)


def eval_prompts(
    masks: np.ndarray, preprocessor: Preprocessor, prompt: EvalPrompt, rng: np.random.Generator
) -> Prompts:
    """Prompts of a fixed protocol for (N, H, W) bool masks (non-empty); `rng` matters only for `points:K`."""
    size = masks.shape[1:]
    if prompt.kind == "box":
        corners = torch.from_numpy(mask_to_box(masks)).view(-1, 2, 2)
        return Prompts(*combine_prompts(boxes=preprocessor.scale_coords(corners, size).view(-1, 4)))
    if prompt.kind == "point":
        points = np.stack([innermost_pixel(mask) for mask in masks])[:, None]
    else:
        points = np.stack([_random_pixels(mask, prompt.num_points, rng) for mask in masks])
    coords = preprocessor.scale_coords(torch.from_numpy(points), size)
    return Prompts(*combine_prompts(points=coords, point_labels=torch.full(coords.shape[:2], POSITIVE)))


def innermost_pixel(mask: np.ndarray) -> np.ndarray:
    """Return `x, y` of a pixel farthest (in chessboard distance) from the mask's border: a deterministic centre click.

    Repeated 3x3 erosion on the object's bounding box; the first surviving pixel in raster order wins.
    """
    if not mask.any():
        raise ValueError("innermost_pixel needs a non-empty mask: an empty object has no pixel to click.")
    x0, y0, x1, y1 = mask_to_box(mask[None])[0].astype(int)
    # Pad by one background pixel so the image border counts as the object's border.
    crop = torch.from_numpy(np.pad(mask[y0 : y1 + 1, x0 : x1 + 1], 1))[None, None].float()
    while True:
        eroded = -F.max_pool2d(-crop, 3, stride=1, padding=1)
        if not eroded.any():
            break
        crop = eroded
    y, x = np.argwhere(crop[0, 0].numpy() > 0)[0]
    return np.array([x - 1 + x0, y - 1 + y0], np.float32)


def pad_prompts(prompts: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack (n_i, K_i, 2) coords / (n_i, K_i) labels along objects, padding K with label -10 at (0, 0)."""
    width = max(coords.shape[1] for coords, _ in prompts)
    all_coords, all_labels = [], []
    for coords, labels in prompts:
        missing = width - coords.shape[1]
        all_coords.append(F.pad(coords.float(), (0, 0, 0, missing)))
        all_labels.append(F.pad(labels.long(), (0, missing), value=PADDING))
    return torch.cat(all_coords), torch.cat(all_labels)


def sample_correction_clicks(
    pred_masks: torch.Tensor,
    target_masks: torch.Tensor,
    generator: torch.Generator | None = None,
    method: str = "uniform",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample one correction click per object from where the prediction is wrong.

    A click in a missed region (false negative) is positive, one in a spurious region (false positive) negative.
    `uniform` draws a pixel uniformly from all error pixels, as official SAM2's `sample_random_points_from_errors`
    (so the larger error region is proportionally likelier); `largest` first picks the larger of the two regions,
    then a pixel in it. Objects predicted perfectly get a padding click (label -10), which the prompt encoder ignores.

    Args:
        pred_masks: (N, S, S) bool, the previous prediction (e.g. best-mask logits > 0, upsampled to S).
        target_masks: (N, S, S) bool, the targets (`batch["masks"]`).
        generator: a torch generator on the masks' device, for reproducible clicks.
        method: `uniform` or `largest`.

    Returns:
        coords (N, 1, 2) float32 `x, y` in model-input pixels, labels (N, 1) int64; append them to the prompts with
        `torch.cat(..., dim=1)`.

    Example:
        >>> coords, labels = sample_correction_clicks(torch.zeros(1, 4, 4, dtype=torch.bool), torch.ones(1, 4, 4, dtype=torch.bool))
        >>> labels.tolist()
        [[1]]
    """
    if pred_masks.shape != target_masks.shape or pred_masks.dim() != 3:
        raise ValueError(f"pred_masks {tuple(pred_masks.shape)} and target_masks {tuple(target_masks.shape)} must both be (N, S, S).")
    if method not in ("uniform", "largest"):
        raise ValueError(f"method={method!r}; use 'uniform' or 'largest'.")
    pred, target = pred_masks.bool().flatten(1), target_masks.bool().flatten(1)
    false_neg, false_pos = target & ~pred, pred & ~target
    if method == "uniform":
        region = false_neg | false_pos
    else:
        use_fn = false_neg.sum(1, keepdim=True) >= false_pos.sum(1, keepdim=True)
        region = torch.where(use_fn, false_neg, false_pos)
    noise = torch.rand(region.shape, generator=generator, device=region.device)
    # +1 keeps every error pixel above every correct pixel, even where the noise draws 0.
    index = ((noise + 1) * region).argmax(dim=1)
    width = pred_masks.shape[-1]
    coords = torch.stack([index % width, index // width], dim=1).float()[:, None]
    labels = torch.where(false_neg.gather(1, index[:, None]), POSITIVE, NEGATIVE)
    has_error = region.any(dim=1, keepdim=True)
    labels = torch.where(has_error, labels, PADDING).long()
    return coords * has_error[..., None], labels


def _jitter(box: torch.Tensor, config: PromptConfig, image_size: int, rng: np.random.Generator) -> torch.Tensor:
    side = torch.stack([box[2] - box[0], box[3] - box[1]]).repeat(2)
    bound = torch.clamp(side * config.box_noise, max=config.box_noise_max)
    noise = torch.from_numpy(rng.uniform(-1.0, 1.0, 4).astype(np.float32))
    return (box + noise * bound).clamp(0, image_size)


def _clicks(mask: np.ndarray, positive: int, negative: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    points = [_random_pixels(mask, positive, rng)]
    labels = [np.full(positive, POSITIVE)]
    if negative and not mask.all():
        points.append(_random_pixels(~mask, negative, rng))
        labels.append(np.full(negative, NEGATIVE))
    return np.concatenate(points), np.concatenate(labels)


def _random_pixels(region: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """`count` pixels drawn uniformly (with replacement) from a non-empty (H, W) region, as (count, 2) `x, y`."""
    flat = np.flatnonzero(region)
    picks = flat[rng.integers(0, flat.size, count)]
    return np.stack([picks % region.shape[1], picks // region.shape[1]], axis=1).astype(np.float32)


def _mask_prompts(masks: np.ndarray, preprocessor: Preprocessor, rng: np.random.Generator) -> torch.Tensor:
    side = preprocessor.mask_input_size
    low = F.interpolate(torch.from_numpy(masks)[:, None].float(), size=(side, side), mode="area") > 0.5
    low = low.float()
    # Imperfect like a real previous prediction: each mask grows or shrinks by a pixel, or stays.
    for i, change in enumerate(rng.integers(-1, 2, len(masks))):
        if change:
            low[i] = change * F.max_pool2d(change * low[i : i + 1], 3, stride=1, padding=1)[0]
    return (low * 2 - 1) * MASK_PROMPT_LOGIT
