"""The `sam2-peft` command.

    sam2-peft train    --config FILE.yaml [--<field> VALUE ...] --output_dir DIR
    sam2-peft eval     --model M [--adapter A] --data D [--prompt box|point|points:K] [--output_dir DIR]
    sam2-peft merge    --model M --adapter A --output_dir DIR [--format hf|sam2]
    sam2-peft push     ADAPTER_DIR --repo_id USER/NAME [--private] [--revision REV]
    sam2-peft convert  --sam2_checkpoint FILE.pt --sam2_config NAME --output_dir DIR
    sam2-peft export   --model M [--adapter A] --format onnx --output_dir DIR [--quantize int8]
    sam2-peft data     DIR [--mask_type instance|semantic]
    sam2-peft predict  --model M [--adapter NAME=A ...] [--domain NAME] --image IMG --box X1,Y1,X2,Y2 --output PNG
    sam2-peft segment  --model M [--adapter A] --image IMG --output OUT.png [--points_per_side N ...]
    sam2-peft demo     --model M [--adapter [NAME=]PATH ...] [--host 127.0.0.1] [--port 7860]
"""

from __future__ import annotations

import argparse
import logging
import sys

from sam2_peft.errors import ConfigError, run_command

COMMANDS = {
    "train": "fine-tune SAM2 (fields from --config YAML, overridden by --<field> VALUE)",
    "eval": "evaluate a model (and adapter) on a dataset with a fixed prompt protocol",
    "compare": "train the four strategies with one budget and tabulate cost and accuracy",
    "merge": "fold an adapter into its base: a Hugging Face folder or an official sam2 checkpoint",
    "push": "upload an adapter folder to the Hugging Face Hub",
    "convert": "convert an official sam2 checkpoint (.pt) into a Hugging Face model folder",
    "export": "export a model (and adapter, merged) as ONNX: encoder.onnx, decoder.onnx, metadata.json",
    "data": "check a dataset: images, objects, and what would be skipped and why",
    "predict": "segment boxes in an image file, choosing a domain's adapter with --domain",
    "segment": "segment everything in an image with a point grid (automatic masks)",
    "demo": "a local web page: the base model's and an adapter's masks side by side (needs sam2-peft[demo])",
}


def _train(args: list[str]) -> None:
    from sam2_peft.config import parse_config
    from sam2_peft.finetune import finetune

    metrics = finetune(parse_config(args))
    baseline, best = metrics["baseline"], metrics["best"]
    if baseline is not None:
        print(f"Dice before: {baseline['dice']:.4f}  after (best, step {metrics['best_step']}): {best['dice']:.4f}")


def _data(args: list[str]) -> None:
    from sam2_peft.data import inspect_dataset
    from sam2_peft.data.config import build_data_parser, parse_data_args

    parser = build_data_parser("sam2-peft data", COMMANDS["data"])
    parser.add_argument("source", nargs="?", default=None, help="the same as --data")
    data, extra = parse_data_args(parser, args)
    data = data.resolved()
    report = inspect_dataset(
        extra.source or data.data,
        mask_type=data.mask_type,
        num_classes=data.num_classes,
        min_object_area=data.min_object_area,
        keep_empty_images=data.keep_empty_images,
        image_column=data.image_column,
        mask_column=data.mask_column,
        train_split=data.train_split,
        val_split=data.val_split,
        val_fraction=data.val_fraction,
        nifti_axis=data.nifti_axis,
    )
    print(report.format())


def _merge(args: list[str]) -> None:
    from sam2_peft.export import merge_to_folder
    from sam2_peft.hub import load_adapter
    from sam2_peft.models import load_sam2

    parser = argparse.ArgumentParser(prog="sam2-peft merge", description=COMMANDS["merge"])
    parser.add_argument("--model", required=True, help="base model: Hub id, local folder or official .pt")
    parser.add_argument("--adapter", required=True, help="adapter folder (e.g. DIR/final) or Hub id")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--format", default="hf", choices=["hf", "sam2"])
    parser.add_argument("--sam2_config", default=None, help="official config name for --format sam2 (guessed if unset)")
    parser.add_argument("--revision", default=None, help="adapter revision on the Hub")
    parser.add_argument(
        "--video_source", default=None, help="--format sam2: official checkpoint to copy the video-only modules from"
    )
    _add_hub_kernels_flag(parser)
    parsed = parser.parse_args(args)
    base = load_sam2(parsed.model, sam2_config=parsed.sam2_config, hub_kernels=parsed.hub_kernels)
    model = load_adapter(base, parsed.adapter, revision=parsed.revision)
    path = merge_to_folder(
        model, parsed.output_dir, format=parsed.format, sam2_config=parsed.sam2_config, video_source=parsed.video_source
    )
    print(f"Merged model written to {path}")


def _push(args: list[str]) -> None:
    from sam2_peft.hub import push_adapter

    parser = argparse.ArgumentParser(prog="sam2-peft push", description=COMMANDS["push"])
    parser.add_argument("adapter_dir")
    parser.add_argument("--repo_id", required=True, help="USER/NAME")
    parser.add_argument("--private", action="store_true")
    parser.add_argument("--revision", default=None, help="branch to push to (created if missing)")
    parser.add_argument("--commit_message", default=None)
    parser.add_argument("--include_checkpoints", action="store_true", help="also upload checkpoints/ (large)")
    parsed = parser.parse_args(args)
    info = push_adapter(
        parsed.adapter_dir,
        parsed.repo_id,
        private=parsed.private,
        revision=parsed.revision,
        commit_message=parsed.commit_message,
        include_checkpoints=parsed.include_checkpoints,
    )
    print(f"Pushed: {info}")


def _convert(args: list[str]) -> None:
    from sam2_peft.export import convert_checkpoint

    parser = argparse.ArgumentParser(prog="sam2-peft convert", description=COMMANDS["convert"])
    parser.add_argument("--sam2_checkpoint", required=True, help="official checkpoint, e.g. sam2.1_hiera_tiny.pt")
    parser.add_argument("--sam2_config", default=None, help="sam2.1_hiera_t|s|b+|l, sam2_hiera_*, or a YAML path")
    parser.add_argument("--output_dir", required=True)
    parsed = parser.parse_args(args)
    path = convert_checkpoint(parsed.sam2_checkpoint, parsed.sam2_config, parsed.output_dir)
    print(f"Hugging Face model folder written to {path}")


def _export(args: list[str]) -> None:
    from sam2_peft.hub import adapter_preprocessing, load_adapter
    from sam2_peft.models import load_sam2
    from sam2_peft.onnx_export import QUANTIZE_MODES, export_onnx

    parser = argparse.ArgumentParser(prog="sam2-peft export", description=COMMANDS["export"])
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
    _add_hub_kernels_flag(parser)
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


def _eval(args: list[str]) -> None:
    from sam2_peft.data.config import build_data_parser, parse_data_args
    from sam2_peft.evaluation import evaluate_model

    parser = build_data_parser("sam2-peft eval", COMMANDS["eval"])
    parser.add_argument("--model", required=True, help="Hub id, local folder, official .pt, or tiny-random")
    parser.add_argument("--adapter", default=None, help="a run's final/ folder or an adapter on the Hub")
    parser.add_argument("--prompt", default="box", help="box, point, points:K, or everything (automatic masks "
                        "matched to the instances: precision, recall, F1 at --match_iou, mean matched IoU)")
    parser.add_argument("--match_iou", type=float, default=0.5, help="--prompt everything: IoU for a match")
    parser.add_argument("--correction_clicks", type=int, default=0, help="correction clicks after the first prompt")
    parser.add_argument("--split", default=None, help="split to score (default: test if present, else val)")
    parser.add_argument("--output_dir", default=None, help="where metrics.json, per_object.csv, overlays.png go")
    parser.add_argument("--no_baseline", action="store_true", help="skip the zero-shot base model")
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--seed", type=int, default=42, help="prompt seed; the training seed gives the same val split")
    parser.add_argument("--revision", default=None, help="base model revision")
    parser.add_argument("--adapter_revision", default=None)
    parser.add_argument("--sam2_config", default=None, help="official config name for a .pt --model")
    _add_hub_kernels_flag(parser)
    _add_generator_flags(parser)
    data, parsed = parse_data_args(parser, args)
    evaluate_model(
        parsed.model,
        data,
        adapter=parsed.adapter,
        revision=parsed.revision,
        sam2_config=parsed.sam2_config,
        adapter_revision=parsed.adapter_revision,
        prompt=parsed.prompt,
        correction_clicks=parsed.correction_clicks,
        split=parsed.split,
        batch_size=parsed.batch_size,
        output_dir=parsed.output_dir,
        baseline=not parsed.no_baseline,
        seed=parsed.seed,
        hub_kernels=parsed.hub_kernels,
        everything={**_generator_options(parsed), "iou_threshold": parsed.match_iou},
    )


def _compare(args: list[str]) -> None:
    from sam2_peft.comparison import compare_strategies, parse_strategies
    from sam2_peft.config import parse_config

    parser = argparse.ArgumentParser(prog="sam2-peft compare", description=COMMANDS["compare"], add_help=False)
    parser.add_argument(
        "--strategies",
        default="decoder,partial:num_blocks=2,full,lora:lora_r=4,lora:lora_r=16",
        help="comma-separated strategies, each optionally with ':field=value' overrides",
    )
    parsed, rest = parser.parse_known_args(args)
    if {"-h", "--help"} & set(rest):
        print(parser.format_help())  # then the training fields' help, from parse_config
    cfg = parse_config(rest)
    compare_strategies(cfg, parse_strategies(parsed.strategies), cfg.output_dir)


def _predict(args: list[str]) -> None:
    from sam2_peft.data.config import build_data_parser, parse_data_args
    from sam2_peft.hub import DomainAdapters, load_adapter
    from sam2_peft.models import load_sam2
    from sam2_peft.prediction import save_label_map, segment_image

    parser = build_data_parser("sam2-peft predict", COMMANDS["predict"])
    parser.add_argument("--model", required=True)
    parser.add_argument(
        "--adapter", action="append", default=[], metavar="[NAME=]PATH",
        help="adapter folder or Hub id; repeat with NAME=PATH to register several domains",
    )
    parser.add_argument("--domain", default=None, help="which registered adapter to use")
    parser.add_argument("--image", required=True)
    parser.add_argument("--box", action="append", required=True, metavar="X1,Y1,X2,Y2", help="repeat for more objects")
    parser.add_argument("--output", required=True, help="label-map PNG to write (object i has value i)")
    _add_hub_kernels_flag(parser)
    data, parsed = parse_data_args(parser, args)
    boxes = []
    for box in parsed.box:
        try:
            x1, y1, x2, y2 = (float(value) for value in box.split(","))
        except ValueError:
            raise ConfigError(f"--box {box}: expected four comma-separated numbers x1,y1,x2,y2.") from None
        boxes.append((x1, y1, x2, y2))
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

    parser = build_data_parser("sam2-peft segment", COMMANDS["segment"])
    parser.add_argument("--model", required=True, help="Hub id, local folder, official .pt, or tiny-random")
    parser.add_argument("--adapter", default=None, help="a run's final/ folder or an adapter on the Hub")
    parser.add_argument("--image", required=True)
    parser.add_argument("--output", required=True, help="16-bit label-map PNG (mask i has value i + 1); "
                                                        "OUT_overlay.png is written beside it")
    _add_generator_flags(parser)
    _add_hub_kernels_flag(parser)
    data, parsed = parse_data_args(parser, args)
    model = load_sam2(parsed.model, hub_kernels=parsed.hub_kernels)
    if parsed.adapter is not None:
        model = load_adapter(model, parsed.adapter)
    config = resolve_data_config(data, adapter_preprocessing(model) if parsed.adapter else None,
                                 where=f"--adapter {parsed.adapter}")
    pixels = load_pixels(parsed.image, config.intensity_config())
    masks = generate_masks(model, pixels, **_generator_options(parsed))
    labels = label_map(masks, pixels.shape[-2:])
    path = save_label_map(labels, parsed.output)
    overlay = save_overlay(pixels, labels, path.with_name(f"{path.stem}_overlay.png"))
    print(f"{len(masks)} mask(s), {int((labels > 0).sum())} pixels labelled; wrote {path} and {overlay}")


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


def _add_generator_flags(parser: argparse.ArgumentParser) -> None:
    for name, (kind, default, text) in GENERATOR_FLAGS.items():
        parser.add_argument(f"--{name}", type=kind, default=default, help=text)


def _generator_options(parsed: argparse.Namespace) -> dict:
    return {name: getattr(parsed, name) for name in GENERATOR_FLAGS}


def _add_hub_kernels_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--hub_kernels", action="store_true",
        help="let transformers download compiled kernels from the Hub (kernels-community/*) and swap them in on "
             "CUDA; off: plain PyTorch layers, nothing fetched at run time",
    )


HANDLERS = {
    "train": _train,
    "eval": _eval,
    "compare": _compare,
    "merge": _merge,
    "push": _push,
    "convert": _convert,
    "export": _export,
    "data": _data,
    "predict": _predict,
    "segment": _segment,
    "demo": _demo,
}


def run(argv: list[str] | None = None) -> None:
    """The `sam2-peft` console script: `main`, ending with one message and exit status 2 on a user error
    (`--debug` or `SAM2_PEFT_DEBUG=1` shows the traceback; see `sam2_peft.errors`)."""
    run_command(main, sys.argv[1:] if argv is None else argv)


def main(argv: list[str] | None = None) -> None:
    """Dispatch `sam2-peft <command> ...`; each command parses its own flags (`sam2-peft <command> --help`).

    Errors propagate (for callers and tests); the console script, `run`, reports user errors as one message.
    """
    argv = sys.argv[1:] if argv is None else argv
    usage = "\n".join(f"  {name:<8} {text}" for name, text in COMMANDS.items())
    parser = argparse.ArgumentParser(
        prog="sam2-peft",
        description="Fine-tune SAM2 on your own images.",
        epilog=f"commands:\n{usage}\n\nRun `sam2-peft <command> --help` for its flags.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("command", choices=list(COMMANDS), metavar="command")
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return
    command = parser.parse_args(argv[:1]).command
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("sam2_peft").setLevel(logging.INFO)
    HANDLERS[command](argv[1:])


if __name__ == "__main__":
    run()
