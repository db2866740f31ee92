"""What an evaluation writes: `metrics.json`, `per_object.csv` (one row per object and model), `overlays.png`.

    write_eval_files("runs/eval", results, predictions, scores, dataset, num_overlays=8, seed=42, has_adapter=True)

`results` is `evaluate_model`'s return value; `predictions` and `scores` map a model's name (`FINE_TUNED`,
`BASELINE`) to its `ObjectPredictions` and `score_predictions` result.
"""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING

from sam2_peft.data import SegmentationDataset
from sam2_peft.data.intensity import normalize_intensity
from sam2_peft.data.io import decode_row
from sam2_peft.reports import OverlaySample, display_name, plot_overlays, select_examples

if TYPE_CHECKING:
    from sam2_peft.evaluation import ObjectPredictions

FINE_TUNED, BASELINE = "fine_tuned", "baseline"
CSV_COLUMNS = (
    "model", "image_id", "object_index", "class_id", "area", "predicted_area",
    "dice", "iou", "precision", "recall", "hd95", "nsd", "predicted_iou", "object_score",
)  # fmt: skip


def write_eval_files(
    output_dir: str | os.PathLike,
    results: dict,
    predictions: dict[str, ObjectPredictions],
    scores: dict[str, dict],
    dataset: SegmentationDataset,
    *,
    num_overlays: int,
    seed: int,
    has_adapter: bool,
) -> None:
    """Write `metrics.json` (`results`), `per_object.csv` and, unless `num_overlays` is 0, `overlays.png`."""
    output = Path(output_dir)
    output.mkdir(parents=True, exist_ok=True)
    (output / "metrics.json").write_text(json.dumps(results, indent=2))
    write_object_csv(output / "per_object.csv", predictions, scores)
    if num_overlays > 0:
        plot_overlays(overlay_samples(dataset, predictions, scores, num_overlays, seed, has_adapter),
                      output / "overlays.png")


def write_object_csv(path: Path, predictions: dict[str, ObjectPredictions], scores: dict[str, dict]) -> None:
    """Write one row per object and model (`CSV_COLUMNS`); hd95 is empty where it is undefined."""
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for name, pred in predictions.items():
            per_object = scores[name]["per_object"]
            for i in range(len(pred.masks)):
                row = {
                    "model": name,
                    "image_id": pred.image_ids[i],
                    "object_index": pred.object_index[i],
                    "class_id": pred.class_ids[i],
                    "area": int(pred.references[i].sum()),
                    "predicted_area": int(pred.masks[i].sum()),
                    "predicted_iou": pred.predicted_iou[i],
                    "object_score": pred.object_score[i],
                }
                for metric in ("dice", "iou", "precision", "recall", "hd95", "nsd"):
                    value = per_object[metric][i]
                    row[metric] = "" if math.isnan(value) else value
                writer.writerow(row)


def overlay_samples(
    dataset: SegmentationDataset,
    predictions: dict[str, ObjectPredictions],
    scores: dict[str, dict],
    count: int,
    seed: int,
    has_adapter: bool,
) -> list[OverlaySample]:
    """Pick the worst, best and some random objects by the fine-tuned Dice and gather what the grid shows."""
    chosen = select_examples(scores[FINE_TUNED]["per_object"]["dice"], count, seed)
    tuned = predictions[FINE_TUNED]
    names = [name for name in (BASELINE, FINE_TUNED) if name in predictions]
    titles = {name: display_name(name, has_adapter) for name in names}
    samples = []
    for i in chosen:
        row_index = dataset.indices[tuned.items[i]]
        where = f"split {dataset.split!r}, row {row_index}"
        image, _ = decode_row(dataset.rows[row_index], where=where, mask_type=dataset.mask_type)
        # (3, H, W) in [0, 1] -> (H, W, 3) for imshow, with the intensity mapping the model saw.
        pixels = normalize_intensity(image, dataset.intensity).transpose(1, 2, 0)
        samples.append(
            OverlaySample(
                image=pixels,
                target=tuned.references[i],
                predictions={titles[name]: predictions[name].masks[i] for name in names},
                scores={titles[name]: scores[name]["per_object"]["dice"][i] for name in names},
                point_coords=tuned.point_coords[i],
                point_labels=tuned.point_labels[i],
                title=f"{tuned.image_ids[i]} #{tuned.object_index[i]}",
            )
        )
    return samples


def json_ready(value):
    """Replace NaN and infinities (not JSON) with None, recursively."""
    if isinstance(value, dict):
        return {key: json_ready(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(item) for item in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
