"""Find video clips and 3-D volumes on disk, by split.

    from sam2_peft.data.clip_sources import load_clips
    splits = load_clips("examples/data_video")        # {"train": [ClipRecord, ...], "val": [...]}

Two layouts, with or without `train/ val/ test/` split subfolders (as the image layout):

- frame folders: `D/videos/<clip>/<frame>.{png,jpg,jpeg,tif,tiff}` + `D/masks/<clip>/<frame>.{png,tif,tiff}`, one
  label map per frame, with the same stems; one label value is one object in every frame of its clip.
- NIfTI volumes: `D/images/<stem>.nii[.gz]` + `D/masks/<stem>.nii[.gz]`, each volume a clip of its slices along
  `axis` (frames named `slice_0042`).

Frames are in natural order of their stems: digit runs compare as numbers (`frame2` before `frame10`), the rest
case-insensitively. A source without a val/ folder gets `val_fraction` of its train clips held out (rounded up,
seeded, at least one clip stays in train). Missing, orphaned, duplicated and empty things are refused here with a
`DataError` naming the file; what is inside the files is checked by `data.clips` when a dataset is built.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sam2_peft.data.io import IMAGE_SUFFIXES, MASK_SUFFIXES, DataError
from sam2_peft.data.sources import NIFTI_SUFFIXES, SPLITS


@dataclass(frozen=True)
class ClipRecord:
    """One clip: a folder of frames with their label maps, or a NIfTI image volume with its labels.

    Attributes:
        clip_id: the clip folder's name, or the volume's stem.
        frame_names: T frame stems in clip order (`slice_0042` for volumes).
        frame_paths: T frame files (frame folders only).
        mask_paths: T label-map files (frame folders only).
        volume_path: the image volume (volumes only).
        label_path: the label volume (volumes only).
        axis: the axis the volume is cut along.
    """

    clip_id: str
    frame_names: tuple[str, ...]
    frame_paths: tuple[Path, ...] = ()
    mask_paths: tuple[Path, ...] = ()
    volume_path: Path | None = None
    label_path: Path | None = None
    axis: int = 2

    @property
    def is_volume(self) -> bool:
        return self.volume_path is not None

    def __len__(self) -> int:
        return len(self.frame_names)

    def frame_source(self, index: int) -> str:
        """How to name frame `index` in messages: its file, or the volume and slice."""
        if self.is_volume:
            return f"{self.volume_path} (axis {self.axis}, slice {index})"
        return str(self.frame_paths[index])

    def mask_source(self, index: int) -> str:
        """How to name the label map of frame `index` in messages."""
        if self.is_volume:
            return f"{self.label_path} (axis {self.axis}, slice {index})"
        return str(self.mask_paths[index])


def natural_key(name: str) -> tuple:
    """Sort key of natural order: digit runs compare as numbers, the rest case-insensitively (ties: the name).

    Example:
        >>> sorted(["f10", "f2", "F1"], key=natural_key)
        ['F1', 'f2', 'f10']
    """
    parts = re.split(r"(\d+)", name)
    # re.split with a group alternates text, digits, text, ...: equal positions always hold the same kind.
    return tuple(int(part) if i % 2 else part.lower() for i, part in enumerate(parts)), name


def load_clips(
    root: str | os.PathLike, *, nifti_axis: int = 2, val_fraction: float = 0.1, seed: int = 0
) -> dict[str, list[ClipRecord]]:
    """Find the clips of a video or volume folder, by split.

    Args:
        root: a folder in one of the two layouts (see the module docstring), optionally split into train/ val/ test/.
        nifti_axis: 0, 1 or 2, the axis NIfTI volumes are cut along (2 = axial for RAS volumes).
        val_fraction: fraction of train clips held out as `val` when there is no val/ folder (0 for none).
        seed: seed of that hold-out.

    Returns:
        {split: clips in natural order of their ids}, splits among `train`, `val`, `test`.

    Example:
        >>> sorted(load_clips("examples/data_video"))
        ['train', 'val']
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(
            f"--data {root}: not a folder. `--task video` reads videos/<clip>/ frame folders with masks/<clip>/, or "
            "NIfTI volumes in images/ + masks/ (optionally under train/ val/ test/)."
        )
    if nifti_axis not in (0, 1, 2):
        raise DataError(f"--nifti_axis {nifti_axis} must be 0, 1 or 2.")
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"--val_fraction {val_fraction} must be in [0, 1).")
    present = [split for split in SPLITS if _has_clip_layout(root / split)]
    if _has_clip_layout(root):
        if present:
            raise DataError(
                f"{root} has both clip folders (videos/, images/ or masks/) and split subfolders "
                f"({', '.join(present)}/); keep one layout."
            )
        splits = {"train": _split_clips(root, nifti_axis)}
    elif present:
        splits = {split: _split_clips(root / split, nifti_axis) for split in present}
    else:
        raise DataError(
            f"{root} has no videos/ + masks/ (frame folders) or images/ + masks/ (NIfTI volumes), at the top or "
            f"under {', '.join(SPLITS)}/."
        )
    return _hold_out(splits, val_fraction, seed)


def _has_clip_layout(folder: Path) -> bool:
    return any((folder / name).is_dir() for name in ("videos", "images", "masks"))


def _split_clips(folder: Path, axis: int) -> list[ClipRecord]:
    clips = _frame_folder_clips(folder) + _volume_clips(folder, axis)
    if not clips:
        raise DataError(
            f"{folder} holds no clip: add videos/<clip>/ frame folders (with masks/<clip>/) or NIfTI volumes in "
            "images/ (with masks/)."
        )
    ids = [clip.clip_id for clip in clips]
    twice = sorted({i for i in ids if ids.count(i) > 1})
    if twice:
        raise DataError(f"{folder}: clip id(s) {twice} name both a videos/ folder and a NIfTI volume; rename one.")
    return sorted(clips, key=lambda clip: natural_key(clip.clip_id))


def _frame_folder_clips(folder: Path) -> list[ClipRecord]:
    videos, masks = folder / "videos", folder / "masks"
    if not videos.is_dir():
        return []
    for path in sorted(videos.iterdir()):
        if path.is_file() and not path.name.startswith("."):
            raise DataError(
                f"{path}: videos/ must hold one folder of frames per clip. Video files are not read; extract the "
                f"frames first, e.g. `ffmpeg -i {path.name} {path.stem}/%05d.png`."
            )
    clips = []
    for clip_dir in sorted((p for p in videos.iterdir() if p.is_dir()), key=lambda p: natural_key(p.name)):
        mask_dir = masks / clip_dir.name
        if not mask_dir.is_dir():
            raise DataError(f"Clip {clip_dir} has no label maps: expected the folder {mask_dir}.")
        clips.append(_frame_clip(clip_dir, mask_dir))
    if masks.is_dir():
        for mask_dir in sorted(p for p in masks.iterdir() if p.is_dir()):
            if not (videos / mask_dir.name).is_dir():
                raise DataError(f"{mask_dir} holds label maps of a clip that has no frames ({videos / mask_dir.name}).")
    return clips


def _frame_clip(clip_dir: Path, mask_dir: Path) -> ClipRecord:
    frames = index_files(clip_dir, IMAGE_SUFFIXES)
    masks = index_files(mask_dir, MASK_SUFFIXES)
    if not frames:
        raise DataError(
            f"{clip_dir} is an empty clip: no frames ({', '.join(IMAGE_SUFFIXES)}). Add its frames or remove the "
            "folder."
        )
    missing = sorted(set(frames) - set(masks), key=natural_key)
    if missing:
        raise DataError(
            f"{frames[missing[0]]} has no label map in {mask_dir} ({len(missing)} frame(s) without one; expected "
            f"{mask_dir / missing[0]}.png or .tif). Every frame needs a mask (all zeros where no object is visible)."
        )
    orphans = sorted(set(masks) - set(frames), key=natural_key)
    if orphans:
        raise DataError(
            f"{masks[orphans[0]]} has no frame with the same stem in {clip_dir} ({len(orphans)} mask(s) without one); "
            "rename it to match its frame or remove it."
        )
    names = sorted(frames, key=natural_key)
    return ClipRecord(
        clip_id=clip_dir.name,
        frame_names=tuple(names),
        frame_paths=tuple(frames[name] for name in names),
        mask_paths=tuple(masks[name] for name in names),
    )


def _volume_clips(folder: Path, axis: int) -> list[ClipRecord]:
    images_dir, masks_dir = folder / "images", folder / "masks"
    if not images_dir.is_dir():
        return []
    flat = [p for p in sorted(images_dir.iterdir()) if p.is_file() and not p.name.startswith(".")]
    not_volumes = [p for p in flat if not is_nifti(p)]
    if not_volumes:
        raise DataError(
            f"{not_volumes[0]}: with `--task video`, images/ holds NIfTI volumes only; put the frames of a video in "
            "videos/<clip>/ (and its label maps in masks/<clip>/), or train on 2-D images with `--task image`."
        )
    images = index_files(images_dir, NIFTI_SUFFIXES)
    labels = index_files(masks_dir, NIFTI_SUFFIXES)
    for stem, path in images.items():
        if stem not in labels:
            raise DataError(f"{path} has no label volume: expected {masks_dir / stem}.nii.gz (or .nii).")
    for stem, path in labels.items():
        if stem not in images:
            raise DataError(f"{path} has no image volume with the same stem in {images_dir}; rename or remove it.")
    return [_volume_clip(stem, images[stem], labels[stem], axis) for stem in images]


def _volume_clip(stem: str, image_path: Path, label_path: Path, axis: int) -> ClipRecord:
    nibabel = import_nibabel()
    shapes = []
    for path in (image_path, label_path):
        try:
            shapes.append(tuple(nibabel.load(str(path)).shape))  # the header only
        except Exception as err:  # nibabel raises a zoo of types for corrupt files
            raise DataError(f"{path}: cannot be read as NIfTI ({type(err).__name__}: {err}); re-export it.") from err
    if len(shapes[0]) != 3:
        raise DataError(f"{image_path} has shape {shapes[0]}; a volume clip must be 3-D (one file per channel).")
    if shapes[0] != shapes[1]:
        raise DataError(
            f"{image_path} has shape {shapes[0]} but its labels {label_path} have {shapes[1]}; they must be "
            "voxel-aligned (resample the labels onto the image grid)."
        )
    if shapes[0][axis] == 0:
        raise DataError(f"{image_path} is an empty clip: no slices along axis {axis}.")
    names = tuple(f"slice_{i:04d}" for i in range(shapes[0][axis]))
    return ClipRecord(clip_id=stem, frame_names=names, volume_path=image_path, label_path=label_path, axis=axis)


def index_files(folder: Path, suffixes: tuple[str, ...]) -> dict[str, Path]:
    """Map stem -> file for the files of `folder` ending in one of `suffixes` (a stem twice is refused)."""
    files: dict[str, Path] = {}
    if not folder.is_dir():
        return files
    for path in sorted(folder.iterdir()):
        suffix = next((s for s in suffixes if path.name.lower().endswith(s)), None)
        if suffix is None or not path.is_file():
            continue
        stem = path.name[: -len(suffix)]
        if stem in files:
            raise DataError(
                f"{folder} has two files with the stem {stem!r} ({files[stem].name}, {path.name}); keep one."
            )
        files[stem] = path
    return files


def is_nifti(path: Path) -> bool:
    """Whether `path` is named as a NIfTI file (`.nii`, `.nii.gz`)."""
    return path.name.lower().endswith(NIFTI_SUFFIXES)


def _hold_out(splits: dict[str, list[ClipRecord]], val_fraction: float, seed: int) -> dict[str, list[ClipRecord]]:
    train = splits.get("train", [])
    if "val" in splits or val_fraction == 0.0 or len(train) < 2:
        return splits
    count = min(len(train) - 1, math.ceil(val_fraction * len(train)))
    held = set(np.random.default_rng(seed).permutation(len(train))[:count].tolist())
    out = dict(splits)
    out["train"] = [clip for i, clip in enumerate(train) if i not in held]
    out["val"] = [clip for i, clip in enumerate(train) if i in held]
    return {split: out[split] for split in SPLITS if split in out}


def import_nibabel():
    """Import nibabel, the optional NIfTI reader, or say how to install it."""
    try:
        import nibabel
    except ImportError as err:
        raise DataError("Reading NIfTI volumes needs nibabel: `pip install 'sam2-peft[medical]'`.") from err
    return nibabel
