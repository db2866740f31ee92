"""Objects, boxes and prompts agree with plain numpy on random label maps, with and without augmentation."""

from __future__ import annotations

import datasets
import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from torch.nn import functional as F

from sam2_peft.data import (
    AugmentConfig,
    Preprocessor,
    PromptConfig,
    SegmentationDataset,
    extract_objects,
    mask_to_box,
    sample_correction_clicks,
)
from sam2_peft.data.io import encode_array

SIZE = 16
LEVEL = 60  # the image encodes its label map: pixel = LEVEL * label

label_maps = arrays(np.uint8, (SIZE, SIZE), elements=st.integers(0, 3))


def blocky(labels: np.ndarray) -> np.ndarray:
    """Upsample a 4x4 corner of labels into 4x4 blocks, so objects have interiors."""
    return np.kron(labels[:4, :4], np.ones((4, 4), np.uint8))


@settings(max_examples=25, deadline=None)
@given(label_maps, st.integers(0, 30))
def test_objects_and_boxes_match_numpy(labels, min_area):
    objects = extract_objects(labels, min_object_area=min_area)
    expected = [v for v in range(1, 4) if 0 < (labels == v).sum() >= min_area]
    assert objects.ids.tolist() == expected
    boxes = mask_to_box(objects.masks)
    for value, mask, box in zip(expected, objects.masks, boxes):
        np.testing.assert_array_equal(mask, labels == value)
        ys, xs = np.nonzero(labels == value)
        np.testing.assert_array_equal(box, [xs.min(), ys.min(), xs.max(), ys.max()])
    small = sum(1 for v in range(1, 4) if 0 < (labels == v).sum() < min_area)
    assert objects.dropped.get("objects under min_object_area", 0) == small


def _interior(mask: np.ndarray) -> np.ndarray:
    """Pixels whose 5x5 neighbourhood lies inside `mask` (away from bilinear blending at edges)."""
    eroded = -F.max_pool2d(-torch.from_numpy(mask).float()[None, None], 5, stride=1, padding=2)
    return eroded[0, 0].numpy() > 0


@settings(max_examples=15, deadline=None)
@given(label_maps, st.integers(0, 2**31 - 1), st.booleans())
def test_prompts_and_targets_follow_augmentation(labels, seed, augmented):
    labels = blocky(labels)
    # Encoded cells keep the uint8 dtype (nested lists would not), so the image is scaled by 1/255.
    rows = datasets.Dataset.from_dict(
        {"image": [encode_array(labels * LEVEL)], "mask": [encode_array(labels)]},
        features=datasets.Features(image=datasets.Image(decode=False), mask=datasets.Image(decode=False)),
    )
    preprocessor = Preprocessor(image_size=SIZE)  # no resize: targets are at the image's own resolution
    augment = AugmentConfig(brightness=0.0, contrast=0.0, gamma=None) if augmented else None
    prompts = PromptConfig(box_prob=0.5, box_noise=0.0, num_positive=2, num_negative=2)
    if not labels.any():
        return
    dataset = SegmentationDataset(rows, preprocessor, augment=augment, prompts=prompts, seed=seed)
    item = dataset[0]
    mean, std = torch.tensor(preprocessor.image_mean), torch.tensor(preprocessor.image_std)
    image = (item["pixel_values"] * std[:, None, None] + mean[:, None, None])[0].numpy() * 255 / LEVEL
    full = np.stack(item["full_masks"])
    np.testing.assert_array_equal(item["masks"].numpy(), full)
    assert not (full.sum(axis=0) > 1).any()
    for mask, coords, point_labels in zip(full, item["prompts"].point_coords, item["prompts"].point_labels):
        assert mask.any()
        values = image[_interior(mask)]
        if values.size:  # the image under an object shows one label, the same everywhere
            assert np.abs(values - values.mean()).max() < 1e-3 and values.mean() > 0.5
        ys, xs = np.nonzero(mask)
        for (x, y), label in zip(coords.tolist(), point_labels.tolist()):
            if label == 1:
                assert mask[int(y), int(x)]
            elif label == 0:
                assert not mask[int(y), int(x)]
        if point_labels[0] == 2:
            (x0, y0), (x1, y1) = coords[:2].tolist()
            assert x0 <= xs.min() and xs.max() <= x1 and y0 <= ys.min() and ys.max() <= y1
    background = image[_interior(~full.any(axis=0))]
    assert np.abs(background).max(initial=0) < 1e-3


def test_correction_clicks_land_in_the_error():
    target = torch.zeros(3, 8, 8, dtype=torch.bool)
    pred = torch.zeros(3, 8, 8, dtype=torch.bool)
    target[0, 2:6, 2:6] = True  # object 0: missed entirely -> positive click inside
    pred[1, 0:2, 0:8] = True  # object 1: spurious -> negative click in the spurious part
    target[2, 1:3, 1:3] = pred[2, 1:3, 1:3] = True  # object 2: perfect -> padding
    generator = torch.Generator().manual_seed(0)
    for method in ("uniform", "largest"):
        coords, labels = sample_correction_clicks(pred, target, generator, method=method)
        assert coords.shape == (3, 1, 2) and labels.tolist() == [[1], [0], [-10]]
        x, y = coords[0, 0].long().tolist()
        assert target[0, y, x]
        x, y = coords[1, 0].long().tolist()
        assert pred[1, y, x] and not target[1, y, x]


def test_largest_picks_the_bigger_error_region():
    target = torch.zeros(1, 8, 8, dtype=torch.bool)
    target[0, :, :6] = True  # 48 px
    pred = torch.zeros(1, 8, 8, dtype=torch.bool)
    pred[0, :, :2] = True  # misses 32 px
    pred[0, 0, 7] = True  # one false positive pixel
    labels = [sample_correction_clicks(pred, target, torch.Generator().manual_seed(s), "largest")[1].item() for s in range(20)]
    assert labels == [1] * 20
