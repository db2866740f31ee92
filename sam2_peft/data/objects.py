"""Label maps to objects: one binary target per instance (or per class present), with their boxes.

    objects = extract_objects(label_map, mask_type="instance", min_object_area=10)
    objects.masks        # (N, H, W) bool
    objects.ids          # (N,) the label value of each object (the class id for semantic maps)
    objects.dropped      # {"too small": k}
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

TOO_SMALL = "objects under min_object_area"


@dataclass
class Objects:
    """The objects of one label map.

    Attributes:
        masks: (N, H, W) bool, one mask per object.
        ids: (N,) int64 label values; for semantic maps these are the class ids.
        dropped: objects left out, by reason.
    """

    masks: np.ndarray
    ids: np.ndarray
    dropped: dict[str, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.ids)


def extract_objects(label_map: np.ndarray, *, mask_type: str = "instance", min_object_area: int = 0) -> Objects:
    """Split an (H, W) label map into binary objects, largest label value last.

    Instance and semantic maps split the same way (one target per non-zero value); `mask_type` only decides what
    the value means downstream (instance ids are renumbered by `class_ids`, class ids are kept).

    Args:
        label_map: (H, W) integer labels, 0 = background.
        mask_type: `instance` or `semantic`.
        min_object_area: objects with fewer pixels are dropped and counted.

    Example:
        >>> extract_objects(np.array([[0, 1], [2, 2]])).ids.tolist()
        [1, 2]
    """
    ids, areas = np.unique(label_map, return_counts=True)
    keep = ids != 0
    ids, areas = ids[keep], areas[keep]
    small = areas < min_object_area
    dropped = {TOO_SMALL: int(small.sum())} if small.any() else {}
    ids = ids[~small].astype(np.int64)
    masks = label_map[None] == ids[:, None, None]
    return Objects(masks=masks, ids=ids, dropped=dropped)


def class_ids(objects: Objects, mask_type: str) -> np.ndarray:
    """Return the class id of each object: the label for semantic maps, 1 (one foreground class) for instances."""
    if mask_type == "semantic":
        return objects.ids.copy()
    return np.ones_like(objects.ids)


def mask_to_box(masks: np.ndarray) -> np.ndarray:
    """Return the tight `x_min, y_min, x_max, y_max` pixel indices of each (N, H, W) mask, as (N, 4) float32.

    Empty masks give `0, 0, 0, 0`, as official SAM2's `mask_to_box` does.
    """
    rows = masks.any(axis=2)  # (N, H)
    cols = masks.any(axis=1)  # (N, W)
    boxes = np.zeros((masks.shape[0], 4), np.float32)
    present = rows.any(axis=1)
    if present.any():
        height, width = masks.shape[1:]
        boxes[present, 0] = cols[present].argmax(axis=1)
        boxes[present, 1] = rows[present].argmax(axis=1)
        boxes[present, 2] = width - 1 - cols[present][:, ::-1].argmax(axis=1)
        boxes[present, 3] = height - 1 - rows[present][:, ::-1].argmax(axis=1)
    return boxes
