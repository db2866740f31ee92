"""Read the frames and label maps of clips (frame folders and NIfTI volumes), and whole videos for tracking.

    labels = read_labels(clip, [0, 1, 2])            # (3, H, W) int64 label maps
    frames = read_frames(clip, [0, 1, 2])            # raw (H, W, C) arrays, stored dtype
    frames, names = read_video("examples/data_video/val/videos/clip_val_000")   # what `sam2-peft track` reads

Volumes are scaled to [0, 1] once per volume (`volume_intensity`): percentiles or min/max over all its voxels, so
the slices of one scan keep the same grey levels (per-slice percentiles would stretch an almost empty slice at the
volume's edge to full contrast); frame folders are scaled per frame, as images are. Volume windows are read as the
block of slices they need (`dataobj` slicing), not as the whole file.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import PIL.Image
import tifffile

from sam2_peft.data.clip_sources import ClipRecord, import_nibabel, index_files, is_nifti, natural_key
from sam2_peft.data.intensity import IntensityConfig, normalize_intensity
from sam2_peft.data.io import IMAGE_SUFFIXES, DataError, read_file, to_hwc, to_label_map
from sam2_peft.data.nifti import read_volume

_EXIF_ORIENTATION = 274
_SWAPPED_ORIENTATIONS = (5, 6, 7, 8)  # EXIF orientations that show the image transposed


def read_labels(clip: ClipRecord, indices: list[int]) -> np.ndarray:
    """Read the label maps of frames `indices` as a (T, H, W) int64 array; sizes must agree within the clip."""
    if clip.is_volume:
        raw = _volume_slices(clip.label_path, clip.axis, indices)
    else:
        raw = [read_file(clip.mask_paths[i], is_mask=True) for i in indices]
    labels = [to_label_map(mask, what=clip.mask_source(i)) for i, mask in zip(indices, raw)]
    for i, label_map in zip(indices, labels):
        if label_map.shape != labels[0].shape:
            raise DataError(
                f"{clip.mask_source(i)} is {label_map.shape[0]}x{label_map.shape[1]} (HxW) but "
                f"{clip.mask_source(indices[0])} is {labels[0].shape[0]}x{labels[0].shape[1]}: all frames of a clip "
                "must have one size. Re-export the clip at one size."
            )
    return np.stack(labels)


def iter_labels(clip: ClipRecord) -> Iterator[tuple[int, np.ndarray]]:
    """Yield `(index, (H, W) int64 label map)` for every frame, one at a time (a volume's labels are read once)."""
    if clip.is_volume:
        labels = read_volume(import_nibabel(), clip.label_path)
        for i in range(len(clip)):
            yield i, to_label_map(np.take(labels, i, axis=clip.axis), what=clip.mask_source(i))
    else:
        for i, path in enumerate(clip.mask_paths):
            yield i, to_label_map(read_file(path, is_mask=True), what=str(path))


def palette(path: Path) -> np.ndarray | None:
    """The (256, 3) RGB palette of a palette ("P" mode) PNG label map, else None."""
    if path.suffix.lower() != ".png":
        return None
    try:
        with PIL.Image.open(path) as image:
            if image.mode != "P":
                return None
            colours = np.asarray(image.getpalette("RGB") or [], np.int64).reshape(-1, 3)
    except (OSError, ValueError, SyntaxError) as err:
        raise DataError(f"{path}: cannot be read as an image ({err}); re-export it or remove it.") from err
    # Indices past a short palette are black, as PIL shows them.
    return np.pad(colours, ((0, 256 - len(colours)), (0, 0)))


def read_frames(clip: ClipRecord, indices: list[int]) -> list[np.ndarray]:
    """Read frames `indices` as raw (H, W, C) arrays in their stored dtype (C in 1, 3, 4)."""
    if clip.is_volume:
        return [s[:, :, None] for s in _volume_slices(clip.volume_path, clip.axis, indices)]
    return [to_hwc(read_file(clip.frame_paths[i]), what=clip.frame_source(i)) for i in indices]


def _volume_slices(path: Path, axis: int, indices: list[int]) -> list[np.ndarray]:
    """Slices `indices` of a NIfTI volume in the stored dtype, reading only the block that holds them."""
    nibabel = import_nibabel()
    low, high = min(indices), max(indices) + 1
    block = [slice(None)] * 3
    block[axis] = slice(low, high)
    try:
        data = np.asanyarray(nibabel.load(str(path)).dataobj[tuple(block)])
    except Exception as err:  # nibabel raises a zoo of types for corrupt files
        raise DataError(f"{path}: cannot be read as NIfTI ({type(err).__name__}: {err}); re-export it.") from err
    return [np.take(data, i - low, axis=axis) for i in indices]


def frame_size(path: Path) -> tuple[int, int]:
    """The (H, W) a frame file decodes to, from its header where possible (as `read_file` + `to_hwc` orient it)."""
    try:
        if path.suffix.lower() in (".tif", ".tiff"):
            with tifffile.TiffFile(path) as tif:
                shape = tif.pages[0].shape
            # A zero-strided view: to_hwc's channel-first rule without allocating the image.
            return to_hwc(np.broadcast_to(np.zeros((), bool), shape), what=str(path)).shape[:2]
        with PIL.Image.open(path) as image:
            width, height = image.size
            if image.getexif().get(_EXIF_ORIENTATION, 1) in _SWAPPED_ORIENTATIONS:
                width, height = height, width
        return height, width
    except (OSError, ValueError, SyntaxError, tifffile.TiffFileError):
        return to_hwc(read_file(path), what=str(path)).shape[:2]  # the full decoder, and its message


def volume_intensity(volume: np.ndarray, config: IntensityConfig) -> IntensityConfig:
    """The intensity mapping of a whole volume, as a fixed window that every slice then shares.

    Percentiles (`percentile`, and `auto` on non-8-bit volumes) and `minmax` are computed over all finite voxels of
    the volume; `range` and `window` map each voxel on its own already and come back unchanged.

    Example:
        >>> volume_intensity(np.arange(11.0).reshape(1, 1, 11), IntensityConfig(mode="minmax")).window
        (5.0, 10.0)
    """
    mode = config.mode
    if mode == "auto":
        mode = "range" if volume.dtype in (np.uint8, np.bool_) else "percentile"
    if mode not in ("percentile", "minmax"):
        return config
    values = volume[np.isfinite(volume)] if np.issubdtype(volume.dtype, np.floating) else volume
    if not values.size:
        low = high = 0.0
    elif mode == "minmax":
        low, high = float(values.min()), float(values.max())
    else:
        low, high = (float(v) for v in np.percentile(values, config.percentiles))
    if high <= low:
        # A constant volume: a window far above every value maps it to 0, as normalize_intensity does an image.
        return IntensityConfig(mode="window", window=(float(np.finfo(np.float64).max) / 2, 1.0))
    return IntensityConfig(mode="window", window=((low + high) / 2, high - low))


def read_video(
    path: str | os.PathLike, intensity: IntensityConfig = IntensityConfig(), *, axis: int = 2
) -> tuple[list[np.ndarray], list[str]]:
    """Read a video (a folder of frames) or a NIfTI volume as the model sees it before resizing.

    Args:
        path: a folder of frame files (`.png`, `.jpg`, `.jpeg`, `.tif`, `.tiff`, natural order of the stems) or a
            `.nii` / `.nii.gz` volume.
        intensity: how raw values map to [0, 1]; per frame for folders, over the whole volume for NIfTI.
        axis: the axis a volume is cut along.

    Returns:
        (frames, frame_names): T float32 (3, H, W) arrays in [0, 1] (as `normalize_intensity` gives, ready for
        `Preprocessor.pixel_values(torch.from_numpy(frame))`) and T names (stems, or `slice_0042` for volumes).

    Example:
        >>> frames, names = read_video("examples/data_video/val/videos/clip_val_000")
        >>> frames[0].shape, names[0]
        ((3, 128, 128), 'frame_000')
    """
    path = Path(path)
    if path.is_file() and is_nifti(path):
        if axis not in (0, 1, 2):
            raise DataError(f"nifti_axis={axis} must be 0, 1 or 2.")
        volume = read_volume(import_nibabel(), path)
        if volume.shape[axis] == 0:
            raise DataError(f"{path} has no slices along axis {axis}.")
        config = volume_intensity(volume, intensity)
        slices = range(volume.shape[axis])
        frames = [normalize_intensity(np.take(volume, i, axis=axis)[:, :, None], config) for i in slices]
        return frames, [f"slice_{i:04d}" for i in slices]
    if not path.is_dir():
        raise DataError(
            f"--video {path}: not a folder of frames nor a NIfTI volume (.nii, .nii.gz). Video files are not read; "
            "extract the frames first, e.g. `ffmpeg -i video.mp4 frames/%05d.png`."
        )
    files = index_files(path, IMAGE_SUFFIXES)
    if not files:
        raise DataError(f"--video {path}: the folder holds no frames ({', '.join(IMAGE_SUFFIXES)}).")
    names = sorted(files, key=natural_key)
    frames = []
    for name in names:
        image = to_hwc(read_file(files[name]), what=str(files[name]))
        if frames and image.shape[:2] != frames[0].shape[1:]:
            raise DataError(
                f"{files[name]} is {image.shape[0]}x{image.shape[1]} (HxW) but {files[names[0]]} is "
                f"{frames[0].shape[1]}x{frames[0].shape[2]}: all frames of a video must have one size."
            )
        frames.append(normalize_intensity(image, intensity))
    return frames, names
