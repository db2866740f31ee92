"""Clips (frame folders and NIfTI volumes): discovery, refusals, items checked against the files read with numpy."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from torch.nn import functional as F

from sam2_peft.data import (
    ClipDataset,
    DataError,
    EvalPrompt,
    IntensityConfig,
    Preprocessor,
    PromptConfig,
    collate_clips,
    load_clips,
    normalize_intensity,
    read_video,
)
from sam2_peft.data.config import DataConfig
from sam2_peft.errors import ConfigError

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "data_video"
S = 64
PRE = Preprocessor(image_size=S)


def moving_labels(num_frames: int, size: tuple[int, int] = (20, 24), enters: int = 3) -> np.ndarray:
    """(T, H, W) uint8: object 1 drifts right in every frame, object 2 enters at frame `enters`, hides at 5, returns."""
    labels = np.zeros((num_frames, *size), np.uint8)
    for t in range(num_frames):
        labels[t, 2:8, 1 + t : 7 + t] = 1
        if t >= enters and t != 5:
            labels[t, 12:18, 10:16 + t % 3] = 2
    return labels


def write_clip(root: Path, name: str, labels: np.ndarray, names: list[str] | None = None, rgb: bool = False) -> None:
    """Write `root/videos/<name>/<frame>.png` (random 8-bit frames) and `root/masks/<name>/<frame>.png`."""
    rng = np.random.default_rng(len(name))
    names = names or [f"{t:03d}" for t in range(len(labels))]
    (root / "videos" / name).mkdir(parents=True, exist_ok=True)
    (root / "masks" / name).mkdir(parents=True, exist_ok=True)
    for stem, label_map in zip(names, labels):
        shape = (*label_map.shape, 3) if rgb else label_map.shape
        PIL.Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(root / "videos" / name / f"{stem}.png")
        PIL.Image.fromarray(label_map).save(root / "masks" / name / f"{stem}.png")


def write_volume(root: Path, stem: str, volume: np.ndarray, labels: np.ndarray) -> None:
    import nibabel

    for folder, array in (("images", volume), ("masks", labels)):
        (root / folder).mkdir(parents=True, exist_ok=True)
        nibabel.save(nibabel.Nifti1Image(array, np.eye(4)), root / folder / f"{stem}.nii.gz")


def nearest(label_map: np.ndarray, size: int) -> np.ndarray:
    """Reference resize: nearest neighbour at pixel centres, by index arithmetic."""
    rows = np.floor((np.arange(size) + 0.5) * label_map.shape[0] / size).astype(int)
    cols = np.floor((np.arange(size) + 0.5) * label_map.shape[1] / size).astype(int)
    return label_map[rows][:, cols]


def model_input(image01: np.ndarray) -> torch.Tensor:
    """Reference model input of a (3, H, W) [0, 1] image: antialiased bilinear resize, ImageNet normalisation."""
    resized = F.interpolate(torch.from_numpy(image01)[None], size=(S, S), mode="bilinear", antialias=True)[0]
    mean, std = torch.tensor(PRE.image_mean)[:, None, None], torch.tensor(PRE.image_std)[:, None, None]
    return (resized - mean) / std


def test_layout_discovery_with_splits_and_hold_out(tmp_path):
    for split, count in (("train", 2), ("val", 1)):
        for i in range(count):
            write_clip(tmp_path / "split" / split, f"{split}{i}", moving_labels(4))
    splits = load_clips(tmp_path / "split")
    found = {name: [c.clip_id for c in clips] for name, clips in splits.items()}
    assert found == {"train": ["train0", "train1"], "val": ["val0"]}
    for i in range(5):
        write_clip(tmp_path / "flat", f"clip{i}", moving_labels(4))
    held = load_clips(tmp_path / "flat", val_fraction=0.3, seed=1)
    train, val = ([c.clip_id for c in held[s]] for s in ("train", "val"))
    assert len(val) == 2 and sorted(train + val) == [f"clip{i}" for i in range(5)]  # ceil(0.3 * 5)
    again = DataConfig(data=str(tmp_path / "flat"), task="video", val_fraction=0.3).load_clip_splits(seed=1)
    assert [c.clip_id for c in again["val"]] == val
    by_seed = {tuple(c.clip_id for c in load_clips(tmp_path / "flat", val_fraction=0.3, seed=s)["val"])
               for s in range(6)}
    assert by_seed != {tuple(val)}, "the hold-out follows the seed"
    assert list(load_clips(tmp_path / "flat", val_fraction=0)) == ["train"]


def test_frames_in_natural_order(tmp_path):
    names = ["frame10", "frame2", "Frame1", "frame_x", "frame3"]
    write_clip(tmp_path, "c", moving_labels(5), names=names)
    clip = load_clips(tmp_path, val_fraction=0)["train"][0]
    assert clip.frame_names == ("Frame1", "frame2", "frame3", "frame10", "frame_x")
    assert [p.stem for p in clip.mask_paths] == list(clip.frame_names)
    _, video_names = read_video(tmp_path / "videos" / "c")
    assert video_names == list(clip.frame_names)


def _frame_without_mask(root):
    write_clip(root, "c", moving_labels(3))
    (root / "masks" / "c" / "001.png").unlink()
    return "videos/c/001.png"


def _mask_without_frame(root):
    write_clip(root, "c", moving_labels(3))
    (root / "videos" / "c" / "002.png").unlink()
    return "masks/c/002.png"


def _clip_without_masks(root):
    write_clip(root, "c", moving_labels(3))
    write_clip(root, "d", moving_labels(3))
    for path in (root / "masks" / "d").iterdir():
        path.unlink()
    (root / "masks" / "d").rmdir()
    return "videos/d"


def _masks_without_clip(root):
    write_clip(root, "c", moving_labels(3))
    (root / "masks" / "ghost").mkdir()
    return "masks/ghost"


def _empty_clip(root):
    write_clip(root, "c", moving_labels(3))
    (root / "videos" / "e").mkdir()
    (root / "masks" / "e").mkdir()
    return "videos/e"


def _video_file(root):
    write_clip(root, "c", moving_labels(3))
    (root / "videos" / "movie.mp4").write_bytes(b"\0")
    return "videos/movie.mp4"


def _png_in_volume_folder(root):
    write_clip(root, "c", moving_labels(3))
    (root / "images").mkdir()
    PIL.Image.fromarray(np.zeros((4, 4), np.uint8)).save(root / "images" / "a.png")
    return "images/a.png"


def _volume_shapes_differ(root):
    write_volume(root, "ct", np.zeros((4, 4, 3), np.int16), np.zeros((4, 5, 3), np.uint8))
    return "images/ct.nii.gz"


@pytest.mark.parametrize(
    "make",
    [_frame_without_mask, _mask_without_frame, _clip_without_masks, _masks_without_clip, _empty_clip, _video_file,
     _png_in_volume_folder, _volume_shapes_differ],
)
def test_layout_refusals_name_the_file(tmp_path, make):
    named = make(tmp_path)
    with pytest.raises(DataError, match=str(tmp_path / named).replace(".", r"\.")):
        load_clips(tmp_path, val_fraction=0)


def _masks_of_two_sizes(root):
    write_clip(root, "c", moving_labels(3))
    PIL.Image.fromarray(np.zeros((10, 10), np.uint8)).save(root / "masks" / "c" / "002.png")
    return "masks/c/002.png"


def _frame_and_mask_sizes_differ(root):
    write_clip(root, "c", moving_labels(3))
    PIL.Image.fromarray(np.zeros((10, 10), np.uint8)).save(root / "videos" / "c" / "001.png")
    return "videos/c/001.png"


def _palettes_disagree(root):
    labels = moving_labels(3)
    write_clip(root, "c", labels)
    for t, colours in ((0, [0, 0, 0, 255, 0, 0, 0, 255, 0]), (2, [0, 0, 0, 0, 255, 0, 255, 0, 0])):
        image = PIL.Image.fromarray(labels[t], mode="P")
        image.putpalette(colours)
        image.save(root / "masks" / "c" / f"{t:03d}.png")
    return "masks/c/002.png"


def _colour_mask(root):
    write_clip(root, "c", moving_labels(3))
    rgb = np.zeros((20, 24, 3), np.uint8)
    rgb[2:5, 2:5] = (255, 0, 0)
    PIL.Image.fromarray(rgb).save(root / "masks" / "c" / "001.png")
    return "masks/c/001.png"


@pytest.mark.parametrize("make", [_masks_of_two_sizes, _frame_and_mask_sizes_differ, _palettes_disagree, _colour_mask])
def test_content_refusals_name_the_file(tmp_path, make):
    named = make(tmp_path)
    clips = load_clips(tmp_path, val_fraction=0)["train"]
    with pytest.raises(DataError, match=str(tmp_path / named).replace(".", r"\.")):
        ClipDataset(clips, PRE, prompts="box")


def test_consistent_palettes_and_reappearing_objects_are_accepted(tmp_path):
    labels = moving_labels(7)
    write_clip(tmp_path, "c", labels)
    for t in range(7):  # one palette for the whole clip, as DAVIS writes it
        image = PIL.Image.fromarray(labels[t], mode="P")
        image.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0])
        image.save(tmp_path / "masks" / "c" / f"{t:03d}.png")
    item = ClipDataset(load_clips(tmp_path, val_fraction=0)["train"], PRE, prompts="box")[0]
    # Object 2 hides at frame 5 (occlusion) and comes back: one object, absent there only.
    np.testing.assert_array_equal(item["object_present"][:, 1].numpy(), [0, 0, 0, 1, 1, 0, 1])


def test_clips_without_objects_are_skipped_and_counted(tmp_path):
    write_clip(tmp_path, "a", moving_labels(4))
    write_clip(tmp_path, "b", np.zeros((4, 20, 24), np.uint8))
    dataset = ClipDataset(load_clips(tmp_path, val_fraction=0)["train"], PRE, clip_length=2, split="train")
    assert len(dataset) == 1 and dataset.report.skipped == {"clips without any object (skipped)": 1}
    assert "1 clips without any object" in dataset.report.format()
    write_clip(tmp_path / "none", "b", np.zeros((4, 20, 24), np.uint8))
    with pytest.raises(DataError, match="no usable clip"):
        ClipDataset(load_clips(tmp_path / "none", val_fraction=0)["train"], PRE)


def test_frame_folder_eval_item_matches_the_files(tmp_path):
    write_clip(tmp_path, "c", moving_labels(7), rgb=True)
    clip = load_clips(tmp_path, val_fraction=0)["train"][0]
    item = collate_clips([ClipDataset([clip], PRE, clip_length=3, prompts="box")[0]])[0]
    files = [np.array(PIL.Image.open(p)) for p in clip.mask_paths]
    frames = [np.array(PIL.Image.open(p)) for p in clip.frame_paths]
    expected = {
        "pixel_values": ((7, 3, S, S), torch.float32), "masks": ((7, 2, S, S), torch.bool),
        "object_present": ((7, 2), torch.bool), "prompt_frames": ((2,), torch.int64),
        "point_coords": ((2, 2, 2), torch.float32), "point_labels": ((2, 2), torch.int64),
        "object_ids": ((2,), torch.int64),
    }
    assert {k: (tuple(item[k].shape), item[k].dtype) for k in expected} == expected
    assert item["full_masks"].dtype == bool and item["full_masks"].shape == (7, 2, 20, 24)
    assert (item["original_size"], item["clip_id"], item["is_volume"]) == ((20, 24), "c", False)
    assert item["frame_names"] == [f"{t:03d}" for t in range(7)] and item["frame_indices"] == list(range(7))
    assert "mask_inputs" not in item and item["object_ids"].tolist() == [1, 2]
    for t in range(7):
        for n, value in enumerate((1, 2)):
            np.testing.assert_array_equal(item["full_masks"][t, n], files[t] == value)
            np.testing.assert_array_equal(item["masks"][t, n].numpy(), nearest(files[t], S) == value)
            assert item["object_present"][t, n] == (files[t] == value).any()
        reference = model_input(frames[t].transpose(2, 0, 1).astype(np.float32) / 255)
        torch.testing.assert_close(item["pixel_values"][t], reference, atol=1e-5, rtol=0)


def test_eval_prompts_on_each_objects_first_present_frame(tmp_path):
    labels = moving_labels(7, enters=3)
    write_clip(tmp_path, "c", labels)
    clips = load_clips(tmp_path, val_fraction=0)["train"]
    box = ClipDataset(clips, PRE, prompts="box")[0]
    assert box["prompt_frames"].tolist() == [0, 3]
    for n, (value, frame) in enumerate(((1, 0), (2, 3))):
        ys, xs = np.nonzero(labels[frame] == value)
        corners = np.array([[xs.min(), ys.min()], [xs.max(), ys.max()]], np.float32) * [S / 24, S / 20]
        np.testing.assert_allclose(box["point_coords"][n].numpy(), corners, atol=1e-5)
        assert box["point_labels"][n].tolist() == [2, 3]
    # points:K: K clicks inside the object on its prompt frame; one-click protocol pads nothing.
    dataset = ClipDataset(clips, PRE, prompts=EvalPrompt("points", 3))
    clicks = dataset[0]
    dataset.set_epoch(5)
    torch.testing.assert_close(dataset[0]["point_coords"], clicks["point_coords"])  # evaluation ignores the epoch
    for n, (value, frame) in enumerate(((1, 0), (2, 3))):
        x, y = (clicks["point_coords"][n].numpy() / [S / 24, S / 20]).round().astype(int).T
        assert (labels[frame][y, x] == value).all() and clicks["point_labels"][n].tolist() == [1, 1, 1]
    # With min_object_area, an object is prompted where it first reaches it, and one that never does is dropped.
    large = ClipDataset(clips, PRE, prompts="point", min_object_area=40)[0]
    first_large = next(t for t in range(7) if (labels[t] == 2).sum() >= 40)
    assert (labels == 1).sum(axis=(1, 2)).max() < 40 and first_large > 3
    assert large["object_ids"].tolist() == [2] and large["prompt_frames"].tolist() == [first_large]
    assert large["dropped"] == {"objects under min_object_area in every frame": 1}


def test_training_windows_are_seeded_by_seed_epoch_and_index(tmp_path):
    labels = moving_labels(12, enters=3)
    labels[:2] = 0  # windows must not start on these empty frames
    write_clip(tmp_path, "c", labels)
    clips = load_clips(tmp_path, val_fraction=0)["train"]
    prompts = PromptConfig(num_negative=1)

    def draws(seed, epoch):
        dataset = ClipDataset(clips, PRE, clip_length=4, prompts=prompts, seed=seed)
        dataset.set_epoch(epoch)
        return dataset[0]

    first, again = draws(0, 0), draws(0, 0)
    assert first["frame_indices"] == again["frame_indices"]
    torch.testing.assert_close(first["point_coords"], again["point_coords"])
    windows = {tuple(draws(0, epoch)["frame_indices"]) for epoch in range(12)}
    assert len(windows) > 1, "the window start must change across epochs"
    for epoch in range(12):
        item = draws(0, epoch)
        start = item["frame_indices"][0]
        assert item["frame_indices"] == list(range(start, start + 4)) and 2 <= start <= 8
        present = [v for v in (1, 2) if (labels[start] == v).any()]
        assert item["object_ids"].tolist() == present and item["prompt_frames"].tolist() == [0] * len(present)
        entering = [v for v in (1, 2) if v not in present and (labels[start : start + 4] == v).any()]
        assert item["dropped"] == ({"objects absent from the window's first frame": len(entering)} if entering else {})
        # One kind of prompt per clip: a box (2 points) or 1 positive + 1 negative click, the same for every object.
        assert item["point_coords"].shape[1] == 2 and len(set(map(tuple, item["point_labels"].tolist()))) == 1
        # Present where the loss's target (at model resolution) has the object.
        np.testing.assert_array_equal(item["masks"].flatten(2).any(-1).numpy(), item["object_present"].numpy())
    with pytest.raises(ValueError, match="mask prompts"):
        ClipDataset(clips, PRE, prompts=PromptConfig(mask_prompts=True))


def test_short_clips_use_all_frames_and_caps_are_seeded(tmp_path):
    write_clip(tmp_path, "c", moving_labels(5, enters=0))
    dataset = ClipDataset(load_clips(tmp_path, val_fraction=0)["train"], PRE, clip_length=10, max_objects_per_clip=1)
    assert dataset.report.short_clips == 1 and "1 clips shorter than clip_length=10" in dataset.report.format()
    items = []
    for epoch in range(6):
        dataset.set_epoch(epoch)
        items.append(dataset[0])
    assert all(item["frame_indices"] == list(range(5)) for item in items)
    assert all(item["dropped"] == {"objects over max_objects_per_clip (this draw)": 1} for item in items)
    assert {item["object_ids"].item() for item in items} == {1, 2}


def test_nifti_volume_is_a_clip_with_volume_wide_intensity(tmp_path):
    rng = np.random.default_rng(0)
    volume = rng.integers(-1000, 1500, (16, 12, 5)).astype(np.int16)
    volume[..., 4] = 0  # a flat slice: per-slice percentiles would differ from the volume's
    labels = np.zeros((16, 12, 5), np.uint8)
    labels[3:9, 2:7, 1:4] = 1
    labels[10:14, 8:11, 2:5] = 2
    write_volume(tmp_path, "ct", volume, labels)
    clips = DataConfig(data=str(tmp_path), task="video", val_fraction=0, nifti_axis=2).load_clip_splits()["train"]
    assert len(clips) == 1 and clips[0].is_volume
    item = ClipDataset(clips, PRE, prompts="box")[0]
    assert item["frame_names"] == [f"slice_{i:04d}" for i in range(5)] and item["is_volume"]
    assert item["pixel_values"].shape == (5, 3, S, S) and item["full_masks"].shape == (5, 2, 16, 12)
    assert item["prompt_frames"].tolist() == [1, 2] and item["clip_id"] == "ct"
    for t in range(5):
        np.testing.assert_array_equal(item["full_masks"][t, 0], labels[:, :, t] == 1)
    # Reference: the whole volume normalised as one image (its percentiles), then cut into slices.
    whole = normalize_intensity(volume.transpose(2, 0, 1).reshape(5 * 16, 12)[:, :, None])  # (3, 5*16, 12)
    for t in range(5):
        reference = model_input(np.ascontiguousarray(whole[:, t * 16 : (t + 1) * 16]))
        torch.testing.assert_close(item["pixel_values"][t], reference, atol=1e-5, rtol=0)
    frames, names = read_video(tmp_path / "images" / "ct.nii.gz", IntensityConfig(mode="window", window="abdomen"))
    assert names == item["frame_names"] and frames[0].shape == (3, 16, 12)
    np.testing.assert_allclose(frames[3][0], np.clip((volume[:, :, 3] + 160) / 400, 0, 1), atol=1e-6)


def test_read_video_refuses_what_is_not_a_video(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(DataError, match=r"notes\.txt: not a folder of frames nor a NIfTI volume"):
        read_video(tmp_path / "notes.txt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty: the folder holds no frames"):
        read_video(tmp_path / "empty")


@pytest.mark.parametrize(
    "fields, message", [({"task": "audio"}, r"`--task audio` is unknown"), ({"clip_length": 0}, r"`--clip_length`")]
)
def test_task_and_clip_length_are_validated(fields, message):
    with pytest.raises(ConfigError, match=message):
        DataConfig(**fields)


def test_examples_data_video_loads_for_the_video_model():
    from sam2_peft.models import load_sam2

    preprocessor = Preprocessor.from_model(load_sam2("tiny-random", video=True))
    splits = DataConfig(data=str(EXAMPLES), task="video").load_clip_splits()
    assert {name: len(clips) for name, clips in splits.items()} == {"train": 3, "val": 1}
    train = ClipDataset(splits["train"], preprocessor, clip_length=4, prompts=PromptConfig())
    val = ClipDataset(splits["val"], preprocessor, prompts="box", split="val")
    item = train[0]
    assert item["pixel_values"].shape == (4, 3, 256, 256) and item["masks"].shape[-1] == 256
    assert val[0]["prompt_frames"].tolist() == [0, 2]  # the second object enters at frame 2
    frames, names = read_video(EXAMPLES / "val" / "videos" / "clip_val_000")
    assert len(frames) == len(names) == 8 and frames[0].shape == (3, 128, 128)
