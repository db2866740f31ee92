"""Instance matching on hand-made masks, with every expected number worked out by hand in the comments."""

from __future__ import annotations

import math

import numpy as np
import pytest

from sam2_peft.metrics.instances import aggregate_matches, iou_matrix, match_instances


def box(y0: int, y1: int, x0: int, x1: int, shape=(10, 10)) -> np.ndarray:
    mask = np.zeros(shape, bool)
    mask[y0:y1, x0:x1] = True
    return mask


A = box(0, 4, 0, 4)  # 16 px
B = box(6, 10, 6, 10)  # 16 px, disjoint from A
A_LEFT = box(0, 4, 0, 2)  # 8 px inside A: IoU(A, A_LEFT) = 8 / 16 = 0.5
A_WIDE = box(0, 4, 0, 5)  # 20 px around A: IoU = 16 / 20 = 0.8
A_SHIFT = box(1, 5, 0, 4)  # 16 px: overlap 12, union 20, IoU = 0.6


def test_perfect_prediction():
    result = match_instances([B, A], [A, B])
    assert result["pairs"] == [(0, 1, 1.0), (1, 0, 1.0)]
    assert [result[k] for k in ("precision", "recall", "f1", "panoptic_quality", "mean_matched_iou")] == [1.0] * 5
    assert (result["true_positives"], result["false_positives"], result["false_negatives"]) == (2, 0, 0)


def test_threshold_is_inclusive():
    assert match_instances([A_LEFT], [A], iou_threshold=0.5)["true_positives"] == 1  # IoU exactly 0.5
    missed = match_instances([A_LEFT], [A], iou_threshold=0.6)
    assert (missed["true_positives"], missed["false_positives"], missed["false_negatives"]) == (0, 1, 1)
    assert missed["f1"] == 0.0 and math.isnan(missed["mean_matched_iou"])


def test_duplicates_count_once_and_greedy_takes_the_best_iou():
    # A_SHIFT (0.6) and A_WIDE (0.8) both reach 0.5 with A; A_WIDE wins, A_SHIFT is a false positive.
    result = match_instances([A_SHIFT, A_WIDE, B], [A, B])
    assert result["pairs"] == [(2, 1, 1.0), (1, 0, 0.8)]
    assert (result["true_positives"], result["false_positives"], result["false_negatives"]) == (2, 1, 0)
    assert result["precision"] == pytest.approx(2 / 3)
    assert result["recall"] == 1.0
    assert result["f1"] == pytest.approx(2 * 2 / (3 + 2))  # 2TP / (P + R) = 0.8
    assert result["mean_matched_iou"] == pytest.approx(0.9)
    assert result["panoptic_quality"] == pytest.approx(1.8 / (2 + 0.5))  # sum IoU / (TP + FP/2 + FN/2) = 0.72
    exact_copies = match_instances([A, A], [A])
    assert (exact_copies["precision"], exact_copies["recall"]) == (0.5, 1.0)


def test_empty_prediction_reference_and_both():
    nothing_found = match_instances([], [A, B])
    assert (nothing_found["false_negatives"], nothing_found["precision"], nothing_found["recall"]) == (2, 0.0, 0.0)
    nothing_there = match_instances([A], [])
    assert (nothing_there["false_positives"], nothing_there["precision"], nothing_there["f1"]) == (1, 0.0, 0.0)
    both_empty = match_instances([], [])
    assert [both_empty[k] for k in ("precision", "recall", "f1", "panoptic_quality")] == [1.0] * 4
    assert math.isnan(both_empty["mean_matched_iou"])


def test_aggregate_pools_counts_over_images():
    images = [
        match_instances([A_SHIFT, A_WIDE, B], [A, B]),  # TP 2 (IoU 1.0, 0.8), FP 1, FN 0, F1 0.8
        match_instances([], [A]),  # TP 0, FP 0, FN 1, F1 0
        match_instances([], []),  # nothing, F1 1
    ]
    total = aggregate_matches(images)
    assert (total["true_positives"], total["false_positives"], total["false_negatives"]) == (2, 1, 1)
    assert total["precision"] == pytest.approx(2 / 3)
    assert total["recall"] == pytest.approx(2 / 3)
    assert total["f1"] == pytest.approx(4 / 6)
    assert total["mean_matched_iou"] == pytest.approx(0.9)
    assert total["panoptic_quality"] == pytest.approx(1.8 / 3)  # (P + R) / 2 = (3 + 3) / 2
    assert total["mean_image_f1"] == pytest.approx((0.8 + 0.0 + 1.0) / 3)
    with pytest.raises(ValueError, match="No image"):
        aggregate_matches([])


def test_iou_matrix_matches_a_direct_computation():
    rng = np.random.default_rng(0)
    predicted = [rng.random((12, 9)) < p for p in (0.2, 0.5, 0.0)]
    reference = [rng.random((12, 9)) < p for p in (0.3, 0.7)]
    expected = [[(p & r).sum() / (p | r).sum() for r in reference] for p in predicted]
    np.testing.assert_allclose(iou_matrix(predicted, reference), expected)


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="one \\(H, W\\) size"):
        match_instances([A], [box(0, 2, 0, 2, shape=(8, 10))])
    with pytest.raises(ValueError, match="iou_threshold=0"):
        match_instances([A], [A], iou_threshold=0)
