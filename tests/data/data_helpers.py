"""Writers of tiny on-disk datasets for the data tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import PIL.Image


def write_pair(folder: Path, stem: str, image: np.ndarray, labels: np.ndarray, image_suffix: str = ".png") -> None:
    """Write `folder/images/<stem><suffix>` and `folder/masks/<stem>.png`."""
    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "masks").mkdir(parents=True, exist_ok=True)
    if image_suffix in (".tif", ".tiff"):
        import tifffile

        tifffile.imwrite(folder / "images" / f"{stem}{image_suffix}", image)
    else:
        PIL.Image.fromarray(image).save(folder / "images" / f"{stem}{image_suffix}")
    PIL.Image.fromarray(labels.astype(np.uint8)).save(folder / "masks" / f"{stem}.png")


def random_pair(rng: np.random.Generator, size: int = 24) -> tuple[np.ndarray, np.ndarray]:
    """An 8-bit grayscale image and a label map with two rectangles (ids 1 and 2)."""
    labels = np.zeros((size, size), np.uint8)
    labels[2:8, 3:10] = 1
    labels[12:20, 14:22] = 2
    image = rng.integers(0, 256, (size, size), dtype=np.uint8)
    return image, labels
