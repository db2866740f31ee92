"""Each source loads to the right rows, and each broken input names its file or column."""

from __future__ import annotations

import json

import datasets
import numpy as np
import pytest
import torch
from data_helpers import random_pair, write_pair

from sam2_peft.data import (
    DataError,
    Preprocessor,
    SegmentationDataset,
    decode_row,
    inspect_dataset,
    load_source,
    normalize_intensity,
)


def test_folder_with_splits(folder_with_splits):
    splits = load_source(folder_with_splits)
    assert sorted(splits) == ["train", "val"]
    assert list(splits["train"]["image_id"]) == ["train0", "train1", "train2"]
    image, labels = decode_row(splits["val"][1], where="val")
    assert image.shape == (24, 24, 1) and image.dtype == np.uint8
    assert sorted(np.unique(labels)) == [0, 1, 2]


def test_folder_without_splits_holds_out_a_seeded_fraction(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(10):
        write_pair(tmp_path, f"im{i}", *random_pair(rng))
    first = load_source(tmp_path, val_fraction=0.3, seed=1)
    again = load_source(tmp_path, val_fraction=0.3, seed=1)
    assert len(first["train"]) == 7 and len(first["val"]) == 3
    assert list(first["val"]["image_id"]) == list(again["val"]["image_id"])
    assert sorted(list(first["train"]["image_id"]) + list(first["val"]["image_id"])) == sorted(f"im{i}" for i in range(10))
    assert sorted(load_source(tmp_path, val_fraction=0.0)) == ["train"]


def test_saved_dataset_with_custom_columns(tmp_path):
    rng = np.random.default_rng(0)
    pairs = [random_pair(rng) for _ in range(3)]
    rows = datasets.Dataset.from_dict(
        {"img": [p[0] for p in pairs], "label": [p[1].astype(np.int32) for p in pairs], "site": ["a", "b", "a"]},
    )
    datasets.DatasetDict(train=rows, validation=rows.select([0])).save_to_disk(tmp_path / "saved")
    splits = load_source(tmp_path / "saved", image_column="img", mask_column="label", domain_column="site")
    assert sorted(splits) == ["train", "val"] and len(splits["val"]) == 1
    assert list(splits["train"]["domain"]) == ["a", "b", "a"]
    image, labels = decode_row(splits["train"][2], where="train")
    np.testing.assert_array_equal(image[..., 0], pairs[2][0])
    np.testing.assert_array_equal(labels, pairs[2][1])


def _png_cell(array: np.ndarray) -> dict:
    import io

    import PIL.Image

    buffer = io.BytesIO()
    PIL.Image.fromarray(array).save(buffer, format="PNG")
    return {"bytes": buffer.getvalue(), "path": None}


@pytest.mark.parametrize(
    "image_feature",
    [
        datasets.List(datasets.List(datasets.List(datasets.Value("uint8")))),
        datasets.Sequence(datasets.Sequence(datasets.Sequence(datasets.Value("uint8")))),
        datasets.Array3D((20, 24, 3), "uint8"),
        "numpy format",
    ],
    ids=["list", "sequence", "array3d", "numpy-format"],
)
def test_8_bit_list_column_scales_like_the_image_feature(image_feature):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)
    image[0, 0] = (0, 0, 0)
    image[1, 1] = (90, 90, 90)  # percentile scaling would stretch these levels; /255 keeps them
    labels = np.zeros((20, 24), np.uint8)
    labels[4:12, 5:15] = 1
    as_image = datasets.Dataset.from_dict(
        {"image": [_png_cell(image)], "mask": [_png_cell(labels)]},
        features=datasets.Features(image=datasets.Image(), mask=datasets.Image()),
    )
    mask_feature = datasets.Array2D((20, 24), "uint8")
    if image_feature == "numpy format":  # a format set by the caller must not turn uint8 into int64 either
        as_lists = datasets.Dataset.from_dict({"image": [image], "mask": [labels]}).with_format("numpy")
    else:
        features = datasets.Features(image=image_feature, mask=mask_feature)
        as_lists = datasets.Dataset.from_dict({"image": [image.tolist()], "mask": [labels.tolist()]}, features=features)
    rows = [load_source(d, val_fraction=0)["train"] for d in (as_image, as_lists)]
    decoded = [decode_row(r[0], where="row") for r in rows]
    for got, got_labels in decoded:
        assert got.dtype == np.uint8
        np.testing.assert_array_equal(got, image)
        np.testing.assert_array_equal(got_labels, labels)
    np.testing.assert_array_equal(normalize_intensity(decoded[1][0]), image.transpose(2, 0, 1) / np.float32(255))
    items = [SegmentationDataset(r, Preprocessor(image_size=32), prompts="box")[0] for r in rows]
    assert torch.equal(items[0]["pixel_values"], items[1]["pixel_values"])
    assert torch.equal(items[0]["masks"], items[1]["masks"])


def test_ragged_list_cell_names_the_row():
    rows = datasets.Dataset.from_dict({"image": [[[1, 2], [3]]], "mask": [[[0, 1], [1, 0]]]})
    with pytest.raises(DataError, match="row 0.*column 'image'.*not a rectangular array"):
        inspect_dataset(rows, val_fraction=0)


def test_image_feature_keeps_16_bit(tmp_path):
    image = np.arange(24 * 24, dtype=np.uint16).reshape(24, 24) * 100
    write_pair(tmp_path / "src", "a", image, np.ones((24, 24), np.uint8))
    rows = datasets.Dataset.from_dict(
        {"image": [str(tmp_path / "src/images/a.png")], "mask": [str(tmp_path / "src/masks/a.png")]},
        features=datasets.Features(image=datasets.Image(), mask=datasets.Image()),
    )
    got, _ = decode_row(load_source(rows, val_fraction=0)["train"][0], where="row")
    np.testing.assert_array_equal(got[..., 0], image)


def test_coco_polygons_and_rle(tmp_path):
    from pycocotools import mask as mask_utils

    (tmp_path / "images").mkdir()
    import PIL.Image

    PIL.Image.fromarray(np.zeros((20, 30), np.uint8)).save(tmp_path / "images" / "a.png")
    square = np.zeros((20, 30), np.uint8, order="F")
    square[10:15, 20:28] = 1
    rle = mask_utils.encode(square)
    rle["counts"] = rle["counts"].decode()
    coco = {
        "images": [{"id": 7, "file_name": "a.png", "height": 20, "width": 30}],
        "annotations": [
            {"id": 1, "image_id": 7, "category_id": 1, "segmentation": [[2, 2, 8, 2, 8, 6, 2, 6]], "iscrowd": 0},
            {"id": 2, "image_id": 7, "category_id": 1, "segmentation": rle, "iscrowd": 0},
            {"id": 3, "image_id": 99, "category_id": 1, "segmentation": rle, "iscrowd": 0},  # no such image
        ],
        "categories": [{"id": 1, "name": "cell"}],
    }
    (tmp_path / "instances.json").write_text(json.dumps(coco))
    splits = load_source(tmp_path / "instances.json", val_fraction=0)
    _, labels = decode_row(splits["train"][0], where="coco")
    np.testing.assert_array_equal(labels == 2, square.astype(bool))
    ys, xs = np.nonzero(labels == 1)  # polygon (2,2)-(8,6): pycocotools rasterises its interior
    assert 2 <= xs.min() and xs.max() <= 8 and 2 <= ys.min() and ys.max() <= 6 and len(xs) >= 20
    report = inspect_dataset(tmp_path / "instances.json", val_fraction=0)
    assert report.splits["train"].skipped == {"COCO annotations of images not in 'images'": 1}


def test_coco_semantic_maps_hold_category_ids_and_hidden_annotations_are_counted(tmp_path):
    (tmp_path / "images").mkdir()
    import PIL.Image

    PIL.Image.fromarray(np.zeros((10, 10), np.uint8)).save(tmp_path / "images" / "b.png")

    def box(x0, y0, x1, y1):
        return [[x0, y0, x1, y0, x1, y1, x0, y1]]

    coco = {
        "images": [{"id": 1, "file_name": "b.png", "height": 10, "width": 10}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 3, "segmentation": box(0, 0, 4, 4)},
            {"id": 2, "image_id": 1, "category_id": 3, "segmentation": box(5, 5, 9, 9)},
            {"id": 3, "image_id": 1, "category_id": 7, "segmentation": box(6, 0, 9, 3)},
            {"id": 4, "image_id": 1, "category_id": 7, "segmentation": box(1, 1, 2, 2)},  # inside annotation 1
            {"id": 5, "image_id": 1, "category_id": 3, "segmentation": box(0, 0, 4, 4)},  # covers 1 and 4 again
            {"id": 6, "image_id": 1, "category_id": 7, "segmentation": [[3, 3, 3, 3, 3, 3]]},  # no area
        ],
    }
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(coco))
    _, semantic = decode_row(load_source(path, val_fraction=0, mask_type="semantic")["train"][0], where="coco")
    assert sorted(np.unique(semantic)) == [0, 3, 7]
    assert (semantic[0:4, 0:4] == 3).all() and (semantic[6:9, 6:9] == 3).all() and (semantic[0:3, 7:9] == 7).all()
    _, instance = decode_row(load_source(path, val_fraction=0)["train"][0], where="coco")
    assert sorted(np.unique(instance)) == [0, 2, 3, 5]  # annotations 1 and 4 lost every pixel to annotation 5
    empty = {"COCO annotations with an empty segmentation": 1}
    report = inspect_dataset(path, val_fraction=0)
    assert report.splits["train"].skipped == {**empty, "COCO annotations hidden by later overlapping ones": 2}
    # Semantically, annotation 1 lives on in annotation 5 (same class): only annotation 4's class 7 is lost there.
    semantic_report = inspect_dataset(path, val_fraction=0, mask_type="semantic")
    assert semantic_report.splits["train"].skipped == {**empty, "COCO annotations hidden by later overlapping ones": 1}
    assert semantic_report.splits["train"].class_counts == {3: 1, 7: 1}

    coco["annotations"][0]["category_id"] = 0
    path.write_text(json.dumps(coco))
    with pytest.raises(DataError, match="id=1 has category_id=0"):
        load_source(path, val_fraction=0, mask_type="semantic")


def test_nifti_slices_skip_and_count_empty(tmp_path):
    import nibabel

    volume = np.arange(6 * 5 * 4, dtype=np.int16).reshape(6, 5, 4) - 50
    labels = np.zeros((6, 5, 4), np.uint8)
    labels[1:3, 1:3, 1] = 1
    labels[2:4, 0:2, 3] = 2
    for folder, array in (("images", volume), ("masks", labels)):
        (tmp_path / folder).mkdir()
        nibabel.save(nibabel.Nifti1Image(array, np.eye(4)), tmp_path / folder / "ct.nii.gz")
    splits = load_source(tmp_path, val_fraction=0, nifti_axis=2)
    assert list(splits["train"]["image_id"]) == ["ct/2:1", "ct/2:3"]
    image, got = decode_row(splits["train"][1], where="nifti")
    np.testing.assert_array_equal(image[..., 0], volume[:, :, 3])  # int16 values survive
    np.testing.assert_array_equal(got, labels[:, :, 3])
    assert inspect_dataset(tmp_path, val_fraction=0).splits["train"].skipped == {"empty slices (NIfTI)": 2}


def test_image_without_mask_names_the_file(tmp_path):
    rng = np.random.default_rng(0)
    write_pair(tmp_path, "a", *random_pair(rng))
    (tmp_path / "masks" / "a.png").rename(tmp_path / "masks" / "b.png")
    with pytest.raises(DataError, match=r"a\.png"):
        load_source(tmp_path)


def test_empty_folder(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    with pytest.raises(DataError, match="holds no images"):
        load_source(tmp_path)


def test_missing_column_names_it(tmp_path):
    rows = datasets.Dataset.from_dict({"image": [np.zeros((4, 4), np.uint8)], "seg": [np.zeros((4, 4), np.uint8)]})
    with pytest.raises(DataError, match="mask_column='mask'.*'seg'"):
        load_source(rows)


def test_corrupt_file_names_it(tmp_path):
    rng = np.random.default_rng(0)
    write_pair(tmp_path, "a", *random_pair(rng))
    (tmp_path / "images" / "a.png").write_bytes(b"not a png")
    splits = load_source(tmp_path, val_fraction=0)
    with pytest.raises(DataError, match=r"images/a\.png.*cannot be read"):
        inspect_dataset(splits)


def test_report_counts(folder_with_splits):
    report = inspect_dataset(folder_with_splits, min_object_area=50)
    train = report.splits["train"]
    # Rectangles of 6x7 = 42 px (too small) and 8x8 = 64 px in every image.
    assert train.objects_per_row == [1, 1, 1]
    assert train.skipped == {"objects under min_object_area": 3}
    assert "train: 3 images, 3 usable, 3 objects" in str(report)


def test_nifti_hold_out_keeps_each_volume_on_one_side(tmp_path):
    import nibabel

    for folder in ("images", "masks"):
        (tmp_path / folder).mkdir()
    for name in ("a", "b", "c", "d"):
        labels = np.zeros((8, 8, 5), np.uint8)
        labels[2:5, 2:5, :] = 1  # an object on every slice
        nibabel.save(nibabel.Nifti1Image(np.ones((8, 8, 5), np.int16), np.eye(4)), tmp_path / "images" / f"{name}.nii.gz")
        nibabel.save(nibabel.Nifti1Image(labels, np.eye(4)), tmp_path / "masks" / f"{name}.nii.gz")
    splits = load_source(tmp_path, val_fraction=0.25, seed=3)
    volumes = {split: {image_id.split("/")[0] for image_id in splits[split]["image_id"]} for split in ("train", "val")}
    assert volumes["train"].isdisjoint(volumes["val"])
    assert len(volumes["val"]) == 1 and len(splits["val"]) == 5 and len(splits["train"]) == 15


def test_conversions_are_cached_until_the_source_file_changes(tmp_path, monkeypatch):
    import PIL.Image

    from sam2_peft.data import annotations

    (tmp_path / "images").mkdir()
    PIL.Image.fromarray(np.zeros((10, 10), np.uint8)).save(tmp_path / "images" / "c.png")
    box = [[1, 1, 4, 1, 4, 4, 1, 4]]
    coco = {
        "images": [{"id": 1, "file_name": "c.png", "height": 10, "width": 10}],
        "annotations": [{"id": 1, "image_id": 1, "segmentation": box}, {"id": 2, "image_id": 5, "segmentation": box}],
    }
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(coco))
    first, first_skipped = annotations.load_coco(path)
    assert first.cache_files, "the conversion should live in an Arrow file, not in memory"
    lost = {"COCO annotations of images not in 'images'": 1}

    def must_not_run(**kwargs):
        raise AssertionError("an unchanged source was converted again")

    must_not_run.__name__ = annotations._coco_rows.__name__
    real = annotations._coco_rows
    monkeypatch.setattr(annotations, "_coco_rows", must_not_run)
    again, again_skipped = annotations.load_coco(path)
    assert again.cache_files == first.cache_files and again["image_id"] == ["c"]
    assert again_skipped == first_skipped == lost  # a cache hit reports what the first conversion skipped
    assert load_source(path, val_fraction=0).skipped == {"train": lost}

    coco["annotations"].append({"id": 3, "image_id": 1, "segmentation": [[6, 6, 9, 6, 9, 9, 6, 9]]})
    path.write_text(json.dumps(coco))
    with pytest.raises(AssertionError, match="converted again"):  # a changed file is converted again...
        annotations.load_coco(path)
    monkeypatch.setattr(annotations, "_coco_rows", real)
    changed = annotations.load_coco(path).rows  # ...into a new cache entry, with the new annotation
    assert changed.cache_files != first.cache_files
    _, labels = decode_row(changed[0], where="coco")
    assert sorted(np.unique(labels)) == [0, 1, 2]
    coco["annotations"] = [{**ann, "category_id": 4} for ann in coco["annotations"]]
    path.write_text(json.dumps(coco))
    instance = annotations.load_coco(path).rows
    assert annotations.load_coco(path, mask_type="semantic").rows.cache_files != instance.cache_files  # options count

    # Image paths are stored absolute, and checked on every load: a cached conversion does not hide a lost image.
    monkeypatch.chdir(tmp_path)
    relative = annotations.load_coco("instances.json", image_dir="images").rows
    monkeypatch.chdir(tmp_path.parent)
    absolute = annotations.load_coco(tmp_path / "instances.json", image_dir=tmp_path / "images").rows
    assert absolute["image"] == relative["image"]
    (tmp_path / "images" / "c.png").unlink()
    with pytest.raises(DataError, match="1 image.s. not found, e.g. .*c.png; pass `coco_image_dir=`"):
        annotations.load_coco(path)
    # What a conversion raises comes out as it is, not wrapped in datasets' DatasetGenerationError.
    del coco["images"][0]["height"]
    path.write_text(json.dumps(coco))
    with pytest.raises(KeyError, match="height"):
        annotations.load_coco(path)


def test_converted_skip_counts_are_reported_once_when_val_is_held_out(tmp_path):
    import PIL.Image

    (tmp_path / "images").mkdir()
    for name in "abcd":
        PIL.Image.fromarray(np.zeros((10, 10), np.uint8)).save(tmp_path / "images" / f"{name}.png")
    box = [[1, 1, 4, 1, 4, 4, 1, 4]]
    coco = {
        "images": [{"id": i, "file_name": f"{name}.png", "height": 10, "width": 10} for i, name in enumerate("abcd")],
        "annotations": [{"id": i, "image_id": i % 5, "segmentation": box} for i in range(5)],  # image 4: not listed
    }
    (tmp_path / "instances.json").write_text(json.dumps(coco))
    report = inspect_dataset(tmp_path / "instances.json", val_fraction=0.5)
    lost = {"COCO annotations of images not in 'images'": 1}
    assert report.splits["train"].skipped == lost
    assert report.splits["val"].num_rows == 2 and not report.splits["val"].skipped
    splits = load_source(tmp_path / "instances.json", val_fraction=0.5)
    assert splits.skipped == {"train": lost, "val": {}}
    assert inspect_dataset(splits).splits["train"].skipped == lost  # the counts travel with the splits


def test_nifti_counts_cover_every_volume_and_an_unlabelled_volume_is_skipped_not_fatal(tmp_path):
    import nibabel

    for folder in ("images", "masks"):
        (tmp_path / folder).mkdir()
    first_labelled = {"a": 2, "b": 3, "c": 5}  # c: no labelled slice at all
    for name, first in first_labelled.items():
        labels = np.zeros((8, 8, 5), np.uint8)
        labels[2:5, 2:5, first:] = 1
        nibabel.save(nibabel.Nifti1Image(np.ones((8, 8, 5), np.int16), np.eye(4)), tmp_path / "images" / f"{name}.nii.gz")
        nibabel.save(nibabel.Nifti1Image(labels, np.eye(4)), tmp_path / "masks" / f"{name}.nii.gz")
    splits = load_source(tmp_path, val_fraction=0)
    assert list(splits["train"]["image_id"]) == ["a/2:2", "a/2:3", "a/2:4", "b/2:3", "b/2:4"]
    assert splits.skipped == {"train": {"empty slices (NIfTI)": 2 + 3 + 5}}
    assert inspect_dataset(tmp_path, val_fraction=0).splits["train"].skipped == {"empty slices (NIfTI)": 10}


def test_cached_conversion_without_its_counts_file_is_converted_again(tmp_path, monkeypatch):
    import PIL.Image

    from sam2_peft.data import annotations

    (tmp_path / "images").mkdir()
    PIL.Image.fromarray(np.zeros((10, 10), np.uint8)).save(tmp_path / "images" / "d.png")
    box = [[1, 1, 4, 1, 4, 4, 1, 4]]
    coco = {
        "images": [{"id": 1, "file_name": "d.png", "height": 10, "width": 10}],
        "annotations": [{"id": 1, "image_id": 1, "segmentation": box}, {"id": 2, "image_id": 9, "segmentation": box}],
    }
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(coco))
    lost = {"COCO annotations of images not in 'images'": 1}
    assert annotations.load_coco(path).skipped == lost
    counts_files = list((datasets.config.HF_DATASETS_CACHE / "sam2_peft_conversions").glob("*.json"))
    assert any(json.loads(f.read_text()).get(next(iter(lost))) == 1 for f in counts_files), "counts beside the cache"
    for counts_file in counts_files:
        counts_file.unlink()
    runs = []
    real = annotations._coco_rows

    def counting(**kwargs):
        runs.append(1)
        yield from real(**kwargs)

    counting.__name__ = real.__name__
    monkeypatch.setattr(annotations, "_coco_rows", counting)
    again = annotations.load_coco(path)
    assert runs and again.skipped == lost and again.rows["image_id"] == ["d"]

