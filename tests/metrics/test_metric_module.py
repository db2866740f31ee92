"""The evaluate module and `compute_metrics`: aggregation against numpy, evaluate's APIs, offline `evaluate.load`."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

import sam2_peft.metrics
from sam2_peft.metrics import METRIC_SCRIPT, compute_metrics

from test_metric_kernels import reference_scores, reference_surface

SCORES = ("dice", "iou", "precision", "recall")
REPO_ROOT = Path(__file__).resolve().parents[2]


def reference_group(preds, targets, tolerance):
    """Group statistics computed object by object in numpy, as the aggregate module docstring defines them."""
    per_object = [reference_scores(p, t) for p, t in zip(preds, targets)]
    surface = [reference_surface(p, t, tolerance) for p, t in zip(preds, targets)]
    out = {name: float(np.mean([o[name] for o in per_object])) for name in SCORES}
    tp = sum(int(np.sum(p & t)) for p, t in zip(preds, targets))
    fp = sum(int(np.sum(p & ~t)) for p, t in zip(preds, targets))
    fn = sum(int(np.sum(~p & t)) for p, t in zip(preds, targets))
    pooled_pred = np.concatenate([np.ones(tp, bool), np.ones(fp, bool), np.zeros(fn, bool)])
    pooled_true = np.concatenate([np.ones(tp, bool), np.zeros(fp, bool), np.ones(fn, bool)])
    for name, value in reference_scores(pooled_pred, pooled_true).items():
        out[f"{name}_micro"] = value
    hd95 = [h for h, _ in surface if not math.isnan(h)]
    out["hd95"] = float(np.mean(hd95)) if hd95 else math.nan
    out["hd95_undefined"] = len(surface) - len(hd95)
    out["nsd"] = float(np.mean([n for _, n in surface]))
    out["num_objects"] = len(preds)
    return out


def assert_group_equal(got, expected):
    assert set(expected) <= set(got)
    for name, value in expected.items():
        np.testing.assert_allclose(got[name], value, rtol=1e-12, atol=1e-12, err_msg=name)


@st.composite
def object_lists(draw):
    """Objects of varying sizes with image and class ids; hypothesis shrinks towards empty masks."""
    count = draw(st.integers(1, 6))
    preds, targets = [], []
    for _ in range(count):
        shape = (draw(st.integers(1, 8)), draw(st.integers(1, 8)))
        preds.append(draw(arrays(np.bool_, shape)))
        targets.append(draw(arrays(np.bool_, shape)))
    image_ids = draw(st.lists(st.integers(0, 2), min_size=count, max_size=count))
    class_ids = draw(st.lists(st.sampled_from(["liver", "kidney"]), min_size=count, max_size=count))
    return preds, targets, image_ids, class_ids


@settings(max_examples=40, deadline=None)
@given(object_lists())
def test_compute_metrics_aggregates_like_numpy(objects):
    preds, targets, image_ids, class_ids = objects
    got = compute_metrics(preds, targets, image_ids=image_ids, class_ids=class_ids, nsd_tolerance=1.5, batch_size=2)
    assert_group_equal(got, reference_group(preds, targets, 1.5))
    for key, group in (("per_image", image_ids), ("per_class", class_ids)):
        assert set(got[key]) == {str(g) for g in group}
        for name in set(group):
            rows = [i for i, g in enumerate(group) if g == name]
            expected = reference_group([preds[i] for i in rows], [targets[i] for i in rows], 1.5)
            assert_group_equal(got[key][str(name)], expected)
    per_object = got["per_object"]
    for i, (p, t) in enumerate(zip(preds, targets)):
        for name, value in reference_scores(p, t).items():
            assert per_object[name][i] == pytest.approx(value, abs=1e-12)
        assert per_object["tp"][i] == int(np.sum(p & t))
    assert per_object["image_id"] == [str(i) for i in image_ids]


def test_per_item_spacing_scales_hd95():
    pred = np.zeros((8, 8), bool)
    pred[2:5, 2:5] = True
    target = np.roll(pred, 2, axis=1)  # 2 columns right: hd95 = 2 column widths
    got = compute_metrics([pred, pred], [target, target], spacing=[(1.0, 1.0), (1.0, 0.5)], nsd_tolerance=1.0)
    assert got["per_object"]["hd95"] == [2.0, 1.0]
    assert got["per_object"]["nsd"][1] == 1.0


def test_compute_metrics_errors_name_the_item():
    with pytest.raises(ValueError, match=r"`predictions\[1\]` has shape \(3, 3\) but `references\[1\]` has \(3, 4\)"):
        compute_metrics([np.zeros((2, 2)), np.zeros((3, 3))], [np.zeros((2, 2)), np.zeros((3, 4))])
    with pytest.raises(ValueError, match="`image_ids` has 1 entries for 2 predictions"):
        compute_metrics([np.zeros((2, 2))] * 2, [np.zeros((2, 2))] * 2, image_ids=["a"])
    with pytest.raises(ValueError, match="one pair per prediction"):
        compute_metrics([np.zeros((2, 2))], [np.zeros((2, 2))], spacing=[1.0, 2.0, 3.0])


def test_evaluate_module_equals_compute_metrics_and_accumulates():
    rng = np.random.default_rng(0)
    preds = [rng.random((6, 7)) > 0.5, np.zeros((4, 4), bool), rng.random((9, 5)) > 0.3]
    targets = [rng.random((6, 7)) > 0.5, np.ones((4, 4), bool), rng.random((9, 5)) > 0.3]
    ids = dict(image_ids=["a", "a", "b"], class_ids=[1, 2, 1])
    direct = compute_metrics(preds, targets, **ids, nsd_tolerance=2.0)

    metric = sam2_peft.metrics.load()
    np.testing.assert_equal(metric.compute(predictions=preds, references=targets, **ids, nsd_tolerance=2.0), direct)
    metric.add_batch(predictions=preds[:2], references=targets[:2], image_ids=["a", "a"], class_ids=[1, 2])
    metric.add(prediction=preds[2], reference=targets[2], image_id="b", class_id=1)
    np.testing.assert_equal(metric.compute(nsd_tolerance=2.0), direct)

    without_ids = metric.compute(predictions=preds, references=targets)
    assert "per_image" not in without_ids and "per_class" not in without_ids
    assert without_ids["dice"] == compute_metrics(preds, targets)["dice"]

    metric.add_batch(predictions=preds[:1], references=targets[:1], image_ids=["a"])
    with pytest.raises(ValueError, match="`image_ids` was given for some predictions but not others"):
        metric.compute(predictions=preds[1:], references=targets[1:])


def test_evaluate_load_of_the_script_works_offline(tmp_path):
    rng = np.random.default_rng(1)
    preds = [rng.random((5, 6)) > 0.5, rng.random((3, 3)) > 0.5, np.zeros((2, 2), bool)]
    targets = [rng.random((5, 6)) > 0.5, np.zeros((3, 3), bool), np.zeros((2, 2), bool)]
    np.savez(tmp_path / "masks.npz", *preds, *targets)
    script = f"""
import json, sys, numpy as np, evaluate
masks = np.load({str(tmp_path / "masks.npz")!r})
arrays = [masks[f"arr_{{i}}"] for i in range(6)]
metric = evaluate.load({METRIC_SCRIPT!r})
result = metric.compute(predictions=arrays[:3], references=arrays[3:], image_ids=[0, 0, 1])
json.dump(result, sys.stdout)
"""
    # huggingface_hub reads HF_HUB_OFFLINE at import time, hence a fresh interpreter; HF_HOME keeps its cache here.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "PYTHONPATH": str(REPO_ROOT)}
    run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    loaded = json.loads(run.stdout)
    direct = sam2_peft.metrics.load().compute(predictions=preds, references=targets, image_ids=[0, 0, 1])
    np.testing.assert_equal(loaded, direct)
    assert loaded["hd95_undefined"] == 1 and loaded["per_image"]["1"]["dice"] == 1.0
