"""COCO instance annotations as label maps.

    rows, skipped = load_coco("annotations/instances.json", image_dir="images", mask_type="instance")

Polygons and RLE become one instance label map per image (1..n in annotation order, later annotations on top where
they overlap; crowd regions are kept as objects). Empty annotations, annotations hidden by later overlapping ones
and those of unlisted images are counted in the returned `Conversion`'s `skipped`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from sam2_peft.data.conversion import Conversion, convert_rows, require_rows, source_row
from sam2_peft.data.io import DataError, encode_array


def load_coco(
    path: str | os.PathLike, *, image_dir: str | os.PathLike | None = None, mask_type: str = "instance"
) -> Conversion:
    """Load COCO annotations as rows of image paths and label maps.

    Args:
        path: the annotation file (`instances_*.json`).
        image_dir: the folder `file_name`s are relative to (default: `images/` next to the json if present, else the
            json's folder).
        mask_type: `instance` numbers the annotations of each image 1, 2, ...; `semantic` writes each annotation's
            `category_id`, so annotations of one category merge into one object per class.

    Where annotations overlap, the later one in the file keeps the pixels; an annotation left with no pixel at all is
    counted in `skipped`, as are annotations of images the file does not list.

    Returns:
        The rows (image paths and label maps) and the skipped annotations by reason.

    Example:
        >>> rows, skipped = load_coco("annotations/instances_val.json")
    """
    if mask_type not in ("instance", "semantic"):
        raise ValueError(f"mask_type={mask_type!r} is unknown; use 'instance' or 'semantic'.")
    path = Path(path).resolve()
    if image_dir is None:
        image_dir = path.parent / "images" if (path.parent / "images").is_dir() else path.parent
    image_dir = Path(image_dir).resolve()
    converted = convert_rows(_coco_rows, [path], path=str(path), image_dir=str(image_dir), mask_type=mask_type)
    # The cache key covers the json, not the images: check them on every load, cached or not.
    missing = [cell["path"] for cell in converted.rows["image"] if not Path(cell["path"]).is_file()]
    if missing:
        raise DataError(
            f"{path}: {len(missing)} image(s) not found, e.g. {missing[0]}; pass `coco_image_dir=` with the folder "
            "that holds the images."
        )
    return converted


def _coco_rows(skipped: dict[str, int], path: str, image_dir: str, mask_type: str) -> Iterator[dict]:
    from pycocotools import mask as mask_utils

    path, image_dir = Path(path), Path(image_dir)
    try:
        coco = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise DataError(f"{path}: cannot be read as COCO json ({err}).") from err
    for key in ("images", "annotations"):
        if key not in coco:
            raise DataError(f"{path} has no {key!r} list; is it a COCO instances file (instances_*.json)?")

    per_image: dict[int, list[dict]] = {}
    for ann in coco["annotations"]:
        per_image.setdefault(ann["image_id"], []).append(ann)
    listed = {info["id"] for info in coco["images"]}
    skipped.update({
        "COCO annotations of images not in 'images'": sum(
            len(anns) for image_id, anns in per_image.items() if image_id not in listed
        ),
        "COCO annotations with an empty segmentation": 0,
        "COCO annotations hidden by later overlapping ones": 0,
    })

    def rows() -> Iterator[dict]:
        for info in coco["images"]:
            height, width = int(info["height"]), int(info["width"])
            anns = per_image.get(info["id"], [])
            values = [_label_value(ann, number, mask_type, path) for number, ann in enumerate(anns, start=1)]
            largest = max(values, default=0)
            dtype = np.uint8 if largest < 256 else np.uint16 if largest < 65536 else np.uint32
            labels = np.zeros((height, width), dtype)
            pixels = []  # flat indices of each annotation's pixels, to check what survives the overlaps
            for ann, value in zip(anns, values):
                pixels.append(np.flatnonzero(mask_utils.decode(_rle(ann, height, width, path, info["file_name"]))))
                labels.flat[pixels[-1]] = value
            for where, value in zip(pixels, values):
                if not where.size:
                    skipped["COCO annotations with an empty segmentation"] += 1
                elif not (labels.flat[where] == value).any():  # every pixel went to a later annotation of another label
                    skipped["COCO annotations hidden by later overlapping ones"] += 1
            image = {"path": str(image_dir / info["file_name"]), "bytes": None}  # load_coco checks that it exists
            yield source_row(image, encode_array(labels), Path(info["file_name"]).stem)

    yield from require_rows(rows(), none_left=lambda: f"{path} lists no images.")


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
