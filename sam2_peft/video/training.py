"""The video training step's parts: the clip forward with correction clicks, the loss over frames, validation.

    module = ClipSegmenter(apply_strategy(load_sam2("tiny-random", video=True), "memory"))
    outputs = module(clips, correction_rounds=1, correction_frames=1, generator=generator)
    losses = video_loss(outputs, clips, LossWeights())              # the image loss, summed over frames
    scores = validate_clips(module, val_loader, accelerator)        # {"j", "f", "j_and_f", "dice", ...}

As official SAM2 training (`sam2/training/model/sam2.py`, `sam2/training/loss_fns.py`): the prompts are on a clip's
first frame, the other frames are tracked through the memory, `correction_frames` sampled tracked frames get
`correction_rounds` clicks each from the error of their prediction (and then serve as prompted memories), and the
loss of every prediction step of every frame is summed, each normalised by the number of objects.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sam2_peft.data.prompts import sample_correction_clicks
from sam2_peft.losses import LossWeights, downsample_targets, sam2_multistep_loss
from sam2_peft.metrics.video import aggregate_clips, score_clip
from sam2_peft.video.frames import FrameOutput
from sam2_peft.video.segmenter import VideoSegmenter
from sam2_peft.video.tracking import logits_at_original_size, track_clip


class ClipSegmenter(nn.Module):
    """A `VideoSegmenter` over a batch of clips (the list `data.clips.collate_clips` makes), in one `forward`
    because DistributedDataParallel expects one forward per backward.

    Args:
        model: a `Sam2VideoModel` or the `PeftModel` from `apply_strategy`.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.segmenter = VideoSegmenter(model)

    def forward(
        self,
        clips: list[dict],
        correction_rounds: int = 0,
        correction_frames: int = 0,
        generator: torch.Generator | None = None,
        track: bool = False,
    ) -> list[list[list[FrameOutput]]] | list[torch.Tensor]:
        """Prompt each clip's objects on its first frame and track them; returns, per clip and frame, the prediction
        steps (the first, then one per correction click).

        With `track`, each clip's objects are tracked from their own prompt frames instead, without autograd: (T, N,
        h, w) logits per clip (`tracking.track_clip`). Validation goes through here, not around the module, so that
        a sharded (FSDP) module gathers its parameters as for a training step.
        """
        if track:
            with torch.no_grad():
                return [track_clip(self.segmenter, clip, self._features(clip)) for clip in clips]
        results = []
        for clip in clips:
            if clip["prompt_frames"].any():
                raise ValueError(f"Clip {clip['clip_id']!r}: training clips are prompted on their first frame.")
            features = self._features(clip)
            corrections = _correction_plan(clip, correction_rounds, correction_frames, generator)
            outputs = self.segmenter(features, clip["point_coords"], clip["point_labels"], clip.get("mask_inputs"),
                                     corrections=corrections)
            for steps in outputs:
                for step in steps:
                    # The loss does not read pointers: returned with their graph, a clip's last pointer would be an
                    # output whose parameters get no gradient (all of them in a one-frame clip), which DDP rejects.
                    step.pointer = step.pointer.detach()
            results.append(outputs)
        return results

    def _features(self, clip: dict):
        """The clip's frames encoded here, or projected from the cached maps (`caching.FrameCache`)."""
        if clip.get("frame_levels") is not None:
            return self.segmenter.project(clip["frame_levels"])
        return self.segmenter.encode_frames(clip["pixel_values"])


def _correction_plan(clip: dict, rounds: int, frames: int, generator: torch.Generator | None) -> dict:
    """{frame: click function}: the prompt frame (when prompted with points) and `frames` random tracked frames."""
    if rounds == 0:
        return {}
    num_frames = len(clip["pixel_values"])
    tracked = (torch.randperm(num_frames - 1, generator=generator, device=generator.device if generator else None)
               + 1)[:frames].tolist() if num_frames > 1 else []
    chosen = tracked if clip.get("mask_inputs") is not None else [0, *tracked]
    return {frame: _clicker(clip["masks"][frame], rounds, generator) for frame in chosen}


def _clicker(targets: torch.Tensor, rounds: int, generator: torch.Generator | None):
    """A function giving `rounds` clicks, each from the error of the newest prediction against `targets` (N, S, S)."""
    left = [rounds]

    def click(output: FrameOutput):
        if left[0] == 0:
            return None
        left[0] -= 1
        with torch.no_grad():
            predicted = F.interpolate(output.masks[:, None].float(), size=targets.shape[-2:], mode="bilinear")[:, 0]
            return sample_correction_clicks(predicted > 0, targets, generator)

    return click


def video_loss(
    outputs: list[list[list[FrameOutput]]],
    clips: list[dict],
    weights: LossWeights,
    num_objects: float | None = None,
) -> dict[str, torch.Tensor]:
    """SAM2's loss summed over clips, frames and prediction steps, against targets at the decoder's resolution.

    A frame whose output is its mask prompt has no prediction to learn from and is left out.

    Args:
        num_objects: the per-object normaliser; default the batch's object count. Under data parallelism pass the
            mean object count per process, as for images.
    """
    num_objects = num_objects or float(sum(len(clip["object_ids"]) for clip in clips))
    terms = []
    for clip_outputs, clip in zip(outputs, clips):
        for frame, steps in enumerate(clip_outputs):
            if frame == 0 and clip.get("mask_inputs") is not None:
                continue
            targets = downsample_targets(clip["masks"][frame], steps[0].mask_logits.shape[-2:])
            terms.append(sam2_multistep_loss(steps, targets, clip["object_present"][frame], weights,
                                             num_objects=num_objects))
    if not terms:
        raise ValueError("No frame to learn from: every clip is a single mask-prompted frame; raise --clip_length.")
    return {name: sum(term[name] for term in terms) for name in terms[0]}


@torch.no_grad()
def validate_clips(module: nn.Module, loader, accelerator, attach_cache=None) -> dict:
    """J, F, J&F and Dice over the objects of every clip of `loader`, at the frames' original resolution.

    Per-clip scores are gathered with `gather_for_metrics`, which drops the duplicates that pad the last batch
    under data parallelism. `attach_cache(clips)`, when given, adds cached frame maps to each batch.

    Returns:
        `j`, `f`, `j_and_f`, `dice` (means over objects, `metrics.video.aggregate_clips`) and `num_objects`.
    """
    module.eval()
    scores = []
    for clips in loader:
        if attach_cache is not None:
            attach_cache(clips)
        batch_scores = []
        with accelerator.autocast():  # as in training (FSDP2 does not autocast by itself)
            tracked = module(clips, track=True)
        for clip, logits in zip(clips, tracked):
            predicted = logits_at_original_size(logits, clip["original_size"]).cpu().numpy()
            batch_scores.append(score_clip(predicted, clip["full_masks"], object_ids=clip["object_ids"].tolist(),
                                           clip_id=clip["clip_id"]))
        scores.extend(accelerator.gather_for_metrics(batch_scores, use_gather_object=True))
    module.train()
    if not scores:
        raise ValueError("The validation split produced no clip to score; check it with `sam2-peft data --task video`.")
    summary = aggregate_clips(scores)
    return {name: summary[name] for name in ("j", "f", "j_and_f", "dice", "num_objects")}
