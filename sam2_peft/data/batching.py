"""Per-image items with a varying number of objects, and the collate that batches them for `Sam2Segmenter`.

    splits = load_source("examples/data")
    pre = Preprocessor.from_model(model)
    train = SegmentationDataset(splits["train"], pre, augment=AugmentConfig(), prompts=PromptConfig(), seed=0)
    loader = DataLoader(train, batch_size=4, shuffle=True, num_workers=2, collate_fn=collate_objects)
    train.set_epoch(epoch)                                   # before each epoch (accelerate does it for you)
    val = SegmentationDataset(splits["val"], pre, prompts="box")   # eval: fixed protocol, no augmentation

Every random choice of item `index` (augmentation, object subset, prompts) is drawn from generators seeded by
`(seed, epoch, index)`, never from worker state: the same item comes out with any number of workers (pixel values
to the last float bit only for the same worker count, since workers run torch single-threaded), and a resumed run
sees exactly the batches it would have seen. Use `persistent_workers=False` (the default) so `set_epoch` reaches
the workers.

A cache of image features holds a few augmented views per image, so augmentation must repeat while prompts and the
object subset keep changing: with `dataset.augment_views = N` the augmentation is seeded by
`(seed, epoch % N, index)` and everything else by `(seed, epoch, index)`. It is an attribute, not a `set_epoch`
argument, because accelerate's prepared loaders call `dataset.set_epoch(epoch)` themselves.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Mapping
from typing import Any

import datasets
import numpy as np
import torch

from sam2_peft.data.intensity import IntensityConfig, normalize_intensity
from sam2_peft.data.io import decode_row
from sam2_peft.data.objects import Objects, class_ids, extract_objects
from sam2_peft.data.prompts import EvalPrompt, PromptConfig, Prompts, eval_prompts, pad_prompts, simulate_prompts
from sam2_peft.data.report import scan_split
from sam2_peft.data.transforms import AugmentConfig, JointAugment, Preprocessor

logger = logging.getLogger(__name__)

# Draws of the augmentation tried before giving up and using the unaugmented image (an all-objects-cut-away crop).
AUGMENT_TRIES = 3
CUT_AWAY = "objects cut away by augmentation"
SHRUNK = "objects shrunk under min_object_area by augmentation"
VANISHED = "objects that vanish at model resolution"
OVER_CAP = "objects over max_objects_per_image (this draw)"


class SegmentationDataset(torch.utils.data.Dataset):
    """Decode, augment, split into objects, prompt and preprocess the rows of one split.

    Args:
        rows: one split from `load_source`.
        preprocessor: the model's input geometry and normalisation (`Preprocessor.from_model(model)`).
        mask_type: `instance` (one object per label value) or `semantic` (one per class; class ids kept).
        num_classes: for semantic maps, the largest valid class id (checked when given).
        min_object_area: objects with fewer pixels (at the image's resolution) are dropped and counted.
        keep_empty_images: keep images without objects as negatives (one empty target, `object_present=False`).
        max_objects_per_image: keep at most this many objects per item (a seeded random subset, new each epoch).
        intensity: how raw intensities map to [0, 1].
        augment: joint augmentation (`AugmentConfig` or `JointAugment`), training only; None for none.
        prompts: `PromptConfig` for random training prompts, or an evaluation protocol (`"box"`, `"point"`,
            `"points:K"` or `EvalPrompt`), which also switches augmentation and negatives off.
        seed: base seed of every random choice.
        split: the split's name, for messages.
        skipped: what loading left out of this split before its rows (`Splits.skipped[name]`), by reason; reported
            with the rest.
    """

    def __init__(
        self,
        rows: datasets.Dataset,
        preprocessor: Preprocessor,
        *,
        mask_type: str = "instance",
        num_classes: int | None = None,
        min_object_area: int = 0,
        keep_empty_images: bool = False,
        max_objects_per_image: int | None = None,
        intensity: IntensityConfig = IntensityConfig(),
        augment: AugmentConfig | JointAugment | None = None,
        prompts: PromptConfig | EvalPrompt | str = PromptConfig(),
        seed: int = 0,
        split: str = "train",
        skipped: Mapping[str, int] | None = None,
    ):
        if isinstance(prompts, str):
            prompts = EvalPrompt.parse(prompts)
        self.evaluating = isinstance(prompts, EvalPrompt)
        if self.evaluating and augment is not None:
            raise ValueError(f"prompts={prompts.kind!r} is an evaluation protocol; evaluation takes `augment=None`.")
        if max_objects_per_image is not None and max_objects_per_image < 1:
            raise ValueError(f"max_objects_per_image={max_objects_per_image} must be >= 1 (or None for no cap).")
        self.rows = rows
        self.preprocessor = preprocessor
        self.mask_type = mask_type
        self.num_classes = num_classes
        self.min_object_area = min_object_area
        self.keep_empty_images = keep_empty_images and not self.evaluating
        self.max_objects_per_image = max_objects_per_image
        self.intensity = intensity
        self.augment = JointAugment(augment) if isinstance(augment, AugmentConfig) else augment
        self.prompts = prompts
        self.seed = seed
        self.split = split
        self.epoch = 0
        # Augmentation draws repeat every `augment_views` epochs (None: a new draw every epoch); see the module doc.
        self.augment_views: int | None = None
        self.report = scan_split(
            rows,
            split,
            mask_type=mask_type,
            num_classes=num_classes,
            min_object_area=min_object_area,
            keep_empty_images=self.keep_empty_images,
            skipped=skipped,
        )
        self.indices = self.report.usable
        logger.info("Data:\n%s", self.report.format())
        if not self.indices:
            raise ValueError(f"Split {split!r} has no usable image:\n{self.report.format()}")

    @property
    def changes_pixels(self) -> bool:
        """Whether items' images vary between epochs (augmentation), which invalidates cached image features."""
        return self.augment is not None and self.augment.changes_pixels

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose random draws `__getitem__` makes (call before iterating each epoch)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> dict[str, Any]:
        row_index = self.indices[index]
        row = self.rows[row_index]
        image, labels = decode_row(
            row,
            where=f"split {self.split!r}, row {row_index}",
            mask_type=self.mask_type,
            num_classes=self.num_classes,
        )
        # Eval draws ignore the epoch so that every evaluation sees the same prompts.
        key = [self.seed, index] if self.evaluating else [self.seed, self.epoch, index]
        torch_seed, numpy_seed = np.random.SeedSequence(key).generate_state(2)
        if self.augment_views is not None and not self.evaluating:
            # Same derivation as above, so with one view per epoch the draws are exactly the default ones.
            view = self.epoch % self.augment_views
            torch_seed = np.random.SeedSequence([self.seed, view, index]).generate_state(2)[0]
        rng = np.random.default_rng(numpy_seed)
        pixels = torch.from_numpy(normalize_intensity(image, self.intensity))
        label_map = torch.from_numpy(labels)
        objects = extract_objects(labels, mask_type=self.mask_type, min_object_area=self.min_object_area)
        dropped: Counter = Counter()
        if self.augment is not None:
            pixels, label_map, objects, dropped = self._augment(pixels, label_map, objects, int(torch_seed))

        model_labels = self.preprocessor.resize_labels(label_map)
        masks = (model_labels[None] == torch.from_numpy(objects.ids)[:, None, None]).numpy()
        visible = masks.any(axis=(1, 2))
        # Training needs a target at model resolution; evaluation scores the full-resolution mask, so an object
        # too small to survive the resize is still prompted and scored there.
        if not visible.all() and not self.evaluating:
            dropped[VANISHED] += int((~visible).sum())
            objects = Objects(objects.masks[visible], objects.ids[visible])
            masks = masks[visible]
        if self.max_objects_per_image is not None and len(objects) > self.max_objects_per_image:
            dropped[OVER_CAP] += len(objects) - self.max_objects_per_image
            keep = np.sort(rng.choice(len(objects), self.max_objects_per_image, replace=False))
            objects = Objects(objects.masks[keep], objects.ids[keep])
            masks = masks[keep]

        present = len(objects) > 0
        if not present:
            # A negative: one empty target, so the object-score head learns "nothing here".
            objects = Objects(np.zeros((1, *label_map.shape), bool), np.zeros(1, np.int64))
            masks = np.zeros((1, *model_labels.shape), bool)
        if self.evaluating:
            prompts = eval_prompts(objects.masks, self.preprocessor, self.prompts, rng)
        else:
            prompts = simulate_prompts(objects.masks, self.preprocessor, self.prompts, rng)
        return {
            "pixel_values": self.preprocessor.pixel_values(pixels),
            "masks": torch.from_numpy(masks),
            "prompts": prompts,
            "object_present": torch.full((len(objects),), present),
            "class_ids": torch.from_numpy(class_ids(objects, self.mask_type) if present else objects.ids),
            "original_size": tuple(label_map.shape),
            "full_masks": list(objects.masks),
            "image_id": str(row.get("image_id") or f"{self.split}/{row_index}"),
            "domain": row.get("domain"),
            "dropped": dropped,
        }

    def _augment(
        self, pixels: torch.Tensor, label_map: torch.Tensor, objects: Objects, seed: int
    ) -> tuple[torch.Tensor, torch.Tensor, Objects, Counter]:
        """Augment image and label map together, then re-extract objects (so targets and prompts follow)."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for _ in range(AUGMENT_TRIES):
                new_pixels, new_labels = self.augment(pixels, label_map)
                new_map = new_labels.numpy()
                new_objects = extract_objects(new_map, mask_type=self.mask_type, min_object_area=self.min_object_area)
                if len(new_objects) or not len(objects):
                    break
            else:
                return pixels, label_map, objects, Counter()
        lost = np.setdiff1d(objects.ids, new_objects.ids)
        shrunk = int(np.isin(lost, new_map).sum())
        dropped = Counter({CUT_AWAY: len(lost) - shrunk, SHRUNK: shrunk})
        return new_pixels, new_labels, new_objects, +dropped


def collate_objects(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Batch items of `SegmentationDataset`: B images, N objects in all.

    Returns:
        `pixel_values` float32 (B, 3, S, S); `image_index` int64 (N,); `masks` bool (N, S, S); `point_coords`
        float32 (N, K, 2) and `point_labels` int64 (N, K), padded with label -10; `mask_inputs` float32
        (N, 1, S/4, S/4) only when the prompts have masks; `object_present` bool (N,); `class_ids` int64 (N,);
        `original_sizes` int64 (B, 2) as (H, W); `full_masks` N bool arrays (H_i, W_i); `image_ids` B str;
        `domains` B str or None; `dropped_objects` {reason: count} for this batch's random draws.
    """
    prompts: list[Prompts] = [item["prompts"] for item in items]
    coords, labels = pad_prompts([(p.point_coords, p.point_labels) for p in prompts])
    counts = [len(item["masks"]) for item in items]
    batch = {
        "pixel_values": torch.stack([item["pixel_values"] for item in items]),
        "image_index": torch.repeat_interleave(torch.arange(len(items)), torch.tensor(counts)),
        "masks": torch.cat([item["masks"] for item in items]),
        "point_coords": coords,
        "point_labels": labels,
        "object_present": torch.cat([item["object_present"] for item in items]),
        "class_ids": torch.cat([item["class_ids"] for item in items]).long(),
        "original_sizes": torch.tensor([item["original_size"] for item in items], dtype=torch.int64),
        "full_masks": [mask for item in items for mask in item["full_masks"]],
        "image_ids": [item["image_id"] for item in items],
        "domains": [item["domain"] for item in items],
        "dropped_objects": dict(sum((item["dropped"] for item in items), Counter())),
    }
    with_masks = [p.mask_inputs is not None for p in prompts]
    if any(with_masks):
        if not all(with_masks):
            raise ValueError("Some items have mask prompts and some not; use one PromptConfig for the whole dataset.")
        batch["mask_inputs"] = torch.cat([p.mask_inputs for p in prompts])
    return batch
