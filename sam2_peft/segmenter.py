"""The training forward: images and per-object prompts in, low-resolution mask logits out.

`Sam2Model.forward` expects the same number of prompts for every image. Real data has a varying number of objects
per image, so `Sam2Segmenter` encodes each image once and gathers its features for every object (as official SAM2
training does), then runs the prompt encoder and mask decoder on the flat batch of objects.

    segmenter = Sam2Segmenter(model)                    # a Sam2Model, or the PeftModel that apply_strategy returns
    out = segmenter(pixel_values, image_index=idx, point_coords=coords, point_labels=labels)
    out.mask_logits                                     # (N, 3, 4 * E, 4 * E) with multimask_output=True
    Sam2Segmenter(model, backend="reference")           # transformers' own modules (see `sam2_peft.speed`)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from sam2_peft.family import is_family_model, supported_classes
from sam2_peft.speed import Backend, CudaBackend, select_backend
from sam2_peft.speed.compiled import BucketedDecoder

# Point labels of the SAM2 prompt encoder. A box is encoded as its two corners (labels 2 and 3), exactly as the
# official predictor does, so boxes, clicks and both together share one tensor layout.
NEGATIVE, POSITIVE, BOX_TOP_LEFT, BOX_BOTTOM_RIGHT = 0, 1, 2, 3
NOT_A_POINT = -1
PADDING = -10


@dataclass
class SegmenterOutput:
    """Outputs for N objects.

    Attributes:
        mask_logits: (N, M, h, w) low-resolution mask logits, M = 3 for multimask output, else 1; h = w = S / 4
            (4 S / 14 for SAM3).
        iou_scores: (N, M) predicted IoU of each mask, in [0, 1].
        object_score_logits: (N, 1) logit that the object is present in the image.
    """

    mask_logits: torch.Tensor
    iou_scores: torch.Tensor
    object_score_logits: torch.Tensor


def combine_prompts(
    boxes: torch.Tensor | None = None,
    points: torch.Tensor | None = None,
    point_labels: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge boxes and clicks into the point layout the prompt encoder takes.

    Args:
        boxes: (N, 4) `x1, y1, x2, y2` in model-input pixels.
        points: (N, K, 2) `x, y` in model-input pixels.
        point_labels: (N, K), 1 positive, 0 negative, -10 padding.

    Returns:
        coords (N, 2 + K or 2 or K, 2) and labels of the same leading shape, box corners first.
    """
    if boxes is None and points is None:
        raise ValueError("Give at least one prompt: `boxes` or `points` (with `point_labels`).")
    if points is not None and (point_labels is None or point_labels.shape != points.shape[:2]):
        raise ValueError(f"`point_labels` must have shape {tuple(points.shape[:2])} to match `points`.")
    coords, labels = [], []
    if boxes is not None:
        coords.append(boxes.reshape(-1, 2, 2).float())
        corner_labels = torch.tensor([BOX_TOP_LEFT, BOX_BOTTOM_RIGHT], device=boxes.device)
        labels.append(corner_labels.expand(boxes.shape[0], 2))
    if points is not None:
        coords.append(points.float())
        labels.append(point_labels.long())
    return torch.cat(coords, dim=1), torch.cat(labels, dim=1)


def base_sam2(model: nn.Module) -> nn.Module:
    """Return the family model (`Sam2Model`, `Sam3TrackerModel`, `EdgeTamModel`) inside a `PeftModel` (adapter layers
    stay injected), or `model` itself."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not is_family_model(base):
        raise TypeError(
            f"Expected a Sam2Model (or another model of the SAM2 family: {supported_classes()}) or a PeftModel around "
            f"one, got {type(base).__name__}."
        )
    return base


def model_device(model: nn.Module) -> torch.device:
    """The device of `model`'s first parameter (CPU for a model without any)."""
    return next((param.device for param in model.parameters()), torch.device("cpu"))


class Sam2Segmenter(nn.Module):
    """Run SAM2 on a batch of images with a varying number of prompted objects per image.

    Batch-norm layers in the image encoder (EdgeTAM's RepViT) keep their running statistics: they stay in eval mode
    when the segmenter trains, as usual when fine-tuning a CNN on a few images per batch, so a frozen encoder stays
    frozen (and its cached features valid) and the base weights' fingerprint does not drift. Their affine weights
    train when the strategy trains them.

    Args:
        model: a `Sam2Model` (or `Sam3TrackerModel`, `EdgeTamModel`), or the `PeftModel` that `apply_strategy`
            returns. It is registered as `self.model`, so `accelerate.prepare(segmenter)` wraps everything that trains.
        backend: `--backend`: "auto", "reference", "cpu", "cuda" or a `speed.Backend` (see `sam2_peft.speed`).
            "auto" is resolved for the model's device, and again on the first inputs on another device type
            (accelerate moves the model after this is built).
    """

    def __init__(self, model: nn.Module, backend: str | Backend = "auto"):
        super().__init__()
        base_sam2(model)
        self.model = model
        if backend != "auto" and not isinstance(backend, Backend):
            select_backend(backend)  # a bad name, or cuda without CUDA, fails here rather than at the first step
        self._backend_choice = backend
        self._backends: dict[str, Backend] = {}
        self._compile_options: dict | None = None
        self._decoders: dict[str, object] = {}
        # Chosen now for where the model is, so that a compiled forward finds it made (choosing inside one would
        # change the state it guards on, and recompile); a move to another device type chooses again there.
        self.backend_for(next(model.parameters()).device)

    def train(self, mode: bool = True) -> Sam2Segmenter:
        """Set training mode, batch norms in the image encoder excepted (see the class docstring)."""
        super().train(mode)
        for module in self.sam.vision_encoder.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()
        return self

    def compile_decoder(self, **compile_options) -> None:
        """Run the backend's mask decoder through `torch.compile`, at bucketed object counts (`--compile`).

        The decoder trains in every strategy and runs on every step, once per object, as many small kernels (the
        encoder's cost is in large GEMMs). The weights are untouched, so state-dict keys, PEFT adapters and
        checkpoints stay as they are. The number of objects varies between batches: it is padded to a bucket
        (`speed.compiled.object_bucket`), each compiled once. The `cuda` backend compiles its decoder already. Needs
        a C++ compiler on CPU (inductor); `backend="eager"` tests the plumbing.

        Args:
            **compile_options: passed to `torch.compile` (`mode="max-autotune"`, `backend=`, `dynamic=`...).
        """
        self._compile_options = dict(compile_options)
        self._decoders.clear()

    def backend_for(self, device: torch.device) -> Backend:
        """The backend that runs inputs on `device` (chosen once per device type, then kept)."""
        if device.type not in self._backends:
            backend = select_backend(self._backend_choice, device)
            backend.prepare(self.model)
            self._backends[device.type] = backend
        return self._backends[device.type]

    def _decoder(self, backend: Backend):
        if self._compile_options is None or isinstance(backend, CudaBackend):  # that one is compiled already
            return backend.decode_masks
        if backend.name not in self._decoders:
            options = dict(self._compile_options)
            self._decoders[backend.name] = BucketedDecoder(backend.decode_masks, options.pop("backend", "inductor"),
                                                           **options)
        return self._decoders[backend.name]

    @property
    def sam(self) -> nn.Module:
        """The `Sam2Model` (inside the PeftModel, if any); a property so its weights are registered only once."""
        return base_sam2(self.model)

    def encode_images(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        """Run the image encoder (trunk + neck; `family.image_trunk` says how for each model class).

        Args:
            pixel_values: (B, 3, S, S) normalised images.

        Returns:
            The three FPN levels the decoder reads, high to low resolution: (B, C, 4h, 4w), (B, C, 2h, 2w),
            (B, C, h, w) for the (h, w) grid of image embeddings (S/16 for SAM2 and EdgeTAM, S/14 for SAM3). Nothing
            of the mask decoder is applied yet, so these are what a frozen-encoder cache stores.
        """
        return self.backend_for(pixel_values.device).encode_images(self.sam.vision_encoder, pixel_values)

    def project(self, image_features: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The mask decoder's own 1x1 projections (`conv_s0`, `conv_s1`) of the two high-resolution FPN levels.

        They train with the decoder, so a frozen-encoder cache stores the maps before them. Once projected, the
        256-channel S/4 map (64 MB per image at 1024 px) is needed only to train `conv_s0`, so a caller that
        projects and lets go of `image_features` frees it for the decoder's run (LoRA's peak). Several rounds of
        prompts on the same images project once (`forward(decoder_features=...)`).

        Returns:
            (B, C/8, S/4, S/4), (B, C/4, S/8, S/8) and the unchanged (B, C, S/16, S/16) image embeddings.
        """
        return self.backend_for(image_features[0].device).project(self.sam.mask_decoder, image_features)

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        *,
        image_features: Sequence[torch.Tensor] | None = None,
        decoder_features: Sequence[torch.Tensor] | None = None,
        image_index: torch.Tensor,
        point_coords: torch.Tensor,
        point_labels: torch.Tensor,
        mask_inputs: torch.Tensor | None = None,
        multimask_output: bool = True,
    ) -> SegmenterOutput:
        """Predict one set of masks per object.

        Args:
            pixel_values: (B, 3, S, S) normalised images; or pass `image_features` from `encode_images` instead,
                or `decoder_features` from `project`.
            image_features: the encoder output for the B images (e.g. from a cache).
            decoder_features: `project(image_features)`.
            image_index: (N,) the image each object belongs to, values in [0, B).
            point_coords: (N, K, 2) prompt points in model-input pixels (see `combine_prompts`).
            point_labels: (N, K) their labels (1, 0, 2, 3 for box corners, -10 padding).
            mask_inputs: optional (N, 1, h, w) mask-logit prompts at the decoder's low resolution (another size is
                resized to it as the model's forward does).
            multimask_output: three candidate masks per object (True) or one (False).
        """
        if sum(images is not None for images in (pixel_values, image_features, decoder_features)) != 1:
            raise ValueError("Pass exactly one of `pixel_values`, `image_features` or `decoder_features`.")
        if pixel_values is not None:  # no reference kept to the encoded maps: see `project`
            decoder_features = self.project(self.encode_images(pixel_values))
        elif image_features is not None:
            decoder_features = self.project(image_features)
        sam = self.sam
        decoder = sam.mask_decoder
        feat_s0, feat_s1, embeddings = decoder_features
        num_images = embeddings.shape[0]
        backend = self.backend_for(embeddings.device)
        # Reading the values synchronises a GPU stream: there, `index_select` asserts on the device instead.
        checked = backend.checks_on_host or image_index.device.type == "cpu"
        if checked and image_index.numel() and not 0 <= int(image_index.min()) <= int(image_index.max()) < num_images:
            raise ValueError(
                f"image_index has values from {int(image_index.min())} to {int(image_index.max())}, outside "
                f"[0, {num_images}): each object's image_index is its image's row in pixel_values/image_features."
            )
        images = backend.decoder_images(sam, feat_s0, feat_s1, embeddings, mask_prompts=mask_inputs is not None)
        if mask_inputs is not None and mask_inputs.shape[-2:] != sam.prompt_encoder.mask_input_size:
            mask_inputs = F.interpolate(mask_inputs.float(), size=sam.prompt_encoder.mask_input_size, mode="bilinear",
                                        align_corners=False, antialias=True).to(mask_inputs.dtype)

        num_objects = image_index.shape[0]
        sparse, dense = sam.prompt_encoder(
            input_points=point_coords.unsqueeze(1),
            input_labels=point_labels.unsqueeze(1),
            input_boxes=None,
            input_masks=mask_inputs,
        )
        objects = [image_index.to(feat_s0.device), sparse]
        if images.first_layer is None:  # else the no-mask embedding is in `images` already
            objects.append(dense.expand(num_objects, -1, -1, -1) if dense.shape[0] != num_objects else dense)
        decode = partial(self._decoder(backend), sam, grid=tuple(embeddings.shape[-2:]),
                         multimask_output=multimask_output)
        # `memory.enable_gradient_checkpointing` marks the decoder like transformers' checkpointed layers.
        if getattr(decoder, "gradient_checkpointing", False) and decoder.training and torch.is_grad_enabled():
            masks, iou_scores, object_score_logits = decoder._gradient_checkpointing_func(decode, [images], objects)
        else:
            masks, iou_scores, object_score_logits = decode(images, *objects)
        return SegmenterOutput(masks, iou_scores, object_score_logits)


def best_mask_logits(output: SegmenterOutput) -> torch.Tensor:
    """(N, M, h, w) candidates -> (N, h, w): the candidate with the highest predicted IoU."""
    best = output.iou_scores.argmax(dim=1)
    return output.mask_logits[torch.arange(len(best), device=best.device), best]


def masks_at_original_size(logits: torch.Tensor, batch: dict) -> list[torch.Tensor]:
    """Upsample (N, h, w) logits straight to each object's original image size and threshold at 0, as
    `Sam2Processor.post_process_masks` and the official `SAM2ImagePredictor` do (bilinear, no corner alignment).

    `batch` needs only `image_index` (N,) and `original_sizes` (B, 2) as (H, W).

    Returns:
        N bool masks (H_i, W_i), in the order of `batch["full_masks"]`.
    """
    masks = []
    for index, image in enumerate(batch["image_index"].tolist()):
        height, width = batch["original_sizes"][image].tolist()
        resized = F.interpolate(logits[index : index + 1, None].float(), size=(height, width), mode="bilinear")
        masks.append(resized[0, 0] > 0)
    return masks
