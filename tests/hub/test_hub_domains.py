"""Domain adapter sets: add/use, mixed-domain batches, hot-swapping (eager and compiled), weighted combination."""

import pytest
import torch
from hub_helpers import lora_model

from sam2_peft.hub import DomainAdapters, load_adapter, predict, save_adapter
from sam2_peft.models import load_sam2
from sam2_peft.segmenter import Sam2Segmenter, combine_prompts

BOXES = torch.tensor([[10.0, 20.0, 100.0, 120.0], [50.0, 50.0, 200.0, 210.0], [5.0, 6.0, 70.0, 80.0]])
IMAGE_INDEX = torch.tensor([0, 1, 1])


@pytest.fixture
def adapters(tmp_path):
    """Three LoRA adapter folders with different weights (seeds 0, 1, 2)."""
    folders = {}
    for seed, name in enumerate(["ct", "mri", "xray"]):
        folders[name] = tmp_path / name
        save_adapter(lora_model(seed), folders[name], strategy="lora")
    return folders


@pytest.fixture
def images():
    return torch.randn(2, 3, 256, 256, generator=torch.Generator().manual_seed(0))


def reference(folder, images):
    """The masks of one adapter loaded alone on a fresh base: what every domain path must reproduce."""
    model = load_adapter(load_sam2("tiny-random"), folder).eval()
    return predict(model, images, BOXES, image_index=IMAGE_INDEX).mask_logits


def test_use_switches_between_domains(adapters, images):
    domains = DomainAdapters(load_sam2("tiny-random")).add("ct", adapters["ct"]).add("mri", adapters["mri"])
    assert domains.names == ["ct", "mri"] and domains.active == "ct"
    for name in ["mri", "ct"]:
        out = predict(domains.use(name), images, BOXES, image_index=IMAGE_INDEX).mask_logits
        torch.testing.assert_close(out, reference(adapters[name], images), rtol=0, atol=1e-6)
    ct, mri = (predict(domains, images, BOXES, image_index=IMAGE_INDEX, domain=d).mask_logits for d in ["ct", "mri"])
    assert (ct - mri).abs().max() > 1e-3  # the adapters really differ


def test_mixed_domain_batch_equals_each_domain_alone(adapters, images):
    domains = DomainAdapters(load_sam2("tiny-random")).add("ct", adapters["ct"]).add("mri", adapters["mri"])
    out = predict(domains, images, BOXES, image_index=IMAGE_INDEX, domain=["mri", "ct"])
    ct, mri = reference(adapters["ct"], images), reference(adapters["mri"], images)
    torch.testing.assert_close(out.mask_logits[0], mri[0], rtol=0, atol=1e-6)  # box 0 is on image 0 (mri)
    torch.testing.assert_close(out.mask_logits[1:], ct[1:], rtol=0, atol=1e-6)  # boxes 1, 2 on image 1 (ct)
    assert domains.active == "ct"  # restored
    with pytest.raises(ValueError, match="one per image"):
        predict(domains, images, BOXES, image_index=IMAGE_INDEX, domain=["ct"])
    with pytest.raises(KeyError, match="'bone'"):
        predict(domains, images, BOXES, image_index=IMAGE_INDEX, domain=["ct", "bone"])


def test_hotswap_equals_fresh_load(adapters, images):
    domains = DomainAdapters(load_sam2("tiny-random")).add("live", adapters["ct"])
    domains.hotswap("live", adapters["xray"])
    out = predict(domains, images, BOXES, image_index=IMAGE_INDEX).mask_logits
    torch.testing.assert_close(out, reference(adapters["xray"], images), rtol=0, atol=1e-6)
    assert domains.names == ["live"]


def test_hotswap_refuses_modules_to_save(adapters, tmp_path):
    save_adapter(lora_model(3, modules_to_save=["iou_prediction_head"]), tmp_path / "saves", strategy="lora")
    domains = DomainAdapters(load_sam2("tiny-random")).add("live", adapters["ct"])
    with pytest.raises(ValueError, match=r"saves whole modules .*\.add\('<new name>'"):
        domains.hotswap("live", tmp_path / "saves")


def test_trained_tensors_are_not_domains(tmp_path):
    model = load_sam2("tiny-random")
    for name, param in model.named_parameters():
        param.requires_grad_(name.startswith("mask_decoder."))
    save_adapter(model, tmp_path / "dec", strategy="decoder")
    with pytest.raises(ValueError, match="trained tensors"):
        DomainAdapters(load_sam2("tiny-random")).add("dec", tmp_path / "dec")


def test_combine_cat_equals_weighted_sum_of_deltas(adapters):
    domains = DomainAdapters(load_sam2("tiny-random")).add("ct", adapters["ct"]).add("mri", adapters["mri"])
    domains.combine(["ct", "mri"], [0.5, 0.5], "mix", combination_type="cat")
    qkv = domains.model.base_model.model.vision_encoder.backbone.blocks[0].attn.qkv

    def delta(name):
        return qkv.get_delta_weight(name)

    torch.testing.assert_close(delta("mix"), 0.5 * delta("ct") + 0.5 * delta("mri"), rtol=1e-5, atol=1e-6)
    assert "mix" in domains.names


@pytest.mark.slow
def test_hotswap_under_torch_compile_without_recompiling(adapters, images):
    domains = DomainAdapters(load_sam2("tiny-random")).add("live", adapters["ct"]).prepare_for_compile(target_rank=8)
    segmenter = Sam2Segmenter(domains.model)
    coords, labels = combine_prompts(boxes=BOXES)
    compiled = torch.compile(segmenter, backend="aot_eager", fullgraph=False)
    torch._dynamo.reset()

    def run():
        with torch.no_grad():
            return compiled(images, image_index=IMAGE_INDEX, point_coords=coords, point_labels=labels,
                            multimask_output=False).mask_logits

    torch.testing.assert_close(run(), reference(adapters["ct"], images), rtol=1e-5, atol=1e-5)
    save_adapter(lora_model(2, r=8), adapters["xray"].parent / "xray8", strategy="lora")
    domains.hotswap("live", adapters["xray"].parent / "xray8")
    with torch._dynamo.config.patch(error_on_recompile=True):
        out = run()
    torch.testing.assert_close(out, reference(adapters["xray"].parent / "xray8", images), rtol=1e-5, atol=1e-5)


def test_switching_domains_keeps_adapters_frozen(adapters):
    domains = DomainAdapters(load_sam2("tiny-random"))
    for name, folder in adapters.items():
        domains.add(name, folder)
    for name in adapters:
        domains.use(name)
        assert not any(p.requires_grad for p in domains.model.parameters()), f"use({name!r}) made weights trainable"


def test_predict_needs_a_box(images):
    with pytest.raises(ValueError, match="`boxes` is empty"):
        predict(load_sam2("tiny-random"), images, torch.zeros(0, 4))
