"""Track prompted objects through a video: from frames (or a clip item) to label maps at the frames' resolution.

    model = load_adapted("facebook/sam2.1-hiera-tiny", "runs/video/final", video=True)
    labels = track_video(model, "scans/case_01.nii.gz", boxes=[(40, 60, 120, 150)], frame=12)   # (T, H, W)
    sam2-peft track --model facebook/sam2.1-hiera-tiny --adapter runs/video/final --video frames/ \
        --box 40,60,120,150 --frame 12 --output tracked/

For clips of `data.clips.ClipDataset`: `track_clip(segmenter, item)` -> (T, N, h, w) logits, and
`logits_at_original_size(logits, item["original_size"])` -> (T, N, H, W) bool masks.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from sam2_peft.data.clip_frames import read_video
from sam2_peft.data.intensity import IntensityConfig
from sam2_peft.data.transforms import Preprocessor
from sam2_peft.prediction import save_label_map
from sam2_peft.reports import save_overlay_strip
from sam2_peft.video.frames import FrameFeatures
from sam2_peft.video.segmenter import ENCODE_CHUNK, NO_OBJECT_SCORE, PADDING_LABEL, VideoSegmenter


def track_clip(
    segmenter: VideoSegmenter,
    item: dict,
    features: FrameFeatures | None = None,
    num_frames: int | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Prompt every object on its prompt frame and track it to the end of the clip.

    Objects that share a prompt frame and a kind of prompt (a box, K clicks) are tracked together (batched); an
    object has no mask before its prompt frame.

    Args:
        segmenter: the model to track with.
        item: a clip: `pixel_values` (T, 3, S, S), `point_coords` (N, K, 2), `point_labels` (N, K), optional
            `mask_inputs` (N, 1, S, S), and `prompt_frames` (N,) (default: all 0).
        features: the clip's encoded frames, if already computed.
        num_frames: the whole video's length (default the clip's).
        progress: show a progress bar over the frames.

    Returns:
        (T, N, h, w) low-resolution logits of the chosen masks, `NO_OBJECT_SCORE` where an object is absent or not
        yet prompted.
    """
    features = features if features is not None else segmenter.encode_frames(item["pixel_values"])
    coords, labels, mask_inputs = item.get("point_coords"), item.get("point_labels"), item.get("mask_inputs")
    some_prompt = coords if coords is not None else mask_inputs
    num_objects = some_prompt.shape[0]
    prompt_frames = item.get("prompt_frames")
    if prompt_frames is None:
        prompt_frames = torch.zeros(num_objects, dtype=torch.int64)
    height, width = segmenter.sam.prompt_encoder.mask_input_size
    logits = features.position.new_full((features.num_frames, num_objects, height, width), NO_OBJECT_SCORE)
    points = prompt_frames.new_zeros(num_objects) if labels is None else (labels != PADDING_LABEL).sum(1).cpu()
    for frame, count in sorted(set(zip(prompt_frames.tolist(), points.tolist()))):
        group = ((prompt_frames == frame) & (points == count)).nonzero()[:, 0].to(some_prompt.device)
        outputs = segmenter(
            features,
            # Only the group's own points: a padding point would still be a (zero) token the decoder attends to.
            point_coords=None if mask_inputs is not None else coords[group, :count],
            point_labels=None if mask_inputs is not None else labels[group, :count],
            mask_inputs=None if mask_inputs is None else mask_inputs[group],
            prompt_frame=frame,
            num_frames=num_frames,
            progress=progress,
        )
        for offset, steps in enumerate(outputs):
            logits[frame + offset, group] = steps[-1].masks.to(logits.dtype)
    return logits


def logits_at_original_size(logits: torch.Tensor, original_size: tuple[int, int]) -> torch.Tensor:
    """(T, N, h, w) logits -> (T, N, H, W) bool masks: bilinear straight to the frame size and thresholded at 0,
    as `Sam2VideoProcessor.post_process_masks` does."""
    masks = torch.zeros(*logits.shape[:2], *original_size, dtype=torch.bool, device=logits.device)
    for frame, frame_logits in enumerate(logits):  # one frame at a time: only the bool masks are held at full size
        if len(frame_logits):
            upsampled = F.interpolate(frame_logits.float()[:, None], size=tuple(original_size), mode="bilinear",
                                      align_corners=False)
            masks[frame] = upsampled[:, 0] > 0
    return masks


def track_video(
    model: torch.nn.Module,
    video: str | os.PathLike | Sequence[np.ndarray],
    *,
    boxes: Sequence[Sequence[float]] = (),
    points: Sequence[Sequence[float]] = (),
    frame: int = 0,
    intensity: IntensityConfig = IntensityConfig(),
    nifti_axis: int = 2,
    progress: bool = True,
) -> Tracking:
    """Prompt objects on one frame and track them through the rest of a video.

    Args:
        model: a `Sam2VideoModel` or a `PeftModel` around one (`load_adapted(..., video=True)`).
        video: a frame folder or a NIfTI volume (`data.clips.read_video`), or T frames: (H, W, 3) or (H, W)
            uint8 / float arrays, or (3, H, W) float arrays in [0, 1].
        boxes: `x1, y1, x2, y2` per object, in the prompted frame's pixels.
        points: `x, y` per further object: one positive click each.
        frame: the frame the prompts are on; earlier frames get no mask.
        intensity: how raw values map to [0, 1] (for a path; arrays of floats are taken as [0, 1]).
        nifti_axis: the axis a NIfTI volume is cut along.
        progress: show a progress bar.

    Returns:
        A `Tracking`: (T, H, W) uint16 label maps (0 background, object i = value i, boxes first, then points; a later
        object wins where masks overlap), the frames' names and the frames as read.
    """
    if isinstance(video, (str, os.PathLike)):
        frames, names = read_video(video, intensity, axis=nifti_axis)
    else:
        frames, names = [_channels_first(array) for array in video], [f"frame_{t:05d}" for t in range(len(video))]
    if not boxes and not points:
        raise ValueError("Give at least one prompt: a box (`--box x1,y1,x2,y2`) or a point (`--point x,y`).")
    if not 0 <= frame < len(frames):
        raise ValueError(f"--frame {frame} is outside the video's {len(frames)} frames (0 to {len(frames) - 1}).")
    segmenter = VideoSegmenter(model).eval()
    sam = segmenter.sam
    device = next(sam.parameters()).device
    preprocessor = Preprocessor.from_model(sam)
    height, width = frames[0].shape[-2:]
    coords, labels = _prompt_points(preprocessor, boxes, points, (height, width))
    with torch.no_grad():
        chunks = []
        for start in tqdm(range(frame, len(frames), ENCODE_CHUNK), desc="encode frames", disable=not progress):
            batch = torch.stack([preprocessor.pixel_values(torch.from_numpy(f)) for f in frames[start:start + ENCODE_CHUNK]])
            chunks.append(segmenter.encode_frames(batch.to(device)))
        features = FrameFeatures.concat(chunks)
        item = {"point_coords": coords.to(device), "point_labels": labels.to(device)}
        logits = track_clip(segmenter, item, features, num_frames=len(frames), progress=progress)  # (T - F, N, h, w)
    label_maps = np.zeros((len(frames), height, width), np.uint16)
    for offset, frame_logits in enumerate(logits):
        masks = logits_at_original_size(frame_logits[None], (height, width))[0].cpu().numpy()
        for index, mask in enumerate(masks):
            label_maps[frame + offset][mask] = index + 1
    return Tracking(labels=label_maps, frame_names=list(names), frames=frames)


def _channels_first(array: np.ndarray) -> np.ndarray:
    """A frame as (3, H, W) float32 in [0, 1]: uint8 is divided by 255, grey is repeated."""
    array = np.asarray(array)
    if array.ndim == 3 and array.shape[0] == 3 and array.shape[-1] != 3:
        return array.astype(np.float32)
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=-1)
    if array.ndim != 3 or array.shape[-1] != 3:
        raise ValueError(f"A frame must be (H, W), (H, W, 3) or (3, H, W); got shape {array.shape}.")
    scaled = array / 255.0 if array.dtype == np.uint8 else array
    return np.ascontiguousarray(scaled.transpose(2, 0, 1), dtype=np.float32)


def _prompt_points(preprocessor: Preprocessor, boxes, points, size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Boxes (two corner points, labels 2 and 3) and clicks (one point, label 1, padded with -10) in model pixels."""
    prompts = [(list(box), [2, 3]) for box in boxes] + [(list(point) + [0.0, 0.0], [1, -10]) for point in points]
    for values, _ in prompts:
        if len(values) != 4:
            raise ValueError(f"A box is x1,y1,x2,y2 and a point x,y; got {values}.")
    coords = torch.tensor([values for values, _ in prompts], dtype=torch.float32).reshape(-1, 2, 2)
    labels = torch.tensor([label for _, label in prompts], dtype=torch.int64)
    return preprocessor.scale_coords(coords, size), labels


@dataclass
class Tracking:
    """What `track_video` returns.

    Attributes:
        labels: (T, H, W) uint16 label maps, object i = value i.
        frame_names: T names (file stems, or `slice_0042` for volumes).
        frames: T (3, H, W) float32 frames in [0, 1], as tracked.
    """

    labels: np.ndarray
    frame_names: list[str]
    frames: list[np.ndarray]

    def save(self, output_dir: str | os.PathLike) -> Path:
        """Write `DIR/<frame name>.png` (16-bit label maps) and `DIR/overlay.png` (evenly spaced frames, each object
        in its colour)."""
        output_dir = Path(output_dir)
        for name, label_map in zip(self.frame_names, self.labels):
            save_label_map(label_map, output_dir / f"{name}.png")
        frames = [frame.transpose(1, 2, 0) for frame in self.frames]
        save_overlay_strip(frames, list(self.labels), output_dir / "overlay.png", titles=self.frame_names)
        return output_dir
