"""Instance-level scores: match predicted masks one-to-one to reference objects at an IoU threshold.

    from sam2_peft.metrics.instances import aggregate_matches, match_instances
    per_image = [match_instances(predicted, reference, iou_threshold=0.5) for predicted, reference in images]
    totals = aggregate_matches(per_image)      # summed counts, micro precision / recall / F1, panoptic quality

This is how "segment everything" output is scored (`sam2-peft eval --prompt everything`): a predicted mask is a
true positive when it is matched to an object with IoU >= `iou_threshold`, every other prediction is a false
positive, every unmatched object a false negative.

Matching is greedy by IoU (the highest-IoU pair first, each mask and object used at most once, as COCO's matching
with IoU in place of detection scores). Where the reference objects do not overlap (they come from a label map) and
`iou_threshold >= 0.5`, a prediction can reach the threshold with at most one object, so greedy matching is also the
maximum matching (the Hungarian assignment's count and summed IoU); with overlapping references or lower thresholds
it may match fewer pairs than an optimal assignment would.

Conventions: an image with no prediction and no object scores 1.0 in precision, recall, F1 and panoptic quality;
otherwise a ratio with an empty denominator (precision without predictions, recall without objects) is 0.0.
`mean_matched_iou` is NaN when nothing matched.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

COUNT_KEYS = ("true_positives", "false_positives", "false_negatives")


def iou_matrix(predicted: Sequence[np.ndarray], reference: Sequence[np.ndarray]) -> np.ndarray:
    """(P, R) IoU of every predicted mask with every reference mask (0 where both are empty).

    Args:
        predicted: P (H, W) bool masks; reference: R (H, W) bool masks of the same size.
    """
    masks = [np.asarray(m, bool) for m in (*predicted, *reference)]
    if len({m.shape for m in masks}) > 1:
        raise ValueError(f"All masks of one image must have one (H, W) size; got {sorted({m.shape for m in masks})}.")
    if not predicted or not reference:
        return np.zeros((len(predicted), len(reference)))
    references = np.stack(masks[len(predicted) :]).reshape(len(reference), -1)  # (R, H * W)
    reference_areas = references.sum(axis=1)
    ious = np.zeros((len(predicted), len(reference)))
    for row, mask in enumerate(masks[: len(predicted)]):
        pixels = np.flatnonzero(mask)
        intersection = references[:, pixels].sum(axis=1)
        union = len(pixels) + reference_areas - intersection
        ious[row] = np.divide(intersection, union, out=np.zeros(len(reference)), where=union > 0)
    return ious


def match_instances(
    predicted: Sequence[np.ndarray], reference: Sequence[np.ndarray], iou_threshold: float = 0.5
) -> dict:
    """Match predicted masks to reference objects one-to-one (greedy by IoU) and score one image.

    Args:
        predicted: P (H, W) bool masks (e.g. `generate_masks`' `segmentation`s).
        reference: R (H, W) bool masks, one per object.
        iou_threshold: pairs with IoU >= this can match, in (0, 1].

    Returns:
        `precision`, `recall`, `f1`, `panoptic_quality` (summed matched IoU / (TP + FP / 2 + FN / 2)),
        `mean_matched_iou`, `true_positives`, `false_positives`, `false_negatives`, `num_predicted`,
        `num_reference`, and `pairs`: (predicted index, reference index, IoU) of each match, by decreasing IoU.

    Example:
        >>> square = np.zeros((4, 4), bool); square[:2, :2] = True
        >>> match_instances([square, square], [square])["precision"]      # the duplicate is a false positive
        0.5
    """
    if not 0.0 < iou_threshold <= 1.0:
        raise ValueError(f"iou_threshold={iou_threshold} must be in (0, 1]; 0.5 is the usual choice.")
    ious = iou_matrix(predicted, reference)
    rows, columns = np.nonzero(ious >= iou_threshold)
    order = np.lexsort((columns, rows, -ious[rows, columns]))  # highest IoU first, ties by index
    used_predicted, used_reference, pairs = set(), set(), []
    for row, column in zip(rows[order].tolist(), columns[order].tolist()):
        if row not in used_predicted and column not in used_reference:
            used_predicted.add(row)
            used_reference.add(column)
            pairs.append((row, column, float(ious[row, column])))
    true_positives = len(pairs)
    counts = dict(zip(COUNT_KEYS, (true_positives, len(predicted) - true_positives, len(reference) - true_positives)))
    scores = scores_from_counts(**counts, matched_iou_sum=sum(iou for _, _, iou in pairs))
    return {**scores, **counts, "num_predicted": len(predicted), "num_reference": len(reference), "pairs": pairs}


def scores_from_counts(
    true_positives: int, false_positives: int, false_negatives: int, matched_iou_sum: float
) -> dict[str, float]:
    """Precision, recall, F1, panoptic quality and mean matched IoU from match counts (conventions above)."""
    predicted, reference = true_positives + false_positives, true_positives + false_negatives

    def ratio(numerator: float, denominator: float) -> float:
        if denominator == 0:
            return 1.0 if predicted == reference == 0 else 0.0
        return float(numerator / denominator)

    return {
        "precision": ratio(true_positives, predicted),
        "recall": ratio(true_positives, reference),
        "f1": ratio(2 * true_positives, predicted + reference),
        "panoptic_quality": ratio(matched_iou_sum, (predicted + reference) / 2),
        "mean_matched_iou": matched_iou_sum / true_positives if true_positives else float("nan"),
    }


def aggregate_matches(matches: Sequence[dict]) -> dict:
    """Pool `match_instances` results over images: summed counts and micro-averaged scores.

    Returns:
        The counts summed, `precision`, `recall`, `f1`, `panoptic_quality` and `mean_matched_iou` computed from
        them (every matched pair weighs the same, whatever its image), and `mean_image_f1`, the mean of the images'
        F1.

    Example:
        >>> square = np.zeros((4, 4), bool); square[:2, :2] = True
        >>> aggregate_matches([match_instances([square], [square]), match_instances([], [square])])["recall"]
        0.5
    """
    if not matches:
        raise ValueError("No image to aggregate: pass one `match_instances` result per image.")
    counts = {key: sum(match[key] for match in matches) for key in COUNT_KEYS}
    iou_sum = sum(iou for match in matches for _, _, iou in match["pairs"])
    return {
        **scores_from_counts(**counts, matched_iou_sum=iou_sum),
        **counts,
        "mean_image_f1": float(np.mean([match["f1"] for match in matches])),
    }
