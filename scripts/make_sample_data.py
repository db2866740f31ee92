"""Generate the bundled sample dataset: synthetic 16-bit micrographs of cells with instance masks.

    python scripts/make_sample_data.py                  # writes examples/data/{train,val}/{images,masks}/
    python scripts/make_sample_data.py --out /tmp/data --train 8 --val 4 --size 128

The images imitate a 12-bit fluorescence camera stored in 16-bit PNGs (values up to 4095, as such detectors
write them): a smooth uneven background, irregular textured blobs ("cells" / "lesions"), blur and noise. Masks are
8-bit instance label maps (0 background, 1..n one cell each). The output is deterministic for a given seed.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import PIL.Image
import torch
from torch.nn import functional as F

MAX_VALUE = 4095  # 12-bit detector


def smooth_noise(rng: np.random.Generator, size: int, scale: int) -> np.ndarray:
    """Low-frequency noise in [0, 1]: coarse random grid upsampled bicubically."""
    coarse = torch.from_numpy(rng.random((1, 1, size // scale + 2, size // scale + 2)))
    fine = F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)[0, 0].numpy()
    return (fine - fine.min()) / (np.ptp(fine) + 1e-9)


def make_sample(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Return a (size, size) uint16 image and its uint8 instance label map."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    labels = np.zeros((size, size), np.uint8)
    signal = np.zeros((size, size))
    texture = smooth_noise(rng, size, 6)
    for label in range(1, int(rng.integers(3, 9)) + 1):
        radius = rng.uniform(0.05, 0.12) * size
        cx, cy = rng.uniform(radius, size - radius, 2)
        angle = np.arctan2(yy - cy, xx - cx)
        # An irregular outline: the radius wobbles with a few random harmonics.
        wobble = sum(rng.uniform(0, 0.15) * np.cos(k * angle + rng.uniform(0, 2 * np.pi)) for k in (2, 3, 5))
        inside = np.hypot(xx - cx, yy - cy) < radius * (1 + wobble)
        inside &= labels == 0  # cells do not overlap: the earlier one stays on top
        if inside.sum() < 20:
            continue
        labels[inside] = label
        signal[inside] = rng.uniform(0.45, 0.9) * (0.75 + 0.25 * texture[inside])
    background = 0.08 + 0.12 * smooth_noise(rng, size, 64)
    clean = torch.from_numpy(background + signal)[None, None]
    blurred = F.avg_pool2d(F.pad(clean, (1, 1, 1, 1), mode="replicate"), 3, stride=1)[0, 0].numpy()
    noisy = blurred * MAX_VALUE + rng.normal(0, 4, (size, size))
    image = np.clip(np.round(noisy), 0, MAX_VALUE).astype(np.uint16)
    # Renumber 1..n after skipped (too small) cells.
    ids = np.unique(labels[labels > 0])
    lookup = np.zeros(256, np.uint8)
    lookup[ids] = np.arange(1, len(ids) + 1)
    return image, lookup[labels]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "examples" / "data")
    parser.add_argument("--train", type=int, default=24, help="number of training images")
    parser.add_argument("--val", type=int, default=8, help="number of validation images")
    parser.add_argument("--size", type=int, default=256, help="image side in pixels")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    for split, count in (("train", args.train), ("val", args.val)):
        for folder in ("images", "masks"):
            (args.out / split / folder).mkdir(parents=True, exist_ok=True)
        for index in range(count):
            image, labels = make_sample(rng, args.size)
            name = f"cells_{split}_{index:03d}.png"
            PIL.Image.fromarray(image).save(args.out / split / "images" / name, optimize=True)
            PIL.Image.fromarray(labels).save(args.out / split / "masks" / name, optimize=True)
    total = sum(p.stat().st_size for p in args.out.rglob("*.png"))
    print(f"Wrote {args.train} + {args.val} image/mask pairs to {args.out} ({total / 1e6:.2f} MB).")


if __name__ == "__main__":
    main()
