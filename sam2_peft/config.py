"""The training configuration: one dataclass, read from YAML and overridden from the command line.

    sam2-peft train --config recipes/configs/quickstart.yaml --max_steps 20 --output_dir runs/try
    accelerate launch recipes/lora_medical.py --config recipes/configs/lora_medical.yaml --lora_r 16

Every field is documented once, in its `help`, which `--help` prints.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from transformers import HfArgumentParser

from sam2_peft.data.config import DataConfig, parse_strictly, read_yaml_fields
from sam2_peft.errors import ConfigError
from sam2_peft.speed import select_backend
from sam2_peft.strategies import NON_PEFT_STRATEGIES, PEFT_STRATEGIES, VIDEO_STRATEGIES

# Learning rates that work for each strategy on SAM2 (the more of the network trains, the gentler the step).
DEFAULT_LEARNING_RATES = {"decoder": 1e-4, "partial": 3e-5, "full": 1e-5, "memory": 3e-5, "peft": 1e-4}


# The validation metrics each task reports (higher is better).
EVAL_METRICS = {"image": ("dice", "iou"), "video": ("dice", "j", "f", "j_and_f")}
# The config fields that only some strategies read.
STRATEGY_OPTIONS = {
    "decoder": {"train_prompt_encoder"},
    "partial": {"num_blocks", "blocks", "train_neck", "train_prompt_encoder"},
    "full": set(),
    "memory": {"train_prompt_encoder"},
    "peft": {"targets", "blocks", "lora_r", "lora_alpha", "lora_dropout", "decoder_mode"},
}


def _help(text: str, **kwargs):
    return field(metadata={"help": text}, **kwargs)


@dataclass
class TrainConfig(DataConfig):
    """Everything a fine-tuning run needs: the shared `DataConfig` fields and these; see each field's help."""

    # Model and strategy
    model: str = _help("Hub id (SAM2, facebook/sam3's tracker, EdgeTAM), local HF folder, official .pt checkpoint, or a tiny random preset: tiny-random, tiny-random-sam3-tracker, tiny-random-edgetam, tiny-random-video (task video loads the video model).", default="facebook/sam2.1-hiera-tiny")
    revision: str | None = _help("Hub branch, tag or commit of `model` to pin.", default=None)
    sam2_config: str | None = _help("Official config name for a .pt `model` (e.g. sam2.1_hiera_t); guessed if unset.", default=None)
    strategy: str = _help("decoder | partial | full | memory (task video: memory attention, memory encoder, object pointers + decoder) | lora | dora | another PEFT tuner name (loha, lokr, ia3, ...).", default="lora")
    num_blocks: int | None = _help("partial: train the last N Hiera blocks (plus the decoder).", default=None)
    targets: str = _help("PEFT target presets joined by '+': trunk.qkv, trunk.attn, trunk.mlp, trunk.all, decoder.attn, decoder.all, and for task video memory.attn, memory.all (EdgeTAM's CNN trunk has no attention: trunk.mlp).", default="trunk.qkv")
    blocks: str | None = _help("Hiera blocks to adapt (PEFT) or train (partial): 'last:4', 'first:2' or '0,3,5'.", default=None)
    lora_r: int = _help("Adapter rank: higher fits more, costs more memory and a bigger file.", default=8)
    lora_alpha: float | None = _help("Adapter scale numerator (scale = alpha / r); default 2 * lora_r.", default=None)
    lora_dropout: float = _help("Dropout on the adapter input; try 0.05-0.1 on very small datasets.", default=0.0)
    decoder_mode: str = _help("PEFT strategies: the mask decoder is 'frozen', trained 'full' (modules_to_save) or gets an 'adapter'.", default="frozen")
    train_prompt_encoder: bool = _help("decoder/partial: train the prompt encoder too.", default=False)
    train_neck: bool = _help("partial: train the FPN neck too.", default=False)
    hub_kernels: bool = _help("Let transformers swap layers for compiled kernels it downloads from the Hub (kernels-community/*) on CUDA. Off: plain PyTorch, nothing fetched at run time.", default=False)

    # Data (beyond the `DataConfig` fields: source, columns, splits, intensities, masks)
    augment: bool = _help("Joint augmentation (crop, flips, 90-degree rotations, intensity) on the training set.", default=True)
    max_objects_per_image: int = _help("Cap on objects per image (video: per clip) per step (a seeded random subset); bounds decoder memory.", default=8)

    # Prompts
    box_probability: float = _help("Chance that an object is prompted with a (jittered) box rather than clicks.", default=0.5)
    box_jitter: float = _help("Box corner noise as a fraction of the box side.", default=0.1)
    num_points: int = _help("Positive clicks for point-prompted objects.", default=1)
    correction_rounds: int = _help("Extra rounds per step with a click sampled from the error of the previous prediction (video: on the first frame and on each correction frame).", default=0)
    correction_frames: int = _help("task video: tracked frames per clip (sampled) that also get correction_rounds clicks and then serve as prompted memories, as official SAM2 training.", default=1)

    # Optimisation
    output_dir: str = _help("Where final/, metrics.json, checkpoints/ and plots go.", default="runs/sam2-peft")
    max_steps: int | None = _help("Optimiser steps to run; overrides num_epochs when set.", default=None)
    num_epochs: int = _help("Passes over the training set (when max_steps is unset).", default=10)
    batch_size: int = _help("Images (task video: clips) per device per step (each with up to max_objects_per_image objects).", default=4)
    gradient_accumulation_steps: int = _help("Micro-batches per optimiser step.", default=1)
    learning_rate: float | None = _help("Peak learning rate; default per strategy: decoder 1e-4, partial 3e-5, full 1e-5, PEFT 1e-4.", default=None)
    weight_decay: float = _help("AdamW weight decay.", default=1e-2)
    warmup_ratio: float = _help("Fraction of the steps with linear warmup before the cosine decay.", default=0.05)
    max_grad_norm: float = _help("Gradient clipping norm (0 disables).", default=1.0)
    mixed_precision: str | None = _help("no | bf16 | fp16 (GPU). Unset: what `accelerate launch` was configured with (`--mixed_precision` or the `--config_file`), else no.", default=None)
    seed: int = _help("Seed for weights, data order, augmentation and prompts.", default=42)
    deterministic: bool = _help("Deterministic kernels, so a resumed run ends bit-identical to an uninterrupted one (CPU); costs speed on GPU.", default=True)
    focal_weight: float = _help("Weight of the focal loss.", default=20.0)
    dice_weight: float = _help("Weight of the dice loss.", default=1.0)
    iou_weight: float = _help("Weight of the IoU-prediction loss.", default=1.0)
    object_weight: float = _help("Weight of the object-score loss.", default=1.0)
    max_nonfinite_steps: int = _help("Stop with an error after this many NaN/inf losses in a row (each is skipped).", default=5)

    # Speed and memory
    cache_features: bool = _help("Cache what frozen encoder parts compute (decoder: all features; partial: the frozen blocks).", default=True)
    cache_views: int = _help("With pixel-changing augmentation, augmented views cached per image (draws repeat every N epochs).", default=4)
    cache_dir: str | None = _help("Keep the feature cache on disk (safetensors) instead of in memory.", default=None)
    gradient_checkpointing: bool = _help("Recompute activations in backward: the trainable Hiera blocks (windowed ones in strips) and the mask decoder, objects_per_checkpoint objects at a time. Less memory, about a third more encoder compute and one more decoder forward.", default=False)
    checkpoint_strips: int = _help("With gradient_checkpointing: horizontal strips per windowed Hiera block, each its own checkpoint (1 = whole blocks); more strips hold less at once in backward.", default=4)
    objects_per_checkpoint: int = _help("With gradient_checkpointing: objects per mask-decoder checkpoint; more run the decoder in bigger batches (fewer, larger GPU kernels) and hold more at once in backward.", default=1)
    backend: str = _help("Which computation runs the fast paths: auto (cuda on a GPU, cpu otherwise), reference (transformers' own modules, to debug), cpu, cuda (compiled Hiera blocks, fused window attention, compiled decoder).", default="auto")
    compile: bool = _help("torch.compile the mask decoder (needs a C++ compiler on CPU).", default=False)

    # Evaluation, checkpoints, logging
    eval_steps: int | None = _help("Validate every N optimiser steps; default once per epoch.", default=None)
    eval_metric: str = _help("Validation metric for early stopping and the best checkpoint: dice or iou (task video: dice, j, f or j_and_f).", default="dice")
    early_stopping_patience: int | None = _help("Stop after N validations without improvement; unset = never.", default=None)
    checkpoint_steps: int | None = _help("Save resumable state every N steps; default at every validation.", default=None)
    checkpoint_total_limit: int = _help("Resumable checkpoints kept in output_dir/checkpoints.", default=2)
    resume_from_checkpoint: str | None = _help("'latest' or a checkpoint folder to resume from.", default=None)
    logging_steps: int = _help("Log loss, learning rate and throughput every N steps.", default=10)
    report_to: str = _help("Trackers: none, tensorboard, wandb, or all.", default="none")

    def __post_init__(self):
        super().__post_init__()
        # A training run has no adapter to take preprocessing from: unset fields get their defaults, and the
        # adapter it writes records them.
        for name, value in dataclasses.asdict(self.data_config().resolved()).items():
            setattr(self, name, value)
        known = NON_PEFT_STRATEGIES + VIDEO_STRATEGIES + PEFT_STRATEGIES
        if self.strategy not in known:
            raise ConfigError(f"`--strategy {self.strategy}` is unknown; choose one of {', '.join(known)}.")
        if self.strategy in VIDEO_STRATEGIES and self.task != "video":
            raise ConfigError(
                f"`--strategy {self.strategy}` trains SAM2's video memory; add `--task video` (clips, not images)."
            )
        if self.strategy == "partial" and self.num_blocks is None and self.blocks is None:
            raise ConfigError("`--strategy partial` needs `--num_blocks N` (the last N Hiera blocks) or `--blocks`.")
        if self.mixed_precision not in (None, "no", "bf16", "fp16"):
            raise ConfigError(f"`--mixed_precision {self.mixed_precision}` is unknown; use no, bf16 or fp16.")
        if self.decoder_mode not in ("frozen", "full", "adapter"):
            raise ConfigError(f"`--decoder_mode {self.decoder_mode}` is unknown; use frozen, full or adapter.")
        select_backend(self.backend)  # refuses an unknown name, or cuda without CUDA, naming --backend
        metrics = EVAL_METRICS[self.task]
        if self.eval_metric not in metrics:
            raise ConfigError(
                f"`--eval_metric {self.eval_metric}` is unknown for --task {self.task}; use {' or '.join(metrics)}."
            )
        if self.report_to not in ("none", "tensorboard", "wandb", "all"):
            raise ConfigError(f"`--report_to {self.report_to}` is unknown; use none, tensorboard, wandb or all.")
        if self.correction_frames < 0:
            raise ConfigError(f"`--correction_frames` must be >= 0, got {self.correction_frames}.")
        for name in ("batch_size", "gradient_accumulation_steps", "num_epochs", "max_objects_per_image", "logging_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"`--{name}` must be at least 1, got {getattr(self, name)}.")
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError(f"`--max_steps` must be at least 1, got {self.max_steps}.")
        for name in ("eval_steps", "checkpoint_steps", "early_stopping_patience"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"`--{name}` must be at least 1 (or unset), got {getattr(self, name)}.")
        for name in ("max_nonfinite_steps", "cache_views", "checkpoint_total_limit", "checkpoint_strips",
                     "objects_per_checkpoint"):
            if getattr(self, name) < 1:
                raise ConfigError(f"`--{name}` must be at least 1, got {getattr(self, name)}.")
        if self.checkpoint_total_limit < 2:
            raise ConfigError("`--checkpoint_total_limit` must be at least 2, so a crash while saving leaves one intact.")
        for name in ("warmup_ratio", "box_jitter", "lora_dropout"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(f"`--{name}` must be in [0, 1), got {getattr(self, name)}.")
        if not 0 <= self.box_probability <= 1:
            raise ConfigError(f"`--box_probability` must be in [0, 1], got {self.box_probability}.")
        if self.learning_rate is None:
            group = self.strategy if self.strategy in NON_PEFT_STRATEGIES + VIDEO_STRATEGIES else "peft"
            self.learning_rate = DEFAULT_LEARNING_RATES[group]

    def ignored_options(self) -> list[str]:
        """Strategy options set away from their defaults that this run's strategy does not use (for a warning)."""
        used = STRATEGY_OPTIONS["peft" if self.is_peft else self.strategy]
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        return [
            f"--{name} {getattr(self, name)}"
            for name in sorted(set().union(*STRATEGY_OPTIONS.values()) - used)
            if getattr(self, name) != defaults[name]
        ]

    @property
    def is_peft(self) -> bool:
        return self.strategy in PEFT_STRATEGIES

    def block_selection(self) -> str | list[int] | None:
        """`blocks` as `select_blocks` takes it: 'last:N' stays a string, '0,3,5' becomes a list."""
        if self.blocks is None or ":" in self.blocks or self.blocks == "all":
            return self.blocks
        try:
            return [int(part) for part in self.blocks.split(",")]
        except ValueError:
            raise ConfigError(f"`--blocks {self.blocks}` is not understood; use 'last:4', 'first:2' or '0,3,5'.") from None

    def strategy_options(self) -> dict:
        """The options `apply_strategy` takes for this config's strategy."""
        if self.strategy in ("decoder", "memory"):
            return {"train_prompt_encoder": self.train_prompt_encoder}
        if self.strategy == "partial":
            selection = {"num_blocks": self.num_blocks} if self.num_blocks is not None else {"blocks": self.block_selection()}
            return {**selection, "train_neck": self.train_neck, "train_prompt_encoder": self.train_prompt_encoder}
        if self.strategy == "full":
            return {}
        return {
            "targets": self.targets,
            "blocks": self.block_selection(),
            "r": self.lora_r,
            "alpha": self.lora_alpha,
            "dropout": self.lora_dropout,
            "decoder": self.decoder_mode,
        }

    def save(self, path: str | Path) -> None:
        """Write the effective config as YAML (what `--config` reads back)."""
        Path(path).write_text(yaml.safe_dump(dataclasses.asdict(self), sort_keys=False))

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)


def parse_config(args: list[str] | None = None, default_config: str | Path | None = None) -> TrainConfig:
    """Read `--config FILE.yaml` (or `default_config`), then apply `--<field> VALUE` overrides on top.

    Unknown YAML keys and unknown flags are errors that name them.

    Example:
        >>> cfg = parse_config(["--config", "recipes/configs/quickstart.yaml", "--max_steps", "5"])
    """
    parser = HfArgumentParser(TrainConfig)
    parser.add_argument("--config", default=None, help="YAML file with any of the fields below.")
    namespace, _ = parser.parse_known_args(args)
    config_path = namespace.config or default_config
    if config_path is not None:
        fields = {f.name for f in dataclasses.fields(TrainConfig)}
        parser.set_defaults(**read_yaml_fields(config_path, fields, "sam2-peft train"))
    # The extra namespace holds `--config` itself.
    config, _ = parse_strictly(parser, args)
    return config
