"""Sources that need converting into label maps: COCO instance annotations and NIfTI volumes.

COCO polygons and RLE become one instance label map per image (1..n in annotation order, later annotations on
top where they overlap; crowd regions are kept as objects). NIfTI image + label volumes become 2-D slices along
one axis; slices without any label are skipped and their number is recorded on the dataset (`skipped_counts`).
Converted cells are stored as lossless TIFF bytes, so int16 CT values and float intensities survive unchanged.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import datasets
import numpy as np

from sam2_peft.data.io import DataError, encode_array

logger = logging.getLogger(__name__)


def load_coco(
    path: str | os.PathLike, *, image_dir: str | os.PathLike | None = None, mask_type: str = "instance"
) -> datasets.Dataset:
    """Load COCO annotations as rows of image paths and label maps.

    Args:
        path: the annotation file (`instances_*.json`).
        image_dir: the folder `file_name`s are relative to (default: `images/` next to the json if present, else the
            json's folder).
        mask_type: `instance` numbers the annotations of each image 1, 2, ...; `semantic` writes each annotation's
            `category_id`, so annotations of one category merge into one object per class.

    Where annotations overlap, the later one in the file keeps the pixels; an annotation left with no pixel at all is
    counted in the split's skipped report, as are annotations of images the file does not list.

    Example:
        >>> rows = load_coco("annotations/instances_val.json")
    """
    from pycocotools import mask as mask_utils

    if mask_type not in ("instance", "semantic"):
        raise ValueError(f"mask_type={mask_type!r} is unknown; use 'instance' or 'semantic'.")
    path = Path(path)
    try:
        coco = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise DataError(f"{path}: cannot be read as COCO json ({err}).") from err
    for key in ("images", "annotations"):
        if key not in coco:
            raise DataError(f"{path} has no {key!r} list; is it a COCO instances file (instances_*.json)?")
    if image_dir is None:
        image_dir = path.parent / "images" if (path.parent / "images").is_dir() else path.parent
    image_dir = Path(image_dir)

    per_image: dict[int, list[dict]] = {}
    for ann in coco["annotations"]:
        per_image.setdefault(ann["image_id"], []).append(ann)
    listed = {info["id"] for info in coco["images"]}
    skipped = {
        "COCO annotations of images not in 'images'": sum(
            len(anns) for image_id, anns in per_image.items() if image_id not in listed
        ),
        "COCO annotations with an empty segmentation": 0,
        "COCO annotations hidden by later overlapping ones": 0,
    }
    images, masks, ids = [], [], []
    for info in coco["images"]:
        height, width = int(info["height"]), int(info["width"])
        anns = per_image.get(info["id"], [])
        values = [_label_value(ann, number, mask_type, path) for number, ann in enumerate(anns, start=1)]
        largest = max(values, default=0)
        labels = np.zeros((height, width), np.uint8 if largest < 256 else np.uint16 if largest < 65536 else np.uint32)
        pixels = []  # flat indices of each annotation's pixels, to check what survives the overlaps
        for ann, value in zip(anns, values):
            pixels.append(np.flatnonzero(mask_utils.decode(_rle(ann, height, width, path, info["file_name"]))))
            labels.flat[pixels[-1]] = value
        for where, value in zip(pixels, values):
            if not where.size:
                skipped["COCO annotations with an empty segmentation"] += 1
            elif not (labels.flat[where] == value).any():  # every pixel went to a later annotation of another label
                skipped["COCO annotations hidden by later overlapping ones"] += 1
        image_path = image_dir / info["file_name"]
        if not image_path.is_file():
            raise DataError(
                f"{path}: image {info['file_name']!r} not found in {image_dir}; pass `coco_image_dir=` with the folder "
                "that holds the images."
            )
        images.append({"path": str(image_path), "bytes": None})
        masks.append(encode_array(labels))
        ids.append(Path(info["file_name"]).stem)
    if not images:
        raise DataError(f"{path} lists no images.")
    return _dataset(images, masks, ids, {reason: count for reason, count in skipped.items() if count})


def _rle(ann: dict, height: int, width: int, path: Path, file_name: str):
    """The annotation's segmentation as one (compressed) RLE."""
    from pycocotools import mask as mask_utils

    segmentation = ann.get("segmentation")
    if not segmentation:
        raise DataError(f"{path}: annotation id={ann.get('id')} of image {file_name} has no segmentation.")
    if isinstance(segmentation, list):  # polygons: one object may have several parts
        return mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
    if isinstance(segmentation["counts"], list):  # uncompressed RLE
        return mask_utils.frPyObjects(segmentation, height, width)
    return segmentation


def _label_value(ann: dict, number: int, mask_type: str, path: Path) -> int:
    if mask_type == "instance":
        return number
    category = ann.get("category_id")
    if not isinstance(category, int) or category < 1:
        raise DataError(
            f"{path}: annotation id={ann.get('id')} has category_id={category!r}; semantic label maps need positive "
            "integer categories (0 is background)."
        )
    return category


def slice_nifti_pairs(pairs: list[tuple[str, Path, Path]], *, axis: int = 2) -> datasets.Dataset:
    """Cut NIfTI image + label volumes into 2-D slices along `axis`, skipping (and counting) unlabelled slices.

    Args:
        pairs: `(stem, image_path, label_path)` for each volume.
        axis: 0, 1 or 2, in the volume's voxel order (2 = axial for RAS-oriented scans).
    """
    import nibabel

    if axis not in (0, 1, 2):
        raise DataError(f"nifti_axis={axis} must be 0, 1 or 2.")
    images, masks, ids = [], [], []
    empty = 0
    for stem, image_path, label_path in pairs:
        volume = _read_volume(nibabel, image_path)
        labels = _read_volume(nibabel, label_path)
        if volume.shape != labels.shape:
            raise DataError(
                f"{image_path} has shape {volume.shape} but its labels {label_path} have {labels.shape}; they must be "
                "voxel-aligned (resample the labels onto the image grid)."
            )
        for index in range(volume.shape[axis]):
            label_slice = np.take(labels, index, axis=axis)
            if not label_slice.any():
                empty += 1
                continue
            images.append(encode_array(np.take(volume, index, axis=axis)))
            masks.append(encode_array(label_slice))
            ids.append(f"{stem}/{axis}:{index}")
    if empty:
        logger.info("NIfTI: skipped %d slice(s) without labels along axis %d.", empty, axis)
    if not images:
        raise DataError(f"No NIfTI slice along axis {axis} has any label ({empty} empty slices); check the label files.")
    return _dataset(images, masks, ids, {"empty slices (NIfTI)": empty})


def _read_volume(nibabel, path: Path) -> np.ndarray:
    try:
        # dataobj keeps the stored dtype (e.g. int16 CT) unless the header asks for scaling.
        volume = np.asanyarray(nibabel.load(str(path)).dataobj)
    except Exception as err:  # nibabel raises a zoo of types for corrupt files
        raise DataError(f"{path}: cannot be read as NIfTI ({type(err).__name__}: {err}); re-export it.") from err
    if volume.ndim != 3:
        raise DataError(
            f"{path} has {volume.ndim} dimensions {volume.shape}; expected a 3-D volume. Split multi-channel (4-D) "
            "volumes into one file per channel."
        )
    return volume


def _dataset(images: list, masks: list, ids: list[str], skipped: dict[str, int]) -> datasets.Dataset:
    from sam2_peft.data.sources import row_features

    features = row_features()
    info = datasets.DatasetInfo(description=json.dumps({"sam2_peft_skipped": skipped}), features=features)
    return datasets.Dataset.from_dict(
        {"image": images, "mask": masks, "image_id": ids, "domain": [None] * len(ids)},
        features=features,
        info=info,
    )


def skipped_counts(dataset: datasets.Dataset) -> dict[str, int]:
    """Return what a converting source skipped while building `dataset` (e.g. empty NIfTI slices), by reason."""
    try:
        return dict(json.loads(dataset.info.description or "{}").get("sam2_peft_skipped", {}))
    except (json.JSONDecodeError, AttributeError):
        return {}
