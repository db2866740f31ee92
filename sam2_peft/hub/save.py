"""Save a trained model as an adapter folder with a model card, and push that folder to the Hub.

    save_adapter(model, "runs/lora/final", base_model_name_or_path="facebook/sam2.1-hiera-tiny", strategy="lora",
                 metrics={"dice": 0.91}, datasets=["user/ct-organs"])
    push_adapter("runs/lora/final", "user/sam2-lora-ct", private=True)
"""

from __future__ import annotations

import os
from pathlib import Path

from huggingface_hub import EvalResult, ModelCard, ModelCardData
from peft import PeftModel, PeftType
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import save_file
from torch import nn

from sam2_peft.data.config import DataConfig
from sam2_peft.hub.files import (
    MODEL_CARD,
    PEFT_CONFIG,
    PEFT_WEIGHTS,
    SAM2_PEFT_JSON,
    TRAINED_TENSORS,
    adapter_files,
    atomic_folder,
    header_shapes,
    image_fingerprint,
    is_hub_id,
    portable_base_name,
    read_json,
    touches_memory,
    write_sam2_peft_json,
)
from sam2_peft.hub.files import (
    base_fingerprint as fingerprint_of,
)
from sam2_peft.hub.preprocessing import write_preprocessing
from sam2_peft.segmenter import base_sam2
from sam2_peft.targets import is_video_model

_CARD_TEMPLATE = """---
{{ card_data }}
---

# {{ title }}

A **{{ strategy }}** adapter for SAM2, trained with [sam2-peft](https://github.com/sam2-peft/sam2-peft).
Base model: `{{ base_model_name_or_path }}` (fingerprint `{{ fingerprint }}`).

## Use
{{ usage }}
{% if metrics %}
## Validation metrics

| metric | value |
|---|---|
{% for key, value in metrics.items() %}| {{ key }} | {{ value }} |
{% endfor %}{% endif %}
"""

_PEFT_USAGE = """```python
from peft import PeftModel, PeftType
from peft.tuners.tuners_utils import BaseTunerLayer
from transformers import {model_class}

model = PeftModel.from_pretrained({model_class}.from_pretrained("{base}"{options}), "{repo}")
```"""
# PEFT (0.21) asks a model with tied-weight keys for its input embeddings, which EdgeTamModel cannot give.
_LOAD_OPTIONS = {"EdgeTamModel": ", tie_word_embeddings=False"}
_SAM2_PEFT_OPTIONS = {"Sam2VideoModel": ", video=True"}

_TENSORS_USAGE = """```python
from sam2_peft import load_sam2
from sam2_peft.hub import load_adapter

model = load_adapter(load_sam2("{base}"{options}), "{repo}")
```"""


def save_adapter(
    model: nn.Module,
    output_dir: str | os.PathLike,
    *,
    base_model_name_or_path: str | None = None,
    strategy: str,
    revision: str | None = None,
    metrics: dict[str, float] | None = None,
    datasets: list[str] | None = None,
    trained_only: bool = True,
    base_fingerprint: str | None = None,
    data: DataConfig | None = None,
) -> Path:
    """Save what a strategy trained, with `sam2_peft.json` and a model card, replacing `output_dir` atomically.

    A `PeftModel` gives a standard PEFT folder (`adapter_config.json`, `adapter_model.safetensors`) of its active
    adapter, which plain `PeftModel.from_pretrained(Sam2Model.from_pretrained(base), folder)` loads. A plain
    `Sam2Model` gives `trained_tensors.safetensors`: the parameters with `requires_grad=True`, keyed as in
    `Sam2Model.state_dict()`. From a `Sam2VideoModel`, `sam2_peft.json` also records whether the adapter changed the
    memory path (`requires_video_model`: then it loads onto the video model only) and the fingerprint of the image
    model inside it, so that the others load onto `Sam2Model` without an "other base" warning.

    Args:
        model: a `PeftModel` around a `Sam2Model`, or a `Sam2Model` after a non-PEFT strategy.
        output_dir: the adapter folder to (re)create, e.g. `DIR/final`.
        base_model_name_or_path: the base's Hub id. Local paths, presets and `None` are replaced by the base's
            fingerprint (`sam2-<hex>`), since they mean nothing on another machine.
        strategy: the strategy name recorded in `sam2_peft.json` and the card (`lora`, `decoder`, ...).
        revision: the base's Hub revision, if pinned.
        metrics: validation metrics of the run, for the card (e.g. `{"dice": 0.91, "iou": 0.84}`).
        datasets: Hub dataset ids (or names) the adapter was trained on, for the card.
        trained_only: for plain models, save only the trainable parameters (False: every weight).
        base_fingerprint: `model_fingerprint` of the base taken before training (the training loop passes it).
            Default: computed from `model`; for trained tensors, from its frozen weights only, since the trained
            ones have changed. `load_adapter` accepts either form.
        data: the data configuration the model was trained with: written as `preprocessor_config.json`
            (`Sam2ImageProcessor`'s file plus the intensity, CT window and mask settings), which eval, predict and
            the demo then apply. Without it the folder has no record, and loaders use their flags or the defaults.

    Returns:
        The adapter folder.

    Example:
        >>> save_adapter(peft_model, "runs/lora/final", base_model_name_or_path="facebook/sam2.1-hiera-tiny",
        ...              strategy="lora")
    """
    peft = isinstance(model, PeftModel)
    tensors = None if peft else _tensors_to_save(model, trained_only)
    fingerprint = base_fingerprint or fingerprint_of(model, exclude=() if peft else tensors)
    base_name = portable_base_name(base_model_name_or_path, fingerprint)
    with atomic_folder(output_dir) as tmp:
        if peft:
            _save_peft(model, tmp, base_name, revision)
        else:
            # safetensors refuses shared storage: give each tensor its own contiguous copy.
            save_file({key: t.detach().cpu().contiguous().clone() for key, t in tensors.items()},
                      tmp / TRAINED_TENSORS, metadata={"format": "pt"})
        if data is not None:
            write_preprocessing(tmp, model, data)
        video = _video_record(model, tmp, tensors) if is_video_model(model) else None
        write_sam2_peft_json(tmp, base_model_name_or_path=base_name, fingerprint=fingerprint, strategy=strategy,
                             revision=revision, adapted_shapes=adapted_shapes(model) if peft else None, video=video)
        card = build_model_card(base_model_name_or_path=base_name, fingerprint=fingerprint, strategy=strategy,
                                model_class=type(base_sam2(model)).__name__,
                                peft_type=_peft_type(model), metrics=metrics, datasets=datasets,
                                repo_id=Path(output_dir).name)
        card.save(tmp / MODEL_CARD)
    return Path(output_dir)


def adapted_shapes(model: PeftModel) -> dict[str, list[int]]:
    """Return the weight shape of every module the active adapter adapts, keyed by its name in the base.

    `save_adapter` records this as `adapted_shapes` in `sam2_peft.json`, and `check_compatible` compares it with the
    model an adapter is loaded onto: some tuners' tensors (FourierFT's spectrum) have the same shapes on any base.

    Example:
        >>> shapes = adapted_shapes(apply_strategy(load_sam2("tiny-random"), "fourierft"))
        >>> shapes["vision_encoder.backbone.blocks.0.attn.qkv"]
        [72, 24]
    """
    active = model.active_adapter
    shapes = {}
    for name, module in base_sam2(model).named_modules():
        if isinstance(module, BaseTunerLayer) and active in module.active_adapters:
            weight = getattr(module.get_base_layer(), "weight", None)
            if weight is not None:
                shapes[name] = list(weight.shape)
    return shapes


def _video_record(model: nn.Module, folder: Path, tensors: dict | None) -> dict:
    """What a video model's adapter records: its class, the image model's fingerprint, whether it needs video."""
    keys = tensors if tensors is not None else header_shapes(folder / PEFT_WEIGHTS)
    return {
        "base_model_class": type(base_sam2(model)).__name__,
        "image_fingerprint": image_fingerprint(model, exclude=tensors or ()),
        "requires_video_model": bool(touches_memory(keys)),
    }


def _peft_type(model: nn.Module) -> str | None:
    if not isinstance(model, PeftModel):
        return None
    return str(model.peft_config[model.active_adapter].peft_type.value).lower()


def _save_peft(model: PeftModel, folder: Path, base_name: str, revision: str | None) -> None:
    name = model.active_adapter
    config = model.peft_config[name]
    previous = (config.base_model_name_or_path, config.revision, config.target_modules)
    config.base_model_name_or_path, config.revision = base_name, revision
    if isinstance(config.target_modules, (list, set)) and config.peft_type != PeftType.IA3:
        # PEFT condenses 20 or more target names into suffixes that single them out in this model only (`q_proj`
        # for the decoder's attention), which on the video model match the memory attention too: save the exact
        # names. (IA3's are never condensed, and its feedforward_modules must stay a subset of them.)
        config.target_modules = sorted(
            module_name for module_name, module in base_sam2(model).named_modules()
            if isinstance(module, BaseTunerLayer) and name in module.active_adapters
        )
    try:
        # save_embedding_layers=False: SAM2 has no vocabulary to check, and the check would query the Hub.
        model.save_pretrained(folder, selected_adapters=[name], safe_serialization=True, save_embedding_layers=False)
    finally:
        config.base_model_name_or_path, config.revision, config.target_modules = previous
    if name != "default":
        # PEFT saves every adapter but "default" into a subfolder of its name; an adapter folder holds one.
        for file in (folder / name).iterdir():
            file.rename(folder / file.name)
        (folder / name).rmdir()


def _tensors_to_save(model: nn.Module, trained_only: bool) -> dict:
    sam = base_sam2(model)
    if not trained_only:
        return sam.state_dict()
    tensors = {key: p for key, p in sam.named_parameters() if p.requires_grad}
    if not tensors:
        raise ValueError(
            "No parameter has requires_grad=True, so there is nothing trained to save. Apply a strategy first "
            "(`apply_strategy(model, 'decoder')`) or pass `trained_only=False` to save every weight."
        )
    return tensors


def build_model_card(
    *,
    base_model_name_or_path: str,
    fingerprint: str,
    strategy: str,
    peft_type: str | None = None,
    metrics: dict[str, float] | None = None,
    datasets: list[str] | None = None,
    repo_id: str = "sam2-adapter",
    model_class: str = "Sam2Model",
) -> ModelCard:
    """Build the adapter's model card: YAML metadata the Hub indexes, a usage snippet and the run's metrics.

    Args:
        base_model_name_or_path: the base's Hub id or fingerprint; only a Hub id goes into `base_model`.
        fingerprint: the base fingerprint, shown in the text.
        strategy: the training strategy, also a tag.
        peft_type: the PEFT tuner (`lora`, ...) for PEFT adapters, None otherwise.
        metrics: validation metrics (name -> number).
        datasets: training dataset ids or names.
        repo_id: the repository or folder name, used in the title and the usage snippet.
        model_class: the transformers class of the base (`Sam2Model`, `Sam3TrackerModel`, `EdgeTamModel`).
    """
    tags = ["sam2", "sam2-peft", "image-segmentation", strategy]
    tags += ["peft", peft_type] if peft_type else []
    hub_base = is_hub_id(base_model_name_or_path)
    dataset = datasets[0] if datasets else "validation"
    data = ModelCardData(
        base_model=base_model_name_or_path if hub_base else None,
        library_name="peft" if peft_type else "sam2-peft",
        pipeline_tag="mask-generation",
        tags=list(dict.fromkeys(tags)),
        datasets=list(datasets) if datasets else None,
        strategy=strategy,
        base_model_class=model_class,
        # `model-index` is where the Hub reads results from; `metrics` there would mean metric ids.
        model_name=repo_id if metrics else None,
        eval_results=[
            EvalResult(task_type="image-segmentation", dataset_type=dataset, dataset_name=dataset,
                       metric_type=key, metric_value=float(value))
            for key, value in metrics.items()
        ] if metrics else None,
    )
    usage = (_PEFT_USAGE if peft_type else _TENSORS_USAGE).format(
        base=base_model_name_or_path if hub_base else "<the base model>", repo=repo_id, model_class=model_class,
        options=(_LOAD_OPTIONS if peft_type else _SAM2_PEFT_OPTIONS).get(model_class, ""),
    )
    return ModelCard.from_template(
        data,
        template_str=_CARD_TEMPLATE,
        title=f"{repo_id}: SAM2 {strategy} adapter",
        strategy=strategy,
        base_model_name_or_path=base_model_name_or_path,
        fingerprint=fingerprint,
        usage=usage,
        metrics=metrics or {},
    )


def push_adapter(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    include_checkpoints: bool = False,
    token: str | None = None,
):
    """Upload an adapter folder to a Hub model repository, creating the repository (and branch) when needed.

    Only the adapter's own files (`ADAPTER_FILES`) are sent; `checkpoints/` (optimiser state, pickles) is sent
    only with `include_checkpoints=True`. A model card as `save_adapter` wrote it is rebuilt for `repo_id` (title and
    usage snippet name the repository, not the local folder), keeping its metrics and datasets; a card edited by
    hand is sent as it is. Everything lands in one commit.

    Args:
        folder: an adapter folder written by `save_adapter`.
        repo_id: `user/name` or `org/name`.
        private: create the repository private (an existing repository keeps its visibility).
        revision: the branch to commit to; created from `main` if missing.
        commit_message: defaults to "Upload SAM2 adapter".
        include_checkpoints: also upload `folder/checkpoints/`.
        token: a Hub token; defaults to the logged-in one.

    Returns:
        huggingface_hub's `CommitInfo` (`.commit_url`, `.oid`).

    Example:
        >>> info = push_adapter("runs/lora/final", "me/sam2-lora-ct", private=True)
        >>> info.commit_url
    """
    from huggingface_hub import CommitOperationAdd, HfApi

    path = Path(folder)
    if not path.is_dir():
        raise FileNotFoundError(f"Adapter folder {str(path)!r} does not exist; save one with `save_adapter` first.")
    names = adapter_files([p.name for p in path.iterdir() if p.is_file()], f"Adapter folder {str(path)!r}")
    card = _card_for_repo(path, repo_id)
    files = [name for name in names if card is None or name != MODEL_CARD]
    if include_checkpoints:
        files += sorted(p.relative_to(path).as_posix() for p in (path / "checkpoints").rglob("*") if p.is_file())
    operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(path / name)) for name in files]
    if card is not None:
        operations.append(CommitOperationAdd(path_in_repo=MODEL_CARD, path_or_fileobj=str(card).encode()))
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    if revision is not None:
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    return api.create_commit(
        repo_id, operations, commit_message=commit_message or "Upload SAM2 adapter", revision=revision
    )


def _card_for_repo(folder: Path, repo_id: str) -> ModelCard | None:
    """The folder's generated model card rebuilt for `repo_id`; None keeps the folder's card as it is (edited by
    hand, or not made by `save_adapter`)."""
    record = read_json(folder, SAM2_PEFT_JSON)
    if record is None:
        return None
    text = (folder / MODEL_CARD).read_text() if (folder / MODEL_CARD).is_file() else None
    saved = ModelCard(text).data if text is not None else ModelCardData()
    peft_config = read_json(folder, PEFT_CONFIG)
    fields = dict(
        base_model_name_or_path=record["base_model_name_or_path"],
        fingerprint=record["base_fingerprint"],
        strategy=record["strategy"],
        peft_type=str(peft_config["peft_type"]).lower() if peft_config else None,
        metrics={result.metric_type: result.metric_value for result in saved.eval_results or []},
        datasets=saved.datasets,
        model_class=_card_model_class(saved),
    )
    if text is not None and text != str(build_model_card(**fields, repo_id=folder.name)):
        return None
    return build_model_card(**fields, repo_id=repo_id)


def _card_model_class(data: ModelCardData) -> str:
    """The base class a card was made for (its `base_model_class` field; cards from before it: Sam2Model)."""
    return data.to_dict().get("base_model_class") or "Sam2Model"


__all__ = ["build_model_card", "push_adapter", "save_adapter"]
