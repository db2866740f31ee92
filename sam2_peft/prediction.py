"""Segment boxed objects in an image file, optionally with a per-domain adapter.

    sam2-peft predict --model facebook/sam2.1-hiera-tiny --adapter ct=runs/ct/final --adapter mr=runs/mr/final \\
        --domain ct --image scan.png --box 40,60,200,220 --output scan_mask.png
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import PIL.Image
import torch

from sam2_peft.data.config import DataConfig
from sam2_peft.data.intensity import load_pixels
from sam2_peft.data.transforms import Preprocessor
from sam2_peft.hub import DomainAdapters, adapter_preprocessing, predict, resolve_data_config
from sam2_peft.segmenter import base_sam2, masks_at_original_size


def segment_image(
    model: torch.nn.Module | DomainAdapters,
    image: str | os.PathLike,
    boxes: list[tuple[float, float, float, float]],
    *,
    domain: str | None = None,
    data: DataConfig | None = None,
) -> np.ndarray:
    """Segment each box of `image` and return a label map: 0 background, i + 1 where box i's mask is.

    Args:
        model: a `Sam2Model`, a `PeftModel`, or a `DomainAdapters` set.
        image: an image file (8/16-bit or float PNG/TIFF/JPEG, grayscale or colour).
        boxes: `x1, y1, x2, y2` in the image's pixels.
        domain: the adapter to use (a name registered in the `DomainAdapters`); None for the active one.
        data: intensity settings (`intensity`, `intensity_percentiles`, `ct_window`); those left unset come from
            the adapter's recorded preprocessing (that domain's), else the defaults. A set one that disagrees with
            the adapter wins, with a warning.

    Returns:
        (H, W) uint16 label map at the image's resolution; later boxes win where masks overlap.
    """
    if not boxes:
        raise ValueError("Give at least one box (`--box x1,y1,x2,y2`).")
    network = model.model if isinstance(model, DomainAdapters) else model
    preprocessor = Preprocessor.from_model(base_sam2(network))
    config = resolve_data_config(data or DataConfig(), adapter_preprocessing(network, domain),
                                 where=f"adapter {domain!r}" if domain else "the active adapter")
    pixels = load_pixels(image, config.intensity_config())
    height, width = pixels.shape[-2:]
    boxes_in = preprocessor.scale_coords(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 2, 2), (height, width))
    image_index = torch.zeros(len(boxes), dtype=torch.long)
    output = predict(model, preprocessor.pixel_values(pixels)[None], boxes_in.reshape(-1, 4),
                     image_index=image_index, domain=domain)
    geometry = {"image_index": image_index, "original_sizes": torch.tensor([[height, width]])}
    masks = masks_at_original_size(output.mask_logits[:, 0], geometry)
    labels = np.zeros((height, width), np.uint16)
    for index, mask in enumerate(masks):
        labels[mask.numpy()] = index + 1
    return labels


def save_label_map(labels: np.ndarray, path: str | os.PathLike) -> Path:
    """Write a label map as a 16-bit PNG."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    PIL.Image.fromarray(labels.astype(np.uint16)).save(path)
    return path
