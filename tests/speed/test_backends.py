"""The boundary: `select_backend`, the version guard, and every backend against `reference` on the training forward."""

import pytest
import torch

from sam2_peft.errors import ConfigError
from sam2_peft.family import encode_from_prefix, encode_prefix
from sam2_peft.memory import enable_gradient_checkpointing, hiera_blocks
from sam2_peft.models import load_sam2
from sam2_peft.segmenter import Sam2Segmenter, combine_prompts
from sam2_peft.speed import Backend, CpuBackend, CudaBackend, select_backend, versions
from sam2_peft.speed.fused_lora import InPlaceLoraLinear
from sam2_peft.speed.strips import checkpoint_whole
from sam2_peft.strategies import apply_strategy
from speed_helpers import assert_same, training_forward


def test_auto_is_cpu_on_cpu_and_names_are_checked():
    assert type(select_backend("auto", torch.device("cpu"))) is CpuBackend
    assert type(select_backend("auto", None)) is CpuBackend
    assert type(select_backend("reference", "cpu")) is Backend
    backend = CudaBackend(compiler="aot_eager")
    assert select_backend(backend, "cpu") is backend
    with pytest.raises(ConfigError, match=r"--backend 'gpu' is unknown; choose from auto, reference, cpu, cuda"):
        select_backend("gpu", "cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message where CUDA is missing")
def test_cuda_without_cuda_says_so_and_names_the_flag():
    with pytest.raises(ConfigError, match=r"--backend cuda: the GPU path needs CUDA, and this machine has none"):
        select_backend("cuda", "cpu")
    with pytest.raises(ConfigError, match="--backend cuda"):
        Sam2Segmenter(load_sam2("tiny-random"), backend="cuda")


def test_untested_transformers_refuses_the_fast_paths_and_auto_falls_back(monkeypatch):
    assert versions.transformers_supported()  # the suite runs on a tested version
    monkeypatch.setattr(versions, "installed_transformers", lambda: "5.26.0")
    monkeypatch.setattr("sam2_peft.speed.backends.installed_transformers", lambda: "5.26.0")
    monkeypatch.setattr("sam2_peft.speed.backends.transformers_supported", lambda: False)
    for name in ("cpu", "cuda") if torch.cuda.is_available() else ("cpu",):
        with pytest.raises(ConfigError, match=rf"--backend {name}: .* tested on transformers>=5.25,<5.26, and "
                                              r"transformers 5.26.0 is installed.*--backend reference"):
            select_backend(name, "cpu")
    with pytest.warns(UserWarning, match=r"transformers 5.26.0 is installed.* Running --backend reference"):
        assert type(select_backend("auto", "cpu")) is Backend
    assert type(select_backend("reference", "cpu")) is Backend  # no guard: public module calls only
    assert not versions.transformers_supported("5.24.2") and versions.transformers_supported("5.25.3")


def test_reference_matches_sam2model_forward(tiny_model):
    pixel_values = torch.randn(2, 3, 256, 256, generator=torch.Generator().manual_seed(1))
    boxes = torch.tensor([[[10.0, 20, 100, 120], [50, 50, 200, 210]], [[5.0, 6, 70, 80], [100, 100, 250, 250]]])
    with torch.no_grad():
        expected = tiny_model(pixel_values=pixel_values, input_boxes=boxes)
        coords, labels = combine_prompts(boxes=boxes.reshape(-1, 4))
        ours = Sam2Segmenter(tiny_model, backend="reference")(
            pixel_values, image_index=torch.tensor([0, 0, 1, 1]), point_coords=coords, point_labels=labels)
    torch.testing.assert_close(ours.mask_logits, expected.pred_masks.reshape(4, 3, 64, 64), rtol=0, atol=1e-6)
    torch.testing.assert_close(ours.iou_scores, expected.iou_scores.reshape(4, 3), rtol=0, atol=1e-6)


@pytest.mark.parametrize("strategy, options", [("lora", {"init_lora_weights": False}), ("full", {})])
@pytest.mark.parametrize("masks", [False, True])
def test_cpu_backend_matches_reference(strategy, options, masks, tiny_batch):
    """Outputs and gradients (mask prompts make the decoder's first layer per object)."""
    mask_inputs = torch.randn(3, 1, 64, 64, generator=torch.Generator().manual_seed(1)) if masks else None
    batch = {**tiny_batch, "mask_inputs": mask_inputs}
    assert_same(training_forward("cpu", strategy, batch, **options),
                training_forward("reference", strategy, batch, **options))


def test_reference_runs_peft_lora_and_cpu_in_place(tiny_model):
    model = apply_strategy(tiny_model, "lora")
    layers = [module for module in model.modules() if isinstance(module, InPlaceLoraLinear)]
    segmenter = Sam2Segmenter(model, backend="reference")
    segmenter.backend_for(torch.device("cpu"))
    assert layers and not any(layer._in_place_applies() for layer in layers)
    Sam2Segmenter(model, backend="cpu").backend_for(torch.device("cpu"))
    assert all(layer._in_place_applies() for layer in layers)


@pytest.mark.parametrize("name", ["reference", "cpu"])
def test_prefix_split_forward_matches_the_whole_encoder(name):
    model = load_sam2("tiny-random")
    pixel_values = torch.randn(1, 3, 256, 256, generator=torch.Generator().manual_seed(4))
    backend = select_backend(name, "cpu")
    with torch.no_grad():
        whole = Sam2Segmenter(model, backend="reference").encode_images(pixel_values)
        for start in (1, 3, 6):
            prefix = encode_prefix(model.vision_encoder, pixel_values, start, backend=backend)
            maps = encode_from_prefix(model.vision_encoder, prefix, start, backend=backend)
            for level, expected in zip(maps, whole, strict=True):
                torch.testing.assert_close(level, expected, rtol=1e-5, atol=1e-6)


def test_reference_checkpoints_whole_blocks_cpu_in_strips():
    model = apply_strategy(load_sam2("tiny-random"), "full").train()
    enable_gradient_checkpointing(model, strips=4, backend="reference")
    assert all(block._gradient_checkpointing_func is checkpoint_whole for block in hiera_blocks(model))
    enable_gradient_checkpointing(model, strips=4, backend="cpu")
    windowed = [block._gradient_checkpointing_func for block in hiera_blocks(model) if block.window_size]
    assert windowed and all(func.keywords["strips"] == 4 for func in windowed)
