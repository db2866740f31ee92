"""Evaluate video tracking: J, F, J&F and Dice per object, per clip and overall, base versus fine-tuned.

    sam2-peft eval --task video --model facebook/sam2.1-hiera-tiny --adapter runs/video/final --data D \\
        --output_dir runs/video/eval
    results = evaluate_video("tiny-random-video", DataConfig(data="examples/data_video", task="video"))

Every object is prompted once (`--prompt box|point|points:K`, on the first frame where it appears) and tracked to
the end of its clip; the base model gets the same prompts. `metrics.json` holds `fine_tuned` and `baseline` (`j`,
`f`, `j_and_f`, `dice`, `per_clip`, `per_object`) and their `gain`, as image evaluation does.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from sam2_peft.data.clip_frames import read_video
from sam2_peft.data.clips import ClipDataset
from sam2_peft.data.config import DataConfig
from sam2_peft.data.transforms import Preprocessor
from sam2_peft.hub import adapter_preprocessing, load_adapted, resolve_data_config
from sam2_peft.metrics.video import aggregate_clips, score_clip
from sam2_peft.models import load_sam2
from sam2_peft.reports import save_overlay_strip
from sam2_peft.segmenter import base_sam2
from sam2_peft.video.segmenter import VideoSegmenter
from sam2_peft.video.tracking import logits_at_original_size, track_clip

FINE_TUNED, BASELINE = "fine_tuned", "baseline"
VIDEO_METRICS = ("j", "f", "j_and_f", "dice")


def evaluate_video(
    model: str,
    data: DataConfig | str,
    *,
    adapter: str | os.PathLike | None = None,
    prompt: str = "box",
    split: str | None = None,
    baseline: bool = True,
    seed: int = 42,
    output_dir: str | os.PathLike | None = None,
    num_overlays: int = 4,
    device: str | torch.device | None = None,
    verbose: bool = True,
    **loading,
) -> dict:
    """Track every object of one split of clips with `model` (and `adapter`; by default also without it) and score.

    Args:
        model: the base as `load_sam2` takes it; it loads as the video model.
        data: a `DataConfig` (`task` video: frame folders or NIfTI volumes), or its source. Preprocessing fields
            left unset come from the adapter's record, as in image evaluation.
        adapter: a run's `DIR/final`, any adapter folder, or a Hub id; None evaluates `model` alone.
        prompt: `box`, `point` or `points:K`, on each object's first frame.
        split: the split to score (default `test` if present, else `val`).
        baseline: also score the base model without the adapter.
        seed: seed of the prompts (and of the val hold-out: the training seed gives the same split).
        output_dir: where `metrics.json` and `overlay_<clip>.png` strips go; None writes nothing.
        num_overlays: clips drawn as overlay strips (base and fine-tuned rows).
        device: default CUDA when available, else CPU.
        verbose: print the scores.
        **loading: `load_sam2` options (`revision`, `sam2_config`, `hub_kernels`) and `adapter_revision`.

    Returns:
        What `metrics.json` holds: `protocol`, `fine_tuned`, and with a baseline `baseline` and `gain`
        (`fine_tuned - baseline` for `j`, `f`, `j_and_f`, `dice`).
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    adapter_revision = loading.pop("adapter_revision", None)
    if adapter is None:
        tuned = load_sam2(model, video=True, **loading)
    else:
        tuned = load_adapted(model, adapter, video=True, adapter_revision=adapter_revision, **loading)
    config = data if isinstance(data, DataConfig) else DataConfig(data=str(data), task="video")
    config = resolve_data_config(config, adapter_preprocessing(tuned) if adapter is not None else None,
                                 where=f"--adapter {adapter}")
    splits = config.load_clip_splits(seed=seed)
    split = split or ("test" if "test" in splits else "val")
    if split not in splits:
        raise ValueError(f"--data {config.data}: no split {split!r}; it has {sorted(splits)}. Pick one with --split.")
    dataset = ClipDataset(splits[split], Preprocessor.from_model(base_sam2(tuned)), mask_type=config.mask_type,
                          min_object_area=config.min_object_area, intensity=config.intensity_config(), prompts=prompt,
                          seed=seed, split=split)
    models = {FINE_TUNED: tuned}
    if baseline and adapter is not None:
        models[BASELINE] = load_sam2(model, video=True, **loading)
    segmenters = {name: VideoSegmenter(network.to(device)).eval() for name, network in models.items()}
    scores, overlays = _track_and_score(segmenters, dataset, device, num_overlays)
    results = {"protocol": {"model": model, "adapter": None if adapter is None else str(adapter),
                            "data": str(config.data), "split": split, "prompt": prompt, "seed": seed},
               **scores}
    if BASELINE in scores:
        results["gain"] = {key: scores[FINE_TUNED][key] - scores[BASELINE][key] for key in VIDEO_METRICS}
    if output_dir is not None:
        _write(results, overlays, dataset, Path(output_dir))
    if verbose:
        for name in scores:
            print(f"{name:>10}: " + ", ".join(f"{key} {scores[name][key]:.4f}" for key in VIDEO_METRICS))
    return results


@torch.no_grad()
def _track_and_score(segmenters: dict[str, VideoSegmenter], dataset: ClipDataset, device, num_overlays: int):
    """Each clip read once and tracked by every model: the scores over the split, and for the first `num_overlays`
    clips their index and label-map rows (each model's, then the reference), for the strips."""
    clips = {name: [] for name in segmenters}
    overlays = []
    for index in tqdm(range(len(dataset)), desc="track"):
        item = dataset[index]
        prompts = {key: item[key].to(device) for key in ("pixel_values", "point_coords", "point_labels")
                   if item.get(key) is not None}
        rows = {}
        for name, segmenter in segmenters.items():
            predicted = logits_at_original_size(track_clip(segmenter, {**item, **prompts}), item["original_size"])
            predicted = predicted.cpu().numpy()
            clips[name].append(score_clip(predicted, item["full_masks"], object_ids=item["object_ids"].tolist(),
                                          clip_id=item["clip_id"]))
            if index < num_overlays:
                rows[name] = list(_to_label_maps(predicted, item["object_ids"]))
        if index < num_overlays:
            rows["reference"] = list(_to_label_maps(item["full_masks"], item["object_ids"]))
            overlays.append((index, rows))
    return {name: aggregate_clips(scores) for name, scores in clips.items()}, overlays


def _to_label_maps(masks: np.ndarray, object_ids) -> np.ndarray:
    """(T, N, H, W) bool -> (T, H, W) label maps holding each object's own label value."""
    labels = np.zeros(masks.shape[:1] + masks.shape[2:], np.uint16)
    for index, value in enumerate(object_ids.tolist()):
        labels[masks[:, index]] = value
    return labels


def _write(results: dict, overlays: list, dataset: ClipDataset, output_dir: Path) -> None:
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "metrics.json").write_text(json.dumps(results, indent=2))
    for index, rows in overlays:
        clip = dataset.clips[dataset.indices[index]]
        source = clip.volume_path if clip.is_volume else clip.frame_paths[0].parent
        frames = [frame.transpose(1, 2, 0) for frame in read_video(source, dataset.intensity, axis=clip.axis)[0]]
        save_overlay_strip(frames, rows, output_dir / f"overlay_{clip.clip_id}.png", titles=list(clip.frame_names))
