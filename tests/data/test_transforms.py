"""Preprocessing matches SAM2's own; intensities keep their range; bad masks raise naming the file."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from data_helpers import write_pair

from sam2_peft.data import DataError, IntensityConfig, Preprocessor, decode_row, load_source, normalize_intensity
from sam2_peft.models import build_image_processor, load_sam2


@pytest.fixture(scope="module")
def rgb_image() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (37, 53, 3), dtype=np.uint8)  # non-square, odd sizes


def test_pixels_match_sam2_image_processor(rgb_image):
    processor = build_image_processor(load_sam2("tiny-random"))
    preprocessor = Preprocessor.from_processor(processor)
    assert preprocessor.image_size == 256
    ours = preprocessor.pixel_values(torch.from_numpy(normalize_intensity(rgb_image)))
    theirs = processor(images=rgb_image, return_tensors="pt")["pixel_values"][0]
    assert ours.shape == theirs.shape == (3, 256, 256)
    # The processor resizes uint8 (torchvision's fixed-point kernel, rounding to whole levels) before normalising; we
    # resize floats, as official SAM2 does. So they differ by at most one 8-bit level: 1 / 255 / min(std).
    tolerance = 1 / 255 / min(preprocessor.image_std) + 1e-5
    assert (ours - theirs).abs().max() <= tolerance
    assert (ours - theirs).abs().mean() < tolerance / 2  # rounding to whole levels averages about a quarter level


def test_pixels_equal_official_sam2_transforms(rgb_image):
    transforms = pytest.importorskip("sam2.utils.transforms")
    official = transforms.SAM2Transforms(resolution=64, mask_threshold=0.0)(rgb_image)
    ours = Preprocessor(image_size=64).pixel_values(torch.from_numpy(normalize_intensity(rgb_image)))
    torch.testing.assert_close(ours, official, atol=1e-5, rtol=0)


def test_labels_match_processor_nearest_resize():
    processor = build_image_processor(load_sam2("tiny-random"))
    labels = np.random.default_rng(1).integers(0, 5, (37, 53)).astype(np.uint8)
    theirs = processor(
        images=np.zeros((37, 53, 3), np.uint8), segmentation_maps=labels, mask_size={"height": 256, "width": 256},
        return_tensors="pt",
    )["labels"][0]
    ours = Preprocessor(image_size=256).resize_labels(torch.from_numpy(labels).long())
    torch.testing.assert_close(ours, theirs)


def test_coordinates_scale_per_axis():
    coords = Preprocessor(image_size=256).scale_coords(torch.tensor([[10.0, 20.0]]), original_size=(128, 512))
    torch.testing.assert_close(coords, torch.tensor([[5.0, 40.0]]))


def test_16_bit_keeps_its_levels():
    # 12 adjacent 16-bit levels would collapse to at most one or two 8-bit levels.
    image = (30000 + np.arange(12, dtype=np.uint16)).reshape(3, 4)[:, :, None]
    out = normalize_intensity(image, IntensityConfig(mode="minmax"))
    assert out.dtype == np.float32 and out.shape == (3, 3, 4)
    np.testing.assert_allclose(out[0].ravel(), np.arange(12) / 11, atol=1e-6)
    ranged = normalize_intensity(image, IntensityConfig(mode="range"))
    assert len(np.unique(ranged[0])) == 12
    np.testing.assert_allclose(ranged[0].ravel(), (30000 + np.arange(12)) / 65535, rtol=1e-6)


def test_float_and_percentile_and_windows():
    image = np.linspace(-1000, 1000, 201, dtype=np.float32).reshape(1, 201, 1)
    auto = normalize_intensity(image)  # float: percentile (0.5, 99.5)
    assert len(np.unique(auto[0])) > 190
    low, high = np.percentile(image, (0.5, 99.5))
    np.testing.assert_allclose(auto[0, 0], np.clip((image[0, :, 0] - low) / (high - low), 0, 1), atol=1e-6)
    lung = normalize_intensity(image, IntensityConfig(mode="window", window="lung"))[0, 0]  # level -600, width 1500
    np.testing.assert_allclose(lung, np.clip((image[0, :, 0] + 1350) / 1500, 0, 1), atol=1e-6)
    with pytest.raises(DataError, match="not a preset"):
        IntensityConfig(mode="window", window="brain")


def test_rgba_and_gray_become_rgb():
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 255, 7
    out = normalize_intensity(rgba)
    np.testing.assert_array_equal(out[:, 0, 0], [1.0, 0.0, 0.0])
    gray = normalize_intensity(np.full((2, 2, 1), 51, np.uint8))
    np.testing.assert_allclose(gray, 0.2)


def _bad_mask_row(tmp_path, mask: np.ndarray, image_size=(8, 8)):
    import tifffile

    write_pair(tmp_path, "x", np.zeros(image_size, np.uint8), np.zeros(image_size, np.uint8))
    (tmp_path / "masks" / "x.png").unlink()
    tifffile.imwrite(tmp_path / "masks" / "x.tif", mask)
    return load_source(tmp_path, val_fraction=0)["train"][0]


@pytest.mark.parametrize(
    ("mask", "message"),
    [
        (np.zeros((6, 8), np.uint8), "image is 8x8 .* mask is 6x8"),
        (np.full((8, 8), 0.7, np.float32), "float mask with fractional values"),
        (np.full((8, 8), -1, np.int16), "negative values"),
        (np.stack([np.zeros((8, 8)), np.ones((8, 8)), np.zeros((8, 8))], -1).astype(np.uint8), "colour-coded"),
    ],
)
def test_bad_masks_name_the_file(tmp_path, mask, message):
    row = _bad_mask_row(tmp_path, mask)
    with pytest.raises(DataError, match=message) as error:
        decode_row(row, where="train")
    assert "x.png" in str(error.value) or "x.tif" in str(error.value)


def test_semantic_classes_beyond_num_classes(tmp_path):
    row = _bad_mask_row(tmp_path, np.full((8, 8), 4, np.uint8))
    with pytest.raises(DataError, match="class id 4 but num_classes=3"):
        decode_row(row, where="train", mask_type="semantic", num_classes=3)
    decode_row(row, where="train", mask_type="semantic", num_classes=4)
