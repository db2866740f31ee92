"""What differs between an image run and a video run; `finetune` runs the same lifecycle over either.

    task = TASKS[cfg.task]                      # ImageTask() or VideoTask()
    splits = task.load_splits(cfg)
    parts = task.build(cfg, model, splits, base_fingerprint, accelerator)   # datasets, collate, module, caches
    outputs = task.forward(run, batch, generator)   # one micro-batch, under autocast
    losses = task.loss(outputs, batch, cfg, num_objects)
    scores = task.validate(run, correction_rounds)

An image batch is the dict of `collate_objects`, run by `InteractiveSegmenter`; a video batch is the list of clips of
`collate_clips`, run by `video.ClipSegmenter` (prompts on each clip's first frame, the rest tracked).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from accelerate.utils import DistributedType
from torch import nn

from sam2_peft.caching import CachePlan, FrameCache, plan_cache, preprocessing_key
from sam2_peft.caching.policy import entry_gigabytes
from sam2_peft.data import AugmentConfig, Preprocessor, PromptConfig, SegmentationDataset, collate_objects
from sam2_peft.data.clips import ClipDataset, collate_clips
from sam2_peft.interactive import InteractiveSegmenter
from sam2_peft.training import compute_loss, loss_weights, validate
from sam2_peft.video.training import ClipSegmenter, validate_clips, video_loss


# A cache runs the frozen encoder outside the training module's forward, where FSDP holds only a shard of it.
UNCACHED_UNDER_FSDP = ("Feature cache: off under FSDP (it would run the sharded encoder outside the module's "
                       "forward); the frozen image encoder runs every step.")


@dataclass
class RunParts:
    """What a task builds for a run: the datasets, their collate, the module to prepare, the caches."""

    train_set: torch.utils.data.Dataset
    val_set: torch.utils.data.Dataset
    collate: object
    module: nn.Module
    message: str  # what is cached (or how the frozen encoder runs), for the log
    plan: CachePlan | None = None
    train_cache: object = None
    val_cache: object = None


def _prompts(cfg) -> PromptConfig:
    return PromptConfig(box_prob=cfg.box_probability, box_noise=cfg.box_jitter, num_positive=cfg.num_points)


class ImageTask:
    """Images, each with any number of objects, prompted and segmented independently."""

    name = "image"

    def load_splits(self, cfg):
        return cfg.load_splits(seed=cfg.seed)

    def build(self, cfg, model: nn.Module, splits, base_fingerprint: str, accelerator) -> RunParts:
        module = InteractiveSegmenter(model, backend=cfg.backend)
        if cfg.compile:
            module.segmenter.compile_decoder()
        preprocessor = Preprocessor.from_model(model)
        common = dict(mask_type=cfg.mask_type, num_classes=cfg.num_classes, min_object_area=cfg.min_object_area,
                      max_objects_per_image=cfg.max_objects_per_image, intensity=cfg.intensity_config(), seed=cfg.seed)
        train_set = SegmentationDataset(splits["train"], preprocessor, keep_empty_images=cfg.keep_empty_images,
                                        augment=AugmentConfig() if cfg.augment else None, prompts=_prompts(cfg),
                                        split="train", skipped=splits.skipped["train"], **common)
        val_set = SegmentationDataset(splits["val"], preprocessor, prompts="box", split="val",
                                      skipped=splits.skipped["val"], **common)
        if accelerator.distributed_type == DistributedType.FSDP:
            plan = CachePlan(None, None, 1, UNCACHED_UNDER_FSDP)
        else:
            plan = plan_cache(model, changes_pixels=train_set.changes_pixels, enabled=cfg.cache_features,
                              num_views=cfg.cache_views, num_images=len(train_set))
        if plan.kind is not None and train_set.changes_pixels:
            train_set.augment_views = plan.num_views
        return RunParts(
            train_set=train_set, val_set=val_set, collate=collate_objects, module=module, message=plan.message,
            plan=plan,
            train_cache=plan.build(base_fingerprint, preprocessing_key(train_set), directory=cfg.cache_dir),
            val_cache=plan.build(base_fingerprint, preprocessing_key(val_set), directory=cfg.cache_dir),
        )  # fmt: skip

    def prepare_batch(self, run, batch, validating: bool = False) -> None:
        """Attach cached encoder output to `batch` (the cache computes what it lacks)."""
        cache = run.parts.val_cache if validating else run.parts.train_cache
        if cache is not None:
            view = 0 if validating else run.parts.plan.view(run.state.epoch)
            cache.attach(run.accelerator.unwrap_model(run.module).segmenter, batch, view)

    def num_objects(self, batch) -> int:
        return len(batch["image_index"])

    def num_images(self, batch) -> tuple[int, int]:
        """(images, clips) in `batch`."""
        return len(batch["image_ids"]), 0

    def forward(self, run, batch, generator: torch.Generator):
        return run.module(batch, correction_rounds=run.cfg.correction_rounds, generator=generator)

    def loss(self, outputs, batch, cfg, num_objects: torch.Tensor) -> dict[str, torch.Tensor]:
        return compute_loss(outputs, batch, loss_weights(cfg), num_objects)

    def validate(self, run, correction_rounds: int) -> dict[str, float]:
        attach = None if run.parts.val_cache is None else (lambda batch: self.prepare_batch(run, batch, True))
        return validate(run.module, run.val_loader, run.accelerator, correction_rounds, attach, run.cfg.seed)


class VideoTask:
    """Clips of `clip_length` frames: objects prompted on the first frame and tracked through SAM2's memory."""

    name = "video"

    def load_splits(self, cfg):
        return cfg.load_clip_splits(seed=cfg.seed)

    def build(self, cfg, model: nn.Module, splits, base_fingerprint: str, accelerator) -> RunParts:
        preprocessor = Preprocessor.from_model(model)
        common = dict(mask_type=cfg.mask_type, min_object_area=cfg.min_object_area,
                      max_objects_per_clip=cfg.max_objects_per_image, intensity=cfg.intensity_config(), seed=cfg.seed)
        train_set = ClipDataset(splits["train"], preprocessor, clip_length=cfg.clip_length, prompts=_prompts(cfg),
                                split="train", **common)
        val_set = ClipDataset(splits["val"], preprocessor, prompts="box", split="val", **common)
        module = ClipSegmenter(model)
        frozen = not any(p.requires_grad for p in module.segmenter.sam.vision_encoder.parameters())
        parts = RunParts(train_set=train_set, val_set=val_set, collate=collate_clips, module=module, message="")
        if not frozen:
            parts.message = "Feature cache: off: the image encoder trains; each clip's frames are encoded every step."
        elif accelerator.distributed_type == DistributedType.FSDP:
            parts.message = UNCACHED_UNDER_FSDP
        elif not cfg.cache_features:
            parts.message = ("Feature cache: off (--cache_features false); the frozen image encoder runs on each "
                             "clip's frames every step, without autograd.")
        else:
            frames = sum(len(clip) for clip in train_set.clips) + sum(len(clip) for clip in val_set.clips)
            parts.message = (f"Feature cache: on (frames): the image encoder is frozen, so each frame's features are "
                             f"computed once (about {entry_gigabytes(model, 'features') * frames:.1f} GB for "
                             f"{frames} frames).")
            parts.train_cache, parts.val_cache = (
                FrameCache(base_fingerprint, preprocessing_key(clips), directory=cfg.cache_dir)
                for clips in (train_set, val_set)
            )
        return parts

    def prepare_batch(self, run, batch, validating: bool = False) -> None:
        """Attach the cached frame maps to each clip of `batch` (the cache computes what it lacks)."""
        cache = run.parts.val_cache if validating else run.parts.train_cache
        if cache is not None:
            with run.accelerator.autocast():  # the maps the uncached forward would compute, under the same autocast
                cache.attach(run.accelerator.unwrap_model(run.module).segmenter, batch)

    def num_objects(self, batch) -> int:
        return sum(len(clip["object_ids"]) for clip in batch)

    def num_images(self, batch) -> tuple[int, int]:
        """(frames, clips) in `batch`."""
        return sum(len(clip["pixel_values"]) for clip in batch), len(batch)

    def forward(self, run, batch, generator: torch.Generator):
        cfg = run.cfg
        return run.module(batch, correction_rounds=cfg.correction_rounds, correction_frames=cfg.correction_frames,
                          generator=generator)

    def loss(self, outputs, batch, cfg, num_objects: torch.Tensor) -> dict[str, torch.Tensor]:
        return video_loss(outputs, batch, loss_weights(cfg), num_objects)

    def validate(self, run, correction_rounds: int) -> dict[str, float]:
        attach = None if run.parts.val_cache is None else (lambda clips: self.prepare_batch(run, clips, True))
        return validate_clips(run.module, run.val_loader, run.accelerator, attach)


TASKS = {"image": ImageTask(), "video": VideoTask()}
