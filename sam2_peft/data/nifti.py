"""NIfTI image + label volumes as 2-D slices: each volume is cut along one axis, and slices without any label are
skipped and counted (in the returned `Conversion`). Volumes keep their stored dtype (int16 CT, float MR).

    rows, skipped = slice_nifti_pairs([("case_01", Path("images/case_01.nii.gz"), Path("masks/case_01.nii.gz"))])
    skipped                          # {"empty slices (NIfTI)": 12}
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from sam2_peft.data.conversion import Conversion, convert_rows, require_rows, source_row
from sam2_peft.data.io import DataError, encode_array


def slice_nifti_pairs(pairs: list[tuple[str, Path, Path]], *, axis: int = 2) -> Conversion:
    """Cut NIfTI image + label volumes into 2-D slices along `axis`, skipping (and counting) unlabelled slices.

    Args:
        pairs: `(stem, image_path, label_path)` for each volume.
        axis: 0, 1 or 2, in the volume's voxel order (2 = axial for RAS-oriented scans).

    Returns:
        The slices as rows (ids `<stem>/<axis>:<index>`) and the count of skipped slices (`EMPTY_SLICES`).
    """
    if axis not in (0, 1, 2):
        raise DataError(f"nifti_axis={axis} must be 0, 1 or 2.")
    pairs = [(stem, str(image_path), str(label_path)) for stem, image_path, label_path in pairs]
    sources = [Path(path) for _, image_path, label_path in pairs for path in (image_path, label_path)]
    return convert_rows(_nifti_rows, sources, pairs=pairs, axis=axis)


EMPTY_SLICES = "empty slices (NIfTI)"


def _nifti_rows(skipped: dict[str, int], pairs: list[tuple[str, str, str]], axis: int) -> Iterator[dict]:
    import nibabel

    skipped[EMPTY_SLICES] = 0

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
                yield source_row(image, encode_array(label_slice), f"{stem}/{axis}:{index}")

    yield from require_rows(
        rows(), none_left=lambda: f"No NIfTI slice along axis {axis} has any label ({skipped[EMPTY_SLICES]} "
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


