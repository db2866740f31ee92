"""ONNX export: onnxruntime on the exported pair against plain transformers on the merged model."""

import copy
import json
import sys

import numpy as np
import pytest
import torch
from peft import PeftModel
from transformers import Sam2ImageProcessor

import sam2_peft
from sam2_peft import apply_strategy, load_sam2
from sam2_peft.onnx_export import export_onnx

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

# As `adapter_preprocessing(model).data` gives it for an adapter trained on CT windows.
PREPROCESSING = {
    "intensity": "window", "intensity_percentiles": "0.5,99.5", "ct_window": "40,400", "mask_type": "instance",
    "num_classes": None,
}
BOX = [40.0, 50.0, 180.0, 200.0]
CLICKS = [[100.0, 120.0], [60.0, 70.0], [150.0, 90.0]]
# name -> (ONNX point_coords, point_labels, transformers' keyword arguments)
PROMPTS = {
    "click": ([[100.0, 120.0]], [1], dict(input_points=[[[[100.0, 120.0]]]], input_labels=[[[1]]])),
    "box": ([BOX[:2], BOX[2:]], [2, 3], dict(input_boxes=[[BOX]])),
    "box+clicks": (
        [BOX[:2], BOX[2:], *CLICKS], [2, 3, 1, 0, 1],
        dict(input_points=[[CLICKS]], input_labels=[[[1, 0, 1]]], input_boxes=[[BOX]]),
    ),
}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A LoRA model whose adapter changes encoder and decoder, exported once (float and int8)."""
    torch.manual_seed(0)
    model = apply_strategy(load_sam2("tiny-random"), "lora", init_lora_weights=False, decoder="adapter")
    state_before = {key: value.clone() for key, value in model.state_dict().items()}
    folder = export_onnx(model, tmp_path_factory.mktemp("onnx"), quantize="int8", preprocessing=PREPROCESSING)
    image = torch.randn(1, 3, 256, 256, generator=torch.Generator().manual_seed(1))
    return {
        "model": model,
        "state_before": state_before,
        "merged": copy.deepcopy(model).merge_and_unload().eval(),
        "folder": folder,
        "image": image,
        "mask": 3 * torch.randn(1, 1, 64, 64, generator=torch.Generator().manual_seed(2)),
        "sessions": {},  # filled by `_run`
    }


def _run(exported, prompt, with_mask, suffix=""):
    """The exported encoder then decoder (`suffix="_int8"`: the quantised pair) on the fixture's image."""
    if suffix not in exported["sessions"]:
        folder = exported["folder"]
        sessions = [
            ort.InferenceSession(str(folder / f"{name}{suffix}.onnx"), providers=["CPUExecutionProvider"])
            for name in ("encoder", "decoder")
        ]
        names = ["image_embed", "high_res_feat_0", "high_res_feat_1"]
        features = dict(zip(names, sessions[0].run(None, {"image": exported["image"].numpy()})))
        exported["sessions"][suffix] = features, sessions[1]
    features, decoder = exported["sessions"][suffix]
    coords, labels, _ = PROMPTS[prompt]
    inputs = features | {
        "point_coords": np.array([coords], np.float32),
        "point_labels": np.array([labels], np.int64),
        "mask_input": exported["mask"].numpy(),  # given either way: has_mask_input = 0 must ignore it
        "has_mask_input": np.full((1, 1), float(with_mask), np.float32),
    }
    return features, decoder.run(None, inputs)


def _reference(model, image, mask, prompt, with_mask):
    kwargs = {key: torch.tensor(value) for key, value in PROMPTS[prompt][2].items()}
    with torch.no_grad():
        return model(pixel_values=image, input_masks=mask if with_mask else None, multimask_output=True, **kwargs)


def test_encoder_matches_transformers(exported):
    features, _ = _run(exported, "click", False)
    # Sam2Model.forward's image_embeddings: conv_s0 / conv_s1 projections and the lowest level + no-memory embedding.
    reference = _reference(exported["merged"], exported["image"], None, "click", False)
    high_res_0, high_res_1, embed = reference.image_embeddings
    np.testing.assert_allclose(features["image_embed"], embed.numpy(), atol=1e-3)
    np.testing.assert_allclose(features["high_res_feat_0"], high_res_0.numpy(), atol=1e-3)
    np.testing.assert_allclose(features["high_res_feat_1"], high_res_1.numpy(), atol=1e-3)


@pytest.mark.parametrize("with_mask", [False, True], ids=["no-mask", "mask"])
@pytest.mark.parametrize("prompt", list(PROMPTS))
def test_decoder_matches_transformers(exported, prompt, with_mask):
    """N = 1, 2, 5 points through one decoder. transformers pads every prompt set with one not-a-point token (after
    the points, or as a box's third corner) as the official predictor does; so must the graph."""
    _, (masks, iou_predictions) = _run(exported, prompt, with_mask)
    reference = _reference(exported["merged"], exported["image"], exported["mask"], prompt, with_mask)
    assert masks.shape == (1, 3, 64, 64) and iou_predictions.shape == (1, 3)
    np.testing.assert_allclose(masks, reference.pred_masks[:, 0].numpy(), atol=1e-3)
    np.testing.assert_allclose(iou_predictions, reference.iou_scores[:, 0].numpy(), atol=1e-4)


def test_adapter_is_merged_and_caller_keeps_it(exported):
    model, merged, image = exported["model"], exported["merged"], exported["image"]
    base = _reference(load_sam2("tiny-random"), image, None, "box+clicks", False)
    tuned = _reference(merged, image, None, "box+clicks", False)
    assert (tuned.pred_masks - base.pred_masks).abs().max() > 0.1  # the adapter changes what the graphs must match
    assert isinstance(model, PeftModel)
    state = model.state_dict()
    assert state.keys() == exported["state_before"].keys()
    assert all(torch.equal(state[key], value) for key, value in exported["state_before"].items())


def test_metadata_and_graph_signature(exported):
    folder = exported["folder"]
    metadata = json.loads((folder / "metadata.json").read_text())
    processor = Sam2ImageProcessor()
    assert {key: metadata[key] for key in ("image_size", "embed_dim", "backbone_stride", "num_multimask_outputs")} == {
        "image_size": 256, "embed_dim": 64, "backbone_stride": 16, "num_multimask_outputs": 3,
    }
    assert metadata["mask_threshold"] == 0.0
    assert metadata["image_mean"] == pytest.approx(processor.image_mean)
    assert metadata["image_std"] == pytest.approx(processor.image_std)
    assert metadata["preprocessing"] == PREPROCESSING
    assert metadata["sam2_peft_version"] == sam2_peft.__version__
    assert metadata["files"]["int8"] == {"encoder": "encoder_int8.onnx", "decoder": "decoder_int8.onnx"}
    decoder = onnx.load(str(folder / "decoder.onnx"))
    assert metadata["opset"] == next(entry.version for entry in decoder.opset_import if entry.domain == "")
    inputs = {value.name: value.type.tensor_type for value in decoder.graph.input}
    assert list(inputs) == [
        "image_embed", "high_res_feat_0", "high_res_feat_1", "point_coords", "point_labels", "mask_input",
        "has_mask_input",
    ]
    assert inputs["point_labels"].elem_type == onnx.TensorProto.INT64
    assert [dim.dim_param or dim.dim_value for dim in inputs["point_coords"].shape.dim] == [1, "num_points", 2]
    assert [dim.dim_value for dim in inputs["mask_input"].shape.dim] == [1, 1, 64, 64]
    assert [output.name for output in decoder.graph.output] == ["low_res_masks", "iou_predictions"]


def test_int8_stays_close_to_float(exported):
    folder = exported["folder"]
    for name in ("encoder", "decoder"):
        quantised = onnx.load(str(folder / f"{name}_int8.onnx"))
        assert any(node.op_type == "MatMulInteger" for node in quantised.graph.node)
        assert (folder / f"{name}_int8.onnx").stat().st_size < 0.7 * (folder / f"{name}.onnx").stat().st_size
    for prompt in PROMPTS:
        _, (float_masks, float_iou) = _run(exported, prompt, False)
        _, (int8_masks, int8_iou) = _run(exported, prompt, False, suffix="_int8")
        object_float, object_int8 = float_masks > 0, int8_masks > 0
        mask_iou = (object_float & object_int8).sum((-2, -1)) / (object_float | object_int8).sum((-2, -1))
        # 0.91-0.98 here: the random model's second mask has logits of mean size 0.06, so int8's error (0.01)
        # flips the sign of some of its pixels; a trained model's logits are two orders of magnitude larger.
        assert mask_iou.min() > 0.85, (prompt, mask_iou)
        assert np.corrcoef(float_masks.ravel(), int8_masks.ravel())[0, 1] > 0.99
        np.testing.assert_allclose(int8_iou, float_iou, atol=0.01)


def test_bad_inputs_are_refused(tiny_model, tmp_path, monkeypatch):
    with pytest.raises(ValueError, match=r"quantize='fp16' is not supported; use one of \('int8',\)"):
        export_onnx(tiny_model, tmp_path, quantize="fp16")
    with pytest.raises(ValueError, match="opset=11 is out of range"):
        export_onnx(tiny_model, tmp_path, opset=11)
    with pytest.raises(TypeError, match="supports transformers' Sam2Model and a peft PeftModel around one.*Linear"):
        export_onnx(torch.nn.Linear(2, 2), tmp_path)
    with pytest.raises(TypeError, match="preprocessing must hold JSON values only"):
        export_onnx(tiny_model, tmp_path, preprocessing={"ct_window": object()})
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if not installed
    with pytest.raises(ImportError, match=r"needs the onnxruntime package: pip install sam2-peft\[onnx\]"):
        export_onnx(tiny_model, tmp_path)
    assert not any(tmp_path.iterdir())
