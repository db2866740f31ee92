"""Decode image and mask cells into numpy arrays, and check that they make sense.

Every source stores its cells the same way (a path, encoded bytes, a PIL image or an array), so this is the one
place that turns them into arrays and the one place that says what is wrong with them. TIFF goes through
`tifffile` because PIL cannot read multi-channel 16-bit or float TIFFs, and 16-bit colour PNGs through `pypng`
because PIL reads them as 8-bit, silently dropping the low byte of every channel.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import PIL.ExifTags
import PIL.Image
import PIL.ImageOps
import png
import tifffile

from sam2_peft.errors import UserError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
MASK_SUFFIXES = (".png", ".tif", ".tiff")
MASK_TYPES = ("instance", "semantic")
_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class DataError(UserError, ValueError):
    """Raised for input data that cannot be used as it is; the message names the file or column and the fix."""


def read_file(path: str | Path, *, is_mask: bool = False) -> np.ndarray:
    """Read an image or mask file into an array with its stored dtype (8/16-bit, float) and channels.

    Args:
        path: the file.
        is_mask: masks keep palette indices as labels; images are converted from palettes to colour.

    Raises:
        DataError: the file is missing, unreadable or corrupt.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found; check the path or remove the row that refers to it.")
    try:
        if path.suffix.lower() in (".tif", ".tiff"):
            return np.asarray(tifffile.imread(path))
        with path.open("rb") as handle:
            head = handle.read(26)
            if _is_deep_colour_png(head):
                return _read_deep_colour_png(head + handle.read(), is_mask=is_mask)
            handle.seek(0)
            with PIL.Image.open(handle) as image:
                return _pil_to_array(image, is_mask=is_mask)
    except (OSError, ValueError, SyntaxError, tifffile.TiffFileError, png.Error) as err:
        raise DataError(f"{path}: cannot be read as an image ({err}); re-export it or remove it.") from err


def encode_array(array: np.ndarray) -> dict[str, Any]:
    """Encode an array losslessly (any dtype) as a `datasets.Image(decode=False)` cell: TIFF bytes."""
    buffer = io.BytesIO()
    # zlib: label maps are mostly runs of one value, so this keeps in-memory datasets small, losslessly.
    tifffile.imwrite(buffer, np.ascontiguousarray(array), compression="zlib")
    return {"bytes": buffer.getvalue(), "path": None}


def decode_cell(value: Any, *, what: str, is_mask: bool = False) -> np.ndarray:
    """Turn one `image` or `mask` cell into a numpy array.

    Args:
        value: a path, a `{"bytes", "path"}` dict (`datasets.Image(decode=False)`), a PIL image, an array, a tensor
            or nested lists.
        what: how to name the cell in errors, e.g. `"row 3 of column 'mask'"`.
        is_mask: masks keep palette indices as labels; images are converted from palettes to colour.
    """
    if value is None:
        raise DataError(f"{what} is empty (None); every row needs an image and a mask.")
    if isinstance(value, (str, Path)):
        return read_file(value, is_mask=is_mask)
    if isinstance(value, dict):
        if value.get("bytes"):
            where = f"{what} ({value.get('path') or 'embedded bytes'})"
            return _decode_bytes(value["bytes"], what=where, is_mask=is_mask)
        if value.get("path"):
            return read_file(value["path"], is_mask=is_mask)
        raise DataError(f"{what} has neither bytes nor a path.")
    if isinstance(value, PIL.Image.Image):
        return _pil_to_array(value, is_mask=is_mask)
    if hasattr(value, "numpy"):
        return value.detach().cpu().numpy() if hasattr(value, "detach") else value.numpy()
    try:
        return np.asarray(value)
    except ValueError as err:
        raise DataError(
            f"{what} is a nested list that is not a rectangular array ({err}); every row must have the same length."
        ) from err


def _decode_bytes(data: bytes, *, what: str, is_mask: bool) -> np.ndarray:
    try:
        if data[:4] in _TIFF_MAGIC:
            return np.asarray(tifffile.imread(io.BytesIO(data)))
        if _is_deep_colour_png(data[:26]):
            return _read_deep_colour_png(data, is_mask=is_mask)
        with PIL.Image.open(io.BytesIO(data)) as image:
            return _pil_to_array(image, is_mask=is_mask)
    except (OSError, ValueError, SyntaxError, tifffile.TiffFileError, png.Error) as err:
        raise DataError(f"{what}: cannot be decoded as an image ({err}); re-export it or drop that row.") from err


def _is_deep_colour_png(head: bytes) -> bool:
    """Whether a file starting with `head` (26 bytes) is a PNG of 16-bit RGB, RGBA or grey + alpha."""
    # IHDR is the first chunk: bit depth at byte 24, colour type at 25 (2 RGB, 4 grey + alpha, 6 RGBA).
    png_header = len(head) >= 26 and head[:8] == _PNG_MAGIC and head[12:16] == b"IHDR"
    return png_header and head[24] == 16 and head[25] in (2, 4, 6)


def _read_deep_colour_png(data: bytes, *, is_mask: bool) -> np.ndarray:
    """Decode in pure Python (about 1.5 s for a 1024x1024 RGB image; a 16-bit TIFF reads far faster)."""
    width, height, rows, info = png.Reader(bytes=data).read()
    array = np.vstack([np.asarray(row, np.uint16) for row in rows]).reshape(height, width, info["planes"])
    array = _exif_oriented(data, array)
    # Grey + alpha images become grey, as PIL's "LA" images do.
    return array[..., 0] if info["planes"] == 2 and not is_mask else array


# PIL.ImageOps.exif_transpose's table: EXIF orientation -> the transpose that shows the image upright.
_ORIENTATION_FIX = {
    2: PIL.Image.Transpose.FLIP_LEFT_RIGHT, 3: PIL.Image.Transpose.ROTATE_180, 4: PIL.Image.Transpose.FLIP_TOP_BOTTOM,
    5: PIL.Image.Transpose.TRANSPOSE, 6: PIL.Image.Transpose.ROTATE_270, 7: PIL.Image.Transpose.TRANSVERSE,
    8: PIL.Image.Transpose.ROTATE_90,
}


def _exif_oriented(data: bytes, array: np.ndarray) -> np.ndarray:
    """`array` (H, W, C) turned as `exif_transpose` turns the image, by moving pixel indices through PIL."""
    with PIL.Image.open(io.BytesIO(data)) as image:
        method = _ORIENTATION_FIX.get(image.getexif().get(PIL.ExifTags.Base.Orientation, 1))
    if method is None:
        return array
    height, width = array.shape[:2]
    indices = PIL.Image.fromarray(np.arange(height * width, dtype=np.int32).reshape(height, width))
    return array.reshape(height * width, -1)[np.asarray(indices.transpose(method))]


def _pil_to_array(image: PIL.Image.Image, *, is_mask: bool) -> np.ndarray:
    # Annotation tools draw on the image as a viewer shows it, i.e. with its EXIF orientation applied.
    image = PIL.ImageOps.exif_transpose(image)
    # Palette ("P") masks keep their indices: they are the labels (as in Pascal VOC); palette images are colours.
    if image.mode in ("CMYK", "YCbCr", "LAB", "HSV") or (image.mode == "P" and not is_mask):
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    elif image.mode == "LA" and not is_mask:
        image = image.convert("L")
    return np.array(image)


def to_hwc(image: np.ndarray, *, what: str) -> np.ndarray:
    """Return the image as (H, W, C) with C in {1, 3, 4}; channel-first TIFFs are transposed."""
    if image.ndim == 2:
        return image[:, :, None]
    if image.ndim == 3:
        if image.shape[-1] in (1, 3, 4):
            return image
        if image.shape[0] in (1, 3, 4):
            return np.moveaxis(image, 0, -1)
    raise DataError(
        f"{what} has shape {image.shape}; expected (H, W) grayscale or (H, W, C) with 1, 3 or 4 channels. "
        "For volumes, use a NIfTI source (it slices them); for other channel counts, convert to RGB first."
    )


def to_label_map(mask: np.ndarray, *, what: str) -> np.ndarray:
    """Return a mask as an (H, W) int64 label map, or raise if its values cannot be labels.

    Accepted: integer or bool maps; float maps whose values are all whole numbers (as NIfTI labels are stored);
    (H, W, C) maps whose channels are all equal (a label map saved as RGB).
    """
    if mask.ndim == 3 and mask.shape[-1] in (1, 3, 4):
        channels = mask[..., :3] if mask.shape[-1] == 4 else mask
        if not (channels == channels[..., :1]).all():
            raise DataError(
                f"{what} has {mask.shape[-1]} channels with different values (a colour-coded mask?). Convert it to "
                "a single-channel label map: 0 = background, 1, 2, ... = objects or classes."
            )
        mask = mask[..., 0]
    if mask.ndim != 2:
        raise DataError(f"{what} has shape {mask.shape}; a mask must be an (H, W) label map.")
    if mask.dtype == bool:
        return mask.astype(np.int64)
    if np.issubdtype(mask.dtype, np.floating):
        if not np.isfinite(mask).all() or not (mask == np.round(mask)).all():
            raise DataError(
                f"{what} is a float mask with fractional values (range {np.nanmin(mask):.3g}..{np.nanmax(mask):.3g}): "
                "a probability or soft mask, not a label map. Threshold it (e.g. `mask > 0.5`) and save integer "
                "labels (0 = background)."
            )
    elif not np.issubdtype(mask.dtype, np.integer):
        raise DataError(f"{what} has dtype {mask.dtype}; masks must hold integer labels.")
    labels = mask.astype(np.int64)
    if labels.size and labels.min() < 0:
        raise DataError(
            f"{what} has negative values (min {labels.min()}); labels must be 0 (background) or positive ids."
        )
    return labels


def check_mask_values(labels: np.ndarray, *, mask_type: str, num_classes: int | None, what: str) -> None:
    """Raise if a label map does not fit `mask_type` (and `num_classes` for semantic maps)."""
    if mask_type not in MASK_TYPES:
        raise DataError(f"mask_type={mask_type!r} is not supported; use one of {MASK_TYPES}.")
    if mask_type == "semantic" and num_classes is not None and labels.size and labels.max() > num_classes:
        raise DataError(
            f"{what} has class id {labels.max()} but num_classes={num_classes} (ids 1..{num_classes}). Raise "
            "`num_classes`, or use mask_type='instance' if the values are instance ids."
        )


def check_same_size(image: np.ndarray, labels: np.ndarray, *, what: str) -> None:
    """Raise if the image (H, W, C) and its label map (H, W) differ in size."""
    if image.shape[:2] != labels.shape:
        raise DataError(
            f"{what}: image is {image.shape[0]}x{image.shape[1]} (HxW) but its mask is "
            f"{labels.shape[0]}x{labels.shape[1]}. Masks must be pixel-aligned with their images; re-export the mask "
            "at the image's size (nearest-neighbour resize if you must)."
        )


def _cell_path(cell: Any) -> str | None:
    if isinstance(cell, (str, Path)):
        return str(cell)
    return cell.get("path") if isinstance(cell, dict) else None


def decode_row(
    row: dict[str, Any], *, where: str, mask_type: str = "instance", num_classes: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Decode and check one source row: returns the (H, W, C) image and its (H, W) int64 label map.

    Args:
        row: a row with `image` and `mask` cells (and `image_id`).
        where: how to name the row in errors, e.g. `"split 'train', row 3"`.
    """
    name = ", ".join(str(part) for part in (where, row.get("image_id"), _cell_path(row["image"])) if part)
    image = to_hwc(decode_cell(row["image"], what=f"{name}, column 'image'"), what=f"{name}, column 'image'")
    what = f"{name}, column 'mask'"
    labels = to_label_map(decode_cell(row["mask"], what=what, is_mask=True), what=what)
    check_same_size(image, labels, what=name)
    check_mask_values(labels, mask_type=mask_type, num_classes=num_classes, what=what)
    return image, labels


def row_features() -> datasets.Features:
    """The columns every source produces; cells stay undecoded so that no 8-bit conversion happens."""
    return datasets.Features(
        image=datasets.Image(decode=False),
        mask=datasets.Image(decode=False),
        image_id=datasets.Value("string"),
        domain=datasets.Value("string"),
    )
