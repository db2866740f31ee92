"""The SAM2 family in one place: the transformers classes sam2-peft trains, and how their image encoders differ.

    trunk = image_trunk(model.vision_encoder)    # HieraTrunk, ViTTrunk or TimmTrunk, by the encoder's class
    trunk.block_of("vision_encoder.backbone.blocks.3.attn.qkv")   # 3
    maps = trunk.encode(pixel_values)            # the FPN levels the mask decoder reads, high to low resolution

`Sam2Model`, `Sam3TrackerModel` and `EdgeTamModel` share the prompt encoder and the mask decoder: transformers
generates the other two's modules from Sam2's (`modular_*.py`), so their classes differ but their code is the same, and
the decoder's fast paths (`speed.decoder.decode_masks`, `speed.layers`) know all three (`TWO_WAY_BLOCKS`,
`speed.layers.CHANNEL_LAYER_NORMS`). Their image encoders differ, and everything that depends on that is here:

- `Sam2Model`: Hiera (`HieraTrunk`): blocks `backbone.blocks.<i>` in four stages with windowed and global
  attention; an FPN over the stage outputs (`fpn_maps`) gives the decoder's three levels.
- `Sam3TrackerModel`: a ViT (`ViTTrunk`): patch 14, layers `backbone.layers.<i>` with windowed and global RoPE
  attention; the neck scales the last layer's output by 4, 2 and 1 (and 0.5) for the decoder's levels.
- `EdgeTamModel`: RepViT, a timm CNN (`TimmTrunk`): blocks are each stage's `downsample` and `blocks.<j>`; the FPN
  as SAM2.

Which computation each step takes (the neck on GEMMs, compiled blocks, or transformers' own modules) is the
backend's choice (`sam2_peft.speed`): `encode_prefix` and `encode_from_prefix` take one.

The model's own forward adds `no_memory_embedding` to the last level the encoder returns, then keeps as many levels as
`backbone_feature_sizes` lists. SAM3's neck returns four, so its image model never adds it (`adds_no_memory`).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
from torch import nn
from transformers import EdgeTamModel, Sam2Model, Sam2VideoModel, Sam3TrackerModel
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.models.edgetam.modeling_edgetam import EdgeTamTwoWayAttentionBlock, EdgeTamVisionModel
from transformers.models.sam2.modeling_sam2 import Sam2TwoWayAttentionBlock, Sam2VisionModel
from transformers.models.sam2_video.modeling_sam2_video import Sam2VideoTwoWayAttentionBlock
from transformers.models.sam3.modeling_sam3 import Sam3VisionModel
from transformers.models.sam3_tracker.modeling_sam3_tracker import Sam3TrackerTwoWayAttentionBlock

from sam2_peft.speed.neck import fpn_maps

# `Sam2VideoModel` holds every `Sam2Model` parameter (same names and shapes) plus the memory modules.
MODEL_CLASSES = (Sam2Model, Sam3TrackerModel, EdgeTamModel, Sam2VideoModel)
# The first two-way layer whose image side `speed.decoder.decoder_images` computes once per image.
TWO_WAY_BLOCKS = (
    Sam2TwoWayAttentionBlock,
    Sam3TrackerTwoWayAttentionBlock,
    EdgeTamTwoWayAttentionBlock,
    Sam2VideoTwoWayAttentionBlock,
)
VISION_ENCODER = "vision_encoder."
# `Sam2VideoModel` parameters that `Sam2Model` does not have: the memory path.
VIDEO_ONLY_PREFIXES = (
    "memory_attention.", "memory_encoder.", "mask_downsample.", "object_pointer_proj.",
    "temporal_positional_encoding_projection_layer.", "memory_temporal_positional_encoding",
    "no_memory_positional_encoding", "no_object_pointer", "occlusion_spatial_embedding_parameter",
)


def supported_classes() -> str:
    """The supported model classes, for error messages."""
    return ", ".join(cls.__name__ for cls in MODEL_CLASSES)


def is_family_model(module: nn.Module) -> bool:
    """Whether `module` is a `Sam2Model`, `Sam3TrackerModel`, `EdgeTamModel` or `Sam2VideoModel`."""
    return isinstance(module, MODEL_CLASSES)


def allow_peft(model: nn.Module) -> None:
    """Let PEFT wrap `model`: set `config.tie_word_embeddings = False` on an `EdgeTamModel` that does not say.

    PEFT (0.21) asks a model whose `_tied_weights_keys` is a dict, as every family model's is, for its input
    embeddings to find the weights tied to them, unless `config.tie_word_embeddings` is False; and
    `EdgeTamModel.get_input_embeddings` raises (its timm backbone has none). No family model ties weights, so this
    changes nothing else. A folder saved from such a model keeps the setting, so plain `PeftModel.from_pretrained`
    works on it too; for a checkpoint without it, pass `tie_word_embeddings=False` to `EdgeTamModel.from_pretrained`.
    """
    if isinstance(model, EdgeTamModel) and getattr(model.config, "tie_word_embeddings", None) is None:
        model.config.tie_word_embeddings = False


def encoder_levels(vision_encoder: nn.Module) -> int:
    """How many FPN levels the vision encoder's forward returns."""
    if isinstance(vision_encoder, Sam3VisionModel):
        return len(vision_encoder.neck.fpn_layers)
    return vision_encoder.num_feature_levels


def adds_no_memory(sam: nn.Module) -> bool:
    """Whether `sam.forward` adds `no_memory_embedding` to the image embeddings the mask decoder reads."""
    return encoder_levels(sam.vision_encoder) <= len(sam.config.vision_config.backbone_feature_sizes)


def run_block(block: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """`block(hidden)`; through its `_gradient_checkpointing_func` when `memory.enable_gradient_checkpointing` marked a
    block that is not a transformers `GradientCheckpointingLayer` (those do it themselves), such as a timm block."""
    marked = getattr(block, "gradient_checkpointing", False) and not isinstance(block, GradientCheckpointingLayer)
    if marked and block.training and torch.is_grad_enabled():
        return block._gradient_checkpointing_func(block, hidden)
    return block(hidden)


class Trunk:
    """An image encoder seen as a stem, an ordered list of blocks, and a neck that reads some blocks' outputs.

    Attributes:
        name: what its blocks are called in messages ("Hiera", "ViT", "RepViT").
        blocks: the blocks, in the order they run.
        paths: each block's module name in the model, e.g. `vision_encoder.backbone.blocks.3`.
        stage_ends: indices of the blocks whose outputs the neck reads.
        presets: trunk preset -> full-match regex over a module's name inside its block; a preset missing here has
            its reason in `missing`.
        feed_forward: regex (inside a block) of the MLP output layers, which IA3 scales at their input.
        adapts_convs: whether ungrouped `nn.Conv2d`s in the blocks are adapter targets (a CNN's only layers).
        example: an attention (or MLP) module's name, for error messages.
        trap: regex (inside a block) of layers that a loose pattern catches by mistake; None if there are none.
    """

    name = ""
    presets: dict[str, str] = {}
    missing: dict[str, str] = {}
    feed_forward = ""
    adapts_convs = False
    trap: str | None = None
    example_suffix = ""

    def __init__(self, vision_encoder: nn.Module, paths: list[str], blocks: list[nn.Module], stage_ends: set[int]):
        self.vision_encoder = vision_encoder
        self.paths, self.blocks, self.stage_ends = paths, blocks, stage_ends
        self._index = {path: index for index, path in enumerate(paths)}
        alternatives = "|".join(re.escape(path) for path in sorted(paths, key=len, reverse=True))
        self._block = re.compile(rf"(?:base_model\.model\.)?({alternatives})\.(.+)")
        self.example = f"{paths[-1]}.{self.example_suffix}"

    def locate(self, name: str) -> tuple[int, str] | None:
        """(block index, name inside the block) of a module or parameter name, PEFT prefix allowed; None outside."""
        match = self._block.fullmatch(name)
        return None if match is None else (self._index[match.group(1)], match.group(2))

    def block_of(self, name: str) -> int | None:
        """The index of the block a module or parameter name belongs to, or None."""
        located = self.locate(name)
        return None if located is None else located[0]

    def first_trainable(self) -> int | None:
        """The first block with a trainable parameter; 0 when the stem trains; None when neither does."""
        trainable = [f"{VISION_ENCODER}backbone.{name}" for name, param in
                     self.vision_encoder.backbone.named_parameters() if param.requires_grad]
        blocks = [self.block_of(name) for name in trainable]
        if any(index is None for index in blocks):
            return 0
        return min(blocks, default=None)

    def block_output(self, index: int) -> tuple[int, int]:
        """(channels, stride in input pixels) of block `index`'s output, from the configuration alone."""
        raise NotImplementedError

    def stem(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """What runs before block 0."""
        raise NotImplementedError

    def neck(self, stage_outputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """The decoder's FPN levels from the outputs of the `stage_ends` blocks (in the blocks' layout)."""
        raise NotImplementedError

    def encode(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        """The whole encoder: (B, 3, S, S) -> the FPN levels the decoder reads, high to low resolution."""
        hidden, outputs = self.stem(pixel_values), []
        for index, block in enumerate(self.blocks):
            hidden = run_block(block, hidden)
            if index in self.stage_ends:
                outputs.append(hidden)
        return self.neck(outputs)


class HieraTrunk(Trunk):
    """`Sam2VisionModel`: Hiera blocks (B, H, W, C) in, the FPN neck on the four stage outputs."""

    name = "Hiera"
    presets = {
        "trunk.qkv": r"attn\.qkv",
        "trunk.attn": r"attn\.(?:qkv|proj)",
        "trunk.mlp": r"mlp\.proj_(?:in|out)",
        # Every Linear of the selected blocks, the stage-change skip projections (block-level `proj`) included.
        "trunk.all": r"attn\.qkv|attn\.proj|mlp\.proj_(?:in|out)|proj",
    }
    feed_forward = r"mlp\.proj_out"
    example_suffix = "attn.qkv"
    # A block-level `proj` exists only in stage-change blocks, where it projects the residual to the new width. A
    # pattern ending in `proj` silently catches these alongside `attn.proj`, which is rarely what was meant.
    trap = r"proj"

    def __init__(self, vision_encoder: nn.Module):
        backbone = vision_encoder.backbone
        paths = [f"{VISION_ENCODER}backbone.blocks.{i}" for i in range(len(backbone.blocks))]
        super().__init__(vision_encoder, paths, list(backbone.blocks), set(backbone.stage_ends))

    def block_output(self, index: int) -> tuple[int, int]:
        backbone = self.vision_encoder.backbone
        stage = next(stage for stage, end in enumerate(backbone.stage_ends) if index <= end)
        return backbone.config.embed_dim_per_stage[stage], 4 * 2**stage  # the patch embedding has stride 4

    def stem(self, pixel_values: torch.Tensor) -> torch.Tensor:
        backbone = self.vision_encoder.backbone
        hidden = backbone.patch_embed(pixel_values)  # (B, 3, S, S) -> (B, S/4, S/4, C)
        return hidden + backbone._get_pos_embed(hidden.shape[1:3])

    def neck(self, stage_outputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return fpn_maps(self.vision_encoder, stage_outputs)

    def encode(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        # The backbone module itself runs (its hooks, transformers' checkpointing of its blocks).
        return self.neck(self.vision_encoder.backbone(pixel_values).intermediate_hidden_states)


class ViTTrunk(Trunk):
    """`Sam3VisionModel`: ViT layers on the (B, S/14, S/14, C) patch grid; the neck scales the last layer's output."""

    name = "ViT"
    presets = {
        "trunk.qkv": r"attention\.[qkv]_proj",
        "trunk.attn": r"attention\.[qkvo]_proj",
        "trunk.mlp": r"mlp\.fc[12]",
        "trunk.all": r"attention\.[qkvo]_proj|mlp\.fc[12]",
    }
    feed_forward = r"mlp\.fc2"
    example_suffix = "attention.q_proj"

    def __init__(self, vision_encoder: nn.Module):
        layers = vision_encoder.backbone.layers
        paths = [f"{VISION_ENCODER}backbone.layers.{i}" for i in range(len(layers))]
        super().__init__(vision_encoder, paths, list(layers), {len(layers) - 1})

    def block_output(self, index: int) -> tuple[int, int]:
        config = self.vision_encoder.backbone.config
        patch = config.patch_size
        return config.hidden_size, patch[0] if isinstance(patch, (list, tuple)) else patch

    def _grid(self, pixel_values: torch.Tensor) -> tuple[int, int]:
        patch = self.vision_encoder.backbone.config.patch_size
        patch = patch[0] if isinstance(patch, (list, tuple)) else patch
        return pixel_values.shape[-2] // patch, pixel_values.shape[-1] // patch

    def stem(self, pixel_values: torch.Tensor) -> torch.Tensor:
        backbone = self.vision_encoder.backbone
        hidden = backbone.embeddings(pixel_values)  # (B, hw, C)
        return backbone.layer_norm(hidden.view(hidden.shape[0], *self._grid(pixel_values), hidden.shape[-1]))

    def neck(self, stage_outputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        # Only the levels the decoder reads: transformers also builds a x0.5 level, and position encodings, for
        # nothing (see the module docstring).
        hidden = stage_outputs[-1].permute(0, 3, 1, 2)  # (B, h, w, C) -> (B, C, h, w), a view as in transformers
        levels = len(self.vision_encoder.config.backbone_feature_sizes)
        return [layer(hidden) for layer in self.vision_encoder.neck.fpn_layers[:levels]]

    def encode(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        hidden = self.vision_encoder.backbone(pixel_values).last_hidden_state  # (B, hw, C)
        return self.neck([hidden.view(hidden.shape[0], *self._grid(pixel_values), hidden.shape[-1])])


class TimmTrunk(Trunk):
    """`EdgeTamVisionModel`: a timm `FeatureListNet` (RepViT): (B, C, H, W) blocks, the FPN neck as SAM2.

    The blocks are the feature net's children after the stem, with each RepViT stage split into its `downsample` and
    its `blocks.<j>`; a child of another kind is one block. They run one by one here, as the feature net's own loop
    runs them (without its `set_grad_checkpointing`: `memory` checkpoints blocks itself), so hooks on the feature net
    or the `TimmWrapperModel` around it do not run.
    """

    name = "RepViT"
    presets = {
        "trunk.mlp": r"(?:.+\.)?(?:channel_mixer|ffn)\.conv[12]\.c",
        # Every ungrouped convolution: channel mixers, squeeze-excitation, channel downsampling. Depthwise ones are
        # left out: PEFT's LoRA needs the rank to be a multiple of their groups (the channel count).
        "trunk.all": r".+",
    }
    _no_attention = ("RepViT blocks have no attention layers (they mix tokens with depthwise convolutions, which LoRA "
                     "cannot adapt at a useful rank); use 'trunk.mlp' (the 1x1 channel-mixer convolutions) or "
                     "'trunk.all' (every ungrouped convolution of the blocks), e.g. `--targets trunk.mlp`.")
    missing = {"trunk.qkv": _no_attention, "trunk.attn": _no_attention}
    feed_forward = r"(?:.+\.)?(?:channel_mixer|ffn)\.conv2\.c"
    adapts_convs = True
    example_suffix = "channel_mixer.conv1.c"

    def __init__(self, vision_encoder: nn.Module):
        from timm.models.repvit import RepVitStage

        features = vision_encoder.backbone.timm_model
        root = f"{VISION_ENCODER}backbone.timm_model."
        # Each returned child's (channels, stride), which its blocks' outputs share.
        shapes = dict(zip(features.return_layers, zip(features.feature_info.channels(),
                                                      features.feature_info.reduction())))
        self._stem, paths, blocks, ends, self._shapes = [], [], [], set(), []
        for name, child in features.items():
            if not blocks and name.startswith("stem") and name not in features.return_layers:
                self._stem.append(child)
                continue
            parts = [(name, child)]
            if type(child) is RepVitStage:  # its forward: downsample, then the blocks in order
                downsample = [] if isinstance(child.downsample, nn.Identity) else [child.downsample]
                parts = [(f"{name}.downsample", module) for module in downsample]
                parts += [(f"{name}.blocks.{j}", block) for j, block in enumerate(child.blocks)]
            paths += [root + path for path, _ in parts]
            blocks += [module for _, module in parts]
            self._shapes += [shapes.get(name)] * len(parts)
            if name in features.return_layers:
                ends.add(len(blocks) - 1)
        super().__init__(vision_encoder, paths, blocks, ends)

    def block_output(self, index: int) -> tuple[int, int]:
        if self._shapes[index] is None:
            raise ValueError(f"{self.paths[index]} is not a feature the timm backbone returns; its size is unknown.")
        return self._shapes[index]

    def stem(self, pixel_values: torch.Tensor) -> torch.Tensor:
        hidden = pixel_values
        for module in self._stem:
            hidden = module(hidden)
        return hidden

    def neck(self, stage_outputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        # (B, C, H, W) -> (B, H, W, C) views, as `EdgeTamVisionModel.forward` hands them to its neck.
        return fpn_maps(self.vision_encoder, [output.permute(0, 2, 3, 1) for output in stage_outputs])


_TRUNKS = ((Sam2VisionModel, HieraTrunk), (Sam3VisionModel, ViTTrunk), (EdgeTamVisionModel, TimmTrunk))


def image_trunk(vision_encoder: nn.Module) -> Trunk:
    """The `Trunk` of a family model's `vision_encoder`, chosen by its class."""
    for cls, trunk in _TRUNKS:
        if isinstance(vision_encoder, cls):
            return trunk(vision_encoder)
    raise TypeError(
        f"No image-encoder support for {type(vision_encoder).__name__}; sam2-peft supports the vision encoders of "
        f"{supported_classes()} ({', '.join(cls.__name__ for cls, _ in _TRUNKS)})."
    )


def encode_prefix(
    vision_encoder: nn.Module, pixel_values: torch.Tensor, start_block: int, backend=None
) -> list[torch.Tensor]:
    """Run the encoder's stem and blocks `[0, start_block)`: what `encode_from_prefix` continues from.

    Follows the backbone's forward (`Sam2HieraDetModel`, `Sam3ViTModel`, timm's `FeatureListNet`; transformers 5)
    up to the first block that trains.

    Args:
        vision_encoder: the model's `vision_encoder`.
        pixel_values: (B, 3, S, S) normalised images.
        start_block: index of the first block not run, 1 <= start_block <= number of blocks.
        backend: the `speed.Backend` that runs the blocks (`Sam2Segmenter.backend_for`); None runs each as `run_block`.

    Returns:
        `[hidden, *stage_outputs]`: the hidden state entering block `start_block` ((B, H, W, C) for Hiera and ViT,
        (B, C, H, W) for timm), then the outputs of the stages that end before block `start_block - 1` (the neck
        reads them; an output of block `start_block - 1` itself is `hidden`, kept once).
    """
    trunk = image_trunk(vision_encoder)
    run = run_block if backend is None else backend.run_block
    hidden = trunk.stem(pixel_values)
    stage_outputs = []
    for index in range(start_block):
        hidden = run(trunk.blocks[index], hidden)
        if index in trunk.stage_ends and index < start_block - 1:
            stage_outputs.append(hidden)
    return [hidden, *stage_outputs]


def encode_from_prefix(
    vision_encoder: nn.Module, prefix: list[torch.Tensor], start_block: int, backend=None
) -> list[torch.Tensor]:
    """Run blocks `[start_block, end)` and the FPN neck on an `encode_prefix` output, with autograd.

    Follows the tail of the backbone's and the vision encoder's forward (transformers 5). `backend` runs the blocks
    and the neck, as in `encode_prefix`; None runs `run_block` and the trunk's neck.

    Returns:
        The three FPN maps, high to low resolution, as `Sam2Segmenter.encode_images`.
    """
    trunk = image_trunk(vision_encoder)
    run = run_block if backend is None else backend.run_block
    hidden, *stage_outputs = prefix
    stage_outputs = list(stage_outputs)
    if start_block - 1 in trunk.stage_ends:
        stage_outputs.append(hidden)
    for index in range(start_block, len(trunk.blocks)):
        hidden = run(trunk.blocks[index], hidden)
        if index in trunk.stage_ends:
            stage_outputs.append(hidden)
    return trunk.neck(stage_outputs) if backend is None else backend.neck(trunk, stage_outputs)
