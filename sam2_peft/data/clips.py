"""Clips for SAM2 video training and evaluation: frame windows, tracked objects and their first-frame prompts.

    splits = DataConfig(data="examples/data_video", task="video").load_clip_splits(seed=0)
    pre = Preprocessor.from_model(model)
    train = ClipDataset(splits["train"], pre, clip_length=8, prompts=PromptConfig(), seed=0)
    val = ClipDataset(splits["val"], pre, prompts="box")          # whole videos, every object prompted once
    loader = DataLoader(train, batch_size=2, shuffle=True, collate_fn=collate_clips)
    train.set_epoch(epoch)                                         # before each epoch, as SegmentationDataset

Training items are windows of `clip_length` consecutive frames (all frames of a shorter clip) starting at a seeded
random frame that holds an object; the tracked objects are those of the window's first frame, prompted there
(`simulate_prompts`); objects that enter later are dropped and counted. When every such start lies in the last
`clip_length - 1` frames, the window is cut short at the clip's end. Evaluation items are whole clips: every object
is prompted (`eval_prompts`) on the first frame where it has at least `min_object_area` pixels (1 by default).
Draws are seeded by `(seed, epoch, index)` (evaluation: `(seed, index)`), never by worker state.

Building a dataset reads every label map once (and every frame's header) and refuses with a `DataError` naming the
file: label maps of different sizes in a clip, a frame whose size differs from its mask, and palette PNG masks whose
palettes disagree (a value drawn in another colour, or a colour carrying another value, in another frame: the value
then need not name the same object in every frame). A value that disappears and reappears is the same object
(occlusion); a value's meaning across frames is otherwise the user's promise, for `instance` maps (one object) and
`semantic` maps (one class region, e.g. an organ along slices) alike. Clips without any object are skipped and
counted in `report`. There is no augmentation yet.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from sam2_peft.data.clip_frames import frame_size, iter_labels, palette, read_frames, read_labels, volume_intensity
from sam2_peft.data.clip_sources import ClipRecord, import_nibabel
from sam2_peft.data.intensity import IntensityConfig, normalize_intensity
from sam2_peft.data.io import MASK_TYPES, DataError
from sam2_peft.data.nifti import read_volume
from sam2_peft.data.prompts import EvalPrompt, PromptConfig, Prompts, eval_prompts, pad_prompts, simulate_prompts
from sam2_peft.data.transforms import Preprocessor

logger = logging.getLogger(__name__)

NOT_IN_FIRST = "objects absent from the window's first frame"
SMALL_IN_FIRST = "objects under min_object_area in the window's first frame"
VANISHED = "objects that vanish at model resolution in the window's first frame"
OVER_CAP = "objects over max_objects_per_clip (this draw)"
NEVER_LARGE = "objects under min_object_area in every frame"
NO_OBJECT = "clips without any object (skipped)"
NONE_PROMPTABLE = "clips whose objects are all under min_object_area or vanish at model resolution (skipped)"


@dataclass
class ClipScan:
    """What a clip's label maps hold, frame by frame.

    Attributes:
        size: (H, W) of every frame.
        areas: per frame, label value -> pixels (background left out).
        visible: per frame, the values still present once the label map is resized to the model input.
    """

    size: tuple[int, int]
    areas: list[dict[int, int]]
    visible: list[frozenset[int]]


def scan_clip(clip: ClipRecord, preprocessor: Preprocessor) -> ClipScan:
    """Read every label map of `clip`, check sizes and palettes, and record which objects each frame holds."""
    size, areas, visible = None, [], []
    palettes: dict[tuple, tuple] = {}
    for index, labels in iter_labels(clip):
        if size is None:
            size = labels.shape
        elif labels.shape != size:
            raise DataError(
                f"{clip.mask_source(index)} is {labels.shape[0]}x{labels.shape[1]} (HxW) but "
                f"{clip.mask_source(0)} is {size[0]}x{size[1]}: all frames of a clip must have one size. Re-export "
                "the clip at one size."
            )
        if not clip.is_volume:
            _check_frame_size(clip, index, labels.shape)
            _check_palette(clip, index, labels, palettes)
        values, counts = np.unique(labels, return_counts=True)
        areas.append({int(v): int(c) for v, c in zip(values, counts) if v})
        if areas[-1]:
            resized = preprocessor.resize_labels(torch.from_numpy(labels))
            visible.append(frozenset(int(v) for v in torch.unique(resized).tolist() if v))
        else:
            visible.append(frozenset())
    return ClipScan(size=tuple(size), areas=areas, visible=visible)


def _check_frame_size(clip: ClipRecord, index: int, size: tuple[int, int]) -> None:
    frame = frame_size(clip.frame_paths[index])
    if frame != size:
        raise DataError(
            f"{clip.frame_paths[index]} is {frame[0]}x{frame[1]} (HxW) but its mask {clip.mask_paths[index]} is "
            f"{size[0]}x{size[1]}. Masks must be pixel-aligned with their frames; re-export the mask at the frame's "
            "size."
        )


def _check_palette(clip: ClipRecord, index: int, labels: np.ndarray, seen: dict[tuple, tuple]) -> None:
    """Refuse palette masks whose value -> colour map changes within the clip (`seen` carries it across frames)."""
    path = clip.mask_paths[index]
    colours = palette(path)
    if colours is None:
        return
    fix = (
        f"the masks of clip {clip.clip_id!r} use different palettes, so a value need not name the same object in "
        "every frame. Re-save them with one palette (or as greyscale label maps)."
    )
    for value in np.unique(labels).tolist():
        colour = tuple(colours[value].tolist())
        first_colour, first_path = seen.setdefault(("value", value), (colour, path))
        if first_colour != colour:
            raise DataError(
                f"{path}: label {value} has palette colour {colour} but {first_colour} in {first_path}; {fix}"
            )
        first_value, first_path = seen.setdefault(("colour", colour), (value, path))
        # Within one file two values may share a colour; only a colour that moves to another value across files counts.
        if first_value != value and first_path != path:
            raise DataError(
                f"{path}: palette colour {colour} is label {value} but label {first_value} in {first_path}; {fix}"
            )


@dataclass
class ClipReport:
    """What one split of clips holds and what was left out.

    Attributes:
        name: the split.
        num_clips: clips in the split.
        volumes: how many of them are NIfTI volumes.
        usable: indices of the clips that become items.
        frames: frames of every clip.
        objects: tracked objects of every usable clip (evaluation counting).
        skipped: clips or objects left out, by reason.
        short_clips: usable clips shorter than `clip_length` (training uses all their frames).
        clip_length: frames per training window (None: whole clips).
    """

    name: str
    num_clips: int = 0
    volumes: int = 0
    usable: list[int] = field(default_factory=list)
    frames: list[int] = field(default_factory=list)
    objects: list[int] = field(default_factory=list)
    skipped: Counter = field(default_factory=Counter)
    short_clips: int = 0
    clip_length: int | None = None

    def format(self) -> str:
        """Render as a few indented lines."""
        frames = np.array(self.frames or [0])
        lines = [
            f"{self.name}: {self.num_clips} clips ({self.volumes} volumes), {len(self.usable)} usable, "
            f"{int(frames.sum())} frames, {sum(self.objects)} objects",
            f"  frames per clip: min {frames.min()}, max {frames.max()}",
        ]
        if self.short_clips:
            lines.append(
                f"  {self.short_clips} clips shorter than clip_length={self.clip_length}: all their frames used"
            )
        skipped = "; ".join(f"{n} {reason}" for reason, n in sorted(self.skipped.items()) if n) or "nothing"
        lines.append(f"  skipped: {skipped}")
        return "\n".join(lines)

    __str__ = format


class ClipDataset(torch.utils.data.Dataset):
    """Read, split into tracked objects, prompt and preprocess the clips of one split.

    Args:
        clips: one split from `load_clips` / `DataConfig.load_clip_splits`.
        preprocessor: the model's input geometry and normalisation (`Preprocessor.from_model(model)`).
        clip_length: frames per training window (None: whole clips); evaluation ignores it.
        mask_type: `instance` (a value is one object) or `semantic` (a value is one class region); both tracked
            the same way.
        min_object_area: an object is prompted only on frames where it has at least this many pixels.
        max_objects_per_clip: keep at most this many objects per item (a seeded random subset, new each epoch).
        intensity: how raw intensities map to [0, 1]; per frame for frame folders, per volume for NIfTI.
        prompts: `PromptConfig` for random training prompts on the window's first frame, or an evaluation
            protocol (`"box"`, `"point"`, `"points:K"` or `EvalPrompt`) for whole clips.
        seed: base seed of every random choice.
        split: the split's name, for messages.
    """

    def __init__(
        self,
        clips: list[ClipRecord],
        preprocessor: Preprocessor,
        *,
        clip_length: int | None = None,
        mask_type: str = "instance",
        min_object_area: int = 0,
        max_objects_per_clip: int | None = None,
        intensity: IntensityConfig = IntensityConfig(),
        prompts: PromptConfig | EvalPrompt | str = PromptConfig(),
        seed: int = 0,
        split: str = "train",
    ):
        if isinstance(prompts, str):
            prompts = EvalPrompt.parse(prompts)
        if isinstance(prompts, PromptConfig) and prompts.mask_prompts:
            raise ValueError("Clips take box or click prompts; mask prompts (mask_prompts=True) are not supported.")
        if clip_length is not None and clip_length < 1:
            raise ValueError(f"clip_length={clip_length} must be >= 1 (or None for whole clips).")
        if max_objects_per_clip is not None and max_objects_per_clip < 1:
            raise ValueError(f"max_objects_per_clip={max_objects_per_clip} must be >= 1 (or None for no cap).")
        if mask_type not in MASK_TYPES:
            raise DataError(f"mask_type={mask_type!r} is not supported; use one of {MASK_TYPES}.")
        self.clips = list(clips)
        self.preprocessor = preprocessor
        self.evaluating = isinstance(prompts, EvalPrompt)
        self.clip_length = clip_length
        self.mask_type = mask_type
        self.min_area = max(1, min_object_area)
        self.max_objects_per_clip = max_objects_per_clip
        self.intensity = intensity
        self.prompts = prompts
        self.seed = seed
        self.split = split
        self.epoch = 0
        self.scans = [scan_clip(clip, preprocessor) for clip in self.clips]
        # Per clip and frame, the objects a prompt may start from: large enough and, to train on, visible.
        self.promptable = [[self._promptable(scan, t) for t in range(len(scan.areas))] for scan in self.scans]
        self.report = self._build_report()
        self.indices = self.report.usable
        self._volume_intensities: dict[int, IntensityConfig] = {}
        logger.info("Clips:\n%s", self.report.format())
        if not self.indices:
            raise DataError(f"Split {split!r} has no usable clip:\n{self.report.format()}")

    def _promptable(self, scan: ClipScan, frame: int) -> frozenset[int]:
        large = {value for value, area in scan.areas[frame].items() if area >= self.min_area}
        return frozenset(large if self.evaluating else large & scan.visible[frame])

    def _build_report(self) -> ClipReport:
        report = ClipReport(self.split, num_clips=len(self.clips), clip_length=self.clip_length)
        for index, (clip, scan, promptable) in enumerate(zip(self.clips, self.scans, self.promptable)):
            report.volumes += clip.is_volume
            report.frames.append(len(clip))
            if not any(scan.areas):
                report.skipped[NO_OBJECT] += 1
            elif not any(promptable):
                report.skipped[NONE_PROMPTABLE] += 1
            else:
                report.usable.append(index)
                tracked = frozenset().union(*promptable)
                report.objects.append(len(tracked))
                large = {value for areas in scan.areas for value, area in areas.items() if area >= self.min_area}
                report.skipped[NEVER_LARGE] += len(set().union(*scan.areas) - large)
                short = self.clip_length is not None and len(clip) < self.clip_length
                report.short_clips += short and not self.evaluating
        report.skipped = +report.skipped
        return report

    # Clips are not augmented (yet): their pixels are the same every epoch, which frame caches rely on.
    augment = None
    changes_pixels = False

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose random draws `__getitem__` makes (call before iterating each epoch)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> dict[str, Any]:
        clip_index = self.indices[index]
        clip = self.clips[clip_index]
        # Eval draws ignore the epoch so that every evaluation sees the same prompts.
        key = [self.seed, index] if self.evaluating else [self.seed, self.epoch, index]
        rng = np.random.default_rng(np.random.SeedSequence(key))
        frames, ids, first, dropped = self._whole_clip(clip_index) if self.evaluating else self._window(clip_index, rng)
        if self.max_objects_per_clip is not None and len(ids) > self.max_objects_per_clip:
            dropped[OVER_CAP] += len(ids) - self.max_objects_per_clip
            keep = np.sort(rng.choice(len(ids), self.max_objects_per_clip, replace=False))
            ids, first = ids[keep], first[keep]
        labels = read_labels(clip, frames)  # (T, H, W)
        full_masks = labels[:, None] == ids[None, :, None, None]  # (T, N, H, W)
        model_labels = torch.stack([self.preprocessor.resize_labels(torch.from_numpy(m)) for m in labels])  # (T, S, S)
        prompts = self._prompts(full_masks, first, rng)
        item = {
            "pixel_values": self._pixel_values(clip_index, frames),
            "masks": model_labels[:, None] == torch.from_numpy(ids)[None, :, None, None],
            # Present where the target the loss sees (at model resolution) has the object.
            "object_present": (model_labels[:, None] == torch.from_numpy(ids)[None, :, None, None]).flatten(2).any(-1),
            "prompt_frames": torch.from_numpy(first),
            "point_coords": prompts.point_coords,
            "point_labels": prompts.point_labels,
            "object_ids": torch.from_numpy(ids),
            "full_masks": full_masks,
            "original_size": tuple(labels.shape[1:]),
            "frame_names": [clip.frame_names[i] for i in frames],
            "frame_indices": list(frames),
            "clip_id": clip.clip_id,
            "is_volume": clip.is_volume,
            "dropped": +dropped,
        }
        if prompts.mask_inputs is not None:
            item["mask_inputs"] = prompts.mask_inputs
        return item

    def _window(self, clip_index: int, rng: np.random.Generator) -> tuple[list[int], np.ndarray, np.ndarray, Counter]:
        """A training window: frames, the objects of its first frame, their prompt frames (0) and what was dropped."""
        scan, promptable = self.scans[clip_index], self.promptable[clip_index]
        total = len(promptable)
        length = min(self.clip_length or total, total)
        starts = [s for s in range(total - length + 1) if promptable[s]]
        if not starts:  # objects only in the last frames: a window cut short at the clip's end
            starts = [s for s in range(total) if promptable[s]]
        start = starts[rng.integers(len(starts))]
        frames = list(range(start, min(start + length, total)))
        ids = np.array(sorted(promptable[start]), np.int64)
        dropped: Counter = Counter()
        first_frame = scan.areas[start]
        for value in set().union(*(scan.areas[t] for t in frames)) - set(ids.tolist()):
            if value not in first_frame:
                dropped[NOT_IN_FIRST] += 1
            elif first_frame[value] < self.min_area:
                dropped[SMALL_IN_FIRST] += 1
            else:
                dropped[VANISHED] += 1
        return frames, ids, np.zeros(len(ids), np.int64), dropped

    def _whole_clip(self, clip_index: int) -> tuple[list[int], np.ndarray, np.ndarray, Counter]:
        """Every frame; every object, prompted on the first frame where it is large enough."""
        scan, promptable = self.scans[clip_index], self.promptable[clip_index]
        first: dict[int, int] = {}
        for frame, values in enumerate(promptable):
            for value in values:
                first.setdefault(value, frame)
        ids = np.array(sorted(first), np.int64)
        prompt_frames = np.array([first[value] for value in ids.tolist()], np.int64)
        dropped = Counter({NEVER_LARGE: len(set().union(*scan.areas) - set(first))})
        return list(range(len(promptable))), ids, prompt_frames, dropped

    def _prompts(self, full_masks: np.ndarray, first: np.ndarray, rng: np.random.Generator) -> Prompts:
        if not self.evaluating:
            # One kind of prompt per clip (box or clicks), as official training draws it once per batch: SAM2 decodes
            # a box to one mask and a click to three, and a clip's objects are decoded together.
            boxes = rng.random() < self.prompts.box_prob
            config = dataclasses.replace(self.prompts, box_prob=1.0 if boxes else 0.0)
            return simulate_prompts(full_masks[0], self.preprocessor, config, rng)
        per_object: list[tuple[torch.Tensor, torch.Tensor]] = [None] * len(first)
        for frame in np.unique(first).tolist():
            chosen = np.flatnonzero(first == frame)
            prompts = eval_prompts(full_masks[frame, chosen], self.preprocessor, self.prompts, rng)
            for row, n in enumerate(chosen.tolist()):
                per_object[n] = (prompts.point_coords[row : row + 1], prompts.point_labels[row : row + 1])
        return Prompts(*pad_prompts(per_object))

    def _pixel_values(self, clip_index: int, frames: list[int]) -> torch.Tensor:
        """(T, 3, S, S) model inputs of `frames`; each frame must have its mask's size."""
        clip, size = self.clips[clip_index], self.scans[clip_index].size
        raw = read_frames(clip, frames)
        for frame, image in zip(frames, raw):
            if image.shape[:2] != size:
                raise DataError(
                    f"{clip.frame_source(frame)} is {image.shape[0]}x{image.shape[1]} (HxW) but its mask "
                    f"{clip.mask_source(frame)} is {size[0]}x{size[1]}; re-export the mask at the frame's size."
                )
        intensity = self._clip_intensity(clip_index)
        pixels = [torch.from_numpy(normalize_intensity(image, intensity)) for image in raw]
        return torch.stack([self.preprocessor.pixel_values(p) for p in pixels])

    def _clip_intensity(self, clip_index: int) -> IntensityConfig:
        clip = self.clips[clip_index]
        if not clip.is_volume:
            return self.intensity
        if clip_index not in self._volume_intensities:
            volume = read_volume(import_nibabel(), clip.volume_path)
            self._volume_intensities[clip_index] = volume_intensity(volume, self.intensity)
        return self._volume_intensities[clip_index]


def collate_clips(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Batch `ClipDataset` items: a list of them as they are (clips differ in length and object count)."""
    return list(items)
