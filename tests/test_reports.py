"""Overlay grids, example selection and the comparison table."""

import numpy as np
import PIL.Image
import pytest

from sam2_peft.reports import (
    CELL_PIXELS,
    OverlaySample,
    comparison_markdown,
    format_eval_table,
    plot_comparison,
    plot_overlays,
    select_examples,
)


def sample(rng, predictions: int, prompt: str) -> OverlaySample:
    target = np.zeros((40, 60), bool)
    target[10:20, 15:35] = True
    if prompt == "box":
        coords, labels = np.array([[15.0, 10.0], [34.0, 19.0]]), np.array([2, 3])
    else:
        coords, labels = np.array([[20.0, 15.0], [50.0, 30.0]]), np.array([1, 0])
    return OverlaySample(
        image=rng.random((40, 60, 3)),
        target=target,
        predictions={f"model {i}": rng.random((40, 60)) > 0.7 for i in range(predictions)},
        scores={f"model {i}": 0.5 for i in range(predictions)},
        point_coords=coords,
        point_labels=labels,
        title="image #0",
    )


def test_overlay_grid_has_one_cell_per_panel(tmp_path):
    rng = np.random.default_rng(0)
    samples = [sample(rng, 2, "box"), sample(rng, 1, "points"), sample(rng, 2, "points")]
    path = plot_overlays(samples, tmp_path / "grid.png")
    image = PIL.Image.open(path)
    # 3 rows x (image, ground truth, two predictions); the row with one prediction leaves a blank cell.
    assert image.size == (4 * CELL_PIXELS, 3 * CELL_PIXELS)
    pixels = np.asarray(image.convert("RGB")).astype(int)
    last_cell_of_row_two = pixels[CELL_PIXELS + 10 : 2 * CELL_PIXELS - 10, 3 * CELL_PIXELS + 10 :]
    assert (last_cell_of_row_two == 255).all()
    with pytest.raises(ValueError, match="at least one sample"):
        plot_overlays([], tmp_path / "empty.png")


def test_select_examples_takes_worst_best_and_random_middle():
    scores = np.random.default_rng(1).random(30)
    order = np.argsort(scores)
    chosen = select_examples(scores, 7, seed=0)
    assert len(set(chosen)) == 7 and chosen == sorted(chosen, key=lambda i: scores[i])
    assert set(order[:2]) <= set(chosen) and set(order[-2:]) <= set(chosen)
    assert select_examples(scores, 7, seed=0) == chosen
    assert select_examples(scores, 100) == order.tolist()
    assert select_examples(scores, 1) == [order[0]]
    assert select_examples(scores, 2) == [order[0], order[-1]]
    assert select_examples(scores, 0) == []


ROWS = [
    {"label": "decoder", "trainable_params": 1234567, "trainable_percent": 12.345, "saved_mb": 4.5,
     "peak_memory_mb": None, "seconds_per_step": 0.25, "images_per_s": 8.0, "dice": 0.81234, "iou": 0.7},
    {"label": "lora (lora_r=4)", "trainable_params": 0, "trainable_percent": 0.0, "saved_mb": 0.1,
     "peak_memory_mb": 900.0, "seconds_per_step": None, "images_per_s": None, "dice": 0.5, "iou": 0.4},
    {"label": "full", "error": "OutOfMemoryError: CUDA out of memory | try less"},
]  # fmt: skip


def test_comparison_markdown_formats_each_column():
    lines = comparison_markdown(ROWS, title="tiny").splitlines()
    assert lines[0] == "## tiny"
    assert lines[2].startswith("| strategy | trainable params |")
    assert lines[4] == "| decoder | 1,234,567 | 12.35 | 4.50 | n/a | 0.250 | 8.00 | 0.8123 | 0.7000 |"
    assert lines[5] == "| lora (lora_r=4) | 0 | 0.00 | 0.10 | 900 | n/a | n/a | 0.5000 | 0.4000 |"
    assert lines[6].startswith("| full | failed: OutOfMemoryError: CUDA out of memory \\| try less |")
    assert lines[6].count("|") == lines[4].count("|") + 1  # the escaped pipe


def test_comparison_plot_skips_failed_rows(tmp_path):
    assert PIL.Image.open(plot_comparison(ROWS, tmp_path / "cmp.png")).size == (1100, 450)
    with pytest.raises(ValueError, match="every strategy failed"):
        plot_comparison(ROWS[2:], tmp_path / "none.png")


def test_eval_table_puts_models_side_by_side():
    scores = {name: 0.5 for name in ("dice", "iou", "precision", "recall", "dice_micro", "iou_micro", "nsd")}
    results = {
        "protocol": {"split": "test", "prompt": "points:3", "correction_clicks": 2, "adapter": "runs/x/final"},
        "baseline": {**scores, "hd95": 12.0, "num_objects": 7, "num_images": 3},
        "fine_tuned": {**scores, "dice": 0.75, "hd95": None, "num_objects": 7, "num_images": 3},
        "gain": {**{name: 0.0 for name in scores}, "dice": 0.25, "hd95": None},
    }
    lines = format_eval_table(results).splitlines()
    assert lines[0] == "test split, prompt points:3 + 2 correction clicks: 7 objects in 3 images"
    assert lines[1].split() == ["metric", "baseline", "fine-tuned", "gain"]
    assert lines[2].split() == ["dice", "0.5000", "0.7500", "+0.2500"]
    assert lines[8].split() == ["hd95", "(px)", "12.0000", "n/a", "n/a"]
