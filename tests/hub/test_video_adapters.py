"""Adapters across SAM2's image and video models: what loads where, what is refused, and plain PEFT parity."""

import json
import warnings

import pytest
import torch
from hub_helpers import assert_state_equal, clone_state
from peft import PeftModel
from transformers import Sam2Model, Sam2VideoModel
from transformers.models.sam2_video.modeling_sam2_video import Sam2VideoInferenceSession

from sam2_peft.hub import AdapterMismatchError, load_adapter, save_adapter
from sam2_peft.hub.load import load_adapted, requires_video_model
from sam2_peft.family import VIDEO_ONLY_PREFIXES
from sam2_peft.models import ModelLoadError, load_sam2, model_fingerprint
from sam2_peft.segmenter import Sam2Segmenter
from sam2_peft.strategies import apply_strategy

# The image preset whose weights the video preset holds (`load_sam2("tiny-random", video=True)`).
VIDEO_IMAGE = "tiny-random-video"


def video_model():
    return load_sam2("tiny-random", video=True)


def image_path(model, batch):
    """The image forward (encoder, prompt encoder, decoder) on the tiny batch's three prompted objects."""
    with torch.no_grad():
        return Sam2Segmenter(model)(**batch).mask_logits


def track(model) -> torch.Tensor:
    """transformers' own video forward: a click on frame 0, then frames 1-2 from memory; (3, 1, 1, 64, 64) logits."""
    generator = torch.Generator().manual_seed(0)
    session = Sam2VideoInferenceSession(video=torch.randn(3, 3, 256, 256, generator=generator), video_height=256,
                                        video_width=256, dtype=torch.float32)
    # A box (labels 2, 3) and a click: the tiny random model then finds an object on frames 0 and 2.
    points = torch.tensor([[[[100.0, 120.0], [30.0, 40.0], [200.0, 220.0]]]])
    session.add_point_inputs(obj_idx=session.obj_id_to_idx(1), frame_idx=0,
                             inputs={"point_coords": points, "point_labels": torch.tensor([[[1, 2, 3]]])})
    session.obj_with_new_inputs = [1]
    with torch.no_grad():
        return torch.stack([model(inference_session=session, frame_idx=frame).pred_masks for frame in range(3)])


def record(folder) -> dict:
    return json.loads((folder / "sam2_peft.json").read_text())


def assert_same_parameters(model, reference) -> None:
    state, expected = model.state_dict(), reference.state_dict()
    assert state.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(state[key], value), key


def no_base_warnings(caught) -> bool:
    return not [w for w in caught if "trained on base" in str(w.message)]


def test_video_lora_adapter_loads_with_plain_peft_and_only_on_the_video_model(tmp_path):
    torch.manual_seed(0)
    model = apply_strategy(video_model(), "lora", targets="trunk.qkv+memory.attn", r=4, init_lora_weights=False)
    model.eval()
    save_adapter(model, tmp_path / "a", base_model_name_or_path="tiny-random", strategy="lora")
    saved = record(tmp_path / "a")
    assert (saved["base_model_class"], saved["requires_video_model"]) == ("Sam2VideoModel", True)
    assert saved["image_fingerprint"] == model_fingerprint(load_sam2(VIDEO_IMAGE))
    assert requires_video_model(tmp_path / "a")

    # Without sam2-peft: the base as a transformers folder, then plain PEFT.
    video_model().save_pretrained(tmp_path / "base")
    plain = PeftModel.from_pretrained(Sam2VideoModel.from_pretrained(tmp_path / "base"), tmp_path / "a").eval()
    assert_same_parameters(plain, model)
    reference = track(model)
    assert not torch.equal(reference[1:], track(video_model())[1:])  # the memory adapter changes the tracked frames
    # The base read from safetensors lies unaligned in memory (views into the file's buffer), which changes CPU GEMM
    # rounding in the last bits; re-aligned, the outputs are bit-identical.
    torch.testing.assert_close(track(plain), reference, rtol=0, atol=1e-4)
    with torch.no_grad():
        for param in plain.parameters():
            param.data = param.data.clone()
    assert torch.equal(track(plain), reference)

    # sam2-peft re-creates the video base the adapter needs from the image preset's name.
    loaded = load_adapted("tiny-random", tmp_path / "a")
    assert type(loaded.get_base_model()) is Sam2VideoModel
    assert_same_parameters(loaded, plain)

    image = load_sam2(VIDEO_IMAGE)
    before = clone_state(image)
    with pytest.raises(AdapterMismatchError, match=r"video model.*memory_attention\..*video=True.*--task video"):
        load_adapter(image, tmp_path / "a")
    assert_state_equal(image, before)
    with pytest.raises(AdapterMismatchError, match="changes its memory path"):
        load_adapted(VIDEO_IMAGE, tmp_path / "a", video=False)


def test_a_plain_peft_memory_adapter_is_refused_on_the_image_model_by_its_tensors(tmp_path):
    model = apply_strategy(video_model(), "lora", targets="memory.all", r=2)
    model.save_pretrained(tmp_path / "plain")  # no sam2_peft.json
    assert requires_video_model(tmp_path / "plain")
    with pytest.raises(AdapterMismatchError, match=r"changes its memory path \((memory_attention|memory_encoder|"
                                                   r"object_pointer_proj|temporal)"):
        load_adapter(load_sam2(VIDEO_IMAGE), tmp_path / "plain")


def test_image_lora_adapter_loads_onto_the_video_model_unchanged(tmp_path, tiny_batch):
    torch.manual_seed(0)
    # 36 targets: PEFT condenses 20 or more into suffixes (`q_proj`) that would match the memory attention too.
    model = apply_strategy(load_sam2(VIDEO_IMAGE), "lora", targets="trunk.qkv+decoder.attn", r=4,
                           init_lora_weights=False)
    save_adapter(model, tmp_path / "img", base_model_name_or_path="tiny-random", strategy="lora")
    assert "requires_video_model" not in record(tmp_path / "img") and not requires_video_model(tmp_path / "img")
    on_image = load_adapter(load_sam2(VIDEO_IMAGE), tmp_path / "img").eval()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        on_video = load_adapter(video_model(), tmp_path / "img").eval()
    assert no_base_warnings(caught)  # the same image model inside: no "other base" warning
    adapted = {name for name, _ in on_video.named_modules() if name.endswith(".lora_A")}
    assert len(adapted) == 36 and not any(".memory_attention." in name for name in adapted)
    torch.testing.assert_close(image_path(on_video, tiny_batch), image_path(on_image, tiny_batch), rtol=0, atol=0)
    assert not torch.equal(image_path(on_image, tiny_batch), image_path(load_sam2(VIDEO_IMAGE), tiny_batch))
    # Plain PEFT injects exactly the trained modules into the video model too.
    plain = PeftModel.from_pretrained(video_model(), tmp_path / "img")
    assert {name for name, _ in plain.named_modules() if name.endswith(".lora_A")} == adapted

    assert type(load_adapted(VIDEO_IMAGE, tmp_path / "img").get_base_model()) is Sam2Model
    assert type(load_adapted("tiny-random", tmp_path / "img", video=True).get_base_model()) is Sam2VideoModel


def trained_tensors(model, strategy: str, folder):
    """Apply a non-PEFT strategy, shift its trainable weights (as training would), save them."""
    model = apply_strategy(model, strategy)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.01)
    save_adapter(model, folder, strategy=strategy)
    return model


def test_trained_tensors_move_between_models_unless_they_hold_memory(tmp_path, tiny_batch):
    image_decoder = trained_tensors(load_sam2(VIDEO_IMAGE), "decoder", tmp_path / "image-decoder")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        on_video = load_adapter(video_model(), tmp_path / "image-decoder")
    assert no_base_warnings(caught)
    torch.testing.assert_close(image_path(on_video, tiny_batch), image_path(image_decoder, tiny_batch), rtol=0, atol=0)

    video_decoder = trained_tensors(video_model(), "decoder", tmp_path / "video-decoder")
    assert record(tmp_path / "video-decoder")["requires_video_model"] is False
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        on_image = load_adapter(load_sam2(VIDEO_IMAGE), tmp_path / "video-decoder")
    assert no_base_warnings(caught)
    torch.testing.assert_close(image_path(on_image, tiny_batch), image_path(video_decoder, tiny_batch), rtol=0, atol=0)

    memory = trained_tensors(video_model(), "memory", tmp_path / "memory")
    assert record(tmp_path / "memory")["requires_video_model"] is True
    with pytest.raises(AdapterMismatchError, match="changes its memory path"):
        load_adapter(load_sam2(VIDEO_IMAGE), tmp_path / "memory")
    loaded = load_adapted("tiny-random", tmp_path / "memory")
    assert type(loaded) is Sam2VideoModel
    assert_same_parameters(loaded, memory)
    assert any(name.startswith(VIDEO_ONLY_PREFIXES) for name in memory.state_dict())
    card = (tmp_path / "memory" / "README.md").read_text()
    assert 'load_sam2("<the base model>", video=True)' in card


def test_load_adapted_loads_the_recorded_base_as_the_video_model(tmp_path, monkeypatch):
    model = apply_strategy(video_model(), "lora", targets="memory.attn", r=2)
    save_adapter(model, tmp_path / "hub", base_model_name_or_path="facebook/sam2.1-hiera-tiny", revision="v2",
                 strategy="lora")
    calls = []

    def fake_load_sam2(name, **options):  # the Hub is offline: hand back the tiny video model, note the call
        calls.append((name, options))
        return video_model()

    monkeypatch.setattr("sam2_peft.hub.load.load_sam2", fake_load_sam2)
    assert type(load_adapted(None, tmp_path / "hub").get_base_model()) is Sam2VideoModel
    assert calls == [("facebook/sam2.1-hiera-tiny", {"revision": "v2", "video": True})]

    trained_tensors(video_model(), "memory", tmp_path / "local")
    with pytest.raises(ModelLoadError, match=r"names its base only as sam2-[0-9a-f]{16}.*load_adapted\('<model>'"):
        load_adapted(None, tmp_path / "local")
