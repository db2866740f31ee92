"""Export SAM2, its adapter merged, as the encoder/decoder ONNX pair that SAM2 ONNX runtimes read.

    sam2-peft export --model facebook/sam2.1-hiera-tiny --adapter runs/ct/final --format onnx --output_dir onnx/

    from sam2_peft.onnx_export import export_onnx
    export_onnx(load_adapter(load_sam2("tiny-random"), "runs/ct/final"), "onnx/", quantize="int8")

The folder has the layout of the usual SAM2 exporters (samexporter, onnxruntime's SAM2 tools): the official
`SAM2ImagePredictor` cut where it caches an image's features, with these names:
- `encoder.onnx`: `image` (1, 3, S, S), pixels in [0, 1] normalised with ImageNet mean/std after a square resize to
  S (as `Sam2ImageProcessor`) -> `image_embed` (1, C, E, E), `high_res_feat_0` (1, C/8, 4E, 4E) and
  `high_res_feat_1` (1, C/4, 2E, 2E), E = S / 16: the features `SAM2ImagePredictor.set_image` keeps.
- `decoder.onnx`: those three, `point_coords` (1, N, 2) `x, y` in input pixels [0, S), `point_labels` (1, N) int64
  (1 positive, 0 negative, 2 and 3 a box's top-left and bottom-right corners, -1 not a point), `mask_input`
  (1, 1, 4E, 4E) logits of an earlier prediction and `has_mask_input` (1, 1) 1.0 or 0.0 -> `low_res_masks`
  (1, 3, 4E, 4E) logits and `iou_predictions` (1, 3). N is dynamic.
- `metadata.json`: sizes, normalisation, threshold, opset, and the adapter's preprocessing record.

The decoder appends SAM2's padding point (label -1) to the prompts itself, as the official predictor
(`SAM2ImagePredictor._predict` embeds every prompt, boxes included, as points with `pad=True`), samexporter and
onnxruntime's SAM2 exporter do, and as transformers' `Sam2PromptEncoder` does for points and for boxes alike: pass
clicks and box corners only. Dynamic int8 quantisation (`quantize="int8"`) writes `encoder_int8.onnx` and
`decoder_int8.onnx` beside the float pair (the file names of transformers.js' dtype variants), so the float pair
stays there as the reference and a runtime picks either.

The graphs are traced by PyTorch's TorchScript exporter (`torch.onnx.export(dynamo=False)`): on the tiny model it
gives the same outputs as the `torch.export`-based default in a fifth of the time or less (about 5 s against 25-40 s
on 2 CPU cores), and it needs no `onnxscript`. Its graphs match transformers to 1e-5 at hiera-tiny's size too
(1024 px, whose Hiera windows need padding). One image per call (batch 1), float32 in and out.
"""

from __future__ import annotations

import copy
import importlib
import json
import logging
import warnings
from pathlib import Path

import torch
from torch import nn
from transformers import Sam2Model

from sam2_peft.models import build_image_processor
from sam2_peft.segmenter import Sam2Segmenter

ENCODER_FILE, DECODER_FILE, METADATA_FILE = "encoder.onnx", "decoder.onnx", "metadata.json"
QUANTIZE_MODES = ("int8",)
DEFAULT_OPSET = 17  # LayerNormalization as one op; older than the exporter's 20, so more runtimes read it
MIN_OPSET = 14  # scaled_dot_product_attention
MAX_OPSET = 20  # the TorchScript exporter's newest
MASK_THRESHOLD = 0.0  # logits above it are the object, as `SAM2ImagePredictor.mask_threshold`
ENCODER_OUTPUTS = ("image_embed", "high_res_feat_0", "high_res_feat_1")
DECODER_INPUTS = (*ENCODER_OUTPUTS, "point_coords", "point_labels", "mask_input", "has_mask_input")
DECODER_OUTPUTS = ("low_res_masks", "iou_predictions")
NUM_POINTS_AXIS = "num_points"


class Sam2OnnxEncoder(nn.Module):
    """The image encoder as the decoder consumes it: Hiera + FPN neck, the decoder's own high-resolution
    projections, and the no-memory embedding that single images get (transformers' `Sam2Model.forward`)."""

    def __init__(self, model: Sam2Model):
        super().__init__()
        self.segmenter = Sam2Segmenter(model)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(1, 3, S, S) normalised image -> (1, C, E, E), (1, C/8, 4E, 4E), (1, C/4, 2E, 2E)."""
        high_res_feat_0, high_res_feat_1, image_embed = self.segmenter.project(self.segmenter.encode_images(image))
        # (1, 1, C) no-memory token, added to every (1, C, E, E) position
        image_embed = image_embed + self.segmenter.sam.no_memory_embedding.reshape(1, -1, 1, 1)
        return image_embed, high_res_feat_0, high_res_feat_1


class Sam2OnnxDecoder(nn.Module):
    """Prompt encoder + mask decoder for one prompt set on one image, with three (multimask) outputs."""

    def __init__(self, model: Sam2Model):
        super().__init__()
        self.sam = model

    def forward(
        self,
        image_embed: torch.Tensor,
        high_res_feat_0: torch.Tensor,
        high_res_feat_1: torch.Tensor,
        point_coords: torch.Tensor,
        point_labels: torch.Tensor,
        mask_input: torch.Tensor,
        has_mask_input: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """See the module docstring for the shapes; returns (1, 3, 4E, 4E) mask logits and (1, 3) IoU scores."""
        prompt_encoder = self.sam.prompt_encoder
        # (1, N, 2) -> (1, 1, N, 2): one prompt set. Without boxes the prompt encoder appends the padding point:
        # sparse (1, 1, N + 1, C); no_mask (1, C, E, E).
        sparse, no_mask = prompt_encoder(
            input_points=point_coords[:, None], input_labels=point_labels[:, None], input_boxes=None, input_masks=None
        )
        has_mask = has_mask_input.reshape(-1, 1, 1, 1)
        dense = has_mask * prompt_encoder.mask_embed(mask_input) + (1 - has_mask) * no_mask  # (1, C, E, E)
        masks, iou_scores, _, _ = self.sam.mask_decoder(
            image_embeddings=image_embed,
            image_positional_embeddings=self.sam.get_image_wide_positional_embeddings(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=True,
            high_resolution_features=[high_res_feat_0, high_res_feat_1],
        )
        return masks[:, 0], iou_scores[:, 0]  # (1, 1, 3, 4E, 4E) -> (1, 3, 4E, 4E); (1, 1, 3) -> (1, 3)


def export_onnx(
    model: nn.Module,
    output_dir: str | Path,
    *,
    quantize: str | None = None,
    preprocessing: dict | None = None,
    opset: int | None = None,
) -> Path:
    """Write `encoder.onnx`, `decoder.onnx` and `metadata.json` (see the module docstring) into `output_dir`.

    Args:
        model: a `Sam2Model`, or a `PeftModel` around one (`apply_strategy`, `load_adapter`): its adapter is
            merged (`merge_and_unload()`) into a copy, so `model` itself keeps it.
        output_dir: the folder to write (created if missing).
        quantize: `"int8"` to also write `encoder_int8.onnx` and `decoder_int8.onnx`, dynamically quantised by
            onnxruntime (int8 weights, activations quantised at run time); None for the float pair only.
        preprocessing: the adapter's preprocessing record (`adapter_preprocessing(model).data`), copied into
            `metadata.json` under `preprocessing`, for runtimes to prepare images as in training.
        opset: the ONNX opset, 14 to 20 (default 17).

    Returns:
        `output_dir`.

    Raises:
        ImportError: `onnx` or `onnxruntime` is not installed.
        TypeError: `model` is not a `Sam2Model` or a `PeftModel` around one.
        ValueError: an unknown `quantize` or an opset out of range.

    Example:
        >>> export_onnx(apply_strategy(load_sam2("tiny-random"), "lora"), "onnx/", quantize="int8")
        PosixPath('onnx')
    """
    if quantize is not None and quantize not in QUANTIZE_MODES:
        raise ValueError(f"quantize={quantize!r} is not supported; use one of {QUANTIZE_MODES} or None (float32).")
    opset = DEFAULT_OPSET if opset is None else opset
    if not isinstance(opset, int) or not MIN_OPSET <= opset <= MAX_OPSET:
        raise ValueError(f"opset={opset!r} is out of range: SAM2 exports with opsets {MIN_OPSET} to {MAX_OPSET}.")
    if preprocessing is not None:
        _check_json(preprocessing)
    _require_packages(["onnx", "onnxruntime"])
    sam = merged_sam2(model)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    size = sam.config.prompt_encoder_config.image_size
    image = torch.zeros(1, 3, size, size)
    encoder = Sam2OnnxEncoder(sam)
    with torch.no_grad():
        features = encoder(image)
    _export(encoder, (image,), output_dir / ENCODER_FILE, ["image"], list(ENCODER_OUTPUTS), {}, opset)
    _export(
        Sam2OnnxDecoder(sam),
        (*features, *_example_prompts(sam)),
        output_dir / DECODER_FILE,
        list(DECODER_INPUTS),
        list(DECODER_OUTPUTS),
        {"point_coords": {1: NUM_POINTS_AXIS}, "point_labels": {1: NUM_POINTS_AXIS}},
        opset,
    )
    for name in (ENCODER_FILE, DECODER_FILE):
        if quantize:
            quantize_int8(output_dir / name, output_dir / quantized_name(name))
        else:  # an earlier export's, which metadata.json would no longer list
            (output_dir / quantized_name(name)).unlink(missing_ok=True)
    metadata = build_metadata(sam, opset=opset, quantize=quantize, preprocessing=preprocessing)
    (output_dir / METADATA_FILE).write_text(json.dumps(metadata, indent=2) + "\n")
    return output_dir


def merged_sam2(model: nn.Module) -> Sam2Model:
    """A float32, CPU, eval-mode copy of `model` with any PEFT adapter merged in; `model` is left as it is."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not isinstance(base, Sam2Model):
        raise TypeError(
            f"export_onnx supports transformers' Sam2Model and a peft PeftModel around one (from apply_strategy or "
            f"load_adapter), got {type(base).__name__}; load the image model with `load_sam2(name)`."
        )
    sam = copy.deepcopy(model)
    if hasattr(sam, "merge_and_unload"):
        sam = sam.merge_and_unload()
    return sam.to("cpu", torch.float32).eval()


def quantized_name(file_name: str) -> str:
    """`encoder.onnx` -> `encoder_int8.onnx`."""
    return file_name.replace(".onnx", "_int8.onnx")


def quantize_int8(source: Path, target: Path) -> None:
    """Dynamic int8 quantisation of `source`'s MatMul and Gemm weights, per output channel (onnxruntime's
    `quantize_dynamic`); activations are quantised at run time."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # onnxruntime logs a request to run `quant_pre_process` first; its optimisation step is the one `_export` ran
    # already, and its symbolic shape inference cannot resolve the decoder's dynamic N.
    quiet = _DropMessage("Please consider to run pre-processing before quantization")
    logging.getLogger().addFilter(quiet)
    try:
        # Convolutions stay float: onnxruntime's CPU ConvInteger takes no int8 weights, and in SAM2 they carry
        # little of the compute (patch embedding, mask downscaling, the decoder's upscaling). One scale per output
        # channel halves the error of one per tensor.
        quantize_dynamic(
            source, target, op_types_to_quantize=["MatMul", "Gemm"], weight_type=QuantType.QInt8, per_channel=True
        )
    finally:
        logging.getLogger().removeFilter(quiet)


def build_metadata(sam: Sam2Model, *, opset: int, quantize: str | None, preprocessing: dict | None) -> dict:
    """What a runtime needs besides the graphs: sizes, image normalisation, mask threshold, provenance."""
    from sam2_peft import __version__

    processor = build_image_processor(sam)
    prompt_config = sam.config.prompt_encoder_config
    files = {"float32": {"encoder": ENCODER_FILE, "decoder": DECODER_FILE}}
    if quantize:
        files[quantize] = {"encoder": quantized_name(ENCODER_FILE), "decoder": quantized_name(DECODER_FILE)}
    metadata = {
        "image_size": prompt_config.image_size,
        "embed_dim": sam.config.mask_decoder_config.hidden_size,
        "backbone_stride": prompt_config.patch_size,
        "num_multimask_outputs": sam.config.mask_decoder_config.num_multimask_outputs,
        "mask_threshold": MASK_THRESHOLD,
        "image_mean": list(processor.image_mean),
        "image_std": list(processor.image_std),
        "rescale_factor": processor.rescale_factor,
        "resize": "square",
        "decoder_appends_padding_point": True,
        "files": files,
        "opset": opset,
        "sam2_peft_version": __version__,
    }
    if preprocessing is not None:
        metadata["preprocessing"] = preprocessing
    return metadata


def _example_prompts(sam: Sam2Model) -> tuple[torch.Tensor, ...]:
    """Decoder example inputs: a box and a click (N = 3, so that nothing is traced as specific to one point)."""
    side = 4 * sam.prompt_encoder.image_embedding_size[0]
    coords = torch.tensor([[[10.0, 10.0], [100.0, 100.0], [50.0, 50.0]]])
    labels = torch.tensor([[2, 3, 1]])
    return coords, labels, torch.zeros(1, 1, side, side), torch.zeros(1, 1)


def _export(module, args, path, input_names, output_names, dynamic_axes, opset) -> None:
    import onnx

    with warnings.catch_warnings():
        # The TorchScript exporter is chosen on purpose (module docstring); its trace of transformers' mask decoder
        # reads one static batch size as a Python bool, which is right for these one-image graphs.
        warnings.filterwarnings("ignore", message="You are using the legacy TorchScript-based ONNX export")
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message="Constant folding - Only steps=1 can be constant folded")
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.onnx")
        with torch.no_grad():
            torch.onnx.export(
                module, args, str(path), input_names=input_names, output_names=output_names,
                dynamic_axes=dynamic_axes, opset_version=opset, dynamo=False,
            )
    _fold_constants(path)
    onnx.checker.check_model(str(path))


def _fold_constants(path: Path) -> None:
    """Rewrite `path` with onnxruntime's basic graph optimisations, which stay plain ONNX (constant folding,
    redundant-node removal): the TorchScript exporter leaves shape arithmetic on constants in the graph (Hiera's
    positional-embedding tiling becomes an `If`), which onnxruntime would otherwise fold at every load, logging a
    shape-merge warning each time. Halves the node count."""
    import onnx
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_BASIC
    folded = path.with_suffix(".folded.onnx")
    options.optimized_model_filepath = str(folded)
    options.log_severity_level = 3  # this session would log the warning that the fold removes
    onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    model = onnx.load(str(folded))
    folded.unlink()
    # onnxruntime declares all its operator domains; keep those the graph uses.
    used = [entry for entry in model.opset_import if entry.domain in {"", *(node.domain for node in model.graph.node)}]
    del model.opset_import[:]
    model.opset_import.extend(used)
    onnx.save(model, str(path))


def _check_json(preprocessing: dict) -> None:
    if not isinstance(preprocessing, dict):
        raise TypeError(f"preprocessing must be a dict (the adapter's record), got {type(preprocessing).__name__}.")
    try:
        json.dumps(preprocessing)
    except (TypeError, ValueError) as err:
        raise TypeError(f"preprocessing must hold JSON values only (it goes into metadata.json): {err}") from err


class _DropMessage(logging.Filter):
    def __init__(self, text: str):
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


def _require_packages(names: list[str]) -> None:
    missing = []
    for name in names:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise ImportError(
            f"ONNX export needs the {' and '.join(missing)} package{'s' if len(missing) > 1 else ''}: "
            "pip install sam2-peft[onnx]"
        )
