"""SAM2's memory forward with gradients: prompt some frames, track the objects through the rest.

    segmenter = VideoSegmenter(apply_strategy(load_sam2("tiny-random", video=True), "memory"))
    features = segmenter.encode_frames(pixel_values)                 # (T, 3, S, S) -> one clip's frame features
    outputs = segmenter(features, point_coords=coords, point_labels=labels)   # one FrameOutput per frame

transformers' `Sam2VideoModel.forward` and `propagate_in_video_iterator` run under `torch.inference_mode()` and
track one object at a time through an inference session. This module runs the same modules of the same model (the
prompt encoder, mask decoder, memory attention, memory encoder and object-pointer projections), in the same order
and with the same memory bank rules, but with autograd on and all objects of a clip batched: with no grad it gives
`Sam2VideoModel`'s masks (tests/video/test_video_segmenter.py), and trained it backpropagates through time, as the
official trainer (`sam2/training/model/sam2.py`) does.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm
from transformers import Sam2VideoModel

from sam2_peft.segmenter import base_sam2
from sam2_peft.video.frames import FrameFeatures, FrameOutput

# The label of a padding point, which the prompt encoder ignores.
PADDING_LABEL = -10
# Frames per image-encoder call (bounds the encoder's activation memory on long clips).
ENCODE_CHUNK = 8
# transformers' (and official SAM2's) logit for "no object here" (sigmoid(-1024) = 0).
NO_OBJECT_SCORE = -1024.0
# `_use_mask_as_output`'s logits of a binary mask prompt: -10 outside, +10 inside.
MASK_OUT_SCALE, MASK_OUT_BIAS = 20.0, -10.0


@dataclass
class _Memory:
    """What a processed frame leaves for later ones: its memory features and its object pointer."""

    features: torch.Tensor  # (HW, N, C_mem)
    position: torch.Tensor  # (HW, N, C_mem)
    pointer: torch.Tensor  # (N, C)


@dataclass
class MemoryBank:
    """The memories of one group of N objects tracked together, by frame index."""

    prompted: dict[int, _Memory] = field(default_factory=dict)
    tracked: dict[int, _Memory] = field(default_factory=dict)


def _resize(x: torch.Tensor, size, *, antialias: bool = False) -> torch.Tensor:
    """Bilinear resize (no corner alignment) as transformers does, in float32 for half-precision input (older
    PyTorch has no bilinear for bf16) and in the input's own precision otherwise."""
    low_precision = x.dtype in (torch.float16, torch.bfloat16)
    resized = F.interpolate(x.float() if low_precision else x, size=tuple(size), mode="bilinear", align_corners=False,
                            antialias=antialias)
    return resized.to(x.dtype)


def _prompt_points(point_labels: torch.Tensor) -> int:
    """The objects' number of prompt points (padding, label -10, left out), which must be the same for all: it decides
    between one mask and three, for all objects decoded together (`tracking.track_clip` groups them)."""
    counts = (point_labels != PADDING_LABEL).sum(dim=1).unique()
    if len(counts) > 1:
        raise ValueError(
            f"The objects have {counts.tolist()} prompt points: SAM2 decodes a box (two points) to one mask and a "
            "click to three, so objects prompted differently are tracked in separate calls (as `track_clip` does)."
        )
    return int(counts[0]) if len(counts) else 0


class VideoSegmenter(nn.Module):
    """Track N objects through the frames of one clip with a `Sam2VideoModel` (or a `PeftModel` around one).

    Args:
        model: a `Sam2VideoModel` (`load_sam2(..., video=True)`), plain or from `apply_strategy`.
        memory_dtype: the dtype memory features are stored in between frames. `"auto"`: bfloat16 in eval mode, as
            transformers' and the official predictor's tracking round them, and the compute dtype in training, as
            the official trainer keeps them; or a dtype, or None for the compute dtype always.
    """

    def __init__(self, model: nn.Module, memory_dtype: torch.dtype | str | None = "auto"):
        super().__init__()
        self.model = model
        self.memory_dtype = memory_dtype
        sam = self.sam
        if not isinstance(sam, Sam2VideoModel):
            raise TypeError(
                f"VideoSegmenter tracks with a Sam2VideoModel, got {type(sam).__name__}; load the model with "
                "`load_sam2(name, video=True)` (`--task video`)."
            )

    @property
    def sam(self) -> Sam2VideoModel:
        """The `Sam2VideoModel` inside (adapter layers stay injected)."""
        return base_sam2(self.model)

    def encode_frames(self, pixel_values: torch.Tensor, *, frozen: bool | None = None) -> FrameFeatures:
        """Encode a clip's frames, (T, 3, S, S) -> `FrameFeatures` (`encode_levels`, then `project`)."""
        return self.project(self.encode_levels(pixel_values, frozen=frozen))

    def encode_levels(self, pixel_values: torch.Tensor, *, frozen: bool | None = None) -> list[torch.Tensor]:
        """The image encoder's FPN maps of (T, 3, S, S) frames: (T, C, S/4, S/4), (T, C, S/8, S/8), (T, C, S/16, S/16)
        (what `caching.FrameCache` keeps for a frozen encoder).

        Args:
            frozen: run the image encoder without autograd (its parameters get no gradient). Default: when no
                encoder parameter requires grad.
        """
        encoder = self.sam.vision_encoder
        if frozen is None:
            frozen = not any(p.requires_grad for p in encoder.parameters())
        with torch.set_grad_enabled(torch.is_grad_enabled() and not frozen):
            # A few frames per encoder call: whole videos and volumes would hold every frame's activations at once.
            chunks = [encoder(pixel_values[start : start + ENCODE_CHUNK], return_dict=True).fpn_hidden_states
                      for start in range(0, len(pixel_values), ENCODE_CHUNK)]
        return [torch.cat(levels) if len(chunks) > 1 else levels[0] for levels in zip(*chunks)]

    def project(self, levels: list[torch.Tensor]) -> FrameFeatures:
        """FPN maps -> `FrameFeatures`: the first two levels through the decoder's `conv_s0` / `conv_s1` (which train
        with the decoder), and the last level's position encoding, as `Sam2VideoModel.get_image_features` does."""
        sam = self.sam
        last = levels[-1]
        position = sam.vision_encoder.neck.position_encoding(last.shape, last.device, last.dtype).to(last.dtype)
        maps = [sam.mask_decoder.conv_s0(levels[0]), sam.mask_decoder.conv_s1(levels[1]), *levels[2:]]
        # (T, C, H, W) -> (HW, T, C)
        return FrameFeatures(maps=[level.flatten(2).permute(2, 0, 1) for level in maps],
                             position=position.flatten(2).permute(2, 0, 1))

    def forward(
        self,
        features: FrameFeatures,
        point_coords: torch.Tensor | None = None,
        point_labels: torch.Tensor | None = None,
        mask_inputs: torch.Tensor | None = None,
        *,
        prompt_frame: int = 0,
        num_frames: int | None = None,
        corrections: dict[int, Callable] | None = None,
        progress: bool = False,
    ) -> list[list[FrameOutput]]:
        """Prompt N objects on `prompt_frame` and track them through the following frames of `features`.

        Args:
            features: the clip's frames (`encode_frames`).
            point_coords: (N, K, 2) prompt points `x, y` in model-input pixels (boxes as two corner points with labels
                2 and 3, padding label -10).
            point_labels: (N, K).
            mask_inputs: (N, 1, S, S) binary mask prompts in model-input pixels instead of points: the mask is then
                the frame's output, as in SAM2 (`_use_mask_as_output`).
            prompt_frame: the frame the prompts are on; frames before it are not processed.
            num_frames: the length of the whole video (normalises the object pointers' temporal encoding, as
                transformers does); default the clip's.
            corrections: {frame: fn(FrameOutput) -> (coords (N, 1, 2), labels (N, 1)) or None}: on these frames,
                after the first prediction, each click `fn` returns is added to the frame's points and the decoder
                runs again with the previous logits as mask prompt; a tracked frame then counts as prompted. `fn` is
                called again on the newest output until it returns None. Not on a mask-prompted frame.
            progress: show a progress bar over the frames.

        Returns:
            For each processed frame (`prompt_frame` onwards), its prediction steps: the first, then one per
            correction click.
        """
        sam = self.sam
        num_frames = num_frames or features.num_frames
        bank = MemoryBank()
        results = []
        for frame in tqdm(range(prompt_frame, features.num_frames), desc="track", disable=not progress):
            maps, position = self._frame_maps(features, frame, point_coords, point_labels, mask_inputs)
            if frame == prompt_frame and mask_inputs is not None:
                steps = [self._mask_as_output(maps, mask_inputs)]
            elif frame == prompt_frame:
                # (HW, N, C) + the no-memory token -> (N, C, h, w)
                conditioned = self._to_map(maps[-1] + sam.no_memory_embedding)
                multimask = self._use_multimask(True, _prompt_points(point_labels))
                steps = [self._decode(conditioned, maps, point_coords, point_labels, None, multimask=multimask)]
                steps += self._correct(frame, conditioned, maps, steps[-1], corrections, point_coords, point_labels)
            else:
                conditioned = self._condition_on_memory(frame, maps[-1], position, bank, num_frames)
                steps = [self._decode(conditioned, maps, None, None, None, multimask=self._use_multimask(False, 0))]
                steps += self._correct(frame, conditioned, maps, steps[-1], corrections)
            mask_from_prompt = frame == prompt_frame or len(steps) > 1
            last = steps[-1]
            prompted = frame == prompt_frame or len(steps) > 1
            for step in steps:
                step.prompted = prompted
            memory = self._encode_memory(maps[-1], last, mask_from_prompt)
            (bank.prompted if prompted else bank.tracked)[frame] = memory
            results.append(steps)
        return results

    def _frame_maps(self, features, frame, point_coords, point_labels, mask_inputs):
        """One frame's maps, (HW, 1, C) broadcast to the N objects."""
        num_objects = next(x for x in (point_coords, mask_inputs) if x is not None).shape[0]
        maps = [level[:, frame : frame + 1].expand(-1, num_objects, -1) for level in features.maps]
        position = features.position[:, frame : frame + 1].expand(-1, num_objects, -1)
        return maps, position

    def _use_multimask(self, prompted: bool, num_points: int) -> bool:
        """Three candidate masks or one (transformers' `_use_multimask`): a box (two points) gets one."""
        config = self.sam.config
        return (
            config.multimask_output_in_sam
            and (prompted or config.multimask_output_for_tracking)
            and config.multimask_min_pt_num <= num_points <= config.multimask_max_pt_num
        )

    def _correct(self, frame, conditioned, maps, output, corrections, coords=None, labels=None) -> list[FrameOutput]:
        """Correction clicks: each re-runs the decoder with the prompt's points and all clicks so far, and the
        previous logits as mask prompt (official `_iter_correct_pt_sampling`)."""
        if not corrections or frame not in corrections:
            return []
        steps = []
        while (click := corrections[frame](output)) is not None:
            coords = click[0] if coords is None else torch.cat([coords, click[0]], dim=1)
            labels = click[1] if labels is None else torch.cat([labels, click[1]], dim=1)
            multimask = self._use_multimask(False, labels.shape[1])
            output = self._decode(conditioned, maps, coords, labels, output.masks[:, None], multimask=multimask)
            steps.append(output)
        return steps

    def _to_map(self, flat: torch.Tensor) -> torch.Tensor:
        """(HW, N, C) -> (N, C, h, w) at the last level's size."""
        height, width = self.sam.backbone_feature_sizes[-1]
        return flat.permute(1, 2, 0).reshape(flat.shape[1], flat.shape[2], height, width)

    def _high_res(self, maps) -> list[torch.Tensor]:
        sizes = self.sam.backbone_feature_sizes
        return [level.permute(1, 2, 0).reshape(level.shape[1], level.shape[2], *size) for level, size in zip(maps[:-1], sizes[:-1])]

    def _decode(self, conditioned, maps, point_coords, point_labels, mask_prompt, *, multimask) -> FrameOutput:
        """Prompt encoder + mask decoder on memory-conditioned features, as `Sam2VideoModel._single_frame_forward`."""
        sam = self.sam
        num_objects = conditioned.shape[0]
        if point_coords is None:
            # No prompt: one empty point with label -1, as transformers pads.
            point_coords = conditioned.new_zeros(num_objects, 1, 2)
            point_labels = torch.full((num_objects, 1), -1, dtype=torch.int64, device=conditioned.device)
        if mask_prompt is not None and mask_prompt.shape[-2:] != sam.prompt_encoder.mask_input_size:
            mask_prompt = _resize(mask_prompt, sam.prompt_encoder.mask_input_size, antialias=True)
        sparse, dense = sam.prompt_encoder(
            input_points=point_coords[:, None].to(conditioned.dtype),
            input_labels=point_labels[:, None],
            input_boxes=None,
            input_masks=mask_prompt,
        )
        position = sam.get_image_wide_positional_embeddings().repeat(num_objects, 1, 1, 1)
        # (N, 1, M, h, w), (N, 1, M), (N, 1, M', C), (N, 1, 1)
        multimasks, iou_scores, tokens, object_logits = sam.mask_decoder(
            image_embeddings=conditioned,
            image_positional_embeddings=position,
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=multimask,
            high_resolution_features=self._high_res(maps),
        )
        multimasks, iou_scores, tokens, object_logits = multimasks[:, 0], iou_scores[:, 0], tokens[:, 0], object_logits[:, 0]
        appearing = object_logits > 0  # (N, 1)
        shown = torch.where(appearing[:, :, None, None], multimasks, NO_OBJECT_SCORE)
        rows = torch.arange(num_objects, device=shown.device)
        best = iou_scores.argmax(dim=-1) if multimask else torch.zeros_like(rows)
        token = tokens[rows, best] if tokens.shape[1] > 1 else tokens[:, 0]
        return FrameOutput(multimasks, iou_scores, object_logits, shown[rows, best], self._pointer(token, appearing))

    def _pointer(self, token: torch.Tensor, appearing: torch.Tensor) -> torch.Tensor:
        """(N, C) decoder token -> object pointer, the learned no-object pointer where the object is absent."""
        return self._mix_absent(self.sam.object_pointer_proj(token), appearing)

    def _mix_absent(self, pointer: torch.Tensor, appearing: torch.Tensor) -> torch.Tensor:
        weight = appearing.to(pointer.dtype)
        return weight * pointer + (1 - weight) * self.sam.no_object_pointer

    def _mask_as_output(self, maps, mask_inputs) -> FrameOutput:
        """A mask prompt is the frame's output (transformers' `_use_mask_as_output`); the decoder only makes its
        object pointer."""
        sam = self.sam
        dtype = maps[-1].dtype
        size = sam.image_size
        masks = mask_inputs.to(dtype)
        if masks.shape[-2:] != (size, size):
            masks = _resize(masks, (size, size), antialias=True)
        high_res = masks * MASK_OUT_SCALE + MASK_OUT_BIAS
        low_res = _resize(high_res, sam.prompt_encoder.mask_input_size, antialias=True)
        # The raw last level, without the no-memory token, and the best of three candidates' token, as transformers
        # does here (official SAM2 takes the single-mask token; the parity tests follow transformers).
        decoded = self._decode(self._to_map(maps[-1]), maps, None, None, sam.mask_downsample(masks), multimask=True)
        appearing = mask_inputs.flatten(1).float().gt(0).any(dim=1, keepdim=True)
        object_logits = MASK_OUT_SCALE * appearing.to(dtype) + MASK_OUT_BIAS
        return FrameOutput(low_res, low_res.new_ones(low_res.shape[0], 1), object_logits, low_res[:, 0],
                           self._mix_absent(decoded.pointer, appearing), high_res=high_res)

    def _condition_on_memory(self, frame, vision, position, bank: MemoryBank, num_frames) -> torch.Tensor:
        """Memory attention of the frame's last-level features over the bank, as transformers'
        `_prepare_memory_conditioned_features` (stride 1). (HW, N, C) -> (N, C, h, w)."""
        sam = self.sam
        config = sam.config
        temporal = sam.memory_temporal_positional_encoding  # (num_maskmem, 1, 1, C_mem)
        selected, unselected = sam._select_closest_cond_frames(frame, bank.prompted, config.max_cond_frame_num)
        # Prompted frames sit at temporal offset 0, whose encoding is the last one.
        entries = [(0, memory) for memory in selected.values()]
        for offset in range(sam.num_maskmem - 1, 0, -1):
            previous = bank.tracked.get(frame - offset, unselected.get(frame - offset))
            if previous is not None:
                entries.append((offset, previous))
        memories = [memory.features for _, memory in entries]
        positions = [memory.position + temporal[offset - 1] for offset, memory in entries]

        offsets, pointers, max_pointers = self._pointers(frame, bank, num_frames)
        num_pointer_tokens = 0
        if pointers:
            tokens, token_position = sam._process_object_pointers(
                offsets, pointers, max_pointers, vision.shape[1], sam.hidden_dim, vision.device
            )
            memories.append(tokens)
            positions.append(token_position)
            num_pointer_tokens = tokens.shape[0]
        out = sam.memory_attention(
            current_vision_features=vision,
            current_vision_position_embeddings=position,
            memory=torch.cat(memories, dim=0).to(vision.dtype),
            memory_posision_embeddings=torch.cat(positions, dim=0),
            num_object_pointer_tokens=num_pointer_tokens,
        )
        # (1, N, HW, C) -> (N, C, h, w); transformers' own reshape is only right for one object at a time.
        height, width = sam.backbone_feature_sizes[-1]
        return out[0].transpose(1, 2).reshape(vision.shape[1], sam.hidden_dim, height, width)

    def _pointers(self, frame, bank: MemoryBank, num_frames):
        """The object pointers a frame attends to, with their temporal offsets (transformers' `_get_object_pointers`):
        those of prompted frames (in training also later ones, as official training does), then the tracked frames
        just before it."""
        sam = self.sam
        max_pointers = min(num_frames, sam.config.max_object_pointers_in_encoder)
        offsets, pointers = [], []
        for index, memory in bank.prompted.items():
            if self.training or index <= frame:
                offsets.append(frame - index)
                pointers.append(memory.pointer)
        for offset in range(1, max_pointers):
            if frame - offset < 0:
                break
            if (memory := bank.tracked.get(frame - offset)) is not None:
                offsets.append(offset)
                pointers.append(memory.pointer)
        return offsets, pointers, max_pointers

    def _encode_memory(self, vision: torch.Tensor, output: FrameOutput, mask_from_prompt: bool) -> _Memory:
        """The frame's memory from its last-level features and chosen mask (transformers' `_encode_new_memory`)."""
        sam = self.sam
        config = sam.config
        height, width = sam.prompt_encoder.mask_input_size
        high_res = output.high_res
        if high_res is None:
            # transformers upsamples the chosen low-res logits to the image size, then back down to 4x the mask
            # input size for the memory encoder; both bilinear.
            size = sam.image_size
            high_res = _resize(output.masks[:, None], (size, size))
        if high_res.shape[-2:] != (4 * height, 4 * width):
            high_res = _resize(high_res, (4 * height, 4 * width), antialias=True)
        if mask_from_prompt and not self.training:
            mask = (high_res > 0).to(high_res.dtype)
        else:
            mask = torch.sigmoid(high_res)
        mask = mask * config.sigmoid_scale_for_mem_enc + config.sigmoid_bias_for_mem_enc
        features, position = sam.memory_encoder(self._to_map(vision), mask)
        if sam.occlusion_spatial_embedding_parameter is not None:
            absent = (output.object_score_logits <= 0).to(features.dtype)  # (N, 1)
            features = features + absent[..., None, None] * sam.occlusion_spatial_embedding_parameter[..., None, None]
        memory_dtype = (None if self.training else torch.bfloat16) if self.memory_dtype == "auto" else self.memory_dtype
        if memory_dtype is not None:
            features = features.to(memory_dtype)
        # (N, C_mem, h, w) -> (HW, N, C_mem)
        return _Memory(
            features=features.flatten(2).permute(2, 0, 1),
            position=position.to(high_res.dtype).flatten(2).permute(2, 0, 1),
            pointer=output.pointer,
        )
