"""Segmentation metrics: an `evaluate` module over batched torch kernels.

    import sam2_peft.metrics
    metric = sam2_peft.metrics.load()
    metric.compute(predictions=[pred_mask], references=[true_mask])    # {"dice", "iou", "precision", "recall", ...}

    # video clips (T frames, N objects): DAVIS J, F, J&F and volume Dice
    clip = sam2_peft.metrics.score_clip(pred, target, clip_id="bike")        # (T, N, H, W) bool each
    sam2_peft.metrics.aggregate_clips([clip])                               # {"j", "f", "j_and_f", "dice", ...}

    # inside a training loop, on the GPU:
    sam2_peft.metrics.segmentation_scores(logits[:, 0] > 0, targets > 0.5)["dice"].mean()
"""

from pathlib import Path

from sam2_peft.metrics.aggregate import compute_metrics
from sam2_peft.metrics.kernels import (
    confusion_counts,
    mask_boundaries,
    scores_from_counts,
    segmentation_scores,
    surface_scores,
)
from sam2_peft.metrics.video import (
    ClipScores,
    aggregate_clips,
    boundary_f_measure,
    boundary_map,
    masks_from_label_maps,
    score_clip,
)

METRIC_SCRIPT = str(Path(__file__).with_name("segmentation.py"))
"""Path of the metric script, for `evaluate.load(METRIC_SCRIPT)`."""


def load(**kwargs):
    """Build the segmentation metric as an `evaluate.Metric`, without touching the network.

    Args:
        **kwargs: passed to `evaluate.Metric` (e.g. `experiment_id`, `num_process`, `process_id`, `cache_dir`).

    Returns:
        A `SegmentationMetric`; its `compute(predictions=, references=, image_ids=, class_ids=, nsd_tolerance=,
        spacing=)` returns the keys documented in `sam2_peft.metrics.aggregate`.

    Example:
        >>> metric = load()
        >>> metric.compute(predictions=[np.ones((4, 4), bool)], references=[np.ones((4, 4), bool)])["iou"]
        1.0
    """
    # Imported here: `evaluate` pulls in `datasets`, which the training loop's use of the kernels doesn't need.
    from sam2_peft.metrics.segmentation import SegmentationMetric

    return SegmentationMetric(**kwargs)


__all__ = [
    "METRIC_SCRIPT",
    "ClipScores",
    "aggregate_clips",
    "boundary_f_measure",
    "boundary_map",
    "compute_metrics",
    "confusion_counts",
    "load",
    "mask_boundaries",
    "masks_from_label_maps",
    "score_clip",
    "scores_from_counts",
    "segmentation_scores",
    "surface_scores",
]
