"""Pictures and tables for people: overlay grids of predictions, and the strategy comparison table and plot.

    from sam2_peft.reports import OverlaySample, plot_overlays, select_examples
    plot_overlays(samples, "runs/eval/overlays.png")          # `sam2-peft eval --output_dir` writes this for you
    save_overlay_strip(frames, {"base": labels_a, "fine-tuned": labels_b}, "runs/eval/clip.png")   # a video clip
    print(format_eval_table(json.load(open("runs/eval/metrics.json"))))   # what `sam2-peft eval` prints
    print(comparison_markdown(rows))                         # `sam2-peft compare` writes comparison.md/.json/.png

Figures use matplotlib's Agg backend (no display needed) and a fixed size per grid cell, so an overlay grid of R
objects and C panels is exactly `C * CELL_PIXELS` x `R * CELL_PIXELS` pixels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sam2_peft.segmenter import BOX_BOTTOM_RIGHT, BOX_TOP_LEFT, NEGATIVE, POSITIVE

CELL_INCHES = 2.5
DPI = 100
CELL_PIXELS = int(CELL_INCHES * DPI)
TARGET_COLOR = (0.1, 0.85, 0.25)
PREDICTION_COLOR = (0.95, 0.2, 0.75)
OVERLAY_ALPHA = 0.45
# Crops keep this fraction of the object's extent as margin (and at least MIN_MARGIN pixels) around it.
CROP_MARGIN, MIN_MARGIN = 0.3, 8


@dataclass
class OverlaySample:
    """One object to draw: its image, ground truth, each model's prediction and the prompt.

    Attributes:
        image: (H, W, 3) float in [0, 1].
        target: (H, W) bool ground truth.
        predictions: model name -> (H, W) bool prediction, drawn left to right.
        scores: model name -> the Dice shown in that panel's title.
        point_coords: (K, 2) prompt points `x, y` in image pixels.
        point_labels: (K,) 2 / 3 box corners, 1 positive, 0 negative click.
        title: the row's name (e.g. image id and object index).
    """

    image: np.ndarray
    target: np.ndarray
    predictions: dict[str, np.ndarray]
    scores: dict[str, float]
    point_coords: np.ndarray
    point_labels: np.ndarray
    title: str = ""


def select_examples(scores, count: int, seed: int = 0) -> list[int]:
    """Pick `count` indices: a third with the lowest scores, a third with the highest, the rest at random between.

    Returns:
        The indices, ordered by score (ties by index).

    Example:
        >>> select_examples([0.9, 0.1, 0.5, 0.7, 0.3, 0.8], 2)
        [1, 0]
    """
    values = np.asarray(scores, dtype=float)
    order = np.argsort(values, kind="stable")
    if count <= 0:
        return []
    if count >= len(values):
        return order.tolist()
    num_worst = max(1, count // 3)
    num_best = min(num_worst, count - num_worst)
    middle = order[num_worst : len(order) - num_best]
    picks = np.random.default_rng(seed).choice(middle, count - num_worst - num_best, replace=False)
    chosen = np.concatenate([order[:num_worst], picks, order[len(order) - num_best :]]).astype(int)
    return sorted(chosen.tolist(), key=lambda i: (values[i], i))


def plot_overlays(samples: list[OverlaySample], path: str | Path) -> Path:
    """Draw one row per sample: image + prompt, ground truth, then each prediction, cropped around the object.

    Ground truth is green, predictions magenta (with the ground truth's outline), box prompts a yellow rectangle,
    positive clicks green stars and negative clicks red crosses.

    Returns:
        `path`, a PNG of `(2 + P) * CELL_PIXELS` x `len(samples) * CELL_PIXELS` pixels for P predictions per row.
    """
    if not samples:
        raise ValueError("plot_overlays needs at least one sample.")
    plt = _pyplot()
    columns = 2 + max(len(sample.predictions) for sample in samples)
    figure, axes = plt.subplots(
        len(samples), columns, figsize=(columns * CELL_INCHES, len(samples) * CELL_INCHES), squeeze=False
    )
    for row, sample in zip(axes, samples):
        window = _crop_window(sample)
        panels = [("image + prompt", None, None), ("ground truth", sample.target, TARGET_COLOR)]
        panels += [
            (f"{name}: dice {sample.scores[name]:.3f}", mask, PREDICTION_COLOR)
            for name, mask in sample.predictions.items()
        ]
        for axis, (title, mask, color) in zip(row, panels):
            _draw_panel(axis, sample, window, mask, color, outline=color is PREDICTION_COLOR)
            axis.set_title(title, fontsize=8)
        for axis in row[len(panels) :]:
            axis.axis("off")
        row[0].set_ylabel(sample.title, fontsize=7)
    # A fixed layout (no tight bounding box) keeps the image size exactly cells x CELL_PIXELS.
    figure.subplots_adjust(left=0.04, right=0.99, bottom=0.01, top=1 - 0.3 / len(samples), wspace=0.05, hspace=0.2)
    path = Path(path)
    figure.savefig(path, dpi=DPI)
    plt.close(figure)
    return path


def plot_history(history: list[dict], path: Path) -> None:
    """Training loss and validation metrics against steps, as a PNG."""
    plt = _pyplot()
    train = [row for row in history if "loss" in row]
    evals = [row for row in history if "dice" in row]
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot([row["step"] for row in train], [row["loss"] for row in train], label="train loss")
    for term in [key for key in (train[0] if train else {}) if key.endswith("_loss")]:  # unweighted terms
        left.plot([row["step"] for row in train], [row[term] for row in train], linewidth=0.8, label=term)
    left.set_xlabel("step")
    left.set_yscale("log")
    left.legend()
    for name in [name for name in ("dice", "iou", "j_and_f") if evals and name in evals[0]]:
        right.plot([row["step"] for row in evals], [row[name] for row in evals], marker="o", label=f"val {name}")
    right.set_xlabel("step")
    right.set_ylim(0, 1)
    right.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


# Video strips: one colour per object (object i = label value i takes OBJECT_COLORS[(i - 1) % 9]: matplotlib's tab10
# without its grey, which vanishes on grey frames); STRIP_GAP white pixels between frames, a title band above each row.
OBJECT_COLORS = (
    (0.122, 0.467, 0.706), (1.0, 0.498, 0.055), (0.173, 0.627, 0.173), (0.839, 0.153, 0.157), (0.58, 0.404, 0.741),
    (0.549, 0.337, 0.294), (0.89, 0.467, 0.761), (0.737, 0.741, 0.133), (0.09, 0.745, 0.812),
)  # fmt: skip
STRIP_GAP, STRIP_TITLE_PIXELS = 4, 18


def save_overlay_strip(
    frames, label_maps, path: str | Path, *, max_frames: int = 8, titles=None, cell_pixels: int = CELL_PIXELS
) -> Path:
    """Draw up to `max_frames` evenly spaced frames of a clip side by side, each object in its own colour.

    Objects are filled with `OVERLAY_ALPHA` of their colour and outlined in it; the same object has the same colour
    in every frame and row.

    Args:
        frames: T frames, (H, W, 3) float in [0, 1] or uint8 (grey (H, W) too), all of one size.
        label_maps: T (H, W) int label maps (0 background, object i = value i) for one row, or a dict
            `{row name: T label maps}` for one row each, top to bottom (e.g. `{"base": ..., "fine-tuned": ...}` or
            `{"prediction": ..., "reference": ...}`); row names prefix the frame titles.
        path: the PNG to write.
        max_frames: the most frames drawn; the first and the last are always among them.
        titles: T frame titles (default `frame <t>`).
        cell_pixels: the height each frame is drawn at; its width keeps the aspect ratio.

    Returns:
        `path`, a PNG of `K * w + (K - 1) * STRIP_GAP` x `R * (STRIP_TITLE_PIXELS + cell_pixels)` pixels for
        K = min(max_frames, T) frames of width w = round(W * cell_pixels / H) and R rows.

    Example:
        >>> save_overlay_strip(frames, {"base": base_labels, "fine-tuned": tuned_labels}, "runs/eval/clip.png")
    """
    rows = dict(label_maps) if isinstance(label_maps, dict) else {"": list(label_maps)}
    titles = [f"frame {t}" for t in range(len(frames))] if titles is None else list(titles)
    bad = {name: len(maps) for name, maps in rows.items() if len(maps) != len(frames)}
    if len(frames) == 0 or bad or len(titles) != len(frames) or max_frames < 1:
        raise ValueError(
            f"save_overlay_strip needs frames (got {len(frames)}), as many label maps per row (rows {bad} differ) "
            f"and titles (got {len(titles)}), and max_frames >= 1 (got {max_frames})."
        )
    count = min(max_frames, len(frames))
    picks = np.linspace(0, len(frames) - 1, count).round().astype(int)  # distinct: the step is >= 1
    height, width = np.asarray(frames[0]).shape[:2]
    size = (max(1, round(width * cell_pixels / height)), cell_pixels)  # (w, h), as PIL has it
    band = STRIP_TITLE_PIXELS + cell_pixels
    canvas = np.ones((len(rows) * band, count * (size[0] + STRIP_GAP) - STRIP_GAP, 3))
    for row, maps in enumerate(rows.values()):
        for column, t in enumerate(picks):
            x0, y0 = column * (size[0] + STRIP_GAP), row * band + STRIP_TITLE_PIXELS
            canvas[y0 : y0 + size[1], x0 : x0 + size[0]] = _strip_cell(frames[t], maps[t], size)
    plt = _pyplot()
    figure = plt.figure(figsize=(canvas.shape[1] / DPI, canvas.shape[0] / DPI), dpi=DPI)
    figure.figimage(canvas, 0, 0)  # pixel for pixel: no axes, no resampling
    for row, name in enumerate(rows):
        for column, t in enumerate(picks):
            x = (column * (size[0] + STRIP_GAP) + size[0] / 2) / canvas.shape[1]
            y = 1 - (row * band + STRIP_TITLE_PIXELS / 2) / canvas.shape[0]
            figure.text(x, y, f"{name}: {titles[t]}" if name else titles[t], ha="center", va="center", fontsize=7)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=DPI)
    plt.close(figure)
    return path


def _strip_cell(frame, labels, size: tuple[int, int]) -> np.ndarray:
    """One frame resized to `size` = (w, h) with its objects blended in: (h, w, 3) float in [0, 1]."""
    import PIL.Image

    image = np.asarray(frame)
    labels = np.asarray(labels)
    if labels.shape != image.shape[:2]:
        raise ValueError(f"A label map of shape {labels.shape} does not fit its frame of shape {image.shape}.")
    image = image.astype(np.float64) / 255 if image.dtype == np.uint8 else np.clip(image.astype(np.float64), 0, 1)
    image = np.repeat(image[..., None], 3, axis=2) if image.ndim == 2 else image[..., :3]
    resized = PIL.Image.fromarray((image * 255).round().astype(np.uint8)).resize(size, PIL.Image.BILINEAR)
    image = np.asarray(resized, dtype=np.float64) / 255
    labels = np.asarray(PIL.Image.fromarray(labels.astype(np.int32)).resize(size, PIL.Image.NEAREST))  # (h, w)
    colors = np.asarray(OBJECT_COLORS)[(labels - 1) % len(OBJECT_COLORS)]  # (h, w, 3)
    inside = (labels > 0)[..., None]
    edge = np.zeros(labels.shape, bool)  # pixels with a 4-neighbour of another label
    edge[1:] |= labels[1:] != labels[:-1]
    edge[:-1] |= labels[:-1] != labels[1:]
    edge[:, 1:] |= labels[:, 1:] != labels[:, :-1]
    edge[:, :-1] |= labels[:, :-1] != labels[:, 1:]
    blended = np.where(inside, (1 - OVERLAY_ALPHA) * image + OVERLAY_ALPHA * colors, image)
    return np.where(inside & edge[..., None], colors, blended)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _crop_window(sample: OverlaySample) -> tuple[int, int, int, int]:
    """`y0, y1, x0, x1` around the target, the predictions and the prompt, with a margin, inside the image."""
    height, width = sample.target.shape
    masks = [sample.target, *sample.predictions.values()]
    rows = np.flatnonzero(np.any([m.any(axis=1) for m in masks], axis=0))
    cols = np.flatnonzero(np.any([m.any(axis=0) for m in masks], axis=0))
    ys = [*rows[[0, -1]]] if rows.size else []
    xs = [*cols[[0, -1]]] if cols.size else []
    ys += sample.point_coords[:, 1].tolist()
    xs += sample.point_coords[:, 0].tolist()
    if not ys or not xs:
        return 0, height, 0, width
    margin = max(MIN_MARGIN, CROP_MARGIN * max(max(ys) - min(ys), max(xs) - min(xs)))
    y0, y1 = max(0, math.floor(min(ys) - margin)), min(height, math.ceil(max(ys) + margin) + 1)
    x0, x1 = max(0, math.floor(min(xs) - margin)), min(width, math.ceil(max(xs) + margin) + 1)
    return y0, y1, x0, x1


def _draw_panel(axis, sample: OverlaySample, window, mask, color, outline: bool) -> None:
    y0, y1, x0, x1 = window
    # `extent` keeps image pixel coordinates on the axes, so prompts plot where they are in the full image.
    extent = (x0 - 0.5, x1 - 0.5, y1 - 0.5, y0 - 0.5)
    axis.imshow(sample.image[y0:y1, x0:x1], extent=extent, interpolation="nearest")
    if mask is not None:
        rgba = np.zeros((y1 - y0, x1 - x0, 4))
        rgba[..., :3] = color
        rgba[..., 3] = mask[y0:y1, x0:x1] * OVERLAY_ALPHA
        axis.imshow(rgba, extent=extent, interpolation="nearest")
    if outline and sample.target[y0:y1, x0:x1].any():
        axis.contour(
            np.arange(x0, x1), np.arange(y0, y1), sample.target[y0:y1, x0:x1].astype(float),
            levels=[0.5], colors=[TARGET_COLOR], linewidths=0.8,
        )  # fmt: skip
    _draw_prompt(axis, sample.point_coords, sample.point_labels)
    axis.set_xlim(x0 - 0.5, x1 - 0.5)
    axis.set_ylim(y1 - 0.5, y0 - 0.5)
    axis.set_xticks([])
    axis.set_yticks([])


def _draw_prompt(axis, coords: np.ndarray, labels: np.ndarray) -> None:
    from matplotlib.patches import Rectangle

    corners = {int(label): xy for xy, label in zip(coords, labels) if label in (BOX_TOP_LEFT, BOX_BOTTOM_RIGHT)}
    if len(corners) == 2:
        (x0, y0), (x1, y1) = corners[BOX_TOP_LEFT], corners[BOX_BOTTOM_RIGHT]
        axis.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor="yellow", linewidth=1.2))
    for label, marker, color in ((POSITIVE, "*", "lime"), (NEGATIVE, "X", "red")):
        points = coords[labels == label]
        if len(points):
            axis.scatter(points[:, 0], points[:, 1], marker=marker, s=90, c=color, edgecolors="white", linewidths=0.8)


# Rows of the evaluation table; hd95 is a distance in pixels (lower is better), the others are in [0, 1].
EVAL_TABLE_METRICS = ("dice", "iou", "precision", "recall", "dice_micro", "iou_micro", "hd95", "nsd")


def format_eval_table(results: dict) -> str:
    """The side-by-side table of `evaluate_model`'s results (its `metrics.json`): baseline, fine-tuned and gain."""
    protocol = results["protocol"]
    clicks = protocol["correction_clicks"]
    lines = [
        f"{protocol['split']} split, prompt {protocol['prompt']}"
        + (f" + {clicks} correction clicks" if clicks else "")
        + f": {results['fine_tuned']['num_objects']} objects in {results['fine_tuned']['num_images']} images"
    ]
    columns = [name for name in ("baseline", "fine_tuned", "gain") if name in results]
    titles = [display_name(name, protocol["adapter"] is not None) for name in columns]
    lines.append(f"{'metric':<12}" + "".join(f"{title:>12}" for title in titles))
    for metric in EVAL_TABLE_METRICS:
        cells = [_cell(results[name][metric], signed=name == "gain") for name in columns]
        label = f"{metric} (px)" if metric == "hd95" else metric
        lines.append(f"{label:<12}" + "".join(f"{cell:>12}" for cell in cells))
    return "\n".join(lines)


def display_name(name: str, has_adapter: bool) -> str:
    """`fine_tuned` -> `fine-tuned` (or `model` when no adapter was given), for tables and figures."""
    if name == "fine_tuned" and not has_adapter:
        return "model"
    return name.replace("_", "-")


def _cell(value, signed: bool = False) -> str:
    if value is None:
        return "n/a"
    return f"{value:+.4f}" if signed else f"{value:.4f}"


# The strategy comparison: one row per strategy (see `sam2_peft.comparison.compare_strategies`).
COMPARISON_COLUMNS = (
    ("label", "strategy", "{}"),
    ("trainable_params", "trainable params", "{:,}"),
    ("trainable_percent", "trainable %", "{:.2f}"),
    ("saved_mb", "saved (MB)", "{:.2f}"),
    ("peak_memory_mb", "peak memory (MB)", "{:.0f}"),
    ("seconds_per_step", "s / step", "{:.3f}"),
    ("images_per_s", "images / s", "{:.2f}"),
    ("dice", "Dice", "{:.4f}"),
    ("iou", "IoU", "{:.4f}"),
)


def comparison_markdown(rows: list[dict], title: str | None = None) -> str:
    """A Markdown table of strategy rows (`COMPARISON_COLUMNS`); missing values show as `n/a`, failures as such."""
    lines = [f"## {title}", ""] if title else []
    lines.append("| " + " | ".join(header for _, header, _ in COMPARISON_COLUMNS) + " |")
    lines.append("|" + "|".join("---" if key == "label" else "---:" for key, _, _ in COMPARISON_COLUMNS) + "|")
    for row in rows:
        if row.get("error"):
            cells = [row["label"], f"failed: {row['error']}"] + [""] * (len(COMPARISON_COLUMNS) - 2)
        else:
            cells = [_format(row.get(key), spec) for key, _, spec in COMPARISON_COLUMNS]
        lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    return "\n".join(lines) + "\n"


def _format(value, spec: str) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return spec.format(value)


def plot_comparison(rows: list[dict], path: str | Path) -> Path:
    """Dice against trainable parameters (log scale) and time per step, one point / bar per strategy, as a PNG."""
    rows = [row for row in rows if not row.get("error")]
    if not rows:
        raise ValueError("plot_comparison: every strategy failed; nothing to plot.")
    plt = _pyplot()
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
    for row in rows:
        left.scatter(max(row["trainable_params"], 1), row["dice"], s=40)
        left.annotate(row["label"], (max(row["trainable_params"], 1), row["dice"]), fontsize=8,
                      xytext=(4, 4), textcoords="offset points")  # fmt: skip
    left.set_xscale("log")
    left.set_xlabel("trainable parameters")
    left.set_ylabel("validation Dice (best)")
    left.grid(alpha=0.3)
    labels = [row["label"] for row in rows]
    seconds = [row["seconds_per_step"] or 0.0 for row in rows]
    right.barh(labels, seconds, color="tab:gray")
    right.invert_yaxis()
    right.set_xlabel("seconds per optimiser step")
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path, dpi=DPI)
    plt.close(figure)
    return path
