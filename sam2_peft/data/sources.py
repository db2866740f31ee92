"""Load any supported source as `Splits` (a `datasets.DatasetDict`) with `image`, `mask`, `domain`, `image_id`.

    from sam2_peft.data import load_source
    splits = load_source("examples/data")                 # image/mask folder, with or without train/ val/ test/
    splits = load_source("user/some-dataset", image_column="img", mask_column="label")   # Hub or HF cache
    splits = load_source("saved_dataset_dir")             # datasets' save_to_disk output
    splits = load_source("annotations.json")              # COCO instances (polygons and RLE)
    splits = load_source("volumes_dir")                   # the folder layout with .nii/.nii.gz files
    splits.skipped["train"]                               # {"empty slices (NIfTI)": 40}: what conversion left out

Split names are normalised to `train`, `val` and `test`. A source without a validation split gets one cut from
`train` with a seeded fraction (`val_fraction`), so every run on the same data validates on the same images.
Image and mask cells are kept undecoded (`datasets.Image(decode=False)`: paths or bytes): the training dataset
decodes them itself so that 16-bit and float images never pass through an 8-bit conversion. Array and list columns
(`Array2D`, `List(List(Value("uint8")))`, ...) come out as arrays of their declared dtype, so an 8-bit image stored
that way is scaled exactly like the same image stored as an `Image`.

Hub ids without network: `datasets.load_dataset` offline only finds datasets it has prepared before (its own
cache, HF_DATASETS_CACHE). A snapshot of the dataset repo in the Hub cache (HF_HUB_CACHE, as written by
`hf download user/name --repo-type dataset` on a machine with network) is found too: it is loaded as the local
folder it is when `load_dataset` fails.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import datasets
import huggingface_hub
import numpy as np
from huggingface_hub.errors import IncompleteSnapshotError, LocalEntryNotFoundError

from sam2_peft.data.annotations import load_coco
from sam2_peft.data.conversion import Conversion
from sam2_peft.data.io import IMAGE_SUFFIXES, MASK_SUFFIXES, DataError, row_features
from sam2_peft.data.nifti import slice_nifti_pairs

SPLITS = ("train", "val", "test")
VAL_SPLIT_NAMES = ("validation", "val", "valid", "dev")
NIFTI_SUFFIXES = (".nii", ".nii.gz")

logger = logging.getLogger(__name__)


class Splits(datasets.DatasetDict):
    """What `load_source` returns: a `DatasetDict` of some of `train`, `val`, `test`, and what loading skipped.

    Attributes:
        skipped: split -> reason -> count of the items a converting source (COCO, NIfTI) left out of that split, for
            every split (`{}` where nothing was). A validation split cut from `train` has `{}`: the counts describe
            the whole source and are reported once, with `train`.
    """

    def __init__(self, splits: Mapping[str, datasets.Dataset] | None = None,
                 skipped: Mapping[str, Mapping[str, int]] | None = None):
        super().__init__(splits or {})
        skipped = dict(skipped or {})
        if unknown := sorted(set(skipped) - set(self)):
            raise ValueError(f"skipped counts for {unknown}, which are not splits ({sorted(self)}).")
        self.skipped: dict[str, dict[str, int]] = {name: dict(skipped.get(name, {})) for name in self}

    @classmethod
    def from_conversions(cls, conversions: Mapping[str, Conversion]) -> Splits:
        """The splits of converted sources, each with its rows and skip counts."""
        return cls(
            {name: c.rows for name, c in conversions.items()}, {name: c.skipped for name, c in conversions.items()}
        )


def load_source(
    data: str | os.PathLike | datasets.Dataset | datasets.DatasetDict,
    *,
    image_column: str = "image",
    mask_column: str = "mask",
    domain_column: str | None = None,
    train_split: str = "train",
    val_split: str | None = None,
    test_split: str = "test",
    val_fraction: float = 0.1,
    seed: int = 0,
    revision: str | None = None,
    coco_image_dir: str | os.PathLike | None = None,
    mask_type: str = "instance",
    nifti_axis: int = 2,
) -> Splits:
    """Load `data` as splits with the columns `image`, `mask`, `image_id` and `domain`, and what was skipped.

    Args:
        data: an image/mask folder, a folder written by `save_to_disk`, a COCO `.json` file, a folder of NIfTI
            volumes in the image/mask layout, an in-memory `Dataset`/`DatasetDict`, or a Hub dataset id (loaded with
            `datasets.load_dataset`; without network, from the datasets cache or a snapshot in the Hub cache, with
            `HF_HUB_OFFLINE=1`).
        image_column: column holding images in a `datasets` source.
        mask_column: column holding label maps in a `datasets` source.
        domain_column: optional column naming each row's domain (e.g. scanner or site), reported per domain.
        train_split: name of the training split in a `datasets` source.
        val_split: name of its validation split (default: the first of validation/val/valid/dev present).
        test_split: name of its test split.
        val_fraction: fraction of `train` held out as `val` when the source has no validation split (0 for none).
        seed: seed of that hold-out.
        revision: dataset revision for Hub ids.
        coco_image_dir: folder the COCO `file_name`s are relative to (default: `images/` next to the json, else the
            json's folder).
        mask_type: for COCO, `instance` label maps or `semantic` ones of `category_id`s (other sources come with
            their label maps).
        nifti_axis: axis along which NIfTI volumes are cut into 2-D slices (2 = axial for RAS volumes).

    Returns:
        `Splits`: a `DatasetDict` with some of the splits `train`, `val`, `test`, whose `skipped` holds, per split,
        what a converting source (COCO, NIfTI) left out by reason.

    Example:
        >>> splits = load_source("examples/data")
        >>> sorted(splits)
        ['train', 'val']
    """
    if isinstance(data, (datasets.Dataset, datasets.DatasetDict)):
        splits = _from_datasets(data, image_column, mask_column, domain_column, train_split, val_split, test_split)
        if isinstance(data, Splits):  # loaded before: its counts stay with it
            splits.skipped.update({name: dict(counts) for name, counts in data.skipped.items() if name in splits})
    else:
        path = Path(data)
        if path.is_file() and path.suffix.lower() == ".json":
            coco = load_coco(path, image_dir=coco_image_dir, mask_type=mask_type)
            splits = Splits.from_conversions({"train": coco})
        elif path.is_dir() and _is_saved_dataset(path):
            loaded = datasets.load_from_disk(str(path))
            splits = _from_datasets(loaded, image_column, mask_column, domain_column, train_split, val_split, test_split)
        elif path.is_dir() and _is_folder_layout(path):
            splits = load_folder(path, nifti_axis=nifti_axis)
        elif path.exists():
            raise DataError(
                f"{path} is neither an image/mask folder (images/ and masks/, optionally under train/ val/ test/), a "
                "folder written by `Dataset.save_to_disk`, nor a COCO .json file. See the folder layout in the README."
            )
        else:
            loaded = _load_hub(str(data), revision)
            splits = _from_datasets(loaded, image_column, mask_column, domain_column, train_split, val_split, test_split)
    splits = _hold_out_val(splits, val_fraction, seed)
    for name, counts in splits.skipped.items():
        if counts:
            logger.info("Split %r: loading skipped %s.", name, "; ".join(f"{n} {r}" for r, n in sorted(counts.items())))
    return splits


def load_folder(root: str | os.PathLike, *, nifti_axis: int = 2) -> Splits:
    """Load the image/mask folder layout: `root/images/<stem>.*` + `root/masks/<stem>.*`, or per split subfolders.

    NIfTI volumes (`.nii`, `.nii.gz`) in the same layout are sliced along `nifti_axis`.
    """
    root = Path(root)
    present = [s for s in SPLITS if _has_pairs_layout(root / s)]
    if _has_pairs_layout(root):
        if present:
            raise DataError(
                f"{root} has both images/ + masks/ and split subfolders ({', '.join(present)}/); keep one layout."
            )
        return Splits.from_conversions({"train": _folder_split(root, nifti_axis)})
    if not present:
        raise DataError(f"{root} has no images/ and masks/ folders, at the top or under {', '.join(SPLITS)}/.")
    return Splits.from_conversions({split: _folder_split(root / split, nifti_axis) for split in present})


def _folder_split(folder: Path, nifti_axis: int) -> Conversion:
    images = _index_files(folder / "images", IMAGE_SUFFIXES + NIFTI_SUFFIXES)
    masks = _index_files(folder / "masks", MASK_SUFFIXES + NIFTI_SUFFIXES)
    if not images:
        raise DataError(
            f"{folder / 'images'} holds no images ({', '.join(IMAGE_SUFFIXES + NIFTI_SUFFIXES)}); add images or point "
            "`data` at another folder."
        )
    missing = sorted(set(images) - set(masks))
    if missing:
        raise DataError(
            f"{len(missing)} image(s) in {folder / 'images'} have no mask in {folder / 'masks'} with the same stem, "
            f"e.g. {images[missing[0]].name} (expected masks/{missing[0]}.png or .tif). Add the masks or move those "
            "images out."
        )
    orphans = sorted(set(masks) - set(images))
    if orphans:
        raise DataError(
            f"{len(orphans)} mask(s) in {folder / 'masks'} have no image with the same stem, e.g. "
            f"{masks[orphans[0]].name}. Rename them to match their images or remove them."
        )
    stems = sorted(images)
    if any(_is_nifti(images[s]) for s in stems):
        return slice_nifti_pairs([(s, images[s], masks[s]) for s in stems], axis=nifti_axis)
    rows = datasets.Dataset.from_dict(
        {
            "image": [{"path": str(images[s]), "bytes": None} for s in stems],
            "mask": [{"path": str(masks[s]), "bytes": None} for s in stems],
            "image_id": stems,
            "domain": [None] * len(stems),
        },
        features=row_features(),
    )
    return Conversion(rows, {})


def _index_files(folder: Path, suffixes: tuple[str, ...]) -> dict[str, Path]:
    files: dict[str, Path] = {}
    if not folder.is_dir():
        return files
    for path in sorted(folder.iterdir()):
        name = path.name.lower()
        suffix = next((s for s in suffixes if name.endswith(s)), None)
        if suffix is None or not path.is_file():
            continue
        stem = path.name[: -len(suffix)]
        if stem in files:
            raise DataError(f"{folder} has two files with the stem {stem!r} ({files[stem].name}, {path.name}); keep one.")
        files[stem] = path
    return files


def _is_nifti(path: Path) -> bool:
    return path.name.lower().endswith(NIFTI_SUFFIXES)


def _has_pairs_layout(folder: Path) -> bool:
    return (folder / "images").is_dir() or (folder / "masks").is_dir()


def _is_folder_layout(folder: Path) -> bool:
    return _has_pairs_layout(folder) or any((folder / s).is_dir() for s in SPLITS)


def _is_saved_dataset(folder: Path) -> bool:
    return (folder / "dataset_dict.json").is_file() or (folder / "state.json").is_file()


def _load_hub(repo_id: str, revision: str | None) -> datasets.DatasetDict:
    try:
        return datasets.load_dataset(repo_id, revision=revision)
    except (OSError, ValueError) as err:
        hub_error = err
    # Offline, `load_dataset` only looks in its own cache of prepared datasets, never at repo snapshots in the Hub
    # cache; such a snapshot is a plain folder of data files that `load_dataset` reads like any local folder.
    # `local_files_only` keeps this from downloading a whole repo when the Hub answered but loading failed.
    hub_cache = Path(huggingface_hub.constants.HF_HUB_CACHE) / f"datasets--{repo_id.replace('/', '--')}"
    try:
        snapshot = huggingface_hub.snapshot_download(
            repo_id, repo_type="dataset", revision=revision, local_files_only=True
        )
        return datasets.load_dataset(snapshot)
    except (OSError, ValueError) as err:
        absent = isinstance(err, LocalEntryNotFoundError) and not isinstance(err, IncompleteSnapshotError)
        cache_note = (
            f"The Hub cache has no snapshot of it ({hub_cache})."
            if absent
            else f"Its snapshot in the Hub cache ({hub_cache}) did not load ({type(err).__name__}: {err})."
        )
    raise DataError(
        f"data={repo_id!r} is not a local folder or file, and `datasets.load_dataset` could not load it as a Hub "
        f"dataset ({type(hub_error).__name__}: {hub_error}). {cache_note} Without network, pass one of: an "
        "image/mask folder; a folder written by `DatasetDict.save_to_disk`; or the Hub id, with HF_HUB_OFFLINE=1 "
        f"set and a snapshot of the dataset repo in the Hub cache ({hub_cache}/refs/main + snapshots/<commit>/, "
        f"e.g. from `hf download {repo_id} --repo-type dataset` on a machine with network, copied over; "
        "HF_HUB_CACHE moves the cache)."
    ) from hub_error


def _from_datasets(
    data: datasets.Dataset | datasets.DatasetDict,
    image_column: str,
    mask_column: str,
    domain_column: str | None,
    train_split: str,
    val_split: str | None,
    test_split: str,
) -> Splits:
    if isinstance(data, datasets.Dataset):
        data = datasets.DatasetDict({train_split: data})
    names = {train_split: "train", test_split: "test"}
    val_names = (val_split,) if val_split else VAL_SPLIT_NAMES
    val_name = next((n for n in val_names if n in data), None)
    if val_split and val_name is None:
        raise DataError(f"val_split={val_split!r} is not a split of this dataset (splits: {sorted(data)}).")
    if val_name:
        names[val_name] = "val"
    if train_split not in data:
        raise DataError(
            f"train_split={train_split!r} is not a split of this dataset (splits: {sorted(data)}); pass "
            "`train_split=` with one of them."
        )
    return Splits(
        {ours: _standard_columns(data[theirs], theirs, image_column, mask_column, domain_column)
         for theirs, ours in names.items() if theirs in data}
    )


def _standard_columns(
    split: datasets.Dataset, name: str, image_column: str, mask_column: str, domain_column: str | None
) -> datasets.Dataset:
    for flag, column in (("image_column", image_column), ("mask_column", mask_column), ("domain_column", domain_column)):
        if column is not None and column not in split.column_names:
            raise DataError(
                f"{flag}={column!r} is not a column of split {name!r} (columns: {split.column_names}); pass "
                f"`{flag}=` with the right name."
            )
    # A format set by the caller (numpy, torch) would hand over int64 arrays whatever the declared dtype.
    split = split.with_format(None)
    # Undecoded cells keep 16-bit and float images exact; array and list cells get their declared dtype on access.
    dtypes = {}
    for column, ours in ((image_column, "image"), (mask_column, "mask")):
        if isinstance(split.features[column], datasets.Image):
            split = split.cast_column(column, datasets.Image(decode=False))
        elif (dtype := declared_dtype(split.features[column])) is not None:
            dtypes[ours] = dtype
    columns: dict[str, Any] = {image_column: "image", mask_column: "mask"}
    if domain_column:
        columns[domain_column] = "domain"
    keep = [c for c in split.column_names if c in columns]
    split = split.select_columns(keep)
    split = split.rename_columns({c: columns[c] for c in keep if columns[c] != c})
    if "domain" not in split.column_names:
        split = split.add_column("domain", [None] * len(split))
    else:
        split = split.cast_column("domain", datasets.Value("string"))
    split = split.add_column("image_id", [f"{name}/{i}" for i in range(len(split))])
    if dtypes:
        # Lazy: a cast per row read, no copy of the data (a `map` would write every array once more).
        cast = functools.partial(cast_arrays, dtypes=dtypes)
        split = split.with_transform(cast, columns=list(dtypes), output_all_columns=True)
    return split


def declared_dtype(feature: Any) -> np.dtype | None:
    """Return the numeric element dtype of an `Array2D..5D` or (nested) `List`/`Sequence` feature, else None.

    Example:
        >>> declared_dtype(datasets.List(datasets.List(datasets.Value("uint8"))))
        dtype('uint8')
    """
    while isinstance(feature, (datasets.List, datasets.LargeList)):  # `Sequence(...)` builds a `List`
        feature = feature.feature
    if isinstance(feature, (datasets.Array2D, datasets.Array3D, datasets.Array4D, datasets.Array5D)):
        return np.dtype(feature.dtype)
    if isinstance(feature, datasets.Value):
        try:
            dtype = np.dtype(feature.dtype)
        except TypeError:  # string, binary, timestamp, ...
            return None
        return dtype if dtype.kind in "biuf" else None
    return None


def cast_arrays(batch: dict[str, list], dtypes: dict[str, np.dtype]) -> dict[str, list]:
    """Turn the list cells of a batch into arrays of their declared dtypes (a `with_transform` function).

    `datasets` returns array and list cells as nested Python lists, which numpy reads back as int64 or float64: an
    8-bit image would then get percentile scaling instead of 1/255.
    """
    for column, dtype in dtypes.items():
        if column in batch:
            batch[column] = [_as_array(value, dtype) for value in batch[column]]
    return batch


def _as_array(value: Any, dtype: np.dtype) -> Any:
    if value is None:
        return None
    try:
        return np.asarray(value, dtype=dtype)
    except ValueError:  # ragged nested lists: left as they are for `decode_row` to report with the row's name
        return value


def _hold_out_val(splits: Splits, val_fraction: float, seed: int) -> Splits:
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"val_fraction={val_fraction} must be in [0, 1).")
    if "val" in splits or "train" not in splits or val_fraction == 0.0 or len(splits["train"]) < 2:
        return splits
    train = splits["train"]
    # Slices of one volume (ids "<volume>/<axis>:<index>") must land on one side, or validation sees its neighbours.
    groups = [image_id.rsplit("/", 1)[0] for image_id in train["image_id"]]
    out = dict(splits)
    if len(set(groups)) == len(groups):
        held = train.train_test_split(test_size=val_fraction, seed=seed, shuffle=True)
        out["train"], out["val"] = held["train"], held["test"]
    else:
        order = sorted(set(groups))
        np.random.default_rng(seed).shuffle(order)
        sizes = {group: groups.count(group) for group in order}
        held_out, count = set(), 0
        for group in order[:-1]:  # at least one volume stays in train
            if count >= val_fraction * len(groups):
                break
            held_out.add(group)
            count += sizes[group]
        out["train"] = train.select([i for i, group in enumerate(groups) if group not in held_out])
        out["val"] = train.select([i for i, group in enumerate(groups) if group in held_out])
    # A converting source's skipped counts describe all of it: they stay with train only (the new val gets none).
    return Splits({s: out[s] for s in SPLITS if s in out}, splits.skipped)
