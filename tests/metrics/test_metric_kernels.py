"""The torch kernels against plain numpy written pixel by pixel: overlap counts, boundaries, HD95 and NSD."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from sam2_peft.metrics import kernels
from sam2_peft.metrics.kernels import (
    directed_surface_distances,
    mask_boundaries,
    segmentation_scores,
    surface_scores,
)


def reference_scores(pred: np.ndarray, target: np.ndarray) -> dict[str, float]:
    tp = int(np.sum(pred & target))
    fp = int(np.sum(pred & ~target))
    fn = int(np.sum(~pred & target))

    def ratio(num, den):
        if den:
            return num / den
        return 1.0 if tp + fp + fn == 0 else 0.0

    return {
        "dice": ratio(2 * tp, 2 * tp + fp + fn),
        "iou": ratio(tp, tp + fp + fn),
        "precision": ratio(tp, tp + fp),
        "recall": ratio(tp, tp + fn),
    }


def reference_boundary(mask: np.ndarray) -> np.ndarray:
    height, width = mask.shape
    out = np.zeros_like(mask)
    for i in range(height):
        for j in range(width):
            if not mask[i, j]:
                continue
            for di, dj in ((-1, 0), (1, 0), (0, -1), (0, 1)):
                y, x = i + di, j + dj
                if not (0 <= y < height and 0 <= x < width) or not mask[y, x]:
                    out[i, j] = True
    return out


def reference_distances(source: np.ndarray, target: np.ndarray, spacing=(1.0, 1.0)) -> np.ndarray:
    a = np.argwhere(reference_boundary(source)) * np.asarray(spacing)
    b = np.argwhere(reference_boundary(target)) * np.asarray(spacing)
    return np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)).min(axis=1)


def reference_surface(pred, target, tolerance, spacing=(1.0, 1.0)) -> tuple[float, float]:
    if not pred.any() and not target.any():
        return 0.0, 1.0
    if not pred.any() or not target.any():
        return math.nan, 0.0
    d_pt = reference_distances(pred, target, spacing)
    d_tp = reference_distances(target, pred, spacing)
    hd95 = max(np.percentile(d_pt, 95), np.percentile(d_tp, 95))
    limit = tolerance * (1 + 1e-9)  # a distance equal to the tolerance is within, despite float rounding
    nsd = (np.sum(d_pt <= limit) + np.sum(d_tp <= limit)) / (d_pt.size + d_tp.size)
    return float(hd95), float(nsd)


@st.composite
def mask_batches(draw, max_side=10):
    n = draw(st.integers(1, 4))
    shape = (n, draw(st.integers(1, max_side)), draw(st.integers(1, max_side)))
    return draw(arrays(np.bool_, shape)), draw(arrays(np.bool_, shape))


@settings(max_examples=60, deadline=None)
@given(mask_batches())
def test_segmentation_scores_equal_numpy(batch):
    pred, target = batch
    scores = segmentation_scores(torch.from_numpy(pred), torch.from_numpy(target))
    for k in range(pred.shape[0]):
        expected = reference_scores(pred[k], target[k])
        for name, value in expected.items():
            assert scores[name][k].item() == pytest.approx(value, abs=1e-12), (name, k)


def test_empty_cases_follow_the_documented_rules():
    empty, full = np.zeros((1, 4, 4), bool), np.ones((1, 4, 4), bool)
    cases = {  # (pred, target) -> dice, iou, precision, recall, hd95, nsd
        "both empty": (empty, empty, 1.0, 1.0, 1.0, 1.0, 0.0, 1.0),
        "prediction empty": (empty, full, 0.0, 0.0, 0.0, 0.0, math.nan, 0.0),
        "target empty": (full, empty, 0.0, 0.0, 0.0, 0.0, math.nan, 0.0),
    }
    for label, (pred, target, *expected) in cases.items():
        pred_t, target_t = torch.from_numpy(pred), torch.from_numpy(target)
        values = {**segmentation_scores(pred_t, target_t), **surface_scores(pred_t, target_t)}
        got = [values[name].item() for name in ("dice", "iou", "precision", "recall", "hd95", "nsd")]
        np.testing.assert_equal(got, expected, err_msg=label)


@settings(max_examples=40, deadline=None)
@given(arrays(np.bool_, st.tuples(st.integers(1, 3), st.integers(1, 9), st.integers(1, 9))))
def test_mask_boundaries_equal_pixelwise_reference(masks):
    got = mask_boundaries(torch.from_numpy(masks)).numpy()
    for k in range(masks.shape[0]):
        np.testing.assert_array_equal(got[k], reference_boundary(masks[k]))


@settings(max_examples=60, deadline=None)
@given(mask_batches(), st.sampled_from([0.0, 1.0, 1.5, 3.0]))
def test_hd95_and_nsd_equal_brute_force(batch, tolerance):
    pred, target = batch
    got = surface_scores(torch.from_numpy(pred), torch.from_numpy(target), tolerance=tolerance)
    for k in range(pred.shape[0]):
        hd95, nsd = reference_surface(pred[k], target[k], tolerance)
        np.testing.assert_allclose(got["hd95"][k].item(), hd95, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(got["nsd"][k].item(), nsd, rtol=1e-12, atol=1e-12)


@settings(max_examples=30, deadline=None)
@given(mask_batches(max_side=8), st.tuples(st.floats(0.2, 3.0), st.floats(0.2, 3.0)))
def test_anisotropic_spacing_equals_brute_force(batch, spacing):
    pred, target = batch
    got = surface_scores(torch.from_numpy(pred), torch.from_numpy(target), tolerance=1.0, spacing=spacing)
    for k in range(pred.shape[0]):
        hd95, nsd = reference_surface(pred[k], target[k], 1.0, spacing)
        np.testing.assert_allclose(got["hd95"][k].item(), hd95, rtol=1e-9)
        np.testing.assert_allclose(got["nsd"][k].item(), nsd, rtol=1e-9)


def test_a_distance_equal_to_the_tolerance_is_within():
    # 5 columns of 0.2 mm: exactly 1.0 mm, which float arithmetic may compute a hair above 1.0.
    pred = np.ones((1, 1, 7), bool)
    target = np.zeros((1, 1, 7), bool)
    target[0, 0, 1] = True
    got = surface_scores(torch.from_numpy(pred), torch.from_numpy(target), tolerance=1.0, spacing=(1.0, 0.2))
    assert got["nsd"][0].item() == 1.0


def test_directed_distances_of_a_shifted_square():
    square = np.zeros((1, 12, 12), bool)
    square[0, 2:6, 2:6] = True
    shifted = np.roll(square, 3, axis=2)  # 3 pixels to the right
    index, distances = directed_surface_distances(torch.from_numpy(square), torch.from_numpy(shifted))
    assert index.tolist() == [0] * 12  # a 4x4 square has 12 boundary pixels
    np.testing.assert_allclose(np.sort(distances.numpy()), np.sort(reference_distances(square[0], shifted[0])))
    assert distances.max().item() == 3.0


def test_chunked_row_pass_gives_the_same_distances(monkeypatch):
    rng = np.random.default_rng(0)
    pred, target = rng.random((2, 3, 20, 20)) > 0.6
    whole = surface_scores(torch.from_numpy(pred), torch.from_numpy(target), tolerance=1.0)
    monkeypatch.setattr(kernels, "_MAX_BLOCK", 50)  # 2 points per block instead of all at once
    chunked = surface_scores(torch.from_numpy(pred), torch.from_numpy(target), tolerance=1.0)
    for name in ("hd95", "nsd"):
        torch.testing.assert_close(chunked[name], whole[name])


def test_kernels_reject_float_masks_and_shape_mismatch():
    with pytest.raises(TypeError, match="threshold first"):
        segmentation_scores(torch.zeros(1, 4, 4), torch.zeros(1, 4, 4))
    with pytest.raises(ValueError, match=r"\(1, 4, 4\) and \(1, 4, 5\)"):
        surface_scores(torch.zeros(1, 4, 4, dtype=torch.bool), torch.zeros(1, 4, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="tolerance"):
        surface_scores(torch.zeros(1, 4, 4, dtype=torch.bool), torch.zeros(1, 4, 4, dtype=torch.bool), tolerance=-1)
