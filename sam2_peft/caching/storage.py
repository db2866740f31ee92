"""Feature-cache storage: what a frozen part of the image encoder computed, kept per image view.

    cache = FeatureCache(model_fingerprint(model), preprocessing_key(train_set), directory="cache/")
    batch["image_features"] = cache.features(segmenter, batch, view=0)     # encodes only the images not cached yet

`FeatureCache` stores the three FPN maps that `Sam2Segmenter.encode_images` returns, before the decoder's own
`conv_s0` / `conv_s1`. `PrefixCache` stores the hidden state entering the first trainable encoder block (Hiera
block, SAM3 ViT layer, EdgeTAM RepViT block: `family.image_trunk`) plus the earlier stage outputs the neck reads,
and runs the trainable blocks and the neck on every step. Which one applies is `caching.policy`'s decision.

An entry's key hashes the image id, the view, the preprocessing description, the autocast state and the frozen
encoder's fingerprint (`sam2_peft.models.model_fingerprint` of the model before training), so changing any of them
misses. Each entry also keeps a checksum of its input pixels, checked on every hit: an image replaced under the
same id (e.g. a dataset whose default ids are row numbers) is re-encoded instead of served stale. Entries live in
memory, or as safetensors files (with the dtype they were computed in) under `directory=`.

Size per image and view at S px with the default FPN width 256, float32: 256 * (S/4)^2 * 1.3125 * 4 bytes, i.e.
84 MB at 1024 px (use `dtype=torch.bfloat16` to halve it, or `directory=` to keep entries on disk).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from sam2_peft.family import encode_from_prefix, encode_prefix
from sam2_peft.hub.files import atomic_file

logger = logging.getLogger(__name__)

# Pixel checksums sum float32 row sums: the same pixels give the same sums on one device, and within these
# tolerances on another (float32 rounding), while a replaced image or another augmentation draw moves them by
# orders of magnitude more. An edit of a few pixels may go unseen: the checksum guards against stale entries, it
# is not a content hash.
_CHECKSUM_RTOL, _CHECKSUM_ATOL = 1e-5, 1e-2


def preprocessing_key(dataset) -> str:
    """Describe everything that makes a `SegmentationDataset`'s pixels: geometry, intensity, augmentation, seed."""
    augment = dataset.augment.config if dataset.changes_pixels else None
    return json.dumps(
        {
            "preprocessor": repr(dataset.preprocessor),
            "intensity": repr(dataset.intensity),
            "augment": repr(augment),
            "seed": dataset.seed if augment is not None else None,
        },
        sort_keys=True,
    )


def pixel_checksum(pixel_values: torch.Tensor) -> torch.Tensor:
    """(B, 3, S, S) -> (B, 3) float64 on the CPU: the pixel sum, and the row and column sums weighted by position.

    The weighted sums change under the flips, rotations and crops that keep the plain sum. Two reductions on the
    pixels' device (~6 ms per 1024-px image on one CPU core) instead of hashing the bytes (~8 ms plus a copy off
    the GPU).
    """
    pixels = pixel_values.detach()
    rows, cols = pixels.sum(3).double(), pixels.sum(2).double()  # (B, 3, S) each
    position = torch.arange(pixels.shape[-1], dtype=torch.float64, device=pixels.device)
    return torch.stack([rows.sum((1, 2)), (rows * position).sum((1, 2)), (cols * position).sum((1, 2))], 1).cpu()


@dataclass
class _Entry:
    tensors: list[torch.Tensor]
    checksum: torch.Tensor
    dtype: torch.dtype


class FeatureCache:
    """Frozen-encoder cache: the FPN maps of each (image, view), computed once under `torch.no_grad()`.

    Args:
        encoder_fingerprint: `model_fingerprint(model)` taken before training (the encoder is frozen, so it holds).
        preprocessing_key: a description of how pixels are made (`preprocessing_key(dataset)`).
        directory: keep entries as safetensors files under `directory/<namespace>/`; None keeps them in memory.
        dtype: store entries in this dtype (e.g. `torch.bfloat16`, half the memory); they come back in the dtype
            they were computed in. None stores them as computed.
        device: where in-memory entries live ("cpu", or the GPU when it has room: no copy per step).

    Example:
        >>> cache = FeatureCache(model_fingerprint(model), preprocessing_key(train_set))
        >>> batch["image_features"] = cache.features(segmenter, batch)
    """

    kind = "features"

    def __init__(
        self,
        encoder_fingerprint: str,
        preprocessing_key: str,
        directory: str | os.PathLike | None = None,
        *,
        dtype: torch.dtype | None = None,
        device: str | torch.device = "cpu",
    ):
        self.encoder_fingerprint = encoder_fingerprint
        self.preprocessing_key = preprocessing_key
        self.dtype = dtype
        self.device = torch.device(device)
        self.hits = self.misses = self.stale = 0
        self._memory: dict[str, _Entry] = {}
        self._directory = None if directory is None else Path(directory) / self.namespace()
        if self._directory is not None:
            self._directory.mkdir(parents=True, exist_ok=True)

    def namespace(self, autocast: str = "") -> str:
        """Hash of what every entry shares: cache kind, encoder fingerprint, preprocessing."""
        text = json.dumps([self.kind, self.encoder_fingerprint, self.preprocessing_key, autocast])
        return f"{self.kind}-{hashlib.sha256(text.encode()).hexdigest()[:16]}"

    def features(self, segmenter: nn.Module, batch: dict, view: int = 0) -> list[torch.Tensor]:
        """The FPN maps of `batch["pixel_values"]`, encoding only the images not cached yet.

        Args:
            segmenter: the `Sam2Segmenter` (unwrapped) whose encoder is frozen.
            batch: a `collate_objects` batch; uses `pixel_values` (B, 3, S, S) and `image_ids` (B str).
            view: which augmented view of the images this is (`CachePlan.view(epoch)`); 0 without augmentation.

        Returns:
            (B, C, S/4, S/4), (B, C, S/8, S/8), (B, C, S/16, S/16) on the pixels' device, no autograd history. For
            one image held in memory in the compute dtype these are views of the cache: read them, never write.
        """
        return self._cached(segmenter, batch, view)

    def attach(self, segmenter: nn.Module, batch: dict, view: int = 0) -> None:
        """Put what this cache holds for `batch` into it: `image_features`, which `InteractiveSegmenter` reads."""
        batch["image_features"] = self.features(segmenter, batch, view)

    def _compute(self, segmenter: nn.Module, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        return segmenter.encode_images(pixel_values)

    def _cached(self, segmenter: nn.Module, batch: dict, view: int) -> list[torch.Tensor]:
        pixel_values, image_ids = batch["pixel_values"], batch["image_ids"]
        if len(image_ids) != pixel_values.shape[0]:
            raise ValueError(f"batch has {len(image_ids)} image_ids for {pixel_values.shape[0]} images.")
        checksums = pixel_checksum(pixel_values)
        autocast = _autocast_tag(pixel_values.device.type)
        keys = [self._key(image_id, view, autocast) for image_id in image_ids]
        entries = [self._get(key) for key in keys]
        missing = []
        for index, entry in enumerate(entries):
            if entry is not None and _same_pixels(entry.checksum, checksums[index]):
                continue
            if entry is not None:
                self.stale += 1
                logger.warning("Cached features of image %r (view %d) no longer match its pixels; re-encoding.",
                               image_ids[index], view)
            missing.append(index)
        self.hits += len(keys) - len(missing)
        self.misses += len(missing)
        if missing:
            with torch.no_grad():
                computed = self._compute(segmenter, pixel_values[missing])
            for row, index in enumerate(missing):
                entries[index] = self._put(keys[index], [t[row] for t in computed], checksums[index])
        # One image needs no stacking: its cached tensors go out as views (84 MB not copied per 1024-px step).
        return [
            (levels[0].unsqueeze(0) if len(levels) == 1 else torch.stack(levels)).to(
                pixel_values.device, entries[0].dtype
            )
            for levels in zip(*(entry.tensors for entry in entries))
        ]

    def _key(self, image_id: str, view: int, autocast: str) -> str:
        text = json.dumps([self.namespace(autocast), str(image_id), int(view)])
        return hashlib.sha256(text.encode()).hexdigest()[:32]

    def _get(self, key: str) -> _Entry | None:
        if key in self._memory or self._directory is None:
            return self._memory.get(key)
        path = self._directory / f"{key}.safetensors"
        if not path.is_file():
            return None
        tensors = load_file(path)
        levels = [tensors[f"level_{i}"] for i in range(len(tensors) - 2)]
        dtype = getattr(torch, _DTYPES[int(tensors["dtype"])])
        return _Entry(levels, tensors["checksum"], dtype)

    def _put(self, key: str, tensors: list[torch.Tensor], checksum: torch.Tensor) -> _Entry:
        dtype = tensors[0].dtype
        where = self.device if self._directory is None else "cpu"
        stored = [t.detach().to(where, self.dtype or dtype) for t in tensors]
        entry = _Entry([t.contiguous() for t in stored], checksum, dtype)
        if self._directory is None:
            self._memory[key] = entry
            return entry
        path = self._directory / f"{key}.safetensors"
        payload = {f"level_{i}": t for i, t in enumerate(entry.tensors)}
        payload["checksum"] = checksum
        payload["dtype"] = torch.tensor(_DTYPES.index(str(dtype).removeprefix("torch.")))
        # Atomic: a process reading concurrently (or after a crash) sees a whole entry or none.
        with atomic_file(path) as temporary:
            save_file(payload, temporary)
        return entry


# The dtype an entry was computed in, stored as an index (safetensors metadata is strings only, per file).
_DTYPES = ["float32", "bfloat16", "float16", "float64"]


class FrameCache(FeatureCache):
    """Frozen-encoder cache for clips: each frame's FPN maps, computed once, keyed by clip and frame.

    Clips are not augmented, so a frame's pixels are the same in every window that holds it; the pixel checksum
    still guards every entry.

    Example:
        >>> cache = FrameCache(fingerprint, preprocessing_key(train_clips))
        >>> cache.attach(clip_segmenter.segmenter, clips)       # each clip gets `frame_levels`
    """

    kind = "frames"

    def _compute(self, segmenter: nn.Module, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        return segmenter.encode_levels(pixel_values, frozen=True)

    def attach(self, segmenter: nn.Module, batch: list[dict], view: int = 0) -> None:
        """Put each clip's frame maps into it as `frame_levels`, which `video.ClipSegmenter` reads."""
        for clip in batch:
            frames = {"pixel_values": clip["pixel_values"],
                      "image_ids": [f"{clip['clip_id']}/{index}" for index in clip["frame_indices"]]}
            clip["frame_levels"] = self.features(segmenter, frames, view)


class PrefixCache(FeatureCache):
    """Frozen-prefix cache: the activations entering block `start_block`, computed once; the rest runs per step.

    Args:
        start_block: the first encoder block that trains (`first_trainable_block(model)`).
        (the others as `FeatureCache`)

    Example:
        >>> cache = PrefixCache(fingerprint, preprocessing_key(train_set), first_trainable_block(model))
        >>> features = cache.features(segmenter, batch)       # runs blocks start_block.. and the neck, with grad
    """

    kind = "prefix"

    def __init__(self, encoder_fingerprint: str, preprocessing_key: str, start_block: int, directory=None, **options):
        if start_block < 1:
            raise ValueError(f"start_block={start_block}: block 0 trains, so there is no frozen prefix to cache.")
        self.start_block = start_block
        super().__init__(encoder_fingerprint, f"{preprocessing_key}|start_block={start_block}", directory, **options)

    def prefix(self, segmenter: nn.Module, batch: dict, view: int = 0) -> list[torch.Tensor]:
        """The cached `encode_prefix` output for `batch` (no autograd history); pass it to `encode_from_prefix`."""
        return self._cached(segmenter, batch, view)

    def features(self, segmenter: nn.Module, batch: dict, view: int = 0) -> list[torch.Tensor]:
        """Cached prefix, then the trainable blocks and the neck with autograd: the FPN maps for the decoder.

        Under DistributedDataParallel, call `encode_from_prefix` inside the wrapped module's forward instead (with
        `prefix()` as input), so that DDP sees the trainable blocks run.
        """
        prefix = self.prefix(segmenter, batch, view)
        return encode_from_prefix(segmenter.sam.vision_encoder, prefix, self.start_block,
                                  backend=segmenter.backend_for(prefix[0].device))

    def attach(self, segmenter: nn.Module, batch: dict, view: int = 0) -> None:
        """Put the cached prefix into `batch` (`image_prefix`, `prefix_start_block`): the trainable blocks then run
        inside `InteractiveSegmenter.forward`, so DistributedDataParallel sees them."""
        batch["image_prefix"] = self.prefix(segmenter, batch, view)
        batch["prefix_start_block"] = self.start_block

    def _compute(self, segmenter: nn.Module, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        return encode_prefix(segmenter.sam.vision_encoder, pixel_values, self.start_block,
                             backend=segmenter.backend_for(pixel_values.device))


def _same_pixels(stored: torch.Tensor, current: torch.Tensor) -> bool:
    return torch.allclose(stored.double(), current, rtol=_CHECKSUM_RTOL, atol=_CHECKSUM_ATOL)


def _autocast_tag(device_type: str) -> str:
    """Autocast changes the encoder's output, so it is part of every key."""
    if not torch.is_autocast_enabled(device_type):
        return "fp32"
    return str(torch.get_autocast_dtype(device_type)).removeprefix("torch.")
