"""The `sam2-peft` commands that use a trained model: predict, segment, track, export, demo.

    sam2-peft predict --model M [--adapter NAME=A ...] [--domain NAME] --image IMG --box X1,Y1,X2,Y2 --output PNG
    sam2-peft segment --model M [--adapter A] --image IMG --output OUT.png [--points_per_side N ...]
    sam2-peft track   --model M [--adapter A] --video PATH --box X1,Y1,X2,Y2 [--box ...] [--frame F] --output DIR
    sam2-peft export  --model M [--adapter A] --format onnx --output_dir DIR [--quantize int8]
    sam2-peft demo    --model M [--adapter [NAME=]PATH ...] [--host 127.0.0.1] [--port 7860]
"""

from __future__ import annotations

import argparse

from sam2_peft.errors import ConfigError

DESCRIPTIONS = {
    "predict": "segment boxes in an image file, choosing a domain's adapter with --domain",
    "segment": "segment everything in an image with a point grid (automatic masks)",
    "track": "track boxed (or clicked) objects through a frame folder or a NIfTI volume with SAM2's memory",
    "export": "export a model (and adapter, merged) as ONNX: encoder.onnx, decoder.onnx, metadata.json",
    "demo": "a local web page: the base model's and an adapter's masks side by side (needs sam2-peft[demo])",
}

def _export(args: list[str]) -> None:
    from sam2_peft.hub import adapter_preprocessing, load_adapter
    from sam2_peft.models import load_sam2
    from sam2_peft.onnx_export import QUANTIZE_MODES, export_onnx

    parser = argparse.ArgumentParser(prog="sam2-peft export", description=DESCRIPTIONS["export"])
    parser.add_argument("--model", required=True, help="base model: Hub id, local folder, official .pt or tiny-random")
    parser.add_argument("--adapter", default=None, help="adapter folder (e.g. DIR/final) or Hub id, merged in")
    parser.add_argument("--format", default="onnx", choices=["onnx"])
    parser.add_argument("--output_dir", required=True)
    parser.add_argument(
        "--quantize", default=None, choices=QUANTIZE_MODES,
        help="also write a dynamically quantised pair (encoder_int8.onnx, decoder_int8.onnx)",
    )
    parser.add_argument("--opset", type=int, default=None, help="ONNX opset, 14 to 20 (default 17)")
    parser.add_argument("--sam2_config", default=None, help="official config name for a .pt --model (guessed if unset)")
    parser.add_argument("--revision", default=None, help="adapter revision on the Hub")
    add_hub_kernels_flag(parser)
    parsed = parser.parse_args(args)
    model = load_sam2(parsed.model, sam2_config=parsed.sam2_config, hub_kernels=parsed.hub_kernels)
    preprocessing = None
    if parsed.adapter is not None:
        model = load_adapter(model, parsed.adapter, revision=parsed.revision)  # refuses another base's adapter
        record = adapter_preprocessing(model)
        preprocessing = None if record is None else record.data
    path = export_onnx(model, parsed.output_dir, quantize=parsed.quantize, preprocessing=preprocessing,
                       opset=parsed.opset)
    print(f"ONNX encoder, decoder and metadata.json written to {path}")


def _predict(args: list[str]) -> None:
    from sam2_peft.data.config import build_data_parser, parse_data_args
    from sam2_peft.hub import DomainAdapters, load_adapter
    from sam2_peft.models import load_sam2
    from sam2_peft.prediction import save_label_map, segment_image

    parser = build_data_parser("sam2-peft predict", DESCRIPTIONS["predict"])
    parser.add_argument("--model", required=True)
    parser.add_argument(
        "--adapter", action="append", default=[], metavar="[NAME=]PATH",
        help="adapter folder or Hub id; repeat with NAME=PATH to register several domains",
    )
    parser.add_argument("--domain", default=None, help="which registered adapter to use")
    parser.add_argument("--image", required=True)
    parser.add_argument("--box", action="append", required=True, metavar="X1,Y1,X2,Y2", help="repeat for more objects")
    parser.add_argument("--output", required=True, help="label-map PNG to write (object i has value i)")
    add_hub_kernels_flag(parser)
    data, parsed = parse_data_args(parser, args)
    boxes = [parse_numbers(box, 4, "--box", "x1,y1,x2,y2") for box in parsed.box]
    model = load_sam2(parsed.model, hub_kernels=parsed.hub_kernels)
    named = [spec.split("=", 1) if "=" in spec else (None, spec) for spec in parsed.adapter]
    if any(name for name, _ in named):
        model = DomainAdapters(model)
        for name, path in named:
            if name is None:
                raise ConfigError(f"--adapter {path}: name every adapter (NAME=PATH) when registering domains.")
            model.add(name, path)
    elif named:
        if len(named) > 1 or parsed.domain:
            raise ConfigError("Several adapters or --domain need names: --adapter NAME=PATH.")
        model = load_adapter(model, named[0][1])
    labels = segment_image(model, parsed.image, boxes, domain=parsed.domain, data=data)
    path = save_label_map(labels, parsed.output)
    print(f"{len(boxes)} object(s): {[int((labels == i + 1).sum()) for i in range(len(boxes))]} pixels; wrote {path}")


def _segment(args: list[str]) -> None:
    from sam2_peft.automatic import generate_masks, label_map, load_pixels, save_overlay
    from sam2_peft.data.config import build_data_parser, parse_data_args
    from sam2_peft.hub import adapter_preprocessing, load_adapter, resolve_data_config
    from sam2_peft.models import load_sam2
    from sam2_peft.prediction import save_label_map

    parser = build_data_parser("sam2-peft segment", DESCRIPTIONS["segment"])
    parser.add_argument("--model", required=True, help="Hub id, local folder, official .pt, or tiny-random")
    parser.add_argument("--adapter", default=None, help="a run's final/ folder or an adapter on the Hub")
    parser.add_argument("--image", required=True)
    parser.add_argument("--output", required=True, help="16-bit label-map PNG (mask i has value i + 1); "
                                                        "OUT_overlay.png is written beside it")
    add_generator_flags(parser)
    add_hub_kernels_flag(parser)
    data, parsed = parse_data_args(parser, args)
    model = load_sam2(parsed.model, hub_kernels=parsed.hub_kernels)
    if parsed.adapter is not None:
        model = load_adapter(model, parsed.adapter)
    config = resolve_data_config(data, adapter_preprocessing(model) if parsed.adapter else None,
                                 where=f"--adapter {parsed.adapter}")
    pixels = load_pixels(parsed.image, config.intensity_config())
    masks = generate_masks(model, pixels, **generator_options(parsed))
    labels = label_map(masks, pixels.shape[-2:])
    path = save_label_map(labels, parsed.output)
    overlay = save_overlay(pixels, labels, path.with_name(f"{path.stem}_overlay.png"))
    print(f"{len(masks)} mask(s), {int((labels > 0).sum())} pixels labelled; wrote {path} and {overlay}")


def _track(args: list[str]) -> None:
    from sam2_peft.data.config import build_data_parser, parse_data_args
    from sam2_peft.hub import adapter_preprocessing, load_adapted, resolve_data_config
    from sam2_peft.models import load_sam2
    from sam2_peft.video.tracking import track_video

    parser = build_data_parser("sam2-peft track", DESCRIPTIONS["track"])
    parser.add_argument("--model", required=True, help="Hub id, local folder, official .pt, or tiny-random-video")
    parser.add_argument("--adapter", default=None, help="a run's final/ folder or an adapter on the Hub")
    parser.add_argument("--video", required=True,
                        help="a folder of frames (natural order of the names) or a NIfTI volume")
    parser.add_argument("--box", action="append", default=[], metavar="X1,Y1,X2,Y2",
                        help="an object's box on --frame, in its pixels; repeat for more objects")
    parser.add_argument("--point", action="append", default=[], metavar="X,Y",
                        help="an object's positive click on --frame; repeat for more objects (after the boxes)")
    parser.add_argument("--frame", type=int, default=0, help="the frame the prompts are on (earlier frames stay empty)")
    parser.add_argument("--output", required=True, help="folder for <frame>.png label maps (object i = value i) "
                                                        "and overlay.png")
    add_hub_kernels_flag(parser)
    data, parsed = parse_data_args(parser, args)
    boxes = [parse_numbers(box, 4, "--box", "x1,y1,x2,y2") for box in parsed.box]
    points = [parse_numbers(point, 2, "--point", "x,y") for point in parsed.point]
    if parsed.adapter is None:
        model = load_sam2(parsed.model, video=True, hub_kernels=parsed.hub_kernels)
    else:
        model = load_adapted(parsed.model, parsed.adapter, video=True, hub_kernels=parsed.hub_kernels)
    config = resolve_data_config(data, adapter_preprocessing(model) if parsed.adapter else None,
                                 where=f"--adapter {parsed.adapter}")
    tracking = track_video(model, parsed.video, boxes=boxes, points=points, frame=parsed.frame,
                           intensity=config.intensity_config(), nifti_axis=config.nifti_axis)
    path = tracking.save(parsed.output)
    found = [int((tracking.labels == value).any(axis=(1, 2)).sum()) for value in range(1, len(boxes) + len(points) + 1)]
    print(f"{len(tracking.frame_names)} frames; object(s) found on {found} frames; wrote {path}")


def parse_numbers(text: str, count: int, flag: str, form: str) -> tuple[float, ...]:
    """`"10,20,30,40"` -> (10.0, 20.0, 30.0, 40.0), refusing anything but `count` numbers with the flag named."""
    try:
        values = tuple(float(value) for value in text.split(","))
    except ValueError:
        values = ()
    if len(values) != count:
        raise ConfigError(f"{flag} {text}: expected {count} comma-separated numbers {form}.")
    return values


def _demo(args: list[str]) -> None:
    from sam2_peft.demo import main as demo_main

    demo_main(args)


# The point-grid generator's flags (`segment`, `eval --prompt everything`) and their defaults, as SAM's.
GENERATOR_FLAGS = {
    "points_per_side": (int, 32, "grid points per side (points_per_side^2 click prompts)"),
    "points_per_batch": (int, 64, "prompts per decoder run (memory)"),
    "pred_iou_thresh": (float, 0.88, "keep masks whose predicted IoU is above this"),
    "stability_score_thresh": (float, 0.95, "keep masks at least this stable"),
    "stability_score_offset": (float, 1.0, "logit offset of the stability score"),
    "box_nms_thresh": (float, 0.7, "box IoU above which duplicate masks are dropped"),
    "min_mask_region_area": (int, 0, "fill holes and drop islands under this many pixels (needs scipy); 0: off"),
}


def add_generator_flags(parser: argparse.ArgumentParser) -> None:
    for name, (kind, default, text) in GENERATOR_FLAGS.items():
        parser.add_argument(f"--{name}", type=kind, default=default, help=text)


def generator_options(parsed: argparse.Namespace) -> dict:
    return {name: getattr(parsed, name) for name in GENERATOR_FLAGS}


def add_hub_kernels_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--hub_kernels", action="store_true",
        help="let transformers download compiled kernels from the Hub (kernels-community/*) and swap them in on "
             "CUDA; off: plain PyTorch layers, nothing fetched at run time",
    )




HANDLERS = {"predict": _predict, "segment": _segment, "track": _track, "export": _export, "demo": _demo}
