"""Train several strategies on the same data with the same budget and tabulate what each costs and buys.

    sam2-peft compare --config recipes/configs/quickstart.yaml --max_steps 200 --output_dir runs/compare

    from sam2_peft.comparison import compare_strategies
    table = compare_strategies(TrainConfig(model="tiny-random", data="examples/data", max_steps=20), output_dir="cmp")

This turns the usual qualitative strategy table (cost, data needs, overfitting risk, headroom) into measurements on
your data and hardware. Every strategy runs `finetune` with the base config's data, steps, batch size and seed, in
a fresh process by default: runs cannot leak state into each other, and on CPU peak memory (the process's peak
RSS, which only grows) is then per strategy. Each strategy trains at its own default learning rate
(`sam2_peft.config.DEFAULT_LEARNING_RATES`: full fine-tuning at the decoder's rate diverges) unless its options
set `learning_rate`.

Written to `output_dir`: one run folder per strategy (`<slug>/final`, `metrics.json`, ...), and
`comparison.json`, `comparison.md` and `comparison.png` (Dice against trainable parameters, time per step).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import multiprocessing
import re
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
import yaml
from torch.optim.optimizer import register_optimizer_step_post_hook

from sam2_peft.config import TrainConfig
from sam2_peft.reports import comparison_markdown, plot_comparison

logger = logging.getLogger(__name__)

DEFAULT_STRATEGIES = (
    ("decoder", {}),
    ("partial", {"num_blocks": 2}),
    ("full", {}),
    ("lora", {"lora_r": 4}),
    ("lora", {"lora_r": 16}),
)


def parse_strategies(spec: str) -> list[tuple[str, dict]]:
    """Parse `strategy[:field=value[:field=value]],...`, e.g. `decoder,partial:num_blocks=2,lora:lora_r=16`.

    Fields are `TrainConfig` fields; values are read as YAML scalars (`2` is an int, `1e-4` a float, `true` a bool).

    Example:
        >>> parse_strategies("decoder,lora:lora_r=4:targets=trunk.attn")
        [('decoder', {}), ('lora', {'lora_r': 4, 'targets': 'trunk.attn'})]
    """
    strategies = []
    for entry in filter(None, (part.strip() for part in spec.split(","))):
        name, *assignments = entry.split(":")
        options = {}
        for assignment in assignments:
            key, sep, value = assignment.partition("=")
            if not sep or not key:
                raise ValueError(f"--strategies: {assignment!r} in {entry!r} is not field=value (e.g. lora:lora_r=16).")
            options[key] = _scalar(value)
        strategies.append((name, options))
    if not strategies:
        raise ValueError(f"--strategies {spec!r} names no strategy; e.g. 'decoder,partial:num_blocks=2,full,lora'.")
    return strategies


def _scalar(text: str):
    value = yaml.safe_load(text)
    if isinstance(value, str):
        # YAML 1.1 reads `3e-4` (no dot) as a string; a learning rate is what it means.
        try:
            return float(value)
        except ValueError:
            return value
    return value


def strategy_label(strategy: str, options: dict) -> str:
    """`("lora", {"lora_r": 4})` -> `lora (lora_r=4)`."""
    return f"{strategy} ({', '.join(f'{k}={v}' for k, v in options.items())})" if options else strategy


def compare_strategies(
    cfg_base: TrainConfig,
    strategies=DEFAULT_STRATEGIES,
    output_dir: str | Path | None = None,
    *,
    isolate: bool = True,
) -> dict:
    """Fine-tune each strategy with `cfg_base`'s data and budget; write and return the comparison.

    Args:
        cfg_base: the shared settings (model, data, max_steps / num_epochs, batch size, seed, ...); its strategy,
            learning rate and output_dir are replaced per run.
        strategies: `(strategy, options)` pairs, options being `TrainConfig` fields (`parse_strategies` reads them
            from a string).
        output_dir: where run folders and the comparison files go; default `cfg_base.output_dir`.
        isolate: run each strategy in a fresh process (spawned). Without it, CPU peak memory is not measured
            (a process's peak RSS only grows) and left None.

    Returns:
        What `comparison.json` holds: `budget` (the shared settings), `device`, and `strategies`, one row per
        strategy with `label`, `strategy`, `options`, `output_dir`, `trainable_params`, `total_params`,
        `trainable_percent`, `saved_mb` (files in `final/`), `peak_memory_mb` (CUDA: max allocated; CPU: the
        process's peak RSS, libraries included), `seconds_per_step` (median time between optimiser steps, so a
        step that ran validation in between is an outlier it ignores), `images_per_s` (images per optimiser
        step / `seconds_per_step`), `dice` and `iou` (best validation, what `final/` holds), `baseline_dice`,
        `steps`, `wall_s` (the whole run: loading, validation and saving included) and `error` (None, or why the
        run failed; the other strategies still run).

    Example:
        >>> compare_strategies(parse_config(["--config", "cfg.yaml"]), parse_strategies("decoder,lora:lora_r=8"))
    """
    output = Path(output_dir or cfg_base.output_dir)
    configs = _strategy_configs(cfg_base, list(strategies), output)
    rows = []
    for label, cfg in configs:
        logger.info("compare: training %s in %s", label, cfg.output_dir)
        try:
            if isolate:
                # One fresh process per strategy; spawn, because a forked child inherits the parent's memory peak.
                with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
                    measured = pool.submit(measure_run, cfg, True).result()
            else:
                measured = measure_run(cfg, False)
            rows.append({"label": label, **measured, "error": None})
        except Exception as error:  # noqa: BLE001 - a failed strategy (e.g. out of memory) is a result, not a stop
            logger.warning("compare: %s failed: %s", label, error, exc_info=True)
            rows.append({"label": label, "strategy": cfg.strategy, "output_dir": cfg.output_dir,
                         "error": f"{type(error).__name__}: {error}"})  # fmt: skip
    if all(row["error"] for row in rows):
        raise RuntimeError("compare: every strategy failed:\n" + "\n".join(f"{r['label']}: {r['error']}" for r in rows))

    result = {
        "budget": {
            key: getattr(cfg_base, key)
            for key in ("model", "data", "max_steps", "num_epochs", "batch_size", "gradient_accumulation_steps", "seed")
        },
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "strategies": rows,
    }
    output.mkdir(parents=True, exist_ok=True)
    (output / "comparison.json").write_text(json.dumps(result, indent=2))
    budget = result["budget"]
    steps = f"{budget['max_steps']} steps" if budget["max_steps"] else f"{budget['num_epochs']} epochs"
    title = f"{budget['model']} on {budget['data']}: {steps}, batch {budget['batch_size']}, {result['device']}"
    (output / "comparison.md").write_text(comparison_markdown(rows, title=title))
    plot_comparison(rows, output / "comparison.png")
    return result


def _strategy_configs(cfg_base: TrainConfig, strategies: list, output: Path) -> list[tuple[str, TrainConfig]]:
    """Build and validate every run's config before training any (a typo fails now, not after an hour)."""
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    configs, seen = [], set()
    for strategy, options in strategies:
        label = strategy_label(strategy, options)
        unknown = sorted(set(options) - fields)
        if unknown:
            raise ValueError(
                f"compare: options {unknown} of {label!r} are not TrainConfig fields (see `sam2-peft train --help`)."
            )
        if label in seen:
            raise ValueError(f"compare: {label!r} is listed twice.")
        seen.add(label)
        slug = "_".join([strategy, *(re.sub(r"[^\w.-]", "-", f"{k}{v}") for k, v in options.items())])
        overrides = {"learning_rate": None, "resume_from_checkpoint": None, **options}
        cfg = dataclasses.replace(cfg_base, strategy=strategy, output_dir=str(output / slug), **overrides)
        configs.append((label, cfg))
    return configs


def measure_run(cfg: TrainConfig, isolated: bool) -> dict:
    """Run `finetune(cfg)` and measure it: the fields of one `compare_strategies` row (all but `label`, `error`).

    Args:
        cfg: the run's config.
        isolated: whether this process runs nothing else, so that its peak RSS is this run's (CPU).
    """
    from sam2_peft.finetune import finetune
    from sam2_peft.models import load_sam2
    from sam2_peft.strategies import apply_strategy, trainable_summary
    from sam2_peft.training import peak_memory_mb

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    stamps = []

    def on_step(optimizer, args, kwargs):
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # kernels run asynchronously; time their end, not their launch
        stamps.append(time.perf_counter())

    # A global hook sees the optimiser that finetune builds (inside accelerate's wrapper) without touching it.
    handle = register_optimizer_step_post_hook(on_step)
    start = time.perf_counter()
    try:
        metrics = finetune(cfg)
    finally:
        handle.remove()
    wall = time.perf_counter() - start
    peak = peak_memory_mb(device) if isolated or device.type == "cuda" else None

    seconds = float(np.median(np.diff(stamps))) if len(stamps) > 1 else None
    images_per_step = cfg.batch_size * cfg.gradient_accumulation_steps
    model = apply_strategy(load_sam2(cfg.model, revision=cfg.revision, sam2_config=cfg.sam2_config),
                           cfg.strategy, **cfg.strategy_options())  # fmt: skip
    counts = trainable_summary(model)["all"]
    final = Path(cfg.output_dir) / "final"
    best, baseline = metrics["best"], metrics["baseline"]
    return {
        "strategy": cfg.strategy,
        "options": {"learning_rate": cfg.learning_rate, **cfg.strategy_options()},
        "output_dir": cfg.output_dir,
        "trainable_params": counts["trainable"],
        "total_params": counts["total"],
        "trainable_percent": 100 * counts["trainable"] / counts["total"],
        "saved_mb": sum(path.stat().st_size for path in final.rglob("*") if path.is_file()) / 2**20,
        "peak_memory_mb": peak,
        "seconds_per_step": seconds,
        "images_per_s": images_per_step / seconds if seconds else None,
        "dice": best["dice"],
        "iou": best["iou"],
        "baseline_dice": baseline["dice"] if baseline else None,
        "steps": metrics["steps"],
        "wall_s": wall,
    }

