"""Automatic mask generation against transformers' `pipeline("mask-generation")` and plain `Sam2Model`.

    OMP_NUM_THREADS=1 .venv/bin/python -m pytest -q tests/test_automatic.py       # ~10 s on one core

The tiny random model's masks all cover most of the image, so NMS would leave one. `conv_s0` (the decoder's 1x1
projection of the S/4 image features) is scaled 30x here: the high-resolution image features then dominate the mask
logits and masks follow the colour regions of a four-quadrant image, so several distinct masks pass the filters.
"""

from __future__ import annotations

import copy

import numpy as np
import PIL.Image
import pytest
import torch
from transformers import Sam2Processor, pipeline

from sam2_peft.automatic import (
    evaluate_everything,
    generate_masks,
    label_map,
    load_pixels,
    remove_small_regions,
    save_overlay,
    upsample_logits,
)
from sam2_peft.data.io import encode_array
from sam2_peft.data.transforms import Preprocessor
from sam2_peft.export import merge_to_folder
from sam2_peft.metrics.instances import match_instances
from sam2_peft.models import build_image_processor, load_sam2
from sam2_peft.prediction import save_label_map
from sam2_peft.segmenter import masks_at_original_size
from sam2_peft.strategies import apply_strategy

# Filters under which the scaled tiny model keeps several masks on `quadrants()` (5 at the time of writing). The
# stability cut is no ratio of small integers, so no small mask's stability score equals it: SAM keeps such ties
# (`>=`), the pipeline drops them (`>`).
OPTIONS = dict(points_per_side=8, pred_iou_thresh=0.3, stability_score_thresh=0.5123, box_nms_thresh=0.7)
PIPELINE_OPTIONS = dict(points_per_crop=8, crops_n_layers=0, pred_iou_thresh=0.3, stability_score_thresh=0.5123,
                        crops_nms_thresh=0.7)
COLOURS = ((255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0))


def quadrants(height: int = 256, width: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """An 8-bit RGB image of four coloured quadrants and its label map (quadrant k has value k + 1)."""
    labels = np.zeros((height, width), np.int64)
    labels[: height // 2, width // 2 :] = 1
    labels[height // 2 :, : width // 2] = 2
    labels[height // 2 :, width // 2 :] = 3
    return np.array(COLOURS, np.uint8)[labels], labels + 1


@pytest.fixture(scope="module")
def scaled_model():
    model = load_sam2("tiny-random").eval()
    with torch.no_grad():
        for parameter in model.mask_decoder.conv_s0.parameters():
            parameter.mul_(30.0)
    return model


def pipeline_masks(model_or_folder, image: np.ndarray, image_processor=None) -> tuple[list[np.ndarray], np.ndarray]:
    generator = pipeline("mask-generation", model=model_or_folder, image_processor=image_processor, device="cpu")
    output = generator(PIL.Image.fromarray(image), output_bboxes_mask=True, **PIPELINE_OPTIONS)
    return [np.asarray(mask, bool) for mask in output["masks"]], output


def assert_same_masks(ours: list[np.ndarray], reference: list[np.ndarray]) -> None:
    """The same set of masks, each pair's IoU above 0.999 (order-free)."""
    assert len(ours) == len(reference)
    for mask in ours:
        ious = [(mask & other).sum() / (mask | other).sum() for other in reference]
        assert max(ious) > 0.999


def test_matches_the_transformers_mask_generation_pipeline(scaled_model, tmp_path):
    image, _ = quadrants()
    path = tmp_path / "quadrants.png"
    PIL.Image.fromarray(image).save(path)
    ours = generate_masks(scaled_model, path, **OPTIONS)
    reference, output = pipeline_masks(scaled_model, image, build_image_processor(scaled_model))
    assert len(ours) >= 4
    # Same order too: both sort by predicted IoU through NMS.
    for mine, theirs, score, box in zip(ours, reference, output["scores"], output["bounding_boxes"]):
        np.testing.assert_array_equal(mine["segmentation"], theirs)
        assert mine["predicted_iou"] == pytest.approx(float(score), abs=1e-5)
        x, y, w, h = mine["bbox"]
        assert [x, y, x + w - 1, y + h - 1] == box.tolist()  # the pipeline's boxes: inclusive x1, y1, x2, y2
        assert mine["area"] == theirs.sum()
        assert mine["stability_score"] >= OPTIONS["stability_score_thresh"]
    grid = {(16.0 + 32 * i, 16.0 + 32 * j) for i in range(8) for j in range(8)}  # (k + 0.5) / 8 * 256
    assert all(tuple(m["point_coords"][0]) in grid for m in ours)


def test_grid_prompts_on_a_non_square_image_match_sam2_processor(scaled_model):
    """Every candidate's predicted IoU equals plain Sam2Model's for its grid point placed by Sam2Processor.

    (The pipeline cannot be the reference here: it places grid points by SAM1's longest-side resize.)
    """
    image, _ = quadrants(96, 160)
    masks = generate_masks(scaled_model, image, points_per_side=4, pred_iou_thresh=0.0, stability_score_thresh=0.0,
                           box_nms_thresh=1.0)
    points = [[x, y] for y in (12.0, 36.0, 60.0, 84.0) for x in (20.0, 60.0, 100.0, 140.0)]
    processor = Sam2Processor(image_processor=build_image_processor(scaled_model))
    inputs = processor(images=PIL.Image.fromarray(image), input_points=[[[point] for point in points]],
                       input_labels=[[[1] for _ in points]], return_tensors="pt")
    pixel_values = Preprocessor.from_model(scaled_model).pixel_values(load_pixels(image))[None]  # float resize
    with torch.no_grad():
        embeddings = scaled_model.get_image_embeddings(pixel_values)
        iou_scores = scaled_model(image_embeddings=embeddings, input_points=inputs["input_points"],
                                  input_labels=inputs["input_labels"]).iou_scores[0]  # (points, 3)
    assert len(masks) > 30  # 48 candidates, minus empty masks
    for mask in masks:
        row = iou_scores[points.index(mask["point_coords"][0])]
        assert (row - mask["predicted_iou"]).abs().min() < 1e-5
        assert mask["segmentation"].shape == (96, 160)


def test_peft_model_and_its_merged_folder_give_the_same_masks_in_the_pipeline(scaled_model, tmp_path):
    image, _ = quadrants()
    torch.manual_seed(0)  # the random LoRA weights
    tuned = apply_strategy(copy.deepcopy(scaled_model), "lora", init_lora_weights=False)
    ours = [m["segmentation"] for m in generate_masks(tuned, image, **OPTIONS)]
    folder = merge_to_folder(copy.deepcopy(tuned), tmp_path / "merged")
    from_folder, _ = pipeline_masks(str(folder), image)
    in_memory, _ = pipeline_masks(copy.deepcopy(tuned).merge_and_unload(), image, build_image_processor(scaled_model))
    base = [m["segmentation"] for m in generate_masks(scaled_model, image, **OPTIONS)]
    assert len(from_folder) >= 3
    for mine, theirs in zip(from_folder, in_memory):
        np.testing.assert_array_equal(mine, theirs)
    assert_same_masks(ours, from_folder)
    assert len(base) != len(ours) or not all(np.array_equal(a, b) for a, b in zip(base, ours))


def test_points_per_batch_does_not_change_the_masks(scaled_model):
    image, _ = quadrants(64, 64)
    options = dict(points_per_side=6, pred_iou_thresh=0.0, stability_score_thresh=0.2, box_nms_thresh=0.9)
    whole = generate_masks(scaled_model, image, points_per_batch=64, **options)
    pieces = generate_masks(scaled_model, image, points_per_batch=5, **options)
    assert len(whole) >= 2
    assert generate_masks(scaled_model, image, points_per_side=6, pred_iou_thresh=1.0) == []
    assert [m["point_coords"] for m in whole] == [m["point_coords"] for m in pieces]
    for a, b in zip(whole, pieces):
        np.testing.assert_array_equal(a["segmentation"], b["segmentation"])


def test_the_stability_cut_keeps_ties_as_sam_does(scaled_model):
    image, _ = quadrants(64, 64)
    options = dict(points_per_side=4, pred_iou_thresh=0.0, box_nms_thresh=1.0)
    everything = generate_masks(scaled_model, image, stability_score_thresh=0.0, **options)
    weakest = min((m for m in everything if m["stability_score"] > 0), key=lambda m: m["stability_score"])
    at_tie = generate_masks(scaled_model, image, stability_score_thresh=weakest["stability_score"], **options)
    above = np.nextafter(np.float32(weakest["stability_score"]), np.float32(1))
    strictly_above = generate_masks(scaled_model, image, stability_score_thresh=float(above), **options)
    key = (weakest["area"], weakest["predicted_iou"])
    assert key in {(m["area"], m["predicted_iou"]) for m in at_tie}
    assert key not in {(m["area"], m["predicted_iou"]) for m in strictly_above}


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(points_per_side=41), "--points_per_side 41 .* at most 40"),
        (dict(points_per_side=0), "--points_per_side 0"),
        (dict(points_per_batch=0), "--points_per_batch 0"),
        (dict(pred_iou_thresh=1.5), "--pred_iou_thresh 1.5"),
        (dict(stability_score_offset=0.0), "--stability_score_offset"),
        (dict(box_nms_thresh=0.0), "--box_nms_thresh"),
        (dict(min_mask_region_area=-1), "--min_mask_region_area"),
    ],
)
def test_bad_options_name_the_flag(scaled_model, options, message):
    with pytest.raises(ValueError, match=message):
        generate_masks(scaled_model, np.zeros((40, 64, 3), np.uint8), **options)


def test_upsampling_is_that_of_masks_at_original_size():
    logits = torch.randn(3, 16, 16, generator=torch.Generator().manual_seed(0))
    geometry = {"image_index": torch.zeros(3, dtype=torch.long), "original_sizes": torch.tensor([[50, 70]])}
    expected = torch.stack(masks_at_original_size(logits, geometry))
    torch.testing.assert_close(upsample_logits(logits, (50, 70)) > 0, expected, rtol=0, atol=0)


def test_label_map_keeps_small_masks_on_top_and_overlay_colours_only_labels(tmp_path):
    big = np.zeros((6, 8), bool)
    big[:, :6] = True
    small = np.zeros((6, 8), bool)
    small[1:3, 1:3] = True
    labels = label_map([{"segmentation": small}, big], (6, 8))
    expected = np.zeros((6, 8), np.uint16)
    expected[:, :6] = 2
    expected[1:3, 1:3] = 1
    np.testing.assert_array_equal(labels, expected)
    pixels = torch.full((3, 6, 8), 0.4)
    path = save_overlay(pixels, labels, tmp_path / "overlay.png")
    written = np.asarray(PIL.Image.open(path))
    assert written.shape == (6, 8, 3)
    assert (written[:, 6:] == 102).all()  # 0.4 * 255, background untouched
    assert len({tuple(written[0, 0]), tuple(written[1, 1]), (102, 102, 102)}) == 3
    with pytest.raises(ValueError, match="shape"):
        label_map([np.zeros((5, 8), bool)], (6, 8))


def test_remove_small_regions_fills_holes_drops_islands_and_prefers_unchanged_masks():
    pytest.importorskip("scipy")
    ring = np.zeros((12, 12), bool)
    ring[1:8, 1:8] = True
    ring[4, 4] = False  # a 1-pixel hole
    ring[10, 10] = True  # a 1-pixel island (diagonal neighbours would join it: 8-connected)
    clean = np.zeros((12, 12), bool)
    clean[1:8, 1:8] = True
    tiny = np.zeros((12, 12), bool)
    tiny[0, 0] = tiny[11, 5:7] = True  # all islands small: the largest stays
    masks, keep = remove_small_regions(torch.from_numpy(np.stack([ring, tiny, clean])), 4, 0.7)
    # The ring becomes `clean` once repaired; NMS keeps the mask that needed no change instead.
    assert keep.tolist() == [1, 2]
    expected_tiny = np.zeros((12, 12), bool)
    expected_tiny[11, 5:7] = True
    np.testing.assert_array_equal(masks[0].numpy(), expected_tiny)
    np.testing.assert_array_equal(masks[1].numpy(), clean)


def test_generate_masks_leaves_no_region_under_min_mask_region_area(scaled_model):
    ndimage = pytest.importorskip("scipy.ndimage")
    image, _ = quadrants(64, 64)
    options = dict(points_per_side=6, pred_iou_thresh=0.0, stability_score_thresh=0.2, box_nms_thresh=0.9)
    raw = generate_masks(scaled_model, image, **options)
    cleaned = generate_masks(scaled_model, image, min_mask_region_area=40, **options)
    assert 0 < len(cleaned) <= len(raw)
    changed = 0
    for mask in cleaned:
        segmentation = mask["segmentation"]
        for regions in (segmentation, ~segmentation):  # islands, then holes (and the outside)
            labels, count = ndimage.label(regions, structure=np.ones((3, 3)))
            assert (np.bincount(labels.ravel())[1:] >= 40).all()
        ys, xs = np.nonzero(segmentation)
        assert mask["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
        assert mask["area"] == segmentation.sum()
        changed += not any(np.array_equal(segmentation, m["segmentation"]) for m in raw)
    assert changed >= 1


def test_evaluate_everything_scores_each_image_with_match_instances(scaled_model, tmp_path):
    image, labels = quadrants()
    rows = [
        {"image": encode_array(image), "mask": encode_array(labels.astype(np.uint16)), "image_id": "quadrants"},
        {"image": encode_array(image), "mask": encode_array(np.zeros_like(labels, np.uint16)), "image_id": "empty"},
    ]
    result = evaluate_everything(scaled_model, rows, **OPTIONS)
    predicted = [m["segmentation"] for m in generate_masks(scaled_model, image, **OPTIONS)]
    expected = match_instances(predicted, [labels == value for value in range(1, 5)])
    assert expected["true_positives"] >= 1  # the top-left quadrant is found
    first, second = result["per_image"]
    assert first == {"image_id": "quadrants", **{k: v for k, v in expected.items() if k != "pairs"}}
    assert (second["true_positives"], second["false_positives"], second["false_negatives"]) == (0, len(predicted), 0)
    assert result["num_images"] == 2
    assert result["false_positives"] == 2 * len(predicted) - expected["true_positives"]
    assert result["recall"] == expected["true_positives"] / 4
    path = save_label_map(label_map(predicted, labels.shape), tmp_path / "labels.png")
    assert np.asarray(PIL.Image.open(path)).max() == len(predicted)
