"""Generate the bundled sample video dataset: short synthetic clips of moving cells with per-frame label maps.

    python scripts/make_sample_video.py                 # writes examples/data_video/{train,val}/{videos,masks}/
    python scripts/make_sample_video.py --out /tmp/video --train 6 --val 2 --frames 12 --size 256

Each clip is a folder of 8-bit RGB PNG frames (`videos/<clip>/frame_000.png`, ...) over a smooth stained
background, with one or two textured blobs drifting in straight lines; `masks/<clip>/frame_000.png` are 8-bit label
maps (0 background, value k = object k in every frame). In every clip with two objects the second enters only at
the third frame, so training windows drop it when they start earlier and evaluation prompts it where it appears.
Clip lengths vary (`--frames` for the first clip, one fewer for each next one, at least 4). Deterministic per seed.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import PIL.Image
import torch
from torch.nn import functional as F

ENTRY_FRAME = 2  # the frame where a clip's second object enters


def smooth_noise(rng: np.random.Generator, size: int, scale: int) -> np.ndarray:
    """Low-frequency noise in [0, 1]: a coarse random grid upsampled bicubically."""
    coarse = torch.from_numpy(rng.random((1, 1, size // scale + 2, size // scale + 2)))
    fine = F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)[0, 0].numpy()
    return (fine - fine.min()) / (np.ptp(fine) + 1e-9)


def make_clip(rng: np.random.Generator, size: int, num_frames: int, num_objects: int) -> list[tuple[np.ndarray, ...]]:
    """Return `num_frames` pairs of a (size, size, 3) uint8 frame and its (size, size) uint8 label map."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    background = 0.15 + 0.2 * smooth_noise(rng, size, 32)
    tint = rng.uniform(0.8, 1.0, 3)
    objects = []
    for _ in range(num_objects):
        radius = rng.uniform(0.1, 0.16) * size
        start = rng.uniform(radius, size - radius, 2)
        velocity = rng.uniform(-0.04, 0.04, 2) * size
        objects.append((radius, start, velocity, rng.uniform(0.55, 0.9), smooth_noise(rng, size, 8)))
    frames = []
    for t in range(num_frames):
        labels = np.zeros((size, size), np.uint8)
        signal = background.copy()
        for k, (radius, start, velocity, brightness, texture) in enumerate(objects, start=1):
            if k == 2 and t < ENTRY_FRAME:
                continue
            # Bounce off the borders so objects stay in view.
            span = size - 2 * radius
            cx, cy = np.abs((start + velocity * t - radius) % (2 * span) - span) + radius
            inside = ((xx - cx) / radius) ** 2 + ((yy - cy) / (0.8 * radius)) ** 2 < 1
            inside &= labels == 0  # the first object stays on top where they overlap
            labels[inside] = k
            signal[inside] = brightness * (0.8 + 0.2 * texture[inside])
        noisy = signal + rng.normal(0, 0.01, (size, size))
        rgb = np.clip(noisy[..., None] * tint * 255, 0, 255).round().astype(np.uint8)
        frames.append((rgb, labels))
    return frames


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "examples" / "data_video")
    parser.add_argument("--train", type=int, default=3, help="number of training clips")
    parser.add_argument("--val", type=int, default=1, help="number of validation clips")
    parser.add_argument("--frames", type=int, default=8, help="frames of the first clip of each split")
    parser.add_argument("--size", type=int, default=128, help="frame side in pixels")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    for split, count in (("train", args.train), ("val", args.val)):
        for index in range(count):
            clip = f"clip_{split}_{index:03d}"
            num_frames = max(4, args.frames - index)
            for folder in ("videos", "masks"):
                (args.out / split / folder / clip).mkdir(parents=True, exist_ok=True)
            num_objects = 2 if index % 2 == 0 else 1
            for t, (frame, labels) in enumerate(make_clip(rng, args.size, num_frames, num_objects)):
                name = f"frame_{t:03d}.png"
                PIL.Image.fromarray(frame).save(args.out / split / "videos" / clip / name, optimize=True)
                PIL.Image.fromarray(labels).save(args.out / split / "masks" / clip / name, optimize=True)
    total = sum(p.stat().st_size for p in args.out.rglob("*.png"))
    print(f"Wrote {args.train} + {args.val} clips to {args.out} ({total / 1e6:.2f} MB).")


if __name__ == "__main__":
    main()
