"""What an adapter folder may hold, how it is written, and where it comes from.

    with atomic_folder("runs/lora/final") as tmp:      # a half-written folder never replaces a good one
        model.save_pretrained(tmp)
    folder = resolve_adapter("user/sam2-lora-ct", revision="v1")   # Hub id, local folder or HF cache (offline)
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import uuid
from collections.abc import Iterable, Iterator
from importlib import metadata
from pathlib import Path, PurePosixPath
from types import SimpleNamespace

import torch
from safetensors import safe_open
from torch import nn
from transformers import Sam2Config

from sam2_peft.errors import UserError
from sam2_peft.family import VIDEO_ONLY_PREFIXES
from sam2_peft.models import ModelLoadError, model_fingerprint
from sam2_peft.segmenter import base_sam2
from sam2_peft.targets import is_video_model

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
TRAINED_TENSORS = "trained_tensors.safetensors"
SAM2_PEFT_JSON = "sam2_peft.json"
MODEL_CARD = "README.md"
METRICS = "metrics.json"
PREPROCESSOR_CONFIG = "preprocessor_config.json"
# The only files an adapter is made of: we write, push, download and read nothing else.
ADAPTER_FILES = (PEFT_CONFIG, PEFT_WEIGHTS, TRAINED_TENSORS, SAM2_PEFT_JSON, MODEL_CARD, METRICS, PREPROCESSOR_CONFIG)
# Weight formats that unpickle (and so can run code) when loaded.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
_HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")
# PEFT's state-dict keys start with this; the rest is the module path inside the family model.
PEFT_PREFIX = "base_model.model."


class AdapterFileError(UserError, ValueError):
    """Raised when an adapter folder or repository is missing files or holds files we refuse to read."""


@contextlib.contextmanager
def atomic_folder(path: str | os.PathLike) -> Iterator[Path]:
    """Write a folder so that readers see either the previous folder or the complete new one.

    Yields a temporary sibling folder to write into. On success the previous `path` (if any) is moved aside, the
    temporary folder renamed to `path` and the old one deleted; on an exception the temporary folder is deleted and
    `path` is left as it was. Renames stay on one file system because the temporary folder is a sibling.

    Args:
        path: the folder to (re)create, e.g. `DIR/final`.

    Example:
        >>> with atomic_folder(tmp_path / "final") as tmp:
        ...     (tmp / "sam2_peft.json").write_text("{}")
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    token = uuid.uuid4().hex[:8]
    staging = target.parent / f".{target.name}.tmp-{token}"
    staging.mkdir()
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    previous = target.parent / f".{target.name}.old-{token}"
    if target.exists():
        target.rename(previous)
    staging.rename(target)
    shutil.rmtree(previous, ignore_errors=True)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Write a file so that readers see either the previous file or the complete new one.

    Yields a temporary sibling path (unique to this process) to write; on success it replaces `path` with
    `os.replace`, on an exception it is deleted and `path` is left as it was.

    Example:
        >>> with atomic_file(tmp_path / "metrics.json") as tmp:
        ...     tmp.write_text("{}")
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        yield staging
    except BaseException:
        staging.unlink(missing_ok=True)
        raise
    os.replace(staging, target)


def check_file_name(name: str) -> None:
    """Refuse a file name that could escape an adapter folder: `..` parts, absolute paths, backslashes.

    Args:
        name: a path relative to the folder or repository root, `/`-separated.
    """
    if "\\" in name or name.startswith("/") or re.match(r"[A-Za-z]:", name) or ".." in PurePosixPath(name).parts:
        raise AdapterFileError(
            f"Refusing file name {name!r}: adapter files must be plain relative names (no '..', no absolute path, "
            "no backslash)."
        )


def adapter_files(names: Iterable[str], where: str) -> list[str]:
    """Validate the file names of an adapter folder or repository and return the ones an adapter is made of.

    Args:
        names: every file name in the folder or repository (relative, `/`-separated).
        where: the folder or repository, for error messages.

    Returns:
        The names in `ADAPTER_FILES` that are present, sorted.

    Raises:
        AdapterFileError: a name could escape the folder, there are no safetensors weights, or both PEFT and
            trained-tensor weights are present.
    """
    names = list(names)
    for name in names:
        check_file_name(name)
    present = sorted(set(names) & set(ADAPTER_FILES))
    weights = [name for name in present if name.endswith(".safetensors")]
    if not weights:
        pickled = [name for name in names if name.endswith(PICKLE_SUFFIXES)]
        found = f"; it has {', '.join(pickled)}, which are pickled and can run code when loaded" if pickled else ""
        raise AdapterFileError(
            f"{where} has no {PEFT_WEIGHTS} or {TRAINED_TENSORS}{found}. sam2-peft only reads safetensors weights: "
            "save the adapter again with `save_adapter` (or `save_pretrained(..., safe_serialization=True)`)."
        )
    if len(weights) > 1:
        raise AdapterFileError(f"{where} holds both {PEFT_WEIGHTS} and {TRAINED_TENSORS}; keep the one you trained.")
    if PEFT_WEIGHTS in present and PEFT_CONFIG not in present:
        raise AdapterFileError(f"{where} has {PEFT_WEIGHTS} but no {PEFT_CONFIG}.")
    return present


def is_hub_id(name: str) -> bool:
    """Tell whether `name` looks like a Hub repository id (`owner/name`) rather than a local path."""
    return bool(_HUB_ID.fullmatch(name)) and not Path(name).exists()


def resolve_adapter(adapter: str | os.PathLike, revision: str | None = None) -> Path:
    """Return a local folder holding the adapter's files, downloading only `ADAPTER_FILES` from the Hub.

    Args:
        adapter: a local folder, or a Hub id (`user/name`). With `HF_HUB_OFFLINE=1`, Hub ids resolve from the HF
            cache.
        revision: Hub branch, tag or commit; ignored for local folders.

    Raises:
        AdapterFileError: the folder or repository is not a usable adapter (see `adapter_files`).
    """
    path = Path(adapter)
    if path.is_dir():
        names = [p.relative_to(path).as_posix() for p in path.iterdir() if p.is_file()]
        adapter_files(names, f"Adapter folder {str(path)!r}")
        return path
    if not is_hub_id(str(adapter)):
        raise AdapterFileError(
            f"Adapter {str(adapter)!r} is neither a local folder nor a Hub id of the form 'user/name'."
        )
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        # allow_patterns are exact names: pickled weights and anything else in the repository never download.
        folder = Path(snapshot_download(str(adapter), revision=revision, allow_patterns=list(ADAPTER_FILES)))
    except LocalEntryNotFoundError as err:
        raise AdapterFileError(
            f"Adapter {str(adapter)!r} (revision={revision!r}) is not in the HF cache and the Hub is unreachable or "
            "offline. Download it once with `huggingface-cli download` or pass a local folder."
        ) from err
    names = [p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()]
    adapter_files(names, f"Hub repository {str(adapter)!r} (revision={revision!r})")
    return folder


def base_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Return the plain `Sam2Model.state_dict()` under any PEFT adapters, keyed as without them.

    PEFT renames base weights (`qkv.weight` -> `qkv.base_layer.weight`, `mask_decoder.x` ->
    `mask_decoder.original_module.x`) and adds adapter weights; both are undone here. No tensor is copied.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    sam = base_sam2(model)
    adapter_parts = {"modules_to_save"}
    for module in sam.modules():
        if isinstance(module, BaseTunerLayer):
            # `other_param_names` holds shared adapter tensors too (VeRA's vera_A/vera_B), not base weights.
            adapter_parts.update(module.adapter_layer_names, module.other_param_names)
    state = {}
    for key, tensor in sam.state_dict().items():
        parts = key.split(".")
        if adapter_parts.isdisjoint(parts):
            state[".".join(p for p in parts if p not in ("base_layer", "original_module"))] = tensor
    return state


def base_fingerprint(model: nn.Module, exclude: Iterable[str] = ()) -> str:
    """Return `model_fingerprint` of the plain base under any PEFT adapters, so saved and loaded bases compare equal.

    Args:
        model: a `Sam2Model` or a `PeftModel` around one.
        exclude: state-dict keys to leave out, e.g. the tensors a non-PEFT strategy trained: what remains is the
            frozen part that a trained-tensors folder needs to match.
    """
    skip = set(exclude)
    state = {key: value for key, value in base_state_dict(model).items() if key not in skip}
    # model_fingerprint reads only `.config` and `.state_dict()`: hand it the de-PEFT-ed view.
    return model_fingerprint(SimpleNamespace(config=base_sam2(model).config, state_dict=lambda: state))


def image_fingerprint(model: nn.Module, exclude: Iterable[str] = ()) -> str:
    """Return `base_fingerprint` of the image model inside `model`, so that adapters compare across image and video.

    For a `Sam2VideoModel` that is the `Sam2Model` it holds: its image configuration and every weight outside the
    memory path (`VIDEO_ONLY_PREFIXES`), which equals `load_sam2(name)`'s fingerprint when `load_sam2(name,
    video=True)` gave the model. For an image model it is `base_fingerprint` itself.

    Args:
        model: a family model or a `PeftModel` around one.
        exclude: state-dict keys to leave out, as in `base_fingerprint`.
    """
    if not is_video_model(model):
        return base_fingerprint(model, exclude)
    skip = set(exclude)
    state = {key: value for key, value in base_state_dict(model).items()
             if key not in skip and not key.startswith(VIDEO_ONLY_PREFIXES)}
    video = base_sam2(model).config
    # The image parts' configurations without their video `model_type`s (`sam2_video_mask_decoder`, ...).
    parts = {name: {key: value for key, value in getattr(video, name).to_dict().items() if key != "model_type"}
             for name in ("vision_config", "prompt_encoder_config", "mask_decoder_config")}
    config = Sam2Config(**parts, initializer_range=video.initializer_range)
    return model_fingerprint(SimpleNamespace(config=config, state_dict=lambda: state))


def touches_memory(keys: Iterable[str]) -> list[str]:
    """The keys among `keys` (plain or PEFT state-dict keys) that belong to the video model's memory path."""
    return [key for key in keys if key.removeprefix(PEFT_PREFIX).startswith(VIDEO_ONLY_PREFIXES)]


def portable_base_name(name: str | None, fingerprint: str) -> str:
    """Return `name` when it is a Hub id, else the base fingerprint (local paths and presets do not travel)."""
    return name if name and is_hub_id(name) else fingerprint


def write_sam2_peft_json(folder: Path, *, base_model_name_or_path: str, fingerprint: str, strategy: str,
                         revision: str | None, adapted_shapes: dict[str, list[int]] | None = None,
                         video: dict | None = None) -> None:
    """Write the small compatibility record that `load_adapter` checks before touching any weight.

    `adapted_shapes` (a PEFT adapter's adapted modules and their weight shapes) lets the check refuse another base
    even for tuners whose tensors do not depend on the base's shapes (FourierFT). `video`, for adapters saved from a
    `Sam2VideoModel`, adds `base_model_class`, `image_fingerprint` (the image model inside the base) and
    `requires_video_model` (whether the adapter changes the memory path, and so loads onto the video model only).
    """
    record = {
        "base_model_name_or_path": base_model_name_or_path,
        "base_fingerprint": fingerprint,
        "strategy": strategy,
        "revision": revision,
        "sam2_peft_version": metadata.version("sam2-peft"),
    }
    if adapted_shapes:
        record["adapted_shapes"] = adapted_shapes
    record.update(video or {})
    (folder / SAM2_PEFT_JSON).write_text(json.dumps(record, indent=2) + "\n")


def header_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """The key -> shape table of a safetensors file, from its JSON header alone (no tensor data, no code)."""
    with safe_open(path, framework="pt") as file:
        return {key: tuple(file.get_slice(key).get_shape()) for key in file.keys()}


def requires_video_model(adapter: str | os.PathLike, revision: str | None = None) -> bool:
    """Whether an adapter changes the video model's memory path, and so loads onto `Sam2VideoModel` only.

    True when its `sam2_peft.json` says so (`requires_video_model`) or its weights file holds memory-path tensors
    (an adapter saved by plain PEFT); reads the file's header only.

    Example:
        >>> base = load_sam2("tiny-random", video=requires_video_model("runs/memory/final"))
    """
    folder = resolve_adapter(adapter, revision)
    record = read_json(folder, SAM2_PEFT_JSON) or {}
    weights = folder / (PEFT_WEIGHTS if (folder / PEFT_WEIGHTS).is_file() else TRAINED_TENSORS)
    return bool(record.get("requires_video_model")) or bool(touches_memory(header_shapes(weights)))


def recorded_base(folder: Path, where: str) -> tuple[str, str | None]:
    """The base (and its revision) an adapter folder records, when it can be loaded by that name.

    Raises:
        ModelLoadError: the adapter names its base only by fingerprint, or not at all.
    """
    record = read_json(folder, SAM2_PEFT_JSON) or read_json(folder, PEFT_CONFIG) or {}
    name = record.get("base_model_name_or_path")
    if not name or not (is_hub_id(name) or Path(name).is_dir()):
        raise ModelLoadError(
            f"{where} names its base only as {name or 'nothing'} (a fingerprint: it was trained on a preset, a local "
            "folder or an official checkpoint, whose names do not travel). Pass the base: "
            "`load_adapted('<model>', adapter)` (`--model` on the command line)."
        )
    return name, record.get("revision")


def read_json(folder: Path, name: str, error: type[Exception] = AdapterFileError) -> dict | None:
    """Read `folder/name` as a JSON object, or return None when it is absent; raise `error` when it is not one."""
    path = folder / name
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise error(f"{path} is not valid JSON ({err}); save the adapter again.") from err
    if not isinstance(record, dict):
        raise error(f"{path} must hold a JSON object, got {type(record).__name__}.")
    return record
