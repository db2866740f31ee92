"""`load_sam2(..., video=True)`: a transformers `Sam2VideoModel` from every source, and official checkpoints' memory
weights both ways, tracked against the official `SAM2VideoPredictor`.

    .venv/bin/pytest tests/test_video_models.py                 # all (~35 s on 2 CPU cores)
    .venv/bin/pytest tests/test_video_models.py -m "not sam2"   # without the official package (~10 s)

The official model is `sam2.1_hiera_t.yaml` at 128 px with a narrower trunk, neck and memory modules (`SMALL`, the
same overrides for `build_sam2_video_predictor` and for our YAML), so that tracking three frames takes seconds.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import PIL.Image
import pytest
import torch
import yaml
from peft import LoraConfig, get_peft_model
from transformers import Sam2Model, Sam2VideoConfig, Sam2VideoModel, Sam3TrackerVideoConfig

from sam2_peft.export import (
    OfficialCheckpointError,
    convert_checkpoint,
    export_official_checkpoint,
    merge_to_folder,
)
from sam2_peft.interop.official_config import (
    OFFICIAL_CONFIGS,
    OfficialConfigError,
    official_model_section,
    official_to_hf_config,
    official_yaml_path,
)
from sam2_peft.interop.official_video_config import official_name_for, official_to_hf_video_config
from sam2_peft.interop.official_keys import hf_key_to_official, hf_to_official, official_key_to_hf, official_to_hf
from sam2_peft.family import VIDEO_ONLY_PREFIXES
from sam2_peft.models import ModelLoadError, build_video_processor, load_sam2, model_fingerprint
from sam2_peft.presets import tiny_random_video_config

HAS_SAM2 = importlib.util.find_spec("sam2") is not None
needs_sam2 = pytest.mark.sam2(pytest.mark.skipif(not HAS_SAM2, reason="needs the official `sam2` package"))

SIZE = 128
# sam2.1_hiera_t.yaml, smaller: everything else (the tracking flags, the memory layout) as shipped.
SMALL = {
    "image_size": SIZE,
    "image_encoder.trunk.embed_dim": 8, "image_encoder.trunk.stages": [1, 1, 2, 1],
    "image_encoder.trunk.global_att_blocks": [3], "image_encoder.trunk.window_pos_embed_bkg_spatial_size": [4, 4],
    "image_encoder.trunk.window_spec": [8, 4, 4, 2],
    "image_encoder.neck.d_model": 128, "image_encoder.neck.backbone_channel_list": [64, 32, 16, 8],
    "image_encoder.neck.position_encoding.num_pos_feats": 128,
    "memory_attention.d_model": 128, "memory_attention.num_layers": 2, "memory_attention.layer.d_model": 128,
    "memory_attention.layer.dim_feedforward": 256, "memory_attention.layer.self_attention.embedding_dim": 128,
    "memory_attention.layer.cross_attention.embedding_dim": 128,
    "memory_encoder.in_dim": 128, "memory_encoder.mask_downsampler.embed_dim": 128,
    "memory_encoder.fuser.layer.dim": 128,
}
SHIPPED = "configs/sam2.1/sam2.1_hiera_t.yaml"
HYDRA_SMALL = [f"++model.{key}={value}".replace(" ", "") for key, value in SMALL.items()]
# Official init leaves many tensors zero or equal (layer scales at 1e-6): this spread makes every one of them matter
# (logits of std ~1; a flipped temporal encoding or a zeroed fuser moves tracked frames by 0.03-0.4).
PERTURBATION = 0.1
OBJECT_SCORE_BIAS = 2.0  # the object is present on every frame, so the masks are not all `NO_OBJ_SCORE`
CLICK = (45.0, 55.0)


def _set(section: dict, dotted: str, value) -> None:
    *parents, last = dotted.split(".")
    for part in parents:
        section = section.setdefault(part, {})
    section[last] = value


def _small_yaml(path, **changes):
    """The small config as an official YAML written from the built-in sam2.1 table (no `sam2` package needed)."""
    model = official_model_section("sam2.1_hiera_t")
    for key, value in {**SMALL, **changes}.items():
        _set(model, key, value)
    path.write_text(yaml.safe_dump({"model": model}))
    return path


def _official_video_state(config: Sam2VideoConfig, seed: int) -> dict[str, torch.Tensor]:
    """An official-format state dict of a perturbed random `Sam2VideoModel` (made through transformers)."""
    torch.manual_seed(seed)
    model = Sam2VideoModel(config)
    model.prompt_encoder.shared_embedding.positional_embedding.copy_(model.shared_image_embedding.positional_embedding)
    state, unmapped = hf_to_official(model.state_dict())
    assert unmapped == []
    return state


# --- keys and configurations -------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("official", "hf"),
    [
        ("memory_attention.layers.1.cross_attn_image.out_proj.weight",
         "memory_attention.layers.1.cross_attn_image.o_proj.weight"),
        ("memory_attention.layers.0.norm3.bias", "memory_attention.layers.0.layer_norm3.bias"),
        ("memory_attention.norm.weight", "memory_attention.layer_norm.weight"),
        ("memory_attention.layers.2.linear1.weight", "memory_attention.layers.2.linear1.weight"),
        ("memory_encoder.mask_downsampler.encoder.3.weight", "memory_encoder.mask_downsampler.layers.1.conv.weight"),
        ("memory_encoder.mask_downsampler.encoder.10.bias",
         "memory_encoder.mask_downsampler.layers.3.layer_norm.bias"),
        ("memory_encoder.mask_downsampler.encoder.12.weight", "memory_encoder.mask_downsampler.final_conv.weight"),
        ("memory_encoder.fuser.layers.1.gamma", "memory_encoder.memory_fuser.layers.1.scale"),
        ("memory_encoder.fuser.layers.0.dwconv.bias", "memory_encoder.memory_fuser.layers.0.depthwise_conv.bias"),
        ("memory_encoder.pix_feat_proj.weight", "memory_encoder.feature_projection.weight"),
        ("memory_encoder.out_proj.bias", "memory_encoder.projection.bias"),
        ("obj_ptr_proj.layers.1.weight", "object_pointer_proj.layers.0.weight"),
        ("obj_ptr_tpos_proj.weight", "temporal_positional_encoding_projection_layer.weight"),
        ("maskmem_tpos_enc", "memory_temporal_positional_encoding"),
        ("no_mem_pos_enc", "no_memory_positional_encoding"),
        ("no_obj_embed_spatial", "occlusion_spatial_embedding_parameter"),
    ],
)
def test_memory_key_rules_both_ways(official, hf):
    assert official_key_to_hf(official) == hf
    assert hf_key_to_official(hf) == official


def test_named_video_configs_are_transformers_conversions():
    # transformers' conversion script (convert_sam2_video_to_hf.py) builds SAM2.1 as Sam2VideoConfig's defaults and
    # SAM2 with both SAM2.1-only switches off.
    defaults = Sam2VideoConfig().to_dict()
    for name in ("sam2.1_hiera_t", "sam2_hiera_t"):
        ours = official_to_hf_video_config(name).to_dict()
        differ = {key for key in defaults if key not in ("vision_config", "prompt_encoder_config",
                                                         "mask_decoder_config") and ours[key] != defaults[key]}
        expected = set() if name.startswith("sam2.1") else {"enable_temporal_pos_encoding_for_object_pointers",
                                                            "enable_occlusion_spatial_embedding"}
        assert differ == expected, name
    # The image path is the image model's: the two models share every image weight.
    video = official_to_hf_video_config("sam2.1_hiera_l").vision_config.to_dict()
    assert video == official_to_hf_config("sam2.1_hiera_l").vision_config.to_dict()


def test_real_sizes_share_every_image_tensor():
    with torch.device("meta"):
        image = Sam2Model(official_to_hf_config("sam2.1_hiera_b+")).state_dict()
        video = Sam2VideoModel(official_to_hf_video_config("sam2.1_hiera_b+")).state_dict()
    assert all(video[key].shape == tensor.shape for key, tensor in image.items())
    extra = set(video) - set(image)
    assert all(key.startswith(VIDEO_ONLY_PREFIXES) for key in extra)
    assert all(any(key.startswith(prefix) for key in extra) for prefix in VIDEO_ONLY_PREFIXES)


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"soft_no_obj_ptr": True}, r"model.soft_no_obj_ptr=True \(Sam2VideoModel needs False\)"),
        ({"proj_tpos_enc_in_obj_ptrs": False}, "needs all three true, as SAM2.1, or the first false"),
        ({"memory_encoder.out_dim": 32}, r"memory_encoder.out_dim=32 \(Sam2VideoModel needs 64\)"),
        ({"memory_attention.layer.cross_attention.num_heads": 2}, "has one setting for both"),
    ],
)
def test_video_settings_without_a_counterpart_are_refused(tmp_path, changes, expected):
    with pytest.raises(OfficialConfigError, match=expected):
        official_to_hf_video_config(_small_yaml(tmp_path / "bad.yaml", **changes))


def test_an_image_only_yaml_is_no_video_config(tmp_path):
    path = tmp_path / "image.yaml"
    model = official_model_section("sam2.1_hiera_t")
    del model["memory_attention"], model["memory_encoder"]
    path.write_text(yaml.safe_dump({"model": model}))
    assert official_to_hf_config(path).vision_config.backbone_config.hidden_size == 96
    with pytest.raises(OfficialConfigError, match=r"no video model in this config: it lacks model.memory_attention"):
        official_to_hf_video_config(path)


def test_official_video_checkpoint_loads_strictly(tmp_path):
    config_path = _small_yaml(tmp_path / "small.yaml")
    state = _official_video_state(official_to_hf_video_config(config_path), seed=3)
    checkpoint = tmp_path / "small.pt"
    torch.save({"model": state}, checkpoint)
    model = load_sam2(checkpoint, sam2_config=str(config_path), video=True)
    assert isinstance(model, Sam2VideoModel) and not model.training
    assert model.config.image_size == SIZE and model.config.memory_attention_rope_feat_sizes == [8, 8]
    back, _ = hf_to_official(model.state_dict())
    assert back.keys() == state.keys() and all(torch.equal(back[key], state[key]) for key in state)
    # The RoPE buffers, which no checkpoint holds, are built (not left empty from a meta-device init).
    assert model.memory_attention.rotary_emb.inv_freq.device.type == "cpu"
    converted = load_sam2(convert_checkpoint(checkpoint, str(config_path), tmp_path / "hf", video=True), video=True)
    assert model_fingerprint(converted) == model_fingerprint(model)
    # Without video=True the same file gives the image model, its memory tensors dropped.
    image = load_sam2(checkpoint, sam2_config=str(config_path))
    assert type(image) is Sam2Model
    assert all(torch.equal(tensor, model.state_dict()[key]) for key, tensor in image.state_dict().items())

    broken = dict(state)
    del broken["memory_attention.layers.1.norm2.weight"]
    broken["memory_encoder.out_proj.bias"] = torch.zeros(3)
    broken["memory_encoder.extra.weight"] = torch.zeros(1)
    torch.save({"model": broken}, tmp_path / "broken.pt")
    with pytest.raises(OfficialCheckpointError) as error:
        load_sam2(tmp_path / "broken.pt", sam2_config=str(config_path), video=True)
    message = str(error.value)
    assert "3 problems" in message and "video=True maps every tensor" in message
    assert "missing: memory_attention.layers.1.layer_norm2.weight" in message
    assert "shape: memory_encoder.projection.bias (from memory_encoder.out_proj.bias) is (3,)" in message
    assert "unexpected: memory_encoder.extra.weight" in message


def test_sam2_checkpoints_have_no_sam2_1_modules(tmp_path):
    config_path = _small_yaml(tmp_path / "sam2.yaml", no_obj_embed_spatial=False, add_tpos_enc_to_obj_ptrs=False,
                              proj_tpos_enc_in_obj_ptrs=False, use_signed_tpos_enc_to_obj_ptrs=False)
    config = official_to_hf_video_config(config_path)
    state = _official_video_state(config, seed=4)
    assert not any(key.startswith(("obj_ptr_tpos_proj", "no_obj_embed_spatial")) for key in state)
    torch.save({"model": state}, tmp_path / "sam2.pt")
    model = load_sam2(tmp_path / "sam2.pt", sam2_config=str(config_path), video=True)
    assert not model.config.enable_temporal_pos_encoding_for_object_pointers
    assert model.occlusion_spatial_embedding_parameter is None


# --- folders and Hub ids -----------------------------------------------------------------------------------------

def test_a_video_folder_loads_as_either_model(tmp_path):
    video = load_sam2("tiny-random-video", video=True)
    video.save_pretrained(tmp_path / "video")
    loaded = load_sam2(tmp_path / "video", video=True)
    assert type(loaded) is Sam2VideoModel and not loaded.training
    assert model_fingerprint(loaded) == model_fingerprint(video)
    image = load_sam2(tmp_path / "video")  # without video=True: the image model, as before
    assert type(image) is Sam2Model
    expected = load_sam2("tiny-random-video").state_dict()
    assert image.state_dict().keys() == expected.keys()
    assert all(torch.equal(tensor, expected[key]) for key, tensor in image.state_dict().items())


def test_image_only_and_other_family_folders_are_refused_as_video(tmp_path):
    load_sam2("tiny-random").save_pretrained(tmp_path / "image")
    with pytest.raises(ModelLoadError, match=r"image-only SAM2 checkpoint .*'sam2'.* official \.pt") as error:
        load_sam2(tmp_path / "image", video=True)
    assert str(tmp_path / "image") in str(error.value)
    Sam3TrackerVideoConfig().save_pretrained(tmp_path / "sam3")
    with pytest.raises(ModelLoadError, match="'sam3_tracker_video' checkpoint; sam2-peft loads only SAM2"):
        load_sam2(tmp_path / "sam3", video=True)
    with pytest.raises(ModelLoadError, match="has no video preset"):
        load_sam2("tiny-random-edgetam", video=True)


def test_hub_id_loads_as_a_video_model_offline_from_a_prefilled_cache(tmp_path):
    # The Hub's facebook/sam2.1-hiera-* repos hold Sam2VideoModel checkpoints; a prefilled cache stands in for one.
    repo = tmp_path / "cache" / "models--facebook--sam2.1-hiera-tiny"
    commit = "0" * 40
    load_sam2("tiny-random-video", video=True).save_pretrained(repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    code = (
        "import json; from sam2_peft import load_sam2, model_fingerprint;"
        "v = load_sam2('facebook/sam2.1-hiera-tiny', video=True); i = load_sam2('facebook/sam2.1-hiera-tiny');"
        "print(json.dumps([type(v).__name__, model_fingerprint(v), type(i).__name__, model_fingerprint(i)]))"
    )
    cache = tmp_path / "cache"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "HF_HOME": str(tmp_path / "home")}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    video_class, video_print, image_class, image_print = json.loads(result.stdout.splitlines()[-1])
    assert (video_class, image_class) == ("Sam2VideoModel", "Sam2Model")
    assert video_print == model_fingerprint(load_sam2("tiny-random-video", video=True))
    assert image_print != video_print


def test_image_trained_tensors_load_into_the_video_model_by_name():
    image = load_sam2("tiny-random-video")  # the image preset of the same width
    with torch.no_grad():
        image.mask_decoder.iou_token.weight.add_(1.0)  # as if trained
    video = Sam2VideoModel(tiny_random_video_config())
    missing, unexpected = video.load_state_dict(image.state_dict(), strict=False)
    assert unexpected == [] and missing and all(key.startswith(VIDEO_ONLY_PREFIXES) for key in missing)
    assert set(missing) == {key for key in video.state_dict() if key.startswith(VIDEO_ONLY_PREFIXES)}
    assert all(torch.equal(video.state_dict()[key], tensor) for key, tensor in image.state_dict().items())


def test_merged_hf_folder_of_a_video_model_loads_as_one(tmp_path):
    model = load_sam2("tiny-random-video", video=True)
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["qkv"], init_lora_weights=False))
    folder = merge_to_folder(peft_model, tmp_path / "merged", format="hf")
    merged = peft_model.get_base_model().state_dict()
    loaded = load_sam2(folder, video=True)
    assert type(loaded) is Sam2VideoModel
    assert loaded.state_dict().keys() == merged.keys()
    assert all(torch.equal(loaded.state_dict()[key], merged[key]) for key in merged)
    qkv = "vision_encoder.backbone.blocks.0.attn.qkv.weight"
    assert not torch.equal(merged[qkv], load_sam2("tiny-random-video", video=True).state_dict()[qkv])
    assert build_video_processor(loaded).video_processor.size.height == 256
    assert (folder / "processor_config.json").is_file() and (folder / "preprocessor_config.json").is_file()


# --- against the official video predictor ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def official_clip(tmp_path_factory):
    """A perturbed official video predictor (the small config), its checkpoint and YAML, our conversion of it, and
    a three-frame clip of a moving blob tracked by both from one click on frame 0."""
    if not HAS_SAM2:
        pytest.skip("needs the official `sam2` package")
    from omegaconf import OmegaConf
    from sam2.build_sam import build_sam2_video_predictor

    folder = tmp_path_factory.mktemp("official_video")
    config = OmegaConf.load(official_yaml_path("sam2.1_hiera_t"))
    for key, value in SMALL.items():
        OmegaConf.update(config, f"model.{key}", value, force_add=True)
    OmegaConf.save(config, folder / "small.yaml")
    torch.manual_seed(0)
    predictor = build_sam2_video_predictor(SHIPPED, None, device="cpu", hydra_overrides_extra=HYDRA_SMALL)
    # Hole filling needs the package's CUDA extension (skipped with a warning without it); transformers has none.
    predictor.fill_hole_area = 0
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for tensor in predictor.state_dict().values():
            if tensor.is_floating_point():
                tensor.add_(torch.randn(tensor.shape, generator=generator) * PERTURBATION)
        predictor.sam_mask_decoder.pred_obj_score_head.layers[2].bias.fill_(OBJECT_SCORE_BIAS)
    checkpoint = folder / "small.pt"
    torch.save({"model": predictor.state_dict()}, checkpoint)
    frames = _write_clip(folder / "frames")

    state = predictor.init_state(str(folder / "frames"))
    predictor.add_new_points_or_box(state, frame_idx=0, obj_id=1, points=np.array([CLICK], np.float32),
                                    labels=np.array([1], np.int32))
    video_masks = {frame: masks[0, 0] for frame, _, masks in predictor.propagate_in_video(state)}
    outputs = state["output_dict_per_obj"][0]
    low_res = {frame: (outputs["cond_frame_outputs"] | outputs["non_cond_frame_outputs"])[frame]["pred_masks"][0, 0]
               for frame in range(len(frames))}
    model = load_sam2(checkpoint, sam2_config=str(folder / "small.yaml"), video=True)
    return SimpleNamespace(predictor=predictor, checkpoint=checkpoint, yaml=folder / "small.yaml", frames=frames,
                           images=state["images"], low_res=low_res, video_masks=video_masks, model=model)


def _write_clip(folder) -> list[np.ndarray]:
    """Three JPEG frames (what `init_state` reads) of a blob moving over noise, at the model size (so that neither
    side resizes), and the decoded frames (what our processor gets)."""
    folder.mkdir()
    rng = np.random.default_rng(0)
    rows, cols = np.mgrid[:SIZE, :SIZE]
    frames = []
    for t in range(3):
        frame = rng.integers(0, 120, (SIZE, SIZE, 3)).astype(np.uint8)
        frame[(cols - CLICK[0] - 12 * t) ** 2 + (rows - CLICK[1] - 5 * t) ** 2 < 18**2] = (230, 200, 60)
        PIL.Image.fromarray(frame).save(folder / f"{t:05d}.jpg", quality=95)
        frames.append(np.array(PIL.Image.open(folder / f"{t:05d}.jpg").convert("RGB")))
    return frames


def _track(model, frames):
    """Our tracking: transformers' processor, inference session and `propagate_in_video_iterator`."""
    processor = build_video_processor(model)
    session = processor.init_video_session(video=frames, inference_device="cpu")
    processor.add_inputs_to_inference_session(session, frame_idx=0, obj_ids=1, input_points=[[[list(CLICK)]]],
                                              input_labels=[[[1]]])
    model(inference_session=session, frame_idx=0)
    low_res = {out.frame_idx: out.pred_masks[0, 0] for out in model.propagate_in_video_iterator(session)}
    return low_res, processor, session


@needs_sam2
def test_tracking_equals_the_official_video_predictor(official_clip):
    low_res, processor, session = _track(official_clip.model, official_clip.frames)
    assert sorted(low_res) == [0, 1, 2]
    # The same normalised pixels (float32 rounding apart).
    torch.testing.assert_close(session.get_frame(0), official_clip.images[0], atol=1e-6, rtol=0)
    for frame, official in official_clip.low_res.items():
        assert official.std() > 0.5 and 0.02 < (official > 0).float().mean() < 0.5  # an informative mask
        # Both store memories in bfloat16 (transformers' `_encode_new_memory`, the predictor's
        # `_run_memory_encoder`): the frames agree to 1e-5; had only one side rounded, tracked frames would be
        # ~3e-3 apart, and a flipped temporal encoding moves them by 0.03.
        torch.testing.assert_close(low_res[frame], official, atol=1e-4, rtol=0, msg=f"frame {frame}")
        video = processor.post_process_masks([low_res[frame][None, None]], original_sizes=[[SIZE, SIZE]],
                                             binarize=False)[0][0, 0]
        torch.testing.assert_close(video, official_clip.video_masks[frame], atol=1e-4, rtol=0)


@needs_sam2
def test_export_round_trip_is_bit_identical_in_build_sam2_video_predictor(official_clip, tmp_path):
    from sam2.build_sam import build_sam2_video_predictor

    path = merge_to_folder(copy.deepcopy(official_clip.model), tmp_path, format="sam2",
                           sam2_config=str(official_clip.yaml))
    assert path.name == "small.pt"
    # build_sam2_video_predictor loads strictly: any missing or unexpected key raises.
    rebuilt = build_sam2_video_predictor(SHIPPED, str(path), device="cpu", hydra_overrides_extra=HYDRA_SMALL)
    original = official_clip.predictor.state_dict()
    assert rebuilt.state_dict().keys() == original.keys()
    assert [key for key, tensor in original.items() if not torch.equal(rebuilt.state_dict()[key], tensor)] == []
    with pytest.raises(OfficialCheckpointError, match="exports its own memory modules"):
        export_official_checkpoint(official_clip.model, tmp_path / "never.pt", str(official_clip.yaml),
                                   video_source=official_clip.checkpoint)


@needs_sam2
@pytest.mark.parametrize("name", OFFICIAL_CONFIGS)
def test_named_video_table_equals_the_shipped_yaml(name):
    shipped = official_to_hf_video_config(official_yaml_path(name))
    assert official_to_hf_video_config(name).to_dict() == shipped.to_dict()


@needs_sam2
@pytest.mark.parametrize("name", ["sam2.1_hiera_t", "sam2_hiera_t"])
def test_every_official_memory_tensor_maps_onto_the_video_model(name):
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    torch.manual_seed(0)
    official = instantiate(OmegaConf.load(official_yaml_path(name)).model, _recursive_=True).state_dict()
    tensors, _, unmapped = official_to_hf(official, video=True)
    config = official_to_hf_video_config(name)
    with torch.device("meta"):
        reference = Sam2VideoModel(config).state_dict()
    assert unmapped == [] and tensors.keys() == reference.keys()
    assert all(tensors[key].shape == reference[key].shape for key in reference)
    back, unmapped = hf_to_official(tensors)
    assert unmapped == [] and back.keys() == official.keys()
    assert official_name_for(config) == name
