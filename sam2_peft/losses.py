"""SAM2 training losses, as in the official `training/loss_fns.py` (`MultiStepMultiMasksAndIous`).

    targets = downsample_targets(masks, out.mask_logits.shape[-2:])   # (N, S, S) -> (N, S/4, S/4) soft targets
    losses = sam2_loss(out.mask_logits, out.iou_scores, out.object_score_logits, targets, present)
    losses["loss"].backward()

Per object and prediction step: sigmoid focal (x20) + Dice (x1) on the best of the M candidate masks (lowest weighted
focal + Dice), an IoU-head loss (x1) against the real IoU of each candidate, and a BCE on the object score (x1). Mask
and IoU terms count only for objects present in the image. Every term is summed over objects and divided by the
number of objects, so the loss scale does not depend on the batch size. Defaults follow the SAM2.1 training config
(`sam2.1_hiera_b+_MOSE_finetune.yaml`: L1 IoU loss on all candidates).

Resolution: the official code upsamples the logits to the image size; we compare at the decoder's resolution
(S/4) against area-downsampled targets instead. It is 16x cheaper, and the soft targets (the fraction of each
low-resolution pixel covered by the object) keep the boundary information that nearest-neighbour would drop; the
focal and Dice formulas accept soft targets as they are.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from sam2_peft.segmenter import SegmenterOutput

LOSS_TERMS = ("focal", "dice", "iou", "object_score")


@dataclass
class LossWeights:
    """Weight of each term in the total loss (official SAM2 values by default)."""

    focal: float = 20.0
    """Sigmoid focal loss on the chosen mask (`loss_mask` in the official config)."""
    dice: float = 1.0
    """Dice loss on the chosen mask (`loss_dice`)."""
    iou: float = 1.0
    """IoU-head regression against the real IoU (`loss_iou`)."""
    object_score: float = 1.0
    """BCE of the object-presence logit (`loss_class`)."""

    def __post_init__(self):
        for name in LOSS_TERMS:
            if getattr(self, name) < 0:
                raise ValueError(f"`LossWeights.{name}` must be >= 0, got {getattr(self, name)}.")


def downsample_targets(masks: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Bring (N, S, S) target masks at model-input resolution down to the decoder's (N, h, w), as coverage fractions.

    Args:
        masks: (N, S, S) bool or float in [0, 1].
        size: `(h, w)`, usually `mask_logits.shape[-2:]` (S/4).

    Returns:
        (N, h, w) float32 in [0, 1]: the area average of each low-resolution pixel (`F.interpolate(mode="area")`).

    Example:
        >>> downsample_targets(torch.ones(2, 256, 256, dtype=torch.bool), (64, 64)).shape
        torch.Size([2, 64, 64])
    """
    if masks.dim() != 3:
        raise ValueError(f"Expected target masks of shape (N, S, S), got {tuple(masks.shape)}.")
    return F.interpolate(masks[:, None].float(), size=tuple(size), mode="area")[:, 0]


def _focal(logits: torch.Tensor, targets: torch.Tensor, alpha: float, gamma: float) -> torch.Tensor:
    """(N, M, h, w) -> (N, M) sigmoid focal loss (Lin et al. 2017, https://arxiv.org/abs/1708.02002), pixel mean."""
    prob = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = prob * targets + (1 - prob) * (1 - targets)
    loss = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
    return loss.flatten(2).mean(-1)


def _dice(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(N, M, h, w) -> (N, M) Dice loss, +1 smoothed, in the form valid for soft targets (Wang et al. 2023)."""
    prob = logits.sigmoid().flatten(2)
    targets = targets.flatten(2)
    denominator = prob.sum(-1) + targets.sum(-1)
    numerator = denominator - (prob - targets).abs().sum(-1)  # = 2 * sum(p * t) for binary targets
    return 1 - (numerator + 1) / (denominator + 1)


def _real_iou(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(N, M, h, w) -> (N, M) IoU of logits > 0 against targets >= 0.5; 0 when both are empty, as official."""
    pred = logits.flatten(2) > 0
    target = targets.flatten(2) >= 0.5
    intersection = (pred & target).sum(-1).to(logits.dtype)
    union = (pred | target).sum(-1).to(logits.dtype)
    return intersection / union.clamp(min=1)


def sam2_loss(
    mask_logits: torch.Tensor,
    iou_scores: torch.Tensor,
    object_score_logits: torch.Tensor,
    target_masks: torch.Tensor,
    object_present: torch.Tensor | None = None,
    weights: LossWeights | None = None,
    *,
    focal_alpha: float = 0.25,
    focal_gamma: float = 2.0,
    iou_loss: str = "l1",
    supervise_all_iou: bool = True,
    num_objects: float | None = None,
) -> dict[str, torch.Tensor]:
    """Compute the SAM2 loss of one prediction step.

    Args:
        mask_logits: (N, M, h, w) low-resolution mask logits, M candidates per object (1 or 3).
        iou_scores: (N, M) predicted IoU of each candidate.
        object_score_logits: (N, 1) object-presence logits.
        target_masks: (N, h, w) bool or float in [0, 1] (see `downsample_targets`).
        object_present: (N,) bool; default: the target has any foreground.
        weights: the term weights; default `LossWeights()`.
        focal_alpha: focal-loss class balance in [0, 1], or negative for none.
        focal_gamma: focal-loss focusing exponent, >= 0.
        iou_loss: `"l1"` (SAM2.1 config) or `"mse"` (the official code's default).
        supervise_all_iou: regress the IoU of all M candidates (SAM2.1 config) or only of the chosen one.
        num_objects: the normaliser; default N. Under data parallelism pass the mean object count per process.

    Returns:
        `{"loss", "focal", "dice", "iou", "object_score"}`: scalar tensors; `loss` is the weighted sum of the other
        four, which are unweighted and normalised per object.

    Example:
        >>> out = segmenter(pixel_values, image_index=idx, point_coords=coords, point_labels=labels)
        >>> targets = downsample_targets(masks, out.mask_logits.shape[-2:])
        >>> sam2_loss(out.mask_logits, out.iou_scores, out.object_score_logits, targets)["loss"].backward()
    """
    weights = weights or LossWeights()
    _check_inputs(mask_logits, iou_scores, object_score_logits, target_masks, object_present, iou_loss)
    n = mask_logits.shape[0]
    # Losses in at least float32: bf16/fp16 logits lose too much in the sigmoid and the pixel means.
    dtype = torch.promote_types(mask_logits.dtype, torch.float32)
    mask_logits = mask_logits.to(dtype)
    targets = target_masks.to(dtype)
    if object_present is None:
        object_present = targets.flatten(1).amax(1) > 0
    present = object_present.to(dtype)
    normaliser = float(max(n if num_objects is None else num_objects, 1))

    candidates = targets[:, None].expand_as(mask_logits)  # (N, h, w) -> (N, M, h, w)
    focal = _focal(mask_logits, candidates, focal_alpha, focal_gamma)  # (N, M)
    dice = _dice(mask_logits, candidates)
    real_iou = _real_iou(mask_logits.detach(), candidates)
    regression = F.l1_loss if iou_loss == "l1" else F.mse_loss
    iou = regression(iou_scores.to(dtype), real_iou, reduction="none")  # (N, M)

    # Gradients reach only the candidate with the lowest weighted focal + Dice loss: SAM's answer to ambiguity.
    best = (focal * weights.focal + dice * weights.dice).argmin(dim=1, keepdim=True)  # (N, 1)
    focal = focal.gather(1, best)[:, 0]
    dice = dice.gather(1, best)[:, 0]
    iou = iou.mean(1) if supervise_all_iou else iou.gather(1, best)[:, 0]
    object_score = F.binary_cross_entropy_with_logits(object_score_logits[:, 0].to(dtype), present, reduction="none")

    terms = {
        "focal": (focal * present).sum() / normaliser,
        "dice": (dice * present).sum() / normaliser,
        "iou": (iou * present).sum() / normaliser,
        "object_score": object_score.sum() / normaliser,
    }
    total = sum(terms[name] * getattr(weights, name) for name in LOSS_TERMS)
    return {"loss": total, **terms}


def _check_inputs(mask_logits, iou_scores, object_score_logits, target_masks, object_present, iou_loss) -> None:
    """Refuse `sam2_loss` inputs whose shapes disagree, naming each argument and the shape it must have."""
    if mask_logits.dim() != 4:
        raise ValueError(f"`mask_logits` must be (N, M, h, w), got {tuple(mask_logits.shape)}.")
    n, m = mask_logits.shape[:2]
    if target_masks.shape != (n, *mask_logits.shape[2:]):
        raise ValueError(
            f"`target_masks` must be (N, h, w) = {(n, *mask_logits.shape[2:])} to match `mask_logits` "
            f"(N, M, h, w) = {tuple(mask_logits.shape)}, got {tuple(target_masks.shape)}; see `downsample_targets`."
        )
    if iou_scores.shape != (n, m) or object_score_logits.shape != (n, 1):
        raise ValueError(
            f"Expected `iou_scores` {(n, m)} and `object_score_logits` {(n, 1)}, got {tuple(iou_scores.shape)} and "
            f"{tuple(object_score_logits.shape)}."
        )
    if object_present is not None and object_present.shape != (n,):
        raise ValueError(f"`object_present` must be (N,) = {(n,)}, got {tuple(object_present.shape)}.")
    if iou_loss not in ("l1", "mse"):
        raise ValueError(f"`iou_loss` must be 'l1' or 'mse', got {iou_loss!r}.")


def sam2_multistep_loss(
    steps: Sequence[SegmenterOutput],
    target_masks: torch.Tensor,
    object_present: torch.Tensor | None = None,
    weights: LossWeights | None = None,
    **options,
) -> dict[str, torch.Tensor]:
    """Sum `sam2_loss` over prediction steps (the initial prompt, then each round of correction clicks), as official.

    Args:
        steps: the segmenter outputs of each step, all for the same N objects.
        target_masks: (N, h, w) targets shared by every step.
        object_present: (N,) bool; default: the target has any foreground.
        weights: the term weights; default `LossWeights()`.
        **options: the keyword options of `sam2_loss`.

    Returns:
        `{"loss", "focal", "dice", "iou", "object_score"}`, each the sum over steps.
    """
    if not steps:
        raise ValueError("`steps` is empty; pass at least the first prediction step.")
    per_step = [
        sam2_loss(
            s.mask_logits, s.iou_scores, s.object_score_logits, target_masks, object_present, weights, **options
        )
        for s in steps
    ]
    return {key: sum(losses[key] for losses in per_step) for key in per_step[0]}
