"""Score a list of masks of any sizes and aggregate per object, per image, per class and overall.

This is what the `evaluate` module computes; call it directly to skip the Arrow round trip on large test sets.

    from sam2_peft.metrics import compute_metrics
    results = compute_metrics(predictions, references, image_ids=ids, nsd_tolerance=2.0)
    results["dice"], results["per_image"]["case_003"]["hd95"]

Each group (overall, one image, one class) reports:
    dice, iou, precision, recall                  mean over its objects
    dice_micro, iou_micro, precision_micro, recall_micro
                                                  from its pixel counts pooled over objects
    hd95                                          mean over objects where it is defined (NaN if none is)
    hd95_undefined                                objects left out of hd95: exactly one of prediction/target empty
    nsd                                           mean over objects
    num_objects
Empty-mask conventions are those of `sam2_peft.metrics.kernels`.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence

import numpy as np
import torch

from sam2_peft.metrics.kernels import SCORE_NAMES, confusion_counts, scores_from_counts, surface_scores

SURFACE_NAMES = ("hd95", "nsd")


def _as_mask(value, name: str, index: int) -> np.ndarray:
    mask = np.asarray(value)
    if mask.ndim != 2:
        raise ValueError(f"`{name}[{index}]` must be an HxW mask, got shape {mask.shape}.")
    return mask.astype(bool, copy=False)


def _as_spacing(spacing, count: int) -> list[tuple[float, float]]:
    if spacing is None:
        return [(1.0, 1.0)] * count
    array = np.asarray(spacing, dtype=float)
    if array.shape == (2,):
        return [tuple(array.tolist())] * count
    if array.shape == (count, 2):
        return [tuple(row) for row in array.tolist()]
    raise ValueError(
        f"`spacing` must be one (row, column) pair or one pair per prediction ({count}), got shape {array.shape}."
    )


def _per_object_scores(
    predictions: list[np.ndarray],
    references: list[np.ndarray],
    spacings: list[tuple[float, float]],
    nsd_tolerance: float,
    surface: bool,
    device: torch.device,
    batch_size: int,
) -> dict[str, np.ndarray]:
    """Run the kernels on batches of same-size masks; return (N,) arrays in the input order."""
    count = len(predictions)
    columns = {name: np.zeros(count) for name in ("tp", "fp", "fn", *SCORE_NAMES)}
    if surface:
        columns.update({name: np.zeros(count) for name in SURFACE_NAMES})
    groups = defaultdict(list)  # the kernels stack masks, so only same-size, same-spacing items share a batch
    for i, (mask, spacing) in enumerate(zip(predictions, spacings)):
        groups[(mask.shape, spacing)].append(i)
    for (_, spacing), indices in groups.items():
        for start in range(0, len(indices), batch_size):
            batch = indices[start : start + batch_size]
            pred = torch.from_numpy(np.stack([predictions[i] for i in batch])).to(device)
            target = torch.from_numpy(np.stack([references[i] for i in batch])).to(device)
            tp, fp, fn = confusion_counts(pred, target)
            values = {"tp": tp, "fp": fp, "fn": fn, **scores_from_counts(tp, fp, fn)}
            if surface:
                values.update(surface_scores(pred, target, tolerance=nsd_tolerance, spacing=spacing))
            for name, value in values.items():
                columns[name][batch] = value.double().cpu().numpy()
    return columns


def _summarise(columns: dict[str, np.ndarray], rows: np.ndarray) -> dict[str, float | int]:
    """The group statistics listed in the module docstring, over the objects in `rows`."""
    summary: dict[str, float | int] = {name: float(columns[name][rows].mean()) for name in SCORE_NAMES}
    pooled = {name: torch.tensor(columns[name][rows].sum()) for name in ("tp", "fp", "fn")}
    for name, value in scores_from_counts(pooled["tp"], pooled["fp"], pooled["fn"]).items():
        summary[f"{name}_micro"] = float(value)
    if "hd95" in columns:
        hd95 = columns["hd95"][rows]
        defined = hd95[~np.isnan(hd95)]
        summary["hd95"] = float(defined.mean()) if defined.size else math.nan
        summary["hd95_undefined"] = int(hd95.size - defined.size)
        summary["nsd"] = float(columns["nsd"][rows].mean())
    summary["num_objects"] = int(rows.size)
    return summary


def _group(columns: dict[str, np.ndarray], keys: list[str]) -> dict[str, dict[str, float | int]]:
    rows_of = defaultdict(list)
    for row, key in enumerate(keys):
        rows_of[key].append(row)
    return {key: _summarise(columns, np.asarray(rows)) for key, rows in rows_of.items()}


def _check_ids(ids: Sequence | None, name: str, count: int) -> list[str] | None:
    if ids is None:
        return None
    if len(ids) != count:
        raise ValueError(f"`{name}` has {len(ids)} entries for {count} predictions; give one per prediction.")
    return [str(i) for i in ids]


def compute_metrics(
    predictions: Sequence,
    references: Sequence,
    image_ids: Sequence | None = None,
    class_ids: Sequence | None = None,
    *,
    nsd_tolerance: float = 1.0,
    spacing: Sequence | None = None,
    surface: bool = True,
    device: str | torch.device | None = None,
    batch_size: int = 64,
) -> dict:
    """Score predicted masks against references, per object and aggregated.

    Args:
        predictions: N HxW masks (bool, or anything where nonzero means foreground); sizes may differ per item.
        references: N ground-truth masks, each the size of its prediction.
        image_ids: optional N ids (stringified); adds `per_image`.
        class_ids: optional N ids (stringified); adds `per_class`.
        nsd_tolerance: NSD tolerance in the units of `spacing` (pixels by default).
        spacing: one (row, column) pixel size for all, or one pair per prediction; None for pixels.
        surface: compute hd95 and nsd (False skips the costlier surface distances).
        device: where the kernels run; default CUDA when available, else CPU.
        batch_size: masks scored at once; lower it for very large masks on a small GPU.

    Returns:
        The overall group statistics (module docstring) plus `nsd_tolerance`, `per_object` (a dict of N-long lists:
        the scores, `tp`, `fp`, `fn`, `image_id`, `class_id`), and `per_image` / `per_class` (id -> statistics) when
        ids are given. All values are plain Python numbers, ready for `json.dump`.

    Example:
        >>> compute_metrics([np.eye(4, dtype=bool)], [np.eye(4, dtype=bool)])["dice"]
        1.0
    """
    if len(predictions) != len(references):
        raise ValueError(f"Got {len(predictions)} predictions and {len(references)} references; they must pair up.")
    if len(predictions) == 0:
        raise ValueError("Got no predictions to score.")
    if batch_size < 1:
        raise ValueError(f"`batch_size` must be >= 1, got {batch_size}.")
    count = len(predictions)
    preds = [_as_mask(p, "predictions", i) for i, p in enumerate(predictions)]
    refs = [_as_mask(r, "references", i) for i, r in enumerate(references)]
    for i, (p, r) in enumerate(zip(preds, refs)):
        if p.shape != r.shape:
            raise ValueError(f"`predictions[{i}]` has shape {p.shape} but `references[{i}]` has {r.shape}.")
    image_keys = _check_ids(image_ids, "image_ids", count)
    class_keys = _check_ids(class_ids, "class_ids", count)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"

    columns = _per_object_scores(
        preds, refs, _as_spacing(spacing, count), nsd_tolerance, surface, torch.device(device), batch_size
    )
    results: dict = _summarise(columns, np.arange(count))
    if surface:
        results["nsd_tolerance"] = float(nsd_tolerance)
    per_object = {name: column.tolist() for name, column in columns.items()}
    for name in ("tp", "fp", "fn"):
        per_object[name] = [int(v) for v in per_object[name]]
    per_object["image_id"] = image_keys
    per_object["class_id"] = class_keys
    results["per_object"] = per_object
    if image_keys is not None:
        results["per_image"] = _group(columns, image_keys)
    if class_keys is not None:
        results["per_class"] = _group(columns, class_keys)
    return results
