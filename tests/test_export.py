"""Official sam2 checkpoint import/export and parity with the official package.

    .venv/bin/pytest tests/test_export.py                 # all (~1 min on 2 CPU cores)
    .venv/bin/pytest tests/test_export.py -m "not sam2"   # without the official package (seconds)

Parity tests build the official model with random weights, perturb every tensor with a seeded normal (official init
leaves many tensors zero or identical, which would hide a swapped mapping), convert, and compare outputs.
"""

from __future__ import annotations

import importlib.util
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml
from peft import LoraConfig, get_peft_model
from transformers import Sam2Model, Sam2Processor

from sam2_peft import export
from sam2_peft.data.intensity import normalize_intensity
from sam2_peft.data.transforms import Preprocessor
from sam2_peft.export import (
    OfficialCheckpointError,
    convert_checkpoint,
    export_official_checkpoint,
    load_official_checkpoint,
    merge_to_folder,
    read_official_checkpoint,
)
from sam2_peft.interop.official_config import (
    OFFICIAL_CONFIGS,
    OfficialConfigError,
    guess_official_config,
    official_to_hf_config,
    official_yaml_path,
)
from sam2_peft.interop.official_video_config import official_name_for
from sam2_peft.interop.official_keys import (
    hf_key_to_official,
    hf_to_official,
    is_video_only,
    official_key_to_hf,
    official_to_hf,
)
from sam2_peft.models import build_image_processor, load_sam2
from sam2_peft.segmenter import Sam2Segmenter, combine_prompts, masks_at_original_size

HAS_SAM2 = importlib.util.find_spec("sam2") is not None


def needs_sam2(test):
    """Mark a test `sam2` and skip it cleanly where the official package is not installed."""
    return pytest.mark.sam2(pytest.mark.skipif(not HAS_SAM2, reason="needs the official `sam2` package")(test))

PERTURBATION = 0.02

# A 128-px official-style configuration small enough for tests without the sam2 package (image path only).
TINY_OFFICIAL_MODEL = {
    "image_size": 128,
    "image_encoder": {
        "scalp": 1,
        "trunk": {"embed_dim": 8, "num_heads": 1, "stages": [1, 1, 2, 1], "global_att_blocks": [3],
                  "window_pos_embed_bkg_spatial_size": [4, 4], "window_spec": [8, 4, 4, 2]},
        "neck": {"d_model": 32, "backbone_channel_list": [64, 32, 16, 8], "fpn_top_down_levels": [2, 3],
                 "fpn_interp_model": "nearest"},
    },
    "use_high_res_features_in_sam": True, "pred_obj_scores": True, "pred_obj_scores_mlp": True,
    "iou_prediction_use_sigmoid": True, "directly_add_no_mem_embed": True,
}


def _perturb(state: dict[str, torch.Tensor], seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for value in state.values():
            if value.is_floating_point():
                value.add_(torch.randn(value.shape, generator=generator) * PERTURBATION)


@pytest.fixture
def tiny_official(tmp_path):
    """A tiny official-format checkpoint (no video modules) and its YAML, made through transformers."""
    config_path = tmp_path / "tiny.yaml"
    config_path.write_text(yaml.safe_dump({"model": TINY_OFFICIAL_MODEL}))
    torch.manual_seed(0)
    model = Sam2Model(official_to_hf_config(config_path))
    _perturb(model.state_dict(), seed=0)
    # transformers draws the two Fourier buffers independently; the official model has one matrix for both.
    model.prompt_encoder.shared_embedding.positional_embedding.copy_(model.shared_image_embedding.positional_embedding)
    state, unmapped = hf_to_official(model.state_dict())
    assert unmapped == []
    checkpoint = tmp_path / "tiny.pt"
    torch.save({"model": state}, checkpoint)
    return SimpleNamespace(config=config_path, checkpoint=checkpoint, state=state, model=model.eval())


# --- configuration ---------------------------------------------------------------------------------------------

def test_named_configs_follow_official_class_defaults():
    # b+ leaves stages, global blocks and window sizes to the Hiera constructor defaults.
    backbone = official_to_hf_config("sam2.1_hiera_b+").vision_config.backbone_config
    assert backbone.blocks_per_stage == [2, 3, 16, 3]
    assert backbone.global_attention_blocks == [12, 16, 20]
    assert backbone.window_positional_embedding_background_size == [14, 14]
    assert backbone.embed_dim_per_stage == [112, 224, 448, 896]
    assert backbone.num_attention_heads_per_stage == [2, 4, 8, 16]
    large = official_to_hf_config("sam2_hiera_l")
    assert large.vision_config.backbone_config.window_size_per_stage == [8, 4, 16, 8]
    assert large.vision_config.backbone_channel_list == [1152, 576, 288, 144]
    assert large.vision_config.backbone_feature_sizes == [[256, 256], [128, 128], [64, 64]]


@pytest.mark.parametrize(
    ("file_name", "expected"),
    [
        ("sam2.1_hiera_tiny.pt", "sam2.1_hiera_t"),
        ("sam2.1_hiera_base_plus.pt", "sam2.1_hiera_b+"),
        ("sam2_hiera_large.pt", "sam2_hiera_l"),
        ("sam2_hiera_small.pt", "sam2_hiera_s"),
        ("sam2.1_hiera_b+.pt", "sam2.1_hiera_b+"),
        ("MedSAM2_latest.pt", "sam2.1_hiera_t"),
    ],
)
def test_guess_config_from_file_name(file_name, expected):
    assert guess_official_config(file_name, {}) == expected


def test_guess_config_from_weights_and_refusal():
    blocks = {f"image_encoder.trunk.blocks.{i}.attn.qkv.weight": torch.zeros(1) for i in range(16)}
    state = {"image_encoder.trunk.patch_embed.proj.weight": torch.zeros(96, 3, 7, 7), **blocks}
    assert guess_official_config("finetuned.pt", state) == "sam2.1_hiera_s"
    with pytest.raises(OfficialConfigError, match="pass sam2_config="):
        guess_official_config("finetuned.pt", {})


def test_unsupported_yaml_is_refused_by_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"model": {**TINY_OFFICIAL_MODEL, "pred_obj_scores": False}}))
    with pytest.raises(OfficialConfigError, match=r"model.pred_obj_scores=False \(Sam2Model needs True\)"):
        official_to_hf_config(path)
    with pytest.raises(OfficialConfigError, match="neither an official config name"):
        official_to_hf_config("sam2.1_hiera_xl")


def test_official_name_for_matches_and_refuses(tiny_official):
    assert official_name_for(official_to_hf_config("sam2_hiera_s")) == "sam2.1_hiera_s"
    with pytest.raises(OfficialConfigError, match="pass `sam2_config`"):
        official_name_for(tiny_official.model.config)


# --- key mapping -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("official", "hf"),
    [
        ("image_encoder.trunk.blocks.3.mlp.layers.1.bias", "vision_encoder.backbone.blocks.3.mlp.proj_out.bias"),
        ("image_encoder.trunk.blocks.1.proj.weight", "vision_encoder.backbone.blocks.1.proj.weight"),
        ("image_encoder.neck.convs.2.conv.weight", "vision_encoder.neck.convs.2.weight"),
        ("sam_mask_decoder.iou_prediction_head.layers.1.weight", "mask_decoder.iou_prediction_head.layers.0.weight"),
        ("sam_mask_decoder.output_hypernetworks_mlps.3.layers.2.bias",
         "mask_decoder.output_hypernetworks_mlps.3.proj_out.bias"),
        ("sam_mask_decoder.transformer.layers.1.cross_attn_image_to_token.out_proj.weight",
         "mask_decoder.transformer.layers.1.cross_attn_image_to_token.o_proj.weight"),
        ("sam_mask_decoder.output_upscaling.3.weight", "mask_decoder.upscale_conv2.weight"),
        ("sam_prompt_encoder.mask_downscaling.4.bias", "prompt_encoder.mask_embed.layer_norm2.bias"),
        ("no_mem_embed", "no_memory_embedding"),
    ],
)
def test_key_rules_both_ways(official, hf):
    assert official_key_to_hf(official) == hf
    assert hf_key_to_official(hf) == official


def test_every_model_key_round_trips(tiny_model):
    state = tiny_model.state_dict()
    state["prompt_encoder.shared_embedding.positional_embedding"] = state["shared_image_embedding.positional_embedding"]
    official, unmapped = hf_to_official(state)
    assert unmapped == []
    assert not any(is_video_only(key) for key in official)
    # 4 point embeddings replace the table and one Fourier matrix replaces the two buffers: 3 + 1 keys more/less.
    assert len(official) == len(state) + 3 - 1
    point = official["sam_prompt_encoder.point_embeddings.2.weight"]
    assert torch.equal(point[0], state["prompt_encoder.point_embed.weight"][2])
    back, sources, unmapped = official_to_hf(official)
    assert unmapped == [] and back.keys() == state.keys()
    assert all(torch.equal(back[key], state[key]) for key in state)
    assert sources["vision_encoder.neck.convs.1.weight"] == "image_encoder.neck.convs.1.conv.weight"


def test_differing_fourier_buffers_are_refused(tiny_official, tmp_path):
    tiny_official.model.shared_image_embedding.positional_embedding.add_(1.0)
    with pytest.raises(OfficialCheckpointError, match="must both exist and be equal"):
        export_official_checkpoint(tiny_official.model, tmp_path / "never.pt", str(tiny_official.config))
    assert not (tmp_path / "never.pt").exists()


def test_export_refuses_a_config_mismatch(tiny_model, tmp_path):
    expected = "differs from sam2_config='sam2.1_hiera_t'.*hidden_size: 96 != 24"
    with pytest.raises(OfficialCheckpointError, match=expected):
        export_official_checkpoint(tiny_model, tmp_path / "never.pt", "sam2.1_hiera_t")
    with pytest.raises(TypeError, match="merge adapters first"):
        export_official_checkpoint(torch.nn.Linear(1, 1), tmp_path / "never.pt", "sam2.1_hiera_t")


# --- loading ---------------------------------------------------------------------------------------------------

def test_load_maps_every_tensor(tiny_official):
    model = load_official_checkpoint(tiny_official.checkpoint, str(tiny_official.config))
    expected = tiny_official.model.state_dict()
    loaded = model.state_dict()
    assert loaded.keys() == expected.keys()
    assert all(torch.equal(loaded[key], expected[key]) for key in expected)
    assert model.config._name_or_path == str(tiny_official.checkpoint)


def test_load_sam2_reads_official_checkpoints(tiny_official):
    model = load_sam2(tiny_official.checkpoint, sam2_config=str(tiny_official.config), dtype=torch.bfloat16)
    assert model.vision_encoder.neck.convs[0].weight.dtype == torch.bfloat16
    assert not model.training


def test_video_only_keys_are_dropped_from_bare_state_dicts(tiny_official, tmp_path):
    bare = tmp_path / "bare.pt"
    torch.save({**tiny_official.state, "memory_attention.norm.weight": torch.ones(4), "no_obj_ptr": torch.ones(1, 4)},
               bare)
    model = load_official_checkpoint(bare, str(tiny_official.config))
    assert torch.equal(model.no_memory_embedding, tiny_official.model.no_memory_embedding)


def test_missing_unexpected_and_misshapen_keys_are_listed(tiny_official, tmp_path):
    state = dict(tiny_official.state)
    del state["sam_mask_decoder.conv_s0.bias"]
    state["sam_mask_decoder.extra_head.weight"] = torch.zeros(1)
    state["image_encoder.neck.convs.0.conv.bias"] = torch.zeros(7)
    broken = tmp_path / "broken.pt"
    torch.save({"model": state}, broken)
    with pytest.raises(OfficialCheckpointError) as error:
        load_official_checkpoint(broken, str(tiny_official.config))
    message = str(error.value)
    assert "3 problems" in message
    assert "missing: mask_decoder.conv_s0.bias" in message
    assert "unexpected: mask_decoder.extra_head.weight (from sam_mask_decoder.extra_head.weight)" in message
    assert "shape: vision_encoder.neck.convs.0.bias (from image_encoder.neck.convs.0.conv.bias) is (7,)" in message


def _pickled_code_ran(marker: str) -> str:
    with open(marker, "w") as file:
        file.write("ran")
    return marker


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (_pickled_code_ran, (self.marker,))


def test_pickled_objects_are_refused_without_running(tiny_official, tmp_path):
    marker = tmp_path / "marker"
    poisoned = tmp_path / "poisoned.pt"
    torch.save({"model": tiny_official.state, "extra": _Payload(str(marker))}, poisoned)
    with pytest.raises(OfficialCheckpointError, match="weights_only=True"):
        read_official_checkpoint(poisoned)
    assert not marker.exists()
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(OfficialCheckpointError, match="not a PyTorch checkpoint"):
        read_official_checkpoint(garbage)
    with pytest.raises(OfficialCheckpointError, match="no such checkpoint file"):
        read_official_checkpoint(tmp_path / "absent.pt")


# --- writing ---------------------------------------------------------------------------------------------------

def test_export_without_the_sam2_package_takes_video_modules_from_a_source(tiny_official, tmp_path, monkeypatch):
    monkeypatch.setattr(export, "_has_sam2", lambda: False)
    with pytest.raises(OfficialCheckpointError, match="pass video_source="):
        export_official_checkpoint(tiny_official.model, tmp_path / "never.pt", str(tiny_official.config))
    source = tmp_path / "source.pt"
    video = {"memory_encoder.out_proj.weight": torch.randn(4, 32, 1, 1), "no_obj_ptr": torch.randn(1, 32)}
    torch.save({"model": {**tiny_official.state, **video}}, source)
    path = export_official_checkpoint(tiny_official.model, tmp_path / "out.pt", str(tiny_official.config),
                                      video_source=source)
    written = torch.load(path, weights_only=True)["model"]
    expected = {**tiny_official.state, **video}
    assert written.keys() == expected.keys()
    assert all(torch.equal(written[key], expected[key]) for key in expected)


def test_convert_writes_a_plain_hf_folder(tiny_official, tmp_path):
    folder = convert_checkpoint(tiny_official.checkpoint, str(tiny_official.config), tmp_path / "hf")
    assert {p.name for p in folder.iterdir()} == {"config.json", "model.safetensors", "preprocessor_config.json"}
    reloaded = Sam2Model.from_pretrained(folder).state_dict()
    expected = tiny_official.model.state_dict()
    assert all(torch.equal(reloaded[key], expected[key]) for key in expected)


def test_merge_to_folder_folds_lora_into_an_hf_folder(tiny_official, tmp_path):
    torch.manual_seed(1)
    peft_model = get_peft_model(
        tiny_official.model, LoraConfig(r=2, target_modules=["qkv"], init_lora_weights=False)
    ).eval()
    pixels = torch.randn(1, 3, 128, 128, generator=torch.Generator().manual_seed(0))
    coords, labels = combine_prompts(boxes=torch.tensor([[10.0, 20.0, 90.0, 100.0]]))
    inputs = dict(pixel_values=pixels, image_index=torch.tensor([0]), point_coords=coords, point_labels=labels)
    with torch.no_grad():
        adapted = Sam2Segmenter(peft_model)(**inputs).mask_logits
        base = Sam2Segmenter(peft_model.get_base_model())
        with peft_model.disable_adapter():
            unadapted = base(**inputs).mask_logits
    folder = merge_to_folder(peft_model, tmp_path / "merged", format="hf")
    with torch.no_grad():
        merged = Sam2Segmenter(Sam2Model.from_pretrained(folder).eval())(**inputs).mask_logits
    assert (adapted - unadapted).abs().max() > 1e-3  # the adapter changes the output, so the check means something
    torch.testing.assert_close(merged, adapted, atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="format='onnx' is not one of"):
        merge_to_folder(tiny_official.model, tmp_path, format="onnx")


# --- against the official package ------------------------------------------------------------------------------

@needs_sam2
@pytest.mark.parametrize("name", OFFICIAL_CONFIGS)
def test_named_table_equals_the_shipped_yaml(name):
    assert official_to_hf_config(name).to_dict() == official_to_hf_config(official_yaml_path(name)).to_dict()


@needs_sam2
@pytest.mark.parametrize("name", ["sam2.1_hiera_t", "sam2.1_hiera_s", "sam2.1_hiera_b+", "sam2.1_hiera_l"])
def test_every_trunk_block_matches_the_official_one(name):
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    # Shapes alone cannot tell where global attention, windows and pooling are: compare them block by block.
    official = instantiate(OmegaConf.load(official_yaml_path(name)).model.image_encoder.trunk)
    with torch.device("meta"):
        ours = Sam2Model(official_to_hf_config(name)).vision_encoder.backbone
    assert len(ours.blocks) == len(official.blocks)
    for theirs, mine in zip(official.blocks, ours.blocks):
        stride = None if theirs.q_stride is None else list(theirs.q_stride)
        expected = (theirs.dim, theirs.dim_out, theirs.window_size, stride, theirs.attn.num_heads)
        got = (mine.dim, mine.dim_out, mine.window_size, None if mine.query_stride is None else list(mine.query_stride),
               mine.attn.num_attention_heads)
        assert got == expected
    assert tuple(ours.pos_embed.shape) == tuple(official.pos_embed.shape)


@pytest.fixture(scope="module")
def official_cases(tmp_path_factory):
    """Build (once per module and config) a perturbed official model, its checkpoint, and our conversion of it."""
    if not HAS_SAM2:
        pytest.skip("needs the official `sam2` package")
    cases = {}

    def get(name: str) -> SimpleNamespace:
        if name not in cases:
            cases[name] = _official_case(name, tmp_path_factory.mktemp(name))
        return cases[name]

    return get


# Non-square, with H < 1024 < W: our resize must scale each axis on its own, up and (antialiased) down.
IMAGE = np.random.default_rng(0).integers(0, 256, (768, 1280, 3), dtype=np.uint8)


def _official_case(name: str, folder) -> SimpleNamespace:
    from sam2.build_sam import build_sam2
    from sam2.sam2_image_predictor import SAM2ImagePredictor

    torch.manual_seed(0)
    official = build_sam2(f"configs/sam2.1/{name}.yaml", None, device="cpu")
    _perturb(official.state_dict(), seed=1)
    checkpoint = folder / f"{name}.pt"
    torch.save({"model": official.state_dict()}, checkpoint)
    model = load_official_checkpoint(checkpoint)  # config guessed from the file name
    predictor = SAM2ImagePredictor(official)
    predictor.set_image(IMAGE)
    # Our pixels, as `sam2-peft predict` makes them: the intensity code, then our resize and normalisation.
    preprocessor = Preprocessor.from_model(model)
    pixels = preprocessor.pixel_values(torch.from_numpy(normalize_intensity(IMAGE)))[None]
    segmenter = Sam2Segmenter(model)
    with torch.no_grad():
        features = segmenter.encode_images(pixels)
    return SimpleNamespace(official=official, checkpoint=checkpoint, predictor=predictor, model=model,
                           preprocessor=preprocessor, pixels=pixels, segmenter=segmenter, features=features)


# Three objects, in the image's pixels (x, y); the official predictor batches them.
BOXES = np.array([[100.0, 200.0, 600.0, 700.0], [700.0, 50.0, 1250.0, 400.0], [20.0, 400.0, 500.0, 760.0]])
POINTS = np.array([[[300.0, 400.0], [800.0, 100.0]], [[900.0, 200.0], [1000.0, 300.0]], [[100.0, 600.0], [400.0, 500.0]]])
POINT_LABELS = np.array([[1, 0], [1, 1], [1, 0]])
PROMPTS = {  # box, points, mask prompt (the low-res logits of a box prediction, as in interactive refinement)
    "box": (True, False, False),
    "points": (False, True, False),
    "box+points": (True, True, False),
    "points+mask": (False, True, True),
}


def _official_predict(case, **prompts) -> tuple[np.ndarray, np.ndarray, np.ndarray, torch.Tensor]:
    """`SAM2ImagePredictor.predict` logits (full size, IoU, low-res) and the object-score logits it computed."""
    scores = []
    hook = case.official.sam_mask_decoder.register_forward_hook(lambda module, args, out: scores.append(out[3]))
    try:
        masks, iou, low_res = case.predictor.predict(**prompts, return_logits=True)
    finally:
        hook.remove()
    return masks, iou, low_res, scores[0]


def _our_predict(case, boxes=None, points=None, labels=None, masks=None, multimask_output=True):
    """Our model on the same prompts, mapped to model-input pixels by our preprocessing."""
    size = IMAGE.shape[:2]
    scale = case.preprocessor.scale_coords
    boxes = None if boxes is None else scale(torch.as_tensor(boxes).reshape(-1, 2, 2), size).reshape(-1, 4)
    points = None if points is None else scale(torch.as_tensor(points), size)
    coords, point_labels = combine_prompts(boxes, points, None if labels is None else torch.as_tensor(labels))
    with torch.no_grad():
        return case.segmenter(image_features=case.features, image_index=torch.zeros(len(coords), dtype=torch.long),
                              point_coords=coords, point_labels=point_labels, multimask_output=multimask_output,
                              mask_inputs=None if masks is None else torch.as_tensor(masks))


@needs_sam2
@pytest.mark.parametrize("multimask", [True, False])
@pytest.mark.parametrize("prompt", PROMPTS)
@pytest.mark.parametrize("name", ["sam2.1_hiera_t", pytest.param("sam2.1_hiera_s", marks=pytest.mark.slow)])
def test_parity_with_the_official_image_predictor(official_cases, name, prompt, multimask):
    case = official_cases(name)
    use_box, use_points, use_mask = PROMPTS[prompt]
    official = dict(box=BOXES if use_box else None, multimask_output=multimask)
    if use_points:
        official.update(point_coords=POINTS, point_labels=POINT_LABELS)
    if use_mask:
        official["mask_input"] = _official_predict(case, box=BOXES, multimask_output=False)[2]
    _, official_iou, official_logits, official_objects = _official_predict(case, **official)
    ours = _our_predict(case, official["box"], official.get("point_coords"), official.get("point_labels"),
                        official.get("mask_input"), multimask)
    # Outputs far from constant, and object scores 10x the tolerance apart, so that agreement is informative.
    assert official_logits.std() > 0.05 and official_objects.std() > 1e-3
    # The predictor clamps its low-resolution logits to [-32, 32].
    torch.testing.assert_close(ours.mask_logits.clamp(-32.0, 32.0), torch.from_numpy(official_logits), atol=1e-4, rtol=0)
    torch.testing.assert_close(ours.iou_scores, torch.from_numpy(official_iou), atol=1e-4, rtol=0)
    torch.testing.assert_close(ours.object_score_logits, official_objects, atol=1e-4, rtol=0)


@needs_sam2
def test_our_preprocessing_equals_the_official_predictor_and_sam2_processor(official_cases):
    case = official_cases("sam2.1_hiera_t")
    # The official predictor's own transform of the image, which set_image encoded: float resize as ours.
    torch.testing.assert_close(case.pixels[0], case.predictor._transforms(IMAGE), atol=1e-5, rtol=0)
    processor = Sam2Processor(build_image_processor(case.model))
    inputs = processor(images=IMAGE, input_boxes=[BOXES.tolist()], input_points=[POINTS.tolist()],
                       input_labels=[POINT_LABELS.tolist()], return_tensors="pt")
    assert inputs["original_sizes"].tolist() == [[768, 1280]]
    # Sam2ImageProcessor resizes uint8 (rounding to whole levels) before normalising: at most one 8-bit level apart.
    assert (case.pixels - inputs["pixel_values"]).abs().max() <= 1 / 255 / min(case.preprocessor.image_std) + 1e-5
    # Prompt coordinates: ours, the processor's and the official predictor's map to the same model-input pixels.
    size = IMAGE.shape[:2]
    boxes = case.preprocessor.scale_coords(torch.as_tensor(BOXES).reshape(-1, 2, 2), size)
    points = case.preprocessor.scale_coords(torch.as_tensor(POINTS), size)
    torch.testing.assert_close(boxes.reshape(-1, 4), inputs["input_boxes"][0], atol=1e-4, rtol=0)
    torch.testing.assert_close(points, inputs["input_points"][0], atol=1e-4, rtol=0)
    _, official_points, _, official_boxes = case.predictor._prep_prompts(POINTS, POINT_LABELS, BOXES, None, True)
    torch.testing.assert_close(boxes, official_boxes, atol=1e-4, rtol=0)
    torch.testing.assert_close(points, official_points, atol=1e-4, rtol=0)


@needs_sam2
def test_masks_at_original_size_equal_post_process_masks_and_the_predictor(official_cases):
    case = official_cases("sam2.1_hiera_t")
    logits = _our_predict(case, BOXES).mask_logits  # (3 objects, 3 masks, 256, 256)
    geometry = {"image_index": torch.zeros(9, dtype=torch.long), "original_sizes": torch.tensor([IMAGE.shape[:2]])}
    ours = torch.stack(masks_at_original_size(logits.flatten(0, 1), geometry)).reshape(3, 3, 768, 1280)
    processor = Sam2Processor(build_image_processor(case.model))
    expected = processor.post_process_masks([logits], original_sizes=[[768, 1280]])[0]
    assert ours.shape == expected.shape == (3, 3, 768, 1280)
    assert torch.equal(ours, expected), f"{(ours != expected).sum()} pixels differ from Sam2Processor's masks"
    # The official predictor upsamples its own logits (ours agree to 1e-4): masks may differ only where |logit| < 1e-3.
    official = torch.from_numpy(_official_predict(case, box=BOXES)[0])
    disagree = ours != (official > 0)
    worst = official.abs().masked_fill(~disagree, 0.0).max()
    assert worst < 1e-3, f"{int(disagree.sum())} pixels differ from the predictor's, where its logits reach {worst:.3g}"


@needs_sam2
def test_export_round_trip_loads_strictly_in_build_sam2(official_cases, tmp_path):
    from sam2.build_sam import build_sam2

    case = official_cases("sam2.1_hiera_t")
    config = "configs/sam2.1/sam2.1_hiera_t.yaml"
    path = export_official_checkpoint(case.model, tmp_path / "out.pt", video_source=case.checkpoint)
    # build_sam2 loads strictly and raises on any missing or unexpected key.
    rebuilt = build_sam2(config, str(path), device="cpu").state_dict()
    original = case.official.state_dict()
    assert rebuilt.keys() == original.keys()
    # Every tensor is bit-identical, so the rebuilt model's outputs are those compared in the parity test.
    assert [key for key in original if not torch.equal(rebuilt[key], original[key])] == []

    fresh = export_official_checkpoint(case.model, tmp_path / "fresh.pt", "sam2.1_hiera_t")
    rebuilt = build_sam2(config, str(fresh), device="cpu").state_dict()
    assert all(torch.equal(rebuilt[key], original[key]) for key in original if not is_video_only(key))
    video = [key for key in original if is_video_only(key)]
    assert len(video) > 50 and not all(torch.equal(rebuilt[key], original[key]) for key in video)


@needs_sam2
def test_merge_to_folder_writes_a_loadable_official_checkpoint(official_cases, tmp_path):
    case = official_cases("sam2.1_hiera_t")
    model = Sam2Model(case.model.config)
    model.load_state_dict(case.model.state_dict())
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["qkv"], init_lora_weights=False))
    path = merge_to_folder(peft_model, tmp_path / "merged", format="sam2", video_source=case.checkpoint)
    assert path.name == "sam2.1_hiera_t.pt"
    merged = peft_model.get_base_model().state_dict()
    reloaded = load_official_checkpoint(path).state_dict()
    assert all(torch.equal(reloaded[key], merged[key]) for key in merged)
    qkv = "vision_encoder.backbone.blocks.0.attn.qkv.weight"
    assert not torch.equal(reloaded[qkv], case.model.state_dict()[qkv])  # the LoRA update is in the file


@needs_sam2
def test_export_refuses_a_config_the_official_package_cannot_build(tiny_official, tmp_path):
    # The tiny test YAML has no memory modules: build_sam2 could not load any checkpoint made for it.
    with pytest.raises(OfficialCheckpointError, match="cannot build this config"):
        export_official_checkpoint(tiny_official.model, tmp_path / "never.pt", str(tiny_official.config))


@needs_sam2
def test_merged_official_checkpoint_runs_in_the_image_predictor_like_the_unmerged_adapter(official_cases, tmp_path):
    from sam2.build_sam import build_sam2
    from sam2.sam2_image_predictor import SAM2ImagePredictor

    case = official_cases("sam2.1_hiera_t")
    model = Sam2Model(case.model.config)
    model.load_state_dict(case.model.state_dict())
    torch.manual_seed(2)
    peft_model = get_peft_model(
        model, LoraConfig(r=4, target_modules=["qkv", "q_proj", "v_proj"], init_lora_weights=False)
    ).eval()
    boxes = case.preprocessor.scale_coords(torch.as_tensor(BOXES).reshape(-1, 2, 2), IMAGE.shape[:2]).reshape(-1, 4)
    coords, point_labels = combine_prompts(boxes)
    with torch.no_grad():
        unmerged = Sam2Segmenter(peft_model)(case.pixels, image_index=torch.zeros(len(boxes), dtype=torch.long),
                                             point_coords=coords, point_labels=point_labels)
    checkpoint = merge_to_folder(peft_model, tmp_path, format="sam2", video_source=case.checkpoint)
    predictor = SAM2ImagePredictor(build_sam2("configs/sam2.1/sam2.1_hiera_t.yaml", str(checkpoint), device="cpu"))
    predictor.set_image(IMAGE)
    _, iou, logits = predictor.predict(box=BOXES, multimask_output=True, return_logits=True)
    _, _, base_logits = case.predictor.predict(box=BOXES, multimask_output=True, return_logits=True)
    assert np.abs(logits - base_logits).max() > 1e-2  # the adapter is in the merged file
    torch.testing.assert_close(unmerged.mask_logits.clamp(-32.0, 32.0), torch.from_numpy(logits), atol=1e-4, rtol=0)
    torch.testing.assert_close(unmerged.iou_scores, torch.from_numpy(iou), atol=1e-4, rtol=0)
