"""Evaluate a model (and an adapter) on a dataset with a fixed, seeded prompt protocol, next to the zero-shot base.

    sam2-peft eval --model facebook/sam2.1-hiera-tiny --adapter runs/lora/final --data D --prompt box --output_dir E

    from sam2_peft.evaluation import evaluate_model
    results = evaluate_model("tiny-random", "examples/data", adapter="runs/decoder/final", output_dir="runs/eval")
    results["fine_tuned"]["dice"], results["baseline"]["dice"], results["gain"]["dice"]

Every object of the split gets the same initial prompt for every model (`box`, `point` or `points:K`, drawn from
generators seeded by `(seed, item)`), optionally followed by N correction clicks, each sampled from the error of
that model's previous prediction (so, as with a real user, later clicks follow each model's own mistakes). Masks are
scored at the images' original resolution by the metric module (`sam2_peft.metrics.compute_metrics`, the function
behind the `evaluate` module, called directly to skip its Arrow round trip).

Files written to `output_dir`:
    metrics.json     {"protocol": {...}, "fine_tuned": M, "baseline": M, "gain": {...}}; see `evaluate_model`.
    per_object.csv   one row per object and model (`eval_files.CSV_COLUMNS`), the `model` column naming which.
    overlays.png     image + prompt, ground truth and each model's prediction for the worst, best and some
                     random objects (`sam2_peft.reports.plot_overlays`).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from sam2_peft.data import Preprocessor, SegmentationDataset, collate_objects
from sam2_peft.data.config import PREPROCESSING_FIELDS, DataConfig
from sam2_peft.errors import ConfigError
from sam2_peft.eval_files import BASELINE, FINE_TUNED, json_ready, write_eval_files
from sam2_peft.hub import adapter_preprocessing, load_adapter, resolve_data_config
from sam2_peft.interactive import InteractiveSegmenter
from sam2_peft.metrics import compute_metrics
from sam2_peft.models import load_sam2
from sam2_peft.reports import format_eval_table
from sam2_peft.segmenter import PADDING, best_mask_logits, masks_at_original_size

EVERYTHING = "everything"
# What `prompt="everything"` reports (and `gain` compares): instance matching of automatic masks.
EVERYTHING_METRICS = ("precision", "recall", "f1", "mean_matched_iou", "panoptic_quality")
# Metrics whose difference `gain` reports; hd95 is a distance (lower is better), the others are in [0, 1].
GAIN_METRICS = ("dice", "iou", "precision", "recall", "dice_micro", "iou_micro", "hd95", "nsd")


@dataclass
class ObjectPredictions:
    """One model's predictions for every object of a dataset, in dataset order.

    Attributes:
        masks: N predicted (H_i, W_i) bool masks at the original image size.
        references: N ground-truth masks of the same sizes.
        image_ids: N image ids.
        object_index: N indices of each object within its image.
        class_ids: N class ids (1 for instance masks).
        items: N dataset item indices (to fetch the image again).
        predicted_iou: N predicted IoU of the chosen mask, in [0, 1].
        object_score: N probabilities that the object is present (sigmoid of the object-score logit).
        point_coords: N (K_i, 2) initial prompt points, `x, y` in original image pixels (box = two corners).
        point_labels: N (K_i,) labels: 2 / 3 box corners, 1 positive, 0 negative click.
    """

    masks: list[np.ndarray] = field(default_factory=list)
    references: list[np.ndarray] = field(default_factory=list)
    image_ids: list[str] = field(default_factory=list)
    object_index: list[int] = field(default_factory=list)
    class_ids: list[int] = field(default_factory=list)
    items: list[int] = field(default_factory=list)
    predicted_iou: list[float] = field(default_factory=list)
    object_score: list[float] = field(default_factory=list)
    point_coords: list[np.ndarray] = field(default_factory=list)
    point_labels: list[np.ndarray] = field(default_factory=list)


@torch.no_grad()
def predict_objects(
    model: nn.Module,
    dataset: SegmentationDataset,
    *,
    batch_size: int = 4,
    correction_clicks: int = 0,
    seed: int = 0,
    device: str | torch.device | None = None,
) -> ObjectPredictions:
    """Predict every object of an evaluation `dataset` (built with `prompts="box" | "point" | "points:K"`).

    Each object's mask is the multimask candidate with the highest predicted IoU after the last round, upsampled to
    the image's original size as `Sam2Processor.post_process_masks` does (the same rule as training's validation).

    Args:
        model: a `Sam2Model` or a `PeftModel` around one; it is put in eval mode and moved to `device`.
        dataset: a `SegmentationDataset` with an evaluation prompt protocol.
        batch_size: images per forward pass.
        correction_clicks: rounds of one correction click each after the initial prompt.
        seed: seeds the correction clicks, per batch: they depend on `seed` and `batch_size`, not on earlier batches.
        device: default CUDA when available, else CPU.

    Example:
        >>> rows = load_source("examples/data")["val"]
        >>> val = SegmentationDataset(rows, Preprocessor.from_model(model), prompts="box")
        >>> predictions = predict_objects(model, val, correction_clicks=1)
    """
    if not dataset.evaluating:
        raise ValueError(
            "predict_objects needs an evaluation dataset: build it with prompts='box', 'point' or 'points:K'."
        )
    if correction_clicks < 0:
        raise ValueError(f"correction_clicks={correction_clicks} must be >= 0.")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    module = InteractiveSegmenter(model).to(device).eval()
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate_objects)
    result = ObjectPredictions()
    for batch_number, batch in enumerate(loader):
        batch = {key: value.to(device) if torch.is_tensor(value) else value for key, value in batch.items()}
        generator = torch.Generator(device=device).manual_seed(seed * 1_000_003 + batch_number)
        last = module(batch, correction_rounds=correction_clicks, generator=generator)[-1]
        masks = masks_at_original_size(best_mask_logits(last), batch)
        image_index = batch["image_index"].tolist()
        sizes = batch["original_sizes"].tolist()
        scale = batch["masks"].shape[-1]
        for index, (image, mask, reference) in enumerate(zip(image_index, masks, batch["full_masks"])):
            result.masks.append(mask.cpu().numpy())
            result.references.append(np.asarray(reference, bool))
            result.image_ids.append(batch["image_ids"][image])
            result.object_index.append(image_index[:index].count(image))
            result.class_ids.append(int(batch["class_ids"][index]))
            result.items.append(batch_number * batch_size + image)
            labels = batch["point_labels"][index].cpu()
            keep = labels != PADDING
            height, width = sizes[image]
            # Model-input pixels back to the original image's: the inverse of `Preprocessor.scale_coords`.
            coords = batch["point_coords"][index].cpu()[keep] * torch.tensor([width / scale, height / scale])
            result.point_coords.append(coords.numpy())
            result.point_labels.append(labels[keep].numpy())
        result.predicted_iou.extend(last.iou_scores.max(dim=1).values.float().cpu().tolist())
        result.object_score.extend(torch.sigmoid(last.object_score_logits[:, 0]).float().cpu().tolist())
    return result


def score_predictions(predictions: ObjectPredictions, *, nsd_tolerance: float = 1.0, device=None) -> dict:
    """Score `predictions` with the metric module: overall, `per_image`, `per_class` and `per_object`.

    Returns:
        `compute_metrics`' result plus `predicted_iou` (mean over objects) and `num_images`.
    """
    if not predictions.masks:
        raise ValueError("No object to score: the split has no usable object (see `sam2-peft data`).")
    scores = compute_metrics(
        predictions.masks,
        predictions.references,
        image_ids=predictions.image_ids,
        class_ids=predictions.class_ids,
        nsd_tolerance=nsd_tolerance,
        device=device,
    )
    scores["predicted_iou"] = float(np.mean(predictions.predicted_iou))
    scores["num_images"] = len(set(predictions.image_ids))
    return scores


@dataclass(frozen=True)
class EvalProtocol:
    """How objects are prompted and scored: the same for the fine-tuned model and its baseline.

    Attributes:
        prompt: `box`, `point` (the object's innermost pixel), `points:K` (K seeded positive clicks), or
            `everything`: automatic masks from a point grid (`sam2_peft.automatic`), matched one-to-one to the
            instances by IoU (`sam2_peft.metrics.instances`), scored by precision, recall, F1 and mean matched IoU.
        correction_clicks: correction rounds after the initial prompt (one click each, from the previous error).
        split: the split to score; default `test` when the source has one, else `val`.
        batch_size: images per forward pass (correction clicks are seeded per batch).
        baseline: also score the base model without the adapter on the same prompts (needs an adapter).
        seed: seeds `points:K` clicks and correction clicks, and the hold-out of `val` from `train` when the source
            has no validation split; keep the training run's `--seed` (default 42) to score its validation images.
        max_objects_per_image: score a seeded subset of at most this many objects per image; None scores all.
        nsd_tolerance: tolerance of the normalised surface Dice, in pixels.
        everything: for `prompt="everything"`, the options of `generate_masks` (`points_per_side`, ...) and
            `iou_threshold` of the matching (default 0.5).
    """

    prompt: str = "box"
    correction_clicks: int = 0
    split: str | None = None
    batch_size: int = 4
    baseline: bool = True
    seed: int = 42
    max_objects_per_image: int | None = None
    nsd_tolerance: float = 1.0
    everything: dict | None = None


def evaluate_model(
    model: str | nn.Module,
    data,
    *,
    adapter: str | os.PathLike | None = None,
    protocol: EvalProtocol | None = None,
    output_dir: str | os.PathLike | None = None,
    num_overlays: int = 8,
    device: str | torch.device | None = None,
    verbose: bool = True,
    **options,
) -> dict:
    """Evaluate `model` (with `adapter`, and by default also without it) on one split of `data`.

    Args:
        model: a base model name for `load_sam2` (Hub id, folder, official .pt, `tiny-random`) or a `Sam2Model`
            (its weights are left unchanged: the adapter goes onto a copy).
        data: a `DataConfig` (source, columns, splits, intensity, mask type: as in training), or just its source:
            anything `load_source` takes (folder, saved dataset, COCO json, Hub id, `DatasetDict`). Preprocessing
            fields left unset come from the adapter's `preprocessor_config.json`, else their defaults; a set field
            that disagrees with the adapter wins, with a warning.
        adapter: a run's `DIR/final`, any adapter folder, or a Hub id; None evaluates `model` alone.
        protocol: how objects are prompted and scored (`EvalProtocol`; default its defaults).
        output_dir: where `metrics.json`, `per_object.csv` and `overlays.png` go; None writes nothing.
        num_overlays: objects shown in `overlays.png` (a third worst, a third best, the rest random); 0 for none.
        device: default CUDA when available, else CPU.
        verbose: print the side-by-side table (`sam2_peft.reports.format_eval_table`).
        **options: `EvalProtocol` fields (`prompt="points:3"`, `split="val"`, ...), which override `protocol`'s;
            and how the models load: `revision` (of `model`), `sam2_config` (official config name for a `.pt`,
            guessed if unset), `hub_kernels` (see `load_sam2`), `adapter_revision`.

    Returns:
        What `metrics.json` holds: `protocol` (the settings above, for reproducibility), `fine_tuned` (the scores of
        `model` with `adapter`, or of `model` alone when there is no adapter), and when a baseline ran, `baseline`
        (the same keys, for the base model) and `gain` (`fine_tuned - baseline` for `GAIN_METRICS`; for hd95 a
        negative gain is an improvement). Scores are those of `compute_metrics` (overall, `per_image`,
        `per_class`) plus `predicted_iou` and `num_images`; the per-object scores go to `per_object.csv` instead.
        NaN (hd95 with no defined object) is written as null.

    Example:
        >>> results = evaluate_model("tiny-random", "examples/data", adapter="runs/decoder/final", prompt="points:3")
        >>> results["gain"]["dice"]
    """
    loading = {name: options.pop(name) for name in LOADING_OPTIONS if name in options}
    protocol = _protocol(protocol, options, has_adapter=adapter is not None)
    base, tuned = _load_models(model, adapter, keep_base=protocol.baseline, **loading)
    config = data if isinstance(data, DataConfig) else DataConfig(data=data)
    config = resolve_data_config(config, adapter_preprocessing(tuned) if adapter is not None else None,
                                 where=f"--adapter {adapter}")
    rows, split, skipped = _load_split(config, protocol)
    settings = {"model": model if isinstance(model, str) else type(model).__name__,
                "adapter": None if adapter is None else str(adapter), "data": str(config.data), "split": split,
                "prompt": protocol.prompt}
    if protocol.prompt == EVERYTHING:
        return _evaluate_everything(base if protocol.baseline else None, tuned, rows, config, protocol.everything or {},
                                    protocol=settings, output_dir=output_dir, verbose=verbose)
    dataset = SegmentationDataset(
        rows, Preprocessor.from_model(base), mask_type=config.mask_type, num_classes=config.num_classes,
        min_object_area=config.min_object_area, max_objects_per_image=protocol.max_objects_per_image,
        intensity=config.intensity_config(), prompts=protocol.prompt, seed=protocol.seed, split=split,
        skipped=skipped,
    )  # fmt: skip
    models = {BASELINE: base, FINE_TUNED: tuned} if protocol.baseline else {FINE_TUNED: tuned}
    run = dict(batch_size=protocol.batch_size, correction_clicks=protocol.correction_clicks, seed=protocol.seed,
               device=device)
    predictions = {name: predict_objects(module, dataset, **run) for name, module in models.items()}
    scores = {name: score_predictions(p, nsd_tolerance=protocol.nsd_tolerance, device=device)
              for name, p in predictions.items()}
    settings.update(correction_clicks=protocol.correction_clicks, seed=protocol.seed,
                    **{name: getattr(config, name) for name in PREPROCESSING_FIELDS},
                    min_object_area=config.min_object_area, max_objects_per_image=protocol.max_objects_per_image,
                    nsd_tolerance=protocol.nsd_tolerance)
    results = json_ready(compare_scores(settings, scores))
    if output_dir is not None:
        write_eval_files(output_dir, results, predictions, scores, dataset, num_overlays=num_overlays,
                         seed=protocol.seed, has_adapter=adapter is not None)
    if verbose:
        print(format_eval_table(results))
    return results


# The keyword options of `evaluate_model` that say how the models load (the others are `EvalProtocol` fields).
LOADING_OPTIONS = ("revision", "sam2_config", "hub_kernels", "adapter_revision")


def _protocol(protocol: EvalProtocol | None, fields: dict, *, has_adapter: bool) -> EvalProtocol:
    """`protocol` with the keyword `fields` on top; no baseline without an adapter (it would equal the model)."""
    known = {f.name for f in dataclasses.fields(EvalProtocol)}
    if unknown := sorted(set(fields) - known):
        raise TypeError(f"evaluate_model() got unknown option(s) {unknown}; it takes the EvalProtocol fields "
                        f"{sorted(known)} and {list(LOADING_OPTIONS)}.")
    protocol = dataclasses.replace(protocol or EvalProtocol(), **fields)
    return protocol if has_adapter else dataclasses.replace(protocol, baseline=False)


def _load_models(model, adapter, *, keep_base: bool, revision=None, sam2_config=None, hub_kernels=False,
                 adapter_revision=None) -> tuple[nn.Module, nn.Module]:
    """The base model and the model to score (the base with `adapter`, or the base itself without one)."""
    owned = isinstance(model, str)
    base = load_sam2(model, revision=revision, sam2_config=sam2_config, hub_kernels=hub_kernels) if owned else model
    if adapter is None:
        return base, base
    # The adapter is loaded before the data, since its preprocessing decides how the data is read; onto a copy when
    # the base must stay as it is (the caller's model, or the baseline's).
    keep = keep_base or not owned
    return base, load_adapter(copy.deepcopy(base) if keep else base, adapter, revision=adapter_revision)


def _load_split(config: DataConfig, protocol: EvalProtocol):
    """The rows of the split to score, its name (`protocol.split`, default `test` if present, else `val`) and what
    loading skipped in it."""
    splits = config.load_splits(seed=protocol.seed)
    split = protocol.split or ("test" if "test" in splits else "val")
    if split not in splits:
        raise ValueError(f"--data {config.data}: no split {split!r}; it has {sorted(splits)}. Pick one with --split.")
    return splits[split], split, splits.skipped[split]


def compare_scores(protocol: dict, scores: dict[str, dict]) -> dict:
    """`metrics.json`'s content: the protocol, each model's scores without `per_object`, and the `gain`."""
    results = {"protocol": protocol}
    for name in (FINE_TUNED, BASELINE):
        if name in scores:
            results[name] = {key: value for key, value in scores[name].items() if key != "per_object"}
    if BASELINE in scores:
        results["gain"] = {name: scores[FINE_TUNED][name] - scores[BASELINE][name] for name in GAIN_METRICS}
    return results


def _evaluate_everything(base, tuned, rows, config: DataConfig, options: dict, *, protocol: dict, output_dir,
                         verbose: bool) -> dict:
    """`evaluate_model` for `prompt="everything"`: automatic masks of `tuned` (and `base`) matched to instances."""
    from sam2_peft.automatic import evaluate_everything

    if config.mask_type != "instance":
        raise ConfigError(f"--prompt everything scores instances, but --mask_type is {config.mask_type}; use instance.")
    run = dict(intensity=config.intensity_config(), split=protocol["split"], **options)
    results = {"protocol": {**protocol, **options}, FINE_TUNED: evaluate_everything(tuned, rows, **run)}
    if base is not None:
        results[BASELINE] = evaluate_everything(base, rows, **run)
        results["gain"] = {name: results[FINE_TUNED][name] - results[BASELINE][name] for name in EVERYTHING_METRICS}
    results = json_ready(results)
    if output_dir is not None:
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        (Path(output_dir) / "metrics.json").write_text(json.dumps(results, indent=2))
    if verbose:
        names = [name for name in (BASELINE, FINE_TUNED) if name in results]
        print("metric            " + "".join(f"{name:>12}" for name in names))
        for metric in EVERYTHING_METRICS:
            values = [results[name][metric] for name in names]
            print(f"{metric:<18}" + "".join("        null" if v is None else f"{v:12.4f}" for v in values))
    return results
