"""Base model and fine-tuned adapters on one prompted image: masks, areas, IoUs and overlays, without any UI.

    predictor = DemoPredictor.load("tiny-random", [("ct", "runs/ct/final")])
    image = predictor.read("scan.nii.gz", slice_index=40, domain="ct")     # normalised as adapter 'ct' was trained
    result = predictor.compare(image, Prompt(box=(40, 60, 200, 220)), domain="ct")
    result.numbers()        # {"base_area": ..., "adapter_area": ..., "iou_between": ..., ...}

Both models see the same pixels, the upload normalised as the adapter was trained (the `--intensity`/`--ct_window`
flags where given, else its `preprocessor_config.json`, else the defaults), so the comparison shows what the weights
changed.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import PIL.Image
import PIL.ImageDraw
import torch
from peft import PeftModel
from torch import nn

from sam2_peft.data.config import INTENSITY_FIELDS, DataConfig
from sam2_peft.data.intensity import IntensityConfig, normalize_intensity
from sam2_peft.data.io import DataError, read_file, to_hwc
from sam2_peft.data.nifti import read_volume
from sam2_peft.data.sources import NIFTI_SUFFIXES
from sam2_peft.data.transforms import Preprocessor
from sam2_peft.hub import DomainAdapters, adapter_preprocessing, load_adapter, resolve_adapter, resolve_data_config
from sam2_peft.hub.files import PEFT_WEIGHTS
from sam2_peft.models import load_sam2
from sam2_peft.segmenter import NEGATIVE, POSITIVE, Sam2Segmenter, combine_prompts, masks_at_original_size

BASE_COLOUR = (30, 144, 255)  # blue
ADAPTER_COLOUR = (255, 140, 0)  # orange
POINT_COLOURS = {POSITIVE: (0, 200, 0), NEGATIVE: (230, 0, 0)}
_NAME = re.compile(r"[A-Za-z0-9_-]+")


class DemoInputError(ValueError):
    """Raised for an upload or prompt the demo cannot use; the message says what to change."""


@dataclass
class Prompt:
    """What the user drew, in the image's pixels.

    Attributes:
        box: `x1, y1, x2, y2`, or None.
        points: `(x, y)` clicks.
        labels: one per click: 1 positive, 0 negative.
    """

    box: tuple[float, float, float, float] | None = None
    points: list[tuple[float, float]] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)

    def check(self, height: int, width: int) -> None:
        """Raise `DemoInputError` unless there is a prompt and it lies inside an (H, W) image."""
        if self.box is None and not self.points:
            raise DemoInputError("No prompt: draw a box (two clicks: opposite corners) or click a point first.")
        if self.box is not None:
            x1, y1, x2, y2 = self.box
            if not (0 <= x1 < x2 <= width and 0 <= y1 < y2 <= height):
                raise DemoInputError(
                    f"Box {_format_box(self.box)} is not inside the {width}x{height} image with x1 < x2 and y1 < y2; "
                    f"give 0 <= x1 < x2 <= {width} and 0 <= y1 < y2 <= {height}."
                )
        for x, y in self.points:
            if not (0 <= x < width and 0 <= y < height):
                raise DemoInputError(f"Point ({x:g}, {y:g}) is outside the {width}x{height} image.")


def parse_box(text: str | None) -> tuple[float, float, float, float] | None:
    """Parse `"x1,y1,x2,y2"` (None or blank: no box); raise `DemoInputError` naming the expected form."""
    if text is None or not text.strip():
        return None
    try:
        x1, y1, x2, y2 = (float(value) for value in text.split(","))
    except ValueError:
        raise DemoInputError(f"Box {text!r}: expected four comma-separated numbers x1,y1,x2,y2.") from None
    return x1, y1, x2, y2


@dataclass
class LoadedImage:
    """An upload as the models see it.

    Attributes:
        pixels: (3, H, W) float32 in [0, 1], after the adapter's intensity normalisation.
        description: the file, its dtype, size and value range, and the normalisation applied, for the page.
        slice_index: the NIfTI slice shown; None for 2-D images.
    """

    pixels: np.ndarray
    description: str
    slice_index: int | None = None

    def display(self) -> np.ndarray:
        """(H, W, 3) uint8: what the model sees, for drawing on."""
        return np.round(self.pixels.transpose(1, 2, 0) * 255).astype(np.uint8)


@dataclass
class Comparison:
    """The base model's and the adapter's mask for one prompt.

    Attributes:
        base_mask: (H, W) bool, at the image's resolution.
        adapter_mask: (H, W) bool.
        base_predicted_iou: the base model's own estimate of its mask's IoU, in [0, 1].
        adapter_predicted_iou: the adapter's estimate.
    """

    base_mask: np.ndarray
    adapter_mask: np.ndarray
    base_predicted_iou: float
    adapter_predicted_iou: float

    def numbers(self) -> dict[str, float | int]:
        """Areas in pixels, the IoU between the two masks (1.0 when both are empty) and the predicted IoUs."""
        union = int((self.base_mask | self.adapter_mask).sum())
        overlap = int((self.base_mask & self.adapter_mask).sum())
        return {
            "base_area": int(self.base_mask.sum()),
            "adapter_area": int(self.adapter_mask.sum()),
            "iou_between": overlap / union if union else 1.0,
            "base_predicted_iou": self.base_predicted_iou,
            "adapter_predicted_iou": self.adapter_predicted_iou,
        }

    def label_map(self) -> np.ndarray:
        """(H, W) uint16: 1 where the adapter's mask is, 0 elsewhere (as `sam2-peft predict` writes)."""
        return self.adapter_mask.astype(np.uint16)


class DemoPredictor:
    """A base model and named adapters on it, run on the same image and prompt.

    PEFT adapters share one base (`DomainAdapters`; the base's output is the run with adapters disabled). Trained
    tensors (decoder/partial/full runs) replace base weights, so each gets its own copy of the base.

    Args:
        adapted: adapter name -> the model holding it (a `DomainAdapters`' PeftModel, or a Sam2Model with trained
            tensors loaded).
        base: the plain base model, needed only for trained-tensor adapters.
        intensity: adapter name -> its intensity normalisation.
        notes: adapter name -> where that normalisation came from, for the page.
    """

    def __init__(self, adapted: dict[str, nn.Module], base: nn.Module | None, intensity: dict[str, IntensityConfig],
                 notes: dict[str, str]):
        if not adapted:
            raise DemoInputError("Give at least one adapter to compare with the base: `--adapter [NAME=]PATH`.")
        self.adapted, self.base, self.intensity, self.notes = adapted, base, intensity, notes
        self.names = list(adapted)
        self.preprocessor = Preprocessor.from_model(next(iter(adapted.values())))
        self._lock = threading.Lock()  # set_adapter/disable_adapter change shared state; Gradio runs in threads

    @classmethod
    def load(cls, model: str, adapters: Sequence[tuple[str, str]], data: DataConfig | None = None) -> DemoPredictor:
        """Load the base `model` (see `load_sam2`) and each `(name, path or Hub id)` adapter onto it.

        Args:
            data: intensity flags (`intensity`, `intensity_percentiles`, `ct_window`); unset ones come from each
                adapter's recorded preprocessing, else the defaults.
        """
        data = data or DataConfig()
        domains, adapted, intensity, notes, base = None, {}, {}, {}, None
        for name, path in adapters:
            if not _NAME.fullmatch(name):
                raise DemoInputError(f"--adapter {name}={path}: NAME may hold letters, digits, '_' and '-' only.")
            if name in adapted:
                raise DemoInputError(f"--adapter {name}={path}: the name {name!r} is given twice; name each one apart.")
            if (resolve_adapter(path) / PEFT_WEIGHTS).is_file():
                domains = domains or DomainAdapters(load_sam2(model))
                network, key = domains.add(name, path).model, name
            else:
                network, key = load_adapter(load_sam2(model), path).eval(), "default"
            adapted[name] = network
            record = adapter_preprocessing(network, key)
            config = resolve_data_config(data, record, where=f"--adapter {path}")
            intensity[name] = config.intensity_config()
            notes[name] = f"{_describe(intensity[name])} ({_origin(data, record)})"
        if any(not isinstance(network, PeftModel) for network in adapted.values()):
            base = load_sam2(model).eval()
        return cls(adapted, base, intensity, notes)

    def read(self, path: str | Path | None, *, domain: str, slice_index: int | None = None,
             nifti_axis: int = 2) -> LoadedImage:
        """Read an image file or a NIfTI slice and normalise it as `domain`'s adapter was trained.

        Args:
            path: PNG/TIFF/JPEG (8/16-bit, float) or `.nii`/`.nii.gz`.
            slice_index: the NIfTI slice along `nifti_axis` (None: the middle one); ignored for 2-D images.
        """
        self._require(domain)
        if path is None:
            raise DemoInputError("No image: upload a PNG, TIFF, JPEG or NIfTI file first.")
        path = Path(path)
        if path.is_file() and path.stat().st_size == 0:
            raise DemoInputError(f"{path.name} is empty (0 bytes); upload the image again.")
        try:
            raw, where, index = _read_raw(path, slice_index, nifti_axis)
            pixels = normalize_intensity(raw, self.intensity[domain])
        except DataError as err:
            raise DemoInputError(str(err).replace(str(path.parent) + "/", "")) from err
        height, width = raw.shape[:2]
        description = (f"{where}: {raw.dtype} {width}x{height}, {raw.shape[2]} channel(s), values "
                       f"{np.nanmin(raw):g}..{np.nanmax(raw):g}; shown as adapter {domain!r} sees it: "
                       f"{self.notes[domain]}")
        return LoadedImage(pixels, description, index)

    @torch.no_grad()
    def compare(self, image: LoadedImage, prompt: Prompt, *, domain: str) -> Comparison:
        """Segment `prompt` on `image` with the base model and with `domain`'s adapter."""
        self._require(domain)
        height, width = image.pixels.shape[1:]
        prompt.check(height, width)
        pixel_values = self.preprocessor.pixel_values(torch.from_numpy(image.pixels))[None]
        coords, labels = self._prompt_tensors(prompt, (height, width))
        # One click alone is ambiguous (a part or the whole?): as SAM2's predictor, take the best of three masks.
        multimask = prompt.box is None and len(prompt.points) == 1
        network = self.adapted[domain]
        with self._lock:
            if isinstance(network, PeftModel):
                network.set_adapter(domain, inference_mode=True)
                with network.disable_adapter():
                    base = self._segment(network, pixel_values, coords, labels, multimask, (height, width))
            else:
                base = self._segment(self.base, pixel_values, coords, labels, multimask, (height, width))
            adapter = self._segment(network, pixel_values, coords, labels, multimask, (height, width))
        return Comparison(base[0], adapter[0], base[1], adapter[1])

    def _prompt_tensors(self, prompt: Prompt, size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        boxes = points = point_labels = None
        if prompt.box is not None:
            boxes = self.preprocessor.scale_coords(torch.tensor(prompt.box).reshape(1, 2, 2), size).reshape(1, 4)
        if prompt.points:
            points = self.preprocessor.scale_coords(torch.tensor(prompt.points, dtype=torch.float32), size)[None]
            point_labels = torch.tensor(prompt.labels, dtype=torch.long)[None]
        return combine_prompts(boxes=boxes, points=points, point_labels=point_labels)

    def _segment(self, network: nn.Module, pixel_values: torch.Tensor, coords: torch.Tensor, labels: torch.Tensor,
                 multimask: bool, size: tuple[int, int]) -> tuple[np.ndarray, float]:
        output = Sam2Segmenter(network)(pixel_values, image_index=torch.zeros(1, dtype=torch.long),
                                        point_coords=coords, point_labels=labels, multimask_output=multimask)
        best = int(output.iou_scores[0].argmax())
        geometry = {"image_index": torch.zeros(1, dtype=torch.long), "original_sizes": torch.tensor([size])}
        mask = masks_at_original_size(output.mask_logits[:, best], geometry)[0]
        return mask.numpy(), float(output.iou_scores[0, best])

    def _require(self, domain: str) -> None:
        if domain not in self.adapted:
            raise DemoInputError(f"Unknown adapter {domain!r}; the demo has {self.names}.")


def overlay(image: np.ndarray, mask: np.ndarray, colour: tuple[int, int, int], prompt: Prompt) -> np.ndarray:
    """Draw `mask` (half-transparent fill, opaque outline) and the prompt on an (H, W, 3) uint8 image."""
    out = image.astype(np.float32)
    out[mask] = 0.5 * out[mask] + 0.5 * np.asarray(colour, np.float32)
    inner = mask.copy()  # the mask minus its outline: pixels whose four neighbours are all inside
    inner[1:, :] &= mask[:-1, :]
    inner[:-1, :] &= mask[1:, :]
    inner[:, 1:] &= mask[:, :-1]
    inner[:, :-1] &= mask[:, 1:]
    out[mask & ~inner] = colour
    return draw_prompt(out.astype(np.uint8), prompt)


def draw_prompt(image: np.ndarray, prompt: Prompt, pending_corner: tuple[float, float] | None = None) -> np.ndarray:
    """Draw the box (white), clicks (green positive, red negative) and a box's first corner on a uint8 image."""
    canvas = PIL.Image.fromarray(image)
    draw = PIL.ImageDraw.Draw(canvas)
    radius = max(2, round(min(image.shape[:2]) / 80))
    if prompt.box is not None:
        draw.rectangle(prompt.box, outline=(255, 255, 255), width=max(1, radius // 2))
    for (x, y), label in zip(prompt.points, prompt.labels):
        draw.ellipse((x - radius, y - radius, x + radius, y + radius), fill=POINT_COLOURS[label], outline=(0, 0, 0))
    if pending_corner is not None:
        x, y = pending_corner
        draw.line((x - 2 * radius, y, x + 2 * radius, y), fill=(255, 255, 255), width=1)
        draw.line((x, y - 2 * radius, x, y + 2 * radius), fill=(255, 255, 255), width=1)
    return np.asarray(canvas)


def _read_raw(path: Path, slice_index: int | None, nifti_axis: int) -> tuple[np.ndarray, str, int | None]:
    """The (H, W, C) array of an image file or of one NIfTI slice, how to name it, and the slice index."""
    if not path.name.lower().endswith(NIFTI_SUFFIXES):
        return to_hwc(read_file(path), what=path.name), path.name, None
    import nibabel

    volume = read_volume(nibabel, path)
    count = volume.shape[nifti_axis]
    index = count // 2 if slice_index is None else int(slice_index)
    if not 0 <= index < count:
        raise DemoInputError(f"Slice index {index} is outside {path.name}'s {count} slices along axis {nifti_axis}; "
                             f"give 0..{count - 1}.")
    # The same cut as training's NIfTI source (`slice_nifti_pairs`), so the model sees what it was trained on.
    cut = np.take(volume, index, axis=nifti_axis)[:, :, None]
    return cut, f"{path.name} slice {index} of 0..{count - 1} (axis {nifti_axis})", index


def _origin(data: DataConfig, record) -> str:
    if any(getattr(data, name) is not None for name in INTENSITY_FIELDS):
        return "from the command-line flags"
    return f"recorded in {record.source}" if record is not None else "defaults: the adapter has no record"


def _describe(config: IntensityConfig) -> str:
    if config.mode == "window":
        return f"CT window (level, width) = {config.window}"
    if config.mode in ("auto", "percentile"):
        prefix = "auto: 8-bit /255, else " if config.mode == "auto" else ""
        return f"intensity {prefix}percentile clip {config.percentiles}"
    return f"intensity {config.mode}"


def _format_box(box: tuple[float, float, float, float]) -> str:
    return ",".join(f"{value:g}" for value in box)
