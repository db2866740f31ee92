"""Batches have the documented shapes, and workers do not change what comes out."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from sam2_peft.data import AugmentConfig, Preprocessor, PromptConfig, SegmentationDataset, collate_objects, load_source

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "data"
S = 64


@pytest.fixture(scope="module")
def splits():
    return load_source(EXAMPLES)


def _train(splits, **options):
    rows = splits["train"].select(range(4))
    return SegmentationDataset(
        rows, Preprocessor(image_size=S), augment=AugmentConfig(), prompts=PromptConfig(num_negative=1),
        max_objects_per_image=3, seed=7, **options,
    )


def test_sample_data_is_as_documented(splits):
    assert len(splits["train"]) == 24 and len(splits["val"]) == 8
    assert sum(p.stat().st_size for p in EXAMPLES.rglob("*") if p.is_file()) < 2_000_000


def test_collate_shapes(splits):
    dataset = _train(splits, keep_empty_images=True)
    batch = collate_objects([dataset[0], dataset[1], dataset[2]])
    n = len(batch["image_index"])
    assert batch["pixel_values"].shape == (3, 3, S, S) and batch["pixel_values"].dtype == torch.float32
    assert batch["image_index"].dtype == torch.int64 and batch["image_index"].tolist() == sorted(batch["image_index"].tolist())
    assert 3 <= n <= 9  # at most max_objects_per_image per image
    assert batch["masks"].shape == (n, S, S) and batch["masks"].dtype == torch.bool
    k = batch["point_coords"].shape[1]
    assert batch["point_coords"].shape == (n, k, 2) and batch["point_coords"].dtype == torch.float32
    assert batch["point_labels"].shape == (n, k) and batch["point_labels"].dtype == torch.int64
    assert set(batch["point_labels"].unique().tolist()) <= {-10, 0, 1, 2, 3}
    assert "mask_inputs" not in batch
    assert batch["object_present"].shape == (n,) and batch["object_present"].all()
    assert batch["class_ids"].tolist() == [1] * n
    assert batch["original_sizes"].tolist() == [[256, 256]] * 3
    assert len(batch["full_masks"]) == n and batch["full_masks"][0].shape == (256, 256)
    assert batch["image_ids"] == ["cells_train_000", "cells_train_001", "cells_train_002"]
    assert batch["domains"] == [None] * 3
    # Targets at model resolution are the full-resolution masks, resized nearest.
    full = torch.from_numpy(np.stack(batch["full_masks"])).float()[:, None]
    resized = torch.nn.functional.interpolate(full, size=(S, S), mode="nearest-exact")[:, 0].bool()
    assert torch.equal(resized, batch["masks"])
    assert dataset.changes_pixels


def test_mask_prompts_and_negatives(splits):
    rows = splits["train"].select(range(2))
    empty = rows.map(lambda row: {"mask": {"bytes": _empty_mask_png(), "path": None}}, features=rows.features)
    dataset = SegmentationDataset(
        empty, Preprocessor(image_size=S), keep_empty_images=True, prompts=PromptConfig(mask_prompts=True)
    )
    assert dataset.report.skipped == {"images without objects (kept as negatives)": 2}
    batch = collate_objects([dataset[0], dataset[1]])
    assert batch["object_present"].tolist() == [False, False] and batch["class_ids"].tolist() == [0, 0]
    assert not batch["masks"].any() and batch["mask_inputs"].shape == (2, 1, S // 4, S // 4)
    with pytest.raises(ValueError, match="no usable image"):
        SegmentationDataset(empty, Preprocessor(image_size=S))


def _empty_mask_png() -> bytes:
    import io

    import PIL.Image

    buffer = io.BytesIO()
    PIL.Image.fromarray(np.zeros((256, 256), np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def _batches(dataset, workers: int, epoch: int):
    dataset.set_epoch(epoch)
    loader = DataLoader(
        dataset, batch_size=2, shuffle=True, num_workers=workers, collate_fn=collate_objects,
        generator=torch.Generator().manual_seed(epoch),
    )
    return list(loader)


def test_workers_give_the_same_batches(splits):
    dataset = _train(splits)
    serial, parallel = _batches(dataset, 0, epoch=1), _batches(dataset, 2, epoch=1)
    for a, b, c in zip(serial, parallel, _batches(dataset, 2, epoch=1), strict=True):
        for key in ("image_index", "masks", "point_coords", "point_labels"):
            assert torch.equal(a[key], b[key]), key
        assert a["image_ids"] == b["image_ids"] and a["dropped_objects"] == b["dropped_objects"]
        # Workers run torch single-threaded, and multithreaded float kernels may round the last bit differently:
        # pixels agree to float precision across worker counts, and bit for bit for the same count.
        torch.testing.assert_close(a["pixel_values"], b["pixel_values"], atol=1e-6, rtol=0)
        assert torch.equal(b["pixel_values"], c["pixel_values"])
    other_epoch = _batches(dataset, 0, epoch=2)
    assert not torch.equal(serial[0]["pixel_values"], other_epoch[0]["pixel_values"])


def test_eval_dataset_is_deterministic(splits):
    dataset = SegmentationDataset(splits["val"].select(range(2)), Preprocessor(image_size=S), prompts="points:3")
    first = dataset[1]
    dataset.set_epoch(5)
    again = dataset[1]
    assert torch.equal(first["prompts"].point_coords, again["prompts"].point_coords)
    assert first["prompts"].point_coords.shape[1:] == (3, 2)
    assert not dataset.changes_pixels
    with pytest.raises(ValueError, match="evaluation takes `augment=None`"):
        SegmentationDataset(splits["val"], Preprocessor(image_size=S), prompts="box", augment=AugmentConfig())


def _draw(dataset, index: int, epoch: int) -> dict:
    dataset.set_epoch(epoch)
    return dataset[index]


def test_augment_views_repeat_the_pixels_but_not_the_prompts(splits):
    dataset = _train(splits)
    default = _draw(dataset, 2, epoch=5)
    dataset.augment_views = 2
    first, second = _draw(dataset, 1, epoch=3), _draw(dataset, 1, epoch=5)
    # The view a feature cache stored stays valid: same pixels, hence the same targets...
    assert torch.equal(first["pixel_values"], second["pixel_values"])
    # ...while prompts (box jitter and clicks) are drawn anew each epoch.
    assert not torch.equal(first["prompts"].point_coords, second["prompts"].point_coords)
    # The other view is another augmentation.
    assert not torch.equal(first["pixel_values"], _draw(dataset, 1, epoch=4)["pixel_values"])
    # The same (epoch, index) always gives the same item, whatever was drawn in between.
    again = _draw(dataset, 1, epoch=3)
    for key in ("pixel_values", "masks", "class_ids"):
        assert torch.equal(first[key], again[key]), key
    assert torch.equal(first["prompts"].point_coords, again["prompts"].point_coords)
    assert torch.equal(first["prompts"].point_labels, again["prompts"].point_labels)
    # One view per epoch is exactly the default draw, so runs without a feature cache are unchanged.
    dataset.augment_views = 1_000
    same = _draw(dataset, 2, epoch=5)
    assert torch.equal(default["pixel_values"], same["pixel_values"])
    assert torch.equal(default["prompts"].point_coords, same["prompts"].point_coords)


def test_objects_too_small_for_the_model_are_still_scored_in_evaluation(tmp_path):
    import PIL.Image

    from sam2_peft.data import load_source

    # A 1024-px image with one 2x8-pixel object: at 256 px it vanishes, yet evaluation must still score it.
    for split in ("train", "val"):
        (tmp_path / split / "images").mkdir(parents=True)
        (tmp_path / split / "masks").mkdir(parents=True)
        image = np.random.default_rng(0).integers(0, 255, (1024, 1024), dtype=np.uint8)
        mask = np.zeros((1024, 1024), np.uint8)
        mask[500:502, 300:308] = 1
        mask[100:400, 100:400] = 2
        PIL.Image.fromarray(image).save(tmp_path / split / "images" / "a.png")
        PIL.Image.fromarray(mask).save(tmp_path / split / "masks" / "a.png")
    splits = load_source(tmp_path)
    for prompt in ("box", "point", "points:2"):
        item = SegmentationDataset(splits["val"], Preprocessor(image_size=256), prompts=prompt)[0]
        assert len(item["full_masks"]) == 2 and item["full_masks"][0].sum() == 16
        assert item["object_present"].all() and item["dropped"] == {}
    train = SegmentationDataset(splits["train"], Preprocessor(image_size=256))[0]
    assert len(train["full_masks"]) == 1 and train["dropped"] == {"objects that vanish at model resolution": 1}
