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
    sam2-peft track    --model M [--adapter A] --video PATH --box X1,Y1,X2,Y2 [--box ...] [--frame F] --output DIR
    sam2-peft demo     --model M [--adapter [NAME=]PATH ...] [--host 127.0.0.1] [--port 7860]
"""

from __future__ import annotations

import argparse
import logging
import sys

from sam2_peft import inference_commands
from sam2_peft.errors import ConfigError, run_command
from sam2_peft.inference_commands import add_generator_flags, add_hub_kernels_flag, generator_options

COMMANDS = {
    "train": "fine-tune SAM2 (fields from --config YAML, overridden by --<field> VALUE)",
    "eval": "evaluate a model (and adapter) on a dataset with a fixed prompt protocol",
    "compare": "train the four strategies with one budget and tabulate cost and accuracy",
    "merge": "fold an adapter into its base: a Hugging Face folder or an official sam2 checkpoint",
    "push": "upload an adapter folder to the Hugging Face Hub",
    "convert": "convert an official sam2 checkpoint (.pt) into a Hugging Face model folder",
    "data": "check a dataset: images, objects, and what would be skipped and why",
    **inference_commands.DESCRIPTIONS,
}


def _train(args: list[str]) -> None:
    from sam2_peft.config import parse_config
    from sam2_peft.finetune import finetune

    metrics = finetune(parse_config(args))
    baseline, best = metrics["baseline"], metrics["best"]
    if baseline is not None:
        print(f"Dice before: {baseline['dice']:.4f}  after (best, step {metrics['best_step']}): {best['dice']:.4f}"
              + (f"; J&F {baseline['j_and_f']:.4f} -> {best['j_and_f']:.4f}" if "j_and_f" in best else ""))


def _data(args: list[str]) -> None:
    from sam2_peft.data import inspect_dataset
    from sam2_peft.data.config import build_data_parser, parse_data_args

    parser = build_data_parser("sam2-peft data", COMMANDS["data"])
    parser.add_argument("source", nargs="?", default=None, help="the same as --data")
    data, extra = parse_data_args(parser, args)
    data = data.resolved()
    if data.task == "video":
        return _data_clips(data, extra.source or data.data)
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


def _data_clips(data, source: str) -> None:
    """`sam2-peft data --task video`: each split's clips, frames and objects, and what would be skipped (objects that
    vanish at 1024 px, SAM2's input size, included)."""
    import dataclasses

    from sam2_peft.data import ClipDataset, Preprocessor

    clips_log = logging.getLogger("sam2_peft.data.clips")
    level = clips_log.level
    clips_log.setLevel(logging.WARNING)  # its INFO log would repeat the report
    try:
        for name, clips in dataclasses.replace(data, data=source).load_clip_splits(seed=0).items():
            dataset = ClipDataset(clips, Preprocessor(), mask_type=data.mask_type, min_object_area=data.min_object_area,
                                  intensity=data.intensity_config(), prompts="box", split=name)
            print(dataset.report.format())
    finally:
        clips_log.setLevel(level)


def _merge(args: list[str]) -> None:
    from sam2_peft.export import merge_to_folder
    from sam2_peft.hub import load_adapted

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
    parser.add_argument("--task", default=None, choices=["image", "video"],
                        help="merge into the image or the video model (default: video when the adapter trained the "
                             "memory path, else image)")
    add_hub_kernels_flag(parser)
    parsed = parser.parse_args(args)
    video = {"image": False, "video": True, None: None}[parsed.task]
    model = load_adapted(parsed.model, parsed.adapter, video=video, adapter_revision=parsed.revision,
                         sam2_config=parsed.sam2_config, hub_kernels=parsed.hub_kernels)
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
    parser.add_argument("--video", action="store_true", help="write the video model (Sam2VideoModel, memory path too)")
    parsed = parser.parse_args(args)
    path = convert_checkpoint(parsed.sam2_checkpoint, parsed.sam2_config, parsed.output_dir, video=parsed.video)
    print(f"Hugging Face model folder written to {path}")


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
    add_hub_kernels_flag(parser)
    add_generator_flags(parser)
    data, parsed = parse_data_args(parser, args)
    if data.task == "video":
        return _eval_video(data, parsed)
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
        everything={**generator_options(parsed), "iou_threshold": parsed.match_iou},
    )


def _eval_video(data, parsed: argparse.Namespace) -> None:
    from sam2_peft.video.evaluation import evaluate_video

    if parsed.prompt == "everything" or parsed.correction_clicks:
        raise ConfigError("--task video prompts each object once (--prompt box|point|points:K) and tracks it; "
                          "drop --prompt everything and --correction_clicks.")
    evaluate_video(parsed.model, data, adapter=parsed.adapter, prompt=parsed.prompt, split=parsed.split,
                   baseline=not parsed.no_baseline, seed=parsed.seed, output_dir=parsed.output_dir,
                   revision=parsed.revision, sam2_config=parsed.sam2_config, adapter_revision=parsed.adapter_revision,
                   hub_kernels=parsed.hub_kernels)


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


HANDLERS = {
    "train": _train,
    "eval": _eval,
    "compare": _compare,
    "merge": _merge,
    "push": _push,
    "convert": _convert,
    "data": _data,
    **inference_commands.HANDLERS,
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
