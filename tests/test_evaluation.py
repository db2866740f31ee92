"""`evaluate_model` on a tiny run: files, numbers against the metric module and training's own validation."""

import csv
import json
import shutil
from pathlib import Path

import PIL.Image
import pytest
import torch
from torch.utils.data import DataLoader

from sam2_peft.config import TrainConfig
from sam2_peft.data import Preprocessor, SegmentationDataset, collate_objects, load_source
from sam2_peft.evaluation import EvalProtocol, evaluate_model, predict_objects
from sam2_peft.finetune import finetune
from sam2_peft.hub import load_adapter
from sam2_peft.interactive import InteractiveSegmenter
import sam2_peft.metrics
from sam2_peft.models import load_sam2, model_fingerprint
from sam2_peft.reports import CELL_PIXELS
from sam2_peft.segmenter import best_mask_logits, masks_at_original_size

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "data"
SCORES = ("dice", "iou", "precision", "recall", "dice_micro", "iou_micro", "hd95", "nsd")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One train and two val images of the bundled cells, and a decoder run of 2 steps on them."""
    root = tmp_path_factory.mktemp("eval")
    for split, count in (("train", 1), ("val", 2)):
        for image in sorted((EXAMPLES / split / "images").iterdir())[:count]:
            for kind in ("images", "masks"):
                (root / "data" / split / kind).mkdir(parents=True, exist_ok=True)
                shutil.copy(EXAMPLES / split / kind / image.name, root / "data" / split / kind / image.name)
    cfg = TrainConfig(
        model="tiny-random", data=str(root / "data"), strategy="decoder", max_steps=2, batch_size=2, eval_steps=2,
        max_objects_per_image=4, learning_rate=1e-2, output_dir=str(root / "run"),
    )  # fmt: skip
    metrics = finetune(cfg)
    return {"data": root / "data", "final": root / "run" / "final", "metrics": metrics, "cfg": cfg, "root": root}


@pytest.fixture(scope="module")
def evaluated(run):
    """Eval as training validates (box prompts, at most 8 objects per image, the run's seed), with files."""
    output = run["root"] / "eval"
    results = evaluate_model(
        "tiny-random", run["data"], adapter=run["final"], split="val", output_dir=output,
        max_objects_per_image=run["cfg"].max_objects_per_image, seed=run["cfg"].seed, num_overlays=5, verbose=False,
    )  # fmt: skip
    return results, output


def test_eval_writes_its_files(evaluated):
    results, output = evaluated
    assert json.loads((output / "metrics.json").read_text()) == results
    assert set(results) == {"protocol", "fine_tuned", "baseline", "gain"}
    with open(output / "per_object.csv") as handle:
        rows = list(csv.DictReader(handle))
    num_objects = results["fine_tuned"]["num_objects"]
    assert len(rows) == 2 * num_objects
    assert [row["model"] for row in rows] == ["baseline"] * num_objects + ["fine_tuned"] * num_objects
    tuned = [row for row in rows if row["model"] == "fine_tuned"]
    assert sum(float(row["dice"]) for row in tuned) / num_objects == pytest.approx(results["fine_tuned"]["dice"])
    assert all(0 <= float(row["predicted_iou"]) <= 1 and int(row["area"]) >= 16 for row in tuned)
    # 5 objects (rows) x (image, ground truth, baseline, fine-tuned).
    assert PIL.Image.open(output / "overlays.png").size == (4 * CELL_PIXELS, 5 * CELL_PIXELS)


def test_eval_reproduces_the_runs_own_validation(run, evaluated):
    """The same objects and prompts as finetune's validation give its numbers, computed by `validate`."""
    results, _ = evaluated
    for name in ("dice", "iou", "precision", "recall", "num_objects"):
        assert results["fine_tuned"][name] == pytest.approx(run["metrics"]["best"][name], abs=1e-6)
        assert results["baseline"][name] == pytest.approx(run["metrics"]["baseline"][name], abs=1e-6)
    assert results["gain"]["dice"] == pytest.approx(results["fine_tuned"]["dice"] - results["baseline"]["dice"])
    assert results["gain"]["dice"] != 0  # lr 1e-2 for 2 steps visibly moves the decoder


def test_eval_numbers_equal_the_metric_module_on_the_same_predictions(run, evaluated):
    results, _ = evaluated
    model = load_adapter(load_sam2("tiny-random"), run["final"])
    dataset = SegmentationDataset(
        load_source(run["data"])["val"], Preprocessor.from_model(model), prompts="box", min_object_area=16,
        max_objects_per_image=4, seed=run["cfg"].seed,
    )  # fmt: skip
    module = InteractiveSegmenter(model).eval()
    predictions, references, image_ids, class_ids = [], [], [], []
    with torch.no_grad():
        for batch in DataLoader(dataset, batch_size=3, collate_fn=collate_objects):
            logits = best_mask_logits(module(batch)[-1])
            predictions += [m.numpy() for m in masks_at_original_size(logits, batch)]
            references += batch["full_masks"]
            image_ids += [batch["image_ids"][i] for i in batch["image_index"].tolist()]
            class_ids += batch["class_ids"].tolist()
    expected = sam2_peft.metrics.load().compute(
        predictions=predictions, references=references, image_ids=image_ids, class_ids=class_ids
    )
    for name in SCORES:
        assert results["fine_tuned"][name] == pytest.approx(expected[name], abs=1e-9), name
    for image, scores in expected["per_image"].items():
        assert results["fine_tuned"]["per_image"][image]["dice"] == pytest.approx(scores["dice"], abs=1e-9)
    assert results["fine_tuned"]["per_class"]["1"]["num_objects"] == len(predictions)


def test_baseline_equals_evaluating_the_plain_model(run, evaluated, capsys):
    results, _ = evaluated
    plain = evaluate_model(load_sam2("tiny-random"), run["data"], split="val", max_objects_per_image=4, verbose=True)
    assert plain["fine_tuned"] == results["baseline"]
    assert set(plain) == {"protocol", "fine_tuned"} and plain["protocol"]["model"] == "Sam2Model"
    table = capsys.readouterr().out
    assert table.splitlines()[1].split() == ["metric", "model"]
    assert f"{plain['fine_tuned']['dice']:.4f}" in table


def test_points_with_correction_clicks_are_seeded(run):
    model = load_adapter(load_sam2("tiny-random"), run["final"])
    rows = load_source(run["data"])["val"].select([0])
    dataset = SegmentationDataset(rows, Preprocessor.from_model(model), prompts="points:2", max_objects_per_image=3)
    first = predict_objects(model, dataset, correction_clicks=1, seed=3)
    again = predict_objects(model, dataset, correction_clicks=1, seed=3)
    assert all(c.shape == (2, 2) for c in first.point_coords) and all((l == 1).all() for l in first.point_labels)
    assert all((a == b).all() for a, b in zip(first.masks, again.masks))
    # Prompt points come back in original pixels: inside their object.
    for coords, reference in zip(first.point_coords, first.references):
        x, y = coords.round().astype(int).T
        assert reference[y, x].all()


def test_model_module_is_left_unchanged_and_missing_split_is_named(run):
    model = load_sam2("tiny-random")
    before = model_fingerprint(model)
    results = evaluate_model(
        model, run["data"], adapter=run["final"], split="val", max_objects_per_image=1, baseline=False, verbose=False
    )
    assert model_fingerprint(model) == before
    assert set(results) == {"protocol", "fine_tuned"} and results["fine_tuned"]["num_objects"] == 2
    with pytest.raises(ValueError, match=r"no split 'test'; it has \['train', 'val'\]"):
        evaluate_model("tiny-random", run["data"], split="test", verbose=False)


def test_a_protocol_object_equals_its_fields_as_keywords_and_unknown_options_are_named(run, evaluated):
    results, _ = evaluated
    protocol = EvalProtocol(split="test", max_objects_per_image=4, seed=7)
    # Keywords override the protocol's fields: this is the baseline run of `evaluated`, scored again.
    plain = evaluate_model(load_sam2("tiny-random"), run["data"], protocol=protocol, split="val", seed=run["cfg"].seed,
                           verbose=False)
    assert plain["fine_tuned"] == results["baseline"] and plain["protocol"]["seed"] == run["cfg"].seed
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['prompts'\]"):
        evaluate_model("tiny-random", run["data"], prompts="box")
