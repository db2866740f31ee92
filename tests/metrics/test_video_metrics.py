"""DAVIS J, F, J&F and volume Dice (`sam2_peft.metrics.video`) against per-pixel loops and a k-d tree."""

import json
import math

import numpy as np
import pytest
import torch
from scipy.spatial import cKDTree

from sam2_peft.metrics import video
from sam2_peft.metrics.video import (
    ClipScores,
    aggregate_clips,
    boundary_f_measure,
    boundary_map,
    boundary_radius,
    masks_from_label_maps,
    score_clip,
)


def reference_boundary(mask: np.ndarray) -> np.ndarray:
    """DAVIS's seg2bmap, pixel by pixel: differs from the right, lower or lower-right neighbour, within the image."""
    height, width = mask.shape
    out = np.zeros_like(mask)
    for y in range(height):
        for x in range(width):
            if y == height - 1 and x == width - 1:
                continue
            if y == height - 1:
                neighbours = [(y, x + 1)]
            elif x == width - 1:
                neighbours = [(y + 1, x)]
            else:
                neighbours = [(y, x + 1), (y + 1, x), (y + 1, x + 1)]
            out[y, x] = any(mask[n] != mask[y, x] for n in neighbours)
    return out


def reference_f(pred: np.ndarray, target: np.ndarray, bound_th: float = 0.008) -> float:
    """davis2017-evaluation's `f_measure`, with nearest-neighbour distances from a k-d tree instead of dilations."""
    radius = bound_th if bound_th >= 1 else math.ceil(bound_th * np.linalg.norm(pred.shape))
    pred_points = np.argwhere(reference_boundary(pred))
    target_points = np.argwhere(reference_boundary(target))
    if len(pred_points) == 0 or len(target_points) == 0:
        return float(len(pred_points) == len(target_points))

    def matched(source, other):
        distance, _ = cKDTree(other).query(source)
        return np.count_nonzero(distance**2 <= radius**2 + 1e-9)

    precision = matched(pred_points, target_points) / len(pred_points)
    recall = matched(target_points, pred_points) / len(target_points)
    return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


def square(size=64, top=10, left=10, side=20) -> np.ndarray:
    mask = np.zeros((size, size), bool)
    mask[top : top + side, left : left + side] = True
    return mask


def f_of(pred: np.ndarray, target: np.ndarray, bound_th: float = 0.008) -> float:
    return boundary_f_measure(torch.from_numpy(pred)[None], torch.from_numpy(target)[None], bound_th).item()


def test_boundary_map_matches_seg2bmap_pixel_by_pixel():
    rng = np.random.default_rng(0)
    for height, width in [(1, 1), (1, 7), (6, 1), (9, 13), (16, 5)]:
        mask = rng.random((height, width)) > 0.5
        np.testing.assert_array_equal(boundary_map(torch.from_numpy(mask)).numpy(), reference_boundary(mask))
    # A mask filling the image has no boundary (no edge lies inside the image): DAVIS's convention, kept.
    assert not boundary_map(torch.ones(5, 8, dtype=torch.bool)).any()


@pytest.mark.parametrize("bound_th", [0.008, 0.06, 1, 2, 2.5, 4])
def test_f_matches_the_kd_tree_reference_on_random_masks(bound_th):
    rng = np.random.default_rng(int(bound_th * 1000))
    cases = []
    for _ in range(12):
        height, width = rng.integers(1, 28, 2)
        blob = square(max(height, width), *rng.integers(0, 10, 2), rng.integers(1, 15))[:height, :width]
        cases.append((blob, rng.random((height, width)) > rng.random()))
        cases.append((blob, np.roll(blob, rng.integers(-4, 5), axis=int(rng.integers(0, 2)))))
    for pred, target in cases:
        assert f_of(pred, target, bound_th) == pytest.approx(reference_f(pred, target, bound_th), abs=1e-12)


def test_boundary_radius_is_davis_ceil_of_the_diagonal_fraction_or_pixels():
    assert boundary_radius(480, 854) == 8.0  # a DAVIS 480p frame
    assert boundary_radius(512, 512) == 6.0
    assert boundary_radius(64, 64) == 1.0
    assert boundary_radius(64, 64, bound_th=3) == 3.0
    with pytest.raises(ValueError, match="bound_th=0"):
        boundary_radius(64, 64, bound_th=0)


def test_shifts_within_the_tolerance_keep_f_at_one_and_beyond_it_follow_the_hand_count():
    target = square()
    one_right = np.roll(target, 1, axis=1)
    clip = score_clip(one_right[None, None], target[None, None])  # 64 x 64: bound_pix = 1
    assert clip.j[0] == pytest.approx(380 / 420)  # 20 x 19 shared of 20 x 21
    assert clip.f[0] == 1.0
    assert f_of(np.roll(target, 2, axis=1), target, bound_th=2) == 1.0
    # 3 px right with a 2 px tolerance: 44 of the 80 boundary pixels match each way (top row 20 of 21, left column 0
    # of 20, right column 5 of 20, bottom row 19 of 19), so precision = recall = F = 0.55.
    assert f_of(np.roll(target, 3, axis=1), target, bound_th=2) == pytest.approx(0.55)
    assert f_of(np.roll(target, 2, axis=1), target, bound_th=1) < 1.0


def test_empty_masks_follow_davis():
    empty, full, blob = np.zeros((16, 16), bool), np.ones((16, 16), bool), square(16, 4, 4, 6)
    pred = np.stack([empty, empty, blob, full])[:, None]  # (T=4, N=1, H, W)
    target = np.stack([empty, blob, empty, empty])[:, None]
    clip = score_clip(pred, target)
    np.testing.assert_array_equal(clip.j_per_frame[:, 0], [1.0, 0.0, 0.0, 0.0])
    # A full-image mask has no seg2bmap boundary, so against an empty one both boundaries are empty: F = 1 (DAVIS).
    np.testing.assert_array_equal(clip.f_per_frame[:, 0], [1.0, 0.0, 0.0, 1.0])


def test_score_clip_means_over_frames_and_pools_dice_over_the_volume():
    target = np.zeros((2, 2, 8, 8), bool)  # (T, N, H, W); object 2 is absent everywhere
    target[:, 0, 2:4, 2:4] = True
    pred = target.copy()
    pred[1, 0, 3, 2:4] = False  # frame 1: 2 of the 4 pixels
    clip = score_clip(pred, target, clip_id="a", object_ids=["cat", "dog"])
    np.testing.assert_allclose(clip.j_per_frame, [[1.0, 1.0], [0.5, 1.0]])
    np.testing.assert_allclose(clip.j, [0.75, 1.0])
    expected_f = [reference_f(pred[t, 0], target[t, 0]) for t in range(2)]
    np.testing.assert_allclose(clip.f_per_frame[:, 0], expected_f)
    np.testing.assert_allclose(clip.f, [np.mean(expected_f), 1.0])
    # Volume Dice: 6 shared pixels, 2 missed -> 12 / 14 (the mean of the frames' Dice would be 5 / 6).
    np.testing.assert_allclose(clip.dice, [12 / 14, 1.0])
    np.testing.assert_allclose(clip.j_and_f, (clip.j + clip.f) / 2)
    means = clip.means()
    assert means["j"] == pytest.approx(0.875) and means["dice"] == pytest.approx((12 / 14 + 1) / 2)
    assert list(clip.per_object()) == ["cat", "dog"]


def test_frames_selects_what_is_scored_and_torch_equals_numpy(monkeypatch):
    rng = np.random.default_rng(3)
    pred, target = rng.random((2, 6, 3, 20, 24)) > 0.6
    middle = score_clip(pred, target, frames=range(1, 5))
    sliced = score_clip(pred[1:5], target[1:5])
    assert middle.frames == [1, 2, 3, 4]
    np.testing.assert_array_equal(middle.j_per_frame, sliced.j_per_frame)
    np.testing.assert_array_equal(middle.f_per_frame, sliced.f_per_frame)
    np.testing.assert_array_equal(middle.dice, sliced.dice)
    # Chunks of a few masks each (the chunk loop runs 9 times) give the same numbers.
    monkeypatch.setattr(video, "_CHUNK_PIXELS", 2 * 20 * 24)
    chunked = score_clip(torch.from_numpy(pred), torch.from_numpy(target))
    whole = score_clip(pred, target)
    np.testing.assert_array_equal(chunked.f_per_frame, whole.f_per_frame)
    np.testing.assert_array_equal(chunked.j_per_frame, whole.j_per_frame)
    for t in range(6):
        for n in range(3):
            assert whole.f_per_frame[t, n] == pytest.approx(reference_f(pred[t, n], target[t, n]), abs=1e-12)


def test_score_clip_refuses_bad_input():
    masks = np.zeros((2, 1, 4, 4), bool)
    with pytest.raises(TypeError, match="bool masks"):
        score_clip(masks.astype(np.uint8), masks)
    with pytest.raises(ValueError, match=r"\(T, N, H, W\)"):
        score_clip(masks[0], masks[0])
    with pytest.raises(ValueError, match="differ"):
        score_clip(masks, masks[:1])
    with pytest.raises(ValueError, match="frame indices"):
        score_clip(masks, masks, frames=[2])
    with pytest.raises(ValueError, match="object_ids"):
        score_clip(masks, masks, object_ids=[1, 2])


def clip_scores(clip_id, j, f, dice) -> ClipScores:
    j, f = np.asarray(j, float), np.asarray(f, float)
    return ClipScores(clip_id, [str(i + 1) for i in range(j.shape[1])], list(range(j.shape[0])), j, f, np.asarray(dice))


def test_aggregate_weighs_every_object_the_same():
    clips = [
        clip_scores("a", j=[[1.0], [0.5]], f=[[1.0], [1.0]], dice=[0.9]),  # one object over two frames
        clip_scores("b", j=[[0.0, 0.5, 1.0]], f=[[0.25, 0.5, 0.75]], dice=[0.1, 0.2, 0.3]),
    ]
    result = json.loads(json.dumps(aggregate_clips(clips)))
    # Means over the 4 objects (the mean of the two clip means would give j = 0.625).
    assert result["j"] == pytest.approx((0.75 + 0.0 + 0.5 + 1.0) / 4)
    assert result["f"] == pytest.approx((1.0 + 0.25 + 0.5 + 0.75) / 4)
    assert result["j_and_f"] == pytest.approx((result["j"] + result["f"]) / 2)
    assert result["dice"] == pytest.approx(1.5 / 4)
    assert (result["num_clips"], result["num_objects"], result["num_frames"]) == (2, 4, 3)
    assert result["per_clip"]["a"] == pytest.approx({"j": 0.75, "f": 1.0, "j_and_f": 0.875, "dice": 0.9})
    assert result["per_clip"]["b"] == pytest.approx({"j": 0.5, "f": 0.5, "j_and_f": 0.5, "dice": 0.2})
    assert list(result["per_object"]) == ["a/1", "b/1", "b/2", "b/3"]
    assert result["per_object"]["b/3"] == pytest.approx({"j": 1.0, "f": 0.75, "j_and_f": 0.875, "dice": 0.3})
    assert {"j", "f", "j_and_f", "dice"} <= set(result)


def test_aggregate_names_unnamed_clips_and_refuses_repeats():
    one = clip_scores(None, j=[[1.0]], f=[[1.0]], dice=[1.0])
    assert list(aggregate_clips([one, one])["per_clip"]) == ["0", "1"]
    with pytest.raises(ValueError, match=r"\['x'\]"):
        aggregate_clips([clip_scores("x", [[1.0]], [[1.0]], [1.0])] * 2)
    with pytest.raises(ValueError, match="at least one"):
        aggregate_clips([])


def test_masks_from_label_maps():
    labels = np.array([[[0, 1], [2, 2]], [[1, 1], [0, 3]]])  # (T=2, H=2, W=2)
    masks = masks_from_label_maps(labels, object_ids=[1, 2, 3])
    assert masks.shape == (2, 3, 2, 2) and masks.dtype == bool
    np.testing.assert_array_equal(masks[1, 0], [[True, True], [False, False]])
    np.testing.assert_array_equal(masks[0, 2], np.zeros((2, 2), bool))
