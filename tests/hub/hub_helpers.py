"""Helpers for adapter tests: PEFT models built directly on the tiny random SAM2, state snapshots."""

import torch
from peft import LoraConfig, get_peft_model

from sam2_peft.models import load_sam2

QKV = r"vision_encoder\.backbone\.blocks\.\d+\.attn\.qkv"


def lora_model(seed: int = 0, r: int = 4, **options):
    """A PeftModel with visible (non-zero) LoRA weights on every Hiera `attn.qkv`; `seed` picks the weights."""
    torch.manual_seed(seed)
    return get_peft_model(load_sam2("tiny-random"), LoraConfig(target_modules=QKV, r=r, init_lora_weights=False,
                                                               **options))


def clone_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {key: value.detach().clone() for key, value in model.state_dict().items()}


def assert_state_equal(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    current = model.state_dict()
    assert current.keys() == state.keys()
    for key, value in state.items():
        torch.testing.assert_close(current[key], value, rtol=0, atol=0, msg=key)
