"""Map raw intensities (8-bit, 16-bit, float; 1, 3 or 4 channels) to a float RGB image in [0, 1].

SAM2's weights were trained on 8-bit RGB photos scaled by 1/255, so that is what the model sees in the end; the
question is only how other images get there. Defaults by modality:

- 8-bit (photos, most PNG/JPEG microscopy): divided by 255, exactly as SAM2 does (`mode="auto"`).
- 16-bit and float (microscopy, MR, X-ray): per-image percentile clipping to (0.5, 99.5) then rescaling to [0, 1]
  (`mode="auto"`), the MedSAM convention; robust to hot pixels and to detectors that use only 12 of 16 bits.
- CT in Hounsfield units: a window, `mode="window"` with `window="abdomen"` (level 40, width 400), `"lung"`
  (-600, 1500), `"bone"` (400, 1800) or `(level, width)`.
- Images already calibrated to a fixed range: `mode="range"` divides by the dtype's maximum (65535 for uint16)
  and keeps float images as they are, clipped to [0, 1].

Everything runs in float64 and returns float32, so a 16-bit image keeps its levels: nothing passes through uint8.
Grayscale is repeated to three channels; the alpha channel of RGBA is dropped (as `PIL.Image.convert("RGB")`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch

from sam2_peft.data.io import DataError, read_file, to_hwc

CT_WINDOWS = {"abdomen": (40.0, 400.0), "lung": (-600.0, 1500.0), "bone": (400.0, 1800.0)}
MODES = ("auto", "percentile", "minmax", "range", "window")


@dataclass(frozen=True)
class IntensityConfig:
    """How raw intensities become [0, 1].

    Attributes:
        mode: `auto` (8-bit: /255; others: percentile), `percentile`, `minmax`, `range` or `window`.
        percentiles: lower and upper percentile for `percentile` (and `auto` on non-8-bit images).
        window: for `mode="window"`: a preset name from `CT_WINDOWS` or `(level, width)` in the image's units.
    """

    mode: str = "auto"
    percentiles: tuple[float, float] = (0.5, 99.5)
    window: str | tuple[float, float] | None = None

    def __post_init__(self):
        if self.mode not in MODES:
            raise DataError(f"intensity mode={self.mode!r} is not one of {MODES}.")
        low, high = self.percentiles
        if not 0.0 <= low < high <= 100.0:
            raise DataError(f"percentiles={self.percentiles} must satisfy 0 <= low < high <= 100.")
        if self.mode == "window":
            level_width(self.window)


def level_width(window: str | tuple[float, float] | None) -> tuple[float, float]:
    """Resolve a CT window preset name or `(level, width)` pair."""
    if isinstance(window, str):
        if window not in CT_WINDOWS:
            raise DataError(f"window={window!r} is not a preset; use one of {sorted(CT_WINDOWS)} or (level, width).")
        return CT_WINDOWS[window]
    if window is None or len(window) != 2 or float(window[1]) <= 0:
        raise DataError(f"mode='window' needs `window` = a preset {sorted(CT_WINDOWS)} or (level, width > 0), got {window!r}.")
    return float(window[0]), float(window[1])


def normalize_intensity(image: np.ndarray, config: IntensityConfig = IntensityConfig()) -> np.ndarray:
    """Convert an (H, W, C) image with C in {1, 3, 4} to a float32 (3, H, W) image in [0, 1].

    Example:
        >>> image = np.array([[0, 1000], [2000, 65535]], np.uint16)[:, :, None]
        >>> normalize_intensity(image, IntensityConfig(mode="range")).shape
        (3, 2, 2)
    """
    if image.shape[-1] == 4:
        image = image[..., :3]
    values = image.astype(np.float64)
    mode = config.mode
    if mode == "auto":
        mode = "range" if image.dtype in (np.uint8, np.bool_) else "percentile"
    if mode == "range":
        if np.issubdtype(image.dtype, np.integer):
            values = values / np.iinfo(image.dtype).max
        scaled = np.clip(values, 0.0, 1.0)
    elif mode == "window":
        level, width = level_width(config.window)
        scaled = _rescale(values, level - width / 2, level + width / 2)
    elif mode == "minmax":
        scaled = _rescale(values, values.min(), values.max())
    else:
        finite = values[np.isfinite(values)]
        low, high = np.percentile(finite, config.percentiles) if finite.size else (0.0, 0.0)
        scaled = _rescale(values, low, high)
    scaled = np.nan_to_num(scaled, nan=0.0)
    if scaled.shape[-1] == 1:
        scaled = np.repeat(scaled, 3, axis=-1)
    # (H, W, 3) -> (3, H, W)
    return np.ascontiguousarray(scaled.transpose(2, 0, 1), dtype=np.float32)


def _rescale(values: np.ndarray, low: float, high: float) -> np.ndarray:
    if high <= low:  # a constant image: keep it black rather than dividing by zero
        return np.zeros_like(values)
    return np.clip((values - low) / (high - low), 0.0, 1.0)


def load_pixels(image, intensity: IntensityConfig = IntensityConfig()) -> torch.Tensor:
    """Read an image as the model sees it before resizing: (3, H, W) float32 in [0, 1].

    Args:
        image: a file path (8/16-bit or float PNG/TIFF/JPEG, grayscale or colour), a raw (H, W[, C]) array or
            PIL image (mapped by `intensity`), or a (3, H, W) float tensor already in [0, 1] (returned as it is).
        intensity: how raw intensities map to [0, 1], as in training.
    """
    if torch.is_tensor(image):
        if image.ndim != 3 or image.shape[0] != 3 or not image.is_floating_point():
            shape = tuple(image.shape)
            raise ValueError(f"A tensor image must be (3, H, W) float in [0, 1], not {shape} {image.dtype}.")
        return image
    if isinstance(image, (str, os.PathLike)):
        raw, what = read_file(image), str(image)
    else:
        raw, what = np.asarray(image), "the image array"
    return torch.from_numpy(normalize_intensity(to_hwc(raw, what=what), intensity))
