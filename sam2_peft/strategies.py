"""The fine-tuning strategies as one switch over a `Sam2Model` (or `Sam3TrackerModel`, `EdgeTamModel`,
`Sam2VideoModel`).

    model = apply_strategy(load_sam2("tiny-random"), "decoder")       # or "partial" (num_blocks=N), "full",
    model = apply_strategy(model, "lora", r=8, targets="trunk.qkv")    # "dora", "loha", ..., or a peft.PeftConfig
    video = apply_strategy(load_sam2("tiny-random", video=True), "memory")   # the memory path and the decoder
    print(trainable_summary(model))

On a `Sam2VideoModel` `decoder` and `partial` train the same parameters as on the image model (the memory path stays
frozen), so what they save loads onto either model; `full` trains the memory path too; `memory` trains the memory
path and the mask decoder, and needs the video model.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import warnings
from collections.abc import Sequence

from peft import PEFT_TYPE_TO_CONFIG_MAPPING, LoraConfig, PeftConfig, PeftModel, PeftType, get_peft_model
from peft.tuners.tuners_utils import check_target_module_exists
from torch import nn

from sam2_peft.family import VIDEO_ONLY_PREFIXES, Trunk, allow_peft
from sam2_peft.speed.fused_lora import InPlaceLoraLinear
from sam2_peft.targets import (
    PRESET_NAMES,
    model_trunk,
    require_video_model,
    resolve_targets,
    select_blocks,
    split_targets,
    trapped_names,
)

NON_PEFT_STRATEGIES = ("decoder", "partial", "full")
# Non-PEFT strategies that need `Sam2VideoModel` (`load_sam2(name, video=True)`, `--task video`).
VIDEO_STRATEGIES = ("memory",)
# PEFT tuners that adapt nn.Linear and run on SAM2. OFT is refused (see `_wrap`).
PEFT_STRATEGIES = ("lora", "dora", "loha", "lokr", "ia3", "vera", "boft", "fourierft", "hra")
# Tuners whose PEFT layers exist for nn.Linear only, not for the convolutions of EdgeTAM's RepViT blocks.
LINEAR_ONLY_TUNERS = ("vera", "fourierft")
DECODER_MODES = ("frozen", "full", "adapter")


def apply_strategy(model: nn.Module, strategy: str | PeftConfig, **options) -> nn.Module:
    """Make exactly the parameters of a fine-tuning strategy trainable.

    Non-PEFT strategies change `requires_grad` in place and return `model`; PEFT strategies wrap it and return a
    `PeftModel` (the base is frozen and the adapter layers are injected into `model`).

    Args:
        model: a `Sam2Model`, `Sam3TrackerModel`, `EdgeTamModel` or `Sam2VideoModel`.
        strategy: one of
            - `"decoder"`: the mask decoder trains. Option `train_prompt_encoder=False`.
            - `"partial"`: the last `num_blocks` image-encoder blocks (Hiera blocks, SAM3's ViT layers, EdgeTAM's
              RepViT blocks; or an explicit `blocks=[...]`) and the decoder train.
              Options `train_neck=False`, `train_prompt_encoder=False`.
            - `"full"`: everything trains (on a `Sam2VideoModel` the memory path too).
            - `"memory"` (`Sam2VideoModel` only): the memory path (memory attention, memory encoder with the mask
              downsampler, object-pointer projections and the learnt memory embeddings: every parameter under
              `family.VIDEO_ONLY_PREFIXES`) and the mask decoder train; the image and prompt encoders stay frozen.
              Option `train_prompt_encoder=False`.
            - a PEFT tuner name (`lora`, `dora`, `loha`, `lokr`, `ia3`, `vera`, `boft`, `fourierft`, `hra`) or
              any `peft.PeftConfig`. Options `targets="trunk.qkv"` (presets combinable with `+`; on a video model
              also `memory.attn`, `memory.all`), `blocks=None` (`"last:4"` or a list; image-encoder blocks only),
              `r=8`, `alpha=2*r`, `dropout=0.0`, `decoder="frozen"|"full"|"adapter"`, and any field of the tuner's PEFT
              config (e.g. `init_lora_weights=False`).
        **options: the strategy's options above.

    Example:
        >>> model = apply_strategy(load_sam2("tiny-random"), "partial", num_blocks=2)
        >>> trainable_summary(model)["trunk.blocks.7"]["trainable"] > 0
        True
    """
    if isinstance(strategy, PeftConfig):
        return _with_options(_apply_peft_config, "peft config", model, strategy, options)
    name = str(strategy).lower()
    if name in NON_PEFT_STRATEGIES + VIDEO_STRATEGIES:
        builder = {"decoder": _decoder, "partial": _partial, "full": _full, "memory": _memory}[name]
        return _with_options(builder, name, model, None, options)
    if name in PEFT_STRATEGIES or name == "oft":
        return _with_options(_apply_peft, name, model, name, options)
    known = NON_PEFT_STRATEGIES + VIDEO_STRATEGIES + PEFT_STRATEGIES
    raise ValueError(f"strategy={strategy!r} is unknown; choose one of {', '.join(known)} or pass a peft.PeftConfig.")


def _with_options(builder, name: str, model: nn.Module, arg, options: dict) -> nn.Module:
    if isinstance(model, PeftModel):
        raise ValueError("apply_strategy got a PeftModel; apply a strategy to a plain model (from load_sam2).")
    accepted = {
        p.name for p in inspect.signature(builder).parameters.values() if p.kind is inspect.Parameter.KEYWORD_ONLY
    }
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in inspect.signature(builder).parameters.values())
    unknown = sorted(set(options) - accepted)
    if unknown and not takes_any:
        raise TypeError(f"Strategy {name!r} has no option(s) {unknown}; its options are {sorted(accepted)}.")
    return builder(model, **options) if arg is None else builder(model, arg, **options)


def _set_trainable(model: nn.Module, prefixes: Sequence[str]) -> nn.Module:
    for param_name, param in model.named_parameters():
        param.requires_grad_(param_name.startswith(tuple(prefixes)))
    return model


def _decoder(model: nn.Module, *, train_prompt_encoder: bool = False) -> nn.Module:
    return _set_trainable(model, ["mask_decoder."] + (["prompt_encoder."] if train_prompt_encoder else []))


def _partial(
    model: nn.Module,
    *,
    num_blocks: int | None = None,
    blocks: str | Sequence[int] | None = None,
    train_neck: bool = False,
    train_prompt_encoder: bool = False,
) -> nn.Module:
    trunk = model_trunk(model)
    total = len(trunk.blocks)
    if (num_blocks is None) == (blocks is None):
        raise ValueError("Strategy 'partial' needs exactly one of `num_blocks` (the last N blocks) or `blocks`.")
    if num_blocks is not None and not 1 <= num_blocks <= total:
        raise ValueError(
            f"num_blocks={num_blocks} is out of range: this model has {total} {trunk.name} blocks (1..{total})."
        )
    selected = select_blocks(f"last:{num_blocks}" if num_blocks is not None else blocks, total)
    prefixes = [f"{trunk.paths[index]}." for index in selected] + ["mask_decoder."]
    prefixes += ["vision_encoder.neck."] if train_neck else []
    prefixes += ["prompt_encoder."] if train_prompt_encoder else []
    return _set_trainable(model, prefixes)


def _full(model: nn.Module) -> nn.Module:
    return _set_trainable(model, [""])


def _memory(model: nn.Module, *, train_prompt_encoder: bool = False) -> nn.Module:
    require_video_model(model, "strategy='memory'")
    prefixes = [*VIDEO_ONLY_PREFIXES, "mask_decoder."] + (["prompt_encoder."] if train_prompt_encoder else [])
    return _set_trainable(model, prefixes)


def _apply_peft(
    model: nn.Module,
    tuner: str,
    *,
    targets: str | Sequence[str] = "trunk.qkv",
    blocks: str | Sequence[int] | None = None,
    r: int = 8,
    alpha: float | None = None,
    dropout: float = 0.0,
    decoder: str = "frozen",
    **peft_options,
) -> PeftModel:
    if decoder not in DECODER_MODES:
        raise ValueError(f"decoder={decoder!r} is unknown; choose one of {', '.join(DECODER_MODES)}.")
    # A string splits at `+` and `,` into presets; a list keeps its parts whole (regexes may hold either).
    parts = split_targets(targets)
    parts += ["decoder.attn"] if decoder == "adapter" else []
    target_modules = resolve_targets(model, parts, blocks)
    if tuner == "oft":
        _refuse_oft(target_modules)
    convolutions = [name for name in target_modules if isinstance(model.get_submodule(name), nn.Conv2d)]
    if convolutions and tuner in LINEAR_ONLY_TUNERS:
        raise ValueError(
            f"strategy={tuner!r} adapts nn.Linear layers only, and targets={targets!r} selects convolutions "
            f"({convolutions[0]}, ...). Use lora, dora, loha, lokr, ia3, boft or hra on them, or target the "
            "decoder (`--targets decoder.attn`)."
        )
    peft_type = PeftType.LORA if tuner in ("lora", "dora") else PeftType[tuner.upper()]
    config_cls = PEFT_TYPE_TO_CONFIG_MAPPING[peft_type]
    fields = {f.name for f in dataclasses.fields(config_cls)}
    unknown = sorted(set(peft_options) - fields)
    if unknown:
        raise TypeError(f"{config_cls.__name__} has no field(s) {unknown}; see the PEFT docs for {tuner!r}.")
    # Map the common options onto whatever each tuner calls them.
    common = {"r": r, "lora_alpha": alpha if alpha is not None else 2 * r, "alpha": alpha if alpha is not None else 2 * r,
              "lora_dropout": dropout, "module_dropout": dropout, "vera_dropout": dropout}
    kwargs = {key: value for key, value in common.items() if key in fields}
    if tuner == "dora":
        kwargs["use_dora"] = True
    if tuner == "ia3":
        # IA3 scales the input of feed-forward layers and the output of the others.
        trunk = model_trunk(model)
        kwargs["feedforward_modules"] = [
            name for name in target_modules
            if (where := trunk.locate(name)) is not None and re.fullmatch(trunk.feed_forward, where[1])
        ]
    kwargs.update(peft_options)
    config = config_cls(
        target_modules=target_modules,
        modules_to_save=["mask_decoder"] if decoder == "full" else None,
        **kwargs,
    )
    return _wrap(model, config, _targeted(model, config))


def _apply_peft_config(model: nn.Module, config: PeftConfig, *, targets: str = "trunk.qkv", blocks=None) -> PeftModel:
    """Apply a user's PEFT config; `targets`/`blocks` fill in `target_modules` only when the config has none."""
    config = dataclasses.replace(config)
    if config.target_modules is None:
        config.target_modules = resolve_targets(model, targets, blocks)
    names = _targeted(model, config)
    trapped = trapped_names(model_trunk(model), names)
    if trapped and config.target_modules != "all-linear":
        raise ValueError(
            f"target_modules={config.target_modules!r} matches the block-level `proj` of stage-change blocks "
            f"({', '.join(trapped)}), not the attention output. Target 'attn.proj' (preset 'trunk.attn') instead."
        )
    return _wrap(model, config, names)


def _targeted(model: nn.Module, config: PeftConfig) -> list[str]:
    names = [name for name, _ in model.named_modules() if name and check_target_module_exists(config, name)]
    if not names:
        trunk = model_trunk(model)
        raise ValueError(
            f"target_modules={config.target_modules!r} matched no module; {trunk.name} layers look like "
            f"'{trunk.example}'. Presets: {', '.join(PRESET_NAMES)}."
        )
    return names


def _wrap(model: nn.Module, config: PeftConfig, names: list[str]) -> PeftModel:
    if config.peft_type == PeftType.OFT:
        _refuse_oft(names)
    # Only plain nn.Linear bases: PEFT's dispatch matches subclasses too, and quantised linears need their own layers.
    lora = isinstance(config, LoraConfig) and not config._custom_modules
    if lora and all(type(model.get_submodule(name)) is nn.Linear for name in names):
        config._register_custom_module({nn.Linear: InPlaceLoraLinear})
    allow_peft(model)
    with warnings.catch_warnings():
        # PEFT 0.21 reads transformers' deprecated `is_gradient_checkpointing` alias while wrapping: a FutureWarning
        # on every run that a user can do nothing about.
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        return get_peft_model(model, config)


def _refuse_oft(names: list[str]) -> None:
    # PEFT's OFT layer unfolds every 4-D input as a conv feature map, and every Linear in SAM2 sees 4-D input:
    # (B, H, W, C) in the Hiera trunk, (B, prompts, tokens, C) in the mask decoder.
    raise ValueError(
        f"OFT cannot adapt SAM2 ({names[0]}, ...): PEFT's OFT treats 4-D activations as images, and every SAM2 "
        "linear layer sees 4-D activations. Use BOFT or HRA, which are orthogonal fine-tuning methods too."
    )


# Summary rows of the video model's memory path; its other `VIDEO_ONLY_PREFIXES` (the object-pointer projections and
# the learnt memory embeddings) are the "object_pointer" row.
_MEMORY_ROWS = {"memory_attention.": "memory_attention", "memory_encoder.": "memory_encoder",
                "mask_downsample.": "memory_encoder"}
_SUMMARY_ORDER = ["trunk.stem", "trunk.blocks", "neck", "prompt_encoder", "mask_decoder", "memory_attention",
                  "memory_encoder", "object_pointer", "adapters", "other"]


def _component(trunk: Trunk, name: str, adapter_prefix: str | None) -> str:
    """Map a parameter name (PEFT prefixes included) to its summary row."""
    name = name.removeprefix("base_model.model.")
    if adapter_prefix and adapter_prefix in name:
        return "adapters"
    if (block := trunk.block_of(name)) is not None:
        return f"trunk.blocks.{block}"
    for prefix, row in (
        ("vision_encoder.backbone.", "trunk.stem"),
        ("vision_encoder.neck.", "neck"),
        ("prompt_encoder.", "prompt_encoder"),
        ("mask_decoder.", "mask_decoder"),
    ):
        if name.startswith(prefix):
            return row
    if name.startswith(VIDEO_ONLY_PREFIXES):
        return next((row for prefix, row in _MEMORY_ROWS.items() if name.startswith(prefix)), "object_pointer")
    return "other"


class TrainableSummary(dict):
    """Trainable and total parameter counts per component: a dict that prints as a table.

    Keys are components (`trunk.stem`, `trunk.blocks.<i>`, `neck`, `prompt_encoder`, `mask_decoder`; on a
    `Sam2VideoModel` `memory_attention`, `memory_encoder` (with the mask downsampler) and `object_pointer` (the
    object-pointer projections and the learnt memory embeddings); `adapters`, `other`), each
    `{"trainable": int, "total": int}`, plus `"all"` with the totals.
    """

    def __str__(self) -> str:
        width = max(len(key) for key in self)
        lines = [f"{'component':<{width}}  {'trainable':>12}  {'total':>12}  {'%':>6}"]
        for key, row in self.items():
            share = 100 * row["trainable"] / row["total"] if row["total"] else 0.0
            if key == "all":
                lines.append("-" * len(lines[0]))
            lines.append(f"{key:<{width}}  {row['trainable']:>12,}  {row['total']:>12,}  {share:>6.2f}")
        return "\n".join(lines)


def trainable_summary(model: nn.Module) -> TrainableSummary:
    """Count trainable and total parameters per component, adapters included.

    The totals equal PEFT's `get_nb_trainable_parameters()` on a `PeftModel` (copies made by `modules_to_save`
    count under their component, as PEFT counts them).

    Example:
        >>> print(trainable_summary(apply_strategy(load_sam2("tiny-random"), "decoder")))
    """
    adapter_prefix = getattr(model.base_model, "prefix", None) if isinstance(model, PeftModel) else None
    trunk = model_trunk(model)
    rows: dict[str, dict[str, int]] = {}
    for name, param in model.named_parameters():
        row = rows.setdefault(_component(trunk, name, adapter_prefix), {"trainable": 0, "total": 0})
        row["total"] += param.numel()
        row["trainable"] += param.numel() if param.requires_grad else 0

    def order(key: str) -> tuple:
        blocks = re.fullmatch(r"trunk\.blocks\.(\d+)", key)
        if blocks:
            return _SUMMARY_ORDER.index("trunk.blocks"), int(blocks.group(1))
        return _SUMMARY_ORDER.index(key), 0

    summary = TrainableSummary((key, rows[key]) for key in sorted(rows, key=order))
    summary["all"] = {
        "trainable": sum(row["trainable"] for row in rows.values()),
        "total": sum(row["total"] for row in rows.values()),
    }
    return summary
