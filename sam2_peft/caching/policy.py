"""Feature-cache policy: whether a frozen part of the image encoder may be cached, which cache, how many views.

    plan = plan_cache(model, changes_pixels=train_set.changes_pixels, num_views=cfg.cache_views)
    logger.info(plan.message)                                   # says plainly what is cached, or why nothing is
    cache = plan.build(base_fingerprint, preprocessing_key(train_set), directory=cfg.cache_dir)

Decoder strategy (no trainable parameter in `vision_encoder`): the `FeatureCache` of the FPN maps. Partial strategy
(or an adapter on the last blocks only): the `PrefixCache` of the activations before the first trainable block.
Anything training in the patch or positional embeddings leaves no frozen prefix: no cache. Augmentation that
changes the pixels makes a single entry per image wrong, so the plan keeps a few augmented views per image and
the augmentation draws repeat every `num_views` epochs.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from sam2_peft.caching.storage import FeatureCache, PrefixCache
from sam2_peft.family import image_trunk
from sam2_peft.segmenter import base_sam2

# Augmented views kept per image when augmentation changes pixels: the encoder runs this many times per image over
# the whole run, and the decoder still sees this many different draws of each image.
DEFAULT_CACHE_VIEWS = 4


def trainable_encoder_parameters(model: nn.Module) -> list[str]:
    """Names (under `vision_encoder.`) of the image encoder's trainable parameters, adapters included."""
    encoder = base_sam2(model).vision_encoder
    return [name for name, param in encoder.named_parameters() if param.requires_grad]


def first_trainable_block(model: nn.Module) -> int | None:
    """Index of the first encoder block that trains, `len(blocks)` if only the neck trains, None if nothing does.

    0 also when the patch or positional embeddings train: then no prefix of the encoder is frozen.
    """
    if not trainable_encoder_parameters(model):
        return None
    trunk = image_trunk(base_sam2(model).vision_encoder)
    start = trunk.first_trainable()
    return len(trunk.blocks) if start is None else start


@dataclass(frozen=True)
class CachePlan:
    """What `plan_cache` decided: which cache applies, how many views, and the log line that says so.

    Attributes:
        kind: "features" (frozen encoder), "prefix" (frozen leading blocks) or None (no cache).
        start_block: for "prefix", the first trainable encoder block.
        num_views: augmented views cached per image; 1 when the training pixels never change.
        message: one plain-language sentence for the log.
    """

    kind: str | None
    start_block: int | None
    num_views: int
    message: str

    def view(self, epoch: int) -> int:
        """The view index of `epoch`'s images, for `FeatureCache.features(..., view=)`."""
        return epoch % self.num_views if self.kind and self.num_views > 1 else 0

    def build(self, encoder_fingerprint: str, preprocessing_key: str, directory=None, **options):
        """The `FeatureCache` or `PrefixCache` this plan calls for, or None; options as `FeatureCache`."""
        if self.kind == "features":
            return FeatureCache(encoder_fingerprint, preprocessing_key, directory, **options)
        if self.kind == "prefix":
            return PrefixCache(encoder_fingerprint, preprocessing_key, self.start_block, directory, **options)
        return None


def plan_cache(
    model: nn.Module,
    *,
    changes_pixels: bool,
    enabled: bool = True,
    num_views: int = DEFAULT_CACHE_VIEWS,
    num_images: int | None = None,
) -> CachePlan:
    """Decide whether and what to cache for `model`'s trainable parameters and the training data.

    Args:
        model: the model after `apply_strategy`.
        changes_pixels: `train_set.changes_pixels` (augmentation that changes the image).
        enabled: the user's switch (`--cache_features`).
        num_views: augmented views to cache per image when `changes_pixels` (`--cache_views`).
        num_images: training images, to state the memory the cache will take.

    Example:
        >>> plan = plan_cache(apply_strategy(load_sam2("tiny-random"), "decoder"), changes_pixels=False)
        >>> plan.kind, plan.num_views
        ('features', 1)
    """
    if num_views < 1:
        raise ValueError(f"--cache_views {num_views}: must be at least 1 (1 = one fixed augmented draw per image).")
    if not enabled:
        message = "Feature cache: off (--cache_features false); the image encoder runs on every step."
        return CachePlan(None, None, 1, message)
    start = first_trainable_block(model)
    trunk = image_trunk(base_sam2(model).vision_encoder)
    blocks = len(trunk.blocks)
    if start == 0:
        first = trainable_encoder_parameters(model)[0]
        return CachePlan(None, None, 1, f"Feature cache: off: vision_encoder.{first} trains, so no part of the "
                                        "image encoder is frozen; it runs on every step.")
    kind = "features" if start is None else "prefix"
    what = (
        "the image encoder is frozen, so its features are computed once per image"
        if kind == "features"
        else f"{trunk.name} blocks 0-{start - 1} are frozen, so their activations are computed once per image and "
        f"blocks {start}-{blocks - 1} and the neck run on every step"
    )
    views = num_views if changes_pixels else 1
    size = "" if num_images is None else f" (about {entry_gigabytes(model, kind, start) * num_images * views:.1f} GB)"
    if changes_pixels:
        how = (f"Augmentation changes the pixels, so the cache keeps {views} augmented view(s) per image{size}: the "
               f"augmentation draws repeat every {views} epoch(s) (--cache_views), and the encoder runs only in "
               f"the first {views}. Pass --cache_features false for a fresh draw every epoch.")
    else:
        how = f"The training images do not change between epochs; the cache holds one entry per image{size}."
    return CachePlan(kind, start, views, f"Feature cache: on ({kind}): {what}. {how}")


def entry_gigabytes(model: nn.Module, kind: str, start: int | None = None) -> float:
    """Bytes of one cache entry in float32, from the configuration alone, in GB."""
    sam = base_sam2(model)
    if kind == "features":
        sizes = sam.config.vision_config.backbone_feature_sizes[:3]
        elements = sam.config.vision_config.fpn_hidden_size * sum(height * width for height, width in sizes)
    else:
        trunk = image_trunk(sam.vision_encoder)
        side = sam.config.prompt_encoder_config.image_size
        stored = [end for end in sorted(trunk.stage_ends) if end < start - 1] + [start - 1]
        elements = sum(channels * (side // stride) ** 2 for channels, stride in map(trunk.block_output, stored))
    return elements * 4 / 1e9
