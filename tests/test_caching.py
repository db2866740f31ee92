import pytest
import torch

from sam2_peft.caching import FeatureCache, PrefixCache, first_trainable_block, pixel_checksum, plan_cache
from sam2_peft.family import encode_from_prefix, encode_prefix
from sam2_peft.interactive import InteractiveSegmenter
from sam2_peft.losses import LossWeights
from sam2_peft.models import load_sam2, model_fingerprint
from sam2_peft.segmenter import Sam2Segmenter
from sam2_peft.strategies import apply_strategy
from sam2_peft.training import build_optimizer, compute_loss

PREPROCESSING = "size=256, imagenet"


@pytest.fixture
def train_batch(tiny_batch):
    """`tiny_batch` with image ids and targets, as `collate_objects` would give it."""
    masks = torch.zeros(3, 256, 256, dtype=torch.bool)
    masks[0, 20:120, 10:100] = masks[1, 50:210, 50:200] = masks[2, 6:80, 5:70] = True
    return {**tiny_batch, "image_ids": ["a", "b"], "masks": masks, "object_present": torch.ones(3, dtype=torch.bool)}


def train_losses(strategy: str, batch: dict, steps: int, cache_class=None, **options) -> tuple[list[float], object]:
    """Train `steps` steps on the same batch (as over epochs) and return the losses and the cache."""
    model = apply_strategy(load_sam2("tiny-random"), strategy, **options)
    module = InteractiveSegmenter(model).train()
    optimizer = build_optimizer(model, learning_rate=1e-3, weight_decay=0.0)
    cache = None
    if cache_class is FeatureCache:
        cache = FeatureCache(model_fingerprint(model), PREPROCESSING)
    elif cache_class is PrefixCache:
        cache = PrefixCache(model_fingerprint(model), PREPROCESSING, first_trainable_block(model))
    losses = []
    for _ in range(steps):
        step_batch = dict(batch)
        if cache is not None:
            step_batch["image_features"] = cache.features(module.segmenter, batch)
        loss = compute_loss(module(step_batch), step_batch, LossWeights())["loss"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses, cache


# Entering the first block, mid-stage, right after a stage end, and only the neck left.
@pytest.mark.parametrize("start_block", [1, 4, 6, 8])
def test_prefix_path_matches_full_encoder(tiny_model, start_block):
    pixel_values = torch.randn(2, 3, 256, 256, generator=torch.Generator().manual_seed(4))
    encoder = tiny_model.vision_encoder
    with torch.no_grad():
        reference = encoder(pixel_values).fpn_hidden_states
        ours = encode_from_prefix(encoder, encode_prefix(encoder, pixel_values, start_block), start_block)
    assert [tuple(t.shape) for t in ours] == [(2, 64, 64, 64), (2, 64, 32, 32), (2, 64, 16, 16)]
    for mine, theirs in zip(ours, reference):
        torch.testing.assert_close(mine, theirs, rtol=0, atol=1e-6)


def test_prefix_keeps_only_the_stage_outputs_the_neck_needs(tiny_model):
    # tiny-random stage ends are blocks 0, 2, 5, 7; entering block 6 needs block 5's output (= the hidden state,
    # kept once) and the outputs of blocks 0 and 2.
    prefix = encode_prefix(tiny_model.vision_encoder, torch.randn(1, 3, 256, 256), 6)
    assert [tuple(t.shape) for t in prefix] == [(1, 16, 16, 96), (1, 64, 64, 24), (1, 32, 32, 48)]


def test_decoder_strategy_cached_training_matches_uncached(train_batch):
    plain, _ = train_losses("decoder", train_batch, steps=3)
    cached, cache = train_losses("decoder", train_batch, steps=3, cache_class=FeatureCache)
    assert (cache.misses, cache.hits) == (2, 4)
    assert plain[0] != plain[2]  # the decoder learns, so equal losses are not trivially equal
    torch.testing.assert_close(torch.tensor(cached), torch.tensor(plain), rtol=1e-5, atol=1e-6)


def test_partial_strategy_prefix_cached_training_matches_uncached(train_batch):
    plain, _ = train_losses("partial", train_batch, steps=2, num_blocks=2)
    cached, cache = train_losses("partial", train_batch, steps=2, cache_class=PrefixCache, num_blocks=2)
    assert cache.start_block == 6 and (cache.misses, cache.hits) == (2, 2)
    torch.testing.assert_close(torch.tensor(cached), torch.tensor(plain), rtol=1e-5, atol=1e-6)


def test_cache_misses_when_model_preprocessing_view_or_autocast_change(tiny_model, train_batch):
    segmenter = Sam2Segmenter(tiny_model)
    fingerprint = model_fingerprint(tiny_model)
    cache = FeatureCache(fingerprint, PREPROCESSING)
    first = cache.features(segmenter, train_batch)
    again = cache.features(segmenter, train_batch)
    assert (cache.misses, cache.hits) == (2, 2)
    for one, other in zip(first, again):
        torch.testing.assert_close(one, other, rtol=0, atol=0)

    cache.features(segmenter, train_batch, view=1)
    assert cache.misses == 4
    with torch.no_grad():
        tiny_model.vision_encoder.neck.convs[0].bias.add_(1.0)
    changed = FeatureCache(model_fingerprint(tiny_model), PREPROCESSING)
    assert changed.namespace() != cache.namespace()
    assert FeatureCache(fingerprint, PREPROCESSING + ", hflip").namespace() != cache.namespace()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cache.features(segmenter, train_batch)
    assert cache.misses == 6


def test_one_image_gets_the_cached_tensors_and_several_get_a_stack(tiny_model, train_batch):
    """A one-image batch reads the in-memory entry as it is (no 84 MB copy per 1024-px step); several images are
    stacked into new tensors, equal to their entries."""
    segmenter = Sam2Segmenter(tiny_model)
    cache = FeatureCache(model_fingerprint(tiny_model), PREPROCESSING)
    both = cache.features(segmenter, train_batch)
    first = {**train_batch, "pixel_values": train_batch["pixel_values"][:1], "image_ids": train_batch["image_ids"][:1]}
    alone, again = cache.features(segmenter, first), cache.features(segmenter, first)
    assert (cache.misses, cache.hits) == (2, 2)
    for level, (stacked, one, other) in enumerate(zip(both, alone, again)):
        assert one.shape == (1, *stacked.shape[1:]) and one.data_ptr() == other.data_ptr(), level
        assert one.data_ptr() != stacked.data_ptr()
        torch.testing.assert_close(one[0], stacked[0], rtol=0, atol=0)
    assert cache.features(segmenter, train_batch)[0].data_ptr() != both[0].data_ptr()


def test_disk_cache_survives_a_new_instance_and_catches_replaced_pixels(tiny_model, train_batch, tmp_path):
    segmenter = Sam2Segmenter(tiny_model)
    fingerprint = model_fingerprint(tiny_model)
    written = FeatureCache(fingerprint, PREPROCESSING, tmp_path, dtype=torch.bfloat16).features(segmenter, train_batch)
    assert len(list(tmp_path.glob("features-*/*.safetensors"))) == 2

    reader = FeatureCache(fingerprint, PREPROCESSING, tmp_path)
    read = reader.features(segmenter, train_batch)
    assert (reader.misses, reader.hits) == (0, 2)
    assert [t.dtype for t in read] == [torch.float32] * 3
    for one, other in zip(read, written):
        torch.testing.assert_close(one, other, rtol=0, atol=0)
    with torch.no_grad():
        reference = segmenter.encode_images(train_batch["pixel_values"])
    torch.testing.assert_close(read[2], reference[2], rtol=1e-2, atol=1e-2)  # bfloat16 storage

    # Image "b" replaced under the same id: its entry is stale and re-encoded.
    flipped = {**train_batch, "pixel_values": train_batch["pixel_values"].clone()}
    flipped["pixel_values"][1] = flipped["pixel_values"][1].flip(-1)
    assert not torch.allclose(pixel_checksum(flipped["pixel_values"]), pixel_checksum(train_batch["pixel_values"]))
    reader.features(segmenter, flipped)
    assert (reader.stale, reader.hits) == (1, 3)


def test_plan_says_which_cache_applies_and_cycles_views():
    decoder = apply_strategy(load_sam2("tiny-random"), "decoder")
    fixed = plan_cache(decoder, changes_pixels=False, num_images=10)
    assert (fixed.kind, fixed.num_views, fixed.view(5)) == ("features", 1, 0)
    assert "once per image" in fixed.message and "0.0 GB" in fixed.message

    augmented = plan_cache(decoder, changes_pixels=True, num_views=3)
    assert [augmented.view(e) for e in range(5)] == [0, 1, 2, 0, 1]
    assert "3 augmented view(s)" in augmented.message and "--cache_features false" in augmented.message

    off = plan_cache(decoder, changes_pixels=True, enabled=False)
    assert off.kind is None and off.build("x", "y") is None and off.view(7) == 0

    partial = plan_cache(apply_strategy(load_sam2("tiny-random"), "partial", num_blocks=2), changes_pixels=False)
    assert (partial.kind, partial.start_block) == ("prefix", 6)
    assert isinstance(partial.build("x", "y"), PrefixCache)

    lora = plan_cache(apply_strategy(load_sam2("tiny-random"), "lora"), changes_pixels=False)
    assert lora.kind is None and "blocks.0.attn.qkv" in lora.message
    with pytest.raises(ValueError, match="--cache_views 0"):
        plan_cache(decoder, changes_pixels=True, num_views=0)
