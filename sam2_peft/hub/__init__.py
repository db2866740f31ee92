"""Adapters as a product: save, push, load (Hub, local, offline cache), domain sets, and safe file handling.

    from sam2_peft.hub import save_adapter, push_adapter, load_adapter, DomainAdapters, predict
    save_adapter(model, "runs/lora/final", base_model_name_or_path="facebook/sam2.1-hiera-tiny", strategy="lora")
    push_adapter("runs/lora/final", "me/sam2-lora-ct", private=True)
    model = load_adapter(load_sam2("facebook/sam2.1-hiera-tiny"), "me/sam2-lora-ct", revision="main")
    model = load_adapted("facebook/sam2.1-hiera-tiny", "runs/video/final")   # the base (image or video) it needs

On disk (fixed formats): PEFT strategies write a standard PEFT folder (`adapter_config.json`,
`adapter_model.safetensors`, `README.md`); decoder/partial/full write `trained_tensors.safetensors`; both add
`sam2_peft.json`, the compatibility record `load_adapter` checks before touching any weight, and training outputs
`preprocessor_config.json`, the preprocessing the adapter was trained with (`sam2_peft.hub.preprocessing`).
"""

from sam2_peft.hub.domains import DomainAdapters, predict
from sam2_peft.hub.files import (
    ADAPTER_FILES,
    AdapterFileError,
    adapter_files,
    atomic_file,
    atomic_folder,
    base_fingerprint,
    check_file_name,
    image_fingerprint,
    resolve_adapter,
)
from sam2_peft.hub.load import AdapterMismatchError, check_compatible, load_adapted, load_adapter, requires_video_model
from sam2_peft.hub.preprocessing import (
    AdapterPreprocessing,
    PreprocessingError,
    adapter_preprocessing,
    read_preprocessing,
    resolve_data_config,
    write_preprocessing,
)
from sam2_peft.hub.save import build_model_card, push_adapter, save_adapter

__all__ = [
    "ADAPTER_FILES",
    "AdapterFileError",
    "AdapterMismatchError",
    "AdapterPreprocessing",
    "DomainAdapters",
    "PreprocessingError",
    "adapter_files",
    "adapter_preprocessing",
    "atomic_file",
    "atomic_folder",
    "base_fingerprint",
    "build_model_card",
    "check_compatible",
    "check_file_name",
    "image_fingerprint",
    "load_adapted",
    "load_adapter",
    "predict",
    "push_adapter",
    "read_preprocessing",
    "requires_video_model",
    "resolve_adapter",
    "resolve_data_config",
    "save_adapter",
    "write_preprocessing",
]
