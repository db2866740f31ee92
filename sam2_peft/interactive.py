"""The interactive training forward: the initial prompts, then rounds of correction clicks, in one `forward`.

    module = InteractiveSegmenter(apply_strategy(load_sam2("tiny-random"), "lora"))
    outputs = module(batch, correction_rounds=2, generator=torch.Generator().manual_seed(0))   # one per round
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sam2_peft.data.prompts import sample_correction_clicks
from sam2_peft.family import encode_from_prefix
from sam2_peft.segmenter import Sam2Segmenter, SegmenterOutput, best_mask_logits
from sam2_peft.speed import Backend


class InteractiveSegmenter(nn.Module):
    """A `Sam2Segmenter` that runs the initial prompts and then `correction_rounds` rounds of correction clicks.

    All rounds happen inside one `forward`, because DistributedDataParallel expects one forward per backward. The
    image is encoded once; each round adds a click sampled from the previous best mask's error and feeds that mask's
    logits back as the mask prompt, as official SAM2 interactive training does.

    Args:
        model: a `Sam2Model` or the `PeftModel` from `apply_strategy`.
        backend: `--backend` (see `Sam2Segmenter`).
    """

    def __init__(self, model: nn.Module, backend: str | Backend = "auto"):
        super().__init__()
        self.segmenter = Sam2Segmenter(model, backend=backend)

    def forward(
        self,
        batch: dict,
        correction_rounds: int = 0,
        generator: torch.Generator | None = None,
        multimask_output: bool = True,
    ) -> list[SegmenterOutput]:
        """Predict masks for `batch` (the dict of `collate_objects`); returns one output per round.

        `batch` may carry cached encoder output: `image_features` (the FPN maps) or `image_prefix` with
        `prefix_start_block` (the activations entering the first trainable encoder block).
        """
        # Projected once for all rounds; maps encoded here are then let go of (see `Sam2Segmenter.project`).
        features = self.segmenter.project(self.image_features(batch))
        coords, labels = batch["point_coords"], batch["point_labels"]
        mask_inputs = batch.get("mask_inputs")
        outputs = []
        for round_index in range(correction_rounds + 1):
            if round_index > 0:
                with torch.no_grad():
                    previous = best_mask_logits(outputs[-1])
                    size = batch["masks"].shape[-2:]
                    predicted = F.interpolate(previous[:, None], size=size, mode="bilinear")[:, 0] > 0
                    click, click_label = sample_correction_clicks(predicted, batch["masks"], generator)
                coords = torch.cat([coords, click.to(coords.dtype)], dim=1)
                labels = torch.cat([labels, click_label], dim=1)
                mask_inputs = previous[:, None]
            outputs.append(
                self.segmenter(
                    decoder_features=features,
                    image_index=batch["image_index"],
                    point_coords=coords,
                    point_labels=labels,
                    mask_inputs=mask_inputs,
                    multimask_output=multimask_output,
                )
            )
        return outputs

    def image_features(self, batch: dict) -> list[torch.Tensor]:
        """The FPN maps of the batch's images: cached, encoded from cached prefix activations, or encoded here."""
        if batch.get("image_features") is not None:
            return batch["image_features"]
        if "image_prefix" in batch:
            # The frozen blocks' activations came from a cache; the trainable blocks run here, inside forward.
            vision_encoder, prefix = self.segmenter.sam.vision_encoder, batch["image_prefix"]
            backend = self.segmenter.backend_for(prefix[0].device)
            return encode_from_prefix(vision_encoder, prefix, batch["prefix_start_block"], backend=backend)
        return self.segmenter.encode_images(batch["pixel_values"])
