"""Fixtures for adapter tests: a wider SAM2 that no tiny adapter fits."""

import pytest
import torch
from transformers import Sam2Model

from sam2_peft.presets import tiny_random_config


@pytest.fixture
def wide_model():
    """A SAM2 with a wider Hiera trunk (32 channels in stage 1 instead of 24): same module names, other shapes."""
    config = tiny_random_config()
    backbone = config.vision_config.backbone_config
    backbone.hidden_size = 32
    backbone.embed_dim_per_stage = [32, 64, 128, 256]
    config.vision_config.backbone_channel_list = [256, 128, 64, 32]
    torch.manual_seed(1)
    return Sam2Model(config).eval()
