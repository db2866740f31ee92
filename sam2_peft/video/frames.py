"""What the memory forward passes around: a clip's encoded frames, and one frame's prediction for N objects."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class FrameFeatures:
    """One clip's image-encoder output, frames along the batch axis.

    Attributes:
        maps: the FPN levels flattened to (HW_l, T, C_l); levels 0 and 1 already projected by the decoder's
            `conv_s0` / `conv_s1`, the last level raw (as `Sam2VideoModel.get_image_features` returns them).
        position: (HW, T, C) position encoding of the last level.
    """

    maps: list[torch.Tensor]
    position: torch.Tensor

    @property
    def num_frames(self) -> int:
        return self.position.shape[1]

    @classmethod
    def concat(cls, chunks: list[FrameFeatures]) -> FrameFeatures:
        """The features of consecutive chunks of frames as one clip's."""
        return cls(maps=[torch.cat(levels, dim=1) for levels in zip(*(chunk.maps for chunk in chunks))],
                   position=torch.cat([chunk.position for chunk in chunks], dim=1))


@dataclass
class FrameOutput:
    """The prediction for N objects on one frame; the fields the image loss takes (`losses.sam2_multistep_loss`).

    Attributes:
        mask_logits: (N, M, h, w) the decoder's low-resolution logits (M = 3 multimask candidates, or 1), before the
            no-object override; what the loss sees.
        iou_scores: (N, M) predicted IoU of each candidate.
        object_score_logits: (N, 1) object-presence logits.
        masks: (N, h, w) the chosen mask's logits, `NO_OBJECT_SCORE` where the object is judged absent: what goes to
            the memory and to the user.
        pointer: (N, C) the object pointer later frames attend to.
        high_res: (N, 1, S, S) logits at input size where a mask prompt was the output, else None (the memory
            encoder then upsamples `masks`).
        prompted: whether the frame was a conditioning frame (a prompt or a correction click).
    """

    mask_logits: torch.Tensor
    iou_scores: torch.Tensor
    object_score_logits: torch.Tensor
    masks: torch.Tensor
    pointer: torch.Tensor
    high_res: torch.Tensor | None = None
    prompted: bool = False
