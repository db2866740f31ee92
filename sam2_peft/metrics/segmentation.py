"""The `evaluate` metric script: Dice, IoU, precision, recall, HD95 and NSD for binary masks.

Load it with `sam2_peft.metrics.load()`, or offline with `evaluate.load` on this file's path (evaluate copies the
script into its cache, which is why every import here is absolute):

    import evaluate, sam2_peft.metrics
    metric = evaluate.load(sam2_peft.metrics.METRIC_SCRIPT)
    metric.compute(predictions=[pred_mask], references=[true_mask], image_ids=["case_1"], nsd_tolerance=2.0)
"""

import evaluate
from datasets import Features, Sequence, Value

from sam2_peft.metrics.aggregate import compute_metrics

_DESCRIPTION = """Overlap (Dice, IoU, precision, recall) and surface (HD95, normalised surface Dice) scores of binary
masks, per object, aggregated per image, per class and overall (mean over objects and micro over pixels). Both masks
empty scores 1 (hd95 0); exactly one empty scores 0 (hd95 NaN, left out of the hd95 mean and counted in
`hd95_undefined`)."""

_KWARGS_DESCRIPTION = """
Args:
    predictions: list of HxW bool arrays (nonzero = foreground); sizes may differ between items.
    references: list of HxW bool arrays, each the size of its prediction.
    image_ids: optional list of ids (compared as strings), one per prediction; adds `per_image`.
    class_ids: optional list of ids (compared as strings), one per prediction; adds `per_class`.
    nsd_tolerance: NSD tolerance in the units of `spacing` (pixels by default). Default 1.0.
    spacing: one (row, column) pixel size, or one per prediction. Default: pixels.
    surface: compute hd95 and nsd. Default True.
    device: torch device for the kernels. Default: CUDA when available.
Returns:
    dice, iou, precision, recall (mean over objects), their `*_micro` versions (pooled pixels), hd95,
    hd95_undefined, nsd, nsd_tolerance, num_objects, per_object, and per_image / per_class when ids are given.
Examples:
    >>> import numpy as np, sam2_peft.metrics
    >>> metric = sam2_peft.metrics.load()
    >>> metric.compute(predictions=[np.eye(3, dtype=bool)], references=[np.eye(3, dtype=bool)])["dice"]
    1.0
"""

_MASK = Sequence(Sequence(Value("bool")))
_ID = Sequence(Value("string"))


def _ids(ids, count):
    # evaluate stores every feature column for every item, and refuses None or ints in a string column; so each id
    # travels as a list of strings: [] for "not given", [str(id)] otherwise.
    if ids is None:
        return [[] for _ in range(count)]
    return [[] if i is None else [str(i)] for i in ids]


def _given(ids, name):
    if all(len(i) == 0 for i in ids):
        return None
    if any(len(i) == 0 for i in ids):
        raise ValueError(f"`{name}` was given for some predictions but not others; give one id for every prediction.")
    return [i[0] for i in ids]


class SegmentationMetric(evaluate.Metric):
    """Binary-mask segmentation scores; see the module docstring of `sam2_peft.metrics.aggregate`."""

    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=Features(
                {"predictions": _MASK, "references": _MASK, "image_ids": _ID, "class_ids": _ID}
            ),
            reference_urls=["https://arxiv.org/abs/1809.04430"],
        )

    def add_batch(self, *, predictions=None, references=None, image_ids=None, class_ids=None, **kwargs):
        """Add a batch of predictions and references (and optional ids) to score later."""
        count = 0 if predictions is None else len(predictions)
        super().add_batch(
            predictions=predictions,
            references=references,
            image_ids=_ids(image_ids, count),
            class_ids=_ids(class_ids, count),
            **kwargs,
        )

    def add(self, *, prediction=None, reference=None, image_id=None, class_id=None, **kwargs):
        """Add one prediction and reference (and optional ids) to score later."""
        super().add(
            prediction=prediction,
            reference=reference,
            image_ids=_ids([image_id], 1)[0],
            class_ids=_ids([class_id], 1)[0],
            **kwargs,
        )

    def compute(self, *, predictions=None, references=None, image_ids=None, class_ids=None, **kwargs):
        """Score everything added so far plus the given predictions and references."""
        # Named here so that evaluate doesn't reject a call without ids as missing inputs; add_batch wraps them.
        return super().compute(
            predictions=predictions, references=references, image_ids=image_ids, class_ids=class_ids, **kwargs
        )

    def _compute(self, predictions, references, image_ids, class_ids, **options):
        return compute_metrics(
            list(predictions),
            list(references),
            image_ids=_given(list(image_ids), "image_ids"),
            class_ids=_given(list(class_ids), "class_ids"),
            **options,
        )
