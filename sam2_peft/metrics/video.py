"""Video object segmentation scores: DAVIS region similarity J, boundary F-measure F, J&F, and volume Dice.

    from sam2_peft.metrics.video import aggregate_clips, score_clip
    clip = score_clip(pred, target, clip_id="bike")      # pred, target: (T, N, H, W) bool, T frames, N objects
    clip.j, clip.f, clip.dice                            # (N,) per object
    aggregate_clips([clip, ...])   # {"j", "f", "j_and_f", "dice", "per_clip": {...}, "per_object": {...}, ...}

The definitions are the DAVIS benchmark's (Perazzi et al. 2016, https://arxiv.org/abs/1704.00675; the reference code
is `davis2017-evaluation`'s `db_eval_iou` and `db_eval_boundary`):

- **J** of a frame is the IoU of the predicted and the reference mask; both empty gives 1.
- **F** of a frame is the F-measure of boundary precision and recall. Boundaries are DAVIS's `seg2bmap`: a pixel is
  on the boundary when it differs from its right, lower or lower-right neighbour (on the last row only the right
  neighbour counts, on the last column only the lower one, and the bottom-right corner never is), so a boundary sits
  half a pixel towards the origin and an edge of the mask lying on the image's last row or column is no boundary.
  A boundary pixel matches when a pixel of the other boundary lies within `bound_pix` of it (a disk dilation,
  integer offsets `dx^2 + dy^2 <= bound_pix^2`); `bound_pix = ceil(bound_th * sqrt(H^2 + W^2))` for
  `bound_th < 1` (the default 0.008 gives 6 pixels at 512x512) and `bound_pix = bound_th` pixels otherwise.
  Both boundaries empty gives F = 1, exactly one empty gives F = 0.
- **J&F** is `(J + F) / 2`.
- **Dice** of an object is the 3-D Dice over all scored frames of its clip, pixels pooled (what a NIfTI volume's
  Dice is); both volumes empty gives 1.

Averages: an object's J and F are the means over its scored frames; a clip's scores, and the overall `j`, `f`,
`dice`, are means over objects (DAVIS's "J-Mean": every object of every clip weighs the same, whatever its clip's
length); the overall `j_and_f = (j + f) / 2`, which equals the mean over objects of their J&F. DAVIS's
semi-supervised protocol scores neither the first (prompted) nor the last frame: pass
`frames=range(1, T - 1)` for that. DAVIS's void pixels (label 255) are not handled here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from sam2_peft.metrics.kernels import scores_from_counts

BOUND_TH = 0.008
"""DAVIS's boundary tolerance: a fraction of the image diagonal (< 1) or a number of pixels (>= 1)."""
SCORE_KEYS = ("j", "f", "j_and_f", "dice")
# Pixels per chunk of masks whose boundaries are held at once (bool: 32 MiB per map).
_CHUNK_PIXELS = 1 << 25


def boundary_map(masks: torch.Tensor) -> torch.Tensor:
    """Return DAVIS's `seg2bmap` boundary of each mask (see the module docstring for which pixels it marks).

    Not `kernels.mask_boundaries` (4-neighbour boundaries inside the mask, which HD95 and NSD use): F is only
    comparable with published DAVIS numbers on these.

    Args:
        masks: (..., H, W) bool.

    Returns:
        (..., H, W) bool boundary pixels.
    """
    boundary = torch.zeros_like(masks)
    inner = masks[..., :-1, :-1]
    right, below, below_right = masks[..., :-1, 1:], masks[..., 1:, :-1], masks[..., 1:, 1:]
    boundary[..., :-1, :-1] = (inner ^ right) | (inner ^ below) | (inner ^ below_right)
    boundary[..., -1, :-1] = masks[..., -1, :-1] ^ masks[..., -1, 1:]  # last row: the right neighbour only
    boundary[..., :-1, -1] = masks[..., :-1, -1] ^ masks[..., 1:, -1]  # last column: the lower neighbour only
    return boundary


def boundary_radius(height: int, width: int, bound_th: float = BOUND_TH) -> float:
    """The matching distance in pixels: `ceil(bound_th * diagonal)` for `bound_th < 1`, else `bound_th` itself.

    Example:
        >>> boundary_radius(480, 854)      # a DAVIS frame
        8.0
    """
    if bound_th <= 0:
        raise ValueError(f"bound_th={bound_th!r} must be positive: a fraction of the diagonal (< 1) or pixels.")
    return float(bound_th) if bound_th >= 1 else float(math.ceil(bound_th * math.hypot(height, width)))


def _column_major_keys(boundary: torch.Tensor) -> torch.Tensor:
    """(M, H, W) bool -> sorted (P,) int64 keys `(m * W + x) * H + y` of its pixels, so each column is one run."""
    return boundary.transpose(1, 2).flatten().nonzero().squeeze(1)


def _matched_counts(source: torch.Tensor, target: torch.Tensor, radius: float) -> torch.Tensor:
    """(M,) number of `source` boundary pixels within `radius` of a `target` boundary pixel, per mask.

    Equal to `(source & binary_dilation(target, disk(radius))).sum()` with integer offsets `dx^2 + dy^2 <= r^2`,
    but looked up at the sparse source pixels only: for each column offset dx, a binary search counts the target
    pixels of column x + dx between rows y - h and y + h, h = floor(sqrt(r^2 - dx^2)).
    """
    num_masks, height, width = source.shape
    index, rows, cols = source.nonzero(as_tuple=True)  # (P,) each
    keys = _column_major_keys(target)  # (Q,)
    hit = torch.zeros_like(index, dtype=torch.bool)
    reach = int(math.floor(radius))
    for dx in range(-reach, reach + 1):
        half = int(math.floor(math.sqrt(radius * radius - dx * dx)))
        column = cols + dx
        inside = (column >= 0) & (column < width)
        base = (index * width + column.clamp(0, width - 1)) * height
        low = base + (rows - half).clamp(min=0)
        high = base + (rows + half).clamp(max=height - 1)
        found = torch.searchsorted(keys, high, right=True) - torch.searchsorted(keys, low)
        hit |= inside & (found > 0)
    return torch.bincount(index[hit], minlength=num_masks)


def _pixel_counts(masks: torch.Tensor) -> torch.Tensor:
    """(M, H, W) bool -> (M,) int64 number of set pixels."""
    if masks.device.type == "cpu":  # numpy counts bool bytes about 5x faster than torch's sum
        return torch.from_numpy(np.count_nonzero(masks.reshape(masks.shape[0], -1).numpy(), axis=1).astype(np.int64))
    return masks.flatten(1).sum(1)


def boundary_f_measure(pred: torch.Tensor, target: torch.Tensor, bound_th: float = BOUND_TH) -> torch.Tensor:
    """DAVIS's boundary F-measure of each predicted mask against its reference.

    Args:
        pred: (M, H, W) bool predicted masks.
        target: (M, H, W) bool reference masks.
        bound_th: matching tolerance, a fraction of the image diagonal (< 1) or pixels (>= 1).

    Returns:
        (M,) float64 F in [0, 1] on the masks' device.

    Example:
        >>> boundary_f_measure(pred_masks, target_masks)     # (M,)
    """
    radius = boundary_radius(pred.shape[-2], pred.shape[-1], bound_th)
    chunk = max(1, _CHUNK_PIXELS // max(1, pred.shape[-2] * pred.shape[-1]))
    pred_matched, target_matched, pred_total, target_total = [], [], [], []
    for start in range(0, pred.shape[0], chunk):
        pred_boundary = boundary_map(pred[start : start + chunk])
        target_boundary = boundary_map(target[start : start + chunk])
        pred_matched.append(_matched_counts(pred_boundary, target_boundary, radius))
        target_matched.append(_matched_counts(target_boundary, pred_boundary, radius))
        pred_total.append(_pixel_counts(pred_boundary))
        target_total.append(_pixel_counts(target_boundary))
    if not pred_total:
        return torch.zeros(0, dtype=torch.float64, device=pred.device)
    pred_total, target_total = torch.cat(pred_total).double(), torch.cat(target_total).double()
    precision = torch.cat(pred_matched).double() / pred_total.clamp(min=1)
    recall = torch.cat(target_matched).double() / target_total.clamp(min=1)
    f = torch.where(precision + recall > 0, 2 * precision * recall / (precision + recall).clamp(min=1e-12), 0.0)
    pred_empty, target_empty = pred_total == 0, target_total == 0
    # DAVIS: both empty is a perfect 1; one empty gives precision or recall 0, hence F = 0.
    f = torch.where(pred_empty | target_empty, (pred_empty & target_empty).double(), f)
    return f


@dataclass
class ClipScores:
    """The scores of one clip's objects.

    Attributes:
        clip_id: the clip's name (keys of `aggregate_clips`'s `per_clip`).
        object_ids: N object names, by default the label values `"1"` ... `"N"`.
        frames: the T' frame indices that were scored.
        j_per_frame: (T', N) float64 region similarity of each scored frame and object.
        f_per_frame: (T', N) float64 boundary F-measure.
        dice: (N,) float64 Dice of each object over the scored frames (3-D, pixels pooled).
    """

    clip_id: str | None
    object_ids: list[str]
    frames: list[int]
    j_per_frame: np.ndarray
    f_per_frame: np.ndarray
    dice: np.ndarray

    @property
    def j(self) -> np.ndarray:
        """(N,) each object's mean J over the scored frames."""
        return self.j_per_frame.mean(axis=0)

    @property
    def f(self) -> np.ndarray:
        """(N,) each object's mean F over the scored frames."""
        return self.f_per_frame.mean(axis=0)

    @property
    def j_and_f(self) -> np.ndarray:
        """(N,) each object's `(J + F) / 2`."""
        return (self.j + self.f) / 2

    def per_object(self) -> dict[str, dict[str, float]]:
        """`{object_id: {"j", "f", "j_and_f", "dice"}}` as plain floats."""
        columns = {"j": self.j, "f": self.f, "j_and_f": self.j_and_f, "dice": self.dice}
        return {name: {key: float(columns[key][i]) for key in SCORE_KEYS} for i, name in enumerate(self.object_ids)}

    def means(self) -> dict[str, float]:
        """`{"j", "f", "j_and_f", "dice"}`: means over this clip's objects."""
        j, f = float(self.j.mean()), float(self.f.mean())
        return {"j": j, "f": f, "j_and_f": (j + f) / 2, "dice": float(self.dice.mean())}


def _as_masks(value, name: str) -> torch.Tensor:
    masks = value if isinstance(value, torch.Tensor) else torch.from_numpy(np.asarray(value))
    if masks.dtype != torch.bool:
        raise TypeError(f"`{name}` must be bool masks, got {masks.dtype}; threshold first, e.g. `logits > 0`.")
    if masks.dim() != 4:
        raise ValueError(f"`{name}` must be (T, N, H, W) masks (T frames, N objects), got shape {tuple(masks.shape)}.")
    return masks


def score_clip(
    pred, target, *, object_ids: Sequence | None = None, clip_id: str | None = None,
    frames: Sequence[int] | None = None, bound_th: float = BOUND_TH,
) -> ClipScores:  # fmt: skip
    """Score the N objects of one clip: J and F per frame, their means, and each object's volume Dice.

    Args:
        pred: (T, N, H, W) bool predicted masks (numpy or torch; torch stays on its device), T frames, N objects.
        target: (T, N, H, W) bool reference masks, object n of `pred` matched with object n of `target`.
        object_ids: N names for the objects; default the label values 1 ... N.
        clip_id: the clip's name.
        frames: indices of the frames to score (all by default); `range(1, T - 1)` is DAVIS's semi-supervised
            protocol, which leaves out the prompted first frame and the last one.
        bound_th: F's boundary tolerance (see `boundary_radius`).

    Returns:
        A `ClipScores`.

    Example:
        >>> clip = score_clip(pred_masks, true_masks, clip_id="bike")
        >>> clip.means()["j_and_f"]
    """
    pred, target = _as_masks(pred, "pred"), _as_masks(target, "target")
    if pred.shape != target.shape:
        raise ValueError(
            f"`pred` {tuple(pred.shape)} and `target` {tuple(target.shape)} differ; both are (T, N, H, W)."
        )
    num_frames, num_objects = pred.shape[:2]
    frames = list(range(num_frames)) if frames is None else [int(t) for t in frames]
    if not frames or num_objects == 0 or any(not 0 <= t < num_frames for t in frames):
        raise ValueError(
            f"Nothing to score in clip {clip_id!r}: {num_objects} objects, frames={frames} of {num_frames}; "
            "pass at least one object and frame indices in [0, T)."
        )
    object_ids = [str(i + 1) for i in range(num_objects)] if object_ids is None else [str(i) for i in object_ids]
    if len(object_ids) != num_objects or len(set(object_ids)) != num_objects:
        raise ValueError(f"object_ids={object_ids} must name each of the {num_objects} objects once.")
    if frames != list(range(num_frames)):  # indexing copies: only when a subset is asked for
        pred, target = pred[frames], target[frames]  # (T', N, H, W)
    flat_pred, flat_target = pred.flatten(0, 1), target.flatten(0, 1)  # (T' * N, H, W)
    tp = _pixel_counts(flat_pred & flat_target)
    fp, fn = _pixel_counts(flat_pred) - tp, _pixel_counts(flat_target) - tp
    j = scores_from_counts(tp, fp, fn)["iou"].view(len(frames), num_objects)
    f = boundary_f_measure(flat_pred, flat_target, bound_th).view(len(frames), num_objects)
    volume = [counts.view(len(frames), num_objects).sum(0) for counts in (tp, fp, fn)]
    dice = scores_from_counts(*volume)["dice"]
    return ClipScores(
        clip_id=clip_id, object_ids=object_ids, frames=frames,
        j_per_frame=j.cpu().numpy(), f_per_frame=f.cpu().numpy(), dice=dice.cpu().numpy(),
    )  # fmt: skip


def aggregate_clips(clips: Sequence[ClipScores]) -> dict:
    """Average clips DAVIS's way: every object of every clip weighs the same.

    Args:
        clips: `score_clip` results; a clip without `clip_id` is named by its position in the list.

    Returns:
        A JSON-ready dict: `j`, `f`, `dice` (means over all objects of their per-object means), `j_and_f`
        (`(j + f) / 2`), `num_clips`, `num_objects`, `num_frames` (scored frames summed over clips), `per_clip`
        `{clip_id: {"j", "f", "j_and_f", "dice"}}` (means over the clip's objects) and `per_object`
        `{"clip_id/object_id": {"j", "f", "j_and_f", "dice"}}`.

    Example:
        >>> aggregate_clips([score_clip(pred, target, clip_id="bike")])["j_and_f"]
    """
    if not clips:
        raise ValueError("aggregate_clips needs at least one ClipScores; no clip was scored.")
    names = [str(index) if clip.clip_id is None else str(clip.clip_id) for index, clip in enumerate(clips)]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ValueError(f"Clip ids {repeated} occur more than once; give each clip its own `clip_id`.")
    per_object = {
        f"{name}/{object_id}": scores
        for name, clip in zip(names, clips)
        for object_id, scores in clip.per_object().items()
    }
    j = float(np.mean([scores["j"] for scores in per_object.values()]))
    f = float(np.mean([scores["f"] for scores in per_object.values()]))
    return {
        "j": j,
        "f": f,
        "j_and_f": (j + f) / 2,
        "dice": float(np.mean([scores["dice"] for scores in per_object.values()])),
        "num_clips": len(clips),
        "num_objects": len(per_object),
        "num_frames": sum(len(clip.frames) for clip in clips),
        "per_clip": {name: clip.means() for name, clip in zip(names, clips)},
        "per_object": per_object,
    }


def masks_from_label_maps(label_maps, object_ids: Sequence[int]) -> np.ndarray:
    """Turn (T, H, W) label maps (object i = value i, 0 background) into (T, N, H, W) bool masks.

    Example:
        >>> masks_from_label_maps(np.stack(track_outputs), object_ids=[1, 2]).shape
        (T, 2, H, W)
    """
    labels = np.asarray(label_maps)
    if labels.ndim != 3:
        raise ValueError(f"label_maps must be (T, H, W), got shape {labels.shape}.")
    return labels[:, None] == np.asarray(list(object_ids)).reshape(1, -1, 1, 1)
