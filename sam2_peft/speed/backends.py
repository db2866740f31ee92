"""The three backends and `select_backend`: one switch that says which computation every fast path takes.

    backend = select_backend("auto", device)     # "cuda" on a CUDA device, "cpu" otherwise (--backend)
    maps = backend.encode_images(sam.vision_encoder, pixel_values)

- `reference`: transformers' modules called as `Sam2Model.forward` calls them, PEFT's own LoRA forward,
  transformers' whole-block checkpointing. For debugging, and what the tests compare the others with.
- `cpu`: the oneDNN-tuned paths: the decoder on tokens with its transposed convolutions as GEMMs
  (`speed.decoder`), the FPN neck as GEMMs without position encodings (`speed.neck`), in-place LoRA
  (`speed.fused_lora`), windowed blocks checkpointed in strips (`speed.strips`).
- `cuda`: the `cpu` forms plus compiled regions (`speed.compiled`): each Hiera block through one compiled function
  with fused attention on its windows (`speed.hiera`), and the mask decoder compiled at bucketed object counts; no
  host synchronisation in the forward. Runs on any device (a CPU test compiles with `compiler="aot_eager"`), but
  `select_backend` gives it only where CUDA is.
"""

from __future__ import annotations

import warnings
from functools import partial

import torch
from torch import nn

from sam2_peft import family
from sam2_peft.errors import ConfigError
from sam2_peft.speed import decoder, reference
from sam2_peft.speed.compiled import BucketedDecoder, CompiledBlocks
from sam2_peft.speed.fused_lora import InPlaceLoraLinear
from sam2_peft.speed.hiera import fuses, hiera_block
from sam2_peft.speed.layers import has_hooks, pointwise_conv
from sam2_peft.speed.strips import checkpoint_in_strips, checkpoint_whole
from sam2_peft.speed.versions import (
    check_transformers,
    installed_transformers,
    transformers_supported,
    unsupported_message,
)

BACKENDS = ("auto", "reference", "cpu", "cuda")


class Backend:
    """The `reference` backend, and the interface of the others: what `Sam2Segmenter`, `encode_prefix` /
    `encode_from_prefix` and `enable_gradient_checkpointing` ask of a backend.

    Attributes:
        name: "reference", "cpu" or "cuda".
        checks_on_host: whether the segmenter may read tensor values on the host (a range check of `image_index`
            synchronises a GPU stream).
    """

    name = "reference"
    checks_on_host = True
    in_place_lora = False

    def prepare(self, model: nn.Module) -> None:
        """Set the per-layer switches of `model` (a family model or the PeftModel around one) for this backend."""
        for module in model.modules():
            if isinstance(module, InPlaceLoraLinear):
                module.in_place = self.in_place_lora

    def encode_images(self, vision_encoder: nn.Module, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        """(B, 3, S, S) -> the FPN levels the decoder reads, high to low resolution."""
        return reference.encode_images(vision_encoder, pixel_values)

    def run_block(self, block: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        """One encoder block on its input, checkpointed where `memory` marked it."""
        return family.run_block(block, hidden)

    def neck(self, trunk: family.Trunk, stage_outputs: list[torch.Tensor]) -> list[torch.Tensor]:
        """The FPN levels from the stage outputs (what `encode_from_prefix` ends with)."""
        return reference.neck(trunk, stage_outputs)

    def project(self, mask_decoder: nn.Module, image_features) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The decoder's `conv_s0` / `conv_s1` on the two high-resolution levels; the embeddings unchanged."""
        return reference.project(mask_decoder, image_features)

    def decoder_images(self, sam, feat_s0, feat_s1, embeddings, *, mask_prompts: bool) -> decoder.DecoderImages:
        """The decoder's per-image inputs (see `speed.decoder.decoder_images`)."""
        return reference.decoder_images(sam, feat_s0, feat_s1, embeddings, mask_prompts=mask_prompts)

    def decode_masks(self, sam, images, image_index, sparse, dense=None, *, grid, multimask_output=True):
        """(N, M, 4h, 4w) masks, (N, M) IoU, (N, 1) object scores (see `speed.decoder.decode_masks`)."""
        return reference.decode_masks(sam, images, image_index, sparse, dense, grid=grid,
                                      multimask_output=multimask_output)

    def block_checkpoint(self, window_size: int, strips: int):
        """The `_gradient_checkpointing_func` of a block with this attention window (0: none or global)."""
        return checkpoint_whole


class CpuBackend(Backend):
    """Today's oneDNN-tuned paths (see the module docstring)."""

    name = "cpu"
    in_place_lora = True

    def encode_images(self, vision_encoder, pixel_values):
        return family.image_trunk(vision_encoder).encode(pixel_values)

    def neck(self, trunk, stage_outputs):
        return trunk.neck(stage_outputs)

    def project(self, mask_decoder, image_features):
        feat_s0, feat_s1, embeddings = image_features
        return pointwise_conv(mask_decoder.conv_s0, feat_s0), pointwise_conv(mask_decoder.conv_s1, feat_s1), embeddings

    def decoder_images(self, sam, feat_s0, feat_s1, embeddings, *, mask_prompts):
        return decoder.decoder_images(sam, feat_s0, feat_s1, embeddings, mask_prompts=mask_prompts)

    def decode_masks(self, sam, images, image_index, sparse, dense=None, *, grid, multimask_output=True):
        return decoder.decode_masks(sam, images, image_index, sparse, dense, grid=grid,
                                    multimask_output=multimask_output)

    def block_checkpoint(self, window_size, strips):
        if window_size and strips > 1:
            return partial(checkpoint_in_strips, window_size=window_size, strips=strips)
        return checkpoint_whole


class CudaBackend(CpuBackend):
    """The GPU path: `CpuBackend`'s forms with compiled Hiera blocks and a bucketed compiled decoder.

    Args:
        compiler: `torch.compile`'s backend for both regions ("inductor"; "aot_eager" on CPU in tests).
        compile_blocks: compile the Hiera blocks (fused window attention either way).
        compile_decoder: compile the mask decoder at bucketed object counts.
    """

    name = "cuda"
    checks_on_host = False

    def __init__(self, compiler: str = "inductor", compile_blocks: bool = True, compile_decoder: bool = True):
        self._block = CompiledBlocks(compiler) if compile_blocks else hiera_block
        self._decode = BucketedDecoder(decoder.decode_masks, compiler) if compile_decoder else decoder.decode_masks

    def run_block(self, block, hidden):
        if not fuses(block):
            return family.run_block(block, hidden)
        function = partial(self._block, block)
        # As `GradientCheckpointingLayer.__call__`, whose place this takes.
        if getattr(block, "gradient_checkpointing", False) and block.training and torch.is_grad_enabled():
            return block._gradient_checkpointing_func(function, hidden)
        return function(hidden)

    def encode_images(self, vision_encoder, pixel_values):
        trunk = family.image_trunk(vision_encoder)
        if not isinstance(trunk, family.HieraTrunk) or has_hooks(vision_encoder.backbone):
            return trunk.encode(pixel_values)  # the backbone's own hooks must run
        hidden, stage_outputs = trunk.stem(pixel_values), []
        for index, block in enumerate(trunk.blocks):
            hidden = self.run_block(block, hidden)
            if index in trunk.stage_ends:
                stage_outputs.append(hidden)
        return trunk.neck(stage_outputs)

    def decode_masks(self, sam, images, image_index, sparse, dense=None, *, grid, multimask_output=True):
        return self._decode(sam, images, image_index, sparse, dense, grid=grid, multimask_output=multimask_output)


_CLASSES = {"reference": Backend, "cpu": CpuBackend, "cuda": CudaBackend}


def select_backend(name: str | Backend = "auto", device: torch.device | str | None = None) -> Backend:
    """The backend called `name` (`--backend`), for tensors on `device`.

    Args:
        name: "auto" (`cuda` on a CUDA device, `cpu` otherwise; `reference` with a warning when the installed
            transformers is outside `versions.SUPPORTED_TRANSFORMERS`), "reference", "cpu" or "cuda"; a `Backend` is
            returned as it is.
        device: where the model's inputs are; only "auto" reads it.

    Raises:
        ConfigError: an unknown name; "cuda" where CUDA is not available; "cpu" or "cuda" on an untested
            transformers (the message names the installed and the supported versions).

    Example:
        >>> select_backend("auto", "cpu").name
        'cpu'
    """
    if isinstance(name, Backend):
        return name
    if name not in BACKENDS:
        raise ConfigError(f"--backend {name!r} is unknown; choose from {', '.join(BACKENDS)}.")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            f"--backend cuda: the GPU path needs CUDA, and this machine has none (torch {torch.__version__}, "
            "torch.cuda.is_available() is False). Use --backend auto (cpu here) or cpu, or run on a CUDA machine."
        )
    if name == "auto":
        if not transformers_supported():
            warnings.warn(unsupported_message(installed_transformers(), "auto") + " Running --backend reference.",
                          stacklevel=2)
            return Backend()
        name = "cuda" if device is not None and torch.device(device).type == "cuda" else "cpu"
    if name != "reference":
        check_transformers(name)
    return _CLASSES[name]()
