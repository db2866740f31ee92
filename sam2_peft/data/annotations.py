"""Sources that need converting into label maps: COCO instance annotations and NIfTI volumes.

COCO polygons and RLE become one instance label map per image (1..n in annotation order, later annotations on
top where they overlap; crowd regions are kept as objects). NIfTI image + label volumes become 2-D slices along
one axis; slices without any label are skipped and their number is recorded on the dataset (`skipped_counts`).
Converted cells are stored as lossless TIFF bytes, so int16 CT values and float intensities survive unchanged.

Conversion streams rows into an Arrow file in the `datasets` cache (`Dataset.from_generator`), so memory stays flat
however large the source; loading the same unchanged files with the same options again reads that file instead of
converting again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import datasets
import numpy as np

from sam2_peft.data.io import DataError, encode_array, row_features

logger = logging.getLogger(__name__)

# Part of every conversion's cache key: bump it when a conversion's output changes, so cached ones are rebuilt.
CONVERSION_VERSION = 1


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
    if mask_type not in ("instance", "semantic"):
        raise ValueError(f"mask_type={mask_type!r} is unknown; use 'instance' or 'semantic'.")
    path = Path(path).resolve()
    if image_dir is None:
        image_dir = path.parent / "images" if (path.parent / "images").is_dir() else path.parent
    image_dir = Path(image_dir).resolve()
    dataset = _convert(_coco_rows, [path], path=str(path), image_dir=str(image_dir), mask_type=mask_type)
    # The cache key covers the json, not the images: check them on every load, cached or not.
    missing = [cell["path"] for cell in dataset["image"] if not Path(cell["path"]).is_file()]
    if missing:
        raise DataError(
            f"{path}: {len(missing)} image(s) not found, e.g. {missing[0]}; pass `coco_image_dir=` with the folder "
            "that holds the images."
        )
    return dataset


def _coco_rows(path: str, image_dir: str, mask_type: str) -> Iterator[dict]:
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
    skipped = {
        "COCO annotations of images not in 'images'": sum(
            len(anns) for image_id, anns in per_image.items() if image_id not in listed
        ),
        "COCO annotations with an empty segmentation": 0,
        "COCO annotations hidden by later overlapping ones": 0,
    }

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
            yield _row(image, encode_array(labels), Path(info["file_name"]).stem)

    yield from _with_skipped(rows(), skipped, none_left=lambda: f"{path} lists no images.")


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
    if axis not in (0, 1, 2):
        raise DataError(f"nifti_axis={axis} must be 0, 1 or 2.")
    pairs = [(stem, str(image_path), str(label_path)) for stem, image_path, label_path in pairs]
    sources = [Path(path) for _, image_path, label_path in pairs for path in (image_path, label_path)]
    dataset = _convert(_nifti_rows, sources, pairs=pairs, axis=axis)
    empty = skipped_counts(dataset).get(EMPTY_SLICES, 0)
    if empty:
        logger.info("NIfTI: skipped %d slice(s) without labels along axis %d.", empty, axis)
    return dataset


EMPTY_SLICES = "empty slices (NIfTI)"


def _nifti_rows(pairs: list[tuple[str, str, str]], axis: int) -> Iterator[dict]:
    import nibabel

    skipped = {EMPTY_SLICES: 0}

    def rows() -> Iterator[dict]:
        for stem, image_path, label_path in pairs:
            volume = read_volume(nibabel, Path(image_path))
            labels = read_volume(nibabel, Path(label_path))
            if volume.shape != labels.shape:
                raise DataError(
                    f"{image_path} has shape {volume.shape} but its labels {label_path} have {labels.shape}; they "
                    "must be voxel-aligned (resample the labels onto the image grid)."
                )
            for index in range(volume.shape[axis]):
                label_slice = np.take(labels, index, axis=axis)
                if not label_slice.any():
                    skipped[EMPTY_SLICES] += 1
                    continue
                image = encode_array(np.take(volume, index, axis=axis))
                yield _row(image, encode_array(label_slice), f"{stem}/{axis}:{index}")

    yield from _with_skipped(
        rows(), skipped, none_left=lambda: f"No NIfTI slice along axis {axis} has any label ({skipped[EMPTY_SLICES]} "
        "empty slices); check the label files."
    )


def read_volume(nibabel, path: Path) -> np.ndarray:
    """Read a 3-D NIfTI volume in its stored dtype (`nibabel` is the imported module, an optional dependency)."""
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


def _row(image: dict, mask: dict, image_id: str) -> dict:
    return {"image": image, "mask": mask, "image_id": image_id, "domain": None, "skipped": None}


def _with_skipped(rows: Iterator[dict], skipped: dict[str, int], none_left: Callable[[], str]) -> Iterator[dict]:
    """Yield `rows`, the last one holding the final `skipped` counts as JSON (a generator's only way to hand them on,
    and they stay with the cached conversion); raise `DataError(none_left())` when there is no row."""
    last = None
    for row in rows:
        if last is not None:
            yield last
        last = row
    if last is None:
        raise DataError(none_left())
    yield {**last, "skipped": json.dumps(skipped)}


def _convert(generator, sources: list[Path], **options) -> datasets.Dataset:
    """Run a row generator through `Dataset.from_generator`, cached under the sources' paths, sizes and mtimes, the
    options and `CONVERSION_VERSION`; move its skipped counts into the dataset's info (`skipped_counts`)."""
    stamps = [(str(path.resolve()), path.stat().st_size, path.stat().st_mtime_ns) for path in sources if path.exists()]
    key = json.dumps([generator.__name__, CONVERSION_VERSION, stamps, options], sort_keys=True, default=str)
    features = row_features()
    features["skipped"] = datasets.Value("string")
    try:
        dataset = datasets.Dataset.from_generator(
            generator, features=features, gen_kwargs=options, fingerprint=hashlib.sha256(key.encode()).hexdigest()
        )
    except datasets.exceptions.DatasetGenerationError as err:
        # Show what the conversion raised (a DataError names the file and the fix) rather than datasets' wrapper.
        cause = err.__cause__
        if cause is None:
            raise
        cause.__suppress_context__ = True
        raise cause
    skipped = json.loads(dataset[len(dataset) - 1]["skipped"])
    dataset = dataset.remove_columns("skipped")
    dataset.info.description = json.dumps({"sam2_peft_skipped": {k: v for k, v in skipped.items() if v}})
    return dataset


def skipped_counts(dataset: datasets.Dataset) -> dict[str, int]:
    """Return what a converting source skipped while building `dataset` (e.g. empty NIfTI slices), by reason."""
    try:
        return dict(json.loads(dataset.info.description or "{}").get("sam2_peft_skipped", {}))
    except (json.JSONDecodeError, AttributeError):
        return {}
