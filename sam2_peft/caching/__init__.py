"""Frozen-encoder and frozen-prefix feature caches: a frozen part of the image encoder runs once per image view.

    plan = plan_cache(model, changes_pixels=train_set.changes_pixels, num_views=cfg.cache_views)
    logger.info(plan.message)                                   # says plainly what is cached, or why nothing is
    cache = plan.build(base_fingerprint, preprocessing_key(train_set), directory=cfg.cache_dir)
    for epoch in ...:
        train_set.augment_views = plan.num_views                # augmented views repeat every `num_views` epochs
        for batch in loader:
            batch["image_features"] = cache.features(segmenter, batch, view=plan.view(epoch))

`policy.py` decides what may be cached (`plan_cache`, `CachePlan` and its log message); `storage.py` keeps the
tensors (`FeatureCache`, `PrefixCache`: keys, pixel checksums, memory or safetensors files).
"""

from sam2_peft.caching.policy import (
    DEFAULT_CACHE_VIEWS,
    CachePlan,
    first_trainable_block,
    plan_cache,
    trainable_encoder_parameters,
)
from sam2_peft.caching.storage import FeatureCache, FrameCache, PrefixCache, pixel_checksum, preprocessing_key

__all__ = [
    "DEFAULT_CACHE_VIEWS",
    "CachePlan",
    "FeatureCache",
    "FrameCache",
    "PrefixCache",
    "first_trainable_block",
    "pixel_checksum",
    "plan_cache",
    "preprocessing_key",
    "trainable_encoder_parameters",
]
