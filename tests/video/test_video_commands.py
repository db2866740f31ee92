"""`sam2-peft track`, `eval --task video` and `train --task video` end to end on the tiny video preset."""

import json
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from safetensors.torch import load_file
from transformers import Sam2ImageProcessor, Sam2VideoProcessor
from transformers.models.sam2_video.video_processing_sam2_video import Sam2VideoVideoProcessor

from sam2_peft import finetune, tasks
from sam2_peft.checkpoints import save_checkpoint
from sam2_peft.cli import main
from sam2_peft.data import Preprocessor, PromptConfig
from sam2_peft.data.clips import ClipDataset, collate_clips
from sam2_peft.data.config import DataConfig
from sam2_peft.errors import ConfigError
from sam2_peft.hub import load_adapted, requires_video_model
from sam2_peft.models import load_sam2
from sam2_peft.strategies import apply_strategy
from sam2_peft.video import VideoSegmenter
from sam2_peft.video.tracking import track_video
from sam2_peft.video.training import ClipSegmenter

from test_video_segmenter import moving_blobs

SAMPLE = str(Path(__file__).resolve().parents[2] / "examples" / "data_video")
BOXES = [(50, 40, 120, 100), (150, 120, 210, 180)]


@pytest.fixture(scope="module")
def frame_folder(tmp_path_factory) -> tuple[Path, list[np.ndarray]]:
    folder = tmp_path_factory.mktemp("video") / "clip"
    folder.mkdir()
    frames = moving_blobs(6)
    for t, frame in enumerate(frames):
        PIL.Image.fromarray(frame).save(folder / f"img{t + 1}.png")  # natural order: img1 ... img6
    return folder, frames


def transformers_labels(frames: list[np.ndarray], start: int, first_label: int = 1, **inputs) -> np.ndarray:
    """Label maps from transformers alone: `Sam2VideoModel` tracking and `Sam2VideoProcessor`'s pre/post-processing,
    objects numbered from `first_label`."""
    model = load_sam2("tiny-random-video", video=True)
    processor = Sam2VideoProcessor(
        image_processor=Sam2ImageProcessor(size={"height": 256, "width": 256}, mask_size={"height": 64, "width": 64}),
        video_processor=Sam2VideoVideoProcessor(size={"height": 256, "width": 256}),
    )
    session = processor.init_video_session(video=frames, inference_device="cpu")
    count = len(next(iter(inputs.values()))[0])
    processor.add_inputs_to_inference_session(session, frame_idx=start, obj_ids=list(range(count)), **inputs)
    labels = np.zeros((len(frames), *frames[0].shape[:2]), np.uint16)
    for output in model.propagate_in_video_iterator(session, start_frame_idx=start):
        masks = processor.post_process_masks([output.pred_masks], original_sizes=[frames[0].shape[:2]])[0]
        for index, mask in enumerate(masks[:, 0].numpy()):
            labels[output.frame_idx][mask] = index + first_label
    return labels


def test_track_writes_label_maps_equal_to_transformers(frame_folder, tmp_path):
    folder, frames = frame_folder
    boxes = [",".join(str(v) for v in box) for box in BOXES]
    main(["track", "--model", "tiny-random-video", "--video", str(folder), "--box", boxes[0], "--box", boxes[1],
          "--frame", "1", "--output", str(tmp_path / "out")])
    written = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert written == ["img1.png", "img2.png", "img3.png", "img4.png", "img5.png", "img6.png", "overlay.png"]
    ours = np.stack([np.asarray(PIL.Image.open(tmp_path / "out" / f"img{t + 1}.png")) for t in range(6)])
    reference = transformers_labels(frames, start=1, input_boxes=[[list(box) for box in BOXES]])
    assert not ours[0].any()  # before the prompted frame
    assert set(np.unique(ours[1:])) == {0, 1, 2}
    # The same masks but where our resize of the frames (torch, as Sam2ImageProcessor) and the video processor's
    # (torchvision) round a pixel differently.
    assert (ours == reference).mean() > 0.999


def test_track_api_takes_arrays_like_the_folder(frame_folder):
    folder, frames = frame_folder
    model = load_sam2("tiny-random-video", video=True)
    from_arrays = track_video(model, frames, boxes=BOXES, frame=1, progress=False)
    from_folder = track_video(model, folder, boxes=BOXES, frame=1, progress=False)
    np.testing.assert_array_equal(from_arrays.labels, from_folder.labels)
    assert from_folder.frame_names == [f"img{t + 1}" for t in range(6)]
    with pytest.raises(ValueError, match="--frame 6 is outside"):
        track_video(model, frames, boxes=BOXES, frame=6)


def test_boxes_and_clicks_together_track_as_transformers_tracks_each(frame_folder):
    """A box decodes to one mask and a click to three: tracked together, each object still gets its own kind."""
    folder, frames = frame_folder
    model = load_sam2("tiny-random-video", video=True)
    ours = track_video(model, frames, boxes=BOXES[:1], points=[(180, 150)], frame=0, progress=False).labels
    # transformers tracks objects one by one: the box object alone, then the clicked one alone.
    box = transformers_labels(frames, start=0, input_boxes=[[list(BOXES[0])]])
    click = transformers_labels(frames, start=0, first_label=2, input_points=[[[[180, 150]]]], input_labels=[[[1]]])
    reference = np.where(click > 0, click, box)
    assert set(np.unique(ours)) == {0, 1, 2}
    assert (ours == reference).mean() > 0.999


def test_track_refuses_a_malformed_box(frame_folder, tmp_path):
    with pytest.raises(ConfigError, match=r"--box 1,2,3: expected 4 comma-separated numbers"):
        main(["track", "--model", "tiny-random-video", "--video", str(frame_folder[0]), "--box", "1,2,3",
              "--output", str(tmp_path)])


@pytest.fixture(scope="module")
def video_run(tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("run")
    main(["train", "--model", "tiny-random-video", "--task", "video", "--data", SAMPLE, "--strategy", "lora",
          "--targets", "trunk.qkv+memory.attn", "--max_steps", "2",
          "--batch_size", "2", "--clip_length", "4", "--eval_steps", "2", "--logging_steps", "1", "--learning_rate", "1e-3",
          "--output_dir", str(output)])
    return output


def test_training_outputs_hold_no_pointer_graph():
    """The loss does not read object pointers, so the training forward returns them detached: DDP would otherwise
    wait for gradients of the pointer projection that a one-frame clip never produces."""
    model = apply_strategy(load_sam2("tiny-random-video", video=True), "memory").train()
    clips = DataConfig(data=SAMPLE, task="video").load_clip_splits(seed=0)["train"]
    clip = collate_clips([ClipDataset(clips, Preprocessor.from_model(model), clip_length=1, prompts=PromptConfig())[0]])
    outputs = ClipSegmenter(model)(clip)
    assert len(outputs[0]) == 1 and not outputs[0][0][0].pointer.requires_grad
    assert outputs[0][0][0].mask_logits.requires_grad


def test_video_training_writes_a_video_adapter_and_logs_every_term(video_run):
    metrics = json.loads((video_run / "metrics.json").read_text())
    assert {"j", "f", "j_and_f", "dice"} <= set(metrics["best"])
    assert metrics["throughput"]["clips_per_s"] > 0
    history = json.loads((video_run / "history.json").read_text())["history"]
    assert {"loss", "focal_loss", "dice_loss", "iou_loss", "object_score_loss"} <= set(history[1])
    assert requires_video_model(video_run / "final")
    tensors = load_file(video_run / "final" / "adapter_model.safetensors")
    assert any(".memory_attention." in name for name in tensors)


def test_merge_folds_a_video_adapter_into_a_video_model(video_run, tmp_path, frame_folder):
    """`merge` of an adapter that trained the memory path writes a `Sam2VideoModel` folder that tracks as the
    adapter does."""
    main(["merge", "--model", "tiny-random-video", "--adapter", str(video_run / "final"), "--output_dir",
          str(tmp_path / "merged")])
    merged = load_sam2(str(tmp_path / "merged"), video=True)
    adapted = load_adapted("tiny-random-video", video_run / "final")
    frames = frame_folder[1]
    ours = track_video(merged, frames, boxes=BOXES, progress=False).labels
    assert (ours == track_video(adapted, frames, boxes=BOXES, progress=False).labels).mean() > 0.999
    name = "memory_attention.layers.0.self_attn.q_proj.weight"  # the LoRA on the memory attention, folded in
    assert not torch.equal(merged.state_dict()[name], load_sam2("tiny-random-video", video=True).state_dict()[name])


def test_video_eval_scores_equal_tracking_its_boxes(video_run, tmp_path):
    """`eval --task video` scores what tracking the objects' boxes gives, computed here with numpy."""
    main(["eval", "--task", "video", "--model", "tiny-random-video", "--adapter", str(video_run / "final"),
          "--data", SAMPLE, "--output_dir", str(tmp_path)])
    results = json.loads((tmp_path / "metrics.json").read_text())
    assert {"j", "f", "j_and_f", "dice"} <= set(results["fine_tuned"]) and "gain" in results
    assert (tmp_path / "overlay_clip_val_000.png").is_file()

    clip = Path(SAMPLE) / "val"
    labels = np.stack([np.asarray(PIL.Image.open(p)) for p in sorted((clip / "masks" / "clip_val_000").iterdir())])
    model = load_adapted("tiny-random-video", video_run / "final")
    per_object = results["fine_tuned"]["per_object"]
    for value in np.unique(labels[labels > 0]):
        first = int(np.argmax((labels == value).any(axis=(1, 2))))
        ys, xs = np.nonzero(labels[first] == value)
        tracked = track_video(model, clip / "videos" / "clip_val_000", frame=first, progress=False,
                              boxes=[(xs.min(), ys.min(), xs.max(), ys.max())]).labels == 1
        truth = labels == value
        union = (tracked | truth).sum(axis=(1, 2))
        j = np.where(union == 0, 1.0, (tracked & truth).sum(axis=(1, 2)) / np.maximum(union, 1)).mean()
        assert per_object[f"clip_val_000/{value}"]["j"] == pytest.approx(j, abs=1e-6)


class Interrupted(Exception):
    pass


def test_video_run_resumes_bit_identically(tmp_path, monkeypatch):
    """Stopped after its first checkpoint and resumed, a video run ends with an uninterrupted run's weights."""
    common = ["train", "--model", "tiny-random-video", "--task", "video", "--data", SAMPLE, "--strategy", "memory",
              "--max_steps", "4", "--batch_size", "2", "--clip_length", "3", "--eval_steps", "2",
              "--checkpoint_steps", "2", "--correction_rounds", "1", "--learning_rate", "1e-3", "--seed", "5"]
    main([*common, "--output_dir", str(tmp_path / "straight")])

    def save_then_stop(accelerator, state):
        save_checkpoint(accelerator, state)
        raise Interrupted

    monkeypatch.setattr(finetune, "save_checkpoint", save_then_stop)
    with pytest.raises(Interrupted):
        main([*common, "--output_dir", str(tmp_path / "resumed")])
    monkeypatch.undo()
    main([*common, "--output_dir", str(tmp_path / "resumed"), "--resume_from_checkpoint", "latest"])
    straight = load_file(tmp_path / "straight" / "final" / "trained_tensors.safetensors")
    resumed = load_file(tmp_path / "resumed" / "final" / "trained_tensors.safetensors")
    assert straight.keys() == resumed.keys() and any(name.startswith("memory_attention.") for name in straight)
    assert all(torch.equal(straight[name], resumed[name]) for name in straight)
    assert not torch.equal(straight["memory_attention.layers.0.self_attn.q_proj.weight"],
                           load_sam2("tiny-random-video", video=True).state_dict()["memory_attention.layers.0.self_attn.q_proj.weight"])


def test_frozen_encoder_runs_once_per_frame_with_the_frame_cache(tmp_path, monkeypatch):
    """With the `memory` strategy the encoder is frozen: each frame is encoded once, and training matches a run
    that encodes every frame every step (up to float rounding: the encoder then sees other batches of frames)."""
    encoded = []
    encode_levels = VideoSegmenter.encode_levels
    monkeypatch.setattr(VideoSegmenter, "encode_levels",
                        lambda self, pixels, **options: encoded.append(len(pixels)) or encode_levels(self, pixels, **options))
    common = ["train", "--model", "tiny-random-video", "--task", "video", "--data", SAMPLE, "--strategy", "memory",
              "--max_steps", "6", "--batch_size", "2", "--clip_length", "4", "--eval_steps", "3", "--logging_steps", "3"]
    main([*common, "--output_dir", str(tmp_path / "cached")])
    cached_frames, encoded[:] = sum(encoded), []
    main([*common, "--output_dir", str(tmp_path / "uncached"), "--cache_features", "false"])
    # 21 training and 8 validation frames, each once; uncached, every step's: 3 clips per epoch in batches of 2 and 1
    # make 6 steps of 9 windows of 4 frames, and 3 validations (before training, steps 3 and 6) of 8.
    assert cached_frames <= 21 + 8 and sum(encoded) == 9 * 4 + 3 * 8
    cached = load_file(tmp_path / "cached" / "final" / "trained_tensors.safetensors")
    uncached = load_file(tmp_path / "uncached" / "final" / "trained_tensors.safetensors")
    for name, tensor in cached.items():
        torch.testing.assert_close(tensor, uncached[name], rtol=0, atol=1e-4, msg=name)
    history = [json.loads((tmp_path / run / "history.json").read_text())["history"] for run in ("cached", "uncached")]
    losses = [[row["loss"] for row in rows if "loss" in row] for rows in history]
    assert len(losses[0]) == 2 and losses[0] == pytest.approx(losses[1], rel=1e-5)


def test_a_ct_volume_tracks_slice_by_slice_and_evaluates_with_volume_dice(tmp_path):
    """A NIfTI pair read as a clip of axial slices: `track` writes one label map per slice, `eval --task video`
    scores the organ with J, F and its 3-D Dice."""
    import nibabel

    depth, size = 6, 64
    rows, cols, slices = np.mgrid[:size, :size, :depth]
    organ = ((rows - 30) ** 2 + (cols - 32) ** 2 < (8 + slices) ** 2).astype(np.uint8)  # a disc growing along the axis
    volume = np.where(organ > 0, 60, -400).astype(np.int16)  # HU: soft tissue in air
    for folder, array in (("images", volume), ("masks", organ)):
        (tmp_path / "ct" / folder).mkdir(parents=True)
        nibabel.save(nibabel.Nifti1Image(array, np.eye(4)), tmp_path / "ct" / folder / "case.nii.gz")
    clips = DataConfig(data=str(tmp_path / "ct"), task="video", val_fraction=0).load_clip_splits()["train"]
    first = ClipDataset(clips, Preprocessor.from_model(load_sam2("tiny-random-video")), prompts="box")[0]
    truth = first["full_masks"][:, 0]  # (T, H, W): the organ as the slices are read
    ys, xs = np.nonzero(truth[0])
    main(["track", "--model", "tiny-random-video", "--video", str(tmp_path / "ct" / "images" / "case.nii.gz"),
          "--box", f"{xs.min()},{ys.min()},{xs.max()},{ys.max()}", "--ct_window", "40,400",
          "--output", str(tmp_path / "tracked")])
    assert sorted(p.name for p in (tmp_path / "tracked").glob("slice_*.png")) == [f"slice_{i:04d}.png" for i in range(depth)]
    tracked = np.stack([np.asarray(PIL.Image.open(tmp_path / "tracked" / f"slice_{i:04d}.png")) for i in range(depth)]) == 1
    assert tracked.shape == truth.shape and tracked[0].any()

    main(["eval", "--task", "video", "--model", "tiny-random-video", "--data", str(tmp_path / "ct"), "--val_fraction",
          "0", "--split", "train", "--ct_window", "40,400", "--mask_type", "semantic", "--output_dir",
          str(tmp_path / "eval")])
    scores = json.loads((tmp_path / "eval" / "metrics.json").read_text())["fine_tuned"]
    assert scores["num_frames"] == depth and set(scores["per_object"]) == {"case/1"}
    # eval prompts the organ with its slice-0 box, as `track` was: its J and Dice are those of the slices written.
    union, overlap = (tracked | truth).sum(axis=(1, 2)), (tracked & truth).sum(axis=(1, 2))
    assert scores["j"] == pytest.approx((overlap / union).mean(), abs=1e-6)
    assert scores["dice"] == pytest.approx(2 * overlap.sum() / (tracked.sum() + truth.sum()), abs=1e-6)


def test_data_reports_clips(capsys):
    main(["data", "--task", "video", SAMPLE])
    out = capsys.readouterr().out
    assert "train: 3 clips (0 volumes), 3 usable, 21 frames, 5 objects" in out
    assert "val: 1 clips (0 volumes), 1 usable, 8 frames, 2 objects" in out


def test_video_early_stopping_follows_j_and_f(tmp_path, monkeypatch):
    scripted = iter([0.1, 0.5, 0.3, 0.2])  # before training, then steps 1, 2, 3: the best is step 1

    def fake_validate(*args, **kwargs):
        value = next(scripted)
        return {"j": value, "f": value, "j_and_f": value, "dice": 0.9 - value, "num_objects": 2}

    monkeypatch.setattr(tasks, "validate_clips", fake_validate)
    main(["train", "--model", "tiny-random-video", "--task", "video", "--data", SAMPLE, "--strategy", "memory",
          "--max_steps", "10", "--batch_size", "2", "--clip_length", "2", "--eval_steps", "1",
          "--early_stopping_patience", "2", "--eval_metric", "j_and_f", "--output_dir", str(tmp_path)])
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["steps"] == 3 and metrics["best_step"] == 1 and metrics["best"]["j_and_f"] == 0.5
